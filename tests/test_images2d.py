"""2D image stacks in, split folders out: every reader, labels, the split round trip, errors, the verbs."""

import json

import mrcfile
import numpy as np
import pytest
import tifffile
from PIL import Image

from cryovae.affinity import read_affinity_csv
from cryovae.cli import main
from cryovae.errors import InputError
from cryovae.glyphs import canonical_glyphs, shape_affinity
from cryovae.images2d import read_image_stack, read_labels, write_image_split
from cryovae.model.data import ParticleData
from cryovae.rotations import relion_euler_to_matrix
from cryovae.shards import read_particles_star

STRUCTURES = {"a": "demo:globule_a", "b": "demo:rod_a"}


def _stack(n=3, h=6, w=5, seed=0):
    return np.random.default_rng(seed).normal(size=(n, h, w)).astype(np.float32)


def test_mrc_2d_is_one_image_and_3d_a_stack(tmp_path):
    stack = _stack()
    mrcfile.new(tmp_path / "s.mrcs", data=stack).close()
    mrcfile.new(tmp_path / "one.mrc", data=stack[1]).close()
    assert np.array_equal(read_image_stack(tmp_path / "s.mrcs"), stack)
    one = read_image_stack(tmp_path / "one.mrc")
    assert one.shape == (1, 6, 5) and np.array_equal(one[0], stack[1])


