"""The critic ablation: setting 1 and the Class-N-Diff setting 4 recipe under every operator, target,
window, balance and critic worth trying (tune_spaces/critic_ablation.yaml), 3 seeds each, on the
quickstart's models and data, reported as the quickstart reports (it is `cnd-ray quickstart --space
critic_ablation`): FD, class fidelity and the lesion share per class with paired bootstrap intervals
against setting 1 at the same seed, pooled over the seeds, without guidance and with it.

    python bench/critic_ablation.py                       # ~100 minutes on 2 cores; rerun resumes
    python bench/critic_ablation.py --out DIR train.steps=2800

Prints per guidance mode one row per setting - its FD over setting 1's (the no-harm bar is 1.5x),
the paired differences with their intervals - and, as the last line, one JSON object with them.
The full report (grids, curves, per-seed numbers) is DIR/report.md.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from cnd_ray import config as C
from cnd_ray.jobs import quickstart

SPACE = "critic_ablation"
NAME = "critic_ablation-v2"  # fixed, so the report can be made again from the finished search


def summary(comparison: dict) -> tuple[str, dict]:
    """A compact Markdown table per guidance mode and its numbers: per setting (pooled over seeds) FD
    and its ratio to setting 1's, and the paired deltas of FD, fidelity and lesion share per class."""
    lines, blob = [], {}
    for mode, comp in comparison.items():
        n = comp["counts"][-1]
        rows = comp["pools"] or comp["models"]
        base = rows.get(quickstart.BASELINE)
        lines += [f"### {quickstart.mode_title(mode, comp['scale'])}", "",
                  "| setting | FD | FD / setting 1's | fidelity | lesion benign | lesion malignant "
                  "| delta FD | delta fidelity | delta lesion benign | delta lesion malignant |",
                  "|" + "---|" * 10]
        blob[mode] = {}
        for name, m in rows.items():
            v = m[f"n{n}"]
            ratio = v["fd"]["value"] / base[f"n{n}"]["fd"]["value"] if base else float("nan")
            d = m.get(f"delta_n{n}")
            cells = [name, quickstart.ci(v["fd"]), f"{ratio:.2f}", quickstart.ci(v["fidelity_auroc"], 3),
                     quickstart.ci(v["lesion_share_benign"]), quickstart.ci(v["lesion_share_malignant"])]
            cells += ([quickstart.ci(d[k], 3 if "fidelity" in k else 2, True) for k in
                       ("fd", "fidelity_auroc", "lesion_share_benign", "lesion_share_malignant")] if d else ["-"] * 4)
            lines.append("| " + " | ".join(cells) + " |")
            blob[mode][name] = {"fd": v["fd"], "fd_ratio_to_setting1": ratio, "fidelity": v["fidelity_auroc"],
                                "lesion_benign": v["lesion_share_benign"],
                                "lesion_malignant": v["lesion_share_malignant"], "delta": d}
        lines.append("")
    return "\n".join(lines), blob


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="critic_ablation", help="report folder")
    p.add_argument("--config", default="quickstart")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    a = p.parse_args()
    cfg = C.load(a.config, a.overrides)
    out = quickstart.run(cfg, a.out, SPACE, name=NAME)
    text, blob = summary(out["comparison"])
    print(f"\n## The critic ablation ({len(out['search']['rows'])} trials, {out['seconds'] / 60:.0f} minutes)\n")
    print(text)
    print("\n".join(quickstart.verdicts(out["comparison"])))
    print(f"report: {out['report']}")
    print(json.dumps(blob, default=lambda x: None if isinstance(x, float) and not np.isfinite(x) else x))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
