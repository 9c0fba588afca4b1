"""cluster/: both launcher configs pass Ray's own validation (what `ray up` runs) and our preflight;
removing a required field fails; cluster/run.py's argument handling."""
import contextlib
import copy
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cnd_ray.launch import cluster
from cnd_ray.errors import UserError
from tests.helpers import free_port, healthy, wait_for

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["aws.yaml", "onprem.yaml"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A HOME of the test's own: tokens go to its ~/.ray, never the user's."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    return h


def _run_module():
    spec = importlib.util.spec_from_file_location("cluster_run", ROOT / "cluster" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_pass_ray_validation_and_the_preflight(home, name):
    path = ROOT / "cluster" / name
    cluster.new_token(cluster.load(path))  # what the user does once before `ray up`
    full = cluster.ray_validate(cluster.load(path))
    assert full["available_node_types"]
    assert cluster.problems(path) == []
    assert "setup.sh" in " ".join(full["setup_commands"])  # both share one setup


def test_aws_config_has_what_the_issue_asks():
    cfg = cluster.load(ROOT / "cluster" / "aws.yaml")
    types = cfg["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    gpu = {k: v for k, v in types.items() if k != "head"}
    assert {v["node_config"]["InstanceType"] for v in gpu.values()} == {"g5.2xlarge", "p4d.24xlarge"}
    assert any(v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
               for v in gpu.values())
    assert cluster.storage(cfg).startswith("s3://")
    assert [r["FromPort"] for r in cfg["provider"]["security_group"]["IpPermissions"]] == [22]
    start = " ".join(cfg["head_start_ray_commands"])
    assert "mlflow server" in start and "run.py --storage)/mlflow" in start


@pytest.mark.parametrize("name, path", [
    ("aws.yaml", ["provider"]), ("aws.yaml", ["provider", "type"]), ("aws.yaml", ["head_node_type"]),
    ("aws.yaml", ["available_node_types"]), ("aws.yaml", ["available_node_types", "head", "node_config"]),
    ("onprem.yaml", ["provider"]), ("onprem.yaml", ["provider", "type"]),
    ("onprem.yaml", ["provider", "head_ip"])])
def test_removing_a_required_field_fails_validation(tmp_path, name, path):
    cfg = cluster.load(ROOT / "cluster" / name)
    broken = copy.deepcopy(cfg)
    node = broken
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    with pytest.raises(Exception):
        cluster.ray_validate(broken)
    out = tmp_path / name
    out.write_text(yaml.safe_dump(broken))
    assert any("validation" in p for p in cluster.problems(out))


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c["provider"].pop("region"), "provider.region: not set"),
    (lambda c: c.pop("idle_timeout_minutes"), "idle_timeout_minutes"),
    (lambda c: c["metadata"]["cnd_ray"].pop("storage"), "metadata.cnd_ray.storage"),
    (lambda c: c["available_node_types"]["gpu_1x_a10g"]["node_config"].pop("IamInstanceProfile"),
     "gpu_1x_a10g.node_config.IamInstanceProfile"),
    (lambda c: c["provider"]["security_group"]["IpPermissions"].append(
        {"IpProtocol": "tcp", "FromPort": 5000, "ToPort": 5000}), "opens ports 5000-5000"),
    (lambda c: c["docker"].update(image="rayproject/ray:latest-gpu"), "does not pin Ray"),
    (lambda c: c["setup_commands"].append("export AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP"), "AWS key"),
])
def test_preflight_names_what_ray_up_misses(home, tmp_path, edit, fragment):
    cfg = cluster.load(ROOT / "cluster" / "aws.yaml")
    cluster.new_token(cfg)
    edit(cfg)
    path = tmp_path / "aws.yaml"
    path.write_text(yaml.safe_dump(cfg))
    found = cluster.problems(path)
    assert len(found) == 1 and fragment in found[0], found


def test_run_py_adds_the_cluster_defaults_unless_given():
    run = _run_module()
    argv = run.cluster_argv(["tune", "--space", "smoke", "method.gamma=0.5"], "s3://b/x/", "10.0.0.5", {})
    assert argv == ["tune", "--space", "smoke", "method.gamma=0.5", "train.storage=s3://b/x/runs",
                    "track.tracking_uri=http://10.0.0.5:5000"]
    mine = run.cluster_argv(["train", "train.storage=/mnt/x", "track.tracking_uri=http://h:1"], "s3://b", "ip", {})
    assert mine == ["train", "train.storage=/mnt/x", "track.tracking_uri=http://h:1"]
    assert run.cluster_argv(["evaluate", "--ckpt", "C"], "s3://b", "ip", {}) == [
        "evaluate", "--ckpt", "C", "track.tracking_uri=http://ip:5000"]  # sampling may not set train.*
    assert run.cluster_argv(["sample"], "s3://b", "ip", {"MLFLOW_TRACKING_URI": "http://m"}) == ["sample"]
    assert run.cluster_argv(["ingest", "--root", "r"], "s3://b", "ip", {}) == ["ingest", "--root", "r"]
    assert run.cluster_argv(["--help"], "s", "ip", {}) == ["--help"]
    # what the defaults produce parses as the CLI's own arguments
    from cnd_ray import cli

    args = cli.parse(argv)
    assert args.space == "smoke" and "train.storage=s3://b/x/runs" in args.overrides


