"""Typed configuration for every job, in one place.

Each job has one dataclass made of sections (ffcv-imagenet style). Every field carries a
default and a help string; the same fields become command-line flags (`--lr`, `--workers`, ...),
and a YAML file given with `--config` sets them too. Precedence: defaults < YAML < flags.
The resolved config is saved with every run (`config.yaml` beside the checkpoints, and as an
MLflow artifact), so a run can always be reproduced from what it wrote.

Nothing here is exec'd or filled in by decorators: YAML is parsed with `yaml.safe_load` and
unknown keys are an error, so a typo in a config file cannot silently fall back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field with a default, a help text and (optionally) allowed values."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- preprocess
@dataclass
class PreprocessConfig:
    source: str = opt("", "source dataset: a folder (ImageNet, ImageFolder, CIFAR batches, "
                      "Pascal VOC 2012) or an images list file")
    out: str = opt("", "output directory for shards, manifest.json and quarantine.jsonl")
    layout: str = opt("auto", "source layout; auto detects it and says which it found",
                      ("auto", "imagenet", "imagefolder", "images-list", "cifar", "voc"))
    voc_objects: bool = opt(False, "Pascal VOC (multi-label) read as one record per "
                            "non-difficult object, its box cropped with a margin of 0.08 x "
                            "the box side; default: one record per image, labelled with its "
                            "largest non-difficult object (--layout voc only)")
    resize: int = opt(256, "rescale so the shorter side is this many pixels")
    center_crop: bool = opt(True, "then keep the central resize x resize square (the paper's 256x256)")
    encoding: str = opt("jpeg", "record encoding: jpeg (small) or raw uint8 (no decode cost)",
                        ("jpeg", "raw"))
    quality: int = opt(90, "JPEG quality for encoding=jpeg")
    shard_size: float = opt(256.0, "target shard size in MB (ignored when --shards is set)")
    shards: int = opt(0, "number of shards per split (0: derive from --shard-size)")
    seed: int = opt(0, "seed of the record order across shards (training reads shards in order)")
    batch_size: int = opt(1024, "images per Ray Data block: one decode task, one staging file "
                          "per shard it touches (fewer when the input is small)")
    reduced_decode: bool = opt(True, "decode large JPEGs at 1/2, 1/4 or 1/8 size in the DCT "
                               "domain when the shorter side stays >= --resize (faster)")
    overwrite: bool = opt(False, "replace an existing OUT made with other parameters")
    dry_run: bool = opt(False, "list what would be done (counts per split and class, shards) "
                        "without writing anything")


# --------------------------------------------------------------------------- train
@dataclass
class DataSection:
    data: str = opt("", "preprocessed dataset directory (holds manifest.json)")
    train_split: str = opt("train", "split to train on")
    val_split: str = opt("val", "split to validate on (skipped when absent)")
    crop: int = opt(224, "training crop size (random crops of the stored images)")
    pca_alphastd: float = opt(0.1, "std of the PCA colour augmentation's alpha (0 turns it off)")
    normalize: str = opt("auto", "input normalisation: mean (subtract the mean RGB, as the "
                         "paper), mean-std (also divide by the std, as torchvision); auto: "
                         "mean for the paper variant, mean-std for the others",
                         ("auto", "mean", "mean-std"))
    loader_workers: int = opt(1, "DataLoader processes per training worker (decode + crop)")
    cache_dir: str = opt("", "copy the shards to this node-local directory first (once per "
                         "node, sha256-checked), for clusters without shared storage")
    decode_on_gpu: bool = opt(False, "decode training JPEGs on the GPU (nvJPEG via "
                              "torchvision.io.decode_jpeg); needs --gpu and JPEG shards")


@dataclass
class ModelSection:
    variant: str = opt("paper", "AlexNet layout", ("paper", "torchvision", "cifar"))
    groups: int = opt(0, "groups in conv2/4/5 of the paper variant: 2 is the paper's "
                      "two-GPU connectivity, 1 connects everything; 0: 2 for the paper "
                      "variant, 1 for the others")
    dropout: float = opt(0.5, "dropout on FC6 and FC7")
    init: str = opt("auto", "weight init: paper N(0, 0.01), default (PyTorch's), auto = "
                    "paper for the paper variant", ("auto", "paper", "default"))
    init_bias: float = opt(0.1, "the positive biases of the paper init (conv2/4/5, fc6/7); "
                           "the paper says 1, which blows the loss up and stalls it "
                           "(Caffe's bvlc_alexnet uses 0.1 for the same reason)")
    init_from: str = opt("", "start from these weights (a new run: new optimiser, epoch 1): "
                         "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, a "
                         "checkpoint or bundle dir, or a .pth state dict (this project's or "
                         "torchvision's layout); the last layer is replaced when the classes "
                         "differ")
    freeze: str = opt("none", "with --init-from: features trains the classifier only (the "
                      "conv layers stay bit-identical)", ("none", "features"))
    body_lr_mult: float = opt(1.0, "with --init-from: learning-rate multiplier of the "
                              "pretrained layers against the last layer (e.g. 0.1)")


@dataclass
class OptimSection:
    batch_size: int = opt(128, "images per worker per step (global batch = this x workers)")
    lr: float = opt(0.01, "learning rate for a global batch of 128; scaled linearly with the "
                    "global batch (lr x global/128)")
    optimizer: str = opt("sgd", "sgd (the paper's, with --momentum), adam or adamw (their "
                         "lr defaults to 1e-4 when --lr is not given)",
                         ("sgd", "adam", "adamw"))
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "weight decay, on the weights only (an L2 term for sgd "
                              "and adam, decoupled for adamw)")
    bias_decay: bool = opt(False, "apply the weight decay to biases too (Caffe's "
                           "bvlc_alexnet and cuda-convnet's configs do not)")
    warmup_epochs: int = opt(-1, "linear lr warmup over this many epochs, per step from "
                             "lr/steps to lr (Goyal et al. 2017); -1: 5 when the global "
                             "batch is above 128, else 0")
    schedule: str = opt("plateau", "lr schedule: plateau (divide by 10 when val error stalls, "
                        "at most --max-lr-drops times), step, cosine",
                        ("plateau", "step", "cosine"))
    lr_patience: int = opt(3, "epochs without val improvement before the lr drops (plateau)")
    max_lr_drops: int = opt(3, "most lr drops for the plateau schedule (the paper: three)")
    step_size: int = opt(30, "epochs between drops for the step schedule")
    early_stop_patience: int = opt(0, "stop after this many epochs without improvement (0: off)")


@dataclass
class RunSection:
    epochs: int = opt(90, "epochs to train")
    workers: int = opt(2, "Ray Train workers (one process each, DDP)")
    gpu: bool = opt(False, "one GPU per worker, NCCL; otherwise CPU workers with gloo")
    cpus_per_worker: int = opt(1, "CPUs reserved by each worker")
    placement_strategy: str = opt("PACK", "placement of the workers on the cluster's nodes: "
                                  "PACK (fewest nodes), SPREAD, STRICT_SPREAD (one worker a "
                                  "node), STRICT_PACK (one node)",
                                  ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    amp: bool = opt(True, "bf16 autocast + channels_last on GPU and on CPUs with native bf16 "
                    "(AVX512_BF16/AMX); fp32 elsewhere")
    compile: bool = opt(False, "torch.compile the model (GPU runs only; on CPU a note and skipped: "
                        "it measured slower than eager bf16 on the development CPU)")
    seed: int = opt(0, "seed of init, data order and augmentation")
    storage: str = opt("checkpoints", "checkpoint storage: local path or any pyarrow filesystem "
                       "URI (s3://bucket/dir, gs://..., file:///...)")
    name: str = opt("alexnet", "run name: checkpoints go to STORAGE/NAME")
    max_failures: int = opt(2, "worker-group restarts Ray Train may do after failures")
    resume: bool = opt(False, "continue the stopped run NAME from its last checkpoint")
    ten_crop: bool = opt(False, "validate with the paper's ten crops instead of the centre crop")


@dataclass
class TrackingSection:
    experiment: str = opt("alexnet", "MLflow experiment name")
    description: str = opt("", "the MLflow run's description (what this run tries)")
    registered_model: str = opt("alexnet", "Model Registry name to register the model under")
    register: bool = opt(True, "log, register and (if better) promote the model at the end")
    retry_minutes: float = opt(10.0, "at the end of training, keep retrying an unreachable "
                               "MLflow this long; then exit with status 3 and finish later "
                               "with `workflow.py register --run STORAGE/NAME`")
    allow_class_change: bool = opt(False, "let a model with another class index replace the "
                                   "champion (otherwise it stays challenger)")


@dataclass
class TrainConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)


def resolve_auto(cfg: TrainConfig) -> TrainConfig:
    """Replace every "auto" value of a train config by what it means for this run, in
    place, and return it; the saved config then says what ran. Idempotent."""
    paper = cfg.model.variant == "paper"
    if cfg.model.groups == 0:
        cfg.model.groups = 2 if paper else 1
    if cfg.model.init == "auto":
        cfg.model.init = "paper" if paper else "default"
    if cfg.data.normalize == "auto":
        # The paper only subtracts the mean; its N(0, 0.01) init and LRN constants were
        # chosen for inputs in pixel units (std ~ 60), not for unit-variance ones.
        cfg.data.normalize = "mean" if paper else "mean-std"
    if cfg.optim.warmup_epochs < 0:
        # Goyal et al.: linear scaling needs a gradual warmup once the batch is large.
        cfg.optim.warmup_epochs = 5 if cfg.optim.batch_size * cfg.run.workers > 128 else 0
    return cfg


# --------------------------------------------------------------------------- batch inference
@dataclass
class InferConfig:
    # A list: several models are an ensemble (softmax averaged). A plain string is accepted
    # too (one model), so YAML may say `model: models:/alexnet/3`.
    model: list[str] | str = opt(["models:/alexnet@champion"],
                                 "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model "
                                 "or a local checkpoint dir; repeat for an ensemble")
    input: str = opt("", "a folder tree of images, a preprocess OUT (its shards), an "
                     "images-list file ('class_id image_path' lines) or a .parquet/.csv file")
    split: str = opt("val", "split to read when INPUT is a preprocessed OUT")
    path_column: str = opt("path", "image path column of a .parquet/.csv INPUT")
    label_column: str = opt("label", "true class column (index or wnid) of a .parquet/.csv "
                            "INPUT, used when present")
    output: str = opt("predictions.parquet", "a .parquet/.csv file (one file, written by the "
                      "driver) or a directory (files written in parallel; for large inputs)")
    format: str = opt("auto", "output format; auto: from --output's extension, parquet for a "
                      "directory", ("auto", "parquet", "csv"))
    overwrite: bool = opt(False, "replace an existing --output file or non-empty directory")
    ten_crop: bool = opt(False, "average the softmax over the paper's ten crops (10x compute)")
    batch_size: int = opt(64, "images per decode batch and per model call")
    actors: int = opt(0, "model actors in the Ray Data actor pool (its minimum with "
                      "--max-actors); 0: one a core, at most 4, on the local Ray batch-infer "
                      "starts itself (one a GPU with --gpu), 1 on a cluster")
    max_actors: int = opt(0, "autoscale the pool from --actors up to this many (0: fixed size)")
    cpus_per_actor: int = opt(0, "CPUs reserved by each actor = its torch threads; 0: the "
                              "cores shared out among the actors on the local Ray batch-infer "
                              "starts itself (1 with --gpu), 1 on a cluster")
    gpu: bool = opt(False, "one GPU per actor")
    amp: bool = opt(True, "bf16 autocast + channels_last on GPU (fp16 without bf16) and on "
                    "CPUs with native bf16 (AVX512_BF16/AMX); fp32 elsewhere")
    log_to_mlflow: bool = opt(False, "log an evaluation run linked to the model version")
    experiment: str = opt("alexnet", "MLflow experiment of --log-to-mlflow's run")


# --------------------------------------------------------------------------- machinery
def _sections(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default_factory)]


def _resolved_type(cls: type, f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType):  # "int | None" -> int
        hint = next(a for a in hint.__args__ if a is not type(None))
    return hint


def _leaf_fields(cls: type) -> list[tuple[str | None, type, dataclasses.Field]]:
    """(section name or None, owning class, field) for every scalar field."""
    secs = _sections(cls)
    if not secs:
        return [(None, cls, f) for f in dataclasses.fields(cls)]
    return [(s.name, s.default_factory, f) for s in secs for f in dataclasses.fields(s.default_factory)]


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field (`--batch-size`), defaulting to None so YAML can fill it."""
    parser.add_argument("--config", help="YAML file with config values (flags override it)")
    for section, owner, f in _leaf_fields(cls):
        flag = "--" + f.name.replace("_", "-")
        typ = _resolved_type(owner, f)
        help_ = f"{f.metadata.get('help', '')} (default: {f.default if f.default is not dataclasses.MISSING else '...'})"
        if section:
            help_ += f" [{section}]"
        if typ is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, type=typ, default=None,
                                choices=f.metadata.get("choices"), help=help_)


