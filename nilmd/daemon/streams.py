"""Durable input: the meter's samples in a Redis Stream, read from where the last run stopped.

The stream is `nilm:{b}:input:stream` (nilmd.keys.input_stream). Each entry has one field,
`data`, holding exactly the JSON a meter would PUBLISH on the pub/sub channel, so both modes
share one validation path (nilmd.daemon.ingest); an entry without `data` is rejected as `not_json`.
Producers add entries with `XADD ... MAXLEN ~ 86400 * data {json}` (`add` below,
`nilmd produce --to stream`): about a day of 1 Hz samples stays in Redis.

Delivery: at-least-once into the reader, exactly-once in effect in the ring. The reader reads
in bounded batches (one consumer per building: the reader is the ring's only writer), writes the batch
into the ring, and only then records the id of the batch's newest entry as its position: in the
control block (a restarted reader goes on from there) and in Redis under
`nilm:{b}:input:stream:position` (a restarted daemon goes on from there). A crash between the
ring write and the record makes the next reader read that batch again; every sample of it then
lands on a grid second the ring already holds and is rejected (`duplicate` / `out_of_order`), so
nothing is counted into the ring twice. That is what XREADGROUP + XACK would give for a single
consumer, without a pending-entries list to maintain.

Warm restart (the first reader of a daemon's life):
  * the supervisor restored a ring snapshot carrying a position: go on after it;
  * no snapshot, but a persisted position: read the window that ends at it (XREVRANGE, entries
    an earlier run already predicted from: "history") and then everything after it;
  * neither (the very first start): the newest window in the stream, all new data.
Entries up to the persisted position are history: once the ring holds them, the reader sets the
control block's `history_end` to just after the newest window the earlier run predicted (its
`last_window_end` in the status hash, when the ring holds it; else the ring's head), and the
inference process carries on from there instead of predicting those windows again. The warm-up
read is a window and one interval long, so that the window of that last prediction fits in it.
"""

from __future__ import annotations

import logging
import re
import time

import numpy as np

from nilmd import keys
from nilmd.config import Config
from nilmd.daemon.batch import Batch
from nilmd.daemon.ingest import MAX_MESSAGE_BYTES
from nilmd.daemon.fencing import PLAIN, is_fenced, writes
from nilmd.errors import redis_error
from nilmd.log import Throttle

log = logging.getLogger("nilmd.reader")

MAXLEN = 86400  # entries a producer keeps in the stream (XADD MAXLEN ~): a day of 1 Hz samples
_ID = re.compile(r"^(\d+)-(\d+)$")
BATCH = 4096  # entries per read: with MAX_MESSAGE_BYTES each, at most 16 MiB of input in the reader
POLL_S = 0.05  # how often a caught-up reader looks for new entries

# XREAD and XRANGE hand over whole entries, so a batch of large ones (10 MB each, 4096 to a
# batch) would be in the reader's memory before the size rule could reject one. This script
# walks each stream one entry at a time inside Redis and hands over each entry's id and its
# `data` field, or only that field's length when it is longer than any valid sample can be
# (ARGV[1]): the reader never holds more than BATCH x MAX_MESSAGE_BYTES of input, whatever is in
# the streams. Many streams in one call (a daemon of many buildings reads them all in one round
# trip), sharing a budget of entries (ARGV[2]: the caller starts at a rotating stream, so that
# none starves); "1" in ARGV[3] walks backwards (newest first, like XREVRANGE). Then, per stream
# (KEYS), its first bound (an id, "(id" to exclude it, "-" or "+") and its last. Returns one flat
# list [id, data or length, ...] per stream.
_READ_SCRIPT = """
local limit, budget, reverse = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
local out = {}
for k = 1, #KEYS do
  local got, cursor, stop = {}, ARGV[2 + 2 * k], ARGV[3 + 2 * k]
  while budget > 0 do
    local step
    if reverse then step = redis.call('XREVRANGE', KEYS[k], cursor, stop, 'COUNT', 1)
    else step = redis.call('XRANGE', KEYS[k], cursor, stop, 'COUNT', 1) end
    local entry = step[1]
    if entry == nil then break end
    local data, fields = '', entry[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'data' then data = fields[i + 1]; break end
    end
    got[#got + 1] = entry[1]
    if #data > limit then got[#got + 1] = #data else got[#got + 1] = data end
    cursor = '(' .. entry[1]
    budget = budget - 1
  end
  out[k] = got
end
return out
"""


