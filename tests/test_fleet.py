"""The many-building predictor (nilmd.models.fleet) == each building alone.

Every building has its own real ring, written at its own phase; every step's outputs are checked
against each model alone on the window the step was given (test_fused.assert_matches_models), so
the batched state can fail by mixing buildings, by a wrong circular row, or by a wrong chunk.
"""

from __future__ import annotations

import numpy as np
import pytest

from nilmd.appliances import APPLIANCES
from nilmd.models import checkpoints
from nilmd.models.fleet import FleetPredictor
from nilmd.models.model import WaveNILMConfig
from nilmd.models.predictor import Predictor
from test_fused import ROOT, assert_matches_models, make_checkpoints, one_thread  # noqa: F401 (autouse)
from test_incremental import SMALL, Meter


@pytest.fixture
def meters(tmp_path):
    made = []

    def make(n, capacity=160):
        for k in range(n):
            made.append(Meter(tmp_path / f"ring{len(made)}", capacity=capacity, seed=len(made)))
        return made[-n:]

    yield make
    for m in made:
        m.close()


def check(fleet: FleetPredictor, reference: Predictor, buildings: dict, size: int, new: int, names=None) -> None:
    names = list(buildings) if names is None else names
    windows = [buildings[b].ring.window(size) for b in names]
    got = fleet.step([(b, w, new) for b, w in zip(names, windows)])
    for b, w, (power, prob) in zip(names, windows, got):
        x = w.features.copy()
        assert buildings[b].ring.intact(w)
        assert_matches_models(reference, x, power, prob, last=new)
    del windows


@pytest.mark.parametrize("interval", [pytest.param(1, marks=pytest.mark.slow), 60])  # 1: hundreds of steps
def test_buildings_at_different_phases_step_together(meters, interval):
    ckpts = make_checkpoints({a: SMALL for a in APPLIANCES[:3]})
    fleet, reference = FleetPredictor(ckpts, slots=2), Predictor(ckpts)  # 2 slots: the pools grow
    size = 96
    buildings = {f"b{k}": m for k, m in enumerate(meters(5))}
    for k, m in enumerate(buildings.values()):
        m.write(size + 7 * k)  # each ring at another offset, so rows and wrap-arounds differ
    check(fleet, reference, buildings, size, interval)
    assert fleet.full_recomputes == 5 and fleet.buildings == 5
    fleet.reserve(40)  # room made ahead: the states already there are kept
    assert fleet.state_bytes() == 40 * FleetPredictor(ckpts, slots=1).state_bytes()
    for _ in range(200 if interval == 1 else 10):  # the 160-sample rings lap several times
        for m in buildings.values():
            m.write(interval)
        check(fleet, reference, buildings, size, interval)
    assert fleet.full_recomputes == 5  # only the first window of each


def test_a_late_building_a_break_and_a_forgotten_one(meters):
    ckpts = make_checkpoints({a: SMALL for a in APPLIANCES[:2]}, seed=4)
    fleet, reference = FleetPredictor(ckpts), Predictor(ckpts)
    size, step = 96, 10
    buildings = {f"b{k}": m for k, m in enumerate(meters(3))}
    for m in buildings.values():
        m.write(size)
    check(fleet, reference, buildings, size, step)
    # b1 is late: two intervals at once (continued, 2 x step samples fed), b2 broke (recomputed)
    buildings["b0"].write(step)
    buildings["b1"].write(2 * step)
    buildings["b2"].ring.mark_break()
    buildings["b2"].write(size)
    before = fleet.full_recomputes
    check(fleet, reference, buildings, size, step)
    assert fleet.full_recomputes == before + 1
    # b0 is no longer served; a new building takes its slot and must not inherit its state
    fleet.forget("b0")
    buildings["b3"] = buildings.pop("b0")
    for m in buildings.values():
        m.write(step)
    check(fleet, reference, buildings, size, step)
    assert fleet.buildings == 3 and fleet.full_recomputes == before + 2
    fleet.reset("b1")  # an overrun: recomputed next time, and still right
    for m in buildings.values():
        m.write(step)
    check(fleet, reference, buildings, size, step)
    assert fleet.full_recomputes == before + 3


def test_two_architectures_and_an_interval_longer_than_a_chunk(meters, monkeypatch):
    from nilmd.models import fleet as fleetmod

    monkeypatch.setattr(fleetmod, "CHUNK", 40)  # a full window of 96 is three passes, a step of 60 two
    monkeypatch.setattr(fleetmod, "ROWS", 100)  # and at most two buildings a pass
    configs = {a: SMALL for a in APPLIANCES[:4]}
    configs[APPLIANCES[2]] = WaveNILMConfig(channels=4, depth=4, head_channels=6)
    ckpts = make_checkpoints(configs, seed=2)
    fleet, reference = FleetPredictor(ckpts), Predictor(ckpts)
    assert len(fleet.groups) == 2
    buildings = {f"b{k}": m for k, m in enumerate(meters(3))}
    for k, m in enumerate(buildings.values()):
        m.write(96 + k)
    check(fleet, reference, buildings, 96, 60)
    for _ in range(4):
        for m in buildings.values():
            m.write(60)
        check(fleet, reference, buildings, 96, 60)
    assert fleet.full_recomputes == 3


