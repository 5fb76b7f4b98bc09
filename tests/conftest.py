import sys
from pathlib import Path

# bench/ holds the reference MAE formulation that the fidelity tests compare against
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
