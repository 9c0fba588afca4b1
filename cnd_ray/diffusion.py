"""Gaussian diffusion as DiT trains it (Improved DDPM): linear betas, epsilon prediction,
learned-range variance, MSE + variational-bound loss, ancestral / DDIM sampling with respacing and
classifier-free guidance (METHOD.md section 2).

The math takes model *outputs*, never calls the model itself, except in the sampling loops: the
objective decides how many DiT forwards a step costs.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn

from cnd_ray.config import SAMPLERS

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> model output
# One generator for the batch, or one per row: then row i's noise comes from generator i alone, so
# an image depends on its seed only, not on which batch (or Ray actor) made it.
Generators = torch.Generator | list[torch.Generator] | None


def randn(shape, generator: Generators, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn on the CPU from `generator`(s), moved to `device`."""
    if isinstance(generator, list):
        assert len(generator) == shape[0]
        z = torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generator])
    elif generator is not None and generator.device.type == "cpu":
        z = torch.randn(tuple(shape), generator=generator)
    else:
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    return z.to(device=device, dtype=dtype)


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps evenly spread over [0, num_timesteps), both ends kept; the same indices
    as IDDPM's `space_timesteps` (its running sum decides how .5 ties round)."""
    stride = (num_timesteps - 1) / (steps - 1)
    cur, out = 0.0, []
    for _ in range(steps):
        out.append(round(cur))
        cur += stride
    return out


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation IDDPM uses; kept so losses match DiT's.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-likelihood of x in [-1, 1] quantised to 256 bins (the t = 0 decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min,
                                   torch.log(cdf_delta.clamp(min=1e-12))))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


