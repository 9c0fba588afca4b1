"""Connecting to Ray the same way from every verb: the cluster in RAY_ADDRESS, else a local one.

A cluster with token authentication (Ray 2.59+ turns it on for clusters that `ray start --head`
finds a token for; cluster/*.yaml turn it on everywhere) accepts a driver only with
RAY_AUTH_MODE=token and its token. Ray reads that mode once per process, so setting the variable
after `import ray` is not enough (the submitted job then retried for 20 s and failed with a
ConnectionError); and a missing or wrong token only shows as that same ConnectionError. So before
ray.init we find the token where Ray looks for it, turn the mode on the way Ray itself does, and
ask the cluster's GCS once, with a 5 s deadline, whether it accepts us: a refusal is one line that
names the file or variable to fix.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

from cnd_ray.errors import UserError

# Ray's default token file; cluster.TOKEN_MOUNT names the same path on the nodes. Not imported from
# there: this module must import wherever a driver runs (when cluster.py sat at the package's top,
# `cnd_ray.cluster` could resolve to the project's cluster/ folder with ~ on sys.path).
DEFAULT_TOKEN = "~/.ray/auth_token"
PROBE_TIMEOUT_S = 5.0
# What MLflow's client reads to log in to a server that asks (basic auth, a bearer token).
MLFLOW_LOGIN = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH")


def token() -> tuple[str, str]:
    """(the token, where it came from), looked up as Ray does: RAY_AUTH_TOKEN, the file in
    RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token; ('', where it would be) when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:  # Ray aborts on an unreadable one rather than falling back: so do we, in one line
        try:
            text = Path(path).read_text().strip()
        except OSError as e:
            raise UserError(f"RAY_AUTH_TOKEN_PATH: cannot read {path} ({e.strerror})") from None
        if not text:
            raise UserError(f"RAY_AUTH_TOKEN_PATH: {path} is empty")
        return text, f"RAY_AUTH_TOKEN_PATH ({path})"
    default = Path(os.path.expanduser(DEFAULT_TOKEN))
    try:
        return default.read_text().strip(), str(default)
    except OSError:
        return "", str(default)


def _enable_token_mode() -> None:
    """RAY_AUTH_MODE=token for this process and its children, re-read by Ray's config as Ray's own
    token set-up does (its config is read at import; the variable alone comes too late)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config

    Config.initialize("")


def _gcs_address(address: str) -> str:
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:  # "auto": the cluster this machine belongs to, as ray.init finds it
        return canonicalize_bootstrap_address_or_die(address)
    except ConnectionError:
        raise UserError(f"RAY_ADDRESS={address}: no Ray cluster runs on this machine to join; start "
                        "one (`ray start --head`) or unset RAY_ADDRESS for a local Ray") from None


def check_access(address: str, secret: str, where: str) -> None:
    """One GCS call to `address` carrying `secret` (none when ''): a UserError naming `where` when
    the cluster refuses it, or when nothing answers within PROBE_TIMEOUT_S."""
    import grpc

    gcs = _gcs_address(address)
    with grpc.insecure_channel(gcs) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")
        try:
            call(b"", timeout=PROBE_TIMEOUT_S,
                 metadata=[("authorization", f"Bearer {secret}")] if secret else None)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                fix = (f"the token in {where} is not this cluster's (the head's ~/.ray/auth_token)"
                       if secret else f"it needs the cluster's token in {where} (copy the head's "
                       "~/.ray/auth_token), or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH")
                raise UserError(f"RAY_ADDRESS={address}: the cluster at {gcs} refused to connect: {fix}") from None
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise UserError(f"RAY_ADDRESS={address}: no Ray cluster answers at {gcs} "
                                f"({e.code().name.lower()}); is it running, and is the address right?") from None
            # anything else (UNIMPLEMENTED too, were Ray to rename the call): the cluster answered
            # past authentication; ray.init goes on


def _join(address: str) -> None:
    """Prepare this process to join the cluster at `address` with its token (see the module doc)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return  # the user's explicit choice
    secret, where = token()
    if secret:
        _enable_token_mode()
    if not address.startswith("ray://"):  # Ray Client servers are not the GCS; ray.init reports those
        check_access(address, secret, where)


def _loopback_only() -> None:
    """Make the local Ray this process starts listen on 127.0.0.1 only.

    On Linux Ray gives a node its network address and binds its metrics servers (dashboard,
    autoscaler, per-node agent), agents and gRPC servers to every interface: anyone on the
    network could read the metrics. Ray keeps a single-machine node on the loopback address where
    clusters are off (its setting for macOS and Windows, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0);
    a local Ray is never part of a cluster, so we turn that on. Ray reads the variable at import,
    in this process and in each process it starts: set for both."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def local_cpus() -> int:
    """Logical CPUs of a local Ray: more than the cores on small machines, because training workers
    and Ray Data tasks take fractional shares and whole-CPU tasks would wait (num_cpus=2 hung on 2
    cores; DESIGN.md)."""
    return max(4, os.cpu_count() or 1)


def connect(num_cpus: float | None = None) -> None:
    """Reuse a running ray.init(); join RAY_ADDRESS; or start a local Ray with num_cpus logical CPUs
    (default: local_cpus()). Every verb connects here first, so the first one decides.

    A cluster in RAY_ADDRESS is joined with its token (module doc); a local Ray listens on
    127.0.0.1 only (`_loopback_only`).
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _join(address)
    else:
        _loopback_only()
    # A cluster's workers do not inherit this process's environment: they get the MLflow login
    # (a local Ray's workers inherit it).
    login = {k: os.environ[k] for k in MLFLOW_LOGIN if os.environ.get(k)} if address else {}
    # "local", not None: Ray would otherwise join any other Ray running on this machine (another
    # user's, a test's) and then refuse num_cpus.
    ray.init(address=address or "local", num_cpus=None if address else (num_cpus or local_cpus()),
             logging_level=logging.WARNING, log_to_driver=True,
             runtime_env={"env_vars": login} if login else None)
