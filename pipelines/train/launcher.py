"""Launch distributed AlexNet training on Ray Train, tracked in MLflow.

    python workflow.py train --data data/sample-shards --workers 2 --epochs 2
    ray job submit --working-dir . -- python workflow.py train --data /shared/imagenet-shards \
        --gpu --workers 8 --storage s3://bucket/alexnet-checkpoints

This file is the launcher: it checks the flags and the data (every error here comes before
any worker starts), opens the MLflow run, builds ScalingConfig/RunConfig/TorchTrainer and,
when training ends, logs the confusion matrix and logs + registers the best checkpoint as the
model. The loop every worker runs is in `pipelines/train/loop.py`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

from pipelines import config
from pipelines.data.shards import manifest_digest, read_manifest
from pipelines.files import exists, read_text, write_text
from pipelines.runtime import init_ray
from pipelines.train import tracking
from pipelines.train.errors import TrainError, TrainInterrupted
from pipelines.train.registry import ROOT, abs_tracking_uri, end_run_quietly, finish_run
from pipelines.train.storage import (
    INIT_FROM_FILE,
    INIT_WEIGHTS_FILE,
    RUN_CONFIG_FILE,
    RUN_ID_FILE,
    intact,
    kept_checkpoints,
    release_name,
    resolve_run,
    storage_failure,
    storage_filesystem,
)


def _check_resources(cfg: config.TrainConfig, local: bool) -> None:
    """Workers the cluster cannot place wait in WorkerGroupStartupTimeoutError retries for
    minutes. On the local Ray this command started, that is an error now; on a cluster
    (which may autoscale), one line says what the run waits for."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    workers = cfg.run.workers
    short = []
    if workers * cfg.run.cpus_per_worker > cpus:
        short.append(f"{workers * cfg.run.cpus_per_worker} CPUs ({workers} workers x "
                     f"--cpus-per-worker {cfg.run.cpus_per_worker}), it has {cpus:g}")
    if cfg.run.gpu and workers > gpus:
        short.append(f"{workers} GPUs (--gpu: one a worker), it has {gpus:g}")
    if not short:
        return
    if local:
        raise TrainError(f"the local Ray (this machine) is too small: the run needs "
                         f"{' and '.join(short)}; lower --workers or --cpus-per-worker"
                         + (", or drop --gpu" if cfg.run.gpu and workers > gpus else ""))
    print(f"note: waiting for the Ray cluster to provide {' and '.join(short)} now; an "
          "autoscaling cluster adds nodes, a fixed one never will (Ctrl-C stops)",
          file=sys.stderr)


def _fit(trainer):
    """trainer.fit(), with a Ctrl-C always a KeyboardInterrupt. Ray Train's own SIGINT
    handler (installed inside fit) aborts the run and then either returns the result as if
    training had ended (the run was then logged and registered as FINISHED) or, when the
    controller died of the same Ctrl-C, calls sys.exit(0) (exit status 1, no message).
    Wrapping that handler, once fit has installed it, tells both cases apart."""
    import signal

    register = getattr(trainer, "_register_sigint_handler", None)  # fit's hook (ray 2.5x)
    if register is None:  # another Ray: its own Ctrl-C behaviour, unchanged
        return trainer.fit()
    interrupted = []

    def wrapped_register(controller):
        register(controller)
        ray_handler = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            interrupted.append(signum)
            try:
                ray_handler(signum, frame)  # asks the controller to abort, as Ray does
            except SystemExit:
                raise KeyboardInterrupt from None

        signal.signal(signal.SIGINT, handler)

    trainer._register_sigint_handler = wrapped_register
    try:
        result = trainer.fit()
    except SystemExit:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        raise KeyboardInterrupt
    return result


