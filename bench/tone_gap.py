"""Does the synthetic benchmark show the light-dark gap the fairness fill is meant to close? (issue 31)

For each skin-tone distribution of `cnd-ray synth` (the ITA's normal mean and sd; the default is
synth.ISIC_ITA) it makes the quickstart's data as a run without data.shards does (2000 images, the
tone-balanced test set as the test split, 32 px), then trains the real-only downstream classifier
with the quickstart's fairness settings at several classifier seeds (fairness.seed) and prints, per
seed, the light-dark AUROC gap (I-II minus V-VI) and the worst-group AUROC with their 95% bootstrap
intervals on the test split, beside how many V-VI images the training split holds. With --oracle,
also tests/test_fairness.py's oracle at each seed: the cells the training split lacks filled with
held-out real images (another draw of the tone-balanced test set) instead of a model's samples, the
gap and worst-group AUROC paired against real-only.

The classifier's floats differ between CPU families, so another machine draws another classifier
from the same seed: read the seeds as the spread a user's machine may land anywhere in.

Run: python bench/tone_gap.py [--ita 50,12 52,11] [--seeds 0 1 2] [--oracle] [--keep DIR]
                              [section.key=value ...]   (fairness.members=3: each classifier a mean of 3)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from cnd_ray import config as C
from cnd_ray.data import shardset, synth
from cnd_ray.fairness import downstream, metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ita", nargs="+", default=[f"{synth.ISIC_ITA[0]:g},{synth.ISIC_ITA[1]:g}"],
                    help="ITA distributions as MEAN,SD (default: synth.ISIC_ITA)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="fairness.seed values")
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("--oracle", action="store_true", help="also fill the missing cells with held-out real images")
    ap.add_argument("overrides", nargs="*", help="section.key=value on top of --config (e.g. fairness.fill_ratio=100)")
    ap.add_argument("--keep", help="make the data sets under this folder (default: a temporary one)")
    args = ap.parse_args()

    import ray

    from cnd_ray.launch import ingest, train

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    root = args.keep or tempfile.mkdtemp(prefix="tone_gap-")
    rows = []
    for spec in args.ita:
        mean, sd = (float(v) for v in spec.split(","))
        synth.ISIC_ITA = (mean, sd)  # the knob this bench sweeps: read by synth.run's patient draws
        t0 = time.time()
        cfg = train.with_shards(C.load(args.config, [*args.overrides, f"train.storage={root}/ita{mean:g}-{sd:g}"]))
        pool = None
        if args.oracle:  # held-out real images of every cell: as tests/test_fairness.py's oracle draws them
            src, folder = f"{root}/ita{mean:g}-{sd:g}/pool_src", f"{root}/ita{mean:g}-{sd:g}/pool"
            if not os.path.isfile(os.path.join(folder, "manifest.json")):  # made by an earlier run under --keep
                synth.run(src, num_images=20, image_size=64, malignant_fraction=0.3, seed=11, test_per_tone=300,
                          progress=False)
                ingest.run([src], folder, image_size=32, val_fraction=0.2, progress=False,
                           test=[str(synth.test_folder(src))])
            pool = downstream.read_real(folder, shardset.read_manifest(folder), "test", 32)
        made = time.time() - t0
        for seed in args.seeds:
            cfg_s = C.override(cfg, {"fairness.seed": seed})
            t0 = time.time()
            ds = downstream.Downstream(cfg_s, cfg_s.data.shards, {})
            model = downstream.train_classifier(ds.train, cfg_s.fairness, "cpu", downstream.BASELINES[downstream.REAL])
            real = ds.score(model, downstream.BASELINES[downstream.REAL])
            rep = real["report"]
            comp = downstream.composition(ds.train["labels"], ds.train["groups"])
            dark = comp.get(downstream.DARKEST, {})
            row = (f"N({mean:g}, {sd:g})", seed, f"{dark.get('benign', 0)} + {dark.get('malignant', 0)}",
                   downstream.interval(rep["light_dark_gap"]), downstream.interval(rep["worst_group_auroc"], False),
                   f"{made:.0f} + {time.time() - t0:.0f}")
            if pool is not None:
                row += _oracle(cfg_s, ds, pool, real)
            rows.append(row)
            print(" | ".join(str(c) for c in row), flush=True)
    head = "| ITA | seed | V-VI train (benign + malignant) | real-only light-dark gap | worst-group AUROC | s (data + classifier) |"
    if args.oracle:
        head += " oracle - real-only: gap | worst-group AUROC |"
    print("\n" + head + "\n" + "|---" * head.count(" | ") + "|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    ray.shutdown()
    print(json.dumps({"columns": head.strip("| ").split(" | "), "rows": rows}))


def _oracle(cfg, ds, pool: dict, real: dict) -> tuple[str, str]:
    """The real-only classifier's training split plus held-out real images of the cells it lacks
    (fill_counts at cfg's policy, ratio and cap), trained at cfg's seed: its gap and worst-group
    AUROC minus real-only's, paired on the same test images."""
    f = cfg.fairness
    counts = downstream.fill_counts(downstream.composition(ds.train["labels"], ds.train["groups"]),
                                    f.fill, f.fill_ratio, f.fill_max)
    picked, labels = [], []
    for (label, group), n in counts.items():
        at = [i for i, (y, g) in enumerate(zip(pool["labels"], pool["groups"])) if y == label and g == group][:n]
        picked += at
        labels += [label] * len(at)
    fill = {"images": pool["images"][picked], "labels": np.array(labels), "groups": [pool["groups"][i] for i in picked]}
    model = downstream.train_classifier(downstream.mix(ds.train, fill), f, "cpu", f.balance)
    mine = ds.score(model, f.balance)
    paired = metrics.paired_delta(ds.test["labels"], np.asarray(real["test_scores"]), np.asarray(mine["test_scores"]),
                                  ds.test["groups"], n_boot=f.bootstrap, seed=f.seed,
                                  thresholds=(real["threshold"], mine["threshold"]))
    return downstream.interval(paired["light_dark_gap"]), downstream.interval(paired["worst_group_auroc"])


if __name__ == "__main__":
    main()
