"""Connecting to Ray the same way from every verb: the cluster in RAY_ADDRESS, else a local one."""
from __future__ import annotations

import logging
import os

import ray


def _has_token() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.exists(
        os.path.expanduser("~/.ray/auth_token"))


def local_cpus() -> int:
    """Logical CPUs of a local Ray: more than the cores on small machines, because training workers
    and Ray Data tasks take fractional shares and whole-CPU tasks would wait (num_cpus=2 hung on 2
    cores; DESIGN.md)."""
    return max(4, os.cpu_count() or 1)


def connect(num_cpus: float | None = None) -> None:
    """Reuse a running ray.init(); join RAY_ADDRESS; or start a local Ray with num_cpus logical CPUs
    (default: local_cpus()). Every verb connects here first, so the first one decides.

    Ray 2.60 clusters started by ray.init() use token auth, and an explicit address fails with
    "Missing authentication token" unless RAY_AUTH_MODE=token: we set it for the user.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address and "RAY_AUTH_MODE" not in os.environ and _has_token():
        os.environ["RAY_AUTH_MODE"] = "token"
    # "local", not None: Ray would otherwise join any other Ray running on this machine (another
    # user's, a test's) and then refuse num_cpus.
    ray.init(address=address or "local", num_cpus=None if address else (num_cpus or local_cpus()),
             logging_level=logging.WARNING, log_to_driver=True)
