"""Training input: each Ray Train worker reads its share of the LMDB shards directly.

Why per-worker readers rather than Ray Data ingest: records are already shuffled across
shards by `preprocess`, so a worker only needs a per-epoch permutation of record indices, and
decoding a 256x256 JPEG + cropping in the worker's own DataLoader processes avoids moving
every decoded image through the object store (see README "Training input").

- Every epoch a seeded permutation of all train records is cut into `world_size` equal,
  disjoint shares; the remainder (< world_size records) is dropped so that every worker runs
  the same number of steps (DDP needs that: an extra step on one rank would hang the others).
- Validation is split `rank::world_size` with no padding, so across workers every val
  record is evaluated exactly once; the sums are all-reduced.
- Crops and flips run on CPU on uint8 (4x less memory traffic than float); normalisation and
  PCA lighting run per batch on the training device.
- A record that fails its CRC or does not decode is skipped and counted, never fatal.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from alexnet.augment import center_crop, random_crop_flip, ten_crop
from pipelines.shards import RecordError, ShardReader, decode_image, unpack_record

# An index that carries the epoch (high bits) with the record (low bits), so DataLoader
# processes that persist across epochs still draw fresh, reproducible crops each epoch.
_EPOCH_SHIFT = 40


class ShardRecords(Dataset):
    """All records of a split's shards, addressed by a global index; mode is "train"
    (random crop + flip), "center" or "ten" (the paper's ten crops)."""

    def __init__(self, readers: list[ShardReader], crop: int, mode: str, seed: int = 0):
        self.readers = readers
        self.offsets = np.cumsum([0] + [len(r) for r in readers])
        self.crop, self.mode, self.seed = crop, mode, seed

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[ShardReader, int]:
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.readers[shard], index - int(self.offsets[shard])

    def __getitem__(self, key: int) -> tuple[np.ndarray, int, bool]:
        epoch, index = key >> _EPOCH_SHIFT, key & ((1 << _EPOCH_SHIFT) - 1)
        reader, local = self._locate(index)
        shape = (10, self.crop, self.crop, 3) if self.mode == "ten" else (self.crop, self.crop, 3)
        try:
            rec = unpack_record(reader.raw(local))
            img = decode_image(rec)
        except RecordError:
            return np.zeros(shape, np.uint8), -1, False
        if self.mode == "train":
            rng = np.random.default_rng([self.seed, epoch, index])
            return random_crop_flip(img, self.crop, rng), rec.label, True
        if self.mode == "ten":
            return ten_crop(img, self.crop), rec.label, True
        return center_crop(img, self.crop), rec.label, True


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


def make_loader(readers: list[ShardReader], crop: int, mode: str, batch_size: int, rank: int,
                world: int, seed: int, workers: int, pin_memory: bool) -> DataLoader:
    dataset = ShardRecords(readers, crop, mode, seed)
    sampler = EpochSampler(len(dataset), rank, world, seed, shuffle=(mode == "train"))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