def test_run_py_storage_and_check_from_the_command_line(home, tmp_path):
    cluster.new_token(cluster.load(ROOT / "cluster" / "aws.yaml"))
    env_cfg = tmp_path / "bootstrap.yaml"
    env_cfg.write_text(yaml.safe_dump({"metadata": {"cnd_ray": {"storage": "s3://bucket/p"}}}))
    env = {"CND_RAY_CLUSTER_CONFIG": str(env_cfg), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, str(ROOT / "cluster" / "run.py"), "--storage"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "s3://bucket/p", r.stderr
    env_cfg.write_text(yaml.safe_dump({"metadata": {}}))
    r = subprocess.run([sys.executable, str(ROOT / "cluster" / "run.py"), "--storage"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and "metadata.cnd_ray.storage: not set" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "cluster" / "run.py"), "--check",
                        str(ROOT / "cluster" / "aws.yaml")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
    with pytest.raises(UserError, match="cannot read"):
        cluster.load(tmp_path / "missing.yaml")


# --- token authentication ------------------------------------------------------------------------

def _cli(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "cluster" / "run.py"), *args],
                          capture_output=True, text=True, env=env, cwd=cwd)


@pytest.mark.parametrize("name", CONFIGS)
def test_new_token_is_private_never_printed_and_rotates(home, name):
    cfg = cluster.load(ROOT / "cluster" / name)
    r = _cli("--new-token", f"cluster/{name}")
    path = Path(os.path.expanduser(cluster.token_file(cfg)))
    assert r.returncode == 0 and str(path) in r.stdout, r.stdout + r.stderr
    secret = path.read_text()
    assert len(secret) == 64 and secret not in r.stdout + r.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    assert home in path.parents  # under ~/.ray, outside the project that file_mounts copies
    again = _cli("--new-token", f"cluster/{name}")
    assert again.returncode == 2 and "--rotate-token" in again.stderr and path.read_text() == secret
    rotated = _cli("--rotate-token", f"cluster/{name}")
    assert rotated.returncode == 0 and path.read_text() != secret
    assert cluster.problems(ROOT / "cluster" / name) == []


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c["file_mounts"].pop("~/.ray/auth_token"), "nodes would start without it"),
    (lambda c: c["docker"]["run_options"].remove("--env=RAY_AUTH_MODE=token"),
     "head_start_ray_commands[1]: `ray start` without RAY_AUTH_MODE=token"),
    (lambda c: c["file_mounts"].update({"~/.ray/auth_token": "./token"}), "is inside ."),
])
def test_check_names_a_config_that_would_start_nodes_without_a_token(home, tmp_path, edit, fragment):
    cfg = cluster.load(ROOT / "cluster" / "aws.yaml")
    cluster.new_token(cfg)
    (tmp_path / "token").write_text("x" * 64)
    edit(cfg)
    path = tmp_path / "aws.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = _cli("--check", str(path), cwd=tmp_path)
    assert r.returncode == 1 and fragment in r.stdout, r.stdout + r.stderr


def test_check_names_a_missing_token_file(home):
    r = _cli("--check", "cluster/aws.yaml")
    assert r.returncode == 1 and "~/.ray/cnd-ray.token does not exist" in r.stdout
    assert "run.py --new-token" in r.stdout


def test_the_container_environment_is_read_from_run_options():
    cfg = {"docker": {"run_options": ["--shm-size=1g", "-e A=1", "--env=RAY_AUTH_MODE=token", "--env B=2"]}}
    assert cluster.node_env(cfg) == {"A": "1", "RAY_AUTH_MODE": "token", "B": "2"}
    assert cluster.node_env({}) == {}
    assert cluster.mlflow_port(cluster.load(ROOT / "cluster" / "aws.yaml"), 1) == 5000


# --- the configs' own commands, run for real ---------------------------------------------------

