"""Fairness metrics against hand-computed cases: AUROC with ties, thresholds, group gaps, EOD, bootstrap CIs."""
import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cnd_ray.errors import UserError
from cnd_ray.fairness import metrics as fm
from cnd_ray.fairness.metrics import (at_threshold, auroc, choose_threshold, compare, markdown, paired_delta,
                                      plot_roc, report, roc_curve)

# three groups with hand-countable AUROCs, listed dark first so the order must come from the names
TONES = {"V-VI": ([1, 1, 0, 0], [0.6, 0.2, 0.7, 0.1]),  # pairs won: .6>.1, .2>.1 -> 2/4
         "I-II": ([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]),  # 4/4
         "III-IV": ([1, 1, 0, 0], [0.9, 0.3, 0.5, 0.1])}  # .9>.5, .9>.1, .3>.1 -> 3/4


def _tones(extra=()):
    """(y, score, groups) of TONES plus (group, label, score) extras."""
    y, s, g = [], [], []
    for name, (labels, scores) in TONES.items():
        y += labels
        s += scores
        g += [name] * len(labels)
    for name, label, score in extra:
        y.append(label)
        s.append(score)
        g.append(name)
    return np.array(y), np.array(s), g


def _sample(n, seed, shift=1.0):
    """n items in three tone groups, 20% positive, scores separating the classes by `shift` sd."""
    rng = np.random.default_rng(seed)
    groups = rng.choice(["I-II", "III-IV", "V-VI"], size=n, p=[0.5, 0.3, 0.2])
    y = (rng.random(n) < 0.2).astype(int)
    y[:2], y[2:4] = 1, 0  # never a group-less class in tiny draws
    return y, y * shift + rng.normal(size=n), groups


