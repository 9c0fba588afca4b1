"""Evaluation metrics against their references: clean-fid's FID/KID, pytorch_msssim's MS-SSIM, hand cases."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnd_ray.evaluate import metrics
from cnd_ray.evaluate.metrics import (classification, diversity, fid, kid, memorisation, ms_ssim,
                                      ms_ssim_protocol, ms_ssim_scales, pca_plot)


def _smooth(n: int, h: int, w: int | None = None, seed: int = 0) -> torch.Tensor:
    """(n, 3, h, w) uint8 images with structure at several scales (upsampled noise)."""
    g = torch.Generator().manual_seed(seed)
    w = w or h
    lo = torch.rand(n, 3, max(2, h // 8), max(2, w // 8), generator=g)
    hi = torch.rand(n, 3, h, w, generator=g)
    img = 0.8 * F.interpolate(lo, size=(h, w), mode="bilinear", align_corners=False) + 0.2 * hi
    return (img * 255).round().to(torch.uint8)


def _noisy(x: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x.float() + sigma * torch.randn(x.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)


def test_metrics_module_imports_neither_ray_nor_mlflow():
    tree = ast.parse(Path(metrics.__file__).read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not mods & {"ray", "mlflow"}


def test_fid_is_zero_on_itself_symmetric_and_the_squared_mean_shift_under_a_translation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(300, 8)) * 2 + 1
    shift = np.arange(8) / 4
    assert abs(fid(a, a)) < 1e-6
    assert abs(fid(a, a + shift) - shift @ shift) < 1e-6  # same covariance: only the means differ
    assert abs(fid(a, b) - fid(b, a)) < 1e-6 * fid(a, b)
    assert fid(a, b) > 1


def test_kid_matches_clean_fid_kernel_distance_with_the_same_draws(monkeypatch):
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 16)), rng.normal(0.3, 1.2, size=(50, 16))
    # whole permutations (subset size >= N = M): the value does not depend on the draws at all
    mean, std = kid(a, b, subsets=3, subset_size=10_000)
    assert abs(mean - kernel_distance(a, b, num_subsets=3, max_subset_size=10_000)) < 1e-12 and std < 1e-12
    a = np.concatenate([a, rng.normal(size=(10, 16))])  # now N != M: subsets of a are real draws
    ours = kid(a, b, subsets=20, subset_size=30, seed=5)
    assert ours == kid(a, b, subsets=20, subset_size=30, seed=5) and ours[1] > 0
    # the global np.random's stream for our rng: then our subsets are clean-fid's, draw for draw
    monkeypatch.setattr(np.random, "default_rng", lambda seed: np.random.RandomState(seed))
    theirs_mean = (np.random.seed(7), kernel_distance(a, b, num_subsets=20, max_subset_size=30))[1]
    assert abs(kid(a, b, subsets=20, subset_size=30, seed=7)[0] - theirs_mean) < 1e-12
    monkeypatch.undo()
    same = kid(a, rng.normal(size=(60, 16)), subsets=20, subset_size=30)[0]
    assert abs(same) < kid(a, b, subsets=20, subset_size=30)[0]


@pytest.mark.parametrize("h,w", [(256, 256), (200, 232)])  # 200: odd sides at scales 4-5 (padded pooling)
def test_ms_ssim_equals_pytorch_msssim_at_five_scales(h, w):
    ref = pytest.importorskip("pytorch_msssim")
    x = _smooth(3, h, w)
    y = torch.cat([_noisy(x[:1], 10, seed=1), _noisy(x[1:2], 40, seed=2), _noisy(x[2:], 90, seed=3)])
    assert ms_ssim_protocol(min(h, w))["scales"] == 5
    ours = ms_ssim(x, y)
    assert ours.dtype == torch.float64 and ours.shape == (3,) and (ours > 0.05).all()
    theirs = ref.ms_ssim(x.float(), y.float(), data_range=255, size_average=False).double()
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours, theirs)
    theirs64 = ref.ms_ssim(x.double(), y.double(), data_range=255, size_average=False)
    assert torch.allclose(ours, theirs64, atol=1e-12, rtol=0), (ours, theirs64)  # same algorithm exactly


def test_ms_ssim_is_one_on_identical_images_symmetric_bounded_and_falls_with_noise():
    x = _smooth(4, 64)
    assert torch.allclose(ms_ssim(x, x), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)
    y = _noisy(x, 20)
    assert torch.allclose(ms_ssim(x, y), ms_ssim(y, x), atol=1e-12, rtol=0)
    levels = torch.stack([ms_ssim(x, _noisy(x, s)) for s in (5, 20, 60)])  # (3, N)
    assert (levels[:-1] > levels[1:]).all(), levels
    assert ((levels >= 0) & (levels <= 1)).all()
    assert torch.allclose(ms_ssim(x.float(), y.float()), ms_ssim(x, y))  # float in [0, 255] = uint8


def test_small_images_use_fewer_scales_with_renormalised_weights():
    assert [ms_ssim_scales(s) for s in (10, 16, 21, 22, 32, 64, 128, 175, 176, 256)] == [1, 1, 1, 2, 2, 3, 4, 4, 5, 5]
    for size, scales in ((16, 1), (32, 2), (8, 1)):
        p = ms_ssim_protocol(size)
        assert p["scales"] == scales and abs(sum(p["weights"]) - 1) < 1e-12 and p["sigma"] == 1.5
        x = _smooth(2, size)
        v = ms_ssim(x, _noisy(x, 30))
        assert v.shape == (2,) and ((v > 0) & (v < 1)).all()
        assert torch.allclose(ms_ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)
    assert ms_ssim_protocol(32)["weights"] == pytest.approx([0.0448 / 0.3304, 0.2856 / 0.3304])
    assert ms_ssim_protocol(16)["window"] == 11 and ms_ssim_protocol(8)["window"] == 7
    assert ms_ssim_protocol(10)["window"] == 9 and ms_ssim_protocol(11)["window"] == 11


def test_diversity_pairs_same_class_distinct_images_deterministically():
    base = _smooth(1, 32, seed=3)
    near = torch.cat([_noisy(base, 3, seed=s) for s in range(5)])  # class 0: near-copies
    apart = _smooth(5, 32, seed=4)  # class 1: unrelated images
    two = _smooth(2, 32, seed=5)  # class 2: exactly two images, so every pair is (0, 1) or (1, 0)
    one = _smooth(1, 32, seed=6)  # class 3: cannot form a pair
    images = torch.cat([near, apart, two, one])
    labels = np.array([0] * 5 + [1] * 5 + [2] * 2 + [3])
    out = diversity(images, labels, pairs=40, seed=0, batch=16)
    assert out == diversity(images, labels, pairs=40, seed=0, batch=7)  # chunking changes nothing
    assert out != diversity(images, labels, pairs=40, seed=1)
    pc = out["per_class"]
    assert pc[0]["ms_ssim"] > pc[1]["ms_ssim"]  # near-copies are less diverse
    assert pc[2]["ms_ssim"] == pytest.approx(ms_ssim(two[:1], two[1:]).item(), abs=1e-12)  # never i == j
    assert pc[3] == {"ms_ssim": None, "pairs": 0, "images": 1}
    assert [pc[c]["pairs"] for c in range(3)] == [40] * 3 and pc[0]["images"] == 5
    assert out["all"]["pairs"] == 120
    assert out["all"]["ms_ssim"] == pytest.approx(np.mean([pc[c]["ms_ssim"] for c in range(3)]))


def test_memorisation_finds_copies_with_their_training_index():
    rng = np.random.default_rng(0)
    train, heldout = rng.normal(size=(500, 12)), rng.normal(size=(300, 12))
    copied = rng.choice(500, 40, replace=False)
    gen = np.concatenate([rng.normal(size=(160, 12)), 3 * train[copied]])  # scaled copies: cosine geometry
    out = memorisation(gen, train, heldout, quantile=0.05, batch=64)
    assert out["nn_distance"].shape == (200,) and out["expected_share"] == 0.05
    assert np.all(out["nn_distance"][160:] < 1e-6) and np.array_equal(out["nn_index"][160:], copied)
    assert out["share_under"] >= 40 / 200
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    full = np.linalg.norm(unit(gen)[:, None] - unit(train)[None], axis=2)  # (200, 500) brute force
    assert np.allclose(out["nn_distance"], full.min(1), atol=1e-6)
    assert np.array_equal(out["nn_index"][:160], full.argmin(1)[:160])


def test_memorisation_share_is_calibrated_without_copies_and_duplicates_raise_the_rate():
    rng = np.random.default_rng(1)
    train, heldout, gen = (rng.normal(size=(n, 8)) for n in (4000, 3000, 3000))
    out = memorisation(gen, train, heldout, quantile=0.1, batch=512)
    assert abs(out["share_under"] - 0.1) < 0.03
    planted = np.concatenate([gen[:2500], gen[:500]])  # 1000 of 3000 rows have an exact twin
    dup = memorisation(planted, train, heldout, quantile=0.1, batch=512)
    assert dup["duplicate_rate"] >= 1000 / 3000 and dup["duplicate_rate"] > out["duplicate_rate"] + 0.2


def test_pca_plot_writes_a_png_on_the_real_datas_axes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    direction = np.ones(10) / np.sqrt(10)
    real = rng.normal(size=(600, 10)) * 0.3 + rng.normal(0, 3, size=(600, 1)) * direction
    gen = rng.normal(size=(200, 10)) * 0.3 + 2 * direction
    out = pca_plot(real, rng.integers(0, 2, 600), gen, rng.integers(0, 2, 200), tmp_path / "pca.png", title="t")
    assert out["explained_variance"][0] > 0.5 and out["explained_variance"][0] > out["explained_variance"][1]
    assert out["path"] == str(tmp_path / "pca.png")
    with Image.open(out["path"]) as im:
        im.verify()
    with Image.open(out["path"]) as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_classification_hand_case():
    scores = np.array([-2, -1, 0.5, 3, 1, -0.5])
    labels = np.array([0, 0, 0, 1, 1, 1])
    out = classification(scores, labels)
    assert out["accuracy"] == pytest.approx(4 / 6) and out["n"] == 6
    assert out["per_class_accuracy"] == pytest.approx({0: 2 / 3, 1: 2 / 3})
    assert out["auroc"] == pytest.approx(8 / 9)
    assert classification(scores, labels, threshold=-1.5)["accuracy"] == pytest.approx(4 / 6)
