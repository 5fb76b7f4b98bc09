"""Reconstruction targets: what the decoder predicts for each removed patch.

A :class:`Target` has a ``width`` (features per patch, the width of the decoder's prediction head) and
``compute(imgs) -> (B, L, width)``, fp32, in the model's patch order. Four kinds (``target:`` in pretraining):

- ``pixels`` / ``norm_pix``: the patch's pixels, raw or normalised by their own mean and (unbiased) variance, as
  the official MAE. The model computes these itself (``external`` is False: no target tensor is passed, the
  fused loss op reads the image); ``target: null`` picks one of them from ``norm_pix_loss``.
- ``hog``: MaskFeat's histograms of oriented gradients (:func:`mae_fast.ops.hog`): per colour channel, Sobel
  gradients, ``hog_bins`` unsigned-orientation bins per ``hog_cell`` x ``hog_cell`` cell, each cell's histogram
  L2-normalised; width ``3 * hog_bins * (patch // hog_cell)**2`` (27 for the demo's 8-px patches, 108 at 16 px).
- ``teacher``: the patch tokens of a frozen ViT encoder (MaskAlign / EVA / MILAN style), from ``teacher=``: a
  mae_fast run directory or checkpoint, an official MAE ``.pth``, or ``timm:<name>`` (a timm ViT; weights from
  ``teacher_weights=`` or timm's local cache, never downloaded). How it is matched and normalised:

  * it sees the whole (unmasked) image, under ``no_grad``, in the training precision (the run's autocast; its
    weights are cast to that dtype), after the student's data augmentation;
  * grids: the image is resized (bilinear, antialiased when shrinking) to the student's patch grid times the
    teacher's patch size, so teacher token (i, j) covers exactly the pixels of student patch (i, j); with equal
    patch sizes the image is used as is. The teacher is built at that resolution and its position embeddings
    resampled (sin-cos tables regenerated exactly, learned ones interpolated);
  * ``teacher_layer``: null takes the encoder's output (after its final norm); k >= 1 block k's output, -1 the
    last block's before the final norm (negative counts from the end); the blocks after it are dropped;
  * each token's feature vector is normalised by a LayerNorm without affine parameters (zero mean, unit
    variance over its features, eps 1e-6), as MaskFeat / MILAN / EVA-style feature targets are, so the loss
    scale does not depend on the teacher's feature scale; the target is that fp32 tensor, width the teacher's.

The memory planner counts a teacher's weights and its (gradient-free) forward: :func:`teacher_spec` describes
the teacher so :func:`mae_fast.memory.estimate_mae_step` can rebuild it on the meta device.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .training.config import ConfigError

__all__ = ["TARGETS", "Target", "PixelTarget", "HOGTarget", "TeacherTarget", "resolve_target", "build_target",
           "compute", "load_teacher", "build_teacher_encoder", "teacher_features", "TargetError"]

TARGETS = ("pixels", "norm_pix", "hog", "teacher")


class TargetError(ConfigError):
    """A bad target setting (a contradiction, a teacher that cannot be loaded); one line (exit code 2 in the CLI)."""


class Target:
    """What the decoder reconstructs: ``width`` features per patch, ``compute(imgs)`` -> (B, L, width) fp32."""

    name: str = ""
    width: int = 0
    external: bool = True  # computed here and passed to the model's forward as ``target`` (False: the model does)

    def compute(self, imgs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def model_kwargs(self) -> dict:
        """create_model overrides the student needs for this target."""
        return {"norm_pix_loss": False, "target_dim": self.width}

    def describe(self) -> dict:
        return {"target": self.name, "width": self.width}


@dataclass
class PixelTarget(Target):
    patch_size: int
    in_chans: int = 3
    norm: bool = False
    external = False

    @property
    def name(self) -> str:
        return "norm_pix" if self.norm else "pixels"

    @property
    def width(self) -> int:
        return self.patch_size**2 * self.in_chans

    def compute(self, imgs):
        """The official ``patchify`` order (row, column, channel inside a patch), normalised per patch with norm."""
        t = ops.patchify(imgs.float(), self.patch_size)
        if self.norm:
            t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
        return t

    def model_kwargs(self) -> dict:
        return {"norm_pix_loss": self.norm}


@dataclass
class HOGTarget(Target):
    patch_size: int
    in_chans: int = 3
    bins: int = 9
    cell: int = 8
    window: int = 0
    name = "hog"

    @property
    def width(self) -> int:
        return self.in_chans * self.bins * (self.patch_size // self.cell) ** 2

    def compute(self, imgs):
        return ops.hog(imgs, self.patch_size, bins=self.bins, cell=self.cell, window=self.window)

    def describe(self) -> dict:
        return {"target": "hog", "width": self.width, "bins": self.bins, "cell": self.cell, "window": self.window}


# ---- teacher ---------------------------------------------------------------------------------------------------

def build_teacher_encoder(spec: dict) -> nn.Module:
    """The teacher's timm ViT from :func:`teacher_spec`'s description, random weights, frozen, cut at its layer."""
    if spec["kind"] == "timm":
        import timm

        enc = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
    else:
        from timm.models.vision_transformer import VisionTransformer

        enc = VisionTransformer(**spec["kwargs"])
    return _freeze(_cut(enc, spec.get("layer")))


def _cut(enc: nn.Module, layer: int | None) -> nn.Module:
    if layer is None:
        return enc
    depth = len(enc.blocks)
    k = layer if layer > 0 else depth + 1 + layer
    if not 1 <= k <= depth:
        raise TargetError(f"teacher_layer={layer} is outside the teacher's {depth} blocks "
                          f"(1..{depth}, or -1..-{depth})")
    enc.blocks = enc.blocks[:k]
    enc.norm = nn.Identity()
    return enc


def _freeze(enc: nn.Module) -> nn.Module:
    enc.eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def teacher_features(enc: nn.Module, imgs: torch.Tensor, in_size: tuple[int, int]) -> torch.Tensor:
    """(B, L, D) fp32: the teacher's patch tokens of ``imgs`` resized to ``in_size``, LayerNorm'ed per token."""
    with torch.no_grad():
        x = imgs
        if tuple(x.shape[-2:]) != tuple(in_size):
            shrink = in_size[0] < x.shape[-2] or in_size[1] < x.shape[-1]
            x = F.interpolate(x, size=tuple(in_size), mode="bilinear", align_corners=False, antialias=shrink)
        tokens = enc.forward_features(x)[:, getattr(enc, "num_prefix_tokens", 1):]
        return F.layer_norm(tokens.float(), tokens.shape[-1:], eps=1e-6)


class TeacherTarget(Target):
    name = "teacher"

    def __init__(self, encoder: nn.Module, spec: dict, in_size: tuple[int, int], source: str):
        self.encoder, self.spec, self.in_size, self.source = encoder, spec, tuple(in_size), source
        self.width = int(encoder.embed_dim)

    def compute(self, imgs):
        return teacher_features(self.encoder, imgs, self.in_size)

    def describe(self) -> dict:
        return {"target": "teacher", "width": self.width, "teacher": self.source, "kind": self.spec["kind"],
                "input_size": list(self.in_size), "layer": self.spec.get("layer"),
                "params": sum(p.numel() for p in self.encoder.parameters())}


def _mae_source(ref: str, output_dir: str | None = None) -> Path | None:
    path = Path(ref)
    if path.is_dir():
        from mae_fast.training import checkpoint

        found = checkpoint.latest_valid_checkpoint(path)
        if found is None:
            raise TargetError(f"teacher={ref!r}: no valid checkpoint in that run directory")
        return Path(found[0])
    return path if path.is_file() else None


def _registered_like(state: dict, teacher_model: str | None) -> tuple[str, dict]:
    """(registered model, overrides) of an official MAE checkpoint, from ``teacher_model`` or its tensors' shapes."""
    from mae_fast.models.registry import list_models, model_config

    if teacher_model is not None:
        if teacher_model not in list_models():
            raise TargetError(f"teacher_model {teacher_model!r} is not registered; available: "
                              f"{', '.join(list_models())}")
        return teacher_model, {}
    try:
        width = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    except (KeyError, ValueError) as e:
        raise TargetError(f"the teacher checkpoint is not a ViT-MAE encoder (missing {e})") from None
    for name in list_models():
        c = model_config(name)
        if (c["embed_dim"], c["depth"], c["patch_size"]) == (width, depth, patch):
            return name, {}
    raise TargetError(f"no registered model has width {width}, depth {depth}, patch {patch}: name the "
                      f"teacher's architecture with teacher_model=")


