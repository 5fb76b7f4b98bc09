"""Exact resume of finetuning: interrupted runs, signals within an epoch, peers' signals, accumulation."""
from __future__ import annotations

import json

import pytest
import torch

from helpers.train import FT_BASE, Shapes
from mae_fast.training import checkpoint as checkpoint_io
from mae_fast.training import config as config_mod
from mae_fast.training import distributed as dist_mod
from mae_fast.training import finetune as ft


def test_interrupted_finetune_resumes_after_its_last_epoch_with_the_same_numbers(tmp_path, monkeypatch, capsys):
    """Killed during epoch 3 of 4, the run continues after epoch 2 (model, optimizer, schedule, RNG and
    history restored) and ends with the numbers of a run never interrupted; a finished run leaves no
    epoch checkpoint; a checkpoint of other settings is not resumed."""

    data = (Shapes(40), Shapes(20, seed=1), ["a", "b", "c", "d"])
    base = dict(FT_BASE, output_dir=str(tmp_path), epochs=4)
    with pytest.warns(RuntimeWarning, match="random weights"):
        straight = ft.finetune(dict(base, name="straight"), datasets=data)
    assert not (tmp_path / "straight" / "checkpoints").exists() or \
        not list((tmp_path / "straight" / "checkpoints").glob("*.pt"))

    real_evaluate, calls = ft.evaluate, []

    def killed_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(ft, "evaluate", killed_in_epoch_3)
    with pytest.warns(RuntimeWarning, match="random weights"), pytest.raises(KeyboardInterrupt):
        ft.finetune(dict(base, name="killed"), datasets=data)
    monkeypatch.setattr(ft, "evaluate", real_evaluate)
    saved = [p.name for p in (tmp_path / "killed" / "checkpoints").glob("*.pt")]
    assert saved == ["checkpoint-00000010.pt"]  # numbered by step: after epoch 1, 2 x 5 steps
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="random weights"):
        resumed = ft.finetune(dict(base, name="killed"), datasets=data)
    assert "resumed after epoch 1" in capsys.readouterr().out
    assert resumed["history"] == straight["history"] and resumed["top1"] == straight["top1"]
    assert not list((tmp_path / "killed" / "checkpoints").glob("*.pt"))

    # other settings in the same directory: a warning, and a fresh run (not a resume of the old state)
    monkeypatch.setattr(ft, "evaluate", killed_in_epoch_3)
    calls.clear()
    with pytest.warns(RuntimeWarning), pytest.raises(KeyboardInterrupt):
        ft.finetune(dict(base, name="changed"), datasets=data)
    monkeypatch.setattr(ft, "evaluate", real_evaluate)
    with pytest.warns(RuntimeWarning, match=r"other settings \(lr\): starting over"):
        fresh = ft.finetune(dict(base, name="changed", lr=1e-3), datasets=data)
    with pytest.warns(RuntimeWarning, match="random weights"):
        reference = ft.finetune(dict(base, name="reference", lr=1e-3), datasets=data)
    assert fresh["history"] == reference["history"]
    with pytest.raises(config_mod.ConfigError, match="resume must be auto or null"):
        ft.finetune(dict(base, name="bad", resume="yes"), datasets=data)


def _finetune_signal_at(monkeypatch, call: int, *signals, peer_flag: int | None = None) -> list:
    """Finetuning's loss all-reduce ([loss, SIGTERM, SIGINT]): from its ``call``-th call on, either ``signals``
    arrive right after it (during that step) or a simulated peer rank raises flag ``peer_flag``. Returns what this
    rank sent."""
    import signal


    sent = []

    def all_reduce_sum(t):
        sent.append(t.clone())
        if len(sent) == call:
            for sig in signals:
                signal.raise_signal(sig)
        if peer_flag is not None and len(sent) >= call:
            t[peer_flag] += 1.0
        return t

    monkeypatch.setattr(dist_mod, "all_reduce_sum", all_reduce_sum)
    return sent


