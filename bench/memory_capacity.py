"""How many images fit on one GPU: the largest per-device MAE pretraining batch against resolution, per model
and memory plan (plain, lean activations, every block checkpointed), predicted on any machine.

Each point is :func:`mae_fast.memory.fit_batch` over :func:`mae_fast.memory.estimate_mae_step` (bf16 autocast,
fused AdamW, mask 0.75, the masked-only training path), within ``--budget`` GiB less ``--headroom``. Writes
JSON and a plot.

    python bench/memory_capacity.py --out bench/results/memory-capacity-80gib-DATE.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

import mae_fast
from mae_fast.memory import GiB, Plan, estimate_mae_step, fit_batch

MODELS = ["mae_vit_base_patch14", "mae_vit_large_patch14", "mae_vit_huge_patch14"]
SIZES = [224, 336, 476, 672, 952]


def capacity(models, sizes, budget_bytes: int, limit: int = 16384) -> list[dict]:
    rows = []
    for name in models:
        for img in sizes:
            with torch.device("meta"):
                m = mae_fast.create_model(name, img_size=img)
            blocks = len(m.blocks) + len(m.decoder_blocks)
            for plan in (Plan(False, 0, blocks), Plan(True, 0, blocks), Plan(True, blocks, blocks)):
                batch = fit_batch(lambda n, p=plan: estimate_mae_step(
                    name, img, n, lean=p.lean, grad_checkpointing=p.checkpointed).peak, budget_bytes, limit)
                rows.append(dict(model=name, img_size=img, plan=plan.describe(), largest_batch=batch))
                print(f"{name:<24}{img:>5}  {plan.describe():<30}{batch:>6}", flush=True)
    return rows


def _short(name: str) -> str:
    """mae_vit_huge_patch14 -> ViT-H/14"""
    size, patch = name.removeprefix("mae_vit_").split("_patch")
    return f"ViT-{ {'tiny': 'Ti', 'small': 'S', 'base': 'B', 'large': 'L', 'huge': 'H', 'giant': 'g'}.get(size, size)}/{patch}"


def plot(result, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"mae_vit_base_patch14": "tab:blue", "mae_vit_large_patch14": "tab:orange",
               "mae_vit_huge_patch14": "tab:green"}
    styles = {"plain": "-", "lean": "--", "lean + checkpoint all blocks": ":"}
    for name in dict.fromkeys(r["model"] for r in result["rows"]):
        for plan, style in styles.items():
            pts = [(r["img_size"], r["largest_batch"]) for r in result["rows"]
                   if r["model"] == name and r["plan"] == plan and r["largest_batch"] > 0]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", ms=3, color=colours.get(name),
                        label=f"{_short(name)}, {plan}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(result["img_sizes"], [str(s) for s in result["img_sizes"]])
    ax.set_xlabel("image size (px)")
    ax.set_ylabel("largest batch per device")
    ax.set_title(f"MAE pretraining within {result['budget_gib']:g} GiB (estimated, bf16, AdamW, mask 0.75)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=1, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--img-sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--budget", type=float, default=80.0, help="GiB per device (default 80, an H100)")
    ap.add_argument("--headroom", type=float, default=0.1, help="fraction of the budget kept free (0.1)")
    ap.add_argument("--out", default=None, help="write JSON here and the plot beside it (.png)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.img_sizes.split(",")]
    budget = int(args.budget * (1 - args.headroom) * GiB)
    result = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, budget_gib=args.budget,
                  headroom=args.headroom, img_sizes=sizes,
                  rows=capacity(args.models.split(","), sizes, budget))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
