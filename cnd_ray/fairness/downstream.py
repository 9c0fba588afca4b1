"""Fairness in the loop: does a model's synthetic data make a fairer benign/malignant classifier?
(the paper's claim, measured inside every run and trial; issue 31). Plain PyTorch and numpy.

The shared pieces of `cnd-ray fairness` live here too (reading the real splits with their skin-tone
groups, the batch weights, training a downstream classifier), so the verb and the loop train and
score classifiers the same way.

In a run (`fairness.in_loop`):
1. Baselines, once per shard set and settings (`prepare`, cached as one file like the judge): a
   classifier trained on the real training split alone (classes balanced) and one on the same images
   reweighted over every (class, skin-tone group) cell (the control), each thresholded on the real
   validation split and scored on the held-out `fairness.test_split`.
2. At an evaluation, `fill_counts` says how many images each (class, tone group) cell lacks; the
   EMA DiT draws them, asking for the cell's tone group (`fill_plan`); `Downstream.measure` trains the
   same classifier on real + synthetic (cells balanced, fixed steps and seed), thresholds it on the
   validation split and scores it on the test split, beside both baselines with paired bootstrap
   intervals on the same test images (cnd_ray.fairness.metrics).
"""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import torch

from cnd_ray import config as config_lib, storage, weights
from cnd_ray.data import image as image_lib, shardset, tone
from cnd_ray.errors import UserError
from cnd_ray.evaluate import features, fidelity
from cnd_ray.fairness import metrics
from cnd_ray.generate import CLASS_NAMES, image_seed

FORMAT = 1  # bump when the baselines file changes: older files are then recomputed, not misread
GROUPS = tone.GROUPS  # lightest first
DARKEST = GROUPS[-1]
REAL, REWEIGHTED, MIXED = "real", "real, reweighted", "real+synthetic"
BASELINES = {REAL: "class", REWEIGHTED: "class_tone"}  # model -> what its batches balance
SEED_OFFSET = 1_000_003  # fill images' seeds: never those of the judge's sample plan (eval.seed)


def group_of(fitzpatrick) -> str | None:
    """A stored Fitzpatrick type -> its group; None when unknown (0 or missing)."""
    return tone.group_of(int(fitzpatrick)) if fitzpatrick and 1 <= int(fitzpatrick) <= 6 else None


def stack(images: list[np.ndarray], size: int) -> torch.Tensor:
    if not images:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)


def read_real(shards: str, manifest: shardset.Manifest, split: str, size: int, limit: int = 0,
              exclude: frozenset = frozenset()) -> dict:
    """A split of the shards: uint8 images (N, 3, size, size), labels, groups, ids, and the counts
    left out: `excluded` (image_id in `exclude`: MClass-D's ISIC images when MClass is evaluated)
    and `over_limit` (beyond `limit` rows; 0 = no limit)."""
    images, labels, groups, ids, excluded, over = [], [], [], [], 0, 0
    for path in shardset.files(shards, manifest, split):
        for b in shardset.parquet_file(path).iter_batches(
                batch_size=256, columns=["image_id", "label", "fitzpatrick", "image"]):
            rows = b.to_pydict()
            for i, image_id in enumerate(rows["image_id"]):
                if image_id in exclude:
                    excluded += 1
                elif limit and len(ids) >= limit:
                    over += 1
                else:
                    # image.load: the resize the evaluation images get too (external.read)
                    images.append(image_lib.load(rows["image"][i], size)[0])
                    labels.append(int(rows["label"][i]))
                    groups.append(group_of(rows["fitzpatrick"][i]))
                    ids.append(image_id)
    return {"images": stack(images, size), "labels": np.array(labels, np.int64), "groups": groups,
            "ids": ids, "excluded": excluded, "over_limit": over}


def measured_groups(images: torch.Tensor) -> list[str]:
    """The skin-tone group each uint8 (N, 3, S, S) image shows (ITA on its pixels): what counts for a
    synthetic image is the tone it shows, not the one asked for."""
    return [tone.group_from_ita(tone.estimate_ita(a)) for a in images.permute(0, 2, 3, 1).numpy()]


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


def mix(real: dict, synthetic: dict) -> dict:
    """Real and synthetic training images as one set (images, labels, groups)."""
    return {"images": torch.cat([real["images"], synthetic["images"]]),
            "labels": np.concatenate([real["labels"], synthetic["labels"]]),
            "groups": list(real["groups"]) + list(synthetic["groups"])}


