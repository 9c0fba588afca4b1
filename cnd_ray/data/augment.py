"""Stream batch -> model input, on the training worker with its own (checkpointed) torch RNG:
a random horizontal flip, and in latent space a draw z = scale * (mu + sigma * xi) from the stored
posterior of the image or of its flip (METHOD.md section 1). Plain PyTorch."""
from __future__ import annotations

import torch

from cnd_ray.config import Config

FITZPATRICK_TYPES = 6


def model_batch(batch: dict, cfg: Config, generator: torch.Generator | None = None) -> dict:
    """A stream batch -> {"x", "y", "id"[, "tone"]} for engine.train_step, with random h-flips."""
    y = batch["label"].long()
    n = y.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5  # (N,)
    if cfg.data.space == "pixel":
        x = batch["image"].float() / 127.5 - 1.0  # (N, 3, S, S) in [-1, 1]
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    else:
        shape = (n, 2, cfg.in_channels, cfg.input_size, cfg.input_size)
        pick = torch.arange(n), flip.long()  # index 1 = the posterior of the flipped image
        mean = batch["mean"].view(shape)[pick].float()  # (N, C, h, w)
        logvar = batch["logvar"].view(shape)[pick].float()
        xi = torch.randn(mean.shape, generator=generator)
        x = cfg.data.latent_scale * (mean + torch.exp(0.5 * logvar) * xi)
    out = {"x": x, "y": y, "id": batch["row_id"].tolist()}
    if cfg.model.tone_groups:
        out["tone"] = tone_group(batch["tone"].long(), cfg.model.tone_groups)
    return out


def tone_group(fitzpatrick: torch.Tensor, groups: int) -> torch.Tensor:
    """Fitzpatrick type 1..6 -> one of `groups` equal bands (3: I-II / III-IV / V-VI, as DDI);
    unknown (0) -> the null group `groups`."""
    g = (fitzpatrick - 1).clamp(min=0) * groups // FITZPATRICK_TYPES
    return torch.where(fitzpatrick > 0, g, torch.full_like(g, groups))
