"""preprocess on real Ray Data, real JPEG files and real LMDB shards."""

from __future__ import annotations

import csv
import fcntl
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines.config import PreprocessConfig
from pipelines.data.decode import decode_rgb, rescale
from pipelines.data.manifest import moments_to_stats, summary_table
from pipelines.data.output import PreprocessError
from pipelines.data.preprocess import run_preprocess
from pipelines.data.shards import (
    _ENVS,
    FORMAT_VERSION,
    QUARANTINE,
    Record,
    ShardReader,
    decode_image,
    file_sha256,
    split_readers,
)
from pipelines.data.verify import verify_output


def _all_records(out: Path, manifest: dict, split: str) -> list[Record]:
    return [r[i] for r in split_readers(out, manifest, split) for i in range(len(r))]


def _direct_stats(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    flat = pixels.reshape(-1, 3).astype(np.float64)
    mean = flat.mean(0)
    cov = np.cov(flat, rowvar=False, bias=True)
    eigval, eigvec = np.linalg.eigh(cov)
    return mean, eigval[::-1], eigvec[:, ::-1].T


def test_stats_match_numpy_over_the_same_rescaled_pixels(ray_local, tiny_source, tmp_path):
    out = tmp_path / "out"
    manifest = run_preprocess(PreprocessConfig(source=str(tiny_source), out=str(out),
                                               encoding="raw", resize=64, batch_size=8))
    records = _all_records(out, manifest, "train")
    assert len(records) == 40
    pixels = np.stack([decode_image(r) for r in records])
    # Raw records are exactly the rescaled pixels; check them against a direct rescale too.
    src = records[0].path
    direct = rescale(decode_rgb((tiny_source / src).read_bytes()), 64)
    np.testing.assert_array_equal(decode_image(records[0]), direct)

    mean, eigval, eigvec = _direct_stats(pixels)
    st = manifest["stats"]
    np.testing.assert_allclose(st["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(st["std"], pixels.reshape(-1, 3).std(0), rtol=1e-9)
    np.testing.assert_allclose(st["eigval"], eigval, rtol=1e-6)
    for got, want in zip(st["eigvec"], eigvec, strict=True):  # eigenvectors up to sign
        assert abs(np.dot(got, want)) == pytest.approx(1.0, abs=1e-6)
    assert st["pixels"] == pixels.shape[0] * 64 * 64


def test_moments_reduce_exactly_whatever_the_partition():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    from pipelines.data.decode import pixel_moments

    def reduce(parts):
        s, o, p = np.zeros(3, np.int64), np.zeros((3, 3), np.int64), 0
        for part in parts:
            for img in part:
                a, b, c = pixel_moments(img)
                s, o, p = s + a, o + b, p + c
        return moments_to_stats(s, o.reshape(9), p)

    one, four = reduce([images]), reduce(np.array_split(images, 4))
    for key in ("mean", "std", "eigval"):
        np.testing.assert_allclose(one[key], four[key], rtol=1e-12)


def test_layout_shards_and_manifest_contract(ray_local, tiny_source, tmp_path):
    out = tmp_path / "out"
    manifest = run_preprocess(PreprocessConfig(source=str(tiny_source), out=str(out),
                                               shards=3, resize=64, batch_size=8))
    assert manifest["format"] == FORMAT_VERSION
    assert [c["index"] for c in manifest["classes"]] == [0, 1, 2, 3]
    train = manifest["splits"]["train"]
    assert train["records"] == 40 and train["quarantined"] == 0
    assert len(train["shards"]) == 3
    sizes = [s["records"] for s in train["shards"]]
    assert max(sizes) - min(sizes) <= 1  # shards of a split are even
    for s in train["shards"]:
        assert file_sha256(out / s["path"]) == s["sha256"]
    # Every source image lands exactly once, labels from its wnid folder.
    records = _all_records(out, manifest, "train")
    assert sorted(r.path for r in records) == sorted(
        str(p.relative_to(tiny_source)) for p in (tiny_source / "train").rglob("*.JPEG"))
    wnid = {c["index"]: c["wnid"] for c in manifest["classes"]}
    assert all(r.path.split("/")[1] == wnid[r.label] for r in records)
    assert all((r.height, r.width) == (64, 64) for r in records)
    # Flat val: labels come from LOC_val_solution.csv.
    with open(tiny_source / "LOC_val_solution.csv") as fh:
        truth = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(fh)}
    val = _all_records(out, manifest, "val")
    assert len(val) == 12
    assert all(wnid[r.label] == truth[Path(r.path).stem] for r in val)
    # The order across shards is decided by the seed: same seed, same bytes.
    again = run_preprocess(PreprocessConfig(source=str(tiny_source), out=str(tmp_path / "b"),
                                            shards=3, resize=64, batch_size=8))
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in train["shards"]]
    # The summary printed at the end: one row per split with the run's figures.
    table = summary_table(manifest).splitlines()
    assert table[0].split() == ["split", "images", "quarantined", "shards", "MB", "images/s",
                                "wall", "s"]
    assert table[1].split()[:4] == ["train", "40", "0", "3"]
    assert float(table[1].split()[5]) > 0 and table[2].split()[:4] == ["val", "12", "0", "3"]


def test_bad_files_are_quarantined_with_reasons(ray_local, tiny_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_source, src)
    wnid = sorted(p.name for p in (src / "train").iterdir())[0]
    bad = src / "train" / wnid
    (bad / "empty.JPEG").write_bytes(b"")
    (bad / "html.JPEG").write_bytes(b"<html><body>404 Not Found</body></html>")
    good = next(bad.glob("*_1.JPEG")).read_bytes()
    (bad / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    ok, png = cv2.imencode(".png", np.full((80, 90, 3), 200, np.uint8))
    (bad / "png_named.JPEG").write_bytes(png.tobytes())  # a PNG behind a .JPEG name is fine
    gray = cv2.imencode(".jpg", np.full((70, 70), 90, np.uint8))[1]
    (bad / "gray.JPEG").write_bytes(gray.tobytes())
    stray = src / "train" / "n99999999"  # a class folder that the mapping does not name
    stray.mkdir()
    (stray / "x.JPEG").write_bytes(good)

    out = tmp_path / "out"
    manifest = run_preprocess(PreprocessConfig(source=str(src), out=str(out), resize=64,
                                               batch_size=8))
    lines = [json.loads(x) for x in (out / QUARANTINE).read_text().splitlines()]
    reasons = {Path(q["path"]).name: q["reason"] for q in lines}
    assert set(reasons) == {"empty.JPEG", "html.JPEG", "truncated.JPEG", "x.JPEG"}
    assert "empty" in reasons["empty.JPEG"]
    assert "not an image file: HTML" in reasons["html.JPEG"]
    assert "truncated" in reasons["truncated.JPEG"]
    assert "not in the class index" in reasons["x.JPEG"]
    assert all(q["split"] == "train" for q in lines)
    assert manifest["splits"]["train"]["quarantined"] == 4
    assert manifest["splits"]["train"]["records"] == 42  # 40 + png_named + gray
    names = {Path(r.path).name for r in _all_records(out, manifest, "train")}
    assert {"png_named.JPEG", "gray.JPEG"} <= names


def test_rerun_skips_finished_work_and_rebuilds_a_lost_shard(ray_local, tiny_source, tmp_path):
    out = tmp_path / "out"
    cfg = PreprocessConfig(source=str(tiny_source), out=str(out), shards=2, resize=64)
    first = run_preprocess(cfg)
    lost = first["splits"]["train"]["shards"][1]
    (out / lost["path"]).unlink()
    (out / (lost["path"] + ".json")).unlink()
    second = run_preprocess(cfg)
    for split in ("train", "val"):
        assert second["splits"][split]["shards"] == first["splits"][split]["shards"]
    assert second["splits"]["train"]["processed"] == 20  # only the lost shard's records
    assert second["splits"]["val"]["processed"] == 0
    assert second["stats"] == first["stats"]


def test_refuses_changed_parameters_and_a_concurrent_run(ray_local, tiny_source, tmp_path):
    out = tmp_path / "out"
    run_preprocess(PreprocessConfig(source=str(tiny_source), out=str(out), resize=64))
    with pytest.raises(PreprocessError, match="--overwrite"):
        run_preprocess(PreprocessConfig(source=str(tiny_source), out=str(out), resize=48))
    replaced = run_preprocess(PreprocessConfig(source=str(tiny_source), out=str(out), resize=48,
                                               overwrite=True))
    assert replaced["preprocess"]["resize"] == 48
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(PreprocessError, match="another preprocess"):
            run_preprocess(PreprocessConfig(source=str(tiny_source), out=str(out), resize=48))


def test_imagenet_sample_every_image_lands(ray_local, imagenet_sample, tmp_path):
    out = tmp_path / "out"
    manifest = run_preprocess(PreprocessConfig(source=str(imagenet_sample), out=str(out),
                                               batch_size=16))
    n_files = sum(1 for p in imagenet_sample.rglob("*") if p.suffix.lower() == ".jpeg")
    splits = manifest["splits"]
    assert splits["train"]["records"] + splits["val"]["records"] == n_files
    assert splits["train"]["quarantined"] == splits["val"]["quarantined"] == 0
    mapping = sorted(line.split(" ", 1)[0] for line in
                     (imagenet_sample / "LOC_synset_mapping.txt").read_text().splitlines() if line)
    assert [c["wnid"] for c in manifest["classes"]] == mapping
    with open(imagenet_sample / "LOC_val_solution.csv") as fh:
        truth = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(fh)}
    wnid = {c["index"]: c["wnid"] for c in manifest["classes"]}
    val = _all_records(out, manifest, "val")
    assert val and all(wnid[r.label] == truth[Path(r.path).stem] for r in val)
    # The grayscale originals arrive as 3-channel RGB with equal channels.
    grays = [r for r in _all_records(out, manifest, "train") + val
             if cv2.imread(str(imagenet_sample / r.path), cv2.IMREAD_UNCHANGED).ndim == 2]
    assert len(grays) == 3
    for r in grays:
        rgb = decode_image(r)
        assert rgb.shape == (256, 256, 3)
        assert np.abs(rgb[..., 0].astype(int) - rgb[..., 2]).max() <= 3  # JPEG chroma noise


def test_stats_are_the_same_for_1_and_4_blocks_and_workers(ray_local, tiny_source, tmp_path):
    """One block in one task vs 8 blocks over 4 worker processes: the same numbers."""
    one = run_preprocess(PreprocessConfig(source=str(tiny_source), out=str(tmp_path / "one"),
                                          resize=48, batch_size=64))
    many = run_preprocess(PreprocessConfig(source=str(tiny_source), out=str(tmp_path / "many"),
                                           resize=48, batch_size=5, shards=3))
    assert one["stats"]["pixels"] == many["stats"]["pixels"] == 40 * 48 * 48
    for key in ("mean", "std", "eigval", "cov"):
        np.testing.assert_allclose(np.array(many["stats"][key]), np.array(one["stats"][key]),
                                   rtol=1e-6)
    for a, b in zip(one["stats"]["eigvec"], many["stats"]["eigvec"], strict=True):
        assert abs(np.dot(a, b)) == pytest.approx(1.0, abs=1e-6)


def test_shard_size_and_shard_count_give_near_equal_shards(ray_local, tiny_source, tmp_path):
    # raw 64x64 records are ~12.3 KB: 40 of them at 0.1 MB a shard -> 5 shards of 8.
    m = run_preprocess(PreprocessConfig(source=str(tiny_source), out=str(tmp_path / "a"),
                                        resize=64, encoding="raw", shard_size=0.1))
    train = m["splits"]["train"]["shards"]
    assert [s["records"] for s in train] == [8] * 5
    assert max(s["bytes"] for s in train) <= 1.2 * min(s["bytes"] for s in train)
    m = run_preprocess(PreprocessConfig(source=str(tiny_source), out=str(tmp_path / "b"),
                                        resize=64, shards=3))
    assert [s["records"] for s in m["splits"]["train"]["shards"]] == [14, 13, 13]
    assert [s["records"] for s in m["splits"]["val"]["shards"]] == [4, 4, 4]


def test_dry_run_lists_and_writes_nothing(tiny_source, tmp_path, capsys):
    import workflow

    out = tmp_path / "never"
    assert workflow.main(["preprocess", "--source", str(tiny_source), "--out", str(out),
                          "--dry-run", "--shards", "2"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "dry run: nothing written. layout imagenet" in text
    row = next(line for line in text.splitlines() if line.startswith("train "))
    assert row.split()[:5] == ["train", "40", "0", "0", "2"]  # images, quarantined, ignored, shards
    assert "train per class: n90000000 10, n90000001 10" in text
    assert "val per class: n90000000 3" in text
    report = run_preprocess(PreprocessConfig(source=str(tiny_source), out=str(out),
                                             dry_run=True))
    assert report["splits"]["train"]["images"] == 40
    assert sum(report["splits"]["val"]["per_class"].values()) == 12
    assert report["splits"]["train"]["shards"] == 1 and not out.exists()


def test_whole_input_failures_exit_2_with_a_message(ray_local, tiny_source, tmp_path, capsys):
    import workflow

    def run(*argv) -> str:
        assert workflow.main(["preprocess", *argv]) == 2
        return capsys.readouterr().err

    empty = tmp_path / "empty" / "train" / "n01440764"
    empty.mkdir(parents=True)
    assert "found no usable images" in run("--source", str(tmp_path / "empty"), "--out",
                                           str(tmp_path / "o1"))
    assert "does not exist" in run("--source", str(tmp_path / "nope"), "--out",
                                   str(tmp_path / "o2"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "is not writable" in run("--source", str(tiny_source), "--out",
                                    str(blocker / "out"))


def test_out_of_disk_is_a_clear_error(ray_local, tiny_source, small_tmpfs, capsys):
    """A real full disk: a 300 KB tmpfs (needs root and mount; skipped otherwise)."""
    import workflow

    mnt = small_tmpfs("300k")
    code = workflow.main(["preprocess", "--source", str(tiny_source), "--out",
                          str(mnt / "out"), "--encoding", "raw", "--resize", "64"])
    err = capsys.readouterr().err
    assert code == 2
    assert "out of disk space" in err and "run the same command again" in err


def test_verify_finds_corrupt_records_missing_shards_and_exits_1(ray_local, tiny_source,
                                                                 tmp_path, capsys):
    import workflow

    out = tmp_path / "out"
    manifest = run_preprocess(PreprocessConfig(source=str(tiny_source), out=str(out),
                                               resize=32, encoding="raw", shards=2))
    report = verify_output(out, decode=True)
    assert report["ok"] and not report["problems"]
    assert report["splits"]["train"] == {"records": 40, "shards": 2, "quarantined": 0,
                                         "duplicates": 0}
    assert workflow.main(["verify", "--data", str(out)]) == 0
    assert "OK, the data is whole" in capsys.readouterr().out

    shard = out / manifest["splits"]["train"]["shards"][1]["path"]
    value = ShardReader(shard).raw(3)
    blob = bytearray(shard.read_bytes())
    at = blob.find(value) + len(value) - 10  # inside record 3's image bytes
    blob[at] ^= 0xFF
    _ENVS.clear()
    shard.write_bytes(bytes(blob))
    (out / manifest["splits"]["val"]["shards"][0]["path"]).unlink()
    report = verify_output(out)
    assert not report["ok"]
    problems = "\n".join(report["problems"])
    assert "train/shard-00001.lmdb record 3: CRC mismatch" in problems
    assert "train/shard-00001.lmdb: sha256" in problems
    assert "val/shard-00000.lmdb: missing" in problems
    assert workflow.main(["verify", "--data", str(out)]) == 1
    assert "problem(s) found" in capsys.readouterr().out
    assert workflow.main(["verify", "--data", str(tmp_path / "none")]) == 2  # not an OUT


def test_refuses_a_source_that_changed_under_an_existing_out(ray_local, tiny_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_source, src)
    out = tmp_path / "out"
    cfg = PreprocessConfig(source=str(src), out=str(out), resize=32)
    run_preprocess(cfg)
    wnid = sorted(p.name for p in (src / "train").iterdir())[0]
    extra = src / "train" / wnid / "extra.JPEG"
    shutil.copy(next((src / "train" / wnid).glob("*_1.JPEG")), extra)
    with pytest.raises(PreprocessError, match="source changed"):
        run_preprocess(cfg)
    cfg.overwrite = True
    assert run_preprocess(cfg)["splits"]["train"]["records"] == 41


def test_staged_pieces_count_each_position_once_and_damaged_ones_are_redone(tiny_source,
                                                                          tmp_path):
    """The staging layer on its own (no Ray): a block staged twice (a task that outlived a
    killed run) adds nothing twice; a piece cut short, one of the right length with a byte
    changed (what a machine crash can leave of a file that was never fsynced) and a killed
    task's temporary file are dropped; the committed shard and its moments equal those of a
    clean staging."""
    from pipelines.data.plan import assign_shards
    from pipelines.data.preprocess import stage_batch
    from pipelines.data.sources import list_source
    from pipelines.data.staging import finalize_shard, staged_positions

    items = list_source(tiny_source).splits["train"]
    table = assign_shards(items, 1, seed=0, split="train")
    cols = {k: table[k].to_numpy(False) for k in table.column_names}
    kw = {"source": str(tiny_source), "resize": 32, "center_crop": True, "encoding": "jpeg",
          "quality": 90}

    def stage(out: Path, rows: slice) -> None:
        stage_batch({k: v[rows] for k, v in cols.items()}, str(out), **kw)

    clean, messy = tmp_path / "clean", tmp_path / "messy"
    stage(clean, slice(0, 40))
    stage(messy, slice(0, 25))
    stage(messy, slice(10, 30))  # positions 10-24 a second time
    folder = messy / "train" / ".staging" / "shard-00000"
    stage(tmp_path / "scratch", slice(30, 40))
    whole = (tmp_path / "scratch" / "train" / ".staging" / "shard-00000" /
             "0000000030-0000000039-10.piece").read_bytes()
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0x10  # inside an image's bytes
    (folder / "0000000030-0000000039-10.piece").write_bytes(bytes(flipped))
    (folder / "0000000030-0000000035-6.piece").write_bytes(whole[:len(whole) // 3])
    (folder / ".0000000030-0000000039-10.piece.123.tmp").write_bytes(b"half")
    assert finalize_shard(messy, "train", 0, 40) is None  # 30-39 missing: not committed
    assert staged_positions(messy, "train", 0).tolist() == list(range(30))
    assert sorted(p.name for p in folder.iterdir()) == [  # damaged ones dropped
        ".0000000030-0000000039-10.piece.123.tmp", "0000000000-0000000024-25.piece",
        "0000000010-0000000029-20.piece"]
    stage(messy, slice(30, 40))
    a, b = finalize_shard(clean, "train", 0, 40), finalize_shard(messy, "train", 0, 40)
    assert a["records"] == b["records"] == 40
    assert (a["sha256"], a["sum"], a["outer"], a["pixels"]) == \
        (b["sha256"], b["sum"], b["outer"], b["pixels"])
    assert a["pixels"] == 40 * 32 * 32 and not (messy / "train" / ".staging" / "shard-00000").exists()
    assert finalize_shard(messy, "train", 0, 40) is None  # already committed: a no-op


@pytest.mark.parametrize("n,batch_size,cpus", [(100_000, 1024, 2), (5000, 1024, 2), (7, 1024, 2),
                                               (1, 1024, 4), (1000, 1024, 64)])
def test_blocks_cover_every_row_once_and_the_last_wave_is_cut_smaller(n, batch_size, cpus):
    from pipelines.data.plan import MIN_TAIL_ROWS, TAIL_SPLIT, block_bounds

    bounds = block_bounds(n, batch_size, cpus)
    rows = [b - a for a, b in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == n and min(rows) > 0
    assert all(x[1] == y[0] for x, y in zip(bounds, bounds[1:], strict=False))  # no gap, no overlap
    assert max(rows) <= batch_size and len(bounds) >= min(n, cpus)
    if n == 100_000:  # full blocks, then one block's worth a CPU in quarters
        assert rows[:90] == [1024] * 90 and rows[-TAIL_SPLIT * cpus:] == [256] * 8
    if n == 1000:  # 4-row blocks: the tail is not cut below MIN_TAIL_ROWS or one block
        assert set(rows) == {4} and MIN_TAIL_ROWS > 4
