"""The soak's library (scripts/soak.py is its command line; tests/test_soak.py runs `drive` on
three hours of data in CI): days of 1 Hz simulated meter data through the real daemon on a
stream, as fast as it keeps up, checked for miscounts and for growth.

`drive` XADDs the simulated building's samples a chunk at a time (an hour, or an eighth of a
short run), waits until the daemon has read every sample and made every prediction the data
implies, and then measures the resident memory of each daemon process, their open file
descriptors, and the daemon's Redis connections. `judge` fails the run unless, at the end:
  * samples accepted == samples sent, and predictions (counted by the daemon and, separately, on
    the predictions channel) == what the contract's schedule implies (docs/CONTRACT.md §4:
    1 + (samples - window - w) // interval, the first window w samples after the first full one
    so that it closes an interval of the clock), exactly;
  * total resident memory grew by at most max(8 MB, 5 %) after the first quarter of the run
    (the warm-up: first windows, allocator pools), and file descriptors and Redis connections
    did not change at all.
Pacing by chunks is deliberate: the soak proves "no leak, no miscount" over a long run, not
the throughput limit (scripts/bench.py measures that).

Like nilmd.testing, which it uses, the daemon never imports it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from nilmd import keys, testing
from nilmd.daemon import streams
from nilmd.producer import simulated_samples


def expected_predictions(n: int, window: int, interval: int, start: float) -> int:
    """Predictions n unbroken samples from second `start` imply, written from docs/CONTRACT.md
    §4 rather than taken from nilmd.schedule, so that a wrong schedule shows as a miscount."""
    t = int(start) + window - 1  # the second of the window-th sample
    w = (-(t + 1)) % interval
    return 1 + (n - window - w) // interval if n >= window + w else 0


def measure(client, status: dict) -> dict:
    procs = testing.role_processes(status)
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
        want = expected_predictions(sent, window, interval, start)
        status = testing.wait_for(lambda: (lambda s: s if int(s.get("samples_received", -1)) == sent
                                and int(s.get("inferences", -1)) >= want else None)(testing.status(client, building)),
                                   timeout_per_chunk, f"{sent} samples and {want} predictions", not_yet=())
        while predictions.get_message(timeout=0.0) is not None:
            seen += 1
        row = {"hours": sent / 3600, "wall_s": time.monotonic() - t0, "accepted": int(status["samples_accepted"]),
               "inferences": int(status["inferences"]), **measure(client, status)}
        rows.append(row)
        log(f"{row['hours']:8.2f} h  {row['wall_s']:7.1f} s  predictions {row['inferences']:6d}  "
            f"rss {sum(row['rss_mb'].values()):7.1f} MB ({', '.join(f'{r} {v:.1f}' for r, v in row['rss_mb'].items())})"
            f"  fds {sum(row['fds'].values()):3d}  redis connections {row['redis_connections']}")
    testing.wait_for(lambda: (lambda s: int(s["inferences"]) == expected_predictions(total, window, interval, start))(
        testing.status(client, building)), 30, "the last prediction", not_yet=())
    deadline = time.monotonic() + 10
    while seen < expected_predictions(total, window, interval, start) and time.monotonic() < deadline:
        seen += predictions.get_message(timeout=0.2) is not None
    predictions.close()
    return judge(rows, total, window, interval, seen, start)


def judge(rows: list, total: int, window: int, interval: int, seen: int, start: float) -> dict:
    base, end = rows[max(0, len(rows) // 4 - 1)], rows[-1]
    rss0, rss1 = sum(base["rss_mb"].values()), sum(end["rss_mb"].values())
    want = expected_predictions(total, window, interval, start)
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
    return {"ok": not problems, "problems": problems, "samples": total, "start": start, "predictions": want,
            "published": seen,
            "rss_mb": (round(rss0, 1), round(rss1, 1)), "fds": (base["fds"], end["fds"]),
            "redis_connections": (base["redis_connections"], end["redis_connections"]),
            "wall_s": round(end["wall_s"], 1), "rows": rows}


def run(hours: float, window: int, interval: int, model_dir: str, threads: int, log=print) -> tuple[dict, int]:
    """The whole soak: its own redis-server (a free port, a temporary directory) and `nilmd run`
    with `--input-mode stream`, driven for `hours`; returns the report and the daemon's exit code."""
    work = Path(tempfile.mkdtemp(prefix="nilmd-soak-"))
    try:
        with testing.RedisServer(testing.free_port(), work) as server, server.client() as client:
            building = "soak"
            env = {**os.environ, "REDIS_PORT": str(server.port), "REDIS_HOST": "127.0.0.1", "BUILDING_ID": building,
                   "MODEL_DIR": model_dir, "WINDOW_SIZE": str(window), "INFERENCE_INTERVAL": str(interval),
                   "NILMD_INPUT_MODE": "stream", "NILMD_RUNTIME_DIR": str(work), "NILMD_STATE_DIR": str(work / "state"),
                   "NILMD_STATUS_INTERVAL": "0.5", "NILMD_THREADS": str(threads)}
            daemon = testing.DaemonProcess(building, work / "daemon.log", env).start()
            try:
                testing.wait_for(lambda: daemon.status(client).get("input_connected") == "1", 120,
                                 "the daemon to start", not_yet=())
                log(f"soak: {hours:g} h of 1 Hz data, window {window}, interval {interval}, models from {model_dir}")
                report = drive(client, building, hours, window, interval, log=log)
                return report, daemon.stop(timeout=30)
            finally:
                if daemon.proc.poll() is None:  # a failed run: the daemon goes before its Redis does
                    daemon.stop(signal.SIGKILL)
    finally:
        shutil.rmtree(work, ignore_errors=True)
