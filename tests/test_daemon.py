"""The daemon end to end: real redis-server, real processes, real signals, real torch models."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from conftest import aligned_start, publish_samples, wait_for, write_checkpoints
from nilmd import keys
from nilmd.appliances import APPLIANCES, checkpoint_filename
from nilmd.daemon.ingest import REJECT_REASONS

pytestmark = pytest.mark.slow

CONTRACT_STATUS_FIELDS = {  # docs/CONTRACT.md §3.5: the fields the original service had
    "state", "buffer_fill", "window_size", "samples_received", "samples_rejected", "last_sample_ts",
    "last_inference_ts", "last_inference_ms", "models_loaded", "device", "pid_supervisor", "pid_reader",
    "pid_inference", "restarts", "uptime_s", "version", "updated_at", "memory_supervisor_mb",
    "memory_reader_mb", "memory_inference_mb",
}
PREDICTION_FIELDS = {"timestamp": float, "window_start": float, "window_end": float, "total_power": float,
                     "inference_time_ms": float, "predictions": list}
ENTRY_FIELDS = {"appliance": str, "power_watts": float, "probability": float, "is_on": bool, "confidence": float,
                "adapted": bool}


def check_prediction(p: dict, appliances, window_size: int) -> None:
    """docs/CONTRACT.md §3.4: exact names and types, and the invariants."""
    for name, kind in PREDICTION_FIELDS.items():
        assert isinstance(p[name], kind), f"{name} is {type(p[name]).__name__}, expected {kind.__name__}"
    assert p["window_end"] - p["window_start"] == window_size
    assert [e["appliance"] for e in p["predictions"]] == list(appliances)
    for e in p["predictions"]:
        for name, kind in ENTRY_FIELDS.items():
            assert isinstance(e[name], kind), f"{e['appliance']}.{name} is {type(e[name]).__name__}"
        assert 0.0 <= e["power_watts"] <= p["total_power"] + 1e-6
        assert 0.0 <= e["probability"] <= 1.0
        assert e["confidence"] == pytest.approx(abs(2 * e["probability"] - 1), abs=2e-4)


class Subscriber:
    def __init__(self, client, building):
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(keys.predictions_channel(building))
        self.received = []

    def next(self, timeout=20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.pubsub.get_message(timeout=0.2)
            if msg is not None:
                self.received.append(msg["data"])
                return json.loads(msg["data"])
        raise AssertionError(f"no prediction within {timeout} s")

    def until(self, window_end: float, timeout=20.0) -> dict:
        """The prediction whose window ends at `window_end` (earlier ones are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            p = self.next(max(0.1, deadline - time.monotonic()))
            if p["window_end"] == window_end:
                return p
            assert p["window_end"] < window_end, f"went past {window_end}: {p['window_end']}"


def wait_ready(daemon, client, timeout=30.0, states=("warming_up", "running")):
    wait_for(lambda: (lambda s: daemon.owns(s) and s.get("state") in states)(daemon.status(client)), timeout,
             lambda: f"daemon {daemon.building} to become ready\n{daemon.log()[-2000:]}")
    wait_for(lambda: client.pubsub_numsub(keys.input_channel(daemon.building))[0][1] == 1, 10,
             "the reader to subscribe to the input channel")


def test_prediction_end_to_end(daemon_factory, redis_client):
    d = daemon_factory().start()
    sub = Subscriber(redis_client, d.building)
    wait_ready(d, redis_client)
    publish_samples(redis_client, d.building, 256 + 16)
    p = sub.next()
    check_prediction(p, APPLIANCES, 256)
    latest = redis_client.get(keys.latest_key(d.building))
    assert json.loads(latest) in [json.loads(r) for r in sub.received] or json.loads(latest) == sub.next()
    s = wait_for(lambda: (lambda s: s if s.get("state") == "running" and int(s["samples_received"]) == 272 else None)(
        d.status(redis_client)), 10, "status to show all 272 samples and state running")
    missing = CONTRACT_STATUS_FIELDS - set(s)
    assert not missing, f"status hash lacks {missing}"
    assert int(s["buffer_fill"]) == 256 and s["models_loaded"] == "11" and s["device"] == "cpu"
    assert int(s["pid_reader"]) > 0 and int(s["pid_inference"]) > 0 and float(s["memory_inference_mb"]) > 0
    # The daemon is its supervisor and these two: no helper process beside them (multiprocessing's
    # resource tracker was one, 13 MB resident, watching nothing: nilmd.daemon.spawn).
    import psutil

    tree = {p.pid for p in psutil.Process(int(s["pid_supervisor"])).children(recursive=True)}
    assert tree == {int(s["pid_reader"]), int(s["pid_inference"])}, f"processes beside the children: {tree}"
    assert d.stop() == 0


def test_children_killed_are_restarted_and_keep_the_buffer(daemon_factory, redis_client):
    d = daemon_factory().start()
    sub = Subscriber(redis_client, d.building)
    wait_ready(d, redis_client)
    # Aligned (docs/CONTRACT.md §4): the last of these samples closes the first window.
    last = publish_samples(redis_client, d.building, 256 + 16, start=aligned_start(time.time() - 272, 256, 16))
    sub.until(last)
    for n, role in enumerate(("reader", "inference"), start=1):
        old = int(d.status(redis_client)[f"pid_{role}"])
        os.kill(old, signal.SIGKILL)
        s = wait_for(lambda: (lambda s: s if int(s[f"pid_{role}"]) not in (0, old) and s["state"] == "running"
                              else None)(d.status(redis_client)), 30, f"the {role} process to be restarted")
        assert int(s["restarts"]) == n and int(s[f"restarts_{role}"]) == 1
        assert int(s["buffer_fill"]) == 256, "the ring buffer lost its samples"
        wait_for(lambda: redis_client.pubsub_numsub(keys.input_channel(d.building))[0][1] == 1, 10, "resubscribe")
        last = publish_samples(redis_client, d.building, 16, start=last + 1)
        sub.until(last)  # predictions resume on the same schedule, covering the new samples
    assert "the reader process" in d.log() and "killed by SIGKILL" in d.log()
    assert d.stop() == 0


def test_bad_input_is_rejected_by_reason_and_good_samples_all_arrive(daemon_factory, redis_client):
    d = daemon_factory().start()
    wait_ready(d, redis_client)
    channel = keys.input_channel(d.building)
    t0 = time.time() - 400
    bad = {
        "oversized": json.dumps({"timestamp": t0, "power_total": 1.0, "pad": "x" * 5000}),
        "not_json": "{power_total: 3",
        "not_object": "[1, 2, 3]",
        "missing_power": json.dumps({"timestamp": t0, "voltage": 230}),
        "non_numeric": json.dumps({"timestamp": t0, "power_total": "1200"}),
        "non_finite": '{"timestamp": %f, "power_total": NaN}' % t0,
        "out_of_range": json.dumps({"timestamp": t0, "power_total": 5e6}),
        "bad_timestamp": json.dumps({"timestamp": 1000, "power_total": 10}),
        "future": json.dumps({"timestamp": time.time() + 86400, "power_total": 10}),
    }
    good, sent_bad = 0, {r: 0 for r in REJECT_REASONS}
    pipe = redis_client.pipeline(transaction=False)
    for i in range(300):
        pipe.publish(channel, json.dumps({"timestamp": t0 + i, "power_total": 800.0 + i}))
        good += 1
        if i % 10 == 5:
            for reason, raw in bad.items():
                pipe.publish(channel, raw)
                sent_bad[reason] += 1
            pipe.publish(channel, json.dumps({"timestamp": t0 + i, "power_total": 5.0}))  # same second again
            sent_bad["duplicate"] += 1
            pipe.publish(channel, json.dumps({"timestamp": t0 + i - 3, "power_total": 5.0}))
            sent_bad["out_of_order"] += 1
    pipe.execute()
    total = good + sum(sent_bad.values())
    s = wait_for(lambda: (lambda s: s if int(s["samples_received"]) == total else None)(d.status(redis_client)),
                 20, f"all {total} messages to be counted")
    assert int(s["samples_accepted"]) == good
    for reason in REJECT_REASONS:
        assert int(s[f"rejected_{reason}"]) == sent_bad[reason], reason
    assert int(s["samples_rejected"]) == sum(sent_bad.values())
    assert d.proc.poll() is None, "the daemon died on bad input"
    log = d.log()
    for reason in bad:  # one line per reason per minute, not one per message
        assert log.count(f"rejected a sample ({reason}") == 1, reason
    assert d.stop() == 0


def test_sigterm_stops_cleanly_and_leaves_no_shared_memory(daemon_factory, redis_client):
    d = daemon_factory().start()
    wait_ready(d, redis_client)
    assert d.shm_files(), "the daemon should have created its shared memory files"
    assert d.stop(signal.SIGTERM) == 0
    assert d.status(redis_client)["state"] == "stopped"
    assert d.shm_files() == []


def test_stale_shared_memory_is_removed_and_second_instance_refused(daemon_factory, redis_client, tmp_path):
    first = daemon_factory()
    stale = [tmp_path / f"nilmd-{first.building}.ring", tmp_path / f"nilmd-{first.building}.ctl"]
    for p in stale:
        p.write_bytes(b"left by a SIGKILLed run")
    first.start()
    wait_ready(first, redis_client)
    assert "removed stale shared memory" in first.log()
    second = daemon_factory()
    second.building = first.building
    second.env["BUILDING_ID"] = first.building
    second.start()
    assert second.proc.wait(30) == 4
    assert "another nilmd" in second.log()
    assert first.proc.poll() is None and first.shm_files()
    assert first.stop() == 0


def test_bad_checkpoints_are_named_and_the_rest_serve(daemon_factory, redis_client, tmp_path):
    models = write_checkpoints(tmp_path / "models", channels=4)
    (models / checkpoint_filename("Dryer")).write_bytes(b"not a checkpoint")
    (models / checkpoint_filename("Television")).unlink()
    d = daemon_factory(model_dir=models).start()
    sub = Subscriber(redis_client, d.building)
    wait_ready(d, redis_client, states=("degraded",))
    s = d.status(redis_client)
    assert s["models_loaded"] == "9" and s["models_missing"] == "Dryer,Television"
    assert s["state"] == "degraded"
    assert "wavenilm_v3_SOTA_Dryer_best.pth" in d.log()
    publish_samples(redis_client, d.building, 256 + 16)
    p = sub.next()
    check_prediction(p, [a for a in APPLIANCES if a not in ("Dryer", "Television")], 256)
    assert d.stop() == 0


def test_no_usable_checkpoint_is_a_clear_boot_error(daemon_factory, tmp_path):
    (tmp_path / "empty").mkdir()
    d = daemon_factory(model_dir=tmp_path / "empty").start()
    assert d.proc.wait(60) == 78
    assert "no usable checkpoint" in d.log()
    assert d.shm_files() == []


def test_hung_child_is_killed_and_a_crash_loop_ends_the_daemon(daemon_factory, redis_client):
    d = daemon_factory(extra_env={"NILMD_HEARTBEAT_TIMEOUT": "3"}).start()
    wait_ready(d, redis_client)
    hung = int(d.status(redis_client)["pid_inference"])
    os.kill(hung, signal.SIGSTOP)
    wait_for(lambda: int(d.status(redis_client)["pid_inference"]) not in (0, hung), 30,
             "the stopped inference process to be replaced")
    assert "sent no heartbeat" in d.log()
    # SIGABRT stays pending in a stopped process: the SIGKILL on the next tick is what ends it
    assert f"the inference process (pid {hung}) is still alive" in d.log() and "after SIGABRT: sending SIGKILL" in d.log()
    # Now a reader that dies again and again: the supervisor gives up and says so.
    for _ in range(5):
        pid = wait_for(lambda: (lambda p: p if p and d.proc.poll() is None else None)(
            int(d.status(redis_client)["pid_reader"])), 30, "a running reader")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_for(lambda: d.proc.poll() is not None or int(d.status(redis_client)["pid_reader"]) != pid, 30,
                 "the reader to be replaced")
        if d.proc.poll() is not None:
            break
    assert d.proc.wait(30) == 3
    assert "failed 5 times in a row" in d.log()
    assert d.shm_files() == []


@pytest.mark.slow
def test_a_subscription_cut_for_a_full_output_buffer_is_counted_and_its_loss_estimated(daemon_factory, redis_client):
    """Lost: what Redis dropped when it cut the reader off (pub/sub is at-most-once), but no
    longer silently. A burst of 100,000 samples against a pub/sub output buffer limit of 256 kB
    (CONFIG SET on this test's redis-server; the default 32 MB is passed by a bigger burst):
    Redis closes the reader's subscription, redis-py subscribes again by itself. Each cut is
    counted by cause and warned about, and `input_samples_lost` is exactly what never arrived (the
    gaps in the meter's timestamps across the cuts)."""
    key = "client-output-buffer-limit"
    default = redis_client.config_get(key)[key]
    d = daemon_factory().start()
    wait_ready(d, redis_client)
    t0 = float(int(time.time()) - 200_000)
    try:
        redis_client.config_set(key, "pubsub 256kb 128kb 1")
        last = publish_samples(redis_client, d.building, 100_000, start=t0)
    finally:
        redis_client.config_set(key, default)
    sent = 100_000

    def subscribed_again_and_caught_up():
        nonlocal last, sent
        if redis_client.pubsub_numsub(keys.input_channel(d.building))[0][1] == 1:
            last = publish_samples(redis_client, d.building, 1, start=last + 1)  # shows a cut at the burst's end
            sent += 1
        return float(d.status(redis_client)["last_sample_ts"]) >= t0 + 100_000

    wait_for(subscribed_again_and_caught_up, 60, lambda: f"a sample after the burst to arrive\n{d.log()[-2000:]}",
             interval=0.5)
    s = wait_for(lambda: (lambda s: s if float(s["last_sample_ts"]) == last else None)(d.status(redis_client)), 20,
                 "the samples sent after the burst")
    lost = sent - int(s["samples_received"])
    assert lost > 0 and int(s["input_disconnects_output_buffer"]) >= 1, s
    assert int(s["input_disconnects"]) == int(s["input_disconnects_output_buffer"])
    assert int(s["input_samples_lost"]) == lost
    assert "the input subscription was cut (Redis closed it because the reader fell behind" in d.log()
    assert d.stop() == 0
