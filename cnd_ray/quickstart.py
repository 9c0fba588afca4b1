"""`cnd-ray quickstart`: the main job on the embedded default, end to end on one laptop.

Synthesise and ingest a data set (unless data.shards names one), run the paper_settings search at
the quickstart scale (five Class-N-Diff trials, each a Ray Train run, nested in one MLflow parent,
ranked by sample quality under one judge), then draw the same images from every trial's final EMA
model and write a report in the shape of the paper's table: per setting FD at two sample counts, KD,
MS-SSIM and class fidelity with bootstrap 95% intervals, beside the paper's published values, the
paired difference of settings 2-5 from setting 1, curves, and sample grids beside real images.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from cnd_ray import config as config_lib
from cnd_ray.errors import UserError

DEFAULT_SPACE = "paper_settings"
GRID_PER_CLASS = 8  # samples per class in each setting's grid
BOOTS = 200  # bootstrap resamples for the table's intervals
BASELINE = "1"  # the plain conditional DiT: what settings 2-5 are compared with
# The poster's numbers (METHOD.md section 4): FID at 5k / 10k / 20k generated images, MS-SSIM.
PAPER = {"1": (69.10, 48.75, 45.77, 0.583), "2": (27.21, 15.94, 18.27, 0.372),
         "3": (3.93, 2.71, 2.42, 0.316), "4": (2.69, 2.64, 2.75, 0.462), "5": (4.29, 3.90, 2.43, 0.285)}


def run(cfg: config_lib.Config, out: str = "quickstart", space: str = DEFAULT_SPACE) -> dict:
    """Data, search, samples, table, report; returns {"report", "search", "best", "shards",
    "comparison", "floors", "seconds"}."""
    from cnd_ray import session, train, tune

    t0 = time.time()
    if not cfg.eval.sample_metrics:
        raise UserError("eval.sample_metrics: the quickstart compares settings by sample quality; "
                        "leave it true")
    # A local Ray with room for one single-thread trial more than there are cores. On 2 cores, 2 or
    # 3 such trials train 7.0 steps/s in all, 5 only 6.4 (and 5 starting together spawned ~50
    # Ray worker processes, with 30% data wait); 2 at a time leaves the fifth trial alone on one
    # core. 3 then 2: ~570 s of training for the five, against ~715 s two at a time.
    session.connect(num_cpus=max(session.local_cpus(), math.ceil(tune.cpus_for(space, cfg, (os.cpu_count() or 1) + 1))))
    out_dir = Path(out).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    _step(1, "data")
    cfg = train.with_shards(cfg)
    _step(2, f"search: {space}")
    search = tune.run(space, cfg)
    _step(3, "samples: the same images from every trial's EMA model")
    samples = _samples(search["rows"], out_dir, cfg)
    _step(4, "report: the paper's table, under the search's judge")
    from cnd_ray.evaluate import judge as judge_lib

    judge = judge_lib.load(search["judge"])
    comparison = _compare(judge, samples, cfg)
    report = _report(search, samples, comparison, judge, out_dir, cfg, time.time() - t0)
    return {"report": str(report), "search": search, "best": search["best"], "shards": cfg.data.shards,
            "comparison": comparison, "floors": {n: judge.floor(n) for n in counts(cfg)},
            "real_lesion_share": judge.meta["lesion_share_real"],
            "seconds": time.time() - t0}


def _step(i: int, what: str) -> None:
    print(f"\n[cnd-ray quickstart] {i}/4 {what}", flush=True)


def _label(row: dict) -> str:
    return f"setting {row['setting']}" if row["setting"] else row["trial"]


def counts(cfg) -> list[int]:
    """Images per class the table reports at: half the search's count, and the search's count
    (the images its last evaluation judged: the table and the ranking agree)."""
    n = cfg.eval.search_samples
    return [max(2, n // 2), n]


def _samples(rows: list[dict], out_dir: Path, cfg) -> dict[str, dict]:
    """trial id -> {"row", "folder", "images", "labels"}: the largest count's plan drawn from every
    trial's final EMA model with the search's sampler (so its first eval.search_samples per class are
    the images the last evaluation judged), as PNG class folders `cnd-ray sample` would write."""
    from cnd_ray import checkpoint, generate, monitor, sample
    from cnd_ray.evaluate.run import read_samples

    got = {}
    for row in rows:
        if not row["checkpoint"]:
            continue
        ck_cfg, ema, step = checkpoint.load_ema(row["checkpoint"])
        run_cfg = monitor.search_config(ck_cfg)
        k = run_cfg.model.num_classes
        plan = generate.plan(max(counts(cfg)) * k, [1.0] * k, run_cfg.eval.seed, run_cfg.eval.batch_size)
        folder = out_dir / "samples" / _label(row).replace(" ", "")
        sample.generate_images(run_cfg, row["checkpoint"], step, ema, plan, folder, progress=False,
                               drawn=_judged(row["checkpoint"], plan))
        got[row["trial"]] = {"row": row, "folder": folder, "labels": plan["label"],
                             "images": read_samples(folder, plan["index"], plan["label"])}
        print(f"  {_label(row)}: {folder}", flush=True)
    return got


def _judged(ckpt: str, plan: dict) -> np.ndarray | None:
    """The images the trial's last evaluation drew and judged (worker.JUDGED in its final
    checkpoint) when they are this plan's, else None."""
    from cnd_ray.worker import JUDGED

    path = Path(ckpt) / JUDGED
    if not path.exists():
        return None
    with np.load(path) as got:
        same = np.array_equal(got["index"], plan["index"]) and np.array_equal(got["seed"], plan["seed"])
        return got["images"] if same else None


