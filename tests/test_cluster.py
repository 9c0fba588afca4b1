"""cluster/: both launcher configs pass Ray's own validation (what `ray up` runs) and our preflight;
removing a required field fails; cluster/run.py's argument handling."""
import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cnd_ray import cluster
from cnd_ray.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["aws.yaml", "onprem.yaml"]


def _run_module():
    spec = importlib.util.spec_from_file_location("cluster_run", ROOT / "cluster" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_pass_ray_validation_and_the_preflight(name):
    path = ROOT / "cluster" / name
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
def test_preflight_names_what_ray_up_misses(tmp_path, edit, fragment):
    cfg = cluster.load(ROOT / "cluster" / "aws.yaml")
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


def test_run_py_storage_and_check_from_the_command_line(tmp_path):
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
