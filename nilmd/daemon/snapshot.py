"""Ring snapshots in the state directory, so that a restarted daemon is warm at once instead of
waiting WINDOW_SIZE seconds for a new window of data.

What: the newest samples of the ring's current unbroken run (at most a window and an interval:
enough to hold the window of the last prediction), the stream position of the newest of them
(stream mode), and the grid second at which the last predicted window ended (so the restarted
inference carries on with the next window on the same schedule, predicting none twice).

Who: the reader writes it (every INTERVAL_S while new data arrives, and when it stops: SIGTERM,
or the supervisor gone after a SIGKILL). It is the ring's only writer and records the stream
position itself, so what it saves is consistent without any lock. The supervisor restores it
into the fresh ring before it starts the children.

File `{state_dir}/nilmd-{building}.snapshot`, little-endian:
  header   magic "NILMSNAP", u32 version, u32 n, u32 n_features, u32 0,
           f64 created (epoch s), f64 window_end_ts (NaN: none), u64 position ms, u64 seq,
           f64 arrived (version 2: the box's time when the newest sample was received; NaN: unknown)
  payload  f64 ts[n], u8 flags[n], f32 features[n, n_features]
  trailer  u32 CRC-32 of header and payload
Written atomically (a temporary file in the same directory, fsync, rename, fsync of the
directory): a reader of the path sees the old snapshot or the new one, never half of one. A file
that is short, fails its CRC, has another version or feature count, or does not hold one
increasing run of samples is ignored with a log line saying why.

Used only if the first new sample may continue it. The meter's clock need not match the box's
(a meter stamping 3 minutes behind is common), so the decision compares the box's clock with
itself: the newest sample was received at `arrived`; a real-time meter's next sample, received
after now, is stamped at least `now - arrived` seconds after it. When that alone is more than
max_gap_fill the grid would start a new window anyway, and the snapshot is ignored; otherwise it
is restored, and the grid's gap rule decides for good at the first new sample (the reader logs
which way it went). In stream mode any age is fine when it carries a stream position: the
stream's backlog continues it sample by sample. A version-1 file does not know `arrived`: its
newest timestamp is compared with the box's clock, as before.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import struct
import time
import zlib
from dataclasses import dataclass

import numpy as np

from nilmd.atomic import write_atomic  # noqa: F401  (snapshot.write_atomic: the roster, scripts and tests)
from nilmd.config import Config

MAGIC = b"NILMSNAP"
VERSION = 2
READS = (1, 2)
INTERVAL_S = 60.0  # at most a minute of data is missing from the snapshot after a power cut
_HEADER_V1 = struct.Struct("<8sIIIIddQQ")
_HEADER = struct.Struct("<8sIIIIddQQd")
_TRAILER = struct.Struct("<I")


class SnapshotError(Exception):
    """The snapshot file cannot be used; the message says why."""


@dataclass
class Snapshot:
    ts: np.ndarray  # float64[n], one increasing run of grid seconds
    flags: np.ndarray  # uint8[n]
    features: np.ndarray  # float32[n, F]
    created: float
    window_end_ts: float = math.nan  # grid second of the newest sample of the last predicted window
    position: tuple[int, int] | None = None  # stream entry id of the newest sample
    arrived: float = math.nan  # the box's time (epoch s) when the newest sample was received

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def newest(self) -> float:
        return float(self.ts[-1])


def path_for(cfg: Config) -> str:
    return os.path.join(cfg.state_dir, f"nilmd-{cfg.building_id}.snapshot")


# -- encoding ------------------------------------------------------------------------------------
def encode(snap: Snapshot) -> bytes:
    n, f = snap.features.shape
    ms, seq = snap.position or (0, 0)
    body = _HEADER.pack(MAGIC, VERSION, n, f, 0, snap.created, snap.window_end_ts, ms, seq, snap.arrived) + b"".join((
        np.ascontiguousarray(snap.ts, dtype="<f8").tobytes(),
        np.ascontiguousarray(snap.flags, dtype=np.uint8).tobytes(),
        np.ascontiguousarray(snap.features, dtype="<f4").tobytes(),
    ))
    return body + _TRAILER.pack(zlib.crc32(body))


def decode(data: bytes, n_features: int) -> Snapshot:
    if len(data) < _HEADER_V1.size + _TRAILER.size:
        raise SnapshotError(f"only {len(data)} bytes: not a snapshot")
    magic, version = struct.unpack_from("<8sI", data)
    if magic != MAGIC:
        raise SnapshotError("not a nilmd snapshot (bad magic)")
    if version not in READS:
        raise SnapshotError(f"format version {version}, this nilmd reads {' and '.join(map(str, READS))}")
    header = _HEADER if version == 2 else _HEADER_V1
    if len(data) < header.size + _TRAILER.size:
        raise SnapshotError(f"only {len(data)} bytes: not a snapshot")
    _, _, n, f, _, created, window_end_ts, ms, seq, *rest = header.unpack_from(data)
    arrived = rest[0] if rest else math.nan
    expected = header.size + n * (8 + 1 + 4 * f) + _TRAILER.size
    if len(data) != expected:
        raise SnapshotError(f"{len(data)} bytes where the header promises {expected} (truncated?)")
    (crc,) = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
    if zlib.crc32(memoryview(data)[:-_TRAILER.size]) != crc:
        raise SnapshotError("checksum mismatch (corrupted)")
    if f != n_features:
        raise SnapshotError(f"{f} features per sample, this nilmd uses {n_features}")
    if n == 0:
        raise SnapshotError("no samples")
    at = header.size
    ts = np.frombuffer(data, dtype="<f8", count=n, offset=at).astype(np.float64)
    flags = np.frombuffer(data, dtype=np.uint8, count=n, offset=at + 8 * n).copy()
    feats = np.frombuffer(data, dtype="<f4", count=n * f, offset=at + 9 * n).astype(np.float32).reshape(n, f)
    if not (np.all(np.isfinite(ts)) and np.all(np.diff(ts) > 0) and np.all(np.isfinite(feats))):
        raise SnapshotError("its samples are not one increasing run of finite values")
    return Snapshot(ts, flags, feats, created, window_end_ts, (ms, seq) if ms or seq else None, arrived)


# -- files ---------------------------------------------------------------------------------------
def load(path: str, n_features: int) -> Snapshot | None:
    """The snapshot at `path`, None if there is none; SnapshotError if it is unusable."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SnapshotError(f"cannot read it: {e.strerror or e}") from None
    return decode(data, n_features)


