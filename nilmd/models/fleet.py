"""STAND-IN (branch multi-building) for the lead's batched FleetPredictor: same interface, one
nilmd.models.predictor.Predictor per building sharing the fused networks (correct, not batched).
The lead's nilmd/models/fleet.py replaces this file."""

from __future__ import annotations

import copy

import numpy as np

from nilmd.models.checkpoints import Checkpoint
from nilmd.models.predictor import Predictor


class FleetPredictor:
    backend = "torch"

    def __init__(self, checkpoints: dict[str, Checkpoint], device: str = "cpu"):
        self._template = Predictor(checkpoints, device)
        self.appliances = self._template.appliances
        self.probability_thresholds = self._template.probability_thresholds
        self.device = self._template.device
        self._by_building: dict[str, Predictor] = {}

    @property
    def full_recomputes(self) -> int:
        return sum(p.full_recomputes for p in self._by_building.values())

    def _of(self, building: str) -> Predictor:
        p = self._by_building.get(building)
        if p is None:
            p = copy.copy(self._template)  # the networks are shared; the states are its own
            p._states, p._graphs, p._inputs = {}, {}, {}
            p.full_recomputes = 0
            p.reset()
            self._by_building[building] = p
        return p

    def step(self, items) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self._of(b).step(window, new) for b, window, new in items]

    def reset(self, building: str) -> None:
        if building in self._by_building:
            self._by_building[building].reset()

    def forget(self, building: str) -> None:
        self._by_building.pop(building, None)
