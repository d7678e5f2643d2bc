"""Structures in: local files (.gz), PDB ids (download once, cache), demo structures, cleaning, errors."""

from __future__ import annotations

import gzip
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import gemmi
import numpy as np
import pytest

from cryovae.config import validate_config
from cryovae.demo_structures import demo_names, demo_structure
from cryovae.errors import InputError
from cryovae.structures import prepare_structure, read_structure

SYNTHETIC_PDB = """\
MODEL        1
ATOM      1  N   ALA A   1       0.000   0.000   0.000  1.00 10.00           N
ATOM      2  CA  ALA A   1       1.458   0.000   0.000  1.00 10.00           C
ATOM      3  C   ALA A   1       2.009   1.420   0.000  1.00 10.00           C
ATOM      4  O   ALA A   1       1.246   2.390   0.000  1.00 10.00           O
ATOM      5  CB AALA A   1       1.988  -0.773  -1.199  0.30 10.00           C
ATOM      6  CB BALA A   1       1.900  -0.900   1.100  0.70 10.00           C
ATOM      7  H   ALA A   1      -0.500   0.800   0.000  1.00 10.00           H
HETATM    8  N   MSE A   2       3.332   1.536   0.000  1.00 10.00           N
HETATM    9  CA  MSE A   2       3.988   2.839   0.000  1.00 10.00           C
HETATM   10  C   MSE A   2       5.504   2.693   0.000  1.00 10.00           C
HETATM   11  O   MSE A   2       6.030   1.580   0.000  1.00 10.00           O
HETATM   12 SE   MSE A   2       3.500   4.500   1.500  1.00 10.00          SE
ATOM     13  N   GLY A   3       6.200   3.800   0.000  1.00 10.00           N
ATOM     14  CA  GLY A   3       7.600   3.800   0.000  1.00 10.00           C
ATOM     15  C   GLY A   3       8.200   5.200   0.000  1.00 10.00           C
ATOM     16  O   GLY A   3       7.500   6.200   0.000  1.00 10.00           O
TER
HETATM   17 ZN    ZN A 101      10.000  10.000  10.000  1.00 20.00          ZN
HETATM   18  O   HOH A 201      12.000  10.000  10.000  1.00 30.00           O
ENDMDL
MODEL        2
ATOM      1  N   ALA A   1       0.000   0.000   5.000  1.00 10.00           N
ATOM      2  CA  ALA A   1       1.458   0.000   5.000  1.00 10.00           C
ATOM      3  C   ALA A   1       2.009   1.420   5.000  1.00 10.00           C
ATOM      4  O   ALA A   1       1.246   2.390   5.000  1.00 10.00           O
ENDMDL
END
"""


def _config(structures: dict[str, str], **options) -> object:
    if len(structures) < 2:
        structures = {**structures, "other": "demo:rod_a"}
    return validate_config({"structures": structures, "structure_options": options})


@pytest.fixture()
def synthetic(tmp_path: Path) -> Path:
    path = tmp_path / "synthetic.pdb"
    path.write_text(SYNTHETIC_PDB)
    return path


def _atoms(path: Path) -> list[tuple[str, str, str]]:
    a = read_structure(path)
    return list(zip(a.residue_names.tolist(), a.atom_names.tolist(), a.elements.tolist()))


def test_cleaning_keeps_best_altloc_drops_water_ligand_hydrogen_maps_selenium(synthetic, tmp_path):
    out = tmp_path / "clean.cif"
    with pytest.warns(UserWarning, match=r"synthetic\.pdb.*mapped Se -> S \(1 atoms\)"):
        prepare_structure(_config({"x": str(synthetic)}), "x", out)
    atoms = read_structure(out)
    assert [r for r, n, e in _atoms(out)] == ["ALA"] * 5 + ["MSE"] * 5 + ["GLY"] * 4
    assert set(atoms.elements) == {"C", "N", "O", "S"}
    cb = atoms.coords_xyz_angstrom[atoms.atom_names == "CB"]
    np.testing.assert_allclose(cb, [[1.9, -0.9, 1.1]], atol=1e-3)  # altloc B, occupancy 0.7
    assert atoms.is_calpha.sum() == 3
    assert atoms.is_backbone.sum() == 12
    np.testing.assert_allclose(atoms.b_factors_angstrom2, 10.0)


