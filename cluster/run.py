"""What `ray submit cluster/<config>.yaml cluster/run.py -- <verb> ...` runs on the head node: the
`cnd-ray` CLI, connected to the running cluster, with the cluster's storage and MLflow server as
defaults, so the same verbs work on a laptop and on the cluster.

    ray submit cluster/aws.yaml cluster/run.py -- tune --space tune_spaces/paper_settings.yaml --config paper
    python cluster/run.py --new-token cluster/aws.yaml # once, before the first `ray up`: the token
    python cluster/run.py --rotate-token cluster/aws.yaml  # a new one (then `ray up` again)
    python cluster/run.py --check cluster/aws.yaml     # before `ray up`: what to fix, field by field
    python cluster/run.py --storage                    # the storage the head's config names
    python cluster/run.py --mlflow-hosts               # the head's MLflow server's --allowed-hosts
    python cluster/run.py --mlflow-auth ~/mlflow       # its basic-auth login files, from the token

Defaults it adds (an override you give wins): train.storage=<metadata.cnd_ray.storage>/runs for the
verbs that train, and track.tracking_uri=http://<head address>:5000 (the head's MLflow server), with
the login that server requires (cluster.mlflow_credentials) unless MLFLOW_TRACKING_USERNAME is set.
It joins the cluster with its token (~/.ray/auth_token, which the config's file_mounts put on every
node; cnd_ray.launch.session): a missing or refused token is one line, not a traceback.
"""
from __future__ import annotations

import os
import sys

# `ray submit` runs this file as ~/run.py, beside ~/cnd_ray: the project folder that file_mounts
# copies. With ~ first on sys.path, `import cnd_ray` found that folder (the project root, not the
# installed package) as a namespace package and failed. Nothing is imported from this file's folder.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

BOOTSTRAP = "~/ray_bootstrap_config.yaml"  # the config `ray up` leaves on the head node
TRAINING_VERBS = ("train", "tune", "quickstart")
TRACKED_VERBS = TRAINING_VERBS + ("sample", "evaluate", "ui")
MLFLOW_PORT = 5000  # when the config's head commands start no MLflow server with a --port


def _config_path() -> str:
    return os.path.expanduser(os.environ.get("CND_RAY_CLUSTER_CONFIG", BOOTSTRAP))


def cluster_argv(argv: list[str], storage: str, head_ip: str, environ=os.environ,
                 mlflow_port: int = MLFLOW_PORT) -> list[str]:
    """`cnd-ray` arguments with the cluster's defaults added where the user gave none."""
    if not argv or argv[0] not in TRACKED_VERBS:
        return list(argv)
    given = {a.split("=", 1)[0] for a in argv if "=" in a and not a.startswith("-")}
    extra = []
    if argv[0] in TRAINING_VERBS and "train.storage" not in given:
        extra.append(f"train.storage={storage.rstrip('/')}/runs")
    if "track.tracking_uri" not in given and not environ.get("MLFLOW_TRACKING_URI"):
        extra.append(f"track.tracking_uri=http://{head_ip}:{mlflow_port}")
    return list(argv) + extra


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from cnd_ray import cli
    from cnd_ray.launch import cluster, session
    from cnd_ray.errors import UserError

    try:
        if argv[:1] == ["--check"]:
            if len(argv) != 2:
                raise UserError("usage: run.py --check CLUSTER_YAML")
            found = cluster.problems(argv[1])
            for p in found:
                print(f"{argv[1]}: {p}")
            print(f"{argv[1]}: {'OK' if not found else f'{len(found)} to fix'}")
            return 1 if found else 0
        if argv[:1] in (["--new-token"], ["--rotate-token"]):
            if len(argv) != 2:
                raise UserError(f"usage: run.py {argv[0]} CLUSTER_YAML")
            path = cluster.new_token(cluster.load(argv[1]), replace=argv[0] == "--rotate-token")
            # the path only: a token never goes to a terminal or a log
            print(f"{argv[1]}: wrote a new token to {path} (owner-only); `ray up {argv[1]}` copies it "
                  "to every node" + (" and restarts Ray with it" if argv[0] == "--rotate-token" else ""))
            return 0
        config = cluster.load(_config_path())
        storage = cluster.storage(config)
        if argv == ["--storage"]:
            print(storage)
            return 0
        if argv[:1] == ["--mlflow-auth"]:  # the head's MLflow server's login files, from the token
            if len(argv) != 2:
                raise UserError("usage: run.py --mlflow-auth FOLDER")
            secret, where = session.token()
            if not secret:
                raise UserError(f"no cluster token at {where}: the MLflow login derives from it")
            cluster.write_mlflow_auth(argv[1], secret)
            return 0
        if argv == ["--mlflow-hosts"]:  # the Host headers the head's MLflow server accepts
            import ray

            ip, port = ray.util.get_node_ip_address(), cluster.mlflow_port(config, MLFLOW_PORT)
            print(",".join(f"{h}{p}" for h in (ip, "localhost", "127.0.0.1") for p in (f":{port}", "")))
            return 0
    except UserError as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    import ray

    os.environ.setdefault("RAY_ADDRESS", "auto")  # the running cluster, never a new local one
    secret, _ = session.token()
    if secret:  # the head's MLflow server's login (session forwards it to the workers)
        for k, v in cluster.mlflow_credentials(secret).items():
            os.environ.setdefault(k, v)
    return cli.main(cluster_argv(argv, storage, ray.util.get_node_ip_address(),
                                 mlflow_port=cluster.mlflow_port(config, MLFLOW_PORT)))


if __name__ == "__main__":
    sys.exit(main())
