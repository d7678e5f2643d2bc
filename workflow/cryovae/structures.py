"""Atomic models in: a local file, a PDB id (downloaded once, cached) or a generated demo.

``prepare_structure`` resolves one class's entry of ``config.structures``, keeps one
model, the highest-occupancy alternative conformation, drops waters, ligands and
hydrogens as configured, maps or drops elements the SOAP descriptor does not know
(it knows C, N, O, S, P), and writes the cleaned structure as mmCIF.
``read_structure`` reads such a file back into flat arrays for the later stages.
"""

from __future__ import annotations

import gzip
import urllib.error
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np

from cryovae.atomic import atomic_path
from cryovae.config import PDB_ID_PATTERN, Config
from cryovae.errors import InputError

KNOWN_ELEMENTS = ("C", "N", "O", "S", "P")
"""Elements the SOAP descriptor knows; hydrogens are kept only when not removed."""

MAPPED_ELEMENTS = {"Se": "S"}
"""Elements replaced by a chemically similar known one (selenomethionine -> methionine)."""

PROTEIN_BACKBONE = frozenset({"N", "CA", "C", "O", "OXT"})
NUCLEIC_BACKBONE = frozenset({"P", "OP1", "OP2", "OP3", "O5'", "C5'", "C4'", "C3'", "O3'"})
DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class StructureAtoms:
    """The atoms of one structure, as flat arrays of length N (one model).

    coords_xyz_angstrom: (N, 3) float64, Cartesian x, y, z in Å.
    elements: (N,) str, element symbols as written in the periodic table ("C", "Se").
    atom_names, residue_names, chain_ids: (N,) str.
    is_calpha: (N,) bool, protein C-alpha atoms.
    is_backbone: (N,) bool, protein N, CA, C, O, OXT and the nucleic-acid phosphate backbone.
    b_factors_angstrom2: (N,) float64, isotropic B-factors in Å².
    occupancies: (N,) float64, in [0, 1].
    """

    coords_xyz_angstrom: np.ndarray
    elements: np.ndarray
    atom_names: np.ndarray
    residue_names: np.ndarray
    chain_ids: np.ndarray
    is_calpha: np.ndarray
    is_backbone: np.ndarray
    b_factors_angstrom2: np.ndarray
    occupancies: np.ndarray

    def __len__(self) -> int:
        return len(self.elements)


def prepare_structure(config: Config, class_name: str, output: Path) -> None:
    """Resolve, read, clean and write ``config.structures[class_name]`` as mmCIF at ``output``."""
    if class_name not in config.structures:
        raise InputError(f"class {class_name!r} is not a key of structures (known: {config.class_names})")
    spec = config.structures[class_name]
    options = config.structure_options
    if spec.startswith("demo:"):
        from cryovae.demo_structures import demo_structure

        st, source = demo_structure(spec[len("demo:"):]), spec
    else:
        path = resolve_structure_file(spec, options.cache_dir, options.pdb_server)
        st, source = read_gemmi(path), str(path)
    clean_structure(st, source, options.model_index, options.remove_waters, options.remove_ligands,
                    options.remove_hydrogens)
    write_mmcif(st, output)


