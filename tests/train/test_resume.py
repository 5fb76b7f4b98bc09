"""Exact resume of pretraining: kills, signals, time limits, damaged checkpoints, what a resume restores, streams."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mae_fast
from helpers.train import TINY_MODEL, assert_same_optimizer, assert_same_state, ckpt, clocked, params, rows_of, tiny
from mae_fast.models.checkpoint import CheckpointError
from mae_fast.training import checkpoint as checkpoint_io
from mae_fast.training import config as config_mod
from mae_fast.training import distributed as dist_mod
from mae_fast.training import pretrain as pretrain_mod
from mae_fast.training.pretrain import NonFiniteLossError, pretrain


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run of ``tiny()`` (8 steps) that every interrupted and resumed one must end equal to."""
    return pretrain(tiny(tmp_path_factory.mktemp("straight"), name="straight"))


def test_kill_and_resume_is_bit_exact(tmp_path, straight):
    first = pretrain(tiny(tmp_path, name="killed", stop_at_step=5))
    assert first["steps"] == 5 and first["stopped"].startswith("stop_at_step")
    ckpts = [s for s, _ in checkpoint_io.list_checkpoints(first["run_dir"])]
    assert ckpts == [5, 3]
    resumed = pretrain(tiny(tmp_path, name="killed", resume="auto"))
    assert resumed["steps"] == 8 and resumed["images_seen"] == straight["images_seen"]
    a = torch.load(straight["checkpoint"], weights_only=False)
    b = torch.load(resumed["checkpoint"], weights_only=False)
    assert_same_state(a["model"], b["model"])
    assert_same_optimizer(a["optimizer"], b["optimizer"])
    assert a["loss"] == b["loss"]
    assert b["step"] == 8 and (b["epoch"], b["index_in_epoch"]) == divmod(8, 48 // 8)


class _SignalAfterSteps:
    """Stands in for the time module inside pretrain: its debug per-step sleep sends ``signals`` to this process
    after step ``after`` (the handler runs before the next step starts), so the stop is at a known step."""

    def __init__(self, after: int, *signals):
        import time

        self._time, self.after, self.signals, self.calls = time, after, signals, 0

    def __getattr__(self, name):
        return getattr(self._time, name)

    def sleep(self, seconds):
        import signal

        self.calls += 1
        if self.calls == self.after:
            for sig in self.signals:
                signal.raise_signal(sig)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_at_the_end_of_a_step_with_a_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, signame,
                                                                                      straight):
    """Ctrl-C or SIGTERM (SLURM's time limit, preemption) during training: the step under way (the 4th; the
    signal came after the 3rd, between checkpoints) finishes, a checkpoint of it is written, and the run
    raises TrainingInterrupted; resume=auto then ends where an uninterrupted run ends, bit for bit."""
    import signal

    from mae_fast.training import pretrain as pretrain_mod

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(pretrain_mod, "time", _SignalAfterSteps(3, getattr(signal, signame)))
    with pytest.raises(pretrain_mod.TrainingInterrupted) as info:
        pretrain(tiny(tmp_path, name="sig", debug_step_sleep_s=1e-3))
    assert info.value.signum == getattr(signal, signame) and info.value.step == 4
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are put back
    run_dir = tmp_path / "sig"
    assert [s for s, _ in checkpoint_io.list_checkpoints(run_dir)][0] == 4
    assert json.loads((run_dir / "result.json").read_text())["stopped"] == f"signal {signame}"
    monkeypatch.undo()
    resumed = pretrain(tiny(tmp_path, name="sig", resume="auto"))
    assert resumed["steps"] == 8 and resumed["stopped"] == "finished"
    a = torch.load(straight["checkpoint"], weights_only=False)
    b = torch.load(resumed["checkpoint"], weights_only=False)
    assert_same_state(a["model"], b["model"])
    assert_same_optimizer(a["optimizer"], b["optimizer"])


def test_a_signal_in_the_last_step_is_still_honoured(tmp_path, monkeypatch):
    """After the last step's all-reduce there is no step left to stop at: the run ends and is saved as usual, then
    the signal is raised all the same (a sweep or script that got Ctrl-C must not go on to its next stage)."""
    import signal

    from mae_fast.training import pretrain as pretrain_mod

    monkeypatch.setattr(pretrain_mod, "time", _SignalAfterSteps(8, signal.SIGINT))
    with pytest.raises(pretrain_mod.TrainingInterrupted, match="finished at step 8/8, then SIGINT") as info:
        pretrain(tiny(tmp_path, name="last", debug_step_sleep_s=1e-3))
    assert info.value.step == 8 and [s for s, _ in checkpoint_io.list_checkpoints(tmp_path / "last")][0] == 8


