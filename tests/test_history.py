"""The input history (nilmd.history, nilmd.daemon.recorder): format, damage, retention, size, the
`nilmd history` command, and a real daemon that is SIGKILLed and restarted."""

from __future__ import annotations

import gzip
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import publish_samples, wait_for
from nilmd import csvfile, history
from nilmd.config import Config
from nilmd.daemon.recorder import Recorder
from nilmd.testing import PACKAGE_ROOT, role_processes, wait_gone

DAY = history.DAY_S
MIDNIGHT = 1704326400  # 2024-01-04 00:00 UTC
REAL_DAY = Path(__file__).resolve().parents[2] / "shared" / "data" / "aggregate-1s" / "GJW_House1" / \
    "4-POWER_REAL_FINE_2013-11-28_Dump.csv.gz"


def samples(t0: int, n: int, seed: int = 0, fields: int = 4):
    """n seconds from t0 as the meter's JSON would give them (2-4 decimals), optional fields or NaN."""
    rng = np.random.default_rng(seed)
    slots = np.arange(t0, t0 + n, dtype=np.int64)
    values = np.full((4, n), np.nan, dtype=np.float32)
    values[0] = np.round(rng.uniform(100, 3000, n), 2)
    if fields == 4:
        values[1] = np.round(rng.uniform(225, 240, n), 2)
        values[2] = np.round(values[0] / values[1] / 0.9, 3)
        values[3] = np.round(rng.uniform(0.8, 1.0, n), 4)
    return slots, values


def as_array(rec: history.Recorded) -> np.ndarray:
    return np.stack([rec.power_total, rec.voltage, rec.current, rec.power_factor])


def test_round_trip_across_midnight_with_holes_and_a_clock_set_back(tmp_path):
    slots, values = samples(MIDNIGHT - 200, 400)
    keep = np.ones(400, bool)
    keep[[5, 6, 7, 300]] = False  # a short hole stays in its block, NaN
    keep[100:180] = False  # a long one starts a new block
    values[1:, 250:260] = np.nan  # ten seconds without the optional fields
    slots, values = slots[keep], values[:, keep]
    for part in np.array_split(np.arange(len(slots)), 7):  # as the recorder's flushes would come
        history.append(tmp_path, "b.1", 1000, slots[part], values[:, part])
    # A meter set back 50 s: the seconds it sends again are replaced by the newer readings.
    again_slots, again = samples(MIDNIGHT + 150, 20, seed=1, fields=1)
    history.append(tmp_path, "b.1", 1000, again_slots, again)

    want = np.full((4, 400), np.nan, dtype=np.float32)
    want[:, slots - (MIDNIGHT - 200)] = values
    want[:, again_slots - (MIDNIGHT - 200)] = again  # whole samples: no voltage where the new one had none
    got = history.read(tmp_path, "b.1", MIDNIGHT - 200, MIDNIGHT + 200)
    assert got.t0 == MIDNIGHT - 200 and len(got) == 400 and got.power_total.dtype == np.float32
    np.testing.assert_array_equal(as_array(got), want)
    assert history.days(tmp_path, "b.1") == ["2024-01-03", "2024-01-04"]
    assert history.span(tmp_path, "b.1") == (MIDNIGHT - 200, MIDNIGHT + 199)

    for day in history.journal_days(tmp_path, "b.1"):
        assert history.compact(tmp_path, "b.1", day) > 0
    assert sorted(os.listdir(history.building_dir(tmp_path, "b.1"))) == ["2024-01-03.nilmh", "2024-01-04.nilmh"]
    np.testing.assert_array_equal(as_array(history.read(tmp_path, "b.1", MIDNIGHT - 200, MIDNIGHT + 200)), want)
    # A later writer (a restarted daemon) appends after the compacted day; its samples win.
    history.append(tmp_path, "b.1", 2000, np.array([MIDNIGHT]), np.array([[7.5], [230], [0.1], [0.5]], np.float32))
    assert history.read(tmp_path, "b.1", MIDNIGHT, MIDNIGHT + 1).power_total[0] == 7.5
    # Outside what was recorded: NaN, and a range in between reads only its part.
    assert np.isnan(history.read(tmp_path, "b.1", MIDNIGHT - 3 * DAY, MIDNIGHT - 2 * DAY).power_total).all()


