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
from nilmd.models.fused import FusedWaveNILM, arch_key, head
from nilmd.models.model import folded_gate
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
            z = folded_gate(torch.baddbmm(b_conv, cur, w_cur).baddbmm_(prev, w_prev), C)
            if need:  # the skip sum
                skip = torch.baddbmm(skip, z.view(A, B, n, C)[:, :, n - need:].reshape(A, B * need, C), w_skip)
            if i + 1 < net.depth:
                cur = torch.baddbmm(cur, z, w_res).add_(b_res)
        if not need:
            return None
        power, prob = head(net, skip, x[:, n - need:, 0].reshape(B * need))
        return power.view(A, B, need), prob.view(A, B, need)


class FleetPredictor:
    """All loaded appliance models for many buildings, in the fixed appliance order.

    `keep`: the most outputs a step may ask for (the daemon's interval). Each building keeps the
    outputs of its newest `keep` samples (5 kB for 11 models and 60 s), so that its samples can be
    fed early, as they arrive (`advance`, in the inference's idle time between interval
    boundaries), and the step at the boundary computes only what came since."""

    backend = "torch"

    def __init__(self, checkpoints: dict[str, Checkpoint], device: str = "cpu", slots: int = 16, keep: int = 60):
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
        self.keep = keep
        self.full_recomputes = 0
        self._capacity = 0
        self._slot: dict[str, int] = {}  # building -> its rows in the pools
        self._free: list[int] = []
        self._position: dict[str, Position] = {}
        self._seen = np.zeros(0, np.int64)  # samples each slot has seen since its zero state
        A = len(self.appliances)
        self._tail = np.zeros((0, 2, A, keep), np.float32)  # per slot: power, probability of the newest samples
        self._tail_n = np.zeros(0, np.int64)  # how many of them are valid
        self._grow(slots)

    @property
    def buildings(self) -> int:
        return len(self._slot)

    def state_bytes(self) -> int:
        """Memory the pools hold (all slots, in use or free): the layer histories and the tails."""
        return sum(h.numel() * h.element_size() for _, pool in self.groups for h in pool.hist) + self._tail.nbytes

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

    def _grow(self, capacity: int) -> None:
        old = self._capacity
        if old:
            for _, pool in self.groups:
                pool.grow(capacity)
        more = capacity - old
        self._seen = np.concatenate([self._seen, np.zeros(more, np.int64)])
        self._tail = np.concatenate([self._tail, np.zeros((more, *self._tail.shape[1:]), np.float32)])
        self._tail_n = np.concatenate([self._tail_n, np.zeros(more, np.int64)])
        self._free = list(range(capacity - 1, old - 1, -1)) + self._free
        self._capacity = capacity

    def reserve(self, buildings: int) -> None:
        """Room for this many buildings now (the daemon's list): one allocation, none wasted."""
        if buildings > self._capacity:
            self._grow(buildings)

    def _slot_of(self, building: str) -> int:
        slot = self._slot.get(building)
        if slot is None:
            if not self._free:  # a quarter more: a doubling would leave up to half of 720 kB a building unused
                self._grow(max(self._capacity + 16, self._capacity * 5 // 4))
            slot = self._slot[building] = self._free.pop()
        return slot

    # -- feeding -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, items: list[tuple[str, object, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each (building, ring Window, new): (power W [A, new], probability [A, new]) for the
        newest `new` samples of that window, as Predictor.step(window, new) gives for the building
        alone. A building continues its state when the window continues it (computing only the
        samples not yet fed), else its whole window is recomputed from the zero state. Buildings
        with the same number of samples to feed run as one batch. Copies what it reads out of the
        windows before it returns (check ring.intact after)."""
        for building, window, new in items:
            if not 0 < new <= min(window.size, self.keep):
                raise ValueError(f"{building}: new={new} outside 1..{min(window.size, self.keep)}")
        slots = self._feed(items)
        return [(self._tail[s, 0, :, -new:].copy(), self._tail[s, 1, :, -new:].copy())
                for s, (_, _, new) in zip(slots, items)]

    @torch.inference_mode()
    def advance(self, items: list[tuple[str, object]]) -> None:
        """Feed each building's samples that are new in its ring Window now, keeping their outputs
        for the step that will ask for them."""
        self._feed([(building, window, 0) for building, window in items])

    def _feed(self, items) -> list[int]:
        batches = defaultdict(list)  # samples to feed -> item indices
        slots = []
        for j, (building, window, new) in enumerate(items):
            slot = self._slot_of(building)
            slots.append(slot)
            position = self._position.setdefault(building, Position())
            n = position.new_since(window, self.receptive_field)
            if n is None or n + self._tail_n[slot] < new:  # not continued: the whole window, from the zero state
                self.full_recomputes += 1
                for _, pool in self.groups:
                    pool.zero(slot)
                self._seen[slot] = self._tail_n[slot] = 0
                n = window.size
            if n:
                batches[n].append(j)
            position.moved_to(window)
        for n, js in batches.items():
            per_pass = max(1, ROWS // min(n, CHUNK))
            for a in range(0, len(js), per_pass):
                part = js[a:a + per_pass]
                x = np.stack([items[j][1].features[items[j][1].size - n:] for j in part])  # [B, n, F]
                self._run([slots[j] for j in part], x)
        return slots

    def _run(self, slots: list[int], x: np.ndarray) -> None:
        """x [B, n, F] into the slots, in chunks of CHUNK samples; the outputs of the newest `keep`
        go to the slots' tails."""
        B, n, _ = x.shape
        need = min(n, self.keep)
        xt = torch.from_numpy(x).to(self.device)
        slot_t = torch.as_tensor(slots, dtype=torch.int64, device=self.device)
        out = np.empty((B, 2, len(self.appliances), need), np.float32)
        for a in range(0, n, CHUNK):
            m = min(CHUNK, n - a)
            want = min(m, max(0, a + m - (n - need)))  # wanted outputs inside this chunk
            seen = torch.as_tensor(self._seen[slots], device=self.device)
            got = [(rows, pool.advance(slot_t, seen, xt[:, a:a + m], want)) for rows, pool in self.groups]
            self._seen[slots] += m
            if want:
                lo = need - (n - a - m) - want  # where this chunk's outputs go among the wanted
                for rows, (p, q) in got:
                    out[:, 0, rows, lo:lo + want] = p.permute(1, 0, 2).cpu().numpy()
                    out[:, 1, rows, lo:lo + want] = q.permute(1, 0, 2).cpu().numpy()
        keep = self.keep
        for r, s in enumerate(slots):  # the tail moves on by `need`
            if need < keep:
                self._tail[s, :, :, :keep - need] = self._tail[s, :, :, need:]
            self._tail[s, :, :, keep - need:] = out[r]
            self._tail_n[s] = min(keep, self._tail_n[s] + need)


class AdaptedFleet:
    """Many buildings by model set. Those on the shipped set are one FleetPredictor, batched as
    before; a building with adapted models (nilmd.models.adapted) steps in a FleetPredictor of its
    set's own (one building's pools, shared by buildings whose adapted files are the same), so the
    shipped batch keeps its size and speed and an adapted building costs one more call of its own.

    `adapted_for(building)` -> (its usable adapted checkpoints by appliance, its Adaptation or
    None): asked when a building is placed (at load, and for each building added later)."""

    backend = "torch"

    def __init__(self, shipped: dict[str, Checkpoint], device: str = "cpu", adapted_for=None, slots: int = 16,
                 keep: int = 60):
        self.shipped = FleetPredictor(shipped, device, slots, keep)
        self.appliances = self.shipped.appliances
        self.device, self.receptive_field = self.shipped.device, self.shipped.receptive_field
        self.probability_thresholds = self.shipped.probability_thresholds
        self._checkpoints, self._device, self._keep = shipped, device, keep
        self._adapted_for = adapted_for
        self._sets: dict[tuple, FleetPredictor] = {}  # the served files' (appliance, sha256) -> their predictor
        self._set_of: dict[str, tuple] = {}  # building -> its set (absent: the shipped one)
        self._adaptations: dict = {}  # building -> its Adaptation (a folder, usable or not)
        self._recomputed = 0  # full_recomputes of sets no longer served

    # -- which set a building is on -----------------------------------------------------------------
    def place(self, building: str, adapted: dict[str, Checkpoint] | None = None, adaptation=None):
        """Put the building on its set (`adapted`, else what adapted_for says); returns its
        Adaptation. A building placed again starts over on its new set."""
        self.forget(building)
        if adapted is None and self._adapted_for is not None:
            adapted, adaptation = self._adapted_for(building)
        if adaptation is not None:
            self._adaptations[building] = adaptation
        if adapted:
            key = tuple(sorted((a, c.path if adaptation is None else adaptation.record["appliances"][a]["sha256"])
                               for a, c in adapted.items()))
            if key not in self._sets:  # one building's pools: most adapted sets are one building's
                self._sets[key] = FleetPredictor({**self._checkpoints, **adapted}, self._device, 1, self._keep)
            self._set_of[building] = key
        return adaptation

    def adaptation(self, building: str):
        return self._adaptations.get(building)

    def thresholds(self, building: str) -> np.ndarray:
        return self._of(building).probability_thresholds

    def _of(self, building: str) -> FleetPredictor:
        key = self._set_of.get(building)
        return self.shipped if key is None else self._sets[key]

    @property
    def sets(self) -> int:
        """Adapted sets served (each a FleetPredictor beside the shipped one)."""
        return len(self._sets)

    # -- the FleetPredictor interface -------------------------------------------------------------
    @property
    def buildings(self) -> int:
        return self.shipped.buildings + sum(p.buildings for p in self._sets.values())

    @property
    def full_recomputes(self) -> int:
        return self._recomputed + self.shipped.full_recomputes + sum(p.full_recomputes for p in self._sets.values())

    def state_bytes(self) -> int:
        return self.shipped.state_bytes() + sum(p.state_bytes() for p in self._sets.values())

    def reserve(self, buildings: int) -> None:
        self.shipped.reserve(buildings - len(self._set_of))

    def reset(self, building: str) -> None:
        self._of(building).reset(building)

    def forget(self, building: str) -> None:
        self._of(building).forget(building)
        self._adaptations.pop(building, None)
        key = self._set_of.pop(building, None)
        if key is not None and key not in self._set_of.values():  # its set's last building
            self._recomputed += self._sets.pop(key).full_recomputes

    def step(self, items: list[tuple[str, object, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """FleetPredictor.step, each building on its set."""
        if not self._set_of:  # no adapted building: exactly the one batch, as before
            return self.shipped.step(items)
        out = [None] * len(items)
        for predictor, js in self._split(items).items():
            for j, got in zip(js, predictor.step([items[j] for j in js])):
                out[j] = got
        return out

    def advance(self, items: list[tuple[str, object]]) -> None:
        if not self._set_of:
            return self.shipped.advance(items)
        for predictor, js in self._split(items).items():
            predictor.advance([items[j] for j in js])

    def _split(self, items) -> dict[FleetPredictor, list[int]]:
        parts = defaultdict(list)
        for j, item in enumerate(items):
            parts[self._of(item[0])].append(j)
        return parts
