#!/usr/bin/env python3
"""Time to first prediction after a restart, cold and warm (the numbers in docs/PERFORMANCE.md).

    python scripts/restart_time.py [--model-dir checkpoints] [--window 1536] [--interval 60]

A private redis-server; a meter at 1 Hz in real time (to the channel and the stream, after an
accelerated hour of history that ends now). For each case the daemon is started, and we time
from `nilmd run` to (a) a full window (status buffer_fill == window) and (b) the first
prediction. A restart resumes the old schedule, so (b) also includes the wait for the next
scheduled window end (0..interval s, as if the daemon had never stopped).

  cold, pub/sub      no snapshot, no stream: the window fills from live data (window s at 1 Hz)
  warm, pub/sub      restarted with SIGTERM: the ring snapshot it wrote then is restored
  warm, stream       restarted, snapshot deleted: the window is read back from the stream
  first start, stream  no earlier run: the newest window of the stream, predicted at once
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nilmd import keys  # noqa: E402
from nilmd.daemon import streams  # noqa: E402
from nilmd.producer import simulated_samples  # noqa: E402
from nilmd.testing import DaemonProcess, RedisServer, free_port, status, wait_for  # noqa: E402


class Meter(threading.Thread):
    """An hour of history at once, then one sample a second, to the channel and the stream."""

    def __init__(self, client, building: str):
        super().__init__(daemon=True)
        self.client, self.building, self.stop = client, building, threading.Event()
        now = int(time.time())
        self.samples = simulated_samples(1, now - 3600, None, "full")

    def send(self, n: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for _ in range(n):
            text = json.dumps(next(self.samples))
            pipe.publish(keys.input_channel(self.building), text)
            streams.add(pipe, self.building, text)
        pipe.execute()

    def run(self) -> None:
        self.send(3600)
        t = time.time()
        while not self.stop.is_set():
            t += 1.0
            time.sleep(max(0.0, t - time.time()))
            self.send(1)


def run_case(name, client, env, work, window: int, timeout: float) -> dict:
    building = env["BUILDING_ID"]
    sub = client.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(keys.predictions_channel(building))
    t0 = time.monotonic()
    daemon = DaemonProcess(building, work / (name.replace("/", "").replace(" ", "_") + ".log"), env).start()
    full = first = None
    client.hset(keys.status_key(building), "buffer_fill", 0)
    deadline = t0 + timeout
    while time.monotonic() < deadline and first is None:
        if full is None and status(client, building).get("buffer_fill") == str(window):
            full = time.monotonic() - t0
        if sub.get_message(timeout=0.1) is not None:
            first = time.monotonic() - t0
    daemon.stop(timeout=30)
    sub.close()
    return {"case": name, "window_full_s": full, "first_prediction_s": first}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(ROOT / "checkpoints"))
    parser.add_argument("--window", type=int, default=1536)
    parser.add_argument("--interval", type=int, default=60)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nilmd-restart-"))
    server = RedisServer(free_port(), work).start()
    client = server.client()
    base = {**os.environ, "REDIS_PORT": str(server.port), "REDIS_HOST": "127.0.0.1", "MODEL_DIR": args.model_dir,
            "WINDOW_SIZE": str(args.window), "INFERENCE_INTERVAL": str(args.interval),
            "NILMD_RUNTIME_DIR": str(work), "NILMD_STATE_DIR": str(work / "state"), "NILMD_STATUS_INTERVAL": "0.2"}
    results = []
    try:
        for mode in ("pubsub", "stream"):
            env = {**base, "BUILDING_ID": f"restart-{mode}", "NILMD_INPUT_MODE": mode}
            meter = Meter(client, env["BUILDING_ID"])
            meter.start()
            wait_for(lambda: client.xlen(keys.input_stream(env["BUILDING_ID"])) >= 3600, 60,
                     "the accelerated hour of history in Redis")
            if mode == "stream":
                results.append(run_case("first start, stream", client, env, work, args.window, 120))
                os.unlink(work / "state" / f"nilmd-{env['BUILDING_ID']}.snapshot")
                results.append(run_case("warm, stream (no snapshot)", client, env, work, args.window, 180))
            else:
                # Cold: only live data can fill the window; no need to wait window seconds to know it.
                results.append({"case": "cold, pub/sub", "window_full_s": None, "first_prediction_s": None})
                # A daemon that has been running a while (here: reading its window from the stream),
                # stopped with SIGTERM: it leaves a snapshot with a full window.
                run_case("(running a while)", client, {**env, "NILMD_INPUT_MODE": "stream"}, work, args.window, 120)
                results.append(run_case("warm, pub/sub (snapshot)", client, env, work, args.window, 180))
            meter.stop.set()
            meter.join()
    finally:
        server.stop()
    for r in results:
        print(f"{r['case']:28s} window full after {_fmt(r['window_full_s'])}, first prediction after "
              f"{_fmt(r['first_prediction_s'])}")
    print(f"(cold, pub/sub: the window fills from live data only: {args.window} s at 1 Hz plus the start)")
    return 0


def _fmt(seconds) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


if __name__ == "__main__":
    sys.exit(main())
