"""Out-of-bounds checker for Triton kernels run by the CPU interpreter (``TRITON_INTERPRET=1``).

The interpreter turns every ``tl.load``/``tl.store`` into raw host-memory reads and writes, so a pointer
that strays past its tensor reads some other CPU memory (or segfaults) instead of failing the way it would
under compute-sanitizer. While :func:`triton_memcheck` is active, every masked-in element of every load
and store must lie (all of its bytes) inside the storage of one of the current launch's tensor arguments;
otherwise :class:`OutOfBoundsAccess` is raised naming the kernel, the program id and the offending offset.

With ``masked_out_loads=True`` loads are checked at every lane, masked out or not: a kernel then passes
only if its load addresses are in bounds even where the mask would have saved it (what a compiler that
speculates or mis-predicates a load, e.g. a software-pipelined prologue, would still read). Stores are
always checked at masked-in lanes only.

With ``span=True`` the check is stricter: the element must lie between the first and last byte that the
argument's own view covers (so a kernel reading ``q`` of a packed ``qkv`` tensor past its last row fails,
even though that memory belongs to the same storage).

Usage::

    with triton_memcheck() as stats:
        run_kernels()
    assert stats.elements_checked > 0
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from unittest import mock

import numpy as np

__all__ = ["OutOfBoundsAccess", "MemcheckStats", "triton_memcheck"]


class OutOfBoundsAccess(AssertionError):
    pass


@dataclasses.dataclass
class MemcheckStats:
    launches: int = 0
    accesses: int = 0
    elements_checked: int = 0
    kernels: dict = dataclasses.field(default_factory=dict)  # kernel name -> launch count
    violations: list = dataclasses.field(default_factory=list)  # messages, with raise_errors=False


@dataclasses.dataclass
class _Region:
    name: str
    start: int  # byte address
    end: int  # one past the last byte


@dataclasses.dataclass
class _Launch:
    kernel: str
    regions: list  # sorted by start


_state = threading.local()


def _tensor_like(x):
    return hasattr(x, "data_ptr") and hasattr(x, "untyped_storage")


def _regions_of(name, t, span):
    base = getattr(t, "base", None)  # triton TensorWrapper (reinterpreted dtype) wraps a torch tensor
    if base is not None and _tensor_like(base) and not _tensor_like(t):
        t = base
    if not _tensor_like(t):
        return []
    if span:
        if t.numel() == 0:
            return [_Region(name, t.data_ptr(), t.data_ptr())]
        last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))  # torch strides are never negative
        lo = t.data_ptr()
        hi = lo + (last + 1) * t.element_size()
        return [_Region(name, lo, hi)]
    st = t.untyped_storage()
    return [_Region(name, st.data_ptr(), st.data_ptr() + st.nbytes())]


def _collect(arg_names, args_hst, kwargs_hst, span):
    regions = []

    def visit(name, a):
        if isinstance(a, (tuple, list)):
            for i, x in enumerate(a):
                visit(f"{name}[{i}]", x)
            return
        if hasattr(a, "base") and hasattr(a, "block_shape"):  # TensorDescriptor
            visit(f"{name}.base", a.base)
            return
        regions.extend(_regions_of(name, a, span))

    for name, a in zip(arg_names, args_hst):
        visit(name, a)
    for name, a in kwargs_hst.items():
        visit(name, a)
    return sorted(regions, key=lambda r: r.start)


def _check(ptrs, mask, what):
    launch = getattr(_state, "launch", None)
    stats = getattr(_state, "stats", None)
    if launch is None or stats is None:
        return
    from triton.runtime.interpreter import _get_np_dtype

    addrs = np.asarray(ptrs.data, dtype=np.uint64)
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
        addrs = addrs[m]
    addrs = addrs.ravel()
    stats.accesses += 1
    stats.elements_checked += addrs.size
    if addrs.size == 0:
        return
    itemsize = np.dtype(_get_np_dtype(ptrs.get_element_ty())).itemsize
    starts = np.array([r.start for r in launch.regions], dtype=np.uint64)
    ends = np.array([r.end for r in launch.regions], dtype=np.uint64)
    ok = np.zeros(addrs.shape, dtype=bool)
    for s, e in zip(starts, ends):  # few regions per launch; overlapping views are fine
        ok |= (addrs >= s) & (addrs + np.uint64(itemsize) <= e)
    if ok.all():
        return
    bad = addrs[~ok]
    first = int(bad[0])
    # describe the offending address relative to the nearest argument
    best = min(launch.regions, key=lambda r: min(abs(first - r.start), abs(first - r.end)))
    off = first - best.start
    grid_idx = None
    try:
        from triton.runtime.interpreter import interpreter_builder

        grid_idx = tuple(interpreter_builder.grid_idx)
    except Exception:
        pass
    msg = (
        f"{launch.kernel}: out-of-bounds {what} of {bad.size} element(s) (itemsize {itemsize}) in program "
        f"{grid_idx}: first at byte offset {off} ({off / itemsize:+.1f} elements) from argument "
        f"'{best.name}' [{best.end - best.start} bytes]"
    )
    if not getattr(_state, "raise_errors", True):
        stats.violations.append(msg)
        return
    raise OutOfBoundsAccess(msg)


@contextlib.contextmanager
def triton_memcheck(span: bool = False, masked_out_loads: bool = False, raise_errors: bool = True):
    """Context manager: bounds-check every masked-in load/store of interpreted Triton launches.

    With ``raise_errors=False`` violations are only recorded in ``stats.violations`` (for surveys).
    """
    from triton.runtime import interpreter as interp

    stats = MemcheckStats()
    builder_cls = interp.InterpreterBuilder
    executor_cls = interp.GridExecutor
    orig = {n: getattr(builder_cls, n) for n in
            ("create_load", "create_masked_load", "create_store", "create_masked_store")}
    orig_init = executor_cls._init_args_hst
    orig_restore = executor_cls._restore_args_dev

    def guarded(name, fn, check):
        # create_load delegates to create_masked_load: check once, at the outermost entry
        def wrapper(self, *args, **kwargs):
            depth = getattr(_state, "depth", 0)
            if depth == 0:
                check(*args)
            _state.depth = depth + 1
            try:
                return fn(self, *args, **kwargs)
            finally:
                _state.depth = depth
        wrapper.__name__ = name
        return wrapper

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        name = getattr(self.fn, "__name__", str(self.fn))
        _state.launch = _Launch(name, _collect(self.arg_names, args_hst, kwargs_hst, span))
        stats.launches += 1
        stats.kernels[name] = stats.kernels.get(name, 0) + 1
        return args_hst, kwargs_hst

    def restore_args_dev(self, *args, **kwargs):
        _state.launch = None
        return orig_restore(self, *args, **kwargs)

    patches = {
        "create_load": guarded("create_load", orig["create_load"],
                               lambda ptr, *a: _check(ptr, None, "load")),
        "create_masked_load": guarded("create_masked_load", orig["create_masked_load"],
                                      lambda ptrs, mask, *a: _check(ptrs, None if masked_out_loads else mask,
                                                                    "load (any lane)" if masked_out_loads
                                                                    else "load")),
        "create_store": guarded("create_store", orig["create_store"],
                                lambda ptr, *a: _check(ptr, None, "store")),
        "create_masked_store": guarded("create_masked_store", orig["create_masked_store"],
                                       lambda ptrs, value, mask, *a: _check(ptrs, mask, "store")),
    }
    if getattr(_state, "stats", None) is not None:
        raise RuntimeError("triton_memcheck is not re-entrant")
    with contextlib.ExitStack() as patched:  # undone on exit, whatever happens
        for n, f in patches.items():
            patched.enter_context(mock.patch.object(builder_cls, n, f))
        patched.enter_context(mock.patch.object(executor_cls, "_init_args_hst", init_args_hst))
        patched.enter_context(mock.patch.object(executor_cls, "_restore_args_dev", restore_args_dev))
        _state.stats = stats
        _state.launch = None
        _state.raise_errors = raise_errors
        try:
            yield stats
        except Exception as e:
            # the interpreter re-raises kernel exceptions as InterpreterError(repr(e)): surface ours directly
            cause = e
            while cause is not None and not isinstance(cause, OutOfBoundsAccess):
                cause = cause.__cause__
            if cause is not None and cause is not e:
                raise cause from None
            raise
        finally:
            _state.stats = None
            _state.launch = None
