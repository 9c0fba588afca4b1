"""Models side by side under one judge, in the shape of the paper's table (METHOD.md section 4): per
model, FD at two sample counts, KD, MS-SSIM, class fidelity (overall and per skin-tone group of the
samples, from their ITA) and the share of samples that show a lesion (overall and per class), each
with a bootstrap 95% interval, and each model's paired difference from its baseline (did settings 2-5
beat setting 1? - with several seeds, each model against setting 1 at its own seed), and, for pools
of models (a setting's seeds), the same numbers averaged over the pool.

Every model's images come from the same generation plan (image i: the same seed and label for
every model), so the bootstrap resamples plan positions once per replicate and applies them to every
model: the differences are paired. The held-out real images are resampled too, the same way for all
models. Intervals are percentile intervals shifted by the bootstrap's estimate of the statistic's
bias: a resample repeats images, which narrows its feature spread, so FD and KD of resamples run
high - at 32 images per class the plain percentile interval of FD lay wholly above the value
(31.1 [31.6, 51.2]). A pool's interval comes from the same replicates: the mean over its members of
each replicate's statistic. Plain numpy on the judge's features.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from cnd_ray.data import tone
from cnd_ray.evaluate import fidelity, metrics
from cnd_ray.generate import class_name

GROUP_FIDELITY = tuple(f"fidelity_auroc_{g}" for g in tone.GROUPS)  # on the samples of each skin-tone group
# the table's columns, per sample count
Z = ("fd", "kd", "ms_ssim", "fidelity_auroc", "lesion_share", "lesion_share_benign", "lesion_share_malignant",
     *GROUP_FIDELITY)
LOWER_IS_BETTER = {"fd": True, "kd": True, "ms_ssim": True, **{k: False for k in Z[3:]}}


def _first(labels: np.ndarray, n: int) -> np.ndarray:
    """Plan positions of the first n images of each class (plans interleave the classes)."""
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c in np.unique(labels)]))


def _stats(judge, feats, scores, pair_ms_ssim, shows, groups, labels, pos, held_pos) -> dict:
    """The table's numbers for plan positions `pos` (generated) and held-out positions `held_pos`;
    a skin-tone group's fidelity is nan where its samples lack a class."""
    fds, kds = [], []
    for c in judge.classes:
        g = feats[pos[labels[pos] == c]]
        r = judge.held_feats[held_pos[judge.held_labels[held_pos] == c]]
        fds.append(metrics.frechet(r, g))
        kds.append(metrics.kid(r, g, subsets=1, subset_size=len(g) + len(r), seed=0)[0])
    out = {"fd": float(np.mean(fds)), "kd": float(np.mean(kds)),
           "ms_ssim": float(np.mean(pair_ms_ssim[pos])),
           "fidelity_auroc": metrics.classification(scores[pos], labels[pos])["auroc"],
           "lesion_share": float(np.mean(shows[pos]))}
    for c in judge.classes:
        out[f"lesion_share_{class_name(c)}"] = float(np.mean(shows[pos[labels[pos] == c]]))
    for g, key in zip(tone.GROUPS, GROUP_FIDELITY):
        sel = pos[groups[pos] == g]
        out[key] = (metrics.classification(scores[sel], labels[sel])["auroc"]
                    if len(np.unique(labels[sel])) == 2 else np.nan)
    return out


