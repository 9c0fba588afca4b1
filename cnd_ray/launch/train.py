"""`cnd-ray train`, the driver: the one place a TorchTrainer is built.

`prepare` builds a `Launch` once: the run's name from its config (identity.py: the same config
resumes), the data made or checked, Ray connected and its resources checked, the judge and the
fairness baselines found or trained. `drive` opens or finds the MLflow run (or a spool when the
server is away) and fits a TorchTrainer whose workers run `worker.main` on a `worker.Plan`; after the
fit it reads how the run ended (finished, stopped itself, interrupted) and closes the MLflow run.
`cnd-ray tune` prepares one launch for its search and drives each trial from it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time

import torch

from cnd_ray import checkpoint, storage, tracking
from cnd_ray import config as config_lib
from cnd_ray import vae as vae_lib
from cnd_ray.data import shardset
from cnd_ray.errors import UserError
from cnd_ray.launch import driverlog, identity, stream, worker

# Held-out share of synthetic data: the judge's FD compares samples with these images, per class
# (2000 images: ~120 malignant ones instead of ~60 at ingest's default 0.1).
SYNTHETIC_VAL = 0.2
SYNTHETIC_MALIGNANT = 0.3  # share of malignant images: enough of both classes in 2000 for the judge


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


def _check_resume(cfg, name: str, latest: str) -> None:
    """A relaunch may extend a run or change how it runs and logs (said); changing what it trains
    needs train.resume_with_changes=true (exit 2 naming the keys otherwise)."""
    changed, other = identity.resume_changes(checkpoint.read_config(latest), cfg)
    if changed and not cfg.train.resume_with_changes:
        raise UserError(f"run {name} exists (checkpoint {latest}) with other training settings: "
                        f"{'; '.join(changed)}. Rerun with train.resume_with_changes=true to continue "
                        "it under them, or give another train.name for a new run")
    for what, items in (("changed training settings", changed), ("settings", other)):
        if items:
            print(f"run {name}: resuming with {what}: {'; '.join(items)}", flush=True)


def _synthetic_shards(cfg, root: str) -> str:
    """Shards of a synthetic set for runs without data.shards (made once, then reused): `cnd-ray synth`'s
    default benchmark, its tone-balanced test set as the test split."""
    if cfg.data.space != "pixel":
        raise UserError("data.shards: empty, and synthetic data exists only in pixel space "
                        "(set data.space=pixel, or ingest real data with --latent)")
    from cnd_ray.data import synth
    from cnd_ray.launch import ingest

    # made on this machine and read by Ray's tasks here: beside a local run storage, else ./ray_results
    base = os.path.join(os.path.abspath("ray_results") if storage.is_uri(root) else root, "data")
    n, size, s = cfg.train.synthetic_images, cfg.data.image_size, config_lib.SynthConfig
    per_tone = cfg.train.synthetic_test_per_tone
    name = f"synthetic-{s.difficulty}-{n}" + ("" if per_tone == s.test_per_tone else f"-test{per_tone}")
    shards = os.path.join(base, f"{name}-{size}px-val{round(100 * SYNTHETIC_VAL)}")
    if not os.path.isfile(os.path.join(shards, "manifest.json")):
        images, test = os.path.join(base, name), synth.test_folder(os.path.join(base, name))
        if not all(os.path.isfile(os.path.join(d, synth.GROUND_TRUTH)) for d in (images, test)):
            print(f"data.shards not set: writing {n} synthetic images ({s.difficulty} difficulty) to "
                  f"{images} and {per_tone} per skin-tone group to {test}", flush=True)
            for d in (images, test):  # what an interrupted earlier try left
                shutil.rmtree(d, ignore_errors=True)
            synth.run(images, num_images=n, image_size=max(64, size), malignant_fraction=SYNTHETIC_MALIGNANT,
                      test_per_tone=per_tone, progress=False)
        ingest.run([images], shards, image_size=size, val_fraction=SYNTHETIC_VAL, progress=False,
                   test=[str(test)])
    print(f"data.shards not set: training on synthetic shards {shards}", flush=True)
    return shards


def shards_for(cfg) -> str:
    """cfg's data.shards, absolute (Ray workers run elsewhere), or synthetic ones made when empty."""
    if not cfg.data.shards:
        return _synthetic_shards(cfg, identity.storage_path(cfg))
    return storage.absolute(cfg.data.shards)


