"""The distributed runtime a training step runs on: gradient averaging and agreement over the
process group Ray Train set up, object gathering, per-rank seeds. Torch only (house rule 1), so
bench scripts time exactly the code a training step runs.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from cnd_ray import engine

BUCKET_BYTES = 25 * 2 ** 20  # gradients are averaged in flat buckets of about this size


def runtime(autocast: Callable, scaler, device, world: int) -> engine.Runtime:
    """An engine.Runtime: `autocast` and `scaler` (accelerate's), gradient averaging and a logical
    AND across the `world` ranks of torch.distributed's default group (nothing to do with one)."""
    if world == 1:
        return engine.Runtime(autocast=autocast, scaler=scaler)
    import torch.distributed as dist

    def average(tensors: list[torch.Tensor]) -> None:
        bucket, size = [], 0
        for t in tensors + [None]:  # None flushes the last bucket
            if t is not None:
                bucket.append(t)
                size += t.numel() * t.element_size()
            if bucket and (t is None or size >= BUCKET_BYTES):
                flat = torch.cat([b.reshape(-1).float() for b in bucket])
                dist.all_reduce(flat)
                flat /= world
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0

    def all_finite(ok: bool) -> bool:
        flag = torch.tensor([0.0 if ok else 1.0], device=device)
        dist.all_reduce(flag)
        return flag.item() == 0

    return engine.Runtime(autocast=autocast, average=average, all_finite=all_finite, scaler=scaler)


def gather(obj, world: int) -> list:
    """`obj` from every rank, in rank order (every rank calls it)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Distinct noise per rank (identical draws would shrink the effective batch)."""
    return int(np.random.default_rng((seed, rank, step)).integers(2 ** 62))
