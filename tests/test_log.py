"""nilmd.log: the three output modes (journald fields, "<N>" stderr, plain lines) and Throttle.

The stderr modes run in a real child process whose fd 2 is a pipe; $JOURNAL_STREAM is set to
that pipe's dev:ino exactly as systemd would, so the detection is exercised for real.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nilmd import log

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_SYSTEMD = Path("/usr/lib/python3/dist-packages/systemd")

CHILD = """
import logging, sys
from nilmd import log
lg = log.setup("reader", "b1", "debug")
lg.debug("dbg")
lg.info("hello %s", "world")
lg.warning("careful", extra={"appliance": "Dryer"})
try:
    1 / 0
except ZeroDivisionError:
    lg.exception("boom")
logging.getLogger("nilmd.x").log(35, "custom level")
import threading
t = threading.Thread(target=lambda: {}["missing"], name="worker")
t.start(); t.join()
raise RuntimeError("unhandled")
"""


def run_child(journal_stream: bool, extra_env=None) -> list[str]:
    """Run CHILD with stderr on a pipe; optionally claim that pipe is the journal stream."""
    r, w = os.pipe()
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra_env or {})
    if journal_stream:
        st = os.fstat(w)
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stderr=w, env=env, cwd=ROOT)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    assert proc.wait(timeout=30) == 1, out  # CHILD ends with an uncaught exception
    return out.splitlines()


def test_journal_stream_gets_priority_prefixes_and_no_timestamps():
    lines = run_child(journal_stream=True, extra_env={"PYTHONNOUSERSITE": "1"})
    assert lines[0] == "<7>reader: dbg"
    assert lines[1] == "<6>reader: hello world"
    assert lines[2] == "<4>reader: careful"
    assert lines[3] == "<3>reader: boom"
    # journald splits its stream at newlines: each traceback line must carry the same priority
    custom = lines.index("<3>reader: custom level")  # level 35 counts as the more severe neighbour
    tb = lines[4:custom]
    assert tb and all(ln.startswith("<3>  ") for ln in tb), lines
    assert any("ZeroDivisionError" in ln for ln in tb)
    # uncaught exceptions, in a thread and in the main thread: logged at crit, traceback included
    rest = lines[custom + 1:]
    assert rest[0] == "<2>reader: uncaught KeyError in thread worker: 'missing'", rest
    main = rest.index("<2>reader: uncaught RuntimeError: unhandled")
    assert all(ln.startswith("<2>") for ln in rest), rest
    assert any("Traceback" in ln for ln in rest[main:])
    assert not any(re.search(r"\d\d:\d\d:\d\d", ln) for ln in lines), "journald stamps lines itself"


def test_plain_lines_outside_the_journal():
    lines = run_child(journal_stream=False)
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO reader\[\d+\] hello world$", lines[1]), lines
    assert not any(ln.startswith("<") for ln in lines)
    # a traceback is one indented block right after its message
    i = next(i for i, ln in enumerate(lines) if ln.endswith("boom"))
    assert lines[i + 1].startswith("Traceback")


def test_stderr_is_journal_needs_the_exact_stream(monkeypatch):
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert log.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not log.stderr_is_journal()  # inherited variable, stderr redirected elsewhere
    for junk in ("", "garbage", ":", "1:x"):
        monkeypatch.setenv("JOURNAL_STREAM", junk)
        assert not log.stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not log.stderr_is_journal()


@pytest.fixture
def root_logger_restored():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _systemd_python(monkeypatch, tmp_path):
    """Make systemd-python importable: the venv's own, else Debian's python3-systemd when its
    compiled modules match this interpreter's ABI."""
    try:
        import systemd.journal  # noqa: F401
        return
    except ImportError:
        pass
    abi = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    if not any(p.name.startswith("_journal." + abi) for p in DEBIAN_SYSTEMD.glob("_journal.*.so")):
        pytest.skip("systemd-python is not installed (pip install systemd-python, or apt-get install python3-systemd)")
    (tmp_path / "sdpy").mkdir()
    (tmp_path / "sdpy" / "systemd").symlink_to(DEBIAN_SYSTEMD)
    monkeypatch.syspath_prepend(str(tmp_path / "sdpy"))
    for name in [m for m in sys.modules if m == "systemd" or m.startswith("systemd.")]:
        monkeypatch.delitem(sys.modules, name)


