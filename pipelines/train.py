"""Launch distributed AlexNet training on Ray Train, tracked in MLflow.

    python workflow.py train --data data/sample-shards --workers 2 --epochs 2
    ray job submit --working-dir . -- python workflow.py train --data /shared/imagenet-shards --gpu

This file is the launcher: it checks the data, opens the MLflow run, builds
ScalingConfig/RunConfig/TorchTrainer and, when training ends, logs and registers the best
checkpoint as the model. The loop every worker runs is in `pipelines/train_loop.py`.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipelines import config as C
from pipelines import tracking
from pipelines.runtime import init_ray
from pipelines.shards import manifest_digest, read_manifest


class TrainError(RuntimeError):
    """Training cannot start; the message says why and what to do."""


RUN_ID_FILE = "mlflow_run_id"


def _abs_tracking_uri(uri: str) -> str:
    """Workers run in other directories: make a relative sqlite path absolute."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _is_local(storage: str) -> bool:
    return "://" not in storage


def resolve_run(cfg: C.TrainConfig) -> tuple[str, Path | None]:
    """Pick the run name and check resume/new against what storage holds."""
    storage = cfg.run.storage
    if _is_local(storage):
        storage = str(Path(storage).resolve())
        cfg.run.storage = storage
    run_dir = Path(storage) / cfg.run.name if _is_local(storage) else None
    if run_dir is not None:
        exists = (run_dir / RUN_ID_FILE).exists()
        if cfg.run.resume and not exists:
            raise TrainError(f"--resume: no run {cfg.run.name!r} in {storage}; runs there: "
                             f"{sorted(p.name for p in Path(storage).glob('*/' + RUN_ID_FILE))}")
        if not cfg.run.resume and exists:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            cfg.run.name = f"{cfg.run.name}-{stamp}"
            run_dir = Path(storage) / cfg.run.name
    return cfg.run.name, run_dir


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


def log_and_register(bundle_dir: str, cfg: C.TrainConfig, val_error: float) -> dict:
    """Log the bundle as an MLflow pyfunc model (models from code) and register it; move
    alias `champion` only when it beats the current champion."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.model_package import INFERENCE, WEIGHTS, load_info

    info = load_info(bundle_dir)
    sig, example = signature_and_example(info)
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        # Only what inference needs travels: not the optimiser state of the checkpoint.
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        for name in (WEIGHTS, INFERENCE):
            shutil.copy2(Path(bundle_dir) / name, bundle / name)
        model_info = mlflow.pyfunc.log_model(
            name="model", python_model=str(root / "pipelines" / "pyfunc_model.py"),
            artifacts={"bundle": str(bundle)},
            code_paths=[str(root / "alexnet"), str(root / "pipelines")],
            signature=sig, input_example=example,
            metadata={"variant": info["variant"], "input_size": info["input_size"],
                      "num_classes": info["num_classes"]})
    version = mlflow.register_model(model_info.model_uri, cfg.tracking.registered_model)
    outcome = tracking.promote(MlflowClient(), cfg.tracking.registered_model, version.version,
                               val_error)
    return {"model_uri": model_info.model_uri, "name": cfg.tracking.registered_model,
            **outcome}


def run_train(cfg: C.TrainConfig) -> dict:
    """Train, then log + register the best checkpoint; returns a summary (also printed)."""
    import mlflow
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train_loop import train_loop_per_worker

    if not cfg.data.data:
        raise TrainError("--data is required: the OUT directory of `workflow.py preprocess`")
    cfg.data.data = str(Path(cfg.data.data).resolve())
    manifest = read_manifest(cfg.data.data)  # clear error before any worker starts
    if manifest["splits"].get(cfg.data.train_split, {}).get("records", 0) == 0:
        raise TrainError(f"{cfg.data.data}: split {cfg.data.train_split!r} has no records")
    name, run_dir = resolve_run(cfg)

    uri = _abs_tracking_uri(tracking.setup_mlflow())
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    run_id = (run_dir / RUN_ID_FILE).read_text().strip() if cfg.run.resume and run_dir else None
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else name)
    run_id = run.info.run_id
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_ID_FILE).write_text(run_id)
    try:
        if not cfg.run.resume:
            mlflow.log_params(C.flatten(cfg))
            mlflow.set_tags({"dataset.manifest_sha256": manifest_digest(cfg.data.data),
                             "ray.run_name": name})
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "config.yaml").write_text(C.to_yaml(cfg))
                (Path(tmp) / "classes.json").write_text(json.dumps(manifest["classes"]))
                mlflow.log_artifacts(tmp)
            mlflow.log_artifact(str(Path(cfg.data.data) / "manifest.json"), "dataset")

        init_ray(log_to_driver=True)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": C.to_dict(cfg), "run_id": run_id, "tracking_uri": uri},
            torch_config=TorchConfig(backend="nccl" if cfg.run.gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.run.workers, use_gpu=cfg.run.gpu,
                                         resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
            run_config=RunConfig(
                name=name, storage_path=cfg.run.storage,
                failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2,
                                                   checkpoint_score_attribute="score",
                                                   checkpoint_score_order="min")))
        result = trainer.fit()
        best_ckpt, best_metrics = min(result.best_checkpoints, key=lambda cm: cm[1]["score"])
        summary = {"run_id": run_id, "run_name": name, "tracking_uri": uri,
                   "checkpoint": best_ckpt.path, "best_epoch": best_metrics["epoch"],
                   "val_top1_error": best_metrics.get("val_top1_error"),
                   "val_top5_error": best_metrics.get("val_top5_error"),
                   "epochs_run": result.metrics.get("epoch", -1) + 1}
        mlflow.log_metrics({"best_val_top1_error": best_metrics.get("val_top1_error", np.nan),
                            "best_epoch": best_metrics["epoch"]})
        if cfg.tracking.register:
            with best_ckpt.as_directory() as d:
                summary["registered"] = log_and_register(
                    d, cfg, best_metrics.get("val_top1_error", best_metrics["score"]))
        return summary
    finally:
        mlflow.end_run()
