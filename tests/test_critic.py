"""The critic's switches (docs/METHOD.md, "The critic's pull"): what each does to the gradient the DiT
gets from the frozen critic, pinned at the cheapest level - the objective on the debug config.

Each switch also runs end to end on Ray Train and MLflow, in tests that run anyway: the smoke search's
setting 2 (tune_spaces/smoke.yaml: released strength, hinge, window, cap and warm-up, FGSM; its pull
checked in MLflow and Tune by tests/test_tune.py), and tests/test_train.py's two-worker runs
(reference with paired; posterior with features and PGD, the pull the same on both ranks)."""
import pytest
import torch
import torch.nn.functional as F

from cnd_ray import config as C
from cnd_ray.objective import PULL_BANDS, ClassNDiff, pull, pull_keys
from tests.helpers import fixed_batch

# Two samples in each quarter of the schedule (debug: 1000 steps).
T_EACH_BAND = torch.tensor([10, 200, 300, 400, 600, 700, 800, 990])


def _objective(*overrides):
    torch.manual_seed(0)
    return ClassNDiff(C.load("debug", ["method.gamma=1.0", *overrides]))


def _grad_at_output(obj, b, t, step=0):
    """(the DiT output's gradient (N, 2C, H, W), the step's output): one denoised step, same draws."""
    seen = []

    def keep(module, inputs, out):
        out.retain_grad()
        seen.append(out)

    hook = obj.dit.register_forward_hook(keep)
    torch.manual_seed(5)
    res = obj(b["x"], b["y"], step=step, t=t)
    res.loss.backward()
    hook.remove()
    return seen[0].grad, res


def _split(overrides, b, t=T_EACH_BAND, step=0):
    """(diffusion's, the critic's) gradients at the DiT output and the step's output: the critic's is
    the difference from the same step with lambda_cls = 0."""
    g_all, res = _grad_at_output(_objective(*overrides), b, t, step)
    g_diff, _ = _grad_at_output(_objective(*overrides, "method.lambda_cls=0"), b, t, step)
    return g_diff, g_all - g_diff, res


def _sq(g):
    return g.pow(2).flatten(1).sum(1)


def test_the_pull_is_the_ratio_of_the_two_gradients_at_the_dit_output_per_band():
    b = fixed_batch(C.load("debug"))
    g_diff, g_cls, res = _split(["method.lambda_cls=0.5"], b)
    band = T_EACH_BAND * PULL_BANDS // 1000
    got = {k: float(v) for k, v in res.metrics.items()}
    for k in range(PULL_BANDS):
        kc, kd = pull_keys(k + 1)
        assert got[kc] == pytest.approx(float(_sq(g_cls)[band == k].sum()), rel=1e-4)
        assert got[kd] == pytest.approx(float(_sq(g_diff)[band == k].sum()), rel=1e-4)
    ratios = pull(got)
    assert ratios["critic_pull"] == pytest.approx(float((_sq(g_cls).sum() / _sq(g_diff).sum()).sqrt()), rel=1e-4)
    assert set(ratios) >= {f"critic_pull_b{k}" for k in range(1, PULL_BANDS + 1)} | {"critic_inside"}
    assert not any(k.startswith("pull_") for k in ratios)


def test_the_cap_holds_the_pull_at_lambda_and_the_warmup_raises_the_weight():
    b = fixed_batch(C.load("debug"))
    # Unscaled x0_pred (up to ~156x at t ~ T): the critic's gradient is several times L_diff's.
    strong = ["method.lambda_cls=0.5", "method.denoised_grad=raw", "method.denoised_clip=0"]
    free = pull({k: float(v) for k, v in _split(strong, b)[2].metrics.items()})
    assert free["critic_pull"] > 1
    g_diff, g_cls, res = _split([*strong, "method.critic_balance=cap"], b)
    capped = pull({k: float(v) for k, v in res.metrics.items()})
    assert capped["critic_pull"] == pytest.approx(0.5, rel=1e-4) and capped["critic_scale"] < 0.5
    # The DiT gets exactly the scaled critic gradient: its norm over the batch is lambda times L_diff's,
    # in the same direction as before.
    assert float(_sq(g_cls).sum().sqrt()) == pytest.approx(0.5 * float(_sq(g_diff).sum().sqrt()), rel=1e-3)
    g_free = _split(strong, b)[1]
    assert F.cosine_similarity(g_cls.flatten(), g_free.flatten(), dim=0) > 0.999
    weak = pull({k: float(v) for k, v in _split(["method.lambda_cls=0.01", "method.critic_balance=cap"], b)[2].metrics.items()})
    assert weak["critic_scale"] == 1.0 and weak["critic_pull"] < 0.01  # under the cap: untouched
    # Warm-up: the weight rises linearly over critic_warmup steps; no critic gradient at step 0.
    _, g0, res0 = _split(["method.lambda_cls=0.4", "method.critic_warmup=100"], b, step=0)
    assert float(res0.metrics["critic_weight"]) == 0.0 and float(g0.abs().max()) == 0.0
    _, _, res50 = _split(["method.lambda_cls=0.4", "method.critic_warmup=100"], b, step=50)
    assert float(res50.metrics["critic_weight"]) == pytest.approx(0.2)


