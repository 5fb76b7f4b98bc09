"""Checkpoints that survive a kill: atomic writes, keep the newest K, resume from the newest valid one.

A checkpoint is a plain ``torch.save`` file (``{"model": state, ...}``, so ``mae_fast.load_pretrained``
and ``torch.load`` read it directly) named ``checkpoint-<step>.pt``. It is written to a temporary
file in the same folder, flushed and fsynced, then ``os.replace``d over the final name, so a kill at
any moment leaves either the old set or the old set plus the complete new file. A ``.sha256`` file
beside it (written after) lets resume reject a file damaged later; a file without one is checked by
loading it.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from mae_fast.models.checkpoint import CheckpointError

CKPT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or all of the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """(step, path) of the run's checkpoints, newest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(state: dict, run_dir, step: int, keep: int = 3) -> Path:
    """Atomically write ``state`` as the run's checkpoint for ``step``; keep the newest ``keep``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = checkpoint_dir(run_dir) / f"checkpoint-{step:08d}.pt"
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())
    if keep and keep > 0:
        remove_checkpoints(run_dir, keep, spare=path)
    return path


def remove_checkpoints(run_dir, keep: int = 0, spare: Path | None = None) -> None:
    """Delete the run's checkpoints (and their digests) but the newest ``keep``. ``spare`` (the checkpoint just
    written) is one of those kept even where checkpoints of later steps are there (a run resumed from an earlier
    checkpoint of its directory), so a path that ``save_checkpoint`` returns always exists."""
    found = list_checkpoints(run_dir)
    if spare is not None and keep > 0:
        found, keep = [(s, p) for s, p in found if p != spare], keep - 1
    for _, old in found[keep:]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)


def set_aside_later(run_dir, step: int) -> Path | None:
    """Move the run's checkpoints of steps after ``step`` (and their digests) into a subfolder of its checkpoint
    folder, where ``resume=auto`` and the keep-K clean-up no longer see them: a run resumed from an earlier
    checkpoint starts another continuation, and ``resume=auto`` must go on with that one, not the abandoned one.
    Nothing is deleted. Returns the subfolder (None when there was nothing to move)."""
    later = [p for s, p in list_checkpoints(run_dir) if s > step]
    if not later:
        return None
    base = checkpoint_dir(run_dir) / f"set-aside-after-step-{step}"
    dest, k = base, 1
    while dest.exists():
        k += 1
        dest = base.with_name(f"{base.name}-{k}")
    dest.mkdir()
    for p in later:
        digest = p.with_name(p.name + ".sha256")
        if digest.exists():
            os.replace(digest, dest / digest.name)
        os.replace(p, dest / p.name)
    _fsync_dir(dest)
    _fsync_dir(checkpoint_dir(run_dir))
    return dest


def clean_temporaries(run_dir) -> None:
    """Remove temporaries that a killed writer left behind."""
    d = checkpoint_dir(run_dir)
    if d.is_dir():
        for p in d.glob(".checkpoint-*.tmp-*"):
            p.unlink(missing_ok=True)


def load_checkpoint(path) -> dict:
    """Read a checkpoint, checking its digest when one is there; raises ``CheckpointError`` if damaged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    digest_file = path.with_name(path.name + ".sha256")
    if digest_file.exists():
        want = digest_file.read_text().strip()
        if want and hashlib.sha256(data).hexdigest() != want:
            raise CheckpointError(f"checkpoint {path} does not match its sha256 (damaged)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be read: {e}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} has no 'model' entry")
    return state


def latest_valid_checkpoint(run_dir) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads (damaged ones are skipped with a warning), or None."""
    for _, path in list_checkpoints(run_dir):
        try:
            return path, load_checkpoint(path)
        except (RuntimeError, OSError) as e:
            warnings.warn(f"skipping damaged checkpoint: {e}", RuntimeWarning, stacklevel=2)
    return None


def rng_state() -> dict:
    """This process's RNG states (torch CPU, numpy, python, and CUDA's when started), for a checkpoint."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore what :func:`rng_state` saved (CUDA's with a warning when the devices differ)."""
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except (RuntimeError, IndexError) as e:
            warnings.warn(f"could not restore CUDA RNG state: {e}", RuntimeWarning)
