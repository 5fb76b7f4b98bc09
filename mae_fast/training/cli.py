"""The command line of every training entry point (``mae-fast pretrain / finetune / linprobe``, ``train/*.py``):
``[--config RECIPE|path.yaml] [key=value ...] [--key value ...]``, ``--help`` listing every key with its meaning
and default, one-line errors on stderr with exit code 2 for bad input, and the exit code a signal would give
when SIGINT / SIGTERM stopped the run (after its checkpoint)."""
from __future__ import annotations

import difflib
import signal
import sys
from typing import Callable

from mae_fast.data.base import DataError
from mae_fast.extras import MissingExtra
from mae_fast.models.checkpoint import CheckpointError
from mae_fast.training.config import DEFAULT_RECIPE, KEYS, ConfigError, _parse_overrides, config_from_argv, help_text
from mae_fast.training.signals import StopNow, TrainingInterrupted

# the user's input: a one-line message, no traceback
USER_ERRORS = (ConfigError, FileNotFoundError, CheckpointError, DataError, MissingExtra)


def run_command(argv, config_cls, run: Callable, *, prog: str, fixed: dict | None = None,
                errors: dict | None = None) -> int:
    """Parse ``argv`` into the keys of ``config_cls`` (its recipes, overrides, ``fixed`` keys the command sets),
    checked, and ``run`` them (a dict of every key, ``recipe`` None: nothing left to merge); turn the outcome into an
    exit code: 0, 2 for bad input, ``errors[type]`` for the run's own failures, 128 + signum for a run a signal
    stopped."""
    argv = list(sys.argv[1:] if argv is None else argv)
    keys = KEYS[config_cls]
    if any(a in ("-h", "--help") for a in argv):
        return show_help(argv, config_cls, prog, fixed)
    try:
        check_options(argv, keys)
        cfg = config_from_argv(argv, keys, DEFAULT_RECIPE[config_cls], fixed=fixed)
        config_cls.from_dict(cfg)  # every key a field
        run(dict(cfg, recipe=None))
    except USER_ERRORS as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # the summary above says where; exit as the signal would have
        print(f"{prog}: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    except StopNow as e:  # a second signal where no step count or checkpoint is at hand (finetuning)
        print(f"{prog}: second {e}: stopped at once; resume=auto continues from the last checkpoint",
              file=sys.stderr)
        return 128 + int(e.signum)
    except KeyboardInterrupt:  # Ctrl-C before training started (reading data, building the model)
        print(f"{prog}: interrupted before training started; nothing was saved", file=sys.stderr)
        return 128 + signal.SIGINT
    except tuple(errors or ()) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return next(code for cls, code in errors.items() if isinstance(e, cls))
    return 0


def show_help(argv, config_cls, prog: str, fixed: dict | None) -> int:
    """``--help``: every key with the value the chosen recipe (``--config``, else the command's default one) gives
    it, so what is listed is what a run with no overrides uses."""
    keys = KEYS[config_cls]
    rest = [a for a in argv if a not in ("-h", "--help")]
    try:
        recipe = _parse_overrides(rest)[0] or DEFAULT_RECIPE[config_cls]
        values = config_from_argv(["--config", recipe] if recipe else [], keys, None, fixed=fixed)
    except (ConfigError, FileNotFoundError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    print(help_text(keys, prog, values, recipe))
    return 0


def check_options(argv, keys: dict) -> None:
    """``--name`` options that are no key: "unknown option", with a suggestion only for a near miss (a typo)."""
    for tok in argv:
        if not tok.startswith("--") or tok == "--":
            continue
        name = tok[2:].split("=", 1)[0]
        key = name.replace("-", "_").split(".")[0]
        if name != "config" and key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=3, cutoff=0.75)
            hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
            raise ConfigError(f"unknown option --{name}{hint}; --help lists the options (every key, as --key value "
                              f"or key=value)")
