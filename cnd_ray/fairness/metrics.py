"""Skin-tone fairness numbers: AUROC, threshold metrics, group gaps, bootstrap CIs, tables and ROC plots."""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np

from cnd_ray.errors import UserError

CI_LEVEL = 0.95
# resamples drawn per block: bounds memory at BOOT_BLOCK x N weights; fixed, since the block size is
# part of the seeded stream (the first k resamples of n_boot=1000 are those of n_boot=k)
BOOT_BLOCK = 100
ITA_BANDS = ("very light", "light", "intermediate", "tan", "brown", "dark")  # DATA.md, lightest first
_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6}
# a leading Fitzpatrick type, as in "I-II", "FST III-IV", "type V", "5-6"; "very light" is an ITA band
_ROMAN_RE = re.compile(r"^(?:fst|fitzpatrick|type)?[\s_-]*(VI|IV|V|I{1,3})(?![a-z])", re.IGNORECASE)
_DIGIT_RE = re.compile(r"^(?:fst|fitzpatrick|type)?[\s_-]*([1-6])(?!\d)", re.IGNORECASE)
UNKNOWN = ("", "unknown", "none", "nan")  # also what str() makes of a missing value in a table column


# ---------------------------------------------------------------- inputs

def _labels(y, name: str = "y") -> np.ndarray:
    """Binary labels (N,) as bool; anything but 0/1 or bool is a user error."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise UserError(f"{name} must be one label per item (1-D), got shape {y.shape}")
    if y.dtype == bool:
        return y
    try:
        values = set(np.unique(y).tolist())
    except TypeError:  # None among ints: np.unique cannot sort them
        raise UserError(f"{name} has missing labels (None): drop those items first") from None
    if not values <= {0, 1}:
        shown = sorted(map(repr, values))[:5]
        raise UserError(f"{name} must hold 0 (benign) / 1 (malignant) labels; got values {', '.join(shown)}")
    return y.astype(bool)


def _scores(score, n: int, name: str = "score") -> np.ndarray:
    """Finite float64 scores (N,) matching N labels; higher means more likely malignant."""
    try:
        s = np.asarray(score, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be numbers (one classifier score per item)") from None
    if s.shape != (n,):
        raise UserError(f"{name} has shape {s.shape} but there are {n} labels: pass one score per item")
    if not np.isfinite(s).all():
        raise UserError(f"{name} has {int((~np.isfinite(s)).sum())} non-finite values (nan/inf): "
                        "fix or drop those items before computing metrics")
    return s


def _is_unknown(g) -> bool:
    """Whether a group value means 'no skin tone estimate' (None, nan, or '', 'unknown', 'none', 'nan')."""
    if g is None:
        return True
    if isinstance(g, (float, np.floating)):
        return math.isnan(g)
    return isinstance(g, str) and g.strip().lower() in UNKNOWN


def _tone_rank(name) -> tuple[str, int] | None:
    """(scale, rank) of a group name, lightest = smallest rank; None when the name is not a known tone."""
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        return ("fitzpatrick", int(name))
    text = str(name).strip()
    if text.lower() in ITA_BANDS:
        return ("ita", ITA_BANDS.index(text.lower()))
    m = _ROMAN_RE.match(text)
    if m:
        return ("fitzpatrick", _ROMAN[m.group(1).upper()])
    m = _DIGIT_RE.match(text)
    return ("fitzpatrick", int(m.group(1))) if m else None


def _auto_order(names: list[str], raw: dict) -> list[str] | None:
    """Names lightest to darkest when all are tones on one scale with distinct ranks, else None."""
    ranks = {n: _tone_rank(raw[n]) for n in names}
    if not names or None in ranks.values():
        return None
    if len({r[0] for r in ranks.values()}) > 1 or len({r[1] for r in ranks.values()}) < len(names):
        return None  # mixed scales or two names for one rank: any order would be a guess
    return sorted(names, key=lambda n: ranks[n][1])


class _Items:
    """Validated labels, scores and group codes of one evaluation set."""

    def __init__(self, y, score, groups, order=None, *, score_name: str = "score"):
        self.y = _labels(y)
        n = len(self.y)
        if n == 0:
            raise UserError("no items to evaluate: y, score and groups are empty")
        self.s = _scores(score, n, score_name)
        groups = list(groups) if not isinstance(groups, np.ndarray) else groups.tolist()
        if len(groups) != n:
            raise UserError(f"groups has {len(groups)} entries but there are {n} labels: "
                            "pass one skin-tone group (or None) per item")
        raw = {}
        keys = []
        for g in groups:
            key = None if _is_unknown(g) else str(g)
            if key is not None:
                raw.setdefault(key, g)
            keys.append(key)
        present = sorted(raw)
        if order is not None:
            names = [str(o) for o in order]
            if len(set(names)) < len(names):
                raise UserError(f"order lists a group twice: {names}")
            missing = [p for p in present if p not in names]
            if missing:
                raise UserError(f"groups {missing} are not in order={names}: add them (lightest first)")
            self.ordered = True
        else:
            auto = _auto_order(present, raw)
            self.ordered = auto is not None
            names = auto if auto is not None else present
        self.names = names
        index = {name: i for i, name in enumerate(names)}
        self.codes = np.array([-1 if k is None else index[k] for k in keys], dtype=np.int64)  # (N,)
        # strata for the bootstrap: (group, label) cells, the unknown group included
        self.strata = [idx for c in range(-1, len(names)) for lab in (False, True)
                       if len(idx := np.flatnonzero((self.codes == c) & (self.y == lab)))]

    def counts(self, code: int) -> tuple[int, int]:
        """(positives, negatives) in the group with this code."""
        m = self.codes == code
        return int((m & self.y).sum()), int((m & ~self.y).sum())

    def flag(self, code: int) -> str | None:
        """Why a group has no AUROC (no items / positives / negatives), or None."""
        p, q = self.counts(code)
        return "no items" if p + q == 0 else "no positives" if p == 0 else "no negatives" if q == 0 else None

    def weights(self, rng: np.random.Generator, b: int) -> np.ndarray:
        """(b, N) resample counts: each (group, label) cell redrawn with replacement to its own size."""
        w = np.zeros((b, len(self.y)))
        for idx in self.strata:
            draw = rng.integers(len(idx), size=(b, len(idx)))  # (b, n_cell)
            # per-row bincount in one call: row r's draws land in slots r * n_cell + i
            w[:, idx] = np.bincount((draw + len(idx) * np.arange(b)[:, None]).ravel(),
                                    minlength=b * len(idx)).reshape(b, len(idx))
        return w


def _check_boot(n_boot, seed) -> None:
    """User errors for a bad bootstrap size or seed, before any work."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise UserError(f"n_boot must be a whole number >= 0 (0 = no intervals), got {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UserError(f"seed must be an integer, got {seed!r}")


# ---------------------------------------------------------------- AUROC and ROC

def _auc(s_pos: np.ndarray, s_neg: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC (B,) of weighted positives (B, k) against weighted negatives (B, m); ties half."""
    levels, inv = np.unique(np.concatenate([s_pos, s_neg]), return_inverse=True)
    inv = inv.reshape(-1)
    lp, ln = inv[: len(s_pos)], inv[len(s_pos):]
    order = np.argsort(ln, kind="stable")
    present, starts = np.unique(ln[order], return_index=True)
    mass = np.zeros((len(w_neg), len(levels)))  # (B, L): negative weight at each distinct score
    mass[:, present] = np.add.reduceat(w_neg[:, order], starts, axis=1)
    under = np.cumsum(mass, axis=1) - mass / 2  # (B, L): negatives strictly below, plus half the ties
    return (w_pos * under[:, lp]).sum(1) / (w_pos.sum(1) * w_neg.sum(1))


def auroc(y, score) -> float:
    """evaluate.metrics.auroc after checking the labels and scores (one line naming what is wrong)."""
    from cnd_ray.evaluate.metrics import auroc as plain

    y = _labels(y)
    return plain(y, _scores(score, len(y)))


def _roc_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, TP, FP) at each distinct score, descending, predicting positive when score >= threshold."""
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s) - 1]  # last item of each distinct score
    return s_sorted[last], np.cumsum(y_sorted)[last], np.cumsum(~y_sorted)[last]


