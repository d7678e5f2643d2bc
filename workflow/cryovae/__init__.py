"""cryovae: structures and cryo-ET subtomograms to an affinity-organised latent space,
classes (or unknown) for every particle, and RELION pose priors."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cryovae")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
