"""`cnd-ray evaluate` end to end on a tiny model and tiny shards, plus the metric promises of issue 6."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cnd_ray import config as C
from cnd_ray.errors import UserError
from cnd_ray.evaluate import features, metrics
from cnd_ray.jobs import evaluate
from cnd_ray.data import shards as shards_lib
from tests.helpers import MlflowServer, random_checkpoint

# Small everything: a 16 px debug model, random-weight extractors, a short fidelity classifier.
FAST = ["eval.extractors=fidelity,timm:test_resnet", "eval.timm_weights=random",
        "eval.num_samples=24,48", "eval.fidelity_backbone=test_resnet", "eval.fidelity_steps=40",
        "eval.msssim_pairs=20", "eval.kid_subsets=10", "eval.kid_subset_size=16",
        "eval.batch_size=8", "eval.actors=2", "diffusion.sample_steps=4"]


@pytest.fixture(scope="module")
def shards(small_shards):
    return small_shards


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("evalck") / "ckpt")


def test_distance_of_a_set_to_itself_is_zero_and_grows_with_a_shift():
    """With a small random-weight extractor (no Inception here): FD/KD 0 against itself, then
    growing with a controlled brightness shift."""
    ext = features.timm_model("test_resnet", "random")
    g = torch.Generator().manual_seed(0)
    base = (torch.rand(300, 3, 16, 16, generator=g) * 160 + 40).to(torch.uint8)
    ref = ext.features(base)
    fds, kds = [], []
    for shift in (0, 10, 30, 60):
        x = ext.features((base.int() + shift).clamp(0, 255).to(torch.uint8))
        fds.append(metrics.fid(ref, x))
        kds.append(metrics.kid(ref, x, subsets=5, subset_size=100)[0])
    assert abs(fds[0]) < 1e-6 and abs(kds[0]) < 0.02 * max(kds)
    assert fds == sorted(fds) and kds == sorted(kds) and fds[1] > 0


def test_ms_ssim_of_identical_images_is_one():
    x = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    torch.testing.assert_close(metrics.ms_ssim(x, x), torch.ones(4, dtype=torch.float64))


def test_read_rows_picks_the_rows_iter_split_yields(shards):
    from cnd_ray.data import shardset

    m = shardset.read_manifest(shards)
    images = torch.cat([x for x, _ in shards_lib.iter_split(shards, m, "train")])
    pos = [len(images) - 1, 0, 5, 5]
    assert torch.equal(shards_lib.read_rows(shards, m, "train", pos), images[pos])
    labels = np.concatenate([y for _, y in shards_lib.iter_split(shards, m, "train")])
    np.testing.assert_array_equal(shards_lib.split_labels(shards, m, "train"), labels)
    assert len(torch.cat([x for x, _ in shards_lib.iter_split(shards, m, "train", limit=7)])) == 7


def test_bad_settings_fail_before_any_work(tmp_path, ckpt, shards):
    cfg = C.load("debug")
    with pytest.raises(C.ConfigError, match="eval.extractors: 'vgg' is not"):
        evaluate.extractor_names(C.override(cfg, {"eval.extractors": "vgg"}))
    with pytest.raises(C.ConfigError, match="eval.num_samples"):
        C.override(cfg, {"eval.num_samples": "5k"})
    assert evaluate.sample_counts(C.override(cfg, {"eval.num_samples": "20,5,20"})) == [5, 20]
    with pytest.raises(UserError, match="eval.inception_weights: no Inception weights at .*nowhere"):
        evaluate.run(ckpt, shards, out=str(tmp_path / "e"), progress=False,
                     overrides=["eval.extractors=inception", f"eval.inception_weights={tmp_path}/nowhere.pt"])
    assert not (tmp_path / "e" / "samples").exists()
    with pytest.raises(UserError, match="images are 16 px, the checkpoint generates 32 px"):
        evaluate.run(random_checkpoint(tmp_path / "ck32", overrides=["data.image_size=32"]), shards,
                     out=str(tmp_path / "e2"), progress=False)


@pytest.mark.slow
def test_evaluate_end_to_end_with_mlflow(ray_local, tmp_path, ckpt, shards):
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    try:
        res = evaluate.run(ckpt, shards, out=str(tmp_path / "e"), progress=False,
                           overrides=FAST + [f"track.tracking_uri={server.uri}"])
        out = tmp_path / "e"
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["mlflow"]["run_id"] == res["mlflow"]["run_id"] and res["mlflow"]["new_run"]
        p = saved["protocol"]
        assert p["num_samples"] == [24, 48] and p["steps"] == 4 and p["reference"]["split"] == "train"
        assert [x["extractor"] for x in p["extractors"]] == ["fidelity-test_resnet", "timm-test_resnet"]
        # 48 generated in the reference's class mix, the first 24 too (plans are prefixes)
        ref = p["reference"]["counts"]
        d = saved["distances"]["timm-test_resnet"]
        share = ref["malignant"] / (ref["benign"] + ref["malignant"])
        for n in ("24", "48"):
            assert abs(d[n]["malignant"]["n_generated"] - share * int(n)) <= 1
            assert d[n]["all"]["n_generated"] == int(n)
            # fewer images than feature dims: FD refused, KD given with its spread
            assert "fd" not in d[n]["all"] and "dims" in d[n]["all"]["fd_refused"]
            assert d[n]["all"]["kd_std"] >= 0 and np.isfinite(d[n]["all"]["kd"])
        div = saved["diversity"]
        assert set(div["generated"]["per_class"]) == {"benign", "malignant"}
        assert 0 < div["real"]["all"]["ms_ssim"] <= 1 and div["generated"]["all"]["pairs"] == 40
        f = saved["fidelity"]
        assert f["generated"]["n"] == 48 and 0 <= f["generated"]["auroc"] <= 1
        assert f["heldout"]["auroc"] > 0.8  # the independent classifier learnt the synthetic classes
        tones = saved["skin_tone"]  # every image in one band, real and generated
        assert sum(r["generated"] for r in tones.values()) == 48
        assert sum(r["real"] for r in tones.values()) == p["reference"]["images"]
        assert "## Skin tone" in (out / "metrics.md").read_text()
        m = saved["memorisation"]
        assert m["space"] == "fidelity-test_resnet" and 0 <= m["share_under"] <= 1
        md = (out / "metrics.md").read_text()
        assert "| FD_timm-test_resnet | all | refused | refused |" in md and "KD_timm-test_resnet x1e3" in md
        assert "## Class fidelity" in md and "## Memorisation" in md
        assert Image.open(out / "nearest.png").size == (8 * 64, 2 * 64)  # 8 pairs of 16 px, x4
        assert "![nearest](nearest.png)" in md
        for name in ("pca_fidelity-test_resnet.png", "pca_timm-test_resnet.png"):
            assert (out / name).stat().st_size > 1000
        assert len(list((out / "samples").rglob("*.png"))) == 48
        # logged to a new MLflow run (the checkpoint has none), read back over REST
        rid = res["mlflow"]["run_id"]
        run = server.rest(f"runs/get?run_id={rid}")["run"]
        names = {m["key"] for m in run["data"]["metrics"]}
        assert {"eval/KD_timm-test_resnet_48", "eval/KD_timm-test_resnet_24_malignant",
                "eval/ms_ssim", "eval/fidelity_auroc", "eval/memorised_share"} <= names
        arts = server.rest(f"artifacts/list?run_id={rid}&path=evaluation/step0000000")
        assert {"metrics.json", "metrics.md", "pca_timm-test_resnet.png"} <= {
            os.path.basename(a["path"]) for a in arts["files"]}
        # a rerun reuses samples and the fidelity classifier, and forcing FD gives numbers
        again = evaluate.run(ckpt, shards, out=str(tmp_path / "e"), progress=False,
                             overrides=FAST + [f"track.tracking_uri={server.uri}", "eval.force_fid=true"])
        assert again["sampling"]["generated"] == 0
        assert again["distances"]["timm-test_resnet"]["48"]["all"]["fd"] > 0
        assert again["diversity"] == res["diversity"]
    finally:
        server.stop()


@pytest.mark.slow
def test_cli_evaluate(tmp_path, ckpt, shards):
    env = {**os.environ, "RAY_ADDRESS": "", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    cmd = [sys.executable, "-m", "cnd_ray", "evaluate", "--ckpt", ckpt, "--reference", shards,
           "--num-samples", "16", "--out", str(tmp_path / "e"), "--sampler", "ddim", "--steps", "3",
           *[o for o in FAST if not o.startswith(("eval.num_samples", "diffusion.sample_steps"))]]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "# Evaluation: step 0" in r.stdout and "sampler **ddim** x 3 steps" in r.stdout
    assert f"metrics: {tmp_path / 'e'}/metrics.json" in r.stdout
    bad = subprocess.run(cmd + ["eval.extractors=inception", f"eval.inception_weights={tmp_path}/x.pt"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "eval.inception_weights: no Inception weights" in bad.stderr
