"""Protocol identity of a results row: which pretraining and evaluation settings produced its number.

A row's ``protocol`` is a readable name (the pretraining recipe + the evaluation protocol and its recipe);
``protocol_hash`` is a short hash of :func:`protocol_settings`: the resolved pretraining recipe (defaults, recipe
file, the grid's keys), the grid's budget rule, the frame rate, the model's non-size overrides and the resolved
evaluation settings, **without** what does not change the number (paths, seeds, output folders, logging,
checkpoint and visualisation cadence, devices and speed-only switches) and without the grid's own axes (model
size, data amount, resolution, seed), which are the fit's variables. ``protocol_json`` keeps the settings, so a
mismatch can say which settings differ.

Rows of different protocols measure different things: :func:`check_protocols` refuses to mix them in one fit
unless told to. Tables without these columns (e.g. a published table) count as one protocol, ``unrecorded``.
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Mapping

import numpy as np

from .table import TableError

__all__ = ["protocol_settings", "protocol_hash", "protocol_name", "protocol_columns", "check_protocols",
           "ProtocolMismatch", "UNRECORDED", "EXCLUDED_KEYS"]

UNRECORDED = "unrecorded"

# keys that never change a run's number (or are the fit's own axes), wherever they appear
EXCLUDED_KEYS = frozenset({
    # paths and names
    "name", "output_dir", "out_dir", "data_source", "source", "data_root", "root", "checkpoint", "resume",
    "teacher_path", "manifest",
    # the grid's axes (the fit's variables) and what follows from them
    "model", "img_size", "hours", "images", "seed", "data_fraction", "total_hours", "steps", "subset_images",
    "epochs_of_subset",
    # logging, checkpoint and visualisation cadence, progress
    "log_every", "checkpoint_every", "keep_checkpoints", "vis_every", "vis_images", "progress", "eval_every",
    "save_every",
    # devices and speed-only switches
    "num_workers", "device", "distributed", "compile", "compile_scope", "grad_checkpointing", "lean_activations",
    "memory_budget_gib", "peak_flops", "max_bad_steps", "debug_nan_steps", "debug_step_sleep_s", "stop_at_step",
    "time_limit_s", "num_classes",
})
# model constructor overrides that are its size (an axis), not a setting
SIZE_OVERRIDES = frozenset({"embed_dim", "depth", "num_heads", "mlp_ratio", "img_size", "patch_size"})


class ProtocolMismatch(TableError):
    """A table mixes rows of different protocols (``--mixed-protocols`` fits them together anyway)."""


def _clean(block: Mapping) -> dict:
    return {k: v for k, v in block.items() if k not in EXCLUDED_KEYS}


def _resolved(block: Mapping, keys_name: str) -> dict:
    """A grid block over the recipe it names (``recipe``), the recipe over its defaults, where they load."""
    block = dict(block)
    recipe = block.pop("recipe", None)
    try:
        from mae_fast.training import config as tc

        keys = getattr(tc, keys_name)
        base = tc.load_recipe(recipe, keys) if recipe else tc.defaults(keys)
        merged = tc.merge(base, {k: v for k, v in block.items() if k in keys}, keys)
        merged.update({k: v for k, v in block.items() if k not in keys})
    except Exception:  # noqa: BLE001 - an unknown recipe or key: hash what the grid says
        merged = dict(block, **({"recipe": recipe} if recipe else {}))
    return _clean(merged)


def protocol_settings(config: Mapping) -> dict:
    """The settings of a run's config (a grid run's ``config``) that change its number, as a nested dict."""
    config = copy.deepcopy(dict(config))
    budget = dict(config.get("budget") or {})
    rule = budget.get("rule", "images_seen")
    keep = {"rule", "batch_size", "images_seen" if rule == "images_seen" else "epochs"}
    pretrain = _resolved(config.get("pretrain") or {}, "PRETRAIN_KEYS")
    for k in ("batch_size", "epochs", "fps"):  # the grid's budget and data block set these per run
        pretrain.pop(k, None)
    overrides = (config.get("model") or {}).get("overrides") or {}
    evaluation = dict(config.get("eval") or {})
    protocol = evaluation.pop("protocol", "finetune")
    evaluation = _resolved(evaluation, "FINETUNE_KEYS")
    evaluation["protocol"] = protocol
    return {
        "pretrain": pretrain,
        "model": {k: v for k, v in overrides.items() if k not in SIZE_OVERRIDES},
        "budget": {k: v for k, v in budget.items() if k in keep},
        "data": {"fps": (config.get("data") or {}).get("fps", 1.0)},
        "eval": evaluation,
    }


def protocol_hash(settings: Mapping) -> str:
    """8 hex digits of the settings' canonical JSON."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def protocol_name(config: Mapping) -> str:
    """E.g. ``humanlike_vith14 + finetune:humanlike_finetune`` (pretraining recipe + evaluation protocol)."""
    pre = (config.get("pretrain") or {}).get("recipe") or "defaults"
    ev = config.get("eval") or {}
    name = f"{pre} + {ev.get('protocol', 'finetune')}"
    return name + (f":{ev['recipe']}" if ev.get("recipe") else "")


