"""Redis clients built from the Config: auth, TLS, timeouts and a bounded retry, set explicitly
(redis-py's defaults changed between releases; a daemon should not depend on them).

Callers own reconnection with backoff (nilmd.backoff): the client retries a failed command only
briefly, so a dead Redis shows up quickly as an error the process can count and report.
"""

from __future__ import annotations

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from nilmd.config import Config

# Everything a Redis call can raise: a lost connection, and every refusal (OOM, NOPERM, READONLY,
# LOADING, BUSY, a reply error). A daemon's Redis call catches all of these, counts and logs them
# (nilmd.errors.redis_error) and goes on: one refused command must never end a loop.
ERRORS = (redis.RedisError, OSError)


def client(cfg: Config, *, name: str, socket_timeout: float | None = 5.0) -> redis.Redis:
    kwargs = dict(
        host=cfg.redis_host,
        port=cfg.redis_port,
        db=cfg.redis_db,
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
    return redis.Redis(**kwargs)


def describe(cfg: Config) -> str:
    """Where we connect, for error lines (never the password)."""
    scheme = "rediss" if cfg.redis_tls else "redis"
    user = f"{cfg.redis_username}@" if cfg.redis_username else ""
    return f"{scheme}://{user}{cfg.redis_host}:{cfg.redis_port}/{cfg.redis_db}"


# Least privilege (README, "Redis ACL"): what the daemon's clients send, per input mode. Every
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


def acl_rule(input_mode: str, user: str = "nilmd") -> str:
    """The ACL SETUSER line for the daemon's user: only its keys and channels, only its commands."""
    commands = " ".join(f"+{c}" for c in ACL_COMMANDS[input_mode])
    return f"ACL SETUSER {user} on >PASSWORD resetkeys ~nilm:* resetchannels &nilm:* nocommands {commands}"
