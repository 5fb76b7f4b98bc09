"""``mae-fast`` command line: each subcommand hands its arguments to the module that owns it."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings

COMMANDS = {
    "pretrain": ("mae_fast.training.pretrain", "main", {}, "MAE pretraining (no arguments: the built-in demo)"),
    "finetune": ("mae_fast.training.finetune", "main", {"mode": "finetune"}, "finetune an encoder on labelled images"),
    "linprobe": ("mae_fast.training.finetune", "main", {"mode": "linprobe"}, "linear probe on labelled images"),
    "scale": ("mae_fast.scaling.cli", "main", {}, "scaling sweeps: run / status / fit"),
    "plot": ("mae_fast.training.curves", "main", {}, "training curves of one or more runs as a PNG"),
    "memory": ("mae_fast.memory", "main", {}, "peak memory of a training step, and what fits a budget (no GPU needed)"),
    "info": ("mae_fast.info", "main", {}, "device, versions and which backends can run here"),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:<10} {help_}" for name, (_, _, _, help_) in COMMANDS.items())
    return f"usage: mae-fast <command> [args]\n\ncommands:\n{rows}\n\n'mae-fast <command> --help' for details."


@contextlib.contextmanager
def one_line_warnings(prog: str):
    """Warnings as ``<prog>: warning: <message>``: the user reads what happened, not the library's source line."""
    before = warnings.formatwarning
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"{prog}: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = before


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mae-fast: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, kwargs, _ = COMMANDS[name]
    from mae_fast.extras import MissingExtra

    try:
        with one_line_warnings(f"mae-fast {name}"):
            result = getattr(importlib.import_module(module), func)(rest, **kwargs)
    except MissingExtra as e:  # an optional package a command needs: one line naming the extra, no traceback
        print(f"mae-fast {name}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C (or a run's TrainingInterrupted a command did not handle): no traceback
        print(f"mae-fast {name}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 128 + int(getattr(e, "signum", 2))
    except BrokenPipeError:  # `mae-fast ... | head` closed the pipe: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit does not raise again
        return 141  # 128 + SIGPIPE, what a shell reports for such a pipe
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
