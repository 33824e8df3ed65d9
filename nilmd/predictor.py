"""The one model call: a window of features -> every loaded appliance's power and on-probability,
and the SPEC §2 prediction built from it. The inference process and scripts/evaluate.py both go
through here, so what is evaluated is what is served.
"""

from __future__ import annotations

import numpy as np
import torch

from nilmd.appliances import APPLIANCES
from nilmd.checkpoints import Checkpoint


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    return device


class Predictor:
    """All loaded appliance models, in the fixed appliance order."""

    def __init__(self, checkpoints: dict[str, Checkpoint], device: str = "cpu"):
        self.appliances = [a for a in APPLIANCES if a in checkpoints]
        self.checkpoints = [checkpoints[a] for a in self.appliances]
        self.device = torch.device(resolve_device(device))
        self.models = [c.model().to(self.device) for c in self.checkpoints]
        self.receptive_field = max((c.config.receptive_field for c in self.checkpoints), default=1)
        self.probability_thresholds = np.array([c.probability_threshold for c in self.checkpoints], dtype=np.float32)

    @torch.inference_mode()
    def run(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """features float32 [T, F] (a ring window view is fine: no copy is made on the CPU)
        -> (power W [A, T], probability [A, T]) as float32 numpy arrays."""
        x = torch.from_numpy(features).to(self.device).T.unsqueeze(0)  # [1, F, T], a strided view
        powers, probs = [], []
        for model in self.models:
            power, logit = model(x)
            powers.append(power[0])
            probs.append(torch.sigmoid(logit[0]))
        if not powers:
            t = features.shape[0]
            return np.zeros((0, t), np.float32), np.zeros((0, t), np.float32)
        return torch.stack(powers).cpu().numpy(), torch.stack(probs).cpu().numpy()


def make_prediction(appliances, power: np.ndarray, prob: np.ndarray, thresholds: np.ndarray,
                    aggregate: np.ndarray, *, timestamp: float, window_start: float, window_end: float,
                    inference_ms: float) -> dict:
    """The SPEC §2 prediction for the newest samples.

    `power`, `prob` [A, n] and `aggregate` [n] cover the last inference interval (n samples).
    power_watts and probability are means over the interval, so power_watts is at most
    total_power (each sample's estimate is at most that sample's aggregate).
    """
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
        })
    return {
        "timestamp": float(timestamp),
        "window_start": float(window_start),
        "window_end": float(window_end),
        "total_power": round(total, 2),
        "inference_time_ms": round(float(inference_ms), 3),
        "predictions": entries,
    }
