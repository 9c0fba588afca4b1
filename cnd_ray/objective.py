"""The Class-N-Diff joint objective (Munia & Imran 2025), METHOD.md section 3, in one module.

    L = L_diff + lambda * L_cls, gated per step by gamma(step):
      u < gamma  ("denoised"): the classifier, frozen, judges a denoised latent z_d built from the
                                DiT's output; L_cls flows into the DiT through z_d.
      otherwise  ("clean"):    the classifier trains on the clean z0; the DiT on L_diff alone.

The training loop never builds a loss term: it calls `ClassNDiff(...)` and backpropagates `loss`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnd_ray.diffusion import GaussianDiffusion
from cnd_ray.models import build_classifier, build_dit

DIFF, CLEAN, DENOISED = "diff", "clean", "denoised"


def gamma_at(method, step: int) -> float:
    """The probability of the denoised branch at `step` (`method` is a MethodConfig)."""
    s, p = method.gamma_schedule, method.gamma_period
    if s == "off":
        return 0.0
    if s == "constant":
        return method.gamma
    if s == "periodic_ramp":
        # Paper: "periodically increase gamma from 0 to 1". A sawtooth, so the clean branch (the
        # only one that trains the classifier) keeps running; the period is our knob.
        return (step % p) / p
    if s == "ramp":
        return method.gamma * min(1.0, step / p)
    if s == "staircase":
        frac = min(1.0, step / p)
        return method.gamma * min(method.gamma_levels, math.floor(frac * method.gamma_levels) + 1) \
            / method.gamma_levels
    raise AssertionError(s)


def coin(seed: int, step: int) -> float:
    """u ~ U(0, 1) for one step, a pure function of (seed, step); one u per step, shared by all of
    its gradient-accumulation micro-batches.

    Every rank draws the same u, so all replicas take the same branch. The released code draws it
    from each process's RNG: its replicas diverge (METHOD.md section 5) - not reproduced.
    """
    return float(np.random.default_rng((seed, step)).random())


@contextlib.contextmanager
def frozen(module: nn.Module, mode: str = "eval"):
    """Use `module` as a fixed critic: no parameter gradients, while gradients still flow to its
    input. mode "eval": no BatchNorm statistic updates, no dropout; "train" (the released code's
    method.critic_mode): batch statistics, which update the running ones, and dropout."""
    was_training = module.training
    flags = [p.requires_grad for p in module.parameters()]
    module.train(mode == "train").requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)
        module.train(was_training)


@dataclass
class StepOutput:
    """What one forward of the objective gives the loop."""

    loss: torch.Tensor  # scalar to backpropagate (DiT and, on clean steps, classifier terms)
    branch: str  # DIFF (no classifier), CLEAN or DENOISED
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars


class ClassNDiff(nn.Module):
    """Owns the DiT, the classifier (None when gamma is off) and the diffusion process."""

    def __init__(self, cfg, dit: nn.Module | None = None, classifier: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.dit = dit if dit is not None else build_dit(cfg)
        self.classifier = None
        if cfg.use_classifier:  # Setting 1 (gamma off): a plain conditional DiT, no classifier
            self.classifier = classifier if classifier is not None else build_classifier(cfg)
        self.diffusion = GaussianDiffusion.from_config(cfg)

    def gamma(self, step: int) -> float:
        return gamma_at(self.cfg.method, step)

    def forward(self, x0: torch.Tensor, y: torch.Tensor, step: int,
                tone: torch.Tensor | None = None) -> StepOutput:
        """One joint step's loss on a batch x0 (N, C, H, W) with labels y (N,)."""
        diffusion, n = self.diffusion, x0.shape[0]
        t = torch.randint(0, diffusion.num_timesteps, (n,), device=x0.device)
        noise = torch.randn_like(x0)
        xt = diffusion.q_sample(x0, t, noise)
        out = self.dit(xt, t, y, tone)  # the one DiT forward of x0_pred / posterior
        terms = diffusion.training_losses(out, x0, xt, t, noise)
        d = self.cfg.diffusion
        # What is optimised may weight the timesteps (Min-SNR); what is logged as loss_diff stays
        # the unweighted loss, comparable across recipes and with val_loss_diff.
        w = diffusion.mse_weights(t, d.loss_weighting, d.min_snr_gamma)
        loss_diff = (w * terms["mse"] + terms["vb"]).mean()
        metrics = {"loss_diff": terms["loss"].mean().detach(), "mse": terms["mse"].mean().detach(),
                   "vb": terms["vb"].mean().detach()}
        if self.classifier is None:
            return StepOutput(loss_diff, DIFF, metrics)

        g = self.gamma(step)
        target = y.float()
        if coin(self.cfg.train.seed, step) < g:
            z_d = self.denoised(out, x0, xt, t, y, tone)
            with frozen(self.classifier, self.cfg.method.critic_mode) as critic:  # no step, no param grads
                logits = critic(z_d)
            loss_cls = F.binary_cross_entropy_with_logits(logits.float(), target)
            loss, branch = loss_diff + self.cfg.method.lambda_cls * loss_cls, DENOISED
        else:
            logits = self.classifier(x0)
            loss_cls = F.binary_cross_entropy_with_logits(logits.float(), target)
            # Disjoint parameters: one backward gives the DiT L_diff and the classifier L_cls.
            loss, branch = loss_diff + loss_cls, CLEAN
        metrics.update(
            loss_cls=loss_cls.detach(),
            cls_acc=((logits.detach() > 0).float() == target).float().mean(),
            gamma=torch.tensor(g),
            denoised=torch.tensor(float(branch == DENOISED)),
        )
        return StepOutput(loss, branch, metrics)

    def denoised(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                 y: torch.Tensor, tone: torch.Tensor | None) -> torch.Tensor:
        """The latent the critic judges, per `method.denoised_input`; gradients reach the DiT."""
        diffusion, m = self.diffusion, self.cfg.method
        if m.denoised_input == "x0_pred":
            # Paper: "a denoised latent from the diffusion process" - the predicted clean latent
            # of the same forward pass. No extra DiT forward.
            eps, _ = diffusion.split(out.float(), xt.shape[1])
            x0_hat = diffusion.predict_x0(xt, t, eps, clip=self.cfg.critic_clip)
            if m.denoised_grad == "raw":
                return x0_hat
            # Same value, gradient scaled by sqrt(alpha_bar_t) (see MethodConfig.denoised_grad).
            w = diffusion.at(diffusion.sqrt_alphas_cumprod, t, x0_hat.ndim)
            return x0_hat.detach() + w * (x0_hat - x0_hat.detach())
        if m.denoised_input == "posterior":
            pmv = diffusion.p_mean_variance(out, xt, t, clip=self.cfg.critic_clip)
            return diffusion.ancestral_step(pmv, t, torch.randn_like(xt))
        # "reference": parity with the released code - a second DiT forward that treats the clean
        # z0 as if it were x_t at step t, one ancestral step, x0 estimate clamped to [-1, 1].
        out2 = self.dit(x0, t, y, tone)
        pmv = diffusion.p_mean_variance(out2, x0, t, clip=1.0)
        return diffusion.ancestral_step(pmv, t, torch.randn_like(x0))