# -- taking and restoring ------------------------------------------------------------------------
def take(ring, ctl, keep: int, now: float | None = None) -> Snapshot | None:
    """The newest `keep` samples of the ring's current run (fewer if it is shorter), or None if it
    is empty. Call it from the ring's writer between writes (the reader), so the position matches."""
    head, segment = ring.counters()
    n = min(keep, head - segment)
    if n <= 0:
        return None
    window = ring.window(n)
    ts, flags, feats = window.ts.copy(), window.flags.copy(), window.features.copy()
    del window  # no view into the shared mapping may outlive this call
    end = int(ctl["last_window_end"])
    window_end_ts = float(ts[end - 1 - (head - n)]) if head - n < end <= head else math.nan
    ms, seq = int(ctl["input_pos_ms"]), int(ctl["input_pos_seq"])
    arrived = ctl["last_arrival"] or math.nan  # 0: not known (nothing received in this daemon's life)
    return Snapshot(ts, flags, feats, time.time() if now is None else now, window_end_ts,
                    (ms, seq) if ms or seq else None, arrived)


def unusable(snap: Snapshot, cfg: Config, now: float) -> str | None:
    """Why `snap` must not be restored, or None if it may."""
    age = now - snap.newest
    if age < -cfg.max_clock_skew:
        return f"its newest sample is {-age:.0f} s in the future (was the clock set back?)"
    if cfg.input_mode == "stream" and snap.position is not None:
        return None  # the stream holds what came after it
    if math.isnan(snap.arrived):  # a version-1 file: only the sample's own stamp to go by
        if age <= cfg.max_gap_fill:
            return None
        return (f"its newest sample is {age:.0f} s old, more than --max-gap-fill ({cfg.max_gap_fill} s): "
                "the next sample starts a new window anyway")
    waited = now - snap.arrived
    # +2: both stamps are rounded to whole grid seconds, and a gap of max_gap_fill + 1 is still filled
    if waited <= cfg.max_gap_fill + 2:  # negative: the box's clock was set back; the first sample decides
        return None
    return (f"its newest sample was received {waited:.0f} s ago, more than --max-gap-fill ({cfg.max_gap_fill} s): "
            "the meter's next sample comes at least that long after it and starts a new window anyway")


def keep_for(cfg: Config) -> int:
    """Samples worth keeping: a window, and an interval more so that the window of the last
    prediction (at most an interval old) is whole and the schedule can go on from it."""
    return cfg.window_size + cfg.inference_interval


