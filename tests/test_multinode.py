"""Multi-node runs on a simulated cluster (tests/multinode.py, in a child process): training across
nodes that survives losing one, and a search whose trials land on different nodes."""
import json
import re
import subprocess
import sys

import pytest

from tests.helpers import assert_row_accounting


def _scenario(name: str, folder) -> tuple[dict, str]:
    p = subprocess.run([sys.executable, "-m", "tests.multinode", name, str(folder)],
                       capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):]), p.stdout + p.stderr


@pytest.mark.slow
def test_two_workers_on_two_nodes_survive_losing_one(tmp_path):
    r, log = _scenario("train-losing-a-node", tmp_path)
    assert r["error"] is None and r["status"] == "FINISHED"
    assert len(set(r["before"])) == 2  # STRICT_SPREAD: one worker per node
    assert r["removed"] in r["before"] and r["removed"] not in r["alive"]
    assert len(set(r["after"])) == 2 and r["removed"] not in r["after"]  # restarted elsewhere
    assert r["final"].endswith("checkpoint_00000320")
    # The restarted group began at a stored checkpoint, not at step 0.
    starts = [int(s) for s in re.findall(r"rank 0/2: .*?start step (\d+)", log)]
    assert starts[0] == 0 and len(starts) >= 2 and all(s >= 40 and s % 40 == 0 for s in starts[1:]), starts
    assert r["steps"] == list(range(10, 321, 10))  # every logged step once, none lost
    # Both ranks' rows, across the restart on other nodes: none skipped, none trained twice.
    (manifest,) = tmp_path.glob("runs/data/synthetic-*/manifest.json")
    assert_row_accounting(tmp_path / "runs" / "lose-a-node",
                          sum(json.loads(manifest.read_text())["splits"]["train"].values()))


@pytest.mark.slow
def test_a_search_places_its_trials_on_both_nodes(tmp_path):
    r, _ = _scenario("tune-on-two-nodes", tmp_path)
    assert r["status"] == ["finished", "finished"]
    assert r["trial_nodes"] == r["worker_nodes"]  # one trial's worker on each worker node
