"""What the predictions add up to: energy per appliance, runs and their events, and the history
(docs/CONTRACT.md §3.6, §3.7), counted once per interval, whatever restarts.

The inference publishes each prediction in one pipeline (nilmd.daemon.inference.RedisPublisher);
the ledger adds its parts to that pipeline: one script per key, because on a Redis Cluster a
building's keys lie in different slots and a script may touch only one. Each script carries its
own high-water mark, so each key counts an interval once however often it is sent:

  energy   nilm:{b}:energy: its `updated` field, the last window_end counted (a new day or month
           starts first when the interval is the first of one)
  runs     nilm:{b}:runs: every run state's `last`, the window_end it was stepped to
  history  nilm:{b}:predictions:stream: the entry id is the window_end in ms, and Redis refuses
           an id at or below the stream's newest
  events   nilm:{b}:events:stream: likewise (`<window_end ms>-<i>`), and the events are
           PUBLISHed only when added

A part that fails (Redis away, a master failing over, OOM) is kept and sent again in front of
the next prediction's parts, in order, so an interval is counted late rather than not at all; a
part already counted answers 0 and changes nothing. At most PENDING_MAX parts wait: past that the
oldest are given up (the log says which interval's energy or events). Under OOM Redis refuses a
script at its first write, so a part is counted whole or not at all.

The run tracker (nilmd.daemon.runs) is plain Python; its state lives in Redis (`nilm:{b}:runs`)
and is read back whenever this process does not know for sure what Redis holds: at start, and
when Redis says it holds a newer state. Intervals Redis's runs already went past (a window
predicted again by a restarted inference process) are not stepped again: their energy and
history parts go out (their own marks decide), their runs and events do not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from nilmd import days, keys, latest
from nilmd.config import Config
from nilmd.daemon import runs
from nilmd.daemon.fencing import PLAIN

EVENTS_MAXLEN = 10000  # events kept in the stream (XADD MAXLEN ~): months of runs of 11 appliances
PENDING_MAX = 64  # parts kept for another try: with 2-4 a prediction, 15-30 intervals

# KEYS: the energy hash. ARGV: window_end, day, month, time zone, then (name, Wh) per appliance.
_ENERGY = """
local energy, window_end = KEYS[1], tonumber(ARGV[1])
local updated = tonumber(redis.call('HGET', energy, 'updated') or '')
if updated and window_end <= updated then return 0 end
local day, month = ARGV[2], ARGV[3]
local old_day = redis.call('HGET', energy, 'day')
local old_month = redis.call('HGET', energy, 'month')
local new_day = (not old_day) or day > old_day
local new_month = (not old_month) or month > old_month
if new_day or new_month then
  for _, f in ipairs(redis.call('HKEYS', energy)) do
    local suffix = string.sub(f, -9)
    if (new_day and suffix == ':today_wh') or (new_month and suffix == ':month_wh') then
      redis.call('HSET', energy, f, '0')
    end
  end
  if new_day then redis.call('HSET', energy, 'day', day); old_day = day end
  if new_month then redis.call('HSET', energy, 'month', month); old_month = month end
end
for i = 5, #ARGV, 2 do
  local name, wh = ARGV[i], ARGV[i + 1]
  if day == old_day then redis.call('HINCRBYFLOAT', energy, name .. ':today_wh', wh) end
  if month == old_month then redis.call('HINCRBYFLOAT', energy, name .. ':month_wh', wh) end
  redis.call('HINCRBYFLOAT', energy, name .. ':total_wh', wh)
end
redis.call('HSET', energy, 'updated', ARGV[1], 'timezone', ARGV[4])
return 1
"""

# KEYS: the runs hash. ARGV: window_end, then (name, run state JSON) per appliance.
# A state's `last` is read with a pattern, not by decoding its JSON: a tenth of the cost.
_RUNS = """
local window_end = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  local last = old and tonumber(string.match(old, '"last":%s*([-+%d.eE]+)'))
  if last and last >= window_end then return 0 end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""

# KEYS: a stream. ARGV: channel ('' : none), MAXLEN, window_end in ms, then (field, value) pairs
# per entry, `width` of them (ARGV[4]). Entry i gets id <ms>-<i>; the first one at or below the
# stream's newest id means the interval is in already.
_STREAM = """
local channel, maxlen, ms, width = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local n = 0
for first = 5, #ARGV, width do
  local entry = {'XADD', KEYS[1], 'MAXLEN', '~', maxlen, ms .. '-' .. n}
  for j = first, first + width - 1 do entry[#entry + 1] = ARGV[j] end
  local r = redis.pcall(unpack(entry))
  if type(r) == 'table' and r.err then
    if n == 0 and string.find(r.err, 'equal or smaller', 1, true) then return 0 end
    return redis.error_reply(r.err)
  end
  n = n + 1
end
if channel ~= '' then
  for first = 5, #ARGV, width do redis.call('PUBLISH', channel, ARGV[first + 1]) end
end
return 1
"""


