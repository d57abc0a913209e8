"""`workflow.py export`: the ONNX file (run by onnxruntime) and the TorchScript file (run by
torch.jit.load) give PyTorch's outputs on real JPEGs that were preprocessed with nothing but
the sidecar's values; the CLI exports a registered model (models:/ in a real sqlite MLflow);
an existing file is refused without --overwrite; missing ONNX packages are one line.

    .venv/bin/python -m pytest -q tests/test_export.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import IMAGENET_SAMPLE, register_bundle

import workflow
from pipelines.data.decode import decode_rgb
from pipelines.serve.export import INSTALL_HINT, META_KEY, export_model, sidecar_path
from pipelines.serve.model import load_bundle, preprocess_image, save_bundle, to_input

TOL = 1e-4  # max abs difference allowed between an exported model's logits and PyTorch's
# Per variant: (groups, crop, resize). The paper variant is the one with the 224 input,
# the two-group convs and LRN with the paper's k=2 (cifar has LRN too, at 32 px).
VARIANTS = {"cifar": (1, 32, 40), "paper": (2, 224, 256)}


def _classes(src) -> list[dict]:
    pairs = sorted(line.split(" ", 1) for line in
                   (src / "LOC_synset_mapping.txt").read_text().splitlines() if line)
    return [{"index": i, "wnid": w, "name": n.strip()} for i, (w, n) in enumerate(pairs)]


def _bundle(root, variant: str, classes: list[dict]):
    """A bundle whose logits are of a trained model's size (a few units): default init gives
    logits ~0.02, against which a 1e-4 tolerance would prove little, so every conv and linear
    weight is He-initialised (keeps the activations' scale through the ReLUs)."""
    from alexnet import build_model

    groups, crop, resize = VARIANTS[variant]
    torch.manual_seed(0)
    net = build_model(variant, len(classes), groups=groups, init="default")
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    info = {"variant": variant, "groups": groups, "num_classes": len(classes),
            "input_size": crop, "resize": resize, "mean": [124.0, 116.0, 104.0],
            "std": [58.0, 57.0, 57.0], "classes": classes}
    return save_bundle(root / variant, net.state_dict(), info)


@pytest.fixture(scope="module")
def jpegs(tiny_source) -> list[bytes]:
    """Real JPEG files: the generated sample's (always there), plus four ImageNet photos
    when the shared sample is beside the checkout (not needed: nothing skips without it)."""
    files = sorted((tiny_source / "val").glob("*.JPEG")) + \
        sorted((tiny_source / "train").rglob("*.JPEG"))[:5]
    if (IMAGENET_SAMPLE / "val").is_dir():
        files += sorted((IMAGENET_SAMPLE / "val").glob("*.JPEG"))[:4]
    return [f.read_bytes() for f in files]


@pytest.fixture(scope="module")
def bundles(tiny_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-bundles")
    classes = _classes(tiny_source)
    return {v: _bundle(root, v, classes) for v in VARIANTS}


def _sidecar_input(jpegs: list[bytes], sidecar: dict) -> np.ndarray:
    """The batch a runtime without the bundle would build: only the sidecar's `preprocess`
    values, through the project's own transform (decode, rescale, centre crop, normalise)."""
    pre = sidecar["preprocess"]
    info = {"resize": pre["resize"], "input_size": pre["crop"], "mean": pre["mean"],
            "std": pre["std"]}
    crops = np.stack([preprocess_image(decode_rgb(b), info) for b in jpegs])
    x = to_input(crops, info).numpy()
    assert x.dtype == np.float32 and list(x.shape[1:]) == sidecar["input"]["shape"][1:]
    return x


def _run_exported(path, fmt: str, x: np.ndarray) -> tuple[np.ndarray, dict]:
    """Logits of the exported file, and the sidecar JSON the file itself embeds."""
    if fmt == "onnx":
        onnx = pytest.importorskip("onnx")
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["input"]
        out = session.run(["logits"], {"input": x})[0]
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False)
                .metadata_props}
        assert json.loads(meta["mean"]) == json.loads(meta[META_KEY])["preprocess"]["mean"]
        return out, json.loads(meta[META_KEY])
    extra = {f"{META_KEY}.json": ""}
    model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    return out, json.loads(extra[f"{META_KEY}.json"])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("variant", ["cifar", pytest.param("paper", marks=pytest.mark.slow)])
