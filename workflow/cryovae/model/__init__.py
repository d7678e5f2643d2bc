"""The affinity-VAE: encoder with explicit pose, CNN and Gaussian-splat decoders, losses, I/O."""

from cryovae.model.io import load_model, save_model
from cryovae.model.vae import AffinityVAE

__all__ = ["AffinityVAE", "load_model", "save_model"]
