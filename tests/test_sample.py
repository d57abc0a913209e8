"""Tests for pipelines.data.sample: the synthetic ImageNet-layout dataset behind the demo and e2e tests."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines.data.sample import (
    BACKGROUNDS,
    MAX_CLASSES,
    class_name,
    class_spec,
    make_sample,
    render,
)

CLASSES, TRAIN, VAL = 10, 40, 10


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    # One default-sized sample shared by the layout and learnability tests: generating it is
    # the slow part (~3 s), checking it is cheap.
    root = tmp_path_factory.mktemp("sample") / "data"
    return root, make_sample(root, classes=CLASSES, train_per_class=TRAIN, val_per_class=VAL)


def _mapping(root: Path) -> list[tuple[str, str]]:
    lines = (root / "LOC_synset_mapping.txt").read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(" ", 1)) for line in lines]  # type: ignore[misc]


def _val_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "LOC_val_solution.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_and_counts(sample: tuple[Path, dict]) -> None:
    root, summary = sample
    assert summary["root"] == str(root)
    assert summary["classes"] == CLASSES
    assert summary["train"] == CLASSES * TRAIN
    assert summary["val"] == CLASSES * VAL
    assert len(summary["wnids"]) == CLASSES

    assert sorted(p.name for p in (root / "train").iterdir()) == summary["wnids"]
    for wnid in summary["wnids"]:
        names = sorted(p.name for p in (root / "train" / wnid).iterdir())
        assert names == sorted(f"{wnid}_{k}.JPEG" for k in range(1, TRAIN + 1))

    val = sorted(p.name for p in (root / "val").iterdir())
    assert val == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, CLASSES * VAL + 1)]


def test_every_file_is_a_jpeg_in_the_size_range(sample: tuple[Path, dict]) -> None:
    root, _ = sample
    files = sorted(root.glob("train/*/*.JPEG")) + sorted(root.glob("val/*.JPEG"))
    assert len(files) == CLASSES * (TRAIN + VAL)
    shapes = set()
    for path in files:
        data = path.read_bytes()
        assert data[:3] == b"\xff\xd8\xff", path  # a real JPEG, not PNG bytes named .JPEG
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert img is not None and img.ndim == 3 and img.shape[2] == 3, path
        h, w = img.shape[:2]
        assert 200 <= h <= 400 and 200 <= w <= 400, (path, img.shape)
        shapes.add((h, w))
    # Sizes must vary, or preprocessing's rescale would go untested.
    assert len(shapes) > len(files) // 2


def test_mapping_is_sorted_and_imagenet_like(sample: tuple[Path, dict]) -> None:
    root, summary = sample
    mapping = _mapping(root)
    wnids = [w for w, _ in mapping]
    assert wnids == sorted(wnids) == summary["wnids"]
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    names = [n for _, n in mapping]
    assert len(set(names)) == len(names) and all(names)
    assert names[0] == "red circle"


def test_val_solution_maps_every_val_file(sample: tuple[Path, dict]) -> None:
    root, summary = sample
    header = (root / "LOC_val_solution.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "ImageId,PredictionString"
    rows = _val_rows(root)
    ids = [r["ImageId"] for r in rows]
    assert sorted(f"{i}.JPEG" for i in ids) == sorted(p.name for p in (root / "val").iterdir())
    labels = []
    for r in rows:
        tokens = r["PredictionString"].split()
        assert tokens[0] in summary["wnids"]
        assert len(tokens) == 5 and all(t.isdigit() for t in tokens[1:])  # fake box
        labels.append(tokens[0])
    assert all(labels.count(w) == VAL for w in summary["wnids"])
    # Shuffled across classes, as in the real val set: labels are not in class order.
    assert labels != sorted(labels)


def _features(path: Path) -> np.ndarray:
    img = cv2.imread(str(path)).astype(np.float32)
    small = cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA)
    # Subtracting each image's median colour (its background) removes the random tint, the
    # biggest nuisance for a pixel-distance classifier; the object is what is left.
    return (small - np.median(small.reshape(-1, 3), axis=0)).ravel()


def test_classes_are_separable_by_nearest_class_mean(sample: tuple[Path, dict]) -> None:
    # A cheap proof of learnability: if class means of 32x32 thumbnails already classify val
    # well above chance, AlexNet will learn the classes in a few epochs.
    root, summary = sample
    wnids = summary["wnids"]
    means = np.stack(
        [
            np.mean([_features(p) for p in sorted((root / "train" / w).glob("*.JPEG"))], axis=0)
            for w in wnids
        ]
    )
    rows = _val_rows(root)
    x = np.stack([_features(root / "val" / f"{r['ImageId']}.JPEG") for r in rows])
    y = np.array([wnids.index(r["PredictionString"].split()[0]) for r in rows])
    pred = ((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    accuracy = float((pred == y).mean())
    assert accuracy >= 0.5, f"nearest-class-mean accuracy {accuracy:.2f} (chance 0.10)"


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    kw = dict(classes=3, train_per_class=2, val_per_class=2, min_side=32, max_side=64)
    a = _digests(Path(make_sample(tmp_path / "a", seed=7, **kw)["root"]))
    b = _digests(Path(make_sample(tmp_path / "b", seed=7, **kw)["root"]))
    c = _digests(Path(make_sample(tmp_path / "c", seed=8, **kw)["root"]))
    assert a == b
    images = [k for k in a if k.endswith(".JPEG")]
    assert len(images) == 12
    assert all(a[k] != c[k] for k in images)

    # Each image has its own stream: more classes leave existing train images unchanged.
    d = _digests(Path(make_sample(tmp_path / "d", seed=7, **{**kw, "classes": 4})["root"]))
    assert all(d[k] == a[k] for k in images if k.startswith("train"))


def test_rerun_replaces_own_sample_but_never_foreign_data(tmp_path: Path) -> None:
    kw = dict(train_per_class=1, val_per_class=1, min_side=32, max_side=48)
    root = tmp_path / "s"
    make_sample(root, classes=4, **kw)
    summary = make_sample(root, classes=2, **kw)
    # No stale class folders or val files from the larger first run.
    assert sorted(p.name for p in (root / "train").iterdir()) == summary["wnids"]
    assert len(list((root / "val").iterdir())) == 2

    foreign = tmp_path / "imagenet"
    (foreign / "train").mkdir(parents=True)
    (foreign / "train" / "keep.JPEG").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not made by make-sample"):
        make_sample(foreign, classes=2, **kw)
    assert (foreign / "train" / "keep.JPEG").read_bytes() == b"x"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": 1}, "classes"),
        ({"classes": 0}, "classes"),
        ({"classes": MAX_CLASSES + 1}, "classes"),
        ({"classes": 2.5}, "classes"),
        ({"train_per_class": 0}, "train_per_class"),
        ({"val_per_class": 0}, "val_per_class"),
        ({"val_per_class": True}, "val_per_class"),
        ({"seed": -1}, "seed"),
        ({"min_side": 300, "max_side": 200}, "min_side"),
        ({"min_side": 8}, "min_side"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_sample(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()  # validated before anything is written


def test_all_classes_have_distinct_names_and_render() -> None:
    names = [class_name(i) for i in range(MAX_CLASSES)]
    assert len(set(names)) == MAX_CLASSES
    specs = {class_spec(i)[1:3] for i in range(100)}
    assert len(specs) == 100  # the first 100 classes are all colour x shape pairs
    # One class from every background block renders at the smallest allowed size.
    for block in range(len(BACKGROUNDS)):
        img = render(block * 100 + block, np.random.default_rng(block), 32, 40)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert 32 <= min(img.shape[:2]) and max(img.shape[:2]) <= 40
