"""A tracking server away at start: the spool store and its upload, on real MLflow stores."""
import os
import time

import numpy as np
import pytest

from cnd_ray import tracking


def _spool_with_a_run(tmp_path):
    spool = tracking.spool_uri(str(tmp_path / "run"), "http://127.0.0.1:9")
    run, _ = tracking.start_run(spool, "cnd_ray", "r1", {"optim.lr": 0.001}, {"data.shards": "S"})
    for step in (5, 10, 15):
        run.log_metrics({"loss_diff": 1.0 / step, "gamma": 0.5}, step)
    run.log_text("model: {}\n", "config.yaml")
    return spool, run


def test_a_spool_records_its_server_and_uploads_each_value_once(tmp_path):
    spool, spooled = _spool_with_a_run(tmp_path)
    assert tracking.spooled(str(tmp_path / "run")) == (spool, "http://127.0.0.1:9")
    assert tracking.spool_runs(spool) == [("cnd_ray", "r1")]
    server = f"sqlite:///{tmp_path}/server.db"
    first = tracking.sync(spool, server, "cnd_ray", "r1")
    # More steps after a first upload (the run went on), then the upload again, twice.
    spooled.log_metrics({"loss_diff": 0.01}, 20)
    spooled.finish("FINISHED", {"final_checkpoint": "c"})
    assert tracking.sync(spool, server, "cnd_ray", "r1") == first
    assert tracking.sync(spool, server, "cnd_ray", "r1") == first
    client = tracking.mlflow_client(server)
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


def test_the_probe_leaves_the_process_mlflow_settings_alone():
    """The uploader probes from its own thread while the caller uses MLflow: a probe that set
    MLflow's retry and timeout variables for the process cut the caller's requests to one 5 s try
    (a test's client timed out on a busy server)."""
    import socket
    import threading

    silent = socket.socket()  # accepts the connection, never answers: the probe waits its 5 s
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    before = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    probe = threading.Thread(target=tracking.reachable, args=(f"http://127.0.0.1:{silent.getsockname()[1]}",))
    probe.start()
    try:
        time.sleep(1.0)
        assert probe.is_alive()
        assert {k: os.environ.get(k) for k in before} == before
    finally:
        probe.join()
        silent.close()


