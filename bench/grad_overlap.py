"""Gradient averaging during backward (scale.grad_overlap) vs after it, measured and projected.

Measured, side by side in one run: 2 gloo workers on this machine (torch.multiprocessing, one
thread each) run the joint training step (engine.train_step through distributed.runtime, exactly as
a Ray Train worker does) on a DiT of `--size`, alternating blocks of steps with the DiT's gradients
averaged after backward and while backward runs. Printed: median step time of each, their ratio.

Projected, for the paper's DiT-L/4 on 32x32x4 latents: its gradient bytes (float32, as averaged)
and its training FLOPs per image (torch.utils.flop_counter over a forward and backward on the meta
device, nothing allocated); compute time per GPU at an assumed H100 rate (989 dense bf16 TFLOP/s at
40% MFU, stated, not measured); ring all-reduce time 2 (N-1)/N x bytes / bandwidth at the stated
bandwidths; and the share of each step left waiting on communication, with averaging after
backward (all of it waits) and overlapped (only what outlasts backward, 2/3 of the compute, waits).

    python bench/grad_overlap.py            # ~2 minutes on 2 cores
    python bench/grad_overlap.py --quick    # a smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cnd_ray import config as config_lib  # noqa: E402
from cnd_ray import distributed, engine  # noqa: E402

H100_BF16_FLOPS = 989e12  # dense bf16, SXM
ASSUMED_MFU = 0.40
BANDWIDTHS = {"NVLink (~400 GB/s all-reduce bus bandwidth)": 400e9, "100 Gb/s": 12.5e9, "25 Gb/s": 3.125e9}


def _worker(rank: int, port: int, args, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = config_lib.load("quickstart", [f"model.size={args.size}", "train.global_batch=16",
                                         "scale.num_workers=2", "method.gamma_schedule=constant",
                                         "method.gamma=0.25"])
    times = {"after": [], "overlapped": []}
    states = {mode: engine.build_state(cfg) for mode in times}
    runtimes = {mode: distributed.runtime(contextlib.nullcontext, None, "cpu", 2,
                                          overlap=states[mode].dit if mode == "overlapped" else None)
                for mode in times}
    g = torch.Generator().manual_seed(rank)
    batch = {"x": torch.randn(cfg.per_worker_batch, cfg.in_channels, cfg.input_size, cfg.input_size,
                              generator=g), "y": torch.randint(0, 2, (cfg.per_worker_batch,), generator=g)}
    for block in range(args.blocks):  # alternate, so drift on a noisy machine hits both alike
        for mode in times:
            for i in range(args.steps):
                dist.barrier()
                t = time.perf_counter()
                engine.train_step(states[mode], [batch], runtimes[mode])
                if block or i:  # the first step of each mode warms up
                    times[mode].append(time.perf_counter() - t)
    if rank == 0:
        out.update({m: statistics.median(v) for m, v in times.items()})
        out["params"] = sum(p.numel() for p in states["after"].dit.parameters())
    dist.destroy_process_group()


def measured(args) -> dict:
    from tests.helpers import free_port

    with mp.Manager() as m:
        out = m.dict()
        mp.spawn(_worker, args=(free_port(), args, out), nprocs=2, join=True)
        return dict(out)


def dit_l4() -> tuple[int, float]:
    """(gradient bytes as averaged, training FLOPs per image) of the paper's DiT-L/4."""
    from torch.utils.flop_counter import FlopCounterMode

    from cnd_ray.models import build_dit

    cfg = config_lib.load("paper")
    with torch.device("meta"):
        dit = build_dit(cfg)
        n = 4
        x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size)
        t, y = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
        with FlopCounterMode(display=False) as fc:
            dit(x, t, y).float().pow(2).mean().backward()
    grad_bytes = 4 * sum(p.numel() for p in dit.parameters() if p.requires_grad)
    return grad_bytes, fc.get_total_flops() / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="S", help="DiT size of the measured runs (default S)")
    ap.add_argument("--steps", type=int, default=4, help="steps per block and mode")
    ap.add_argument("--blocks", type=int, default=3, help="alternating blocks per mode")
    ap.add_argument("--quick", action="store_true", help="DiT-T, 2 blocks of 2 steps")
    args = ap.parse_args()
    if args.quick:
        args.size, args.steps, args.blocks = "T", 2, 2
    t0 = time.perf_counter()
    m = measured(args)
    print(f"measured: 2 gloo workers on {os.cpu_count()} cores, DiT-{args.size}/4 ({m['params'] / 1e6:.1f}M "
          f"parameters, {4 * m['params'] / 2 ** 20:.0f} MiB of gradients), joint step at gamma 0.25, "
          "8 images per worker")
    print(f"  step, averaging after backward: {1e3 * m['after']:.1f} ms")
    print(f"  step, averaging overlapped:     {1e3 * m['overlapped']:.1f} ms")
    print(f"  overlapped / after: {m['overlapped'] / m['after']:.3f}")

    grad_bytes, flops = dit_l4()
    print(f"\nprojected, the paper's DiT-L/4 (32x32x4 latents): {grad_bytes / 2 ** 30:.2f} GiB of float32 "
          f"gradients, {flops / 1e9:.1f} GFLOP per training image (forward + backward, counted); "
          f"compute at {ASSUMED_MFU:.0%} MFU of {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s (assumed)")
    print("| GPUs | images per GPU | bandwidth | compute ms | all-reduce ms | waiting, after | waiting, overlapped |")
    print("|---|---|---|---|---|---|---|")
    projected = []
    for gpus in (8, 32):
        for per_gpu in (1, 32):
            compute = flops * per_gpu / (H100_BF16_FLOPS * ASSUMED_MFU)
            for name, bw in BANDWIDTHS.items():
                comm = 2 * (gpus - 1) / gpus * grad_bytes / bw
                exposed_after = comm / (compute + comm)
                left = max(0.0, comm - compute * 2 / 3)
                exposed_overlap = left / (compute + left)
                print(f"| {gpus} | {per_gpu} | {name} | {1e3 * compute:.2f} | {1e3 * comm:.1f} | "
                      f"{exposed_after:.0%} | {exposed_overlap:.0%} |")
                projected.append({"gpus": gpus, "per_gpu": per_gpu, "bandwidth": bw, "compute_s": compute,
                                  "allreduce_s": comm, "exposed_after": exposed_after,
                                  "exposed_overlapped": exposed_overlap})
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    print(json.dumps({"measured": {"size": args.size, "after_s": m["after"], "overlapped_s": m["overlapped"],
                                   "ratio": m["overlapped"] / m["after"]},
                      "dit_l4": {"grad_bytes": grad_bytes, "flops_per_image": flops}, "projected": projected}))


if __name__ == "__main__":
    main()
