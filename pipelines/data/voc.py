"""The `voc` layout of `preprocess`: Pascal VOC 2012 as downloaded.

    pytest tests/test_voc.py

VOC2012/{JPEGImages,Annotations,ImageSets/Main}; SRC is VOC2012/ or a folder holding VOC2012/
or VOCdevkit/VOC2012/; splits from ImageSets/Main/{train,val}.txt; the class index is VOC's 20
classes in VOC's order. VOC is multi-label, a record has one label: by default one record per
image, labelled with its largest non-difficult object (box area); with --voc-objects one record
per non-difficult object ("<jpeg>#obj<N>", N the object's place in the XML), its box cropped
with a margin at decode time.

VOC annotations are XML from a download, so they are parsed with defusedxml (no entity
expansion, no external references), never xml.etree directly. Each annotation is read in
the driver at listing time (~11,500 files of ~1 KB for VOC2012 train+val, a few seconds):
the label depends on its objects. A missing, unparsable or empty annotation, an unknown
class, a box outside the image's <size>, only difficult objects, an id without its JPEG:
each is quarantined with a reason, never fatal.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from pipelines.data.decode import BOX_MARGIN
from pipelines.data.sources import (
    IMAGE_EXTENSIONS,
    VOC_OBJECT,
    Listing,
    SourceError,
    named_classes,
)

# VOC's own class order (devkit VOCinit.m): the class index, so label i means the same class
# in every VOC-derived dataset and in published per-class results.
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
VOC_SPLITS = ("train", "val")  # ImageSets/Main/<split>.txt; trainval.txt is their union
MAX_ANNOTATION_BYTES = 1 << 20  # VOC's annotations are under 10 KB; more is not one of them


class VocObject(NamedTuple):
    number: int                     # 1-based place among the XML's <object>s ("#obj<N>")
    name: str
    difficult: bool
    box: tuple[int, int, int, int]  # x0, y0, x1, y1: 0-based, end excluded
    problem: str                    # why the object cannot be used; "" when it can

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


class AnnotationError(ValueError):
    """An annotation that gives no object at all; the message is the quarantine reason."""


def _xml_int(node, tag: str) -> int | None:
    text = node.findtext(tag) if node is not None else None
    try:
        return round(float(text))  # a few VOC2012 boxes are written as "273.5"
    except (TypeError, ValueError):
        return None


def read_voc_annotation(path: Path, rel: str) -> list[VocObject]:
    """The objects of one VOC annotation file, each with its problem ("" if none);
    AnnotationError when the file gives none (missing, too large, not XML, no <object>).
    `rel` names the file in reasons."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_ANNOTATION_BYTES + 1)
    except FileNotFoundError:
        raise AnnotationError(f"no annotation {rel}: the label comes from it; restore it from "
                              "the VOC2012 trainval tar or drop the id from the split's "
                              "ImageSets/Main list") from None
    except OSError as exc:
        raise AnnotationError(f"annotation {rel} is unreadable ({exc.strerror}); fix its "
                              "permissions or restore it") from None
    if len(data) > MAX_ANNOTATION_BYTES:
        raise AnnotationError(f"annotation {rel} is over {MAX_ANNOTATION_BYTES >> 20} MiB, not "
                              "a VOC annotation (those are under 10 KB); restore it")
    try:
        root = fromstring(data)
    except (ParseError, DefusedXmlException) as exc:
        raise AnnotationError(f"annotation {rel} is not valid VOC XML ({type(exc).__name__}: "
                              f"{exc}); restore it from the VOC2012 tar or fix it") from None
    # Without a usable <size> the boxes are checked against the decoded photo instead (a
    # --voc-objects crop); the default reading only compares box areas.
    size = root.find("size")
    width, height = _xml_int(size, "width"), _xml_int(size, "height")
    objects = []
    for number, node in enumerate(root.findall("object"), 1):
        name = (node.findtext("name") or "").strip()
        difficult = (node.findtext("difficult") or "0").strip() == "1"
        bndbox = node.find("bndbox")
        coords = [_xml_int(bndbox, t) for t in ("xmin", "ymin", "xmax", "ymax")]
        box, problem = (0, 0, 0, 0), ""
        if name not in VOC_CLASSES:
            problem = (f"{rel} object {number}: class {name!r} is not one of VOC's 20 classes; "
                       "correct its <name>")
        elif None in coords:
            problem = (f"{rel} object {number} ({name}): <bndbox> lacks a numeric xmin, ymin, "
                       "xmax or ymax; correct it")
        else:
            xmin, ymin, xmax, ymax = coords
            # VOC counts pixels from 1, ends included; a 0 from 0-based tools is let through.
            box = (max(xmin - 1, 0), max(ymin - 1, 0), xmax, ymax)
            outside = bool(width and height and width > 0 and height > 0
                           and (xmax > width or ymax > height))
            if min(coords) < 0 or xmax < xmin or ymax < ymin or box[2] <= box[0] \
                    or box[3] <= box[1]:
                problem = (f"{rel} object {number} ({name}): box ({xmin},{ymin})-({xmax},{ymax}) "
                           "is empty or negative; correct its <bndbox>")
            elif outside:
                problem = (f"{rel} object {number} ({name}): box ({xmin},{ymin})-({xmax},{ymax}) "
                           f"lies outside the {width}x{height} image its <size> gives; correct "
                           "the <bndbox> or the <size>")
        objects.append(VocObject(number, name, difficult, box, problem))
    if not objects:
        raise AnnotationError(f"annotation {rel} has no <object>, so no label; add its objects "
                              "or drop the id from the split's ImageSets/Main list")
    return objects


