"""Run the daemon's model call over long series and score it (scripts/evaluate.py, training
validation, tests). Imports torch through nilmd.models.predictor: never import this from the supervisor.

Two ways to cover a series, both through `Predictor.run` on `features.derive` output:
  * `predict_windows`: literally what the inference process does: a window of `window` samples
    ending at every `interval`-th sample, keeping the outputs of the newest `interval` samples;
  * `predict_stream`: long chunks that overlap by receptive_field - 1 samples. The model is
    causal with a finite receptive field, so an output more than receptive_field - 1 samples
    after a window's start depends only on the inputs it sees, not on where the window began:
    both give the same numbers (tests/test_training.py checks this), and streaming is ~25x
    cheaper (each sample computed once instead of window/interval times).
Samples before the first full window are never predicted by the daemon and are not scored.
"""

from __future__ import annotations

import numpy as np

from nilmd.training import metrics
from nilmd.appliances import ON_THRESHOLD_W
from nilmd.training.datasets import Series, scored_mask
from nilmd.features import power_only
from nilmd.models.checkpoints import lookahead_s
from nilmd.schedule import wait_to_align
from nilmd.models.predictor import Predictor, served_power


def predict_windows(predictor: Predictor, features: np.ndarray, window: int = 1536, interval: int = 60):
    """-> (power [A, n], prob [A, n], covered [n]) exactly as the daemon would have produced them."""
    n, a = len(features), len(predictor.appliances)
    power = np.zeros((a, n), np.float32)
    prob = np.zeros((a, n), np.float32)
    covered = np.zeros(n, bool)
    for end in range(window, n + 1, interval):
        p, q = predictor.run(features[end - window:end])
        power[:, end - interval:end] = p[:, -interval:]
        prob[:, end - interval:end] = q[:, -interval:]
        covered[end - interval:end] = True
    return power, prob, covered


def predict_stream(predictor: Predictor, features: np.ndarray, window: int = 1536, interval: int = 60,
                   chunk: int = 1 << 16):
    """Same outputs as predict_windows (see the module docstring), computed once per sample."""
    n, a = len(features), len(predictor.appliances)
    overlap = predictor.receptive_field - 1
    assert window - interval >= overlap, "the daemon's window must hold the receptive field"
    power = np.zeros((a, n), np.float32)
    prob = np.zeros((a, n), np.float32)
    for start in range(0, n, chunk):
        lo = max(0, start - overlap)
        p, q = predictor.run(np.ascontiguousarray(features[lo:start + chunk]))
        power[:, start:start + chunk] = p[:, start - lo:]
        prob[:, start:start + chunk] = q[:, start - lo:]
    covered = np.zeros(n, bool)
    covered[window - interval:] = True  # the daemon starts once its first window is full
    return power, prob, covered


def predict(predictor, series: Series, *, inputs: str = "full", mode: str = "windows", window: int = 1536,
            interval: int = 60):
    """-> (power, prob, scored mask) of one series; inputs="power" feeds what a power-only meter
    would have sent for the same samples."""
    feats = series.features if inputs == "full" else power_only(series.features)
    run = predict_windows if mode == "windows" else predict_stream
    power, prob, covered = run(predictor, feats, window=window, interval=interval)
    scored = covered & scored_mask(series.valid, predictor.receptive_field)
    lags = [lookahead_s(c) for c in predictor.checkpoints]
    if any(lags):  # a look-ahead model's output t describes t - lag: move it there
        for k, lag in enumerate(lags):
            if lag:
                power[k, :-lag], prob[k, :-lag] = power[k, lag:].copy(), prob[k, lag:].copy()
        lag = max(lags)
        scored[:-lag] &= scored[lag:]
        scored[-lag:] = False
    return power, prob, scored


