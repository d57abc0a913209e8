"""MLflow conventions of the workflow: where runs go, and how the champion is chosen.

- Tracking URI: `MLFLOW_TRACKING_URI` when set, else `sqlite:///mlflow.db` in the working
  directory (`mlflow ui --backend-store-uri sqlite:///mlflow.db` shows it).
- One run per training; workers log to it by run id, so restarts continue the same run.
- Tags: git commit, dataset manifest sha256, Ray cluster size; the dataset is an MLflow
  dataset input (`dataset_input`); plots: the val confusion matrix (`confusion_figure`,
  `top_confusions`) and a grid of augmented training crops (`image_grid`).
- Registered model `alexnet` by default; alias `champion` moves to a new version only when its
  validation top-1 error (tag `val_top1_error` on the version) beats the champion's; the loser
  of the comparison gets alias `challenger`.
"""

from __future__ import annotations

import json
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


def promote(client, name: str, version: str | int, val_top1_error: float) -> dict:
    """Tag the version with its error and move `champion` to it if it beats the current one.
    Returns what happened, e.g. {"version": 3, "alias": "champion", "previous": 2}.

    Versions are ints here whatever the store: MLflow gives an int from a sqlite store and a
    str from a tracking server, and the summary (and the scripts reading its JSON) should
    not depend on which one ran."""
    from mlflow.exceptions import MlflowException

    version, v = int(version), str(version)  # int out; the client is given what it takes
    client.set_model_version_tag(name, v, METRIC_TAG, f"{val_top1_error:.6f}")
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is None or str(current.version) == v:
        client.set_registered_model_alias(name, CHAMPION, v)
        return {"version": version, "alias": CHAMPION, "previous": None}
    current_err = float(current.tags.get(METRIC_TAG, "inf"))
    if val_top1_error < current_err:
        client.set_registered_model_alias(name, CHAMPION, v)
        client.set_registered_model_alias(name, CHALLENGER, current.version)
        return {"version": version, "alias": CHAMPION, "previous": int(current.version),
                "previous_error": current_err}
    client.set_registered_model_alias(name, CHALLENGER, v)
    return {"version": version, "alias": CHALLENGER, "champion": int(current.version),
            "champion_error": current_err}


def git_commit(root: str | os.PathLike) -> dict[str, str]:
    """`{"git.commit": sha, "git.dirty": "true"/"false"}` of the code that runs, for the run's
    tags. Under `ray job submit --working-dir .` the upload has no .git: then the commit comes
    from `GIT_COMMIT` when the submitter sets it, else "unknown"."""
    import subprocess

    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=30, check=True).stdout.strip()
        return {"git.commit": sha, "mlflow.source.git.commit": sha,
                "git.dirty": "true" if dirty else "false"}
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": os.environ.get("GIT_COMMIT", "unknown"), "git.dirty": "unknown"}


def dataset_input(data: str, name: str, sha256: str, crop: int, records: dict):
    """The preprocessed dataset as an MLflow dataset input: name, digest (the manifest's
    sha256, cut to MLflow's 36-character column), source (the OUT directory) and a schema of
    what training reads (uint8 crops and int labels)."""
    import warnings

    import numpy as np
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(data)
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, crop, crop, 3), "image"),
                     TensorSpec(np.dtype(np.int64), (-1,), "label")])
    dataset = MetaDataset(source, name=name, digest=sha256[:36], schema=schema)
    return dataset, {"records": json.dumps(records)}


def confusion_figure(matrix, classes: list[dict], path: str | os.PathLike) -> str:
    """The val confusion matrix as a PNG (rows: true class, columns: predicted; each row
    normalised to 1). Class names label the axes up to 30 classes; for ImageNet's 1000 the
    image is the pattern and `top_confusions` is the readable part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix, dtype=np.float64)
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(m)
    fig, ax = plt.subplots(figsize=(6 + min(n, 30) * 0.25, 5 + min(n, 30) * 0.25), dpi=100)
    im = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:
        names = [c.get("name") or c["wnid"] for c in classes]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    acc = np.trace(m) / max(m.sum(), 1)
    ax.set_title(f"validation confusion ({int(m.sum())} images, top-1 accuracy {acc:.3f})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def top_confusions(matrix, classes: list[dict], k: int = 20) -> list[dict]:
    """The `k` largest off-diagonal cells: which true class is most often taken for which."""
    import numpy as np

    m = np.asarray(matrix, dtype=np.int64).copy()
    totals = m.sum(1)
    np.fill_diagonal(m, 0)
    flat = np.argsort(m, axis=None)[::-1][:k]
    rows = []
    for idx in flat:
        t, p = divmod(int(idx), len(m))
        if m[t, p] == 0:
            break
        rows.append({"true_index": t, "true_wnid": classes[t]["wnid"],
                     "true_name": classes[t].get("name", ""), "predicted_index": p,
                     "predicted_wnid": classes[p]["wnid"],
                     "predicted_name": classes[p].get("name", ""), "count": int(m[t, p]),
                     "fraction_of_true": float(m[t, p] / max(totals[t], 1))})
    return rows


def image_grid(images, columns: int = 8, min_side: int = 96):
    """uint8 [N, H, W, 3] -> one image, `columns` wide, with 2-pixel gaps. Crops smaller
    than `min_side` (CIFAR's 32) are enlarged by an integer factor, pixels kept sharp."""
    import numpy as np

    images = np.asarray(images)
    factor = max(1, min_side // images.shape[1])
    if factor > 1:
        images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = img
    return grid
