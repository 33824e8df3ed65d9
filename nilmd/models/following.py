"""Following the ring buffer: which samples are new since the last call, and whether the state
of that call can be continued. Both backends (nilmd.models.predictor on torch,
nilmd.models.onnx_backend on ONNX Runtime) and the many-building predictor (nilmd.models.fleet,
one Position per building) share it; it needs neither torch nor onnxruntime."""

from __future__ import annotations

import numpy as np


class Position:
    """Where a model state stands in one ring: one past the last sample it has seen, that
    sample's grid second (tells a ring that restarted from 0) and the window size it saw."""

    def __init__(self):
        self.end = None
        self.last_ts = None
        self.size = None

    def new_since(self, window, receptive_field: int) -> int | None:
        """How many of `window`'s samples are new to the state (0: none yet), or None when the
        state cannot be continued with this window (first call, a gap, a ring reset, a schedule
        that skipped ahead past the window, another window size)."""
        end = self.end
        if (end is not None and window.size == self.size and window.size >= receptive_field
                and window.start < end <= window.end and float(window.ts[end - 1 - window.start]) == self.last_ts):
            return window.end - end
        return None

    def moved_to(self, window) -> None:
        self.end, self.last_ts, self.size = window.end, float(window.ts[-1]), window.size


class RingFollower:
    """A subclass computes `_full(features, new)` (a whole window from the zero state, keeping the
    state at its end) and `_incremental(features, new)` (continuing the state; None: it cannot)."""

    full_recomputes = 0  # how often step() could not continue from its state
    receptive_field = 1

    def reset(self) -> None:
        """Forget the position: the next step() recomputes a full window. Call it when a window
        turned out not to be intact (the writer overwrote it while it was read)."""
        self._position = Position()

    def step(self, window, new: int) -> tuple[np.ndarray, np.ndarray]:
        """Outputs for the newest `new` samples of a ring Window: (power W [A, new], probability
        [A, new]). Continues from the previous call when the window holds it (same unbroken run,
        the last processed sample still in the window with the same timestamp), computing only
        the samples since; otherwise (first call, a gap, a ring reset, a skipped-ahead schedule)
        recomputes the whole window. The newest outputs are the same either way: the window holds
        the receptive field, so the zero padding of a full recompute never reaches them. (Only an
        interval longer than window - receptive_field + 1 asks for older outputs, which a full
        recompute gets from a zero-padded past and a continued step from the true one.)"""
        if not 0 < new <= window.size:
            raise ValueError(f"new={new} outside 1..{window.size}")
        n = self._position.new_since(window, self.receptive_field)
        if n is not None and n >= new:
            out = self._incremental(window.features[window.size - n:], new)
        else:
            out = None
        if out is None:
            self.full_recomputes += 1
            out = self._full(window.features, new)
        self._position.moved_to(window)
        return out

    def _full(self, features: np.ndarray, new: int):
        raise NotImplementedError

    def _incremental(self, features: np.ndarray, new: int):
        raise NotImplementedError
