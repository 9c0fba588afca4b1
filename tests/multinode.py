"""Multi-node scenarios on a simulated Ray cluster (ray.cluster_utils.Cluster: a head and extra
raylets on this machine, each with its own node id and declared CPUs), run in a child process so
the test session's own local Ray is untouched:

    python -m tests.multinode {train-losing-a-node,tune-on-two-nodes} FOLDER

Each prints one line "RESULT <json>" with what the test checks.
"""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from cnd_ray import config as C
from cnd_ray.launch import identity, train, tune
from tests.helpers import wait_for


def _cluster(head_cpus: float, node_cpus: list[float]):
    """A head like cluster/aws.yaml's (drivers, few CPUs) and worker nodes."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus})
    nodes = [cluster.add_node(num_cpus=c) for c in node_cpus]
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    ray.data.DataContext.get_current().enable_progress_bars = False
    return cluster, nodes


def _cfg(folder: Path, overrides: dict):
    base = {"train.storage": str(folder / "runs"), "track.tracking_uri": f"sqlite:///{folder}/mlflow.db",
            "scale.threads_per_worker": 1, **overrides}
    return C.load("debug", [f"{k}={v}" for k, v in base.items()])


def mlflow_client(folder: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{folder}/mlflow.db")


def train_losing_a_node(folder: Path) -> dict:
    """2 workers on 2 different nodes; once the first checkpoint is stored, rank 0's node dies
    (no graceful shutdown). Ray Train restarts the worker group on the nodes left, from the
    checkpoint, and the run finishes."""
    cluster, nodes = _cluster(0, [1, 1, 1])
    cfg = _cfg(folder, {"train.name": "lose-a-node", "train.steps": 320, "train.checkpoint_every": 40,
                        "train.log_every": 10, "train.max_failures": 2, "scale.num_workers": 2,
                        "train.log_rows": True,
                        "scale.placement_strategy": "STRICT_SPREAD"})
    out: dict = {}

    def fit():
        try:
            out["result"] = train.run(cfg)
        except Exception as e:  # reported to the test, which fails on it
            out["error"] = repr(e)

    th = threading.Thread(target=fit)
    th.start()
    # Once Ray Train has recorded a checkpoint (its snapshot, which a restart resumes from): a
    # checkpoint folder on disk alone is not enough, since under load the controller registered
    # it later, and a node lost in between restarted the group from step 0.
    run_dir = str(folder / "runs" / "lose-a-node")
    assert wait_for(lambda: identity.latest_checkpoint(run_dir) or not th.is_alive(), timeout=600), "no checkpoint"
    client = mlflow_client(folder)
    run = client.search_runs([client.get_experiment_by_name("cnd_ray").experiment_id])[0]
    before = run.data.tags["worker_nodes"].split(",")
    victim = next(n for n in nodes if n.node_id == before[0])
    cluster.remove_node(victim, allow_graceful=False)
    th.join(timeout=900)
    run = client.get_run(run.info.run_id)
    result = {"error": out.get("error"), "before": before, "removed": victim.node_id,
              "after": run.data.tags["worker_nodes"].split(","), "status": run.info.status,
              "final": out.get("result", {}).get("checkpoint"),
              "steps": [m.step for m in client.get_metric_history(run.info.run_id, "loss_diff")],
              "alive": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])}
    ray.shutdown()
    cluster.shutdown()
    return result


def tune_on_two_nodes(folder: Path) -> dict:
    """Two trials of one 1.5-CPU worker each on two 2-CPU nodes: no node fits two workers and the
    head (1 CPU: drivers and data tasks, as on cluster/aws.yaml) fits none, so each trial's worker
    has to go to its own node."""
    cluster, nodes = _cluster(1, [2, 2])
    space = folder / "space.yaml"
    space.write_text("search: grid\nmetric: val_loss_diff\nmode: min\nmax_concurrent_trials: 2\n"
                     "resources: {scale.num_workers: 1, scale.cpus_per_worker: 1.5}\n"
                     "settings:\n  '1': {method.lambda_cls: 0.1}\n  '2': {method.lambda_cls: 0.3}\n")
    res = tune.run(str(space), _cfg(folder, {"train.steps": 20}))
    client = mlflow_client(folder)
    exp = client.get_experiment_by_name("cnd_ray").experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{res['parent_run_id']}'")
    result = {"status": [r["status"] for r in res["rows"]],
              "trial_nodes": sorted(r.data.tags.get("worker_nodes", "") for r in children),
              "worker_nodes": sorted(n.node_id for n in nodes)}
    ray.shutdown()
    cluster.shutdown()
    return result


SCENARIOS = {"train-losing-a-node": train_losing_a_node, "tune-on-two-nodes": tune_on_two_nodes}

if __name__ == "__main__":
    print("RESULT " + json.dumps(SCENARIOS[sys.argv[1]](Path(sys.argv[2]))), flush=True)
