"""`cnd-ray evaluate`: the paper's table for one checkpoint (METHOD.md section 4), and what its
protocol leaves out (GUARANTEES 14-18).

    1. check what can fail cheaply: checkpoint, reference shards, every extractor's weights
    2. the independent fidelity classifier: the judge of these shards (cnd_ray/evaluate/judge.py),
       reused from the run's storage when its training or search made one, else trained
    3. real features: every extractor over the reference split, the memorisation space over the
       held-out split
    4. generate max(num_samples) images with `cnd_ray.launch.sample` (Ray actors; the reference's class mix;
       resumable), then their features
    5. metrics at each sample count, overall and per class; diversity; class fidelity; memorisation
    6. OUT/metrics.json, OUT/metrics.md and plots, logged to the checkpoint's MLflow run (or a new one)

Every number carries its protocol: sampler, steps, guidance, seed, reference split and size,
extractor and its weights' hash. FD with fewer samples than feature dimensions is refused unless
eval.force_fid (the covariance is singular); KD comes with its spread over subsets.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cnd_ray import checkpoint, generate, storage
from cnd_ray.launch import identity, sample
from cnd_ray.config import ConfigError
from cnd_ray.data import shardset, tone
from cnd_ray.data.shards import READ_BATCH, iter_split, read_rows, split_labels
from cnd_ray.errors import UserError
from cnd_ray.evaluate import features, fidelity, judge as judge_lib, metrics

FIDELITY = "fidelity"
NN_SHOWN = 8  # samples shown next to their nearest reference image


def sample_counts(cfg) -> list[int]:
    """eval.num_samples as sorted unique ints (config validation checked the format)."""
    return sorted({int(x) for x in cfg.eval.num_samples.split(",")})


def extractor_names(cfg) -> list[str]:
    names = [x.strip() for x in cfg.eval.extractors.split(",") if x.strip()]
    for n in names:
        if n not in ("inception", FIDELITY) and not (n.startswith("timm:") and len(n) > 5):
            raise ConfigError(f"eval.extractors: {n!r} is not inception, {FIDELITY} or timm:<model>")
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"eval.extractors: {cfg.eval.extractors!r} must name distinct extractors")
    return names


def metric_names(ext: features.Extractor) -> tuple[str, str]:
    """FID/KID only in clean-fid's Inception space; elsewhere the distance is named for its space."""
    return ("FID", "KID") if ext.is_inception else (f"FD_{ext.name}", f"KD_{ext.name}")


# --- generated images ----------------------------------------------------------------------

def read_samples(folder: Path, index, labels) -> torch.Tensor:
    """uint8 images (N, 3, S, S) of a generation's PNGs (`cnd-ray sample`'s layout)."""
    from PIL import Image

    imgs = np.stack([np.array(Image.open(folder / generate.file_name(int(i), int(y))).convert("RGB"))
                     for i, y in zip(index, labels)])  # (N, S, S, 3)
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()


def iter_samples(folder: Path, rows: dict) -> Iterator[tuple]:
    """(uint8 images, labels) batches of a generation's PNGs, in plan order."""
    for s in range(0, len(rows["index"]), READ_BATCH):
        idx, labels = rows["index"][s:s + READ_BATCH], rows["label"][s:s + READ_BATCH]
        yield read_samples(folder, idx, labels), labels


def _split_size(manifest: shardset.Manifest, split: str, limit: int) -> int:
    n = manifest.counts(split).rows
    if not n:
        raise UserError(f"--reference has no '{split}' rows (splits: {manifest.describe_splits()})")
    return min(n, limit) if limit else n


