import math
import tempfile

import numpy as np
import pytest
import torch

from cnd_ray import config as C
from cnd_ray import diffusion as D
from cnd_ray.diffusion import GaussianDiffusion, guided, linear_betas, sample, space_timesteps


@pytest.fixture
def diff():
    return GaussianDiffusion(linear_betas(1000, 1e-4, 0.02))


def test_linear_schedule_endpoints(diff):
    assert diff._np["betas"][0] == 1e-4 and diff._np["betas"][-1] == pytest.approx(0.02)
    assert GaussianDiffusion.from_config(C.load("paper")).num_timesteps == 1000


def test_q_sample_matches_closed_form(diff):
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    expect = torch.stack([math.sqrt(ac[i]) * x0[k] + math.sqrt(1 - ac[i]) * noise[k]
                          for k, i in enumerate(t.tolist())])
    torch.testing.assert_close(diff.q_sample(x0, t, noise), expect, rtol=1e-5, atol=1e-6)


def test_perfect_eps_recovers_x0(diff):
    torch.manual_seed(0)
    x0, noise = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    t = torch.tensor([0, 1, 100, 600, 999])
    xt = diff.q_sample(x0, t, noise)
    torch.testing.assert_close(diff.predict_x0(xt, t, noise), x0, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(diff.predict_eps(xt, t, x0), noise, rtol=1e-3, atol=1e-3)


def test_training_loss_terms(diff):
    torch.manual_seed(0)
    x0, noise = torch.rand(6, 4, 8, 8) * 2 - 1, torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 0, 3, 100, 500, 999])
    xt = diff.q_sample(x0, t, noise)
    out = torch.randn(6, 8, 8, 8, requires_grad=True)
    terms = diff.training_losses(out, x0, xt, t, noise)
    assert torch.isfinite(terms["vb"]).all() and (terms["vb"] >= 0).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    torch.testing.assert_close(terms["mse"], ((noise - out[:, :4]) ** 2).mean(dim=(1, 2, 3)))
    # the VB term trains the variance only: its gradient never reaches the epsilon half
    terms["vb"].sum().backward()
    assert torch.count_nonzero(out.grad[:, :4]) == 0 and torch.count_nonzero(out.grad[:, 4:]) > 0


def test_vb_is_zero_for_the_true_posterior(diff):
    # a model that predicts the exact noise and the posterior variance (v = -1) has KL 0 for t > 0
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 200, 900])
    xt = diff.q_sample(x0, t, noise)
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    assert diff.vb_terms(out, x0, xt, t).abs().max() < 1e-3


def test_respacing_keeps_alphas_cumprod(diff):
    use = space_timesteps(1000, 50)
    assert len(use) == 50 and use[0] == 0 and use[-1] == 999
    r = diff.respaced(50)
    np.testing.assert_allclose(r._np["alphas_cumprod"], diff._np["alphas_cumprod"][use], rtol=1e-10)
    assert r.timestep_map.tolist() == use
    full = diff.respaced(1000)
    np.testing.assert_allclose(full._np["betas"], diff._np["betas"], rtol=1e-9)


def _toy_model(x0_true):
    """A model that knows the data is the constant x0_true: returns the exact epsilon."""
    d = GaussianDiffusion(linear_betas(1000, 1e-4, 0.02))

    def fn(x, t):
        eps = d.predict_eps(x, t, x0_true.expand_as(x))
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)
    return fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_reach_the_data_with_a_perfect_model(diff, sampler):
    x0 = torch.full((1, 2, 4, 4), 0.5)
    r = diff.respaced(25)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    out = r.sample(_toy_model(x0), noise, sampler=sampler, generator=g)
    torch.testing.assert_close(out, x0.expand_as(out), atol=2e-2, rtol=0)


def test_ddim_eta0_is_deterministic(diff):
    r = diff.respaced(10)
    model = _toy_model(torch.zeros(1, 2, 4, 4))
    noise = torch.randn(2, 2, 4, 4)
    a = r.sample(model, noise, "ddim", generator=torch.Generator().manual_seed(1))
    b = r.sample(model, noise, "ddim", generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)