def apply_variant_defaults(cfg: config.TrainConfig, given: set[str]) -> config.TrainConfig:
    """Defaults that depend on the variant, for the fields the user did not set (`given`:
    the names set by a flag or the YAML). The cifar variant is built for 32x32 inputs, so
    its crop is 32 unless --crop says otherwise; the config's 224 is ImageNet's. Adam and
    AdamW get their own default lr."""
    from alexnet import INPUT_SIZE

    if "crop" not in given:
        cfg.data.crop = INPUT_SIZE.get(cfg.model.variant, cfg.data.crop)
    if "lr" not in given and cfg.optim.optimizer in ("adam", "adamw"):
        # SGD's 0.01 makes Adam diverge; 1e-4 is what AlexNet implementations that train
        # with Adam use (per global batch of 128, scaled like SGD's).
        cfg.optim.lr = 1e-4
    return cfg


def check_config(cfg: config.TrainConfig) -> tuple[dict, dict]:
    """Every check that can fail before a worker starts: flags, manifest, shards. Returns
    (manifest, {split: {records, shards}})."""
    from alexnet import INPUT_SIZE, check_variant, min_input_size
    from pipelines.train.ingest import DatasetMismatch, check_dataset

    config.resolve_auto(cfg)
    try:
        check_variant(cfg.model.variant, cfg.model.groups)
    except ValueError as exc:
        raise TrainError(str(exc)) from exc
    smallest = min_input_size(cfg.model.variant)
    if cfg.data.crop < smallest:
        raise TrainError(f"--crop {cfg.data.crop} is too small for the {cfg.model.variant} "
                         f"variant: its layers need at least {smallest} px (it is built for "
                         f"{INPUT_SIZE[cfg.model.variant]})")
    if cfg.data.decode_on_gpu and not cfg.run.gpu:
        raise TrainError("--decode-on-gpu needs --gpu: nvJPEG decodes on the workers' GPUs")
    if cfg.data.decode_on_gpu and cfg.model.variant == "cifar":
        raise TrainError("--decode-on-gpu crops inside the stored image and cannot give the "
                         "cifar variant its pad-4 crops; drop the flag (32-px images decode "
                         "fast on the CPU)")
    if cfg.run.workers < 1 or cfg.optim.batch_size < 1 or cfg.run.epochs < 1:
        raise TrainError("--workers, --batch-size and --epochs must be at least 1")
    if not cfg.data.data:
        raise TrainError("--data is required: the OUT directory of `workflow.py preprocess`")
    cfg.data.data = str(Path(cfg.data.data).resolve())
    manifest = read_manifest(cfg.data.data)  # FileNotFoundError/ValueError say what to run
    if cfg.data.decode_on_gpu and manifest.get("preprocess", {}).get("encoding") != "jpeg":
        raise TrainError("--decode-on-gpu reads JPEG records; these shards are "
                         f"{manifest.get('preprocess', {}).get('encoding')!r}")
    try:
        split_counts = check_dataset(cfg.data.data, manifest, cfg.data.train_split,
                              cfg.data.val_split, cfg.data.crop)
    except DatasetMismatch as exc:
        raise TrainError(str(exc)) from exc
    _check_cifar_scale(cfg, manifest)
    return manifest, split_counts


