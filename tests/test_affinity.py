"""SOAP descriptors and the affinity matrix: pose invariance, matrix properties, known orderings, errors."""

from __future__ import annotations

from pathlib import Path

import gemmi
import matplotlib.image
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.transform import Rotation

from cryovae.affinity import (
    affinity_matrix,
    build_affinity,
    centre_indices,
    compute_descriptor,
    load_descriptors,
    read_affinity_csv,
    write_affinity_csv,
)
from cryovae.config import validate_config
from cryovae.demo_structures import demo_names
from cryovae.errors import InputError
from cryovae.structures import prepare_structure

MODES = ("all_atom", "coarse_grained")
FAST_CENTRES = 500


def _config(structures: dict[str, str], mode: str = "all_atom", max_centres: int = FAST_CENTRES):
    return validate_config(
        {"structures": structures, "affinity": {"mode": mode, "max_centres": max_centres}}
    )


@pytest.fixture(scope="module")
def demo_cifs(tmp_path_factory) -> dict[str, Path]:
    """Every demo structure, prepared once: name -> cleaned mmCIF."""
    folder = tmp_path_factory.mktemp("demo")
    names = demo_names()
    config = _config({n: f"demo:{n}" for n in names})
    for name in names:
        prepare_structure(config, name, folder / f"{name}.cif")
    return {n: folder / f"{n}.cif" for n in names}


def _descriptors_of(config, folder: Path, mode: str) -> list[Path]:
    descriptors = []
    for name in config.class_names:
        cif = folder / "structures" / f"{name}.cif"
        prepare_structure(config, name, cif)
        descriptors.append(folder / mode / f"{name}.npy")
        compute_descriptor(config, cif, descriptors[-1])
    return descriptors


def _affinity_of(structures: dict[str, str], folder: Path, mode: str, max_centres: int = FAST_CENTRES):
    """The whole stage through the public functions; returns (names, matrix) read back from the CSV."""
    config = _config(structures, mode, max_centres)
    descriptors = _descriptors_of(config, folder, mode)
    csv, png = folder / f"{mode}.csv", folder / f"{mode}.png"
    build_affinity(config, descriptors[::-1], csv, png)
    assert matplotlib.image.imread(png).shape[2] in (3, 4)
    return read_affinity_csv(csv)


def _moved_copy(source: Path, target: Path, seed: int) -> None:
    """Write ``source`` rotated by a random rotation and translated by up to 500 Å."""
    rng = np.random.default_rng(seed)
    structure = gemmi.read_structure(str(source))
    rotation = Rotation.random(random_state=rng).as_matrix()
    transform = gemmi.Transform(gemmi.Mat33(rotation.tolist()), gemmi.Vec3(*rng.uniform(-500, 500, 3)))
    structure[0].transform_pos_and_adp(transform)
    structure.make_mmcif_document().write_file(str(target))


@pytest.mark.parametrize("mode", MODES)
def test_rotated_and_translated_copy_has_affinity_one(mode, demo_cifs, tmp_path):
    moved = tmp_path / "moved.cif"
    _moved_copy(demo_cifs["ell_a"], moved, seed=7)
    structures = {"original": str(demo_cifs["ell_a"]), "moved": str(moved),
                  "rod": str(demo_cifs["rod_a"]), "ring": str(demo_cifs["ring_a"])}
    config = _config(structures, mode)
    matrix = affinity_matrix(load_descriptors(config.class_names, _descriptors_of(config, tmp_path, mode)))
    assert matrix[0, 1] >= 0.9999
    assert matrix[0, 2] < 0.9 and matrix[0, 3] < 0.9
    # as classes, the two copies cannot be told apart: the affinity stage says so
    with pytest.raises(InputError, match=r"original and moved have affinity 1\.0000.*split them at random"):
        build_affinity(config, _descriptors_of(config, tmp_path, mode), tmp_path / "a.csv", tmp_path / "a.png")
    assert not (tmp_path / "a.csv").exists()


def test_two_classes_of_one_structure_are_an_error(tmp_path):
    config = _config({"a": "demo:rod_a", "b": "demo:ring_a", "c": "demo:rod_a"})
    paths = [_npy(tmp_path, n, v) for n, v in (("a", [1.0, 2, 3]), ("b", [3.0, 1, 0]), ("c", [1.0, 2, 3.5]))]
    with pytest.raises(InputError, match=r"a and c name the same structure \(demo:rod_a\)"):
        build_affinity(config, paths, tmp_path / "a.csv", tmp_path / "a.png")
    pdb = tmp_path / "x.pdb"
    pdb.write_text("")
    same_file = _config({"a": str(pdb), "b": "demo:ring_a", "c": str(tmp_path / "." / "x.pdb")})
    with pytest.raises(InputError, match=r"a and c name the same structure"):
        build_affinity(same_file, paths, tmp_path / "a.csv", tmp_path / "a.png")
    assert not (tmp_path / "a.csv").exists()


