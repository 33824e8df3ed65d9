"""Many WaveNILM models of one architecture as one network, computed incrementally.

Fusing. The A models' weights are stacked and every layer becomes one batched matmul over the
models (torch.baddbmm: a grouped convolution with groups = A), so one window costs one chain of
~60 kernels instead of A chains. Activations are time-major per model, [A, time, channels]: a
slice of time is then a view, and a kernel-2 convolution with dilation d is two matmuls,
y[t] = h[t-d] @ W_prev + h[t] @ W_cur + b.

Same arithmetic as nilmd.models.model.WaveNILM, rearranged (each change exact or a float32 rounding):
  * the weights are model.fold()'s: the input scales folded into the input conv, the gate computed
    by model.folded_gate (one sigmoid over [filter, gate]), the skip sum's biases summed once;
  * the skip sum and the heads (model.heads, model.power) run only for the samples whose output is
    wanted (the newest interval, not the whole window); the last layer's residual is never made.
nilmd.models.fleet runs the same folded_gate and `head` over many buildings' states at once.

Incremental ("fast WaveNet generation", Paine et al. 2016). Layer i's input at t is only ever
needed again at t + 2**i, so a State keeps each layer's last `dilation` inputs followed by room
for `slack` new ones: n new samples cost n samples of compute, and a full window is just n = T
from a zero state (the zeros being WaveNILM's left padding). Long inputs run in chunks of at most
`slack` samples, which also keeps a chunk's activations in cache.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from nilmd.models.model import WaveNILM, WaveNILMConfig, fold, folded_gate, heads, power


_PER_LAYER = ("w_cur", "w_prev", "b_conv", "w_res", "b_res", "w_skip")  # stacked [depth, A, ...]


def arch_key(config: WaveNILMConfig) -> tuple:
    """What must match for models to fuse (dropout is inactive at inference)."""
    return (config.n_features, config.channels, config.depth, config.head_channels)


class FusedWaveNILM(nn.Module):
    def __init__(self, models: list[WaveNILM]):
        super().__init__()
        cfg = models[0].config
        if any(arch_key(m.config) != arch_key(cfg) for m in models):
            raise ValueError("only models of one architecture fuse")
        self.n_models, self.channels, self.depth = len(models), cfg.channels, cfg.depth
        self.dilations = [layer.dilation for layer in models[0].layers]
        folded = [fold(m) for m in models]
        for name in folded[0]:  # model.fold's weights of every model, stacked: [A, ...]; per layer [D, A, ...]
            value = torch.stack([f[name] for f in folded])
            if name in _PER_LAYER:
                value = value.transpose(0, 1)
            self.register_buffer(name, value.contiguous())
        self._cut()

    def _cut(self) -> None:
        """Per-layer views of the stacked weights, cut once: indexing per call costs ~2 us an op."""
        self._views_of = tuple(getattr(self, k) for k in _PER_LAYER)
        self._layer_views = list(zip(*(t.unbind(0) for t in self._views_of)))

    @property
    def layer_weights(self) -> list[tuple[torch.Tensor, ...]]:
        """Per layer (w_cur, w_prev, b_conv, w_res, b_res, w_skip). .to(device), .cuda() and the
        like replace the buffers with new tensors; the views are cut again the first time this
        sees other tensors than it cut them from, so they always follow the module."""
        if any(getattr(self, k) is not t for k, t in zip(_PER_LAYER, self._views_of)):
            self._cut()
        return self._layer_views

    @property
    def receptive_field(self) -> int:
        return 2 * self.dilations[-1]

    def state(self, slack: int) -> "State":
        return State(self, slack)

    @torch.inference_mode()
    def step(self, st: "State", x: torch.Tensor, outputs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the next n samples x [n, F] (physical units) -> (power W, on probability), each
        [A, outputs], for the last `outputs` of them."""
        n = x.shape[0]
        powers, probs = [], []
        for a in range(0, n, st.slack):
            chunk = x[a:a + st.slack]
            m = chunk.shape[0]
            need = min(m, max(0, a + m - (n - outputs)))  # wanted outputs inside this chunk
            out = self._chunk(st, chunk, need)
            if need:
                powers.append(out[0])
                probs.append(out[1])
        if len(powers) == 1:
            return powers[0], probs[0]
        if not powers:  # nothing wanted (or no samples)
            return x.new_zeros(self.n_models, 0), x.new_zeros(self.n_models, 0)
        return torch.cat(powers, dim=1), torch.cat(probs, dim=1)

    def _chunk(self, st: "State", x: torch.Tensor, need: int):
        n, A, C = x.shape[0], self.n_models, self.channels
        if st.q + n > st.slack:
            st.shift()
        q = st.q
        layers = self.layer_weights
        # Matmul results go to fresh tensors: baddbmm into a strided out= view takes a per-model
        # loop in torch's CPU kernel (2-3x slower for a few samples).
        h0 = torch.baddbmm(self.b_in, x.expand(A, n, x.shape[1]), self.w_in)
        st.hist[0].narrow(1, self.dilations[0] + q, n).copy_(h0)
        for i, (w_cur, w_prev, b_conv, w_res, b_res, _) in enumerate(layers):
            h, d = st.hist[i], self.dilations[i]
            cur = h.narrow(1, d + q, n)
            y = torch.baddbmm(b_conv, cur, w_cur).baddbmm_(h.narrow(1, q, n), w_prev)
            z = folded_gate(y, C, out=st.z[i].narrow(1, 0, n))
            if i + 1 < self.depth:
                nxt = st.hist[i + 1].narrow(1, self.dilations[i + 1] + q, n)
                torch.add(torch.baddbmm(cur, z, w_res), b_res, out=nxt)
        st.q = q + n
        if not need:
            return None
        s = self.b_skip
        for z, (*_, w_skip) in zip(st.z, layers):  # the skip sum
            s = torch.baddbmm(s, z.narrow(1, n - need, need), w_skip)
        return head(self, s, x[n - need:, 0])


