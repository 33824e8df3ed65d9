"""Many buildings in one daemon (issue 13, parts 1-2): real redis-server, real processes.

Every building's data is a burst from nilmd.testing.aligned_start, so its windows close where
docs/CONTRACT.md §4 says (test_faults.schedule); the grid takes old timestamps within
--max-clock-skew, so a burst stands for minutes of a meter. Each building gets a different
number of samples, so a count that went to the wrong building shows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, Daemon, aligned_start, free_port, publish_samples, wait_for
from nilmd import buildings, config, keys
from nilmd.config import Config
from nilmd.daemon.ingest import REJECT_REASONS
from nilmd.errors import EXIT_USAGE, ConfigError
from test_faults import schedule
from test_metrics import scrape, value

WINDOW, STEP = 256, 16


# -- the list ------------------------------------------------------------------------------------
def test_the_list_inline_or_from_a_file_each_id_checked(tmp_path):
    assert buildings.listed(Config(building_id="one")) == ["one"]
    assert buildings.listed(Config(building_ids="a, b,c")) == ["a", "b", "c"]
    listing = tmp_path / "buildings.list"
    listing.write_text("# the campus\nhall_1\n\n  hall-2  # north wing\nlab.3\n")
    assert buildings.listed(Config(building_ids=f"@{listing}")) == ["hall_1", "hall-2", "lab.3"]
    listing.write_text("hall_1\nhall-2\nhall_1\n")
    with pytest.raises(ConfigError, match=rf"{listing}:3: building hall_1 is listed twice \(first at {listing}:1\)"):
        buildings.listed(Config(building_ids=f"@{listing}"))
    with pytest.raises(ConfigError, match=r"item 2: building id 'b c' must be"):
        buildings.listed(Config(building_ids="a,b c"))
    with pytest.raises(ConfigError, match="'daemon' names the list daemon's own files"):
        buildings.listed(Config(building_ids="a,daemon"))
    with pytest.raises(ConfigError, match="cannot read"):
        buildings.listed(Config(building_ids=f"@{tmp_path}/missing"))
    with pytest.raises(ConfigError, match="is listed twice"):
        config.resolve(None, environ={"BUILDING_IDS": "a,a"})


def test_building_id_and_building_ids_together_is_one_line_and_the_usage_code(tmp_path):
    env = {**os.environ, "BUILDING_ID": "one", "BUILDING_IDS": "a,b", "NILMD_RUNTIME_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "nilmd", "run"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == EXIT_USAGE
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "are both set" in lines[0], run.stderr
    assert list(tmp_path.iterdir()) == []


# -- a daemon for a list -------------------------------------------------------------------------
def list_daemon(redis_server, model_dir, tmp_path, n: int, extra_env=None, listing=None) -> Daemon:
    """conftest.Daemon for `n` buildings named after its own id; `listing`: an @FILE instead."""
    d = Daemon(redis_server.port, model_dir, tmp_path, extra_env=extra_env)
    d.ids = [f"{d.building}-{i}" for i in range(n)]
    if listing is not None:
        listing.write_text("".join(b + "\n" for b in d.ids))
    d.env["BUILDING_IDS"] = f"@{listing}" if listing is not None else ",".join(d.ids)
    d.env.pop("BUILDING_ID")
    return d


def daemon_status(client) -> dict:
    raw = client.hgetall(keys.daemon_status_key(os.uname().nodename))
    return {k.decode(): v.decode() for k, v in raw.items()}


def statuses(client, ids) -> dict[str, dict]:
    pipe = client.pipeline(transaction=False)
    for b in ids:
        pipe.hgetall(keys.status_key(b))
    return {b: {k.decode(): v.decode() for k, v in raw.items()} for b, raw in zip(ids, pipe.execute())}


def wait_caught_up(client, last: dict[str, float], d, timeout: float = 30.0) -> None:
    """Until each building's inference has looked past its newest sample `last[b]` and found no
    window due (predicted_through_ts): whatever those samples make is published by then, so a
    check that nothing more came cannot pass by coming too early."""
    def caught_up():
        s = statuses(client, list(last))
        return all(float(s[b].get("predicted_through_ts", 0)) >= last[b] for b in last)
    wait_for(caught_up, timeout, lambda: f"every building's inference to catch up with its input\n{d.log()[-2000:]}")


def wait_ready(d, client, pubsub: bool = True, timeout: float = 90.0) -> None:
    wait_for(lambda: d.proc.poll() is None and (lambda s: d.owns(s) and s.get("state") in ("warming_up", "running"))(
        daemon_status(client)),
             timeout, lambda: f"the list daemon to become ready\n{d.log()[-3000:]}")
    if pubsub:
        wait_for(lambda: all(n == 1 for _, n in client.pubsub_numsub(*(keys.input_channel(b) for b in d.ids))),
                 10, "the reader to subscribe to every input channel")


class Predictions:
    """Every prediction published for any building (PSUBSCRIBE on the test's side)."""

    def __init__(self, client):
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("nilm:*:predictions")
        self.by_building: dict[str, list[float]] = {}

    def drain(self) -> None:
        while (msg := self.pubsub.get_message(timeout=0.05)) is not None:
            building = msg["channel"].decode().split(":")[1]
            self.by_building.setdefault(building, []).append(json.loads(msg["data"])["window_end"])

    def wait(self, expected: dict[str, list[float]], timeout: float, d) -> None:
        def complete():
            self.drain()
            return all(len(self.by_building.get(b, [])) >= len(ends) for b, ends in expected.items())
        wait_for(complete, timeout, lambda: f"every building's predictions\n{d.log()[-3000:]}", interval=0.2)


def feed(client, buildings, t0: float, extra, to: str = "pubsub") -> dict[str, float]:
    """A window and extra(k) intervals for building k, from t0; returns each one's last second."""
    return {b: publish_samples(client, b, WINDOW + STEP * extra(k) + k % 5, start=t0, to=to)
            for k, b in enumerate(buildings)}


def check_exact(client, d, t0, last: dict[str, float], preds: Predictions, received: dict | None = None):
    """Per building: counts exact, every window its data implies predicted once, latest the newest."""
    s = wait_for(lambda: (lambda all_s: all_s if all(
        int(all_s[b].get("samples_received", -1)) == (received or {}).get(b, last[b] - t0 + 1)
        for b in last) else None)(statuses(client, list(last))), 30,
        lambda: f"every building's counts\n{d.log()[-2000:]}")
    expected = {b: schedule(t0, last[b]) for b in last}
    preds.wait(expected, 60, d)
    wait_caught_up(client, last, d)
    preds.drain()  # nothing more than that came
    for b, ends in expected.items():
        st = s[b]
        rejected = sum(int(st[f"rejected_{r}"]) for r in REJECT_REASONS)
        assert int(st["samples_received"]) == int(st["samples_accepted"]) + rejected, (b, st)
        assert preds.by_building.get(b) == ends, b
        assert json.loads(client.get(keys.latest_key(b)))["window_end"] == ends[-1], b
    return s


# -- 200 buildings -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pubsub", "stream"])
def test_200_buildings_through_one_daemon_each_exact(redis_server, redis_client, model_dir, tmp_path, mode):
    d = list_daemon(redis_server, model_dir, tmp_path, 200, extra_env={"NILMD_INPUT_MODE": mode}).start()
    try:
        preds = Predictions(redis_client)
        wait_ready(d, redis_client, pubsub=mode == "pubsub")
        t0 = aligned_start(time.time() - 600, WINDOW, STEP)
        last = feed(redis_client, d.ids, t0, extra=lambda k: k % 4, to=mode)
        s = check_exact(redis_client, d, t0, last, preds)
        assert all(int(st["samples_accepted"]) == last[b] - t0 + 1 for b, st in s.items())
        pids = {st["pid_reader"] for st in s.values()}, {st["pid_inference"] for st in s.values()}
        assert all(len(p) == 1 for p in pids), "one reader and one inference process serve them all"
        summary = wait_for(lambda: (lambda h: h if h.get("buildings_running") == "200" else None)(
            daemon_status(redis_client)), 10, "the daemon hash to count 200 running")
        assert summary["state"] == "running" and summary["summary"].startswith("running, 200 buildings: 200 running")
        assert d.stop() == 0, d.log()[-2000:]
        assert list(tmp_path.glob("nilmd-*")) == []
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)


