"""Incremental inference (Predictor.step over a real ring buffer) == a full-window recomputation.

The reference for every step is each model alone on the whole window the step was given
(test_fused.assert_matches_models), compared on the newest samples: those the daemon publishes.
The rings are small, so the tests cross wrap-around many times.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nilmd.appliances import APPLIANCES
from nilmd.models.model import WaveNILMConfig
from nilmd.models.predictor import MAX_GRAPHS, Predictor
from nilmd.daemon.ringbuffer import RingBuffer
from test_fused import assert_matches_models, features, make_checkpoints, one_thread  # noqa: F401 (autouse)

SMALL = WaveNILMConfig(channels=8, depth=5, head_channels=8)  # receptive field 32


class Meter:
    """Writes a plausible trace into a real ring, one second per sample."""

    def __init__(self, path, capacity: int, seed: int = 0, t0: float = 1.7e9):
        self.ring = RingBuffer.create(str(path), capacity, 5)
        self.data = features(4096, seed)
        self.i = 0
        self.t = t0

    def write(self, n: int) -> None:
        rows = self.data[np.arange(self.i, self.i + n) % len(self.data)]
        self.ring.write(self.t + np.arange(n), rows, np.zeros(n, np.uint8))
        self.i += n
        self.t += n

    def close(self):
        self.ring.close()
        self.ring.unlink()


@pytest.fixture
def meter(tmp_path):
    m = Meter(tmp_path / "ring", capacity=160)
    yield m
    m.close()


def check_step(pred, ring: RingBuffer, size: int, new: int, reference: Predictor | None = None) -> None:
    """pred.step on the ring's newest window == each model alone (of `reference`, else of pred)."""
    window = ring.window(size)
    power, prob = pred.step(window, new)
    x = window.features.copy()
    assert ring.intact(window)
    del window
    assert_matches_models(reference or pred, x, power, prob, last=new)


def walk_plan(pred, meter: Meter, plan, size: int = 64, reference: Predictor | None = None) -> int:
    """A hypothesis plan of (n, skipped, gap): n new samples and a step for them, `skipped` more
    samples written without one (a late or skipped inference), a break in the ring and a whole
    window before them. Every step checked (check_step); returns the full recomputes it implies."""
    meter.write(size)
    check_step(pred, meter.ring, size, 1, reference)
    fulls = 1
    for n, skipped, gap in plan:
        if gap:
            meter.ring.mark_break()
            meter.write(size)
            fulls += 1
        meter.write(n + skipped)
        check_step(pred, meter.ring, size, min(n, size - 31), reference)  # 31: past SMALL's receptive field
    return fulls


def small_predictor(seed=0, n=3, cfg=SMALL, **kw):
    return Predictor(make_checkpoints({a: cfg for a in APPLIANCES[:n]}, seed=seed), **kw)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-logic"])
@pytest.mark.parametrize("interval", [pytest.param(1, marks=pytest.mark.slow), 60])  # 1: hundreds of steps
def test_many_steps_across_wraparound(meter, interval, graphs):
    """graphs=True runs the CUDA path's bookkeeping (fixed-size states loaded from the full
    window's state, one graph per step size) eagerly on the CPU."""
    pred = small_predictor(graphs=graphs)
    size = 96  # holds the receptive field (32) and one 60-s interval of exact outputs
    meter.write(size)
    check_step(pred, meter.ring, size, interval)
    steps = 400 if interval == 1 else 12  # the ring (160) laps 2.5 and 4.5 times
    for _ in range(steps):
        meter.write(interval)
        check_step(pred, meter.ring, size, interval)
    assert pred.full_recomputes == 1  # only the first


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 3), st.booleans()), min_size=1, max_size=25))
def test_any_schedule(tmp_path_factory, plan):
    """Steps of any size, samples written without a step (a late or skipped inference), gaps:
    always the full recomputation's newest outputs; incremental whenever it can be."""
    m = Meter(tmp_path_factory.mktemp("ring") / "ring", capacity=200, seed=len(plan))
    try:
        pred = small_predictor(seed=1)
        fulls = walk_plan(pred, m, plan)
        assert pred.full_recomputes == fulls
    finally:
        m.close()


def test_falls_back_after_a_break_in_the_ring(meter):
    pred = small_predictor()
    meter.write(64)
    check_step(pred, meter.ring, 64, 5)
    meter.write(3)
    meter.ring.mark_break()  # e.g. a gap longer than the fill limit: what follows is unrelated
    meter.write(64)
    check_step(pred, meter.ring, 64, 5)
    assert pred.full_recomputes == 2
    meter.write(5)
    check_step(pred, meter.ring, 64, 5)
    assert pred.full_recomputes == 2


