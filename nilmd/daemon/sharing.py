"""Several nilmd instances sharing one building list without overlap (docs/OPERATIONS.md, "Past one box").

Static shards (`--shard K/N`): instance K of N serves the buildings whose stable hash falls in its
shard. Nothing moves by itself: an instance that dies leaves its buildings unserved until it is
back (systemd restarts it), and changing N moves about (N-1)/N of the buildings. For a fixed fleet
of boxes that are each restarted by systemd.

Leases (`--leases`): every instance is given the whole list and serves the buildings whose lease
it holds. A lease is a key `nilm:<id>:lease` holding the instance's token, SET NX PX (the holder
renews it on its heartbeat, a third of the lease period); when an instance dies its leases expire
and the others take its buildings within a lease period and a renewal, warm from their input
streams in stream mode (the position is in Redis). Who should hold what is decided by rendezvous
hashing over the live instances, so every instance computes the same answer alone, a new or a
departed instance moves only its own share, and an instance gives a building back once the one it
belongs to is live. Live instances register in one sorted set, `nilm:nilmd:instances`, scored by
the Redis server's clock (never the boxes': their clocks need not agree).

Leases fence (nilmd.daemon.fencing): every write for a building is refused by Redis unless the lease
still holds this life's token, so an instance stalled past a lease period (SIGSTOP, a frozen VM, a
partition) writes nothing once its lease is gone; its inference drops the building at the first
refusal and the supervisor lets it go. On a cluster the token is also copied beside each key
written (its guards), which are set once the lease is taken and renewed with it.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time

from nilmd import keys
from nilmd.buildings import in_shard, listed, parse_shard, stable_hash
from nilmd.daemon import fencing
from nilmd.errors import redis_error

INSTANCES_KEY = "nilm:nilmd:instances"

# One round trip, server-clock based: register (score = expiry, ms), forget the expired, list the live.
_REGISTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], 10 * tonumber(ARGV[2]))
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
# Renew (ARGV[2] > 0) or release (ARGV[2] == 0) a lease, only while it is ours.
_KEEP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
"""


_LIVE = """
local t = redis.call('TIME')
return redis.call('ZRANGEBYSCORE', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), '+inf')
"""


def _name(token) -> str:
    """The instance name a lease or registration token carries (`name#nonce`)."""
    return (token.decode() if isinstance(token, bytes) else token).rpartition("#")[0]


def live_names(client) -> list[str]:
    """The names of the instances registered and not expired (by the server's clock), for a reader
    such as `nilmd status`: it registers nothing."""
    tokens = client.eval(_LIVE, 1, INSTANCES_KEY)
    return sorted({_name(t) for t in tokens})


def holder_names(client, buildings: list[str]) -> dict[str, str]:
    """building -> the instance name its lease holds ('' none); one GET each (a cluster's keys lie apart)."""
    pipe = client.pipeline(transaction=False)
    for b in buildings:
        pipe.get(keys.lease_key(b))
    return {b: (_name(v) if v else "") for b, v in zip(buildings, pipe.execute())}


def owner(building: str, instances: list[str]) -> str:
    """The live instance a building belongs to (rendezvous hashing): every instance agrees alone."""
    return max(instances, key=lambda name: stable_hash(f"{building}|{name}"))


def instance_name(cfg) -> str:
    """This instance's name: NILMD_INSTANCE, else the host's. Keep it across restarts, so that an
    instance's buildings come back to it; two instances on one host need their own."""
    return cfg.instance_name or socket.gethostname()


