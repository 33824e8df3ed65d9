"""What the daily picture draws (nilmd.report.Day), checked without Redis: the span of the data,
a stack never above the meter, an open run as long as the predictions say, distinct colours.
The whole command against a daemon's streams is tests/test_report.py."""

from __future__ import annotations

import numpy as np
import pytest

from nilmd import report
from nilmd.appliances import APPLIANCES

START = 1704240000.0  # 2024-01-03 00:00 UTC


def day(n: int = 180, first_h: float = 12.0) -> report.Day:
    ends = START + first_h * 3600 + 60 * np.arange(1, n + 1)
    total = np.full(n, 1000.0)
    power = {"HeatPump": np.full(n, 700.0), "Television": np.full(n, 200.0)}
    power["HeatPump"][10] = 900.0  # 900 + 200 > 1000: over the meter in one interval
    return report.Day("b", "2024-01-03", "UTC", START, START + 86400, ends, np.full(n, 60.0), total, power,
                      always_on=np.full(n, 150.0))


def test_the_axis_spans_the_data_not_the_whole_day():
    d = day(n=180, first_h=12.0)  # 12:00-15:00
    assert d.shown() == (START + 12 * 3600, START + 15 * 3600)


def test_the_stack_never_rises_above_the_meter_and_other_fills_the_rest():
    d = day()
    power, other, scale = d.drawn()
    stack = sum(power.values())
    assert np.all(stack + other <= d.total + 1e-6) and np.all(other >= 0)
    assert scale[10] == pytest.approx(1000 / 1100) and np.all(np.delete(scale, 10) == 1.0)
    assert power["HeatPump"][10] / power["Television"][10] == pytest.approx(900 / 200), "scaled together"
    assert other[0] == pytest.approx(100.0) and other[10] == pytest.approx(0.0)
    assert d.energy_wh()["HeatPump"] == pytest.approx((179 * 700 + 900) / 60), "the bars keep what was counted"


def test_an_open_run_lasts_as_long_as_the_predictions_go():
    d = day()
    start = float(d.ends[100] - 60)
    opened = {"event": "start", "appliance": "HeatPump", "start": start, "end": None, "duration_s": 60.0,
              "energy_wh": 11.7, "peak_w": 700.0, "mean_probability": 0.9}
    run = d.open_run(opened)
    assert run["duration_s"] == d.ends[-1] - start == 80 * 60
    assert run["energy_wh"] == pytest.approx(80 * 700 / 60)
    assert report._run_line(run, report.days.zone("UTC")).startswith("13:40-(still on)  HeatPump  80 min  933 Wh")


def test_every_appliance_has_a_colour_of_its_own():
    assert set(report.COLORS) == set(APPLIANCES)
    colours = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in report.COLORS.values()]
    colours.append(tuple(int(report.OTHER_COLOR[i:i + 2], 16) for i in (1, 3, 5)))
    closest = min(np.abs(np.subtract(a, b)).sum() for i, a in enumerate(colours) for b in colours[i + 1:])
    assert closest > 90, "two colours too near to tell apart"


def test_the_picture_draws_a_short_day():
    pytest.importorskip("matplotlib", reason="the report extra: pip install 'nilmd[report]'")
    png = report.render(day())
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
