"""What the workers log through: rank 0's `MlflowTracker` batches in memory and flushes from a
background thread, so logging is never on the training step's path and a tracking-server
outage only delays metrics (failed batches are kept and retried); other ranks get the
do-nothing `Tracker` (house rule 8). And each node's system metrics."""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import time

from cnd_ray.tracking.runs import Run
from cnd_ray.tracking.spool import PUSH_EVERY_S, drop_copy, pull_spool, push_spool
from cnd_ray.tracking.store import mlflow_client

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
            drop_copy(self.mirror, "")  # in the storage now: this node's copy has done its work


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the workers of a run log, as the driver opened it: the run, the last step it holds (a
    resume logs none twice), its logged model, whether it is a spool, and for a spool at a URI the
    run folder whose spool each node logs to a copy of (`mirror`)."""
    run: Run
    after_step: int = -1
    model_id: str | None = None
    spooled: bool = False
    mirror: str | None = None


def open_tracker(target: Target | None, rank: int) -> Tracker:
    """The tracker for this rank: MLflow on rank 0 when the driver opened a run, else nothing."""
    if rank != 0 or not target:
        return Tracker()
    m = target.mirror  # a spool at a URI: log to a copy of it on this node
    return MlflowTracker(pull_spool(m) if m else target.run.uri, target.run.id, target.after_step,
                         mirror=m, model_id=target.model_id)


def system_monitor(target: Target | None, node: int, every: float):
    """MLflow's system metrics (CPU, memory; GPU use and memory where NVML finds GPUs) of this node,
    logged under the run as system/node<node>/..., or None: off (every 0), no run, or a spool (its
    store is a per-node copy that only rank 0's pushes). Call on one rank per node; `.finish()`."""
    if not target or not every or target.spooled:
        return None
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # "no GPU" on CPU nodes
    monitor = SystemMetricsMonitor(target.run.id, sampling_interval=every, resume_logging=True,
                                   node_id=f"node{node}", tracking_uri=target.run.uri)
    monitor.start()
    return monitor