def test_journal_handler_sends_upper_case_fields(monkeypatch, tmp_path, capfd, root_logger_restored):
    _systemd_python(monkeypatch, tmp_path)
    st = os.fstat(2)  # under capfd, fd 2 is pytest's capture file: call it the journal stream
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    lg = log.setup("inference", "b7", "info")
    (handler,) = logging.getLogger().handlers
    assert type(handler).__name__ == "JournalHandler"
    sent = []
    handler.send = lambda MESSAGE, **fields: sent.append((MESSAGE, fields))  # systemd.journal.send
    lg.info("loaded", extra={"appliance": "Microwave"})
    try:
        raise ValueError("bad weights")
    except ValueError:
        lg.exception("reload failed")
    lg.debug("not at info")
    assert len(sent) == 2
    message, fields = sent[0]
    assert message == "inference: loaded"
    assert fields["PRIORITY"] == "6"
    assert fields["SYSLOG_IDENTIFIER"] == "nilmd"
    assert fields["NILMD_ROLE"] == "inference" and fields["NILMD_BUILDING"] == "b7"
    assert fields["NILMD_APPLIANCE"] == "Microwave"
    message, fields = sent[1]
    assert fields["PRIORITY"] == "3" and "NILMD_APPLIANCE" not in fields
    # the traceback is inside the one entry, not separate entries
    assert message.startswith("inference: reload failed\nTraceback") and "ValueError: bad weights" in message
    assert capfd.readouterr().err == ""  # nothing leaked to stderr besides the journal


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append((record.levelno, record.getMessage()))


def _throttle():
    logger = logging.getLogger("nilmd.test.throttle")
    logger.propagate = False
    logger.handlers[:] = [cap := Capture()]
    logger.setLevel(logging.DEBUG)
    clock = FakeClock()
    return log.Throttle(logger, period=60.0, clock=clock), cap.records, clock


def test_throttle_one_line_per_key_per_period():
    th, out, clock = _throttle()
    for i in range(100):  # a meter sending garbage ten times a second for 10 s
        th.log("nan", logging.WARNING, f"NaN sample {i}")
        clock.t += 0.1
    th.log("skew", logging.WARNING, "clock skew")  # other keys are independent
    assert out == [(logging.WARNING, "NaN sample 0"), (logging.WARNING, "clock skew")]
    clock.t += 55.0
    th.log("nan", logging.WARNING, "NaN sample 100")  # period over: logged, with what it stands for
    assert out[-1] == (logging.WARNING, "NaN sample 100 (99 more like it suppressed in the last 65 s)")
    th.log("nan", logging.WARNING, "NaN sample 101")
    assert len(out) == 3


def test_throttle_flush_reports_suppressed_counts():
    th, out, clock = _throttle()
    th.log("k", logging.INFO, "a")
    th.log("k", logging.ERROR, "b")  # the most severe level of the suppressed ones is kept
    th.log("k", logging.INFO, "c")
    th.flush()
    assert out == [(logging.INFO, "a")], "nothing to report before the period is over"
    clock.t += 61
    th.flush()
    assert out[-1] == (logging.ERROR, "c (2 more like it suppressed in the last 61 s)")
    th.flush()
    assert len(out) == 2, "a count is reported once"
    th.log("k", logging.INFO, "d")
    th.flush(force=True)  # at exit: everything, period or not
    assert out[-1] == (logging.INFO, "d (1 more like it suppressed in the last 0 s)")
    clock.t += 120
    th.flush()
    assert th._state == {}, "quiet keys are forgotten"
    th.log("k", logging.INFO, "e")
    assert out[-1] == (logging.INFO, "e")


def test_throttle_ok_reports_a_recovered_error_now_as_past_and_never_again():
    """Issue 12: a minute after Redis came back, the throttle re-logged its error as if new."""
    th, out, clock = _throttle()
    for _ in range(5):
        th.log("redis", logging.ERROR, "Redis unreachable")
        clock.t += 1
    th.ok("redis", msg="Redis is back")
    assert out[1:] == [(logging.INFO, "Redis is back"),
                       (logging.INFO, "until then: Redis unreachable (4 more like it suppressed in the last 5 s)")]
    clock.t += 61
    th.flush()
    assert len(out) == 3, "nothing about the old error after recovery"
    th.log("redis", logging.ERROR, "Redis unreachable")
    assert out[-1] == (logging.ERROR, "Redis unreachable"), "a new failure is logged at once"


def test_throttle_ok_ends_every_kind_of_its_condition():
    """Issue 23, defect 8: the reader logs `redis <kind>` (one key per kind of failure) and ends them
    with ok("redis"): the suppressed ERROR came back ~55 s after "is back" with no new error."""
    th, out, clock = _throttle()
    for kind in ("unreachable", "unreachable", "LOADING", "unreachable"):
        th.log(f"redis {kind}", logging.ERROR, f"input source stream: {kind}")
        clock.t += 1
    th.log("cut timeout", logging.WARNING, "another condition")
    th.ok("redis", msg="input source stream is back")
    assert out[-2:] == [(logging.INFO, "input source stream is back"),
                        (logging.INFO, "until then: input source stream: unreachable (2 more like it suppressed in "
                                       "the last 4 s)")]
    clock.t += 61
    th.flush()
    assert all(level < logging.ERROR for level, _ in out[3:]), out  # nothing about the old error at ERROR
