"""Draw the daily pictures of docs/images/ (docs/OPERATIONS.md, "The daily picture") the way an
operator gets them: a day of samples through a real daemon (stream input, a real redis-server of
its own), then `nilmd report`.

    .venv/bin/python scripts/report_examples.py [OUT_DIR]     # default docs/images

simulated: house 3000's day 2 of the simulator (1 Hz, all meter fields), with its truth.
real:      UK-DALE House 2, 2013-06-15, from the real-1min data (/work/shared/data/real-1min beside the checkout, or
           $NILMD_REAL_1MIN): each minute's power held for its 60 seconds, power only.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nilmd import csvfile, keys  # noqa: E402
from nilmd.appliances import APPLIANCES  # noqa: E402
from nilmd.daemon import streams  # noqa: E402
from nilmd.testing import DaemonProcess, RedisServer, free_port, wait_for  # noqa: E402

REAL = Path(os.environ.get("NILMD_REAL_1MIN", ROOT.parent / "shared" / "data" / "real-1min"))
CHUNK = 3600  # samples sent before waiting for the daemon to count them (the stream keeps a day)


def replay(workdir: Path, building: str, messages: list[dict]) -> RedisServer:
    """A redis-server and a daemon that have predicted `messages`; the daemon stopped, Redis kept."""
    redis = RedisServer(free_port(), workdir).start()
    env = {**os.environ, "REDIS_PORT": str(redis.port), "REDIS_HOST": "127.0.0.1", "BUILDING_ID": building,
           "MODEL_DIR": str(ROOT / "checkpoints"), "NILMD_INPUT_MODE": "stream", "NILMD_TIMEZONE": "UTC",
           "NILMD_RUNTIME_DIR": str(workdir), "NILMD_STATE_DIR": str(workdir / "state"),
           "NILMD_INPUT_TIMEOUT": "3600", "NILMD_THREADS": "1", "NILMD_MAX_CLOCK_SKEW": str(10 * 365 * 86400)}
    daemon = DaemonProcess(building, workdir / "daemon.log", env).start()
    client = redis.client()
    try:
        wait_for(lambda: daemon.status(client).get("input_connected") == "1", 120, "the daemon to read its stream")
        updated = lambda: float(client.hget(keys.energy_key(building), "updated") or 0)  # noqa: E731
        for i in range(0, len(messages), CHUNK):
            part = messages[i:i + CHUNK]
            pipe = client.pipeline(transaction=False)
            for m in part:
                streams.add(pipe, building, json.dumps(m))
            pipe.execute()
            if i + CHUNK >= 1536:
                last = part[-1]["timestamp"] - 60  # the last whole interval of the part, wherever the grid puts it
                wait_for(lambda: updated() >= last, 300, f"the daemon to count up to {last}\n{daemon.log()[-2000:]}")
    finally:
        daemon.stop()
    return redis


def report(redis: RedisServer, building: str, day: str, out: Path, truth: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "nilmd", "report", "--redis-port", str(redis.port), "--building-id", building,
           "--timezone", "UTC", "--day", day, "--out", str(out)] + (["--truth", str(truth)] if truth else [])
    subprocess.run(cmd, check=True, cwd=ROOT)


def simulated(workdir: Path, out: Path) -> None:
    from nilmd.sim.simulator import Building

    house = Building(3000)
    t0 = house.start + 2 * 86400  # midnight of day 2
    trace = house.trace(t0 - 1536, 1536 + 86400 - 1)
    truth = workdir / "truth.csv"
    with open(truth, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "power_total", *APPLIANCES])
        for i in range(1536, len(trace)):
            w.writerow([int(trace.timestamp[i]), f"{trace.power_total[i]:.1f}",
                        *(f"{trace.appliances[a][i]:.1f}" for a in APPLIANCES)])
    redis = replay(workdir, "simulated", list(trace.messages("full")))
    try:
        report(redis, "simulated", time.strftime("%Y-%m-%d", time.gmtime(t0)), out, truth)
    finally:
        redis.stop()


def real(workdir: Path, out: Path, day: str = "2013-06-15") -> None:
    table = csvfile.read(str(REAL / f"UKDALE_House2_{day[:7]}.csv.gz"))
    start = time.mktime(time.strptime(day, "%Y-%m-%d")) - time.timezone
    messages = []
    for t, p in zip(table.time, table.power):
        if start - 1536 <= t < start + 86400 and p == p:
            messages += [{"timestamp": float(t + k), "power_total": float(p)} for k in range(60)]
    redis = replay(workdir, "ukdale2", messages)
    try:
        report(redis, "ukdale2", day, out)
    finally:
        redis.stop()


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "images"
    target.mkdir(parents=True, exist_ok=True)
    for name, draw in (("report-simulated.png", simulated), ("report-real.png", real)):
        with tempfile.TemporaryDirectory() as tmp:
            draw(Path(tmp), target / name)
            print(f"wrote {target / name}")
