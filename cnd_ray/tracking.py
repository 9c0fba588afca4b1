"""MLflow: the only module that imports it.

The driver opens (or, on resume, finds) one MLflow run per training run, keyed by the Ray run name,
and logs the flattened config as params. Rank 0 of the workers logs metrics and artifacts through a
`MlflowTracker` that batches in memory and flushes from a background thread, so logging is never on
the training step's path and a tracking-server outage only delays metrics: failed batches are kept
and retried. Other ranks get the do-nothing `Tracker` (house rule 8).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from cnd_ray import storage
from cnd_ray.errors import UserError

RUN_NAME_TAG = "cnd_ray.run_name"
PARENT_TAG = "mlflow.parentRunId"  # how MLflow nests a trial's run under its search's run
DEFAULT_DB = "mlflow.db"  # in the working directory, next to ./mlartifacts


def resolve_uri(uri: str) -> str:
    """The tracking URI to use, absolute: config, else $MLFLOW_TRACKING_URI, else ./mlflow.db.

    Resolved on the driver because Ray workers run in another working directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{os.path.abspath(DEFAULT_DB)}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{os.path.abspath(uri[len('sqlite:///'):])}"
    if not storage.is_uri(uri):  # a plain folder: MLflow's file store
        return Path(uri).absolute().as_uri()
    return uri


def _artifact_location(uri: str) -> str | None:
    """Local stores keep artifacts in ./mlartifacts beside the database, by absolute path."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent.joinpath("mlartifacts").as_uri()
    return None  # a server decides (and proxies artifacts, so workers need no credentials)


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# --- a server away at start: the run logs to a local spool, uploaded when the server answers -----

SPOOL = "mlflow-spool"  # in the run's folder: a local MLflow store (mlflow.db) and server.txt
PROBE_TIMEOUT_S = 5
UPLOAD_EVERY_S = 30.0  # how often a spooling run asks whether its server answers again
PUSH_EVERY_S = 10.0  # how often rank 0 copies a spool kept at a URI to that storage


def reachable(uri: str) -> bool:
    """Whether the tracking store at `uri` answers now: one request, no retries, 5 s at most
    (MLflow's own retries took 259 s to give up on a server that was not there). Local stores
    always answer. A plain HTTP request, not MLflow's client: its retries and timeout are process-
    wide environment variables, and setting them here (from the uploader's thread) once cut the
    caller's own MLflow requests to one 5 s try."""
    if not uri.startswith(("http://", "https://")):
        return True
    import base64
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
                                     data=json.dumps({"max_results": 1}).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S):
            return True
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # it answered: no
            raise UserError(f"track.tracking_uri: MLflow at {uri} refused the login (set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)") from None
        return False
    except (OSError, ValueError):  # refused, timed out, no such host
        return False


def _spool(run_dir: str, *names: str) -> str:
    return storage.join(run_dir, SPOOL, *names)


_copies: dict[tuple[str, str], Path] = {}  # (run folder, who) -> this process's latest working copy


def _fresh_copy(run_dir: str, who: str) -> Path:
    """A new local file for this process's working copy of the spool store of a folder at a URI:
    SQLite needs a local file; every writer (the driver, rank 0 of a run, the uploader: `who`)
    keeps its own; and each pull is a new file, because MLflow keeps its connections to a store
    open (a file replaced under them would be written through the old one). The previous copy goes."""
    _drop_copy(run_dir, who)
    folder = Path(tempfile.mkdtemp(prefix=f"cnd_ray-spool-{os.getpid()}{who}-"))
    _copies[run_dir, who] = folder / "mlflow.db"
    return folder / "mlflow.db"


def _drop_copy(run_dir: str, who: str) -> None:
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
    dest_id, _ = start_run(server, experiment, run_name, run.data.params, tags)
    dst = mlflow_client(server)
    from mlflow.entities import Metric

    for key in run.data.metrics:
        have = {m.step for m in dst.get_metric_history(dest_id, key)}
        new = [Metric(m.key, m.value, m.timestamp, m.step) for m in src.get_metric_history(run_id, key)
               if m.step not in have]
        for i in range(0, len(new), 1000):
            dst.log_batch(dest_id, metrics=new[i:i + 1000])
    set_tags(server, dest_id, tags)
    held = {i.dataset.digest for i in dst.get_run(dest_id).inputs.dataset_inputs}
    datasets = [i for i in run.inputs.dataset_inputs if i.dataset.digest not in held]
    if datasets:
        dst.log_inputs(dest_id, datasets=datasets)
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
        _drop_copy(run_dir, who)


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
                _drop_copy(d, w)


def start_run(uri: str, experiment: str, run_name: str, params: dict, tags: dict,
              artifacts: str | None = None) -> tuple[str, int]:
    """(run id, last logged step) of the MLflow run for `run_name`: the existing one on a resume.
    `artifacts`: where a new experiment keeps them (default: beside a local store's database)."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=artifacts or _artifact_location(uri), tags=EXPERIMENT_TAGS)
    run_id = find_run(uri, experiment, run_name)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        history = client.get_metric_history(run_id, "loss_diff")
        return run_id, max((m.step for m in history), default=-1)
    from mlflow.entities import Param

    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id, -1


def shards_digest(manifest: dict, split: str) -> str:
    """A digest of a split's contents (each shard file's sha256, the labelling and the size): two
    runs on the same shards show the same one, wherever the folder lives."""
    keep = {k: manifest.get(k) for k in ("label_mode", "ak_malignant", "image_size", "latent")}
    keep["files"] = sorted((s["file"], s["sha256"]) for s in manifest.get("shards", [])
                           if s.get("split", split) == split)
    keep["split"] = split
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def log_dataset(uri: str, run_id: str, shards: str, manifest: dict) -> None:
    """The run's shards as MLflow dataset inputs, one per split (its context): named by the folder,
    the source its path or URI, the digest its contents, the profile its counts per class and per
    skin-tone band. MLflow's Dataset column and the run's Inputs show them."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    client = mlflow_client(uri)
    have = {i.dataset.digest for i in client.get_run(run_id).inputs.dataset_inputs}
    profile = {"image_size": manifest.get("image_size"), "space": "latent" if manifest.get("latent") else "pixel",
               "label_mode": manifest.get("label_mode"), "skin_tones": manifest.get("skin_tones", {})}
    # One dataset per split (MLflow keeps one input per dataset and run, whatever its context).
    splits = {split: (counts, shards_digest(manifest, split)) for split, counts in manifest.get("splits", {}).items()}
    inputs = [DatasetInput(Dataset(name=os.path.basename(str(shards).rstrip("/")), digest=digest,
                                   source_type=str(shards).split("://")[0] if storage.is_uri(shards) else "local",
                                   source=json.dumps({"uri": str(shards)}),
                                   profile=json.dumps({"split": split, "counts": counts, **profile})),
                           [InputTag("mlflow.data.context", split)])
              for split, (counts, digest) in splits.items() if digest not in have]
    if inputs:  # a resumed run has them already
        client.log_inputs(run_id, datasets=inputs)


