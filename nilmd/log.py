"""Logging for every process role: journald with structured fields when we can, else stderr.

- stderr is the journal ($JOURNAL_STREAM matches fd 2) and systemd-python is installed: its
  JournalHandler, with NILMD_ROLE, NILMD_BUILDING (and NILMD_APPLIANCE where a record carries an
  `appliance` extra) as journal fields, so `journalctl -u nilmd NILMD_ROLE=inference` works;
- stderr is the journal but no systemd-python: one line per record with a "<N>" priority prefix
  and no timestamp (journald adds its own);
- otherwise (a terminal, a test, a pipe): plain readable lines with a timestamp.
A traceback stays in one entry with the JournalHandler. journald's stream protocol splits at
newlines, so in the "<N>" mode every line of a traceback carries the record's priority and an
indent instead (an ERROR's traceback is still filtered in by `journalctl -p err`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

SYSLOG_IDENTIFIER = "nilmd"


def journal_priority(levelno: int) -> int:
    """syslog priority of a logging level. A level between two standard ones counts as the more
    severe one (25 is "warning", 35 is "err"), as systemd-python's JournalHandler maps them, so
    that both journal modes agree."""
    if levelno <= logging.DEBUG:
        return 7
    if levelno <= logging.INFO:
        return 6
    if levelno <= logging.WARNING:
        return 4
    if levelno <= logging.ERROR:
        return 3
    return 2


def stderr_is_journal() -> bool:
    """True when fd 2 is the stream systemd connected to journald ($JOURNAL_STREAM is "dev:ino"
    of it). A child that inherits the variable but has its stderr redirected elsewhere is not."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = stream.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class _ApplianceField(logging.Filter):
    """Copy an `appliance` extra into the upper-case journal field name (journald drops
    lower-case field names, so `extra={"appliance": ...}` alone would be lost)."""

    def filter(self, record):
        appliance = getattr(record, "appliance", None)
        if appliance is not None:
            record.NILMD_APPLIANCE = str(appliance)
        return True


class _Context(logging.Filter):
    """Role and building on every record, for formatters and any other handler."""

    def __init__(self, role: str, building: str):
        super().__init__()
        self.role, self.building = role, building

    def filter(self, record):
        record.NILMD_ROLE = self.role
        record.NILMD_BUILDING = self.building
        return True


class PrefixFormatter(logging.Formatter):
    """'<N>role: message' for journald's stderr stream. journald reads the priority from the
    prefix of each line, so every continuation line (a traceback) gets it too, plus an indent."""

    def format(self, record):
        text = super().format(record)
        prefix = f"<{journal_priority(record.levelno)}>"
        return prefix + text.replace("\n", "\n" + prefix + "  ")


def _journal_handler(role: str, building: str):
    try:
        from systemd.journal import JournalHandler  # optional: no wheels on PyPI
    except ImportError:
        return None
    # Constant fields go to the handler (it validates that they are proper journal field names).
    return JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER, NILMD_ROLE=role, NILMD_BUILDING=building)


def setup(role: str, building: str, level: str = "info") -> logging.Logger:
    """Configure the root logger of this process (call once per process, again after spawn).
    Returns the logger 'nilmd.<role>'."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(str(level).upper())
    handler = _journal_handler(role, building) if stderr_is_journal() else None
    if handler is not None:
        handler.setFormatter(logging.Formatter(f"{role}: %(message)s"))
    elif stderr_is_journal():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PrefixFormatter(f"{role}: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {role}[%(process)d] %(message)s"))
    handler.addFilter(_Context(role, building))
    handler.addFilter(_ApplianceField())
    root.addHandler(handler)
    logger = logging.getLogger(f"nilmd.{role}")
    _route_uncaught(logger)
    return logger


def _route_uncaught(logger: logging.Logger) -> None:
    """An uncaught exception would be printed raw to stderr: several journal entries at the
    default priority. Log it instead: one entry (or one prefixed block) at priority crit."""

    def excepthook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, tb)
            return
        logger.critical("uncaught %s: %s", kind.__name__, value, exc_info=(kind, value, tb))

    def thread_excepthook(args):
        if args.exc_type is SystemExit:
            return
        logger.critical("uncaught %s in thread %s: %s", args.exc_type.__name__,
                        getattr(args.thread, "name", "?"), args.exc_value,
                        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


class Throttle:
    """At most one line per key per period, so a meter that sends garbage 10x a second cannot
    flood the journal: the first occurrence is logged at once; later ones within `period` are
    only counted; the first one after the period is logged with the count it stands for.
    Call flush() now and then (it reports counts whose period is over) and flush(force=True)
    at exit (it reports every count)."""

    def __init__(self, logger: logging.Logger, period: float = 60.0, clock=time.monotonic):
        self.logger, self.period, self.clock = logger, period, clock
        self._state: dict[str, list] = {}  # key -> [window start, suppressed count, level, last msg]

    def log(self, key: str, level: int, msg: str) -> None:
        now = self.clock()
        state = self._state.get(key)
        if state is not None and now - state[0] < self.period:
            state[1] += 1
            state[2] = max(state[2], level)
            state[3] = msg
            return
        if state is not None and state[1]:
            self.logger.log(max(level, state[2]), "%s (%d more like it suppressed in the last %.0f s)",
                            msg, state[1], now - state[0])
        else:
            self.logger.log(level, "%s", msg)
        self._state[key] = [now, 0, level, msg]

    def ok(self, key: str, level: int = logging.INFO, msg: str | None = None) -> None:
        """The condition behind `key` is over: report its suppressed count now, as the past it is
        (at INFO: a recovered error must not reappear a minute later at its own level as if it
        were new), log `msg` if given, and forget the key. `key` also ends the keys it prefixes
        ("redis" ends "redis unreachable", "redis OOM": one per kind of the same condition)."""
        ended = [k for k in self._state if k == key or k.startswith(key + " ")]
        if msg is not None:
            self.logger.log(level, "%s", msg)
        for k in ended:
            state = self._state.pop(k)
            if state[1]:
                self.logger.log(level, "until then: %s (%d more like it suppressed in the last %.0f s)",
                                state[3], state[1], self.clock() - state[0])

    def flush(self, force: bool = False) -> None:
        """Report suppressed counts whose period is over (all of them with force=True), and forget
        keys that have been quiet for a whole period so that the table cannot grow without end."""
        now = self.clock()
        for key, state in list(self._state.items()):
            over = now - state[0] >= self.period
            if state[1] and (over or force):
                self.logger.log(state[2], "%s (%d more like it suppressed in the last %.0f s)",
                                state[3], state[1], now - state[0])
                self._state[key] = [now, 0, logging.NOTSET, state[3]]  # next window: its own levels
            elif over:
                del self._state[key]


def process_main(role: str, building: str, level: str, body) -> None:
    """Entry of a child process: set up logging, exit with `body(logger)`'s code, and log anything
    it raises as one critical entry with its traceback (multiprocessing would print it raw:
    one journal line per traceback line, at info) before exiting 1."""
    logger = setup(role, building, level)
    try:
        code = body(logger)
    except SystemExit:
        raise
    except BaseException:
        logger.critical("the %s process failed", role, exc_info=True)
        code = 1
    sys.exit(code)
