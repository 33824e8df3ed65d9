"""sd_notify(3) in pure Python: a datagram to $NOTIFY_SOCKET. Silent when there is none.

Only the supervisor sends (the unit has NotifyAccess=main, so systemd ignores anything else the
children might send). systemd-python is optional and has no wheels, so this does not use it.

Nor does it use the `sdnotify` package (0.3.2, 2017) that the design names, which cannot do what
nilmd needs here:
- its constructor reads NOTIFY_SOCKET from os.environ and connects there and then, once: nilmd
  reads the variables from the environment it is given (the tests give one), removes them so the
  children cannot inherit them, and retries a socket that is not there on every message;
- it encodes messages as Latin-1 and raises on any other character, where sd_notify(3) speaks
  UTF-8;
- it either swallows every error (a bare except) or raises every one, construction included, so
  "was it sent" (what every method here returns) needs a wrapper around both;
- it is published as an sdist only, so an offline box installing from a wheelhouse or a local
  mirror (scripts/install.sh, tests/test_install.py) has to build it.
What it would do for nilmd is one sendall() on a connected socket; send() below does the same
with a sendto() to the address it resolved.
"""

from __future__ import annotations

import os
import socket
import time


def _address(value: str) -> str | None:
    # "@name" is the abstract namespace; a path must be absolute. Anything else (e.g. the
    # "vsock:" addresses of systemd >= 254 for VMs) is not for us: stay silent rather than guess.
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Messages to the service manager. Every method returns True if the datagram was sent and
    False otherwise (no systemd, or it went away): callers never need to check `enabled`.

    unset_environment=True removes NOTIFY_SOCKET/WATCHDOG_* from os.environ (like sd_notify's
    unset_environment), so child processes do not inherit them and cannot talk to systemd.
    """

    def __init__(self, environ=None, unset_environment: bool = False):
        use_os = environ is None
        environ = os.environ if use_os else environ
        self._address = _address(environ.get("NOTIFY_SOCKET", ""))
        self._sock = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process systemd expects pings from; a child that inherited
        # the variables must not think the watchdog is its business.
        ours = not pid or pid == str(os.getpid())
        self.watchdog_usec = int(usec) if usec.isdigit() and int(usec) > 0 and ours else 0
        if unset_environment and use_os:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the timeout, as sd_watchdog_enabled(3)
        recommends), or None without a watchdog."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, *lines: str) -> bool:
        if self._address is None or not lines:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self._address)
            return True
        except OSError:
            return False  # systemd went away or the socket is gone: nothing useful to do

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def reloading(self) -> bool:
        # systemd >= 253 (Type=notify-reload) requires MONOTONIC_USEC with RELOADING=1 to match
        # the reload to the request; 252 ignores it. CLOCK_MONOTONIC, in microseconds.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more from now before the start/stop/reload timeout fires (systemd
        >= 236). Send it again before that runs out."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1e6))}")

    def close(self) -> None:
        """Close the socket (a later message opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    # A newline would end the STATUS= assignment and start a bogus one.
    return " ".join(str(text).splitlines())
