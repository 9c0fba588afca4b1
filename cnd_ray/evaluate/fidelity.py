"""Class fidelity: a benign/malignant classifier trained apart from the diffusion model, to judge
whether samples show the class they were asked for. Plain PyTorch on uint8 pixel images.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cnd_ray import config as config_lib, weights
from cnd_ray.errors import UserError
from cnd_ray.evaluate.features import signed
from cnd_ray.models.classifier import Classifier, load_backbone


def train(images: torch.Tensor, labels: np.ndarray, backbone: str, steps: int, batch: int = 32,
          lr: float = 1e-2, seed: int = 0, device="cpu", progress=None,
          sample_weights: np.ndarray | None = None, backbone_weights: str = "") -> Classifier:
    """A Classifier trained on uint8 (N, 3, H, W) images; returned in eval mode. Batches draw
    images with probability `sample_weights` (default: the two classes equally often, as the data
    are ~10% malignant); the backbone starts from `backbone_weights` (a local file) or random init."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == len(labels):
        raise UserError(f"classifier training: its images need both classes "
                        f"(got {len(labels) - n_pos} benign, {n_pos} malignant)")
    if sample_weights is None:
        sample_weights = np.where(labels, 0.5 / n_pos, 0.5 / (len(labels) - n_pos))
    probs = torch.as_tensor(np.asarray(sample_weights, np.float64) / np.sum(sample_weights))
    assert len(probs) == len(labels) and batch >= 2, (len(probs), len(labels), batch)
    device = torch.device(device)
    y_all = torch.from_numpy(labels.astype(np.float32))
    # Seeded init and dropout without disturbing the caller's RNG; batches and flips use `g`.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = _classifier(backbone)
        if backbone_weights:
            load_backbone(model, backbone_weights)
        model = model.to(device).train()
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        for step in range(steps):
            idx = torch.multinomial(probs, batch, replacement=True, generator=g)  # (B,)
            x = signed(images[idx]).to(device)  # (B, 3, H, W)
            flip = (torch.rand(2, batch, 1, 1, 1, generator=g) < 0.5).to(device)  # (2, B, 1, 1, 1)
            x = torch.where(flip[0], x.flip(-1), x)
            x = torch.where(flip[1], x.flip(-2), x)
            loss = F.binary_cross_entropy_with_logits(model(x), y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress is not None:
                progress(step + 1)
    return model.eval()


@torch.no_grad()
def scores(model, images: torch.Tensor, batch: int = 128) -> np.ndarray:
    """float64 (N,) malignant logits of uint8 (N, 3, H, W) images."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(signed(images[i:i + batch]).to(device)).double().cpu() for i in range(0, len(images), batch)]
    return torch.cat(out).numpy() if out else np.zeros(0)


def save(model, path, meta: dict) -> None:
    """One .pt file: {"state_dict", "meta"}; meta holds backbone, steps, lr, seed and val AUROC."""
    assert "backbone" in meta, meta
    # Through JSON so that load(weights_only=True) meets only plain types (no numpy scalars).
    meta = json.loads(json.dumps(meta))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "meta": meta}, path)


def empty(backbone: str) -> Classifier:
    """A Classifier to load weights into. Its random init draws from a forked RNG: a training worker
    loads the judge after restoring its RNG from a checkpoint, and must continue exactly from it."""
    with torch.random.fork_rng(devices=[]):
        return _classifier(backbone)


def _classifier(backbone: str) -> Classifier:
    """The judge's network on RGB: the critic's head at its default shape (ClassifierConfig), fixed
    so that every judge file holds the same architecture for its backbone."""
    c = config_lib.ClassifierConfig
    return Classifier(backbone, 3, c.hidden, c.dropout)


def load(path) -> tuple[Classifier, dict]:
    """The classifier save() wrote (eval mode, CPU) and its meta."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"fidelity classifier: {path} does not exist")
    blob = weights.load(path)
    meta = blob["meta"]
    model = empty(meta["backbone"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), meta
