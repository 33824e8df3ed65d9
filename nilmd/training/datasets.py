"""Training and evaluation data as 1 Hz series of model features and true appliance power.

Two sources, one shape (`Series`):
  * real CSV files (`read_csv`): REFIT / UK-DALE sub-metered houses (8 s, 6 s, 1 minute) or the
    generic layout documented below, brought to 1 Hz by holding each row for its period;
  * simulated houses (`simulated`): nilmd.sim.simulator, at 1 Hz with every meter field.

CSV layout: nilmd.csvfile (the reader `nilmd produce` uses too). A row with an empty, non-finite
or exactly 0 W aggregate is a gap (a real house always draws something; the shared 1-minute files
write their gaps as 0), as is any second not covered by a row, or a REFIT sensor glitch value
(GLITCH_W). Gaps are kept in `valid` and left out of losses and scores.

No torch here: only numpy and the daemon's own `features.derive`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nilmd import csvfile
from nilmd.appliances import APPLIANCES
from nilmd.features import derive

# REFIT's sensor glitch values (its publishers' notes): never a real reading.
GLITCH_W = (12288.0, 32767.0, 32768.0, 49150.0)


@dataclass
class Series:
    """One contiguous stretch of 1 Hz samples."""
    name: str
    features: np.ndarray                       # float32 [n, 5], features.derive of the meter fields
    targets: dict[str, np.ndarray]             # appliance -> float32 true W [n]
    valid: np.ndarray                          # bool [n]: the aggregate is real data here
    period_s: int = 1                          # sampling period of the source (60: held minutes)
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.valid)


def read_csv(path) -> Series:
    """A real-data CSV file (nilmd.csvfile) -> one 1 Hz Series, each row held for its period,
    gaps marked invalid."""
    table = csvfile.read(path)
    t = table.time
    period = csvfile.period_of(t)

    def hold(values):
        return csvfile.hold(t, values, period)

    agg = hold(np.where(np.isin(table.power, GLITCH_W), np.nan, table.power))
    valid = np.isfinite(agg) & (agg > 0)
    fields = {m: hold(v) for m, v in table.meter.items()}
    features = derive(np.where(valid, agg, 0.0), fields.get("voltage"), fields.get("current"),
                      fields.get("power_factor"))
    targets = {}
    for name, values in table.appliances.items():
        y = hold(np.where(np.isin(values, GLITCH_W), np.nan, values))
        valid &= np.isfinite(y)
        targets[name] = np.nan_to_num(np.maximum(y, 0.0)).astype(np.float32)
    return Series(name=str(path), features=features, targets=targets, valid=valid, period_s=period,
                  info={"start": float(t[0]), "rows": len(t), "meter_fields": sorted(table.meter)})


def tail(series: Series, seconds: int) -> Series:
    """The last `seconds` of a series (a validation stretch of bounded cost)."""
    if len(series) <= seconds:
        return series
    sl = slice(len(series) - seconds, None)
    return Series(name=f"{series.name} (last {seconds / 86400:g} days)", features=series.features[sl],
                  targets={a: y[sl] for a, y in series.targets.items()}, valid=series.valid[sl],
                  period_s=series.period_s, info=series.info)


def hold_input(x: np.ndarray, period: int, phase: int) -> np.ndarray:
    """What a meter reporting every `period` s gives the daemon, which holds each reading until
    the next: a spot reading held (periods up to 10 s), or for 1-minute meters the minute's mean
    held over that minute, as the 1-minute files are read (nilmd.training.datasets.read_csv)."""
    if period <= 1:
        return x
    n = len(x)
    idx = np.arange(n)
    start = ((idx - phase % period) // period) * period + phase % period
    start = np.clip(start, 0, n - 1)
    if period < 60:
        return x[start]
    block = np.searchsorted(np.unique(start), start)
    sums = np.zeros((block[-1] + 1, x.shape[1]), np.float64)
    np.add.at(sums, block, x)
    counts = np.bincount(block)[:, None]
    return (sums / counts)[block].astype(np.float32)


def simulated(seed: int, t0: float, n: int) -> Series:
    """n seconds of simulated house `seed` from epoch time t0, with every meter field."""
    from nilmd.sim.simulator import Building  # imported here: the real-data path must not need it

    tr = Building(seed).trace(t0, n)
    features = derive(tr.power_total, tr.voltage, tr.current, tr.power_factor)
    targets = {a: np.asarray(tr.appliances[a], dtype=np.float32) for a in APPLIANCES if a in tr.appliances}
    return Series(name=f"sim house {seed} @ {t0:.0f}", features=features, targets=targets,
                  valid=np.ones(n, dtype=bool), info={"seed": seed, "t0": t0})


def segment_starts(seed: int, segments: int, days: float, year_start: float = 1704067200.0) -> list[float]:
    """Where to cut `segments` stretches of `days` out of house `seed`'s year: spread evenly over
    the year (so seasonal appliances such as the heat pump appear) with a per-house jitter, on
    whole days so that the hour-of-day habits stay aligned with the clock."""
    rng = np.random.default_rng([seed, 7])
    span = 365 // segments
    return [year_start + 86400.0 * (k * span + int(rng.integers(0, max(1, span - int(np.ceil(days))))))
            for k in range(segments)]


def simulated_set(seeds, segments: int, days: float) -> list[Series]:
    n = int(days * 86400)
    return [simulated(seed, t0, n) for seed in seeds for t0 in segment_starts(seed, segments, days)]


def scored_mask(valid: np.ndarray, receptive_field: int) -> np.ndarray:
    """Samples whose whole receptive field is real data: a gap (fed to the model as 0 W) cannot
    have influenced their prediction. Used for the real homes, which have gaps."""
    bad = np.concatenate([[0], np.cumsum(~valid)])
    idx = np.arange(len(valid))
    lo = np.maximum(idx - receptive_field + 1, 0)
    return valid & (bad[idx + 1] - bad[lo] == 0)


SIM_DIR = Path(__file__).resolve().parents[1] / "sim"


def simulator_source() -> bytes:
    """What the simulated data depends on: a cache made by other simulator code is not reused."""
    return (SIM_DIR / "simulator.py").read_bytes() + (SIM_DIR / "appliance_models.py").read_bytes()


def simulated_cached(cache_dir, kind, seeds, segments, days) -> list[Series]:
    """Simulating is slow next to reading a file: do it once per data description and code."""
    sim_src = simulator_source()
    key = hashlib.sha256(json.dumps([seeds, segments, days]).encode() + sim_src).hexdigest()[:12]
    path = Path(cache_dir) / f"sim-{kind}-{key}.npz"
    if path.exists():
        with np.load(path) as npz:  # each npz[key] reads the whole array again: read each once
            z = {k: npz[k] for k in npz.files}
        bounds = np.cumsum([0, *z["lengths"]])
        return [Series(name=str(name), features=z["features"][a:b], valid=z["valid"][a:b],
                                targets={n: z["t_" + n][a:b] for n in APPLIANCES if "t_" + n in z})
                for name, a, b in zip(z["names"], bounds[:-1], bounds[1:])]
    series = []
    for seed in seeds:
        print(f"simulating {kind} house {seed} ({segments} x {days} days)", flush=True)
        series += simulated_set([seed], segments, days)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")  # two trainings may share a run dir
    np.savez(tmp, names=np.array([s.name for s in series]), lengths=np.array([len(s) for s in series]),
             features=np.concatenate([s.features for s in series]), valid=np.concatenate([s.valid for s in series]),
             **{"t_" + a: np.concatenate([s.targets[a] for s in series]) for a in series[0].targets})
    os.replace(tmp, path)
    return series
