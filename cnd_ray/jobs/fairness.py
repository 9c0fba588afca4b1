"""`cnd-ray fairness`: does synthetic data make a benign/malignant classifier fairer across skin
tones? (the paper's purpose; issue 8)

1. Check every input (shards and their splits, synthetic folders, evaluation sets, checkpoint)
   before any image is decoded.
2. Read the real training split (`--real` shards) and every `--synthetic` folder (written by
   `cnd-ray sample`). Each image gets a skin-tone group, I-II / III-IV / V-VI, from its ITA: the
   shards store it; synthetic images are measured on their pixels, since what counts is the tone
   they show, not the one asked for.
3. Train the downstream classifier (`fairness.backbone`) on real data alone (classes balanced: the
   usual baseline) and on real plus synthetic data (`fairness.balance`: classes, or every class x
   tone cell). With tone balancing, a control too: the real data reweighted the same way, which
   tells the synthetic images' contribution from the reweighting's.
4. Choose each classifier's decision threshold on the real validation split.
5. Score every `--eval` set (cnd_ray.data.external), whose groups come from its Fitzpatrick labels
   where it has them and from ITA on the pixels otherwise: AUROC, sensitivity, specificity,
   balanced accuracy, per group, worst group, light-dark gap, equal-opportunity and equalized-odds
   differences, bootstrap intervals (cnd_ray.fairness.metrics), and real+synthetic minus real with
   paired intervals. With `--ckpt`, the Class-N-Diff joint classifier is scored next to its
   backbone trained alone.
6. Write fairness.json, fairness.md and ROC plots to `--out`, and log them to MLflow.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from cnd_ray import config as config_lib, weights as weights_lib
from cnd_ray.data import external, shardset, tone
from cnd_ray.data import image as image_lib
from cnd_ray.errors import UserError
from cnd_ray.evaluate import fidelity
from cnd_ray.evaluate.features import signed
from cnd_ray.fairness import downstream

GROUPS = tone.GROUPS  # lightest first
SECTIONS = ("fairness.", "track.")  # the settings this verb reads
MCLASS_D = ("mclass", "mclass_d")  # sets holding MClass-D's ISIC images
REWEIGHTED = downstream.REWEIGHTED  # the control: real data balanced like the real+synthetic mix


def _synthetic_index(folders: list[str]) -> list[tuple[str, int, str]]:
    """(folder, label, file) of every image the `cnd-ray sample` folders list."""
    import pyarrow.parquet as pq

    rows = []
    for folder in folders:
        index = Path(folder) / "index.parquet"
        if not index.is_file():
            raise UserError(f"--synthetic {folder}: no index.parquet; give a folder written by "
                            "`cnd-ray sample`")
        t = pq.read_table(index, columns=["label", "file"]).to_pydict()
        rows += [(folder, int(y), f) for y, f in zip(t["label"], t["file"])]
    return rows


def read_synthetic(rows: list[tuple[str, int, str]], size: int, limit: int = 0, seed: int = 0) -> dict:
    """The listed synthetic images (a seeded `limit` of them, drawn across all folders alike), each
    with the tone group measured on its pixels."""
    if limit and len(rows) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
        rows = [rows[i] for i in keep]
    images, labels, groups = [], [], []
    for folder, label, file in rows:
        path = Path(folder) / file
        if not path.is_file():
            raise UserError(f"--synthetic {folder}: {file} is listed in index.parquet but missing; "
                            "rerun `cnd-ray sample` with the same arguments to finish it")
        data = path.read_bytes()
        arr = image_lib.decode_png(data)  # full size: the tone is measured as the ingest measures it
        images.append(arr if arr.shape[:2] == (size, size) else image_lib.load(data, size)[0])
        labels.append(label)
        groups.append(tone.group_from_ita(tone.estimate_ita(arr)))
    return {"images": downstream.stack(images, size), "labels": np.array(labels, np.int64), "groups": groups}


def _train(data: dict, cfg, device, desc: str, show: bool, balance: str, backbone: str = "",
           weights: str | None = None):
    from tqdm import tqdm

    bar = tqdm(total=cfg.fairness.steps * cfg.fairness.members, desc=desc, unit="step", disable=not show)
    model = downstream.train_classifier(data, cfg.fairness, device, balance, backbone, weights,
                                        progress=lambda s: bar.update(1))
    bar.close()
    return model


class Joint:
    """The Class-N-Diff classifier a checkpoint holds (its EMA when kept), scoring uint8 images:
    directly in pixel space, through the run's VAE encoder in latent space."""

    def __init__(self, ckpt: str, device):
        from cnd_ray import checkpoint
        from cnd_ray.launch import identity
        from cnd_ray import vae as vae_lib
        from cnd_ray.models.classifier import build_classifier

        self.path = identity.resolve_checkpoint(ckpt)
        self.cfg = cfg = checkpoint.load_config(self.path)
        if cfg.method.gamma_schedule == "off":
            raise UserError(f"--ckpt {ckpt}: has no classifier (method.gamma_schedule off)")
        self.vae = vae_lib.for_run(cfg, device)  # UserError when a latent run's VAE is not here
        weights = weights_lib.load(Path(self.path) / "weights.pt")
        self.model = build_classifier(config_lib.override(cfg, {"classifier.weights": ""}))
        self.model.load_state_dict(weights.get("cls_ema") or weights["classifier"])
        self.model.to(device).eval()

    @torch.no_grad()
    def scores(self, images: torch.Tensor, batch: int = 64) -> np.ndarray:
        """float64 (N,) malignant logits of uint8 (N, 3, S, S) images at the run's image size."""
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(images), batch):
            x = signed(images[i:i + batch]).to(device)  # (B, 3, S, S) in [-1, 1], as trained
            if self.vae is not None:  # the latents the classifier saw in training (their mean)
                x = self.cfg.data.latent_scale * self.vae.encode(x).latent_dist.mean  # (B, 4, S/8, S/8)
            out.append(self.model(x).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)


