"""What does scaling training to N Ray workers cost? A simulated multi-node cluster on this machine.

A `ray.cluster_utils.Cluster` (a head plus --nodes - 1 extra raylets, each declaring --node-cpus
logical CPUs) runs `cnd_ray.launch.train.run` side by side with an in-process loop, all on one config
(quickstart by default) at a FIXED global batch (strong scaling: N workers split the same batch),
every process on 1 torch thread so the comparison is fair on 2 cores:

  1. Ray overhead per step
       in-process  engine.build_state + engine.train_step on a fixed random batch (no Ray, no data
                   stream), at the global batch and at the per-worker batch of N workers; timed on
                   the same step indices the Ray windows cover (the gamma coin depends on the step),
                   in three slices: before the cluster starts, between the Ray runs, after it is gone
       Ray 1w      train.run, scale.num_workers=1
       Ray Nw      train.run, scale.num_workers=N, scale.placement_strategy=STRICT_SPREAD (one
                   worker per node; gradients averaged over gloo between raylets)
     Steady-state step time inside Ray = global_batch / images_per_s from the run's MLflow history
     (logged every train.log_every steps); the first window (start-up) and each window that follows
     a checkpoint are dropped. It includes the Ray Data stream (data_wait_share is shown) and, for
     N workers, the gradient all-reduce. overhead = Ray step - in-process step at the same
     per-worker batch; speedup = in-process step at the global batch / Ray step.
     all-reduce probe: train.py's own gradient averaging (distributed.runtime) timed between N
     STRICT_SPREAD workers on tensors of the config's gradient shapes, to say how much of the
     N-worker overhead the all-reduce is.
  2. Checkpoint cost: `checkpoint_write_s` (rank 0 writes the folder locally) and
     `checkpoint_upload_s` (ray.train.report copies it to train.storage while every rank waits),
     logged by train.py at every checkpoint step, and the folder's size on disk -> upload MB/s.
     Here train.storage is a local folder, so "upload" is a local copy plus Ray's bookkeeping.
  3. What to expect on GPUs - EXTRAPOLATED, not measured: the paper config's parameter counts
     (models built on the meta device) -> fp32 gradient bytes all-reduced per step and checkpoint
     bytes (weights + EMA + optimizer states, the byte formula checked against the measured
     checkpoint), then times at the bandwidths named at the top of this file.

Run: python bench/cluster_scaling.py [--quick] [--steps 120] [--nodes 2] [--config quickstart]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import tempfile
import time

import torch

# --- Assumptions of the GPU extrapolation (part 3), in GB/s (1 GB = 1e9 bytes) -------------------
# NCCL ring all-reduce "bus bandwidth" (nccl-tests' busbw): time = 2 (N-1)/N x bytes / busbw.
NVLINK_BUS_GBPS = 150.0  # 8 A100s inside one p4d.24xlarge over NVLink/NVSwitch (conservative)
EFA_BUS_GBPS = 40.0  # across p4d nodes: 4 x 100 Gb/s EFA = 50 GB/s line rate, ~40 GB/s achieved
G5_BUS_GBPS = 2.5  # g5.4xlarge/8xlarge (1 A10G per node), no EFA: 25 Gb/s ENA = 3.1 GB/s line, ~2.5 achieved
# g5.2xlarge, cluster/aws.yaml's GPU node, is rated "up to 10 Gb/s" (a burst figure; single TCP flows
# are capped at 5 Gb/s outside a cluster placement group): ~1 GB/s at best.
G5_2XL_BUS_GBPS = 1.0
S3_UPLOAD_GBPS = 1.0  # one node's multipart upload of a checkpoint folder to S3 in the same region
LOCAL_WRITE_GBPS = 1.0  # rank 0 writing the checkpoint to local NVMe before the upload
# (key, interconnect, its bus bandwidth, the worker counts worth printing)
INTERCONNECTS = (("nvlink", "NVLink, 1 x p4d.24xlarge", NVLINK_BUS_GBPS, (2, 8)),
                 ("efa", "EFA, p4d.24xlarge nodes", EFA_BUS_GBPS, (16, 32)),
                 ("g5_25gbit", "g5 nodes, 25 Gb/s, no EFA", G5_BUS_GBPS, (2, 4, 8)),
                 ("g5_2xlarge", "g5.2xlarge, <=10 Gb/s", G5_2XL_BUS_GBPS, (2, 4, 8)))


def ring_s(nbytes: float, workers: int, bus_gbps: float) -> float:
    """Seconds of one ring all-reduce of `nbytes` over `workers` at bus bandwidth `bus_gbps`."""
    return 2 * (workers - 1) / workers * nbytes / (bus_gbps * 1e9) if workers > 1 else 0.0


# --- model sizes: what is all-reduced and what a checkpoint holds (cnd_ray/engine.py, checkpoint.py)

def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_sizes(cfg) -> dict:
    """Parameter and byte counts of cfg's DiT and classifier, built on the meta device (no memory)."""
    from cnd_ray.models.classifier import Classifier
    from cnd_ray.models.dit import build_dit

    with torch.device("meta"):
        dit = build_dit(cfg)
        c = cfg.classifier
        cls = Classifier(c.backbone, cfg.in_channels, c.hidden, c.dropout) if cfg.use_classifier else None
    out = {"dit_params": sum(p.numel() for p in dit.parameters()),
           "dit_trainable": sum(p.numel() for p in dit.parameters() if p.requires_grad),
           "dit_state_bytes": _bytes(dit.state_dict().values()),
           "cls_params": 0, "cls_float_buffers": 0, "cls_state_bytes": 0}
    if cls is not None:
        out.update(cls_params=sum(p.numel() for p in cls.parameters()),
                   cls_float_buffers=sum(b.numel() for b in cls.buffers() if b.dtype.is_floating_point),
                   cls_state_bytes=_bytes(cls.state_dict().values()))
    return out


