"""CUDA/C++ sources of mae_fast, shipped with the wheel and compiled on first use (see mae_fast.csrc.masking)."""
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