def test_kept_ligand_with_unknown_element_is_dropped_with_a_warning(synthetic, tmp_path):
    out = tmp_path / "clean.cif"
    with pytest.warns(UserWarning, match=r"synthetic\.pdb.*dropped Zn \(1 atoms\)"):
        prepare_structure(_config({"x": str(synthetic)}, remove_ligands=False, remove_waters=False,
                                  remove_hydrogens=False), "x", out)
    names = _atoms(out)
    assert ("HOH", "O", "O") in names and ("ALA", "H", "H") in names
    assert not any(r == "ZN" for r, _, _ in names)


def test_model_index_selects_the_model_and_out_of_range_is_an_error(synthetic, tmp_path):
    out = tmp_path / "m2.cif"
    prepare_structure(_config({"x": str(synthetic)}, model_index=1), "x", out)
    np.testing.assert_allclose(read_structure(out).coords_xyz_angstrom[:, 2], 5.0)
    with pytest.raises(InputError, match=r"model_index is 5 but the file has 2 model"):
        prepare_structure(_config({"x": str(synthetic)}, model_index=5), "x", tmp_path / "m5.cif")
    assert not (tmp_path / "m5.cif").exists()


def test_gzipped_file_reads_the_same_as_plain(shrec_dir, tmp_path):
    source = shrec_dir / "pdb" / "3qm1.pdb"
    gz = tmp_path / "3qm1.pdb.gz"
    gz.write_bytes(gzip.compress(source.read_bytes()))
    config = _config({"plain": str(source), "gz": str(gz)})
    prepare_structure(config, "plain", tmp_path / "plain.cif")
    prepare_structure(config, "gz", tmp_path / "gz.cif")
    plain, zipped = read_structure(tmp_path / "plain.cif"), read_structure(tmp_path / "gz.cif")
    assert len(plain) == 1951  # 2236 sites less waters, ligands (Na, Cl, ferulate) and altloc B
    np.testing.assert_array_equal(plain.coords_xyz_angstrom, zipped.coords_xyz_angstrom)
    np.testing.assert_array_equal(plain.elements, zipped.elements)


def test_real_entry_with_altlocs_keeps_the_most_occupied(shrec_dir, tmp_path):
    out = tmp_path / "3gl1.cif"
    prepare_structure(_config({"x": str(shrec_dir / "pdb" / "3gl1.pdb")}), "x", out)
    atoms = read_structure(out)
    original = gemmi.read_structure(str(shrec_dir / "pdb" / "3gl1.pdb"))
    ca_a = [a for a in original[0]["A"]["17"][0] if a.name == "CA" and a.altloc == "A"][0]  # occupancy 0.6
    thr17 = (atoms.chain_ids == "A") & (atoms.atom_names == "CA")
    distances = np.linalg.norm(atoms.coords_xyz_angstrom[thr17] - np.array(ca_a.pos.tolist()), axis=1)
    assert distances.min() < 1e-3
    assert set(atoms.elements) <= {"C", "N", "O", "S"}
    assert "HOH" not in set(atoms.residue_names) and "GOL" not in set(atoms.residue_names)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.cif", b"", "structure file is empty"),
        ("junk.cif", b"garbage that is not a structure\n", "not a readable PDB or mmCIF file"),
        ("no_atoms.pdb", b"HEADER    NOTHING HERE\nEND\n", "no atoms found"),
    ],
)
def test_bad_files_raise_input_error_and_leave_no_output(tmp_path, name, content, message):
    bad = tmp_path / name
    bad.write_bytes(content)
    out = tmp_path / "out.cif"
    with pytest.raises(InputError, match=message):
        prepare_structure(_config({"x": str(bad)}), "x", out)
    assert list(tmp_path.iterdir()) == [bad]


