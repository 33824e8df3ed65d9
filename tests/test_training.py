"""Training and evaluation plumbing: metrics (pure functions), the real-data loader, the claim that
streaming evaluation equals the daemon's windows, and a few real training steps end to end."""

from __future__ import annotations

import gzip
import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nilmd.models import checkpoints
from nilmd.training import datasets, evaluation, metrics
from nilmd.training import train as train_mod
from nilmd.appliances import checkpoint_filename
from nilmd.features import SCALES
from nilmd.models.model import WaveNILM, WaveNILMConfig
from nilmd.models.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ metrics

def test_mae_sae_ea_by_hand():
    y = np.array([0.0, 100.0, 100.0, 0.0])
    p = np.array([10.0, 90.0, 100.0, 0.0])
    assert metrics.mae(p, y) == pytest.approx(5.0)
    assert metrics.sae(p, y) == pytest.approx(0.0)            # energy matches although samples differ
    assert metrics.estimation_accuracy(p, y) == pytest.approx(1 - 20 / 400)
    assert metrics.estimation_accuracy(y, y) == 1.0
    assert metrics.sae(p * 2, y) == pytest.approx(1.0)


def test_mask_leaves_samples_out():
    y = np.array([0.0, 100.0, 5000.0])
    p = np.array([0.0, 100.0, 0.0])
    mask = np.array([True, True, False])
    assert metrics.mae(p, y, mask) == 0.0
    assert metrics.estimation_accuracy(p, y, mask) == 1.0


def test_f1_and_confusion():
    t = np.array([1, 1, 1, 0, 0, 0], bool)
    p = np.array([1, 1, 0, 1, 0, 0], bool)
    assert metrics.confusion(p, t) == (2, 1, 1, 2)
    assert metrics.f1(p, t) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert metrics.f1(t, t) == 1.0
    assert math.isnan(metrics.f1(np.zeros(4, bool), np.zeros(4, bool)))  # undefined, not perfect
    assert metrics.f1(np.ones(4, bool), np.zeros(4, bool)) == 0.0


def test_undefined_scores_are_nan_not_numbers():
    z = np.zeros(5)
    assert math.isnan(metrics.sae(z, z))
    assert math.isnan(metrics.estimation_accuracy(z, z))
    assert math.isnan(metrics.mae([], []))


def test_best_threshold_finds_the_separating_value():
    prob = np.array([0.1, 0.2, 0.3, 0.72, 0.8, 0.9])
    true = np.array([0, 0, 0, 1, 1, 1], bool)
    th, f = metrics.best_threshold(prob, true)
    assert f == 1.0 and 0.3 < th <= 0.72
    # ties go to the threshold nearest 0.5
    th, _ = metrics.best_threshold(np.array([0.0, 1.0]), np.array([False, True]))
    assert th == 0.5


def test_score_uses_on_threshold_and_probability_threshold():
    y = np.array([0.0, 2500.0, 1500.0, 0.0])               # 1500 W is below a kettle's 2000 W
    prob = np.array([0.1, 0.9, 0.6, 0.2])
    s = metrics.score(y, prob, y, on_threshold_w=2000.0, probability_threshold=0.7)
    assert s["f1"] == 1.0 and s["mae_w"] == 0.0 and s["samples"] == 4
    s = metrics.score(y, prob, y, on_threshold_w=2000.0, probability_threshold=0.5)
    assert s["precision"] == 0.5 and s["recall"] == 1.0


