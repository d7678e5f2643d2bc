"""SOAP descriptors of structures and the class affinity matrix made from them.

``compute_descriptor`` averages local SOAP power spectra (dscribe) over evenly chosen
atoms of one cleaned structure.  ``build_affinity`` standardises the descriptors of all
classes feature by feature (z-score across the set) and takes cosine similarities:
raw cosines of averaged SOAP vectors of proteins all exceed 0.99, and standardising
spreads them over [-1, 1] while a rotated or moved copy still scores 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryovae.atomic import atomic_path
from cryovae.config import Config
from cryovae.errors import InputError
from cryovae.structures import StructureAtoms, read_structure

ALL_ATOM_SPECIES = ("C", "N", "O", "S", "P")
COARSE_SPECIES = ("C", "P")
"""Coarse-grained mode: C-alpha atoms stand as C, nucleic-acid phosphorus as P."""

CHUNK_CENTRES = 256
"""Centres described per dscribe call (bounds memory on 100k-atom structures)."""
CHUNK_CELL_ANGSTROM = 30.0
CROP_MARGIN_ANGSTROM = 0.5
"""Atoms within r_cut + dscribe's cutoff padding + this margin of a chunk's centres form its environment."""

ZERO_VARIANCE_RELATIVE = 1e-9
"""A feature whose spread across the set is below this fraction of the largest feature value is dropped."""


def compute_descriptor(config: Config, structure: Path, output: Path) -> None:
    """Averaged SOAP vector of the cleaned ``structure`` saved as a float64 .npy of shape (F,)."""
    vector = soap_vector(read_structure(structure), config, str(structure))
    with atomic_path(output, suffix=".npy") as tmp:
        np.save(tmp, vector)


def soap_vector(atoms: StructureAtoms, config: Config, source: str = "structure") -> np.ndarray:
    """Mean local SOAP power spectrum over at most ``config.affinity.max_centres`` atoms; shape (F,).

    all_atom: every C, N, O, S, P atom (hydrogens are skipped), species always C N O S P;
    coarse_grained: C-alpha (as C) and P atoms, species C P.  Centres are evenly spaced in
    file order, so the vector does not depend on the pose of the structure.
    """
    from ase import Atoms
    from dscribe.descriptors import SOAP

    symbols, coords_xyz_angstrom, species = _select_atoms(atoms, config.affinity.mode, source)
    params = config.affinity.resolved()
    soap = SOAP(
        species=list(species), r_cut=float(params["r_cut"]), n_max=int(params["n_max"]),
        l_max=int(params["l_max"]), sigma=float(params["sigma"]), periodic=False, sparse=False,
        average="off", dtype="float64",
    )
    centres = centre_indices(len(symbols), config.affinity.max_centres)
    total = np.zeros(soap.get_number_of_features(), dtype=np.float64)
    reach_angstrom = float(params["r_cut"]) + soap.get_cutoff_padding() + CROP_MARGIN_ANGSTROM
    for chunk, near in _centre_chunks(coords_xyz_angstrom, centres, reach_angstrom):
        environment = Atoms(symbols=list(symbols[near]), positions=coords_xyz_angstrom[near])
        # centres as positions (identical to atom indices, without dscribe copying all positions per centre)
        local = soap.create(environment, centers=coords_xyz_angstrom[chunk], n_jobs=1)
        total += np.asarray(local, dtype=np.float64).reshape(len(chunk), -1).sum(axis=0)
    return total / len(centres)


def _centre_chunks(coords_xyz_angstrom: np.ndarray, centres: np.ndarray, reach_angstrom: float):
    """Yield (centre indices, sorted indices of every atom within ``reach_angstrom`` of them) for
    spatially compact chunks of at most CHUNK_CENTRES centres.

    SOAP of a centre depends only on atoms within r_cut plus dscribe's cutoff padding (where
    the Gaussian densities fall below 1e-3), so describing each chunk in its own cropped
    environment gives the same vectors while memory stays O(chunk x neighbours) instead of
    O(centres x atoms) inside dscribe.
    """
    from scipy.spatial import cKDTree

    tree = cKDTree(coords_xyz_angstrom)
    cells = np.floor(coords_xyz_angstrom[centres] / CHUNK_CELL_ANGSTROM).astype(np.int64)
    ordered = centres[np.lexsort(cells.T[::-1])]
    for start in range(0, len(ordered), CHUNK_CENTRES):
        chunk = np.sort(ordered[start:start + CHUNK_CENTRES])
        neighbours = tree.query_ball_point(coords_xyz_angstrom[chunk], reach_angstrom)
        yield chunk, np.unique(np.concatenate([np.asarray(n, dtype=np.int64) for n in neighbours]))


def _select_atoms(atoms: StructureAtoms, mode: str, source: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(symbols (M,), coords (M, 3) in Å, species) of the atoms the mode describes."""
    if mode == "all_atom":
        keep = np.isin(atoms.elements, ALL_ATOM_SPECIES)
        symbols, species = atoms.elements[keep], ALL_ATOM_SPECIES
    else:
        keep = atoms.is_calpha | (atoms.elements == "P")
        symbols, species = np.where(atoms.is_calpha[keep], "C", "P"), COARSE_SPECIES
    if not keep.any():
        wanted = "C, N, O, S or P atoms" if mode == "all_atom" else "C-alpha or P atoms"
        raise InputError(f"{source}: no {wanted} to describe (affinity.mode = {mode})")
    return symbols, atoms.coords_xyz_angstrom[keep], species