def from_dict(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build `cls` from a (possibly nested) dict; unknown keys raise ValueError."""
    values = dict(values or {})
    secs = {s.name: s for s in _sections(cls)}
    if not secs:
        known = {f.name: f for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - set(known))
        if bad:
            raise ValueError(f"{where}: unknown key(s) {bad}; known: {sorted(known)}")
        return cls(**{k: _coerce(cls, known[k], v, where) for k, v in values.items()})
    kwargs: dict[str, Any] = {}
    leaf_owner = {f.name: s for s, _, f in _leaf_fields(cls)}
    nested: dict[str, dict] = {name: {} for name in secs}
    for key, val in values.items():
        if key in secs and isinstance(val, dict):
            nested[key].update(val)
        elif key in leaf_owner:  # flat YAML keys are allowed too: `lr: 0.02`
            nested[leaf_owner[key]][key] = val
        else:
            raise ValueError(f"{where}: unknown key {key!r}; sections: {sorted(secs)}")
    for name, sec in secs.items():
        kwargs[name] = from_dict(sec.default_factory, nested[name], f"{where}.{name}")
    return cls(**kwargs)


def _coerce(cls: type, f: dataclasses.Field, value: Any, where: str) -> Any:
    typ = _resolved_type(cls, f)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ in (int, float, str, bool) and not isinstance(value, typ):
        raise ValueError(f"{where}.{f.name}: expected {typ.__name__}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{where}.{f.name}: {value!r} is not one of {list(choices)}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: Any) -> dict[str, Any]:
    """`{"optim.lr": 0.01, ...}` - the shape MLflow params want."""
    out: dict[str, Any] = {}
    for key, val in to_dict(cfg).items():
        if isinstance(val, dict):
            out.update({f"{key}.{k}": v for k, v in val.items()})
        else:
            out[key] = val
    return out


def load(cls: type, args: argparse.Namespace | None = None, yaml_path: str | None = None) -> Any:
    """Defaults, then the YAML file (`--config`), then flags that were given."""
    values: dict[str, Any] = {}
    yaml_path = yaml_path or (getattr(args, "config", None) if args is not None else None)
    if yaml_path:
        text = Path(yaml_path).read_text()
        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of config keys")
    cfg = from_dict(cls, values, where=str(yaml_path or "config"))
    if args is not None:
        for section, owner, f in _leaf_fields(cls):
            val = getattr(args, f.name, None)
            if val is None:
                continue
            target = getattr(cfg, section) if section else cfg
            setattr(target, f.name, _coerce(owner, f, val, "flag"))
    return cfg


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
