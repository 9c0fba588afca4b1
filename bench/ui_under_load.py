"""How long `cnd-ray ui`'s server takes to answer on a laptop that is training, side by side in one
run: MLflow's default server (4 uvicorn workers under a supervisor that kills a worker missing its
5 s health check, plus the GenAI job runner), `mlflow ui` with one worker and no job runner (two
processes: MLflow's CLI, then uvicorn importing MLflow again), and the server cnd_ray starts
(tracking.ui: the same, with uvicorn in the CLI's process - tracking/serve.py).

The load: a quickstart-scale training (`cnd-ray train --config quickstart`, synthetic shards, no
judge) on a local Ray, logging to the store the UI serves, plus --burners CPU-bound processes (a
sampling job or a bench beside it). The servers start in rotating order, --repeats times each, on a
fresh port; each gets --cap seconds. Printed: seconds to the first answer of /health (or "no
answer"), medians and their ratios to cnd-ray ui's.

    python bench/ui_under_load.py                 # one training beside it, ~8 minutes on 2 cores
    python bench/ui_under_load.py --burners 4     # a training and 4 busy processes
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cnd_ray import tracking  # noqa: E402

BURN = "import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\nwhile True:\n    a = (a @ a).tanh()\n"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_ui(uri: str, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
                             "127.0.0.1", "--port", str(port), *extra], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def mlflow_default(uri: str, port: int) -> subprocess.Popen:
    """`mlflow ui` as MLflow ships it: 4 workers, job execution on."""
    return _mlflow_ui(uri, port)


def mlflow_one_worker(uri: str, port: int) -> subprocess.Popen:
    """`mlflow ui` as cnd_ray started it before serve.py: one worker, no job runner, two processes."""
    return _mlflow_ui(uri, port, "--workers", "1", env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


def time_to_answer(start, uri: str, cap: float) -> float | None:
    port = _port()
    proc = start(uri, port)
    try:
        return tracking.wait_until_up(proc, f"http://127.0.0.1:{port}", timeout=cap, say=lambda m: None)
    except Exception:  # the server died (a store race, a crash): no answer
        return None
    finally:
        tracking.stop_server(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--burners", type=int, default=0, help="CPU-bound processes beside the training")
    ap.add_argument("--cap", type=float, default=90.0, help="seconds each server gets to answer")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        uri = f"sqlite:///{d}/mlflow.db"
        tracking.start_run(uri, "cnd_ray", "made-before", {}, {})  # the store exists, as a user's does
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        load = [subprocess.Popen(
            [sys.executable, "-m", "cnd_ray", "train", "--config", "quickstart", "train.steps=1000000",
             f"train.storage={d}/runs", f"track.tracking_uri={uri}", "eval.sample_metrics=false",
             "fairness.in_loop=off", "train.synthetic_images=200"],
            stdout=open(f"{d}/train.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)]
        load += [subprocess.Popen([sys.executable, "-c", BURN], start_new_session=True)
                 for _ in range(args.burners)]
        try:
            t0 = time.time()
            while "[cnd-ray] step " not in open(f"{d}/train.log").read():  # its first progress line: training
                if load[0].poll() is not None or time.time() - t0 > 600:
                    sys.exit("the training did not start:\n" + open(f"{d}/train.log").read()[-2000:])
                time.sleep(2)
            print(f"load: a quickstart training (started in {time.time() - t0:.0f} s) + {args.burners} "
                  f"busy processes on {os.cpu_count()} cores", flush=True)
            got = {"mlflow default (4 workers, job runner)": [], "mlflow ui, 1 worker (2 processes)": [],
                   "cnd-ray ui (1 worker, 1 process)": []}
            starts = dict(zip(got, (mlflow_default, mlflow_one_worker, tracking.ui)))
            names = list(got)
            for i in range(args.repeats):
                for name in names[i % 3:] + names[:i % 3]:
                    s = time_to_answer(starts[name], uri, args.cap)
                    got[name].append(s)
                    print(f"  {name}: {'no answer' if s is None else f'{s:.1f} s'} "
                          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            for p in load:
                os.killpg(p.pid, signal.SIGTERM)
            for p in load:
                p.wait(timeout=120)
    med = {}
    for name, xs in got.items():
        ok = [x for x in xs if x is not None]
        med[name] = statistics.median(ok) if ok else None
        print(f"{name}: answered {len(ok)}/{len(xs)} within {args.cap:.0f} s; median "
              f"{'-' if med[name] is None else f'{med[name]:.1f} s'}")
    ours = med[names[-1]]
    for name in names[:-1]:
        if med[name] and ours:
            print(f"{name} / cnd-ray ui: {med[name] / ours:.2f}x")


if __name__ == "__main__":
    main()
