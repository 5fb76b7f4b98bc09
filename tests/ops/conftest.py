import pytest
import torch


def pytest_addoption(parser):
    # bench/triage_triton_attention.sh runs the attention kernel tests once per tiling; read with a default, as this
    # conftest's options exist only when pytest starts in (or is given a path under) tests/ops
    parser.addoption("--attention-tiling", default="split", choices=("split", "single", "wrap", "equal"),
                     help="the tiling the Triton attention kernel tests launch (mae_fast.kernels.flash_attention)")


@pytest.fixture
def attention_tiling(request):
    return request.config.getoption("--attention-tiling", default="split")


@pytest.fixture
def poison_flash_attention_outputs(monkeypatch):
    """Every buffer the Triton attention launchers allocate starts as NaN, so unwritten elements show."""
    from mae_fast.kernels import flash_attention

    def nan_alloc(shape, dtype=None, device=None, **kw):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(flash_attention, "_alloc", nan_alloc)
