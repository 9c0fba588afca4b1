"""Time to quality: how long the quickstart model takes, under the old recipe and the new one, to draw
samples that show their class and look like the data.

The bar (issue 15, item 4), under the project's judge (cnd_ray/evaluate/judge.py):
    class-fidelity AUROC >= 0.95  and  FD in the judge's space <= 5 x the real-vs-real floor
measured the way training measures it (eval.search_samples per class from the EMA model with
eval.search_sampler, the same seeds each time), every --every images (so every 200 steps of the old
recipe's batch of 32, every 800 of the new one's 8). Each row also gives the share of samples that
show a lesion as the real images of their class do (judge.LESION_FRACTION), which the bar does not
include.

    old - the quickstart recipe before issue 15: DiT AdamW 5e-4, EMA 0.99, no clipping, uniform loss
          weighting, no guidance, a ResNet-18 critic, batches of 32
    new - cnd_ray/configs/quickstart.yaml as shipped

Both train the same setting (default 1, the plain conditional DiT: the paper's baseline; --setting
N for another of paper_settings) on the same shards, side by side in two processes with one thread
each, so they share the machine alike. Seconds are training seconds (evaluations excluded). A variant
stops at the bar or at its step budget; the last line is one JSON object with the steps and seconds
each took (or where each stood when its budget ran out) and the ratio old / new, a lower bound when
the old recipe never got there.

Run: python bench/time_to_quality.py [--shards DIR] [--old-steps 4000] [--new-steps 6400] [--every 6400]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time

OLD = ["optim.lr=5e-4", "optim.ema_decay=0.99", "optim.grad_clip=0", "optim.warmup_steps=0",
       "optim.ema_warmup=false", "diffusion.loss_weighting=uniform", "diffusion.guidance_scale=1.0",
       "classifier.backbone=resnet18", "train.global_batch=32"]
FIDELITY_BAR, RATIO_BAR = 0.95, 5.0


def _variant(name: str, overrides: list[str], shards: str, judge_file: str, steps: int, every: int,
             queue) -> None:
    """One recipe in its own process: train with engine.train_step on in-memory shards, measure at
    every `every` images, stop at the bar or the budget; results go to `queue`."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from cnd_ray import config as config_lib, engine, monitor
    from cnd_ray.data import augment, image, shardset
    from cnd_ray.evaluate import judge as judge_lib

    torch.set_num_threads(1)
    cfg = config_lib.load("quickstart", overrides + [f"data.shards={shards}"])
    m = shardset.read_manifest(shards)
    table = pq.read_table(shardset.files(shards, m, "train"), columns=["image", "label", "row_id"])
    imgs = torch.from_numpy(np.stack([image.decode_png(b) for b in table.column("image").to_pylist()]))
    imgs = imgs.permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S) uint8
    labels = torch.tensor(table.column("label").to_pylist())
    judge = judge_lib.load(judge_file)
    plan = monitor.sample_plan(cfg)
    state = engine.build_state(cfg)
    g = torch.Generator().manual_seed(0)
    b = cfg.train.global_batch
    every = max(1, every // b)  # images -> steps
    seconds, history = 0.0, []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(labels), (b,), generator=g)
        batch = augment.model_batch({"image": imgs[idx], "label": labels[idx], "row_id": idx}, cfg, g)
        t = time.perf_counter()
        engine.train_step(state, [batch])
        seconds += time.perf_counter() - t
        if step % every and step != steps:
            continue
        _, images = monitor.sample_images(state, plan)
        got = judge.measure(images, plan["label"], cfg.eval.kid_subsets)
        row = {"step": step, "seconds": round(seconds, 1), "fidelity_auroc": round(got["fidelity_auroc"], 4),
               "fd_judge": round(got["fd_judge"], 2), "fd_ratio": round(got["fd_ratio"], 2),
               "ms_ssim": round(got["ms_ssim"], 3), "lesion_share": round(got["lesion_share"], 3),
               **{k: round(v, 3) for k, v in got.items() if k.startswith("lesion_share_")}}
        history.append(row)
        queue.put(("row", name, row))
        if got["fidelity_auroc"] >= FIDELITY_BAR and got["fd_ratio"] <= RATIO_BAR:
            break
    queue.put(("done", name, history))


