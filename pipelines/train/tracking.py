"""MLflow conventions of the workflow: where runs go, and how the champion is chosen.

- Tracking URI: `MLFLOW_TRACKING_URI` when set, else `sqlite:///mlflow.db` in the working
  directory (`mlflow ui --backend-store-uri sqlite:///mlflow.db` shows it).
- One run per training; workers log to it by run id, so restarts continue the same run.
- Tags: git commit, dataset manifest sha256, Ray cluster size; the dataset is an MLflow
  dataset input (`dataset_input`); plots: the val confusion matrix (`confusion_figure`,
  `top_confusions`) and a grid of augmented training crops (`image_grid`).
- Registered model `alexnet` by default; alias `champion` moves to a new version only when its
  validation top-1 error (tag `val_top1_error` on the version) beats the champion's; the loser
  of the comparison gets alias `challenger` (see `promote` for the like-with-like rules).
- A local sqlite store is created and migrated under a file lock (`init_store`), and the
  champion's compare-and-set runs under the same lock (`store_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAG, LOSS_TAG, CLASSES_TAG = "val_top1_error", "train_loss", "classes_sha256"
RUN_TAG, EPOCH_TAG = "source_run_id", "checkpoint_epoch"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (relative to the working directory when it
    is not absolute), else None."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]).resolve() if uri.startswith(prefix) else None


@contextlib.contextmanager
def store_lock(uri: str):
    """An exclusive lock for read-decide-write steps on a local sqlite store (a file lock
    `DB.lock` beside the database, held by one process at a time); a no-op for a server,
    which `promote` verifies by reading back instead."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # blocks until the other process is done
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# Errors of two processes creating or migrating one new sqlite store at the same moment
# (alembic's version row, tables created twice) and of a busy database. All pass when
# retried once the other process is done.
_STORE_RACES = ("alembic_version", "already exists", "database is locked",
                "Online migration expected", "UNIQUE constraint failed: experiments")


def retry_store_races(fn, attempts: int = 8, first_wait: float = 0.2):
    """Call fn(); retry the known sqlite creation/migration/lock races with backoff."""
    wait = first_wait
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - only the known races are retried
            if attempt == attempts - 1 or not any(t in str(exc) for t in _STORE_RACES):
                raise
        time.sleep(wait)
        wait = min(wait * 2, 5.0)
    return None


def init_store(uri: str, wait_s: float = 120.0) -> None:
    """Make a local sqlite store ready without ever migrating it concurrently.

    A new store is created and migrated under another name and then linked into place in
    one step (`os.link` fails if the name exists), so no other process ever sees it half
    made. Among this project's processes the file lock serialises this. A store that
    exists but is not yet at MLflow's schema head (an outside process such as `mlflow ui`
    is creating it right now) is waited for, not migrated a second time; two migrations of
    one sqlite file at once are what leave MLflow's alembic errors and half-added columns
    behind. What still races (a reader holding the database busy) is retried."""
    db = sqlite_path(uri)
    if db is None:
        return
    from mlflow import MlflowClient

    def open_store():
        try:
            return MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:
            if "_alembic_tmp_" in str(exc):
                _drop_alembic_leftovers(db)
            raise

    with store_lock(uri):
        if not db.exists():
            tmp = db.with_name(f".{db.name}.creating-{os.getpid()}")
            tmp_uri = f"sqlite:///{tmp}"
            try:
                client = MlflowClient(tmp_uri, registry_uri=tmp_uri)
                client.search_experiments(max_results=1)
                client.search_registered_models(max_results=1)
                try:
                    os.link(tmp, db)
                except FileExistsError:  # an outside process made one meanwhile: use it
                    pass
            finally:
                tmp.unlink(missing_ok=True)
        _wait_for_schema_head(db, wait_s)
        retry_store_races(open_store)


def _wait_for_schema_head(db: Path, wait_s: float) -> None:
    """Poll (read-only) until the store's alembic version is MLflow's head revision, or
    `wait_s` passes (an old store that needs `mlflow db upgrade` then gets MLflow's own
    message when it is opened)."""
    import sqlite3

    from mlflow.store.db.utils import _get_latest_schema_revision

    head, deadline = _get_latest_schema_revision(), time.monotonic() + wait_s
    while True:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True,
                                                    timeout=5)) as conn:
                row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            if row and row[0] == head:
                return
        except sqlite3.Error:  # no table yet (being created) or busy
            pass
        if time.monotonic() > deadline:
            return
        time.sleep(0.25)


