"""Reference maps: ttsim3d potentials centred on the centre of mass, resampled given maps, errors."""

from __future__ import annotations

from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import pytest

from cryovae.config import validate_config
from cryovae.errors import InputError
from cryovae.maps import apply_lowpass, make_map, read_map, resample_map, structure_to_map


def _config(**overrides) -> object:
    data = {"structures": {"a": "demo:globule_a", "b": "demo:rod_a"}, "pixel_size_angstrom": 10.0, "box_size": 32}
    data.update(overrides)
    return validate_config(data)


def _write_pdb(path: Path, atoms: list[tuple[str, float, float, float]], b_iso: float = 20.0) -> Path:
    """A one-chain PDB file with one atom per residue: (element, x, y, z) in Å."""
    st = gemmi.Structure()
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    for i, (element, x, y, z) in enumerate(atoms):
        res = gemmi.Residue()
        res.name = "UNK"
        res.seqid = gemmi.SeqId(i + 1, " ")
        atom = gemmi.Atom()
        atom.name = element
        atom.element = gemmi.Element(element)
        atom.pos = gemmi.Position(x, y, z)
        atom.b_iso = b_iso
        atom.occ = 1.0
        res.add_atom(atom)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    st.write_pdb(str(path))
    return path


def _centre_of_mass_zyx(volume: np.ndarray) -> np.ndarray:
    weights = np.clip(volume, 0, None)
    idx = np.indices(volume.shape).reshape(3, -1)
    return (idx * weights.ravel()).sum(1) / weights.sum()


def _shift(volume: np.ndarray, shift_zyx: np.ndarray) -> np.ndarray:
    """Sub-voxel shift by a Fourier phase ramp (periodic)."""
    freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in volume.shape], indexing="ij")
    phase = np.exp(-2j * np.pi * sum(f * s for f, s in zip(freqs, shift_zyx)))
    return np.fft.ifftn(np.fft.fftn(volume) * phase).real


def _cc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_structure_map_matches_the_shipped_shrec_map(shrec_dir, tmp_path):
    """ttsim3d map of 1bxn vs the shipped 10 Å map (52³, centred differently): cc 0.98 at 30 Å."""
    config = _config()
    out = tmp_path / "1bxn.mrc"
    make_map(config, "a", shrec_dir / "pdb" / "1bxn.pdb", out)
    ours, pixel = read_map(out)
    assert pixel == pytest.approx(10.0) and ours.shape == (32, 32, 32) and ours.dtype == np.float32
    np.testing.assert_allclose(_centre_of_mass_zyx(ours), [16, 16, 16], atol=0.15)

    shipped, shipped_pixel = read_map(shrec_dir / "maps_10A" / "1bxn.mrc")
    theirs = resample_map(shipped, shipped_pixel, 10.0, 32)
    theirs = _shift(theirs, _centre_of_mass_zyx(ours) - _centre_of_mass_zyx(theirs))
    cc = _cc(apply_lowpass(ours, 10.0, 30.0), apply_lowpass(theirs, 10.0, 30.0))
    assert cc > 0.95, cc  # measured 0.984; a sign error would be negative, a wrong hand ~0.2
    assert _cc(ours, theirs) > 0.85  # unfiltered: 0.94


def test_atoms_land_where_expected_with_positive_density(tmp_path):
    """A heavy atom at the centre of mass and a light one off-axis: each at its voxel, positive.

    (ttsim3d's own Fourier crop flips the sign of content at odd x offsets; this guards it.)
    """
    # Pt at the origin, C at +30 Å x, +20 Å y, -40 Å z; centre of mass ~ Pt (195 vs 12 u)
    pdb = _write_pdb(tmp_path / "two.pdb", [("Pt", 0.0, 0.0, 0.0), ("C", 30.0, 20.0, -40.0)], b_iso=10.0)
    volume = structure_to_map(pdb, 5.0, 32)
    com_xyz = np.array([30.0, 20.0, -40.0]) * 12.011 / (12.011 + 195.084)
    pt_zyx = 16 - com_xyz[::-1] / 5.0
    c_zyx = 16 + (np.array([-40.0, 20.0, 30.0]) - com_xyz[::-1]) / 5.0
    for expected in (pt_zyx, c_zyx):
        window = tuple(slice(int(round(e)) - 2, int(round(e)) + 3) for e in expected)
        local = volume[window]
        peak = np.array(np.unravel_index(np.argmax(local), local.shape)) + [w.start for w in window]
        np.testing.assert_allclose(peak, expected, atol=0.6)
        assert local.max() > 0.2 * volume.max()
    assert volume.max() == pytest.approx(volume[tuple(np.round(pt_zyx).astype(int))], rel=0.3)


