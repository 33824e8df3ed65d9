"""What a first-time user ran into (issue 12, defect 8), each done for real: `nilmd produce`
running into the future, `nilmd run --mode test | head`, two daemons for one building, bad
settings and bad checkpoint files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import torch
from conftest import ROOT, RedisServer, free_port, wait_for, write_checkpoints

from nilmd import keys
from nilmd.appliances import checkpoint_filename


def nilmd(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "nilmd", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def receive(pubsub, n, timeout):
    """(receipt time, message) for n messages."""
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.2)
        if msg is not None:
            out.append((time.time(), json.loads(msg["data"])))
    return out


def subscribed(redis_client, building):
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.input_channel(building))
    wait_for(lambda: pubsub.get_message(timeout=0.1) is None and redis_client.pubsub_numsub(
        keys.input_channel(building))[0][1] == 1, 5, "the test's subscription")
    return pubsub


@pytest.mark.slow
def test_an_accelerated_producer_never_stamps_a_sample_in_the_future(redis_server, redis_client, tmp_path):
    building = f"f{uuid.uuid4().hex[:8]}"
    pubsub = subscribed(redis_client, building)
    base = ("produce", "--redis-port", str(redis_server.port), "--building-id", building)
    # Starts 3 s back at 1000x: it reaches now at once, and must go on at real time from there.
    r = nilmd(*base, "--speed", "1000", "--count", "6", "--fields", "power", "--start", str(int(time.time()) - 3))
    assert r.returncode == 0, r.stderr
    got = receive(pubsub, 6, 10)
    assert len(got) == 6
    assert all(m["timestamp"] <= at + 0.5 for at, m in got), [(at, m["timestamp"]) for at, m in got]
    assert "caught up with now" in r.stderr
    # A 1-minute CSV: 20 rows are 19 minutes of samples, so the run starts 19 minutes back and ends at now.
    csv = tmp_path / "minutes.csv"
    csv.write_text("timestamp,power_total\n" + "".join(f"{1_600_000_000 + 60 * i},{500 + i}\n" for i in range(30)))
    r = nilmd(*base, "--source", str(csv), "--speed", "100000", "--count", "20")
    assert r.returncode == 0, r.stderr
    got = receive(pubsub, 20, 10)
    assert len(got) == 20 and got[1][1]["timestamp"] - got[0][1]["timestamp"] == 60.0
    assert got[-1][0] - 65 <= got[-1][1]["timestamp"] <= got[-1][0] + 0.5, "ends at now, not 19 minutes ahead"


@pytest.mark.slow
def test_test_mode_into_a_closed_pipe_ends_cleanly(model_dir, tmp_path):
    """`nilmd run --mode test | head -2`: the reader of stdout goes away; the daemon exits 0."""
    proc = subprocess.Popen([sys.executable, "-m", "nilmd", "run", "--mode", "test", "--model-dir", str(model_dir),
                             "--window-size", "256", "--inference-interval", "16", "--runtime-dir", str(tmp_path),
                             "--building-id", f"h{uuid.uuid4().hex[:8]}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert all(json.loads(line)["predictions"] for line in lines)
        proc.stdout.close()  # what `head` does after its lines
        assert proc.wait(30) == 0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stdout was closed by its reader: ending test mode" in err
    assert "BrokenPipeError" not in err and "died" not in err, err[-2000:]


def test_bad_settings_are_one_line_not_a_traceback_or_a_silent_default(tmp_path):
    r = nilmd("run", "--mode", "test", env={"NILMD_RUNTIME_DIR": "/proc/nilmd"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cannot create the shared memory in /proc/nilmd (--runtime-dir, $NILMD_RUNTIME_DIR)" in r.stderr
    r = nilmd("status", env={"BUILDING_ID": ""})
    assert r.returncode == 2 and r.stderr.strip() == (
        "nilmd: error: $BUILDING_ID is set but empty: give it a value, or unset it for the default (building_1)")


@pytest.mark.slow
def test_a_truncated_or_malicious_checkpoint_is_named_for_what_it_is(model_dir, tmp_path):
    models = write_checkpoints(tmp_path / "models", appliances=["Dryer"], channels=4)
    good = (models / checkpoint_filename("Dryer")).read_bytes()
    (models / checkpoint_filename("Dryer")).write_bytes(good[: len(good) // 2])

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"hparams": Payload()}, models / checkpoint_filename("Freezer"))
    r = nilmd("check", "--mode", "test", "--model-dir", str(models))
    lines = {ln.split(":")[0].split()[-1]: ln for ln in r.stdout.splitlines() if ln.startswith("checkpoint")}
    assert "not a whole torch checkpoint" in lines["Dryer"] and "truncated" in lines["Dryer"], lines["Dryer"]
    assert "refused: it holds Python objects (posix.system) that could run code" in lines["Freezer"], lines["Freezer"]
    assert "weights_only" not in r.stdout + r.stderr and "Errno 22" not in r.stdout


@pytest.mark.slow
def test_a_second_daemon_for_the_building_says_which_runs_and_how_to_run_both(daemon_factory, redis_server,
                                                                            tmp_path):
    one = daemon_factory().start()
    wait_for(lambda: one.status(redis_server.client()).get("state") in ("warming_up", "running", "degraded"), 30,
             lambda: f"the first daemon to be ready\n{one.log()[-2000:]}")
    with RedisServer(free_port(), tmp_path) as other:
        two = daemon_factory()
        two.building, two.env["BUILDING_ID"] = one.building, one.building
        two.env["REDIS_PORT"] = str(other.port)
        two.start()
        assert two.proc.wait(30) == 4
    assert (f"another nilmd (pid {one.proc.pid}, Redis redis://127.0.0.1:{redis_server.port}/0) is running for "
            f"building {one.building}") in two.log()
    assert "give it its own --runtime-dir and --state-dir" in two.log()
    assert one.stop() == 0
