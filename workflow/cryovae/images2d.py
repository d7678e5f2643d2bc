"""2D image data as cryovae splits: read the user's image stacks and labels, write split folders.

A 2D split folder has the layout of :mod:`cryovae.shards` with images for volumes:

- ``shard_{k:03d}.npy``: float32 (n_k, H, W) in (y, x) order;
- ``particles.star``: one row per image in shard order, with ``cryovaeParticleId``,
  ``cryovaeShard``, ``cryovaeIndex``, ``cryovaeClassName`` (``unknown`` when unlabelled),
  ``rlnClassNumber`` (1-based in the class order, 0 unknown); for generated data the true
  in-plane pose as RELION writes it for 2D: ``rlnAngleRot = rlnAngleTilt = 0``,
  ``rlnAnglePsi`` (so that ``relion_euler_to_matrix`` is a rotation about z) and
  ``rlnOriginX/YAngst = -shift_px × pixel size``, ``rlnOriginZAngst = 0``; plus any extra
  columns (generated data: ``cryovaeShearXDeg``, ``cryovaeShearYDeg``, ``cryovaeScale``, and
  ``cryovaeTrueClassName`` where the split is unlabelled but the truth is known);
- a ``data_optics`` block with ``rlnImagePixelSize``, ``rlnImageSize`` (the width) and
  ``rlnImageDimensionality`` 2;
- ``montage.png``: a few images of each class, to look at.

``cryovae.model.data.ParticleData.open`` reads such a folder as it reads a 3D one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cryovae.atomic import atomic_dir, atomic_path
from cryovae.errors import InputError

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
STACK_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", ".npy")
FOLDER_IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
LABEL_COLUMNS = ("class", "label", "class_name", "classname", "rlnclassname", "cryovaeclassname")
"""Accepted (case-insensitive) names of the class column of a labels CSV."""
MONTAGE_PER_CLASS = 8
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's convert("L")


# ----------------------------------------------------------------------------- reading images


def read_image_stack(path: str | Path) -> np.ndarray:
    """Images of a stack file or folder as (n, H, W) float32, in (y, x) order.

    - ``.mrc``/``.mrcs``: a 2D MRC is one image, a 3D one a stack along z;
    - ``.tif``/``.tiff``: one image per page (multi-page); colour pages become grey (ITU-R 601 luma);
    - ``.npy``: (n, H, W) or one (H, W) image;
    - a folder: its ``.png``/``.tif``/``.tiff`` files sorted by name, each one greyscale image
      (PIL); or, with no images at its top, one subfolder per class (ImageFolder style),
      subfolders and files sorted by name (see :func:`read_labels`).

    InputError, naming the file, for a missing path, an unknown format, wrong dimensions,
    images of different sizes, no images, or NaN/infinite values.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: image stack does not exist")
    if path.is_dir():
        files = [file for file, _ in image_folder_files(path)]
        images = _stack_same_size([_read_single_image(file) for file in files], files)
    else:
        suffix = path.suffix.lower()
        readers = {".mrc": _read_mrc, ".mrcs": _read_mrc, ".tif": _read_tiff, ".tiff": _read_tiff, ".npy": _read_npy}
        if suffix not in readers:
            raise InputError(f"{path}: unknown image format {suffix!r}; expected a folder of images or one of "
                             f"{', '.join(STACK_SUFFIXES)}")
        images = readers[suffix](path)
    return _checked(images, path)


def _checked(images: np.ndarray, path: Path) -> np.ndarray:
    if np.iscomplexobj(images) or not (np.issubdtype(images.dtype, np.number) or images.dtype == bool):
        raise InputError(f"{path}: expected real-valued images, got {images.dtype}")
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise InputError(f"{path}: expected one image (H, W) or a stack (n, H, W), got shape {images.shape}")
    if images.shape[0] == 0 or min(images.shape[1:]) < 2:
        raise InputError(f"{path}: expected at least one image of at least 2 x 2 pixels, got shape {images.shape}")
    images = images.astype(np.float32)
    bad = ~np.isfinite(images).all(axis=(1, 2))
    if bad.any():
        raise InputError(f"{path}: image {int(np.nonzero(bad)[0][0])} (0-based) holds NaN or infinite values "
                         f"({int(bad.sum())} image(s) in all)")
    return images


