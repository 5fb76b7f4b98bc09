"""Image transforms on uint8 HWC arrays -> normalised float32 (3, H, W) tensors, with torch only.

torchvision is not a dependency: crops are computed here and resizing is
``F.interpolate(bicubic, antialias=True)``. Random draws use torch's global RNG, so a DataLoader
worker (which seeds torch per worker) or ``torch.manual_seed`` makes them reproducible.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def as_size(img_size) -> tuple[int, int]:
    """``64`` -> ``(64, 64)``; ``(h, w)`` stays; rejects non-positive sizes."""
    if isinstance(img_size, (int, np.integer)):
        size = (int(img_size), int(img_size))
    else:
        size = tuple(int(s) for s in img_size)
        if len(size) != 2:
            raise ValueError(f"img_size must be an int or (H, W), got {img_size!r}")
    if min(size) <= 0:
        raise ValueError(f"img_size must be positive, got {img_size!r}")
    return size


def to_uint8_hwc(image) -> np.ndarray:
    """PIL image / HWC or HW uint8 array -> contiguous HWC uint8 RGB array."""
    if not isinstance(image, np.ndarray):
        image = np.array(image.convert("RGB"))
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image, dtype=np.uint8)


def crop_resize(image: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """Crop ``box = (top, left, height, width)`` of a uint8 HWC array and resize it to ``size``.

    Returns float32 (3, H, W) in [0, 1] (bicubic overshoot clamped, as a uint8 round trip would).
    """
    top, left, h, w = box
    patch = image[top:top + h, left:left + w]
    patch = torch.from_numpy(np.ascontiguousarray(patch) if patch.flags.writeable else np.array(patch))
    patch = patch.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    if (h, w) != tuple(size):
        patch = F.interpolate(patch, size=size, mode="bicubic", align_corners=False, antialias=True)
        patch = patch.clamp_(0.0, 1.0)
    return patch[0]


def random_resized_crop_box(height: int, width: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                            attempts: int = 10) -> tuple[int, int, int, int]:
    """A box covering a random fraction ``scale`` of the area with a log-uniform aspect ``ratio``.

    Falls back to the largest centred box with a clamped aspect when ``attempts`` draws all miss.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        draws = torch.rand(2).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * draws[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,)))
            left = int(torch.randint(0, width - w + 1, (1,)))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, size: tuple[int, int], crop_pct: float = 1.0):
    """The centred source box that a 'resize to cover size/crop_pct, then centre-crop size' would keep."""
    scale = max(size[0] / height, size[1] / width) / crop_pct
    h = min(height, max(1, int(round(size[0] / scale))))
    w = min(width, max(1, int(round(size[1] / scale))))
    return (height - h) // 2, (width - w) // 2, h, w


class Normalize:
    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def auto_augment_transform(policy: str, img_size, mean=IMAGENET_MEAN):
    """timm's RandAugment (``rand-m9-mstd0.5-inc1``, MAE's finetuning), AugMix (``augmix-...``) or AutoAugment
    (``original``, ``v0``, ...) on PIL images, with the hyper-parameters timm's ``create_transform`` gives them;
    a ValueError names a policy timm cannot parse."""
    from timm.data import auto_augment as aa
    from timm.data.transforms import str_to_pil_interp

    hparams = {"translate_const": int(min(as_size(img_size)) * 0.45),
               "img_mean": tuple(min(255, round(255 * m)) for m in mean), "interpolation": str_to_pil_interp("bicubic")}
    try:
        if policy.startswith("rand"):
            return aa.rand_augment_transform(policy, hparams)
        if policy.startswith("augmix"):
            hparams["translate_pct"] = 0.3
            return aa.augment_and_mix_transform(policy, hparams)
        return aa.auto_augment_transform(policy, hparams)
    except Exception as e:  # timm raises AssertionError, KeyError or ValueError on a bad string
        raise ValueError(f"auto_augment {policy!r} is not a policy timm knows (e.g. rand-m9-mstd0.5-inc1, "
                         f"augmix-m5-w4-d2, original): {type(e).__name__}: {e}") from None


class TrainTransform:
    """MAE augmentation: RandomResizedCrop (bicubic) + horizontal flip + normalise; for finetuning, optionally
    an ``auto_augment`` policy (timm's, after the flip, as MAE's finetuning applies RandAugment) and timm's
    RandomErasing with probability ``re_prob`` (per-pixel noise, after normalising)."""

    def __init__(self, img_size=224, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.5,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, auto_augment: str | None = None, re_prob: float = 0.0):
        self.size = as_size(img_size)
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), flip
        self.normalize = Normalize(mean, std)
        if not 0.0 <= re_prob <= 1.0:
            raise ValueError(f"re_prob must be in [0, 1], got {re_prob}")
        self.auto_augment, self.re_prob = auto_augment, float(re_prob)
        self._augment = auto_augment_transform(auto_augment, self.size, mean) if auto_augment else None
        self._erase = None
        if re_prob > 0:
            from timm.data.random_erasing import RandomErasing

            self._erase = RandomErasing(probability=re_prob, mode="pixel", device="cpu")

    @property
    def draws_only_torch_rng(self) -> bool:
        """timm's augmentations draw from Python's and numpy's generators too (see SkippingDataset)."""
        return self._augment is None and self._erase is None

    def __call__(self, image) -> torch.Tensor:
        image = to_uint8_hwc(image)
        box = random_resized_crop_box(image.shape[0], image.shape[1], self.scale, self.ratio)
        x = crop_resize(image, box, self.size)
        if self.flip > 0 and float(torch.rand(())) < self.flip:
            x = x.flip(-1)
        if self._augment is not None:  # PIL in, PIL out: through uint8, as after torchvision's crop
            from PIL import Image

            pil = Image.fromarray(x.mul(255).round_().to(torch.uint8).permute(1, 2, 0).numpy())
            x = torch.from_numpy(np.array(self._augment(pil), dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
        x = self.normalize(x)
        return self._erase(x) if self._erase is not None else x

    def __repr__(self):
        extra = "".join(f", {k}={v!r}" for k, v in (("auto_augment", self.auto_augment), ("re_prob", self.re_prob))
                        if v)
        return f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip}{extra})"


class EvalTransform:
    """Resize (bicubic) to cover ``size / crop_pct``, centre crop ``size``, normalise."""

    def __init__(self, img_size=224, crop_pct: float = 1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size, self.crop_pct = as_size(img_size), crop_pct
        self.normalize = Normalize(mean, std)

    def __call__(self, image) -> torch.Tensor:
        image = to_uint8_hwc(image)
        box = center_crop_box(image.shape[0], image.shape[1], self.size, self.crop_pct)
        return self.normalize(crop_resize(image, box, self.size))

    def __repr__(self):
        return f"EvalTransform(size={self.size}, crop_pct={self.crop_pct})"


def build_transform(img_size, train: bool, scale=(0.2, 1.0), crop_pct: float = 1.0):
    return TrainTransform(img_size, scale=scale) if train else EvalTransform(img_size, crop_pct=crop_pct)


def denormalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Inverse of the normalisation (for visualising reconstructions); works on (..., 3, H, W)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * s + m
