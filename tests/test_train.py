"""Training: the recipe's pieces in one process (schedules, early stopping, ten-crop
evaluation, checkpoint round trip, corrupt records), the checks that run before any worker,
MLflow helpers and champion/challenger on a real sqlite registry; then, marked slow, real
trainings on a real local Ray with two CPU workers: loss decreases and everything is tracked,
a worse second training stays challenger, a SIGKILLed worker is recovered from the last
checkpoint, and `train --resume` continues a stopped run in the same MLflow run.

    .venv/bin/python -m pytest -q tests/test_train.py            # all (slow ones ~4 min)
    .venv/bin/python -m pytest -q tests/test_train.py -m "not slow"
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from mlflow import MlflowClient
from test_ingest import corrupt_record, write_dataset

from alexnet import build_model
from alexnet.augment import normalize, ten_crop
from pipelines import config
from pipelines.data.shards import split_readers
from pipelines.train import tracking
from pipelines.train.checkpoint import load_training_state, save_training_state
from pipelines.train.errors import TrainError
from pipelines.train.ingest import make_loader
from pipelines.train.launcher import check_config, run_train
from pipelines.train.loop import CHAOS_ENV, DeviceBatches, evaluate, train_one_epoch
from pipelines.train.recipe import Progress, epoch_seed, make_scheduler, step_scheduler
from pipelines.train.storage import resolve_run, storage_filesystem

NO_AMP = torch.autocast("cpu", enabled=False)


def _cfg(**optim) -> config.TrainConfig:
    cfg = config.TrainConfig()
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    return cfg


def _lrs(cfg: config.TrainConfig, scores: list[float]) -> list[float]:
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = make_scheduler(cfg, opt, 0.1)
    out = []
    for s in scores:
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        step_scheduler(cfg, sched, s)
    return out


def test_plateau_divides_by_ten_when_val_error_stalls_at_most_three_times():
    lrs = _lrs(_cfg(schedule="plateau", lr_patience=2, max_lr_drops=3), [0.9] * 20)
    drops = [i for i in range(1, 20) if lrs[i] < lrs[i - 1] * 0.5]
    assert len(drops) == 3 and lrs[-1] == pytest.approx(1e-4)
    assert drops[0] == 4  # epochs 1, 2 do not improve on 0 (patience 2): the drop after 3
    # An improving error never drops the rate.
    assert set(_lrs(_cfg(schedule="plateau", lr_patience=1), [1 - i / 20 for i in range(10)])) \
        == {0.1}


def test_step_and_cosine_schedules():
    step = _lrs(_cfg(schedule="step", step_size=3), [0.5] * 7)
    assert step == pytest.approx([0.1] * 3 + [0.01] * 3 + [0.001])
    cfg = _cfg(schedule="cosine")
    cfg.run.epochs = 10
    cos = _lrs(cfg, [0.5] * 11)
    assert cos[0] == 0.1 and cos[5] == pytest.approx(0.05) and cos[10] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(cos, cos[1:], strict=False))


def test_early_stopping_counts_epochs_without_a_better_score():
    p = Progress()
    stops = []
    for score in [0.9, 0.8, 0.85, 0.8, 0.7, 0.75, 0.71, 0.72]:
        p.update(score)
        stops.append(p.should_stop(3))
    assert p.best == 0.7 and p.since_best == 3
    assert stops == [False] * 7 + [True]
    assert not Progress(since_best=100).should_stop(0)  # 0 = off


def test_epoch_seeds_differ_per_rank_and_epoch():
    seeds = {epoch_seed(0, e, r) for e in range(5) for r in range(4)}
    assert len(seeds) == 20 and epoch_seed(0, 3, 1) == epoch_seed(0, 3, 1)


@pytest.fixture()
def data(tmp_path) -> tuple[Path, dict]:
    root = write_dataset(tmp_path / "out", classes=3, train=12, val=6)
    return root, json.loads((root / "manifest.json").read_text())


def _stats(manifest):
    return {k: torch.tensor(manifest["stats"][k]) for k in ("mean", "std", "eigval", "eigvec")}


def test_ten_crop_evaluation_averages_the_softmax_of_the_ten_crops(data):
    root, m = data
    torch.manual_seed(0)
    net = build_model("cifar", 3, init="default").eval()
    stats = _stats(m)
    loader = make_loader(split_readers(root, m, "val"), 32, "ten", 4, 0, 1, 0, 0, False)
    got, confusion = evaluate(net, loader, "cpu", stats, ten_crop=True, world=1,
                              num_classes=3)
    # By hand, image by image, straight from the records.
    from pipelines.data.shards import ShardReader, decode_image

    losses, hits, preds = [], [], []
    for shard in m["splits"]["val"]["shards"]:
        reader = ShardReader(root / shard["path"])
        for i in range(len(reader)):
            rec = reader[i]
            crops = torch.from_numpy(ten_crop(decode_image(rec), 32)).permute(0, 3, 1, 2)
            with torch.no_grad():
                probs = F.softmax(net(normalize(crops, stats["mean"], stats["std"])), 1)
            p = probs.mean(0)
            losses.append(-math.log(p[rec.label]))
            hits.append(int(p.argmax()) == rec.label)
            preds.append((rec.label, int(p.argmax())))
    assert got["val_images"] == 6
    assert got["val_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert got["val_top1_error"] == pytest.approx(1 - np.mean(hits))
    assert confusion.sum() == 6 and np.trace(confusion) == sum(hits)
    for t, p in preds:
        assert confusion[t, p] >= 1
    centre, _ = evaluate(net, make_loader(split_readers(root, m, "val"), 32, "center", 4, 0,
                                          1, 0, 0, False), "cpu", stats, False, 1, 3)
    assert centre["val_loss"] != pytest.approx(got["val_loss"])  # ten crops are not one


def _train_setup(cfg, m, seed):
    torch.manual_seed(seed)
    net = build_model("cifar", len(m["classes"]), init="default", dropout=0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return net, opt, make_scheduler(cfg, opt, 0.05)


def _epoch(net, opt, sched, cfg, loader, stats, epoch, progress):
    torch.manual_seed(epoch_seed(0, epoch, 0))
    loader.sampler.set_epoch(epoch)
    ep = train_one_epoch(net, loader, opt, DeviceBatches(torch.device("cpu"), 32, False),
                         stats, {"alphastd": 0.1}, NO_AMP)
    score = ep["meter"].result()["loss"]
    step_scheduler(cfg, sched, score)
    progress.update(score)
    return ep


def test_checkpoint_round_trip_restores_identical_state(tmp_path):
    root = write_dataset(tmp_path / "out", classes=3, train=8, val=0)
    m = json.loads((root / "manifest.json").read_text())
    cfg = _cfg(schedule="plateau", lr_patience=0)
    stats = _stats(m)
    loader = make_loader(split_readers(root, m, "train"), 32, "train", 4, 0, 1, 0, 0, False)
    info = {"variant": "cifar", "groups": 1, "num_classes": 3, "input_size": 32}

    net, opt, sched = _train_setup(cfg, m, 0)
    progress = Progress()
    _epoch(net, opt, sched, cfg, loader, stats, 0, progress)
    ckpt = save_training_state(tmp_path / "ckpt", net, opt, sched, 0, progress, "run-42",
                               info, cfg, np.eye(3, dtype=np.int64))
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    saved_progress = (progress.best, progress.since_best)
    _epoch(net, opt, sched, cfg, loader, stats, 1, progress)  # the uninterrupted run

    net2, opt2, sched2 = _train_setup(cfg, m, 123)  # other init: everything must come back
    start, progress2, run_id = load_training_state(ckpt, net2, opt2, sched2, "cpu")
    assert (start, run_id) == (1, "run-42")
    assert (progress2.best, progress2.since_best) == saved_progress
    for k, v in net2.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert sched2.state_dict()["num_bad_epochs"] is not None
    ep2 = _epoch(net2, opt2, sched2, cfg, loader, stats, 1, progress2)
    for (k, a), b in zip(net.state_dict().items(), net2.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{k} differs after resuming"  # bit-identical continuation
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
    assert ep2["steps"] == 2 and ep2["skipped"] == 0
    assert (ckpt / "config.yaml").is_file() and (ckpt / "val_confusion.npy").is_file()
    # Nothing in the state needs pickle: weights_only loading is what restored it.
    torch.load(ckpt / "state.pt", weights_only=True)


def test_training_skips_corrupt_records_even_a_whole_batch_of_them(data):
    root, m = data
    for shard in m["splits"]["train"]["shards"]:
        for i in range(shard["records"]):
            corrupt_record(root / shard["path"], i)
    cfg = _cfg()
    net, opt, sched = _train_setup(cfg, m, 0)
    before = [p.clone() for p in net.parameters()]
    loader = make_loader(split_readers(root, m, "train"), 32, "train", 4, 0, 1, 0, 0, False)
    ep = _epoch(net, opt, sched, cfg, loader, _stats(m), 0, Progress())
    assert ep["skipped"] == 12 and ep["steps"] == 3 and ep["meter"].n == 0
    # Zero-loss steps keep DDP ranks in step; weight decay is the only change.
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


# --------------------------------------------------------------------------- before workers
def _data_cfg(root, **kw) -> config.TrainConfig:
    cfg = config.TrainConfig()
    cfg.data.data, cfg.data.crop = str(root), 32
    cfg.model.variant = "cifar"
    for k, v in kw.items():
        section = next(s for s in ("data", "model", "optim", "run", "tracking")
                       if hasattr(getattr(cfg, s), k))
        setattr(getattr(cfg, section), k, v)
    return cfg


@pytest.mark.parametrize("kw, match", [
    ({"variant": "torchvision", "groups": 2}, "only to the 'paper' variant"),
    ({"variant": "paper", "groups": 3}, "must be 1 or 2"),
    ({"decode_on_gpu": True}, "--decode-on-gpu needs --gpu"),
    ({"crop": 64}, "--crop 64 is larger"),
    ({"data": ""}, "--data is required"),
])
def test_bad_flags_are_refused_before_any_worker(data, kw, match):
    with pytest.raises(TrainError, match=match):
        check_config(_data_cfg(data[0], **kw))


def test_decode_on_gpu_needs_jpeg_shards(data):
    root, m = data
    m["preprocess"]["encoding"] = "raw"
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TrainError, match="reads JPEG records"):
        check_config(_data_cfg(root, decode_on_gpu=True, gpu=True, variant="torchvision",
                               crop=64))


def test_missing_or_mismatched_manifest_fails_before_ray_or_mlflow(data, tmp_path, mlflow_uri):
    root, m = data
    storage = tmp_path / "ckpt"
    (root / m["splits"]["train"]["shards"][0]["path"]).unlink()
    with pytest.raises(TrainError, match="listed in the manifest but missing"):
        run_train(_data_cfg(root, storage=str(storage)))
    (root / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="workflow.py preprocess"):
        run_train(_data_cfg(root, storage=str(storage)))
    assert not storage.exists()                       # no run directory
    assert MlflowClient(mlflow_uri).search_experiments(filter_string="name = 'alexnet'") == []


def _cli(*args):
    return subprocess.run([sys.executable, str(REPO / "workflow.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_train_and_info_share_variant_and_groups_flags(data):
    for cmd in (["info"], ["train", "--data", str(data[0])]):
        proc = _cli(*cmd, "--variant", "torchvision", "--groups", "2")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "applies only to the 'paper' variant" in proc.stderr


def test_storage_accepts_paths_and_pyarrow_uris(tmp_path):
    import pyarrow.fs as pafs

    fs, path = storage_filesystem(str(tmp_path / "a"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a")
    fs, path = storage_filesystem(f"file://{tmp_path}/b/")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/b"
    with pytest.raises(TrainError, match="pyarrow cannot open it"):
        storage_filesystem("nosuchscheme://bucket/x")


def test_a_used_run_name_gets_a_new_name_unless_resuming(tmp_path):
    fs, root = storage_filesystem(f"file://{tmp_path}")
    (tmp_path / "alexnet").mkdir()
    cfg = config.TrainConfig()
    assert resolve_run(cfg, fs, root) == "alexnet"        # a directory without a run id
    (tmp_path / "alexnet" / "mlflow_run_id").write_text("abc")
    name = resolve_run(cfg, fs, root)
    assert re.fullmatch(r"alexnet-\d{8}-\d{6}", name)     # Ray Train would resume it
    cfg = config.TrainConfig()
    cfg.run.resume = True
    assert resolve_run(cfg, fs, root) == "alexnet"
    cfg.run.name = "other"
    with pytest.raises(TrainError, match=r"no run 'other'.*\['alexnet'\]"):
        resolve_run(cfg, fs, root)


# --------------------------------------------------------------------------- MLflow helpers
def test_confusion_plots_and_tables(tmp_path):
    classes = [{"index": i, "wnid": f"n{i}", "name": f"c{i}"} for i in range(4)]
    m = np.array([[5, 3, 0, 0], [0, 8, 0, 0], [2, 0, 6, 1], [0, 0, 7, 1]])
    rows = tracking.top_confusions(m, classes, k=3)
    assert [(r["true_index"], r["predicted_index"], r["count"]) for r in rows] == \
        [(3, 2, 7), (0, 1, 3), (2, 0, 2)]
    assert rows[0]["true_name"] == "c3" and rows[0]["predicted_wnid"] == "n2"
    assert rows[0]["fraction_of_true"] == pytest.approx(7 / 8)
    png = tracking.confusion_figure(m, classes, tmp_path / "c.png")
    assert cv2.imread(png).shape[0] > 200
    big = np.random.default_rng(0).integers(0, 5, (1000, 1000))
    big_classes = [{"index": i, "wnid": f"n{i:08d}"} for i in range(1000)]
    assert len(tracking.top_confusions(big, big_classes, k=50)) == 50
    grid = tracking.image_grid(np.zeros((10, 32, 32, 3), np.uint8), columns=8)
    assert grid.shape == (2 * 98, 8 * 98, 3)  # 32 px crops enlarged x3, 2-px gaps


def test_champion_moves_only_to_a_better_version(mlflow_uri):
    client = MlflowClient(mlflow_uri)
    client.create_registered_model("m")

    def register(err):
        version = client.create_model_version("m", source="file:///nowhere").version
        return tracking.promote(client, "m", version, err)

    def alias(name):
        return client.get_model_version_by_alias("m", name).version

    assert register(0.50)["alias"] == "champion" and alias("champion") == 1
    out = register(0.60)                      # worse: challenger, champion stays
    assert out["alias"] == "challenger" and (alias("champion"), alias("challenger")) == (1, 2)
    out = register(0.50)                      # equal is not better
    assert out["alias"] == "challenger" and alias("champion") == 1
    out = register(0.40)                      # better: champion moves, old one is challenger
    assert out == {"version": 4, "alias": "champion", "previous": 1, "previous_error": 0.5}
    assert (alias("champion"), alias("challenger")) == (4, 1)
    assert client.get_model_version("m", 4).tags["val_top1_error"] == "0.400000"


# --------------------------------------------------------------------------- real trainings
@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    """96 train + 24 val real JPEGs (4 classes) preprocessed by the real pipeline, with one
    train record corrupted on disk (bit rot) that every epoch must skip and count."""
    from pipelines.data.preprocess import run_preprocess
    from pipelines.data.sample import make_sample

    root = tmp_path_factory.mktemp("train")
    make_sample(root / "src", classes=4, train_per_class=24, val_per_class=6, seed=2,
                min_side=64, max_side=120)
    run_preprocess(config.PreprocessConfig(source=str(root / "src"), out=str(root / "shards"),
                                      resize=40))
    m = json.loads((root / "shards" / "manifest.json").read_text())
    corrupt_record(root / "shards" / m["splits"]["train"]["shards"][0]["path"], 5)
    return root / "shards"


@pytest.fixture(scope="module")
def mlflow_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # a sample a second
        mp.chdir(home)
        yield f"sqlite:///{home / 'mlflow.db'}"


def _ray_cfg(data, storage, **kw) -> config.TrainConfig:
    cfg = _data_cfg(data, storage=str(storage), **kw)
    cfg.data.loader_workers = 0
    cfg.model.init, cfg.model.dropout = "default", 0.0
    cfg.optim.batch_size, cfg.optim.lr = 8, 0.4  # 0.4 x 16/128 = 0.05 per global batch of 16
    cfg.run.workers = 2
    for k, v in kw.items():
        section = next(s for s in ("data", "model", "optim", "run", "tracking")
                       if hasattr(getattr(cfg, s), k))
        setattr(getattr(cfg, section), k, v)
    return cfg


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                              key=lambda m: m.step)]


@pytest.fixture(scope="module")
def good_run(shards, mlflow_home, tmp_path_factory):
    storage = tmp_path_factory.mktemp("ckpt")
    cfg = _ray_cfg(shards, storage, epochs=6, max_failures=0, name="good")
    return run_train(cfg), storage


@pytest.mark.slow
def test_loss_decreases_with_two_cpu_workers(good_run, mlflow_home):
    summary, _ = good_run
    client = MlflowClient(mlflow_home)
    loss = [v for _, v in _history(client, summary["run_id"], "train_loss")]
    val = [v for _, v in _history(client, summary["run_id"], "val_loss")]
    assert len(loss) == 6 and min(loss[-2:]) < loss[0] - 0.02, loss
    assert val[-1] < val[0], val
    assert summary["epochs_run"] == 6


@pytest.mark.slow
def test_the_run_is_fully_tracked(good_run, mlflow_home, shards):
    summary, storage = good_run
    client = MlflowClient(mlflow_home)
    run = client.get_run(summary["run_id"])
    params, tags = run.data.params, run.data.tags
    assert params["optim.lr"] == "0.4" and params["run.workers"] == "2"
    assert params["data.decode_on_gpu"] == "False"
    sha = tags["dataset.manifest_sha256"]
    assert len(sha) == 64 and re.fullmatch(r"[0-9a-f]{40}", tags["git.commit"])
    assert tags["git.dirty"] in ("true", "false")
    assert int(tags["ray.nodes"]) >= 1 and int(tags["ray.cluster_cpus"]) >= 2
    assert tags["ray.train_workers"] == "2"
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "shards" and inp.dataset.digest == sha[:36]
    assert inp.dataset.source_type == "local"
    # Every epoch once, every metric the issue lists.
    for key in ("train_loss", "val_loss", "train_top1_error", "val_top1_error",
                "val_top5_error", "lr", "images_per_s", "images_per_s_worker",
                "data_wait_fraction", "train_skipped_records"):
        assert [s for s, _ in _history(client, run.info.run_id, key)] == list(range(6)), key
    assert all(v == 1 for _, v in _history(client, run.info.run_id, "train_skipped_records"))
    assert all(0 <= v <= 1 for _, v in _history(client, run.info.run_id,
                                                 "data_wait_fraction"))
    ips = dict(_history(client, run.info.run_id, "images_per_s"))
    ipw = dict(_history(client, run.info.run_id, "images_per_s_worker"))
    assert all(ips[e] > ipw[e] > 0 for e in ips)  # total of two workers > one worker's
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
    assert any(k.startswith("system/system_memory_usage") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "classes.json", "augmented_train_samples.png", "val_confusion.png",
            "val_top_confusions.json", "dataset"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "augmented_train_samples.png"))
    assert cv2.imread(str(local)).shape == (2 * 98, 8 * 98, 3)
    cfg_yaml = client.download_artifacts(run.info.run_id, "config.yaml")
    assert config.load(config.TrainConfig, yaml_path=cfg_yaml).optim.lr == 0.4
    # The model: signature, input example, everything inference needs in its bundle.
    import mlflow

    model_uri = summary["registered"]["model_uri"]
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.inputs.input_names() == ["images"]
    assert info.saved_input_example_info is not None
    model = mlflow.pyfunc.load_model(model_uri)
    probs = model.predict(np.zeros((2, 50, 60, 3), np.uint8))
    assert probs.shape == (2, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    # Checkpoints under STORAGE/NAME, with the MLflow run id for restarts and --resume.
    assert (storage / "good" / "mlflow_run_id").read_text() == run.info.run_id


@pytest.mark.slow
def test_a_worse_second_training_stays_challenger(good_run, shards, mlflow_home,
                                                  tmp_path_factory):
    first, _ = good_run
    client = MlflowClient(mlflow_home)
    assert client.get_model_version_by_alias("alexnet", "champion").version == \
        first["registered"]["version"]
    # lr 0: the model stays at its initialisation, chance level on 4 classes; its val error
    # never improves, so early stopping (patience 1) ends it after its second epoch.
    cfg = _ray_cfg(shards, tmp_path_factory.mktemp("ckpt"), epochs=5, lr=0.0,
                   early_stop_patience=1, max_failures=0, name="worse")
    second = run_train(cfg)
    assert second["epochs_run"] == 2
    assert first["val_top1_error"] < second["val_top1_error"]
    assert second["registered"]["alias"] == "challenger"
    champion = client.get_model_version_by_alias("alexnet", "champion")
    challenger = client.get_model_version_by_alias("alexnet", "challenger")
    assert champion.version == first["registered"]["version"]
    assert challenger.version == second["registered"]["version"]
    assert float(challenger.tags["val_top1_error"]) == pytest.approx(second["val_top1_error"])


@pytest.mark.slow
def test_a_killed_worker_is_restarted_from_the_last_checkpoint(shards, mlflow_home,
                                                               tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    # Rank 1 SIGKILLs its own process at step 1 of epoch 2 (once: the marker stays).
    monkeypatch.setenv(CHAOS_ENV, json.dumps({"rank": 1, "epoch": 2, "step": 1,
                                              "marker": str(marker)}))
    cfg = _ray_cfg(shards, tmp_path / "ckpt", epochs=4, max_failures=1, name="chaos",
                   register=False)
    summary = run_train(cfg)
    pid = int(marker.read_text().split()[2])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker process is really gone
    client = MlflowClient(mlflow_home)
    run_id = summary["run_id"]
    restored = _history(client, run_id, "restored_at_epoch")
    # Epoch 2 died: the group restarts from the checkpoint of epoch 1 (or 0, if the kill
    # beat the controller to registering it) and goes on in the same MLflow run.
    assert len(restored) == 1 and restored[0][1] in (1, 2), restored
    for key in ("train_loss", "val_top1_error", "lr", "images_per_s"):
        assert [s for s, _ in _history(client, run_id, key)] == [0, 1, 2, 3], key
    assert summary["epochs_run"] == 4
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_resume_continues_a_stopped_training_in_the_same_mlflow_run(shards, mlflow_home,
                                                                    tmp_path, capsys):
    import workflow

    storage = f"file://{tmp_path / 'ckpt'}"  # any pyarrow URI, resolved by pyarrow
    cfg = _ray_cfg(shards, storage, epochs=2, max_failures=0, name="resumable",
                   register=False)
    first = run_train(cfg)
    capsys.readouterr()
    # The stored config supplies --data, the model and the recipe; the flags given win.
    rc = workflow.main(["train", "--resume", "--name", "resumable", "--storage", storage,
                        "--epochs", "3", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    second = json.loads(out[out.index("{"):])
    assert second["run_id"] == first["run_id"] and second["run_name"] == "resumable"
    client = MlflowClient(mlflow_home)
    run_id = first["run_id"]
    assert [s for s, _ in _history(client, run_id, "train_loss")] == [0, 1, 2]
    assert _history(client, run_id, "restored_at_epoch") == [(2, 2.0)]
    assert any(a.path == "resumes" for a in client.list_artifacts(run_id))
    with pytest.raises(TrainError, match=r"no run 'nothing'.*\['resumable'\]"):
        run_train(_ray_cfg(shards, storage, epochs=1, name="nothing", resume=True))
