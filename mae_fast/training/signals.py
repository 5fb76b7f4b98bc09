"""Stopping a run cleanly: SIGINT / SIGTERM ask for a stop at the end of the step under way, with a checkpoint; a
second one stops at once, keeping a checkpoint of the last finished step where one can be written safely."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped training at the end of a step, after a checkpoint of that step was
    written (``checkpoint``; ``resume=auto`` continues from it). A KeyboardInterrupt, so code that stops on
    Ctrl-C still does; ``signum`` says which signal (every rank raises it at the same step)."""

    def __init__(self, message: str, signum: int, step: int, checkpoint):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopNow(KeyboardInterrupt):
    """A second SIGINT / SIGTERM: stop at once (raised by the signal handler outside a :meth:`StopRequests.critical`
    section, or as that section ends)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequests(list):
    """The signals received while training (a list of signal numbers), and the sections a second signal must not
    cut short (the optimizer step and the bookkeeping of its step count, a checkpoint being written)."""

    def __init__(self):
        super().__init__()
        self.depth, self.pending = 0, None

    @contextlib.contextmanager
    def critical(self):
        """A second signal inside waits for the end of the block (then :class:`StopNow` is raised)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0 and self.pending is not None:
                signum, self.pending = self.pending, None
                raise StopNow(signum)


@contextlib.contextmanager
def stop_requests(prog: str = "mae-fast pretrain"):
    """While training, SIGINT and SIGTERM ask for a stop at the end of the current step, with a checkpoint; a
    second one stops at once (:class:`StopNow`, after the optimizer step or checkpoint under way, if any), and the
    trainer says what was kept (``prog`` names the program in the notice). Yields the :class:`StopRequests`.
    Only in the main thread and only where the signal still has Python's default handler, never over one a
    launcher installed (e.g. submitit's)."""
    received = StopRequests()
    previous = {}

    def handler(signum, frame):
        received.append(signum)
        if len(received) == 1:
            print(f"\n{prog}: {signal.Signals(signum).name}: stopping at the end of this step with a "
                  f"checkpoint (send it again to stop now)", file=sys.stderr, flush=True)
        elif received.depth and len(received) == 2:  # a third one does not wait
            received.pending = signum
        else:
            received.pending = None
            raise StopNow(signum)

    if threading.current_thread() is threading.main_thread():
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) is default:
                previous[sig] = signal.signal(sig, handler)
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def shared_stop(sigterm: float, sigint: float):
    """The signal every rank acts on, from the all-reduced flags (SIGTERM first), else None."""
    if sigterm > 0:
        return signal.SIGTERM
    if sigint > 0:
        return signal.SIGINT
    return None


def signal_flags(signals: list[int]) -> list[float]:
    """[got SIGTERM, got SIGINT] as floats, to all-reduce with the loss."""
    return [float(signal.SIGTERM in signals), float(signal.SIGINT in signals)]
