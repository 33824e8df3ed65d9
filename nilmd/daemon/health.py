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
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from nilmd.appliances import APPLIANCES
from nilmd.config import Config
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
