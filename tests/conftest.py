import os
import sys
from pathlib import Path

import torch

# bench/ holds the reference MAE formulation that the fidelity tests compare against
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

# Without a GPU, Triton kernels run through the interpreter; set it before anything imports triton so
# every kernel module (whichever test imports it first) is decorated in interpreter mode.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
