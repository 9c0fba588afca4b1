"""Search-space files and `cnd-ray tune`: the shipped spaces, bad files, a real search with MLflow
nesting checked through a real tracking server, and a search resumed after its driver is killed."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cnd_ray import config as C
from cnd_ray import tracking
from cnd_ray.launch import identity, tune

SHIPPED = sorted(p.stem for p in tune.SPACE_DIR.glob("*.yaml"))


def test_the_issue_spaces_are_shipped():
    assert {"paper_settings", "gamma_lambda", "smoke", "fairness"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("base", ["quickstart", "paper", "debug"])
def test_every_shipped_space_loads_and_names_real_fields(name, base):
    cfg = C.load(base)
    s = tune.load_space(name, cfg)
    keys = set(cfg.flat())
    for k in list(s.space) + list(s.fixed) + [k for b in s.settings.values() for k in b]:
        assert k in keys, k
    assert tune.trial_count(s) >= 2


def test_paper_settings_are_the_papers_five():
    s = tune.load_space("paper_settings", C.load("quickstart"))
    assert list(s.settings) == ["1", "2", "3", "4", "5"] and tune.trial_count(s) == 5
    get = lambda n, k: C.override(C.load("quickstart"), s.settings[n]).flat()[k]  # noqa: E731
    assert [get(n, "method.gamma_schedule") for n in s.settings] == \
        ["off", "constant", "periodic_ramp", "periodic_ramp", "periodic_ramp"]
    assert [get(n, "method.lambda_cls") for n in "2345"] == [0.2, 0.2, 0.2, 0.3]
    assert [get(n, "classifier.step_every") for n in "2345"] == [1, 3, 1, 3]
    assert get("2", "method.gamma") == 0.25


BAD = [
    ("serach: grid\nspace: {method.lambda_cls: {grid: [0.1]}}\n", r"unknown key 'serach' \(did you mean search\?\)"),
    ("space: {method.lamda_cls: {grid: [0.1]}}\n", r"space.method.lamda_cls: unknown config key .*did you mean method.lambda_cls"),
    ("space: {method.lambda_cls: {gird: [0.1]}}\n", r"space.method.lambda_cls: unknown distribution 'gird' \(did you mean grid\?\)"),
    ("space: {method.lambda_cls: {grid: [-1.0]}}\n", r"space.method.lambda_cls: .*-1.0 is outside"),
    ("search: random\nspace: {method.lambda_cls: {uniform: [0.5, 0.1]}}\n", r"space.method.lambda_cls: uniform takes \[low, high\]"),
    ("search: random\nspace: {method.lambda_cls: {loguniform: [0.0, 0.5]}}\n", r"loguniform needs low > 0"),
    ("search: random\nspace: {method.gamma_schedule: {choice: [constant, cosine]}}\n", r"space.method.gamma_schedule: .*'cosine' is not one of"),
    ("space: {method.lambda_cls: {uniform: [0.1, 0.5]}}\n", r"search: grid takes only `grid:` lists"),
    ("metric: val_auroc\nsettings: {'1': {method.gamma_schedule: 'off'}}\n", r"metric: val_auroc, but settings.1 .*has no classifier"),
    ("metric: fidd\nspace: {method.lambda_cls: {grid: [0.1]}}\n", r"metric: 'fidd' is not one of"),
    ("metric: fair_worst_auroc\nfixed: {model.tone_groups: 3, fairness.in_loop: final}\n"
     "settings: {'1': {method.gamma_schedule: 'off'}}\n",
     r"metric: fair_worst_auroc is measured at every evaluation only with fairness.in_loop=every"),
    ("resources: {train.steps: 3}\nspace: {method.lambda_cls: {grid: [0.1]}}\n", r"resources.train.steps: only scale.\* keys"),
    ("scheduler: {kind: asha, grace: 3}\nspace: {method.lambda_cls: {grid: [0.1]}}\n", r"unknown key 'scheduler.grace'"),
    ("settings: {'9': {train.mixed_precision: fp16, classifier.step_every: 3}}\n", r"settings.9: .*fp16"),
    ("search: grid\n", r"nothing to search"),
    ("space: [1, 2]\n", r"space: expected a mapping"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_a_bad_space_file_fails_before_any_trial_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(tune.SpaceError, match=message) as e:
        tune.load_space(str(path), C.load("debug"))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_space_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("space: {method.lambda_cls: {grid: [-1.0]}}\n")
    r = subprocess.run([sys.executable, "-m", "cnd_ray", "tune", "--space", str(path), "--config", "debug"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("cnd-ray tune: error:") and len(r.stderr.strip().splitlines()) == 1


# --- end to end ----------------------------------------------------------------------------------

# Long enough that the second trial can be caught between its checkpoints (the kill test).
# Threads pinned: the float results (and so the table) must not depend on how many trials ran at once.
E2E = ["scale.threads_per_worker=1", "train.steps=400", "train.checkpoint_every=100", "train.eval_every=100",
       "train.log_every=100"]


@pytest.fixture(scope="module")
def smoke_search(ray_local, tmp_path_factory):
    """The smoke search run once, uninterrupted, logging to a real MLflow server: (result, runs)."""
    from tests.helpers import MlflowServer

    tmp = tmp_path_factory.mktemp("smoke")
    with MlflowServer(tmp) as server:
        cfg = C.load("debug", E2E + [f"train.storage={tmp}/runs", f"track.tracking_uri={server.uri}"])
        out = tune.run("smoke", cfg)
        exp = server.rest("experiments/get-by-name?experiment_name=cnd_ray")["experiment"]
        runs = server.rest("runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        artifacts = {r["info"]["run_id"]: server.rest(f"artifacts/list?run_id={r['info']['run_id']}")
                     for r in runs}
        history = {r["info"]["run_id"]: server.rest(
            f"metrics/get-history?run_id={r['info']['run_id']}&metric_key=fd_ratio")
            for r in runs}
        # the best trial, registered under the search's name, resolves to its checkpoint
        out["resolved"] = identity.resolve_checkpoint(out["registered"], [f"track.tracking_uri={server.uri}"])
    out["store"] = f"sqlite:///{tmp}/server.db"  # what the server served, for the UI test
    return out, runs, artifacts, history


def _chromium():
    """Debian's chromium (`.ci/run` installs it), driven by Playwright; a skip naming what is missing."""
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no chromium on this machine (apt-get install -y chromium): the UI is checked in a real browser")
    pytest.importorskip("playwright.sync_api", reason="playwright (a dev dependency) drives the browser")
    return path


