"""The human-like-video evaluation protocol (recipes humanlike_finetune / humanlike_finetune_stringent): one
finetuning step against a hand transcription of the published step, the seeded class-balanced label subsets and
their counts on ImageNet's size, the validation resize, and the reported top-1."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mae_fast.data.label_subsets import label_subset, subset_counts
from mae_fast.data.transforms import center_crop_box
from mae_fast.training import distributed as dist_mod
from mae_fast.training import finetune as ft
from mae_fast.training.config import ConfigError, FinetuneConfig, load_recipe, FINETUNE_KEYS
from mae_fast.training.finetune_protocol import eval_crop_pct, record_report

TINY = dict(embed_dim=32, num_heads=2, depth=2)
IMAGENET_TRAIN, IMAGENET_CLASSES = 1_281_167, 1000


class Images(torch.utils.data.Dataset):
    def __init__(self, n, classes=5, size=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _published_step(model, imgs, labels, lr):
    """The published step written out in plain torch ([F] eval_finetune.py, [E] engine_finetune.py of the
    human-like study): the final-normed cls token -> BatchNorm1d(affine=False, eps=1e-6) in training mode ->
    Linear; mean cross-entropy; torch.optim.AdamW over every parameter, weight_decay=0.05, default betas / eps."""
    enc, w, b = model.encoder, model.head.weight, model.head.bias
    params = [p for p in enc.parameters()] + [w, b]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    enc.train()
    feats = enc.forward_features(imgs)[:, 0]
    mean, var = torch.zeros(feats.shape[1]), torch.ones(feats.shape[1])
    z = F.batch_norm(feats, mean, var, None, None, training=True, momentum=0.1, eps=1e-6)
    loss = F.cross_entropy(F.linear(z, w, b), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return dict(enc.named_parameters(prefix="encoder")) | {"head.weight": w, "head.bias": b}, mean


def test_one_step_under_the_recipe_is_the_published_step(tmp_path):
    cfg = FinetuneConfig.build(dict(recipe="humanlike_finetune", checkpoint=None, model_kwargs=TINY, img_size=16,
                                    batch_size=8, output_dir=str(tmp_path), progress=False, memory_budget_gib=None,
                                    device="cpu", precision="fp32"))
    with pytest.warns(RuntimeWarning, match="random weights"), dist_mod.process_group("cpu") as info:
        run = ft.setup(cfg, info, (Images(8), Images(4, seed=1), list("abcde")))
    model = run.model
    assert isinstance(model.bn, torch.nn.BatchNorm1d) and not model.bn.affine and model.bn.eps == 1e-6
    assert model.pool == "cls" and float(model.head.bias.detach().abs().max()) == 0.0
    assert 0.007 < float(model.head.weight.detach().std()) < 0.012  # trunc_normal_(std=0.01)
    reference = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    imgs, labels = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)

    loss, stop = ft.train_step(run, imgs, labels, 8, 0, [])
    assert stop is None and all(grp["lr"] == pytest.approx(1e-4, rel=1e-12) for grp in run.optimizer.param_groups)
    expected, running_mean = _published_step(reference, imgs, labels, lr=1e-4)
    ours = {n: p.detach() for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert set(ours) == set(expected)
    for name, p in ours.items():
        torch.testing.assert_close(grads[name], expected[name].grad, rtol=1e-4, atol=1e-9, msg=name)
        assert float((p - expected[name].detach()).abs().max()) < 1e-6, name
    moved = max(float((p - before[n]).abs().max()) for n, p in ours.items())
    assert moved > 5e-5  # the step is ~lr per parameter: far above the 1e-6 agreement
    # every parameter decays (LayerNorm weights at 1.0 by lr x 0.05 = 5e-6 a step, 5x the agreement asked)
    assert {grp["weight_decay"] for grp in run.optimizer.param_groups} == {0.05}
    torch.testing.assert_close(model.bn.running_mean, running_mean)
    assert run.lr(10 ** 6) == run.lr(0) == 1e-4  # constant: no warmup, no decay


def _folder(sizes):
    files = [f"c{c:02d}/img{i:04d}.png" for c, n in enumerate(sizes) for i in range(n)]
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    return files, labels, [f"c{c:02d}" for c in range(len(sizes))]


def test_balanced_subsets_are_exact_per_class_seeded_and_nested():
    sizes = [40, 55, 61, 47, 3, 90, 52, 44, 38, 70]  # 500 images; one class smaller than its share
    files, labels, classes = _folder(sizes)
    kept, kept_labels = label_subset(files, labels, classes, 0.2, seed=1, sampling="balanced")
    assert np.bincount(kept_labels, minlength=10).tolist() == [10, 10, 10, 10, 3, 10, 10, 10, 10, 10]
    assert all(f.startswith(classes[y]) for f, y in zip(kept, kept_labels)) and len(set(kept)) == len(kept)
    assert label_subset(files, labels, classes, 0.2, seed=1, sampling="balanced")[0] == kept
    other = label_subset(files, labels, classes, 0.2, seed=2, sampling="balanced")[0]
    assert other != kept and len(other) == len(kept)
    smaller = label_subset(files, labels, classes, 0.1, seed=1, sampling="balanced")[0]
    assert np.bincount([classes.index(f[:3]) for f in smaller]).tolist() == [5, 5, 5, 5, 3, 5, 5, 5, 5, 5]
    assert set(smaller) < set(kept)  # nested at one seed
    order = np.random.default_rng(0).permutation(len(files))  # the listing order does not change the draw
    shuffled = label_subset([files[i] for i in order], [labels[i] for i in order], classes, 0.2, 1, "balanced")[0]
    assert sorted(shuffled) == sorted(kept)
    uniform = label_subset(files, labels, classes, 0.2, seed=1, sampling="uniform")[0]
    assert len(uniform) == 100 and set(label_subset(files, labels, classes, 0.05, 1, "uniform")[0]) < set(uniform)
    assert uniform != label_subset(files, labels, classes, 0.2, seed=2, sampling="uniform")[0]
    assert label_subset(files, labels, classes, 1.0, 1, "balanced")[0] == files
    with pytest.raises(ValueError, match="label_sampling"):
        label_subset(files, labels, classes, 0.2, 1, "stratified")


def test_permissive_and_stringent_counts_on_imagenet():
    sizes = [1282] * 167 + [1281] * 833  # ImageNet's 1,281,167 training images in 1,000 classes
    assert sum(sizes) == IMAGENET_TRAIN
    for recipe, per_class, uniform in (("humanlike_finetune", 26, 25_623),
                                       ("humanlike_finetune_stringent", 13, 13_000)):
        r = load_recipe(recipe, FINETUNE_KEYS)
        assert r["label_sampling"] == "balanced"
        assert subset_counts(sizes, r["fraction"], "balanced") == [per_class] * IMAGENET_CLASSES
        assert subset_counts(sizes, r["fraction"], "uniform") == uniform  # the published script's draw


def test_validation_resize_margin_and_crop_scale():
    cfg = FinetuneConfig.build(dict(recipe="humanlike_finetune"))
    for size in (224, 448, 476):  # resize the short side to size + 32, centre-crop size
        assert center_crop_box(size + 32, 2 * size, (size, size), eval_crop_pct(cfg, size))[2] == size
    assert cfg.crop_scale == [0.08, 1.0] and eval_crop_pct(FinetuneConfig(), 224) == 0.875
    with pytest.raises(ConfigError, match="crop_scale"):
        ft.check_config(dataclass_replace(cfg, crop_scale=[0.5, 0.1]), 1)
    with pytest.raises(ConfigError, match="head must be"):
        ft.check_config(dataclass_replace(cfg, head="mlp"), 1)


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


@pytest.mark.parametrize("report, expected", [("best", 31.5), ("final", 30.0)])
def test_reported_top1_is_the_protocols_pick(tmp_path, report, expected):
    history = [{"top1": 20.0}, {"top1": 31.5}, {"top1": 30.0}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"top1": 31.5}))
    cfg = FinetuneConfig.build(dict(recipe="humanlike_finetune", report=report))
    result = record_report(cfg, {"top1": 31.5}, history, {"top1": 31.5}, path, True)
    assert result["reported_top1"] == expected == json.loads(path.read_text())["reported_top1"]
