"""Optional packages: importing one that is missing gives a one-line error naming the extra that installs it
(``pip install "mae_fast[video]"``), which the command line prints without a traceback (exit code 2)."""
from __future__ import annotations

import importlib

# module -> (the package on PyPI, the mae_fast extra that installs it)
EXTRAS = {
    "av": ("PyAV", "video"),
    "webdataset": ("webdataset", "video"),
    "submitit": ("submitit", "slurm"),
    "xformers": ("xformers", "gpu"),
    "flash_attn": ("flash-attn", "gpu"),
}


class MissingExtra(ImportError):
    """An optional package a feature needs is not installed; the message says which and how to install it."""


def require(module: str, purpose: str):
    """``module`` imported, or :class:`MissingExtra` ("<purpose> needs <package>: pip install ...")."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package, extra = EXTRAS.get(module, (module, None))
        how = f'pip install "mae_fast[{extra}]"' if extra else f"pip install {package}"
        reason = "" if isinstance(e, ModuleNotFoundError) and e.name == module else f" ({str(e).splitlines()[0][:120]})"
        raise MissingExtra(f"{purpose} needs {package}{reason}: {how}", name=module) from None
