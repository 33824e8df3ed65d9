"""Runs the owner confirms: "the kettle ran from 07:30 to 07:34" (docs/ADAPTATION.md, "Labels").

From a CSV file (`appliance,start,end`), from `nilmd label` (which appends to the Redis stream
nilm:{b}:labels) and read back from that stream. A run says when, not how much: its power is
learned from the aggregate's step at its edges (`learn`). What a run says about the rest of the
time is the rule of `labelled_days`: the owner lists EVERY run of that appliance on each local
day that holds one of its runs, so the rest of those days is off; other days say nothing.
"""

from __future__ import annotations

import csv
import re
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from nilmd import csvfile, days, keys
from nilmd.appliances import APPLIANCES, ON_THRESHOLD_W, appliance_name
from nilmd.errors import LabelError

RUN_COLUMNS = ("appliance", "start", "end")
MAX_RUN_S = 86400            # a longer run is a typo in a date (the heat pump: enter a run a day)
FUTURE_SLACK_S = 60          # the box's clock and the owner's watch may differ a little
EDGE_SEARCH_S = 90           # owners give times to the minute: look this far for the real edge
EDGE_GUARD_S = 2             # inrush and the meter's own averaging blur an edge over a second or two
ON_FRACTION = 0.5            # "on" for a label: half the shipped threshold (a 1.7 kW kettle is one)
MAX_STREAM_ENTRIES = 100_000  # years of runs entered by hand; more is not an owner typing
_CLOCK_TIME = re.compile(r"^\d{1,2}:\d{2}(:\d{2})?$")


@dataclass
class Run:
    appliance: str
    start: int               # epoch s, the first second on
    end: int                 # epoch s, the first second off again
    where: str               # "runs.csv line 3", "nilm:b:labels entry 1714..-0": for error lines
    watts: float = float("nan")   # learned (`learn`)


def on_level(appliance: str) -> float:
    return ON_FRACTION * ON_THRESHOLD_W[appliance]


def when(t: float, tz=timezone.utc) -> str:
    return datetime.fromtimestamp(t, tz).isoformat(timespec="seconds")


def parse_when(text: str, tz, now: float) -> float:
    """What a person types: epoch seconds, ISO 8601, or a clock time (today). A time without an
    offset is the box's local time (`tz`): a person means their wall clock (files differ:
    nilmd.csvfile reads them as UTC, as machines write them)."""
    text = text.strip()
    if _CLOCK_TIME.match(text):
        text = f"{datetime.fromtimestamp(now, tz).date().isoformat()}T{text}"
    try:
        return csvfile.parse_time(text, tz)
    except ValueError:
        raise LabelError(f"{text!r} is not a time: epoch seconds, ISO 8601 (2024-05-01T07:30, "
                         "+02:00 for an offset) or a clock time today (07:30)") from None


def check_run(appliance: str, start: float, end: float, where: str, now: float | None = None) -> Run:
    """A run as given -> Run, or LabelError naming `where` and what is wrong."""
    name = appliance_name(appliance.strip())
    if name is None:
        raise LabelError(f"{where}: unknown appliance {appliance!r} (one of {', '.join(APPLIANCES)}, or a "
                         "REFIT / UK-DALE name such as kettle, fridge, washing_machine)")
    now = time.time() if now is None else now
    if not end > start:
        raise LabelError(f"{where}: the end {when(end)} is not after the start {when(start)}")
    if end - start > MAX_RUN_S:
        raise LabelError(f"{where}: {name} from {when(start)} to {when(end)} is {(end - start) / 3600:.1f} h "
                         f"long, over {MAX_RUN_S // 3600} h (a date typed wrong? enter a long run a day at a time)")
    if end > now + FUTURE_SLACK_S:
        raise LabelError(f"{where}: the end {when(end)} is in the future (now {when(now)})")
    return Run(name, int(round(start)), int(round(end)), where)


def check_overlaps(runs: list[Run]) -> None:
    """Two runs of one appliance over the same seconds: one of them is wrong."""
    runs = sorted(runs, key=lambda r: (r.appliance, r.start))
    for a, b in zip(runs, runs[1:]):
        if a.appliance == b.appliance and b.start < a.end:
            raise LabelError(f"{b.where}: {b.appliance} from {when(b.start)} overlaps its run from {when(a.start)} "
                             f"to {when(a.end)} ({a.where}): delete one")


def read_file(path: str, header: list[str]) -> tuple[list[Run], list[str]]:
    """A runs CSV file (`appliance,start,end`, times as nilmd.csvfile reads them) -> runs; the
    header has been checked. Each bad row is an error: a file of runs is short, and a run
    dropped would make its day's other seconds "off" wrongly."""
    lower = [h.strip().lower() for h in header]
    col = {c: lower.index(c) for c in RUN_COLUMNS}
    runs, naive = [], False
    with csvfile.open_text(path) as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if line == 1 or not any(cell.strip() for cell in row):
                continue
            where = f"{path} line {line}"
            try:
                cells = {c: row[i].strip() for c, i in col.items()}
                start, end = csvfile.parse_time(cells["start"]), csvfile.parse_time(cells["end"])
            except (IndexError, ValueError):
                raise LabelError(f"{where}: cannot read {','.join(row)!r} as appliance,start,end (epoch seconds or "
                                 "ISO 8601 times)") from None
            naive = naive or is_naive(cells["start"])
            runs.append(check_run(cells["appliance"], start, end, where))
    notes = ["times without an offset read as UTC"] if naive else []
    return runs, notes


