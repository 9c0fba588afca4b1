"""Does guiding on the skin tone make the fairness fill show the tone it asks for, and at what cost?
(issue 31; diffusion.tone_guidance_scale)

For each trial of a finished quickstart (or any search whose trials ran fairness.in_loop) it redraws
the trial's own fill plan - the same seeds, labels and requested tone groups its final evaluation
drew, with the in-training sampler - at each tone guidance scale, and prints per (setting, scale):

- tone match: the share of images whose skin reads (ITA on the pixels) as the group asked for, with
  its 95% Wilson interval (what the downstream classifier's cell balance counts is the tone shown);
- class fidelity under the search's judge (AUROC of benign vs malignant samples) and the share of
  benign and malignant samples showing a lesion as their class's real images do;
- seconds per image (tone guidance other than 1 or the class scale costs a third forward);
- with --fairness-seeds: the downstream classifier on real + these images at each classifier seed
  (fairness.seed; the real-only baseline trained at the same seed), its worst-group AUROC and
  light-dark gap, and the worst-group AUROC's paired difference from real-only and from setting 1's
  images at the same scale, with 95% bootstrap intervals over the test images; over several seeds,
  the mean paired difference (worst-group AUROC against real only and setting 1's images, and the
  gap against setting 1's) with a 95% t interval over the seeds.

Scale 1 is what the fill drew before tone guidance existed: it reproduces the trials' images.

Run: python bench/tone_guidance.py RUN_DIR [--settings 1 4] [--scales 1 2 4 6] [--fairness-seeds 0 1 2]
RUN_DIR: the quickstart's --out (or a search's storage); its trials' last checkpoints are used.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import time
from types import SimpleNamespace

import numpy as np
import torch
from scipy import stats

from cnd_ray import checkpoint, config as C, monitor
from cnd_ray.data import shardset
from cnd_ray.evaluate import fidelity, judge as judge_lib, metrics as eval_metrics
from cnd_ray.fairness import downstream, metrics
from cnd_ray.models import build_dit


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    p = k / n
    mid, half = (p + z * z / (2 * n)), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (mid - half) / (1 + z * z / n), (mid + half) / (1 + z * z / n)


def trials(run_dir: str) -> dict[int, str]:
    """{setting number: its trial's last checkpoint} under run_dir."""
    out = {}
    for trial in sorted(glob.glob(os.path.join(run_dir, "**", "setting*-*"), recursive=True)):
        m = re.match(r"setting(\d+)-", os.path.basename(trial))
        ckpts = sorted(p for p in glob.glob(os.path.join(trial, "checkpoint_*")) if os.path.isdir(p))
        if m and ckpts and os.path.isdir(trial):
            out[int(m.group(1))] = ckpts[-1]
    return out


def draw(cfg, ema: dict, plan: dict, scale: float) -> tuple[torch.Tensor, float]:
    """The plan's images at tone guidance `scale`, drawn as the in-loop fill draws them
    (monitor.sample_images: the in-training sampler, chunk by chunk): (uint8, s/image)."""
    cfg = C.override(cfg, {"diffusion.tone_guidance_scale": scale})
    dit = build_dit(cfg)
    dit.load_state_dict(ema)
    t0 = time.perf_counter()
    _, images = monitor.sample_images(SimpleNamespace(cfg=cfg, ema=dit.eval().requires_grad_(False)), plan)
    return images, (time.perf_counter() - t0) / len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--settings", nargs="+", type=int, help="setting numbers (default: every trial found)")
    ap.add_argument("--scales", nargs="+", type=float, default=[1.0, 2.0, 4.0, 6.0])
    ap.add_argument("--fairness-seeds", nargs="*", type=int, default=[],
                    help="also train the downstream classifier at these fairness.seed values")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    found = trials(args.run_dir)
    chosen = {k: v for k, v in found.items() if not args.settings or k in args.settings}
    if not chosen:
        raise SystemExit(f"{args.run_dir}: no setting<k>-* trial with a checkpoint (found {sorted(found)})")
    first = checkpoint.load_config(next(iter(chosen.values())))
    if first.fairness.in_loop == "off":
        raise SystemExit(f"{args.run_dir}: its trials ran without fairness.in_loop: no fill plan to redraw")
    root = os.path.dirname(os.path.dirname(next(iter(chosen.values()))))  # the trials' folder: judge, baselines
    manifest = shardset.read_manifest(first.data.shards)
    judge = judge_lib.load(judge_lib.path_for(first, judge_lib.cache_dir(root)))
    base = downstream.load(downstream.path_for(first, root, manifest))
    plan = downstream.fill_plan(downstream.fill_for(first, base), first.fairness.seed, first.eval.batch_size)
    asked = [downstream.GROUPS[t] for t in plan["tone"]]
    print(f"fill plan: {len(asked)} images asking for {sorted(set(asked))}, "
          f"{int((plan['label'] == 0).sum())} benign / {int((plan['label'] == 1).sum())} malignant; "
          f"settings {sorted(chosen)}; tone guidance {args.scales}; class guidance "
          f"{first.diffusion.guidance_scale:g}; {first.eval.search_sampler} x {first.eval.search_sample_steps}", flush=True)

    drawn = {}  # (setting, scale) -> images
    figures = {"draws": [], "fairness": []}  # the last line's JSON
    print(f"\n{'setting':>7} {'tone g.':>7} {'tone match [95%]':>22} {'fidelity':>8} {'lesion b/m':>11} {'s/img':>6}")
    for k, ck in sorted(chosen.items()):
        cfg, ema, _ = checkpoint.load_ema(ck)
        for s in args.scales:
            images, per = draw(cfg, ema, plan, s)
            drawn[k, s] = images
            shown = downstream.measured_groups(images)
            hit = int(sum(g == a for g, a in zip(shown, asked)))
            lo, hi = wilson(hit, len(asked))
            fid = eval_metrics.classification(fidelity.scores(judge.model, images), plan["label"])["auroc"]
            les = judge.shows_lesion(images, plan["label"])
            figures["draws"].append({"setting": k, "tone_scale": s, "tone_match": hit / len(asked),
                                     "tone_match_ci": [lo, hi], "fidelity_auroc": fid,
                                     "lesion_benign": float(les[plan["label"] == 0].mean()),
                                     "lesion_malignant": float(les[plan["label"] == 1].mean()),
                                     "seconds_per_image": per})
            print(f"{k:>7} {s:>7g} {hit / len(asked):>8.2f} [{lo:.2f}, {hi:.2f}] {fid:>8.3f} "
                  f"{les[plan['label'] == 0].mean():>5.2f}/{les[plan['label'] == 1].mean():.2f} {per:>6.3f}", flush=True)

    seeds = {}  # (setting, scale) -> [(worst vs real, worst vs setting 1)] over the classifier seeds
    for seed in args.fairness_seeds:
        cfg = C.override(first, {"fairness.seed": seed})
        print(f"\nfairness.seed {seed}: training the baselines", flush=True)
        ds, _ = downstream.Downstream.build(cfg, cfg.data.shards, say=lambda m: None)
        real = ds.base["models"][downstream.REAL]
        print(f"real only: worst-group AUROC {real['report']['worst_group_auroc']['value']:.3f}, gap "
              f"{downstream.interval(real['report']['light_dark_gap'])}")
        print(f"{'setting':>7} {'tone g.':>7} {'worst':>6} {'gap':>7}  {'worst vs real [95%]':>26}  {'worst vs setting 1 [95%]':>26}")
        scores = {}
        for (k, s), images in drawn.items():
            out, detail = ds.measure(images, plan)
            t = detail["test"]
            scores[k, s] = (np.asarray(t["scores"]), t["threshold"])
            vs1, d1 = "-", float("nan")
            if (1, s) in scores and k != 1:
                d = metrics.paired_delta(t["labels"], scores[1, s][0], scores[k, s][0], t["groups"],
                                         n_boot=cfg.fairness.bootstrap, seed=seed,
                                         thresholds=(scores[1, s][1], scores[k, s][1]))
                vs1 = downstream.interval(downstream.deltas(d)["fair_worst_auroc"])
                d1 = downstream.deltas(d)["fair_worst_auroc"]["delta"]
                g1 = downstream.deltas(d)["fair_gap"]["delta"]
            else:
                g1 = float("nan")
            seeds.setdefault((k, s), []).append((out["fair_worst_auroc_vs_real"], d1, g1))
            figures["fairness"].append({"seed": seed, "setting": k, "tone_scale": s,
                                        "worst_auroc": out["fair_worst_auroc"], "gap": out["fair_gap"],
                                        "worst_vs_real": out["fair_worst_auroc_vs_real"], "worst_vs_setting1": d1})
            vr = downstream.interval({"delta": out["fair_worst_auroc_vs_real"],
                                      "ci": (out["fair_worst_auroc_vs_real_lo"], out["fair_worst_auroc_vs_real_hi"])})
            print(f"{k:>7} {s:>7g} {out['fair_worst_auroc']:>6.3f} {out['fair_gap']:>+7.3f}  {vr:>26}  {vs1:>26}",
                  flush=True)

    if len(args.fairness_seeds) > 1:
        # The downstream classifier's seed moves these by as much as the settings do, so each seed's
        # interval (over the test images) is not the answer: the mean over seeds with its 95% t
        # interval (the seeds as the sample), the seeds' range, and how many seeds are above 0.
        n = len(args.fairness_seeds)
        print(f"\nover fairness.seed {args.fairness_seeds}: paired differences, mean [95% t interval over the "
              f"{n} seeds] (min, max; seeds > 0)")
        print(f"{'setting':>7} {'tone g.':>7} {'worst-group vs real':>44} {'worst-group vs setting 1':>44} "
              f"{'gap vs setting 1':>44}")
        summary = []
        for (k, s), ds_ in seeds.items():
            cols, row = [], {"setting": k, "tone_scale": s}
            for name, v in zip(("worst_vs_real", "worst_vs_setting1", "gap_vs_setting1"), np.array(ds_).T):
                if not np.isfinite(v).all():
                    cols.append("-")
                    continue
                half = stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / np.sqrt(n)
                cols.append(f"{v.mean():+.3f} [{v.mean() - half:+.3f}, {v.mean() + half:+.3f}] "
                            f"({v.min():+.3f}, {v.max():+.3f}; {int((v > 0).sum())}/{n})")
                row[name] = {"mean": v.mean(), "ci": [v.mean() - half, v.mean() + half], "above_0": int((v > 0).sum())}
            summary.append(row)
            print(f"{k:>7} {s:>7g} {cols[0]:>44} {cols[1]:>44} {cols[2]:>44}")
        figures["over_seeds"] = summary
    print(json.dumps(figures, default=float))


if __name__ == "__main__":
    main()
