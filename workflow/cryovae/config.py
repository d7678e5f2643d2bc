"""The typed configuration: the single source of every default.

The workflow's JSON schema (``workflow/schemas/config.schema.json``) is generated from
:class:`Config` by ``cryovae schema`` and a test keeps the two identical.  A bad config
fails at load time with a message that names the key and what was expected.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from cryovae.errors import InputError

# A structure given as a PDB id rather than a file (see structures.resolve_structure_file).
PDB_ID_PATTERN = re.compile(r"[0-9][A-Za-z0-9]{3}")
# Every stage sees these: in data: images the classes come from the images section.
GLOBAL_KEYS = ("output_dir", "seed", "data", "structures", "unseen", "pixel_size_angstrom", "box_size", "images")
IMAGE_SPLITS = ("train", "val", "test")   # the splits data: images needs (train and val: seen classes only)
SECTIONS_KEY = "stage_sections"
CLASS_KEY = "stage_class"


def check_tilt_range(v, include_90: bool = True):
    """A [min, max] tilt range in degrees (or None): min < max within ±90 (ends included or not)."""
    if v is None:
        return v
    ok = -90 <= v[0] < v[1] <= 90 if include_90 else -90 < v[0] < v[1] < 90
    if not ok:
        bound = "<=" if include_90 else "<"
        raise ValueError(f"expected [min, max] with -90 {bound} min < max {bound} 90")
    return v


class _Section(BaseModel):
    """A config section: unknown keys are errors (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class StructureOptions(_Section):
    """How atomic models are read and cleaned before any descriptor or map is made."""

    model_index: int = Field(0, ge=0, description="Which model of a multi-model file to use (0 = first).")
    remove_waters: bool = Field(True, description="Drop water molecules.")
    remove_ligands: bool = Field(True, description="Drop non-polymer residues (ligands, ions).")
    remove_hydrogens: bool = Field(True, description="Drop hydrogen and deuterium atoms.")
    cache_dir: str = Field(
        "~/.cache/cryovae/pdb", description="Where downloaded PDB entries are kept and reused."
    )
    pdb_server: str = Field(
        "https://files.rcsb.org/download",
        description="Base URL that serves {ID}.cif.gz (the RCSB layout).",
    )


class AffinityConfig(_Section):
    """SOAP descriptors and the class affinity matrix made from them."""

    mode: Literal["all_atom", "coarse_grained"] = Field(
        "all_atom",
        description="all_atom: C, N, O, S (and P) atoms; coarse_grained: C-alpha and P only "
        "(for complexes of 100k+ atoms).",
    )
    r_cut: float | None = Field(
        None, gt=0, description="SOAP cutoff radius in Å; null: 6 (all_atom) or 12 (coarse_grained)."
    )
    n_max: int | None = Field(None, ge=1, description="Radial basis size; null: 6 (all_atom) or 4.")
    l_max: int | None = Field(None, ge=0, description="Angular degree; null: 6 (all_atom) or 4.")
    sigma: float | None = Field(
        None, gt=0, description="Gaussian width of the atom densities in Å; null: 1.0 or 2.0."
    )
    max_centres: int = Field(
        2000, ge=10, description="SOAP is averaged over at most this many evenly chosen centres."
    )

    def resolved(self) -> dict[str, float]:
        """The SOAP parameters with the mode's defaults filled in."""
        defaults = {
            "all_atom": {"r_cut": 6.0, "n_max": 6, "l_max": 6, "sigma": 1.0},
            "coarse_grained": {"r_cut": 12.0, "n_max": 4, "l_max": 4, "sigma": 2.0},
        }[self.mode]
        return {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in defaults.items()}


class MapConfig(_Section):
    """Reference density maps made from the structures (or taken from given maps)."""

    files: dict[str, str] = Field(
        default_factory=dict,
        description="Class -> an existing map (MRC) to use instead of simulating one from the "
        "structure; it is resampled to the pixel size and box.",
    )

    b_factor: float = Field(
        0.0, ge=0, description="Extra B-factor (Å²) added to every atom by the scattering model."
    )
    lowpass_angstrom: float | None = Field(
        None, gt=0, description="Optional low-pass filter resolution in Å applied to the map; null: none."
    )


class SimulationConfig(_Section):
    """Simulated subtomograms with known poses."""

    particles_per_class: int = Field(
        1500, ge=3, description="Particles per class in the training split; val and test get "
        "val_fraction and test_fraction of this."
    )
    val_fraction: float = Field(0.25, gt=0, le=1, description="Validation particles per class, relative.")
    test_fraction: float = Field(0.5, gt=0, le=2, description="Test particles per class, relative.")
    particles_per_shard: int | None = Field(
        None, ge=1, description="At most this many particles per shard file, which is one simulate job "
        "(a split is cut into equal shards); null: sized by work, at most 2^28 voxels (1 GiB of float32) "
        "a shard: 8,192 particles at 32³, 1,024 at 64³."
    )
    storage_dtype: Literal["float32", "float16"] = Field(
        "float32", description="How simulated shards are stored; every reader gets float32. float16 halves "
        "the disk and the writes (relative rounding 2^-11, far below any simulated noise), for runs whose "
        "simulation is bound by the disk."
    )
    snr: float | None = Field(
        0.5, gt=0, description="Signal variance over noise variance in the box; null: noise-free."
    )
    snr_reference: Literal["particle", "seen_classes"] = Field(
        "particle", description="particle: every particle has SNR snr. seen_classes: one noise level for "
        "all, as in a tomogram: a particle's SNR is snr times its class map's variance in the box over the "
        "mean of the seen classes', so small complexes are fainter than large ones (their template fits "
        "are then as low as they are in a tomogram)."
    )
    tilt_range_deg: tuple[float, float] | None = Field(
        (-60.0, 60.0), description="Tilt range of the missing wedge about Y; null: no missing wedge."
    )
    max_shift_px: float = Field(1.0, ge=0, description="Uniform random shift per axis, in pixels.")
    ctf: bool = Field(True, description="Apply a contrast transfer function.")
    defocus_range_um: tuple[float, float] = Field(
        (2.0, 5.0), description="Underfocus range in µm (positive = underfocus)."
    )
    voltage_kv: float = Field(300.0, gt=0, description="Acceleration voltage in kV.")
    spherical_aberration_mm: float = Field(2.7, ge=0, description="Spherical aberration in mm.")
    amplitude_contrast: float = Field(0.07, ge=0, le=1, description="Amplitude contrast fraction.")
    bandpass_angstrom: tuple[float, float] | None = Field(
        None, description="Optional band-pass [low, high] resolution in Å (e.g. [200, 20]); null: none."
    )
    normalise: bool = Field(True, description="Zero mean, unit variance per particle.")

    @field_validator("tilt_range_deg")
    @classmethod
    def _tilt_order(cls, v):
        return check_tilt_range(v)


class TomogramInput(_Section):
    """One tomogram and its picked particles."""

    tomogram: str = Field(..., description="Path to the tomogram (MRC).")
    coordinates: str = Field(
        ..., description="Picked coordinates: RELION 4 or 5 STAR, or CSV with columns x, y, z (pixels)."
    )
    pixel_size_angstrom: float | None = Field(
        None, gt=0, description="Tomogram pixel size; null: from the MRC header."
    )
    acquisition: str | None = Field(
        None, description="Tilt angles and per-tilt defocus and dose: an IMOD .tlt, a SerialEM .mdoc or a "
        "RELION 5 tomograms.star; null: tilt_range_deg stands for a tilt every 3 degrees with no dose."
    )
    tilt_range_deg: tuple[float, float] | None = Field(
        None, description="Tilt range about Y when there is no acquisition file (one of the two is required)."
    )
    voltage_kv: float | None = Field(None, gt=0, description="Acceleration voltage (kV) if the file gives none.")
    spherical_aberration_mm: float | None = Field(
        None, ge=0, description="Spherical aberration (mm) if the file gives none."
    )
    amplitude_contrast: float | None = Field(
        None, ge=0, lt=1, description="Amplitude contrast fraction if the file gives none."
    )
    defocus_um: float | None = Field(
        None, gt=0, description="Underfocus at the tilt axis (µm), every tilt, if the file gives none."
    )
    invert_contrast: bool = Field(
        False, description="Multiply the cut boxes by -1 (dark protein, as most tomograms are, to white)."
    )
    truth: str | None = Field(
        None, description="Optional ground-truth STAR (RELION 4/5 coordinates, cryovaeClassName, "
        "rlnAngleRot/Tilt/Psi; cryovaeNovel 1 for particles of no configured class): each pick takes the "
        "truth of the nearest true particle within box_size / 4 px, so evaluate scores the tomogram."
    )

    @field_validator("tilt_range_deg")
    @classmethod
    def _tilt_order(cls, v):
        return check_tilt_range(v)


class TomogramSimulationConfig(_Section):
    """Tomograms simulated as real ones are made: a crowded slab, a tilt series, back-projection."""

    tomograms: int = Field(0, ge=0, description="Simulated tomograms (sim_00, sim_01, ...); each is "
                           "extracted and evaluated as a split of its own.  0: none.")
    particles_per_class: int = Field(10, ge=1, description="Particles of each class (and each decoy) per tomogram.")
    maps: dict[str, str] = Field(
        default_factory=dict, description="Class -> a map made by another program (MRC) to place instead of "
        "the workflow's own map; resampled to pixel_size_angstrom, recentred on its density centre of mass."
    )
    decoys: dict[str, str] = Field(
        default_factory=dict, description="Name -> map (MRC) of particles no class names, placed too and "
        "counted as unknowns (novel) by evaluate."
    )
    size_xyz_px: tuple[int, int, int] = Field(
        (256, 256, 64), description="Tomogram size (x, y, z) in pixels of pixel_size_angstrom."
    )
    tilt_range_deg: tuple[float, float] = Field((-60.0, 60.0), description="Tilt range about Y.")
    tilt_step_deg: float = Field(3.0, gt=0, description="Tilt increment.")
    dose_per_tilt: float = Field(3.0, ge=0, description="Exposure per tilt in e/Å², collected dose-symmetrically "
                                 "(Hagen: 0, then groups of two on alternating sides); 0: no dose weighting.")
    ctf: bool = Field(True, description="Apply a per-tilt 2D CTF with the defocus gradient across the tilt axis.")
    defocus_um: float = Field(3.0, gt=0, description="Nominal underfocus at the tilt axis, µm.")
    defocus_strip_px: int = Field(32, ge=4, description="Width of the image strips that share one defocus.")
    voltage_kv: float = Field(300.0, gt=0, description="Acceleration voltage in kV.")
    spherical_aberration_mm: float = Field(2.7, ge=0, description="Spherical aberration in mm.")
    amplitude_contrast: float = Field(0.07, ge=0, lt=1, description="Amplitude contrast fraction.")
    snr: float | None = Field(
        0.1, gt=0, description="Signal variance over noise variance in a box_size box at the true particle "
        "positions of the reconstruction (calibrated by linearity); null: noise-free."
    )
    pick_error_px: float = Field(1.0, ge=0, description="Pick error per axis in pixels (picks.star).")
    pick_error_distribution: Literal["uniform", "gaussian"] = Field(
        "uniform", description="uniform: in ±pick_error_px; gaussian: standard deviation pick_error_px."
    )
    dark_contrast: bool = Field(False, description="Write dark protein (as IMOD and AreTomo do); extract such "
                                "tomograms with contrast inverted.")

    @field_validator("tilt_range_deg")
    @classmethod
    def _tilt_order(cls, v):
        return check_tilt_range(v, include_90=False)


class ExtractionConfig(_Section):
    """Subtomograms cut out of real tomograms at picked coordinates."""

    tomograms: dict[str, TomogramInput] = Field(
        default_factory=dict, description="Tomogram name -> tomogram and coordinates; empty: none."
    )
    binning: int | Literal["auto"] = Field(
        1, description="Bin the tomogram by this integer factor (>= 1) before cutting; auto: the integer "
        "nearest pixel_size_angstrom / the tomogram's pixel size (checked to be exact)."
    )
    out_of_bounds: Literal["pad", "skip"] = Field(
        "pad", description="Particles whose box leaves the tomogram are padded (mean value) or skipped."
    )
    trust_pixel_size: Literal["error", "star", "mrc"] = Field(
        "error", description="When the STAR and MRC pixel sizes disagree: fail, or trust one of them."
    )
    normalise: bool = Field(True, description="Zero mean, unit variance per particle.")
    particles_per_shard: int = Field(512, ge=1, description="Particles per shard file.")

    @field_validator("binning")
    @classmethod
    def _binning(cls, v):
        if v != "auto" and v < 1:
            raise ValueError(f"expected an integer >= 1 or auto, got {v}")
        return v

    @field_validator("tomograms")
    @classmethod
    def _names(cls, v):
        for name in v:
            if name in ("train", "val", "test") or not name.replace("-", "_").isidentifier():
                raise ValueError(
                    f"tomogram name {name!r}: expected letters, digits, '_' or '-', and not train/val/test"
                )
        return v


class Schedule(_Section):
    """A weight that changes with the epoch: constant, linear ramp, or cyclical ramps."""

    kind: Literal["constant", "ramp", "cyclical"] = Field("constant", description="Schedule shape.")
    start: float = Field(0.0, ge=0, description="Value at the start of a ramp (times the weight).")
    ramp_epochs: int = Field(10, ge=1, description="Epochs a ramp takes (a cycle's length if cyclical).")


SIMULATED_TOMOGRAM_PREFIX = "sim_"   # simulated tomograms are the splits sim_00, sim_01, ...


class SemiSupervisedConfig(_Section):
    """The ss-rVAE: a classifier head q(y|x) and a class-conditioned decoder, taught by labelled
    particles and adapted by unlabelled ones through the ELBO summed over the classes (M2)."""

    classifier: bool = Field(False, description="Train a classifier head q(y|x) with a decoder conditioned on "
                             "the class; embed then writes class probabilities (feature `network`).")
    unlabelled: list[str] = Field(
        [], description="Splits whose particles train without their labels, through the ELBO over the classes "
        "(extracted tomograms, e.g. sim_00, or 2D image splits); needs classifier: true.")
    classifier_input: Literal["auto", "canonical", "trunk"] = Field(
        "auto", description="What q(y|x) reads: canonical, the particle moved back into the model's frame "
        "by its own predicted pose, through a CNN of its own (invariant as the pose is); trunk, the encoder's "
        "last hidden layer; auto: canonical for images, trunk for subtomograms (the network's own 3D poses are "
        "far off, ~100° median on simulated data, so particles put back by them would not be upright).")
    classifier_weight: float = Field(30.0, ge=0, description="alpha: weight of the labelled class-weighted "
                                     "cross entropy in the total loss (30, as the ss-rVAE example).")
    labelled_fraction: float = Field(0.5, gt=0, lt=1, description="Share of labelled particles in every "
                                     "batch when unlabelled splits train too (the labelled ones are cycled).")
    decoded_classes: int = Field(3, ge=0, description="An unlabelled particle's ELBO is summed over its "
                                 "this-many most probable classes (renormalised); 0: all (one decoder pass each).")
    augment_rotation_deg: float = Field(0.0, ge=0, le=180, description="2D only: each training image is "
                                        "rotated in-plane by a random angle within ± this (no wedge to rotate along).")
    augment_shift_px: float = Field(0.0, ge=0, description="2D only: and shifted by up to this many pixels per axis.")

    @model_validator(mode="after")
    def _unlabelled_needs_classifier(self) -> "SemiSupervisedConfig":
        if self.unlabelled and not self.classifier:
            raise ValueError("training.semi_supervised.unlabelled needs training.semi_supervised.classifier: true")
        return self


class TrainingConfig(_Section):
    """The affinity-VAE and its training."""

    epochs: int = Field(5, ge=1, description="Training epochs.")
    batch_size: int = Field(64, ge=2, description="Particles per batch (pairs in a batch feed the affinity loss).")
    latent_dims: int = Field(8, ge=2, description="Size of the shape latent.")
    decoder: Literal["cnn", "splat"] = Field(
        "splat", description="splat: Gaussian splats (about 2.5x faster to train on a CPU); cnn: volume decoder."
    )
    channels: list[int] = Field([16, 32, 64], description="Encoder channels per stage (depth = length).")
    n_splats: int = Field(128, ge=1, description="Gaussians in the splat decoder.")
    beta: float = Field(
        0.01, ge=0, description="KL weight (the reconstruction term is a per-voxel mean, the KL a sum over latents)."
    )
    beta_schedule: Schedule = Field(default_factory=Schedule, description="How beta changes with epoch.")
    gamma: float = Field(2.0, ge=0, description="Affinity loss weight.")
    gamma_schedule: Schedule = Field(default_factory=Schedule, description="How gamma changes with epoch.")
    affinity_loss: Literal["l1", "l2"] = Field("l1", description="Distance between latent cosine and affinity.")
    pose_weight: float = Field(
        1.0, ge=0, description="Weight of the supervised pose term on simulated data (0: none)."
    )
    wedge_masked_loss: bool = Field(
        True, description="Compare reconstructions only where the missing wedge leaves data."
    )
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate.")
    checkpoint_every: int = Field(1, ge=1, description="Write a checkpoint every this many epochs.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present.")
    threads: int = Field(2, ge=1, description="CPU threads the train rule asks for.")
    semi_supervised: SemiSupervisedConfig = Field(
        default_factory=SemiSupervisedConfig, description="Classifier head and unlabelled splits (ss-rVAE).")
    shape_frame: Literal["particle", "matched"] = Field(
        "particle", description="Where the shape latent reads each particle: particle, as it lies (one encoder "
        "gives latent and pose); matched, turned upright by its best-fit template-matched pose (training and "
        "inference alike, so the latent sees shape alone; a second encoder gives the network's own pose). "
        "matched needs matching.enabled and subtomograms.")


FeatureName = Literal["latent", "template", "fit", "template_relative", "margin", "screen", "screen_relative", "network"]


class ClassificationConfig(_Section):
    """Classes and unknowns from latents (and template-matching scores)."""

    features: list[FeatureName] = Field(
        ["latent", "template", "fit"], min_length=1, description="What the classifier sees: the VAE's latent "
        "means, the best global template-matching score per seen class, the full-size correlation at the "
        "refined pose of the best class; scale-free forms: template_relative (each score over the "
        "particle's best), margin (best minus second-best score, over the best); screen, screen_relative: "
        "the class screen's correlations at each class's best translation (matching.refine_by), raw and "
        "over the particle's best.  All but latent need matching.enabled."
    )
    unknown_features: list[FeatureName] = Field(
        ["latent", "template", "fit"], min_length=1, description="What the unknown score sees (a Gaussian "
        "per seen class over these features; the smallest Mahalanobis distance).  [latent] when matching is off."
    )
    accept_fraction: float = Field(
        0.95, gt=0, lt=1, description="Fraction of known validation particles the unknown threshold accepts."
    )
    adapt: Literal["none", "em"] = Field(
        "em", description="Class model of each extracted (tomogram) split: none keeps the one fitted on "
        "simulated particles; em refits it on the split's own unlabelled particles by EM, anchored to the "
        "simulated model, with an unknown component; the unknown threshold accepts accept_fraction of the "
        "adapted Gaussian classes (a chi-squared quantile).  Simulated splits keep the simulated model."
    )
    adapt_prior_counts: float = Field(
        5.0, ge=0, description="Pseudo-counts of the simulated model in each EM update: per class for its "
        "mean and weight, per class and feature dimension for the shared covariance (0: the split alone)."
    )
    adapt_unknown_fraction: float = Field(
        0.25, gt=0, lt=1, description="Prior fraction of a tomogram's particles that belong to no seen "
        "class: EM starts by treating the particles with the highest unknown scores as unknown."
    )
    unknown_model: Literal["distance", "fit_mixture"] = Field(
        "distance", description="Unknowns of an adapted (tomogram) split: distance, the adapted Gaussian "
        "model over unknown_features and its chi-squared threshold; fit_mixture, the posterior that a "
        "particle is unknown given its fit and its nearest class (per class a Gaussian of the fits of that "
        "class's particles beside one Gaussian of unknowns' fits shared by all classes, by EM on the split), "
        "called unknown above unknown_posterior.  fit_mixture needs matching.enabled and adapt: em."
    )
    nearest_class: Literal["model", "best_fit"] = Field(
        "model", description="The class a particle is named (unless unknown): model, the most probable under "
        "the class model over features; best_fit, the refined class whose matched filter fits the particle "
        "best (template matching decides; the class model's probabilities are still written).  best_fit "
        "needs matching.enabled."
    )
    unknown_posterior: float = Field(
        0.5, gt=0, lt=1, description="With unknown_model fit_mixture: the posterior of unknown above which "
        "a particle is called unknown (0.5: the likelier answer; higher keeps more seen particles)."
    )


class MatchingConfig(_Section):
    """Per-particle poses (and class scores) by template matching against the seen classes' maps."""

    enabled: bool = Field(
        True, description="Match every particle against every seen reference map; the poses written "
        "out come from matching, the network's poses are kept beside them. false: network poses only."
    )
    coarse_step_deg: float = Field(15.0, gt=0, description="Angular step of the global rotation grid.")
    coarse_binning: int = Field(2, ge=1, description="Fourier-crop factor of the global search (box / factor even).")
    coarse_rank: int = Field(
        256, ge=0, description="Dimensions of the global search: each class's rotated references are compared "
        "with the particle in the span of their leading principal directions (0: every voxel)."
    )
    refine_steps_deg: list[float] = Field(
        [6.0, 2.5], description="Steps of the local refinement grids (5 x 5 x 5 rotations each), coarse to fine."
    )
    refine_top: int = Field(2, ge=1, description="Classes per particle refined (the best by refine_by).")
    refine_by: Literal["screen", "global"] = Field(
        "screen", description="Which classes a particle refines: screen, the best matched-filter correlations at "
        "each class's best global rotation and best translation (coarse box); global, the best global-search "
        "scores, compared at one place (mis-centred picks lose their class there)."
    )
    coarse_keep: int = Field(
        4, ge=1, description="Global-search peaks refined per refined class: the best grid rotations at least "
        "pose_far_deg apart (modulo the class's point group); each climbs the coarsest local grid and the best "
        "there is refined further."
    )
    starts: Literal["grid", "network"] = Field(
        "grid", description="Where each refined class's coarse_keep local searches start: grid, the global "
        "search's best rotations; network, the pose network's best-ranked rotations (pose_network), at least "
        "pose_far_deg apart, the best refined to the network's probability-weighted mean around it. The global "
        "search runs either way (its scores are features, its score landscape the pose confidence) unless "
        "global_search is false."
    )
    global_search: bool = Field(
        True, description="false (with starts: network): no global search and no class screen; the pose network's "
        "class probabilities choose the refine_top classes, its proposals start the local searches, and its "
        "distribution over rotations gives the pose confidence (pose_margin then in log-odds). With refine_top 1 "
        "about twice as fast on SHREC, fewer poses beyond 15 deg, a median 0.4 deg worse (benchmarks/RESULTS.md). "
        "The classifier cannot then read template, template_relative, margin, screen or screen_relative, and the "
        "contrast is not checked."
    )
    centre_search_px: float = Field(
        0.0, ge=0, description="Before the global search each particle is centred, per class, on the class's "
        "rotational average (a matched filter no rotation changes) within this radius in pixels, for picks "
        "that miss the particle's centre; 0: the global search compares at the box centre."
    )
    pose_far_deg: float = Field(
        30.0, gt=0, le=180, description="Rotations this far from a particle's pose (modulo the point group) are "
        "other hypotheses: pose_margin compares the best score near the pose with the best beyond."
    )
    pose_margin_min: float = Field(
        0.75, description="pose_margin (in noise standard deviations of the global-search score; without the "
        "global search, the log-odds of the pose network's probability within pose_far_deg) at or above "
        "which a particle's orientation counts as determined (pose_determined); below it the priors send the "
        "particle to a global search."
    )
    tilt_range_deg: tuple[float, float] | None = Field(
        (-60.0, 60.0), description="Missing wedge of extracted particles (tilt about Y); simulated particles "
        "use simulation.tilt_range_deg.  null: no wedge."
    )
    train_per_class: int | None = Field(
        500, ge=1, description="Training-split particles matched per class: a seeded subset, on which the class "
        "model is fit and which embeddings/train.csv lists (its 15 or so features need hundreds per class, not "
        "thousands); null: all.  training.shape_frame: matched matches every one, as training reads their poses."
    )
    threads: int = Field(2, ge=1, description="CPU threads per matching job.")
    particles_per_job: int = Field(
        10_000, ge=1, description="Particles per matching job: a split is matched in as many equal parts as "
        "hold at most this many (a few minutes of 2 cores each, so that a cluster spreads a large split over "
        "nodes and no job holds a whole split), then joined. The count comes from the config for simulated "
        "splits and tomograms, from the picks file for a user's tomogram."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when present (global search in bfloat16 there); cuda without a GPU "
        "is an error."
    )

    @field_validator("refine_steps_deg")
    @classmethod
    def _positive_steps(cls, v):
        if any(not step > 0 for step in v):
            raise ValueError(f"refinement steps must be positive degrees, got {v}")
        return v


class PoseNetworkConfig(_Section):
    """A network that proposes each particle's orientation in one forward pass (matching.starts: network):
    a CNN classifying the orientation over an SO(3) grid per seen class, trained on particles
    simulated on the fly from the seen classes' maps with the simulation section's settings (SNR,
    or snr_range; wedge, CTF, shifts), each particle seen once."""

    samples: int = Field(200_000, ge=1, description="Training particles, each simulated once (about 120 per "
                         "second on 2 CPU cores at 32³).")
    batch_size: int = Field(64, ge=2, description="Particles per step.")
    step_deg: float = Field(20.0, gt=0, description="Step of the SO(3) grid the network classifies over "
                            "(20: 1,857 rotations).")
    sigma_deg: float = Field(10.0, gt=0, description="Width of the target: a Gaussian of the angle to the true "
                             "rotation (modulo the point group).")
    channels: list[int] = Field([32, 64, 128, 256], description="Convolution channels per stage.")
    hidden: int = Field(512, ge=1, description="Units of the hidden layer.")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate, cosine-decayed to a tenth.")
    snr_range: tuple[float, float] | None = Field(
        None, description="Each training particle's SNR drawn log-uniformly from [low, high] (scaled per class "
        "as simulation.snr_reference says) instead of simulation.snr, so that the network also reads particles "
        "noisier or cleaner than the simulated splits, as a tomogram's are; null: simulation.snr."
    )
    validation_particles: int = Field(512, ge=8, description="Particles of a fixed validation set (their own "
                                      "seed), scored every tenth of training.")
    threads: int = Field(2, ge=1, description="CPU threads of the pose_network rule.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present (bfloat16 there).")

    @field_validator("snr_range")
    @classmethod
    def _snr_order(cls, v):
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError("expected 0 < low <= high")
        return v


class AlignmentConfig(_Section):
    """Aligning the model's canonical frame to each class's reference map."""

    symmetry: dict[str, str] = Field(
        default_factory=dict, description="Class -> point group (C1, Cn, Dn, T, O, I); unlisted: C1."
    )
    coarse_step_deg: float = Field(15.0, gt=0, description="Angular step of the coarse global search.")
    fine_steps: int = Field(3, ge=0, description="Local refinement rounds, each halving the step.")


    @field_validator("symmetry")
    @classmethod
    def _point_groups(cls, v):
        import re

        for name, group in v.items():
            if not re.fullmatch(r"C[1-9]\d*|D[2-9]\d*|T|O|I", group):
                raise ValueError(f"class {name!r}: point group {group!r}, expected C1, Cn, Dn (n >= 2), T, O or I")
        return v


class PriorsConfig(_Section):
    """Pose priors for subtomogram averaging."""

    format: Literal["relion5", "relion4", "relion3"] = Field("relion5", description="STAR flavour written.")


class InterpretationConfig(_Section):
    """Interpretable models of the latent space: disentanglement, sparse and symbolic class rules."""

    max_dims: int = Field(3, ge=1, description="Latent dimensions each class rule may use (sparse and symbolic).")
    rule_terms: Literal["linear", "quadratic"] = Field(
        "linear", description="What a sparse class rule reads from its dimensions: the dimensions (linear, a "
        "half-space) or also their squares (quadratic, an axis-aligned band or box: a class surrounded by others "
        "in latent space needs it)."
    )
    mi_bins: int = Field(20, ge=2, description="Bins for the mutual information: equal-width for latents, "
                         "quantiles for continuous factors.")
    symbolic_generations: int = Field(50, ge=1, description="Generations of the symbolic regression per class.")
    symbolic_population: int = Field(500, ge=10, description="Population of the symbolic regression.")
    symbolic_max_length: int = Field(15, ge=3, description="Longest expression (nodes) the search may make.")
    symbolic_max_particles: int = Field(
        2000, ge=10, description="Training particles the symbolic regression sees (a seeded random subset)."
    )
    traversal_steps: int = Field(5, ge=2, description="Decoded steps per latent dimension in the traversal figures.")
    traversal_range_sd: float = Field(
        2.0, gt=0, description="Traversals span the class mean ± this many standard deviations of the dimension."
    )


def _check_range(v, lower: float | None = None):
    """A [min, max] pair with min <= max (and min > lower when given)."""
    if not v[0] <= v[1] or (lower is not None and not v[0] > lower):
        bound = f" and min > {lower}" if lower is not None else ""
        raise ValueError(f"expected [min, max] with min <= max{bound}")
    return v


class GeneratedImageSplit(_Section):
    """One split of generated glyph images (images.kind suits or alphanumeric): per-image random distortions."""

    per_class: int = Field(200, ge=1, description="Images of each class.")
    rotation_deg: tuple[float, float] = Field(
        (-5.0, 5.0), description="In-plane rotation drawn uniformly in [min, max] degrees (recorded as rlnAnglePsi)."
    )
    shear_deg: float = Field(0.0, ge=0, lt=90, description="Shear along x and along y, each uniform in ±this (degrees).")
    scale: tuple[float, float] = Field((1.0, 1.0), description="Isotropic scale drawn uniformly in [min, max].")
    translation: float = Field(
        0.0, ge=0, le=0.5, description="Shift per axis uniform in ±this fraction of the image edge (recorded as "
        "rlnOriginX/YAngst)."
    )
    noise_sd: float = Field(0.0, ge=0, description="Gaussian noise, standard deviation relative to each image's "
                            "signal standard deviation; 0: none.")
    labelled: bool = Field(True, description="false: every image is written as class unknown (the truth goes in "
                           "cryovaeTrueClassName), the unlabelled part of semi-supervised training.")

    @field_validator("rotation_deg")
    @classmethod
    def _rotation_order(cls, v):
        return _check_range(v)

    @field_validator("scale")
    @classmethod
    def _scale_order(cls, v):
        return _check_range(v, lower=0.0)


class ImageFileSplit(_Section):
    """One split read from the user's image stack (images.kind files)."""

    images: str = Field(..., description="Image stack: .mrc/.mrcs (2D: one image, 3D: a stack along z), multi-page "
                        ".tif/.tiff, .npy (n, H, W), or a folder of .png/.tif/.tiff (or of one subfolder per class).")
    labels: str | None = Field(
        None, description="One class name per image: a CSV with a column class (or rlnClassName), a text file of one "
        "name per line, or a folder of class subfolders; null: unlabelled (or the subfolders of images)."
    )
    labelled: bool = Field(True, description="false: the labels are kept only as cryovaeTrueClassName and every "
                           "image is written as class unknown.")


def _image_split_tag(value) -> str:
    """Which kind of split a mapping is: one naming ``images`` is read from files."""
    if isinstance(value, dict):
        return "files" if "images" in value else "generated"
    return "files" if isinstance(value, ImageFileSplit) else "generated"


ImageSplit = Annotated[
    Annotated[GeneratedImageSplit, Tag("generated")] | Annotated[ImageFileSplit, Tag("files")],
    Discriminator(_image_split_tag),
]


def _default_image_splits() -> dict[str, GeneratedImageSplit]:
    """The card-suit splits of the ss-rVAE example: few labelled images with weak rotational disorder
    (train, and val held out of them for training's validation and the unknown threshold), many
    unlabelled ones and the test set with a strong one."""
    weak = {"rotation_deg": (-5.0, 5.0), "shear_deg": 15.0, "scale": (1.0, 1.3)}
    strong = {"rotation_deg": (-60.0, 60.0), "shear_deg": 15.0, "scale": (1.0, 1.3), "translation": 0.1}
    return {
        "train": GeneratedImageSplit(per_class=200, **weak),
        "val": GeneratedImageSplit(per_class=50, **weak),
        "test": GeneratedImageSplit(per_class=1000, **strong),
        "unlabelled": GeneratedImageSplit(per_class=3000, labelled=False, **strong),
    }


class ImagesConfig(_Section):
    """2D image data: generated glyphs (card suits, alphanumerics) or stacks of the user's images."""

    kind: Literal["suits", "alphanumeric", "files"] = Field(
        "suits", description="suits (clubs, spades, hearts, diamonds) or alphanumeric (A-Z, 0-9): glyphs generated "
        "from DejaVu Sans; files: the user's image stacks."
    )
    classes: list[str] | None = Field(
        None, description="Classes in order (the order of rlnClassNumber and of the affinity matrix): which glyphs "
        "(null: all of the kind), or the class names of the files (null: the sorted names all splits' labels give)."
    )
    size: int = Field(48, ge=8, description="Edge of the generated images in pixels.")
    render_size: int = Field(64, ge=8, description="Glyphs are drawn at this edge, then centre-cropped to size.")
    pixel_size_angstrom: float = Field(1.0, gt=0, description="Pixel size written to the splits (Å).")
    normalise: bool = Field(False, description="Zero mean, unit variance per image (false: generated glyphs are "
                            "bright ink in [0, 1] on 0).")
    particles_per_shard: int = Field(4096, ge=1, description="Images per shard file.")
    affinity: str | None = Field(None, description="kind files: an affinity CSV between the classes (header of "
                                 "class names, then the matrix); null: the identity. Generated kinds compute "
                                 "the glyphs' rotation-invariant shape affinity.")
    splits: dict[str, ImageSplit] = Field(
        default_factory=_default_image_splits,
        description="Split name -> how its images are made (generated kinds) or read (files).",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.size > self.render_size:
            raise ValueError(f"size {self.size} is larger than render_size {self.render_size}")
        want = ImageFileSplit if self.kind == "files" else GeneratedImageSplit
        for name, split in self.splits.items():
            if not name.replace("-", "_").isidentifier():
                raise ValueError(f"split name {name!r}: expected letters, digits, '_' or '-'")
            if not isinstance(split, want):
                expected = "images, labels, labelled" if self.kind == "files" else \
                    "per_class, rotation_deg, shear_deg, scale, translation, noise_sd, labelled"
                raise ValueError(f"splits.{name}: kind {self.kind} expects the keys {expected}")
        if self.classes is not None:
            if len(set(self.classes)) != len(self.classes) or "unknown" in self.classes or not self.classes:
                raise ValueError(f"classes: expected distinct names other than 'unknown', got {self.classes}")
            if self.kind != "files":
                from cryovae.glyphs import KINDS

                stray = [c for c in self.classes if c not in KINDS[self.kind]]
                if stray:
                    raise ValueError(f"classes {stray} are not glyphs of kind {self.kind} "
                                     f"({', '.join(KINDS[self.kind])})")
        return self


class Config(_Section):
    """The whole workflow configuration."""

    output_dir: str = Field("results", description="Where every output lands.")
    seed: int = Field(0, ge=0, description="Seed of every stochastic step.")
    data: Literal["subtomograms", "images"] = Field(
        "subtomograms", description="subtomograms: structures -> simulated or extracted subtomograms (3D); images: "
        "2D images (the images section: generated glyphs or the user's stacks) through the same model, classes "
        "and evaluation.")
    structures: dict[str, str] = Field(
        default_factory=dict,  # at least 2 with data: subtomograms, checked below (a one-class stage slice has one)
        description="Class name -> local PDB/mmCIF file (.gz accepted), a 4-character PDB id, "
        "or demo:NAME for a generated synthetic structure (data: subtomograms).",
    )
    unseen: list[str] = Field(default_factory=list, description="Classes held out of training, seen only at test.")
    pixel_size_angstrom: float = Field(10.0, gt=0, description="Pixel size of maps and subtomograms in Å.")
    box_size: int = Field(32, ge=8, description="Edge of maps and subtomograms in pixels (even).")
    structure_options: StructureOptions = Field(default_factory=StructureOptions, description="Structure reading.")
    affinity: AffinityConfig = Field(default_factory=AffinityConfig, description="SOAP affinity.")
    maps: MapConfig = Field(default_factory=MapConfig, description="Reference maps.")
    simulation: SimulationConfig = Field(default_factory=SimulationConfig, description="Simulation.")
    extraction: ExtractionConfig = Field(default_factory=ExtractionConfig, description="Extraction.")
    tomogram_simulation: TomogramSimulationConfig = Field(
        default_factory=TomogramSimulationConfig, description="Simulated tomograms (tilt series, back-projection)."
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Training.")
    classification: ClassificationConfig = Field(default_factory=ClassificationConfig, description="Classes.")
    matching: MatchingConfig = Field(default_factory=MatchingConfig, description="Template matching.")
    pose_network: PoseNetworkConfig = Field(
        default_factory=PoseNetworkConfig, description="Pose proposals from a network (matching.starts: network).")
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig, description="Frame alignment.")
    priors: PriorsConfig = Field(default_factory=PriorsConfig, description="Pose priors.")
    interpretation: InterpretationConfig = Field(
        default_factory=InterpretationConfig, description="Interpretable models of the latent space."
    )
    images: ImagesConfig = Field(default_factory=ImagesConfig, description="2D image data (generated or read).")

    @field_validator("box_size")
    @classmethod
    def _even_box(cls, v):
        if v % 2:
            raise ValueError("expected an even box size")
        return v

    @model_validator(mode="after")
    def _classes_consistent(self, info: ValidationInfo):
        # A stage's config slice (see stage_config_json) holds only some sections; checks
        # across sections run only where every section they read is in the slice.
        context = info.context or {}
        sections = context.get(SECTIONS_KEY)
        present = set(type(self).model_fields) if sections is None else {*GLOBAL_KEYS, *sections}
        if self.data == "images":
            self._images_mode(present)
            return self
        for name in self.unseen:
            if name not in self.structures:
                raise ValueError(f"unseen class {name!r} is not a key of structures")
        if context.get(CLASS_KEY) is None:
            if len(self.structures) < 2:
                raise ValueError(f"structures: expected at least 2 classes, got {len(self.structures)}")
            if len(self.seen_classes) < 2:
                raise ValueError("at least two classes must be seen in training")
        if {"classification", "matching"} <= present:
            cc = self.classification
            needs_matching = sorted(set(cc.features + cc.unknown_features) - {"latent", "network"})
            if needs_matching and not self.matching.enabled:
                raise ValueError(f"classification.features lists {needs_matching} but matching.enabled is false")
            if cc.unknown_model == "fit_mixture" and not (self.matching.enabled and cc.adapt == "em"):
                raise ValueError("classification.unknown_model fit_mixture reads the template fit of each "
                                 "particle: it needs matching.enabled true and classification.adapt em")
            if not self.matching.global_search:
                self._without_global_search()
            if cc.nearest_class == "best_fit" and not self.matching.enabled:
                raise ValueError("classification.nearest_class best_fit names the class of best template fit: "
                                 "it needs matching.enabled true")
        if "tomogram_simulation" in present:
            self._tomogram_simulation_names()
        for section, names in (("alignment.symmetry", self.alignment.symmetry), ("maps.files", self.maps.files)):
            for name in names if section.split(".")[0] in present else ():
                if name not in self.structures:
                    raise ValueError(f"{section} names {name!r}, which is not a key of structures")
        if {"training", "simulation"} <= present:
            self._batch_fits_training_split()
        if {"training", "matching"} <= present and self.training.shape_frame == "matched" \
                and not self.matching.enabled:
            raise ValueError("training.shape_frame is matched (particles read in their template-matched pose) but "
                             "matching.enabled is false")
        if {"training", "classification"} <= present:
            cc = self.classification
            if "network" in cc.features + cc.unknown_features and not self.training.semi_supervised.classifier:
                raise ValueError("classification.features lists 'network' (the classifier head's probabilities) "
                                 "but training.semi_supervised.classifier is false")
        if {"training", "extraction", "tomogram_simulation"} <= present:
            splits = [*self.extraction.tomograms, *self.simulated_tomograms]
            for name in self.training.semi_supervised.unlabelled:
                if name not in splits:
                    raise ValueError(f"training.semi_supervised.unlabelled names {name!r}, which is not a "
                                     f"tomogram split (the splits are {splits}: extraction.tomograms and the "
                                     "simulated sim_00, sim_01, ...)")
        return self

    def _without_global_search(self) -> None:
        """matching.global_search false: network starts, and no classifier feature read from the global search."""
        if self.matching.starts != "network":
            raise ValueError("matching.global_search is false: the local searches need the pose network's "
                             "proposals (matching.starts: network)")
        cc = self.classification
        searched = sorted(set(cc.features + cc.unknown_features) - {"latent", "network", "fit"})
        if searched:
            raise ValueError(f"classification features {searched} read the global search or the class screen, "
                             "which matching.global_search false skips: use fit, latent (and network)")

    def _images_mode(self, present: set[str]) -> None:
        """data: images: classes from the images section, the splits it needs, nothing 3D-only."""
        names = self.class_names
        for name in self.unseen:
            if name not in names:
                raise ValueError(f"unseen class {name!r} is not one of the image classes {names}")
        if len(self.seen_classes) < 2:
            raise ValueError(f"at least two image classes must be seen in training, got {self.seen_classes}")
        missing = [s for s in IMAGE_SPLITS if s not in self.images.splits]
        if missing:
            raise ValueError(f"data: images needs the splits {list(IMAGE_SPLITS)} in images.splits; missing {missing}")
        if "matching" in present and self.matching.enabled:
            raise ValueError("data: images has no reference maps to match against: set matching.enabled: false")
        if "classification" in present:
            cc = self.classification
            other = sorted(set(cc.features + cc.unknown_features) - {"latent", "network"})
            if other:
                raise ValueError(f"data: images: classification features {other} need template matching; "
                                 "use latent (and network, with training.semi_supervised.classifier)")
            if "network" in cc.features + cc.unknown_features and "training" in present \
                    and not self.training.semi_supervised.classifier:
                raise ValueError("classification.features lists 'network' but training.semi_supervised.classifier "
                                 "is false")
        if "training" in present:
            for name in self.training.semi_supervised.unlabelled:
                if name not in self.images.splits or name in IMAGE_SPLITS:
                    raise ValueError(f"training.semi_supervised.unlabelled names {name!r}: with data: images it "
                                     f"takes splits of images.splits other than {list(IMAGE_SPLITS)}")
        if "tomogram_simulation" in present and self.tomogram_simulation.tomograms:
            raise ValueError("data: images makes no tomograms: set tomogram_simulation.tomograms: 0")
        if "extraction" in present and self.extraction.tomograms:
            raise ValueError("data: images extracts nothing: leave extraction.tomograms empty")

    def _tomogram_simulation_names(self) -> None:
        ts = self.tomogram_simulation
        for name in ts.maps:
            if name not in self.structures:
                raise ValueError(f"tomogram_simulation.maps names {name!r}, which is not a key of structures "
                                 "(a map of no class goes in tomogram_simulation.decoys)")
        for name in ts.decoys:
            if name in self.structures or name == "unknown":
                raise ValueError(f"tomogram_simulation.decoys names {name!r}, which is a class (or 'unknown')")

    def _batch_fits_training_split(self) -> None:
        from cryovae.splits import particles_per_class

        per_class = particles_per_class(self, "train")
        n_train = len(self.seen_classes) * per_class
        if self.training.batch_size > n_train:
            raise ValueError(
                f"training.batch_size {self.training.batch_size} is larger than the training split, "
                f"{n_train} particles ({len(self.seen_classes)} seen classes x {per_class} particles "
                f"per class): every epoch would be one optimiser step; set training.batch_size <= {n_train}"
            )

    @property
    def class_names(self) -> list[str]:
        """All classes, in config order (the order of the affinity matrix): the structures, or
        with data: images the image classes (:func:`cryovae.images2d.image_class_names`)."""
        if self.data == "images":
            from cryovae.images2d import image_class_names

            return image_class_names(self)
        return list(self.structures)

    @property
    def seen_classes(self) -> list[str]:
        return [c for c in self.class_names if c not in self.unseen]

    @property
    def simulated_tomograms(self) -> list[str]:
        """sim_00, sim_01, ... (``tomogram_simulation.tomograms`` of them)."""
        return [f"{SIMULATED_TOMOGRAM_PREFIX}{k:02d}" for k in range(self.tomogram_simulation.tomograms)]


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {key}: {e['msg']}" + (f" (got {e['input']!r})" if "input" in e and e["type"] != "missing" else ""))
    return "\n".join(lines)


def validate_config(data: dict[str, Any], source: str = "", sections: list[str] | None = None,
                    class_name: str | None = None) -> Config:
    """Validate a config mapping; raise :class:`InputError` naming every bad key.

    ``sections``: the sections of a stage's slice (the others are defaults, so checks
    that read them are skipped); None for a whole config.  ``class_name``: the one class
    of a per-class slice.
    """
    try:
        config = Config.model_validate(data, context={SECTIONS_KEY: sections, CLASS_KEY: class_name})
    except ValidationError as err:
        raise InputError(_format_error(err, source)) from None
    if sections is None:  # a stage's slice is cut from a whole config that was checked
        check_input_files(config, source)
    return config


def _local_inputs(config: Config) -> list[tuple[str, str]]:
    """(config key, path) of every input file the config names (not PDB ids, not demo:NAME)."""
    named = [(f"structures.{name}", spec) for name, spec in config.structures.items()
             if not spec.startswith("demo:") and not PDB_ID_PATTERN.fullmatch(spec)]
    named += [(f"maps.files.{name}", path) for name, path in config.maps.files.items()]
    for name, tomo in config.extraction.tomograms.items():
        named += [(f"extraction.tomograms.{name}.tomogram", tomo.tomogram),
                  (f"extraction.tomograms.{name}.coordinates", tomo.coordinates)]
        if tomo.acquisition is not None:
            named.append((f"extraction.tomograms.{name}.acquisition", tomo.acquisition))
        if tomo.truth is not None:
            named.append((f"extraction.tomograms.{name}.truth", tomo.truth))
    ts = config.tomogram_simulation
    if ts.tomograms > 0:
        named += [(f"tomogram_simulation.maps.{name}", path) for name, path in ts.maps.items()]
        named += [(f"tomogram_simulation.decoys.{name}", path) for name, path in ts.decoys.items()]
    return named


def _image_inputs(config: Config) -> list[tuple[str, str]]:
    """(config key, path) of the image stacks and labels of images.kind files (files or folders)."""
    if config.images.kind != "files":
        return []
    named = []
    for name, split in config.images.splits.items():
        named.append((f"images.splits.{name}.images", split.images))
        if split.labels is not None:
            named.append((f"images.splits.{name}.labels", split.labels))
    return named


def check_input_files(config: Config, source: str = "") -> None:
    """InputError listing every input file the config names that is not an existing file (or folder, for images)."""
    missing = [f"  {key}: {path}" for key, path in _local_inputs(config) if not Path(path).expanduser().is_file()]
    missing += [f"  {key}: {path}" for key, path in _image_inputs(config) if not Path(path).expanduser().exists()]
    if missing:
        raise InputError(
            f"invalid config {source}: no such file (relative paths are taken from {Path.cwd()}):\n"
            + "\n".join(missing)
            + "\n(a structure can also be a 4-character PDB id such as 1bxn, or demo:NAME)"
        )


class _Undeclared:
    """Stands in for a config section a workflow rule did not declare it depends on."""

    def __init__(self, section: str):
        self._section = section

    def __getattr__(self, name: str):
        raise RuntimeError(
            f"config section {self._section!r} (key {self._section}.{name}) is read by a stage whose "
            f"workflow rule does not declare it: add it to the rule's stage_config(...)"
        )


# Per-class entries of sections, cut down to the one class of a per-class slice.
_PER_CLASS = {"maps": "files", "alignment": "symmetry"}


def stage_config_json(config: Config, *sections: str, class_name: str | None = None) -> str:
    """The part of ``config`` a workflow stage depends on, as JSON for ``--config``.

    The rule passes it as a param, so changing any of it (and nothing else) reruns the
    rule; :func:`load_config` makes every other section raise when read, so a stage
    cannot silently depend on a section its rule does not declare.  With ``class_name``
    (a job of one class), ``structures`` and the per-class entries of ``maps.files`` and
    ``alignment.symmetry`` hold that class alone and ``unseen`` is empty, so changing
    another class does not rerun the job.
    """
    dump = config.model_dump(mode="json")
    part = {k: dump[k] for k in (*GLOBAL_KEYS, *sections)}
    if class_name is not None:
        part["structures"] = {class_name: config.structures[class_name]}
        part["unseen"] = []
        for section, key in _PER_CLASS.items():
            if section in sections:
                part[section][key] = {k: v for k, v in part[section][key].items() if k == class_name}
        part[CLASS_KEY] = class_name
    part[SECTIONS_KEY] = list(sections)
    return json.dumps(part)  # insertion order: the order of structures is the class order


def _from_stage_json(data: dict[str, Any]) -> Config:
    sections = data.pop(SECTIONS_KEY)
    config = validate_config(data, "(stage config)", sections, data.pop(CLASS_KEY, None))
    for name in Config.model_fields:
        if name not in GLOBAL_KEYS and name not in sections:
            object.__setattr__(config, name, _Undeclared(name))
    return config


def load_config(spec: str | Path) -> Config:
    """Load a config from a YAML/JSON file, or from a JSON string starting with ``{``."""
    text = str(spec)
    if text.lstrip().startswith("{"):
        data = json.loads(text)
        if SECTIONS_KEY in data:
            return _from_stage_json(data)
        return validate_config(data, "(inline JSON)")
    path = Path(text)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise InputError(f"config file {path}: expected a mapping at the top level")
    return validate_config(data, str(path))


def json_schema() -> dict[str, Any]:
    """The JSON schema of :class:`Config`, as the workflow validates against it."""
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "cryovae workflow configuration"
    return schema


def provenance(config: Config) -> dict[str, Any]:
    """What made an output: the package version and the whole validated config."""
    from cryovae import __version__

    return {"cryovae_version": __version__, "config": config.model_dump(mode="json")}


def write_provenance(config: Config, output: Path) -> None:
    """Write :func:`provenance` as JSON (sorted keys, so the same config gives the same bytes)."""
    from cryovae.atomic import write_text_atomic

    write_text_atomic(output, json.dumps(provenance(config), indent=2, sort_keys=True) + "\n")
