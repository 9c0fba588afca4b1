"""Cluster-launcher configs (cluster/*.yaml): Ray's own validation plus the checks `ray up` does not
make (GUARANTEES 19), and the project settings they carry in `metadata.cnd_ray`.

`ray up` validates a config with prepare_config + validate_config (jsonschema); that misses a
missing region (Ray silently picks us-west-2), an unpinned Ray (the AWS defaults install a nightly),
keys in files, open ports and nodes that start without the cluster's token. Each problem here names
the field to change.

Token authentication: Ray accepts a node or driver only with RAY_AUTH_MODE=token in its environment
and the cluster's token in ~/.ray/auth_token (DESIGN.md). A config carries both: `file_mounts` copies
one token file from the launching machine to TOKEN_MOUNT on every node (the head's autoscaler copies
it on to the workers it starts), and every `ray start` runs with RAY_AUTH_MODE=token, from the
container's environment (`docker.run_options`) or its own command line.
"""
from __future__ import annotations

import copy
import hashlib
import os
import re
import secrets
import shlex
from pathlib import Path

import yaml

from cnd_ray.errors import UserError

KEY_PATTERN = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id", re.I)
TOKEN_MOUNT = "~/.ray/auth_token"  # where Ray looks for the token on each node
START_LISTS = ("head_start_ray_commands", "worker_start_ray_commands")


def load(path: str | Path) -> dict:
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read a cluster config ({str(e).splitlines()[0]})") from None


def ray_validate(cfg: dict) -> dict:
    """The config as `ray up` completes and checks it; raises what Ray raises."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(cfg))
    validate_config(full)
    return full


def storage(cfg: dict) -> str:
    """metadata.cnd_ray.storage: the one place a cluster's storage path is written."""
    value = ((cfg.get("metadata") or {}).get("cnd_ray") or {}).get("storage", "")
    if not value:
        raise UserError("metadata.cnd_ray.storage: not set; name the S3 path (or shared folder) for "
                        "checkpoints, Tune state and MLflow artifacts")
    return value


def mlflow_port(cfg: dict, default: int) -> int:
    """The port of the head's MLflow server, as its start command (`mlflow server ... --port N`) says."""
    for cmd in cfg.get("head_start_ray_commands") or []:
        if "mlflow server" in cmd:
            found = re.search(r"--port[= ](\d+)", cmd)
            if found:
                return int(found.group(1))
    return default


MLFLOW_USER = "cnd-ray"  # the head's MLflow server's one (admin) login


def mlflow_credentials(token: str) -> dict[str, str]:
    """The MLflow basic-auth login of a cluster, as the environment MLflow's client reads, derived
    from the cluster's Ray token (already on every node, owner-only): drivers and workers log in
    with it and the head's server is started with it; rotating the token rotates it."""
    password = hashlib.sha256(f"cnd-ray mlflow password\0{token}".encode()).hexdigest()
    return {"MLFLOW_TRACKING_USERNAME": MLFLOW_USER, "MLFLOW_TRACKING_PASSWORD": password}


