"""One building flooding its pub/sub channel (issue 23, defect 4): real redis-server, a real list
daemon, the flood from a process of its own. Redis's pub/sub output-buffer limit is made small
(CONFIG SET) so that a flood of a few seconds would cut the shared subscription without the fix."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time

import pytest

from conftest import wait_for
from nilmd import keys
from nilmd.daemon.flood import LIMIT_PER_S, FloodGuard
from nilmd.testing import flood, status
from test_multi import list_daemon

COOLOFF_S = 4


def test_a_channel_past_the_limit_is_shed_until_its_cool_off_ends():
    now = [0.0]
    guard = FloodGuard(cooloff=60.0, limit=3, clock=lambda: now[0])
    assert [guard.flooding("a") for _ in range(3)] == [None] * 3
    now[0] = 1.0  # a new second: counted afresh
    assert [guard.flooding("a") for _ in range(3)] == [None] * 3
    assert guard.flooding("b") is None
    now[0] = 1.5
    assert guard.flooding("a") == pytest.approx(4 / 0.5)
    assert guard.shed == {"a": 61.5} and guard.due() == []
    now[0] = 61.5
    assert guard.due() == ["a"] and guard.shed == {}


@pytest.mark.slow
def test_a_flooded_building_is_shed_and_the_others_lose_nothing(redis_server, model_dir, tmp_path, redis_client):
    key = "client-output-buffer-limit"
    default = redis_client.config_get(key)[key]
    d = list_daemon(redis_server, model_dir, tmp_path, 3, extra_env={"NILMD_FLOOD_COOLOFF": str(COOLOFF_S)})
    flooded, quiet = d.ids[0], d.ids[1:]
    redis_client.config_set(key, "pubsub 1mb 256kb 10")  # ~8000 messages of backlog
    try:
        d.start()
        wait_for(lambda: all(status(redis_client, b).get("input_connected") == "1" for b in d.ids), 60,
                 lambda: f"the daemon to subscribe\n{d.log()[-2000:]}")
        out = multiprocessing.Queue()
        flooder = multiprocessing.Process(target=flood, args=(redis_server.port, flooded, 150_000, 2.0, out))
        sent, stop = 0, threading.Event()

        def feed_quiet():  # 10 samples a second each (1 s apart in their stamps), through the flood and after
            nonlocal sent
            ts = float(int(time.time()) - 3600)
            while not stop.is_set():
                ts += 1
                for b in quiet:
                    redis_client.publish(keys.input_channel(b), json.dumps({"timestamp": ts, "power_total": 300.0}))
                sent += 1
                time.sleep(0.1)

        feeder = threading.Thread(target=feed_quiet)
        feeder.start()
        try:
            flooder.start()
            flood_sent = out.get(timeout=60)
            flooder.join(10)
            time.sleep(1.0)
        finally:
            stop.set()
            feeder.join(10)
        assert flood_sent > 3 * LIMIT_PER_S

        def all_arrived():
            got = {b: status(redis_client, b) for b in quiet}
            return got if all(int(s["samples_received"]) == sent for s in got.values()) else None

        got = wait_for(all_arrived, 30,
                       lambda: f"the quiet buildings' {sent} samples each\n{d.log()[-3000:]}", interval=0.3)
        for s in got.values():
            assert int(s["samples_accepted"]) == sent and int(s["input_disconnects"]) == 0, s
        shed = status(redis_client, flooded)
        assert int(shed["input_disconnects"]) == 0 and int(shed["rejected_flood"]) > 0, shed
        assert int(shed["samples_received"]) < flood_sent, shed  # the rest never queued: unsubscribed
        lines = [line for line in d.log().splitlines() if "unsubscribed for" in line]
        assert len(lines) == 1 and f"building {flooded}:" in lines[0], d.log()[-3000:]

        # after the cool-off it is subscribed again and its samples arrive as before
        wait_for(lambda: redis_client.pubsub_numsub(keys.input_channel(flooded))[0][1] == 1, COOLOFF_S + 10,
                 lambda: f"the flooded building to be subscribed again\n{d.log()[-2000:]}", interval=0.2)
        log = d.log()
        assert log.index("unsubscribed for") < log.index(f"building {flooded}: subscribed again")
        received = int(status(redis_client, flooded)["samples_received"])
        redis_client.publish(keys.input_channel(flooded), json.dumps({"timestamp": time.time(), "power_total": 1.0}))
        wait_for(lambda: int(status(redis_client, flooded)["samples_received"]) == received + 1, 10,
                 "a sample of the flooded building after its cool-off")
        assert d.stop() == 0
    finally:
        redis_client.config_set(key, default)
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