def test_building_ids_that_are_dots_stay_inside_the_history_directory(tmp_path):
    for b in (".", "..", ".hidden"):
        d = Path(history.building_dir(tmp_path, b))
        assert d.parent == tmp_path / "history" and d.name.startswith("%2E")
        history.append(tmp_path, b, 1, *samples(MIDNIGHT, 3))
        assert history.span(tmp_path, b) == (MIDNIGHT, MIDNIGHT + 2)
    with pytest.raises(ValueError, match="not a building id"):
        history.building_dir(tmp_path, "../etc")


def test_a_torn_end_and_a_damaged_block_are_skipped_with_one_warning_each(tmp_path, caplog):
    slots, values = samples(MIDNIGHT, 30)
    for k in range(3):
        history.append(tmp_path, "b", 5, slots[10 * k:10 * k + 10], values[:, 10 * k:10 * k + 10])
    path = Path(history.building_dir(tmp_path, "b")) / "2024-01-04.5.journal"
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # killed in the middle of the last block's write
    caplog.set_level(logging.WARNING, "nilmd.history")
    got = history.read(tmp_path, "b", MIDNIGHT, MIDNIGHT + 30)
    np.testing.assert_array_equal(as_array(got)[:, :20], values[:, :20])
    assert np.isnan(got.power_total[20:]).all()
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    block = (len(data) - history._FILE.size) // 3
    assert caplog.records[0].getMessage() == f"history file {path}: a torn end of {block - 7} bytes skipped " \
        "(written when the writer was killed?)"

    caplog.clear()
    damaged = bytearray(data)
    damaged[history._FILE.size + block + 40] ^= 0xFF  # a flipped bit in the middle block's payload
    path.write_bytes(bytes(damaged))
    got = history.read(tmp_path, "b", MIDNIGHT, MIDNIGHT + 30)
    assert (~np.isnan(got.power_total)).nonzero()[0].tolist() == list(range(10)) + list(range(20, 30))
    assert len(caplog.records) == 1 and "1 damaged block skipped" in caplog.records[0].getMessage()

    caplog.clear()
    path.write_bytes(data[:-7])
    history.compact(tmp_path, "b", "2024-01-04")  # what the recorder does hourly: the torn end is gone
    assert len(caplog.records) == 1
    caplog.clear()
    np.testing.assert_array_equal(as_array(history.read(tmp_path, "b", MIDNIGHT, MIDNIGHT + 20)), values[:, :20])
    assert not caplog.records, "a compacted file reads without a warning"

    (path.parent / "2024-01-05.nilmh").write_bytes(b"not history at all")
    assert history.span(tmp_path, "b") == (MIDNIGHT, MIDNIGHT + 19)
    assert "not a nilmd history file" in caplog.records[-1].getMessage()


def test_days_older_than_the_setting_are_deleted_and_not_written(tmp_path):
    for k in range(5):
        history.append(tmp_path, "b", 1, *samples(MIDNIGHT + k * DAY, 10))
    now = MIDNIGHT + 4 * DAY + 3600  # 2024-01-08 01:00
    assert history.prune(tmp_path, "b", 2, now=now) == ["2024-01-04", "2024-01-05"]
    assert history.days(tmp_path, "b") == ["2024-01-06", "2024-01-07", "2024-01-08"]
    assert history.oldest_kept(2, now=now) == MIDNIGHT + 2 * DAY

    cfg = Config(state_dir=str(tmp_path / "state"), history_days=1)
    rec = Recorder(cfg, logging.getLogger("test.history"))
    old, new = time.time() - 3 * DAY, time.time() - 60
    rec.record("b", [_Sample(old), _Sample(new)], [_Placement(old), _Placement(new)])
    rec.close()
    got = history.read(cfg.state_dir, "b", old - 1, new + 1)
    assert np.count_nonzero(~np.isnan(got.power_total)) == 1 and got.power_total[-2] == 100.0


class _Sample:
    def __init__(self, t):
        self.power, self.voltage, self.current, self.power_factor = 100.0, 230.0, float("nan"), 0.9


class _Placement:
    def __init__(self, t):
        self.slot = int(t)


