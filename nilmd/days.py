"""Local days: which day and month an interval counts on, in the box's time zone (NILMD_TIMEZONE).

The energy hash (nilmd.daemon.ledger) and `nilmd report` both ask here, so that the daemon's
`today_wh` and the report's bar for the same day add up the same intervals. An interval counts
on the local day of its middle: an interval that ends at 00:00:30 is mostly yesterday's.
Days are calendar days of the zone, so a day with a daylight-saving change has 23 or 25 hours.
"""

from __future__ import annotations

import os
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nilmd.errors import ConfigError


def box_timezone() -> str:
    """The IANA name of the box's zone: $TZ, else what /etc/localtime links to, else
    /etc/timezone (Debian), else UTC."""
    tz = os.environ.get("TZ", "").lstrip(":")
    if tz and not tz.startswith("/"):
        return tz
    try:
        target = str(Path("/etc/localtime").resolve())
        if "/zoneinfo/" in target:
            return target.split("/zoneinfo/", 1)[1]
    except OSError:
        pass
    try:
        return Path("/etc/timezone").read_text().strip() or "UTC"
    except OSError:
        return "UTC"


def zone(name: str) -> ZoneInfo:
    """ZoneInfo, or ConfigError naming the setting."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"--timezone: {name!r} is not a time zone this box knows (an IANA name such as "
                          "Europe/Berlin; the tzdata package provides them)") from None


def interval_day(window_end: float, interval: float, tz: ZoneInfo) -> tuple[str, str]:
    """(YYYY-MM-DD, YYYY-MM) of the interval that ends at `window_end`."""
    local = datetime.fromtimestamp(window_end - interval / 2.0, tz)
    return local.strftime("%Y-%m-%d"), local.strftime("%Y-%m")


def bounds(day: str, tz: ZoneInfo) -> tuple[float, float]:
    """Epoch seconds of the local midnight that starts `day` (YYYY-MM-DD) and of the next one."""
    d = date.fromisoformat(day)
    start = datetime(d.year, d.month, d.day, tzinfo=tz)
    nxt = d + timedelta(days=1)
    return start.timestamp(), datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz).timestamp()


def yesterday(tz: ZoneInfo, now: float | None = None) -> str:
    now_local = datetime.now(tz) if now is None else datetime.fromtimestamp(now, tz)
    return (now_local.date() - timedelta(days=1)).isoformat()
