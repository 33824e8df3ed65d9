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
from nilmd.models.following import RingFollower
from nilmd.models.fused import FusedWaveNILM, Graphed, State, arch_key
from nilmd.models.prediction import make_prediction, served_power  # noqa: F401 (their old home)

CHUNK = 512  # samples per CPU chunk: a chunk's activations stay in L2; measured best of 128..1536
GPU_CHUNK = 8192  # run() on long series: bounds GPU memory (~1 MB per 1000 samples per model)
MAX_GRAPHS = 4  # incremental CUDA graphs kept (one per step size seen)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    return device


class Predictor(RingFollower):
    """All loaded appliance models, in the fixed appliance order."""

    backend = "torch"

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
        super().reset()
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

    # -- following the ring (nilmd.models.following) -------------------------------------------
    @torch.inference_mode()
    def step(self, window, new: int) -> tuple[np.ndarray, np.ndarray]:
        return super().step(window, new)

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
