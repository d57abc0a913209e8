"""Batch inference and every way to consume a registered model, on a real local Ray, a real
sqlite MLflow (models logged and registered by `pipelines.train.launcher.log_and_register`), real LMDB
shards and real JPEG files.

    .venv/bin/python -m pytest -q tests/test_infer.py            # everything
    .venv/bin/python -m pytest -q tests/test_infer.py -m "not slow"
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, register_bundle

from pipelines import config
from pipelines.serve.infer import InferError, run_batch_infer
from pipelines.serve.inputs import list_inputs
from pipelines.serve.model import predict_proba, preprocess_image, save_bundle
from pipelines.serve.output import SCHEMA
from pipelines.serve.predict import predict_files, resolve_model

CLASSES = 4


# --------------------------------------------------------------------------- fixtures
def _classes(src: Path) -> list[dict]:
    pairs = sorted(line.split(" ", 1) for line in
                   (src / "LOC_synset_mapping.txt").read_text().splitlines() if line)
    return [{"index": i, "wnid": w, "name": n.strip()} for i, (w, n) in enumerate(pairs)]


def _info(classes: list[dict]) -> dict:
    return {"variant": "cifar", "groups": 1, "num_classes": len(classes), "input_size": 32,
            "resize": 40, "mean": [128.0, 126.0, 124.0], "std": [60.0, 58.0, 62.0],
            "classes": classes}


def _val_labels(src: Path, classes: list[dict]) -> dict[str, int]:
    index = {c["wnid"]: c["index"] for c in classes}
    with open(src / "LOC_val_solution.csv", newline="") as fh:
        return {r["ImageId"]: index[r["PredictionString"].split()[0]] for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """4-class JPEG sample and two freshly initialised local bundles `a` and `b` (cheap);
    MLflow points at a module-wide sqlite store for the fixtures that register models."""
    from alexnet import build_model
    from pipelines.data.sample import make_sample

    root = tmp_path_factory.mktemp("infer")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.chdir(root)  # MLflow's default artifact root (./mlruns) lands here
    src = root / "src"
    make_sample(src, classes=CLASSES, train_per_class=20, val_per_class=5, seed=3,
                min_side=48, max_side=96)
    classes = _classes(src)
    bundles = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = build_model("cifar", CLASSES, init="default")
        bundles.append(save_bundle(root / f"bundle{seed}", net.state_dict(), _info(classes)))
    yield SimpleNamespace(root=root, src=src, classes=classes,
                          a=SimpleNamespace(bundle=bundles[0]),
                          b=SimpleNamespace(bundle=bundles[1]),
                          val=sorted((src / "val").iterdir()),
                          labels=_val_labels(src, classes))
    mp.undo()


@pytest.fixture(scope="module")
def registry(world):
    """`a` and `b` logged and registered as training does: alexnet v1 (champion) and v2
    (challenger); fills in world.a/b.run_id and .version."""
    for m, err in ((world.a, 0.5), (world.b, 0.6)):
        reg = register_bundle(m.bundle, "alexnet", err)
        m.run_id, m.version = reg.run_id, reg.version
    return world


@pytest.fixture(scope="module")
def trained(world):
    """A cifar AlexNet that actually learned the sample (40 Adam steps, ~0.7 val top-1 where
    chance is 0.25), registered as `alexnet-trained`."""
    from alexnet import build_model
    from pipelines.data.decode import decode_rgb
    from pipelines.serve.model import to_input

    info = _info(world.classes)
    xs, ys = [], []
    for c in world.classes:
        for f in sorted((world.src / "train" / c["wnid"]).iterdir()):
            xs.append(preprocess_image(decode_rgb(f.read_bytes()), info))
            ys.append(c["index"])
    x, y = to_input(np.stack(xs), info), torch.tensor(ys)
    torch.manual_seed(0)
    net = build_model("cifar", CLASSES, init="default")
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for step in range(40):
        idx = torch.randint(0, len(y), (16,))
        xb = x[idx].flip(3) if step % 2 else x[idx]
        loss = torch.nn.functional.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    bundle = save_bundle(world.root / "trained", net.state_dict(), info)
    return register_bundle(bundle, "alexnet-trained", 0.3)


def _infer(tmp_path, inp, out="p.parquet", **kw) -> tuple[dict, pa.Table | None]:
    cfg = config.InferConfig(input=str(inp), output=str(tmp_path / out), batch_size=8, **kw)
    result = run_batch_infer(cfg)
    table = pq.read_table(tmp_path / out) if str(out).endswith(".parquet") else None
    return result, table


def _full_probs(table: pa.Table) -> dict[str, np.ndarray]:
    """path -> the full probability vector (top-5 holds every class when classes <= 5)."""
    out = {}
    for row in table.to_pylist():
        p = np.zeros(CLASSES)
        p[row["top5_index"]] = row["top5_prob"]
        out[row["path"]] = p
    return out


def _write_broken(folder: Path) -> dict[str, str]:
    """Files that must become error rows, with a word their error should contain."""
    good = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "empty.JPG").write_bytes(b"")
    (folder / "text.png").write_text("not an image at all\n")
    (folder / "README.txt").write_text("ignored: not an image extension")
    return {"truncated.jpg": "truncated", "empty.JPG": "empty", "text.png": ""}


# --------------------------------------------------------------------------- model references
@pytest.mark.slow
def test_every_model_reference_kind_gives_the_same_model(registry):
    world = registry
    img = [str(world.val[0]), str(world.val[1])]
    local = predict_files(img, [str(world.a.bundle)])
    assert local[0]["models"][0]["version"] is None
    refs = {"models:/alexnet@champion": "1", "models:/alexnet/1": "1",
            f"runs:/{world.a.run_id}/model": "1"}
    for ref, version in refs.items():
        got = predict_files(img, [ref])
        assert got[0]["models"][0]["version"] == version, ref
        for g, want in zip(got, local, strict=True):
            assert [t["index"] for t in g["top"]] == [t["index"] for t in want["top"]], ref
            np.testing.assert_allclose([t["prob"] for t in g["top"]],
                                       [t["prob"] for t in want["top"]], rtol=1e-6)
    # The challenger alias and version 2 are the other model: different probabilities.
    b = predict_files(img, ["models:/alexnet@challenger"])
    assert b[0]["models"][0]["version"] == "2"
    assert [t["prob"] for t in b[0]["top"]] != [t["prob"] for t in local[0]["top"]]
    # A downloaded MLflow model directory and a training checkpoint dir are local refs too.
    ref = resolve_model("models:/alexnet/1", str(world.root / "dl"))
    assert (Path(ref.bundle) / "weights.pt").is_file() and ref.run_id == world.a.run_id
    assert resolve_model(str(world.root / "dl")).bundle == ref.bundle


@pytest.mark.parametrize("ref, message", [
    ("models:/alexnet@nope", r"not found; versions of 'alexnet': \[1, 2\]; "
                             r"aliases: challenger=2, champion=1"),
    ("models:/alexnet/9", r"not found; versions of 'alexnet': \[1, 2\]"),
    ("models:/nothere/1", r"no registered model 'nothere'; registered models: \['alexnet"),
    ("models:/alexnet", r"use models:/alexnet@ALIAS or models:/alexnet/VERSION"),
    ("runs:/0123456789abcdef/model", r"no run '0123456789abcdef'"),
    ("s3://bucket/model", r"use models:/NAME@ALIAS"),
    ("no/such/dir", r"no such directory"),
])
@pytest.mark.slow
def test_missing_model_reference_lists_what_exists(registry, ref, message):
    with pytest.raises(InferError, match=message):
        resolve_model(ref)


@pytest.mark.slow
def test_wrong_path_in_a_run_and_a_dir_that_is_no_bundle(registry, tmp_path):
    world = registry
    with pytest.raises(InferError, match=r"could not be downloaded.*has models \['model'\]"):
        resolve_model(f"runs:/{world.a.run_id}/not-here")
    ckpt = tmp_path / "run" / "checkpoint_000003"
    ckpt.mkdir(parents=True)
    (ckpt / "inference.json").write_text("{}")
    with pytest.raises(InferError, match=r"holds checkpoints \['checkpoint_000003'\]"):
        resolve_model(str(tmp_path / "run"))


# --------------------------------------------------------------------------- inputs
@pytest.mark.slow
def test_folder_tree_labels_from_wnid_folders_and_broken_files_become_rows(
        ray_local, world, tmp_path):
    tree = tmp_path / "tree"
    wnid = world.classes[2]["wnid"]
    (tree / "deeper" / wnid).mkdir(parents=True)
    (tree / "good.jpg").write_bytes(world.val[0].read_bytes())
    (tree / "deeper" / wnid / "UPPER.JPEG").write_bytes(world.val[1].read_bytes())
    broken = _write_broken(tree)
    result, table = _infer(tmp_path, tree, model=str(world.a.bundle))
    rows = {Path(r["path"]).name: r for r in table.to_pylist()}
    assert set(rows) == {"good.jpg", "UPPER.JPEG", *broken}  # README.txt is not an image
    assert result["images"] == 5 and result["errors"] == 3
    for name, word in broken.items():
        r = rows[name]
        assert r["error"] and word in r["error"].lower(), r["error"]
        assert r["top5_index"] is None and r["top5_prob"] is None and r["correct_top1"] is None
    assert {e["path"] for e in result["error_examples"]} == {str(tree / n) for n in broken}
    assert rows["UPPER.JPEG"]["label"] == 2 and rows["UPPER.JPEG"]["label_wnid"] == wnid
    assert rows["good.jpg"]["label"] is None and rows["good.jpg"]["error"] is None
    assert result["labelled"] == 1 and "top1_accuracy" in result


@pytest.mark.slow
def test_images_list_parquet_and_csv_inputs(ray_local, world, tmp_path):
    names = world.val[:6]
    labels = [world.labels[p.stem] for p in names]
    # images list: "class_id image_path", index or wnid, relative to the list's folder
    lst = tmp_path / "list.txt"
    lines = ["# class_id image_path"]
    for i, (p, lab) in enumerate(zip(names, labels, strict=True)):
        cid = world.classes[lab]["wnid"] if i % 2 else str(lab)
        lines.append(f"{cid} {os.path.relpath(p, tmp_path)}")
    lines += ["1 missing/nowhere.jpg", f"7\t{names[0]}", f"cat {names[1]}", str(names[2])]
    lst.write_text("\n".join(lines) + "\n")
    res, t_list = _infer(tmp_path, lst, "list.parquet", model=str(world.a.bundle))
    assert res["input_kind"] == "images-list" and res["images"] == 10 and res["errors"] == 3
    assert res["labelled"] == 6  # the unlabelled path line is predicted, not scored
    rows = t_list.to_pylist()
    for p, lab in zip(names, labels, strict=True):
        row = next(r for r in rows if r["path"] == str(tmp_path / os.path.relpath(p, tmp_path)))
        assert row["label"] == lab and row["error"] is None
    errors = {r["error"].split(":")[0 if r["error"].startswith("unreadable") else 1]
              : r["error"] for r in rows if r["error"]}
    assert errors["9"] == "list.txt:9: class 7 is outside the model's class index (0..3)"
    assert errors["10"].startswith("list.txt:10: 'cat' is neither a class index nor a wnid")
    assert errors["unreadable"].startswith("unreadable: No such file")
    unlabelled = [r for r in rows if r["path"] == str(names[2]) and r["label"] is None]
    assert len(unlabelled) == 1 and unlabelled[0]["top5_index"] is not None

    # Parquet with a custom path column and wnid labels; CSV with paths only.
    pq.write_table(pa.table({"file": [str(p) for p in names],
                             "truth": [world.classes[lab]["wnid"] for lab in labels]}),
                   tmp_path / "in.parquet")
    res, t_pq = _infer(tmp_path, tmp_path / "in.parquet", "pq.parquet", path_column="file",
                       label_column="truth", model=str(world.a.bundle))
    assert res["input_kind"] == "table" and res["labelled"] == 6
    assert sorted(t_pq["label"].to_pylist()) == sorted(labels)
    (tmp_path / "in.csv").write_text("path,other\n" + "".join(f"{p},x\n" for p in names)
                                     + ",y\n")
    res, t_csv = _infer(tmp_path, tmp_path / "in.csv", "csv.parquet", model=str(world.a.bundle))
    assert res["images"] == 7 and res["labelled"] == 0 and "top1_accuracy" not in res
    assert res["errors"] == 1 and res["error_examples"][0] == {"path": "in.csv row 6",
                                                       "error": "empty 'path'"}
    t_csv = t_csv.filter(pc.is_null(t_csv["error"]))
    # Same images, same model: the same predictions whatever the input kind.
    assert _full_probs(t_csv).keys() == _full_probs(t_pq).keys()
    for k, v in _full_probs(t_csv).items():
        np.testing.assert_allclose(v, _full_probs(t_pq)[k], rtol=1e-6)


@pytest.mark.slow
def test_shards_input_labels_and_paths_from_records(ray_local, world, tmp_path):
    from pipelines.data.preprocess import run_preprocess

    out = tmp_path / "shards"
    run_preprocess(config.PreprocessConfig(source=str(world.src), out=str(out), resize=40))
    res, table = _infer(tmp_path, out, split="val", model=str(world.a.bundle))
    assert res["input_kind"] == "shards" and res["images"] == res["labelled"] == 20
    row = table.to_pylist()[0]
    assert row["path"].startswith("val/") and row["shard"].endswith(".lmdb")
    assert row["record"] is not None and row["label"] == world.labels[Path(row["path"]).stem]
    assert "label_note" not in res
    # A model whose class list is the OUT's in reverse: labels follow the wnids, not the
    # indices, so the truth column still names each image's own class.
    flipped = tmp_path / "flipped"
    shutil.copytree(world.a.bundle, flipped)
    info = json.loads((flipped / "inference.json").read_text())
    info["classes"] = [{**c, "index": i} for i, c in enumerate(reversed(info["classes"]))]
    (flipped / "inference.json").write_text(json.dumps(info))
    res, table = _infer(tmp_path, out, "flipped.parquet", split="val", model=str(flipped))
    assert "matched by wnid (4 of 4 known" in res["label_note"]
    wnid_of = {c["index"]: c["wnid"] for c in info["classes"]}
    truth = {c["index"]: c["wnid"] for c in world.classes}
    for row in table.to_pylist():
        assert wnid_of[row["label"]] == truth[world.labels[Path(row["path"]).stem]]


def test_shard_labels_are_matched_by_wnid_when_the_class_lists_differ(tmp_path):
    from pipelines.serve.inputs import shard_label_map

    model = [{"index": i, "wnid": w, "name": w} for i, w in enumerate(["n1", "n2", "n3"])]
    assert shard_label_map(model, model, tmp_path) == {}
    out = [{"index": i, "wnid": w, "name": w} for i, w in enumerate(["n3", "n9", "n1"])]
    got = shard_label_map(out, model, tmp_path)
    assert got["label_map"] == [2, -1, 0]
    assert got["label_note"] == (f"{tmp_path}: its 3 classes differ from the model's 3; labels "
                                 "are matched by wnid (2 of 3 known to the model; records of "
                                 "the others are predicted unlabelled)")


def test_images_list_input_forms_are_listed_without_ray(tmp_path):
    """What batch-infer takes from an images list, beyond preprocess's `class_id path`:
    a wnid or -1 label, a path-only line (relative too), CRLF endings, blank lines."""
    classes = [{"index": i, "wnid": f"n0000000{i}", "name": str(i)} for i in range(CLASSES)]
    (tmp_path / "lists").mkdir()
    lst = tmp_path / "lists" / "val.txt"
    lst.write_bytes(b"# class_id image_path\r\n\r\n2 ../imgs/a.jpg\r\n"
                    b"n00000001\timgs/b c.jpg\r\n-1 /abs/c.jpg\r\nd.jpg\r\n9 e.jpg\r\n")
    table, kind = list_inputs(str(lst), "val", classes)
    assert kind == {"kind": "images-list"}
    base = tmp_path / "lists"
    assert table.select(["path", "label", "error"]).to_pylist() == [
        {"path": str(base / "../imgs/a.jpg"), "label": 2, "error": ""},
        {"path": str(base / "imgs/b c.jpg"), "label": 1, "error": ""},
        {"path": "/abs/c.jpg", "label": -1, "error": ""},
        {"path": str(base / "d.jpg"), "label": -1, "error": ""},
        {"path": str(base / "e.jpg"), "label": -1,
         "error": "val.txt:7: class 9 is outside the model's class index (0..3)"}]
    lst.write_bytes(b"0 \xff.jpg\n")
    with pytest.raises(InferError, match=f"cannot read images list {lst}: 'utf-8' codec"):
        list_inputs(str(lst), "val", classes)


def test_bad_inputs_are_clear_errors(world, tmp_path):
    def run(model=(str(world.a.bundle),), **kw):
        return run_batch_infer(config.InferConfig(model=list(model),
                                             output=str(tmp_path / "o.parquet"), **kw))

    with pytest.raises(InferError, match="does not exist"):
        run(input=str(tmp_path / "nothing"))
    pq.write_table(pa.table({"file": ["a.jpg"]}), tmp_path / "t.parquet")
    with pytest.raises(InferError, match=r"no column 'path'.*\['file'\]"):
        run(input=str(tmp_path / "t.parquet"))
    (tmp_path / "l.txt").write_text("# nothing listed\n\n")
    with pytest.raises(InferError, match=r"has no entries"):
        run(input=str(tmp_path / "l.txt"))
    with pytest.raises(InferError, match="--format csv disagrees"):
        run(input=str(world.src / "val"), format="csv")
    with pytest.raises(InferError, match="different class index"):
        other = _info([{"index": i, "wnid": f"n{i}", "name": "x"} for i in range(CLASSES)])
        from alexnet import build_model

        b = save_bundle(tmp_path / "other", build_model("cifar", CLASSES).state_dict(), other)
        run(input=str(world.src / "val"), model=[str(world.a.bundle), str(b)])


def test_actor_loads_shipped_weights_when_the_bundle_dir_is_elsewhere(ray_local, world):
    """On a multi-node cluster the driver's download dir is not on the actor's node: the
    weights come through the object store. Same predictions as reading the dir."""
    from pipelines.serve.actor import Predictor, model_source
    from pipelines.serve.predict import ModelRef

    shipped = model_source(ModelRef(uri="x", bundle=str(world.a.bundle)), ship=True)
    assert shipped["blob"][0] is not None
    far = dict(shipped, dir="/nonexistent/node-local/bundle")
    near = model_source(ModelRef(uri="x", bundle=str(world.a.bundle)), ship=False)
    from pipelines.data.decode import decode_rgb
    from pipelines.serve.bundle import make_crops

    crops = np.stack([make_crops(decode_rgb(p.read_bytes()), (40, 32), False)
                      for p in world.val[:4]])
    batch = {"path": np.array([str(p) for p in world.val[:4]]), "shard": np.array([""] * 4),
             "record": np.full(4, -1), "label": np.full(4, -1), "error": np.array([""] * 4,
                                                                                   dtype=object),
             "crops_0": crops}
    kw = {"model_uri": "x", "model_version": None, "gpu": False, "amp": False, "threads": 1}
    a = Predictor([far], **kw)(batch)
    b = Predictor([near], **kw)(batch)
    assert a.equals(b) and a.num_rows == 4
    with pytest.raises(InferError, match="not readable on this node and was not shipped"):
        Predictor([dict(near, dir="/nonexistent")], **kw)


def test_gpu_without_a_gpu_is_a_clear_error(ray_local, world, tmp_path):
    if ray_local.cluster_resources().get("GPU", 0):
        pytest.skip("this cluster has a GPU")
    with pytest.raises(InferError, match="--gpu: the Ray cluster has no GPU"):
        run_batch_infer(config.InferConfig(model=str(world.a.bundle), input=str(world.src / "val"),
                                      output=str(tmp_path / "o.parquet"), gpu=True))
    with pytest.raises(InferError, match="leave no CPU for decoding"):
        run_batch_infer(config.InferConfig(model=str(world.a.bundle), input=str(world.src / "val"),
                                      output=str(tmp_path / "o.parquet"), actors=4))


# --------------------------------------------------------------------------- ten-crop, ensembles
@pytest.mark.parametrize("h, w, geom", [(48, 96, (40, 32)), (301, 257, (256, 224)),
                                        (224, 500, (256, 224)), (37, 36, (40, 32))])
def test_decode_side_crops_are_the_served_models_transform(h, w, geom):
    """Decode workers crop without torch; the pixels must be the model's own transform
    (what the logged pyfunc model does) and the paper's ten crops as alexnet.augment cuts them."""
    from alexnet.augment import ten_crop
    from pipelines.data.decode import rescale
    from pipelines.serve.bundle import make_crops
    from pipelines.serve.model import preprocess_image

    rgb = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    info = {"resize": geom[0], "input_size": geom[1]}
    np.testing.assert_array_equal(make_crops(rgb, geom, False),
                                  preprocess_image(rgb, info))
    np.testing.assert_array_equal(make_crops(rgb, geom, True),
                                  ten_crop(rescale(rgb, geom[0], center_crop=True), geom[1]))
    with pytest.raises(ValueError, match="aspect ratio 130:2 is beyond 64:1"):
        make_crops(np.zeros((2, 130, 3), np.uint8), geom, False)



