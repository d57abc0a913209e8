"""Training input: each Ray Train worker reads its share of the LMDB shards directly.

Used by `pipelines/train/loop.py`; measured by `python benchmarks/ingest.py`.

Why per-worker readers rather than Ray Data ingest: records are already shuffled across
shards by `preprocess`, so a worker only needs a per-epoch permutation of record indices, and
decoding a 256x256 JPEG + cropping in the worker's own DataLoader processes avoids moving
every decoded image through the object store (measured in benchmarks/ingest.py; figures in benchmarks/README.md).

- Every epoch a seeded permutation of all train records is cut into `world_size` equal,
  disjoint shares; the remainder (< world_size records) is dropped so that every worker runs
  the same number of steps (DDP needs that: an extra step on one rank would hang the others).
- Validation is split `rank::world_size` with no padding, so across workers every val
  record is evaluated exactly once; the sums are all-reduced.
- Crops and flips run on CPU on uint8 (4x less memory traffic than float); normalisation and
  PCA lighting run per batch on the training device. With `gpu_decode=True` the loader ships
  the JPEG bytes and the crop box instead, and `decode_crop_batch` decodes on the GPU
  (`torchvision.io.decode_jpeg(device="cuda")`): the CPU then only reads records.
- A record that fails its CRC or does not decode is skipped and counted, never fatal.
- `check_dataset` runs in the launcher: a manifest that does not match its shards is a clear
  error before any worker starts.
"""

from __future__ import annotations

from pathlib import Path

import lmdb
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from alexnet.augment import center_crop, crop_params, random_crop_flip, ten_crop
from pipelines.data.shards import RecordError, ShardReader, decode_image, unpack_record


class DatasetMismatch(ValueError):
    """The manifest does not describe the shards on disk (or the run); says what to do."""


def check_dataset(data: str | Path, manifest: dict, train_split: str, val_split: str,
                  crop: int) -> dict:
    """Check, before any worker starts, that the manifest matches its shards: every shard
    listed exists, has the listed size and record count, the counts add up, the stats the
    training needs are there and the crop fits the stored images. Costs one stat and one
    LMDB meta read per shard (no data read: ImageNet's ~600 shards take well under a
    second). Returns `{split: {"records": n, "shards": k}}` for the splits found."""
    data = Path(data)
    # --overwrite with unchanged parameters keeps every finished shard, so it repairs nothing:
    # a manifest without what training needs is made again, elsewhere; a damaged shard is
    # rebuilt after deleting it (verify's advice).
    fix = "make the dataset again: `python workflow.py preprocess --source SRC --out NEW_OUT`"

    def repair() -> str:  # only when needed: it reads preprocess.json
        from pipelines.data.verify import repair_advice

        return repair_advice(data)

    splits = manifest.get("splits", {})
    if train_split not in splits or splits[train_split].get("records", 0) == 0:
        raise DatasetMismatch(f"{data}: split {train_split!r} has no records "
                              f"(splits: {sorted(splits)}); {fix}")
    classes = manifest.get("classes") or []
    if not classes:
        raise DatasetMismatch(f"{data}/manifest.json lists no classes; {fix}")
    stats = manifest.get("stats", {})
    shapes = {"mean": (3,), "std": (3,), "eigval": (3,), "eigvec": (3, 3)}
    for key, shape in shapes.items():
        if key not in stats or np.asarray(stats[key]).shape != shape:
            raise DatasetMismatch(f"{data}/manifest.json: stats.{key} missing or not of "
                                  f"shape {shape}; {fix}")
    if stats.get("pixels") == 0 or not np.all(np.asarray(stats["std"]) > 0):
        # preprocess computes the stats on the split named "train"; without one they are
        # zeros, and training would divide by a zero std (or subtract a zero mean).
        raise DatasetMismatch(f"{data}/manifest.json has no pixel statistics (they come from "
                              f"a split named 'train'; splits here: {sorted(splits)}): "
                              "preprocess a source whose training images are in a 'train' "
                              "split")
    resize = int(manifest.get("preprocess", {}).get("resize", 0))
    if resize and crop > resize:
        raise DatasetMismatch(f"--crop {crop} is larger than the stored images ({resize} px, "
                              f"preprocess --resize); use --crop <= {resize}")
    split_counts = {}
    for split in (train_split, val_split):
        if split not in splits:
            continue
        total = 0
        for shard in splits[split]["shards"]:
            path = data / shard["path"]
            if not path.is_file():
                raise DatasetMismatch(f"{path}: listed in the manifest but missing; the "
                                      f"dataset is incomplete or was moved; {repair()}")
            if "bytes" in shard and path.stat().st_size != shard["bytes"]:
                raise DatasetMismatch(f"{path}: {path.stat().st_size} bytes, the manifest "
                                      f"says {shard['bytes']}; the shard was replaced; "
                                      f"{repair()}")
            try:
                records = len(ShardReader(path))
            except (RecordError, OSError, lmdb.Error) as exc:
                raise DatasetMismatch(f"{path}: not a finished LMDB shard ({exc}); "
                                      f"{repair()}") from exc
            if records != shard["records"]:
                raise DatasetMismatch(f"{path}: {records} records, the manifest says "
                                      f"{shard['records']}; {repair()}")
            total += records
        if total != splits[split]["records"]:
            raise DatasetMismatch(f"{data}: split {split!r} shards hold {total} records, the "
                                  f"manifest says {splits[split]['records']}; {fix}")
        split_counts[split] = {"records": total, "shards": len(splits[split]["shards"])}
    return split_counts

