"""The command line as a user meets it: settings precedence, one-line errors, check, status, test mode."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from argparse import Namespace

import pytest

from conftest import ROOT, wait_for
from nilmd import config, keys
from nilmd.daemon import status
from nilmd.appliances import APPLIANCES
from nilmd.errors import ConfigError


def nilmd(*args, env=None, timeout=60):
    import os

    return subprocess.run([sys.executable, "-m", "nilmd", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def test_command_line_over_environment_over_defaults():
    assert config.resolve(Namespace(), environ={}).window_size == 1536
    assert config.resolve(Namespace(), environ={"WINDOW_SIZE": "512"}).window_size == 512
    args = Namespace(window_size="256", redis_port=None)
    cfg = config.resolve(args, environ={"WINDOW_SIZE": "512", "REDIS_PORT": "7000", "BUILDING_ID": "house9"})
    assert (cfg.window_size, cfg.redis_port, cfg.building_id) == (256, 7000, "house9")


@pytest.mark.parametrize("environ, fragment", [
    ({"WINDOW_SIZE": "abc"}, "WINDOW_SIZE"),
    ({"REDIS_PORT": "70000"}, "REDIS_PORT"),
    ({"INFERENCE_INTERVAL": "0"}, "INFERENCE_INTERVAL"),
    ({"NILMD_DEVICE": "tpu"}, "NILMD_DEVICE"),
    ({"BUILDING_ID": "a b"}, "building-id"),
    ({"WINDOW_SIZE": "4096", "NILMD_RING_CAPACITY": "5000"}, "ring-capacity"),
    ({"REDIS_PASSWORD_FILE": "/nonexistent/pw"}, "redis-password-file"),
])
def test_bad_settings_are_one_clear_error(environ, fragment):
    with pytest.raises(ConfigError) as e:
        config.resolve(Namespace(), environ=environ)
    assert fragment in str(e.value)


def test_bad_value_on_the_command_line_is_one_line_not_a_traceback():
    r = nilmd("run", "--window-size", "abc")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("nilmd: error: --window-size")
    assert "Traceback" not in r.stderr


def test_password_never_shown(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret-value\n")
    cfg = config.resolve(Namespace(), environ={"REDIS_PASSWORD_FILE": str(pw)})
    assert cfg.redis_password == "s3cret-value"
    assert "s3cret" not in repr(cfg) and "s3cret" not in json.dumps(cfg.public())


@pytest.mark.slow
def test_check_reports_every_part(redis_server, model_dir):
    ok = nilmd("check", "--redis-port", str(redis_server.port), "--model-dir", str(model_dir))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("checkpoint   ok") == len(APPLIANCES) and "redis        ok" in ok.stdout
    bad = nilmd("check", "--redis-port", "1", "--model-dir", "/nonexistent")
    assert bad.returncode == 1
    assert "redis        FAIL  redis://localhost:1/0" in bad.stdout
    assert "checkpoint   FAIL  HeatPump" in bad.stdout and "file not found" in bad.stdout


@pytest.mark.slow
def test_status_exit_codes(redis_server, redis_client):
    building = f"s{int(time.time() * 1000)}"
    args = ("status", "--redis-port", str(redis_server.port), "--building-id", building)
    assert nilmd(*args).returncode == status.UNKNOWN
    key = keys.status_key(building)
    redis_client.hset(key, mapping={"state": "running", "updated_at": time.time(), "status_interval_s": 2})
    assert nilmd(*args).returncode == status.OK
    redis_client.hset(key, mapping={"state": "warming_up"})
    assert nilmd(*args).returncode == status.WARNING
    redis_client.hset(key, mapping={"state": "running", "updated_at": time.time() - 60})
    r = nilmd(*args)
    assert r.returncode == status.CRITICAL and "dead" in r.stdout
    assert nilmd("status", "--redis-port", "1").returncode == status.UNKNOWN


def test_status_json_has_numbers_as_numbers_and_is_json_when_redis_is_down(redis_server, redis_client):
    building = "42"  # an id that looks like a number stays a string
    redis_client.hset(keys.status_key(building), mapping={
        "state": "running", "updated_at": time.time(), "status_interval_s": 2, "building_id": building,
        "samples_received": 17, "last_inference_ms": 6.25, "degraded_reason": "", "last_sample_ts": "nan"})
    r = nilmd("status", "--json", "--redis-port", str(redis_server.port), "--building-id", building)
    out = json.loads(r.stdout)
    assert r.returncode == status.OK and out["exit_code"] == status.OK and out["verdict"] == "running"
    assert out["samples_received"] == 17 and out["last_inference_ms"] == 6.25 and out["status_interval_s"] == 2
    assert out["building_id"] == "42" and out["state"] == "running" and out["degraded_reason"] == ""
    assert out["last_sample_ts"] == "nan", "JSON has no NaN: an unreadable number stays the text it was"
    down = nilmd("status", "--json", "--redis-port", "1")
    assert down.returncode == status.UNKNOWN
    out = json.loads(down.stdout)
    assert out["exit_code"] == status.UNKNOWN and "cannot read the status" in out["verdict"]


def help_of(*command) -> str:
    r = nilmd(*command, "--help")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_every_subcommand_says_what_it_does_and_its_flags_read_well():
    for command in ("run", "check", "export", "status", "watch", "report", "produce"):
        text = help_of(command)
        description = text.split("\n\n")[1]
        assert not description.startswith(("options:", "  -h")), f"nilmd {command} --help has no description"
        assert "see README" not in text, command
        assert not re.findall(r" (?:STR|INT|FLOAT|PATH|BOOL)\b", text), f"{command}: type names as metavars"
    run = help_of("run")
    for title in ("Redis:", "This building:", "Models and inference:", "Supervision:",
                  "Prometheus and Home Assistant (off by default):"):
        assert f"\n{title}\n" in run, f"run --help has no group {title!r}"
    assert "--model-dir DIR" in run and "./checkpoints if it exists" in run
    produce = help_of("produce")
    for daemon_only in ("--leases", "--shard", "--instance-name", "--building-ids", "--window-size"):
        assert daemon_only not in produce, daemon_only
    assert "--building-ids" in help_of("status") and "--leases" not in help_of("status")


def test_judge_tells_dead_from_alive():
    now = 1000.0
    assert status.judge({}, now)[0] == status.UNKNOWN
    assert status.judge({"state": "running", "updated_at": "999", "status_interval_s": "2"}, now)[0] == status.OK
    assert status.judge({"state": "running", "updated_at": "980", "status_interval_s": "2"}, now)[0] == status.CRITICAL
    assert status.judge({"state": "stopped", "updated_at": "999", "status_interval_s": "2"}, now)[0] == status.CRITICAL
    assert status.judge({"state": "degraded", "updated_at": "999", "status_interval_s": "2"}, now)[0] == status.WARNING


@pytest.mark.slow
def test_mode_test_prints_predictions_with_truth_without_redis(model_dir, tmp_path):
    """The README's first command: predictions within seconds, no Redis anywhere."""
    import os
    import signal

    env = {**os.environ, "REDIS_PORT": "1", "NILMD_RUNTIME_DIR": str(tmp_path), "NILMD_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nilmd", "run", "--mode", "test", "--model-dir", str(model_dir),
                             "--window-size", "512", "--inference-interval", "30", "--speed", "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        lines = []
        t0 = time.monotonic()
        while len(lines) < 3:
            line = proc.stdout.readline()
            assert line, f"test mode ended early: {proc.stderr.read()[-2000:]}"
            lines.append(json.loads(line))
        assert time.monotonic() - t0 < 30
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(20)
    assert rc == 0
    for p in lines:
        assert [e["appliance"] for e in p["predictions"]] == list(APPLIANCES)
        assert set(p["truth"]) == set(APPLIANCES)
    ends = [p["window_end"] for p in lines]
    assert all(b - a == 30 for a, b in zip(ends, ends[1:])), ends
    assert list(tmp_path.glob("nilmd-*")) == []


def test_the_contract_documents_every_setting_and_every_rule():
    from nilmd.daemon.ingest import REJECT_REASONS, REPAIR_REASONS

    contract = (ROOT / "docs" / "CONTRACT.md").read_text()
    for s in config.SETTINGS:
        for name in s.env + ((s.flag,) if s.flag else ()):
            assert f"`{name}`" in contract, f"docs/CONTRACT.md does not document {name}"
    for reason in REJECT_REASONS + REPAIR_REASONS:
        assert f"`{reason}`" in contract, f"docs/CONTRACT.md does not document the input rule {reason}"


def _collect(pubsub, n, timeout=20.0):
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.2)
        if msg is not None:
            out.append(json.loads(msg["data"]))
    return out


