"""Redis clients built from the Config: auth, TLS, timeouts and a bounded retry, set explicitly
(redis-py's defaults changed between releases; a daemon should not depend on them).

Callers own reconnection with backoff (nilmd.backoff): the client retries a failed command only
briefly, so a dead Redis shows up quickly as an error the process can count and report.

With REDIS_CLUSTER (docs/OPERATIONS.md, "Redis Cluster") the same settings make a redis-py RedisCluster that
finds the cluster from REDIS_HOST:REDIS_PORT; callers do not tell the two apart. It follows MOVED
by itself, and on a lost connection it reads the topology again before its one retry, so after a
failover the callers' next try (their backoff) finds the promoted replica.
"""

from __future__ import annotations

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from nilmd.config import Config

# Everything a Redis call can raise: a lost connection, and every refusal (OOM, NOPERM, READONLY,
# LOADING, BUSY, a reply error). A daemon's Redis call catches all of these, counts and logs them
# (nilmd.errors.redis_error) and goes on: one refused command must never end a loop.
# redis-py's RedisClusterException (no node reachable, a slot not covered) is no RedisError.
ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)


def client(cfg: Config, *, name: str, socket_timeout: float | None = 5.0):
    """A redis.Redis, or with REDIS_CLUSTER a client of the cluster (Cluster, below)."""
    kwargs = dict(
        host=cfg.redis_host,
        port=cfg.redis_port,
        username=cfg.redis_username or None,
        password=cfg.redis_password or None,
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(EqualJitterBackoff(cap=0.5, base=0.05), retries=1),  # the same equal jitter as nilmd.backoff
        client_name=f"nilmd-{name}",
    )
    if cfg.redis_tls:
        kwargs.update(ssl=True, ssl_ca_certs=cfg.redis_tls_ca or None, ssl_certfile=cfg.redis_tls_cert or None,
                      ssl_keyfile=cfg.redis_tls_key or None)
    if cfg.redis_cluster:
        return Cluster(kwargs)
    return redis.Redis(db=cfg.redis_db, **kwargs)


class Cluster:
    """A redis.RedisCluster made on first use, kept working across failovers; otherwise the
    RedisCluster's own methods (and pubsub(), see there).

    - Made on first use: unlike redis.Redis its constructor connects (it reads the topology), and
      a daemon that starts while Redis is away must fail in its first command, which its caller
      counts and tries again, not in a constructor.
    - redis-py 8.1's cluster client can trip over its own topology while a master fails over
      (an AttributeError on a node it no longer has, seen in tests/test_cluster.py): that is
      raised as a ConnectionError, which every caller handles, and the client is made again,
      seeded with every node the old one knew, so that it finds the cluster even when the node
      REDIS_HOST:REDIS_PORT names is the one that died.
    - After a lost connection it reads the topology again itself, but not on every path: a
      pipeline asks its "default node" for the keys of an EVAL (COMMAND GETKEYS) and, that node
      dead, fails the same way for ever. So on a lost connection the topology is read again
      here too (a new default node among the live masters), and the caller's next try works.
    """

    def __init__(self, kwargs: dict):
        self._kwargs = kwargs
        self._cluster = None
        self._known: list[tuple[str, int]] = []  # nodes seen, to seed the next client with

    def _get(self) -> redis.RedisCluster:
        if self._cluster is None:
            from redis.cluster import ClusterNode

            seeds = [ClusterNode(host, port) for host, port in self._known] or None
            kwargs = dict(self._kwargs, startup_nodes=seeds) if seeds else self._kwargs
            self._cluster = redis.RedisCluster(**kwargs)
        return self._cluster

    def _lost(self, e: Exception):
        """Forget a client that lost track of the cluster; the error to raise instead."""
        try:
            self._known = list(dict.fromkeys([(n.host, n.port) for n in self._cluster.get_nodes()] + self._known))
            self._cluster.close()
        except Exception:  # it is broken: what it knew or closing may fail too
            pass
        self._cluster = None
        return redis.ConnectionError(f"the cluster client lost track of the cluster ({type(e).__name__}: {e}); "
                                     "reading its topology again")

    def _refresh(self) -> None:
        try:
            self._cluster.nodes_manager.initialize()
        except Exception:  # nothing answers yet: the caller's next try reads it again
            pass

    def __getattr__(self, attr):
        value = getattr(self._get(), attr)
        return _Guarded(value, self) if callable(value) else value

    def pubsub(self, **kw):
        """Classic pub/sub reaches every node's subscribers, so any node serves; the client picks
        the master of the channel's slot from its slot table, which nothing refreshes while
        only a subscription uses the client: read the topology again first, so that a reader
        subscribing again after a failover does not go back to the dead master."""
        try:
            cluster = self._get()
            cluster.nodes_manager.initialize()
            return cluster.pubsub(**kw)
        except AttributeError as e:
            raise self._lost(e) from e

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Guarded:
    """A RedisCluster method (or the pipeline it makes, and that pipeline's execute) run with
    the repairs of Cluster (see there)."""

    def __init__(self, target, cluster: Cluster):
        self._target, self._cluster = target, cluster

    def __call__(self, *args, **kwargs):
        try:
            result = self._target(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError):
            self._cluster._refresh()
            raise
        except AttributeError as e:
            raise self._cluster._lost(e) from e
        return _Guarded(result, self._cluster) if isinstance(result, redis.cluster.ClusterPipeline) else result

    def __getattr__(self, attr):
        value = getattr(self._target, attr)
        return _Guarded(value, self._cluster) if attr == "execute" else value

    def __len__(self) -> int:  # a pipeline's queued commands (special methods bypass __getattr__)
        return len(self._target)


