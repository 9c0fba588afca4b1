"""`cnd-ray train`: Class-N-Diff on Ray Train workers; the one place a TorchTrainer is built.

Driver (`run`): resolve paths, name the run from its config (the same config resumes), make or find
the data, open or find the MLflow run, check resources, and fit a TorchTrainer whose workers run
`_worker`. Worker: rebuild the typed config, build the train state (from the latest checkpoint when
Ray hands one over: resume and restart share this path), and loop over the Ray Data shard calling
`engine.train_step` with an accelerate-backed `Runtime`. Every rank reports at the same steps; rank
0 attaches the checkpoint and logs to MLflow.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import torch

from cnd_ray import checkpoint, driverlog, engine, monitor, storage, tracking
from cnd_ray import vae as vae_lib
from cnd_ray import config as config_lib
from cnd_ray.data import augment, shardset, stream
from cnd_ray.errors import UserError

STOP_FILE = "STOPPED.txt"  # written by rank 0 when a non-finite loss stops the run
INTERRUPT_FILE = "INTERRUPT_REQUESTED"  # written by the driver on Ctrl-C; every rank stops at one step
ROWS_DIR = "rows"  # train.log_rows: rank<r>.csv, one line per row trained
# Held-out share of synthetic data: the judge's FD compares samples with these images, per class
# (2000 images: ~120 malignant ones instead of ~60 at ingest's default 0.1).
SYNTHETIC_VAL = 0.2
BUCKET_BYTES = 25 * 2 ** 20  # gradients are averaged in flat buckets of about this size
# Settings that do not change what is trained: a run keeps its name (and resumes) across them.
NAME_EXCLUDES = {"train.name", "train.storage", "train.steps", "train.checkpoint_every",
                 "train.resume_with_changes", "train.keep_checkpoints", "train.max_failures",
                 "train.log_every", "train.eval_every", "train.eval_batches", "train.log_rows",
                 "data.shuffle_buffer",
                 "data.decode_tasks", "data.vae", "diffusion.eta"}
NAME_EXCLUDED_SECTIONS = ("scale.", "track.", "eval.", "fairness.")  # how it runs, where it logs, how it is judged


class TrainingStopped(RuntimeError):
    """The run stopped itself (a non-finite loss); the message says where and what is kept."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C: the run saved a checkpoint at the step it had reached; the message says how to resume."""


@contextlib.contextmanager
def _interruptible(request: str | None):
    """While training: the first Ctrl-C asks the workers (through the file `request`) to save a
    checkpoint at the step they reach and stop; a second one aborts at once. Ray's own handling of
    Ctrl-C tore the workers down, so the rerun resumed from an older checkpoint than those written.
    Only in the main thread of a local run (signal handlers live there; URI storage: as before)."""
    import signal
    import threading

    if request is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    if os.path.exists(request):
        os.remove(request)  # from a run that died before it could clear it
    previous = signal.getsignal(signal.SIGINT)

    def first(signum, frame):
        with open(request, "w") as f:
            f.write(time.strftime("%Y-%m-%dT%H:%M:%S"))
        print("\ninterrupted: saving a checkpoint at the current step, then stopping "
              "(Ctrl-C again to abort without it)", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def trains(key: str) -> bool:
    """Does the flat config key change what is trained (not just how long, how it runs or logs)?"""
    return key not in NAME_EXCLUDES and not key.startswith(NAME_EXCLUDED_SECTIONS)


def run_name(cfg) -> str:
    """`train.name`, else a hash of what is trained: rerunning the same config resumes it."""
    if cfg.train.name:
        return cfg.train.name
    keep = {k: v for k, v in cfg.flat().items() if trains(k)}
    return "cnd-" + hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:10]


def resume_changes(old, new) -> tuple[list[str], list[str]]:
    """(changes to what is trained, other changes) between a run's checkpointed config and the one
    relaunching it, each as "key old -> new"."""
    a, b = old.flat(), new.flat()
    said = {k: f"{k} {a.get(k)!r} -> {b[k]!r}" for k in sorted(b)
            if a.get(k) != b[k] and k != "train.resume_with_changes"}
    return [v for k, v in said.items() if trains(k)], [v for k, v in said.items() if not trains(k)]


