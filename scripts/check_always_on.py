"""The always-on estimate (nilmd.daemon.alwayson) against the real houses' nights: for each day
of the real-1min data, the estimate over its 24 h against that night's lowest 10-minute mean
(01:00-05:00 UTC, the house at rest), with all hours and with 8 random hours missing.

    .venv/bin/python scripts/check_always_on.py [DATA_DIR]   # default /work/shared/data/real-1min
"""

from __future__ import annotations

import glob
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nilmd import csvfile  # noqa: E402
from nilmd.daemon.alwayson import estimate  # noqa: E402


def days_of(path: str):
    """(day start, seconds, W) of each day with enough samples, night included."""
    table = csvfile.read(path)
    for d in np.unique(table.time // 86400 * 86400):
        keep = (table.time >= d) & (table.time < d + 86400) & np.isfinite(table.power) & (table.power > 0)
        hour = (table.time - d) / 3600
        if keep.sum() >= 600 and (keep & (hour >= 1) & (hour < 5)).sum() >= 120:
            yield d, table.time[keep], table.power[keep]


def main(data: Path) -> None:
    out = defaultdict(list)
    for path in sorted(glob.glob(str(data / "*.csv.gz"))):
        house = Path(path).name.rsplit("_", 1)[0]
        for d, t, p in days_of(path):
            night = (t >= d + 3600) & (t < d + 5 * 3600)
            bins = ((t[night] - d - 3600) // 600).astype(int)
            low = min(p[night][bins == b].mean() for b in np.unique(bins))
            flags = np.zeros(len(t), np.uint8)
            full = estimate(t, flags, p, d + 86400)
            drop = np.random.default_rng(int(d)).choice(24, 8, replace=False)
            kept = ~np.isin(((t - d) // 3600).astype(int), drop)
            gappy = estimate(t[kept], flags[kept], p[kept], d + 86400)
            out[house].append((low, full - low, gappy - low))
    for house, rows in out.items():
        low, err, gap = (np.array(c) for c in zip(*rows))
        print(f"{house}: {len(rows)} days, night's lowest 10 min {np.median(low):.1f} W (median); estimate minus it: "
              f"median {np.median(err):+.1f} W, mean abs {np.abs(err).mean():.1f} W; 8 h missing: "
              f"median {np.median(gap):+.1f} W, mean abs {np.abs(gap).mean():.1f} W")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data" / "real-1min")