def _compare(judge, samples: dict, cfg) -> dict | None:
    from cnd_ray.evaluate import compare

    if not samples:
        return None
    by_setting = {s["row"]["setting"] or s["row"]["trial"]: s for s in samples.values()}
    baseline = BASELINE if BASELINE in by_setting else next(iter(by_setting))
    return compare.table(judge, {k: (v["images"], v["labels"]) for k, v in by_setting.items()},
                         counts(cfg), baseline, BOOTS, cfg.eval.seed)


def _ci(x: dict, digits: int = 2) -> str:
    return f"{x['value']:.{digits}f} [{x['low']:.{digits}f}, {x['high']:.{digits}f}]"


def paper_table(comparison: dict, floors: dict, real_lesion_share: float) -> str:
    """Markdown: per setting FD at both counts, KD, MS-SSIM, fidelity (95% intervals), and the
    paper's FID 5k / 10k and MS-SSIM beside them."""
    n1, n2 = comparison["counts"]
    head = ["setting", f"FD judge @{n1}/class", f"FD judge @{n2}/class", f"KD judge @{n2} (x1e3)",
            f"MS-SSIM @{n2}", f"fidelity AUROC @{n2}", f"lesion shown @{n2}", "paper FID 5k", "paper FID 10k",
            "paper MS-SSIM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in comparison["models"].items():
        a, b = m[f"n{n1}"], m[f"n{n2}"]
        kd = {k: 1e3 * v for k, v in b["kd"].items()}
        paper = PAPER.get(name)
        cells = [name, _ci(a["fd"]), _ci(b["fd"]), _ci(kd), _ci(b["ms_ssim"], 3), _ci(b["fidelity_auroc"], 3),
                 _ci(b["lesion_share"])]
        cells += [f"{paper[0]:.2f}", f"{paper[1]:.2f}", f"{paper[3]:.3f}"] if paper else ["-"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| real vs real (floor) | {floors[n1]['fd']:.2f} | {floors[n2]['fd']:.2f} | | | | "
                 f"{real_lesion_share:.2f} | | | |")
    return "\n".join(lines) + "\n"


def verdicts(comparison: dict) -> list[str]:
    """One plain line per setting: did it beat the baseline on FD (and fidelity), by how much?"""
    from cnd_ray.evaluate import compare

    n = comparison["counts"][-1]
    base = comparison["baseline"]
    out = []
    for name, m in comparison["models"].items():
        if name == base:
            continue
        d = m[f"delta_n{n}"]
        word = {"better": "beats", "worse": "is worse than", "no clear difference": "does not clearly differ from"}
        out.append(f"Setting {name} {word[compare.verdict(d, 'fd')]} setting {base} on FD "
                   f"({d['fd']['value']:+.2f}, 95% CI [{d['fd']['low']:+.2f}, {d['fd']['high']:+.2f}] at "
                   f"{n} per class; negative = closer to the real images); class fidelity "
                   f"{d['fidelity_auroc']['value']:+.3f} [{d['fidelity_auroc']['low']:+.3f}, "
                   f"{d['fidelity_auroc']['high']:+.3f}].")
    return out


def _grid(images, labels, path: Path) -> None:
    """A class grid (rows benign, malignant), drawn 3x bigger: 32 px images are small on screen."""
    from PIL import Image

    from cnd_ray import monitor

    img = Image.fromarray(monitor.tile(images, labels, GRID_PER_CLASS))
    img.resize((img.width * 3, img.height * 3), Image.NEAREST).save(path)


def _real_grid(cfg, path: Path) -> None:
    """Held-out real images in the same layout as the sample grids, for the reader to compare."""
    from cnd_ray.data import shards as shards_lib, shardset

    m, split = shardset.read_manifest(cfg.data.shards), cfg.eval.heldout_split
    labels = shards_lib.split_labels(cfg.data.shards, m, split)
    pos = np.sort(np.concatenate([np.flatnonzero(labels == c)[:GRID_PER_CLASS] for c in np.unique(labels)]))
    _grid(shards_lib.read_rows(cfg.data.shards, m, split, pos), labels[pos], path)


def _plot(rows: list[dict], path: Path, real_lesion_share: float) -> bool:
    """fd_ratio, class fidelity and the share of samples showing a lesion over training, one line
    per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in rows if r.get("curves")]
    if not curves:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for r in curves:
        for ax, key in zip(axes, ("fd_ratio", "fidelity_auroc", "lesion_share")):
            pts = r["curves"].get(key, [])
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=_label(r))
    axes[0].axhline(5.0, color="grey", ls="--", lw=1, label="5x the floor")
    axes[0].set_yscale("log")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    axes[0].yaxis.set_major_locator(LogLocator(subs=(1, 1.5, 2, 3, 5, 7)))
    axes[0].yaxis.set_major_formatter(ScalarFormatter())
    axes[0].yaxis.set_minor_formatter(NullFormatter())
    axes[0].set_ylabel("FD / real-vs-real floor (lower is better)")
    axes[1].axhline(0.95, color="grey", ls="--", lw=1, label="0.95")
    axes[1].set_ylabel("class-fidelity AUROC")
    axes[2].axhline(real_lesion_share, color="grey", ls="--", lw=1, label="held-out images")
    axes[2].set_ylabel("share of samples showing a lesion")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _report(search: dict, samples: dict, comparison: dict | None, judge, out_dir: Path, cfg,
            seconds: float) -> Path:
    from cnd_ray import tracking
    from cnd_ray.evaluate.judge import LESION_FRACTION

    rows, best, s = search["rows"], search["best"], search["space"]
    meta = judge.meta
    n1, n2 = counts(cfg)
    floors = {n: judge.floor(n) for n in (n1, n2)}
    from cnd_ray.models import params

    dit_params = params.count(cfg)["dit"]
    lines = [f"# cnd_ray quickstart: {search['name']}", "",
             f"{len(rows)} trials of `{s.name}` on `{cfg.data.shards}` ({cfg.train.steps} steps each, "
             f"DiT {cfg.model.size}/{cfg.model.patch_size}, {cfg.data.image_size} px {cfg.data.space}, "
             f"critic {cfg.classifier.backbone}), ranked by `{s.metric}` ({s.mode}); "
             f"{seconds / 60:.1f} minutes in all.", "",
             f"The judge: an independent {meta['backbone']} trained on the `{meta['split']}` split "
             f"({meta['train_images']} images, {meta['steps']} steps), held-out AUROC "
             f"{meta['heldout_auroc']:.3f} on `{meta['heldout_split']}`. `fd_ratio` is FD in its "
             f"feature space (per class, samples vs held-out images, averaged) over the same FD of real "
             f"images at the same count (the floor): 1 = as close as real images are.", "",
             "## The search, ranked", "", search["table"]]
    if comparison:
        lines += ["## The paper's table, at this scale", "",
                  f"Every setting's final EMA model drew the same {n2} images per class "
                  f"({cfg.eval.search_sampler} x {cfg.eval.search_sample_steps} steps, guidance "
                  f"{cfg.diffusion.guidance_scale}, seed {cfg.eval.seed}). 95% bootstrap intervals "
                  f"({BOOTS} resamples of the samples and of the held-out images).", "",
                  paper_table(comparison, floors, meta["lesion_share_real"]), "",
                  "`lesion shown`: the share of samples whose centre is darker than their skin by at "
                  f"least {LESION_FRACTION:g} x the median of the held-out images of their "
                  "class (the real row: the held-out images themselves).", "",
                  "What differs from the paper: FD here is in the judge's feature space, per class, "
                  f"on {cfg.data.image_size} px images of `{cfg.data.shards}` (the paper: Inception "
                  f"FID on 256 px ISIC images), at {n1} and {n2} images per class (the paper: 5k-20k "
                  f"images), after {cfg.train.steps} steps of a {dit_params / 1e6:.1f}M-parameter "
                  f"DiT-{cfg.model.size}/{cfg.model.patch_size} (the paper: ~100k steps of DiT-L/4). "
                  "Only differences within this table mean something; the paper's columns are there "
                  "for the ranking, not the values.", "",
                  "**Do settings 2-5 beat setting 1 (the paper's claim)?**", ""]
        lines += [f"- {v}" for v in verdicts(comparison)] + [""]
    if _plot(rows, out_dir / "curves.png", meta["lesion_share_real"]):
        lines += ["## Over training", "", "![fd_ratio, class fidelity and lesion share over training](curves.png)", ""]
    _real_grid(cfg, out_dir / "real.png")
    lines += ["## Samples beside real images", "",
              f"Rows: benign, malignant; the first {GRID_PER_CLASS} of each class.", "",
              f"Real (`{cfg.eval.heldout_split}` split):", "", "![real images](real.png)", ""]
    grids = ["real.png"]
    for r in rows:
        got = samples.get(r["trial"])
        if got:
            name = f"samples_{_label(r).replace(' ', '')}.png"
            _grid(got["images"], got["labels"], out_dir / name)
            grids.append(name)
            lines += [f"### {_label(r).capitalize()}" + (" (best)" if best and r["trial"] == best["trial"] else ""),
                      "", f"![{_label(r)}]({name})", ""]
    if best:
        lines += ["## Next", "", f"Best: {_label(best)}, checkpoint `{best['checkpoint']}`. Its "
                  "evaluation at more samples, with memorisation and PCA plots:", "",
                  f"    cnd-ray evaluate --ckpt {best['checkpoint']} --reference {cfg.data.shards} "
                  "--num-samples 1000 eval.extractors=fidelity", ""]
    uri = tracking.resolve_uri(cfg.track.tracking_uri)
    lines += ["## Where things are", "",
              f"- search (Ray Tune): `{search['path']}`",
              f"- samples: `{out_dir / 'samples'}` (PNG class folders, index.parquet, sample.json)",
              f"- MLflow: `{uri}`, parent run `{search['parent_run_id']}`; browse: `{tracking.ui_command(uri)}`", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=1))
    for f in [path, out_dir / "comparison.json", out_dir / "curves.png", *(out_dir / g for g in grids)]:
        if f.exists():  # the report beside the table in the search's MLflow parent run
            tracking.log_file(uri, search["parent_run_id"], str(f), "quickstart")
    if comparison:
        _log_comparison(uri, search["parent_run_id"], comparison)
    return path


def _log_comparison(uri: str, run_id: str, comparison: dict) -> None:
    """The table's numbers as metrics of the parent run: setting<k>_<metric>_n<count>[_low|_high]."""
    from cnd_ray import tracking

    flat = {}
    for name, m in comparison["models"].items():
        for part, vals in m.items():
            for k, v in vals.items():
                for end, x in (("", v["value"]), ("_low", v["low"]), ("_high", v["high"])):
                    if np.isfinite(x):
                        flat[f"setting{name}_{k}_{part}{end}"] = x
    tracking.log_metrics(uri, run_id, flat)
