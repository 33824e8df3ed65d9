"""Where the reader gets meter messages from. Each source hands over raw messages (bytes or
str, one JSON sample each) in batches; validation is the reader's job, the same for all.

  PubSubSource     SUBSCRIBE nilm:{b}:input (the original service's contract; at-most-once)
  StreamSource     nilm:{b}:input:stream in bounded batches from a persisted position (nilmd.daemon.streams; at-least-once)
  SimulatedSource  `--mode test`: a simulated building, no Redis

After the reader has written a batch into the ring it calls `commit()`: a durable source records
its position then, never before, so a crash in between re-reads rather than loses.
"""

from __future__ import annotations

import json
import logging
import time

from nilmd import keys
from nilmd.config import Config
from nilmd.daemon.batch import Batch
from nilmd.daemon.flood import FloodGuard
from nilmd.daemon.streams import StreamSource

log = logging.getLogger("nilmd.reader")

# Why a subscription was cut (input_disconnects_<cause> in the status hash), in words for the log.
# redis-py subscribes again by itself inside get_message, so a cut shows only as a second
# subscribe confirmation: what was published in between is lost, without an error.
DISCONNECT_CAUSES = {
    "output_buffer": "Redis closed it because the reader fell behind and its output buffer passed "
                     "client-output-buffer-limit pubsub",
    "server_restart": "Redis restarted",
    "timeout": "Redis stopped answering",
    "closed": "Redis or the network closed it",
}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


class PubSubSource:
    """SUBSCRIBE to every building's input channel on one connection. Not PSUBSCRIBE nilm:*:input:
    Redis would send this reader every building's samples on the server (another daemon's too) to
    be parsed and dropped here, an ACL user would need every channel, and one building removed
    from the list must stop arriving, which an UNSUBSCRIBE says exactly. With several buildings a
    flooding channel is unsubscribed for a cool-off (nilmd.daemon.flood), so that its flood cannot
    make Redis cut the subscription the others share."""

    name = "pubsub"
    disconnected = None  # the cause of a cut the reader has not taken yet (DISCONNECT_CAUSES)
    CHUNK = 256  # channels per SUBSCRIBE command

    def __init__(self, cfg: Config, feeds: dict):
        """`feeds`: the reader's (nilmd.daemon.reader.Feed by building; a shed flood is counted in
        their blocks)."""
        from nilmd import redisconn  # redis-py only where Redis is used

        self.cfg = cfg
        self.feeds = feeds
        self.channels = {keys.input_channel(b): b for b in feeds}
        self.flood = FloodGuard(cfg.flood_cooloff)
        self.errors = redisconn.ERRORS  # every Redis error: the reader counts it, says which, and retries
        self._client = redisconn.client(cfg, name="reader", socket_timeout=3.0)  # < heartbeat timeout
        self._pubsub = None
        self.subscribed = False
        # Channels whose subscription Redis confirmed: a second confirmation of one of them means
        # redis-py subscribed again by itself after a cut.
        self._confirmed: set[str] = set()
        self._server = None  # (run_id, output-buffer disconnections) when last subscribed
        self._error = None  # what redis-py raised to us since then, if anything
        self._behind = False  # the last read had a full batch: messages were waiting

    def connect(self) -> None:
        self.close()
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=False)
        self._subscribe(self._wanted())
        if not self.channels:  # a list with no building to serve right now (leases): nothing to confirm
            self.subscribed = True

    def _subscribe(self, channels: list[str]) -> None:
        for i in range(0, len(channels), self.CHUNK):
            self._pubsub.subscribe(*channels[i:i + self.CHUNK])

    def _wanted(self) -> list[str]:
        return [c for c in self.channels if c not in self.flood.shed]

    def add(self, feed) -> None:
        channel = keys.input_channel(feed.building)
        self.channels[channel] = feed.building
        self.flood.forget(channel)
        if self._pubsub is not None:
            self._subscribe([channel])

    def remove(self, building: str) -> None:
        channel = keys.input_channel(building)
        self.channels.pop(channel, None)
        self._confirmed.discard(channel)
        self.flood.forget(channel)
        if self._pubsub is not None:
            self._pubsub.unsubscribe(channel)

    def read(self, timeout: float, limit: int = 4096) -> list:
        """Messages that arrived (a Batch), waiting at most `timeout` for the first one. A batch
        ends at a cut (`disconnected` says why): what follows is after the gap."""
        out, shed = Batch(), {}
        try:
            self._subscribe_again()
            msg = self._pubsub.get_message(timeout=timeout)
            while msg is not None:
                kind = msg.get("type")
                if kind == "message":
                    channel = _text(msg["channel"])
                    building = self.channels.get(channel)
                    if building is None:  # (an UNSUBSCRIBEd channel's last messages: dropped)
                        pass
                    elif channel in self.flood.shed or self._flooding(channel, building):
                        shed[building] = shed.get(building, 0) + 1
                    else:
                        out.put(msg["data"], building)
                elif kind == "subscribe" and self._confirm(_text(msg["channel"]), bool(out)):
                    break
                if len(out) >= limit:
                    self._behind = True
                    break
                msg = self._pubsub.get_message(timeout=0.0)
            else:
                self._behind = False
        except self.errors as e:
            self._error = e
            raise
        finally:
            self._count_shed(shed)
        return out

    def _flooding(self, channel: str, building: str) -> bool:
        """Count the message; past the limit (several buildings only: alone, a building's flood
        cuts nobody else, and shedding it would only lose more of its own) unsubscribe now."""
        if len(self.channels) < 2:
            return False
        rate = self.flood.flooding(channel)
        if rate is None:
            return False
        self._pubsub.unsubscribe(channel)
        self._confirmed.discard(channel)  # its next confirmation is a new subscription, not a cut
        log.warning("building %s: its input channel sent over %d messages within a second (read at %d/s; a meter "
                    "sends 1): unsubscribed "
                    "for %.0f s so that it cannot cut the other buildings' input; what it sends meanwhile is "
                    "lost (rejected_flood counts what was read after)", building, self.flood.limit, rate,
                    self.flood.cooloff)
        return True

    def _subscribe_again(self) -> None:
        for channel in self.flood.due():
            if channel in self.channels:
                log.info("building %s: subscribed again after the flood's cool-off", self.channels[channel])
                self._subscribe([channel])

    def _count_shed(self, shed: dict) -> None:
        """Messages of a shed channel still read (queued before the UNSUBSCRIBE): received and
        rejected as `flood`, so that received = accepted + rejected holds."""
        for building, n in shed.items():
            feed = self.feeds.get(building)
            if feed is not None:
                feed.ctl.add("rejected_flood", n)
                feed.ctl.add("samples_received", n)

    def _confirm(self, channel: str, got: bool) -> bool:
        """A subscription confirmed; True when it shows a cut (the batch ends there)."""
        again = channel in self._confirmed
        cause = self._cause(self._behind or got) if again else None
        if again:
            self._confirmed = set()  # the round of resubscriptions it starts
        if not self._confirmed:
            self._error, self._behind = None, False
            self._server = self._server_info()
        self._confirmed.add(channel)
        if not self.subscribed and len(self._confirmed) >= len(self.channels) - len(self.flood.shed):
            self.subscribed = True
            if not cause:
                log.info("subscribed to %s", channel if len(self.channels) == 1 else
                         f"{len(self.channels)} input channels")
        if cause:
            self.disconnected = cause
            return True
        return False

    def _server_info(self):
        """(run_id, output-buffer disconnections or None before Redis 7.2), or None when INFO
        is not allowed to this user or fails."""
        try:
            server, stats = self._client.info("server"), self._client.info("stats")
        except self.errors:
            return None
        return server.get("run_id"), stats.get("client_output_buffer_limit_disconnections")

    def _cause(self, behind: bool) -> str:
        """Why the subscription was cut: Redis says so where it can (INFO), else judged from
        what the reader saw (an error, or a backlog of messages when the connection closed)."""
        now, before = self._server_info(), self._server
        if now and before:
            if now[0] != before[0]:
                return "server_restart"
            if now[1] is not None and before[1] is not None and now[1] > before[1]:
                return "output_buffer"
            behind = behind and now[1] is None  # Redis counts them, and did not count this one
        if self._error is not None and "TimeoutError" in {c.__name__ for c in type(self._error).__mro__}:
            return "timeout"
        return "output_buffer" if behind else "closed"

    def close(self) -> None:
        self.subscribed = False
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except Exception:  # closing a broken connection may raise; it is gone either way
                pass
            self._pubsub = None

    def commit(self) -> None:
        pass  # pub/sub has no position: what was published while we were away is gone


