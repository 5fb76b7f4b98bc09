"""Subprocesses that a test only waits for, started in the background when the session's first test starts.

The suite runs one test at a time on one thread, so on a 2-core machine the second core is mostly idle. A test
marked ``@pytest.mark.background(commands=f)`` (a compile check: nvcc, Triton's ptxas for sm_90, a fresh process
compiling the model) has its commands started there early, while the tests before it run; the test itself, through
the ``background`` fixture, waits for them and checks their results exactly as if it had run them. Run alone, a
test starts its commands when it starts.

``f(workdir, **params)`` (``params``: the test's parametrization, if any) returns ``{name: (argv, env)}``
(``env`` None: this process's; OMP_NUM_THREADS=1 unless it says otherwise); each runs in ``workdir`` (a fresh
folder per test) with stdout in ``workdir/<name>.out`` and stderr in ``workdir/<name>.err``; ``{}`` starts
nothing. The commands run one test's at a time, in the session's order, so at most that test's few processes
compete with the tests for the CPU.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path


class Started:
    """One test's background commands: ``workdir``, ``names``, ``wait(name)`` -> (return code, stdout + stderr),
    ``stdout(name)``. Launched by the queue's thread or, if the test comes first, by the test itself."""

    def __init__(self, commands, params):
        self.workdir = Path(tempfile.mkdtemp(prefix="pytest-background-"))
        self.commands = commands(self.workdir, **params)
        self.procs = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> set:
        return set(self.commands)

    def launch(self):
        with self._lock:
            if self.procs or not self.commands:
                return
            for name, (argv, env) in self.commands.items():
                # one intra-op thread, as the tests have: a second would take the core the tests run on
                env = {"OMP_NUM_THREADS": "1", **(os.environ if env is None else env)}
                with open(self.workdir / f"{name}.out", "w") as out, open(self.workdir / f"{name}.err", "w") as err:
                    self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=env,
                                                        cwd=self.workdir)

    def stdout(self, name: str) -> str:
        return (self.workdir / f"{name}.out").read_text(errors="replace")

    def wait(self, name: str, timeout: float = 600) -> tuple[int, str]:
        self.launch()
        rc = self.procs[name].wait(timeout=timeout)
        return rc, self.stdout(name) + (self.workdir / f"{name}.err").read_text(errors="replace")

    def close(self):
        with self._lock:
            self.commands = {}  # the queue launches nothing more
            for p in self.procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


_started: dict[str, Started] = {}
_all_started = False


def _run_queue(queue: list) -> None:
    for s in queue:
        s.launch()
        for p in list(s.procs.values()):
            p.wait()


def _skipped(item) -> bool:
    if item.get_closest_marker("skip") is not None:
        return True
    return any(m.args and m.args[0] is True for m in item.iter_markers("skipif"))


def start(item) -> Started:
    """The item's commands (made once; launched by the queue or by the first ``wait``)."""
    if item.nodeid not in _started:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        _started[item.nodeid] = Started(item.get_closest_marker("background").kwargs["commands"], params)
    return _started[item.nodeid]


def start_all(item) -> None:
    """Before the session's first test runs: queue the background commands of every test the session runs (and
    does not skip by a marker), run one test's at a time by a thread."""
    global _all_started
    if _all_started:
        return
    _all_started = True
    queue = [start(other) for other in item.session.items
             if other.get_closest_marker("background") is not None and not _skipped(other)]
    threading.Thread(target=_run_queue, args=(queue,), daemon=True, name="background-commands").start()


def close_all() -> None:
    for s in _started.values():
        s.close()
    _started.clear()
