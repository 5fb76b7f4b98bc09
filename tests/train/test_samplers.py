"""Data order: StepBatchSampler's global batches and micro-batches, SeededItems' per-sample seeding."""
from __future__ import annotations

import random

import numpy as np
import torch

from mae_fast.data.samplers import SeededItems, StepBatchSampler, SyntheticImages


def test_batch_sampler_resumes_mid_epoch_and_splits_global_batches():
    full = list(StepBatchSampler(20, 6, seed=3, start_step=0, total_steps=7))
    assert len(full) == 7 and all(len(b) == 6 for b in full)
    assert sorted(j for b in full[:3] for _, j in b) == sorted(set(j for b in full[:3] for _, j in b))
    assert [e for b in full for e, _ in b[:1]] == [0, 0, 0, 1, 1, 1, 2]
    assert list(StepBatchSampler(20, 6, seed=3, start_step=4, total_steps=7)) == full[4:]
    # accum 2 x world 2: each rank's micro-batches tile the global batch in order
    parts = [list(StepBatchSampler(20, 8, 3, 0, 2, accum_steps=2, world_size=2, rank=r)) for r in (0, 1)]
    one = list(StepBatchSampler(20, 8, 3, 0, 2))
    for s in range(2):
        pieces = [parts[0][2 * s], parts[1][2 * s], parts[0][2 * s + 1], parts[1][2 * s + 1]]
        assert sum(pieces, []) == one[s]


def test_seeded_items_are_reproducible_and_leave_global_rng_alone():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3) + i

    class NumpyAndPython(Noisy):
        def __getitem__(self, i):
            return torch.tensor([np.random.rand(), random.random()]) + super().__getitem__(i)[:2]

    class TorchOnly(Noisy):
        draws_only_torch_rng = True

    for dataset in (Noisy(), NumpyAndPython(), TorchOnly()):
        items = SeededItems(dataset, seed=5)
        torch.manual_seed(0)
        np.random.seed(1)
        random.seed(2)
        before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
        a, b = items[(1, 2)], items[(1, 2)]
        assert torch.equal(a, b) and not torch.equal(a, items[(2, 2)])
        assert torch.equal(before[0], torch.get_rng_state())
        assert (before[1] == np.random.get_state()[1]).all() and before[2] == random.getstate()
    # a torch-only dataset draws what it drew when numpy and python were seeded as well
    assert torch.equal(SeededItems(TorchOnly(), 5)[(3, 1)], SeededItems(Noisy(), 5)[(3, 1)])
    # the datasets here declare it: the synthetic source, and file/video data with the built-in transforms
    from mae_fast.data.images import ImageFileDataset
    from mae_fast.data.transforms import build_transform

    assert SyntheticImages(4, 8).draws_only_torch_rng
    assert ImageFileDataset([], transform=build_transform(8, train=True)).draws_only_torch_rng
    assert not ImageFileDataset([], transform=lambda im: np.random.rand()).draws_only_torch_rng
