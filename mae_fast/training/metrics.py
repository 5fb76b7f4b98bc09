"""What a run reports: ``metrics.jsonl`` rows (and TensorBoard when installed), throughput windows with MFU and
the share of time spent waiting for data, the progress bar, and the peak FLOP/s that MFU divides by."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

# bf16 dense peak FLOP/s of one device (datasheet figures), matched against the device name
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12),
    ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("A10G", 70e12), ("A10", 125e12),
    ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
)

# the share of a logging window spent blocked on the data loader above which the trainer says so
DATA_WAIT_WARN = 0.1


def peak_flops_for(device: torch.device, override) -> tuple[float | None, str]:
    """Peak FLOP/s of one device: the override, a table for known GPUs, or a measured CPU matmul."""
    if override:
        return float(override), "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in PEAK_FLOPS:
            if key in name:
                return val, f"table ({name})"
        return None, f"unknown GPU {name}"
    return measure_cpu_peak(), "measured CPU fp32 matmul (best of 4 rounds)"


def measure_cpu_peak(size: int = 512, rounds: int = 4, reps: int = 4, pause_s: float = 0.02) -> float:
    """FLOP/s of the fastest of ``rounds`` x ``reps`` fp32 matmuls, the rounds a pause apart: other load on the
    machine only lowers a trial, so the best of trials spread over time is the least disturbed one (a single
    burst on a busy machine came out several times too low, and MFU over 100%). The operand comes from a
    generator of its own: a draw from the global one would move the RNG state that a resume has just restored,
    so the resumed run would go on from another state than the uninterrupted one."""
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    a @ a  # warm-up (thread pool start, first-touch pages)
    best = float("inf")
    for r in range(rounds):
        if r:
            time.sleep(pause_s)
        for _ in range(reps):
            t = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def mfu_text(mfu) -> str | None:
    """MFU for people: a percentage, or ``?(peak unreliable)`` when it is impossible (over 100%: the peak it divides
    by came out too low, e.g. measured on a busy CPU; set ``peak_flops`` to the device's real one)."""
    if mfu is None:
        return None
    return f"{100 * mfu:.1f}%" if mfu <= 1.0 else "?(peak unreliable)"


class MetricsLog:
    """Appends rows to ``<run_dir>/metrics.jsonl`` (and TensorBoard scalars when it is installed); rank 0 only.
    ``resume_step``: the step the run goes on from; rows of later steps (logged before the interruption, about to be
    logged again) are dropped first, so the file reads as one run."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled, self.path, self.tb = enabled, run_dir / "metrics.jsonl", None
        if not enabled:
            return
        if resume_step is not None:
            keep_rows_until(self.path, resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self.tb.add_scalar(k, v, row["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def keep_rows_until(path: Path, step: int) -> None:
    """Drop the rows of ``path`` (JSON lines with a ``step``) after ``step``, atomically (a temporary file renamed
    over it, so an interruption leaves the old file or the new one); a torn last line goes too."""
    if not path.is_file():
        return
    kept, dropped = [], False
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            keep = int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        dropped = dropped or not keep
    if not dropped:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def progress_bar(enabled: bool, **kw):
    """A tqdm bar on stdout, or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, file=sys.stdout, **kw)


class Throughput:
    """Logging windows of a pretraining run: images/s, MFU and data wait per window, and their steady values
    over every window but the first (which holds compilation and warm-up). Time spent in checkpoints and
    pictures is kept out with :meth:`aside`."""

    def __init__(self, flops_per_image: float, peak: float | None, world_size: int, device: torch.device):
        self.flops_per_image, self.peak, self.world, self.device = flops_per_image, peak, world_size, device
        self.peak_unreliable = False
        self.start_window()
        self.steady_flops = 0.0  # counted FLOPs (steps that report theirs: mixed-resolution ones) after window 1
        self.rate, self.mfu = 0.0, None
        self.steady = {"images": 0, "seconds": 0.0, "windows": 0, "data_wait_s": 0.0}

    def start_window(self) -> None:
        self.t_window, self.images, self.data_wait_s, self.losses = time.perf_counter(), 0, 0.0, []
        self.flops = None

    def add_step(self, images: int, loss: float | None, flops: float | None = None) -> None:
        """A step's images and loss; ``flops``: its own count where images differ in size (else per image)."""
        if flops is not None:
            self.flops = (self.flops or 0.0) + flops
        self.images += images
        if loss is not None:
            self.losses.append(loss)

    def aside(self, t_aside: float) -> None:
        """Time since ``t_aside`` (a checkpoint, a picture) is not the window's."""
        self.t_window += time.perf_counter() - t_aside

    def close_window(self) -> dict:
        """The window's figures: loss (mean of its finite steps), images_per_s, mfu, data_wait; starts the next."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self.t_window
        self.rate = self.images / dt if dt > 0 else 0.0
        self.mfu = self._mfu(self.rate) if self.flops is None else self._mfu(self.flops / dt if dt > 0 else 0.0, 1.0)
        if self.steady["windows"] > 0:
            self.steady_flops += self.flops or 0.0
            self.steady["images"] += self.images
            self.steady["seconds"] += dt
            self.steady["data_wait_s"] += self.data_wait_s
        self.steady["windows"] += 1
        data_wait = min(1.0, self.data_wait_s / dt) if dt > 0 else 0.0
        out = {"loss": float(np.mean(self.losses)) if self.losses else None, "images_per_s": round(self.rate, 2),
               "mfu": self.mfu, "data_wait": round(data_wait, 4)}
        self.start_window()
        return out

    def _mfu(self, rate: float, flops_per_item: float | None = None):
        """The share of the peak; over 1 (impossible: the peak was too low) it is returned as is and flagged in
        ``peak_unreliable``, and the displays say so instead of showing it (:func:`mfu_text`)."""
        per = self.flops_per_image if flops_per_item is None else flops_per_item
        mfu = per * rate / (self.peak * self.world) if self.peak else None
        if mfu is not None and mfu > 1.0:
            self.peak_unreliable = True
        return mfu

    def summary(self) -> tuple[float, float | None, float | None]:
        """(images/s, MFU, data wait) after the first window, else the last window's."""
        s = self.steady
        rate = s["images"] / s["seconds"] if s["seconds"] > 0 else self.rate
        wait = s["data_wait_s"] / s["seconds"] if s["seconds"] > 0 else None
        if self.steady_flops and s["seconds"] > 0:
            return rate, self._mfu(self.steady_flops / s["seconds"], 1.0), wait
        return rate, self._mfu(rate), wait
