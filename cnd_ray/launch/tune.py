"""`cnd-ray tune`: a Ray Tune search whose trials are full `cnd-ray train` runs; the one Tuner.

Driver (`run`): read and check the space file (`load_space`, before any trial starts), name the
search from the space and the base config (the same command resumes it), open its MLflow parent run,
and fit a Tuner over `_trial`, a driver function that calls `train.run` with the trial's overrides
(Train V2: Tune wraps a function that fits the TorchTrainer). Each trial's training run is a nested
MLflow child of the parent; its evaluations reach Tune through Train's report callback, so ASHA can
stop it early. At the end the parent gets the ranked table and the best trial. The space file format
is documented in tune_spaces/README.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from cnd_ray import config as config_lib, storage
from cnd_ray.launch import identity
from cnd_ray.errors import UserError, did_you_mean

SPACE_DIR = config_lib.SPACE_DIR
SEARCHES = ("grid", "random", "optuna", "hyperopt")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
# What each training evaluation reports (worker.Evaluator) that a search can rank by, and which way
# is better. The sample metrics (the judge's, cnd_ray/evaluate/judge.py) need eval.sample_metrics.
METRICS = {"fd_ratio": "min", "fd_judge": "min", "kd_judge": "min", "fidelity_auroc": "max",
           "ms_ssim": "min", "fid": "min", "val_loss_diff": "min", "val_auroc": "max",
           # The downstream classifier on real + the trial's synthetic images, on the held-out test
           # split (fairness.in_loop; cnd_ray/fairness/downstream.py): its worst skin-tone group's
           # AUROC, that minus the real-only classifier's, and the darkest group's sensitivity.
           "fair_worst_auroc": "max", "fair_worst_auroc_vs_real": "max",
           "fair_dark_sensitivity": "max", "fair_dark_sensitivity_vs_real": "max"}
SAMPLE_METRICS = ("fd_ratio", "fd_judge", "kd_judge", "fidelity_auroc", "ms_ssim", "fid")
FAIR_METRICS = tuple(k for k in METRICS if k.startswith("fair_"))
# Shown beside the metrics in the rows and the table, never ranked by: the light-dark AUROC gap is
# better the closer it is to 0, on either side.
SHOWN = ("fair_gap", "fair_gap_vs_real")
CURVES = ("fd_ratio", "fidelity_auroc", "lesion_share", "lesion_share_benign", "lesion_share_malignant",
          "critic_pull", "val_loss_diff")  # per-trial histories kept in the rows
SETTING = "setting"  # the trial-config key holding the name of a `settings:` bundle
FILE_KEYS = ("search", "metric", "mode", "num_samples", "max_concurrent_trials", "scheduler",
             "resources", "fixed", "settings", "space")
SCHEDULER_KEYS = ("kind", "grace_period", "reduction_factor")


class SpaceError(UserError):
    """A space file that cannot run; the message names the file and the key."""


@dataclass(frozen=True)
class Space:
    """A parsed, checked space file."""

    path: str
    text: str  # the file as written: logged to the parent run
    search: str = "grid"
    metric: str = "fd_ratio"
    mode: str = "min"
    num_samples: int = 1  # grid: repeats of the whole grid; otherwise: number of trials
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's resources fit
    scheduler: str = "none"  # none | asha
    grace_period: int = 100  # ASHA: steps before a trial can be stopped
    reduction_factor: int = 2
    fixed: dict = dataclasses.field(default_factory=dict)  # dotted key -> value, every trial
    settings: dict = dataclasses.field(default_factory=dict)  # name -> {dotted key: value}
    space: dict = dataclasses.field(default_factory=dict)  # dotted key -> (distribution, args)

    @property
    def name(self) -> str:
        return Path(self.path).stem


def resolve_space_path(space: str) -> Path:
    """A space file path, or the name of a shipped one (tune_spaces/NAME.yaml)."""
    p = Path(space)
    if p.is_file():
        return p
    shipped = SPACE_DIR / f"{space}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(q.stem for q in SPACE_DIR.glob("*.yaml"))
    raise SpaceError(f"--space {space}: no such file and not a shipped space ({', '.join(names)})")


def _fail(path, msg: str) -> SpaceError:
    return SpaceError(f"{path}: {msg}")


def _check_keys(path, where: str, got, allowed) -> None:
    for k in got:
        if k not in allowed:
            raise _fail(path, f"unknown key '{where}{k}'{did_you_mean(k, allowed)}")


def _int(path, key: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise _fail(path, f"{key}: {value!r} must be an integer >= {lo}")
    return value


def _distribution(path, key: str, spec) -> tuple[str, list]:
    """`{choice: [..]}` etc. -> (name, args), with the arguments' shapes checked."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _fail(path, f"space.{key}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, "
                          f"got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise _fail(path, f"space.{key}: unknown distribution '{kind}'{did_you_mean(kind, DISTRIBUTIONS)}")
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise _fail(path, f"space.{key}: {kind} takes a non-empty list of values")
        return kind, args
    if (not isinstance(args, list) or len(args) != 2
            or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
            or not args[0] < args[1]):
        raise _fail(path, f"space.{key}: {kind} takes [low, high] numbers with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise _fail(path, f"space.{key}: loguniform needs low > 0, got {args[0]}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise _fail(path, f"space.{key}: randint takes integer [low, high), got {args!r}")
    return kind, args


def _probe_values(kind: str, args: list) -> list:
    """Values of a distribution that must all be valid config values: every listed value, or both
    ends of a range (randint's high is exclusive)."""
    if kind in ("grid", "choice"):
        return list(args)
    return [args[0], args[1] - 1] if kind == "randint" else list(args)


def load_space(space: str, base: config_lib.Config) -> Space:
    """Read and check a space file against `base`: every key a real config field, every value
    (or range end) valid for it, every grid point a valid config. One line naming the key, else."""
    path = resolve_space_path(space)
    text = path.read_text()
    try:
        raw = config_lib.load_yaml(text)  # as config files: `gamma_schedule: off` stays "off"
    except yaml.YAMLError as e:
        raise _fail(path, f"not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise _fail(path, "expected a mapping at the top level")
    _check_keys(path, "", raw, FILE_KEYS)
    out: dict[str, Any] = {"path": str(path), "text": text}
    search = raw.get("search", Space.search)
    if search not in SEARCHES:
        raise _fail(path, f"search: {search!r} is not one of {', '.join(SEARCHES)}")
    out["search"] = search
    metric = raw.get("metric", Space.metric)
    if metric not in METRICS:
        raise _fail(path, f"metric: {metric!r} is not one of {', '.join(METRICS)} (what trials report)")
    out["metric"] = metric
    out["mode"] = raw.get("mode", METRICS[metric])
    if out["mode"] not in ("min", "max"):
        raise _fail(path, f"mode: {out['mode']!r} is not min or max")
    out["num_samples"] = _int(path, "num_samples", raw.get("num_samples", Space.num_samples), 1)
    out["max_concurrent_trials"] = _int(path, "max_concurrent_trials",
                                        raw.get("max_concurrent_trials", Space.max_concurrent_trials), 0)
    sched = raw.get("scheduler") or {"kind": "none"}
    if isinstance(sched, str):
        sched = {"kind": sched}
    if not isinstance(sched, dict):
        raise _fail(path, f"scheduler: expected none, asha or a mapping, got {sched!r}")
    _check_keys(path, "scheduler.", sched, SCHEDULER_KEYS)
    out["scheduler"] = sched.get("kind", "none")
    if out["scheduler"] not in ("none", "asha"):
        raise _fail(path, f"scheduler.kind: {out['scheduler']!r} is not none or asha")
    out["grace_period"] = _int(path, "scheduler.grace_period", sched.get("grace_period", Space.grace_period), 1)
    out["reduction_factor"] = _int(path, "scheduler.reduction_factor",
                                   sched.get("reduction_factor", Space.reduction_factor), 2)

    def mapping(key: str) -> dict:
        v = raw.get(key) or {}
        if not isinstance(v, dict):
            raise _fail(path, f"{key}: expected a mapping of dotted config keys, got {v!r}")
        return v

    def valid(where: str, overrides: dict) -> None:
        try:
            config_lib.override(base, overrides)
        except config_lib.ConfigError as e:
            raise _fail(path, f"{where}: {e}") from None

    resources = mapping("resources")
    for k in resources:
        if not str(k).startswith("scale."):
            raise _fail(path, f"resources.{k}: only scale.* keys set a trial's resources")
    out["fixed"] = {**mapping("fixed"), **resources}
    valid("fixed", out["fixed"])
    settings = mapping("settings")
    for name, bundle in settings.items():
        if not isinstance(bundle, dict):
            raise _fail(path, f"settings.{name}: expected a mapping of dotted config keys")
        valid(f"settings.{name}", {**out["fixed"], **bundle})
    out["settings"] = {str(k): v for k, v in settings.items()}
    dists = {}
    for key, spec in mapping("space").items():
        dists[key] = kind_args = _distribution(path, key, spec)
        for v in _probe_values(*kind_args):
            valid(f"space.{key}", {**out["fixed"], key: v})
    out["space"] = dists
    s = Space(**out)
    _check_search(s, base)
    return s


def _check_search(s: Space, base: config_lib.Config) -> None:
    """Rules across keys: what each search kind accepts, and every grid point a valid config."""
    kinds = {k for k, _ in s.space.values()}
    if s.search == "grid" and kinds - {"grid"}:
        raise _fail(s.path, "search: grid takes only `grid:` lists in space (use search: random "
                            "for distributions)")
    if s.search in ("optuna", "hyperopt"):
        if s.settings or "grid" in kinds:
            raise _fail(s.path, f"search: {s.search} cannot take settings or grid lists (use random)")
        module = {"optuna": "optuna", "hyperopt": "hyperopt"}[s.search]
        try:
            __import__(module)
        except ImportError:
            raise _fail(s.path, f"search: {s.search} needs the {module} package "
                                f"(pip install {module})") from None
    if not s.settings and not s.space:
        raise _fail(s.path, "nothing to search: give settings or space")
    # Every combination of settings and grid/choice values must be a valid config (cross-field
    # rules: e.g. fp16 with classifier.step_every > 1); ranges were checked at both ends.
    listed = {k: a for k, (kind, a) in s.space.items() if kind in ("grid", "choice")}
    bundles = list(s.settings.items()) or [("", {})]
    for (name, bundle), values in itertools.product(bundles, itertools.product(*listed.values())):
        point = {**s.fixed, **bundle, **dict(zip(listed, values))}
        where = f"settings.{name} with " if name else ""
        try:
            cfg = config_lib.override(base, point)
        except config_lib.ConfigError as e:
            raise _fail(s.path, f"{where}{point}: {e}") from None
        if s.metric == "val_auroc" and not cfg.use_classifier:
            raise _fail(s.path, f"metric: val_auroc, but {where or 'a trial '}has no classifier "
                                "(method.gamma_schedule=off); use val_loss_diff")
        if s.metric in SAMPLE_METRICS and not cfg.eval.sample_metrics:
            raise _fail(s.path, f"metric: {s.metric} is a sample metric, but eval.sample_metrics is "
                                f"false for {where or 'a trial'}; set it true or rank by val_loss_diff")
        if s.metric in FAIR_METRICS and cfg.fairness.in_loop != "every":
            raise _fail(s.path, f"metric: {s.metric} is measured at every evaluation only with "
                                f"fairness.in_loop=every (got {cfg.fairness.in_loop} for "
                                f"{where or 'a trial'}); set it under fixed:")
        if s.metric == "fid" and not cfg.eval.inception_weights:
            raise _fail(s.path, "metric: fid needs eval.inception_weights (clean-fid's Inception "
                                "file; nothing is downloaded); or rank by fd_ratio")


def trial_count(s: Space) -> int:
    """How many trials the search runs: num_samples times every settings x grid combination
    (model-based searches: num_samples)."""
    if s.search in ("optuna", "hyperopt"):
        return s.num_samples
    grid = math.prod(len(a) for k, a in s.space.values() if k == "grid")
    return max(1, len(s.settings)) * grid * s.num_samples


# --- the search ----------------------------------------------------------------------------------

def _param_space(s: Space) -> dict:
    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    space = {k: make[kind](args) for k, (kind, args) in s.space.items()}
    if s.settings:
        space[SETTING] = tune.grid_search(list(s.settings))
    return space


def _search_alg(s: Space, seed: int, concurrent: int):
    """(search algorithm, max_concurrent_trials for TuneConfig): grid and random take the limit
    themselves (Tune ignores the TuneConfig one for them), model-based ones get it from Tune."""
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed), concurrent
    if s.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=seed), concurrent
    from ray.tune.search import BasicVariantGenerator

    # Seeded: a search draws the same trials every time.
    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrent), None