def test_a_second_signal_stops_at_once_with_a_checkpoint_of_the_last_step_and_the_cli_exits_as_the_signal(
        tmp_path, monkeypatch, capsys, straight):
    """Two signals between steps: the second stops at once, a checkpoint of the finished step is written (the
    next periodic one was due at step 3) and resuming from it ends as the uninterrupted run."""
    import signal

    from mae_fast.training import pretrain as pretrain_mod

    monkeypatch.setattr(pretrain_mod, "time", _SignalAfterSteps(2, signal.SIGINT, signal.SIGINT))
    with pytest.raises(pretrain_mod.TrainingInterrupted,
                       match=r"second SIGINT: stopped at once at step 2/8; checkpoint .* of step 2") as info:
        pretrain(tiny(tmp_path, name="twice", debug_step_sleep_s=1e-3))
    assert info.value.step == 2 and info.value.signum == signal.SIGINT
    assert [s for s, _ in checkpoint_io.list_checkpoints(tmp_path / "twice")] == [2]
    monkeypatch.undo()
    resumed = pretrain(tiny(tmp_path, name="twice", resume="auto"))
    assert_same_state(params(straight["checkpoint"]), params(resumed["checkpoint"]))
    monkeypatch.setattr(pretrain_mod, "time", _SignalAfterSteps(2, signal.SIGTERM))
    args = [f"{k}={json.dumps(v)}" for k, v in tiny(tmp_path, name="cli", debug_step_sleep_s=1e-3).items()
            if k != "recipe"]
    assert pretrain_mod.main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "signal SIGTERM at step 3/8" in err and "resume=auto" in err


def test_metrics_after_a_resume_read_as_one_run(tmp_path, straight):
    """Resuming from a checkpoint older than the last logged row (here step 3 after rows up to 5) drops the rows
    after it first: every step once, with the uninterrupted run's losses."""
    first = pretrain(tiny(tmp_path, name="m", stop_at_step=5))
    assert [r["step"] for r in rows_of(first)] == [1, 2, 3, 4, 5]
    older = dict(checkpoint_io.list_checkpoints(first["run_dir"]))[3]
    resumed = pretrain(tiny(tmp_path, name="m", resume=str(older)))
    rows = rows_of(resumed)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_of(straight)]
    assert not list(Path(first["run_dir"]).glob(".metrics.jsonl.*"))  # the temporary file was renamed


def _peer_flag(monkeypatch, index: int, from_call: int) -> list:
    """Simulates another rank raising flag ``index`` of the loss all-reduce ([loss, over time, SIGTERM, SIGINT])
    from its ``from_call``-th step on; returns what this rank itself sent."""

    calls = []

    def all_reduce_sum(t):
        calls.append(t.clone())
        if t.numel() == 4 and len(calls) >= from_call:
            t[index] += 1.0  # the other rank's flag
        return t

    monkeypatch.setattr(dist_mod, "all_reduce_sum", all_reduce_sum)
    return calls


def test_a_rank_past_the_time_limit_stops_every_rank(tmp_path, monkeypatch):
    """The over-time flag travels in the loss all-reduce: here a simulated other rank reports being past the
    limit from step 3 on, and this process (nowhere near it) stops there too, as a rank of that run would."""
    calls = _peer_flag(monkeypatch, 1, 3)
    res = pretrain(tiny(tmp_path, name="peer", time_limit_s=1e6))
    assert res["stopped"] == "time_limit_s=1000000.0" and res["steps"] == 3
    assert all(c.numel() == 4 and not c[1:].any() for c in calls)  # this rank's own flags stayed down


def test_a_signal_to_one_rank_stops_every_rank(tmp_path, monkeypatch):
    """torchrun or SLURM may signal one rank first: its SIGTERM flag stops this rank at the same step, with the
    same checkpoint and exception."""
    import signal

    from mae_fast.training import pretrain as pretrain_mod

    calls = _peer_flag(monkeypatch, 2, 5)
    with pytest.raises(pretrain_mod.TrainingInterrupted) as info:
        pretrain(tiny(tmp_path, name="peer_term"))
    assert info.value.signum == signal.SIGTERM and info.value.step == 5
    assert [s for s, _ in checkpoint_io.list_checkpoints(tmp_path / "peer_term")][0] == 5
    assert all(not c[1:].any() for c in calls)


