"""What does the Ray Train path cost? One Ray Train worker vs a plain single-process PyTorch loop.

Same config (quickstart by default), same shards, same number of steps, measured in one run:
  plain - engine.train_step in this process on batches decoded from the shards into memory
  ray   - `cnd-ray train` (train.run): TorchTrainer, 1 worker, accelerate, Ray Data stream, MLflow;
          steady-state images/s from the worker's logged windows (start-up excluded)
Target (issue 4): ray / plain >= 0.90 on CPU.

Run: python bench/ray_overhead.py [--config quickstart] [--steps 150]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from cnd_ray import config as config_lib
from cnd_ray import engine
from cnd_ray.launch import train
from cnd_ray.data import augment, image, shardset


def plain_images_per_s(cfg, steps: int) -> float:
    m = shardset.read_manifest(cfg.data.shards)
    files = shardset.files(cfg.data.shards, m, "train")
    table = pq.read_table(files, columns=["image", "label", "fitzpatrick", "row_id"])
    imgs = torch.from_numpy(np.stack([image.decode_png(b) for b in table.column("image").to_pylist()]))
    imgs = imgs.permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S) uint8
    labels = torch.tensor(table.column("label").to_pylist())
    state = engine.build_state(cfg)
    g = torch.Generator().manual_seed(0)
    b = cfg.train.global_batch

    def batch():
        idx = torch.randint(0, len(labels), (b,), generator=g)
        return augment.model_batch({"image": imgs[idx], "label": labels[idx], "row_id": idx,
                                    "tone": torch.zeros(b, dtype=torch.long)}, cfg)

    for _ in range(5):
        engine.train_step(state, [batch()])
    t = time.perf_counter()
    for _ in range(steps):
        engine.train_step(state, [batch()])
    return steps * b / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        window = max(10, args.steps // 6)
        cfg = config_lib.load(args.config, [
            f"train.storage={tmp}/runs", f"track.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"train.steps={args.steps}", f"train.log_every={window}", f"train.checkpoint_every={args.steps}",
            "train.synthetic_images=1000"])
        out = train.run(cfg)
        from mlflow.tracking import MlflowClient

        hist = MlflowClient(f"sqlite:///{tmp}/mlflow.db").get_metric_history(out["mlflow_run_id"], "images_per_s")
        ray_ips = float(np.mean([m.value for m in sorted(hist, key=lambda m: m.step)[1:]]))  # skip start-up
        shards = os.path.join(tmp, "runs", "data", f"synthetic-1000-{cfg.data.image_size}px")
        plain_ips = plain_images_per_s(config_lib.override(cfg, {"data.shards": shards}), args.steps)
    print(f"\nconfig {args.config}, {args.steps} steps, global batch {cfg.train.global_batch}")
    print(f"{'plain PyTorch loop':28s} {plain_ips:8.1f} images/s")
    print(f"{'Ray Train, 1 worker':28s} {ray_ips:8.1f} images/s")
    print(f"{'ratio (target >= 0.90)':28s} {ray_ips / plain_ips:8.3f}")
    print(json.dumps({"config": args.config, "steps": args.steps, "plain_img_s": round(plain_ips, 2),
                      "ray_img_s": round(ray_ips, 2), "ratio": round(ray_ips / plain_ips, 3)}), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