def centre_indices(n_atoms: int, max_centres: int) -> np.ndarray:
    """At most ``max_centres`` distinct atom indices evenly spaced over 0..n_atoms-1, ascending."""
    if n_atoms <= max_centres:
        return np.arange(n_atoms)
    return np.unique(np.linspace(0, n_atoms - 1, max_centres).round().astype(int))


def affinity_matrix(descriptors: np.ndarray) -> np.ndarray:
    """Cosine similarity of feature-wise standardised descriptors.

    descriptors: (N, F) averaged SOAP vectors.  Each feature is centred and scaled to unit
    variance across the N rows; features with (numerically) no spread are dropped.
    Returns (N, N) float64: symmetric, unit diagonal, within [-1, 1].  Rows left with
    nothing to compare (all features equal to the set mean) are 1 with each other and 0
    with the rest.
    """
    x = np.asarray(descriptors, dtype=np.float64)
    spread = x.std(axis=0)
    keep = spread > ZERO_VARIANCE_RELATIVE * max(np.abs(x).max(), np.finfo(float).tiny)
    z = (x[:, keep] - x[:, keep].mean(axis=0)) / spread[keep]
    norms = np.linalg.norm(z, axis=1)
    empty = norms <= 1e-12 * np.sqrt(max(z.shape[1], 1))
    unit = np.where(empty[:, None], 0.0, z / np.where(empty, 1.0, norms)[:, None])
    matrix = unit @ unit.T
    matrix[np.ix_(empty, empty)] = 1.0
    matrix = np.clip((matrix + matrix.T) / 2.0, -1.0, 1.0)
    np.fill_diagonal(matrix, 1.0)
    return matrix


def build_affinity(config: Config, descriptors: list[Path], csv: Path, plot: Path) -> None:
    """Affinity matrix of all classes (config order) as CSV (header of class names) and a heatmap PNG."""
    vectors = load_descriptors(config.class_names, descriptors)
    matrix = affinity_matrix(vectors)
    check_distinct_classes(config.structures, matrix)
    write_affinity_csv(csv, config.class_names, matrix)
    plot_affinity(plot, config.class_names, matrix, config.affinity.mode)


IDENTICAL_AFFINITY = 0.9999


def check_distinct_classes(structures: dict[str, str], matrix: np.ndarray) -> None:
    """InputError if two classes name the same structure or have affinity 1 (>= IDENTICAL_AFFINITY):
    their particles are the same shape, and a classifier would split them at random."""
    names = list(structures)
    same = []
    for i, j in zip(*np.triu_indices(len(names), k=1)):
        a, b = names[i], names[j]
        source_a, source_b = structures[a], structures[b]
        if source_a == source_b or (Path(source_a).is_file() and Path(source_b).is_file()
                                    and Path(source_a).resolve() == Path(source_b).resolve()):
            same.append(f"{a} and {b} name the same structure ({source_a})")
        elif matrix[i, j] >= IDENTICAL_AFFINITY:
            same.append(f"{a} and {b} have affinity {matrix[i, j]:.6f} ({source_a}, {source_b})")
    if same:
        raise InputError(
            "structures: " + "; ".join(same) + ". Their particles are the same shape: the classifier would "
            "split them at random. Give each class its own structure, or merge them into one class."
        )


