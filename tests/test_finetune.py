"""End to end on real files: fine-tune a trained model into another dataset with real Ray
Train and a real sqlite MLflow, and import published-style weights into the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import workflow
from pipelines import config
from pipelines.data.preprocess import run_preprocess
from pipelines.data.sample import make_sample
from pipelines.train.launcher import run_train


def _shards(root: Path, classes: int, seed: int) -> Path:
    make_sample(root / f"src{classes}", classes=classes, train_per_class=24, val_per_class=6,
                seed=seed, min_side=40, max_side=64)
    run_preprocess(config.PreprocessConfig(source=str(root / f"src{classes}"),
                                      out=str(root / f"shards{classes}"), resize=32))
    return root / f"shards{classes}"


def _cfg(data: Path, storage: Path, name: str, epochs: int, **model) -> config.TrainConfig:
    cfg = config.TrainConfig()
    cfg.data.data, cfg.data.crop, cfg.data.loader_workers = str(data), 32, 0
    cfg.model.variant, cfg.model.dropout = "cifar", 0.0  # a few dozen images: learn fast
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.optim.batch_size, cfg.optim.lr = 16, 0.4   # 0.05 per global batch of 16
    cfg.run.workers, cfg.run.epochs, cfg.run.name = 1, epochs, name
    cfg.run.storage, cfg.run.max_failures = str(storage), 0
    cfg.tracking.registered_model = name
    return cfg


def _losses(client, run_id: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, "train_loss"),
                                    key=lambda m: m.step)]


@pytest.mark.slow
def test_fine_tuning_a_4_class_model_into_3_classes(ray_local, tmp_path, mlflow_uri):
    from pipelines.serve.bundle import WEIGHTS

    four, three = _shards(tmp_path, 4, seed=3), _shards(tmp_path, 3, seed=4)
    storage = tmp_path / "ckpt"
    base = run_train(_cfg(four, storage, "base", epochs=8))
    source = "models:/base@champion"

    cfg = _cfg(three, storage, "tuned", epochs=2, init_from=source, freeze="features")
    cfg.tracking.description = "fine-tune the 4-class model on 3 classes"
    tuned = run_train(cfg)
    scratch = run_train(_cfg(three, storage, "scratch", epochs=2))

    client = MlflowClient(mlflow_uri)
    tuned_loss, scratch_loss = (_losses(client, s["run_id"]) for s in (tuned, scratch))
    print(f"\nbase (4 classes, 8 epochs): val top-1 error {base['val_top1_error']:.3f}; train "
          f"loss per epoch on 3 classes: fine-tuned {[round(x, 4) for x in tuned_loss]} (val "
          f"error {tuned['val_top1_error']:.3f}), from scratch "
          f"{[round(x, 4) for x in scratch_loss]} (val error {scratch['val_top1_error']:.3f})")
    assert tuned_loss[0] < scratch_loss[0] and tuned_loss[1] < scratch_loss[1], \
        (tuned_loss, scratch_loss)
    assert tuned["val_top1_error"] < scratch["val_top1_error"]

    # The frozen conv layers are bit-identical to the source's after training.
    before = torch.load(Path(base["checkpoint"]) / WEIGHTS, weights_only=True)
    after = torch.load(Path(tuned["checkpoint"]) / WEIGHTS, weights_only=True)
    features = [k for k in before if k.startswith("features.")]
    assert features and all(torch.equal(before[k], after[k]) for k in features)
    assert not torch.equal(before["classifier.1.weight"], after["classifier.1.weight"])
    assert after["classifier.6.weight"].shape[0] == 3

    run = client.get_run(tuned["run_id"])
    assert run.data.params["model.init_from"] == source
    assert run.data.tags["init_from.resolved"] == "models:/base/1"
    assert "last layer replaced: the weights have 4 classes, the data 3 (3 in common)" in \
        run.data.tags["init_from.notes"]
    assert run.data.tags["mlflow.note.content"] == "fine-tune the 4-class model on 3 classes"
    record = json.loads((storage / "tuned" / "init_from.json").read_text())
    assert record["resolved"] == "models:/base/1" and record["stats"]["std"]


@pytest.mark.slow
def test_imported_torchvision_weights_are_served_like_a_trained_model(tmp_path, mlflow_uri,
                                                                      tiny_source, capsys):
    import torchvision

    from pipelines.serve.predict import predict_files

    torch.manual_seed(0)
    model = torchvision.models.alexnet(num_classes=4).eval()
    weights = tmp_path / "alexnet-tv.pth"
    torch.save(model.state_dict(), weights)
    mapping = tiny_source / "LOC_synset_mapping.txt"

    assert workflow.main(["import-weights", str(weights), "--variant", "torchvision",
                          "--classes", str(mapping), "--alias", "champion"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"imported {weights} (torchvision, 4 classes) as "
                           "models:/alexnet-torchvision/1 (alias champion)"), line
    mv = MlflowClient(mlflow_uri).get_model_version_by_alias("alexnet-torchvision", "champion")
    assert str(mv.version) == "1" and mv.tags["classes_sha256"]

    # The logged model carries the serving code only, not Ray, training or preprocessing.
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts("models:/alexnet-torchvision/1",
                                                     dst_path=str(tmp_path / "dl")))
    carried = sorted(str(p.relative_to(local / "code" / "pipelines"))
                     for p in (local / "code" / "pipelines").rglob("*.py"))
    assert carried == ["__init__.py", "data/__init__.py", "data/decode.py",
                       "serve/__init__.py", "serve/bundle.py", "serve/model.py",
                       "serve/pyfunc_model.py"]
    assert (local / "code" / "alexnet" / "model.py").is_file()

    image = sorted((tiny_source / "train").rglob("*.JPEG"))[0]
    result = predict_files([str(image)], ["models:/alexnet-torchvision@champion"], top=4,
                           amp=False)[0]
    # The served model is the imported one: same probabilities as torchvision's own
    # module on the same preprocessed input.
    from pipelines.serve.bundle import make_crops, read_info
    from pipelines.serve.model import to_input
    from pipelines.serve.predict import resolve_model

    info = read_info(resolve_model("models:/alexnet-torchvision@champion").bundle)
    assert info["resize"] == 256 and info["input_size"] == 224
    assert round(info["mean"][0], 3) == 123.675 and round(info["std"][2], 3) == 57.375
    from pipelines.data.decode import decode_rgb

    rgb = decode_rgb(image.read_bytes())
    x = to_input(make_crops(rgb, (256, 224), False)[None], info)
    with torch.no_grad():
        expected = torch.softmax(model(x), 1)[0]
    got = {t["wnid"]: t["prob"] for t in result["top"]}
    for i, c in enumerate(info["classes"]):
        assert abs(got[c["wnid"]] - float(expected[i])) < 1e-4

    # Wrong variant and wrong class list: one line each, exit 2.
    assert workflow.main(["import-weights", str(weights), "--variant", "paper",
                          "--classes", str(mapping)]) == 2
    assert "holds torchvision weights, not paper: give --variant torchvision" in \
        capsys.readouterr().err
    three = tmp_path / "three.txt"
    three.write_text("a A\nb B\nc C\n")
    assert workflow.main(["import-weights", str(weights), "--variant", "torchvision",
                          "--classes", str(three)]) == 2
    assert "has 4 classes in its last layer, --classes" in capsys.readouterr().err
