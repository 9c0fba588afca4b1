"""Train state (objective, optimizers, EMAs, step) and the one training step. No Ray here."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from cnd_ray.objective import CLEAN, ClassNDiff


class NonFiniteLoss(RuntimeError):
    """A step produced a NaN/inf loss and `train.on_nonfinite` is 'stop'."""


@dataclass
class TrainState:
    """Everything that changes during training; checkpoint.py saves and restores all of it."""

    cfg: object  # cnd_ray.config.Config
    objective: ClassNDiff
    ema: nn.Module  # EMA of the DiT, what sampling uses
    opt_dit: torch.optim.Optimizer
    cls_ema: nn.Module | None = None
    opt_cls: torch.optim.Optimizer | None = None
    step: int = 0
    # Weight of the clean-branch classifier gradients accumulated since its optimizer last stepped.
    cls_pending: float = 0.0

    @property
    def dit(self) -> nn.Module:
        return self.objective.dit

    @property
    def classifier(self) -> nn.Module | None:
        return self.objective.classifier


@dataclass
class Runtime:
    """How a step runs beyond its maths; the defaults are one process in full precision.

    The Ray layer fills these in from accelerate and torch.distributed. Gradients are averaged
    explicitly rather than through DDP wrappers, because a step may run the DiT twice (`reference`)
    or use the classifier frozen (denoised branch), which DDP's hooks do not allow; every rank takes
    the same branch (the shared coin), so every rank averages the same tensors. `overlap` starts
    the DiT's averaging while its backward runs (post-accumulate-grad hooks, bucketed, in order).
    """

    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    average: Callable[[list[torch.Tensor]], None] | None = None  # in-place mean over ranks
    all_finite: Callable[[bool], bool] = lambda ok: ok  # True only if finite on every rank
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling
    # The DiT's gradients averaged while backward runs (distributed.OverlappedAverage: arm() before
    # the step's last backward, finish() after it), in place of `average` for them.
    overlap: object | None = None


def frozen_copy(module: nn.Module) -> nn.Module:
    ema = copy.deepcopy(module).eval()
    return ema.requires_grad_(False)


def build_state(cfg, device: str | torch.device = "cpu") -> TrainState:
    """A fresh train state for `cfg` (models seeded from train.seed)."""
    torch.manual_seed(cfg.train.seed)
    objective = ClassNDiff(cfg).to(device)
    o, c = cfg.optim, cfg.classifier
    cuda = torch.device(device).type == "cuda"  # the GPU-only speed-ups leave a CPU run as it was
    if cuda and c.channels_last and objective.classifier is not None:
        objective.classifier.to(memory_format=torch.channels_last)
    opt_dit = torch.optim.AdamW([p for p in objective.dit.parameters() if p.requires_grad],
                                lr=o.lr, weight_decay=o.weight_decay, fused=(cuda and o.fused) or None)
    state = TrainState(cfg=cfg, objective=objective, ema=frozen_copy(objective.dit), opt_dit=opt_dit)
    if objective.classifier is not None:
        state.opt_cls = torch.optim.SGD(objective.classifier.parameters(), lr=c.lr,
                                        momentum=c.momentum)
        if c.ema:
            state.cls_ema = frozen_copy(objective.classifier)
    return state


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, over parameters and floating buffers (BatchNorm
    running stats); integer buffers (num_batches_tracked) are copied."""
    for e, m in zip(ema.parameters(), model.parameters()):
        e.lerp_(m.detach(), 1.0 - decay)
    for e, m in zip(ema.buffers(), model.buffers()):
        if e.dtype.is_floating_point:
            e.lerp_(m, 1.0 - decay)
        else:
            e.copy_(m)


def _nonfinite_message(state: TrainState, out, batch: dict) -> str:
    ids = batch.get("id")
    where = f" on samples {list(ids)[:8]}" if ids is not None else ""
    vals = ", ".join(f"{k}={float(v):.4g}" for k, v in out.metrics.items()
                     if k.startswith("loss"))
    return (f"non-finite loss at step {state.step} ({vals}){where}; "
            "set train.on_nonfinite=skip to skip such steps")


def _grads_of(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.grad is not None]