def test_the_window_keeps_the_critic_off_the_samples_outside_it():
    b = fixed_batch(C.load("debug"))
    _, g_cls, res = _split(["method.critic_t_max=0.5"], b)
    inside = T_EACH_BAND < 500
    assert float(g_cls[~inside].abs().max()) == 0.0 and bool((_sq(g_cls)[inside] > 0).all())
    assert float(res.metrics["pull_inside"]) == 0.5
    # The loss is the mean over the samples inside, not diluted by those outside.
    obj = _objective("method.critic_t_max=0.5")
    per_sample, judge = [], obj.critic_loss
    obj.critic_loss = lambda *a: (per_sample.append(judge(*a)[0]), judge(*a))[1]
    res = obj(b["x"], b["y"], step=0, t=T_EACH_BAND)
    assert float(res.metrics["loss_cls"]) == pytest.approx(float(per_sample[0][inside].mean().detach()), rel=1e-6)
    with pytest.raises(C.ConfigError, match="method.critic_t_min"):
        C.load("debug", ["method.critic_t_min=0.5", "method.critic_t_max=0.5"])


class _Exact(torch.nn.Module):
    """A 'DiT' that predicts the noise exactly (x0 known), so x0_pred is the clean z0 itself."""

    def __init__(self, x0, diffusion):
        super().__init__()
        self.x0, self.d, self.w = x0, diffusion, torch.nn.Parameter(torch.zeros(()))

    def forward(self, xt, t, y, tone=None):
        a = self.d.at(self.d.sqrt_alphas_cumprod, t, xt.ndim)
        s = self.d.at(self.d.sqrt_one_minus_alphas_cumprod, t, xt.ndim)
        eps = (xt - a * self.x0) / s
        return torch.cat([eps, torch.zeros_like(eps)], 1) + self.w


# (hinge: its gradient does not fade near the real image's evidence, it switches off there: with
# x0_pred equal to z0 up to rounding, half the samples sit a hair below it; its own test pins it.)
@pytest.mark.parametrize("target, zero", [("label", False), ("paired", True), ("features", True)])
def test_targets_that_stop_at_the_real_image_pass_no_gradient_when_the_estimate_is_z0(target, zero):
    cfg = C.load("debug", ["method.gamma=1.0", f"method.critic_target={target}", "method.denoised_clip=0"])
    b = fixed_batch(cfg)
    torch.manual_seed(0)
    obj = ClassNDiff(cfg)
    obj.dit = _Exact(b["x"], obj.diffusion)
    t = torch.full((8,), 100)
    res = obj(b["x"], b["y"], step=0, t=t)
    res.loss.backward()
    critic = sum(float(res.metrics[pull_keys(k)[0]]) for k in range(1, PULL_BANDS + 1))
    assert (critic < 1e-16) == zero, critic  # label: ~1e-7, paired and features: ~1e-21