@pytest.mark.slow
def test_one_buildings_garbage_gap_and_clock_touch_no_other(redis_server, redis_client, model_dir, tmp_path):
    """Lost: only the bad building's own. It gets garbage of every kind, a gap longer than
    --max-gap-fill, a jump of its clock into the future and its samples again (out of order);
    the other nine get clean bursts and stay exact."""
    port = free_port()
    d = list_daemon(redis_server, model_dir, tmp_path, 10, extra_env={"NILMD_METRICS_PORT": str(port)}).start()
    try:
        preds = Predictions(redis_client)
        wait_ready(d, redis_client)
        bad, good = d.ids[0], d.ids[1:]
        t0 = aligned_start(time.time() - 900, WINDOW, STEP)
        channel = keys.input_channel(bad)
        pipe = redis_client.pipeline(transaction=False)
        garbage = ["{power_total: 3", "[1]", json.dumps({"timestamp": t0, "voltage": 230}), "x" * 5000,
                   json.dumps({"timestamp": time.time() + 86400, "power_total": 10})]
        for i in range(300):
            pipe.publish(channel, json.dumps({"timestamp": t0 + i, "power_total": 800.0}))
            if i % 50 == 7:
                for g in garbage:
                    pipe.publish(channel, g)
        pipe.execute()
        last = feed(redis_client, good, t0, extra=lambda k: 1 + k % 3)
        preds.wait({bad: schedule(t0, t0 + 299)}, 30, d)
        for i in range(300):  # after a 200-s gap (a break), and then the same seconds again (out of order)
            pipe.publish(channel, json.dumps({"timestamp": t0 + 500 + i % 150, "power_total": 300.0}))
        pipe.execute()
        check_exact(redis_client, d, t0, last, preds)
        wait_for(lambda: int(statuses(redis_client, [bad])[bad]["samples_received"]) == 600 + 6 * len(garbage), 10,
                 "the bad building's messages to be counted")
        wait_caught_up(redis_client, {bad: t0 + 649}, d)
        s = statuses(redis_client, [bad])[bad]
        assert (int(s["samples_accepted"]), int(s["gaps_broken"])) == (450, 1)
        assert (int(s["rejected_out_of_order"]), int(s["rejected_duplicate"])) == (149, 1)  # t0 + 649 is the newest
        assert all(int(s[f"rejected_{r}"]) == 6 for r in ("not_json", "not_object", "missing_power", "oversized",
                                                           "future"))
        preds.drain()
        assert preds.by_building.get(bad) == schedule(t0, t0 + 299) + schedule(t0 + 500, t0 + 649)
        assert d.proc.poll() is None
        assert "building " + bad + ": rejected a sample" in d.log()
        # /metrics: the daemon's series once (building=""), every building's with its id
        m = scrape(port)
        assert value(m, "nilmd_models_loaded", building="") == 11
        for b in d.ids:
            assert value(m, "nilmd_samples_received_total", building=b) == int(statuses(redis_client, [b])[b][
                "samples_received"]), b
        assert value(m, "nilmd_samples_rejected_total", building=bad, reason="not_json") == 6
        assert value(m, "nilmd_samples_rejected_total", building=good[0], reason="not_json") == 0
        per_building = {k for f in m.values() for k in f if ("building", good[0]) in k[1]}
        print(f"metrics: {len(per_building)} series per building, {sum(len(f) for f in m.values())} in all")
        # `nilmd status` for the list: the daemon's summary and a line per building; one with --building-id
        env = {k: v for k, v in d.env.items() if k != "BUILDING_ID"}
        shown = subprocess.run([sys.executable, "-m", "nilmd", "status"], env=env, cwd=ROOT, capture_output=True,
                               text=True, timeout=60)
        lines = shown.stdout.splitlines()
        assert lines[0].endswith(": warming_up, 10 buildings: 9 running, 1 warming up, 0 degraded, 11/11 models"), \
            shown.stdout  # the bad building's new run is shorter than a window
        assert len(lines) == 2 + 10 and all(any(line.split()[0] == b for line in lines[2:]) for b in d.ids)
        assert shown.returncode == 1  # the worst: warming up is a warning
        one = subprocess.run([sys.executable, "-m", "nilmd", "status", "--building-id", good[0]], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert one.returncode == 0 and f"building {good[0]} on" in one.stdout, one.stdout
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)


