"""bench_attention.py's extra tilings: the default and the other tilings timed and checked in one run, and kept out
of the preference table (CPU: the Triton interpreter on tiny shapes)."""
import argparse
import json
import sys

import torch

import bench_attention as ba  # bench/ is on sys.path: conftest

from mae_fast.kernels import flash_attention as fa


def test_tiling_rows_run_every_tiling_side_by_side(monkeypatch, tmp_path):
    rows = [dict(name="tiny", seqlen=19, head_dim=80, heads=1, batch=2),
            dict(name="tiny", seqlen=23, head_dim=64, heads=1, batch=1)]
    monkeypatch.setattr(ba, "mae_shapes", lambda: rows)
    launched = []
    real_tiles = fa.head_dim_tiles

    def spy(d, tiling=fa.DEFAULT_TILING):  # what the launchers ask for (not the benchmark's "does this row change?")
        caller = sys._getframe(1).f_code.co_name
        if caller in ("flash_attn_forward", "flash_attn_backward"):
            launched.append((caller, d, tiling, real_tiles(d, tiling)))
        return real_tiles(d, tiling)

    monkeypatch.setattr(fa, "head_dim_tiles", spy)
    args = argparse.Namespace(only_head_dim=None, check=True, tilings=["wrap", "equal"],
                              out=str(tmp_path / "partial.json"))
    results = ba.run_table(args, torch.device("cpu"), torch.float16)
    r80, r64 = results
    assert {"triton", "triton:wrap", "triton:equal"} <= set(r80["fwd_ms"])
    assert not any(b.startswith("triton:") for b in r64["fwd_ms"])  # 64: one tile in every tiling
    assert all(t > 0 for t in r80["fwd_ms"].values()) and all(t > 0 for t in r80["bwd_ms"].values())
    # the default rows launched 64 + 32 columns, the equal-tile rows three 32-column tiles, in the forward and in the
    # backward (which runs after the timed call returned); wrap launched its own tiling
    for launcher in ("flash_attn_forward", "flash_attn_backward"):
        assert {(t, tiles) for f, d, t, tiles in launched if d == 80 and f == launcher} == {
            ("split", (64, 0, 32)), ("wrap", (128, 0, 0)), ("equal", (32, 32, 32))}
        assert {tiles for f, d, t, tiles in launched if d == 64 and f == launcher} == {(64, 0, 0)}
    for check in (r80["check"], r80["check_wrap"], r80["check_equal"], r64["check"]):
        assert set(check) == {"out", "dq", "dk", "dv"}
        assert all(err <= 3 * err_torch + 1e-3 for err, err_torch in check.values()), check

    path = tmp_path / "attention.json"
    path.write_text(json.dumps(dict(device="cpu-test", results=results)))
    prefs = ba.write_prefs([path], tmp_path / "prefs.json")
    for entries in prefs["devices"]["cpu-test"]["dense"].values():
        for e in entries:
            assert "triton" in e["fwd_ms"] and not any(b.startswith("triton:") for b in e["train_ms"])