def resolve_structure_file(spec: str, cache_dir: str, pdb_server: str) -> Path:
    """A local file for ``spec``: the file itself, or the cached download of a 4-character PDB id."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if PDB_ID_PATTERN.fullmatch(spec):
        return fetch_pdb_entry(spec, Path(cache_dir).expanduser(), pdb_server)
    raise InputError(
        f"structure {spec!r}: no such file (relative paths are taken from {Path.cwd()}); expected an "
        "existing PDB/mmCIF file (.gz accepted), a 4-character PDB id such as 1bxn, or demo:NAME"
    )


def fetch_pdb_entry(pdb_id: str, cache_dir: Path, pdb_server: str) -> Path:
    """``cache_dir/{ID}.cif.gz``, downloaded from ``pdb_server/{ID}.cif.gz`` unless already cached."""
    entry = pdb_id.upper()
    cached = cache_dir / f"{entry}.cif.gz"
    if cached.is_file():
        return cached
    url = f"{pdb_server.rstrip('/')}/{entry}.cif.gz"
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            payload = response.read()
    except urllib.error.HTTPError as err:
        raise InputError(
            f"PDB entry {entry}: {url} answered HTTP {err.code} ({err.reason}); check the id, "
            f"or put the entry's mmCIF at {cached}"
        ) from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise InputError(
            f"PDB entry {entry}: could not download {url} ({reason}). Without network access, "
            f"download {entry}.cif.gz elsewhere and put it at {cached}, or give a local file path "
            "in structures"
        ) from None
    _check_gzip_bytes(payload, url)
    with atomic_path(cached) as tmp:
        tmp.write_bytes(payload)
    return cached


def _check_gzip_bytes(payload: bytes, source: str) -> None:
    """Raise :class:`InputError` unless ``payload`` is a complete gzip stream holding an mmCIF."""
    try:
        text = gzip.decompress(payload)
    except (OSError, EOFError) as err:
        raise InputError(f"{source}: expected a gzip-compressed mmCIF file ({err})") from None
    if not text.lstrip().startswith(b"data_"):
        raise InputError(f"{source}: expected an mmCIF file starting with data_, got {text[:40]!r}")


def read_gemmi(path: str | Path) -> gemmi.Structure:
    """Read a PDB or mmCIF file (optionally .gz) with gemmi; bad files raise :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: structure file does not exist")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: structure file is empty")
    if path.suffix == ".gz":
        _check_gzip_file(path)
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, IndexError) as err:
        raise InputError(f"{path}: not a readable PDB or mmCIF file ({err})") from None
    if len(st) == 0 or all(model.count_atom_sites() == 0 for model in st):
        raise InputError(f"{path}: no atoms found (expected ATOM/HETATM records or an _atom_site loop)")
    return st


def _check_gzip_file(path: Path) -> None:
    """Read a .gz file to its end: a truncated stream raises :class:`InputError`."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass
    except (OSError, EOFError) as err:
        raise InputError(f"{path}: truncated or corrupt gzip file ({err})") from None


def clean_structure(st: gemmi.Structure, source: str, model_index: int, remove_waters: bool,
                    remove_ligands: bool, remove_hydrogens: bool) -> None:
    """Clean ``st`` in place: one model, best altlocs, optional removals, known elements only."""
    _keep_model(st, model_index, source)
    st.setup_entities()
    if remove_ligands:
        st.remove_ligands_and_waters()
    elif remove_waters:
        st.remove_waters()
    if remove_hydrogens:
        st.remove_hydrogens()
    for chain in st[0]:
        _drop_microheterogeneity(chain)
        for residue in chain:
            _keep_best_altloc(residue)
    _map_elements(st, source)
    st.remove_empty_chains()
    if st[0].count_atom_sites() == 0:
        raise InputError(f"{source}: no atoms left after cleaning (waters, ligands, hydrogens removed)")


def _keep_model(st: gemmi.Structure, model_index: int, source: str) -> None:
    if model_index >= len(st):
        raise InputError(
            f"{source}: structure_options.model_index is {model_index} but the file has {len(st)} model(s)"
        )
    for i in reversed(range(len(st))):
        if i != model_index:
            del st[i]
    st.renumber_models()


def _drop_microheterogeneity(chain: gemmi.Chain) -> None:
    """Of residues sharing a sequence id (point mutations in one site), keep the most occupied."""
    i = 0
    while i < len(chain):
        j = i + 1
        while j < len(chain) and chain[j].seqid == chain[i].seqid:
            j += 1
        if j - i > 1:
            occupancy = [np.mean([a.occ for a in chain[k]]) if len(chain[k]) else 0.0 for k in range(i, j)]
            best = i + int(np.argmax(occupancy))
            for k in reversed(range(i, j)):
                if k != best:
                    del chain[k]
        i += 1


def _keep_best_altloc(residue: gemmi.Residue) -> None:
    """Keep atoms without altloc and those of the residue's highest mean-occupancy altloc."""
    occupancy: dict[str, list[float]] = {}
    for atom in residue:
        if atom.altloc != "\0":
            occupancy.setdefault(atom.altloc, []).append(atom.occ)
    if not occupancy:
        return
    best = max(sorted(occupancy), key=lambda alt: np.mean(occupancy[alt]))
    for i in reversed(range(len(residue))):
        if residue[i].altloc not in ("\0", best):
            del residue[i]
    for atom in residue:
        atom.altloc = "\0"


