"""MLflow, and the only package that imports it (DESIGN.md, "Layers"): store.py (where runs are
logged, whether a server answers), runs.py (a run's handle, found again by name), spool.py (a server
away at start), tracker.py (what the workers log through), models.py (logged and registered models),
ui.py (`cnd-ray ui`). Their public names, here, are what the rest of cnd_ray calls."""
from cnd_ray.tracking.models import (CHECKPOINT_TAG, MODEL_TAG, finish_model, register_model,
                                     resolve_model, start_model)
from cnd_ray.tracking.runs import EXPERIMENT_TAGS, Run, find_run, shards_digest, start_run
from cnd_ray.tracking.spool import (PUSH_EVERY_S, SPOOL, UPLOAD_EVERY_S, SpoolUploader, drop_spool,
                                    pull_spool, push_spool, spool_artifacts, spool_runs, spool_server,
                                    spool_uri, spooled, sync, upload)
from cnd_ray.tracking.store import (DEFAULT_DB, PARENT_TAG, PROBE_TIMEOUT_S, RUN_NAME_TAG,
                                    mlflow_client, reachable, resolve_uri)
from cnd_ray.tracking.tracker import MlflowTracker, Target, Tracker, open_tracker, system_monitor
from cnd_ray.tracking.ui import (RUNS_VIEW, SHARED_VIEW, UI_WAIT, UI_WORKERS, VIEW_TAG, save_search_view,
                                 stop_server, ui, ui_command, ui_urls, wait_until_up)
