"""The training mixture of one appliance: which series each source contributes to training and to
validation, for one cross-house fold (`leave_out`: the real house kept out of both).

Sources (each a `--mix` weight; scripts/train.py --help):
  real    sub-metered real houses at 8 s, 6 s and 1 min, held to 1 Hz; validation is the last
          file of each resolution of each training house (a later stretch than anything trained on)
  synth   semi-synthetic houses (nilmd.training.synthetic): tracebase runs and the training
          houses' sub-meter runs on the GJW house and on the training houses' residuals
  sim     the simulator's houses (nilmd.sim): the only source of a heat pump, and more oven runs
A left-out house contributes nothing: not its runs, not its residual, not its validation days.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nilmd.appliances import APPLIANCES
from nilmd.training import datasets, realdata, synthetic

# Appliances whose look-alike steps are cut out of backgrounds (their sub-meter is missing in
# some files, and an unlabelled kettle in a background teaches "a kettle is not a kettle").
LOOKALIKE_STEP_W = {"ElectricKettle": 1200.0, "Microwave": 700.0, "ElectricOven": 1500.0, "Dryer": 1500.0}
MAX_DAYS_PER_UNIT = 6   # tracebase days read per device: enough runs, bounded reading time


@dataclass
class Sources:
    train: dict[str, list]   # source -> [Series]
    val: dict[str, list]
    description: dict


def _cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tracebase_runs(real_dir: str, cache_dir: Path) -> list[realdata.Activation]:
    """Every run of every tracebase kind (up to MAX_DAYS_PER_UNIT days a device), cached."""
    root = os.path.join(real_dir, "traces-1s", "tracebase")
    traces = realdata.tracebase_traces(root)
    by_device: dict[tuple, list] = {}
    for tr in traces:
        by_device.setdefault((tr.kind, tr.device), []).append(tr)
    chosen = [tr for group in by_device.values() for tr in sorted(group, key=lambda t: t.path)[:MAX_DAYS_PER_UNIT]]
    src = Path(realdata.__file__).read_bytes()
    path = cache_dir / f"tracebase-{_cache_key([t.path for t in chosen], hashlib.sha256(src).hexdigest())}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            power = z["power"]
        bounds = np.cumsum([0] + [m["n"] for m in meta])
        return [realdata.Activation(appliance=m["appliance"], kind=m["kind"], unit=m["unit"], power=power[a:b])
                for m, a, b in zip(meta, bounds[:-1], bounds[1:])]
    print(f"reading {len(chosen)} tracebase device-days (once; cached in {path.parent})", flush=True)
    runs = []
    for tr in chosen:
        runs += realdata.activations(realdata.read_tracebase(tr.path), tr.appliance, tr.kind, tr.unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    meta = [{"appliance": r.appliance, "kind": r.kind, "unit": r.unit, "n": len(r.power)} for r in runs]
    np.savez(tmp, meta=json.dumps(meta), power=np.concatenate([r.power for r in runs]) if runs else np.zeros(0, np.float32))
    os.replace(tmp, path)
    return runs


def split_runs(runs: list[realdata.Activation]) -> dict[str, list[realdata.Activation]]:
    units: dict[str, set] = {}
    for r in runs:
        units.setdefault(r.kind, set()).add(r.unit)
    out = {"train": [], "val": [], "test": []}
    for r in runs:
        out[realdata.split_of(r.unit, sorted(units[r.kind]))].append(r)
    return out


def _gjw_split(real_dir: str) -> dict[str, list[np.ndarray]]:
    """GJW days split train / val / test by a hash of (file, day), 60/20/20."""
    files = realdata.gjw_files(os.path.join(real_dir, "aggregate-1s", "GJW_House1"))
    out = {"train": [], "val": [], "test": []}
    for f in files:
        x = realdata.read_gjw(f)
        for k in range(0, len(x) - 43200 + 1, 86400):
            day = x[k:k + 86400]
            if np.isfinite(day).mean() < 0.8:
                continue
            h = int(hashlib.sha256(f"{os.path.basename(f)}/{k}".encode()).hexdigest(), 16) % 10
            out["test" if h < 2 else "val" if h < 4 else "train"].append(day)
    return out


def residual(series: datasets.Series) -> np.ndarray:
    """A sub-metered house's aggregate minus all its sub-meters: a real background in which every
    sub-metered appliance is absent (NaN in gaps)."""
    rest = series.features[:, 0].astype(np.float64) - sum(series.targets.values())
    return np.where(series.valid, np.maximum(rest, 0.0), np.nan).astype(np.float32)


def real_houses(real_dir: str, leave_out: str, max_1min_files: int):
    """-> ({house: {period: [Series]}} of the training houses, description)."""
    houses = realdata.house_files(real_dir)
    out, desc = {}, {}
    for house, by_period in houses.items():
        if house == leave_out:
            continue
        out[house] = {}
        for period, files in by_period.items():
            if period == 60 and len(files) > max_1min_files:  # evenly spread months, the last included
                idx = np.unique(np.linspace(len(files) - 1, 0, max_1min_files).round().astype(int))
                files = [files[i] for i in sorted(idx)]
            out[house][period] = [datasets.read_csv(f) for f in files]
            desc.setdefault(house, {})[str(period)] = [os.path.basename(f) for f in files]
    return out, desc


def build(appliance: str, real_dir: str, leave_out: str, weights: dict, cache_dir: Path, seed: int,
          synth_houses: int = 48, synth_hours: float = 12.0, max_1min_files: int = 4,
          sim_loader=None) -> Sources:
    """The series of each source with a weight > 0 (see the module docstring)."""
    train: dict[str, list] = {}
    val: dict[str, list] = {}
    desc: dict = {"leave_out": leave_out, "weights": weights}
    houses, hdesc = real_houses(real_dir, leave_out, max_1min_files) if real_dir else ({}, {})
    desc["real_files"] = hdesc
    if weights.get("real", 0) > 0:
        for house, by_period in houses.items():
            for period, series in by_period.items():
                have = [s for s in series if appliance in s.targets]
                if not have:
                    continue
                if len(have) > 1:  # a week of the latest file: validation every eval_every steps stays cheap
                    val.setdefault("real", []).append(datasets.tail(have[-1], 7 * 86400))
                train.setdefault("real", []).extend(have[:-1] if len(have) > 1 else have)
    if weights.get("synth", 0) > 0 and real_dir:
        runs = split_runs(tracebase_runs(real_dir, cache_dir))
        # the training houses' own sub-meter runs join the training split (the house is its unit)
        for house, by_period in houses.items():
            for period, series in by_period.items():
                if period == 60:
                    continue
                for s in series[:-1] if len(series) > 1 else series:
                    for a, y in s.targets.items():
                        runs["train"] += realdata.activations(np.where(s.valid, y, np.nan), a, f"{house}:{a}", house)
        gjw = _gjw_split(real_dir)
        residuals = {"train": [], "val": []}
        for house, by_period in houses.items():
            for period, series in by_period.items():
                if period == 60:
                    continue
                for k, s in enumerate(series):
                    residuals["val" if k == len(series) - 1 and len(series) > 1 else "train"].append(residual(s))
        for split, count, out in (("train", synth_houses, train), ("val", max(4, synth_houses // 4), val)):
            rng = np.random.default_rng([seed, APPLIANCES.index(appliance), 0 if split == "train" else 1])
            n = int(synth_hours * 3600)

            backgrounds = gjw[split] + residuals[split]

            def random_stretch(i, rng, backgrounds=backgrounds):
                bg = backgrounds[rng.integers(len(backgrounds))]
                start = int(rng.integers(0, max(1, len(bg) - n)))
                return bg[start:start + n]

            if backgrounds:
                out.setdefault("synth", []).extend(
                    _houses(rng, appliance, runs[split], count, random_stretch, f"synth {split} {appliance}"))
        desc["synth"] = {"houses": synth_houses, "hours": synth_hours,
                         "target_runs": {s: sum(r.appliance == appliance for r in runs[s]) for s in runs},
                         "target_units": {s: sorted({r.unit for r in runs[s] if r.appliance == appliance}) for s in runs}}
    if weights.get("sim", 0) > 0 and sim_loader is not None:
        sim_train, sim_val, sim_desc = sim_loader()
        train["sim"], val["sim"] = sim_train, sim_val
        desc["sim"] = sim_desc
    return Sources(train=train, val=val, description=desc)


def synth_test(appliance: str, real_dir: str, cache_dir: Path, seed: int, houses: int = 12,
               hours: float = 24.0) -> list[datasets.Series]:
    """Semi-synthetic TEST houses: tracebase test devices on GJW test days, for the appliances
    without a sub-metered real house (scripts/evaluate.py --synth-test)."""
    runs = split_runs(tracebase_runs(real_dir, cache_dir))
    backgrounds = _gjw_split(real_dir)["test"]
    if not backgrounds:
        return []
    rng = np.random.default_rng([seed, APPLIANCES.index(appliance), 2])
    n = int(hours * 3600)
    return _houses(rng, appliance, runs["test"], houses, lambda i, rng: backgrounds[i % len(backgrounds)][:n],
                   f"synth test {appliance}")


def _houses(rng, appliance: str, runs: list, count: int, stretch, label: str) -> list[datasets.Series]:
    """`count` semi-synthetic houses of one split: the appliance's runs as targets, every other
    run as distractors, on the background `stretch(i, rng)` gives for house i (look-alikes of a
    high-power target cut out first); [] when the split has no run of the appliance."""
    targets = [r for r in runs if r.appliance == appliance]
    distractors = [r for r in runs if r.appliance != appliance]
    if not targets:
        return []
    step = LOOKALIKE_STEP_W.get(appliance)
    out = []
    for i in range(count):
        piece = stretch(i, rng)
        if step:
            piece = synthetic.remove_lookalikes(piece, step)
        out.append(synthetic.house(rng, appliance, piece, targets, distractors, name=f"{label} {i}"))
    return out
