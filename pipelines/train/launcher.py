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

import contextlib
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from pipelines import config as C
from pipelines.data.shards import manifest_digest, read_manifest
from pipelines.runtime import init_ray
from pipelines.train import tracking

ROOT = Path(__file__).resolve().parents[2]
# What a logged MLflow model carries of this project (its code_paths): the model and the
# serving path, not Ray, training or preprocessing.
SERVING_CODE = ("pipelines/__init__.py", "pipelines/serve/__init__.py",
                "pipelines/serve/bundle.py", "pipelines/serve/pyfunc_model.py",
                "pipelines/data/__init__.py", "pipelines/data/decode.py")


class TrainError(RuntimeError):
    """Training cannot start; the message says why and what to do."""


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: which run stopped, and the command that continues it."""

    def __init__(self, name: str, storage: str, run_id: str):
        super().__init__(name)
        self.name, self.storage, self.run_id = name, storage, run_id

    def __str__(self) -> str:
        storage = "" if self.storage == "checkpoints" or \
            Path(self.storage) == Path("checkpoints").resolve() else f" --storage {self.storage}"
        return (f"run {self.name} stopped (MLflow run {self.run_id} marked KILLED); continue "
                f"it from its last checkpoint with `python workflow.py train --resume "
                f"--name {self.name}{storage}`")


def _check_resources(cfg: C.TrainConfig, local: bool) -> None:
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


def apply_variant_defaults(cfg: C.TrainConfig, given: set[str]) -> C.TrainConfig:
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


# Files the launcher keeps beside Ray Train's own under STORAGE/NAME: the MLflow run id (for
# --resume and restarts) and the config the run was (last) launched with.
RUN_ID_FILE = "mlflow_run_id"
RUN_CONFIG_FILE = "train_config.yaml"
CLAIM_FILE = ".claimed"  # created exclusively by the one job that owns STORAGE/NAME
# --init-from: the fitted start weights every worker loads, and where they came from.
INIT_WEIGHTS_FILE, INIT_FROM_FILE = "init_weights.pt", "init_from.json"


def _abs_tracking_uri(uri: str) -> str:
    """Workers run in other directories: make a relative sqlite path absolute."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def storage_filesystem(storage: str):
    """(pyarrow filesystem, path) for `--storage`: a local path (made absolute), or any URI
    pyarrow resolves (`s3://bucket/dir`, `gs://...`, `hdfs://...`, `file:///...`; S3 options
    go in the query string, e.g. `s3://bucket/dir?endpoint_override=minio:9000`). The
    filesystem is passed to Ray Train as `storage_filesystem`, so the launcher and the
    workers read and write checkpoints through the same object and credentials."""
    import pyarrow.fs as pafs

    if "://" not in storage:
        return pafs.LocalFileSystem(), str(Path(storage).resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(storage)
    except (ValueError, OSError, ImportError) as exc:
        raise TrainError(f"--storage {storage}: pyarrow cannot open it ({exc})") from exc
    return fs, path.rstrip("/")


def _exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(fs, path: str) -> str:
    with fs.open_input_stream(path) as fh:
        return fh.read().decode()


def write_text(fs, path: str, text: str) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as fh:
        fh.write(text.encode())


def stored_config(storage: str, name: str) -> str | None:
    """The YAML of the config run NAME was launched with (what `--resume` starts from), or
    None when there is no such run."""
    fs, root = storage_filesystem(storage)
    path = f"{root}/{name}/{RUN_CONFIG_FILE}"
    return read_text(fs, path) if _exists(fs, path) else None


def resolve_run(cfg: C.TrainConfig, fs, root: str) -> str:
    """Pick the run name and check resume/new against what storage holds."""
    import pyarrow.fs as pafs

    exists = _exists(fs, f"{root}/{cfg.run.name}/{RUN_ID_FILE}")
    if cfg.run.resume and not exists:
        found = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root,
                                                                          allow_not_found=True))
                 if _exists(fs, f"{i.path}/{RUN_ID_FILE}")]
        raise TrainError(f"--resume: no run {cfg.run.name!r} in {cfg.run.storage}; runs "
                         f"there: {sorted(found)}")
    if not cfg.run.resume:
        # Ray Train would silently resume a run whose name and storage are reused: a new
        # training gets a new name instead, claimed atomically (two jobs started together
        # with one --name get two names).
        base, stamp = cfg.run.name, dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        candidates = [base, f"{base}-{stamp}", *(f"{base}-{stamp}-{i}" for i in range(2, 100))]
        for candidate in candidates:
            if not _exists(fs, f"{root}/{candidate}/{RUN_ID_FILE}") and \
                    _claim_name(fs, root, candidate):
                cfg.run.name = candidate
                break
        else:
            raise TrainError(f"no free run name for {base!r} in {cfg.run.storage}")
    return cfg.run.name


