"""Image-count subsets: ``n`` images of an image folder or of WebDataset shards, chosen by a seeded hash rank.

Every image has a *name*: its path relative to the pool's root with ``/`` separators (for shards: the path the
image had under the folder the shards were written from, as the shard manifest lists it, else the sample's key).
Its rank is the 64-bit BLAKE2b hash of the name keyed by the seed, so a choice depends only on the set of names
and the seed, never on listing order or on where the data is mounted.

* ``random``: the ``n`` names of smallest rank. Nested: the first ``n`` of a larger subset are the smaller one.
* ``per_source``: an equal share from each *source*, the first component of a name (a top-level folder under the
  root; images lying directly in the root form the source ``"."``). A source with fewer images than its share
  gives all it has and the rest is shared among the others (water-filling, :func:`water_fill`); the units left
  over when the shares do not divide evenly go one each to the open sources in the order of their names' rank
  under the same seed. Within a source the images of smallest rank are taken. The quotas never shrink as ``n``
  grows, so these subsets are nested too.

A pool is streamed, never listed in memory: ``random`` keeps a bounded heap of the ``n`` best ranks (one pass,
O(n) memory), ``per_source`` counts the sources in a first pass and keeps one bounded heap per source in a
second. The same pass computes the pool's fingerprint (count and an order-independent sum of the names'
hashes), which a resumed run compares with the recorded one (:func:`choose_subset`).
"""
from __future__ import annotations

import gzip
import hashlib
import heapq
import json
import os
import tarfile
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from .base import DataError

STRATEGIES = ("random", "per_source")
SUBSET_FILE, SUBSET_LIST = "subset.json", "subset.txt.gz"
MANIFEST, MANIFEST_CACHE = "manifest.jsonl", "shard_manifest.jsonl"


class SubsetError(DataError, ValueError):
    """An image subset cannot be chosen or replayed (too few images, a bad strategy, a changed pool): a ValueError
    for the Python API, a DataError that the command line reports in one line."""


# ---------------------------------------------------------------------------------------------- ranking

def rank(name: str, seed: int) -> int:
    """The seeded 64-bit hash rank of ``name`` (smaller is chosen first; equal ranks: the larger name first)."""
    return _rank_bytes(name.encode(), str(int(seed)).encode())


def _rank_bytes(data: bytes, key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "big")


def _fingerprint_term(data: bytes) -> int:
    # a change detector, not a security check: two C checksums are ~10x cheaper than a second BLAKE2b
    return zlib.crc32(data) << 32 | zlib.adler32(data)


def source_of(name: str) -> str:
    """The top-level folder of a name (``"."`` for a name without one)."""
    head, sep, _ = name.partition("/")
    return head if sep else "."


def water_fill(counts: Mapping[str, int], n: int, seed: int = 0) -> dict[str, int]:
    """Per-source quotas summing to ``n``: the largest level L with ``sum(min(c, L)) <= n``, each source
    ``min(c, L)``, and one more for each of the first ``n - sum`` sources with more than L images, ordered by
    :func:`rank` of the source name (ties: by name)."""
    total = sum(int(c) for c in counts.values())
    if not 0 <= n <= total:
        raise SubsetError(f"cannot take {n} images from sources holding {total}")
    lo, hi = 0, max(counts.values(), default=0)
    while lo < hi:  # largest L with sum(min(c, L)) <= n
        mid = (lo + hi + 1) // 2
        if sum(min(c, mid) for c in counts.values()) <= n:
            lo = mid
        else:
            hi = mid - 1
    quotas = {s: min(int(c), lo) for s, c in counts.items()}
    left = n - sum(quotas.values())
    open_ = sorted((s for s, c in counts.items() if c > lo), key=lambda s: (rank(s, seed), s))
    for s in open_[:left]:
        quotas[s] += 1
    return quotas


class _Smallest:
    """The ``k`` entries of smallest rank offered so far: a bounded heap of ``(-rank, name, ref)`` (O(k) memory)."""

    def __init__(self, k: int):
        self.k, self.heap = int(k), []

    def offer(self, negrank: int, name: str, ref) -> None:
        heap = self.heap
        if len(heap) < self.k:
            heapq.heappush(heap, (negrank, name, ref))
        elif self.k and (negrank, name) > heap[0]:  # a name offered twice compares smaller: never taken twice here
            heapq.heapreplace(heap, (negrank, name, ref))

    def ranked(self) -> list[tuple[int, str, object]]:
        return self.heap


