"""Sweep grids: a YAML file naming models x data hours x resolutions x seeds, expanded into runs.

Every run gets a stable id: a readable prefix plus a hash of its resolved configuration (everything
that changes its result: model, data, budget, pretraining and evaluation settings; not where it runs),
so editing a grid only re-runs what changed, and re-running it finds the runs it already has.

Schema (see ``train/grids/*.yaml``)::

    name: demo                          # label; the sweep lives in out_dir (default runs/scaling/<name>)
    out_dir: runs/scaling/demo
    job: mae_fast.scaling.runner:default_job     # "module:function" called as job(config, run_dir)
    data: {source: demo, total_hours: 5000, fps: 1}   # passed to the job; fraction = hours / total_hours
    models:                             # registry names, or dicts of overrides with a `name`
      - mae_vit_small_patch14
      - {name: vitmicro8, base: mae_vit_demo_patch8, embed_dim: 64, depth: 2, num_heads: 2,
         img_sizes: [32]}              # label, registry base + overrides; may restrict its resolutions
      - {base: mae_vit_base_patch14, pretrain: {lr: 3.0e-4}, eval: {batch_size: 128},
         budget: {batch_size: 256}}    # its pretrain / eval / budget keys override the grid's for its runs
    hours: [0.5, 5, 50, {hours: 5000, seeds: [1]}]   # an entry may name its own seeds (one draw of all the data);
                                        # or images: [1000, 10000] (image-count subsets of an image folder or
                                        # shards, with data: {source: ..., total_images: N}; not both)
    img_sizes: [224, 448]
    seeds: [1, 2, 3]
    targets: [pixels, hog, teacher]     # optional: reconstruction targets (pretrain key `target`; a teacher
                                        # from pretrain.teacher); absent: the pretrain block's one target
    budget: {rule: images_seen, images_seen: 2.0e6, batch_size: 256}   # or {rule: epochs, epochs: 10}, {rule: steps,
                                                                       #    steps: 5000}
    pretrain: {mask_ratio: 0.75, lr: 1.5e-4}       # passed through to pretraining
    eval: {protocol: finetune, fraction: 0.02, epochs: 50, num_classes: 1000}   # or linprobe; finetune keys
    executor: {name: local, mode: inprocess}       # local (inprocess|subprocess|torchrun) or slurm; with
                                                   # mode: subprocess, parallel: N runs N at once (CPU cores split
                                                   # evenly, one GPU each where there are GPUs)
    fit: {projections: [{label: ViT-H 476px, params: 632e6, hours: 5000, img_size: 476}], target_accuracy: 60}
                                                   # what `scale run --fit` projects to (optional)
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import yaml

__all__ = ["Grid", "RunSpec", "GridError", "load_grid", "expand", "model_spec", "fit_options", "vit_param_count", "run_id"]

_REGISTRY_NAME = re.compile(r"^mae_vit_(tiny|small|base|large|huge|giant)_patch(\d+)$")
# keys of a model dict that describe the sweep, not the model constructor
_MODEL_META = {"name", "base", "img_sizes", "pretrain", "eval", "budget"}
# the keys of a grid file (see the schema above): anything else is a typo that would be silently ignored
_GRID_KEYS = ("name", "out_dir", "job", "data", "models", "hours", "img_sizes", "seeds", "budget", "pretrain",
              "eval", "executor", "fit", "images", "targets")


class GridError(ValueError):
    """The grid file is malformed; the message names the key."""


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    config: dict = field(hash=False, compare=False)

    def as_dict(self) -> dict:
        return {"run_id": self.run_id, "config": self.config}


@dataclass
class Grid:
    path: Path | None
    name: str
    out_dir: Path
    job: str
    executor: dict
    runs: list[RunSpec]
    raw: dict

    @property
    def table_path(self) -> Path:
        return self.out_dir / "results.csv"

    def run_dir(self, run_id: str) -> Path:
        return self.out_dir / "runs" / run_id

    def get(self, run_id: str) -> RunSpec:
        for r in self.runs:
            if r.run_id == run_id:
                return r
        raise KeyError(f"grid {self.name!r} has no run {run_id!r}")


def vit_param_count(width: int, depth: int, patch_size: int, img_size: int, num_classes: int = 1000,
                    in_chans: int = 3, mlp_ratio: float = 4.0) -> int:
    """Parameters of a ViT encoder (cls token, learned position embedding) plus a linear head.

    Matches the shared table: ViT-B/14 at 224 px -> 86.5M, ViT-H/14 at 224/448/476 px -> 632.0/633.0/633.2M.
    """
    hidden = int(width * mlp_ratio)
    block = 4 * width * width + 4 * width + 2 * width * hidden + hidden + width + 4 * width
    tokens = (img_size // patch_size) ** 2
    embed = in_chans * patch_size * patch_size * width + width + (tokens + 1) * width + width
    head = (width * num_classes + num_classes) if num_classes else 0
    return depth * block + embed + 2 * width + head


def model_spec(entry: str | Mapping) -> dict:
    """Resolve a grid's model entry (a registry name, or a dict with ``base`` and constructor overrides,
    optionally ``name`` as its label and ``img_sizes``) through the model registry."""
    from mae_fast.models.registry import model_config

    if isinstance(entry, str):
        entry = {"base": entry}
    if not isinstance(entry, Mapping):
        raise GridError(f"models: each entry is a registry name or a dict, got {entry!r}")
    base = entry.get("base") or entry.get("name")
    overrides = {k: v for k, v in entry.items() if k not in _MODEL_META}
    try:
        cfg = model_config(str(base), **overrides)
        width, depth, heads, patch = (int(cfg[k]) for k in ("embed_dim", "depth", "num_heads", "patch_size"))
        mlp_ratio = float(cfg.get("mlp_ratio", 4.0))
    except (ValueError, TypeError) as exc:
        raise GridError(f"models: {dict(entry)!r}: {exc}") from None
    m = _REGISTRY_NAME.match(str(base))
    if entry.get("name") and entry["name"] != base:
        arch = str(entry["name"])
    elif m and not overrides:
        arch = f"vit{m.group(1)[0]}{patch}"  # vits14, vith14: the shared table's labels
    else:
        arch = f"vit_w{width}d{depth}p{patch}"
    blocks = {}
    for block in ("pretrain", "eval", "budget"):  # this model's settings over the grid's
        value = entry.get(block) or {}
        if not isinstance(value, Mapping):
            raise GridError(f"models: {dict(entry)!r}: {block} must be a mapping, got {value!r}")
        blocks[block] = dict(value)
    return {"name": str(base), "overrides": overrides, "arch": arch, "width": width, "depth": depth,
            "heads": heads, "patch_size": patch, "mlp_ratio": mlp_ratio,
            "img_sizes": entry.get("img_sizes"), **blocks}


def resolve_budget(budget: Mapping, hours: float | None, fps: float, images: int | None = None) -> dict:
    """Images seen and optimizer steps of one run under the grid's budget rule."""
    if not isinstance(budget, Mapping):
        raise GridError(f"budget must be a mapping, got {budget!r}")
    rule = budget.get("rule", "images_seen")
    batch = _number(budget, "batch_size", 256, "budget.", whole=True)
    frames = int(images) if images is not None else max(1, int(round(hours * 3600 * fps)))  # images in the subset
    if rule == "images_seen":
        images = int(_number(budget, "images_seen", None, "budget."))
    elif rule == "epochs":
        images = int(math.ceil(_number(budget, "epochs", None, "budget.") * frames))
    elif rule == "steps":  # a fixed number of optimizer steps, whatever the subset's size
        images = _number(budget, "steps", None, "budget.", whole=True) * batch
    else:
        raise GridError(f"budget.rule must be 'images_seen', 'epochs' or 'steps', got {rule!r}")
    out = {k: v for k, v in budget.items() if k not in {"images_seen", "epochs", "steps"}}
    out.update(rule=rule, batch_size=batch, images_seen=images, steps=int(math.ceil(images / batch)),
               subset_images=frames, epochs=images / frames)
    return out