def _read_mrc(path: Path) -> np.ndarray:
    import mrcfile

    try:
        with mrcfile.open(path, permissive=False) as mrc:
            return np.array(mrc.data)
    except ValueError as err:
        raise InputError(f"{path}: not a readable MRC file ({err})") from None


def _read_tiff(path: Path) -> np.ndarray:
    """All pages of a TIFF: its one series as stored, or (several series) the pages stacked; colour in grey."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.series) == 1:
                series = tif.series[0]
                return _grey(series.asarray(), series.axes, path)
            pages = [_grey(page.asarray(), page.axes, path) for page in tif.pages]
    except (tifffile.TiffFileError, ValueError, IndexError) as err:
        raise InputError(f"{path}: not a readable TIFF file ({err})") from None
    for k, page in enumerate(pages):
        if page.shape != pages[0].shape:
            raise InputError(f"{path}: page {k} (0-based) of shape {page.shape} differs from page 0's "
                             f"{pages[0].shape}; all images of a stack must be one size")
    return np.stack(pages)


def _grey(data: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """TIFF data with tifffile's axes labels; colour samples (axis S) become grey as PIL does (ITU-R 601)."""
    if "S" not in axes:
        return data
    samples = axes.index("S")
    if data.shape[samples] not in (3, 4):
        raise InputError(f"{path}: expected greyscale, RGB or RGBA pages, got {data.shape[samples]} samples")
    return np.tensordot(np.moveaxis(data, samples, -1)[..., :3].astype(np.float64), _LUMA, axes=([-1], [0]))


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"{path}: not a NumPy .npy array ({err})") from None


def _read_single_image(path: Path) -> np.ndarray:
    """One greyscale image of a folder (PIL): 8- and 16-bit, float, palette and colour files."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:
                raise InputError(f"{path}: a multi-page file in a folder of images; give the stack file itself")
            if image.mode in ("I", "F") or image.mode.startswith("I;"):
                return np.asarray(image, dtype=np.float64)
            return np.asarray(image.convert("L"), dtype=np.float64)
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{path}: not a readable image ({err})") from None


def _stack_same_size(images: list[np.ndarray], files: list[Path]) -> np.ndarray:
    first = images[0].shape
    for image, file in zip(images, files):
        if image.shape != first:
            raise InputError(f"{file}: image of {image.shape[0]} x {image.shape[1]} pixels (H x W) differs from "
                             f"{files[0].name}'s {first[0]} x {first[1]}; all images of a stack must be one size")
    return np.stack(images)


def image_folder_files(folder: str | Path) -> list[tuple[Path, str | None]]:
    """(image file, class folder name or None) of a folder of images, in reading order.

    Images at the top (sorted by name) come with class None; a folder with none at its top
    and one subfolder per class gives each subfolder's images (subfolders, then files, sorted
    by name) with the subfolder's name.  InputError when there are no images, or both.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: image folder does not exist")

    def images_in(directory: Path) -> list[Path]:
        return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in FOLDER_IMAGE_SUFFIXES)

    top = images_in(folder)
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if top and any(images_in(c) for c in classes):
        raise InputError(f"{folder}: holds images both at its top and in subfolders; expected one or the other "
                         "(a flat folder of images, or one subfolder of images per class)")
    if top:
        return [(p, None) for p in top]
    pairs = [(p, c.name) for c in classes for p in images_in(c)]
    if not pairs:
        raise InputError(f"{folder}: no {'/'.join(FOLDER_IMAGE_SUFFIXES)} images in it or in its subfolders")
    return pairs


# ----------------------------------------------------------------------------- labels