def protocol_columns(config: Mapping) -> dict:
    """The ``protocol``, ``protocol_hash`` and ``protocol_json`` cells of a run's results row."""
    settings = protocol_settings(config)
    return {"protocol": protocol_name(config), "protocol_hash": protocol_hash(settings),
            "protocol_json": json.dumps(settings, sort_keys=True, default=str)}


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def row_protocols(table) -> tuple[np.ndarray, dict[str, dict | None], dict[str, str]]:
    """Per row its protocol key (the hash, or ``unrecorded``); per key its settings (None: unknown) and name."""
    n = len(table)
    hashes = table["protocol_hash"] if "protocol_hash" in table else np.array([""] * n, dtype=object)
    names = np.array(list(table["protocol"]) if "protocol" in table else [""] * n, dtype=object)
    settings_col = table["protocol_json"] if "protocol_json" in table else None
    config_col = table["config_json"] if "config_json" in table else None
    keys = np.empty(n, dtype=object)
    settings: dict[str, dict | None] = {}
    labels: dict[str, str] = {}
    for i in range(n):
        h, s = str(hashes[i] or ""), None
        if settings_col is not None and str(settings_col[i] or ""):
            s = json.loads(str(settings_col[i]))
        elif config_col is not None and str(config_col[i] or ""):  # rows written before the protocol columns
            cfg = json.loads(str(config_col[i]))
            s = protocol_settings(cfg)
            h = h or protocol_hash(s)
            names[i] = names[i] or protocol_name(cfg)
        key = h or UNRECORDED
        keys[i] = key
        settings.setdefault(key, s)
        labels.setdefault(key, str(names[i] or "") or key)
    return keys, settings, labels


def check_protocols(table, allow_mixed: bool = False) -> str:
    """The table's protocol (a readable label); raises :class:`ProtocolMismatch` when rows of different protocols
    are mixed and ``allow_mixed`` is False, listing each differing setting on its own line."""
    keys, settings, labels = row_protocols(table)
    uniq = list(dict.fromkeys(keys))
    if len(uniq) == 1:
        k = uniq[0]
        return labels[k] if k == UNRECORDED else f"{labels[k]} [{k}]"
    if allow_mixed:
        return "mixed: " + ", ".join(f"{labels[k]} [{k}] x{int(np.sum(keys == k))}" for k in uniq)
    head = (f"{table.source}: rows of {len(uniq)} protocols: "
            + ", ".join(f"{labels[k]} [{k}] ({int(np.sum(keys == k))} rows)" for k in uniq)
            + "; fit one protocol (filter the table) or pass --mixed-protocols")
    known = [k for k in uniq if settings[k] is not None]
    lines = [head]
    if len(known) < len(uniq):
        lines.append("  settings not recorded for: " + ", ".join(f"{labels[k]} [{k}]" for k in uniq if k not in known))
    flats = {k: _flat(settings[k]) for k in known}
    names = sorted(set().union(*flats.values())) if flats else []
    for name in names:
        values = {k: flats[k].get(name, "(unset)") for k in known}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            lines.append(f"  {name}: " + " vs ".join(f"{json.dumps(v, default=str)} [{k}]" for k, v in values.items()))
    raise ProtocolMismatch("\n".join(lines))
