"""Per-run statistics of one appliance, so the simulator's appliance models can be set beside the
real tracebase devices they imitate (scripts/calibrate.py --tracebase, checkpoints/CALIBRATION.md).

Both sides find their runs the same way, with `realdata.runs` and `realdata.RUN_RULES` at 1 Hz:
a simulated kettle and a tracebase kettle are cut by the same threshold, bridge and minimum.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from nilmd.training import realdata

QUANTITIES = ("peak power (W)", "mean power while on (W)", "run length (min)", "energy per run (Wh)")
# P ∝ V^2 for a heating element: a 230 V rating drawn at a UK 240 V supply
UK_OVER_DE = (240.0 / 230.0) ** 2


def run_quantities(power: np.ndarray, rule: tuple[float, int, int]) -> np.ndarray:
    """(runs, 4) array of QUANTITIES for each whole run of 1 Hz `power` under `rule`. A run that
    touches an unmeasured (NaN) second or either end of the array is left out: it was cut short,
    so its length and energy would be wrong (it still counts in runs/day)."""
    on_w = rule[0]
    out = []
    for a, b in realdata.runs(power, rule):
        if a == 0 or b == len(power):
            continue
        p = power[a:b].astype(np.float64)
        if np.isnan(p).any():
            continue
        on = p >= on_w
        out.append((p.max(), p[on].mean(), (b - a) / 60.0, p.sum() / 3600.0))
    return np.array(out, dtype=np.float64).reshape(-1, len(QUANTITIES))


@dataclass
class RunSample:
    """The runs of one appliance gathered over many devices (tracebase) or houses (simulated)."""

    per_run: list = field(default_factory=list)        # run_quantities arrays
    rates: dict = field(default_factory=dict)          # device or house -> [runs, days, days used]

    def add(self, source: str, power: np.ndarray, rule, full_days: float = 0.0) -> None:
        """`full_days` > 0 when `power` covers that many whole days, so its runs give a rate."""
        self.per_run.append(run_quantities(power, rule))
        rate = self.rates.setdefault(source, [0, 0.0, 0])
        if full_days > 0:
            # a whole tracebase day runs from its first to its last reading, a little under 24 h
            days = max(1, round(full_days))
            found = realdata.runs(power, rule)
            rate[0] += len(found)
            rate[1] += days
            rate[2] += len({int(a * days // len(power)) for a, _ in found})

    @property
    def runs(self) -> np.ndarray:
        return np.concatenate(self.per_run) if self.per_run else np.zeros((0, len(QUANTITIES)))

    def summary(self) -> dict:
        """quantity -> (median, p10, p90) over runs; 'runs/day' and 'runs per day used' (per
        whole day with at least one run) -> (pooled rate, p10, p90 over sources); 'days used' ->
        (share of whole days with a run,); 'n' -> (runs, sources)."""
        r = self.runs
        out = {"n": (len(r), len(self.rates))}
        for j, q in enumerate(QUANTITIES):
            out[q] = tuple(np.percentile(r[:, j], (50, 10, 90))) if len(r) else (np.nan,) * 3
        out["runs/day"] = _rate([(k, d) for k, d, _ in self.rates.values() if d > 0])
        out["runs per day used"] = _rate([(k, u) for k, d, u in self.rates.values() if u > 0])
        days = sum(d for _, d, _ in self.rates.values())
        used = sum(u for _, _, u in self.rates.values())
        out["days used"] = (used / days if days else np.nan,)
        return out


def _rate(pairs: list) -> tuple:
    """Pooled count / days, and p10-p90 of the sources' own rates."""
    if not pairs:
        return (np.nan,) * 3
    pooled = sum(k for k, _ in pairs) / sum(d for _, d in pairs)
    return (pooled, *np.percentile([k / d for k, d in pairs], (10, 90)))