@pytest.mark.slow
def test_the_ui_shows_the_search_as_users_open_it_in_a_real_browser(smoke_search):
    """`cnd-ray ui` on the finished smoke search's store, its printed pages loaded in headless
    Chromium: the model-training runs table (not the GenAI view) with the experiment's description,
    and the search's view - its trials beside the parent, sorted by the ranking metric, with their
    dataset, logged model and varying key as columns. Screenshots: test-artifacts/ui/."""
    from playwright.sync_api import sync_playwright

    from tests.helpers import free_port, healthy, wait_for

    chromium = _chromium()
    out = smoke_search[0]
    shots = Path(__file__).resolve().parent.parent / "test-artifacts" / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cnd_ray", "ui", f"track.tracking_uri={out['store']}",
                             "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        said = {}
        while len(said) < 2:  # its own lines, among the server's
            line = proc.stdout.readline()
            assert line, "cnd-ray ui ended"
            for start in ("MLflow UI for ", "latest search, its trials side by side: "):
                if line.startswith(start):
                    said[start] = next(w for w in line.split() if w.startswith("http"))
        runs_url, search_url = said.values()
        assert runs_url.endswith("/runs?workflowType=machine_learning") and "viewStateShareKey=" in search_url
        assert wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), timeout=240)
        trials = sorted(r["run"] for r in out["rows"])
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 2400, "height": 1000})
            page.goto(runs_url)
            page.wait_for_selector(f"text={out['name']}", timeout=120_000)
            page.screenshot(path=str(shots / "runs.png"))
            text = page.inner_text("body")
            assert "Model training" in text and "Traces 0" not in text  # the runs table, not the GenAI view
            assert "cnd_ray: Class-N-Diff" in text  # the experiment's description
            page.goto(search_url)
            page.wait_for_selector(f"text={trials[0]}", timeout=120_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots / "search.png"))
            # ag-grid draws only the columns in view: scroll across, as a user does, and collect them.
            headers, width = set(), page.eval_on_selector(".ag-body-horizontal-scroll-viewport", "e => e.scrollWidth")
            for x in [*range(0, width, 800), width]:
                page.eval_on_selector(".ag-body-horizontal-scroll-viewport", f"e => {{ e.scrollLeft = {x}; }}")
                page.wait_for_timeout(300)
                headers |= set(page.locator("[role='columnheader']").all_inner_texts())
            page.eval_on_selector(".ag-body-horizontal-scroll-viewport", "e => { e.scrollLeft = 0; }")
            page.wait_for_timeout(300)
            # the names in the order shown: ag-grid places rows by their row-index, not DOM order
            named = [n for _, n in sorted(page.eval_on_selector_all("[role='row'][row-index]", """rows =>
                rows.map(r => [Number(r.getAttribute('row-index')),
                               (r.querySelector("[col-id='attributes.`Run Name`'] a") || {}).textContent])
                    .filter(x => x[1])"""))]
            rows = {}  # row-index -> the text of that row across ag-grid's pinned and centre parts
            for i, t in page.eval_on_selector_all("[role='row'][row-index]", """rows =>
                    rows.map(r => [Number(r.getAttribute('row-index')), r.innerText])"""):
                rows[i] = rows.get(i, "") + "\n" + t
            browser.close()
        # quality and fairness side by side (the smoke trials measure it after their last step)
        assert {"Dataset", "Models", "fd_ratio", "fair_worst_auroc", "fair_gap", *tune.varying(out["rows"])} <= headers
        by_metric = [r["run"] for r in out["rows"]]  # best first, each named by its setting
        assert sorted(n.split("-")[0] for n in by_metric) == ["setting1", "setting2"]
        assert [n.strip() for n in named] == by_metric + [out["name"]]  # children by fd_ratio, then the parent
        child = tracking.find_run(out["store"], "cnd_ray", by_metric[0])
        shards = tracking.mlflow_client(out["store"]).get_run(child).data.tags["data.shards"]
        for i, n in enumerate(by_metric):  # each child's row: its dataset and its model (the best's: registered)
            model = "v1" if i == 0 else n  # the registered model's version, or the run's logged model
            assert os.path.basename(shards) in rows[i] and "Train" in rows[i] and rows[i].count(n) >= 1 \
                and model in rows[i].split(n, 1)[1], rows[i]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _tags(run):
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _params(run):
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


