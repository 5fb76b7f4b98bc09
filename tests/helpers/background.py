"""Subprocesses that a test only waits for, started in the background when the session's first test starts.

The suite runs one test at a time on one thread, so on a 2-core machine the second core is mostly idle. A test
marked ``@pytest.mark.background(commands=f)`` (a compile check: nvcc, Triton's ptxas for sm_90, a fresh process
compiling the model) has its commands started there early, while the tests before it run; the test itself, through
the ``background`` fixture, waits for them and checks their results exactly as if it had run them. Run alone, a
test starts its commands when it starts.

``f(workdir)`` returns ``{name: (argv, env)}`` (``env`` None: this process's); each runs in ``workdir`` (a
fresh folder per test) with stdout and stderr together in ``workdir/<name>.log``; ``{}`` starts nothing.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path


class Started:
    """One test's background commands: ``workdir``, ``names``, ``wait(name)`` -> (return code, output)."""

    def __init__(self, commands):
        self.workdir = Path(tempfile.mkdtemp(prefix="pytest-background-"))
        self.procs = {}
        for name, (argv, env) in commands(self.workdir).items():
            with open(self.workdir / f"{name}.log", "w") as log:
                self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                                                    cwd=self.workdir)

    @property
    def names(self) -> set:
        return set(self.procs)

    def wait(self, name: str, timeout: float = 600) -> tuple[int, str]:
        rc = self.procs[name].wait(timeout=timeout)
        return rc, (self.workdir / f"{name}.log").read_text(errors="replace")

    def close(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


_started: dict[str, Started] = {}
_all_started = False


def _skipped(item) -> bool:
    if item.get_closest_marker("skip") is not None:
        return True
    return any(m.args and m.args[0] is True for m in item.iter_markers("skipif"))


def start(item) -> Started:
    """The item's commands, started now unless they already are."""
    if item.nodeid not in _started:
        _started[item.nodeid] = Started(item.get_closest_marker("background").kwargs["commands"])
    return _started[item.nodeid]


def start_all(item) -> None:
    """Before the session's first test runs: start the background commands of every test the session runs (and
    does not skip by a marker)."""
    global _all_started
    if _all_started:
        return
    _all_started = True
    for other in item.session.items:
        if other.get_closest_marker("background") is not None and not _skipped(other):
            start(other)


def close_all() -> None:
    for s in _started.values():
        s.close()
    _started.clear()
