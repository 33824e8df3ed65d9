"""nilmd.daemon.spawn: a child is a fresh interpreter that gets its arguments through a pipe, and
its exit reads as multiprocessing's would (the supervisor's crash-loop and hang rules read it)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from conftest import wait_for
from nilmd.daemon.spawn import Spawned

SECRET = "s3cr3t-in-the-arguments"


def report(path: str, settings: dict) -> None:
    """A child: what it was given and what it sees of itself, into `path`."""
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
        cmdline = f.read().decode(errors="replace")
    with open(path, "w") as f:
        json.dump({"settings": settings, "ppid": os.getppid(), "cmdline": cmdline, "environ": dict(os.environ),
                   "multiprocessing": sorted(m for m in sys.modules if m.startswith("multiprocessing"))}, f)


def exit_with(code: int) -> None:
    sys.exit(code)


def fail() -> None:
    raise RuntimeError("a bug in the child")


def hang() -> None:
    time.sleep(120)


def test_the_child_gets_its_arguments_and_nothing_shows_them(tmp_path):
    out = tmp_path / "child.json"
    p = Spawned(report, (str(out), {"password": SECRET, "n": 3}), "nilmd-test")
    p.join(30)
    assert p.exitcode == 0 and not p.is_alive()
    seen = json.loads(out.read_text())
    assert seen["settings"] == {"password": SECRET, "n": 3}
    assert seen["ppid"] == os.getpid()
    assert SECRET not in seen["cmdline"] and SECRET not in json.dumps(seen["environ"])
    assert "nilmd-test" in seen["cmdline"]  # ps shows which role it is
    assert seen["multiprocessing"] == [], "the child was started through multiprocessing"
    p.close()


@pytest.mark.parametrize("target, args, code", [(exit_with, (3,), 3), (exit_with, (78,), 78), (fail, (), 1)])
def test_exit_codes_are_the_childs(target, args, code):
    p = Spawned(target, args, "nilmd-test")
    p.join(30)
    assert p.exitcode == code


def test_a_signalled_child_reads_as_minus_the_signal_and_a_running_one_cannot_be_closed():
    p = Spawned(hang, (), "nilmd-test")
    try:
        p.join(0.2)
        assert p.is_alive() and p.exitcode is None
        with pytest.raises(ValueError, match="still running"):
            p.close()
        os.kill(p.pid, signal.SIGABRT)  # what the supervisor sends a hung child
        wait_for(lambda: not p.is_alive(), 30, "the child to die of SIGABRT")
        assert p.exitcode == -signal.SIGABRT
        p.close()
    finally:
        p.kill()