def classifier_sync_share(cfg, steps: int = 2000) -> float:
    """Share of steps on which the classifier's gradients (and BatchNorm statistics) are all-reduced:
    its optimizer steps every classifier.step_every steps when a clean branch came in between
    (engine.train_step), and the branch is the shared coin against the gamma schedule."""
    if not cfg.use_classifier:
        return 0.0
    from cnd_ray.objective import coin, gamma_at

    k, pending, syncs = cfg.classifier.step_every, False, 0
    for s in range(steps):
        pending |= coin(cfg.train.seed, s) >= gamma_at(cfg.method, s)
        if (s + 1) % k == 0 and pending:
            syncs, pending = syncs + 1, False
    return syncs / steps


def allreduce_bytes(cfg, sizes: dict) -> dict:
    """fp32 bytes averaged per step: the DiT's trainable gradients every step (bucketed .float()
    copies in distributed.runtime), the classifier's gradients + float buffers on its optimizer steps."""
    share = classifier_sync_share(cfg)
    dit = 4 * sizes["dit_trainable"]
    cls = 4 * (sizes["cls_params"] + sizes["cls_float_buffers"])
    return {"dit": dit, "cls": cls, "cls_share": share, "per_step": dit + share * cls}


def checkpoint_bytes(cfg, sizes: dict) -> int:
    """checkpoint.save: weights.pt = DiT + its EMA + classifier (+ classifier EMA); optim.pt = AdamW's
    two fp32 moments per trainable DiT parameter + SGD's momentum buffer per classifier parameter;
    state.pt = the classifier's pending gradients when classifier.step_every > 1."""
    c = cfg.classifier
    weights = 2 * sizes["dit_state_bytes"] + sizes["cls_state_bytes"] * (2 if c.ema else 1)
    optim = 2 * 4 * sizes["dit_trainable"] + (4 * sizes["cls_params"] if c.momentum > 0 else 0)
    pending = 4 * sizes["cls_params"] if c.step_every > 1 else 0
    return weights + optim + pending


# --- part 1: in-process baseline -------------------------------------------------------------------

def inprocess_step_s(cfg, batch: int, indices: list[int], warmup: int = 3) -> list[float]:
    """Seconds of engine.train_step at `batch` on one fixed random batch, at each step index."""
    from cnd_ray import engine

    state = engine.build_state(cfg)
    g = torch.Generator().manual_seed(0)
    fixed = {"x": torch.rand((batch, cfg.in_channels, cfg.input_size, cfg.input_size), generator=g) * 2 - 1,
             "y": torch.arange(batch) % cfg.model.num_classes}
    for i in range(warmup):
        state.step = indices[i % len(indices)]
        engine.train_step(state, [fixed])
    times = []
    for s in indices:
        state.step = s
        t = time.perf_counter()
        engine.train_step(state, [fixed])
        times.append(time.perf_counter() - t)
    return times


