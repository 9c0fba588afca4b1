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


# The critic's pull is measured per quarter of the noise schedule: PULL_BANDS bands of t, b1 the
# least noisy (docs/METHOD.md, "The critic's pull").
PULL_BANDS = 4


def critic_weight(method, step: int) -> float:
    """lambda_cls at `step`, with method.critic_warmup's linear rise from 0."""
    if method.critic_warmup and step < method.critic_warmup:
        return method.lambda_cls * step / method.critic_warmup
    return method.lambda_cls


def pull_keys(band: int) -> tuple[str, str]:
    """The step metrics that sum the squared gradient norms, at the DiT's output, from the critic and
    from the diffusion loss over the samples of `band` (1-based): `pull` turns them into ratios."""
    return f"pull_cls_sq_b{band}", f"pull_diff_sq_b{band}"


def pull(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` with the denoised branches' accumulators (pull_*: summed or averaged alike over
    steps, ranks or micro-batches) replaced by what they measure: critic_pull_b<k> = sqrt(sum of the
    critic's squared gradient norms at the DiT's output / sum of the diffusion loss's) over band k's
    samples, critic_pull over all of them (a band with no denoised sample is left out); critic_inside,
    the share of samples inside the critic's window, and critic_scale, the balance cap's factor."""
    out = {k: v for k, v in metrics.items() if not k.startswith("pull_")}
    tot = [0.0, 0.0]
    for b in range(1, PULL_BANDS + 1):
        c, d = (metrics.get(k, 0.0) for k in pull_keys(b))
        tot = [tot[0] + c, tot[1] + d]
        if d > 0:
            out[f"critic_pull_b{b}"] = (c / d) ** 0.5
    if tot[1] > 0:
        out["critic_pull"] = (tot[0] / tot[1]) ** 0.5
    steps = metrics.get("pull_steps", 0.0)
    for k in ("inside", "scale"):
        if steps > 0 and f"pull_{k}" in metrics:
            out[f"critic_{k}"] = metrics[f"pull_{k}"] / steps
    return out


class _Meet(torch.autograd.Function):
    """Where the critic's gradient meets the diffusion loss's at the DiT's output: the identity on
    (the output L_diff reads, the output the critic's input is built from) - the same tensor, or the
    released operator's second forward - whose backward sees both gradients at once. It measures the
    pull per sample into `probe` (its pull_keys tensors, added to in place; free: both gradients are
    computed anyway) and, with `cap` > 0, scales the critic's down to at most cap times the diffusion
    loss's (method.critic_balance; norms over the micro-batch, as VQGAN's adaptive weight)."""

    @staticmethod
    def forward(ctx, diff_out, critic_out, t, num_timesteps: int, cap: float, probe: dict):
        ctx.save_for_backward(t)
        ctx.num_timesteps, ctx.cap, ctx.probe = num_timesteps, cap, probe
        return diff_out.clone(), critic_out.clone()

    @staticmethod
    def backward(ctx, g_diff, g_cls):
        (t,) = ctx.saved_tensors
        probe = ctx.probe
        if g_diff is None or g_cls is None:  # one branch unused: nothing to compare
            return g_diff, g_cls, None, None, None, None
        d2 = g_diff.float().pow(2).flatten(1).sum(1)  # (N,) squared norms per sample
        c2 = g_cls.float().pow(2).flatten(1).sum(1)
        if ctx.cap > 0:
            scale = torch.clamp(ctx.cap * d2.sum().sqrt() / c2.sum().sqrt().clamp(min=1e-30), max=1.0)
            g_cls, c2 = g_cls * scale.to(g_cls.dtype), c2 * scale.square()
            probe["pull_scale"].add_(scale.detach())
        band = (t * PULL_BANDS // ctx.num_timesteps).clamp(max=PULL_BANDS - 1)  # (N,) 0-based
        for b in range(PULL_BANDS):
            sel = band == b
            kc, kd = pull_keys(b + 1)
            probe[kc].add_(c2[sel].sum().detach())
            probe[kd].add_(d2[sel].sum().detach())
        return g_diff, g_cls, None, None, None, None


@dataclass
class StepOutput:
    """What one forward of the objective gives the loop."""

    loss: torch.Tensor  # scalar to backpropagate (DiT and, on clean steps, classifier terms)
    branch: str  # DIFF (no classifier), CLEAN or DENOISED
    # Detached scalars. On a denoised branch the pull accumulators (pull_keys, pull_scale) are filled
    # in by the backward pass of `loss`: read them after it; `pull` turns them into ratios.
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


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
                tone: torch.Tensor | None = None, t: torch.Tensor | None = None) -> StepOutput:
        """One joint step's loss on a batch x0 (N, C, H, W) with labels y (N,); timesteps `t` (N,)
        are drawn uniformly unless given."""
        diffusion, n = self.diffusion, x0.shape[0]
        if t is None:
            t = torch.randint(0, diffusion.num_timesteps, (n,), device=x0.device)
        noise = torch.randn_like(x0)
        xt = diffusion.q_sample(x0, t, noise)
        out = self.dit(xt, t, y, tone)  # the one DiT forward of x0_pred / posterior
        if self.classifier is None:
            loss_diff, metrics = self._diffusion_loss(out, x0, xt, t, noise)
            return StepOutput(loss_diff, DIFF, metrics)

        m, g = self.cfg.method, self.gamma(step)
        target = y.float()
        if coin(self.cfg.train.seed, step) < g:
            cap = m.critic_balance == "cap"
            probe = {k: torch.zeros((), device=x0.device) for b in range(1, PULL_BANDS + 1) for k in pull_keys(b)}
            if cap:
                probe["pull_scale"] = torch.zeros((), device=x0.device)
            weight = critic_weight(m, step)
            # "reference": parity with the released code - a second DiT forward that treats the clean
            # z0 as if it were x_t at step t; its output is what the critic's gradient reaches.
            src = self.dit(x0, t, y, tone) if m.denoised_input == "reference" else out
            out, src = _Meet.apply(out, src, t, diffusion.num_timesteps, weight if cap else 0.0, probe)
            loss_diff, metrics = self._diffusion_loss(out, x0, xt, t, noise)
            z_d = self.denoised(src, x0, xt, t)
            per_sample, logits = self.critic_loss(z_d, x0, y)  # (N,), (N,)
            # The critic's timestep window: its loss is averaged over the samples inside.
            frac = t.float() / diffusion.num_timesteps
            inside = ((frac >= m.critic_t_min) & (frac < m.critic_t_max)).float()
            loss_cls = (per_sample * inside).sum() / inside.sum().clamp(min=1.0)
            loss, branch = loss_diff + weight * loss_cls, DENOISED
            metrics.update(probe, pull_steps=torch.tensor(1.0), pull_inside=inside.mean().detach())
        else:
            loss_diff, metrics = self._diffusion_loss(out, x0, xt, t, noise)
            logits = self.classifier(self.robust_input(x0, target))
            loss_cls = F.binary_cross_entropy_with_logits(logits.float(), target)
            # Disjoint parameters: one backward gives the DiT L_diff and the classifier L_cls.
            loss, branch = loss_diff + loss_cls, CLEAN
        metrics.update(
            loss_cls=loss_cls.detach(),
            cls_acc=((logits.detach() > 0).float() == target).float().mean(),
            gamma=torch.tensor(g),
            critic_weight=torch.tensor(critic_weight(m, step)),
            denoised=torch.tensor(float(branch == DENOISED)),
        )
        return StepOutput(loss, branch, metrics)

    def _diffusion_loss(self, out, x0, xt, t, noise) -> tuple[torch.Tensor, dict]:
        """L_diff as optimised, and its logged parts."""
        diffusion, d = self.diffusion, self.cfg.diffusion
        terms = diffusion.training_losses(out, x0, xt, t, noise)
        # What is optimised may weight the timesteps (Min-SNR); what is logged as loss_diff stays
        # the unweighted loss, comparable across recipes and with val_loss_diff.
        w = diffusion.mse_weights(t, d.loss_weighting, d.min_snr_gamma)
        loss_diff = (w * terms["mse"] + terms["vb"]).mean()
        return loss_diff, {"loss_diff": terms["loss"].mean().detach(), "mse": terms["mse"].mean().detach(),
                           "vb": terms["vb"].mean().detach()}

    def critic_loss(self, z_d: torch.Tensor, x0: torch.Tensor, y: torch.Tensor):
        """(per-sample loss (N,), logits (N,)) of the frozen critic on the denoised latents z_d, by
        method.critic_target; paired, hinge and features compare with the critic's view of the paired
        clean z0 (one more critic forward, without gradients)."""
        m = self.cfg.method
        with frozen(self.classifier, m.critic_mode) as critic:  # no step, no param grads
            feats = critic.features(z_d)
            logits = critic.head(feats).squeeze(1)
            if m.critic_target == "label":
                return F.binary_cross_entropy_with_logits(logits.float(), y.float(), reduction="none"), logits
            with torch.no_grad():
                real = critic.features(x0)
                real_logits = critic.head(real).squeeze(1)
        if m.critic_target == "paired":
            p = torch.sigmoid(real_logits.float())
            return F.binary_cross_entropy_with_logits(logits.float(), p, reduction="none"), logits
        if m.critic_target == "hinge":
            sign = 2 * y.float() - 1  # class evidence: the logit toward the sample's own class
            return F.relu(sign * real_logits.float() - sign * logits.float()), logits
        return (feats.float() - real.float()).pow(2).mean(1), logits  # features

    def robust_input(self, x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The clean branch's classifier input: z0, or with classifier.adversarial its adversarial
        example - z0 moved at most adv_eps per element up the classifier's own loss (FGSM: one signed
        step; PGD: adv_steps steps from a random start), found with the classifier frozen in eval
        mode so that neither its running statistics nor its gradients change."""
        c = self.cfg.classifier
        if c.adversarial == "none":
            return x0
        fgsm = c.adversarial == "fgsm"
        steps = 1 if fgsm else c.adv_steps
        if fgsm and not c.adv_random_start:  # Goodfellow et al.: one step of eps from z0 itself
            alpha, delta = c.adv_eps, torch.zeros_like(x0)
        else:  # fgsm: Wong et al.'s 1.25 eps from a random start; pgd: Madry et al.'s 2.5 eps / steps
            alpha = 1.25 * c.adv_eps if fgsm else 2.5 * c.adv_eps / steps
            delta = torch.empty_like(x0).uniform_(-c.adv_eps, c.adv_eps)
        with frozen(self.classifier, "eval") as critic, torch.enable_grad():
            for _ in range(steps):
                delta.requires_grad_(True)
                loss = F.binary_cross_entropy_with_logits(critic(x0 + delta).float(), target)
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta + alpha * grad.sign()).clamp(-c.adv_eps, c.adv_eps).detach()
        return (x0 + delta).detach()

    def denoised(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The latent the critic judges, per `method.denoised_input`, built from the DiT output `out`
        (the second forward's for reference); gradients reach the DiT through it."""
        diffusion, m = self.diffusion, self.cfg.method
        if m.denoised_input == "x0_pred":
            # Paper: "a denoised latent from the diffusion process" - the predicted clean latent
            # of the same forward pass. No extra DiT forward.
            eps, _ = diffusion.split(out.float(), xt.shape[1])
            x0_hat = diffusion.predict_x0(xt, t, eps, clip=self.cfg.critic_clip)
            if m.denoised_grad == "raw":
                return x0_hat
            # Same value, gradient scaled (see MethodConfig.denoised_grad): d x0_hat / d eps is
            # -sigma_t / sqrt(alpha_bar_t); times w it becomes -sigma_t (sqrt_alpha_bar) or the
            # released operator's -beta_t / (sqrt(alpha_t) sigma_t) (released).
            nd = x0_hat.ndim
            w = diffusion.at(diffusion.sqrt_alphas_cumprod, t, nd)
            if m.denoised_grad == "released":
                beta, abar = diffusion.at(diffusion.betas, t, nd), diffusion.at(diffusion.alphas_cumprod, t, nd)
                w = beta * abar.sqrt() / ((1 - beta).sqrt() * (1 - abar))
            return x0_hat.detach() + w * (x0_hat - x0_hat.detach())
        if m.denoised_input == "posterior":
            pmv = diffusion.p_mean_variance(out, xt, t, clip=self.cfg.critic_clip)
            return diffusion.ancestral_step(pmv, t, torch.randn_like(xt))
        # "reference": one ancestral step from the second forward on z0 (as x_t), x0 estimate clamped
        # to [-1, 1], as released.
        pmv = diffusion.p_mean_variance(out, x0, t, clip=1.0)
        return diffusion.ancestral_step(pmv, t, torch.randn_like(x0))
