"""The child roles of a daemon: one row each, and everything that lists processes reads this table.

The supervisor spawns, watches and stops one child per row (nilmd.daemon.supervisor), the control
block gives each a pid, heartbeat and state slot (nilmd.daemon.control), the status hash and
`/metrics` name each by its role, `nilmd status` lists them, and the test harness finds their
processes by it (nilmd.testing). So a new role is one row here, plus its own module.

The entry points are "module:function" names, not the functions: a child imports its module in
its own fresh interpreter (nilmd.daemon.spawn), so the supervisor never loads what a child needs
(torch, paho), and this table imports nothing.
"""

from __future__ import annotations

from typing import NamedTuple

SUPERVISOR = "supervisor"  # the process that runs the others: listed first, never spawned


class Role(NamedTuple):
    name: str  # its slots (<name>_pid, _heartbeat, _state), hash fields (pid_<name>, ...) and log name
    entry: str  # "module:function", called with (cfg, paths) in the child
    enabled_by: str | None = None  # optional: runs only when this setting is given; None: always
    stops_first: bool = False  # stopped before the others at a clean stop


ROLES = (
    Role("reader", "nilmd.daemon.reader:main"),
    # first: the reader's last snapshot then records every prediction that was published, so a
    # warm restart never makes one twice
    Role("inference", "nilmd.daemon.inference:main", stops_first=True),
    # Home Assistant (nilmd.daemon.mqtt says why a process of its own)
    Role("mqtt", "nilmd.daemon.mqtt:main", enabled_by="mqtt_url"),
)
NAMES = tuple(r.name for r in ROLES)
PROCESSES = (SUPERVISOR, *NAMES)  # every process a daemon may have, in the order they are listed


def serving(cfg) -> list[Role]:
    """The roles this configuration runs: every one that is not optional, and the optional ones asked for."""
    return [r for r in ROLES if r.enabled_by is None or getattr(cfg, r.enabled_by)]


def listed(fields: dict) -> list[str]:
    """The processes a status hash names (its pid_<role> fields), in the table's order."""
    return [p for p in PROCESSES if f"pid_{p}" in fields]
