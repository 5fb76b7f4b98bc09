import numpy as np
import pytest

from helpers import images


def _all_frames(path) -> np.ndarray:
    """Every frame of a video, decoded sequentially by PyAV (the reference for time-based reads)."""
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="session")
def all_frames():
    """``all_frames(path)``: every frame of a video as PyAV decodes it in order, (T, H, W, 3) uint8."""
    pytest.importorskip("av")
    return _all_frames


@pytest.fixture(scope="session")
def write_pngs():
    """``write_pngs(folder, n, size=(11, 13), seed=0)``: writes n random PNGs named 000.png, 001.png, ...,
    returns their paths."""
    return images.write_pngs


@pytest.fixture(scope="session")
def demo():
    """The default demo set (6 one-minute videos at 8 fps, 96 x 96; 8 classes of 40 + 40 images) in its default
    cache ($MAE_FAST_DATA or ~/.cache/mae_fast/demo), which the trainer's and the sweeps' tests read too: generated
    on first use, reused after (the tests here only read it)."""
    pytest.importorskip("av")
    from mae_fast.data import ensure_demo_data

    return ensure_demo_data(verbose=False)


@pytest.fixture(scope="session")
def frames_by_video(demo):
    """Every frame of each demo video, by path."""
    return {str(p): _all_frames(p) for p in sorted(demo.videos.glob("*.mp4"))}
