"""Training curves as pictures: ``mae-fast plot RUN_DIR [RUN_DIR ...]``, and ``curves.png`` in every run.

A pretraining run (``metrics.jsonl``) gives four panels against step or images seen: loss (log scale), learning
rate, images/s, and MFU with the share of time spent waiting for data. A finetuning or linear-probing run
(``results.json``) gives train / validation loss and top-1 / top-5 per epoch. Several runs are overlaid, one
colour each, so runs of a sweep compare at a glance.

``metrics.jsonl`` is read as a killed-and-resumed run leaves it: rows past the checkpoint it resumed from were
written twice (the newer one is kept), and a line cut short by the kill is skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Sequence

__all__ = ["read_metrics", "plot_pretrain", "plot_finetune", "plot_runs", "draw_or_warn", "main"]


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (or of the file itself), one per step, in step order."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl at {path}")
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # cut short by a kill
        if isinstance(row, dict) and "step" in row:
            by_step[int(row["step"])] = row  # a resumed run rewrites the steps after its checkpoint
    return [by_step[k] for k in sorted(by_step)]


def _figure(rows: int, cols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    return plt, fig, axes.ravel()


def _save(plt, fig, out: str | Path) -> None:
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _series(rows: list[dict], x: str, key: str, scale: float = 1.0) -> tuple[list, list]:
    pts = [(r[x], r[key] * scale) for r in rows if r.get(key) is not None and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_pretrain(runs: dict[str, list[dict]], out: str | Path, x: str = "step") -> dict:
    """Pretraining curves of ``{label: metrics rows}`` into ``out`` (PNG). Returns what was drawn:
    ``{panel: {label: (xs, ys)}}``."""
    if x not in ("step", "images_seen"):
        raise ValueError(f"x must be step or images_seen, got {x!r}")
    panels = [("loss", "loss", 1.0, "log"), ("learning rate", "lr", 1.0, "linear"),
              ("images/s", "images_per_s", 1.0, "linear"), ("MFU and data wait (%)", "mfu", 100.0, "linear")]
    plt, fig, axes = _figure(2, 2)
    drawn: dict[str, dict] = {}
    for ax, (title, key, scale, yscale) in zip(axes, panels):
        drawn[title], shown = {}, title
        for i, (label, rows) in enumerate(runs.items()):
            xs, ys = _series(rows, x, key, scale)
            if key == "mfu" and any(y > 100.0 for y in ys):  # impossible: the peak it divides by was too low
                xs, ys = [a for a, b in zip(xs, ys) if b <= 100.0], [b for b in ys if b <= 100.0]
                shown = "MFU (over 100% left out: peak unreliable) and data wait (%)"
            if xs:
                ax.plot(xs, ys, color=f"C{i}", label=label, lw=1.4, marker="." if len(xs) == 1 else None)
                drawn[title][label] = (xs, ys)
            if key == "mfu":
                wx, wy = _series(rows, x, "data_wait", 100.0)
                if wx:
                    ax.plot(wx, wy, color=f"C{i}", ls=":", lw=1.2, label=f"{label}: waiting for data (%)",
                            marker="." if len(wx) == 1 else None)
                    drawn.setdefault("data wait (%)", {})[label] = (wx, wy)
        if drawn[title] and yscale == "log" and all(min(v[1]) > 0 for v in drawn[title].values()):
            ax.set_yscale("log")
        ax.set_title(shown, fontsize=10 if shown != title else None)
        ax.set_xlabel("images seen" if x == "images_seen" else "step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if "data wait (%)" in drawn:
        axes[3].legend(fontsize=7)
    _save(plt, fig, out)
    return drawn


def plot_finetune(runs: dict[str, list[dict]], out: str | Path) -> dict:
    """Finetuning / probing curves of ``{label: results['history']}`` into ``out`` (PNG). Returns what was drawn."""
    plt, fig, axes = _figure(1, 2)
    drawn: dict[str, dict] = {"loss": {}, "accuracy (%)": {}}
    for i, (label, hist) in enumerate(runs.items()):
        for key, ls in (("train_loss", "-"), ("val_loss", "--")):
            xs, ys = _series(hist, "epoch", key)
            axes[0].plot(xs, ys, color=f"C{i}", ls=ls, label=f"{label} {key.split('_')[0]}",
                         marker="." if len(xs) == 1 else None)  # one epoch: a line of one point shows nothing
            drawn["loss"][f"{label} {key}"] = (xs, ys)
        for key, ls in (("top1", "-"), ("top5", "--")):
            xs, ys = _series(hist, "epoch", key)
            axes[1].plot(xs, ys, color=f"C{i}", ls=ls, marker=".", label=f"{label} {key}")
            drawn["accuracy (%)"][f"{label} {key}"] = (xs, ys)
    for ax, title in zip(axes, drawn):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(plt, fig, out)
    return drawn


def draw_or_warn(run_dir: Path, draw) -> str | None:
    """``draw()`` a run's curves; a picture that cannot be drawn (no metrics logged, a plotting failure)
    costs a warning, never the run."""
    try:
        return str(draw())
    except Exception as e:  # noqa: BLE001 - the run's results matter more than its picture
        if (run_dir / "metrics.jsonl").exists() or (run_dir / "results.json").exists():
            warnings.warn(f"training curves not drawn: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
        return None


def _kind(run: Path) -> str:
    if (run / "metrics.jsonl").is_file() or run.suffix == ".jsonl":
        return "pretrain"
    if (run / "results.json").is_file():
        return "finetune"
    raise FileNotFoundError(f"{run}: neither a pretraining run (metrics.jsonl) nor a finetuning run (results.json)")


def plot_runs(runs: Sequence[str | Path], out: str | Path | None = None, x: str = "step") -> Path:
    """One picture of the given run directories (all pretraining, or all finetuning / probing)."""
    paths = [Path(r) for r in runs]
    if not paths:
        raise ValueError("no run given")
    kinds = {_kind(p) for p in paths}
    if len(kinds) > 1:
        raise ValueError("give pretraining runs or finetuning runs, not both")
    labels = [p.name if p.suffix != ".jsonl" else p.parent.name for p in paths]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in paths]
    out = Path(out) if out else (paths[0] if paths[0].is_dir() else paths[0].parent) / "curves.png"
    if out.is_dir():  # savefig wrote <dir>.png beside it
        out = out / "curves.png"
    elif not out.suffix:  # savefig appends .png: return the file it writes
        out = out.with_suffix(".png")
    if kinds == {"pretrain"}:
        rows = {lab: read_metrics(p) for lab, p in zip(labels, paths)}
        if not any(rows.values()):  # an empty picture, exit code 0, said nothing was wrong
            raise ValueError(f"no metrics logged yet in {', '.join(map(str, paths))}")
        plot_pretrain(rows, out, x)
    else:
        hists = {}
        for lab, p in zip(labels, paths):
            try:
                hists[lab] = json.loads((p / "results.json").read_text())["history"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:  # TypeError: not a JSON object
                raise ValueError(f"{p / 'results.json'} is not a finetuning result ({type(e).__name__}: {e})")
        if not any(hists.values()):
            raise ValueError(f"no epoch finished yet in {', '.join(map(str, paths))}")
        plot_finetune(hists, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mae-fast plot", description="training curves of one or more runs as a PNG")
    p.add_argument("runs", nargs="+", help="run directories (pretraining: metrics.jsonl; finetuning: results.json)")
    p.add_argument("--out", help="PNG to write (default: curves.png in the first run)")
    p.add_argument("--x", choices=["step", "images_seen"], default="step", help="pretraining x axis")
    args = p.parse_args(argv)
    try:
        print(plot_runs(args.runs, args.out, args.x))
    except (FileNotFoundError, ValueError) as e:
        print(f"mae-fast plot: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