def find_run(uri: str, experiment: str, run_name: str) -> str | None:
    """The id of the MLflow run logged for `run_name`, if the store has one."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id],
                               filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    return found[0].info.run_id if found else None


def set_tags(uri: str, run_id: str, tags: dict) -> None:
    client = mlflow_client(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v))


def finish_run(uri: str, run_id: str, status: str, tags: dict | None = None) -> None:
    set_tags(uri, run_id, tags or {})
    mlflow_client(uri).set_terminated(run_id, status=status)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    mlflow_client(uri).log_text(run_id, text, artifact_file)


def log_file(uri: str, run_id: str, path: str, artifact_path: str | None = None) -> None:
    mlflow_client(uri).log_artifact(run_id, path, artifact_path)


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    if metrics:
        mlflow_client(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


class Tracker:
    """Does nothing: what every rank but 0 gets, and what runs without tracking use."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Dropped: only rank 0 of a tracked run logs."""

    def artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Dropped."""

    def image(self, step: int, key: str, image) -> None:
        """Dropped."""

    def tag(self, key: str, value) -> None:
        """Dropped."""

    def flush(self) -> bool:
        """Nothing pending."""
        return True

    def close(self, status: str = "FINISHED") -> None:
        """Nothing to flush."""


class MlflowTracker(Tracker):
    """Batched, retrying MLflow logging from a background thread."""

    def __init__(self, uri: str, run_id: str, after_step: int = -1, flush_every: float = 2.0,
                 mirror: str | None = None, model_id: str | None = None):
        """`mirror`: the URI folder whose spool `uri` is a working copy of, pushed there every
        PUSH_EVERY_S and at the end (a restarted rank 0, on any node, pulls it again). `model_id`:
        the run's logged model, which every metric is linked to."""
        self.mirror, self.pushed, self.model_id = mirror, time.monotonic(), model_id
        # Fail fast and retry ourselves: MLflow's own retries would block the flush thread minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        self.uri, self.client, self.run_id = uri, mlflow_client(uri), run_id
        # Steps up to here are already logged (a resume, or a worker-group restart that went back
        # to an earlier checkpoint than the last step it logged): asked again here, not trusted
        # from the driver, which only knows the state at launch.
        self.after_step = max(after_step, self._last_step())
        self.metrics: list = []
        self.files: list[tuple[str, str | None]] = []
        self.images: list[tuple] = []  # (key, step, uint8 array)
        self.lock = threading.Lock()  # guards the pending lists
        self.flushing = threading.Lock()  # held while a batch is being sent
        self.stop = threading.Event()
        self.failures = 0
        self.thread = threading.Thread(target=self._loop, args=(flush_every,), daemon=True)
        self.thread.start()

    def _last_step(self) -> int:
        try:
            return max((m.step for m in self.client.get_metric_history(self.run_id, "loss_diff")),
                       default=-1)
        except Exception:  # server away: the driver's value stands
            return -1

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.after_step:  # a resumed run recomputes these: never log a step twice
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self.lock:
            self.metrics += [Metric(k, float(v), now, step, model_id=self.model_id) for k, v in metrics.items()]

    def artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Queue a copy of the file (the caller may delete it before the upload happens)."""
        spool = tempfile.mkdtemp(prefix="cnd_ray_artifact_")
        copy = shutil.copy(path, spool)
        with self.lock:
            self.files.append((copy, artifact_path))

    def image(self, step: int, key: str, image) -> None:
        """Queue an image (uint8 (H, W, 3)) for MLflow's image view, where a slider walks its steps."""
        if step <= self.after_step:
            return
        with self.lock:
            self.images.append((key, step, image))

    def tag(self, key: str, value) -> None:
        from mlflow.entities import RunTag

        self._send(lambda: self.client.log_batch(self.run_id, tags=[RunTag(key, str(value))]))

    def _send(self, fn) -> bool:
        try:
            fn()
            return True
        except Exception:  # server down, timeout: keep the data and retry on the next flush
            self.failures += 1
            return False

    def flush(self) -> bool:
        """Send what is pending; True when nothing is left. One flush at a time: a caller that must
        know its metrics are stored (before a checkpoint) waits for the thread's batch in flight."""
        with self.flushing:
            done = self._flush()
            if self.mirror and time.monotonic() - self.pushed >= PUSH_EVERY_S:
                self._send(lambda: push_spool(self.mirror, self.uri))
                self.pushed = time.monotonic()
            return done

    def _flush(self) -> bool:
        with self.lock:
            metrics, self.metrics = self.metrics, []
            files, self.files = self.files, []
            images, self.images = self.images, []
        while metrics:
            chunk = metrics[:1000]  # MLflow caps a batch at 1000 metrics
            if not self._send(lambda: self.client.log_batch(self.run_id, metrics=chunk)):
                break
            metrics = metrics[1000:]
        kept = []
        for f in files:
            if self._send(lambda f=f: self.client.log_artifact(self.run_id, *f)):
                shutil.rmtree(os.path.dirname(f[0]), ignore_errors=True)  # the spooled copy
            else:
                kept.append(f)
        images = [i for i in images if not self._send(
            lambda i=i: self.client.log_image(self.run_id, i[2], key=i[0], step=i[1], synchronous=True))]
        with self.lock:
            self.metrics = metrics + self.metrics
            self.files = kept + self.files
            self.images = images + self.images
            return not self.metrics and not self.files and not self.images

    def _loop(self, every: float) -> None:
        while not self.stop.wait(every):
            self.flush()

    def close(self, status: str = "FINISHED", timeout: float = 120.0) -> None:
        """Flush everything (retrying up to `timeout` s while the server is away)."""
        self.stop.set()
        self.thread.join()
        deadline = time.time() + timeout
        while not self.flush() and time.time() < deadline:
            time.sleep(1.0)
        if self.mirror and self._send(lambda: push_spool(self.mirror, self.uri)):
            _drop_copy(self.mirror, "")  # in the storage now: this node's copy has done its work


