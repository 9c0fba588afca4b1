"""The driver's log: what `cnd-ray train/tune/quickstart` printed, kept with the run it belongs to.

On a cluster the driver runs on the head node (`ray submit`), and Ray forwards every worker's and
trial's output to the driver's stdout/stderr (`log_to_driver`), so that one stream tells what went
wrong. `capture()` tees the Python-level sys.stdout and sys.stderr into a local file (the terminal
still gets everything); a run that has opened its MLflow run calls `save_at_exit(storage folder,
MLflow run)`, and when the capture ends - success, error, Ctrl-C - the log goes to
`<folder>/logs/driver-<UTC time>.log` and to the MLflow run as `logs/driver-<UTC time>.log`.
Trials run `train.drive` in their own processes, where no capture is active: only the driver saves.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback

from cnd_ray import storage

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Ray colours the worker prefixes; the file stays plain
# Ray's log monitor forwards worker output to the driver a moment after the worker wrote it: wait
# this long before saving so a failing worker's last lines make it into the log.
SETTLE_S = 1.0

_active: Capture | None = None  # the capture of this process, if any


class Tee:
    """A text stream that writes to `stream` and, while the capture is open, to its file."""

    def __init__(self, stream, capture: Capture):
        self._stream, self._capture = stream, capture

    def write(self, s: str) -> int:
        self._capture.write(s)
        return self._stream.write(s)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # encoding, isatty, fileno, ...: the terminal's
        return getattr(self._stream, name)


class Capture:
    """The local copy of this process's output and where it goes when the capture ends."""

    def __init__(self):
        self.name = f"driver-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.log"
        self.path = os.path.join(tempfile.mkdtemp(prefix="cnd_ray_driverlog_"), self.name)
        # Line-buffered: a killed driver leaves every finished line on disk.
        self._file = open(self.path, "w", buffering=1, encoding="utf-8", errors="replace")
        self._lock = threading.Lock()  # Ray's log thread prints while the main thread does
        self.targets: list[tuple] = []  # (storage folder, MLflow run)

    def write(self, s: str) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.write(ANSI.sub("", s))

    def close(self) -> None:
        with self._lock:
            self._file.close()


def save(path: str, folder: str, run) -> bool:
    """Copy the log at `path` to `<folder>/logs/` (a local path or a pyarrow URI) and attach it to
    the MLflow run (tracking.Run) as `logs/<file name>`; on failure print one warning line, never raise."""
    name = os.path.basename(path)
    dest = storage.join(folder, "logs", name)
    steps = [(dest, lambda: _copy(path, folder, name)),
             (f"MLflow run {run.id}", lambda: run.log_file(path, "logs"))]
    failed = []
    for where, step in steps:
        try:
            step()
        except Exception as e:  # the run's own outcome matters more than its log
            failed.append(f"{where} ({(str(e).strip().splitlines() or [type(e).__name__])[0][:200]})")
    if failed:
        print(f"cnd-ray: warning: could not save the driver log to {'; '.join(failed)}; "
              f"it is at {path}", file=sys.stderr, flush=True)
    else:
        print(f"driver log: {dest} (also in MLflow run {run.id} as logs/{name})",
              file=sys.stderr, flush=True)
    return not failed


def _copy(path: str, folder: str, name: str) -> None:
    storage.upload(path, storage.join(folder, "logs", name))


def save_at_exit(folder: str, run) -> None:
    """Save this process's captured log to `folder` and the MLflow run (tracking.Run) when the
    capture ends; a no-op without a capture (a notebook, a Tune trial's process)."""
    if _active is not None:
        _active.targets.append((folder, run))


@contextlib.contextmanager
def capture():
    """Tee sys.stdout/sys.stderr into a log file for the block; at its end (however it ends) save
    the log where `save_at_exit` asked, then delete the local copy if every save worked."""
    global _active
    cap, outer = Capture(), _active
    streams = sys.stdout, sys.stderr
    tees = sys.stdout, sys.stderr = Tee(streams[0], cap), Tee(streams[1], cap)
    _active = cap
    try:
        yield cap
    except BaseException:  # into the file only: Python prints it to the terminal itself
        cap.write(traceback.format_exc())
        raise
    finally:
        if cap.targets:
            time.sleep(SETTLE_S)
        _active = outer
        # Handlers created meanwhile may keep a tee: a closed capture just passes through.
        if sys.stdout is tees[0]:
            sys.stdout = streams[0]
        if sys.stderr is tees[1]:
            sys.stderr = streams[1]
        cap.close()
        saved = [save(cap.path, *t) for t in cap.targets]
        if all(saved):
            shutil.rmtree(os.path.dirname(cap.path), ignore_errors=True)
