"""The commands at their edges, as a user meets them: real subprocesses, real
files, a real local Ray where a command starts one. Bad input is one line on stderr and exit
status 2, never a traceback; what is printed is true.

    .venv/bin/python -m pytest -q tests/test_edges.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO

CLASSES = 3


def _run(*args, cwd, env=None):
    # A private MLflow store per test: nothing lands in the checkout or the user's ./mlflow.db.
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "workflow.py"), *map(str, args)],
                          cwd=cwd, env=full, capture_output=True, text=True, timeout=600)


def _one_line_error(proc, *fragments: str) -> str:
    """Exit 2, exactly one line on stderr (besides Ray/MLflow INFO logs there are none:
    these fail before either starts), no traceback; returns the line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("error: "), out
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """3 classes of real JPEGs (ImageNet layout) and a freshly initialised cifar bundle."""
    import torch

    from alexnet import build_model
    from pipelines.data.sample import make_sample
    from pipelines.serve.model import save_bundle

    root = tmp_path_factory.mktemp("edges")
    src = root / "src"
    make_sample(src, classes=CLASSES, train_per_class=3, val_per_class=2, seed=5,
                min_side=48, max_side=80)
    pairs = sorted(line.split(" ", 1) for line in
                   (src / "LOC_synset_mapping.txt").read_text().splitlines() if line)
    classes = [{"index": i, "wnid": w, "name": n.strip()} for i, (w, n) in enumerate(pairs)]
    info = {"variant": "cifar", "groups": 1, "num_classes": CLASSES, "input_size": 32,
            "resize": 40, "mean": [128.0] * 3, "std": [60.0] * 3, "classes": classes}
    torch.manual_seed(0)
    bundle = save_bundle(root / "bundle", build_model("cifar", CLASSES).state_dict(), info)
    return SimpleNamespace(root=root, src=src, classes=classes, bundle=bundle,
                           val=sorted((src / "val").glob("*.JPEG")))


# --------------------------------------------------------------------------- tracebacks today
def test_malformed_yaml_config_is_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("lr: [0.01\nepochs: 3\n")
    line = _one_line_error(_run("train", "--config", "bad.yaml", cwd=tmp_path),
                           "--config bad.yaml: not valid YAML", "line 2")
    assert "mapping of config keys" in line
    (tmp_path / "bad2.yaml").write_text("source: a: b\n")
    _one_line_error(_run("preprocess", "--config", "bad2.yaml", cwd=tmp_path),
                    "bad2.yaml: not valid YAML (mapping values are not allowed here")


@pytest.mark.parametrize("flag,value,words", [
    ("--resize", "0", "--resize 0: the shorter side in pixels, at least 1"),
    ("--quality", "101", "--quality 101: a JPEG quality from 1 to 100"),
    ("--shards", "-1", "--shards -1"),
])
def test_preprocess_numbers_out_of_range_are_one_line(world, tmp_path, flag, value, words):
    proc = _run("preprocess", "--source", world.src, "--out", tmp_path / "o", flag, value,
                cwd=tmp_path)
    _one_line_error(proc, words)
    assert not (tmp_path / "o").exists()  # refused before anything is written


@pytest.mark.parametrize("top", ["0", "-2"])
def test_predict_top_below_one_is_one_line(world, tmp_path, top):
    proc = _run("predict", world.val[0], "--model", world.bundle, "--top", top, cwd=tmp_path)
    _one_line_error(proc, f"--top {top}: ", "at least 1")


def test_batch_infer_without_input_touches_nothing(tmp_path):
    _one_line_error(_run("batch-infer", cwd=tmp_path), "--input is required")
    _one_line_error(_run("batch-infer", "--input", "nowhere", cwd=tmp_path),
                    "input nowhere does not exist")
    # Before the fix the model was looked up first: ./mlflow.db appeared, then the complaint
    # was about the model.
    assert sorted(os.listdir(tmp_path)) == []