def open_tracker(info: dict | None, rank: int) -> Tracker:
    """The tracker for this rank: MLflow on rank 0 when the driver opened a run, else nothing."""
    if rank != 0 or not info:
        return Tracker()
    mirror = info.get("mirror")  # a spool at a URI: log to a copy of it on this node
    return MlflowTracker(pull_spool(mirror) if mirror else info["uri"], info["run_id"],
                         info.get("after_step", -1), mirror=mirror, model_id=info.get("model_id"))


def system_monitor(info: dict | None, node: int, every: float):
    """MLflow's system metrics (CPU, memory; GPU use and memory where NVML finds GPUs) of this node,
    logged under the run as system/node<node>/..., or None: off (every 0), no run, or a spool (its
    store is a per-node copy that only rank 0's pushes). Call on one rank per node; `.finish()`."""
    if not info or not every or info.get("spooled"):
        return None
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # "no GPU" on CPU nodes
    monitor = SystemMetricsMonitor(info["run_id"], sampling_interval=every, resume_logging=True,
                                   node_id=f"node{node}", tracking_uri=info["uri"])
    monitor.start()
    return monitor


# --- logged models and the registry ---------------------------------------------------------------

MODEL_TAG = "cnd_ray.model_id"  # on a run: the id of its logged model
CHECKPOINT_TAG = "cnd_ray.checkpoint"  # on a logged model and a model version: the checkpoint folder