def check_config(cfg: C.TrainConfig) -> tuple[dict, dict]:
    """Every check that can fail before a worker starts: flags, manifest, shards. Returns
    (manifest, {split: {records, shards}})."""
    from alexnet import INPUT_SIZE, check_variant, min_input_size
    from pipelines.train.ingest import DatasetMismatch, check_dataset

    C.resolve_auto(cfg)
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
        found = check_dataset(cfg.data.data, manifest, cfg.data.train_split,
                              cfg.data.val_split, cfg.data.crop)
    except DatasetMismatch as exc:
        raise TrainError(str(exc)) from exc
    _check_cifar_scale(cfg, manifest)
    return manifest, found


def prepare_start(cfg: C.TrainConfig, manifest: dict) -> dict | None:
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


def _check_cifar_scale(cfg: C.TrainConfig, manifest: dict) -> None:
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

    from pipelines.serve.bundle import INFERENCE, WEIGHTS, load_info

    info = load_info(bundle_dir)
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


def log_and_register(bundle_dir: str, cfg: C.TrainConfig, val_error: float | None,
                     train_loss: float | None = None, run_id: str | None = None,
                     epoch: int | None = None) -> dict:
    """Log the bundle as an MLflow pyfunc model (models from code) in the active run and
    register it; move alias `champion` only when it beats the current champion
    (`tracking.promote`). A checkpoint (run, epoch) already registered is not registered
    again: its version is returned with `"already_registered": True`."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.serve.bundle import load_info

    client, name = MlflowClient(), cfg.tracking.registered_model
    if run_id is not None and epoch is not None:
        done = registered_version(client, name, run_id, epoch)
        if done is not None:
            aliases = sorted(getattr(done, "aliases", []) or [])
            return {"model_uri": f"models:/{name}/{done.version}", "name": name,
                    "version": int(done.version), "alias": ",".join(aliases) or None,
                    "already_registered": True}
    model_info = log_bundle_model(bundle_dir)
    info = load_info(bundle_dir)
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


def _cluster_tags(cfg: C.TrainConfig) -> dict[str, str]:
    import ray

    resources = ray.cluster_resources()
    return {"ray.nodes": str(sum(1 for n in ray.nodes() if n.get("Alive"))),
            "ray.cluster_cpus": str(int(resources.get("CPU", 0))),
            "ray.cluster_gpus": str(int(resources.get("GPU", 0))),
            "ray.train_workers": str(cfg.run.workers)}


def _log_start(cfg: C.TrainConfig, manifest: dict, found: dict, digest: str) -> dict:
    """What a new run logs before training: params, tags, dataset input, artifacts (config,
    class index, manifest, a grid of augmented training crops). Returns the artifact paths."""
    import cv2
    import mlflow

    from pipelines.data.shards import split_readers
    from pipelines.train.ingest import augmented_samples

    mlflow.log_params(C.flatten(cfg))
    dataset, tags = tracking.dataset_input(cfg.data.data, Path(cfg.data.data).name, digest,
                                           cfg.data.crop, found)
    mlflow.log_input(dataset, context="training", tags=tags)
    samples = augmented_samples(split_readers(cfg.data.data, manifest, cfg.data.train_split),
                                manifest["stats"], cfg.data.crop, n=16, seed=cfg.run.seed,
                                alphastd=cfg.data.pca_alphastd)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(C.to_yaml(cfg))
        (Path(tmp) / "classes.json").write_text(json.dumps(manifest["classes"]))
        grid = tracking.image_grid(samples, columns=8)
        cv2.imwrite(str(Path(tmp) / "augmented_train_samples.png"), grid[:, :, ::-1])
        mlflow.log_artifacts(tmp)
    mlflow.log_artifact(str(Path(cfg.data.data) / "manifest.json"), "dataset")
    return {"samples": samples.shape[0],
            "artifacts": ["config.yaml", "classes.json", "augmented_train_samples.png",
                          "dataset/manifest.json"]}


def _log_confusion(ckpt_dir: str, classes: list[dict]) -> list[str]:
    """The best checkpoint's val confusion matrix: PNG + the top confusions as a table."""
    import mlflow

    from pipelines.train.loop import read_confusion

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


