import subprocess
import sys

import pytest
import yaml

from cnd_ray import config as C


def test_every_packaged_yaml_loads_and_validates():
    names = C.packaged_names()
    assert {"paper", "quickstart", "debug", "reference"} <= set(names)
    for n in names:
        C.validate(C.load(n))


def test_paper_is_setting_2_of_the_released_code():
    cfg = C.load("paper")
    assert (cfg.model.size, cfg.model.patch_size, cfg.model.block) == ("L", 4, "adaln_zero")
    assert (cfg.data.image_size, cfg.data.space, cfg.input_size, cfg.in_channels) == (256, "latent", 32, 4)
    assert cfg.classifier.backbone == "resnet101"
    assert cfg.train.global_batch == 8
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.ema_decay) == (1e-4, 0.0, 0.9999)
    assert (cfg.classifier.lr, cfg.classifier.momentum) == (3e-4, 0.9)
    assert (cfg.method.gamma_schedule, cfg.method.gamma, cfg.method.lambda_cls) == ("constant", 0.25, 0.2)


def test_reference_is_the_released_code():
    cfg = C.load("reference")
    assert cfg.model.block == "xattn_pool"
    assert cfg.method.denoised_input == "reference"
    assert (cfg.method.gamma, cfg.method.lambda_cls) == (0.25, 0.2)
    # The released critic, whatever cnd_ray's defaults: the label, every timestep, uncapped, clean-trained.
    m = cfg.method
    assert (m.critic_target, m.critic_t_min, m.critic_t_max, m.critic_balance, m.critic_warmup) == (
        "label", 0.0, 1.0, "none", 0)
    assert cfg.classifier.adversarial == "none"


def test_quickstart_is_tiny_and_pixel_space():
    cfg = C.load("quickstart")
    assert cfg.data.space == "pixel" and cfg.in_channels == 3
    assert cfg.model.size in ("T", "XS")


