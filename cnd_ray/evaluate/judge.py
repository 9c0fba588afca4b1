"""The judge: one independent benign/malignant classifier per shard set, scoring samples while models
train, so that a search ranks what the paper measures (METHOD.md section 4) rather than a loss.

It is trained once on the reference split (`eval.reference_split`, the fidelity classifier of
`cnd-ray evaluate`: `eval.fidelity_*`), checked on the held-out split (`eval.heldout_split`), and
saved as one file named by the shards' manifest digest and the judge's own settings: every trial of a
search, a restored search and `cnd-ray evaluate` on the same shards find the same file; other shards
or settings make another. The file keeps the judge's features of the real images too, so scoring
samples decodes no real image.

On n generated images per class it measures (`Judge.measure`):
- class fidelity: the judge's AUROC and accuracy on the samples, per class and per ITA band (counts);
- FD and KD per class in the judge's feature space, samples of class c against the held-out real
  images of class c, averaged over classes. Per class, so a model that draws the wrong class, or
  one class for both labels, is as far off as one that draws no lesion at all;
- the floor: the same FD for n real reference images per class (mean of FLOOR_DRAWS draws), i.e.
  FD's bias at this sample count. `fd_ratio` = FD / floor: 1 is as close to the held-out images as
  other real images are. Small-sample FD is biased upwards, so only the ratio (or FD at equal
  counts) compares;
- MS-SSIM diversity of same-class sample pairs;
- lesion share: the share of samples of class c whose centre is darker than their skin by at least
  LESION_FRACTION of the held-out class-c images' median (metrics.lesion_contrast): does every
  sample show its lesion? A texture can fool the classifier and move FD little; a missing lesion
  cannot hide here.
Plain PyTorch and numpy; the Ray layer decides where it runs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from cnd_ray.data import shards as shards_lib, shardset, tone
from cnd_ray import storage, weights
from cnd_ray.errors import UserError
from cnd_ray.evaluate import features, fidelity, metrics
from cnd_ray.generate import class_name

FORMAT = 3  # bump when the file's content changes: older files are then retrained, not misread
TEST_SPLIT = "test"  # where the shards have one (ingest --test), the judge is also measured there per skin-tone group
FLOOR_DRAWS = 20  # real-vs-real FD draws averaged into one floor
BANDS = [b for b, _ in tone.BANDS] + [tone.UNKNOWN]
WEAK_AUROC = 0.8  # a judge below this on held-out images is said to be weak (it learnt little)
# A sample shows its lesion when its centre contrast reaches this share of the held-out images' median
# for its class: all 418 quickstart held-out images do (the least 0.27 against a benign median of
# 0.50), plain skin and faint smudges do not.
LESION_FRACTION = 0.5


def settings(cfg) -> dict:
    """What the judge's training depends on besides the data: a change trains another judge."""
    e = cfg.eval
    return {"format": FORMAT, "backbone": e.fidelity_backbone, "steps": e.fidelity_steps,
            "lr": e.fidelity_lr, "seed": e.seed, "split": e.reference_split,
            "heldout_split": e.heldout_split, "max_images": e.fidelity_max_images,
            "weights": features.sha256(e.fidelity_weights) if e.fidelity_weights else ""}


def manifest_digest(manifest: shardset.Manifest) -> str:
    return manifest.digest()[:16]


def file_name(manifest: shardset.Manifest, cfg) -> str:
    key = hashlib.sha256(json.dumps(settings(cfg), sort_keys=True).encode()).hexdigest()[:8]
    return f"judge-{manifest_digest(manifest)[:12]}-{key}.pt"


def cache_dir(root: str) -> str:
    """Where judges live under a run's or a search's storage (a folder or URI)."""
    return storage.join(root, "judges")


# --- the file -----------------------------------------------------------------------------------

def exists(path: str) -> bool:
    return storage.is_file(path)


