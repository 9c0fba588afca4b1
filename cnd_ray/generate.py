"""Many images, reproducibly: a plan of (index, seed, label, tone) rows cut into fixed chunks, and a
`Generator` that turns one chunk into uint8 images. Plain PyTorch; `cnd_ray.launch.sample` spreads the
chunks over Ray actors.

Why an image does not depend on who made it: image i's noise (the start and every step's) comes
from its own generator seeded by (eval.seed, i), and the model sees it in chunk i // eval.batch_size
with the same chunk-mates whatever the number of actors, so even batch-size-dependent kernels give
the same pixels.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from cnd_ray.diffusion import GaussianDiffusion, guided, randn, sample
from cnd_ray.models import build_dit
from cnd_ray.vae import to_pixels

CLASS_NAMES = ("benign", "malignant")
NO_TONE = -1  # plan value for "tone not requested" (the DiT's null tone group)


def class_name(label: int) -> str:
    return CLASS_NAMES[label] if label < len(CLASS_NAMES) else f"class{label}"


def image_seed(seed: int, index: int) -> int:
    """The 32-bit seed of image `index` (SeedSequence mixes both, so nearby runs do not overlap)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def labels_for(shares: list[float], n: int) -> np.ndarray:
    """n labels in the proportions `shares`, interleaved so that every prefix keeps them (the label
    of image i goes to the class furthest behind its share): the first 5k of a 20k plan are a
    well-mixed 5k plan."""
    shares = np.asarray(shares, np.float64) / np.sum(shares)
    counts = np.zeros(len(shares))
    out = np.empty(n, np.int64)
    for i in range(n):
        k = int(np.argmax(shares * (i + 1) - counts))
        out[i] = k
        counts[k] += 1
    return out


def plan(n: int, shares: list[float], seed: int, batch_size: int, tone: int = NO_TONE) -> dict:
    """Columns of the first n images of a generation: index, seed, label, tone, chunk."""
    index = np.arange(n, dtype=np.int64)
    return {"index": index,
            "seed": np.array([image_seed(seed, i) for i in range(n)], np.int64),
            "label": labels_for(shares, n),
            "tone": np.full(n, tone, np.int64),
            "chunk": index // batch_size}


def file_name(index: int, label: int) -> str:
    """Where image `index` lives under the output folder (class folders, as ImageFolder reads)."""
    return f"{class_name(label)}/{index:06d}.png"


class Generator:
    """The EMA DiT of a checkpoint or a training run (and the run's VAE) on one device: chunk rows ->
    uint8 images."""

    def __init__(self, cfg, ema: dict | torch.nn.Module, vae=None, device: str | torch.device = "cpu"):
        """`ema`: the EMA weights (a state dict), or the EMA DiT itself (training's, used as is)."""
        self.cfg, self.device, self.vae = cfg, torch.device(device), vae
        if isinstance(ema, torch.nn.Module):
            self.dit = ema
        else:
            self.dit = build_dit(cfg)
            self.dit.load_state_dict(ema)
            self.dit.to(self.device).eval().requires_grad_(False)
        self.diffusion = GaussianDiffusion.from_config(cfg).to(self.device)
        # bf16 where the run trained in it and a GPU runs it; the sampler's maths stays float32.
        cuda = self.device.type == "cuda"
        bf16 = cuda and cfg.precision(cuda, torch.cuda.is_bf16_supported()) == "bf16"
        self.autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if bf16 else contextlib.nullcontext

    @torch.no_grad()
    def __call__(self, seeds, labels, tones) -> torch.Tensor:
        """Images (N, 3, H, W) uint8 for rows given by their seeds, labels and tones (NO_TONE = none)."""
        cfg, dev = self.cfg, self.device
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        noise = randn((len(gens), cfg.in_channels, cfg.input_size, cfg.input_size), gens, dev)
        y = torch.tensor(np.array(labels), dtype=torch.long, device=dev)
        tone = None
        if cfg.model.tone_groups:
            t = torch.tensor(np.array(tones), dtype=torch.long, device=dev)
            tone = torch.where(t == NO_TONE, cfg.model.tone_groups, t)  # null group when not asked
        d = cfg.diffusion
        fn = guided(self.dit, y, cfg.model.num_classes, d.guidance_scale, tone, d.guidance_channels,
                    d.tone_guidance_scale, cfg.model.tone_groups)
        with self.autocast():
            x = sample(self.diffusion, fn, noise, d.sampler, d.sample_steps, d.eta,
                       clip=1.0 if self.vae is None else 0.0, generator=gens)  # (N, C, h, w)
        return to_pixels(x.float(), self.vae, cfg.data.latent_scale)
