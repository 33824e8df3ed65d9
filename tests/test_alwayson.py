"""The house's always-on load and "other" (docs/OPERATIONS.md, "Always on and other"): the
estimate from the ring, robust to gaps, and the fields of each prediction and the energy hash."""

from __future__ import annotations

import numpy as np
import pytest

from nilmd.daemon import alwayson, ledger
from nilmd.daemon.ringbuffer import FLAG_FILLED, FLAG_MEASURED, RingBuffer
from nilmd.features import N_FEATURES
from nilmd.models.prediction import make_prediction

DAY = 86400


def house(seconds: int, base: float = 120.0, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A day of 1 Hz power: `base` W always, a fridge cycling, loads in the evening."""
    rng = np.random.default_rng(seed)
    t = np.arange(seconds, dtype=np.float64)
    power = base + 90.0 * ((t // 900) % 2) + rng.normal(0, 2, seconds)
    power[(t % DAY > 18 * 3600) & (t % DAY < 22 * 3600)] += 1500.0
    return t, power


def test_a_low_percentile_of_the_last_day_is_the_base_load():
    t, p = house(DAY)
    assert alwayson.estimate(t, np.zeros(DAY, np.uint8), p, DAY) == pytest.approx(120.0, abs=5.0)


def test_gaps_filled_seconds_and_zero_readings_do_not_move_it():
    t, p = house(DAY)
    flags = np.zeros(DAY, np.uint8)
    full = alwayson.estimate(t, flags, p, DAY)
    keep = (t // 3600) % 3 != 0  # a third of the hours missing
    assert alwayson.estimate(t[keep], flags[keep], p[keep], DAY) == pytest.approx(full, abs=2.0)
    p2, flags2 = p.copy(), flags.copy()
    p2[:7200] = 0.0  # a meter without a reading for 2 hours
    p2[7200:9000], flags2[7200:9000] = 2000.0, FLAG_FILLED  # a held sample over a gap
    assert alwayson.estimate(t, flags2, p2, DAY) == pytest.approx(full, abs=2.0)
    assert alwayson.estimate(t, flags, p, 3 * DAY) == 0.0, "nothing in the last 24 h: 0"


def test_it_reads_the_ring_across_breaks_and_refreshes_by_meter_time(tmp_path):
    ring = RingBuffer.create(str(tmp_path / "ring"), 4 * 3600, N_FEATURES)
    try:
        t, p = house(3 * 3600)
        features = np.zeros((len(t), N_FEATURES), np.float32)
        features[:, 0] = p
        ring.write(t[:3600], features[:3600], np.full(3600, FLAG_MEASURED, np.uint8))
        ring.mark_break()  # a long gap: windows restart, the day's samples stay
        ring.write(t[3600:] + 600, features[3600:], np.full(len(t) - 3600, FLAG_MEASURED, np.uint8))
        ts, flags, power = ring.recent(DAY)
        assert len(ts) == len(t) and np.array_equal(power, p.astype(np.float32))
        track = alwayson.AlwaysOn()
        first = track.update(ring, float(ts[-1]))
        assert first == pytest.approx(120.0, abs=5.0)
        track.watts = -1.0  # not recomputed within REFRESH_S of meter time ...
        assert track.update(ring, float(ts[-1]) + 60) == -1.0
        assert track.update(ring, float(ts[-1]) + alwayson.REFRESH_S) == first  # ... and again after it
        assert track.update(ring, float(ts[-1]) - 3600) == first, "a clock set back recomputes"
    finally:
        ring.close()


def test_each_prediction_has_always_on_and_other_never_negative():
    agg = np.full(60, 1000.0, np.float32)
    power = np.stack([np.full(60, 700.0), np.full(60, 500.0)]).astype(np.float32)
    prob = np.ones((2, 60), np.float32)
    p = make_prediction(["HeatPump", "Dryer"], power, prob, np.array([0.5, 0.5]), agg, timestamp=1.0,
                        window_start=0.0, window_end=60.0, inference_ms=1.0, always_on=123.456)
    assert p["always_on_watts"] == 123.46 and p["other_watts"] == 0.0  # 1200 W of estimates under 1000 W
    p = make_prediction(["HeatPump"], power[:1], prob[:1], np.array([0.5]), agg, timestamp=1.0,
                        window_start=0.0, window_end=60.0, inference_ms=1.0)
    assert p["other_watts"] == 300.0 and p["always_on_watts"] == 0.0


def test_the_energy_hash_counts_them_like_appliances():
    p = {"predictions": [{"appliance": "Dryer", "power_watts": 600.0}], "always_on_watts": 120.0, "other_watts": 60.0,
         "total_power": 660.0}
    assert ledger.parts_wh(p, 60.0) == {"always_on": 2.0, "other": 1.0}
    assert ledger.parts_wh({"predictions": []}, 60.0) == {}, "an older daemon's prediction: nothing"