@pytest.mark.parametrize("signame,extra", [("SIGINT", {}), ("SIGTERM", {}),
                                           ("SIGINT", {"mixup": 0.8, "cutmix": 1.0})])
def test_a_signal_stops_finetuning_within_its_epoch_and_resume_is_exact(tmp_path, monkeypatch, signame, extra):
    """Ctrl-C or SIGTERM during step 7 of 15 (epoch 1, 5 steps an epoch): that step finishes, a checkpoint of it
    is written and TrainingInterrupted raised, not at the next epoch's end; resume=auto continues with the 3rd
    batch of epoch 1 (drop-path RNG and mixup / cutmix draws included) and ends with the uninterrupted run's
    numbers, bit for bit."""
    import signal


    sig = getattr(signal, signame)
    data = (Shapes(40), Shapes(20, seed=1), ["a", "b", "c", "d"])
    base = dict(FT_BASE, output_dir=str(tmp_path), **extra)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.warns(RuntimeWarning, match="random weights"):
        straight = ft.finetune(dict(base, name="straight"), datasets=data)
    sent = _finetune_signal_at(monkeypatch, 7, sig)
    with pytest.warns(RuntimeWarning, match="random weights"), pytest.raises(ft.TrainingInterrupted) as info:
        ft.finetune(dict(base, name="sig"), datasets=data)
    assert info.value.signum == sig and info.value.step == 8 and len(sent) == 8
    assert f"signal {signame} in epoch 1 after 3 of its 5 steps (step 8/15)" in str(info.value)
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are put back
    saved = checkpoint_io.list_checkpoints(tmp_path / "sig")
    assert [s for s, _ in saved] == [8] and str(saved[0][1]) == str(info.value.checkpoint)
    state = torch.load(saved[0][1], weights_only=False)
    assert state["epoch"] == 1 and state["batches_done"] == 3 and len(state["history"]) == 1
    assert not (tmp_path / "sig" / "results.json").exists()
    monkeypatch.undo()
    with pytest.warns(RuntimeWarning, match="random weights"):
        resumed = ft.finetune(dict(base, name="sig"), datasets=data)
    assert resumed["history"] == straight["history"] and resumed["top1"] == straight["top1"]
    assert not checkpoint_io.list_checkpoints(tmp_path / "sig")


def test_a_signal_in_finetunings_last_step_evaluates_on_resume(tmp_path, monkeypatch, capsys):
    """Stopped after an epoch's last step, before its evaluation: the resumed run trains nothing more in that
    epoch, evaluates it and goes on; the CLI exits as the signal would have."""
    import signal


    data = (Shapes(40), Shapes(20, seed=1), ["a", "b", "c", "d"])
    base = dict(FT_BASE, output_dir=str(tmp_path), epochs=2)
    with pytest.warns(RuntimeWarning, match="random weights"):
        straight = ft.finetune(dict(base, name="straight"), datasets=data)
    _finetune_signal_at(monkeypatch, 4, signal.SIGINT)
    with pytest.warns(RuntimeWarning, match="random weights"), pytest.raises(ft.TrainingInterrupted) as info:
        ft.finetune(dict(base, name="edge"), datasets=data)
    assert info.value.step == 5 and "in epoch 0 after 5 of its 5 steps" in str(info.value)
    monkeypatch.undo()
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="random weights"):
        resumed = ft.finetune(dict(base, name="edge"), datasets=data)
    assert "resumed in epoch 0 after 5 of its 5 steps" in capsys.readouterr().out
    assert resumed["history"] == straight["history"]

    monkeypatch.setattr(ft, "finetune", lambda cfg: (_ for _ in ()).throw(
        ft.TrainingInterrupted("signal SIGTERM in epoch 0", signal.SIGTERM, 3, None)))
    assert ft.main(["epochs=1"], mode="finetune") == 128 + signal.SIGTERM
    assert "mae-fast finetune: signal SIGTERM in epoch 0" in capsys.readouterr().err


