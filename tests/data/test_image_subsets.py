"""Image-count subsets (mae_fast/data/image_subsets.py): exact size, distinct, order-independent, nested across
sizes, seed-dependent, water-filled per source (against a slow round-robin reference); the same subset from an
image folder, from shards with a manifest and from shards indexed without one; recorded in the run dir and replayed
on resume, a changed pool warned about, a pool that lost recorded images refused."""
from __future__ import annotations

import gzip
import json
import os
import random
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mae_fast.data import SubsetError, build_pretrain_dataset, image_subset, list_images, water_fill
from mae_fast.data.image_subsets import choose_subset, rank, select_names, source_of

# ---------------------------------------------------------------------------------------------- references


def deal_round_robin(counts: dict, n: int, seed: int) -> dict:
    """Slow reference for the per-source quotas: deal one image at a time to each source that has any left, in the
    order of the sources' seeded rank, until n are dealt."""
    order = sorted(counts, key=lambda s: (rank(s, seed), s))
    got = {s: 0 for s in counts}
    while n:
        for s in order:
            if n and got[s] < counts[s]:
                got[s] += 1
                n -= 1
    return got


def reference_subset(names: list[str], n: int, seed: int, strategy: str) -> set[str]:
    """Sort the whole pool by rank and take the first n (per source: the first quota of each source)."""
    ranked = sorted(set(names), key=lambda x: rank(x, seed))
    if strategy == "random":
        return set(ranked[:n])
    counts = {}
    for x in ranked:
        counts[source_of(x)] = counts.get(source_of(x), 0) + 1
    quota = deal_round_robin(counts, n, seed)
    out = set()
    for x in ranked:
        if quota[source_of(x)]:
            quota[source_of(x)] -= 1
            out.add(x)
    return out


@st.composite
def pools(draw, min_size=1):
    """Paths under /data/<source>/[sub/]<i>.jpg: 1-5 sources of very different sizes, some at the root."""
    sizes = draw(st.lists(st.integers(0, 40), min_size=1, max_size=5))
    paths = [f"/data/src{k}/{'sub/' if i % 3 == 0 else ''}{i}.jpg" for k, m in enumerate(sizes) for i in range(m)]
    paths += [f"/data/top{i}.jpg" for i in range(draw(st.integers(0, 3)))]
    if len(paths) < min_size:
        paths += [f"/data/pad/{i}.jpg" for i in range(min_size - len(paths))]
    return paths


# ---------------------------------------------------------------------------------------------- properties

@settings(max_examples=60, deadline=None)
@given(pools(), st.data(), st.integers(0, 2**40), st.sampled_from(["random", "per_source"]))
def test_subsets_are_exact_distinct_order_independent_nested_and_match_a_sorted_reference(paths, data, seed,
                                                                                          strategy):
    n2 = data.draw(st.integers(1, len(paths)), label="n2")
    n1 = data.draw(st.integers(1, n2), label="n1")
    big = image_subset(paths, n2, seed, strategy, root="/data")
    assert len(big) == n2 == len(set(big)) and set(big) <= set(paths)
    shuffled = list(paths)
    random.Random(seed).shuffle(shuffled)
    # neither the order of the paths nor paths listed twice change the subset
    assert image_subset(shuffled + shuffled[:3], n2, seed, strategy, root="/data") == big
    small = image_subset(paths, n1, seed, strategy, root="/data")
    assert set(small) <= set(big)
    names = [p[len("/data/"):] for p in paths]
    assert {p[len("/data/"):] for p in big} == reference_subset(names, n2, seed, strategy)
    if strategy == "random":
        assert big[:n1] == small  # rank order: a smaller subset is a prefix


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("abcdef", min_size=1, max_size=4), st.integers(0, 60), min_size=1, max_size=7),
       st.data(), st.integers(0, 1000))
