"""The end of a training run in MLflow: log the best checkpoint as a model (signature, input
example, the serving code only), register it and move the `champion` alias when it is
better, log the confusion matrix, and finish the run; also `workflow.py register --run`
for a run whose end could not reach MLflow.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from pipelines import config
from pipelines.data.shards import read_manifest
from pipelines.files import exists, read_text
from pipelines.serve.bundle import INFERENCE, WEIGHTS, read_info
from pipelines.train import tracking
from pipelines.train.errors import TrackingPending, TrainError
from pipelines.train.storage import (
    RUN_CONFIG_FILE,
    RUN_ID_FILE,
    kept_checkpoints,
    storage_filesystem,
)

ROOT = Path(__file__).resolve().parents[2]

# What a logged MLflow model carries of this project (its code_paths): the model and the
# serving path, not Ray, training or preprocessing.
SERVING_CODE = ("pipelines/__init__.py", "pipelines/serve/__init__.py",
                "pipelines/serve/bundle.py", "pipelines/serve/model.py",
                "pipelines/serve/pyfunc_model.py",
                "pipelines/data/__init__.py", "pipelines/data/decode.py")


def abs_tracking_uri(uri: str) -> str:
    """Workers run in other directories: make a relative sqlite path absolute."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def signature_and_example(info: dict):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    sig = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, info["num_classes"]),
                                   "probabilities")]))
    side = info["resize"]
    example = np.random.default_rng(0).integers(0, 256, (1, side, side, 3), dtype=np.uint8)
    return sig, example


def registered_version(client, name: str, run_id: str, epoch: int | None):
    """The version of model `name` already registered from `run_id`'s checkpoint of
    `epoch`, or None: `register` and `--resume` with no new best epoch register once."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:  # no such registered model yet
        return None
    for v in versions:
        if v.tags.get(tracking.RUN_TAG) == run_id and v.tags.get(tracking.EPOCH_TAG) == str(epoch):
            return v
    return None


def log_bundle_model(bundle_dir: str):
    """Log a bundle as an MLflow pyfunc model ("models from code", with a signature and an
    input example) in the active run; returns MLflow's ModelInfo."""
    import mlflow

    info = read_info(bundle_dir)
    sig, example = signature_and_example(info)
    # MLflow validates the input example on a local copy of the two files it just wrote and
    # draws a progress bar of that copy: noise in a log, and nothing a person waits for.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        # Only what inference needs travels: not the optimiser state of the checkpoint.
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        for fname in (WEIGHTS, INFERENCE):
            shutil.copy2(Path(bundle_dir) / fname, bundle / fname)
        code = Path(tmp) / "code"
        for rel in SERVING_CODE:
            (code / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, code / rel)
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(ROOT / "pipelines" / "serve" / "pyfunc_model.py"),
            artifacts={"bundle": str(bundle)},
            code_paths=[str(ROOT / "alexnet"), str(code / "pipelines")],
            signature=sig, input_example=example,
            metadata={"variant": info["variant"], "input_size": info["input_size"],
                      "num_classes": info["num_classes"]})


def log_and_register(bundle_dir: str, cfg: config.TrainConfig, val_error: float | None,
                     train_loss: float | None = None, run_id: str | None = None,
                     epoch: int | None = None) -> dict:
    """Log the bundle as an MLflow pyfunc model (models from code) in the active run and
    register it; move alias `champion` only when it beats the current champion
    (`tracking.promote`). A checkpoint (run, epoch) already registered is not registered
    again: its version is returned with `"already_registered": True`."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.serve.bundle import read_info

    client, name = MlflowClient(), cfg.tracking.registered_model
    if run_id is not None and epoch is not None:
        done = registered_version(client, name, run_id, epoch)
        if done is not None:
            aliases = sorted(getattr(done, "aliases", []) or [])
            return {"model_uri": f"models:/{name}/{done.version}", "name": name,
                    "version": int(done.version), "alias": ",".join(aliases) or None,
                    "already_registered": True}
    model_info = log_bundle_model(bundle_dir)
    info = read_info(bundle_dir)
    # The (run, epoch) tags go in with the version itself: a registration whose answer is
    # lost (a timeout) is still found by `registered_version` when the end is retried.
    origin = {}
    if run_id is not None and epoch is not None:
        origin = {tracking.RUN_TAG: run_id, tracking.EPOCH_TAG: str(epoch)}
    version = mlflow.register_model(model_info.model_uri, name, tags=origin or None)
    outcome = tracking.promote(client, name, version.version, val_error, train_loss,
                               tracking.classes_digest(info["classes"]),
                               cfg.tracking.allow_class_change)
    return {"model_uri": f"models:/{name}/{int(version.version)}",
            "logged_model_uri": model_info.model_uri, "name": name, **outcome}


def _log_confusion(ckpt_dir: str, classes: list[dict]) -> list[str]:
    """The best checkpoint's val confusion matrix: PNG + the top confusions as a table."""
    import mlflow

    from pipelines.train.checkpoint import read_confusion

    matrix = read_confusion(ckpt_dir)
    if matrix is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        tracking.confusion_figure(matrix, classes, Path(tmp) / "val_confusion.png")
        mlflow.log_artifact(str(Path(tmp) / "val_confusion.png"))
    rows = tracking.top_confusions(matrix, classes, k=50)
    if not rows:  # a perfect matrix: nothing is confused with anything
        return ["val_confusion.png"]
    mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "val_top_confusions.json")
    return ["val_confusion.png", "val_top_confusions.json"]


