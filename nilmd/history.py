"""A building's input history on disk: the 1 Hz samples the reader accepted, a file per UTC day,
readable without the daemon (docs/CONTRACT.md, "Input history"; what labels are paired with).

Layout, under the state directory:
  history/<building>/<YYYY-MM-DD>.nilmh                 the day so far, compressed, replaced whole
  history/<building>/<YYYY-MM-DD>.<stamp>.journal       what one writer appended since (raw blocks)
A building id that starts with '.' has its directory named with '%2E' for that dot, so that the
ids '.' and '..', which nilmd accepts, are not the directory itself or its parent.

Both kinds of file are a file header followed by blocks, little-endian:
  file header  magic "NILMHIST", u32 version (1), i32 day (epoch s of the UTC midnight starting it)
  block        u32 payload bytes, u32 t0 (epoch s of its first second), u32 n (seconds), u8 fields
               (bit 0 power_total, always; 1 voltage, 2 current, 3 power_factor), u8 codec (0 raw,
               1 xz), u16 0; the payload; u32 CRC-32 of the 16 header bytes and the payload.
               The payload, decompressed, is float32[n] per field of `fields`, in bit order; NaN:
               no sample accepted in that second (power_total), or the field not sent.
A block lies within its file's day. Blocks are read in order, the compacted file first, then
the journals by stamp: a later block's sample replaces an earlier one's for the same second (a
meter whose clock was set back records some seconds twice; the newest reading is kept).

Crash safety: a writer appends a journal block every few seconds (a SIGKILL loses what was not
yet appended); the compacted file is only ever replaced whole (nilmd.atomic). A block that runs
past the end of its file (torn by a crash) ends the reading of that file; a block whose CRC
fails is skipped; either is one warning line per file, and never an exception.
"""

from __future__ import annotations

import calendar
import logging
import lzma
import math
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass

import numpy as np

from nilmd.atomic import write_atomic
from nilmd.buildings import is_building_id
FIELDS = ("power_total", "voltage", "current", "power_factor")
DAY_S = 86400
MAGIC, VERSION = b"NILMHIST", 1
COMPACT, JOURNAL = ".nilmh", ".journal"
RAW, XZ = 0, 1
HOLE_S = 8  # a gap up to this long stays inside one block as NaN; a longer one starts a new block
FILE_MODE = 0o640  # the service's group (an operator running `nilmd history`) may read it

_FILE = struct.Struct("<8sIi")
_BLOCK = struct.Struct("<IIIBBH")
_CRC = struct.Struct("<I")
_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:\.(\d+)\.journal|\.nilmh)$")
_MAX_PAYLOAD = DAY_S * 4 * len(FIELDS) + 1024  # more than any block of a day can hold: a torn header

log = logging.getLogger("nilmd.history")


@dataclass
class Recorded:
    t0: int  # epoch seconds (UTC) of sample 0
    power_total: np.ndarray  # float32 [n], NaN where nothing was accepted
    voltage: np.ndarray  # float32 [n], NaN where absent
    current: np.ndarray
    power_factor: np.ndarray

    def __len__(self) -> int:
        return len(self.power_total)

    @property
    def timestamps(self) -> np.ndarray:
        """Epoch seconds of each sample (float64, as nilmd.csvfile reads them)."""
        return self.t0 + np.arange(len(self), dtype=np.float64)


@dataclass
class Day:
    """One day file's worth, for listings."""
    day: str  # YYYY-MM-DD (UTC)
    seconds: int  # seconds with an accepted sample
    bytes: int  # on disk, compacted file and journals together


# -- names ---------------------------------------------------------------------------------------
def building_dir(state_dir, building: str) -> str:
    if not is_building_id(building):
        raise ValueError(f"{building!r} is not a building id (1-64 letters, digits, '_', '-' or '.')")
    name = "%2E" + building[1:] if building.startswith(".") else building
    return os.path.join(str(state_dir), "history", name)


def day_of(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(int(t)))


