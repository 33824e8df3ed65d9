"""The inference schedule aligned to the clock (docs/CONTRACT.md §4): every prediction covers
[k * INFERENCE_INTERVAL, (k + 1) * INFERENCE_INTERVAL) of the grid's seconds. The expected ends
here are written from the contract's words (brute force over seconds), never from nilmd.schedule."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import numpy as np
import pytest

from conftest import publish_samples, wait_for
from nilmd import schedule
from nilmd.config import Config
from nilmd.daemon.control import ControlBlock
from nilmd.daemon.inference import InferenceWorker
from nilmd.daemon.ringbuffer import RingBuffer
from nilmd.features import N_FEATURES
from test_daemon import Subscriber, wait_ready

WINDOW, STEP, CAPACITY = 256, 16, 1024  # conftest.Daemon's settings


def closes_an_interval(second: int, interval: int) -> bool:
    return (second + 1) % interval == 0


def contract_ends(first: int, last: int, window: int = WINDOW, interval: int = STEP) -> list[float]:
    """The seconds at which the unbroken run first..last has a window predicted: each one that
    has `window` samples up to it and closes an interval of the clock."""
    return [float(t) for t in range(first + window - 1, last + 1) if closes_an_interval(t, interval)]


def test_wait_to_align_is_the_samples_until_an_interval_closes():
    for interval in (1, 2, 7, 16, 60, 3600):
        for t in [*range(0, 200), *range(1_700_000_000, 1_700_000_130)]:
            brute = next(w for w in range(interval) if closes_an_interval(t + w, interval))
            assert schedule.wait_to_align(float(t), interval) == brute, (t, interval)
            assert schedule.wait_to_align(t + 0.75, interval) == brute, "a fraction of a second is the same second"


def test_contract_count_formula_agrees_with_the_rule():
    """1 + (N - WINDOW_SIZE - w) // INFERENCE_INTERVAL predictions, none while N < WINDOW_SIZE + w."""
    for start in range(1_700_000_000, 1_700_000_000 + 2 * STEP):
        t = start + WINDOW - 1
        w = (-(t + 1)) % STEP
        for n in (WINDOW - 1, WINDOW, WINDOW + w, WINDOW + w + STEP - 1, WINDOW + 5 * STEP + 3):
            formula = 0 if n < WINDOW + w else 1 + (n - WINDOW - w) // STEP
            assert len(contract_ends(start, start + n - 1)) == formula, (start, n)


class Inference:
    """InferenceWorker's schedule on a real ring and control block in /dev/shm, driven the way
    its serve loop drives it: next_end, then last_window_end = end once it is published."""

    def __init__(self):
        name = f"/dev/shm/nilmd-test-schedule-{uuid.uuid4().hex[:8]}"
        self.paths = {"ring": name + ".ring", "ctl": name + ".ctl"}
        self.ring = RingBuffer.create(self.paths["ring"], CAPACITY, N_FEATURES)
        self.ctl = ControlBlock.create(self.paths["ctl"])
        cfg = Config(building_id="schedule", window_size=WINDOW, inference_interval=STEP, ring_capacity=CAPACITY)
        self.worker = InferenceWorker(cfg, self.paths)

    def write(self, first: int, n: int) -> None:
        ts = np.arange(first, first + n, dtype=np.float64)
        self.ring.write(ts, np.zeros((n, N_FEATURES), np.float32), np.zeros(n, np.uint8))

    def predict_all(self) -> list[float]:
        ends = []
        while (end := self.worker.next_end()) is not None:
            ends.append(float(self.ring.window(1, end).ts[-1]))
            self.ctl["last_window_end"] = end
        return ends

    def close(self) -> None:
        for m in (self.worker.ring, self.worker.ctl, self.ring, self.ctl):
            m.close()
        for p in self.paths.values():
            os.unlink(p)


@pytest.fixture
def inference():
    i = Inference()
    yield i
    i.close()


@pytest.mark.parametrize("offset", range(STEP))
def test_first_window_is_the_first_full_one_that_closes_an_interval(inference, offset):
    start = 1_700_000_000 + offset  # 1_700_000_000 is a multiple of 16: every misalignment once
    got, first = [], start
    for n in (100, 156, 1, 14, 3, 40, 17, 16, 33):  # arriving in batches of any size
        inference.write(first, n)
        got += inference.predict_all()
        first += n
    assert got == contract_ends(start, first - 1)
    assert got and closes_an_interval(int(got[0]), STEP) and got[0] - (start + WINDOW - 1) < STEP


