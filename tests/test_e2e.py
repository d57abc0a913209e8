"""End to end on real local Ray, real sqlite MLflow, real LMDB and JPEG files:
preprocess -> train (2 workers, 2 epochs) -> registered + champion -> batch-infer."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from pipelines import config
from pipelines.data.preprocess import run_preprocess
from pipelines.serve.infer import InferError, run_batch_infer
from pipelines.train.launcher import run_train

pytestmark = pytest.mark.slow


def _train_cfg(data: str, storage: str, **run) -> config.TrainConfig:
    cfg = config.TrainConfig()
    cfg.data.data, cfg.data.crop, cfg.data.loader_workers = data, 32, 0
    cfg.model.variant, cfg.model.init = "cifar", "default"
    cfg.optim.batch_size, cfg.optim.lr = 8, 0.02
    cfg.run.epochs, cfg.run.workers, cfg.run.storage, cfg.run.max_failures = 2, 2, storage, 0
    for k, v in run.items():
        setattr(cfg.run, k, v)
    return cfg


def test_preprocess_train_register_infer(ray_local, tiny_source, tmp_path, mlflow_uri):
    data = tmp_path / "shards"
    run_preprocess(config.PreprocessConfig(source=str(tiny_source), out=str(data), resize=40))

    cfg = _train_cfg(str(data), str(tmp_path / "ckpt"))
    cfg.data.cache_dir = str(tmp_path / "node-cache")  # as on a cluster without shared storage
    summary = run_train(cfg)
    cached = sorted(p.name for p in (tmp_path / "node-cache").glob("*/train/*.lmdb"))
    assert cached == ["shard-00000.lmdb"]  # the workers trained from the node-local copy
    client = MlflowClient(mlflow_uri)
    run = client.get_run(summary["run_id"])
    # The whole resolved config is in the params, the dataset digest in the tags.
    assert run.data.params["optim.batch_size"] == "8"
    assert run.data.params["model.variant"] == "cifar"
    assert len(run.data.tags["dataset.manifest_sha256"]) == 64
    for key in ("train_loss", "val_loss", "val_top1_error", "val_top5_error", "lr",
                "images_per_s", "data_wait_fraction"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [0, 1], key  # each epoch once
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "classes.json", "dataset"} <= artifacts

    version = client.get_model_version_by_alias("alexnet", "champion")
    assert str(version.version) == str(summary["registered"]["version"])
    assert float(version.tags["val_top1_error"]) == pytest.approx(summary["val_top1_error"])

    out = tmp_path / "preds.parquet"
    result = run_batch_infer(config.InferConfig(input=str(tiny_source / "val"), output=str(out),
                                           batch_size=8))
    table = pq.read_table(out)
    assert table.num_rows == result["images"] == 12
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["top5_index"]) == 4 and len(row["top5_wnid"]) == 4  # 4 classes: top-4
    assert row["top5_prob"] == sorted(row["top5_prob"], reverse=True)
    assert abs(sum(row["top5_prob"]) - 1) < 1e-4
    assert row["error"] is None and row["model_uri"] == "models:/alexnet@champion"
    # Flat val has no wnid folders: no labels known from the tree.
    assert result["labelled"] == 0

    # The shards carry labels: accuracy is computed and matches the rows.
    res2 = run_batch_infer(config.InferConfig(input=str(data), split="val",
                                         output=str(tmp_path / "p2.parquet"), batch_size=8))
    t2 = pq.read_table(tmp_path / "p2.parquet")
    assert res2["labelled"] == t2.num_rows == 12
    assert res2["top1_accuracy"] == pytest.approx(sum(t2["correct_top1"].to_pylist()) / 12)

    with pytest.raises(InferError, match=r"versions of 'alexnet': \[1\]"):
        run_batch_infer(config.InferConfig(model="models:/alexnet/7", input=str(data),
                                      output=str(tmp_path / "x.parquet")))