def test_truncated_gzip_and_truncated_pdb_are_errors(shrec_dir, tmp_path):
    data = gzip.compress((shrec_dir / "pdb" / "3qm1.pdb").read_bytes())
    truncated = tmp_path / "t.pdb.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"t\.pdb\.gz: truncated or corrupt gzip"):
        prepare_structure(_config({"x": str(truncated)}), "x", tmp_path / "out.cif")
    cut = tmp_path / "cut.pdb"
    text = (shrec_dir / "pdb" / "3qm1.pdb").read_text()
    cut.write_text(text[: text.index("ATOM    993") + 30])
    with pytest.raises(InputError, match=r"cut\.pdb: not a readable.*too short"):
        prepare_structure(_config({"x": str(cut)}), "x", tmp_path / "out.cif")
    assert not (tmp_path / "out.cif").exists()


def test_missing_file_and_unknown_spec_name_what_was_expected(tmp_path):
    with pytest.raises(InputError, match=r"structures\.x: nope/missing\.pdb\n.*4-character PDB id.*demo:NAME"):
        _config({"x": "nope/missing.pdb"})   # caught when the config is validated
    gone = tmp_path / "gone.pdb"
    gone.write_text("")
    config = _config({"x": str(gone)})
    gone.unlink()                            # and if it goes after that, when it is read
    with pytest.raises(InputError, match=r"gone\.pdb': no such file.*4-character PDB id.*demo:NAME"):
        prepare_structure(config, "x", tmp_path / "out.cif")
    with pytest.raises(InputError, match=r"class 'y' is not a key of structures"):
        prepare_structure(_config({"x": "demo:rod_a"}), "y", tmp_path / "out.cif")
    assert not (tmp_path / "out.cif").exists()


class _Server:
    """A threaded HTTP server on 127.0.0.1 serving one folder and counting GET requests."""

    def __init__(self, folder: Path):
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/download"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)


@pytest.fixture()
def pdb_server(tmp_path: Path) -> Iterator[_Server]:
    served = tmp_path / "served" / "download"
    served.mkdir(parents=True)
    st = demo_structure("ell_a")
    doc = st.make_mmcif_document()
    (served / "9XYZ.cif.gz").write_bytes(gzip.compress(doc.as_string().encode()))
    server = _Server(served.parent)
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def test_pdb_id_is_downloaded_once_then_read_from_the_cache(pdb_server, tmp_path):
    cache = tmp_path / "cache"
    config = _config({"x": "9xyz"}, cache_dir=str(cache), pdb_server=pdb_server.url)
    prepare_structure(config, "x", tmp_path / "first.cif")
    assert pdb_server.requests == ["/download/9XYZ.cif.gz"]
    assert sorted(p.name for p in cache.iterdir()) == ["9XYZ.cif.gz"]
    prepare_structure(config, "x", tmp_path / "second.cif")
    assert len(pdb_server.requests) == 1
    first, second = read_structure(tmp_path / "first.cif"), read_structure(tmp_path / "second.cif")
    np.testing.assert_array_equal(first.coords_xyz_angstrom, second.coords_xyz_angstrom)
    assert len(first) == sum(1 for ch in demo_structure("ell_a")[0] for r in ch for _ in r)


def test_unknown_pdb_id_names_the_http_error(pdb_server, tmp_path):
    config = _config({"x": "8abc"}, cache_dir=str(tmp_path / "cache"), pdb_server=pdb_server.url)
    with pytest.raises(InputError, match=r"PDB entry 8ABC: .*HTTP 404"):
        prepare_structure(config, "x", tmp_path / "out.cif")
    assert not (tmp_path / "out.cif").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_offline_download_error_says_where_to_put_the_file(tmp_path):
    closed = _Server(tmp_path)  # bound, never serving, then closed: connections are refused
    url = closed.url
    closed.httpd.server_close()
    cache = tmp_path / "cache"
    config = _config({"x": "1bxn"}, cache_dir=str(cache), pdb_server=url)
    with pytest.raises(InputError) as err:
        prepare_structure(config, "x", tmp_path / "out.cif")
    message = str(err.value)
    assert "PDB entry 1BXN" in message and f"put it at {cache / '1BXN.cif.gz'}" in message
    assert not (tmp_path / "out.cif").exists()


