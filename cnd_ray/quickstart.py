"""`cnd-ray quickstart`: the main job on the embedded default, end to end on one laptop.

Synthesise and ingest a data set (unless data.shards names one), run the paper_settings search at
the quickstart scale (five Class-N-Diff trials, each a Ray Train run, nested in one MLflow parent),
then sample from every trial's final EMA model and write a short report: the ranked table, a
validation-loss plot, a class grid per setting and a larger grid from the best trial.
"""
from __future__ import annotations

import time
from pathlib import Path

from cnd_ray import config as config_lib
from cnd_ray.errors import UserError

DEFAULT_SPACE = "paper_settings"
GRID_PER_CLASS = 8  # samples per class in each setting's grid
BEST_PER_CLASS = 16  # ... and in the best trial's


def run(cfg: config_lib.Config, out: str = "quickstart", space: str = DEFAULT_SPACE) -> dict:
    """Data, search, samples, report; returns {"report", "search", "best", "shards"}."""
    from cnd_ray import session, train, tune

    t0 = time.time()
    session.connect()
    out_dir = Path(out).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    _step(1, "data")
    cfg = train.with_shards(cfg)
    _step(2, f"search: {space}")
    search = tune.run(space, cfg)
    _step(3, "samples from every trial's EMA model")
    grids = _grids(search["rows"], out_dir, cfg)
    _step(4, "report")
    report = _report(search, grids, out_dir, cfg, time.time() - t0)
    return {"report": str(report), "search": search, "best": search["best"], "shards": cfg.data.shards}


def _step(i: int, what: str) -> None:
    print(f"\n[cnd-ray quickstart] {i}/4 {what}", flush=True)


def _grids(rows: list[dict], out_dir: Path, cfg) -> dict[str, str]:
    """trial id -> PNG of its class grid (rows = benign, malignant); 'best' -> the best's larger one."""
    from PIL import Image

    from cnd_ray import checkpoint, monitor, vae

    try:
        decoder = vae.for_run(cfg)
    except UserError as e:
        print(f"no sample grids: {e}", flush=True)
        return {}
    grids = {}
    for i, row in enumerate(rows):
        if not row["checkpoint"]:
            continue
        state = checkpoint.load(row["checkpoint"], restore_rng=False)
        label = f"setting{row['setting']}" if row["setting"] else row["trial"]
        jobs = [(row["trial"], f"samples_{label}.png", GRID_PER_CLASS)]
        if i == 0 and row["status"] != "error":
            jobs.append(("best", "samples_best.png", BEST_PER_CLASS))
        for key, name, per_class in jobs:
            # The same noise for every trial (seed 0): the grids differ only by the model.
            Image.fromarray(monitor.sample_grid(state, per_class=per_class, vae=decoder)).save(out_dir / name)
            grids[key] = name
        print(f"  {label}: {out_dir / grids[row['trial']]}", flush=True)
    return grids


def _plot(rows: list[dict], metric: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(r, r["curve"]) for r in rows if r.get("curve")]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r, curve in curves:
        label = f"setting {r['setting']}" if r["setting"] else r["trial"]
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _report(search: dict, grids: dict, out_dir: Path, cfg, seconds: float) -> Path:
    from cnd_ray import tracking

    rows, best = search["rows"], search["best"]
    s = search["space"]
    lines = [f"# cnd_ray quickstart: {search['name']}", "",
             f"{len(rows)} trials of `{s.name}` on `{cfg.data.shards}` "
             f"({cfg.train.steps} steps each, DiT {cfg.model.size}/{cfg.model.patch_size}, "
             f"{cfg.data.image_size} px {cfg.data.space}), ranked by {s.metric} ({s.mode}); "
             f"{seconds / 60:.1f} minutes in all.", "",
             f"`{s.metric}` is the EMA model's diffusion loss on the validation split (fixed noise "
             "and timesteps, so trials compare); `val_auroc` is the joint classifier's. Sample quality "
             "(FID, KID, MS-SSIM) is `cnd-ray evaluate`'s job.", "", search["table"]]
    if _plot(rows, s.metric, out_dir / "val_curves.png"):
        lines += [f"![{s.metric} over training](val_curves.png)", ""]
    if best and "best" in grids:
        lines += [f"## Best: {'setting ' + best['setting'] if best['setting'] else best['trial']}", "",
                  f"Checkpoint: `{best['checkpoint']}`. Its FID-style metrics, diversity and class "
                  "fidelity (fast on a CPU: 1000 samples, the dermoscopy-aware feature space only):", "",
                  f"    cnd-ray evaluate --ckpt {best['checkpoint']} --reference {cfg.data.shards} "
                  "--num-samples 1000 eval.extractors=fidelity", "",
                  "Rows: benign, malignant.", "", f"![best trial samples]({grids['best']})", ""]
    for r in rows:
        name = grids.get(r["trial"])
        if name:
            label = f"Setting {r['setting']}" if r["setting"] else r["trial"]
            lines += [f"### {label}", "", f"![{label}]({name})", ""]
    uri = tracking.resolve_uri(cfg.track.tracking_uri)
    lines += ["## Where things are", "",
              f"- search (Ray Tune): `{search['path']}`",
              f"- MLflow: `{uri}`, parent run `{search['parent_run_id']}`; browse: `{tracking.ui_command(uri)}`", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    for f in [path, out_dir / "val_curves.png", *(out_dir / g for g in grids.values())]:
        if f.exists():  # the report beside the table in the search's MLflow parent run
            tracking.log_file(uri, search["parent_run_id"], str(f), "quickstart")
    return path