@dataclass
class Judge:
    """The trained classifier, its provenance, and its view of the real images."""

    model: torch.nn.Module
    meta: dict  # settings, shards, manifest digest, train_images, heldout_auroc, floors
    ref_feats: np.ndarray  # (M, D) float32: the reference images it was trained on
    ref_labels: np.ndarray  # (M,)
    held_feats: np.ndarray  # (H, D) float32: the held-out split
    held_labels: np.ndarray  # (H,)
    floors: dict = field(default_factory=dict)  # n per class -> floor entry (also in meta)

    @property
    def extractor(self) -> features.Extractor:
        return features.classifier_features(self.model, f"judge-{self.meta['backbone']}")

    def to(self, device) -> "Judge":
        self.model.to(device)
        return self

    def save(self, path: str) -> None:
        self.meta["floors"] = {str(k): v for k, v in self.floors.items()}
        weights.write(path, {"state_dict": {k: v.cpu() for k, v in self.model.state_dict().items()},
                      # fidelity.load reads these two: a judge file is a fidelity classifier too
                      "meta": json.loads(json.dumps(self.meta)),
                      "real": {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k)))
                               for k in ("ref_feats", "ref_labels", "held_feats", "held_labels")}})

    # --- measuring ------------------------------------------------------------------------------

    def floor(self, n: int) -> dict:
        """FD of n real reference images per class against the held-out ones, per class and their
        mean, averaged over FLOOR_DRAWS seeded draws: what a perfect model would score at n."""
        if n not in self.floors:
            rng = np.random.default_rng((self.meta["seed"], n))
            per = {}
            for c in self.classes:
                pool = np.flatnonzero(self.ref_labels == c)
                if len(pool) < n:
                    raise UserError(f"eval.search_samples: {n} per class, but the judge's reference "
                                    f"split has {len(pool)} {class_name(c)} images to measure the "
                                    "real-vs-real floor with; lower it")
                held = self.held_feats[self.held_labels == c]
                per[class_name(c)] = float(np.mean([
                    metrics.frechet(held, self.ref_feats[rng.choice(pool, n, replace=False)])
                    for _ in range(FLOOR_DRAWS)]))
            self.floors[n] = {"fd": float(np.mean(list(per.values()))), **{f"fd_{k}": v for k, v in per.items()}}
        return self.floors[n]

    def shows_lesion(self, images: torch.Tensor, labels: np.ndarray) -> np.ndarray:
        """(N,) bool: does each image show a lesion as its class's real images do (LESION_FRACTION)?"""
        need = np.array([self.meta["lesion_contrast"][class_name(int(c))] for c in labels]) * LESION_FRACTION
        return metrics.lesion_contrast(images) >= need

    @property
    def classes(self) -> list[int]:
        return sorted(np.unique(self.held_labels).tolist())

    def measure(self, images: torch.Tensor, labels: np.ndarray, kid_subsets: int,
                msssim_pairs: int = 0, inception: tuple | None = None) -> dict[str, float]:
        """The sample metrics of uint8 images (N, 3, S, S) generated for `labels` (N,), n per class;
        flat {name: value} for Tune, MLflow and the console (see the module docstring). With
        `inception` (inception_reference's), also `fid`: clean-fid's Inception FID, per class
        against the held-out images and averaged, as fd_judge is."""
        labels = np.asarray(labels)
        n = int(min((labels == c).sum() for c in self.classes))
        scores = fidelity.scores(self.model, images)
        fid_ = metrics.classification(scores, labels)
        out = {"fidelity_auroc": fid_["auroc"], "fidelity_accuracy": fid_["accuracy"]}
        out.update({f"fidelity_accuracy_{class_name(c)}": v for c, v in fid_["per_class_accuracy"].items()})
        feats = self.extractor.features(images)
        fds, kds, kd_stds = [], [], []
        for c in self.classes:
            held, gen = self.held_feats[self.held_labels == c], feats[labels == c]
            fds.append(metrics.frechet(held, gen))
            kd, kd_std = metrics.kid(held, gen, kid_subsets, n, self.meta["seed"])
            kds.append(kd)
            kd_stds.append(kd_std)
            out[f"fd_judge_{class_name(c)}"] = fds[-1]
        floor = self.floor(n)
        out.update(fd_judge=float(np.mean(fds)), fd_judge_floor=floor["fd"],
                   fd_ratio=float(np.mean(fds)) / floor["fd"], kd_judge=float(np.mean(kds)),
                   kd_judge_std=float(np.sqrt(np.mean(np.square(kd_stds)))))
        if inception is not None:
            ext, real, real_labels = inception
            gen = ext.features(images)
            out["fid"] = float(np.mean([metrics.frechet(real[real_labels == c], gen[labels == c])
                                        for c in self.classes]))
        shows = self.shows_lesion(images, labels)
        out["lesion_share"] = float(shows.mean())
        out.update({f"lesion_share_{class_name(c)}": float(shows[labels == c].mean()) for c in self.classes})
        div = metrics.diversity(images, labels, msssim_pairs or n, self.meta["seed"])
        out["ms_ssim"] = div["all"]["ms_ssim"]
        # Skin tone as the image shows it (ITA on the pixels), as `cnd-ray evaluate` reads it.
        bands = np.array([tone.band(tone.estimate_ita(a)) for a in images.permute(0, 2, 3, 1).numpy()])
        for b in BANDS:
            sel = bands == b
            if sel.any():
                out[f"tone_{b}_n"] = float(sel.sum())
                if len(np.unique(labels[sel])) == 2:  # AUROC needs both classes in the band
                    out[f"tone_{b}_fidelity_auroc"] = metrics.classification(scores[sel], labels[sel])["auroc"]
        return {k: float(v) for k, v in out.items()}