@pytest.mark.slow
def test_smoke_search_is_one_parent_with_a_child_per_trial_over_rest(smoke_search):
    out, runs, artifacts, history = smoke_search
    parents = [r for r in runs if _tags(r).get("cnd_ray.kind") == "search"]
    assert len(parents) == 1 and len(runs) == 3  # 1 + N, no orphans, no duplicates
    parent = parents[0]["info"]["run_id"]
    assert parent == out["parent_run_id"] and parents[0]["info"]["status"] == "FINISHED"
    children = [r for r in runs if r["info"]["run_id"] != parent]
    assert {_tags(c)["mlflow.parentRunId"] for c in children} == {parent}
    assert sorted(_tags(c)["cnd_ray.setting"] for c in children) == ["1", "2"]
    # the runs table reads without the log: each child is named by its setting first
    assert sorted(c["info"]["run_name"].split("-")[0] for c in children) == ["setting1", "setting2"]
    for c in children:
        assert c["info"]["status"] == "FINISHED"
        want = {"1": "off", "2": "constant"}[_tags(c)["cnd_ray.setting"]]
        assert _params(c)["method.gamma_schedule"] == want  # the compare view's columns
        assert [m["step"] for m in history[c["info"]["run_id"]]["metrics"]] == [100, 200, 300, 400]
    ptags = _tags(parents[0])
    # One judge for the search, made before its trials, named in the parent and in every child.
    assert os.path.isfile(ptags["cnd_ray.judge"]) and out["judge"] == ptags["cnd_ray.judge"]
    assert {_tags(c)["cnd_ray.judge"] for c in children} == {ptags["cnd_ray.judge"]}
    assert "judge_heldout_auroc" in {m["key"] for m in parents[0]["data"]["metrics"]}
    assert ptags["best_trial"] == out["best"]["trial"] and ptags["trials_finished"] == "2"
    assert "best_setting" in ptags and "best.method.gamma_schedule" in ptags
    assert {"summary.md", "trials.json", "base_config.yaml", "space", "curves.png"} <= {
        f["path"] for f in artifacts[parent]["files"]}
    # what the children differ in and what ranks them, for MLflow's compare view
    assert ptags["cnd_ray.metric"] == "fd_ratio" and ptags["cnd_ray.mode"] == "min"
    assert ptags["cnd_ray.varying"] == ",".join(tune.varying(out["rows"]))
    assert all(r["status"] == "finished" and r["step"] == 400 for r in out["rows"])
    m = [r["fd_ratio"] for r in out["rows"]]
    assert m == sorted(m)  # ranked best first, by the sample metric
    assert all("val_loss_diff" in r for r in out["rows"])  # still reported beside it
    assert out["best"]["checkpoint"].endswith("checkpoint_00000400")
    assert out["registered"] == f"models:/{out['name']}@best" and out["resolved"] == out["best"]["checkpoint"]
    assert ptags["cnd_ray.registered"].startswith(out["registered"])
    assert all(_tags(c)["cnd_ray.model_id"].startswith("m-") for c in children)  # each trial: a logged model
    # The critic's pull (setting 2 runs the critic switches): MLflow's step metrics, and Tune's reports.
    (joint,) = [c for c in children if _tags(c)["cnd_ray.setting"] == "2"]
    logged = {m["key"] for m in joint["data"]["metrics"]}
    assert {"critic_pull", "critic_pull_b1", "critic_scale", "critic_inside", "critic_weight"} <= logged
    (row,) = [r for r in out["rows"] if r["setting"] == "2"]
    assert [s for s, _ in row["curves"]["critic_pull"]] == [100, 200, 300, 400]
    assert all(0 < v <= 0.3 + 1e-6 for _, v in row["curves"]["critic_pull"])  # capped at lambda