def _map_elements(st: gemmi.Structure, source: str) -> None:
    """Map (Se -> S) or drop elements outside C N O S P (and H/D), warning with counts."""
    mapped: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    for chain in st[0]:
        for residue in chain:
            for i in reversed(range(len(residue))):
                atom = residue[i]
                symbol = atom.element.name
                if symbol in KNOWN_ELEMENTS or atom.element.is_hydrogen:
                    continue
                if symbol in MAPPED_ELEMENTS:
                    atom.element = gemmi.Element(MAPPED_ELEMENTS[symbol])
                    mapped[symbol] += 1
                else:
                    dropped[symbol] += 1
                    del residue[i]
        for j in reversed(range(len(chain))):
            if len(chain[j]) == 0:
                del chain[j]
    if mapped or dropped:
        parts = [f"mapped {s} -> {MAPPED_ELEMENTS[s]} ({n} atoms)" for s, n in sorted(mapped.items())]
        parts += [f"dropped {s} ({n} atoms)" for s, n in sorted(dropped.items())]
        warnings.warn(
            f"{source}: elements unknown to the SOAP descriptor (it knows {' '.join(KNOWN_ELEMENTS)}): "
            + "; ".join(parts),
            stacklevel=2,
        )


def write_mmcif(st: gemmi.Structure, output: Path) -> None:
    """Write ``st`` as mmCIF at ``output``, atomically."""
    st.setup_entities()
    with atomic_path(output, suffix=".cif") as tmp:
        st.make_mmcif_document().write_file(str(tmp))


def read_structure(path: str | Path, model_index: int = 0) -> StructureAtoms:
    """Read one model of a PDB/mmCIF file (e.g. a cleaned structure) into :class:`StructureAtoms`."""
    st = read_gemmi(path)
    if model_index >= len(st):
        raise InputError(f"{path}: model {model_index} requested but the file has {len(st)} model(s)")
    coords, elements, names, residues, chains, b_factors, occupancies = [], [], [], [], [], [], []
    for chain in st[model_index]:
        chain_name = chain.name
        for residue in chain:
            residue_name = residue.name
            for atom in residue:
                pos = atom.pos
                coords.append((pos.x, pos.y, pos.z))
                elements.append(atom.element.name)
                names.append(atom.name)
                residues.append(residue_name)
                chains.append(chain_name)
                b_factors.append(atom.b_iso)
                occupancies.append(atom.occ)
    if not coords:
        raise InputError(f"{path}: model {model_index} has no atoms")
    elements_arr, names_arr = np.array(elements), np.array(names)
    protein_backbone = np.isin(names_arr, list(PROTEIN_BACKBONE)) & np.isin(elements_arr, ["C", "N", "O"])
    nucleic_backbone = np.isin(names_arr, list(NUCLEIC_BACKBONE)) & np.isin(elements_arr, ["C", "O", "P"])
    return StructureAtoms(
        coords_xyz_angstrom=np.array(coords, dtype=np.float64),
        elements=elements_arr,
        atom_names=names_arr,
        residue_names=np.array(residues),
        chain_ids=np.array(chains),
        is_calpha=(names_arr == "CA") & (elements_arr == "C"),
        is_backbone=protein_backbone | nucleic_backbone,
        b_factors_angstrom2=np.array(b_factors, dtype=np.float64),
        occupancies=np.array(occupancies, dtype=np.float64),
    )