def test_reported_power_is_zero_where_the_appliance_is_judged_off():
    from nilmd.models.predictor import make_prediction, served_power
    power = np.array([[600.0, 2000.0, 2000.0, 600.0], [50.0, 50.0, 50.0, 50.0]], np.float32)
    prob = np.array([[0.3, 0.9, 0.95, 0.4], [0.2, 0.2, 0.2, 0.2]], np.float32)
    thresholds = np.array([0.5, 0.1], np.float32)
    assert served_power(power[0], prob[0], 0.5).tolist() == [0.0, 2000.0, 2000.0, 0.0]
    p = make_prediction(["ElectricOven", "Refrigerator"], power, prob, thresholds, np.full(4, 3000.0),
                        timestamp=4.0, window_start=0.0, window_end=4.0, inference_ms=1.0)
    oven, fridge = p["predictions"]
    assert oven["power_watts"] == 1000.0 and fridge["power_watts"] == 50.0  # means of what is served
    # evaluation scores the same served power, at whichever threshold it is asked about
    y = np.array([0.0, 2000.0, 2000.0, 0.0], np.float32)
    r = {"_power": power[0], "_prob": prob[0], "_true": y}
    assert evaluation.rescore(r, "ElectricOven", 0.5)["mae_w"] == 0.0
    assert evaluation.rescore(r, "ElectricOven", 0.35)["mae_w"] == 150.0  # 600 W served at 0.4


# ------------------------------------------------------------------ real-data loader

def write_csv(path, rows, header="timestamp,aggregate,Kettle,WashingMachine"):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as f:
        f.write(header + "\n")
        for r in rows:
            f.write(",".join(str(v) for v in r) + "\n")


def test_read_csv_holds_minutes_and_marks_gaps(tmp_path):
    rows = [("2013-10-01 00:00:00", 100, 0, 0), ("2013-10-01 00:01:00", 2600, 2500, 0),
            ("2013-10-01 00:02:00", 0, 0, 0),                     # 0 W aggregate: a gap
            ("2013-10-01 00:04:00", 300, 0, 200)]                 # 00:03 missing: a gap
    write_csv(tmp_path / "h.csv.gz", rows)
    s = datasets.read_csv(tmp_path / "h.csv.gz")
    assert s.period_s == 60 and len(s) == 5 * 60
    assert set(s.targets) == {"ElectricKettle", "WashingMachine"}
    assert np.all(s.features[60:120, 0] == 2600) and np.all(s.targets["ElectricKettle"][60:120] == 2500)
    assert s.valid[:120].all() and not s.valid[120:240].any() and s.valid[240:].all()
    assert np.all(s.features[120:240, 0] == 0)                   # gaps reach the model as 0 W
    assert s.features[:, 4].max() == 0                            # no PF or current: power-only meter


def test_read_csv_generic_layout_with_meter_fields(tmp_path):
    rows = [(1700000000 + i, 1000, 230, 5.0, 0.87, 900) for i in range(10)]
    write_csv(tmp_path / "g.csv", rows, "timestamp,power_total,voltage,current,power_factor,ElectricOven")
    s = datasets.read_csv(tmp_path / "g.csv")
    assert s.period_s == 1 and len(s) == 10 and s.valid.all()
    assert list(s.targets) == ["ElectricOven"]
    assert np.all(s.features[:, 4] == 1)                          # the meter told us about Q


def test_scored_mask_drops_the_receptive_field_after_a_gap():
    valid = np.ones(20, bool)
    valid[5] = False
    m = datasets.scored_mask(valid, 4)
    assert m[:5].all() and not m[5:9].any() and m[9:].all()


# ------------------------------------------------------------------ evaluation = daemon windows

def tiny_checkpoint(tmp_path, appliance="ElectricKettle", depth=6):
    torch.manual_seed(0)
    model = WaveNILM(WaveNILMConfig(channels=4, depth=depth, head_channels=4), SCALES)
    for prm in model.parameters():   # non-trivial weights, so equal outputs mean something
        torch.nn.init.normal_(prm, std=0.5)
    path = tmp_path / checkpoint_filename(appliance)
    checkpoints.save(path, checkpoints.to_dict(appliance, model, on_power_threshold_w=2000.0, max_power_w=3000.0))
    return checkpoints.load(path, appliance)


