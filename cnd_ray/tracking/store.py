"""Where runs are logged: the tracking URI (config, $MLFLOW_TRACKING_URI, ./mlflow.db), the
client, and whether a server answers now. The tags every module here names runs by."""
from __future__ import annotations

import json
import os
from pathlib import Path

from cnd_ray import storage
from cnd_ray.errors import UserError

RUN_NAME_TAG = "cnd_ray.run_name"
PARENT_TAG = "mlflow.parentRunId"  # how MLflow nests a trial's run under its search's run
DEFAULT_DB = "mlflow.db"  # in the working directory, next to ./mlartifacts


def resolve_uri(uri: str) -> str:
    """The tracking URI to use, absolute: config, else $MLFLOW_TRACKING_URI, else ./mlflow.db.

    Resolved on the driver because Ray workers run in another working directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{os.path.abspath(DEFAULT_DB)}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{os.path.abspath(uri[len('sqlite:///'):])}"
    if not storage.is_uri(uri):  # a plain folder: MLflow's file store
        return Path(uri).absolute().as_uri()
    return uri


def artifact_location(uri: str) -> str | None:
    """Local stores keep artifacts in ./mlartifacts beside the database, by absolute path."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent.joinpath("mlartifacts").as_uri()
    return None  # a server decides (and proxies artifacts, so workers need no credentials)


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


PROBE_TIMEOUT_S = 5


def reachable(uri: str) -> bool:
    """Whether the tracking store at `uri` answers now: one request, no retries, 5 s at most
    (MLflow's own retries took 259 s to give up on a server that was not there). Local stores
    always answer. A plain HTTP request, not MLflow's client: its retries and timeout are process-
    wide environment variables, and setting them here (from the uploader's thread) once cut the
    caller's own MLflow requests to one 5 s try."""
    if not uri.startswith(("http://", "https://")):
        return True
    import base64
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
                                     data=json.dumps({"max_results": 1}).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S):
            return True
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # it answered: no
            raise UserError(f"track.tracking_uri: MLflow at {uri} refused the login (set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)") from None
        return False
    except (OSError, ValueError):  # refused, timed out, no such host
        return False