class GaussianDiffusion(nn.Module):
    """Schedule tables as (non-persistent) buffers, so `.to(device)` moves them with the model.

    `timestep_map` maps a respaced step index to the original timestep the model was trained on.
    """

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True,
                 timestep_map: list[int] | None = None):
        super().__init__()
        betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t = 0: clip its log to the t = 1 value.
        post_logvar = np.log(np.append(post_var[1], post_var[1:]))
        tables = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_logvar,
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "log_betas": np.log(betas),
            # Fixed ("large") variance when sigma is not learned, as IDDPM's default.
            "fixed_log_variance": np.log(np.append(post_var[1], betas[1:])),
        }
        self._np = tables  # float64 copies for respacing and tests
        for name, arr in tables.items():
            # Cast once here (IDDPM casts on every lookup: same values).
            self.register_buffer(name, torch.from_numpy(arr).float(), persistent=False)
        tmap = list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map)
        self.register_buffer("timestep_map", torch.tensor(tmap, dtype=torch.long), persistent=False)

    @classmethod
    def from_config(cls, cfg) -> "GaussianDiffusion":
        d = cfg.diffusion
        return cls(linear_betas(d.num_timesteps, d.beta_start, d.beta_end), cfg.model.learn_sigma)

    def respaced(self, steps: int) -> "GaussianDiffusion":
        """The same process on `steps` of this process's timesteps (for faster sampling)."""
        use = space_timesteps(self.num_timesteps, steps)
        ac = self._np["alphas_cumprod"]
        last, betas = 1.0, []
        for i in use:
            betas.append(1.0 - ac[i] / last)
            last = ac[i]
        tmap = self.timestep_map.cpu()[use].tolist()
        return GaussianDiffusion(np.array(betas), self.learn_sigma, tmap).to(self.betas.device)

    @staticmethod
    def at(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return table[t].view(-1, *([1] * (ndim - 1)))  # (N, 1, 1, 1)

    # -- forward process ----------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.at(self.sqrt_alphas_cumprod, t, x0.ndim)
        s = self.at(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
        return a * x0 + s * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self.at(self.posterior_mean_coef1, t, xt.ndim) * x0
                + self.at(self.posterior_mean_coef2, t, xt.ndim) * xt)
        return mean, self.at(self.posterior_log_variance_clipped, t, xt.ndim)

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                   clip: float = 0.0) -> torch.Tensor:
        """x0 from x_t and epsilon, clamped to [-clip, clip] when clip > 0."""
        x0 = (self.at(self.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt
              - self.at(self.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps)
        return x0.clamp(-clip, clip) if clip > 0 else x0

    def predict_eps(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return ((self.at(self.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt - x0)
                / self.at(self.sqrt_recipm1_alphas_cumprod, t, xt.ndim))

    # -- reverse process ----------------------------------------------------------------------
    def split(self, out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model output -> (eps, variance values in [-1, 1] or None)."""
        if self.learn_sigma:
            return out[:, :channels], out[:, channels:]
        return out, None

    def p_mean_variance(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                        clip: float = 0.0) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from one model output: mean, log_variance, x0 and eps estimates;
        the x0 estimate is clamped to [-clip, clip] when clip > 0."""
        eps, v = self.split(out.float(), xt.shape[1])
        if v is None:
            logvar = self.at(self.fixed_log_variance, t, xt.ndim).expand_as(xt)
        else:
            # Learned range: interpolate between the posterior variance and beta_t in log space.
            lo = self.at(self.posterior_log_variance_clipped, t, xt.ndim)
            hi = self.at(self.log_betas, t, xt.ndim)
            frac = (v + 1) / 2
            logvar = frac * hi + (1 - frac) * lo
        x0 = self.predict_x0(xt, t, eps, clip)
        mean, _ = self.q_posterior(x0, xt, t)
        return {"mean": mean, "log_variance": logvar, "x0": x0, "eps": eps}

    def ancestral_step(self, pmv: dict[str, torch.Tensor], t: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
        """x_{t-1} ~ p(x_{t-1} | x_t); no noise is added at t = 0."""
        nonzero = (t != 0).float().view(-1, *([1] * (noise.ndim - 1)))
        return pmv["mean"] + nonzero * torch.exp(0.5 * pmv["log_variance"]) * noise

    # -- training loss ------------------------------------------------------------------------
    def mse_weights(self, t: torch.Tensor, weighting: str, gamma: float) -> torch.Tensor:
        """(N,) weight of each sample's epsilon MSE: 1 (uniform), or Min-SNR-gamma's
        min(SNR_t, gamma) / SNR_t for epsilon prediction (Hang et al. 2023, eq. 7)."""
        if weighting == "uniform":
            return torch.ones(t.shape, device=t.device)
        ac = self.alphas_cumprod[t]
        snr = ac / (1.0 - ac)
        return snr.clamp(max=gamma) / snr

    def training_losses(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor,
                        t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample `mse` on epsilon, `vb` for the learned variance, and `loss` = mse + vb."""
        eps, v = self.split(out.float(), x0.shape[1])
        mse = _mean_flat((noise - eps) ** 2)
        if v is None:
            return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}
        # The VB term trains only the variance: the mean is detached inside it (IDDPM, DiT).
        frozen = torch.cat([eps.detach(), v], dim=1)
        vb = self.vb_terms(frozen, x0, xt, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def vb_terms(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        """L_{t-1} in bits per dim: KL to the true posterior, or the decoder NLL at t = 0."""
        true_mean, true_logvar = self.q_posterior(x0, xt, t)
        p = self.p_mean_variance(out, xt, t)
        kl = _mean_flat(normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"]))
        nll = -_mean_flat(discretized_gaussian_log_likelihood(
            x0, p["mean"], 0.5 * p["log_variance"]))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    # -- sampling -----------------------------------------------------------------------------
    def model_t(self, t: torch.Tensor) -> torch.Tensor:
        """The original timestep the model sees for a (respaced) step index."""
        return self.timestep_map[t]

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, noise: torch.Tensor, sampler: str = "ddpm",
               eta: float = 0.0, clip: float = 0.0, generator: Generators = None,
               progress: Callable | None = None) -> torch.Tensor:
        """Run the ancestral (ddpm) or DDIM chain from `noise` over all of this diffusion's steps
        (respace first for fewer); `generator` draws the per-step noise (see `randn`)."""
        x = noise
        steps = range(self.num_timesteps - 1, -1, -1)
        for i in (progress(steps) if progress else steps):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            pmv = self.p_mean_variance(model_fn(x, self.model_t(t)), x, t, clip=clip)
            if sampler == "ddim" and eta == 0:
                x = self.ddim_step(pmv, x, t, torch.zeros_like(x), eta)  # draws nothing
                continue
            z = randn(x.shape, generator, x.device, x.dtype)
            if sampler == "ddpm":
                x = self.ancestral_step(pmv, t, z)
            elif sampler == "ddim":
                x = self.ddim_step(pmv, x, t, z, eta)
            else:
                raise ValueError(f"unknown sampler {sampler!r}")
        return x

    @torch.no_grad()
    def dpm_solver(self, model_fn: ModelFn, noise: torch.Tensor, steps: int, clip: float = 0.0,
                   stochastic: bool = False, generator: Generators = None,
                   progress: Callable | None = None) -> torch.Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022) in `steps` model calls, or its SDE form when
        `stochastic` (noise drawn from `generator`), using diffusers' well-tested multistep
        scheduler on this (not respaced) schedule."""
        from diffusers import DPMSolverMultistepScheduler

        assert self.timestep_map.tolist() == list(range(self.num_timesteps)), "use the full schedule"
        sched = DPMSolverMultistepScheduler(
            num_train_timesteps=self.num_timesteps, trained_betas=self._np["betas"].tolist(),
            algorithm_type="sde-dpmsolver++" if stochastic else "dpmsolver++", solver_order=2,
            prediction_type="epsilon")
        sched.set_timesteps(steps, device=noise.device)
        x = noise
        for ts in (progress(sched.timesteps) if progress else sched.timesteps):
            t = torch.full((x.shape[0],), int(ts), device=x.device, dtype=torch.long)
            eps, _ = self.split(model_fn(x, t).float(), x.shape[1])
            if clip > 0:  # the eps that a clamped x0 implies, so the solver's x0 is clamped too
                eps = self.predict_eps(x, t, self.predict_x0(x, t, eps, clip))
            # Our per-row noise, not the scheduler's own draw: an image depends on its seed only.
            z = randn(x.shape, generator, x.device, x.dtype) if stochastic else None
            x = sched.step(eps, ts, x, variance_noise=z).prev_sample
        return x

    def ddim_step(self, pmv: dict[str, torch.Tensor], xt: torch.Tensor, t: torch.Tensor,
                  noise: torch.Tensor, eta: float) -> torch.Tensor:
        """One DDIM update (Song et al. 2021); eta = 0 is deterministic."""
        eps = self.predict_eps(xt, t, pmv["x0"])  # consistent with a clipped x0
        a = self.at(self.alphas_cumprod, t, xt.ndim)
        a_prev = self.at(self.alphas_cumprod_prev, t, xt.ndim)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
        mean = pmv["x0"] * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev - sigma ** 2) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (xt.ndim - 1)))
        return mean + nonzero * sigma * noise


def sample(diffusion: GaussianDiffusion, model_fn: ModelFn, noise: torch.Tensor, sampler: str,
           steps: int, eta: float = 0.0, clip: float = 0.0, generator: Generators = None,
           progress: Callable | None = None) -> torch.Tensor:
    """The one sampling entry point: `steps` model calls of `sampler` (ddpm and ddim on a
    respaced schedule, dpm++ on the full one) from `noise`, on the trained `diffusion`."""
    if sampler in ("dpm++", "dpm++-sde"):
        return diffusion.dpm_solver(model_fn, noise, steps, clip, sampler == "dpm++-sde", generator,
                                    progress)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}")
    return diffusion.respaced(steps).sample(model_fn, noise, sampler, eta, clip, generator, progress)


def guided(model: Callable, y: torch.Tensor, null_label: int, scale: float,
           tone: torch.Tensor | None = None, channels: str = "all", tone_scale: float = 1.0,
           null_tone: int | None = None) -> ModelFn:
    """Classifier-free guidance on the class and, with `tone_scale`, on the skin tone as well:

        eps = e(-, -) + tone_scale * (e(-, tone) - e(-, -)) + scale * (e(y, tone) - e(-, tone))

    where e(label, tone) is the model's eps and "-" its null condition (two conditions chained as in
    Liu et al. 2022 and Brooks et al. 2023). tone_scale 1 is plain class guidance, e(-, tone) +
    scale * (e(y, tone) - e(-, tone)): the tone only conditions, so guidance never amplifies it (a
    small model asked for V-VI skin then draws it rarely: docs/METHOD.md). Only what a setting needs
    is computed: scale 1 and tone_scale 1 is one conditional forward; tone_scale == scale is one
    guidance on both, e(-, -) + scale * (e(y, tone) - e(-, -)), two forwards, as class guidance is;
    other pairs take three. The variance channels come from e(y, tone). `channels` "three": only
    eps's first three channels are guided, the rest keep e(y, tone), as DiT's sampler does
    (diffusion.guidance_channels). `null_tone`: the tone's null index (model.tone_groups).
    """
    if tone is None or (null_tone is not None and bool((tone == null_tone).all())):
        tone_scale = 1.0  # no tone asked: nothing to guide towards (and no third forward)
    if scale == 1.0 and tone_scale == 1.0:
        return lambda x, t: model(x, t, y, tone)
    if tone_scale != 1.0 and null_tone is None:
        raise ValueError("tone guidance needs the tone's null index (null_tone)")
    null_y = torch.full_like(y, null_label)
    # The conditions from least to most specific; scales[i] weighs the step from chain[i] to chain[i + 1].
    if tone_scale == 1.0:
        chain, scales = [(null_y, tone)], [scale]
    elif tone_scale == scale:
        chain, scales = [(null_y, torch.full_like(tone, null_tone))], [scale]
    else:
        chain, scales = [(null_y, torch.full_like(tone, null_tone)), (null_y, tone)], [tone_scale, scale]
    chain.append((y, tone))
    k = len(chain)
    batch = chain[::-1]  # the conditional rows first, as class guidance has always batched them
    y_in = torch.cat([c[0] for c in batch])
    tone_in = None if tone is None else torch.cat([c[1] for c in batch])

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        outs = model(torch.cat([x] * k), torch.cat([t] * k), y_in, tone_in).chunk(k)[::-1]  # chain order
        c = x.shape[1] if channels == "all" else 3
        eps = outs[0][:, :c]
        for i, s in enumerate(scales):
            eps = eps + s * (outs[i + 1][:, :c] - outs[i][:, :c])
        return torch.cat([eps, outs[-1][:, c:]], dim=1)

    return fn
