"""Reading one label file (nilmd.labels): which form it is, its checks, its labels on its own
1 Hz grid. Forms and rules: docs/ADAPTATION.md, "Labels"."""

from __future__ import annotations

import csv
import hashlib
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nilmd import confirmed_runs, csvfile
from nilmd.appliances import ALIASES, APPLIANCES, appliance_name
from nilmd.errors import LabelError, NilmdError

# A week of 1 Hz rows with the meter fields and 5 appliance columns is 37 MB with epoch times and
# 46 MB with ISO times (measured); read, it takes about 165 MB. 50 MiB holds that week with room;
# a longer stretch goes in several files (each read alone, the stretch is bounded by MAX_SPAN_S).
MAX_FILE_BYTES = 50 * 2**20
# Every array of the stretch together, 4 bytes a second each: 8 weeks x (4 meter fields + 11
# appliances) is 290 MB, well inside the 1 GB that adaptation may use.
MAX_SPAN_S = 56 * 86400
MAX_PERIOD_S = 60
MAX_UNREADABLE = 0.01        # more unreadable rows than this: the layout is wrong, not a few lines
PLUG_COLUMNS = ("w", "watts", "watt", "power_w")
BUILDING_COLUMNS = ("building", "building_id")


@dataclass
class Source:
    info: dict                                # what Labelled.sources says of it
    t0: int = 0
    meter: dict[str, np.ndarray] = field(default_factory=dict)    # its own aggregate (sub-metered)
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # appliance -> W from t0 on
    runs: list = field(default_factory=list)  # confirmed_runs.Run

    @property
    def name(self) -> str:
        return self.info.get("path") or self.info["stream"]


def info(form: str, **kw) -> dict:
    return {"form": form, "start": None, "end": None, "appliances": [], "period_s": 1, "notes": [], **kw}


def read(spec: str, building: str, wanted) -> Source:
    named, path = _split(str(spec))
    _check_size(path)
    with _reading(path):
        header, first = _head(path)
        lower = [h.strip().lower() for h in header]
        _check_building(path, lower, building)
        if set(confirmed_runs.RUN_COLUMNS) <= set(lower):
            runs, notes = confirmed_runs.read_file(path, header)
            said = info("runs", path=path, sha256=_sha256(path), notes=notes)
            return Source(said, runs=[r for r in runs if r.appliance in wanted])
        data = [h.strip() for h in header if h.strip().lower() not in csvfile.TIME_COLUMNS + BUILDING_COLUMNS]
        if any(appliance_name(h) for h in data) and any(h.lower() in csvfile.POWER_COLUMNS for h in data):
            return _submetered(path, header, lower, first, wanted)
        if len(data) == 1:
            return _plug(path, header, data[0], named, first, wanted)
        raise LabelError(f"{path}: columns {', '.join(header)} are no label layout: timestamp,power_total,<appliance>... "
                         "(sub-metered), timestamp,W (a plug log) or appliance,start,end (runs); docs/ADAPTATION.md")