def publish(pipe, channel: str, message: str) -> None:
    """Queue a PUBLISH on a pipeline of either client. A cluster's pipeline refuses .publish()
    (PUBLISH has no key to route it by) but sends the command itself to a node, and classic
    pub/sub carries a message to the subscribers of every node."""
    pipe.execute_command("PUBLISH", channel, message)


def refusal(text: str) -> Exception:
    """The exception redis-py would raise for an error reply a script returned as text (e.g. an OOM
    that a script caught with pcall), so that nilmd.errors.redis_error names it the same."""
    from redis._parsers import BaseParser

    return BaseParser.parse_error(text)


def describe(cfg: Config) -> str:
    """Where we connect, for error lines (never the password)."""
    scheme = "rediss" if cfg.redis_tls else "redis"
    user = f"{cfg.redis_username}@" if cfg.redis_username else ""
    if cfg.redis_cluster:
        return f"{scheme}+cluster://{user}{cfg.redis_host}:{cfg.redis_port}"
    return f"{scheme}://{user}{cfg.redis_host}:{cfg.redis_port}/{cfg.redis_db}"


# Least privilege (docs/OPERATIONS.md, "Redis ACL"): what the daemon's clients send, per input mode. Every
# connection authenticates (HELLO/AUTH), names itself (CLIENT SETNAME) and PINGs when idle; the
# reader SUBSCRIBEs (pubsub) or reads the stream (EVAL of a script that XRANGEs it, nilmd.daemon.streams)
# and its position; the inference PUBLISHes, SETs `latest` and HSETs the status hash, which the
# supervisor HSETs too, and counts energy and events (HGETALL of the run tracker's state, EVAL of
# the ledger's script: nilmd.daemon.ledger.Ledger.COMMANDS).
_LEDGER = ("eval", "hgetall", "hget", "hkeys", "hincrbyfloat", "xadd")
ACL_COMMANDS = {
    # get: the metrics exporter reads each building's latest prediction (stream mode reads it anyway)
    "pubsub": ("hello", "auth", "client|setname", "ping", "subscribe", "publish", "get", "set", "hset") + _LEDGER,
    "stream": ("hello", "auth", "client|setname", "ping", "get", "hget", "eval", "xrange", "xrevrange", "publish",
               "set", "hset") + tuple(c for c in _LEDGER if c not in ("eval", "hget")),
}


# On a cluster (REDIS_CLUSTER) the client also reads the topology (CLUSTER SLOTS) and the
# commands' key positions (COMMAND; COMMAND GETKEYS for an EVAL in a pipeline).
CLUSTER_ACL_COMMANDS = ("cluster|slots", "command")


def acl_rule(input_mode: str, user: str = "nilmd", cluster: bool = False) -> str:
    """The ACL SETUSER line for the daemon's user: only its keys and channels, only its commands
    (on a cluster: on every node, each keeps its own users)."""
    commands = " ".join(f"+{c}" for c in ACL_COMMANDS[input_mode] + (CLUSTER_ACL_COMMANDS if cluster else ()))
    return f"ACL SETUSER {user} on >PASSWORD resetkeys ~nilm:* resetchannels &nilm:* nocommands {commands}"
