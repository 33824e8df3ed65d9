"""The status hash (docs/CONTRACT.md §3.5): what the supervisor writes (`Writer`), and how `nilmd status` judges it.

A live daemon rewrites the hash every `status_interval_s`; a reader tells a dead daemon from a
live one by the age of `updated_at` (older than 3 intervals + 5 s: dead), and a clean stop
leaves `state=stopped`.

`run_length` below is always the ring's current unbroken run (RingBuffer.run_length), what the
hash calls `buffer_fill` (not `samples_filled`, the gap seconds the reader filled by holding a sample).
"""

from __future__ import annotations

import logging
import math
import os
import time

from nilmd import __version__, keys
from nilmd.appliances import APPLIANCES
from nilmd.config import SETTINGS, Config
from nilmd.daemon import fencing, health, roles
from nilmd.daemon.control import appliances
from nilmd.daemon.ingest import REJECT_REASONS, REPAIR_REASONS
from nilmd.daemon.sources import DISCONNECT_CAUSES
from nilmd.errors import redis_error

# `nilmd status` exit codes, the monitoring-plugin convention
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


def key(cfg: Config) -> str:
    return keys.status_key(cfg.building_id)


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb(pid: int) -> float:
    """A process's resident memory, from /proc (psutil would be 0.8 MB more in the supervisor)."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return round(int(f.read().split()[1]) * _PAGE / 2**20, 1)
    except (OSError, IndexError, ValueError):  # gone, or not ours to read
        return 0.0


def fields(cfg: Config, state: str, snap: dict, run_length: int, *, started: float, pids: dict, restarts: dict,
           problems=(), rss: dict | None = None) -> dict:
    """`rss`: MB by role, measured once for many buildings (else here)."""
    loaded = appliances(snap["models_mask"])
    missing = [a for a in APPLIANCES if a not in loaded]
    rejected = {f"rejected_{r}": int(snap[f"rejected_{r}"]) for r in REJECT_REASONS}
    rss = {role: rss[role] if rss else rss_mb(pid) for role, pid in pids.items()}
    return {
        "state": state,
        **_degraded(state, problems),
        "building_id": cfg.building_id,
        "buffer_fill": min(run_length, cfg.window_size),
        "window_size": cfg.window_size,
        "inference_interval": cfg.inference_interval,
        "samples_received": int(snap["samples_received"]),
        "samples_accepted": int(snap["samples_accepted"]),
        "samples_rejected": sum(rejected.values()),
        **rejected,
        **{f"repaired_{r}": int(snap[f"repaired_{r}"]) for r in REPAIR_REASONS},
        "samples_filled": int(snap["samples_filled"]),
        "gaps_broken": int(snap["gaps_broken"]),
        "last_sample_ts": snap["last_sample_ts"],
        "last_inference_ts": snap["last_inference_ts"],
        "last_inference_ms": snap["last_inference_ms"],
        "inferences": int(snap["inferences"]),  # published: a prediction Redis did not take is not counted
        "predicted_through_ts": snap["predicted_through_ts"],
        "predictions_pending": int(snap["predictions_pending"]),  # 1: one is held until Redis takes it
        "overruns": int(snap["overruns"]),
        "models_loaded": int(snap["models_loaded"]),
        "models_missing": ",".join(missing) if snap["models_loaded"] else "",  # nothing is missing before a load
        # nilmd.models.adapted: served by the building's adapted model; its adapted file refused (the shipped serves)
        "models_adapted": ",".join(appliances(snap["adapted_mask"])),
        "models_adapted_refused": ",".join(appliances(snap["adapted_refused_mask"])),
        "device": "cuda" if snap["device_cuda"] else "cpu",
        "backend": ("onnxruntime" if snap["backend_onnx"] else "torch") if snap["models_loaded"] else "",
        **_input_and_errors(cfg, snap),
        **{f"input_disconnects_{c}": int(snap[f"disconnects_{c}"]) for c in DISCONNECT_CAUSES},
        # pub/sub: the samples estimated lost in the cuts, from the gaps in the meter's timestamps across each
        "input_samples_lost": int(snap["samples_lost"]),
        # stream mode: the entry id of the newest sample in the ring (where a restart goes on from)
        "input_position": f"{int(snap['input_pos_ms'])}-{int(snap['input_pos_seq'])}" if snap["input_pos_ms"] else "",
        "clock_jumps": int(snap["clock_jumps"]),
        "restored_samples": int(snap["restored_samples"]),  # from the ring snapshot at start (warm restart)
        "snapshot_ts": snap["snapshot_ts"],
        "snapshot_failures": int(snap["snapshot_failures"]),
        **_processes(cfg, started, pids, restarts, rss),
    }


def _input_and_errors(cfg: Config, snap: dict) -> dict:
    """The input's and the Redis errors' fields, the same in a building's hash and in a list daemon's."""
    return {
        "input_mode": cfg.input_mode,
        "input_connected": int(snap["redis_connected"]),
        "input_errors": int(snap["redis_errors"]),
        # pub/sub: subscriptions cut (redis-py subscribes again by itself), all causes together
        "input_disconnects": sum(int(snap[f"disconnects_{c}"]) for c in DISCONNECT_CAUSES),
        # Redis commands refused or failed (OOM, NOPERM, unreachable, ...) of the other two processes
        "redis_errors_supervisor": int(snap["supervisor_redis_errors"]),
        "redis_errors_inference": int(snap["inference_redis_errors"]),
        "reload_failures": int(snap["reload_failed"]),
    }


def _degraded(state: str, problems) -> dict:
    """Why it is degraded: the sentence for people, the fixed codes for programs."""
    problems = problems if state == "degraded" else ()
    return {"degraded_reason": health.sentence(problems), "degraded_codes": health.codes(problems)}


def _processes(cfg: Config, started: float, pids: dict, restarts: dict, rss: dict) -> dict:
    """The processes' fields, the same in a building's hash and in a list daemon's."""
    return {
        **{f"pid_{role}": pid for role, pid in pids.items()},
        "restarts": sum(restarts.values()),
        **{f"restarts_{role}": n for role, n in restarts.items()},
        **{f"memory_{role}_mb": mb for role, mb in rss.items()},
        "memory_total_mb": round(sum(rss.values()), 1),
        "uptime_s": round(time.time() - started, 1),
        "version": __version__,
        "updated_at": round(time.time(), 3),
        "status_interval_s": cfg.status_interval,
        "host": os.uname().nodename,
    }


