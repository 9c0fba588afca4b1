"""Small builders shared by the tests."""
import torch


def fixed_batch(cfg, n=8, seed=0):
    """A deterministic batch in the config's input shape: {"x", "y"}."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return {"x": x, "y": y}


def tiny_vae(folder):
    """A randomly initialised diffusers AutoencoderKL (downsample 8, like SD's) saved like a real one."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
    vae.save_pretrained(folder)
    return vae


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float = 180.0, every: float = 0.2) -> bool:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(every)
    return False


def healthy(url: str) -> bool:
    """Whether the server at `url` (MLflow) answers its /health endpoint."""
    import urllib.request

    try:
        urllib.request.urlopen(f"{url}/health", timeout=1)
        return True
    except OSError:
        return False


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (SQLite store, proxied artifacts) that can be stopped
    and started again on the same port."""

    def __init__(self, folder):
        self.folder, self.port, self.proc = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> "MlflowServer":
        import os
        import subprocess
        import sys

        # As `cnd-ray ui` starts it (tracking/ui.py): one worker, no job runner, uvicorn in MLflow
        # CLI's process (tracking/serve.py); MLflow's 4 workers under uvicorn's 5 s health check
        # never came up beside a training here.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cnd_ray.tracking.serve", "server", "--backend-store-uri",
             f"sqlite:///{self.folder}/server.db", "--artifacts-destination", str(self.folder / "art"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        assert wait_for(self.up, 120), "mlflow server did not start"
        return self

    def up(self) -> bool:
        return healthy(self.uri)

    def stop(self) -> None:
        if self.proc is not None:
            from cnd_ray import tracking

            tracking.stop_server(self.proc)  # with its uvicorn workers and job runners
            self.proc = None

    def rest(self, endpoint: str, body: dict | None = None) -> dict:
        """GET (body None) or POST an MLflow REST endpoint, e.g. 'runs/search'."""
        import json
        import urllib.request

        url = f"{self.uri}/api/2.0/mlflow/{endpoint}"
        req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=10).read())

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def random_checkpoint(folder, cfg_name: str = "debug", overrides=(), std: float = 0.05):
    """A checkpoint whose EMA DiT has random (not zero-initialised) weights, so samples depend on
    every part of the model; no training needed."""
    import torch

    from cnd_ray import checkpoint, config
    from cnd_ray.engine import build_state

    cfg = config.load(cfg_name, list(overrides))
    state = build_state(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in state.ema.parameters():
            if p.requires_grad or p.ndim:  # the frozen pos_embed keeps its sin-cos values
                if p.shape != state.ema.pos_embed.shape:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
    return str(checkpoint.save(state, folder))


def rows_trained(run_dir) -> list[list[tuple[int, int, int]]]:
    """Per rank, (epoch, pos, copy) of every row the run's model kept, from its train.log_rows
    files: the last entry of each step (a restart redoes the steps after its checkpoint)."""
    import csv
    from pathlib import Path

    ranks = []
    for f in sorted((Path(run_dir) / "rows").glob("rank*.csv")):
        steps: dict[int, list] = {}
        prev = None
        for r in csv.DictReader(f.open()):
            step = int(r["step"])
            if step != prev:  # a step's lines are contiguous: a later attempt's replace an older one's
                steps[step], prev = [], step
            steps[step].append((int(r["epoch"]), int(r["pos"]), int(r["copy"])))
        ranks.append([row for s in sorted(steps) for row in steps[s]])
    return ranks


def assert_row_accounting(run_dir, train_rows: int) -> None:
    """No row trained twice; every epoch that all ranks have moved past trained every row once."""
    ranks = rows_trained(run_dir)
    kept = [row for rows in ranks for row in rows]
    assert kept and len(kept) == len(set(kept)), "a row was trained twice"
    done = min(max(e for e, _, _ in rows) for rows in ranks)  # ranks may be in different epochs
    assert done >= 1, "the run never finished an epoch: the test says nothing"
    for epoch in range(done):
        assert sorted(p for e, p, c in kept if e == epoch) == list(range(train_rows)), f"epoch {epoch}"
