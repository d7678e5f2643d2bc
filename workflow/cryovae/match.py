"""Per-particle poses by template matching against each seen class's reference map.

For a particle p (CTF-modulated, missing-wedge-filtered, noisy) and a reference T seen in
pose A, the matched filter is the correlation of p with CTF · W · (A T), W the wedge.
Its numerator is <A T, W · CTF · p>, so the particle is filtered once and compared with
rotated references.  With ``matching.centre_search_px`` > 0 the global search also compares
each particle centred, per class, on the peak of its correlation with the class's rotational
average (the same for every orientation, so one FFT per class finds where a mis-centred pick
put the particle), and keeps the better of the two places (:meth:`Matcher.coarse_scores`).
Three stages:

1. a global search: every rotation of a super-Fibonacci grid (``matching.coarse_step_deg``),
   on Fourier-cropped volumes (``matching.coarse_binning``), the wedge applied to each
   rotated reference and each normalised.  The rotations of one reference span few
   dimensions, so each class's bank is kept in the basis of its ``matching.coarse_rank``
   leading principal directions: the particle is projected once per class and compared
   there, two small matrix products instead of one over every voxel.  The best score per
   class is a classification feature (``classify``), the best rotation a starting point;
2. a class screen (``matching.refine_by: screen``): each class's reference at its best global
   rotation, compared with the particle at the coarse box by a cross-correlation at every
   full-size voxel within a few of the centre, so at its best translation too; the
   matched-filter correlation there is the class's ``screen`` score.  The global search
   compares at one place, and a pick a few pixels off its particle
   ranks the right class first for 0.74-0.78 of seen particles on project-made tomograms
   (picks ±3 px), the screen for 0.91-0.92 (benchmarks/RESULTS.md, "Which classes to refine");
3. for the ``matching.refine_top`` best classes of each particle (by the screen, or by the
   global score with ``refine_by: global``), a translation from an FFT
   cross-correlation (sub-voxel by a parabola through the peak; at the best grid rotation the
   screen's, unless it lies on the edge of the screen's window), then local rotation grids
   of shrinking steps (``matching.refine_steps_deg``) at full size: the particle is rotated
   back into the reference frame once per step and compared with a bank of slightly rotated
   references shared by all particles, both only where the reference holds density (its
   support within the ball of radius box/2, :meth:`Matcher._local_bank`), the reference's
   norm under the particle's filter over one of each pair of frequencies ±k.  At the result the full-size matched-filter
   correlation (the CTF and wedge applied to the reference) is the class's ``fit``: how
   well the particle is explained by that class at its best pose, the sharpest evidence
   that a particle belongs to no known class.

   Each refined class starts from its ``matching.coarse_keep`` best grid rotations at least
   ``matching.pose_far_deg`` apart (modulo its point group, ``alignment.symmetry`` with the
   axes located in the map by :func:`cryovae.align.orient_symmetry`): at low SNR the true pose
   is often not the best grid point.  The particle is centred by the translation at the best
   peak, every peak climbs the coarsest local grid, and from the peak that scores best there
   the particle is centred again and the search climbs every local grid, coarsest first: a
   centre found at a start 10-15° off is off too, and on SHREC particles at SNR 0.1 the second
   centring takes the median error from 2.9° to 2.3° (benchmarks/RESULTS.md).  With
   ``matching.starts: network`` the starts are instead the best-ranked rotations of the pose
   network (:mod:`cryovae.model.posenet`), at least ``pose_far_deg`` apart, for the same
   class, the best of them replaced by the network's
   probability-weighted mean of the grid rotations around it (:func:`soft_argmax`), and every
   point-group mate of that mean starts too (the network is trained modulo the group, the map
   is seldom exactly symmetric under it).  With ``matching.global_search: false`` as well, the
   global search and the screen do not run: the network's class probabilities choose the
   classes refined.  The local score is the matched-filter correlation itself: the numerator compares the rotated-back
   particle with the bank, and the reference's norm under the particle's wedge and CTF comes
   from the filter W·CTF² rotated back into the reference frame, dotted with the bank's power
   spectra (without it the local search climbs towards rotations whose power the wedge keeps,
   not towards the best fit).

Pose confidence (per particle and refined class), from the global-search scores s(R) of
every grid rotation: ``pose_margin`` = (best s within ``pose_far_deg`` of the pose - best s
beyond it) / σ, σ = 1/sqrt(N_eff) the noise standard deviation of a normalised correlation
with N_eff = (Σ F²)² / Σ F⁴ the effective number of independent Fourier samples of the
particle's filter F = W·|CTF| in the cropped box; ``pose_determined`` = margin >=
``matching.pose_margin_min``; ``pose_spread_deg`` the RMS angle from the pose of the grid
rotations scoring within 2σ of the best; ``pose_sigma_deg`` the spread, at least the finest
refinement step (a RELION ``--sigma_ang``).  ``class_self_margin`` (C,): the noise-free
margin of each map against itself (1 - its best correlation with itself rotated beyond
``pose_far_deg``): near 0, the map does not fix an orientation at this pixel size.  Without
the global search the confidence comes from the pose network's distribution p(R) over its
grid instead (:meth:`Matcher.network_confidence`): ``pose_margin`` the log-odds of p within
``pose_far_deg`` of the pose, ``pose_spread_deg`` the p-weighted RMS angle there, and
``class_self_margin`` is NaN.

Rotations are particle-from-reference (RELION's convention); origins are RELION's
``rlnOriginX/Y/ZAngst`` (the negative of the content's displacement), so the output is
relative to the map a user averages against, with no frame alignment needed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import mrcfile
import numpy as np
import torch
from tqdm import tqdm

from cryovae.align import point_group_in_map
from cryovae.classify import read_match_file
from cryovae.config import Config
from cryovae.acquisition import read_split_acquisitions, split_tilt_range_deg
from cryovae.ctf import ParticleCtfs, ctf_3d, missing_wedge_mask
from cryovae.devices import choose_device
from cryovae.errors import InputError
from cryovae.match_parts import check_contrast, write_match_file
from cryovae.model.posenet import PoseNetwork, grid_neighbourhoods, load_pose_network, soft_argmax
from cryovae.rotations import (
    local_deltas, matrix_to_quaternion, refine_rotations, so3_grid,
)
from cryovae.shards import SubtomogramSet
from cryovae.splits import part_rows
from cryovae.volumes import (
    ball_points, correlation_peak, cross_correlation, energy_support, fourier_crop, friedel_half,
    nearby_cross_correlation, phase_shift, rfft_frequencies, rfft_weights, rigid_transform, rigid_transform_within,
    rotational_average, sample_rigid, standardise_volumes, support_radius, window_peak, windowed_correlation_peak,
)

log = logging.getLogger(__name__)
CHUNK = 256  # particles per block: bounds memory at (CHUNK, box^3) complex volumes
CENSUS_STRIDE = 4  # the local search's starts compete on the ball's norm from the support and every 4th other voxel
SCREEN_REACH_PX = 4  # the class screen's translations: within this many voxels per axis of the place compared
SUPPORT_TOLERANCE = 1e-6  # energy of a reference left outside the voxels where its rotations are evaluated
SPECTRUM_TOLERANCE = 1e-3  # power of the local banks left outside the frequencies their norm is taken over


class LocalBank(NamedTuple):
    """One class's local-search bank (:meth:`Matcher._local_bank`): the voxels compared (m, 3) and
    per local grid the standardised references there (deltas, m); the frequencies (f, 3) of the
    fftshifted grid its norm sums over and per local grid the power spectra there (deltas, f)."""

    real_xyz: torch.Tensor
    real: torch.Tensor  # their indices into the ball's voxels
    rows: list[torch.Tensor]
    spectral_xyz: torch.Tensor
    power: list[torch.Tensor]
    census_xyz: torch.Tensor  # real_xyz, then every CENSUS_STRIDE-th other voxel of the ball
    census_weight: torch.Tensor  # how many of the ball's voxels each stands for: 1 for real_xyz


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


class Matcher:
    """Template matching of particle blocks against the reference maps of the seen classes.

    Every tensor lives on ``device`` (``matching.device``, default from the config); the
    global search's matrix products run in ``search_dtype`` (bfloat16 on CUDA, float32 on
    the CPU unless given), everything else in float32.
    """

    def __init__(self, config: Config, references: dict[str, np.ndarray], tilt_range_deg,
                 device: torch.device | None = None, search_dtype: torch.dtype | None = None,
                 proposer: PoseNetwork | None = None):
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
        self.global_search = m.global_search  # false: the pose network proposes (:meth:`_match_from_network`)
        searched = self.refs if self.global_search else {}
        self.screen_refs = {c: self._cropped(ref, self.small) for c, ref in searched.items()}
        self.screen_support = {c: self._support(ref) for c, ref in self.screen_refs.items()}
        self.banks = {c: self._low_rank(self._coarse_bank(c), m.coarse_rank) for c in searched}
        self.deltas = local_deltas(list(m.refine_steps_deg), 2)
        self.ball_xyz, self.ball = (t.to(self.device) for t in ball_points(self.box))
        self.spectral_half = friedel_half(self.ball_xyz, self.box)  # the filter and the power are even: one of each ±k
        self.support = {c: self._support(ref) for c, ref in self.refs.items()}
        self.local = {c: self._local_bank(c) for c in self.refs}
        self.refine_top = min(m.refine_top, len(self.classes))
        self.refine_by = m.refine_by
        self.screen_wedge = self._wedge(self.small)
        self.screen_weights = rfft_weights(self.small).to(torch.float32).to(self.device)
        self.keep, self.far_deg, self.margin_min = m.coarse_keep, m.pose_far_deg, m.pose_margin_min
        self.centre_radius = m.centre_search_px
        self.averages = {c: torch.fft.rfftn(self._tensor(rotational_average(v))) for c, v in references.items()} \
            if self.centre_radius > 0 else {}
        self.finest_deg = min(m.refine_steps_deg) if m.refine_steps_deg else m.coarse_step_deg
        self.symmetry = {c: point_group_in_map(config, c, v) for c, v in references.items()}
        self.grid_quats = self._turned_quats(self.grid)
        self.self_margin = np.array([self._self_margin(c) if self.global_search else np.nan for c in self.classes])
        self.proposer = self._proposer(proposer) if m.starts == "network" else None

    def _proposer(self, net: PoseNetwork | None) -> PoseNetwork:
        """The pose network of ``matching.starts: network``, on this device, with the rotations it
        ranks turned by each class's point group (for :meth:`peaks`)."""
        if net is None:
            raise InputError("matching.starts is 'network': give the pose network (--pose-network, the "
                             "pose_network rule's output)")
        if net.classes != self.classes:
            raise InputError(f"the pose network was trained on classes {net.classes}, the references are "
                             f"{self.classes}: retrain it (delete pose_network.pt)")
        if net.config["box_size"] != self.box:
            raise InputError(f"the pose network reads a {net.config['box_size']}³ box, the particles are {self.box}³")
        self.proposal_grid = net.grid.cpu().double().numpy()
        self.proposal_quats = self._turned_quats(self.proposal_grid)
        self.proposal_radius = 2.0 * net.config["step_deg"]  # soft_argmax over the best bin's neighbours
        self.proposal_neighbourhoods = {c: grid_neighbourhoods(q, self.proposal_radius)
                                        for c, q in self.proposal_quats.items()}
        return net.to(self.device).eval()

    def _proposals(self, logits: np.ndarray) -> np.ndarray:
        """The pose network's own pose (n, C, 3, 3) of every class (:func:`soft_argmax`) from its logits (n, C, G)."""
        return np.stack([soft_argmax(logits[:, k], self.proposal_quats[c], self.proposal_radius,
                                     self.proposal_neighbourhoods[c]) for k, c in enumerate(self.classes)], 1)

    def _turned_quats(self, grid: np.ndarray) -> dict[str, np.ndarray]:
        """Per class, the quaternions (S, G, 4) of ``grid`` (G, 3, 3) turned by each element of its point group."""
        return {c: matrix_to_quaternion(grid[None] @ g[:, None]) for c, g in self.symmetry.items()}

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
    def _rotated(volume: torch.Tensor, rotations: np.ndarray, support=None) -> torch.Tensor:
        """``volume`` turned by each of ``rotations`` (n, 3, 3); with ``support`` (:meth:`_support`)
        evaluated only there, zeros elsewhere."""
        mats = torch.as_tensor(rotations, dtype=torch.float32).to(volume.device)
        stack = volume.expand(len(mats), *volume.shape)
        return rigid_transform(stack, mats) if support is None else rigid_transform_within(stack, mats, support)

    def _support(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The voxels (x, y, z indices and flat offsets) within which any rotation of a reference
        ``volume`` lies, to :data:`SUPPORT_TOLERANCE` of its energy (:func:`support_radius`); None
        where they are more than half the box (evaluating every voxel is then the cheaper)."""
        xyz, offsets = ball_points(volume.shape[-1], support_radius(volume, SUPPORT_TOLERANCE))
        return None if 2 * len(offsets) > volume.numel() else (xyz.to(self.device), offsets.to(self.device))

    def _local_bank(self, cls: str) -> LocalBank:
        """The local search's bank of class ``cls``: its reference turned by each local grid's
        deltas, compared only where any of them holds density and normed only over the
        frequencies that hold their power (each to its tolerance), one of each pair ±k (the
        filter and the power spectra are even).

        The local score's numerator is the particle standardised over the ball (radius box/2)
        dotted with each delta's reference standardised there.  Outside the reference's support
        that reference is one constant c per delta and the standardised particle sums to zero
        over the ball, so the sum is the one over the support with c subtracted: exact for a
        reference that is constant outside its support (to :data:`SUPPORT_TOLERANCE` of its
        energy), for 2-17 % of the ball's voxels on SHREC's maps at 32³ (benchmarks/RESULTS.md)."""
        turned = [self._rotated(self.refs[cls], delta, self.support[cls]).reshape(len(delta), -1) for delta in self.deltas]
        inside = [bank[:, self.ball] for bank in turned]
        real = energy_support(torch.cat(inside), SUPPORT_TOLERANCE)
        outside = torch.ones(len(self.ball), dtype=torch.bool, device=self.device)
        outside[real] = False
        rows = []
        for bank in inside:
            standard = standardise_volumes(bank)
            level = standard[:, outside].mean(1, keepdim=True) if outside.any() else 0.0
            rows.append(standard[:, real] - level)
        half, weight = self.spectral_half
        power = [_power_spectra(standardise_volumes(bank), self.box)[:, self.ball[half]] * weight for bank in turned]
        spectral = energy_support(torch.cat(power).sqrt(), SPECTRUM_TOLERANCE)
        others = torch.nonzero(outside).squeeze(1)
        census = others[CENSUS_STRIDE // 2 :: CENSUS_STRIDE]
        weight = torch.cat([torch.ones(len(real)), torch.full((len(census),), len(others) / max(len(census), 1))])
        return LocalBank(self.ball_xyz[real], real, rows, self.ball_xyz[half[spectral]], [p[:, spectral] for p in power],
                         self.ball_xyz[torch.cat([real, census])], weight.to(self.device))

    def _coarse_bank(self, cls: str) -> torch.Tensor:
        """Every grid rotation of the class's cropped reference, wedge-filtered and normalised: (G, small^3)."""
        small = self.small
        wedge = self._wedge(small)
        blocks = []
        for start in range(0, len(self.grid), 1024):
            rot = self._rotated(self.screen_refs[cls], self.grid[start : start + 1024], self.screen_support[cls])
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

    def _self_margin(self, cls: str) -> float:
        """1 - the best noise-free correlation of the class's cropped, wedge-filtered map with its
        grid rotations beyond ``pose_far_deg`` of the identity (modulo the point group)."""
        small = self.small
        spectrum = fourier_crop(torch.fft.rfftn(self.refs[cls], dim=(0, 1, 2)), small, keep_nyquist=True)
        spectrum = spectrum * self._wedge(small)
        p = standardise_volumes(torch.fft.irfftn(spectrum, s=(small,) * 3)[None]).to(self.search_dtype)
        basis, rows = self.banks[cls]
        scores = ((p @ basis) @ rows.T).float().cpu().numpy()[0]
        far = self.grid_distance_deg(cls, np.eye(3)[None])[0] > self.far_deg
        return float(1.0 - scores[far].max()) if far.any() else float("nan")

    def _grid_dots(self, cls: str, rotations: np.ndarray, quats: np.ndarray | None = None) -> np.ndarray:
        """|cos(θ/2)| (n, G) of the angle θ from each rotation (n, 3, 3) to every grid rotation, modulo
        the point group; ``quats`` (S, G, 4): a grid turned by each element of the group (default the
        global search's)."""
        grid = self.grid_quats[cls] if quats is None else quats
        dots = np.abs(matrix_to_quaternion(rotations) @ grid.reshape(-1, 4).T)
        return dots.reshape(len(rotations), *grid.shape[:2]).max(1)

    def grid_distance_deg(self, cls: str, rotations: np.ndarray, quats: np.ndarray | None = None) -> np.ndarray:
        """Angle (n, G) from each rotation (n, 3, 3) to every grid rotation, modulo the class's point group
        (``quats``: as in :meth:`_grid_dots`)."""
        return np.degrees(2 * np.arccos(np.clip(self._grid_dots(cls, rotations, quats), 0.0, 1.0)))

    def centring(self, filtered: torch.Tensor, cls: str) -> torch.Tensor:
        """Displacement (n, 3) voxels (x, y, z) of each particle's content from the box centre,
        within ``matching.centre_search_px``: the peak of its correlation with the class's
        rotational average, the same for every orientation of the particle."""
        cc = cross_correlation(filtered, self.averages[cls], (self.box,) * 3)
        return windowed_correlation_peak(cc, self.centre_radius)[0]

    def _projected(self, spectra: torch.Tensor) -> torch.Tensor:
        """Particle spectra cropped to the global search's box, standardised: (n, small³)."""
        small = self.small
        cropped = fourier_crop(spectra, small, keep_nyquist=True)
        return standardise_volumes(torch.fft.irfftn(cropped, s=(small,) * 3, dim=(1, 2, 3))).to(self.search_dtype)

    def coarse_scores(self, filtered: torch.Tensor) -> tuple[list[np.ndarray], list[torch.Tensor] | None]:
        """Normalised correlation (n, G) of each particle with every grid rotation, per class,
        and where the particle was compared (per class, (n, 3) voxels; None without a centre
        search).  With ``matching.centre_search_px`` each class compares the particle both at
        the box centre and centred by :meth:`centring`, and keeps, per particle, the place
        whose best rotation scores higher (centring alone moves well-centred particles by the
        rotational average's own offset, and lets a wrong class move a particle to where it
        fits best)."""
        p = self._projected(filtered)
        out, places = [], [] if self.centre_radius > 0 else None
        for c in self.classes:
            basis, rows = self.banks[c]
            scores = ((p @ basis) @ rows.T).float().cpu().numpy()
            if places is not None:
                shift = self.centring(filtered, c)
                moved = ((self._projected(phase_shift(filtered, -shift)) @ basis) @ rows.T).float().cpu().numpy()
                better = moved.max(1) > scores.max(1)
                scores[better] = moved[better]
                shift[torch.as_tensor(~better, device=shift.device)] = 0.0
                places.append(shift)
            out.append(scores)
        return out, places

    def coarse(self, filtered: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Best normalised correlation (n, C) and grid rotation (n, C, 3, 3) per class."""
        scores, _ = self.coarse_scores(filtered)
        return np.stack([s.max(1) for s in scores], 1), np.stack([self.grid[s.argmax(1)] for s in scores], 1)

    def peaks(self, cls: str, scores: np.ndarray, network: bool = False) -> np.ndarray:
        """Grid indices (n, K) of the ``coarse_keep`` best rotations at least ``pose_far_deg``
        apart (modulo the point group), best first; scores (n, G) over the global search's grid,
        or with ``network`` the pose network's logits over its grid."""
        grid, quats = (self.proposal_grid, self.proposal_quats[cls]) if network else (self.grid, None)
        left = scores.astype(np.float64, copy=True)
        picks = []
        for _ in range(self.keep):
            best = left.argmax(1)
            picks.append(best)
            left[self._grid_dots(cls, grid[best], quats) > np.cos(np.radians(self.far_deg) / 2)] = -np.inf
        return np.stack(picks, 1)

    def screen(self, spectra: torch.Tensor, ctf: torch.Tensor | None, rotations: np.ndarray,
               places: list[torch.Tensor] | None) -> tuple[np.ndarray, torch.Tensor]:
        """Matched-filter correlation (n, C) of each class at its best global rotation (``rotations``,
        (n, C, 3, 3)) and best translation, at the coarse box: corr(CTF · W · (A T), p) as in
        :meth:`correlate`, the particle spectra ``spectra`` (wedge applied, no CTF) cropped, at
        each class's global-search place (``places``); and that translation (n, C, 3) voxels
        (x, y, z) from the place, NaN where it lies on the edge of the window searched.

        The translation is searched on the full box's voxels within :data:`SCREEN_REACH_PX` (plus
        ``matching.centre_search_px``) of the place: on the coarse box's voxels a particle an odd
        number of voxels off loses a third of its correlation.  Only those displacements are
        evaluated (:func:`cryovae.volumes.nearby_cross_correlation`), not the whole padded box."""
        small = self.small
        crop = (self.box / small) ** 3  # fourier_crop scales values by (small / box)^3: undone for the CTF
        ctf_small = None if ctf is None else fourier_crop(ctf.to(torch.complex64), small).real * crop
        reach = SCREEN_REACH_PX + int(np.ceil(self.centre_radius))
        out = np.zeros((len(spectra), len(self.classes)))
        shifts = torch.full((len(spectra), len(self.classes), 3), torch.nan, device=self.device)
        particle = None if places is not None else fourier_crop(spectra, small)
        for k, cls in enumerate(self.classes):
            if places is not None:
                particle = fourier_crop(phase_shift(spectra, -places[k]), small)
            particle_norm = (self.screen_weights * particle.abs() ** 2).sum((1, 2, 3)).sqrt()
            rotated = self._rotated(self.screen_refs[cls], rotations[:, k], self.screen_support[cls])
            template = torch.fft.rfftn(rotated, dim=(1, 2, 3)) * self.screen_wedge
            template[:, 0, 0, 0] = 0.0
            filtered = particle if ctf_small is None else particle * ctf_small
            shift, peak = window_peak(nearby_cross_correlation(filtered * template.conj(), self.box, reach))
            inside = shift.abs().amax(1) < reach - 0.25  # the window's edge voxel has no sub-voxel offset: exactly reach
            shifts[inside, k] = shift[inside]
            modulated = template if ctf_small is None else template * ctf_small
            template_norm = (self.screen_weights * modulated.abs() ** 2).sum((1, 2, 3)).sqrt()
            out[:, k] = (peak * small**3 / (template_norm * particle_norm + 1e-12)).cpu().numpy()
        return out, shifts

    def noise_sd(self, ctf: torch.Tensor | None, n: int) -> np.ndarray:
        """Noise standard deviation (n,) of a global-search correlation: 1/sqrt(N_eff), N_eff the
        participation ratio (Σ w F²)² / Σ w F⁴ of the filter F = W·|CTF| over the cropped box."""
        limit = self.small / (2.0 * self.box)
        fz, fy, fx = rfft_frequencies(self.box)
        inside = ((fz.abs() <= limit) & (fy.abs() <= limit) & (fx.abs() <= limit)).to(self.device)
        weights = (self.weights * inside).clone()
        weights[0, 0, 0] = 0.0
        filt = self.wedge.expand(n, *self.wedge.shape) if ctf is None else self.wedge * ctf.abs()
        power = filt.double() ** 2
        n_eff = (weights * power).sum((1, 2, 3)) ** 2 / (weights * power**2).sum((1, 2, 3)).clamp(min=1e-30)
        return (1.0 / n_eff.sqrt()).cpu().numpy()

    def confidence(self, cls: str, scores: np.ndarray, rotations: np.ndarray, sd: np.ndarray) -> dict[str, np.ndarray]:
        """pose_margin, pose_spread_deg, pose_sigma_deg (n,) and pose_determined (n,) bool of the
        poses ``rotations`` (n, 3, 3) from the class's global-search scores (n, G)."""
        distance = self.grid_distance_deg(cls, rotations)
        near = distance <= self.far_deg
        best_near = np.where(near, scores, -np.inf).max(1)
        best_far = np.where(near, -np.inf, scores).max(1)
        margin = (best_near - best_far) / sd
        within = scores >= (best_near - 2 * sd)[:, None]
        spread = np.sqrt((np.where(within, distance, 0.0) ** 2).sum(1) / within.sum(1).clip(min=1))
        return {"pose_margin": margin, "pose_spread_deg": spread, "pose_sigma_deg": np.maximum(spread, self.finest_deg),
                "pose_determined": margin >= self.margin_min}

    def _template(self, cls: str, rotations: np.ndarray) -> torch.Tensor:
        """Spectra of the class's reference rotated by ``rotations`` (n, 3, 3), wedge-filtered, without DC."""
        turned = self._rotated(self.refs[cls], rotations, self.support[cls])
        template = torch.fft.rfftn(turned, dim=(1, 2, 3)) * self.wedge
        template[:, 0, 0, 0] = 0.0
        return template

    def correlate(
        self, filtered: torch.Tensor, cls: str, rotations: np.ndarray, ctf: torch.Tensor | None,
        particle_norm: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Displacement (n, 3) voxels (x, y, z) of each particle's content from the rotated
        reference, and the normalised correlation there (n,): the full-size matched filter,
        corr(CTF · W · (A T), p), the CTF and wedge applied to the reference of class ``cls``."""
        box = self.box
        template = self._template(cls, rotations)
        displacement, peak = correlation_peak(cross_correlation(filtered, template, (box,) * 3))
        modulated = template if ctf is None else template * ctf
        template_norm = ((self.weights * modulated.abs() ** 2).sum((1, 2, 3)) / box**3).sqrt()
        return displacement, peak / (template_norm * particle_norm + 1e-12)

    def local_filter(self, ctf: torch.Tensor | None, n: int) -> torch.Tensor:
        """W·CTF² of n particles on the fftshifted full grid (n, B, B, B): what :meth:`local_score`
        rotates back for the reference's norm; it does not depend on where the particle is centred."""
        half = self.wedge.expand(n, *self.wedge.shape) if ctf is None else self.wedge * ctf**2
        return _full_spectrum(half, self.box)

    def local_score(self, filtered: torch.Tensor, cls: str, filter_full: torch.Tensor, displacement: torch.Tensor):
        """The local-search score of class ``cls`` for particles centred by ``displacement`` (n, 3)
        voxels, ``filter_full`` their :meth:`local_filter`: ``score(rotations (n, 3, 3), level,
        across=False)`` -> (n, m), the matched-filter correlation of each particle with the
        reference in every pose ``rotations @ deltas[level][j]``.

        The particle is standardised over the ball.  Within one call that is one constant per
        particle, which no argmax sees, so by default the mean and norm are those of its own voxels
        and only the reference's support is sampled.  Scores compared ``across`` calls (the starts'
        competition) take the norm from the rotated, interpolated particle over the ball, as a
        correlation must: interpolation smooths the noise by an amount that depends on the rotation
        (with the voxels' own norm instead, 14 more of 4,500 particles of the embedded default's test
        split ended beyond 15°).  That norm is estimated from the support and every
        :data:`CENSUS_STRIDE`-th other voxel of the ball (each standing for the ones it skips),
        about the voxels' own mean, which interpolation keeps: to under 1 % of the best score on
        SHREC particles from under half the voxels, with the same SHREC poses (benchmarks/RESULTS.md)."""
        centred = torch.fft.irfftn(phase_shift(filtered, -displacement), s=(self.box,) * 3, dim=(1, 2, 3))
        own = centred.reshape(len(centred), -1)[:, self.ball]
        own_mean = own.mean(1, keepdim=True)
        own_norm = (own - own_mean).norm(dim=1, keepdim=True) + 1e-12
        bank = self.local[cls]

        def score(current: np.ndarray, level: int, across: bool = False) -> np.ndarray:
            back = torch.as_tensor(np.ascontiguousarray(current.transpose(0, 2, 1)), dtype=torch.float32)
            back = back.to(self.device)
            if across:
                sampled, weight = sample_rigid(centred, back, bank.census_xyz) - own_mean, bank.census_weight
                norm = (sampled**2 @ weight).sqrt()[:, None] + 1e-12
                particle = sampled[:, : len(bank.real)] / norm
            else:
                particle = (sample_rigid(centred, back, bank.real_xyz) - own_mean) / own_norm
            template_power = sample_rigid(filter_full, back, bank.spectral_xyz) @ bank.power[level].T
            return (particle @ bank.rows[level].T / template_power.clamp(min=1e-12).sqrt()).cpu().numpy()

        return score

    def refine_peaks(
        self, filtered: torch.Tensor, cls: str, scores: np.ndarray, ctf: torch.Tensor | None, particle_norm: torch.Tensor,
        logits: np.ndarray | None = None, proposal: np.ndarray | None = None, shift: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local rotation refinement and translation of class ``cls`` from the :meth:`peaks` of
        its global scores (n, G), or of the pose network's ``logits`` (n, G') for the class, its
        best peak replaced by the network's sub-grid ``proposal`` (n, 3, 3) (:func:`soft_argmax`):
        rotations (n, 3, 3), displacement (n, 3) and the full-size normalised correlation (n,) at the result.

        The particle is centred by the translation at the best peak (``shift`` (n, 3), the
        :meth:`screen`'s at the best grid rotation, where not NaN; else found here); every peak climbs the
        first (coarsest) local grid, and only the peak that scores best there goes on: the first
        step already says which hypothesis fits, and the finer ones cost as much again per
        peak.  There the particle is centred again, at the better pose, and the search climbs
        all the local grids from it.  With the network's ``logits``, every point-group mate of its
        ``proposal`` starts as well, each centred by its own correlation: the network cannot tell
        mates apart, and a map is seldom exactly symmetric under the group found in it."""
        if logits is None:
            starts = self.grid[self.peaks(cls, scores)]  # (n, K, 3, 3)
        else:
            starts = self.proposal_grid[self.peaks(cls, logits, network=True)]
            starts[:, 0] = proposal
        peaks = starts.shape[1]
        if logits is not None:  # then the proposal's mates, each centred on its own
            starts = np.concatenate([starts, proposal[:, None] @ self.symmetry[cls][None, 1:]], 1)
        d = self._first_centring(filtered, cls, starts[:, 0], ctf, particle_norm, None if logits is not None else shift)
        rotations = starts[:, 0].copy()
        if self.deltas:
            filter_full = self.local_filter(ctf, len(filtered))
            first = self.local_score(filtered, cls, filter_full, d)
            best = np.full(len(starts), -np.inf)
            for j in range(starts.shape[1]):
                score = first if j < peaks else self.local_score(
                    filtered, cls, filter_full, self.correlate(filtered, cls, starts[:, j], ctf, particle_norm)[0])
                values = score(starts[:, j], 0, across=starts.shape[1] > 1)
                top = values.max(1)
                better = top > best
                best[better] = top[better]
                rotations[better] = starts[better, j] @ self.deltas[0][values[better].argmax(1)]
            d, _ = self.correlate(filtered, cls, rotations, ctf, particle_norm)
            rotations = refine_rotations(self.local_score(filtered, cls, filter_full, d), rotations, self.deltas)
        d, fit = self.correlate(filtered, cls, rotations, ctf, particle_norm)
        return rotations, d.cpu().numpy(), fit.cpu().numpy()

    def _first_centring(self, filtered: torch.Tensor, cls: str, rotations: np.ndarray, ctf: torch.Tensor | None,
                        particle_norm: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        """Displacement (n, 3) of each particle at ``rotations``: ``shift`` where known (not NaN),
        else that of :meth:`correlate`."""
        if shift is None:
            return self.correlate(filtered, cls, rotations, ctf, particle_norm)[0]
        unknown = shift.isnan().any(1)
        if not unknown.any():
            return shift
        d = shift.clone()
        rows = torch.nonzero(unknown).squeeze(1)
        d[rows], _ = self.correlate(filtered[rows], cls, rotations[rows.cpu().numpy()],
                                    None if ctf is None else ctf[rows], particle_norm[rows])
        return d

    def match(self, volumes: np.ndarray, ctf: torch.Tensor | None) -> dict[str, np.ndarray]:
        """One block: scores (n, C) of the global search and scores_min (n, C), its most negative
        correlations (the contrast check, :func:`contrast_warnings`), screen (n, C) of
        :meth:`screen`, rotation (n, C, 3, 3),
        displacement_voxels (n, C, 3), refined (n, C) bool, fit (n, C): the full-size
        normalised correlation at the refined pose (NaN for classes not refined), and the
        pose confidence (n, C) of :meth:`confidence` (NaN, or False, where not refined); with a pose
        network, proposal_rotation (n, C, 3, 3): its pose of every class (:func:`soft_argmax`)."""
        spectra = torch.fft.rfftn(self._tensor(volumes), dim=(1, 2, 3)) * self.wedge
        spectra[:, 0, 0, 0] = 0.0
        particle_norm = ((self.weights * spectra.abs() ** 2).sum((1, 2, 3)) / self.box**3).sqrt()
        ctf = None if ctf is None else ctf.to(self.device)
        filtered = spectra if ctf is None else spectra * ctf
        if not self.global_search:
            return self._match_from_network(volumes, filtered, ctf, particle_norm)
        grid_scores, places = self.coarse_scores(filtered)
        scores = np.stack([s.max(1) for s in grid_scores], 1)
        rotations = np.stack([self.grid[s.argmax(1)] for s in grid_scores], 1)
        screen, screen_shift = self.screen(spectra, ctf, rotations, places)
        scores_min = np.stack([s.min(1) for s in grid_scores], 1)
        n, n_cls = scores.shape
        displacement = np.zeros((n, n_cls, 3))
        refined = np.zeros((n, n_cls), dtype=bool)
        fit = np.full((n, n_cls), np.nan)
        sd = self.noise_sd(ctf, n)
        confidence = {name: np.full((n, n_cls), np.nan) for name in CONFIDENCE}
        confidence["pose_determined"] = np.zeros((n, n_cls), dtype=bool)
        top = np.argsort(-(screen if self.refine_by == "screen" else scores), axis=1)[:, : self.refine_top]
        logits = None if self.proposer is None else self.proposer.predict(volumes)[0].numpy()
        proposals = None if logits is None else self._proposals(logits)
        for k, cls in enumerate(self.classes):
            rows = np.nonzero((top == k).any(1))[0]
            if len(rows):
                index = torch.as_tensor(rows, device=self.device)
                block_ctf = None if ctf is None else ctf[index]
                block = filtered[index] if places is None else phase_shift(filtered[index], -places[k][index])
                rotations[rows, k], displacement[rows, k], fit[rows, k] = self.refine_peaks(
                    block, cls, grid_scores[k][rows], block_ctf, particle_norm[index],
                    None if logits is None else logits[rows, k], None if logits is None else proposals[rows, k],
                    screen_shift[index, k],
                )
                if places is not None:
                    displacement[rows, k] += places[k][index].cpu().numpy()
                refined[rows, k] = True
                for name, values in self.confidence(cls, grid_scores[k][rows], rotations[rows, k], sd[rows]).items():
                    confidence[name][rows, k] = values
        proposal = {} if logits is None else {"proposal_rotation": proposals}
        return {"scores": scores, "scores_min": scores_min, "screen": screen, "rotation": rotations,
                "displacement_voxels": displacement,
                "refined": refined,
                "fit": fit, **confidence, **proposal}

    def _match_from_network(self, volumes: np.ndarray, filtered: torch.Tensor, ctf: torch.Tensor | None,
                            particle_norm: torch.Tensor) -> dict[str, np.ndarray]:
        """:meth:`match` without the global search (``matching.global_search: false``): each particle
        refines the ``refine_top`` classes the pose network finds most probable, from its proposals;
        the pose confidence is the network's (:meth:`network_confidence`).  scores, scores_min and
        screen are NaN; rotation of a class not refined is the network's own pose; and
        proposal_class_probability (n, C) is the network's class probabilities."""
        logits, probability = (t.numpy() for t in self.proposer.predict(volumes))
        n, n_cls = probability.shape
        proposals = self._proposals(logits)
        out = {"scores": np.full((n, n_cls), np.nan), "scores_min": np.full((n, n_cls), np.nan),
               "screen": np.full((n, n_cls), np.nan), "rotation": proposals.copy(),
               "displacement_voxels": np.zeros((n, n_cls, 3)), "refined": np.zeros((n, n_cls), dtype=bool),
               "fit": np.full((n, n_cls), np.nan), **{name: np.full((n, n_cls), np.nan) for name in CONFIDENCE},
               "pose_determined": np.zeros((n, n_cls), dtype=bool), "proposal_rotation": proposals,
               "proposal_class_probability": probability}
        top = np.argsort(-probability, axis=1, kind="stable")[:, : self.refine_top]
        for k, cls in enumerate(self.classes):
            rows = np.nonzero((top == k).any(1))[0]
            if not len(rows):
                continue
            index = torch.as_tensor(rows, device=self.device)
            out["rotation"][rows, k], out["displacement_voxels"][rows, k], out["fit"][rows, k] = self.refine_peaks(
                filtered[index], cls, None, None if ctf is None else ctf[index], particle_norm[index],
                logits[rows, k], proposals[rows, k])
            out["refined"][rows, k] = True
            for name, values in self.network_confidence(cls, logits[rows, k], out["rotation"][rows, k]).items():
                out[name][rows, k] = values
        return out

    def network_confidence(self, cls: str, logits: np.ndarray, rotations: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`confidence` of the poses ``rotations`` (n, 3, 3) from the pose network's logits (n, G)
        of the class: pose_margin the log-odds of its probability within ``pose_far_deg`` of the pose
        (modulo the point group) against beyond, pose_spread_deg the probability-weighted RMS angle to
        the pose within."""
        distance = self.grid_distance_deg(cls, rotations, self.proposal_quats[cls])
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        near = np.where(distance <= self.far_deg, p, 0.0)
        inside = near.sum(1)
        margin = np.log(np.clip(inside, 1e-12, None)) - np.log(np.clip(1.0 - inside, 1e-12, None))
        spread = np.sqrt((near * distance**2).sum(1) / np.clip(inside, 1e-12, None))
        return {"pose_margin": margin, "pose_spread_deg": spread, "pose_sigma_deg": np.maximum(spread, self.finest_deg),
                "pose_determined": margin >= self.margin_min}


CONFIDENCE = ("pose_margin", "pose_spread_deg", "pose_sigma_deg")  # per particle and class; pose_determined too


def _full_spectrum(half: torch.Tensor, box: int) -> torch.Tensor:
    """A real, even (f(k) = f(-k)) quantity on the rfftn grid (n, B, B, B//2+1) on the full
    grid, fftshifted so that frequency 0 sits at voxel B//2: (n, B, B, B)."""
    negative = torch.arange(box, device=half.device).neg() % box
    mates = torch.flip(half[..., 1 : box - box // 2], dims=(-1,))  # kx = B//2+1 .. B-1 from -kx
    mates = mates.index_select(-3, negative).index_select(-2, negative)
    return torch.fft.fftshift(torch.cat([half, mates], -1), dim=(-3, -2, -1))


def _power_spectra(bank: torch.Tensor, box: int) -> torch.Tensor:
    """|FFT|² of each bank row (m, B³), fftshifted like :func:`_full_spectrum`: (m, B³)."""
    spectra = torch.fft.fftn(bank.reshape(-1, box, box, box), dim=(1, 2, 3))
    return torch.fft.fftshift(spectra.abs() ** 2, dim=(1, 2, 3)).reshape(len(bank), -1)


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


def class_subset(class_names: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Rows (sorted) of a seeded random subset of at most ``per_class`` particles of every class."""
    rng = np.random.default_rng(seed)
    picked = []
    for cls in sorted(set(class_names.tolist())):
        rows = np.flatnonzero(class_names == cls)
        picked.append(rows if len(rows) <= per_class else rng.choice(rows, per_class, replace=False))
    return np.sort(np.concatenate(picked))


def _block_ctfs(config: Config, data: SubtomogramSet, defocus: np.ndarray | None, optics):
    """(rows -> the 3D CTFs of those particles, or None; what they come from, for the log): per
    tilt from the acquisition metadata, else per particle from its ``defocus`` with ``optics``
    (:func:`split_wedge_and_ctf`), else none."""
    per_tilt = split_particle_ctfs(data)
    if per_tilt is not None:
        source, names, centred = per_tilt
        return (lambda rows: source(names[rows], centred[rows])), "per tilt, per particle"
    if defocus is not None:
        return (lambda rows: ctf_3d(torch.as_tensor(defocus[rows]), config.box_size, data.pixel_size_angstrom,
                                    *optics)), "per particle"
    return (lambda rows: None), "none"


def _match_rows(matcher: Matcher, data: SubtomogramSet, chosen: np.ndarray, ctfs, name: str) -> dict[str, np.ndarray]:
    """:meth:`Matcher.match` of the particles ``chosen`` of a split, block by block, ``ctfs`` of
    :func:`_block_ctfs`."""
    blocks = [matcher.match(data.volumes(chosen[start:start + CHUNK]), ctfs(chosen[start:start + CHUNK]))
              for start in tqdm(range(0, len(chosen), CHUNK), desc=f"match {name}", unit="block", mininterval=1.0)]
    if not blocks:  # a part beyond the split's particles (the workflow's count was an estimate)
        blank = matcher.match(np.zeros((1,) + (matcher.box,) * 3, dtype=np.float32), None)
        blocks = [{k: v[:0] for k, v in blank.items()}]
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def match_split(config: Config, split_dir: Path, maps: list[Path], output: Path,
                per_class: int | None = None, pose_network: Path | None = None,
                part: int | None = None, parts: int = 1) -> None:
    """Template-match the particles of a split against every seen class; write an npz.

    Every particle, or with ``per_class`` a seeded subset of at most that many of each class
    (:func:`class_subset`; the file records ``subset_per_class`` so that readers know); with
    ``part`` only that one of ``parts`` equal consecutive slices of them (:func:`part_rows`), for
    :func:`cryovae.match_parts.join_match_parts`, which then runs the contrast check."""
    if per_class is not None and per_class < 1:
        raise InputError(f"--per-class must be at least 1, got {per_class}")
    if parts < 1 or (part is None and parts != 1):
        raise InputError(f"--parts {parts} needs --part (0 <= part < parts)")
    torch.set_num_threads(config.matching.threads)
    data = SubtomogramSet.open(split_dir)
    tilt, defocus, optics = split_wedge_and_ctf(config, data)
    proposer = None if pose_network is None or config.matching.starts != "network" else load_pose_network(pose_network)
    matcher = Matcher(config, read_references(config, maps), tilt, proposer=proposer)
    chosen = np.arange(len(data))
    if per_class is not None:
        chosen = class_subset(data.particles["cryovaeClassName"].astype(str).to_numpy(), per_class, config.seed)
        log.info("match %s: %d of %d particles, at most %d per class (matching.train_per_class)",
                 split_dir.name, len(chosen), len(data), per_class)
    if part is not None:
        chosen = part_rows(chosen, part, parts)
        log.info("match %s: part %d of %d, %d particles", split_dir.name, part + 1, parts, len(chosen))
    ctfs, ctf_source = _block_ctfs(config, data, defocus, optics)
    result = _match_rows(matcher, data, chosen, ctfs, split_dir.name)
    table = data.particles.iloc[chosen]
    names = {"tomogram_name": table["rlnTomoName"].to_numpy().astype(str)} if "rlnTomoName" in table.columns else {}
    origin = -result.pop("displacement_voxels") * data.pixel_size_angstrom
    arrays = {"particle_id": table["cryovaeParticleId"].astype(str).to_numpy().astype(str),
              "classes": np.array(matcher.classes), "origin_angstrom": origin,
              "class_self_margin": matcher.self_margin, "subset_per_class": np.int64(per_class or 0),
              **names, **result}
    if part is None:
        check_contrast(arrays)
    write_match_file(output, arrays)
    for cls, margin in zip(matcher.classes, matcher.self_margin if matcher.global_search else ()):
        if not margin > matcher.noise_sd(None, 1)[0] * matcher.margin_min:
            log.warning("match: the map of %s barely fixes an orientation at this pixel size (self-margin %.3f): "
                        "its poses will mostly be undetermined", cls, margin)
    log.info(
        "match %s: %d particles, %d classes, wedge %s, CTF %s", split_dir.name, len(chosen), len(matcher.classes),
        tilt, ctf_source,
    )


def best_fit_frames(path: Path, particle_id: np.ndarray, pixel_size_angstrom: float) -> tuple[np.ndarray, np.ndarray]:
    """Each particle's pose under its best-fitting refined class, from a :func:`match_split`
    output: rotation (n, 3, 3) float32 particle-from-reference and shift (n, 3) float32 in
    voxels (x, y, z; -rlnOrigin / pixel size), rows in the order of ``particle_id`` (the
    split's STAR order, which the file must have)."""
    data = read_match_file(Path(path), particle_id, whose="the split's")
    ids, fit = data["particle_id"].astype(str), data["fit"].astype(np.float64)
    rotation, origin = data["rotation"], data["origin_angstrom"]
    unrefined = ~np.isfinite(fit).any(axis=1)
    if unrefined.any():
        raise InputError(f"{path}: particle {ids[np.argmax(unrefined)]!r} has no refined class")
    best = np.nanargmax(fit, axis=1)
    rows = np.arange(len(ids))
    shift = -origin[rows, best] / pixel_size_angstrom
    return rotation[rows, best].astype(np.float32), shift.astype(np.float32)