def scheduler(s: Space, steps: int):
    """The space's trial scheduler (ASHA, in training steps), or None."""
    if s.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Trials report at evaluations with their step: ASHA's rungs are in training steps.
    return ASHAScheduler(time_attr="step", max_t=steps, grace_period=min(s.grace_period, steps),
                         reduction_factor=s.reduction_factor)


def _trial_cpus(cfg) -> float:
    """CPUs one trial holds: its workers, its data decode tasks, the trial actor's token."""
    from cnd_ray.launch import stream

    return (cfg.scale.num_workers * cfg.scale.cpus_per_worker
            + stream.DATA_TASK_CPUS * max(2, cfg.data.decode_tasks) + 0.01)


def cpus_for(space: str, cfg, trials: int) -> float:
    """Logical CPUs a local Ray needs to run `trials` trials of `space` at once (the quickstart
    sizes its Ray with this)."""
    s = load_space(space, cfg)
    return min(trials, trial_count(s)) * _trial_cpus(config_lib.override(cfg, s.fixed))


def concurrency(s: Space, cfg, resources: dict, trials: int) -> int:
    """Trials at once: the space's number, else what the cluster fits; an error naming the
    setting when not even one trial fits (instead of a search that waits forever)."""
    per_cpu = _trial_cpus(cfg)
    fits = math.floor(resources.get("CPU", 0) / per_cpu + 1e-9)
    if cfg.scale.use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0) / cfg.scale.num_workers))
    if fits < 1:
        raise UserError(f"one trial needs {per_cpu:.2f} CPUs (scale.num_workers x "
                        f"scale.cpus_per_worker plus data decoding){' and GPUs' if cfg.scale.use_gpu else ''}"
                        f"; the cluster has {resources.get('CPU', 0)} CPUs, {resources.get('GPU', 0)} "
                        "GPUs: lower the trial's resources in the space file")
    return max(1, min(s.max_concurrent_trials or fits, trials))


