"""MLflow conventions of the workflow: where runs go, and how the champion is chosen.

- Tracking URI: `MLFLOW_TRACKING_URI` when set, else `sqlite:///mlflow.db` in the working
  directory (`mlflow ui --backend-store-uri sqlite:///mlflow.db` shows it).
- One run per training; workers log to it by run id, so restarts continue the same run.
- Registered model `alexnet` by default; alias `champion` moves to a new version only when its
  validation top-1 error (tag `val_top1_error` on the version) beats the champion's; the loser
  of the comparison gets alias `challenger`.
"""

from __future__ import annotations

import os

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAG = "val_top1_error"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def setup_mlflow() -> str:
    """Point MLflow at the workflow's tracking URI (and the registry at the same store)."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def logged_steps(client, run_id: str, key: str) -> set[int]:
    """Steps already logged for `key`: a restarted worker group skips them, so every epoch
    appears once in the history even when an epoch was logged but not yet checkpointed."""
    return {m.step for m in client.get_metric_history(run_id, key)}


def promote(client, name: str, version: str, val_top1_error: float) -> dict:
    """Tag the version with its error and move `champion` to it if it beats the current one.
    Returns what happened, e.g. {"version": "3", "alias": "champion", "previous": "2"}."""
    from mlflow.exceptions import MlflowException

    client.set_model_version_tag(name, version, METRIC_TAG, f"{val_top1_error:.6f}")
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is None or str(current.version) == str(version):
        client.set_registered_model_alias(name, CHAMPION, version)
        return {"version": version, "alias": CHAMPION, "previous": None}
    current_err = float(current.tags.get(METRIC_TAG, "inf"))
    if val_top1_error < current_err:
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_registered_model_alias(name, CHALLENGER, current.version)
        return {"version": version, "alias": CHAMPION, "previous": current.version,
                "previous_error": current_err}
    client.set_registered_model_alias(name, CHALLENGER, version)
    return {"version": version, "alias": CHALLENGER, "champion": current.version,
            "champion_error": current_err}