def load_descriptors(class_names: list[str], paths: list[Path]) -> np.ndarray:
    """Stack ``{class}.npy`` files in ``class_names`` order; (N, F) float64."""
    by_class: dict[str, Path] = {}
    for path in map(Path, paths):
        name = path.name.removesuffix(".npy")
        if name in by_class:
            raise InputError(f"descriptors: class {name!r} given twice ({by_class[name]} and {path})")
        by_class[name] = path
    missing = [c for c in class_names if c not in by_class]
    extra = sorted(set(by_class) - set(class_names))
    if missing or extra:
        raise InputError(
            "descriptors: expected one {class}.npy per class of structures "
            f"({', '.join(class_names)}); missing: {missing or 'none'}; not a class: {extra or 'none'}"
        )
    vectors = [_load_vector(by_class[c]) for c in class_names]
    lengths = {len(v) for v in vectors}
    if len(lengths) > 1:
        sizes = ", ".join(f"{c}: {len(v)}" for c, v in zip(class_names, vectors))
        raise InputError(f"descriptors have different lengths ({sizes}); were they made with one affinity config?")
    return np.stack(vectors)


def _load_vector(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{path}: descriptor file does not exist")
    try:
        vector = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"{path}: not a NumPy .npy descriptor ({err})") from None
    if vector.ndim != 1 or vector.size == 0 or not np.issubdtype(vector.dtype, np.floating):
        raise InputError(f"{path}: expected a 1-D float vector, got shape {vector.shape} of {vector.dtype}")
    if not np.isfinite(vector).all():
        raise InputError(f"{path}: descriptor holds NaN or infinite values")
    return vector.astype(np.float64)


def write_affinity_csv(path: Path, class_names: list[str], matrix: np.ndarray) -> None:
    """Header row of class names, then the N x N matrix; no index column (affinity-VAE's format)."""
    import pandas as pd

    with atomic_path(path, suffix=".csv") as tmp:
        pd.DataFrame(matrix, columns=class_names).to_csv(tmp, index=False, float_format="%.8f")


def read_affinity_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(class names, (N, N) float64 matrix) from an affinity CSV; errors name the file and line."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: affinity CSV does not exist")
    try:
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: not a readable affinity CSV ({err})") from None
    names = [str(n).strip() for n in raw.iloc[0]]
    values = raw.iloc[1:]
    if values.shape != (len(names), len(names)):
        raise InputError(f"{path}: expected a header of N class names and N rows of N values, got "
                         f"{len(names)} names and {values.shape[0]} rows of {values.shape[1]}")
    if len(set(names)) != len(names):
        raise InputError(f"{path}: duplicate class names in the header ({names})")
    matrix = values.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.argwhere(~np.isfinite(matrix))
    if len(bad):
        raise InputError(f"{path}: line {bad[0][0] + 2}, column {bad[0][1] + 1}: expected a finite number")
    return names, matrix


def clustering_order(matrix: np.ndarray) -> np.ndarray:
    """Leaf order of average-linkage clustering on 1 - affinity; shape (N,)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if len(matrix) < 3:
        return np.arange(len(matrix))
    distance = np.clip(1.0 - (matrix + matrix.T) / 2.0, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    return leaves_list(linkage(squareform(distance, checks=False), method="average", optimal_ordering=True))


def plot_affinity(path: Path, class_names: list[str], matrix: np.ndarray, mode: str, title: str | None = None,
                  colour_label: str = "cosine of standardised SOAP") -> None:
    """Heatmap PNG, classes in clustering order, labelled, with a colour bar (``title``: None for the SOAP one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = clustering_order(matrix)
    names = [class_names[i] for i in order]
    n = len(names)
    size = 2.5 + 0.45 * n
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(matrix[np.ix_(order, order)], cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), names)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                value = matrix[order[i], order[j]]
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(value) > 0.6 else "black")
    ax.set_title(title if title is not None else f"SOAP affinity ({mode.replace('_', '-')}), clustered")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=colour_label)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None})
    plt.close(fig)