def test_a_signal_to_one_finetuning_rank_stops_every_rank(tmp_path, monkeypatch):
    """A simulated other rank's SIGTERM flag from step 4 on: this rank (no signal of its own) stops at step 4
    with the same checkpoint and exception; a signal after the last step still stops, once the run is saved."""
    import signal


    data = (Shapes(40), Shapes(20, seed=1), ["a", "b", "c", "d"])
    base = dict(FT_BASE, output_dir=str(tmp_path), epochs=2)
    sent = _finetune_signal_at(monkeypatch, 4, peer_flag=1)
    with pytest.warns(RuntimeWarning, match="random weights"), pytest.raises(ft.TrainingInterrupted) as info:
        ft.finetune(dict(base, name="peer"), datasets=data)
    assert info.value.signum == signal.SIGTERM and info.value.step == 4
    assert [s for s, _ in checkpoint_io.list_checkpoints(tmp_path / "peer")] == [4]
    assert all(t.numel() == 3 and not t[1:].any() for t in sent)  # this rank's own flags stayed down

    real_evaluate, calls = ft.evaluate, []

    def sigint_in_last_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    monkeypatch.undo()
    monkeypatch.setattr(ft, "evaluate", sigint_in_last_evaluation)
    with pytest.warns(RuntimeWarning, match="random weights"), \
            pytest.raises(ft.TrainingInterrupted, match="finished at step 10/10, then SIGINT"):
        ft.finetune(dict(base, name="last"), datasets=data)
    assert json.loads((tmp_path / "last" / "results.json").read_text())["epochs"] == 2


def test_finetune_gradient_accumulation_gives_one_batchs_step(tmp_path, monkeypatch, capsys):
    """accum_steps=2 (two micro-batches of 4, one optimizer step) follows the run of whole batches of 8 to float
    rounding: the same gradient, so a run stopped with whole batches resumes with micro-batches (a smaller GPU).
    The memory plan is made for the micro-batch; a batch that does not split into the micro-steps is refused
    before anything is built."""
    import signal


    planned, trained_on = [], []
    real_forward = ft.Classifier.forward
    monkeypatch.setattr(ft, "fit_memory_budget", lambda cfg, spec, n, lp, batch, *a: planned.append(batch))

    def forward(self, x):
        if self.training:
            trained_on.append(len(x))
        return real_forward(self, x)

    monkeypatch.setattr(ft.Classifier, "forward", forward)
    data = (Shapes(44), Shapes(20, seed=1), ["a", "b", "c", "d"])  # 44 = 5 batches of 8 and a last of 4
    base = dict(FT_BASE, output_dir=str(tmp_path), epochs=2, drop_path=0.0)  # drop path draws per forward
    with pytest.warns(RuntimeWarning, match="random weights"):
        whole = ft.finetune(dict(base, name="whole"), datasets=data)
        assert trained_on == ([8] * 5 + [4]) * 2
        trained_on.clear()
        accum = ft.finetune(dict(base, name="accum", accum_steps=2), datasets=data)
        assert trained_on == ([4] * 10 + [2, 2]) * 2
    assert planned == [8, 4]
    _finetune_signal_at(monkeypatch, 8, signal.SIGTERM)
    with pytest.warns(RuntimeWarning, match="random weights"), pytest.raises(ft.TrainingInterrupted):
        ft.finetune(dict(base, name="moved"), datasets=data)
    monkeypatch.undo()
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="random weights"):
        moved = ft.finetune(dict(base, name="moved", accum_steps=2), datasets=data)
    assert "resumed in epoch 1 after 3 of its 6 steps" in capsys.readouterr().out
    for a, *others in zip(whole["history"], accum["history"], moved["history"]):
        for b in others:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4) and b["top1"] == a["top1"]
    with pytest.raises(config_mod.ConfigError, match="batch_size 8 must be a multiple of the 1 processes x 3 "
                                                     "accumulation steps"):
        ft.finetune(dict(base, name="bad", accum_steps=3), datasets=data)
    with pytest.raises(config_mod.ConfigError, match="accum_steps >= 1"):
        ft.finetune(dict(base, name="bad", accum_steps=0), datasets=data)