def _check_resume(cfg, name: str, latest: str) -> None:
    """A relaunch may extend a run or change how it runs and logs (said); changing what it trains
    needs train.resume_with_changes=true (exit 2 naming the keys otherwise)."""
    changed, other = resume_changes(checkpoint.read_config(latest), cfg)
    if changed and not cfg.train.resume_with_changes:
        raise UserError(f"run {name} exists (checkpoint {latest}) with other training settings: "
                        f"{'; '.join(changed)}. Rerun with train.resume_with_changes=true to continue "
                        "it under them, or give another train.name for a new run")
    for what, items in (("changed training settings", changed), ("settings", other)):
        if items:
            print(f"run {name}: resuming with {what}: {'; '.join(items)}", flush=True)


def storage_path(cfg) -> str:
    return storage.absolute(cfg.train.storage or "ray_results")


def _synthetic_shards(cfg, root: str) -> str:
    """Shards of a synthetic set for runs without data.shards (made once, then reused)."""
    if cfg.data.space != "pixel":
        raise UserError("data.shards: empty, and synthetic data exists only in pixel space "
                        "(set data.space=pixel, or ingest real data with --latent)")
    from cnd_ray.data import ingest, synth

    # made on this machine and read by Ray's tasks here: beside a local run storage, else ./ray_results
    base = os.path.join(os.path.abspath("ray_results") if storage.is_uri(root) else root, "data")
    n, size = cfg.train.synthetic_images, cfg.data.image_size
    shards = os.path.join(base, f"synthetic-{n}-{size}px-val{round(100 * SYNTHETIC_VAL)}")
    if not os.path.isfile(os.path.join(shards, "manifest.json")):
        images = os.path.join(base, f"synthetic-{n}")
        if not os.path.isfile(os.path.join(images, "ISIC_2020_Training_GroundTruth.csv")):
            print(f"data.shards not set: writing {n} synthetic images to {images}", flush=True)
            synth.run(images, num_images=n, image_size=max(64, size), malignant_fraction=0.3,
                      progress=False)
        ingest.run([images], shards, image_size=size, val_fraction=SYNTHETIC_VAL, progress=False)
    print(f"data.shards not set: training on synthetic shards {shards}", flush=True)
    return shards