def tracebase_samples(root: str, days_per_device: int = 6) -> tuple[dict, dict]:
    """appliance -> RunSample from the tracebase kinds in TRACEBASE_KINDS, and appliance -> its
    kinds found. At most `days_per_device` days of each device are read (~0.1-0.5 s a file),
    whole days (`complete/`) first and spread over its dates; only whole days give runs/day."""
    files = defaultdict(list)
    for t in realdata.tracebase_traces(root):
        if t.appliance:
            complete = os.sep + "complete" + os.sep in t.path
            files[(t.appliance, t.kind, t.device)].append((not complete, t.path))
    samples: dict = defaultdict(RunSample)
    kinds: dict = defaultdict(set)
    for (appliance, kind, device), items in sorted(files.items()):
        items.sort()
        n_complete = sum(1 for inc, _ in items if not inc)
        take = _spread(items[:n_complete], days_per_device)
        take += _spread(items[n_complete:], days_per_device - len(take))
        for incomplete, path in take:
            power = realdata.read_tracebase(path)
            whole = (not incomplete) and np.isfinite(power).sum() >= 0.95 * 86400
            samples[appliance].add(f"{kind}/{device}", power, realdata.RUN_RULES[appliance],
                                   full_days=len(power) / 86400 if whole else 0.0)
        kinds[appliance].add(kind)
    return dict(samples), dict(kinds)


def _spread(items: list, k: int) -> list:
    if k <= 0 or not items:
        return []
    if len(items) <= k:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, k).round().astype(int)]


def _fmt(v: float) -> str:
    return "–" if not np.isfinite(v) else f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}"


def _cell(v: tuple) -> str:
    return "–" if not np.isfinite(v[0]) else f"{_fmt(v[0])} ({_fmt(v[1])}–{_fmt(v[2])})"


def differs(name: str, tb: dict, sim: dict, resistive: bool) -> str:
    """One line: the simulated/tracebase ratio of each median, and which are beyond 1.25x."""
    parts, far = [], []
    for q in (*QUANTITIES, "runs per day used"):
        a, b = sim[q][0], tb[q][0]
        if not (np.isfinite(a) and np.isfinite(b)) or b <= 0:
            continue
        ratio = a / b
        parts.append(f"{q.split(' (')[0]} {_fmt(a)} vs {_fmt(b)} ({ratio:.2f}×)")
        if not 0.8 <= ratio <= 1.25:
            far.append(q.split(" (")[0])
    line = f"**{name}**: simulated vs tracebase median " + ", ".join(parts) + "."
    if resistive:
        line += f" A heating element rated at 230 V draws {UK_OVER_DE:.2f}× more at UK 240 V."
    line += (" Beyond 0.8–1.25×: " + ", ".join(far) + ".") if far else " All within 0.8–1.25×."
    return line


def tracebase_table(tb: dict, kinds: dict, sim: dict, resistive: set, sim_label: str) -> list[str]:
    """Markdown lines: one row per appliance x quantity, then one 'what differs' line each."""
    lines = ["| appliance (tracebase kinds) | quantity | tracebase | simulated |", "|---|---|---:|---:|"]
    notes = []
    for name in sim:
        if name not in tb:
            continue
        t, s = tb[name].summary(), sim[name].summary()
        label = f"{name} ({', '.join(sorted(kinds[name]))})"
        devices = f"{t['n'][1]} device" + "s" * (t["n"][1] != 1)
        lines.append(f"| {label} | whole runs (sources) | {t['n'][0]} ({devices}) | "
                     f"{s['n'][0]} ({s['n'][1]} {sim_label}) |")
        for q in (*QUANTITIES, "runs/day", "runs per day used"):
            lines.append(f"| {label} | {q} | {_cell(t[q])} | {_cell(s[q])} |")
        pct = lambda v: "–" if not np.isfinite(v[0]) else f"{100 * v[0]:.0f}%"  # noqa: E731
        lines.append(f"| {label} | days with a run | {pct(t['days used'])} | {pct(s['days used'])} |")
        notes.append("* " + differs(name, t, s, name in resistive))
    return lines + [""] + notes
