"""How should a search run its CPU trials? One at a time with all cores each, or side by side?

The same two-trial search (settings 3 and 4 of paper_settings, quickstart config) three ways, in one
run, on one local Ray:
  sequential - max_concurrent_trials 1, each worker on all of the node's cores
  oversubscribed - 2 at a time, each worker still on all cores (what happens without care)
  shared - 2 at a time, the cores split between them (what `cnd-ray tune` does by default)
Reported: wall seconds of each search (data made once beforehand) and the speed-ups.

Run: python bench/tune_concurrency.py [--steps 300]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

SPACE = """search: grid
metric: val_loss_diff
max_concurrent_trials: {n}
settings:
  "3": {{method.gamma_schedule: periodic_ramp, method.lambda_cls: 0.2, classifier.step_every: 3}}
  "4": {{method.gamma_schedule: periodic_ramp, method.lambda_cls: 0.2, classifier.step_every: 1}}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    import ray

    from cnd_ray import config as config_lib
    from cnd_ray.launch import train, tune

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    cores = os.cpu_count() or 1
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = config_lib.load("quickstart", [
            f"train.storage={tmp}/runs", f"track.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}",
            f"train.eval_every={args.steps}", f"train.log_every={args.steps}"])
        base = train.with_shards(base)  # made once, outside the timings
        for name, n, threads in (("sequential", 1, 0), ("oversubscribed", 2, cores), ("shared", 2, 0)):
            path = os.path.join(tmp, f"{name}.yaml")
            with open(path, "w") as f:
                f.write(SPACE.format(n=n))
            cfg = config_lib.override(base, {"scale.threads_per_worker": threads})
            t = time.perf_counter()
            result = tune.run(path, cfg)
            out[name] = time.perf_counter() - t
            assert all(r["status"] == "finished" for r in result["rows"]), result["table"]
    print(f"\n2 trials x {args.steps} steps (quickstart), {cores} cores")
    for name, secs in out.items():
        print(f"{name:16s} {secs:7.1f} s   speed-up vs sequential {out['sequential'] / secs:5.2f}")
    print(json.dumps({"steps": args.steps, "cores": cores, **{k: round(v, 1) for k, v in out.items()},
                      "shared_speedup": round(out["sequential"] / out["shared"], 3),
                      "oversubscribed_speedup": round(out["sequential"] / out["oversubscribed"], 3)}))
    ray.shutdown()


if __name__ == "__main__":
    main()
