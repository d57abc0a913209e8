"""From laptop to cluster, on one machine with real processes:

- `python -m cluster up` starts a real MLflow tracking server (sqlite backend, proxied
  artifacts) and a real Ray head plus a second raylet, each with its own ports and temp dir;
  the three workflow commands run as Ray jobs submitted through the Jobs API, training with
  2 DDP workers placed on different nodes (STRICT_SPREAD); the run and the registered model
  are checked in the tracking server; `python -m cluster down` stops everything by process
  session, never with `ray stop` (which would kill other people's Ray on this machine).
- A node is lost mid-training (its raylet SIGKILLed) and a replacement joins: the job
  finishes with every epoch logged exactly once in the same MLflow run.
- Fast checks: the working-dir upload leaves data/venvs/runs out; process sessions are
  stopped without touching anything else; the per-node shard cache.

    .venv/bin/python -m pytest -q tests/test_cluster.py              # all (about 6 min)
    .venv/bin/python -m pytest -q tests/test_cluster.py -m "not slow"  # the fast ones
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from cluster import local, processes, services
from pipelines.runtime import free_port

REPO = Path(__file__).resolve().parent.parent
JOB_TIMEOUT = 900  # s; a job past this is stopped and the test fails (2 shared cores)
TRAIN_FLAGS = ("--variant cifar --crop 32 --batch-size 8 --lr 0.02 --loader-workers 0 "
               "--init default --workers 2 --placement-strategy STRICT_SPREAD")


# --------------------------------------------------------------------------- helpers
def cluster_cli(state_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The documented command line: `python -m cluster --dir STATE ...`."""
    return subprocess.run([sys.executable, "-m", "cluster", "--dir", str(state_dir), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def runtime_env(mlflow_uri: str) -> dict:
    """cluster/runtime_env.yaml as shipped, pointed at this test's tracking server."""
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env["working_dir"] = str(REPO)
    env["env_vars"]["MLFLOW_TRACKING_URI"] = mlflow_uri
    return env


def wait_job(client, job_id: str, timeout: float = JOB_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(2)
    client.stop_job(job_id)
    pytest.fail(f"job {job_id} still running after {timeout} s; log tail:\n"
                f"{client.get_job_logs(job_id)[-3000:]}")


def run_job(client, entrypoint: str, mlflow_uri: str) -> tuple[str, str]:
    """Submit, wait, and insist on SUCCEEDED; returns (submission id, logs)."""
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(mlflow_uri))
    status = wait_job(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status.value == "SUCCEEDED", f"{entrypoint}\n{status}; log tail:\n{logs[-4000:]}"
    return job_id, logs


def train_workers(url: str, client, job_id: str) -> list:
    """Ray Train worker actors of one job (alive or dead), from the state API."""
    from ray.util.state import list_actors

    ray_job_id = client.get_job_info(job_id).job_id
    actors = list_actors(address=url, filters=[("class_name", "=", "RayTrainWorker")],
                         detail=True, limit=1000, raise_on_missing_output=False)
    return [a for a in actors if a.job_id == ray_job_id]


def auth_token() -> str | None:
    """Ray's cluster token, only to check it never shows up in any output."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return path.read_text().strip() if path.is_file() else None


def listening_hosts(port: int) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


# --------------------------------------------------------------------------- the stack
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """MLflow server + Ray head + one more raylet, started by `python -m cluster up`, each
    on free ports; stopped by `python -m cluster down`; then nothing of it may be left."""
    services.use_token_auth()  # this process's Jobs/state API clients send the cluster token
    state_dir = tmp_path_factory.mktemp("stack")
    ports = {"dashboard": free_port(), "ray": free_port(), "mlflow": free_port()}
    up = cluster_cli(state_dir, "up", "--dashboard-port", str(ports["dashboard"]),
                     "--ray-port", str(ports["ray"]), "--mlflow-port", str(ports["mlflow"]),
                     "--num-cpus", "2", "--extra-nodes", "1", "--worker-cpus", "2",
                     "--object-store-mb", "200")
    try:
        assert up.returncode == 0, f"cluster up failed:\n{up.stdout}\n{up.stderr}"
        state = local.load_state(state_dir)
        head = state["nodes"][0]
        yield {"dir": state_dir, "url": head["dashboard_url"], "mlflow": state["mlflow"],
               "ports": ports, "up_output": up.stdout + up.stderr}
    finally:
        state = local.load_state(state_dir)
        leaders = [n["pid"] for n in state.get("nodes", [])]
        leaders += [state["mlflow"]["pid"]] if state.get("mlflow") else []
        down = cluster_cli(state_dir, "down", timeout=180)
        left = {pid: processes.session_members(pid) for pid in leaders if processes.session_members(pid)}
        local.stop_all(state)  # a no-op when `down` did its job; never leaves processes behind
        assert down.returncode == 0, down.stdout + down.stderr
        assert not left, f"processes left after `cluster down`: {left}"
        assert not any(Path(n["temp_dir"]).exists() for n in state.get("nodes", []))


@pytest.fixture(scope="module")
def shards(stack, tmp_path_factory):
    """A tiny dataset, preprocessed by a job on the cluster (data paths are absolute)."""
    from ray.job_submission import JobSubmissionClient

    from pipelines.data.sample import make_sample

    root = tmp_path_factory.mktemp("cluster-data")
    make_sample(root / "src", classes=4, train_per_class=10, val_per_class=3, seed=1,
                min_side=64, max_side=120)
    client = JobSubmissionClient(stack["url"])
    job_id, logs = run_job(client, f"python workflow.py preprocess --source {root / 'src'} "
                                   f"--out {root / 'shards'} --resize 40", stack["mlflow"]["uri"])
    return {"root": root, "out": root / "shards", "job_id": job_id, "logs": logs}


@pytest.mark.cluster
@pytest.mark.slow
def test_jobs_on_two_node_cluster(stack, shards):
    from mlflow import MlflowClient
    from ray.job_submission import JobSubmissionClient

    url, mlflow_uri = stack["url"], stack["mlflow"]["uri"]
    client = JobSubmissionClient(url)
    nodes = services.alive_nodes(url)
    assert len(nodes) == 2 and sum(n["head"] for n in nodes) == 1

    # Dashboard and tracking server listen on the loopback interface only.
    assert listening_hosts(stack["ports"]["dashboard"]) == {"127.0.0.1"}
    assert listening_hosts(stack["ports"]["mlflow"]) == {"127.0.0.1"}

    # preprocess ran as a job (fixture): a complete OUT where the job was told to write it.
    manifest = json.loads((shards["out"] / "manifest.json").read_text())
    assert manifest["splits"]["train"]["records"] == 40

    # train: 2 workers on 2 different nodes, DDP over gloo across them.
    ckpt = shards["root"] / "checkpoints"
    job_id, logs = run_job(
        client, f"python workflow.py train --data {shards['out']} --storage {ckpt} "
                f"--epochs 2 --max-failures 0 --experiment cluster-jobs "
                f"--registered-model alexnet-cluster {TRAIN_FLAGS}", mlflow_uri)
    workers = train_workers(url, client, job_id)
    assert len(workers) == 2, workers
    assert {w.node_id for w in workers} == {n["node_id"] for n in nodes}  # one a node

    # The run is in the tracking server, with the config, every epoch, proxied artifacts.
    ml = MlflowClient(mlflow_uri)
    exp = ml.get_experiment_by_name("cluster-jobs")
    runs = ml.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["run.workers"] == "2"
    assert run.data.params["run.placement_strategy"] == "STRICT_SPREAD"
    for key in ("train_loss", "val_top1_error", "lr", "images_per_s"):
        assert sorted(m.step for m in ml.get_metric_history(run.info.run_id, key)) == [0, 1]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # through the server
    stored = Path(stack["mlflow"]["artifacts_destination"])
    assert list(stored.glob(f"*/{run.info.run_id}/artifacts/config.yaml"))

    # Registered, champion, and its files in the server's artifact store.
    version = ml.get_model_version_by_alias("alexnet-cluster", "champion")
    assert version.run_id == run.info.run_id
    assert any(p.name == "weights.pt" for p in stored.rglob("weights.pt"))
    assert ckpt.is_dir() and any(ckpt.rglob("weights.pt"))  # checkpoints where --storage says

    # batch-infer as a job, reading the registered model through the tracking server.
    preds = shards["root"] / "preds.parquet"
    _, infer_logs = run_job(
        client, f"python workflow.py batch-infer --model models:/alexnet-cluster@champion "
                f"--input {shards['out']} --split val --output {preds} --batch-size 8",
        mlflow_uri)
    import pyarrow.parquet as pq

    table = pq.read_table(preds)
    assert table.num_rows == 12
    assert set(table["model_uri"].to_pylist()) == {"models:/alexnet-cluster@champion"}

    # Nothing printed the cluster's auth token.
    token = auth_token()
    if token:
        for text in (stack["up_output"], shards["logs"], logs, infer_logs):
            assert token not in text


@pytest.mark.cluster
@pytest.mark.slow
def test_node_loss_mid_training_recovers(stack, shards):
    """SIGKILL the second node's raylet after the first epoch is logged; with
    --max-failures the job waits for resources, a replacement raylet joins, training resumes
    from the last checkpoint and finishes; MLflow holds one run with each epoch once."""
    from mlflow import MlflowClient
    from ray.job_submission import JobSubmissionClient

    url, mlflow_uri, state_dir = stack["url"], stack["mlflow"]["uri"], stack["dir"]
    client = JobSubmissionClient(url)
    if len(services.alive_nodes(url)) != 2:  # the stack is shared with the test above
        assert cluster_cli(state_dir, "add-node", "--num-cpus", "2").returncode == 0
    epochs = 4
    job_id = client.submit_job(
        entrypoint=f"python workflow.py train --data {shards['out']} "
                   f"--storage {shards['root'] / 'checkpoints-failure'} --epochs {epochs} "
                   f"--max-failures 2 --experiment cluster-failure {TRAIN_FLAGS}",
        runtime_env=runtime_env(mlflow_uri))

    ml = MlflowClient(mlflow_uri)
    deadline = time.monotonic() + JOB_TIMEOUT
    run_id = None
    while run_id is None:  # wait for epoch 0 in the tracking server
        assert time.monotonic() < deadline, "no epoch logged in time"
        status = client.get_job_status(job_id)
        assert not status.is_terminal(), \
            f"job ended before the node was killed: {status}\n{client.get_job_logs(job_id)[-3000:]}"
        exp = ml.get_experiment_by_name("cluster-failure")
        runs = ml.search_runs([exp.experiment_id]) if exp else []
        if runs and ml.get_metric_history(runs[0].info.run_id, "train_loss"):
            run_id = runs[0].info.run_id
        time.sleep(1)

    killed = cluster_cli(state_dir, "kill-node")
    assert killed.returncode == 0, killed.stderr
    services.wait_nodes(url, 1, timeout=120)  # the head has declared the node dead
    assert not client.get_job_status(job_id).is_terminal()
    added = cluster_cli(state_dir, "add-node", "--num-cpus", "2", "--object-store-mb", "200")
    assert added.returncode == 0, added.stdout + added.stderr

    status = wait_job(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status.value == "SUCCEEDED", logs[-4000:]

    # The worker group was restarted onto the replacement node: 2 + 2 worker actors on
    # 3 different nodes (head, lost node, replacement).
    workers = train_workers(url, client, job_id)
    assert len(workers) == 4, [(w.state, w.node_id) for w in workers]
    assert len({w.node_id for w in workers}) == 3

    # One run, finished, with each epoch exactly once in every per-epoch metric.
    runs = ml.search_runs([ml.get_experiment_by_name("cluster-failure").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert ml.get_run(run_id).info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "val_top1_error", "lr", "images_per_s"):
        steps = sorted(m.step for m in ml.get_metric_history(run_id, key))
        assert steps == list(range(epochs)), (key, steps)
    assert ml.search_model_versions(f"run_id='{run_id}'")  # registered at the end


# --------------------------------------------------------------------------- fast checks
UPLOAD_MUST_NOT_HOLD = (".git/", ".venv/", ".cluster/", "data/", "checkpoints/", "outputs/",
                        "mlruns/", "mlartifacts/")


def _package(directory: Path, tmp_path: Path) -> zipfile.ZipFile:
    """The zip `ray job submit --working-dir` would upload, built by Ray's own packager with
    cluster/runtime_env.yaml's excludes (plus .gitignore and .rayignore, as Ray reads them)."""
    from ray._private.runtime_env.packaging import create_package

    excludes = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())["excludes"]
    target = tmp_path / "pkg.zip"
    create_package(str(directory), target, include_gitignore=True, excludes=excludes)
    return zipfile.ZipFile(target)


def test_working_dir_upload_leaves_out_data_and_envs(tmp_path):
    # A checkout with everything a user accumulates: venv, data, shards, runs, checkpoints.
    repo = tmp_path / "checkout"
    repo.mkdir()
    for name in (".gitignore", ".rayignore", "workflow.py"):
        shutil.copy2(REPO / name, repo / name)
    shutil.copytree(REPO / "cluster", repo / "cluster",
                    ignore=shutil.ignore_patterns("__pycache__"))
    planted = [".venv/bin/python", ".git/objects/ab/cdef", "data/sample/train/a.JPEG",
               "data/sample/LOC_synset_mapping.txt",
               "data/shards/train/shard-00000.lmdb", "elsewhere/shard-00001.lmdb",
               "checkpoints/alexnet/checkpoint_0/weights.pt", "mlruns/0/meta.yaml",
               "mlartifacts/1/x/model.pt", "mlflow.db", "outputs/predictions.parquet",
               ".cluster/mlflow.db", "pipelines/__pycache__/x.cpython-311.pyc"]
    for rel in planted:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(os.urandom(4096))
    names = set(_package(repo, tmp_path).namelist())
    assert "workflow.py" in names and "cluster/local.py" in names
    assert not names & set(planted), sorted(names & set(planted))


def test_working_dir_upload_of_this_checkout_is_small(tmp_path):
    pkg = _package(REPO, tmp_path)
    names = pkg.namelist()
    # Every stage's code travels (a `data/` exclude once dropped pipelines/data/ as well).
    assert {"workflow.py", "pipelines/data/preprocess.py", "pipelines/train/launcher.py",
            "pipelines/serve/infer.py", "alexnet/model.py", "cluster/local.py"} <= set(names)
    assert not [n for n in names if n.startswith(UPLOAD_MUST_NOT_HOLD) or n.endswith(".lmdb")]
    size = (tmp_path / "pkg.zip").stat().st_size
    assert size < 5 * 2**20, f"upload of {size / 2**20:.1f} MiB: something large is not ignored"


def test_stop_session_stops_its_own_processes_only(tmp_path):
    log = tmp_path / "s.log"
    # A leader with children and a grandchild, as `ray start --block` has.
    leader = processes.spawn(["bash", "-c", "sleep 300 & (sleep 300 & wait) & wait"], log,
                     {"PATH": os.environ["PATH"]})
    bystander = subprocess.Popen(["sleep", "300"])  # not in the session: must survive
    try:
        deadline = time.monotonic() + 10
        while len(processes.session_members(leader)) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        members = processes.session_members(leader)
        assert len(members) >= 4
        assert processes.stop_session(leader, marker="a marker not in its command line") == []
        assert processes.session_members(leader) == members  # pid-reuse guard: nothing signalled
        assert sorted(processes.stop_session(leader, marker="sleep 300", timeout=5)) == sorted(members)
        assert processes.session_members(leader) == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
        for pid in processes.session_members(leader):
            os.kill(pid, signal.SIGKILL)


def test_cluster_cli_refuses_busy_ports_and_worker_port_range(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cluster_cli(tmp_path, "up", "--no-mlflow", "--dashboard-port", str(port),
                        "--ray-port", str(free_port()), timeout=60)
    assert r.returncode == 2 and f"port {port} is in use" in r.stderr
    r = cluster_cli(tmp_path, "up", "--no-mlflow", "--ray-port", "12345", timeout=60)
    assert r.returncode == 2 and "worker port range" in r.stderr
    assert cluster_cli(tmp_path, "status").returncode == 1  # nothing was left running


# --------------------------------------------------------------------------- shard cache
def _fake_out(root: Path) -> Path:
    """A preprocess OUT with real LMDB shards (2 train, 1 val) and its manifest."""
    from pipelines.data.shards import FORMAT_VERSION, pack_record, write_shard

    out = root / "remote-out"
    splits = {}
    for split, n_shards in (("train", 2), ("val", 1)):
        shards = []
        for s in range(n_shards):
            rel = f"{split}/shard-{s:05d}.lmdb"
            (out / split).mkdir(parents=True, exist_ok=True)
            values = [pack_record(i % 3, 4, 4, "raw", f"{split}/{s}/{i}.JPEG",
                                  bytes([i % 256]) * 48) for i in range(20)]
            sha = write_shard(out / rel, values, {"split": split, "shard": s})
            shards.append({"path": rel, "records": 20, "sha256": sha,
                           "bytes": (out / rel).stat().st_size})
        splits[split] = {"records": 20 * n_shards, "shards": shards}
    (out / "manifest.json").write_text(json.dumps({"format": FORMAT_VERSION, "splits": splits,
                                                  "classes": [], "stats": {}}))
    return out


def test_shard_cache_copies_once_verifies_and_reads(tmp_path):
    from pipelines.data.shard_cache import localize
    from pipelines.data.shards import read_manifest, split_readers

    out = _fake_out(tmp_path)
    cache = tmp_path / "cache"
    # Three workers of one node at once (processes, as Ray Train workers are): one copies.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.starmap(localize, [(f"file://{out}", str(cache))] * 3)
    paths = {r[0] for r in results}
    assert len(paths) == 1
    assert sum(r[1]["copied"] for r in results) == 3  # 3 shards, each copied once in all
    assert sorted(r[1]["reused"] for r in results) == [0, 3, 3]
    local = Path(paths.pop())
    for rel in ("train/shard-00000.lmdb", "train/shard-00001.lmdb", "val/shard-00000.lmdb"):
        assert (local / rel).read_bytes() == (out / rel).read_bytes()
    manifest = read_manifest(local)
    records = [r for reader in split_readers(local, manifest, "train") for r in
               (reader[i] for i in range(len(reader)))]
    assert len(records) == 40 and records[1].label == 1

    # A plain path works too, and a second call copies nothing.
    again, report = localize(str(out), cache, splits=("train",))
    assert again == str(local) and report["copied"] == 0 and report["reused"] == 2


def test_shard_cache_refuses_a_corrupt_source(tmp_path):
    from pipelines.data.shard_cache import ShardCacheError, localize

    out = _fake_out(tmp_path)
    shard = out / "val" / "shard-00000.lmdb"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardCacheError, match="sha256"):
        localize(str(out), tmp_path / "cache", splits=("val",))
    cached = list((tmp_path / "cache").rglob("*.lmdb*"))
    assert cached == []  # no partial or unverified file left behind
    assert not list((tmp_path / "cache").rglob("manifest.json"))