def _external(name: str, root: str, size: int, manifest: shardset.Manifest, show: bool) -> dict:
    """An evaluation set read at `size`: images, labels, groups (labelled or ITA), its rejects (an
    unreadable image is one, never a crash) and how many groups came from ITA."""
    from tqdm import tqdm

    # ISIC-2018 is labelled as the training shards were (melanoma, or malignant = MEL/BCC/SCC).
    modes = ({"labels": manifest.label_mode, "ak_malignant": manifest.ak_malignant}
             if name == "isic2018" else {})
    loaded = external.load(name, root, **modes)
    images, labels, groups, measured = [], [], [], 0
    rejects = list(loaded.rejects)
    for item in tqdm(loaded.items, desc=f"read {name}", unit="img", disable=not show):
        try:
            arr = external.read(item, size)
        except image_lib.BadImage as e:
            rejects.append((item.path, f"unreadable image: {e}"))
            continue
        group = item.group
        if group is None:
            group, measured = tone.group_from_ita(tone.estimate_ita(arr)), measured + 1
        images.append(arr)
        labels.append(item.label)
        groups.append(group)
    if not images:
        raise UserError(f"--eval {name}={root}: no readable images ({len(rejects)} rejected)")
    return {"images": downstream.stack(images, size), "labels": np.array(labels), "groups": groups,
            "rejects": rejects, "groups_from_ita": measured, "isic_ids": external.isic_ids(loaded.items),
            "protocol": {"label_mode": modes["labels"], "ak_malignant": modes["ak_malignant"]} if modes else {}}


def _check(real: str, synthetic: list[str], evals: dict, overrides) -> tuple:
    """The config, the shards' manifest and the synthetic index, after every cheap check."""
    for o in overrides:
        if not o.startswith(SECTIONS):
            raise UserError(f"{o.split('=')[0]}: fairness takes only {' and '.join(s + '*' for s in SECTIONS)} "
                            "settings")
    cfg = config_lib.load(None, list(overrides))
    if not evals:
        raise UserError("give at least one --eval NAME=PATH (names: " + ", ".join(external.SETS) + ")")
    for name in evals:
        if name not in external.SETS:
            raise UserError(f"--eval {name}: unknown set; choose from {', '.join(external.SETS)}")
    manifest = shardset.read_manifest(real)
    downstream.check_splits(manifest, cfg.fairness, ("real_split", "val_split"),
                            f"--real {real} needs benign and malignant images there")
    return cfg, manifest, _synthetic_index(synthetic)


