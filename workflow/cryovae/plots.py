"""Figures of the evaluation stage: one small function per PNG, all drawn with matplotlib (Agg).

Every function takes arrays that :mod:`cryovae.evaluate` has already computed, draws one
figure and writes it atomically (:func:`cryovae.atomic.atomic_path`), so a failed plot
never leaves a half-written file.  Classes keep one colour across figures: the colour of
a class is set by its position in the config's class order.
"""

from __future__ import annotations

import warnings

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cryovae.atomic import atomic_path  # noqa: E402

UNKNOWN = "unknown"
UMAP_MIN_POINTS = 15
_DPI = 120


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Write ``fig`` as PNG at ``path`` atomically and close it (no timestamp in the file)."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def class_colours(class_names: Sequence[str]) -> dict[str, tuple]:
    """One fixed colour per class (config order), grey for ``unknown``."""
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    colours = {name: cmap(i % cmap.N) for i, name in enumerate(class_names)}
    colours[UNKNOWN] = (0.55, 0.55, 0.55, 1.0)
    return colours


def plot_message(path: Path, title: str, message: str) -> None:
    """A figure that states why a plot cannot be drawn for this split (e.g. no ground truth)."""
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=11, transform=ax.transAxes)
    save_figure(fig, path)


def embed_2d(latents: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """Project latents (n, L) to 2D: UMAP for ``n >= 15`` particles, else PCA.

    Returns (coords (n, 2), method name).  Both routes are deterministic for a given
    ``seed`` (UMAP runs single-threaded when seeded).
    """
    latents = np.asarray(latents, dtype=np.float64)
    n = len(latents)
    if n >= UMAP_MIN_POINTS:
        import umap
        from sklearn.neighbors import NearestNeighbors

        # Exact neighbours from scikit-learn (each point its own first, as UMAP's own search
        # gives): UMAP's approximate search is compiled by numba afresh in every process,
        # about 11 s of a workflow job that otherwise takes a few.
        k = min(15, n - 1)
        distances, indices = NearestNeighbors(n_neighbors=k).fit(latents).kneighbors(latents)
        reducer = umap.UMAP(n_components=2, n_neighbors=k, random_state=seed, n_jobs=1,
                            precomputed_knn=(indices, distances, None))
        with warnings.catch_warnings():
            # without UMAP's search index, transform() of new points is unavailable: never used here
            warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)
            coords = reducer.fit_transform(latents)
        return np.asarray(coords, dtype=np.float64), "UMAP"
    coords = np.zeros((n, 2))
    if n >= 2:
        from sklearn.decomposition import PCA

        k = min(2, n, latents.shape[1])
        coords[:, :k] = PCA(n_components=k, random_state=seed).fit_transform(latents)
    return coords, "PCA"