@pytest.mark.slow
def test_ten_crop_is_the_mean_of_the_ten_crops_softmax(ray_local, world, trained, tmp_path):
    from alexnet.augment import ten_crop
    from pipelines.data.decode import decode_rgb, rescale
    from pipelines.serve.model import load_bundle

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in world.val[:3]:
        (imgs / p.name).write_bytes(p.read_bytes())
    # The trained model: its crops disagree enough to tell ten-crop from the centre crop.
    # fp32 (amp=False): compared with predict_proba's fp32 at 1e-6 (bf16: test below).
    _, ten = _infer(tmp_path, imgs, "ten.parquet", model=str(trained.bundle), ten_crop=True,
                    amp=False)
    _, centre = _infer(tmp_path, imgs, "centre.parquet", model=str(trained.bundle), amp=False)
    model, info = load_bundle(trained.bundle)
    got, centre_probs = _full_probs(ten), _full_probs(centre)
    for p in sorted(imgs.iterdir()):
        square = rescale(decode_rgb(p.read_bytes()), info["resize"], center_crop=True)
        crops = ten_crop(square, info["input_size"])
        # Each crop on its own, one at a time: no batching shared with the pipeline.
        each = np.stack([predict_proba(model, c[None], info)[0] for c in crops])
        np.testing.assert_allclose(got[str(p)], each.mean(0), atol=1e-6)
        assert np.abs(got[str(p)] - centre_probs[str(p)]).max() > 1e-3  # not the centre crop
    row = ten.to_pylist()[0]
    assert row["top5_prob"] == sorted(row["top5_prob"], reverse=True)