def _number(block: Mapping, key: str, default, where: str, whole: bool = False, zero: bool = False) -> float:
    """``block[key]`` (or ``default``; None: required) as a finite number > 0 (>= 0 with ``zero``; an int with
    ``whole``)."""
    value = block.get(key, default)
    if value is None:
        raise GridError(f"{where}{key} is missing")
    try:
        number = float(value)
        ok = not isinstance(value, bool) and math.isfinite(number) and (number > 0 or zero and number == 0) and \
            (not whole or number.is_integer())
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise GridError(f"{where}{key} must be a {'whole ' if whole else ''}number {'>=' if zero else '>'} 0, "
                        f"got {value!r}")
    return int(number) if whole else number


def _mapping(raw: Mapping, key: str, default: dict) -> dict:
    value = raw.get(key)
    if value is None:
        return dict(default)
    if not isinstance(value, Mapping):
        raise GridError(f"{key} must be a mapping, got {value!r}")
    return dict(value)


def fit_options(raw: Mapping) -> tuple[list[tuple[str | None, float, float, float]], float | None]:
    """The grid's optional ``fit:`` block as ([(label or None, params, hours, img_size)], target_accuracy), checked
    when the grid loads: a mistake here would otherwise show only after the whole sweep has run."""
    opts = _mapping(raw, "fit", {})
    unknown = sorted(set(opts) - {"projections", "target_accuracy"})
    if unknown:
        raise GridError(f"fit: unknown key(s) {unknown}; it has projections and target_accuracy")
    entries = opts.get("projections") or []
    if not isinstance(entries, list):
        raise GridError(f"fit.projections must be a list of {{label, params, hours, img_size}}, got {entries!r}")
    projections = []
    for i, p in enumerate(entries):
        where = f"fit.projections[{i}]."
        if not isinstance(p, Mapping):
            raise GridError(f"{where[:-1]} must be a mapping {{label, params, hours, img_size}}, got {p!r}")
        extra = sorted(set(p) - {"label", "params", "hours", "img_size"})
        if extra:
            raise GridError(f"{where[:-1]}: unknown key(s) {extra}")
        label = p.get("label")
        projections.append((None if label is None else str(label), *(_number(p, k, None, where)
                                                                      for k in ("params", "hours", "img_size"))))
    target = opts.get("target_accuracy")
    if target is not None:
        target = _number(opts, "target_accuracy", None, "fit.")
        if target > 100:
            raise GridError(f"fit.target_accuracy is a percentage, got {target:g}")
    return projections, target


