"""nilmd on a real Redis Cluster (three masters, three replicas: conftest.redis_cluster): the
ledger's counts equal a single node's, the daemon end to end in both input modes, and a master
SIGKILLed under a running daemon in stream mode, with nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from conftest import ROOT, Daemon, aligned_start, publish_samples, wait_for
from nilmd import keys
from nilmd.config import Config
from nilmd.daemon.ledger import Ledger
from test_ledger import count, prediction

W, I = 256, 16  # the tests' window and interval (conftest.Daemon)


def ledger_keys(b: str) -> tuple[str, ...]:
    return keys.energy_key(b), keys.runs_key(b), keys.predictions_stream(b), keys.events_stream(b)


def dump(client, b: str) -> dict:
    """What the ledger wrote for building `b`, key by key (stream ids included)."""
    energy, runs, history, events = ledger_keys(b)
    return {"energy": client.hgetall(energy), "runs": client.hgetall(runs),
            "history": client.xrange(history), "events": client.xrange(events)}


def test_the_ledger_counts_on_a_cluster_what_it_counts_on_one_node(redis_cluster, redis_client):
    """The same predictions (runs that start and end, a retried one) through the ledger on a
    single redis-server and on the cluster, where its keys lie on different masters."""
    b = "ledger_equal"
    assert len({redis_cluster.master_of(k) for k in ledger_keys(b)}) > 1, "the keys should span masters"
    cluster = redis_cluster.client()
    got = []
    for client in (redis_client, cluster):
        for k in ledger_keys(b):
            client.delete(k)
        c = Config(building_id=b, inference_interval=60, timezone="Europe/Berlin")
        ledger, t0 = Ledger(c), 1709280000.0
        for k in range(20):
            on = k % 7 < 3
            p = prediction(t0 + 60 * k, {"Dryer": (on, 0.95 if on else 0.1, 600.0 if on else 0.0),
                                         "Freezer": (k % 3 == 0, 0.7, 90.0)})
            assert count(ledger, client, p) == 1
            if k == 10:  # a restarted inference predicting the same window again
                assert count(Ledger(c), client, p) == 0
        got.append(dump(client, b))
    cluster.close()
    assert got[0] == got[1]
    assert len(got[0]["history"]) == 20 and [e for e in got[0]["events"]], "the input should make runs"


def cluster_daemon(redis_cluster, model_dir, tmp_path, mode: str) -> Daemon:
    return Daemon(redis_cluster.port, model_dir, tmp_path,
                  extra_env={"REDIS_CLUSTER": "1", "NILMD_INPUT_MODE": mode})


def window_ends(client, b: str) -> list[float]:
    """The window_end of every prediction in the history stream, checking each entry's id."""
    out = []
    for entry_id, fields in client.xrange(keys.predictions_stream(b)):
        end = json.loads(fields[b"json"])["window_end"]
        assert entry_id == f"{int(end * 1000)}-0".encode()
        out.append(end)
    return out


def drain(sub, quiet: float = 1.0) -> list[dict]:
    out, since = [], time.monotonic()
    while time.monotonic() - since < quiet:
        m = sub.get_message(timeout=0.2)
        if m is not None:
            out.append(json.loads(m["data"]))
            since = time.monotonic()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pubsub", "stream"])