@pytest.mark.slow
def test_ensemble_of_one_is_the_model_and_two_average(ray_local, registry, tmp_path):
    world = registry
    inp = world.src / "val"
    _, single = _infer(tmp_path, inp, "a.parquet", model="models:/alexnet/1")
    _, one = _infer(tmp_path, inp, "one.parquet", model=["models:/alexnet/1"])
    _, b = _infer(tmp_path, inp, "b.parquet", model=[str(world.b.bundle)])
    res, two = _infer(tmp_path, inp, "two.parquet",
                      model=["models:/alexnet/1", str(world.b.bundle)])
    pa_, po, pb, p2 = (_full_probs(t) for t in (single, one, b, two))
    assert pa_.keys() == po.keys() == pb.keys() == p2.keys() and len(pa_) == 20
    for k in pa_:
        np.testing.assert_array_equal(po[k], pa_[k])
        np.testing.assert_allclose(p2[k], (pa_[k] + pb[k]) / 2, atol=1e-6)
        assert np.abs(pa_[k] - pb[k]).max() > 1e-4  # the two models really differ
    assert set(two["model_uri"].to_pylist()) == {f"models:/alexnet/1 + {world.b.bundle}"}
    assert set(two["model_version"].to_pylist()) == {"1 + "}
    assert set(single["model_version"].to_pylist()) == {"1"}
    assert res["model"] == f"models:/alexnet/1 + {world.b.bundle}"