def test_water_fill_sums_caps_and_matches_round_robin_dealing(counts, data, seed):
    n = data.draw(st.integers(0, sum(counts.values())))
    quotas = water_fill(counts, n, seed)
    assert sum(quotas.values()) == n and all(0 <= quotas[s] <= counts[s] for s in counts)
    assert quotas == deal_round_robin(counts, n, seed)
    if n < sum(counts.values()):  # monotone in n: what makes per_source nested
        assert all(a <= b for a, b in zip(quotas.values(), water_fill(counts, n + 1, seed).values()))


def test_water_fill_gives_small_sources_everything_and_shares_the_rest():
    assert water_fill({"a": 1000, "b": 500, "c": 100, "d": 50}, 400) == {"a": 125, "b": 125, "c": 100, "d": 50}
    paths = [f"/d/{s}/{i}.png" for s, m in (("a", 1000), ("b", 500), ("c", 100), ("d", 50)) for i in range(m)]
    got = image_subset(paths, 400, seed=3, strategy="per_source")
    assert {s: sum(p.startswith(f"/d/{s}/") for p in got) for s in "abcd"} == {"a": 125, "b": 125, "c": 100, "d": 50}
    # the root is the common folder of the paths' folders: /d here, /d/a for the paths of one source alone
    assert image_subset(paths, 400, seed=3, strategy="per_source", root="/d") == got
    assert set(image_subset(paths[:1000], 400, 3, "per_source")) == set(image_subset(paths[:1000], 400, 3))
    # 401 leaves one over for a or b, which one depending on the seed; the rest stays
    q = [water_fill({"a": 1000, "b": 500, "c": 100, "d": 50}, 401, s) for s in range(8)]
    assert {(x["a"], x["b"]) for x in q} == {(126, 125), (125, 126)} and all(x["c"] == 100 for x in q)


def test_seeds_give_different_subsets_and_bad_sizes_are_one_line_value_errors():
    paths = [f"/d/{i}.png" for i in range(200)]
    subsets = {frozenset(image_subset(paths, 100, s)) for s in range(5)}
    assert len(subsets) == 5
    for n, says in ((201, "holds 200"), (0, ">= 1"), (2.5, "whole number")):
        with pytest.raises(ValueError, match=says) as err:
            image_subset(paths, n, 0)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="holds 3"):  # three names, listed twice: six paths but three images
        image_subset(["/d/a.png", "/d/b.png", "/d/c.png"] * 2, 4, 0)
    with pytest.raises(ValueError, match="twice .*c.png"):  # a streamed pool (a manifest) must not repeat a name
        select_names(lambda: [(x, None) for x in ("a.png", "b.png", "c.png", "c.png")], 4, 0)
    with pytest.raises(ValueError, match="subset_strategy"):
        image_subset(paths, 3, 0, strategy="stratified")


# ---------------------------------------------------------------------------------------------- folders, shards

@pytest.fixture(scope="module")
def folder(tmp_path_factory, write_pngs):
    """Three sources of 6, 3 and 1 tiny PNGs plus 2 at the root."""
    root = tmp_path_factory.mktemp("pool")
    for i, (src, n) in enumerate((("a", 6), ("b", 3), ("c", 1))):
        write_pngs(root / src, n, size=(8, 8), seed=i)
    for p in write_pngs(root / "tmp_top", 2, size=(8, 8), seed=9):
        p.rename(root / f"top_{p.name}")
    (root / "tmp_top").rmdir()
    return root


