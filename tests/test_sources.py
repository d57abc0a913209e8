"""Source layouts: ImageNet, ImageFolder, images lists and CIFAR batches; auto detection; the
restricted CIFAR unpickler; listing without a stat per file. Mostly no Ray; the CIFAR and
images-list tests run the real pipeline.

    pytest tests/test_sources.py
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines.config import PreprocessConfig
from pipelines.data import shards
from pipelines.data.cifar import read_pickle_safely
from pipelines.data.preprocess import run_preprocess
from pipelines.data.sources import (
    ListLine,
    SourceError,
    detect_layout,
    list_source,
    read_images_list,
)


def _jpeg(value: int = 120, size: tuple[int, int] = (40, 50)) -> bytes:
    img = np.full((*size, 3), value, np.uint8)
    img[:, :, 1] = np.arange(size[1], dtype=np.uint8)[None, :]
    return cv2.imencode(".jpg", img)[1].tobytes()


# --------------------------------------------------------------------------- CIFAR fixtures
def py2_pickle(obj) -> bytes:
    """What Python 2's cPickle (protocol 2) wrote for the CIFAR batches: str as
    SHORT_BINSTRING/BINSTRING, numpy arrays through numpy.core.multiarray._reconstruct."""
    out = bytearray(b"\x80\x02")
    memo = [0]

    def put():
        memo[0] += 1
        out.extend(b"q" + bytes([memo[0] % 256]))

    def emit(o):
        if isinstance(o, dict):
            out.extend(b"}")
            put()
            out.extend(b"(")
            for k, v in o.items():
                emit(k)
                emit(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"]")
            put()
            out.extend(b"(")
            for v in o:
                emit(v)
            out.extend(b"e")
        elif isinstance(o, (bytes, str)):
            b = o.encode() if isinstance(o, str) else o
            out.extend((b"U" + bytes([len(b)])) if len(b) < 256 else
                       (b"T" + struct.pack("<i", len(b))))
            out.extend(b)
        elif isinstance(o, (int, np.integer)):
            o = int(o)
            out.extend(b"K" + bytes([o]) if 0 <= o < 256 else
                       b"M" + struct.pack("<H", o) if 0 <= o < 65536 else
                       b"J" + struct.pack("<i", o))
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8 and o.ndim == 2
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\n")
            put()
            out.extend(b"cnumpy\nndarray\n")
            put()
            out.extend(b"K\x00\x85U\x01b\x87R")
            put()
            out.extend(b"(K\x01")
            emit(o.shape[0])
            emit(o.shape[1])
            out.extend(b"\x86cnumpy\ndtype\n")
            put()
            out.extend(b"U\x02u1K\x00K\x01\x87R")
            put()
            out.extend(b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
            emit(o.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    emit(obj)
    out.extend(b".")
    return bytes(out)


def cifar_pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def make_cifar10(root: Path, per_batch: int = 6, batches: int = 2) -> Path:
    """CIFAR-10 python batches as the download has them (Python 2 pickles)."""
    root = root / "cifar-10-batches-py"
    root.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    (root / "batches.meta").write_bytes(py2_pickle(
        {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}))
    for b in range(batches + 1):
        name = f"data_batch_{b + 1}" if b < batches else "test_batch"
        labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        (root / name).write_bytes(py2_pickle(
            {"batch_label": f"batch {b}", "labels": labels, "data": cifar_pixels(per_batch, b),
             "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)]}))
    return root


def make_cifar100(root: Path, n_train: int = 8, n_test: int = 4, protocol: int = 2) -> Path:
    """CIFAR-100 as re-pickled by Python 3 (protocol 2 to 5): the other forms found in the wild."""
    root = root / "cifar-100-python"
    root.mkdir(parents=True)
    (root / "meta").write_bytes(pickle.dumps(
        {"fine_label_names": [f"fine{i}" for i in range(100)],
         "coarse_label_names": [f"coarse{i}" for i in range(20)]}, protocol=protocol))
    for name, n, seed in (("train", n_train, 10), ("test", n_test, 11)):
        (root / name).write_bytes(pickle.dumps(
            {"filenames": [f"f{i}.png" for i in range(n)], "fine_labels": [i * 7 % 100
                                                                          for i in range(n)],
             "coarse_labels": [i % 20 for i in range(n)], "data": cifar_pixels(n, seed)},
            protocol=protocol))
    return root


def test_py2_fixture_is_what_the_standard_unpickler_reads():
    """The hand-written Python 2 stream is a valid pickle: the reference unpickler (run here
    on our own generated bytes only) reads the same dict and array our safe reader does."""
    obj = {"labels": [1, 2, 300, 70000], "data": cifar_pixels(3, 0), "batch_label": "b"}
    data = py2_pickle(obj)
    ref = pickle.loads(data, encoding="bytes")
    ours = read_pickle_safely(data)
    assert ref[b"labels"] == ours["labels"] == [1, 2, 300, 70000]
    np.testing.assert_array_equal(ref[b"data"], ours["data"])
    assert ours["data"].dtype == np.uint8 and ours["batch_label"] == b"b"


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_safe_reader_reads_python3_pickles(protocol):
    arr = cifar_pixels(4, 1)
    obj = {"fine_labels": [3, 1], "data": arr, "names": ["a", "b"], "n": None, "f": 1.5}
    ours = read_pickle_safely(pickle.dumps(obj, protocol=protocol))
    np.testing.assert_array_equal(ours["data"], arr)
    assert ours["fine_labels"] == [3, 1] and ours["names"] == ["a", "b"]
    assert ours["n"] is None and ours["f"] == 1.5


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/evil-cifar-ran",))


def test_safe_reader_refuses_code_and_executes_nothing(tmp_path):
    marker = Path("/tmp/evil-cifar-ran")
    marker.unlink(missing_ok=True)
    evil = pickle.dumps({"data": _Evil()}, protocol=2)
    with pytest.raises(SourceError, match="refusing"):
        read_pickle_safely(evil, "data_batch_1")
    assert not marker.exists()
    with pytest.raises(SourceError, match="not a plain number type|refusing"):
        read_pickle_safely(pickle.dumps(np.array([object()]), protocol=2))
    with pytest.raises(SourceError):
        read_pickle_safely(b"\x80\x02}q\x01(U\x04data")  # truncated stream


class _Eval:
    def __reduce__(self):
        return (eval, ("__import__('os').system('touch /tmp/evil-cifar-ran')",))


class _Exec:
    def __reduce__(self):
        return (exec, ("open('/tmp/evil-cifar-ran', 'w').close()",))


@pytest.mark.parametrize("payload", [
    pickle.dumps({"data": _Evil()}, protocol=0),
    pickle.dumps({"data": _Eval()}, protocol=2),
    pickle.dumps([_Exec()], protocol=5),
    # A Python 2 batch naming __builtin__.eval (pickle maps it to builtins.eval).
    b"\x80\x02c__builtin__\neval\nq\x00U\x1f__import__('os').getcwd() and 1\x85R.",
    # An allowed module with a name CIFAR does not use.
    b"\x80\x02cnumpy\nload\nU\x05/etc/\x85R.",
], ids=["os.system-proto0", "builtins.eval", "builtins.exec-proto5", "py2-eval", "numpy.load"])
def test_restricted_unpickler_refuses_every_other_global(payload):
    """Each payload runs its code under pickle.loads; the CIFAR reader refuses it, with the
    same error, before anything is looked up."""
    marker = Path("/tmp/evil-cifar-ran")
    marker.unlink(missing_ok=True)
    with pytest.raises(SourceError, match="data_batch_1: refers to .*, which a CIFAR batch "
                                          "never does; refusing to load it"):
        read_pickle_safely(payload, "data_batch_1")
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    # numpy.ndarray((1,), "O", 8 bytes): an object array whose pointers are the bytes.
    b"\x80\x02cnumpy\nndarray\nK\x01\x85X\x01\x00\x00\x00OC\x08" + b"\x01" * 8 + b"\x87R.",
    # The same through protocol 5's _frombuffer(buffer, "O", (1,), "C").
    b"\x80\x02cnumpy._core.numeric\n_frombuffer\n(C\x08" + b"\x01" * 8
    + b"X\x01\x00\x00\x00OK\x01\x85X\x01\x00\x00\x00CtR.",
    # A real int64 array pickle with its dtype changed to object ("O8").
    pickle.dumps(np.array([1], np.int64), protocol=2).replace(b"X\x02\x00\x00\x00i8",
                                                              b"X\x02\x00\x00\x00O8"),
], ids=["ndarray-call", "frombuffer-object", "object-dtype"])
def test_numpy_globals_take_plain_numbers_only(payload):
    """The numpy functions a batch may name cannot be turned into object arrays made of the
    pickle's bytes (which crash the process, or worse)."""
    with pytest.raises(SourceError, match="not a plain number type|numpy.ndarray itself"):
        read_pickle_safely(payload, "data_batch_1")


