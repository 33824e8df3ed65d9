#!/usr/bin/env python3
"""Soak: days of 1 Hz simulated meter data through the real daemon, as fast as it keeps up.

    python scripts/soak.py --days 7                      # a week (not in CI)
    python scripts/soak.py --hours 3 --window 256 --interval 16 --model-dir DIR

It starts its own redis-server (a free port, a temporary directory) and `nilmd run` with
`--input-mode stream`, feeds the data a chunk at a time, and fails (exit 1) on any miscount, or
if memory, open files or Redis connections grow after the first quarter of the run. What it
checks, and how, is nilmd/soak.py; tests/test_soak.py runs it on three hours of data in CI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nilmd import soak  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=float, default=None)
    parser.add_argument("--hours", type=float, default=None)
    parser.add_argument("--window", type=int, default=1536)
    parser.add_argument("--interval", type=int, default=60)
    parser.add_argument("--model-dir", default=str(ROOT / "checkpoints"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    hours = args.hours if args.hours is not None else 24 * (args.days if args.days is not None else 7)
    report, code = soak.run(hours, args.window, args.interval, args.model_dir, args.threads)
    print(f"\nsamples {report['samples']}, predictions {report['predictions']} (published {report['published']}), "
          f"{report['wall_s']} s; rss {report['rss_mb'][0]} -> {report['rss_mb'][1]} MB, "
          f"fds {sum(report['fds'][0].values())} -> {sum(report['fds'][1].values())}, "
          f"redis connections {report['redis_connections'][0]} -> {report['redis_connections'][1]}; "
          f"daemon exit {code}")
    for p in report["problems"]:
        print(f"FAIL: {p}")
    return 0 if report["ok"] and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