def with_shards(cfg):
    """`cfg` with data.shards as shards_for gives it."""
    return config_lib.override(cfg, {"data.shards": shards_for(cfg)})


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


def check_data(cfg, manifest: shardset.Manifest, search: bool = False) -> None:
    """Refuse shards this config cannot train or judge on (a search: rank its trials on), naming the
    setting (or the damaged file)."""
    if search and not manifest.counts("val").rows:
        raise UserError(f"data.shards: {cfg.data.shards} has no val split to evaluate trials on "
                        "(ingest with --val-fraction > 0)")
    shardset.check(manifest, cfg, cfg.data.shards)
    shardset.check_files(cfg.data.shards, manifest)
    if cfg.eval.sample_metrics:
        from cnd_ray.evaluate import judge

        judge.check_shards(cfg, manifest)
        if cfg.data.space == "latent":
            vae_lib.folder_for(cfg, manifest)  # the judge sees pixels: the samples need decoding
    if cfg.fairness.in_loop != "off":
        from cnd_ray.fairness import downstream

        downstream.check_shards(cfg, manifest)
        if cfg.data.space == "latent":
            vae_lib.folder_for(cfg, manifest)  # the downstream classifier sees pixels too


def prepare_judge(cfg, root: str) -> str | None:
    """The judge file for cfg's shards under the storage `root` (None without eval.sample_metrics): found,
    or trained first in a Ray task (a GPU one on GPU clusters), so that every run and trial on the
    same storage and shards is judged by the same classifier."""
    if not cfg.eval.sample_metrics:
        return None
    from cnd_ray.evaluate import judge

    return _cached(cfg, judge.path_for(cfg, judge.cache_dir(root)), judge.prepare, "judge: reusing")


def prepare_downstream(cfg, root: str, manifest: shardset.Manifest) -> str | None:
    """The fairness baselines file for cfg's shards under the storage `root` (None without
    fairness.in_loop): found, or computed first in a Ray task, so that every run and trial on the
    same storage and shards compares with the same real-only and reweighted classifiers."""
    if cfg.fairness.in_loop == "off":
        return None
    from cnd_ray.fairness import downstream

    return _cached(cfg, downstream.path_for(cfg, root, manifest), downstream.prepare,
                   "fairness: reusing the baselines")


def _cached(cfg, path: str, prepare, reusing: str) -> str:
    """`path` when it exists (saying `reusing` it), else made by `prepare(cfg, shards, path, device,
    say)` in a Ray task (a GPU one on GPU clusters) while the driver waits."""
    if storage.is_file(path):
        print(f"{reusing} {path}", flush=True)
        return path
    import ray

    task = ray.remote(num_cpus=1, num_gpus=1 if cfg.scale.use_gpu else 0)(_prepare_task)
    return ray.get(task.remote(prepare, cfg.to_dict(), path))


def _prepare_task(prepare, config: dict, path: str) -> str:
    """Ray task: `prepare` (judge.prepare, downstream.prepare) writes the file `path`."""
    cfg = config_lib.from_dict(config)
    torch.set_num_threads(os.cpu_count() or 1)  # Ray gives tasks 1 thread; the driver waits on this
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prepare(cfg, cfg.data.shards, path, device, say=worker.say)
    return path