def _shards(folder: str) -> str:
    """The quickstart's synthetic shards (what `cnd-ray quickstart` trains on), made in `folder`."""
    import ray

    from cnd_ray import config as config_lib
    from cnd_ray.launch import train

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    cfg = config_lib.load("quickstart", [f"train.storage={folder}"])
    shards = train.with_shards(cfg).data.shards
    ray.shutdown()
    return shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="", help="ingested shards (default: the quickstart's synthetic set)")
    ap.add_argument("--old-steps", type=int, default=4000, help="the old recipe's step budget")
    ap.add_argument("--new-steps", type=int, default=6400, help="the new recipe's step budget")
    ap.add_argument("--every", type=int, default=6400, help="training images between measurements")
    ap.add_argument("--setting", default="1", help="which of paper_settings both recipes train")
    args = ap.parse_args()

    import torch

    from cnd_ray import config as config_lib
    from cnd_ray.launch import tune
    from cnd_ray.evaluate import judge as judge_lib

    tmp = tempfile.mkdtemp(prefix="time_to_quality_")
    shards = args.shards or _shards(tmp)
    space = tune.load_space("paper_settings", config_lib.load("quickstart"))
    setting = [f"{k}={v}" for k, v in space.settings[args.setting].items()]
    base = config_lib.load("quickstart", setting + [f"data.shards={shards}"])
    torch.set_num_threads(os.cpu_count() or 1)
    judge_file = os.path.join(tmp, "judge.pt")
    judge_lib.prepare(base, shards, judge_file)
    print(f"shards {shards}; setting {args.setting}; bar: fidelity AUROC >= {FIDELITY_BAR} and "
          f"FD <= {RATIO_BAR} x floor ({base.eval.search_samples} samples per class)", flush=True)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    recipes = {"old": (setting + OLD, args.old_steps), "new": (setting, args.new_steps)}
    procs = [ctx.Process(target=_variant, args=(k, over, shards, judge_file, steps, args.every, queue))
             for k, (over, steps) in recipes.items()]
    for p in procs:
        p.start()
    done: dict[str, list] = {}
    while len(done) < len(procs):
        kind, name, payload = queue.get()
        if kind == "row":
            print(f"{name:>4} " + " ".join(f"{k} {v}" for k, v in payload.items()), flush=True)
        else:
            done[name] = payload
    for p in procs:
        p.join()

    def summary(name: str) -> dict:
        hist = done[name]
        last = hist[-1]
        reached = last["fidelity_auroc"] >= FIDELITY_BAR and last["fd_ratio"] <= RATIO_BAR
        return {"reached": reached, "steps": last["step"], "seconds": last["seconds"],
                "budget_steps": recipes[name][1], "at_end": last}

    out = {"setting": args.setting, "bar": {"fidelity_auroc": FIDELITY_BAR, "fd_ratio": RATIO_BAR},
           "old": summary("old"), "new": summary("new")}
    if out["new"]["reached"]:
        out["speedup_seconds"] = round(out["old"]["seconds"] / out["new"]["seconds"], 2)
        out["speedup_is_lower_bound"] = not out["old"]["reached"]
    print(f"\n{'recipe':>6} | reached | steps | train s | fidelity | FD/floor | lesion shown\n" + "\n".join(
        f"{k:>6} | {v['reached']!s:>7} | {v['steps']:>5} | {v['seconds']:>7} | "
        f"{v['at_end']['fidelity_auroc']:>8} | {v['at_end']['fd_ratio']:>8} | {v['at_end']['lesion_share']:>12}"
        for k, v in out.items() if k in ("old", "new")))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
