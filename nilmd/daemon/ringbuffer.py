"""The sample ring: numpy arrays over one shared file mapping, one writer, many readers.

Layout of the file (in the runtime directory, a tmpfs such as /dev/shm or /run/nilmd):
  header  int64[16]: magic, version, capacity, n_features, head, reserved, segment_start
  ts      float64[2*capacity]      grid second of each slot
  flags   uint8[2*capacity]        FLAG_MEASURED / FLAG_FILLED
  feats   float32[2*capacity, F]   model features (nilmd.features.FEATURES)

Every sample k is written twice, at k % capacity and k % capacity + capacity, so the newest
`window` samples are always one contiguous slice: a window is a numpy view into the mapping,
never a copy.

Protocol (single writer):
  writer: lock; reserved = head + n; unlock; write the n rows; lock; head += n; unlock
  reader: lock; read head, segment_start; unlock; take the view; ... use it ...
          lock; read reserved; unlock: the view was intact iff reserved <= first slot + capacity
The lock is flock(2) on the file. It is the memory barrier that orders "rows written" before
"head published" on weakly ordered CPUs (aarch64 edge boxes), and unlike a semaphore it is
released by the kernel when its holder dies, so a SIGKILLed writer can never wedge a reader.

A plain file and mmap rather than multiprocessing.shared_memory: no resource tracker to unlink
it behind our back (docs/DESIGN.md §1), a deterministic path to clean up after a SIGKILL, and flock.
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from nilmd.daemon.mapped import MappedFile

MAGIC = 0x4E494C4D52494E47  # "NILMRING"
VERSION = 1
HEADER_WORDS = 16
H_MAGIC, H_VERSION, H_CAPACITY, H_FEATURES, H_HEAD, H_RESERVED, H_SEGMENT = range(7)
FLAG_MEASURED = 0
FLAG_FILLED = 1  # a gap second filled by holding the previous sample (--max-gap-fill)


def _layout(capacity: int, n_features: int) -> tuple[int, int, int, int]:
    header = HEADER_WORDS * 8
    ts = header
    flags = ts + 2 * capacity * 8
    feats = flags + ((2 * capacity + 7) // 8) * 8
    size = feats + 2 * capacity * n_features * 4
    return ts, flags, feats, size


def file_size(capacity: int, n_features: int) -> int:
    """Bytes of a ring's file (shared memory in the runtime dir)."""
    return _layout(capacity, n_features)[-1]


@dataclass
class Window:
    """The newest `size` samples as views into the ring. Check `ring.intact(window)` after use."""

    end: int  # absolute index one past the newest sample
    size: int
    ts: np.ndarray  # float64[size]
    flags: np.ndarray  # uint8[size]
    features: np.ndarray  # float32[size, F], C-contiguous

    @property
    def start(self) -> int:
        return self.end - self.size