def inception_reference(cfg, device="cpu") -> tuple | None:
    """(extractor, features, labels) of the held-out images in clean-fid's Inception space when
    eval.inception_weights names the weights file (nothing is downloaded), else None."""
    if not cfg.eval.inception_weights:
        return None
    ext = features.inception(cfg.eval.inception_weights, device)
    x, y = _read(cfg.data.shards, shardset.read_manifest(cfg.data.shards), cfg.eval.heldout_split)
    return ext, ext.features(x), y


def load(path: str, device="cpu") -> Judge:
    """The judge saved at `path` (a local file or URI)."""
    blob = weights.read(path, "judge")
    model = fidelity.empty(blob["meta"]["backbone"])
    model.load_state_dict(blob["state_dict"])
    real = {k: v.numpy() for k, v in blob["real"].items()}
    meta = blob["meta"]
    return Judge(model.eval(), meta, floors={int(k): v for k, v in meta.get("floors", {}).items()},
                 **real).to(device)


# --- training -----------------------------------------------------------------------------------

def _read(shards: str, manifest: shardset.Manifest, split: str, keep: np.ndarray | None = None):
    """(uint8 images (N, 3, S, S), labels (N,)) of a split, or of its rows at the sorted positions `keep`."""
    imgs, labs, start = [], [], 0
    for x, y in shards_lib.iter_split(shards, manifest, split):
        if keep is not None:
            sel = keep[(keep >= start) & (keep < start + len(y))] - start
            start += len(y)
            x, y = x[sel], y[sel]
        imgs.append(x)
        labs.append(np.asarray(y))
    return torch.cat(imgs), np.concatenate(labs).astype(np.int64)


def check_split(manifest: shardset.Manifest, split: str, key: str, need: int = 2) -> shardset.Counts:
    """The split's class counts, or one line naming `key` when a class has fewer than `need`."""
    counts = manifest.counts(split)
    short = [c for c in ("benign", "malignant") if getattr(counts, c) < need]
    if short:
        raise UserError(f"{key}: the judge needs >= {need} {' and '.join(short)} images in split "
                        f"'{split}' of the shards (has {counts}); ingest more, or set "
                        "eval.sample_metrics=false")
    return counts