def roc_curve(y, score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): (0, 0) at +inf, then one point per distinct score (positive when score >= t)."""
    y = _labels(y)
    s = _scores(score, len(y))
    p, q = int(y.sum()), int((~y).sum())
    if p == 0 or q == 0:
        raise UserError(f"an ROC curve needs both classes; got {p} positives and {q} negatives")
    thr, tp, fp = _roc_counts(y, s)
    return np.r_[0.0, fp / q], np.r_[0.0, tp / p], np.r_[np.inf, thr]


def choose_threshold(y_val, score_val) -> float:
    """Validation score maximising Youden's J = TPR - FPR (= balanced accuracy - 1/2); ties: the lowest.

    Predict malignant when score >= the returned value. Candidates are the distinct validation scores.
    When several maximise J, the lowest one wins, i.e. the most sensitive: at equal J, a missed
    melanoma costs more than an extra biopsy. Choose on validation data, never on the test set.
    """
    y = _labels(y_val, "y_val")
    s = _scores(score_val, len(y), "score_val")
    p, q = int(y.sum()), int((~y).sum())
    if p == 0 or q == 0:
        raise UserError(f"choosing a threshold needs validation positives and negatives; got {p} and {q}")
    thr, tp, fp = _roc_counts(y, s)
    j = tp * q - fp * p  # J * p * q in integers: exact ties, no float rounding between 2/3 and 1 - 1/3
    return float(thr[len(j) - 1 - np.argmax(j[::-1])])  # thresholds descend: last maximum = lowest


def at_threshold(y, score, t) -> dict:
    """Counts, sensitivity (= TPR), specificity, FPR and balanced accuracy predicting positive when score >= t."""
    y = _labels(y)
    s = _scores(score, len(y))
    t = _threshold(t)
    pred = s >= t
    tp, fn = int((pred & y).sum()), int((~pred & y).sum())
    tn, fp = int((~pred & ~y).sum()), int((pred & ~y).sum())
    sens = tp / (tp + fn) if tp + fn else None
    spec = tn / (tn + fp) if tn + fp else None
    return {"threshold": t, "n": len(y), "positives": tp + fn, "negatives": tn + fp,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "sensitivity": sens, "specificity": spec,
            "balanced_accuracy": (sens + spec) / 2 if sens is not None and spec is not None else None,
            "tpr": sens, "fpr": 1 - spec if spec is not None else None}


def _threshold(t) -> float:
    """A finite float threshold, or a user error."""
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise UserError(f"threshold must be a number (see choose_threshold), got {t!r}") from None
    if not math.isfinite(t):
        raise UserError(f"threshold must be finite, got {t}")
    return t


# ---------------------------------------------------------------- per-group measures

def _measure(items: _Items, pred: np.ndarray, w: np.ndarray) -> dict:
    """Per-row AUROC, TP and TN under item weights w (B, N): key None = overall, else a group code."""
    out = {}
    predf = pred.astype(np.float64)
    for code in [None, *range(len(items.names))]:
        m = np.ones(len(items.y), bool) if code is None else items.codes == code
        pos, neg = m & items.y, m & ~items.y
        auc = (_auc(items.s[pos], items.s[neg], w[:, pos], w[:, neg])
               if pos.any() and neg.any() else None)
        out[code] = (auc, w[:, pos] @ predf[pos], w[:, neg] @ (1 - predf[neg]))  # each (B,)
    return out


def _gap_pair(items: _Items, light, dark) -> tuple[str | None, str | None, str | None]:
    """(light group, dark group, note) of the light-dark gap; groups None when no gap can be given."""
    eligible = [n for i, n in enumerate(items.names) if items.flag(i) is None]
    excluded = [f"{n} ({items.flag(i)})" for i, n in enumerate(items.names) if items.flag(i)]
    if not items.names:
        return None, None, "no item has a skin-tone group"
    if light is not None and light == dark:
        return None, None, f"light and dark are both {light}: no gap"
    if (light is None or dark is None) and not items.ordered:
        return None, None, (f"cannot order groups {items.names} light to dark: "
                            "pass order=[lightest, ..., darkest] or light= and dark=")
    for side, name in (("light", light), ("dark", dark)):
        if name is not None and items.flag(items.names.index(name)):
            return None, None, f"{side} group {name} has {items.flag(items.names.index(name))}: no AUROC"
    light = light if light is not None else next(iter(eligible), None)
    dark = dark if dark is not None else next(iter(reversed(eligible)), None)
    if light is None or dark is None or light == dark:
        return None, None, "fewer than two groups with both classes: no gap"
    return light, dark, f"excluded {', '.join(excluded)}" if excluded else None


def _cross(items: _Items, per: dict, light: str | None, dark: str | None) -> dict:
    """Cross-group arrays (B,): worst AUROC, light-dark gap, TPR and FPR spreads over eligible groups."""
    elig = [i for i in range(len(items.names)) if items.flag(i) is None]
    out = {"worst": None, "gap": None, "tpr_spread": None, "fpr_spread": None}
    if elig:
        out["worst"] = np.min([per[i][0] for i in elig], axis=0)
    if light is not None:
        out["gap"] = per[items.names.index(light)][0] - per[items.names.index(dark)][0]
    if len(elig) >= 2:
        tpr = np.array([per[i][1] / items.counts(i)[0] for i in elig])  # (G, B)
        fpr = np.array([1 - per[i][2] / items.counts(i)[1] for i in elig])  # (G, B)
        out["tpr_spread"] = tpr.max(0) - tpr.min(0)
        out["fpr_spread"] = fpr.max(0) - fpr.min(0)
    return out


def _bootstrap(items: _Items, n_boot: int, seed: int, fn) -> list:
    """fn(weights (b, N)) over n_boot stratified resamples, in fixed blocks of one seeded stream."""
    rng = np.random.default_rng(seed)
    return [fn(items.weights(rng, min(BOOT_BLOCK, n_boot - start))) for start in range(0, n_boot, BOOT_BLOCK)]


def _ci(values: np.ndarray | None) -> list[float] | None:
    """Percentile 95% interval of bootstrap values, or None when there are none."""
    if values is None or len(values) == 0:
        return None
    tail = 100 * (1 - CI_LEVEL) / 2
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def _value(point: np.ndarray | None, boots: np.ndarray | None) -> dict:
    """{"value", "ci"} of one measure: the point estimate (a 1-row array) and its bootstrap values."""
    if point is None:
        return {"value": None, "ci": None}
    return {"value": float(point[0]), "ci": _ci(boots)}


def _cat(blocks: list, pick) -> np.ndarray | None:
    """pick(block) from every bootstrap block joined into one (n_boot,) array; None if any is None."""
    parts = [pick(b) for b in blocks]
    return None if not parts or any(p is None for p in parts) else np.concatenate(parts)


def _rates(m: tuple, p: int, q: int) -> dict:
    """Sensitivity, specificity, balanced accuracy (B,) from (AUROC, TP, TN) with p positives, q negatives."""
    sens = m[1] / p if p else None
    spec = m[2] / q if q else None
    return {"sensitivity": sens, "specificity": spec,
            "balanced_accuracy": (sens + spec) / 2 if p and q else None}


# ---------------------------------------------------------------- report

def report(y, score, groups, threshold, *, n_boot: int, seed: int = 0, light=None, dark=None,
           order=None) -> dict:
    """JSON-able fairness report at a validation-chosen threshold, with stratified bootstrap 95% CIs.

    groups: one skin-tone group per item; None, nan, "", "unknown", "none", "nan" count overall only.
    Groups are ordered light to dark from their names ("I-II" < "III-IV" < "V-VI", Fitzpatrick I..VI,
    or the ITA bands of DATA.md) or by `order`; `light` / `dark` pin the gap's two groups. A group
    without positives or negatives is flagged, gets no AUROC / TPR (None), and is left out of the
    worst-group AUROC, the gap and the TPR/FPR spreads, each of which lists it under "excluded".
    Resamples redraw every (group, label) cell to its own size: every resample keeps both classes
    overall and in every group, so each interval is a plain percentile over all n_boot resamples.
    """
    t = _threshold(threshold)
    _check_boot(n_boot, seed)
    items = _Items(y, score, groups, order)
    for side, name in (("light", light), ("dark", dark)):
        if name is not None and str(name) not in items.names:
            raise UserError(f"{side}={name!r} is not one of the groups {items.names}")
    light = None if light is None else str(light)
    dark = None if dark is None else str(dark)
    pred = items.s >= t
    gap_light, gap_dark, gap_note = _gap_pair(items, light, dark)

    def measure(w):
        per = _measure(items, pred, w)
        return per, _cross(items, per, gap_light, gap_dark)

    point, point_x = measure(np.ones((1, len(items.y))))
    blocks = _bootstrap(items, n_boot, seed, measure)

    def section(code, p, q) -> dict:
        rates = _rates(point[code], p, q)
        boot_rates = [_rates(b[0][code], p, q) for b in blocks]
        out = {"auroc": _value(point[code][0], _cat(blocks, lambda b: b[0][code][0]))}
        for key in ("sensitivity", "specificity", "balanced_accuracy"):
            out[key] = _value(rates[key], _cat(boot_rates, lambda r, key=key: r[key]))
        return out

    p, q = int(items.y.sum()), int((~items.y).sum())
    tp, tn = int(point[None][1][0]), int(point[None][2][0])
    overall = {"n": p + q, "positives": p, "negatives": q, **section(None, p, q),
               "tp": tp, "fp": q - tn, "tn": tn, "fn": p - tp,
               "flag": "no positives" if p == 0 else "no negatives" if q == 0 else None}
    per_group = {}
    for i, name in enumerate(items.names):
        gp, gq = items.counts(i)
        sec = section(i, gp, gq)
        tpr, spec = sec["sensitivity"]["value"], sec["specificity"]["value"]
        gtp, gtn = int(point[i][1][0]), int(point[i][2][0])
        per_group[name] = {"n": gp + gq, "positives": gp, "negatives": gq, **sec,
                           "tpr": tpr, "fpr": None if spec is None else 1 - spec,
                           "tp": gtp, "fp": gq - gtn, "tn": gtn, "fn": gp - gtp, "flag": items.flag(i)}
    excluded = {n: items.flag(i) for i, n in enumerate(items.names) if items.flag(i)}
    elig = [n for n in items.names if n not in excluded]
    unknown = items.codes == -1

    def cross(key):
        return _value(point_x[key], _cat(blocks, lambda b: b[1][key]))

    worst = cross("worst")
    tprs = {n: per_group[n]["tpr"] for n in elig}
    fprs = {n: per_group[n]["fpr"] for n in elig}
    eod, fpr_spread = cross("tpr_spread"), cross("fpr_spread")  # EOD is the TPR spread itself
    if eod["value"] is not None:
        eq = np.maximum(point_x["tpr_spread"], point_x["fpr_spread"])
        eq_boot = _cat(blocks, lambda b: np.maximum(b[1]["tpr_spread"], b[1]["fpr_spread"]))
        eqodds = _value(eq, eq_boot)
    else:
        eqodds = {"value": None, "ci": None}
    few = None if len(elig) >= 2 else "fewer than two groups with both classes"
    return {
        "threshold": t,
        "overall": overall,
        "groups": per_group,
        "group_order": list(items.names),
        "ordered": items.ordered,
        "ungrouped": {"n": int(unknown.sum()), "positives": int((unknown & items.y).sum()),
                      "note": "group None/unknown: counted overall, in no group"},
        "worst_group_auroc": {**worst, "group": min(elig, key=lambda n: per_group[n]["auroc"]["value"])
                              if elig else None, "excluded": excluded},
        "light_dark_gap": {**cross("gap"), "light": gap_light, "dark": gap_dark, "excluded": excluded,
                           "note": gap_note},
        "equal_opportunity_difference": {**eod, "max_tpr_group": max(tprs, key=tprs.get) if few is None else None,
                                         "min_tpr_group": min(tprs, key=tprs.get) if few is None else None,
                                         "excluded": excluded, "note": few},
        "equalized_odds_difference": {**eqodds, "tpr_spread": eod["value"],
                                      "fpr_spread": fpr_spread["value"],
                                      "max_fpr_group": max(fprs, key=fprs.get) if few is None else None,
                                      "min_fpr_group": min(fprs, key=fprs.get) if few is None else None,
                                      "excluded": excluded, "note": few},
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "level": CI_LEVEL, "method": "percentile",
                      "strata": "skin-tone group x label"},
    }


# ---------------------------------------------------------------- two models

# headline numbers of compare(): (section, key, which way is better)
HEADLINE = (("overall", "auroc", "higher"), ("overall", "sensitivity", "higher"),
            ("overall", "specificity", "higher"), ("overall", "balanced_accuracy", "higher"),
            (None, "worst_group_auroc", "higher"), (None, "light_dark_gap", "closer to 0"),
            (None, "equal_opportunity_difference", "lower"), (None, "equalized_odds_difference", "lower"))


def _delta(a, b, better: str) -> dict:
    """{"a", "b", "delta" = b - a, "better", "improved"} of one number; None where either side is None."""
    both = a is not None and b is not None
    improved = None
    if both:
        improved = (b > a if better == "higher" else b < a if better == "lower" else abs(b) < abs(a))
    return {"a": a, "b": b, "delta": b - a if both else None, "better": better, "improved": improved}


def compare(a: dict, b: dict) -> dict:
    """Deltas b - a of the headline numbers of two reports on the same items (e.g. a real-only, b real+synthetic).

    Each report's interval is its own and the two are not independent (same items), so the
    intervals say nothing about the difference: paired_delta gives a CI on the AUROC differences.
    """
    sizes = [({g: (r["groups"][g]["n"], r["groups"][g]["positives"]) for g in r["groups"]},
              r["overall"]["n"], r["overall"]["positives"], r["ungrouped"]["n"]) for r in (a, b)]
    if sizes[0] != sizes[1]:
        raise UserError(f"the two reports count different items (n, positives, groups): {sizes[0][1:3]} vs "
                        f"{sizes[1][1:3]}; compare reports of the same evaluation set")
    out = {}
    for section, key, better in HEADLINE:
        va = (a[section][key] if section else a[key])["value"]
        vb = (b[section][key] if section else b[key])["value"]
        out[key] = _delta(va, vb, better)
    out["worst_group_auroc"].update(group_a=a["worst_group_auroc"]["group"], group_b=b["worst_group_auroc"]["group"])
    out["groups"] = {g: {"auroc": _delta(a["groups"][g]["auroc"]["value"], b["groups"][g]["auroc"]["value"],
                                         "higher"), "flag": a["groups"][g]["flag"]} for g in a["groups"]}
    out["threshold"] = {"a": a["threshold"], "b": b["threshold"]}
    out["note"] = "delta = b - a; unpaired: use paired_delta for a CI on the AUROC difference"
    return out


def paired_delta(y, score_a, score_b, groups, *, n_boot: int, seed: int = 0, order=None,
                 light=None, dark=None, thresholds: tuple | None = None) -> dict:
    """AUROC differences b - a on the same items, with 95% CIs from one paired stratified bootstrap;
    with `thresholds` (each model's, as `report` takes them), sensitivity per group and the
    equal-opportunity difference too.

    Both models are scored on the same resamples, so the item-to-item noise they share cancels:
    the interval is on the difference itself (overall, per group, worst group and light-dark gap).
    """
    _check_boot(n_boot, seed)
    items_a = _Items(y, score_a, groups, order, score_name="score_a")
    items_b = copy.copy(items_a)  # same items, groups and strata; only the scores differ
    items_b.s = _scores(score_b, len(items_a.y), "score_b")
    for side, name in (("light", light), ("dark", dark)):
        if name is not None and str(name) not in items_a.names:
            raise UserError(f"{side}={name!r} is not one of the groups {items_a.names}")
    light = None if light is None else str(light)
    dark = None if dark is None else str(dark)
    gap_light, gap_dark, gap_note = _gap_pair(items_a, light, dark)
    if thresholds is None:  # AUROC only: the threshold counts are not used
        pred_a = pred_b = np.zeros(len(items_a.y), bool)
    else:
        pred_a, pred_b = (it.s >= _threshold(t) for it, t in zip((items_a, items_b), thresholds))

    def measure(w):
        per_a, per_b = _measure(items_a, pred_a, w), _measure(items_b, pred_b, w)
        return (per_a, per_b, _cross(items_a, per_a, gap_light, gap_dark),
                _cross(items_b, per_b, gap_light, gap_dark))

    point = measure(np.ones((1, len(items_a.y))))
    blocks = _bootstrap(items_a, n_boot, seed, measure)

    def diff(pick) -> dict:
        """{"a", "b", "delta", "ci"} of the measure that pick(per-group, cross-group) selects."""
        pa, pb = pick(point[0], point[2]), pick(point[1], point[3])
        if pa is None:
            return {"a": None, "b": None, "delta": None, "ci": None}
        v = _value(pb - pa, _cat(blocks, lambda bl: pick(bl[1], bl[3]) - pick(bl[0], bl[2])))
        return {"a": float(pa[0]), "b": float(pb[0]), "delta": v["value"], "ci": v["ci"]}

    excluded = {n: items_a.flag(i) for i, n in enumerate(items_a.names) if items_a.flag(i)}
    per_group = {}
    for i, name in enumerate(items_a.names):
        gp, gq = items_a.counts(i)
        per_group[name] = {"n": gp + gq, "positives": gp, **diff(lambda per, x, i=i: per[i][0]),
                           "flag": items_a.flag(i)}
        if thresholds is not None and gp:
            per_group[name]["sensitivity"] = diff(lambda per, x, i=i, gp=gp: per[i][1] / gp)
    unknown = items_a.codes == -1
    extra = {}
    if thresholds is not None:
        extra["equal_opportunity_difference"] = {**diff(lambda per, x: x["tpr_spread"]), "excluded": excluded}
    return {**extra,
        "overall": diff(lambda per, x: per[None][0]),
        "groups": per_group,
        "worst_group_auroc": {**diff(lambda per, x: x["worst"]), "excluded": excluded},
        "light_dark_gap": {**diff(lambda per, x: x["gap"]), "light": gap_light, "dark": gap_dark,
                           "excluded": excluded, "note": gap_note},
        "ungrouped": {"n": int(unknown.sum()), "positives": int((unknown & items_a.y).sum()),
                      "note": "group None/unknown: counted overall, in no group"},
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "level": CI_LEVEL, "method": "percentile",
                      "strata": "skin-tone group x label", "paired": True},
        "note": "delta = b - a; both models scored on the same resamples",
    }


# ---------------------------------------------------------------- tables and plots

def _fmt(entry: dict | None, flag: str | None = None) -> str:
    """'0.812 [0.770, 0.851]' of a {"value", "ci"} entry; 'n/a (flag)' when there is no value."""
    if entry is None or entry.get("value") is None:
        return f"n/a ({flag})" if flag else "n/a"
    text = f"{entry['value']:.3f}"
    return text + (f" [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}]" if entry.get("ci") else "")


def _cell(text) -> str:
    """Table cell text with Markdown's column separator escaped."""
    return str(text).replace("|", "\\|")


def _row(cells) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def markdown(reports: dict) -> str:
    """Markdown: one headline row per (eval set, model) report with 95% CIs, then one row per skin-tone group.

    Keys are (eval set, model) pairs, or plain names (one "run" column). Flags are written out:
    a flagged group's AUROC reads "n/a (no positives)", and the cross-group columns name the
    groups they leave out.
    """
    keys = list(reports)
    pairs = bool(keys) and all(isinstance(k, tuple) and len(k) == 2 for k in keys)
    label_cols = ["eval set", "model"] if pairs else ["run"]
    labels = {k: list(k) if pairs else [k] for k in keys}
    head = [*label_cols, "n (pos)", "threshold", "AUROC", "sensitivity", "specificity", "balanced acc.",
            "worst-group AUROC", "light-dark AUROC gap", "EOD (TPR spread)", "equalized odds", "notes"]
    lines = ["### Headline (95% bootstrap CIs)", "", _row(head), _row(["---"] * len(head))]
    for k in keys:
        r = reports[k]
        o, w, g = r["overall"], r["worst_group_auroc"], r["light_dark_gap"]
        notes = [f"excluded {name} ({flag})" for name, flag in w["excluded"].items()]
        if r["ungrouped"]["n"]:
            notes.append(f"{r['ungrouped']['n']} ungrouped ({r['ungrouped']['positives']} pos)")
        if g["note"] and not g["note"].startswith("excluded"):
            notes.append(f"gap: {g['note']}")
        if o["flag"]:
            notes.append(f"overall: {o['flag']}")
        worst = _fmt(w) + (f" ({w['group']})" if w["group"] is not None else "")
        gap = _fmt(g) + (f" ({g['light']} - {g['dark']})" if g["light"] is not None else "")
        lines.append(_row([*labels[k], f"{o['n']} ({o['positives']})", f"{r['threshold']:.4g}",
                           _fmt(o["auroc"], o["flag"]), _fmt(o["sensitivity"]), _fmt(o["specificity"]),
                           _fmt(o["balanced_accuracy"]), worst, gap,
                           _fmt(r["equal_opportunity_difference"], r["equal_opportunity_difference"]["note"]),
                           _fmt(r["equalized_odds_difference"], r["equalized_odds_difference"]["note"]),
                           "; ".join(notes) or "-"]))
    head = [*label_cols, "group", "n", "positives", "AUROC", "sensitivity (TPR)", "specificity", "FPR", "flag"]
    lines += ["", "### Per skin-tone group", "", _row(head), _row(["---"] * len(head))]
    for k in keys:
        for name, gr in reports[k]["groups"].items():
            fpr = "n/a" if gr["fpr"] is None else f"{gr['fpr']:.3f}"
            lines.append(_row([*labels[k], name, gr["n"], gr["positives"], _fmt(gr["auroc"], gr["flag"]),
                               _fmt(gr["sensitivity"], gr["flag"]), _fmt(gr["specificity"], gr["flag"]),
                               fpr, gr["flag"] or "-"]))
    return "\n".join(lines) + "\n"


def headline(r: dict) -> dict[str, float | None]:
    """Flat headline numbers of a report (e.g. MLflow metrics); None where a number is undefined."""
    out = {k: r["overall"][k]["value"] for k in ("auroc", "sensitivity", "specificity", "balanced_accuracy")}
    out["auroc_ci_low"], out["auroc_ci_high"] = r["overall"]["auroc"]["ci"] or (None, None)
    for key in ("worst_group_auroc", "light_dark_gap", "equal_opportunity_difference", "equalized_odds_difference"):
        out[key] = r[key]["value"]
    out.update({f"auroc_{g}": gr["auroc"]["value"] for g, gr in r["groups"].items()})
    return out


def markdown_delta(d: dict) -> str:
    """Markdown table of a paired_delta result: AUROC of a, of b, and b - a with its paired 95% CI."""
    lines = [_row(["AUROC", "a", "b", "b - a [95% CI]", "n (pos)", "note"]), _row(["---"] * 6)]

    def num(v):
        return "n/a" if v is None else f"{v:.3f}"

    rows = [("overall", d["overall"], "", None)]
    rows += [(f"group {g}", e, f"{e['n']} ({e['positives']})", e["flag"]) for g, e in d["groups"].items()]
    gap = d["light_dark_gap"]
    rows += [("worst group", d["worst_group_auroc"], "", None),
             (f"light-dark gap ({gap['light']} - {gap['dark']})" if gap["light"] else "light-dark gap", gap, "",
              gap["note"])]
    for label, e, size, note in rows:
        lines.append(_row([label, num(e["a"]), num(e["b"]), _fmt({"value": e["delta"], "ci": e["ci"]}, note),
                           size or "-", note or "-"]))
    return "\n".join(lines) + "\n"


def plot_roc(y, score, groups, path, title: str = "", order=None) -> dict:
    """PNG of the overall ROC curve and one per skin-tone group (light to dark); flagged groups named, not drawn."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    items = _Items(y, score, groups, order)
    fig, ax = plt.subplots(figsize=(6, 6))
    curves, skipped = {}, {}
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1, label="chance")
    for code, name in [(None, "overall"), *enumerate(items.names)]:
        m = np.ones(len(items.y), bool) if code is None else items.codes == code
        p, q = int((m & items.y).sum()), int((m & ~items.y).sum())
        if p == 0 or q == 0:
            flag = "no positives" if p == 0 else "no negatives"
            skipped[name] = flag
            ax.plot([], [], " ", label=f"{name} (n={p + q}): {flag}, no curve")  # legend entry only
            continue
        fpr, tpr, _ = roc_curve(items.y[m], items.s[m])
        curves[name] = auroc(items.y[m], items.s[m])
        ax.plot(fpr, tpr, linewidth=2.2 if code is None else 1.4,
                color="black" if code is None else f"C{code}",
                label=f"{name} (n={p + q}, pos={p}): AUROC {curves[name]:.3f}")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"path": str(path), "auroc": curves, "skipped": skipped}
