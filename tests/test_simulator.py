"""The simulated building: deterministic random access, physics that adds up, valid input samples (docs/CONTRACT.md §3.2)."""

import math

import numpy as np
import pytest

from nilmd.appliances import APPLIANCES
from nilmd.sim.simulator import (DAY, HOUSE_SEEDS_TEST, HOUSE_SEEDS_TRAIN, HOUSE_SEEDS_VAL, Building,
                             Trace)

SEED = HOUSE_SEEDS_TRAIN[0]


@pytest.fixture(scope="module")
def week():
    """One January week of the first training house (heat pump season)."""
    b = Building(SEED)
    return b.trace(b.start, 7 * DAY)


def _fields(tr: Trace):
    return [tr.timestamp, tr.power_total, tr.voltage, tr.current, tr.power_factor,
            *tr.appliances.values()]


def test_slices_are_equal_whatever_the_chunking():
    b1, b2 = Building(SEED), Building(SEED)
    t = b1.start + DAY - 50  # straddles midnight, so spilled runs are covered too
    small, big = b1.trace(t, 100), b2.trace(t - 50, 200)
    for x, y in zip(_fields(small), _fields(big)):
        np.testing.assert_array_equal(x, y[50:150])
    # consecutive chunks across midnight (cached days and spills) equal one long fresh read
    b3, t = Building(SEED), b1.start + DAY - 10000
    chunks = [b3.trace(t + i * 7000, 7000) for i in range(3)]
    whole = Building(SEED).trace(t, 21000)
    np.testing.assert_array_equal(np.concatenate([c.power_total for c in chunks]), whole.power_total)


def test_dtypes_shapes_and_timestamps():
    b = Building(SEED)
    tr = b.trace(b.start + 10.4, 300)
    assert tr.timestamp.dtype == np.float64 and tr.timestamp[0] == b.start + 10
    assert np.all(np.diff(tr.timestamp) == 1.0)
    for x in (tr.power_total, tr.voltage, tr.current, tr.power_factor):
        assert x.dtype == np.float32 and x.shape == (300,)
    assert tuple(tr.appliances) == APPLIANCES
    assert all(v.dtype == np.float32 and v.shape == (300,) for v in tr.appliances.values())
    assert len(b.trace(b.start, 0).power_total) == 0


def test_seed_sets_are_disjoint():
    tr, va, te = map(set, (HOUSE_SEEDS_TRAIN, HOUSE_SEEDS_VAL, HOUSE_SEEDS_TEST))
    assert tr and va and te and not (tr & va or tr & te or va & te)


def test_houses_differ():
    a, b = Building(HOUSE_SEEDS_TRAIN[0]), Building(HOUSE_SEEDS_TEST[0])
    ka, kb = (x.house.appliances["ElectricKettle"] for x in (a, b))
    assert ka.power != kb.power and not np.allclose(ka.hours, kb.hours)
    assert not np.allclose(a.trace(a.start, 3600).power_total, b.trace(b.start, 3600).power_total)


def test_power_adds_up_and_electrics_are_consistent(week):
    apps = np.sum(list(week.appliances.values()), axis=0)
    rest = week.power_total - apps  # base load, unknown loads and noise
    assert np.all(week.power_total >= 0)
    assert np.percentile(rest, 1) > 0          # the always-on base load is under everything
    assert np.percentile(rest, 50) < 1000       # and the appliances explain the rest
    pf, v, i, p = week.power_factor, week.voltage, week.current, week.power_total
    assert np.all((pf > 0) & (pf <= 1))
    assert 200 < v.min() and v.max() < 260
    np.testing.assert_allclose(i, p / (pf * v), rtol=1e-3, atol=1e-3)  # I = S / V, S = P / PF


def test_every_appliance_runs_in_a_week(week):
    from nilmd.appliances import ON_THRESHOLD_W
    for name, p in week.appliances.items():
        assert (p > ON_THRESHOLD_W[name]).sum() > 0, name
        assert p.min() >= 0, name


def test_messages_are_spec_inputs():
    b = Building(SEED)
    tr = b.trace(b.start + 5 * 3600, 5)
    full, power = list(tr.messages()), list(tr.messages("power"))
    assert len(full) == len(power) == 5
    assert all(set(m) == {"timestamp", "power_total"} for m in power)
    for m in full:
        assert set(m) == {"timestamp", "power_total", "voltage", "current", "power_factor"}
        assert all(isinstance(x, float) and math.isfinite(x) for x in m.values())
        assert m["power_total"] >= 0 and 0 < m["power_factor"] <= 1
    assert [m["timestamp"] for m in full] == list(tr.timestamp)
    with pytest.raises(ValueError):
        next(tr.messages("bogus"))


def test_a_day_is_fast():
    import time
    b = Building(HOUSE_SEEDS_VAL[0])
    t = time.perf_counter()
    b.trace(b.start + 100 * DAY, DAY)
    assert time.perf_counter() - t < 1.0
