"""Run configuration: typed settings read from YAML recipes (``train/recipes/*.yaml``), then overrides.

:class:`PretrainConfig` and :class:`FinetuneConfig` have one field per recipe key, with its type, default and
meaning (the help line ``--help`` prints). A recipe or an override naming a key that is not a field is an error
that lists the valid keys. Overrides come as ``key=value``, ``key.sub=value``, ``--key value`` or
``--key=value``; values are parsed as YAML (``true``, ``1e-4``, ``[0.9, 0.95]``, ``null``), except that a key
taking a string (a name, a path, a choice) keeps the text given (``name=2024`` is the name "2024", not a number).

The parsing works on plain dicts (``build_config`` / ``config_from_argv`` return one, in field order, as
``config.yaml`` and checkpoints store it); ``PretrainConfig.build`` / ``FinetuneConfig.build`` give the typed
settings the training loops read.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml

# the recipes ship with the entry points (package data of mae_fast.train); reading them is data access only
RECIPE_DIR = Path(str(files("mae_fast.train") / "recipes"))


class ConfigError(ValueError):
    """A bad recipe, key or value; the message says what is wrong and what is allowed."""


def key(default, help_: str):
    """A config field: its default (copied for lists and dicts) and the help line ``--help`` prints."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help_})
    return field(default=default, metadata={"help": help_})