def test_a_folder_subset_is_streamed_recorded_and_skips_unreadable_images(folder, tmp_path, write_pngs):
    every = list_images(folder)
    ds = build_pretrain_dataset(folder, img_size=8, images=7, subset_strategy="per_source", seed=4,
                                subset_dir=tmp_path / "run")
    want = image_subset(every, 7, 4, "per_source", root=folder)
    assert ds.files == [str(p) for p in want] and len(ds) == 7 and ds[0].shape == (3, 8, 8)
    saved = json.loads((tmp_path / "run" / "subset.json").read_text())
    assert saved["n_pool"] == 12 and saved["per_source"] == {".": 2, "a": 2, "b": 2, "c": 1}
    with gzip.open(tmp_path / "run" / "subset.txt.gz", "rt") as f:
        assert [str(folder / line.strip()) for line in f] == ds.files
    assert ds.record["subset_strategy"] == "per_source" and ds.record["n_images"] == 7

    # an unreadable image in the pick is replaced by the next readable one in rank order
    broken = tmp_path / "broken"
    write_pngs(broken, 8, size=(8, 8))
    first = image_subset(list_images(broken), 3, 0)
    open(first[1], "wb").write(b"not a png")
    with pytest.warns(RuntimeWarning, match="skipping unreadable"):
        ds = build_pretrain_dataset(broken, img_size=8, images=3, seed=0)
    assert ds.files == [str(p) for p in image_subset(sorted(set(list_images(broken)) - {str(first[1])}), 3, 0,
                                                     root=broken)]
    assert [p for p, _ in ds.skipped] == [str(first[1])]


def test_shards_take_the_same_subset_by_manifest_or_by_an_index_pass(folder, tmp_path, monkeypatch):
    from mae_fast.data.shards import ShardDataset, write_shards

    out = tmp_path / "shards"
    write_shards(folder, out, maxcount=5, image_format="png")
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [len(x["keys"]) for x in lines] == [5, 5, 2] and lines[0]["names"][0] == "a/000.png"
    want = {os.path.relpath(p, folder) for p in image_subset(list_images(folder), 5, 1, "per_source", root=folder)}
    ds = build_pretrain_dataset(out, img_size=8, images=5, subset_strategy="per_source", seed=1,
                                subset_dir=tmp_path / "run")
    assert isinstance(ds, ShardDataset) and ds.num_samples == 5 and ds.record["kind"] == "shards"
    ds.return_meta = True
    assert sorted(os.path.relpath(meta["file"], folder) for _, meta in ds) == sorted(want)

    # without a manifest (e.g. shards written by another tool) one pass over the tar headers indexes them, cached
    # in the run dir (the data may be read-only); names are then the sample keys
    (out / "manifest.jsonl").unlink()
    ds = build_pretrain_dataset(out, img_size=8, images=4, seed=1, subset_dir=tmp_path / "run2")
    assert (tmp_path / "run2" / "shard_manifest.jsonl").is_file() and not (out / "manifest.jsonl").exists()
    keys = [k for x in lines for k in x["keys"]]
    ds.return_meta = True
    assert sorted(meta["__key__"] for _, meta in ds) == sorted(image_subset(keys, 4, 1, root="."))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # no run dir: the index goes to the temp dir
    assert build_pretrain_dataset(out, img_size=8, images=4, seed=1).keep == ds.keep
    assert len(list((tmp_path / "tmp" / "mae_fast_shard_index").glob("*/shard_manifest.jsonl"))) == 1


# ---------------------------------------------------------------------------------------------- runs

def test_resume_replays_the_recorded_subset_and_checks_the_pool(folder, tmp_path, write_pngs):
    pool = tmp_path / "pool"
    for p in list_images(folder):
        rel = os.path.relpath(p, folder)
        (pool / rel).parent.mkdir(parents=True, exist_ok=True)
        (pool / rel).write_bytes(open(p, "rb").read())
    run = tmp_path / "run"
    first = choose_subset(pool, 6, seed=2, run_dir=run)
    # the recorded list is what a resume reads: poison it and the replay returns the poisoned list
    lines = gzip.open(run / "subset.txt.gz", "rt").read().splitlines()
    others = sorted({os.path.relpath(p, pool) for p in list_images(pool)} - set(lines))
    edited = lines[:-1] + [others[0]]
    with gzip.open(run / "subset.txt.gz", "wt") as f:
        f.write("\n".join(edited) + "\n")
    assert choose_subset(pool, 6, seed=2, run_dir=run, replay="check").files == [str(pool / x) for x in edited]
    assert choose_subset(pool, 6, seed=2, run_dir=run, replay=None).files == first.files  # a fresh choice: rewritten

    write_pngs(pool / "d", 2, size=(8, 8), seed=5)  # the pool grew: a warning, the same subset
    with pytest.warns(RuntimeWarning, match="changed since .* all still present"):
        again = choose_subset(pool, 6, seed=2, run_dir=run, replay="check")
    assert again.files == first.files
    os.remove(first.files[3])  # a recorded image is gone: a one-line error
    with pytest.raises(SubsetError, match="1 of its 6 images are no longer in"):
        choose_subset(pool, 6, seed=2, run_dir=run, replay="check")