class RingBuffer(MappedFile):
    VIEWS = ("_header", "_ts", "_flags", "_feats")

    def __init__(self, path: str, fd: int, mm):
        super().__init__(path, fd, mm)
        self._header = np.frombuffer(mm, dtype=np.int64, count=HEADER_WORDS, offset=0)
        if self._header[H_MAGIC] != MAGIC or self._header[H_VERSION] != VERSION:
            self.close()
            raise ValueError(f"{path} is not a nilmd ring (version {VERSION})")
        self.capacity = int(self._header[H_CAPACITY])
        self.n_features = int(self._header[H_FEATURES])
        ts, flags, feats, _ = _layout(self.capacity, self.n_features)
        n = 2 * self.capacity
        self._ts = np.frombuffer(mm, dtype=np.float64, count=n, offset=ts)
        self._flags = np.frombuffer(mm, dtype=np.uint8, count=n, offset=flags)
        self._feats = np.frombuffer(mm, dtype=np.float32, count=n * self.n_features, offset=feats).reshape(
            n, self.n_features
        )

    # -- life cycle -----------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, capacity: int, n_features: int) -> "RingBuffer":
        *_, size = _layout(capacity, n_features)
        fd, mm = cls._open(path, size)
        header = np.frombuffer(mm, dtype=np.int64, count=HEADER_WORDS)
        header[H_CAPACITY] = capacity
        header[H_FEATURES] = n_features
        header[H_VERSION] = VERSION
        header[H_MAGIC] = MAGIC
        del header
        return cls(path, fd, mm)

    @classmethod
    def attach(cls, path: str) -> "RingBuffer":
        return cls(path, *cls._open(path, None))

    @contextmanager
    def _locked(self):
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- state ----------------------------------------------------------------------------------
    def counters(self) -> tuple[int, int]:
        """(head, segment_start): samples ever written, and where the current unbroken run began."""
        with self._locked():
            return int(self._header[H_HEAD]), int(self._header[H_SEGMENT])

    def run_length(self) -> int:
        """Samples in the current unbroken run: what a window can be taken from, the status hash's
        `buffer_fill` (uncapped). ("fill" inside nilmd means only gap filling: FLAG_FILLED,
        --max-gap-fill, samples_filled.)"""
        head, segment = self.counters()
        return head - segment

    def last(self) -> tuple[float, np.ndarray] | None:
        """Grid second and features of the newest sample (a copy), or None if empty."""
        head, _ = self.counters()
        if head == 0:
            return None
        i = (head - 1) % self.capacity
        return float(self._ts[i]), self._feats[i].copy()

    # -- writer ---------------------------------------------------------------------------------
    def write(self, ts: np.ndarray, features: np.ndarray, flags: np.ndarray) -> None:
        n = len(ts)
        if n == 0:
            return
        with self._locked():
            head = int(self._header[H_HEAD])
            self._header[H_RESERVED] = head + n
        keep = min(n, self.capacity)  # of a batch longer than the ring only the tail survives
        idx = (head + n - keep + np.arange(keep)) % self.capacity
        for array, rows in ((self._ts, ts), (self._flags, flags), (self._feats, features)):
            array[idx] = rows[n - keep:]
            array[idx + self.capacity] = rows[n - keep:]
        with self._locked():
            self._header[H_HEAD] = head + n

    def mark_break(self) -> None:
        """The next sample does not follow the previous one: windows restart from it."""
        with self._locked():
            self._header[H_SEGMENT] = self._header[H_HEAD]

    def reset(self) -> None:
        with self._locked():
            for h in (H_HEAD, H_RESERVED, H_SEGMENT):
                self._header[h] = 0

    # -- readers --------------------------------------------------------------------------------
    def window(self, size: int, end: int | None = None) -> Window | None:
        """Views of the `size` samples ending at `end` (default: the newest), or None if the
        current unbroken run does not hold them."""
        if not 0 < size <= self.capacity:
            raise ValueError(f"window of {size} samples does not fit a ring of {self.capacity}")
        head, segment = self.counters()
        end = head if end is None else end
        if end > head or end - size < segment or head - (end - size) > self.capacity:
            return None
        a = (end - size) % self.capacity
        return Window(end, size, self._ts[a:a + size], self._flags[a:a + size], self._feats[a:a + size])

    def recent(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the grid seconds, flags and power (the first feature) of the newest n samples
        the ring holds, across breaks (fewer if it holds fewer). A row the writer overwrites
        meanwhile is a newer sample: harmless to a statistic over a day (nilmd.daemon.alwayson)."""
        head, _ = self.counters()
        k = min(n, head, self.capacity)
        a = (head - k) % self.capacity
        return self._ts[a:a + k].copy(), self._flags[a:a + k].copy(), self._feats[a:a + k, 0].copy()

    def intact(self, window: Window) -> bool:
        """True if the writer has not (even started to) overwrite any sample of `window`."""
        with self._locked():
            reserved = int(self._header[H_RESERVED])
        return reserved <= window.start + self.capacity

    def address_range(self) -> tuple[int, int]:
        """First and one-past-last address of the mapping (for proving views are zero-copy)."""
        base = np.frombuffer(self._mm, dtype=np.uint8)
        start = base.ctypes.data
        return start, start + base.nbytes