# --- parts 1 and 2: runs on the simulated cluster ---------------------------------------------------

def steady_windows(steps: int, log_every: int, ckpt_every: int) -> list[int]:
    """End steps of the images_per_s windows kept: not the first (start-up), not one after a
    checkpoint (its report sits inside that window)."""
    ends = list(range(log_every, steps + 1, log_every))
    return [e for e in ends[1:] if not ((e - log_every) % ckpt_every == 0 and e - log_every < steps)]


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def ray_run(cfg, uri: str, keep: list[int]) -> dict:
    """train.run(cfg); its steady-state step time, data wait, checkpoint costs and worker nodes."""
    from mlflow.tracking import MlflowClient

    from cnd_ray.launch import identity, train

    t = time.perf_counter()
    out = train.run(cfg)
    wall = time.perf_counter() - t
    client = MlflowClient(uri)
    rid = out["mlflow_run_id"]
    hist = lambda key: {m.step: m.value for m in client.get_metric_history(rid, key)}  # noqa: E731
    ips, wait = hist("images_per_s"), hist("data_wait_share")
    missing = [e for e in keep if e not in ips]
    if missing:
        raise RuntimeError(f"images_per_s not logged at steps {missing} (got {sorted(ips)})")
    win_s = [cfg.train.global_batch / ips[e] for e in keep]
    write, upload = hist("checkpoint_write_s"), hist("checkpoint_upload_s")
    run_dir = os.path.join(identity.storage_path(cfg), out["run_name"])
    ckpts = []
    for step in sorted(write):
        folder = os.path.join(run_dir, f"checkpoint_{step:08d}")
        size = dir_bytes(folder) if os.path.isdir(folder) else float("nan")
        ckpts.append({"step": step, "bytes": size, "write_s": write[step], "upload_s": upload.get(step, float("nan"))})
    nodes = client.get_run(rid).data.tags.get("worker_nodes", "")
    return {"step_s": sum(win_s) / len(win_s), "window_step_s": win_s,
            "data_wait": sum(wait.get(e, 0.0) for e in keep) / len(keep), "ckpts": ckpts,
            "nodes": len(set(filter(None, nodes.split(",")))), "wall_s": wall, "run_dir": run_dir}


def grad_shapes(cfg) -> dict:
    """Shapes of what one step averages (engine.train_step): the DiT's trainable gradients, and the
    classifier's gradients + float buffers on its optimizer steps."""
    from cnd_ray.models.classifier import Classifier
    from cnd_ray.models.dit import build_dit

    with torch.device("meta"):
        dit = build_dit(cfg)
        c = cfg.classifier
        cls = Classifier(c.backbone, cfg.in_channels, c.hidden, c.dropout) if cfg.use_classifier else None
    return {"dit": [list(p.shape) for p in dit.parameters() if p.requires_grad],
            "cls": [] if cls is None else [list(t.shape) for t in list(cls.parameters()) + [
                b for b in cls.buffers() if b.dtype.is_floating_point]]}


