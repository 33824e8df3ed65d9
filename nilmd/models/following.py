"""Following the ring buffer: which samples are new since the last call, and whether the state
of that call can be continued. Both backends (nilmd.models.predictor on torch,
nilmd.models.onnx_backend on ONNX Runtime) share it; it needs neither torch nor onnxruntime."""

from __future__ import annotations

import numpy as np


class RingFollower:
    """A subclass computes `_full(features, new)` (a whole window from the zero state, keeping the
    state at its end) and `_incremental(features, new)` (continuing the state; None: it cannot)."""

    full_recomputes = 0  # how often step() could not continue from its state
    receptive_field = 1

    def reset(self) -> None:
        """Forget the position: the next step() recomputes a full window. Call it when a window
        turned out not to be intact (the writer overwrote it while it was read)."""
        self._end = None  # ring index one past the last sample step() processed
        self._last_ts = None  # that sample's grid second: tells a ring that restarted from 0
        self._size = None

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
        n = window.end - self._end if self._continues(window) else 0
        if n >= new:
            out = self._incremental(window.features[window.size - n:], new)
        else:
            out = None
        if out is None:
            self.full_recomputes += 1
            out = self._full(window.features, new)
        self._end, self._last_ts, self._size = window.end, float(window.ts[-1]), window.size
        return out

    def _continues(self, window) -> bool:
        end = self._end
        return (end is not None and window.size == self._size and window.size >= self.receptive_field
                and window.start < end <= window.end and float(window.ts[end - 1 - window.start]) == self._last_ts)

    def _full(self, features: np.ndarray, new: int):
        raise NotImplementedError

    def _incremental(self, features: np.ndarray, new: int):
        raise NotImplementedError