def daemon_fields(cfg: Config, state: str, line: str, states: list[str], snap: dict, *, started: float, pids: dict,
                  restarts: dict, rss: dict, problems=()) -> dict:
    """The list daemon's own hash (docs/CONTRACT.md §3.5.1): its processes, and its buildings counted."""
    return {
        "state": state,
        **_degraded(state, problems),
        "summary": line,
        "buildings": len(states),
        **{f"buildings_{s}": states.count(s) for s in ("running", "warming_up", "degraded", "starting")},
        "building_list": cfg.building_ids,
        "models_loaded": int(snap["models_loaded"]),
        **_input_and_errors(cfg, snap),
        **_processes(cfg, started, pids, restarts, rss),
    }


# The hash's fields that are words, whatever they look like (a building id may be "42"): those of
# the settings that are text, and the status's own.
TEXT_FIELDS = frozenset({s.name for s in SETTINGS if s.type in ("str", "choice", "path")} | {
    "state", "degraded_reason", "degraded_codes", "summary", "models_missing", "device", "backend", "host",
    "version", "input_position", "building_list", "instance", "shard"})


def typed(fields: dict) -> dict:
    """A hash read back (str -> str) with its numbers as numbers, for `nilmd status --json`."""
    out = {}
    for k, v in fields.items():
        if k not in TEXT_FIELDS:
            for kind in (int, float):
                try:
                    number = kind(v)
                except (TypeError, ValueError):
                    continue
                v = number if math.isfinite(number) else v  # JSON has no NaN
                break
        out[k] = v
    return out


