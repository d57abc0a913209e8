"""Export a model for runtimes without this project: ONNX or TorchScript, plus its preprocessing.

    python workflow.py export models:/alexnet@champion --format onnx --out alexnet.onnx

writes `alexnet.onnx` and the sidecar `alexnet.onnx.json` (FILE + ".json"). The model file
holds only the network, fp32, eval mode (dropout off); a runtime must do the preprocessing
itself, and the sidecar says exactly what it is:

- `input`: name, NCHW float32 RGB, shape [batch, 3, crop, crop] with a dynamic batch;
- `preprocess`: decode to RGB, rescale the shorter side to `resize` (INTER_AREA when
  shrinking, bilinear when growing), centre crop `crop` x `crop`, then per channel
  `(pixel - mean) / std` with pixels in 0..255 (not divided by 255 first);
- `output`: name `logits`, [batch, num_classes] unnormalised logits - softmax over dim 1
  gives the probabilities `predict` and the MLflow model print; class i is
  `inference.classes[i]`;
- `inference`: the bundle's inference.json verbatim (what `model_package.to_input` and
  `preprocess_image` read), `source`: the model reference it came from.

The same JSON is embedded in the file: the ONNX model's metadata_props (key
`alexnet_workflow`, plus short keys mean/std/resize/crop/layout/output for model viewers),
and the TorchScript archive's extra file `alexnet_workflow.json`.

Every export is checked before it is moved into place: the written file is loaded back
(onnxruntime / torch.jit.load) and run on a batch of two images of random pixels, and its
output must equal the PyTorch model's (the bundle's own, fused LRN included) to 1e-4 relative
to the logits' magnitude; the largest difference is reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path

from pipelines.files import atomic_path

FORMATS = ("onnx", "torchscript")
SIDECAR_SUFFIX = ".json"
META_KEY = "alexnet_workflow"  # ONNX metadata_props key; "<key>.json" in a TorchScript archive
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Opset 18: the opset the torch.export-based exporter (onnxscript's torchlib) writes natively,
# so no version-converter pass rewrites the graph afterwards (asking for less is converted
# after the fact and can fail); every op AlexNet needs (Conv, MaxPool, AveragePool, Pad,
# Gemm) is plain in it, and onnxruntime has run it since 1.14 (2023).
ONNX_OPSET = 18
# Exported-vs-PyTorch check: max |diff| <= CHECK_RTOL * max(1, max |logit|). fp32 kernels of
# two runtimes sum in different orders; 1e-4 of the logits' scale is far above that noise
# (~1e-7 here) and far below any real mismatch.
CHECK_RTOL = 1e-4
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = "pip install 'alexnet-workflow[export]'"


class ExportError(RuntimeError):
    """The export cannot be done; the message says why and what to do."""


def sidecar_path(out: str | os.PathLike) -> Path:
    """`model.onnx` -> `model.onnx.json`: the suffix is appended, so two exports of one model
    in both formats side by side never share a sidecar."""
    out = Path(out)
    return out.with_name(out.name + SIDECAR_SUFFIX)


def check_target(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an OUT that exists (or whose sidecar does) unless `overwrite`; before any
    model is downloaded, so a mistake costs nothing."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory; give a file name such as "
                          f"{out / 'alexnet.onnx'}")
    if not overwrite:
        for path in (out, sidecar_path(out)):
            if path.exists():
                raise ExportError(f"{path} exists; pass --overwrite to replace it, or choose "
                                  "another --out")
    return out


def check_onnx_modules() -> None:
    """onnx + onnxscript (torch.onnx's exporter needs them) and onnxruntime (the check)."""
    import importlib.util

    missing = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)}, not installed: "
                          f"{INSTALL_HINT}")


def describe(info: dict, fmt: str, out: Path, source: dict) -> dict:
    """The sidecar: what a runtime needs to feed the exported model and read its output."""
    crop, classes = int(info["input_size"]), int(info["num_classes"])
    return {
        "format": fmt,
        "file": out.name,
        **({"onnx_opset": ONNX_OPSET} if fmt == "onnx" else {}),
        "source": source,
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32",
                  "channels": "RGB", "shape": ["batch", 3, crop, crop],
                  "batch": "dynamic"},
        "preprocess": {
            "steps": ["decode to RGB uint8",
                      "rescale so the shorter side is `resize` (INTER_AREA when shrinking, "
                      "bilinear when growing), keeping the aspect ratio",
                      "centre crop `crop` x `crop`",
                      "per channel (pixel - mean) / std, pixels in 0..255 (not /255)",
                      "HWC -> CHW, float32"],
            "resize": int(info["resize"]), "crop": crop,
            "mean": list(info["mean"]), "std": list(info["std"]), "pixel_range": [0, 255]},
        "output": {"name": OUTPUT_NAME, "kind": "logits", "shape": ["batch", classes],
                   "note": "unnormalised logits; softmax over dim 1 gives probabilities; "
                           "class i is inference.classes[i]"},
        "inference": info,
    }