def test_produce_simulation_and_csv(redis_server, redis_client, tmp_path):
    building = f"p{int(time.time() * 1000)}"
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.input_channel(building))
    wait_for(lambda: pubsub.get_message(timeout=0.1) is None and redis_client.pubsub_numsub(
        keys.input_channel(building))[0][1] == 1, 5, "the test's subscription")
    base = ("produce", "--redis-port", str(redis_server.port), "--building-id", building)
    r = nilmd(*base, "--source", "simulation", "--speed", "1000", "--count", "50", "--fields", "power")
    assert r.returncode == 0, r.stderr
    got = _collect(pubsub, 50)
    assert len(got) == 50 and all(set(m) == {"timestamp", "power_total"} for m in got)
    ts = [m["timestamp"] for m in got]
    assert all(b - a == 1.0 for a, b in zip(ts, ts[1:])) and ts[-1] <= time.time()
    csv = tmp_path / "meter.csv"
    csv.write_text("Time,Aggregate,Kettle\n2013-10-01 00:00:00,250,0\n2013-10-01 00:01:00,2600,2400\n"
                   "oops,1,1\n2013-10-01 00:02:00,240,0\n")
    r = nilmd(*base, "--source", str(csv), "--speed", "10000", "--timestamps", "file")
    assert r.returncode == 0, r.stderr
    rows = _collect(pubsub, 3)
    assert [m["power_total"] for m in rows] == [250.0, 2600.0, 240.0]
    assert rows[1]["timestamp"] - rows[0]["timestamp"] == 60.0
    assert "line 4 skipped" in r.stderr
    missing = nilmd(*base, "--source", str(tmp_path / "nope.csv"))
    assert missing.returncode == 1 and missing.stderr.startswith("nilmd: error: --source")


@pytest.mark.parametrize("day, says", [("9999-12-31", "too late a date"), ("0001-01-01", "before 1970-01-01"),
                                       ("2024-02-30", "is not a date")])
def test_report_days_out_of_range_are_one_line_before_redis(day, says):
    """Issue 23, defect 8: no traceback (OverflowError), no "Redis refused" for a bad date."""
    out = nilmd("report", "--day", day, "--building-id", "x", "--redis-port", "1")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and says in lines[0] and "Redis" not in lines[0], out.stderr
