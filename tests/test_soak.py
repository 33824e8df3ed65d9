"""The soak in CI: three hours of 1 Hz data through the real daemon in well under a minute, with
memory, open files and Redis connections flat and every implied prediction made, exactly once.
The week-long run is `python scripts/soak.py --days 7` (docs/PERFORMANCE.md)."""

from __future__ import annotations

import pytest

from conftest import wait_for
from nilmd import soak

pytestmark = pytest.mark.slow


def test_three_hours_of_data_leave_memory_files_and_connections_flat(daemon_factory, redis_client):
    d = daemon_factory(extra_env={"NILMD_INPUT_MODE": "stream", "NILMD_RING_CAPACITY": "8192"}).start()
    wait_for(lambda: d.status(redis_client).get("input_connected") == "1", 30, lambda: f"the daemon to start\n{d.log()}")
    report = soak.drive(redis_client, d.building, hours=3, window=256, interval=16, log=lambda line: None)
    assert report["ok"], "; ".join(report["problems"])
    # docs/CONTRACT.md §4 from wherever the clock put the start: the first window closes an interval
    w = (-(int(report["start"]) + 256)) % 16
    assert report["predictions"] == 1 + (3 * 3600 - 256 - w) // 16 == report["published"]
    assert d.stop() == 0
