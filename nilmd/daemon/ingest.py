"""Input rules: one message -> one validated sample, and where it goes on the 1-second grid.

Pure functions and one small state machine, so every rule of docs/CONTRACT.md §6 is unit-testable without
Redis. docs/CONTRACT.md §6 is this file in prose; keep them together.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

MAX_MESSAGE_BYTES = 4096
MAX_POWER_W = 100_000.0  # a 3-phase 100 A house is ~70 kW; anything above is a broken meter
NEGATIVE_TOLERANCE_W = 50.0  # small negative readings (CT noise, a little PV export) -> 0 W
MIN_TIMESTAMP = 946684800.0  # 2000-01-01: older stamps are a meter without a clock

# Every rejection has one of these reasons; the status hash counts each (rejected_<reason>).
REJECT_REASONS = (
    "oversized",  # message longer than MAX_MESSAGE_BYTES
    "not_json",  # not valid UTF-8 JSON
    "not_object",  # JSON, but not an object
    "missing_power",  # no power_total
    "non_numeric",  # power_total (or timestamp) is not a number (strings and booleans too)
    "non_finite",  # NaN or +/-inf
    "out_of_range",  # power_total above MAX_POWER_W or below -NEGATIVE_TOLERANCE_W
    "bad_timestamp",  # timestamp before 2000
    "future",  # timestamp more than max_clock_skew ahead of the box's clock
    "duplicate",  # same grid second as the newest sample (the first one wins)
    "out_of_order",  # older than the newest sample
    "flood",  # pub/sub: read from a channel shed for flooding (nilmd.daemon.sources.FloodGuard)
)

# Repairs keep the sample and are counted too (repaired_<reason>).
REPAIR_REASONS = (
    "no_timestamp",  # stamped with the time it was received
    "negative_power",  # small negative power clamped to 0
    "bad_optional_field",  # voltage/current/power_factor unusable: treated as not sent
)

OPTIONAL_FIELDS = ("voltage", "current", "power_factor")


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Sample:
    timestamp: float
    power: float
    voltage: float  # NaN = not sent
    current: float
    power_factor: float
    repairs: tuple[str, ...] = ()


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected("non_numeric", f"{name} is {type(value).__name__}")
    try:
        f = float(value)
    except OverflowError:  # an integer literal beyond float range
        raise Rejected("non_finite", f"{name} overflows") from None
    if not math.isfinite(f):
        raise Rejected("non_finite", f"{name} is {f}")
    return f


def parse_sample(raw, now: float, max_clock_skew: float) -> Sample:
    """Validate one input message (bytes or str). Raises Rejected with a reason."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise Rejected("oversized", f"{len(raw)} bytes")
    try:
        msg = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise Rejected("not_json", str(e)[:80]) from None
    if not isinstance(msg, dict):
        raise Rejected("not_object", type(msg).__name__)
    if "power_total" not in msg or msg["power_total"] is None:
        raise Rejected("missing_power")
    repairs = []
    power = _number(msg["power_total"], "power_total")
    if power > MAX_POWER_W or power < -NEGATIVE_TOLERANCE_W:
        raise Rejected("out_of_range", f"power_total {power:g} W")
    if power < 0.0:
        power = 0.0
        repairs.append("negative_power")

    ts = msg.get("timestamp")
    if ts is None:
        ts = now
        repairs.append("no_timestamp")
    else:
        ts = _number(ts, "timestamp")
        if ts < MIN_TIMESTAMP:
            raise Rejected("bad_timestamp", f"{ts:g}")
        if ts > now + max_clock_skew:
            raise Rejected("future", f"{ts - now:.0f} s ahead")

    optional = []
    bad_optional = False
    for name in OPTIONAL_FIELDS:
        value = msg.get(name)
        if value is None:
            optional.append(math.nan)
            continue
        try:
            optional.append(_number(value, name))
        except Rejected:
            optional.append(math.nan)
            bad_optional = True
    if bad_optional:
        repairs.append("bad_optional_field")
    return Sample(ts, power, optional[0], optional[1], optional[2], tuple(repairs))


@dataclass(frozen=True)
class Placement:
    slot: int  # integer epoch second this sample occupies
    fill: int  # grid seconds before it to fill by holding the previous sample
    breaks: bool  # the gap was too long to fill: the window restarts here
    clock_jump: bool = False  # the meter's clock was set back: accepted as its new clock (with a break)


CLOCK_JUMP_SAMPLES = 30  # consecutive samples on one clock set back before that clock is believed
CLOCK_JUMP_JITTER_S = 2.0  # how much the (receipt time - timestamp) offset may wobble within that run


class Grid:
    """Puts samples on the 1-second grid, one writer's view of the newest slot.

    Rules (docs/CONTRACT.md §6.3):
    - a sample goes to round(timestamp);
    - the same second as the newest sample: rejected as a duplicate (the first one wins);
    - an older second: rejected as out of order (the past is already in the window);
    - a gap of up to `max_gap_fill` seconds is filled by holding the last sample (flagged filled);
    - a longer gap is not filled: the window restarts at the new sample (a "break");
    - clock set back: `jump_after` consecutive samples more than `max_gap_fill` s behind the
      newest, each after the one before and all at the same offset from the box's clock (within
      CLOCK_JUMP_JITTER_S: live data on a clock that was set back, not a burst of old data being
      re-sent, whose offset shrinks as it is sent faster than real time), make the grid believe the
      new clock: the last of them is accepted with a break and the run's earlier samples stay
      rejected as out of order. A clock set back by at most `max_gap_fill` s is never believed: it
      costs at most that many seconds of out-of-order samples, until it passes its old newest.
    A clock that jumps forward is a long gap (a break) if it stays within the daemon's
    max_clock_skew of the box's clock, and rejected sample by sample as `future` beyond it.
    """

    def __init__(self, max_gap_fill: int, last_slot: int | None = None, jump_after: int = CLOCK_JUMP_SAMPLES):
        self.max_gap_fill = max_gap_fill
        self.last_slot = last_slot
        self.jump_after = jump_after
        self._run = 0  # length of the current run of samples on a clock set back
        self._run_slot = 0  # newest slot of that run
        self._run_offset = 0.0  # receipt time - timestamp at the run's start

    def place(self, timestamp: float, now: float | None = None) -> Placement:
        slot = int(math.floor(timestamp + 0.5))
        last = self.last_slot
        if last is None:
            placement = Placement(slot, 0, True)
        elif slot == last:
            raise Rejected("duplicate", f"second {slot}")
        elif slot < last:
            if self._behind(slot, last, now):
                placement = Placement(slot, 0, True, clock_jump=True)
            else:
                raise Rejected("out_of_order", f"{last - slot} s older than the newest sample")
        elif slot - last - 1 <= self.max_gap_fill:
            placement = Placement(slot, slot - last - 1, False)
        else:
            placement = Placement(slot, 0, True)
        self._run = 0
        self.last_slot = slot
        return placement

    def _behind(self, slot: int, last: int, now: float | None) -> bool:
        """Count `slot` into the run of samples on a clock set back; True once it is believed."""
        if now is None or last - slot <= self.max_gap_fill:
            self._run = 0
            return False
        offset = now - slot
        follows = self._run and slot > self._run_slot and abs(offset - self._run_offset) <= CLOCK_JUMP_JITTER_S
        if not follows:
            self._run, self._run_offset = 0, offset
        self._run += 1
        self._run_slot = slot
        return self._run >= self.jump_after
