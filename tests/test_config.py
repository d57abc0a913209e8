"""One typed config: defaults < YAML < flags; unknown keys and bad values are errors."""

from __future__ import annotations

import pytest

from pipelines import config
from workflow import build_parser


def _parse(*argv):
    return build_parser().parse_args(["train", *argv])


def test_defaults_are_the_papers_recipe():
    cfg = config.load(config.TrainConfig)
    assert (cfg.optim.batch_size, cfg.optim.lr, cfg.optim.momentum) == (128, 0.01, 0.9)
    assert cfg.optim.weight_decay == 5e-4 and cfg.run.epochs == 90
    assert cfg.model.dropout == 0.5 and cfg.optim.max_lr_drops == 3


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.02\n  batch_size: 64\nepochs: 5\n")  # nested and flat keys
    cfg = config.load(config.TrainConfig, _parse("--config", str(path), "--batch-size", "32", "--no-amp"))
    assert cfg.optim.lr == 0.02          # from YAML
    assert cfg.optim.batch_size == 32    # the flag wins over YAML
    assert cfg.run.epochs == 5           # flat YAML key
    assert cfg.run.amp is False          # boolean flag
    assert cfg.run.workers == 2          # default


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = config.load(config.TrainConfig, _parse("--lr", "0.5", "--variant", "torchvision"))
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.load(config.TrainConfig, yaml_path=str(path)) == cfg
    flat = config.flatten(cfg)
    assert flat["optim.lr"] == 0.5 and flat["model.variant"] == "torchvision"


@pytest.mark.parametrize("text, match", [
    ("optim:\n  lrr: 0.1\n", "unknown key"),
    ("nosuch: 1\n", "unknown key"),
    ("model:\n  variant: vgg\n", "not one of"),
    ("optim:\n  batch_size: many\n", "expected int"),
    ("- a list\n", "mapping"),
])
def test_bad_yaml_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        config.load(config.TrainConfig, yaml_path=str(path))


def test_every_job_has_help_for_every_flag(capsys):
    for command in ("preprocess", "train", "batch-infer", "info", "make-sample"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        out = capsys.readouterr().out
        assert "--" in out and "usage" in out
