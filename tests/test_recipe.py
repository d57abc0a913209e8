"""The training recipe's defaults: what "auto" resolves to, the paper variant's head and
init, bias decay, warmup, mean-only normalisation carried into the served bundle, the
checks that refuse a bad run before any worker starts, and (slow) that `train` with its own
defaults learns the demo sample.

    .venv/bin/python -m pytest -q tests/test_recipe.py -m "not slow"
    .venv/bin/python -m pytest -q tests/test_recipe.py            # + the demo run, ~6 min
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from test_ingest import write_dataset

from alexnet import PAPER_INIT_BIAS, build_model, init_paper_, min_input_size
from pipelines import config
from pipelines.data.shards import split_readers
from pipelines.train.errors import TrainError
from pipelines.train.ingest import make_loader
from pipelines.train.launcher import check_config
from pipelines.train.loop import (
    DeviceBatches,
    evaluate,
    inference_info,
    input_stats,
    train_one_epoch,
)
from pipelines.train.recipe import Warmup, param_groups

NO_AMP = torch.autocast("cpu", enabled=False)


def test_auto_values_resolve_to_the_paper_recipe_for_the_paper_variant():
    cfg = config.resolve_auto(config.TrainConfig())
    assert (cfg.model.variant, cfg.model.groups, cfg.model.init) == ("paper", 2, "paper")
    assert cfg.data.normalize == "mean"
    assert cfg.optim.warmup_epochs == 5  # 128 x 2 workers = 256 > 128
    tv = config.TrainConfig()
    tv.model.variant, tv.optim.batch_size, tv.run.workers = "torchvision", 64, 2
    config.resolve_auto(tv)
    assert (tv.model.groups, tv.model.init, tv.data.normalize) == (1, "default", "mean-std")
    assert tv.optim.warmup_epochs == 0  # global batch 128: no warmup
    explicit = config.TrainConfig()
    explicit.model.groups, explicit.optim.warmup_epochs = 1, 2
    assert config.resolve_auto(explicit).model.groups == 1
    assert explicit.optim.warmup_epochs == 2
    assert config.resolve_auto(explicit) == explicit  # idempotent


def test_paper_head_drops_the_outputs_of_fc6_and_fc7():
    net = build_model("paper", 10, groups=2)
    kinds = [type(m).__name__ for m in net.classifier]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert sum(p.numel() for p in build_model("paper", 1000, groups=2).parameters()) \
        == 60_965_224


def test_paper_init_positive_biases_default_to_point_one_and_follow_the_flag():
    net = build_model("paper", 10, groups=2)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    fcs = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert PAPER_INIT_BIAS == 0.1
    for m in (convs[1], convs[3], convs[4], fcs[0], fcs[1]):
        assert torch.all(m.bias == 0.1)
    for m in (convs[0], convs[2], fcs[2]):
        assert torch.all(m.bias == 0)
    assert torch.all(build_model("paper", 10, init_bias=1.0).classifier[0].bias == 1)
    assert torch.all(init_paper_(build_model("paper", 10)).classifier[3].bias == 1)


def test_biases_are_not_decayed_unless_asked():
    net = build_model("cifar", 3, init="default")
    groups = param_groups(net, 5e-4, bias_decay=False)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert all(p.ndim > 1 for p in groups[0]["params"])
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["params"]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    assert param_groups(net, 5e-4, bias_decay=True)[1]["weight_decay"] == 5e-4
    # One SGD step on a zero gradient moves the weights (decay) but not the biases.
    opt = torch.optim.SGD(groups, lr=1.0)
    before = {n: p.clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]) == (p.ndim == 1), n


def test_warmup_climbs_linearly_per_step_and_hands_back_the_scheduled_rate():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [], "weight_decay": 0}], lr=0.4)
    warmup = Warmup(epochs=2, steps_per_epoch=4)
    seen = []
    for epoch in range(3):
        for step in range(4):
            warmup.step(opt, epoch, step)
            seen.append(opt.param_groups[0]["lr"])
        warmup.end_epoch(opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.4)
    assert seen[:8] == pytest.approx([0.4 * (i + 1) / 8 for i in range(8)])
    assert seen[8:] == pytest.approx([0.4] * 4)
    assert warmup.active(1) and not warmup.active(2)
    restored = Warmup(epochs=2, steps_per_epoch=4)  # a restart in epoch 1: same rates
    restored.step(opt, 1, 0)
    assert opt.param_groups[0]["lr"] == pytest.approx(seen[4])


def test_mean_only_normalisation_reaches_the_served_bundle(tmp_path):
    root = write_dataset(tmp_path / "out", classes=3, train=6, val=3)
    m = json.loads((root / "manifest.json").read_text())
    cfg = config.TrainConfig()  # paper variant: mean only
    stats = input_stats(cfg, m)
    assert stats["std"] == [1.0, 1.0, 1.0] and stats["mean"] == m["stats"]["mean"]
    info = inference_info(cfg, m, 3)
    assert info["std"] == [1.0, 1.0, 1.0] and info["groups"] == 2
    cfg.data.normalize = "mean-std"
    assert inference_info(cfg, m, 3)["std"] == m["stats"]["std"]


def test_ten_crop_loss_stays_finite_for_a_confident_wrong_model(tmp_path):
    root = write_dataset(tmp_path / "out", classes=3, train=6, val=3)
    m = json.loads((root / "manifest.json").read_text())
    net = build_model("cifar", 3, init="default").eval()
    with torch.no_grad():  # always class 0 with logit 1000: softmax of the rest is 0.0
        net.classifier[-1].weight.zero_()
        net.classifier[-1].bias.copy_(torch.tensor([1000.0, 0.0, 0.0]))
    stats = {k: torch.tensor(v) for k, v in input_stats(config.TrainConfig(), m).items()}
    loader = make_loader(split_readers(root, m, "val"), 32, "ten", 4, 0, 1, 0, 0, False)
    got, _ = evaluate(net, loader, "cpu", stats, ten_crop=True, world=1, num_classes=3)
    assert math.isfinite(got["val_loss"]) and got["val_loss"] > 100


def test_the_cifar_variant_gets_pad_4_random_crops(tmp_path):
    root = write_dataset(tmp_path / "out", classes=2, train=4, val=0, side=32)
    m = json.loads((root / "manifest.json").read_text())
    loader = make_loader(split_readers(root, m, "train"), 32, "train", 4, 0, 1, 0, 0, False,
                         pad=4)
    images = torch.cat([loader_batch[0] for epoch in range(4)
                        for loader_batch in _epoch_batches(loader, epoch)])
    # Some crops start inside the zero padding: a black row or column at an edge.
    edges = torch.stack([images[:, 0].amax((1, 2)), images[:, -1].amax((1, 2)),
                         images[:, :, 0].amax((1, 2)), images[:, :, -1].amax((1, 2))])
    assert (edges == 0).any()
    assert images.shape[1:] == (32, 32, 3)


def _epoch_batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(loader)


@pytest.mark.slow
def test_paper_recipe_overfits_a_few_dozen_images(tmp_path):
    """The default recipe (paper variant, paper init, mean-only inputs, no bias decay) drives
    the training loss of 24 images well below chance in a few dozen steps."""
    root = write_dataset(tmp_path / "out", classes=3, train=24, val=0, side=72, seed=3)
    m = json.loads((root / "manifest.json").read_text())
    cfg = config.resolve_auto(config.TrainConfig())
    torch.manual_seed(0)
    net = build_model("paper", 3, groups=cfg.model.groups, init=cfg.model.init,
                      init_bias=cfg.model.init_bias, dropout=0.0)
    opt = torch.optim.SGD(param_groups(net, cfg.optim.weight_decay, False), lr=0.01,
                          momentum=0.9)
    stats = {k: torch.tensor(v) for k, v in input_stats(cfg, m).items()}
    loader = make_loader(split_readers(root, m, "train"), 64, "center", 8, 0, 1, 0, 0, False)
    losses = []
    for _ in range(25):
        ep = train_one_epoch(net, loader, opt, DeviceBatches(torch.device("cpu"), 64, False),
                             stats, None, NO_AMP)
        losses.append(ep["meter"].result()["loss"])
    assert losses[0] < 2 * math.log(3), losses  # no blow-up at the start
    assert min(losses[-3:]) < 0.1, losses


# --------------------------------------------------------------------------- before workers
def _cfg(root, **kw) -> config.TrainConfig:
    cfg = config.TrainConfig()
    cfg.data.data = str(root)
    for k, v in kw.items():
        section = next(s for s in ("data", "model", "optim", "run") if hasattr(getattr(cfg, s), k))
        setattr(getattr(cfg, section), k, v)
    return cfg


def test_a_crop_too_small_for_the_variant_is_refused(tmp_path):
    root = write_dataset(tmp_path / "out", side=40)
    assert min_input_size("paper") == 63 and min_input_size("cifar") == 15
    with pytest.raises(TrainError, match="--crop 32 is too small for the paper variant: its "
                                         "layers need at least 63 px"):
        check_config(_cfg(root, crop=32))


def test_cifar_on_large_images_is_refused(tmp_path):
    root = write_dataset(tmp_path / "out", side=256)
    with pytest.raises(TrainError, match="built for 32x32 images, but --crop is 224 on "
                                         "256-px shards"):
        check_config(_cfg(root, variant="cifar", crop=224))


def test_empty_pixel_statistics_are_refused_before_any_worker(tmp_path):
    root = write_dataset(tmp_path / "out", side=72)
    m = json.loads((root / "manifest.json").read_text())
    m["stats"] = {"pixels": 0, "mean": [0.0] * 3, "std": [0.0] * 3, "eigval": [0.0] * 3,
                  "eigvec": torch.eye(3).tolist()}
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TrainError, match="no pixel statistics .* a split named 'train'"):
        check_config(_cfg(root, crop=64))


# --------------------------------------------------------------------------- the acceptance
DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@pytest.mark.slow
def test_train_defaults_learn_the_demo_sample(ray_local, tmp_path, monkeypatch):
    """`train` with its own recipe (variant, init, normalisation, lr, schedule: nothing
    set) and only the demo's sizes (crop, batch, workers, epochs) on the demo sample: no
    blow-up in epoch 1 and val top-1 error <= 0.6 within 12 epochs."""
    from pipelines.data.preprocess import run_preprocess
    from pipelines.data.sample import make_sample
    from pipelines.train.launcher import run_train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    make_sample(tmp_path / "sample", classes=10, train_per_class=40, val_per_class=10)
    run_preprocess(config.PreprocessConfig(source=str(tmp_path / "sample"),
                                      out=str(tmp_path / "shards"), resize=128))
    cfg = config.TrainConfig()
    cfg.data.data = str(tmp_path / "shards")
    sizes = config.load(config.TrainConfig, yaml_path=str(DEMO))
    cfg.data.crop, cfg.data.loader_workers = sizes.data.crop, sizes.data.loader_workers
    cfg.optim.batch_size = sizes.optim.batch_size
    cfg.run.epochs, cfg.run.workers = sizes.run.epochs, sizes.run.workers
    cfg.run.storage, cfg.run.name = str(tmp_path / "ckpt"), "defaults"
    cfg.tracking.register = False
    summary = run_train(cfg)
    client = MlflowClient()
    history = {key: [m.value for m in sorted(client.get_metric_history(summary["run_id"], key),
                                             key=lambda m: m.step)]
               for key in ("train_loss", "val_top1_error")}
    params = client.get_run(summary["run_id"]).data.params
    assert params["model.variant"] == "paper" and params["data.normalize"] == "mean"
    assert history["train_loss"][0] < 2 * math.log(10), history
    assert min(history["val_top1_error"]) <= 0.6, history