def train_step(state: TrainState, micro_batches: list[dict], rt: Runtime | None = None) -> dict[str, float]:
    """One optimizer step of the DiT over `optim.grad_accum` micro-batches.

    Each batch is {"x": (N, C, H, W), "y": (N,), optional "tone": (N,), optional "id": [...]}.
    The classifier's optimizer steps once every `classifier.step_every` steps, on its gradients
    from the clean branches in between, averaged (METHOD.md section 3, Settings 3 and 5).
    """
    cfg, objective = state.cfg, state.objective
    rt = rt or Runtime()
    objective.train()
    accum = len(micro_batches)
    totals: dict[str, float] = {}
    pending = 0.0  # this step's share of clean-branch batches: what the classifier's grads average
    skip = cfg.train.on_nonfinite == "skip"
    # A non-finite batch would poison BatchNorm running stats in its forward: keep a copy to
    # restore when the step is skipped (buffers are small next to the weights).
    saved = [b.clone() for b in objective.buffers()] if skip else []
    for i, batch in enumerate(micro_batches):
        with rt.autocast():
            out = objective(batch["x"], batch["y"], state.step, tone=batch.get("tone"))
        if not rt.all_finite(bool(torch.isfinite(out.loss))):  # every rank decides alike
            if not skip:
                raise NonFiniteLoss(_nonfinite_message(state, out, batch))
            return _skip_step(state, saved)
        loss = out.loss.float() / accum
        if rt.overlap is not None and i == accum - 1:
            rt.overlap.arm()
        (rt.scaler.scale(loss) if rt.scaler is not None else loss).backward()
        if out.branch == CLEAN:
            pending += 1.0 / accum
        for k, v in out.metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) / accum

    if rt.overlap is not None:
        rt.overlap.finish()
    elif rt.average is not None:
        rt.average(_grads_of(state.dit))
    for group in state.opt_dit.param_groups:  # a pure function of the step: nothing to checkpoint
        group["lr"] = dit_lr(cfg.optim, state.step)
    norm = _optimizer_step(state.opt_dit, state.dit.parameters(), rt, cfg.optim.grad_clip)
    if norm is not None:
        totals["grad_norm"] = norm
    ema_update(state.ema, state.dit, ema_decay(cfg.optim, state.step))
    if state.opt_cls is not None:
        totals["cls_step"] = float(_classifier_step(state, pending, rt))
    if rt.scaler is not None:
        rt.scaler.update()
    state.step += 1
    return totals


def _optimizer_step(opt: torch.optim.Optimizer, params, rt: Runtime, clip: float = 0.0) -> float | None:
    """Unscale (mixed precision), clip to `clip` (0: no clipping), step and zero one optimizer;
    returns the gradient norm when it clipped."""
    if rt.scaler is not None:
        rt.scaler.unscale_(opt)
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip)) if clip > 0 else None
    if rt.scaler is not None:
        rt.scaler.step(opt)
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def _classifier_step(state: TrainState, pending: float, rt: Runtime) -> bool:
    """Add this step's clean batches to the classifier's pending share and, every
    `classifier.step_every` steps, step it on the average of its accumulated gradients. Whether
    it stepped."""
    cfg = state.cfg
    state.cls_pending += pending
    if (state.step + 1) % cfg.classifier.step_every or state.cls_pending <= 0:
        return False
    for p in state.classifier.parameters():
        if p.grad is not None:
            p.grad.div_(state.cls_pending)
    if rt.average is not None:  # grads, and BatchNorm statistics so ranks stay identical
        rt.average(_grads_of(state.classifier)
                   + [b for b in state.classifier.buffers() if b.dtype.is_floating_point])
    _optimizer_step(state.opt_cls, state.classifier.parameters(), rt)
    state.cls_pending = 0.0
    if state.cls_ema is not None:
        ema_update(state.cls_ema, state.classifier, cfg.classifier.ema_decay)
    return True


def _skip_step(state: TrainState, saved: list[torch.Tensor]) -> dict[str, float]:
    """train.on_nonfinite=skip: restore the buffers the bad forward touched, drop every pending
    gradient (the classifier's accumulated ones too: they are mixed in the same .grad tensors),
    and move on to the next step's data."""
    for b, v in zip(state.objective.buffers(), saved):
        b.copy_(v)
    state.opt_dit.zero_grad(set_to_none=True)
    if state.opt_cls is not None:
        state.opt_cls.zero_grad(set_to_none=True)
        state.cls_pending = 0.0
    state.step += 1
    return {"skipped": 1.0}


def dit_lr(optim, step: int) -> float:
    """The DiT's learning rate at `step` (0-based): a linear warm-up over optim.warmup_steps, then
    constant (the paper's constant rate when warmup_steps is 0)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    return optim.lr


def ema_decay(optim, step: int) -> float:
    """The DiT EMA's decay after step `step` (0-based): optim.ema_decay, capped during warm-up."""
    if optim.ema_warmup:
        return min(optim.ema_decay, (1 + step) / (10 + step))
    return optim.ema_decay


def split_batch(batch: dict, accum: int) -> list[dict]:
    """Cut one per-worker batch into `accum` micro-batches."""
    n = len(batch["x"])
    size = n // accum
    return [{k: (v[i * size:(i + 1) * size] if v is not None else None) for k, v in batch.items()}
            for i in range(accum)]