@pytest.mark.parametrize("mode", MODES)
def test_matrix_properties_and_demo_family_ordering(mode, demo_cifs, tmp_path):
    structures = {n: str(demo_cifs[n]) for n in demo_names()}
    names, matrix = _affinity_of(structures, tmp_path, mode)
    assert names == demo_names()
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-7)
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    assert matrix.min() >= -1.0 and matrix.max() <= 1.0
    for i, name in enumerate(names):
        others = [j for j in np.argsort(-matrix[i]) if j != i]
        sibling = name[:-1] + ("b" if name.endswith("a") else "a")
        assert names[others[0]] == sibling, (name, names[others[0]], matrix[i].round(2))


def test_default_six_demo_classes_order_by_family(demo_cifs, tmp_path):
    six = ["globule_a", "globule_b", "rod_a", "rod_b", "ring_a", "ring_b"]
    names, matrix = _affinity_of({n: str(demo_cifs[n]) for n in six}, tmp_path, "all_atom", max_centres=2000)
    for i in range(0, 6, 2):
        inside = matrix[i, i + 1]
        outside = np.delete(matrix[i : i + 2], [i, i + 1], axis=1)
        assert inside > outside.max() + 0.2, matrix.round(2)


def test_centres_are_even_distinct_and_bounded():
    np.testing.assert_array_equal(centre_indices(5, 10), np.arange(5))
    idx = centre_indices(1001, 11)
    np.testing.assert_array_equal(idx, np.arange(0, 1001, 100))


def test_affinity_matrix_known_answers():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 50)) + 10.0
    descriptors = np.vstack([base, base[0]])  # row 3 duplicates row 0
    descriptors = np.hstack([descriptors, np.full((4, 5), 3.0)])  # constant features: no spread
    matrix = affinity_matrix(descriptors)
    assert np.isfinite(matrix).all()
    assert matrix[0, 3] == pytest.approx(1.0)
    assert matrix[1, 2] < 0.5
    identical = affinity_matrix(np.tile(base[:1], (3, 1)))
    np.testing.assert_allclose(identical, 1.0)
    two = affinity_matrix(base[:2])  # two classes: standardised vectors are opposite
    np.testing.assert_allclose(two, [[1.0, -1.0], [-1.0, 1.0]])


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 8), st.integers(1, 20)),
              elements=st.floats(-1e3, 1e3, allow_nan=False)))
def test_affinity_matrix_is_always_a_valid_similarity(descriptors):
    matrix = affinity_matrix(descriptors)
    n = len(descriptors)
    assert matrix.shape == (n, n)
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_array_equal(np.diag(matrix), 1.0)
    assert np.all(np.abs(matrix) <= 1.0)


def _npy(folder: Path, name: str, vector) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{name}.npy", np.asarray(vector))
    return folder / f"{name}.npy"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: [_npy(d, "a", [1.0, 2]), _npy(d, "b", [2.0, 1]), _npy(d / "x", "a", [1.0, 3])],
         r"class 'a' given twice"),
        (lambda d: [_npy(d, "a", [1.0, 2])], r"missing: \['b'\]; not a class: none"),
        (lambda d: [_npy(d, "a", [1.0, 2]), _npy(d, "b", [2.0, 1]), _npy(d, "c", [0.0, 1])],
         r"missing: none; not a class: \['c'\]"),
        (lambda d: [_npy(d, "a", [1.0, 2]), _npy(d, "b", [2.0, 1, 3])], r"different lengths \(a: 2, b: 3\)"),
        (lambda d: [_npy(d, "a", [1.0, np.nan]), _npy(d, "b", [2.0, 1])], r"a\.npy: descriptor holds NaN"),
        (lambda d: [_npy(d, "a", [[1.0, 2]]), _npy(d, "b", [2.0, 1])], r"a\.npy: expected a 1-D float vector"),
        (lambda d: [d / "a.npy", _npy(d, "b", [2.0, 1])], r"a\.npy: descriptor file does not exist"),
    ],
)
def test_bad_descriptor_sets_are_input_errors_with_no_output(tmp_path, make, message):
    paths = make(tmp_path / "in")
    config = _config({"a": "demo:rod_a", "b": "demo:ring_a"})
    with pytest.raises(InputError, match=message):
        build_affinity(config, paths, tmp_path / "out" / "a.csv", tmp_path / "out" / "a.png")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_truncated_descriptor_file_is_an_input_error(tmp_path):
    good = _npy(tmp_path, "a", np.arange(100.0))
    good.write_bytes(good.read_bytes()[:150])
    with pytest.raises(InputError, match=r"a\.npy: not a NumPy \.npy descriptor"):
        build_affinity(_config({"a": "demo:rod_a", "b": "demo:ring_a"}),
                       [good, _npy(tmp_path, "b", np.arange(100.0))], tmp_path / "a.csv", tmp_path / "a.png")
    assert not (tmp_path / "a.csv").exists()