@pytest.mark.slow
def test_search_leaves_no_placement_groups_or_actors_behind(smoke_search, ray_local):
    from tests.helpers import wait_for

    pgs = ray_local.util.placement_group_table()
    assert pgs and all(pg["state"] == "REMOVED" for pg in pgs.values())
    # Every trial actor, Train controller and worker gave its CPU share back.
    total = ray_local.cluster_resources()["CPU"]
    assert wait_for(lambda: abs(ray_local.available_resources().get("CPU", 0) - total) < 1e-6, 30)


def _marked_processes(mark):
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("CND_RAY_TEST_MARK") == mark:
                found.append(p)
        except (psutil.Error, OSError):
            pass
    return found


@pytest.mark.slow
def test_a_killed_search_resumes_without_rerunning_finished_trials(smoke_search, tmp_path):
    """SIGKILL the `cnd-ray tune` driver (and its whole local Ray) while the second of two trials
    runs; the same command then finishes the search: the first trial is not rerun, the second
    resumes its checkpoint, MLflow has 1 + 2 runs, and the table equals the uninterrupted one."""
    import glob

    from tests.helpers import assert_row_accounting, wait_for

    space = tmp_path / "one_at_a_time.yaml"
    space.write_text((tune.SPACE_DIR / "smoke.yaml").read_text() + "max_concurrent_trials: 1\n")
    db = tmp_path / "mlflow.db"
    cmd = [sys.executable, "-m", "cnd_ray", "tune", "--space", str(space), "--config", "debug", *E2E,
           f"train.storage={tmp_path}/runs", f"track.tracking_uri=sqlite:///{db}", "train.log_rows=true"]
    mark = uuid.uuid4().hex
    env = {**os.environ, "CND_RAY_TEST_MARK": mark}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def checkpoints(step):
        return {p.split("/")[-3] for p in glob.glob(
            f"{tmp_path}/runs/*-trials/*/checkpoint_{step:08d}/meta.json")}

    def second_trial_midway():
        done = checkpoints(400)
        started = checkpoints(100) - done
        if len(done) != 1 or not started:
            return False
        # Ray Train has recorded the checkpoint (what a relaunch resumes from) ...
        latest = identity.latest_checkpoint(f"{tmp_path}/runs/{glob.glob(f'{tmp_path}/runs/*-trials')[0].split('/')[-1]}/{started.pop()}")
        # ... and Tune has saved the first trial as finished (it saves its state every few seconds)
        saved = "".join(open(f).read() for f in glob.glob(f"{tmp_path}/runs/one_at_a_time-*/experiment_state*.json"))
        return latest is not None and "TERMINATED" in saved

    try:
        assert wait_for(second_trial_midway, timeout=400, every=0.1), open(tmp_path / "first.log").read()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        for p in _marked_processes(mark):  # the killed driver's local Ray: raylet, GCS, workers
            p.kill()
    first_done = checkpoints(400)
    assert len(first_done) == 1
    judge_mtime = os.stat(glob.glob(f"{tmp_path}/runs/*-trials/judges/judge-*.pt")[0]).st_mtime_ns
    (baselines,) = glob.glob(f"{tmp_path}/runs/*-trials/downstream/downstream-*.pt")  # the fairness baselines
    baselines_mtime = os.stat(baselines).st_mtime_ns
    time.sleep(2)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    finally:
        for p in _marked_processes(mark):
            p.kill()
    out = r.stdout + r.stderr
    (tmp_path / "second.log").write_text(out)
    assert r.returncode == 0, out[-4000:]
    assert "resuming" in out
    (finished,) = first_done
    assert f"run {finished}:" not in out  # the finished trial was not rerun
    assert "resuming at step" in out, out[-4000:]  # the interrupted one continued from its checkpoint
    # The restored search is judged by the judge it started with, not a new one.
    (judge_file,) = glob.glob(f"{tmp_path}/runs/*-trials/judges/judge-*.pt")
    assert f"judge: reusing {judge_file}" in out and "judge: training" not in out
    assert os.stat(judge_file).st_mtime_ns == judge_mtime
    # ... and compared with the fairness baselines it started with (the table below carries them).
    assert f"fairness: reusing the baselines {baselines}" in out and "fairness: training" not in out
    assert os.stat(baselines).st_mtime_ns == baselines_mtime
    assert glob.glob(f"{tmp_path}/runs/*-trials/downstream/downstream-*.pt") == [baselines]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("cnd_ray").experiment_id])
    assert sorted((x.info.run_name, x.info.status) for x in runs) == sorted((x.info.run_name, "FINISHED") for x in runs)
    assert len(runs) == 3
    for x in runs:
        steps = [m.step for m in client.get_metric_history(x.info.run_id, "loss_diff")]
        assert steps == sorted(set(steps))  # no step logged twice across the kill
    table = r.stdout[r.stdout.index("| rank"):].split("\n\n")[0].strip()
    assert table == smoke_search[0]["table"].strip()  # same seed, same table, interrupted or not
    (manifest,) = glob.glob(f"{tmp_path}/runs/**/synthetic-*/manifest.json", recursive=True)
    train_rows = sum(json.loads(open(manifest).read())["splits"]["train"].values())
    trials = glob.glob(f"{tmp_path}/runs/*-trials/*/rows")
    assert len(trials) == 2
    for rows in trials:  # the interrupted trial's too: no row skipped or trained twice
        assert_row_accounting(os.path.dirname(rows), train_rows)


