"""`python -m cnd_ray.tracking.serve ui|server ARGS`: MLflow's own `mlflow ui` / `mlflow server`
command line, with its uvicorn in the same process.

MLflow's CLI sets up the store and the server's environment, then starts uvicorn as a second Python
process that imports MLflow again: about 3.5 s of CPU each here. On a laptop that is training, a CPU
second is several seconds of waiting, and the UI missed its 30 s (bench/ui_under_load.py). With one
worker uvicorn has no supervisor and can run in the CLI's own process: the same command line and
environment, half the start-up work. Only that one start changes; any other command (several
workers, or an MLflow that starts uvicorn some other way) runs as MLflow runs it."""
from __future__ import annotations

import os
import sys

import mlflow.server
from mlflow.cli import cli

_spawn = mlflow.server._exec_cmd  # MLflow's way of starting uvicorn, kept for what is not ours


class _Ended:
    """What MLflow's CLI waits on in place of the uvicorn process: by then uvicorn has ended, so its
    signal forwarder finds poll() set and forwards nothing."""

    def __init__(self, code: int):
        self.returncode = code

    def poll(self) -> int:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode


def _one_worker(cmd) -> bool:
    cmd = list(cmd)
    return cmd[1:3] == ["-m", "uvicorn"] and "--workers" in cmd and cmd[cmd.index("--workers") + 1] == "1"


def _uvicorn_here(cmd, *, extra_env=None, synchronous=True, **kwargs):
    if synchronous or not _one_worker(cmd):
        return _spawn(cmd, extra_env=extra_env, synchronous=synchronous, **kwargs)
    os.environ.update(extra_env or {})
    from uvicorn.main import main as uvicorn_cli

    try:  # serves until SIGTERM or Ctrl-C (uvicorn's own handlers), then returns
        uvicorn_cli.main(args=list(cmd[3:]), prog_name="uvicorn", standalone_mode=False)
    except SystemExit as e:
        return _Ended(e.code if isinstance(e.code, int) else 1)
    return _Ended(0)


def main(argv: list[str] | None = None) -> None:
    mlflow.server._exec_cmd = _uvicorn_here
    cli.main(args=sys.argv[1:] if argv is None else argv, prog_name="mlflow")


if __name__ == "__main__":
    main()