def run(real: str, synthetic: list[str], evals: dict[str, str], out: str = "", ckpt: str = "",
        overrides=(), progress: bool = True) -> dict:
    """The whole comparison; returns the report dict that fairness.json holds."""
    from cnd_ray import tracking
    from cnd_ray.fairness import metrics

    cfg, manifest, syn_index = _check(real, synthetic, evals, overrides)
    f = cfg.fairness
    size = f.image_size or manifest.image_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    joint = None
    if ckpt:
        joint = Joint(ckpt, device)
        if joint.cfg.data.image_size != size:
            raise UserError(f"--ckpt {ckpt}: its classifier reads {joint.cfg.data.image_size} px images, "
                            f"the comparison runs at {size} px; set fairness.image_size="
                            f"{joint.cfg.data.image_size}")
    t0 = time.time()

    sets = {n: _external(n, root, size, manifest, progress) for n, root in evals.items()}
    # MClass-D is ISIC images: they must not be trained on, nor choose the thresholds.
    exclude = frozenset().union(*(sets[n]["isic_ids"] for n in MCLASS_D if n in sets))
    train_real = downstream.read_real(real, manifest, f.real_split, size, f.real_max, exclude)
    val = downstream.read_real(real, manifest, f.val_split, size, exclude=exclude)
    syn = read_synthetic(syn_index, size, f.synthetic_max, f.seed)

    # The baseline is the usual classifier (classes balanced); with tone balancing, the real data
    # reweighted the same way as the mix is a control: did the synthetic images add more than
    # oversampling the few real images of a rare cell would?
    balances = {"real": "class"}
    models = {"real": _train(train_real, cfg, device, "classifier on real", progress, "class")}
    if len(syn["labels"]):
        if f.balance != "class":
            balances[REWEIGHTED] = f.balance
            models[REWEIGHTED] = _train(train_real, cfg, device, f"classifier on {REWEIGHTED}", progress,
                                        f.balance)
        mixed = downstream.mix(train_real, syn)
        balances["real+synthetic"] = f.balance
        models["real+synthetic"] = _train(mixed, cfg, device, "classifier on real+synthetic", progress,
                                          f.balance)
        del mixed
    recipes = {m: {"backbone": f.backbone, "weights": f.weights, "balance": balances[m]} for m in models}
    scorers = {m: (lambda x, model=model: fidelity.scores(model, x)) for m, model in models.items()}
    if joint is not None:
        # The paper's claim: the classifier trained inside Class-N-Diff beats its backbone trained
        # alone on the same real images (here on pixels, with this verb's steps and optimizer).
        c = joint.cfg.classifier
        name = f"alone ({c.backbone})"
        init = c.weights if c.weights and Path(c.weights).is_file() else ""
        alone = _train(train_real, cfg, device, f"classifier {name}", progress, "class", c.backbone, init)
        scorers[name] = lambda x: fidelity.scores(alone, x)
        scorers["class-n-diff joint"] = joint.scores
        recipes[name] = {"backbone": c.backbone, "weights": init, "balance": "class",
                         **({"note": f"the joint run's {c.weights} is not here: random init"}
                            if c.weights and not init else {})}
        recipes["class-n-diff joint"] = {"checkpoint": joint.path, "space": joint.cfg.data.space,
                                         "backbone": c.backbone}
    thresholds = {m: float(metrics.choose_threshold(val["labels"], score(val["images"])))
                  for m, score in scorers.items()}

    out_dir = Path(out or f"fairness-{_digest(real, synthetic, evals, ckpt, cfg)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    results: dict = {}
    for set_name, s in sets.items():
        scores = {m: score(s["images"]) for m, score in scorers.items()}
        per_model = {}
        for m in scorers:
            per_model[m] = metrics.report(s["labels"], scores[m], s["groups"], thresholds[m],
                                          n_boot=f.bootstrap, seed=f.seed)
            plot = out_dir / f"roc_{set_name}_{_slug(m)}.png"
            metrics.plot_roc(s["labels"], scores[m], s["groups"], plot, f"{set_name}: {m}")
            written.append(plot)
        entry = {"models": per_model, "n": int(len(s["labels"])), "rejects": s["rejects"],
                 "groups_from_ita": s["groups_from_ita"], **s["protocol"]}
        if "real+synthetic" in scores:
            entry["synthetic_vs_real"] = {
                "paired": metrics.paired_delta(s["labels"], scores["real"], scores["real+synthetic"], s["groups"],
                                               n_boot=f.bootstrap, seed=f.seed,
                                               thresholds=(thresholds["real"], thresholds["real+synthetic"])),
                "headline": metrics.compare(per_model["real"], per_model["real+synthetic"]),
                **({"vs_reweighted": metrics.compare(per_model[REWEIGHTED], per_model["real+synthetic"])}
                   if REWEIGHTED in per_model else {})}
            entry["verdict"] = verdict(entry)
        results[set_name] = entry

    report = {"name": out_dir.name, "real": real, "synthetic": synthetic, "evals": evals, "ckpt": ckpt,
              "fairness": cfg.to_dict()["fairness"], "image_size": size, "thresholds": thresholds,
              "models": recipes,
              "training": {"real": downstream.composition(train_real["labels"], train_real["groups"]),
                           "synthetic": downstream.composition(syn["labels"], syn["groups"]),
                           "synthetic_listed": len(syn_index), "synthetic_used": int(len(syn["labels"])),
                           "excluded_mclass_d": train_real["excluded"] + val["excluded"],
                           "real_over_limit": train_real["over_limit"]},
              "results": results, "seconds": round(time.time() - t0, 1)}
    for name, text in (("fairness.json", json.dumps(report, indent=2, default=float)),
                       ("fairness.md", markdown(report))):
        (out_dir / name).write_text(text)
        written.append(out_dir / name)
    uri = tracking.resolve_uri(cfg.track.tracking_uri)
    run, _ = tracking.start_run(uri, cfg.track.experiment, report["name"], cfg.flat() | {"real": real},
                                {"cnd_ray.kind": "fairness"})
    run.log_metrics(_flat(results))
    for path in written:
        run.log_file(str(path))
    run.finish("FINISHED")
    report["mlflow_run_id"], report["out"] = run.id, str(out_dir)
    return report


def _digest(real, synthetic, evals, ckpt, cfg) -> str:
    return hashlib.sha256(json.dumps([real, sorted(synthetic), sorted(evals.items()), ckpt,
                                      cfg.to_dict()["fairness"]], sort_keys=True).encode()).hexdigest()[:8]


def _slug(model: str) -> str:
    """A model's name in MLflow metric keys and file names ("real+synthetic" -> "real_synthetic")."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", model).strip("_")


def _flat(results: dict) -> dict[str, float]:
    """MLflow metrics: <set>/<model>/<metric> for the headline numbers that are defined."""
    from cnd_ray.fairness import metrics

    out = {}
    for set_name, entry in results.items():
        for m, r in entry["models"].items():
            for k, v in metrics.headline(r).items():
                if v is not None and np.isfinite(v):
                    out[f"{set_name}/{_slug(m)}/{k}"] = float(v)
    return out


def _call(delta: dict) -> str:
    """'helped' / 'hurt' when the paired 95% interval of a difference excludes 0."""
    ci = delta.get("ci")
    if delta.get("delta") is None or not ci:
        return "not measurable"
    return "helped" if ci[0] > 0 else "hurt" if ci[1] < 0 else "no clear change"


def verdict(entry: dict) -> str:
    """Did the synthetic data help on this set? AUROC overall and per group (paired intervals),
    and the equal-opportunity difference before and after (lower is fairer)."""
    d, h = entry["synthetic_vs_real"]["paired"], entry["synthetic_vs_real"]["headline"]
    parts = [f"overall AUROC {_call(d['overall'])}"]
    parts += [f"{g} AUROC {_call(x)}" for g, x in d["groups"].items() if not x.get("flag")]
    eod = h["equal_opportunity_difference"]
    if eod["delta"] is not None:
        parts.append(f"equal-opportunity difference {eod['a']:.3f} -> {eod['b']:.3f}")
        control = entry["synthetic_vs_real"].get("vs_reweighted", {}).get("equal_opportunity_difference")
        if control and control["a"] is not None:
            parts[-1] += f" ({control['a']:.3f} with the real data reweighted alone)"
    return "Synthetic data: " + "; ".join(parts) + "."


def markdown(report: dict) -> str:
    """fairness.md: what was trained on, then per evaluation set the models side by side."""
    from cnd_ray.fairness import metrics

    f, t = report["fairness"], report["training"]
    lines = [f"# {report['name']}", "",
             f"- real: `{report['real']}`; synthetic: "
             f"{', '.join(f'`{s}`' for s in report['synthetic']) or 'none'} ({t['synthetic_used']} of "
             f"{t['synthetic_listed']} images used); image size {report['image_size']}",
             f"- backbone {f['backbone']}, {f['steps']} steps; balance: "
             + ", ".join(f"{m} {r['balance']}" for m, r in report["models"].items() if "balance" in r) + "; "
             f"thresholds chosen on real '{f['val_split']}' images; MClass-D images left out: "
             f"{t['excluded_mclass_d']}; real images over fairness.real_max: {t['real_over_limit']}",
             "", "## Training data (benign / malignant per tone group)", "",
             "| set | " + " | ".join(GROUPS + ("unknown",)) + " |", "|---|" + "---|" * (len(GROUPS) + 1)]
    for k in ("real", "synthetic"):
        comp = t[k]
        lines.append(f"| {k} | " + " | ".join(
            f"{comp[g]['benign']} / {comp[g]['malignant']}" if g in comp else "-" for g in GROUPS + ("unknown",)) + " |")
    lines += ["", metrics.markdown({(s, m): r for s, e in report["results"].items()
                                    for m, r in e["models"].items()})]
    for s, e in report["results"].items():
        if "synthetic_vs_real" in e:
            lines += ["", f"### {s}: real+synthetic minus real", "", e["verdict"], "",
                      metrics.markdown_delta(e["synthetic_vs_real"]["paired"])]
        if e["rejects"]:
            lines += ["", f"{s}: {len(e['rejects'])} rows or files rejected (reasons in fairness.json)"]
    return "\n".join(lines) + "\n"