def _pair_ms_ssim(images: torch.Tensor, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(N,) MS-SSIM of each of the first n images per class with a random other one of them (nan
    elsewhere): resampling positions resamples pairs."""
    pos = _first(labels, n)
    rng = np.random.default_rng(seed)
    out = np.full(len(labels), np.nan)
    for c in np.unique(labels):
        own = pos[labels[pos] == c]
        partner = rng.integers(len(own) - 1, size=len(own))
        partner = partner + (partner >= np.arange(len(own)))  # never itself
        out[own] = metrics.ms_ssim(images[own], images[own[partner]]).numpy()
    return out


def sample_groups(images: torch.Tensor) -> np.ndarray:
    """(N,) the skin-tone group (tone.GROUPS, "" when no skin is found) of each uint8 image (N, 3, S, S),
    from the ITA of its skin as `cnd-ray evaluate` reads it."""
    return np.array([tone.group_from_ita(tone.estimate_ita(a)) or "" for a in images.permute(0, 2, 3, 1).numpy()])


def table(judge, models: dict[str, tuple[torch.Tensor, np.ndarray]], counts: list[int],
          baseline: str | dict[str, str], boots: int = 200, seed: int = 0,
          pools: dict[str, list[str]] | None = None) -> dict:
    """{"counts", "baseline", "models": {name: {"n<count>": {metric: {"value", "low", "high"}},
    "delta_n<count>": {metric: {...}}, "groups": {group: [benign, malignant] sample counts}}},
    "pools": {pool: {"members", "n<count>", "delta_n<count>"}}} for uint8 images and labels of one plan
    per model (same labels for all), at each count of images per class. `baseline` names the model
    every other is compared with, or maps each model to its own (a model mapped to itself, or not
    mapped, has no delta); a pool's numbers are the means over its member models."""
    labels = next(iter(models.values()))[1]
    base_of = {m: baseline for m in models} if isinstance(baseline, str) else dict(baseline)
    base_of = {m: b for m, b in base_of.items() if b != m and b in models and m in models}
    ext = judge.extractor
    data = {}
    for name, (images, y) in models.items():
        assert np.array_equal(y, labels), "every model must draw the same plan"
        data[name] = (ext.features(images), fidelity.scores(judge.model, images),
                      {n: _pair_ms_ssim(images, labels, n, seed) for n in counts},
                      judge.shows_lesion(images, labels), sample_groups(images))
    rng = np.random.default_rng(seed)
    out = {"counts": counts, "baseline": baseline, "boots": boots,
           "models": {m: {"groups": {g: [int(((data[m][4] == g) & (labels == c)).sum()) for c in judge.classes]
                                     for g in tone.GROUPS}} for m in models},
           "pools": {p: {"members": list(ms)} for p, ms in (pools or {}).items()}}
    held_all = np.arange(len(judge.held_labels))
    for n in counts:
        base_pos = _first(labels, n)
        # Resample plan positions within each class, and held-out images within each class.
        draws = []
        for _ in range(boots):
            gen = np.concatenate([rng.choice(base_pos[labels[base_pos] == c], (labels[base_pos] == c).sum())
                                  for c in judge.classes])
            held = np.concatenate([rng.choice(np.flatnonzero(judge.held_labels == c),
                                              (judge.held_labels == c).sum()) for c in judge.classes])
            draws.append((gen, held))
        stats = {}  # name -> (point {metric}, [replicate {metric}])
        for name, (feats, scores, pairs, shows, groups) in data.items():
            point = _stats(judge, feats, scores, pairs[n], shows, groups, labels, base_pos, held_all)
            boot = [_stats(judge, feats, scores, pairs[n], shows, groups, labels, g, h) for g, h in draws]
            stats[name] = (_vector(point), np.array([_vector(b) for b in boot]))
            out["models"][name][f"n{n}"] = _intervals(*stats[name])
        deltas = {m: (stats[m][0] - stats[b][0], stats[m][1] - stats[b][1]) for m, b in base_of.items()}
        for m, d in deltas.items():
            out["models"][m][f"delta_n{n}"] = _intervals(*d)
        for p, members in (pools or {}).items():
            out["pools"][p][f"n{n}"] = _intervals(*_mean([stats[m] for m in members]))
            if all(m in deltas for m in members):
                out["pools"][p][f"delta_n{n}"] = _intervals(*_mean([deltas[m] for m in members]))
    return out


def _vector(stats: dict) -> np.ndarray:
    return np.array([stats[k] for k in Z], np.float64)


def _mean(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The mean over members of (point, replicates), ignoring a member's nan (a group it lacks)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan: the pool has no value there either
        return np.nanmean([p for p, _ in parts], 0), np.nanmean([r for _, r in parts], 0)


def _intervals(point: np.ndarray, boot: np.ndarray) -> dict:
    return {k: interval(point[i], boot[:, i]) for i, k in enumerate(Z)}


def interval(value: float, boot: list[float]) -> dict:
    """95% interval: the resamples' 2.5 and 97.5 percentiles, less their mean's bias from `value`
    (about 0 for a mean or an AUROC; FD's and KD's resamples run high). No bounds (nan) where the value
    is nan or fewer than half the resamples have one (an AUROC on a handful of samples, most of whose
    resamples lack a class)."""
    boot = np.asarray(boot, np.float64)
    finite = boot[np.isfinite(boot)]
    if not np.isfinite(value) or len(finite) < max(1, len(boot) / 2):
        return {"value": float(value), "low": np.nan, "high": np.nan}
    boot = finite
    bias = boot.mean() - value
    low, high = np.percentile(boot, [2.5, 97.5]) - bias
    return {"value": float(value), "low": float(low), "high": float(high)}


def verdict(delta: dict, metric: str = "fd") -> str:
    """'better' / 'worse' / 'no clear difference' for a paired delta (model - baseline), or 'too few
    samples to tell' where it has no interval."""
    d = delta[metric]
    if not (np.isfinite(d["low"]) and np.isfinite(d["high"])):
        return "too few samples to tell"
    lower = LOWER_IS_BETTER[metric]
    if d["high"] < 0:
        return "better" if lower else "worse"
    if d["low"] > 0:
        return "worse" if lower else "better"
    return "no clear difference"

