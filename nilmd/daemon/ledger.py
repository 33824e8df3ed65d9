"""What the predictions add up to: energy per appliance, runs and their events, and the history
(docs/CONTRACT.md §3.6, §3.7), counted once per interval, whatever restarts.

The inference publishes each prediction in one pipeline (nilmd.daemon.inference.RedisPublisher);
the ledger adds one script to that pipeline. The script does everything of one interval inside
Redis, where it cannot be interrupted: it adds the interval's Wh to the energy hash (starting a
new day or month first when the interval is the first of one), stores the run tracker's new
state, adds the prediction to the history stream and publishes the events. It is keyed by the
interval's `window_end`: the energy hash's `updated` holds the last one counted, and a
prediction at or before it (a held prediction sent again after its reply was lost, a window
predicted again by a restarted inference process) changes nothing. Under OOM Redis refuses the
script at its first write, so an interval is counted whole or not at all.

The run tracker (nilmd.daemon.runs) is plain Python; its state lives in Redis (`nilm:{b}:runs`)
and is read back whenever this process does not know for sure what Redis holds: at start, and
after any failure. The script only stores the state computed from the state Redis holds, so a
restarted inference process goes on with an open run, and a retried interval is not tracked twice.
"""

from __future__ import annotations

import json
import math

from nilmd import days, keys
from nilmd.config import Config
from nilmd.daemon import runs

EVENTS_MAXLEN = 10000  # events kept in the stream (XADD MAXLEN ~): months of runs of 11 appliances

# KEYS: energy hash, runs hash, predictions stream, events channel, events stream.
# ARGV: window_end, day, month, time zone, prediction JSON, interval s, history MAXLEN (0: none),
# events MAXLEN, n appliances, then n x (name, Wh, run state JSON), then the events' JSON texts.
# Returns 1 when the interval was counted, 0 when it was counted before.
_SCRIPT = """
local energy, runs, history, channel, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local window_end = tonumber(ARGV[1])
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
local n = tonumber(ARGV[9])
for i = 0, n - 1 do
  local name, wh = ARGV[10 + 3 * i], ARGV[11 + 3 * i]
  if day == old_day then redis.call('HINCRBYFLOAT', energy, name .. ':today_wh', wh) end
  if month == old_month then redis.call('HINCRBYFLOAT', energy, name .. ':month_wh', wh) end
  redis.call('HINCRBYFLOAT', energy, name .. ':total_wh', wh)
end
redis.call('HSET', energy, 'updated', ARGV[1], 'timezone', ARGV[4])
for i = 0, n - 1 do redis.call('HSET', runs, ARGV[10 + 3 * i], ARGV[12 + 3 * i]) end
if tonumber(ARGV[7]) > 0 then
  redis.call('XADD', history, 'MAXLEN', '~', ARGV[7], '*', 'json', ARGV[5], 'interval_s', ARGV[6])
end
for i = 10 + 3 * n, #ARGV do
  redis.call('XADD', events, 'MAXLEN', '~', ARGV[8], '*', 'json', ARGV[i])
  redis.call('PUBLISH', channel, ARGV[i])
end
return 1
"""


def interval_wh(prediction: dict, interval: float) -> dict[str, float]:
    """Each appliance's energy in the interval: mean power x its length."""
    return {p["appliance"]: float(p["power_watts"]) * interval / 3600.0 for p in prediction["predictions"]}


class Ledger:
    COMMANDS = ("hget", "hkeys", "hset", "hincrbyfloat", "xadd", "publish")  # what the script runs (README ACL)

    def __init__(self, cfg: Config):
        b = cfg.building_id
        self.keys = (keys.energy_key(b), keys.runs_key(b), keys.predictions_stream(b), keys.events_channel(b),
                     keys.events_stream(b))
        self.interval = float(cfg.inference_interval)
        self.hysteresis = runs.Hysteresis.from_config(cfg)
        self.timezone, self.tz = cfg.timezone, days.zone(cfg.timezone)
        self.history = math.ceil(cfg.predictions_history / cfg.inference_interval) if cfg.predictions_history else 0
        self.state: dict[str, runs.Run] | None = None  # None: read it from Redis before the next interval
        self._next = None  # the state the queued script stores

    def load(self, client) -> None:
        """Read the run tracker's state from Redis (raises what redis-py raises)."""
        raw = client.hgetall(self.keys[1])
        self.state = {k.decode(): runs.Run.from_json(v) for k, v in raw.items()}

    def queue(self, pipe, prediction: dict, text: str) -> None:
        """Add the interval's script to `pipe` (the state must be loaded)."""
        wh = interval_wh(prediction, self.interval)
        self._next, events = runs.step(self.state, prediction, wh, self.hysteresis)
        window_end = float(prediction["window_end"])
        day, month = days.interval_day(window_end, self.interval, self.tz)
        args = [repr(window_end), day, month, self.timezone, text, f"{self.interval:g}", self.history, EVENTS_MAXLEN,
                len(wh)]
        for name, value in wh.items():
            args += [name, f"{value:.6f}", self._next[name].to_json()]
        args += [json.dumps(e, separators=(",", ":")) for e in events]
        pipe.eval(_SCRIPT, len(self.keys), *self.keys, *args)

    def settle(self, reply) -> None:
        """The script's reply (or the exception in its place): keep the state it stored."""
        if reply == 1:
            self.state = self._next
        elif reply != 0:  # failed, or unknown: what Redis holds is read again
            self.state = None
        self._next = None