def test_module_imports_no_torch_ray_or_mlflow():
    tree = ast.parse(Path(fm.__file__).read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not mods & {"torch", "ray", "mlflow"}


def test_auroc_of_a_hand_example_with_ties():
    # positives .8, .4 vs negatives .4, .2, .9: .8 wins 2; .4 ties .4 (half) and beats .2 -> 1.5; 3.5 of 6
    assert auroc([1, 1, 0, 0, 0], [0.8, 0.4, 0.4, 0.2, 0.9]) == pytest.approx(3.5 / 6, abs=1e-15)
    assert auroc([1, 0, 1, 0], [0.5] * 4) == 0.5  # all tied: chance


def test_auroc_perfect_inverted_and_one_class():
    y = [0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.7, 0.9]
    assert auroc(y, s) == 1.0
    assert auroc(y, [-v for v in s]) == 0.0
    assert math.isnan(auroc([1, 1], [0.2, 0.3])) and math.isnan(auroc([0, 0], [0.2, 0.3]))


def test_auroc_matches_sklearn_with_many_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    s = np.round(y * 0.7 + rng.normal(size=500), 1)  # rounding makes many ties, across classes too
    assert auroc(y, s) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, thr = roc_curve(y, s)
    ref_fpr, ref_tpr, ref_thr = metrics.roc_curve(y, s, drop_intermediate=False)
    assert np.allclose(fpr, ref_fpr) and np.allclose(tpr, ref_tpr) and np.allclose(thr[1:], ref_thr[1:])


def test_roc_curve_hand_case_and_tied_scores_make_one_point():
    fpr, tpr, thr = roc_curve([0, 0, 1, 0, 1, 1], [0.1, 0.3, 0.35, 0.4, 0.8, 0.9])
    assert thr.tolist() == [np.inf, 0.9, 0.8, 0.4, 0.35, 0.3, 0.1]
    assert np.allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    assert np.allclose(fpr, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    fpr, tpr, thr = roc_curve([1, 0], [0.5, 0.5])
    assert thr.tolist() == [np.inf, 0.5] and tpr.tolist() == [0, 1] and fpr.tolist() == [0, 1]
    with pytest.raises(UserError, match="both classes"):
        roc_curve([1, 1], [0.1, 0.2])


def test_choose_threshold_maximises_youden_j_and_breaks_ties_towards_sensitivity():
    y, s = [0, 0, 1, 0, 1, 1], [0.1, 0.3, 0.35, 0.4, 0.8, 0.9]
    # J per threshold: .9 -> 1/3, .8 -> 2/3, .4 -> 1/3, .35 -> 1 - 1/3, .3 -> 1/3, .1 -> 0: tie .8 / .35
    assert choose_threshold(y, s) == 0.35
    # without the tie (one more benign at .36) .8 is the unique best
    assert choose_threshold(y + [0], s + [0.36]) == 0.8
    assert choose_threshold([0, 1], [0.2, 0.7]) == 0.7
    with pytest.raises(UserError, match="validation positives and negatives"):
        choose_threshold([0, 0], [0.2, 0.7])


def test_at_threshold_counts_and_rates():
    # score == t is predicted positive: predictions 1 1 0 | 1 0 0 1
    r = at_threshold([1, 1, 1, 0, 0, 0, 0], [0.9, 0.6, 0.2, 0.7, 0.4, 0.1, 0.6], 0.6)
    assert (r["tp"], r["fn"], r["fp"], r["tn"]) == (2, 1, 2, 2)
    assert r["sensitivity"] == r["tpr"] == pytest.approx(2 / 3)
    assert r["specificity"] == 0.5 and r["fpr"] == 0.5
    assert r["balanced_accuracy"] == pytest.approx(7 / 12)
    only_neg = at_threshold([0, 0], [0.1, 0.9], 0.5)
    assert only_neg["sensitivity"] is None and only_neg["balanced_accuracy"] is None
    assert only_neg["specificity"] == 0.5


def test_eod_and_equalized_odds_on_two_groups():
    # at t = .5: A has TPR 1, FPR 0; B has TPR 1/2, FPR 2/3
    y = [1, 1, 0, 0, 0] * 2
    s = [0.9, 0.8, 0.1, 0.2, 0.3] + [0.9, 0.1, 0.8, 0.7, 0.2]
    g = ["A"] * 5 + ["B"] * 5
    r = report(y, s, g, 0.5, n_boot=0)
    assert r["groups"]["A"]["tpr"] == 1 and r["groups"]["B"]["tpr"] == 0.5
    assert r["groups"]["A"]["fpr"] == 0 and r["groups"]["B"]["fpr"] == pytest.approx(2 / 3)
    assert [r["groups"]["B"][k] for k in ("tp", "fn", "fp", "tn")] == [1, 1, 2, 1]
    eod, eq = r["equal_opportunity_difference"], r["equalized_odds_difference"]
    assert eod["value"] == 0.5 and (eod["max_tpr_group"], eod["min_tpr_group"]) == ("A", "B")
    assert eq["value"] == pytest.approx(2 / 3) and eq["tpr_spread"] == 0.5
    assert eq["fpr_spread"] == pytest.approx(2 / 3) and eod["ci"] is None
    # "A" / "B" are no skin tones: no order, so no gap, and the report says what to pass
    assert r["ordered"] is False and r["light_dark_gap"]["value"] is None
    assert "order=" in r["light_dark_gap"]["note"]
    # AUROC A: 6/6; B: .9 beats all three negatives, .1 none -> 3/6
    assert report(y, s, g, 0.5, n_boot=0, order=["A", "B"])["light_dark_gap"]["value"] == 0.5


def test_worst_group_and_light_dark_gap_follow_fitzpatrick_order():
    y, s, g = _tones(extra=[(None, 1, 0.5), ("unknown", 0, 0.4), (float("nan"), 0, 0.3), ("nan", 1, 0.2)])
    r = report(y, s, g, 0.5, n_boot=0)
    assert r["group_order"] == ["I-II", "III-IV", "V-VI"] and r["ordered"]
    assert [r["groups"][n]["auroc"]["value"] for n in r["group_order"]] == [1.0, 0.75, 0.5]
    assert r["worst_group_auroc"]["value"] == 0.5 and r["worst_group_auroc"]["group"] == "V-VI"
    gap = r["light_dark_gap"]
    assert gap["value"] == 0.5 and (gap["light"], gap["dark"]) == ("I-II", "V-VI") and gap["note"] is None
    # ungrouped items count overall only
    assert r["overall"]["n"] == 16 and r["ungrouped"]["n"] == 4 and r["ungrouped"]["positives"] == 2
    assert sum(gr["n"] for gr in r["groups"].values()) == 12
    assert report(y, s, g, 0.5, n_boot=0, light="III-IV")["light_dark_gap"]["value"] == 0.25
    flipped = report(y, s, g, 0.5, n_boot=0, order=["V-VI", "III-IV", "I-II"])
    assert flipped["light_dark_gap"]["value"] == -0.5
    # other spellings of the same scales order themselves: dark listed first has AUROC 1, light 0
    for names in (["type 5-6", "type 1-2"], [6, 1], ["dark", "very light"]):
        r2 = report([1, 0, 1, 0], [0.9, 0.1, 0.2, 0.8], [names[0]] * 2 + [names[1]] * 2, 0.5, n_boot=0)
        assert r2["light_dark_gap"]["light"] == str(names[1]) and r2["light_dark_gap"]["value"] == -1.0


def test_group_without_positives_is_flagged_and_excluded_everywhere():
    y, s, g = _tones()
    y[np.array(g) == "V-VI"] = 0  # V-VI now has no positives (and held the worst AUROC)
    r = report(y, s, g, 0.5, n_boot=50)
    dark = r["groups"]["V-VI"]
    assert dark["flag"] == "no positives" and dark["positives"] == 0 and dark["n"] == 4
    assert dark["auroc"] == {"value": None, "ci": None} and dark["tpr"] is None
    assert dark["sensitivity"]["value"] is None and dark["specificity"]["value"] is not None
    for key in ("worst_group_auroc", "light_dark_gap", "equal_opportunity_difference",
                "equalized_odds_difference"):
        assert r[key]["excluded"] == {"V-VI": "no positives"}, key
    assert r["worst_group_auroc"]["group"] == "III-IV" and r["worst_group_auroc"]["value"] == 0.75
    gap = r["light_dark_gap"]
    assert (gap["light"], gap["dark"], gap["value"]) == ("I-II", "III-IV", 0.25)
    assert "V-VI (no positives)" in gap["note"]
    json.dumps(r, allow_nan=False)  # plain JSON: no nan anywhere
    pinned = report(y, s, g, 0.5, n_boot=0, dark="V-VI")["light_dark_gap"]
    assert pinned["value"] is None and "no positives" in pinned["note"]


def test_bootstrap_ci_contains_the_estimate_is_seeded_and_narrows_with_more_data():
    y, s, g = _sample(300, 0)
    small = report(y, s, g, 0.5, n_boot=200, seed=1)
    assert small == report(y, s, g, 0.5, n_boot=200, seed=1)
    assert small["overall"]["auroc"]["ci"] != report(y, s, g, 0.5, n_boot=200, seed=2)["overall"]["auroc"]["ci"]
    entries = [small["overall"][k] for k in ("auroc", "sensitivity", "specificity", "balanced_accuracy")]
    entries += [gr[k] for gr in small["groups"].values() for k in ("auroc", "sensitivity", "specificity")]
    for entry in entries:
        lo, hi = entry["ci"]
        assert lo <= entry["value"] <= hi
    # the same sample ten times over: same estimates, intervals ~ 1 / sqrt(10) as wide
    big = report(np.tile(y, 10), np.tile(s, 10), np.tile(g, 10), 0.5, n_boot=200, seed=1)
    assert big["overall"]["auroc"]["value"] == pytest.approx(small["overall"]["auroc"]["value"], abs=1e-12)
    for key in ("auroc", "balanced_accuracy"):
        (lo_s, hi_s), (lo_b, hi_b) = small["overall"][key]["ci"], big["overall"][key]["ci"]
        assert hi_b - lo_b < 0.5 * (hi_s - lo_s), key
    assert small["bootstrap"] == {"n_boot": 200, "seed": 1, "level": 0.95, "method": "percentile",
                                  "strata": "skin-tone group x label"}


def test_bootstrap_keeps_both_classes_in_a_group_of_two():
    # one positive and one negative: an unstratified resample would often lose a class (AUROC nan)
    y, s, g = _tones(extra=[("XX", 1, 0.3), ("XX", 0, 0.6)])
    r = report(y, s, g, 0.5, n_boot=100, order=["I-II", "III-IV", "V-VI", "XX"])
    assert r["groups"]["XX"]["auroc"] == {"value": 0.0, "ci": [0.0, 0.0]}
    assert r["worst_group_auroc"]["group"] == "XX" and r["worst_group_auroc"]["ci"] is not None


def test_compare_and_paired_delta_signs():
    y, s, g = _sample(1000, 5, shift=1.0)
    rng = np.random.default_rng(9)
    worse = s + rng.normal(scale=1.5, size=len(s))  # same items, noisier scores
    a = report(y, worse, g, 0.5, n_boot=0)
    b = report(y, s, g, 0.5, n_boot=0)
    c = compare(a, b)
    assert c["auroc"]["delta"] > 0.05 and c["auroc"]["improved"] is True
    assert c["auroc"]["delta"] == pytest.approx(b["overall"]["auroc"]["value"] - a["overall"]["auroc"]["value"])
    assert compare(b, a)["auroc"]["delta"] == pytest.approx(-c["auroc"]["delta"])
    assert set(c) >= {"balanced_accuracy", "worst_group_auroc", "light_dark_gap",
                      "equal_opportunity_difference", "equalized_odds_difference", "groups"}
    with pytest.raises(UserError, match="same evaluation set"):
        compare(a, report(y[:-1], s[:-1], g[:-1], 0.5, n_boot=0))
    d = paired_delta(y, worse, s, g, n_boot=200, seed=0)
    assert d["overall"]["delta"] == pytest.approx(c["auroc"]["delta"])
    assert 0 < d["overall"]["ci"][0] <= d["overall"]["delta"] <= d["overall"]["ci"][1]
    assert all(gr["delta"] > 0 for gr in d["groups"].values())
    assert d == paired_delta(y, worse, s, g, n_boot=200, seed=0)
    assert paired_delta(y, s, worse, g, n_boot=200, seed=0)["overall"]["ci"][1] < 0
    same = paired_delta(y, s, s, g, n_boot=50)
    assert same["overall"]["delta"] == 0 and same["overall"]["ci"] == [0.0, 0.0]


def test_markdown_shows_rows_cis_and_flags():
    y, s, g = _tones()
    y[np.array(g) == "V-VI"] = 0
    r = report(y, s, g, 0.5, n_boot=20)
    text = markdown({("ISIC 2019", "real"): r, ("ISIC 2019", "real+synth"): r})
    rows = [line for line in text.splitlines() if line.startswith("| ISIC 2019")]
    assert len(rows) == 2 + 2 * 3  # two headline rows, three group rows each
    assert "n/a (no positives)" in text and "excluded V-VI (no positives)" in text
    assert "| real+synth | V-VI | 4 | 0 |" in text
    assert f"{r['overall']['auroc']['value']:.3f} [" in text
    assert "| run |" in markdown({"one": r})
    flat = fm.headline(r)
    assert flat["auroc"] == r["overall"]["auroc"]["value"] and flat["auroc_V-VI"] is None
    assert flat["worst_group_auroc"] == 0.75 and flat["auroc_ci_low"] == r["overall"]["auroc"]["ci"][0]
    delta = fm.markdown_delta(paired_delta(y, s, s + 0.1 * np.arange(len(s)) % 0.3, g, n_boot=20))
    assert "| group V-VI | n/a | n/a | n/a (no positives) | 4 (0) | no positives |" in delta


def test_plot_roc_writes_a_png(tmp_path):
    y, s, g = _tones()
    y[np.array(g) == "V-VI"] = 0
    out = plot_roc(y, s, g, tmp_path / "plots" / "roc.png", title="toy")
    assert Path(out["path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["auroc"]["I-II"] == 1.0 and out["skipped"] == {"V-VI": "no positives"}


@pytest.mark.parametrize("args, match", [
    (([0, 2], [0.1, 0.2], ["I-II"] * 2, 0.5), "0 \\(benign\\) / 1"),
    (([0, 1], [0.1], ["I-II"] * 2, 0.5), "one score per item"),
    (([0, 1], [0.1, float("nan")], ["I-II"] * 2, 0.5), "non-finite"),
    (([0, 1], [0.1, 0.2], ["I-II"], 0.5), "one skin-tone group"),
    (([0, 1], [0.1, 0.2], ["I-II"] * 2, None), "threshold"),
    (([0, None], [0.1, 0.2], ["I-II"] * 2, 0.5), "missing labels"),
    (([], [], [], 0.5), "no items"),
])
def test_user_errors_name_the_problem(args, match):
    with pytest.raises(UserError, match=match):
        report(*args, n_boot=0)


def test_user_errors_for_order_and_light_dark():
    y, s, g = _tones()
    with pytest.raises(UserError, match="not in order"):
        report(y, s, g, 0.5, n_boot=0, order=["I-II", "V-VI"])
    with pytest.raises(UserError, match="light='IV'"):
        report(y, s, g, 0.5, n_boot=0, light="IV")
    with pytest.raises(UserError, match="n_boot"):
        report(y, s, g, 0.5, n_boot=-1)
