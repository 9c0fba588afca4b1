"""The Ray Train worker of `cnd-ray train`: one per rank, started by train.py's TorchTrainer.

`main` rebuilds the typed config and the train state (from the checkpoint Ray hands over, if any:
resume and worker-group restart share the fresh start's path), then `loop` streams the rank's Ray
Data shard through `engine.train_step` on a `distributed.runtime`. Every rank reports at the same
steps (house rule 8); rank 0 writes the checkpoint, and its tracker and console are the only ones
that do anything.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import torch

from cnd_ray import checkpoint, distributed, engine, monitor, objective, storage, tracking
from cnd_ray import config as config_lib
from cnd_ray import vae as vae_lib
from cnd_ray.data import augment
from cnd_ray.errors import UserError
from cnd_ray.launch import identity, stream

GRID_PER_CLASS = 8  # images per class in the sample grid of an evaluation
CPU_GRID_PER_CLASS = 2  # on a CPU, where a DiT-L draws one image in about a minute
JUDGED = "judged.npz"  # in the final checkpoint: the plan (index, seed) and the images judged there
FAIRNESS = "fairness.json"  # in the final checkpoint: its in-loop fairness evaluation in full
# Shown on the console line of an evaluation (all of them go to Tune and MLflow).
CONSOLE_METRICS = ("val_loss_diff", "val_auroc", "fidelity_auroc", "fd_judge", "fd_judge_floor",
                   "fd_ratio", "kd_judge", "ms_ssim", "lesion_share", "lesion_share_benign",
                   "lesion_share_malignant", "fid", "fair_worst_auroc", "fair_worst_auroc_vs_real",
                   "fair_gap", "fair_gap_vs_real", "fair_dark_sensitivity", "eval_seconds")


def say(msg: str) -> None:
    """A worker's progress line, once: Ray Train's patched print() would emit it twice."""
    sys.__stdout__.write(f"[cnd-ray] {msg}\n")
    sys.__stdout__.flush()


class Console:
    """Rank 0's voice: its progress lines and the run's stop signal. On other ranks every call does
    nothing, as their tracker does, so the loop has no `if rank == 0` for output."""

    def __init__(self, rank: int, run_dir: str):
        self.on, self.run_dir = rank == 0, run_dir

    def say(self, msg: str) -> None:
        if self.on:
            say(msg)

    def stop(self, line: str) -> None:
        """The run stops itself with `line`: the driver reads STOP_FILE and fails the run."""
        if self.on:
            storage.write_text(storage.join(self.run_dir, identity.STOP_FILE), line)
            say(f"stopped: {line}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the driver (train.drive) hands every worker: the run's config (as a dict: what
    checkpoints store), its folder, the judge and fairness baselines files, the Ctrl-C request file
    ("" off), the data position the stream starts at (epoch, row) and where rank 0 logs."""
    config: dict
    run_dir: str
    judge: str | None
    downstream: str | None
    interrupt: str
    stream_start: tuple[int, int]
    tracking: tracking.Target | None


