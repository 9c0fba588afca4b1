"""The judge (one per shard set, cached, reused), its sample metrics, the fast Frechet distance, the
paired comparison table, and in-training sampling spread over ranks."""
import os

import numpy as np
import pytest
import torch

from cnd_ray import config as C
from cnd_ray import monitor
from cnd_ray.data import shards as shards_lib, shardset
from cnd_ray.errors import UserError
from cnd_ray.evaluate import compare, judge, metrics
from tests.helpers import random_checkpoint

KID_SUBSETS = C.EvalConfig.kid_subsets  # as a training evaluation uses it


def _cfg(shards, *over):
    # 100 steps: enough for the judge to learn the easy set's classes (held-out AUROC 1.0 here; 30 steps
    # left it at 0.79, whose features could not tell uniform noise from real images by 3x). 2.5 s.
    return C.load("debug", [f"data.shards={shards}", "eval.fidelity_steps=100", *over])


@pytest.fixture(scope="module")
def judged(small_shards, tmp_path_factory):
    """(cfg, judge file, loaded judge) for the small shards."""
    cfg = _cfg(small_shards)
    path = judge.path_for(cfg, str(tmp_path_factory.mktemp("judges")))
    assert judge.prepare(cfg, small_shards, path, say=lambda m: None) is not None
    j = judge.load(path)
    assert j.meta["heldout_auroc"] >= 0.95, j.meta  # the tests below measure with a judge that learned
    return cfg, path, j


