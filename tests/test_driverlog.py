"""The driver's log is kept with its run, in storage and in MLflow, however the run ends (GUARANTEES 20)."""
import os
import shutil
import sys
import threading

import pytest

from cnd_ray import cli, tracking
from cnd_ray.launch import driverlog


def _artifact(uri, run_id, folder="logs"):
    """(name, text) of the one driver log attached to the MLflow run."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    files = MlflowClient(uri).list_artifacts(run_id, folder)
    assert len(files) == 1, files
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=files[0].path,
                                               tracking_uri=uri)
    return os.path.basename(files[0].path), open(path).read()


def test_capture_tees_to_the_terminal_and_the_file(capfd):
    with driverlog.capture() as cap:
        print("from the driver")
        print("\x1b[36m(worker pid=1)\x1b[0m from a worker", file=sys.stderr)
        t = threading.Thread(target=lambda: print("from Ray's log thread"))
        t.start()
        t.join()
        assert sys.stdout is not sys.__stdout__
        text = open(cap.path).read()  # line-buffered: on disk already
    out, err = capfd.readouterr()
    assert "from the driver" in out and "from Ray's log thread" in out
    assert "\x1b[36m(worker pid=1)" in err  # the terminal keeps Ray's colours
    assert text.splitlines() == ["from the driver", "(worker pid=1) from a worker", "from Ray's log thread"]
    assert not os.path.exists(cap.path)  # nothing asked to save it: the temporary copy is gone
    assert sys.stdout.__class__ is not driverlog.Tee


def test_save_at_exit_keeps_the_error_in_storage_and_mlflow(tmp_path, capfd):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run, _ = tracking.start_run(uri, "cnd_ray", "log-check", {}, {})
    with pytest.raises(KeyboardInterrupt):
        with driverlog.capture():
            print("step 1/10")
            driverlog.save_at_exit(str(tmp_path / "run"), run)
            raise KeyboardInterrupt
    (stored,) = (tmp_path / "run" / "logs").iterdir()
    assert stored.name.startswith("driver-") and stored.name.endswith("Z.log")
    text = stored.read_text()
    assert "step 1/10" in text and "KeyboardInterrupt" in text  # the traceback, in the file only
    assert _artifact(uri, run.id) == (stored.name, text)
    assert f"driver log: {tmp_path / 'run'}/logs/{stored.name}" in capfd.readouterr().err


def test_save_to_a_uri_and_without_a_capture(tmp_path):
    log = tmp_path / "driver-20250101T000000Z.log"
    log.write_text("hello\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run, _ = tracking.start_run(uri, "cnd_ray", "uri-check", {}, {})
    assert driverlog.save(str(log), (tmp_path / "bucket" / "search").as_uri(), run)
    assert (tmp_path / "bucket" / "search" / "logs" / log.name).read_text() == "hello\n"
    assert _artifact(uri, run.id) == (log.name, "hello\n")
    driverlog.save_at_exit(str(tmp_path / "x"), run)  # no capture (a trial's process): no-op
    assert not (tmp_path / "x").exists()


def test_a_failing_save_warns_and_does_not_raise(tmp_path, capfd):
    (tmp_path / "file").write_text("")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ValueError, match="the user's real error"):
        with driverlog.capture() as cap:
            print("what went wrong")
            driverlog.save_at_exit(str(tmp_path / "file"), tracking.Run(uri, "no-such-run"))  # a file, no run
            raise ValueError("the user's real error")
    err = capfd.readouterr().err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "could not save the driver log" in warning[0], err
    assert str(tmp_path / "file") in warning[0] and "MLflow run no-such-run" in warning[0]
    assert cap.path in warning[0] and "what went wrong" in open(cap.path).read()  # kept locally
    shutil.rmtree(os.path.dirname(cap.path))


@pytest.mark.slow
def test_a_failed_train_leaves_its_driver_log_with_the_run(ray_local, tmp_path, capfd):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = cli.main(["train", "--config", "debug", f"train.storage={tmp_path / 'runs'}",
                     f"track.tracking_uri={uri}", "train.steps=40",
                     "optim.lr=1e12", "classifier.lr=1e12", "train.name=diverges"])
    assert code == 1  # TrainingStopped: a non-finite loss
    (log,) = (tmp_path / "runs" / "diverges" / "logs").iterdir()
    text = log.read_text()
    assert "cnd-ray train: stopped: non-finite loss at step" in text  # the failure, as the CLI said it
    assert "[cnd-ray] rank 0/1:" in text  # forwarded from the training worker
    run_id = tracking.find_run(uri, "cnd_ray", "diverges")
    assert _artifact(uri, run_id) == (log.name, text)
    assert f"driver log: {log}" in capfd.readouterr().err

