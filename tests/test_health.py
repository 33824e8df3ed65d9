"""Health that means something (issue 12, defect 6): `degraded`, with the reason, when every
sample is rejected, when the meter is silent, when predictions stop; `running` again by itself.
A real daemon, a real redis-server, a real SIGSTOP of the inference process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import publish_samples, wait_for

from nilmd import keys
from nilmd.daemon import health, status
from nilmd.daemon.health import Problem
from test_daemon import wait_ready


class Meter(threading.Thread):
    """Good 1 Hz samples, 100 of them a second of real time, on from `ts`."""

    def __init__(self, client, building: str, ts: float):
        super().__init__(daemon=True)
        self.client, self.channel, self.ts = client, keys.input_channel(building), ts
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.1):
            pipe = self.client.pipeline(transaction=False)
            for _ in range(10):
                pipe.publish(self.channel, json.dumps({"timestamp": self.ts, "power_total": 800.0}))
                self.ts += 1
            pipe.execute()


def reasons_when(d, client, condition, what: str, timeout: float = 20.0) -> dict:
    return wait_for(lambda: (lambda s: s if condition(s) else None)(d.status(client)), timeout,
                    lambda: f"{what}; last status: {d.status(client).get('state')!r} "
                    f"{d.status(client).get('degraded_reason')!r}\n{d.log()[-1500:]}")


def nilmd_status(d) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nilmd", "status"], env=d.env, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.slow
def test_rejected_silent_or_not_predicting_is_degraded_with_the_reason_and_recovers(daemon_factory, redis_client):
    d = daemon_factory(extra_env={"NILMD_INPUT_TIMEOUT": "3"}).start()
    b = d.building
    wait_ready(d, redis_client)
    t0 = float(int(time.time()) - 3000)
    last = publish_samples(redis_client, b, 256 + 16, start=t0)
    reasons_when(d, redis_client, lambda s: s["state"] == "running" and s["degraded_reason"] == "", "running")

    # Every sample rejected (stamped a day ahead): degraded, for both reasons, and `nilmd status` says so.
    future = time.time() + 86400
    pipe = redis_client.pipeline(transaction=False)
    for i in range(600):
        pipe.publish(keys.input_channel(b), json.dumps({"timestamp": future + i, "power_total": 800.0}))
    pipe.execute()
    s = reasons_when(d, redis_client, lambda s: s["state"] == "degraded" and "mostly future" in s["degraded_reason"]
                     and "no sample accepted for over 3 s" in s["degraded_reason"], "degraded: rejected and silent")
    assert "no prediction for over 3 s" in s["degraded_reason"]
    out = nilmd_status(d)
    assert out.returncode == status.WARNING and "degraded: " in out.stdout and "mostly future" in out.stdout, out

    # Good samples again, enough to outnumber the rejected ones: running by itself.
    meter = Meter(redis_client, b, last + 1)
    meter.start()
    try:
        reasons_when(d, redis_client, lambda s: s["state"] == "running" and s["degraded_reason"] == "",
                     "running again once good samples outnumber the rejected")
        # Predictions stop while samples arrive (the inference process stopped, its heartbeat not yet stale).
        pid = int(d.status(redis_client)["pid_inference"])
        os.kill(pid, signal.SIGSTOP)
        try:
            s = reasons_when(d, redis_client, lambda s: s["state"] == "degraded", "degraded: no prediction")
            assert s["degraded_reason"] == "no prediction for over 3 s", s["degraded_reason"]
        finally:
            os.kill(pid, signal.SIGCONT)
        reasons_when(d, redis_client, lambda s: s["state"] == "running" and s["degraded_reason"] == "",
                     "running again once predictions resume")
    finally:
        meter.done.set()
        meter.join()
    assert d.stop() == 0
    # The journal tells the story: each change of state one line, with its reasons, and each recovery.
    changes = [line.split("] ", 1)[1] for line in d.log().splitlines() if "] state " in line]
    assert changes[0] == "state warming_up -> running", changes
    into = [c for c in changes if c.startswith("state running -> degraded: ")]
    assert into and any("mostly future" in c or "no sample accepted for over 3 s" in c for c in into), changes
    assert any(c == "state running -> degraded: no prediction for over 3 s" for c in changes), changes
    back = [c for c in changes if c.startswith("state degraded -> running (no longer: ")]
    assert len(back) == 2 and "no prediction for over 3 s" in back[-1], changes
    assert len(changes) < 12, f"one line per change, not one per tick: {changes}"
    assert any(" WARNING " in line and "-> degraded" in line for line in d.log().splitlines())


def test_codes_are_fixed_and_each_change_is_one_line():
    silent = Problem("no_samples", "no sample accepted for over 120 s")
    late = Problem("no_predictions", "no prediction for over 120 s")
    assert health.change_line(("running", ()), ("running", ())) is None
    assert health.change_line(("warming_up", ()), ("running", ())) == "state warming_up -> running"
    assert health.change_line(("running", ()), ("degraded", (silent,))) == \
        "state running -> degraded: no sample accepted for over 120 s"
    assert health.change_line(("degraded", (silent,)), ("degraded", (silent, late))) == \
        "state degraded, its reasons changed: no sample accepted for over 120 s; no prediction for over 120 s"
    assert health.change_line(("degraded", (silent, late)), ("running", ())) == \
        "state degraded -> running (no longer: no sample accepted for over 120 s; no prediction for over 120 s)"
    fields = status._degraded("degraded", [silent, late])
    assert fields == {"degraded_reason": "no sample accepted for over 120 s; no prediction for over 120 s",
                      "degraded_codes": "no_samples,no_predictions"}
    assert status._degraded("running", [silent]) == {"degraded_reason": "", "degraded_codes": ""}


def test_the_reason_is_in_the_systemd_status_line_and_the_verdict():
    snap = {"models_loaded": 11, "inferences": 0, "last_inference_ms": 0.0, "redis_connected": 1}
    line = health.summary_line("degraded", 256, 256, snap, [Problem("no_samples", "no sample accepted for over 120 s")])
    assert line.startswith("degraded (no sample accepted for over 120 s), buffer 256/256")
    assert health.summary_line("running", 256, 256, snap, []).startswith("running, buffer")
    now = 1000.0
    fields = {"state": "degraded", "degraded_reason": "no prediction for over 120 s", "updated_at": "999",
              "status_interval_s": "2"}
    assert status.judge(fields, now) == (status.WARNING, "degraded: no prediction for over 120 s")


def test_resident_memory_is_what_the_kernel_counts():
    """status.rss_mb reads /proc itself (no psutil in the supervisor): the same figure as psutil
    for a live process, 0 for none and for one that is gone."""
    import psutil

    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"])
    try:
        p = psutil.Process(child.pid)
        wait_for(lambda: p.memory_info().rss > 64 << 20, 10, "the child to hold its 64 MB")
        assert abs(status.rss_mb(child.pid) - p.memory_info().rss / 2**20) < 1.0
    finally:
        child.kill()
        child.wait()
    assert status.rss_mb(child.pid) == 0.0 and status.rss_mb(0) == 0.0
