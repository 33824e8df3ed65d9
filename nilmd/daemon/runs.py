"""Appliance runs from the stream of predictions: one run, one pair of events (docs/CONTRACT.md §3.7).

A prediction says, per interval, whether an appliance is on. Taken literally, an oven whose
element cycles or a washing machine between wash and spin would start and end many times, and
a single unsure interval would be a run of its own. So a run is confirmed only after `on_n`
consecutive on intervals (or at once on a sure one, probability >= `on_probability`), and it
ends only after `off_n` consecutive off intervals; the off intervals inside a run belong to it
(they are kept aside as its `tail` until the run either goes on or ends). Predictions that are
missing (a gap in the data, a stopped daemon) count as off intervals without energy, so a run
cannot stay open across a long outage.

The state is plain data (one `Run` per appliance) and `step` is a pure function of it and one
prediction, so the ledger can keep the state in Redis beside the energy it belongs to, and a
restarted inference process goes on with an open run where its predecessor left it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace

OFF, PENDING, ON = "off", "pending", "on"


@dataclass(frozen=True)
class Run:
    phase: str = OFF
    start: float = 0.0  # epoch s: first second of the run's first on interval
    end: float = 0.0  # window_end of its last on interval
    last: float = 0.0  # window_end of the last prediction seen (0: none)
    on: int = 0  # consecutive on intervals while pending
    off: int = 0  # consecutive off intervals since `end`
    n: int = 0  # intervals up to `end`
    wh: float = 0.0
    peak: float = 0.0
    prob: float = 0.0  # sum of the intervals' probabilities
    tail_n: int = 0  # the off intervals since `end`: part of the run if it goes on
    tail_wh: float = 0.0
    tail_peak: float = 0.0
    tail_prob: float = 0.0

    def to_json(self) -> str:
        # vars(), not asdict(): the same fields in the same order (all plain numbers and a string),
        # without asdict's deep copy, which was half of a 1000-building batch's publishing time
        return json.dumps(vars(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text) -> "Run":
        """A stored state; anything unreadable is a fresh one (the ledger must never stop on it)."""
        try:
            data = json.loads(text)
            known = {f.name: f.type for f in fields(cls)}
            run = cls(**{k: v for k, v in data.items() if k in known})
            if run.phase not in (OFF, PENDING, ON):
                raise ValueError(run.phase)
            return run
        except (ValueError, TypeError, AttributeError):
            return cls()


@dataclass(frozen=True)
class Hysteresis:
    interval: float  # seconds per prediction (INFERENCE_INTERVAL)
    on_n: int = 2
    on_probability: float = 0.9
    off_n: int = 3

    @classmethod
    def from_config(cls, cfg) -> "Hysteresis":
        return cls(float(cfg.inference_interval), cfg.event_on_intervals, cfg.event_on_probability,
                   cfg.event_off_intervals)


def event(kind: str, appliance: str, run: Run) -> dict:
    return {"event": kind, "appliance": appliance, "start": run.start, "end": run.end if kind == "end" else None,
            "duration_s": round(run.end - run.start, 3), "energy_wh": round(run.wh, 3),
            "peak_w": round(run.peak, 2), "mean_probability": round(run.prob / max(run.n, 1), 4)}


def advance(run: Run, appliance: str, window_end: float, is_on: bool, probability: float, wh: float,
            power: float, h: Hysteresis) -> tuple[Run, list[dict]]:
    """One appliance's run after one more interval, and the events it gives (0, 1 or 2)."""
    events = []
    if run.last and window_end > run.last:
        missed = int(round((window_end - run.last) / h.interval)) - 1
        if missed > 0:  # predictions that never came: off intervals with no energy
            if run.phase == PENDING:
                run = Run(last=run.last)
            elif run.phase == ON:
                run = replace(run, off=run.off + missed, tail_n=run.tail_n + missed)
                if run.off >= h.off_n:
                    events.append(event("end", appliance, run))
                    run = Run(last=run.last)
    if is_on:
        if run.phase == OFF:
            run = Run(phase=PENDING, start=window_end - h.interval, on=0)
        elif run.phase == ON and run.tail_n:  # the off intervals were a pause inside the run
            run = replace(run, n=run.n + run.tail_n, wh=run.wh + run.tail_wh, peak=max(run.peak, run.tail_peak),
                          prob=run.prob + run.tail_prob)
        run = replace(run, end=window_end, on=run.on + 1, off=0, n=run.n + 1, wh=run.wh + wh,
                      peak=max(run.peak, power), prob=run.prob + probability,
                      tail_n=0, tail_wh=0.0, tail_peak=0.0, tail_prob=0.0)
        if run.phase == PENDING and (run.on >= h.on_n or probability >= h.on_probability):
            run = replace(run, phase=ON)
            events.append(event("start", appliance, run))
    elif run.phase == PENDING:
        run = Run()
    elif run.phase == ON:
        run = replace(run, off=run.off + 1, tail_n=run.tail_n + 1, tail_wh=run.tail_wh + wh,
                      tail_peak=max(run.tail_peak, power), tail_prob=run.tail_prob + probability)
        if run.off >= h.off_n:
            events.append(event("end", appliance, run))
            run = Run()
    return replace(run, last=window_end), events


def step(state: dict[str, Run], prediction: dict, wh: dict[str, float],
         h: Hysteresis) -> tuple[dict[str, Run], list[dict]]:
    """Every appliance of `prediction` one interval on: (the new state, the events, in order)."""
    new, events = dict(state), []
    end = float(prediction["window_end"])
    for p in prediction["predictions"]:
        name = p["appliance"]
        new[name], more = advance(state.get(name, Run()), name, end, bool(p["is_on"]), float(p["probability"]),
                                  wh[name], float(p["power_watts"]), h)
        events += more
    return new, events
