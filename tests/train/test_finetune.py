"""Finetuning and the linear probe: the optimizer steps and schedule against MAE's formulas, losses, mixing,
evaluation, the classifier, encoders from checkpoints, memory budget, configs and data errors."""
from __future__ import annotations

import dataclasses
import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import mae_fast
from helpers.train import FT_BASE, Shapes, mae_lr, mae_param_groups_lrd, tiny, write_pngs
from mae_fast.data import build_labelled_datasets
from mae_fast.optim import LARS, layer_decay_groups
from mae_fast.training import checkpoint as checkpoint_io
from mae_fast.training import config as config_mod
from mae_fast.training import finetune as ft
from mae_fast.training.config import FinetuneConfig
from mae_fast.training.finetune import finetune
from mae_fast.training.pretrain import pretrain


class Labelled(torch.utils.data.Dataset):
    """Random images whose class shows as a brighter channel stripe (5 classes by default)."""

    def __init__(self, n, num_classes=5, size=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g) * 0.5
        self.y = torch.randint(0, num_classes, (n,), generator=g)
        for i in range(n):
            c = int(self.y[i])
            self.x[i, c % 3, :, (c * size) // num_classes:((c + 1) * size) // num_classes] += 1.0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


CLASSES = ["a", "b", "c", "d", "e"]


TINY = dict(embed_dim=32, num_heads=2, depth=2)  # the demo model made small: fast on the CPU


BASE = dict(checkpoint=None, img_size=16, model_kwargs=TINY, progress=False, memory_budget_gib=None, drop_path=0.0, pool="mean",
            batch_size=8, epochs=1, warmup_epochs=0.0)


def _run(tmp_path, monkeypatch, data, **kw):
    """finetune() with the given settings; returns (result, the classifier it trained)."""
    built = []
    real_build = ft.build_classifier

    def build(*a, **k):
        out = real_build(*a, **k)
        built.append(out[0])
        return out

    monkeypatch.setattr(ft, "build_classifier", build)
    with pytest.warns(RuntimeWarning, match="random weights"):
        res = ft.finetune(dict(BASE, output_dir=str(tmp_path), **kw), datasets=data)
    monkeypatch.setattr(ft, "build_classifier", real_build)
    return res, built[0]


def _record_steps(monkeypatch, cls) -> list:
    """Every step() of optimizer class ``cls``: a copy of its param groups (params as ids) at that step."""
    seen, real_step = [], cls.step

    def step(self, *a, **k):
        seen.append([{**{k_: v for k_, v in g.items() if k_ != "params"}, "params": [id(p) for p in g["params"]]}
                     for g in self.param_groups])
        return real_step(self, *a, **k)

    monkeypatch.setattr(cls, "step", step)
    return seen


def test_finetune_adamw_follows_maes_schedule_times_layer_scale(tmp_path, monkeypatch):
    """29 images in batches of 8 (the last 5): 4 steps an epoch, 3 epochs, warmup 1.75 epochs = 7 steps. Every
    step, each AdamW group's lr is MAE's lr(step / 5) x its layer's scale, with peak lr = 1e-3 (the finetuning
    default base_lr) x 8 / 256, weight decay 0.05 (the default) where MAE decays, betas (0.9, 0.999)."""
    seen = _record_steps(monkeypatch, torch.optim.AdamW)
    data = (Labelled(29), Labelled(11, seed=1), CLASSES)
    res, model = _run(tmp_path, monkeypatch, data, mode="finetune", epochs=3, warmup_epochs=1.75, min_lr=3e-6,
                      layer_decay=0.6, model_kwargs=dict(TINY, depth=3))
    want = mae_param_groups_lrd(model, 0.05, 0.6)
    names = {id(p): n for n, p in model.named_parameters()}
    peak = 1e-3 * 8 / 256
    assert len(seen) == 12
    for step, groups in enumerate(seen):
        base = mae_lr(step / 4, peak, 3e-6, 1.75, 3)
        assert sum(len(g["params"]) for g in groups) == len(want)
        for g in groups:
            assert g["betas"] == (0.9, 0.999)
            for pid in g["params"]:
                scale, wd = want[names[pid]]
                assert g["lr"] == pytest.approx(base * scale, rel=1e-9, abs=1e-15), (step, names[pid])
                assert g["weight_decay"] == wd
    assert [h["lr"] for h in res["history"]] == pytest.approx([mae_lr(s / 4, peak, 3e-6, 1.75, 3) for s in (3, 7, 11)])


def test_finetune_fractional_warmup_is_maes(tmp_path, monkeypatch):
    """warmup_epochs = 0.6 with 4 steps an epoch is 2.4 steps: MAE's lr at the fractional epoch step / 4, not a warmup
    rounded to 2 steps."""
    seen = _record_steps(monkeypatch, torch.optim.AdamW)
    data = (Labelled(29), Labelled(11, seed=1), CLASSES)
    _run(tmp_path, monkeypatch, data, mode="finetune", epochs=2, warmup_epochs=0.6, min_lr=3e-6, layer_decay=1.0)
    peak = 1e-3 * 8 / 256
    assert len(seen) == 8
    for step, groups in enumerate(seen):
        for g in groups:
            assert g["lr"] == pytest.approx(mae_lr(step / 4, peak, 3e-6, 0.6, 2), rel=1e-9, abs=1e-15), step
    assert seen[2][0]["lr"] == pytest.approx(peak * 2 / 2.4, rel=1e-9)  # still warming up at step 2


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_linprobe_optimizer_settings_and_schedule(tmp_path, monkeypatch, optimizer):
    """The probe trains the head only (weight and bias), with momentum 0.9, the given weight decay (default 0),
    peak lr = 0.1 (the probe's default base_lr) x batch / 256 and MAE's warmup + cosine to min_lr."""

    cls = LARS if optimizer == "lars" else torch.optim.SGD
    seen = _record_steps(monkeypatch, cls)
    data = (Labelled(29), Labelled(9, seed=2), CLASSES)
    kw = dict(mode="linprobe", epochs=2, batch_size=10, warmup_epochs=2 / 3, min_lr=1e-4, linprobe_optimizer=optimizer)
    if optimizer == "lars":
        kw["weight_decay"] = 0.02
    res, model = _run(tmp_path, monkeypatch, data, **kw)
    head = {id(model.head.weight), id(model.head.bias)}
    peak = 0.1 * 10 / 256
    assert len(seen) == 6  # 29 images in batches of 10: 10, 10, 9
    for step, groups in enumerate(seen):
        assert {p for g in groups for p in g["params"]} == head
        for g in groups:
            assert g["momentum"] == 0.9
            assert g["weight_decay"] == (0.02 if optimizer == "lars" else 0.0)
            assert g["lr"] == pytest.approx(mae_lr(step / 3, peak, 1e-4, 2 / 3, 2), rel=1e-9, abs=1e-15)
    if optimizer == "lars":
        assert g["trust_coefficient"] == 0.001  # MAE's LARS default
    else:
        assert g["dampening"] == 0 and not g["nesterov"]


def test_sgd_probe_decays_the_weight_not_the_bias(tmp_path, monkeypatch):
    """linprobe_optimizer=sgd with weight_decay > 0 decays the head's weight only, as LARS (MAE's probe) and the
    finetuning groups leave 1-D parameters undecayed."""
    seen = _record_steps(monkeypatch, torch.optim.SGD)
    data = (Labelled(29), Labelled(9, seed=2), CLASSES)
    _, model = _run(tmp_path, monkeypatch, data, mode="linprobe", epochs=1, batch_size=10, warmup_epochs=0.0,
                    linprobe_optimizer="sgd", weight_decay=0.03)
    decay = {p: g["weight_decay"] for g in seen[0] for p in g["params"]}
    assert decay == {id(model.head.weight): 0.03, id(model.head.bias): 0.0}


def test_mixer_gets_the_configured_alphas_and_smoothing(tmp_path, monkeypatch):
    """mixup / cutmix alphas reach timm's Mixup as configured; finetuning's soft targets carry label_smoothing, the
    probe's none (its loss is plain cross-entropy)."""
    made = []
    real = ft.BatchMixer

    class Recording(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(ft, "BatchMixer", Recording)
    data = (Labelled(10), Labelled(4, seed=1), CLASSES)
    for mode in ("finetune", "linprobe"):
        _run(tmp_path, monkeypatch, data, mode=mode, name=mode, mixup=0.7, cutmix=0.3, label_smoothing=0.15, lr=0.0)
    ftm, lpm = made
    assert (ftm.mix.mixup_alpha, ftm.mix.cutmix_alpha, ftm.mix.label_smoothing) == (0.7, 0.3, 0.15)
    assert (lpm.mix.mixup_alpha, lpm.mix.cutmix_alpha, lpm.mix.label_smoothing) == (0.7, 0.3, 0.0)
    assert ftm.num_classes == 5


def _smoothed_ce(logits: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    logp = torch.log_softmax(logits.double(), 1)
    nll = -logp[torch.arange(len(y)), y]
    return float(((1 - eps) * nll - eps * logp.mean(1)).mean())


def test_finetune_loss_is_label_smoothed_cross_entropy(tmp_path, monkeypatch):
    """lr=0 (the weights stay put), one batch of all 13 images, train = val: the epoch's train loss is the
    label-smoothed cross-entropy (eps 0.3, fp64 here) of the final model's logits, val loss the plain one, top-1 the
    share of argmax hits."""
    data = Labelled(13, seed=4)
    res, model = _run(tmp_path, monkeypatch, (data, data, CLASSES), mode="finetune", batch_size=13, lr=0.0,
                      label_smoothing=0.3, pool="mean_fc_norm")
    model.train()
    with torch.no_grad():
        logits = model(data.x)
    h = res["history"][0]
    assert h["train_loss"] == pytest.approx(_smoothed_ce(logits, data.y, 0.3), rel=1e-5)
    assert h["val_loss"] == pytest.approx(_smoothed_ce(logits, data.y, 0.0), rel=1e-5)
    assert h["top1"] == pytest.approx(100.0 * float((logits.argmax(1) == data.y).double().mean()))


def test_linprobe_loss_is_plain_cross_entropy_over_batchnormed_features(tmp_path, monkeypatch):
    """The probe (lr=0, label_smoothing left at 0.1, which it does not use): train loss = cross-entropy of the head
    on the features normalised by the batch's mean and biased variance (eps 1e-6, no affine); the evaluation uses
    the running statistics after that one batch (momentum 0.1, unbiased variance)."""
    data = Labelled(13, seed=6)
    res, model = _run(tmp_path, monkeypatch, (data, data, CLASSES), mode="linprobe", batch_size=13, lr=0.0,
                      pool="cls")
    with torch.no_grad():
        f = model.features(data.x).double()
    W, b = model.head.weight.double().detach(), model.head.bias.double().detach()
    mean, var = f.mean(0), f.var(0, unbiased=False)
    train_logits = ((f - mean) / torch.sqrt(var + 1e-6)) @ W.T + b
    run_mean, run_var = 0.1 * mean, 0.9 + 0.1 * f.var(0, unbiased=True)
    val_logits = ((f - run_mean) / torch.sqrt(run_var + 1e-6)) @ W.T + b
    h = res["history"][0]
    assert h["train_loss"] == pytest.approx(_smoothed_ce(train_logits, data.y, 0.0), rel=1e-5)
    assert h["val_loss"] == pytest.approx(_smoothed_ce(val_logits, data.y, 0.0), rel=1e-5)


def test_a_non_finite_loss_skips_the_step(tmp_path, monkeypatch):
    """A NaN image makes its batch's loss NaN: that step is skipped (the epoch's mean loss shows the NaN), the
    weights stay finite and the evaluation after it is finite."""
    data = Labelled(21, seed=3)
    data.x[4, 0, 5, 7] = float("nan")
    res, model = _run(tmp_path, monkeypatch, (data, Labelled(6, seed=1), CLASSES), mode="finetune", lr=1e-3)
    assert math.isnan(res["history"][0]["train_loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(res["history"][0]["val_loss"])


class _Lookup(torch.nn.Module):
    """A 'model' whose input rows are indices into a fixed logit table; it records its mode when called."""

    def __init__(self, table):
        super().__init__()
        self.table, self.modes = table, []

    def forward(self, x):
        self.modes.append(self.training)
        return self.table[x[:, 0].long()]


@pytest.mark.parametrize("num_classes", [7, 3])
def test_evaluate_top1_top5_and_loss_by_hand(num_classes):
    """23 rows of random logits in batches of 5, 9, 9: top-1, top-k (k = min(5, classes)) and the mean
    cross-entropy over rows, computed with numpy; the model is switched to eval mode."""
    rng = np.random.default_rng(num_classes)
    table = rng.standard_normal((23, num_classes))
    labels = rng.integers(0, num_classes, 23)
    labels[:3] = np.argsort(-table[:3], 1)[:, 1]  # a few second-best hits: in the top-k, not the top-1
    model = _Lookup(torch.tensor(table, dtype=torch.float32)).train()
    idx = torch.arange(23, dtype=torch.float32)[:, None]
    loader = [(idx[a:b], torch.tensor(labels[a:b])) for a, b in ((0, 5), (5, 14), (14, 23))]
    top1, top5, loss = ft.evaluate(model, loader, torch.device("cpu"), None, num_classes)
    order = np.argsort(-table, 1)
    k = min(5, num_classes)
    assert top1 == pytest.approx(100.0 * np.mean(order[:, 0] == labels))
    assert top5 == pytest.approx(100.0 * np.mean([labels[i] in order[i, :k] for i in range(23)]))
    logp = table - np.log(np.exp(table).sum(1, keepdims=True))
    assert loss == pytest.approx(-np.mean(logp[np.arange(23), labels]), rel=1e-5)
    assert top1 < top5 and model.modes == [False] * 3
    if num_classes == 3:
        assert top5 == 100.0


def test_results_report_the_best_epoch_and_the_run(tmp_path, monkeypatch, capsys):
    """With scripted evaluations, results.json (and the return value) hold the best top-1 and its first epoch on a
    tie, the top-5 at that epoch, the best top-5 of any epoch, the last epoch's top-1 and top-5, chance and the run's
    sizes; the summary line gives the last epoch's top-1 first, the best epoch's named as a selection, chance and the
    validation set's size."""
    script = iter([(40.0, 80.0, 1.3), (60.0, 70.0, 1.2), (60.0, 90.0, 1.1), (50.0, 95.0, 1.0)])
    monkeypatch.setattr(ft, "evaluate", lambda *a, **k: next(script))
    res, _ = _run(tmp_path, monkeypatch, (Labelled(11), Labelled(7, seed=1), CLASSES), mode="finetune", epochs=4,
                  lr=0.0, fraction=0.5, name="best")
    saved = json.loads((tmp_path / "best" / "results.json").read_text())
    for r in (res, saved):
        assert (r["top1"], r["best_epoch"], r["top5_at_best"], r["top5"], r["final_top1"]) == (60.0, 1, 70.0, 95.0,
                                                                                                50.0)
        assert (r["train_images"], r["val_images"], r["num_classes"], r["epochs"], r["fraction"]) == (11, 7, 5, 4, 0.5)
        assert r["mode"] == "finetune" and r["world_size"] == 1 and r["checkpoint"] is None
        assert [h["val_loss"] for h in r["history"]] == [1.3, 1.2, 1.1, 1.0]
        assert (r["chance"], r["final_top5"]) == (20.0, 95.0)
    assert saved["results"] == str(tmp_path / "best" / "results.json")
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("finetune: top-1")]
    assert line and line[0].startswith("finetune: top-1 50.00% after the last epoch (4/4), 60.00% at the best epoch (2/4; "
                                       "chosen on the validation set") and "chance 20.00%; 7 validation images " \
        "(one is 14.29 points)" in line[0]


def test_bad_fraction_epochs_and_too_few_images_are_config_errors(tmp_path):
    base = dict(BASE, output_dir=str(tmp_path), data_root=str(tmp_path / "absent"))
    for bad in (1.5, 0.0, -0.25):
        with pytest.raises(config_mod.ConfigError, match=r"fraction must be in \(0, 1\]"):
            ft.finetune(dict(base, fraction=bad))
    with pytest.raises(config_mod.ConfigError, match="epochs must be >= 1"):
        ft.finetune(dict(base, epochs=0))
    with pytest.warns(RuntimeWarning, match="random weights"), \
            pytest.raises(config_mod.ConfigError, match=r"only 1 training image\(s\)"):
        ft.finetune(dict(BASE, output_dir=str(tmp_path)), datasets=(Labelled(1), Labelled(4, seed=1), CLASSES))


def test_a_checkpoint_resumes_only_under_the_same_settings(tmp_path):
    """A saved finetuning state resumes under the same numbers-deciding settings, whatever accum_steps, num_workers,
    progress or checkpoint_every say; any one of layer decay, fraction, smoothing, drop path, pool, weight decay,
    mixup, seed, epochs or the encoder changed starts over (with a warning naming it); resume=null starts over."""
    cfg = FinetuneConfig.build(dict(mode="finetune"))
    run_dir = tmp_path / "run"
    enc = tmp_path / "enc.pt"
    checkpoint_io.save_checkpoint({"model": {}, "identity": ft.run_identity(cfg, enc), "step": 3}, run_dir, 3)
    for same in (dict(accum_steps=4), dict(num_workers=2), dict(progress=False), dict(checkpoint_every=3)):
        c = dataclasses.replace(cfg, **same)
        assert ft.resume_state(c.resume, run_dir, ft.run_identity(c, enc))["step"] == 3, same
    changes = dict(layer_decay=0.65, fraction=0.02, label_smoothing=0.0, drop_path=0.2, pool="mean",
                   weight_decay=0.01, mixup=0.8, seed=1, epochs=49, lr=1e-4, base_lr=5e-4)
    for key, value in changes.items():
        c = dataclasses.replace(cfg, **{key: value})
        with pytest.warns(RuntimeWarning, match=rf"other settings \({key}\): starting over"):
            assert ft.resume_state(c.resume, run_dir, ft.run_identity(c, enc)) is None
    with pytest.warns(RuntimeWarning, match=r"other settings \(encoder\)"):
        assert ft.resume_state(cfg.resume, run_dir, ft.run_identity(cfg, tmp_path / "other.pt")) is None
    assert ft.resume_state(None, run_dir, ft.run_identity(cfg, enc)) is None


def test_training_state_is_saved_every_n_epochs_but_not_after_the_last(tmp_path, monkeypatch):
    saved, real_save = [], checkpoint_io.save_checkpoint
    monkeypatch.setattr(checkpoint_io, "save_checkpoint", lambda state, *a, **k: saved.append(state["epoch"])
                        or real_save(state, *a, **k))
    data = (Labelled(9), Labelled(3, seed=1), CLASSES)  # one step an epoch
    _run(tmp_path, monkeypatch, data, mode="finetune", epochs=6, checkpoint_every=2, lr=0.0, name="two")
    assert saved == [1, 3]  # not after epoch 5, the last: the finished run's record is results.json
    saved.clear()
    _run(tmp_path, monkeypatch, data, mode="finetune", epochs=2, checkpoint_every=0, lr=0.0, name="never")
    assert saved == []


def test_feature_batchnorm_over_two_ranks_is_batchnorm_of_the_global_batch(monkeypatch):
    """Two ranks (threads with a summing all-reduce) holding 5 and 4 rows: each rank's output is BatchNorm1d
    (affine=False, eps 1e-6) of the 9-row global batch, and both keep its running statistics, over 3 steps."""
    slots, barrier, lock = {}, threading.Barrier(2), threading.Lock()

    def all_reduce(t):
        me = threading.current_thread().name
        with lock:
            slots[me] = t.clone()
        barrier.wait()
        total = slots["r0"] + slots["r1"]
        barrier.wait()
        t.copy_(total)

    monkeypatch.setattr(ft, "_world", lambda: 2)
    monkeypatch.setattr(ft.dist, "all_reduce", all_reduce)
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(9, 6, generator=g, dtype=torch.float64) * 3 + 2 for _ in range(3)]
    ref = torch.nn.BatchNorm1d(6, affine=False, eps=1e-6).double()
    ranks = [ft.FeatureBatchNorm(6, affine=False, eps=1e-6).double() for _ in range(2)]
    outs = {0: [], 1: []}

    def work(r):
        for x in xs:
            outs[r].append(ranks[r](x[:5] if r == 0 else x[5:]))

    threads = [threading.Thread(target=work, args=(r,), name=f"r{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(xs):
        want = ref(x)
        torch.testing.assert_close(torch.cat([outs[0][i], outs[1][i]]), want, rtol=1e-10, atol=1e-10)
    for bn in ranks:
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-10, atol=1e-12)
        assert int(bn.num_batches_tracked) == 3
    with pytest.raises(RuntimeError, match="without gradient"):
        ranks[0](xs[0].requires_grad_(True))


def test_head_initialisation_is_maes():
    """MAE: the finetuning head trunc_normal(std=2e-5), the probe's trunc_normal(std=0.01), both biases 0."""
    enc = mae_fast.create_timm_encoder(mae_fast.create_model("mae_vit_demo_patch8"))
    torch.manual_seed(0)
    for linprobe, std in ((False, 2e-5), (True, 0.01)):
        head = ft.Classifier(enc, 301, "cls", linprobe=linprobe).head
        assert float(head.weight.detach().std()) == pytest.approx(std, rel=0.05)
        assert abs(float(head.weight.detach().mean())) < std / 20 and torch.all(head.bias == 0)


def test_finetuning_encoder_has_stochastic_depth_and_the_probe_none(tmp_path):
    """drop_path=0.2 over 4 blocks: timm's linear rule, the last block 0.2; the probe's (frozen) encoder none."""
    cfg = FinetuneConfig.build(dict(drop_path=0.2))
    spec = (None, "mae_vit_demo_patch8", {"img_size": 32})
    from mae_fast.models.drop_path import drop_path_rates

    model, *_ = ft.build_classifier(cfg, 3, linprobe=False, spec=spec)
    rates = [r for r, _ in drop_path_rates(model.encoder)]
    assert rates == pytest.approx([0.2 * i / 3 for i in range(4)])
    assert type(model.encoder.blocks[1]).__name__.startswith("EfficientDropPath")  # drop_path_mode=efficient
    timm_mode, *_ = ft.build_classifier(FinetuneConfig.build(dict(drop_path=0.2, drop_path_mode="timm")), 3,
                                        linprobe=False, spec=spec)
    assert [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in timm_mode.encoder.blocks] == pytest.approx(rates)
    probe, *_ = ft.build_classifier(cfg, 3, linprobe=True, spec=spec)
    assert all(float(getattr(b.drop_path1, "drop_prob", 0.0)) == 0.0 for b in probe.encoder.blocks)


def test_encoder_spec_follows_a_mae_fast_checkpoint_unless_told_otherwise(tmp_path):
    """A mae_fast checkpoint names its model, model_kwargs and img_size: finetuning builds that encoder; img_size or
    another model given in the config win."""
    path = tmp_path / "checkpoint-00000005.pt"
    torch.save({"model": {}, "config": {"model": "mae_vit_demo_patch8", "model_kwargs": {"depth": 3},
                                        "img_size": 40}}, path)
    cfg = FinetuneConfig.build(dict(checkpoint=str(path)))
    assert ft.encoder_spec(cfg) == (path, "mae_vit_demo_patch8", {"depth": 3, "img_size": 40})
    assert ft.encoder_spec(dataclasses.replace(cfg, img_size=48)) == (path, "mae_vit_demo_patch8", {"depth": 3, "img_size": 48})
    assert ft.encoder_spec(dataclasses.replace(cfg, model="mae_vit_small_patch16")) == (path, "mae_vit_small_patch16", {})


@pytest.mark.curves  # draws curves.png
@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_finetune_and_linprobe_smoke(tmp_path, mode):

    pre = pretrain(tiny(tmp_path, name="pre", steps=2))
    res = finetune(dict(mode=mode, checkpoint=pre["run_dir"], output_dir=str(tmp_path), epochs=3, batch_size=16,
                        warmup_epochs=1, lr=3e-3 if mode == "finetune" else 0.05, progress=False, pool="mean"),
                   datasets=(Shapes(40), Shapes(20, seed=1), ["a", "b", "c", "d"]))
    assert 0 <= res["top1"] <= 100 and res["top1"] <= res["top5"] <= 100 and res["top5"] == 100.0  # 4 classes
    assert res["best_epoch"] in range(3) and len(res["history"]) == 3
    saved = json.loads(Path(res["results"]).read_text())
    assert saved["top1"] == res["top1"] and saved["checkpoint"].endswith("checkpoint-00000002.pt")
    assert Path(saved["curves"]).is_file() and Path(saved["curves"]).parent == Path(res["results"]).parent
    assert res["model"] == "mae_vit_demo_patch8"


def test_linprobe_freezes_encoder_and_uses_affine_free_batchnorm(tmp_path):
    import mae_fast
    from mae_fast.training.finetune import Classifier

    enc = mae_fast.create_timm_encoder(mae_fast.create_model("mae_vit_demo_patch8"))
    c = Classifier(enc, 5, "cls", linprobe=True)
    assert not any(p.requires_grad for p in c.encoder.parameters())
    assert isinstance(c.bn, torch.nn.BatchNorm1d) and not c.bn.affine
    c.train()
    assert not c.encoder.training and c.bn.training
    before = {k: v.clone() for k, v in c.encoder.state_dict().items()}
    c(torch.randn(4, 3, 64, 64)).sum().backward()
    assert c.head.weight.grad is not None
    assert all(torch.equal(before[k], v) for k, v in c.encoder.state_dict().items())


def test_finetune_loads_official_and_timm_style_checkpoints(tmp_path):
    import mae_fast
    from mae_fast.training.finetune import build_classifier

    src = mae_fast.create_model("mae_vit_demo_patch8")
    torch.save({"model": src.state_dict()}, tmp_path / "official.pth")
    torch.save(mae_fast.export_timm(src), tmp_path / "timm.pth")
    cfg = FinetuneConfig()
    for f in ("official.pth", "timm.pth"):
        model, *_ = build_classifier(dataclasses.replace(cfg, checkpoint=str(tmp_path / f)), 3, linprobe=False)
        torch.testing.assert_close(model.encoder.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)


def test_linprobe_on_the_demo_labelled_set(tmp_path):
    with pytest.warns(RuntimeWarning, match="random weights"):  # no runs/demo under tmp_path
        res = finetune(dict(mode="linprobe", output_dir=str(tmp_path), checkpoint=None, epochs=1, fraction=0.25,
                            batch_size=32, warmup_epochs=0, progress=False))
    assert res["num_classes"] == 8 and res["val_images"] > 0 and res["train_images"] < res["val_images"] * 4
    assert 0 <= res["top1"] <= res["top5"] <= 100 and Path(res["results"]).is_file()


def test_linprobe_with_lars_runs_and_bad_optimizer_errors(tmp_path):
    from mae_fast.training import config as config_mod

    base = dict(mode="linprobe", output_dir=str(tmp_path), checkpoint=None, epochs=1, fraction=0.1, batch_size=16,
                warmup_epochs=0, progress=False)
    with pytest.warns(RuntimeWarning, match="random weights"):
        res = finetune(dict(base, linprobe_optimizer="lars"))
    assert 0 <= res["top1"] <= 100
    with pytest.raises(config_mod.ConfigError, match="lars or sgd"), pytest.warns(RuntimeWarning):
        finetune(dict(base, name="bad", linprobe_optimizer="adam"))


def test_finetune_memory_budget_turns_on_checkpointing_with_the_same_results(tmp_path):
    from mae_fast.training import config as config_mod

    pre = pretrain(tiny(tmp_path, name="pre", steps=1))
    base = dict(mode="finetune", checkpoint=pre["run_dir"], output_dir=str(tmp_path), epochs=1, batch_size=16,
                warmup_epochs=0, lr=3e-3, progress=False, drop_path=0.0)
    data = (Shapes(32), Shapes(16, seed=1), ["a", "b", "c", "d"])
    roomy = finetune(dict(base, name="roomy", memory_budget_gib=100.0), datasets=data)
    plan = roomy["memory_plan"]
    assert plan["changed"] is False and plan["grad_checkpointing"] is False and plan["estimated_peak_bytes"] > 0
    squeezed = finetune(dict(base, name="squeezed", memory_budget_gib=plan["estimated_peak_bytes"] * 0.999 / 2**30),
                        datasets=data)
    plan2 = squeezed["memory_plan"]
    assert plan2["changed"] and plan2["grad_checkpointing"]
    assert plan2["estimated_peak_bytes"] < plan["estimated_peak_bytes"] * 0.999
    assert [h["top1"] for h in squeezed["history"]] == [h["top1"] for h in roomy["history"]]  # checkpointing is exact
    with pytest.raises(config_mod.ConfigError, match="raise accum_steps .* or lower batch_size"):
        finetune(dict(base, name="tight", memory_budget_gib=1e-4), datasets=data)
    with_drop_path = finetune(dict(base, name="dp", drop_path=0.1, memory_budget_gib=100.0), datasets=data)
    assert with_drop_path["memory_plan"]["estimated_peak_bytes"] > 0  # timm's drop-path set-up is estimable
    with pytest.raises(config_mod.ConfigError, match="true or false"):
        finetune(dict(base, name="partial", grad_checkpointing=3), datasets=data)


def _smoothed(labels, num_classes, smoothing):
    off = smoothing / num_classes
    return torch.nn.functional.one_hot(labels, num_classes).double() * (1 - smoothing) + off


def test_batch_mixer_follows_the_mixup_and_cutmix_formulas():
    """Against the formulas: mixup x' = lam x + (1 - lam) x[flip], cutmix pastes one box of x[flip] with
    lam = 1 - box area / image area, soft targets lam y~ + (1 - lam) y~[flip] of label-smoothed one-hots y~. lam
    is read back from the images. An odd batch keeps its last image, with a smoothed one-hot target. The draws
    are a function of (seed, step) and leave numpy's global generator alone."""
    from mae_fast.training.finetune import BatchMixer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 11, 13, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=g)
    smooth = _smoothed(y, 5, 0.1)

    mixup = BatchMixer(0.8, 0.0, 0.1, 5, seed=3)
    np_state = np.random.get_state()
    out, soft = mixup(x.clone(), y, step=4)
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    a, b = x[:6], x[:6].flip(0)
    lam = float(((out[0] - b[0]) * (a[0] - b[0])).sum() / ((a[0] - b[0]) ** 2).sum())
    assert 0 < lam < 1
    torch.testing.assert_close(out[:6], lam * a + (1 - lam) * b)
    torch.testing.assert_close(out[6], x[6])
    torch.testing.assert_close(soft[:6].double(), lam * smooth[:6] + (1 - lam) * smooth[:6].flip(0), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(soft[6].double(), smooth[6], atol=1e-6, rtol=0)
    torch.testing.assert_close(soft.sum(1), torch.ones(7))
    again, _ = mixup(x.clone(), y, step=4)
    other, _ = BatchMixer(0.8, 0.0, 0.1, 5, seed=3)(x.clone(), y, step=5)
    assert torch.equal(again, out) and not torch.allclose(other, out)

    cutmix = BatchMixer(0.0, 1.0, 0.1, 5, seed=3)
    for step in range(6):
        out, soft = cutmix(x[:6].clone(), y[:6], step=step)
        pasted = (out != x[:6]).any(0).any(0)  # (H, W): where the flipped batch shows
        rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
        if len(rows):  # the box is a rectangle of x[flip], the rest x
            box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
            torch.testing.assert_close(out[:, :, box[0], box[1]], x[:6].flip(0)[:, :, box[0], box[1]])
        lam = 1 - float(pasted.sum()) / (11 * 13)
        torch.testing.assert_close(out[:, :, ~pasted], x[:6][:, :, ~pasted])
        torch.testing.assert_close(soft.double(), lam * smooth[:6] + (1 - lam) * smooth[:6].flip(0), atol=1e-6,
                                   rtol=0)


def test_finetuning_augmentation_keys(tmp_path):
    """MAE's finetuning recipe (its FINETUNE.md numbers) loads for finetune, not for pretrain; bad augmentation
    keys stop before any data is read; the keys join the run identity only when on (older checkpoints resume)."""
    import mae_fast.training.finetune as ft

    r = config_mod.config_from_argv(["--config", "mae_official_finetune"], config_mod.FINETUNE_KEYS, None,
                                    fixed={"mode": "finetune"})
    assert (r["auto_augment"], r["reprob"], r["mixup"], r["cutmix"], r["label_smoothing"]) == \
        ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1)
    assert (r["base_lr"], r["batch_size"], r["epochs"], r["layer_decay"], r["drop_path"], r["warmup_epochs"]) == \
        (5e-4, 1024, 100, 0.65, 0.1, 5)
    assert r["pool"] == "mean_fc_norm"
    assert "mae_official_finetune" not in config_mod.list_recipes()
    with pytest.raises(config_mod.ConfigError, match="recipe 'mae_official_finetune' not found"):
        config_mod.config_from_argv(["--config", "mae_official_finetune"])
    base = dict(output_dir=str(tmp_path), data_root=str(tmp_path / "absent"), checkpoint=None, progress=False)
    with pytest.raises(config_mod.ConfigError, match="auto_augment 'randaug' is not a policy timm knows"):
        ft.finetune(dict(base, auto_augment="randaug"))
    with pytest.raises(config_mod.ConfigError, match="reprob must be in"):
        ft.finetune(dict(base, reprob=1.5))
    with pytest.raises(config_mod.ConfigError, match="mixup, cutmix >= 0"):
        ft.finetune(dict(base, cutmix=-1.0))
    cfg = FinetuneConfig()
    assert not set(ft.LATER_IDENTITY) & set(ft.run_identity(cfg, None))
    assert {k: getattr(cfg, k) for k in ft.LATER_IDENTITY} == ft.LATER_IDENTITY  # the defaults it leaves out
    assert ft.run_identity(dataclasses.replace(cfg, mixup=0.8), None)["mixup"] == 0.8
    data = (Shapes(16), Shapes(8, seed=1), ["a", "b", "c", "d"])
    with pytest.warns(RuntimeWarning, match="datasets given keep their own transforms"):
        plain = ft.finetune(dict(FT_BASE, output_dir=str(tmp_path), epochs=1, name="own", auto_augment="original",
                                 label_smoothing=0.0), datasets=data)
    with pytest.warns(RuntimeWarning, match="random weights"):
        mixed = ft.finetune(dict(FT_BASE, output_dir=str(tmp_path), epochs=1, name="mixed", cutmix=1.0,
                                 label_smoothing=0.0), datasets=data)
    assert mixed["history"][0]["train_loss"] != plain["history"][0]["train_loss"]  # the mixer is in the loop


def test_finetune_progress_counts_steps_with_the_epoch_loss_and_accuracy(tmp_path, capsys):
    """An epoch of a large labelled set is long: the bar moves every step and shows the epoch, the epoch's running
    loss and the last evaluation."""
    import mae_fast.training.finetune as ft

    data = (Shapes(40), Shapes(20, seed=1), ["a", "b", "c", "d"])
    with pytest.warns(RuntimeWarning, match="random weights"):
        res = ft.finetune(dict(FT_BASE, output_dir=str(tmp_path), epochs=2, progress=True), datasets=data)
    out = capsys.readouterr().out
    assert "10/10" in out and "epoch=2/2" in out
    assert f"top1={res['history'][-1]['top1']:.1f}" in out and f"best={res['top1']:.1f}" in out


@pytest.mark.parametrize("mode, extra", [("linprobe", {}), ("finetune", {"mixup": 0.8, "cutmix": 1.0})])
def test_accumulation_on_a_short_last_batch_keeps_micro_batches_usable(tmp_path, monkeypatch, mode, extra):
    """batch_size=8 accum_steps=4 on 42 images: five batches of 8 (micro-batches of 2) and a last one of 2, which
    split four ways would give micro-batches of 1 and 0 images: the probe's BatchNorm cannot take statistics over
    one row (it raised) and mixup cannot pair one image (it left it unmixed). The last batch takes one micro-batch
    of 2. Micro-batches of 1 in every step are refused before any data is read."""
    import mae_fast.training.finetune as ft

    trained_on, real_forward = [], ft.Classifier.forward

    def forward(self, x):
        if self.training:
            trained_on.append(len(x))
        return real_forward(self, x)

    monkeypatch.setattr(ft.Classifier, "forward", forward)
    data = (Shapes(42), Shapes(20, seed=1), ["a", "b", "c", "d"])
    base = dict(FT_BASE, output_dir=str(tmp_path), mode=mode, epochs=1, accum_steps=4,
                lr=0.05 if mode == "linprobe" else 3e-3, **extra)
    with pytest.warns(RuntimeWarning, match="random weights"):
        res = ft.finetune(base, datasets=data)
    assert trained_on == [2] * 20 + [2]
    assert np.isfinite(res["history"][0]["train_loss"]) and np.isfinite(res["history"][0]["val_loss"])
    with pytest.raises(config_mod.ConfigError, match="micro-batches of 1 image.*must be >= 2"):
        ft.finetune(dict(base, accum_steps=8, data_root=str(tmp_path / "absent")))


def test_finetune_records_its_settings_and_labelled_subset(tmp_path):
    """config.yaml holds every setting of the run (it loads back as the same config) and data_record.json the
    training images the low-label fraction kept, so a top-1 can be traced to what produced it."""
    import yaml

    import mae_fast.training.finetune as ft
    from mae_fast.data import build_labelled_datasets

    cfg = dict(FT_BASE, output_dir=str(tmp_path), epochs=1, fraction=0.25, reprob=0.25, name="rec", img_size=None)
    with pytest.warns(RuntimeWarning, match="random weights"):
        res = ft.finetune(cfg)
    run_dir = tmp_path / "rec"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved == config_mod.build_config(cfg, config_mod.FINETUNE_KEYS, default_recipe=None)
    record = json.loads((run_dir / "data_record.json").read_text())
    train, _, _ = build_labelled_datasets(None, img_size=64, fraction=0.25, seed=0)
    assert record["train_files"] == train.record["train_files"] and record["n_train"] == res["train_images"]


def test_mean_fc_norm_pool_is_maes_global_pool():
    """pool=mean_fc_norm against timm's VisionTransformer(global_pool='avg', fc_norm=True), MAE's finetuning model:
    the same features from the same encoder and fc_norm weights; the encoder's final norm is not applied; the new
    LayerNorm sits in the last layer-decay group without weight decay; a linear probe refuses it."""
    from timm.models.vision_transformer import VisionTransformer

    import mae_fast
    from mae_fast.models import create_timm_encoder, export_timm, timm_model_kwargs
    from mae_fast.training.finetune import Classifier

    mae = mae_fast.create_model("mae_vit_demo_patch8", img_size=40)
    torch.manual_seed(0)
    for p in mae.parameters():  # random everywhere, final norm included, so that skipping it shows
        p.data.normal_(0.0, 0.2)
    clf = Classifier(create_timm_encoder(mae), num_classes=5, pool="mean_fc_norm")
    clf.fc_norm.weight.data.uniform_(0.5, 1.5), clf.fc_norm.bias.data.normal_()
    ref = VisionTransformer(**timm_model_kwargs(mae), global_pool="avg", fc_norm=True)
    state = {k: v for k, v in export_timm(mae).items() if not k.startswith("norm.")}
    state.update({"fc_norm.weight": clf.fc_norm.weight.data, "fc_norm.bias": clf.fc_norm.bias.data})
    ref.load_state_dict(state, strict=True)
    clf.eval(), ref.eval()
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(clf.features(x), ref(x), rtol=1e-5, atol=1e-5)
        plain_mean = Classifier(create_timm_encoder(mae), num_classes=5, pool="mean").eval().features(x)
    assert not torch.allclose(clf.features(x), plain_mean, atol=1e-3)
    groups = layer_decay_groups(clf, weight_decay=0.05, layer_decay=0.75)
    fc_group = next(g for g in groups if any(p is clf.fc_norm.weight for p in g["params"]))
    assert fc_group["lr_scale"] == 1.0 and fc_group["weight_decay"] == 0.0
    with pytest.raises(config_mod.ConfigError, match="pool=mean_fc_norm trains a new LayerNorm"):
        Classifier(create_timm_encoder(mae), num_classes=5, pool="mean_fc_norm", linprobe=True)
    with pytest.raises(config_mod.ConfigError, match="pool must be one of cls, mean, mean_fc_norm, got 'max'"):
        Classifier(create_timm_encoder(mae), num_classes=5, pool="max")


def test_finetune_with_an_empty_validation_set_stops_before_training(tmp_path):

    with pytest.warns(RuntimeWarning, match="random weights"), \
            pytest.raises(config_mod.ConfigError, match="no validation images"):
        finetune(dict(mode="linprobe", checkpoint=None, output_dir=str(tmp_path), epochs=1, batch_size=8, img_size=32,
                      progress=False, memory_budget_gib=None), datasets=(Shapes(8), Shapes(0), ["a", "b", "c", "d"]))
    assert not (tmp_path / "linprobe").exists()


def test_labelled_set_without_validation_images_is_a_clear_error(tmp_path):
    """Before: training ran a whole epoch, then evaluate() raised ZeroDivisionError."""
    for c in ("a", "b"):
        write_pngs(tmp_path / "tv" / "train" / c, 3)
    (tmp_path / "tv" / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="no readable validation images under .*val"):
        build_labelled_datasets(tmp_path / "tv", img_size=16)
    for c in ("a", "b"):  # val classes named otherwise than train's
        write_pngs(tmp_path / "other" / "train" / c, 3)
    write_pngs(tmp_path / "other" / "val" / "c", 2)
    with pytest.raises(FileNotFoundError, match="for the classes of .*train: a, b"):
        build_labelled_datasets(tmp_path / "other", img_size=16)
    for c in ("a", "b"):  # a single folder with one image per class: nothing to hold out
        write_pngs(tmp_path / "single" / c, 1)
    with pytest.raises(FileNotFoundError, match="no validation images can be held out of .*single"):
        build_labelled_datasets(tmp_path / "single", img_size=16)
