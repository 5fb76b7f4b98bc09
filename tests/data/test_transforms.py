"""Image transforms (mae_fast/data/transforms.py): resizing against PIL's bicubic, normalisation, the random
resized crop's area, aspect, position and fallback, the centre crop by hand, flip probability, and the finetuning
augmentations against timm's own pieces, draw for draw."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from mae_fast.data import IMAGENET_MEAN, IMAGENET_STD
from mae_fast.data.transforms import (EvalTransform, Normalize, TrainTransform, center_crop_box, crop_resize,
                                      random_resized_crop_box)


def test_resize_matches_pil_bicubic():
    from PIL import Image

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 15, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    image = np.clip(smooth.astype(int) + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
    box = (5, 9, 77, 91)
    ours = crop_resize(image, box, (37, 45)).permute(1, 2, 0).numpy() * 255
    crop = Image.fromarray(image[5:82, 9:100])
    ref = np.asarray(crop.resize((45, 37), Image.BICUBIC), dtype=np.float64)
    assert np.abs(ours - ref).mean() < 1.0 and np.abs(ours - ref).max() < 12


def test_transforms_normalise_and_crop():
    image = np.full((50, 70, 3), (124, 116, 104), np.uint8)  # ~ the ImageNet mean
    ev = EvalTransform(32)(image)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(ev, (torch.tensor([124, 116, 104]).view(3, 1, 1) / 255 - mean) / std, atol=1e-6)
    grad = np.tile(np.arange(100, dtype=np.uint8)[None, :, None], (100, 1, 3))
    torch.manual_seed(1)
    crops = [TrainTransform(16, scale=(0.2, 1.0))(grad) for _ in range(20)]
    assert all(c.shape == (3, 16, 16) for c in crops)
    flipped = [bool((c[0, 0, -1] < c[0, 0, 0]).item()) for c in crops]  # horizontal flips reverse the ramp
    assert 3 <= sum(flipped) <= 17
    torch.manual_seed(1)
    assert all(torch.equal(a, TrainTransform(16)(grad)) for a in crops[:3])


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original"])
def test_finetuning_augmentation_is_timms_in_maes_order(policy):
    """auto_augment and re_prob: crop and flip (as without them), then timm's policy on the uint8 PIL crop, normalise,
    then timm's RandomErasing, draw for draw; rebuilt here from timm's pieces on the plain transform's output."""
    import random

    from PIL import Image
    from timm.data import auto_augment as aa
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import str_to_pil_interp

    from mae_fast.data.transforms import Normalize, denormalize

    image = np.random.default_rng(3).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    size = (24, 40)
    tf = TrainTransform(size, auto_augment=policy, re_prob=1.0)
    assert not tf.draws_only_torch_rng and TrainTransform(size).draws_only_torch_rng
    assert policy in repr(tf) and "re_prob=1.0" in repr(tf)
    hp = {"translate_const": int(24 * 0.45), "img_mean": (124, 116, 104), "interpolation": str_to_pil_interp("bicubic")}
    for seed in range(4):
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        got = tf(image)
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        crop = denormalize(TrainTransform(size)(image))  # the same torch draws: box and flip
        pil = Image.fromarray(crop.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
        if policy.startswith("rand"):
            policy_tf = aa.rand_augment_transform(policy, dict(hp))
        elif policy.startswith("augmix"):
            policy_tf = aa.augment_and_mix_transform(policy, dict(hp, translate_pct=0.3))
        else:
            policy_tf = aa.auto_augment_transform(policy, dict(hp))
        out = torch.from_numpy(np.array(policy_tf(pil), dtype=np.uint8)).permute(2, 0, 1).float() / 255
        want = RandomErasing(probability=1.0, mode="pixel", device="cpu")(Normalize()(out))
        assert got.shape == (3, *size) and torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(got, TrainTransform(size)(image))
    with pytest.raises(ValueError, match="auto_augment 'rand-q9' is not a policy timm knows"):
        TrainTransform(16, auto_augment="rand-q9")
    with pytest.raises(ValueError, match=r"re_prob must be in \[0, 1\]"):
        TrainTransform(16, re_prob=1.5)


def _boxes(n, *args, seed=0, **kw):
    torch.manual_seed(seed)
    return np.array([random_resized_crop_box(*args, **kw) for _ in range(n)])


def test_random_resized_crop_area_within_scale():
    """Areas uniform in [0.3, 0.5] of 301 x 233: all inside (up to rounding), mean about 0.4."""
    boxes = _boxes(400, 301, 233, scale=(0.3, 0.5))
    frac = boxes[:, 2] * boxes[:, 3] / (301 * 233)
    assert frac.min() > 0.3 * 0.97 and frac.max() < 0.5 * 1.03
    assert 0.38 < frac.mean() < 0.42
    assert (boxes[:, 0] + boxes[:, 2] <= 301).all() and (boxes[:, 1] + boxes[:, 3] <= 233).all()


def test_random_resized_crop_aspect_is_log_uniform_and_width_over_height():
    """ratio (1/4, 4) is log-uniform: w < h about half the time (linear-uniform would give 1/5); ratio (1.5, 2.5)
    keeps every box wider than high within the bounds."""
    boxes = _boxes(400, 1001, 1003, scale=(0.04, 0.06), ratio=(1 / 4, 4))
    assert 0.4 < (boxes[:, 3] < boxes[:, 2]).mean() < 0.6
    boxes = _boxes(300, 1001, 1003, scale=(0.04, 0.06), ratio=(1.5, 2.5))
    aspect = boxes[:, 3] / boxes[:, 2]
    assert aspect.min() > 1.5 * 0.98 and aspect.max() < 2.5 * 1.02


def test_random_resized_crop_position_reaches_every_offset():
    """A fixed 7 x 9 box in 21 x 31: top takes each of 0..14 and left each of 0..22 (the far edge included)."""
    boxes = _boxes(2000, 21, 31, scale=(63 / 651, 63 / 651), ratio=(9 / 7, 9 / 7))
    assert set(boxes[:, 2]) == {7} and set(boxes[:, 3]) == {9}
    tops, lefts = collections.Counter(boxes[:, 0]), collections.Counter(boxes[:, 1])
    assert set(tops) == set(range(15)) and set(lefts) == set(range(23))
    assert min(tops.values()) > 2000 / 15 / 2 and min(lefts.values()) > 2000 / 23 / 2


def test_random_resized_crop_fallback_is_the_centred_box_of_clamped_aspect():
    """With no draw accepted: a 101 x 31 (tall) image keeps 41 x 31 (31 / (3/4) = 41.3), a 31 x 101 (wide) one
    31 x 41 (31 * 4/3), an in-range 40 x 45 one the whole image; all centred."""
    assert random_resized_crop_box(101, 31, attempts=0) == (30, 0, 41, 31)
    assert random_resized_crop_box(31, 101, attempts=0) == (0, 30, 31, 41)
    assert random_resized_crop_box(40, 45, attempts=0) == (0, 0, 40, 45)


def test_centre_crop_box_by_hand():
    """51 x 70 to 32 at crop_pct 0.875: cover 32/0.875 = 36.57 -> scale 32/51/0.875, kept 44.625 -> 45 square,
    top (51-45)//2 = 3, left (70-45)//2 = 12."""
    assert center_crop_box(51, 70, (32, 32), 0.875) == (3, 12, 45, 45)
    assert center_crop_box(70, 51, (32, 32), 0.875) == (12, 3, 45, 45)
    assert center_crop_box(51, 70, (51, 70), 1.0) == (0, 0, 51, 70)


def test_eval_transform_pixels_are_the_centre_crop():
    """EvalTransform(45, crop_pct=45/51) on 51 x 70 keeps image[3:48, 12:57] unresized: compare pixels."""
    image = np.random.default_rng(2).integers(0, 255, (51, 70, 3), dtype=np.uint8)
    got = EvalTransform(45, crop_pct=45 / 51)(image)
    ref = torch.from_numpy(image[3:48, 12:57].astype(np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(got, (ref - mean) / std, atol=1e-5)
    assert torch.allclose(Normalize()(ref), (ref - mean) / std)


def test_flip_probability_is_the_one_given():
    """flip=0.2 over 300 fixed-seed draws flips about 60 times (a ramp reversed); flip=0 never, flip=1 always."""
    ramp = np.tile(np.arange(0, 250, 5, dtype=np.uint8)[None, :, None], (37, 1, 3))  # 37 x 50, brighter to the right

    def flips(p, n):
        torch.manual_seed(0)
        tf = TrainTransform(15, scale=(0.9, 1.0), flip=p)
        return sum(bool(x[0, 7, -1] < x[0, 7, 0]) for x in (tf(ramp) for _ in range(n)))

    assert 30 <= flips(0.2, 300) <= 90
    assert flips(0.0, 40) == 0 and flips(1.0, 40) == 40