# --------------------------------------------------------------------------- outputs
@pytest.mark.slow
def test_output_schema_single_files_and_directories(ray_local, world, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for p in world.val[:10]:
        (inp / p.name).write_bytes(p.read_bytes())
    (inp / "good.jpg").write_bytes(world.val[10].read_bytes())
    _write_broken(inp)
    res, table = _infer(tmp_path, inp, "one.parquet", model=str(world.a.bundle))
    schema = pq.read_schema(tmp_path / "one.parquet")
    assert schema.equals(SCHEMA), schema
    assert table.num_rows == res["images"] == 14 and res["output_mode"] == "file"
    row = next(r for r in table.to_pylist() if r["error"] is None)
    assert len(row["top5_index"]) == len(row["top5_wnid"]) == len(row["top5_name"]) == CLASSES
    assert abs(sum(row["top5_prob"]) - 1) < 1e-5
    assert row["top5_wnid"][0] == world.classes[row["top5_index"][0]]["wnid"]
    assert row["top5_name"][0] == world.classes[row["top5_index"][0]]["name"]
    assert row["model_uri"] == str(world.a.bundle) and row["model_version"] is None

    # CSV: the lists become top1_* .. top4_* columns (4 classes).
    res_csv, _ = _infer(tmp_path, inp, "one.csv", model=str(world.a.bundle))
    import pyarrow.csv as pcsv

    t_csv = pcsv.read_csv(tmp_path / "one.csv")
    assert t_csv.num_rows == 14 and "top1_wnid" in t_csv.column_names
    assert "top4_prob" in t_csv.column_names and "top5_prob" not in t_csv.column_names
    assert res_csv["errors"] == res["errors"] == 3

    # A directory: files written by the Ray workers, same rows, same schema.
    res_dir, _ = _infer(tmp_path, inp, "dir", model=str(world.a.bundle), actors=1,
                        max_actors=2)
    files = sorted((tmp_path / "dir").glob("*.parquet"))
    assert res_dir["output_mode"] == "dir" and files
    back = pq.read_table(tmp_path / "dir")
    assert back.num_rows == 14 and back.schema.equals(SCHEMA)
    assert sorted(back["path"].to_pylist()) == sorted(table["path"].to_pylist())
    assert res_dir["errors"] == 3
    with pytest.raises(InferError, match="exists and is not empty; pass --overwrite"):
        _infer(tmp_path, inp, "dir", model=str(world.a.bundle))
    res_csvdir, _ = _infer(tmp_path, inp, "csvdir", model=str(world.a.bundle), format="csv")
    assert res_csvdir["images"] == 14 and list((tmp_path / "csvdir").glob("*.csv"))


# --------------------------------------------------------------------------- accuracy + MLflow
@pytest.mark.slow
def test_accuracy_on_known_labels_and_the_evaluation_run(ray_local, world, trained, tmp_path):
    from mlflow import MlflowClient

    lst = tmp_path / "val.txt"
    lst.write_text("".join(f"{world.labels[p.stem]} {p}\n" for p in world.val))
    res, table = _infer(tmp_path, lst, model="models:/alexnet-trained@champion",
                        log_to_mlflow=True, experiment="evaluation")
    rows = table.to_pylist()
    assert res["labelled"] == len(rows) == 20
    assert res["top1_accuracy"] == sum(r["correct_top1"] for r in rows) / 20
    assert res["top5_accuracy"] == 1.0  # 4 classes: the top-4 always holds the label
    assert res["top1_accuracy"] >= 0.5  # it learned: chance is 0.25
    for r in rows:
        assert r["correct_top1"] == (r["top5_index"][0] == r["label"])
    per_class = res["per_class"]
    assert per_class and sum(c["images"] for c in per_class) == 20

    client = MlflowClient()
    run = client.get_run(res["mlflow_run_id"])
    assert run.data.tags["model.name"] == "alexnet-trained"
    assert run.data.tags["model.version"] == trained.version
    assert run.data.tags["model.run_id"] == trained.run_id
    assert run.data.metrics["top1_accuracy"] == pytest.approx(res["top1_accuracy"])
    assert run.data.metrics["top5_accuracy"] == 1.0 and run.data.metrics["images"] == 20
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"per_class_accuracy.csv", "summary.json"} <= arts
    local = client.download_artifacts(run.info.run_id, "per_class_accuracy.csv", str(tmp_path))
    with open(local, newline="") as fh:
        back = list(csv.DictReader(fh))
    assert [int(r["images"]) for r in back] == [c["images"] for c in per_class]
    # MLflow 3: the metrics are linked to the registered version's LoggedModel.
    mv = client.get_model_version("alexnet-trained", trained.version)
    logged = client.get_logged_model(mv.model_id or mv.source.split("/")[-1])
    assert any(m.key == "top1_accuracy" and m.run_id == run.info.run_id
               for m in logged.metrics)
    assert [i.model_id for i in run.inputs.model_inputs] == [logged.model_id]