def log_judge(run, judge_file: str | None) -> None:
    """The judge a run or search is scored by, in its MLflow run: file, held-out AUROC, floor."""
    if not judge_file:
        return
    from cnd_ray.evaluate import judge

    meta = judge.load(judge_file).meta
    run.set_tags({"cnd_ray.judge": judge_file, "cnd_ray.judge_backbone": meta["backbone"]})
    run.log_metrics({"judge_heldout_auroc": meta["heldout_auroc"],
                     **{f"judge_floor_fd_{n}": f["fd"] for n, f in meta["floors"].items()}})


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclasses.dataclass(frozen=True)
class Launch:
    """What a launch starts from, built once by `prepare`: `cnd-ray train` drives it (`drive`), and
    `cnd-ray tune` prepares one for its search and derives each trial's from it (`trial`) without
    reading the data, training the judge or connecting again."""
    cfg: config_lib.Config  # final: data.shards absolute (made when empty), train.name set for a run
    name: str  # the run's or the search's name
    folder: str  # its folder (or URI): a run's checkpoints, a search's Tune state
    manifest: shardset.Manifest  # the shard set's, read once
    judge: str | None  # the judge file every run and trial on these shards is scored by
    downstream: str | None  # the fairness baselines file, when runs measure fairness

    def trial(self, overrides: dict, name: str, storage_root: str) -> "Launch":
        """A trial's run: the search's launch with the trial's overrides, named `name` under
        `storage_root`; the same shards, judge and baselines."""
        cfg = config_lib.override(self.cfg, {**overrides, "train.name": name, "train.storage": storage_root})
        return dataclasses.replace(self, cfg=cfg, name=name, folder=storage.join(storage_root, name))


def prepare(cfg, name: str, search: bool = False) -> Launch:
    """Everything a launch named `name` needs, once: its folder, the data (checked, or made
    synthetic), Ray (connected, its resources checked), the judge and the fairness baselines. A run
    (named by identity.run_name: what it trains) keeps its name in its config, so that its
    checkpoints name it; a search (`search`) keeps its judge and baselines beside its trials' runs,
    and its shards must have a val split to rank the trials on."""
    import ray

    from cnd_ray.launch import session

    root = identity.storage_path(cfg)
    shared = identity.trials_storage(cfg, name) if search else root
    if cfg.train.log_rows and storage.is_uri(root):
        raise UserError(f"train.log_rows: writes to a local run folder, and train.storage is a URI ({root})")
    # Given shards are checked before Ray starts; synthetic ones once made. Checked once: each
    # shard's footer is read, a request per file on S3.
    manifest = shardset.read_manifest(cfg.data.shards) if cfg.data.shards else None
    if manifest:
        check_data(cfg, manifest, search)
    session.connect()
    _preflight(cfg, ray)
    cfg = config_lib.override(cfg, {"data.shards": shards_for(cfg), **({} if search else {"train.name": name})})
    if not manifest:
        manifest = shardset.read_manifest(cfg.data.shards)
        check_data(cfg, manifest, search)
    return Launch(cfg, name, storage.join(root, name), manifest, prepare_judge(cfg, shared),
                  prepare_downstream(cfg, shared, manifest))


def run(cfg, callbacks: tuple = ()) -> dict:
    """`cnd-ray train`: prepare the launch of the run its config names, then drive it (`callbacks`:
    Ray Train's, see drive)."""
    return drive(prepare(cfg, identity.run_name(cfg)), callbacks)