def test_cifar10_and_cifar100_listing(tmp_path):
    c10 = make_cifar10(tmp_path / "a")
    assert detect_layout(tmp_path / "a")[0] == "cifar"  # the folder holding the download
    listing = list_source(tmp_path / "a")
    assert listing.layout == "cifar" and listing.root == str(c10)
    assert [c["name"] for c in listing.classes][:3] == ["airplane", "automobile", "bird"]
    assert len(listing.splits["train"]) == 12 and len(listing.splits["val"]) == 6
    assert listing.pixels["train"].shape == (12, 3072)
    assert listing.splits["train"][7] == ("data_batch_2/1", 7)
    c100 = make_cifar100(tmp_path / "b", protocol=5)
    listing = list_source(c100, "cifar")
    assert len(listing.classes) == 100 and listing.classes[5]["name"] == "fine5"
    assert [lab for _, lab in listing.splits["train"]] == [i * 7 % 100 for i in range(8)]


@pytest.mark.slow
def test_cifar_through_the_pipeline_keeps_exact_pixels(ray_local, tmp_path):
    make_cifar10(tmp_path / "src")
    out = tmp_path / "out"
    manifest = run_preprocess(PreprocessConfig(source=str(tmp_path / "src"), out=str(out),
                                               resize=32, encoding="raw", batch_size=4))
    assert manifest["layout"] == "cifar"
    assert manifest["splits"]["train"]["records"] == 12
    assert manifest["splits"]["val"]["records"] == 6
    records = [r[i] for r in shards.split_readers(out, manifest, "train") for i in range(len(r))]
    for rec in records:  # raw 32x32 records are the batch's pixels, HWC
        batch, index = rec.path.split("/")
        want = cifar_pixels(6, int(batch[-1]) - 1)[int(index)].reshape(3, 32, 32)
        np.testing.assert_array_equal(shards.decode_image(rec), want.transpose(1, 2, 0))
        assert rec.label == ((int(batch[-1]) - 1) * 6 + int(index)) % 10


