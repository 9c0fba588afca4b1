"""A server away at start: the run logs to an MLflow store in its folder (the spool), uploaded
when the server answers (GUARANTEES 11-12); at a URI, through a local working copy."""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

from cnd_ray import storage
from cnd_ray.tracking.runs import find_run, log_inputs, start_run
from cnd_ray.tracking.store import PARENT_TAG, RUN_NAME_TAG, mlflow_client, reachable

SPOOL = "mlflow-spool"  # in the run's folder: a local MLflow store (mlflow.db) and server.txt
UPLOAD_EVERY_S = 30.0  # how often a spooling run asks whether its server answers again
PUSH_EVERY_S = 10.0  # how often rank 0 copies a spool kept at a URI to that storage


def _spool(run_dir: str, *names: str) -> str:
    return storage.join(run_dir, SPOOL, *names)


_copies: dict[tuple[str, str], Path] = {}  # (run folder, who) -> this process's latest working copy


def _fresh_copy(run_dir: str, who: str) -> Path:
    """A new local file for this process's working copy of the spool store of a folder at a URI:
    SQLite needs a local file; every writer (the driver, rank 0 of a run, the uploader: `who`)
    keeps its own; and each pull is a new file, because MLflow keeps its connections to a store
    open (a file replaced under them would be written through the old one). The previous copy goes."""
    drop_copy(run_dir, who)
    folder = Path(tempfile.mkdtemp(prefix=f"cnd_ray-spool-{os.getpid()}{who}-"))
    _copies[run_dir, who] = folder / "mlflow.db"
    return folder / "mlflow.db"


def drop_copy(run_dir: str, who: str) -> None:
    old = _copies.pop((run_dir, who), None)
    if old:
        shutil.rmtree(old.parent, ignore_errors=True)


def spool_uri(run_dir: str, server: str, children: str | None = None) -> str:
    """The MLflow store a run (or a search) in `run_dir` logs to while `server` is away, noting the
    server (and, for a search, the folder of its trials' runs, each with its own spool). In a local
    folder it is the spool itself; at a URI, this process's working copy, which `push_spool` copies
    there (artifacts go to the storage directly: see `spool_artifacts`)."""
    storage.write_text(_spool(run_dir, "server.txt"), server + "\n")
    if children:
        storage.write_text(_spool(run_dir, "children.txt"), children + "\n")
    if not storage.is_uri(run_dir):
        return f"sqlite:///{os.path.abspath(_spool(run_dir, 'mlflow.db'))}"
    return pull_spool(run_dir)


def spool_artifacts(run_dir: str) -> str:
    """Where a spooled run's artifacts go: beside the spool's database, in the run's storage."""
    where = _spool(run_dir, "mlartifacts")
    return where if storage.is_uri(where) else Path(where).absolute().as_uri()


def pull_spool(run_dir: str, who: str = "") -> str:
    """The spool store of `run_dir` to log to or read: at a URI, a fresh working copy of what the
    storage holds (none yet: an empty one)."""
    if not storage.is_uri(run_dir):
        return f"sqlite:///{os.path.abspath(_spool(run_dir, 'mlflow.db'))}"
    local = _fresh_copy(run_dir, who)
    if storage.is_file(_spool(run_dir, "mlflow.db")):
        storage.download(_spool(run_dir, "mlflow.db"), str(local))
    return f"sqlite:///{local}"


def push_spool(run_dir: str, uri: str) -> None:
    """Copy the working copy `uri` of a URI folder's spool to its storage (a consistent snapshot,
    by SQLite's backup); nothing to do in a local folder, where the spool is the store itself."""
    if not storage.is_uri(run_dir):
        return
    import sqlite3

    db = uri[len("sqlite:///"):]
    snap = f"{db}.snap"
    src, dst = sqlite3.connect(db), sqlite3.connect(snap)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    storage.upload(snap, _spool(run_dir, "mlflow.db"))
    os.remove(snap)


def spool_server(run_dir: str) -> str | None:
    """The server the spool in `run_dir` waits for, or None without a spool: one small read, where
    `spooled` also fetches the store (a download at a URI)."""
    if not storage.is_file(_spool(run_dir, "mlflow.db")):
        return None
    return storage.read_text(_spool(run_dir, "server.txt")).strip()


def spooled(run_dir: str, who: str = "") -> tuple[str, str] | None:
    """(spool store URI, the server it waits for) when `run_dir` holds a spool, else None (`who`:
    which of this process's working copies, for a spool at a URI)."""
    server = spool_server(run_dir)
    return None if server is None else (pull_spool(run_dir, who), server)


