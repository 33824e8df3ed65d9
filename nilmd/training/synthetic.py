"""Semi-synthetic houses: real appliance runs placed on real backgrounds, so that the labels are
exact and the shapes are real.

A house for a target appliance is built from
  * a background: real whole-house power in which the target is known to be absent — a
    sub-metered aggregate minus all its sub-meters, or the GJW 1 Hz house — with step events
    that look like a high-power target (a kettle among the unknown loads) cut out
    (`remove_lookalikes`), so they cannot teach "this is not a kettle";
  * the target's real runs (`realdata.activations` of the training split only), placed at random
    times, each scaled by a random gain (another kettle of the same kind draws more or less);
  * real runs of other appliances as distractors, which may overlap the target's.
Target and distractor runs come from the split they are asked for (`realdata.split_of`), so a
device's runs are never in two splits.
"""

from __future__ import annotations

import numpy as np

from nilmd.appliances import ON_THRESHOLD_W
from nilmd.features import derive
from nilmd.training.datasets import Series
from nilmd.training.realdata import Activation

# Uses per day (the target's runs placed on a day of background) and the gain range of a placed
# run. Cycling loads (fridge, freezer) are placed back to back instead: see `place_cycles`.
USES_PER_DAY = {"ElectricKettle": 6.0, "Microwave": 4.0, "Dishwasher": 1.0, "WashingMachine": 1.0, "Dryer": 0.8,
                "ElectricOven": 0.8, "Television": 2.0, "Computer": 2.0, "HeatPump": 4.0}
CYCLING = ("Refrigerator", "Freezer")
# tracebase is German (230 V) and the sub-metered houses British (240 V): resistive loads draw
# (240/230)^2 = 1.09x more there, and kettles on sale span 1.8-3 kW.
GAIN = {"ElectricKettle": (1.05, 1.5)}
DEFAULT_GAIN = (0.85, 1.2)
DISTRACTORS_PER_DAY = 25.0


def remove_lookalikes(background: np.ndarray, step_w: float, max_len_s: int = 1800) -> np.ndarray:
    """Cut out of `background` every stretch that rises at least `step_w` above its local base
    load for at most `max_len_s` (a kettle or microwave run nobody sub-metered), replacing it with
    that base load. The base is the minimum over the surrounding 10 minutes."""
    x = np.nan_to_num(background, nan=0.0).astype(np.float64)
    n = len(x)
    block = 60
    pad = (-n) % block
    mins = np.concatenate([x, np.full(pad, np.inf)]).reshape(-1, block).min(axis=1)
    k = 5  # blocks either side
    padded = np.concatenate([np.full(k, np.inf), mins, np.full(k, np.inf)])
    local = np.lib.stride_tricks.sliding_window_view(padded, 2 * k + 1).min(axis=1)
    base = np.repeat(local, block)[:n]
    high = x - base >= step_w
    edges = np.flatnonzero(np.diff(np.concatenate([[0], high.astype(np.int8), [0]])))
    out = background.copy()
    for a, b in zip(edges[::2], edges[1::2]):
        if b - a <= max_len_s:
            out[max(0, a - 5):b + 5] = base[max(0, a - 5):b + 5]
    return out


def _gain(rng, appliance: str) -> float:
    lo, hi = GAIN.get(appliance, DEFAULT_GAIN)
    return float(rng.uniform(lo, hi))


def place_runs(rng, n: int, runs: list[Activation], count: int, appliance: str) -> np.ndarray:
    """`count` runs drawn from `runs`, at random non-overlapping times in n seconds."""
    out = np.zeros(n, np.float32)
    taken = np.zeros(n, bool)
    for _ in range(count):
        run = runs[rng.integers(len(runs))]
        length = len(run.power)
        if length >= n:
            continue
        for _try in range(10):
            start = int(rng.integers(0, n - length))
            if not taken[start:start + length].any():
                out[start:start + length] += run.power * _gain(rng, appliance)
                taken[start:start + length] = True
                break
    return out


def place_cycles(rng, n: int, runs: list[Activation], appliance: str) -> np.ndarray:
    """A cycling load's runs one after another from one unit (one fridge in one house), with the
    off-times between them drawn around that unit's own run length (compressors run 30-50 %)."""
    units = sorted({r.unit for r in runs})
    unit = units[rng.integers(len(units))]
    own = [r for r in runs if r.unit == unit]
    gain = _gain(rng, appliance)
    duty = rng.uniform(0.25, 0.55)
    out = np.zeros(n, np.float32)
    t = int(rng.integers(0, 1800))
    while t < n:
        run = own[rng.integers(len(own))]
        piece = run.power[: n - t] * gain
        out[t:t + len(piece)] += piece
        t += len(run.power) + int(len(run.power) * (1 - duty) / duty * rng.uniform(0.7, 1.3))
    return out


def house(rng, appliance: str, background: np.ndarray, targets: list[Activation],
          distractors: list[Activation], name: str, target_share: float = 0.8) -> Series:
    """One semi-synthetic house of len(background) seconds for `appliance` (see the module
    docstring). With probability 1 - target_share the target never runs (a day it is not used)."""
    n = len(background)
    days = n / 86400.0
    if appliance in CYCLING:
        target = place_cycles(rng, n, targets, appliance)
    elif rng.random() < target_share:
        mean = USES_PER_DAY.get(appliance, 2.0) * days
        target = place_runs(rng, n, targets, max(1, int(rng.poisson(mean))), appliance)
    else:
        target = np.zeros(n, np.float32)
    others = np.zeros(n, np.float32)
    if distractors:
        for _ in range(int(rng.poisson(DISTRACTORS_PER_DAY * days))):
            run = distractors[rng.integers(len(distractors))]
            if len(run.power) < n:
                start = int(rng.integers(0, n - len(run.power)))
                others[start:start + len(run.power)] += run.power * float(rng.uniform(*DEFAULT_GAIN))
    valid = np.isfinite(background)
    total = np.where(valid, np.nan_to_num(background) + target + others, 0.0)
    valid &= total > 0
    return Series(name=name, features=derive(total), targets={appliance: target.astype(np.float32)},
                  valid=valid, info={"semi_synthetic": True, "on_share": float(np.mean(target >= ON_THRESHOLD_W[appliance]))})
