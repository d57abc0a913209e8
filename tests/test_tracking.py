"""Tracking as a side channel: the metrics journal and its sender, the registry's rules
(like with like, class index, register once), run-name claims, and a fresh sqlite store
opened by several processes at once; marked slow, real trainings against a real
`mlflow server` that goes away (tests/test_outage.py has those).

    .venv/bin/python -m pytest -q tests/test_tracking.py
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow.fs as pafs
import pytest
from conftest import REPO
from mlflow import MlflowClient

from pipelines.train import tracking
from pipelines.train.journal import MetricJournal, TrackingUnavailable, drain, send_pending
from pipelines.train.storage import claim_name


def _journal(tmp_path) -> MetricJournal:
    return MetricJournal(pafs.LocalFileSystem(), str(tmp_path / "run" / "metrics_journal.jsonl"))


def test_journal_keeps_the_first_record_of_each_step_and_survives_a_torn_line(tmp_path):
    j = _journal(tmp_path)
    assert j.append("epoch", 0, {"train_loss": 2.0, "lr": 0.01, "bad": float("nan")})
    assert not j.append("epoch", 0, {"train_loss": 1.0})  # a restarted epoch: first stays
    assert j.append("restore", 1, {"restored_at_epoch": 1})
    with open(j.path, "a") as fh:
        fh.write('{"key": "epoch", "st')  # a crash in the middle of a write
    again = _journal(tmp_path).records()
    assert [(r["key"], r["step"], r["metrics"]) for r in again] == [
        ("epoch", 0, {"train_loss": 2.0, "lr": 0.01}), ("restore", 1, {"restored_at_epoch": 1})]


def test_sender_sends_each_record_once_and_backfills(tmp_path, mlflow_uri):
    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("j")).info.run_id
    j = _journal(tmp_path)
    for epoch in range(3):
        j.append("epoch", epoch, {"train_loss": 3.0 - epoch, "score": 0.9 - epoch / 10})
    client.log_metric(run_id, "score", 0.9, step=0)  # epoch 0 reached MLflow before a crash
    assert send_pending(client, run_id, j.records()) == 2
    assert send_pending(client, run_id, j.records()) == 0  # again: nothing doubles
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "score"))
    assert history == [(0, 0.9), (1, 0.8), (2, 0.7)]
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2]


def test_drain_gives_up_with_a_clear_message_when_nothing_answers(tmp_path):
    j = _journal(tmp_path)
    j.append("epoch", 0, {"train_loss": 1.0})
    uri = "http://127.0.0.1:9"  # discard port: connection refused at once
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        with pytest.raises(TrackingUnavailable, match=r"MLflow at http://127.0.0.1:9 did not "
                                                      r"answer for 3 s"):
            drain(j, uri, "0" * 32, deadline_s=3)


def _version(client, name, tags):
    v = client.create_model_version(name, source="file:///nowhere").version
    for k, val in tags.items():
        client.set_model_version_tag(name, v, k, val)
    return v


def test_champion_compares_like_with_like_and_keeps_its_class_index(mlflow_uri):
    client = MlflowClient(mlflow_uri)
    client.create_registered_model("m")
    champ = client.create_model_version("m", source="file:///nowhere").version
    out = tracking.promote(client, "m", champ, 0.9, 1.0, "aaa")
    assert out["alias"] == "champion"
    # No val split: its train loss (0.1) is not comparable with a val error (0.9).
    v = client.create_model_version("m", source="file:///nowhere").version
    out = tracking.promote(client, "m", v, None, 0.1, "aaa")
    assert out["alias"] == "challenger" and "no val error" in out["reason"]
    assert client.get_model_version("m", v).tags == {"train_loss": "0.100000",
                                                      "classes_sha256": "aaa"}
    # Better, but on another class index: refused unless allowed.
    v = client.create_model_version("m", source="file:///nowhere").version
    out = tracking.promote(client, "m", v, 0.5, None, "bbb")
    assert out["alias"] == "challenger" and "class index" in out["reason"]
    assert int(client.get_model_version_by_alias("m", "champion").version) == int(champ)
    out = tracking.promote(client, "m", v, 0.5, None, "bbb", allow_class_change=True)
    assert out == {"version": int(v), "alias": "champion", "previous": int(champ),
                   "previous_error": 0.9}


def test_a_champion_without_val_error_yields_to_one_with_it(mlflow_uri):
    client = MlflowClient(mlflow_uri)
    client.create_registered_model("m")
    first = client.create_model_version("m", source="file:///nowhere").version
    assert tracking.promote(client, "m", first, None, 0.05, "aaa")["alias"] == "champion"
    second = client.create_model_version("m", source="file:///nowhere").version
    assert tracking.promote(client, "m", second, 0.7, 1.2, "aaa")["alias"] == "champion"


def test_two_jobs_claiming_one_name_get_two(tmp_path):
    fs = pafs.LocalFileSystem()
    assert claim_name(fs, str(tmp_path), "alexnet")
    assert not claim_name(fs, str(tmp_path), "alexnet")


def test_a_fresh_sqlite_store_opened_by_many_processes_at_once(tmp_path):
    """Two project processes creating one new store while an outside reader polls it (what
    `mlflow ui` or a notebook does): the project's processes finish, and the store is whole
    for the reader too. (Two outside processes racing each other on a new store are beyond
    any project's reach: MLflow itself can leave it half migrated.)"""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    project = textwrap.dedent(f"""
        import os, sys
        os.environ["MLFLOW_TRACKING_URI"] = {uri!r}
        sys.path.insert(0, {str(REPO)!r})
        from pipelines.train import tracking
        import mlflow
        tracking.setup_mlflow()
        tracking.retry_store_races(lambda: mlflow.set_experiment("e" + sys.argv[1]))
        print("ok")
    """)
    # An outside reader that knows nothing of our lock (as `mlflow ui` does); its own
    # errors are its business, ours must not be.
    reader = textwrap.dedent(f"""
        import time
        from mlflow import MlflowClient
        for _ in range(10):
            try:
                MlflowClient({uri!r}).search_experiments()
            except Exception as exc:
                print(type(exc).__name__)
            time.sleep(0.1)
        print("ok")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", project, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    procs.append(subprocess.Popen([sys.executable, "-c", reader], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
    for p in procs[:2]:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    procs[2].communicate(timeout=300)
    names = {e.name for e in MlflowClient(uri).search_experiments()}
    assert {"e0", "e1"} <= names


def test_register_needs_a_run_directory(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "workflow.py"), "register", "--run",
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path}: not a training run directory (no mlflow_run_id); give "
        "STORAGE/NAME as `train` printed it"]