def test_cpu_bf16_agrees_with_fp32(world, trained):
    """--amp on a CPU with native bf16: bf16 autocast + channels_last; the trained model's
    probabilities stay close to fp32's and its top-1 agrees. Elsewhere --amp is fp32."""
    from pipelines.data.decode import decode_rgb
    from pipelines.precision import cpu_has_native_bf16
    from pipelines.serve.predict import Ensemble

    fp32 = Ensemble([str(trained.bundle)], amp=False)
    bf16 = Ensemble([str(trained.bundle)], amp=True)
    assert fp32.amp_dtype is None
    if not cpu_has_native_bf16():
        assert bf16.amp_dtype is None and not bf16.channels_last
        return
    assert bf16.amp_dtype == torch.bfloat16 and bf16.channels_last
    crops = [np.stack([fp32.crops(decode_rgb(p.read_bytes()), False)[0] for p in world.val])]
    p32, p16 = fp32.predict(crops), bf16.predict(crops)
    np.testing.assert_allclose(p16, p32, atol=3e-2)
    assert (p16.argmax(1) == p32.argmax(1)).mean() >= 0.9


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_amp_agrees_with_cpu(world):
    from pipelines.data.decode import decode_rgb
    from pipelines.serve.predict import Ensemble

    cpu = Ensemble([str(world.a.bundle)])
    gpu = Ensemble([str(world.a.bundle)], "cuda", amp=True)
    crops = [np.stack([cpu.crops(decode_rgb(p.read_bytes()), False)[0] for p in world.val])]
    p_cpu, p_gpu = cpu.predict(crops), gpu.predict(crops)
    np.testing.assert_allclose(p_gpu, p_cpu, atol=2e-2)
    assert (p_gpu.argmax(1) == p_cpu.argmax(1)).mean() >= 0.9