def test_falls_back_after_the_ring_restarts_at_the_same_index(meter):
    """A ring reset and refill can bring the index back to where the state stopped; the
    timestamp of the last processed sample tells."""
    pred = small_predictor()
    meter.write(64)
    check_step(pred, meter.ring, 64, 1)
    meter.ring.reset()
    meter.i += 1000  # other data
    meter.write(63)
    meter.write(1)  # head = 64 again
    check_step(pred, meter.ring, 64, 1)
    assert pred.full_recomputes == 2


def test_a_new_predictor_or_a_reset_starts_with_a_full_window(meter):
    """A reload or a restarted inference process builds a new Predictor; reset() is what the
    caller does when the writer overwrote a window while it was read."""
    ckpts = make_checkpoints({a: SMALL for a in APPLIANCES[:2]})
    first = Predictor(ckpts)
    meter.write(64)
    check_step(first, meter.ring, 64, 4)
    meter.write(4)
    check_step(first, meter.ring, 64, 4)
    second = Predictor(ckpts)
    meter.write(4)
    check_step(second, meter.ring, 64, 4)
    assert (first.full_recomputes, second.full_recomputes) == (1, 1)
    second.reset()
    meter.write(4)
    check_step(second, meter.ring, 64, 4)
    assert second.full_recomputes == 2


def test_repeated_or_skipped_ahead_windows(meter):
    pred = small_predictor()
    meter.write(64)
    check_step(pred, meter.ring, 64, 2)
    check_step(pred, meter.ring, 64, 2)  # the same window again: nothing new to continue with
    assert pred.full_recomputes == 2
    meter.write(100)  # the schedule jumped past the whole window
    check_step(pred, meter.ring, 64, 2)
    assert pred.full_recomputes == 3


def test_window_shorter_than_the_receptive_field_is_always_recomputed(meter):
    """There a full window's zero padding reaches the newest outputs; continuing would give
    other numbers than the full recomputation the models were evaluated with."""
    pred = small_predictor()
    meter.write(20)
    for _ in range(3):
        meter.write(2)
        check_step(pred, meter.ring, 20, 2)
    assert pred.full_recomputes == 3


def test_graph_logic_with_more_step_sizes_than_graphs(meter):
    pred = small_predictor(graphs=True)
    meter.write(64)
    check_step(pred, meter.ring, 64, 1)
    sizes = [1, 2, 1, 3, 5, 7, 1, 9, 2, 11, 1]
    for n in sizes:
        meter.write(n)
        check_step(pred, meter.ring, 64, n)
    # 1, 2, 3, 5 get graphs; 7, 9 and 11 recompute the window
    assert pred.full_recomputes == 1 + sum(n not in (1, 2, 3, 5) for n in sizes)
    assert sum(k[0] == "step" for k in pred._graphs) == MAX_GRAPHS


@pytest.mark.parametrize("interval", [1, 60])
def test_daemon_sized_models_and_window(tmp_path, interval):
    """11 models of the shipped architecture (receptive field 1024) on a 1536-sample window,
    which the CPU path computes in chunks."""
    m = Meter(tmp_path / "ring", capacity=3200)
    try:
        cfg = WaveNILMConfig(channels=16, depth=10, head_channels=32)
        pred = Predictor(make_checkpoints({a: cfg for a in APPLIANCES}))
        m.write(1536)
        check_step(pred, m.ring, 1536, interval)
        for _ in range(2):
            m.write(interval)
            check_step(pred, m.ring, 1536, interval)
        assert pred.full_recomputes == 1
    finally:
        m.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("interval", [1, 60])
def test_cuda_graphs_follow_the_ring(meter, interval):
    pred = small_predictor(device="cuda")
    assert pred.graphs
    meter.write(96)
    check_step(pred, meter.ring, 96, interval)
    for _ in range(12):
        meter.write(interval)
        check_step(pred, meter.ring, 96, interval)
    meter.ring.mark_break()
    meter.write(96)
    check_step(pred, meter.ring, 96, interval)
    assert pred.full_recomputes == 2


def test_the_cpu_path_never_touches_cuda(meter, monkeypatch):
    """device=cpu must work where CUDA is broken or half-installed: no CUDA call at all."""
    def boom(*args, **kwargs):
        raise AssertionError("CUDA API called on the CPU path")

    for name in ("is_available", "Stream", "CUDAGraph", "graph", "current_stream", "synchronize", "stream",
                 "device_count", "init"):
        monkeypatch.setattr(torch.cuda, name, boom)
    pred = small_predictor()
    meter.write(64)
    check_step(pred, meter.ring, 64, 3)
    meter.write(3)
    check_step(pred, meter.ring, 64, 3)
    pred.run(features(50))
