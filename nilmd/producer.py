"""`nilmd produce`: meter samples into Redis, from the simulated building or a CSV file.

Timestamps advance one second per simulated sample (a CSV file's own steps) whatever the speed.
So that accelerated data is not rejected as coming from the future, an accelerated run
(--speed > 1) ends at "now": it starts as far in the past as the samples it will send span
(a day when there is no end), and a sample that would still be stamped after the box's clock
waits for it: the run goes on at real time from there, and says so.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from nilmd import csvfile, keys
from nilmd.errors import NilmdError

log = logging.getLogger("nilmd.producer")


def csv_samples(path: str):
    """Yield input messages from a CSV file (nilmd.csvfile: the layout training reads too)."""
    table = csvfile.read(path)
    for line, why in table.skipped[:20]:
        log.warning("%s line %d skipped: %s", path, line, why)
    bad = 0
    for k in range(len(table)):
        power = float(table.power[k])
        if not math.isfinite(power):
            bad += 1
            continue
        msg = {"timestamp": float(table.time[k]), "power_total": power}
        for name, values in table.meter.items():
            if math.isfinite(values[k]):
                msg[name] = float(values[k])
        yield msg
    if bad or len(table.skipped) > 20:
        log.warning("%s: %d rows skipped in all (no readable time: %d, no number for the power: %d)",
                    path, bad + len(table.skipped), len(table.skipped), bad)


def simulated_samples(seed: int, start: float, count: int | None, fields: str, chunk: int = 3600):
    from nilmd.sim.simulator import Building

    building = Building(seed)
    t, left = float(int(start)), count
    while left is None or left > 0:
        n = chunk if left is None else min(chunk, left)
        yield from building.trace(t, n).messages(fields)
        t += n
        if left is not None:
            left -= n


def produce(client, building: str, samples, speed: float, *, rebase: float | None = None, count: int | None = None,
            to: str = "pubsub", maxlen: int | None = None) -> int:
    """Send `samples` paced at `speed` x their own time; returns how many were sent. `to`: pubsub
    (PUBLISH on the input channel), stream (XADD to the input stream, trimmed to ~`maxlen`), both."""
    from nilmd import redisconn
    from nilmd.daemon import streams

    channel = keys.input_channel(building)
    maxlen = streams.MAXLEN if maxlen is None else maxlen
    sent, t_first, wall0 = 0, None, time.monotonic()
    live = speed <= 1.0  # an accelerated run becomes live (real time) once it reaches now
    pipe = client.pipeline(transaction=False)
    for msg in samples:
        if count is not None and sent >= count:
            break
        if t_first is None:
            t_first = msg["timestamp"]
        offset = msg["timestamp"] - t_first
        if rebase is not None:
            msg["timestamp"] = rebase + offset
        due = wall0 + offset / speed
        delay = due - time.monotonic()
        ahead = msg["timestamp"] - time.time()
        if not live and ahead > 0:
            live = True
            log.info("caught up with now after %d samples: going on at real time, so that no sample is stamped "
                     "in the future", sent)
        if live and speed > 1.0:
            delay = max(delay, ahead)
        if delay > 0.002:
            pipe.execute()
            time.sleep(delay)
        text = json.dumps(msg, separators=(",", ":"))
        if to in ("pubsub", "both"):
            redisconn.publish(pipe, channel, text)
        if to in ("stream", "both"):
            streams.add(pipe, building, text, maxlen)
        sent += 1
        if len(pipe) >= 500:
            pipe.execute()
    pipe.execute()
    return sent


def default_start(speed: float, count: int | None, now: float | None = None, span: float | None = None) -> float:
    """Where a run starts: now at real speed; accelerated, as far back as its samples span (`span`:
    a file's, from its first to its last sample sent; else one second a sample), a day if endless."""
    now = time.time() if now is None else now
    if speed <= 1.0:
        return float(int(now))
    if span is None:
        span = count - 1 if count is not None else 86400
    return float(int(now - span))


def time_span(samples: list, count: int | None) -> float:
    """Seconds from the first to the last of the samples a run will send."""
    sent = samples[:count] if count is not None else samples
    return sent[-1]["timestamp"] - sent[0]["timestamp"] if sent else 0.0


def csv_path(source: str) -> Path:
    path = Path(source)
    if not path.is_file():
        raise NilmdError(f"--source {source}: not 'simulation' and not a readable file")
    return path