def test_a_server_that_is_not_there_is_known_within_seconds():
    import time

    from tests.helpers import free_port

    t0 = time.monotonic()
    assert not tracking.reachable(f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - t0 < tracking.PROBE_TIMEOUT_S + 2
    assert tracking.reachable("sqlite:////nonexistent/but/local.db")


def test_a_spool_at_a_uri_is_a_working_copy_pushed_to_its_storage(tmp_path):
    """At a URI (file:// takes the same path as s3://) each writer logs to a local copy and pushes
    it; artifacts go to the storage directly; a later reader pulls what was pushed."""
    run_dir = f"file://{tmp_path}/run"
    on_disk = tmp_path / "run" / tracking.SPOOL
    spool = tracking.spool_uri(run_dir, "http://127.0.0.1:9")
    assert str(tmp_path) not in spool  # SQLite works on a local file, not on the storage
    run, _ = tracking.start_run(spool, "cnd_ray", "r1", {"optim.lr": 0.001}, {},
                                tracking.spool_artifacts(run_dir))
    run.log_text("model: {}\n", "config.yaml")
    assert list(on_disk.joinpath("mlartifacts").rglob("config.yaml"))  # in the storage already
    assert tracking.spooled(run_dir) is None  # nothing pushed yet
    tracking.push_spool(run_dir, spool)
    rank0 = tracking.spooled(run_dir)[0]  # rank 0 on another node: its own copy of what was pushed
    assert rank0 != spool
    for step in (5, 10):
        tracking.Run(rank0, run.id).log_metrics({"loss_diff": 1.0 / step}, step)
    tracking.push_spool(run_dir, rank0)
    later, server = tracking.spooled(run_dir)
    assert server == "http://127.0.0.1:9"
    assert sorted(m.step for m in tracking.mlflow_client(later).get_metric_history(run.id, "loss_diff")) == [5, 10]
    dest = f"sqlite:///{tmp_path}/server.db"
    assert tracking.upload(run_dir, to=dest)[1].keys() == {"r1"}
    client = tracking.mlflow_client(dest)
    (run,) = client.search_runs([client.get_experiment_by_name("cnd_ray").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss_diff")) == [5, 10]
    assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    assert not on_disk.exists()


def test_the_uploader_of_a_search_uploads_its_trials_as_they_go_keeping_the_spools(tmp_path):
    """A search at a URI: its parent run spools in its folder, each trial in its run's; while
    they run, the uploader copies what rank 0s pushed so far, trials nested under the parent."""
    import time

    search, trials = f"file://{tmp_path}/s", f"file://{tmp_path}/s-trials"
    server = "http://127.0.0.1:9"
    spool = tracking.spool_uri(search, server, children=trials)
    parent, _ = tracking.start_run(spool, "cnd_ray", "s", {}, {"cnd_ray.kind": "search"},
                                   tracking.spool_artifacts(search))
    tracking.push_spool(search, spool)
    for trial in ("s-a", "s-b"):
        run_dir = f"{trials}/{trial}"
        t = tracking.spool_uri(run_dir, server)
        run, _ = tracking.start_run(t, "cnd_ray", trial, {}, {tracking.PARENT_TAG: parent.id},
                                    tracking.spool_artifacts(run_dir))
        run.log_metrics({"loss_diff": 0.5}, 5)
        tracking.push_spool(run_dir, t)
    dest = f"sqlite:///{tmp_path}/server.db"  # a store that answers, standing in for the server
    uploader = tracking.SpoolUploader(search, dest, every=0.2)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not tracking.find_run(dest, "cnd_ray", "s-b"):
            time.sleep(0.2)
    finally:
        uploader.close()
    top = tracking.find_run(dest, "cnd_ray", "s")
    for trial in ("s-a", "s-b"):
        got = tracking.mlflow_client(dest).get_run(tracking.find_run(dest, "cnd_ray", trial))
        assert got.data.tags[tracking.PARENT_TAG] == top
        assert [m.step for m in tracking.mlflow_client(dest).get_metric_history(got.info.run_id, "loss_diff")] == [5]
    assert tracking.spooled(search) and tracking.spooled(f"{trials}/s-a")  # kept: the runs go on


def test_a_uri_spool_is_fetched_only_when_it_is_read(tmp_path, monkeypatch):
    """Asking which server a spool waits for, and probing that server while it is away (every 30 s
    from the uploader), read one small file: the store itself is downloaded only to be uploaded."""
    from cnd_ray import storage

    run_dir = f"file://{tmp_path}/run"
    spool = tracking.spool_uri(run_dir, "http://127.0.0.1:9")
    tracking.start_run(spool, "cnd_ray", "r1", {}, {}, tracking.spool_artifacts(run_dir))
    tracking.push_spool(run_dir, spool)
    fetched, real = [], storage.download
    monkeypatch.setattr(storage, "download", lambda *a: fetched.append(a[0]) or real(*a))
    assert tracking.spool_server(run_dir) == "http://127.0.0.1:9"
    assert tracking.upload(run_dir) is None  # the server is away
    assert fetched == []
    assert tracking.upload(run_dir, to=f"sqlite:///{tmp_path}/server.db")[1].keys() == {"r1"}
    assert len(fetched) == 1 and tracking.spool_server(run_dir) is None


def test_the_experiment_describes_itself_and_the_ui_urls_land_on_its_runs(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    assert tracking.ui_urls(uri, "http://h:1", "cnd_ray") == {"runs": "http://h:1/"}  # nothing yet
    tracking.start_run(uri, "cnd_ray", "r", {}, {})
    exp = tracking.mlflow_client(uri).get_experiment_by_name("cnd_ray")
    assert "fd_ratio" in exp.tags["mlflow.note.content"]  # which metric ranks trials
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = f"http://h:1/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    assert tracking.ui_urls(uri, "http://h:1", "cnd_ray") == {"runs": runs}
    first, _ = tracking.start_run(uri, "cnd_ray", "s1", {}, {"cnd_ray.kind": "search"})
    time.sleep(0.01)
    latest, _ = tracking.start_run(uri, "cnd_ray", "s2", {}, {"cnd_ray.kind": "search"})
    urls = tracking.ui_urls(uri, "http://h:1", "cnd_ray")
    assert urls["parent"] == f"http://h:1/#/experiments/{exp.experiment_id}/runs/{latest.id}?workflowType=machine_learning"
    assert "search" not in urls  # no saved view yet: the search saves it when it ends
    tracking.save_search_view(latest, "cnd_ray", "k1", "fd_ratio", True, ["method.lambda_cls"])
    assert tracking.ui_urls(uri, "http://h:1", "cnd_ray")["search"] == f"{runs}&viewStateShareKey=k1"
    import json

    view = json.loads(tracking.mlflow_client(uri).get_experiment(exp.experiment_id).tags[tracking.SHARED_VIEW + "k1"])
    assert view["orderByKey"] == "metrics.`fd_ratio`" and view["orderByAsc"] is True
    assert {"metrics.`fd_ratio`", "params.`method.lambda_cls`", "attributes.`Dataset`"} <= set(view["selectedColumns"])


def test_a_run_names_its_shards_as_datasets_once_per_split(tmp_path):
    import json

    from cnd_ray.data import shardset

    raw = {"label_mode": "melanoma", "image_size": 32, "latent": None,
           "splits": {"train": {"benign": 30, "malignant": 10}, "val": {"benign": 5, "malignant": 2}},
           "skin_tones": {"light": 20, "dark": 27},
           "shards": [{"file": "train-00000.parquet", "split": "train", "rows": 40, "sha256": "a"},
                      {"file": "val-00000.parquet", "split": "val", "rows": 7, "sha256": "b"}]}
    manifest = shardset.Manifest.parse(raw)
    uri = f"sqlite:///{tmp_path}/m.db"
    run, _ = tracking.start_run(uri, "cnd_ray", "r", {}, {})
    for _ in range(2):  # a resume logs again: nothing doubles
        run.log_dataset(str(tmp_path / "shards-32"), manifest)
    inputs = tracking.mlflow_client(uri).get_run(run.id).inputs.dataset_inputs
    assert sorted(t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context") == ["train", "val"]
    d = next(i.dataset for i in inputs if json.loads(i.dataset.profile)["split"] == "train")
    assert d.name == "shards-32" and d.digest == tracking.shards_digest(manifest, "train") and d.source_type == "local"
    profile = json.loads(d.profile)
    assert profile["counts"] == raw["splits"][profile["split"]] and profile["skin_tones"]["dark"] == 27
    # the digest follows the contents, not where they are or when they were written
    moved = shardset.Manifest.parse({**raw, "seconds": 9.0, "roots": ["/elsewhere"]})
    assert tracking.shards_digest(moved, "train") == d.digest
    changed = shardset.Manifest.parse(
        {**raw, "shards": [{"file": "train-00000.parquet", "split": "train", "rows": 40, "sha256": "c"}]})
    assert tracking.shards_digest(changed, "train") != d.digest
    # a spooled run's datasets reach the server with it
    server = f"sqlite:///{tmp_path}/server.db"
    up = tracking.sync(uri, server, "cnd_ray", "r")
    assert len(tracking.mlflow_client(server).get_run(up).inputs.dataset_inputs) == 2
    tracking.sync(uri, server, "cnd_ray", "r")
    assert len(tracking.mlflow_client(server).get_run(up).inputs.dataset_inputs) == 2


def test_runs_starting_at_once_on_the_same_shards_each_get_their_run_and_datasets(tmp_path):
    """A search's trials start together and log the same shards. MLflow looks an experiment or a
    dataset up, then inserts it: two could both miss it, and the later insert broke on its unique
    key (a trial FAILED in CI, its row without a dataset). 8 new experiments, each started by 4
    runs at once: without the fixes, 3-4 of the 8 lost the dataset race here, and 6-8 the experiment's."""
    import threading

    from cnd_ray.data import shardset

    manifest = shardset.Manifest.parse(
        {"label_mode": "melanoma", "image_size": 32, "latent": None,
         "splits": {"train": {"benign": 3, "malignant": 1}, "val": {"benign": 1, "malignant": 1}},
         "shards": [{"file": "train-00000.parquet", "split": "train", "rows": 4, "sha256": "a"},
                    {"file": "val-00000.parquet", "split": "val", "rows": 2, "sha256": "b"}]})
    uri = f"sqlite:///{tmp_path}/m.db"
    tracking.start_run(uri, "first", "r", {}, {})  # the store's tables, made once
    for search in range(8):
        start, runs, errors = threading.Barrier(4), [], []

        def trial(i):
            start.wait()
            try:
                run, _ = tracking.start_run(uri, f"search{search}", f"trial{i}", {}, {})
                run.log_dataset(str(tmp_path / "shards"), manifest)
                runs.append(run)
            except Exception as e:  # collected: the assert below names it
                errors.append(e)

        threads = [threading.Thread(target=trial, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert all(len(tracking.mlflow_client(uri).get_run(r.id).inputs.dataset_inputs) == 2 for r in runs)
        assert len(runs) == 4


def test_a_finished_run_is_a_logged_model_and_a_registered_one_resolves_to_its_checkpoint(tmp_path):
    from cnd_ray.launch import identity
    from cnd_ray.errors import UserError

    uri = f"sqlite:///{tmp_path}/m.db"
    ckpt = tmp_path / "run" / "checkpoint_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    run_id = tracking.start_run(uri, "cnd_ray", "r", {}, {})[0].id
    model_id = tracking.start_model(uri, "cnd_ray", run_id, "r", {"model.size": "T"})
    assert tracking.start_model(uri, "cnd_ray", run_id, "r", {}) == model_id  # a resume: the same one
    tracker = tracking.MlflowTracker(uri, run_id, model_id=model_id)
    tracker.log(10, {"fd_ratio": 2.5})
    tracker.close()
    tracking.finish_model(uri, model_id, str(ckpt), 10, "model: {}\n")
    client = tracking.mlflow_client(uri)
    model = client.get_logged_model(model_id)
    assert str(model.status).endswith("READY") and model.source_run_id == run_id
    assert [(m.key, m.step, m.value) for m in model.metrics] == [("fd_ratio", 10, 2.5)]
    assert model.tags[tracking.CHECKPOINT_TAG] == str(ckpt) and model.params == {"model.size": "T"}
    assert client.get_run(run_id).data.tags[tracking.MODEL_TAG] == model_id
    assert tracking.register_model(uri, "search-1", model_id, run_id, {"fd_ratio": 2.5}, "cfg") == "1"
    assert tracking.register_model(uri, "search-1", model_id, run_id, {}, "cfg") == "2"
    over = [f"track.tracking_uri={uri}"]
    for ref in ("models:/search-1@best", "models:/search-1/1", f"models:/{model_id}"):
        assert identity.resolve_checkpoint(ref, over) == str(ckpt), ref
    with pytest.raises(UserError, match="models:/search-1/9: not found"):
        identity.resolve_checkpoint("models:/search-1/9", over)


def test_system_metrics_are_sampled_per_node_and_never_into_a_spool(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    run, _ = tracking.start_run(uri, "cnd_ray", "r", {}, {})
    run_id, target = run.id, tracking.Target(run)
    assert tracking.system_monitor(tracking.Target(run, spooled=True), 0, 1.0) is None
    assert tracking.system_monitor(target, 0, 0.0) is None  # off
    monitor = tracking.system_monitor(target, 3, 0.3)
    time.sleep(1.5)
    monitor.finish()
    metrics = tracking.mlflow_client(uri).get_run(run_id).data.metrics
    assert {"system/node3/cpu_utilization_percentage", "system/node3/system_memory_usage_megabytes"} <= set(metrics)
