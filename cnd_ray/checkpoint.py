"""A checkpoint is a directory that describes itself (house rule 6):

    config.yaml   the resolved config: `cnd-ray train --config <dir>/config.yaml` reproduces the run
    weights.pt    dit, ema, classifier, cls_ema state dicts
    optim.pt      both optimizers
    state.pt      step, the classifier's accumulated gradients (between its optimizer steps),
                  RNG states (torch, CUDA, numpy, python), the data position (`extra`)
    meta.json     step and format version, for people and tools

Written to a temporary sibling directory and renamed into place, so a crash never leaves a half
checkpoint under the real name. Loaded with `weights_only=True`, to CPU first.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from cnd_ray import config as config_lib, storage, weights as weights_lib
from cnd_ray.engine import TrainState, build_state

FORMAT = 1
FILES = ("config.yaml", "weights.pt", "optim.pt", "state.pt", "meta.json")


def rng_state() -> dict:
    """All RNG states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def _sd(m):
    return None if m is None else m.state_dict()


def _grads(m) -> list:
    # With classifier.step_every > 1 its gradients build up over steps: part of the state.
    return [None if p.grad is None else p.grad.detach().clone() for p in m.parameters()]


def save(state: TrainState, path: str | Path, extra: dict | None = None) -> Path:
    """Write `state` as a checkpoint directory at `path` (atomically replacing one there).

    `extra` holds what the caller needs to resume beyond the train state (the distributed loop's
    data epoch and every rank's RNG); its plain scalar entries are also copied to meta.json.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / "config.yaml").write_text(state.cfg.to_yaml())
        torch.save({"dit": _sd(state.dit), "ema": _sd(state.ema),
                    "classifier": _sd(state.classifier), "cls_ema": _sd(state.cls_ema)},
                   tmp / "weights.pt")
        torch.save({"dit": _sd(state.opt_dit), "classifier": _sd(state.opt_cls)}, tmp / "optim.pt")
        torch.save({"step": state.step, "cls_pending": state.cls_pending,
                    "cls_grads": _grads(state.classifier) if state.cls_pending else None,
                    "rng": rng_state(), "extra": extra or {}},
                   tmp / "state.pt")
        scalars = {k: v for k, v in (extra or {}).items() if isinstance(v, (int, float, str))}
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "step": state.step, **scalars}))
        if path.exists():  # rename the old one away first: os.replace cannot replace a non-empty dir
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check(path: Path) -> None:
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a cnd_ray checkpoint (missing {', '.join(missing)})")


def _read_text(path: str | Path, name: str) -> str:
    """File `name` of a checkpoint in a folder or at a URI (s3://..., any pyarrow filesystem)."""
    return storage.read_text(storage.join(str(path), name))


def read_meta(path: str | Path) -> dict:
    """meta.json of a checkpoint in a folder or at a URI."""
    return json.loads(_read_text(path, "meta.json"))


def read_config(path: str | Path):
    """The resolved config of a checkpoint in a folder or at a URI."""
    text = _read_text(path, "config.yaml")
    return config_lib.from_dict(config_lib.yaml_mapping(text, f"{path}/config.yaml"))


def load_config(path: str | Path):
    """The resolved config a checkpoint was trained with."""
    path = Path(path)
    _check(path)
    return config_lib.load(path / "config.yaml")


def load_ema(path: str | Path) -> tuple[config_lib.Config, dict, int]:
    """(config, EMA DiT weights, step): all that sampling needs, without building the optimizers
    or the classifier (mmap reads only the EMA's bytes of weights.pt)."""
    path = Path(path)
    cfg = load_config(path)
    weights = weights_lib.load(path / "weights.pt", mmap=True)
    ema = {k: v.clone() for k, v in weights["ema"].items()}  # off the mmap: the file may go away
    return cfg, ema, read_meta(path)["step"]


def _load(path: Path, name: str) -> dict:
    return weights_lib.load(path / name)


def load(path: str | Path, device: str | torch.device = "cpu", restore_rng: bool = True,
         cfg=None) -> TrainState:
    """Rebuild the train state a checkpoint holds, under its own config or, given `cfg`, under that
    one (a resume the user asked to continue with changed settings: the optimizers keep their
    moments and take cfg's hyperparameters)."""
    return load_with_extra(path, device, restore_rng, cfg)[0]


def load_with_extra(path: str | Path, device: str | torch.device = "cpu", restore_rng: bool = True,
                    cfg=None) -> tuple[TrainState, dict]:
    """`load`, and the `extra` dict the checkpoint was saved with (a worker's data position and
    per-rank RNG states), from one read of state.pt."""
    path = Path(path)
    cfg = cfg or load_config(path)
    # Build without re-reading the classifier's pretrained file: the checkpoint has its weights
    # (and the file may be gone on the machine that resumes).
    state = build_state(config_lib.override(cfg, {"classifier.weights": ""}), device)
    state.cfg = cfg
    weights, optim, extra = (_load(path, n) for n in ("weights.pt", "optim.pt", "state.pt"))
    state.dit.load_state_dict(weights["dit"])
    state.ema.load_state_dict(weights["ema"])
    state.opt_dit.load_state_dict(optim["dit"])
    if state.classifier is not None:
        state.classifier.load_state_dict(weights["classifier"])
        state.opt_cls.load_state_dict(optim["classifier"])
        if state.cls_ema is not None:
            state.cls_ema.load_state_dict(weights["cls_ema"])
    state.step, state.cls_pending = extra["step"], extra["cls_pending"]
    if extra["cls_grads"] is not None:
        for p, g in zip(state.classifier.parameters(), extra["cls_grads"]):
            p.grad = None if g is None else g.to(p.device)
    # load_state_dict brought back the saved rates; the DiT's is set every step from cfg anyway.
    for group in state.opt_dit.param_groups:
        group["weight_decay"] = cfg.optim.weight_decay
    for group in state.opt_cls.param_groups if state.opt_cls is not None else []:
        group.update(lr=cfg.classifier.lr, momentum=cfg.classifier.momentum)
    if restore_rng:
        set_rng_state(extra["rng"])
    return state, extra.get("extra", {})
