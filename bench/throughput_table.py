"""Regenerate mae_fast/scaling/throughput.json (the measured training throughput the scaling cost uses).

Reads the GPU end-to-end results under bench/results (``nvidia-*-e2e*.json``, written by bench/e2e.py) and keeps,
per (model, resolution), the fastest eager ``mae_fast`` step that ran (not out of memory), with its batch, its
images/s and peak memory, and the model's training FLOPs per image (mae_fast.models.flops) so that unmeasured
models and resolutions can be priced by FLOPs from the nearest measured point.

    python bench/throughput_table.py            # writes mae_fast/scaling/throughput.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def collect(results: Path) -> dict:
    from mae_fast.scaling.units import _registry_flops

    best: dict[tuple, dict] = {}
    device = None
    for path in sorted(results.glob("nvidia-*-e2e*.json")):
        data = json.loads(path.read_text())
        for row in data.get("rows", []):
            if row.get("impl") != "mae_fast" or row.get("oom") or row.get("compile") or not row.get("images_per_s"):
                continue
            key = (row["model"], int(row["img_size"]))
            if key not in best or row["images_per_s"] > best[key]["images_per_s"]:
                device = data.get("device", device)
                flops, params = _registry_flops(row["model"], int(row["img_size"]))
                best[key] = {"model": row["model"], "img_size": int(row["img_size"]), "params": params,
                             "batch": row["batch"], "images_per_s": round(float(row["images_per_s"]), 1),
                             "peak_mem_gib": round(float(row.get("peak_mem_gib") or 0), 1),
                             "train_flops_per_image": flops, "source": path.name}
    return {"device": device, "memory_gib": 80.0,
            "note": "fastest eager mae_fast step per (model, img_size) of bench/results/nvidia-*-e2e*.json; "
                    "params are encoder parameters",
            "rows": sorted(best.values(), key=lambda r: (r["params"], r["img_size"]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--out", default=str(ROOT / "mae_fast" / "scaling" / "throughput.json"))
    args = ap.parse_args(argv)
    table = collect(Path(args.results))
    if not table["rows"]:
        print(f"no GPU e2e rows under {args.results}", file=sys.stderr)
        return 1
    Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
    for r in table["rows"]:
        print(f"{r['model']:24s} {r['img_size']:4d} px  batch {r['batch']:4d}  {r['images_per_s']:8.1f} img/s  "
              f"{r['train_flops_per_image'] / 1e9:8.1f} GFLOP/img  ({r['source']})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
