"""Training windows: where in the training series each window of a batch is cut.

`Windows` draws from one source's series (around the appliance running, around look-alikes, or
anywhere); `Mixture` draws each element of a batch from one of several sources by weight. Batches
depend only on the RNG they are given, which train.py seeds by (seed, appliance, step): that is
what makes a resumed run bit-identical. numpy only.
"""

from __future__ import annotations

import numpy as np

from nilmd.appliances import ON_THRESHOLD_W
from nilmd.features import SCALES, power_only
from nilmd.training.datasets import hold_input


class Windows:
    """Random training windows of one appliance. Most appliances are off most of the time, so
    uniform windows would teach little but "off": `on_fraction` of the windows hold the appliance
    running in their scored part, and `hard_fraction` hold something else drawing at least half
    the appliance's typical power while it is off (an oven cycling, a heat pump starting: what
    it gets confused with)."""

    def __init__(self, series, appliance: str, window: int, skip: int, typical_w: float, on_w: float | None = None):
        self.series = [s for s in series if appliance in s.targets and len(s) >= window]
        if not self.series:
            raise SystemExit(f"no training series of at least {window} samples has {appliance}")
        self.appliance, self.window, self.skip = appliance, window, skip
        self.lengths = np.array([len(s) - window + 1 for s in self.series], dtype=np.float64)
        thr = ON_THRESHOLD_W[appliance] if on_w is None else on_w  # a house's own (nilmd.training.adapt)
        self.on = [np.flatnonzero(s.valid & (s.targets[appliance] >= thr)) for s in self.series]
        self.hard = [np.flatnonzero(s.valid & (s.targets[appliance] < thr)
                                    & (s.features[:, 0] - s.targets[appliance] >= 0.5 * typical_w))
                     for s in self.series]

    def _around(self, rng, indices):
        counts = np.array([len(i) for i in indices], dtype=np.float64)
        if not counts.sum():
            return None
        k = rng.choice(len(self.series), p=counts / counts.sum())
        i = indices[k][rng.integers(len(indices[k]))]
        return k, i - self.skip - rng.integers(self.window - self.skip)

    def batch(self, rng, batch_size: int, on_fraction: float, hard_fraction: float, power_only_fraction: float,
              hold=((1,), 0.0)):
        x = np.empty((batch_size, self.window, len(SCALES)), np.float32)
        y = np.empty((batch_size, self.window), np.float32)
        m = np.empty((batch_size, self.window), bool)
        for b in range(batch_size):
            x[b], y[b], m[b] = self.sample(rng, on_fraction, hard_fraction, power_only_fraction, hold)
        return x, y, m

    def sample(self, rng, on_fraction, hard_fraction, power_only_fraction, hold=((1,), 0.0)):
        """One training window: (features [window, F], true W [window], scored mask [window])."""
        u = rng.random()
        pick = self._around(rng, self.on) if u < on_fraction else \
            self._around(rng, self.hard) if u < on_fraction + hard_fraction else None
        if pick is None:
            k = rng.choice(len(self.series), p=self.lengths / self.lengths.sum())
            pick = k, rng.integers(self.lengths[k])
        k, start = pick
        s = self.series[k]
        start = int(np.clip(start, 0, len(s) - self.window))
        sl = slice(start, start + self.window)
        x = power_only(s.features[sl]) if rng.random() < power_only_fraction else s.features[sl]
        periods, fraction = hold
        if fraction > 0 and s.period_s == 1 and rng.random() < fraction:
            x = hold_input(x, int(periods[rng.integers(len(periods))]), int(rng.integers(60)))
        m = s.valid[sl].copy()
        m[:self.skip] = False
        return x, s.targets[self.appliance][sl], m


class Mixture:
    """Windows from several sources, each element of a batch drawn from a source by weight."""

    def __init__(self, sources: dict[str, "Windows"], weights: dict[str, float]):
        self.names = [n for n in sources if weights.get(n, 0) > 0]
        if not self.names:
            raise SystemExit("no training source with a weight > 0 has data")
        self.sources = sources
        w = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.p = w / w.sum()

    def batch(self, rng, batch_size, on_fraction, hard_fraction, power_only_fraction, hold=((1,), 0.0)):
        picks = rng.choice(len(self.names), size=batch_size, p=self.p)
        items = [self.sources[self.names[k]].sample(rng, on_fraction, hard_fraction, power_only_fraction, hold)
                 for k in picks]
        return tuple(np.stack(parts) for parts in zip(*items))
