"""`cnd-ray fairness`: does synthetic data make a benign/malignant classifier fairer across skin
tones? (the paper's purpose; issue 8)

1. Read the real training split (`--real` shards) and every `--synthetic` folder (written by
   `cnd-ray sample`). Each image gets a skin-tone group, I-II / III-IV / V-VI, from its ITA:
   the shards store it; synthetic images are measured on their pixels, since what counts is the
   tone they show, not the one asked for.
2. Train the downstream classifier (`fairness.backbone`) twice: on real data alone (classes
   balanced) and on real plus synthetic data (balanced by `fairness.balance`: classes, or every
   class x tone cell).
3. Choose each classifier's decision threshold on the real validation split.
4. Score every `--eval` set (cnd_ray.data.external), whose groups come from its Fitzpatrick labels
   where it has them and from ITA on the pixels otherwise. Report AUROC, sensitivity, specificity
   and balanced accuracy, per group, the worst group, the light-dark gap, and the
   equal-opportunity and equalized-odds differences, with bootstrap intervals
   (cnd_ray.fairness.metrics). With `--ckpt`, the Class-N-Diff joint classifier is scored as well.
5. Write fairness.json, fairness.md and ROC plots to `--out`, and log them to MLflow.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from cnd_ray import config as config_lib
from cnd_ray.data import external, stream, tone
from cnd_ray.data import image as image_lib
from cnd_ray.errors import UserError
from cnd_ray.evaluate import fidelity
from cnd_ray.fairness import metrics

GROUPS = external.GROUPS  # lightest first
SECTIONS = ("fairness.", "track.")  # the settings this verb reads


def group_of(fitzpatrick) -> str | None:
    """Fitzpatrick type 1..6 -> its DDI group; None when unknown (0 or missing)."""
    f = int(fitzpatrick) if fitzpatrick is not None else 0
    return GROUPS[(f - 1) // 2] if 1 <= f <= 6 else None


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    """uint8 (S, S, 3) -> (size, size, 3)."""
    if arr.shape[0] == size:
        return arr
    from PIL import Image

    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BICUBIC))


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)


def read_real(shards: str, manifest: dict, split: str, size: int, limit: int = 0,
              exclude: frozenset = frozenset()) -> dict:
    """A split of the shards: uint8 images (N, 3, size, size), labels, groups, ids; rows whose
    image_id is in `exclude` are left out (MClass-D's ISIC images when MClass is evaluated)."""
    images, labels, groups, ids, excluded = [], [], [], [], 0
    for path in stream.shard_files(shards, manifest, split):
        for b in stream.parquet_file(path).iter_batches(
                batch_size=256, columns=["image_id", "label", "fitzpatrick", "image"]):
            rows = b.to_pydict()
            for i, image_id in enumerate(rows["image_id"]):
                if image_id in exclude:
                    excluded += 1
                    continue
                if limit and len(ids) >= limit:
                    break
                images.append(_resize(image_lib.decode_png(rows["image"][i]), size))
                labels.append(int(rows["label"][i]))
                groups.append(group_of(rows["fitzpatrick"][i]))
                ids.append(image_id)
    if not ids:
        raise UserError(f"--real {shards}: no '{split}' images left to train on")
    return {"images": _stack(images), "labels": np.array(labels), "groups": groups, "ids": ids,
            "excluded": excluded}


def read_synthetic(folders: list[str], size: int, limit: int = 0) -> dict:
    """Every image of `cnd-ray sample` output folders, with its tone group measured on its pixels."""
    import pyarrow.parquet as pq

    images, labels, groups = [], [], []
    for folder in folders:
        index = Path(folder) / "index.parquet"
        if not index.is_file():
            raise UserError(f"--synthetic {folder}: no index.parquet; give a folder written by "
                            "`cnd-ray sample`")
        rows = pq.read_table(index, columns=["label", "file"]).to_pydict()
        for label, file in zip(rows["label"], rows["file"]):
            if limit and len(labels) >= limit:
                break
            path = Path(folder) / file
            if not path.is_file():
                raise UserError(f"--synthetic {folder}: {file} is listed in index.parquet but missing; "
                                "rerun `cnd-ray sample` with the same arguments to finish it")
            arr = image_lib.decode_png(path.read_bytes())
            images.append(_resize(arr, size))
            labels.append(int(label))
            groups.append(external.group_from_ita(tone.estimate_ita(arr)))
    return {"images": _stack(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8),
            "labels": np.array(labels, np.int64), "groups": groups}


def sample_weights(labels: np.ndarray, groups: list, balance: str) -> np.ndarray:
    """Sampling probabilities that give each class (or each class x tone cell present) the same
    share of training batches; images of unknown tone form their own cell."""
    keys = [(int(y),) if balance == "class" else (int(y), g or "unknown") for y, g in zip(labels, groups)]
    counts: dict = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    w = np.array([1.0 / counts[k] for k in keys])
    return w / w.sum()


def composition(labels: np.ndarray, groups: list) -> dict:
    """{group: {"benign": n, "malignant": n}} of a training set, unknown tone included."""
    out: dict = {}
    for y, g in zip(labels, groups):
        cell = out.setdefault(g or "unknown", {"benign": 0, "malignant": 0})
        cell["malignant" if y else "benign"] += 1
    return out


def _train(data: dict, weights: np.ndarray, cfg, device, desc: str, show: bool, backbone: str = ""):
    from tqdm import tqdm

    f = cfg.fairness
    bar = tqdm(total=f.steps, desc=desc, unit="step", disable=not show)
    model = fidelity.train(data["images"], data["labels"], backbone or f.backbone, f.steps,
                           batch=f.batch_size, lr=f.lr, seed=f.seed, device=device, sample_weights=weights,
                           backbone_weights="" if backbone else f.weights, progress=lambda s: bar.update(1))
    bar.close()
    return model


def _joint_classifier(ckpt: str, device):
    """The Class-N-Diff classifier a checkpoint holds (its EMA when kept), with its config; only
    pixel-space runs (a latent-space classifier reads VAE latents, not images)."""
    from cnd_ray import checkpoint
    from cnd_ray.models.classifier import build_classifier

    cfg = checkpoint.load_config(ckpt)
    if cfg.method.gamma_schedule == "off":
        raise UserError(f"--ckpt {ckpt}: has no classifier (method.gamma_schedule off)")
    if cfg.data.space != "pixel":
        raise UserError(f"--ckpt {ckpt}: a latent-space run; its classifier reads VAE latents, not images")
    weights = torch.load(Path(ckpt) / "weights.pt", map_location="cpu", weights_only=True)
    model = build_classifier(config_lib.override(cfg, {"classifier.weights": ""}))
    model.load_state_dict(weights.get("cls_ema") or weights["classifier"])
    return model.to(device).eval(), cfg


def _external(name: str, root: str, size: int, show: bool) -> dict:
    """An evaluation set read at `size`: images, labels, groups (labelled or ITA) and its counts."""
    from tqdm import tqdm

    loaded = external.load(name, root)
    images, labels, groups, ids, measured = [], [], [], [], 0
    rejects = list(loaded.rejects)
    for item in tqdm(loaded.items, desc=f"read {name}", unit="img", disable=not show):
        try:
            arr = external.read(item, size)
        except image_lib.BadImage as e:  # listed with its reason, never a crash mid-evaluation
            rejects.append((item.path, f"unreadable image: {e}"))
            continue
        group = item.group
        if group is None:
            group, measured = external.group_from_ita(tone.estimate_ita(arr)), measured + 1
        images.append(arr)
        labels.append(item.label)
        groups.append(group)
        ids.append(item.id)
    if not images:
        raise UserError(f"--eval {name}={root}: no readable images ({len(rejects)} rejected)")
    return {"images": _stack(images), "labels": np.array(labels), "groups": groups, "ids": ids,
            "rejects": rejects, "ita_groups": measured, "isic_ids": external.isic_ids(loaded.items)}


def _scores(model, images: torch.Tensor) -> np.ndarray:
    return fidelity.scores(model, images)


def run(real: str, synthetic: list[str], evals: dict[str, str], out: str = "", ckpt: str = "",
        overrides=(), progress: bool = True) -> dict:
    """The whole comparison; returns the report dict that fairness.json holds."""
    from cnd_ray import tracking

    for o in overrides:
        if not o.startswith(SECTIONS):
            raise UserError(f"{o.split('=')[0]}: fairness takes only {' and '.join(s + '*' for s in SECTIONS)} settings")
    cfg = config_lib.load(None, list(overrides))
    f = cfg.fairness
    if not evals:
        raise UserError("give at least one --eval NAME=PATH (names: " + ", ".join(external.SETS) + ")")
    for name in evals:
        if name not in external.SETS:
            raise UserError(f"--eval {name}: unknown set; choose from {', '.join(external.SETS)}")
    manifest = stream.read_manifest(real)
    size = f.image_size or int(manifest["image_size"])
    digest = hashlib.sha256(json.dumps([real, sorted(synthetic), sorted(evals.items()), ckpt,
                                        cfg.to_dict()["fairness"]], sort_keys=True).encode()).hexdigest()[:8]
    name = f"fairness-{digest}"
    out_dir = Path(out or name)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()

    # Inputs first: a bad path or checkpoint fails before any training.
    if ckpt:
        joint, jcfg = _joint_classifier(ckpt, device)
        if jcfg.data.image_size != size:
            raise UserError(f"--ckpt {ckpt}: its classifier reads {jcfg.data.image_size} px images, the "
                            f"comparison runs at {size} px; set fairness.image_size={jcfg.data.image_size}")
    sets = {n: _external(n, root, size, progress) for n, root in evals.items()}
    exclude = frozenset()
    if "mclass_d" in sets:  # MClass-D's images are ISIC images: never train on them
        exclude = frozenset(sets["mclass_d"]["isic_ids"])
    train_real = read_real(real, manifest, f.real_split, size, f.real_max, exclude)
    val = read_real(real, manifest, f.val_split, size)
    syn = read_synthetic(synthetic, size, f.synthetic_max)
    mixed = {"images": torch.cat([train_real["images"], syn["images"]]),
             "labels": np.concatenate([train_real["labels"], syn["labels"]]),
             "groups": train_real["groups"] + syn["groups"]}

    models = {"real": _train(train_real, sample_weights(train_real["labels"], train_real["groups"], "class"),
                             cfg, device, "classifier on real", progress)}
    if synthetic:
        models["real+synthetic"] = _train(mixed, sample_weights(mixed["labels"], mixed["groups"], f.balance),
                                          cfg, device, "classifier on real+synthetic", progress)
    thresholds = {}
    if ckpt:
        # The paper's claim: the classifier trained inside Class-N-Diff beats the same backbone
        # trained alone on the same real data.
        backbone = jcfg.classifier.backbone
        if backbone != f.backbone:
            models[f"alone ({backbone})"] = _train(
                train_real, sample_weights(train_real["labels"], train_real["groups"], "class"), cfg, device,
                f"classifier alone ({backbone})", progress, backbone=backbone)
        models["class-n-diff joint"] = joint
    for m, model in models.items():
        thresholds[m] = float(metrics.choose_threshold(val["labels"], _scores(model, val["images"])))

    results: dict = {}
    for set_name, s in sets.items():
        per_model = {}
        scores = {m: _scores(model, s["images"]) for m, model in models.items()}
        for m in models:
            per_model[m] = metrics.report(s["labels"], scores[m], s["groups"], thresholds[m],
                                          n_boot=f.bootstrap, seed=f.seed)
            metrics.plot_roc(s["labels"], scores[m], s["groups"], out_dir / f"roc_{set_name}_{_slug(m)}.png",
                             f"{set_name}: {m}")
        entry = {"models": per_model, "n": int(len(s["labels"])), "rejects": s["rejects"],
                 "groups_from_ita": s["ita_groups"]}
        if "real+synthetic" in scores:
            entry["synthetic_vs_real"] = metrics.paired_delta(
                s["labels"], scores["real"], scores["real+synthetic"], s["groups"], n_boot=f.bootstrap, seed=f.seed)
        results[set_name] = entry

    report = {"name": name, "real": real, "synthetic": synthetic, "evals": evals, "ckpt": ckpt,
              "fairness": cfg.to_dict()["fairness"], "image_size": size, "thresholds": thresholds,
              "training": {"real": composition(train_real["labels"], train_real["groups"]),
                           "synthetic": composition(syn["labels"], syn["groups"]),
                           "excluded_mclass_d": train_real["excluded"]},
              "results": results, "seconds": round(time.time() - t0, 1)}
    (out_dir / "fairness.json").write_text(json.dumps(report, indent=2, default=float))
    (out_dir / "fairness.md").write_text(markdown(report))
    uri = tracking.resolve_uri(cfg.track.tracking_uri)
    run_id, _ = tracking.start_run(uri, cfg.track.experiment, name, cfg.flat() | {"real": real},
                                   {"cnd_ray.kind": "fairness"})
    tracking.log_metrics(uri, run_id, _flat(results))
    for path in sorted(out_dir.glob("*")):
        if path.suffix in (".json", ".md", ".png"):
            tracking.log_file(uri, run_id, str(path))
    tracking.finish_run(uri, run_id, "FINISHED")
    report["mlflow_run_id"], report["out"] = run_id, str(out_dir)
    return report


def _slug(model: str) -> str:
    """A model's name in MLflow metric keys and file names ("real+synthetic" -> "real_synthetic")."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", model).strip("_")


def _flat(results: dict) -> dict[str, float]:
    """MLflow metrics: <set>/<model>/<metric> for the headline numbers that are defined."""
    out = {}
    for set_name, entry in results.items():
        for m, r in entry["models"].items():
            for k, v in metrics.headline(r).items():
                if v is not None and np.isfinite(v):
                    out[f"{set_name}/{_slug(m)}/{k}"] = float(v)
    return out


def markdown(report: dict) -> str:
    """fairness.md: what was trained on, then per evaluation set the models side by side."""
    lines = [f"# {report['name']}", "", f"- real: `{report['real']}`; synthetic: "
             f"{', '.join(f'`{s}`' for s in report['synthetic']) or 'none'}; image size {report['image_size']}",
             f"- backbone {report['fairness']['backbone']}, {report['fairness']['steps']} steps, "
             f"balance {report['fairness']['balance']}; thresholds chosen on real "
             f"'{report['fairness']['val_split']}' images", "", "## Training data (benign / malignant per tone group)", "",
             "| set | " + " | ".join(GROUPS + ("unknown",)) + " |", "|---|" + "---|" * (len(GROUPS) + 1)]
    for k in ("real", "synthetic"):
        comp = report["training"][k]
        lines.append(f"| {k} | " + " | ".join(
            f"{comp[g]['benign']} / {comp[g]['malignant']}" if g in comp else "-" for g in GROUPS + ("unknown",)) + " |")
    lines.append("")
    lines.append(metrics.markdown({f"{s} / {m}": r for s, e in report["results"].items()
                                   for m, r in e["models"].items()}))
    for s, e in report["results"].items():
        d = e.get("synthetic_vs_real")
        if d:
            lines += ["", f"### {s}: real+synthetic minus real", "", metrics.markdown_delta(d)]
    return "\n".join(lines) + "\n"
