"""Which buildings an instance serves: the building list (--building-ids) and its shards (--shard).

A low module (it needs only nilmd.errors) that both nilmd.config, which checks the settings at
start, and the daemon (nilmd.daemon.sharing, nilmd.daemon.roster through it), which reads the
list again on SIGHUP, import. `cfg` is anything with `building_id` and `building_ids`
(a nilmd.config.Config): this module never imports the settings.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from nilmd.errors import ConfigError

_BUILDING_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ID_RULE = "1-64 letters, digits, '_', '-' or '.'"


def is_building_id(text: str) -> bool:
    """A building id nilmd accepts: 1-64 letters, digits, '_', '-' or '.'."""
    return bool(_BUILDING_RE.match(text))


def listed(cfg) -> list[str]:
    """The buildings this daemon serves: --building-ids (inline, or @FILE read now), else the one
    --building-id. ConfigError names a bad id, a repeated one, or a file that cannot be read."""
    text, where = cfg.building_ids, "--building-ids"
    if not text:
        return [cfg.building_id]
    if text.startswith("@"):
        where = text[1:]
        try:
            text = Path(where).read_text()
        except OSError as e:
            raise ConfigError(f"--building-ids: cannot read {where}: {e.strerror or e}") from None
        items = [(f"{where}:{n}", line.split("#", 1)[0].strip()) for n, line in enumerate(text.splitlines(), 1)]
    else:
        items = [(f"{where} item {n}", part.strip()) for n, part in enumerate(text.split(","), 1)]
    ids, seen = [], {}
    for at, b in items:
        if not b:
            continue
        if not is_building_id(b):
            raise ConfigError(f"{at}: building id {b!r} must be {ID_RULE}")
        if b in seen:
            raise ConfigError(f"{at}: building {b} is listed twice (first at {seen[b]})")
        if b == "daemon":  # a list daemon's own files are nilmd-daemon.ctl/.lock (nilmd.daemon.roster)
            raise ConfigError(f"{at}: 'daemon' names the list daemon's own files: call the building otherwise")
        seen[b] = at
        ids.append(b)
    if not ids:
        raise ConfigError(f"--building-ids: {where} names no building")
    return ids


def stable_hash(text: str) -> int:
    """The same on every box and run (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' (1 <= K <= N) -> (K, N); ValueError with the rule otherwise."""
    k, sep, n = text.partition("/")
    try:
        k, n = int(k), int(n)
    except ValueError:
        k = n = 0
    if not sep or not 1 <= k <= n:
        raise ValueError(f"{text!r} is not K/N with 1 <= K <= N (e.g. 2/3: the second of three instances)")
    return k, n


def in_shard(buildings: list[str], k: int, n: int) -> list[str]:
    """The buildings of shard K of N, by a stable hash of the id (the same on every box and run)."""
    return [b for b in buildings if stable_hash(b) % n == k - 1]
