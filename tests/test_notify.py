"""The sd_notify protocol: Notifier on its own, then the real daemon talking to a real socket.

Unit tests bind real AF_UNIX datagram sockets (path and abstract). The daemon test (slow) binds
one as $NOTIFY_SOCKET with $WATCHDOG_USEC set and runs `python -m nilmd run` against a private
redis-server, the way systemd would run it.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
import uuid

import pytest
from conftest import publish_samples, wait_for

from nilmd import keys
from nilmd.appliances import APPLIANCES
from nilmd.daemon.notify import Notifier


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


# -- the real daemon ------------------------------------------------------------------------------

FRESH_S = 5.0  # nilmd.daemon.supervisor.FRESH_S: a heartbeat older than this stops the pings


class NotifyListener:
    """What systemd sees: a datagram socket at $NOTIFY_SOCKET, each message stamped with the time
    it arrived and the sender's pid (SCM_CREDENTIALS, as systemd checks NotifyAccess=main)."""

    def __init__(self, on_message=None):
        self.name = f"nilmd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.2)
        self.on_message = on_message
        self.messages: list[tuple[float, int, list[str], dict]] = []  # (monotonic, pid, lines, extra)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return "@" + self.name

    def _run(self):
        cred_size = struct.calcsize("3i")
        while not self._stop.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(cred_size))
            except socket.timeout:
                continue
            now = time.monotonic()
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:cred_size])[0]
            lines = data.decode().split("\n")
            extra = self.on_message(lines) if self.on_message else {}
            with self.lock:
                self.messages.append((now, pid, lines, extra or {}))

    def snapshot(self):
        with self.lock:
            return list(self.messages)

    def index(self, line: str, after: int = -1) -> int | None:
        for i, (_, _, lines, _) in enumerate(self.snapshot()):
            if i > after and line in lines:
                return i
        return None

    def pings(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        return [t for t, _, lines, _ in self.snapshot() if "WATCHDOG=1" in lines and since <= t < until]

    def statuses(self) -> list[str]:
        return [ln[len("STATUS="):] for _, _, lines, _ in self.snapshot() for ln in lines if ln.startswith("STATUS=")]

    def close(self):
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.mark.slow
def test_daemon_speaks_sd_notify(daemon_factory, redis_client):
    """READY only once the reader is subscribed; STATUS lines as things change; WATCHDOG=1 at half
    of $WATCHDOG_USEC while every child is fresh and not while one is stopped; RELOADING=1 then
    READY=1 around SIGHUP; STOPPING=1 at SIGTERM; every message from the supervisor's pid."""
    holder = {}

    def on_message(lines):
        # Checked the moment READY arrives: the reader must already hold its subscription.
        if "READY=1" in lines and "channel" in holder:
            return {"numsub": redis_client.pubsub_numsub(holder["channel"])[0][1]}
        return {}

    listener = NotifyListener(on_message)
    try:
        d = daemon_factory(extra_env={
            "NOTIFY_SOCKET": listener.address,
            "WATCHDOG_USEC": "4000000",  # pings every 2 s
            "NILMD_HEARTBEAT_TIMEOUT": "120",  # the supervisor must not kill the child we SIGSTOP
        })
        holder["channel"] = keys.input_channel(d.building)
        d.start()
        wait_for(lambda: listener.index("READY=1") is not None or d.proc.poll() is not None, 90,
                 "READY=1 from the daemon")
        assert d.proc.poll() is None, d.log()[-3000:]
        ready = listener.index("READY=1")
        msgs = listener.snapshot()
        assert msgs[ready][3]["numsub"] > 0, "READY=1 arrived before the reader subscribed to the input channel"
        before = [ln for _, _, lines, _ in msgs[:ready] for ln in lines]
        assert "WATCHDOG=1" not in before, "watchdog pings before READY=1"
        assert any(ln.startswith("STATUS=starting") for ln in before), before
        assert any(ln.startswith("EXTEND_TIMEOUT_USEC=") for ln in before), "no EXTEND_TIMEOUT_USEC while loading"
        assert any(ln.startswith("STATUS=") for ln in msgs[ready][2]), "READY=1 should carry the status line"

        # pings at half of WATCHDOG_USEC (the loop ticks every 0.5 s: 2.0 to 2.5 s apart): never
        # faster than that, and always well within WATCHDOG_USEC, or systemd would kill the service
        t_ready = msgs[ready][0]
        wait_for(lambda: len(listener.pings(t_ready)) >= 4, 20, "four WATCHDOG=1 pings after READY=1")
        pings = listener.pings(t_ready)
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert all(1.9 <= g < 4.0 for g in gaps), f"ping gaps {gaps} for WATCHDOG_USEC=4 s"

        # STATUS follows the buffer as samples arrive
        n_status = len(listener.statuses())
        publish_samples(redis_client, d.building, 300)
        wait_for(lambda: any("running" in s and "last inference" in s for s in listener.statuses()[n_status:]), 30,
                 "a STATUS line saying running with an inference latency")
        assert all("\n" not in s for s in listener.statuses())

        # a stopped child: its heartbeat goes stale and the pings stop; they resume after SIGCONT
        pid = int(d.status(redis_client)["pid_inference"])
        os.kill(pid, signal.SIGSTOP)
        t_stop, wall_stop = time.monotonic(), time.time()
        try:
            # The heartbeat turns stale after FRESH_S; one tick, one interval later no ping may come for
            # at least a ping interval and a half (3 s). Silence alone would also be a stalled supervisor:
            # its status hash, rewritten as it goes on ticking, shows it judged through the whole quiet span.
            quiet_from, quiet_s = t_stop + FRESH_S + 1.6, 3.0
            wait_for(lambda: float(d.status(redis_client).get("updated_at", 0)) >= wall_stop + FRESH_S + 1.6 + quiet_s,
                     30, f"the supervisor to go on ticking with its child stopped\n{d.log()[-2000:]}")
            assert listener.pings(quiet_from) == [], (
                f"WATCHDOG=1 kept coming {[round(t - t_stop, 1) for t in listener.pings(t_stop)]} s "
                "after the inference process was SIGSTOPped")
        finally:
            os.kill(pid, signal.SIGCONT)
        t_cont = time.monotonic()
        wait_for(lambda: listener.pings(t_cont), 5, "WATCHDOG=1 again after SIGCONT")

        # reload: RELOADING=1 (with MONOTONIC_USEC), then READY=1
        mark = len(listener.snapshot()) - 1
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: listener.index("RELOADING=1", mark) is not None, 10, "RELOADING=1 after SIGHUP")
        reloading = listener.index("RELOADING=1", mark)
        assert any(ln.startswith("MONOTONIC_USEC=") for ln in listener.snapshot()[reloading][2])
        wait_for(lambda: listener.index("READY=1", reloading) is not None, 60, "READY=1 after the reload")
        assert "reloaded" in d.log()

        # stop
        mark = len(listener.snapshot()) - 1
        assert d.stop(signal.SIGTERM) == 0, d.log()[-3000:]
        assert listener.index("STOPPING=1", mark) is not None, "no STOPPING=1 at SIGTERM"
        assert d.shm_files() == [], "shared memory left behind"
        senders = {pid for _, pid, _, _ in listener.snapshot()}
        assert senders == {d.proc.pid}, f"notify messages from {senders}, expected only the supervisor {d.proc.pid}"
    finally:
        listener.close()


