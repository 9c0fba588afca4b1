"""The training step on one GPU at the paper's shape: throughput, FLOP/s, MFU, memory, the largest
batch that fits, the joint step's cost over a plain DiT step, and the paper's whole run projected.

Shapes: DiT-L/4 + ResNet-101 on 32x32x4 latents (the `paper` config), and DiT-XL/2 for comparison
with fast-DiT's published 0.84 steps/s at batch 128 on one A100. For each precision (bf16 autocast,
fp16 autocast with loss scaling, fp32 with TF32) and batch, it times `engine.train_step` - the code a
Ray Train worker runs, with the config's GPU settings (fused AdamW, channels_last critic, SDPA
attention) - for the plain DiT step (method.gamma_schedule=off) and the joint step at gamma 0.25,
after warm-up, with CUDA synchronised. FLOPs per step are counted by torch.utils.flop_counter on the
step itself (both branches of the joint step, weighted 0.25 / 0.75); MFU = achieved FLOP/s over the
GPU's dense peak for the precision. The batch sweep doubles until the GPU runs out of memory.

The paper's run is 100k steps of batch 8 = 800k images (about 47 PFLOP): its wall time is projected
at the measured step time at batch 8, and at the best batch for the same 800k images.

On a machine without CUDA it runs a tiny shape (DiT-T, a test ResNet, 8x8 latents) as a smoke test.

    python bench/gpu.py                      # on the GPU machine: one script, ~6-8 minutes on an H100
    python bench/gpu.py --compile            # also torch.compile at batch 8 and the best batch
    python bench/gpu.py --out gpu.json       # the table as JSON too
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cnd_ray import config as config_lib  # noqa: E402
from cnd_ray import engine  # noqa: E402

# Dense peaks, FLOP/s, by device name fragment and precision (fp32 = TF32 tensor cores).
PEAKS = {"H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
         "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
         "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}}
PAPER_IMAGES = 100_000 * 8
FAST_DIT_A100_STEPS_S = 0.84  # fast-DiT README: DiT-XL/2, batch 128, one A100, mixed precision


def _cfg(shape: str, joint: bool, precision: str, compile_: bool, cuda: bool) -> config_lib.Config:
    o = ["method.gamma_schedule=constant", "method.gamma=0.25"] if joint else ["method.gamma_schedule=off"]
    o += [f"train.mixed_precision={'no' if precision == 'fp32' else precision}", f"train.compile={compile_}"]
    if not cuda:  # the smoke shape
        return config_lib.load("debug", o + ["model.size=T", "classifier.backbone=test_resnet",
                                             "data.space=latent", "data.image_size=64"])
    if shape == "XL/2":
        o += ["model.size=XL", "model.patch_size=2"]
    return config_lib.load("paper", o)


def _runtime(precision: str, device: str) -> engine.Runtime:
    if precision == "fp32" or device == "cpu":
        return engine.Runtime()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return engine.Runtime(autocast=lambda: torch.autocast("cuda", dtype), scaler=scaler)


def _batch(cfg, n: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    return {"x": x.to(device), "y": torch.randint(0, 2, (n,), generator=g).to(device)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _flops(state, batch: dict, rt) -> float:
    """FLOPs of one step as the joint objective takes it: each branch counted once, weighted by how
    often it runs (gamma 0.25 denoised, 0.75 clean); the plain step has one branch."""
    from torch.utils.flop_counter import FlopCounterMode

    from cnd_ray.objective import coin

    cfg = state.cfg
    if not cfg.use_classifier:
        weights = {None: 1.0}
    else:  # steps whose shared coin picks each branch
        denoised = next(s for s in range(1000) if coin(cfg.train.seed, s) < cfg.method.gamma)
        clean = next(s for s in range(1000) if coin(cfg.train.seed, s) >= cfg.method.gamma)
        weights = {denoised: cfg.method.gamma, clean: 1 - cfg.method.gamma}
    total = 0.0
    for step, w in weights.items():
        if step is not None:
            state.step = step
        with FlopCounterMode(display=False) as fc:
            engine.train_step(state, [batch], rt)
        total += w * fc.get_total_flops()
    return total


def measure(shape: str, joint: bool, precision: str, batch: int, device: str, steps: int,
            compile_: bool = False) -> dict | None:
    """One (shape, step, precision, batch) point; None when it does not fit in memory."""
    cuda = device == "cuda"
    cfg = _cfg(shape, joint, precision, compile_, cuda)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    state = None
    try:
        state = engine.build_state(cfg, device)
        if compile_:
            state.dit.compile()
        rt = _runtime(precision, device)
        b = _batch(cfg, batch, device)
        flops = _flops(state, b, rt)
        for _ in range(3 if not compile_ else 6):  # warm-up (and compilation)
            engine.train_step(state, [b], rt)
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            engine.train_step(state, [b], rt)
        _sync(device)
        dt = (time.perf_counter() - t) / steps
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        del state
        if cuda:
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((p[precision] for k, p in PEAKS.items() if k in name), None)
    return {"shape": shape, "step": "joint" if joint else "plain", "precision": precision, "batch": batch,
            "compile": compile_, "step_s": dt, "images_s": batch / dt, "tflops": flops / dt / 1e12,
            "mfu": (flops / dt / peak) if peak else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
            "gflop_per_image": flops / batch / 1e9}


def sweep(shape: str, joint: bool, precision: str, device: str, steps: int, batches) -> list[dict]:
    """Doubling batches until one does not fit (its row says so)."""
    rows = []
    for n in batches:
        r = measure(shape, joint, precision, n, device, steps)
        if r is None:
            rows.append({"shape": shape, "step": "joint" if joint else "plain", "precision": precision,
                         "batch": n, "oom": True})
            break
        rows.append(r)
        print(_line(r), flush=True)
    return rows


def _line(r: dict) -> str:
    if r.get("oom"):
        return f"| {r['shape']} | {r['step']} | {r['precision']} | {r['batch']} | out of memory | | | | |"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
    tag = " (compiled)" if r["compile"] else ""
    return (f"| {r['shape']} | {r['step']}{tag} | {r['precision']} | {r['batch']} | {r['images_s']:.1f} | "
            f"{1e3 * r['step_s']:.1f} | {r['tflops']:.1f} | {mfu} | {mem} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per point (after warm-up)")
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--precisions", default="bf16,fp16,fp32")
    ap.add_argument("--compile", action="store_true", help="also torch.compile (bf16, joint) at batch 8 and the best batch")
    ap.add_argument("--out", default="", help="write every row as JSON here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    precisions = args.precisions.split(",") if cuda else ["fp32"]
    batches = [8 * 2 ** i for i in range(int(math.log2(args.max_batch // 8)) + 1)] if cuda else [2, 4]
    steps = args.steps if cuda else 2
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (smoke shape: DiT-T, test ResNet, 8x8x4)'}; "
          f"torch {torch.__version__}")
    print("| shape | step | precision | batch | images/s | ms/step | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for precision in precisions:
        for joint in (False, True):
            rows += sweep("L/4" if cuda else "smoke", joint, precision, device, steps, batches)
    ok = [r for r in rows if not r.get("oom")]

    def at(step, precision, batch):
        return next((r for r in ok if r["step"] == step and r["precision"] == precision and r["batch"] == batch), None)

    print("\njoint / plain step time (goal <= 1.15):")
    for precision in precisions:
        for r in [r for r in ok if r["step"] == "joint" and r["precision"] == precision]:
            p = at("plain", precision, r["batch"])
            if p:
                print(f"  {precision} batch {r['batch']}: {r['step_s'] / p['step_s']:.3f}")
    best_p = precisions[0]
    joint = [r for r in ok if r["step"] == "joint" and r["precision"] == best_p]
    if joint:
        small, best = joint[0], max(joint, key=lambda r: r["images_s"])
        if args.compile and cuda:
            for n in sorted({small["batch"], best["batch"]}):
                r = measure("L/4", True, best_p, n, device, steps, compile_=True)  # cuda only
                if r:
                    print(_line(r), flush=True)
                    rows.append(r)
                    ok.append(r)
            compiled = [r for r in ok if r["compile"]]
            small = min([small] + [r for r in compiled if r["batch"] == small["batch"]], key=lambda r: r["step_s"])
            best = max(joint + compiled, key=lambda r: r["images_s"])
        print(f"\nthe paper's run ({PAPER_IMAGES:,} images, joint step, {best_p}), projected on this device:")
        for r in (small, best):
            print(f"  batch {r['batch']}{' compiled' if r['compile'] else ''}: {PAPER_IMAGES / r['images_s'] / 60:.1f} "
                  f"minutes ({PAPER_IMAGES // r['batch']:,} steps of {1e3 * r['step_s']:.1f} ms); "
                  f"{r['gflop_per_image'] * PAPER_IMAGES / 1e6:.1f} PFLOP in all")
    if cuda:
        r = measure("XL/2", False, best_p, 128, device, steps)
        if r:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(f"\nDiT-XL/2 plain step, batch 128, {best_p}: {1 / r['step_s']:.2f} steps/s "
                  f"(fast-DiT on one A100: {FAST_DIT_A100_STEPS_S}); MFU {mfu}")
            rows.append(r)
        else:
            print("\nDiT-XL/2 plain step, batch 128: out of memory")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "rows": rows}))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
