"""The distributed runtime a training step runs on: gradient averaging and agreement over the
process group Ray Train set up, object gathering, per-rank seeds. Torch only (house rule 1), so
bench scripts time exactly the code a training step runs.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from cnd_ray import engine

BUCKET_BYTES = 25 * 2 ** 20  # gradients are averaged in flat buckets of about this size


def runtime(autocast: Callable, scaler, device, world: int, overlap: nn.Module | None = None) -> engine.Runtime:
    """An engine.Runtime: `autocast` and `scaler` (accelerate's), gradient averaging and a logical
    AND across the `world` ranks of torch.distributed's default group (nothing to do with one).
    `overlap`: the module (the DiT) whose gradients are averaged while backward runs."""
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

    return engine.Runtime(autocast=autocast, average=average, all_finite=all_finite, scaler=scaler,
                          overlap=None if overlap is None else OverlappedAverage(overlap, world))


class OverlappedAverage:
    """A module's gradients averaged over the ranks while backward is still running, as DDP does,
    without wrapping the module (a step may run the DiT twice, `reference`, or through a frozen
    critic, and its state dict keeps its keys).

    Parameters sit in fixed buckets of about BUCKET_BYTES, last layers first (backward reaches them
    first). Once `arm`ed (the step's last micro-batch), each parameter's post-accumulate-grad hook
    marks it ready; a bucket whose parameters are all ready is all-reduced asynchronously, buckets in
    order, so every rank issues the same collectives in the same order. `finish` launches what is
    left (a parameter without a gradient this step counts as zeros and keeps None), waits, and writes
    the means back."""

    def __init__(self, module: nn.Module, world: int, bucket_bytes: int = BUCKET_BYTES):
        self.world, self.buckets, size = world, [[]], 0
        for p in reversed([p for p in module.parameters() if p.requires_grad]):
            if size >= bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * 4  # averaged in float32
        self.bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b}
        for p in self.bucket_of:
            p.register_post_accumulate_grad_hook(self._ready)
        self._reset()

    def _reset(self) -> None:
        self.armed, self.next, self.launched = False, 0, []
        self.waiting = [len(b) for b in self.buckets]

    def arm(self) -> None:
        """The next backward is the step's last: its gradients are final."""
        self.armed = True

    def _ready(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        self.waiting[self.bucket_of[p]] -= 1
        while self.next < len(self.buckets) and self.waiting[self.next] == 0:
            self._launch()

    def _launch(self) -> None:
        import torch.distributed as dist

        params = self.buckets[self.next]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params])
        self.launched.append((dist.all_reduce(flat, async_op=True), flat, params))
        self.next += 1

    def finish(self) -> None:
        """After the step's backward: every bucket reduced, each gradient the mean over ranks."""
        while self.next < len(self.buckets):
            self._launch()
        for handle, flat, params in self.launched:
            handle.wait()
            flat /= self.world
            offset = 0
            for p in params:
                if p.grad is not None:
                    p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        self._reset()


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