class MeanLogit(torch.nn.Module):
    """Several classifiers as one: the mean of their logits."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def member_seeds(f) -> list[int]:
    """The seeds of a downstream classifier's members (`f` = cfg.fairness): seed, seed + 1000, ..."""
    return [f.seed + 1000 * i for i in range(f.members)]


def train_classifier(data: dict, f, device, balance: str, backbone: str = "", weights_file: str | None = None,
                     progress=None):
    """The downstream classifier (`f` = cfg.fairness: backbone, steps, batch, lr, seed, members) on
    `data`, its batches balanced by `balance` ("class" or "class_tone"): one per member seed, as one
    MeanLogit (the classifier itself when members is 1)."""
    weights = sample_weights(data["labels"], data["groups"], balance)
    models = [fidelity.train(data["images"], data["labels"], backbone or f.backbone, f.steps,
                             batch=f.batch_size, lr=f.lr, seed=seed, device=device, sample_weights=weights,
                             backbone_weights=f.weights if weights_file is None else weights_file, progress=progress)
              for seed in member_seeds(f)]
    return models[0] if len(models) == 1 else MeanLogit(models)


# --- what to draw -------------------------------------------------------------------------------

def fill_counts(comp: dict, policy: str, ratio: float, cap: int = 0) -> dict[tuple[int, str], int]:
    """Synthetic images per (label, group) for a real training set of composition `comp`
    (`composition`'s): each filled cell gets what it lacks against its class's best-represented
    group, at most `ratio` x its real count (a cell with no real image counts as 1). `policy`:
    "equalize" fills every group, "darkest" only V-VI. With `cap` > 0 and more wanted, every cell
    is scaled down alike (largest remainders first) so the counts sum to `cap`."""
    want = {}
    for label, name in enumerate(CLASS_NAMES):
        have = {g: comp.get(g, {}).get(name, 0) for g in GROUPS}
        target = max(have.values())
        for g in (GROUPS if policy == "equalize" else (DARKEST,)):
            want[label, g] = max(0, min(target - have[g], int(ratio * max(have[g], 1))))
    total = sum(want.values())
    if cap and total > cap:
        exact = {k: v * cap / total for k, v in want.items()}
        want = {k: int(x) for k, x in exact.items()}
        for k in sorted(exact, key=lambda k: want[k] - exact[k])[:cap - sum(want.values())]:
            want[k] += 1
    return want


def fill_for(cfg, baselines: dict) -> dict[tuple[int, str], int]:
    """fill_counts of the real training split the baselines file describes, with cfg's policy."""
    f = cfg.fairness
    return fill_counts(baselines["meta"]["composition"], f.fill, f.fill_ratio, f.fill_max)


