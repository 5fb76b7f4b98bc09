"""bench_attention.py's equal-tile rows: both tilings timed and checked in one run, and kept out of the
preference table (CPU: the Triton interpreter on tiny shapes)."""
import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import bench_attention as ba  # noqa: E402  (bench/ is on sys.path: conftest)

from mae_fast.ops._triton_attention import _kernels  # noqa: E402


def test_equal_tiles_rows_run_both_tilings_side_by_side(monkeypatch, tmp_path):
    rows = [dict(name="tiny", seqlen=19, head_dim=80, heads=1, batch=2),
            dict(name="tiny", seqlen=23, head_dim=64, heads=1, batch=1)]
    monkeypatch.setattr(ba, "mae_shapes", lambda: rows)
    fa = _kernels()
    launched = []
    real_tiles = fa.head_dim_tiles

    def spy(d):  # what the launchers ask for (not the benchmark's own "does this row change?" question)
        if sys._getframe(1).f_code.co_name in ("flash_attn_forward", "flash_attn_backward"):
            launched.append((sys._getframe(1).f_code.co_name, d, real_tiles(d)))
        return real_tiles(d)

    monkeypatch.setattr(fa, "head_dim_tiles", spy)
    args = argparse.Namespace(only_head_dim=None, check=False, equal_tiles=True, out=str(tmp_path / "partial.json"))
    r80, r64 = ba.run_table(args, torch.device("cpu"), torch.float16)
    assert fa.EQUAL_TILES is False  # put back after every row
    assert {"triton", "triton:equal_tiles"} <= set(r80["fwd_ms"]) and "triton:equal_tiles" not in r64["fwd_ms"]
    assert all(t > 0 for t in r80["fwd_ms"].values()) and all(t > 0 for t in r80["bwd_ms"].values())
    # timing alone: the default rows launched one 128 tile, the equal-tile rows three 32-column tiles, in the
    # forward and in the backward (which runs after the timed call returned)
    for launcher in ("flash_attn_forward", "flash_attn_backward"):
        assert {t for f, d, t in launched if d == 80 and f == launcher} == {(128, 0, 0), (32, 32, 32)}
        assert {t for f, d, t in launched if d == 64 and f == launcher} == {(64, 0, 0)}

    args.check = True
    launched.clear()
    results = ba.run_table(args, torch.device("cpu"), torch.float16)
    r80, r64 = results
    assert (80, (32, 32, 32)) in {(d, t) for f, d, t in launched}
    for check in (r80["check"], r80["check_equal_tiles"], r64["check"]):
        assert set(check) == {"out", "dq", "dk", "dv"}
        assert all(err <= 3 * err_torch + 1e-3 for err, err_torch in check.values()), check

    path = tmp_path / "attention.json"
    path.write_text(json.dumps(dict(device="cpu-test", results=results)))
    prefs = ba.write_prefs([path], tmp_path / "prefs.json")
    for entries in prefs["devices"]["cpu-test"]["dense"].values():
        for e in entries:
            assert "triton" in e["fwd_ms"] and not any(b.startswith("triton:") for b in e["train_ms"])
