"""Which seconds a published interval covers (docs/CONTRACT.md §4), shared by the inference
process and the evaluation, so that what is scored is what is published.

Intervals are whole multiples of INFERENCE_INTERVAL on the grid clock: with the default 60 s,
a prediction covers one clock minute, [hh:mm:00, hh:mm:59]. A 1-minute meter's readings cover
clock minutes too, so each prediction then describes exactly one reading; a schedule that
started wherever the data did straddled two readings in every interval. Measured on the
left-out 1-minute houses (model card): kettle F1 0.750 -> 0.902 on UK-DALE house 2 and 0.472 ->
0.586 on REFIT house 2, with the same checkpoints.
"""

from __future__ import annotations


def wait_to_align(newest_ts: float, interval: int) -> int:
    """Samples after the one stamped `newest_ts` until the newest sample of an interval: the
    window ending there closes [k * interval, (k + 1) * interval) of the clock."""
    return int(-(int(newest_ts) + 1)) % int(interval)