def _exact_frechet(a, b):
    """tr sqrt(S_a S_b) from the eigenvalues of the PSD S_b^1/2 S_a S_b^1/2 (exact, slow)."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sb)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.clip(np.linalg.eigvalsh(root @ sa @ root), 0, None)
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(inner).sum())


@pytest.mark.parametrize("n,m,d", [(400, 300, 16), (40, 60, 128), (5, 90, 64)])
def test_frechet_is_the_exact_frechet_distance_and_clean_fids_when_well_conditioned(n, m, d):
    rng = np.random.default_rng(d)
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3
    b = rng.standard_normal((m, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.5
    assert metrics.frechet(a, b) == pytest.approx(_exact_frechet(a, b), rel=1e-6)
    if min(n, m) > d:
        assert metrics.frechet(a, b) == pytest.approx(metrics.fid(a, b), rel=1e-6)
    assert abs(metrics.frechet(a, a)) < 1e-6 * np.trace(np.cov(a, rowvar=False))


def test_the_judge_is_reused_for_the_same_shards_and_settings_and_retrained_otherwise(
        judged, small_shards, tmp_path):
    cfg, path, j = judged
    before = os.stat(path).st_mtime_ns
    assert judge.prepare(cfg, small_shards, path, say=lambda m: None) is None  # found, not retrained
    assert os.stat(path).st_mtime_ns == before
    root = os.path.dirname(path)
    # Settings that do not change the judge keep its file; ones that do name another.
    assert judge.path_for(C.override(cfg, {"method.lambda_cls": 0.4, "train.steps": 3}), root) == path
    assert judge.path_for(C.override(cfg, {"eval.fidelity_steps": 31}), root) != path
    # Other shards (another manifest) name another judge.
    other = tmp_path / "other"
    os.makedirs(other)
    raw = dict(shardset.read_manifest(small_shards).raw)
    raw["num_images"] += 1
    (other / "manifest.json").write_text(__import__("json").dumps(raw))
    assert judge.path_for(cfg, root, str(other)) != path
    assert j.meta["manifest_digest"] == judge.manifest_digest(shardset.read_manifest(small_shards))
    assert 0.5 <= j.meta["heldout_auroc"] <= 1.0 and str(cfg.eval.search_samples) in j.meta["floors"]
    # On the shards' test split too, per skin-tone group (4 images each here), with its counts.
    assert {g: v["n"] for g, v in j.meta["test"].items()} == {"all": 12, "I-II": 4, "III-IV": 4, "V-VI": 4}
    assert 0 <= j.meta["test"]["all"]["auroc"] <= 1 and j.meta["test"]["all"]["malignant"] == 3


def test_real_images_score_near_the_floor_and_noise_far_above_it(judged, small_shards):
    cfg, _, j = judged
    n = 8
    m = shardset.read_manifest(small_shards)
    labels = shards_lib.split_labels(small_shards, m, "train")
    pos = np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c in (0, 1)]))
    real = shards_lib.read_rows(small_shards, m, "train", pos)
    got = j.measure(real, labels[pos], KID_SUBSETS)
    assert 0.4 < got["fd_ratio"] < 2.5, got  # real images are as far as the floor says
    assert got["fd_judge_floor"] == pytest.approx(j.floor(n)["fd"])
    noise = (torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    bad = j.measure(noise, labels[pos], KID_SUBSETS)
    assert bad["fd_ratio"] > 3 * got["fd_ratio"]
    assert {"fidelity_auroc", "fidelity_accuracy_benign", "fidelity_accuracy_malignant", "kd_judge",
            "kd_judge_std", "ms_ssim", "fd_judge_benign", "fd_judge_malignant"} <= set(got)
    assert sum(v for k, v in got.items() if k.startswith("tone_") and k.endswith("_n")) == len(pos)
    # Real images show their lesion; the flat skin-coloured squares do not.
    assert got["lesion_share"] >= 0.8 and 0.5 < j.meta["lesion_share_real"] <= 1.0
    flat = real.float().mean((2, 3), keepdim=True).expand_as(real).round().to(torch.uint8)
    assert j.measure(flat, labels[pos], KID_SUBSETS)["lesion_share"] == 0.0


@pytest.mark.parametrize("size", [16, 32, 256])
def test_lesion_contrast_sees_a_dark_centred_disc_and_nothing_off_centre_or_flat(size):
    c = (torch.arange(size) + 0.5) / size * 2 - 1
    r = torch.hypot(c[:, None], c[None, :])
    skin = torch.full((3, size, size), 180.0)
    centred = torch.where(r < 0.3, 100.0, skin)  # a disc 80 levels darker than the skin
    corner = torch.where(torch.hypot(c[:, None] - 0.7, c[None, :] - 0.7) < 0.2, 100.0, skin)
    got = metrics.lesion_contrast(torch.stack([centred, corner, skin]).to(torch.uint8))
    assert got[0] == pytest.approx(80 / 180, abs=0.01) and got[1] == pytest.approx(0, abs=0.01) and got[2] == 0
    # Weber contrast: the same lesion, relative to its skin, scores the same on darker skin.
    dark = torch.where(r < 0.3, 50.0, torch.full((3, size, size), 90.0))
    assert metrics.lesion_contrast(dark[None].to(torch.uint8))[0] == pytest.approx(40 / 90, abs=0.01)


def test_search_samples_the_reference_split_cannot_hold_are_refused_naming_the_key(judged, small_shards):
    cfg, _, j = judged
    m = shardset.read_manifest(small_shards)
    fewest = min(m.counts("train").benign, m.counts("train").malignant)
    with pytest.raises(UserError, match=r"^eval.search_samples: .* lower it$"):
        judge.check_shards(C.override(cfg, {"eval.search_samples": fewest + 1}), m)
    judge.check_shards(C.override(cfg, {"eval.search_samples": fewest}), m)
    with pytest.raises(UserError, match="eval.search_samples"):
        j.floor(fewest + 1)


def test_the_comparison_is_paired_and_says_which_model_is_worse(judged, small_shards):
    cfg, _, j = judged
    m = shardset.read_manifest(small_shards)
    labels = shards_lib.split_labels(small_shards, m, "train")
    pos = np.concatenate([np.flatnonzero(labels == c)[:12] for c in (0, 1)])
    plan_labels = np.tile([0, 1], 12)  # the interleaved order of a generation plan
    order = np.concatenate([pos[:12], pos[12:]]).reshape(2, 12).T.reshape(-1)
    real = shards_lib.read_rows(small_shards, m, "train", order)
    assert np.array_equal(labels[order], plan_labels)
    # The failure: flat skin-coloured squares, no lesion.
    flat = real.float().mean((2, 3), keepdim=True).expand_as(real).round().to(torch.uint8)
    out = compare.table(j, {"1": (real, plan_labels), "2": (real.clone(), plan_labels),
                            "3": (flat, plan_labels)}, [6, 12], "1", boots=50)
    same = out["models"]["2"]["delta_n12"]
    assert same["fd"] == {"value": 0.0, "low": 0.0, "high": 0.0}  # paired: identical models differ by 0
    assert compare.verdict(same) == "no clear difference"
    assert compare.verdict(out["models"]["3"]["delta_n12"]) == "worse"
    assert compare.verdict(out["models"]["3"]["delta_n12"], "lesion_share") == "worse"
    assert out["models"]["3"]["n12"]["lesion_share"]["value"] == 0.0
    a = out["models"]["1"]["n12"]["fd"]
    assert a["low"] <= a["high"] and np.isfinite(a["value"])
    for model in ("1", "3"):  # resamples repeat images and inflate FD and KD: bias-corrected
        for k in ("fd", "kd", "fidelity_auroc"):
            got = out["models"][model]["n6"][k]
            assert got["low"] <= got["value"] <= got["high"], (model, k, got)


def test_in_training_samples_are_the_same_images_whatever_the_number_of_ranks(tmp_path):
    from cnd_ray import checkpoint

    ck = random_checkpoint(tmp_path / "ck", overrides=["eval.search_samples=6", "eval.batch_size=4"])
    state = checkpoint.load(ck, restore_rng=False)
    plan = monitor.sample_plan(state.cfg)
    assert len(plan["index"]) == 12 and (plan["label"] == 1).sum() == 6
    before = torch.get_rng_state()
    idx, one = monitor.sample_images(state, plan)
    assert torch.equal(torch.get_rng_state(), before)  # training's RNG is not touched
    parts = [monitor.sample_images(state, plan, rank=r, world=2) for r in (0, 1)]
    assert set(parts[0][0]).isdisjoint(parts[1][0])
    both = torch.cat([p[1] for p in parts])[np.argsort(np.concatenate([p[0] for p in parts]))]
    assert np.array_equal(idx, np.arange(12)) and torch.equal(both, one)


def test_inception_fid_comes_with_the_sample_metrics_when_its_weights_are_configured(judged, small_shards, tmp_path):
    from cnd_ray.evaluate import features
    from tests.test_features import _Base  # a TorchScript stand-in with clean-fid's interface

    torch.jit.save(torch.jit.script(_Base()), str(tmp_path / features.INCEPTION_FILE))
    cfg, _, j = judged
    assert judge.inception_reference(cfg) is None  # not configured: no FID, nothing loaded
    inception = judge.inception_reference(C.override(cfg, {"eval.inception_weights": str(tmp_path)}))
    m = shardset.read_manifest(small_shards)
    labels = shards_lib.split_labels(small_shards, m, "train")
    pos = np.sort(np.concatenate([np.flatnonzero(labels == c)[:6] for c in (0, 1)]))
    images = shards_lib.read_rows(small_shards, m, "train", pos)
    got = j.measure(images, labels[pos], KID_SUBSETS, inception=inception)
    assert got["fid"] > 0 and "fid" not in j.measure(images, labels[pos], KID_SUBSETS)


def test_loading_the_judge_leaves_the_callers_rng_alone(judged):
    """A resumed training worker loads the judge after restoring its RNG from the checkpoint: the
    judge's (overwritten) random init must not draw from it, or resume is no longer exact."""
    _, path, _ = judged
    torch.manual_seed(123)
    before = torch.get_rng_state()
    judge.load(path)
    assert torch.equal(torch.get_rng_state(), before)


def test_an_fd_interval_holds_its_value_though_resamples_run_high():
    """Resampling with replacement repeats rows, which narrows their spread: FD of resamples runs
    high, and at the quickstart's 32 images per class its plain percentile interval lay wholly above
    the value. The table's intervals are corrected for that bias."""
    rng = np.random.default_rng(0)
    real, gen = rng.normal(size=(32, 16)), rng.normal(0.3, 1.0, size=(32, 16))
    value = metrics.frechet(real, gen)
    boot = [metrics.frechet(real[rng.integers(32, size=32)], gen[rng.integers(32, size=32)])
            for _ in range(200)]
    assert np.percentile(boot, 2.5) > value  # the plain interval misses its own value
    got = compare.interval(value, boot)
    assert got["low"] < value < got["high"]
