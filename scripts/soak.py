#!/usr/bin/env python3
"""Soak: days of 1 Hz simulated meter data through the real daemon, as fast as it keeps up.

    python scripts/soak.py --days 7                      # a week (not in CI)
    python scripts/soak.py --hours 3 --window 256 --interval 16 --model-dir DIR

It starts its own redis-server (a free port, a temporary directory) and `nilmd run` with
`--input-mode stream`, then XADDs the simulated building's samples a chunk at a time (an hour,
or an eighth of a short run), waits until the daemon has read every sample and made every
prediction the data implies, and then measures: resident memory of each daemon process, their
open file descriptors, and the daemon's Redis connections. tests/test_soak.py runs `drive` on
three hours of data in CI.

It fails (exit 1) unless, at the end:
  * samples accepted == samples sent, and predictions (counted by the daemon and, separately, on
    the predictions channel) == (samples - window) // interval + 1, exactly;
  * total resident memory grew by at most max(8 MB, 5 %) after the first quarter of the run
    (the warm-up: first windows, allocator pools), and file descriptors and Redis connections
    did not change at all.
Pacing by chunks is deliberate: the soak proves "no leak, no miscount" over a long run, not
the throughput limit (scripts/bench.py measures that).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nilmd import keys
from nilmd.daemon import streams  # noqa: E402
from nilmd.producer import simulated_samples  # noqa: E402

ROLES = ("supervisor", "reader", "inference")


def expected_predictions(n: int, window: int, interval: int) -> int:
    return (n - window) // interval + 1 if n >= window else 0


def _status(client, building: str) -> dict:
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.status_key(building)).items()}


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def measure(client, status: dict) -> dict:
    procs = {r: psutil.Process(int(status[f"pid_{r}"])) for r in ROLES}
    names = [c.get("name", "") for c in client.client_list()]
    return {
        "rss_mb": {r: p.memory_info().rss / 2**20 for r, p in procs.items()},
        "fds": {r: p.num_fds() for r, p in procs.items()},
        "redis_connections": sum(1 for n in names if n.startswith("nilmd-")),
    }


def drive(client, building: str, hours: float, window: int, interval: int, *, seed: int = 1,
          chunk: int | None = None, timeout_per_chunk: float = 300.0, log=print) -> dict:
    """Feed `hours` of data to a running stream-mode daemon and check it; returns the report."""
    total = int(hours * 3600)
    chunk = chunk or max(interval, min(3600, total // 8))
    start = float(int(time.time()) - total - 60)  # the whole run lies in the past: never "future"
    predictions = client.pubsub(ignore_subscribe_messages=True)
    predictions.subscribe(keys.predictions_channel(building))
    seen = 0
    samples = simulated_samples(seed, start, total, "full")
    sent, rows, t0 = 0, [], time.monotonic()
    while sent < total:
        n = min(chunk, total - sent)
        pipe = client.pipeline(transaction=False)
        for _ in range(n):
            streams.add(pipe, building, json.dumps(next(samples), separators=(",", ":")), maxlen=None)
        pipe.execute()
        sent += n
        want = expected_predictions(sent, window, interval)
        status = _wait(lambda: (lambda s: s if int(s.get("samples_received", -1)) == sent
                                and int(s.get("inferences", -1)) >= want else None)(_status(client, building)),
                       timeout_per_chunk, f"{sent} samples and {want} predictions")
        while predictions.get_message(timeout=0.0) is not None:
            seen += 1
        row = {"hours": sent / 3600, "wall_s": time.monotonic() - t0, "accepted": int(status["samples_accepted"]),
               "inferences": int(status["inferences"]), **measure(client, status)}
        rows.append(row)
        log(f"{row['hours']:8.2f} h  {row['wall_s']:7.1f} s  predictions {row['inferences']:6d}  "
            f"rss {sum(row['rss_mb'].values()):7.1f} MB ({', '.join(f'{r} {v:.1f}' for r, v in row['rss_mb'].items())})"
            f"  fds {sum(row['fds'].values()):3d}  redis connections {row['redis_connections']}")
    _wait(lambda: (lambda s: int(s["inferences"]) == expected_predictions(total, window, interval))(
        _status(client, building)), 30, "the last prediction")
    deadline = time.monotonic() + 10
    while seen < expected_predictions(total, window, interval) and time.monotonic() < deadline:
        seen += predictions.get_message(timeout=0.2) is not None
    predictions.close()
    return judge(rows, total, window, interval, seen)


def judge(rows: list, total: int, window: int, interval: int, seen: int) -> dict:
    base, end = rows[max(0, len(rows) // 4 - 1)], rows[-1]
    rss0, rss1 = sum(base["rss_mb"].values()), sum(end["rss_mb"].values())
    want = expected_predictions(total, window, interval)
    problems = []
    if end["accepted"] != total:
        problems.append(f"accepted {end['accepted']} of {total} samples")
    if end["inferences"] != want or seen != want:
        problems.append(f"{end['inferences']} predictions counted, {seen} published; the data implies {want}")
    if rss1 - rss0 > max(8.0, 0.05 * rss0):
        problems.append(f"resident memory grew from {rss0:.1f} to {rss1:.1f} MB")
    if end["fds"] != base["fds"]:
        problems.append(f"open files changed: {base['fds']} -> {end['fds']}")
    if end["redis_connections"] != base["redis_connections"]:
        problems.append(f"Redis connections changed: {base['redis_connections']} -> {end['redis_connections']}")
    return {"ok": not problems, "problems": problems, "samples": total, "predictions": want, "published": seen,
            "rss_mb": (round(rss0, 1), round(rss1, 1)), "fds": (base["fds"], end["fds"]),
            "redis_connections": (base["redis_connections"], end["redis_connections"]),
            "wall_s": round(end["wall_s"], 1), "rows": rows}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    import redis

    work = Path(tempfile.mkdtemp(prefix="nilmd-soak-"))
    port = _free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL)
    daemon = None
    try:
        client = redis.Redis(port=port)
        _wait(lambda: _ping(client), 10, "redis-server")
        building = "soak"
        env = {**os.environ, "REDIS_PORT": str(port), "REDIS_HOST": "127.0.0.1", "BUILDING_ID": building,
               "MODEL_DIR": args.model_dir, "WINDOW_SIZE": str(args.window),
               "INFERENCE_INTERVAL": str(args.interval), "NILMD_INPUT_MODE": "stream",
               "NILMD_RUNTIME_DIR": str(work), "NILMD_STATE_DIR": str(work / "state"),
               "NILMD_STATUS_INTERVAL": "0.5", "NILMD_THREADS": str(args.threads)}
        with open(work / "daemon.log", "wb") as out:
            daemon = subprocess.Popen([sys.executable, "-m", "nilmd", "run"], env=env, cwd=ROOT, stdout=out,
                                      stderr=subprocess.STDOUT)
            _wait(lambda: _status(client, building).get("input_connected") == "1", 120, "the daemon to start")
            print(f"soak: {hours:g} h of 1 Hz data, window {args.window}, interval {args.interval}, "
                  f"models from {args.model_dir}")
            report = drive(client, building, hours, args.window, args.interval)
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(30)
        print(f"\nsamples {report['samples']}, predictions {report['predictions']} (published {report['published']}), "
              f"{report['wall_s']} s; rss {report['rss_mb'][0]} -> {report['rss_mb'][1]} MB, "
              f"fds {sum(report['fds'][0].values())} -> {sum(report['fds'][1].values())}, "
              f"redis connections {report['redis_connections'][0]} -> {report['redis_connections'][1]}; "
              f"daemon exit {code}")
        for p in report["problems"]:
            print(f"FAIL: {p}")
        return 0 if report["ok"] and code == 0 else 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def _ping(client) -> bool:
    try:
        return client.ping()
    except Exception:  # not up yet
        return False


if __name__ == "__main__":
    sys.exit(main())
