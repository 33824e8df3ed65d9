"""A building's labels, in the forms people have, as one labelled 1 Hz stretch (docs/ADAPTATION.md,
"Labels"): what `nilmd adapt` learns the building from.

Forms, each a CSV file (`.csv` or `.csv.gz`; nilmd.csvfile reads times and cells):
  sub-metered   timestamp, power_total, optional voltage/current/power_factor, one column per
                appliance (W), every 1 to 60 s: it carries its own aggregate, compared with what the
                building's history recorded over the same seconds;
  plug log      timestamp and one power column for ONE appliance (W), paired with the history;
  runs          appliance,start,end: nilmd.confirmed_runs, also from the stream nilm:{b}:labels.
Bad labels end in one LabelError line that says what and where, and nothing is returned.
No torch here: the CLI and a torch-free box load labels too.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass, field

import numpy as np

from nilmd import confirmed_runs, csvfile, days, history, keys, labelfiles
from nilmd.appliances import APPLIANCES, ON_THRESHOLD_W, appliance_name
from nilmd.errors import LabelError
from nilmd.labelfiles import MAX_FILE_BYTES, MAX_SPAN_S  # noqa: F401 (documented here too)

__all__ = ["LabelError", "Labelled", "load", "MAX_FILE_BYTES", "MAX_SPAN_S"]

log = logging.getLogger("nilmd.labels")

METER = ("power_total", *csvfile.METER_FIELDS)
# Another building's file: its aggregate's minute means differ from the recorded ones by more
# than this (the mean over minutes of |file - recorded| / max(recorded, 100 W), each minute's
# clipped at 1 so that a few odd ones cannot decide) over at least MATCH_MINUTES. The same house
# read at 60 s against its 1 Hz record differs by about 0.07 (a spot reading held for a minute).
MATCH_TOLERANCE = 0.2
MATCH_MINUTES = 10


@dataclass
class Labelled:
    building: str
    t0: int                                   # epoch s of sample 0 (1 Hz grid)
    power_total: np.ndarray                   # float32 [n], NaN = gap
    voltage: np.ndarray                       # float32 [n], NaN where absent
    current: np.ndarray
    power_factor: np.ndarray
    targets: dict[str, np.ndarray]            # appliance -> float32 [n] true W, NaN where not labelled
    sources: list[dict] = field(default_factory=list)   # one per input (module docstring of docs/ADAPTATION.md)
    period_s: int = 1                         # the coarsest source's period (1..60)

    def __len__(self) -> int:
        return len(self.power_total)


def load(state_dir, building: str, paths: list[str], *, client=None, appliances=None,
         timezone: str | None = None) -> Labelled:
    """The building's labels from `paths` (and, with a Redis `client`, the runs of nilm:{b}:labels)
    on one 1 Hz grid with the recorded history's aggregate where no file carries one. A path may
    be written APPLIANCE=PATH to say whose plug log it is. `appliances`: only these (default all);
    `timezone`: the days of the runs rule (default the box's)."""
    wanted = _wanted(appliances)
    sources = [s for s in (labelfiles.read(p, building, wanted) for p in paths) if s.targets or s.runs]
    if client is not None:
        runs, got = confirmed_runs.from_stream(client, building)
        runs = [r for r in runs if r.appliance in wanted]
        if runs:
            sources.append(labelfiles.Source(labelfiles.info("runs", stream=keys.labels_stream(building),
                                         sha256=hashlib.sha256(repr(got).encode()).hexdigest()), runs=runs))
    if not sources:
        raise LabelError(f"no labels for building {building}{' of ' + ', '.join(wanted) if appliances else ''}: "
                         "give a file (docs/ADAPTATION.md, \"Labels\") or confirm runs with nilmd label")
    tz = days.zone(timezone or days.box_timezone())
    for s in sources:
        if s.runs:
            confirmed_runs.check_overlaps(s.runs)
            s.info["labelled_days"] = confirmed_runs.labelled_days(s.runs, tz)
            s.t0 = min(lo for ds in s.info["labelled_days"].values() for lo, _ in ds)
            s.info["start"], s.info["end"] = s.t0, max(hi for ds in s.info["labelled_days"].values() for _, hi in ds)
    lo, hi = min(s.info["start"] for s in sources), max(s.info["end"] for s in sources)
    if hi - lo > MAX_SPAN_S:
        raise LabelError(f"the labels span {(hi - lo) / 86400:.0f} days ({confirmed_runs.when(lo)} to "
                         f"{confirmed_runs.when(hi)}), over {MAX_SPAN_S // 86400}: adapt from fewer, closer days")
    out = _grid(state_dir, building, lo, hi)
    span = _history_span(state_dir, building)
    owner: dict[str, np.ndarray] = {}
    for k, s in enumerate(sources):
        if s.meter:
            _overlay_meter(out, s, sources[:k], building)
    for k, s in enumerate(sources):
        for a, y in s.targets.items():
            if s.info["form"] == "plug":
                _check_plug(s, a, y, out, span)
            _place(out, owner, sources, k, a, s.t0, y)
        if s.runs:
            _place_runs(out, owner, sources, k, s, span)
    _check_on(out, sources, wanted if appliances else ())
    out.period_s = max(s.info["period_s"] for s in sources)
    out.sources = [s.info for s in sources]
    for s in sources:
        for note in s.info["notes"]:
            log.warning("labels %s: %s", s.name, note)
    return _trimmed(out)


def _trimmed(out: Labelled) -> Labelled:
    """Without the seconds before the first and after the last the meter knows (a runs day not
    over yet, a plug log longer than the record): labels without input teach nothing."""
    known = np.flatnonzero(np.isfinite(out.power_total))
    if not len(known):
        raise LabelError(f"building {out.building}: no aggregate over the labels' seconds")
    cut = slice(known[0], known[-1] + 1)
    return Labelled(building=out.building, t0=out.t0 + int(known[0]), power_total=out.power_total[cut],
                    voltage=out.voltage[cut], current=out.current[cut], power_factor=out.power_factor[cut],
                    targets={a: y[cut] for a, y in out.targets.items()}, sources=out.sources, period_s=out.period_s)


def _wanted(appliances) -> tuple[str, ...]:
    if appliances is None:
        return APPLIANCES
    names = []
    for a in appliances:
        name = appliance_name(a)
        if name is None:
            raise LabelError(f"unknown appliance {a!r} (one of {', '.join(APPLIANCES)})")
        names.append(name)
    return tuple(names)


# Putting the sources on one grid.

def _window(t0: int, n: int, s0: int, m: int) -> tuple[slice, slice]:
    """Where a stretch of m seconds from s0 lies in one of n seconds from t0: (there, of it)."""
    lo, hi = max(t0, s0), min(t0 + n, s0 + m)
    hi = max(hi, lo)
    return slice(lo - t0, hi - t0), slice(lo - s0, hi - s0)


def _grid(state_dir, building: str, lo: int, hi: int) -> Labelled:
    """The stretch [lo, hi) with what the building's history recorded, NaN elsewhere."""
    rec = history.read(state_dir, building, lo, hi)
    meter = {}
    for m in METER:
        a = np.full(hi - lo, np.nan, np.float32)
        there, of = _window(lo, hi - lo, int(rec.t0), len(getattr(rec, m)))
        a[there] = getattr(rec, m)[of]
        meter[m] = a
    return Labelled(building=building, t0=lo, targets={}, **meter)


def _history_span(state_dir, building: str) -> str:
    recorded = history.span(state_dir, building)
    if recorded is None:
        return f"nothing recorded for building {building} in {state_dir}"
    return f"building {building} recorded {confirmed_runs.when(recorded[0])} to {confirmed_runs.when(recorded[1])}"


def _difference(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """(minutes compared, mean clipped |a - b| / max(b, 100 W)) of the minute means both know at
    least half of: a 60-s file's held means and a 1 Hz record agree there, spikes and all."""
    m = len(a) // 60
    a, b = a[:m * 60].reshape(m, 60).astype(np.float64), b[:m * 60].reshape(m, 60).astype(np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    count = both.sum(axis=1)
    ok = count >= 30
    if not ok.any():
        return 0, 0.0
    am = np.where(both, a, 0).sum(axis=1)[ok] / count[ok]
    bm = np.where(both, b, 0).sum(axis=1)[ok] / count[ok]
    return int(ok.sum()), float(np.mean(np.minimum(np.abs(am - bm) / np.maximum(bm, 100.0), 1.0)))


def _overlay_meter(out: Labelled, s: labelfiles.Source, earlier: list[labelfiles.Source], building: str) -> None:
    """A sub-metered file's own aggregate replaces the record over its seconds (its appliances
    were measured with it), once it agrees with the record and with earlier files."""
    n = len(s.meter["power_total"])
    there, of = _window(out.t0, len(out), s.t0, n)
    minutes, diff = _difference(s.meter["power_total"][of], out.power_total[there])
    if minutes:
        s.info["history_match"] = {"minutes": minutes, "difference": round(diff, 4)}
    against = [(f"what building {building} recorded", minutes, diff)]
    for e in earlier:
        if e.meter:
            theirs, mine = _window(e.t0, len(e.meter["power_total"]), s.t0, n)
            against.append((e.name, *_difference(s.meter["power_total"][mine], e.meter["power_total"][theirs])))
    for what, minutes, diff in against:
        if minutes >= MATCH_MINUTES and diff > MATCH_TOLERANCE:
            raise LabelError(f"{s.name}: its power_total differs from {what} over the same {minutes} minutes by "
                             f"{100 * diff:.0f} % (a minute's mean): another building's file, or its clock is off (times "
                             "without an offset are read as UTC)?")
    for m, values in s.meter.items():
        known = np.isfinite(values[of])
        getattr(out, m)[there][known] = values[of][known]


def _check_plug(s: labelfiles.Source, a: str, y: np.ndarray, out: Labelled, span: str) -> None:
    there, of = _window(out.t0, len(out), s.t0, len(y))
    power = out.power_total[there]
    covered = np.isfinite(power) & np.isfinite(y[of])
    if not covered.any():
        raise LabelError(f"{s.name}: {confirmed_runs.when(s.info['start'])} to {confirmed_runs.when(s.info['end'])} is "
                         f"outside the recorded history ({span}): a plug log is paired with the meter's record")
    if covered.mean() < 0.99:
        s.info["notes"].append(f"the meter recorded {100 * covered.mean():.0f} % of its seconds")
    m = len(power) // 60
    plug, house = (np.where(covered, v, np.nan)[:m * 60].reshape(m, 60) for v in (y[of], power))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        plug, house = np.nanmean(plug, axis=1), np.nanmean(house, axis=1)
    on = plug >= confirmed_runs.on_level(a)
    over = on & (plug > 1.1 * house + 50.0)
    if on.sum() >= 3 and over.sum() > 0.2 * on.sum():
        raise LabelError(f"{s.name}: {a} draws more than the whole house recorded in {over.sum()} of the {on.sum()} "
                         "minutes it is on: another building's log, or its clock is off?")


def _place(out: Labelled, owner: dict, sources: list[labelfiles.Source], k: int, a: str, t0: int, y: np.ndarray) -> None:
    """Source k's labels of appliance a onto the stretch; two sources over one second: an error."""
    if a not in out.targets:
        out.targets[a] = np.full(len(out), np.nan, np.float32)
        owner[a] = np.full(len(out), -1, np.int16)
    there, of = _window(out.t0, len(out), t0, len(y))
    labelled = np.isfinite(y[of])
    clash = labelled & (owner[a][there] >= 0)
    if clash.any():
        i = int(np.argmax(clash))
        other = sources[owner[a][there][i]]
        raise LabelError(f"{sources[k].name} and {other.name} both label {a} at "
                         f"{confirmed_runs.when(out.t0 + there.start + i)}: keep one of them for those seconds")
    out.targets[a][there][labelled] = y[of][labelled]
    owner[a][there][labelled] = k
    if a not in sources[k].info["appliances"]:
        sources[k].info["appliances"].append(a)


def _place_runs(out: Labelled, owner: dict, sources: list[labelfiles.Source], k: int, s: labelfiles.Source, span: str) -> None:
    """The runs rule (nilmd.confirmed_runs): off all day on the days listed, on in each run at
    its learned power, never above the aggregate."""
    n = s.info["end"] - s.t0
    learned = []
    for a, labelled_days in s.info["labelled_days"].items():
        y = np.full(n, np.nan, np.float32)
        for lo, hi in labelled_days:
            y[lo - s.t0:hi - s.t0] = 0.0
        for run in (r for r in s.runs if r.appliance == a):
            on, off = confirmed_runs.learn(run, out.power_total, out.t0, span)
            power = out.power_total[on:off]
            y[on + out.t0 - s.t0:off + out.t0 - s.t0] = np.where(np.isfinite(power), np.minimum(run.watts, power),
                                                                  run.watts)
            learned.append({"appliance": a, "start": out.t0 + on, "end": out.t0 + off, "watts": round(run.watts, 1),
                            "given": [run.start, run.end], "where": run.where})
        _place(out, owner, sources, k, a, s.t0, y)
    s.info["runs"] = learned


def _check_on(out: Labelled, sources: list[labelfiles.Source], required) -> None:
    """An appliance never on in its labels teaches nothing of it: an error where it was asked for
    or given by a plug log (whose whole point it is); a note where a sub-metered file's column
    only says it stayed off."""
    for a in required:
        if a not in out.targets:
            raise LabelError(f"{a}: no labels of it (files give {', '.join(sorted(out.targets)) or 'none'})")
    for a, y in out.targets.items():
        level = confirmed_runs.on_level(a)
        if np.any(y >= level):
            continue
        giving = [s for s in sources if a in s.info["appliances"]]
        line = (f"{a} is never on in its labels (never {level:.0f} W or more, half its on threshold "
                f"{ON_THRESHOLD_W[a]:.0f} W)")
        if a in required or any(s.info["form"] == "plug" for s in giving):
            raise LabelError(f"{', '.join(s.name for s in giving)}: {line}: a wrong plug or column, or it did not run")
        for s in giving:
            s.info["notes"].append(line)
