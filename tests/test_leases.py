"""Several daemons sharing one building list (issue 13, part 4): static shards, and leases that
move a SIGKILLed instance's buildings to the other one with nothing lost in stream mode. Real
redis-server, real daemon processes; the sharing rules alone are in tests/test_sharing.py."""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from conftest import Daemon, aligned_start, publish_samples, wait_for
from nilmd import keys
from nilmd.config import Config, ConfigError, resolve
from nilmd.buildings import in_shard
from nilmd.daemon.sharing import owner
from test_faults import schedule
from test_multi import Predictions, wait_caught_up

WINDOW, STEP = 256, 16


def test_sharing_needs_a_list_and_a_shard_reads_k_of_n():
    with pytest.raises(ConfigError, match="--shard: instances share a list"):
        resolve(None, environ={"NILMD_SHARD": "1/2"})
    with pytest.raises(ConfigError, match="--leases: instances share a list"):
        resolve(None, environ={"NILMD_LEASES": "true"})
    with pytest.raises(ConfigError, match=r"--shard: '3/2' is not K/N"):
        resolve(None, environ={"NILMD_SHARD": "3/2", "BUILDING_IDS": "a,b"})
    assert resolve(None, environ={"NILMD_SHARD": "2/2", "BUILDING_IDS": "a,b"}).shard == "2/2"
    assert isinstance(Config().lease_period, float)


def instance(redis_server, model_dir, tmp_path, name: str, listing, **env) -> Daemon:
    run = tmp_path / name
    run.mkdir()
    d = Daemon(redis_server.port, model_dir, run, extra_env={"BUILDING_IDS": f"@{listing}", "NILMD_INSTANCE": name,
                                                            **env})
    d.env.pop("BUILDING_ID")
    return d.start()


class Both:
    """Two instances' logs for a failure message (Predictions.wait reads `.log()`)."""

    def __init__(self, *daemons):
        self.daemons = daemons

    def log(self) -> str:
        return "\n".join(f"--- instance {k}:\n{d.log()[-2500:]}" for k, d in enumerate(self.daemons))


def daemon_hash(client, name: str) -> dict:
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.daemon_status_key(name)).items()}


def holders(client, ids) -> dict[str, str]:
    """building -> the instance name in its lease (or '')."""
    values = client.mget([keys.lease_key(b) for b in ids])
    return {b: (v.decode().rpartition("#")[0] if v else "") for b, v in zip(ids, values)}


def kill_all(d: Daemon) -> None:
    """The box dies: every process of the daemon SIGKILLed at once, nothing said to Redis."""
    procs = [psutil.Process(d.proc.pid), *psutil.Process(d.proc.pid).children(recursive=True)]
    for p in procs:
        p.send_signal(signal.SIGKILL)
    d.proc.wait(10)


@pytest.mark.slow
def test_a_killed_instance_is_taken_over_within_a_lease_period_and_nothing_is_lost(
        redis_server, redis_client, model_dir, tmp_path):
    ids = [f"lease-{k}" for k in range(6)]
    listing = tmp_path / "buildings.list"
    listing.write_text("\n".join(ids) + "\n")
    env = dict(NILMD_LEASES="true", NILMD_LEASE_PERIOD="2", NILMD_INPUT_MODE="stream")
    preds = Predictions(redis_client)
    # b first, alone: it takes every lease; a starts holding none and takes its share from b
    b = instance(redis_server, model_dir, tmp_path, "b", listing, **env)
    wait_for(lambda: set(holders(redis_client, ids).values()) == {"b"}, 30, lambda: f"b to take every lease\n{b.log()}")
    a = instance(redis_server, model_dir, tmp_path, "a", listing, **env)
    try:
        share = {x: owner(x, ["a", "b"]) for x in ids}
        assert set(share.values()) == {"a", "b"}  # both have some (a different split would need other ids)
        wait_for(lambda: holders(redis_client, ids) == share, 30,
                 lambda: f"the two instances to settle on their shares\n{a.log()[-2000:]}\n{b.log()[-2000:]}")
        wait_for(lambda: all(daemon_hash(redis_client, n).get("state") in ("warming_up", "running") for n in "ab"),
                 60, "both instances ready")
        t0 = aligned_start(time.time() - 400, WINDOW, STEP)
        first = {x: publish_samples(redis_client, x, WINDOW + 2 * STEP, start=t0, to="stream") for x in ids}
        preds.wait({x: schedule(t0, first[x]) for x in ids}, 60, Both(a, b))
        killed = time.monotonic()
        kill_all(a)
        wait_for(lambda: set(holders(redis_client, ids).values()) == {"b"}, 10,
                 lambda: f"b to take over a's buildings\n{b.log()[-3000:]}")
        took = time.monotonic() - killed
        assert took < 2 * 2 + 1, took  # a lease period for a's registration and leases, a claim, a margin
        # a's buildings go on at b, from their streams: what a had read and predicted is not made again
        last = {x: publish_samples(redis_client, x, 3 * STEP, start=first[x] + 1, to="stream") for x in ids}
        expected = {x: schedule(t0, last[x]) for x in ids}
        preds.wait(expected, 60, Both(a, b))
        wait_caught_up(redis_client, last, b)
        preds.drain()
        for x in ids:
            assert preds.by_building[x] == expected[x], (x, share[x])
            latest = json.loads(redis_client.get(keys.latest_key(x)))
            assert latest["window_end"] == expected[x][-1]
        wait_for(lambda: daemon_hash(redis_client, "b").get("instances_live") == "1", 10, "b to count itself alone")
        st = daemon_hash(redis_client, "b")
        assert (st["buildings"], st["leases_held"], st["candidates"], st["instance"]) == (str(len(ids)),) * 3 + ("b",)
    finally:
        for d in (a, b):
            if d.proc.poll() is None:
                d.stop()
    # a clean stop gives the leases back at once
    assert holders(redis_client, ids) == {x: "" for x in ids}


