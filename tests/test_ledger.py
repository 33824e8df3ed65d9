"""Energy, runs and events (docs/CONTRACT.md §3.6, §3.7) through the ledger's own script on a real
redis-server: days in a time zone, hysteresis, one count per interval whatever is sent twice,
and an open run that outlives the process that opened it. The daemon end to end, with the
shipped models on a simulated house, is tests/test_energy.py."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone

import pytest

from nilmd import keys
from nilmd.config import Config
from nilmd.daemon.ledger import Ledger

UTC = timezone.utc


def cfg(**kw) -> Config:
    base = dict(building_id=f"l{uuid.uuid4().hex[:8]}", inference_interval=60, timezone="Europe/Berlin",
                event_on_intervals=2, event_on_probability=0.9, event_off_intervals=3)
    return Config(**{**base, **kw})


def prediction(window_end: float, on: dict[str, tuple[bool, float, float]]) -> dict:
    """on: appliance -> (is_on, probability, power W)."""
    return {"timestamp": window_end + 1, "window_start": window_end - 256, "window_end": float(window_end),
            "total_power": 5000.0, "inference_time_ms": 1.0,
            "predictions": [{"appliance": a, "power_watts": w, "probability": p, "is_on": o,
                             "confidence": abs(2 * p - 1)} for a, (o, p, w) in on.items()]}


def count(ledger: Ledger, client, p: dict, fails: bool = False):
    """What RedisPublisher does for the ledger: load if need be, queue, execute, settle. Returns
    the reply of the oldest part sent: the interval's energy when nothing was pending."""
    if ledger.state is None:
        ledger.load(client)
    pipe = client.pipeline(transaction=False)
    ledger.queue(pipe, p, json.dumps(p))
    replies = pipe.execute(raise_on_error=False)
    error, dropped = ledger.settle(replies)
    assert (error is not None) == fails and not dropped, (error, dropped)
    return replies[0] if replies else None


def energy(client, c: Config) -> dict:
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.energy_key(c.building_id)).items()}


def events(client, c: Config) -> list[dict]:
    return [json.loads(f[b"json"]) for _, f in client.xrange(keys.events_stream(c.building_id))]


def ts(*args) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def test_energy_counts_each_interval_once_on_its_local_day_and_month(redis_client):
    """Berlin is UTC+1 in winter: its new year starts at 23:00 UTC. 600 W for 60 s is 10 Wh."""
    c = cfg()
    ledger = Ledger(c)
    for minute in range(57, 64):  # window ends 22:57 .. 23:03 UTC
        end = ts(2023, 12, 31, 22, 0) + 60 * minute
        assert count(ledger, redis_client, prediction(end, {"Dryer": (True, 0.99, 600.0),
                                                            "Television": (False, 0.1, 0.0)})) == 1
    e = energy(redis_client, c)
    # the interval ending at 23:00:00 UTC (its middle 23:59:30 local) is the old year's
    assert e["day"] == "2024-01-01" and e["month"] == "2024-01" and e["timezone"] == "Europe/Berlin"
    assert float(e["Dryer:today_wh"]) == pytest.approx(30.0) and float(e["Dryer:month_wh"]) == pytest.approx(30.0)
    assert float(e["Dryer:total_wh"]) == pytest.approx(70.0)
    assert float(e["Television:total_wh"]) == 0.0 and "Television:today_wh" in e
    assert float(e["updated"]) == ts(2024, 1, 1, 0, 3) - 3600

    # The last one again (a restarted inference predicting it again), and an older one: Redis's
    # marks refuse every part, nothing changes.
    last = prediction(ts(2023, 12, 31, 23, 3), {"Dryer": (True, 0.99, 600.0)})
    runs_before = redis_client.hgetall(keys.runs_key(c.building_id))
    assert count(Ledger(c), redis_client, last) == 0
    assert count(Ledger(c), redis_client, prediction(ts(2023, 12, 31, 22, 30), {"Dryer": (True, 0.99, 600.0)})) == 0
    assert energy(redis_client, c) == e
    assert redis_client.hgetall(keys.runs_key(c.building_id)) == runs_before
    history = redis_client.xrange(keys.predictions_stream(c.building_id))
    assert len(history) == 7 and {f[b"interval_s"] for _, f in history} == {b"60"}
    assert [json.loads(f[b"json"])["window_end"] for _, f in history] == sorted(
        json.loads(f[b"json"])["window_end"] for _, f in history)


def test_a_part_redis_refused_is_sent_again_with_the_next_prediction(redis_client):
    """The energy hash refuses an interval (here: the key holds a string, WRONGTYPE); the other
    keys take theirs. Once the key is usable the held part is counted, before the next interval's."""
    c = cfg()
    ledger, t0 = Ledger(c), ts(2024, 3, 1, 8, 0)
    redis_client.set(keys.energy_key(c.building_id), "not a hash")
    count(ledger, redis_client, prediction(t0, {"Dryer": (True, 0.99, 600.0)}), fails=True)
    assert [p.kind for p in ledger.pending] == ["energy"]
    assert redis_client.xlen(keys.predictions_stream(c.building_id)) == 1  # the history took it
    redis_client.delete(keys.energy_key(c.building_id))
    assert count(ledger, redis_client, prediction(t0 + 60, {"Dryer": (True, 0.99, 600.0)})) == 1
    assert ledger.pending == []
    e = energy(redis_client, c)
    assert float(e["Dryer:total_wh"]) == pytest.approx(20.0) and float(e["updated"]) == t0 + 60
    ids = [i for i, _ in redis_client.xrange(keys.predictions_stream(c.building_id))]
    assert ids == [f"{int(t0 * 1000)}-0".encode(), f"{int((t0 + 60) * 1000)}-0".encode()]


