"""What MLflow logging costs a training step (GUARANTEES 11: under 2%), side by side in one run.

The quickstart's training step (engine.train_step, one process) runs in alternating blocks with the
tracker a worker's rank 0 uses (tracking.MlflowTracker: batched, from a background thread, to a
local SQLite store here; a server on a cluster) and with the do-nothing tracker of the other ranks.
Metrics are logged at every step (the worst case; the shipped train.log_every is 50) and, in a
second pair, at the quickstart's log_every. Printed: median step time of each and their ratio.

    python bench/tracking_overhead.py            # ~1 minute on 2 cores
    python bench/tracking_overhead.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cnd_ray import config as config_lib  # noqa: E402
from cnd_ray import engine, tracking  # noqa: E402


def measure(cfg, tracker, every: int, steps: int, state, batch, start: int) -> list[float]:
    times = []
    for i in range(start, start + steps):
        t = time.perf_counter()
        m = engine.train_step(state, [batch])
        if i % every == 0:
            tracker.log(i, m)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="steps per block")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.blocks = 5, 2
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = config_lib.load("quickstart")
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(cfg.train.global_batch, cfg.in_channels, cfg.input_size, cfg.input_size,
                              generator=g), "y": torch.randint(0, 2, (cfg.train.global_batch,), generator=g)}
    state = engine.build_state(cfg)
    engine.train_step(state, [batch])  # warm-up
    out = {}
    with tempfile.TemporaryDirectory() as d:
        uri = f"sqlite:///{d}/mlflow.db"
        run, _ = tracking.start_run(uri, "bench", "overhead", cfg.flat(), {})
        on, off = tracking.MlflowTracker(uri, run.id), tracking.Tracker()
        step = 1
        for every in (1, cfg.train.log_every):
            times = {"on": [], "off": []}
            for _ in range(args.blocks):  # alternate, so drift hits both alike
                for name, tracker in (("on", on), ("off", off)):
                    times[name] += measure(cfg, tracker, every, args.steps, state, batch, step)
                    step += args.steps
            med = {k: statistics.median(v) for k, v in times.items()}
            out[every] = {"on_s": med["on"], "off_s": med["off"], "ratio": med["on"] / med["off"]}
            print(f"logging every {every} step(s): tracking on {1e3 * med['on']:.2f} ms/step, "
                  f"off {1e3 * med['off']:.2f} ms/step, on / off {med['on'] / med['off']:.3f} (goal <= 1.02)")
        on.close()
        logged = len(tracking.mlflow_client(uri).get_metric_history(run.id, "loss_diff"))
        print(f"loss_diff values in MLflow: {logged}")
    print(json.dumps({"log_every": out, "logged": logged}))


if __name__ == "__main__":
    main()