def write_mlflow_auth(folder: str | Path, token: str) -> None:
    """The head's MLflow server's basic-auth files in `folder`, owner-only: basic_auth.ini (the
    admin login of mlflow_credentials, no permissions for anyone else) and flask_secret (its
    CSRF key). The user store is made afresh, so the login follows a rotated token."""
    folder = Path(os.path.expanduser(str(folder)))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "basic_auth.db").unlink(missing_ok=True)
    creds = mlflow_credentials(token)
    ini = (f"[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
           f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
           f"admin_username = {creds['MLFLOW_TRACKING_USERNAME']}\n"
           f"admin_password = {creds['MLFLOW_TRACKING_PASSWORD']}\n"
           "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    secret = hashlib.sha256(f"cnd-ray mlflow flask\0{token}".encode()).hexdigest()
    for name, text in (("basic_auth.ini", ini), ("flask_secret", secret)):
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(folder / name, 0o600)


def token_file(cfg: dict) -> str:
    """The local file `file_mounts` copies to TOKEN_MOUNT on every node ('' when none)."""
    return str((cfg.get("file_mounts") or {}).get(TOKEN_MOUNT, ""))


def new_token(cfg: dict, replace: bool = False) -> Path:
    """Write a fresh token (256 random bits, as `ray get-auth-token --generate`) to the config's
    token file, readable by its owner only; an existing one is kept unless `replace` (rotation)."""
    name = token_file(cfg)
    if not name:
        raise UserError(f"file_mounts: no entry for {TOKEN_MOUNT}; add "
                        f"'{TOKEN_MOUNT}: ~/.ray/<cluster>.token' (see cluster/README.md)")
    path = Path(os.path.expanduser(name))
    if path.exists() and not replace:
        raise UserError(f"{name}: a token is already there; --rotate-token replaces it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that was already there
    return path


def node_env(cfg: dict) -> dict[str, str]:
    """Environment variables every command in the node's container gets (docker.run_options'
    --env / -e); empty without docker."""
    opts = shlex.split(" ".join((cfg.get("docker") or {}).get("run_options") or []))
    env = {}
    for i, opt in enumerate(opts):
        value = opt.split("=", 1)[1] if opt.startswith("--env=") else (
            opts[i + 1] if opt in ("-e", "--env") and i + 1 < len(opts) else None)
        if value and "=" in value:
            k, v = value.split("=", 1)
            env[k] = v
    return env


def _token_problems(cfg: dict) -> list[str]:
    out = []
    name = token_file(cfg)
    if not name:
        out.append(f"file_mounts: nothing copies the cluster's token to {TOKEN_MOUNT}; nodes would "
                   f"start without it (add '{TOKEN_MOUNT}: ~/.ray/{cfg.get('cluster_name', 'cluster')}.token')")
    else:
        path = Path(os.path.expanduser(name))
        if not path.is_file() or not path.read_text().strip():
            out.append(f"file_mounts.{TOKEN_MOUNT}: {name} does not exist or is empty; make it once with "
                       f"`python cluster/run.py --new-token <this config>`")
        else:
            for remote, local in (cfg.get("file_mounts") or {}).items():
                folder = Path(os.path.expanduser(str(local))).resolve()  # `ray up` reads it from the cwd
                if remote != TOKEN_MOUNT and folder.is_dir() and path.resolve().is_relative_to(folder):
                    out.append(f"file_mounts.{TOKEN_MOUNT}: {name} is inside {local}, which file_mounts "
                               f"copies to {remote} and git could commit; keep it under ~/.ray")
    container = node_env(cfg).get("RAY_AUTH_MODE") == "token"
    for key in START_LISTS:
        for i, cmd in enumerate(cfg.get(key) or []):
            if re.search(r"\bray start\b", cmd) and not container and "RAY_AUTH_MODE=token" not in cmd:
                out.append(f"{key}[{i}]: `ray start` without RAY_AUTH_MODE=token (set it in "
                           "docker.run_options as --env=RAY_AUTH_MODE=token, or before the command); "
                           "the node would start without token authentication or not join")
    return out


def problems(path: str | Path) -> list[str]:
    """Everything to fix in a cluster config before `ray up`, one line each naming the field."""
    import ray

    text = Path(path).read_text()
    cfg = load(path)
    out = []
    try:
        ray_validate(cfg)
    except Exception as e:  # Ray raises jsonschema, click and value errors alike
        out.append(f"Ray's validation: {str(e).splitlines()[0][:200]}")
    try:
        storage(cfg)
    except UserError as e:
        out.append(str(e))
    if KEY_PATTERN.search(text):
        out.append("credentials: the file holds an AWS key; use an IAM instance profile instead")
    out += _token_problems(cfg)
    image = (cfg.get("docker") or {}).get("image", "")
    if ray.__version__ not in image:
        out.append(f"docker.image: {image!r} does not pin Ray {ray.__version__} (the version here); "
                   "mixed Ray versions do not form a cluster")
    provider = cfg.get("provider") or {}
    if provider.get("type") == "aws":
        if not provider.get("region"):
            out.append("provider.region: not set (Ray would silently use us-west-2)")
        if not cfg.get("idle_timeout_minutes"):
            out.append("idle_timeout_minutes: not set; idle GPU nodes would keep billing")
        for name, node in (cfg.get("available_node_types") or {}).items():
            if "IamInstanceProfile" not in (node.get("node_config") or {}):
                out.append(f"available_node_types.{name}.node_config.IamInstanceProfile: not set; "
                           "the node could not reach S3 without keys")
        for rule in (provider.get("security_group") or {}).get("IpPermissions", []):
            if (rule.get("FromPort"), rule.get("ToPort")) != (22, 22):
                out.append(f"provider.security_group.IpPermissions: opens ports {rule.get('FromPort')}-"
                           f"{rule.get('ToPort')}; only SSH (22) should be open, the rest goes through tunnels")
    return out