# An index that carries the epoch (high bits) with the record (low bits), so DataLoader
# processes that persist across epochs still draw fresh, reproducible crops each epoch.
_EPOCH_SHIFT = 40


class ShardRecords(Dataset):
    """All records of a split's shards, addressed by a global index; mode is "train"
    (random crop + flip), "center" or "ten" (the paper's ten crops).

    With `gpu_decode` (train and center modes) an item is the record's JPEG bytes as a uint8
    tensor plus the crop box `(top, left, flip)`, drawn from the header's height/width with
    the same generator draws as the CPU path, so both paths crop the same boxes."""

    def __init__(self, readers: list[ShardReader], crop: int, mode: str, seed: int = 0,
                 gpu_decode: bool = False, pad: int = 0):
        if gpu_decode and mode == "ten":
            raise ValueError("gpu_decode supports the train and center modes, not ten crops")
        if gpu_decode and pad:
            raise ValueError("gpu_decode crops inside the stored image; it cannot pad")
        self.readers = readers
        self.offsets = np.cumsum([0] + [len(r) for r in readers])
        self.crop, self.mode, self.seed, self.gpu_decode = crop, mode, seed, gpu_decode
        self.pad = pad

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[ShardReader, int]:
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.readers[shard], index - int(self.offsets[shard])

    def __getitem__(self, key: int) -> tuple:
        epoch, index = key >> _EPOCH_SHIFT, key & ((1 << _EPOCH_SHIFT) - 1)
        reader, local = self._locate(index)
        rng = np.random.default_rng([self.seed, epoch, index])
        if self.gpu_decode:
            return self._encoded(reader, local, rng)
        shape = (10, self.crop, self.crop, 3) if self.mode == "ten" else (self.crop, self.crop, 3)
        try:
            rec = unpack_record(reader.raw(local))
            img = decode_image(rec)
            if self.mode == "train":
                if self.pad:  # CIFAR's usual augmentation: zero-pad, then a random crop
                    img = np.pad(img, ((self.pad, self.pad), (self.pad, self.pad), (0, 0)))
                return random_crop_flip(img, self.crop, rng), rec.label, True
            if self.mode == "ten":
                return ten_crop(img, self.crop), rec.label, True
            return center_crop(img, self.crop), rec.label, True
        except (RecordError, ValueError):  # corrupt, undecodable or smaller than the crop
            return np.zeros(shape, np.uint8), -1, False

    def _encoded(self, reader: ShardReader, local: int, rng: np.random.Generator) -> tuple:
        try:
            rec = unpack_record(reader.raw(local))
            if rec.encoding != "jpeg":
                raise RecordError(f"{rec.path}: {rec.encoding} record, GPU decode reads JPEG")
            if self.mode == "train":
                box = crop_params(rec.height, rec.width, self.crop, rng)
            else:
                box = (int(round((rec.height - self.crop) / 2.0)),
                       int(round((rec.width - self.crop) / 2.0)), False)
                if min(box[:2]) < 0:
                    raise ValueError("image smaller than the crop")
        except (RecordError, ValueError):
            return torch.empty(0, dtype=torch.uint8), -1, False, (0, 0, False)
        data = torch.frombuffer(bytearray(rec.image), dtype=torch.uint8)
        return data, rec.label, True, box


class EpochSampler(Sampler[int]):
    """The indices this worker reads in one epoch (see module docstring)."""

    def __init__(self, n: int, rank: int, world: int, seed: int, shuffle: bool):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.rank, self.n, self.world)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        per = self.n // self.world
        return order[self.rank * per:(self.rank + 1) * per]

    def __iter__(self):
        return iter((self.epoch << _EPOCH_SHIFT) | int(i) for i in self.indices())

    def __len__(self) -> int:
        return len(self.indices())