def _load_mae_teacher(path: Path, grid: tuple[int, int], layer, teacher_model) -> tuple[nn.Module, dict]:
    from mae_fast.models import create_model, export_timm, load_pretrained, model_config, timm_model_kwargs
    from mae_fast.models.checkpoint import _read
    from mae_fast.training.finetune import _peek_pretrain_config

    pre = _peek_pretrain_config(path)
    if pre is not None:  # a mae_fast checkpoint: the architecture it was trained as
        name, kw = pre["model"], {k: v for k, v in (pre.get("model_kwargs") or {}).items()
                                  if k not in ("img_size", "target_dim", "norm_pix_loss")}
        state = path
    else:
        state = _read(path)
        name, kw = _registered_like(state, teacher_model)
    patch = model_config(name, **kw)["patch_size"]
    try:
        # the decoder is never used: a minimal one (its checkpoint tensors are not loaded)
        kw.update(decoder_depth=0, decoder_embed_dim=8, decoder_num_heads=1)
        mae = create_model(name, **kw, img_size=(grid[0] * patch, grid[1] * patch))
        load_pretrained(mae, state, encoder_only=True)  # position tables resampled to this grid
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise TargetError(f"teacher {str(path)!r}: {' '.join(str(e).split())[:300]}") from e
    spec = {"kind": "vit", "kwargs": timm_model_kwargs(mae), "layer": layer}
    enc = build_teacher_encoder({**spec, "layer": None})
    enc.load_state_dict(export_timm(mae), strict=True)
    return _freeze(_cut(enc, layer)), spec