def test_each_target_is_its_formula_and_the_hinge_acts_only_below_the_real_images_evidence():
    cfg = C.load("debug", ["method.gamma=1.0"])
    b = fixed_batch(cfg)
    torch.manual_seed(0)
    obj = ClassNDiff(cfg).eval()
    z0, y = b["x"], b["y"]
    z_d = (z0 + 0.7 * torch.randn_like(z0)).requires_grad_(True)
    with torch.no_grad():
        l0, ld = obj.classifier(z0), obj.classifier(z_d)
        f0, fd = obj.classifier.features(z0), obj.classifier.features(z_d)
    sign = 2 * y.float() - 1
    want = {"label": F.binary_cross_entropy_with_logits(ld, y.float(), reduction="none"),
            "paired": F.binary_cross_entropy_with_logits(ld, torch.sigmoid(l0), reduction="none"),
            "hinge": F.relu(sign * (l0 - ld)), "features": (fd - f0).pow(2).mean(1)}
    for target, value in want.items():
        obj.cfg = C.override(cfg, {"method.critic_target": target})
        loss, _ = obj.critic_loss(z_d, z0, y)
        torch.testing.assert_close(loss, value)
        if target == "hinge":
            (g,) = torch.autograd.grad(loss.sum(), z_d)
            ahead = sign * (ld - l0) >= 0  # already shows as much of its class as its real image
            assert bool(ahead.any() and (~ahead).any())
            assert float(g[ahead].abs().max()) == 0.0 and bool((_sq(g)[~ahead] > 0).all())


@pytest.mark.parametrize("mode", ["sqrt_alpha_bar", "released"])
def test_the_x0_pred_gradient_reaches_epsilon_with_the_operators_coefficient(mode):
    obj = _objective(f"method.denoised_grad={mode}", "method.denoised_clip=0")
    d = obj.diffusion
    b = fixed_batch(obj.cfg)
    t = T_EACH_BAND
    xt = d.q_sample(b["x"], t, torch.randn_like(b["x"]))
    out = torch.randn(8, 6, 16, 16, requires_grad=True)
    z_d = obj.denoised(out, b["x"], xt, t)
    (g,) = torch.autograd.grad(z_d.sum(), out)
    beta, abar = d.betas[t].double(), d.alphas_cumprod[t].double()
    sigma = (1 - abar).sqrt()
    want = -sigma if mode == "sqrt_alpha_bar" else -beta / ((1 - beta).sqrt() * sigma)
    torch.testing.assert_close(g[:, :3].double().mean((1, 2, 3)), want, rtol=1e-4, atol=1e-7)
    assert float(g[:, 3:].abs().max()) == 0.0  # the variance channels do not enter x0_pred
    if mode == "released":  # 0.0063-0.0202 over the whole schedule (docs/METHOD.md)
        assert 0.006 < float((-want).min()) and float((-want).max()) < 0.021


@pytest.mark.parametrize("kind,start", [("fgsm", "true"), ("fgsm", "false"), ("pgd", "true")])
def test_the_robust_critic_trains_on_adversarial_examples_inside_the_budget(kind, start):
    obj = _objective("method.gamma=0.0", f"classifier.adversarial={kind}", "classifier.adv_eps=0.05",
                     f"classifier.adv_random_start={start}")
    b = fixed_batch(obj.cfg)
    y = b["y"].float()
    bn = next(m for m in obj.classifier.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    torch.manual_seed(5)
    x_adv = obj.robust_input(b["x"], y)
    assert torch.equal(bn.running_mean, stats) and obj.classifier.training  # the attack changes nothing
    assert all(p.grad is None for p in obj.classifier.parameters())
    delta = x_adv - b["x"]
    assert float(delta.abs().max()) <= 0.05 + 1e-6
    obj.classifier.eval()
    with torch.no_grad():
        clean, adv = (F.binary_cross_entropy_with_logits(obj.classifier(x), y) for x in (b["x"], x_adv))
    assert adv > clean  # it climbed the classifier's own loss
    if kind == "fgsm":  # one signed step: of the full budget from z0, of 1.25x it from a random start
        torch.manual_seed(5)
        u = torch.empty_like(b["x"]).uniform_(-0.05, 0.05) if start == "true" else torch.zeros_like(b["x"])
        x = (b["x"] + u).requires_grad_(True)
        (g,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(obj.classifier(x), y), x)
        step = 1.25 * 0.05 if start == "true" else 0.05
        torch.testing.assert_close(delta, (u + step * g.sign()).clamp(-0.05, 0.05))
    # The clean branch's classifier sees the adversarial example.
    obj.classifier.train()
    seen = []
    obj.classifier.register_forward_hook(lambda m, i, o: seen.append(i[0]) and None)
    torch.manual_seed(1)
    obj(b["x"], b["y"], step=0)
    assert not torch.equal(seen[-1], b["x"]) and float((seen[-1] - b["x"]).abs().max()) <= 0.05 + 1e-6
