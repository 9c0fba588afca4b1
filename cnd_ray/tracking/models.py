"""A training run's logged model (MLflow 3's Models), the registry (a search's best trial), and
the checkpoint a `models:/...` reference names."""
from __future__ import annotations

import tempfile
from pathlib import Path

from cnd_ray.errors import UserError
from cnd_ray.tracking.runs import Run
from cnd_ray.tracking.store import mlflow_client

MODEL_TAG = "cnd_ray.model_id"  # on a run: the id of its logged model
CHECKPOINT_TAG = "cnd_ray.checkpoint"  # on a logged model and a model version: the checkpoint folder


def start_model(uri: str, experiment: str, run_id: str, name: str, params: dict) -> str:
    """The id of run `run_id`'s logged model (MLflow 3), PENDING until the run finishes; the same
    one again on a resume. Metrics rank 0 logs are linked to it; `params`: what it is."""
    client = mlflow_client(uri)
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    found = client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'", max_results=1)
    if found:
        return found[0].model_id
    model = client.create_logged_model(exp_id, name=name, source_run_id=run_id, model_type="cnd_ray",
                                       params={k: str(v) for k, v in params.items()})
    Run(uri, run_id).set_tags({MODEL_TAG: model.model_id})
    return model.model_id


def finish_model(uri: str, model_id: str, checkpoint: str | None, step: int, config_yaml: str) -> None:
    """READY, naming its checkpoint and step, with the config and the checkpoint's path as its
    artifacts (the weights stay in train.storage); FAILED when the run ended without one."""
    client = mlflow_client(uri)
    if not checkpoint:
        client.finalize_logged_model(model_id, "FAILED")
        return
    client.set_logged_model_tags(model_id, {CHECKPOINT_TAG: checkpoint, "cnd_ray.step": str(step)})
    with tempfile.TemporaryDirectory() as d:
        Path(d, "config.yaml").write_text(config_yaml)
        Path(d, "checkpoint.txt").write_text(checkpoint + "\n")
        client.log_model_artifacts(model_id, d)
    client.finalize_logged_model(model_id, "READY")


def register_model(uri: str, name: str, model_id: str, run_id: str, tags: dict, description: str) -> str:
    """Register the logged model `model_id` as a new version of `name` (made when missing) and point
    the alias "best" at it; returns the version. The version's tags name the model and checkpoint."""
    client = mlflow_client(uri)
    model = client.get_logged_model(model_id)
    try:
        client.get_registered_model(name)
    except Exception:  # not registered yet
        client.create_registered_model(name, description="cnd_ray: the best trial of the search of this name")
    # A server resolves a models:/<id> source in its own store. A local store's registry resolves it
    # through the process-wide tracking URI, which need not be this store: there the source is the
    # model's artifact folder (a server refuses that: not inside the run's artifacts).
    served = uri.startswith(("http://", "https://"))
    version = client.create_model_version(
        name, source=f"models:/{model_id}" if served else model.artifact_location, run_id=run_id,
        model_id=model_id if served else None, description=description,
        tags={MODEL_TAG: model_id, CHECKPOINT_TAG: model.tags.get(CHECKPOINT_TAG, ""),
              **{k: str(v) for k, v in tags.items()}}).version
    client.set_registered_model_alias(name, "best", version)
    return str(version)


def resolve_model(uri: str, ref: str) -> str:
    """The checkpoint folder behind `models:/<name>/<version>`, `models:/<name>@<alias>` or
    `models:/<logged model id>` in the store at `uri`; UserError naming the reference otherwise."""
    client = mlflow_client(uri)
    body = ref[len("models:/"):]
    try:
        if "@" in body:
            tags = client.get_model_version_by_alias(*body.split("@", 1)).tags
        elif "/" in body:
            tags = client.get_model_version(*body.rsplit("/", 1)).tags
        else:
            tags = client.get_logged_model(body).tags
    except Exception as e:
        raise UserError(f"--ckpt {ref}: not found in the MLflow store {uri} "
                        f"({str(e).splitlines()[0][:200]})") from None
    if not tags.get(CHECKPOINT_TAG):
        raise UserError(f"--ckpt {ref}: names no checkpoint (its run did not finish)")
    return tags[CHECKPOINT_TAG]
