"""The distributed runtime on a real gloo group of 2 processes (no Ray): gradients averaged while
backward runs equal those averaged after it, for every kind of step."""
import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cnd_ray import config as C
from cnd_ray import distributed, engine
from tests.helpers import fixed_batch, free_port

STEPS = {  # the single-forward step on each branch, the released two-forward step, accumulation
    "clean": ["method.gamma=0.0"],
    "denoised": ["method.gamma=1.0"],
    "reference": ["method.gamma=1.0", "method.denoised_input=reference"],
    "accumulated": ["method.gamma=0.5", "optim.grad_accum=2"],
}


def _grads(rank: int, port: int, overlap: bool, out: dict) -> None:
    """Two steps of each kind on this rank's own data; rank 0 keeps the averaged DiT gradients the
    optimizer saw at the second step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    for kind, overrides in STEPS.items():
        cfg = C.load("debug", ["method.gamma_schedule=constant", "classifier.backbone=test_resnet",
                               "train.global_batch=8", "scale.num_workers=2", *overrides])
        state = engine.build_state(cfg)
        rt = distributed.runtime(contextlib.nullcontext, None, "cpu", 2, overlap=state.dit if overlap else None)
        step, seen = state.opt_dit.step, {}

        def capture(step=step, seen=seen, state=state):  # what the optimizer sees
            seen.update({n: p.grad.clone() for n, p in state.dit.named_parameters() if p.grad is not None})
            step()

        state.opt_dit.step = capture
        b = fixed_batch(cfg, n=4, seed=rank)
        for _ in range(2):
            engine.train_step(state, engine.split_batch(b, cfg.optim.grad_accum), rt)
        if rank == 0:
            out.update({(kind, n): g for n, g in seen.items()})
    dist.destroy_process_group()


def _run(overlap: bool) -> dict:
    with mp.Manager() as m:
        out = m.dict()
        mp.spawn(_grads, args=(free_port(), overlap, out), nprocs=2, join=True)
        return dict(out)


@pytest.mark.slow
def test_overlapped_averaging_equals_averaging_after_backward():
    after, during = _run(False), _run(True)
    assert after.keys() == during.keys()
    assert {k for k, _ in after} == set(STEPS) and len(after) > 10 * len(STEPS)
    for key in after:
        assert torch.allclose(after[key], during[key], rtol=1e-5, atol=1e-7), key