def is_naive(text: str) -> bool:
    """An ISO time without an offset (which nilmd.csvfile reads as UTC)."""
    try:
        float(text)
        return False
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.strip()).tzinfo is None
    except ValueError:
        return False


# The stream nilm:{b}:labels: one entry a run, fields appliance, start, end (epoch s), source.

def add(client, building: str, run: Run, source: str = "cli") -> str:
    entry = client.xadd(keys.labels_stream(building), {"appliance": run.appliance, "start": str(run.start),
                                                       "end": str(run.end), "source": source})
    return entry.decode() if isinstance(entry, bytes) else entry


def entries(client, building: str) -> list[tuple[str, dict]]:
    """The stream's entries, oldest first, decoded; read in pages so that a long one stays cheap."""
    stream, out, lo = keys.labels_stream(building), [], "-"
    while True:
        page = client.xrange(stream, min=lo, max="+", count=1000)
        for entry_id, fields in page:
            out.append((_text(entry_id), {_text(k): _text(v) for k, v in fields.items()}))
        if len(page) < 1000:
            return out
        if len(out) > MAX_STREAM_ENTRIES:
            raise LabelError(f"{stream}: more than {MAX_STREAM_ENTRIES} runs: not runs entered by hand")
        lo = "(" + out[-1][0]


def from_stream(client, building: str) -> tuple[list[Run], list[tuple[str, dict]]]:
    stream, runs = keys.labels_stream(building), []
    got = entries(client, building)
    for entry_id, f in got:
        where = f"{stream} entry {entry_id}"
        try:
            start, end = float(f["start"]), float(f["end"])
            runs.append(check_run(f["appliance"], start, end, where, now=float("inf")))
        except (KeyError, ValueError):
            raise LabelError(f"{where}: not a run (fields appliance, start, end in epoch seconds): {f}; "
                             f"remove it with nilmd label --building-id {building} --delete {entry_id}") from None
    return runs, got


def delete(client, building: str, entry_ids: list[str]) -> int:
    return client.xdel(keys.labels_stream(building), *entry_ids)


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# What a run says, on the 1 Hz grid of the aggregate.

def labelled_days(runs: list[Run], tz) -> dict[str, list[tuple[int, int]]]:
    """appliance -> the local days (start, end epoch s) that hold one of its runs: labelled whole."""
    out: dict[str, set] = {}
    for r in runs:
        d = datetime.fromtimestamp(r.start, tz).date()
        while True:
            out.setdefault(r.appliance, set()).add(d)
            d += timedelta(days=1)
            if days.bounds(d.isoformat(), tz)[0] >= r.end:
                break
    return {a: [tuple(int(x) for x in days.bounds(d.isoformat(), tz)) for d in sorted(ds)] for a, ds in out.items()}


def learn(run: Run, power: np.ndarray, t0: int, history_span: str) -> tuple[int, int]:
    """Find the run's edges near the given times and its power from the aggregate's step there
    (median after minus median before, at both ends; their mean). Sets run.watts; returns the
    edges as grid indices. LabelError where nothing was recorded or no step is to be seen."""
    s, e = run.start - t0, run.end - t0
    dur = e - s
    w = int(np.clip(dur // 3, 3, 30))
    tol = int(min(EDGE_SEARCH_S, max(1, dur // 2)))
    around = power[max(0, s - tol - w):max(0, min(len(power), e + tol + w))]
    if not np.isfinite(around).any():
        raise LabelError(f"{run.where}: {run.appliance} from {when(run.start)} to {when(run.end)} is outside the "
                         f"recorded history ({history_span}): runs are learned from the meter's record")
    up, down = _edge(power, s, tol, w, rising=True), _edge(power, e, tol, w, rising=False)
    if up is None or down is None or not down[0] > up[0]:
        raise LabelError(f"{run.where}: {run.appliance} from {when(run.start)} to {when(run.end)}: the meter "
                         f"recorded too little around its {'start' if up is None else 'end'} to learn its power")
    steps = [x for x in (up[1], down[1]) if x > 0]
    run.watts = float(np.mean(steps)) if steps else 0.0
    if run.watts < on_level(run.appliance):
        raise LabelError(f"{run.where}: {run.appliance} from {when(run.start)} to {when(run.end)}: the meter steps "
                         f"by {run.watts:.0f} W at its edges, below {on_level(run.appliance):.0f} W (half its on "
                         "threshold): are the times right? (a file's times without an offset are UTC)")
    return up[0], down[0]


def _edge(power, at: int, tol: int, w: int, rising: bool):
    """(index, step W) of the largest step up (down) within `tol` s of `at`: placed by the
    moving means (sharpest at the real edge), sized by the medians beside it (robust to spikes)."""
    g = EDGE_GUARD_S
    lo, hi = max(at - tol, w + g), min(at + tol + 1, len(power) - w - g)
    if lo >= hi:
        return None
    seg = power[lo - w - g:hi + w + g]
    win = sliding_window_view(seg, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # an all-NaN window is "not recorded"
        mean, med = np.nanmean(win, axis=1), np.nanmedian(win, axis=1)
    k = np.arange(hi - lo)                                # candidate edge lo + k
    sign = 1.0 if rising else -1.0
    placed = sign * (mean[k + w + g] - mean[k + g])       # the w s from the edge minus the w s before it
    if not np.isfinite(placed).any():
        return None
    best = int(np.nanargmax(placed))
    step = sign * (med[best + w + 2 * g] - med[best])      # the same, each side g s further off
    return lo + best, float(step) if np.isfinite(step) else float("nan")