def test_the_daemon_serves_a_building_whose_keys_span_the_cluster(mode, redis_cluster, model_dir, tmp_path):
    client = redis_cluster.client()
    d = cluster_daemon(redis_cluster, model_dir, tmp_path, mode).start()
    b = d.building
    try:
        wait_for(lambda: d.status(client).get("input_connected") == "1", 60,
                 f"the daemon to connect its input on the cluster\n{d.log()[-3000:]}")
        sub = client.pubsub(ignore_subscribe_messages=True)
        sub.subscribe(keys.predictions_channel(b))
        n = W + 4 * I
        t0 = aligned_start(time.time() - 600, W, I)  # the first window ends at t0 + W - 1
        publish_samples(client, b, n, start=t0, to=mode)
        expected = [t0 + W - 1 + I * k for k in range(5)]  # 1 + (n - W) // I predictions
        updated = lambda: client.hget(keys.energy_key(b), "updated")  # noqa: E731
        wait_for(lambda: updated() is not None and float(updated()) == expected[-1], 60,
                 f"the interval ending {expected[-1]} to be counted\n{d.log()[-3000:]}")
        assert [p["window_end"] for p in drain(sub)] == expected
        assert window_ends(client, b) == expected
        assert json.loads(client.get(keys.latest_key(b)))["window_end"] == expected[-1]
        wait_for(lambda: d.status(client).get("inferences") == "5", 10, "the status hash to count 5 predictions")
        status = d.status(client)
        assert status["samples_received"] == status["samples_accepted"] == str(n), status
        assert status["state"] == "running" and status["input_mode"] == mode
        env = {**os.environ, "REDIS_CLUSTER": "1", "REDIS_PORT": str(redis_cluster.port), "BUILDING_ID": b}
        shown = subprocess.run([sys.executable, "-m", "nilmd", "status"], env=env, cwd=ROOT, capture_output=True,
                               text=True, timeout=60)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert d.stop() == 0, d.log()[-3000:]
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        client.close()


def stream_len_on(port: int, key: str) -> int:
    """XLEN of `key` as the node on `port` holds it (a replica too: READONLY)."""
    with redis.Redis(port=port) as node:
        node.execute_command("READONLY")
        return node.xlen(key)


@pytest.mark.slow
def test_a_master_killed_under_a_stream_daemon_loses_nothing(redis_cluster, model_dir, tmp_path):
    """SIGKILL the master that holds the building's input stream while the daemon reads it: its
    replica takes over within seconds, the daemon's clients find it by themselves (no child
    restarts), and every sample and every prediction the data implies is there."""
    client = redis_cluster.client()
    d = cluster_daemon(redis_cluster, model_dir, tmp_path, "stream").start()
    b = d.building
    stream = keys.input_stream(b)
    victim = redis_cluster.master_of(stream)
    try:
        wait_for(lambda: d.status(client).get("input_connected") == "1", 60,
                 f"the daemon to read its stream on the cluster\n{d.log()[-3000:]}")
        t0 = aligned_start(time.time() - 3000, W, I)
        first, second = W + 3 * I, 10 * I
        publish_samples(client, b, first, start=t0, to="stream")
        updated = lambda: client.hget(keys.energy_key(b), "updated")  # noqa: E731
        wait_for(lambda: updated() is not None and float(updated()) == t0 + first - 1, 60,
                 f"the first part to be predicted\n{d.log()[-3000:]}")
        # Replication is asynchronous: what the replica has not got when its master dies is lost
        # (README "Redis Cluster"). Here the test makes sure it has it all.
        replica = redis_cluster.replica_of(victim)
        wait_for(lambda: stream_len_on(replica, stream) == first, 10, "the replica to hold the whole stream")
        redis_cluster.kill(victim)
        killed = time.monotonic()

        def add_second_part():  # a meter that keeps trying, as `nilmd produce` would be restarted
            try:
                publish_samples(client, b, second, start=t0 + first, to="stream")
                return True
            except (redis.RedisError, redis.exceptions.RedisClusterException):
                return False
        wait_for(add_second_part, 60, "the cluster to take writes for the input stream again", not_yet=())
        took_over = time.monotonic() - killed
        last = t0 + first + second - 1
        wait_for(lambda: updated() is not None and float(updated()) == last, 90,
                 f"the interval ending {last} to be counted after the failover\n{d.log()[-3000:]}")
        assert redis_cluster.master_of(stream) == replica
        assert window_ends(client, b) == [t0 + W - 1 + I * k for k in range(1 + (first + second - W) // I)]

        def settled():
            s = d.status(client)
            return s if s.get("samples_accepted") == str(first + second) else None
        status = wait_for(settled, 20, "the status hash to count every sample")
        assert int(status["samples_received"]) == int(status["samples_accepted"]) + int(status["samples_rejected"])
        assert status["restarts"] == "0", status  # the clients reconnected by themselves
        assert d.stop() == 0, d.log()[-3000:]
        print(f"failover: writes taken again {took_over:.1f} s after the kill")
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        client.close()
        if victim not in redis_cluster.alive():
            redis_cluster.restart(victim)  # whole again for the tests after this one