def test_batch_infer_output_is_checked_before_ray_starts(world, tmp_path):
    common = ["batch-infer", "--model", world.bundle, "--input", world.src / "val"]
    (tmp_path / "a_file").write_text("not a folder")
    line = _one_line_error(_run(*common, "--output", "a_file/preds.parquet", cwd=tmp_path),
                           "cannot write --output a_file/preds.parquet")
    assert "a_file is a file" in line
    ro = tmp_path / "ro"
    ro.mkdir()
    # A read-only folder (root ignores mode bits, so /proc stands in for it there).
    target = Path("/proc/preds.parquet") if os.geteuid() == 0 else ro / "preds.parquet"
    if os.geteuid() != 0:
        ro.chmod(0o555)
    _one_line_error(_run(*common, "--output", target, cwd=tmp_path),
                    f"cannot write --output {target}")
    # An existing file is refused like a non-empty directory, until --overwrite.
    (tmp_path / "keep.csv").write_text("someone's table\n")
    _one_line_error(_run(*common, "--output", "keep.csv", cwd=tmp_path),
                    "--output keep.csv exists; pass --overwrite")
    assert (tmp_path / "keep.csv").read_text() == "someone's table\n"
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x").write_text("x")
    _one_line_error(_run(*common, "--output", "dir", cwd=tmp_path),
                    "--output dir exists and is not empty; pass --overwrite")
    # None of these started Ray or made an MLflow store.
    assert not (tmp_path / "mlflow.db").exists()


