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
import re
import time
from pathlib import Path

import numpy as np

from cnd_ray import config as config_lib
from cnd_ray.errors import UserError

DEFAULT_SPACE = "paper_settings"
DEFAULT_OUT = "quickstart"  # the report folder, under the working directory
GRID_PER_CLASS = 8  # samples per class in each setting's grid
BOOTS = 200  # bootstrap resamples for the table's intervals
BASELINE = "1"  # the plain conditional DiT: what settings 2-5 are compared with
# The poster's numbers (METHOD.md section 4): FID at 5k / 10k / 20k generated images, MS-SSIM.
PAPER = {"1": (69.10, 48.75, 45.77, 0.583), "2": (27.21, 15.94, 18.27, 0.372),
         "3": (3.93, 2.71, 2.42, 0.316), "4": (2.69, 2.64, 2.75, 0.462), "5": (4.29, 3.90, 2.43, 0.285)}


def run(cfg: config_lib.Config, out: str = DEFAULT_OUT, space: str = DEFAULT_SPACE, name: str = "") -> dict:
    """Data, search, samples, table, report; returns {"report", "search", "best", "shards",
    "comparison", "floors", "seconds"}. `name`: the search's (default: from the space and config)."""
    from cnd_ray.launch import session, train, tune

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
    search = tune.run(space, cfg, name=name)
    _step(3, "samples: the same images from every trial's EMA model, with and without guidance")
    samples = _samples(search["rows"], out_dir, cfg)
    _step(4, "report: the paper's table, under the search's judge")
    from cnd_ray.evaluate import judge as judge_lib

    judge = judge_lib.load(search["judge"])
    comparison = _compare(judge, samples, cfg)
    fairness = fairness_lines(search["rows"], search["trials"], out_dir, cfg)
    report = _report(search, samples, comparison, judge, out_dir, cfg, time.time() - t0, fairness)
    return {"report": str(report), "search": search, "best": search["best"], "shards": cfg.data.shards,
            "fairness": "\n".join(fairness),
            "comparison": comparison, "floors": {n: judge.floor(n) for n in counts(cfg)},
            "real_lesion_share": judge.meta["lesion_share_real"], "judge": judge.meta,
            "seconds": time.time() - t0}


def _step(i: int, what: str) -> None:
    print(f"\n[cnd-ray quickstart] {i}/4 {what}", flush=True)


def _seed(row: dict) -> int | None:
    """The trial's train.seed when its search varies it (several seeds of each setting), else None."""
    return row["overrides"].get("train.seed")


def key(row: dict) -> str:
    """A trial's name in the comparison: its setting (the paper's "1".."5"), with its seed when the
    search varies train.seed; its trial id when it has no setting."""
    name = row["setting"] or row["trial"]
    return name if _seed(row) is None else f"{name} @seed{_seed(row)}"


def _label(row: dict) -> str:
    return f"setting {key(row)}" if row["setting"] else key(row)


def _slug(row: dict) -> str:
    """The trial's label as a file name: setting1, setting4-seed2, ..."""
    return re.sub(r"[^A-Za-z0-9.-]+", "", _label(row).replace(" @", "-"))


