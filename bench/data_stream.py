"""Does the Ray Data stream keep up with training at the quickstart config?

Measured side by side in one run, on synthetic shards at the config's resolution:
  stream  - batches/s the stream delivers with nothing else running
  train   - joint Class-N-Diff steps/s on a fixed in-memory batch (no data loading at all)
  loop    - the real thing: stream + train_step, and the share of time blocked on the next batch
Target (issue 3): the loop's data-wait share stays under 5%.

Run: python bench/data_stream.py [--config quickstart] [--images 1000] [--steps 150]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from cnd_ray import config as config_lib
from cnd_ray import engine
from cnd_ray.data import augment, synth
from cnd_ray.launch import ingest, stream


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        base = config_lib.load(args.config)
        synth.run(os.path.join(tmp, "synth"), num_images=args.images,
                  image_size=max(64, base.data.image_size), test_per_tone=0, progress=False)
        ingest.run([os.path.join(tmp, "synth")], os.path.join(tmp, "shards"),
                   image_size=base.data.image_size, progress=False)
        cfg = config_lib.override(base, {"data.shards": os.path.join(tmp, "shards"), "data.space": "pixel"})
        # as many epochs as the bench can consume (an epoch is a few dozen batches here)
        per_epoch = max(1, args.images * 9 // 10 // cfg.per_worker_batch)
        ds = stream.dataset(cfg, "train", epochs=(0, 4 * args.steps // per_epoch + 4))
        gen = torch.Generator().manual_seed(0)

        it = stream.batches(ds, cfg)
        next(it)  # start-up (Ray Data workers, first file) is not steady state
        t = time.perf_counter()
        for _ in range(args.steps):
            augment.model_batch(next(it), cfg, gen)
        stream_bps = args.steps / (time.perf_counter() - t)
        fixed = augment.model_batch(next(it), cfg, gen)
        it.close()  # finish the iterator while Ray is still up

        state = engine.build_state(cfg, torch.device("cpu"))
        engine.train_step(state, [fixed])  # warm-up
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.train_step(state, [fixed])
        train_sps = args.steps / (time.perf_counter() - t)

        wait = stream.DataWait()
        it = stream.batches(ds, cfg, wait)
        engine.train_step(state, [augment.model_batch(next(it), cfg, gen)])
        wait.seconds = 0.0
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.train_step(state, [augment.model_batch(next(it), cfg, gen)])
        loop = time.perf_counter() - t
        it.close()
    share = wait.seconds / loop
    print(f"\nconfig {args.config}: batch {cfg.per_worker_batch} x {cfg.in_channels}x{cfg.input_size}^2, "
          f"{args.images} synthetic images")
    print(f"{'stream alone':32s} {stream_bps:8.1f} batches/s")
    print(f"{'train step alone':32s} {train_sps:8.1f} steps/s")
    print(f"{'headroom (stream / train)':32s} {stream_bps / train_sps:8.1f}x")
    print(f"{'loop: data-wait share':32s} {100 * share:8.2f} %   (target < 5 %)")
    print(json.dumps({"config": args.config, "stream_batches_s": round(stream_bps, 2),
                      "train_steps_s": round(train_sps, 2), "headroom": round(stream_bps / train_sps, 2),
                      "loop_steps_s": round(args.steps / loop, 2), "data_wait_share": round(share, 4)}),
          flush=True)  # Ray's shutdown may end the process without flushing stdout
    ray.shutdown()


if __name__ == "__main__":
    main()
