"""Learning a house (nilmd.training.adapt): how labels are cut, what "on" means in a house, the keep
rule, and a real adaptation of a shipped checkpoint on a simulated house whose appliances differ
from the training houses'."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nilmd.features import derive  # noqa: E402
from nilmd.models import checkpoints  # noqa: E402
from nilmd.sim.simulator import Building  # noqa: E402
from nilmd.training import adapt  # noqa: E402
from nilmd.training.datasets import Series  # noqa: E402

DAY = adapt.DAY
T0 = 1_700_006_400  # a UTC midnight


def _series(days: float, appliance="ElectricKettle", t0=T0, labelled=None) -> Series:
    n = int(days * DAY)
    y = np.zeros(n, np.float32)
    valid = np.ones(n, bool) if labelled is None else labelled
    return Series("s", np.zeros((n, 5), np.float32), {appliance: y}, valid, info={"start": float(t0)})


@pytest.mark.parametrize("days,held", [(7, 2), (4, 1), (2, 1), (8, 2), (12, 3)])
def test_the_newest_whole_days_are_held_out_one_or_a_quarter(days, held):
    s = _series(days)
    at = adapt.held_out_from(s)
    assert at == (days - held) * DAY, (days, at / DAY)


@pytest.mark.parametrize("run_days,held", [((0, 1, 2, 4, 6), 3),   # 1 run in the least 2 days: 3 held out
                                          ((0, 1, 5, 6), 2),         # 2 in the least: as before
                                          ((0, 1, 2, 6), 2),         # none of up to half enough: the least
                                          ((3, 4, 6), 2)])           # 3 days would leave 1 to fit: the least
def test_more_newest_days_are_held_out_where_the_appliance_ran_too_rarely_in_them(run_days, held):
    s = _series(7)
    for d in run_days:
        s.targets["ElectricKettle"][d * DAY + 3600:d * DAY + 3600 + 180] = 2500.0
    assert adapt.held_out_from(s) == 5 * DAY  # without the appliance: the least
    assert adapt.held_out_from(s, "ElectricKettle") == (7 - held) * DAY


def test_under_two_days_more_of_the_newest_seconds_are_held_out_where_the_appliance_ran_too_rarely():
    s = _series(1)
    for hour in (2, 5, 8, 12, 20):  # one run in the newest quarter (from 18:00), two in the newest half
        s.targets["ElectricKettle"][hour * 3600:hour * 3600 + 180] = 2500.0
    assert adapt.held_out_from(s) == 18 * 3600
    assert adapt.held_out_from(s, "ElectricKettle") == 12 * 3600


def test_under_two_days_the_newest_quarter_of_the_labelled_seconds_is_held_out():
    labelled = np.zeros(DAY, bool)
    labelled[3600:3600 + 4000] = True  # 4000 labelled seconds inside one day
    at = adapt.held_out_from(_series(1, labelled=labelled))
    assert at == 3600 + 3000


def test_a_days_labels_starting_mid_day_count_the_days_they_touch():
    s = _series(3, t0=T0 + 12 * 3600)  # 72 h from noon: touches 4 UTC days
    at = adapt.held_out_from(s)
    assert (T0 + 12 * 3600 + at) % DAY == 0 and at == (3 * DAY - 12 * 3600), at / 3600


def test_a_kettle_under_the_usual_threshold_gets_the_houses_own_on():
    s = _series(1)
    s.targets["ElectricKettle"][1000:1150] = 1700.0
    assert adapt.house_on_threshold(s, "ElectricKettle") == 1000.0  # half of 1.7 kW, at the run rule's 1 kW floor
    s.targets["ElectricKettle"][1000:1150] = 2800.0
    assert adapt.house_on_threshold(s, "ElectricKettle") == 2000.0  # the usual one
    s.targets["ElectricKettle"][:] = 0.0
    assert adapt.house_on_threshold(s, "ElectricKettle") == 2000.0  # nothing ran: nothing to learn from


def _scores(f1, mae, energy):
    return adapt.Scores(f1=f1, mae_w=mae, energy_error=energy, kwh_per_day_true=1.0, kwh_per_day_pred=1.0, days=2)


@pytest.mark.parametrize("cand,kept", [
    ((0.80, 20.0, 0.20), True),     # better F1, energy as good
    ((0.80, 20.0, 0.40), False),    # better F1 bought with energy: the fridge that learnt to say off
    ((0.705, 10.0, 0.20), True),    # a tie in F1, lower MAE
    ((0.705, 28.0, 0.20), False),   # a tie in F1, an MAE 7 % lower: a tie on both, the shipped model stays
    ((0.705, 40.0, 0.20), False),   # a tie in F1, higher MAE
    ((0.60, 5.0, 0.10), False),     # worse F1
    ((float("nan"), 5.0, 0.1), False),
])
def test_kept_only_if_better_in_f1_without_worse_energy(cand, kept):
    shipped = _scores(0.70, 30.0, 0.25)
    got, why = adapt.decide(shipped, _scores(*cand))
    assert got is kept, why
    assert why


def test_too_few_runs_keeps_the_shipped_model_and_says_how_many():
    path = "checkpoints/" + checkpoints.checkpoint_filename("ElectricKettle")
    ck = checkpoints.load(path, "ElectricKettle")
    s = _series(3)
    s.targets["ElectricKettle"][1000:1150] = 2800.0  # one boil in the fit part, none held out
    out = adapt.adapt_appliance(ck, s, adapt.AdaptConfig(steps=5))
    assert not out.kept and out.checkpoint is None and not out.candidates
    assert (out.runs_fit, out.runs_heldout) == (1, 0)
    assert "ran 1 times in the fit part and 0 in the held-out part" in out.why


def simulated_house(seed: int = 3001):
    """A test house whose kettle (1.7 kW, ten boils a day) and fridge (60 W, 80-min cycle at half duty) are unlike
    the training houses' (2.3-3 kW kettles; 85-135 W fridges on 30-45-min cycles)."""
    b = Building(seed)
    apps = dict(b.house.appliances)
    apps["ElectricKettle"] = dataclasses.replace(apps["ElectricKettle"], power=1700.0, rate=10.0)
    fridge = apps["Refrigerator"]
    apps["Refrigerator"] = dataclasses.replace(fridge, power=60.0, shape={**fridge.shape, "slot_s": 80 * 60,
                                                                        "duty": 0.5})
    b.house = dataclasses.replace(b.house, appliances=apps)
    return b


