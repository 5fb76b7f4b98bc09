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

# With torch 2.11, FSDP2 peaked above one unsharded device at the tests' small sizes (so did its own FSDPMemTracker,
# which test_memory's estimate matches exactly); with torch 2.14 it peaks below. Tests assert the saving only there.
FSDP2_PEAKS_BELOW_UNSHARDED = torch.__version__ >= (2, 14)  # TorchVersion compares with tuples