def start_model(uri: str, experiment: str, run_id: str, name: str, params: dict) -> str:
    """The id of run `run_id`'s logged model (MLflow 3), PENDING until the run finishes; the same
    one again on a resume. Metrics rank 0 logs are linked to it; `params`: what it is."""
    client = mlflow_client(uri)
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    found = client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'", max_results=1)
    if found:
        return found[0].model_id
    model = client.create_logged_model(exp_id, name=name, source_run_id=run_id, model_type="cnd_ray",
                                       params={k: str(v) for k, v in params.items()})
    set_tags(uri, run_id, {MODEL_TAG: model.model_id})
    return model.model_id


def finish_model(uri: str, model_id: str, checkpoint: str | None, step: int, config_yaml: str) -> None:
    """READY, naming its checkpoint and step, with the config and the checkpoint's path as its
    artifacts (the weights stay in train.storage); FAILED when the run ended without one."""
    client = mlflow_client(uri)
    if not checkpoint:
        client.finalize_logged_model(model_id, "FAILED")
        return
    client.set_logged_model_tags(model_id, {CHECKPOINT_TAG: checkpoint, "cnd_ray.step": str(step)})
    with tempfile.TemporaryDirectory() as d:
        Path(d, "config.yaml").write_text(config_yaml)
        Path(d, "checkpoint.txt").write_text(checkpoint + "\n")
        client.log_model_artifacts(model_id, d)
    client.finalize_logged_model(model_id, "READY")


def register_model(uri: str, name: str, model_id: str, run_id: str, tags: dict, description: str) -> str:
    """Register the logged model `model_id` as a new version of `name` (made when missing) and point
    the alias "best" at it; returns the version. The version's tags name the model and checkpoint."""
    client = mlflow_client(uri)
    model = client.get_logged_model(model_id)
    try:
        client.get_registered_model(name)
    except Exception:  # not registered yet
        client.create_registered_model(name, description="cnd_ray: the best trial of the search of this name")
    # A server resolves a models:/<id> source in its own store. A local store's registry resolves it
    # through the process-wide tracking URI, which need not be this store: there the source is the
    # model's artifact folder (a server refuses that: not inside the run's artifacts).
    served = uri.startswith(("http://", "https://"))
    version = client.create_model_version(
        name, source=f"models:/{model_id}" if served else model.artifact_location, run_id=run_id,
        model_id=model_id if served else None, description=description,
        tags={MODEL_TAG: model_id, CHECKPOINT_TAG: model.tags.get(CHECKPOINT_TAG, ""),
              **{k: str(v) for k, v in tags.items()}}).version
    client.set_registered_model_alias(name, "best", version)
    return str(version)


