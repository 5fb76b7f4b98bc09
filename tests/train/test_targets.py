"""Reconstruction targets (mae_fast.targets): the config keys, the model's head and loss for a given target, the
teacher (a mae_fast run, an official MAE checkpoint, a timm ViT with local weights; grid matching, normalisation,
layers), and exact resume with HOG and teacher targets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mae_fast
from helpers.train import TINY_MODEL, assert_same_state, ckpt, rows_of, tiny
from mae_fast import targets
from mae_fast.training.config import ConfigError, PretrainConfig
from mae_fast.training.pretrain import main as pretrain_main
from mae_fast.training.pretrain import pretrain


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A 2-step pixel run of the tiny model (patch 8, 32 px): a teacher."""
    return pretrain(tiny(tmp_path_factory.mktemp("teacher"), name="teacher", steps=2))


def cfg(**kw) -> PretrainConfig:
    return PretrainConfig.build(dict(img_size=32, model_kwargs=dict(TINY_MODEL), **kw))


def test_target_keys_keep_todays_default_and_refuse_contradictions():
    assert targets.build_target(cfg()).name == "pixels"
    assert targets.build_target(cfg(norm_pix_loss=True)).name == "norm_pix"
    hog = targets.build_target(cfg(target="hog"))
    assert (hog.width, hog.external) == (3 * 9, True)  # 8-px patches: one 8x8 cell
    assert targets.build_target(cfg(target="hog", hog_cell=4, hog_bins=6)).width == 3 * 6 * 4
    for kw, fragment in [(dict(target="pixels", norm_pix_loss=True), "contradicts norm_pix_loss"),
                         (dict(target="hogg"), "target must be one of"), (dict(target="hog", hog_cell=3), "divide"),
                         (dict(target="teacher"), "needs teacher="),
                         (dict(target="teacher", teacher="no/such/thing"), "neither a file")]:
        with pytest.raises(ConfigError, match=fragment):
            targets.build_target(cfg(**kw))


def test_cli_target_errors_are_one_line_exit_2(capsys, tmp_path):
    assert pretrain_main([f"output_dir={tmp_path}", "target=pixels", "norm_pix_loss=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mae-fast pretrain: target=pixels contradicts") and "\n" not in err


def test_a_given_target_is_reconstructed_at_the_removed_patches(small_mae):
    """The head takes the target's width; both forward paths give the mean squared error over the removed patches'
    rows of the given target; the pixel target passed explicitly gives the model's own (norm-pix) loss."""
    model = small_mae(target_dim=11)
    assert model.decoder_pred.out_features == 11 and model.target_dim == 11
    imgs = torch.randn(2, 3, 48, 48)
    noise = torch.rand(2, model.num_patches)
    target = torch.randn(2, model.num_patches, 11)
    full = model(imgs, 0.75, noise, target=target)
    rows = full.mask.bool()
    assert torch.allclose(full.loss, (full.pred[rows] - target[rows]).pow(2).mean(), rtol=1e-6)
    masked = model(imgs, 0.75, noise, masked_only=True, target=target)
    assert torch.allclose(masked.loss, full.loss, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="not pixels"):
        model(imgs, 0.75, noise)
    with pytest.raises(ValueError, match="target must be a"):
        model(imgs, 0.75, noise, target=target[:, :-1])
    pix = small_mae(norm_pix_loss=True)
    given = targets.PixelTarget(8, norm=True).compute(imgs)
    assert torch.allclose(pix(imgs, 0.75, noise, masked_only=True, target=given).loss,
                          pix(imgs, 0.75, noise, masked_only=True).loss, rtol=1e-5)
    assert set(model.state_dict()) == set(pix.state_dict())  # the same checkpoint keys
    mae_fast.export_timm(model)


def _reference_tokens(mae, imgs):
    """Patch tokens of a MAE encoder, LayerNorm'ed per token without affine: the documented teacher target."""
    tokens = mae.forward_features(imgs)[:, 1:]
    return F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)