@dataclass
class PoolStats:
    """What one pass over a pool saw: the number of names, their fingerprint, and the count per source."""

    n: int = 0
    acc: int = 0
    sources: dict = field(default_factory=dict)

    def add(self, name: str, data: bytes) -> None:
        self.n += 1
        self.acc = (self.acc + _fingerprint_term(data)) & 0xFFFFFFFFFFFFFFFF
        s = source_of(name)
        self.sources[s] = self.sources.get(s, 0) + 1

    @property
    def fingerprint(self) -> str:
        return f"{self.n}-{self.acc:016x}"


Pool = Callable[[], Iterable[tuple[str, object]]]  # a fresh stream of (name, ref) pairs per call


def select_names(pool: Pool, n: int, seed: int = 0, strategy: str = "random", exclude=frozenset()):
    """``([(name, ref)] in rank order, PoolStats)``: the subset of the streamed ``pool`` (see the module
    docstring), leaving out the names in ``exclude``. Raises :class:`SubsetError` when it cannot hold ``n``."""
    if strategy not in STRATEGIES:
        raise SubsetError(f"subset_strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise SubsetError(f"the number of images must be a whole number >= 1, got {n!r}")
    n, stats, eligible, key = int(n), PoolStats(), {}, str(int(seed)).encode()
    if strategy == "random":
        best = _Smallest(n)
        for name, ref in pool():
            data = name.encode()
            stats.add(name, data)
            if name not in exclude:
                best.offer(-_rank_bytes(data, key), name, ref)
        heaps = [best]
    else:
        for name, _ in pool():
            stats.add(name, name.encode())
            if name not in exclude:
                s = source_of(name)
                eligible[s] = eligible.get(s, 0) + 1
        if n > sum(eligible.values()):
            raise SubsetError(f"asked for {n} images but the pool holds {sum(eligible.values())}")
        quotas = water_fill(eligible, n, seed)
        by_source = {s: _Smallest(q) for s, q in quotas.items()}
        for name, ref in pool():
            if name not in exclude:
                by_source[source_of(name)].offer(-_rank_bytes(name.encode(), key), name, ref)
        heaps = list(by_source.values())
    chosen = sorted((item for h in heaps for item in h.ranked()), key=lambda t: (t[0], t[1]), reverse=True)
    twice = sorted({a[1] for a, b in zip(chosen, chosen[1:]) if a[1] == b[1]})[:3]  # equal names: equal ranks
    if twice:
        raise SubsetError(f"the pool lists some images twice ({', '.join(twice)}); names must be distinct")
    if len(chosen) < n:
        raise SubsetError(f"asked for {n} images but the pool holds {len(chosen)}")
    return [(name, ref) for _, name, ref in chosen], stats


# ---------------------------------------------------------------------------------------------- in memory

def common_root(paths) -> str:
    """The deepest folder holding every path (the common path of their parent folders, made absolute)."""
    parents = {os.path.dirname(os.path.abspath(str(p))) for p in paths}
    return os.path.commonpath(sorted(parents)) if parents else ""


def image_subset(paths, n: int, seed: int = 0, strategy: str = "random", root=None) -> list:
    """Exactly ``n`` distinct paths of ``paths``, in rank order (see the module docstring).

    Names are the paths relative to ``root`` (default :func:`common_root`: the common folder of the paths'
    parent folders); with ``per_source`` the sources are the first folders under it. The result does not depend
    on the order of ``paths`` (duplicates count once), the subsets of one seed are nested across ``n``, and
    another seed gives another subset. Raises ValueError (:class:`SubsetError`) when ``n < 1`` or ``n`` exceeds
    the number of distinct paths.
    """
    paths = list(paths)
    base = os.path.abspath(str(root)) if root is not None else common_root(paths)
    named = {}
    for p in paths:
        rel = os.path.relpath(os.path.abspath(str(p)), base) if base else str(p)
        named.setdefault(Path(rel).as_posix(), p)
    chosen, _ = select_names(lambda: named.items(), n, seed, strategy)
    return [ref for _, ref in chosen]


# ---------------------------------------------------------------------------------------------- folder pools

def iter_image_names(root) -> Iterator[tuple[str, None]]:
    """``(relative name, None)`` of every image file under ``root``, streamed (hidden files and folders skipped,
    the extensions of :data:`~mae_fast.data.images.IMAGE_EXTENSIONS`)."""
    from .images import IMAGE_EXTENSIONS

    root = os.fspath(root)
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        prefix = "" if rel == "." else Path(rel).as_posix() + "/"
        for f in files:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                yield prefix + f, None


# ---------------------------------------------------------------------------------------------- shard pools

def _shard_keys(url: str) -> list[str]:
    """The sample keys of one tar shard, from its member headers (local files are not read past the headers)."""
    from .shards import _open_url

    keys: list[str] = []
    local = not url.startswith(("pipe:", "http://", "https://", "gs://", "s3://"))
    with (tarfile.open(url, "r:*") if local else tarfile.open(fileobj=_open_url(url), mode="r|*")) as tar:
        for member in tar:
            base = member.name.rsplit("/", 1)[-1]
            if member.isfile() and "." in base:
                key = member.name[: len(member.name) - len(base)] + base.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    return keys


def _manifest_lines(path: Path, wanted: set[str]) -> Iterator[dict]:
    with open(path) as f:
        for line in f:
            entry = json.loads(line)
            if entry.get("shard") in wanted:
                yield entry


def shard_manifest(urls: list[str], cache_dir=None, verbose: bool = False) -> Path:
    """The manifest (JSON lines ``{"shard", "keys", ["names"]}``) covering ``urls``: the shard writer's
    ``manifest.jsonl`` beside them when it lists every one, else ``cache_dir/shard_manifest.jsonl``, built by one
    pass over the tar headers when missing or made for other shards (the data folder may be read-only; no
    ``cache_dir``: a folder of the temp dir named by the shard list)."""
    names = [Path(u).name for u in urls]
    if len({Path(u).parent for u in urls}) == 1:
        beside = Path(urls[0]).parent / MANIFEST
        if beside.is_file():
            with open(beside) as f:
                listed = {json.loads(line).get("shard") for line in f}
            if set(names) <= listed:
                return beside
    if cache_dir is None:  # the Python API without a run dir: a per-shard-list folder in the temp dir
        digest = hashlib.sha1("\n".join(urls).encode()).hexdigest()[:16]
        cache_dir = Path(tempfile.gettempdir()) / "mae_fast_shard_index" / digest
    cache = Path(cache_dir) / MANIFEST_CACHE
    stamp = [[u, os.path.getsize(u) if os.path.exists(u) else None] for u in urls]
    if cache.is_file():
        with open(cache) as f:
            if json.loads(f.readline()).get("urls") == stamp:
                return cache
    if len(set(names)) != len(names):
        raise SubsetError("shard file names repeat across folders; an image subset needs distinct shard names")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"urls": stamp}) + "\n")
        for i, url in enumerate(urls):
            f.write(json.dumps({"shard": Path(url).name, "keys": _shard_keys(url)}) + "\n")
            if verbose and (i + 1) % 100 == 0:
                print(f"indexed {i + 1}/{len(urls)} shards", flush=True)
    os.replace(tmp, cache)
    return cache


