"""NILM scores, as pure numpy functions (no torch: the daemon's supervisor may import this).

All take per-sample arrays of one appliance and an optional boolean `mask` of the samples that
count (gaps in the aggregate are left out). Sums, not means of per-house scores, so a house with
more samples weighs more, as in the NILM literature.

  MAE   mean |ŷ - y| in W
  SAE   |Σŷ - Σy| / Σy                      (signal aggregate error, energy over the period)
  F1    of on/off: true on = y >= the appliance's on-power threshold
  EA    1 - Σ|ŷ - y| / (2 Σy)               (Kolter & Johnson 2011, estimation accuracy)
"""

from __future__ import annotations

import numpy as np


def _masked(mask, *arrays):
    if mask is None:
        return [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
    m = np.asarray(mask, dtype=bool).reshape(-1)
    return [np.asarray(a, dtype=np.float64).reshape(-1)[m] for a in arrays]


def mae(pred, true, mask=None) -> float:
    p, t = _masked(mask, pred, true)
    return float(np.mean(np.abs(p - t))) if len(p) else float("nan")


def sae(pred, true, mask=None) -> float:
    p, t = _masked(mask, pred, true)
    total = t.sum()
    return float(abs(p.sum() - total) / total) if total > 0 else float("nan")


def estimation_accuracy(pred, true, mask=None) -> float:
    p, t = _masked(mask, pred, true)
    total = t.sum()
    return float(1.0 - np.abs(p - t).sum() / (2.0 * total)) if total > 0 else float("nan")


def confusion(pred_on, true_on, mask=None) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) of boolean arrays."""
    p, t = (a.astype(bool) for a in _masked(mask, pred_on, true_on))
    tp = int(np.sum(p & t))
    fp = int(np.sum(p & ~t))
    fn = int(np.sum(~p & t))
    return tp, fp, fn, len(p) - tp - fp - fn


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """F1 = 2tp / (2tp + fp + fn). Nothing on and nothing predicted: undefined (nan), not 1 or 0."""
    denom = 2 * tp + fp + fn
    return 2.0 * tp / denom if denom else float("nan")


def f1(pred_on, true_on, mask=None) -> float:
    tp, fp, fn, _ = confusion(pred_on, true_on, mask)
    return f1_from_counts(tp, fp, fn)


def best_threshold(prob, true_on, mask=None, grid=None) -> tuple[float, float]:
    """The probability threshold with the highest F1 (ties: the one nearest 0.5) -> (threshold, F1).

    Used on validation data only; the threshold then travels in the checkpoint.
    """
    p, t = _masked(mask, prob, true_on)
    t = t.astype(bool)
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2) if grid is None else np.asarray(grid)
    best = (0.5, f1(p >= 0.5, t))
    for th in grid:
        score = f1(p >= th, t)
        if np.isnan(score):
            continue
        if np.isnan(best[1]) or score > best[1] + 1e-9 or (abs(score - best[1]) <= 1e-9 and abs(th - 0.5) < abs(best[0] - 0.5)):
            best = (float(th), score)
    return best


def score(pred_power, prob, true_power, *, on_threshold_w: float, probability_threshold: float,
          mask=None) -> dict:
    """Every score of one appliance. `f1` is the on/off head at the checkpoint's probability
    threshold (what the daemon publishes as is_on); `f1_power` thresholds the estimated power at
    the on-power threshold instead (the NILM-literature way), for comparison."""
    true_on = np.asarray(true_power) >= on_threshold_w
    tp, fp, fn, tn = confusion(np.asarray(prob) >= probability_threshold, true_on, mask)
    p, t = _masked(mask, pred_power, true_power)
    return {
        "mae_w": mae(p, t),
        "sae": sae(p, t),
        "f1": f1_from_counts(tp, fp, fn),
        "f1_power": f1(p >= on_threshold_w, t >= on_threshold_w),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "estimation_accuracy": estimation_accuracy(p, t),
        "on_fraction": float(np.mean(t >= on_threshold_w)) if len(t) else float("nan"),
        "energy_kwh_true": float(t.sum() / 3.6e6),
        "energy_kwh_pred": float(p.sum() / 3.6e6),
        "kwh_per_day_true": float(t.sum() / 3.6e6 / (len(t) / 86400)) if len(t) else float("nan"),
        "kwh_per_day_pred": float(p.sum() / 3.6e6 / (len(t) / 86400)) if len(t) else float("nan"),
        "samples": int(len(t)),
    }
