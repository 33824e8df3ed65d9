"""The one CSV reader: `nilmd produce --source FILE` replays a file as a meter would send it, and
training and evaluation read the same files as labelled series, so both take the same layout and
read its times the same way.

Layout: a header row, any column order, `.csv` or `.csv.gz`:
  time       `timestamp` / `time` / `datetime` / `date_time` / `date`: epoch seconds, or ISO 8601.
             An ISO time without an offset is read as **UTC**, on every box (reading it as the
             box's local time shifted the same file by the box's UTC offset); write the offset
             (`2013-10-01 00:00:00+01:00`) when the file is in local time.
  power      `power_total` / `aggregate` / `mains` / `total` / `power` / `P`: whole-house active W
  voltage, current, power_factor    optional meter fields (V, A, 0..1)
  <appliance>   optional true power per appliance in W, named as in nilmd.appliances.APPLIANCES
             or by a REFIT / UK-DALE name (Kettle, Fridge, washing_machine, ...): training only.
Column names are matched without regard to case. A cell that is not a number reads as NaN; a
row whose time cannot be read is skipped and named (`Table.skipped`: line number and why).
"""

from __future__ import annotations

import csv
import gzip
from array import array
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from nilmd.appliances import appliance_name
from nilmd.errors import NilmdError

TIME_COLUMNS = ("timestamp", "time", "datetime", "date_time", "date")
POWER_COLUMNS = ("power_total", "aggregate", "mains", "total", "power", "p")
METER_FIELDS = ("voltage", "current", "power_factor")


def parse_time(text: str, tz=timezone.utc) -> float:
    """Epoch seconds or ISO 8601 (naive: in `tz`, UTC for files) -> epoch seconds; ValueError if neither."""
    try:
        return float(text)
    except ValueError:
        dt = datetime.fromisoformat(text.strip())
        return (dt if dt.tzinfo else dt.replace(tzinfo=tz)).timestamp()


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


@dataclass
class Table:
    path: str
    time: np.ndarray                                   # float64 epoch seconds, ascending (stable)
    power: np.ndarray                                  # float64 W
    meter: dict[str, np.ndarray] = field(default_factory=dict)       # voltage, current, power_factor
    appliances: dict[str, np.ndarray] = field(default_factory=dict)  # nilmd appliance name -> W
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, why) of rows left out

    def __len__(self) -> int:
        return len(self.time)


def open_text(path):
    """The file as text, a `.gz` one decompressed as it is read."""
    return (gzip.open if str(path).endswith(".gz") else open)(path, "rt", newline="")


def read(path, power_columns=POWER_COLUMNS) -> Table:
    """Read a whole file (see the module docstring). NilmdError names the file and what is wrong.
    `power_columns`: the names the power column may have (a smart plug's log names it `W`)."""
    try:
        with open_text(path) as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if not header:
                raise NilmdError(f"{path}: empty file (a header row is needed)")
            columns = _columns(path, header, power_columns)
            times, values, skipped = _parse(rows, *columns)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise NilmdError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not times:
        raise NilmdError(f"{path}: no data row with a readable time")
    t = np.frombuffer(times, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    column = iter(np.frombuffer(v, dtype=np.float64)[order] for v in values)
    tcol, pcol, meter, appliances = columns
    return Table(path=str(path), time=t[order], power=next(column), meter={m: next(column) for m in meter},
                 appliances={a: next(column) for a in appliances}, skipped=skipped)


def _columns(path, header, power_columns):
    lower = [h.strip().lower() for h in header]

    def first(names, role):
        hit = next((lower.index(n) for n in names if n in lower), None)
        if hit is None:
            raise NilmdError(f"{path}: needs a {role} column (one of {', '.join(names)}); found {', '.join(header)}")
        return hit

    tcol, pcol = first(TIME_COLUMNS, "time"), first(power_columns, "power")
    meter = {m: lower.index(m) for m in METER_FIELDS if m in lower}
    appliances = {}
    for i, h in enumerate(header):
        name = appliance_name(h)
        if name and i not in (tcol, pcol) and i not in meter.values():
            appliances.setdefault(name, i)
    return tcol, pcol, meter, appliances


def _parse(rows, tcol, pcol, meter, appliances):
    """Rows -> typed columns as they are read: 8 bytes a cell, where a list of the rows' strings
    took about 100 (a week of 1 Hz rows with 10 columns: 640 MB)."""
    wanted = [pcol, *meter.values(), *appliances.values()]
    times, values, skipped = array("d"), [array("d") for _ in wanted], []
    for line, r in enumerate(rows, start=2):
        try:
            times.append(parse_time(r[tcol]))
        except (ValueError, IndexError):
            skipped.append((line, f"cannot read {r[tcol] if tcol < len(r) else ''!r} as a time "
                                  "(epoch seconds or ISO 8601)"))
            continue
        for v, i in zip(values, wanted):
            v.append(_number(r[i]) if i < len(r) else np.nan)
    return times, values, skipped


def period_of(time: np.ndarray) -> int:
    """The rows' period in whole seconds (the median step between rows; at least 1)."""
    diffs = np.diff(time)
    return max(1, int(round(np.median(diffs[diffs > 0])))) if np.any(diffs > 0) else 1


def hold(time: np.ndarray, values: np.ndarray, period: int) -> np.ndarray:
    """`values` on the 1 Hz grid from time[0], each row held for `period` seconds as a meter's
    reading is held until the next; a second no row covers is NaN (a gap)."""
    n = int(round(time[-1] - time[0])) + period
    pos = (np.round(time - time[0]).astype(np.int64)[:, None] + np.arange(period)).reshape(-1)
    keep = pos < n
    out = np.full(n, np.nan)
    out[pos[keep]] = np.repeat(values, period)[keep]
    return out
