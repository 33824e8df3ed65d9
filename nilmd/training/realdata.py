"""Real data beyond the sub-metered CSV files: tracebase single-appliance days, the GJW 1 Hz
whole-house meter, whole appliance runs ("activations") cut from either, and the split of
houses and devices between training, validation and test.

Data folder layout (`--real-dir`; the public sources are named in checkpoints/README.md):
  real-1min/{REFIT,UKDALE}_House2_YYYY-MM.csv.gz     aggregate + sub-meters, 1 minute
  real-8s/REFIT_House2_8s_*.csv.gz, real-6s/UKDALE_House2_6s_*.csv.gz   the same houses, 8 s / 6 s
  traces-1s/tracebase/{complete,incomplete}/<Kind>/<device>_<date>.csv.gz   `dd/mm/YYYY HH:MM:SS;W;W8`
  aggregate-1s/GJW_House1/4-POWER_REAL_FINE_*.csv.gz   `YYYY-MM-DD HH:MM:SS,W`, written on change
Every reader returns 1 Hz float32 watts with NaN where nothing was measured.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np


# tracebase kinds -> the nilmd appliance they are; the other kinds serve only as distractors.
TRACEBASE_KINDS = {
    "WaterKettle": "ElectricKettle", "MicrowaveOven": "Microwave", "Dishwasher": "Dishwasher",
    "Washingmachine": "WashingMachine", "LaundryDryer": "Dryer", "LaundryDrier": "Dryer",
    "Refrigerator": "Refrigerator", "Freezer": "Freezer", "Cookingstove": "ElectricOven",
    "TV-LCD": "Television", "TV-CRT": "Television", "PC-Desktop": "Computer", "PC-Laptop": "Computer",
}

# What makes one run of an appliance (Kelly & Knottenbelt's rules where they give them, but the
# kettle is cut at 1 kW: tracebase's 230 V kettles draw ~1.95 kW, under the 2 kW "on" of a UK
# 240 V kettle, and are scaled up when placed, see nilmd.training.synthetic): on at
# >= on_w, runs closer than min_off_s merged (a dishwasher heating twice is one run), runs shorter
# than min_on_s dropped (a spike is not a use).  appliance -> (on_w, min_on_s, min_off_s)
RUN_RULES = {
    "ElectricKettle": (1000.0, 12, 0), "Microwave": (200.0, 12, 30), "Dishwasher": (10.0, 1800, 1800),
    "WashingMachine": (20.0, 1800, 160), "Refrigerator": (50.0, 60, 12), "Freezer": (50.0, 60, 12),
    "Dryer": (100.0, 600, 120), "ElectricOven": (200.0, 300, 300), "Television": (30.0, 300, 60),
    "Computer": (20.0, 300, 60), "HeatPump": (300.0, 300, 120),
}
DISTRACTOR_RULE = (30.0, 10, 30)
PAD_S = 8  # seconds kept on each side of a run: its switch-on and switch-off edges


@dataclass
class Trace:
    kind: str         # tracebase kind (folder name) or "<house>:<appliance>" for a sub-meter column
    appliance: str    # nilmd appliance, or "" for a distractor kind
    unit: str         # what the split is made by: the device, or the device-day for a lone device
    path: str
    device: str = ""  # the device part of `<device>_<date>.csv.gz`


@dataclass
class Activation:
    appliance: str    # nilmd appliance ("" for a distractor)
    kind: str
    unit: str
    power: np.ndarray  # float32 W at 1 Hz, the whole run with PAD_S either side


def tracebase_traces(root: str) -> list[Trace]:
    """Every tracebase device-day under `root` (the `tracebase` folder), with its split unit: the
    device when its kind has at least 3 devices, else the device-day (so a lone freezer still
    gives training, validation and test days, never the same day twice)."""
    files = sorted(glob.glob(os.path.join(root, "*", "*", "*.csv*")))
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for f in files:
        kind = os.path.basename(os.path.dirname(f))
        device = re.sub(r"_?\d{4}\.\d{2}\.\d{2}.*$", "", os.path.basename(f)) or os.path.basename(f)
        by_kind.setdefault(kind, []).append((device, f))
    out = []
    for kind, items in by_kind.items():
        lone = len({d for d, _ in items}) < 3
        for device, f in items:
            unit = f"{kind}/{os.path.basename(f)}" if lone else f"{kind}/{device}"
            out.append(Trace(kind=kind, appliance=TRACEBASE_KINDS.get(kind, ""), unit=unit, path=f, device=device))
    return out


def split_of(unit: str, units: list[str], fractions=(0.6, 0.2, 0.2)) -> str:
    """'train' | 'val' | 'test' for `unit` among `units` (one kind's): by a hash of the name, so
    the split never depends on which files happen to be present in which order; each of val and
    test gets at least one unit when there are three or more."""
    ranked = sorted(set(units), key=lambda u: hashlib.sha256(u.encode()).hexdigest())
    n = len(ranked)
    n_test = max(1, round(fractions[2] * n)) if n >= 3 else (1 if n == 2 else 0)
    n_val = max(1, round(fractions[1] * n)) if n >= 3 else 0
    k = ranked.index(unit)
    return "test" if k < n_test else "val" if k < n_test + n_val else "train"


_SEPARATORS = str.maketrans("/:;", "   ")


def read_tracebase(path: str) -> np.ndarray:
    """One tracebase device-day -> 1 Hz W from its first to its last reading; each reading held
    until the next, at most 60 s (a longer silence is NaN: the plug was not reporting)."""
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        text = f.read()
    # `dd/mm/YYYY HH:MM:SS;W;W8` is 8 numbers a row once the separators are one: parsing it as one
    # flat array is ~50x faster than row by row (1,268 files).
    flat = np.array(text.translate(_SEPARATORS).split(), dtype=np.float64) if text.strip() else np.zeros(0)
    try:
        rows = flat.reshape(-1, 8)
    except ValueError:  # a malformed row: fall back to the rows that parse
        rows = np.array([r for r in (_row(ln) for ln in text.splitlines()) if r is not None]).reshape(-1, 8)
    if not len(rows):
        return np.zeros(0, np.float32)
    day, month, year = rows[:, 0].astype(int), rows[:, 1].astype(int), rows[:, 2].astype(int)
    dates = {(y, m, d): datetime(y, m, d, tzinfo=timezone.utc).timestamp()
             for y, m, d in set(zip(year.tolist(), month.tolist(), day.tolist()))}
    t = np.array([dates[k] for k in zip(year.tolist(), month.tolist(), day.tolist())])
    t += rows[:, 3] * 3600 + rows[:, 4] * 60 + rows[:, 5]
    return _hold(t, rows[:, 6], max_hold=60)


def _row(line: str):
    try:
        values = [float(v) for v in re.split(r"[/ :;]+", line.strip())]
    except ValueError:
        return None
    return values if len(values) == 8 else None


def read_gjw(path: str) -> np.ndarray:
    """One GJW whole-house file -> 1 Hz W. The meter writes a row only when the value changes,
    so each value is held until the next row (up to 1 h; a longer silence is a gap)."""
    t, w = [], []
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            try:
                t.append(datetime.fromisoformat(parts[0]).replace(tzinfo=timezone.utc).timestamp())
                w.append(float(parts[1]))
            except (ValueError, IndexError):
                continue
    return _hold(np.array(t), np.array(w), max_hold=3600)


def _hold(t: np.ndarray, w: np.ndarray, max_hold: int) -> np.ndarray:
    if len(t) == 0:
        return np.zeros(0, np.float32)
    order = np.argsort(t, kind="stable")
    t, w = np.round(t[order] - t[order][0]).astype(np.int64), w[order]
    n = int(t[-1]) + 1
    idx = np.searchsorted(t, np.arange(n), side="right") - 1  # the latest reading at or before each second
    age = np.arange(n) - t[idx]
    out = np.where(age <= max_hold, w[idx], np.nan)
    return np.where(np.isfinite(out), np.maximum(out, 0.0), np.nan).astype(np.float32)


def runs(power: np.ndarray, rule: tuple[float, int, int]) -> list[tuple[int, int]]:
    """[start, end) of each run of `power` by `rule` (on_w, min_on_s, min_off_s)."""
    on_w, min_on, min_off = rule
    on = np.nan_to_num(power) >= on_w
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(np.int8), [0]])))
    spans = list(zip(edges[::2], edges[1::2]))
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a - merged[-1][1] <= min_off:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged if b - a >= min_on]


def activations(power: np.ndarray, appliance: str, kind: str, unit: str) -> list[Activation]:
    """Whole runs of one appliance's 1 Hz power (a sub-meter column or a tracebase day), kept from
    start to end with PAD_S on each side; a run touching a NaN (unmeasured) second is dropped."""
    rule = RUN_RULES.get(appliance, DISTRACTOR_RULE)
    out = []
    for a, b in runs(power, rule):
        lo, hi = max(0, a - PAD_S), min(len(power), b + PAD_S)
        piece = power[lo:hi]
        if np.isnan(piece).any():
            continue
        out.append(Activation(appliance=appliance, kind=kind, unit=unit, power=piece.astype(np.float32)))
    return out


def gjw_files(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "*POWER_REAL_FINE*.csv*")))


def house_files(real_dir: str) -> dict[str, dict[int, list[str]]]:
    """The sub-metered real houses under `real_dir`: house -> {period s: files}. The house is the
    file name's first two parts (`REFIT_House2`), so the 1-minute and the 8-s files of one house
    are one house, left out or used together."""
    out: dict[str, dict[int, list[str]]] = {}
    for sub, period in (("real-1min", 60), ("real-8s", 8), ("real-6s", 6)):
        for f in sorted(glob.glob(os.path.join(real_dir, sub, "*.csv*"))):
            house = "_".join(os.path.basename(f).split("_")[:2])
            out.setdefault(house, {}).setdefault(period, []).append(f)
    return out