def evaluate(predictor: Predictor, series_list, thresholds: dict, *, inputs: str = "full", mode: str = "windows",
             window: int = 1536, interval: int = 60, published: bool = False, aligned: bool = True) -> dict:
    """Scores per appliance over all series pooled (sums over every scored sample), is_on at
    `thresholds` (appliance -> probability threshold: the checkpoints', or a trial one).

    published=False scores each second by the model's own output for it (what the daemon
    publishes with INFERENCE_INTERVAL=1); published=True scores each second by the state the
    daemon publishes for the interval that holds it (`make_prediction`: the interval's mean
    probability against the threshold, the mean served power), the honest figure for the
    default 60-s interval. aligned=False scores the intervals of a daemon that started its
    schedule at the first full window wherever the clock was (the schedule before
    nilmd.schedule), for comparison."""
    pooled = {a: ([], [], [], []) for a in predictor.appliances}
    blocks_before = 0
    for s in series_list:
        power, prob, mask = predict(predictor, s, inputs=inputs, mode=mode, window=window, interval=interval)
        if published:  # the daemon's intervals: the first closes a clock interval (nilmd.schedule)
            block = published_blocks(s, window, interval, aligned, offset=blocks_before)
            mask = mask & (block >= 0)
            blocks_before = int(block.max(initial=blocks_before - 1)) + 1
        else:
            block = np.full(len(s), -1, np.int64)
        for k, a in enumerate(predictor.appliances):
            if a in s.targets:
                for acc, values in zip(pooled[a], (power[k], prob[k], s.targets[a], block)):
                    acc.append(values[mask])
    results = {}
    for a in predictor.appliances:
        if not pooled[a][0]:
            continue
        pw, pr, y, blk = (np.concatenate(x) for x in pooled[a])
        raw = {"_power": pw, "_prob": pr, "_true": y}  # the model's outputs, kept for threshold tuning
        if published:
            raw["_block"] = blk
        results[a] = {**rescore(raw, a, float(thresholds[a])), **raw}
    return results


def published_blocks(series: Series, window: int, interval: int, aligned: bool = True, offset: int = 0) -> np.ndarray:
    """Each sample's published interval (offset, offset + 1, ...; -1 for samples no whole interval
    publishes): the daemon's first interval closes at the first clock-aligned boundary after its
    first full window."""
    first = window - interval + (first_wait(series, window, interval) if aligned else 0)
    whole = max((len(series) - first) // interval, 0)
    block = np.full(len(series), -1, np.int64)
    block[first:first + whole * interval] = offset + np.arange(whole * interval) // interval
    return block


def first_wait(series: Series, window: int, interval: int) -> int:
    """Samples after the first full window until the daemon's first one (nilmd.schedule)."""
    start = series.info.get("start", series.info.get("t0", 0.0))
    return wait_to_align(float(start) + window - 1, interval)


def interval_mean(values: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Each sample's value replaced by the mean over its interval (of the samples scored in it)."""
    _, inverse = np.unique(block, return_inverse=True)
    sums = np.bincount(inverse, weights=values.astype(np.float64))
    return (sums / np.bincount(inverse))[inverse]


def rescore(result: dict, appliance: str, probability_threshold: float, on_threshold_w: float | None = None) -> dict:
    """The scores of one `evaluate` result at a probability threshold: is_on and the power the
    daemon would report (`served_power`) both follow it; with interval blocks (published=True),
    as the interval's mean probability and mean served power."""
    power = served_power(result["_power"], result["_prob"], probability_threshold)
    prob = result["_prob"]
    if "_block" in result:
        power, prob = interval_mean(power, result["_block"]), interval_mean(prob, result["_block"])
    out = metrics.score(power, prob, result["_true"],
                        on_threshold_w=ON_THRESHOLD_W[appliance] if on_threshold_w is None else on_threshold_w,
                        probability_threshold=probability_threshold)
    out["probability_threshold"] = probability_threshold
    return out


def strip_private(results: dict) -> dict:
    return {a: {k: v for k, v in r.items() if not k.startswith("_")} for a, r in results.items()}
