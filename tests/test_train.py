"""`cnd-ray train` end to end on the real Ray and the real MLflow (debug config, CPU)."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

from cnd_ray import checkpoint, tracking
from cnd_ray.launch import identity, train, worker
from cnd_ray import config as C
from tests.helpers import MlflowServer, assert_row_accounting, free_port, wait_for


def _cfg(tmp_path, **over):
    """The debug config as shipped (data.shuffle_buffer 1000: more rows than its synthetic train split holds)."""
    base = {"train.storage": str(tmp_path / "runs"), "track.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    base.update(over)
    return C.load("debug", [f"{k}={v}" for k, v in base.items()])


def _weights(path):
    return torch.load(f"{path}/weights.pt", map_location="cpu", weights_only=True)


def _history(tmp_path, name, key="loss_diff"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("cnd_ray")
    runs = client.search_runs([exp.experiment_id], f"tags.`{tracking.RUN_NAME_TAG}` = '{name}'")
    return runs, [m.step for m in client.get_metric_history(runs[0].info.run_id, key)]


@pytest.mark.slow
def test_interrupted_and_resumed_equals_straight(ray_local, tmp_path):
    """On a set smaller than the shipped shuffle buffer (debug: 64 images): the relaunch resumes
    mid-window and mid-epoch."""
    straight = train.run(_cfg(tmp_path, **{"train.name": "straight", "train.steps": 20}))
    first = train.run(_cfg(tmp_path, **{"train.name": "resumed", "train.steps": 10, "train.log_rows": "true"}))
    assert first["checkpoint"].endswith("checkpoint_00000010")
    resumed = train.run(_cfg(tmp_path, **{"train.name": "resumed", "train.steps": 20, "train.log_rows": "true"}))
    assert_row_accounting(tmp_path / "runs" / "resumed", _train_rows(tmp_path))
    assert checkpoint.read_meta(resumed["checkpoint"])["step"] == 20
    _assert_equal_weights(straight["checkpoint"], resumed["checkpoint"])
    runs, steps = _history(tmp_path, "resumed")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one MLflow run across launches
    assert steps == [5, 10, 15, 20]  # every step once: none lost, none duplicated
    assert straight["metrics"]["ranks_in_sync"] == 1.0
    (manifest,) = (tmp_path / "runs").glob("data/synthetic-*/manifest.json")
    test = json.loads(manifest.read_text())["splits"]["test"]  # the debug config's lighter test split
    assert sum(test.values()) == 3 * C.load("debug").train.synthetic_test_per_tone < 1200


def _train_rows(tmp_path) -> int:
    """Rows in the train split of the synthetic shards the runs under tmp_path made."""
    (manifest,) = (tmp_path / "runs").glob("data/synthetic-*/manifest.json")
    return sum(json.loads(manifest.read_text())["splits"]["train"].values())


def _assert_equal_weights(a, b):
    """Bit-equal: the same rows in the same order, the same RNG draws."""
    a, b = _weights(a), _weights(b)
    for part in ("dit", "ema", "classifier", "cls_ema"):
        for k in a[part] or {}:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


@pytest.mark.slow
def test_a_relaunch_that_changes_training_is_refused_unless_asked(ray_local, tmp_path, capsys):
    from cnd_ray.errors import UserError

    run = {"train.name": "changed"}
    first = train.run(_cfg(tmp_path, **run, **{"train.steps": 4}))
    old = checkpoint.load_config(first["checkpoint"])
    change = {**run, "train.steps": 8, "method.lambda_cls": 0.9, "classifier.lr": 0.5}
    with pytest.raises(UserError, match=(
            r"^run changed exists \(checkpoint .*checkpoint_00000004\) with other training settings: "
            rf"classifier.lr {old.classifier.lr!r} -> 0.5; method.lambda_cls {old.method.lambda_cls!r} -> 0.9\. "
            r"Rerun with train.resume_with_changes=true")):
        train.run(_cfg(tmp_path, **change))
    # Extending the run is allowed, and said.
    capsys.readouterr()
    train.run(_cfg(tmp_path, **run, **{"train.steps": 6}))
    assert "resuming with settings: train.steps 4 -> 6" in capsys.readouterr().out
    # Asked for: the run continues from step 6 under the new settings, the classifier's optimizer too.
    out = train.run(_cfg(tmp_path, **change, **{"train.resume_with_changes": "true"}))
    assert "resuming with changed training settings: classifier.lr" in capsys.readouterr().out
    assert checkpoint.read_meta(out["checkpoint"])["step"] == 8
    assert checkpoint.load_config(out["checkpoint"]).method.lambda_cls == 0.9
    state = checkpoint.load(out["checkpoint"], restore_rng=False)
    assert [g["lr"] for g in state.opt_cls.param_groups] == [0.5]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_corrupt_row_group_stops_the_run_naming_it_without_retries(ray_local, tmp_path, small_shards, workers):
    """Whichever rank meets the damage, every rank stops at the same step: no retries, no rank
    left waiting in an all-reduce."""
    import shutil

    from mlflow.tracking import MlflowClient

    from cnd_ray.data import shardset

    copy = tmp_path / "shards"
    shutil.copytree(small_shards, copy)
    m = shardset.read_manifest(str(copy))
    shard = copy / next(s.file for s in m.shards if s.split == "train")
    data = bytearray(shard.read_bytes())
    data[len(data) // 3: len(data) // 3 + 4096] = bytes(4096)  # zeros inside the pages; footer intact
    shard.write_bytes(bytes(data))
    shardset.check_files(str(copy), m)  # the footer still reads: only reading the rows finds it
    cfg = _cfg(tmp_path, **{"train.name": "damaged", "train.steps": 50, "data.shards": str(copy),
                            "data.image_size": m.image_size, "eval.sample_metrics": "false",
                            "scale.num_workers": workers})
    assert cfg.data.shuffle_buffer == C.DataConfig().shuffle_buffer == 1000  # as shipped
    t0 = time.time()
    with pytest.raises(train.TrainingStopped, match=rf"^damaged shard {shard}, row group \d+"):
        train.run(cfg)
    assert time.time() - t0 < 120  # no worker-group retries of a deterministic error
    runs, _ = _history(tmp_path, "damaged")
    assert runs[0].info.status == "FAILED"
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(
        runs[0].info.run_id).data.tags["stopped"].startswith(f"damaged shard {shard}")


@pytest.mark.slow
def test_two_workers_keep_identical_weights(ray_local, tmp_path):
    # With the released operator (a second DiT forward) and the paired target: every critic switch
    # runs end to end in some test (tests/test_critic.py lists where).
    out = train.run(_cfg(tmp_path, **{"scale.num_workers": 2, "train.steps": 6,
                                      "train.checkpoint_every": 3, "method.denoised_input": "reference",
                                      "method.critic_target": "paired"}))
    assert out["metrics"]["ranks_in_sync"] == 1.0 and out["metrics"]["step"] == 6
    assert out["metrics"]["critic_pull"] > 0  # the critic's pull over both ranks, to Ray Train


def _recorder(path):
    """A Ray Train callback writing the metrics of every rank's every report to a JSON-lines file.
    Defined here, so cloudpickle ships it by value to the controller (which cannot import tests/)."""
    from ray.train import UserCallback

    class Recorder(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps(metrics) + "\n")

    return Recorder()


@pytest.mark.slow
def test_every_rank_reports_the_sample_metrics_at_the_same_steps(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    log = tmp_path / "reports.jsonl"
    # A robust (PGD) critic, the posterior operator and the feature-matching target, end to end; and
    # fairness in the loop at every evaluation (each rank draws its share of the fill images).
    out = train.run(_cfg(tmp_path, **{"scale.num_workers": 2, "train.steps": 10, "train.eval_every": 5,
                                      "train.checkpoint_every": 10, "classifier.adversarial": "pgd",
                                      "classifier.adv_steps": 2, "method.denoised_input": "posterior",
                                      "method.critic_target": "features", "model.tone_groups": 3,
                                      "fairness.in_loop": "every"}), callbacks=[_recorder(str(log))])
    reports = [json.loads(line) for line in log.read_text().splitlines()]
    assert [[m["step"] for m in r] for r in reports] == [[5, 5], [10, 10]]  # both ranks, each time
    fair = {"fair_worst_auroc", "fair_gap", "fair_dark_sensitivity", "fair_worst_auroc_vs_real",
            "fair_worst_auroc_vs_real_lo", "fair_worst_auroc_vs_real_hi", "fair_gap_vs_reweighted"}
    for per_rank in reports:
        assert {"fd_ratio", "fd_judge", "kd_judge", "fidelity_auroc", "ms_ssim", "val_loss_diff", "critic_pull",
                "lesion_share_benign", "lesion_share_malignant"} | fair <= set(per_rank[0])
        same = {k: v for k, v in per_rank[0].items() if k not in ("epoch", "ranks_in_sync")}
        assert {k: per_rank[1][k] for k in same} == same  # the same numbers on every rank
        assert per_rank[0]["fair_synthetic"] == 16  # the debug config's fairness.fill_max
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(out["mlflow_run_id"])
    for key in ("fd_ratio", "fidelity_auroc", "kd_judge_std", "eval_share", *fair):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [5, 10], key
    fairness = json.loads(open(os.path.join(out["checkpoint"], worker.FAIRNESS)).read())
    assert fairness["step"] == 10 and fairness["metrics"]["fair_gap"] == reports[1][0]["fair_gap"]
    assert {f.path for f in client.list_artifacts(run.info.run_id, "fairness")} == {
        "fairness/fairness_step00000005.json", "fairness/fairness_step00000010.json"}
    assert run.data.metrics["judge_heldout_auroc"] > 0 and os.path.isfile(run.data.tags["cnd_ray.judge"])
    images = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
    assert {p.split("+")[2] for p in images if p.endswith(".png")} == {"5", "10"}  # a grid per step
    # The final checkpoint keeps the images its evaluation judged (both ranks' shares): what the
    # quickstart writes out instead of redrawing, so they must be the checkpoint's own draw.
    from cnd_ray import checkpoint, monitor
    from cnd_ray.launch import sample
    from cnd_ray.jobs.evaluate import read_samples

    kept = np.load(os.path.join(out["checkpoint"], worker.JUDGED))
    cfg, ema, step = checkpoint.load_ema(out["checkpoint"])
    cfg = monitor.search_config(cfg)
    plan = monitor.sample_plan(cfg)
    assert step == 10 and np.array_equal(kept["index"], plan["index"])
    sample.generate_images(cfg, out["checkpoint"], step, ema, plan, tmp_path / "redrawn", progress=False)
    redrawn = read_samples(tmp_path / "redrawn", plan["index"], plan["label"]).numpy()
    assert np.abs(redrawn.astype(int) - kept["images"].astype(int)).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("where", ["folder", "uri"])
def test_non_finite_loss_stops_the_run_naming_the_step(ray_local, tmp_path, where):
    """Rank 0's stop signal reaches the driver through the run's storage, a folder or a URI (on a
    URI it once failed to open, and the group was retried instead of stopping)."""
    storage = f"file://{tmp_path}/runs" if where == "uri" else str(tmp_path / "runs")
    with pytest.raises(train.TrainingStopped, match=r"non-finite loss at step \d+"):
        train.run(_cfg(tmp_path, **{"optim.lr": 1e12, "classifier.lr": 1e12, "train.steps": 40,
                                    "train.storage": storage}))
    assert not list((tmp_path / "runs").rglob(identity.STOP_FILE))  # a relaunch starts clean


def test_preflight_names_the_setting_instead_of_hanging(ray_local, tmp_path):
    with pytest.raises(train.UserError, match="scale.num_workers"):
        train.run(_cfg(tmp_path, **{"scale.num_workers": 8, "scale.cpus_per_worker": 1.0}))


@pytest.mark.slow
def test_ui_comes_up_beside_a_training_and_serves_the_runs_over_rest(tmp_path):
    """`cnd-ray ui` while a quickstart-scale training runs on the same cores and logs to the same
    store: it answers within 30 s (MLflow's default 4 workers never did under such load), prints the
    page once it answers, serves the runs over REST, and leaves nothing running when stopped."""
    import psutil

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run(uri, "cnd_ray", "ui-check", {"a": 1}, {})[0].id
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "train.log", "w")
    training = subprocess.Popen(
        [sys.executable, "-m", "cnd_ray", "train", "--config", "quickstart", "train.steps=1000000",
         f"train.storage={tmp_path}/runs", f"track.tracking_uri={uri}", "eval.sample_metrics=false",
         "fairness.in_loop=off", "train.synthetic_images=200"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    port = free_port()
    proc = server = None
    try:
        assert wait_for(lambda: "[cnd-ray] step " in (tmp_path / "train.log").read_text(), timeout=300), \
            (tmp_path / "train.log").read_text()[-3000:]
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "cnd_ray", "ui", f"track.tracking_uri={uri}",
                                 "--port", str(port)], stdout=subprocess.PIPE, text=True)
        # it lands on the runs table of the experiment, in the model-training view, once it answers
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/#/experiments/1/runs?workflowType=machine_learning" in line
        assert "up in" in line and time.monotonic() - t0 < 30, (line, os.getloadavg())
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
                                     data=json.dumps({"experiment_ids": ["1"]}).encode(),
                                     headers={"Content-Type": "application/json"})
        runs = json.loads(urllib.request.urlopen(req, timeout=10).read())["runs"]
        assert run_id in [r["info"]["run_id"] for r in runs] and len(runs) == 2  # and the training's
        server = psutil.Process(proc.pid).children()[0]  # mlflow ui, serving in its own process:
        assert not server.children()  # no second Python for uvicorn (tracking/serve.py)
    finally:
        if proc:
            proc.terminate()  # as a service manager stops it
            proc.wait(timeout=60)
        os.killpg(training.pid, signal.SIGTERM)
        training.wait(timeout=120)
    # ... and nothing it started is left running (with MLflow's defaults its uvicorn workers and job
    # consumers were)
    def group():
        out = []
        for p in psutil.process_iter(["pid"]):
            with contextlib.suppress(OSError):
                if os.getpgid(p.pid) == server.pid:
                    out.append(p)
        return out

    gone, alive = psutil.wait_procs(group(), timeout=30)
    assert not alive, [p.cmdline() for p in alive]


def _run_in_thread(cfg):
    import threading

    out = {}

    def target():
        try:
            out["result"] = train.run(cfg)
        except BaseException as e:  # surfaced by the test
            out["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, out


@pytest.mark.slow
def test_a_killed_worker_restores_from_its_checkpoint_and_finishes(ray_local, tmp_path):
    import os
    import signal

    import psutil

    # A set larger than the shipped shuffle buffer (1040 train rows against 1000): the 1600 rows
    # trained cross a window and an epoch.
    run = {"train.steps": 200, "train.checkpoint_every": 30, "train.log_every": 30, "train.max_failures": 2,
           "train.synthetic_images": 1300}
    straight = train.run(_cfg(tmp_path, **{"train.name": "straight", **run}))
    assert _train_rows(tmp_path) > C.DataConfig().shuffle_buffer
    cfg = _cfg(tmp_path, **{"train.name": "killme", "train.log_rows": "true", **run})
    th, out = _run_in_thread(cfg)
    first = tmp_path / "runs" / "killme" / "checkpoint_00000030"
    assert wait_for(lambda: (first / "meta.json").exists())
    workers = [p for p in psutil.process_iter(["cmdline"])
               if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert workers, "no Ray Train worker process found"
    os.kill(workers[0].pid, signal.SIGKILL)
    th.join(timeout=400)
    assert "error" not in out, out.get("error")
    assert checkpoint.read_meta(out["result"]["checkpoint"])["step"] == 200
    # The restart went on with the next untrained row: the run ends where an unbroken one does.
    _assert_equal_weights(straight["checkpoint"], out["result"]["checkpoint"])
    assert_row_accounting(tmp_path / "runs" / "killme", _train_rows(tmp_path))
    runs, steps = _history(tmp_path, "killme")
    assert steps == sorted(set(steps)) and steps[-1] == 200  # no step logged twice


@pytest.mark.slow
def test_metrics_survive_a_tracking_server_outage(ray_local, tmp_path):
    server = MlflowServer(tmp_path).start()
    try:
        cfg = _cfg(tmp_path, **{"train.name": "outage", "train.steps": 300, "train.log_every": 5,
                                "train.checkpoint_every": 100, "track.tracking_uri": server.uri})
        th, out = _run_in_thread(cfg)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)

        def some_metrics():
            exp = client.get_experiment_by_name("cnd_ray")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "loss_diff"))

        assert wait_for(some_metrics)
        server.stop()
        time.sleep(4)  # training goes on while the server is away
        server.start()
        th.join(timeout=400)
        assert "error" not in out, out.get("error")
        exp = client.get_experiment_by_name("cnd_ray")
        run = client.search_runs([exp.experiment_id])[0]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss_diff")]
        assert sorted(steps) == list(range(5, 301, 5))  # every logged step arrived, once
    finally:
        server.stop()


@pytest.mark.slow
def test_a_server_away_at_start_gets_the_run_when_it_answers(ray_local, tmp_path, monkeypatch, capsys):
    """The tracking server is not there when training starts: training starts anyway, logging to
    the run's spool; the server comes up mid-run and gets the metrics while the run goes on, and
    at the end everything, each value once; the spool is gone."""
    server = MlflowServer(tmp_path)  # its port, nothing listening yet
    from cnd_ray.tracking import spool

    monkeypatch.setattr(spool, "UPLOAD_EVERY_S", 1.0)
    # 1000 steps: about a minute of training at ~17 steps/s here, long enough to outlast the server's
    # start-up (seconds); 3000 took 374 s in the suite here and ran past the join below in CI.
    cfg = _cfg(tmp_path, **{"train.name": "away", "train.steps": 1000, "train.log_every": 50,
                            "train.checkpoint_every": 1000, "track.tracking_uri": server.uri})
    t0 = time.time()
    th, out = _run_in_thread(cfg)
    run_dir = tmp_path / "runs" / "away"
    try:
        spool = f"sqlite:///{run_dir}/{tracking.SPOOL}/mlflow.db"

        def training_logs_to_the_spool():
            runs = tracking.spool_runs(spool) if (run_dir / tracking.SPOOL / "mlflow.db").exists() else []
            return bool(runs) and bool(tracking.mlflow_client(spool).get_metric_history(
                tracking.find_run(spool, "cnd_ray", "away"), "loss_diff"))

        assert wait_for(training_logs_to_the_spool, 300), out
        assert time.time() - t0 < 200  # not MLflow's minutes of retries before giving up
        server.start()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)

        def uploaded():
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "loss_diff"))

        assert wait_for(uploaded, 120), "nothing uploaded while the run went on"
        assert th.is_alive()  # ... before the run finished
        th.join(timeout=400)
        assert "error" not in out, out.get("error")
        (run,) = client.search_runs([client.get_experiment_by_name("cnd_ray").experiment_id])
        assert out["result"]["mlflow_run_id"] == run.info.run_id and run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss_diff")]
        assert sorted(steps) == list(range(50, 1001, 50))  # every logged step, once
        assert run.data.params["optim.lr"] == str(cfg.optim.lr)
        assert {"config.yaml", "final_checkpoint.txt"} <= {f.path for f in client.list_artifacts(run.info.run_id)}
        assert not (run_dir / tracking.SPOOL).exists()
        assert "does not answer: the run starts anyway" in capsys.readouterr().out
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["folder", "uri"])
def test_a_server_that_never_answers_leaves_a_spool_that_track_sync_uploads(ray_local, tmp_path, capsys, where):
    """The spool lives in the run's storage, a local folder or a URI (here file://, which takes the
    same path as s3://: rank 0 logs to a copy on its node and pushes it there)."""
    from cnd_ray import cli

    server = MlflowServer(tmp_path)
    storage = f"file://{tmp_path}/runs" if where == "uri" else str(tmp_path / "runs")
    cfg = _cfg(tmp_path, **{"train.name": "never", "train.steps": 20, "track.tracking_uri": server.uri,
                            "train.storage": storage})
    out = train.run(cfg)  # finishes: exit 0 for `cnd-ray train`
    run_dir = f"{storage}/never"
    on_disk = tmp_path / "runs" / "never" / tracking.SPOOL
    said = capsys.readouterr().out
    kept = f"{run_dir}/{tracking.SPOOL}" if where == "uri" else f"sqlite:///{on_disk}/mlflow.db"
    assert f"does not answer: the run stays logged in {kept};" in said
    assert f"`cnd-ray track-sync {run_dir}`" in said
    assert (on_disk / "mlflow.db").is_file() and (on_disk / "mlartifacts").is_dir()
    assert cli.main(["track-sync", run_dir]) == 2  # still away: one line, exit 2
    with server:
        assert cli.main(["track-sync", run_dir]) == 0
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("cnd_ray").experiment_id])
        assert run.info.status == "FINISHED" and run.data.tags[tracking.RUN_NAME_TAG] == "never"
        # rank 0's metrics reached the storage's spool (at a URI: pushed from its working copy)
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss_diff")) == [5, 10, 15, 20]
        assert run.data.params["optim.lr"] == str(cfg.optim.lr)
        assert {"config.yaml", "final_checkpoint.txt"} <= {f.path for f in client.list_artifacts(run.info.run_id)}
        assert out["checkpoint"] and not on_disk.exists()
        assert cli.main(["track-sync", run_dir]) == 2  # nothing left to upload