def _day_as_the_daemon_keeps_it(state_dir, slots, values) -> int:
    """Flushed every 2 s, folded every hour: the day file's size."""
    for h in range(24):
        hour = slice(h * 3600, (h + 1) * 3600)
        for part in np.array_split(np.arange(3600)[: len(slots[hour])], 1800):
            history.append(state_dir, "b", 1, slots[hour][part], values[:, hour][:, part])
        history.compact(state_dir, "b", history.day_of(slots[0]))
    return os.path.getsize(Path(history.building_dir(state_dir, "b")) / f"{history.day_of(slots[0])}.nilmh")


@pytest.mark.slow
def test_a_day_is_well_under_a_megabyte(tmp_path):
    """The simulator's meter (all four fields, with its noise), and a real 1 Hz meter's day."""
    from nilmd.sim.simulator import Building

    house = Building(3000)
    t0 = int(house.start) + 2 * DAY
    trace = house.trace(t0, DAY)
    values = np.stack([np.round(trace.power_total, 2), np.round(trace.voltage, 2), np.round(trace.current, 3),
                       np.round(trace.power_factor, 4)]).astype(np.float32)  # as its messages round them
    slots = np.arange(t0, t0 + DAY)
    full = _day_as_the_daemon_keeps_it(tmp_path / "full", slots, values)
    power = _day_as_the_daemon_keeps_it(tmp_path / "power", slots, np.where(np.arange(4)[:, None] == 0, values, np.nan))
    np.testing.assert_array_equal(as_array(history.read(tmp_path / "full", "b", t0, t0 + DAY)), values)
    sizes = f"simulated, four fields {full / 1e3:.0f} kB; power only {power / 1e3:.0f} kB"
    if REAL_DAY.exists():
        with gzip.open(REAL_DAY, "rt") as f:  # no header: "YYYY-MM-DD HH:MM:SS,W", logged on change
            rows = [line.split(",") for line in f]
        times = np.array([csvfile.parse_time(t) for t, _ in rows])
        start = int(times[0]) // DAY * DAY + DAY  # its first whole UTC day
        grid = np.arange(start, start + DAY)
        held = np.array([float(w) for _, w in rows], np.float32)[np.searchsorted(times, grid, side="right") - 1]
        real = _day_as_the_daemon_keeps_it(tmp_path / "real", grid, np.stack([held] + [np.full(DAY, np.nan)] * 3))
        sizes += f"; a real meter's day (GJW house 1, power only) {real / 1e3:.0f} kB"
    print(sizes)
    assert full < 800_000 and power < 300_000, sizes


def test_the_recorder_writes_every_flush_and_a_bad_state_dir_is_one_line(tmp_path, caplog):
    clock = [0.0]
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    cfg = Config(state_dir=str(blocker), history_days=14)
    rec = Recorder(cfg, logging.getLogger("test.recorder"), clock=lambda: clock[0])
    caplog.set_level(logging.INFO, "test.recorder")
    now = int(time.time()) - 100
    for k in range(3):
        rec.record("b1", [_Sample(now + k)], [_Placement(now + k)])
        rec.record("b2", [_Sample(now + k)], [_Placement(now + k)])
        clock[0] += 2.0
        rec.maybe()
        rec._job.result()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "cannot write the input history of b1" in errors[0].getMessage() \
        and "and 1 more this flush" in errors[0].getMessage(), [r.getMessage() for r in caplog.records]
    blocker.unlink()
    rec.record("b1", [_Sample(now + 3)], [_Placement(now + 3)])
    clock[0] += 2.0
    rec.maybe()
    rec._job.result()
    assert "works again" in caplog.records[-1].getMessage()
    assert history.read(str(blocker), "b1", now, now + 10).power_total[3] == 100.0
    rec.record("b1", [_Sample(now + 4)], [_Placement(now + 4)])
    rec.close()  # what is pending is written at the stop, without waiting for the flush
    assert history.span(str(blocker), "b1") == (now + 3, now + 4)


