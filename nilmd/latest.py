"""What the daemon last said, read back from Redis for the exporters (Prometheus, Home Assistant):
the latest prediction (`nilm:{b}:latest`) and the energy per appliance (`nilm:{b}:energy`).

Both are read defensively: a missing key, field or an unreadable value means "not known yet",
never an error, so an exporter shows what there is (the energy hash is written by the inference
once it has counted some energy; an older daemon never writes it).
"""

from __future__ import annotations

import json
import math
import time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nilmd import days, keys
from nilmd.appliances import APPLIANCES

ENERGY_PERIODS = ("today", "month", "total")
# The house's parts that are not appliances (nilmd.daemon.alwayson; nilmd.models.prediction.other_watts):
# the prediction's field and the energy hash's name of each.
PARTS = {"always_on": "always_on_watts", "other": "other_watts"}


def read(client, building: str) -> tuple[dict | None, dict]:
    """(latest prediction or None, energy) in one round trip; raises what redis-py raises."""
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.latest_key(building))
    pipe.hgetall(keys.energy_key(building))
    raw_latest, raw_energy = pipe.execute()
    return prediction(raw_latest), energy(raw_energy)


def prediction(raw) -> dict | None:
    """A prediction's JSON (docs/CONTRACT.md §3.4) -> its dict, or None if absent or unreadable."""
    if raw is None:
        return None
    try:
        p = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return p if isinstance(p, dict) and isinstance(p.get("predictions"), list) else None


def appliances(p: dict | None) -> dict[str, dict]:
    """appliance -> its entry of a prediction (power_watts, is_on, probability), known names only."""
    if p is None:
        return {}
    return {e["appliance"]: e for e in p["predictions"] if isinstance(e, dict) and e.get("appliance") in APPLIANCES}


def parts(p: dict | None) -> dict[str, float]:
    """"always_on", "other" -> W of a prediction, those it has (an older daemon's has neither)."""
    out = {}
    for part, field in PARTS.items():
        value = (p or {}).get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[part] = float(value)
    return out


def energy(raw: dict, now: float | None = None) -> dict[str, dict[str, float]]:
    """The energy hash (bytes or str) -> appliance (or part: PARTS) -> {"today": Wh, "month": Wh, "total": Wh},
    only the fields present and finite. `today_wh` belongs to the hash's `day` until the first
    interval of a new day resets it (docs/CONTRACT.md §3.6): on a later day, in the hash's own
    time zone, today is 0 Wh so far (and likewise the month)."""
    raw = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
           for k, v in raw.items()}
    out: dict[str, dict[str, float]] = {}
    stale = _stale_periods(raw, time.time() if now is None else now)
    for k, v in raw.items():
        appliance, _, field = k.rpartition(":")
        period = field[:-3] if field.endswith("_wh") else ""
        if (appliance not in APPLIANCES and appliance not in PARTS) or period not in ENERGY_PERIODS:
            continue
        try:
            wh = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(wh):
            out.setdefault(appliance, {})[period] = 0.0 if period in stale else wh
    return out


def counted(raw: dict, p: dict) -> bool:
    """Whether the energy hash (as HGETALL returns it) has counted prediction `p`'s interval."""
    updated = raw.get(b"updated", raw.get("updated"))
    try:
        return updated is not None and float(updated) >= float(p["window_end"])
    except (TypeError, ValueError):
        return False


def _stale_periods(raw: dict, now: float) -> set[str]:
    """"today" and/or "month" when the hash's `day`/`month` are past in its `timezone`."""
    try:
        day, month = days.interval_day(now, 0.0, ZoneInfo(raw.get("timezone") or "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        return set()
    stale = set()
    if raw.get("day") and raw["day"] < day:
        stale.add("today")
    if raw.get("month") and raw["month"] < month:
        stale.add("month")
    return stale
