"""The GPU and overlap benches stay runnable where no GPU is: their CPU smoke shapes, end to end."""
import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent


def _run(*args) -> str:
    r = subprocess.run([sys.executable, *args], cwd=TOP, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.slow
def test_gpu_bench_runs_its_smoke_shape_on_a_cpu(tmp_path):
    import json

    out = _run("bench/gpu.py", "--out", str(tmp_path / "rows.json"))
    assert "device: cpu" in out and "joint / plain step time" in out and "the paper's run" in out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {(r["step"], r["batch"]) for r in rows} == {(s, b) for s in ("plain", "joint") for b in (2, 4)}
    assert all(r["images_s"] > 0 and r["gflop_per_image"] > 0 for r in rows)


@pytest.mark.slow
def test_overlap_bench_measures_both_modes_and_projects_the_paper_shape():
    out = _run("bench/grad_overlap.py", "--quick")
    assert "overlapped / after:" in out
    assert "1.70 GiB of float32 gradients" in out  # DiT-L/4's 456M parameters, counted on meta
    assert out.count("| 8 |") == 6 and out.count("| 32 |") >= 6