ASHA_SPACE = """search: grid
metric: fd_ratio
max_concurrent_trials: 1
scheduler: {kind: asha, grace_period: 100, reduction_factor: 2}
settings:
  "good": {method.gamma_schedule: "off"}
  "weak": {method.gamma_schedule: "off", optim.lr: 1.0e-7}
"""


@pytest.mark.slow
def test_asha_on_the_sample_metric_stops_a_weak_trial(ray_local, tmp_path):
    """A trial whose DiT barely moves (lr 1e-7) draws noise: at the first rung its fd_ratio is worse
    than the good trial's there, and ASHA stops it; the good one runs to the end."""
    space = tmp_path / "asha.yaml"
    space.write_text(ASHA_SPACE)
    cfg = C.load("debug", ["scale.threads_per_worker=1", "train.steps=300", "train.checkpoint_every=100",
                           "train.eval_every=100", "train.log_every=100", f"train.storage={tmp_path}/runs",
                           f"track.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    out = tune.run(str(space), cfg)
    rows = {r["setting"]: r for r in out["rows"]}
    assert rows["good"]["status"] == "finished" and rows["good"]["step"] == 300
    assert rows["weak"]["status"] == "stopped" and rows["weak"]["step"] == 100
    assert rows["weak"]["fd_ratio"] > rows["good"]["curves"]["fd_ratio"][0][1]
    assert out["best"]["setting"] == "good"


def test_a_sample_metric_needs_sample_metrics(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("metric: fd_ratio\nsettings: {'1': {method.gamma_schedule: 'off'}}\n")
    with pytest.raises(tune.SpaceError, match="metric: fd_ratio is a sample metric, but eval.sample_metrics"):
        tune.load_space(str(path), C.load("debug", ["eval.sample_metrics=false"]))
    path.write_text("metric: fid\nsettings: {'1': {method.gamma_schedule: 'off'}}\n")
    with pytest.raises(tune.SpaceError, match="metric: fid needs eval.inception_weights"):
        tune.load_space(str(path), C.load("debug"))


def test_model_based_search_needs_its_package_or_says_so(tmp_path):
    path = tmp_path / "opt.yaml"
    path.write_text("search: optuna\nspace: {method.lambda_cls: {uniform: [0.1, 0.5]}}\n")
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(tune.SpaceError, match="search: optuna needs the optuna package"):
            tune.load_space(str(path), C.load("debug"))
    else:
        assert tune.load_space(str(path), C.load("debug")).search == "optuna"


def test_asha_rungs_are_training_steps_capped_at_the_run():
    s = tune.load_space("gamma_lambda", C.load("quickstart"))
    asha = tune.scheduler(s, steps=300)
    assert asha._time_attr == "step" and asha._max_t == 300  # grace 500 in the file, capped
    assert tune.scheduler(s, steps=5000)._brackets[0]._rungs[-1][0] == 500  # first rung = grace
    assert tune.scheduler(tune.load_space("smoke", C.load("debug")), 20) is None


def test_concurrency_follows_resources_and_cpu_trials_share_cores():
    cfg = C.load("quickstart")  # 1 worker x 0.5 CPU + 2 decode tasks x 0.5 CPU per trial
    s = tune.load_space("paper_settings", cfg)
    assert tune.concurrency(s, cfg, {"CPU": 4}, 5) == 2
    assert tune.concurrency(s, cfg, {"CPU": 64}, 5) == 5  # never more than there are trials
    with pytest.raises(tune.UserError, match="one trial needs 1.51 CPUs"):
        tune.concurrency(s, cfg, {"CPU": 1}, 5)
    gpu = C.override(cfg, {"scale.use_gpu": True, "scale.num_workers": 2, "train.global_batch": 32})
    assert tune.concurrency(s, gpu, {"CPU": 64, "GPU": 4}, 5) == 2

    class FakeRay:
        @staticmethod
        def nodes():
            return [{"Alive": True}]

    import os

    shared = tune.share_cores(cfg, 2, FakeRay)
    assert shared.scale.threads_per_worker == max(1, (os.cpu_count() or 1) // 2)
    pinned = C.override(cfg, {"scale.threads_per_worker": 3})
    assert tune.share_cores(pinned, 2, FakeRay).scale.threads_per_worker == 3


def test_a_failed_trial_row_says_what_failed_in_one_clean_line():
    """Ray's error text starts with the actor's coloured name; the table shows the exception."""
    err = RuntimeError("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=29165, ip=192.0.2.2, actor_id=34d)\n"
                       "  File \"/x/train.py\", line 540, in _loop\n    consumed.add(batch)\n"
                       "KeyError: 'copy' | more\n")
    assert tune.error_line(err) == "KeyError: 'copy' / more"
    assert tune.error_line(RuntimeError("")) == "RuntimeError"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["folder", "uri"])
def test_a_search_whose_server_is_away_runs_and_track_sync_uploads_it_nested(ray_local, tmp_path, capsys, where):
    """The search runs with its tracking server away: its parent run spools in its folder and each
    trial in its run's (in a local folder or at a URI); once the server is up, `cnd-ray track-sync`
    uploads the parent run and each trial's, the trials still its children."""
    from cnd_ray import cli, tracking
    from tests.helpers import MlflowServer

    server = MlflowServer(tmp_path)
    storage = f"file://{tmp_path}/runs" if where == "uri" else f"{tmp_path}/runs"
    cfg = C.load("debug", [f"train.storage={storage}", f"track.tracking_uri={server.uri}",
                           "train.steps=10", "scale.threads_per_worker=1"])
    # Ranked as tune_spaces/fairness.yaml ranks: by the downstream classifier's worst-group AUROC.
    space = tmp_path / "fair.yaml"
    space.write_text((tune.SPACE_DIR / "smoke.yaml").read_text().replace(
        "metric: fd_ratio", "metric: fair_worst_auroc").replace("mode: min", "mode: max").replace(
        "in_loop: final", "in_loop: every"))
    res = tune.run(str(space), cfg)
    said = capsys.readouterr().out
    assert "does not answer: the search starts anyway" in said
    assert f"`cnd-ray track-sync {res['path']}`" in said
    assert [r["status"] for r in res["rows"]] == ["finished"] * len(res["rows"])
    worst = [r["fair_worst_auroc"] for r in res["rows"]]
    assert worst == sorted(worst, reverse=True) and res["space"].mode == "max"
    head = res["table"].splitlines()[0]
    assert head.index("fair_worst_auroc") < head.index("fd_ratio") and "fair_gap" in head  # fairness beside quality
    # One set of baselines for the search, in its storage (a folder or a URI), that every trial reused.
    assert len(list((tmp_path / "runs").rglob("downstream/downstream-*.pt"))) == 1
    with server:
        assert cli.main(["track-sync", res["path"]]) == 0
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)
        runs = client.search_runs([client.get_experiment_by_name("cnd_ray").experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("cnd_ray.kind") == "search"]
        children = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == parent.info.run_id]
        assert len(children) == len(res["rows"]) == len(runs) - 1
        assert all(client.get_metric_history(c.info.run_id, "loss_diff") for c in children)
        assert {f.path for f in client.list_artifacts(parent.info.run_id)} >= {"summary.md", "trials.json"}
        assert not tracking.spooled(res["path"])
        assert not list((tmp_path / "runs").rglob(tracking.SPOOL))  # the trials' spools too
