"""Finetuning and linear probing: ``torchrun train/finetune.py [--config RECIPE] [mode=linprobe] [key=value ...]``
(or ``mae-fast finetune`` / ``mae-fast linprobe``). The loop is :mod:`mae_fast.training.finetune`."""
import sys

from mae_fast.training.finetune import TrainingInterrupted, finetune, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