def test_resume_skips_a_corrupt_newest_checkpoint_and_stays_exact(tmp_path, straight):
    first = pretrain(tiny(tmp_path, name="run", stop_at_step=6))
    newest = checkpoint_io.list_checkpoints(first["run_dir"])[0][1]
    assert newest.name == "checkpoint-00000006.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # damage in the middle: digest catches it
    newest.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint"):
        resumed = pretrain(tiny(tmp_path, name="run", resume="auto"))
    assert_same_state(params(straight["checkpoint"]), params(resumed["checkpoint"]))


def test_time_limit_counts_training_time_and_the_wall_time_survives_a_resume(tmp_path, clock):
    """time_limit_s=0.9: step k's all-reduce comes 0.4 + (k + 1) x 0.08 + k x 0.25 s into training, past 0.9 first
    at step 2, so the run stops after 3 steps, with a checkpoint of step 3 (a 5 s start-up before them does not
    count). A run stopped at step 4 and resumed (time between the runs does not count) ends with the wall time of
    one that was not."""
    real_peak = pretrain_mod.peak_flops_for

    def slow_peak(*a):  # a slow start-up (before the first step) is not training time
        clock.sleep(5.0)
        return real_peak(*a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain_mod, "peak_flops_for", slow_peak)
        res = pretrain(clocked(tmp_path, name="limit", time_limit_s=0.9))
    assert res["steps"] == 3 and res["stopped"] == "time_limit_s=0.9" and res["startup_s"] == pytest.approx(5.0)
    saved = ckpt(res["checkpoint"])  # a checkpoint of the step it ran out at
    assert saved["step"] == 3 and saved["images_seen"] == 3 * 8
    straight = pretrain(clocked(tmp_path, name="straight"))
    pretrain(clocked(tmp_path, name="resumed", stop_at_step=4))
    clock.sleep(100.0)  # between the runs: not training time
    resumed = pretrain(clocked(tmp_path, name="resumed", resume="auto"))
    assert resumed["steps"] == 6
    assert ckpt(resumed["checkpoint"])["wall_time_s"] == pytest.approx(ckpt(straight["checkpoint"])["wall_time_s"],
                                                                         rel=1e-9)
    assert rows_of(resumed)[-1]["time_s"] == rows_of(straight)[-1]["time_s"]


def test_non_finite_run_limit_holds_across_a_resume(tmp_path):
    """Two NaN steps before a stop and one after the resume are three in a row: max_bad_steps=3 stops the resumed
    run at once; the skipped steps of before the stop are counted in the resumed run's total."""
    first = pretrain(tiny(tmp_path, name="r", steps=8, stop_at_step=4, debug_nan_steps=[2, 3], max_bad_steps=3))
    assert first["skipped_steps"] == 2
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row .* at step 5"):
        pretrain(tiny(tmp_path, name="r", steps=8, resume="auto", debug_nan_steps=[2, 3, 4], max_bad_steps=3))
    state = checkpoint_io.load_checkpoint(tmp_path / "r" / "checkpoints" / "checkpoint-00000005.pt")
    assert state["skipped_steps"] == 3 and state["bad_in_a_row"] == 3
    # a run that was only one NaN into its streak goes on, and keeps counting its skipped steps
    pretrain(tiny(tmp_path, name="s", steps=6, stop_at_step=3, debug_nan_steps=[1]))
    res = pretrain(tiny(tmp_path, name="s", steps=6, resume="auto", debug_nan_steps=[4], max_bad_steps=2))
    assert res["steps"] == 6 and res["skipped_steps"] == 2


def _rng_states_equal(a: dict, b: dict) -> bool:
    return (torch.equal(a["torch"], b["torch"]) and a["numpy"][0] == b["numpy"][0]
            and np.array_equal(a["numpy"][1], b["numpy"][1]) and a["numpy"][2:] == b["numpy"][2:]
            and a["python"] == b["python"])


