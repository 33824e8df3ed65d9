"""The reader's input history (nilmd.history): every building's accepted samples, on disk.

The reader's loop only appends each accepted sample to its building's list (a tuple, well under
a microsecond) and, every FLUSH_S, hands the lists to a thread of the recorder's own, which
appends them to the buildings' journals: one open, write and close per building, so that a
daemon of 1000 buildings holds no file open between flushes. A SIGKILL loses what was not yet
handed over and written: at most FLUSH_S and the write in flight. Nothing here waits on the disk
in the loop; a disk slower than the input keeps the samples in the lists, up to MAX_PENDING a
building, and drops the oldest beyond that (one line when it starts, one when it ends).

Once every MAINTAIN_S, spread over that interval across buildings, the thread folds each
building's journals into its day files (compact, xz) and deletes the days older than
NILMD_HISTORY_DAYS. A state directory that is full, read-only or gone costs the history, never
the daemon: one error line per cause, one when it works again.
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nilmd import history
from nilmd.config import Config

FLUSH_S = 2.0
MAINTAIN_S = 3600.0
MAX_PENDING = 600  # samples a building keeps waiting for a slow disk (10 minutes at 1 Hz)


class Recorder:
    def __init__(self, cfg: Config, log: logging.Logger, clock=time.monotonic, flush_s: float = FLUSH_S,
                 maintain_s: float = MAINTAIN_S):
        self.state_dir, self.keep_days, self.log = cfg.state_dir, cfg.history_days, log
        self.clock, self.flush_s, self.maintain_s = clock, flush_s, maintain_s
        self.stamp = int(time.time() * 1000)  # this writer's journals: later than any before it
        self.pending: dict[str, list] = {}
        self.dropped = 0  # samples dropped since the disk fell behind (0: it keeps up)
        self._writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history")
        self._job = None
        self._next_flush = clock() + flush_s
        self._due: dict[str, float] = {}  # building -> when its journals are next folded (the thread's)
        self._failing = None  # the cause being reported (the thread's)

    # -- the reader's loop -------------------------------------------------------------------------
    def record(self, building: str, samples, placements) -> None:
        """Accepted samples (nilmd.daemon.ingest.Sample) and their placements on the grid."""
        rows = self.pending.setdefault(building, [])
        rows.extend((p.slot, s.power, s.voltage, s.current, s.power_factor) for s, p in zip(samples, placements))
        if len(rows) > MAX_PENDING:
            if not self.dropped:
                self.log.warning("input history: the disk under %s falls behind; dropping the oldest unwritten "
                                 "samples (the daemon goes on)", self.state_dir)
            self.dropped += len(rows) - MAX_PENDING
            del rows[:len(rows) - MAX_PENDING]

    def maybe(self) -> None:
        """Hand the samples to the writing thread when a flush is due and the last one is done."""
        if self.clock() < self._next_flush or (self._job is not None and not self._job.done()):
            return
        self._next_flush = self.clock() + self.flush_s
        if self.dropped:
            self.log.info("input history: writing keeps up again (%d samples were dropped)", self.dropped)
            self.dropped = 0
        batch, self.pending = self.pending, {}
        self._job = self._writes.submit(self._flush, batch, self.clock())

    def close(self) -> None:
        """Stopping: what is pending, written before this returns."""
        if self._job is not None:
            self._job.result()
        batch, self.pending = self.pending, {}
        self._writes.submit(self._flush, batch, None).result()
        self._writes.shutdown(wait=True)

    # -- the writing thread ----------------------------------------------------------------------
    def _flush(self, batch: dict[str, list], now: float | None) -> None:
        failures = []
        oldest = history.oldest_kept(self.keep_days)
        for building, rows in batch.items():
            if not rows:
                continue
            # The first write of this run: its journals are folded at a time spread over the interval.
            self._due.setdefault(building, self.clock() + random.random() * self.maintain_s)
            table = np.array(rows, dtype=np.float64)
            keep = table[:, 0] >= oldest
            if keep.any():
                failures += self._try(f"cannot write the input history of {building}", history.append,
                                      self.state_dir, building, self.stamp, table[keep, 0].astype(np.int64),
                                      table[keep, 1:].T.astype(np.float32))
        for building, due in self._due.items() if now is not None else ():
            if now >= due:
                self._due[building] = due + self.maintain_s
                failures += self._try(f"cannot fold or prune the input history of {building}", self.maintain,
                                      building)
        self._report(failures)

    def maintain(self, building: str) -> None:
        for day in history.journal_days(self.state_dir, building):
            history.compact(self.state_dir, building, day)
        gone = history.prune(self.state_dir, building, self.keep_days)
        if gone:
            self.log.debug("input history of %s: deleted %s (older than %d days)", building, ", ".join(gone),
                           self.keep_days)

    @staticmethod
    def _try(what: str, fn, *args) -> list[tuple[object, str]]:
        """[] if it worked, else [(its cause, one line)]."""
        try:
            fn(*args)
        except OSError as e:
            return [(e.errno or -1, f"{what}: {e.strerror or e}")]
        except Exception as e:  # a bug here must cost the history, never the reader
            return [(type(e).__name__, f"{what}: {e!r}")]
        return []

    def _report(self, failures: list[tuple[object, str]]) -> None:
        """One error line per cause (not per building or flush), and one when all works again."""
        if failures and failures[0][0] != self._failing:
            self._failing, line = failures[0]
            more = f" (and {len(failures) - 1} more this flush)" if len(failures) > 1 else ""
            self.log.error("%s%s. nilmd keeps running; those samples are not kept (logged once per cause)", line, more)
        elif not failures and self._failing is not None:
            self.log.info("input history under %s works again", self.state_dir)
            self._failing = None