class SimulatedSource:
    """A simulated meter for `--mode test`: the first window at once, then `speed` samples per
    second, as JSON messages through the same validation as real ones."""

    name = "simulation"
    disconnected = None
    errors = ()
    START = 1704096000.0  # 2024-01-01 08:00 UTC: a morning, so appliances start soon

    def __init__(self, cfg: Config, clock=time.monotonic):
        from nilmd.sim.simulator import Building

        self.building = Building(cfg.seed)
        self.speed = cfg.speed
        self.burst = cfg.window_size  # sent at once at the start: the first window
        self.clock = clock
        self.subscribed = True
        self._next = self.START  # timestamp of the next sample
        self._t0 = None

    def connect(self) -> None:
        if self._t0 is None:
            self._t0 = self.clock()

    def _due(self) -> int:
        """Samples that should have been sent by now, counted from START."""
        return self.burst + int((self.clock() - self._t0) * self.speed)

    def read(self, timeout: float, limit: int = 4096) -> list:
        sent = int(self._next - self.START)
        n = min(self._due() - sent, limit)
        if n <= 0:
            time.sleep(min(timeout, max(0.0, 1.0 / self.speed)))
            return []
        trace = self.building.trace(self._next, n)
        self._next += n
        return [json.dumps(m) for m in trace.messages("full")]

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_source(cfg: Config, feeds: dict, counters, fence_token: str | None = None):
    """The configured source for the reader's buildings (nilmd.daemon.reader.Feed, by id); a stream
    keeps each one's position in its control block and looks into its ring to mark where the
    history of an earlier run ends. `counters`: the daemon block, for the reader's own errors.
    `fence_token` (--leases): a stream's position is recorded only while the lease is ours."""
    if cfg.mode == "test":
        return SimulatedSource(cfg)
    if cfg.input_mode == "stream":
        return StreamSource(cfg, feeds, counters, fence_token)
    return PubSubSource(cfg, feeds)
