"""Start from weights: read them from anywhere a model lives, and fit them to a new run.

    python workflow.py train --data data/sample-shards --init-from models:/alexnet@champion
    python workflow.py train --data voc-shards --init-from alexnet-owt-7be5be79.pth \
        --variant torchvision --freeze features
    python workflow.py import-weights alexnet-owt-7be5be79.pth --variant torchvision \
        --classes LOC_synset_mapping.txt --alias champion

A source (`--init-from REF`) is a registered model (`models:/NAME@ALIAS`, `models:/NAME/N`),
a run's model (`runs:/ID/model`), a checkpoint or bundle directory, or a `.pth`/`.pt` state
dict in this project's or torchvision's layout (torchvision's published
`alexnet-owt-7be5be79.pth` is one). Everything is read with `torch.load(weights_only=True)`.

`fit_to_model` checks the source against the model being trained, layer by layer: the
variant (and the paper variant's groups) must match, every layer but the last must have
the same shape, and the last layer (fc8, the class head) is kept, re-ordered by wnid or
replaced, and the notes say which.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: The class head: fc8 in every variant (torchvision's index, kept by all three layouts).
HEAD = "classifier.6"
STATE_DICT_SUFFIXES = (".pth", ".pt")

# ImageNet's statistics in pixel units (torchvision's 0-1 values x 255): what torchvision's
# published weights were trained with, and what `import-weights` writes in inference.json.
IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


class WeightsError(ValueError):
    """The weights cannot start this model; the message names the layers or the variant."""


@dataclass
class Source:
    """Weights read from a reference, with what is known about them."""

    ref: str
    state: dict[str, torch.Tensor]
    variant: str
    groups: int
    classes: list[dict] | None = None   # the class index, when the source carries one
    info: dict | None = None            # the bundle's inference.json, when there is one
    resolved: str = ""                  # models:/NAME/VERSION an alias resolved to, etc.
    sha256: str = ""                    # of a state-dict file


@dataclass
class Fitted:
    state: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)


def _unwrap_state(obj, ref: str) -> dict[str, torch.Tensor]:
    """A state dict from what a .pth holds: the dict itself, or one under a usual key
    (`state_dict`, `model`), with DDP's `module.` prefixes dropped."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{ref}: not a state dict (a mapping of layer names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def detect_variant(state: dict[str, torch.Tensor], ref: str = "weights") -> tuple[str, int]:
    """(variant, groups) of a state dict, from its first two conv layers: conv1 96x3x11x11
    is the paper layout (conv2 with 48 input channels a filter: groups 2), 64x3x11x11
    torchvision's, 64x3x5x5 the cifar one."""
    conv1, conv2 = state.get("features.0.weight"), state.get("features.4.weight")
    if conv1 is None:
        conv2 = None
    shape = tuple(conv1.shape) if conv1 is not None else None
    if shape == (96, 3, 11, 11) and conv2 is not None:
        return "paper", 96 // conv2.shape[1]
    if shape == (64, 3, 11, 11):
        return "torchvision", 1
    if shape == (64, 3, 5, 5):
        return "cifar", 1
    raise WeightsError(f"{ref}: not an AlexNet state dict of a known variant (conv1 "
                       f"`features.0.weight` is {list(shape) if shape else 'missing'}; "
                       "paper: [96, 3, 11, 11], torchvision: [64, 3, 11, 11], cifar: "
                       "[64, 3, 5, 5])")


def read_state_file(path: str | os.PathLike) -> Source:
    """A `.pth`/`.pt` state dict (this project's layout or torchvision's)."""
    path = Path(path)
    data = path.read_bytes()  # read once: hashed and loaded from memory (240 MB for AlexNet)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refused or a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise WeightsError(f"{path}: not loadable as plain tensors with weights_only=True "
                           f"({first}); only state dicts are accepted, never pickled code") \
            from None
    state = _unwrap_state(obj, str(path))
    variant, groups = detect_variant(state, str(path))
    return Source(ref=str(path), state=state, variant=variant, groups=groups,
                  sha256=hashlib.sha256(data).hexdigest())


def read_source(ref: str) -> Source:
    """The weights behind `ref` (see the module docstring); MLflow references are
    downloaded to a temp dir that is gone when this returns."""
    from pipelines.serve.bundle import INFERENCE, WEIGHTS, read_info
    from pipelines.serve.predict import resolve_model

    if ref.endswith(STATE_DICT_SUFFIXES) and not os.path.isdir(ref):
        if not os.path.isfile(ref):
            raise WeightsError(f"--init-from {ref}: no such file")
        return read_state_file(ref)
    with tempfile.TemporaryDirectory() as tmp:
        model = resolve_model(ref, tmp)
        info = read_info(model.bundle)
        state = torch.load(Path(model.bundle) / WEIGHTS, map_location="cpu", weights_only=True)
    resolved = f"models:/{model.name}/{model.version}" if model.version else model.uri
    if not info.get("classes"):
        raise WeightsError(f"{ref}: its {INFERENCE} has no class index")
    return Source(ref=ref, state=state, variant=info["variant"],
                  groups=int(info.get("groups", 1)), classes=info["classes"], info=info,
                  resolved=resolved)