def prepare_start(cfg: config.TrainConfig, manifest: dict) -> dict | None:
    """`--init-from`: read the weights and fit them to the model this run builds, before
    any worker or MLflow run starts (a variant or shape mismatch is an error now). Returns
    {state, record} or None; `record` (ref, what it resolved to, what happened to the last
    layer, the input mean/std the pretrained layers expect) is kept beside the checkpoints
    and in the run's tags."""
    if not cfg.model.init_from:
        if cfg.model.freeze != "none" or cfg.model.body_lr_mult != 1.0:
            raise TrainError("--freeze and --body-lr-mult fine-tune pretrained layers: give "
                             "--init-from with the weights to start from")
        return None
    import torch

    from alexnet import build_model
    from pipelines.train.pretrained import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        WeightsError,
        fit_to_model,
        read_source,
    )

    try:
        source = read_source(cfg.model.init_from)
        torch.manual_seed(cfg.run.seed)  # the replaced head's init, as a worker would draw it
        model = build_model(cfg.model.variant, len(manifest["classes"]), groups=cfg.model.groups,
                            dropout=cfg.model.dropout, init=cfg.model.init,
                            init_bias=cfg.model.init_bias)
        fitted = fit_to_model(source, model, cfg.model.variant, cfg.model.groups,
                              manifest["classes"])
    except WeightsError as exc:
        raise TrainError(str(exc)) from None
    notes = list(fitted.notes)
    stats = None
    if source.info:
        stats = {"mean": source.info["mean"], "std": source.info["std"]}
    elif source.variant == "torchvision":  # torchvision's weights expect ImageNet's mean/std
        stats = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if stats:
        notes.append("input mean/std from the source (its layers expect them)")
    if cfg.model.freeze != "none":
        notes.append(f"{cfg.model.freeze} frozen")
    if cfg.model.body_lr_mult != 1.0:
        notes.append(f"pretrained layers at {cfg.model.body_lr_mult:g} x the lr")
    record = {"ref": cfg.model.init_from, "resolved": source.resolved or source.ref,
              "sha256": source.sha256, "notes": notes, "stats": stats}
    return {"state": fitted.state, "record": record}


def _write_start(fs, run_dir: str, start: dict) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(start["state"], buf)
    fs.create_dir(run_dir, recursive=True)
    with fs.open_output_stream(f"{run_dir}/{INIT_WEIGHTS_FILE}") as fh:
        fh.write(buf.getvalue())
    write_text(fs, f"{run_dir}/{INIT_FROM_FILE}", json.dumps(start["record"], indent=1))


def _check_cifar_scale(cfg: config.TrainConfig, manifest: dict) -> None:
    """The cifar variant on ImageNet-sized shards would train on crops several times larger
    than it is built for (224 px: 7x CIFAR's 32, 49x the FLOPs, a 3x3 pool5 averaged down
    from 24x24): almost surely a mistake, so it needs CIFAR-sized data."""
    resize = int(manifest.get("preprocess", {}).get("resize", 0))
    limit = 2 * 32
    if cfg.model.variant == "cifar" and (cfg.data.crop > limit or resize > limit):
        raise TrainError(f"--variant cifar is built for 32x32 images, but --crop is "
                         f"{cfg.data.crop} on {resize}-px shards: preprocess the data with "
                         "--resize 32 (CIFAR's own size) and train with --crop 32, or use "
                         "--variant paper or torchvision for large images")


def _cluster_tags(cfg: config.TrainConfig) -> dict[str, str]:
    import ray

    resources = ray.cluster_resources()
    return {"ray.nodes": str(sum(1 for n in ray.nodes() if n.get("Alive"))),
            "ray.cluster_cpus": str(int(resources.get("CPU", 0))),
            "ray.cluster_gpus": str(int(resources.get("GPU", 0))),
            "ray.train_workers": str(cfg.run.workers)}


def _log_start(cfg: config.TrainConfig, manifest: dict, split_counts: dict, digest: str) -> dict:
    """What a new run logs before training: params, tags, dataset input, artifacts (config,
    class index, manifest, a grid of augmented training crops). Returns the artifact paths."""
    import cv2
    import mlflow

    from pipelines.data.shards import split_readers
    from pipelines.train.ingest import augmented_samples

    mlflow.log_params(config.flatten(cfg))
    dataset, tags = tracking.dataset_input(cfg.data.data, Path(cfg.data.data).name, digest,
                                           cfg.data.crop, split_counts)
    mlflow.log_input(dataset, context="training", tags=tags)
    samples = augmented_samples(split_readers(cfg.data.data, manifest, cfg.data.train_split),
                                manifest["stats"], cfg.data.crop, n=16, seed=cfg.run.seed,
                                alphastd=cfg.data.pca_alphastd)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(config.to_yaml(cfg))
        (Path(tmp) / "classes.json").write_text(json.dumps(manifest["classes"]))
        grid = tracking.image_grid(samples, columns=8)
        cv2.imwrite(str(Path(tmp) / "augmented_train_samples.png"), grid[:, :, ::-1])
        mlflow.log_artifacts(tmp)
    mlflow.log_artifact(str(Path(cfg.data.data) / "manifest.json"), "dataset")
    return {"samples": samples.shape[0],
            "artifacts": ["config.yaml", "classes.json", "augmented_train_samples.png",
                          "dataset/manifest.json"]}


