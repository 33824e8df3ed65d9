"""Real-data training plumbing: the tracebase and GJW readers, whole appliance runs, the device
split, semi-synthetic houses with exact labels, held meter periods, the cross-house mixture (a
left-out house gives nothing) and the published-state scoring of scripts/evaluate.py."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from nilmd.features import SCALES
from nilmd.models import checkpoints
from nilmd.models.model import WaveNILM, WaveNILMConfig
from nilmd.models.predictor import Predictor, make_prediction
from nilmd.training import datasets, evaluation, mixture, realdata, synthetic
from nilmd.training.datasets import hold_input


def write_gz(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.write(text)
    return path


def tracebase_day(path: Path, readings) -> Path:
    """readings: (seconds after midnight, W) -> a tracebase file of 2011-11-23."""
    lines = [f"23/11/2011 {s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d};{w};{w}" for s, w in readings]
    return write_gz(path, "\n".join(lines) + "\n")


def test_tracebase_holds_readings_and_marks_silences(tmp_path):
    f = tracebase_day(tmp_path / "k.csv.gz", [(0, 0), (3, 2000), (10, 0), (200, 5)])
    p = realdata.read_tracebase(str(f))
    assert len(p) == 201
    assert list(p[:3]) == [0, 0, 0] and list(p[3:10]) == [2000] * 7 and p[10] == 0
    assert np.isnan(p[71:200]).all(), "a reading is held at most 60 s"
    assert p[200] == 5


def test_gjw_holds_each_value_until_the_next_row(tmp_path):
    f = write_gz(tmp_path / "4-POWER_REAL_FINE_x.csv.gz", "2015-05-28 18:33:33,659\n2015-05-28 18:33:41,701\n")
    p = realdata.read_gjw(str(f))
    assert list(p) == [659] * 8 + [701]


def test_runs_merge_short_pauses_and_drop_spikes():
    x = np.zeros(400, np.float32)
    x[10:50] = 100      # a run
    x[55:80] = 100      # 5 s later: the same run (min_off 12)
    x[200:203] = 100    # a 3-s spike: not a run (min_on 60)
    assert realdata.runs(x, (50.0, 60, 12)) == [(10, 80)]


def test_activations_are_whole_runs_with_their_edges_and_never_touch_a_gap():
    x = np.zeros(300, np.float32)
    x[20:40] = 2500
    x[100:120] = 2500
    x[125] = np.nan  # unmeasured second within the second run's padded edge
    acts = realdata.activations(x, "ElectricKettle", "WaterKettle", "dev_1")
    assert len(acts) == 1
    a = acts[0].power
    assert len(a) == 20 + 2 * realdata.PAD_S and a[realdata.PAD_S] == 2500 and a[0] == 0 and a[-1] == 0


def test_split_is_stable_disjoint_and_gives_every_split_a_unit():
    units = [f"Kettle/dev_{k}" for k in range(10)]
    splits = {u: realdata.split_of(u, units) for u in units}
    assert {u: realdata.split_of(u, list(reversed(units))) for u in units} == splits, "order must not matter"
    assert set(splits.values()) == {"train", "val", "test"}
    assert sum(v == "test" for v in splits.values()) == 2 and sum(v == "val" for v in splits.values()) == 2


def test_semi_synthetic_house_labels_are_exact():
    rng = np.random.default_rng(0)
    n = 6 * 3600
    background = np.full(n, 150.0, np.float32)
    background[1000:1100] = np.nan  # a gap in the real background
    kettle = realdata.Activation("ElectricKettle", "WaterKettle", "d1", np.r_[np.zeros(8), np.full(150, 2000.0), np.zeros(8)].astype(np.float32))
    tv = realdata.Activation("Television", "TV-LCD", "d2", np.full(3000, 90.0, np.float32))
    s = synthetic.house(rng, "ElectricKettle", background, [kettle], [tv], name="t", target_share=1.0)
    y = s.targets["ElectricKettle"]
    assert y.max() >= 2000 * synthetic.GAIN["ElectricKettle"][0] - 1e-3, "a kettle run was placed (and scaled)"
    runs = realdata.runs(y, (1000.0, 12, 0))
    assert runs and all(b - a == 150 for a, b in runs), "each placed run is whole"
    assert not s.valid[1000:1100].any() and s.valid[:1000].all()
    rest = s.features[s.valid, 0] - y[s.valid]
    assert rest.min() >= 150 - 1e-3, "the aggregate is the background plus the target plus distractors"


def test_a_cycling_load_comes_from_one_unit():
    """A semi-synthetic fridge is one fridge: all its cycles from one device, never a mixture."""
    runs = [realdata.Activation("Refrigerator", "Refrigerator", f"dev_{k}", np.full(600, 80.0 + 40 * k, np.float32))
            for k in range(3) for _ in range(4)]
    for seed in range(20):
        y = synthetic.place_cycles(np.random.default_rng(seed), 6 * 3600, runs, "Refrigerator")
        levels = np.unique(np.round(y[y > 0] / y[y > 0].min(), 3))
        assert len(levels) == 1, f"seed {seed}: cycles of {len(levels)} devices in one house"


def test_lookalikes_are_cut_out_of_a_background():
    bg = np.full(7200, 200.0, np.float32)
    bg[3000:3150] = 2800.0       # an unlabelled kettle run
    bg[5000:7200] = 1200.0       # a long heater stretch (not a kettle): kept
    out = synthetic.remove_lookalikes(bg, 1200.0)
    assert out[3000:3150].max() < 300 and out[6000] == 1200.0


def test_held_meter_periods_are_causal_spot_readings_or_minute_means():
    x = np.arange(120, dtype=np.float32)[:, None].repeat(5, axis=1)
    h8 = hold_input(x, 8, 3)
    assert h8[3, 0] == 3 and h8[10, 0] == 3 and h8[11, 0] == 11
    assert (h8[:, 0] <= x[:, 0]).all(), "a held spot reading never comes from the future"
    h60 = hold_input(x, 60, 0)
    assert h60[0, 0] == h60[59, 0] == pytest.approx(np.mean(np.arange(60))) and h60[60, 0] == pytest.approx(np.mean(np.arange(60, 120)))


def _tiny_checkpoint(appliance="Dishwasher"):
    torch.manual_seed(3)
    cfg = WaveNILMConfig(channels=4, depth=4, head_channels=8)
    model = WaveNILM(cfg, SCALES)
    with torch.no_grad():  # a model that is on for half of its seconds, not all or none
        model.head[-1].bias.copy_(torch.tensor([0.0, 0.0]))
    return checkpoints.Checkpoint(path="<test>", appliance=appliance, config=cfg,
                                  state_dict={k: v.clone() for k, v in model.state_dict().items()},
                                  feature_scales=tuple(SCALES), on_power_threshold_w=10.0,
                                  probability_threshold=0.5, max_power_w=3000.0)


@pytest.mark.parametrize("start", [None, 1_700_000_005.0], ids=["no-start", "first-full-window-not-aligned"])
def test_published_scoring_is_what_the_daemon_publishes_each_interval(start):
    """scripts/evaluate.py scores each second with the state the daemon publishes for its
    interval: rebuild those states literally with make_prediction over daemon windows and compare.
    The daemon's windows, by docs/CONTRACT.md §4: every full window whose newest sample, second
    start + end - 1, closes an interval of the clock ((start + end) % interval == 0). Without a
    start (second 0) the first full window is aligned; 1_700_000_005 + 64 = 5 (mod 16), so there
    the first one the daemon predicts is 11 samples after the first full window."""
    rng = np.random.default_rng(1)
    n, window, interval = 600, 64, 16
    power = 200 + 1500 * (rng.random(n) < 0.3).astype(float)
    truth = np.where(power > 1000, 1500.0, 0.0).astype(np.float32)
    s = datasets.Series(name="x", features=datasets.derive(power), targets={"Dishwasher": truth}, valid=np.ones(n, bool),
                        info={} if start is None else {"start": start})
    ckpt = _tiny_checkpoint()
    predictor = Predictor({"Dishwasher": ckpt})
    got = evaluation.evaluate(predictor, [s], {"Dishwasher": 0.5}, inputs="power", mode="stream", window=window,
                              interval=interval, published=True)["Dishwasher"]
    second0 = 0 if start is None else int(start)
    ends = [end for end in range(window, n + 1) if (second0 + end) % interval == 0]
    assert ends[0] - window == (0 if start is None else 11) and np.all(np.diff(ends) == interval)
    on, watts, true = [], [], []
    for end in ends:
        p, q = predictor.run(s.features[end - window:end])
        pred = make_prediction(["Dishwasher"], p[:, -interval:], q[:, -interval:], np.array([0.5]),
                               s.features[end - interval:end, 0], timestamp=0, window_start=0, window_end=0,
                               inference_ms=0)["predictions"][0]
        on += [pred["is_on"]] * interval
        watts += [pred["power_watts"]] * interval
        true += list(truth[end - interval:end])
    on, watts, true = np.array(on), np.array(watts), np.array(true)
    t_on = true >= 10
    tp, fp, fn = int(np.sum(on & t_on)), int(np.sum(on & ~t_on)), int(np.sum(~on & t_on))
    assert got["samples"] == len(true)
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert got["mae_w"] == pytest.approx(np.mean(np.abs(watts - true)), abs=0.05)  # watts rounded to 0.01


def fake_data_dir(root: Path) -> Path:
    """Two sub-metered houses at 8 s and a tracebase folder, in the real layout."""
    rng = np.random.default_rng(5)
    for house, n in (("AAA_House1", 3), ("BBB_House2", 2)):
        for k in range(n):
            t0 = 1400000000 + k * 86400
            rows = ["timestamp,aggregate,fridge,dishwasher"]
            for i in range(0, 6 * 3600, 8):
                fridge = 80.0 if (i // 1200) % 2 else 0.0
                dish = 2000.0 if 7000 <= i < 9400 else 0.0
                rows.append(f"{t0 + i},{150 + fridge + dish + rng.normal(0, 5):.1f},{fridge},{dish}")
            write_gz(root / "real-8s" / f"{house}_8s_{k}.csv.gz", "\n".join(rows) + "\n")
    for dev in range(4):
        tracebase_day(root / "traces-1s" / "tracebase" / "complete" / "Refrigerator" / f"dev_F{dev}_2011.11.23.csv.gz",
                      [(s, 90 if (s // 900) % 2 else 1) for s in range(0, 20000, 3)])
    return root


def test_a_left_out_house_gives_nothing_to_training_or_validation(tmp_path):
    data = fake_data_dir(tmp_path / "data")
    src = mixture.build("Refrigerator", str(data), "BBB_House2", {"real": 1, "synth": 1}, tmp_path / "cache", seed=1,
                        synth_houses=4, synth_hours=2)
    names = [s.name for group in (*src.train.values(), *src.val.values()) for s in group if not s.name.startswith("synth")]
    assert names and all("AAA_House1" in n for n in names), names
    units = {u for split in src.description["synth"]["target_units"].values() for u in split}
    assert not any("BBB" in u for u in units), units
    assert src.train["synth"] and src.val["synth"], "tracebase fridges give semi-synthetic houses"
    assert src.description["real_files"].keys() == {"AAA_House1"}