@pytest.mark.slow
def test_stream_equals_daemon_windows(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)                            # receptive field 64
    predictor = Predictor({ckpt.appliance: ckpt})
    rng = np.random.default_rng(0)
    feats = np.zeros((3000, 5), np.float32)
    feats[:, 0] = rng.uniform(50, 3000, 3000)
    feats[:, 3] = feats[:, 0]
    pw, qw, cw = evaluation.predict_windows(predictor, feats, window=200, interval=10)
    ps, qs, cs = evaluation.predict_stream(predictor, feats, window=200, interval=10, chunk=700)
    assert cw.sum() > 2500 and np.all(cs[cw])
    np.testing.assert_allclose(pw[:, cw], ps[:, cw], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(qw[:, cw], qs[:, cw], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ training end to end

def synthetic_csv(path, n=6000, seed=0):
    """A house with a base load and a 'kettle' that switches on for 60-120 s now and then."""
    rng = np.random.default_rng(seed)
    kettle = np.zeros(n)
    for s in rng.integers(0, n - 200, 25):
        kettle[s:s + rng.integers(60, 120)] = 2500
    agg = 150 + rng.normal(0, 5, n) + kettle
    write_csv(path, [(1700000000 + i, round(agg[i], 1), kettle[i]) for i in range(n)], "timestamp,aggregate,Kettle")


TINY = ["--channels", "4", "--depth", "4", "--head-channels", "4", "--window", "64", "--batch-size", "4",
        "--eval-every", "2", "--save-every", "1", "--threads", "1", "--appliance", "ElectricKettle"]


def tiny_csv_training(tmp_path):
    """-> (the train script, arguments for a tiny model on two synthetic CSV houses)."""
    synthetic_csv(tmp_path / "a.csv")
    synthetic_csv(tmp_path / "b.csv", seed=1)
    return train_mod, TINY + ["--data", "csv", "--csv", str(tmp_path / "a.csv"),
                                         "--val-csv", str(tmp_path / "b.csv")]


def test_training_writes_a_checkpoint_the_daemon_accepts_and_resumes_exactly(tmp_path):
    train, common = tiny_csv_training(tmp_path)

    train.main(common + ["--steps", "4", "--out-dir", str(tmp_path / "one"), "--run-dir", str(tmp_path / "r1")])
    ckpt = checkpoints.load(tmp_path / "one" / checkpoint_filename("ElectricKettle"), "ElectricKettle")
    assert ckpt.training["seed"] == 1337 and ckpt.training["data"]["source"] == "csv"
    assert ckpt.training["code_version"].startswith("0.") and "validation" in ckpt.metrics
    assert 0 < ckpt.probability_threshold < 1 and ckpt.max_power_w == 2500.0
    assert Predictor({"ElectricKettle": ckpt}).run(np.ones((100, 5), np.float32))[0].shape == (1, 100)

    # 2 steps, stop, resume to 4: the same weights as 4 steps in one go
    train.main(common + ["--steps", "2", "--out-dir", str(tmp_path / "two"), "--run-dir", str(tmp_path / "r2")])
    train.main(common + ["--steps", "4", "--out-dir", str(tmp_path / "two"), "--run-dir", str(tmp_path / "r2"),
                         "--resume"])
    resumed = checkpoints.load(tmp_path / "two" / checkpoint_filename("ElectricKettle"))
    state_one = torch.load(tmp_path / "r1" / "ElectricKettle.pt", weights_only=True)["model"]
    state_two = torch.load(tmp_path / "r2" / "ElectricKettle.pt", weights_only=True)["model"]
    for k in state_one:
        assert torch.equal(state_one[k], state_two[k]), k
    assert resumed.training["history"][-1]["step"] == 4


def test_warm_start_continues_from_a_checkpoint_and_records_it(tmp_path):
    train, common = tiny_csv_training(tmp_path)
    train.main(common + ["--steps", "4", "--out-dir", str(tmp_path / "one"), "--run-dir", str(tmp_path / "r1")])
    first = checkpoints.load(tmp_path / "one" / checkpoint_filename("ElectricKettle"))

    train.main(common + ["--steps", "2", "--seed", "7", "--init", str(tmp_path / "one"),
                         "--out-dir", str(tmp_path / "two"), "--run-dir", str(tmp_path / "r2")])
    second = checkpoints.load(tmp_path / "two" / checkpoint_filename("ElectricKettle"))
    init = second.training["init"]
    assert init["sha256"] == hashlib.sha256((tmp_path / "one" / checkpoint_filename("ElectricKettle"))
                                            .read_bytes()).hexdigest()
    assert init["training"]["history"] == first.training["history"]
    # step 0 is the loaded model (the first run's best state), scored on the same validation data
    start = second.training["history"][0]
    best_first = next(h for h in first.training["history"] if h["step"] == first.training["best_step"])
    assert start["step"] == 0 and start["score"] == pytest.approx(best_first["score"])

    with pytest.raises(SystemExit, match="--channels may only grow"):
        train.main(common + ["--steps", "2", "--channels", "2", "--init", str(tmp_path / "one"),
                             "--out-dir", str(tmp_path / "three"), "--run-dir", str(tmp_path / "r3")])
    with pytest.raises(SystemExit, match="--depth"):
        train.main(common + ["--steps", "2", "--depth", "3", "--init", str(tmp_path / "one"),
                             "--out-dir", str(tmp_path / "three"), "--run-dir", str(tmp_path / "r3")])
    # wider: the narrow weights kept, new channels feeding nothing old, so step 0 scores the same
    train.main(common + ["--steps", "2", "--channels", "8", "--init", str(tmp_path / "one"),
                         "--out-dir", str(tmp_path / "wide"), "--run-dir", str(tmp_path / "rw")])
    wide = checkpoints.load(tmp_path / "wide" / checkpoint_filename("ElectricKettle"))
    assert wide.config.channels == 8 and wide.training["history"][0]["score"] == pytest.approx(best_first["score"])
    with pytest.raises(SystemExit, match="--init"):
        train.main(common + ["--steps", "2", "--init", str(tmp_path / "nowhere"),
                             "--out-dir", str(tmp_path / "three"), "--run-dir", str(tmp_path / "r3")])


@pytest.mark.slow
def test_training_on_simulated_houses(tmp_path):
    pytest.importorskip("nilmd.sim.simulator")
    train = train_mod
    train.main(TINY + ["--steps", "2", "--train-houses", "1", "--train-segments", "1", "--train-days", "0.05",
                       "--val-houses", "1", "--val-segments", "1", "--val-days", "0.05",
                       "--out-dir", str(tmp_path), "--run-dir", str(tmp_path / "run")])
    ckpt = checkpoints.load(tmp_path / checkpoint_filename("ElectricKettle"), "ElectricKettle")
    assert ckpt.training["data"]["source"] == "nilmd.sim.simulator"


def test_produce_and_training_read_one_file_the_same_way(tmp_path):
    """One reader (nilmd.csvfile): the same naive ISO time is the same instant for `nilmd produce`
    and for training, whatever the box's time zone, and both accept the same column names."""
    import os
    import time as _time

    from nilmd import producer

    path = tmp_path / "m.csv"
    path.write_text("Time,Aggregate,Kettle,voltage\n2013-10-01 00:00:00,250,0,231\n2013-10-01 00:00:01,2600,2400,229\n")
    old = os.environ.get("TZ")
    try:
        os.environ["TZ"] = "America/New_York"  # a box far from UTC
        _time.tzset()
        msgs = list(producer.csv_samples(str(path)))
        series = datasets.read_csv(path)
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        _time.tzset()
    assert msgs[0]["timestamp"] == series.info["start"] == 1380585600.0  # 2013-10-01T00:00:00Z
    assert [m["power_total"] for m in msgs] == [250.0, 2600.0] and msgs[1]["voltage"] == 229.0
    assert list(series.targets["ElectricKettle"]) == [0.0, 2400.0]


def test_a_lookahead_model_is_scored_for_the_seconds_it_describes_and_the_daemon_refuses_it(tmp_path):
    train, common = tiny_csv_training(tmp_path)
    train.main(common + ["--steps", "2", "--lookahead", "5", "--out-dir", str(tmp_path / "la"),
                         "--run-dir", str(tmp_path / "rl")])
    path = tmp_path / "la" / checkpoint_filename("ElectricKettle")
    with pytest.raises(checkpoints.CheckpointError, match="look-ahead of 5 s"):
        checkpoints.load(path)  # what the daemon calls: it publishes real-time states only
    la = checkpoints.load(path, lookahead_ok=True)
    rt = checkpoints.Checkpoint(**{**la.__dict__, "training": {}})  # the same weights, real time

    series = datasets.read_csv(tmp_path / "b.csv")
    p_la, q_la, ok_la = evaluation.predict(Predictor({"ElectricKettle": la}), series, mode="stream", window=64,
                                           interval=4)
    p_rt, q_rt, ok_rt = evaluation.predict(Predictor({"ElectricKettle": rt}), series, mode="stream", window=64,
                                           interval=4)
    # output t of the look-ahead model describes t - 5: it is moved there, and the last 5 s,
    # which no output describes yet, are not scored
    np.testing.assert_array_equal(q_la[:, :-5], q_rt[:, 5:])
    np.testing.assert_array_equal(p_la[:, :-5], p_rt[:, 5:])
    assert not ok_la[-5:].any() and ok_rt[-5:].all()
    np.testing.assert_array_equal(ok_la[:-5], ok_rt[:-5] & ok_rt[5:])


def test_lookahead_pairs_each_output_with_the_truth_before_it():
    power = torch.arange(10.0).view(1, 10)
    y = torch.arange(10.0).view(1, 10) * 10
    m = torch.ones(1, 10, dtype=torch.bool)
    m[0, 2] = False
    p, logit, yy, keep = train_mod.lookahead_pairs(power, power, y, m, 3)
    assert p.tolist() == [[3, 4, 5, 6, 7, 8, 9]] and yy.tolist() == [[0, 10, 20, 30, 40, 50, 60]]
    # the truth at 2 is invalid: its pair (output 5) is left out of the loss
    assert keep.tolist() == [[True, True, False, True, True, True, True]]


def test_steps_0_retunes_the_threshold_for_the_published_intervals(tmp_path):
    """--init FILE --steps 0 --val-interval N keeps the weights and picks the threshold that is
    best for what the daemon publishes: each second scored by its N-s interval's state."""
    train, common = tiny_csv_training(tmp_path)
    train.main(common + ["--steps", "4", "--out-dir", str(tmp_path / "one"), "--run-dir", str(tmp_path / "r1")])
    train.main(common + ["--steps", "0", "--val-interval", "8", "--init", str(tmp_path / "one"),
                         "--out-dir", str(tmp_path / "two"), "--run-dir", str(tmp_path / "r2")])
    one, two = (checkpoints.load(tmp_path / d / checkpoint_filename("ElectricKettle")) for d in ("one", "two"))
    for k in one.state_dict:
        assert torch.equal(one.state_dict[k], two.state_dict[k]), k
    val = datasets.read_csv(tmp_path / "b.csv")

    def published_f1(threshold):
        predictor = Predictor({"ElectricKettle": two})
        return evaluation.evaluate(predictor, [val], {"ElectricKettle": threshold}, inputs="power", mode="stream",
                                   interval=8, published=True)["ElectricKettle"]["f1"]

    chosen = published_f1(two.probability_threshold)
    others = [published_f1(th) for th in np.round(np.arange(0.05, 0.96, 0.05), 2)]
    assert len({round(f, 6) for f in others if f == f}) > 1, f"the thresholds must matter here: {others}"
    assert chosen == pytest.approx(np.nanmax(others)), (two.probability_threshold, others)
