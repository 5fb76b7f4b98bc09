"""The `mae-fast` command, `mae-fast info`, reconstruction pictures and training curves, from a mutation audit.

Covers what the existing tests left open: the command's exit codes and the arguments each subcommand receives,
info's mask-ratio check and attention shapes, the train / inference backend picks it reports; the visible-only
statistics a norm-pix reconstruction is un-normalised with (checked against loops written here), the rows of the
reconstruction grid pixel by pixel and the PNG's layout; the curves' log scale, x axis, labels and default
output. Expectations are computed by hand or by small independent re-implementations.
"""
from __future__ import annotations

import importlib
import json
import types
import warnings

import pytest
import torch

import mae_fast
from mae_fast import cli, info
from mae_fast.training import curves, visualize

# ---------------------------------------------------------------------------------------------------------------
# mae-fast
# ---------------------------------------------------------------------------------------------------------------


def test_no_command_is_a_usage_error_and_help_is_not(capsys):
    """No arguments: the usage and exit 2 (nothing was asked); -h / --help: the usage and exit 0."""
    assert cli.main([]) == 2
    assert "usage: mae-fast <command>" in capsys.readouterr().out
    for flag in ("-h", "--help"):
        assert cli.main([flag]) == 0
        out = capsys.readouterr().out
        assert "usage: mae-fast <command>" in out and all(f"  {name} " in out for name in cli.COMMANDS)


def test_unknown_command_is_exit_2_on_stderr(capsys):
    assert cli.main(["pretrian", "steps=1"]) == 2
    out, err = capsys.readouterr()
    assert "unknown command 'pretrian'" in err and out == ""


@pytest.mark.parametrize("command, module, kwargs", [
    ("pretrain", "mae_fast.training.pretrain", {}),
    ("finetune", "mae_fast.training.finetune", {"mode": "finetune"}),
    ("linprobe", "mae_fast.training.finetune", {"mode": "linprobe"}),
    ("plot", "mae_fast.training.curves", {}),
    ("memory", "mae_fast.memory", {}),
    ("info", "mae_fast.info", {}),
])
def test_each_subcommand_gets_the_rest_of_the_line_its_mode_and_gives_its_exit_code(monkeypatch, command, module,
                                                                                    kwargs):
    seen = []

    def fake_main(argv, **kw):
        seen.append((argv, kw))
        return 3

    monkeypatch.setattr(importlib.import_module(module), "main", fake_main)
    assert cli.main([command, "a=1", "--b", "c"]) == 3
    assert seen == [(["a=1", "--b", "c"], kwargs)]
    monkeypatch.setattr(importlib.import_module(module), "main", lambda argv, **kw: None)
    assert cli.main([command]) == 0


