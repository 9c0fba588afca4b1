"""The latent-space VAE (a diffusers AutoencoderKL), loaded only from a local folder. Plain PyTorch.

Ingest encodes with it; training's sample grids and `cnd-ray sample` decode with it. Which folder:
`data.vae` when set, else the one the shards were encoded with (their manifest records it).
"""
from __future__ import annotations

import os

import torch

from cnd_ray.errors import UserError


def folder_for(cfg, manifest) -> str:
    """The VAE folder of a latent-space run (`manifest`: the shards' shardset.Manifest); UserError
    when it is not on this machine."""
    folder = cfg.data.vae or (manifest.latent or {}).get("vae", "")
    if not folder:
        raise UserError(f"data.vae: the shards in {cfg.data.shards} record no VAE; set data.vae=FOLDER")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"data.vae: no VAE at {folder} (a diffusers AutoencoderKL folder with "
                        "config.json and weights; set data.vae=FOLDER where it lives on this machine)")
    return folder


def for_run(cfg, device: str | torch.device = "cpu"):
    """The VAE that decodes a run's samples: None in pixel space; UserError when a latent run's
    VAE is not on this machine."""
    if cfg.data.space == "pixel":
        return None
    from cnd_ray.data import shardset

    return load(folder_for(cfg, shardset.read_manifest(cfg.data.shards)), device)


def load(folder: str, device: str | torch.device = "cpu"):
    """The AutoencoderKL saved in `folder`, in eval mode; never downloads."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, local_files_only=True).to(device).eval()


@torch.no_grad()
def to_pixels(x: torch.Tensor, vae=None, latent_scale: float = 1.0) -> torch.Tensor:
    """Model-space samples (N, C, h, w) -> uint8 RGB (N, 3, H, W) on the CPU: latents are divided by
    the scale and decoded; pixel-space samples in [-1, 1] are only rescaled."""
    if vae is not None:
        x = vae.decode(x.to(vae.dtype) / latent_scale).sample.float()
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_parts(vae) -> tuple[dict, dict]:
    """(config, state dict) of a loaded VAE: what a Ray actor on another node rebuilds it from."""
    return dict(vae.config), vae.state_dict()


def from_parts(config: dict, state: dict, device: str | torch.device = "cpu"):
    """The VAE `to_parts` described, in eval mode."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(config)
    vae.load_state_dict(state)
    return vae.to(device).eval()