def test_hysteresis_makes_one_run_one_pair_of_events(redis_client):
    c = cfg()
    ledger = Ledger(c)
    t0 = ts(2024, 3, 1, 8, 0)
    #        blip  . run with one off interval inside ...  .  .  .  sure single interval .  .  .
    onoff = [1, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    probs = [.6, .1, .7, .8, .2, .8, .7, .1, .1, .1, .1, .95, .1, .1]
    for k, (o, p) in enumerate(zip(onoff + [0, 0], probs + [.1, .1])):
        on = bool(o) or p >= 0.9
        count(ledger, redis_client, prediction(t0 + 60 * k, {"Dishwasher": (on, p, 1200.0 if on else 30.0)}))
    got = events(redis_client, c)
    assert [e["event"] for e in got] == ["start", "end", "start", "end"], got
    first, sure = got[1], got[3]
    assert first["start"] == t0 + 60 and first["end"] == t0 + 60 * 6  # intervals 2..6, the pause inside
    assert first["duration_s"] == 300.0 and got[0]["end"] is None and got[0]["start"] == first["start"]
    assert first["energy_wh"] == pytest.approx(4 * 20.0 + 0.5)  # 1200 W on four, 30 W on the pause
    assert first["peak_w"] == 1200.0 and first["mean_probability"] == pytest.approx((.7 + .8 + .2 + .8 + .7) / 5)
    assert sure["start"] == t0 + 60 * 10 and sure["end"] == t0 + 60 * 11 and sure["energy_wh"] == 20.0
    published = redis_client.xlen(keys.events_stream(c.building_id))
    assert published == 4


def test_an_open_run_outlives_its_process_and_a_long_gap_ends_it(redis_client):
    c = cfg()
    t0 = ts(2024, 3, 1, 18, 0)
    first = Ledger(c)  # the inference process that opened the run ...
    for k in range(3):
        count(first, redis_client, prediction(t0 + 60 * k, {"ElectricOven": (True, 0.8, 2400.0)}))
    assert [e["event"] for e in events(redis_client, c)] == ["start"]
    second = Ledger(c)  # ... and its successor, after a restart, reads the run back from Redis
    for k in range(3, 5):
        count(second, redis_client, prediction(t0 + 60 * k, {"ElectricOven": (True, 0.8, 2400.0)}))
    # the daemon is down for an hour: the missing predictions are off intervals, the run is over
    count(second, redis_client, prediction(t0 + 3600, {"ElectricOven": (False, 0.1, 0.0)}))
    got = events(redis_client, c)
    assert [e["event"] for e in got] == ["start", "end"], got
    assert got[1]["start"] == t0 - 60 and got[1]["end"] == t0 + 240 and got[1]["energy_wh"] == pytest.approx(200.0)


def test_no_history_stream_when_it_is_off(redis_client):
    c = cfg(predictions_history=0)
    count(Ledger(c), redis_client, prediction(ts(2024, 3, 1), {"Freezer": (True, 0.9, 100.0)}))
    assert not redis_client.exists(keys.predictions_stream(c.building_id))
    assert float(energy(redis_client, c)["Freezer:total_wh"]) == pytest.approx(100 / 60)


def test_days_are_calendar_days_of_the_zone():
    """A day with a daylight-saving change has 23 or 25 hours; an interval counts on its middle's day."""
    from nilmd import days

    berlin = days.zone("Europe/Berlin")
    start, end = days.bounds("2024-03-31", berlin)
    assert end - start == 23 * 3600 and start == ts(2024, 3, 30, 23, 0)
    start, end = days.bounds("2024-10-27", berlin)
    assert end - start == 25 * 3600
    assert days.interval_day(ts(2024, 3, 30, 23, 0, 30), 60, berlin) == ("2024-03-31", "2024-03")
    assert days.interval_day(ts(2024, 3, 30, 23, 0, 29), 60, berlin) == ("2024-03-30", "2024-03")


def test_a_held_prediction_whose_parts_were_counted_is_published_once_counted_once(redis_server, redis_client,
                                                                                   tmp_path):
    """The inference's publisher, as in its process: PUBLISH refused (the ACL lacks it) while the
    ledger's parts are taken; the prediction is held, sent again once PUBLISH is allowed, and
    delivered and counted once."""
    import logging

    from nilmd.daemon.control import ControlBlock
    from nilmd.daemon.inference import RedisPublisher
    from nilmd.log import Throttle
    from test_acl import acl_user

    user, password = acl_user(redis_client, "pubsub", without=("publish",))
    c = cfg(redis_host="127.0.0.1", redis_port=redis_server.port, redis_username=user, redis_password=password)
    ctl = ControlBlock.create(str(tmp_path / "ctl"))
    log = logging.getLogger("test")
    publisher = RedisPublisher(c, log, Throttle(log), ctl)
    sub = redis_client.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(keys.predictions_channel(c.building_id))
    p = prediction(ts(2024, 3, 1, 8, 0), {"Television": (False, 0.1, 0.0)})  # no run, no event
    try:
        assert publisher.publish(p) is False  # held
        assert float(energy(redis_client, c)["updated"]) == p["window_end"]  # its parts were taken
        redis_client.execute_command("ACL", "SETUSER", user, "+publish")
        assert publisher.publish(p) is True
        got, until = [], time.monotonic() + 1.0  # long enough for a second copy to arrive
        while time.monotonic() < until:
            m = sub.get_message(timeout=0.1)
            got += [m] if m else []
        assert [json.loads(m["data"])["window_end"] for m in got] == [p["window_end"]]
        assert redis_client.xlen(keys.predictions_stream(c.building_id)) == 1 and publisher.ledger.pending == []
    finally:
        redis_client.acl_deluser(user)
        publisher.client.close()
        ctl.unlink()
        ctl.close()
