"""Training input on real LMDB shards of real JPEG bytes: disjoint equal shares per epoch,
reproducible crops, corrupt records skipped and counted, GPU-decode path (run on CPU here,
on CUDA when present), and the manifest/shard checks that run before any worker starts.

    .venv/bin/python -m pytest -q tests/test_ingest.py
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipelines.data.shards import (
    FORMAT_VERSION,
    ShardReader,
    file_sha256,
    pack_record,
    split_readers,
    unpack_record,
    write_shard,
)
from pipelines.train.ingest import (
    DatasetMismatch,
    EpochSampler,
    ShardRecords,
    augmented_samples,
    check_dataset,
    decode_crop_batch,
    make_loader,
)

STATS = {"mean": [120.0, 115.0, 100.0], "std": [60.0, 58.0, 57.0],
         "eigval": [9000.0, 600.0, 100.0],
         "eigvec": [[0.58, 0.58, 0.57], [-0.71, 0.0, 0.71], [0.41, -0.82, 0.41]]}


def jpeg_image(rng: np.random.Generator, h: int, w: int, label: int) -> np.ndarray:
    """A smooth image (JPEG keeps it close) with a class-dependent colour."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 60.0 * label)], -1)
    return np.clip(base + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)


def write_dataset(root: Path, classes: int = 3, train: int = 12, val: int = 6,
                  side: int = 40, shards: int = 2, seed: int = 0) -> Path:
    """A preprocess-shaped OUT: JPEG records in LMDB shards and a manifest per the contract."""
    rng = np.random.default_rng(seed)
    manifest = {"format": FORMAT_VERSION,
                "classes": [{"index": i, "wnid": f"n{i:08d}", "name": f"class {i}"}
                            for i in range(classes)],
                "splits": {}, "stats": STATS,
                "preprocess": {"resize": side, "encoding": "jpeg", "quality": 95}}
    for split, n in (("train", train), ("val", val)):
        if n == 0:
            continue
        values = []
        for i in range(n):
            label = i % classes
            img = jpeg_image(rng, side, side + 4 * (i % 2), label)
            ok, enc = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            assert ok
            values.append(pack_record(label, img.shape[0], img.shape[1], "jpeg",
                                      f"{split}/{i}.JPEG", enc.tobytes()))
        entries = []
        for k, part in enumerate(np.array_split(np.arange(n), shards)):
            rel = f"{split}/shard-{k:05d}.lmdb"
            (root / split).mkdir(parents=True, exist_ok=True)
            sha = write_shard(root / rel, [values[i] for i in part], {"split": split,
                                                                     "shard": k})
            entries.append({"path": rel, "records": len(part), "sha256": sha,
                            "bytes": (root / rel).stat().st_size})
        manifest["splits"][split] = {"records": n, "quarantined": 0, "shards": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def corrupt_record(shard: Path, index: int) -> str:
    """Flip one byte inside record `index`'s image bytes, in place (bit rot: the file keeps
    its size and LMDB structure; only the record's CRC tells). LMDB's copy-on-write may
    leave stale copies of a leaf page in the file, so every copy of the window is flipped;
    the window comes from the entropy-coded data (headers and Huffman tables repeat across
    JPEGs of one encoder), and the other records are checked to still read."""
    reader = ShardReader(shard)
    rec = reader[index]
    others = [i for i in range(len(reader)) if i != index and _reads(reader, i)]
    needle = rec.image[len(rec.image) - 48:len(rec.image) - 16]
    blob = bytearray(shard.read_bytes())
    at = blob.find(needle)
    assert at > 0, f"record {index} not found in {shard}"
    while at >= 0:
        blob[at + 5] ^= 0xFF
        at = blob.find(needle, at + 1)
    shard.write_bytes(bytes(blob))
    assert not _reads(reader, index)
    assert all(_reads(reader, i) for i in others), "the flip hit another record"
    return rec.path


def _reads(reader: ShardReader, index: int) -> bool:
    try:
        reader[index]
        return True
    except ValueError:
        return False


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "out")


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


