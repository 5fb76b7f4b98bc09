"""`mae-fast info`: bad models, sizes and mask ratios are one line on stderr and exit 2 before anything is printed;
the attention shapes by hand; the model report's token counts and the train / inference backend picks."""
from __future__ import annotations

import importlib
import sys
import types

import pytest

from mae_fast import info


@pytest.mark.parametrize("argv, msg", [
    (["--model", "mae_vit_demo_patch8", "--img-size", "36"], "must be divisible by patch_size 8"),
    (["--model", "mae_vit_demo_patch8", "--img-size", "0"], "img_size must be positive"),
    (["--model", "mae_vit_demo_patch8", "--mask-ratio", "1.5"], "mask_ratio must be in [0, 1)"),
    (["--model", "mae_vit_nope"], "unknown model 'mae_vit_nope'"),
])
def test_info_bad_model_or_size_is_one_line_and_exit_2(argv, msg, capsys, monkeypatch):
    monkeypatch.setattr(info, "report", lambda: "REPORT")
    assert info.main(argv) == 2
    out, err = capsys.readouterr()
    assert msg in err and "Traceback" not in err and "REPORT" not in out  # nothing printed before the error


@pytest.mark.parametrize("ratio", ["1.0", "-0.25"])
def test_info_mask_ratio_outside_0_1_is_exit_2(monkeypatch, capsys, ratio):
    """A mask ratio of 1 (nothing visible) or below 0 is refused as the model refuses it, before the report."""
    monkeypatch.setattr(info, "report", lambda: "REPORT")
    assert info.main(["--model", "mae_vit_demo_patch8", "--mask-ratio", ratio]) == 2
    out, err = capsys.readouterr()
    assert "mask_ratio must be in [0, 1)" in err and out == ""


@pytest.mark.parametrize("img_size, ratio", [(None, 0.75), (160, 0.6), (96, 0.9)])
def test_info_attention_shapes_of_vit_base_by_hand(img_size, ratio):
    """ViT-B/16: encoder 12 heads of 64 on the visible patches + cls; decoder 16 heads of 32 on all + cls."""
    L = ((img_size or 224) // 16) ** 2
    visible = int(L * (1 - ratio))  # the official MAE count
    assert info.attention_shapes("mae_vit_base_patch16", img_size, ratio) == {
        "encoder": (visible + 1, 12, 64), "decoder": (L + 1, 16, 32)}


def test_info_model_report_uses_the_mask_ratio_and_reports_train_and_inference_picks(monkeypatch, capsys):
    """The report comes first, then the model at its size; the encoder's token count follows --mask-ratio (0.75
    by default); the training pick is asked with a tensor that needs
    gradients and the inference pick with one that does not."""
    ops = importlib.import_module("mae_fast.ops")
    monkeypatch.setattr(info, "report", lambda: "REPORT")
    monkeypatch.setattr(ops, "select_backend", lambda op, backend, q, *a: types.SimpleNamespace(
        name="GRAD" if q.requires_grad else "NOGRAD"))
    monkeypatch.setattr(ops, "describe", lambda op, *a: {"x": []})
    assert info.main(["--model", "mae_vit_demo_patch8", "--img-size", "32", "--mask-ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("REPORT") and "at 32 px" in out
    assert "encoder  9 tokens" in out and "decoder  17 tokens" in out  # 16 patches: 8 visible + cls, 16 + cls
    assert out.count("train -> GRAD, inference -> NOGRAD") == 2
    assert info.main(["--model", "mae_vit_demo_patch8", "--img-size", "32"]) == 0  # the default ratio, 0.75
    out = capsys.readouterr().out
    assert "encoder  5 tokens" in out and "decoder  17 tokens" in out  # 4 visible + cls


def test_info_report_says_none_when_no_backend_can_run(monkeypatch):
    ops = importlib.import_module("mae_fast.ops")
    for name in ("_video_decoding", "_attention_tiling", "_attention_prefs"):
        monkeypatch.setattr(info, name, lambda: "-")

    def refuse(op, backend, *args):
        raise ops.NoBackendError("nothing runs here")

    monkeypatch.setattr(ops, "select_backend", refuse)
    monkeypatch.setattr(ops, "describe", lambda op, *a: {"only": ["too small"]})
    text = info.report()
    for op in ops.OPS:
        assert f"  {op:<26} auto -> none" in text
    assert "      only       no: too small" in text


def test_python_m_info_exits_with_main_s_code(monkeypatch, capsys):
    """`python -m mae_fast.info` ends with main's exit code (the module run as __main__, as -m runs it)."""
    import runpy
    import warnings

    monkeypatch.setattr(sys, "argv", ["mae_fast.info", "--model", "mae_vit_nope"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exc:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is imported already (by this file)
        runpy.run_module("mae_fast.info", run_name="__main__")
    assert exc.value.code == 2 and "unknown model" in capsys.readouterr().err