def read_many(client, spans: list[tuple[str, str, str]], count: int, reverse: bool = False,
              cluster: bool = False) -> list[list]:
    """[(stream key, first bound, last bound)] -> per stream [(entry id, data or Unread)], at most
    `count` entries in all, without ever fetching a `data` field larger than a valid sample can be.
    A cluster refuses a script over keys of several slots: there, one call per stream, in one
    pipeline (one round trip per node), each with its share of `count`."""
    direction = "1" if reverse else "0"
    if cluster and len(spans) > 1:
        pipe = client.pipeline(transaction=False)
        share = max(16, count // len(spans))
        for key, first, last in spans:
            pipe.execute_command("EVAL", _READ_SCRIPT, 1, key, MAX_MESSAGE_BYTES, share, direction, first, last)
        replies = [reply[0] for reply in pipe.execute()]
    else:
        bounds = [bound for _, first, last in spans for bound in (first, last)]
        replies = client.eval(_READ_SCRIPT, len(spans), *(key for key, _, _ in spans), MAX_MESSAGE_BYTES, count,
                              direction, *bounds)
    return [[(flat[i], Unread(flat[i + 1]) if isinstance(flat[i + 1], int) else flat[i + 1])
             for i in range(0, len(flat), 2)] for flat in replies]


class Unread:
    """A stream entry's `data` that was too large to fetch: only its length. The size rule
    (nilmd.daemon.ingest.parse_sample) looks at len() first, so it is rejected as `oversized`."""

    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def parse_id(entry_id) -> tuple[int, int]:
    """'1706198400000-3' (str or bytes) -> (1706198400000, 3)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    m = _ID.match(text)
    if m is None:
        raise ValueError(f"not a stream entry id: {text!r}")
    return int(m.group(1)), int(m.group(2))


def format_id(ms: int, seq: int) -> str:
    return f"{ms}-{seq}"


def add(pipe, building: str, text: str, maxlen: int | None = MAXLEN) -> None:
    """Queue one sample (its JSON text) on a Redis pipeline or client as a stream entry."""
    pipe.xadd(keys.input_stream(building), {"data": text}, maxlen=maxlen, approximate=True)


class StreamCursor:
    """One building's place in its input stream: its warm restart, its history, its position (see above)."""

    def __init__(self, cfg: Config, ctl, ring, client, throttle, quiet: bool = False):
        self.cfg = cfg
        self.ctl = ctl  # the building's block: its position and history
        self.ring = ring  # read only, to place history_end
        self.key = keys.input_stream(cfg.building_id)
        self.position_key = keys.position_key(cfg.building_id)
        self._throttle = throttle
        self._client = client
        self._log = log.debug if quiet else log.info  # many buildings: one summary line instead
        self.subscribed = False
        self._position: tuple[int, int] | None = None  # newest entry whose sample is in the ring
        self._history: tuple[int, int] | None = None  # entries up to here were processed by an earlier run
        self._backfill: list = []  # entries read at start, handed out before anything else
        self._pending: tuple[int, int] | None = None  # newest id of the batch being ingested
        self._predicted: float | None = None  # window_end of the earlier run's last prediction
        self._resumed = bool(ctl["input_resumed"])  # a restarted reader: no history to work out

    @property
    def position(self) -> str | None:
        return format_id(*self._position) if self._position else None

    def connect(self) -> None:
        self.subscribed = False
        if self._position is None:
            ms, seq = int(self.ctl["input_pos_ms"]), int(self.ctl["input_pos_seq"])
            self._position = (ms, seq) if ms or seq else None  # 0-0 is never a valid entry id
        if not self._resumed:
            self._resume()
            self._resumed = True
        newest = self._entries("+", "-", 1, reverse=True)
        if newest and self._position and parse_id(newest[0][0]) < self._position:
            # Only a Redis that lost its data (restarted without persistence, FLUSHALL) and was
            # given explicit ids puts the stream behind us: read what it holds now.
            log.warning("the input stream's newest entry %s is older than our position %s (Redis lost its data?): "
                        "reading the stream from its start", newest[0][0].decode(), self.position)
            self._position = (0, 0)
        self.subscribed = True
        self._log("reading stream %s after entry %s", self.key, self.position or "(none yet)")

    def _resume(self) -> None:
        """First reader of this daemon's life: where the earlier run stopped, and its history."""
        raw = self._client.get(self.position_key)
        persisted = parse_id(raw) if raw else None
        try:
            self._predicted = float(self._client.hget(keys.status_key(self.cfg.building_id), "last_window_end"))
        except (TypeError, ValueError):
            self._predicted = None
        if self._position is None:  # no snapshot: warm up from the stream itself
            end = format_id(*persisted) if persisted else "+"
            entries = self._entries(end, "-", self.cfg.window_size + self.cfg.inference_interval, reverse=True)
            self._backfill = entries[::-1]
            if persisted and entries:
                self._history = parse_id(entries[0][0])  # the newest entry the earlier run processed
            elif not entries:
                self._position = persisted or (0, 0)
            self._log("warm start from the stream: %d entries %s", len(entries),
                     f"up to {end}, the last one processed before the restart" if persisted
                     else "(its newest: no earlier run recorded a position)")
        elif persisted and persisted > self._position:
            self._history = persisted  # the snapshot is older than what the earlier run processed
        if self._history is None:
            # A prediction made while the daemon stopped, after the reader's last snapshot, is in
            # the status hash: do not make it again.
            self._mark_predicted(fallback=None)
            self.ctl["input_resumed"] = 1

    # -- reading ----------------------------------------------------------------------------------
    def _entries(self, first: str, last: str, count: int, reverse: bool = False) -> list:
        """[(entry id, data or Unread)] from `first` to `last` (stream range syntax), at most `count`."""
        return read_many(self._client, [(self.key, first, last)], count, reverse)[0]

    @property
    def caught_up(self) -> bool:
        """Past the warm-up and the history: the next entries are simply the ones after the position."""
        return not self._backfill and self._history is None

    def low(self) -> str:
        """The range bound just after the position (stream range syntax)."""
        return "(" + format_id(*self._position) if self._position else "-"

    def read_own(self, limit: int = BATCH) -> list:
        """The warm-up's next batch (backfill, then history), read for this building alone."""
        if self._backfill:
            entries, self._backfill = self._backfill, []
        else:
            # Only up to the old position: a batch must not mix history with new entries, or the
            # new ones would count as already predicted.
            entries = self._entries(self.low(), format_id(*self._history), limit)
            if not entries:  # the rest of the history was trimmed away: it is over
                self._history_done()
                return []
        return self.took(entries)

    def took(self, entries: list) -> list:
        """[(id, data)] read for this building -> their data; the newest id is committed later."""
        if not entries:
            return []
        self._pending = parse_id(entries[-1][0])
        return [data for _, data in entries]

    def commit(self, pipe, fence=PLAIN) -> None:
        """The batch just read is in the ring: record the position (ring first, then this), the
        Redis half queued on `pipe` (fenced with --leases)."""
        if self._pending is None:
            return
        self._position, self._pending = self._pending, None
        self.ctl["input_pos_ms"], self.ctl["input_pos_seq"] = self._position
        if self._history is not None:
            if self._position >= self._history:
                self._history_done()
            return  # Redis already holds a position at least this far
        fence.command(pipe, self.cfg.building_id, "SET", self.position_key, self.position)

    def _history_done(self) -> None:
        self._mark_predicted(fallback=self.ring.counters()[0])
        self.ctl["input_resumed"] = 1
        self._history = None

    def _mark_predicted(self, fallback: int | None) -> None:
        """history_end := just after the ring's newest sample at or before the earlier run's last
        predicted window_end (the inference goes on at the first aligned window after it). The earlier
        run predicted nothing (a lease handed over before its models loaded): leave it, so every
        window the ring holds is predicted. No ring yet: `fallback` (None: leave it)."""
        if self._predicted is None:
            return
        head, segment = self.ring.counters()
        end = fallback
        if head > segment:
            window = self.ring.window(min(head - segment, self.ring.capacity))
            end = window.start + int(np.searchsorted(window.ts, self._predicted, side="right"))
            del window
        if end is not None:
            self.ctl["history_end"] = end


class StreamSource:
    """Every building's input stream through one connection: the caught-up ones in one script call
    per poll, a building still warming up on its own (see above)."""

    name = "stream"
    disconnected = None  # a cut loses nothing here: the next read goes on from the position

    def __init__(self, cfg: Config, feeds: dict, counters, fence_token: str | None = None):
        from nilmd import redisconn  # redis-py only where Redis is used

        # with --leases a position is recorded only while the lease is ours: a holder paused past
        # its lease must not move the position the next holder starts from (nilmd.daemon.fencing)
        self.fence = writes(fence_token, cfg.redis_cluster)

        self.cfg, self.counters = cfg, counters  # counters: the daemon block (the reader's redis_errors)
        self.errors = redisconn.ERRORS  # every Redis error: the reader counts it, says which, and retries
        self._throttle = Throttle(log, period=60.0)
        # A read waits 0.2 s at most, so a reply slower than a few seconds means Redis is gone:
        # say so (status, backoff) instead of sitting in a socket read without heartbeats.
        self._client = redisconn.client(cfg, name="reader", socket_timeout=3.0)
        self._quiet = len(feeds) > 1 or bool(cfg.building_ids)
        self.cursors: dict[str, StreamCursor] = {}
        for feed in feeds.values():
            self.add(feed)
        self.subscribed = False
        self._turn = 0  # which stream the shared budget starts at

    def add(self, feed) -> None:
        cursor = StreamCursor(feed.cfg, feed.ctl, feed.ring, self._client, self._throttle, self._quiet)
        self.cursors[feed.building] = cursor  # connected by the next read

    def remove(self, building: str) -> None:
        self.cursors.pop(building, None)

    def connect(self) -> None:
        self.subscribed = False
        self._client.ping()
        for cursor in self.cursors.values():
            cursor.connect()
        self.subscribed = True
        if self._quiet:
            log.info("reading %d input streams", len(self.cursors))

    def read(self, timeout: float, limit: int = BATCH) -> list:
        """Raw messages of the next entries (a Batch), waiting at most `timeout` for the first one."""
        out = Batch()
        for b, cursor in self.cursors.items():
            if not cursor.subscribed:  # added by a reload
                cursor.connect()
            if not cursor.caught_up:
                out.extend_for(b, cursor.read_own(limit))
                if len(out) >= limit:
                    return out
        if out:
            return out
        # No XREAD BLOCK: it would hand over whole entries. A caught-up reader polls instead
        # (POLL_S: at most that much latency, a few cheap calls a second).
        deadline = time.monotonic() + timeout
        while True:
            self._read_many(out, limit)
            if out or time.monotonic() + POLL_S >= deadline:
                return out
            time.sleep(POLL_S)

    def _read_many(self, out, limit: int) -> None:
        ready = [(b, c) for b, c in self.cursors.items() if c.caught_up]
        if not ready:
            return
        self._turn = (self._turn + 1) % len(ready)
        ready = ready[self._turn:] + ready[:self._turn]
        spans = [(c.key, c.low(), "+") for _, c in ready]
        for (b, cursor), entries in zip(ready, read_many(self._client, spans, limit, cluster=self.cfg.redis_cluster)):
            out.extend_for(b, cursor.took(entries))

    def commit(self) -> None:
        """The batch just read is in the ring: record every building's position, in one round trip."""
        pipe = self._client.pipeline(transaction=False)
        for cursor in self.cursors.values():
            cursor.commit(pipe, self.fence)
        if not len(pipe):
            return
        try:
            replies = pipe.execute(raise_on_error=False)
        except self.errors as e:
            replies = [e]
        # a fenced one is not ours to record any more: the inference says so and lets the building go
        failed = [r for r in replies if isinstance(r, Exception) and not is_fenced(r)]
        if failed:
            # Redis went away or refuses the write (OOM, NOPERM): the control blocks have the
            # positions, and the next commit writes them.
            self.counters.add("redis_errors")
            kind, line = redis_error(failed[0])
            self._throttle.log(f"position {kind}", logging.WARNING, f"could not record the stream position: {line}")

    def close(self) -> None:
        self.subscribed = False
        try:
            self._client.close()
        except Exception:  # closing a broken connection may raise; it is gone either way
            pass
