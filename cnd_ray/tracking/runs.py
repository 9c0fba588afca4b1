"""MLflow runs: one per training run, found again by its name on a resume, and a search's parent
with its trials as children. A `Run` is the handle the drivers log to."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

from cnd_ray import storage
from cnd_ray.tracking.store import RUN_NAME_TAG, artifact_location, mlflow_client

# What a user reads at the top of the experiment in the UI, and its kind: MLflow 3 otherwise opens it
# in the GenAI view (traces, token usage) instead of the runs table.
EXPERIMENT_TAGS = {
    "mlflow.note.content": (
        "cnd_ray: Class-N-Diff, a DiT trained jointly with a benign/malignant classifier. One run per "
        "training run (params: the whole config; metrics: losses every train.log_every steps and, at "
        "each evaluation, the sample metrics judged by an independent classifier; artifacts: the "
        "config, sample grids, the loss curve). A search (`cnd-ray tune`) is a parent run with one "
        "child run per trial, ranked by its space's metric - fd_ratio for the shipped spaces: the "
        "samples' Frechet distance in the judge's feature space over the real-vs-real floor, lower "
        "is better; the parent holds the trial table and the best trial."),
    "mlflow.experimentKind": "custom_model_development",
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One MLflow run: the store it lives in and its id. What a driver logs a run's config, files,
    metrics, tags and end to."""
    uri: str
    id: str

    def set_tags(self, tags: dict) -> None:
        client = mlflow_client(self.uri)
        for k, v in tags.items():
            client.set_tag(self.id, k, str(v))

    def finish(self, status: str, tags: dict | None = None) -> None:
        self.set_tags(tags or {})
        mlflow_client(self.uri).set_terminated(self.id, status=status)

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow_client(self.uri).log_text(self.id, text, artifact_file)

    def log_file(self, path: str, artifact_path: str | None = None) -> None:
        mlflow_client(self.uri).log_artifact(self.id, path, artifact_path)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if metrics:
            mlflow_client(self.uri).log_batch(self.id, metrics=[Metric(k, float(v), now, step)
                                                                for k, v in metrics.items()])

    def log_dataset(self, shards: str, manifest) -> None:
        """The run's shards (`manifest`: their shardset.Manifest) as MLflow dataset inputs, one per
        split (its context): named by the folder,
        the source its path or URI, the digest its contents, the profile its counts per class and per
        skin-tone band. MLflow's Dataset column and the run's Inputs show them."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        client = mlflow_client(self.uri)
        profile = {"image_size": manifest.image_size, "space": "latent" if manifest.latent else "pixel",
                   "label_mode": manifest.label_mode, "skin_tones": manifest.skin_tones}
        # One dataset per split (MLflow keeps one input per dataset and run, whatever its context).
        source_type = str(shards).split("://")[0] if storage.is_uri(shards) else "local"
        inputs = []
        for split, c in manifest.splits.items():
            counts = {"benign": c.benign, "malignant": c.malignant}
            dataset = Dataset(name=os.path.basename(str(shards).rstrip("/")), digest=shards_digest(manifest, split),
                              source_type=source_type, source=json.dumps({"uri": str(shards)}),
                              profile=json.dumps({"split": split, "counts": counts, **profile}))
            inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", split)]))
        log_inputs(client, self.id, inputs)


def log_inputs(client, run_id: str, inputs: list) -> None:
    """Link the run `run_id` to those of the MLflow DatasetInputs `inputs` it lacks (by digest): a
    resumed run or a repeated upload has them already."""
    from mlflow.exceptions import MlflowException

    # MLflow looks a dataset up, then inserts it: two runs logging the same shards at once (a
    # search's trials starting together) can both miss it, and the later insert then fails on the
    # experiment's unique (name, digest). The earlier one has committed it, so trying again links to it.
    for attempt in range(3):
        have = {i.dataset.digest for i in client.get_run(run_id).inputs.dataset_inputs}
        missing = [i for i in inputs if i.dataset.digest not in have]
        if not missing:
            return
        try:
            client.log_inputs(run_id, datasets=missing)
            return
        except MlflowException:
            if attempt == 2:
                raise


def start_run(uri: str, experiment: str, run_name: str, params: dict, tags: dict,
              artifacts: str | None = None) -> tuple[Run, int]:
    """(the run, its last logged step) of the MLflow run for `run_name`: the existing one on a resume.
    `artifacts`: where a new experiment keeps them (default: beside a local store's database)."""
    client = mlflow_client(uri)
    exp_id = _experiment_id(client, experiment, artifacts or artifact_location(uri))
    run_id = find_run(uri, experiment, run_name)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        history = client.get_metric_history(run_id, "loss_diff")
        return Run(uri, run_id), max((m.step for m in history), default=-1)
    from mlflow.entities import Param

    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return Run(uri, run.info.run_id), -1


def _experiment_id(client, experiment: str, artifacts: str) -> str:
    """The id of `experiment`, created (keeping its artifacts at `artifacts`) when the store lacks it."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(experiment)
    if exp:
        return exp.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=artifacts, tags=EXPERIMENT_TAGS)
    except MlflowException:
        # Two runs starting at once on a new store both found no experiment; the other created it.
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(uri: str, experiment: str, run_name: str) -> str | None:
    """The id of the MLflow run logged for `run_name`, if the store has one."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id],
                               filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    return found[0].info.run_id if found else None


def shards_digest(manifest, split: str) -> str:
    """A digest of a split's contents (each shard file's sha256, the labelling and the size): two
    runs on the same shards show the same one, wherever the folder lives."""
    keep = {k: getattr(manifest, k) for k in ("label_mode", "ak_malignant", "image_size", "latent")}
    keep["files"] = sorted((s.file, s.sha256) for s in manifest.shards if s.split == split)
    keep["split"] = split
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]