def test_csv_round_trip_and_format(tmp_path):
    names = ["x", "y", "z"]
    matrix = affinity_matrix(np.random.default_rng(1).normal(size=(3, 6)))
    write_affinity_csv(tmp_path / "a.csv", names, matrix)
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0] == "x,y,z" and len(lines) == 4 and lines[1].startswith("1.00000000,")
    got_names, got = read_affinity_csv(tmp_path / "a.csv")
    assert got_names == names
    np.testing.assert_allclose(got, matrix, atol=1e-8)


def test_bad_affinity_csv_is_an_input_error(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b\n1.0,0.5\n")
    with pytest.raises(InputError, match=r"bad\.csv: expected a header of N class names"):
        read_affinity_csv(tmp_path / "bad.csv")
    (tmp_path / "dup.csv").write_text("a,a\n1.0,0.5\n0.5,1.0\n")
    with pytest.raises(InputError, match=r"dup\.csv: duplicate class names"):
        read_affinity_csv(tmp_path / "dup.csv")
    (tmp_path / "nan.csv").write_text("a,b\n1.0,x\n0.5,1.0\n")
    with pytest.raises(InputError, match=r"nan\.csv: line 2, column 2: expected a finite number"):
        read_affinity_csv(tmp_path / "nan.csv")
    with pytest.raises(InputError, match=r"missing\.csv: affinity CSV does not exist"):
        read_affinity_csv(tmp_path / "missing.csv")


def test_coarse_grained_without_calpha_is_an_input_error(tmp_path):
    pdb = tmp_path / "noca.pdb"
    pdb.write_text(
        "ATOM      1  N   GLY A   1       0.000   0.000   0.000  1.00 10.00           N\n"
        "ATOM      2  C   GLY A   1       2.009   1.420   0.000  1.00 10.00           C\n"
        "ATOM      3  O   GLY A   1       1.246   2.390   0.000  1.00 10.00           O\n"
        "END\n"
    )
    config = _config({"a": str(pdb), "b": "demo:rod_a"}, mode="coarse_grained")
    with pytest.raises(InputError, match=r"noca\.pdb: no C-alpha or P atoms"):
        compute_descriptor(config, pdb, tmp_path / "a.npy")
    assert not (tmp_path / "a.npy").exists()


def test_descriptor_is_deterministic_float64(demo_cifs, tmp_path):
    config = _config({"a": "demo:rod_a", "b": "demo:ring_a"})
    compute_descriptor(config, demo_cifs["rod_a"], tmp_path / "one.npy")
    compute_descriptor(config, demo_cifs["rod_a"], tmp_path / "two.npy")
    one = np.load(tmp_path / "one.npy")
    assert one.dtype == np.float64 and one.ndim == 1 and one.size == 5 * 6 * (5 * 6 + 1) // 2 * 7
    assert (tmp_path / "one.npy").read_bytes() == (tmp_path / "two.npy").read_bytes()


def test_real_hsp70_family_is_nearest_to_itself(shrec_dir, tmp_path):
    """All-atom, the ten SHREC entries: the three Hsp70 nucleotide-binding-domain entries
    (1s3x human Hsp70, 3gl1 Ssb1, 3d2f Sse1 with Hsp70) find each other first."""
    structures = {p.stem: str(p) for p in sorted((shrec_dir / "pdb").glob("*.pdb"))}
    names, matrix = _affinity_of(structures, tmp_path, "all_atom", max_centres=2000)
    hsp70 = {"1s3x", "3gl1", "3d2f"}
    for name in hsp70:
        i = names.index(name)
        nearest = names[[j for j in np.argsort(-matrix[i]) if j != i][0]]
        assert nearest in hsp70, (name, nearest, matrix[i].round(2))