def test_given_map_is_resampled_keeping_centre_of_mass_and_integral(tmp_path):
    """A 5 Å, 48³ map with an off-centre asymmetric blob, resampled into 10 Å, 32³."""
    zz, yy, xx = np.indices((48, 48, 48)).astype(float)
    blob = np.exp(-((xx - 30) ** 2 + (yy - 20) ** 2 + (zz - 26) ** 2) / (2 * 3.0**2))
    blob += 0.5 * np.exp(-((xx - 24) ** 2 + (yy - 27) ** 2 + (zz - 18) ** 2) / (2 * 4.0**2))
    given = tmp_path / "given.mrc"
    with mrcfile.new(given) as mrc:
        mrc.set_data(blob.astype(np.float32))
        mrc.voxel_size = 5.0
    config = _config(maps={"files": {"a": str(given)}})
    out = tmp_path / "a.mrc"
    make_map(config, "a", None, out)
    volume, pixel = read_map(out)
    assert pixel == pytest.approx(10.0) and volume.shape == (32, 32, 32)
    # physical centre of mass relative to the box centre (N//2), in Å
    com_in = (_centre_of_mass_zyx(blob) - 24) * 5.0
    com_out = (_centre_of_mass_zyx(volume) - 16) * 10.0
    np.testing.assert_allclose(com_out, com_in, atol=0.5)
    assert volume.sum() * 10.0**3 == pytest.approx(blob.sum() * 5.0**3, rel=0.01)


def test_lowpass_removes_fine_detail(tmp_path):
    pdb = _write_pdb(tmp_path / "one.pdb", [("S", 0.0, 0.0, 0.0)])
    sharp = structure_to_map(pdb, 5.0, 32)
    smooth = apply_lowpass(sharp, 5.0, 30.0)
    spectrum = np.abs(np.fft.rfftn(smooth))
    k = np.sqrt(sum(f**2 for f in np.meshgrid(np.fft.fftfreq(32), np.fft.fftfreq(32), np.fft.rfftfreq(32),
                                              indexing="ij")))
    assert spectrum[k > 5.0 / 30.0 + 2 / 32].max() < 1e-6 * spectrum.max()
    assert smooth.sum() == pytest.approx(sharp.sum(), rel=1e-4)


def test_structure_larger_than_the_box_is_an_error_naming_the_file(tmp_path):
    pdb = _write_pdb(tmp_path / "long.pdb", [("C", -200.0, 0.0, 0.0), ("C", 200.0, 0.0, 0.0)])
    with pytest.raises(InputError, match=r"long\.pdb.*200 Å.*box_size"):
        make_map(_config(), "a", pdb, tmp_path / "out.mrc")
    assert not (tmp_path / "out.mrc").exists()


def test_structure_beyond_the_inscribed_sphere_warns(tmp_path):
    # corners: inside the box (±150 Å per axis) but 173 Å > 150 Å from the centre
    pdb = _write_pdb(tmp_path / "corner.pdb", [("C", 100.0, 100.0, 100.0), ("C", -100.0, -100.0, -100.0)])
    with pytest.warns(UserWarning, match="inscribed"):
        make_map(_config(), "a", pdb, tmp_path / "out.mrc")


def test_unknown_element_is_an_error(tmp_path):
    pdb = _write_pdb(tmp_path / "x.pdb", [("C", 0.0, 0.0, 0.0)])
    text = pdb.read_text().replace("           C", "           X")
    pdb.write_text(text)
    with pytest.raises(InputError, match=r"x\.pdb"):
        make_map(_config(), "a", pdb, tmp_path / "out.mrc")


@pytest.mark.parametrize("kind", ["2d", "complex", "zero", "no_voxel_size"])
def test_bad_given_map_is_an_error_naming_the_file(tmp_path, kind):
    path = tmp_path / f"bad_{kind}.mrc"
    data = {
        "2d": np.ones((16, 16), np.float32),
        "complex": np.ones((8, 8, 8), np.complex64),
        "zero": np.zeros((16, 16, 16), np.float32),
        "no_voxel_size": np.ones((16, 16, 16), np.float32),
    }[kind]
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 0.0 if kind == "no_voxel_size" else 10.0
    config = _config(maps={"files": {"a": str(path)}})
    with pytest.raises(InputError, match=f"bad_{kind}"):
        make_map(config, "a", None, tmp_path / "out.mrc")
    assert not (tmp_path / "out.mrc").exists()


def test_missing_structure_is_an_error(tmp_path):
    with pytest.raises(InputError, match="nothere.cif"):
        make_map(_config(), "a", tmp_path / "nothere.cif", tmp_path / "out.mrc")


def test_written_maps_do_not_depend_on_the_clock(tmp_path, monkeypatch):
    """mrcfile stamps the creation time into a new header's label: the same map must
    still give the same bytes when written at another time."""
    import datetime as dt

    import mrcfile.mrcobject

    from cryovae.maps import write_map

    volume = np.arange(4**3, dtype=np.float32).reshape(4, 4, 4)
    for k, when in enumerate([dt.datetime(2020, 1, 1, 0, 0, 0), dt.datetime(2031, 6, 7, 8, 9, 10)]):
        clock = type("Clock", (), {"now": staticmethod(lambda when=when: when)})
        monkeypatch.setattr(mrcfile.mrcobject, "datetime", clock)
        write_map(volume, 7.5, tmp_path / f"{k}.mrc")
    assert (tmp_path / "0.mrc").read_bytes() == (tmp_path / "1.mrc").read_bytes()
    with mrcfile.open(tmp_path / "0.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, volume)
        assert float(mrc.voxel_size.x) == 7.5
