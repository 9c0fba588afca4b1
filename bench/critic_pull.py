"""The critic's pull on the DiT, per quarter of the noise schedule, for every operator and target.

    python bench/critic_pull.py                    # quickstart models: at init and after 1000 steps
    python bench/critic_pull.py --steps 300        # a shorter pre-training
    python bench/critic_pull.py --ckpt CKPT        # a trained Class-N-Diff checkpoint (its critic)

The pull is ||gradient reaching the DiT from lambda * L_cls|| / ||from L_diff||, on denoised steps
whose timesteps all lie in one band (b1: t < 250, the least noisy, ... b4: t >= 750). Two estimators,
side by side on the same draws:
    output  what training logs (objective._Meet): the two gradients at the DiT's output, free
    params  the same two gradients at every DiT parameter (two backward passes: the bench's cost)
The output estimator is the cheap one training can afford; this bench shows how far it tracks the
parameters' ratio. Rows: the four operators (x0_pred with its two gradient scales, posterior,
reference) under the four targets (label, paired, hinge, features), each with the critic trained on
clean images and, for the trained state, with a robust (FGSM) critic trained beside it on the same
batches; plus the cap (critic_balance) and a window. The "trained" state: the quickstart recipe for
--steps steps at gamma 0 (the DiT learns alone, the critic on clean images, as in setting 1), unless
--ckpt names one. The last line is one JSON object with every ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cnd_ray import checkpoint
from cnd_ray import config as C
from cnd_ray.data import synth
from cnd_ray.engine import build_state, train_step
from cnd_ray.objective import PULL_BANDS, pull

OPERATORS = {
    "x0_pred sqrt_alpha_bar": ["method.denoised_input=x0_pred", "method.denoised_grad=sqrt_alpha_bar"],
    "x0_pred released": ["method.denoised_input=x0_pred", "method.denoised_grad=released"],
    "posterior": ["method.denoised_input=posterior"],
    "reference": ["method.denoised_input=reference"],
}
TARGETS = ("label", "paired", "hinge", "features")
EXTRAS = {  # on x0_pred released, label
    "cap (lambda 0.2)": ["method.critic_balance=cap"],
    "window t < 0.5": ["method.critic_t_max=0.5"],
}


def images(n: int, size: int, seed: int) -> dict:
    """n synthetic images (the default benchmark) as a {"x", "y"} batch in [-1, 1]."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "s")
        synth.run(out, num_images=n, image_size=64, malignant_fraction=0.5, seed=seed, test_per_tone=0,
                  progress=False)
        rows = [r.split(",") for r in open(os.path.join(out, synth.GROUND_TRUTH)).read().splitlines()[1:]]
        x = np.stack([np.asarray(Image.open(os.path.join(out, "train", f"{r[0]}.jpg")).resize((size, size), Image.BILINEAR))
                      for r in rows])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, S, S)
    return {"x": x, "y": torch.tensor([int(r[-1]) for r in rows])}


