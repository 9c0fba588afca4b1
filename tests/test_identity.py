"""Run identity (cnd_ray.launch.identity) and the key roles it is derived from (config field metadata)."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from cnd_ray import config as C
from cnd_ray.launch import identity
from cnd_ray.errors import UserError

# The derived sets, pinned: a key that moves between roles must move here too, on purpose.
JUDGES = {"train.steps", "train.eval_every", "train.eval_batches", "diffusion.guidance_scale",
          "diffusion.guidance_channels", "diffusion.tone_guidance_scale",
          "eval.sample_metrics", "eval.search_samples", "eval.search_sampler",
          "eval.search_sample_steps", "eval.seed", "eval.kid_subsets"}
OPERATES_OUTSIDE_SECTIONS = {
    "train.name", "train.storage", "train.checkpoint_every", "train.keep_checkpoints",
    "train.max_failures", "train.log_every", "train.log_rows", "train.resume_with_changes",
    "data.shuffle_buffer", "data.decode_tasks", "data.vae",
    "diffusion.sampler", "diffusion.sample_steps", "diffusion.eta",
    # speed and memory, the same model: GPU-only switches and recomputation
    "model.grad_checkpoint", "classifier.channels_last", "optim.fused", "train.tf32", "train.compile",
    "scale.grad_overlap"}
OPERATES_SECTIONS = ("scale.", "track.", "eval.")
JUDGES_SECTIONS = ("fairness.",)  # the downstream classifier a search can rank trials by
SAMPLING_OUTSIDE_SECTIONS = {"diffusion.sampler", "diffusion.sample_steps", "diffusion.eta",
                             "diffusion.guidance_scale", "diffusion.guidance_channels",
                             "diffusion.tone_guidance_scale", "data.vae",
                             "data.shards"}


def test_key_roles_are_pinned():
    every = set(C.Config().flat())
    assert C.keys() == every
    judges = JUDGES | {k for k in every if k.startswith(JUDGES_SECTIONS)}
    assert C.keys(C.JUDGES) == judges
    operates = {k for k in every if k.startswith(OPERATES_SECTIONS)} - judges | OPERATES_OUTSIDE_SECTIONS
    assert C.keys(C.OPERATES) == operates
    assert C.keys(C.TRAINS) == every - judges - operates
    assert C.keys(sampling=True) == SAMPLING_OUTSIDE_SECTIONS | {
        k for k in every if k.startswith(("eval.", "track."))}


def test_run_name_follows_what_is_trained():
    a = C.load("debug")
    same = {"train.steps": 999, "scale.num_workers": 2, "train.log_every": 3,
            "diffusion.sampler": "ddim", "diffusion.guidance_scale": 2.0}
    assert identity.run_name(a) == identity.run_name(C.override(a, same))
    assert identity.run_name(a) != identity.run_name(C.override(a, {"method.lambda_cls": 0.3}))
    assert identity.run_name(C.override(a, {"train.name": "mine"})) == "mine"


def test_search_name_follows_what_trials_are_ranked_on_not_where_they_run():
    cfg = C.load("debug")
    a = identity.search_name("smoke", "space text", cfg)
    assert a.startswith("smoke-")
    for same in ({"train.storage": "/elsewhere", "track.tracking_uri": "http://x"},
                 {"train.log_every": 3, "scale.num_workers": 2, "train.checkpoint_every": 7}):
        assert a == identity.search_name("smoke", "space text", C.override(cfg, same))
    for other in ({"train.steps": 21}, {"eval.search_samples": 3}, {"method.lambda_cls": 0.3}):
        assert a != identity.search_name("smoke", "space text", C.override(cfg, other))
    assert a != identity.search_name("smoke", "another space", cfg)


def test_a_key_added_later_leaves_names_as_they_were_at_its_default():
    """Upgrading must not rename (and so restart) what rerunning a command would resume: a key
    marked config.ADDED counts in names only away from its default."""
    cfg = C.load("quickstart")
    assert C.added_at_default(cfg) == {"fairness.members", "train.synthetic_test_per_tone"}  # on purpose
    before = {k: v for k, v in cfg.flat().items() if k not in C.added_at_default(cfg)}  # as if not there

    def digest(obj, n: int) -> str:  # the names' hash, spelled out: the format is what resumes rely on
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]

    keep = C.keys(C.TRAINS) | C.keys(C.JUDGES)
    assert identity.search_name("s", "t", cfg) == "s-" + digest(["t", {k: v for k, v in before.items() if k in keep}], 8)
    assert identity.run_name(cfg) == "cnd-" + digest({k: v for k, v in before.items() if k in C.keys(C.TRAINS)}, 10)
    for changed in ({"fairness.members": 3}, {"train.synthetic_test_per_tone": 20}):
        assert identity.search_name("s", "t", cfg) != identity.search_name("s", "t", C.override(cfg, changed))
    assert identity.run_name(cfg) != identity.run_name(C.override(cfg, {"train.synthetic_test_per_tone": 20}))


def test_resume_changes_split_trained_from_other_keys():
    a = C.load("debug")
    b = C.override(a, {"method.lambda_cls": 0.3, "train.steps": 50, "diffusion.sampler": "ddim"})
    trained, other = identity.resume_changes(a, b)
    assert [x.split()[0] for x in trained] == ["method.lambda_cls"]
    assert [x.split()[0] for x in other] == ["diffusion.sampler", "train.steps"]


def test_storage_and_run_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = C.override(C.load("debug"), {"train.name": "r"})
    assert identity.storage_path(cfg) == os.path.join(str(tmp_path), identity.DEFAULT_STORAGE)
    assert identity.run_dir(cfg) == os.path.join(str(tmp_path), identity.DEFAULT_STORAGE, "r")
    uri = C.override(cfg, {"train.storage": "s3://bucket/x"})
    assert identity.run_dir(uri) == "s3://bucket/x/r"
    assert identity.trials_storage(uri, "smoke-1") == "s3://bucket/x/smoke-1-trials"
    assert identity.trial_run("smoke-1", "abc") == "smoke-1-abc"


def test_a_trial_is_named_by_what_it_varies():
    assert identity.trial_label("4", {}) == "setting4"
    label = identity.trial_label("", {"method.lambda_cls": 0.123456, "method.gamma_schedule": "periodic ramp"})
    assert label == "gamma_schedule=periodic_ramp-lambda_cls=0.123"  # sorted keys, 3 digits, path-safe
    assert identity.trial_label("2", {"method.gamma": 0.5}) == "setting2-gamma=0.5"
    assert len(identity.trial_label("", {f"k{i}": 0.5 for i in range(20)})) == 60
    assert identity.trial_run("paper-1", "c_00003", "setting4") == "setting4-paper-1-c_00003"
    assert identity.trial_name("c_00003", "setting4") == "c_00003-setting4" and identity.trial_name("abc") == "abc"


def test_resolve_checkpoint_names_what_it_is_not(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "meta.json").write_text("{}")
    assert identity.resolve_checkpoint(str(tmp_path / "ck")) == str(tmp_path / "ck")
    assert identity.latest_checkpoint(str(tmp_path / "none")) is None
    with pytest.raises(UserError, match="--ckpt .*missing: not a cnd_ray checkpoint"):
        identity.resolve_checkpoint(str(tmp_path / "missing"))
