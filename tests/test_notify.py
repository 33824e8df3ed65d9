"""The sd_notify protocol: Notifier on its own, then the real daemon talking to a real socket.

Unit tests bind real AF_UNIX datagram sockets (path and abstract). The daemon test (slow) binds
one as $NOTIFY_SOCKET with $WATCHDOG_USEC set and runs `python -m nilmd run` against a private
redis-server, the way systemd would run it.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from nilmd.notify import Notifier


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    return sock


def _recv(sock) -> str:
    return sock.recv(4096).decode()


def test_path_socket_and_message_content(tmp_path):
    path = str(tmp_path / "notify")
    sock = _bind(path)
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("models loaded") and _recv(sock) == "READY=1\nSTATUS=models loaded"
    assert n.ready() and _recv(sock) == "READY=1"
    assert n.status("line one\nline two") and _recv(sock) == "STATUS=line one line two"
    assert n.watchdog() and _recv(sock) == "WATCHDOG=1"
    assert n.stopping() and _recv(sock) == "STOPPING=1"
    assert n.extend_timeout(42.5) and _recv(sock) == "EXTEND_TIMEOUT_USEC=42500000"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    lines = _recv(sock).split("\n")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert lines[0] == "RELOADING=1"
    key, _, usec = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    n.close()
    sock.close()


def test_abstract_socket():
    name = f"nilmd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    sock = _bind("\0" + name)
    n = Notifier({"NOTIFY_SOCKET": "@" + name})
    assert n.watchdog() and _recv(sock) == "WATCHDOG=1"
    sock.close()


def test_silent_without_systemd(tmp_path):
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}, {"NOTIFY_SOCKET": "@"}):
        n = Notifier(env)
        assert not n.enabled
        assert not n.ready("x") and not n.watchdog() and not n.reloading() and not n.stopping()
        assert n.watchdog_interval is None
    # systemd went away (socket path gone): no exception, just False
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.enabled and not n.ready()


def test_watchdog_interval_is_half_the_timeout_and_only_for_its_pid():
    assert Notifier({"WATCHDOG_USEC": "10000000"}).watchdog_interval == 5.0
    assert Notifier({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 5.0
    assert Notifier({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "junk"}).watchdog_interval is None


def test_unset_environment_keeps_children_off_the_socket(monkeypatch, tmp_path):
    path = str(tmp_path / "notify")
    sock = _bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    n = Notifier(unset_environment=True)
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert n.watchdog_interval == 2.0 and n.status("still works") and _recv(sock) == "STATUS=still works"
    sock.close()