def drive(launch: Launch, callbacks: tuple = (), tags: dict | None = None, spool_for: str | None = None) -> dict:
    """Train a prepared launch on Ray; returns {"checkpoint", "metrics", "run_name", "mlflow_run_id",
    "model_id"}. The one driver function: `cnd-ray train` runs it, and Tune wraps it as each trial.

    `callbacks` go to Ray Train's RunConfig (Tune passes its report callback); `tags` are added to
    the MLflow run (Tune passes the parent run id and the trial's setting); `spool_for`: the
    tracking server a search spools for (its trials spool too, and the search uploads them)."""
    import ray

    from cnd_ray import __version__

    cfg, name, run_dir, manifest = launch.cfg, launch.name, launch.folder, launch.manifest
    judge_file, downstream_file = launch.judge, launch.downstream
    latest = identity.latest_checkpoint(run_dir)
    if latest:
        _check_resume(cfg, name, latest)
    meta = checkpoint.read_meta(latest) if latest else {}
    start_step, start = meta.get("step", 0), (meta.get("epoch", 0), meta.get("pos", 0))

    tags = {"cnd_ray.version": __version__, "git_commit": _git_commit(),
            "cluster_resources": json.dumps(ray.cluster_resources(), sort_keys=True),
            "data.shards": cfg.data.shards, **(tags or {})}
    run, server, last_logged = open_run(launch, cfg.flat(), tags, "config.yaml", spool_for=spool_for)
    uri = run.uri
    run.log_dataset(cfg.data.shards, manifest)
    # The run's logged model, which its metrics link to (MLflow 3's Models); a spooled run gets none:
    # the upload copies runs, not models.
    model_id = None if server else tracking.start_model(
        uri, cfg.track.experiment, run.id, name, {k: v for k, v in cfg.flat().items() if identity.trains(k)})
    if server:  # rank 0, on any node, logs to a copy of what the storage holds now
        tracking.push_spool(run_dir, uri)
    print(f"run {name}: {'resuming at step ' + str(start_step) if latest else 'fresh start'}; "
          f"storage {run_dir}; MLflow run {run.id} at {uri}", flush=True)

    # Ctrl-C: every rank looks for the request at every step, a file check that is free only locally
    request = None if storage.is_uri(run_dir) else os.path.join(run_dir, identity.INTERRUPT_FILE)
    plan = worker.Plan(
        config=cfg.to_dict(), run_dir=run_dir, judge=judge_file, downstream=downstream_file,
        interrupt=request or "", stream_start=start,
        tracking=tracking.Target(run, last_logged, model_id, spooled=bool(server),
                                 mirror=run_dir if server and storage.is_uri(run_dir) else None))
    trainer = _trainer(cfg, manifest, (start_step, *start), callbacks, plan)
    if request:
        # Ray Train's own Ctrl-C handler (installed inside fit) aborts the workers where they are,
        # losing the steps since the last checkpoint; ours, installed here, keeps them.
        trainer._register_sigint_handler = lambda controller: None
    uploader = server and not spool_for and tracking.SpoolUploader(run_dir, server)

    def finish(status: str, tags: dict, text: str | None = None, ckpt: str | None = None, step: int = 0) -> str:
        """End the MLflow run and its logged model (with a spool: upload it, or say how; a search's
        trial: leave it to the search); the run id it ends up under."""
        if uploader:
            uploader.close()
        now = tracking.pull_spool(run_dir) if server else uri  # with what rank 0 logged
        if model_id and status != "KILLED":  # interrupted: it goes on at the relaunch
            tracking.finish_model(now, model_id, ckpt, step, cfg.to_yaml())
        ended = tracking.Run(now, run.id)
        ended.finish(status, tags)
        if text:
            ended.log_text(text, "final_checkpoint.txt")
        if not server:
            return run.id
        tracking.push_spool(run_dir, now)
        return run.id if spool_for else upload_spool(run_dir, name, run.id)

    try:
        with _interruptible(request):
            result = trainer.fit()
    except Exception as e:
        finish("FAILED", {"error": repr(e)[:500]})
        raise
    stop = storage.join(run_dir, identity.STOP_FILE)
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
    run_id = finish("FINISHED", {"final_checkpoint": ckpt}, f"{ckpt}\n", ckpt,
                    (result.metrics or {}).get("step", cfg.train.steps))
    return {"checkpoint": ckpt, "metrics": result.metrics, "run_name": name, "mlflow_run_id": run_id,
            "model_id": model_id}