def pretrain(cfg, data: dict, steps: int):
    """The quickstart recipe at gamma 0 for `steps` steps, and a robust (FGSM) critic trained beside
    it on the same batches from the same start."""
    state = build_state(C.override(cfg, {"method.gamma_schedule": "constant", "method.gamma": 0.0}))
    robust = build_state(C.override(cfg, {"classifier.adversarial": "fgsm"}))
    robust.objective.classifier.load_state_dict(state.classifier.state_dict())
    g = torch.Generator().manual_seed(1)
    b = cfg.train.global_batch
    t0 = time.perf_counter()
    for s in range(steps):
        i = torch.randint(0, len(data["y"]), (b,), generator=g)
        batch = {"x": data["x"][i], "y": data["y"][i]}
        train_step(state, [batch])
        obj = robust.objective
        y = batch["y"].float()
        loss = F.binary_cross_entropy_with_logits(obj.classifier(obj.robust_input(batch["x"], y)), y)
        loss.backward()
        robust.opt_cls.step()
        robust.opt_cls.zero_grad(set_to_none=True)
        if (s + 1) % 200 == 0:
            print(f"  pre-training step {s + 1}/{steps} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return state, robust.classifier


def measure(state, critic, overrides: list[str], data: dict, batch: int, seed: int) -> dict:
    """{"output": [pull per band], "params": [...]}: denoised steps with every t in one band."""
    cfg = C.override(state.cfg, ["method.gamma_schedule=constant", "method.gamma=1.0", "method.critic_warmup=0",
                                 *overrides])
    from cnd_ray.objective import ClassNDiff

    obj = ClassNDiff(cfg, dit=state.dit, classifier=critic)
    zero = ClassNDiff(C.override(cfg, {"method.lambda_cls": 0.0}), dit=state.dit, classifier=critic)
    T = obj.diffusion.num_timesteps
    g = torch.Generator().manual_seed(seed)
    out = {"output": [], "params": []}
    for b in range(PULL_BANDS):
        i = torch.randint(0, len(data["y"]), (batch,), generator=g)
        t = torch.randint(b * T // PULL_BANDS, (b + 1) * T // PULL_BANDS, (batch,), generator=g)
        grads = []
        for o in (obj, zero):
            state.dit.zero_grad(set_to_none=True)
            torch.manual_seed(seed + b)
            res = o(data["x"][i], data["y"][i], step=0, t=t)
            res.loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in state.dit.parameters() if p.grad is not None]))
            if o is obj:
                out["output"].append(pull({k: float(v) for k, v in res.metrics.items()}).get(f"critic_pull_b{b + 1}", 0.0))
        full, diff = grads
        out["params"].append(float((full - diff).norm() / diff.norm()))
    state.dit.zero_grad(set_to_none=True)
    return out


def rows(state, critics: dict, data, batch, seed) -> list[tuple[str, dict]]:
    got = []
    for critic_name, critic in critics.items():
        for op, ov in OPERATORS.items():
            for target in TARGETS:
                name = f"{op} / {target} / {critic_name}"
                got.append((name, measure(state, critic, [*ov, f"method.critic_target={target}"], data, batch, seed)))
                print(f"  {name}", flush=True)
    for extra, ov in EXTRAS.items():
        name = f"x0_pred released / label / {next(iter(critics))} / {extra}"
        got.append((name, measure(state, next(iter(critics.values())), [*OPERATORS["x0_pred released"], *ov],
                                  data, batch, seed)))
    return got


def table(title: str, got: list[tuple[str, dict]]) -> str:
    bands = [f"b{b + 1}" for b in range(PULL_BANDS)]
    head = ["operator / target / critic"] + [f"output {b}" for b in bands] + [f"params {b}" for b in bands]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in got:
        lines.append("| " + " | ".join([name] + [f"{v:.3g}" for v in m["output"]] + [f"{v:.3g}" for v in m["params"]]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="", help="a trained Class-N-Diff checkpoint (its DiT and critic)")
    p.add_argument("--steps", type=int, default=1000, help="pre-training steps without --ckpt")
    p.add_argument("--batch", type=int, default=32, help="images per band and variant")
    p.add_argument("--images", type=int, default=512, help="synthetic images to draw batches from")
    p.add_argument("--out", default="", help="also write the JSON here")
    a = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    # The clean critic trains on clean images (the default trains it on FGSM examples: the robust row).
    cfg = C.load("quickstart", ["method.gamma_schedule=periodic_ramp", "classifier.adversarial=none"])
    data = images(a.images, cfg.data.image_size, 0)
    torch.manual_seed(0)
    init = build_state(cfg)
    results = {"init": rows(init, {"clean critic": init.classifier}, data, a.batch, 0)}
    print(table("At initialisation", results["init"]))
    if a.ckpt:
        trained = checkpoint.load(a.ckpt)
        critics = {"its critic": trained.classifier}
        label = f"Trained: {a.ckpt}"
    else:
        print(f"pre-training the quickstart recipe for {a.steps} steps (DiT alone, critics on clean and FGSM images)")
        trained, robust = pretrain(cfg, data, a.steps)
        critics = {"clean critic": trained.classifier, "robust critic (fgsm)": robust}
        label = f"Trained {a.steps} steps (quickstart recipe, gamma 0)"
    results["trained"] = rows(trained, critics, data, a.batch, 1)
    print(table(label, results["trained"]))
    blob = {k: {name: m for name, m in v} for k, v in results.items()}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(blob, f, indent=1)
    print(json.dumps(blob))


if __name__ == "__main__":
    main()
