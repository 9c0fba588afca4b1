"""The benign/malignant classifier of Class-N-Diff: a timm backbone, a latent adapter, a small head."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from cnd_ray import weights
from cnd_ray.config import ConfigError


class Classifier(nn.Module):
    """timm backbone -> Dropout -> Linear(features, hidden) -> Dropout -> Linear(hidden, 1).

    On non-RGB inputs (4-channel latents) the released code puts a Conv2d(C->3, kernel 2, stride 1,
    padding 1) in front of the backbone; we keep it (METHOD.md section 1). No activation between the
    two head layers, as released.
    """

    def __init__(self, backbone: str, in_channels: int, hidden: int, dropout: float):
        super().__init__()
        self.adapter = (nn.Conv2d(in_channels, 3, kernel_size=2, stride=1, padding=1)
                        if in_channels != 3 else nn.Identity())
        try:
            # Weights never come from a hub: random init here, a local file via load_backbone().
            self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0)
        except RuntimeError as e:  # timm's "Unknown model"
            raise ConfigError(f"classifier.backbone: {e}") from None
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.backbone.num_features, hidden),
                                  nn.Dropout(dropout), nn.Linear(hidden, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, F): the backbone's pooled features, which the head reads."""
        return self.backbone(self.adapter(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N,) logits of 'malignant'."""
        return self.head(self.features(x)).squeeze(1)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors / .pt / .pth file (tensors only, CPU)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"classifier.weights: {path} does not exist (weights load only from a "
                          "local file; download them beforehand)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path), device="cpu")
    else:
        sd = weights.load(path, name=f"classifier.weights: {path}")
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    return sd


def load_backbone(model: Classifier, path: str | Path) -> int:
    """Load ImageNet weights into the backbone; the original fc is skipped. Returns tensors loaded."""
    own = model.backbone.state_dict()
    sd = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(f"classifier.weights: no tensor in {path} fits the backbone "
                          f"{type(model.backbone).__name__}; is it the right model?")
    model.backbone.load_state_dict(usable, strict=False)
    return len(usable)


def build_classifier(cfg) -> Classifier:
    """The classifier a Config describes (`cfg` is a cnd_ray.config.Config)."""
    c = cfg.classifier
    model = Classifier(c.backbone, cfg.in_channels, c.hidden, c.dropout)
    if c.weights:
        load_backbone(model, c.weights)
    return model