def _head_rows(source: Source, target_classes: list[dict]) -> tuple[list[int] | None, str]:
    """Which rows of the source's head give the target's classes, in the target's order
    (None: replace the head), and the note that says what was done."""
    rows = source.state[f"{HEAD}.weight"].shape[0]
    n = len(target_classes)
    if source.classes is None:  # a bare state dict: no wnids to compare
        if rows == n:
            return list(range(n)), (f"last layer kept: {n} classes, assumed in the data's "
                                    "class order (the weights carry no class index)")
        return None, f"last layer replaced: the weights have {rows} classes, the data {n}"
    src = [c["wnid"] for c in source.classes]
    dst = [c["wnid"] for c in target_classes]
    if src == dst:
        return list(range(n)), f"last layer kept: the same {n} classes in the same order"
    if sorted(src) == sorted(dst):
        where = {w: i for i, w in enumerate(src)}
        return [where[w] for w in dst], (f"last layer kept, its {n} rows re-ordered by wnid "
                                         "(the same classes in another order)")
    shared = len(set(src) & set(dst))
    return None, (f"last layer replaced: the weights have {len(src)} classes, the data {n} "
                  f"({shared} in common)")


def fit_to_model(source: Source, model: torch.nn.Module, variant: str, groups: int,
                 target_classes: list[dict]) -> Fitted:
    """The state dict that starts `model` (built for `variant`/`groups`/`target_classes`)
    from `source`: every layer but the head taken as is, the head kept, re-ordered by wnid
    or left as `model` initialised it. Shapes that differ are an error naming each layer."""
    if source.variant != variant:
        raise WeightsError(f"--init-from {source.ref} holds {source.variant} weights; this "
                           f"run builds the {variant} variant: train with --variant "
                           f"{source.variant}")
    if variant == "paper" and source.groups != groups:
        raise WeightsError(f"--init-from {source.ref} holds paper weights with groups "
                           f"{source.groups}; this run builds groups {groups}: train with "
                           f"--groups {source.groups}")
    target = model.state_dict()
    missing = sorted(set(target) - set(source.state))
    extra = sorted(set(source.state) - set(target))
    if missing or extra:
        raise WeightsError(f"--init-from {source.ref} does not fit the {variant} layout: "
                           f"missing {missing or 'nothing'}, unexpected {extra or 'nothing'}")
    rows, note = _head_rows(source, target_classes)
    head = {f"{HEAD}.weight", f"{HEAD}.bias"}
    wrong = [f"{k} {list(v.shape)} (the model has {list(target[k].shape)})"
             for k, v in source.state.items() if k not in head and v.shape != target[k].shape]
    if wrong:
        raise WeightsError(f"--init-from {source.ref}: layers of another shape: "
                           f"{'; '.join(wrong)}; nothing was loaded")
    state = {k: v.to(target[k].dtype) for k, v in source.state.items() if k not in head}
    for key in head:
        state[key] = source.state[key][rows].clone() if rows is not None else \
            target[key].detach().clone()
    return Fitted(state=state, notes=[note])


def imagenet_info(variant: str, groups: int, classes: list[dict]) -> dict:
    """inference.json for published ImageNet weights: torchvision's evaluation transform
    (resize 256, centre crop 224, mean/std normalisation)."""
    from alexnet import INPUT_SIZE

    return {"variant": variant, "groups": groups, "num_classes": len(classes),
            "input_size": INPUT_SIZE[variant], "resize": 256, "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "classes": classes, "epoch": None}


def read_class_file(path: str | os.PathLike) -> list[dict]:
    """ImageNet's `LOC_synset_mapping.txt` (`<wnid> <name>` a line, in class-index order),
    or any text file of one class a line."""
    classes = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            classes.append({"index": len(classes), "wnid": wnid, "name": name or wnid})
    if not classes:
        raise WeightsError(f"--classes {path}: no classes in it (expected `<wnid> <name>` "
                           "lines, as LOC_synset_mapping.txt)")
    return classes


def import_weights(path: str, variant: str, classes_file: str, name: str = "",
                   alias: str = "", experiment: str = "alexnet") -> dict:
    """`workflow.py import-weights`: published weights (a state dict) -> a servable bundle
    with ImageNet's inference.json -> an MLflow model with a signature, in a run of its own
    -> a registered version (with `alias`, when given). Returns what was made."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.serve.model import load_bundle, save_bundle
    from pipelines.train import tracking
    from pipelines.train.registry import log_bundle_model

    source = read_state_file(path)
    if source.variant != variant:
        raise WeightsError(f"{path} holds {source.variant} weights, not {variant}: give "
                           f"--variant {source.variant}")
    classes = read_class_file(classes_file)
    rows = source.state[f"{HEAD}.weight"].shape[0]
    if rows != len(classes):
        raise WeightsError(f"{path} has {rows} classes in its last layer, --classes "
                           f"{classes_file} lists {len(classes)}: give the class list the "
                           "weights were trained with")
    name = name or f"alexnet-{variant}"
    info = imagenet_info(variant, source.groups, classes)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = save_bundle(Path(tmp) / "bundle", source.state, info)
        try:
            load_bundle(bundle)  # strict: every layer there, every shape right
        except RuntimeError as exc:
            raise WeightsError(f"{path} does not load into the {variant} layout: "
                               f"{str(exc).splitlines()[0][:300]}") from None
        tracking.setup_mlflow()
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=f"import-{Path(path).stem}") as run:
            mlflow.log_params({"source_file": Path(path).name, "source_sha256": source.sha256,
                               "variant": variant, "groups": source.groups,
                               "num_classes": len(classes), "classes_file": Path(classes_file).name})
            mlflow.set_tags({"imported_from": Path(path).name,
                             "mlflow.note.content": f"Weights imported from {Path(path).name} "
                                                    "(not trained here)"})
            model_info = log_bundle_model(str(bundle))
            version = mlflow.register_model(model_info.model_uri, name,
                                            tags={"source_sha256": source.sha256,
                                                  tracking.CLASSES_TAG:
                                                      tracking.classes_digest(classes)})
    number = int(version.version)
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, str(number))
    return {"model_uri": f"models:/{name}/{number}", "name": name, "version": number,
            "alias": alias or None, "run_id": run.info.run_id, "variant": variant,
            "num_classes": len(classes), "sha256": source.sha256}
