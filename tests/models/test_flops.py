"""FLOP counts (mae_fast/models/flops.py) against torch's FlopCounterMode on real steps of an odd-sized MAE, exactly:
forward, forward + backward, and what gradient checkpointing recomputes."""
import pytest
import torch

import mae_fast
from mae_fast.models import mae_train_flops


# An MAE whose every size is odd or unusual, so each term of the FLOP count shows: 2 input channels, 5-pixel patches on
# a 7 x 9 grid (63 patches; 25 visible at mask 0.6), mlp_ratio 2.5, encoder and decoder of other widths and depths.
ODD = dict(img_size=(35, 45), patch_size=5, in_chans=2, embed_dim=36, depth=3, num_heads=3, decoder_embed_dim=20,
           decoder_depth=2, decoder_num_heads=2, mlp_ratio=2.5, decoder_mlp_ratio=3.5)


def _counted_step(m, imgs, mask_ratio):
    """(forward, backward) FLOPs per image that torch's FlopCounterMode counts in a real step (every matmul)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fwd:
        out = m(imgs, mask_ratio)
    with FlopCounterMode(display=False) as bwd:
        out.loss.backward()
    return fwd.get_total_flops() / len(imgs), bwd.get_total_flops() / len(imgs)


def test_flop_count_equals_the_matmuls_torch_counts_in_an_odd_sized_step(monkeypatch):
    """FLOPs per image, exactly, against FlopCounterMode on a real forward and backward (a 5% tolerance would let a
    whole term go missing: the patch embedding, decoder_embed or the prediction head is under 4% of the demo's).
    The forward counted alone is mae_forward_flops; forward + backward is mae_train_flops less one patch-embedding
    forward, which has no input gradient (images need none): 2 FLOPs per multiply-add of the 25 visible patches."""
    from mae_fast.models import mae_forward_flops

    monkeypatch.setenv("MAE_FAST_BACKEND", "torch")  # plain matmuls, which the counter sees
    torch.manual_seed(0)
    m = mae_fast.MaskedAutoencoderViT(**ODD)
    assert (m.num_patches, m.num_visible(0.6)) == (63, 25)
    for mask_ratio, keep in ((0.6, 25), (0.75, 15)):
        forward, backward = _counted_step(m, torch.randn(3, 2, 35, 45), mask_ratio)
        embed = 2 * keep * (5 * 5 * 2) * 36
        assert mae_forward_flops(m, mask_ratio) == pytest.approx(forward, rel=1e-12)
        assert mae_train_flops(m, mask_ratio) == pytest.approx(forward + backward + embed, rel=1e-12)


@pytest.mark.parametrize("lean", [True, False])
def test_recompute_flops_are_what_checkpointing_adds_to_a_counted_step(monkeypatch, lean):
    """Gradient checkpointing's extra FLOPs (and their share of the step) against FlopCounterMode: a step with
    n blocks checkpointed (decoder first) counts exactly mae_recompute_flops more than one without, at mask 0.6.
    Lean blocks (every checkpointing plan of ``mae-fast memory``) rerun whole, their fused LayerNorm-MLP op
    included; plain blocks stop before fc2, as torch's checkpoint stops once backward's saved tensors are back."""
    from mae_fast.models import mae_recompute_flops, mae_recompute_pct

    monkeypatch.setenv("MAE_FAST_BACKEND", "torch")
    torch.manual_seed(0)
    m = mae_fast.MaskedAutoencoderViT(**ODD)
    m.set_lean_activations(lean)
    imgs, r = torch.randn(2, 2, 35, 45), 0.6
    torch.manual_seed(1)
    forward, backward = _counted_step(m, imgs, r)
    for n in (1, 3, True):
        m.set_grad_checkpointing(n)
        torch.manual_seed(1)
        extra = sum(_counted_step(m, imgs, r)) - forward - backward
        assert extra > 0
        assert mae_recompute_flops(m, r) == pytest.approx(extra, rel=1e-12)
        assert mae_recompute_pct(m, r) == pytest.approx(100 * extra / (3 * forward), rel=1e-12)
    m.set_grad_checkpointing(False)
    assert mae_recompute_flops(m, r) == 0
