"""Training outlives its tracking server: real `workflow.py train` jobs against a real
`mlflow server` on 127.0.0.1 that is killed mid-training.

1. The server dies after the first epoch and comes back 60 s later on the same backend, and
   a worker is SIGKILLed during the outage: training goes on at its epoch rate, Ray restarts
   the group from the checkpoint without MLflow, the job exits 0, the run is FINISHED,
   every epoch's metrics are there once, the model is registered.
2. The server never comes back: every epoch runs, the job exits 3 with one line saying the
   checkpoints are safe and how to finish; `register --run` after the server returns
   completes the run, and a second `register` registers nothing new.

    .venv/bin/python -m pytest -q tests/test_outage.py      # ~4 min
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from mlflow import MlflowClient

from pipelines import config

pytestmark = pytest.mark.slow
MLFLOW = Path(sys.executable).parent / "mlflow"


class Server:
    """`mlflow server` on 127.0.0.1 over a sqlite backend and a local artifact store."""

    def __init__(self, root: Path):
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'backend.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 300  # a loaded 2-core machine: imports take a while
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # poll, do not back off
            while time.monotonic() < deadline:
                try:
                    MlflowClient(self.uri, registry_uri=self.uri).search_experiments(max_results=1)
                    return
                except Exception:  # noqa: BLE001 - not up yet
                    time.sleep(0.5)
        raise RuntimeError((self.root / "server.log").read_text()[-3000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers
            self.proc.wait()


@pytest.fixture()
def server(tmp_path):
    srv = Server(tmp_path)
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    from pipelines.data.preprocess import run_preprocess
    from pipelines.data.sample import make_sample

    root = tmp_path_factory.mktemp("outage")
    make_sample(root / "src", classes=3, train_per_class=16, val_per_class=4, seed=5,
                min_side=40, max_side=64)
    run_preprocess(config.PreprocessConfig(source=str(root / "src"), out=str(root / "shards"),
                                      resize=36))
    return root / "shards"


def _train(shards, storage, uri, *extra, env=None):
    cmd = [sys.executable, str(REPO / "workflow.py"), "train", "--data", str(shards),
           "--variant", "cifar", "--crop", "32", "--batch-size", "8", "--workers", "2",
           "--loader-workers", "0", "--storage", str(storage), "--name", "outage",
           "--experiment", "outage", "--registered-model", "outage", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri,
                                 "RAY_ADDRESS": "", **(env or {})}, cwd=storage.parent)


def _journal(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics_journal.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_epochs(run_dir: Path, n: int, proc, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while sum(r["key"] == "epoch" for r in _journal(run_dir)) < n:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "training did not reach the epoch"
        time.sleep(0.5)


def _epochs(client, run_id, key="train_loss"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_a_tracking_outage_with_a_worker_killed_during_it(small_shards, server, tmp_path):
    storage = tmp_path / "ckpt"
    marker = tmp_path / "killed"
    chaos = json.dumps({"rank": 1, "epoch": 3, "step": 1, "marker": str(marker)})
    proc = _train(small_shards, storage, server.uri, "--epochs", "8",
                  env={"ALEXNET_CHAOS": chaos})
    run_dir = storage / "outage"
    _wait_epochs(run_dir, 1, proc)
    server.kill()
    down_at = time.monotonic()
    _wait_epochs(run_dir, 5, proc)  # past the chaos kill at epoch 3, still without MLflow
    during = time.monotonic() - down_at
    time.sleep(max(0.0, 60 - (time.monotonic() - down_at)))
    server.start()
    back_at, client = time.monotonic(), MlflowClient(server.uri, registry_uri=server.uri)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    while len(_epochs(client, run_id)) < 8 and proc.poll() is None:
        time.sleep(0.5)
    backfill = time.monotonic() - back_at
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert marker.is_file()  # the worker really was killed during the outage
    journal = _journal(run_dir)
    epochs = [r["step"] for r in journal if r["key"] == "epoch"]
    assert epochs == list(range(8))  # each epoch once, in order
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_top1_error", "lr", "epoch_seconds"):
        assert _epochs(client, run_id, key) == list(range(8)), key
    # One restart, from the last checkpoint Ray had committed when the worker died (the
    # epoch-2 report may still be in flight at the kill in epoch 3's first steps).
    restores = [m.step for m in client.get_metric_history(run_id, "restored_at_epoch")]
    assert len(restores) == 1 and restores[0] in (2, 3), restores
    versions = client.search_model_versions("name='outage'")
    assert len(versions) == 1 and client.get_model_version_by_alias("outage", "champion")
    seconds = [r["metrics"]["epoch_seconds"] for r in journal if r["key"] == "epoch"]
    print(f"\nepoch seconds {[round(x, 2) for x in seconds]} (server down from epoch 1 on; "
          f"epochs 1-4 within {during:.0f} s of it going down); history complete "
          f"{backfill:.1f} s after the server was back")


def test_a_server_that_never_returns_then_register(small_shards, server, tmp_path):
    storage = tmp_path / "ckpt"
    proc = _train(small_shards, storage, server.uri, "--epochs", "3", "--retry-minutes", "0.2")
    run_dir = storage / "outage"
    _wait_epochs(run_dir, 1, proc)
    server.kill()
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 3, out[-4000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"tracking pending: MLflow at {server.uri} did not answer for 12 s")
    assert f"checkpoints are safe in {run_dir}" in last
    assert last.endswith(f"python workflow.py register --run {run_dir}")
    # (Ray's PlacementGroupCleaner prints one when another Ray runs on the machine.)
    assert "Traceback" not in "\n".join(line for line in out.splitlines()
                                        if "PlacementGroupCleaner" not in line)
    assert [r["step"] for r in _journal(run_dir) if r["key"] == "epoch"] == [0, 1, 2]

    server.start()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    for attempt in range(2):  # idempotent: the second registers nothing new
        done = subprocess.run([sys.executable, str(REPO / "workflow.py"), "register", "--run",
                               str(run_dir), "--json"], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        summary = json.loads(done.stdout[done.stdout.index("{\n"):])  # after MLflow's links
        assert summary["registered"]["version"] == 1
        assert summary["registered"].get("already_registered", False) == (attempt == 1)
    client = MlflowClient(server.uri, registry_uri=server.uri)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _epochs(client, run_id) == [0, 1, 2]
    assert len(client.search_model_versions("name='outage'")) == 1
    assert client.get_model_version_by_alias("outage", "champion").version in (1, "1")


def test_two_trainings_at_once_on_one_fresh_sqlite_store(small_shards, tmp_path):
    """Two `train` jobs with the same --name on a store that does not exist yet, while a
    reader polls it as `mlflow ui` would: both finish under two names, two versions, and
    `champion` is on the better one."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ckpt"
    reader = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom mlflow import MlflowClient\nend = time.time() + 90\n"
        "while time.time() < end:\n    try:\n"
        f"        MlflowClient({uri!r}).search_runs(['0', '1', '2'])\n"
        "    except Exception:\n        pass\n    time.sleep(0.5)\n")])
    jobs = [_train(small_shards, storage, uri, "--epochs", str(epochs), "--seed", str(seed))
            for epochs, seed in ((2, 0), (3, 1))]
    outs = [job.communicate(timeout=900)[0] for job in jobs]
    reader.kill()
    for job, out in zip(jobs, outs, strict=True):
        assert job.returncode == 0, out[-4000:]
    names = sorted(p.name for p in storage.iterdir())
    assert len(names) == 2 and names[0] == "outage" and names[1].startswith("outage-"), names
    client = MlflowClient(uri, registry_uri=uri)
    versions = client.search_model_versions("name='outage'")
    assert len(versions) == 2
    best = min(versions, key=lambda v: (float(v.tags["val_top1_error"]), int(v.version)))
    errors = sorted(float(v.tags["val_top1_error"]) for v in versions)
    champion = client.get_model_version_by_alias("outage", "champion")
    assert float(champion.tags["val_top1_error"]) == errors[0], (best.version, errors)
    locked = sum(out.count("database is locked") for out in outs)
    print(f"\ntwo trainings on one fresh sqlite store: val errors {errors}, champion "
          f"v{champion.version}; 'database is locked' seen {locked} times in their output")


