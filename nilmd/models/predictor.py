"""The one model call: a window of features -> every loaded appliance's power and on-probability,
and the prediction (docs/CONTRACT.md §3.4) built from it. The inference process and scripts/evaluate.py both go
through here, so what is evaluated is what is served.

Models that share an architecture run as one fused network (nilmd.models.fused); a model with another
architecture runs beside them as a group of its own. `run` computes a whole window; `step`
follows the ring buffer and computes only the samples that are new since its last call.
"""

from __future__ import annotations

import numpy as np
import torch

from nilmd.appliances import APPLIANCES
from nilmd.models.checkpoints import Checkpoint
from nilmd.models.fused import FusedWaveNILM, Graphed, State, arch_key

CHUNK = 512  # samples per CPU chunk: a chunk's activations stay in L2; measured best of 128..1536
GPU_CHUNK = 8192  # run() on long series: bounds GPU memory (~1 MB per 1000 samples per model)
MAX_GRAPHS = 4  # incremental CUDA graphs kept (one per step size seen)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    return device


class Predictor:
    """All loaded appliance models, in the fixed appliance order."""

    def __init__(self, checkpoints: dict[str, Checkpoint], device: str = "cpu", *, graphs: bool | None = None):
        self.appliances = [a for a in APPLIANCES if a in checkpoints]
        self.checkpoints = [checkpoints[a] for a in self.appliances]
        self.device = torch.device(resolve_device(device))
        self.receptive_field = max((c.config.receptive_field for c in self.checkpoints), default=1)
        self.probability_thresholds = np.array([c.probability_threshold for c in self.checkpoints], dtype=np.float32)
        by_arch: dict[tuple, list[int]] = {}
        for k, c in enumerate(self.checkpoints):
            by_arch.setdefault(arch_key(c.config), []).append(k)
        self.groups = [(rows, FusedWaveNILM([self.checkpoints[k].model() for k in rows]).to(self.device))
                       for rows in by_arch.values()]
        # CUDA: fixed shapes replayed as CUDA graphs from static buffers. graphs=True on the CPU runs
        # the same logic eagerly (tests); graphs=False on CUDA runs eagerly (debugging).
        self.graphs = (self.device.type == "cuda" if graphs is None else graphs) and bool(self.groups)
        self.full_recomputes = 0  # how often step() could not continue from its state
        self._states = {}  # slack -> [State per group]; CPU: one slack, CHUNK
        self._graphs = {}  # ("full" | "step", n) -> Graphed
        self._inputs = {}  # n -> (pinned host staging buffer, static device input) [n, F]
        self.reset()

    def reset(self) -> None:
        """Forget the position: the next step() recomputes a full window. Call it when a window
        turned out not to be intact (the writer overwrote it while it was read)."""
        self._end = None  # ring index one past the last sample step() processed
        self._last_ts = None  # that sample's grid second: tells a ring that restarted from 0
        self._size = None
        self._live = None  # the slack whose states hold the position

    # -- whole windows -------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """features float32 [T, F] (a ring window view is fine: no copy is made on the CPU)
        -> (power W [A, T], probability [A, T]) as float32 numpy arrays. Stateless."""
        t = features.shape[0]
        x = torch.from_numpy(features).to(self.device)
        slack = max(1, min(t, GPU_CHUNK if self.device.type == "cuda" else CHUNK))
        outs = []
        for _, net in self.groups:
            st = State(net, slack)
            outs.append(net.step(st, x, t))
        return self._collect(outs, t)

    # -- following the ring --------------------------------------------------------------------
    @torch.inference_mode()
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
        t = features.shape[0]
        if not self.graphs:
            x = torch.from_numpy(features).to(self.device)
            outs = []
            for (_, net), st in zip(self.groups, self._state(CHUNK)):
                st.reset()
                outs.append(net.step(st, x, new))
            self._live = CHUNK
            return self._collect(outs, new)
        # Fixed shape: captured once, replayed; every output is made (cheap on a GPU) and sliced.
        states = self._state(t)
        if ("full", t) not in self._graphs:
            x = self._input(t)

            def full():
                outs = []
                for (_, net), st in zip(self.groups, states):
                    st.reset()
                    outs.append(net.step(st, x, t))
                return outs

            self._graphs["full", t] = Graphed(full, self.device)
        outs = self._replay(("full", t), features)
        self._live = t
        return self._collect([(p[:, -new:], q[:, -new:]) for p, q in outs], new)

    def _incremental(self, features: np.ndarray, new: int):
        n = features.shape[0]
        if not self.graphs:
            x = torch.from_numpy(features).to(self.device)
            outs = [net.step(st, x, new) for (_, net), st in zip(self.groups, self._state(CHUNK))]
            return self._collect(outs, new)
        # One graph per step size n, on states with room for exactly n: each step shifts the
        # history and writes at the same place, so a replay does the same work every time.
        source = self._live
        if ("step", n) not in self._graphs:
            if sum(k[0] == "step" for k in self._graphs) >= MAX_GRAPHS:
                return None  # yet another step size: a full recompute is as good
            states, x = self._state(n), self._input(n)
            self._load(n, source)  # so that the capture starts with a shift, like every replay
            self._graphs["step", n] = Graphed(
                lambda: [net.step(st, x, n) for (_, net), st in zip(self.groups, states)], self.device)
            self._live = None  # the capture's warm-up stepped these states: load them again
        if self._live != n:
            self._load(n, source)
        outs = self._replay(("step", n), features)
        return self._collect([(p[:, -new:], q[:, -new:]) for p, q in outs], new)

    def _load(self, slack: int, source: int) -> None:
        """Continue on the states of `slack` from where those of `source` are."""
        for st, src in zip(self._state(slack), self._states[source]):
            st.load(src)
        self._live = slack

    def _state(self, slack: int) -> list[State]:
        if slack not in self._states:
            self._states[slack] = [net.state(slack) for _, net in self.groups]
        return self._states[slack]

    def _input(self, n: int) -> torch.Tensor:
        """The static input of the graphs for n samples (and its pinned host staging buffer)."""
        if n not in self._inputs:
            host = torch.empty(n, self.groups[0][1].w_in.shape[1], pin_memory=self.device.type == "cuda")
            self._inputs[n] = (host, torch.empty_like(host, device=self.device))
        return self._inputs[n][1]

    def _replay(self, key, features: np.ndarray):
        host, dev = self._inputs[key[1]]
        host.numpy()[:] = features  # the only copy of the window: into pinned memory
        dev.copy_(host, non_blocking=True)
        return self._graphs[key]()

    def _collect(self, outs, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-group (power, probability) -> numpy [A, t] each, in appliance order."""
        power = np.zeros((len(self.appliances), t), np.float32)
        prob = np.zeros((len(self.appliances), t), np.float32)
        for (rows, _), (p, q) in zip(self.groups, outs):
            power[rows] = p.cpu().numpy()
            prob[rows] = q.cpu().numpy()
        return power, prob


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
                    inference_ms: float) -> dict:
    """The prediction (docs/CONTRACT.md §3.4) for the newest samples.

    `power`, `prob` [A, n] and `aggregate` [n] cover the last inference interval (n samples).
    power_watts (of `served_power`) and probability are means over the interval, so power_watts
    is at most total_power (each sample's estimate is at most that sample's aggregate).
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
        })
    return {
        "timestamp": float(timestamp),
        "window_start": float(window_start),
        "window_end": float(window_end),
        "total_power": round(total, 2),
        "inference_time_ms": round(float(inference_ms), 3),
        "predictions": entries,
    }