# ---------------------------------------------------------------------------------------------------------------
# mae-fast info
# ---------------------------------------------------------------------------------------------------------------

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
    """The encoder's token count follows --mask-ratio; the training pick is asked with a tensor that needs
    gradients and the inference pick with one that does not."""
    ops = importlib.import_module("mae_fast.ops")
    monkeypatch.setattr(info, "report", lambda: "REPORT")
    monkeypatch.setattr(ops, "select_backend", lambda op, backend, q, *a: types.SimpleNamespace(
        name="GRAD" if q.requires_grad else "NOGRAD"))
    monkeypatch.setattr(ops, "describe", lambda op, *a: {"x": []})
    assert info.main(["--model", "mae_vit_demo_patch8", "--img-size", "32", "--mask-ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "encoder  9 tokens" in out and "decoder  17 tokens" in out  # 16 patches: 8 visible + cls, 16 + cls
    assert out.count("train -> GRAD, inference -> NOGRAD") == 2


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


# ---------------------------------------------------------------------------------------------------------------
# reconstruction pictures
# ---------------------------------------------------------------------------------------------------------------

def _visible_stats_by_loops(patches, mask, grid, window=5):
    """Each patch's mean and unbiased variance; a removed patch gets the average of the visible ones within
    window // 2 rows and columns, else the image's visible average, else 0."""
    B, L, _ = patches.shape
    h, w = grid
    r = window // 2
    mean, var = patches.double().mean(-1), patches.double().var(-1)
    out = torch.zeros(B, L, 2, dtype=torch.float64)
    for b in range(B):
        vis = [i for i in range(L) if mask[b, i] == 0]
        for i in range(L):
            if mask[b, i] == 0:
                out[b, i] = torch.stack([mean[b, i], var[b, i]])
                continue
            near = [j for j in vis if abs(j // w - i // w) <= r and abs(j % w - i % w) <= r] or vis
            if near:
                out[b, i] = torch.stack([mean[b, near].mean(), var[b, near].mean()])
    return out[..., :1], out[..., 1:]


def test_visible_stats_are_5x5_neighbourhood_averages_then_the_images_average():
    g = torch.Generator().manual_seed(4)
    grid = (3, 8)
    patches = torch.randn(3, 24, 7, generator=g) * torch.rand(3, 24, 1, generator=g) + torch.randn(3, 24, 1,
                                                                                                   generator=g)
    mask = torch.ones(3, 24)
    mask[0].view(3, 8)[:, :2] = 0  # columns 4-7 have no visible patch within two columns: the image's average
    mask[1] = (torch.rand(24, generator=g) < 0.5).float()
    mask[1, 5] = 1  # image 2 keeps everything removed: zeros
    mean, var = visualize.visible_stats(patches, mask, grid)
    want_mean, want_var = _visible_stats_by_loops(patches, mask, grid)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=1e-6)
    assert not torch.equal(want_mean[0].view(3, 8)[:, 3], want_mean[0].view(3, 8)[:, 5])  # both rules were used


def test_norm_pix_reconstruction_of_flat_patches_keeps_the_epsilon():
    """A perfect norm-pix prediction comes back exactly, even for nearly flat patches where the 1e-6 added to
    the variance (as in the loss) dominates."""
    torch.manual_seed(0)
    m = mae_fast.create_model("mae_vit_demo_patch8", img_size=32, norm_pix_loss=True)
    imgs = 0.3 + 1e-4 * torch.randn(2, 3, 32, 32)
    target = m.patchify(imgs)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    assert var.max() < 1e-7
    normed = (target - mean) / (var + 1e-6) ** 0.5
    rec = visualize.reconstruct(m, imgs, normed, torch.zeros(2, m.num_patches))
    torch.testing.assert_close(rec, imgs, rtol=0, atol=2e-7)


def test_norm_pix_reconstruction_of_removed_patches_uses_their_neighbours_statistics_only():
    """Removed patches are un-normalised with the visible neighbours' statistics: changing the hidden pixels
    changes nothing in the picture, and a removed patch gets exactly visible_stats' mean and variance."""
    torch.manual_seed(2)
    m = mae_fast.create_model("mae_vit_demo_patch8", img_size=(40, 24), norm_pix_loss=True)  # 5 x 3 patches
    imgs = torch.randn(2, 3, 40, 24) * 0.5 + 0.2
    mask = (torch.rand(2, 15) < 0.5).float()
    mask[:, 7] = 1  # the centre patch is removed in both images
    pred = torch.randn(2, 15, 192)
    hidden = m.unpatchify(mask[..., None].expand(-1, -1, 192)).bool()
    other = imgs.clone()
    other[hidden] = other[hidden] * 4.0 - 1.0
    rec = visualize.reconstruct(m, imgs, pred, mask)
    torch.testing.assert_close(visualize.reconstruct(m, other, pred, mask), rec, rtol=0, atol=0)
    mean, var = _visible_stats_by_loops(m.patchify(imgs), mask, m.grid_size)
    want = pred[:, 7] * (var[:, 7] + 1e-6).sqrt().float() + mean[:, 7].float()
    torch.testing.assert_close(m.patchify(rec)[:, 7], want, rtol=1e-5, atol=1e-5)


def test_unnormalize_is_x_std_plus_mean_clamped():
    x = torch.tensor([-4.0, -0.5, 0.0, 0.5, 4.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    got = visualize.unnormalize(x, mean=(0.5, 0.25, 0.1), std=(0.2, 0.5, 1.0))
    want = torch.tensor([[0.0, 0.4, 0.5, 0.6, 1.0], [0.0, 0.0, 0.25, 0.5, 1.0], [0.0, 0.0, 0.1, 0.6, 1.0]])
    torch.testing.assert_close(got[0, :, 0], want)


def test_reconstruction_rows_pixel_by_pixel_on_a_non_square_image():
    """Masking noise from the seed, the mask ratio passed on; row 2 grey exactly on removed patches, row 3
    the prediction there and the original elsewhere; on a 4 x 6 patch grid so rows and columns cannot swap."""
    torch.manual_seed(1)
    m = mae_fast.create_model("mae_vit_demo_patch8", img_size=(32, 48))
    imgs = torch.randn(2, 3, 32, 48)
    rows = visualize.reconstruction_rows(m, imgs, mask_ratio=0.5, seed=3)
    noise = torch.rand(2, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = m(imgs, mask_ratio=0.5, noise=noise)
    removed = out.mask.bool().view(2, 4, 6).repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]  # (2,1,32,48)
    assert removed.float().mean() == 0.5
    mean = torch.tensor(visualize.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(visualize.IMAGENET_STD).view(1, 3, 1, 1)
    orig = (imgs * std + mean).clamp(0, 1)
    recon = (m.unpatchify(out.pred) * std + mean).clamp(0, 1)
    torch.testing.assert_close(rows[0], orig)
    torch.testing.assert_close(rows[1], torch.where(removed, torch.full_like(orig, 0.5), orig))
    torch.testing.assert_close(rows[2], recon)
    torch.testing.assert_close(rows[3], torch.where(removed, recon, orig))


def test_grid_png_layout_scale_and_pixel_rounding(tmp_path):
    """Tiles are scaled up by ceil(min_tile / side), laid out after a 120-pixel label column with 4-pixel gaps;
    a value v becomes round(255 v)."""
    from PIL import Image

    R, N, S = 2, 3, 48
    rows = torch.empty(R, N, 3, S, S)
    for r in range(R):
        for c in range(N):
            rows[r, c, 0], rows[r, c, 1], rows[r, c, 2] = 0.1 * (r * N + c) + 0.1, 0.5, 1.0
    path = visualize.save_grid(rows, tmp_path / "sub" / "g.png", min_tile=128)
    img = Image.open(path).convert("RGB")
    tile = 3 * S  # ceil(128 / 48) = 3
    assert img.size == (120 + N * (tile + 4) + 4, R * (tile + 4) + 4)
    for r in range(R):
        for c in range(N):
            x, y = 120 + 4 + c * (tile + 4), 4 + r * (tile + 4)
            want = (int(255 * (0.1 * (r * N + c) + 0.1) + 0.5), 128, 255)
            assert img.getpixel((x, y)) == want and img.getpixel((x + tile - 1, y + tile - 1)) == want
            assert img.getpixel((x - 1, y)) == (255, 255, 255)  # the gap
    assert sorted(p.name for p in path.parent.iterdir()) == ["g.png"]


# ---------------------------------------------------------------------------------------------------------------
# training curves
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def figures(monkeypatch):
    saved = []
    monkeypatch.setattr(curves, "_save", lambda plt, fig, out: saved.append((fig, out)))
    return saved


def _run(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"step": s, "images_seen": 24 * s, "loss": 1.0 / s, "lr": 1e-3, "images_per_s": 50.0, "mfu": 0.2}
        for s in (1, 2, 3)]


def test_rows_logged_after_a_resume_at_another_interval_come_back_in_step_order(tmp_path):
    """Logged 10-40, resumed from step 20 logging every 5: steps 25 and 35 are new and belong between the old
    ones; 30 is the resumed run's."""
    first = [{"step": s, "loss": 1.0} for s in (10, 20, 30, 40)]
    resumed = [{"step": s, "loss": 2.0} for s in (25, 30, 35)]
    _run(tmp_path / "run", first + resumed)
    got = curves.read_metrics(tmp_path / "run")
    assert [(r["step"], r["loss"]) for r in got] == [(10, 1.0), (20, 1.0), (25, 2.0), (30, 2.0), (35, 2.0),
                                                     (40, 1.0)]


def test_loss_panel_is_log_scaled_only_when_every_loss_is_positive(figures, tmp_path):
    curves.plot_pretrain({"a": ROWS}, tmp_path / "a.png")
    curves.plot_pretrain({"a": ROWS, "b": [dict(ROWS[0], loss=0.0), ROWS[1]]}, tmp_path / "b.png")
    (fig_a, _), (fig_b, _) = figures
    assert fig_a.axes[0].get_yscale() == "log" and fig_b.axes[0].get_yscale() == "linear"
    assert fig_a.axes[1].get_yscale() == "linear"  # the learning rate is never log-scaled


def test_plot_command_x_axis_images_seen(figures, tmp_path, capsys):
    run = _run(tmp_path / "run", ROWS)
    assert curves.main([str(run), "--x", "images_seen"]) == 0
    (fig, out), = figures
    assert out == run / "curves.png" and capsys.readouterr().out.strip() == str(run / "curves.png")
    for ax in fig.axes:
        assert ax.get_xlabel() == "images seen"
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [24, 48, 72]


def test_a_metrics_file_is_a_run_labelled_by_its_directory_and_drawn_beside_it(figures, tmp_path):
    run = _run(tmp_path / "myrun", ROWS)
    out = curves.plot_runs([run / "metrics.jsonl"])
    assert out == run / "curves.png" and figures[0][1] == out
    assert [t.get_text() for t in figures[0][0].axes[0].get_legend().get_texts()] == ["myrun"]


def test_runs_with_the_same_name_are_labelled_by_their_paths(figures, tmp_path):
    a, b = _run(tmp_path / "x" / "run", ROWS), _run(tmp_path / "y" / "run", ROWS[:2])
    curves.plot_runs([a, b], tmp_path / "both.png")
    assert [t.get_text() for t in figures[0][0].axes[0].get_legend().get_texts()] == [str(a), str(b)]


def test_finetune_runs_overlay_one_without_a_finished_epoch(figures, tmp_path):
    hist = [{"epoch": 0, "train_loss": 1.0, "val_loss": 1.2, "top1": 40.0, "top5": 80.0}]
    for name, h in (("done", hist), ("started", [])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"history": h}))
    out = curves.plot_runs([tmp_path / "done", tmp_path / "started"])
    assert out == tmp_path / "done" / "curves.png" and len(figures) == 1


def test_draw_or_warn_warns_for_a_run_with_results_and_stays_quiet_without(tmp_path):
    def fail():
        raise OSError("disk full")

    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "results.json").write_text("{}")
    with pytest.warns(RuntimeWarning, match="training curves not drawn: OSError: disk full"):
        assert curves.draw_or_warn(tmp_path / "ft", fail) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert curves.draw_or_warn(tmp_path, fail) is None
        assert curves.draw_or_warn(tmp_path, lambda: tmp_path / "c.png") == str(tmp_path / "c.png")
