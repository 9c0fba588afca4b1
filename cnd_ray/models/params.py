"""Parameter counts of a config's models, without allocating their weights."""
from __future__ import annotations

import torch

from cnd_ray.models.classifier import Classifier
from cnd_ray.models.dit import build_dit


def count(cfg) -> dict[str, int]:
    """All parameters (frozen ones included) of the DiT and the classifier (0 when gamma is off)."""
    with torch.device("meta"):  # shapes only: DiT-XL counts in milliseconds, no 2.7 GB
        dit = build_dit(cfg)
        c = cfg.classifier
        cls = Classifier(c.backbone, cfg.in_channels, c.hidden, c.dropout) if cfg.use_classifier \
            else None
    total = lambda m: 0 if m is None else sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"dit": total(dit), "classifier": total(cls)}
