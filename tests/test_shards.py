"""The pickle-free record format and shard files."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.shards import (
    RecordError,
    ShardReader,
    decode_image,
    file_sha256,
    pack_record,
    read_manifest,
    unpack_record,
    write_shard,
)


def test_record_round_trip_and_header_layout():
    image = bytes(range(256)) * 3
    value = pack_record(7, 16, 16, "raw", "train/n01/x.JPEG", image)
    assert value[:4] == b"AXR1" and len(value) == 24 + len("train/n01/x.JPEG") + len(image)
    rec = unpack_record(value)
    assert (rec.label, rec.height, rec.width, rec.encoding, rec.path) == \
        (7, 16, 16, "raw", "train/n01/x.JPEG")
    assert decode_image(rec).shape == (16, 16, 3)


def test_corruption_is_detected():
    value = bytearray(pack_record(1, 2, 2, "raw", "a", bytes(12)))
    value[-1] ^= 0xFF
    with pytest.raises(RecordError, match="CRC"):
        unpack_record(bytes(value))
    with pytest.raises(RecordError, match="header"):
        unpack_record(b"PK\x03\x04" + bytes(40))
    with pytest.raises(RecordError, match="shorter"):
        unpack_record(b"AXR1")


def test_shard_write_read_and_reproducible_checksum(tmp_path):
    values = [pack_record(i, 1, 1, "raw", f"p{i}", bytes([i, i, i])) for i in range(5)]
    sha_a = write_shard(tmp_path / "a.lmdb", values, {"split": "train", "shard": 0})
    sha_b = write_shard(tmp_path / "b.lmdb", values, {"split": "train", "shard": 0})
    assert sha_a == sha_b == file_sha256(tmp_path / "a.lmdb")
    assert not (tmp_path / "a.lmdb.tmp").exists()
    reader = ShardReader(tmp_path / "a.lmdb")
    assert len(reader) == 5 and reader.meta()["records"] == 5
    assert [reader[i].label for i in range(5)] == list(range(5))
    np.testing.assert_array_equal(decode_image(reader[3]), np.full((1, 1, 3), 3))
    with pytest.raises(RecordError, match="missing"):
        reader.raw(5)


def test_missing_manifest_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="workflow.py preprocess"):
        read_manifest(tmp_path)
