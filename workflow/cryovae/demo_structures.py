"""Generated pseudo-atomic demo structures (``demo:NAME``): protein-like, deterministic, in families.

Each structure is a set of tubes that follow a skeleton curve; a tube is a bundle of
alpha helices (Cα rise 1.5 Å, 100° per residue, radius 2.3 Å: Cα–Cα 3.8 Å) or a sandwich of
beta strands (rise 3.3 Å, pleat 0.95 Å).  Every residue gets ideal peptide-plane
backbone atoms (N, CA, C, O), a Cβ and a side chain grown from real amino-acid
topologies (bond 1.39–1.52 Å, angle 111°/120°, staggered torsions), so the element
composition is that of natural proteins (C ≈ 63 %, N ≈ 17 %, O ≈ 19 %, S ≈ 0.3–0.5 % by count,
as in the SHREC entries: 0.1–0.7 %).
B-factors grow from the tube core outwards (≈ 12–65 Å²).

Families differ in shape, secondary structure and composition; variant ``b`` of a
family is variant ``a`` on a smoothly deformed skeleton (≈ 5 Å) with ~5 % of residues
mutated, so each variant's closest relative is its sibling.  Shapes are asymmetric and
span 120 Å (globule) to 240 Å (rod): poses are defined at 10 Å pixels in a 32³ box.  A name always gives
the same atoms (seeds derive from the name, not from the config).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import gemmi
import numpy as np
from scipy.spatial import cKDTree

from cryovae.errors import InputError

# Side-chain heavy atoms: (name, element, parent); aromatic rings are marked by "ring".
SIDE_CHAINS: dict[str, list[tuple[str, str, str]]] = {
    "ALA": [("CB", "C", "CA")],
    "ARG": [("CB", "C", "CA"), ("CG", "C", "CB"), ("CD", "C", "CG"), ("NE", "N", "CD"), ("CZ", "C", "NE"),
            ("NH1", "N", "CZ"), ("NH2", "N", "CZ")],
    "ASN": [("CB", "C", "CA"), ("CG", "C", "CB"), ("OD1", "O", "CG"), ("ND2", "N", "CG")],
    "ASP": [("CB", "C", "CA"), ("CG", "C", "CB"), ("OD1", "O", "CG"), ("OD2", "O", "CG")],
    "CYS": [("CB", "C", "CA"), ("SG", "S", "CB")],
    "GLN": [("CB", "C", "CA"), ("CG", "C", "CB"), ("CD", "C", "CG"), ("OE1", "O", "CD"), ("NE2", "N", "CD")],
    "GLU": [("CB", "C", "CA"), ("CG", "C", "CB"), ("CD", "C", "CG"), ("OE1", "O", "CD"), ("OE2", "O", "CD")],
    "GLY": [],
    "HIS": [("CB", "C", "CA"), ("CG", "C", "CB"), ("ND1", "N", "CG"), ("CD2", "C", "CG"), ("CE1", "C", "ND1"),
            ("NE2", "N", "CD2")],
    "ILE": [("CB", "C", "CA"), ("CG1", "C", "CB"), ("CG2", "C", "CB"), ("CD1", "C", "CG1")],
    "LEU": [("CB", "C", "CA"), ("CG", "C", "CB"), ("CD1", "C", "CG"), ("CD2", "C", "CG")],
    "LYS": [("CB", "C", "CA"), ("CG", "C", "CB"), ("CD", "C", "CG"), ("CE", "C", "CD"), ("NZ", "N", "CE")],
    "MET": [("CB", "C", "CA"), ("CG", "C", "CB"), ("SD", "S", "CG"), ("CE", "C", "SD")],
    "PHE": [("CB", "C", "CA"), ("CG", "C", "CB"), ("CD1", "C", "CG"), ("CD2", "C", "CG"), ("CE1", "C", "CD1"),
            ("CE2", "C", "CD2"), ("CZ", "C", "CE1")],
    "PRO": [("CB", "C", "CA"), ("CG", "C", "CB"), ("CD", "C", "CG")],
    "SER": [("CB", "C", "CA"), ("OG", "O", "CB")],
    "THR": [("CB", "C", "CA"), ("OG1", "O", "CB"), ("CG2", "C", "CB")],
    "TRP": [("CB", "C", "CA"), ("CG", "C", "CB"), ("CD1", "C", "CG"), ("CD2", "C", "CG"), ("NE1", "N", "CD1"),
            ("CE2", "C", "CD2"), ("CE3", "C", "CD2"), ("CZ2", "C", "CE2"), ("CZ3", "C", "CE3"),
            ("CH2", "C", "CZ2")],
    "TYR": [("CB", "C", "CA"), ("CG", "C", "CB"), ("CD1", "C", "CG"), ("CD2", "C", "CG"), ("CE1", "C", "CD1"),
            ("CE2", "C", "CD2"), ("CZ", "C", "CE1"), ("OH", "O", "CZ")],
    "VAL": [("CB", "C", "CA"), ("CG1", "C", "CB"), ("CG2", "C", "CB")],
}
AROMATIC = frozenset({"HIS", "PHE", "TRP", "TYR"})
# sp2 side-chain atoms whose two children lie in one plane (carboxyl, amide, guanidinium).
PLANAR_CENTRES = frozenset({("ASN", "CG"), ("ASP", "CG"), ("GLN", "CD"), ("GLU", "CD"), ("ARG", "CZ")})
# Torsions (degrees) of planar-ring atoms by the parent's depth (CB = 1) and sibling rank.
_RING_TORSION = {2: (90.0, 270.0), 3: (180.0, 0.0), 4: (0.0, 180.0), 5: (180.0, 0.0)}
# Natural amino-acid frequencies (UniProtKB/Swiss-Prot, %).
NATURAL_FREQUENCY = {
    "ALA": 8.25, "ARG": 5.53, "ASN": 4.06, "ASP": 5.45, "CYS": 1.37, "GLN": 3.93, "GLU": 6.75, "GLY": 7.07,
    "HIS": 2.27, "ILE": 5.96, "LEU": 9.66, "LYS": 5.84, "MET": 2.42, "PHE": 3.86, "PRO": 4.70, "SER": 6.56,
    "THR": 5.34, "TRP": 1.08, "TYR": 2.92, "VAL": 6.87,
}
RESIDUES = tuple(NATURAL_FREQUENCY)

CA_C, C_N, N_CA, C_O = 1.52, 1.33, 1.46, 1.23  # Å
ANGLE_CA_C_N, ANGLE_C_N_CA, ANGLE_CA_C_O = 116.2, 121.7, 120.8  # degrees
HELIX_RISE, HELIX_TURN_DEG, HELIX_RADIUS = 1.5, 100.0, 2.3  # Å, degrees, Å
STRAND_RISE, STRAND_PLEAT = 3.3, 0.95  # Å
SKELETON_STEP = 0.5  # Å between skeleton samples
VARIANT_DEFORMATION_ANGSTROM = 5.0
VARIANT_MUTATION_FRACTION = 0.05
ROTAMER_ATTEMPTS = 6


@dataclass(frozen=True)
class Tube:
    """A tube along a skeleton: ``kind`` "helix" or "strand", cross-section offsets (Å) in the normal plane."""

    skeleton_xyz_angstrom: np.ndarray  # (M, 3)
    kind: str
    offsets_uv_angstrom: tuple[tuple[float, float], ...]


def demo_names() -> list[str]:
    """Every ``demo:NAME`` structure available, sorted."""
    return sorted(f"{family}_{variant}" for family in FAMILIES for variant in ("a", "b"))


def demo_structure(name: str) -> gemmi.Structure:
    """The generated structure ``name`` (see :func:`demo_names`) as a one-model gemmi Structure."""
    family, _, variant = name.rpartition("_")
    if family not in FAMILIES or variant not in ("a", "b"):
        raise InputError(f"demo:{name}: unknown demo structure; available: {', '.join(demo_names())}")
    family_seed = zlib.crc32(family.encode())
    tubes = FAMILIES[family]()
    frequency = _family_frequencies(np.random.default_rng([family_seed, 0]))
    if variant == "b":
        warp_rng = np.random.default_rng([family_seed, 1])
        tubes = [_deform(t, warp_rng) for t in tubes]
    chains = []
    for t, tube in enumerate(tubes):
        chains.extend(_tube_chains(tube, frequency, [family_seed, 2, t]))
    if variant == "b":
        mutation_rng = np.random.default_rng([family_seed, 3])
        chains = [_mutate(c, frequency, mutation_rng) for c in chains]
    return _to_gemmi(name, chains, family_seed)


# ----------------------------------------------------------------------------------------
# Shapes (skeletons in Å, centred roughly on the origin)


TRIANGLE = ((0.0, 5.5), (4.76, -2.75), (-4.76, -2.75))  # three-helix bundle cross-section, Å


def _curve(func: Callable[[np.ndarray], np.ndarray], t0: float, t1: float) -> np.ndarray:
    """Sample ``func(t) -> (n, 3)`` on [t0, t1] at about SKELETON_STEP Å spacing."""
    coarse = func(np.linspace(t0, t1, 2000))
    length = np.linalg.norm(np.diff(coarse, axis=0), axis=1).sum()
    return func(np.linspace(t0, t1, max(int(length / SKELETON_STEP), 2)))


def _globule() -> list[Tube]:
    """A lopsided trefoil knot of three-helix bundles: a compact, lumpy ball (~130 Å)."""

    def knot(t):
        r = 34.0 + 17.0 * np.cos(3 * t) + 6.0 * np.sin(t + 0.4)
        return np.stack([r * np.cos(2 * t), r * np.sin(2 * t), 26.0 * np.sin(3 * t) + 8.0 * np.cos(t)], axis=1)

    return [Tube(_curve(knot, 0.0, 2 * np.pi - 0.08), "helix", TRIANGLE)]


def _rod() -> list[Tube]:
    """A bent two-helix coiled-coil rod (~160 Å) with a large coiled lobe at one end, a small one at the other."""

    def shaft(t):
        return np.stack([t, 10.0 * np.sin(np.pi * t / 200.0), 6.0 * np.sin(np.pi * t / 90.0)], axis=1)

    def lobe(centre_x, radius, turns, pitch, sign):
        def f(t):
            a = 2 * np.pi * turns * t
            return np.stack([centre_x + sign * pitch * turns * t, radius * np.sin(a), radius * (1 - np.cos(a))], axis=1)
        return f

    pair = ((0.0, -4.8), (0.0, 4.8))
    return [
        Tube(_curve(shaft, -80.0, 80.0), "helix", pair),
        Tube(_curve(lobe(88.0, 26.0, 1.3, 24.0, 1.0), 0.0, 1.0) + [0.0, 0.0, 14.0], "helix", pair),
        Tube(_curve(lobe(-88.0, 16.0, 0.9, 22.0, -1.0), 0.0, 1.0) + [0.0, 0.0, 10.0], "helix", pair),
    ]


def _ring() -> list[Tube]:
    """A saddle-warped elliptical ring of beta sandwiches (~150 Å) with one knob sticking out."""

    def ring(t):
        return np.stack([66.0 * np.cos(t), 52.0 * np.sin(t), 9.0 * np.sin(2 * t + 0.5)], axis=1)

    def knob(t):
        return np.stack([70.0 + 48.0 * t, 12.0 * t ** 2, 9.0 * np.sin(0.5) + 30.0 * t], axis=1)

    sandwich = tuple((u, v) for u in (-5.0, 5.0) for v in (-7.2, -2.4, 2.4, 7.2))
    return [
        Tube(_curve(ring, 0.12, 2 * np.pi - 0.12), "strand", sandwich),
        Tube(_curve(knob, 0.0, 1.0), "strand", sandwich[:4]),
    ]


def _ell() -> list[Tube]:
    """An L: a long three-helix arm (~170 Å) and a shorter, lifted beta arm (~110 Å) at a rounded corner."""

    def helix_arm(t):
        return np.stack([t, 4.0 * np.sin(np.pi * t / 170.0), np.zeros_like(t)], axis=1)

    def corner(t):
        return np.stack([85.0 + 20.0 * np.sin(t), 20.0 - 20.0 * np.cos(t), np.zeros_like(t)], axis=1)

    def beta_arm(t):
        return np.stack([105.0 + 0.0 * t, 20.0 + t, 22.0 * (t / 110.0) ** 2], axis=1)

    sheet = tuple((0.0, v) for v in (-7.2, -2.4, 2.4, 7.2))
    return [
        Tube(_curve(helix_arm, -85.0, 85.0), "helix", TRIANGLE),
        Tube(_curve(corner, 0.1, np.pi / 2 - 0.1), "helix", TRIANGLE),
        Tube(_curve(beta_arm, 4.0, 110.0), "strand", sheet),
    ]


FAMILIES: dict[str, Callable[[], list[Tube]]] = {
    "globule": _globule, "rod": _rod, "ring": _ring, "ell": _ell,
}


def _family_frequencies(rng: np.random.Generator) -> np.ndarray:
    """Amino-acid frequencies of a family: natural ones tilted by a family-specific factor."""
    natural = np.array([NATURAL_FREQUENCY[r] for r in RESIDUES])
    tilted = natural * np.exp(0.6 * rng.standard_normal(len(natural)))
    return tilted / tilted.sum()


def _deform(tube: Tube, rng: np.random.Generator) -> Tube:
    """The tube on a smoothly warped skeleton: three plane waves of ~120 Å wavelength, ≈ 5 Å in all."""
    xyz = tube.skeleton_xyz_angstrom
    warp = np.zeros_like(xyz)
    for _ in range(3):
        direction = rng.standard_normal(3)
        wave = rng.standard_normal(3) * 2 * np.pi / 120.0
        warp += np.sin(xyz @ wave + rng.uniform(0, 2 * np.pi))[:, None] * direction
    warp *= VARIANT_DEFORMATION_ANGSTROM / np.sqrt(np.mean(np.sum(warp ** 2, axis=1)))
    return Tube(xyz + warp, tube.kind, tube.offsets_uv_angstrom)


def _mutate(chain: dict, frequency: np.ndarray, rng: np.random.Generator) -> dict:
    names = list(chain["residues"])
    for i in np.flatnonzero(rng.random(len(names)) < VARIANT_MUTATION_FRACTION):
        names[i] = RESIDUES[rng.choice(len(RESIDUES), p=frequency)]
    return {**chain, "residues": names}


# ----------------------------------------------------------------------------------------
# Cα traces and backbones


def _frames(skeleton: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotation-minimising frame along a polyline: tangents T, normals U, V, each (M, 3)."""
    tangent = np.gradient(skeleton, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    u = np.zeros_like(skeleton)
    seed = np.array([0.0, 0.0, 1.0]) if abs(tangent[0, 2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u[0] = seed - (seed @ tangent[0]) * tangent[0]
    u[0] /= np.linalg.norm(u[0])
    for i in range(1, len(skeleton)):
        v = u[i - 1] - (u[i - 1] @ tangent[i]) * tangent[i]
        u[i] = v / np.linalg.norm(v)
    return tangent, u, np.cross(tangent, u)


def _arc_sample(points: np.ndarray, step: float, n_extra: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fractional indices into ``points`` every ``step`` Å of arc length, plus ``n_extra`` beyond each end."""
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    s = np.arange(-n_extra, int(arc[-1] / step) + 1 + n_extra) * step
    index = np.interp(s, arc, np.arange(len(points)), left=np.nan, right=np.nan)
    below, above = s < 0, s > arc[-1]
    slope = (len(points) - 1) / max(arc[-1], 1e-9)
    index[below] = s[below] * slope
    index[above] = (len(points) - 1) + (s[above] - arc[-1]) * slope
    return index, s


def _interp_rows(rows: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Linear interpolation (and extrapolation) of (M, 3) rows at fractional indices."""
    lo = np.clip(np.floor(index).astype(int), 0, len(rows) - 2)
    frac = (index - lo)[:, None]
    return rows[lo] * (1 - frac) + rows[lo + 1] * frac


def _tube_chains(tube: Tube, frequency: np.ndarray, seed: list[int]) -> list[dict]:
    """One chain per helix/strand of the tube: Cα trace (with one virtual residue at each end)."""
    skeleton = tube.skeleton_xyz_angstrom
    tangent, u, v = _frames(skeleton)
    chains = []
    for k, (du, dv) in enumerate(tube.offsets_uv_angstrom):
        rng = np.random.default_rng([*seed, k])
        axis = skeleton + du * u + dv * v
        step = HELIX_RISE if tube.kind == "helix" else STRAND_RISE
        index, _ = _arc_sample(axis, step)
        if k % 2 == 1:
            index = index[::-1]  # neighbouring helices and strands run antiparallel
        centre, t_, u_, v_ = (_interp_rows(a, index) for a in (axis, tangent, u, v))
        steps = np.arange(len(index))
        if tube.kind == "helix":
            angle = np.radians(HELIX_TURN_DEG) * steps + rng.uniform(0, 2 * np.pi)
            ca = centre + HELIX_RADIUS * (np.cos(angle)[:, None] * u_ + np.sin(angle)[:, None] * v_)
            plane_ref = t_ * (1 if k % 2 == 0 else -1)
        else:
            pleat = np.where(steps % 2 == 0, 1.0, -1.0)[:, None]
            ca = centre + STRAND_PLEAT * pleat * u_
            plane_ref = v_ * pleat
        core = _interp_rows(skeleton, index)
        names = [RESIDUES[i] for i in rng.choice(len(RESIDUES), size=len(ca) - 2, p=frequency)]
        chains.append({"ca": ca, "plane_ref": plane_ref, "core": core, "residues": names})
    return chains


def _peptide_plane() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """C, O, N(next) in a trans peptide plane: x along Cα→Cα(next), y in-plane; and the Cα–Cα distance."""
    ca_c = np.array([1.0, 0.0])
    c = CA_C * ca_c
    turn = np.radians(180.0 - ANGLE_CA_C_N)
    c_n = np.array([np.cos(turn), np.sin(turn)])
    n = c + C_N * c_n
    turn2 = turn - np.radians(180.0 - ANGLE_C_N_CA)
    ca_next = n + N_CA * np.array([np.cos(turn2), np.sin(turn2)])
    o_dir = -np.radians(180.0 - ANGLE_CA_C_O)  # on the side away from N
    o = c + C_O * np.array([np.cos(o_dir), np.sin(o_dir)])
    x = ca_next / np.linalg.norm(ca_next)
    y = np.array([-x[1], x[0]])
    to_plane = np.stack([x, y])
    return to_plane @ c, to_plane @ o, to_plane @ n, float(np.linalg.norm(ca_next))


PLANE_C, PLANE_O, PLANE_N, PLANE_CA_CA = _peptide_plane()


def _backbone(ca: np.ndarray, plane_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N, C, O (each (n, 3)) for the real residues 1..n of a trace with virtual ends 0 and n+1."""
    d = np.diff(ca, axis=0)
    dist = np.linalg.norm(d, axis=1, keepdims=True)
    x = d / dist
    y = plane_ref[:-1] - np.sum(plane_ref[:-1] * x, axis=1, keepdims=True) * x
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    scale = dist / PLANE_CA_CA

    def place(p):
        return ca[:-1] + p[0] * scale * x + p[1] * y

    c_all, o_all, n_next = place(PLANE_C), place(PLANE_O), place(PLANE_N)
    return n_next[:-1], c_all[1:], o_all[1:]


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cross product of two 3-vectors (np.cross is slow for single vectors)."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _nerf(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle_deg: float, torsion_deg: float):
    """Atom d with |cd| = bond, angle bcd, torsion abcd (natural extension reference frame)."""
    bc = c - b
    bc = bc / np.sqrt(bc @ bc)
    n = _cross(b - a, bc)
    n /= np.sqrt(n @ n)
    m = _cross(n, bc)
    theta, phi = np.radians(angle_deg), np.radians(torsion_deg)
    return c - bond * np.cos(theta) * bc + bond * np.sin(theta) * (np.cos(phi) * m + np.sin(phi) * n)


def _side_chain(name: str, n: np.ndarray, ca: np.ndarray, c: np.ndarray, core: np.ndarray,
                rng: np.random.Generator, backbone: cKDTree, own: set[int]) -> list[tuple[str, str, np.ndarray, int]]:
    """Side-chain atoms (name, element, xyz, depth): the first of a few rotamers, tried from the one
    pointing away from the tube core, that keeps 2.4 Å from every other residue's backbone."""
    if not SIDE_CHAINS[name]:
        return []
    b = ca - n
    cc = c - ca
    cb_dir = -0.58273431 * _cross(b, cc) + 0.56802827 * b - 0.54067466 * cc
    cb = ca + 1.53 * cb_dir / np.linalg.norm(cb_dir)
    outward = ca - core
    chi1_options = sorted((-60.0, 60.0, 180.0), key=lambda t: -(_nerf(n, ca, cb, 1.52, 111.0, t) @ outward))
    best, best_clashes = [], None
    for attempt in range(ROTAMER_ATTEMPTS):
        atoms = _grow_side_chain(name, n, ca, cb, chi1_options[attempt % 3], rng)
        near = backbone.query_ball_point(np.array([xyz for _, _, xyz, _ in atoms]), r=2.4)
        clashes = sum(len(set(hits) - own) for hits in near)
        if best_clashes is None or clashes < best_clashes:
            best, best_clashes = atoms, clashes
        if clashes == 0:
            break
    return best


def _grow_side_chain(name: str, n: np.ndarray, ca: np.ndarray, cb: np.ndarray, chi1: float,
                     rng: np.random.Generator) -> list[tuple[str, str, np.ndarray, int]]:
    """One rotamer of a side chain from its topology: sp3 (1.52 Å, 111°, staggered torsions),
    planar sp2 ends (120°, 180° apart) and aromatic rings (1.39 Å, 120°)."""
    pos = {"N": n, "CA": ca, "CB": cb}
    parent = {"CB": "CA", "CA": "N"}
    depth = {"CB": 1}
    out = [("CB", "C", cb, 1)]
    children: dict[str, int] = {}
    base_torsion = {"CB": chi1}
    for atom_name, element, par in SIDE_CHAINS[name][1:]:
        grand = parent[par]
        great = parent[grand]
        sibling = children.get(par, 0)
        children[par] = sibling + 1
        base = base_torsion.setdefault(par, float(rng.choice([-60.0, 60.0, 180.0])))
        if name in AROMATIC and depth[par] >= 2:
            torsion, bond, angle = _RING_TORSION[min(depth[par], 5)][min(sibling, 1)], 1.39, 120.0
        elif (name, par) in PLANAR_CENTRES:
            torsion, bond, angle = base + 180.0 * sibling, (1.25 if element == "O" else 1.33), 120.0
        else:
            torsion, bond, angle = base + 120.0 * sibling + rng.normal(0.0, 10.0), 1.52, 111.0
        pos[atom_name] = _nerf(pos[great], pos[grand], pos[par], bond, angle, torsion)
        parent[atom_name] = par
        depth[atom_name] = depth[par] + 1
        out.append((atom_name, element, pos[atom_name], depth[atom_name]))
    return out


def _to_gemmi(name: str, chains: list[dict], family_seed: int) -> gemmi.Structure:
    """Assemble chains into a one-model gemmi Structure with B-factors (seeded per residue)."""
    backbones = [_backbone(c["ca"], c["plane_ref"]) for c in chains]
    backbone_xyz = np.concatenate(
        [np.stack([n_at, c["ca"][1:-1], c_at, o_at], axis=1).reshape(-1, 3) for c, (n_at, c_at, o_at) in
         zip(chains, backbones)]
    )
    tree = cKDTree(backbone_xyz)
    st = gemmi.Structure()
    st.name = f"demo_{name}"
    model = gemmi.Model(1)
    first = 0  # index of the current residue's N in backbone_xyz
    for k, (chain_data, (n_at, c_at, o_at)) in enumerate(zip(chains, backbones)):
        chain = gemmi.Chain(_chain_id(k))
        for i, res_name in enumerate(chain_data["residues"]):
            ca, core = chain_data["ca"][i + 1], chain_data["core"][i + 1]
            rng = np.random.default_rng([family_seed, 4, k, i])
            residue = gemmi.Residue()
            residue.name = res_name
            residue.seqid = gemmi.SeqId(i + 1, " ")
            residue.entity_type = gemmi.EntityType.Polymer
            atoms = [("N", "N", n_at[i], 0), ("CA", "C", ca, 0), ("C", "C", c_at[i], 0), ("O", "O", o_at[i], 0)]
            atoms += _side_chain(res_name, n_at[i], ca, c_at[i], core, rng, tree, set(range(first, first + 4)))
            first += 4
            for atom_name, element, xyz, depth in atoms:
                radial = np.linalg.norm(xyz - core)
                b_factor = 12.0 + radial ** 2 / 16.0 + 4.0 * depth + rng.gamma(2.0, 2.0)
                residue.add_atom(_atom(atom_name, element, xyz, min(b_factor, 120.0)))
            chain.add_residue(residue)
        model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    return st


def _atom(name: str, element: str, xyz: np.ndarray, b_factor: float) -> gemmi.Atom:
    atom = gemmi.Atom()
    atom.name = name
    atom.element = gemmi.Element(element)
    atom.pos = gemmi.Position(*map(float, xyz))
    atom.occ = 1.0
    atom.b_iso = float(b_factor)
    return atom


def _chain_id(k: int) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return letters[k] if k < len(letters) else letters[k // len(letters) - 1] + letters[k % len(letters)]
