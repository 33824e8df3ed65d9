"""Health: why a daemon whose processes are all alive is still not doing its job.

The supervisor asks every tick; each reason makes the state `degraded` (docs/CONTRACT.md
§3.5), is written to the status hash as `degraded_reason` (its sentence) and
`degraded_codes`, to systemd's STATUS= and to the journal, is exported as
`nilmd_degraded_reason{reason=<code>}`, and goes away by itself when its cause does. A reason is
a short fixed code (a Prometheus label value: changing a timeout must not make new series) and
a sentence for people, which may name the limits:

- a child is down, the input is not connected, a model is missing (what `degraded` always meant);
- no sample accepted for `input_timeout` seconds (the meter went silent, or everything it sends
  is rejected): measured by the box's clock from when the reader last accepted one, or from when
  the daemon became ready if it never has;
- most samples received in the last REJECT_WINDOW_S seconds rejected (at least MIN_SAMPLES of them);
- the window is full but no prediction for `input_timeout` seconds (an inference that stopped
  predicting without dying, or a window that never fills up again).

From the reasons, the states (starting, warming_up, running, degraded, reloading; a list
daemon's own from its buildings'), the one-line STATUS= and the journal's line for each change:
`Judge` does it each tick of the supervisor, for every building it serves and the daemon.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np

from nilmd.appliances import APPLIANCES
from nilmd.config import Config
from nilmd.daemon import control as ctlmod
from nilmd.daemon.ingest import REJECT_REASONS

REJECT_WINDOW_S = 300.0  # "the last minutes" of the rejection rule
MIN_SAMPLES = 10  # fewer received than this in the window: too few to call "most"
POINT_S = 10.0  # how far apart the points of that window are


class Problem(NamedTuple):
    code: str  # fixed, short: reader_down, inference_down, mqtt_down, mqtt_unusable, input_disconnected,
    # models_missing, no_samples, samples_rejected, no_predictions (docs/CONTRACT.md §3.5)
    text: str  # the sentence


INPUT_DOWN = Problem("input_disconnected", "input not connected")


def process_down(role: str) -> Problem:
    return Problem(f"{role}_down", f"the {role} process is down")


def sentence(problems) -> str:
    """The reasons as the status hash's `degraded_reason` and STATUS= say them."""
    return "; ".join(p.text for p in problems)


def codes(problems) -> str:
    return ",".join(p.code for p in problems)


def input_timeout(cfg: Config) -> float:
    """The silence allowed before `degraded`: the setting, or twice the inference interval."""
    return cfg.input_timeout or 2.0 * cfg.inference_interval