def with_shards(cfg):
    """`cfg` with data.shards absolute (Ray workers run elsewhere), or made synthetic when empty."""
    if not cfg.data.shards:
        return config_lib.override(cfg, {"data.shards": _synthetic_shards(cfg, storage_path(cfg))})
    return config_lib.override(cfg, {"data.shards": storage.absolute(cfg.data.shards)})


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint Ray Train resumes the run in `run_dir` (a folder or URI) from: its latest
    *recorded* one. A newer folder written just before a crash, but never registered, is not it
    (the data stream must start where the restored state left off)."""
    from ray.train import Result

    try:
        result = Result.from_path(run_dir)
    except RuntimeError:  # no such run yet, or it never recorded a checkpoint
        return None
    return result.checkpoint.path if result.checkpoint else None


def _preflight(cfg, ray) -> None:
    """Fail in seconds, naming the setting, instead of waiting forever for resources."""
    res = ray.cluster_resources()
    s = cfg.scale
    need_cpu = s.num_workers * s.cpus_per_worker + stream.DATA_TASK_CPUS
    if res.get("CPU", 0) < need_cpu:
        raise UserError(f"scale.num_workers x scale.cpus_per_worker = {s.num_workers} x "
                        f"{s.cpus_per_worker} plus data decoding needs {need_cpu} CPUs; the cluster "
                        f"has {res.get('CPU', 0)}: lower scale.num_workers or scale.cpus_per_worker")
    if s.use_gpu and res.get("GPU", 0) < s.num_workers:
        raise UserError(f"scale.use_gpu with scale.num_workers={s.num_workers} needs as many GPUs; "
                        f"the cluster has {res.get('GPU', 0)}")


def check_data(cfg, manifest: dict) -> None:
    """Refuse shards this config cannot train or judge on, naming the setting (or the damaged file)."""
    shardset.check(manifest, cfg, cfg.data.shards)
    shardset.check_files(cfg.data.shards, manifest)
    if cfg.eval.sample_metrics:
        from cnd_ray.evaluate import judge

        judge.check_shards(cfg, manifest)
        if cfg.data.space == "latent":
            vae_lib.folder_for(cfg, manifest)  # the judge sees pixels: the samples need decoding


def prepare_judge(cfg, root: str) -> str | None:
    """The judge file for cfg's shards under the storage `root` (None without eval.sample_metrics): found,
    or trained first in a Ray task (a GPU one on GPU clusters), so that every run and trial on the
    same storage and shards is judged by the same classifier."""
    if not cfg.eval.sample_metrics:
        return None
    import ray

    from cnd_ray.evaluate import judge

    path = judge.path_for(cfg, judge.cache_dir(root))
    if judge.exists(path):
        print(f"judge: reusing {path}", flush=True)
        return path
    gpu = cfg.scale.use_gpu
    task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_train_judge)
    return ray.get(task.remote(cfg.to_dict(), path))


def log_judge(uri: str, run_id: str, judge_file: str | None) -> None:
    """The judge a run or search is scored by, in its MLflow run: file, held-out AUROC, floor."""
    if not judge_file:
        return
    from cnd_ray.evaluate import judge

    meta = judge.load(judge_file).meta
    tracking.set_tags(uri, run_id, {"cnd_ray.judge": judge_file,
                                       "cnd_ray.judge_backbone": meta["backbone"]})
    tracking.log_metrics(uri, run_id, {"judge_heldout_auroc": meta["heldout_auroc"],
                                       **{f"judge_floor_fd_{n}": f["fd"] for n, f in meta["floors"].items()}})


def _train_judge(config: dict, path: str) -> str:
    """Ray task: train the judge and write it to `path`."""
    from cnd_ray.evaluate import judge

    cfg = config_lib.from_dict(config)
    torch.set_num_threads(os.cpu_count() or 1)  # Ray gives tasks 1 thread; the driver waits on this
    device = "cuda" if torch.cuda.is_available() else "cpu"
    judge.prepare(cfg, cfg.data.shards, path, device, say=_say)
    return path


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run(cfg, callbacks: tuple = (), tags: dict | None = None, spool_for: str | None = None) -> dict:
    """Train `cfg` on Ray; returns {"checkpoint", "metrics", "run_name", "mlflow_run_id"}.

    `callbacks` go to Ray Train's RunConfig (Tune passes its report callback); `tags` are added to
    the MLflow run (Tune passes the parent run id and the trial's setting); `spool_for`: the
    tracking server a search spools for (its trials spool too, and the search uploads them)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cnd_ray import __version__, session

    root = storage_path(cfg)
    name = run_name(cfg)
    if cfg.train.log_rows and storage.is_uri(root):
        raise UserError(f"train.log_rows: writes to a local run folder, and train.storage is a URI ({root})")
    given = bool(cfg.data.shards)
    if given:  # what the data decides, before Ray starts (synthetic shards: once made)
        check_data(cfg, shardset.read_manifest(cfg.data.shards))
    session.connect()
    _preflight(cfg, ray)
    cfg = with_shards(cfg)
    manifest = shardset.read_manifest(cfg.data.shards)
    if not given:  # checked once: each shard's footer is read, a request per file on S3
        check_data(cfg, manifest)
    judge_file = prepare_judge(cfg, root)

    run_dir = storage.join(root, name)
    latest = latest_checkpoint(run_dir)
    if latest:
        _check_resume(cfg, name, latest)
    meta = checkpoint.read_meta(latest) if latest else {}
    start_step, start_epoch, start_pos = meta.get("step", 0), meta.get("epoch", 0), meta.get("pos", 0)
    rows = sum(manifest["splits"]["train"].values())
    if cfg.data.balance == "oversample":
        c = manifest["splits"]["train"]
        rows = c["benign"] + c["malignant"] * shardset.oversample_factor(manifest, "train")
    steps_per_epoch = max(1, rows // cfg.train.global_batch)
    epochs = math.ceil(max(0, cfg.train.steps - start_step) / steps_per_epoch) + 2  # + a margin

    uri, server = tracking_store(cfg, run_dir, name, spool_for=spool_for)
    tags = {"cnd_ray.version": __version__, "git_commit": _git_commit(),
            "cluster_resources": json.dumps(ray.cluster_resources(), sort_keys=True),
            "data.shards": cfg.data.shards, **(tags or {})}
    run_id, last_logged = tracking.start_run(uri, cfg.track.experiment, name, cfg.flat(), tags,
                                             tracking.spool_artifacts(run_dir) if server else None)
    if server is None:  # however the run ends (a no-op in Tune's trials); a spool saves it at the end
        driverlog.save_at_exit(run_dir, uri, run_id)
    tracking.log_text(uri, run_id, cfg.to_yaml(), "config.yaml")
    log_judge(uri, run_id, judge_file)
    if server:  # rank 0, on any node, logs to a copy of what the storage holds now
        tracking.push_spool(run_dir, uri)
    print(f"run {name}: {'resuming at step ' + str(start_step) if latest else 'fresh start'}; "
          f"storage {run_dir}; MLflow run {run_id} at {uri}", flush=True)

    # Rank 0 prints one progress line per log_every steps; Ray Data's per-operator bars (redrawn
    # by every worker and trial) would bury it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = {"train": stream.dataset(cfg, "train", epochs=(start_epoch, start_epoch + epochs),
                                        skip_rows=start_pos)}
    if manifest["splits"].get("val"):
        datasets["val"] = stream.dataset(cfg, "val", shuffle=False)
    # Ctrl-C: every rank looks for the request at every step, a file check that is free only locally
    request = None if storage.is_uri(run_dir) else os.path.join(run_dir, INTERRUPT_FILE)
    s = cfg.scale
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": run_dir, "judge": judge_file,
                           "interrupt": request or "",
                           "stream_start": [start_epoch, start_pos],
                           "tracking": {"uri": uri, "run_id": run_id, "after_step": last_logged,
                                        "mirror": run_dir if server and storage.is_uri(run_dir) else None}},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker,
                                                           **({"GPU": 1} if s.use_gpu else {})},
                                     placement_strategy=s.placement_strategy),
        datasets=datasets,
        dataset_config=stream.data_config(),
        run_config=RunConfig(name=name, storage_path=root, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)))
    if request:
        # Ray Train's own Ctrl-C handler (installed inside fit) aborts the workers where they are,
        # losing the steps since the last checkpoint; ours, installed here, keeps them.
        trainer._register_sigint_handler = lambda controller: None
    uploader = server and not spool_for and tracking.SpoolUploader(run_dir, server)

    def finish(status: str, tags: dict, text: str | None = None) -> str:
        """End the MLflow run (with a spool: upload it, or say how; a search's trial: leave it to
        the search); the run id it ends up under."""
        if uploader:
            uploader.close()
        now = tracking.pull_spool(run_dir) if server else uri  # with what rank 0 logged
        tracking.finish_run(now, run_id, status, tags)
        if text:
            tracking.log_text(now, run_id, text, "final_checkpoint.txt")
        if not server:
            return run_id
        tracking.push_spool(run_dir, now)
        return run_id if spool_for else upload_spool(run_dir, name, run_id)

    try:
        with _interruptible(request):
            result = trainer.fit()
    except Exception as e:
        finish("FAILED", {"error": repr(e)[:500]})
        raise
    stop = storage.join(run_dir, STOP_FILE)
    ckpt = result.checkpoint.path if result.checkpoint else None
    if storage.is_file(stop):
        msg = storage.read_text(stop).strip()
        storage.remove_file(stop)  # a relaunch (say with train.on_nonfinite=skip) starts clean
        finish("FAILED", {"stopped": msg})
        kept = f"the last good checkpoint is kept: {ckpt}" if ckpt else "no checkpoint was written yet"
        raise TrainingStopped(f"{msg}; {kept}")
    if request and os.path.isfile(request):
        os.remove(request)
        step = (result.metrics or {}).get("step", start_step)
        finish("KILLED", {"interrupted_at_step": step, "checkpoint": ckpt})
        raise TrainingInterrupted(f"interrupted at step {step}; checkpoint {ckpt}; run the same command "
                                  "again to resume from it")
    run_id = finish("FINISHED", {"final_checkpoint": ckpt}, f"{ckpt}\n")
    return {"checkpoint": ckpt, "metrics": result.metrics, "run_name": name, "mlflow_run_id": run_id}