def test_cache_dir_tilde_is_expanded(pdb_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = _config({"x": "9XYZ"}, cache_dir="~/pdbcache", pdb_server=pdb_server.url)
    prepare_structure(config, "x", tmp_path / "out.cif")
    assert (tmp_path / "home" / "pdbcache" / "9XYZ.cif.gz").is_file()


def test_demo_names_and_unknown_demo():
    names = demo_names()
    for family in ("globule", "rod", "ring", "ell"):
        assert f"{family}_a" in names and f"{family}_b" in names
    with pytest.raises(InputError, match=r"demo:blob: unknown demo structure; available: ell_a, ell_b"):
        demo_structure("blob")


def test_demo_structures_are_deterministic(tmp_path):
    config = _config({"x": "demo:ell_a"})
    prepare_structure(config, "x", tmp_path / "one.cif")
    prepare_structure(config, "x", tmp_path / "two.cif")
    assert (tmp_path / "one.cif").read_bytes() == (tmp_path / "two.cif").read_bytes()


@pytest.mark.parametrize("name", ["globule_a", "rod_b", "ring_a", "ell_b"])
def test_demo_structure_is_protein_like(name, tmp_path):
    prepare_structure(_config({"x": f"demo:{name}"}), "x", tmp_path / "d.cif")
    atoms = read_structure(tmp_path / "d.cif")
    assert 3000 <= len(atoms) <= 12000
    fraction = {e: float(np.mean(atoms.elements == e)) for e in ("C", "N", "O", "S")}
    assert 0.59 < fraction["C"] < 0.67 and 0.14 < fraction["N"] < 0.21
    assert 0.16 < fraction["O"] < 0.23 and 0.001 < fraction["S"] < 0.02
    assert sum(fraction.values()) == pytest.approx(1.0)
    ca = atoms.coords_xyz_angstrom[atoms.is_calpha]
    same_chain = atoms.chain_ids[atoms.is_calpha][1:] == atoms.chain_ids[atoms.is_calpha][:-1]
    step = np.linalg.norm(np.diff(ca, axis=0), axis=1)[same_chain]
    assert np.all(np.abs(step - 3.8) < 0.3)
    extent = np.ptp(atoms.coords_xyz_angstrom, axis=0)
    assert 110 <= extent.max() <= 260
    assert 10 <= atoms.b_factors_angstrom2.min() and atoms.b_factors_angstrom2.max() <= 120
    assert atoms.is_backbone.sum() == 4 * atoms.is_calpha.sum()
    centred = atoms.coords_xyz_angstrom - atoms.coords_xyz_angstrom.mean(axis=0)
    spread = np.sqrt(np.linalg.eigvalsh(centred.T @ centred / len(centred)))
    assert np.min(np.diff(spread)) > 0.5  # no two equal principal axes: the pose is defined


def test_demo_variant_b_is_a_deformed_a():
    def ca_of(name):
        st = demo_structure(name)
        return {(ch.name, r.seqid.num): np.array(r["CA"][0].pos.tolist()) for ch in st[0] for r in ch}

    a, b = ca_of("ring_a"), ca_of("ring_b")
    shared = sorted(set(a) & set(b))
    assert len(shared) > 0.9 * len(a)
    a_xyz, b_xyz = np.array([a[k] for k in shared]), np.array([b[k] for k in shared])
    shift = np.linalg.norm(a_xyz - b_xyz, axis=1)
    assert 1.0 < np.median(shift) < 15.0
