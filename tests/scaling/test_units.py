"""Human units and GPU-hour cost (mae_fast/scaling/units.py) against hand arithmetic and the FLOP counter."""
from __future__ import annotations

import json

import pytest

from mae_fast.scaling import units


def test_hours_frames_and_years_convert_both_ways():
    assert units.hours_to_frames(5000) == 5000 * 3600  # 1 frame/s
    assert units.hours_to_frames(2, fps=30) == 2 * 3600 * 30
    assert units.frames_to_hours(units.hours_to_frames(123.0, fps=4), fps=4) == pytest.approx(123.0)
    assert units.hours_to_years(units.HOURS_AWAKE_PER_DAY * 365.25) == pytest.approx(1.0)
    assert units.hours_to_years(5000) == pytest.approx(5000 / (12 * 365.25))
    assert units.years_to_hours(units.hours_to_years(777.0)) == pytest.approx(777.0)


def test_gpu_hours_at_a_measured_point_and_scaled_by_flops(tmp_path):
    from mae_fast.models import create_model
    from mae_fast.models.flops import mae_train_flops
    import torch

    with torch.device("meta"):
        small = create_model("mae_vit_small_patch14", img_size=224)
        small448 = create_model("mae_vit_small_patch14", img_size=448)
    enc = sum(p.numel() for n, p in small.named_parameters() if not n.startswith("decoder") and n != "mask_token")
    table = {"device": "test GPU", "memory_gib": 80.0, "rows": [
        {"model": "mae_vit_small_patch14", "img_size": 224, "params": float(enc), "batch": 64,
         "images_per_s": 1000.0, "train_flops_per_image": mae_train_flops(small)}]}
    at = units.gpu_hours(enc, 10.0, 224, table=table)
    assert at["gpu_hours"] == pytest.approx(10 * 3600 / 1000 / 3600) and at["from"] == "mae_vit_small_patch14 224 px"
    at448 = units.gpu_hours(enc, 10.0, 448, epochs=3, table=table)
    ratio = mae_train_flops(small448) / mae_train_flops(small)
    assert at448["gpu_hours"] == pytest.approx(3 * 10 * ratio / 1000)
    assert "scaled by FLOPs" in at448["from"]
    images = units.gpu_hours(enc, 36000.0, 224, unit="images", table=table)
    assert images["gpu_hours"] == pytest.approx(at["gpu_hours"])
    assert units.gpu_hours(6e9, 1.0, 224, table=table)["fits_one_gpu"] is False  # 16 B/param > 72 GiB
    with pytest.raises(ValueError, match="unit"):
        units.gpu_hours(enc, 1.0, 224, unit="days", table=table)


def test_packaged_throughput_table_holds_measured_rows():
    table = json.loads(units.THROUGHPUT_FILE.read_text())
    assert table["rows"] and all(r["images_per_s"] > 0 and r["train_flops_per_image"] > 0 for r in table["rows"])
    assert {("mae_vit_huge_patch14", 476)} <= {(r["model"], r["img_size"]) for r in table["rows"]}