# --------------------------------------------------------------------------- folders and lists
def test_imagefolder_any_extension_any_case(tmp_path):
    src = tmp_path / "flowers"
    for cls, names in {"daisy": ["a.JPEG", "b.jpg", "c.JpEg", "d.png"],
                       "rose": ["e.PNG", "f.bmp", "sub/g.jpeg"]}.items():
        for name in names:
            (src / cls / name).parent.mkdir(parents=True, exist_ok=True)
            (src / cls / name).write_bytes(_jpeg())
    (src / "daisy" / "notes.txt").write_text("not an image")
    (src / "loose.jpg").write_bytes(_jpeg())
    layout, why = detect_layout(src)
    assert layout == "imagefolder" and "class folders" in why
    listing = list_source(src)
    assert [c["wnid"] for c in listing.classes] == ["daisy", "rose"]
    assert sorted(listing.splits["train"]) == sorted(
        [(f"daisy/{n}", 0) for n in ["a.JPEG", "b.jpg", "c.JpEg", "d.png"]]
        + [(f"rose/{n}", 1) for n in ["e.PNG", "f.bmp", "sub/g.jpeg"]])
    assert listing.ignored == {"train": 1} and listing.ignored_examples["train"] == [
        "daisy/notes.txt"]
    assert listing.quarantine == [{"split": "train", "path": "loose.jpg",
                                   "reason": "image is not inside a class folder"}]
    counts = listing.counts()["train"]
    assert counts["per_class"] == {"daisy": 4, "rose": 3} and counts["ignored"] == 1


def test_imagefolder_with_split_folders(tmp_path):
    src = tmp_path / "src"
    for split, cls in (("train", "cat"), ("train", "dog"), ("val", "cat"), ("val", "emu")):
        (src / split / cls).mkdir(parents=True)
        (src / split / cls / "1.jpg").write_bytes(_jpeg())
    assert detect_layout(src)[0] == "imagefolder"
    listing = list_source(src)
    assert listing.splits == {"train": [("train/cat/1.jpg", 0), ("train/dog/1.jpg", 1)],
                              "val": [("val/cat/1.jpg", 0)]}
    assert listing.quarantine[0]["path"] == "val/emu/1.jpg"
    assert "not in the class index" in listing.quarantine[0]["reason"]


