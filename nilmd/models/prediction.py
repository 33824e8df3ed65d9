"""The prediction (docs/CONTRACT.md §3.4) from the models' outputs: the same for every backend,
and torch-free, so a box that serves with ONNX Runtime builds it without torch."""

from __future__ import annotations

import numpy as np


def served_power(power: np.ndarray, prob: np.ndarray, threshold) -> np.ndarray:
    """The power the daemon reports: the model's estimate in the seconds it judges the appliance
    on (probability >= its threshold), 0 W in the others. An appliance reported off then draws
    nothing, and the power head's hedging where it is unsure (with the mean-squared loss it
    predicts p(on) x power, hundreds of W for an oven between element cycles) no longer leaks
    into the estimate: on the simulated test houses this lowered MAE for all 11 appliances, with
    full and power-only input (oven 36.8 -> 9.5 W). `threshold` broadcasts against `prob`."""
    return np.where(prob >= threshold, power, np.float32(0.0))


def make_prediction(appliances, power: np.ndarray, prob: np.ndarray, thresholds: np.ndarray,
                    aggregate: np.ndarray, *, timestamp: float, window_start: float, window_end: float,
                    inference_ms: float, adapted=(), always_on: float = 0.0) -> dict:
    """The prediction (docs/CONTRACT.md §3.4) for the newest samples.

    `power`, `prob` [A, n] and `aggregate` [n] cover the last inference interval (n samples).
    power_watts (of `served_power`) and probability are means over the interval, so power_watts
    is at most total_power (each sample's estimate is at most that sample's aggregate).
    `adapted`: the appliances served by the building's adapted model (nilmd.models.adapted).
    `always_on`: the house's always-on load (nilmd.daemon.alwayson), passed through; `other_watts`
    is what the meter saw that no appliance accounts for, never negative.
    """
    power = served_power(power, prob, np.asarray(thresholds, np.float32)[:, None])
    total = float(np.mean(aggregate)) if len(aggregate) else 0.0
    entries = []
    for k, name in enumerate(appliances):
        p = float(np.mean(prob[k])) if prob.shape[1] else 0.0
        watts = float(np.mean(power[k])) if power.shape[1] else 0.0
        watts = min(max(watts, 0.0), max(total, 0.0))
        entries.append({
            "appliance": name,
            "power_watts": round(watts, 2),
            "probability": round(p, 4),
            "is_on": bool(p >= thresholds[k]),
            "confidence": round(abs(2.0 * p - 1.0), 4),
            "adapted": name in adapted,
        })
    return {
        "timestamp": float(timestamp),
        "window_start": float(window_start),
        "window_end": float(window_end),
        "total_power": round(total, 2),
        "always_on_watts": round(float(always_on), 2),
        "other_watts": other_watts(total, entries),
        "inference_time_ms": round(float(inference_ms), 3),
        "predictions": entries,
    }


def other_watts(total: float, entries) -> float:
    """The meter's power that the appliances' estimates leave over, never below 0."""
    return round(max(total - sum(e["power_watts"] for e in entries), 0.0), 2)