def _label(x: float) -> str:
    return f"{x:g}".replace("+", "")


def run_id(config: Mapping) -> str:
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    n = config.get("images")
    data = f"{_label(config['hours'])}h" if n is None else \
        (f"{n // 10**6}M" if n % 10**6 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)) + "img"
    return f"{config['arch']}-{config['img_size']}px-{data}-s{config['seed']}-{digest}"


def _listed(raw: Mapping, key: str, kind=float, where: str = "") -> list:
    value = raw.get(key)
    if value is None:
        raise GridError(f"grid is missing {key!r}")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise GridError(f"{where}{key} is empty")
    try:
        out = [kind(v) for v in values]
    except (TypeError, ValueError, OverflowError):
        raise GridError(f"{where}{key}: expected numbers, got {value!r}") from None
    if kind is int and any(isinstance(v, bool) or float(v) != int(v) for v in values):
        raise GridError(f"{where}{key}: expected whole numbers, got {value!r}")
    return out


def _hours_axis(raw: Mapping, seeds: list[int]) -> list[tuple[float, list[int]]]:
    """The ``hours`` axis as (hours, seeds): an entry is a number (the grid's seeds) or ``{hours: h, seeds: [...]}``,
    e.g. one seed at the full data, where every subset draw is the same data."""
    value = raw.get("hours")
    entries = value if isinstance(value, list) else [value]
    if not entries:
        raise GridError("hours is empty")
    out = []
    for entry in entries:
        if isinstance(entry, Mapping):
            extra = sorted(set(entry) - {"hours", "seeds"})
            if extra or "hours" not in entry:
                raise GridError(f"hours: an entry that is a mapping has hours and seeds, got {dict(entry)!r}")
            out.append((_listed(entry, "hours", where="hours: ")[0],
                        _listed(entry, "seeds", int, "hours: ") if "seeds" in entry else seeds))
        else:
            out += [(h, seeds) for h in _listed({"hours": entry}, "hours")]
    return out