def _remap(cfg: dict, storage: Path, gcs: int, head_om: int, worker_om: int, mlflow: int) -> dict:
    """The config as this machine can run it: its ports moved to free ones, its storage a folder.
    `ray stop` is dropped (it stops every Ray on the machine; the test stops its own by pid)."""
    out = copy.deepcopy(cfg)
    out["metadata"]["cnd_ray"]["storage"] = str(storage)

    def move(cmd: str, om: int) -> str:
        cmd = cmd.replace("--port=6379", f"--port={gcs}").replace(":6379", f":{gcs}")
        cmd = cmd.replace("--object-manager-port=8076", f"--object-manager-port={om}")
        return cmd.replace("--port 5000", f"--port {mlflow}")

    extra_head = (f" --dashboard-port={free_port()} --ray-client-server-port={free_port()}"
                  " --object-store-memory=300000000")
    out["head_start_ray_commands"] = [
        move(c, head_om) + (extra_head if "ray start" in c else "")
        for c in cfg["head_start_ray_commands"] if c.strip() != "ray stop"]
    out["worker_start_ray_commands"] = [
        move(c, worker_om) + (" --object-store-memory=300000000" if "ray start" in c else "")
        for c in cfg["worker_start_ray_commands"] if c.strip() != "ray stop"]
    return out