class _Progress(tune.Callback):
    """One line per trial start and end, with how many are done."""

    def __init__(self, total: int, metric: str):
        self.total, self.metric = total, metric
        self.done = None  # counted from the trials on the first event: a resumed search has some

    def _count(self, trials) -> int:
        if self.done is None:
            self.done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        return self.done

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"[cnd-ray] trial {_trial_name(trial)} started ({self._count(trials)}/{self.total} done)",
              flush=True)

    def _end(self, trials, trial, what: str) -> None:
        self.done = self._count(trials) + 1
        r = trial.last_result or {}
        value = (f"{self.metric} {r[self.metric]:.4f} at step {r.get('step')}" if self.metric in r
                 else "nothing reported")
        print(f"[cnd-ray] trial {_trial_name(trial)} {what}: {value} ({self.done}/{self.total} done)",
              flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trials, trial, "finished" if (trial.last_result or {}).get("done", True) else "stopped")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trials, trial, "failed")


def share_cores(cfg, concurrent: int, ray):
    """CPU trials side by side on a node split its cores between them: each worker would
    otherwise take all of them, and 2 trials on 2 cores ran 3x slower than one at a time
    (bench/tune_concurrency.py). An explicit scale.threads_per_worker is kept."""
    if cfg.scale.use_gpu or cfg.scale.threads_per_worker:
        return cfg
    nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
    per_node = math.ceil(concurrent / nodes) * cfg.scale.num_workers
    return config_lib.override(cfg, {"scale.threads_per_worker": max(1, (os.cpu_count() or 1) // per_node)})


def _label(config: dict) -> str:
    """What a trial varies (identity.trial_label), from its Tune config."""
    setting = str(config.get(SETTING, ""))
    return identity.trial_label(setting, {k: _plain(v) for k, v in config.items() if k != SETTING})


def _trial_name(trial) -> str:
    return identity.trial_name(trial.trial_id, _label(trial.config))


def _plain(v):
    """numpy scalars from Tune's samplers -> Python values the config accepts."""
    return v.item() if hasattr(v, "item") else v


def _overrides(config: dict, settings: dict) -> tuple[str, dict]:
    """A trial's (setting name, dotted overrides): its settings bundle, then its sampled values."""
    setting = str(config.get(SETTING, ""))
    return setting, {**settings.get(setting, {}),
                     **{k: _plain(v) for k, v in config.items() if k != SETTING}}


def _trial(config: dict, launch, settings: dict, search: str, trials_storage: str,
           parent_run_id: str, spool_for: str | None) -> None:
    """One trial = the driver of `cnd-ray train` (train.drive) on the search's launch with the
    trial's overrides, a child of the parent run (`spool_for`: the server the search spools for, or
    None)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from cnd_ray import tracking
    from cnd_ray.launch import train

    trial_id = tune.get_context().get_trial_id()
    setting, overrides = _overrides(config, settings)
    tags = {tracking.PARENT_TAG: parent_run_id, "cnd_ray.search": search, "cnd_ray.trial_id": trial_id,
            "cnd_ray.overrides": json.dumps(overrides, sort_keys=True)}
    if setting:
        tags["cnd_ray.setting"] = setting
    trial = launch.trial(overrides, identity.trial_run(search, trial_id, _label(config)), trials_storage)
    train.drive(trial, callbacks=[TuneReportCallback()], tags=tags, spool_for=spool_for)


def _every_report_evaluates(cfg):
    """The base config every trial starts from: evaluations at every report, so that every report
    carries the search metric."""
    tr = cfg.train
    if not tr.eval_every:
        return config_lib.override(cfg, {"train.eval_every": tr.checkpoint_every})
    if tr.checkpoint_every % tr.eval_every:
        raise UserError(f"train.checkpoint_every ({tr.checkpoint_every}) must be a multiple of "
                        f"train.eval_every ({tr.eval_every}) in a search: every report to Tune "
                        "must carry the metric")
    return cfg


def run(space: str, cfg, resume: bool = False, name: str = "") -> dict:
    """Run (or resume) the search `space` over `cfg`; returns {"name", "rows", "best", "path",
    "trials", "parent_run_id", "table", "space", "tracking_uri", "judge"} (trials: the storage its
    trials' runs, judge and baselines are in; judge: its file, or None)."""
    import ray

    from cnd_ray import tracking
    from cnd_ray.launch import train

    s = load_space(space, cfg)
    cfg = _every_report_evaluates(config_lib.override(cfg, s.fixed))
    search = name or identity.search_name(s.name, s.text, cfg)
    exp_path = storage.join(identity.storage_path(cfg), search)
    trials_storage = identity.trials_storage(cfg, search)
    restoring = tune.Tuner.can_restore(exp_path)
    if resume and not restoring:
        raise UserError(f"--resume: no search to resume at {exp_path}")
    # The data checked, Ray connected, one judge (and fairness baselines) for every trial, made
    # before the first one and found again on a restore: train.prepare, as `cnd-ray train` does.
    launch = train.prepare(cfg, search, search=True)
    n = trial_count(s)
    concurrent = concurrency(s, launch.cfg, ray.cluster_resources(), n)
    launch = dataclasses.replace(launch, cfg=share_cores(launch.cfg, concurrent, ray))
    parent, server, _ = train.open_run(
        launch, {"space": s.name, "search": s.search, "metric": s.metric, "mode": s.mode,
                 "num_trials": n, "scheduler": s.scheduler},
        {"cnd_ray.kind": "search", "cnd_ray.space_file": s.path}, "base_config.yaml",
        what="search", children=trials_storage)
    parent.log_text(s.text, f"space/{Path(s.path).name}")
    uri, judge_file = parent.uri, launch.judge
    if server:
        tracking.push_spool(exp_path, uri)
    # The tracking URI resolved here: trials run in their own working directories (and, while the
    # search spools, each spools in its run's folder: they may run on any node).
    cfg = config_lib.override(launch.cfg, {"track.tracking_uri": server or uri})
    launch = dataclasses.replace(launch, cfg=cfg)
    uploader = server and tracking.SpoolUploader(exp_path, server)  # the parent and the trials so far
    print(f"search {search}: {n} trials of {s.name}, {concurrent} at a time, metric {s.metric} "
          f"({s.mode}); {'resuming ' if restoring else ''}{exp_path}; MLflow parent run {parent.id} at {uri}",
          flush=True)

    trainable = tune.with_resources(
        tune.with_parameters(_trial, launch=launch, settings=s.settings, search=search,
                             trials_storage=trials_storage, parent_run_id=parent.id, spool_for=server),
        {"cpu": 0.01})  # the trial actor only drives its Train run; 0 is rejected (DESIGN.md)
    t0 = time.time()
    try:
        if restoring:  # finished trials keep their results; unfinished ones resume their runs
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            alg, limit = _search_alg(s, cfg.train.seed, concurrent)
            tuner = tune.Tuner(
                trainable, param_space=_param_space(s),
                tune_config=tune.TuneConfig(
                    metric=s.metric, mode=s.mode, num_samples=s.num_samples,
                    max_concurrent_trials=limit, search_alg=alg,
                    scheduler=scheduler(s, cfg.train.steps), trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name),
                # Tune's own tables would drown the workers' progress lines: one line per event.
                run_config=tune.RunConfig(name=search, storage_path=identity.storage_path(cfg), verbose=0,
                                          callbacks=[_Progress(n, s.metric)]))
        grid = tuner.fit()
    except Exception as e:
        parent.finish("FAILED", {"error": repr(e)[:500]})
        if server:
            uploader.close()
            tracking.push_spool(exp_path, uri)
            train.upload_spool(exp_path, search, parent.id)
        raise
    rows = _rows(grid, s, cfg, search, trials_storage)
    table = format_table(rows, s)
    best = rows[0] if rows and rows[0]["status"] != "error" else None
    _log_parent(parent, s, rows, table, best, time.time() - t0, cfg)
    registered = None if server or not best else _register_best(parent, cfg, s, search, best)
    if server:  # the parent and every trial's run, or where they stay
        uploader.close()
        tracking.push_spool(exp_path, uri)
        uploaded = train.upload_spool(exp_path, search, parent.id)
        if uploaded != parent.id:
            parent = tracking.Run(server, uploaded)
    return {"name": search, "rows": rows, "best": best, "path": exp_path, "trials": trials_storage,
            "parent_run_id": parent.id, "table": table, "space": s, "tracking_uri": parent.uri,
            "judge": judge_file, "registered": registered}


def _register_best(parent, cfg, s: Space, search: str, best: dict) -> str | None:
    """The best trial's logged model, registered under the search's name (alias "best") with its
    metric and config; the reference `cnd-ray sample --ckpt` takes (models:/<search>@best)."""
    from cnd_ray import checkpoint, tracking

    uri = parent.uri
    run_id = tracking.find_run(uri, cfg.track.experiment, best["run"])
    model_id = run_id and tracking.mlflow_client(uri).get_run(run_id).data.tags.get(tracking.MODEL_TAG)
    if not model_id or not best["checkpoint"]:
        return None
    version = tracking.register_model(
        uri, search, model_id, run_id, description=checkpoint.read_config(best["checkpoint"]).to_yaml(),
        tags={"cnd_ray.metric": s.metric, s.metric: best.get(s.metric), "cnd_ray.trial": best["trial"],
              "cnd_ray.search_run": parent.id})
    ref = f"models:/{search}@best"
    parent.set_tags({"cnd_ray.registered": f"{ref} (version {version})"})
    print(f"best trial registered as {ref} (version {version}): `cnd-ray sample --ckpt {ref}`", flush=True)
    return ref


# --- results -------------------------------------------------------------------------------------

STATUS_ORDER = {"finished": 0, "stopped": 1, "error": 2}


def error_line(error: BaseException) -> str:
    """What a failed trial's error says, in one line: the last line of its text (the exception
    itself; Ray's first line only names the actor), without terminal colours, fit for a table."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__).replace("|", "/")[:300]


def _rows(grid, s: Space, cfg, search: str, trials_storage: str) -> list[dict]:
    """One row per trial, best first: finished trials by the metric, then ones ASHA stopped early,
    then failed ones."""
    rows = []
    for r in grid:
        m = r.metrics or {}
        trial_id = Path(r.path).name.split("-")[0]  # its folder: identity.trial_name
        setting, overrides = _overrides(r.config or {}, s.settings)
        label = _label(r.config or {})
        run = identity.trial_run(search, trial_id, label)
        step = int(m.get("step", 0))
        status = "error" if r.error else "finished" if step >= cfg.train.steps else "stopped"
        rows.append({
            "trial": trial_id, "label": label, "run": run, "setting": setting, "overrides": overrides,
            **{k: m[k] for k in (*METRICS, *SHOWN) if k in m},
            "step": step, "status": status, "error": error_line(r.error) if r.error else "",
            "seconds": round(float(m.get("time_total_s", 0.0)), 1),
            "checkpoint": identity.latest_checkpoint(storage.join(trials_storage, run)),
            "curves": {k: _curve(r, k) for k in dict.fromkeys((s.metric, *CURVES))},
        })

    def key(row):
        v = row.get(s.metric)
        bad = v is None or not math.isfinite(v)
        return STATUS_ORDER[row["status"]], bad, 0.0 if bad else (v if s.mode == "min" else -v)

    return sorted(rows, key=key)


def _curve(result, metric: str) -> list[tuple[int, float]]:
    """(step, metric) at each of a trial's reports."""
    df = result.metrics_dataframe
    if df is None or metric not in df or "step" not in df:
        return []
    df = df[["step", metric]].dropna()
    return [(int(a), float(b)) for a, b in zip(df["step"], df[metric])]


def varying(rows: list[dict]) -> list[str]:
    """The override keys whose values differ between trials: the table's columns."""
    keys = sorted({k for r in rows for k in r["overrides"]})
    return [k for k in keys if len({json.dumps(r["overrides"].get(k)) for r in rows}) > 1]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    return str(v)


def format_table(rows: list[dict], s: Space) -> str:
    """A Markdown table, best first, of what varies and what was measured (no wall times or trial
    ids: the same seed gives the same table)."""
    keys = varying(rows)
    metrics = [s.metric] + [k for k in (*METRICS, *SHOWN) if k != s.metric and any(k in r for r in rows)]
    head = ["rank"] + (["setting"] if any(r["setting"] for r in rows) else []) + keys + metrics + [
        "step", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        cells = [str(i)] + ([r["setting"]] if "setting" in head else [])
        cells += [_fmt(r["overrides"].get(k)) for k in keys] + [_fmt(r.get(k)) for k in metrics]
        status = r["status"] if r["status"] != "error" else f"error: {r['error'][:80]}"
        cells += [str(r["step"]), status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _log_curves(parent, s: Space, rows: list[dict]) -> None:
    """The ranking metric over training steps, one line per trial, as the parent's curves.png."""
    curves = [(r, r["curves"].get(s.metric) or []) for r in rows]
    if not any(c for _, c in curves):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r, c in curves:
        if c:
            ax.plot(*zip(*c), marker="o", label=r["label"] or r["trial"])
    ax.set_xlabel("step")
    ax.set_ylabel(f"{s.metric} ({'lower' if s.mode == 'min' else 'higher'} is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "curves.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        parent.log_file(path)


def _log_parent(parent, s: Space, rows: list[dict], table: str, best: dict | None,
                seconds: float, cfg) -> None:
    """The parent run holds the answer: the table, every row as JSON, the best trial as tags."""
    from cnd_ray import tracking

    parent.log_text(table, "summary.md")
    parent.log_text(json.dumps(rows, indent=1, default=str), "trials.json")
    _log_curves(parent, s, rows)
    tracking.save_search_view(parent, cfg.track.experiment, hashlib.sha256(parent.id.encode()).hexdigest()[:16],
                              s.metric, s.mode == "min", varying(rows),
                              tuple(k for k in ("fd_ratio", "fair_worst_auroc", "fair_gap")
                                    if k != s.metric and any(k in r for r in rows)))
    # What the children differ in and what ranks them: the columns to compare them by.
    tags: dict[str, Any] = {"cnd_ray.metric": s.metric, "cnd_ray.mode": s.mode,
                            "cnd_ray.varying": ",".join(varying(rows)),
                            "search_seconds": round(seconds, 1),
                            "trials_finished": sum(r["status"] == "finished" for r in rows),
                            "trials_stopped_early": sum(r["status"] == "stopped" for r in rows),
                            "trials_failed": sum(r["status"] == "error" for r in rows)}
    metrics = {}
    if best:
        tags.update({"best_trial": best["trial"], "best_checkpoint": best["checkpoint"] or ""})
        if best["setting"]:
            tags["best_setting"] = best["setting"]
        tags.update({f"best.{k}": v for k, v in best["overrides"].items()})
        if best.get(s.metric) is not None:
            metrics[f"best_{s.metric}"] = best[s.metric]
    parent.log_metrics(metrics)
    status = "FINISHED" if not tags["trials_failed"] else "FAILED"
    parent.finish(status, tags)
