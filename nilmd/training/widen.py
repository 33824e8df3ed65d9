"""Warm-start a wider WaveNILM from a narrower one, computing the same function at step 0.

A capacity experiment (more channels) that starts from scratch compares a fresh model against
one with thousands of steps behind it. Widening instead keeps every old weight, gives the new
channels random incoming weights and zero weights out of them into old units: at step 0 the
wide model's outputs equal the narrow one's (tests/test_training.py checks it), and the new
channels, whose activations are non-zero, get gradients and learn from there (Net2Net-style,
Chen et al. 2016, with zero outgoing weights instead of split ones).
"""

from __future__ import annotations

import torch

from nilmd.models.model import WaveNILM

# Output rows of these convolutions are two blocks of `channels`, chunked in forward().
_PAIRED_ROWS = ("conv", "out")


def _blocks(n_old: int, n_new: int, paired: bool) -> list[tuple[slice, slice]]:
    """(old slice, new slice) of the rows or columns that carry old units."""
    if not paired:
        return [(slice(0, n_old), slice(0, n_old))]
    c_old, c_new = n_old // 2, n_new // 2
    return [(slice(0, c_old), slice(0, c_old)), (slice(c_old, n_old), slice(c_new, c_new + c_old))]


@torch.no_grad()
def widen_into(wide: WaveNILM, narrow_state: dict, narrow_channels: int) -> None:
    """Load `narrow_state` (a WaveNILM state_dict with `narrow_channels`) into `wide`, in place.
    Depth, head width and features must match; only `channels` may grow."""
    if narrow_channels >= wide.config.channels:
        raise ValueError(f"widening needs more channels than {narrow_channels}, got {wide.config.channels}")
    for name, new in wide.state_dict().items():
        old = narrow_state[name]
        if old.shape == new.shape:
            new.copy_(old)
            continue
        leaf = name.rsplit(".", 2)[-2] if name.startswith("layers.") else ""
        rows = _blocks(old.shape[0], new.shape[0], leaf in _PAIRED_ROWS)
        if old.dim() == 1:  # a bias: old units keep theirs, new ones keep their random start
            for o, n in rows:
                new[n] = old[o]
            continue
        cols_old, cols_new = old.shape[1], new.shape[1]
        for o, n in rows:
            new[n, cols_old:] = 0.0  # new channels feed nothing old: same outputs at step 0
            new[n, :cols_old] = old[o]
