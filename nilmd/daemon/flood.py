"""Telling a flooding pub/sub channel from a meter (issue 23, defect 4).

All of a daemon's buildings share one subscription, and Redis cuts a subscriber whose output
buffer passes `client-output-buffer-limit pubsub`: one building flooded faster than the reader
drains would cut every building's input. So the reader counts what each channel sends, and a
channel past LIMIT_PER_S is unsubscribed for a cool-off (nilmd.daemon.sources.PubSubSource): Redis
stops queueing it at once, the shared buffer drains, the others lose nothing.
"""

from __future__ import annotations

import time

# Messages one channel may send within one second. A meter sends one a second; 2000 lets a
# catch-up burst of more than a whole default window (1536 s) through in one go, yet is ~25 times
# below what the reader drains (~55,000 a second on a 2-core box, docs/FAULTS.md), so a flood is
# shed after 2000 messages, long before it fills the default 32 MB buffer (~250,000 messages).
LIMIT_PER_S = 2000


class FloodGuard:
    """Messages per channel within a second of its first one, and the channels shed until when."""

    def __init__(self, cooloff: float, limit: int = LIMIT_PER_S, clock=time.monotonic):
        self.cooloff, self.limit, self.clock = cooloff, limit, clock
        self._counts: dict[str, list] = {}  # channel -> [when its second began, messages in it]
        self.shed: dict[str, float] = {}  # channel -> when it may be subscribed again

    def flooding(self, channel: str) -> float | None:
        """Count one message; its channel's rate (messages/s) when this one takes it past the
        limit (the channel is shed from now on), else None."""
        now = self.clock()
        count = self._counts.get(channel)
        if count is None or now - count[0] >= 1.0:
            count = self._counts[channel] = [now, 0]
        count[1] += 1
        if count[1] <= self.limit:
            return None
        del self._counts[channel]
        self.shed[channel] = now + self.cooloff
        return count[1] / max(now - count[0], 1e-3)

    def due(self) -> list[str]:
        """Shed channels whose cool-off is over: no longer shed, to be subscribed again."""
        now = self.clock()
        over = [c for c, until in self.shed.items() if now >= until]
        for channel in over:
            del self.shed[channel]
        return over

    def forget(self, channel: str) -> None:
        self._counts.pop(channel, None)
        self.shed.pop(channel, None)