class _Config:
    """What both configs share: building from a dict of keys, and back."""

    @classmethod
    def keys(cls) -> dict[str, tuple]:
        """{key: (default, help)} in field order."""
        out = {}
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out[f.name] = (default, f.metadata["help"])
        return out

    @classmethod
    def from_dict(cls, cfg: dict):
        """Typed settings from a checked dict (every key present, e.g. from :func:`build_config`)."""
        return cls(**cfg)

    @classmethod
    def build(cls, config=None, default_recipe: str | None = None):
        """Settings from a dict of keys (``recipe`` picks the base recipe) or from settings already built."""
        if isinstance(config, cls):
            return config
        keys = KEYS[cls]
        return cls.from_dict(build_config(config, keys, default_recipe if default_recipe is not None
                                          else DEFAULT_RECIPE[cls]))

    def to_dict(self) -> dict:
        """The settings as ``config.yaml`` and the checkpoints store them (deep copies)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass
class PretrainConfig(_Config):
    """MAE pretraining settings: one field per recipe key (``train/recipes/*.yaml``; documented again, with the
    demo recipe's values, in ``train/recipes/demo.yaml``). The help line of each is what ``--help`` prints."""

    name: str | None = key(None, "run name; the run directory is <output_dir>/<name> (default: the recipe's name)")
    output_dir: str = key("runs", "where run directories go")
    # model
    model: str = key("mae_vit_demo_patch8", "registered model (mae_fast.list_models())")
    model_kwargs: dict = key({}, "extra create_model overrides, e.g. model_kwargs.depth=2")
    img_size: int | list | None = key(None, "input resolution (null: the model's default)")
    norm_pix_loss: bool = key(False, "normalise each target patch by its mean/std (official recipe: true)")
    mask_ratio: float = key(0.75, "fraction of patches removed")
    # data
    data_source: str | None = key(None, "null: the built-in demo videos; a folder / shard pattern; 'synthetic'")
    hours: float | None = key(None, "hours of video to draw from the source (null: all)")
    subset: str = key("contiguous", "how an hours-subset is chosen (contiguous | uniform)")
    fps: float = key(1.0, "frames per second sampled from video sources")
    synthetic_size: int = key(4096, "number of images of the 'synthetic' source")
    num_workers: int = key(0, "DataLoader workers (0: load in the training process)")
    # schedule
    batch_size: int = key(64, "GLOBAL batch per optimizer step (all ranks x accum_steps)")
    accum_steps: int = key(1, "gradient accumulation micro-steps per optimizer step")
    epochs: int = key(10, "epochs over the data; sets the schedule length")
    steps: int | None = key(None, "optimizer steps in the whole run (overrides epochs when set)")
    stop_at_step: int | None = key(None, "stop (with a checkpoint) at this step without changing the schedule")
    time_limit_s: float | None = key(None, "stop (with a checkpoint) after this many seconds of training")
    # optimiser
    base_lr: float = key(1.5e-4, "lr = base_lr * batch_size / 256 (when lr is null)")
    lr: float | None = key(None, "absolute peak learning rate (overrides base_lr)")
    lr_schedule: str = key("cosine", "cosine | constant (both after a linear warmup)")
    warmup_epochs: float = key(0.0, "linear warmup length in epochs")
    warmup_steps: int | None = key(None, "linear warmup length in steps (overrides warmup_epochs)")
    min_lr: float = key(0.0, "floor of the cosine schedule")
    weight_decay: float = key(0.05, "AdamW weight decay (none on biases, norms, tokens, pos embeddings)")
    betas: list = key([0.9, 0.95], "AdamW betas")
    clip_grad: float | None = key(None, "clip the global gradient norm to this (null: no clipping)")
    # performance
    precision: str = key("auto", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32 | fp8 (torchao float8 "
                         "matmuls for the encoder's linears of width >= fp8_min_width, bf16 elsewhere)")
    compile: bool | str = key("auto", "torch.compile the training step: auto (on CUDA, off on the CPU) | true | false")
    compile_scope: str = key("model", "model (whole graph) | blocks (each transformer block: faster to compile)")
    grad_checkpointing: bool | int = key(False, "recompute block activations in backward (saves memory): true for all "
                                         "blocks, or a number of blocks, decoder first (see mae-fast memory)")
    memory_budget_gib: float | str | None = key("auto", "GiB a training step may allocate per device: a number, auto (90% of the "
                                                "GPU's memory; off on the CPU) or null (off). If the estimated peak does "
                                                "not fit, lean activations and then the fewest checkpointed blocks are "
                                                "turned on (see mae-fast memory)")
    lean_activations: bool = key(False, "keep only LayerNorm inputs and fc1 outputs for backward, recompute "
                                 "the rest (about half the saved activations under bf16; same loss)")
    distributed: str = key("auto", "auto | ddp | fsdp | none (with torchrun; auto: FSDP2 if DDP would not fit)")
    device: str = key("auto", "auto | cpu | cuda")
    peak_flops: float | None = key(None, "peak FLOP/s of one device for MFU (null: from a table of known GPUs)")
    # checkpoints, logging
    checkpoint_every: int = key(200, "save a checkpoint every N optimizer steps (and at the end)")
    keep_checkpoints: int = key(3, "keep the newest K checkpoints")
    resume: str | None = key(None, "null | auto (newest valid checkpoint in the run dir) | a checkpoint path (the "
                             "run dir's checkpoints of later steps are moved to a set-aside-after-step-N folder)")
    log_every: int = key(10, "write a metrics line every N steps")
    vis_every: int = key(0, "write a reconstruction PNG every N steps (0: only at the end)")
    vis_images: int = key(8, "images in the reconstruction grid")
    progress: bool = key(True, "show a tqdm progress bar")
    max_bad_steps: int = key(5, "stop after this many non-finite losses in a row")
    seed: int = key(0, "seed for init, data order and masking")
    debug_nan_steps: list = key([], "test hook: make the loss NaN at these steps")
    debug_step_sleep_s: float = key(0.0, "test hook: sleep this long after every step (kill tests)")
    # image-count subsets (image folders and WebDataset shards; mae_fast.data.image_subsets)
    images: int | None = key(None, "number of images drawn from an image-folder or shard data_source (null: all); "
                             "recorded in the run dir (subset.json, subset.txt.gz) and replayed on resume")
    subset_strategy: str = key("random", "how an images-subset is chosen: random (seeded hash rank, nested across "
                               "sizes) | per_source (equal share per top-level folder, water-filled)")
    # precision: fp8 (mae_fast.precision)
    fp8_min_width: int = key(1024, "precision fp8: convert the encoder's qkv/proj/fc1/fc2 whose narrower side has at "
                             "least this many features (narrower ones gain less than their casts cost)")
    # reconstruction target (mae_fast.targets; docs/training.md#reconstruction-targets)
    target: str | None = key(None, "what the decoder reconstructs: pixels | norm_pix | hog | teacher (null: norm_pix "
                             "if norm_pix_loss, else pixels)")
    teacher: str | None = key(None, "target=teacher: a mae_fast run dir or checkpoint, an official MAE .pth, or "
                              "timm:<name> (a timm ViT with local weights)")
    teacher_weights: str | None = key(None, "weights file of a timm teacher (null: timm's local cache; never "
                                      "downloaded)")
    teacher_model: str | None = key(None, "registered model of an official MAE teacher checkpoint (null: found "
                                    "from its shapes)")
    teacher_layer: int | None = key(None, "teacher block whose tokens are the target: null the output after the "
                                    "final norm, k >= 1 block k, -1 the last block before the norm")
    hog_bins: int = key(9, "target=hog: orientation bins over [0, pi) (MaskFeat: 9)")
    hog_cell: int = key(8, "target=hog: cell size in pixels, dividing the patch size (MaskFeat: 8)")
    hog_window: int = key(0, "target=hog: Gaussian window in pixels weighting the gradients (0: off)")
    # mixed resolutions, packing, phases, init (mae_fast/training/packing.py)
    img_sizes: list | None = key(None, "resolutions (square, in pixels) to draw images at, e.g. [224, 476] (null: img_size)")
    img_size_weights: list | None = key(None, "relative weight of each of img_sizes (null: equal)")
    packing: bool = key(False, "each image draws its own resolution; a step's images run as one packed sequence "
                        "(forward_packed); false: one resolution per step")
    tokens_per_batch: int | None = key(None, "patches per step instead of batch_size images (as many images as fit)")
    phases: list | None = key(None, "[{steps: N, img_size / img_sizes / img_size_weights / batch_size / "
                              "tokens_per_batch / packing: ...}, ...]: settings per stretch of steps; the run's "
                              "length is their sum")
    init_from: str | None = key(None, "start from these weights (a run dir, a mae_fast checkpoint or an official MAE "
                                "checkpoint; position tables fitted to img_size) with a fresh optimizer and schedule")


@dataclass
class FinetuneConfig(_Config):
    """Finetuning / linear-probe settings (``train/recipes/finetune/*.yaml``); help lines as for
    :class:`PretrainConfig`."""

    name: str | None = key(None, "run name; results go to <output_dir>/<name> (default: finetune or linprobe)")
    output_dir: str = key("runs", "where run directories go")
    mode: str = key("finetune", "finetune | linprobe")
    checkpoint: str | None = key(None, "encoder weights: a mae_fast run dir or checkpoint, an official MAE .pth, a timm "
                                 "export (null: the newest checkpoint in runs/demo, else random init)")
    model: str = key("mae_vit_demo_patch8", "registered model whose encoder is used")
    model_kwargs: dict = key({}, "extra create_model overrides")
    img_size: int | list | None = key(None, "input resolution (null: the model's default)")
    data_root: str | None = key(None, "labelled image folder (class per sub-folder); null: the demo labelled set")
    fraction: float = key(1.0, "fraction of training images kept per class (low-label protocol: 0.02)")
    num_workers: int = key(0, "DataLoader workers")
    epochs: int = key(50, "training epochs")
    batch_size: int = key(64, "batch size (global: shared by the processes and the accumulation micro-steps)")
    accum_steps: int = key(1, "gradient accumulation micro-steps per optimizer step (the same gradient as one "
                           "batch, except that the linear probe's BatchNorm sees each micro-batch)")
    base_lr: float | None = key(None, "lr = base_lr * batch_size / 256 (null: 1e-3 finetune, 0.1 linprobe)")
    lr: float | None = key(None, "absolute learning rate (overrides base_lr)")
    min_lr: float = key(1e-6, "floor of the cosine schedule")
    warmup_epochs: float = key(5.0, "linear warmup epochs")
    weight_decay: float | None = key(None, "null: 0.05 finetune (AdamW), 0.0 linprobe")
    linprobe_optimizer: str = key("sgd", "linprobe optimizer: sgd (momentum 0.9) or lars (MAE's protocol, made for "
                                  "batch 16384: at small batches its trust ratio barely moves the head)")
    layer_decay: float = key(0.75, "layer-wise lr decay for finetuning (1.0: off)")
    drop_path: float = key(0.1, "stochastic depth rate for finetuning")
    label_smoothing: float = key(0.1, "label smoothing for finetuning")
    auto_augment: str | None = key(None, "timm augmentation policy for training images, e.g. rand-m9-mstd0.5-inc1 "
                                   "(RandAugment, MAE's finetuning), augmix-m5-w4-d2, original (null: off)")
    reprob: float = key(0.0, "random erasing probability (timm's, per-pixel noise; MAE's finetuning: 0.25)")
    mixup: float = key(0.0, "mixup alpha (timm's Mixup; MAE's finetuning: 0.8; 0: off)")
    cutmix: float = key(0.0, "cutmix alpha (MAE's finetuning: 1.0; 0: off); with mixup, each batch takes one of "
                        "the two at random")
    pool: str = key("cls", "cls | mean | mean_fc_norm: the feature the head sees (normed cls token, mean of the normed "
                    "patch tokens, or MAE's finetuning global_pool: their mean before the final norm through "
                    "a new LayerNorm)")
    precision: str = key("auto", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32")
    grad_checkpointing: bool | int = key(False, "recompute the encoder blocks' activations in backward (saves memory)")
    memory_budget_gib: float | str | None = key("auto", "GiB a step may allocate: a number, auto (90% of the GPU; off on the "
                                                "CPU) or null; when the estimated peak does not fit, gradient "
                                                "checkpointing is turned on")
    device: str = key("auto", "auto | cpu | cuda")
    progress: bool = key(True, "show a tqdm progress bar")
    seed: int = key(0, "seed")
    resume: str | None = key("auto", "auto: continue an interrupted run of the same settings from its last checkpoint "
                             "(an epoch's, or the step a signal stopped it at) | null: start over")
    checkpoint_every: int = key(1, "save the training state every this many epochs, for resuming (0: never); "
                                "removed when the run finishes")
    # the human-like-video protocol's settings (train/recipes/finetune/humanlike_finetune.yaml, docs/humanlike.md)
    head: str = key("linear", "linear | bn_linear: the finetuning head; bn_linear puts a BatchNorm without affine "
                    "parameters (eps 1e-6, in the gradient path) before the linear layer (the probe always has it)")
    head_init_std: float | None = key(None, "std of the head weight's truncated-normal init (null: 2e-5 finetune, "
                                      "0.01 linprobe)")
    lr_schedule: str = key("cosine", "cosine | constant, after the linear warmup")
    decay_all: bool = key(False, "weight decay on every parameter (biases, norms, tokens, position embedding too: "
                          "plain AdamW over model.parameters()); false: none on those")
    crop_scale: list = key([0.2, 1.0], "RandomResizedCrop area range of the training images")
    eval_resize_margin: int | None = key(None, "resize validation images to img_size + this many pixels, then centre "
                                         "crop img_size (null: img_size / 0.875, MAE's)")
    label_sampling: str = key("per_class", "how fraction draws the labelled images (seeded by seed): per_class "
                              "(round(fraction x n_c) of each class), balanced (round(fraction x N / C) in every "
                              "class) or uniform (int(fraction x N) of the whole set)")
    report: str = key("best", "best | final: the top-1 a run reports (results.json reported_top1, what a sweep's "
                      "table records): the best epoch's or the last epoch's")
    drop_path_mode: str = key("efficient", "efficient (each block's residual branch runs on the kept samples only, "
                              "DINOv2's way: same expectation, less work) | timm (timm's DropPath: every sample, zeroed)")


PRETRAIN_KEYS: dict[str, tuple] = PretrainConfig.keys()
FINETUNE_KEYS: dict[str, tuple] = FinetuneConfig.keys()
KEYS = {PretrainConfig: PRETRAIN_KEYS, FinetuneConfig: FINETUNE_KEYS}
DEFAULT_RECIPE = {PretrainConfig: "demo", FinetuneConfig: None}


def defaults(keys: dict) -> dict:
    return {k: copy.deepcopy(v[0]) for k, v in keys.items()}


def recipe_dir(keys: dict) -> Path:
    """Pretraining recipes in train/recipes, finetuning / linear-probing ones in train/recipes/finetune."""
    return RECIPE_DIR / "finetune" if keys is FINETUNE_KEYS else RECIPE_DIR


def list_recipes(keys: dict = PRETRAIN_KEYS) -> list[str]:
    return sorted(p.stem for p in recipe_dir(keys).glob("*.yaml"))


def _unknown_key_error(key: str, keys: dict, where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[0], list(keys), n=3, cutoff=0.75)  # not "bogus" -> "hours"
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}; valid keys: {', '.join(sorted(keys))}")


def parse_value(text: str):
    """A command-line value as YAML, with numbers like ``1e-4`` (a string to YAML 1.1) as floats."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _nullable_types(*classes) -> dict:
    """The type of keys whose default is null, from their annotation (``int | None`` -> 0), as a sample value;
    the other keys take their default's type."""
    out = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
            if f.default is None and len(args) == 1 and args[0] in (str, int, float):
                out[f.name] = args[0]()
    return out


NULLABLE_TYPES = _nullable_types(PretrainConfig, FinetuneConfig)


def _coerce(key: str, value, default):
    """Check ``value`` against the default's type (ints are fine where floats are expected)."""
    if value is None:
        return value
    if key == "memory_budget_gib" and value != "auto":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
        raise ConfigError(f"memory_budget_gib must be a positive number of GiB, auto or null, got {value!r}")
    if key == "compile":
        if isinstance(value, bool) or value == "auto":
            return value
        raise ConfigError(f"compile must be auto, true or false, got {value!r}")
    if key == "grad_checkpointing" and not isinstance(value, bool):
        if isinstance(value, int) and value >= 0:
            return value
        raise ConfigError(f"grad_checkpointing must be true, false or a number of blocks, got {value!r}")
    if default is None:
        if key == "img_size":
            if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
                return list(value)
            default = 0
        elif key in NULLABLE_TYPES:
            default = NULLABLE_TYPES[key]
        else:
            return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if isinstance(default, list):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    return value


def _set(cfg: dict, keys: dict, dotted: str, value, where: str) -> None:
    top, _, sub = dotted.partition(".")
    if top not in keys:
        raise _unknown_key_error(dotted, keys, where)
    default = keys[top][0]
    if sub:
        if not isinstance(default, dict):
            raise ConfigError(f"{top} is not a mapping, so {dotted!r} is not a key")
        node = cfg[top] = dict(cfg.get(top) or {})
        *path, last = sub.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
        return
    cfg[top] = _coerce(top, value, default)


def load_recipe(recipe: str | os.PathLike, keys: dict = PRETRAIN_KEYS) -> dict:
    """A recipe (name in train/recipes or a YAML path) merged over the defaults."""
    path = Path(recipe)
    if not path.suffix and not path.exists():
        path = recipe_dir(keys) / f"{recipe}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe {str(recipe)!r} not found; built-in recipes: {', '.join(list_recipes(keys))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of key: value")
    cfg = defaults(keys)
    for k, v in data.items():
        _set(cfg, keys, str(k), v, f"recipe {path}")
    if cfg.get("name") is None:
        cfg["name"] = path.stem
    return cfg


def merge(base: dict, overrides: dict, keys: dict, where: str = "overrides") -> dict:
    cfg = copy.deepcopy(base)
    for k, v in overrides.items():
        _set(cfg, keys, str(k), v, where)
    return cfg


def build_config(config: dict | None, keys: dict = PRETRAIN_KEYS, default_recipe: str | None = "demo") -> dict:
    """Python API: ``config`` may name a ``recipe`` (default ``default_recipe``); its keys override."""
    config = dict(config or {})
    recipe = config.pop("recipe", default_recipe)
    base = load_recipe(recipe, keys) if recipe else defaults(keys)
    return merge(base, config, keys, "config")


def parse_overrides(argv: list[str]) -> tuple[str | None, dict]:
    """``--config X`` plus ``key=value`` / ``--key value`` / ``--key=value`` pairs (in order)."""
    recipe, pairs, _ = _parse_overrides(argv)
    return recipe, pairs


def _parse_overrides(argv: list[str]) -> tuple[str | None, dict, dict]:
    """parse_overrides, plus each value's text as given."""
    recipe, pairs, texts, i = None, {}, {}, 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            body = tok[2:]
            if "=" in body:
                key, text = body.split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{tok} needs a value")
                key, text = body, argv[i + 1]
                i += 1
        elif "=" in tok:
            key, text = tok.split("=", 1)
        else:
            raise ConfigError(f"cannot parse argument {tok!r}: use key=value or --key value")
        key = key.replace("-", "_") if key not in ("config",) else key
        if key == "config":
            recipe = text
        else:
            pairs[key], texts[key] = parse_value(text), text
        i += 1
    return recipe, pairs, texts


def _takes_text(key: str, keys: dict) -> bool:
    """A key whose value is a string (a name, a path, a choice), so that ``name=2024`` is the text 2024."""
    if key not in keys or key in ("memory_budget_gib", "compile"):  # a number of GiB / true or false, or auto
        return False
    default = keys[key][0]
    return isinstance(default, str) or (default is None and NULLABLE_TYPES.get(key) == "")


def config_from_argv(argv: list[str], keys: dict = PRETRAIN_KEYS, default_recipe: str | None = "demo",
                     fixed: dict | None = None) -> dict:
    recipe, pairs, texts = _parse_overrides(argv)
    # YAML reads name=2024 or output_dir=1e3 as numbers (and name=007 as 7): string keys keep the text as given
    pairs = {k: texts[k] if isinstance(v, (bool, int, float)) and _takes_text(k, keys) else v for k, v in pairs.items()}
    for k, v in (fixed or {}).items():  # `mae-fast linprobe mode=finetune` would finetune: refuse the contradiction
        if k in pairs and pairs[k] != v:
            raise ConfigError(f"{k}={pairs[k]!r} contradicts the command, which sets {k}={v!r}")
    base = load_recipe(recipe or default_recipe, keys) if (recipe or default_recipe) else defaults(keys)
    cfg = merge(base, fixed or {}, keys, "command")
    return merge(cfg, pairs, keys, "command line")


def help_text(keys: dict, prog: str, values: dict | None = None, recipe: str | None = None) -> str:
    """Every key with its meaning and the value a run would take: ``values`` (a recipe's, merged over the defaults)
    when given, else the defaults."""
    rows = [f"usage: {prog} [--config RECIPE|path.yaml] [key=value ...] [--key value ...]", "",
            f"recipes: {', '.join(list_recipes(keys))}", "",
            f"keys (the value each takes with the recipe {recipe}; `--config X --help` shows X's):" if recipe else
            "keys:"]
    for k, (d, h) in keys.items():
        rows.append(f"  {k:<20} {h} [default: {(values or {}).get(k, d)!r}]")
    return "\n".join(rows)


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