def main(config: dict) -> None:
    """TorchTrainer's train_loop_per_worker: `config` is train_loop_config, {"plan": Plan}."""
    import ray
    import ray.train
    from accelerate import Accelerator

    plan: Plan = config["plan"]
    cfg = config_lib.from_dict(plan.config)
    # Ray Data's per-execution and Ray Train's per-report INFO lines would bury rank 0's progress.
    for name in ("ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray sets OMP threads from the worker's (fractional, scheduling-only) CPU share, i.e. 1; the
    # node's cores shared among its workers is what the step should use (bench/ray_overhead.py).
    torch.set_num_threads(cfg.scale.threads_per_worker
                          or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    # accelerate gives the autocast context and the loss scaler, nothing else: gradients are averaged
    # by distributed.runtime, never through accelerate's prepare(). cpu=True keeps a CPU run on the
    # CPU of a node that also has a GPU.
    cuda = cfg.scale.use_gpu and torch.cuda.is_available()
    if cuda and cfg.train.tf32:  # fp32 matmuls and convolutions on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    acc = Accelerator(mixed_precision=cfg.precision(cuda, cuda and torch.cuda.is_bf16_supported()),
                      cpu=not cfg.scale.use_gpu)
    state, consumed = _restore(cfg, ray.train.get_checkpoint(), acc.device, rank, world)
    if cfg.train.compile:  # in place: the state dict keeps its keys, checkpoints stay loadable
        state.dit.compile()
    rt = distributed.runtime(acc.autocast, acc.scaler, acc.device, world,
                             overlap=state.dit if cfg.scale.grad_overlap else None)
    tracker = tracking.open_tracker(plan.tracking, rank)
    # One per node: its first worker samples the node's CPU, memory and GPUs into the run.
    system = ctx.get_local_rank() == 0 and tracking.system_monitor(
        plan.tracking, ctx.get_node_rank(), cfg.track.system_metrics_every)
    console = Console(rank, plan.run_dir)
    # Which Ray nodes hold the ranks (rank order), so a multi-node run says where it ran and a
    # restart after losing a node shows where it went.
    nodes = distributed.gather(ray.get_runtime_context().get_node_id(), world)
    console.say(f"rank 0/{world}: {acc.device}, autocast {acc.mixed_precision}, "
                f"distributed {acc.distributed_type}, start step {state.step}, {len(set(nodes))} node(s)")
    tracker.tag("autocast_dtype", acc.mixed_precision)
    tracker.tag("worker_nodes", ",".join(nodes))
    try:
        evaluator = Evaluator(cfg, state, tracker, console, rank, world, plan.judge, plan.downstream)
        loop(cfg, state, rt, tracker, console, rank, world, consumed, tuple(plan.stream_start),
             evaluator, plan.interrupt)
    finally:
        tracker.close()
        if system:
            system.finish()


def _restore(cfg, ckpt, device, rank: int, world: int):
    """(train state, stream.Consumed): from `ckpt` (a ray.train.Checkpoint; the driver checked its
    config) with this rank's RNG, or fresh, seeded by train.seed identically on every rank."""
    if not ckpt:
        state = engine.build_state(cfg, device)  # seeded by train.seed: identical on every rank
        torch.manual_seed(distributed.rank_seed(cfg.train.seed, rank, 0))
        return state, stream.Consumed(cfg.data.shuffle_buffer)
    with ckpt.as_directory() as d:
        state, extra = checkpoint.load_with_extra(d, device, restore_rng=False, cfg=cfg)
    done = extra.get("trained")
    consumed = stream.Consumed(cfg.data.shuffle_buffer, (extra.get("epoch", 0), extra.get("pos", 0)),
                               None if done is None else done.numpy())
    rngs = extra.get("rng", [])
    if len(rngs) == world:
        checkpoint.set_rng_state(rngs[rank])
    else:  # the world size changed: reseed per rank
        torch.manual_seed(distributed.rank_seed(cfg.train.seed, rank, state.step))
    return state, consumed


def agreed_batches(batches: Iterator[dict], rt, console: Console, world: int) -> Iterator[dict]:
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
        lines = [x for x in distributed.gather(line, world) if x]
        if lines:
            console.stop(lines[0])
        return


def _row_log(run_dir: str, rank: int):
    """This rank's train.log_rows file, opened to append (a restart adds to it)."""
    os.makedirs(os.path.join(run_dir, identity.ROWS_DIR), exist_ok=True)
    path = os.path.join(run_dir, identity.ROWS_DIR, f"rank{rank}.csv")
    new = not os.path.exists(path)
    f = open(path, "a", buffering=1 << 16)
    if new:
        f.write("step,epoch,pos,copy,row_id\n")
    return f


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def loop(cfg, state, rt, tracker, console: Console, rank: int, world: int, consumed, stream_start,
         evaluator, interrupt: str = "") -> None:
    """Train until train.steps. `consumed` (stream.Consumed) names the rows the state has trained
    on; the stream starts at `stream_start`, which is earlier after a worker-group restart inside
    one launch: then rows before `consumed.start` are read and dropped. When the file `interrupt`
    appears (the driver's Ctrl-C), every rank saves a checkpoint at the same step and stops."""
    import ray.train

    tr = cfg.train
    if state.step >= tr.steps:
        return
    if tuple(stream_start) > consumed.start:  # would skip rows never trained: say so, loudly
        raise RuntimeError(f"the data stream starts at (epoch, row) {tuple(stream_start)} but the "
                           f"restored checkpoint (step {state.step}) is at {consumed.start}")
    wait = stream.DataWait()
    progress = _Progress(cfg, state, tracker, console, wait)
    report = _Reporter(state, consumed, tracker, evaluator, rank, world, tr.steps)
    rows = _row_log(console.run_dir, rank) if tr.log_rows else None
    shard = ray.train.get_dataset_shard("train")
    device = next(state.dit.parameters()).device
    for batch in agreed_batches(stream.batches(shard, cfg, wait, consumed), rt, console, world):
        try:
            m = engine.train_step(state, engine.split_batch(_to(augment.model_batch(batch, cfg), device),
                                                            cfg.optim.grad_accum), rt)
        except engine.NonFiniteLoss as e:  # every rank raises together (all_finite agreed)
            console.stop(str(e))
            return
        consumed.add(batch)
        step = state.step
        if rows is not None:
            rows.writelines(f"{step},{e},{p},{c},{i}\n" for e, p, c, i in zip(
                *(batch[k].tolist() for k in ("epoch", "pos", "copy", "row_id"))))
            rows.flush()
        progress.add(step, m)
        evaluate = (tr.eval_every and step % tr.eval_every == 0) or step == tr.steps
        save = step % tr.checkpoint_every == 0 or step == tr.steps
        # One rank seeing the request is enough; all stop at this step (all_finite is a logical AND).
        stopping = bool(interrupt) and not rt.all_finite(not os.path.exists(interrupt))
        if evaluate or save or stopping:
            report({**progress.since_report(world), **(evaluator(state, step, progress.elapsed()) if evaluate else {})},
                   save or stopping)
        if stopping:
            console.say(f"interrupted: checkpoint saved at step {step}")
            return
        if step >= tr.steps:
            break
    if rows is not None:
        rows.close()
    progress.plot()
    if state.step < tr.steps and not storage.is_file(storage.join(console.run_dir, identity.STOP_FILE)):
        raise RuntimeError(f"the data stream ended at step {state.step} of {tr.steps}")


class _Progress:
    """A step's metrics averaged over train.log_every steps: logged (with throughput, data wait and
    learning rates), rank 0's progress line, and the loss curve plotted at the end. The critic's pull
    (objective.pull) is also kept since the last report, for Ray Train's (and so Tune's) metrics."""

    def __init__(self, cfg, state, tracker, console: Console, wait):
        self.tr, self.state, self.tracker, self.console, self.wait = cfg.train, state, tracker, console, wait
        self.start, self.step0 = time.perf_counter(), state.step
        self.history: list[tuple[int, float]] = []
        self.pulls: dict[str, float] = {}  # the denoised branches' accumulators since the last report
        self._reset()

    def _reset(self) -> None:
        self.window, self.n, self.t, self.w = {}, 0, time.perf_counter(), self.wait.seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def since_report(self, world: int) -> dict[str, float]:
        """The critic's pull since the last call over every rank's samples (empty without denoised
        steps), the same on every rank; starts anew. Every rank calls it at the same steps."""
        total: dict[str, float] = {}
        for part in distributed.gather(self.pulls, world):
            for k, v in part.items():
                total[k] = total.get(k, 0.0) + v
        self.pulls = {}
        return {k: v for k, v in objective.pull(total).items() if k.startswith("critic_")}

    def add(self, step: int, m: dict) -> None:
        for k, v in m.items():
            self.window[k] = self.window.get(k, 0.0) + v
            if k.startswith("pull_"):
                self.pulls[k] = self.pulls.get(k, 0.0) + v
        self.n += 1
        if step % self.tr.log_every and step != self.tr.steps:
            return
        dt = time.perf_counter() - self.t
        opt = self.state
        logged = objective.pull({k: v / self.n for k, v in self.window.items()})
        logged.update({"images_per_s": self.n * self.tr.global_batch / dt,
                       "data_wait_share": (self.wait.seconds - self.w) / dt,
                       "lr_dit": opt.opt_dit.param_groups[0]["lr"]})
        if opt.opt_cls is not None:
            logged["lr_cls"] = opt.opt_cls.param_groups[0]["lr"]
            logged["denoised_share"] = logged.pop("denoised", 0.0)
        self.tracker.log(step, logged)
        self.history.append((step, logged.get("loss_diff", float("nan"))))
        eta = self.elapsed() / max(1, step - self.step0) * (self.tr.steps - step)
        bands = [logged.get(f"critic_pull_b{b}") for b in range(1, objective.PULL_BANDS + 1)]
        pull = ("" if not any(v is not None for v in bands) else
                " pull " + "/".join("-" if v is None else f"{v:.3g}" for v in bands))
        self.console.say(f"step {step}/{self.tr.steps} loss_diff {logged.get('loss_diff', 0):.4f} "
                         f"loss_cls {logged.get('loss_cls', 0):.4f} gamma {logged.get('gamma', 0):.2f}{pull} "
                         f"{logged['images_per_s']:.1f} img/s data-wait "
                         f"{100 * logged['data_wait_share']:.1f}% ETA {eta:.0f}s")
        self._reset()

    def plot(self) -> None:
        """The diffusion loss curve as a run artifact (rank 0: the others' trackers drop it)."""
        if not self.history or not self.console.on:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([s for s, _ in self.history], [v for _, v in self.history])
        ax.set_xlabel("step")
        ax.set_ylabel("loss_diff")
        ax.set_title("diffusion loss")
        fig.tight_layout()
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "loss_curve.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
            self.tracker.artifact(path)


class _Reporter:
    """Every rank, at the same steps: metrics to Ray Train (rank 0's evaluation included: Ray Tune
    reads rank 0's) and, when saving, the checkpoint rank 0 writes with every rank's RNG and the
    rows trained since the stream's restart point."""

    def __init__(self, state, consumed, tracker, evaluator, rank: int, world: int, steps: int):
        self.state, self.consumed, self.tracker, self.evaluator = state, consumed, tracker, evaluator
        self.rank, self.world, self.steps = rank, world, steps

    def __call__(self, evaluated: dict, save: bool) -> None:
        import ray.train

        state, world = self.state, self.world
        metrics = {"step": state.step, **evaluated}
        if not save:
            ray.train.report(metrics)
            return
        rngs = distributed.gather(checkpoint.rng_state(), world)
        # The stream restarts at the earliest shuffle window a rank is in, less what was trained.
        start = min(distributed.gather(self.consumed.window_start(), world))
        trained = np.concatenate(distributed.gather(self.consumed.since(start, restored=self.rank == 0), world))
        # Ranks must hold the same weights; a cheap checksum per rank says whether they do.
        sums = distributed.gather(sum(float(p.detach().double().sum())
                                      for p in state.objective.parameters()), world)
        metrics.update(epoch=start[0], ranks_in_sync=float(len(set(sums)) == 1))
        # Metrics up to this checkpoint reach MLflow before it is stored: a restart resumes after
        # it, so whatever rank 0 still held would never be logged if its node died now.
        self.tracker.flush()
        with tempfile.TemporaryDirectory() as d:
            ck, t0 = None, time.perf_counter()
            if self.rank == 0:  # one writer; the others report the same metrics without it
                path = checkpoint.save(state, os.path.join(d, "ckpt"),
                                       extra={"epoch": start[0], "pos": start[1], "rng": rngs, "world": world,
                                              "trained": torch.from_numpy(trained)})
                if state.step >= self.steps:
                    self.evaluator.keep_judged(path, state.step)
                ck = ray.train.Checkpoint.from_directory(str(path))
            t1 = time.perf_counter()
            ray.train.report(metrics, checkpoint=ck, checkpoint_dir_name=f"checkpoint_{state.step:08d}")
        # What a checkpoint costs: writing it locally, then Ray copying it to train.storage (S3 on a
        # cluster) while every rank waits (bench/cluster_scaling.py).
        self.tracker.log(state.step, {"checkpoint_write_s": t1 - t0,
                                      "checkpoint_upload_s": time.perf_counter() - t1})


class Evaluator:
    """One evaluation, on every rank at the same steps: rank 0's held-out losses, the sample metrics
    (each rank draws its share of the fixed sample plan; rank 0's judge scores the whole), a sample
    grid, and the same numbers returned on every rank, so every rank reports them (house rule 8)."""

    def __init__(self, cfg, state, tracker, console: Console, rank: int, world: int,
                 judge_file: str | None, downstream_file: str | None = None):
        import ray.train

        self.cfg, self.tracker, self.console, self.rank, self.world = cfg, tracker, console, rank, world
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
        # Fairness in the loop: every rank draws its share of the fill plan; rank 0 trains and scores.
        self.fill_plan = self.downstream = self.fair = None
        if downstream_file and cfg.fairness.in_loop != "off":
            from cnd_ray.fairness import downstream

            base = downstream.load(downstream_file)
            self.fill_plan = downstream.fill_plan(downstream.fill_for(cfg, base), cfg.fairness.seed,
                                                  cfg.eval.batch_size)
            if rank == 0:
                self.downstream = downstream.Downstream(cfg, cfg.data.shards, base)

    def __call__(self, state, step: int, elapsed: float) -> dict[str, float]:
        t0 = time.perf_counter()
        cfg, metrics = self.cfg, {}
        was = state.objective.training
        if self.val is not None:
            metrics.update(self._held_out(state))
        decoder = _decoder(cfg, str(self.device))
        grid = None
        if self.plan is not None:  # decoder is there: check_data made sure before the run
            images = self._draw(state, self.plan, decoder)
            if self.judge is not None:  # rank 0
                labels = self.plan["label"]
                metrics.update(self.judge.measure(images, labels, cfg.eval.kid_subsets,
                                                  inception=self.inception))
                self.judged = (step, images)
                grid = monitor.tile(images, labels, min(GRID_PER_CLASS, cfg.eval.search_samples))
        elif self.console.on and (cfg.data.space == "pixel" or decoder is not None):
            per_class = GRID_PER_CLASS if self.device.type == "cuda" else CPU_GRID_PER_CLASS
            grid = monitor.sample_grid(state, per_class=per_class, vae=decoder)
        if self.fill_plan is not None and (cfg.fairness.in_loop == "every" or step >= cfg.train.steps):
            metrics.update(self._fairness(state, step, decoder))
        state.objective.train(was)
        if grid is not None:
            self._log_grid(step, grid)
        self.seconds += time.perf_counter() - t0
        metrics.update(eval_seconds=time.perf_counter() - t0,
                       eval_share=self.seconds / max(elapsed + time.perf_counter() - t0, 1e-9))
        self.tracker.log(step, metrics)
        self.console.say(f"eval step {step}: " + " ".join(f"{k} {metrics[k]:.4g}" for k in CONSOLE_METRICS
                                                          if k in metrics))
        return distributed.gather(metrics, self.world)[0]  # rank 0's numbers, reported by every rank

    def _draw(self, state, plan: dict, decoder) -> torch.Tensor:
        """The plan's images from the EMA model: every rank draws its chunks (monitor.sample_images),
        gathered in plan order; every rank must call it, each gets the whole set."""
        index, images = monitor.sample_images(state, plan, decoder, self.rank, self.world)
        parts = distributed.gather((index, images), self.world)
        order = np.argsort(np.concatenate([p[0] for p in parts]))
        return torch.cat([p[1] for p in parts])[order]

    def _fairness(self, state, step: int, decoder) -> dict[str, float]:
        """The downstream classifier on real + this model's fill images (cnd_ray/fairness/downstream.py):
        every rank draws its chunks of the fill plan, rank 0 trains and scores."""
        t0 = time.perf_counter()
        images = self._draw(state, self.fill_plan, decoder)
        if self.downstream is None:
            return {}
        out, detail = self.downstream.measure(images, self.fill_plan, self.device)
        out["fair_seconds"] = time.perf_counter() - t0  # drawing the fill images included
        self.fair = (step, {"step": step, "metrics": out, **detail})
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, f"fairness_step{step:08d}.json")
            with open(path, "w") as f:
                json.dump(self.fair[1], f, indent=1, default=float)
            self.tracker.artifact(path, "fairness")
        return out

    def _held_out(self, state) -> dict[str, float]:
        """Held-out losses (and the critic's AUROC) on train.eval_batches fixed val batches."""
        batches = []
        for batch in self.val.iter_torch_batches(batch_size=self.cfg.per_worker_batch, device="cpu"):
            gen = torch.Generator().manual_seed(0)
            batches.append(_to(augment.model_batch(batch, self.cfg, gen), self.device))
            if len(batches) >= self.cfg.train.eval_batches:
                break
        return monitor.evaluate(state, batches) if batches else {}

    def _log_grid(self, step: int, grid) -> None:
        """MLflow's image view (a step slider), and a file whose name sorts."""
        self.tracker.image(step, "samples", grid)
        from PIL import Image

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, f"samples_step{step:08d}.png")
            Image.fromarray(grid).save(path)
            self.tracker.artifact(path, "samples")

    def keep_judged(self, ckpt_dir, step: int) -> None:
        """Store the images the evaluation at `step` judged in that step's checkpoint (`JUDGED`):
        `cnd-ray quickstart` writes them out instead of drawing the same plan again (~13 s a trial
        here)."""
        if self.judged is not None and self.judged[0] == step:
            np.savez_compressed(os.path.join(ckpt_dir, JUDGED), index=self.plan["index"],
                                seed=self.plan["seed"], images=self.judged[1].numpy())
        if self.fair is not None and self.fair[0] == step:
            with open(os.path.join(ckpt_dir, FAIRNESS), "w") as f:
                json.dump(self.fair[1], f, indent=1, default=float)


@functools.cache
def _decoder(cfg, device: str):
    """The VAE that turns latent sample grids into images, loaded once per worker; None in pixel
    space, and None (said once) when it is not on this machine: training goes on without grids."""
    try:
        return vae_lib.for_run(cfg, device)
    except UserError as e:
        say(f"no sample grids: {e}")
        return None