def _start_tracking(cfg: config.TrainConfig, fs, run_dir: str, name: str, digest: str):
    """The one place where an unreachable MLflow stops the job: set the experiment and open
    (or reopen, on --resume) the run, before any worker starts. Returns (uri, run)."""
    import mlflow

    uri = abs_tracking_uri(tracking.tracking_uri())
    try:
        tracking.setup_mlflow()
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(cfg.tracking.experiment)
        run_id = read_text(fs, f"{run_dir}/{RUN_ID_FILE}").strip() if cfg.run.resume else None
        if run_id:
            started_on = mlflow.MlflowClient().get_run(run_id).data.tags.get(
                "dataset.manifest_sha256")
            if started_on and started_on != digest:
                raise TrainError(f"--resume {name}: the run started on dataset "
                                 f"{started_on[:12]}, {cfg.data.data} is now {digest[:12]}; "
                                 "resume with the same data or start a new run")
        # System metrics (CPU, memory, disk, network, GPU) of the driver's node; the workers
        # on other nodes log theirs under system/node<N>/ (see train_loop._node_monitor).
        return uri, mlflow.start_run(run_id=run_id, run_name=None if run_id else name,
                                     log_system_metrics=True)
    except TrainError:
        raise
    except Exception as exc:  # noqa: BLE001 - any tracking failure here is the user's to fix
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TrainError(f"MLflow at {uri} cannot start the run ({first}); start the "
                         "server or set MLFLOW_TRACKING_URI, then run the same command "
                         "again") from None