def head(net: FusedWaveNILM, skip: torch.Tensor, aggregate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """model.heads and model.power on skip sums [A, t, C] (consumed) and the aggregate power [t]
    (broadcast from the right) -> (power W, on probability), each [A, t]."""
    logits = heads(skip, lambda s: torch.baddbmm(net.b_h1, s, net.w_h1), lambda g: torch.baddbmm(net.b_h2, g, net.w_h2))
    out = logits.sigmoid_()  # [A, t, 2]: both sigmoids in one kernel
    return power(out[..., 0], aggregate), out[..., 1]


class State:
    """Each layer's last `dilation` inputs (rows q .. q+dilation of hist[i]), then room for
    `slack` new samples; and every layer's gated activations of the chunk, for the skip sum."""

    def __init__(self, net: FusedWaveNILM, slack: int):
        A, C = net.n_models, net.channels
        kw = dict(dtype=torch.float32, device=net.w_in.device)
        with torch.inference_mode():
            self.hist = [torch.zeros(A, d + slack, C, **kw) for d in net.dilations]
            self.z = [torch.empty(A, slack, C, **kw) for _ in net.dilations]
            self.tmp = torch.empty(A, max(net.dilations), C, **kw)
        self.dilations = net.dilations
        self.slack = slack
        self.q = 0

    @torch.inference_mode()
    def reset(self) -> None:
        """Back to the start of a sequence: the history is WaveNILM's zero padding."""
        for h, d in zip(self.hist, self.dilations):
            h[:, :d].zero_()
        self.q = 0

    @torch.inference_mode()
    def shift(self) -> None:
        """Move the history to the front to make room (the ranges may overlap: via tmp)."""
        for h, d in zip(self.hist, self.dilations):
            t = self.tmp[:, :d]
            t.copy_(h[:, self.q:self.q + d])
            h[:, :d].copy_(t)
        self.q = 0

    @torch.inference_mode()
    def load(self, other: "State") -> None:
        """Continue from where `other` is. The history goes to the end of the room, so the
        next step always shifts first: every step then touches the same addresses (what a
        replayed CUDA graph needs)."""
        for h, g, d in zip(self.hist, other.hist, self.dilations):
            h[:, self.slack:self.slack + d].copy_(g[:, other.q:other.q + d])
        self.q = self.slack


class Graphed:
    """fn() on static tensors: on CUDA captured once as a CUDA graph and then replayed (one
    launch instead of ~60 kernel launches from Python); elsewhere simply called, so the logic
    around it is the same, and tested, on the CPU. fn's Python side effects happen at capture
    only: fn must do the same work every call."""

    def __init__(self, fn, device: torch.device, warmup: int = 2):
        self.fn, self.graph = fn, None
        if device.type != "cuda":
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: cuBLAS handles and workspaces before capture
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn()

    def __call__(self):
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.out