@pytest.mark.slow
def test_a_simulated_fridge_unlike_the_training_ones_is_learnt_and_better_on_a_later_day():
    torch.set_num_threads(1)
    b = simulated_house()
    tr = b.trace(b.start, 3 * DAY)
    feats = derive(tr.power_total, tr.voltage, tr.current, tr.power_factor)
    a = "Refrigerator"
    ck = checkpoints.load("checkpoints/" + checkpoints.checkpoint_filename(a), a)
    lab, later = slice(0, 2 * DAY), slice(2 * DAY, None)
    s = adapt.appliance_series(a, int(b.start), feats[lab], np.ones(2 * DAY, bool), tr.appliances[a][lab])
    out = adapt.adapt_appliance(ck, s, adapt.AdaptConfig(steps=60, methods=("all",)))
    assert out.runs_fit >= 2 and out.runs_heldout >= 2
    assert out.kept, out.why
    assert out.adapted.f1 > out.shipped.f1 + 0.1, (out.adapted, out.shipped)
    rec = out.checkpoint.training["adapted"]
    assert rec["method"] == "all" and rec["steps"] == 60
    # A day neither the fine-tuning nor the decision saw.
    day3 = adapt.appliance_series(a, int(b.start) + 2 * DAY, feats[later], np.ones(DAY, bool), tr.appliances[a][later])
    before, after = adapt.score(ck, day3, adapt.AdaptConfig()), adapt.score(out.checkpoint, day3, adapt.AdaptConfig())
    assert after.f1 > before.f1 + 0.1, (before, after)
    assert not math.isnan(after.energy_error) and after.energy_error <= before.energy_error + 0.05
