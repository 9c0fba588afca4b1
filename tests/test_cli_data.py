"""`cnd-ray synth` then `cnd-ray ingest`, as a user runs them (a real subprocess, a real Ray)."""
import json
import subprocess
import sys

import pytest


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cnd_ray", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_synth_then_ingest_from_the_command_line(tmp_path):
    r = _cli("synth", "--out", str(tmp_path / "isic"), "--num-images", "40", "--image-size", "64",
             "--malignant-fraction", "0.25", "--seed", "3", "--test-per-tone", "4")
    assert r.returncode == 0, r.stderr
    assert "wrote 40 synthetic images (30 benign, 10 malignant; skin tones I-II" in r.stdout
    assert f"and a test set of 12 images, every skin-tone group alike, to {tmp_path / 'isic-test'}" in r.stdout
    # It says what to run next; run as printed (with the folder for SHARDS).
    (nxt,) = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("next:")]
    assert nxt[:2] == ["cnd-ray", "ingest"]
    r = _cli(*[str(tmp_path / "shards") if a == "SHARDS" else a for a in nxt[1:]], "--image-size", "32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"shards: {tmp_path / 'shards'}"
    assert "ingested 52 images (39 benign, 13 malignant" in r.stdout and "test 12 (3 malignant)" in r.stdout
    m = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert m["num_images"] == 52 and m["num_rejected"] == 0 and m["sources"] == {"isic2020": 52}
    assert len(m["skin_tones"]) >= 3  # the synthetic set spans skin tones
    r = _cli("ingest", "--root", str(tmp_path / "isic"), "--out", str(tmp_path / "shards"))
    assert r.returncode == 2 and "exists and is not empty" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_synth_refuses_bad_values_in_one_line(tmp_path):
    r = _cli("synth", "--out", str(tmp_path / "x"), "--malignant-fraction", "2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "malignant_fraction" in r.stderr or "malignant-fraction" in r.stderr
