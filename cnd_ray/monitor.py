"""What training shows about itself: held-out losses, classifier AUROC, sample grids, and the images
the judge scores at every evaluation (cnd_ray.evaluate.judge). Plain PyTorch."""
from __future__ import annotations

import numpy as np
import torch

from cnd_ray import generate
from cnd_ray.evaluate.metrics import auroc


@torch.no_grad()
def evaluate(state, batches: list[dict], seed: int = 0) -> dict[str, float]:
    """Held-out diffusion loss of the EMA model (fixed t and noise) and the classifier's val AUROC."""
    diffusion = state.objective.diffusion
    classifier = state.cls_ema if state.cls_ema is not None else state.classifier
    g = torch.Generator().manual_seed(seed)  # the same draws at every evaluation: comparable curves
    losses, scores, labels = [], [], []
    for batch in batches:
        x0, y = batch["x"], batch["y"]
        t = torch.randint(0, diffusion.num_timesteps, (len(x0),), generator=g).to(x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        xt = diffusion.q_sample(x0, t, noise)
        out = state.ema(xt, t, y, batch.get("tone"))
        losses.append(diffusion.training_losses(out, x0, xt, t, noise)["loss"].mean().item())
        if classifier is not None:
            was = classifier.training
            classifier.eval()
            scores += classifier(x0).float().cpu().tolist()
            classifier.train(was)
            labels += y.cpu().tolist()
    out = {"val_loss_diff": float(np.mean(losses))} if losses else {}
    if labels:
        out["val_auroc"] = auroc(labels, scores)
    return out


@torch.no_grad()
def sample_grid(state, per_class: int = 8, seed: int = 0, vae=None) -> np.ndarray:
    """(rows = classes, cols = per_class) grid of EMA samples as one uint8 (H, W, 3) image, decoded
    by `vae` in latent space, drawn by the one generation path (`generate.Generator`, as `cnd-ray
    sample`) with the in-training sampler (`search_config`: the run's own, DDPM-250 at the paper's
    setting, would take over an hour for DiT-L on a CPU); image i from seed (seed, i) at every
    call, so grids over training are comparable."""
    k = state.cfg.model.num_classes
    rows = generate.plan(per_class * k, [1.0] * k, seed, per_class * k)
    gen = generate.Generator(search_config(state.cfg), state.ema, vae, next(state.ema.parameters()).device)
    return tile(gen(rows["seed"], rows["label"], rows["tone"]).cpu(), rows["label"], per_class)


def search_config(cfg):
    """cfg with the in-training sampler (eval.search_sampler x eval.search_sample_steps) in place of
    the run's own: what `sample_images` draws with, so `cnd-ray sample` can redraw the same pixels."""
    from cnd_ray import config as config_lib

    e = cfg.eval
    return config_lib.override(cfg, {"diffusion.sampler": e.search_sampler,
                                     "diffusion.sample_steps": e.search_sample_steps})


def sample_plan(cfg) -> dict:
    """The images every in-training evaluation draws: eval.search_samples per class, image i from
    seed (eval.seed, i), the same at every evaluation so the curves compare."""
    k = cfg.model.num_classes
    return generate.plan(cfg.eval.search_samples * k, [1.0] * k, cfg.eval.seed, cfg.eval.batch_size)


@torch.no_grad()
def sample_images(state, rows: dict, vae=None, rank: int = 0, world: int = 1) -> tuple[np.ndarray, torch.Tensor]:
    """This rank's share of the plan `rows` from the EMA model: (plan indices (M,), uint8 images
    (M, 3, S, S)). Chunk c is drawn by rank c % world; an image depends on its seed only, so the
    union over ranks is the same whatever the number of ranks."""
    device = next(state.ema.parameters()).device
    gen = generate.Generator(search_config(state.cfg), state.ema, vae, device)
    mine = np.flatnonzero(rows["chunk"] % world == rank)
    images = [gen(rows["seed"][at], rows["label"][at], rows["tone"][at]).cpu()
              for at in np.split(mine, np.flatnonzero(np.diff(rows["chunk"][mine])) + 1) if len(at)]
    s = state.cfg.data.image_size
    return rows["index"][mine], torch.cat(images) if images else torch.zeros(0, 3, s, s, dtype=torch.uint8)


def tile(images: torch.Tensor, labels: np.ndarray, per_class: int = 8) -> np.ndarray:
    """(rows = classes, cols = the first per_class images of each, black where a class has fewer)
    uint8 (H, W, 3) grid."""
    labels = np.asarray(labels)
    grid = torch.zeros(len(np.unique(labels)), per_class, *images.shape[1:], dtype=images.dtype)
    for r, c in enumerate(np.unique(labels)):
        own = images[np.flatnonzero(labels == c)[:per_class]]
        grid[r, :len(own)] = own
    k, n, ch, h, w = grid.shape
    return grid.permute(0, 3, 1, 4, 2).reshape(k * h, n * w, ch).numpy()