def collate(items: list[tuple[np.ndarray, int, bool]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    images = torch.from_numpy(np.stack([it[0] for it in items]))
    labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
    ok = torch.tensor([it[2] for it in items], dtype=torch.bool)
    return images, labels, ok


def collate_encoded(items: list[tuple]) -> tuple[list[torch.Tensor], torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
    """JPEG byte tensors (ragged, so a list), labels, ok mask, crop boxes [N, 3]."""
    labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
    ok = torch.tensor([it[2] for it in items], dtype=torch.bool)
    boxes = torch.tensor([[it[3][0], it[3][1], int(it[3][2])] for it in items],
                         dtype=torch.int64)
    return [it[0] for it in items], labels, ok, boxes


def decode_crop_batch(datas: list[torch.Tensor], boxes: torch.Tensor, ok: torch.Tensor,
                      size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode JPEG bytes on `device` and cut each image's crop box: returns the uint8 batch
    `[M, 3, size, size]` (channels_last in memory) of the images that decoded, and the
    updated ok mask `[N]` (a record that fails to decode is dropped and counted as skipped).

    On CUDA `torchvision.io.decode_jpeg` decodes the whole list in one nvJPEG batch call;
    on CPU the same code runs with libjpeg (the tests use that path). One bad image makes
    the batched call fail, so it falls back to decoding one by one to find it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    ok = ok.clone()
    idx = [i for i in range(len(datas)) if ok[i]]
    if device.type == "cuda":
        # decode_jpeg(device="cuda") allocates its outputs on the caller's (current) stream
        # but nvJPEG writes them from a private stream, with no event between the two
        # (pytorch/vision PR #9606). Without a sync the caching allocator can hand a block
        # freed by the previous step back to the decoder while kernels queued on the current
        # stream are still reading it, and batches are silently corrupted. Fix chosen: wait
        # for the current stream before each batch decode (kept the nvJPEG decoder; no
        # race-free GPU decoder to move to). Cost: the CPU waits here for the previous
        # step's kernels, so the decode of each batch runs after that step instead of beside
        # it: each step pays its nvJPEG decode time serially (not measured: no GPU was lent
        # to the session that made this change).
        torch.cuda.current_stream(device).synchronize()
    try:
        images = decode_jpeg([datas[i] for i in idx], mode=ImageReadMode.RGB, device=device) \
            if idx else []
    except RuntimeError:
        images = []
        for i in idx:
            try:
                images.append(decode_jpeg(datas[i], mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
    crops = []
    for i, img in zip(idx, images, strict=True):
        top, left, flip = (int(v) for v in boxes[i])
        if img is None or img.shape[1] < top + size or img.shape[2] < left + size:
            ok[i] = False
            continue
        crop = img[:, top:top + size, left:left + size]
        crops.append(crop.flip(-1) if flip else crop)
    if not crops:
        return torch.empty(0, 3, size, size, dtype=torch.uint8, device=device), ok
    batch = torch.stack(crops).contiguous(memory_format=torch.channels_last)
    return batch, ok


def make_loader(readers: list[ShardReader], crop: int, mode: str, batch_size: int, rank: int,
                world: int, seed: int, workers: int, pin_memory: bool,
                gpu_decode: bool = False, pad: int = 0) -> DataLoader:
    dataset = ShardRecords(readers, crop, mode, seed, gpu_decode=gpu_decode, pad=pad)
    sampler = EpochSampler(len(dataset), rank, world, seed, shuffle=(mode == "train"))
    # pin_memory on GPU: the host-to-device copy of the next batch can then run
    # asynchronously (non_blocking=True) while the current step computes.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_encoded if gpu_decode else collate,
                      pin_memory=pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None)


def augmented_samples(readers: list[ShardReader], stats: dict, crop: int, n: int = 16,
                      seed: int = 0, alphastd: float = 0.1) -> np.ndarray:
    """`n` training crops exactly as the loop sees them before normalisation (random crop,
    flip, PCA lighting; clipped back to uint8 for viewing): uint8 [n, crop, crop, 3]. Logged
    as a PNG grid with every run, so a wrong crop or a colour shift of hundreds of levels
    is visible at a glance."""
    from alexnet.augment import pca_lighting

    dataset = ShardRecords(readers, crop, "train", seed)
    images = [img for img, _, ok in (dataset[i] for i in range(min(n, len(dataset)))) if ok]
    if not images:
        raise DatasetMismatch("no training record decodes: the shards are corrupt")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    if alphastd > 0:
        gen = torch.Generator().manual_seed(seed)
        x = pca_lighting(x, torch.tensor(stats["eigval"]), torch.tensor(stats["eigvec"]),
                         alphastd, generator=gen)
    return x.float().round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
