"""A tracking server away at start: the spool store and its upload, on real MLflow stores."""
import numpy as np

from cnd_ray import tracking


def _spool_with_a_run(tmp_path):
    spool = tracking.spool_uri(str(tmp_path / "run"), "http://127.0.0.1:9")
    run_id, _ = tracking.start_run(spool, "cnd_ray", "r1", {"optim.lr": 0.001}, {"data.shards": "S"})
    for step in (5, 10, 15):
        tracking.log_metrics(spool, run_id, {"loss_diff": 1.0 / step, "gamma": 0.5}, step)
    tracking.log_text(spool, run_id, "model: {}\n", "config.yaml")
    return spool, run_id


def test_a_spool_records_its_server_and_uploads_each_value_once(tmp_path):
    spool, run_id = _spool_with_a_run(tmp_path)
    assert tracking.spooled(str(tmp_path / "run")) == (spool, "http://127.0.0.1:9")
    assert tracking.spool_runs(spool) == [("cnd_ray", "r1")]
    server = f"sqlite:///{tmp_path}/server.db"
    first = tracking.sync(spool, server, "cnd_ray", "r1")
    # More steps after a first upload (the run went on), then the upload again, twice.
    tracking.log_metrics(spool, run_id, {"loss_diff": 0.01}, 20)
    tracking.finish_run(spool, run_id, "FINISHED", {"final_checkpoint": "c"})
    assert tracking.sync(spool, server, "cnd_ray", "r1") == first
    assert tracking.sync(spool, server, "cnd_ray", "r1") == first
    client = tracking._client(server)
    run = client.get_run(first)
    assert run.data.params == {"optim.lr": "0.001"} and run.info.status == "FINISHED"
    assert run.data.tags["data.shards"] == "S" and run.data.tags["final_checkpoint"] == "c"
    assert run.data.tags[tracking.RUN_NAME_TAG] == "r1"
    steps = [m.step for m in client.get_metric_history(first, "loss_diff")]
    assert sorted(steps) == [5, 10, 15, 20]  # each exactly once
    assert np.isclose(client.get_metric_history(first, "gamma")[0].value, 0.5)
    assert [f.path for f in client.list_artifacts(first)] == ["config.yaml"]
    tracking.drop_spool(str(tmp_path / "run"))
    assert tracking.spooled(str(tmp_path / "run")) is None


def test_a_server_that_is_not_there_is_known_within_seconds():
    import time

    from tests.helpers import free_port

    t0 = time.monotonic()
    assert not tracking.reachable(f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - t0 < tracking.PROBE_TIMEOUT_S + 2
    assert tracking.reachable("sqlite:////nonexistent/but/local.db")