def test_a_clock_set_back_in_one_building_is_followed_there_only(tmp_path):
    """The clock rule of tests/test_faults.py on a reader of three buildings (real shared memory):
    the building whose meter clock was set back follows it; the others' grids never notice."""
    from nilmd.daemon import roster
    from nilmd.daemon.batch import Batch
    from nilmd.daemon.control import ControlBlock
    from nilmd.daemon.reader import Reader
    from nilmd.daemon.ringbuffer import RingBuffer
    from nilmd.features import N_FEATURES

    cfg = Config(building_ids="c0,c1,c2", window_size=WINDOW, inference_interval=STEP, ring_capacity=1024,
                 state_dir=str(tmp_path / "state"), runtime_dir=str(tmp_path), mode="subscriber")
    ids = buildings.listed(cfg)
    paths = roster.daemon_paths(str(tmp_path), ids, listed=True)
    shared = [ControlBlock.create(paths["ctl"])]
    for b in ids:
        p = roster.building_paths(str(tmp_path), b)
        shared += [RingBuffer.create(p["ring"], 1024, N_FEATURES), ControlBlock.create(p["ctl"])]
    roster.write(paths["roster"], ids)
    reader = Reader(cfg, paths, source=object())
    T, clock = float(int(time.time()) - 10_000), [float(int(time.time()) - 10_000)]

    def send(stamps: dict) -> None:
        clock[0] += 1.0
        batch = Batch()
        for b, ts in stamps.items():
            batch.put(json.dumps({"timestamp": ts, "power_total": 300.0}), b)
        reader.ingest(batch, now=clock[0])

    for k in range(100):
        send({b: T + k for b in ids})
    for k in range(40):  # c1's meter is set back an hour; c0 and c2 go on
        send({"c0": T + 100 + k, "c1": T + 100 - 3600 + k, "c2": T + 100 + k})
    c0, c1, c2 = (reader.feeds[b] for b in ids)
    assert (c1.ctl["clock_jumps"], c1.ctl["rejected_out_of_order"], c1.ring.run_length()) == (1, 29, 11)
    for other in (c0, c2):
        assert (other.ctl["clock_jumps"], other.ctl["rejected_out_of_order"], other.ring.run_length()) == (0, 0, 140)
        assert other.ctl["samples_received"] == other.ctl["samples_accepted"] == 140
    assert reader.ctl["samples_received"] == 0, "no building's counter lands in the daemon block"
    for feed in reader.feeds.values():
        feed.ring.close()
        feed.ctl.close()
    reader.ctl.close()
    for m in shared:
        m.close()