def exportable(model):
    """A copy of `model` whose fused LRN (alexnet.lrn, a Python autograd.Function) is
    torch.nn.LocalResponseNorm with the same arguments: the same function (tests/test_lrn.py
    holds them equal), but made of plain ops. The fused one cannot be exported:
    torch.jit.save refuses its Python op, and torch.export fixed the batch size to the
    example's."""
    import copy

    from torch import nn

    from alexnet.lrn import LocalResponseNorm

    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LocalResponseNorm):
                setattr(module, name, nn.LocalResponseNorm(child.size, alpha=child.alpha,
                                                           beta=child.beta, k=child.k))
    return model.eval()


def _example(info: dict, n: int = 2):
    """`n` images of random pixels, preprocessed as the model's own inputs are."""
    import numpy as np

    from pipelines.serve.model import to_input

    size = int(info["input_size"])
    pixels = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return to_input(pixels, info)


def _write_onnx(model, example, tmp: Path, sidecar: dict) -> None:
    import onnx
    import torch

    batch = torch.export.Dim("batch")
    # The torch.export-based exporter (torch's default since 2.9, needs onnxscript): the
    # TorchScript-based one (dynamo=False) is deprecated and, with a dynamic batch, fails
    # on AdaptiveAvgPool2d ("input size not accessible").
    program = torch.onnx.export(
        model, (example,), None, dynamo=True, opset_version=ONNX_OPSET,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},), verbose=False)
    proto = program.model_proto
    pre = sidecar["preprocess"]
    props = {META_KEY: json.dumps(sidecar), "mean": json.dumps(pre["mean"]),
             "std": json.dumps(pre["std"]), "resize": str(pre["resize"]),
             "crop": str(pre["crop"]), "layout": "NCHW float32 RGB",
             "output": "logits (softmax over dim 1 for probabilities)"}
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    # One self-contained file (weights inside, not in FILE.data): AlexNet's 240 MB is far
    # under protobuf's 2 GB limit.
    onnx.save_model(proto, str(tmp))


def _run_onnx(path: Path, example):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: example.numpy()})[0]


@contextlib.contextmanager
def _quiet_jit():
    """torch 2.14 warns that torch.jit.* is deprecated, four lines per export; whoever runs
    `--format torchscript` asked for it knowingly (docs/batch-inference.md says so and points to ONNX).
    The tracer also warns about the one Python branch on a tensor in the model,
    nn.LocalResponseNorm's `if input.numel() == 0` (an empty batch), which is False for any
    real input; the check after export runs another batch size than the trace's."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated",
                                category=FutureWarning)
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean",
                                category=torch.jit.TracerWarning)
        yield


def _write_torchscript(model, example, tmp: Path, sidecar: dict) -> None:
    import torch

    # Traced, not scripted: the forward has no data-dependent control flow, and tracing
    # needs no TorchScript annotations in alexnet/. Batch 1 for the trace; the check runs
    # batch 2, so a batch size baked into the graph would fail it.
    with torch.no_grad(), _quiet_jit():
        traced = torch.jit.trace(model, example[:1])
        torch.jit.save(traced, str(tmp), _extra_files={f"{META_KEY}.json": json.dumps(sidecar)})


def _run_torchscript(path: Path, example):
    import torch

    with _quiet_jit():
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(example).numpy()


def export_model(ref: str, fmt: str, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """Resolve `ref` (anything `predict.resolve_model` takes), export it as `fmt` to `out`
    with the sidecar `out + ".json"`; returns a summary (paths, source, max_abs_diff)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = check_target(out, overwrite)
    if fmt == "onnx":
        check_onnx_modules()

    import numpy as np
    import torch

    from pipelines.serve.model import load_bundle
    from pipelines.serve.predict import resolve_model

    with tempfile.TemporaryDirectory(prefix="alexnet-export-") as dl:
        resolved = resolve_model(ref, dl)
        model, info = load_bundle(resolved.bundle)  # eval mode, CPU
    model = model.float()  # fp32 whatever the weights were saved in
    source = {"uri": resolved.uri, "name": resolved.name, "version": resolved.version,
              "run_id": resolved.run_id}
    sidecar = describe(info, fmt, out, source)
    example = _example(info)
    with torch.no_grad():
        expected = model(example).numpy()  # the bundle's model, fused LRN and all, in fp32

    write, run = ((_write_onnx, _run_onnx) if fmt == "onnx"
                  else (_write_torchscript, _run_torchscript))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only, no permission, a file in the way
        raise ExportError(f"cannot create {out.parent}: {exc.strerror or exc}") from None
    # Both files appear whole or not at all, and only once the model is checked.
    with atomic_path(out) as tmp, atomic_path(sidecar_path(out)) as tmp_side:
        write(exportable(model), example, tmp, sidecar)
        got = run(tmp, example)
        diff = float(np.abs(got - expected).max())
        limit = CHECK_RTOL * max(1.0, float(np.abs(expected).max()))
        if not diff <= limit:  # NaN fails too
            raise ExportError(f"the exported {fmt} model disagrees with PyTorch by {diff:.3g} "
                              f"(allowed {limit:.3g}); nothing was written to {out}")
        tmp_side.write_text(json.dumps(sidecar, indent=1))
    return {"out": str(out), "sidecar": str(sidecar_path(out)), "format": fmt,
            "source": source, "max_abs_diff": diff, "bytes": out.stat().st_size,
            "variant": info["variant"], "num_classes": int(info["num_classes"])}
