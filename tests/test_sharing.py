"""Sharing a building list between nilmd instances: static shards by a stable hash
(nilmd.buildings), and leases in a real Redis that move buildings when an instance goes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from nilmd import keys
from nilmd.buildings import in_shard, parse_shard
from nilmd.daemon.sharing import INSTANCES_KEY, Leases, owner
from nilmd.testing import wait_for

BUILDINGS = [f"house-{k}" for k in range(300)]


def test_shard_syntax():
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/3", "4/3", "3", "a/b", "1/0", ""):
        with pytest.raises(ValueError, match="K/N"):
            parse_shard(bad)


def test_shards_split_a_list_whole_without_overlap_and_the_same_in_every_process():
    parts = [in_shard(BUILDINGS, k, 3) for k in (1, 2, 3)]
    assert sorted(sum(parts, [])) == sorted(BUILDINGS)
    assert all(60 < len(p) < 140 for p in parts), [len(p) for p in parts]  # 100 each, give or take
    # Python's own hash() differs between processes; the shard must not
    code = f"from nilmd.buildings import in_shard; print(','.join(in_shard({BUILDINGS!r}, 2, 3)))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin",
                                "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert other.stdout.strip().split(",") == parts[1]


def test_a_new_instance_takes_only_its_own_share():
    before = {b: owner(b, ["a", "b", "c"]) for b in BUILDINGS}
    after = {b: owner(b, ["a", "b", "c", "d"]) for b in BUILDINGS}
    moved = [b for b in BUILDINGS if before[b] != after[b]]
    assert all(after[b] == "d" for b in moved)
    assert 40 < len(moved) < 110, len(moved)  # about a quarter


@pytest.fixture
def clean(redis_client):
    def wipe():
        redis_client.delete(INSTANCES_KEY, *[keys.lease_key(b) for b in BUILDINGS])

    wipe()
    yield redis_client
    wipe()


def settle(instances, rounds=4):
    for _ in range(rounds):
        held = {lease.name: lease.claim(BUILDINGS) for lease in instances}
    return held


def test_leases_share_a_list_and_move_when_an_instance_dies(clean, redis_server):
    period = 1.0
    a, b = (Leases(redis_server.client(), name, period, errors=(redis.RedisError,)) for name in ("a", "b"))
    a.claim(BUILDINGS)  # alone: a takes everything
    assert a.held == set(BUILDINGS)
    held = settle([a, b])  # b registers; a gives b its share, b takes it
    assert held["a"] | held["b"] == set(BUILDINGS) and not held["a"] & held["b"]
    assert held["b"] == {x for x in BUILDINGS if owner(x, ["a", "b"]) == "b"} and held["b"]
    for x in held["b"]:  # what Redis says matches what each believes
        assert clean.get(keys.lease_key(x)).decode() == b.token
    # b dies without a word (no release): within a lease period and a claim, a has everything
    died = time.monotonic()
    wait_for(lambda: a.claim(BUILDINGS) == set(BUILDINGS), 3 * period, "a to take over b's buildings", interval=0.1)
    assert time.monotonic() - died < 2 * period + 0.5


def test_a_clean_stop_hands_over_at_once_and_a_stalled_instance_finds_its_leases_gone(clean, redis_server):
    period = 30.0  # nothing expires during this test: hand-overs happen only by release
    a, b = (Leases(redis_server.client(), name, period) for name in ("a", "b"))
    held = settle([a, b])
    b.release_all()
    clean.zrem(INSTANCES_KEY, b.token)
    assert a.claim(BUILDINGS) == set(BUILDINGS)  # the next claim, not a lease period later
    # a "stalls": its leases are taken over by a new life of b (as if they had expired)
    b2 = Leases(redis_server.client(), "b", period)
    for x in held["b"]:
        clean.set(keys.lease_key(x), b2.token, px=int(period * 1000))
    assert a.claim(BUILDINGS) == set(BUILDINGS) - held["b"]


def test_redis_away_keeps_the_leases_only_until_they_run_out(clean, redis_server):
    now = [0.0]
    lease = Leases(redis_server.client(), "a", 2.0, errors=(redis.RedisError,), clock=lambda: now[0])
    lease.claim(BUILDINGS[:10])
    # Nothing listens on port 1; no retries (redis-py 6+ retries with backoff by default: 4 s a call here)
    lease.client = redis.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    now[0] = 1.0
    with pytest.raises(redis.ConnectionError):
        lease.claim(BUILDINGS[:10])
    assert lease.held == set(BUILDINGS[:10])  # within the period: still ours
    now[0] = 2.5
    with pytest.raises(redis.ConnectionError):
        lease.claim(BUILDINGS[:10])
    assert lease.held == set()  # run out: another instance may hold them now