def end_run_quietly(status: str) -> None:
    import mlflow

    try:
        mlflow.end_run(status)
    except Exception:  # noqa: BLE001 - the run's status is a side channel
        pass


def best_checkpoint(fs, run_dir: str, epochs: dict[int, dict]) -> tuple[int, str]:
    """(epoch, path) of the kept checkpoint with the best score in the journal; ties go to
    the earlier epoch, as early stopping counts them."""
    kept = {e: p for e, p in kept_checkpoints(fs, run_dir).items() if "score" in epochs.get(e, {})}
    if not kept:
        raise TrainError(f"{run_dir} holds no checkpoint with journalled metrics: nothing "
                         "to register (did the run train an epoch?)")
    epoch = min(kept, key=lambda e: (epochs[e]["score"], e))
    return epoch, kept[epoch]


def finish_run(cfg: config.TrainConfig, fs, run_dir: str, run_id: str, uri: str,
               classes: list[dict], deadline_s: float, tags: dict | None = None) -> dict:
    """The end of a run, shared by `train` and `register --run`: send the journal's pending
    metrics, log the best epoch and its confusion matrix, log + register the best checkpoint
    (once: a checkpoint already registered is not registered again) and end the MLflow run
    as FINISHED. MLflow failures are retried for `deadline_s` seconds; then TrackingPending
    says the checkpoints are safe and how to finish."""
    import mlflow
    from ray.train import Checkpoint

    from pipelines.train.journal import (
        JOURNAL,
        MetricJournal,
        TrackingUnavailable,
        drain,
        retry,
        short_requests,
    )

    journal = MetricJournal(fs, f"{run_dir}/{JOURNAL}")
    epochs = {r["step"]: r["metrics"] for r in journal.records() if r["key"] == "epoch"}
    epoch, path = best_checkpoint(fs, run_dir, epochs)
    best = epochs[epoch]
    summary = {"run_id": run_id, "run_name": run_dir.rsplit("/", 1)[1], "tracking_uri": uri,
               "checkpoint": path, "best_epoch": epoch,
               "val_top1_error": best.get("val_top1_error"),
               "val_top5_error": best.get("val_top5_error"), "artifacts": []}
    tags = dict(tags or {})
    if "stopped_early" in tags:
        tags["stopped_early"] += f"; best epoch {epoch + 1}"
    summary.update(tags)
    started = time.monotonic()

    def left() -> float:
        return max(0.0, deadline_s - (time.monotonic() - started))

    def tracked() -> None:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        active = mlflow.active_run()
        opened = contextlib.nullcontext() if active and active.info.run_id == run_id else \
            mlflow.start_run(run_id=run_id, log_system_metrics=False)
        with opened:
            if tags:
                mlflow.set_tags(tags)
            mlflow.log_metrics({"best_val_top1_error": best.get("val_top1_error", np.nan),
                                "best_epoch": epoch})
            client = mlflow.MlflowClient()
            with Checkpoint(path, filesystem=fs).as_directory() as d:
                # Once per best epoch: a retry or a second `register` does not log it again.
                if client.get_run(run_id).data.tags.get("confusion_epoch") != str(epoch):
                    summary["artifacts"] += _log_confusion(d, classes)
                    mlflow.set_tag("confusion_epoch", str(epoch))
                if cfg.tracking.register:
                    summary["registered"] = log_and_register(
                        d, cfg, best.get("val_top1_error"), best.get("train_loss"),
                        run_id=run_id, epoch=epoch)

    try:
        with short_requests():  # a few numbers: fail fast, retry on our own schedule
            drain(journal, uri, run_id, left())
        retry(tracked, uri, left())
        end_run_quietly("FINISHED")
        retry(lambda: mlflow.MlflowClient(uri).set_terminated(run_id, "FINISHED"), uri,
              max(left(), 30.0))
    except TrackingUnavailable as exc:
        end_run_quietly("FINISHED")
        raise TrackingPending(f"{exc}. Training is done and its checkpoints are safe in "
                              f"{run_dir}; when MLflow is back, finish the run with: python "
                              f"workflow.py register --run {run_dir}") from None
    return summary


def run_register(run: str, cfg: config.TrainConfig | None = None) -> dict:
    """`workflow.py register --run STORAGE/NAME`: what the end of `train` does, for a run
    whose end could not reach MLflow. Idempotent: run twice, it registers once."""
    fs, run_dir = storage_filesystem(run)
    if not exists(fs, f"{run_dir}/{RUN_ID_FILE}"):
        raise TrainError(f"{run}: not a training run directory (no {RUN_ID_FILE}); give "
                         "STORAGE/NAME as `train` printed it")
    run_id = read_text(fs, f"{run_dir}/{RUN_ID_FILE}").strip()
    if cfg is None:
        cfg = config.from_dict(config.TrainConfig, yaml.safe_load(read_text(fs,
                                                                   f"{run_dir}/{RUN_CONFIG_FILE}")))
    manifest = read_manifest(cfg.data.data)
    uri = abs_tracking_uri(tracking.setup_mlflow())
    return finish_run(cfg, fs, run_dir, run_id, uri, manifest["classes"],
                      cfg.tracking.retry_minutes * 60)
