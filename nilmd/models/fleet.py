"""Many buildings through the fused network at once: batched incremental inference.

A daemon serving many buildings (BUILDING_IDS) calls `step` with every building that is due.
Each building keeps its own incremental state, as nilmd.models.predictor keeps one for a single
building, but the states of all buildings live in shared pools, so one call runs the new samples
of every due building through each layer as one batched matmul over
[models, buildings x samples, channels]: the per-kernel overhead that bounds a single building's
60-s step (nilmd.models.fused) is paid once per batch, not once per building.

State. Layer i's input at time t is read again only at t + d (d its dilation, kernel 2). So a
building keeps, per layer, its last d inputs in a circular buffer of exactly d rows, the input of
sample number tau (counted from the building's zero state) at row tau mod d. A step of n samples
first reads the rows its dilated taps need (the n oldest when d >= n; all d otherwise, the other
taps being among the new inputs) and then writes the newest min(n, d) inputs over those same
rows. Nothing is shifted and nothing beyond the receptive field is kept: sum(d) = 2**depth - 1 rows
of C channels per model, 720 kB a building for the shipped 11 models of 16 channels (the single-
building State keeps chunk room on top). A zero state is WaveNILM's left padding, so a full window
is a reset and a step of the whole window, in chunks of CHUNK samples; a continued step computes
only the new samples (nilmd.models.following decides which, per building, by the same rule).

Same arithmetic as FusedWaveNILM._chunk, in the same order, so it equals the single-building path
within float32 rounding (tests/test_fleet.py holds it to that on random and shipped weights).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from nilmd.appliances import APPLIANCES
from nilmd.models.checkpoints import Checkpoint
from nilmd.models.following import Position
from nilmd.models.fused import FusedWaveNILM, arch_key, gate, head
from nilmd.models.predictor import resolve_device

CHUNK = 512  # samples per building per pass: a full window is three passes, as on the 1-building path
ROWS = 2048  # buildings x samples per pass: measured best of 600..16384 (bigger passes leave the cache)


class _Pool:
    """The circular layer histories of every building slot, for one architecture group:
    hist[i] is [A, slots * d_i, C], slot b's rows at b*d_i .. b*d_i + d_i - 1."""

    def __init__(self, net: FusedWaveNILM, slots: int):
        self.net = net
        self.hist = [self._zeros(d * slots) for d in net.dilations]

    def _zeros(self, rows: int) -> torch.Tensor:
        net = self.net
        return torch.zeros(net.n_models, rows, net.channels, dtype=torch.float32, device=net.w_in.device)

    def grow(self, slots: int) -> None:
        for i, (h, d) in enumerate(zip(self.hist, self.net.dilations)):
            bigger = self._zeros(d * slots)
            bigger[:, :h.shape[1]].copy_(h)
            self.hist[i] = bigger

    def zero(self, slot: int) -> None:
        for h, d in zip(self.hist, self.net.dilations):
            h[:, slot * d:(slot + 1) * d].zero_()

    def advance(self, slots: torch.Tensor, seen: torch.Tensor, x: torch.Tensor, need: int):
        """Feed n new samples x [B, n, F] to the slots [B] that have seen `seen` [B] samples since
        their zero state -> (power W, on probability), each [A, B, need], for the newest `need`."""
        net = self.net
        A, C = net.n_models, net.channels
        B, n, F = x.shape
        k = torch.arange(n, device=x.device)
        cur = torch.baddbmm(net.b_in, x.reshape(1, B * n, F).expand(A, B * n, F), net.w_in)  # [A, B*n, C]
        skip = net.b_skip
        for i, (w_cur, w_prev, b_conv, w_res, b_res, w_skip) in enumerate(net.layer_weights):
            d, h = net.dilations[i], self.hist[i]
            m = min(n, d)
            # Rows of the taps t-d of the first m new samples; the same rows then take the newest m inputs.
            rows = (slots[:, None] * d + (seen[:, None] + k[:m]) % d).reshape(-1)
            prev = h.index_select(1, rows)  # [A, B*m, C], a copy: safe to overwrite the rows below
            cur4 = cur.view(A, B, n, C)
            if n > d:  # the later taps are new inputs themselves
                prev = torch.cat([prev.view(A, B, m, C), cur4[:, :, :n - d]], dim=2).view(A, B * n, C)
            wrows = (slots[:, None] * d + (seen[:, None] + (n - m) + k[:m]) % d).reshape(-1)
            h.index_copy_(1, wrows, cur4[:, :, n - m:].reshape(A, B * m, C))
            z = gate(torch.baddbmm(b_conv, cur, w_cur).baddbmm_(prev, w_prev), C)
            if need:
                skip = torch.baddbmm(skip, z.view(A, B, n, C)[:, :, n - need:].reshape(A, B * need, C), w_skip)
            if i + 1 < net.depth:
                cur = torch.baddbmm(cur, z, w_res).add_(b_res)
        if not need:
            return None
        power, prob = head(net, skip, x[:, n - need:, 0].reshape(B * need))
        return power.view(A, B, need), prob.view(A, B, need)


