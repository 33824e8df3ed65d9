"""The control block: a small shared array where each process publishes how it is doing.

Heartbeats, counters and flags live here rather than in Redis so that the supervisor can judge
its children (and keep their counters across a child restart) even while Redis is down. Each
slot has exactly one writer. Values are float64: counters stay exact up to 2**53, heartbeats are
CLOCK_MONOTONIC seconds (system-wide on Linux, so comparable across processes), and an aligned
8-byte store is never torn on the 64-bit CPUs nilmd targets.
"""

from __future__ import annotations

import numpy as np

from nilmd.appliances import APPLIANCES
from nilmd.daemon.ingest import REJECT_REASONS, REPAIR_REASONS
from nilmd.daemon.mapped import MappedFile
from nilmd.daemon.roles import NAMES as ROLE_NAMES
from nilmd.daemon.sources import DISCONNECT_CAUSES

# Every role's state slot starts at 0, "starting": the supervisor writes it before each spawn
# Reader states
READER_STARTING, READER_CONNECTING, READER_SUBSCRIBED = 0, 1, 2
# Inference states
INFER_LOADING, INFER_READY, INFER_RELOADING = 0, 1, 2
# MQTT publisher states
# MQTT_UNUSABLE: it cannot start at all (its TLS files): it idles, the daemon is degraded, predictions go on
MQTT_STARTING, MQTT_CONNECTING, MQTT_CONNECTED, MQTT_UNUSABLE = 0, 1, 2, 3

STARTING = 0
assert READER_STARTING == INFER_LOADING == MQTT_STARTING == STARTING

# Each child role's own (nilmd.daemon.roles): its pid, heartbeat (CLOCK_MONOTONIC) and state
_NAMES = [f"{role}_{slot}" for role in ROLE_NAMES for slot in ("pid", "heartbeat", "state")]
_NAMES += [
    "redis_connected", "redis_errors",
    "samples_received", "samples_accepted", "samples_filled", "gaps_broken", "last_sample_ts",
    "models_loaded", "models_mask",
    "device_cuda", "inferences", "last_inference_ts", "last_inference_ms", "last_window_end",
    "reload_requested", "reload_done", "reload_failed", "overruns",
    "snapshot_ts",
    # durable input and warm restarts (nilmd.daemon.streams, nilmd.daemon.snapshot): the stream entry id of the
    # newest sample in the ring (ms, seq), whether the first reader of this life has caught up
    # with what an earlier life processed, and the ring index up to which windows were predicted
    # by that earlier life (the inference does not replay them)
    "input_pos_ms", "input_pos_seq", "input_resumed", "history_end", "restored_samples",
    "snapshot_failures", "snapshot_errno", "clock_jumps",
    # the box's time (epoch s) when a sample was last accepted: a warm restart and the health
    # rules judge by it, never by the meter's own stamps (its clock need not match the box's)
    "last_arrival",
]
_NAMES += [f"rejected_{r}" for r in REJECT_REASONS]
_NAMES += [f"repaired_{r}" for r in REPAIR_REASONS]
# Redis commands that failed (any error: unreachable, OOM, NOPERM, ...), per process; the reader's
# are "redis_errors" above. Counted here so that the count survives until Redis takes a write again.
_NAMES += ["supervisor_redis_errors", "inference_redis_errors"]
# 1 while the inference holds a prediction that Redis did not take (its schedule waits on it)
_NAMES += ["predictions_pending"]
# pub/sub subscriptions cut, by cause, and the samples estimated lost in those cuts (the gaps in
# the meter's timestamps across each one)
_NAMES += [f"disconnects_{c}" for c in DISCONNECT_CAUSES] + ["samples_lost"]
# The inference latency as a Prometheus histogram (nilmd.daemon.metrics): cumulative counts of
# published predictions whose step took at most each bound, their sum and count. Kept here, by
# the inference, so that the supervisor's exporter reads it without a second bookkeeping.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_NAMES += [f"latency_le_{i}" for i in range(len(LATENCY_BUCKETS_S))] + ["latency_sum", "latency_count"]
# The Home Assistant publisher (nilmd.daemon.mqtt), a child only with --mqtt-url
_NAMES += ["mqtt_errors", "mqtt_published"]
# 1 while the models are served by ONNX Runtime, 0 by torch (nilmd.models.backends)
_NAMES += ["backend_onnx"]
# 1 once Redis refused one of this building's writes for a lease this instance no longer holds
# (nilmd.daemon.fencing): the inference stopped serving it, the supervisor lets it go
_NAMES += ["fenced"]
# A list daemon (nilmd.daemon.roster): the supervisor bumps it after writing a new list of buildings
_NAMES += ["roster_version"]
# A building's appliances served by its adapted models, and those whose adapted file was refused
# (bits in the fixed order, as models_mask; nilmd.models.adapted): written by the inference at each load
_NAMES += ["adapted_mask", "adapted_refused_mask"]
# The newest sample's timestamp (last_sample_ts when the inference looked) for which every window it
# closes was published: the inference looked and found none due (a test's "nothing more will come")
_NAMES += ["predicted_through_ts"]
SLOTS = {name: i for i, name in enumerate(_NAMES)}
# The slots of one building's data (its ring's reader and inference, its snapshot); every other slot
# belongs to a process and lives in the daemon block. With one building both are the same block.
BUILDING_SLOTS = frozenset(
    ["samples_received", "samples_accepted", "samples_filled", "gaps_broken", "last_sample_ts", "inferences",
     "last_inference_ts", "last_inference_ms", "last_window_end", "overruns", "snapshot_ts", "input_pos_ms",
     "input_pos_seq", "input_resumed", "history_end", "restored_samples", "snapshot_failures", "snapshot_errno",
     "clock_jumps", "last_arrival", "predictions_pending", "samples_lost", "adapted_mask", "adapted_refused_mask",
     "fenced", "predicted_through_ts"]
    + [f"rejected_{r}" for r in REJECT_REASONS] + [f"repaired_{r}" for r in REPAIR_REASONS])
