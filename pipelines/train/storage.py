"""A training run's storage, STORAGE/NAME on any pyarrow filesystem (a local path, s3://, gs://,
...): the files the launcher keeps beside Ray Train's checkpoints, the run-name claim, the
checkpoints kept and whether they are intact, and what a storage failure looks like.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from pathlib import Path

from pipelines import config
from pipelines.files import exists, filesystem, read_text
from pipelines.serve.bundle import INFERENCE
from pipelines.train.errors import TrainError

# Files the launcher keeps beside Ray Train's own under STORAGE/NAME: the MLflow run id (for
# --resume and restarts) and the config the run was (last) launched with.
RUN_ID_FILE = "mlflow_run_id"
RUN_CONFIG_FILE = "train_config.yaml"
CLAIM_FILE = ".claimed"  # created exclusively by the one job that owns STORAGE/NAME

# --init-from: the fitted start weights every worker loads, and where they came from.
INIT_WEIGHTS_FILE, INIT_FROM_FILE = "init_weights.pt", "init_from.json"


def storage_filesystem(storage: str):
    """(pyarrow filesystem, path) for `--storage`: a local path (made absolute), or any URI
    pyarrow resolves (`s3://bucket/dir`, `gs://...`, `hdfs://...`, `file:///...`; S3 options
    go in the query string, e.g. `s3://bucket/dir?endpoint_override=minio:9000`). The
    filesystem is passed to Ray Train as `storage_filesystem`, so the launcher and the
    workers read and write checkpoints through the same object and credentials."""
    try:
        return filesystem(storage)
    except (ValueError, OSError, ImportError) as exc:
        raise TrainError(f"--storage {storage}: pyarrow cannot open it ({exc})") from exc


def stored_config(storage: str, name: str) -> str | None:
    """The YAML of the config run NAME was launched with (what `--resume` starts from), or
    None when there is no such run."""
    fs, root = storage_filesystem(storage)
    path = f"{root}/{name}/{RUN_CONFIG_FILE}"
    return read_text(fs, path) if exists(fs, path) else None


def resolve_run(cfg: config.TrainConfig, fs, root: str) -> str:
    """Pick the run name and check resume/new against what storage holds."""
    import pyarrow.fs as pafs

    if cfg.run.resume and not exists(fs, f"{root}/{cfg.run.name}/{RUN_ID_FILE}"):
        runs = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root,
                                                                         allow_not_found=True))
                if exists(fs, f"{i.path}/{RUN_ID_FILE}")]
        raise TrainError(f"--resume: no run {cfg.run.name!r} in {cfg.run.storage}; runs "
                         f"there: {sorted(runs)}")
    if not cfg.run.resume:
        # Ray Train would silently resume a run whose name and storage are reused: a new
        # training gets a new name instead, claimed atomically (two jobs started together
        # with one --name get two names).
        base, stamp = cfg.run.name, dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        candidates = [base, f"{base}-{stamp}", *(f"{base}-{stamp}-{i}" for i in range(2, 100))]
        for candidate in candidates:
            if not exists(fs, f"{root}/{candidate}/{RUN_ID_FILE}") and \
                    claim_name(fs, root, candidate):
                cfg.run.name = candidate
                break
        else:
            raise TrainError(f"no free run name for {base!r} in {cfg.run.storage}")
    return cfg.run.name


def claim_name(fs, root: str, name: str) -> bool:
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
    return not exists(fs, f"{root}/{name}/{RUN_ID_FILE}")

# What a failed checkpoint write looks like in a worker's error, whatever the filesystem.
STORAGE_ERRORS = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                   "Errno 28", "Errno 122", "Errno 30")


def storage_failure(exc: BaseException) -> str | None:
    """The storage error behind a failed training, if that is what failed it: the first
    matching line of the exception chain (Ray wraps the worker's error in its own)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        for line in str(e).splitlines():
            if any(m in line for m in STORAGE_ERRORS):
                return line.strip()[:300]
        todo += [e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
    return None


def release_name(fs, run_dir: str) -> None:
    """Give back a claimed name whose run never started (a pre-flight error), so the next
    try gets it rather than a timestamped one."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem) and not exists(fs, f"{run_dir}/{RUN_ID_FILE}"):
        Path(run_dir, CLAIM_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            Path(run_dir).rmdir()


def kept_checkpoints(fs, run_dir: str) -> dict[int, str]:
    """{epoch: path} of the checkpoints Ray Train kept under STORAGE/NAME."""
    import pyarrow.fs as pafs

    by_epoch = {}
    for item in fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True)):
        if item.type == pafs.FileType.Directory and item.base_name.startswith("checkpoint_"):
            path = f"{item.path}/{INFERENCE}"
            if exists(fs, path):
                by_epoch[int(json.loads(read_text(fs, path))["epoch"])] = item.path
    return by_epoch


def intact(fs, path: str) -> bool:
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
