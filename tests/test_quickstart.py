"""`cnd-ray quickstart` as a user runs it (a subprocess with its own local Ray), at the debug scale."""
import subprocess
import sys

import pytest

from cnd_ray.tracking import PARENT_TAG


@pytest.mark.slow
def test_quickstart_writes_the_report_and_says_where_everything_is(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    r = subprocess.run([sys.executable, "-m", "cnd_ray", "quickstart", "--config", "debug", "--space", "smoke",
                        "--out", str(tmp_path / "report"), f"train.storage={tmp_path}/runs",
                        f"track.tracking_uri={uri}", "train.eval_every=5"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    for step in ("1/4 data", "2/4 search", "3/4 samples", "4/4 report"):
        assert f"[cnd-ray quickstart] {step}" in r.stdout
    tail = r.stdout[r.stdout.index("| rank"):]
    assert f"report:  {tmp_path / 'report' / 'report.md'}" in tail
    assert f"MLflow:  cnd-ray ui track.tracking_uri={uri}" in tail
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| 1 |" in report and "| 2 |" in report  # both trials ranked
    # The paper's table with intervals, the floor, the paper's numbers, and a plain verdict.
    assert "## The paper's table, at this scale" in report and "| real vs real (floor) |" in report
    assert "| 1 | " in report.split("## The paper's table")[1] and "69.10" in report
    assert "Setting 2 (no guidance (as the paper samples)) " in report and " setting 1 on FD (" in report
    assert "## The paper's table" in r.stdout  # printed too
    # Whether each setting beats setting 1 on FD and class fidelity, overall and per skin-tone group of
    # its samples, interval included (debug samples without guidance only: its guidance scale is 1).
    verdicts = report.split("## Does the classifier help?")[1]
    (row,) = [line for line in verdicts.splitlines() if line.startswith("| 2 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    head = [c.strip() for c in verdicts.splitlines()[verdicts.splitlines().index(
        next(line for line in verdicts.splitlines() if line.startswith("| setting |")))].strip("|").split("|")]
    assert head[:6] == ["setting", "FD vs setting 1", "class fidelity", "fidelity I-II", "fidelity III-IV",
                        "fidelity V-VI"]
    words = ("better", "worse", "no clear difference", "too few samples to tell")
    assert all(any(f"**{w}**" in c for w in words) for c in cells[1:]), cells
    assert "[" in cells[1] and "(n " in cells[3]  # an interval on FD; sample counts per group
    comparison = __import__("json").loads((tmp_path / "report" / "comparison.json").read_text())
    assert set(comparison) == {"paper"} and comparison["paper"]["scale"] == 1.0
    comparison = comparison["paper"]
    assert set(comparison["models"]) == {"1", "2"} and comparison["baseline"] == {"2": "1"}
    fd = comparison["models"]["2"]["n4"]["fd"]
    assert 0 < fd["low"] <= fd["high"] < float("inf")
    # Its largest count is what the last evaluation judged: the table agrees with the ranking.
    lines = [r.split("|")[1:-1] for r in tail.split("\n\n")[0].splitlines()]
    head = [c.strip() for c in lines[0]]
    ranked = {r[head.index("setting")].strip(): float(r[head.index("fd_judge")]) for r in lines[2:]}
    for setting, fd_judge in ranked.items():
        assert comparison["models"][setting]["n4"]["fd"]["value"] == pytest.approx(fd_judge, rel=0.05)
    assert "lesion shown @4: benign" in report and 0 <= comparison["models"]["1"]["n4"]["lesion_share"]["value"] <= 1
    assert set(comparison["models"]["1"]["n4"]) >= {"lesion_share_benign", "lesion_share_malignant", "fidelity_auroc_V-VI"}
    # Does it make a fairer classifier? (the smoke space measures it after each trial's last step):
    # both settings' fill against real only, reweighted real and setting 1's, and the per-group plot.
    fair = report.split("## Does it make a fairer classifier?")[1].split("\n## ")[0]
    assert "The real-only classifier's light-dark gap: " in fair and "## Does it make a fairer" in r.stdout
    assert "| real (baseline) |" in fair and "| real, reweighted (baseline) |" in fair
    (row,) = [line for line in fair.splitlines() if line.startswith("| real + setting 2's samples")]
    assert row.count("**") == 12  # six paired differences, each with its word
    assert "- Setting 2's samples: worst-group AUROC " in fair and "against setting 1's samples" in fair
    (trials,) = (tmp_path / "runs").glob("*-trials")  # the seeds bench it names reads this search's trials
    assert f"`python bench/tone_guidance.py {trials} --scales " in fair
    for png in ("samples_setting1.png", "samples_setting2.png", "real.png", "curves.png", "fairness.png"):
        assert (tmp_path / "report" / png).stat().st_size > 0
        assert f"({png})" in report
    assert len(list((tmp_path / "report" / "samples" / "setting1").rglob("*.png"))) == 8  # 4 a class
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cnd_ray")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`cnd_ray.kind` = 'search'")
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "quickstart")}
    assert {"quickstart/report.md", "quickstart/real.png", "quickstart/comparison.json",
            "quickstart/fairness.png"} <= logged
    assert "paper/setting2_fd_delta_n4" in client.get_run(parent.info.run_id).data.metrics
    # The evaluate command it prints next runs as printed (here at the debug scale), and logs into
    # the best trial's own MLflow run.
    (nxt,) = [line.split()[1:] for line in tail.splitlines() if line.startswith("next:")]
    assert nxt[:2] == ["cnd-ray", "evaluate"]
    r = subprocess.run([sys.executable, "-m", "cnd_ray", *nxt[1:], "--num-samples", "16",
                        "--out", str(tmp_path / "eval"), "eval.fidelity_backbone=test_resnet",
                        "eval.fidelity_steps=20", "eval.msssim_pairs=10", "eval.kid_subsets=5",
                        "eval.kid_subset_size=8", "eval.actors=1", f"track.tracking_uri={uri}"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "judge: reusing" in r.stdout  # the search's judge, found in the run's storage
    best_run = r.stdout.strip().splitlines()[-1]
    assert best_run.startswith("MLflow run ") and "(new)" not in best_run
    run_id = best_run.split()[2]
    assert client.get_run(run_id).data.tags[PARENT_TAG] == parent.info.run_id
    assert "eval/fidelity_auroc" in client.get_run(run_id).data.metrics
