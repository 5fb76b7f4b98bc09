import os
import sys
from pathlib import Path

import pytest
import torch

# bench/ holds the reference MAE formulation that the fidelity tests compare against
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

# Without a GPU, Triton kernels run through the interpreter; set it before anything imports triton so
# every kernel module (whichever test imports it first) is decorated in interpreter mode.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The demo model made small enough for a training step on the CPU in a fraction of a second (tests/helpers/train.py;
# tests/ is on pytest's pythonpath). Imported after TRITON_INTERPRET is set: it imports the library.
from helpers.train import TINY_MODEL  # noqa: E402

# A small MAE for the model tests: 48 px images of 8-pixel patches (a 6 x 6 grid), two blocks each side.
SMALL_MAE = dict(img_size=48, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                 decoder_depth=2, decoder_num_heads=4)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the whole suite (subprocesses that train get OMP_NUM_THREADS=1): the tests' models
    and tensors are small, so a second thread saves little, and on a 2-core machine where anything else runs
    (the other test process of a torchrun, a compiler, another job) threads that wait on each other at every op
    made steps many times slower. Session-wide, so module-scoped runs and the tests comparing with them agree."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model_kwargs():
    """TINY_MODEL's overrides of mae_vit_demo_patch8 (a fresh copy per test)."""
    return dict(TINY_MODEL)


@pytest.fixture
def small_mae():
    """Factory of SMALL_MAE models: ``small_mae(**overrides)``; ``randomise=True`` adds noise to every parameter
    but the position tables (trained-looking weights: LayerNorms, biases and tokens away from their init)."""
    import mae_fast

    def make(randomise=False, **overrides):
        m = mae_fast.MaskedAutoencoderViT(**{**SMALL_MAE, **overrides})
        if randomise:
            for n, p in m.named_parameters():
                if "pos_embed" not in n:
                    p.data.add_(0.05 * torch.randn_like(p))
        return m

    make.cfg = dict(SMALL_MAE)
    return make


@pytest.fixture
def reference_pair():
    """Factory of (reference, ours): bench/reference_mae.py's ReferenceMAE (facebookresearch/mae's formulas on
    timm blocks) and mae_fast's model, in fp64 with the same weights; SMALL_MAE unless overridden."""
    import mae_fast
    from reference_mae import ReferenceMAE

    def make(norm_pix=False, **overrides):
        cfg = {**SMALL_MAE, **overrides, "norm_pix_loss": norm_pix}
        torch.manual_seed(0)
        ref = ReferenceMAE(**cfg).double()
        ours = mae_fast.MaskedAutoencoderViT(**cfg).double()
        ours.load_state_dict(ref.state_dict(), strict=True)
        return ref, ours

    return make


def pytest_configure(config):
    config.addinivalue_line("markers", "background(commands=f): start the test's commands f(workdir) (compilers) in "
                                       "the background when the session's first test starts (helpers/background.py)")


def pytest_runtest_setup(item):
    from helpers import background

    background.start_all(item)


def pytest_sessionfinish(session):
    from helpers import background

    background.close_all()


@pytest.fixture
def background(request):
    """The test's ``@pytest.mark.background`` commands (tests/helpers/background.py): ``wait(name)``."""
    from helpers import background as bg

    return bg.start(request.node)
