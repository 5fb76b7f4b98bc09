"""Finetuning / linear probing and the run configuration, against independent expectations (a mutation audit of
train/finetune.py and train/config.py): MAE's layer-wise lr decay (``param_groups_lrd``) and its per-iteration
warmup + cosine schedule, the optimizers' settings, the losses (label smoothing, the probe's BatchNorm) in fp64,
top-1 / top-5 by hand, the global-batch BatchNorm over two simulated ranks, results.json, run identity and
checkpoint cadence, and the config parser's type rules."""
from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch

import mae_fast
import mae_fast.train.finetune as ft
from mae_fast.train import checkpoint_io, config as config_mod


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


# ------------------------------------------------------------------------------------------------ layer decay
def mae_param_groups_lrd(model: ft.Classifier, weight_decay: float, layer_decay: float) -> dict:
    """MAE's util/lr_decay.py (param_groups_lrd + get_layer_id_for_vit), per parameter name: (lr_scale, wd).
    The encoder's names are MAE's model's with an ``encoder.`` prefix; the head (and fc_norm) are top-level there."""
    no_weight_decay_list = {"pos_embed", "cls_token", "dist_token"}  # timm / MAE VisionTransformer.no_weight_decay()
    num_layers = len(model.encoder.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mae_name = n[len("encoder."):] if n.startswith("encoder.") else n
        this_decay = 0.0 if (p.ndim == 1 or mae_name in no_weight_decay_list) else weight_decay
        if mae_name in ("cls_token", "pos_embed") or mae_name.startswith("patch_embed"):
            layer_id = 0
        elif mae_name.startswith("blocks"):
            layer_id = int(mae_name.split(".")[1]) + 1
        else:
            layer_id = num_layers
        out[n] = (layer_scales[layer_id], this_decay)
    return out


@pytest.mark.parametrize("depth, pool", [(3, "mean_fc_norm"), (4, "cls")])
def test_layer_decay_groups_are_maes_param_groups_lrd(depth, pool):
    """Each trainable parameter lands in a group with MAE's lr_scale = decay ** (depth + 1 - layer_id) and MAE's
    weight decay (none on 1-D params, cls_token, pos_embed); frozen parameters are left out."""
    mae = mae_fast.create_model("mae_vit_demo_patch8", img_size=32, depth=depth)
    model = ft.Classifier(mae_fast.create_timm_encoder(mae), num_classes=7, pool=pool)
    model.encoder.blocks[1].attn.qkv.bias.requires_grad_(False)
    groups = ft.layer_decay_groups(model, weight_decay=0.037, layer_decay=0.63)
    want = mae_param_groups_lrd(model, 0.037, 0.63)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in got, "a parameter in two groups"
            got[names[id(p)]] = (g["lr_scale"], g["weight_decay"])
    assert got.keys() == want.keys() and "encoder.blocks.1.attn.qkv.bias" not in got
    for n in want:
        assert got[n][0] == pytest.approx(want[n][0], rel=1e-12) and got[n][1] == want[n][1], n
    # the decay reached every layer: depth + 2 distinct scales, the smallest decay ** (depth + 1)
    assert len({s for s, _ in got.values()}) == depth + 2
    assert min(s for s, _ in got.values()) == pytest.approx(0.63 ** (depth + 1))


# ------------------------------------------------------------------------------------------------ schedule / optim
def mae_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """MAE's util/lr_sched.adjust_learning_rate at a fractional epoch (called with step / steps_per_epoch)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


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
    from mae_fast.optim import LARS

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


def test_lars_is_maes_lars_on_a_probe_head():
    """mae_fast.optim.LARS against MAE's util/lars.py written out here (fp64), with the head's weight (2-D: decay and
    trust ratio) and bias (1-D: plain momentum), over 4 steps with new random gradients."""
    from mae_fast.optim import LARS

    g = torch.Generator().manual_seed(5)
    w = torch.randn(7, 13, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    ref = {"w": w.detach().clone(), "b": b.detach().clone()}
    mu = {k: torch.zeros_like(v) for k, v in ref.items()}
    opt = LARS([w, b], lr=0.3, weight_decay=0.05, momentum=0.9)
    for _ in range(4):
        grads = {"w": torch.randn(7, 13, generator=g, dtype=torch.float64),
                 "b": torch.randn(7, generator=g, dtype=torch.float64)}
        w.grad, b.grad = grads["w"].clone(), grads["b"].clone()
        opt.step()
        for k in ("w", "b"):  # MAE: dp = g (+ wd p, x q for ndim > 1); mu = m mu + dp; p -= lr mu
            p, dp = ref[k], grads[k]
            if p.ndim > 1:
                dp = dp + 0.05 * p
                pn, un = p.norm(), dp.norm()
                q = 0.001 * pn / un if (pn > 0 and un > 0) else 1.0
                dp = dp * q
            mu[k] = 0.9 * mu[k] + dp
            ref[k] = p - 0.3 * mu[k]
    torch.testing.assert_close(w.detach(), ref["w"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.detach(), ref["b"], rtol=1e-12, atol=1e-14)


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


# ------------------------------------------------------------------------------------------------ losses
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


# ------------------------------------------------------------------------------------------------ evaluation
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


# ------------------------------------------------------------------------------------------------ results.json
def test_results_report_the_best_epoch_and_the_run(tmp_path, monkeypatch):
    """With scripted evaluations, results.json (and the return value) hold the best top-1 and its first epoch on a
    tie, the top-5 at that epoch, the best top-5 of any epoch, the last epoch's top-1, and the run's sizes."""
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
    assert saved["results"] == str(tmp_path / "best" / "results.json")


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


# ------------------------------------------------------------------------------------------------ resume
def test_a_checkpoint_resumes_only_under_the_same_settings(tmp_path):
    """A saved finetuning state resumes under the same numbers-deciding settings, whatever accum_steps, num_workers,
    progress or checkpoint_every say; any one of layer decay, fraction, smoothing, drop path, pool, weight decay,
    mixup, seed, epochs or the encoder changed starts over (with a warning naming it); resume=null starts over."""
    cfg = config_mod.build_config(dict(mode="finetune"), config_mod.FINETUNE_KEYS, default_recipe=None)
    run_dir = tmp_path / "run"
    enc = tmp_path / "enc.pt"
    checkpoint_io.save_checkpoint({"model": {}, "identity": ft.run_identity(cfg, enc), "step": 3}, run_dir, 3)
    for same in (dict(accum_steps=4), dict(num_workers=2), dict(progress=False), dict(checkpoint_every=3)):
        c = dict(cfg, **same)
        assert ft._resume_state(c, run_dir, ft.run_identity(c, enc))["step"] == 3, same
    changes = dict(layer_decay=0.65, fraction=0.02, label_smoothing=0.0, drop_path=0.2, pool="mean",
                   weight_decay=0.01, mixup=0.8, seed=1, epochs=49, lr=1e-4, base_lr=5e-4)
    for key, value in changes.items():
        c = dict(cfg, **{key: value})
        with pytest.warns(RuntimeWarning, match=rf"other settings \({key}\): starting over"):
            assert ft._resume_state(c, run_dir, ft.run_identity(c, enc)) is None
    with pytest.warns(RuntimeWarning, match=r"other settings \(encoder\)"):
        assert ft._resume_state(cfg, run_dir, ft.run_identity(cfg, tmp_path / "other.pt")) is None
    assert ft._resume_state(dict(cfg, resume=None), run_dir, ft.run_identity(cfg, enc)) is None


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


# ------------------------------------------------------------------------------------------------ model pieces
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
    cfg = config_mod.build_config(dict(drop_path=0.2), config_mod.FINETUNE_KEYS, default_recipe=None)
    spec = (None, "mae_vit_demo_patch8", {"img_size": 32})
    model, *_ = ft.build_classifier(cfg, 3, linprobe=False, spec=spec)
    rates = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in model.encoder.blocks]
    assert rates == pytest.approx([0.2 * i / 3 for i in range(4)])
    probe, *_ = ft.build_classifier(cfg, 3, linprobe=True, spec=spec)
    assert all(float(getattr(b.drop_path1, "drop_prob", 0.0)) == 0.0 for b in probe.encoder.blocks)


def test_encoder_spec_follows_a_mae_fast_checkpoint_unless_told_otherwise(tmp_path):
    """A mae_fast checkpoint names its model, model_kwargs and img_size: finetuning builds that encoder; img_size or
    another model given in the config win."""
    path = tmp_path / "checkpoint-00000005.pt"
    torch.save({"model": {}, "config": {"model": "mae_vit_demo_patch8", "model_kwargs": {"depth": 3},
                                        "img_size": 40}}, path)
    cfg = config_mod.build_config(dict(checkpoint=str(path)), config_mod.FINETUNE_KEYS, default_recipe=None)
    assert ft.encoder_spec(cfg) == (path, "mae_vit_demo_patch8", {"depth": 3, "img_size": 40})
    assert ft.encoder_spec(dict(cfg, img_size=48)) == (path, "mae_vit_demo_patch8", {"depth": 3, "img_size": 48})
    assert ft.encoder_spec(dict(cfg, model="mae_vit_small_patch16")) == (path, "mae_vit_small_patch16", {})


# ------------------------------------------------------------------------------------------------ config
def test_config_values_take_their_keys_types():
    argv = ["mask_ratio=1", "steps=8.0", "lr=3", "betas=[0.8, 0.9]", "name=a: b: c", "--output-dir", "o",
            "--data_source=x=y", "model_kwargs.extra.deep=2"]
    cfg = config_mod.config_from_argv(argv)
    assert type(cfg["mask_ratio"]) is float and cfg["mask_ratio"] == 1.0
    assert type(cfg["steps"]) is int and cfg["steps"] == 8
    assert type(cfg["lr"]) is float and cfg["lr"] == 3.0
    assert cfg["name"] == "a: b: c"  # not valid YAML: the text itself
    assert cfg["output_dir"] == "o" and cfg["data_source"] == "x=y"
    assert cfg["model_kwargs"] == {"extra": {"deep": 2}}
    assert config_mod.config_from_argv(["img_size=[32, 48]"])["img_size"] == [32, 48]
    assert config_mod.build_config({"betas": (0.9, 0.98)})["betas"] == [0.9, 0.98]
    assert config_mod.config_from_argv(["memory_budget_gib=3"])["memory_budget_gib"] == 3.0


@pytest.mark.parametrize("override, msg", [
    ("steps=7.5", "steps must be an integer"), ("epochs=true", "epochs must be an integer"),
    ("lr=true", "lr must be a number"), ("lr=fast", "lr must be a number"), ("steps=[1]", "steps must be an integer"),
    ("progress=1", "progress must be true or false"), ("name=[1, 2]", "name must be a string"),
    ("model={a: 1}", "model must be a string"), ("betas=0.9", "betas must be a list"),
    ("model_kwargs=3", "model_kwargs must be a mapping"), ("memory_budget_gib=0", "memory_budget_gib must be"),
    ("memory_budget_gib=true", "memory_budget_gib must be"), ("img_size=[32, 32, 32]", "img_size must be an integer"),
    ("img_size=[32, 4.5]", "img_size must be an integer"), ("grad_checkpointing=-1", "grad_checkpointing must be"),
])
def test_config_rejects_values_of_the_wrong_type(override, msg):
    with pytest.raises(config_mod.ConfigError, match=msg):
        config_mod.config_from_argv([override])


def test_config_parser_edge_cases(tmp_path):
    with pytest.raises(config_mod.ConfigError, match="--lr needs a value"):
        config_mod.parse_overrides(["steps=3", "--lr"])
    assert config_mod.parse_overrides(["--config", "r.yaml", "--img-size", "[8, 8]"]) == ("r.yaml", {"img_size": [8, 8]})
    (tmp_path / "norecipe").write_text("steps: 3\nmodel_kwargs: {depth: 2}\n")  # a path without a suffix
    cfg = config_mod.load_recipe(tmp_path / "norecipe")
    assert cfg["steps"] == 3 and cfg["name"] == "norecipe" and cfg["model_kwargs"] == {"depth": 2}
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(config_mod.ConfigError, match="must be a mapping of key: value"):
        config_mod.load_recipe(tmp_path / "list.yaml")
    with pytest.raises(config_mod.ConfigError, match="not valid YAML"):
        (tmp_path / "bad.yaml").write_text("steps: [1\n")
        config_mod.load_recipe(tmp_path / "bad.yaml")


def test_configs_share_no_mutable_state(tmp_path):
    """Changing one config's lists or dicts (or passing dicts in) changes no other config, default or argument."""
    (tmp_path / "short.yaml").write_text("steps: 3\n")  # every list and dict left at its default
    first = config_mod.load_recipe(tmp_path / "short.yaml")
    first["betas"].append(0.5), first["model_kwargs"].update(depth=1), first["debug_nan_steps"].append(3)
    again = config_mod.load_recipe(tmp_path / "short.yaml")
    assert again["betas"] == [0.9, 0.95] and again["model_kwargs"] == {} and again["debug_nan_steps"] == []
    base = config_mod.defaults(config_mod.FINETUNE_KEYS)
    merged = config_mod.merge(base, {"model_kwargs.depth": 2, "epochs": 3}, config_mod.FINETUNE_KEYS)
    assert base["model_kwargs"] == {} and base["epochs"] == 50 and merged["model_kwargs"] == {"depth": 2}
    given = {"depth": 3}
    cfg = config_mod.build_config({"model_kwargs": given, "model_kwargs.num_heads": 2})
    assert cfg["model_kwargs"] == {"depth": 3, "num_heads": 2} and given == {"depth": 3}


def test_string_keys_keep_the_command_lines_text():
    """Run names, paths and choices that YAML would read as numbers or booleans (2024, 007, 1e3, nan, true) are the
    text given; null still clears a nullable key, and number keys still parse numbers."""
    argv = ["name=007", "output_dir=1e3", "data_root=2024", "--auto-augment", "true", "checkpoint=null", "lr=1e-4",
            "memory_budget_gib=3", "epochs=4"]
    cfg = config_mod.config_from_argv(argv, config_mod.FINETUNE_KEYS, None, fixed={"mode": "finetune"})
    assert (cfg["name"], cfg["output_dir"], cfg["data_root"], cfg["auto_augment"]) == ("007", "1e3", "2024", "true")
    assert cfg["checkpoint"] is None and cfg["lr"] == 1e-4 and cfg["memory_budget_gib"] == 3.0 and cfg["epochs"] == 4
    assert config_mod.config_from_argv(["--resume", "1"])["resume"] == "1"  # pretraining's nullable path key
    with pytest.raises(config_mod.ConfigError, match="name must be a string"):  # a list is no text
        config_mod.config_from_argv(["name=[1, 2]"])


def test_the_subcommand_fixes_the_mode_and_the_script_takes_it_from_the_command_line(monkeypatch, capsys):
    """`mae-fast linprobe mode=finetune` used to finetune; now the contradiction is refused before any work. The
    script (`torchrun train/finetune.py`) has no subcommand, so there `mode=linprobe` chooses the probe."""
    fixed = {"mode": "linprobe"}
    with pytest.raises(config_mod.ConfigError, match="mode='finetune' contradicts the command, which sets "
                                                     "mode='linprobe'"):
        config_mod.config_from_argv(["mode=finetune"], config_mod.FINETUNE_KEYS, None, fixed=fixed)
    same = config_mod.config_from_argv(["mode=linprobe"], config_mod.FINETUNE_KEYS, None, fixed=fixed)
    assert same["mode"] == "linprobe"
    seen = []
    monkeypatch.setattr(ft, "finetune", lambda cfg: seen.append(cfg["mode"]) or {})
    assert ft.main(["mode=finetune"], mode="linprobe") == 2 and seen == []
    assert "mae-fast linprobe: mode='finetune' contradicts" in capsys.readouterr().err
    assert ft.main(["mode=linprobe"]) == 0 and ft.main([]) == 0 and seen == ["linprobe", "finetune"]
