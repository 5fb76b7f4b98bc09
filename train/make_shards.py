"""Write sampled video frames (or an image folder) to WebDataset tar shards for streaming pretraining.

    python -m mae_fast.train.make_shards /data/videos /data/shards --hours 100 --subset contiguous --fps 1
    python train/make_shards.py --help

Same as ``python -m mae_fast.data.shards``; the streaming side is
``build_pretrain_dataset("/data/shards")`` (or a brace pattern ``shard-{000000..000099}.tar``).
"""
import sys

from mae_fast.data.shards import main

if __name__ == "__main__":
    sys.exit(main())
