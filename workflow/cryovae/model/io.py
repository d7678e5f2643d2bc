"""``model.pt``: one self-describing file, loadable with ``torch.load(..., weights_only=True)``.

It holds only tensors, dicts, lists, strings and numbers:

- ``format`` ("cryovae-affinity-vae"), ``format_version`` (1), ``package_version``;
- ``state_dict``: the weights;
- ``hyperparameters``: the arguments of :class:`~cryovae.model.vae.AffinityVAE`
  (spatial_shape, channels, latent_dims, decoder, n_splats, hidden, pixel_size_angstrom);
- ``class_names`` (affinity-matrix order), ``box_size``, ``spatial_shape``,
  ``pixel_size_angstrom``, ``latent_dims``, ``decoder``, ``ndim``;
- ``config``: the run's configuration as a plain dict; plus anything passed as ``extra``
  (a model with a classifier head: ``classifier_class_names``, its classes in order).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from cryovae import __version__
from cryovae.atomic import atomic_path
from cryovae.errors import InputError
from cryovae.model.vae import AffinityVAE

FORMAT = "cryovae-affinity-vae"
FORMAT_VERSION = 1


def model_record(model: AffinityVAE, class_names: list[str], config: dict, extra: dict | None = None) -> dict:
    """The dict written to ``model.pt`` (weights on the CPU)."""
    hp = model.hyperparameters
    record: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "hyperparameters": hp,
        "class_names": list(class_names),
        "box_size": int(hp["spatial_shape"][-1]),
        "spatial_shape": list(hp["spatial_shape"]),
        "ndim": len(hp["spatial_shape"]),
        "pixel_size_angstrom": float(hp["pixel_size_angstrom"]),
        "latent_dims": int(hp["latent_dims"]),
        "decoder": hp["decoder"],
        "config": config,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    record.update(extra or {})
    return record


def save_model(path: str | Path, model: AffinityVAE, class_names: list[str], config: dict, extra: dict | None = None) -> None:
    """Write ``model.pt`` atomically."""
    save_record(model_record(model, class_names, config, extra), path)


def save_record(record: Any, path: str | Path) -> None:
    """``torch.save`` atomically, through an open file: given a path, torch names the archive's
    folder after the file, and the atomic write's temporary name would make every save differ."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(record, fh)


def read_record(path: Path, what: str, remedy: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a truncated, empty or foreign file is an
    :class:`InputError` naming ``path``, saying it is the ``what`` and what to do."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: the {what} cannot be read (truncated or corrupt: {reason}); {remedy}") from err


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[AffinityVAE, dict]:
    """Rebuild the model of a ``model.pt`` on ``device`` in evaluation mode: (model, meta).

    meta is the file's dict without the weights.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file does not exist")
    record = read_record(path, "model file", "delete it and rerun the workflow, which trains the model again",
                         map_location=device)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InputError(f"{path}: not a cryovae model file (expected format {FORMAT!r})")
    if record.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: model format version {record.get('format_version')}, expected {FORMAT_VERSION}")
    model = AffinityVAE(**record["hyperparameters"])
    model.load_state_dict(record["state_dict"])
    model.classifier_class_names = record.get("classifier_class_names")
    model.to(device).eval()
    meta = {k: v for k, v in record.items() if k != "state_dict"}
    return model, meta


class ClassifierHead(torch.nn.Module):
    """q(y|x) of a model with classes, on its own (the encoder, for the pose, and the classifier):
    (n, 1, *spatial) -> (n, C) class probabilities; a model of shape_frame 'matched' also reads
    each particle's matched pose (rotation (n, 3, 3), shift_voxels (n, 3))."""

    def __init__(self, model: AffinityVAE):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, rotation: torch.Tensor | None = None,
                shift_voxels: torch.Tensor | None = None) -> torch.Tensor:
        frame = None if rotation is None else (rotation, shift_voxels)
        return torch.softmax(self.model.class_logits(self.model.encode_outputs(x, frame), x), dim=1)


def export_classifier(config, model: str | Path, output: str | Path) -> None:
    """Write the classifier head of ``model`` as a ``torch.export`` program:
    ``torch.export.load(output).module()(x)`` gives the class probabilities of images or
    subtomograms x (n, 1, *spatial), any n, without cryovae installed; the class names, box and
    pixel size are in the archive's ``meta.json`` (``extra_files``)."""
    import json

    net, meta = load_model(model)
    if net.classifier is None:
        raise InputError(f"{model}: the model has no classifier head (train with "
                         "training.semi_supervised.classifier: true)")
    example = (torch.zeros((2, 1, *meta["spatial_shape"])),)
    described = "(n, 1, *spatial_shape) float32, normalised as the training particles were"
    if net.shape_frame == "matched":   # it reads particles put upright by their matched pose
        example += (torch.eye(3).repeat(2, 1, 1), torch.zeros(2, 3))
        described += ("; then each particle's template-matched pose: rotation (n, 3, 3) particle-from-reference "
                      "and shift (n, 3) in voxels (x, y, z; -rlnOrigin / pixel size)")
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(ClassifierHead(net).eval(), example,
                                  dynamic_shapes=tuple({0: batch} for _ in example))
    info = {"class_names": meta["classifier_class_names"], "spatial_shape": meta["spatial_shape"],
            "pixel_size_angstrom": meta["pixel_size_angstrom"], "package_version": __version__,
            "input": described}
    with atomic_path(output) as tmp, open(tmp, "wb") as fh:
        torch.export.save(program, fh, extra_files={"meta.json": json.dumps(info)})