def test_exported_model_equals_pytorch_on_real_jpegs(bundles, jpegs, tmp_path, fmt, variant):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / "new" / "dir" / f"alexnet.{fmt}"  # parent dirs are created
    summary = export_model(str(bundles[variant]), fmt, out)
    assert summary["out"] == str(out) and out.is_file()
    sidecar = json.loads(sidecar_path(out).read_text())
    assert not list(out.parent.glob(".*.tmp"))  # the temp files were renamed or removed

    # The sidecar says everything about input and output, and holds inference.json whole.
    model, info = load_bundle(bundles[variant])
    assert sidecar["inference"] == info and sidecar["format"] == fmt
    assert sidecar["input"] == {"name": "input", "layout": "NCHW", "dtype": "float32",
                                "channels": "RGB", "batch": "dynamic",
                                "shape": ["batch", 3, info["input_size"], info["input_size"]]}
    assert sidecar["output"]["kind"] == "logits"
    assert sidecar["output"]["shape"] == ["batch", info["num_classes"]]

    x = _sidecar_input(jpegs, sidecar)  # a batch of 17-21, not the export's 1 or 2
    got, embedded = _run_exported(out, fmt, x)
    assert embedded == sidecar

    # PyTorch's side: the bundle's own model (fused LRN) on the bundle's own preprocessing.
    crops = np.stack([preprocess_image(decode_rgb(b), info) for b in jpegs])
    with torch.no_grad():
        expected = model(to_input(crops, info)).numpy()
    diff = float(np.abs(got - expected).max())
    print(f"\n{fmt} {variant}: {len(jpegs)} images, logits up to "
          f"{np.abs(expected).max():.2f}, max abs difference {diff:.3g}")
    assert got.shape == expected.shape == (len(jpegs), info["num_classes"])
    assert np.abs(expected).max() > 1.0  # the logits are not near zero (see _bundle)
    assert diff <= TOL
    # The output is logits: their softmax is what `predict` reports.
    from pipelines.serve.model import predict_proba

    probs = torch.softmax(torch.from_numpy(got), dim=1).numpy()
    np.testing.assert_allclose(probs, predict_proba(model, crops, info), atol=TOL)


def test_cli_exports_a_registered_model_and_refuses_to_overwrite(mlflow_uri, bundles,
                                                                  tmp_path, capsys):
    reg = register_bundle(bundles["cifar"], "alexnet-export", 0.5)
    out = tmp_path / "exported" / "alexnet.pt"
    argv = ["export", "models:/alexnet-export@champion", "--format", "torchscript",
            "--out", str(out)]
    assert workflow.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"model: models:/alexnet-export@champion (version {reg.version})" in printed
    assert f"wrote {out} (torchscript" in printed and str(sidecar_path(out)) in printed
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["source"] == {"uri": "models:/alexnet-export@champion",
                                 "name": "alexnet-export", "version": reg.version,
                                 "run_id": reg.run_id}

    before = out.read_bytes()
    assert workflow.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {out} exists; pass --overwrite to replace it, or choose another --out"
    assert out.read_bytes() == before

    assert workflow.main([*argv, "--overwrite"]) == 0
    assert "checked: its output equals PyTorch's" in capsys.readouterr().out


def test_an_existing_sidecar_alone_is_refused_too(bundles, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    sidecar_path(out).write_text("{}")
    assert workflow.main(["export", str(bundles["cifar"]), "--format", "onnx",
                          "--out", str(out)]) == 2
    assert "m.onnx.json exists; pass --overwrite" in capsys.readouterr().err
    assert not out.exists()


def test_missing_onnx_packages_is_one_line_with_the_install_command(bundles, tmp_path,
                                                                    monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real(name, *a))
    out = tmp_path / "m.onnx"
    assert workflow.main(["export", str(bundles["cifar"]), "--format", "onnx",
                          "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxscript" in err and INSTALL_HINT in err
    assert not out.exists() and not sidecar_path(out).exists()


@pytest.mark.parametrize("args, message", [
    (["no/such/dir", "--format", "torchscript"], "no such directory"),
    (["models:/nothing@champion", "--format", "torchscript"], "not found"),
])
def test_bad_references_are_one_line(mlflow_uri, tmp_path, capsys, args, message):
    out = tmp_path / "m.pt"
    assert workflow.main(["export", *args, "--out", str(out)]) == 2
    # The last line: a fresh sqlite store makes MLflow log its table creation first.
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert message in err.splitlines()[-1] and not out.exists()


def test_out_that_is_a_directory_is_refused(bundles, tmp_path, capsys):
    assert workflow.main(["export", str(bundles["cifar"]), "--format", "torchscript",
                          "--out", str(tmp_path)]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err