def read_labels(path: str | Path | None, n: int) -> list[str]:
    """One class name per image: (n,) list of str; ``unknown`` marks an unlabelled image.

    - None: every image ``unknown``;
    - a folder of class subfolders (ImageFolder style): each image's subfolder name, in the
      order of :func:`read_image_stack`;
    - a ``.csv`` file: the column named ``class`` (or label, class_name, rlnClassName,
      cryovaeClassName; any case), one row per image;
    - any other text file: one class name per line.

    InputError naming the file (and line) for a missing file, no class column, an empty
    name, or a count other than ``n``.
    """
    if path is None:
        return [UNKNOWN] * n
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: labels file does not exist")
    if path.is_dir():
        pairs = image_folder_files(path)
        if any(name is None for _, name in pairs):
            raise InputError(f"{path}: a flat folder of images has no labels; put each class's images in a "
                             "subfolder named after the class, or give a labels file")
        labels = [name for _, name in pairs]
    elif path.suffix.lower() == ".csv":
        labels = _csv_labels(path)
    else:
        labels = _text_labels(path)
    if len(labels) != n:
        raise InputError(f"{path}: {len(labels)} labels for {n} images; expected one class name per image")
    return labels


def _csv_labels(path: Path) -> list[str]:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"{path}: not a readable CSV file ({err})") from None
    columns = [c for c in table.columns if str(c).strip().lower() in LABEL_COLUMNS]
    if len(columns) != 1:
        raise InputError(f"{path}: expected one class column named one of {', '.join(LABEL_COLUMNS)} (any case); "
                         f"found columns {list(table.columns)}")
    labels = [str(v).strip() for v in table[columns[0]]]
    empty = [i for i, v in enumerate(labels) if not v]
    if empty:
        raise InputError(f"{path}: line {empty[0] + 2}: empty class name (write {UNKNOWN} for an unlabelled image)")
    return labels