def expand(raw: Mapping) -> list[RunSpec]:
    """All runs of a grid, in the order models x resolutions x hours x seeds."""
    data = _mapping(raw, "data", {})
    total_hours = _number(data, "total_hours", 5000.0, "data.")
    fps = _number(data, "fps", 1.0, "data.")
    by_images = "images" in raw  # an image-count axis instead of hours of video
    if by_images and "hours" in raw:
        raise GridError("a grid sweeps hours (video) or images (image-count subsets), not both")
    seeds = _listed(raw, "seeds", int) if "seeds" in raw else [0]
    if by_images:
        hours_axis = [(n, seeds) for n in _listed(raw, "images", int)]
    else:
        hours_axis = _hours_axis(raw, seeds)
    hours_list = [h for h, _ in hours_axis]
    if not all(math.isfinite(h) and h > 0 for h in hours_list):
        raise GridError(f"{'images' if by_images else 'hours'} must be > 0 and finite, got {hours_list}")
    eval_cfg = _mapping(raw, "eval", {"protocol": "finetune"})
    if eval_cfg.get("protocol", "finetune") not in ("finetune", "linprobe"):
        raise GridError(f"eval.protocol must be finetune or linprobe, got {eval_cfg.get('protocol')!r}")
    num_classes = _number(eval_cfg, "num_classes", 1000, "eval.", whole=True, zero=True)  # 0: no head
    pretrain = _mapping(raw, "pretrain", {})
    budget = _mapping(raw, "budget", {}) or {"images_seen": 1e6}
    models = raw.get("models") or []
    if isinstance(models, (str, Mapping)):  # a single model
        models = [models]
    if not models:
        raise GridError("grid has no models")
    runs: list[RunSpec] = []
    for entry in models:
        spec = model_spec(entry)
        sizes = (_listed(spec, "img_sizes", int, f"{spec['arch']}: ") if spec["img_sizes"] is not None
                 else _listed(raw, "img_sizes", int))
        for img in sizes:
            if img <= 0:
                raise GridError(f"{spec['arch']}: img_size must be > 0, got {img}")
            if img % spec["patch_size"]:
                raise GridError(f"{spec['arch']}: img_size {img} is not a multiple of patch {spec['patch_size']}")
            for hours, hours_seeds in hours_axis:
                for seed in hours_seeds:
                    config = {
                        "model": {"name": spec["name"], "overrides": spec["overrides"]},
                        "arch": spec["arch"], "width": spec["width"], "depth": spec["depth"],
                        "heads": spec["heads"], "patch_size": spec["patch_size"],
                        "params": vit_param_count(spec["width"], spec["depth"], spec["patch_size"], img,
                                                  num_classes, mlp_ratio=spec["mlp_ratio"]),
                        "img_size": img, "hours": hours, "data_fraction": round(hours / total_hours, 12), "seed": seed,
                        "data": data, "budget": resolve_budget({**budget, **spec["budget"]}, hours, fps),
                        "pretrain": {**pretrain, **spec["pretrain"]}, "eval": {**eval_cfg, **spec["eval"]},
                    }
                    if by_images:
                        total = data.get("total_images")
                        config.update(hours=None, images=hours, budget=resolve_budget(
                            {**budget, **spec["budget"]}, None, fps, images=hours),
                            data_fraction=None if total is None else round(hours / _number(
                                data, "total_images", None, "data.", whole=True), 12))
                    runs.append(RunSpec(run_id(config), config))
    runs = with_targets(runs, raw)
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise GridError("grid expands to duplicate runs (a model, size, hours or seed listed twice?)")
    return runs


