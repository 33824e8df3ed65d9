"""Meter fields -> model features. The reader, training and evaluation all call `derive`, so the
models see exactly what they were trained on.

Features, per sample, in this order (the ring buffer's columns and the models' input channels):
  P  active power (W)            = power_total
  Q  reactive power (var)        from the power factor, or from V·I and P
  I  current (A)                 measured, or S / V (nominal 230 V when V is missing)
  S  apparent power (VA)         P / PF, or V·I, or P when nothing says otherwise
  M  1 when the meter told us about reactive power (PF or current), else 0
A power-only meter gives Q = 0, S = P, I = P / V, M = 0: the models are trained on both kinds
(`M` tells them which), so they work with power alone and do better with the rest.

Each is divided by a fixed power of two (WaveNILM's scaling, no mean/std) inside the model; the
scales travel in every checkpoint.
"""

from __future__ import annotations

import numpy as np

FEATURES = ("P", "Q", "I", "S", "M")
N_FEATURES = len(FEATURES)
SCALES = (2.0**14, 2.0**12, 2.0**7, 2.0**14, 1.0)
NOMINAL_VOLTAGE = 230.0


def derive(power, voltage=None, current=None, power_factor=None) -> np.ndarray:
    """Arrays of meter fields (NaN = not sent) -> float32 array [n, 5] of FEATURES.

    `power` must already be validated (finite, not negative). Optional fields that are out of
    their physical range are treated as not sent.
    """
    p = np.asarray(power, dtype=np.float64).reshape(-1)
    n = p.shape[0]

    def optional(a, lo, hi):
        if a is None:
            return np.full(n, np.nan)
        a = np.asarray(a, dtype=np.float64).reshape(-1)
        return np.where((a > lo) & (a <= hi), a, np.nan)

    v = optional(voltage, 50.0, 500.0)
    i = optional(current, 0.0, 1000.0)
    pf = optional(power_factor, 0.05, 1.0)
    # A current of exactly 0 with power flowing is a dead CT, not information; but 0 A at 0 W is.
    v_eff = np.where(np.isnan(v), NOMINAL_VOLTAGE, v)

    has_pf = ~np.isnan(pf)
    has_i = ~np.isnan(i)
    s = np.where(has_pf, p / np.where(has_pf, pf, 1.0), np.where(has_i, v_eff * np.nan_to_num(i), p))
    s = np.maximum(s, p)  # apparent power is never below active power; repair meter rounding
    q = np.sqrt(np.maximum(s * s - p * p, 0.0))
    cur = np.where(has_i, np.nan_to_num(i), s / v_eff)
    m = (has_pf | has_i).astype(np.float64)

    out = np.empty((n, N_FEATURES), dtype=np.float32)
    out[:, 0] = p
    out[:, 1] = q
    out[:, 2] = cur
    out[:, 3] = s
    out[:, 4] = m
    return out


def power_only(features: np.ndarray) -> np.ndarray:
    """What a power-only meter would have given for the same samples (evaluation, training)."""
    p = features[:, 0].astype(np.float64)
    return derive(p)