def day_start(day: str) -> int:
    """Epoch seconds of the UTC midnight starting `day` (YYYY-MM-DD); ValueError if not a date."""
    return calendar.timegm(time.strptime(day, "%Y-%m-%d"))


def _files(directory: str) -> dict[str, list[tuple[int, str]]]:
    """day -> its files in reading order, as (stamp, name); the compacted file has stamp -1."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        m = _NAME.match(name)
        if m:
            out.setdefault(m.group(1), []).append((int(m.group(2)) if m.group(2) else -1, name))
    return {d: sorted(v) for d, v in sorted(out.items())}


# -- blocks --------------------------------------------------------------------------------------
def file_header(day: str) -> bytes:
    return _FILE.pack(MAGIC, VERSION, day_start(day))


def encode_block(t0: int, values: np.ndarray, codec: int = RAW) -> bytes:
    """One block of `values` (float32 [4, n]: FIELDS by row, NaN where absent) from second t0."""
    n = values.shape[1]
    mask = 1 | sum(1 << k for k in range(1, len(FIELDS)) if not np.isnan(values[k]).all())
    payload = b"".join(np.ascontiguousarray(values[k], dtype="<f4").tobytes()
                       for k in range(len(FIELDS)) if mask >> k & 1)
    if codec == XZ:
        payload = lzma.compress(payload, preset=0)  # preset 0: most of preset 6's gain at a fifth of the CPU
    header = _BLOCK.pack(len(payload), t0, n, mask, codec, 0)
    return header + payload + _CRC.pack(zlib.crc32(payload, zlib.crc32(header)))


def _decode_payload(payload: bytes, n: int, mask: int, codec: int) -> np.ndarray:
    if codec == XZ:
        payload = lzma.decompress(payload)
    elif codec != RAW:
        raise ValueError(f"codec {codec} is unknown")
    rows = [k for k in range(len(FIELDS)) if mask >> k & 1]
    if not mask & 1 or mask >> len(FIELDS) or len(payload) != 4 * n * len(rows):
        raise ValueError("its payload does not match its header")
    values = np.full((len(FIELDS), n), np.nan, dtype=np.float32)
    values[rows] = np.frombuffer(payload, dtype="<f4").reshape(len(rows), n)
    return values


def scan(data: bytes, where: str) -> tuple[int | None, list[tuple[int, np.ndarray, bytes]]]:
    """A file's day start and its good blocks as (t0, values [4, n], the block's bytes). What is
    wrong is one warning naming `where`; a file that is not a history file gives (None, [])."""
    if len(data) < _FILE.size or data[:8] != MAGIC:
        log.warning("history file %s ignored: not a nilmd history file (%d bytes)", where, len(data))
        return None, []
    _, version, day = _FILE.unpack_from(data)
    if version != VERSION:
        log.warning("history file %s ignored: format version %d, this nilmd reads %d", where, version, VERSION)
        return None, []
    blocks, damaged, torn, at = [], 0, 0, _FILE.size
    while at < len(data):
        if len(data) - at < _BLOCK.size + _CRC.size:
            torn = len(data) - at
            break
        size, t0, n, mask, codec, _ = _BLOCK.unpack_from(data, at)
        end = at + _BLOCK.size + size + _CRC.size
        if size > _MAX_PAYLOAD or end > len(data):
            torn = len(data) - at
            break
        raw = data[at:end]
        (crc,) = _CRC.unpack_from(raw, len(raw) - _CRC.size)
        try:
            if zlib.crc32(memoryview(raw)[:-_CRC.size]) != crc:
                raise ValueError("checksum mismatch")
            if not (day <= t0 and t0 + n <= day + DAY_S):
                raise ValueError("seconds outside its day")
            blocks.append((t0, _decode_payload(raw[_BLOCK.size:-_CRC.size], n, mask, codec), raw))
        except (ValueError, lzma.LZMAError):
            damaged += 1
        at = end
    if damaged or torn:
        what = [f"{damaged} damaged block{'s' * (damaged != 1)} skipped"] if damaged else []
        what += [f"a torn end of {torn} bytes skipped (written when the writer was killed?)"] if torn else []
        log.warning("history file %s: %s", where, " and ".join(what))
    return day, blocks


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:  # compacted meanwhile: its journal's samples are in the day file now
        return b""


def _load_day(directory: str, day: str, files: list[tuple[int, str]]) -> tuple[np.ndarray, int]:
    """The day's grid (float32 [4, DAY_S], NaN where nothing) from its files in reading order,
    and the bytes they take. A journal folded into the day file while this read: read again."""
    for _ in range(3):
        grid = np.full((len(FIELDS), DAY_S), np.nan, dtype=np.float32)
        size, vanished = 0, False
        for stamp, name in files:
            path = os.path.join(directory, name)
            data = _read(path)
            if not data:
                vanished = vanished or stamp >= 0
                continue
            size += len(data)
            start, blocks = scan(data, path)
            for t0, values, _ in blocks:
                _overlay(grid, t0 - start, values)
        if not vanished:
            break
        files = _files(directory).get(day, [])
    return grid, size


def _overlay(grid: np.ndarray, at: int, values: np.ndarray) -> None:
    """Later samples win, whole (all four fields of a second together)."""
    seen = ~np.isnan(values[0])
    view = grid[:, at:at + values.shape[1]]
    view[:, seen] = values[:, seen]


# -- reading -------------------------------------------------------------------------------------
def days(state_dir, building: str) -> list[str]:
    """The days ('YYYY-MM-DD', UTC) with a history file, oldest first."""
    return list(_files(building_dir(state_dir, building)))


def read(state_dir, building: str, start: float, end: float) -> Recorded:
    """The 1 Hz grid of seconds in [start, end): the samples recorded there, NaN elsewhere."""
    t0 = math.ceil(start)
    n = max(0, math.ceil(end) - t0)
    out = np.full((len(FIELDS), n), np.nan, dtype=np.float32)
    directory = building_dir(state_dir, building)
    for day, files in _files(directory).items():
        d0 = day_start(day)
        lo, hi = max(t0, d0), min(t0 + n, d0 + DAY_S)
        if lo < hi:
            grid, _ = _load_day(directory, day, files)
            out[:, lo - t0:hi - t0] = grid[:, lo - d0:hi - d0]
    return Recorded(t0, *out)


def span(state_dir, building: str) -> tuple[int, int] | None:
    """The first and the last second recorded (inclusive), None if nothing is."""
    directory = building_dir(state_dir, building)
    listed = list(_files(directory).items())

    def seconds(day, files):
        return day_start(day) + np.flatnonzero(~np.isnan(_load_day(directory, day, files)[0][0]))

    first = next((int(s[0]) for s in (seconds(*d) for d in listed) if len(s)), None)
    if first is None:
        return None
    return first, next(int(s[-1]) for s in (seconds(*d) for d in reversed(listed)) if len(s))


def coverage(state_dir, building: str) -> list[Day]:
    """Each day kept, with the seconds recorded in it and its size on disk."""
    directory = building_dir(state_dir, building)
    out = []
    for day, files in _files(directory).items():
        grid, size = _load_day(directory, day, files)
        out.append(Day(day, int(np.count_nonzero(~np.isnan(grid[0]))), size))
    return out


# -- writing (one writer per building: the daemon's reader) --------------------------------------
def append(state_dir, building: str, stamp: int, slots: np.ndarray, values: np.ndarray) -> int:
    """Append samples (seconds `slots`, ascending except where a meter's clock was set back;
    `values` float32 [4, n]) to this writer's journals, a block per run of close seconds; returns
    the bytes written. `stamp` names the writer's journals (its start, in ms): later wins."""
    directory = building_dir(state_dir, building)
    written = 0
    for day, data in _journal_blocks(slots, values).items():
        path = os.path.join(directory, f"{day}.{stamp}{JOURNAL}")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, FILE_MODE)
        except FileNotFoundError:  # the building's first sample (or its directory was removed)
            os.makedirs(directory, exist_ok=True)
            fd = os.open(path, flags, FILE_MODE)
        try:
            if os.fstat(fd).st_size == 0:
                data = file_header(day) + data
            view = memoryview(data)  # one write: a reader sees whole blocks, or a tail it skips
            while view:
                view = view[os.write(fd, view):]
            written += len(data)
        finally:
            os.close(fd)
    return written