def with_targets(runs: list[RunSpec], raw: Mapping) -> list[RunSpec]:
    """Each run once per entry of the grid's ``targets:`` (the pretrain key ``target``), in that order; without
    the key the runs (and their ids) are unchanged."""
    if raw.get("targets") is None:
        return runs
    from mae_fast.targets import TARGETS

    targets = raw["targets"] if isinstance(raw["targets"], list) else [raw["targets"]]
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise GridError(f"targets: each is one of {', '.join(TARGETS)}, got {raw['targets']!r}")
    if "teacher" in targets and not (raw.get("pretrain") or {}).get("teacher"):
        raise GridError("targets: teacher needs pretrain.teacher (a run directory, checkpoint or timm:<name>)")
    out = []
    for run in runs:
        for target in targets:
            config = {**run.config, "target": target, "pretrain": {**run.config["pretrain"], "target": target}}
            out.append(RunSpec(run_id(config), config))
    return out


def packaged_grid(name: str) -> Path | None:
    """``train/grids/<name>.yaml`` as installed (``mae_fast.train``), e.g. ``demo``."""
    try:
        from importlib.resources import files

        candidate = Path(str(files("mae_fast.train") / "grids" / f"{name}.yaml"))
    except (ImportError, ModuleNotFoundError):
        return None
    return candidate if candidate.is_file() else None


def _packaged_names() -> list[str]:
    demo = packaged_grid("demo")
    return sorted(p.stem for p in demo.parent.glob("*.yaml")) if demo else []


def load_grid(path: str | os.PathLike) -> Grid:
    """A grid from a YAML file, or by the name of a packaged one (``demo``, ``humanlike``, ...)."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and packaged_grid(str(path)):
        path = packaged_grid(str(path))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise GridError(f"{path}: no such grid file (packaged grids: {', '.join(_packaged_names()) or 'none'})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GridError(f"{path}: cannot read the grid file: {exc}") from None
    except yaml.YAMLError as exc:
        raise GridError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a grid is a YAML mapping")
    try:
        return grid_from_dict(raw, path)
    except GridError as exc:
        raise GridError(f"{path}: {exc}") from None


def grid_from_dict(raw: Mapping, path: Path | None = None) -> Grid:
    for key in raw:
        if key not in _GRID_KEYS:
            close = difflib.get_close_matches(str(key), _GRID_KEYS, n=1)
            raise GridError(f"unknown key {key!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                            f"a grid has: {', '.join(_GRID_KEYS)}")
    name = str(raw.get("name") or (path.stem if path else "grid"))
    # relative to the working directory; made absolute so workers and SLURM jobs agree on it
    out_dir = Path(raw.get("out_dir") or Path("runs") / "scaling" / name).resolve()
    executor = _mapping(raw, "executor", {"name": "local"})
    if executor.get("name", "local") not in ("local", "slurm"):
        raise GridError(f"executor.name must be local or slurm, got {executor.get('name')!r}")
    if executor.get("mode", "inprocess") not in ("inprocess", "subprocess", "torchrun"):
        raise GridError(f"executor.mode must be inprocess, subprocess or torchrun, got {executor.get('mode')!r}")
    parallel = executor.get("parallel", 1)
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise GridError(f"executor.parallel must be a whole number >= 1 (runs at once on this machine), got {parallel!r}")
    if parallel > 1 and (executor.get("name", "local") != "local" or executor.get("mode", "inprocess") != "subprocess"):
        raise GridError("executor.parallel > 1 needs executor {name: local, mode: subprocess}: each run is its own "
                        "process")
    fit_options(raw)
    return Grid(path=path, name=name, out_dir=out_dir, job=str(raw.get("job", "mae_fast.scaling.runner:default_job")),
                executor=executor, runs=expand(raw), raw=dict(raw))