def shard_pool(manifest: Path, urls: list[str]) -> Pool:
    """The pool of a manifest: names (the manifest's ``names``, else the keys), refs ``(shard, key)``."""
    wanted = {Path(u).name for u in urls}

    def stream():
        for entry in _manifest_lines(manifest, wanted):
            keys = entry["keys"]
            for key, name in zip(keys, entry.get("names") or keys):
                yield name, (entry["shard"], key)
    return stream


# ---------------------------------------------------------------------------------------------- runs

@dataclass
class Subset:
    """A chosen subset: ``files`` (image paths) or ``keep`` ({shard name: set of keys}), and its ``record``."""

    record: dict
    files: list | None = None
    keep: dict | None = None


def subset_config_problem(images, strategy, hours, data_source) -> str | None:
    """Why the pretraining keys ``images`` / ``subset_strategy`` cannot go together with the others, or None."""
    if strategy not in STRATEGIES:
        return f"subset_strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}"
    if images is None:
        return None
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        return f"images must be a whole number >= 1, got {images!r}"
    if hours is not None:
        return "set hours (video subsets) or images (image-count subsets), not both"
    if data_source is None or str(data_source).strip().lower() in ("", "demo", "synthetic"):
        return (f"images subsets take an image folder or WebDataset shards as data_source, not "
                f"{data_source or 'the demo videos'}")
    return None


def _write_subset(run_dir: Path, header: dict, chosen) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{SUBSET_LIST}.tmp"
    with gzip.open(tmp, "wt") as f:  # name, or name<TAB>shard<TAB>key
        for name, ref in chosen:
            f.write(name + ("" if ref is None else f"\t{ref[0]}\t{ref[1]}") + "\n")
    os.replace(tmp, run_dir / SUBSET_LIST)
    tmp = run_dir / f".{SUBSET_FILE}.tmp"
    tmp.write_text(json.dumps(header, indent=1))
    os.replace(tmp, run_dir / SUBSET_FILE)


def _read_subset(run_dir: Path) -> list[tuple[str, object]]:
    out = []
    with gzip.open(run_dir / SUBSET_LIST, "rt") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            out.append((parts[0], None if len(parts) == 1 else (parts[1], parts[2])))
    return out