def run_train(cfg: config.TrainConfig) -> dict:
    """Train, then log + register the best checkpoint; returns a summary (also printed)."""
    import mlflow
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train.loop import CHAOS_ENV, train_loop_per_worker
    from pipelines.train.progress import EpochProgress

    manifest, split_counts = check_config(cfg)
    digest = manifest_digest(cfg.data.data)
    start = None if cfg.run.resume else prepare_start(cfg, manifest)
    fs, root = storage_filesystem(cfg.run.storage)
    if "://" not in cfg.run.storage:
        cfg.run.storage = root
    asked = cfg.run.name
    name = resolve_run(cfg, fs, root)
    if name != asked:
        print(f"note: a run {asked!r} exists in {cfg.run.storage}; this new one is {name!r} "
              f"(to continue {asked!r} instead: `python workflow.py train --resume --name "
              f"{asked}`)", file=sys.stderr)
    run_dir = f"{root}/{name}"
    print(f"run {name}: checkpoints and metrics journal in {cfg.run.storage.rstrip('/')}/{name}",
          flush=True)

    # Resources first (a run the cluster cannot place is refused or announced), then the
    # MLflow run; both before any worker starts.
    try:
        _check_resources(cfg, local=init_ray(log_to_driver=True))
        uri, run = _start_tracking(cfg, fs, run_dir, name, digest)
    except BaseException:
        if not cfg.run.resume:
            release_name(fs, run_dir)
        raise
    run_id = run.info.run_id
    write_text(fs, f"{run_dir}/{RUN_ID_FILE}", run_id)
    write_text(fs, f"{run_dir}/{RUN_CONFIG_FILE}", config.to_yaml(cfg))
    try:
        if start is not None:
            _write_start(fs, run_dir, start)
            print(f"init from {start['record']['resolved']}: "
                  f"{'; '.join(start['record']['notes'])}", flush=True)
        init = json.loads(read_text(fs, f"{run_dir}/{INIT_FROM_FILE}")) \
            if exists(fs, f"{run_dir}/{INIT_FROM_FILE}") else None
        tags = {"dataset.manifest_sha256": digest, "ray.run_name": name,
                "checkpoints": f"{cfg.run.storage.rstrip('/')}/{name}"
                if "://" in cfg.run.storage else run_dir,
                **tracking.git_commit(ROOT), **_cluster_tags(cfg)}
        if init:
            tags.update({"init_from": init["ref"], "init_from.resolved": init["resolved"],
                         "init_from.notes": "; ".join(init["notes"])})
        if cfg.tracking.description:  # MLflow shows this tag as the run's description
            tags["mlflow.note.content"] = cfg.tracking.description
        mlflow.set_tags(tags)
        if cfg.run.resume:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            mlflow.log_text(config.to_yaml(cfg), f"resumes/config-{stamp}.yaml")
            logged = {"artifacts": []}
        else:
            logged = _log_start(cfg, manifest, split_counts, digest)

        chaos = os.environ.get(CHAOS_ENV)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": config.to_dict(cfg), "run_id": run_id, "tracking_uri": uri,
                               "driver_node_id": ray.get_runtime_context().get_node_id(),
                               "init_weights": f"{run_dir}/{INIT_WEIGHTS_FILE}" if init else None,
                               "init_stats": init["stats"] if init else None,
                               "chaos": json.loads(chaos) if chaos else None},
            torch_config=TorchConfig(backend="nccl" if cfg.run.gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.run.workers, use_gpu=cfg.run.gpu,
                                         resources_per_worker={"CPU": cfg.run.cpus_per_worker},
                                         placement_strategy=cfg.run.placement_strategy),
            run_config=RunConfig(
                name=name, storage_path=root, storage_filesystem=fs,
                callbacks=[EpochProgress(cfg.run.epochs)],  # a line per epoch (progress.py)
                failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                # Keep the two best and (always, by Ray's rule) the latest checkpoint.
                checkpoint_config=CheckpointConfig(num_to_keep=2,
                                                   checkpoint_score_attribute="checkpoint_score",
                                                   checkpoint_score_order="min")))
        result = _fit(trainer)
        epochs_run = (result.metrics or {}).get("epoch", -1) + 1
    except KeyboardInterrupt:
        # Ctrl-C: the run is stopped, not failed; its checkpoints are there to resume from.
        end_run_quietly("KILLED")
        raise TrainInterrupted(name, cfg.run.storage, run_id) from None
    except BaseException as exc:
        end_run_quietly("FAILED")
        storage_error = storage_failure(exc)
        if storage_error:
            kept = sorted((e, p) for e, p in kept_checkpoints(fs, run_dir).items() if intact(fs, p))
            last = f"the last checkpoint ({kept[-1][1]}, epoch {kept[-1][0]}) is intact" \
                if kept else "no checkpoint had been written yet"
            raise TrainError(
                f"writing a checkpoint to {cfg.run.storage} kept failing ({storage_error}; "
                f"{cfg.run.max_failures + 1} attempts, Ray restarting the workers between "
                f"them); {last}: make room or fix the storage, then continue with `python "
                f"workflow.py train --resume --name {name}`") from None
        raise
    tags = {}
    if epochs_run < cfg.run.epochs and cfg.optim.early_stop_patience:
        # The loop stops only for this (a stopped or failed run raises): say so.
        tags["stopped_early"] = (f"no better val score in {cfg.optim.early_stop_patience} "
                                 f"epochs (--early-stop-patience)")
    summary = finish_run(cfg, fs, run_dir, run_id, uri, manifest["classes"],
                         cfg.tracking.retry_minutes * 60, tags)
    summary.update({"epochs_run": epochs_run, "epochs": cfg.run.epochs,
                    "artifacts": logged["artifacts"] + summary["artifacts"]})
    return summary