def _claim_name(fs, root: str, name: str) -> bool:
    """Claim STORAGE/NAME for a new run: True if this process got it. On a local or mounted
    filesystem the claim is an exclusive create (O_EXCL), so two jobs started together with
    the same --name cannot both win; object stores have no such primitive and fall back to
    checking for an existing run."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        Path(root, name).mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(Path(root, name, CLAIM_FILE), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True
    return not _exists(fs, f"{root}/{name}/{RUN_ID_FILE}")


# What a failed checkpoint write looks like in a worker's error, whatever the filesystem.
_STORAGE_ERRORS = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                   "Errno 28", "Errno 122", "Errno 30")


def _storage_failure(exc: BaseException) -> str | None:
    """The storage error behind a failed training, if that is what failed it: the first
    matching line of the exception chain (Ray wraps the worker's error in its own)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        for line in str(e).splitlines():
            if any(m in line for m in _STORAGE_ERRORS):
                return line.strip()[:300]
        todo += [e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
    return None


def _release_name(fs, run_dir: str) -> None:
    """Give back a claimed name whose run never started (a pre-flight error), so the next
    try gets it rather than a timestamped one."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem) and not _exists(fs, f"{run_dir}/{RUN_ID_FILE}"):
        Path(run_dir, CLAIM_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            Path(run_dir).rmdir()


def _start_tracking(cfg: C.TrainConfig, fs, run_dir: str, name: str, digest: str):
    """The one place where an unreachable MLflow stops the job: set the experiment and open
    (or reopen, on --resume) the run, before any worker starts. Returns (uri, run)."""
    import mlflow

    uri = _abs_tracking_uri(tracking.tracking_uri())
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


def run_train(cfg: C.TrainConfig) -> dict:
    """Train, then log + register the best checkpoint; returns a summary (also printed)."""
    import mlflow
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train.loop import CHAOS_ENV, train_loop_per_worker
    from pipelines.train.progress import EpochProgress

    manifest, found = check_config(cfg)
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
            _release_name(fs, run_dir)
        raise
    run_id = run.info.run_id
    write_text(fs, f"{run_dir}/{RUN_ID_FILE}", run_id)
    write_text(fs, f"{run_dir}/{RUN_CONFIG_FILE}", C.to_yaml(cfg))
    try:
        if start is not None:
            _write_start(fs, run_dir, start)
            print(f"init from {start['record']['resolved']}: "
                  f"{'; '.join(start['record']['notes'])}", flush=True)
        init = json.loads(read_text(fs, f"{run_dir}/{INIT_FROM_FILE}")) \
            if _exists(fs, f"{run_dir}/{INIT_FROM_FILE}") else None
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
            mlflow.log_text(C.to_yaml(cfg), f"resumes/config-{stamp}.yaml")
            logged = {"artifacts": []}
        else:
            logged = _log_start(cfg, manifest, found, digest)

        chaos = os.environ.get(CHAOS_ENV)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": C.to_dict(cfg), "run_id": run_id, "tracking_uri": uri,
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
        _end_run_quietly("KILLED")
        raise TrainInterrupted(name, cfg.run.storage, run_id) from None
    except BaseException as exc:
        _end_run_quietly("FAILED")
        storage_error = _storage_failure(exc)
        if storage_error:
            kept = sorted((e, p) for e, p in _checkpoints(fs, run_dir).items() if _intact(fs, p))
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


def _end_run_quietly(status: str) -> None:
    import mlflow

    try:
        mlflow.end_run(status)
    except Exception:  # noqa: BLE001 - the run's status is a side channel
        pass


class TrackingPending(RuntimeError):
    """Training finished and its checkpoints are safe, but MLflow did not answer in time:
    the run's metrics, model and aliases wait for `workflow.py register --run`."""

    exit_status = 3


def _checkpoints(fs, run_dir: str) -> dict[int, str]:
    """{epoch: path} of the checkpoints Ray Train kept under STORAGE/NAME."""
    import pyarrow.fs as pafs

    found = {}
    for item in fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True)):
        if item.type == pafs.FileType.Directory and item.base_name.startswith("checkpoint_"):
            path = f"{item.path}/inference.json"
            if _exists(fs, path):
                found[int(json.loads(read_text(fs, path))["epoch"])] = item.path
    return found