def _load_timm_teacher(name: str, grid, weights, layer) -> tuple[nn.Module, dict]:
    import timm

    if not timm.is_model(name):
        raise TargetError(f"teacher: {name!r} is neither a file, a run directory nor a timm model name")
    probe = timm.create_model(name, pretrained=False)
    patch = getattr(getattr(probe, "patch_embed", None), "patch_size", None)
    if patch is None or not hasattr(probe, "blocks"):
        raise TargetError(f"teacher: timm model {name!r} is not a ViT (no patch embedding): not supported")
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    kwargs = {"num_classes": 0, "img_size": (grid[0] * patch, grid[1] * patch)}
    overlay = {"file": str(weights)} if weights else None
    if weights and not Path(weights).is_file():
        raise TargetError(f"teacher_weights {str(weights)!r}: no such file")
    try:
        enc = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as e:  # noqa: BLE001 - offline hub, a wrong file: one line
        raise TargetError(f"teacher: could not load weights for timm model {name!r} (pass a local file as "
                          f"teacher_weights=): {' '.join(str(e).split())[:200]}") from e
    spec = {"kind": "timm", "name": name, "kwargs": kwargs, "layer": layer}
    return _freeze(_cut(enc, layer)), spec


def load_teacher(ref: str, grid: tuple[int, int], *, weights: str | None = None, layer: int | None = None,
                 teacher_model: str | None = None, device=None, dtype: torch.dtype | None = None) -> TeacherTarget:
    """A frozen teacher for a student of patch grid ``grid`` (rows, columns); see the module docstring."""
    if not ref:
        raise TargetError("target=teacher needs teacher= (a run directory, a checkpoint, or timm:<name>)")
    ref = str(ref)
    if ref.startswith("timm:"):
        enc, spec = _load_timm_teacher(ref[5:], grid, weights, layer)
    else:
        path = _mae_source(ref)
        if path is not None:
            enc, spec = _load_mae_teacher(path, grid, layer, teacher_model)
        else:
            enc, spec = _load_timm_teacher(ref, grid, weights, layer)
    patch = enc.patch_embed.patch_size
    in_size = (grid[0] * patch[0], grid[1] * patch[1])
    enc = enc.to(device=device, dtype=dtype)
    return TeacherTarget(enc, spec, in_size, ref)


