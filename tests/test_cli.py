"""The command line as a user meets it: real subprocesses, real exit codes."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "workflow.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_info_prints_the_layer_table_and_total():
    proc = _run("info", "--variant", "paper", "--groups", "2")
    assert proc.returncode == 0, proc.stderr
    assert "Total params: 60,965,224" in proc.stdout
    assert "Conv2d" in proc.stdout and "LocalResponseNorm" in proc.stdout
    proc = _run("info", "--variant", "torchvision")
    assert "Total params: 61,100,840" in proc.stdout


def test_user_errors_are_one_line_not_a_traceback(tmp_path):
    proc = _run("train", "--data", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "workflow.py preprocess" in proc.stderr
    proc = _run("preprocess", "--source", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not a readable directory" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = _run("preprocess", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no known layout" in proc.stderr


def test_make_sample_cli(tmp_path):
    proc = _run("make-sample", "--out", str(tmp_path / "s"), "--classes", "3",
                "--train-per-class", "2", "--val-per-class", "1")
    assert proc.returncode == 0, proc.stderr
    assert "6 train + 3 val images" in proc.stdout
