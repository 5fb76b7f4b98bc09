"""WebDataset shards (mae_fast/data/shards.py): every frame exactly once across ranks and workers (split by shard,
or by sample when there are fewer shards than consumers), equal shares with epoch_samples, reproducible order,
plain WebDataset readable, a corrupt shard skipped."""
from __future__ import annotations

import collections
import json
import warnings

import numpy as np
import pytest
import torch

from mae_fast.data import build_pretrain_dataset
from mae_fast.data.shards import ShardDataset, write_shards


def test_shards_roundtrip_every_frame_once(demo, tmp_path):
    out = tmp_path / "shards"
    index = write_shards(demo.videos, out, hours=0.02, subset="uniform", seed=2, maxcount=10,
                         image_format="png")
    assert index["n_samples"] == 72 and len(index["shards"]) == 8
    rec = json.loads((out / "record.json").read_text())
    ref = build_pretrain_dataset(demo.videos, img_size=32, hours=0.02, subset="uniform", seed=2)
    assert rec["files"] == ref.record["files"]
    expected = {(ref.files[ref.file_idx[i]], float(ref.times[i])): ref.frame(i) for i in range(len(ref))}

    seen = collections.Counter()
    for rank in range(2):
        for worker in range(2):
            ds = ShardDataset(out, rank=rank, world_size=2, worker=(worker, 2), return_meta=True, shuffle_buffer=16)
            for image, meta in ds:
                seen[(meta["file"], meta["t"])] += 1
                assert np.array_equal(image, expected[(meta["file"], meta["t"])])  # png: lossless
    assert set(seen) == set(expected) and set(seen.values()) == {1}

    # fewer shards than consumers: split by sample instead, still exactly once
    few = tmp_path / "few"
    write_shards(demo.videos, few, hours=0.01, seed=2, maxcount=1000)
    seen = collections.Counter()
    with pytest.warns(RuntimeWarning, match="splitting by sample"):
        for rank in range(2):
            for worker in range(2):
                for _, meta in ShardDataset(few, rank=rank, world_size=2, worker=(worker, 2), return_meta=True):
                    seen[meta["__key__"]] += 1
    assert len(seen) == 36 and set(seen.values()) == {1}

    ds = build_pretrain_dataset(str(out / "shard-{000000..000007}.tar"), img_size=32, seed=1)
    assert isinstance(ds, torch.utils.data.IterableDataset) and ds.num_samples == 72
    assert ds.record["hours_selected"] == 0.02
    first = [m["__key__"] for _, m in ShardDataset(out, return_meta=True, seed=1)]
    again = ShardDataset(out, return_meta=True, seed=1)
    assert [m["__key__"] for _, m in again] == first  # reproducible
    assert [m["__key__"] for _, m in again] != first  # next pass: new order
    wds = pytest.importorskip("webdataset")  # the shards are plain WebDataset: its own reader agrees
    plain = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False, empty_check=False))
    assert sorted(s["__key__"] for s in plain) == sorted(s["__key__"] for s in
                                                         map(lambda m: m[1], ShardDataset(out, return_meta=True)))
    assert all(set(s) >= {"png", "json"} for s in plain)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    batches = list(loader)
    assert sum(b.shape[0] for b in batches) == 72 and batches[0].shape[1:] == (3, 32, 32)


def test_corrupt_shard_is_skipped(demo, tmp_path):
    out = tmp_path / "shards"
    write_shards(demo.videos, out, hours=0.01, seed=0, maxcount=12)
    victim = out / "shard-000001.tar"
    victim.write_bytes(victim.read_bytes()[:3000])
    ds = ShardDataset(out, shuffle_buffer=0)
    with pytest.warns(RuntimeWarning):
        n = sum(1 for _ in ds)
    assert 24 <= n < 36 and ds.skipped


@pytest.fixture(scope="module")
def shards13(write_pngs, tmp_path_factory):
    """13 images in shards of 2: shards 0..5 hold 2 samples, shard 6 holds 1."""
    root = tmp_path_factory.mktemp("shards13")
    write_pngs(root / "imgs", 13)
    index = write_shards(root / "imgs", root / "out", maxcount=2, image_format="png")
    assert [s["n_samples"] for s in index["shards"]] == [2, 2, 2, 2, 2, 2, 1]
    return root / "out"


def test_epoch_samples_split_floor_per_rank_and_remainder_over_workers(shards13):
    """64 samples over 3 ranks is 21 per rank (64 // 3, not 22), 11 + 10 over its 2 workers, cycling over the 13
    images: every one is reached."""
    seen = collections.Counter()
    for rank in range(3):
        got = []
        for w in range(2):
            keys = [m["__key__"] for _, m in ShardDataset(shards13, rank=rank, world_size=3, worker=(w, 2),
                                                          epoch_samples=64, shuffle_buffer=0, return_meta=True)]
            got.append(len(keys))
            seen.update(keys)
        assert got == [11, 10]
    assert len(seen) == 13


def test_a_subset_of_the_shards_counts_only_its_samples(shards13):
    subset = [str(shards13 / "shard-000001.tar"), str(shards13 / "shard-000006.tar")]
    ds = ShardDataset(subset, shuffle_buffer=0)
    assert ds.num_samples == 3 and sum(1 for _ in ds) == 3
    assert ShardDataset(shards13).num_samples == 13


def test_as_many_shards_as_consumers_are_split_by_shard(write_pngs, tmp_path):
    """7 shards for 7 consumers: each reads one whole shard (no fallback, no warning)."""
    write_pngs(tmp_path / "imgs", 13)
    write_shards(tmp_path / "imgs", tmp_path / "out", maxcount=2)
    seen = collections.Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for rank in range(7):
            metas = [m for _, m in ShardDataset(tmp_path / "out", rank=rank, world_size=7, worker=(0, 1),
                                                return_meta=True, shuffle_buffer=0)]
            assert len({m["__url__"] for m in metas}) == 1
            seen.update(m["__key__"] for m in metas)
    assert len(seen) == 13 and set(seen.values()) == {1}