def sync(spool: str, server: str, experiment: str, run_name: str, parent: str | None = None) -> str:
    """Copy the run `run_name` from the spool store into `server`: params, tags, dataset inputs, every
    metric value the server does not hold yet (by key and step), artifacts it does not have, and the status;
    `parent`: the server's id of its parent run (a search's trial). Idempotent, so an upload cut
    short and repeated stores each value exactly once. Returns the server's run id."""
    src = mlflow_client(spool)
    run_id = find_run(spool, experiment, run_name)
    if run_id is None:
        raise ValueError(f"{spool} holds no run named {run_name}")
    run = src.get_run(run_id)
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    tags.pop(RUN_NAME_TAG, None)
    if parent:
        tags[PARENT_TAG] = parent
    dest, _ = start_run(server, experiment, run_name, run.data.params, tags)
    dest_id = dest.id
    dst = mlflow_client(server)
    from mlflow.entities import Metric

    for key in run.data.metrics:
        have = {m.step for m in dst.get_metric_history(dest_id, key)}
        new = [Metric(m.key, m.value, m.timestamp, m.step) for m in src.get_metric_history(run_id, key)
               if m.step not in have]
        for i in range(0, len(new), 1000):
            dst.log_batch(dest_id, metrics=new[i:i + 1000])
    dest.set_tags(tags)
    log_inputs(dst, dest_id, run.inputs.dataset_inputs)
    have = set(_artifact_paths(dst, dest_id))
    with tempfile.TemporaryDirectory() as d:
        for path in _artifact_paths(src, run_id):
            if path not in have:
                local = src.download_artifacts(run_id, path, d)
                dst.log_artifact(dest_id, local, os.path.dirname(path) or None)
    if run.info.status != "RUNNING":
        dst.set_terminated(dest_id, status=run.info.status)
    return dest_id


def _artifact_paths(client, run_id: str, folder: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, folder):
        out += _artifact_paths(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def spool_runs(spool: str) -> list[tuple[str, str]]:
    """(experiment, run name) of every run a spool store holds, parents (a search's) first."""
    client = mlflow_client(spool)
    out = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            if RUN_NAME_TAG in run.data.tags:
                out.append((PARENT_TAG in run.data.tags, exp.name, run.data.tags[RUN_NAME_TAG]))
    return [(exp, name) for _, exp, name in sorted(out)]


def _name_in(client, run_id: str | None) -> str | None:
    """The cnd_ray run name of `run_id` in the store of `client`, None when it is not there."""
    try:
        return client.get_run(run_id).data.tags.get(RUN_NAME_TAG) if run_id else None
    except Exception:  # a trial's spool names its search's run, which lives in another spool
        return None


def upload(run_dir: str, parent: str | None = None, to: str | None = None, keep: bool = False,
           who: str = "") -> tuple[str, dict[str, str]] | None:
    """Upload the spool in `run_dir` (a run's or a search's folder) to its server and remove it:
    (the server, {run name: its id there}), or None while the server does not answer. A search's
    trials, each spooled in its own run folder, follow its parent run and stay its children.
    `parent`: the server's id of the run that the runs of this spool are children of; `to`: a
    server other than the one the spool waits for; `keep`: upload what is there so far and keep
    the spool (the runs go on: `sync` stores each value once however often it runs)."""
    server = to or spool_server(run_dir)
    if not reachable(server):  # asked before the store is fetched: no download while it is away
        return None
    return server, _upload(run_dir, pull_spool(run_dir, who), server, parent, keep, who)


def _upload(run_dir: str, spool: str, server: str, parent: str | None, keep: bool, who: str) -> dict:
    client, ids = mlflow_client(spool), {}
    for experiment, name in spool_runs(spool):
        up = client.get_run(find_run(spool, experiment, name)).data.tags.get(PARENT_TAG)
        ids[name] = sync(spool, server, experiment, name, ids.get(_name_in(client, up)) or (up and parent))
    children = _spool(run_dir, "children.txt")
    if storage.is_file(children):
        (top,) = ids.values()  # a search's spool holds its parent run only
        folder = storage.read_text(children).strip()
        for sub in storage.subfolders(folder):
            left = spooled(storage.join(folder, sub), who)
            if left:
                ids.update(_upload(storage.join(folder, sub), left[0], server, top, keep, who))
    if not keep:
        drop_spool(run_dir)
    return ids


def drop_spool(run_dir: str) -> None:
    storage.remove_dir(_spool(run_dir))
    for who in [w for d, w in _copies if d == run_dir]:
        drop_copy(run_dir, who)


class SpoolUploader:
    """While a run or a search logs to its spool: every `every` s, once the server answers, upload
    what the spool (a search's: and its trials') holds so far, keeping it."""

    def __init__(self, run_dir: str, server: str, every: float = 0.0):
        self.run_dir, self.server = run_dir, server
        self.every, self.uploads = every or UPLOAD_EVERY_S, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            try:
                if not upload(self.run_dir, to=self.server, keep=True, who="-upload"):
                    continue
            except Exception:  # a refused login (the end says so, once); the server went away
                continue       # again mid-upload: the next round
            if not self.uploads:
                print(f"MLflow at {self.server} answers again: uploading the metrics as they come",
                      flush=True)
            self.uploads += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for d, w in list(_copies):
            if w == "-upload":
                drop_copy(d, w)