def _text_labels(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not a text file of class names ({err})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    labels = [line.strip() for line in lines]
    empty = [i for i, v in enumerate(labels) if not v]
    if empty:
        raise InputError(f"{path}: line {empty[0] + 1}: empty class name (write {UNKNOWN} for an unlabelled image)")
    return labels


def label_names(path: str | Path | None) -> list[str]:
    """The distinct class names a labels source gives, sorted, without ``unknown`` (no image count needed)."""
    if path is None:
        return []
    path = Path(path)
    if path.is_dir():
        names = [name for _, name in image_folder_files(path) if name is not None]
    elif not path.exists():
        raise InputError(f"{path}: labels file does not exist")
    else:
        names = _csv_labels(path) if path.suffix.lower() == ".csv" else _text_labels(path)
    return sorted(set(names) - {UNKNOWN})


# ----------------------------------------------------------------------------- writing a split


def write_image_split(
    folder: str | Path,
    images: np.ndarray,
    class_names_per_image: Sequence[str],
    classes_in_order: Sequence[str],
    pixel_size_angstrom: float,
    particles_per_shard: int,
    psi_deg: np.ndarray | None = None,
    shift_px: np.ndarray | None = None,
    extra_columns: Mapping[str, Sequence] | None = None,
    normalise: bool = False,
    montage_labels: Sequence[str] | None = None,
    split_name: str | None = None,
) -> None:
    """Write (n, H, W) ``images`` as a 2D split folder (module docstring), all at once or not at all.

    class_names_per_image (n,): a name of ``classes_in_order`` or ``unknown``; psi_deg (n,) and
    shift_px (n, 2) (x, y, content displacement in pixels): the true in-plane pose, written as
    rlnAnglePsi and rlnOriginX/YAngst = -shift_px × pixel size (either may be given alone: the
    other is then zero); extra_columns: name -> (n,) values appended to the particle table;
    ``normalise``: zero mean, unit variance per image (a constant image only loses its mean).
    The montage shows rows of ``montage_labels`` (n,) if given (e.g. the truth of an unlabelled
    split), else of the class names.  Ids are ``{split_name}_{index:06d}`` (default: the folder's name).
    """
    folder = Path(folder)
    images = np.asarray(images)
    n = len(images)
    if images.ndim != 3 or n == 0:
        raise InputError(f"{folder}: expected images (n, H, W) with n >= 1, got shape {images.shape}")
    if not np.isfinite(images).all():
        raise InputError(f"{folder}: images hold NaN or infinite values")
    if particles_per_shard < 1 or not pixel_size_angstrom > 0:
        raise InputError(f"{folder}: expected particles_per_shard >= 1 and pixel size > 0, got "
                         f"{particles_per_shard} and {pixel_size_angstrom}")
    table = _particle_table(split_name or folder.name, n, particles_per_shard, class_names_per_image, classes_in_order, folder)
    if psi_deg is not None or shift_px is not None:
        for name, values in _pose_columns(n, psi_deg, shift_px, pixel_size_angstrom).items():
            table[name] = values
    for name, values in (extra_columns or {}).items():
        if len(values) != n:
            raise InputError(f"{folder}: extra column {name} has {len(values)} values for {n} images")
        table[name] = np.asarray(values)
    table["rlnOpticsGroup"] = 1
    data = normalise_images(images) if normalise else images.astype(np.float32)
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnImagePixelSize": [float(pixel_size_angstrom)], "rlnImageSize": [int(images.shape[2])],
        "rlnImageDimensionality": [2],
    })
    from cryovae.plots import plot_image_montage
    from cryovae.star import write_star_blocks

    with atomic_dir(folder) as tmp:
        for k, start in enumerate(range(0, n, particles_per_shard)):
            with atomic_path(tmp / f"shard_{k:03d}.npy") as shard_tmp:
                np.save(shard_tmp, np.ascontiguousarray(data[start:start + particles_per_shard], dtype="<f4"))
        write_star_blocks({"optics": optics, "particles": table}, tmp / "particles.star")
        rows = list(class_names_per_image if montage_labels is None else montage_labels)
        plot_image_montage(tmp / "montage.png", data, rows, list(classes_in_order), MONTAGE_PER_CLASS,
                           title=f"{split_name or folder.name}: {n} images of {images.shape[1]} x {images.shape[2]} px")
    log.info("%s: %d images of %d x %d px in %d shard(s)", folder, n, images.shape[1], images.shape[2],
             -(-n // particles_per_shard))


def _particle_table(split: str, n: int, per_shard: int, names: Sequence[str], classes: Sequence[str],
                    folder: Path) -> pd.DataFrame:
    names = [str(v) for v in names]
    if len(names) != n:
        raise InputError(f"{folder}: {len(names)} class names for {n} images")
    number = {name: i + 1 for i, name in enumerate(classes)}
    number[UNKNOWN] = 0
    stray = sorted({v for v in names if v not in number})
    if stray:
        raise InputError(f"{folder}: class name(s) {stray} are not among the classes {list(classes)} "
                         f"(or {UNKNOWN!r})")
    index = np.arange(n)
    return pd.DataFrame({
        "cryovaeParticleId": [f"{split}_{i:06d}" for i in index],
        "cryovaeShard": [f"shard_{k:03d}.npy" for k in index // per_shard],
        "cryovaeIndex": index % per_shard,
        "cryovaeClassName": names,
        "rlnClassNumber": [number[v] for v in names],
    })


def _pose_columns(n: int, psi_deg, shift_px, pixel_size_angstrom: float) -> dict[str, np.ndarray]:
    """RELION columns of in-plane poses: rot = tilt = 0, psi; origins = -shift × pixel size, z = 0."""
    psi = np.zeros(n) if psi_deg is None else np.asarray(psi_deg, np.float64).reshape(-1)
    shift = np.zeros((n, 2)) if shift_px is None else np.asarray(shift_px, np.float64)
    if psi.shape != (n,) or shift.shape != (n, 2) or not (np.isfinite(psi).all() and np.isfinite(shift).all()):
        raise InputError(f"poses: expected finite psi_deg (n,) and shift_px (n, 2) for n = {n}, got shapes "
                         f"{psi.shape} and {shift.shape}")
    origin = -shift * pixel_size_angstrom
    return {"rlnAngleRot": np.zeros(n), "rlnAngleTilt": np.zeros(n), "rlnAnglePsi": psi,
            "rlnOriginXAngst": origin[:, 0], "rlnOriginYAngst": origin[:, 1], "rlnOriginZAngst": np.zeros(n)}


def normalise_images(images: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per image, (n, H, W) float32; a constant image only loses its mean."""
    x = np.asarray(images, dtype=np.float64)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    sd = x.std(axis=(1, 2), keepdims=True)
    constant = sd[:, 0, 0] <= 1e-12
    if constant.any():
        log.warning("%d constant image(s) could not be normalised (mean removed only)", int(constant.sum()))
    return (x / np.where(sd > 1e-12, sd, 1.0)).astype(np.float32)


# ----------------------------------------------------------------------------- workflow stages


def split_seed(config, split: str) -> np.random.SeedSequence:
    """The seed of one generated split: the config seed and the split's name."""
    return np.random.SeedSequence([config.seed, *split.encode()])


def image_split_config(config, split: str):
    """``config.images.splits[split]``; InputError naming the configured splits if there is none."""
    splits = config.images.splits
    if split not in splits:
        raise InputError(f"images.splits has no split {split!r}; configured: {sorted(splits)}")
    return splits[split]


def image_class_names(config) -> list[str]:
    """The classes of the 2D data in order: images.classes, else all glyphs of the kind, or (kind files)
    the sorted names that the labels of every configured split give."""
    images = config.images
    if images.kind != "files":
        from cryovae.glyphs import glyph_class_names

        return glyph_class_names(images.kind, images.classes)
    if images.classes is not None:
        return list(images.classes)
    names = set()
    for spec in images.splits.values():
        names |= set(label_names(spec.labels if spec.labels is not None else _folder_labels(spec.images)))
    return sorted(names)


def _folder_labels(images_path: str) -> str | None:
    """An ImageFolder-style images folder stands for its own labels."""
    path = Path(images_path)
    if path.is_dir() and any(name is not None for _, name in image_folder_files(path)):
        return images_path
    return None


def split_classes(config, split: str) -> list[str]:
    """The classes a split holds: train and val the seen ones (config.unseen are held out of what
    the model learns from), every other split all of them."""
    from cryovae.config import IMAGE_SPLITS

    names = image_class_names(config)
    return [c for c in names if c not in config.unseen] if split in IMAGE_SPLITS[:2] else names


def make_images(config, split: str, output_dir: Path) -> None:
    """Generate split ``split`` of ``images.splits`` (glyphs with their true poses) into ``output_dir``."""
    from cryovae.glyphs import glyph_dataset

    images = config.images
    if images.kind == "files":
        raise InputError("make-images generates glyphs: images.kind is files, use cryovae import-images")
    spec = image_split_config(config, split)
    classes = image_class_names(config)
    made = split_classes(config, split)
    data = glyph_dataset(images.kind, spec.per_class, made, images.size, images.render_size, spec.rotation_deg,
                         spec.translation, spec.shear_deg, spec.scale, spec.noise_sd, split_seed(config, split))
    truth = [made[i] for i in data.labels]
    extra = {"cryovaeShearXDeg": data.shear_deg[:, 0], "cryovaeShearYDeg": data.shear_deg[:, 1],
             "cryovaeScale": data.scale}
    if not spec.labelled:
        extra["cryovaeTrueClassName"] = truth
    write_image_split(output_dir, data.images, truth if spec.labelled else [UNKNOWN] * len(truth), classes,
                      images.pixel_size_angstrom, images.particles_per_shard, data.psi_deg, data.shift_px, extra,
                      images.normalise, montage_labels=truth, split_name=split)


def import_images(config, split: str, output_dir: Path) -> None:
    """Read split ``split`` of ``images.splits`` (kind files: the user's stack and labels) into ``output_dir``."""
    images = config.images
    if images.kind != "files":
        raise InputError(f"import-images reads the user's stacks: images.kind is {images.kind}, use cryovae "
                         "make-images (or set images.kind: files)")
    spec = image_split_config(config, split)
    stack = read_image_stack(spec.images)
    source = spec.labels if spec.labels is not None else _folder_labels(spec.images)
    labels = read_labels(source, len(stack))
    classes = image_class_names(config)
    stray = sorted(set(labels) - set(classes) - {UNKNOWN})
    if stray:
        raise InputError(f"{source}: class name(s) {stray} are not in images.classes {classes}")
    unseen = sorted(set(labels) - set(split_classes(config, split)) - {UNKNOWN})
    if spec.labelled and unseen:
        raise InputError(f"{source}: split {split} holds images of the unseen class(es) {unseen}; training and "
                         "validation splits hold seen classes only (unseen ones belong in test)")
    extra = None
    if not spec.labelled and source is not None:
        extra = {"cryovaeTrueClassName": labels}
    write_image_split(output_dir, stack, labels if spec.labelled else [UNKNOWN] * len(labels), classes,
                      images.pixel_size_angstrom, images.particles_per_shard, extra_columns=extra,
                      normalise=images.normalise, montage_labels=labels, split_name=split)


def image_affinity(config, csv: Path, plot: Path) -> None:
    """Shape affinity of the configured glyphs (:func:`cryovae.glyphs.shape_affinity`): the project's
    affinity CSV (read by :func:`cryovae.affinity.read_affinity_csv`) and its heatmap."""
    from cryovae.affinity import plot_affinity, write_affinity_csv
    from cryovae.glyphs import canonical_glyphs, shape_affinity

    images = config.images
    classes = image_class_names(config)
    if len(classes) < 2:
        raise InputError(f"images.classes: an affinity matrix needs at least 2 classes, got {classes}")
    if images.kind == "files":
        matrix, title = _files_affinity(images.affinity, classes)
    else:
        matrix = shape_affinity(canonical_glyphs(images.kind, classes, images.size, images.render_size))
        title = f"glyph shape affinity ({images.kind}), clustered"
    write_affinity_csv(csv, classes, matrix)
    plot_affinity(plot, classes, matrix, images.kind, title=title,
                  colour_label="rotation-invariant correlation, spread to [-1, 1]" if images.kind != "files"
                  else "affinity")


def _files_affinity(path: str | None, classes: list[str]) -> tuple[np.ndarray, str]:
    """The user's affinity CSV (images.affinity) in class order, or, without one, the identity: each
    class like itself only (no structural prior between the user's classes)."""
    from cryovae.affinity import read_affinity_csv

    if path is None:
        log.info("image-affinity: images.affinity is null; each class is like itself only (identity)")
        return np.eye(len(classes)), "no affinity given: identity"
    names, matrix = read_affinity_csv(Path(path))
    missing = [c for c in classes if c not in names]
    if missing:
        raise InputError(f"{path}: the affinity matrix lacks the classes {missing} (it has {names})")
    order = [names.index(c) for c in classes]
    return matrix[np.ix_(order, order)], f"affinity from {Path(path).name}"


def image_reference(config, class_name: str, output: Path) -> None:
    """The canonical (undistorted) glyph of ``class_name`` as a 2D MRC image at the images' pixel size:
    the reference the model's frame is aligned to (cryovae align) and poses are measured against."""
    import mrcfile

    from cryovae.glyphs import render_glyph

    images = config.images
    if images.kind == "files":
        raise InputError("image-reference renders generated glyphs: images.kind files has no reference images")
    if class_name not in image_class_names(config):
        raise InputError(f"class {class_name!r} is not one of the image classes {image_class_names(config)}")
    image = render_glyph(images.kind, class_name, images.render_size, images.size).astype(np.float32)
    with atomic_path(output) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(image)
            mrc.voxel_size = images.pixel_size_angstrom
