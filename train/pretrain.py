"""MAE pretraining: ``torchrun train/pretrain.py [--config RECIPE] [key=value ...]`` (or ``mae-fast pretrain``).

The loop is :mod:`mae_fast.training.pretrain`: setup, restore, then for each step batch -> forward/backward ->
optimizer -> log / checkpoint.
"""
import sys

from mae_fast.training.pretrain import NonFiniteLossError, TrainingInterrupted, main, pretrain  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
