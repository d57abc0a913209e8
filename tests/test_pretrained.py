"""Starting from weights: reading sources, fitting them to a new model, fine-tuning options,
and importing published weights into the registry (real files, real sqlite MLflow)."""

from __future__ import annotations

import pickle

import pytest
import torch

from alexnet import build_model
from pipelines import config
from pipelines.train.pretrained import (
    HEAD,
    Source,
    WeightsError,
    detect_variant,
    fit_to_model,
    read_class_file,
    read_state_file,
)
from pipelines.train.recipe import freeze, make_optimizer, param_groups


def _classes(*wnids):
    return [{"index": i, "wnid": w, "name": w} for i, w in enumerate(wnids)]


def _source(variant="cifar", classes=None, num_classes=4, groups=1):
    torch.manual_seed(1)
    model = build_model(variant, num_classes, groups=groups)
    return Source(ref="src", state=model.state_dict(), variant=variant, groups=groups,
                  classes=classes)


def test_variants_are_told_apart_by_their_first_convs():
    for variant, groups in (("paper", 2), ("paper", 1), ("torchvision", 1), ("cifar", 1)):
        with torch.device("meta"):
            state = build_model(variant, 10, groups=groups).state_dict()
        assert detect_variant(state) == (variant, groups)
    with pytest.raises(WeightsError, match="features.0.weight"):
        detect_variant({"fc.weight": torch.zeros(2, 2)})


def test_same_classes_in_another_order_are_mapped_by_wnid():
    source = _source(classes=_classes("a", "b", "c", "d"))
    target = build_model("cifar", 4)
    fitted = fit_to_model(source, target, "cifar", 1, _classes("c", "a", "d", "b"))
    w = source.state[f"{HEAD}.weight"]
    assert torch.equal(fitted.state[f"{HEAD}.weight"], w[[2, 0, 3, 1]])
    assert "re-ordered by wnid" in fitted.notes[0]
    assert torch.equal(fitted.state["features.0.weight"], source.state["features.0.weight"])
    target.load_state_dict(fitted.state)  # complete and strict


def test_another_class_count_replaces_the_last_layer_and_says_so():
    source = _source(classes=_classes("a", "b", "c", "d"))
    target = build_model("cifar", 3)
    fitted = fit_to_model(source, target, "cifar", 1, _classes("a", "b", "x"))
    assert fitted.state[f"{HEAD}.weight"].shape == (3, 1024)
    assert torch.equal(fitted.state[f"{HEAD}.weight"], target.state_dict()[f"{HEAD}.weight"])
    assert fitted.notes == ["last layer replaced: the weights have 4 classes, the data 3 "
                            "(2 in common)"]


def test_a_variant_mismatch_names_the_variant_of_the_weights():
    source = _source("cifar", classes=_classes("a", "b", "c", "d"))
    with torch.device("meta"):
        target = build_model("torchvision", 4)
    with pytest.raises(WeightsError, match="holds cifar weights.*--variant cifar"):
        fit_to_model(source, target, "torchvision", 1, _classes("a", "b", "c", "d"))
    paper2 = _source("paper", groups=2, num_classes=2)
    with torch.device("meta"):
        target = build_model("paper", 2, groups=1)
    with pytest.raises(WeightsError, match="groups 2.*--groups 2"):
        fit_to_model(paper2, target, "paper", 1, _classes("a", "b"))


def test_layers_of_another_shape_are_named_and_nothing_loads():
    source = _source(classes=_classes("a", "b", "c", "d"))
    source.state["features.4.weight"] = torch.zeros(3, 3)   # wrong shape
    with pytest.raises(WeightsError, match=r"features\.4\.weight \[3, 3\]"):
        fit_to_model(source, build_model("cifar", 4), "cifar", 1, _classes("a", "b", "c", "d"))
    del source.state["features.4.weight"]
    with pytest.raises(WeightsError, match=r"missing \['features\.4\.weight'\]"):
        fit_to_model(source, build_model("cifar", 4), "cifar", 1, _classes("a", "b", "c", "d"))


def test_torchvision_state_dicts_load_and_pickled_code_is_refused(tmp_path):
    import torchvision

    path = tmp_path / "alexnet-tv.pth"
    torch.save({"module." + k: v for k, v in
                torchvision.models.alexnet(num_classes=5).state_dict().items()}, path)
    source = read_state_file(path)
    assert (source.variant, source.groups, len(source.sha256)) == ("torchvision", 1, 64)
    assert f"{HEAD}.weight" in source.state  # DDP's module. prefix dropped

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"features.0.weight": Payload()}))
    with pytest.raises(WeightsError, match="weights_only=True"):
        read_state_file(evil)


def test_freeze_and_body_lr_multiplier_shape_the_optimiser():
    net = build_model("cifar", 3)
    frozen = freeze(net, "features")
    assert frozen and all(not p.requires_grad for p in net.features.parameters())
    cfg = config.TrainConfig()
    cfg.model.body_lr_mult, cfg.optim.optimizer = 0.1, "adamw"
    opt = make_optimizer(cfg, net, 0.01)
    assert isinstance(opt, torch.optim.AdamW)
    n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_trainable
    assert opt.param_groups[0]["lr"] == 0.01       # the head, logged as `lr`
    assert {round(g["lr"], 6) for g in opt.param_groups} == {0.01, 0.001}
    assert {g["weight_decay"] for g in param_groups(net, 5e-4, False)} == {5e-4, 0.0}


def test_class_files_read_as_imagenet_synset_mappings(tmp_path):
    f = tmp_path / "map.txt"
    f.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n\n")
    assert read_class_file(f) == [{"index": 0, "wnid": "n01440764", "name": "tench, Tinca tinca"},
                                  {"index": 1, "wnid": "n01443537", "name": "goldfish"}]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(WeightsError, match="no classes"):
        read_class_file(tmp_path / "empty.txt")
