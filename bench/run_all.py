"""The whole benchmark suite in one command: kernel microbenchmarks and the end-to-end table.

    python bench/run_all.py            # on a GPU: the full tables
    python bench/run_all.py --smoke    # on the CPU: small configurations (what CI can run)

Writes bench/results/<device>-<date>.json and a markdown summary next to it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SUITES = [  # (name, script, extra args)
    ("masking", "bench_masking.py", []),
    ("attention", "bench_attention.py", []),
    ("e2e", "e2e.py", ["--compile"]),
]


def device_slug() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small CPU configurations")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--only", default=None, help="comma list of suites: " + ",".join(s[0] for s in SUITES))
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows of the e2e table")
    args = ap.parse_args(argv)
    unknown = set(args.only.split(",")) - {s[0] for s in SUITES} if args.only else set()
    if unknown:
        ap.error(f"--only {','.join(sorted(unknown))}: unknown suite (known: {', '.join(s[0] for s in SUITES)})")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{device_slug()}-{dt.date.today().isoformat()}"
    results, failures = {}, {}
    for name, script, extra in SUITES:
        if args.only and name not in args.only.split(","):
            continue
        if args.no_compile or args.smoke:
            extra = [e for e in extra if e != "--compile"]
        part = out_dir / f"{stamp}-{name}.json"
        cmd = [sys.executable, str(HERE / script), "--out", str(part), *extra, *(["--smoke"] if args.smoke else [])]
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode == 0 and part.exists():
            results[name] = json.loads(part.read_text())
        else:
            failures[name] = f"exit code {proc.returncode}"
    summary = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   date=dt.date.today().isoformat(), torch=torch.__version__, smoke=args.smoke,
                   results=results, failures=failures)
    path = out_dir / f"{stamp}.json"
    path.write_text(json.dumps(summary, indent=1))
    md = [f"# Benchmarks on {summary['device']}, {summary['date']} (torch {torch.__version__})", ""]
    if "e2e" in results:
        sys.path.insert(0, str(HERE))
        from e2e import table

        md += ["## End-to-end training step", "", table(results["e2e"]), ""]
    for name in ("masking", "attention"):
        if name in results and isinstance(results[name], dict) and "markdown" in results[name]:
            md += [f"## {name}", "", results[name]["markdown"], ""]
    if failures:
        md += ["## Failed suites", ""] + [f"- {k}: {v}" for k, v in failures.items()]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"\nwrote {path} and {path.with_suffix('.md')}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
