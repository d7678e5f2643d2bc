"""The peer side of the ss-rVAE benchmark: pyroVED's own ``ssiVAE`` on the data cryovae's model sees.

The project's semi-supervised rotation-invariant VAE follows Ziatdinov, Kalinin et al., "Semi-supervised
learning of images with strong rotational disorder: assembling nanoparticle libraries" (Digital Discovery
2024), whose code is ``pyroved.models.ssiVAE``. This script trains that model, with the settings of
pyroVED's published card-suits notebook (``examples/ssrVAE.ipynb`` in github.com/ziatdinovmax/pyroVED,
versions of 2021-05-23/27), on arrays that the benchmark writes, and reports validation accuracy, so that
both models can be scored on the same images.

It runs in its own virtual environment and imports nothing from cryovae::

    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install torch==2.13.0 pyroved      # resolves to pyroved 0.3.0, pyro-ppl 1.9.2
    # or, from a cryovae checkout: pip install torch==2.13.0 '.[peers]' (pulls cryovae's own dependencies too)

    /work/peer-venv/bin/python benchmarks/ssrvae_peer.py --data X.npz --output peer.json
    /work/peer-venv/bin/python benchmarks/ssrvae_peer.py --write-toy toy.npz        # a small test set
    /work/peer-venv/bin/python benchmarks/ssrvae_peer.py --data toy.npz --output toy.json --epochs 2

torchvision: pyroved imports ``torchvision.utils.make_grid`` at import time, for plotting only. The
torchvision wheel that pip pairs with a CPU-only torch is the CUDA build and fails to load
(``operator torchvision::nms does not exist``); when torchvision cannot be imported this script puts a
stand-in module in its place (``make_grid`` raises), which nothing on the training or evaluation path
calls. The JSON records whether it did (``torchvision_stub``).

Input: one ``.npz`` with ``labelled_x`` (n, H, W) float32, ``labelled_y`` (n,) int in [0, C),
``unlabelled_x`` (m, H, W), ``val_x`` (k, H, W), ``val_y`` (k,), ``class_names`` (C,) str.

Published settings (defaults here; each can be overridden): ``ssiVAE(data_dim, latent_dim=2,
num_classes, invariances=['r', 't'])`` with pyroved's defaults (encoder, decoder and classifier
2 x 128 tanh units, Bernoulli decoder with sigmoid output, translation prior 0.1), ``auxSVItrainer``
(Adam, lr 5e-4, parallel enumeration of the class in TraceEnum_ELBO), ``init_ssvae_dataloaders`` with
batch size 64, 80 epochs of ``trainer.step(loader_unsup, loader_sup, loader_val,
aux_loss_multiplier=30, scale_factor=kl)`` where the KL scale ramps linearly 1 -> 2 over the first 30
epochs and stays at 2; model and trainer seed 1. Images were grey levels in [0, 1] (card symbols inverted
to bright on dark, divided by their maximum, then affine-transformed), flattened to H*W vectors; here
``--scaling global`` (default) maps them to [0, 1] with one min and max taken over the training images
(labelled + unlabelled) and clips the validation images to that range. The notebook's score is
``trainer.evaluate`` (overall accuracy of the classifier on the validation set) after the last epoch;
this script reports that and also the per-class accuracy (recall), their mean and the confusion matrix.

Cost: the spatial decoder evaluates its MLP at every pixel for every class the ELBO enumerates, so an
unlabelled batch of 64 48x48 images costs about 6.5 s of CPU time (8.6 s wall on 2 shared cores) and a
labelled one 2.7 s. An epoch of 800 labelled + 12,000 unlabelled images (188 + 13 batches) is then about
27 minutes on such a CPU, and the published 80 epochs about 36 hours: run the full protocol on a GPU
(``--device cuda``; a CUDA torch in the peer environment) and keep CPU runs to a few epochs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import sys
import time
import types
from pathlib import Path

import numpy as np

PUBLISHED = {
    "source": "github.com/ziatdinovmax/pyroVED examples/ssrVAE.ipynb (commits 3e3a554 2021-05-23, "
    "22bd2c6 2021-05-27): 80 epochs, last-epoch validation accuracy 0.868 (best 0.883)",
    "latent_dim": 2,
    "invariances": ["r", "t"],
    "hidden_dim_e": [128, 128],
    "hidden_dim_d": [128, 128],
    "hidden_dim_cls": [128, 128],
    "activation": "tanh",
    "sampler_d": "bernoulli",
    "dx_prior": 0.1,
    "epochs": 80,
    "lr": 5e-4,
    "batch_size": 64,
    "alpha": 30.0,
    "kl_start": 1.0,
    "kl_end": 2.0,
    "kl_ramp_epochs": 30,
    "seed": 1,
}


def _import_pyroved() -> tuple[types.ModuleType, bool]:
    """pyroved, with a stand-in for torchvision when the installed one cannot be imported."""
    stub = False
    try:
        import torchvision.utils  # noqa: F401  (pyroved.utils.viz imports make_grid from it)
    except (ImportError, RuntimeError, OSError):  # a CUDA torchvision over a CPU torch raises RuntimeError
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        tv = types.ModuleType("torchvision")
        tv_utils = types.ModuleType("torchvision.utils")

        def make_grid(*args, **kwargs):
            raise RuntimeError("torchvision is not usable in this environment (ssrvae_peer.py stand-in)")

        tv_utils.make_grid = make_grid
        tv.utils = tv_utils
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.utils"] = tv_utils
        stub = True
    import pyroved

    return pyroved, stub


def load_npz(path: Path) -> dict:
    """The benchmark arrays, checked for shape and label range."""
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    need = ["labelled_x", "labelled_y", "unlabelled_x", "val_x", "val_y", "class_names"]
    missing = [k for k in need if k not in data]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}")
    hw = data["labelled_x"].shape[1:]
    for k in ["labelled_x", "unlabelled_x", "val_x"]:
        if data[k].ndim != 3 or data[k].shape[1:] != hw:
            raise ValueError(f"{path}: {k} has shape {data[k].shape}, expected (n, {hw[0]}, {hw[1]})")
    n_classes = len(data["class_names"])
    for x, y in [("labelled_x", "labelled_y"), ("val_x", "val_y")]:
        if len(data[y]) != len(data[x]):
            raise ValueError(f"{path}: {y} has {len(data[y])} labels for {len(data[x])} images")
        if len(data[y]) and (data[y].min() < 0 or data[y].max() >= n_classes):
            raise ValueError(f"{path}: {y} outside [0, {n_classes})")
    data["class_names"] = [str(c) for c in data["class_names"]]
    return data


def scale_images(data: dict, mode: str, invert: bool) -> dict:
    """Grey levels in [0, 1] for the Bernoulli decoder (see the module docstring)."""
    keys = ["labelled_x", "unlabelled_x", "val_x"]
    out = {k: data[k].astype(np.float32) for k in keys}
    if mode == "global":
        train = np.concatenate([out["labelled_x"].ravel(), out["unlabelled_x"].ravel()])
        lo, hi = float(train.min()), float(train.max())
        for k in keys:
            out[k] = np.clip((out[k] - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    elif mode == "per-image":
        for k in keys:
            lo = out[k].min(axis=(1, 2), keepdims=True)
            hi = out[k].max(axis=(1, 2), keepdims=True)
            out[k] = (out[k] - lo) / np.maximum(hi - lo, 1e-12)
    elif mode != "none":
        raise ValueError(f"unknown scaling {mode!r}")
    if invert:
        for k in keys:
            out[k] = 1.0 - out[k]
    return out


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def _supervised_draws(n_sup_batches: int, n_unsup_batches: int) -> int:
    """How many labelled batches auxSVItrainer.train uses per epoch (it draws one when i % p == 1)."""
    p = (n_sup_batches + n_unsup_batches) // n_sup_batches
    return sum(1 for i in range(n_unsup_batches) if i % p == 1)


def run(args: argparse.Namespace) -> dict:
    pyroved, stub = _import_pyroved()
    import pyro
    import torch
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    raw = load_npz(args.data)
    class_names = raw["class_names"]
    n_classes = len(class_names)
    images = scale_images(raw, args.scaling, args.invert)
    hw = tuple(images["labelled_x"].shape[1:])
    invariances = [s for s in args.invariances.split(",") if s] or None
    hidden = [int(h) for h in args.hidden.split(",")]

    pyro.set_rng_seed(args.seed)  # python, numpy and torch
    torch.manual_seed(args.seed)

    def flat(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x.reshape(len(x), -1)))

    def onehot(y: np.ndarray) -> torch.Tensor:
        return pyroved.utils.to_onehot(torch.from_numpy(y.astype(np.int64)), n=n_classes).float()

    x_sup, y_sup = flat(images["labelled_x"]), onehot(raw["labelled_y"])
    x_unsup = flat(images["unlabelled_x"])
    x_val, y_val = flat(images["val_x"]), onehot(raw["val_y"])
    # No device argument: pyroved would then give each loader an unseeded torch.Generator; without it
    # the loaders shuffle from the global generator seeded above. Batches move to the device in the trainer.
    loader_unsup, loader_sup, loader_val = pyroved.utils.init_ssvae_dataloaders(
        x_unsup, (x_sup, y_sup), (x_val, y_val), batch_size=args.batch_size
    )
    draws = _supervised_draws(len(loader_sup), len(loader_unsup))
    if draws == 0 or draws > len(loader_sup):
        raise ValueError(
            f"auxSVItrainer would use {draws} of {len(loader_sup)} labelled batches per epoch with "
            f"{len(loader_unsup)} unlabelled batches; it needs more unlabelled than labelled batches"
        )

    settings = {
        "latent_dim": args.latent_dim,
        "invariances": invariances,
        "hidden_dim_e": hidden,
        "hidden_dim_d": hidden,
        "hidden_dim_cls": hidden,
        "activation": "tanh",
        "sampler_d": "bernoulli",
        "dx_prior": args.dx_prior,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "alpha": args.alpha,
        "kl_start": args.kl_start,
        "kl_end": args.kl_end,
        "kl_ramp_epochs": args.kl_ramp_epochs,
        "seed": args.seed,
        "scaling": args.scaling,
        "invert": args.invert,
        "device": device,
        "threads": torch.get_num_threads(),
    }
    settings["differs_from_published"] = sorted(k for k, v in PUBLISHED.items() if k in settings and settings[k] != v)

    model = pyroved.models.ssiVAE(
        hw, args.latent_dim, n_classes, invariances=invariances,
        hidden_dim_e=hidden, hidden_dim_d=hidden, hidden_dim_cls=hidden,
        activation="tanh", sampler_d="bernoulli", sigmoid_d=True, seed=args.seed,
        device=device, dx_prior=args.dx_prior, dy_prior=args.dx_prior,
    )
    trainer = pyroved.trainers.auxSVItrainer(model, task="classification", seed=args.seed, lr=args.lr, device=device)

    ramp = torch.linspace(args.kl_start, args.kl_end, args.kl_ramp_epochs) if args.kl_ramp_epochs > 0 else None
    epoch_seconds = []
    bar = tqdm(range(args.epochs), desc="ssiVAE", unit="epoch", disable=args.quiet, file=sys.stderr)
    t_train = time.perf_counter()
    for e in bar:
        kl = float(ramp[min(e, len(ramp) - 1)]) if ramp is not None else args.kl_end
        t0 = time.perf_counter()
        trainer.step(loader_unsup, loader_sup, loader_val, aux_loss_multiplier=args.alpha, scale_factor=kl)
        epoch_seconds.append(time.perf_counter() - t0)
        loss, acc = trainer.history["training_loss"][-1], trainer.history["test"][-1]
        bar.set_postfix(loss=f"{loss:.2f}", val_acc=f"{acc:.4f}")
        if not args.quiet:
            tqdm.write(f"epoch {e + 1}/{args.epochs}  kl_scale {kl:.3f}  loss {loss:.4f}  "
                       f"val_acc {acc:.4f}  {epoch_seconds[-1]:.1f} s", file=sys.stderr)
    train_seconds = time.perf_counter() - t_train

    t0 = time.perf_counter()
    pred = model.classifier(x_val, batch_size=args.batch_size).numpy()
    eval_seconds = time.perf_counter() - t0
    y_true = raw["val_y"].astype(np.int64)
    cm = _confusion(y_true, pred, n_classes)
    support = cm.sum(axis=1)
    per_class = {name: (float(cm[i, i] / support[i]) if support[i] else None) for i, name in enumerate(class_names)}
    present = [v for v in per_class.values() if v is not None]

    return {
        "model": "pyroved.models.ssiVAE",
        "data": str(args.data),
        "data_sha256": hashlib.sha256(Path(args.data).read_bytes()).hexdigest(),
        "image_shape": list(hw),
        "n_labelled": len(x_sup),
        "n_unlabelled": len(x_unsup),
        "n_val": len(x_val),
        "class_names": class_names,
        "per_class_accuracy": per_class,
        "mean_per_class_accuracy": float(np.mean(present)) if present else None,
        "overall_accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "confusion_matrix": {"rows": "true class", "columns": "predicted class", "matrix": cm.tolist()},
        "val_support": support.tolist(),
        "train_seconds": train_seconds,
        "epoch_seconds": epoch_seconds,
        "eval_seconds": eval_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "timing_note": "epoch_seconds and train_seconds include pyroved's per-epoch validation pass "
        "(trainer.step with loader_val, as the notebook ran it)",
        "epochs": args.epochs,
        "labelled_batches_per_epoch": draws,
        "unlabelled_batches_per_epoch": len(loader_unsup),
        "history": {
            "training_loss": [float(v) for v in trainer.history["training_loss"]],
            "val_accuracy": [float(v) for v in trainer.history["test"]],
        },
        "settings": settings,
        "published": PUBLISHED,
        "versions": {
            "pyroved": pyroved.__version__,
            "pyro": pyro.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "torchvision_stub": stub,
    }


def _rotate_shift(img: np.ndarray, angle_deg: float, shift: tuple[float, float]) -> np.ndarray:
    """Bilinear rotation about the centre plus a shift (pixels), zero outside."""
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    a = np.deg2rad(angle_deg)
    # inverse map: output pixel -> source pixel
    y0, x0 = yy - cy - shift[0], xx - cx - shift[1]
    sy = np.cos(a) * y0 + np.sin(a) * x0 + cy
    sx = -np.sin(a) * y0 + np.cos(a) * x0 + cx
    iy, ix = np.floor(sy).astype(int), np.floor(sx).astype(int)
    fy, fx = sy - iy, sx - ix
    out = np.zeros_like(img, dtype=np.float64)
    for dy, dx, wgt in [(0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)]:
        py, px = iy + dy, ix + dx
        ok = (py >= 0) & (py < h) & (px >= 0) & (px < w)
        out[ok] += wgt[ok] * img[py[ok], px[ok]]
    return out


def toy_dataset(n_labelled: int = 20, n_unlabelled: int = 100, n_val: int = 50, size: int = 48,
                seed: int = 0) -> dict:
    """Four shapes drawn with numpy (per class counts), the card-suits split in miniature: labelled images
    with small rotations (+-4 deg) and no shift, unlabelled and validation images with +-60 deg and shifts
    up to 10% of the side, each with a random scale in [1, 1.3] and a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2
    r = size / 5

    def template(k: int, scale: float) -> np.ndarray:
        y, x = (yy - c) / scale, (xx - c) / scale
        if k == 0:  # square
            return ((np.abs(x) < r) & (np.abs(y) < r)).astype(float)
        if k == 1:  # triangle pointing up
            return ((y < r) & (y > -r) & (np.abs(x) < (y + r) / 2)).astype(float)
        if k == 2:  # plus sign
            return (((np.abs(x) < r / 3) & (np.abs(y) < r)) | ((np.abs(y) < r / 3) & (np.abs(x) < r))).astype(float)
        return ((np.hypot(x, y) < r) & (np.hypot(x, y) > r / 2)).astype(float)  # ring

    def split(per_class: int, max_angle: float, max_shift: float):
        xs, ys = [], []
        for k in range(4):
            for _ in range(per_class):
                img = template(k, rng.uniform(1.0, 1.3))
                shift = tuple(rng.uniform(-max_shift, max_shift, 2) * size)
                img = _rotate_shift(img, rng.uniform(-max_angle, max_angle), shift)
                xs.append(np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1))
                ys.append(k)
        return np.asarray(xs, dtype=np.float32), np.asarray(ys, dtype=np.int64)

    lx, ly = split(n_labelled, 4, 0.0)
    ux, _ = split(n_unlabelled, 60, 0.1)
    vx, vy = split(n_val, 60, 0.1)
    return {"labelled_x": lx, "labelled_y": ly, "unlabelled_x": ux, "val_x": vx, "val_y": vy,
            "class_names": np.array(["square", "triangle", "plus", "ring"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, help=".npz with labelled_x, labelled_y, unlabelled_x, val_x, val_y, class_names")
    p.add_argument("--output", type=Path, help="JSON report")
    p.add_argument("--epochs", type=int, default=PUBLISHED["epochs"])
    p.add_argument("--seed", type=int, default=PUBLISHED["seed"])
    p.add_argument("--latent-dim", type=int, default=PUBLISHED["latent_dim"])
    p.add_argument("--alpha", type=float, default=PUBLISHED["alpha"], help="aux_loss_multiplier (classifier weight)")
    p.add_argument("--lr", type=float, default=PUBLISHED["lr"])
    p.add_argument("--batch-size", type=int, default=PUBLISHED["batch_size"])
    p.add_argument("--invariances", default="r,t", help="comma-separated pyroved invariances: r, t, s; '' for none")
    p.add_argument("--hidden", default="128,128", help="units per layer of encoder, decoder and classifier")
    p.add_argument("--dx-prior", type=float, default=PUBLISHED["dx_prior"], help="translation prior (fraction of the side)")
    p.add_argument("--kl-start", type=float, default=PUBLISHED["kl_start"])
    p.add_argument("--kl-end", type=float, default=PUBLISHED["kl_end"])
    p.add_argument("--kl-ramp-epochs", type=int, default=PUBLISHED["kl_ramp_epochs"])
    p.add_argument("--scaling", choices=["global", "per-image", "none"], default="global")
    p.add_argument("--invert", action="store_true", help="use 1 - x after scaling (for dark objects on a bright background)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--write-toy", type=Path, metavar="NPZ", help="write the toy data set and exit")
    p.add_argument("--toy-counts", default="20,100,50", help="labelled, unlabelled, validation images per class")
    p.add_argument("--toy-size", type=int, default=48)
    args = p.parse_args(argv)

    if args.write_toy:
        n_lab, n_unl, n_val = (int(v) for v in args.toy_counts.split(","))
        np.savez(args.write_toy, **toy_dataset(n_lab, n_unl, n_val, size=args.toy_size))
        print(f"wrote {args.write_toy}")
        return 0
    if not args.data or not args.output:
        p.error("--data and --output are required (or --write-toy)")
    report = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"overall accuracy {report['overall_accuracy']:.4f}, mean per-class {report['mean_per_class_accuracy']:.4f}, "
          f"{report['train_seconds']:.1f} s training -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