def test_teacher_from_a_run_dir_and_an_official_checkpoint(teacher_run, tmp_path):
    t = targets.build_target(cfg(target="teacher", teacher=teacher_run["run_dir"]))
    assert (t.width, t.in_size, t.external) == (48, (32, 32), True)
    mae = mae_fast.create_model("mae_vit_demo_patch8", img_size=32, **TINY_MODEL)
    mae_fast.load_pretrained(mae, teacher_run["checkpoint"], encoder_only=True)
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = _reference_tokens(mae, imgs)
    got = t.compute(imgs)
    assert got.shape == (3, 16, 48) and torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.mean(-1), torch.zeros(3, 16), atol=1e-5)  # normalised per token
    assert all(not p.requires_grad for p in t.encoder.parameters())
    # an official-style checkpoint (weights only, another resolution): the registry names it, pos-embeds resampled
    official = mae_fast.create_model("mae_vit_demo_patch8")  # 64 px, 8x8 grid, width 128, depth 4
    torch.save({"model": official.state_dict()}, tmp_path / "official.pth")
    t2 = targets.load_teacher(str(tmp_path / "official.pth"), (4, 6))
    assert t2.width == 128 and t2.in_size == (32, 48)
    with torch.no_grad():
        resized = mae_fast.create_model("mae_vit_demo_patch8", img_size=(32, 48))
        mae_fast.load_pretrained(resized, official.state_dict(), encoder_only=True)
        x = torch.randn(2, 3, 32, 48)
        assert torch.allclose(t2.compute(x), _reference_tokens(resized, x), atol=1e-5)
    # a teacher of another patch size sees the image resized to the student's grid x its patch
    vit_t = mae_fast.create_model("mae_vit_tiny_patch16", img_size=32, decoder_depth=0)
    torch.save({"model": vit_t.state_dict()}, tmp_path / "p16.pth")
    t3 = targets.load_teacher(str(tmp_path / "p16.pth"), (4, 4), layer=2)
    assert (t3.width, t3.in_size, len(t3.encoder.blocks)) == (192, (64, 64), 2)
    with torch.no_grad():
        at64 = mae_fast.create_model("mae_vit_tiny_patch16", img_size=64, depth=2)
        mae_fast.load_pretrained(at64, {k: v for k, v in vit_t.state_dict().items()
                                        if not k.startswith("blocks.") or int(k.split(".")[1]) < 2}, encoder_only=True)
        x = torch.randn(2, 3, 32, 32)
        h = at64.patch_embed(F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False))
        h = at64._with_cls(h + at64.pos_embed[:, 1:])
        for blk in at64.blocks:  # a layer's output: the last block's, before the final norm
            h = blk(h)
        want = F.layer_norm(h[:, 1:], (192,), eps=1e-6)
        assert torch.allclose(t3.compute(x), want, atol=1e-4)
    p4 = mae_fast.create_model("mae_vit_demo_patch8", patch_size=4, img_size=16, **TINY_MODEL)
    torch.save({"model": p4.state_dict()}, tmp_path / "p4.pth")
    with pytest.raises(ConfigError, match="teacher_model="):
        targets.load_teacher(str(tmp_path / "p4.pth"), (4, 4))


def test_timm_teacher_with_local_weights_and_a_layer(tmp_path):
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "w.pth")
    t = targets.load_teacher("timm:vit_tiny_patch16_224", (4, 4), weights=str(tmp_path / "w.pth"), layer=-1)
    assert (t.width, t.in_size, len(t.encoder.blocks)) == (192, (64, 64), 12)
    imgs = torch.randn(2, 3, 32, 32)  # the student's 32 px, 8-px patches: a 4x4 grid -> 64 px for 16-px patches
    at64 = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64)
    state = timm.models.vision_transformer.checkpoint_filter_fn(vit.state_dict(), at64)
    at64.load_state_dict(state)
    with torch.no_grad():
        x = F.interpolate(imgs, size=(64, 64), mode="bilinear", align_corners=False)
        tokens = at64.blocks(at64.norm_pre(at64._pos_embed(at64.patch_embed(x))))[:, 1:]  # last block, no norm
    assert torch.allclose(t.compute(imgs), F.layer_norm(tokens, (192,), eps=1e-6), atol=1e-4)
    with pytest.raises(ConfigError, match="teacher_layer=13"):
        targets.load_teacher("timm:vit_tiny_patch16_224", (4, 4), weights=str(tmp_path / "w.pth"), layer=13)
    with pytest.raises(ConfigError, match="no such file"):
        targets.load_teacher("timm:vit_tiny_patch16_224", (4, 4), weights=str(tmp_path / "none.pth"))


@pytest.mark.parametrize("target", ["hog", "teacher"])
def test_hog_and_teacher_runs_learn_and_resume_exactly(target, teacher_run, tmp_path):
    """Stopped at step 2 and resumed, a run ends bit-identical to the uninterrupted one; no pixel picture."""
    kw = dict(target=target, hog_cell=4) if target == "hog" else dict(target=target, teacher=teacher_run["run_dir"])
    straight = pretrain(tiny(tmp_path, name="straight", steps=4, checkpoint_every=2, **kw))
    first = pretrain(tiny(tmp_path, name="resumed", steps=4, checkpoint_every=2, stop_at_step=2, **kw))
    assert first["steps"] == 2
    resumed = pretrain(tiny(tmp_path, name="resumed", steps=4, checkpoint_every=2, resume="auto", **kw))
    a, b = ckpt(straight["checkpoint"]), ckpt(resumed["checkpoint"])
    assert_same_state(a["model"], b["model"])
    losses = [r["loss"] for r in rows_of(straight)]
    assert a["loss"] == b["loss"] and losses == [r["loss"] for r in rows_of(resumed)] and len(losses) == 4
    width = 3 * 9 * 4 if target == "hog" else 48
    assert a["model"]["decoder_pred.weight"].shape == (width, 32) and a["config"]["target"] == target
    assert not (tmp_path / "straight" / "reconstruction.png").exists()
