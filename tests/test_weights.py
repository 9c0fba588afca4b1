"""Damaged, foreign and hostile torch files are refused with one line naming the file, never run,
and never met with torch's advice to set weights_only=False."""
import os
import pickle
import shutil
import subprocess
import sys

import pytest

from cnd_ray import checkpoint, weights
from cnd_ray.errors import UserError
from tests.helpers import random_checkpoint


class _Payload:
    """Pickles to a call of os.system: what a hostile checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _spoil(path, how, marker):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "foreign":
        path.write_text("weights: not really\n")
    elif how.startswith("hostile"):  # protocol 2 reaches the call; 4 stops at an opcode before it
        with open(path, "wb") as f:
            pickle.dump({"ema": _Payload(marker)}, f, protocol=2 if how == "hostile" else 4)


@pytest.mark.parametrize("how, says", [("truncated", "damaged or truncated"), ("empty", "damaged or truncated"),
                                       ("foreign", "refused, not a file of tensors"),
                                       ("hostile", "refused, it holds code or objects"),
                                       ("hostile4", "refused, not a file of tensors")])
def test_a_bad_checkpoint_is_one_line_naming_it(tmp_path, how, says):
    ck = random_checkpoint(tmp_path / "ck")
    marker = tmp_path / "ran"
    _spoil(tmp_path / "ck" / "weights.pt", how, marker)
    with pytest.raises(UserError, match=says) as e:
        checkpoint.load_ema(ck)
    assert str(tmp_path / "ck" / "weights.pt") in str(e.value) and "weights_only" not in str(e.value)
    with pytest.raises(UserError, match=says):
        checkpoint.load(ck)
    assert not marker.exists()  # nothing in the file ran
    if how == "hostile":
        assert "posix.system" in str(e.value) or "os.system" in str(e.value)


def test_the_cli_names_a_truncated_checkpoint_in_one_line(tmp_path):
    ck = random_checkpoint(tmp_path / "ck")
    _spoil(tmp_path / "ck" / "weights.pt", "truncated", None)
    r = subprocess.run([sys.executable, "-m", "cnd_ray", "sample", "--ckpt", ck, "--num-per-class", "1",
                        "--out", str(tmp_path / "s")], capture_output=True, text=True,
                       env={**os.environ, "RAY_ADDRESS": ""}, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "weights.pt: damaged or truncated" in r.stderr and "Traceback" not in r.stderr


def test_a_missing_file_and_bytes_from_a_uri(tmp_path):
    with pytest.raises(UserError, match="nope.pt: does not exist"):
        weights.load(tmp_path / "nope.pt")
    random_checkpoint(tmp_path / "ck")
    blob = (tmp_path / "ck" / "weights.pt").read_bytes()
    assert "ema" in weights.load(blob, name="s3://b/weights.pt")
    with pytest.raises(UserError, match="s3://b/weights.pt: damaged"):
        weights.load(blob[:100], name="s3://b/weights.pt")
    shutil.rmtree(tmp_path / "ck")
