"""A new list is applied whole or refused in one line (issue 23, defect 3): a SIGHUP to a list past
the open-files limit changes nothing, the buildings served go on on their schedule, and a list
within the limit is then applied. A real daemon under a real RLIMIT_NOFILE, real signals."""

from __future__ import annotations

import signal
import sys
import time

import pytest

from conftest import aligned_start, publish_samples, wait_for
from test_faults import schedule
from test_multi import Predictions, daemon_status, list_daemon, wait_ready

WINDOW, STEP = 256, 16


@pytest.mark.slow
def test_a_list_past_the_open_files_limit_is_refused_whole_and_the_old_one_serves_on(
        redis_server, redis_client, model_dir, tmp_path):
    limited = tmp_path / "python"  # the daemon under a hard limit of 256 open files (3 per building)
    limited.write_text(f"#!/bin/sh\nulimit -n 256\nexec {sys.executable} \"$@\"\n")
    limited.chmod(0o755)
    listing = tmp_path / "buildings.list"
    d = list_daemon(redis_server, model_dir, tmp_path, 3, listing=listing)
    d.python = str(limited)
    d.start()
    try:
        preds = Predictions(redis_client)
        wait_ready(d, redis_client)
        t0 = aligned_start(time.time() - 900, WINDOW, STEP)
        last = {b: publish_samples(redis_client, b, WINDOW + 8, start=t0) for b in d.ids}
        preds.wait({b: schedule(t0, last[b]) for b in d.ids}, 30, d)

        many = [f"{d.building}-more{i}" for i in range(100)]
        listing.write_text("".join(b + "\n" for b in d.ids[1:] + many))  # one removed, 100 added
        d.proc.send_signal(signal.SIGHUP)
        line = wait_for(lambda: next((x for x in d.log().splitlines() if "SIGHUP: the new list" in x), None), 20,
                        lambda: f"the refusal\n{d.log()[-2000:]}")
        assert "102 buildings is refused, the 3 served go on unchanged" in line and "open files" in line, line
        assert "is not served" not in d.log() and "Too many open files" not in d.log()
        rings = sorted(p.name for p in tmp_path.glob("nilmd-*.ring"))
        assert rings == sorted(f"nilmd-{b}.ring" for b in d.ids), "nothing of the new list was opened or removed"
        for b in d.ids:  # the three go on, on their schedule
            last[b] = publish_samples(redis_client, b, 8, start=last[b] + 1)
        expected = {b: schedule(t0, last[b]) for b in d.ids}
        preds.wait(expected, 30, d)
        time.sleep(0.3)
        preds.drain()
        assert {b: preds.by_building[b] for b in d.ids} == expected
        assert daemon_status(redis_client)["buildings"] == "3"

        listing.write_text("".join(b + "\n" for b in d.ids + many[:2]))  # within the limit: applied
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: buildings: 2 added, 0 removed, 5 served" in d.log(), 20,
                 lambda: f"the second list to be applied\n{d.log()[-2000:]}")
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
