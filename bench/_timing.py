"""The benchmarks' timing loop: arms timed in alternating rounds, their medians.

Each arm is a callable that runs one step and returns its seconds. Rounds take every arm once, the order rotated
each round (A B C, B C A, C A B, ...), so a drifting clock or a machine busy with other jobs affects every arm
alike; the medians then compare like with like.
"""
from __future__ import annotations

import statistics
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