class Health:
    def __init__(self, cfg: Config, clock=time.time, monotonic=time.monotonic):
        self.timeout = input_timeout(cfg)
        self.window = cfg.window_size
        self.clock, self.monotonic = clock, monotonic
        self._since = None  # when the first check ran (the daemon was ready): silence counts from there
        self._full_since = None  # when the window became full, in this unbroken run
        # (monotonic, received, rejected per reason) every POINT_S, a small ring: a daemon of many
        # buildings keeps one Health per building, so this is most of a building's few kB
        self._points = np.zeros((int(REJECT_WINDOW_S // POINT_S) + 2, 2 + len(REJECT_REASONS)))
        self._written = 0

    def reasons(self, snap: dict, run_length: int, *, down: list[str], input_ok: bool) -> list[Problem]:
        """Every reason to be degraded now; empty when healthy. `down`: roles of dead children."""
        now = self.clock()
        if self._since is None:
            self._since = now
        out = [process_down(role) for role in down]
        if not input_ok:
            out.append(INPUT_DOWN)
        loaded = int(snap["models_loaded"])
        if loaded and loaded < len(APPLIANCES):
            out.append(Problem("models_missing", f"{len(APPLIANCES) - loaded} models missing"))
        # The texts name the limits, not the seconds elapsed: STATUS= changes only when health does.
        if now - max(snap["last_arrival"], self._since) > self.timeout:
            out.append(Problem("no_samples", f"no sample accepted for over {self.timeout:.0f} s"))
        rejected = self._rejected(snap)
        if rejected:
            out.append(rejected)
        if run_length >= self.window:
            self._full_since = now if self._full_since is None else self._full_since
            if now - max(snap["last_inference_ts"], self._full_since) > self.timeout:
                out.append(Problem("no_predictions", f"no prediction for over {self.timeout:.0f} s"))
        else:
            self._full_since = None
        return out

    def _rejected(self, snap: dict) -> Problem | None:
        now = self.monotonic()
        points, n = self._points, len(self._points)
        current = np.array([now, snap["samples_received"], *(snap[f"rejected_{r}"] for r in REJECT_REASONS)])
        if not self._written or now - points[(self._written - 1) % n, 0] >= POINT_S:
            points[self._written % n] = current
            self._written += 1
        oldest = next(points[k % n] for k in range(max(0, self._written - n), self._written)
                      if now - points[k % n, 0] <= REJECT_WINDOW_S or k == self._written - 1)
        received = current[1] - oldest[1]
        delta = current[2:] - oldest[2:]
        total = delta.sum()
        if received < MIN_SAMPLES or 2 * total <= received:
            return None
        worst = REJECT_REASONS[int(np.argmax(delta))]
        return Problem("samples_rejected",
                       f"most samples of the last {REJECT_WINDOW_S:.0f} s rejected (mostly {worst})")


def judge_state(*, ready: bool, reloading: bool, children_ok: bool, input_ok: bool, models_loaded: int,
                run_length: int, window: int, problems=()) -> str:
    """`problems`: nilmd.daemon.health's Problems; any of them makes a ready daemon degraded."""
    if not ready:
        return "starting"
    if reloading:
        return "reloading"
    if not children_ok or not input_ok or models_loaded < len(APPLIANCES) or problems:
        return "degraded"
    return "warming_up" if run_length < window else "running"


def summary_line(state: str, run_length: int, window: int, snap: dict, problems=()) -> str:
    """The one-line STATUS= for systemd."""
    parts = [f"{state} ({sentence(problems)})" if state == "degraded" and problems else state, f"buffer {min(run_length, window)}/{window}", f"{int(snap['models_loaded'])}/{len(APPLIANCES)} models"]
    if snap["inferences"]:
        parts.append(f"last inference {snap['last_inference_ms']:.1f} ms")
    if not snap["redis_connected"]:
        parts.append("input not connected")
    return ", ".join(parts)


def judge_daemon(*, ready: bool, reloading: bool, problems, states: list[str]) -> str:
    """A list daemon's own state: its processes and input (`problems`), then its buildings'."""
    if not ready:
        return "starting"
    if reloading:
        return "reloading"
    if problems or "degraded" in states:
        return "degraded"
    return "running" if states and all(s == "running" for s in states) else "warming_up"


def fleet_line(state: str, states: list[str], snap: dict, problems=()) -> str:
    """A list daemon's STATUS=: how many buildings run, warm up, are degraded."""
    counts = {s: states.count(s) for s in ("running", "warming_up", "degraded")}
    parts = [f"{state} ({sentence(problems)})" if problems else state,
             f"{len(states)} buildings: {counts['running']} running, {counts['warming_up']} warming up, "
             f"{counts['degraded']} degraded", f"{int(snap['models_loaded'])}/{len(APPLIANCES)} models"]
    if not snap["redis_connected"]:
        parts.append("input not connected")
    return ", ".join(parts)


def change_line(old: tuple[str, tuple], new: tuple[str, tuple]) -> str | None:
    """The journal's line for a change of (state, problems), or None when nothing changed:
    "state running -> degraded: no sample accepted for over 120 s", and its recovery
    "state degraded -> running (was: no sample accepted for over 120 s)"."""
    (was, old_problems), (state, problems) = old, new
    if (was, [p.code for p in old_problems]) == (state, [p.code for p in problems]):
        return None
    line = f"state {was} -> {state}" if was != state else f"state {state}, its reasons changed"
    if state == "degraded" and problems:
        line += f": {sentence(problems)}"
    gone = [p for p in old_problems if p.code not in {q.code for q in problems}] if was == "degraded" else []
    if gone:
        line += f" (no longer: {sentence(gone)})"
    return line


class Judge:
    """The supervisor's verdict each tick: every building's state and reasons (on `Served`), the
    daemon's (`state`, `problems`), the STATUS= `line`, and whether it has been `ready` once."""

    def __init__(self, cfg: Config, roster, log: logging.Logger):
        self.cfg, self.roster, self.log = cfg, roster, log
        self.ready = False  # READY=1 was said: from then on reasons count, and changes are logged
        self.state = "starting"
        self.problems: list[Problem] = []  # why the state is degraded
        self.line = ""
        self._logged: tuple[str, tuple] = ("starting", ())  # the state and reasons the journal last said
        self._last_judged = 0.0
        self._judged = False  # the buildings were judged this tick

    def tick(self, snap: dict, roles: list[str], down: list[str], *, reloading: bool) -> bool:
        """Judge now (`snap`: the daemon block; `roles`: the children that run, `down`: those dead).
        True on the tick the daemon first becomes ready."""
        roster, cfg = self.roster, self.cfg
        reader_up = "reader" not in down and snap["reader_state"] == ctlmod.READER_SUBSCRIBED
        models_up = "inference" not in down and snap["inference_state"] != ctlmod.INFER_LOADING
        ready = self.ready or (reader_up and models_up)
        # an optional exporter that cannot start: degraded with its reason, the predictions go on
        exporters = [Problem("mqtt_unusable", "the MQTT exporter cannot start: its TLS files are not usable "
                             "(its error is in the log)")] \
            if "mqtt" in roles and snap["mqtt_state"] == ctlmod.MQTT_UNUSABLE else []
        # Each building judged on its own data: every tick for one, with the status hashes for a
        # list (30 ms a round for 1000 buildings: every tick would be 6 % of a core)
        now = time.monotonic()
        self._judged = not roster.listed or now - self._last_judged >= cfg.status_interval
        if self._judged:
            self._last_judged = now
        for served in roster.served.values() if self._judged else ():
            bsnap = roster.ctl.snapshot(served.ctl)
            served.run_length = served.ring.run_length()
            served.problems = served.health.reasons(bsnap, served.run_length, down=down, input_ok=reader_up) \
                + ([] if roster.listed else exporters) if self.ready else []
            served.state = judge_state(
                ready=ready, reloading=reloading, children_ok=not down, input_ok=reader_up,
                models_loaded=int(snap["models_loaded"]), run_length=served.run_length, window=cfg.window_size,
                problems=served.problems)
        if roster.listed:
            self.problems = [process_down(role) for role in down] + ([] if reader_up else [INPUT_DOWN]) + exporters
            states = [b.state for b in roster.served.values()]
            self.state = judge_daemon(ready=ready, reloading=reloading, problems=self.problems, states=states)
            self.line = fleet_line(self.state, states, snap, self.problems)
        else:
            only = roster.served[cfg.building_id]
            self.state, self.problems = only.state, only.problems
            self.line = summary_line(self.state, only.run_length, cfg.window_size, snap, self.problems)
        if self.ready or not (reader_up and models_up):
            return False
        self.ready = True
        self._logged = (self.state, tuple(self.problems))
        return True

    def log_changes(self) -> None:
        """One journal line for each change of state or of its reasons (STATUS= and the hash only
        hold the latest): the daemon's, and with a list each building's into and out of degraded."""
        now = (self.state, tuple(self.problems))
        self._say("", self._logged, now)
        self._logged = now
        for served in self.roster.served.values() if self.roster.listed and self._judged else ():
            now = (served.state, tuple(served.problems))
            was = served.logged
            served.logged = now
            if "degraded" in (was[0], now[0]):
                self._say(f"building {served.building}: ", was, now)

    def _say(self, prefix: str, was: tuple, now: tuple) -> None:
        line = change_line(was, now)
        if line:
            self.log.log(logging.WARNING if now[0] == "degraded" else logging.INFO, "%s%s", prefix, line)

    def stop(self, state: str) -> None:
        """"stopping", then "stopped": the daemon's state and every building's."""
        self.state = state
        for served in self.roster.served.values():
            served.state = state