def _replay(run_dir: Path, header: dict, pool: Pool, check: bool):
    """The recorded subset if it was made with ``header``'s settings (else None); with ``check``, one pass over the
    pool compares its fingerprint and finds recorded images that are gone."""
    path = run_dir / SUBSET_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if any(saved.get(k) != header[k] for k in ("kind", "strategy", "seed", "n")):
        return None
    chosen = _read_subset(run_dir)
    if len(chosen) != saved["n"]:
        raise SubsetError(f"{run_dir / SUBSET_LIST} lists {len(chosen)} images, not the {saved['n']} of "
                          f"{SUBSET_FILE}")
    if check:
        stats, listed, found = PoolStats(), {name for name, _ in chosen}, 0
        for name, _ in pool():
            stats.add(name, name.encode())
            found += name in listed
        if stats.fingerprint != saved["pool_fingerprint"]:
            change = f"pool fingerprint {saved['pool_fingerprint']} -> {stats.fingerprint}"
            if found < len(listed):
                raise SubsetError(f"cannot replay the subset recorded in {path}: {len(listed) - found} of its "
                                  f"{len(listed)} images are no longer in {header['source']} ({change}); start a "
                                  f"new run (resume=null or another name)")
            warnings.warn(f"{header['source']} changed since {path} was recorded ({change}); replaying the recorded "
                          f"{len(listed)} images, all still present", RuntimeWarning, stacklevel=3)
    return chosen, saved


def choose_subset(source, n: int, seed: int = 0, strategy: str = "random", run_dir=None, replay=None,
                  check_images: bool = True, shards: bool = False) -> Subset:
    """The ``n``-image subset of an image folder (or, with ``shards``, of the shard urls ``source``) for a run.

    With ``run_dir`` the choice is written there (``subset.json``: kind, source, strategy, seed, n, pool size and
    fingerprint, images per source; ``subset.txt.gz``: the names in rank order, for shards with their shard and
    key), and a shard index built for shards without a manifest is cached there. ``replay``: None (choose and
    record), "check" (a resumed run: reuse the recorded subset when made with the same settings, after comparing
    the pool's fingerprint: a changed pool warns, recorded images gone raise) or "trust" (reuse it unchecked:
    the other ranks of a run whose rank 0 has just recorded it). Images that fail the header check are left out
    and replaced by the next in rank (so the subset is the first ``n`` readable ones).
    """
    from .images import screen_images

    run_dir = None if run_dir is None else Path(run_dir)
    if shards:
        urls = list(source)
        pool = shard_pool(shard_manifest(urls, run_dir), urls)
        root, label = None, str(urls[0]) if len(urls) == 1 else f"{len(urls)} shards ({Path(urls[0]).parent})"
    else:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise SubsetError(f"images subsets take one image folder or WebDataset shards, not {source}")
        pool, label = (lambda: iter_image_names(root)), str(root)
    header = {"format": "mae_fast-image-subset-1", "kind": "shards" if shards else "images", "source": label,
              "strategy": strategy, "seed": int(seed), "n": int(n)}
    replayed = _replay(run_dir, header, pool, replay == "check") if (run_dir is not None and replay) else None
    if replayed is not None:
        chosen, saved = replayed
        header = saved
    else:
        bad: dict[str, str] = {}
        while True:
            chosen, stats = select_names(pool, n, seed, strategy, exclude=bad)
            if shards or not check_images:
                break
            _, newly = screen_images([str(root / name) for name, _ in chosen])
            if not newly:
                break
            bad.update((Path(os.path.relpath(p, root)).as_posix(), r) for p, r in newly)
        per_source: dict[str, int] = {}
        for name, _ in chosen:
            per_source[source_of(name)] = per_source.get(source_of(name), 0) + 1
        header.update(n_pool=stats.n, pool_fingerprint=stats.fingerprint,
                      pool_per_source=dict(sorted(stats.sources.items())), per_source=dict(sorted(per_source.items())),
                      skipped=[[str(root / k), r] for k, r in sorted(bad.items())], list=SUBSET_LIST)
        if run_dir is not None:
            _write_subset(run_dir, header, chosen)
    record = dict(header, kind="images", images_requested=int(n), subset_strategy=strategy, n_images=int(n),
                  subset_file=None if run_dir is None else str(run_dir / SUBSET_FILE))
    if shards:
        keep: dict[str, set] = {}
        for _, (shard, key) in chosen:
            keep.setdefault(shard, set()).add(key)
        return Subset(dict(record, kind="shards"), keep=keep)
    return Subset(record, files=[str(root / name) for name, _ in chosen])
