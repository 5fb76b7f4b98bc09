"""Deterministic data order for training: every step's inputs are a pure function of (seed, step).

The data order is a permutation drawn from (seed, epoch), every sample's augmentation draws come from a
generator seeded by (seed, epoch, index), so a resumed run replays the uninterrupted one. ``StepBatchSampler``
cuts pretraining's global batches into micro-batches per rank; ``epoch_batches`` gives finetuning's shuffled
epochs; ``StreamBatches`` serves an IterableDataset (shards) with a resumable position.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from .base import DataError

__all__ = ["mix_seed", "SeededItems", "StepBatchSampler", "StreamBatches", "SyntheticImages", "epoch_batches",
           "collate_images", "collate_labelled"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class SeededItems(torch.utils.data.Dataset):
    """Serves ``(epoch, index)`` keys; each item's random draws (torch, numpy, python) are seeded
    from (seed, epoch, index) and the caller's RNG states are left untouched. A dataset whose
    ``draws_only_torch_rng`` is true gets only torch's CPU generator seeded (and restored)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        s = mix_seed(self.seed, epoch, index)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also seed (and, before CUDA starts, queue with a
            # formatted stack) every accelerator's generator, which fork_rng(devices=[]) does not restore
            torch.default_generator.manual_seed(s)
            if getattr(self.dataset, "draws_only_torch_rng", False):
                return self.dataset[int(index)]
            py_state, np_state = random.getstate(), np.random.get_state()
            random.seed(s)
            np.random.seed(s % (2**32))
            try:
                return self.dataset[int(index)]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class StepBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of ``(epoch, index)`` keys for optimizer steps ``start_step .. total_steps-1``.

    Epoch e visits a permutation drawn from (seed, e); step s takes global batch s % steps_per_epoch
    of epoch s // steps_per_epoch (the tail that does not fill a batch is dropped). The global batch
    is cut into ``accum_steps x world_size`` equal micro-batches; this rank takes its own, in order.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, total_steps: int,
                 accum_steps: int = 1, world_size: int = 1, rank: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.accum, self.world, self.rank = accum_steps, world_size, rank
        self.steps_per_epoch = n // batch_size
        self.micro = batch_size // (accum_steps * world_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, 7919, epoch))
        return torch.randperm(self.n, generator=g)

    def global_batch(self, step: int) -> tuple[int, torch.Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        return epoch, self.permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

    def __iter__(self):
        perm_epoch, perm = None, None
        for step in range(self.start_step, self.total_steps):
            epoch, i = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, self.permutation(epoch)
            chunks = perm[i * self.batch_size:(i + 1) * self.batch_size].view(self.accum, self.world, self.micro)
            for a in range(self.accum):
                yield [(epoch, int(j)) for j in chunks[a, self.rank]]

    def __len__(self):
        return (self.total_steps - self.start_step) * self.accum


class StreamBatches:
    """Micro-batches from an IterableDataset (e.g. WebDataset shards), epoch after epoch, with a
    resumable position (epoch, micro-batches taken in it). Resuming replays the epoch's stream and
    skips what was taken: the same samples in the same order when the stream is deterministic for
    an epoch (``set_epoch``), not bit-exact through shuffle buffers seeded otherwise."""

    def __init__(self, dataset, micro: int, num_workers: int, pin: bool, epoch: int = 0, index: int = 0):
        self.dataset, self.micro, self.num_workers, self.pin = dataset, micro, num_workers, pin
        self.epoch, self.index = epoch, index

    def __iter__(self):
        skip = self.index
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.micro, drop_last=True,
                                                 num_workers=self.num_workers, collate_fn=collate_images,
                                                 pin_memory=self.pin)
            taken = 0
            for i, batch in enumerate(loader):
                if i < skip:
                    continue
                taken += 1
                self.index = i + 1
                yield batch
            if taken == 0 and skip == 0:
                source = getattr(self.dataset, "source", None)
                skipped = getattr(self.dataset, "skipped", None)
                raise DataError(f"the data stream gave no full micro-batch of {self.micro} in epoch {self.epoch}"
                                   + (f" from {source}" if source is not None else "")
                                   + (f"; unreadable: {skipped[:3]}" if skipped else ""))
            skip, self.epoch, self.index = 0, self.epoch + 1, 0


def collate_images(batch):
    """Collate items that are tensors or (tensor, ...) tuples into an image batch."""
    imgs = [b[0] if isinstance(b, (tuple, list)) else b for b in batch]
    return torch.stack(imgs)


class SyntheticImages(torch.utils.data.Dataset):
    """Smooth random colour fields (a few low-frequency components), normalised like real images.

    Deterministic per index; learnable structure so the loss falls. For tests and benchmarks.
    """

    draws_only_torch_rng = True  # see SeededItems

    def __init__(self, size: int, img_size: int | tuple[int, int], seed: int = 0):
        self.size, self.seed = size, seed
        self.hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.record = {"source": "synthetic", "images": size, "img_size": list(self.hw)}
        self.skipped = []

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(index)
        g = torch.Generator().manual_seed(mix_seed(self.seed, 104729, index))
        coarse = torch.rand(1, 3, 4, 4, generator=g)
        img = torch.nn.functional.interpolate(coarse, size=self.hw, mode="bicubic", align_corners=False)[0]
        img = img + 0.05 * torch.randn(img.shape, generator=g)
        if torch.rand(()) < 0.5:  # a random flip from the (seeded) global RNG, like an augmentation
            img = img.flip(-1)
        return (img - 0.45) / 0.25


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, world: int = 1,
                   rank: int = 0) -> list[list[tuple[int, int]]]:
    """Shuffled (epoch, index) batches covering every item, the same global batches on every rank, each
    rank taking every ``world``-th item of each. A last batch too small to give every rank one item
    (and BatchNorm two in all) joins the previous one."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, 31, epoch))).tolist()
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < max(2, world):
        batches[-2].extend(batches.pop())
    return [[(epoch, j) for j in b[rank::world]] for b in batches]


def collate_labelled(batch):
    """Collate (image, label) items into an image batch and a label tensor."""
    imgs = torch.stack([b[0] for b in batch])
    labels = torch.as_tensor([int(b[1]) for b in batch], dtype=torch.long)
    return imgs, labels