def _stop(marks: list[str], gcs: int) -> None:
    """Every process whose command line holds one of `marks` (the GCS port, the test's HOME), and
    the note `ray start --head` leaves for ray.init() (as `ray stop` removes it: left behind, it
    made every later ray.init(num_cpus=...) on the machine try to join the dead head)."""
    import psutil
    from ray._common.utils import get_ray_address_file

    procs = {p for p in psutil.process_iter(["cmdline"])
             if any(m in " ".join(p.info["cmdline"] or []) for m in marks) and p.pid != os.getpid()}
    for p in list(procs):  # and what they started (MLflow's uvicorn workers and job consumers)
        with contextlib.suppress(psutil.Error):
            procs.update(p.children(recursive=True))
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    note = Path(get_ray_address_file(None))
    with contextlib.suppress(OSError):
        if note.read_text().strip().endswith(f":{gcs}"):
            note.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_the_configs_own_commands_form_a_token_cluster_that_trains(home, tmp_path, name):
    shipped = cluster.load(ROOT / "cluster" / name)
    if name != "aws.yaml":  # what lets this config skip the training: its commands are aws's
        aws = cluster.load(ROOT / "cluster" / "aws.yaml")
        for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands"):
            assert [c.replace(" --object-manager-port=8076", "") for c in aws[key]] == shipped[key], key
    assert _cli("--new-token", f"cluster/{name}").returncode == 0
    secret = Path(os.path.expanduser(cluster.token_file(shipped))).read_text()
    gcs, mlflow = free_port(), free_port()
    cfg = _remap(shipped, tmp_path / "storage", gcs, free_port(), free_port(), mlflow)
    # What `ray up` puts on the head: the file mounts (the project, the token) and the bootstrap config.
    for remote, local in cfg["file_mounts"].items():
        src, dst = (ROOT / local).resolve(), Path(os.path.expanduser(remote))
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src) if src.is_dir() else dst.write_text(Path(os.path.expanduser(local)).read_text())
    (home / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(cluster.node_env(cfg), HOME=str(home), RAY_HEAD_IP="127.0.0.1",
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    marks = [f":{gcs}", f"={gcs}", str(home)]
    seen = []

    def sh(cmd: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        t0 = time.monotonic()
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=kw.get("env", env),
                           cwd=kw.get("cwd", home), timeout=timeout)
        seen.append(r.stdout + r.stderr)
        last = (r.stderr.strip() or r.stdout.strip() or "-").splitlines()[-1][:160]
        print(f"[{name}] exit {r.returncode} in {time.monotonic() - t0:.1f} s: {cmd[:90]}\n    {last}")
        return r

    try:
        for cmd in cfg["head_start_ray_commands"]:
            r = sh(cmd)
            assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
        for cmd in cfg["worker_start_ray_commands"]:  # a second raylet plays the worker node
            r = sh(cmd)
            assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
        count = ("from cnd_ray.launch import session; import ray; session.connect(); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        r = sh(f"{sys.executable} -c \"{count}\"", env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"})
        assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "2", r.stdout + r.stderr

        server = f"http://127.0.0.1:{mlflow}"
        assert wait_for(lambda: healthy(server), 120), (home / "mlflow" / "server.log").read_text()[-2000:]

        # As `ray submit` runs it: run.py copied to ~ and started on the head, no RAY_ADDRESS. Once:
        # onprem's commands are aws's without the fixed object-manager port (checked above), and the
        # training (~60 s) would only repeat aws's.
        trains = name == "aws.yaml"
        if trains:
            (home / "run.py").write_text((ROOT / "cluster" / "run.py").read_text())
            r = sh(f"{sys.executable} ~/run.py train --config debug", timeout=600)
            assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
            runs = tmp_path / "storage" / "runs"
            assert sorted(p.name for p in runs.glob("*/checkpoint_00000020")), list(runs.rglob("*"))[:20]
        import urllib.error
        import urllib.request

        import mlflow as mlflow_lib

        from cnd_ray import tracking
        from cnd_ray.errors import UserError

        # The head's MLflow asks for the login (basic auth); run.py gave it to the driver, which
        # passed it to the worker that logged the metrics.
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{server}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        with pytest.raises(UserError, match="refused the login"):
            tracking.reachable(server)
        login = cluster.mlflow_credentials(secret.strip())
        old = {k: os.environ.get(k) for k in login}
        os.environ.update(login)
        try:
            assert tracking.reachable(server)  # the probe sends the login too
            client = mlflow_lib.MlflowClient(server)
            found = client.search_runs([e.experiment_id for e in client.search_experiments()])
            assert [x.info.status for x in found] == (["FINISHED"] if trains else []), found
            if trains:
                assert client.get_metric_history(found[0].info.run_id, "loss_diff"), "the worker logged nothing"
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        assert oct(os.stat(home / "mlflow" / "basic_auth.ini").st_mode & 0o777) == "0o600"

        # A driver without the token, or with another, fails at once with one line naming the fix.
        for extra, fragment in ((dict(HOME=str(tmp_path)), "needs the cluster's token in"),
                                (dict(RAY_AUTH_TOKEN="f" * 64), "the token in RAY_AUTH_TOKEN is not")):
            t0 = time.monotonic()
            r = sh(f"{sys.executable} -m cnd_ray train --config debug", cwd=tmp_path,
                   env={**env, **extra, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, timeout=120)
            took = time.monotonic() - t0
            assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
            assert took < 20, took  # Ray alone retries for ~20 s after the imports, then a traceback
        assert not any(secret in out for out in seen)  # the token is never printed
    finally:
        _stop(marks, gcs)
    import psutil

    assert not [p for p in psutil.process_iter(["cmdline"]) if any(
        m in " ".join(p.info["cmdline"] or []) for m in marks)]
    from ray._common.utils import get_ray_address_file

    note = Path(get_ray_address_file(None))  # a later ray.init() would try to join the dead head
    assert not (note.exists() and note.read_text().strip().endswith(f":{gcs}"))



def test_a_driver_finds_the_token_where_ray_looks(home, tmp_path, monkeypatch):
    from cnd_ray.launch import session

    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    assert session.token() == ("", str(home / ".ray" / "auth_token"))
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("a" * 64 + "\n")
    assert session.token() == ("a" * 64, str(home / ".ray" / "auth_token"))
    (tmp_path / "t").write_text("b" * 64)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert session.token()[0] == "b" * 64
    monkeypatch.setenv("RAY_AUTH_TOKEN", "c" * 64)
    assert session.token() == ("c" * 64, "RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH: cannot read"):
        session.token()


def test_joining_an_address_where_no_cluster_answers_is_one_line_within_seconds():
    from cnd_ray.launch import session

    t0 = time.monotonic()
    with pytest.raises(UserError, match="no Ray cluster answers at"):
        session.check_access(f"127.0.0.1:{free_port()}", "", "nowhere")
    assert time.monotonic() - t0 < session.PROBE_TIMEOUT_S + 2


LISTEN_PROBE = """
import os, time, psutil, ray
from cnd_ray.launch import session
session.connect()
ray.get(ray.remote(num_cpus=0.5)(lambda: 1).remote())  # a worker process up, too
time.sleep(3)  # the dashboard's and agents' servers
ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
print(sorted({(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
              if c.status == psutil.CONN_LISTEN and c.pid in ours}))
ray.shutdown()
"""


@pytest.mark.slow
def test_the_local_ray_listens_on_loopback_only():
    """Every socket the local Ray of a cnd-ray verb listens on (GCS, raylet, workers, dashboard,
    metrics servers, agents) is bound to the loopback address, none to the network's."""
    import ast
    import ipaddress

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    r = subprocess.run([sys.executable, "-c", LISTEN_PROBE], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sockets = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    assert len(sockets) >= 5, sockets  # GCS, raylet, a worker, the dashboard, metrics: found them all
    for ip, port in sockets:
        addr = ipaddress.ip_address(ip)
        addr = getattr(addr, "ipv4_mapped", None) or addr
        assert addr.is_loopback, f"{ip}:{port} listens beyond this machine"
