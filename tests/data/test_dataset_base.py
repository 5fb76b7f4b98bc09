"""What every dataset shares (mae_fast/data/base.py): item indices, unreadable items replaced by the next readable
one (each bad file logged and warned about once), the substitute limit, file listing, which generators a
transform draws from; corrupt videos and images end to end; clear errors from the dataset builders."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from mae_fast.data import base as base_mod
from mae_fast.data import build_labelled_datasets, build_pretrain_dataset
from mae_fast.data import demo as demo_mod


class _Items(base_mod.SkippingDataset):
    """Items 0..n-1; those in ``bad`` fail to load. Counts loads per item."""

    def __init__(self, n, bad=()):
        super().__init__()
        self.n, self.bad, self.loads = n, set(bad), []

    def __len__(self):
        return self.n

    def _path(self, i):
        return f"item{i}"

    def _load(self, i):
        self.loads.append(i)
        if i in self.bad:
            raise OSError(f"cannot read {i}")
        return i


def test_item_indices_are_python_sequence_indices():
    """-n .. n-1 are items (-n is item 0); n and -n-1 are IndexErrors."""
    ds = _Items(7)
    assert [ds[i] for i in (0, 6, -1, -7)] == [0, 6, 6, 0]
    for i in (7, -8):
        with pytest.raises(IndexError):
            ds[i]


def test_unreadable_item_is_replaced_by_the_next_readable_one_wrapping_round():
    """A bad item gives the next readable item (wrapping past the end); each bad file is logged and warned
    about once and never decoded again."""
    ds = _Items(7, bad={3, 4, 6})
    with pytest.warns(RuntimeWarning) as rec:
        assert ds[3] == 5 and ds[6] == 0
    assert len(rec) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[4] == 5 and ds[3] == 5 and ds[-1] == 0
    assert [p for p, _ in ds.skipped] == ["item3", "item4", "item6"] and ds.num_skipped == 3
    assert sorted(ds.loads).count(3) == 1 and ds.loads.count(4) == 1 and ds.loads.count(6) == 1
    assert "OSError: cannot read 3" in ds.skipped[0][1]


def test_a_file_reported_bad_twice_is_logged_and_warned_about_once():
    """Subclasses report files found bad while indexing or streaming (a bad shard, each epoch) straight to
    ``_skip``: a second report of the same file adds no entry and no warning."""
    ds = _Items(3)
    with pytest.warns(RuntimeWarning) as rec:
        ds._skip("shard-7.tar", "OSError: truncated")
        ds._skip("shard-7.tar", "OSError: truncated")
        ds._skip("shard-8.tar", "OSError: truncated")
    assert len(rec) == 2 and ds.skipped == [("shard-7.tar", "OSError: truncated"), ("shard-8.tar", "OSError: truncated")]


def test_max_substitutes_counts_the_item_itself():
    """With max_substitutes = 5, four bad items in a row are passed over, five are a DataError."""
    ds = _Items(9, bad={1, 2, 3, 4})
    ds.max_substitutes = 5
    with pytest.warns(RuntimeWarning):
        assert ds[1] == 5
    ds = _Items(9, bad={1, 2, 3, 4, 5})
    ds.max_substitutes = 5
    with pytest.warns(RuntimeWarning), pytest.raises(base_mod.DataError, match="5 consecutive unreadable"):
        ds[1]


def test_list_files_sorted_any_case_hidden_only_below_the_root(tmp_path):
    """Files whose names end in the extensions, any letter case, sorted; hidden files and folders below the
    root are left out, but a root inside a hidden folder (like ~/.cache) still lists; a single file is
    listed only if it matches."""
    root = tmp_path / ".cache" / "imgs"
    for rel in ("z.png", "sub/y.PNG", "a.Png", "b.txt", ".hidden.png", ".dot/c.png", "sub/.d/e.png", "m.jpeg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    got = base_mod.list_files(root, (".png", ".jpeg"))
    assert got == [str(root / r) for r in ("a.Png", "m.jpeg", "sub/y.PNG", "z.png")]
    assert base_mod.list_files(root / "b.txt", (".png",)) == []
    assert base_mod.list_files(root / "a.Png", (".png",)) == [str(root / "a.Png")]


def test_a_dataset_without_transform_draws_from_torch_only():
    """No transform (or one of mae_fast's transforms): only torch's generator needs seeding per item; a
    foreign transform may draw from numpy or Python too."""
    from mae_fast.data.transforms import Normalize

    ds = _Items(3)
    assert ds.draws_only_torch_rng
    ds.transform = Normalize()
    assert ds.draws_only_torch_rng
    ds.transform = lambda x: x
    assert not ds.draws_only_torch_rng


def test_corrupt_files_are_skipped_and_counted(demo, tmp_path):
    vids = tmp_path / "videos"
    vids.mkdir()
    good = sorted(demo.videos.glob("*.mp4"))[:2]
    for p in good:
        shutil.copy(p, vids / p.name)
    data = good[0].read_bytes()
    (vids / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (vids / "garbage.mkv").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.warns(RuntimeWarning, match="skipping"):
        ds = build_pretrain_dataset(vids, img_size=32)
    assert len(ds) == 120  # the two readable minutes at 1 fps
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["garbage.mkv", "truncated.mp4"]
    assert all(reason for _, reason in ds.skipped) and len(ds.record["skipped"]) == 2
    for i in range(len(ds)):
        ds[i]

    imgs = tmp_path / "images"
    shutil.copytree(demo.labelled / "val" / "disc_spokes", imgs)
    (imgs / "garbage.jpg").write_bytes(b"not a jpeg at all" * 50)
    png = sorted(imgs.glob("*.png"))[0].read_bytes()
    (imgs / "truncated.png").write_bytes(png[: len(png) // 2])  # header fine, data cut: fails only on decode
    with pytest.warns(RuntimeWarning):
        ds = build_pretrain_dataset(imgs, img_size=32)
        assert [Path(p).name for p, _ in ds.skipped] == ["garbage.jpg"]
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == len(ds) == demo_mod.DEFAULTS["n_val"] + 1 and all(x.shape == (3, 32, 32) for x in items)
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["garbage.jpg", "truncated.png"]


def test_bad_inputs_raise_clear_errors(demo, tmp_path):
    root = demo.root.parent
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_pretrain_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no videos"):
        build_pretrain_dataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="only 0.1000 h"):
        build_pretrain_dataset(None, hours=0.2, demo_root=root)
    for fps in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="fps must be a positive number"):
            build_pretrain_dataset(None, fps=fps, demo_root=root)
    with pytest.raises(ValueError, match="hours must be positive"):
        build_pretrain_dataset(None, hours=0, demo_root=root)
    with pytest.raises(ValueError, match="subset must be one of"):
        build_pretrain_dataset(None, hours=0.01, subset="random", demo_root=root)
    with pytest.raises(ValueError, match="img_size"):
        build_pretrain_dataset(None, img_size=0, demo_root=root)
    with pytest.raises(ValueError, match="hours applies to video"):
        build_pretrain_dataset(demo.labelled / "val", hours=0.01)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_labelled_datasets(tmp_path / "nope")
    with pytest.raises(ValueError, match="fraction"):
        build_labelled_datasets(None, fraction=0, demo_root=root)
    with pytest.raises(FileNotFoundError, match="class sub-folders"):
        build_labelled_datasets(tmp_path / "empty")
