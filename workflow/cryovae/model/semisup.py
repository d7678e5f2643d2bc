"""The semi-supervised objective (ss-rVAE): labelled particles teach q(y|x), unlabelled ones adapt it.

For a model with classes (:class:`cryovae.model.vae.AffinityVAE` with ``n_classes``), a
batch mixes labelled rows (class_index >= 0) and unlabelled ones (-1):

- labelled: the reconstruction decoded under the true class, and the class-weighted cross
  entropy of q(y|x) (weights inversely proportional to each class's share of the labelled
  training particles, so a rare class counts as much as a common one);
- unlabelled (the M2 objective of Kingma et al. 2014): the ELBO summed over the classes and
  weighted by q(y|x), i.e. E_q(y|x)[reconstruction error under y], plus the KL of q(y|x) from
  the uniform class prior (minus the entropy of q, plus log C).  The expectation runs over the
  ``top_k`` most probable classes, renormalised (0: all C; each class decoded costs one decoder
  pass).

The reconstruction error is the training loss's (per-voxel mean, wedge-masked per row), so the
class KL enters the total with beta, exactly as the latent KL does: both are nats against the
same likelihood scale.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cryovae.model.losses import reconstruction_error


def class_weights(class_index: np.ndarray, n_classes: int) -> torch.Tensor:
    """(C,) cross-entropy weights: inverse class frequency among the labelled rows, mean 1 over
    the classes present (absent classes: weight 0)."""
    counts = np.bincount(class_index[class_index >= 0], minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1.0), 0.0)
    present = counts > 0
    if present.any():
        weights /= weights[present].mean()
    return torch.tensor(weights, dtype=torch.float32)


def labelled_cross_entropy(logits: torch.Tensor, class_index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Class-weighted cross entropy of the labelled rows (weighted mean); zero, with a gradient
    path, when the batch has none."""
    known = class_index >= 0
    if not bool(known.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known], class_index[known], weight=weights.to(logits.device))


def class_kl(logits: torch.Tensor, unlabelled: torch.Tensor) -> torch.Tensor:
    """Mean over the unlabelled rows of KL(q(y|x) || uniform) = log C - H(q); zero without any."""
    if not bool(unlabelled.any()):
        return logits.sum() * 0.0
    log_q = torch.log_softmax(logits[unlabelled], dim=1)
    return (log_q.exp() * log_q).sum(dim=1).mean() + float(np.log(logits.shape[1]))


def expected_reconstruction(model, z: torch.Tensor, enc: dict, x: torch.Tensor, logits: torch.Tensor,
                            fourier_mask: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """Per-row E_q(y|x)[reconstruction error under y] over the ``top_k`` classes: (n,).

    z (n, L) the latent (sampled or mean), enc the encoder's outputs (its ``decoded_pose``),
    x (n, 1, *spatial), logits (n, C); fourier_mask None, (D, H, W') or per row (n, D, H, W')."""
    n, n_classes = logits.shape
    k = n_classes if top_k <= 0 else min(top_k, n_classes)
    probs = torch.softmax(logits, dim=1)
    weight, cls = torch.topk(probs, k, dim=1)
    weight = weight / weight.sum(dim=1, keepdim=True)
    flat = cls.reshape(-1)
    y = F.one_hot(flat, n_classes).to(z.dtype)
    rows = torch.arange(n, device=z.device).repeat_interleave(k)
    rotation, shift = enc["decoded_pose"]
    decoded = model.decode(z[rows], rotation[rows], shift[rows], y=y)
    mask = fourier_mask if fourier_mask is None or fourier_mask.dim() == 3 else fourier_mask[rows]
    errors = reconstruction_error(decoded, x[rows], mask).reshape(n, k)
    return (weight * errors).sum(dim=1)


def semisupervised_terms(model, x: torch.Tensor, class_index: torch.Tensor, fourier_mask: torch.Tensor | None,
                         weights: torch.Tensor, top_k: int, generator: torch.Generator | None,
                         sample: bool, frame=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """One forward pass of a model with classes over a mixed batch: (encoder outputs with ``z``,
    {"recon", "classifier", "class_kl"} scalars).

    recon is the mean over all rows of each row's reconstruction error (labelled: under its
    class; unlabelled: expected under q(y|x)); classifier the labelled cross entropy; class_kl
    the unlabelled rows' KL of q(y|x) from the uniform prior.  ``frame``: each row's pose, for a
    model that reads particles in their matched frame."""
    enc = model.encode_outputs(x, frame)
    logits = model.class_logits(enc, x)
    z = model.sample_latent(enc, generator) if sample else enc["latent_mean"]
    enc.update(z=z, class_logits=logits)
    known = class_index >= 0
    per_row = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    if bool(known.any()):
        mask = fourier_mask if fourier_mask is None or fourier_mask.dim() == 3 else fourier_mask[known]
        y = F.one_hot(class_index[known], model.n_classes).to(z.dtype)
        rotation, shift = enc["decoded_pose"]
        decoded = model.decode(z[known], rotation[known], shift[known], y=y)
        per_row[known] = reconstruction_error(decoded, x[known], mask)
    if not bool(known.all()):
        u = ~known
        mask = fourier_mask if fourier_mask is None or fourier_mask.dim() == 3 else fourier_mask[u]
        sub = {"decoded_pose": tuple(t[u] for t in enc["decoded_pose"])}
        per_row[u] = expected_reconstruction(model, z[u], sub, x[u], logits[u], mask, top_k)
    terms = {
        "recon": per_row.mean(),
        "classifier": labelled_cross_entropy(logits, class_index, weights),
        "class_kl": class_kl(logits, ~known),
    }
    return enc, terms