def _drop_alembic_leftovers(db: Path) -> None:
    """Drop the scratch tables (`_alembic_tmp_<table>`) that an outside process killed or
    crashed in the middle of a batch migration leaves behind: while one exists every later
    migration of the store fails with "table _alembic_tmp_... already exists". They hold
    nothing of value: alembic copies a table into one and renames it back at the end."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        names = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = "
                                            "'table' AND name LIKE '\\_alembic\\_tmp\\_%' "
                                            "ESCAPE '\\'")]
        for name in names:
            conn.execute(f'DROP TABLE IF EXISTS "{name}"')
        conn.commit()


def setup_mlflow() -> str:
    """Point MLflow at the workflow's tracking URI (and the registry at the same store);
    a local sqlite store is initialised first (`init_store`). Every command that talks to
    MLflow comes through here."""
    import mlflow

    if not sys.stderr.isatty():  # MLflow's artifact bars, drawn into a log, are one long line
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri()
    init_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def classes_digest(classes: list[dict]) -> str:
    """A short fingerprint of a class index (wnids in order): versions with different ones
    answer different questions and are never compared."""
    text = "\n".join(c["wnid"] for c in classes)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _score_of(version) -> tuple[int, float]:
    """(0, val error) for a version with a val error, (1, train loss) without: a version
    measured on val always ranks ahead of one that is not, and like is compared with like."""
    if METRIC_TAG in version.tags:
        return 0, float(version.tags[METRIC_TAG])
    if LOSS_TAG in version.tags:
        return 1, float(version.tags[LOSS_TAG])
    return 2, math.inf


def promote(client, name: str, version, val_top1_error: float | None,
            train_loss: float | None = None, classes_sha: str | None = None,
            allow_class_change: bool = False, uri: str | None = None) -> dict:
    """Tag the version with its score and move `champion` to it if it beats the current
    champion; the loser gets `challenger`. Returns what happened, e.g. {"version": 3,
    "alias": "champion", "previous": 2}.

    Like with like: a version's score is its val top-1 error, or its train loss when it had
    no val split, and one without a val error never displaces one that has it. A champion
    with another class index is not replaced unless `allow_class_change`. Compare-and-set:
    on a sqlite store the read-decide-write runs under the store's file lock; on a server
    the champion is read back after the move and the decision redone if another job moved it
    in between."""
    from mlflow.exceptions import MlflowException

    if val_top1_error is not None:
        client.set_model_version_tag(name, version, METRIC_TAG, f"{val_top1_error:.6f}")
    if train_loss is not None:
        client.set_model_version_tag(name, version, LOSS_TAG, f"{train_loss:.6f}")
    if classes_sha:
        client.set_model_version_tag(name, version, CLASSES_TAG, classes_sha)
    ours = client.get_model_version(name, version)
    with store_lock(uri or tracking_uri()):
        for _ in range(5):
            try:
                current = client.get_model_version_by_alias(name, CHAMPION)
            except MlflowException:
                current = None
            outcome = _decide(ours, current, allow_class_change)
            if outcome["alias"] == CHAMPION:
                client.set_registered_model_alias(name, CHAMPION, ours.version)
                if current is not None and str(current.version) != str(ours.version):
                    client.set_registered_model_alias(name, CHALLENGER, current.version)
            else:
                client.set_registered_model_alias(name, CHALLENGER, ours.version)
            now = client.get_model_version_by_alias(name, CHAMPION)
            expected = ours.version if outcome["alias"] == CHAMPION else current.version
            if str(now.version) == str(expected):
                return outcome
    return outcome


def _decide(ours, current, allow_class_change: bool) -> dict:
    version = int(ours.version)
    if current is None or str(current.version) == str(ours.version):
        return {"version": version, "alias": CHAMPION, "previous": None}
    champ = {"champion": int(current.version)}
    theirs, mine = current.tags.get(CLASSES_TAG), ours.tags.get(CLASSES_TAG)
    if theirs and mine and theirs != mine and not allow_class_change:
        return {"version": version, "alias": CHALLENGER, **champ,
                "reason": "another class index than the champion's (--allow-class-change "
                          "to replace it anyway)"}
    (their_kind, their_score), (my_kind, my_score) = _score_of(current), _score_of(ours)
    if (my_kind, my_score) < (their_kind, their_score):
        out = {"version": version, "alias": CHAMPION, "previous": int(current.version)}
        if their_kind == 0:
            out["previous_error"] = their_score
        return out
    out = {"version": version, "alias": CHALLENGER, **champ}
    if their_kind == 0:
        out["champion_error"] = their_score
    if my_kind > their_kind:
        out["reason"] = "no val error, and the champion has one"
    return out


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
    """uint8 [N, H, W, 3] -> one image, `columns` wide, with 2-pixel white gaps after each
    crop. Crops smaller than `min_side` (CIFAR's 32) are enlarged by an integer factor,
    pixels kept sharp."""
    import numpy as np
    import torch
    from torchvision.utils import make_grid

    images = np.asarray(images)
    factor = max(1, min_side // images.shape[1])
    if factor > 1:
        images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    n, h = len(images), images.shape[1]
    rows = -(-n // columns)
    # White cells fill the last row: make_grid narrows a grid of fewer crops than `columns`
    # and returns a lone crop without gaps.
    cells = max(rows * columns, 2)
    white = np.full((cells - n, *images.shape[1:]), 255, np.uint8)
    batch = torch.from_numpy(np.concatenate([images, white])).permute(0, 3, 1, 2)
    grid = make_grid(batch, nrow=columns, padding=2, pad_value=255)
    # make_grid puts a gap before each cell too; this grid has one only after each.
    return np.ascontiguousarray(grid[:, 2:2 + rows * (h + 2), 2:].permute(1, 2, 0).numpy())