def plot_latent_map(
    path: Path,
    coords: np.ndarray,
    method: str,
    labels: Sequence[str],
    unseen_classes: Sequence[str],
    class_names: Sequence[str],
    label_kind: str,
) -> None:
    """Scatter of 2D-projected latents (n, 2), coloured by ``labels`` (n,).

    ``label_kind`` is "true class" or "predicted class"; classes in ``unseen_classes``
    (and ``unknown``) are drawn with a cross instead of a dot.
    """
    labels = np.asarray(labels, dtype=object)
    colours = class_colours(class_names)
    fig, ax = plt.subplots(figsize=(7.5, 6), layout="constrained")
    order = [c for c in list(class_names) + [UNKNOWN] if np.any(labels == c)]
    for name in order:
        mask = labels == name
        marked = name in unseen_classes or name == UNKNOWN
        tag = " (unseen)" if name in unseen_classes else ""
        ax.scatter(
            coords[mask, 0], coords[mask, 1], s=40 if marked else 14, marker="X" if marked else "o",
            color=colours[name], edgecolors="black" if marked else "none", linewidths=0.4,
            label=f"{name}{tag} (n={int(mask.sum())})",
        )
    note = "" if method == "UMAP" else f" (PCA: fewer than {UMAP_MIN_POINTS} particles for UMAP)"
    ax.set_title(f"{method} of the shape latents, coloured by {label_kind}{note}", fontsize=10)
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.legend(title=label_kind, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    save_figure(fig, path)


def plot_confusion(path: Path, counts: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str]) -> None:
    """Confusion matrix ``counts`` (n_true, n_predicted): colour = fraction of the row, text = count."""
    counts = np.asarray(counts, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    fig, ax = plt.subplots(figsize=(2.5 + 0.7 * len(col_labels), 1.8 + 0.6 * len(row_labels)), layout="constrained")
    im = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if fractions[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix\n(numbers: particles; colour: fraction of the true class)", fontsize=10)
    fig.colorbar(im, ax=ax, label="fraction of true class")
    save_figure(fig, path)


def plot_predicted_counts(path: Path, labels: Sequence[str], counts: Sequence[int]) -> None:
    """Bar chart of how many particles were called each label (splits without ground truth)."""
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(labels), 4))
    ax.bar(range(len(labels)), counts, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("particles")
    ax.set_title("No ground-truth classes: predicted class counts", fontsize=10)
    save_figure(fig, path)


def plot_affinity_vs_latent(
    path: Path, latent_similarity: np.ndarray, affinity: np.ndarray, classes: Sequence[str],
    spearman: float | None, group_kind: str,
) -> None:
    """Latent cosine similarity of class means (k, k) beside the affinity (k, k), same order,
    plus their off-diagonal pairs as a scatter."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout="constrained")
    vmin = min(0.0, float(np.min(latent_similarity)), float(np.min(affinity)))
    for ax, mat, title in (
        (axes[0], latent_similarity, f"latent cosine similarity of {group_kind} means"),
        (axes[1], affinity, "affinity (SOAP similarity)"),
    ):
        im = ax.imshow(mat, cmap="viridis", vmin=vmin, vmax=1.0)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.85)
    iu = np.triu_indices(len(classes), k=1)
    axes[2].scatter(affinity[iu], latent_similarity[iu], s=18, color="tab:blue")
    axes[2].set_xlabel("affinity")
    axes[2].set_ylabel("latent cosine similarity")
    rho = "n/a" if spearman is None else f"{spearman:.3f}"
    axes[2].set_title(f"class pairs (Spearman ρ = {rho})", fontsize=10)
    save_figure(fig, path)


def plot_pose_error(path: Path, errors_deg: np.ndarray, symmetry_note: str,
                    network_errors_deg: np.ndarray | None = None) -> None:
    """Histogram of per-particle rotation errors in degrees (0–180) with the median marked;
    with ``network_errors_deg`` the network's own poses are drawn as an outline beside them."""
    errors_deg = np.asarray(errors_deg, dtype=np.float64)
    median = float(np.median(errors_deg))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bins = np.linspace(0.0, 180.0, 37)
    ax.hist(errors_deg, bins=bins, color="tab:blue", edgecolor="white", label="written poses")
    if network_errors_deg is not None and len(network_errors_deg):
        network = np.asarray(network_errors_deg, dtype=np.float64)
        ax.hist(network, bins=bins, histtype="step", color="tab:gray", linewidth=1.5,
                label=f"network's own poses (median {np.median(network):.1f}°)")
    ax.axvline(median, color="tab:red", linestyle="--", label=f"median {median:.1f}°")
    ax.set_xlim(0, 180)
    ax.set_xlabel("rotation error (degrees, geodesic, symmetry-aware)")
    ax.set_ylabel("particles")
    ax.set_title(f"Pose error of {len(errors_deg)} seen-class particles ({symmetry_note})", fontsize=10)
    ax.legend()
    save_figure(fig, path)


def plot_pose_confidence(path: Path, margin: np.ndarray, errors_deg: np.ndarray | None, margin_min: float,
                         auroc: float | None) -> None:
    """Rotation error (frame-free, degrees) against ``pose_margin`` per particle, the
    determination threshold marked; without errors a histogram of the margins."""
    margin = np.asarray(margin, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if errors_deg is None:
        ax.hist(margin, bins=30, color="tab:blue", edgecolor="white")
        ax.set_ylabel("particles")
        ax.set_title(f"Pose margin of {len(margin)} particles (no true poses)", fontsize=10)
    else:
        ax.scatter(margin, errors_deg, s=8, alpha=0.6, color="tab:blue")
        ax.set_ylim(0, 180)
        ax.set_ylabel("rotation error (degrees, frame-free, symmetry-aware)")
        note = "" if auroc is None else f", margin AUROC (< 15° vs > 45°) {auroc:.2f}"
        ax.set_title(f"Pose error against pose margin, {len(margin)} particles{note}", fontsize=10)
    ax.axvline(margin_min, color="tab:red", linestyle="--", label=f"pose_margin_min {margin_min:g}")
    ax.set_xlabel("pose_margin (noise standard deviations of the global-search score)")
    ax.legend()
    save_figure(fig, path)


def central_slices(volume_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Central xy (at z=D//2), xz (at y=H//2) and yz (at x=W//2) slices of a (D, H, W) volume.

    Shapes: xy (H, W), xz (D, W), yz (D, H); rows are the slower axis.
    """
    d, h, w = volume_zyx.shape
    return volume_zyx[d // 2], volume_zyx[:, h // 2, :], volume_zyx[:, :, w // 2]


def sections(array: np.ndarray) -> tuple[np.ndarray, ...]:
    """What a figure shows of a decoded array: a volume's three central slices, an image itself."""
    return (array,) if array.ndim == 2 else central_slices(array)


def plot_reconstructions(path: Path, volumes_zyx: np.ndarray, classes: Sequence[str], group_kind: str) -> None:
    """For each class, central xy/xz/yz slices of the decoded canonical volume; volumes (k, D, H, W)
    (images (k, H, W): the image)."""
    k = len(classes)
    image = volumes_zyx.ndim == 3
    fig, axes = plt.subplots(k, 1 if image else 3, figsize=(2.9 if image else 7.5, 2.4 * k + 0.6), squeeze=False,
                             layout="constrained")
    for row, (name, vol) in enumerate(zip(classes, volumes_zyx)):
        lo, hi = float(np.min(vol)), float(np.max(vol))
        for col, (img, plane) in enumerate(zip(sections(vol), ("xy", "xz", "yz"))):
            ax = axes[row, col]
            im = ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(plane[0], fontsize=8, labelpad=1)
            ax.set_ylabel(plane[1], fontsize=8, labelpad=1)
            ax.set_title(f"{name}: {plane}", fontsize=9)
        fig.colorbar(im, ax=list(axes[row]), shrink=0.9, label="density")
    what = "image" if image else "volume"
    fig.suptitle(f"Decoded canonical {what} of each {group_kind} mean latent" + ("" if image else " (central slices)"),
                 fontsize=10)
    save_figure(fig, path)


def plot_interpolation(path: Path, volumes_zyx: np.ndarray, weights: np.ndarray, start: str, end: str) -> None:
    """Central xy slices of volumes (s, D, H, W) decoded along z = (1-t) z_start + t z_end, t = ``weights``."""
    s = len(volumes_zyx)
    lo, hi = float(np.min(volumes_zyx)), float(np.max(volumes_zyx))
    fig, axes = plt.subplots(1, s, figsize=(1.9 * s + 0.8, 2.6), squeeze=False, layout="constrained")
    for ax, vol, t in zip(axes[0], volumes_zyx, weights):
        im = ax.imshow(sections(vol)[0], cmap="gray", origin="lower", vmin=lo, vmax=hi)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"t = {t:.2f}", fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.9, label="density")
    fig.suptitle(f"Latent interpolation {start} (t=0) → {end} (t=1): central xy slices", fontsize=10)
    save_figure(fig, path)


def history_components(history: pd.DataFrame) -> dict[str, dict[str, str]]:
    """Group loss columns by component: ``{"loss": {"train": "train_loss", "val": "val_loss"}, ...}``.

    Columns named ``train_X`` / ``val_X`` become component ``X``; ``epoch`` and ``seconds``
    are not losses.  Components keep the order of their first column.
    """
    groups: dict[str, dict[str, str]] = {}
    for col in history.columns:
        for phase in ("train", "val"):
            if col.startswith(phase + "_"):
                groups.setdefault(col[len(phase) + 1:], {})[phase] = col
    return groups


def plot_training_curves(path: Path, history: pd.DataFrame) -> None:
    """One panel per loss component (train solid, validation dashed) against the epoch."""
    groups = history_components(history)
    n = max(1, len(groups))
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False, layout="constrained")
    epochs = history["epoch"].to_numpy()
    for ax, (name, cols) in zip(axes.flat, groups.items()):
        positive = True
        for phase, style in (("train", "-"), ("val", "--")):
            if phase in cols:
                values = history[cols[phase]].to_numpy(dtype=np.float64)
                ax.plot(epochs, values, style, marker=".", label=phase)
                positive &= bool(np.all(values[np.isfinite(values)] > 0))
        if positive:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_axis_off()
    fig.suptitle(f"Training curves ({len(history)} epochs)", fontsize=11)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- interpretation


def plot_disentanglement(path: Path, section: dict) -> None:
    """Heatmap of the normalised mutual information (factors × latent dims), MIG per factor."""
    factors = section["factors"]
    rows = [section["normalised_mutual_information"][f] for f in factors]
    labels = [f"{f} (MIG {section['mig'][f]:.2f})" for f in factors]
    for name, rho in (section.get("affinity_abs_spearman") or {}).items():
        rows.append(rho)
        labels.append(f"{name}: |Spearman|")
    values = np.array(rows)
    fig, ax = plt.subplots(figsize=(2.5 + 0.55 * values.shape[1], 1.4 + 0.4 * len(labels)), layout="constrained")
    im = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if values[i, j] > 0.5 else "white")
    ax.set_xticks(range(values.shape[1]), [f"z{j}" for j in range(values.shape[1])])
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    fig.colorbar(im, ax=ax, label="MI / factor entropy (affinity rows: |Spearman|)")
    ax.set_title(f"What each latent dimension carries (mean MIG {section['mig_mean']:.2f})", fontsize=10)
    save_figure(fig, path)


def plot_sparse_accuracy(path: Path, sparse: dict, black_box_accuracy: float, symbolic_accuracy: float,
                         max_dims: int) -> None:
    """Accuracy of the sparse class rules against dimensions kept per class, beside the black box."""
    k = [p["dims_per_class"] for p in sparse["accuracy_by_dims"]]
    acc = [p["accuracy"] for p in sparse["accuracy_by_dims"]]
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.plot(k, acc, "o-", label="sparse (L1-ranked dims, logistic per class)")
    ax.axhline(black_box_accuracy, color="black", ls="--", label=f"black box {black_box_accuracy:.3f}")
    ax.axhline(0.95 * black_box_accuracy, color="grey", ls=":", label="0.95 × black box")
    ax.plot([max_dims], [symbolic_accuracy], "s", color="C3", ms=8, label=f"symbolic ({max_dims} dims) "
            f"{symbolic_accuracy:.3f}")
    ax.set_xlabel("latent dimensions per class rule")
    ax.set_ylabel("accuracy (judged split, seen classes)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def plot_symbolic_fronts(path: Path, section: dict) -> None:
    """Per class, the Pareto front of its expressions: one-vs-rest accuracy against length."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    for i, (name, entry) in enumerate(section["classes"].items()):
        front = entry["front"]
        ax.plot([p["length"] for p in front], [p["one_vs_rest_accuracy"] for p in front], "o-", ms=3,
                color=plt.get_cmap("tab10")(i % 10), label=f"{name} (chosen length {entry['length']})")
        chosen = next(p for p in front if p["expression"] == entry["expression"])
        ax.plot([chosen["length"]], [chosen["one_vs_rest_accuracy"]], "*", ms=12, color=plt.get_cmap("tab10")(i % 10))
    ax.set_xlabel("expression length (nodes)")
    ax.set_ylabel("one-vs-rest accuracy (judged split)")
    ax.set_title(f"Symbolic class models: Pareto fronts (argmax accuracy {section['accuracy']:.3f})", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, path)


def plot_traversals(path: Path, images: np.ndarray, classes: Sequence[str], steps_sd: np.ndarray, what: str) -> None:
    """Mosaic of images (K, L, S, H, W): rows latent dims, a block of S steps per class; each
    (class, dim) block has its own grey scale, so the change along the traversal shows."""
    k, n, s, h, w = images.shape
    mosaic = np.full((n * (h + 1), k * (s * w + 2)), np.nan)
    for c in range(k):
        for j in range(n):
            block = images[c, j]
            lo, hi = float(block.min()), float(block.max())
            block = (block - lo) / (hi - lo) if hi > lo else np.zeros_like(block)
            x0 = c * (s * w + 2)
            mosaic[j * (h + 1): j * (h + 1) + h, x0: x0 + s * w] = np.concatenate(list(block[:, ::-1]), axis=1)
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * k * s, 30), 1 + 0.5 * n), layout="constrained")
    ax.imshow(mosaic, cmap="gray", interpolation="nearest")
    ax.set_yticks([j * (h + 1) + h / 2 for j in range(n)], [f"z{j}" for j in range(n)])
    ax.set_xticks([c * (s * w + 2) + s * w / 2 for c in range(k)], list(classes), rotation=30, ha="right", fontsize=8)
    steps = ", ".join(f"{v:+.1f}" for v in steps_sd)
    ax.set_title(f"Latent traversals around each class mean ({what}; steps {steps} SD)", fontsize=10)
    save_figure(fig, path)


def plot_image_montage(path: Path, images: np.ndarray, labels: Sequence[str], classes: Sequence[str],
                       per_class: int, title: str) -> None:
    """A grid of 2D images (n, H, W): one row per class (``classes`` order, then ``unknown``), its first
    ``per_class`` images, each with its own grey scale."""
    labels = np.asarray([str(v) for v in labels], dtype=object)
    rows = [c for c in [*classes, UNKNOWN] if (labels == c).any()]
    rows += sorted(set(labels) - set(rows))
    cols = min(per_class, max(int((labels == r).sum()) for r in rows))
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.1 * cols + 1.0, 1.1 * len(rows) + 0.5), squeeze=False)
    for r, name in enumerate(rows):
        picks = np.nonzero(labels == name)[0][:cols]
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(picks):
                ax.imshow(images[picks[c]], cmap="gray", interpolation="nearest")
            else:
                ax.set_axis_off()
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center")
    fig.suptitle(title)
    save_figure(fig, path)
