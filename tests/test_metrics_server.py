"""/metrics holds at most MAX_CONNECTIONS clients and drops a half-sent request after a timeout
(issue 23, defect 8: 2,000 half-sent requests gave the supervisor 422 threads, never returned).
Real sockets against the real server; needs prometheus-client (the metrics extra)."""

from __future__ import annotations

import socket
import threading
import urllib.request

import pytest

from conftest import free_port, wait_for

prometheus_client = pytest.importorskip("prometheus_client")
from nilmd.daemon import metrics_server  # noqa: E402 (only with the extra)


def test_half_sent_requests_cannot_pile_up_threads(monkeypatch):
    monkeypatch.setattr(metrics_server._Handler, "timeout", 0.5)
    port = free_port()
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Gauge("nilmd_test_up", "a value to scrape", registry=registry).set(1)
    server = metrics_server.start(port, "127.0.0.1", registry)
    base = threading.active_count()
    held = []
    try:
        for _ in range(3 * metrics_server.MAX_CONNECTIONS):  # each sends half a request line and waits
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /metr")
            held.append(s)
        most = wait_for(lambda: threading.active_count() - base, 5, "the server to take some")
        assert most <= metrics_server.MAX_CONNECTIONS, most
        # the half-sent ones time out and free their threads: a scrape is served again
        wait_for(lambda: threading.active_count() - base == 0, 10, "the half-sent requests to time out")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "nilmd_test_up 1.0" in body
    finally:
        for s in held:
            s.close()
        server.shutdown()
        server.server_close()