def fill_plan(counts: dict, seed: int, batch_size: int) -> dict:
    """The generation plan of `counts` (generate.plan's columns): image i of label y asks for its
    cell's tone group (model.tone_groups=3: I-II / III-IV / V-VI = 0 / 1 / 2), from seed
    (seed + SEED_OFFSET, i). Cells in a fixed order, so a plan is the same on every rank."""
    labels, tones = [], []
    for (label, group), n in sorted(counts.items(), key=lambda kv: (kv[0][0], GROUPS.index(kv[0][1]))):
        labels += [label] * n
        tones += [GROUPS.index(group)] * n
    index = np.arange(len(labels), dtype=np.int64)
    return {"index": index, "seed": np.array([image_seed(seed + SEED_OFFSET, i) for i in index], np.int64),
            "label": np.array(labels, np.int64), "tone": np.array(tones, np.int64),
            "chunk": index // batch_size}


# --- the baselines, cached ----------------------------------------------------------------------

def settings(cfg) -> dict:
    """What the baselines depend on besides the data: a change computes them again."""
    f = cfg.fairness
    return {"format": FORMAT, "backbone": f.backbone, "steps": f.steps, "lr": f.lr, "batch": f.batch_size,
            "seed": f.seed, "real_split": f.real_split, "val_split": f.val_split, "test_split": f.test_split,
            "real_max": f.real_max, "bootstrap": f.bootstrap,
            "weights": features.sha256(f.weights) if f.weights else "",
            # a key added later counts only away from its default, as in run names (config.ADDED):
            # single classifiers keep the baselines files they had
            **({} if "fairness.members" in config_lib.added_at_default(cfg) else {"members": f.members})}


def file_name(manifest: shardset.Manifest, cfg) -> str:
    data = manifest.digest()[:12]
    key = hashlib.sha256(json.dumps(settings(cfg), sort_keys=True).encode()).hexdigest()[:8]
    return f"downstream-{data}-{key}.pt"


def path_for(cfg, root: str, manifest: shardset.Manifest) -> str:
    """Where the baselines of these shards and cfg's settings live under a run's or search's storage."""
    return storage.join(root, "downstream", file_name(manifest, cfg))


def check_splits(manifest: shardset.Manifest, f, keys: tuple[str, ...], needs: str, fix: str = "") -> None:
    """One line naming the key when a split that `f` (cfg.fairness) names under `keys` lacks a class
    ("fairness.val_split=val: <needs> (splits: ...)<fix>"), or when the classifier's input would be
    upsampled from the shards' images. `cnd-ray fairness` and the in-loop evaluation check alike."""
    for key in keys:
        split = getattr(f, key)
        counts = manifest.counts(split)
        if not (counts.benign and counts.malignant):
            raise UserError(f"fairness.{key}={split}: {needs} (splits: {manifest.describe_splits()}){fix}")
    if f.image_size > manifest.image_size:
        raise UserError(f"fairness.image_size={f.image_size}: larger than the shards' {manifest.image_size} "
                        "px; training images would be upsampled")


def check_shards(cfg, manifest: shardset.Manifest) -> None:
    """One line naming the key when the shards cannot carry an in-loop evaluation: both classes in
    the real training, validation and test splits."""
    check_splits(manifest, cfg.fairness, ("real_split", "val_split", "test_split"),
                 f"fairness.in_loop needs benign and malignant images in that split of {cfg.data.shards}",
                 "; ingest with --test DIR, or set fairness.in_loop=off")


class Downstream:
    """The real splits and the baselines' test scores: what every in-loop evaluation compares with."""

    def __init__(self, cfg, shards: str, baselines: dict):
        manifest = shardset.read_manifest(shards)
        f = cfg.fairness
        self.size = size = f.image_size or manifest.image_size  # the classifier's input
        self.cfg, self.base = cfg, baselines
        # read_real's dicts: images, labels, groups
        self.train = read_real(shards, manifest, f.real_split, size, f.real_max)
        self.val = read_real(shards, manifest, f.val_split, size)
        self.test = read_real(shards, manifest, f.test_split, size)

    @classmethod
    def build(cls, cfg, shards: str, device="cpu", say=print) -> tuple["Downstream", dict]:
        """Read the splits and train both baselines: (Downstream, the baselines' blob to save)."""
        self = cls(cfg, shards, {})
        t0 = time.time()
        blob = {"meta": {**settings(cfg), "shards": shards,
                         "composition": composition(self.train["labels"], self.train["groups"])},
                "models": {}}
        for name, balance in BASELINES.items():
            say(f"fairness: training the {name} baseline ({_size(cfg.fairness)})")
            model = train_classifier(self.train, cfg.fairness, device, balance)
            blob["models"][name] = self.score(model, balance)
        blob["meta"]["seconds"] = round(time.time() - t0, 1)
        self.base = blob
        return self, blob

    def score(self, model, balance: str) -> dict:
        """A trained model's threshold (on val) and test scores, with its report."""
        t = float(metrics.choose_threshold(self.val["labels"], fidelity.scores(model, self.val["images"])))
        s = fidelity.scores(model, self.test["images"])
        f = self.cfg.fairness
        return {"balance": balance, "threshold": t, "test_scores": s.tolist(),
                "report": metrics.report(self.test["labels"], s, self.test["groups"], t, n_boot=f.bootstrap,
                                         seed=f.seed)}

    def measure(self, images: torch.Tensor, plan: dict, device="cpu") -> tuple[dict[str, float], dict]:
        """Train on real + the synthetic `images` drawn for `plan` (fill_plan's), score on the test
        split: (flat metrics for Tune, MLflow and the console; the detail for a report)."""
        f = self.cfg.fairness
        if len(images) and images.shape[-1] != self.size:  # the run's images, at the classifier's size
            images = torch.nn.functional.interpolate(images.float(), size=(self.size, self.size), mode="area",
                                                     ).round().clamp(0, 255).to(torch.uint8)
        syn = {"images": images, "labels": np.asarray(plan["label"]), "groups": measured_groups(images)}
        model = train_classifier(mix(self.train, syn), f, device, f.balance)
        mine = self.score(model, f.balance)
        s = np.asarray(mine["test_scores"])
        out = {"fair_synthetic": float(len(images)),
               "fair_tone_match": float(np.mean([g == GROUPS[t] for g, t in zip(syn["groups"], plan["tone"])]))
               if len(images) else float("nan")}
        out.update(headline(mine["report"], ""))
        # The test scores and items too: the quickstart compares two trials' classifiers paired.
        detail = {"models": {MIXED: mine["report"]}, "vs": {}, "synthetic": composition(syn["labels"], syn["groups"]),
                  "test": {"labels": self.test["labels"].tolist(), "groups": list(self.test["groups"]),
                           "scores": mine["test_scores"], "threshold": mine["threshold"]}}
        for name in BASELINES:
            b = self.base["models"][name]
            out.update(headline(b["report"], f"_{_short(name)}"))
            paired = metrics.paired_delta(self.test["labels"], np.asarray(b["test_scores"]), s, self.test["groups"],
                                          n_boot=f.bootstrap, seed=f.seed, thresholds=(b["threshold"], mine["threshold"]))
            detail["models"][name] = b["report"]
            detail["vs"][name] = paired
            for key, d in deltas(paired).items():
                out[f"{key}_vs_{_short(name)}"] = d["delta"]
                out[f"{key}_vs_{_short(name)}_lo"], out[f"{key}_vs_{_short(name)}_hi"] = d["ci"] or (None, None)
        return {k: float("nan") if v is None else float(v) for k, v in out.items()}, detail


def interval(entry: dict, signed: bool = True) -> str:
    """'+0.123 [+0.010, +0.240]' of a {"value" or "delta", "ci"} entry (unsigned: '0.123 [0.010,
    0.240]'); 'n/a' without a value."""
    v = entry.get("value", entry.get("delta"))
    if v is None:
        return "n/a"
    f = "{:+.3f}" if signed else "{:.3f}"
    ci = entry.get("ci")
    return f.format(v) + (f" [{f.format(ci[0])}, {f.format(ci[1])}]" if ci else "")


def _size(f) -> str:
    """'test_resnet, 1000 steps' (', mean of 3' with members)."""
    return f"{f.backbone}, {f.steps} steps" + (f", mean of {f.members}" if f.members > 1 else "")


def _short(model: str) -> str:
    return "reweighted" if model == REWEIGHTED else model


def headline(report: dict, suffix: str) -> dict:
    """fair_worst_auroc, fair_gap (light minus dark AUROC) and fair_dark_sensitivity (V-VI, at the
    model's own validation threshold) of a metrics.report, plus each group's AUROC."""
    dark = report["groups"].get(DARKEST, {})
    out = {f"fair_worst_auroc{suffix}": report["worst_group_auroc"]["value"],
           f"fair_gap{suffix}": report["light_dark_gap"]["value"],
           f"fair_dark_sensitivity{suffix}": (dark.get("sensitivity") or {}).get("value")}
    if not suffix:
        out.update({f"fair_auroc_{g}": r["auroc"]["value"] for g, r in report["groups"].items()})
    return out


def deltas(paired: dict) -> dict:
    """The three ranked numbers' paired differences (b - a) with their 95% intervals."""
    dark = paired["groups"].get(DARKEST, {}).get("sensitivity") or {"delta": None, "ci": None}
    return {"fair_worst_auroc": paired["worst_group_auroc"], "fair_gap": paired["light_dark_gap"],
            "fair_dark_sensitivity": dark}


# --- the file -----------------------------------------------------------------------------------

def save(path: str, blob: dict) -> None:
    """Plain types only (through JSON: weights_only loading meets no numpy scalars)."""
    weights.write(path, json.loads(json.dumps(blob, default=float)))


def load(path: str) -> dict:
    return weights.read(path, "fairness baselines")


def prepare(cfg, shards: str, path: str, device="cpu", say=print) -> bool:
    """Make sure the baselines file `path` exists: compute and write it unless it is there.
    Returns whether it was computed."""
    if storage.is_file(path):
        say(f"fairness: reusing the baselines {path}")
        return False
    _, blob = Downstream.build(cfg, shards, device, say)
    save(path, blob)
    r = blob["models"][REAL]["report"]
    say(f"fairness: baselines saved {path} ({blob['meta']['seconds']:.0f} s); real-only worst-group AUROC "
        f"{r['worst_group_auroc']['value']:.3f}, light-dark gap {interval(r['light_dark_gap'])}")
    return True