def counts(cfg) -> list[int]:
    """Images per class the table reports at: half the search's count, and the search's count
    (the images its last evaluation judged: the table and the ranking agree)."""
    n = cfg.eval.search_samples
    return [max(2, n // 2), n]


def modes(cfg) -> dict[str, float]:
    """The guidance scales every trial's images are drawn at: "paper", without guidance (as the paper
    samples; guidance alone lifts class fidelity towards 1), and "guided", at the run's
    diffusion.guidance_scale (what the search ranked by) when that is not 1."""
    g = cfg.diffusion.guidance_scale
    return {"paper": 1.0} if g == 1.0 else {"paper": 1.0, "guided": g}


def mode_title(mode: str, scale: float) -> str:
    return "no guidance (as the paper samples)" if mode == "paper" else f"guidance {scale:g}"


def _samples(rows: list[dict], out_dir: Path, cfg) -> dict[str, dict]:
    """trial id -> {"row", "labels", "modes": {mode: {"folder", "images"}}}: the largest count's plan
    drawn from every trial's final EMA model with the search's sampler at each of `modes` (so the
    guided set's first eval.search_samples per class are the images the last evaluation judged), as
    PNG class folders `cnd-ray sample` would write."""
    from cnd_ray import checkpoint, config as C, generate, monitor
    from cnd_ray.launch import sample
    from cnd_ray.jobs.evaluate import read_samples

    got = {}
    for row in rows:
        if not row["checkpoint"]:
            continue
        ck_cfg, ema, step = checkpoint.load_ema(row["checkpoint"])
        k = ck_cfg.model.num_classes
        plan = None
        entry = {"row": row, "modes": {}}
        for mode, scale in modes(cfg).items():
            run_cfg = C.override(monitor.search_config(ck_cfg), {"diffusion.guidance_scale": scale})
            plan = generate.plan(max(counts(cfg)) * k, [1.0] * k, run_cfg.eval.seed, run_cfg.eval.batch_size)
            folder = out_dir / "samples" / (_slug(row) + ("-guided" if mode == "guided" else ""))
            judged = _judged(row["checkpoint"], plan) if scale == ck_cfg.diffusion.guidance_scale else None
            sample.generate_images(run_cfg, row["checkpoint"], step, ema, plan, folder, progress=False, drawn=judged)
            entry["modes"][mode] = {"folder": folder, "images": read_samples(folder, plan["index"], plan["label"])}
            print(f"  {_label(row)} ({mode_title(mode, scale)}): {folder}", flush=True)
        entry["labels"] = plan["label"]
        got[row["trial"]] = entry
    return got


def _judged(ckpt: str, plan: dict) -> np.ndarray | None:
    """The images the trial's last evaluation drew and judged (worker.JUDGED in its final
    checkpoint) when they are this plan's, else None."""
    from cnd_ray.launch.worker import JUDGED

    path = Path(ckpt) / JUDGED
    if not path.exists():
        return None
    with np.load(path) as got:
        same = np.array_equal(got["index"], plan["index"]) and np.array_equal(got["seed"], plan["seed"])
        return got["images"] if same else None


def baselines(rows: list[dict]) -> dict[str, str]:
    """What each trial is compared with: setting 1 (BASELINE) at the same seed; every trial against the
    first when the search has no setting 1."""
    base = {_seed(r): key(r) for r in rows if r["setting"] == BASELINE}
    if not base:
        first = key(rows[0]) if rows else None
        return {key(r): first for r in rows if key(r) != first}
    return {key(r): base[_seed(r)] for r in rows if _seed(r) in base and key(r) != base[_seed(r)]}


def pools(rows: list[dict]) -> dict[str, list[str]]:
    """Each setting's trials over its seeds (a search that varies train.seed), else none."""
    if all(_seed(r) is None for r in rows):
        return {}
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r["setting"] or r["trial"], []).append(key(r))
    return out


def _compare(judge, samples: dict, cfg) -> dict | None:
    """{mode: compare.table} over every trial's images at that guidance."""
    from cnd_ray.evaluate import compare

    if not samples:
        return None
    rows = [s["row"] for s in samples.values()]
    labels = next(iter(samples.values()))["labels"]
    out = {}
    for mode, scale in modes(cfg).items():
        models = {key(s["row"]): (s["modes"][mode]["images"], labels) for s in samples.values()}
        out[mode] = compare.table(judge, models, counts(cfg), baselines(rows), BOOTS, cfg.eval.seed, pools(rows))
        out[mode]["scale"] = scale
    return out


def ci(x: dict, digits: int = 2, signed: bool = False) -> str:
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if not np.isfinite(x["value"]):
        return "-"
    if not (np.isfinite(x["low"]) and np.isfinite(x["high"])):
        return f.format(x["value"])
    return f"{f.format(x['value'])} [{f.format(x['low'])}, {f.format(x['high'])}]"


def _rows_of(comparison: dict) -> dict[str, dict]:
    """The table's rows: each setting pooled over its seeds when there are pools, else each model."""
    return comparison["pools"] or comparison["models"]


def paper_table(comparison: dict, floors: dict, real_lesion_share: float) -> str:
    """Markdown for one guidance mode: per setting FD at both counts, KD, MS-SSIM, fidelity, the lesion
    share per class (95% intervals; a setting pooled over its seeds as the mean), and the paper's FID
    5k / 10k and MS-SSIM beside them."""
    n1, n2 = comparison["counts"]
    head = ["setting", f"FD judge @{n1}/class", f"FD judge @{n2}/class", f"KD judge @{n2} (x1e3)",
            f"MS-SSIM @{n2}", f"fidelity AUROC @{n2}", f"lesion shown @{n2}: benign", "malignant",
            "paper FID 5k", "paper FID 10k", "paper MS-SSIM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in _rows_of(comparison).items():
        a, b = m[f"n{n1}"], m[f"n{n2}"]
        kd = {k: 1e3 * v for k, v in b["kd"].items()}
        paper = PAPER.get(name)
        cells = [name, ci(a["fd"]), ci(b["fd"]), ci(kd), ci(b["ms_ssim"], 3), ci(b["fidelity_auroc"], 3),
                 ci(b["lesion_share_benign"]), ci(b["lesion_share_malignant"])]
        cells += [f"{paper[0]:.2f}", f"{paper[1]:.2f}", f"{paper[3]:.3f}"] if paper else ["-"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| real vs real (floor) | {floors[n1]['fd']:.2f} | {floors[n2]['fd']:.2f} | | | | "
                 f"{real_lesion_share:.2f} (both) | | | | |")
    return "\n".join(lines) + "\n"


def verdict_table(comparison: dict) -> str:
    """Markdown for one guidance mode: each setting's paired difference from its baseline (setting 1
    at the same seed; over the seeds, their mean) on FD, class fidelity overall and per skin-tone group
    of the samples (with the sample counts), and the lesion share per class, each with its verdict."""
    from cnd_ray.data import tone
    from cnd_ray.evaluate import compare

    n = comparison["counts"][-1]
    rows = _rows_of(comparison)
    head = ["setting", f"FD vs setting {BASELINE}", "class fidelity", *(f"fidelity {g}" for g in tone.GROUPS),
            "lesion shown: benign", "malignant"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows.items():
        d = m.get(f"delta_n{n}")
        if d is None:
            continue
        groups = _group_counts(comparison, name)
        cells = [name]
        for k in ("fd", "fidelity_auroc", *compare.GROUP_FIDELITY, "lesion_share_benign", "lesion_share_malignant"):
            word = compare.verdict(d, k)
            extra = f" (n {groups[k]})" if k in groups else ""
            cells.append(f"{ci(d[k], 3 if 'fidelity' in k else 2, signed=True)}{extra}: **{word}**")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _group_counts(comparison: dict, name: str) -> dict[str, str]:
    """fidelity_auroc_<group> -> "benign/malignant" sample counts of the model (summed over a pool)."""
    from cnd_ray.data import tone

    members = comparison["pools"][name]["members"] if name in comparison["pools"] else [name]
    out = {}
    for g in tone.GROUPS:
        c = np.sum([comparison["models"][m]["groups"][g] for m in members], axis=0)
        out[f"fidelity_auroc_{g}"] = "/".join(str(int(v)) for v in c)
    return out


def verdicts(comparison: dict) -> list[str]:
    """One plain line per setting and guidance mode: did it beat its baseline on FD and on class
    fidelity, by how much, and how its FD compares with the baseline's (the no-harm bar: 1.5x)?"""
    from cnd_ray.evaluate import compare

    word = {"better": "beats", "worse": "is worse than", "no clear difference": "does not clearly differ from",
            "too few samples to tell": "cannot be told apart from"}
    out = []
    for mode, comp in comparison.items():
        n = comp["counts"][-1]
        rows = _rows_of(comp)
        base_fd = {name: _baseline_fd(comp, name, n) for name in rows}
        for name, m in rows.items():
            d = m.get(f"delta_n{n}")
            if d is None:
                continue
            fd = m[f"n{n}"]["fd"]["value"]
            out.append(f"Setting {name} ({mode_title(mode, comp['scale'])}) {word[compare.verdict(d, 'fd')]} "
                       f"setting {BASELINE} on FD ({ci(d['fd'], 2, True)} at {n} per class; {fd / base_fd[name]:.2f}x "
                       f"its FD) and {word[compare.verdict(d, 'fidelity_auroc')]} it on class fidelity "
                       f"({ci(d['fidelity_auroc'], 3, True)}).")
    return out


def _baseline_fd(comp: dict, name: str, n: int) -> float:
    """The FD of what `name` is compared with: its baseline model, or its pool members' baselines' mean."""
    members = comp["pools"][name]["members"] if name in comp["pools"] else [name]
    base = comp["baseline"]
    bases = [base if isinstance(base, str) else base.get(m) for m in members]
    return float(np.mean([comp["models"][b][f"n{n}"]["fd"]["value"] for b in bases if b]))


def fairness_results(rows: list[dict]) -> dict[str, dict]:
    """Trial key -> the in-loop fairness evaluation its final checkpoint holds (worker.FAIRNESS;
    fairness.in_loop), for the trials that have one."""
    from cnd_ray.launch.worker import FAIRNESS

    out = {}
    for r in rows:
        path = Path(r["checkpoint"] or "") / FAIRNESS
        if r["checkpoint"] and path.is_file():
            out[key(r)] = json.loads(path.read_text())
    return dict(sorted(out.items()))  # setting 1 first


def gap_word(d: dict) -> str:
    """Did the light-dark AUROC gap narrow (towards 0) or widen, by its paired interval?"""
    if d.get("ci") is None or d.get("a") is None:
        return "not measurable"
    clear = d["ci"][0] > 0 or d["ci"][1] < 0  # the paired difference b - a excludes 0
    if not clear:
        return "no clear change"
    return "narrower" if abs(d["b"]) < abs(d["a"]) else "wider"  # the gap's size, on either side


def _seeds(f) -> str:
    """'seed 0', or 'the mean logit of 3, seeds 0, 1000, 2000' (fairness.members)."""
    from cnd_ray.fairness import downstream as ds

    if f.members == 1:
        return f"seed {f.seed}"
    return f"the mean logit of {f.members}, seeds " + ", ".join(map(str, ds.member_seeds(f)))


def auroc_word(d: dict) -> str:
    if d.get("ci") is None:
        return "not measurable"
    return "higher" if d["ci"][0] > 0 else "lower" if d["ci"][1] < 0 else "no clear change"


def paired_cells(p: dict) -> list[str]:
    """The worst-group AUROC and light-dark gap cells of a paired difference, each with its word."""
    from cnd_ray.fairness import downstream as ds

    return [f"{ds.interval(p['worst_group_auroc'])}: **{auroc_word(p['worst_group_auroc'])}**",
            f"{ds.interval(p['light_dark_gap'])}: **{gap_word(p['light_dark_gap'])}**"]


def fairness_table(fair: dict, cfg) -> tuple[str, dict]:
    """Markdown: the real-only and reweighted-real classifiers, then per setting the classifier on real
    + that setting's fill images: worst-group AUROC, light-dark gap, V-VI sensitivity (95% bootstrap
    intervals), and the paired differences from real-only, reweighted real and setting 1's samples.
    Returns (table, {setting: its paired_delta from setting 1's classifier})."""
    from cnd_ray.fairness import downstream as ds, metrics

    f = cfg.fairness
    first = next(iter(fair.values()))
    base = fair.get(BASELINE)
    vs_base = {}
    head = ["classifier trained on", "worst-group AUROC", "light-dark gap", f"{ds.DARKEST} sensitivity",
            "worst-group vs real only", "gap vs real only", "worst-group vs reweighted", "gap vs reweighted",
            f"worst-group vs setting {BASELINE}'s", f"gap vs setting {BASELINE}'s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(r: dict) -> list[str]:
        dark = r["groups"].get(ds.DARKEST, {}).get("sensitivity") or {}
        return [ds.interval(r["worst_group_auroc"], False), ds.interval(r["light_dark_gap"]),
                ds.interval(dark, False)]

    for name in ds.BASELINES:
        lines.append("| " + " | ".join([f"{name} (baseline)", *cells(first["models"][name])] + ["-"] * 6) + " |")
    for name, got in fair.items():
        row = [f"real + setting {name}'s samples ({int(got['metrics']['fair_synthetic'])})",
               *cells(got["models"][ds.MIXED])]
        for b in ds.BASELINES:
            row += paired_cells(got["vs"][b])
        if base is not None and name != BASELINE:
            t = got["test"]
            vs_base[name] = metrics.paired_delta(t["labels"], base["test"]["scores"], t["scores"], t["groups"],
                                                 n_boot=f.bootstrap, seed=f.seed,
                                                 thresholds=(base["test"]["threshold"], t["threshold"]))
            row += paired_cells(vs_base[name])
        else:
            row += ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n", vs_base


def _fairness_plot(fair: dict, path: Path) -> None:
    """AUROC per skin-tone group with 95% intervals: real only, reweighted real, and real + each
    setting's samples side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cnd_ray.fairness import downstream as ds

    first = next(iter(fair.values()))
    models = {f"{b} (baseline)": first["models"][b] for b in ds.BASELINES}
    models.update({f"real + setting {n}'s samples": got["models"][ds.MIXED] for n, got in fair.items()})
    groups = list(ds.GROUPS)
    fig, ax = plt.subplots(figsize=(9, 5.2))
    width = 0.8 / len(models)
    for i, (name, r) in enumerate(models.items()):
        xs = np.arange(len(groups)) + (i - (len(models) - 1) / 2) * width
        vals = [r["groups"].get(g, {}).get("auroc", {}) for g in groups]
        v = np.array([x.get("value") if x.get("value") is not None else np.nan for x in vals])
        err = np.array([[x["value"] - x["ci"][0], x["ci"][1] - x["value"]] if x.get("ci") else [0, 0]
                        for x in vals]).T
        ax.bar(xs, v, width, yerr=err, capsize=2, label=name, color=f"C{i % 10}",
               hatch="//" if "baseline" in name else None, alpha=0.85)
    ax.set_xticks(np.arange(len(groups)), [f"Fitzpatrick {g}" for g in groups])
    ax.set_ylabel("downstream AUROC on held-out test images")
    ax.set_ylim(0.4, 1.0)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.09))  # below: no bar hidden
    ax.set_title("Does it make a fairer classifier? AUROC per skin-tone group (95% intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fairness_lines(rows: list[dict], trials: str, out_dir: Path, cfg) -> list[str]:
    """The report's section "Does it make a fairer classifier?" (empty without fairness.in_loop);
    `trials`: the search's trials folder, which the seeds bench it names reads."""
    from cnd_ray.fairness import downstream as ds

    fair = fairness_results(rows)
    if not fair:
        return []
    f = cfg.fairness
    first = next(iter(fair.values()))
    real = first["models"][ds.REAL]
    gap = real["light_dark_gap"]
    excludes = gap.get("ci") and (gap["ci"][0] > 0 or gap["ci"][1] < 0)
    table, vs_base = fairness_table(fair, cfg)
    _fairness_plot(fair, out_dir / "fairness.png")
    seconds = {key(r): r["seconds"] for r in rows}
    share = [got["metrics"]["fair_seconds"] / seconds[n] for n, got in fair.items() if seconds.get(n)]
    tests = first["models"][ds.REAL]["groups"]
    lines = ["## Does it make a fairer classifier?", "",
             f"Each trial's final EMA model drew {int(first['metrics']['fair_synthetic'])} images into the "
             f"(class, skin-tone group) cells the real training split lacks (`fairness.fill={f.fill}`, at most "
             f"{f.fill_ratio:g}:1 synthetic:real per cell, `fairness.fill_max={f.fill_max}`), asking for the "
             f"cell's tone group (tone guidance {cfg.diffusion.tone_guidance_scale:g}); {100 * np.nanmean([g['metrics']['fair_tone_match'] for g in fair.values()]):.0f}% "
             "show it (ITA on their pixels, which also decides the group they train in). A downstream "
             f"{f.backbone} then trained {f.steps} steps ({_seeds(f)}) on real + those images, its batches "
             "balanced over every (class, group) cell, and was scored on the held-out test split ("
             + ", ".join(f"{g} {t['n']} images, {t['positives']} malignant" for g, t in tests.items())
             + "), beside the same classifier on the real images alone and on them reweighted the same way "
             f"(computed once for the search). 95% bootstrap intervals ({f.bootstrap} resamples, stratified "
             "by group and label); the differences are paired on the same test images. The light-dark gap is "
             f"{ds.GROUPS[0]} minus {ds.DARKEST} AUROC. The intervals cover the test images, not the "
             "downstream classifier's seed: on the synthetic benchmark the seed alone moved the real-only "
             "worst-group AUROC over 0.65-0.77 (docs/DATA.md), so read a difference smaller than that spread "
             "as a lead, not a finding. `python bench/tone_guidance.py "
             f"{trials} --scales {cfg.diffusion.tone_guidance_scale:g} --fairness-seeds 0 1 2 3 4 5 6 7` (from the "
             "repository; about 3 minutes a seed on 2 cores) trains the downstream classifier at 8 seeds on "
             "these trials' own fills and puts its seed inside the interval.", "",
             f"The real-only classifier's light-dark gap: {ds.interval(gap)} - its interval "
             + ("excludes 0: the benchmark's imbalance costs the darkest group." if excludes else
                "includes 0: at this test size the benchmark shows no clear gap for synthetic images to close."),
             "", table, "", "![downstream AUROC per skin-tone group](fairness.png)", ""]
    for name, got in fair.items():
        p = got["vs"][ds.REAL]
        line = (f"- Setting {name}'s samples: worst-group AUROC {ds.interval(p['worst_group_auroc'])} against "
                f"real only ({auroc_word(p['worst_group_auroc'])}), gap {ds.interval(p['light_dark_gap'])} "
                f"({gap_word(p['light_dark_gap'])})")
        if name in vs_base:
            q = vs_base[name]
            line += (f"; against setting {BASELINE}'s samples, worst-group AUROC {ds.interval(q['worst_group_auroc'])} "
                     f"({auroc_word(q['worst_group_auroc'])}), gap {ds.interval(q['light_dark_gap'])} "
                     f"({gap_word(q['light_dark_gap'])})")
        lines.append(line + ".")
    if share:
        lo, hi = (f"{x:.0%}" for x in (min(share), max(share)))
        lines += ["", f"Cost: the in-loop evaluation (drawing the fill images, training and scoring the "
                  f"classifier) took {lo if lo == hi else f'{lo}-{hi}'} of a trial's time here."]
    return lines + [""]


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
    """fd_ratio, class fidelity, the share of samples showing a lesion per class and the critic's pull
    over training, one line per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    curves = [r for r in rows if r.get("curves")]
    if not curves:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    (fd, fid), (lesion, pull) = axes
    for i, r in enumerate(curves):
        colour = f"C{i % 10}"
        for ax, k in ((fd, "fd_ratio"), (fid, "fidelity_auroc"), (pull, "critic_pull")):
            pts = r["curves"].get(k, [])
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", color=colour, label=_label(r))
        for k, style in (("lesion_share_benign", "--"), ("lesion_share_malignant", "-")):
            pts = r["curves"].get(k, [])
            if pts:
                ax_label = f"{_label(r)}: {k.rsplit('_', 1)[1]}"
                lesion.plot([s for s, _ in pts], [v for _, v in pts], style, marker="o", color=colour, label=ax_label)
    fd.axhline(5.0, color="grey", ls="--", lw=1, label="5x the floor")
    for ax in (fd, pull):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    fd.set_ylabel("FD / real-vs-real floor (lower is better)")
    fid.axhline(0.95, color="grey", ls="--", lw=1, label="0.95")
    fid.set_ylabel("class-fidelity AUROC")
    lesion.axhline(real_lesion_share, color="grey", ls=":", lw=1, label="held-out images")
    lesion.set_ylabel("share of samples showing a lesion")
    pull.set_ylabel("critic's pull: ||grad from lambda L_cls|| / ||grad from L_diff||")
    if not pull.lines:
        pull.text(0.5, 0.5, "no critic in these trials", ha="center", va="center", transform=pull.transAxes)
    for ax in axes.flat:
        ax.set_xlabel("step")
        if ax.lines and len(curves) <= 12:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _report(search: dict, samples: dict, comparison: dict | None, judge, out_dir: Path, cfg,
            seconds: float, fairness: list[str]) -> Path:
    from cnd_ray import tracking
    from cnd_ray.evaluate.judge import LESION_FRACTION

    rows, best, s = search["rows"], search["best"], search["space"]
    meta = judge.meta
    n1, n2 = counts(cfg)
    floors = {n: judge.floor(n) for n in (n1, n2)}
    from cnd_ray.models import params

    dit_params = params.count(cfg)["dit"]
    test = meta.get("test")
    lines = [f"# cnd_ray quickstart: {search['name']}", "",
             f"{len(rows)} trials of `{s.name}` on `{cfg.data.shards}` "
             f"({s.fixed.get('train.steps', cfg.train.steps)} steps each, "
             f"DiT {cfg.model.size}/{cfg.model.patch_size}, {cfg.data.image_size} px {cfg.data.space}, "
             f"critic {cfg.classifier.backbone}), ranked by `{s.metric}` ({s.mode}); "
             f"{seconds / 60:.1f} minutes in this run (a resumed search counts only what it ran).", "",
             f"The judge: an independent {meta['backbone']} trained on the `{meta['split']}` split "
             f"({meta['train_images']} images, {meta['steps']} steps), held-out AUROC "
             f"{meta['heldout_auroc']:.3f} on `{meta['heldout_split']}`"
             + (" and, on the test split, " + ", ".join(f"{g} {v['auroc']:.3f} (n {v['n']})" for g, v in test.items())
                if test else "")
             + f". `fd_ratio` is FD in its feature space (per class, samples vs held-out images, averaged) "
             f"over the same FD of real images at the same count (the floor): 1 = as close as real "
             f"images are.", "", "## The search, ranked", "", search["table"]]
    if comparison:
        lines += ["## The paper's table, at this scale", "",
                  f"Every trial's final EMA model drew the same {n2} images per class "
                  f"({cfg.eval.search_sampler} x {cfg.eval.search_sample_steps} steps, seed {cfg.eval.seed}), "
                  f"without guidance as the paper samples, and with the search's guidance. 95% bootstrap "
                  f"intervals ({BOOTS} resamples of the samples and of the held-out images)"
                  + ("; a setting's row is the mean over its seeds." if any(c["pools"] for c in comparison.values())
                     else "."), ""]
        for mode, comp in comparison.items():
            lines += [f"### {mode_title(mode, comp['scale']).capitalize()}", "",
                      paper_table(comp, floors, meta["lesion_share_real"]), ""]
        lines += ["`lesion shown`: the share of samples whose centre is darker than their skin by at "
                  f"least {LESION_FRACTION:g} x the median of the held-out images of their class (the "
                  "floor row: the held-out images themselves).", "",
                  "What differs from the paper: FD here is in the judge's feature space, per class, "
                  f"on {cfg.data.image_size} px images of `{cfg.data.shards}` (the paper: Inception "
                  f"FID on 256 px ISIC images), at {n1} and {n2} images per class (the paper: 5k-20k "
                  f"images), after {cfg.train.steps} steps of a {dit_params / 1e6:.1f}M-parameter "
                  f"DiT-{cfg.model.size}/{cfg.model.patch_size} (the paper: ~100k steps of DiT-L/4). "
                  "Only differences within this table mean something; the paper's columns are there "
                  "for the ranking, not the values.", "",
                  f"## Does the classifier help? Each setting against setting {BASELINE}", "",
                  f"Paired differences (setting minus setting {BASELINE} at the same seed) at {n2} images per "
                  "class, 95% intervals. Class fidelity per skin-tone group is measured on the samples of "
                  "that group (their ITA, as `cnd-ray evaluate` reads it; n: benign/malignant samples): "
                  "where a group has too few of either class there is no interval.", ""]
        for mode, comp in comparison.items():
            lines += [f"### {mode_title(mode, comp['scale']).capitalize()}", "", verdict_table(comp), ""]
        lines += [f"- {v}" for v in verdicts(comparison)] + [""]
    lines += fairness
    if _plot(rows, out_dir / "curves.png", meta["lesion_share_real"]):
        lines += ["## Over training", "", "![fd_ratio, class fidelity, lesion share per class and the "
                  "critic's pull over training](curves.png)", ""]
    _real_grid(cfg, out_dir / "real.png")
    lines += ["## Samples beside real images", "",
              f"Rows: benign, malignant; the first {GRID_PER_CLASS} of each class.", "",
              f"Real (`{cfg.eval.heldout_split}` split):", "", "![real images](real.png)", ""]
    grids = ["real.png"]
    for r in rows:
        got = samples.get(r["trial"])
        if not got:
            continue
        lines += [f"### {_label(r).capitalize()}" + (" (best)" if best and r["trial"] == best["trial"] else ""), ""]
        for mode, scale in modes(cfg).items():
            name = f"samples_{_slug(r)}" + ("_guided" if mode == "guided" else "") + ".png"
            _grid(got["modes"][mode]["images"], got["labels"], out_dir / name)
            grids.append(name)
            lines += [f"{mode_title(mode, scale).capitalize()}:", "", f"![{_label(r)}, {mode}]({name})", ""]
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
    parent = tracking.Run(uri, search["parent_run_id"])
    for f in [path, out_dir / "comparison.json", out_dir / "curves.png", out_dir / "fairness.png",
              *(out_dir / g for g in grids)]:
        if f.exists():  # the report beside the table in the search's MLflow parent run
            parent.log_file(str(f), "quickstart")
    if comparison:
        _log_comparison(parent, comparison)
    return path


def _log_comparison(parent, comparison: dict) -> None:
    """The table's numbers as metrics of the parent run (tracking.Run):
    <mode>/setting<k>_<metric>_n<count>[_low|_high] (and _delta_n<count> against setting 1)."""
    flat = {}
    for mode, comp in comparison.items():
        for name, m in {**comp["models"], **comp["pools"]}.items():
            for part, vals in m.items():
                if part in ("groups", "members"):
                    continue
                for k, v in vals.items():
                    for end, x in (("", v["value"]), ("_low", v["low"]), ("_high", v["high"])):
                        if np.isfinite(x):
                            flat[f"{mode}/setting{name.replace(' ', '_').replace('@', '')}_{k}_{part}{end}"] = x
    parent.log_metrics(flat)
