"""nilmd on a real Redis Cluster (three masters, three replicas: conftest.redis_cluster): the
ledger's counts equal a single node's, the daemon end to end in both input modes, and a master
SIGKILLed under a running daemon in stream mode, with nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis

from conftest import ROOT, Daemon, aligned_start, free_port, publish_samples, wait_for
from nilmd import keys
from nilmd.config import Config
from nilmd.daemon.ledger import Ledger
from test_acl import acl_user
from test_homeassistant import MqttSubscriber, broker, states_match  # noqa: F401 (broker: a fixture)
from test_ledger import count, prediction
from test_metrics import scrape, value

W, I = 256, 16  # the tests' window and interval (conftest.Daemon)


def ledger_keys(b: str) -> tuple[str, ...]:
    return keys.energy_key(b), keys.runs_key(b), keys.predictions_stream(b), keys.events_stream(b)


def dump(client, b: str) -> dict:
    """What the ledger wrote for building `b`, key by key (stream ids included)."""
    energy, runs, history, events = ledger_keys(b)
    return {"energy": client.hgetall(energy), "runs": client.hgetall(runs),
            "history": client.xrange(history), "events": client.xrange(events)}


@pytest.mark.slow  # (a six-node cluster to start)
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


@pytest.mark.slow
def test_produce_publishes_and_adds_to_a_cluster(redis_cluster):
    """`nilmd produce --to both` (a pipeline of PUBLISHes and XADDs) against the cluster."""
    client = redis_cluster.client()
    b = f"p{uuid.uuid4().hex[:8]}"
    sub = client.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(keys.input_channel(b))
    sub.get_message(timeout=1.0)  # the confirmation: subscribed before anything is sent
    env = {**os.environ, "REDIS_CLUSTER": "1", "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(redis_cluster.port),
           "BUILDING_ID": b}
    run = subprocess.run([sys.executable, "-m", "nilmd", "produce", "--to", "both", "--count", "10", "--speed",
                          "100000"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    got = []
    wait_for(lambda: got.extend(m for m in [sub.get_message(timeout=0.1)] if m) or len(got) >= 10, 10,
             f"10 messages on the channel, got {len(got)}")
    assert [m["data"] for m in got] == [f[b"data"] for _, f in client.xrange(keys.input_stream(b))]
    client.close()


def cluster_daemon(redis_cluster, model_dir, tmp_path, mode: str, **env) -> Daemon:
    return Daemon(redis_cluster.port, model_dir, tmp_path,
                  extra_env={"REDIS_CLUSTER": "1", "NILMD_INPUT_MODE": mode, **env})


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
    """Under the ACL rule for a cluster (docs/OPERATIONS.md, "Redis Cluster"), set on every node."""
    client = redis_cluster.client()
    nodes = [redis.Redis(port=port) for port in redis_cluster.alive()]
    user, password = acl_user(nodes, mode, cluster=True)
    d = cluster_daemon(redis_cluster, model_dir, tmp_path, mode, REDIS_USERNAME=user, REDIS_PASSWORD=password).start()
    b = d.building
    try:
        wait_for(lambda: d.status(client).get("input_connected") == "1", 60,
                 lambda: f"the daemon to connect its input on the cluster\n{d.log()[-3000:]}")
        sub = client.pubsub(ignore_subscribe_messages=True)
        sub.subscribe(keys.predictions_channel(b))
        n = W + 4 * I
        t0 = aligned_start(time.time() - 600, W, I)  # the first window ends at t0 + W - 1
        publish_samples(client, b, n, start=t0, to=mode)
        expected = [t0 + W - 1 + I * k for k in range(5)]  # 1 + (n - W) // I predictions
        updated = lambda: client.hget(keys.energy_key(b), "updated")  # noqa: E731
        wait_for(lambda: updated() is not None and float(updated()) == expected[-1], 60,
                 lambda: f"the interval ending {expected[-1]} to be counted\n{d.log()[-3000:]}")
        assert [p["window_end"] for p in drain(sub)] == expected
        assert window_ends(client, b) == expected
        assert json.loads(client.get(keys.latest_key(b)))["window_end"] == expected[-1]
        wait_for(lambda: d.status(client).get("inferences") == "5", 10, "the status hash to count 5 predictions")
        status = d.status(client)
        assert status["samples_received"] == status["samples_accepted"] == str(n), status
        assert status["state"] == "running" and status["input_mode"] == mode
        env = {**os.environ, "REDIS_CLUSTER": "1", "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(redis_cluster.port),
               "BUILDING_ID": b}
        shown = subprocess.run([sys.executable, "-m", "nilmd", "status"], env=env, cwd=ROOT, capture_output=True,
                               text=True, timeout=60)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        if mode == "stream":
            checked = subprocess.run([sys.executable, "-m", "nilmd", "check"], env={**env, "MODEL_DIR": str(model_dir)},
                                     cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert checked.returncode == 0, checked.stdout + checked.stderr
            assert f"redis+cluster://127.0.0.1:{redis_cluster.port} answered" in checked.stdout, checked.stdout
        assert d.stop() == 0, d.log()[-3000:]
        assert "NOPERM" not in d.log(), d.log()[-3000:]
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        client.close()
        for node in nodes:
            node.execute_command("ACL", "DELUSER", user)
            node.close()


@pytest.mark.slow
def test_the_exporters_and_the_report_read_a_cluster(redis_cluster, model_dir, tmp_path, broker):
    """Prometheus (latest and energy in one pipeline), Home Assistant over MQTT (a subscription
    and the energy hash) and `nilmd report` (the history stream) against the cluster."""
    pytest.importorskip("matplotlib", reason="the report extra: pip install 'nilmd[report]'")
    port = free_port()
    (tmp_path / "mqtt-password").write_text(broker.users["nilmd"] + "\n")
    broker.start()
    client = redis_cluster.client()
    d = Daemon(redis_cluster.port, model_dir, tmp_path, extra_env={"REDIS_CLUSTER": "1", "NILMD_TIMEZONE": "UTC"},
               args=["--metrics-port", str(port), "--mqtt-url", f"mqtt://nilmd@127.0.0.1:{broker.port}",
                     "--mqtt-password-file", str(tmp_path / "mqtt-password")]).start()
    b = d.building
    sub = MqttSubscriber(broker.port, "ha", broker.users["ha"])
    try:
        wait_for(lambda: d.status(client).get("input_connected") == "1", 60,
                 lambda: f"the daemon to subscribe on the cluster\n{d.log()[-3000:]}")
        t0 = aligned_start(time.time() - 600, W, I)
        publish_samples(client, b, W + 2 * I, start=t0)
        last = t0 + W + 2 * I - 1
        updated = lambda: client.hget(keys.energy_key(b), "updated")  # noqa: E731
        wait_for(lambda: updated() is not None and float(updated()) == last, 60,
                 lambda: f"3 predictions\n{d.log()[-3000:]}")
        latest = json.loads(client.get(keys.latest_key(b)))
        total = {k.decode().rsplit(":", 1)[0]: float(v) for k, v in client.hgetall(keys.energy_key(b)).items()
                 if k.endswith(b":total_wh")}
        families = scrape(port)
        assert value(families, "nilmd_appliance_metrics_ok") == 1
        for e in latest["predictions"]:
            assert value(families, "nilmd_appliance_power_watts", appliance=e["appliance"]) == pytest.approx(
                e["power_watts"])
            assert value(families, "nilmd_appliance_energy_joules_total", appliance=e["appliance"]) == \
                pytest.approx(total[e["appliance"]] * 3600)
        wait_for(lambda: states_match(sub, b, latest, total), 30, lambda: f"the MQTT states of the latest prediction\n"
                 f"{sub.last(f'nilmd/{b}/')}\n{d.log()[-3000:]}")
        day = time.strftime("%Y-%m-%d", time.gmtime(last - I / 2))
        drawn = subprocess.run([sys.executable, "-m", "nilmd", "report", "--redis-cluster", "--redis-host",
                                "127.0.0.1", "--redis-port", str(redis_cluster.port), "--building-id", b,
                                "--timezone", "UTC", "--day", day, "--out", str(tmp_path / "day.png")],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert drawn.returncode == 0, drawn.stdout + drawn.stderr
        assert (tmp_path / "day.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert d.stop() == 0, d.log()[-3000:]
        assert "Traceback" not in d.log(), d.log()[-3000:]
    finally:
        sub.close()
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        client.close()


def stream_len_on(port: int, key: str) -> int:
    """XLEN of `key` as the node on `port` holds it (a replica too: READONLY)."""
    with redis.Redis(port=port) as node:
        node.execute_command("READONLY")
        return node.xlen(key)


def building_on_one_master(redis_cluster, *keyfuncs) -> str:
    """A building id whose keys `keyfuncs` all lie on one master."""
    while True:
        b = f"t{uuid.uuid4().hex[:10]}"
        if len({redis_cluster.master_of(f(b)) for f in keyfuncs}) == 1:
            return b


@pytest.mark.slow
def test_a_master_killed_under_a_stream_daemon_loses_nothing(redis_cluster, model_dir, tmp_path):
    """SIGKILL the master that holds the building's input stream, energy and history while a
    meter feeds the daemon: its replica takes over within seconds, the daemon's clients find it
    by themselves (no child restarts), and every sample and every prediction the data implies is
    there, each counted once."""
    client = redis_cluster.client()
    d = cluster_daemon(redis_cluster, model_dir, tmp_path, "stream")
    b = d.building = building_on_one_master(redis_cluster, keys.input_stream, keys.energy_key, keys.predictions_stream)
    stream = keys.input_stream(b)
    victim = redis_cluster.master_of(stream)
    replica = redis_cluster.replica_of(victim)
    # the worst case: the node nilmd was told about is the one that dies
    d.env.update(BUILDING_ID=b, REDIS_PORT=str(victim))
    d.start()
    t0 = aligned_start(time.time() - 3000, W, I)
    first, chunks, kill_after = W + 3 * I, 30, 8
    total = first + chunks * I
    sent, ready, killed, failed = [first], threading.Event(), threading.Event(), []

    def meter():
        """I samples every 0.1 s, each batch tried again until Redis takes it; the kill comes
        once the replica holds everything sent (what it has not got when its master dies is
        lost: docs/OPERATIONS.md, "Redis Cluster")."""
        try:
            for k in range(chunks):
                def add():
                    try:
                        publish_samples(client, b, I, start=t0 + first + k * I, to="stream")
                        return True
                    except (redis.RedisError, redis.exceptions.RedisClusterException):
                        return False
                wait_for(add, 60, f"the cluster to take the meter's batch {k}", not_yet=())
                sent[0] += I
                if k == kill_after:
                    wait_for(lambda: stream_len_on(replica, stream) == sent[0], 10, "the replica to catch up")
                    ready.set()
                    killed.wait(30)
                time.sleep(0.1)
        except BaseException as e:  # the main thread fails with it
            failed.append(e)
            ready.set()

    thread = threading.Thread(target=meter, daemon=True)
    try:
        wait_for(lambda: d.status(client).get("input_connected") == "1", 60,
                 lambda: f"the daemon to read its stream on the cluster\n{d.log()[-3000:]}")
        publish_samples(client, b, first, start=t0, to="stream")
        updated = lambda: client.hget(keys.energy_key(b), "updated")  # noqa: E731
        wait_for(lambda: updated() is not None and float(updated()) == t0 + first - 1, 60,
                 lambda: f"the first window to be predicted\n{d.log()[-3000:]}")
        # The inference paused while the meter sends, so that it has windows to publish and
        # count while the master is dead (its held prediction, the ledger's parts sent again).
        inference = int(d.status(client)["pid_inference"])
        os.kill(inference, signal.SIGSTOP)
        thread.start()
        try:
            assert ready.wait(60) and not failed, failed
            redis_cluster.kill(victim)
        finally:
            os.kill(inference, signal.SIGCONT)
        killed.set()
        at = time.monotonic()
        wait_for(lambda: redis_cluster.master_of(stream) == replica, 30, "the replica to take over", not_yet=(
            redis.RedisError, redis.exceptions.RedisClusterException))
        took_over = time.monotonic() - at
        thread.join(120)
        assert not failed, failed
        last = t0 + total - 1
        wait_for(lambda: updated() is not None and float(updated()) == last, 90,
                 lambda: f"the interval ending {last} to be counted after the failover\n{d.log()[-3000:]}")
        assert window_ends(client, b) == [t0 + W - 1 + I * k for k in range(1 + (total - W) // I)]

        def settled():
            s = d.status(client)
            return s if s.get("samples_accepted") == str(total) else None
        status = wait_for(settled, 20, lambda: f"the status hash to count every sample\n{d.log()[-3000:]}")
        assert int(status["samples_received"]) == int(status["samples_accepted"]) + int(status["samples_rejected"])
        assert status["restarts"] == "0", d.log()[-6000:]  # the clients reconnected by themselves
        assert d.stop() == 0, d.log()[-3000:]
        print(f"failover: the replica took over {took_over:.1f} s after the kill; Redis errors: reader "
              f"{status['input_errors']}, inference {status['redis_errors_inference']}, supervisor "
              f"{status['redis_errors_supervisor']}; rejected {status['samples_rejected']}")
    finally:
        killed.set()
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        client.close()
        if victim not in redis_cluster.alive():
            redis_cluster.restart(victim)  # whole again for the tests after this one


@pytest.mark.slow
def test_a_pubsub_reader_subscribes_again_after_its_node_dies(redis_cluster, model_dir, tmp_path):
    """The default input mode: the reader's subscription is on the master of the channel's slot;
    SIGKILL it: the reader subscribes again on a live node by itself (what was published meanwhile
    is lost, as with one Redis, and said so), and the samples after it are predicted."""
    client = redis_cluster.client()
    d = cluster_daemon(redis_cluster, model_dir, tmp_path, "pubsub")
    b = d.building
    victim = redis_cluster.master_of(keys.input_channel(b))
    d.env["REDIS_PORT"] = str(next(p for p in redis_cluster.alive() if p != victim))
    d.start()
    gone = (redis.RedisError, redis.exceptions.RedisClusterException)
    try:
        wait_for(lambda: d.status(client).get("input_connected") == "1", 60,
                 lambda: f"the reader to subscribe\n{d.log()[-3000:]}")
        t0 = aligned_start(time.time() - 2000, W, I)
        publish_samples(client, b, W + I, start=t0)
        updated = lambda: client.hget(keys.energy_key(b), "updated")  # noqa: E731
        wait_for(lambda: updated() is not None and float(updated()) == t0 + W + I - 1, 60, "the first predictions")
        redis_cluster.kill(victim)
        wait_for(lambda: "the input subscription was cut" in d.log(), 60,
                 lambda: f"the reader to subscribe again and say what it means\n{d.log()[-3000:]}", not_yet=gone)
        wait_for(lambda: d.status(client).get("input_connected") == "1", 30, "input_connected again", not_yet=gone)
        publish_samples(client, b, 3 * I, start=t0 + W + I)
        wait_for(lambda: float(updated()) == t0 + W + 4 * I - 1, 60,
                 lambda: f"predictions after the failover\n{d.log()[-3000:]}",
                 not_yet=gone)
        status = wait_for(lambda: (lambda s: s if s.get("samples_accepted") == str(W + 4 * I) else None)(
            d.status(client)), 10, "the status hash to count every sample")
        assert int(status["samples_received"]) == int(status["samples_accepted"]) + int(status["samples_rejected"])
        assert status["restarts"] == "0" and int(status["input_disconnects"]) >= 1, status
        assert d.stop() == 0, d.log()[-3000:]
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        client.close()
        if victim not in redis_cluster.alive():
            redis_cluster.restart(victim)