def test_overrides_coerce_types():
    cfg = C.load("debug", ["optim.lr=1e-3", "model.patch_size=2", "train.steps=1e3",
                           "classifier.ema=true", "classifier.backbone=resnet18"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.model.patch_size == 2 and cfg.train.steps == 1000
    assert cfg.classifier.ema is True and cfg.classifier.backbone == "resnet18"
    # Tune passes python values through the same function
    assert C.override(cfg, {"method.lambda_cls": 0.3}).method.lambda_cls == 0.3


@pytest.mark.parametrize("override, fragment", [
    ("method.lambda=1", "unknown config key 'method.lambda' (did you mean method.lambda_cls?)"),
    ("method.gamma_schedule=foo", "method.gamma_schedule: 'foo' is not one of off, constant"),
    ("model.patch_size=3", "model.patch_size: 3 is not one of 2, 4, 8"),
    ("optim.lr=-1", "optim.lr: -1.0 is outside"),
    ("method.gamma=1.5", "method.gamma: 1.5 is outside [0.0, 1.0]"),
    ("train.steps=abc", "train.steps: 'abc' is not an integer"),
    ("optim.lr=nan", "optim.lr: 'nan' is not a finite number"),
    ("train.steps=2.5", "train.steps: 2.5 is not an integer"),
    ("classifier.ema=3", "classifier.ema: 3 is not a boolean"),
    ("bogus.key=1", "unknown config key 'bogus'"),
    ("lambda_cls=1", "must be section.key"),
    ("model.patch_size=8", "model.patch_size: 8 does not divide the input size"),
    ("model.num_classes=5", "model.num_classes: the benign/malignant classifier needs 2"),
    ("diffusion.tone_guidance_scale=-1", "diffusion.tone_guidance_scale: -1.0 is outside"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(C.ConfigError) as e:
        C.load("debug", [override, "data.image_size=12"] if "divide" in fragment else [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_tone_guidance_needs_the_null_tone_only_where_a_tone_conditions():
    with pytest.raises(C.ConfigError, match="diffusion.tone_guidance_scale: 4 guides the skin tone"):
        C.load("debug", ["model.tone_groups=3", "model.tone_dropout=0"])
    C.load("debug", ["model.tone_groups=3", "model.tone_dropout=0", "diffusion.tone_guidance_scale=1"])
    C.load("debug", ["model.tone_dropout=0"])  # no tone condition: nothing to guide


def test_batch_must_split_over_workers_and_accumulation():
    with pytest.raises(C.ConfigError, match="train.global_batch"):
        C.load("debug", ["scale.num_workers=3"])
    cfg = C.load("debug", ["scale.num_workers=2", "optim.grad_accum=2"])
    assert cfg.per_worker_batch == 4 and cfg.per_worker_batch % cfg.optim.grad_accum == 0


def test_any_class_count_without_classifier():
    cfg = C.load("debug", ["model.num_classes=7", "method.gamma_schedule=off"])
    assert cfg.model.num_classes == 7 and not cfg.use_classifier


def test_flat_and_yaml_round_trip(tmp_path):
    cfg = C.load("quickstart", ["method.lambda_cls=0.3"])
    flat = cfg.flat()
    assert flat["method.lambda_cls"] == 0.3 and flat["model.size"] == "XS"
    assert C.override(C.load(), flat) == cfg  # the flat names are the override names
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert C.load(str(p)) == cfg


def test_bad_yaml_file_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  sise: L\n")
    with pytest.raises(C.ConfigError, match=r"bad.yaml: unknown config key 'model.sise'"):
        C.load(str(p))
    with pytest.raises(C.ConfigError, match="not a packaged config"):
        C.load("nope")


def test_dit_sizes_match_registry():
    from cnd_ray.models.dit import SIZES
    assert tuple(SIZES) == C.DIT_SIZES


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cnd_ray", *args], capture_output=True, text=True)


def test_cli_config_prints_resolved_yaml():
    r = _cli("config", "--config", "debug", "method.lambda_cls=0.5")
    assert r.returncode == 0, r.stderr
    assert C.from_dict(yaml.safe_load(r.stdout)) == C.load("debug", ["method.lambda_cls=0.5"])


def test_cli_bad_key_exits_2_with_one_line():
    r = _cli("config", "--config", "debug", "method.lamda_cls=0.5")
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.strip().count("\n") == 0
    assert "method.lamda_cls" in r.stderr and "method.lambda_cls" in r.stderr


def test_cli_params():
    r = _cli("config", "--config", "paper", "--params", "model.num_classes=2")
    assert r.returncode == 0, r.stderr
    out = yaml.safe_load(r.stdout)
    # DiT-L/4 with 2 classes = the paper's 458,053,760 minus 998 label rows of 1024
    assert out["dit_params"] == 458_053_760 - 998 * 1024
    assert out["classifier_params"] > 42_000_000


def test_help_lists_only_working_verbs_and_imports_no_torch():
    code = ("import sys; from cnd_ray.cli import build_parser; build_parser().format_help(); "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "ok", r.stderr
    h = _cli("--help").stdout
    for verb in ("config", "ingest", "synth"):
        assert verb in h


def test_cli_overrides_may_follow_flags():
    from cnd_ray import cli

    args = cli.parse(["evaluate", "--ckpt", "C", "--reference", "R", "eval.seed=1", "--out", "D",
                      "eval.actors=2", "--steps", "5", "diffusion.eta=0.5"])
    assert args.overrides == ["eval.seed=1", "eval.actors=2", "diffusion.eta=0.5"]
    assert args.out == "D" and args.steps == 5
    assert cli.sampling_overrides(args)[0] == "diffusion.sample_steps=5"
    with pytest.raises(SystemExit):  # a stray word, or an unknown flag, is still an error
        cli.parse(["train", "train.steps=3", "--config", "debug", "oops"])
    with pytest.raises(SystemExit):
        cli.parse(["sample", "--ckpt", "C", "--out", "D", "--num-per-class", "1", "--bogus"])


@pytest.mark.parametrize("verb", ["train", "tune"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_search_samples_below_one_fail_in_one_line_naming_the_key(verb, value):
    extra = ["--space", "smoke"] if verb == "tune" else []
    r = _cli(verb, *extra, "--config", "debug", f"eval.search_samples={value}")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0
    assert f"eval.search_samples: {value} is outside [1, inf]" in r.stderr


def test_search_samples_the_data_cannot_hold_fail_before_ray_starts(small_shards, tmp_path):
    """The floor draws eval.search_samples real images per class: more than the shards' rarer class
    has is refused in one line, for a run and a search, and Ray is never started."""
    code = ("import ray, sys; from cnd_ray import config; from cnd_ray.launch import train, tune\n"
            "from cnd_ray.errors import UserError\n"
            f"cfg = config.load('debug', ['data.shards={small_shards}', 'eval.search_samples=500', "
            f"'train.storage={tmp_path}'])\n"
            "for go in (lambda: train.run(cfg), lambda: tune.run('smoke', cfg)):\n"
            "    try: go()\n"
            "    except UserError as e: print(e)\n"
            "print('ray started' if ray.is_initialized() else 'no ray')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "no ray", r.stdout + r.stderr
    assert len(lines) == 3 and all(x.startswith("eval.search_samples: 500 per class") for x in lines[:2])


def test_the_quickstart_recipe_is_its_own_and_the_paper_keeps_the_papers():
    q, p = C.load("quickstart"), C.load("paper")
    assert (q.diffusion.loss_weighting, q.optim.ema_warmup, q.optim.grad_clip) == ("min_snr", True, 1.0)
    assert q.diffusion.guidance_scale > 1 and q.eval.sample_metrics
    assert (p.diffusion.loss_weighting, p.optim.warmup_steps, p.optim.ema_warmup, p.optim.grad_clip,
            p.diffusion.guidance_scale) == ("uniform", 0, False, 0.0, 1.0)


def test_every_verb_is_one_function_of_verbs_py_whose_result_prints_itself():
    """cli.py only parses and dispatches: each verb of `cnd-ray --help` is the function of the same
    name in verbs.py, and what a verb prints is its result's str."""
    import inspect

    from cnd_ray import cli, verbs

    names = set(cli.build_parser()._subparsers._group_actions[0].choices)
    functions = {n.replace("_", "-") for n, f in vars(verbs).items()
                 if inspect.isfunction(f) and f.__module__ == verbs.__name__ and not n.startswith("_")}
    assert names == functions
    done = verbs.Verified(code=1, shards="S", good=7, problems=["S/train-0.parquet: row group 2: bad"])
    assert str(done) == "S/train-0.parquet: row group 2: bad\n7 rows read and decoded; 1 problem(s): re-ingest S"
    assert str(verbs.Trained(code=1, err="cnd-ray train: stopped: x")) == ""  # the error goes to stderr
