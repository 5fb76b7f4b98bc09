"""Run configuration: YAML recipes (``train/recipes/*.yaml``) merged over defaults, then overrides.

A config is a flat dict (a few values are dicts, e.g. ``model_kwargs``). Every key has a default
and a help line below; a recipe or an override naming a key that is not here is an error that
lists the valid keys. Overrides come as ``key=value``, ``key.sub=value``, ``--key value`` or
``--key=value``; values are parsed as YAML (``true``, ``1e-4``, ``[0.9, 0.95]``, ``null``), except that a key
taking a string (a name, a path, a choice) keeps the text given (``name=2024`` is the name "2024", not a number)."""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path

import yaml

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


class ConfigError(ValueError):
    """A bad recipe, key or value; the message says what is wrong and what is allowed."""


def _spec(default, help_):
    return (default, help_)


# Pretraining keys. (default, help). Documented again, with the recipe's values, in recipes/demo.yaml.
PRETRAIN_KEYS: dict[str, tuple] = {
    "name": _spec(None, "run name; the run directory is <output_dir>/<name> (default: the recipe's name)"),
    "output_dir": _spec("runs", "where run directories go"),
    # model
    "model": _spec("mae_vit_demo_patch8", "registered model (mae_fast.list_models())"),
    "model_kwargs": _spec({}, "extra create_model overrides, e.g. model_kwargs.depth=2"),
    "img_size": _spec(None, "input resolution (null: the model's default)"),
    "norm_pix_loss": _spec(False, "normalise each target patch by its mean/std (official recipe: true)"),
    "mask_ratio": _spec(0.75, "fraction of patches removed"),
    # data
    "data_source": _spec(None, "null: the built-in demo images; a folder / shard pattern; 'synthetic'"),
    "hours": _spec(None, "hours of video to draw from the source (null: all)"),
    "subset": _spec("contiguous", "how an hours-subset is chosen (contiguous | uniform)"),
    "fps": _spec(1.0, "frames per second sampled from video sources"),
    "synthetic_size": _spec(4096, "number of images of the 'synthetic' source"),
    "num_workers": _spec(0, "DataLoader workers (0: load in the training process)"),
    # schedule
    "batch_size": _spec(64, "GLOBAL batch per optimizer step (all ranks x accum_steps)"),
    "accum_steps": _spec(1, "gradient accumulation micro-steps per optimizer step"),
    "epochs": _spec(10, "epochs over the data; sets the schedule length"),
    "steps": _spec(None, "optimizer steps in the whole run (overrides epochs when set)"),
    "stop_at_step": _spec(None, "stop (with a checkpoint) at this step without changing the schedule"),
    "time_limit_s": _spec(None, "stop (with a checkpoint) after this many seconds of training"),
    # optimiser
    "base_lr": _spec(1.5e-4, "lr = base_lr * batch_size / 256 (when lr is null)"),
    "lr": _spec(None, "absolute peak learning rate (overrides base_lr)"),
    "lr_schedule": _spec("cosine", "cosine | constant (both after a linear warmup)"),
    "warmup_epochs": _spec(0.0, "linear warmup length in epochs"),
    "warmup_steps": _spec(None, "linear warmup length in steps (overrides warmup_epochs)"),
    "min_lr": _spec(0.0, "floor of the cosine schedule"),
    "weight_decay": _spec(0.05, "AdamW weight decay (none on biases, norms, tokens, pos embeddings)"),
    "betas": _spec([0.9, 0.95], "AdamW betas"),
    "clip_grad": _spec(None, "clip the global gradient norm to this (null: no clipping)"),
    # performance
    "precision": _spec("auto", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32"),
    "compile": _spec(False, "torch.compile the model"),
    "compile_scope": _spec("model", "model (whole graph) | blocks (each transformer block: faster to compile)"),
    "grad_checkpointing": _spec(False, "recompute block activations in backward (saves memory): true for all "
                                        "blocks, or a number of blocks, decoder first (see mae-fast memory)"),
    "memory_budget_gib": _spec("auto", "GiB a training step may allocate per device: a number, auto (90% of the "
                                       "GPU's memory; off on the CPU) or null (off). If the estimated peak does "
                                       "not fit, lean activations and then the fewest checkpointed blocks are "
                                       "turned on (see mae-fast memory)"),
    "lean_activations": _spec(False, "keep only LayerNorm inputs and fc1 outputs for backward, recompute "
                                     "the rest (about half the saved activations under bf16; same loss)"),
    "distributed": _spec("auto", "auto | ddp | fsdp | none (with torchrun; auto: FSDP2 if DDP would not fit)"),
    "device": _spec("auto", "auto | cpu | cuda"),
    "peak_flops": _spec(None, "peak FLOP/s of one device for MFU (null: from a table of known GPUs)"),
    # checkpoints, logging
    "checkpoint_every": _spec(200, "save a checkpoint every N optimizer steps (and at the end)"),
    "keep_checkpoints": _spec(3, "keep the newest K checkpoints"),
    "resume": _spec(None, "null | auto (newest valid checkpoint in the run dir) | a checkpoint path (the "
                                "run dir's checkpoints of later steps are moved to a set-aside-after-step-N folder)"),
    "log_every": _spec(10, "write a metrics line every N steps"),
    "vis_every": _spec(0, "write a reconstruction PNG every N steps (0: only at the end)"),
    "vis_images": _spec(8, "images in the reconstruction grid"),
    "progress": _spec(True, "show a tqdm progress bar"),
    "max_bad_steps": _spec(5, "stop after this many non-finite losses in a row"),
    "seed": _spec(0, "seed for init, data order and masking"),
    "debug_nan_steps": _spec([], "test hook: make the loss NaN at these steps"),
    "debug_step_sleep_s": _spec(0.0, "test hook: sleep this long after every step (kill tests)"),
}

# Finetuning / linear-probe keys.
FINETUNE_KEYS: dict[str, tuple] = {
    "name": _spec(None, "run name; results go to <output_dir>/<name> (default: finetune or linprobe)"),
    "output_dir": _spec("runs", "where run directories go"),
    "mode": _spec("finetune", "finetune | linprobe"),
    "checkpoint": _spec(None, "encoder weights: a mae_fast run dir or checkpoint, an official MAE .pth, a timm "
                              "export (null: the newest checkpoint in runs/demo, else random init)"),
    "model": _spec("mae_vit_demo_patch8", "registered model whose encoder is used"),
    "model_kwargs": _spec({}, "extra create_model overrides"),
    "img_size": _spec(None, "input resolution (null: the model's default)"),
    "data_root": _spec(None, "labelled image folder (class per sub-folder); null: the demo labelled set"),
    "fraction": _spec(1.0, "fraction of training images kept per class (low-label protocol: 0.02)"),
    "num_workers": _spec(0, "DataLoader workers"),
    "epochs": _spec(50, "training epochs"),
    "batch_size": _spec(64, "batch size (global: shared by the processes and the accumulation micro-steps)"),
    "accum_steps": _spec(1, "gradient accumulation micro-steps per optimizer step (the same gradient as one "
                            "batch, except that the linear probe's BatchNorm sees each micro-batch)"),
    "base_lr": _spec(None, "lr = base_lr * batch_size / 256 (null: 1e-3 finetune, 0.1 linprobe)"),
    "lr": _spec(None, "absolute learning rate (overrides base_lr)"),
    "min_lr": _spec(1e-6, "floor of the cosine schedule"),
    "warmup_epochs": _spec(5.0, "linear warmup epochs"),
    "weight_decay": _spec(None, "null: 0.05 finetune (AdamW), 0.0 linprobe"),
    "linprobe_optimizer": _spec("sgd", "linprobe optimizer: sgd (momentum 0.9) or lars (MAE's protocol, made for "
                                       "batch 16384: at small batches its trust ratio barely moves the head)"),
    "layer_decay": _spec(0.75, "layer-wise lr decay for finetuning (1.0: off)"),
    "drop_path": _spec(0.1, "stochastic depth rate for finetuning"),
    "label_smoothing": _spec(0.1, "label smoothing for finetuning"),
    "auto_augment": _spec(None, "timm augmentation policy for training images, e.g. rand-m9-mstd0.5-inc1 "
                                "(RandAugment, MAE's finetuning), augmix-m5-w4-d2, original (null: off)"),
    "reprob": _spec(0.0, "random erasing probability (timm's, per-pixel noise; MAE's finetuning: 0.25)"),
    "mixup": _spec(0.0, "mixup alpha (timm's Mixup; MAE's finetuning: 0.8; 0: off)"),
    "cutmix": _spec(0.0, "cutmix alpha (MAE's finetuning: 1.0; 0: off); with mixup, each batch takes one of "
                         "the two at random"),
    "pool": _spec("cls", "cls | mean | mean_fc_norm: the feature the head sees (normed cls token, mean of the normed "
                         "patch tokens, or MAE's finetuning global_pool: their mean before the final norm through "
                         "a new LayerNorm)"),
    "precision": _spec("auto", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32"),
    "grad_checkpointing": _spec(False, "recompute the encoder blocks' activations in backward (saves memory)"),
    "memory_budget_gib": _spec("auto", "GiB a step may allocate: a number, auto (90% of the GPU; off on the "
                                       "CPU) or null; when the estimated peak does not fit, gradient "
                                       "checkpointing is turned on"),
    "device": _spec("auto", "auto | cpu | cuda"),
    "progress": _spec(True, "show a tqdm progress bar"),
    "seed": _spec(0, "seed"),
    "resume": _spec("auto", "auto: continue an interrupted run of the same settings from its last checkpoint "
                            "(an epoch's, or the step a signal stopped it at) | null: start over"),
    "checkpoint_every": _spec(1, "save the training state every this many epochs, for resuming (0: never); "
                                 "removed when the run finishes"),
}


def defaults(keys: dict) -> dict:
    return {k: copy.deepcopy(v[0]) for k, v in keys.items()}


def recipe_dir(keys: dict) -> Path:
    """Pretraining recipes in train/recipes, finetuning / linear-probing ones in train/recipes/finetune."""
    return RECIPE_DIR / "finetune" if keys is FINETUNE_KEYS else RECIPE_DIR


def list_recipes(keys: dict = PRETRAIN_KEYS) -> list[str]:
    return sorted(p.stem for p in recipe_dir(keys).glob("*.yaml"))


def _unknown_key_error(key: str, keys: dict, where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[0], list(keys), n=3)
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


# the type of keys whose default is null (the others take their default's type)
NULLABLE_TYPES = {
    "name": "", "data_source": "", "resume": "", "checkpoint": "", "data_root": "",
    "steps": 0, "stop_at_step": 0, "warmup_steps": 0,
    "time_limit_s": 0.0, "lr": 0.0, "base_lr": 0.0, "clip_grad": 0.0, "peak_flops": 0.0, "hours": 0.0,
    "weight_decay": 0.0, "auto_augment": "",
}


def _coerce(key: str, value, default):
    """Check ``value`` against the default's type (ints are fine where floats are expected)."""
    if value is None:
        return value
    if key == "memory_budget_gib" and value != "auto":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
        raise ConfigError(f"memory_budget_gib must be a positive number of GiB, auto or null, got {value!r}")
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
    if key not in keys or key == "memory_budget_gib":  # a number of GiB, or auto
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


def help_text(keys: dict, prog: str) -> str:
    rows = [f"usage: {prog} [--config RECIPE|path.yaml] [key=value ...] [--key value ...]", "",
            f"recipes: {', '.join(list_recipes(keys))}", "", "keys:"]
    for k, (d, h) in keys.items():
        rows.append(f"  {k:<20} {h} [default: {d!r}]")
    return "\n".join(rows)


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
