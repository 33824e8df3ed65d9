"""The house's always-on load: the power it never goes below (Sense's "Always On", what home
owners quote first), judged from the aggregate the daemon already holds.

A low percentile (PERCENTILE) of the measured samples of the last 24 h in the ring, not the
minimum: one odd reading must not set it. Robust to gaps by construction: it looks at the
samples there are, whatever is missing between them; seconds filled by holding a sample
(--max-gap-fill) and readings of 0 W or less (a meter without power or without a reading, not
a house drawing nothing) are left out. The ring survives restarts of the inference process
and, by its snapshot, of the daemon, so the estimate does too.

Checked on the real houses (scripts/check_always_on.py: each day's 24 h of real-1min data
against that night's lowest 10-minute mean, 01:00-05:00): REFIT House 2, 355 days: median
difference -0.6 W of 90 W; UK-DALE House 2, 118 days: +0.3 W of 127 W, mean absolute
difference 1.9 W. With 8 random hours of each day missing, the same medians
(docs/OPERATIONS.md, "Always on and other").
"""

from __future__ import annotations

import numpy as np

from nilmd.daemon.ringbuffer import FLAG_MEASURED

PERCENTILE = 5.0
HORIZON_S = 86400.0  # the last 24 h (fewer after a start: what the ring holds)
REFRESH_S = 600.0  # meter seconds between two estimates: it moves slowly, and 86400 samples cost ~2 ms


def estimate(ts: np.ndarray, flags: np.ndarray, power: np.ndarray, now: float) -> float:
    """The always-on power (W) from samples (grid seconds, flags, W) up to `now`; 0 with none."""
    keep = (flags == FLAG_MEASURED) & (ts > now - HORIZON_S) & (power > 0) & np.isfinite(power)
    return float(np.percentile(power[keep], PERCENTILE)) if keep.any() else 0.0


class AlwaysOn:
    """One building's estimate, computed again every REFRESH_S of meter time."""

    def __init__(self):
        self.watts, self.at = 0.0, None

    def update(self, ring, now: float) -> float:
        if self.at is None or not 0 <= now - self.at < REFRESH_S:  # also when the meter's clock went back
            ts, flags, power = ring.recent(int(HORIZON_S))
            self.watts, self.at = round(estimate(ts, flags, power, now), 2), now
        return self.watts
