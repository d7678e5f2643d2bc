"""Per-particle poses by template matching against each seen class's reference map.

For a particle p (CTF-modulated, missing-wedge-filtered, noisy) and a reference T seen in
pose A, the matched filter is the correlation of p with CTF · W · (A T), W the wedge.
Its numerator is <A T, W · CTF · p>, so the particle is filtered once and compared with
rotated references.  Two stages:

1. a global search: every rotation of a super-Fibonacci grid (``matching.coarse_step_deg``),
   on Fourier-cropped volumes (``matching.coarse_binning``), the wedge applied to each
   rotated reference and each normalised.  The rotations of one reference span few
   dimensions, so each class's bank is kept in the basis of its ``matching.coarse_rank``
   leading principal directions: the particle is projected once per class and compared
   there, two small matrix products instead of one over every voxel.  The best score per
   class is a classification feature (``classify``), the best rotation a starting point;
2. for the ``matching.refine_top`` best classes of each particle, a translation from an FFT
   cross-correlation (sub-voxel by a parabola through the peak), then local rotation grids
   of shrinking steps (``matching.refine_steps_deg``) at full size: the particle is rotated
   back into the reference frame once per step and compared with a bank of slightly rotated
   references shared by all particles.  At the result the full-size matched-filter
   correlation (the CTF and wedge applied to the reference) is the class's ``fit``: how
   well the particle is explained by that class at its best pose, the sharpest evidence
   that a particle belongs to no known class.

Rotations are particle-from-reference (RELION's convention); origins are RELION's
``rlnOriginX/Y/ZAngst`` (the negative of the content's displacement), so the output is
relative to the map a user averages against, with no frame alignment needed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cryovae.atomic import atomic_path
from cryovae.config import Config
from cryovae.acquisition import read_split_acquisitions, split_tilt_range_deg
from cryovae.ctf import ParticleCtfs, ctf_3d, missing_wedge_mask
from cryovae.devices import choose_device
from cryovae.errors import InputError
from cryovae.rotations import local_deltas, refine_rotations, so3_grid
from cryovae.shards import SubtomogramSet
from cryovae.volumes import (
    correlation_peak, cross_correlation, fourier_crop, phase_shift, rfft_weights, rigid_transform, standardise_volumes,
)

log = logging.getLogger(__name__)
CHUNK = 256  # particles per block: bounds memory at (CHUNK, box^3) complex volumes


def split_wedge_and_ctf(config: Config, data: SubtomogramSet):
    """(tilt range or None, defocus in µm per particle or None, optics (kV, Cs mm, Q0)).

    Simulated particles have the simulation's wedge; extracted ones (they name their
    tomogram) the tilt range extraction wrote with them, else ``matching.tilt_range_deg``.
    Extracted splits with an ``acquisition.star`` have a per-tilt 3D CTF instead of the
    isotropic one (:func:`split_particle_ctfs`).
    """
    sim = config.simulation
    is_simulated = "rlnTomoName" not in data.particles.columns
    tilt = sim.tilt_range_deg if is_simulated else (split_tilt_range_deg(data.particles)
                                                    or config.matching.tilt_range_deg)
    table, optics = data.particles, data.optics
    if "rlnDefocusU" not in table.columns or (is_simulated and not sim.ctf):
        return tilt, None, None

    def optic(column: str, default: float) -> float:
        return float(optics[column].iloc[0]) if column in optics.columns else default

    kv = optic("rlnVoltage", sim.voltage_kv)
    cs = optic("rlnSphericalAberration", sim.spherical_aberration_mm)
    q0 = optic("rlnAmplitudeContrast", sim.amplitude_contrast)
    defocus_um = table["rlnDefocusU"].to_numpy(np.float64) / 1e4
    return tilt, defocus_um, (kv, cs, q0)


CENTRED_COLUMNS = ("rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst")


def split_particle_ctfs(data: SubtomogramSet) -> tuple[ParticleCtfs, np.ndarray, np.ndarray] | None:
    """Each extracted particle's own 3D CTF (:class:`cryovae.ctf.ParticleCtfs`) with the particles'
    tomogram names (n,) and centred coordinates (n, 3) Å; None for a split without an
    ``acquisition.star`` (simulated ones).  ``source(names[rows], coords[rows])`` gives a block's CTFs."""
    acquisitions = read_split_acquisitions(data.folder)
    table = data.particles
    if acquisitions is None or not set(CENTRED_COLUMNS) <= set(table.columns):
        return None
    names = table["rlnTomoName"].astype(str).to_numpy()
    missing = sorted(set(names) - set(acquisitions))
    if missing:
        raise InputError(f"{data.folder}/acquisition.star: no acquisition for tomogram(s) {missing[:5]} "
                         "named in particles.star")
    source = ParticleCtfs(acquisitions, int(data.optics["rlnImageSize"].iloc[0]), data.pixel_size_angstrom)
    return source, names, table[list(CENTRED_COLUMNS)].to_numpy(np.float64)