@dataclass
class Part:
    """One key's share of one interval: a script, its key and its arguments."""

    kind: str  # energy, runs, history, events
    window_end: float
    script: str
    key: str
    args: list


def interval_wh(prediction: dict, interval: float) -> dict[str, float]:
    """Each appliance's energy in the interval: mean power x its length."""
    return {p["appliance"]: float(p["power_watts"]) * interval / 3600.0 for p in prediction["predictions"]}


def parts_wh(prediction: dict, interval: float) -> dict[str, float]:
    """The always-on load's and "other"'s energy in the interval, counted like an appliance's."""
    return {part: w * interval / 3600.0 for part, w in latest.parts(prediction).items()}


class Ledger:
    COMMANDS = ("hget", "hkeys", "hset", "hincrbyfloat", "xadd", "publish")  # what the scripts run (docs/OPERATIONS.md, Redis ACL)

    def __init__(self, cfg: Config):
        b = self.building = cfg.building_id
        self.energy, self.runs = keys.energy_key(b), keys.runs_key(b)
        self.history_key, self.events_key = keys.predictions_stream(b), keys.events_stream(b)
        self.channel = keys.events_channel(b)
        self.interval = float(cfg.inference_interval)
        self.hysteresis = runs.Hysteresis.from_config(cfg)
        self.timezone, self.tz = cfg.timezone, days.zone(cfg.timezone)
        self.history = math.ceil(cfg.predictions_history / cfg.inference_interval) if cfg.predictions_history else 0
        self.state: dict[str, runs.Run] | None = None  # None: read it from Redis before the next interval
        self.stepped = 0.0  # the newest window_end the state has seen (Redis's or ours)
        self.made = 0.0  # the newest window_end whose parts were made (in this process)
        self.pending: list[Part] = []  # parts not yet counted, oldest first
        self._queued = 0  # how many of them the last queue() sent

    def load(self, client) -> None:
        """Read the run tracker's state from Redis (raises what redis-py raises)."""
        raw = client.hgetall(self.runs)
        self.state = {k.decode(): runs.Run.from_json(v) for k, v in raw.items()}
        self.stepped = max([self.stepped] + [r.last for r in self.state.values()])

    def queue(self, pipe, prediction: dict, text: str, fence=PLAIN) -> None:
        """Add the interval's parts, after the ones still pending, to `pipe` (the state must be
        loaded). The same prediction queued again (it was held) adds nothing new. `fence`
        (nilmd.daemon.fencing, with --leases): each part only while the building's lease is ours."""
        window_end = float(prediction["window_end"])
        if window_end > self.made:
            parts = self._parts(prediction, text, window_end)
            self.pending, self.made = self.pending + parts, window_end
        for part in self.pending:
            fence.eval(pipe, self.building, part.script, part.key, *part.args)
        self._queued = len(self.pending)

    def _parts(self, prediction: dict, text: str, window_end: float) -> list[Part]:
        wh = interval_wh(prediction, self.interval)
        day, month = days.interval_day(window_end, self.interval, self.tz)
        args = [repr(window_end), day, month, self.timezone]
        for name, value in {**wh, **parts_wh(prediction, self.interval)}.items():
            args += [name, f"{value:.6f}"]
        parts = [Part("energy", window_end, _ENERGY, self.energy, args)]
        ms = str(int(round(window_end * 1000)))
        if self.history:
            parts.append(Part("history", window_end, _STREAM, self.history_key,
                              ["", self.history, ms, 4, "json", text, "interval_s", f"{self.interval:g}"]))
        if window_end > self.stepped:
            self.state, events = runs.step(self.state, prediction, wh, self.hysteresis)
            self.stepped = window_end
            self.pending = [p for p in self.pending if p.kind != "runs"]  # the newest state holds the older
            args = [repr(window_end)]
            for name in wh:
                args += [name, self.state[name].to_json()]
            parts.append(Part("runs", window_end, _RUNS, self.runs, args))
            if events:
                args = [self.channel, EVENTS_MAXLEN, ms, 2]
                for e in events:
                    args += ["json", json.dumps(e, separators=(",", ":"))]
                parts.append(Part("events", window_end, _STREAM, self.events_key, args))
        return parts

    def settle(self, replies) -> tuple[Exception | None, list[Part]]:
        """The pipeline's replies to the parts queued (or one exception for all of them): keep
        the failed ones for the next try. Returns (the first failure, the parts given up)."""
        if isinstance(replies, BaseException):
            replies = [replies] * self._queued
        sent, later = self.pending[:self._queued], self.pending[self._queued:]
        failed, error = [], None
        for part, reply in zip(sent, replies):
            if isinstance(reply, Exception):
                failed.append(part)
                error = error or reply
            elif part.kind == "runs" and reply == 0:
                self.state = None  # Redis holds a newer state than ours: read it
        self.pending, self._queued = failed + later, 0
        dropped = self.pending[:-PENDING_MAX] if len(self.pending) > PENDING_MAX else []
        if dropped:
            self.pending = self.pending[len(dropped):]
            if any(p.kind == "runs" for p in dropped):
                self.state = None
        return error, dropped
