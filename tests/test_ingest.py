"""Every input rule of docs/CONTRACT.md §6, as pure functions."""

import json
import math

import numpy as np
import pytest

from nilmd.features import derive
from nilmd.daemon.ingest import MAX_MESSAGE_BYTES, REJECT_REASONS, Grid, Rejected, parse_sample

NOW = 1_706_198_400.0


def reason(raw, skew=300.0):
    with pytest.raises(Rejected) as e:
        parse_sample(raw, NOW, skew)
    return e.value.reason


@pytest.mark.parametrize("raw, expected", [
    ("x" * (MAX_MESSAGE_BYTES + 1), "oversized"),
    ("{not json", "not_json"),
    (b"\xff\xfe", "not_json"),
    ("[1, 2]", "not_object"),
    ("3500", "not_object"),
    ('{"timestamp": 1706198400}', "missing_power"),
    ('{"power_total": null}', "missing_power"),
    ('{"power_total": "3500"}', "non_numeric"),
    ('{"power_total": true}', "non_numeric"),
    ('{"power_total": [1]}', "non_numeric"),
    ('{"power_total": NaN}', "non_finite"),
    ('{"power_total": Infinity}', "non_finite"),
    ('{"power_total": 1e999}', "non_finite"),
    ('{"power_total": 1' + "0" * 400 + "}", "non_finite"),
    ('{"power_total": 1e6}', "out_of_range"),
    ('{"power_total": -500}', "out_of_range"),
    ('{"power_total": 100, "timestamp": "now"}', "non_numeric"),
    ('{"power_total": 100, "timestamp": 12345}', "bad_timestamp"),
    ('{"power_total": 100, "timestamp": %f}' % (NOW + 3600), "future"),
])
def test_each_bad_message_has_its_reason(raw, expected):
    assert expected in REJECT_REASONS
    assert reason(raw) == expected


def test_minimal_sample_is_valid():
    s = parse_sample(json.dumps({"timestamp": NOW - 1, "power_total": 3500.0}), NOW, 300)
    assert (s.timestamp, s.power) == (NOW - 1, 3500.0)
    assert math.isnan(s.voltage) and math.isnan(s.current) and math.isnan(s.power_factor)
    assert s.repairs == ()


def test_repairs_keep_the_sample_and_say_why():
    s = parse_sample('{"power_total": -20, "voltage": "230"}', NOW, 300)
    assert s.power == 0.0 and s.timestamp == NOW
    assert set(s.repairs) == {"negative_power", "no_timestamp", "bad_optional_field"}
    assert math.isnan(s.voltage)


def test_full_sample_keeps_optional_fields():
    s = parse_sample(json.dumps({"timestamp": NOW, "power_total": 3500.0, "voltage": 230.0, "current": 15.2,
                                 "power_factor": 0.95}), NOW, 300)
    assert (s.voltage, s.current, s.power_factor) == (230.0, 15.2, 0.95)


def test_clock_skew_is_configurable():
    raw = json.dumps({"timestamp": NOW + 100, "power_total": 1.0})
    assert reason(raw, skew=60) == "future"
    assert parse_sample(raw, NOW, 300).timestamp == NOW + 100


class TestGrid:
    def test_first_sample_starts_a_run(self):
        p = Grid(60).place(NOW)
        assert p.slot == NOW and p.breaks and p.fill == 0

    def test_consecutive_and_rounding(self):
        g = Grid(60, last_slot=int(NOW))
        p = g.place(NOW + 1.4)
        assert (p.slot, p.fill, p.breaks) == (NOW + 1, 0, False)
        assert g.place(NOW + 1.6).slot == NOW + 2

    def test_duplicate_second_is_rejected_first_wins(self):
        g = Grid(60, last_slot=int(NOW))
        with pytest.raises(Rejected) as e:
            g.place(NOW + 0.3)
        assert e.value.reason == "duplicate"
        assert g.last_slot == NOW

    def test_older_sample_is_out_of_order(self):
        g = Grid(60, last_slot=int(NOW))
        with pytest.raises(Rejected) as e:
            g.place(NOW - 5)
        assert e.value.reason == "out_of_order"

    def test_short_gap_is_filled(self):
        p = Grid(60, last_slot=int(NOW)).place(NOW + 61)
        assert (p.fill, p.breaks) == (60, False)

    def test_long_gap_breaks_the_window(self):
        p = Grid(60, last_slot=int(NOW)).place(NOW + 62)
        assert (p.fill, p.breaks) == (0, True)


def test_derive_power_only_and_full():
    f = derive([1000.0, 0.0])
    assert f.dtype == np.float32 and f.shape == (2, 5)
    np.testing.assert_allclose(f[0], [1000.0, 0.0, 1000.0 / 230.0, 1000.0, 0.0], rtol=1e-6)
    full = derive([1000.0], voltage=[240.0], power_factor=[0.8])
    np.testing.assert_allclose(full[0], [1000.0, 750.0, 1250.0 / 240.0, 1250.0, 1.0], rtol=1e-5)
    vi = derive([1000.0], voltage=[250.0], current=[5.0])
    np.testing.assert_allclose(vi[0], [1000.0, 750.0, 5.0, 1250.0, 1.0], rtol=1e-5)
    bad = derive([1000.0], voltage=[1e9], current=[-3.0], power_factor=[7.0])
    np.testing.assert_allclose(bad[0], derive([1000.0])[0])