def _allreduce_probe(config: dict) -> None:
    """Ray Train worker: time distributed.runtime's gradient averaging (the code a training step runs)
    on tensors of the measured config's shapes, between the workers of the simulated cluster."""
    import contextlib

    import ray.train
    import torch.distributed as dist

    from cnd_ray import distributed

    torch.set_num_threads(1)
    world = ray.train.get_context().get_world_size()
    rt = distributed.runtime(contextlib.nullcontext, None, "cpu", world)
    out = {}
    for key, shapes in config["shapes"].items():
        tensors = [torch.randn(s) for s in shapes]
        if not tensors:
            out[f"{key}_s"] = 0.0
            continue
        times = []
        for i in range(config["warmup"] + config["reps"]):
            dist.barrier()
            t = time.perf_counter()
            rt.average(tensors)
            if i >= config["warmup"]:
                times.append(time.perf_counter() - t)
        out[f"{key}_s"] = sorted(times)[len(times) // 2]  # median
    if ray.train.get_context().get_world_rank() == 0:  # Result.metrics holds checkpointed reports only
        with open(config["result"], "w") as f:
            json.dump(out, f)
    ray.train.report(out)


def allreduce_probe(cfg, workers: int, storage: str, reps: int) -> dict:
    """Seconds of one DiT and one classifier gradient average over `workers` STRICT_SPREAD workers."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    name = f"allreduce-probe-{time.strftime('%Y%m%d-%H%M%S')}"
    result = os.path.join(storage, f"{name}.json")  # one machine: the driver reads rank 0's file
    TorchTrainer(
        _allreduce_probe,
        train_loop_config={"shapes": grad_shapes(cfg), "warmup": 2, "reps": reps, "result": result},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cfg.scale.cpus_per_worker},
                                     placement_strategy="STRICT_SPREAD"),
        run_config=RunConfig(name=name, storage_path=storage)).fit()
    with open(result) as f:
        return json.load(f)


def start_cluster(nodes: int, node_cpus: float, object_store_mb: int):
    import ray
    from ray.cluster_utils import Cluster

    # Ray Train's PlacementGroupCleaner asks the state API (the dashboard) whether the run's
    # controller is alive, and removes the run's placement group - killing its workers - when the
    # answer is no. On a machine where other Ray clusters run, a head without its own dashboard
    # sends that question to whichever cluster holds port 8265, which does not know our controller
    # ("dead"), or fails to pick a cluster at all. So: our own dashboard on a free port, and
    # RAY_ADDRESS set for every actor and task of this job so the lookup finds this cluster.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = {"num_cpus": node_cpus, "object_store_memory": object_store_mb * 2 ** 20}
    cluster = Cluster(initialize_head=True, head_node_args={
        **common, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port})
    for _ in range(nodes - 1):
        cluster.add_node(**common)
    ray.init(address=cluster.address, logging_level="ERROR",
             runtime_env={"env_vars": {"RAY_ADDRESS": cluster.address}})
    cluster.wait_for_nodes()
    return cluster


def mean(xs) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="quickstart", help="packaged config or YAML of the measured runs")
    ap.add_argument("--quick", action="store_true", help="a ~2 minute smoke run (50 steps, 256 images)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per Ray run (default 120, quick 50)")
    ap.add_argument("--log-every", type=int, default=None,
                    help="steps per images_per_s window (default: about steps/6, quick 10)")
    ap.add_argument("--nodes", type=int, default=2,
                    help="simulated nodes (head + nodes-1); the scaled run puts one worker on each")
    ap.add_argument("--node-cpus", type=float, default=2.0, help="logical CPUs each node declares")
    ap.add_argument("--decode-tasks", type=int, default=2, help="data.decode_tasks of every run")
    ap.add_argument("--images", type=int, default=None, help="synthetic training images (default 512, quick 256)")
    ap.add_argument("--allreduce-reps", type=int, default=10, help="timed gradient averages in the probe")
    ap.add_argument("--object-store-mb", type=int, default=512, help="object store per simulated node")
    ap.add_argument("--out", default=None, help="storage and MLflow folder (default: a temp dir, removed)")
    args = ap.parse_args()

    from cnd_ray import config as config_lib

    steps = args.steps or (50 if args.quick else 120)
    # default: the longest window that divides the run into at least 6
    log_every = args.log_every or (10 if args.quick else next(
        (d for d in range(steps // 6, 0, -1) if steps % d == 0), 1))
    if steps % log_every or steps // log_every < 4:
        ap.error("--steps must be a multiple of --log-every, at least 4 windows")
    ckpt_every = log_every * math.ceil(steps // log_every / 2)  # one mid-run checkpoint and the last
    keep = steady_windows(steps, log_every, ckpt_every)
    assert keep, (steps, log_every, ckpt_every)
    images = args.images or (256 if args.quick else 512)
    n = args.nodes
    if n < 2:
        ap.error("--nodes must be >= 2")

    out = args.out or tempfile.mkdtemp(prefix="cluster_scaling-")
    os.makedirs(out, exist_ok=True)
    out = os.path.abspath(out)
    uri = f"sqlite:///{out}/mlflow.db"
    base = [f"train.storage={out}/runs", f"track.tracking_uri={uri}",
            f"train.steps={steps}", f"train.log_every={log_every}", f"train.checkpoint_every={ckpt_every}",
            "train.keep_checkpoints=100", "train.eval_every=0", f"train.synthetic_images={images}",
            f"data.decode_tasks={args.decode_tasks}", "scale.threads_per_worker=1"]
    cfg = config_lib.load(args.config, base)
    B = cfg.train.global_batch
    if B % n:
        ap.error(f"train.global_batch {B} of config {args.config} does not split over {n} workers")
    stamp = time.strftime("%Y%m%d-%H%M%S")  # a reused --out keeps its shards, never resumes a run
    variants = {1: config_lib.override(cfg, {"train.name": f"scaling-1w-{stamp}", "scale.num_workers": 1}),
                n: config_lib.override(cfg, {"train.name": f"scaling-{n}w-{stamp}", "scale.num_workers": n,
                                             "scale.placement_strategy": "STRICT_SPREAD"})}
    # In-process steps on the step indices the kept Ray windows train on (state.step before the step).
    indices = [s for e in keep for s in range(e - log_every, e)]
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    print(f"config {args.config}: global batch {B} fixed (strong scaling), {steps} steps, windows of "
          f"{log_every}, checkpoints every {ckpt_every}; {n} simulated nodes x {args.node_cpus:g} "
          f"logical CPUs on {os.cpu_count()} cores; storage {out}", flush=True)

    # The in-process steps are interleaved with the Ray runs in three slices (a busy shared machine
    # drifts): before the cluster starts, between the two runs (cluster idle), after it is gone.
    inproc: dict[int, list[float]] = {1: [], n: []}
    phases: list[dict[int, float]] = []

    def inprocess_phase(k: int) -> None:
        got = {w: inprocess_step_s(cfg, B // w, indices[k::3]) for w in inproc}
        for w in inproc:
            inproc[w] += got[w]
        phases.append({w: mean(got[w]) for w in got})
        print(f"in-process slice {k + 1}/3: " + ", ".join(
            f"batch {B // w} {1e3 * phases[-1][w]:.1f} ms" for w in inproc), flush=True)

    import ray

    inprocess_phase(0)
    cluster = start_cluster(n, args.node_cpus, args.object_store_mb)
    os.makedirs(f"{out}/runs", exist_ok=True)
    runs = {}
    try:
        print(f"cluster up: {len([x for x in ray.nodes() if x['Alive']])} nodes, "
              f"{ray.cluster_resources().get('CPU')} CPUs", flush=True)
        probe = allreduce_probe(cfg, n, f"{out}/runs", args.allreduce_reps)
        print(f"all-reduce probe over {n} workers: {probe}", flush=True)
        for i, (w, c) in enumerate(variants.items()):
            if i:
                inprocess_phase(1)
            print(f"--- Ray run, {w} worker(s), {c.scale.placement_strategy}", flush=True)
            runs[w] = ray_run(c, uri, keep)
    finally:
        ray.shutdown()
        cluster.shutdown()
    inprocess_phase(2)

    # --- part 3 inputs: sizes of the measured and the paper config
    paper = config_lib.load("paper")
    ms, ps = model_sizes(cfg), model_sizes(paper)
    m_ar, p_ar = allreduce_bytes(cfg, ms), allreduce_bytes(paper, ps)
    m_ck_formula, p_ck_formula = checkpoint_bytes(cfg, ms), checkpoint_bytes(paper, ps)
    all_ckpts = [ck for w in runs for ck in runs[w]["ckpts"]]
    m_ck_bytes = mean(ck["bytes"] for ck in all_ckpts)
    fit = m_ck_bytes / m_ck_formula  # measured / formula on the small model (pickling, yaml, rng)
    p_ck = p_ck_formula * fit
    m_params = ms["dit_params"] + ms["cls_params"]
    p_params = ps["dit_params"] + ps["cls_params"]
    naive = m_ck_bytes / m_params * p_params  # bytes-per-parameter scaling: wrong mix, shown why
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)

    # --- report
    step = {w: mean(inproc[w]) for w in inproc}
    print(f"\n== 1. Ray overhead per step  (config {args.config}, global batch {B} fixed = strong "
          f"scaling, 1 torch thread per process, {len(indices)} steady-state steps, "
          f"{os.cpu_count()} cores shared)")
    print(f"{'variant':44s} {'step ms':>8s} {'vs in-proc':>10s} {'overhead':>10s} {'data wait':>9s} {'nodes':>5s}")
    for w in inproc:
        print(f"{f'in-process, batch {B // w} (no Ray)':44s} {1e3 * step[w]:8.1f}   slices "
              + " ".join(f"{1e3 * ph[w]:.0f}" for ph in phases))
    figures = {}
    for w, r in runs.items():
        label = f"Ray 1 worker, batch {B}" if w == 1 else f"Ray {w} workers, batch {B // w} each, STRICT_SPREAD"
        over = r["step_s"] - step[w]
        ratio = r["step_s"] / step[w]
        print(f"{label:44s} {1e3 * r['step_s']:8.1f} {ratio:9.2f}x {1e3 * over:+8.1f}ms "
              f"{100 * r['data_wait']:8.1f}% {r['nodes']:5d}")
        figures[w] = {"step_ms": round(1e3 * r["step_s"], 2), "overhead_ms": round(1e3 * over, 2),
                      "ratio": round(ratio, 3), "speedup": round(step[1] / r["step_s"], 3),
                      "data_wait": round(r["data_wait"], 4), "nodes": r["nodes"],
                      "windows_ms": [round(1e3 * x, 1) for x in r["window_step_s"]], "wall_s": round(r["wall_s"], 1)}
    rn = runs[n]["step_s"]
    print("  overhead = Ray step - in-process step at the same per-worker batch; 'vs in-proc' = their ratio")
    print(f"  {n} workers vs in-process batch {B}: speedup {step[1] / rn:.2f}x (ideal {n}x with {n} free "
          f"cores; this machine has {os.cpu_count()}); vs Ray 1 worker: {runs[1]['step_s'] / rn:.2f}x")
    ar_s = probe["dit_s"] + m_ar["cls_share"] * probe["cls_s"]
    bus = ring_s(m_ar["per_step"], n, 1.0) / ar_s if ar_s > 0 else float("nan")  # GB/s
    print(f"  {n}-worker step all-reduces {m_ar['dit'] / 1e6:.1f} MB of DiT gradients every step + "
          f"{m_ar['cls'] / 1e6:.1f} MB of classifier gradients/statistics on {100 * m_ar['cls_share']:.0f}% "
          f"of steps = {m_ar['per_step'] / 1e6:.1f} MB/step (fp32, gloo between raylets)")
    print(f"  measured gradient averaging (distributed.runtime, median of {args.allreduce_reps}): DiT "
          f"{1e3 * probe['dit_s']:.1f} ms, classifier {1e3 * probe['cls_s']:.1f} ms -> {1e3 * ar_s:.1f} "
          f"ms/step = {100 * ar_s / (figures[n]['overhead_ms'] / 1e3) if figures[n]['overhead_ms'] > 0 else float('nan'):.0f}% "
          f"of the {n}-worker overhead; bus bandwidth {bus:.2f} GB/s")
    print(f"  (not covered by the all-reduce: {n} workers + Ray Data decode tasks + raylets on "
          f"{os.cpu_count()} cores, Ray Train's per-step bookkeeping)")
    print("  windows (ms/step): " + "; ".join(f"{w}w " + " ".join(f"{x:.0f}" for x in f["windows_ms"])
                                                for w, f in figures.items()))

    print("\n== 2. Checkpoint cost  (train.storage is a local folder here: 'upload' = Ray's copy into "
          "it while ranks wait)")
    print(f"{'run':10s} {'step':>5s} {'folder MB':>10s} {'write s':>8s} {'upload s':>9s} {'upload MB/s':>12s}")
    for w, r in runs.items():
        for ck in r["ckpts"]:
            print(f"{f'{w} worker' + ('s' if w > 1 else ''):10s} {ck['step']:5d} {ck['bytes'] / 1e6:10.1f} {ck['write_s']:8.3f} "
                  f"{ck['upload_s']:9.3f} {ck['bytes'] / 1e6 / ck['upload_s']:12.1f}")
    up_s, wr_s = mean(c["upload_s"] for c in all_ckpts), mean(c["write_s"] for c in all_ckpts)
    up_mbs = mean(c["bytes"] / 1e6 / c["upload_s"] for c in all_ckpts)
    print(f"  mean: {m_ck_bytes / 1e6:.1f} MB, write {wr_s:.3f} s, upload {up_s:.3f} s = {up_mbs:.0f} MB/s; "
          f"byte formula predicts {m_ck_formula / 1e6:.1f} MB (measured/formula {fit:.3f})")

    print("\n== 3. What to expect on GPUs  -- EXTRAPOLATED from parameter counts and the assumed "
          "bandwidths at the top of bench/cluster_scaling.py, NOT measured")
    print(f"  paper config: DiT {ps['dit_params'] / 1e6:.1f}M params ({ps['dit_trainable'] / 1e6:.1f}M "
          f"trainable), classifier {paper.classifier.backbone} {ps['cls_params'] / 1e6:.1f}M params "
          f"+ {ps['cls_float_buffers'] / 1e6:.2f}M float buffers")
    print(f"  all-reduced bytes/step = 4 x DiT trainable + share x 4 x (classifier params + float buffers)"
          f"\n                       = {p_ar['dit'] / 1e9:.3f} GB + {p_ar['cls_share']:.2f} x "
          f"{p_ar['cls'] / 1e9:.3f} GB = {p_ar['per_step'] / 1e9:.3f} GB  (share = steps whose clean "
          f"branch steps the classifier: 1 - gamma at gamma {paper.method.gamma:g})")
    print("  all-reduce s/step = 2 (N-1)/N x bytes / bus bandwidth  (ring; NOT overlapped with the "
          "backward: engine.train_step averages after it)")
    print(f"  {'interconnect':28s} {'bus GB/s':>8s} {'N':>4s} {'ms/step':>9s}")
    extrap = {}
    for key, name, bw, ns in INTERCONNECTS:
        for w in ns:
            t = ring_s(p_ar["per_step"], w, bw)
            extrap[f"{key}_{w}"] = round(1e3 * t, 1)
            print(f"  {name:28s} {bw:8.1f} {w:4d} {1e3 * t:9.1f}")
    print(f"  checkpoint bytes = 2 x DiT state (weights + EMA) + classifier state"
          f"{' x 2 (EMA)' if paper.classifier.ema else ''} + 2 x 4 x DiT trainable (AdamW moments) "
          f"+ 4 x classifier params (SGD momentum)"
          f"\n                   = {p_ck_formula / 1e9:.2f} GB x {fit:.3f} (measured/formula above) = "
          f"{p_ck / 1e9:.2f} GB  [{p_ck / p_params:.1f} B/param; the measured config's "
          f"{m_ck_bytes / m_params:.1f} B/param x {p_params / 1e6:.0f}M params would say "
          f"{naive / 1e9:.2f} GB: its mix is classifier-heavy, whose params carry 2 copies, not the DiT's 4]")
    p_up, p_wr = p_ck / (S3_UPLOAD_GBPS * 1e9), p_ck / (LOCAL_WRITE_GBPS * 1e9)
    print(f"  per checkpoint: local write = bytes / {LOCAL_WRITE_GBPS:g} GB/s = {p_wr:.1f} s, then upload "
          f"to S3 = bytes / {S3_UPLOAD_GBPS:g} GB/s = {p_up:.1f} s with every rank waiting "
          f"(at train.checkpoint_every={paper.train.checkpoint_every}: {p_wr + p_up:.1f} s per "
          f"{paper.train.checkpoint_every} steps)")
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    print(json.dumps({
        "config": args.config, "global_batch": B, "steps": steps, "nodes": n, "node_cpus": args.node_cpus,
        "cores": os.cpu_count(), "steady_steps": len(indices),
        "inprocess_ms": {str(B // w): round(1e3 * step[w], 2) for w in step},
        "ray": {f"{w}w": f for w, f in figures.items()},
        "checkpoint": {"mb": round(m_ck_bytes / 1e6, 2), "formula_mb": round(m_ck_formula / 1e6, 2),
                       "write_s": round(wr_s, 4), "upload_s": round(up_s, 4), "upload_mb_s": round(up_mbs, 1)},
        "allreduce_mb_per_step": round(m_ar["per_step"] / 1e6, 2),
        "allreduce_measured": {"dit_ms": round(1e3 * probe["dit_s"], 2), "cls_ms": round(1e3 * probe["cls_s"], 2),
                               "per_step_ms": round(1e3 * ar_s, 2), "bus_gb_s": round(bus, 3)},
        "paper_extrapolated": {"dit_params": ps["dit_params"], "cls_params": ps["cls_params"],
                               "allreduce_gb_per_step": round(p_ar["per_step"] / 1e9, 4),
                               "allreduce_ms": extrap, "checkpoint_gb": round(p_ck / 1e9, 3),
                               "checkpoint_write_s": round(p_wr, 2), "checkpoint_upload_s": round(p_up, 2),
                               "assumed_gb_s": {"nvlink_bus": NVLINK_BUS_GBPS, "efa_bus": EFA_BUS_GBPS,
                                                "g5_bus": G5_BUS_GBPS,
                                                "g5_2xlarge_bus": G5_2XL_BUS_GBPS, "s3_upload": S3_UPLOAD_GBPS,
                                                "local_write": LOCAL_WRITE_GBPS}}}), flush=True)


if __name__ == "__main__":
    main()