class Leases:
    """One instance's leases. `claim(candidates)` once per renewal period returns the buildings it
    holds now; the caller serves exactly those."""

    def __init__(self, client, name: str, period_s: float, errors=(Exception,), clock=time.monotonic,
                 cluster: bool = False):
        self.client = client
        self.name = name
        self.token = f"{name}#{secrets.token_hex(6)}"  # unique to this life: two lives never share a lease
        self.period_ms = int(period_s * 1000)
        self.cluster = cluster  # the token also in each building's guards (nilmd.daemon.fencing)
        self.guard_ms = int(self.period_ms * fencing.GUARD_SHARE)
        self.errors = errors
        self.clock = clock
        self.held: set[str] = set()
        self.instances: list[str] = []
        self.renewed_at = -float("inf")  # clock() of the last claim Redis answered

    def live(self) -> list[str]:
        """Register this instance and return the names of the live ones (sorted, this one included)."""
        tokens = self.client.eval(_REGISTER, 1, INSTANCES_KEY, self.token, self.period_ms)
        return sorted({_name(t) for t in tokens} | {self.name})

    def claim(self, candidates: list[str]) -> set[str]:
        """Renew what is held, take what belongs here and is free, give back what belongs to another
        live instance. Redis unreachable: what is held is kept until it has run out (a lease period
        after the last renewal), then nothing is held, since another instance may have taken it."""
        started = self.clock()
        try:
            self.held = self._claim(candidates)
            self.renewed_at = started
        except self.errors:
            if started - self.renewed_at > self.period_ms / 1000:
                self.held = set()
            raise
        return set(self.held)

    def _claim(self, candidates: list[str]) -> set[str]:
        self.instances = self.live()
        mine = {b for b in candidates if owner(b, self.instances) == self.name}
        held = sorted(self.held & set(candidates))
        take = sorted(mine - self.held)
        pipe = self.client.pipeline(transaction=False)
        for b in held:  # renewed if it still belongs here, else given back
            self._keep(pipe, b, b in mine)
        for b in take:
            pipe.set(keys.lease_key(b), self.token, nx=True, px=self.period_ms)
        replies = iter(pipe.execute(raise_on_error=False))
        now, stamp = set(), []
        for b in held:
            reply = next(replies)
            guards = [next(replies) for _ in self._guards(b)]
            if b in mine and (reply == 1 or isinstance(reply, Exception)):  # refused: the next renewal decides
                now.add(b)
                if reply == 1 and any(g == 0 for g in guards):  # a guard ran out while the lease is ours
                    stamp.append(b)
        for b in take:
            if next(replies) is not True:
                continue
            if self.cluster:
                stamp.append(b)
            else:
                now.add(b)
        return now | self._stamp(stamp)

    def _guards(self, b: str) -> list[str]:
        return fencing.guard_keys(b) if self.cluster else []

    def _keep(self, pipe, b: str, renew: bool) -> None:
        """Queue the renewal (or the release) of a lease and its guards, each only while it is ours."""
        # execute_command: a cluster's pipeline has no eval() taking arguments
        pipe.execute_command("EVAL", _KEEP, 1, keys.lease_key(b), self.token, self.period_ms if renew else 0)
        for g in self._guards(b):
            pipe.execute_command("EVAL", _KEEP, 1, g, self.token, self.guard_ms if renew else 0)

    def _stamp(self, buildings: list[str]) -> set[str]:
        """On a cluster, a lease just taken is served only once its guards hold the token (else the
        writes would be refused); a building whose guards could not all be set is given back."""
        if not buildings:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for b in buildings:
            for g in self._guards(b):
                pipe.set(g, self.token, px=self.guard_ms)
        replies = iter(pipe.execute(raise_on_error=False))
        done = {b for b in buildings if all([next(replies) is True for _ in self._guards(b)])}
        self.give_back(set(buildings) - done)
        return done

    def give_back(self, buildings: set[str]) -> None:
        """Release these leases (those still ours) and stop holding them."""
        if not buildings:
            return
        self.held -= buildings
        pipe = self.client.pipeline(transaction=False)
        for b in sorted(buildings):
            self._keep(pipe, b, False)
        pipe.execute(raise_on_error=False)

    def release_all(self) -> None:
        """A clean stop: give every lease back at once, so the others need not wait for them to expire."""
        pipe = self.client.pipeline(transaction=False)
        for b in sorted(self.held):
            self._keep(pipe, b, False)
        pipe.zrem(INSTANCES_KEY, self.token)
        pipe.execute(raise_on_error=False)
        self.held = set()


class Sharing:
    """The supervisor's view of what of the list is this instance's: the list read at start and
    on SIGHUP (`candidates`, only its shard with --shard) and, with --leases, the leases it holds.
    `wanted()` is what to serve now; `claim()` every third of a lease period keeps it current."""

    def __init__(self, cfg, client=None, errors=(), throttle=None):
        self.cfg = cfg
        self.name = instance_name(cfg)  # the list daemon's hash, and its name among lease holders
        self.throttle = throttle
        self.errors = errors
        self.candidates = self.read()
        self.leases = Leases(client, self.name, cfg.lease_period, errors=errors,
                             cluster=cfg.redis_cluster) if cfg.leases else None
        # with --leases, every write for a building is checked against its lease (nilmd.daemon.fencing)
        self.fence = fencing.writes(self.leases.token if self.leases else None, cfg.redis_cluster)
        self.next_claim = 0.0
        self._trouble = False
        if self.leases is not None:
            self.claim()  # before any shared memory: what to open is what is held

    def read(self) -> list[str]:
        """The buildings this instance may serve: the list (--building-ids), only shard K of N with
        --shard. ConfigError as nilmd.buildings.listed raises it."""
        ids = listed(self.cfg)
        if self.cfg.shard:
            ids = in_shard(ids, *parse_shard(self.cfg.shard))
        return ids

    def wanted(self) -> list[str]:
        """The buildings to serve now: the candidates, with --leases only those whose lease is held."""
        if self.leases is None:
            return list(self.candidates)
        return [b for b in self.candidates if b in self.leases.held]

    def due(self) -> bool:
        return self.leases is not None and time.monotonic() >= self.next_claim

    def claim(self) -> None:
        """Renew, take and give back leases; Redis away is one throttled line, and what is held is
        served until it runs out (Leases.claim)."""
        self.next_claim = time.monotonic() + self.cfg.lease_period / 3
        try:
            self.leases.claim(self.candidates)
        except self.errors as e:
            self._trouble = True
            self.throttle.log("leases", logging.ERROR, f"could not renew the leases: {redis_error(e)[1]}; serving "
                              f"the {len(self.leases.held)} buildings still held until they run out")
        else:
            if self._trouble:
                self._trouble = False
                self.throttle.ok("leases", msg="the leases are renewed again")

    def let_go(self, buildings: list[str]) -> None:
        """Buildings whose writes Redis refused (fenced): no longer held; their leases, where still
        ours (a cluster guard that ran out), given back so that a fresh claim sets everything anew."""
        try:
            self.leases.give_back(set(buildings))
        except self.errors as e:
            self.leases.held -= set(buildings)
            self.throttle.log("leases", logging.ERROR, f"could not give back fenced leases: {redis_error(e)[1]}")

    def fields(self) -> dict:
        """For the list daemon's hash (docs/CONTRACT.md §3.5.1)."""
        out = {"instance": self.name, "shard": self.cfg.shard, "candidates": len(self.candidates)}
        if self.leases is not None:
            out.update(leases_held=len(self.leases.held), instances_live=len(self.leases.instances))
        return out

    def release(self, log) -> None:
        """A clean stop: the leases back at once (after the last snapshot: the next holder goes on from it)."""
        if self.leases is None:
            return
        try:
            self.leases.release_all()
        except self.errors as e:
            log.warning("could not give the leases back (they run out in %.0f s): %s", self.cfg.lease_period,
                        redis_error(e)[1])