def _trainer(cfg, manifest: shardset.Manifest, start: tuple[int, int, int], callbacks, plan):
    """The one TorchTrainer: workers run worker.main on `plan` (a worker.Plan), on the train stream
    from `start` (step, epoch, row) and the val split; checkpoints go to the run's folder (train.name,
    pinned by prepare) in train.storage."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    step, epoch, pos = start
    c = manifest.counts("train")
    rows = c.rows
    if cfg.data.balance == "oversample":
        rows = c.benign + c.malignant * shardset.oversample_factor(manifest, "train")
    epochs = math.ceil(max(0, cfg.train.steps - step) / max(1, rows // cfg.train.global_batch)) + 2  # + a margin
    # Rank 0 prints one progress line per log_every steps; Ray Data's per-operator bars (redrawn
    # by every worker and trial) would bury it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = {"train": stream.dataset(cfg, "train", epochs=(epoch, epoch + epochs), skip_rows=pos)}
    if manifest.counts("val").rows:
        datasets["val"] = stream.dataset(cfg, "val", shuffle=False)
    s = cfg.scale
    return TorchTrainer(
        worker.main,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker,
                                                           **({"GPU": 1} if s.use_gpu else {})},
                                     placement_strategy=s.placement_strategy),
        datasets=datasets,
        dataset_config=stream.data_config(),
        run_config=RunConfig(name=cfg.train.name, storage_path=identity.storage_path(cfg),
                             callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)))


def open_run(launch: Launch, params: dict, tags: dict, config_file: str, what: str = "run",
             children: str | None = None, spool_for: str | None = None):
    """(the MLflow run of `launch`, the server it spools for or None, its last logged step): found
    again by name on a resume, else started with `params` and `tags`; its config logged as
    `config_file` and the judge it is scored by. The driver's log is kept with it (a spooled run's:
    at its upload). A run's and a search's parent run open here alike (`what`, `children`: see
    tracking_store); what the caller logs next reaches a spool at a URI with its push_spool."""
    cfg = launch.cfg
    uri, server = tracking_store(cfg, launch.folder, launch.name, what, children, spool_for)
    run, last = tracking.start_run(uri, cfg.track.experiment, launch.name, params, tags,
                                   tracking.spool_artifacts(launch.folder) if server else None)
    if server is None:  # however the run ends (a no-op in Tune's trials); a spool saves it at the end
        driverlog.save_at_exit(launch.folder, run)
    run.log_text(cfg.to_yaml(), config_file)
    log_judge(run, launch.judge)
    return run, server, last


def tracking_store(cfg, folder: str, name: str, what: str = "run", children: str | None = None,
                   spool_for: str | None = None) -> tuple[str, str | None]:
    """(the store a run, or a search with `what`="search", logs to; the server it waits for or None).

    A tracking server that does not answer at start does not stop training: the run (a search's
    parent run; `children`: the folder of its trials' runs) logs to an MLflow store in its folder,
    local or at a URI (tracking.SPOOL), uploaded when the server answers. A spool left by an earlier
    launch is uploaded first once its server answers. `spool_for`: spool for that server without
    asking it (a trial of a search that spools: the search uploads its trials)."""
    uri = tracking.resolve_uri(cfg.track.tracking_uri)
    left = tracking.spool_server(folder)
    if not spool_for and tracking.reachable(uri):
        if left == uri:
            upload_spool(folder, name)
        return uri, None
    server = spool_for or uri
    spool = tracking.pull_spool(folder) if left == server else tracking.spool_uri(folder, server, children)
    if not spool_for:
        print(f"MLflow at {uri} does not answer: the {what} starts anyway, logging to a spool in "
              f"{folder}; it is uploaded when the server answers (or run `cnd-ray track-sync {folder}`)",
              flush=True)
    return spool, server


def upload_spool(run_dir: str, name: str, spool_run: str | None = None) -> str | None:
    """Upload the spool in `run_dir` and remove it, or say where it stays and how to upload it;
    the driver's log goes wherever the run is. Returns the id of run `name` on the server (or,
    kept, in the spool)."""
    server = tracking.spool_server(run_dir)
    why = "does not answer"
    try:
        done = tracking.upload(run_dir)
        if done:
            run_id = done[1].get(name)
            print(f"MLflow: the spool is uploaded to {server} ({len(done[1])} run(s))", flush=True)
            if run_id:
                driverlog.save_at_exit(run_dir, tracking.Run(server, run_id))
            return run_id
    except Exception as e:  # the run's outcome matters more: keep the spool
        why = f"failed the upload ({str(e).splitlines()[0][:200]})"
    spool = tracking.pull_spool(run_dir)  # the store itself in a folder; a copy from a URI
    where = storage.join(run_dir, tracking.SPOOL) if storage.is_uri(run_dir) else spool
    print(f"MLflow at {server} {why}: the run stays logged in {where}; upload it with "
          f"`cnd-ray track-sync {run_dir}`", flush=True)
    if spool_run:
        driverlog.save_at_exit(run_dir, tracking.Run(spool, spool_run))
    return spool_run