@pytest.mark.slow
def test_shipped_checkpoints(meters):
    loaded, _ = checkpoints.load_dir(ROOT / "checkpoints")
    if not loaded:
        pytest.skip("no trained checkpoints in checkpoints/ yet")
    fleet, reference = FleetPredictor(loaded), Predictor(loaded)
    buildings = {f"b{k}": m for k, m in enumerate(meters(3, capacity=2048))}
    for k, m in enumerate(buildings.values()):
        m.write(1536 + 13 * k)
    check(fleet, reference, buildings, 1536, 60)
    for _ in range(3):
        for m in buildings.values():
            m.write(60)
        check(fleet, reference, buildings, 1536, 60)
    assert fleet.full_recomputes == 3
    # the state a building costs: its layers' histories and its newest 60 outputs, nothing else
    per_building = fleet.state_bytes() / 16
    assert per_building == 4 * len(loaded) * (sum(2**i for i in range(10)) * 16 + 2 * 60), per_building


@pytest.mark.parametrize("pieces", [[60], [1] * 60, [7, 23, 30], [59, 1]])
def test_samples_fed_early_leave_the_boundary_only_what_came_since(meters, pieces):
    """The daemon feeds samples as they arrive (advance) and asks for the interval at its boundary."""
    ckpts = make_checkpoints({a: SMALL for a in APPLIANCES[:3]}, seed=5)
    fleet, reference = FleetPredictor(ckpts, keep=60), Predictor(ckpts)
    buildings = {f"b{k}": m for k, m in enumerate(meters(3))}
    for k, m in enumerate(buildings.values()):
        m.write(96 + 5 * k)
    fleet.advance([(b, m.ring.window(96)) for b, m in buildings.items()])  # the first window, ahead of time
    assert fleet.full_recomputes == 3
    for _ in range(3):
        for n in pieces:
            for m in buildings.values():
                m.write(n)
            fleet.advance([(b, m.ring.window(96)) for b, m in buildings.items()])
        check(fleet, reference, buildings, 96, 60)  # nothing left to feed: the outputs kept
        check(fleet, reference, buildings, 96, 20)  # and again, fewer of them
    for m in buildings.values():  # the last sample arrives at the boundary itself
        m.write(1)
    check(fleet, reference, buildings, 96, 60)
    assert fleet.full_recomputes == 3


def test_bad_new_is_refused(meters):
    fleet = FleetPredictor(make_checkpoints({a: SMALL for a in APPLIANCES[:1]}), keep=10)
    (m,) = meters(1)
    m.write(96)
    with pytest.raises(ValueError, match="b: new=0"):
        fleet.step([("b", m.ring.window(96), 0)])
    with pytest.raises(ValueError, match=r"b: new=11 outside 1\.\.10"):
        fleet.step([("b", m.ring.window(96), 11)])


def test_an_adapted_building_steps_on_its_own_set_and_the_others_as_before(meters):
    """nilmd.models.fleet.AdaptedFleet: the adapted building == a Predictor over its adapted set;
    the shipped buildings == the shipped set, still one batch, whatever the adapted one does."""
    from nilmd.models.fleet import AdaptedFleet

    shipped = make_checkpoints({a: SMALL for a in APPLIANCES[:3]}, seed=6)
    own = make_checkpoints({a: SMALL for a in APPLIANCES[1:3]}, seed=7)  # two of the three adapted
    fleet = AdaptedFleet(shipped, slots=2)
    reference, adapted_reference = Predictor(shipped), Predictor({**shipped, **own})
    buildings = {f"b{k}": m for k, m in enumerate(meters(4))}
    assert fleet.place("b2", own) is None and fleet.sets == 1
    for k, m in enumerate(buildings.values()):
        m.write(96 + 3 * k)
    shipped_calls = []
    step = fleet.shipped.step
    fleet.shipped.step = lambda items: shipped_calls.append([b for b, _, _ in items]) or step(items)
    for _ in range(4):
        check(fleet, reference, buildings, 96, 10, names=["b0", "b1", "b3"])
        check(fleet, adapted_reference, buildings, 96, 10, names=["b2"])
        both = [buildings[b].ring.window(96) for b in ("b1", "b2")]  # in one call, each on its set
        got = fleet.step([("b1", both[0], 10), ("b2", both[1], 10)])
        for predictor, w, (power, prob) in zip((reference, adapted_reference), both, got):
            assert_matches_models(predictor, w.features.copy(), power, prob, last=10)
        del both
        for m in buildings.values():
            m.write(10)
    assert shipped_calls[0] == ["b0", "b1", "b3"] and ["b1"] in shipped_calls  # b2 never in the shipped batch
    assert fleet.buildings == 4 and fleet.full_recomputes == 4
    assert fleet.thresholds("b2") is not fleet.thresholds("b0")
    fleet.forget("b2")  # its set goes with its last building
    assert fleet.sets == 0 and fleet.buildings == 3
    fleet.place("b2", {})  # back on the shipped set: recomputed there, and right
    check(fleet, reference, buildings, 96, 10)
    assert fleet.full_recomputes == 5
