"""Run identity: what a run, a search and a trial are called, where they are stored, and which
checkpoint a folder means. Train, tune, sample, evaluate, fairness, quickstart and bench all ask here.

Names are deterministic (house rule 7): a run is named by a hash of the keys that change what it
trains (config.TRAINS), a search by its space file and the keys that change what its trials are
ranked on (TRAINS and JUDGES), a trial by what it varies and Tune's trial id. Rerunning a command therefore finds,
and resumes, what it started; a key added later is left out at its default (config.ADDED), so
upgrading finds it too.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from cnd_ray import config as config_lib
from cnd_ray import storage
from cnd_ray.errors import UserError

DEFAULT_STORAGE = "ray_results"  # train.storage "" means this folder under the working directory
# In a run's folder, beside Ray Train's checkpoints:
STOP_FILE = "STOPPED.txt"  # written by rank 0 when the run stops itself (non-finite loss, damaged shard)
INTERRUPT_FILE = "INTERRUPT_REQUESTED"  # written by the driver on Ctrl-C; every rank stops at one step
ROWS_DIR = "rows"  # train.log_rows: rank<r>.csv, one line per row trained
TRIALS_SUFFIX = "-trials"  # a search's trials are runs under <storage>/<search>-trials/


def trains(key: str) -> bool:
    """Does the flat config key change what is trained (not how long, how it is judged or runs)?"""
    return key in config_lib.keys(config_lib.TRAINS)


def _digest(obj, n: int) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def run_name(cfg) -> str:
    """`train.name`, else a hash of what is trained: rerunning the same config resumes it."""
    if cfg.train.name:
        return cfg.train.name
    keep = config_lib.keys(config_lib.TRAINS) - config_lib.added_at_default(cfg)
    return "cnd-" + _digest({k: v for k, v in cfg.flat().items() if k in keep}, 10)


def search_name(space_name: str, space_text: str, cfg) -> str:
    """`<space>-<hash of the space file and the base config's trained and judged keys>`: the same
    command finds (and resumes) the same search; where it runs, stores and logs does not count."""
    keep = (config_lib.keys(config_lib.TRAINS) | config_lib.keys(config_lib.JUDGES)) - config_lib.added_at_default(cfg)
    return f"{space_name}-{_digest([space_text, {k: v for k, v in cfg.flat().items() if k in keep}], 8)}"


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def trial_label(setting: str | None, values: dict) -> str:
    """What a trial varies, as a name a runs table reads: its settings bundle ("setting4"), then each
    value the space draws or grids over, by its last key part ("lambda_cls=0.3"). Characters a path
    would not take become _; at most 60 characters. A pure function of the trial's config, so a
    restored search names its trials as before (resume finds runs by name)."""
    parts = [f"setting{setting}"] if setting else []
    parts += [f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in sorted(values.items())]
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "-".join(parts))[:60]


def trial_name(trial_id: str, label: str = "") -> str:
    """A trial's name in Tune's table and its folder: its id, then its label (trial_label)."""
    return f"{trial_id}-{label}" if label else trial_id


def trial_run(search: str, trial_id: str, label: str = "") -> str:
    """The training run a trial is (`train.name`, its MLflow run name): its label first, so the runs
    table reads as what each trial varies, then the search and the trial id, which keep it unique. The
    same on a restored search, so Ray Train resumes its checkpoint and MLflow its child run."""
    return f"{label}-{search}-{trial_id}" if label else f"{search}-{trial_id}"


def resume_changes(old, new) -> tuple[list[str], list[str]]:
    """(changes to what is trained, other changes) between a run's checkpointed config and the one
    relaunching it, each as "key old -> new"."""
    a, b = old.flat(), new.flat()
    said = {k: f"{k} {a.get(k)!r} -> {b[k]!r}" for k in sorted(b)
            if a.get(k) != b[k] and k != "train.resume_with_changes"}
    return [v for k, v in said.items() if trains(k)], [v for k, v in said.items() if not trains(k)]


def storage_path(cfg) -> str:
    """Where runs and searches live: train.storage (a folder or URI), absolute."""
    return storage.absolute(cfg.train.storage or DEFAULT_STORAGE)


def run_dir(cfg) -> str:
    """The run's folder (or URI): its checkpoints, stop signal and spool."""
    return storage.join(storage_path(cfg), run_name(cfg))


def trials_storage(cfg, search: str) -> str:
    """The storage the trials of `search` are runs in."""
    return storage.join(storage_path(cfg), search + TRIALS_SUFFIX)


def latest_checkpoint(folder: str) -> str | None:
    """The checkpoint Ray Train resumes the run in `folder` (a folder or URI) from: its latest
    *recorded* one. A newer folder written just before a crash, but never registered, is not it
    (the data stream must start where the restored state left off)."""
    from ray.train import Result

    try:
        result = Result.from_path(folder)
    except RuntimeError:  # no such run yet, or it never recorded a checkpoint
        return None
    return result.checkpoint.path if result.checkpoint else None


def resolve_checkpoint(ckpt: str, overrides=()) -> str:
    """A checkpoint folder, a Ray Train run folder (its latest recorded checkpoint), or a model in
    MLflow (`models:/<search>@best`, `models:/<name>/<version>`, `models:/<logged model id>`) in
    the store of `overrides`' track.tracking_uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db."""
    if ckpt.startswith("models:/"):
        from cnd_ray import tracking

        uri = config_lib.to_nested(overrides).get("track", {}).get("tracking_uri", "")
        ckpt = tracking.resolve_model(tracking.resolve_uri(uri), ckpt)
    path = os.path.abspath(os.path.expanduser(ckpt))
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found:
            return found
    raise UserError(f"--ckpt {ckpt}: not a cnd_ray checkpoint folder (no meta.json) nor a training "
                    "run with a recorded checkpoint")
