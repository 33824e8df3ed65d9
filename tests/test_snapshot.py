"""Ring snapshots (issue 6): the file format, atomic writes, what is refused and why, the
schedule after a restore, and the real daemon restarting warm on pub/sub."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import numpy as np
import pytest

from conftest import aligned_start, publish_samples, wait_for
from nilmd.daemon import snapshot
from nilmd.config import Config
from nilmd.daemon.control import ControlBlock
from nilmd.features import N_FEATURES
from nilmd.daemon.ringbuffer import RingBuffer
from test_daemon import Subscriber, wait_ready


def make(n=300, t0=1_700_000_000.0, window_end_ts=math.nan, position=None) -> snapshot.Snapshot:
    rng = np.random.default_rng(0)
    return snapshot.Snapshot(ts=t0 + np.arange(n, dtype=np.float64), flags=(rng.random(n) < 0.1).astype(np.uint8),
                             features=rng.random((n, N_FEATURES), dtype=np.float32), created=t0 + n,
                             window_end_ts=window_end_ts, position=position)


@pytest.fixture
def shm(tmp_path):
    ring = RingBuffer.create(str(tmp_path / "r.ring"), 1024, N_FEATURES)
    ctl = ControlBlock.create(str(tmp_path / "r.ctl"))
    yield ring, ctl
    ring.close()
    ctl.close()


def cfg_for(tmp_path, **kw) -> Config:
    return Config(building_id="snap", window_size=256, inference_interval=16, ring_capacity=1024,
                  state_dir=str(tmp_path / "state"), **kw)


def test_round_trip_keeps_every_bit():
    s = make(window_end_ts=1_700_000_100.0, position=(1706198400123, 7))
    back = snapshot.decode(snapshot.encode(s), N_FEATURES)
    for name in ("ts", "flags", "features"):
        np.testing.assert_array_equal(getattr(back, name), getattr(s, name))
    assert (back.created, back.window_end_ts, back.position) == (s.created, s.window_end_ts, s.position)
    assert snapshot.decode(snapshot.encode(make()), N_FEATURES).position is None


def test_a_torn_or_damaged_file_is_refused_with_the_reason():
    data = snapshot.encode(make())
    for cut in (0, 10, 47, len(data) // 2, len(data) - 1):
        with pytest.raises(snapshot.SnapshotError, match="not a snapshot|truncated"):
            snapshot.decode(data[:cut], N_FEATURES)
    for offset in (60, len(data) // 2, len(data) - 9):  # one flipped bit anywhere after the header
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        with pytest.raises(snapshot.SnapshotError, match="checksum"):
            snapshot.decode(bytes(damaged), N_FEATURES)
    with pytest.raises(snapshot.SnapshotError, match="bad magic"):
        snapshot.decode(b"X" + data[1:], N_FEATURES)
    with pytest.raises(snapshot.SnapshotError, match="version"):
        snapshot.decode(data[:8] + (99).to_bytes(4, "little") + data[12:], N_FEATURES)
    with pytest.raises(snapshot.SnapshotError, match="features per sample"):
        snapshot.decode(data, N_FEATURES + 1)


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "state" / "x.snapshot")
    snapshot.write_atomic(path, b"first")
    snapshot.write_atomic(path, b"second")
    assert open(path, "rb").read() == b"second"
    assert os.listdir(tmp_path / "state") == ["x.snapshot"]


def test_recent_enough_rule(tmp_path):
    s = make(t0=1_700_000_000.0)  # newest sample at ...299
    now = s.newest
    pubsub, stream = cfg_for(tmp_path), cfg_for(tmp_path, input_mode="stream")
    assert snapshot.unusable(s, pubsub, now + 60) is None
    assert "more than --max-gap-fill" in snapshot.unusable(s, pubsub, now + 61)
    assert "more than --max-gap-fill" in snapshot.unusable(s, stream, now + 3600)  # no position: nothing continues it
    with_position = make(t0=1_700_000_000.0, position=(1, 1))
    assert snapshot.unusable(with_position, stream, now + 3600) is None  # the stream's backlog continues it
    assert "in the future" in snapshot.unusable(s, pubsub, now - 301)


@pytest.mark.parametrize("window_end, expected", [
    (1_700_000_000.0 + 283, 256),  # inside (kept: +28..+299): the schedule goes on after it
    (1_700_000_000.0 + 400, 272),  # after the newest kept sample: everything kept was predicted
    (1_700_000_000.0 + 2, 0),  # before what is kept: that window is gone, predict the newest at once
    (math.nan, 0),  # never predicted
])
def test_restore_fills_the_ring_and_sets_the_schedule(shm, window_end, expected):
    ring, ctl = shm
    s = make(n=300, window_end_ts=window_end, position=(5, 6))
    assert snapshot.restore(s, ring, ctl, keep=272) == 272
    w = ring.window(272)
    np.testing.assert_array_equal(w.ts, s.ts[-272:])
    np.testing.assert_array_equal(w.features, s.features[-272:])
    del w
    assert ctl["last_window_end"] == expected
    assert (ctl["input_pos_ms"], ctl["input_pos_seq"], ctl["restored_samples"]) == (5, 6, 272)


def test_take_then_restore_is_the_same_ring_tail(shm, tmp_path):
    ring, ctl = shm
    s = make(n=600)
    ring.write(s.ts, s.features, s.flags)
    ctl["last_window_end"] = 590  # the inference's last window ended at ring index 590
    taken = snapshot.take(ring, ctl, keep=272)
    assert len(taken) == 272 and taken.window_end_ts == s.ts[589]
    fresh = RingBuffer.create(str(tmp_path / "fresh.ring"), 1024, N_FEATURES)
    fresh_ctl = ControlBlock.create(str(tmp_path / "fresh.ctl"))
    snapshot.restore(snapshot.decode(snapshot.encode(taken), N_FEATURES), fresh, fresh_ctl, keep=272)
    assert fresh_ctl["last_window_end"] == 272 - 10  # the same window, in the new ring's numbering
    fresh.close()
    fresh_ctl.close()


def test_restore_at_start_says_why_it_did_not(shm, tmp_path, caplog):
    ring, ctl = shm
    cfg = cfg_for(tmp_path)
    log = logging.getLogger("test.snapshot")
    caplog.set_level(logging.INFO, logger="test.snapshot")
    assert snapshot.restore_at_start(cfg, ring, ctl, log) == 0
    assert "no ring snapshot" in caplog.text
    path = snapshot.path_for(cfg)
    snapshot.write_atomic(path, snapshot.encode(make(t0=time.time() - 1000)))
    stale_tmp = os.path.join(cfg.state_dir, f".{os.path.basename(path)}.4242.tmp")
    open(stale_tmp, "wb").write(b"half-written by a killed process")
    assert snapshot.restore_at_start(cfg, ring, ctl, log) == 0
    assert "ignored: its newest sample is" in caplog.text
    assert not os.path.exists(stale_tmp)
    data = bytearray(snapshot.encode(make(t0=time.time() - 300)))
    data[100] ^= 1
    snapshot.write_atomic(path, bytes(data))
    assert snapshot.restore_at_start(cfg, ring, ctl, log) == 0
    assert "ignored: checksum mismatch" in caplog.text
    snapshot.write_atomic(path, snapshot.encode(make(t0=time.time() - 300)))
    assert snapshot.restore_at_start(cfg, ring, ctl, log) == 272
    assert ring.counters() == (272, 0)


def test_writer_logs_one_line_per_cause_and_keeps_counting(shm, tmp_path, caplog):
    """A state directory that cannot be written (here: a path through a plain file, so it works
    for root too) costs the warm restart and one log line, never the daemon."""
    ring, ctl = shm
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cfg = cfg_for(tmp_path).replace(state_dir=str(blocker / "state"))
    s = make(n=300)
    log = logging.getLogger("test.writer")
    caplog.set_level(logging.INFO, logger="test.writer")
    writer = snapshot.Writer(cfg, ring, ctl, log)
    for i in range(3):
        ring.write(s.ts[i * 100:(i + 1) * 100], s.features[i * 100:(i + 1) * 100], s.flags[i * 100:(i + 1) * 100])
        assert writer.write() is False
    assert ctl["snapshot_failures"] == 3
    assert caplog.text.count("cannot write the ring snapshot") == 1
    writer.path = snapshot.path_for(cfg_for(tmp_path))  # the disk is back
    assert writer.write() is True
    assert "work again" in caplog.text and ctl["snapshot_ts"] > 0
    assert len(snapshot.load(writer.path, N_FEATURES)) == 272
    before = os.stat(writer.path).st_mtime_ns
    time.sleep(0.01)
    assert writer.write() is True and os.stat(writer.path).st_mtime_ns == before  # nothing new: spared


@pytest.mark.slow
def test_pubsub_daemon_restarts_warm_on_the_same_schedule(daemon_factory, redis_client):
    """Lost: only what was published while no daemon was subscribed (pub/sub is at-most-once).
    After a restart the window is full at once (the snapshot written at SIGTERM) and predictions
    go on with the next window of the old schedule: none repeated, none skipped."""
    one = daemon_factory().start()
    b = one.building
    sub = Subscriber(redis_client, b)
    wait_ready(one, redis_client)
    t0 = aligned_start(time.time() - 300, 256, 16)  # the first window ends at t0 + 255
    last = publish_samples(redis_client, b, 256 + 16 + 5, start=t0)
    sub.until(t0 + 255 + 16)
    assert one.stop() == 0
    two = daemon_factory()
    two.building, two.env["BUILDING_ID"] = b, b
    started = time.monotonic()
    two.start()
    wait_ready(two, redis_client)
    s = two.status(redis_client)
    assert s["restored_samples"] == "272" and s["buffer_fill"] == "256" and s["state"] == "running"
    publish_samples(redis_client, b, 20, start=last + 1)
    first = sub.next()
    ttfp = time.monotonic() - started
    assert first["window_end"] == t0 + 255 + 32, "the next window of the old schedule"
    assert [json.loads(m)["window_end"] for m in sub.received] == [t0 + 255, t0 + 271, t0 + 287]
    assert "warm restart: restored 272 samples" in two.log()
    print(f"time to first prediction after a warm restart: {ttfp:.1f} s")
    assert two.stop() == 0


def test_writer_snapshots_periodically_only_when_there_is_new_data(shm, tmp_path):
    """The periodic snapshot (what a power cut leaves): every interval, and only if the ring moved."""
    ring, ctl = shm
    now = [1000.0]
    writer = snapshot.Writer(cfg_for(tmp_path), ring, ctl, logging.getLogger("test.periodic"), interval=60.0,
                             clock=lambda: now[0])
    s = make(n=600)
    ring.write(s.ts[:300], s.features[:300], s.flags[:300])
    writer.maybe()
    assert not os.path.exists(writer.path), "written before the interval passed"
    now[0] += 60.0
    writer.maybe()
    assert snapshot.load(writer.path, N_FEATURES).newest == s.ts[299]
    ring.write(s.ts[300:], s.features[300:], s.flags[300:])
    now[0] += 30.0
    writer.maybe()
    assert snapshot.load(writer.path, N_FEATURES).newest == s.ts[299]
    now[0] += 30.0
    writer.maybe()
    assert snapshot.load(writer.path, N_FEATURES).newest == s.ts[599]


def test_a_meter_clock_behind_the_box_does_not_decide_the_warm_restart(tmp_path):
    """The rule compares the box's clock with itself (when the newest sample was received), so a
    meter stamping 180 s behind restores after a 5-s restart, and a long stop is still refused."""
    box_now = 1_700_000_000.0
    behind = make(t0=box_now - 180 - 300)  # newest stamped 181 s before the box's clock
    cfg = cfg_for(tmp_path)
    fresh = snapshot.Snapshot(behind.ts, behind.flags, behind.features, created=box_now - 5, arrived=box_now - 5)
    assert snapshot.unusable(fresh, cfg, box_now) is None
    long_stop = snapshot.Snapshot(behind.ts, behind.flags, behind.features, created=box_now - 600,
                                  arrived=box_now - 600)
    assert "received 600 s ago, more than --max-gap-fill" in snapshot.unusable(long_stop, cfg, box_now)
    back = snapshot.decode(snapshot.encode(fresh), N_FEATURES)
    assert back.arrived == box_now - 5
    v1 = snapshot._HEADER_V1.pack(snapshot.MAGIC, 1, len(behind), N_FEATURES, 0, behind.created, math.nan, 0, 0)
    v1 += snapshot.encode(behind)[snapshot._HEADER.size:-4]
    old = snapshot.decode(v1 + snapshot._TRAILER.pack(__import__("zlib").crc32(v1)), N_FEATURES)
    assert math.isnan(old.arrived) and "181 s old" in snapshot.unusable(old, cfg, box_now)  # version 1: as before


@pytest.mark.slow
def test_pubsub_warm_restart_with_a_meter_clock_180_s_behind(daemon_factory, redis_client):
    """Issue 12, defect 4, for real: a 1 Hz meter stamping 180 s behind the box, SIGTERM, a new
    daemon, the next sample 5 s after the snapshot's newest. Warm: the old schedule goes on."""
    one = daemon_factory().start()
    b = one.building
    sub = Subscriber(redis_client, b)
    wait_ready(one, redis_client)
    t0 = aligned_start(time.time() - 300 - 180, 256, 16)  # the first window ends at t0 + 255
    last = publish_samples(redis_client, b, 256 + 16 + 5, start=t0)
    sub.until(t0 + 255 + 16)
    assert one.stop() == 0
    two = daemon_factory()
    two.building, two.env["BUILDING_ID"] = b, b
    two.start()
    wait_ready(two, redis_client)
    assert "ignored" not in two.log() and two.status(redis_client)["restored_samples"] == "272"
    publish_samples(redis_client, b, 20, start=last + 5)
    assert sub.next()["window_end"] == t0 + 255 + 32, "the next window of the old schedule"
    wait_for(lambda: "warm restart continued: the first new sample is stamped 5 s after" in two.log(), 10,
             lambda: f"the reader to say the restored window was continued\n{two.log()[-2000:]}")
    assert two.status(redis_client)["gaps_broken"] == "0"
    assert two.stop() == 0
