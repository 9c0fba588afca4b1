"""The MLflow UI: `cnd-ray ui`'s server, the pages it prints, and a search's saved view."""
from __future__ import annotations

import json
import os
import subprocess
import time

from cnd_ray.errors import UserError
from cnd_ray.tracking.runs import Run
from cnd_ray.tracking.store import artifact_location, mlflow_client

RUNS_VIEW = "?workflowType=machine_learning"  # the runs table, not the GenAI landing view


VIEW_TAG = "cnd_ray.view"  # on a search's parent run: the key of its saved runs-table view
SHARED_VIEW = "mlflow.sharedViewState."  # + key: an experiment tag the UI restores a view from


def save_search_view(parent: Run, experiment: str, key: str, metric: str, ascending: bool,
                     varying: list[str], also: tuple[str, ...] = ()) -> None:
    """A runs-table view of a search, as MLflow's UI shares views (an experiment tag its URL names):
    sorted by the ranking metric, with it, the metrics `also` (quality beside fairness) and the keys
    the trials vary in as columns beside the dataset and model, so the trials compare at a glance
    without picking columns."""
    client = mlflow_client(parent.uri)
    exp = client.get_experiment_by_name(experiment)
    columns = ["attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`", f"metrics.`{metric}`",
               *[f"metrics.`{m}`" for m in also], *[f"params.`{k}`" for k in varying]]
    state = {"orderByKey": f"metrics.`{metric}`", "orderByAsc": ascending, "searchFilter": "",
             "selectedColumns": columns}
    client.set_experiment_tag(exp.experiment_id, SHARED_VIEW + key, json.dumps(state))
    parent.set_tags({VIEW_TAG: key})


def ui_urls(uri: str, base: str, experiment: str) -> dict[str, str]:
    """The UI pages a user opens for `experiment` in the store `uri`, served at `base`: "runs" (its
    runs table in the model-training view) and, after a search, "search" (that table in the latest
    search's saved view: its metric and varying keys as columns) and "parent" (the search's parent
    run); just the front page ("runs": base) while the experiment does not exist."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {"runs": f"{base}/"}
    runs = f"{base}/#/experiments/{exp.experiment_id}/runs"
    urls = {"runs": runs + RUNS_VIEW}
    latest = client.search_runs([exp.experiment_id], filter_string="tags.`cnd_ray.kind` = 'search'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if latest:
        key = latest[0].data.tags.get(VIEW_TAG)
        if key:
            urls["search"] = f"{runs}{RUNS_VIEW}&viewStateShareKey={key}"
        urls["parent"] = f"{runs}/{latest[0].info.run_id}{RUNS_VIEW}"
    return urls


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on the store at `uri`, from any directory."""
    return f"cnd-ray ui track.tracking_uri={uri}"


UI_WORKERS = 1  # one uvicorn process, no supervisor (see ui)
UI_WAIT = 300  # seconds `cnd-ray ui` waits for its server to answer before printing its pages anyway


def ui(uri: str, port: int, workers: int = UI_WORKERS) -> subprocess.Popen:
    """`mlflow ui` for the store at `uri`, bound to 127.0.0.1 (reach it through an SSH tunnel), in
    its own process group: it starts uvicorn (and, with job execution on, job-runner children),
    which stop_server ends with it.

    One uvicorn worker and no job runner, for a laptop that is training: MLflow's default of 4
    workers runs uvicorn's supervisor, which kills a worker that misses its 5 s health check; with a
    training and a sampling job on 2 cores every worker missed it, over and over, and the UI never
    answered (bench/ui_under_load.py). One worker has no supervisor, and one user browsing runs
    needs no more, and so it can run in one process instead of MLflow's two (serve.py: half the
    CPU to start). The job runner serves MLflow's GenAI jobs, which cnd_ray does not use; the access
    log would print every page load (and every health check)."""
    import sys

    # MLflow's `mlflow ui` command line, run with its uvicorn in the same process (serve.py)
    args = [sys.executable, "-m", "cnd_ray.tracking.serve", "ui", "--backend-store-uri", uri,
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
            "--uvicorn-opts", "--no-access-log"]
    art = artifact_location(uri)
    if art:
        args += ["--default-artifact-root", art]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # The server's log goes to stderr: stdout carries cnd-ray's own lines (the pages to open).
    return subprocess.Popen(args, start_new_session=True, env=env, stdout=2)


def wait_until_up(proc: subprocess.Popen, url: str, timeout: float, say=print,
                  since: float | None = None) -> float | None:
    """Seconds since `since` (a time.monotonic() taken when `proc` started; default now) until the
    server `proc` answers `url`/health; None if it has not `timeout` seconds after `since`. Raises
    UserError if it ends first. Says so, with the machine's load, every 30 s of waiting."""
    import urllib.request

    t0 = time.monotonic() if since is None else since
    next_say = t0 + 30
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise UserError(f"the MLflow UI server ended with code {proc.returncode} before answering "
                            f"{url} (its output is above)")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return time.monotonic() - t0
        except OSError:
            time.sleep(0.25)
        if time.monotonic() >= next_say:
            next_say += 30
            say(f"MLflow UI still starting after {time.monotonic() - t0:.0f} s (load average "
                f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return None


def stop_server(proc: subprocess.Popen) -> None:
    """End `ui`'s server and every process it started (terminating `mlflow ui` alone left its
    uvicorn workers and job consumers running): SIGTERM to the group, SIGKILL after 20 s."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader: a zombie keeps the group alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    proc.wait(timeout=10)