def test_a_resumed_run_goes_on_with_the_restored_rng_states(tmp_path):
    """The torch, numpy and python RNG states in the final checkpoint of a stopped-and-resumed run are those of an
    uninterrupted run, although the process's numpy / python generators were seeded otherwise before the resume.
    (Before the fix the CPU's MFU peak was measured on a matrix drawn from the global torch generator after the
    restore, so the resumed run's torch state was one 1024x1024 draw ahead.)"""
    np.random.seed(11)
    random.seed(11)
    straight = pretrain(tiny(tmp_path, name="s", steps=5, peak_flops=None))  # measured on the CPU
    np.random.seed(11)
    random.seed(11)
    pretrain(tiny(tmp_path, name="r", steps=5, stop_at_step=2, peak_flops=None))
    np.random.seed(12)
    random.seed(12)
    torch.manual_seed(12)
    resumed = pretrain(tiny(tmp_path, name="r", steps=5, resume="auto", peak_flops=None))
    a, b = ckpt(straight["checkpoint"])["rng"], ckpt(resumed["checkpoint"])["rng"]
    assert len(a) == len(b) == 1 and _rng_states_equal(a[0], b[0])


def test_fp16_resume_restores_the_grad_scaler(tmp_path):
    """precision=fp16 (a GradScaler, on the CPU too): the scaler's state (scale, growth tracker) in the final
    checkpoint of a resumed run is that of an uninterrupted one, and so are the weights."""
    straight = pretrain(tiny(tmp_path, name="s", steps=4, precision="fp16"))
    pretrain(tiny(tmp_path, name="r", steps=4, precision="fp16", stop_at_step=2))
    resumed = pretrain(tiny(tmp_path, name="r", steps=4, precision="fp16", resume="auto"))
    a, b = ckpt(straight["checkpoint"]), ckpt(resumed["checkpoint"])
    assert a["scaler"]["_growth_tracker"] == 4 - a["skipped_steps"] and a["scaler"] == b["scaler"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_images_seen_carries_over_a_resume_with_another_batch_size(tmp_path):
    pretrain(tiny(tmp_path, name="r", steps=6, stop_at_step=3))
    with pytest.warns(RuntimeWarning, match=r"different batch_size \(8 -> 16\)"):
        res = pretrain(tiny(tmp_path, name="r", steps=6, batch_size=16, resume="auto"))
    assert res["images_seen"] == 3 * 8 + 3 * 16


def test_a_weights_only_checkpoint_is_refused_as_resume(tmp_path):
    path = tmp_path / "weights.pt"
    m = mae_fast.create_model("mae_vit_demo_patch8", img_size=32, **TINY_MODEL)
    torch.save({"model": m.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"holds weights only .*: start from it with init_from=.*weights\.pt"):
        pretrain(tiny(tmp_path, resume=str(path)))


def test_fresh_runs_never_reuse_a_run_directory_with_checkpoints_and_resume_uses_the_named_one(tmp_path):
    dirs = [pretrain(tiny(tmp_path, name="x", steps=1))["run_dir"] for _ in range(3)]
    assert [Path(d).name for d in dirs] == ["x", "x-2", "x-3"]
    with pytest.warns(RuntimeWarning, match=r"different steps \(1 -> 2\)"):
        assert Path(pretrain(tiny(tmp_path, name="x", steps=2, resume="auto"))["run_dir"]).name == "x"


def test_a_run_resumed_from_an_earlier_checkpoint_keeps_its_own_checkpoints(tmp_path):
    first = pretrain(tiny(tmp_path, name="x", steps=6, checkpoint_every=1, keep_checkpoints=6))
    back = Path(first["run_dir"]) / "checkpoints" / "checkpoint-00000002.pt"
    with pytest.raises(NonFiniteLossError) as e:  # going back to step 2 (keeping 2), then stopped on NaNs at step 4
        pretrain(tiny(tmp_path, name="x", steps=6, checkpoint_every=1, keep_checkpoints=2, debug_nan_steps=[2, 3],
                      max_bad_steps=2, resume=str(back)))
    saved = Path(str(e.value).split("State saved to inspect: ")[1])
    assert saved.name == "checkpoint-00000004.pt" and checkpoint_io.load_checkpoint(saved)["note"] == "non-finite"
    # the first run's steps 3-6 were set aside (not deleted) when it went back to step 2: resume=auto now goes on
    # with the new continuation, not with the abandoned one's step 6
    assert [s for s, _ in checkpoint_io.list_checkpoints(first["run_dir"])] == [4, 3]
    aside = Path(first["run_dir"]) / "checkpoints" / "set-aside-after-step-2"
    assert sorted(p.name for p in aside.iterdir()) == [f"checkpoint-{s:08d}.pt{x}" for s in (3, 4, 5, 6)
                                                        for x in ("", ".sha256")]
    assert checkpoint_io.load_checkpoint(aside / "checkpoint-00000006.pt")["step"] == 6  # intact, digest and all
    found, _ = checkpoint_io.latest_valid_checkpoint(first["run_dir"])
    assert found == saved


def test_resume_with_another_schedule_warns(tmp_path):
    pretrain(tiny(tmp_path, name="w", steps=3))
    with pytest.warns(RuntimeWarning, match=r"different steps \(3 -> 5\)"):
        res = pretrain(tiny(tmp_path, name="w", steps=5, resume="auto"))
    assert res["steps"] == 5


class Stream(torch.utils.data.IterableDataset):
    """A deterministic per-epoch stream of 20 images (like shards with set_epoch), no len()."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(1000 + self.epoch)
        for _ in range(20):
            yield torch.randn(3, 32, 32, generator=g)


def test_streaming_source_resumes_at_its_position(tmp_path):
    kw = dict(steps=7, warmup_steps=1, batch_size=6, checkpoint_every=2)
    with pytest.raises(config_mod.ConfigError, match="stream of unknown length"):
        pretrain(tiny(tmp_path, name="x", steps=None), dataset=Stream())
    straight = pretrain(tiny(tmp_path, name="s", **kw), dataset=Stream())
    pretrain(tiny(tmp_path, name="r", stop_at_step=4, **kw), dataset=Stream())
    resumed = pretrain(tiny(tmp_path, name="r", resume="auto", **kw), dataset=Stream())
    a, b = (torch.load(r["checkpoint"], weights_only=False) for r in (straight, resumed))
    assert a["stream_positions"] == b["stream_positions"] == [(2, 1)]  # 3 batches of 6 per epoch
    assert_same_state(a["model"], b["model"])


def test_sigkilled_run_resumes_bit_exactly_with_workers(tmp_path, straight):
    """kill -9 of a real training process (``mae-fast pretrain``), then resume=auto (with 2 DataLoader workers this
    time): the final weights equal an uninterrupted in-process run's."""
    args = ["name=killed", f"output_dir={tmp_path}", "data_source=synthetic", "synthetic_size=48", "img_size=32",
            "model_kwargs={embed_dim: 48, depth: 2, num_heads: 2, decoder_embed_dim: 32, decoder_depth: 1, "
            "decoder_num_heads: 2}", "batch_size=8", "steps=8", "warmup_steps=2", "lr=2e-3", "checkpoint_every=2",
            "log_every=1", "vis_every=0", "vis_images=2", "progress=false"]
    out = tmp_path / "stdout.txt"
    with open(out, "w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "mae_fast.cli", "pretrain", *args, "debug_step_sleep_s=0.5"],
                                stdout=stdout, stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    ckpt4 = tmp_path / "killed" / "checkpoints" / "checkpoint-00000004.pt"
    try:
        import time

        deadline = time.time() + 240
        while not ckpt4.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert ckpt4.exists() and proc.poll() is None, "the run ended before it could be killed"
    finally:
        proc.kill()
        proc.wait()
    steps_left = [s for s, _ in checkpoint_io.list_checkpoints(tmp_path / "killed")]
    assert max(steps_left) < 8 and "run dir:" in out.read_text()  # the command line started the run
    resumed = pretrain(tiny(tmp_path, name="killed", checkpoint_every=2, resume="auto", num_workers=2))
    assert_same_state(params(straight["checkpoint"]), params(resumed["checkpoint"]))


def test_resuming_a_checkpoint_of_another_model_says_so(tmp_path):
    """Before: a RuntimeError traceback from load_state_dict listing every unexpected key."""
    ckpt = pretrain(tiny(tmp_path, steps=1))["checkpoint"]
    with pytest.raises(CheckpointError, match=f"cannot resume from {ckpt}: it does not fit this model "
                                              r"\(made with a different model_kwargs"):
        pretrain(tiny(tmp_path, steps=2, resume=ckpt, model_kwargs=dict(TINY_MODEL, depth=1)))
    assert torch.load(ckpt, weights_only=False)["step"] == 1  # left as it was