def contrast_warnings(scores: np.ndarray, scores_min: np.ndarray, tomograms: np.ndarray) -> list[str]:
    """Tomograms whose particles correlate negatively with the references: one warning each.

    ``scores``/``scores_min`` (n, C): the most positive / most negative global-search correlation
    per class (:meth:`Matcher.match`); ``tomograms`` (n,).  A particle's signed best score is its
    most negative one where that is larger in magnitude than its most positive; a tomogram whose
    median signed best score is below 0 (most of its particles match a reference better in
    negative) gets a warning (logged, and returned) saying to set invert_contrast.
    """
    best, worst = scores.max(1), scores_min.min(1)
    signed = np.where(np.abs(worst) > np.abs(best), worst, best)
    messages = []
    for name in pd.unique(np.asarray(tomograms).astype(str)):
        rows = np.asarray(tomograms).astype(str) == name
        median = float(np.median(signed[rows]))
        if median < 0:
            messages.append(
                f"tomogram {name!r}: its particles correlate negatively with the references (median signed best "
                f"score {median:.3f}; most positive {best[rows].max():.3f}, most negative {worst[rows].min():.3f}): "
                f"the protein is dark; set invert_contrast: true in extraction.tomograms.{name}"
            )
    for message in messages:
        log.warning(message)
    return messages