class FleetPredictor:
    """All loaded appliance models for many buildings, in the fixed appliance order."""

    backend = "torch"

    def __init__(self, checkpoints: dict[str, Checkpoint], device: str = "cpu", slots: int = 16):
        self.appliances = [a for a in APPLIANCES if a in checkpoints]
        ckpts = [checkpoints[a] for a in self.appliances]
        self.device = torch.device(resolve_device(device))
        self.receptive_field = max((c.config.receptive_field for c in ckpts), default=1)
        self.probability_thresholds = np.array([c.probability_threshold for c in ckpts], dtype=np.float32)
        by_arch: dict[tuple, list[int]] = {}
        for k, c in enumerate(ckpts):
            by_arch.setdefault(arch_key(c.config), []).append(k)
        self.groups = [(rows, _Pool(FusedWaveNILM([ckpts[k].model() for k in rows]).to(self.device), slots))
                       for rows in by_arch.values()]
        self.full_recomputes = 0
        self._capacity = slots
        self._slot: dict[str, int] = {}  # building -> its rows in the pools
        self._free: list[int] = list(range(slots - 1, -1, -1))
        self._position: dict[str, Position] = {}
        self._seen = np.zeros(slots, np.int64)  # samples each slot has seen since its zero state

    @property
    def buildings(self) -> int:
        return len(self._slot)

    def state_bytes(self) -> int:
        """Memory the pools hold (all slots, in use or free)."""
        return sum(h.numel() * h.element_size() for _, pool in self.groups for h in pool.hist)

    # -- buildings -------------------------------------------------------------------------------
    def reset(self, building: str) -> None:
        """Forget its position: its next step recomputes a whole window (an overrun, a break)."""
        self._position.pop(building, None)

    def forget(self, building: str) -> None:
        """The building is no longer served: its slot goes back to the free list."""
        self._position.pop(building, None)
        slot = self._slot.pop(building, None)
        if slot is not None:
            self._free.append(slot)

    def _slot_of(self, building: str) -> int:
        slot = self._slot.get(building)
        if slot is None:
            if not self._free:
                grown = 2 * self._capacity
                for _, pool in self.groups:
                    pool.grow(grown)
                self._seen = np.concatenate([self._seen, np.zeros(grown - self._capacity, np.int64)])
                self._free = list(range(grown - 1, self._capacity - 1, -1))
                self._capacity = grown
            slot = self._slot[building] = self._free.pop()
        return slot

    # -- the batched step --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, items: list[tuple[str, object, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each (building, ring Window, new): (power W [A, new], probability [A, new]) for the
        newest `new` samples of that window, as Predictor.step(window, new) gives for the building
        alone. A building continues its state when the window continues it, else its whole window is
        recomputed from the zero state. Buildings with the same number of samples to feed run as one
        batch. Copies what it reads out of the windows before it returns (check ring.intact after)."""
        batches = defaultdict(list)  # (samples to feed, outputs wanted) -> item indices
        for j, (building, window, new) in enumerate(items):
            if not 0 < new <= window.size:
                raise ValueError(f"{building}: new={new} outside 1..{window.size}")
            slot = self._slot_of(building)
            position = self._position.setdefault(building, Position())
            n = position.new_since(window, self.receptive_field)
            if n < new:  # not continued: from the zero state over the whole window
                self.full_recomputes += 1
                for _, pool in self.groups:
                    pool.zero(slot)
                self._seen[slot] = 0
                n = window.size
            batches[n, new].append(j)
            position.moved_to(window)
        out: list = [None] * len(items)
        for (n, new), js in batches.items():
            per_pass = max(1, ROWS // min(n, CHUNK))
            for a in range(0, len(js), per_pass):
                part = js[a:a + per_pass]
                x = np.stack([items[j][1].features[items[j][1].size - n:] for j in part])  # [B, n, F]
                power, prob = self._feed([self._slot[items[j][0]] for j in part], x, new)
                for r, j in enumerate(part):
                    out[j] = (power[:, r], prob[:, r])
        return out

    def _feed(self, slots: list[int], x: np.ndarray, need: int) -> tuple[np.ndarray, np.ndarray]:
        """x [B, n, F] into the slots, in chunks of CHUNK samples -> numpy [A, B, need] each."""
        B, n, _ = x.shape
        xt = torch.from_numpy(x).to(self.device)
        slot_t = torch.as_tensor(slots, dtype=torch.int64, device=self.device)
        power = np.zeros((len(self.appliances), B, need), np.float32)
        prob = np.zeros_like(power)
        for a in range(0, n, CHUNK):
            m = min(CHUNK, n - a)
            want = min(m, max(0, a + m - (n - need)))  # wanted outputs inside this chunk
            seen = torch.as_tensor(self._seen[slots], device=self.device)
            got = [(rows, pool.advance(slot_t, seen, xt[:, a:a + m], want)) for rows, pool in self.groups]
            self._seen[slots] += m
            if want:
                lo = need - (n - a - m) - want  # where this chunk's outputs go among the wanted
                for rows, (p, q) in got:
                    power[rows, :, lo:lo + want] = p.cpu().numpy()
                    prob[rows, :, lo:lo + want] = q.cpu().numpy()
        return power, prob