_BUILDING_INDEX = np.array(sorted(SLOTS[n] for n in BUILDING_SLOTS))
SIZE = 8 * 128
assert len(_NAMES) <= 128


def mask(appliances) -> int:
    """Appliances as the bits of a mask slot (models_mask, adapted_mask), in the fixed order."""
    return sum(1 << APPLIANCES.index(a) for a in appliances if a in APPLIANCES)


def appliances(bits: float) -> list[str]:
    """The appliances of a mask slot, in the fixed order."""
    return [a for i, a in enumerate(APPLIANCES) if int(bits) >> i & 1]


class ControlBlock(MappedFile):
    VIEWS = ("_a",)

    def __init__(self, path: str, fd: int, mm):
        super().__init__(path, fd, mm)
        self._a = np.frombuffer(mm, dtype=np.float64, count=len(_NAMES))

    @classmethod
    def create(cls, path: str) -> "ControlBlock":
        return cls(path, *cls._open(path, SIZE))

    @classmethod
    def attach(cls, path: str) -> "ControlBlock":
        return cls(path, *cls._open(path, None))

    def __getitem__(self, name: str) -> float:
        return float(self._a[SLOTS[name]])

    def __setitem__(self, name: str, value: float) -> None:
        self._a[SLOTS[name]] = value

    def add(self, name: str, n: float = 1) -> None:
        self._a[SLOTS[name]] += n

    def observe_latency(self, seconds: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self._a[SLOTS[f"latency_le_{i}"]] += 1
        self._a[SLOTS["latency_sum"]] += seconds
        self._a[SLOTS["latency_count"]] += 1

    def snapshot(self, building: "ControlBlock | None" = None) -> dict[str, float]:
        """Every slot; with `building` (a list daemon's building block), its slots over this block's."""
        values = self._a.copy()
        if building is not None and building is not self:
            values[_BUILDING_INDEX] = building._a[_BUILDING_INDEX]
        return {name: float(values[i]) for name, i in SLOTS.items()}
