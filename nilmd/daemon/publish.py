"""Where the inference's predictions go: Redis (a batch of buildings in one pipeline, each with its
energy ledger), or stdout in `--mode test`. Both take [(the building's Config, prediction)] and
say which went out; the inference holds the others and tries them again."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import numpy as np

from nilmd import keys
from nilmd.appliances import APPLIANCES
from nilmd.config import Config
from nilmd.daemon.fencing import PLAIN, Fence, Plain, is_fenced
from nilmd.daemon.ledger import PENDING_MAX, Ledger
from nilmd.errors import redis_error


class RedisPublisher:
    """SET latest, the inference's status fields and the ledger's parts, and PUBLISH the
    prediction: every building of a batch in one pipeline, each with its own ledger."""

    def __init__(self, cfg: Config, logger, throttle, ctl, fence: Fence | Plain = PLAIN):
        from nilmd import redisconn

        self.redisconn = redisconn
        self.client = redisconn.client(cfg, name="inference", socket_timeout=2.0)
        self.errors = redisconn.ERRORS  # every Redis error, a refusal (OOM, NOPERM) too
        self.cfg = cfg
        self.log, self.throttle, self.ctl = logger, throttle, ctl  # ctl: the daemon block (this process's errors)
        self.ledgers: dict[str, Ledger] = {}  # energy, events and history: scripts beside each prediction
        self.fence = fence  # with --leases: every write only while the lease is ours (nilmd.daemon.fencing)
        self.fenced: set[str] = set()  # buildings Redis refused for a lease lost: the caller lets them go

    def forget(self, building: str) -> None:
        self.ledgers.pop(building, None)

    def ledger_of(self, cfg: Config) -> Ledger:
        return self.ledgers.get(cfg.building_id) or self.ledgers.setdefault(cfg.building_id, Ledger(cfg))

    @property
    def ledger(self) -> Ledger:
        """The ledger of --building-id (one building)."""
        return self.ledger_of(self.cfg)

    def publish(self, prediction: dict, cfg: Config | None = None) -> bool:
        return self.publish_many([(cfg or self.cfg, prediction)])[0]

    def publish_many(self, items: list[tuple[Config, dict]]) -> list[bool]:
        """[(the building's Config, prediction)] -> whether each went out (False: the caller holds it)."""
        queued = []  # (ledger, or None when not counting; how many commands it queued)
        replies = error = None
        try:
            pipe = self.client.pipeline(transaction=False)
            for cfg, prediction in items:
                b = cfg.building_id
                ledger = self.ledger_of(cfg)
                counted = self._ledger_ready(ledger)
                start = len(pipe)
                text = json.dumps(prediction, separators=(",", ":"))
                fields = {"last_inference_ts": prediction["timestamp"],
                          "last_inference_ms": prediction["inference_time_ms"],
                          "last_window_end": prediction["window_end"]}
                if not self.fence.fenced:  # fenced, latest is SET with the PUBLISH below, in one script
                    pipe.set(keys.latest_key(b), text)
                self.fence.hset(pipe, b, keys.status_key(b), fields)
                if counted:
                    ledger.queue(pipe, prediction, text, self.fence)
                # PUBLISH last: Redis runs it once it has read the whole pipeline, so its reply
                # leaves with the message itself; first, a connection cut after the message went
                # out but before the rest was read would make this prediction go out again. And a
                # subscriber that reads `latest` on the message finds this one.
                if self.fence.fenced:
                    self.fence.prediction(pipe, b, text)
                else:
                    self.redisconn.publish(pipe, keys.predictions_channel(b), text)
                queued.append((b, ledger if counted else None, len(pipe) - start))
            replies = pipe.execute(raise_on_error=False)
        except self.errors as e:
            error = e  # nothing is known to have been done: for the ledgers, each part failed
        out, at = [], 0
        for b, ledger, n in queued:
            mine = error if replies is None else replies[at:at + n]
            if not isinstance(mine, Exception) and any(is_fenced(r) for r in mine):
                self.fenced.add(b)  # not this instance's any more: nothing to count or try again
                out.append(not isinstance(mine[-1], Exception))
            else:
                out.append(self._settle(ledger, mine))
            at += n
        # the rest never got queued (a ledger's state could not be read: Redis is away): held
        return out + [self._settle(None, error) for _ in items[len(queued):]]

    def _settle(self, ledger, replies) -> bool:
        """One building's replies (or the exception for all of them): True if it went out."""
        if isinstance(replies, Exception):
            published, stored, parts = replies, [], replies
        elif not self.fence.fenced:
            published, stored, parts = replies[-1], replies[:2], replies[2:-1]
        else:  # the fenced script's reply: 'OK', or the refusal of its SET of latest (the message went out)
            published, stored, parts = replies[-1], replies[:1], replies[1:-1]
            if not isinstance(published, Exception) and published not in (b"OK", "OK"):
                stored = stored + [self.redisconn.refusal(
                    published.decode() if isinstance(published, bytes) else published)]
        if ledger is not None:
            error, dropped = ledger.settle(parts)
            if error is not None and not isinstance(published, Exception):  # else one line says it
                self._failed(error, "could not count a prediction's energy and events yet (tried again with the "
                             "next one)", "ledger")
            for part in dropped:
                self.log.error("gave up counting the %s of the interval ending %s: Redis did not take it while "
                               "%d later parts waited", part.kind, part.window_end, PENDING_MAX)
        if isinstance(published, Exception):
            # The caller keeps the prediction and tries again (InferenceWorker.serve).
            self._failed(published, "could not publish a prediction")
            return False
        refused = [r for r in stored if isinstance(r, Exception)]
        if refused:
            # Out of memory or a missing SET/HSET permission: the prediction is on the channel
            # already, so it is not sent again (that would deliver it twice); `latest` is stale.
            self._failed(refused[0], "published a prediction but could not store it (latest, status)")
        return True

    def _ledger_ready(self, ledger: Ledger) -> bool:
        """The run tracker's state is known (read from Redis if need be); False: not counting now."""
        if ledger.state is None:
            try:
                ledger.load(self.client)
            except self.errors as e:
                if redis_error(e)[0] == "unreachable":
                    raise  # the prediction cannot go out either: it is held and tried again, counted then
                self._failed(e, "could not read the run tracker's state (energy and events of this interval are "
                             "not counted)", "ledger")
                return False
        return True

    def _failed(self, error: Exception, what: str, topic: str = "publish") -> None:
        self.ctl.add("inference_redis_errors")
        kind, line = redis_error(error, script=Ledger.COMMANDS)
        self.throttle.log(f"{topic} {kind}", logging.ERROR, f"{what}: {line}")


class StdoutPublisher:
    """`--mode test`: one JSON line per prediction, with the simulator's truth beside it."""

    def __init__(self, cfg: Config):
        from nilmd.sim.simulator import Building

        self.building = Building(cfg.seed)
        self.interval = cfg.inference_interval

    def publish(self, prediction: dict) -> bool:
        n = self.interval
        trace = self.building.trace(prediction["window_end"] - n + 1, n)
        prediction["truth"] = {
            name: round(float(np.mean(trace.appliances[name])), 2) for name in APPLIANCES
        }
        try:
            sys.stdout.write(json.dumps(prediction, separators=(",", ":")) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # `nilmd run --mode test | head`: whoever read the predictions is gone, and with it the
            # point of test mode. Stop the whole daemon as SIGTERM does (exit 0), not crash five times.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            logging.getLogger("nilmd.inference").info("stdout was closed by its reader: ending test mode")
            os.kill(os.getppid(), signal.SIGTERM)
            return False
        return True

    def publish_many(self, items: list[tuple[Config, dict]]) -> list[bool]:
        return [self.publish(prediction) for _, prediction in items]

    def forget(self, building: str) -> None:
        pass