def test_classifier_free_guidance_combines_cond_and_null():
    calls = []

    def model(x, t, y, tone):
        calls.append(y.clone())
        eps = y.float().view(-1, 1, 1, 1).expand(-1, 2, 2, 2) + 1  # cond: y+1, null: 4
        return torch.cat([eps, torch.zeros_like(eps) + 0.3 + y.view(-1, 1, 1, 1)], dim=1)

    y = torch.tensor([0, 1])
    x, t = torch.zeros(2, 2, 2, 2), torch.tensor([5, 5])
    out = guided(model, y, null_label=3, scale=4.0)(x, t)
    assert calls[-1].tolist() == [0, 1, 3, 3]
    expect_eps = 4 + 4.0 * (torch.tensor([1.0, 2.0]) - 4)
    torch.testing.assert_close(out[:, :2, 0, 0], expect_eps.view(2, 1).expand(2, 2))
    torch.testing.assert_close(out[:, 2:, 0, 0], (0.3 + y.float()).view(2, 1).expand(2, 2))
    # scale 1: one conditional forward, no null batch
    guided(model, y, null_label=3, scale=1.0)(x, t)
    assert calls[-1].tolist() == [0, 1]


def test_tone_guidance_chains_the_tone_and_the_class_and_computes_only_what_it_needs():
    """e(-,-) + ts * (e(-,tone) - e(-,-)) + s * (e(y,tone) - e(-,tone)), with '-' the null label
    (3) and null tone (9): three forwards in one batch; two when ts == s; tone_scale 1 is class
    guidance exactly."""
    calls = []

    def model(x, t, y, tone):  # eps = 10 * label + tone, so every condition is told apart
        calls.append((y.tolist(), tone.tolist()))
        return (10.0 * y + tone).view(-1, 1, 1, 1).expand(-1, 2, 2, 2).clone()

    y, tone = torch.tensor([0, 1]), torch.tensor([2, 2])
    x, t = torch.zeros(2, 2, 2, 2), torch.tensor([5, 5])
    e = lambda label, tn: 10.0 * label + tn  # noqa: E731
    out = guided(model, y, null_label=3, scale=2.0, tone=tone, tone_scale=4.0, null_tone=9)(x, t)
    assert calls[-1] == ([0, 1, 3, 3, 3, 3], [2, 2, 2, 2, 9, 9])
    expect = [e(3, 9) + 4 * (e(3, 2) - e(3, 9)) + 2 * (e(yi, 2) - e(3, 2)) for yi in (0, 1)]
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor(expect))
    out = guided(model, y, null_label=3, scale=3.0, tone=tone, tone_scale=3.0, null_tone=9)(x, t)
    assert calls[-1] == ([0, 1, 3, 3], [2, 2, 9, 9])  # one guidance on both: two forwards
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([e(3, 9) + 3 * (e(yi, 2) - e(3, 9)) for yi in (0, 1)]))
    out = guided(model, y, null_label=3, scale=3.0, tone=tone, tone_scale=1.0, null_tone=9)(x, t)
    assert calls[-1] == ([0, 1, 3, 3], [2, 2, 2, 2])  # class guidance: the tone in both branches
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([e(3, 2) + 3 * (e(yi, 2) - e(3, 2)) for yi in (0, 1)]))
    with pytest.raises(ValueError, match="null_tone"):
        guided(model, y, null_label=3, scale=2.0, tone=tone, tone_scale=4.0)


def test_real_dit_samples_with_guidance():
    from cnd_ray.models import build_dit
    cfg = C.load("debug")
    torch.manual_seed(0)
    dit = build_dit(cfg).eval()
    for p in dit.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    d = GaussianDiffusion.from_config(cfg).respaced(cfg.diffusion.sample_steps)
    y = torch.tensor([0, 1])
    noise = torch.randn(2, 3, 16, 16)
    x = d.sample(guided(dit, y, cfg.model.num_classes, 2.0), noise)
    assert x.shape == noise.shape and torch.isfinite(x).all()


