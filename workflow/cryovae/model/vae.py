"""The affinity-VAE: encoder (shape latent + explicit pose) and a CNN or splat decoder.

With ``n_classes`` > 0 it is also the semi-supervised rotationally invariant VAE (ss-rVAE, the
M2 model of Kingma et al. on an invariant encoder, as in Ziatdinov, Kalinin et al. 2024): a
classifier q(y|x), and a decoder p(x|z, y) that receives the class (one-hot, or a distribution
over classes) beside the shape latent.  Pose stays explicit, so the class and the latent carry
what the particle is, the pose where it points.  The classifier reads (``classifier_input``):

- ``canonical``: the particle moved back into the model's canonical frame by the encoder's own
  pose (no gradient to the pose), through a CNN of its own: it inherits the invariance the pose
  gives, so a class learnt on upright particles holds for turned ones;
- ``trunk``: the encoder's last hidden layer (invariant only as far as training makes it).

Where the shape latent reads the particle (``shape_frame``):

- ``particle``: as it lies; one encoder gives the latent and the pose, so any pose the encoder
  gets wrong leaks into the latent;
- ``matched``: turned upright by a pose from outside the model (each particle's best-fit
  template-matched pose, reference-from-particle applied), so the latent encoder sees shape
  alone, the same in training and at inference; the decoder's volume is put back in that
  pose and compared with the particle as it lies (under the particle's own wedge), and a
  separate pose encoder reads the particle as it lies for the network's own pose.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cryovae.model.decoders import CnnDecoder, SplatDecoder
from cryovae.model.encoder import Encoder, rotation_3x3
from cryovae.volumes import rigid_transform

Frame = tuple[torch.Tensor, torch.Tensor]   # rotation (n, 3, 3) particle-from-reference, shift (n, 3) voxels


class AffinityVAE(nn.Module):
    """Shape latent + pose -> reconstruction, for 2D images (H, W) or 3D volumes (D, H, W).

    Inputs are (n, 1, *spatial_shape).  The pose is explicit: the decoder builds the
    canonical-frame volume of the shape latent and the predicted pose moves it into the
    particle frame, so the latent carries shape, the pose carries orientation and shift.
    """

    def __init__(
        self,
        spatial_shape: tuple[int, ...] | list[int],
        channels: list[int],
        latent_dims: int,
        decoder: str = "cnn",
        n_splats: int = 128,
        hidden: int = 256,
        pixel_size_angstrom: float = 1.0,
        n_classes: int = 0,
        classifier_input: str = "canonical",
        shape_frame: str = "particle",
    ):
        super().__init__()
        spatial_shape = tuple(int(s) for s in spatial_shape)
        if len(spatial_shape) not in (2, 3):
            raise ValueError(f"expected 2D (H, W) or 3D (D, H, W) data, got spatial shape {spatial_shape}")
        self.config = {
            "spatial_shape": list(spatial_shape), "channels": [int(c) for c in channels],
            "latent_dims": int(latent_dims), "decoder": decoder, "n_splats": int(n_splats),
            "hidden": int(hidden), "pixel_size_angstrom": float(pixel_size_angstrom),
        }
        if n_classes:   # absent from plain models' files, which therefore load unchanged
            self.config["n_classes"] = int(n_classes)
            self.config["classifier_input"] = classifier_input
        if shape_frame not in ("particle", "matched"):
            raise ValueError(f"shape_frame must be 'particle' or 'matched', got {shape_frame!r}")
        if shape_frame == "matched":   # absent from particle-frame models' files, which load unchanged
            if len(spatial_shape) != 3:
                raise ValueError("shape_frame 'matched' needs 3D subtomograms (poses come from template matching)")
            self.config["shape_frame"] = shape_frame
        self.shape_frame = shape_frame
        if classifier_input not in ("canonical", "trunk"):
            raise ValueError(f"classifier_input must be 'canonical' or 'trunk', got {classifier_input!r}")
        self.n_classes = int(n_classes)
        self.classifier_input = classifier_input
        self.spatial_shape = spatial_shape
        self.pixel_size_angstrom = float(pixel_size_angstrom)
        self.encoder = Encoder(spatial_shape, list(channels), latent_dims, hidden)
        self.pose_encoder = Encoder(spatial_shape, list(channels), 1, hidden) if shape_frame == "matched" else None
        decoder_inputs = latent_dims + self.n_classes
        if decoder == "cnn":
            self.decoder = CnnDecoder(spatial_shape, list(channels), decoder_inputs, hidden)
        elif decoder == "splat":
            self.decoder = SplatDecoder(spatial_shape, n_splats, decoder_inputs, hidden)
        else:
            raise ValueError(f"decoder must be 'cnn' or 'splat', got {decoder!r}")
        self.classifier = None
        if self.n_classes and classifier_input == "trunk":
            self.classifier = nn.Linear(hidden, self.n_classes)
        elif self.n_classes:
            trunk = Encoder(spatial_shape, list(channels), 1, hidden)   # its conv stack and hidden layer
            self.classifier = nn.Sequential(trunk.features, trunk.hidden, nn.Linear(hidden, self.n_classes))
        self.classifier_class_names: list[str] | None = None   # set by training and by load_model

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Everything :class:`AffinityVAE` needs to be rebuilt (plain types)."""
        return dict(self.config)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True,
                y: torch.Tensor | None = None, frame: Frame | None = None) -> dict:
        """x (n, 1, *spatial) -> encoder outputs plus ``z`` (n, L) and ``reconstruction`` (x's shape).

        With ``sample`` the latent is drawn by reparameterisation with noise from
        ``generator`` (a CPU generator, so that runs are reproducible on any device);
        otherwise the mean is used.  A model with classes also returns ``class_logits``
        (n, C), and decodes under ``y`` (n, C) (one-hot labels or class probabilities; by
        default the classifier's own probabilities).  ``frame``: each particle's pose (rotation
        (n, 3, 3) particle-from-reference, shift (n, 3) voxels), which a ``matched`` model needs.
        """
        enc = self.encode_outputs(x, frame)
        if self.classifier is not None:
            enc["class_logits"] = self.class_logits(enc, x)
            if y is None:
                y = torch.softmax(enc["class_logits"], dim=1)
        z = self.sample_latent(enc, generator) if sample else enc["latent_mean"]
        enc["z"] = z
        enc["reconstruction"] = self.decoder.posed(self.decoder_input(z, y), *enc["decoded_pose"])
        return enc

    def encode_outputs(self, x: torch.Tensor, frame: Frame | None = None) -> dict:
        """The encoders' outputs of x (n, 1, *spatial): latent_mean, latent_logvar, hidden (of the
        shape encoder), rotation and shift_voxels (the network's own pose), and ``decoded_pose``,
        the (rotation, shift) the decoder's volume is put in: the network's pose in a
        ``particle`` model, ``frame`` in a ``matched`` one, whose shape encoder reads x put
        upright by it (also returned, as ``upright``)."""
        if self.pose_encoder is None:
            enc = self.encoder(x)
            enc["decoded_pose"] = (enc["rotation"], enc["shift_voxels"])
            return enc
        if frame is None:
            raise ValueError("this model reads particles in their matched frame (shape_frame 'matched'): "
                             "give each particle's pose (the template-matching output)")
        rotation, shift = (t.to(x.device, torch.float32) for t in frame)
        upright = self.canonicalise(x, rotation, shift)
        enc = self.encoder(upright)
        pose = self.pose_encoder(x)
        enc.update(rotation=pose["rotation"], shift_voxels=pose["shift_voxels"], upright=upright,
                   decoded_pose=(rotation, shift))
        return enc

    def class_logits(self, enc: dict, x: torch.Tensor) -> torch.Tensor:
        """q(y|x) as logits (n, C), float32, from the encoder's outputs ``enc`` of ``x``."""
        if self.classifier_input == "trunk":
            return self.classifier(enc["hidden"]).float()
        if "upright" in enc:
            return self.classifier(enc["upright"]).float()
        return self.classifier(self.canonicalise(x, enc["rotation"].detach(), enc["shift_voxels"].detach())).float()

    @staticmethod
    def canonicalise(x: torch.Tensor, rotation: torch.Tensor, shift_voxels: torch.Tensor) -> torch.Tensor:
        """x = T(R, t)(canonical) back in the canonical frame: T(R^T, -R^T t)(x), (n, 1, *spatial)."""
        back = rotation.transpose(1, 2)
        return rigid_transform(x, back, -(back @ shift_voxels[:, :, None])[..., 0]).to(x.dtype)

    @staticmethod
    def sample_latent(enc: dict, generator: torch.Generator | None) -> torch.Tensor:
        """z = mean + eps * sd by reparameterisation, eps from ``generator`` (a CPU generator)."""
        z = enc["latent_mean"]
        eps = torch.randn(z.shape, generator=generator, dtype=z.dtype)
        if z.device.type == "cuda":   # asynchronous copy: a pageable one would wait for the GPU
            eps = eps.pin_memory()
        eps = eps.to(z.device, non_blocking=True)
        return z + eps * torch.exp(0.5 * enc["latent_logvar"])

    def decoder_input(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's input: z (n, L), with the class (n, C) beside it in a model with
        classes (``y`` None: the uniform distribution, the class left open)."""
        if self.classifier is None:
            return z
        if y is None:
            y = torch.full((z.shape[0], self.n_classes), 1.0 / self.n_classes, dtype=z.dtype, device=z.device)
        return torch.cat([z, y.to(z.dtype)], dim=1)

    def class_condition(self, classes: list[str]) -> torch.Tensor | None:
        """The decoder's class input for particles of ``classes``: (k, C) one-hot rows over
        ``classifier_class_names``, the uniform row for a class the classifier lacks (unseen);
        None for a model without classes."""
        if self.classifier is None:
            return None
        names = list(self.classifier_class_names or [])
        rows = torch.full((len(classes), self.n_classes), 1.0 / self.n_classes)
        for i, name in enumerate(classes):
            if name in names:
                rows[i] = 0.0
                rows[i, names.index(name)] = 1.0
        return rows

    @torch.no_grad()
    def class_probabilities(self, x: torch.Tensor, frame: Frame | None = None) -> torch.Tensor:
        """q(y|x): (n, 1, *spatial) -> (n, C) class probabilities (a model with classes only)."""
        if self.classifier is None:
            raise ValueError("this model has no classifier head (trained without training.semi_supervised)")
        return torch.softmax(self.class_logits(self.encode_outputs(x, frame), x), dim=1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, frame: Frame | None = None) -> dict[str, torch.Tensor]:
        """x (n, 1, *spatial) -> latent_mean, latent_logvar (n, L); rotation (n, 3, 3);
        origin_angstrom (n, 3).

        rotation is particle-from-canonical in RELION's convention (2D: about z);
        origin_angstrom is rlnOriginX/Y/ZAngst = -shift * pixel size (2D: z = 0).  A model with
        classes adds class_probabilities (n, C), q(y|x).  ``frame``: as in :meth:`forward`.
        """
        enc = self.encode_outputs(x, frame)
        shift = enc["shift_voxels"]
        if shift.shape[1] == 2:
            shift = torch.cat([shift, torch.zeros_like(shift[:, :1])], dim=1)
        out = {
            "latent_mean": enc["latent_mean"],
            "latent_logvar": enc["latent_logvar"],
            "rotation": rotation_3x3(enc["rotation"]),
            "origin_angstrom": -shift * self.pixel_size_angstrom,
        }
        if self.classifier is not None:
            out["class_probabilities"] = torch.softmax(self.class_logits(enc, x), dim=1)
        return out

    def decode(self, z: torch.Tensor, rotation: torch.Tensor, shift_voxels: torch.Tensor,
               y: torch.Tensor | None = None) -> torch.Tensor:
        """Particle-frame volume (n, 1, *spatial) of latents (n, L) in pose (rotation (n, d, d), shift (n, d));
        ``y`` (n, C): the class of a model with classes (see :meth:`decoder_input`)."""
        return self.decoder.posed(self.decoder_input(z, y), rotation, shift_voxels)

    @torch.no_grad()
    def decode_canonical(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Canonical-frame volume (n, 1, *spatial) of latents (n, L) (and classes ``y`` (n, C))."""
        return self.decoder.canonical(self.decoder_input(z, y))