def test_multipage_tiff_and_colour_pages_in_grey(tmp_path):
    stack = (_stack() * 100).astype(np.int16)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    out = read_image_stack(tmp_path / "s.tif")
    assert out.dtype == np.float32 and np.array_equal(out, stack.astype(np.float32))
    rgb = np.zeros((4, 3, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 200, 50
    tifffile.imwrite(tmp_path / "rgb.tiff", rgb, photometric="rgb")
    grey = read_image_stack(tmp_path / "rgb.tiff")
    assert grey.shape == (1, 4, 3) and np.allclose(grey, 0.299 * 100 + 0.587 * 200 + 0.114 * 50, atol=1e-4)
    pages = [Image.fromarray(np.full((4, 5), v, np.uint8)) for v in (9, 8, 7)]  # pages of another writer
    pages[0].save(tmp_path / "pil.tif", save_all=True, append_images=pages[1:])
    assert read_image_stack(tmp_path / "pil.tif")[:, 2, 3].tolist() == [9, 8, 7]
    with tifffile.TiffWriter(tmp_path / "ragged.tif") as tif:
        tif.write(np.zeros((4, 5), np.uint8))
        tif.write(np.zeros((4, 6), np.uint8))
    with pytest.raises(InputError, match=r"ragged.tif: page 1 \(0-based\) of shape \(4, 6\) differs"):
        read_image_stack(tmp_path / "ragged.tif")


def test_npy_stack_and_single_image(tmp_path):
    stack = _stack()
    np.save(tmp_path / "s.npy", stack)
    np.save(tmp_path / "one.npy", stack[0].astype(np.float64))
    assert np.array_equal(read_image_stack(tmp_path / "s.npy"), stack)
    assert np.array_equal(read_image_stack(tmp_path / "one.npy"), stack[:1])


def test_folder_of_images_sorted_by_name_in_grey(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    values = {"b.png": 10, "a.png": 200, "c.tif": 7}
    for name, value in values.items():
        Image.fromarray(np.full((4, 5), value, np.uint8)).save(folder / name)
    Image.fromarray(np.full((4, 5, 3), (255, 0, 0), np.uint8)).save(folder / "d.png")  # colour -> grey
    Image.fromarray(np.full((4, 5), 40000, np.uint16)).save(folder / "e.tif")  # 16-bit kept whole
    (folder / "notes.txt").write_text("not an image")
    out = read_image_stack(folder)
    assert out[:, 0, 0].tolist() == [200, 10, 7, 76, 40000]  # a, b, c, d (0.299 * 255), e


def test_imagefolder_layout_gives_images_and_labels_in_one_order(tmp_path):
    folder = tmp_path / "data"
    for cls, values in {"hearts": [1, 2], "clubs": [3]}.items():
        (folder / cls).mkdir(parents=True)
        for k, v in enumerate(values):
            Image.fromarray(np.full((3, 3), v, np.uint8)).save(folder / cls / f"{k}.png")
    images = read_image_stack(folder)
    assert images[:, 0, 0].tolist() == [3, 1, 2]  # clubs/0, hearts/0, hearts/1
    assert read_labels(folder, 3) == ["clubs", "hearts", "hearts"]


def test_labels_from_csv_columns_text_lines_or_none(tmp_path):
    (tmp_path / "a.csv").write_text("index,class\n0,hearts\n1, clubs\n2,unknown\n")
    (tmp_path / "b.csv").write_text("rlnClassName,score\nA,1\nB,2\nA,3\n")
    (tmp_path / "c.txt").write_text("x\ny\nz\n\n")
    assert read_labels(tmp_path / "a.csv", 3) == ["hearts", "clubs", "unknown"]
    assert read_labels(tmp_path / "b.csv", 3) == ["A", "B", "A"]
    assert read_labels(tmp_path / "c.txt", 3) == ["x", "y", "z"]
    assert read_labels(None, 2) == ["unknown", "unknown"]


@pytest.mark.parametrize("content, name, message", [
    ("class\na\nb\n", "l.csv", r"l.csv: 2 labels for 3 images"),
    ("name,value\na,1\n", "l.csv", r"l.csv: expected one class column named one of class"),
    ("a\n\nb\nc\n", "l.txt", r"l.txt: line 2: empty class name"),
])
def test_bad_labels_name_the_file_and_what_was_expected(tmp_path, content, name, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=message):
        read_labels(tmp_path / name, 3)


def test_bad_stacks_name_the_file_and_what_was_expected(tmp_path):
    with pytest.raises(InputError, match="missing.mrcs: image stack does not exist"):
        read_image_stack(tmp_path / "missing.mrcs")
    np.save(tmp_path / "4d.npy", np.zeros((2, 2, 3, 3)))
    with pytest.raises(InputError, match=r"4d.npy: expected one image \(H, W\) or a stack \(n, H, W\)"):
        read_image_stack(tmp_path / "4d.npy")
    bad = _stack()
    bad[2, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(InputError, match="nan.npy: image 2 .* NaN or infinite"):
        read_image_stack(tmp_path / "nan.npy")
    (tmp_path / "mixed").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "mixed" / "a.png")
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(InputError, match=r"b.png: image of 5 x 4 pixels .* differs from a.png's 4 x 4"):
        read_image_stack(tmp_path / "mixed")
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(InputError, match=r"x.jpg: unknown image format '.jpg'"):
        read_image_stack(tmp_path / "x.jpg")


def test_split_round_trip_through_particle_data_with_poses(tmp_path):
    images = _stack(n=7, h=8, w=8, seed=3)
    names = ["hearts", "clubs", "unknown", "hearts", "clubs", "clubs", "hearts"]
    psi = np.linspace(-170, 170, 7)
    shift = np.random.default_rng(1).uniform(-2, 2, (7, 2))
    folder = tmp_path / "train"
    write_image_split(folder, images, names, ["clubs", "hearts"], 2.5, 3, psi, shift,
                      extra_columns={"cryovaeScale": np.full(7, 1.1)})
    data = ParticleData.open(folder, ["clubs", "hearts"])
    assert data.spatial_shape == (8, 8) and data.pixel_size_angstrom == 2.5 and len(data) == 7
    assert data.source.particles["cryovaeParticleId"].tolist()[:2] == ["train_000000", "train_000001"]
    assert np.array_equal(data.read(np.arange(7)), images)  # three shards of at most 3, rows in order
    assert np.array_equal(data.read(np.array([6, 0, 4])), images[[6, 0, 4]])
    assert data.class_index.tolist() == [1, 0, -1, 1, 0, 0, 1]
    assert np.allclose(data.true_rotation, relion_euler_to_matrix(np.stack([0 * psi, 0 * psi, psi], 1)), atol=1e-6)
    assert np.allclose(data.true_shift_voxels[:, :2], shift, atol=1e-5) and np.all(data.true_shift_voxels[:, 2] == 0)
    particles, optics = read_particles_star(folder / "particles.star")
    assert particles["rlnClassNumber"].tolist() == [2, 1, 0, 2, 1, 1, 2]
    assert particles["cryovaeShard"].tolist() == ["shard_000.npy"] * 3 + ["shard_001.npy"] * 3 + ["shard_002.npy"]
    assert np.allclose(particles["rlnOriginXAngst"], -shift[:, 0] * 2.5, atol=1e-5)
    assert particles["cryovaeScale"].tolist() == [1.1] * 7
    assert optics["rlnImageDimensionality"].tolist() == [2] and optics["rlnImageSize"].tolist() == [8]


def test_normalised_split_and_no_half_written_folder(tmp_path):
    images = _stack(n=4, h=6, w=6) * 5 + 3
    write_image_split(tmp_path / "n", images, ["a"] * 4, ["a"], 1.0, 10, normalise=True)
    data = ParticleData.open(tmp_path / "n", ["a"]).read(np.arange(4))
    assert np.allclose(data.mean(axis=(1, 2)), 0, atol=1e-6) and np.allclose(data.std(axis=(1, 2)), 1, atol=1e-5)
    assert not ParticleData.open(tmp_path / "n", ["a"]).has_poses
    with pytest.raises(InputError, match=r"class name\(s\) \['b'\] are not among the classes \['a'\]"):
        write_image_split(tmp_path / "bad", images, ["a", "b", "a", "a"], ["a"], 1.0, 10)
    assert not (tmp_path / "bad").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["n"]


def _config(tmp_path, images: dict) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"structures": STRUCTURES, "seed": 4, "images": images}))
    return str(path)