def restore(snap: Snapshot, ring, ctl, keep: int) -> int:
    """Write `snap` into a fresh, empty ring and set the schedule; returns the samples restored."""
    keep = min(len(snap), keep, ring.capacity)
    ts, feats, flags = snap.ts[-keep:], snap.features[-keep:], snap.flags[-keep:]
    ring.write(ts, feats, flags)
    if snap.position is not None:
        ctl["input_pos_ms"], ctl["input_pos_seq"] = snap.position
    if not math.isnan(snap.window_end_ts):
        # Windows ending at or before it were predicted before the restart: start after them.
        i = int(np.searchsorted(ts, snap.window_end_ts))
        if i >= keep:
            ctl["last_window_end"] = keep
        elif ts[i] == snap.window_end_ts:
            ctl["last_window_end"] = i + 1
    ctl["restored_samples"] = keep
    ctl["last_sample_ts"] = float(ts[-1])
    ctl["last_arrival"] = 0.0 if math.isnan(snap.arrived) else snap.arrived  # a snapshot taken before new data keeps it
    return keep


def restore_at_start(cfg: Config, ring, ctl, log: logging.Logger, now: float | None = None) -> int:
    """The supervisor's start: restore the snapshot if there is a usable one, saying what it did."""
    path = path_for(cfg)
    for stale in glob.glob(os.path.join(glob.escape(cfg.state_dir), f".{os.path.basename(path)}.*.tmp")):
        try:
            os.unlink(stale)  # left by a process killed while writing; the real file is intact
        except OSError:
            pass
    try:
        snap = load(path, ring.n_features)
    except SnapshotError as e:
        log.warning("ring snapshot %s ignored: %s", path, e)
        return 0
    if snap is None:
        log.info("no ring snapshot at %s: the window fills from new data", path)
        return 0
    now = time.time() if now is None else now
    why = unusable(snap, cfg, now)
    if why is not None:
        log.warning("ring snapshot %s ignored: %s", path, why)
        return 0
    n = restore(snap, ring, ctl, keep_for(cfg))
    received = "" if math.isnan(snap.arrived) else f", received {now - snap.arrived:.0f} s ago"
    log.info("warm restart: restored %d samples from %s (newest stamped %s UTC%s%s)", n, path,
             time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(snap.newest)), received,
             f", stream entry {snap.position[0]}-{snap.position[1]}" if snap.position else "")
    return n


class Writer:
    """The reader's snapshots: every INTERVAL_S while new data arrives, and one when it stops.
    A state directory that is read-only, full or gone costs the warm restart, never the daemon:
    one error line per distinct cause (and one when it works again), the rest only counted. The
    failing cause lives in the control block, so a restarted reader does not repeat the line."""

    def __init__(self, cfg: Config, ring, ctl, log: logging.Logger, interval: float = INTERVAL_S,
                 clock=time.monotonic, phase: float = 1.0, files=None):
        """`phase`: the first snapshot after that fraction of the interval. `files`: an executor
        (one thread) that writes the files, so that the caller's loop never waits on an fsync
        (a reader of many buildings writes a snapshot or more a second); None: write here."""
        self.cfg, self.ring, self.ctl, self.log = cfg, ring, ctl, log
        self.path = path_for(cfg)
        self.interval, self.clock = interval, clock
        self.files = files
        self._next = clock() + interval * phase
        self._saved_head = 0  # ring head at the last snapshot written
        self._pending = None  # the file being written by `files`

    def maybe(self) -> None:
        if self.clock() >= self._next:
            self.write()

    def write(self) -> bool:
        """Take a snapshot now (the copy, here: the caller is the ring's writer) and write it: here,
        or queued (True then means queued; one at a time, a slow disk skips an interval)."""
        self._next = self.clock() + self.interval
        head, _ = self.ring.counters()
        if head == self._saved_head or (self._pending is not None and not self._pending.done()):
            return True  # nothing new since the last one (spare the SD card), or the last is still being written
        snap = take(self.ring, self.ctl, keep_for(self.cfg))
        if snap is None:
            return True
        if self.files is not None:
            self._pending = self.files.submit(self._save, snap, head)
            return True
        return self._save(snap, head)

    def final(self) -> bool:
        """The last snapshot (stopping, or the building removed): after any queued one, written here."""
        if self._pending is not None:
            self._pending.result()
        self.files = None
        return self.write()

    def _save(self, snap: Snapshot, head: int) -> bool:
        try:
            write_atomic(self.path, encode(snap))
        except OSError as e:
            self.ctl.add("snapshot_failures")
            cause = e.errno or -1
            if cause != self.ctl["snapshot_errno"]:
                self.log.error("cannot write the ring snapshot %s: %s. nilmd keeps running; a restart will wait for "
                               "the window to fill until this works (logged once per cause)", self.path,
                               e.strerror or e)
            self.ctl["snapshot_errno"] = cause
            return False
        if self.ctl["snapshot_errno"]:
            self.log.info("ring snapshots to %s work again", self.path)
            self.ctl["snapshot_errno"] = 0
        self._saved_head = head
        self.ctl["snapshot_ts"] = snap.created
        return True