def resolve_model(uri: str, ref: str) -> str:
    """The checkpoint folder behind `models:/<name>/<version>`, `models:/<name>@<alias>` or
    `models:/<logged model id>` in the store at `uri`; UserError naming the reference otherwise."""
    client = mlflow_client(uri)
    body = ref[len("models:/"):]
    try:
        if "@" in body:
            tags = client.get_model_version_by_alias(*body.split("@", 1)).tags
        elif "/" in body:
            tags = client.get_model_version(*body.rsplit("/", 1)).tags
        else:
            tags = client.get_logged_model(body).tags
    except Exception as e:
        raise UserError(f"--ckpt {ref}: not found in the MLflow store {uri} "
                        f"({str(e).splitlines()[0][:200]})") from None
    if not tags.get(CHECKPOINT_TAG):
        raise UserError(f"--ckpt {ref}: names no checkpoint (its run did not finish)")
    return tags[CHECKPOINT_TAG]


# What a user reads at the top of the experiment in the UI, and its kind: MLflow 3 otherwise opens it
# in the GenAI view (traces, token usage) instead of the runs table.
EXPERIMENT_TAGS = {
    "mlflow.note.content": (
        "cnd_ray: Class-N-Diff, a DiT trained jointly with a benign/malignant classifier. One run per "
        "training run (params: the whole config; metrics: losses every train.log_every steps and, at "
        "each evaluation, the sample metrics judged by an independent classifier; artifacts: the "
        "config, sample grids, the loss curve). A search (`cnd-ray tune`) is a parent run with one "
        "child run per trial, ranked by its space's metric - fd_ratio for the shipped spaces: the "
        "samples' Frechet distance in the judge's feature space over the real-vs-real floor, lower "
        "is better; the parent holds the trial table and the best trial."),
    "mlflow.experimentKind": "custom_model_development",
}
RUNS_VIEW = "?workflowType=machine_learning"  # the runs table, not the GenAI landing view


VIEW_TAG = "cnd_ray.view"  # on a search's parent run: the key of its saved runs-table view
SHARED_VIEW = "mlflow.sharedViewState."  # + key: an experiment tag the UI restores a view from


def save_search_view(uri: str, experiment: str, parent: str, key: str, metric: str, ascending: bool,
                     varying: list[str], also: tuple[str, ...] = ()) -> None:
    """A runs-table view of a search, as MLflow's UI shares views (an experiment tag its URL names):
    sorted by the ranking metric, with it, the metrics `also` (quality beside fairness) and the keys
    the trials vary in as columns beside the dataset and model, so the trials compare at a glance
    without picking columns."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    columns = ["attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`", f"metrics.`{metric}`",
               *[f"metrics.`{m}`" for m in also], *[f"params.`{k}`" for k in varying]]
    state = {"orderByKey": f"metrics.`{metric}`", "orderByAsc": ascending, "searchFilter": "",
             "selectedColumns": columns}
    client.set_experiment_tag(exp.experiment_id, SHARED_VIEW + key, json.dumps(state))
    set_tags(uri, parent, {VIEW_TAG: key})


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
    needs no more. The job runner serves MLflow's GenAI jobs, which cnd_ray does not use; the access
    log would print every page load (and every health check)."""
    import sys

    args = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
            "--port", str(port), "--workers", str(workers), "--uvicorn-opts", "--no-access-log"]
    art = _artifact_location(uri)
    if art:
        args += ["--default-artifact-root", art]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # The server's log goes to stderr: stdout carries cnd-ray's own lines (the pages to open).
    return subprocess.Popen(args, start_new_session=True, env=env, stdout=2)


def wait_until_up(proc: subprocess.Popen, url: str, timeout: float, say=print) -> float | None:
    """Seconds until the server `proc` answers `url`/health; None if it has not after `timeout`.
    Raises UserError if it ends first. Says so, with the machine's load, every 30 s of waiting."""
    import urllib.request

    t0 = time.monotonic()
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