def tracking_store(cfg, folder: str, name: str, what: str = "run", children: str | None = None,
                   spool_for: str | None = None) -> tuple[str, str | None]:
    """(the store a run, or a search with `what`="search", logs to; the server it waits for or None).

    A tracking server that does not answer at start does not stop training: the run (a search's
    parent run; `children`: the folder of its trials' runs) logs to an MLflow store in its folder,
    local or at a URI (tracking.SPOOL), uploaded when the server answers. A spool left by an earlier
    launch is uploaded first once its server answers. `spool_for`: spool for that server without
    asking it (a trial of a search that spools: the search uploads its trials)."""
    uri = tracking.resolve_uri(cfg.track.tracking_uri)
    left = tracking.spooled(folder)
    if not spool_for and tracking.reachable(uri):
        if left and left[1] == uri:
            upload_spool(folder, name)
        return uri, None
    server = spool_for or uri
    spool = left[0] if left and left[1] == server else tracking.spool_uri(folder, server, children)
    if not spool_for:
        print(f"MLflow at {uri} does not answer: the {what} starts anyway, logging to a spool in "
              f"{folder}; it is uploaded when the server answers (or run `cnd-ray track-sync {folder}`)",
              flush=True)
    return spool, server


def upload_spool(run_dir: str, name: str, spool_run: str | None = None) -> str | None:
    """Upload the spool in `run_dir` and remove it, or say where it stays and how to upload it;
    the driver's log goes wherever the run is. Returns the id of run `name` on the server (or,
    kept, in the spool)."""
    spool, server = tracking.spooled(run_dir)
    where = storage.join(run_dir, tracking.SPOOL) if storage.is_uri(run_dir) else spool
    why = "does not answer"
    try:
        done = tracking.upload(run_dir)
        if done:
            run_id = done[1].get(name)
            print(f"MLflow: the spool is uploaded to {server} ({len(done[1])} run(s))", flush=True)
            if run_id:
                driverlog.save_at_exit(run_dir, server, run_id)
            return run_id
    except Exception as e:  # the run's outcome matters more: keep the spool
        why = f"failed the upload ({str(e).splitlines()[0][:200]})"
    print(f"MLflow at {server} {why}: the run stays logged in {where}; upload it with "
          f"`cnd-ray track-sync {run_dir}`", flush=True)
    if spool_run:
        driverlog.save_at_exit(run_dir, spool, spool_run)
    return spool_run