class Matcher:
    """Template matching of particle blocks against the reference maps of the seen classes.

    Every tensor lives on ``device`` (``matching.device``, default from the config); the
    global search's matrix products run in ``search_dtype`` (bfloat16 on CUDA, float32 on
    the CPU unless given), everything else in float32.
    """

    def __init__(self, config: Config, references: dict[str, np.ndarray], tilt_range_deg,
                 device: torch.device | None = None, search_dtype: torch.dtype | None = None):
        m = config.matching
        self.device = choose_device(m.device, "matching.device") if device is None else torch.device(device)
        self.search_dtype = search_dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.classes = list(references)
        self.box = config.box_size
        self.small = self.box // m.coarse_binning
        if self.small % 2:
            raise InputError(f"matching.coarse_binning {m.coarse_binning} leaves an odd box {self.small}")
        self.tilt = tilt_range_deg
        self.wedge = self._wedge(self.box)
        self.weights = rfft_weights(self.box).to(torch.float32).to(self.device)  # Parseval multiplicities
        self.refs = {c: self._tensor(np.ascontiguousarray(v)) for c, v in references.items()}
        self.grid = so3_grid(m.coarse_step_deg)
        self.banks = {c: self._low_rank(self._coarse_bank(ref), m.coarse_rank) for c, ref in self.refs.items()}
        self.deltas = local_deltas(list(m.refine_steps_deg), 2)
        self.fine = {
            c: [standardise_volumes(self._rotated(ref, delta)) for delta in self.deltas]
            for c, ref in self.refs.items()
        }
        self.refine_top = min(m.refine_top, len(self.classes))

    def _tensor(self, array) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.float32).to(self.device)

    def _wedge(self, box: int) -> torch.Tensor:
        if self.tilt is None:
            return torch.ones(box, box, box // 2 + 1, device=self.device)
        return missing_wedge_mask(box, tuple(self.tilt)).to(torch.float32).to(self.device)

    @staticmethod
    def _cropped(volume: torch.Tensor, size: int) -> torch.Tensor:
        """A (box^3) volume Fourier-cropped to size^3 (the frequencies both boxes hold)."""
        spectrum = fourier_crop(torch.fft.rfftn(volume, dim=(-3, -2, -1)), size, keep_nyquist=True)
        return torch.fft.irfftn(spectrum, s=(size,) * 3, dim=(-3, -2, -1))

    @staticmethod
    def _rotated(volume: torch.Tensor, rotations: np.ndarray) -> torch.Tensor:
        mats = torch.as_tensor(rotations, dtype=torch.float32).to(volume.device)
        return rigid_transform(volume.expand(len(mats), *volume.shape), mats)

    def _coarse_bank(self, ref: torch.Tensor) -> torch.Tensor:
        """Every grid rotation of the cropped reference, wedge-filtered and normalised: (G, small^3)."""
        small = self.small
        ref_small = self._cropped(ref, small)
        wedge = self._wedge(small)
        blocks = []
        for start in range(0, len(self.grid), 1024):
            rot = self._rotated(ref_small, self.grid[start : start + 1024])
            rot = torch.fft.irfftn(torch.fft.rfftn(rot, dim=(1, 2, 3)) * wedge, s=(small,) * 3, dim=(1, 2, 3))
            blocks.append(standardise_volumes(rot).to(self.search_dtype))
        return torch.cat(blocks)

    def _low_rank(self, bank: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A bank (G, D) as a basis (D, k) of the span of its rows and its rows in that basis (G, k).

        The basis is that of the ``rank`` leading principal directions of every
        ``G // (2 rank)``-th row (the rotations of one reference span few dimensions: its
        band-limited shells); a correlation <p, b> becomes <p V, b V>, the correlation with
        the row's projection.  ``rank`` 0, or one at least D: the identity (exact scores)."""
        size = bank.shape[1]
        if rank == 0 or rank >= size:
            return torch.eye(size, dtype=bank.dtype, device=bank.device), bank
        sample = bank[:: max(1, len(bank) // (2 * rank))].double()
        eigenvalues, eigenvectors = torch.linalg.eigh(sample @ sample.T)  # ascending
        keep = min(rank, len(sample))
        top, vectors = eigenvalues[-keep:].clamp(min=1e-12), eigenvectors[:, -keep:]
        basis = (sample.T @ vectors / top.sqrt()).float()  # right singular vectors of the sample
        return basis.to(bank.dtype), (bank.float() @ basis).to(bank.dtype)

    def coarse(self, filtered: torch.Tensor, with_min: bool = False) -> tuple[np.ndarray, ...]:
        """Best normalised correlation (n, C) and grid rotation (n, C, 3, 3) per class; with
        ``with_min`` also the most negative correlation (n, C) per class."""
        small = self.small
        cropped = fourier_crop(filtered, small, keep_nyquist=True)
        p = standardise_volumes(torch.fft.irfftn(cropped, s=(small,) * 3, dim=(1, 2, 3))).to(self.search_dtype)
        scores, rotations, lowest = [], [], []
        for c in self.classes:
            basis, rows = self.banks[c]
            correlation = (p @ basis) @ rows.T
            best, where = correlation.max(1)
            scores.append(best.float().cpu().numpy())
            lowest.append(correlation.min(1).values.float().cpu().numpy())
            rotations.append(self.grid[where.cpu().numpy()])
        if with_min:
            return np.stack(scores, 1), np.stack(rotations, 1), np.stack(lowest, 1)
        return np.stack(scores, 1), np.stack(rotations, 1)

    def _template(self, ref: torch.Tensor, rotations: np.ndarray) -> torch.Tensor:
        """Spectra of the reference rotated by ``rotations`` (n, 3, 3), wedge-filtered, without DC."""
        template = torch.fft.rfftn(self._rotated(ref, rotations), dim=(1, 2, 3)) * self.wedge
        template[:, 0, 0, 0] = 0.0
        return template

    def correlate(
        self, filtered: torch.Tensor, ref: torch.Tensor, rotations: np.ndarray, ctf: torch.Tensor | None,
        particle_norm: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Displacement (n, 3) voxels (x, y, z) of each particle's content from the rotated
        reference, and the normalised correlation there (n,): the full-size matched filter,
        corr(CTF · W · (A T), p), the CTF and wedge applied to the reference."""
        box = self.box
        template = self._template(ref, rotations)
        displacement, peak = correlation_peak(cross_correlation(filtered, template, (box,) * 3))
        modulated = template if ctf is None else template * ctf
        template_norm = ((self.weights * modulated.abs() ** 2).sum((1, 2, 3)) / box**3).sqrt()
        return displacement, peak / (template_norm * particle_norm + 1e-12)

    def refine(
        self, filtered: torch.Tensor, cls: str, rotations: np.ndarray, ctf: torch.Tensor | None,
        particle_norm: torch.Tensor,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local rotation refinement and translation for class ``cls``: rotations (n, 3, 3),
        displacement (n, 3) and the full-size normalised correlation (n,) at the result."""
        ref = self.refs[cls]
        d, _ = self.correlate(filtered, ref, rotations, ctf, particle_norm)
        centred = torch.fft.irfftn(phase_shift(filtered, -d), s=(self.box,) * 3, dim=(1, 2, 3))
        bank = self.fine[cls]

        def score(current: np.ndarray, level: int) -> np.ndarray:
            back = torch.as_tensor(np.ascontiguousarray(current.transpose(0, 2, 1)), dtype=torch.float32)
            scores = standardise_volumes(rigid_transform(centred, back.to(self.device))) @ bank[level].T
            return scores.cpu().numpy()

        rotations = refine_rotations(score, rotations, self.deltas)
        d, fit = self.correlate(filtered, ref, rotations, ctf, particle_norm)
        return rotations, d.cpu().numpy(), fit.cpu().numpy()

    def match(self, volumes: np.ndarray, ctf: torch.Tensor | None) -> dict[str, np.ndarray]:
        """One block: scores (n, C) of the global search and scores_min (n, C), its most negative
        correlations (the contrast check, :func:`contrast_warnings`), rotation (n, C, 3, 3),
        displacement_voxels (n, C, 3), refined (n, C) bool, and fit (n, C): the full-size
        normalised correlation at the refined pose (NaN for classes not refined)."""
        spectra = torch.fft.rfftn(self._tensor(volumes), dim=(1, 2, 3)) * self.wedge
        spectra[:, 0, 0, 0] = 0.0
        particle_norm = ((self.weights * spectra.abs() ** 2).sum((1, 2, 3)) / self.box**3).sqrt()
        ctf = None if ctf is None else ctf.to(self.device)
        filtered = spectra if ctf is None else spectra * ctf
        scores, rotations, scores_min = self.coarse(filtered, with_min=True)
        n, n_cls = scores.shape
        displacement = np.zeros((n, n_cls, 3))
        refined = np.zeros((n, n_cls), dtype=bool)
        fit = np.full((n, n_cls), np.nan)
        top = np.argsort(-scores, axis=1)[:, : self.refine_top]
        for k, cls in enumerate(self.classes):
            rows = np.nonzero((top == k).any(1))[0]
            if len(rows):
                index = torch.as_tensor(rows, device=self.device)
                block_ctf = None if ctf is None else ctf[index]
                rotations[rows, k], displacement[rows, k], fit[rows, k] = self.refine(
                    filtered[index], cls, rotations[rows, k], block_ctf, particle_norm[index]
                )
                refined[rows, k] = True
        return {"scores": scores, "scores_min": scores_min, "rotation": rotations, "displacement_voxels": displacement, "refined": refined,
                "fit": fit}


def read_references(config: Config, maps: list[Path]) -> dict[str, np.ndarray]:
    """Seen classes' reference maps, in config order, each the model's box."""
    by_name = {Path(p).stem: Path(p) for p in maps}
    missing = [c for c in config.seen_classes if c not in by_name]
    if missing:
        raise InputError(f"no reference map given for classes {missing}")
    refs = {}
    for c in config.seen_classes:
        volume = mrcfile.read(by_name[c]).astype(np.float32)
        if volume.shape != (config.box_size,) * 3:
            raise InputError(f"{by_name[c]}: map shape {volume.shape}, expected a {config.box_size}^3 box")
        refs[c] = volume
    return refs


def match_split(config: Config, split_dir: Path, maps: list[Path], output: Path) -> None:
    """Template-match every particle of a split against every seen class; write an npz."""
    torch.set_num_threads(config.matching.threads)
    data = SubtomogramSet.open(split_dir)
    tilt, defocus, optics = split_wedge_and_ctf(config, data)
    per_tilt = split_particle_ctfs(data)
    matcher = Matcher(config, read_references(config, maps), tilt)
    blocks = []
    for start in tqdm(range(0, len(data), CHUNK), desc=f"match {split_dir.name}", unit="block", mininterval=1.0):
        rows = np.arange(start, min(start + CHUNK, len(data)))
        ctf = None
        if per_tilt is not None:
            source, names, centred = per_tilt
            ctf = source(names[rows], centred[rows])
        elif defocus is not None:
            ctf = ctf_3d(torch.as_tensor(defocus[rows]), config.box_size, data.pixel_size_angstrom, *optics)
        blocks.append(matcher.match(data.volumes(rows), ctf))
    result = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    if "rlnTomoName" in data.particles.columns:
        contrast_warnings(result["scores"], result["scores_min"], data.particles["rlnTomoName"].astype(str).to_numpy())
    origin = -result.pop("displacement_voxels") * data.pixel_size_angstrom
    with atomic_path(output, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh, particle_id=data.particles["cryovaeParticleId"].astype(str).to_numpy().astype(str),
                classes=np.array(matcher.classes), origin_angstrom=origin, **result,
            )
    log.info(
        "match %s: %d particles, %d classes, wedge %s, CTF %s", split_dir.name, len(data), len(matcher.classes),
        tilt, "per tilt, per particle" if per_tilt is not None else ("per particle" if defocus is not None else "none"),
    )