def train(cfg, shards: str, manifest: shardset.Manifest, device="cpu", progress: bool = False,
          say=print) -> Judge:
    """Train (or, with eval.fidelity_weights, load) the judge and take its view of the real images."""
    e = cfg.eval
    counts = check_split(manifest, e.reference_split, "eval.reference_split")
    check_split(manifest, e.heldout_split, "eval.heldout_split")
    n = counts.rows
    keep = np.sort(np.random.default_rng(e.seed).choice(n, min(n, e.fidelity_max_images), replace=False))
    say(f"judge: reading {len(keep)} {e.reference_split} and the {e.heldout_split} images of {shards}")
    ref_x, ref_y = _read(shards, manifest, e.reference_split, keep)
    held_x, held_y = _read(shards, manifest, e.heldout_split)
    meta = {**settings(cfg), "shards": shards, "manifest_digest": manifest_digest(manifest),
            "image_size": manifest.image_size, "train_images": len(ref_y)}
    if e.fidelity_weights:
        model, given = fidelity.load(e.fidelity_weights)
        meta["backbone"] = given["backbone"]
        model = model.to(device)
    else:
        say(f"judge: training a {e.fidelity_backbone} for {e.fidelity_steps} steps on {device}")
        from tqdm import tqdm

        with tqdm(total=e.fidelity_steps, desc="judge", unit="step", disable=not progress) as bar:
            model = fidelity.train(ref_x, ref_y, e.fidelity_backbone, e.fidelity_steps, lr=e.fidelity_lr,
                                   seed=e.seed, device=device, progress=lambda s: bar.update(s - bar.n))
    ext = features.classifier_features(model, "judge")
    meta["heldout_auroc"] = metrics.classification(fidelity.scores(model, held_x), held_y)["auroc"]
    contrast = metrics.lesion_contrast(held_x)
    meta["lesion_contrast"] = {class_name(c): float(np.median(contrast[held_y == c])) for c in np.unique(held_y)}
    judge = Judge(model, meta, ext.features(ref_x).astype(np.float32), ref_y,
                  ext.features(held_x).astype(np.float32), held_y)
    meta["lesion_share_real"] = float(judge.shows_lesion(held_x, held_y).mean())  # the bar's reach
    say(f"judge: held-out AUROC {meta['heldout_auroc']:.3f} on {len(held_y)} {e.heldout_split} images"
        + (" - it barely tells the classes apart: its fidelity numbers mean little (raise "
           "eval.fidelity_steps)" if meta["heldout_auroc"] < WEAK_AUROC else ""))
    if manifest.counts(TEST_SPLIT).rows:
        meta["test"] = by_group(model, shards, manifest, TEST_SPLIT)
        say("judge: on the test split, AUROC " + ", ".join(
            f"{g} {v['auroc']:.3f} (n={v['n']})" for g, v in meta["test"].items()))
    return judge


def by_group(model, shards: str, manifest: shardset.Manifest, split: str) -> dict:
    """The classifier's AUROC on a split, overall ("all") and per skin-tone group (tone.GROUPS, from
    the ITA ingest estimated), each with its count and malignant count; nan where a group lacks a class."""
    x, y = _read(shards, manifest, split)
    groups = np.array([tone.group_of(int(f)) if f else "" for f in
                       shards_lib.split_column(shards, manifest, split, "fitzpatrick")])
    scores = fidelity.scores(model, x)
    out = {}
    for g in ("all", *tone.GROUPS):
        sel = np.ones(len(y), bool) if g == "all" else groups == g
        both = len(np.unique(y[sel])) == 2
        out[g] = {"auroc": metrics.classification(scores[sel], y[sel])["auroc"] if both else float("nan"),
                  "n": int(sel.sum()), "malignant": int(y[sel].sum())}
    return out


def path_for(cfg, root: str, shards: str = "") -> str:
    """Where the judge of `shards` (default data.shards) with cfg's judge settings lives under `root`."""
    name = file_name(shardset.read_manifest(shards or cfg.data.shards), cfg)
    return storage.join(root, name)


def check_shards(cfg, manifest: shardset.Manifest) -> None:
    """One line naming the key when the shards cannot be judged with cfg's settings: both classes in
    the held-out split, and eval.search_samples per class in the reference split (the floor draws
    that many real images)."""
    e = cfg.eval
    check_split(manifest, e.heldout_split, "eval.heldout_split")
    counts = check_split(manifest, e.reference_split, "eval.reference_split")
    fewest = min(counts.benign, counts.malignant)
    if e.search_samples > fewest:
        raise UserError(f"eval.search_samples: {e.search_samples} per class, but split "
                        f"'{e.reference_split}' of {cfg.data.shards} has only {fewest} images of its "
                        "rarer class to measure the real-vs-real floor at that count; lower it")


def prepare(cfg, shards: str, path: str, device="cpu", progress: bool = False, say=print) -> Judge | None:
    """Make sure the judge file `path` exists: train the judge (its floor at eval.search_samples
    measured) and write it, unless it is there. Returns the new judge, or None when it was there."""
    if exists(path):
        say(f"judge: reusing {path}")
        return None
    judge = train(cfg, shards, shardset.read_manifest(shards), device, progress, say)
    judge.floor(cfg.eval.search_samples)
    judge.save(path)
    say(f"judge: saved {path}")
    return judge