@pytest.mark.slow
def test_ready_waits_for_redis(daemon_factory, model_dir, tmp_path):
    """With Redis down at start the models load but READY=1 must not come; it comes once a
    redis-server appears on the port and the reader has subscribed."""
    from conftest import RedisServer, free_port

    port = free_port()
    holder = {}

    def on_message(lines):
        if "READY=1" in lines and "server" in holder:
            with holder["server"].client() as c:
                return {"numsub": c.pubsub_numsub(holder["channel"])[0][1]}
        return {}

    listener = NotifyListener(on_message)
    server = None
    try:
        d = daemon_factory(extra_env={"NOTIFY_SOCKET": listener.address, "REDIS_PORT": str(port)})
        holder["channel"] = keys.input_channel(d.building)
        d.start()
        wait_for(lambda: "models loaded" in d.log() or d.proc.poll() is not None, 60, "the models to load")
        # The supervisor's STATUS= once it has judged the daemon with the models loaded and no Redis: a
        # READY=1 it should not send would have gone in that same tick, instead of this line.
        loaded = f"{len(APPLIANCES)}/{len(APPLIANCES)} models"
        wait_for(lambda: any(s.startswith("starting") and loaded in s for s in listener.statuses())
                 or d.proc.poll() is not None, 30, f"a STATUS= with the models loaded\n{listener.statuses()}")
        assert d.proc.poll() is None, d.log()[-3000:]
        assert listener.index("READY=1") is None, "READY=1 while Redis is unreachable"
        assert any(s.startswith("starting") for s in listener.statuses())
        server = holder["server"] = RedisServer(port, tmp_path)  # known to on_message before it can answer
        server.start()
        wait_for(lambda: listener.index("READY=1") is not None, 60, "READY=1 once Redis is up")
        msgs = listener.snapshot()
        assert msgs[listener.index("READY=1")][3]["numsub"] > 0, "READY=1 before the reader subscribed"
        assert d.stop() == 0, d.log()[-3000:]
    finally:
        listener.close()
        if server is not None:
            server.stop()