def _intact(fs, path: str) -> bool:
    """Whether a checkpoint's tensors all load (a write that failed half-way leaves a
    truncated file behind). Reads the whole checkpoint: for error paths only."""
    import io

    import torch

    try:
        for name in ("weights.pt", "state.pt"):
            with fs.open_input_stream(f"{path}/{name}") as fh:
                torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - missing, truncated or unreadable: not intact
        return False
    return True


def best_checkpoint(fs, run_dir: str, epochs: dict[int, dict]) -> tuple[int, str]:
    """(epoch, path) of the kept checkpoint with the best score in the journal; ties go to
    the earlier epoch, as early stopping counts them."""
    kept = {e: p for e, p in _checkpoints(fs, run_dir).items() if "score" in epochs.get(e, {})}
    if not kept:
        raise TrainError(f"{run_dir} holds no checkpoint with journalled metrics: nothing "
                         "to register (did the run train an epoch?)")
    epoch = min(kept, key=lambda e: (epochs[e]["score"], e))
    return epoch, kept[epoch]


def finish_run(cfg: C.TrainConfig, fs, run_dir: str, run_id: str, uri: str,
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
        _end_run_quietly("FINISHED")
        retry(lambda: mlflow.MlflowClient(uri).set_terminated(run_id, "FINISHED"), uri,
              max(left(), 30.0))
    except TrackingUnavailable as exc:
        _end_run_quietly("FINISHED")
        raise TrackingPending(f"{exc}. Training is done and its checkpoints are safe in "
                              f"{run_dir}; when MLflow is back, finish the run with: python "
                              f"workflow.py register --run {run_dir}") from None
    return summary


def run_register(run: str, cfg: C.TrainConfig | None = None) -> dict:
    """`workflow.py register --run STORAGE/NAME`: what the end of `train` does, for a run
    whose end could not reach MLflow. Idempotent: run twice, it registers once."""
    fs, run_dir = storage_filesystem(run)
    if not _exists(fs, f"{run_dir}/{RUN_ID_FILE}"):
        raise TrainError(f"{run}: not a training run directory (no {RUN_ID_FILE}); give "
                         "STORAGE/NAME as `train` printed it")
    run_id = read_text(fs, f"{run_dir}/{RUN_ID_FILE}").strip()
    if cfg is None:
        cfg = C.from_dict(C.TrainConfig, yaml.safe_load(read_text(fs,
                                                                   f"{run_dir}/{RUN_CONFIG_FILE}")))
    manifest = read_manifest(cfg.data.data)
    uri = _abs_tracking_uri(tracking.setup_mlflow())
    return finish_run(cfg, fs, run_dir, run_id, uri, manifest["classes"],
                      cfg.tracking.retry_minutes * 60)