def test_csv_input_empty_label_is_unlabelled_and_csv_dir_counts_errors(world, tmp_path):
    """One real batch-infer run: a CSV input with a labelled row, a row whose label cell is
    empty (predicted, unlabelled) and a row whose path is empty (an error row, named once),
    written as a directory of CSV files whose summary is counted from the data."""
    a, b = world.val[0], world.val[1]
    label = world.classes[0]["wnid"]
    (tmp_path / "in.csv").write_text(f"path,label\n{a},{label}\n{b},\n,{label}\n")
    proc = _run("batch-infer", "--model", world.bundle, "--input", "in.csv",
                "--output", "preds", "--format", "csv", "--batch-size", "4", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert "3 images -> preds (1 errors; top-1 accuracy" in proc.stdout, out
    assert "on 1 labelled images" in proc.stdout, out
    assert "  error: in.csv row 2: empty 'path'" in proc.stdout.splitlines(), out
    assert "row 2: in.csv row 2" not in out

    import pyarrow as pa
    import pyarrow.csv as pcsv

    rows = pa.concat_tables(
        pcsv.read_csv(f, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
        for f in sorted((tmp_path / "preds").glob("*.csv"))).to_pylist()
    by_path = {r["path"]: r for r in rows}
    assert by_path[str(b)]["label"] is None and by_path[str(b)]["top1_wnid"]
    assert by_path[str(b)]["error"] is None


# --------------------------------------------------------------------------- wrong words
def test_verify_on_something_that_is_not_an_output_is_one_line(world, tmp_path):
    line = _one_line_error(_run("verify", "--data", "nowhere", cwd=tmp_path),
                           "nowhere does not exist")
    assert "preprocess --source SRC --out nowhere" in line
    # The source dataset itself: before, an empty table and advice to write into it.
    _one_line_error(_run("verify", "--data", world.src, cwd=tmp_path),
                    f"{world.src} has no manifest.json, so it is not the OUT of a preprocess",
                    f"preprocess --source {world.src} --out OUT")


def _command_in(line: str) -> list[str]:
    """The `python workflow.py ...` command quoted in a message, as argv after workflow.py."""
    cmd = line.split("`")[-2]
    assert cmd.startswith("python workflow.py "), line
    return cmd.split()[2:]


def test_interrupted_finished_and_damaged_outputs_say_what_is_true(world, tmp_path):
    """One OUT through its states, with the advice each message gives actually followed:
    interrupted (shards, no manifest) -> finished by the printed command -> re-run (complete,
    nothing to do) -> a damaged shard (train refuses it) -> repaired as advised -> whole."""
    out = tmp_path / "out"
    proc = _run("preprocess", "--source", world.src, "--out", out, "--resize", "40",
                "--shards", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (out / "manifest.json").unlink()  # what a run stopped after its last commit leaves

    line = _one_line_error(_run("verify", "--data", out, cwd=tmp_path),
                           f"{out} is an unfinished preprocess OUT")
    resume = _command_in(line)
    assert resume[:5] == ["preprocess", "--source", str(world.src), "--out", str(out)]
    assert "--resize" in resume and "--shards" in resume
    # batch-infer said "no images under OUT" here.
    _one_line_error(_run("batch-infer", "--model", world.bundle, "--input", out, cwd=tmp_path),
                    f"{out} is an unfinished preprocess OUT", "finish it with the same command")
    assert _run("train", "--data", out, cwd=tmp_path).returncode == 2

    proc = _run(*resume, cwd=tmp_path)  # the advice, followed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "manifest.json").is_file()

    # Re-run on a finished OUT: says so (was a table of zeros), and leaves the manifest as
    # it is (its sha256 names the dataset of every training run).
    done = (out / "manifest.json").read_bytes()
    proc = _run(*resume, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{out} is complete already, nothing to do: train 9 records in 2 shards" in \
        proc.stdout, proc.stdout
    assert (out / "manifest.json").read_bytes() == done

    # A damaged shard: train refuses it with advice that works (it said --overwrite, which
    # "succeeded" in 0.2 s and repaired nothing).
    shard = out / "train" / "shard-00001.lmdb"
    with open(shard, "ab") as fh:
        fh.write(b"\0" * 4096)
    line = _one_line_error(_run("train", "--data", out, "--variant", "cifar", "--crop", "32",
                                cwd=tmp_path),
                           f"{shard}: ", "delete the damaged shards and their .json sidecars")
    assert "--overwrite" not in line
    advice = _command_in(line)
    assert advice == resume
    proc = _run(*resume, cwd=tmp_path)  # re-run without deleting: says what is wrong
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "problem: train/shard-00001.lmdb:" in proc.stdout
    assert "delete the damaged shards" in proc.stdout
    shard.unlink()
    Path(f"{shard}.json").unlink()
    proc = _run(*advice, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _run("verify", "--data", out, cwd=tmp_path)
    assert proc.returncode == 0 and "OK, the data is whole" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------- smaller
@pytest.fixture(scope="module")
def small_out(world, tmp_path_factory):
    """The sample plus one broken JPEG, preprocessed at 24 px (smaller than any crop) with
    --shards 50: 10 train images listed, 9 that decode."""
    import shutil

    root = tmp_path_factory.mktemp("small")
    src, out = root / "src", root / "out"
    shutil.copytree(world.src, src)
    wnid = world.classes[0]["wnid"]
    (src / "train" / wnid / "broken.JPEG").write_bytes(b"\xff\xd8 not a JPEG")
    proc = _run("preprocess", "--source", src, "--out", out, "--resize", "24",
                "--shards", "50", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_help_says_which_flags_are_required():
    for command, required in (("preprocess", ("--source", "--out")), ("train", ("--data",)),
                              ("batch-infer", ("--input",))):
        proc = _run(command, "--help", cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        text = " ".join(proc.stdout.split())  # argparse wraps lines
        assert "(default: )" not in text, command
        for flag in required:
            after = text.split(f" {flag} {flag[2:].upper()} ", 1)[1]
            assert "(required)" in after.split(" --", 1)[0], (command, flag)
        assert text.count("(required)") == len(required), command


def test_cifar_variant_crops_32_unless_told(small_out, tmp_path):
    """On 24-px shards every crop is too large, so the one-line refusal names the crop the
    run would have used, before any worker starts."""
    def crop_used(*extra):
        line = _one_line_error(_run("train", "--data", small_out, *extra, cwd=tmp_path),
                               "is larger than the stored images (24 px")
        return int(line.split("--crop ")[1].split()[0])

    assert crop_used("--variant", "cifar") == 32  # was 224, ImageNet's
    assert crop_used("--variant", "cifar", "--crop", "28") == 28
    (tmp_path / "c.yaml").write_text("model:\n  variant: cifar\ndata:\n  crop: 30\n")
    assert crop_used("--config", "c.yaml") == 30
    (tmp_path / "flat.yaml").write_text("variant: cifar\n")
    assert crop_used("--config", "flat.yaml") == 32
    assert crop_used("--variant", "paper") == 224


def test_more_shards_than_images_writes_no_empty_shard(small_out):
    import json

    manifest = json.loads((small_out / "manifest.json").read_text())
    for split, images in (("train", 3 * CLASSES), ("val", 2 * CLASSES)):
        shards = manifest["splits"][split]["shards"]
        # --shards 50 is capped at the images listed; the shard whose one image did not
        # decode is left out, not written as an empty LMDB file
        assert len(shards) == images and all(s["records"] == 1 for s in shards), shards
        assert len(list((small_out / split).glob("*.lmdb"))) == images
    assert manifest["splits"]["train"]["quarantined"] == 1
    proc = _run("verify", "--data", small_out, cwd=small_out.parent)
    assert proc.returncode == 0 and "OK, the data is whole" in proc.stdout, proc.stdout


def test_registry_versions_are_ints_whatever_the_store_gives(tmp_path):
    """MLflow gives an int from sqlite and a str from a server; promote says int either way."""
    from mlflow import MlflowClient

    from pipelines.train.tracking import promote

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                          registry_uri=f"sqlite:///{tmp_path / 'm.db'}")
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", source=str(tmp_path))
    first = promote(client, "m", "1", 0.5)  # a server's str
    assert first == {"version": 1, "alias": "champion", "previous": None}
    better = promote(client, "m", 2, 0.4)  # sqlite's int
    assert better["version"] == 2 and better["previous"] == 1
    worse = promote(client, "m", "3", 0.9)
    assert worse["version"] == 3 and worse["champion"] == 2 and worse["alias"] == "challenger"
    assert int(client.get_model_version_by_alias("m", "champion").version) == 2


# --------------------------------------------------------------------------- interruptions
def test_ctrl_c_in_preprocess_says_what_is_kept_and_the_same_command_resumes(world, tmp_path):
    """A terminal's Ctrl-C (SIGINT to the whole process group) once pieces are staged:
    one line, exit 130; the same command then finishes the OUT, and verify finds it whole."""
    import signal
    import time

    out = tmp_path / "out"
    cmd = ["preprocess", "--source", world.src, "--out", out, "--resize", "40",
           "--shards", "3", "--batch-size", "2"]
    proc = subprocess.Popen([sys.executable, str(REPO / "workflow.py"), *map(str, cmd)],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    staging = out / "train" / ".staging"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if staging.is_dir() and any(staging.rglob("*")):
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("preprocess finished before it could be interrupted")
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("preprocess finished before the signal arrived")
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stderr, stderr
    said = [ln for ln in stderr.splitlines() if ln.startswith("interrupted: ")]
    assert said == [f"interrupted: the shards finished in {out} are kept, and the images "
                    "staged for the others; run the same command again to finish it"], stderr
    assert not (out / "manifest.json").exists()
    again = _run(*cmd, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    check = _run("verify", "--data", out, cwd=tmp_path)
    assert check.returncode == 0 and "OK, the data is whole" in check.stdout, check.stdout


def test_ctrl_c_in_train_marks_the_run_killed_and_prints_the_resume_command(small_out,
                                                                             tmp_path):
    """Ctrl-C (SIGINT to the process group) after the first checkpoint: exit 130, one line
    naming the run and its --resume command; the MLflow run is KILLED, not FAILED (was: exit
    1, no message). The printed command then continues the same run."""
    import glob
    import signal
    import time

    from mlflow import MlflowClient

    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": "sqlite:///m.db"}
    flags = ["--data", str(small_out), "--variant", "cifar", "--crop", "24", "--workers", "1",
             "--batch-size", "4", "--loader-workers", "0", "--name", "t", "--no-register"]
    proc = subprocess.Popen([sys.executable, str(REPO / "workflow.py"), "train", *flags,
                             "--epochs", "100"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if glob.glob(str(tmp_path / "checkpoints" / "t" / "checkpoint_*")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout + stderr
    assert not [ln for ln in stderr.splitlines() if ln.startswith("Traceback")], stderr
    said = [ln for ln in stderr.splitlines() if ln.startswith("interrupted: ")]
    assert len(said) == 1, stderr
    assert said[0].startswith("interrupted: run t stopped (MLflow run "), said
    assert said[0].endswith("marked KILLED); continue it from its last checkpoint with "
                            "`python workflow.py train --resume --name t`"), said
    client = MlflowClient("sqlite:///" + str(tmp_path / "m.db"))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("t", "KILLED")]

    resume = _command_in(said[0])
    proc = _run(*resume, "--epochs", "2", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # One progress line per epoch (the Train controller prints it, behind Ray's prefix).
    lines = [ln.split(") ", 1)[-1] for ln in (proc.stdout + proc.stderr).splitlines()
             if "epoch 2/2  train loss" in ln]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert " val err " in lines[0] and " img/s  data wait " in lines[0], lines[0]
    after = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_id, r.info.status) for r in after] == [(runs[0].info.run_id,
                                                                 "FINISHED")]


def test_epoch_line_has_what_a_person_watching_needs():
    from pipelines.train.progress import EpochProgress, epoch_line

    m = {"epoch": 2, "train_loss": 2.10104, "train_top1_error": 0.8123, "lr": 0.0025,
         "images_per_s": 85.4, "data_wait_fraction": 0.041, "epoch_seconds": 9.0,
         "val_top1_error": 0.75, "val_top5_error": 0.31}
    assert epoch_line(m, 12, 9.84, 88.0) == (
        "epoch 3/12  train loss 2.1010 err 0.812  val err 0.750 top-5 0.310  lr 0.0025  "
        "85 img/s  data wait 4%  9.8 s  ETA 1m28s")
    no_val = {k: v for k, v in m.items() if not k.startswith("val")}
    assert "val" not in epoch_line(no_val, 3, 1.0, None) and "ETA" not in \
        epoch_line(no_val, 3, 1.0, None)
    cb = EpochProgress(4)
    cb.after_report(None, [m], None)  # epoch 3 of 4: one left, 9 s each so far
    assert cb.durations == [9.0]


def test_train_checks_the_local_ray_is_big_enough(small_out, tmp_path):
    """Workers the local Ray cannot place waited minutes in WorkerGroupStartupTimeoutError
    retries; now one line, exit 2, before any worker starts."""
    proc = _run("train", "--data", small_out, "--variant", "cifar", "--crop", "24", "--gpu",
                "--workers", "64", "--cpus-per-worker", "2", cwd=tmp_path,
                env={"MLFLOW_TRACKING_URI": "sqlite:///m.db", "RAY_ADDRESS": ""})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert not [ln for ln in out.splitlines() if ln.startswith("Traceback")], out
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, out
    assert "the local Ray (this machine) is too small: the run needs 128 CPUs (64 workers x " \
        "--cpus-per-worker 2)" in errors[0], errors[0]
    assert "64 GPUs (--gpu: one a worker), it has 0" in errors[0]
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_train_says_why_it_stopped_which_uri_to_use_and_a_reused_name(small_out, tmp_path):
    """lr 0: the val score never improves, so --early-stop-patience 1 stops after 2 of 3
    epochs, and says so (was silent). The printed model URI is the registry's, which
    `predict --model` takes (the LoggedModel's models:/m-... was rejected). A reused
    --name says the new name and how to resume the old run (was silently suffixed)."""
    import json

    env = {"MLFLOW_TRACKING_URI": "sqlite:///m.db"}
    flags = ["--data", small_out, "--variant", "cifar", "--crop", "24", "--workers", "1",
             "--batch-size", "4", "--loader-workers", "0", "--name", "es"]
    proc = _run("train", *flags, "--epochs", "3", "--lr", "0", "--early-stop-patience", "1",
                "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert (summary["epochs_run"], summary["epochs"]) == (2, 3)
    assert summary["stopped_early"].startswith("no better val score in 1 epochs")
    # lr 0: every epoch scores the same; the best is the first, as early stopping counts it.
    assert summary["best_epoch"] == 0 and summary["stopped_early"].endswith("best epoch 1")
    reg = summary["registered"]
    assert (reg["model_uri"], reg["version"], reg["alias"]) == ("models:/alexnet/1", 1,
                                                                 "champion")
    assert reg["logged_model_uri"].startswith("models:/m-")
    from mlflow import MlflowClient

    client = MlflowClient("sqlite:///" + str(tmp_path / "m.db"))
    assert client.get_run(summary["run_id"]).data.tags["stopped_early"] == \
        summary["stopped_early"]
    img = next((small_out.parent / "src" / "val").glob("*.JPEG"))
    pred = _run("predict", img, "--model", reg["model_uri"], cwd=tmp_path, env=env)
    assert pred.returncode == 0 and "model: models:/alexnet/1 (version 1)" in pred.stdout, \
        pred.stdout + pred.stderr
    pred = _run("predict", img, "--model", reg["logged_model_uri"], cwd=tmp_path, env=env)
    assert pred.returncode == 0 and f"model: {reg['logged_model_uri']}" in pred.stdout, \
        pred.stdout + pred.stderr

    proc = _run("train", *flags, "--epochs", "1", "--no-register", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("note: a run 'es' exists")]
    assert len(notes) == 1, proc.stderr
    # Without --json, the end of the run is a short table, not a JSON dump.
    lines = proc.stdout.splitlines()
    table = next(lines[i:] for i, ln in enumerate(lines) if " finished: " in ln)
    new = table[0].split()[1]
    assert table[0] == f"run {new} finished: 1 of 1 epochs" and "{" not in proc.stdout, \
        proc.stdout
    assert [row.split()[0] for row in table[1:]] == ["best", "val", "checkpoint", "MLflow"]
    assert new.startswith("es-") and f"this new one is {new!r}" in notes[0]
    assert notes[0].endswith("(to continue 'es' instead: `python workflow.py train --resume "
                             "--name es`)")


def test_dry_run_lists_only_classes_with_images():
    """ImageNet's 1000 classes printed as 1000 mostly-zero entries; now the non-empty ones,
    or a histogram when many are filled."""
    from pipelines.data.preprocess import format_dry_run

    def report(per):
        split = {"images": sum(per.values()), "quarantined": 0, "ignored": 0, "per_class": per}
        return {"layout": "imagenet", "detected": "train/", "classes": len(per),
                "splits": {"train": split}, "quarantine": []}

    sparse = {f"n{i:08d}": (2 if i % 100 == 0 else 0) for i in range(1000)}
    text = format_dry_run(report(sparse))
    assert "990 of 1000 classes have none" in text
    assert "n00000100     2" in text and "n00000001" not in text
    dense = {f"n{i:08d}": 1 + (i % 2) for i in range(1000)}
    assert format_dry_run(report(dense)).splitlines()[-1] == \
        "  500 classes have 1 image, 500 classes have 2 images"


@pytest.mark.cluster
def test_train_beside_another_ray_says_which_it_uses_and_prints_no_known_noise(small_out,
                                                                               tmp_path):
    """Another Ray on the machine added ~25 lines of `Found multiple active Ray instances`
    (Ray Train's placement-group cleaner) to every training; each run also printed Ray's
    token-auth warning, a core_worker error line and a `Reporting training result` line a
    worker an epoch. Now: one line says which Ray is used, and none of those show."""
    import signal

    other = subprocess.Popen(
        [sys.executable, "-c", "import ray, time; ray.init(address='local', num_cpus=1, "
         "include_dashboard=False); print('up', flush=True); time.sleep(900)"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        proc = _run("train", "--data", small_out, "--variant", "cifar", "--crop", "24",
                    "--workers", "1", "--batch-size", "4", "--loader-workers", "0",
                    "--epochs", "1", "--no-register", cwd=tmp_path,
                    env={"MLFLOW_TRACKING_URI": "sqlite:///m.db"})
    finally:
        other.send_signal(signal.SIGINT)  # its own ray.shutdown() stops its processes
        other.wait(timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "other Ray cluster(s) run on this machine; this command starts its own local Ray" \
        in proc.stderr
    for noise in ("Found multiple active Ray instances", "Token authentication is enabled",
                  "constructor arguments in the object store", "Reporting training result",
                  "Add type hints to the `predict` method", "Traceback"):
        assert noise not in out, noise
    assert "epoch 1/1" in out