@pytest.mark.slow
def test_static_shards_split_a_list_between_two_instances(redis_server, redis_client, model_dir, tmp_path):
    ids = [f"shard-{k}" for k in range(6)]
    listing = tmp_path / "buildings.list"
    listing.write_text("\n".join(ids) + "\n")
    parts = {k: in_shard(ids, k, 2) for k in (1, 2)}
    assert parts[1] and parts[2]
    preds = Predictions(redis_client)
    shards = [instance(redis_server, model_dir, tmp_path, f"s{k}", listing, NILMD_SHARD=f"{k}/2") for k in (1, 2)]
    try:
        for k, d in zip((1, 2), shards):
            wait_for(lambda: daemon_hash(redis_client, f"s{k}").get("buildings") == str(len(parts[k])), 60,
                     lambda: f"shard {k} to serve its {len(parts[k])} buildings\n{d.log()[-2000:]}")
        wait_for(lambda: all(n == 1 for _, n in redis_client.pubsub_numsub(*(keys.input_channel(x) for x in ids))),
                 30, "every input channel subscribed by exactly one instance")
        t0 = aligned_start(time.time() - 400, WINDOW, STEP)
        last = {x: publish_samples(redis_client, x, WINDOW + STEP, start=t0) for x in ids}
        expected = {x: schedule(t0, last[x]) for x in ids}
        preds.wait(expected, 60, shards[1])
        wait_caught_up(redis_client, last, Both(*shards))
        preds.drain()
        assert {x: preds.by_building[x] for x in ids} == expected  # each building predicted once, by its shard
    finally:
        for d in shards:
            d.stop()


@pytest.mark.slow
def test_instances_started_together_keep_every_building_on_the_aligned_schedule(
        redis_server, redis_client, model_dir, tmp_path):
    """Issue 23, defect 2: three instances started at once on preloaded streams hand buildings to
    each other as they register; a building that moves continues the same aligned schedule, with
    nothing missing and nothing twice, exactly like one that never moved."""
    ids = [f"start-{k}" for k in range(4, 11)]  # some for each (rendezvous hashing)
    assert {owner(x, ["a", "b", "c"]) for x in ids} == {"a", "b", "c"}
    listing = tmp_path / "buildings.list"
    listing.write_text("\n".join(ids) + "\n")
    t0 = aligned_start(time.time() - 700, WINDOW, STEP)
    n = WINDOW + 3 * STEP
    loaded = {x: publish_samples(redis_client, x, n, start=t0, to="stream") for x in ids}
    # a first start reads the newest window and interval of a stream: the windows that fit in it
    oldest = t0 + n - (WINDOW + STEP)
    preds = Predictions(redis_client)
    env = dict(NILMD_LEASES="true", NILMD_LEASE_PERIOD="2", NILMD_INPUT_MODE="stream")
    daemons = [instance(redis_server, model_dir, tmp_path, name, listing, **env) for name in "abc"]
    every = Both(*daemons)
    try:
        wait_for(lambda: holders(redis_client, ids) == {x: owner(x, ["a", "b", "c"]) for x in ids}, 30,
                 lambda: f"the three instances to settle\n{every.log()}")
        first = {x: [e for e in schedule(t0, loaded[x]) if e - WINDOW + 1 >= oldest] for x in ids}
        preds.wait(first, 60, every)
        more = {x: publish_samples(redis_client, x, 2 * STEP, start=loaded[x] + 1, to="stream") for x in ids}
        expected = {x: first[x] + [e for e in schedule(t0, more[x]) if e > loaded[x]] for x in ids}
        preds.wait(expected, 60, every)
        time.sleep(0.5)  # a duplicate would come within this
        preds.drain()
        assert {x: preds.by_building.get(x) for x in ids} == expected, every.log()
    finally:
        for d in daemons:
            if d.proc.poll() is None:
                d.stop()