@pytest.mark.parametrize("n, world", [(12, 2), (13, 2), (10, 3), (7, 1)])
def test_epoch_shares_are_disjoint_equal_and_reshuffled(n, world):
    def shares(epoch, seed=0):
        out = []
        for rank in range(world):
            s = EpochSampler(n, rank, world, seed, shuffle=True)
            s.set_epoch(epoch)
            out.append(s.indices())
        return out

    e0, e1 = shares(0), shares(1)
    assert len({len(s) for s in e0}) == 1 and len(e0[0]) == n // world  # same steps per rank
    flat = np.concatenate(e0)
    assert len(set(flat.tolist())) == len(flat) == n - n % world       # disjoint, all but rest
    assert not all(np.array_equal(a, b) for a, b in zip(e0, e1, strict=True))  # reshuffled
    assert all(np.array_equal(a, b) for a, b in zip(e0, shares(0), strict=True))  # seeded
    # Validation: every record exactly once across ranks, no padding.
    val = np.concatenate([EpochSampler(n, r, world, 0, shuffle=False).indices()
                          for r in range(world)])
    assert sorted(val.tolist()) == list(range(n))


def test_train_crops_are_reproducible_per_epoch_and_differ_across_epochs(dataset):
    m = _manifest(dataset)
    ds = ShardRecords(split_readers(dataset, m, "train"), 32, "train", seed=3)
    a, label, ok = ds[(0 << 40) | 5]
    b, _, _ = ds[(0 << 40) | 5]
    others = [ds[(e << 40) | 5][0] for e in range(1, 6)]
    assert ok and label == 5 % 3 and a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, o) for o in others)
    ten, _, ok = ShardRecords(split_readers(dataset, m, "val"), 32, "ten")[1]
    assert ok and ten.shape == (10, 32, 32, 3)


def test_a_corrupt_record_is_skipped_and_counted_not_fatal(dataset):
    m = _manifest(dataset)
    shard = dataset / m["splits"]["train"]["shards"][0]["path"]
    corrupt_record(shard, 2)
    with pytest.raises(ValueError, match="CRC"):
        unpack_record(ShardReader(shard).raw(2))
    loader = make_loader(split_readers(dataset, m, "train"), 32, "train", batch_size=4,
                         rank=0, world=1, seed=0, workers=0, pin_memory=False)
    seen = bad = 0
    for images, _, ok in loader:
        seen += int(ok.sum())
        bad += int((~ok).sum())
        assert images.shape[1:] == (32, 32, 3)
    assert (seen, bad) == (11, 1)
    # The manifest checks look at sizes and counts, not at every byte: bit rot passes them
    # and is caught record by record at read time, as above.
    assert check_dataset(dataset, m, "train", "val", 32)["train"]["records"] == 12


def _gpu_path_matches_cpu_path(dataset, device):
    m = _manifest(dataset)
    readers = split_readers(dataset, m, "train")
    for mode in ("train", "center"):
        cpu = ShardRecords(readers, 32, mode, seed=1)
        gpu = ShardRecords(readers, 32, mode, seed=1, gpu_decode=True)
        keys = [(2 << 40) | i for i in range(len(cpu))]
        expected = np.stack([cpu[k][0] for k in keys])
        items = [gpu[k] for k in keys]
        datas = [it[0] for it in items]
        ok = torch.tensor([it[2] for it in items])
        boxes = torch.tensor([[it[3][0], it[3][1], int(it[3][2])] for it in items])
        batch, ok = decode_crop_batch(datas, boxes, ok, 32, device)
        assert bool(ok.all()) and batch.shape == (len(keys), 3, 32, 32)
        assert batch.is_contiguous(memory_format=torch.channels_last)
        got = batch.permute(0, 2, 3, 1).cpu().numpy().astype(int)
        # Same boxes and flips; libjpeg/nvJPEG and OpenCV's libjpeg-turbo may round the
        # IDCT and chroma upsampling differently by a few levels, never more.
        diff = np.abs(got - expected.astype(int))
        assert diff.mean() < 2.0 and diff.max() < 40, (mode, diff.mean(), diff.max())
    # Undecodable bytes are dropped from the batch and marked not ok.
    junk = torch.frombuffer(bytearray(b"\xff\xd8\xff" + b"\x00" * 64), dtype=torch.uint8)
    batch, ok = decode_crop_batch([datas[0], junk], boxes[:2], torch.tensor([True, True]), 32,
                                  device)
    assert ok.tolist() == [True, False] and batch.shape[0] == 1