class _reading:
    """csvfile's NilmdError and a file that vanishes or breaks mid-read: one LabelError line."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is not None and issubclass(kind, (OSError, EOFError, UnicodeDecodeError, csv.Error, zlib.error)):
            raise LabelError(f"cannot read {self.path}: {getattr(e, 'strerror', None) or e}") from None
        if kind is not None and issubclass(kind, NilmdError) and not issubclass(kind, LabelError):
            raise LabelError(str(e)) from None
        return False


def _split(spec: str) -> tuple[str | None, str]:
    head, sep, rest = spec.partition("=")
    if sep and appliance_name(head) and not os.path.exists(spec):
        return appliance_name(head), rest
    return None, spec


def _check_size(path: str) -> None:
    try:
        size = os.path.getsize(path)
        if path.endswith(".gz"):  # what it holds counts, not what it takes on disk
            with csvfile.open_text(path) as f:
                size = 0
                while size <= MAX_FILE_BYTES and (chunk := f.read(1 << 20)):
                    size += len(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise LabelError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if size > MAX_FILE_BYTES:
        raise LabelError(f"{path}: {size / 1e6:.0f} MB{' or more uncompressed' if path.endswith('.gz') else ''}, over "
                         f"the {MAX_FILE_BYTES / 1e6:.0f} MB a label file may have (a week of 1 Hz rows with 5 "
                         "appliances fits): split it into files of a week or less")


def _head(path: str) -> tuple[list[str], list[str]]:
    with csvfile.open_text(path) as f:
        rows = csv.reader(f)
        header = next(rows, None)
        first = next((r for r in rows if any(c.strip() for c in r)), [])
    if not header:
        raise LabelError(f"{path}: empty file (a header row is needed)")
    return header, first


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_building(path: str, lower: list[str], building: str) -> None:
    col = next((lower.index(c) for c in BUILDING_COLUMNS if c in lower), None)
    if col is None:
        return
    with csvfile.open_text(path) as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if line > 1 and col < len(row) and row[col].strip() not in ("", building):
                raise LabelError(f"{path} line {line}: building {row[col].strip()!r}, not {building!r}: "
                                 "another building's file?")


def _table(path: str, lower_power: tuple[str, ...], first: list[str], header: list[str]) -> tuple[csvfile.Table, list[str], int]:
    table = csvfile.read(path, power_columns=lower_power)
    rows = len(table) + len(table.skipped)
    notes = []
    if table.skipped:
        line, why = table.skipped[0]
        if len(table.skipped) > MAX_UNREADABLE * rows:
            raise LabelError(f"{path}: {len(table.skipped)} of {rows} rows unreadable (first: line {line}: {why}): "
                             "is it the layout of docs/ADAPTATION.md?")
        notes.append(f"{len(table.skipped)} unreadable rows left out (first: line {line}: {why})")
    tcol = next(i for i, h in enumerate(header) if h.strip().lower() in csvfile.TIME_COLUMNS)
    if tcol < len(first) and confirmed_runs.is_naive(first[tcol]):
        notes.append("times without an offset read as UTC")
    period = csvfile.period_of(table.time)
    if period > MAX_PERIOD_S:
        raise LabelError(f"{path}: a row every {period} s; labels need one every 1 to {MAX_PERIOD_S} s")
    if table.time[-1] - table.time[0] > MAX_SPAN_S:
        raise LabelError(f"{path}: {(table.time[-1] - table.time[0]) / 86400:.0f} days, over {MAX_SPAN_S // 86400}")
    return table, notes, period


def _source(form, path, table, notes, period, targets) -> Source:
    t0 = int(round(table.time[0]))
    n = int(round(table.time[-1] - table.time[0])) + period   # csvfile.hold's grid
    said = info(form, path=path, sha256=_sha256(path), notes=notes)
    said.update(start=t0, end=t0 + n, appliances=sorted(targets), period_s=period)
    return Source(said, t0=t0, targets=targets)


def _held(table, values, period) -> np.ndarray:
    return csvfile.hold(table.time, values, period).astype(np.float32)


def _submetered(path, header, lower, first, wanted) -> Source:
    accepted = set(csvfile.TIME_COLUMNS) | set(csvfile.POWER_COLUMNS) | set(csvfile.METER_FIELDS) | set(BUILDING_COLUMNS)
    unknown = [h for h, low in zip(header, lower) if low not in accepted and appliance_name(h) is None]
    if unknown:
        raise LabelError(f"{path}: unknown column{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}: accepted are "
                         f"a time ({', '.join(csvfile.TIME_COLUMNS)}), power_total, {', '.join(csvfile.METER_FIELDS)}, "
                         f"building and appliances ({', '.join(APPLIANCES)}, or {', '.join(sorted(ALIASES)[:6])}, ...)")
    table, notes, period = _table(path, csvfile.POWER_COLUMNS, first, header)
    targets = {a: np.maximum(_held(table, v, period), 0) for a, v in table.appliances.items() if a in wanted}
    s = _source("submetered", path, table, notes, period, targets)
    s.meter = {"power_total": _held(table, table.power, period),
               **{m: _held(table, v, period) for m, v in table.meter.items()}}
    return s


def _plug(path, header, column, named, first, wanted) -> Source:
    appliance = named or appliance_name(column) or _named_by_file(path)
    if column.lower() not in PLUG_COLUMNS + csvfile.POWER_COLUMNS and appliance_name(column) is None:
        raise LabelError(f"{path}: unknown column {column!r}: a plug log is timestamp and W (or {', '.join(PLUG_COLUMNS[1:])}, "
                         "power, or the appliance's name)")
    if appliance is None:
        raise LabelError(f"{path}: whose plug log is it? Name the column for the appliance (timestamp,ElectricKettle), "
                         f"or the file (kettle.csv), or pass ElectricKettle={path}")
    table, notes, period = _table(path, (column.lower(),), first, header)
    if appliance not in wanted:
        return Source(info("plug", path=path))
    return _source("plug", path, table, notes, period, {appliance: np.maximum(_held(table, table.power, period), 0)})


def _named_by_file(path: str) -> str | None:
    """The appliance a file's name names (kettle-plug.csv): the longest name in it, if one."""
    stem = Path(path).name.lower()
    names = {n.lower(): n for n in APPLIANCES} | ALIASES
    hits = sorted((k for k in names if k in stem), key=len, reverse=True)
    return names[hits[0]] if hits and (len(hits) == 1 or len(hits[0]) > len(hits[1])) else None
