"""The shipped checkpoints are good: loaded by the daemon's loader, run by the daemon's Predictor on
a small fixed set of held-out simulated houses, each appliance's F1 must stay above the floor
written in checkpoints/README.md ("Floors used by the test"). A retrained checkpoint that
regresses fails here.

The set: five 16-hour days (07:00-23:00, winter) of the simulated TEST houses, never used in
training or validation, picked so that every appliance runs in it (together: 5 dryer, 7
dishwasher, 5 washing-machine runs, 8 oven sessions, ...); 288,000 samples, scored from the first
full daemon window of each day on. Streaming through Predictor.run gives the daemon's per-window
outputs (nilmd/training/evaluation.py; tests/test_training.py checks it). ~8 s on two idle cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nilmd.models import checkpoints
from nilmd.training import datasets, evaluation
from nilmd.appliances import APPLIANCES
from nilmd.models.predictor import Predictor

pytestmark = pytest.mark.slow

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
YEAR_START = 1704067200.0  # the simulator's default day 0 (2024-01-01)
FIXED_SET = ((3001, 15), (3001, 33), (3002, 36), (3003, 12), (3004, 12))  # (house seed, day)

# Per appliance: (F1 floor with every meter field, F1 floor with power_total only): the F1
# measured on this set minus 0.05, rounded down to 0.05, at most 0.90 (checkpoints/README.md,
# "Floors used by the test"; keep the two in sync).
FLOORS = {  # measured on FIXED_SET (full / power-only) with the shipped files, 2026-11-26 (2nd session) and after
    "HeatPump": (0.90, 0.85),        # 0.998 / 0.919
    "Dishwasher": (0.50, 0.35),      # 0.592 / 0.416 (4th session: trained on real houses, lower power-only here)
    "WashingMachine": (0.85, 0.55),  # 0.922 / 0.649 (4th session: real houses without semi-synthetic ones, lower here)
    "Dryer": (0.80, 0.60),           # 0.850 / 0.687 (3rd session: tracebase dryers + simulator)
    "Freezer": (0.55, 0.55),         # 0.630 / 0.635
    "Refrigerator": (0.55, 0.45),    # 0.610 / 0.533 (4th session: real houses without semi-synthetic ones)
    "ElectricOven": (0.75, 0.75),    # 0.808 / 0.808
    "Microwave": (0.75, 0.75),       # 0.838 / 0.838 (3rd session: trained on real houses; 4th: L1 loss)
    "ElectricKettle": (0.60, 0.50),  # 0.669 / 0.594 (4th session: real houses, 1 Hz windows only)
    "Computer": (0.75, 0.75),        # 0.845 / 0.804
    "Television": (0.70, 0.55),      # 0.779 / 0.610
}


@pytest.fixture(scope="module")
def shipped():
    loaded, errors = checkpoints.load_dir(CHECKPOINTS)
    if not loaded:
        pytest.fail(f"no loadable checkpoint in {CHECKPOINTS}: {errors}")
    return loaded, errors


@pytest.fixture(scope="module")
def scores(shipped):
    from nilmd.sim.simulator import HOUSE_SEEDS_TEST
    assert all(seed in HOUSE_SEEDS_TEST for seed, _ in FIXED_SET)
    loaded, _ = shipped
    test = [datasets.simulated(seed, YEAR_START + day * 86400 + 7 * 3600, 16 * 3600) for seed, day in FIXED_SET]
    predictor = Predictor(loaded)
    thresholds = {a: c.probability_threshold for a, c in loaded.items()}
    return {inputs: evaluation.evaluate(predictor, test, thresholds, inputs=inputs, mode="stream")
            for inputs in ("full", "power")}


def test_the_set_is_shipped_small_and_fusable(shipped):
    loaded, errors = shipped
    sizes = sum(Path(c.path).stat().st_size for c in loaded.values())
    assert sizes < 20e6, f"{sizes / 1e6:.1f} MB of checkpoints is too much for an edge box"
    hparams = {a: c.config for a, c in loaded.items()}
    assert len(set(map(repr, hparams.values()))) == 1, f"checkpoints differ in architecture: {hparams}"
    for c in loaded.values():
        assert c.training.get("code_version") and c.training.get("data") and c.metrics.get("validation")


@pytest.mark.parametrize("appliance", APPLIANCES)
def test_f1_floor(appliance, shipped, scores):
    _, errors = shipped
    if appliance in errors:
        pytest.skip(f"{appliance}: not shipped yet ({errors[appliance]})")
    for k, inputs in enumerate(("full", "power")):
        if FLOORS[appliance][k] is None:
            continue
        r = scores[inputs][appliance]
        assert r["f1"] >= FLOORS[appliance][k], (
            f"{appliance} F1 {r['f1']:.3f} with {inputs} input is below its floor {FLOORS[appliance][k]} "
            f"(precision {r['precision']:.3f}, recall {r['recall']:.3f}, MAE {r['mae_w']:.1f} W)")


# ------------------------------------------------------------------ real homes

# A small fixed set of real sub-metered data, committed under tests/data/real (cut from REFIT
# house 2 at 8 s and UK-DALE house 2 at 6 s, CC BY 4.0: checkpoints/README.md, "Data"): the last
# stretch of each house, which the shipped files' training used for validation only. Scored as
# scripts/evaluate.py scores real houses: power_total only, each second by the state published
# for its 60-s interval. Floors: measured minus 0.05, rounded down to 0.05, at most 0.90
# (checkpoints/README.md, "Floors used by the test"); None where the appliance barely runs.
REAL_SET = Path(__file__).resolve().parent / "data" / "real"
R, U = "REFIT_House2_8s_2015-01-11_2days.csv.gz", "UKDALE_House2_6s_2013-09-01.csv.gz"
REAL_FLOORS = {  # (file, appliance) -> F1 floor; measured with the shipped files, 4th session (aligned schedule)
    (R, "Dishwasher"): 0.50,      # 0.587
    (R, "WashingMachine"): 0.30,  # 0.389
    (R, "Refrigerator"): 0.60,    # 0.661
    (R, "Microwave"): 0.10,       # 0.165
    (U, "Dishwasher"): 0.75,      # 0.809
    (U, "Refrigerator"): 0.70,    # 0.752
    (U, "Microwave"): 0.60,       # 0.696 (0.840 on the old schedule: one day, few runs; the washing machine does not run that day: no floor)
}


@pytest.fixture(scope="module")
def real_scores(shipped):
    loaded, _ = shipped
    out = {}
    for path in sorted(REAL_SET.glob("*.csv.gz")):
        s = datasets.read_csv(path)
        have = {a: loaded[a] for a in s.targets if a in loaded}
        out[path.name] = evaluation.evaluate(Predictor(have), [s], {a: c.probability_threshold for a, c in have.items()},
                                             inputs="power", mode="stream", published=True)
    return out


@pytest.mark.parametrize("key", sorted(REAL_FLOORS), ids=lambda k: f"{k[1]}@{k[0].split('_')[0]}")
def test_real_home_f1_floor(key, real_scores):
    name, appliance = key
    r = real_scores[name][appliance]
    assert r["f1"] >= REAL_FLOORS[key], (
        f"{appliance} F1 {r['f1']:.3f} on the real set {name} is below its floor {REAL_FLOORS[key]} "
        f"(precision {r['precision']:.3f}, recall {r['recall']:.3f}, MAE {r['mae_w']:.1f} W)")
