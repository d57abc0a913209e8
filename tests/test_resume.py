"""Kill `python workflow.py preprocess` mid-run (SIGKILL), or kill one of its Ray workers, run
the same command again, and prove with `verify` that every image is there exactly once, and
that the result is byte-identical to an uninterrupted run.

    pytest tests/test_resume.py        (slow: real subprocesses, each with its own local Ray)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from pipelines.config import PreprocessConfig
from pipelines.data.preprocess import run_preprocess
from pipelines.data.shards import MANIFEST, QUARANTINE, read_manifest, split_readers
from pipelines.data.verify import verify_output

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
ARGS = ["--shards", "8", "--resize", "64", "--batch-size", "8"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from pipelines.data.sample import make_sample

    root = tmp_path_factory.mktemp("resume") / "src"
    make_sample(root, classes=8, train_per_class=50, val_per_class=5, seed=3,
                min_side=150, max_side=300)
    return root


def _marked_pids(mark: str) -> list[int]:
    """Processes started by our subprocess (they inherit its environment marker)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if f"PREPROCESS_TEST_MARK={mark}".encode() in (d / "environ").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Preprocess:
    """`workflow.py preprocess` in its own session and Ray temp dir; stopped by pid."""

    def __init__(self, src: Path, out: Path):
        self.mark = uuid.uuid4().hex
        self.tmp = tempfile.mkdtemp(prefix="rk")  # short: Ray's socket paths have a limit
        env = {**os.environ, "PREPROCESS_TEST_MARK": self.mark, "RAY_TMPDIR": self.tmp}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "workflow.py", "preprocess", "--source", str(src), "--out",
             str(out), *ARGS], cwd=REPO, env=env, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def kill_all(self) -> None:
        for _ in range(3):  # Ray's own processes exit with their parent; sweep what is left
            pids = _marked_pids(self.mark)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        self.proc.wait(timeout=30)
        assert not _marked_pids(self.mark), "processes of the killed run are still alive"

    def finish(self, timeout: float = 300) -> str:
        try:
            text, _ = self.proc.communicate(timeout=timeout)
        finally:
            self.kill_all()
        assert self.proc.returncode == 0, text[-3000:]
        return text


def _wait_for(pred, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def _check_exactly_once(src: Path, out: Path) -> dict:
    report = verify_output(out, decode=True)
    assert report["ok"], report["problems"]
    manifest = read_manifest(out)
    stored = [r[i].path for split in manifest["splits"]
              for r in split_readers(out, manifest, split) for i in range(len(r))]
    quarantined = [json.loads(x)["path"] for x in (out / QUARANTINE).read_text().splitlines()]
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*.JPEG"))
    assert len(stored) == len(set(stored))  # no duplicates
    assert sorted(stored + quarantined) == files  # no gaps
    return manifest


def test_sigkill_mid_run_then_rerun_finishes_only_the_missing_work(ray_local, source, tmp_path):
    out = tmp_path / "out"
    first = Preprocess(source, out)
    try:
        # Kill once the first shard is committed: some work done, most of it not.
        _wait_for(lambda: any((out / "train").glob("shard-*.lmdb.json"))
                  or first.proc.poll() is not None)
        first.proc.send_signal(signal.SIGKILL)
    finally:
        first.kill_all()
    assert first.proc.returncode == -signal.SIGKILL
    assert not (out / MANIFEST).exists(), "the run finished before the kill; make it longer"
    committed = len(list((out / "train").glob("shard-*.lmdb.json")))
    assert 1 <= committed < 8

    text = Preprocess(source, out).finish()
    assert "train" in text and "images/s" in text  # the summary table
    manifest = _check_exactly_once(source, out)
    train = manifest["splits"]["train"]
    assert train["records"] == 400 and len(train["shards"]) == 8
    assert train["processed"] <= 400 - committed * 50  # finished shards were not redone

    # Byte for byte what an uninterrupted run writes.
    clean = run_preprocess(PreprocessConfig(source=str(source), out=str(tmp_path / "clean"),
                                            shards=8, resize=64, batch_size=8))
    for split in ("train", "val"):
        assert [s["sha256"] for s in manifest["splits"][split]["shards"]] == \
            [s["sha256"] for s in clean["splits"][split]["shards"]]
    assert manifest["stats"] == clean["stats"]


def test_a_dying_ray_worker_loses_nothing(source, tmp_path):
    out = tmp_path / "out"
    run = Preprocess(source, out)
    killed = []
    try:
        def kill_a_worker() -> bool:
            for pid in _marked_pids(run.mark):
                title = _cmdline(pid)
                if "ray::MapBatches" in title:  # a decode + staging task
                    os.kill(pid, signal.SIGKILL)
                    killed.append(title)
                    return True
            return run.proc.poll() is not None

        _wait_for(kill_a_worker)
        assert killed, "no Ray worker was seen running a task"
        run.finish()
    finally:
        run.kill_all()
    _check_exactly_once(source, out)
