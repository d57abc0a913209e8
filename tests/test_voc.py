"""Pascal VOC 2012 as a source: detection, VOC's 20-class index, the two single-label
readings (largest object per image; one cropped record per object) and the quarantine of
broken annotations. A small VOC-shaped tree of real JPEGs and real XML, written here; the
pipeline tests run the real preprocess on a real local Ray.

    pytest tests/test_voc.py
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines.config import PreprocessConfig
from pipelines.data import shards
from pipelines.data.preprocess import run_preprocess
from pipelines.data.sources import SourceError, detect_layout, list_source

# Written out, not imported: the test states VOC's order itself.
VOC_ORDER = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
             "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
             "sheep", "sofa", "train", "tvmonitor"]
W, H = 60, 40  # every photo of the tree: VOC's landscape shape, tiny
RED = (220, 30, 30)


def _photo(boxes_in_red: list[tuple[int, int, int, int]] = ()) -> bytes:
    """A 60x40 grey photo with a gradient; VOC boxes (1-based, ends included) painted red."""
    img = np.full((H, W, 3), 100, np.uint8)
    img[:, :, 1] = np.linspace(40, 160, W, dtype=np.uint8)[None, :]
    for xmin, ymin, xmax, ymax in boxes_in_red:
        img[ymin - 1:ymax, xmin - 1:xmax] = RED
    return cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _xml(objects: list[tuple], size: tuple[int, int] = (W, H)) -> str:
    """A VOC annotation; objects are (name, xmin, ymin, xmax, ymax[, difficult])."""
    parts = [f"<annotation><folder>VOC2012</folder><size><width>{size[0]}</width>"
             f"<height>{size[1]}</height><depth>3</depth></size>"]
    for name, *box in objects:
        difficult = box[4] if len(box) > 4 else 0
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0"
                     f"</truncated><difficult>{difficult}</difficult><bndbox><xmin>{box[0]}"
                     f"</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax>"
                     "</bndbox></object>")
    return "".join(parts) + "</annotation>"


PERSON = ("person", 10, 5, 55, 38)  # the largest non-difficult object of 2007_000001
TREE = {  # id: (split, annotation text or None for no XML, JPEG written?)
    "2007_000001": ("train", _xml([("dog", 5, 5, 20, 20), PERSON,
                                   ("car", 1, 1, 60, 40, 1)]), True),   # car: difficult
    "2007_000002": ("train", _xml([("cat", 3, 4, 50, 36)]), True),
    "2007_000003": ("train", "<annotation><object><name>dog</name>", True),  # cut short
    "2007_000004": ("train", _xml([("bird", 10, 10, 80, 30), ("boat", 2, 2, 30, 30)]), True),
    "2007_000005": ("train", _xml([("cow", 2, 2, 30, 30, 1)]), True),   # difficult only
    "2007_000006": ("train", _xml([("dog", 2, 2, 30, 30)]), False),     # no JPEG
    "2007_000007": ("train", _xml([("airplane", 2, 2, 30, 30)]), True),  # not VOC's name
    "2007_000008": ("train", None, True),                               # no annotation
    "2008_000001": ("val", _xml([("sheep", 2, 2, 30, 30), ("tvmonitor", 40, 10, 50, 20)]),
                    True),
    "2008_000002": ("val", "<annotation><size><width>60</width></size></annotation>", True),
}


def make_voc(parent: Path) -> Path:
    """PARENT/VOCdevkit/VOC2012 as the trainval tar extracts it; returns PARENT."""
    root = parent / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main", "SegmentationClass"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[str]] = {"train": [], "val": []}
    for image_id, (split, xml, has_jpeg) in TREE.items():
        lists[split].append(image_id)
        if xml is not None:
            (root / "Annotations" / f"{image_id}.xml").write_text(xml)
        if has_jpeg:
            red = [PERSON[1:]] if image_id == "2007_000001" else (
                [(3, 4, 50, 36)] if image_id == "2007_000002" else [])
            (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(_photo(red))
    for split, ids in lists.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text(
        "\n".join(lists["train"] + lists["val"]) + "\n")
    (root / "ImageSets" / "Main" / "dog_train.txt").write_text("2007_000001  1\n")
    return parent


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc"))


def _reasons(quarantine: list[dict]) -> dict[str, str]:
    return {q["path"]: q["reason"] for q in quarantine}


# --------------------------------------------------------------------------- listing
def test_auto_detects_voc_from_the_folder_or_its_parents_and_the_index_is_vocs_20(voc):
    root = voc / "VOCdevkit" / "VOC2012"
    for src in (voc, voc / "VOCdevkit", root):
        layout, why = detect_layout(src)
        assert layout == "voc" and str(root) in why, (src, why)
    listing = list_source(voc)
    assert listing.layout == "voc" and listing.root == str(root)
    assert [c["index"] for c in listing.classes] == list(range(20))
    assert [c["wnid"] for c in listing.classes] == VOC_ORDER
    assert [c["name"] for c in listing.classes] == VOC_ORDER


def test_default_reading_labels_each_image_with_its_largest_non_difficult_object(voc):
    listing = list_source(voc, "voc")
    # 2007_000001: the person box (46x34) beats the dog's; the larger car is difficult.
    assert listing.splits == {
        "train": [("JPEGImages/2007_000001.jpg", VOC_ORDER.index("person")),
                  ("JPEGImages/2007_000002.jpg", VOC_ORDER.index("cat"))],
        "val": [("JPEGImages/2008_000001.jpg", VOC_ORDER.index("sheep"))]}
    assert listing.crops == {}
    assert "largest non-difficult object" in listing.reading
    assert "2 of 3 image(s) also hold other classes" in listing.reading


def test_broken_annotations_are_quarantined_with_reasons_that_say_what_to_do(voc):
    reasons = _reasons(list_source(voc, "voc").quarantine)
    jpeg = "JPEGImages/{}.jpg".format
    assert set(reasons) == {jpeg(i) for i in ("2007_000003", "2007_000004", "2007_000005",
                                              "2007_000006", "2007_000007", "2007_000008",
                                              "2008_000002")}
    assert "not valid VOC XML (ParseError" in reasons[jpeg("2007_000003")]
    assert "restore it" in reasons[jpeg("2007_000003")]
    assert ("object 1 (bird): box (10,10)-(80,30) lies outside the 60x40 image its <size> "
            "gives; correct" in reasons[jpeg("2007_000004")])
    assert "all its 1 object(s) are marked difficult" in reasons[jpeg("2007_000005")]
    assert ("listed in ImageSets/Main/train.txt but JPEGImages/2007_000006.jpg does not exist"
            in reasons[jpeg("2007_000006")])
    assert "class 'airplane' is not one of VOC's 20 classes; correct its <name>" in \
        reasons[jpeg("2007_000007")]
    assert "no annotation Annotations/2007_000008.xml" in reasons[jpeg("2007_000008")]
    assert "has no <object>" in reasons[jpeg("2008_000002")]
    counts = list_source(voc, "voc").counts()
    assert (counts["train"]["images"], counts["train"]["quarantined"]) == (2, 6)
    assert (counts["val"]["images"], counts["val"]["quarantined"]) == (1, 1)


def test_voc_objects_lists_one_item_per_non_difficult_object_with_its_box(voc):
    listing = list_source(voc, voc_objects=True)
    objects = dict(zip([p for p, _ in listing.splits["train"]],
                       listing.crops["train"].tolist(), strict=True))
    # 2007_000001: dog and person (the difficult car, object 3, left out); 2007_000004's
    # boat stays although its bird is outside the photo. Boxes 0-based, ends excluded.
    assert objects == {"JPEGImages/2007_000001.jpg#obj1": [4, 4, 20, 20],
                       "JPEGImages/2007_000001.jpg#obj2": [9, 4, 55, 38],
                       "JPEGImages/2007_000002.jpg#obj1": [2, 3, 50, 36],
                       "JPEGImages/2007_000004.jpg#obj2": [1, 1, 30, 30]}
    assert [lab for _, lab in listing.splits["train"]] == [VOC_ORDER.index(n) for n in
                                                          ("dog", "person", "cat", "boat")]
    assert len(listing.splits["val"]) == len(listing.crops["val"]) == 2
    reasons = _reasons(listing.quarantine)
    assert "lies outside the 60x40 image" in reasons["JPEGImages/2007_000004.jpg#obj1"]
    assert "JPEGImages/2007_000004.jpg" not in reasons
    assert "1 difficult object(s) left out" in listing.reading


def test_voc_objects_is_refused_for_other_layouts_and_odd_list_lines_are_quarantined(tmp_path):
    (tmp_path / "flowers" / "daisy").mkdir(parents=True)
    (tmp_path / "flowers" / "daisy" / "a.jpg").write_bytes(_photo())
    with pytest.raises(SourceError, match="--voc-objects crops Pascal VOC's object boxes, but "
                                          ".* is read as the imagefolder layout"):
        list_source(tmp_path / "flowers", voc_objects=True)
    with pytest.raises(SourceError, match="layout voc: no JPEGImages/ and ImageSets/Main/"):
        list_source(tmp_path / "flowers", "voc")
    root = make_voc(tmp_path / "v") / "VOCdevkit" / "VOC2012"
    (root / "ImageSets" / "Main" / "val.txt").write_text("2008_000001\n2007_000002\n2008_000001 1\n")
    reasons = _reasons(list_source(root).quarantine)
    assert "listed again (first in ImageSets/Main/train.txt:2)" in \
        reasons["ImageSets/Main/val.txt:2"]
    assert "expected one image id a line" in reasons["ImageSets/Main/val.txt:3"]


def test_hostile_xml_is_refused_not_expanded(tmp_path):
    """defusedxml: an entity-expansion annotation is a quarantine reason, not a memory bomb."""
    root = make_voc(tmp_path) / "VOCdevkit" / "VOC2012"
    bomb = ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxxxx">'
            '<!ENTITY y "&x;&x;&x;&x;&x;&x;&x;&x;&x;&x;">]><annotation><object><name>&y;'
            '</name></object></annotation>')
    (root / "Annotations" / "2007_000002.xml").write_text(bomb)
    reasons = _reasons(list_source(root).quarantine)
    assert "not valid VOC XML (EntitiesForbidden" in reasons["JPEGImages/2007_000002.jpg"]


# --------------------------------------------------------------------------- pipeline
def _records(out: Path, manifest: dict, split: str) -> list[shards.Record]:
    return [r[i] for r in shards.split_readers(out, manifest, split) for i in range(len(r))]


def test_preprocess_default_reading_records_and_manifest(ray_local, voc, tmp_path):
    out = tmp_path / "out"
    manifest = run_preprocess(PreprocessConfig(source=str(voc), out=str(out), resize=16))
    assert manifest["layout"] == "voc" and manifest["preprocess"]["voc_objects"] is False
    assert "one record per image, labelled with its largest" in manifest["reading"]
    assert [c["wnid"] for c in manifest["classes"]] == VOC_ORDER
    assert {s: (v["records"], v["quarantined"]) for s, v in manifest["splits"].items()} == {
        "train": (2, 6), "val": (1, 1)}
    labels = {r.path: r.label for r in _records(out, manifest, "train")}
    assert labels == {"JPEGImages/2007_000001.jpg": VOC_ORDER.index("person"),
                      "JPEGImages/2007_000002.jpg": VOC_ORDER.index("cat")}
    lines = [json.loads(x) for x in (out / shards.QUARANTINE).read_text().splitlines()]
    assert len(lines) == 7 and all(q["reason"] for q in lines)


def test_preprocess_voc_objects_crops_each_object_with_a_margin(ray_local, voc, tmp_path):
    # 2007_000002's <size> says 200x200 but the photo is 60x40: its box passes the listing
    # and is caught against the decoded photo.
    src = make_voc(tmp_path / "src")
    root = src / "VOCdevkit" / "VOC2012"
    (root / "Annotations" / "2007_000002.xml").write_text(
        _xml([("cat", 3, 4, 50, 36), ("bus", 10, 10, 100, 100)], size=(200, 200)))
    out = tmp_path / "out"
    manifest = run_preprocess(PreprocessConfig(source=str(src), out=str(out), resize=16,
                                               center_crop=False, voc_objects=True,
                                               encoding="raw"))
    assert manifest["preprocess"]["voc_objects"] is True
    assert "one record per non-difficult object" in manifest["reading"]
    records = {r.path: r for r in _records(out, manifest, "train")}
    assert sorted(records) == ["JPEGImages/2007_000001.jpg#obj1", "JPEGImages/2007_000001.jpg#obj2",
                               "JPEGImages/2007_000002.jpg#obj1", "JPEGImages/2007_000004.jpg#obj2"]
    assert manifest["splits"]["val"]["records"] == 2
    # Sizes: the dog's 16x16 box + 1 px margin a side = 18x18 -> 16x16. The person's 46x34
    # box + 4/3 px margins, clipped at the photo's bottom edge: 54x39 -> 22x16 (W x H).
    dog, person = (records[f"JPEGImages/2007_000001.jpg#obj{k}"] for k in (1, 2))
    assert (dog.width, dog.height) == (16, 16)
    assert (person.width, person.height) == (22, 16)
    # The crops hold the objects: the person and the cat were painted red.
    for rec in (person, records["JPEGImages/2007_000002.jpg#obj1"]):
        rgb = shards.decode_image(rec).reshape(-1, 3).astype(float)
        assert (np.abs(rgb - RED).max(axis=1) < 40).mean() > 0.6, rec.path
    reasons = _reasons([json.loads(x) for x in (out / shards.QUARANTINE).read_text().splitlines()])
    assert "lies outside the decoded 60x40 photo" in reasons["JPEGImages/2007_000002.jpg#obj2"]
    assert "lies outside the 60x40 image" in reasons["JPEGImages/2007_000004.jpg#obj1"]
