"""The shared-memory ring: wrap-around, capacity, breaks, lap detection, zero-copy windows."""

import multiprocessing as mp

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nilmd.daemon.ringbuffer import FLAG_MEASURED, RingBuffer


@pytest.fixture
def ring(tmp_path):
    r = RingBuffer.create(str(tmp_path / "r.ring"), capacity=16, n_features=2)
    yield r
    r.close()


def rows(start, n, f=2):
    ts = np.arange(start, start + n, dtype=np.float64)
    feats = np.stack([ts + k * 0.5 for k in range(f)], axis=1).astype(np.float32)
    return ts, feats, np.zeros(n, np.uint8)


def test_window_is_a_view_into_the_shared_mapping(ring):
    ring.write(*rows(0, 10))
    w = ring.window(8)
    lo, hi = ring.address_range()
    addr = w.features.__array_interface__["data"][0]
    assert lo <= addr and addr + w.features.nbytes <= hi
    assert w.features.flags.c_contiguous and not w.features.flags.owndata
    np.testing.assert_array_equal(w.ts, np.arange(2, 10))
    del w


def test_wraparound_keeps_windows_contiguous(ring):
    for start in range(0, 98, 7):  # 98 samples in batches that straddle the ring's end
        ring.write(*rows(start, 7))
    w = ring.window(16)
    np.testing.assert_array_equal(w.ts, np.arange(82, 98))
    np.testing.assert_array_equal(w.features[:, 1], np.arange(82, 98) + 0.5)
    assert w.flags.tolist() == [FLAG_MEASURED] * 16
    del w


def test_not_enough_samples_and_too_large(ring):
    ring.write(*rows(0, 5))
    assert ring.window(6) is None
    with pytest.raises(ValueError):
        ring.window(17)


def test_batch_longer_than_capacity_keeps_the_tail(ring):
    ring.write(*rows(0, 40))
    assert ring.counters() == (40, 0)
    np.testing.assert_array_equal(ring.window(16).ts, np.arange(24, 40))


def test_break_restarts_the_window(ring):
    ring.write(*rows(0, 12))
    ring.mark_break()
    ring.write(*rows(100, 3))
    assert ring.run_length() == 3
    assert ring.window(4) is None
    np.testing.assert_array_equal(ring.window(3).ts, [100, 101, 102])


def test_lap_detection(ring):
    ring.write(*rows(0, 16))
    w = ring.window(8)  # samples 8..15
    ring.write(*rows(16, 8))  # slots 16..23 overwrite 0..7 only
    assert ring.intact(w)
    ring.write(*rows(24, 1))  # overwrites slot 8, the window's first sample
    assert not ring.intact(w)
    del w


def test_close_with_a_live_view_raises_instead_of_crashing(tmp_path):
    r = RingBuffer.create(str(tmp_path / "x.ring"), capacity=8, n_features=1)
    r.write(np.arange(4.0), np.ones((4, 1), np.float32), np.zeros(4, np.uint8))
    w = r.window(4)
    with pytest.raises(BufferError):
        r.close()
    del w
    r.close()


def _child_writes(path):
    r = RingBuffer.attach(path)
    r.write(*rows(0, 20))
    r.close()


def test_another_process_writes_what_we_read(tmp_path):
    path = str(tmp_path / "p.ring")
    r = RingBuffer.create(path, capacity=16, n_features=2)
    p = mp.get_context("spawn").Process(target=_child_writes, args=(path,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    np.testing.assert_array_equal(r.window(16).ts, np.arange(4, 20))
    r.close()


def test_attach_refuses_a_foreign_file(tmp_path):
    bad = tmp_path / "bad.ring"
    bad.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError):
        RingBuffer.attach(str(bad))


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(2, 40), ops=st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 90)),
    st.tuples(st.just("break"), st.just(0)),
    st.tuples(st.just("window"), st.integers(1, 40))), max_size=40))
def test_ring_matches_a_plain_python_reference(tmp_path_factory, capacity, ops):
    path = str(tmp_path_factory.mktemp("prop") / "r.ring")
    ring = RingBuffer.create(path, capacity=capacity, n_features=1)
    history, segment, t = [], 0, 0  # the reference: every sample ever written, and where the run began
    try:
        for op, arg in ops:
            if op == "write":
                ts = np.arange(t, t + arg, dtype=np.float64)
                ring.write(ts, (ts * 2).astype(np.float32)[:, None], np.zeros(arg, np.uint8))
                history.extend(ts.tolist())
                t += arg
            elif op == "break":
                ring.mark_break()
                segment = len(history)
            else:
                size = arg
                w = ring.window(size) if size <= capacity else None
                expected = history[-size:] if len(history) - segment >= size and size <= capacity else None
                if expected is None:
                    assert w is None
                else:
                    assert w.ts.tolist() == expected
                    assert (w.features[:, 0] == np.asarray(expected, np.float32) * 2).all()
                    assert ring.intact(w)
                    del w
            assert ring.counters() == (len(history), segment)
    finally:
        ring.close()


def test_dropping_resident_pages_keeps_the_data_and_frees_the_process(tmp_path):
    """The supervisor restores a snapshot into each ring and then drops its copy of the pages."""
    import psutil

    ring = RingBuffer.create(str(tmp_path / "big.ring"), 200_000, 5)  # 11.6 MB
    try:
        n = 200_000
        ts = 1.7e9 + np.arange(n, dtype=np.float64)
        feats = np.random.default_rng(0).random((n, 5), dtype=np.float32)
        ring.write(ts, feats, np.zeros(n, np.uint8))
        before = psutil.Process().memory_info().rss
        ring.drop_resident()
        after = psutil.Process().memory_info().rss
        assert before - after > 8 * 2**20, (before, after)
        w = ring.window(n)
        assert np.array_equal(w.ts, ts) and np.array_equal(w.features, feats)  # read back from the file
        del w
    finally:
        ring.close()
        ring.unlink()
