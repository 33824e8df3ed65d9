"""Fencing (--leases): whatever an instance writes for a building, Redis itself refuses unless the
writer still holds that building's lease, so a paused, partitioned or slow holder cannot write
after its lease is gone (docs/CONTRACT.md §5.1, issue 23).

Every such write is a script that first compares a guard key with the writer's token (the lease's
value, `name#random`, one per supervisor life) and refuses with `FENCED ...` when they differ: the
check and the write are one atomic step in Redis.

- One Redis server: the guard is the lease key `nilm:{b}:lease` itself.
- A Redis Cluster: a script may touch one slot only, and a building's keys lie in many. Each key K
  written has its own guard in K's slot, `K:fence{K}` (the hash tag is K itself), holding the
  token. The holder sets them after it took the lease and before it serves (nilmd.daemon.sharing),
  renews them with the lease only while they are its own, with a shorter expiry than the lease,
  so they run out before it does: no one else can have the lease while a guard still names us.

Without --leases nothing here is used: the writes are the plain commands they always were.
"""

from __future__ import annotations

from nilmd import keys

FENCED = "FENCED"  # the first word of the refusal
GUARD_SHARE = 0.9  # a cluster guard's expiry, as a share of the lease period: it runs out first

# Prefixed to a script whose key is KEYS[1]: the guard is KEYS[2], the token the last ARGV (taken
# off, so the script's own ARGV are as they were).
_CHECK = """local fence_token = table.remove(ARGV)
if redis.call('GET', KEYS[2]) ~= fence_token then
  return redis.error_reply('FENCED ' .. KEYS[1] .. ': this instance no longer holds the building\\'s lease')
end
"""
# One plain command on KEYS[1]: ARGV[1] the command, the rest its arguments after the key.
_COMMAND = "return redis.call(ARGV[1], KEYS[1], unpack(ARGV, 2))"
# A prediction: SET latest, then PUBLISH it (a subscriber that reads `latest` on the message finds
# it). A refused SET (OOM) does not stop the message, as with the plain commands: it is returned.
_PREDICTION = """local stored = redis.pcall('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[1])
if type(stored) == 'table' and stored.err then return stored.err end
return 'OK'
"""

# The keys a building's writers write: what a cluster guards one by one.
GUARDED = (keys.latest_key, keys.status_key, keys.energy_key, keys.runs_key, keys.predictions_stream,
           keys.events_stream, keys.position_key)


def fenced(script: str) -> str:
    """The script behind the lease check (nilmd.daemon.ledger's scripts, or one of this module's)."""
    return _CHECK + script


def guard_keys(building: str) -> list[str]:
    """A building's guards on a cluster, one per key written (each in its key's slot)."""
    return [cluster_guard(key(building)) for key in GUARDED]


def cluster_guard(key: str) -> str:
    return f"{key}:fence{{{key}}}"


def is_fenced(reply) -> bool:
    """Whether a reply (or exception) is Redis refusing a write of a lease this instance lost."""
    return isinstance(reply, Exception) and str(reply).startswith(FENCED)


class Plain:
    """The writes of an instance without leases: Fence's calls, unguarded. Every writer takes one
    or the other and never asks which (but the prediction, whose replies differ: `fenced`)."""

    fenced = False
    token = None

    def eval(self, pipe, building: str, script: str, key: str, *args) -> None:
        pipe.execute_command("EVAL", script, 1, key, *args)

    def command(self, pipe, building: str, command: str, key: str, *args) -> None:
        pipe.execute_command(command, key, *args)

    def hset(self, pipe, building: str, key: str, mapping: dict) -> None:
        pipe.hset(key, mapping=mapping)


PLAIN = Plain()


def writes(token: str | None, cluster: bool) -> "Fence | Plain":
    """This instance life's writer: fenced by the lease token (--leases), else plain."""
    return Fence(token, cluster) if token else PLAIN


class Fence:
    """The writes of one instance life: each one a script checked against the building's guard."""

    fenced = True
    _scripts: dict[str, str] = {}

    def __init__(self, token: str, cluster: bool):
        self.token, self.cluster = token, cluster

    def guard(self, building: str, key: str) -> str:
        return cluster_guard(key) if self.cluster else keys.lease_key(building)

    def eval(self, pipe, building: str, script: str, key: str, *args) -> None:
        """EVAL `script` (its one key KEYS[1]) only while the lease is ours."""
        text = self._scripts.get(script) or self._scripts.setdefault(script, fenced(script))
        pipe.execute_command("EVAL", text, 2, key, self.guard(building, key), *args, self.token)

    def command(self, pipe, building: str, command: str, key: str, *args) -> None:
        """A plain command on one key (HSET, ...), fenced."""
        self.eval(pipe, building, _COMMAND, key, command, *args)

    def hset(self, pipe, building: str, key: str, mapping: dict) -> None:
        flat = [x for pair in mapping.items() for x in pair]
        self.command(pipe, building, "HSET", key, *flat)

    def prediction(self, pipe, building: str, text: str) -> None:
        """SET latest and PUBLISH the prediction; the reply is 'OK' or the SET's refusal (text)."""
        self.eval(pipe, building, _PREDICTION, keys.latest_key(building), text, keys.predictions_channel(building))
