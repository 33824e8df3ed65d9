"""Energy and events end to end (docs/CONTRACT.md §3.6, §3.7): the daemon with the shipped models on
a simulated house whose true runs are known, its inference process killed once mid-run
(the fixture `simulated_morning`, tests/conftest.py).

What the daemon counts is checked against what it published (exactly: the energy of the served
power, the runs its on-states imply under the documented hysteresis), and what it published
against the simulator's truth (as well as the models are: the tolerances are the measured
accuracy with a margin, docs/OPERATIONS.md, "Energy, events and the daily report")."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nilmd import keys
from nilmd.appliances import APPLIANCES, ON_THRESHOLD_W

pytestmark = pytest.mark.slow
INTERVAL, ON_N, ON_P, OFF_N = 60.0, 2, 0.9, 3  # the settings' defaults


def first_of_each_window(published: list[dict]) -> list[dict]:
    """A window published twice (the inference killed after PUBLISH, before it moved on) counts once."""
    seen, out = set(), []
    for p in published:
        if p["window_end"] not in seen:
            seen.add(p["window_end"])
            out.append(p)
    return out


def implied_runs(predictions: list[dict], appliance: str) -> list[tuple[float, float]]:
    """(start, end) of the runs the on-states imply, from the rule as docs/OPERATIONS.md states it: a run
    is confirmed by ON_N consecutive on intervals or one with probability >= ON_P, and over
    after OFF_N off intervals; it spans its first confirming stretch's start to its last on."""
    states = [(p["window_end"], e["is_on"], e["probability"]) for p in predictions
              for e in p["predictions"] if e["appliance"] == appliance]
    out, i = [], 0
    while i < len(states):
        j = i
        while j < len(states) and states[j][1]:
            j += 1
        stretch = states[i:j]
        if stretch and (len(stretch) >= ON_N or any(p >= ON_P for _, _, p in stretch)):
            start, end, k = stretch[0][0] - INTERVAL, stretch[-1][0], j
            while True:  # pauses shorter than OFF_N belong to the run
                gap = 0
                while k < len(states) and not states[k][1]:
                    gap, k = gap + 1, k + 1
                if gap >= OFF_N or k >= len(states):
                    break
                while k < len(states) and states[k][1]:
                    end, k = states[k][0], k + 1
            out.append((start, end))
            i = k
        else:
            i = max(j, i + 1)
    return out


def test_energy_is_what_was_published_once_per_interval(simulated_morning):
    m = simulated_morning
    predictions = first_of_each_window(m["published"])
    ends = [p["window_end"] for p in predictions]
    assert len(ends) == 6 * 3600 // 60 and np.all(np.diff(ends) == INTERVAL), "an interval lost across the kill"
    assert int(m["status"]["restarts_inference"]) == 1
    energy = {k.decode(): v.decode() for k, v in m["client"].hgetall(keys.energy_key(m["building"])).items()}
    assert energy["day"] == "2024-01-03" and energy["month"] == "2024-01" and energy["timezone"] == "UTC"
    for a in APPLIANCES:
        served = sum(e["power_watts"] for p in predictions for e in p["predictions"] if e["appliance"] == a) / 60
        assert float(energy[f"{a}:total_wh"]) == pytest.approx(served, rel=1e-6, abs=1e-3), a
        assert energy[f"{a}:today_wh"] == energy[f"{a}:month_wh"] == energy[f"{a}:total_wh"]
    history = m["client"].xrange(keys.predictions_stream(m["building"]))
    assert [json.loads(f[b"json"])["window_end"] for _, f in history] == ends


def test_one_run_is_one_pair_of_events(simulated_morning):
    m = simulated_morning
    predictions = first_of_each_window(m["published"])
    stored = [json.loads(f[b"json"]) for _, f in m["client"].xrange(keys.events_stream(m["building"]))]
    assert stored == m["events"], "the stream and the channel differ"
    for a in APPLIANCES:
        mine = [e for e in m["events"] if e["appliance"] == a]
        runs = implied_runs(predictions, a)
        starts = [(e["start"]) for e in mine if e["event"] == "start"]
        done = [(e["start"], e["end"]) for e in mine if e["event"] == "end"]
        open_at_the_end = runs[-1:] if runs and runs[-1][1] > predictions[-1]["window_end"] - OFF_N * INTERVAL else []
        assert done == [r for r in runs if r not in open_at_the_end], a
        assert starts == [s for s, _ in runs], a
        for e in mine:
            if e["event"] == "end":
                inside = [x for p in predictions if e["start"] < p["window_end"] <= e["end"]
                          for x in p["predictions"] if x["appliance"] == a]
                assert e["energy_wh"] == pytest.approx(sum(x["power_watts"] for x in inside) / 60, abs=2e-3)
                assert e["peak_w"] == max(x["power_watts"] for x in inside)
                assert e["duration_s"] == e["end"] - e["start"]


def true_runs(m, appliance: str, pause_s: float = OFF_N * INTERVAL) -> list[tuple[float, float]]:
    """The simulator's runs in the predicted span: seconds above the on threshold, pauses
    shorter than the hysteresis' merged."""
    tr = m["trace"]
    sl = slice(len(tr) - 6 * 3600, None)
    on = np.flatnonzero(tr.appliances[appliance][sl] > ON_THRESHOLD_W[appliance])
    if not len(on):
        return []
    cuts = np.flatnonzero(np.diff(on) > pause_s)
    first, last = np.r_[on[0], on[cuts + 1]], np.r_[on[cuts], on[-1]]
    return [(m["t0"] + a, m["t0"] + b + 1) for a, b in zip(first, last)]


@pytest.mark.parametrize("appliance", ["HeatPump", "ElectricKettle"])
def test_events_match_the_true_runs(simulated_morning, appliance):
    """Appliances whose runs the shipped models find on this house: each true run one event
    pair, its start and end within two intervals."""
    m = simulated_morning
    truth = true_runs(m, appliance)
    got = [(e["start"], e["end"]) for e in m["events"] if e["appliance"] == appliance and e["event"] == "end"]
    assert len(got) == len(truth) > 0, (got, truth)
    for (s, e), (ts, te) in zip(got, truth):
        assert abs(s - ts) <= 2 * INTERVAL and abs(e - te) <= 2 * INTERVAL, (got, truth)


@pytest.mark.parametrize("appliance", ["HeatPump", "Dishwasher", "ElectricKettle"])
def test_energy_is_within_five_percent_of_the_truth(simulated_morning, appliance):
    m = simulated_morning
    tr = m["trace"]
    true_wh = float(tr.appliances[appliance][len(tr) - 6 * 3600:].sum()) / 3600
    energy = float(m["client"].hget(keys.energy_key(m["building"]), f"{appliance}:total_wh"))
    assert energy == pytest.approx(true_wh, rel=0.05), (energy, true_wh)
