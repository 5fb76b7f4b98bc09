"""Pixel vs HOG vs teacher reconstruction targets on the built-in demo data, judged by the demo linear probe.

Every target pretrains the demo model with the same recipe, seed, data, batch and number of steps; then each
encoder (and a randomly initialised one, the floor) is probed with ``mae-fast linprobe``'s settings on the demo's
labelled object images. The teacher is a demo run: ``--teacher`` (default: each seed's own pixel run).

    python bench/target_comparison.py --steps 200 --batch 32 --img-size 32 --probe-epochs 10 --seeds 0 1 \
        --out bench/results/target-comparison-cpu-2026-12-07

Tiny by design (a 0.8M-parameter model, minutes of CPU): a smoke test of the targets end to end, not evidence
about which target is better at scale.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def pretrain_run(target: str, extra: dict, args) -> dict:
    from mae_fast.training.pretrain import pretrain

    cfg = dict(recipe="demo", name=f"pretrain-{target}", output_dir=str(args.workdir), steps=args.steps,
               img_size=args.img_size,
               batch_size=args.batch, warmup_steps=max(1, args.steps // 10), vis_every=0, vis_images=0,
               progress=False, checkpoint_every=10**6, log_every=10, seed=args.seed, **extra)
    t0 = time.perf_counter()
    res = pretrain(cfg)
    rows = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    return {"run_dir": res["run_dir"], "checkpoint": res["checkpoint"], "first_logged_loss": losses[0],
            "final_loss": res["final_loss"], "pretrain_wall_s": round(time.perf_counter() - t0, 1),
            "images_seen": res["images_seen"]}


def probe(checkpoint: str | None, name: str, args) -> dict:
    from mae_fast.training.finetune import finetune

    cfg = dict(mode="linprobe", name=f"probe-{name}", output_dir=str(args.workdir), epochs=args.probe_epochs,
               progress=False, resume=None, checkpoint_every=0, seed=args.seed)
    if checkpoint is not None:
        cfg["checkpoint"] = checkpoint
    else:  # random init: a checkpoint dir without checkpoints would be refused, so point the default elsewhere
        cfg["output_dir"] = str(args.workdir / "no-checkpoint")
    t0 = time.perf_counter()
    res = finetune(cfg)
    return {"probe_top1": round(res["top1"], 2), "probe_top5": round(res["top5"], 2),
            "probe_final_top1": round(res["final_top1"], 2), "probe_wall_s": round(time.perf_counter() - t0, 1)}


def one_seed(args) -> tuple[list[dict], str]:
    """The three pretraining runs and the four probes of ``args.seed`` (in ``args.workdir``)."""
    rows = [{"target": "pixels", **pretrain_run("pixels", {}, args)}]
    teacher = args.teacher or rows[0]["run_dir"]
    rows.append({"target": "hog", **pretrain_run("hog", {"target": "hog"}, args)})
    rows.append({"target": "teacher", "teacher": teacher,
                 **pretrain_run("teacher", {"target": "teacher", "teacher": teacher}, args)})
    for row in rows:
        row.update(probe(row["checkpoint"], row["target"], args))
        print(f"seed {args.seed}, {row['target']}: probe top-1 {row['probe_top1']}%", flush=True)
    rows.append({"target": "random init", **probe(None, "random", args)})
    return [{"seed": args.seed, **r} for r in rows], teacher


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="pretraining steps per target")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=32, help="the demo model's 8-px patches: 32 px is a 4x4 grid")
    ap.add_argument("--probe-epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="each seed: its own runs and probes")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--teacher", default=None, help="teacher run dir / checkpoint (default: each seed's pixel run)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/target-comparison"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/target-comparison-cpu"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)  # a CPU shared with other jobs: more threads than cores only thrash
    t_all = time.perf_counter()
    rows, teachers, root = [], [], args.workdir
    for seed in args.seeds:
        args.seed, args.workdir = seed, root / f"seed-{seed}"
        seed_rows, teacher = one_seed(args)
        rows += seed_rows
        teachers.append(teacher)
    means = {}
    for r in rows:
        means.setdefault(r["target"], []).append(r["probe_top1"])
    result = {
        "what": f"demo model (mae_vit_demo_patch8, {args.img_size} px) pretrained with each reconstruction target, "
                "same recipe, data and steps per seed; linear probe (mae-fast linprobe settings) on the demo "
                "labelled set (320 training, 80 validation images, 8 classes)",
        "caveat": f"tiny: {len(args.seeds)} seeds, a 0.9M-parameter model, {args.steps} steps on generated demo data, "
                  "an 80-image validation set (one image is 1.25 points); a smoke test of the targets end to end, "
                  "not evidence about which target is better at scale.",
        "steps": args.steps, "batch_size": args.batch, "img_size": args.img_size, "probe_epochs": args.probe_epochs,
        "seeds": args.seeds, "teachers": teachers, "rows": rows,
        "mean_probe_top1": {k: round(sum(v) / len(v), 2) for k, v in means.items()},
        "total_wall_s": round(time.perf_counter() - t_all, 1),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), shared with other jobs",
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [f"# Reconstruction targets on the demo data ({result['steps']} steps x batch {result['batch_size']})", "",
             result["what"] + ".", "", f"**Caveat:** {result['caveat']}", "",
             "| target | seed | probe top-1 % | probe top-5 % | pretrain loss first -> last | pretrain s | probe s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        loss = (f"{r['first_logged_loss']:.4f} -> {r['final_loss']:.4f}" if "final_loss" in r else "-")
        lines.append(f"| {r['target']} | {r['seed']} | {r['probe_top1']} | {r['probe_top5']} | {loss} | "
                     f"{r.get('pretrain_wall_s', '-')} | {r['probe_wall_s']} |")
    lines += ["", "Mean probe top-1 over seeds: " + ", ".join(f"{k} {v}%" for k, v in result["mean_probe_top1"].items())
              + ".", "", "Teacher of each seed: its own pixel run (a demo run of the same length). Losses are in each "
              "target's own units (not comparable across targets). Machine: " + result["machine"]
              + f"; total {result['total_wall_s']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