def judge(fields: dict, now: float | None = None) -> tuple[int, str]:
    """(exit code, one-line verdict) for a status hash read back from Redis (str -> str)."""
    if not fields:
        return UNKNOWN, "no status: nilmd has never run against this Redis and building"
    now = time.time() if now is None else now
    state = fields.get("state", "?")
    try:
        age = now - float(fields.get("updated_at", 0))
        interval = float(fields.get("status_interval_s", 2))
    except ValueError:
        return UNKNOWN, "status hash is unreadable"
    if state == "stopped":
        return CRITICAL, f"stopped ({age:.0f} s ago)"
    if age > 3 * interval + 5:
        return CRITICAL, f"dead: last update {age:.0f} s ago while {state}"
    if state == "running":
        return OK, "running"
    if state == "degraded" and fields.get("degraded_reason"):
        return WARNING, f"degraded: {fields['degraded_reason']}"
    return WARNING, state


def render(fields: dict, now: float | None = None) -> str:
    """Human-readable `nilmd status`."""
    code, verdict = judge(fields, now)
    if not fields:
        return verdict
    now = time.time() if now is None else now
    g = fields.get

    def each(field: str) -> str:
        """A field of every process the hash names: "supervisor 12, reader 13, inference 14"."""
        return ", ".join(f"{p} {g(field.format(p))}" for p in roles.listed(fields))

    def ago(ts):
        try:
            ts = float(ts)
        except (TypeError, ValueError):
            return "never"
        return "never" if ts <= 0 else f"{now - ts:.0f} s ago"

    lines = [
        f"nilmd {g('version', '?')} building {g('building_id', '?')} on {g('host', '?')}: {verdict}",
        f"  buffer       {g('buffer_fill')}/{g('window_size')} samples, input connected: {g('input_connected') == '1'}",
        f"  samples      {g('samples_received')} received, {g('samples_accepted')} accepted, "
        f"{g('samples_rejected')} rejected, {g('samples_filled')} filled; last {ago(g('last_sample_ts'))}",
        f"  inference    {g('inferences')} runs, last {ago(g('last_inference_ts'))} in {g('last_inference_ms')} ms "
        f"on {g('device')}" + (f" with {g('backend')}" if g("backend") else ""),
        f"  models       {g('models_loaded')}/{len(APPLIANCES)} loaded"
        + (f", missing: {g('models_missing')}" if g("models_missing") else ""),
        *_adapted_line(fields),
        f"  processes    {each('pid_{}')}; "
        f"{g('restarts')} restarts; up {g('uptime_s')} s",
        f"  memory       {g('memory_total_mb')} MB "
        f"({each('memory_{}_mb')})",
    ]
    rejected = [f"{k[9:]}={v}" for k, v in sorted(fields.items()) if k.startswith("rejected_") and v != "0"]
    if rejected:
        lines.append(f"  rejected     {', '.join(rejected)}")
    lines.append(f"  updated      {ago(g('updated_at'))}")
    return "\n".join(lines)


def _adapted_line(fields: dict) -> list[str]:
    adapted, refused = fields.get("models_adapted"), fields.get("models_adapted_refused")
    if not adapted and not refused:
        return []
    return [f"  adapted      {adapted.replace(',', ', ') if adapted else 'none'}"
            + (f"; refused (the shipped model serves; the log says why): {refused.replace(',', ', ')}"
               if refused else "")]