def test_checkpoint_storage_that_fills_up_stops_cleanly(small_shards, tmp_path, small_tmpfs):
    """A real full filesystem under --storage (a 70 MB tmpfs: one cifar checkpoint of ~47 MB
    fits, the second does not): Ray retries the epoch (--max-failures 1), then the job
    stops with one line, exit 2, and the first checkpoint loads."""
    import torch

    mnt = small_tmpfs("70m")
    proc = _train(small_shards, mnt, f"sqlite:///{tmp_path / 'mlflow.db'}", "--epochs",
                  "3", "--max-failures", "1")
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 2, out[-4000:]
    # Ray's own log lines of the failure may arrive after ours: find ours.
    last = next(line for line in out.splitlines() if line.startswith("error: "))
    assert last.startswith(f"error: writing a checkpoint to {mnt} kept failing (")
    assert "No space left on device" in last and "2 attempts" in last
    assert "is intact: make room or fix the storage, then continue with `python " \
           "workflow.py train --resume --name outage`" in last
    named = re.search(r"the last checkpoint \((\S+), epoch (\d+)\) is intact", last)
    assert named and int(named.group(2)) == 0, last
    for fname in ("weights.pt", "state.pt"):  # the one it names loads
        torch.load(Path(named.group(1)) / fname, weights_only=True)