# --------------------------------------------------------------------------- command line
@pytest.mark.slow
def test_predict_command_prints_top_classes(registry, tmp_path):
    world = registry
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "workflow.py"), "predict",
                           str(world.val[0]), "--model", "models:/alexnet@champion"],
                          capture_output=True, text=True, timeout=300, cwd=world.root, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "model: models:/alexnet@champion (version 1)"
    assert lines[1] == str(world.val[0])
    ranks = [line.split() for line in lines[2:]]
    assert len(ranks) == CLASSES  # top-5 of a 4-class model: all four
    probs = [float(r[1]) for r in ranks]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 2e-3
    assert {r[3] for r in ranks} == {c["wnid"] for c in world.classes}
    proc = subprocess.run([sys.executable, str(REPO / "workflow.py"), "predict", str(bad),
                           str(world.val[0]), "--model", str(world.a.bundle),
                           "--model", str(world.b.bundle), "--ten-crop"],
                          capture_output=True, text=True, timeout=300, cwd=world.root, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}\n  error: " in proc.stdout and str(world.val[0]) in proc.stdout
    proc = subprocess.run([sys.executable, str(REPO / "workflow.py"), "predict",
                           str(world.val[0]), "--model", "models:/alexnet@gone"],
                          capture_output=True, text=True, timeout=300, cwd=world.root, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "aliases: challenger=2, champion=1" in proc.stderr


def test_batch_infer_flags_repeat_model_for_an_ensemble():
    import workflow

    args = workflow.build_parser().parse_args(
        ["batch-infer", "--model", "models:/a/1", "--model", "runs:/x/model", "--input", "d",
         "--ten-crop", "--actors", "2", "--max-actors", "3", "--format", "csv"])
    cfg = config.load(config.InferConfig, args)
    assert cfg.model == ["models:/a/1", "runs:/x/model"]
    assert (cfg.ten_crop, cfg.actors, cfg.max_actors, cfg.format) == (True, 2, 3, "csv")
    default = config.load(config.InferConfig, workflow.build_parser().parse_args(["batch-infer"]))
    assert default.model == ["models:/alexnet@champion"]


def test_automatic_actor_layout():
    """0 = automatic: sized to this machine only on the local Ray batch-infer started itself
    (it knows nothing of a cluster's nodes); flags always win; --max-actors caps it."""
    from pipelines.serve.infer import MAX_AUTO_ACTORS, actor_layout, local_ray_cpus

    cores = os.cpu_count() or 1
    auto = config.InferConfig()
    local = actor_layout(auto, local=True, gpus=0)
    assert local.actors == min(MAX_AUTO_ACTORS, cores)
    assert local.cpus_per_actor == max(1, cores // local.actors)
    assert local.actors * local.cpus_per_actor <= cores < local_ray_cpus()  # + decode CPU
    cluster = actor_layout(auto, local=False, gpus=8)
    assert (cluster.actors, cluster.cpus_per_actor) == (1, 1)
    gpu = actor_layout(config.InferConfig(gpu=True), local=True, gpus=2)
    assert (gpu.actors, gpu.cpus_per_actor) == (2, 1)
    given = actor_layout(config.InferConfig(actors=3, cpus_per_actor=2), local=True, gpus=0)
    assert (given.actors, given.cpus_per_actor) == (3, 2)
    assert actor_layout(config.InferConfig(max_actors=1), local=True, gpus=0).actors == 1
    assert (auto.actors, auto.cpus_per_actor) == (0, 0)  # replaced, not changed in place
    # Fewer images than one batch: one actor, with every core (a second would sit idle).
    small = actor_layout(auto, local=True, gpus=0, images=auto.batch_size - 1)
    assert (small.actors, small.cpus_per_actor) == (1, cores)
    assert actor_layout(auto, local=True, gpus=0, images=10 * auto.batch_size).actors == \
        local.actors
    assert actor_layout(config.InferConfig(actors=2), local=True, gpus=0, images=1).actors == 2


@pytest.mark.slow
def test_batch_infer_on_its_own_local_ray_uses_every_core(world, tmp_path):
    """`workflow.py batch-infer` with no RAY_ADDRESS starts its own Ray (cores + 1 logical
    CPUs: one decode task beside the model threads) and fills it with the automatic layout."""
    from pipelines.serve.infer import MAX_AUTO_ACTORS

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_tmp = tempfile.mkdtemp(prefix="ri")  # short: Ray's socket paths have a limit
    env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=ray_tmp)
    out = tmp_path / "p.parquet"
    proc = subprocess.run([sys.executable, str(REPO / "workflow.py"), "batch-infer",
                           "--model", str(world.a.bundle), "--input", str(world.src / "val"),
                           "--output", str(out), "--batch-size", "8"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cores = os.cpu_count() or 1
    actors = min(MAX_AUTO_ACTORS, cores)
    assert f"with {actors} model actor(s) x {max(1, cores // actors)} CPU(s))" in proc.stdout
    assert pq.read_table(out).num_rows == CLASSES * 5  # the sample's val images


@pytest.mark.slow
def test_an_unreachable_mlflow_does_not_fail_a_finished_batch_infer(ray_local, world, tmp_path,
                                                                    monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # refused at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        res, table = _infer(tmp_path, world.src / "val", model=str(world.a.bundle),
                            log_to_mlflow=True)
    finally:  # the job points MLflow's process-wide URIs at the dead server: put them back
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    assert table.num_rows == res["images"] == 20 and "mlflow_run_id" not in res
    kept = tmp_path / "p.parquet.summary.json"
    assert res["mlflow_warning"].startswith("the evaluation run could not be logged to MLflow")
    assert res["mlflow_warning"].endswith(f"predictions are in {tmp_path / 'p.parquet'} and "
                                          f"the summary in {kept}, to log later")
    saved = json.loads(kept.read_text())
    assert saved["images"] == 20 and "per_class" in saved