def test_imagenet_val_in_wnid_folders(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            (src / split / wnid).mkdir(parents=True)
            (src / split / wnid / f"{split}_{wnid}.JPEG").write_bytes(_jpeg())
    layout, why = detect_layout(src)
    assert layout == "imagenet" and "n01440764" in why
    listing = list_source(src)
    assert listing.splits["val"] == [("val/n01440764/val_n01440764.JPEG", 0),
                                     ("val/n01443537/val_n01443537.JPEG", 1)]


def test_images_list_relative_absolute_and_bad_lines(tmp_path):
    src = tmp_path / "data"
    (src / "imgs").mkdir(parents=True)
    (src / "imgs" / "a.jpg").write_bytes(_jpeg())
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(_jpeg())
    lst = src / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text(f"# class_id image_path\n0 ../imgs/a.jpg\n2 {elsewhere}\n"
                   "x ../imgs/a.jpg\n1\n-1 ../imgs/b.jpg\n1 ../imgs/with space.jpg\n"
                   "0 ../imgs/a.jpg\n")
    assert detect_layout(lst)[0] == "images-list"
    listing = list_source(lst)
    assert listing.root == str(lst.parent)
    assert listing.splits["train"] == [("../imgs/a.jpg", 0), (str(elsewhere), 2),
                                       ("../imgs/with space.jpg", 1)]
    assert [c["index"] for c in listing.classes] == [0, 1, 2]
    reasons = {q["path"]: q["reason"] for q in listing.quarantine}
    assert "expected 'class_id image_path'" in reasons["train.txt:4"]
    assert "no image path" in reasons["train.txt:5"]
    assert any("label -1 is not in the class index" in r for r in reasons.values())
    assert "listed again" in reasons["../imgs/a.jpg"]
    # A folder with train.txt / val.txt lists is the same layout, splits from the names.
    (src / "train.txt").write_text("0 imgs/a.jpg\n")
    (src / "val.txt").write_text("0 imgs/a.jpg\n")
    listing = list_source(src)
    assert listing.layout == "images-list" and set(listing.splits) == {"train", "val"}


def test_images_list_parser_crlf_blank_lines_comments_and_one_token_lines(tmp_path):
    """The one parser both preprocess and batch-infer use: what it yields per line, and
    preprocess's policy on top of it (integer class id and a path, else quarantined)."""
    lst = tmp_path / "train.txt"
    lst.write_bytes(b"# header\r\n\r\n  # indented comment\r\n0 a.jpg\r\n   \r\n"
                    b"1\tsub dir/b c.jpg  \r\nn01440764 c.jpg\r\nonly.jpg\r\n2\r\n")
    assert list(read_images_list(lst)) == [
        ListLine(4, "0 a.jpg", "0", "a.jpg"),
        ListLine(6, "1\tsub dir/b c.jpg", "1", "sub dir/b c.jpg"),
        ListLine(7, "n01440764 c.jpg", "n01440764", "c.jpg"),
        ListLine(8, "only.jpg", None, "only.jpg"),
        ListLine(9, "2", None, "2")]
    listing = list_source(lst, "images-list")  # auto: too many bad lines to detect a list
    assert listing.splits["train"] == [("a.jpg", 0), ("sub dir/b c.jpg", 1)]  # no "\r"
    reasons = {q["path"]: q["reason"] for q in listing.quarantine}
    assert reasons == {"train.txt:7": "expected 'class_id image_path', got 'n01440764 c.jpg'",
                       "train.txt:8": "expected 'class_id image_path', got 'only.jpg'",
                       "train.txt:9": "line has a class id but no image path"}
    lst.write_bytes(b"0 \xff.jpg\n")  # not UTF-8: an error naming the list, no traceback
    with pytest.raises(SourceError, match=f"cannot read images list {lst}: 'utf-8' codec"):
        read_images_list(lst)
    with pytest.raises(SourceError, match="cannot read images list .*missing.txt"):
        read_images_list(tmp_path / "missing.txt")


def test_unknown_layout_names_what_was_looked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no known layout found. Looked for: an images list"):
        list_source(tmp_path / "empty")
    with pytest.raises(SourceError, match="does not exist"):
        list_source(tmp_path / "missing")
    (tmp_path / "x.jpg").write_bytes(_jpeg())
    with pytest.raises(SourceError, match="not an images list"):
        list_source(tmp_path / "x.jpg")
    with pytest.raises(SourceError, match="layout imagenet"):
        list_source(tmp_path / "empty", "imagenet")
    empty_classes = tmp_path / "ec" / "train" / "n01440764"
    empty_classes.mkdir(parents=True)
    with pytest.raises(SourceError, match="found no usable images"):
        list_source(tmp_path / "ec")


def test_listing_does_not_stat_each_file(tmp_path, monkeypatch):
    """A million files must list from directory reads alone: count stat calls on files."""
    src = tmp_path / "src"
    for c in range(5):
        d = src / "train" / f"n0000000{c}"
        d.mkdir(parents=True)
        for i in range(40):
            (d / f"{i}.JPEG").write_bytes(b"")
    calls = []
    real_stat, real_lstat = os.stat, os.lstat

    def counting_stat(path, *a, **k):
        calls.append(str(path))
        return real_stat(path, *a, **k)

    def counting_lstat(path, *a, **k):
        calls.append(str(path))
        return real_lstat(path, *a, **k)

    monkeypatch.setattr(os, "stat", counting_stat)
    monkeypatch.setattr(os, "lstat", counting_lstat)
    listing = list_source(src)
    assert len(listing.splits["train"]) == 200
    assert not [c for c in calls if c.endswith(".JPEG")]
    assert len(calls) < 30  # the root, train/ and a few folders, not 200 files
