"""Durable input (issue 6): the reader on a real Redis Stream, in-process on a real ring for the
exact bookkeeping, and the real daemon for restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from conftest import ROOT, aligned_start, publish_samples, wait_for
from nilmd import keys
from nilmd.daemon import snapshot, streams
from nilmd.config import Config
from nilmd.daemon.control import ControlBlock
from nilmd.features import N_FEATURES
from nilmd.daemon.reader import Reader
from nilmd.daemon.ringbuffer import RingBuffer
from test_daemon import Subscriber, wait_ready


class Life:
    """One daemon life's shared memory (a fresh ring and control block), without the daemon: the
    real Reader runs in a thread on it, exactly as in its process."""

    def __init__(self, tmp_path, cfg: Config, name: str):
        self.cfg = cfg
        self.paths = {"ring": str(tmp_path / f"{name}.ring"), "ctl": str(tmp_path / f"{name}.ctl")}
        self.ring = RingBuffer.create(self.paths["ring"], cfg.ring_capacity, N_FEATURES)
        self.ctl = ControlBlock.create(self.paths["ctl"])

    def reader(self) -> Reader:
        return Reader(self.cfg, self.paths)

    def run_reader(self, until, what: str, timeout: float = 15.0) -> Reader:
        reader = self.reader()
        thread = threading.Thread(target=reader.run, daemon=True)
        thread.start()
        try:
            wait_for(until, timeout, what)
        finally:
            reader.alive = False
            thread.join(10)
        assert not thread.is_alive(), "the reader did not stop"
        return reader

    def ts(self) -> np.ndarray:
        head, segment = self.ring.counters()
        w = self.ring.window(head - segment)
        out = w.ts.copy()
        del w
        return out


@pytest.fixture
def stream_cfg(redis_server, tmp_path):
    return Config(redis_host="127.0.0.1", redis_port=redis_server.port, building_id=f"s{uuid.uuid4().hex[:10]}",
                  input_mode="stream", window_size=256, inference_interval=16, ring_capacity=1024,
                  state_dir=str(tmp_path / "state"), max_gap_fill=60)


def add(client, cfg, n, start):
    return publish_samples(client, cfg.building_id, n, start=start, to="stream")


def test_a_batch_in_the_ring_but_not_committed_is_read_again_and_counted_once(stream_cfg, redis_client, tmp_path):
    """Lost: nothing. A reader that dies after writing a batch into the ring and before recording
    its position makes the next reader read the batch again; the grid rejects every sample of it
    (the ring already has those seconds), so the ring holds each sample exactly once."""
    t0 = float(int(time.time()) - 1000)
    add(redis_client, stream_cfg, 100, t0)
    life = Life(tmp_path, stream_cfg, "a")
    first = life.reader()
    first.source.connect()
    batch = first.source.read(timeout=1.0)
    assert len(batch) == 100
    assert first.ingest(batch) == 100  # ...and it dies here, before source.commit()
    add(redis_client, stream_cfg, 20, t0 + 100)
    life.run_reader(lambda: life.ctl["samples_received"] == 220, "the restarted reader to read all 220 entries")
    assert life.ctl["samples_accepted"] == 120
    assert life.ctl["rejected_duplicate"] + life.ctl["rejected_out_of_order"] == 100
    np.testing.assert_array_equal(life.ts(), t0 + np.arange(120))
    last_id = redis_client.xrevrange(keys.input_stream(stream_cfg.building_id), count=1)[0][0]
    assert redis_client.get(keys.position_key(stream_cfg.building_id)) == last_id


def test_a_new_life_warms_up_from_the_stream_and_reads_everything_after_its_position(stream_cfg, redis_client,
                                                                                    tmp_path):
    """Lost: nothing. A new daemon without a snapshot reads the window that ends at the last entry
    processed before the restart (history: already predicted) and then every entry added while
    it was down; history_end tells the inference which windows not to predict again."""
    t0 = float(int(time.time()) - 2000)
    add(redis_client, stream_cfg, 300, t0)
    one = Life(tmp_path, stream_cfg, "one")
    # The very first run reads the newest window and one interval of what is there: all new to it.
    one.run_reader(lambda: one.ctl["samples_accepted"] == 272, "life 1 to take the newest 272 entries")
    assert one.ctl["history_end"] == 0 and one.ctl["input_resumed"] == 1
    os.unlink(snapshot.path_for(stream_cfg))  # (without the snapshot its reader wrote when it stopped)
    add(redis_client, stream_cfg, 50, t0 + 300)  # while the daemon is down
    # What the earlier run's inference left in the status hash: its last window ended at t0 + 287.
    redis_client.hset(keys.status_key(stream_cfg.building_id), "last_window_end", t0 + 287)
    two = Life(tmp_path, stream_cfg, "two")
    two.run_reader(lambda: two.ctl["samples_accepted"] == 272 + 50, "life 2: a window + an interval, and the 50 new")
    np.testing.assert_array_equal(two.ts(), t0 + 28 + np.arange(322))
    assert two.ctl["history_end"] == 287 - 28 + 1  # the inference's next window ends at t0 + 303, on schedule
    assert two.ctl["samples_received"] == 322


def test_a_snapshot_older_than_the_position_is_continued_from_the_stream(stream_cfg, redis_client, tmp_path):
    """Lost: nothing. The snapshot of a daemon killed 50 entries after it was written: the stream
    supplies those 50 (history, already predicted) and then what came after the restart."""
    t0 = float(int(time.time()) - 2000)
    add(redis_client, stream_cfg, 250, t0)
    one = Life(tmp_path, stream_cfg, "one")
    one.run_reader(lambda: one.ctl["samples_accepted"] == 250, "life 1 to take all 250 entries")  # snapshot at 250
    add(redis_client, stream_cfg, 50, t0 + 250)
    later = stream_cfg.replace(state_dir=str(tmp_path / "elsewhere"))  # its last snapshot never got written
    one.cfg = later
    one.run_reader(lambda: one.ctl["samples_accepted"] == 300, "life 1 to take 50 more")
    add(redis_client, stream_cfg, 30, t0 + 300)
    # what life 1's inference published: its last window ends at the history's last sample (without
    # that record nothing was predicted, and history_end stays 0: issue 23, defect 2)
    redis_client.hset(keys.status_key(stream_cfg.building_id), "last_window_end", t0 + 299)
    two = Life(tmp_path, stream_cfg, "two")
    assert snapshot.restore_at_start(stream_cfg, two.ring, two.ctl, two.reader().log) == 250
    two.run_reader(lambda: two.ctl["samples_accepted"] == 80, "life 2: 50 of history and 30 new")
    np.testing.assert_array_equal(two.ts(), t0 + np.arange(330))
    assert two.ctl["history_end"] == 300
    assert two.ctl["samples_received"] == 80


def test_stream_entries_that_are_not_samples_are_rejected_by_reason(stream_cfg, redis_client, tmp_path):
    """Lost: only the bad entries, each counted by reason; the position moves past them."""
    key = keys.input_stream(stream_cfg.building_id)
    t0 = float(int(time.time()) - 100)
    redis_client.xadd(key, {"data": json.dumps({"timestamp": t0, "power_total": 100.0})})
    redis_client.xadd(key, {"power_total": "100"})  # fields directly: not the documented format
    redis_client.xadd(key, {"data": b"\xff\xfe\x00garbage"})
    redis_client.xadd(key, {"data": "x" * 10000})
    redis_client.xadd(key, {"data": json.dumps({"timestamp": t0 + 1, "power_total": "NaN"})})
    redis_client.xadd(key, {"data": json.dumps({"timestamp": t0 + 2, "power_total": 120.0})})
    life = Life(tmp_path, stream_cfg, "a")
    life.run_reader(lambda: life.ctl["samples_received"] == 6, "all 6 entries to be counted")
    c = life.ctl
    assert (c["samples_accepted"], c["rejected_not_json"], c["rejected_oversized"], c["rejected_non_numeric"]) == \
        (2, 2, 1, 1)
    assert redis_client.get(keys.position_key(stream_cfg.building_id)) == redis_client.xrevrange(key, count=1)[0][0]


def test_produce_to_stream_and_both(redis_server, redis_client):
    building = f"p{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "REDIS_PORT": str(redis_server.port), "REDIS_HOST": "127.0.0.1", "BUILDING_ID": building}
    run = subprocess.run([sys.executable, "-m", "nilmd", "produce", "--to", "stream", "--count", "300",
                          "--speed", "100000", "--fields", "power", "--maxlen", "100"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    key = keys.input_stream(building)
    assert f"published 300 samples to {key}" in run.stderr
    assert 100 <= redis_client.xlen(key) < 300  # MAXLEN ~ trims whole nodes
    newest = json.loads(redis_client.xrevrange(key, count=1)[0][1][b"data"])
    assert set(newest) == {"timestamp", "power_total"}
    sub = redis_client.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(keys.input_channel(building))
    wait_for(lambda: redis_client.pubsub_numsub(keys.input_channel(building))[0][1] == 1, 5, "subscribe")
    run = subprocess.run([sys.executable, "-m", "nilmd", "produce", "--to", "both", "--count", "10",
                          "--speed", "100000"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    got = []
    wait_for(lambda: got.extend(m for m in iter(lambda: sub.get_message(timeout=0.05), None)) or len(got) >= 10, 10,
             "10 messages on the channel")
    assert [m["data"] for m in got[-10:]] == [e[1][b"data"] for e in redis_client.xrange(key)[-10:]]


@pytest.mark.slow
def test_stream_daemon_restarts_warm_and_loses_nothing(daemon_factory, redis_client):
    """Lost: nothing. Three lives of the daemon on one stream: entries added while it is down are
    all read by the next life; the window is full at once (from the snapshot, and without one from
    the stream); predictions carry on the same 16 s schedule with no window predicted twice or
    skipped."""
    env = {"NILMD_INPUT_MODE": "stream"}
    one = daemon_factory(extra_env=env).start()
    b = one.building
    sub = Subscriber(redis_client, b)
    wait_ready_stream(one, redis_client)
    t0 = aligned_start(time.time() - 1000, 256, 16)  # the first window ends at t0 + 255
    last = publish_samples(redis_client, b, 256 + 3 * 16 + 5, start=t0, to="stream")
    ends = [sub.until(t0 + 255 + 3 * 16)["window_end"]]
    assert one.stop() == 0

    def next_life(n_new, expect_restored):
        nonlocal last
        last = publish_samples(redis_client, b, n_new, start=last + 1, to="stream")  # while it is down
        d = daemon_factory(extra_env=env)
        d.building, d.env["BUILDING_ID"] = b, b
        d.start()
        s = wait_for(lambda: (lambda s: s if d.owns(s) and s.get("samples_accepted") == str(
            n_new + (272 if not expect_restored else 0)) else None)(d.status(redis_client)), 30,
                     lambda: f"all {n_new} new entries\n{d.log()[-2000:]}")
        assert int(s["restored_samples"]) == expect_restored and int(s["buffer_fill"]) == 256
        return d

    two = next_life(40, expect_restored=272)
    three_end = ends[-1] + 16 * ((last - ends[-1]) // 16)
    ends += [sub.until(three_end)["window_end"]]
    assert two.stop() == 0
    os.unlink(one.runtime_dir / "state" / f"nilmd-{b}.snapshot")
    three = next_life(40, expect_restored=0)
    assert "warm start from the stream: 272 entries" in three.log()
    ends += [sub.until(ends[-1] + 16 * ((last - ends[-1]) // 16))["window_end"]]
    got = [json.loads(m)["window_end"] for m in sub.received]
    assert got == list(np.arange(t0 + 255, ends[-1] + 1, 16)), "a window was skipped or predicted twice"
    assert three.stop() == 0


def wait_ready_stream(daemon, client, timeout=30.0):
    wait_for(lambda: (lambda s: daemon.owns(s) and s.get("state") in ("warming_up", "running") and
                      s.get("input_connected") == "1")(daemon.status(client)), timeout,
             lambda: f"daemon {daemon.building} to read its stream\n{daemon.log()[-2000:]}")


def _peak_rss_kb(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), from the kernel."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


@pytest.mark.slow
def test_huge_entries_never_enter_the_readers_memory(daemon_factory, redis_client):
    """Lost: only the oversized entries (rejected and counted, as before). 24 entries of 4 MiB
    land in the stream at once (one MULTI/EXEC), between valid samples: a reader that fetched
    whole batches would hold all 96 MiB at once. The reader fetches only their lengths, so its
    peak resident memory grows by less than two of them, and every valid sample is accepted."""
    d = daemon_factory(extra_env={"NILMD_INPUT_MODE": "stream"}).start()
    wait_ready_stream(d, redis_client)
    pid = int(d.status(redis_client)["pid_reader"])
    before = _peak_rss_kb(pid)
    t0 = float(int(time.time()) - 1000)
    huge = json.dumps({"timestamp": t0, "power_total": 1.0, "pad": "x" * (4 << 20)})
    pipe = redis_client.pipeline(transaction=True)
    for i in range(50):
        streams.add(pipe, d.building, json.dumps({"timestamp": t0 + i, "power_total": 500.0}))
    for _ in range(24):
        streams.add(pipe, d.building, huge)
    for i in range(50, 100):
        streams.add(pipe, d.building, json.dumps({"timestamp": t0 + i, "power_total": 500.0}))
    pipe.execute()
    wait_for(lambda: int(d.status(redis_client)["samples_accepted"]) == 100, 30,
             lambda: f"the 100 valid samples around the huge entries\n{d.log()[-2000:]}")
    s = d.status(redis_client)
    assert int(s["rejected_oversized"]) == 24 and int(s["pid_reader"]) == pid
    grown_mib = (_peak_rss_kb(pid) - before) / 1024
    assert grown_mib < 8, f"the reader's peak memory grew by {grown_mib:.0f} MiB reading 24 entries of 4 MiB"
    assert d.stop() == 0