@pytest.mark.slow
def test_latent_run_logs_decoded_sample_grids(ray_local, tmp_path, latent_shards):
    """Latent space: grids are decoded by the VAE the shards record (64 px tiles, not 8 px latents),
    and the spooled artifact copies are cleaned up once uploaded."""
    import glob
    import tempfile

    from mlflow.tracking import MlflowClient
    from PIL import Image

    shards, manifest, _ = latent_shards
    spool_before = set(glob.glob(f"{tempfile.gettempdir()}/cnd_ray_artifact_*"))
    cfg = _cfg(tmp_path, **{"data.shards": shards, "data.space": "latent", "data.image_size": 64,
                            "train.steps": 4, "train.eval_every": 4, "train.checkpoint_every": 4,
                            "track.system_metrics_every": 1})
    out = train.run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    grids = [f.path for f in client.list_artifacts(out["mlflow_run_id"], "samples")]
    assert grids == ["samples/samples_step00000004.png"]
    img = Image.open(client.download_artifacts(out["mlflow_run_id"], grids[0], str(tmp_path)))
    # the judged samples, decoded to pixels: search_samples per class (at most 8), 2 classes
    assert img.size == (min(8, cfg.eval.search_samples) * 64, 2 * 64)
    # judged in pixel space too: the sample metrics of a latent run
    assert {"fd_ratio", "fidelity_auroc"} <= set(client.get_run(out["mlflow_run_id"]).data.metrics)
    assert [m.step for m in client.get_metric_history(out["mlflow_run_id"], "fd_ratio")] == [4]
    # the training node's CPU and memory, sampled by its worker (MLflow's system metrics)
    assert "system/node0/cpu_utilization_percentage" in client.get_run(out["mlflow_run_id"]).data.metrics
    # its final checkpoint is the run's logged model, READY, with the evaluation's metrics linked
    model = client.get_logged_model(out["model_id"])
    assert str(model.status).endswith("READY") and model.tags["cnd_ray.checkpoint"] == out["checkpoint"]
    assert {"fd_ratio", "loss_diff"} <= {m.key for m in model.metrics}
    # its shards are the run's dataset inputs (MLflow's Dataset column), train and val
    inputs = client.get_run(out["mlflow_run_id"]).inputs.dataset_inputs
    assert {i.dataset.name for i in inputs} == {os.path.basename(str(shards))} and len(inputs) == 2
    # the checkpoint names its run: evaluate and sample find the run from the config it holds
    assert identity.run_name(checkpoint.load_config(out["checkpoint"])) == out["run_name"]
    assert set(glob.glob(f"{tempfile.gettempdir()}/cnd_ray_artifact_*")) <= spool_before