def _keep(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Positions of up to `per_class` images of each class, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(labels == c), min(per_class, int((labels == c).sum())),
                       replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


class _Collector:
    """Features of every extractor, fidelity scores, and a few kept images, over batches."""

    def __init__(self, extractors: dict, classifier=None, keep: np.ndarray | None = None):
        self.extractors, self.classifier = extractors, classifier
        self.keep = set() if keep is None else set(keep.tolist())
        self.feats = {k: [] for k in extractors}
        self.scores, self.labels, self.kept, self.tones, self.seen = [], [], [], [], 0

    def add(self, images: torch.Tensor, labels: np.ndarray) -> None:
        for k, ext in self.extractors.items():
            self.feats[k].append(ext.features(images))
        if self.classifier is not None:
            self.scores.append(fidelity.scores(self.classifier, images))
            # Skin-tone band of every judged image, estimated the same way on real and generated
            # pixels (ingest's ITA, at the evaluated size), so the two are comparable.
            self.tones += [tone.band(tone.estimate_ita(a)) for a in images.permute(0, 2, 3, 1).numpy()]
        pos = [i for i in range(len(labels)) if self.seen + i in self.keep]
        if pos:
            self.kept.append(images[pos])
        self.labels.append(labels)
        self.seen += len(labels)

    def result(self) -> dict:
        cat = np.concatenate
        return {"feats": {k: cat(v) for k, v in self.feats.items()},
                "scores": cat(self.scores) if self.scores else None,
                "labels": cat(self.labels).astype(np.int64), "tones": np.asarray(self.tones),
                "kept": torch.cat(self.kept) if self.kept else None}


def _progress(total: int, desc: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not show)


def _collect(batches, total: int, desc: str, show: bool, **kw) -> dict:
    col = _Collector(**kw)
    with _progress(total, desc, show) as bar:
        for images, labels in batches:
            col.add(images, labels)
            bar.update(len(labels))
    return col.result()


# --- the fidelity classifier: the judge --------------------------------------------------------

def _judge(cfg, ckpt: str, shards: str, out: Path, device, show: bool):
    """(classifier, meta): the judge of these shards with cfg's eval.fidelity_* settings, found in
    the run storage that holds the checkpoint (where its training or search made it) or trained and
    put there; for a checkpoint outside its run's storage, in the output folder."""

    root = identity.storage_path(cfg)
    inside = not storage.is_uri(root) and Path(ckpt).resolve().is_relative_to(Path(root).resolve())
    root = judge_lib.cache_dir(root if inside else str(out))
    path = judge_lib.path_for(cfg, root, str(shards))
    judge_lib.prepare(cfg, str(shards), path, device, show, say=lambda m: print(m, flush=True))
    j = judge_lib.load(path, device)
    return j.model, dict(j.meta)


# --- the metrics -------------------------------------------------------------------------------

def _distances(ext, real, real_y, gen, gen_y, counts: list[int], cfg) -> dict:
    """FD and KD at each sample count: all classes, then each class (with its counts)."""
    e = cfg.eval
    out = {}
    for n in counts:
        g, gy = gen[:n], gen_y[:n]
        row = {}
        for cls in [None] + sorted(np.unique(real_y).tolist()):
            r = real if cls is None else real[real_y == cls]
            x = g if cls is None else g[gy == cls]
            entry = {"n_generated": len(x), "n_real": len(r)}
            m = min(len(x), len(r))
            if m < 2:
                entry["refused"] = "fewer than 2 images"
            else:
                if m > ext.dim or e.force_fid:
                    entry["fd"] = metrics.fid(r, x)
                else:
                    entry["fd_refused"] = f"{m} images <= {ext.dim} feature dims (eval.force_fid)"
                entry["kd"], entry["kd_std"] = metrics.kid(r, x, e.kid_subsets, e.kid_subset_size, e.seed)
            row["all" if cls is None else generate.class_name(int(cls))] = entry
        out[str(n)] = row
    return out


def _memorisation(space: str, real: np.ndarray, heldout: np.ndarray, gen: np.ndarray, cfg) -> dict:
    m = metrics.memorisation(gen, real, heldout, cfg.eval.memorisation_quantile)
    d = m["nn_distance"]
    closest = np.argsort(d)[:NN_SHOWN]
    return {"space": space, "threshold": m["threshold"], "share_under": m["share_under"],
            "expected_share": m["expected_share"], "duplicate_rate": m["duplicate_rate"],
            "nn_distance_median": float(np.median(d)), "nn_distance_min": float(d.min()),
            "closest": [{"generated": int(i), "reference": int(m["nn_index"][i]), "distance": float(d[i])}
                        for i in closest]}


def _nn_grid(pairs: list[dict], gen_folder: Path, rows: dict, reference: str, manifest: shardset.Manifest,
             split: str, path: Path) -> None:
    """The samples nearest to a reference image (top row) over those images (bottom row): what a
    reader checks for copying at a glance."""
    from PIL import Image

    at = [p["generated"] for p in pairs]
    gen = read_samples(gen_folder, rows["index"][at], rows["label"][at])  # (K, 3, S, S)
    ref = read_rows(reference, manifest, split, [p["reference"] for p in pairs])
    grid = torch.cat([torch.cat(list(gen), dim=2), torch.cat(list(ref), dim=2)], dim=1)  # (3, 2S, K*S)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    scale = max(1, 64 // gen.shape[-1])  # small images drawn bigger
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def _by_tone(real: dict, held: dict, gen: dict) -> dict:
    """Per ITA band (GUARANTEES 17): real and generated counts and shares (does the model keep the
    skin-tone mix?), and class fidelity on generated and held-out real images of that band; a band
    without both classes is flagged instead of scored."""
    bands = [b for b, _ in tone.BANDS] + [tone.UNKNOWN]
    out = {}
    for b in bands:
        row = {}
        for name, part in (("real", real), ("generated", gen)):
            n = int((part["tones"] == b).sum())
            row[name], row[f"{name}_share"] = n, n / max(1, len(part["tones"]))
        for name, part in (("generated", gen), ("heldout", held)):
            sel = part["tones"] == b
            classes = np.unique(part["labels"][sel])
            row[f"{name}_fidelity"] = (_named(metrics.classification(part["scores"][sel], part["labels"][sel]))
                                       if len(classes) == 2 else
                                       {"n": int(sel.sum()), "flag": "needs both classes"})
        if row["real"] or row["generated"]:
            out[b] = row
    return out


def _named(result: dict) -> dict:
    """Class names instead of numbers in a classification result."""
    return {**result, "per_class_accuracy": {generate.class_name(k): v
                                             for k, v in result["per_class_accuracy"].items()}}


def _flat_metrics(res: dict) -> dict[str, float]:
    """The numbers MLflow charts, named eval/<metric>_<count>[_<class>]."""
    out = {}
    for space, by_n in res["distances"].items():
        fd, kd = res["names"][space]
        for n, row in by_n.items():
            for cls, entry in row.items():
                suffix = f"_{n}" + ("" if cls == "all" else f"_{cls}")
                if "fd" in entry:
                    out[f"eval/{fd}{suffix}"] = entry["fd"]
                if "kd" in entry:
                    out[f"eval/{kd}{suffix}"] = entry["kd"]
    div = res["diversity"]
    out["eval/ms_ssim"] = div["generated"]["all"]["ms_ssim"]
    out["eval/ms_ssim_real"] = div["real"]["all"]["ms_ssim"]
    fid_ = res["fidelity"]
    out["eval/fidelity_auroc"] = fid_["generated"]["auroc"]
    out["eval/fidelity_accuracy"] = fid_["generated"]["accuracy"]
    out["eval/fidelity_heldout_auroc"] = fid_["heldout"]["auroc"]
    if res.get("memorisation"):
        out["eval/memorised_share"] = res["memorisation"]["share_under"]
        out["eval/duplicate_rate"] = res["memorisation"]["duplicate_rate"]
    if res["sampling"].get("images_per_s"):
        out["eval/sampling_images_per_s"] = res["sampling"]["images_per_s"]
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def _fmt(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def report(res: dict) -> str:
    """metrics.md: the tables people read (GUARANTEES 14: with the protocol on top)."""
    p, s = res["protocol"], res["sampling"]
    ref = p["reference"]
    lines = [f"# Evaluation: step {p['step']} of {p['checkpoint']}", "",
             f"- sampler **{p['sampler']}** x {p['steps']} steps, guidance {p['guidance_scale']}, "
             f"seed {p['seed']}, batch {p['batch_size']}; {p['image_size']} px, {p['space']} space",
             f"- reference: {ref['shards']} split `{ref['split']}`: {ref['images']} real images "
             f"({', '.join(f'{k} {v}' for k, v in ref['counts'].items())}); generated class mix follows it",
             f"- sampling speed: {_fmt(s.get('images_per_s'))} images/s on {s.get('actors')} actors"
             + ("" if s.get("generated") else " (reused samples: speed of the run that made them)"),
             f"- KD: {p['kid']['subsets']} subsets of up to {p['kid']['subset_size']}, mean +- std "
             "(x 1e3); FD needs more images than feature dimensions", ""]
    counts = [str(n) for n in p["num_samples"]]
    lines += ["## Distances to the real images (lower is better)", "",
              "| metric | class | " + " | ".join(counts) + " |",
              "|---|---|" + "---|" * len(counts)]
    for space, by_n in res["distances"].items():
        fd, kd = res["names"][space]
        for cls in by_n[counts[0]]:
            fds = [by_n[n][cls].get("fd") for n in counts]
            kds = [by_n[n][cls] for n in counts]
            lines.append(f"| {fd} | {cls} | " + " | ".join(
                _fmt(v) if v is not None else "refused" for v in fds) + " |")
            lines.append(f"| {kd} x1e3 | {cls} | " + " | ".join(
                f"{1e3 * k['kd']:.2f} +- {1e3 * k['kd_std']:.2f}" if "kd" in k else "-" for k in kds) + " |")
    for e in p["extractors"]:
        lines.append(f"\n{e['extractor']}: {e['dim']} dims, weights {e['weights']}"
                     + (f" (sha256 {e['sha256']})" if e["sha256"] else "") + f"; {e['preprocess']}")
    div = res["diversity"]
    lines += ["", f"## Diversity: MS-SSIM of same-class pairs (lower = more diverse; "
              f"{p['ms_ssim']['scales']} scales at {p['image_size']} px)", "",
              "| class | generated | real | pairs |", "|---|---|---|---|"]
    for cls, g in div["generated"]["per_class"].items():
        r = div["real"]["per_class"].get(cls, {})
        lines.append(f"| {cls} | {_fmt(g['ms_ssim'], 3)} | {_fmt(r.get('ms_ssim'), 3)} | {g['pairs']} |")
    lines.append(f"| all | {_fmt(div['generated']['all']['ms_ssim'], 3)} | "
                 f"{_fmt(div['real']['all']['ms_ssim'], 3)} | {div['generated']['all']['pairs']} |")
    f = res["fidelity"]
    g = f["generated"]
    lines += ["", f"## Class fidelity: an independent {f['classifier']['backbone']} classifier "
              f"(held-out real AUROC {_fmt(f['heldout']['auroc'], 3)})", "",
              "| images | AUROC | accuracy | " + " | ".join(f"{c} accuracy" for c in g["per_class_accuracy"])
              + " |", "|---|---|---|" + "---|" * len(g["per_class_accuracy"])]
    for name, r in (("generated", g), ("held-out real", f["heldout"])):
        lines.append(f"| {name} | {_fmt(r['auroc'], 3)} | {_fmt(r['accuracy'], 3)} | "
                     + " | ".join(_fmt(v, 3) for v in r["per_class_accuracy"].values()) + " |")
    lines += ["", "## Skin tone (ITA bands estimated on the pixels, real and generated alike)", "",
              "| band | real | generated | fidelity AUROC generated | fidelity AUROC held-out real |",
              "|---|---|---|---|---|"]

    def auc(r: dict) -> str:
        return f"{r['auroc']:.3f} (n={r['n']})" if "auroc" in r else f"- (n={r['n']}, one class)"

    for b, r in res["skin_tone"].items():
        lines.append(f"| {b} | {r['real']} ({100 * r['real_share']:.1f}%) | {r['generated']} "
                     f"({100 * r['generated_share']:.1f}%) | {auc(r['generated_fidelity'])} | "
                     f"{auc(r['heldout_fidelity'])} |")
    m = res.get("memorisation")
    if m:
        lines += ["", f"## Memorisation ({m['space']} features)", "",
                  f"{100 * m['share_under']:.2f}% of samples are closer to a reference image than "
                  f"{100 * m['expected_share']:g}% of held-out real images are (expected without "
                  f"copying: {100 * m['expected_share']:g}%); {100 * m['duplicate_rate']:.2f}% have a "
                  f"near-duplicate among the samples. Median nearest-neighbour distance "
                  f"{m['nn_distance_median']:.3f} (threshold {m['threshold']:.3f})."]
        lines += ["", "Top: the samples nearest to a reference image; bottom: that image.", "",
                  "![nearest](nearest.png)"]
    lines += ["", "## Feature PCA (real vs generated)", ""]
    lines += [f"![{Path(q).stem}]({Path(q).name})" for q in res["plots"] if "pca_" in q]
    return "\n".join(lines) + "\n"


# --- tracking ----------------------------------------------------------------------------------

def _log(cfg, res: dict, out: Path) -> str | None:
    """Log to the checkpoint's MLflow run, or to a new evaluate-<run> run; returns the run id."""
    from cnd_ray import tracking
    uri = tracking.resolve_uri(cfg.track.tracking_uri)
    name = identity.run_name(cfg)
    run_id = tracking.find_run(uri, cfg.track.experiment, name)
    new = run_id is None
    run = tracking.start_run(uri, cfg.track.experiment, f"evaluate-{name}", {},
                             {"cnd_ray.evaluates": name})[0] if new else tracking.Run(uri, run_id)
    step = res["protocol"]["step"]
    run.log_metrics(_flat_metrics(res), step=step)
    folder = f"evaluation/step{step:07d}"
    for f in ["metrics.json", "metrics.md"] + [Path(q).name for q in res["plots"]]:
        run.log_file(str(out / f), folder)
    if new:
        run.finish("FINISHED")
    res["mlflow"] = {"tracking_uri": uri, "run_id": run.id, "new_run": new}
    return run.id


# --- the verb ----------------------------------------------------------------------------------

def _step(i: int, text: str) -> None:
    print(f"[{i}/6] {text}", flush=True)


def run(ckpt: str, reference: str, out: str = "", overrides=(), progress: bool = True) -> dict:
    """Evaluate `ckpt` against the real images of the `reference` shards (at each of eval.num_samples);
    returns metrics.json's dict."""
    path = identity.resolve_checkpoint(ckpt, overrides)
    cfg, ema, step = checkpoint.load_ema(path)
    cfg = sample.sampling_config(cfg, overrides)
    e, sizes = cfg.eval, sample_counts(cfg)
    names = extractor_names(cfg)
    manifest = shardset.read_manifest(str(reference))
    if manifest.image_size != cfg.data.image_size:
        raise UserError(f"--reference {reference}: images are {manifest.image_size} px, the "
                        f"checkpoint generates {cfg.data.image_size} px; ingest at --image-size "
                        f"{cfg.data.image_size}")
    n_ref = _split_size(manifest, e.reference_split, e.reference_max)
    n_held = _split_size(manifest, e.heldout_split, 0)
    ref_labels = split_labels(str(reference), manifest, e.reference_split, e.reference_max)
    ref_counts = {generate.class_name(c): int((ref_labels == c).sum())
                  for c in range(cfg.model.num_classes)}
    if min(ref_counts.values()) == 0:
        raise UserError(f"--reference {reference}: split '{e.reference_split}' lacks a class "
                        f"({ref_counts}); per-class metrics need every class")
    out_dir = Path(out or f"evaluation/{identity.run_name(cfg)}-step{step}").absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    _step(1, f"checking extractors ({', '.join(names)}) and data; out: {out_dir}")
    exts = {}
    for n in names:  # weights are read now: a missing file fails before any long work
        if n == "inception":
            exts[n] = features.inception(e.inception_weights, device)
        elif n.startswith("timm:"):
            exts[n] = features.timm_model(n[5:], e.timm_weights, device)
    _step(2, "the independent fidelity classifier")
    clf, clf_meta = _judge(cfg, path, reference, out_dir, device, progress)
    if FIDELITY in names:
        exts[FIDELITY] = features.classifier_features(clf, f"{FIDELITY}-{clf_meta['backbone']}")
    exts = {n: exts[n] for n in names}
    mem_space = FIDELITY if FIDELITY in exts else names[0]

    _step(3, f"real features: {n_ref} reference images, {n_held} held-out")
    pairs = e.msssim_pairs
    real_keep = _keep(ref_labels, 2 * pairs, e.seed)  # the images MS-SSIM pairs come from
    real = _collect(iter_split(str(reference), manifest, e.reference_split, e.reference_max), n_ref,
                    "reference features", progress, extractors=exts, classifier=clf, keep=real_keep)
    held = _collect(iter_split(str(reference), manifest, e.heldout_split), n_held, "held-out",
                    progress, extractors={mem_space: exts[mem_space]}, classifier=clf)

    _step(4, f"generating {sizes[-1]} images ({cfg.diffusion.sampler} x {cfg.diffusion.sample_steps} "
             f"steps) in the reference's class mix")
    rows = generate.plan(sizes[-1], list(ref_counts.values()), e.seed, e.batch_size)
    samples = out_dir / "samples"
    sampled = sample.generate_images(cfg, path, step, ema, rows, samples, progress)
    gen_keep = _keep(rows["label"], 2 * pairs, e.seed)
    gen = _collect(iter_samples(samples, rows), sizes[-1], "generated features", progress,
                   extractors=exts, classifier=clf, keep=gen_keep)

    _step(5, "metrics")
    res = {"protocol": {**sampled["protocol"], "num_samples": sizes,
                        "reference": {"shards": storage.absolute(str(reference)), "split": e.reference_split,
                                      "images": n_ref, "counts": ref_counts},
                        "heldout": {"split": e.heldout_split, "images": n_held},
                        "extractors": [x.protocol() for x in exts.values()],
                        "kid": {"subsets": e.kid_subsets, "subset_size": e.kid_subset_size},
                        "ms_ssim": metrics.ms_ssim_protocol(cfg.data.image_size),
                        "msssim_pairs": pairs},
           "sampling": {**(sampled["timing"] or {}), "generated": sampled["generated"]},
           "names": {x.name: metric_names(x) for x in exts.values()}}
    res["distances"] = {x.name: _distances(x, real["feats"][k], real["labels"], gen["feats"][k],
                                           gen["labels"], sizes, cfg) for k, x in exts.items()}
    res["diversity"] = {
        "generated": metrics.diversity(gen["kept"], gen["labels"][gen_keep], pairs, e.seed),
        "real": metrics.diversity(real["kept"], ref_labels[real_keep], pairs, e.seed)}
    for part in res["diversity"].values():  # class names, not numbers, in the report
        part["per_class"] = {generate.class_name(int(k)): v for k, v in part["per_class"].items()}
    clf_meta["heldout_auroc"] = metrics.classification(held["scores"], held["labels"])["auroc"]
    res["fidelity"] = {"classifier": clf_meta,
                       "generated": _named(metrics.classification(gen["scores"], gen["labels"])),
                       "heldout": _named(metrics.classification(held["scores"], held["labels"]))}
    res["skin_tone"] = _by_tone(real, held, gen)
    res["memorisation"] = _memorisation(exts[mem_space].name, real["feats"][mem_space],
                                        held["feats"][mem_space], gen["feats"][mem_space], cfg)
    res["plots"] = [str(out_dir / "nearest.png")]
    _nn_grid(res["memorisation"]["closest"], samples, rows, str(reference), manifest,
             e.reference_split, out_dir / "nearest.png")
    for k, x in exts.items():
        plot = out_dir / f"pca_{x.name}.png"
        metrics.pca_plot(real["feats"][k], real["labels"], gen["feats"][k], gen["labels"], plot,
                         generate.CLASS_NAMES, title=f"{x.name}: real vs generated ({sizes[-1]})")
        res["plots"].append(str(plot))

    _step(6, "report and MLflow")
    (out_dir / "metrics.json").write_text(json.dumps(res, indent=2, default=float))
    (out_dir / "metrics.md").write_text(report(res))
    _log(cfg, res, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(res, indent=2, default=float))
    res["out"] = str(out_dir)
    return res
