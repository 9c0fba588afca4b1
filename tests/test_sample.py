"""`cnd-ray sample`: Ray actors give the same images as one process, resume, protocol guards, CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cnd_ray import checkpoint, config as C, generate
from cnd_ray.launch import identity, sample
from cnd_ray.errors import UserError
from tests.helpers import random_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("ck") / "ckpt")


def _images(folder) -> dict:
    idx = pq.read_table(os.path.join(folder, "index.parquet")).to_pydict()
    return {i: np.asarray(Image.open(os.path.join(folder, f))) for i, f in zip(idx["index"], idx["file"])}


def test_plan_labels_keep_their_shares_in_every_prefix():
    labels = generate.labels_for([0.9, 0.1], 2000)
    assert labels.sum() == 200
    for n in (10, 100, 500, 1000):
        assert abs(labels[:n].sum() - 0.1 * n) <= 1
    p = generate.plan(50, [1, 1], seed=3, batch_size=8)
    assert p["label"][:6].tolist() == [0, 1, 0, 1, 0, 1] and p["chunk"][-1] == 6
    assert generate.plan(20, [1, 1], 3, 8)["seed"].tolist() == p["seed"][:20].tolist()  # prefixes
    assert len(set(p["seed"].tolist())) == 50


@pytest.mark.slow
def test_two_actors_make_the_images_one_process_makes(ray_local, tmp_path, ckpt):
    over = ["eval.batch_size=4", "diffusion.sampler=ddpm", "diffusion.sample_steps=6"]
    out = sample.run(ckpt, str(tmp_path / "s"), num_per_class=7, overrides=over + ["eval.actors=2"],
                     progress=False)
    assert out["images"] == 14 and out["generated"] == 14 and out["timing"]["actors"] == 2
    got = _images(tmp_path / "s")
    # The same chunks in this process, without Ray.
    cfg, ema, _ = checkpoint.load_ema(ckpt)
    cfg = C.override(cfg, over)
    rows = generate.plan(14, [1, 1], 0, 4)
    gen = generate.Generator(cfg, ema)
    for c in np.unique(rows["chunk"]):
        sel = rows["chunk"] == c
        imgs = gen(rows["seed"][sel], rows["label"][sel], rows["tone"][sel]).permute(0, 2, 3, 1).numpy()
        for i, a in zip(rows["index"][sel], imgs):
            np.testing.assert_array_equal(got[int(i)], a)
    idx = pq.read_table(tmp_path / "s" / "index.parquet").to_pydict()
    assert idx["class"].count("malignant") == 7 and idx["seed"] == rows["seed"].tolist()
    assert all(f.startswith(c + "/") for f, c in zip(idx["file"], idx["class"]))
    meta = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert meta["protocol"]["steps"] == 6 and meta["counts"] == {"benign": 7, "malignant": 7}


@pytest.mark.slow
def test_rerun_finishes_and_extends_without_redoing(ray_local, tmp_path, ckpt):
    over = ["eval.batch_size=4", "diffusion.sample_steps=4", "eval.actors=1"]
    folder = tmp_path / "s"
    sample.run(ckpt, str(folder), num_per_class=4, overrides=over, progress=False)
    first = _images(folder)
    os.remove(folder / "malignant" / "000003.png")  # an interrupted run lost a chunk
    mtime = os.path.getmtime(folder / "benign" / "000000.png")
    out = sample.run(ckpt, str(folder), num_per_class=6, overrides=over, progress=False)
    assert out["images"] == 12 and out["generated"] == 1 + 4  # the lost one, and chunk 2
    assert os.path.getmtime(folder / "benign" / "000000.png") == mtime
    again = _images(folder)
    for i, a in first.items():
        np.testing.assert_array_equal(again[i], a)
    assert len(again) == 12 and not list(folder.rglob(".*.tmp"))


def test_another_protocol_in_the_same_folder_is_refused(ray_local, tmp_path, ckpt):
    over = ["eval.batch_size=4", "diffusion.sample_steps=4", "eval.actors=1"]
    sample.run(ckpt, str(tmp_path / "s"), num_per_class=2, overrides=over, progress=False)
    with pytest.raises(UserError, match=r"another eta, sampler, steps \(eta None -> 0.0, sampler 'ddpm' -> 'ddim', steps 4 -> 5\)"):
        sample.run(ckpt, str(tmp_path / "s"), num_per_class=2, progress=False,
                   overrides=["eval.batch_size=4", "diffusion.sampler=ddim", "diffusion.sample_steps=5"])


def test_model_keys_are_fixed_by_the_checkpoint(ckpt):
    cfg = checkpoint.load_config(ckpt)
    with pytest.raises(C.ConfigError, match="model.size: fixed by the checkpoint"):
        sample.sampling_config(cfg, ["model.size=S"])
    assert sample.sampling_config(cfg, ["diffusion.sampler=dpm++"]).diffusion.sampler == "dpm++"
    with pytest.raises(UserError, match="not trained with a skin-tone"):
        sample.run(ckpt, "unused", num_per_class=1, tone=1)
    with pytest.raises(UserError, match="not a cnd_ray checkpoint"):
        identity.resolve_checkpoint(os.path.dirname(ckpt) + "/missing")


@pytest.mark.slow
def test_tone_conditioned_model_samples_a_requested_group(ray_local, tmp_path):
    ck = random_checkpoint(tmp_path / "ck", overrides=["model.tone_groups=3"])
    out = sample.run(ck, str(tmp_path / "s"), num_per_class=2, tone=2, progress=False,
                     overrides=["diffusion.sample_steps=3", "eval.actors=1"])
    assert pq.read_table(tmp_path / "s" / "index.parquet").column("tone").to_pylist() == [2] * 4
    assert out["images"] == 4
    c = out["tone_check"]  # every image's tone read back, counted per group (3 = unknown)
    assert c["requested"] == [2] and c["images"] == 4 and sum(c["read_back"].values()) == 4
    # Another tone in the same folder would leave tone-2 images scored as the new request: refused.
    with pytest.raises(UserError, match="tone 2 -> 0"):
        sample.run(ck, str(tmp_path / "s"), num_per_class=2, tone=0, progress=False,
                   overrides=["diffusion.sample_steps=3", "eval.actors=1"])
    with pytest.raises(UserError, match="tone_guidance_scale 4.0 -> 1.0"):  # so would another tone guidance
        sample.run(ck, str(tmp_path / "s"), num_per_class=2, tone=2, progress=False,
                   overrides=["diffusion.sample_steps=3", "eval.actors=1", "diffusion.tone_guidance_scale=1"])


@pytest.mark.slow
def test_latent_checkpoint_samples_are_decoded_by_the_shards_vae(ray_local, tmp_path, latent_shards):
    shards, manifest, vae = latent_shards
    ck = random_checkpoint(tmp_path / "ck", overrides=[
        f"data.shards={shards}", "data.space=latent", "data.image_size=64", "model.patch_size=2"])
    sample.run(ck, str(tmp_path / "s"), num_per_class=1, progress=False,
               overrides=["diffusion.sample_steps=3", "eval.actors=1"])
    img = np.asarray(Image.open(tmp_path / "s" / "malignant" / "000001.png"))
    assert img.shape == (64, 64, 3)
    # The same latent decoded here by the same VAE.
    cfg, ema, _ = checkpoint.load_ema(ck)
    cfg = C.override(cfg, {"diffusion.sample_steps": 3})
    want = generate.Generator(cfg, ema, vae.eval())([generate.image_seed(0, 1)], [1], [-1])
    assert np.abs(want[0].permute(1, 2, 0).numpy().astype(int) - img.astype(int)).max() <= 1


@pytest.mark.slow
def test_cli_sample_and_its_errors(tmp_path, ckpt):
    env = {**os.environ, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "cnd_ray", "sample", "--ckpt", ckpt, "--num-per-class", "2",
           "--out", str(tmp_path / "s"), "--sampler", "dpm++", "--steps", "5", "--cfg-scale", "2",
           "--seed", "7", "eval.actors=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "4 images (4 new" in r.stdout and "dpm++ x 5 steps, guidance 2.0, seed 7" in r.stdout
    assert f"samples: {tmp_path / 's'}" in r.stdout
    bad = subprocess.run(cmd[:-1] + ["model.size=S"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "model.size: fixed by the checkpoint" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = subprocess.run(cmd[:4] + [str(tmp_path)] + cmd[4:], capture_output=True, text=True, env=env)
    assert bad.returncode == 2


def test_guidance_needs_the_null_label(tmp_path):
    ck = random_checkpoint(tmp_path / "ck", overrides=["model.class_dropout=0"])
    with pytest.raises(C.ConfigError, match="guidance needs the null label"):
        sample.sampling_config(checkpoint.load_config(ck), ["diffusion.guidance_scale=2"])


def test_generator_uses_the_null_tone_when_none_is_asked(tmp_path):
    ck = random_checkpoint(tmp_path / "ck", overrides=["model.tone_groups=2"])
    cfg, ema, _ = checkpoint.load_ema(ck)
    gen = generate.Generator(C.override(cfg, {"diffusion.sample_steps": 3}), ema)
    a = gen([5], [0], [generate.NO_TONE])
    calls = []
    real = gen.dit.forward
    gen.dit.forward = lambda x, t, y, tone=None: calls.append(tone.tolist()) or real(x, t, y, tone)
    torch.testing.assert_close(gen([5], [0], [generate.NO_TONE]), a)
    assert calls[0] == [2]
    # diffusion.tone_guidance_scale reaches the sampler: e(y, tone), e(-, tone), e(-, -) each step.
    gen = generate.Generator(C.override(cfg, {"diffusion.sample_steps": 3, "diffusion.guidance_scale": 2.0,
                                              "diffusion.tone_guidance_scale": 3.0}), ema)
    real, calls[:] = gen.dit.forward, []
    gen.dit.forward = lambda x, t, y, tone=None: calls.append((y.tolist(), tone.tolist())) or real(x, t, y, tone)
    gen([5], [0], [1])
    assert calls[0] == ([0, 2, 2], [1, 1, 2])