# --- the worker ----------------------------------------------------------------------------------

def _runtime(acc, world: int) -> engine.Runtime:
    """accelerate's autocast and loss scaler, and gradient averaging over Ray's process group."""
    import torch.distributed as dist

    if world == 1:
        return engine.Runtime(autocast=acc.autocast, scaler=acc.scaler)

    def average(tensors: list[torch.Tensor]) -> None:
        bucket, size = [], 0
        for t in tensors + [None]:  # None flushes the last bucket
            if t is not None:
                bucket.append(t)
                size += t.numel() * t.element_size()
            if bucket and (t is None or size >= BUCKET_BYTES):
                flat = torch.cat([b.reshape(-1).float() for b in bucket])
                dist.all_reduce(flat)
                flat /= world
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0

    def all_finite(ok: bool) -> bool:
        flag = torch.tensor([0.0 if ok else 1.0], device=acc.device)
        dist.all_reduce(flag)
        return flag.item() == 0

    return engine.Runtime(autocast=acc.autocast, average=average, all_finite=all_finite,
                          scaler=acc.scaler)


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """Distinct noise per rank (identical draws would shrink the effective batch)."""
    return int(np.random.default_rng((seed, rank, step)).integers(2 ** 62))


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _say(msg: str) -> None:
    """A worker's progress line, once: Ray Train's patched print() would emit it twice."""
    sys.__stdout__.write(f"[cnd-ray] {msg}\n")
    sys.__stdout__.flush()


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _worker(config: dict) -> None:
    import ray
    import ray.train
    from accelerate import Accelerator

    cfg = config_lib.from_dict(config["config"])
    # Ray Data's per-execution and Ray Train's per-report INFO lines would bury rank 0's progress.
    for name in ("ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray sets OMP threads from the worker's (fractional, scheduling-only) CPU share, i.e. 1; the
    # node's cores shared among its workers is what the step should use (bench/ray_overhead.py).
    torch.set_num_threads(cfg.scale.threads_per_worker
                          or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    # cpu=True on CPU: otherwise accelerate silently runs non-distributed (DESIGN.md).
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not cfg.scale.use_gpu)
    device = acc.device
    ckpt = ray.train.get_checkpoint()
    consumed = stream.Consumed(cfg.data.shuffle_buffer)
    if ckpt:  # resume and worker-group restart: the same path as a fresh start, plus the state
        with ckpt.as_directory() as d:
            # the driver checked cfg
            state, extra = checkpoint.load_with_extra(d, device, restore_rng=False, cfg=cfg)
        done = extra.get("trained")
        consumed = stream.Consumed(cfg.data.shuffle_buffer, (extra.get("epoch", 0), extra.get("pos", 0)),
                                   None if done is None else done.numpy())
        rngs = extra.get("rng", [])
        if len(rngs) == world:
            checkpoint.set_rng_state(rngs[rank])
        else:  # the world size changed: reseed per rank
            torch.manual_seed(_rank_seed(cfg.train.seed, rank, state.step))
    else:
        state = engine.build_state(cfg, device)  # seeded by train.seed: identical on every rank
        torch.manual_seed(_rank_seed(cfg.train.seed, rank, 0))
    rt = _runtime(acc, world)
    tracker = tracking.open_tracker(config["tracking"], rank)
    # Which Ray nodes hold the ranks (rank order), so a multi-node run says where it ran and a
    # restart after losing a node shows where it went.
    nodes = _gather(ray.get_runtime_context().get_node_id(), world)
    if rank == 0:
        _say(f"rank 0/{world}: {device}, autocast {acc.mixed_precision}, "
             f"distributed {acc.distributed_type}, start step {state.step}, "
             f"{len(set(nodes))} node(s)")
        tracker.tag("autocast_dtype", acc.mixed_precision)
        tracker.tag("worker_nodes", ",".join(nodes))
    try:
        evaluator = _Evaluator(cfg, state, tracker, rank, world, config["judge"])
        _loop(cfg, state, rt, tracker, rank, world, consumed, tuple(config["stream_start"]),
              config["run_dir"], evaluator, config.get("interrupt", ""))
    finally:
        tracker.close()


def _agreed_batches(batches: Iterator[dict], rt, rank: int, world: int, run_dir: str) -> Iterator[dict]:
    """The batches, one agreed step at a time: before each step every rank says whether it has a
    batch, so a damaged shard (or a stream that ended) on any rank stops them all at the same step,
    where one rank stopping alone left the others waiting in the next all-reduce. A damaged shard
    ends the run as a non-finite loss does: rank 0 writes the line naming it to STOP_FILE and the
    workers return, so Ray Train does not retry what would fail again."""
    it = iter(batches)
    while True:
        batch = line = None
        try:
            batch = next(it, None)  # None: this rank's stream ended
        except Exception as e:
            line = stream.damaged(e)
            if line is None:
                raise
        if rt.all_finite(batch is not None):  # a logical AND across ranks (no-op with one)
            yield batch
            continue
        lines = [x for x in _gather(line, world) if x]
        if lines and rank == 0:
            _stop(run_dir, lines[0])
        return


def _stop(run_dir: str, line: str) -> None:
    """Rank 0: the run stops itself with `line` (the driver reads STOP_FILE and fails the run)."""
    storage.write_text(storage.join(run_dir, STOP_FILE), line)
    _say(f"stopped: {line}")


def _row_log(run_dir: str, rank: int):
    """This rank's train.log_rows file, opened to append (a restart adds to it)."""
    os.makedirs(os.path.join(run_dir, ROWS_DIR), exist_ok=True)
    path = os.path.join(run_dir, ROWS_DIR, f"rank{rank}.csv")
    new = not os.path.exists(path)
    f = open(path, "a", buffering=1 << 16)
    if new:
        f.write("step,epoch,pos,copy,row_id\n")
    return f


def _loop(cfg, state, rt, tracker, rank, world, consumed, stream_start, run_dir, evaluator,
          interrupt: str = "") -> None:
    """Train until train.steps. `consumed` (stream.Consumed) names the rows the state has trained
    on; the stream starts at `stream_start`, which is earlier after a worker-group restart inside
    one launch: then rows before `consumed.start` are read and dropped. When the file `interrupt`
    appears (the driver's Ctrl-C), every rank saves a checkpoint at the same step and stops."""
    import ray.train

    tr = cfg.train
    shard = ray.train.get_dataset_shard("train")
    wait = stream.DataWait()
    window: dict[str, float] = {}
    n_win, t_win, w_win = 0, time.perf_counter(), 0.0
    t_start, step0 = time.perf_counter(), state.step
    history: list[tuple[int, float]] = []

    def report(evaluated: dict, save: bool) -> None:
        """Every rank, at the same steps: metrics (rank 0's evaluation included: Ray Tune reads
        rank 0's) and, when `save`, the checkpoint rank 0 writes."""
        metrics = {"step": state.step, **evaluated}
        if not save:
            ray.train.report(metrics)
            return
        rngs = _gather(checkpoint.rng_state(), world)
        # The stream restarts at the earliest shuffle window a rank is in, less what was trained.
        start = min(_gather(consumed.window_start(), world))
        trained = np.concatenate(_gather(consumed.since(start, restored=rank == 0), world))
        # Ranks must hold the same weights; a cheap checksum per rank says whether they do.
        sums = _gather(sum(float(p.detach().double().sum()) for p in state.objective.parameters()), world)
        metrics.update(epoch=start[0], ranks_in_sync=float(len(set(sums)) == 1))
        # Metrics up to this checkpoint reach MLflow before it is stored: a restart resumes after
        # it, so whatever rank 0 still held would never be logged if its node died now.
        tracker.flush()
        with tempfile.TemporaryDirectory() as d:
            ck, t0 = None, time.perf_counter()
            if rank == 0:
                path = checkpoint.save(state, os.path.join(d, "ckpt"),
                                       extra={"epoch": start[0], "pos": start[1], "rng": rngs, "world": world,
                                              "trained": torch.from_numpy(trained)})
                if state.step >= tr.steps:
                    evaluator.keep_judged(path, state.step)
                ck = ray.train.Checkpoint.from_directory(str(path))
            t1 = time.perf_counter()
            ray.train.report(metrics, checkpoint=ck, checkpoint_dir_name=f"checkpoint_{state.step:08d}")
        # What a checkpoint costs: writing it locally, then Ray copying it to train.storage (S3 on a
        # cluster) while every rank waits (bench/cluster_scaling.py).
        tracker.log(state.step, {"checkpoint_write_s": t1 - t0, "checkpoint_upload_s": time.perf_counter() - t1})

    if state.step >= tr.steps:
        return
    if tuple(stream_start) > consumed.start:  # would skip rows never trained: say so, loudly
        raise RuntimeError(f"the data stream starts at (epoch, row) {tuple(stream_start)} but the "
                           f"restored checkpoint (step {state.step}) is at {consumed.start}")
    rows = _row_log(run_dir, rank) if tr.log_rows else None
    for batch in _agreed_batches(stream.batches(shard, cfg, wait, consumed), rt, rank, world, run_dir):
        mb = _to(augment.model_batch(batch, cfg), next(state.dit.parameters()).device)
        try:
            m = engine.train_step(state, engine.split_batch(mb, cfg.optim.grad_accum), rt)
        except engine.NonFiniteLoss as e:  # every rank raises together (all_finite agreed)
            if rank == 0:
                _stop(run_dir, str(e))
            return
        consumed.add(batch)
        if rows is not None:
            rows.writelines(f"{state.step},{e},{p},{c},{i}\n" for e, p, c, i in zip(
                *(batch[k].tolist() for k in ("epoch", "pos", "copy", "row_id"))))
            rows.flush()
        for k, v in m.items():
            window[k] = window.get(k, 0.0) + v
        n_win += 1
        step = state.step
        if step % tr.log_every == 0 or step == tr.steps:
            dt = time.perf_counter() - t_win
            logged = {k: v / n_win for k, v in window.items()}
            logged.update({"images_per_s": n_win * tr.global_batch / dt,
                           "data_wait_share": (wait.seconds - w_win) / dt,
                           "lr_dit": state.opt_dit.param_groups[0]["lr"]})
            if state.opt_cls is not None:
                logged["lr_cls"] = state.opt_cls.param_groups[0]["lr"]
                logged["denoised_share"] = logged.pop("denoised", 0.0)
            tracker.log(step, logged)
            history.append((step, logged.get("loss_diff", float("nan"))))
            if rank == 0:
                eta = (time.perf_counter() - t_start) / max(1, step - step0) * (tr.steps - step)
                _say(f"step {step}/{tr.steps} loss_diff {logged.get('loss_diff', 0):.4f} "
                     f"loss_cls {logged.get('loss_cls', 0):.4f} gamma {logged.get('gamma', 0):.2f} "
                     f"{logged['images_per_s']:.1f} img/s data-wait {100 * logged['data_wait_share']:.1f}% "
                     f"ETA {eta:.0f}s")
            window, n_win, t_win, w_win = {}, 0, time.perf_counter(), wait.seconds
        evaluate = (tr.eval_every and step % tr.eval_every == 0) or step == tr.steps
        save = step % tr.checkpoint_every == 0 or step == tr.steps
        # One rank seeing the request is enough; all stop at this step (all_finite is a logical AND).
        stopping = bool(interrupt) and not rt.all_finite(not os.path.exists(interrupt))
        if evaluate or save or stopping:
            report(evaluator(state, step, time.perf_counter() - t_start) if evaluate else {},
                   save or stopping)
        if stopping:
            if rank == 0:
                _say(f"interrupted: checkpoint saved at step {step}")
            return
        if step >= tr.steps:
            break
    if rows is not None:
        rows.close()
    if rank == 0 and history:
        _plot_losses(history, tracker)
    if state.step < tr.steps and not storage.is_file(storage.join(run_dir, STOP_FILE)):
        raise RuntimeError(f"the data stream ended at step {state.step} of {tr.steps}")


GRID_PER_CLASS = 8  # images per class in the sample grid of an evaluation
JUDGED = "judged.npz"  # in the final checkpoint: the plan (index, seed) and the images judged there
# Shown on the console line of an evaluation (all of them go to Tune and MLflow).
CONSOLE_METRICS = ("val_loss_diff", "val_auroc", "fidelity_auroc", "fd_judge", "fd_judge_floor",
                   "fd_ratio", "kd_judge", "ms_ssim", "lesion_share", "fid", "eval_seconds")


class _Evaluator:
    """One evaluation, on every rank at the same steps: rank 0's held-out losses, the sample metrics
    (each rank draws its share of the fixed sample plan; rank 0's judge scores the whole), a sample
    grid, and the same numbers returned on every rank, so every rank reports them (house rule 8)."""

    def __init__(self, cfg, state, tracker, rank: int, world: int, judge_file: str | None):
        import ray.train

        self.cfg, self.tracker, self.rank, self.world = cfg, tracker, rank, world
        self.device = next(state.ema.parameters()).device
        self.val = ray.train.get_dataset_shard("val") if rank == 0 else None
        self.plan = monitor.sample_plan(cfg) if judge_file else None
        self.judge = self.inception = None
        if judge_file and rank == 0:
            from cnd_ray.evaluate import judge as judge_lib

            self.judge = judge_lib.load(judge_file, self.device)
            self.inception = judge_lib.inception_reference(cfg, self.device)
        self.seconds = 0.0  # spent evaluating in this launch: the share is logged
        self.judged = None  # rank 0: (step, plan-ordered uint8 images) of the last evaluation

    def __call__(self, state, step: int, elapsed: float) -> dict[str, float]:
        t0 = time.perf_counter()
        cfg, metrics = self.cfg, {}
        was = state.objective.training
        if self.val is not None:
            batches = []
            for batch in self.val.iter_torch_batches(batch_size=cfg.per_worker_batch, device="cpu"):
                gen = torch.Generator().manual_seed(0)
                batches.append(_to(augment.model_batch(batch, cfg, gen), self.device))
                if len(batches) >= cfg.train.eval_batches:
                    break
            metrics.update(monitor.evaluate(state, batches) if batches else {})
        decoder = _decoder(cfg, str(self.device))
        grid = None
        if self.plan is not None:  # decoder is there: check_data made sure before the run
            index, images = monitor.sample_images(state, self.plan, decoder, self.rank, self.world)
            parts = _gather((index, images), self.world)
            if self.rank == 0:
                order = np.argsort(np.concatenate([p[0] for p in parts]))
                images = torch.cat([p[1] for p in parts])[order]
                labels = self.plan["label"]
                metrics.update(self.judge.measure(images, labels, cfg.eval.kid_subsets,
                                                  inception=self.inception))
                self.judged = (step, images)
                grid = monitor.tile(images, labels, min(GRID_PER_CLASS, cfg.eval.search_samples))
        elif self.rank == 0 and (cfg.data.space == "pixel" or decoder is not None):
            grid = monitor.sample_grid(state, per_class=GRID_PER_CLASS, vae=decoder)
        state.objective.train(was)
        if grid is not None:  # MLflow's image view (a step slider), and a file whose name sorts
            self.tracker.image(step, "samples", grid)
            from PIL import Image

            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, f"samples_step{step:08d}.png")
                Image.fromarray(grid).save(path)
                self.tracker.artifact(path, "samples")
        self.seconds += time.perf_counter() - t0
        if self.rank == 0:
            metrics.update(eval_seconds=time.perf_counter() - t0,
                           eval_share=self.seconds / max(elapsed + time.perf_counter() - t0, 1e-9))
            self.tracker.log(step, metrics)
            _say(f"eval step {step}: " + " ".join(f"{k} {metrics[k]:.4g}" for k in CONSOLE_METRICS
                                                   if k in metrics))
        return _gather(metrics, self.world)[0]  # rank 0's numbers, reported by every rank

    def keep_judged(self, ckpt_dir, step: int) -> None:
        """Store the images the evaluation at `step` judged in that step's checkpoint (`JUDGED`):
        `cnd-ray quickstart` writes them out instead of drawing the same plan again (~13 s a trial
        here)."""
        if self.judged is not None and self.judged[0] == step:
            np.savez_compressed(os.path.join(ckpt_dir, JUDGED), index=self.plan["index"],
                                seed=self.plan["seed"], images=self.judged[1].numpy())


@functools.cache
def _decoder(cfg, device: str):
    """The VAE that turns latent sample grids into images, loaded once per worker; None in pixel
    space, and None (said once) when it is not on this machine: training goes on without grids."""
    try:
        return vae_lib.for_run(cfg, device)
    except UserError as e:
        _say(f"no sample grids: {e}")
        return None


def _plot_losses(history: list[tuple[int, float]], tracker) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in history], [v for _, v in history])
    ax.set_xlabel("step")
    ax.set_ylabel("loss_diff")
    ax.set_title("diffusion loss")
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "loss_curve.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        tracker.artifact(path)
