"""Reader process: meter messages -> validated, gap-filled features in the ring buffer.

The only writer of the ring and of the reader's slots in the control block. It never crashes on
input (nilmd.daemon.ingest rejects or repairs every message, by reason) and survives Redis going away
by reconnecting with backoff while it keeps stamping its heartbeat.
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nilmd.daemon import control as ctlmod
from nilmd.daemon import snapshot
from nilmd.daemon.recorder import Recorder
from nilmd.config import Config
from nilmd.errors import EXIT_OK, redis_error
from nilmd.features import derive
from nilmd.daemon.ingest import Grid, Rejected, parse_sample
from nilmd.backoff import Backoff
from nilmd.daemon.ringbuffer import FLAG_FILLED, FLAG_MEASURED
from nilmd.daemon.batch import Batch
from nilmd.daemon.sources import DISCONNECT_CAUSES, make_source
from nilmd.daemon.worker import Worker


class Feed:
    """One building's input: its ring and block, its grid (gap and clock rules) and its snapshots.
    Nothing here is shared with another building, so one building's bad input, clock jump or gap
    touches no other."""

    def __init__(self, reader: "Reader", building: str, ring, ctl, cfg: Config):
        self.building, self.ring, self.ctl, self.cfg = building, ring, ctl, cfg
        self.log, self.throttle, self.history = reader.log, reader.throttle, reader.history
        self.tag = f"building {building}: " if reader.listed else ""  # log lines name it when there are many
        last = ring.last()  # a restarted reader (or a restored snapshot) carries on where it stopped
        self.grid = Grid(cfg.max_gap_fill, last_slot=int(last[0]) if last else None)
        # Test mode replays simulated time from its start on every run: nothing worth keeping.
        # With many buildings their snapshots are spread over the interval, not all in one turn.
        self.snapshots = None if cfg.mode == "test" else snapshot.Writer(
            cfg, ring, ctl, reader.log, phase=random.random() if reader.listed else 1.0, files=reader.files)
        self._prev = last[1] if last else None  # features of the newest sample, for gap filling
        # A restored snapshot and no new sample yet: the first one decides whether it is continued.
        restored = int(ctl["restored_samples"])
        self._restored_slot = int(last[0]) if last and restored and ring.counters()[0] == restored else None
        self.cut_after = None  # newest slot before a pub/sub cut: the next sample's gap is what it lost

    def ingest(self, messages, now: float, max_clock_skew: float) -> int:
        """Validate and place a batch of raw messages; returns how many were accepted."""
        ctl = self.ctl
        accepted, placements = [], []
        for raw in messages:
            try:
                sample = parse_sample(raw, now, max_clock_skew)
                placement = self.grid.place(sample.timestamp, now)
            except Rejected as r:
                ctl.add(f"rejected_{r.reason}")
                self.throttle.log(r.reason, logging.WARNING,
                                  f"{self.tag}rejected a sample ({r.reason}{': ' + r.detail if r.detail else ''})")
                continue
            for repair in sample.repairs:
                ctl.add(f"repaired_{repair}")
            accepted.append(sample)
            placements.append(placement)
        # Counters move together after the batch, so received == accepted + rejected whenever
        # the status is read between batches.
        ctl.add("samples_received", len(messages))
        if not accepted:
            return 0
        if self.cut_after is not None:
            ctl.add("samples_lost", max(0, placements[0].slot - self.cut_after - 1))
            self.cut_after = None
        feats = derive([s.power for s in accepted], [s.voltage for s in accepted],
                       [s.current for s in accepted], [s.power_factor for s in accepted])
        self._write(placements, feats)
        if self.history is not None:
            self.history.record(self.building, accepted, placements)
        ctl.add("samples_accepted", len(accepted))
        ctl["last_sample_ts"] = float(placements[-1].slot)
        ctl["last_arrival"] = now
        if self._restored_slot is not None:
            self._report_restored(placements[0])
        return len(accepted)

    def _report_restored(self, first) -> None:
        gap = first.slot - self._restored_slot
        self._restored_slot = None
        if first.breaks:
            self.log.warning("%sthe restored ring snapshot was not continued: the first new sample is stamped %d s "
                             "%s its newest (more than --max-gap-fill, %d s, after it is a gap); the window restarts",
                             self.tag, abs(gap), "after" if gap >= 0 else "before", self.cfg.max_gap_fill)
        else:  # (one of many buildings: at debug, the supervisor counts them)
            self.log.log(logging.DEBUG if self.tag else logging.INFO, "%swarm restart continued: the first new "
                         "sample is stamped %d s after the snapshot's newest", self.tag, gap)

    def _write(self, placements, feats: np.ndarray) -> None:
        ts, rows, flags = [], [], []
        prev = self._prev
        for k, p in enumerate(placements):
            if p.breaks:
                self._flush(ts, rows, flags)
                ts, rows, flags = [], [], []
                self.ring.mark_break()
                if p.clock_jump:
                    self.ctl.add("clock_jumps")
                    self.log.warning("%sthe meter's clock was set back (its samples now stamped %s): following it; "
                                     "the window restarts", self.tag,
                                     time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p.slot)))
                elif prev is not None:
                    self.ctl.add("gaps_broken")
                    self.throttle.log("gap", logging.WARNING,
                                      f"{self.tag}gap in the meter data longer than {self.cfg.max_gap_fill} s: "
                                      "the window restarts (no predictions until it is full again)")
            elif p.fill:
                ts.extend(range(p.slot - p.fill, p.slot))
                rows.extend([prev] * p.fill)
                flags.extend([FLAG_FILLED] * p.fill)
                self.ctl.add("samples_filled", p.fill)
            ts.append(p.slot)
            rows.append(feats[k])
            flags.append(FLAG_MEASURED)
            prev = feats[k]
        self._flush(ts, rows, flags)
        self._prev = prev.copy()

    def _flush(self, ts, rows, flags) -> None:
        if ts:
            self.ring.write(np.asarray(ts, dtype=np.float64), np.asarray(rows, dtype=np.float32),
                            np.asarray(flags, dtype=np.uint8))


class Reader(Worker):
    role = "reader"

    SNAPSHOT_CHECK_S = 1.0  # how often the loop asks every building whether its snapshot is due

    def __init__(self, cfg: Config, paths: dict, source=None):
        super().__init__(cfg, paths)
        # The snapshot files are written by one thread of their own: an fsync never holds up the input.
        self.files = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshots")
        # The input history (NILMD_HISTORY_DAYS); test mode's simulated time is not worth keeping.
        self.history = Recorder(cfg, self.log) if cfg.history_days and cfg.mode != "test" else None
        self._snapshot_check = 0.0
        self.feeds: dict[str, Feed] = {}
        self.add_buildings(self.roster.current)
        self.source = source if source is not None else make_source(cfg, self.feeds, self.ctl, paths.get("fence_token"))

    def add_building(self, building: str) -> None:
        ring, ctl, cfg = self.attach(building)
        self.feeds[building] = Feed(self, building, ring, ctl, cfg)
        if getattr(self, "source", None) is not None:
            self.source.add(self.feeds[building])

    def remove_building(self, building: str) -> None:
        """Its last snapshot, then let its shared memory go (the supervisor has unlinked the files)."""
        feed = self.feeds.pop(building, None)
        if feed is None:
            return
        self.source.remove(building)
        if feed.snapshots is not None:
            feed.snapshots.final()
        feed.ring.close()
        feed.ctl.close()

    # -- ingest: the per-sample path --------------------------------------------------------------
    def ingest(self, messages, now: float | None = None) -> int:
        """Validate and place a batch of raw messages (a Batch says whose each is; a plain list is
        the one building's); returns how many were accepted."""
        now = time.time() if now is None else now
        groups = messages.groups() if isinstance(messages, Batch) else {self.roster.current[0]: messages}
        accepted = 0
        for building, raw in groups.items():
            feed = self.feeds.get(building)
            if feed is not None:  # (a building removed while its batch was in flight: dropped with it)
                accepted += feed.ingest(raw, now, self.cfg.max_clock_skew)
        return accepted

    # -- the loop ----------------------------------------------------------------------------------
    def _wait(self, seconds: float) -> None:
        """Sleep with heartbeats, so a long backoff never looks like a hang."""
        deadline = time.monotonic() + seconds
        while self.alive and time.monotonic() < deadline:
            self.beat()
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def run(self) -> int:
        ctl = self.ctl
        backoff = Backoff()
        connected = False
        while self.alive:
            self.beat()
            if not connected:
                ctl["reader_state"] = ctlmod.READER_CONNECTING
                try:
                    self.source.connect()
                    connected = True
                except self.source.errors as e:
                    self._lost(e, backoff)
                    continue
            try:
                batch = self.source.read(timeout=0.2)
            except self.source.errors as e:
                connected = False
                self.source.close()
                self._lost(e, backoff)
                continue
            if self.source.subscribed and ctl["reader_state"] != ctlmod.READER_SUBSCRIBED:
                ctl["reader_state"] = ctlmod.READER_SUBSCRIBED
                ctl["redis_connected"] = 1
                if backoff.failures:
                    self.throttle.ok("redis", msg=f"input source {self.source.name} is back after "
                                     f"{backoff.failures} failed attempts")
                backoff.reset()
            if batch:
                self.ingest(batch)
                self.source.commit()  # only now that the batch is in the ring
            if self.history is not None:
                self.history.maybe()
            if getattr(self.source, "disconnected", None):
                self._cut(self.source.disconnected)
                self.source.disconnected = None
            if time.monotonic() >= self._snapshot_check:
                self._snapshot_check = time.monotonic() + self.SNAPSHOT_CHECK_S
                for feed in self.feeds.values():
                    if feed.snapshots is not None:
                        feed.snapshots.maybe()
            self.follow_roster()
            self.throttle.flush()
        self.source.close()
        for feed in self.feeds.values():  # stopping (SIGTERM, or the supervisor is gone): the newest state
            if feed.snapshots is not None:
                feed.snapshots.final()
        self.files.shutdown(wait=True)
        if self.history is not None:
            self.history.close()
        return EXIT_OK

    def _cut(self, cause: str) -> None:
        """The subscription was cut and is back (the batch before was all from before the cut)."""
        self.ctl.add(f"disconnects_{cause}")
        for feed in self.feeds.values():
            feed.cut_after = feed.grid.last_slot
        self.throttle.log(f"cut {cause}", logging.WARNING,
                          f"the input subscription was cut ({DISCONNECT_CAUSES[cause]}) and is back: what was "
                          "published meanwhile is lost (input_samples_lost estimates it from the gap in the "
                          "meter's timestamps; NILMD_INPUT_MODE=stream would keep it)")

    def _lost(self, error, backoff: Backoff) -> None:
        self.ctl["redis_connected"] = 0
        self.ctl["reader_state"] = ctlmod.READER_CONNECTING
        self.ctl.add("redis_errors")
        delay = backoff.next_delay()
        kind, line = redis_error(error)
        self.throttle.log(f"redis {kind}", logging.ERROR,
                          f"input source {self.source.name}: {line}; retrying with backoff (next in {delay:.1f} s)")
        self._wait(delay)


def main(cfg: Config, paths: dict) -> None:
    """Entry point of the reader process (what nilmd.daemon.spawn runs)."""
    Reader.main(cfg, paths)