@pytest.mark.parametrize("sampler", ["dpm++", "dpm++-sde"])
def test_dpm_solver_reaches_the_data_with_a_perfect_model(diff, sampler):
    x0 = torch.full((1, 2, 4, 4), 0.5)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    out = sample(diff, _toy_model(x0), noise, sampler, steps=20, generator=g)
    torch.testing.assert_close(out, x0.expand_as(out), atol=2e-2, rtol=0)


def test_dpm_solver_clips_the_x0_it_is_given(diff):
    # The perfect model of data at 3.0, clipped to [-1, 1]: the solver must land on 1.0.
    x0 = torch.full((1, 2, 4, 4), 3.0)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample(diff, _toy_model(x0), noise, "dpm++", steps=15, clip=1.0)
    torch.testing.assert_close(out, torch.ones_like(out), atol=2e-2, rtol=0)


def test_ddim_eta1_step_is_the_ddpm_posterior_mean(diff):
    """DDIM with eta = 1 takes DDPM's mean path: at every full-schedule step its noiseless update
    equals the posterior mean p(x_{t-1} | x_t) that ancestral DDPM adds noise to."""
    g = torch.Generator().manual_seed(3)
    xt = torch.randn(5, 2, 4, 4, generator=g)
    out = torch.randn(5, 4, 4, 4, generator=g)  # an arbitrary model output (eps, variance)
    for step in (999, 500, 37, 1):
        t = torch.full((5,), step)
        pmv = diff.p_mean_variance(out, xt, t)
        ddim = diff.ddim_step(pmv, xt, t, torch.zeros_like(xt), eta=1.0)
        torch.testing.assert_close(ddim, pmv["mean"], atol=1e-5, rtol=1e-4)


def test_ddim_with_all_timesteps_follows_ddpm_mean_path(diff, monkeypatch):
    """Whole chains on all 1000 steps with the noise zeroed: DDIM(eta=1) and DDPM agree."""
    model = _toy_model(torch.full((1, 2, 4, 4), 0.3))
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(D, "randn", lambda shape, *a, **k: torch.zeros(tuple(shape)))
    a = sample(diff, model, noise, "ddpm", steps=1000)
    b = sample(diff, model, noise, "ddim", steps=1000, eta=1.0)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_samplers_are_one_list_everywhere():
    assert D.SAMPLERS == C.SAMPLERS == ("ddpm", "ddim", "dpm++", "dpm++-sde")


@pytest.mark.parametrize("sampler", C.SAMPLERS)
def test_samplers_are_deterministic_per_seed_and_batch_independent(sampler):
    """Per-row generators: an image depends on its own seed, not on its batch-mates."""
    from cnd_ray import checkpoint
    from cnd_ray.generate import Generator
    from tests.helpers import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        cfg, ema, _ = checkpoint.load_ema(random_checkpoint(tmp + "/ck"))
    cfg = C.override(cfg, {"diffusion.sampler": sampler, "diffusion.sample_steps": 8,
                           "diffusion.eta": 0.5})
    gen = Generator(cfg, ema)
    seeds, labels, tones = [11, 12, 13, 14], [0, 1, 0, 1], [-1] * 4
    whole = gen(seeds, labels, tones)
    assert whole.dtype == torch.uint8 and whole.shape == (4, 3, 16, 16)
    torch.testing.assert_close(gen(seeds, labels, tones), whole, rtol=0, atol=0)
    # Same rows in two batches of two: the same pixels at most 1 level apart (CPU kernels may round
    # a batch of 2 differently from a batch of 4; cnd-ray sample keeps chunks fixed for exactness).
    halves = torch.cat([gen(seeds[:2], labels[:2], tones[:2]), gen(seeds[2:], labels[2:], tones[2:])])
    assert (halves.int() - whole.int()).abs().max() <= 1
    other = gen([99, 12, 13, 14], labels, tones)
    assert not torch.equal(other[0], whole[0])
    assert (other[1:].int() - whole[1:].int()).abs().max() <= 1