def test_make_images_writes_a_seeded_split_with_its_truth(tmp_path):
    splits = {"train": {"per_class": 3, "rotation_deg": [-5, 5], "shear_deg": 15, "scale": [1.0, 1.3]},
              "unlabelled": {"per_class": 4, "rotation_deg": [-60, 60], "translation": 0.1, "labelled": False}}
    config = _config(tmp_path, {"classes": ["hearts", "spades"], "splits": splits})
    for split in ("train", "unlabelled"):
        assert main(["make-images", "--config", config, "--split", split, "--output-dir",
                     str(tmp_path / split)]) == 0
    train = ParticleData.open(tmp_path / "train", ["hearts", "spades"])
    assert sorted(train.class_index.tolist()) == [0, 0, 0, 1, 1, 1] and train.has_poses
    psi = train.source.particles["rlnAnglePsi"].to_numpy()
    assert np.abs(psi).max() <= 5 and np.abs(train.true_shift_voxels).max() == 0
    unlabelled = ParticleData.open(tmp_path / "unlabelled", ["hearts", "spades"])
    assert (unlabelled.class_index == -1).all() and unlabelled.spatial_shape == (48, 48)
    truth = unlabelled.source.particles["cryovaeTrueClassName"].tolist()
    assert sorted(truth) == ["hearts"] * 4 + ["spades"] * 4
    # the same config and split name give the same bytes; the montage is a real picture
    again = tmp_path / "again"
    assert main(["make-images", "--config", config, "--split", "train", "--output-dir", str(again)]) == 0
    for name in ("shard_000.npy", "particles.star", "montage.png"):
        assert (again / name).read_bytes() == (tmp_path / "train" / name).read_bytes()
    with Image.open(tmp_path / "train" / "montage.png") as montage:
        assert min(montage.size) > 100
    assert main(["make-images", "--config", config, "--split", "test", "--output-dir", str(tmp_path / "t")]) == 2


def test_import_images_reads_the_users_stack_and_labels(tmp_path):
    stack = _stack(n=5, h=10, w=10)
    np.save(tmp_path / "stack.npy", stack)
    (tmp_path / "labels.csv").write_text("class\nring\nrod\nring\nunknown\nrod\n")
    splits = {"mine": {"images": str(tmp_path / "stack.npy"), "labels": str(tmp_path / "labels.csv")}}
    config = _config(tmp_path, {"kind": "files", "pixel_size_angstrom": 3.0, "splits": splits})
    assert main(["import-images", "--config", config, "--split", "mine", "--output-dir", str(tmp_path / "mine")]) == 0
    data = ParticleData.open(tmp_path / "mine", ["ring", "rod"])  # class order: the sorted names
    assert data.class_index.tolist() == [0, 1, 0, -1, 1] and not data.has_poses
    assert np.array_equal(data.read(np.arange(5)), stack) and data.pixel_size_angstrom == 3.0
    assert main(["make-images", "--config", config, "--split", "mine", "--output-dir", str(tmp_path / "x")]) == 2


def test_image_affinity_writes_the_project_affinity_csv(tmp_path):
    config = _config(tmp_path, {"kind": "alphanumeric", "classes": ["O", "0", "X"]})
    csv, plot = tmp_path / "aff.csv", tmp_path / "aff.png"
    assert main(["image-affinity", "--config", config, "--csv", str(csv), "--plot", str(plot)]) == 0
    names, matrix = read_affinity_csv(csv)
    assert names == ["O", "0", "X"]
    expected = shape_affinity(canonical_glyphs("alphanumeric", ["O", "0", "X"]))
    assert np.allclose(matrix, expected, atol=1e-7) and matrix[0, 1] > matrix[0, 2]