def teacher_spec(target: Target | None) -> dict | None:
    """What the memory planner rebuilds on the meta device: the teacher's architecture, input size and dtype."""
    if not isinstance(target, TeacherTarget):
        return None
    dtype = next(target.encoder.parameters()).dtype
    return {**target.spec, "in_size": target.in_size, "dtype": str(dtype).replace("torch.", "")}


# ---- from the run configuration -------------------------------------------------------------------------------

def resolve_target(target: str | None, norm_pix_loss: bool) -> str:
    """The target's name: ``target`` (null or auto: norm_pix with norm_pix_loss, else pixels); a contradiction
    (``target=pixels norm_pix_loss=true``) is an error."""
    if target in (None, "auto"):
        return "norm_pix" if norm_pix_loss else "pixels"
    if target not in TARGETS:
        raise TargetError(f"target must be one of {', '.join(TARGETS)} (or null), got {target!r}")
    if target == "pixels" and norm_pix_loss:
        raise TargetError("target=pixels contradicts norm_pix_loss=true: use target=norm_pix, or norm_pix_loss=false")
    return target


def build_target(cfg, device=None, amp_dtype: torch.dtype | None = None) -> Target:
    """The target of a pretraining config (``PretrainConfig``: target, norm_pix_loss, hog_*, teacher*)."""
    from mae_fast.models import model_config

    name = resolve_target(cfg.target, bool(cfg.norm_pix_loss))
    kw = dict(cfg.model_kwargs or {})
    if cfg.img_size is not None:
        kw["img_size"] = cfg.img_size
    try:
        arch = model_config(cfg.model, **{k: v for k, v in kw.items() if k != "target_dim"})
    except (ValueError, TypeError) as e:
        raise TargetError(f"model {cfg.model!r}: {e}") from e
    patch, chans = int(arch["patch_size"]), int(arch.get("in_chans", 3))
    if name in ("pixels", "norm_pix"):
        return PixelTarget(patch, chans, norm=name == "norm_pix")
    if name == "hog":
        for key in ("hog_bins", "hog_cell"):
            if getattr(cfg, key) < 1:
                raise TargetError(f"{key} must be at least 1, got {getattr(cfg, key)}")
        if cfg.hog_window < 0:
            raise TargetError(f"hog_window must be >= 0 (0: off), got {cfg.hog_window}")
        if patch % cfg.hog_cell:
            raise TargetError(f"hog_cell={cfg.hog_cell} does not divide the patch size {patch}")
        return HOGTarget(patch, chans, cfg.hog_bins, cfg.hog_cell, cfg.hog_window)
    size = arch.get("img_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return load_teacher(cfg.teacher, (h // patch, w // patch), weights=cfg.teacher_weights, layer=cfg.teacher_layer,
                        teacher_model=cfg.teacher_model, device=device, dtype=amp_dtype)


def compute(target: Target | None, imgs: torch.Tensor) -> torch.Tensor | None:
    """The ``target`` tensor to pass to the model's forward: None for the targets the model computes itself."""
    if target is None or not target.external:
        return None
    return target.compute(imgs)