def test_gpu_decode_path_on_cpu_crops_what_the_cpu_path_crops(dataset):
    _gpu_path_matches_cpu_path(dataset, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_on_cuda_crops_what_the_cpu_path_crops(dataset):
    _gpu_path_matches_cpu_path(dataset, "cuda")


def test_gpu_decode_refuses_ten_crop_and_non_jpeg_records(dataset, tmp_path):
    m = _manifest(dataset)
    with pytest.raises(ValueError, match="ten"):
        ShardRecords(split_readers(dataset, m, "val"), 32, "ten", gpu_decode=True)
    raw = np.zeros((40, 40, 3), np.uint8)
    write_shard(tmp_path / "raw.lmdb", [pack_record(0, 40, 40, "raw", "a", raw.tobytes())],
                {"split": "train", "shard": 0})
    data, label, ok, _ = ShardRecords([ShardReader(tmp_path / "raw.lmdb")], 32, "train",
                                      gpu_decode=True)[0]
    assert (ok, label, data.numel()) == (False, -1, 0)


@pytest.mark.parametrize("breakage, match", [
    ("missing_shard", "missing"),
    ("size", "bytes, the manifest says"),
    ("records", "records, the manifest says"),
    ("split_total", "shards hold"),
    ("stats", "stats.eigvec"),
    ("no_train", "has no records"),
    ("not_lmdb", "not a finished LMDB shard"),
])
def test_a_manifest_that_does_not_match_its_shards_is_a_clear_error(dataset, breakage, match):
    m = _manifest(dataset)
    shard = m["splits"]["train"]["shards"][1]
    if breakage == "missing_shard":
        (dataset / shard["path"]).unlink()
    elif breakage == "size":
        shard["bytes"] += 1
    elif breakage == "records":
        shard["records"] += 1
        m["splits"]["train"]["records"] += 1
    elif breakage == "split_total":
        m["splits"]["train"]["records"] += 1
    elif breakage == "stats":
        m["stats"]["eigvec"] = [1.0, 0.0, 0.0]
    elif breakage == "no_train":
        del m["splits"]["train"]
    elif breakage == "not_lmdb":
        path = dataset / shard["path"]
        path.write_bytes(b"x" * path.stat().st_size)
    with pytest.raises(DatasetMismatch, match=match):
        check_dataset(dataset, m, "train", "val", 32)


def test_crop_larger_than_the_stored_images_is_refused(dataset):
    with pytest.raises(DatasetMismatch, match="--crop 48 is larger"):
        check_dataset(dataset, _manifest(dataset), "train", "val", 48)
    found = check_dataset(dataset, _manifest(dataset), "train", "val", 40)
    assert found == {"train": {"records": 12, "shards": 2}, "val": {"records": 6, "shards": 2}}
    assert file_sha256(dataset / "manifest.json")


def test_augmented_samples_are_crops_with_a_small_colour_shift(dataset):
    m = _manifest(dataset)
    readers = split_readers(dataset, m, "train")
    plain = augmented_samples(readers, STATS, 32, n=8, seed=0, alphastd=0.0)
    lit = augmented_samples(readers, STATS, 32, n=8, seed=0, alphastd=0.1)
    assert plain.shape == lit.shape == (8, 32, 32, 3) and lit.dtype == np.uint8
    shift = np.abs(lit.astype(int) - plain.astype(int)).reshape(8, -1).mean(1)
    # PCA lighting: a few pixel levels per image (top eigval 9000 -> std ~3.5 levels).
    assert shift.max() < 25 and shift.mean() > 0.1
