"""The control block: a small shared array where each process publishes how it is doing.

Heartbeats, counters and flags live here rather than in Redis so that the supervisor can judge
its children (and keep their counters across a child restart) even while Redis is down. Each
slot has exactly one writer. Values are float64: counters stay exact up to 2**53, heartbeats are
CLOCK_MONOTONIC seconds (system-wide on Linux, so comparable across processes), and an aligned
8-byte store is never torn on the 64-bit CPUs nilmd targets.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from nilmd.ingest import REJECT_REASONS, REPAIR_REASONS

# Reader states
READER_STARTING, READER_CONNECTING, READER_SUBSCRIBED = 0, 1, 2
# Inference states
INFER_LOADING, INFER_READY, INFER_RELOADING = 0, 1, 2

_NAMES = [
    "reader_pid", "reader_heartbeat", "reader_state", "redis_connected", "redis_errors",
    "samples_received", "samples_accepted", "samples_filled", "gaps_broken", "last_sample_ts",
    "inference_pid", "inference_heartbeat", "inference_state", "models_loaded", "models_mask",
    "device_cuda", "inferences", "last_inference_ts", "last_inference_ms", "last_window_end",
    "reload_requested", "reload_done", "reload_failed", "overruns",
    "snapshot_ts",
]
_NAMES += [f"rejected_{r}" for r in REJECT_REASONS]
_NAMES += [f"repaired_{r}" for r in REPAIR_REASONS]
SLOTS = {name: i for i, name in enumerate(_NAMES)}
SIZE = 8 * 128
assert len(_NAMES) <= 128


class ControlBlock:
    def __init__(self, path: str, fd: int, mm: mmap.mmap):
        self.path = path
        self._fd = fd
        self._mm = mm
        self._a = np.frombuffer(mm, dtype=np.float64, count=len(_NAMES))

    @classmethod
    def create(cls, path: str) -> "ControlBlock":
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, SIZE)
        return cls(path, fd, mmap.mmap(fd, SIZE))

    @classmethod
    def attach(cls, path: str) -> "ControlBlock":
        fd = os.open(path, os.O_RDWR)
        return cls(path, fd, mmap.mmap(fd, SIZE))

    def __getitem__(self, name: str) -> float:
        return float(self._a[SLOTS[name]])

    def __setitem__(self, name: str, value: float) -> None:
        self._a[SLOTS[name]] = value

    def add(self, name: str, n: float = 1) -> None:
        self._a[SLOTS[name]] += n

    def snapshot(self) -> dict[str, float]:
        values = self._a.copy()
        return {name: float(values[i]) for name, i in SLOTS.items()}

    def close(self) -> None:
        self.__dict__.pop("_a", None)
        if not self._mm.closed:
            self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