# -- reload --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_reload_adds_and_removes_buildings_and_the_rest_keep_their_schedule(redis_server, redis_client, model_dir,
                                                                            tmp_path):
    listing = tmp_path / "buildings.list"
    d = list_daemon(redis_server, model_dir, tmp_path, 4, listing=listing).start()
    try:
        preds = Predictions(redis_client)
        wait_ready(d, redis_client)
        kept, gone = d.ids[:3], d.ids[3]
        t0 = aligned_start(time.time() - 900, WINDOW, STEP)
        last = {b: publish_samples(redis_client, b, WINDOW + 8, start=t0) for b in d.ids}
        preds.wait({b: schedule(t0, last[b]) for b in d.ids}, 30, d)
        new = [f"{d.building}-new{i}" for i in range(2)]
        listing.write_text("# kept\n" + "".join(b + "\n" for b in kept + new))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: all(n == 1 for _, n in redis_client.pubsub_numsub(*(keys.input_channel(b) for b in new)))
                 and redis_client.pubsub_numsub(keys.input_channel(gone))[0][1] == 0, 20,
                 lambda: f"the reader to follow the new list\n{d.log()[-2000:]}")
        wait_for(lambda: not list(tmp_path.glob(f"nilmd-{gone}.*")), 10, "the removed building's files to go")
        assert statuses(redis_client, [gone])[gone]["state"] == "stopped"
        # 8 more samples close each kept building's next window: on its schedule, not a window later
        for b in kept:
            last[b] = publish_samples(redis_client, b, 8, start=last[b] + 1)
        t1 = aligned_start(time.time() - 300, WINDOW, STEP)
        for b in new:
            last[b] = publish_samples(redis_client, b, WINDOW, start=t1)
        expected = {**{b: schedule(t0, last[b]) for b in kept}, **{b: schedule(t1, last[b]) for b in new}}
        preds.wait(expected, 30, d)
        wait_caught_up(redis_client, {b: last[b] for b in expected}, d)
        preds.drain()
        for b, ends in expected.items():
            assert preds.by_building[b] == ends, b
        s = statuses(redis_client, kept)
        assert all(int(s[b]["samples_accepted"]) == WINDOW + 16 for b in kept), "the kept rings were not touched"
        assert os.path.exists(tmp_path / "state" / f"nilmd-{gone}.snapshot"), "the removed building's last snapshot"
        summary = wait_for(lambda: (lambda h: h if h.get("buildings") == "5" else None)(daemon_status(redis_client)),
                           10, "the daemon hash to count 5 buildings")
        assert "SIGHUP: buildings: 2 added, 1 removed, 5 served" in d.log()
        # A second daemon for a building the list serves is refused, naming it
        other = Daemon(redis_server.port, model_dir, tmp_path)
        other.building, other.env["BUILDING_ID"] = kept[0], kept[0]
        other.start()
        assert other.proc.wait(60) == 4 and "another nilmd" in other.log()
        assert summary["state"] in ("warming_up", "running", "degraded")
        assert d.stop() == 0
        assert list(tmp_path.glob("nilmd-*")) == []
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pubsub", "stream"])
def test_a_list_on_a_redis_cluster_each_building_exact(mode, redis_cluster, model_dir, tmp_path):
    """Twelve buildings, whose keys fall on every master: the stream reader's one-script read
    becomes one script per stream (a cluster refuses a script over several slots), in one pipeline."""
    client = redis_cluster.client()
    d = Daemon(redis_cluster.port, model_dir, tmp_path, extra_env={"REDIS_CLUSTER": "1", "NILMD_INPUT_MODE": mode})
    d.ids = [f"{d.building}-{i}" for i in range(12)]
    d.env["BUILDING_IDS"] = ",".join(d.ids)
    d.env.pop("BUILDING_ID")
    d.start()
    try:
        wait_for(lambda: d.proc.poll() is None and all(
            statuses(client, d.ids)[b].get("input_connected") == "1" for b in d.ids), 60,
            lambda: f"the list daemon to connect on the cluster\n{d.log()[-3000:]}")
        preds = Predictions(client)
        t0 = aligned_start(time.time() - 600, WINDOW, STEP)
        last = feed(client, d.ids, t0, extra=lambda k: k % 3, to=mode)
        check_exact(client, d, t0, last, preds)
        assert d.stop() == 0, d.log()[-3000:]
        assert "CROSSSLOT" not in d.log()
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        client.close()
