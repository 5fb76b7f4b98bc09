"""Peak training-step memory at the GPU benchmark's shapes, predicted on any machine (no GPU needed).

For every configuration of ``e2e.GPU_CONFIGS`` (bf16 autocast, fused AdamW, batch per device) it estimates,
with :func:`mae_fast.memory.estimate_train_step`, the peak of one step of the reference MAE formulation, of
mae_fast, of mae_fast with lean activations, and of lean mae_fast with the fewest checkpointed blocks (decoder
first) that bring it to ``--target`` x the reference, with the FLOPs that recomputation adds. Peaks include
the model's weights and optimizer state: what has to fit on the device.

It also checks the estimator against a GPU's e2e JSON (``--measured``; default:
``bench/results/nvidia-h100-80gb-hbm3-2026-11-22-e2e.json``, whose peaks count the other implementations'
resident weights too, so those are added to the estimate; see :func:`validation_rows`).

    python bench/memory_estimate.py --out bench/results/memory-estimate-h100-shapes-DATE.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mae_fast  # noqa: E402
from e2e import GPU_CONFIGS, PEAK_MEM_DEFINITION, _loss, _write  # noqa: E402
from mae_fast.memory import GiB, Plan, estimate_mae_step, estimate_train_step, plan_for_budget  # noqa: E402
from mae_fast.models import mae_recompute_pct  # noqa: E402
from reference_mae import ReferenceMAE  # noqa: E402

MEASURED = Path(__file__).resolve().parent / "results" / "nvidia-h100-80gb-hbm3-2026-11-22-e2e.json"


def estimate_peak(kind: str, name: str, img_size: int, batch: int, lean: bool = False, checkpointed: int = 0):
    """The step's peak memory on a GPU as :mod:`mae_fast.memory` predicts it (bf16 autocast, fused AdamW; weights
    and optimizer state included), for mae_fast (:func:`estimate_mae_step`) or the reference; needs no GPU."""
    if kind != "reference":
        return estimate_mae_step(name, img_size, batch, lean=lean, grad_checkpointing=checkpointed)
    cfg = mae_fast.models.model_config(name, img_size=img_size, norm_pix_loss=True)
    L = (img_size // cfg["patch_size"]) ** 2
    return estimate_train_step(lambda: ReferenceMAE(**cfg),
                               lambda: (torch.randn(batch, 3, img_size, img_size), torch.rand(batch, L)),
                               lambda m, x, noise: _loss(kind, m, x, noise))


def recompute_pct(name, img_size, checkpointed) -> float:
    with torch.device("meta"):
        m = mae_fast.create_model(name, img_size=img_size)
    m.set_grad_checkpointing(checkpointed)
    return mae_recompute_pct(m)


def table_rows(configs, target: float) -> list[dict]:
    rows = []
    for name, img_size, batch in configs:
        ref = estimate_peak("reference", name, img_size, batch)
        plans = {"reference": ref, "mae_fast": estimate_peak("mae_fast", name, img_size, batch),
                 "mae_fast_lean": estimate_peak("mae_fast", name, img_size, batch, lean=True)}
        with torch.device("meta"):
            m = mae_fast.create_model(name, img_size=img_size)
        total = len(m.blocks) + len(m.decoder_blocks)
        ests = {Plan(True, 0, total): plans["mae_fast_lean"]}

        def peak(plan):
            if plan not in ests:
                ests[plan] = estimate_peak("mae_fast", name, img_size, batch, lean=plan.lean,
                                           checkpointed=plan.checkpointed)
            return ests[plan].peak

        found, _ = plan_for_budget(peak, int(target * ref.peak), total, lean=True)
        checkpointed = found.checkpointed if found else 0
        if checkpointed:
            plans["mae_fast_lean_ckpt"] = ests[found]
        for impl, est in plans.items():
            n = checkpointed if impl == "mae_fast_lean_ckpt" else 0
            rows.append(dict(model=name, img_size=img_size, batch=batch, impl=impl, checkpointed_blocks=n,
                             recompute_flops_pct=round(recompute_pct(name, img_size, n), 2),
                             mem_vs_reference=round(est.peak / ref.peak, 3), **est.gib()))
            print(f"{name:<24}{img_size:>5} b={batch:<4}{impl:<20}{est.peak / GiB:8.2f} GiB  "
                  f"{est.peak / ref.peak:5.2f}x ref  (activations {est.activations / GiB:.2f}, "
                  f"{n} checkpointed blocks)", flush=True)
    return rows


def validation_rows(measured_path: Path) -> list[dict]:
    """Estimated against measured GPU peaks. Results with ``peak_mem_definition`` count one implementation's
    own weights, optimizer state and step: every eager mae_fast/reference row compares directly. Results
    without that field (``nvidia-h100-80gb-hbm3-2026-11-22-e2e.json``) read the absolute peak with the other
    implementations' fp32 weights resident and ran an earlier mae_fast: only the reference is compared, after
    adding those weights."""
    measured = json.loads(measured_path.read_text())
    own = measured.get("peak_mem_definition") == PEAK_MEM_DEFINITION
    impls = ("reference", "mae_fast", "mae_fast_lean", "mae_fast_lean_ckpt") if own else ("reference",)
    rows = []
    for r in measured["rows"]:
        if r["impl"] not in impls or r["compile"] or r.get("oom") or not r.get("peak_mem_gib"):
            continue
        resident = 0 if own else sum(1 for o in measured["rows"] if o["model"] == r["model"] and not o["compile"]
                                     and o["img_size"] == r["img_size"] and o.get("source") == r.get("source")) - 1
        est = estimate_peak("reference" if r["impl"] == "reference" else "mae_fast", r["model"], r["img_size"],
                            r["batch"], lean=r["impl"].startswith("mae_fast_lean"),
                            checkpointed=r.get("checkpointed_blocks", 0))
        predicted = (est.peak + resident * est.parameters) / GiB
        rows.append(dict(model=r["model"], img_size=r["img_size"], batch=r["batch"], impl=r["impl"],
                         other_models_resident=resident, measured_gib=r["peak_mem_gib"],
                         estimated_gib=round(predicted, 2), error=round(predicted / r["peak_mem_gib"] - 1, 4)))
        print(f"validation {r['model']:<24}{r['img_size']:>5} b={r['batch']:<4}{r['impl']:<14} measured "
              f"{r['peak_mem_gib']:6.2f} estimated {predicted:6.2f} GiB ({100 * rows[-1]['error']:+.1f}%)", flush=True)
    return rows


def markdown(result) -> str:
    lines = [f"# Peak training-step memory at the H100 shapes (estimated {result['date']}, no GPU)", "",
             "bf16 autocast, fused AdamW, mask 0.75, batch per device; weights and optimizer state included.", "",
             "| model | px | batch | impl | checkpointed blocks | recompute FLOPs | peak GiB | activations GiB | "
             "vs reference |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['img_size']} | {r['batch']} | {r['impl']} | {r['checkpointed_blocks']} | "
                     f"{r['recompute_flops_pct']:.1f}% | {r['peak']:.2f} | {r['activations']:.2f} | "
                     f"{r['mem_vs_reference']:.2f} |")
    if result.get("validation"):
        lines += ["", f"Estimator against `max_memory_allocated` measured on the GPU ({result['measured']}):", "",
                  "| model | px | batch | impl | other models resident | measured GiB | estimated GiB | error |",
                  "|---|---|---|---|---|---|---|---|"]
        for v in result["validation"]:
            lines.append(f"| {v['model']} | {v['img_size']} | {v['batch']} | {v['impl']} | "
                         f"{v['other_models_resident']} | {v['measured_gib']:.1f} | {v['estimated_gib']:.2f} | "
                         f"{100 * v['error']:+.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma list of model:px, e.g. mae_vit_huge_patch14:476")
    ap.add_argument("--target", type=float, default=0.7, help="memory target as a fraction of the reference's")
    ap.add_argument("--measured", default=str(MEASURED), help="an e2e JSON measured on a GPU ('' to skip)")
    ap.add_argument("--out", default=None, help="write JSON here (and markdown beside it)")
    args = ap.parse_args(argv)
    configs = GPU_CONFIGS
    if args.only:
        keep = {tuple(s.split(":")) for s in args.only.split(",")}
        unknown = sorted(":".join(k) for k in keep - {(c[0], str(c[1])) for c in configs})
        if unknown:
            known = ", ".join(f"{m}:{p}" for m, p, _ in configs)
            ap.error(f"--only {','.join(unknown)}: not in the table ({known})")
        configs = [c for c in configs if (c[0], str(c[1])) in keep]
    if args.measured:  # checked before the table, which takes a while
        if not Path(args.measured).exists():
            ap.error(f"--measured {args.measured}: no such file")
        try:
            rows = json.loads(Path(args.measured).read_text())["rows"]
            e2e_rows = all("impl" in r and "compile" in r for r in rows)
        except (ValueError, KeyError, TypeError):
            e2e_rows = False
        if not e2e_rows:
            ap.error(f"--measured {args.measured}: not a bench/e2e.py JSON (no rows with impl and compile)")
    result = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, target=args.target,
                  method="mae_fast.memory.estimate_train_step: fake tensors on the CPU, storage lifetimes tracked, "
                         "512-byte rounding", rows=table_rows(configs, args.target))
    if args.measured:
        result["measured"] = Path(args.measured).name
        result["validation"] = validation_rows(Path(args.measured))
    print("\n" + markdown(result))
    if args.out:
        _write(args.out, result)
        Path(args.out).with_suffix(".md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main()