def render_list(daemons: dict[str, dict], buildings: dict[str, dict], now: float | None = None,
                holders: dict[str, str] | None = None) -> tuple[int, str]:
    """`nilmd status` for a list: (the worst verdict's exit code, a summary line per instance, its
    name first when there are several, and one line per building). `holders` (instances sharing
    the list by leases): building -> the instance that serves it ('' none), as a column."""
    now = time.time() if now is None else now
    code, lines = OK, []
    for name, daemon in daemons.items():
        c, verdict = judge(daemon, now)
        code = max(code, c)
        alive = c in (OK, WARNING) and daemon.get("summary")
        who = f"instance {name}: " if len(daemons) > 1 or holders is not None else ""
        lines.append(f"{who}nilmd {daemon.get('version', '?')} on {daemon.get('host', '?')}: "
                     f"{daemon['summary'] if alive else verdict}")
    served_by = f" {'instance':<16}" if holders is not None else ""
    lines.append(f"  {'building':<24}{served_by} {'verdict':<28} {'buffer':>11} {'received':>9} {'accepted':>9} "
                 f"{'rejected':>8} {'predictions':>11} {'adapted':>7}")
    for b, fields in buildings.items():
        c, v = judge(fields, now)
        if holders is not None and not holders.get(b):
            c, v = CRITICAL, f"not served (no lease); {v}"
        code = max(code, c)
        g = fields.get
        buffer = f"{g('buffer_fill', '-')}/{g('window_size', '-')}"
        who = f" {(holders.get(b) or '-')[:16]:<16}" if holders is not None else ""
        lines.append(f"  {b:<24}{who} {v[:28]:<28} {buffer:>11} {g('samples_received', '-'):>9} "
                     f"{g('samples_accepted', '-'):>9} {g('samples_rejected', '-'):>8} {g('inferences', '-'):>11} "
                     f"{_count(g('models_adapted')) + ('!' if g('models_adapted_refused') else ''):>7}")
    return code, "\n".join(lines)


def _count(names: str | None) -> str:
    """How many appliances a comma list names ("-": the field is absent, an older daemon's hash)."""
    return "-" if names is None else str(len(names.split(",")) if names else 0)


class Writer:
    """The supervisor's writes: every building's hash and a list daemon's own, in one round trip.
    With leases each building's write is fenced (a building whose lease is gone is another
    instance's to describe). A failure is one throttled line and counted in the daemon block."""

    def __init__(self, cfg: Config, client, errors, sharing, throttle, started: float):
        self.cfg, self.client, self.errors, self.sharing = cfg, client, errors, sharing
        self.throttle, self.started = throttle, started

    def write(self, roster, judge, procs: dict, buildings=None) -> None:
        """`procs`: pids, restarts and rss by role; `buildings`: some of the served (no daemon hash),
        else all of them (and with a list the daemon's own)."""
        if self.client is None:
            return
        daemon = buildings is None and roster.listed
        buildings = list(roster.served.values()) if buildings is None else buildings
        try:
            pipe = self.client.pipeline(transaction=False)
            for served in buildings:
                values = fields(served.cfg, served.state, roster.ctl.snapshot(served.ctl), served.ring.run_length(),
                                started=self.started, problems=served.problems, **procs)
                self.sharing.fence.hset(pipe, served.building, key(served.cfg), values)
            if daemon:
                pipe.hset(keys.daemon_status_key(self.sharing.name), mapping={**daemon_fields(
                    self.cfg, judge.state, judge.line, [b.state for b in roster.served.values()], roster.ctl.snapshot(),
                    started=self.started, problems=judge.problems, **procs), **self.sharing.fields()})
            replies = pipe.execute(raise_on_error=False)
            failed = next((r for r in replies if isinstance(r, Exception) and not fencing.is_fenced(r)), None)
        except self.errors as e:
            failed = e
        if failed is None:
            self.throttle.ok("status")  # a failure's suppressed repeats: said now as the past, not later
        else:
            roster.ctl.add("supervisor_redis_errors")
            kind, line = redis_error(failed)
            self.throttle.log(f"status {kind}", logging.WARNING, f"could not write the status hash: {line}")
