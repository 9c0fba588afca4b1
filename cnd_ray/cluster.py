"""Cluster-launcher configs (cluster/*.yaml): Ray's own validation plus the checks `ray up` does not
make (GUARANTEES 19), and the project settings they carry in `metadata.cnd_ray`.

`ray up` validates a config with prepare_config + validate_config (jsonschema); that misses a
missing region (Ray silently picks us-west-2), an unpinned Ray (the AWS defaults install a nightly),
keys in files and open ports. Each problem here names the field to change.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from cnd_ray.errors import UserError

KEY_PATTERN = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id", re.I)


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