def voc_root(src: Path) -> Path | None:
    for root in (src, src / "VOC2012", src / "VOCdevkit" / "VOC2012"):
        if (root / "JPEGImages").is_dir() and (root / "ImageSets" / "Main").is_dir():
            return root
    return None


def _voc_ids(root: Path, split: str, listing: Listing, seen: dict[str, str]) -> list[str]:
    """The image ids of ImageSets/Main/<split>.txt, once each and in no other split."""
    rel = f"ImageSets/Main/{split}.txt"
    try:
        text = (root / rel).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read {root / rel}: {exc}") from None
    ids = []
    for n, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        where = f"{rel}:{n}"
        if not tokens:
            continue
        if len(tokens) != 1:  # e.g. a per-class list ("2008_000008 -1") given as train.txt
            listing.reject(split, where, f"expected one image id a line, got {line.strip()!r}; "
                           "the split lists are ImageSets/Main/train.txt and val.txt as "
                           "downloaded")
        elif tokens[0] in seen:
            listing.reject(split, where, f"image id {tokens[0]} listed again (first in "
                           f"{seen[tokens[0]]}); kept once, so no image is in two splits or "
                           "twice in one")
        else:
            seen[tokens[0]] = where
            ids.append(tokens[0])
    return ids


def list_voc(src: Path, objects: bool = False) -> Listing:
    """Pascal VOC 2012 (see the module docstring): one record per image labelled with its
    largest non-difficult object, or with `objects` one record per non-difficult object."""
    root = voc_root(src)
    if root is None:
        raise SourceError(f"layout voc: no JPEGImages/ and ImageSets/Main/ in {src}, "
                          f"{src / 'VOC2012'} or {src / 'VOCdevkit' / 'VOC2012'}; give the "
                          "VOC2012 folder of the extracted trainval tar as --source")
    if not (root / "Annotations").is_dir():
        raise SourceError(f"layout voc: {root / 'Annotations'} is missing; the labels come "
                          "from its XML files (VOC2012 trainval tar)")
    splits = [s for s in VOC_SPLITS if (root / "ImageSets" / "Main" / f"{s}.txt").is_file()]
    if not splits:
        raise SourceError(f"layout voc: {root / 'ImageSets' / 'Main'} holds neither train.txt "
                          "nor val.txt, which name each split's images (VOC2012 trainval tar)")
    classes, index = named_classes(VOC_CLASSES)
    listing = Listing("voc", classes, {}, root=str(root))
    # One directory read tells which ids have a photo: no stat or failed open per id.
    jpegs = {}
    try:
        with os.scandir(root / "JPEGImages") as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() in IMAGE_EXTENSIONS and (stem not in jpegs or ext == ".jpg"):
                    jpegs[stem] = entry.name
    except OSError as exc:
        raise SourceError(f"cannot read folder {root / 'JPEGImages'}: {exc.strerror}; fix its "
                          "permissions") from None
    seen: dict[str, str] = {}
    images = difficult = other_classes = 0
    for split in splits:
        items, boxes = listing.splits.setdefault(split, []), []
        for image_id in _voc_ids(root, split, listing, seen):
            name = jpegs.get(image_id)
            jpeg = f"JPEGImages/{name or image_id + '.jpg'}"
            if name is None:
                listing.reject(split, jpeg, f"listed in ImageSets/Main/{split}.txt but {jpeg} "
                               "does not exist; restore it from the VOC2012 tar or drop the id "
                               "from the list")
                continue
            try:
                in_xml = read_voc_annotation(root / "Annotations" / f"{image_id}.xml",
                                            f"Annotations/{image_id}.xml")
            except AnnotationError as exc:
                listing.reject(split, jpeg, str(exc))
                continue
            usable = [obj for obj in in_xml if not obj.difficult]
            if not usable:
                listing.reject(split, jpeg, f"Annotations/{image_id}.xml: all its {len(in_xml)} "
                               "object(s) are marked difficult, which VOC leaves out of "
                               "training and evaluation: nothing to label it with")
                continue
            if objects:
                for obj in in_xml:
                    if obj.problem:
                        listing.reject(split, f"{jpeg}{VOC_OBJECT}{obj.number}", obj.problem)
                    elif obj.difficult:
                        difficult += 1
                    else:
                        items.append((f"{jpeg}{VOC_OBJECT}{obj.number}", index[obj.name]))
                        boxes.append(obj.box)
                continue
            problems = [obj.problem for obj in in_xml if obj.problem]
            if problems:  # a wrong class or box: which object is the largest is unknown
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                listing.reject(split, jpeg, problems[0] + more)
                continue
            largest = max(usable, key=lambda obj: obj.area)  # the first of equals: XML order
            images += 1
            other_classes += len({obj.name for obj in usable}) > 1
            items.append((jpeg, index[largest.name]))
        if objects:
            listing.crops[split] = np.asarray(boxes, np.int32).reshape(-1, 4)
    if objects:
        listing.reading = (
            f"VOC multi-label read as one record per non-difficult object: its box cropped "
            f"with a margin of {BOX_MARGIN:g} x the box side (clipped to the photo) before the "
            f"rescale, named <jpeg>{VOC_OBJECT}<N>; {difficult} difficult object(s) left out, "
            "as VOC's evaluation leaves them out")
    else:
        listing.reading = (
            f"VOC multi-label read as one record per image, labelled with its largest "
            f"non-difficult object by box area; {other_classes} of {images} image(s) also hold "
            "other classes, which are not recorded (--voc-objects: one record per object)")
    return listing
