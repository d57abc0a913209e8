"""Shared fixtures: a real local Ray, a real sqlite MLflow, real generated JPEG datasets."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
# The shared ImageNet sample sits beside a developer's or CI's checkout; a user's clone has none.
IMAGENET_SAMPLE = Path(os.environ.get("IMAGENET_SAMPLE",
                                      REPO.parent / "shared" / "data" / "imagenet-sample"))


def register_bundle(bundle: Path, name: str, val_error: float) -> SimpleNamespace:
    """Log + register a bundle exactly as training does, inside a real MLflow run (at
    MLFLOW_TRACKING_URI); the first version of `name` becomes its champion."""
    import mlflow

    from pipelines import config
    from pipelines.train.registry import log_and_register
    from pipelines.train.tracking import setup_mlflow

    setup_mlflow()
    mlflow.set_experiment("alexnet")
    cfg = config.TrainConfig()
    cfg.tracking.registered_model = name
    with mlflow.start_run() as run:
        reg = log_and_register(str(bundle), cfg, val_error)
    return SimpleNamespace(run_id=run.info.run_id, version=str(reg["version"]), bundle=bundle)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session (4 logical CPUs: 2 train workers + data tasks)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store in a temp dir, used through MLFLOW_TRACKING_URI."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the default artifact root (./mlruns) lands in the temp dir
    # A job run earlier in this process (run_train, batch-infer) set MLflow's process-wide
    # URIs; a client made with only a tracking URI would take that stale registry.
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    """4 classes x 10 train + 3 val real JPEGs in the ImageNet layout (flat val + CSV)."""
    from pipelines.data.sample import make_sample

    root = tmp_path_factory.mktemp("tiny") / "src"
    make_sample(root, classes=4, train_per_class=10, val_per_class=3, seed=1,
                min_side=64, max_side=120)
    return root


@pytest.fixture()
def imagenet_sample():
    if not (IMAGENET_SAMPLE / "train").is_dir():
        pytest.skip(f"ImageNet sample not found at {IMAGENET_SAMPLE}")
    return IMAGENET_SAMPLE


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A tmpfs of a given size mounted in the test's temp dir, unmounted after: a real full
    disk. `small_tmpfs("70m")` returns its path; skipped without root and mount."""
    import subprocess

    mounted = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"tmpfs-{size}"
        mnt.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}",
                                                "tmpfs", str(mnt)],
                                               capture_output=True).returncode:
            pytest.skip("cannot mount a small tmpfs here (needs root)")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:  # lazily: a process the test started may still hold a file there
        subprocess.run(["umount", "-l", str(mnt)], check=False)