def test_pretraining_records_the_subset_and_a_resume_reads_it(folder, tmp_path, monkeypatch):
    import mae_fast.data as data_mod
    from mae_fast.training import curves
    from mae_fast.training.pretrain import pretrain

    monkeypatch.setattr(curves, "draw_or_warn", lambda run_dir, draw: None)  # matplotlib: not the subject here

    cfg = dict(recipe="demo", name="sub", output_dir=str(tmp_path), data_source=str(folder), images=8,
               subset_strategy="per_source", img_size=16, batch_size=4, steps=2, warmup_steps=1, checkpoint_every=1,
               log_every=1, vis_every=0, vis_images=0, progress=False, peak_flops=1e12, stop_at_step=1,
               model_kwargs=dict(embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                                 decoder_num_heads=2))
    res = pretrain(cfg)
    run = res["run_dir"]
    listed = gzip.open(f"{run}/subset.txt.gz", "rt").read().splitlines()
    assert len(listed) == 8 and json.loads(open(f"{run}/data_record.json").read())["n_images"] == 8
    # a resume replays the list (made here deliberately different from a fresh choice to tell the two apart)
    with gzip.open(f"{run}/subset.txt.gz", "wt") as f:
        f.write("\n".join(reversed(listed)) + "\n")
    seen, real = [], data_mod.choose_subset

    def spy(source, n, seed, strategy, run_dir, replay, *a, **kw):
        out = real(source, n, seed, strategy, run_dir, replay, *a, **kw)
        seen.append((replay, out.files))
        return out

    monkeypatch.setattr(data_mod, "choose_subset", spy)
    res = pretrain(dict(cfg, stop_at_step=None, resume="auto"))
    assert res["steps"] == 2 and seen[0][0] == "check"
    assert seen[0][1] == [str(folder / x) for x in reversed(listed)]


def test_subset_keys_refuse_contradictions_in_one_line(folder, tmp_path, capsys):
    from mae_fast.training.cli import run_command
    from mae_fast.training.config import ConfigError, PretrainConfig
    from mae_fast.training.pretrain import pretrain

    base = dict(recipe="demo", output_dir=str(tmp_path), progress=False)
    for extra, says in (({"hours": 1.0, "data_source": str(folder)}, "not both"),
                        ({"data_source": "synthetic"}, "image folder or WebDataset shards"),
                        ({"data_source": None}, "demo videos"),
                        ({"data_source": str(folder), "subset_strategy": "by_hash"}, "subset_strategy must be")):
        with pytest.raises(ConfigError, match=says):
            pretrain(dict(base, images=4, **extra))
    with pytest.raises(SubsetError, match="not both"):  # the Python API refuses it too
        build_pretrain_dataset(folder, images=3, hours=1.0)
    code = run_command([f"output_dir={tmp_path}", "images=100", f"data_source={folder}", "progress=false"],
                       PretrainConfig, pretrain, prog="mae-fast pretrain")
    err = capsys.readouterr().err
    assert code == 2 and "holds 12" in err and len(err.strip().splitlines()) == 1