def _journal_blocks(slots: np.ndarray, values: np.ndarray) -> dict[str, bytes]:
    """day -> the encoded blocks of the samples that fall in it."""
    slots = np.asarray(slots, dtype=np.int64)
    if not len(slots):
        return {}
    step = np.diff(slots)
    first = int(slots[0])
    if (step == 1).all() and first // DAY_S == int(slots[-1]) // DAY_S:  # the usual flush: one run
        return {day_of(first): encode_block(first, values)}
    day_of_slot = slots // DAY_S
    cuts = np.flatnonzero((step <= 0) | (step > HOLE_S) | (np.diff(day_of_slot) != 0)) + 1
    out: dict[str, list[bytes]] = {}
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(slots)]):
        first = int(slots[lo])
        run = np.full((len(FIELDS), int(slots[hi - 1]) - first + 1), np.nan, dtype=np.float32)
        run[:, slots[lo:hi] - first] = values[:, lo:hi]
        out.setdefault(day_of(first), []).append(encode_block(first, run))
    return {day: b"".join(blocks) for day, blocks in out.items()}


def compact(state_dir, building: str, day: str) -> int:
    """Fold the day's journals into its compacted file, as one xz block after the blocks it
    holds, and delete them; returns the compacted file's size (0: nothing to fold)."""
    directory = building_dir(state_dir, building)
    files = _files(directory).get(day, [])
    journals = [name for stamp, name in files if stamp >= 0]
    if not journals:
        return 0
    target = os.path.join(directory, day + COMPACT)
    kept = [raw for _, _, raw in scan(_read(target), target)[1]] if files[0][0] < 0 else []
    new = [block for name in journals for block in scan(_read(os.path.join(directory, name)),
                                                         os.path.join(directory, name))[1]]
    if new:
        first = min(t0 for t0, _, _ in new)
        merged = np.full((len(FIELDS), max(t0 + v.shape[1] for t0, v, _ in new) - first), np.nan, dtype=np.float32)
        for t0, values, _ in new:
            _overlay(merged, t0 - first, values)
        seen = np.flatnonzero(~np.isnan(merged[0]))
        if len(seen):
            kept.append(encode_block(first + int(seen[0]), merged[:, seen[0]:seen[-1] + 1], XZ))
    data = file_header(day) + b"".join(kept)
    write_atomic(target, data, FILE_MODE)
    for name in journals:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    return len(data)


def journal_days(state_dir, building: str) -> list[str]:
    """Days that have journals to fold."""
    return [day for day, files in _files(building_dir(state_dir, building)).items() if files[-1][0] >= 0]


def prune(state_dir, building: str, keep_days: int, now: float | None = None) -> list[str]:
    """Delete the days that ended more than `keep_days` days ago (by the box's clock); returns them."""
    oldest = oldest_kept(keep_days, now)
    directory = building_dir(state_dir, building)
    gone = []
    for day, files in _files(directory).items():
        if day_start(day) < oldest:
            for _, name in files:
                try:
                    os.unlink(os.path.join(directory, name))
                except FileNotFoundError:
                    pass
            gone.append(day)
    return gone


def oldest_kept(keep_days: int, now: float | None = None) -> int:
    """The first second of the oldest day still kept: samples before it are not worth writing."""
    horizon = (time.time() if now is None else now) - keep_days * DAY_S
    return int(horizon // DAY_S) * DAY_S
