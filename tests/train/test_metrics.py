"""What a run reports about speed: the CPU peak MFU divides by (best of trials spread over time), and an impossible
MFU (over 100%: the peak came out too low) flagged and never shown as a number."""
from __future__ import annotations

import pytest
import torch

from mae_fast.training import metrics as metrics_mod
from mae_fast.training import pretrain as pretrain_mod
from mae_fast.training.curves import plot_pretrain


class _BusyThenIdleClock:
    """Stands in for the time module inside metrics: every timed matmul lasts ``durations[i]`` seconds."""

    def __init__(self, durations):
        self.durations, self.now, self.calls, self.sleeps = list(durations), 0.0, 0, 0

    def perf_counter(self):
        self.calls += 1
        if self.calls % 2 == 0:  # the end of a trial
            self.now += self.durations.pop(0)
        return self.now

    def sleep(self, s):
        self.sleeps += 1


def test_the_cpu_peak_is_the_best_of_trials_spread_over_time(monkeypatch):
    """A burst of trials while the machine is busy (here the first 8, 10x slower) does not set the peak: a later
    round's fastest trial does, and the rounds are a pause apart."""
    clock = _BusyThenIdleClock([1.0] * 8 + [0.1, 0.2, 0.1, 0.3] + [0.5] * 4)
    monkeypatch.setattr(metrics_mod, "time", clock)
    peak, source = metrics_mod.peak_flops_for(torch.device("cpu"), None)
    assert peak == pytest.approx(2 * 512**3 / 0.1) and "best of" in source
    assert clock.sleeps == 3 and not clock.durations  # 4 rounds of 4 trials


def test_an_impossible_mfu_is_flagged_and_the_displays_say_why(tmp_path):
    """A peak injected far too low: MFU over 100% is recorded as such, flagged, and the progress bar and curves show
    no impossible number."""
    window = metrics_mod.Throughput(flops_per_image=1e9, peak=1e6, world_size=1, device=torch.device("cpu"))
    window.add_step(64, 0.1)
    row = window.close_window()
    assert row["mfu"] > 1.0 and window.peak_unreliable
    assert metrics_mod.mfu_text(row["mfu"]) == "?(peak unreliable)" and metrics_mod.mfu_text(0.4215) == "42.1%"

    class Bar:
        def set_postfix(self, post, refresh=False):
            self.post = post

    bar = Bar()
    pretrain_mod.show_progress(bar, dict(row, lr=1e-3))
    assert bar.post["mfu"] == "?(peak unreliable)"
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "images_per_s": 50.0, "mfu": m, "data_wait": 0.0,
             "images_seen": 64 * s} for s, m in ((1, 0.4), (2, 1.379), (3, 0.45))]
    drawn = plot_pretrain({"a": rows}, tmp_path / "c.png")
    assert drawn["MFU and data wait (%)"]["a"] == ([1, 3], [40.0, 45.0])