def test_the_command_lists_the_days_and_writes_one_as_csv_that_csvfile_reads(tmp_path):
    slots, values = samples(MIDNIGHT + 10, 50)
    values[1:, :5] = np.nan
    history.append(tmp_path, "b1", 1, slots, values)

    def nilmd(*args):
        env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
        env.pop("BUILDING_IDS", None)
        return subprocess.run([sys.executable, "-m", "nilmd", "history", "--building-id", "b1", "--state-dir",
                               str(tmp_path), *args], capture_output=True, text=True, env=env, timeout=60)

    listed = nilmd()
    assert listed.returncode == 0 and "2024-01-04" in listed.stdout and "50 s" in listed.stdout, listed
    out = tmp_path / "day.csv"
    wrote = nilmd("--day", "2024-01-04", "--out", str(out))
    assert wrote.returncode == 0, wrote.stderr
    table = csvfile.read(out)
    assert out.read_text().splitlines()[0] == "timestamp,power_total,voltage,current,power_factor"
    np.testing.assert_array_equal(table.time, slots)
    np.testing.assert_array_equal(table.power.astype(np.float32), values[0])
    for k, name in enumerate(history.FIELDS[1:], start=1):
        np.testing.assert_array_equal(table.meter[name].astype(np.float32), values[k])
    missing = nilmd("--day", "2024-01-09")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "no input history of b1 on 2024-01-09" \
        in missing.stderr
    bad = nilmd("--day", "yesterday")
    assert bad.returncode == 2 and "is not a date" in bad.stderr


# -- a real daemon -------------------------------------------------------------------------------
def _kill_everything(daemon, client) -> None:
    """SIGKILL the supervisor and its children at once: a power cut as far as the processes know."""
    procs = role_processes(daemon.status(client)).values()
    for p in procs:
        p.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    wait_gone(procs, 10, "the SIGKILLed processes to be gone (the reader's Redis connection with them)")
    daemon._log.close()


@pytest.mark.slow
def test_the_daemon_records_its_input_and_a_sigkill_loses_only_the_last_seconds(daemon_factory, redis_client):
    from test_daemon import wait_ready

    one = daemon_factory().start()
    b, state = one.building, one.env["NILMD_STATE_DIR"]
    wait_ready(one, redis_client)
    t0 = int(time.time()) - 600
    publish_samples(redis_client, b, 100, start=t0)  # a burst: all on disk within a flush or two

    def on_disk(n_from: int, n: int):
        return np.count_nonzero(~np.isnan(history.read(state, b, n_from, n_from + n).power_total)) == n
    wait_for(lambda: on_disk(t0, 100), 15, lambda: f"the first 100 samples in the history\n{one.log()[-2000:]}")
    np.testing.assert_array_equal(history.read(state, b, t0, t0 + 100).power_total[:3], [500.0, 500.0, 500.0])

    # Then about 10 samples a second for 6 s, and SIGKILL right after the last.
    sent_at = {}
    for k in range(60):
        publish_samples(redis_client, b, 1, start=t0 + 100 + k)
        sent_at[t0 + 100 + k] = time.monotonic()
        time.sleep(0.1)
    _kill_everything(one, redis_client)
    killed = time.monotonic()
    got = history.read(state, b, t0, t0 + 160)
    lost = [t for t in range(t0 + 100, t0 + 160) if np.isnan(got.power_total[t - t0])]
    assert not np.isnan(got.power_total[:100]).any()
    ages = [round(killed - sent_at[t], 1) for t in lost]
    assert all(age < 4.0 for age in ages), f"lost samples sent {ages} s before the kill"
    print(f"SIGKILL lost {len(lost)} of the last 60 samples (sent 10 a second; the oldest of them {max(ages, default=0)} s "
          "before the kill)")

    two = daemon_factory()
    two.building, two.env["BUILDING_ID"] = b, b
    two.start()
    wait_ready(two, redis_client)
    publish_samples(redis_client, b, 50, start=t0 + 200)
    wait_for(lambda: on_disk(t0 + 200, 50), 15,
             lambda: f"the restarted daemon's samples in the history\n{two.log()[-3000:]}\n{two.status(redis_client)}")
    assert two.stop() == 0
    after = history.read(state, b, t0, t0 + 250)
    np.testing.assert_array_equal(after.power_total[:160], got.power_total)  # what survived is all still there
    assert history.span(state, b) == (t0, t0 + 249)
    assert "Traceback" not in two.log()
