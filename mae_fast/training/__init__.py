"""Training: MAE pretraining, finetuning and linear probing, and the parts they share.

    config.py       typed settings (PretrainConfig, FinetuneConfig) from YAML recipes and key=value overrides
    pretrain.py     the pretraining run: setup -> restore -> for step: batch -> forward/backward -> optimizer
                    -> log / checkpoint
    finetune.py     finetuning and the linear probe on labelled images (the same shape, per epoch)
    checkpoint.py   checkpoint files that survive a kill, keep-last-K, RNG states
    distributed.py  process groups, DDP / FSDP2 wrapping, whole state dicts
    metrics.py      metrics.jsonl, throughput / MFU windows, progress bar
    signals.py      SIGINT / SIGTERM stop a run at the end of a step
    cli.py          the command line every entry point shares
    curves.py, visualize.py   training curves and reconstruction pictures

Data order and samplers live in :mod:`mae_fast.data.samplers`, optimizers and the schedule in
:mod:`mae_fast.optim`, the memory plan in :mod:`mae_fast.memory`. The scripts in ``train/`` (installed as
``mae_fast.train``) are thin entry points over this package.
"""