def test_a_break_realigns_the_next_run_and_a_carried_schedule_is_kept(inference):
    start = 1_700_000_003
    inference.write(start, 400)
    one = inference.predict_all()
    assert one == contract_ends(start, start + 399)
    inference.ring.mark_break()  # the reader's answer to a clock jump or a long gap
    again = start + 400 + 3600 + 9
    inference.write(again, 300)
    two = inference.predict_all()
    assert two == contract_ends(again, again + 299), "the run after the break is not aligned on its own"
    # A schedule carried over from an older, unaligned nilmd (its last end in the control block):
    # kept until the next break, as the contract says.
    head, _ = inference.ring.counters()
    inference.ctl["last_window_end"] = head - 5
    carried = float(inference.ring.window(1, head - 5).ts[-1])
    assert not closes_an_interval(int(carried), STEP)
    inference.write(again + 300, 40)
    assert inference.predict_all() == [carried + STEP, carried + 2 * STEP]


def test_falling_a_ring_behind_skips_to_the_newest_aligned_window(inference):
    start = 1_700_000_007
    inference.write(start, 300)
    inference.predict_all()
    inference.write(start + 300, 900)  # more than a ring ahead of the schedule, at once
    last = start + 1199
    newest = max(t for t in range(last - STEP + 1, last + 1) if closes_an_interval(t, STEP))
    assert inference.predict_all() == [float(newest)]
    inference.write(last + 1, 2 * STEP)
    assert inference.predict_all() == [float(newest + STEP), float(newest + 2 * STEP)]


@pytest.mark.slow
def test_the_daemon_publishes_aligned_windows_after_a_misaligned_start_a_break_and_a_skip(daemon_factory,
                                                                                        redis_client):
    """The real daemon on pub/sub: a run that starts 5 s after an interval boundary (so its first
    full window is 11 samples before an interval closes), a meter clock that jumps forward 10 min
    (a break: a new run, aligned on its own), then an inference process that is stopped while more
    than a ring of samples arrives (it skips ahead, to the newest window that closes an interval)."""
    d = daemon_factory().start()
    sub = Subscriber(redis_client, d.building)
    wait_ready(d, redis_client)
    start = int(time.time()) - 3000
    start += (5 - (start + WINDOW)) % STEP  # (start + 256) % 16 == 5: w = 11
    w = (-(start + WINDOW - 1 + 1)) % STEP
    assert w == 11
    n1 = WINDOW + w + 3 * STEP + 7
    last = publish_samples(redis_client, d.building, n1, start=float(start))
    one = contract_ends(start, int(last))
    assert len(one) == 1 + (n1 - WINDOW - w) // STEP == 4
    sub.until(one[-1], timeout=30)
    assert one[0] == start + WINDOW - 1 + w

    again = int(last) + 1 + 608  # a gap longer than max_gap_fill (60 s): a break
    w2 = (-(again + WINDOW - 1 + 1)) % STEP
    assert w2 == 9
    n2 = WINDOW + w2 + 2 * STEP
    last = publish_samples(redis_client, d.building, n2, start=float(again))
    two = contract_ends(again, int(last))
    assert len(two) == 1 + (n2 - WINDOW - w2) // STEP == 3 and two[0] == again + WINDOW - 1 + w2
    sub.until(two[-1], timeout=30)
    s = wait_for(lambda: (lambda s: s if int(s["samples_accepted"]) == n1 + n2 else None)(d.status(redis_client)),
                 10, "the status to count every sample")
    assert int(s["gaps_broken"]) == 1, s

    inference = int(s["pid_inference"])
    os.kill(inference, signal.SIGSTOP)
    try:
        last = publish_samples(redis_client, d.building, CAPACITY + 100, start=last + 1)
        wait_for(lambda: int(d.status(redis_client)["samples_accepted"]) == n1 + n2 + CAPACITY + 100, 20,
                 lambda: f"every sample in the ring\n{d.log()[-2000:]}")
    finally:
        os.kill(inference, signal.SIGCONT)
    newest = float(max(t for t in range(int(last) - STEP + 1, int(last) + 1) if closes_an_interval(t, STEP)))
    sub.until(newest, timeout=30)
    got = [json.loads(m)["window_end"] for m in sub.received]
    assert got == one + two + [newest], "a window not on the clock's intervals, or one too many"
    assert "skipping to the newest window" in d.log()
    s = wait_for(lambda: (lambda s: s if int(s["inferences"]) == len(got) else None)(d.status(redis_client)), 10,
                 f"inferences to count the {len(got)} published windows")
    assert int(s["restarts"]) == 0
    assert d.stop() == 0
