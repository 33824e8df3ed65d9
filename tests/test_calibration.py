"""Per-run statistics behind the simulator-vs-tracebase table (nilmd.training.calibration)."""

from __future__ import annotations

import numpy as np
import pytest

from nilmd.training import calibration

RULE = (100.0, 30, 20)  # on at >= 100 W, runs under 30 s dropped, gaps up to 20 s bridged


def two_days() -> np.ndarray:
    p = np.zeros(2 * 86400, np.float32)
    p[:50] = 500.0                 # cut by the start of the array: counted, not measured
    p[1000:1120] = 2000.0          # 120 s at 2 kW with a 150 W tail, one gap bridged:
    p[1120:1130] = 0.0
    p[1130:1190] = 150.0           #   one run of 190 s
    p[1000] = 2600.0               #   with an inrush second
    p[5000:5010] = 3000.0          # 10 s: a spike, not a run
    p[90000:90600] = 200.0         # day 2: 10 min at 200 W
    return p


def test_run_quantities_whole_runs_only():
    q = calibration.run_quantities(two_days(), RULE)
    assert q.shape == (2, len(calibration.QUANTITIES))
    peak, mean_on, minutes, wh = q[0]
    assert peak == 2600.0
    assert mean_on == pytest.approx((2600 + 119 * 2000 + 60 * 150) / 180)
    assert minutes == pytest.approx(190 / 60)
    assert wh == pytest.approx((2600 + 119 * 2000 + 60 * 150) / 3600)
    assert q[1] == pytest.approx([200.0, 200.0, 10.0, 200 * 600 / 3600])


def test_run_quantities_drops_runs_touching_nan():
    p = two_days()
    p[90300] = np.nan
    assert len(calibration.run_quantities(p, RULE)) == 1


def test_run_sample_rates_and_summary():
    s = calibration.RunSample()
    s.add("house a", two_days(), RULE, full_days=2)
    s.add("device b", two_days()[:86400], RULE)  # not a whole day: runs, but no rate
    out = s.summary()
    assert out["n"] == (3, 2)  # 2 whole runs + 1 (the cut first run is in neither)
    assert out["runs/day"][0] == pytest.approx(3 / 2)
    assert out["runs per day used"][0] == pytest.approx(3 / 2)
    assert out["days used"] == (1.0,)
    assert out["run length (min)"][0] == pytest.approx(190 / 60)


def test_table_has_every_quantity_and_a_note():
    s = calibration.RunSample()
    s.add("house a", two_days(), RULE, full_days=2)
    lines = calibration.tracebase_table({"ElectricKettle": s}, {"ElectricKettle": {"WaterKettle"}},
                                        {"ElectricKettle": s, "HeatPump": s}, {"ElectricKettle"}, "houses")
    rows = [ln for ln in lines if ln.startswith("| ElectricKettle")]
    assert len(rows) == 1 + len(calibration.QUANTITIES) + 3
    note = [ln for ln in lines if ln.startswith("* ")]
    assert len(note) == 1 and "1.09×" in note[0] and "All within" in note[0]
    assert not any("HeatPump" in ln for ln in lines)  # no tracebase kind: no row
