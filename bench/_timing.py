"""The benchmarks' timing loop: arms timed in alternating rounds, their medians.

Each arm is a callable that runs one step and returns its seconds. Rounds take every arm once, the order rotated
each round (A B C, B C A, C A B, ...), so a drifting clock or a machine busy with other jobs affects every arm
alike; the medians then compare like with like.
"""
from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path
from typing import Callable


def time_interleaved(steppers: dict, steps: int, warmup: int,
                     log: Callable[[int, str, float], None] | None = None) -> dict:
    """{arm: [seconds of each timed step]}: ``warmup`` untimed calls of each arm in turn, then ``steps`` rounds;
    ``log(round, arm, seconds)`` after each timed call, when given."""
    for st in steppers.values():
        for _ in range(warmup):
            st()
    times = {k: [] for k in steppers}
    kinds = list(steppers)
    for i in range(steps):
        for k in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
            times[k].append(steppers[k]())
            if log is not None:
                log(i, k, times[k][-1])
    return times


def medians(times: dict) -> dict:
    """{arm: median seconds} of :func:`time_interleaved`'s result."""
    return {k: statistics.median(v) for k, v in times.items()}


def compare(steppers: dict, repeats: int, warmup: int = 1) -> tuple[dict, dict]:
    """Time ``steppers`` with :func:`time_interleaved`, printing each timed step. Returns (record, medians): the
    record holds the machine (torch version, intra-op threads, architecture), each arm's median seconds
    (``step_s``, rounded) and every timed step (``all_s``), for a benchmark's JSON."""
    import torch

    width = max(map(len, steppers))
    times = time_interleaved(steppers, repeats, warmup,
                             log=lambda r, k, t: print(f"repeat {r}: {k:{width}s} {t:.3f} s", flush=True))
    med = medians(times)
    record = {"repeats": repeats, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "step_s": {k: round(v, 4) for k, v in med.items()}, "all_s": times}
    return record, med


def report(result: dict, summary_keys, out: Path | None) -> None:
    """Print ``summary_keys`` of a benchmark's result; write all of it to ``out`` (JSON) when given."""
    print(json.dumps({k: result[k] for k in summary_keys}, indent=1))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