def test_latent_run_without_its_vae_names_the_setting(tmp_path, latent_shards):
    from cnd_ray import vae

    cfg = _cfg(tmp_path, **{"data.shards": latent_shards[0], "data.space": "latent",
                            "data.image_size": 64, "data.vae": str(tmp_path / "gone")})
    with pytest.raises(train.UserError, match="data.vae: no VAE at .*gone"):
        vae.folder_for(cfg, {})


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_at_the_current_step_and_the_rerun_resumes_there(tmp_path):
    """As a terminal delivers it: SIGINT to the whole process group of `cnd-ray train`."""
    import re
    import signal

    cmd = [sys.executable, "-m", "cnd_ray", "train", "--config", "debug", "train.name=ctrlc",
           "train.steps=2000", "train.checkpoint_every=500", "train.log_every=5",
           f"train.storage={tmp_path / 'runs'}", f"track.tracking_uri=sqlite:///{tmp_path}/m.db"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path, start_new_session=True)
    for line in proc.stdout:  # training is under way
        if re.search(r"step (\d+)/2000", line) and int(re.search(r"step (\d+)/", line).group(1)) >= 30:
            break
    os.killpg(proc.pid, signal.SIGINT)  # the driver and every process it started, as a terminal does
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    found = re.search(r"interrupted at step (\d+); checkpoint (\S+); run the same command", err)
    # no traceback of ours (Ray's own actors may log one when other Rays run on the machine)
    assert found and "Traceback" not in "\n".join(x for x in err.splitlines() if "pid=" not in x), err[-3000:]
    step = int(found.group(1))
    assert 30 <= step < 500 and found.group(2).endswith(f"checkpoint_{step:08d}")
    assert checkpoint.read_meta(found.group(2))["step"] == step
    assert not (tmp_path / "runs" / "ctrlc" / "INTERRUPT_REQUESTED").exists()
    again = subprocess.run([a if a != "train.steps=2000" else f"train.steps={step + 5}" for a in cmd],
                           capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming at step {step}" in again.stdout
