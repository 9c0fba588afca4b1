"""Diffusion Transformer (Peebles & Xie, ICCV 2023), class-conditional, plain PyTorch.

Two block types (METHOD.md section 1): `adaln_zero` from the DiT paper, and `xattn_pool`, the block
the released Class-N-Diff code trains. Optional skin-tone conditioning adds a second embedding to c.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# name -> (depth, hidden, heads). S/B/L/XL are the DiT paper's; T and XS train on a laptop CPU.
SIZES: dict[str, tuple[int, int, int]] = {
    "T": (2, 64, 4),
    "XS": (4, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [cos | sin] as in DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, (grid*grid, dim), the layout DiT uses."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    # DiT's order: the first half embeds the column coordinate, the second the row.
    return np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class LabelEmbedder(nn.Module):
    """Embeds labels; index `num_classes` is the null label (dropped for classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden: int, dropout: float, null: bool | None = None):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        null = dropout > 0 if null is None else null  # DiT has a null row only when it drops labels
        self.table = nn.Embedding(num_classes + int(null), hidden)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.table(labels)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, d/H)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class PoolCrossAttention(nn.Module):
    """One query (the conditioning vector) attends over the image tokens. `one_qkv`: q, k and v are
    the rows of one (3D, D) matrix, initialised as one, as the released block's; else q and kv are
    two layers (the same parameter count, initialised apart)."""

    def __init__(self, hidden: int, heads: int, one_qkv: bool = False):
        super().__init__()
        self.heads = heads
        if one_qkv:
            self.qkv = nn.Linear(hidden, 3 * hidden)
        else:
            self.q = nn.Linear(hidden, hidden)
            self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def _q_kv(self, c: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(self, "qkv"):
            return self.q(c), self.kv(x)
        d = c.shape[-1]
        w, b = self.qkv.weight, self.qkv.bias
        return F.linear(c, w[:d], b[:d]), F.linear(x, w[d:], b[d:])

    def forward(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.heads
        q, kv = self._q_kv(c, x)
        q = q.view(n, 1, h, d // h).transpose(1, 2)  # (N, H, 1, d/H)
        k, v = kv.view(n, t, 2, h, d // h).permute(2, 0, 3, 1, 4)  # (N, H, T, d/H) each
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, 1, d/H)
        return self.proj(out.transpose(1, 2).reshape(n, 1, d))  # (N, 1, D)


def mlp(hidden: int, ratio: float) -> nn.Sequential:
    inner = int(hidden * ratio)
    return nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"),
                         nn.Linear(inner, hidden))


class AdaLNZeroBlock(nn.Module):
    """DiT block: LayerNorms modulated (shift, scale, gate) by c; zero-init so it starts as identity."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp(hidden, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def init_zero(self) -> None:
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)  # (N, D) each
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class XAttnPoolBlock(nn.Module):
    """The released code's block: self-attention, a pooled cross-attention from c, an MLP.
    `released`: its non-affine LayerNorms and one qkv matrix (model.xattn_variant)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, released: bool = False):
        super().__init__()
        affine = not released
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=affine)
        self.attn = Attention(hidden, heads)
        self.norm_kv = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=affine)
        self.cross = PoolCrossAttention(hidden, heads, one_qkv=released)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=affine)
        self.mlp = mlp(hidden, mlp_ratio)

    def init_zero(self) -> None:
        """The released block has no zero-init (METHOD.md section 1)."""

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross(c, self.norm_kv(x))  # (N, 1, D) broadcast to every token
        return x + self.mlp(self.norm2(x))


BLOCKS = {"adaln_zero": AdaLNZeroBlock, "xattn_pool": XAttnPoolBlock,
          "xattn_pool_released": functools.partial(XAttnPoolBlock, released=True)}


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional DiT on (N, C, H, W) inputs; predicts epsilon (and the variance range)."""

    # Every setting comes from the config (build_dit; house rule 3); mlp_ratio is DiT's constant.
    def __init__(self, input_size: int, patch_size: int, in_channels: int, depth: int, hidden: int,
                 heads: int, num_classes: int, class_dropout: float, learn_sigma: bool, block: str,
                 tone_groups: int, tone_dropout: float, grad_checkpoint: bool = False,
                 mlp_ratio: float = 4.0):
        super().__init__()
        assert hidden % heads == 0 and input_size % patch_size == 0
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size, self.input_size, self.num_classes = patch_size, input_size, num_classes
        self.tone_groups, self.grad_checkpoint = tone_groups, grad_checkpoint
        self.x_embedder = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden, class_dropout)
        # Skin-tone group as an extra condition (the released code loads it and ignores it).
        # Its null row always exists: "tone not given" is a valid request.
        self.tone_embedder = (LabelEmbedder(tone_groups, hidden, tone_dropout, null=True)
                              if tone_groups else None)
        grid = input_size // patch_size
        # Frozen, but a Parameter so counts match the DiT paper's.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden), requires_grad=False)
        self.blocks = nn.ModuleList(BLOCKS[block](hidden, heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def xavier(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(xavier)
        grid = int(self.pos_embed.shape[1] ** 0.5)
        pe = sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        if self.tone_embedder is not None:
            nn.init.normal_(self.tone_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            blk.init_zero()
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        p, c = self.patch_size, self.out_channels
        g = self.input_size // p
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                tone: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C, H, W), t (N,), y (N,) in [0, num_classes] -> (N, out_channels, H, W)."""
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        if self.tone_embedder is not None:
            if tone is None:  # unspecified tone = the null group
                tone = torch.full_like(y, self.tone_groups)
            c = c + self.tone_embedder(tone)
        for blk in self.blocks:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                h = checkpoint(blk, h, c, use_reentrant=False)  # activations recomputed in backward
            else:
                h = blk(h, c)
        return self.unpatchify(self.final_layer(h, c))


def build_dit(cfg) -> DiT:
    """The DiT a Config describes (`cfg` is a cnd_ray.config.Config)."""
    depth, hidden, heads = SIZES[cfg.model.size]
    m = cfg.model
    return DiT(input_size=cfg.input_size, patch_size=m.patch_size, in_channels=cfg.in_channels,
               depth=depth, hidden=hidden, heads=heads, num_classes=m.num_classes,
               class_dropout=m.class_dropout, learn_sigma=m.learn_sigma,
               block=f"{m.block}_released" if m.block == "xattn_pool" and m.xattn_variant == "released" else m.block,
               tone_groups=m.tone_groups, tone_dropout=m.tone_dropout, grad_checkpoint=m.grad_checkpoint)
