"""A real install: the wheel carries what cnd_ray reads at run time (configs, search spaces)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_an_installed_wheel_finds_the_shipped_spaces_from_any_folder(tmp_path):
    """Built as `pip install .` builds it, installed outside the repository (into a folder, run by
    this environment's Python for the dependencies), and run from another folder: the paper's search
    spaces and the packaged configs come from the installed package, not from this checkout."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(REPO)], check=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("cnd_ray-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def cnd_ray(*args):
        return subprocess.run([sys.executable, "-m", "cnd_ray", *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=120)

    where = subprocess.run([sys.executable, "-c", "from cnd_ray import config; print(config.SPACE_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(site / "cnd_ray" / "tune_spaces"), where.stderr
    shipped = sorted(p.stem for p in (REPO / "tune_spaces").glob("*.yaml"))
    helped = cnd_ray("tune", "--help")
    assert helped.returncode == 0 and ", ".join(shipped) in " ".join(helped.stdout.split()), helped.stderr
    listed = cnd_ray("tune", "--space", "nosuch")  # the space listing, before Ray starts
    assert listed.returncode == 2 and f"not a shipped space ({', '.join(shipped)})" in listed.stderr
    config = cnd_ray("config", "--config", "quickstart")  # a packaged config
    assert config.returncode == 0 and "steps: 2800" in config.stdout, config.stderr
