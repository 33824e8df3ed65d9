"""Starting a child of the supervisor: a fresh interpreter that runs one role's entry point with
(cfg, paths), as multiprocessing's spawn start method does, without its resource tracker.

multiprocessing starts a resource tracker with the first spawned child: one more interpreter
(12.7 MB resident, 7.3 MB PSS) that unlinks the named semaphores and shared memory segments
children leave behind. nilmd has neither: its shared memory is plain files that the supervisor
owns (nilmd.daemon.ringbuffer, nilmd.daemon.mapped), so the tracker watched nothing, and it put
a torch-free daemon over its 180 MB. The arguments reach the child as multiprocessing sends
them, pickled through a pipe: the Config holds the Redis password, which must not be in a
child's argv or environment (`ps`, /proc/<pid>/environ). The parent's sys.path goes first, so
the child imports nilmd from where the supervisor did.

`Child` is one role's process as the supervisor tracks it across restarts (its backoff, its
restarts, whether it was judged hung).
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import subprocess
import sys

from nilmd.backoff import Backoff

# What the child runs before nilmd is importable: the parent's sys.path, then nilmd.
_BOOT = ("import os, pickle, sys; f = os.fdopen(int(sys.argv[2]), 'rb'); sys.path[:] = pickle.load(f); "
         "from nilmd.daemon.spawn import child; child(f)")


class Spawned:
    """A started child, with the part of multiprocessing.Process the supervisor uses (pid,
    is_alive, exitcode, join, terminate, kill, close). exitcode is -N for a child killed by
    signal N, as there."""

    def __init__(self, target, args: tuple, name: str):
        """`target`: a function, or its "module:function" name (nilmd.daemon.roles: the parent need
        not import what the child runs)."""
        module, qualname = target.split(":") if isinstance(target, str) else (target.__module__, target.__qualname__)
        read, write = os.pipe()
        try:
            # The interpreter's own flags (-X, -W, -O) as multiprocessing passes them on.
            cmd = [sys.executable, *subprocess._args_from_interpreter_flags(), "-c", _BOOT, name, str(read)]
            self._popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, pass_fds=(read,))
        finally:
            os.close(read)
        with os.fdopen(write, "wb") as pipe:  # a child that died at once: EPIPE, and exitcode says why
            try:
                pickle.dump(list(sys.path), pipe)
                pickle.dump((module, qualname, args), pipe)
            except BrokenPipeError:
                pass
        self.pid = self._popen.pid
        self.name = name

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None  # (reaps a child that has exited)

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self.is_alive():
            self._popen.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()

    def close(self) -> None:
        """Drop an exited child (multiprocessing refuses to close a running one: so does this)."""
        if self.is_alive():
            raise ValueError(f"cannot close {self.name} (pid {self.pid}): it is still running")


class Child:
    """One role's process across its restarts."""

    def __init__(self, role):
        """`role`: its row of nilmd.daemon.roles."""
        self.role = role.name
        self.target = role.entry
        self.stops_first = role.stops_first
        self.process = None
        self.started_at = 0.0  # monotonic
        self.backoff = Backoff()  # its failures: deaths since it last lived Supervisor.HEALTHY_AFTER seconds
        self.restarts = 0
        self.next_start = 0.0
        self.killed_for_hang = False  # judged hung: SIGABRT sent, SIGKILL to follow
        self.aborted_at = 0.0  # monotonic time of that SIGABRT
        self.sigkilled = False

    @property
    def failures(self) -> int:
        return self.backoff.failures

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0


def describe_exit(code: int | None) -> str:
    """How a child ended, for the journal: "exit code 3", "killed by SIGKILL"."""
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def child(pipe) -> None:
    """The child's side: the entry point and its arguments from the pipe, then the entry point.
    Its sys.exit is the child's exit code; an exception is a traceback and 1, as in multiprocessing."""
    with pipe:
        module, name, args = pickle.load(pipe)
    target = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    target(*args)
