"""The daemon half of scripts/bench.py: `nilmd run` against a private redis-server (start to
READY, an ingest burst, end-to-end latency at 1 Hz, CPU and memory per process), per backend."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nilmd import keys  # noqa: E402
from nilmd.testing import (DaemonProcess, RedisServer, daemon_processes, free_port, role_processes,  # noqa: E402
                           wait_for)


def stats(ms: list[float], cpu: list[float] | None = None) -> dict:
    a = np.asarray(ms)
    out = {"median_ms": round(float(np.median(a)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3), "n": len(a)}
    if cpu:
        out["cpu_median_ms"] = round(float(np.median(cpu)), 3)
    return out


def window_features(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.abs(np.cumsum(rng.normal(0, 100, n)) + 1500)
    return np.stack([p, 0.3 * p, p / 230.0, 1.05 * p, np.ones(n)], axis=1).astype(np.float32)


class Daemon(DaemonProcess):
    def __init__(self, port: int, model_dir: str, work: Path, name: str, interval: int, threads: int,
                 device: str, backend: str):
        b = f"bench{name}{backend[:4]}{os.getpid()}"
        args = ["--redis-host", "127.0.0.1", "--redis-port", str(port), "--model-dir", model_dir,
                "--building-id", b, "--inference-interval", str(interval), "--threads", str(threads),
                "--device", device, "--backend", backend, "--runtime-dir", str(work), "--state-dir", str(work / f"state-{name}"),
                "--status-interval", "0.2", "--log-level", "warning"]
        super().__init__(b, work / f"{name}-{backend}.log", args=args)
        self.start()

    def ready_s(self, r) -> float:
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}; see {self.log_path}")
            return self.status(r).get("state", "starting") not in ("starting", "")
        wait_for(ready, 120, "READY", interval=0.01, not_yet=())
        return time.monotonic() - self.started_at

    def processes(self, r) -> dict:
        return role_processes(self.status(r))

    def memory(self, r) -> dict:
        out = {}
        for role, proc in daemon_processes(self.status(r), self.proc.pid).items():  # every process of it
            info = proc.memory_full_info()  # PSS needs /proc/PID/smaps: our own processes
            out[role] = {"rss_mb": round(info.rss / 2**20, 1), "pss_mb": round(info.pss / 2**20, 1)}
        out["total"] = {k: round(sum(v[k] for v in out.values()), 1) for k in ("rss_mb", "pss_mb")}
        return out

    def cpu_seconds(self, r) -> dict:
        return {role: sum(proc.cpu_times()[:2]) for role, proc in self.processes(r).items()}

    def stop(self):
        try:
            super().stop(timeout=30)
        except AssertionError as e:  # killed: the timings taken so far still stand
            print(f"warning: {e}", file=sys.stderr)


def publish(r, b: str, ts: np.ndarray, power: np.ndarray, batch: int = 2000) -> None:
    channel = keys.input_channel(b)
    for i in range(0, len(ts), batch):
        pipe = r.pipeline(transaction=False)
        for t, p in zip(ts[i:i + batch], power[i:i + batch]):
            pipe.publish(channel, f'{{"timestamp":{t:.1f},"power_total":{p:.1f}}}')
        pipe.execute()


def bench_daemon(model_dir: str, size: int, threads: int, e2e_seconds: int, ingest_samples: int,
                 device: str, backend: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="nilmd-bench-"))
    server = RedisServer(free_port(), work)
    port, r = server.port, server.client()  # a client connects at its first command
    out = {}
    try:
        server.start()
        # 1. start -> READY, then the ingest burst (INFERENCE_INTERVAL=60, the default)
        d = Daemon(port, model_dir, work, "ingest", 60, threads, device, backend)
        try:
            out["start -> READY"] = {"median_ms": round(d.ready_s(r) * 1e3, 1), "n": 1}
            from nilmd.daemon.ringbuffer import RingBuffer

            n = ingest_samples
            ts = np.floor(time.time()) - n - 10 + np.arange(n)
            ring = RingBuffer.attach(str(work / f"nilmd-{d.building}.ring"))  # its head counts what is in
            try:
                base = ring.counters()[0]
                t = time.monotonic()
                publish(r, d.building, ts, window_features(n)[:, 0])
                sent = time.monotonic() - t
                wait_for(lambda: ring.counters()[0] - base >= n, 120, "the ingest burst", interval=0.001, not_yet=())
                took = time.monotonic() - t
            finally:
                ring.close()
            out["ingest"] = {"samples_per_s": round(n / took), "n": n, "publish_s": round(sent, 2)}
        finally:
            d.stop()
        # 2. end-to-end at 1 Hz (INFERENCE_INTERVAL=1) and memory after warm-up
        d = Daemon(port, model_dir, work, "e2e", 1, threads, device, backend)
        try:
            d.ready_s(r)
            sub = r.pubsub(ignore_subscribe_messages=True)
            sub.subscribe(keys.predictions_channel(d.building))
            now = np.floor(time.time())
            publish(r, d.building, now - size + np.arange(size), window_features(size)[:, 0])  # fill the window
            wait_for(lambda: sub.get_message(timeout=0.1), 60, "the first prediction", interval=0.01, not_yet=())
            lat, power = [], window_features(e2e_seconds, seed=1)[:, 0]
            cpu0, t_cpu = d.cpu_seconds(r), time.monotonic()
            for i in range(e2e_seconds):
                ts = np.floor(time.time()) + 1
                time.sleep(max(0.0, ts - time.time()))  # on the second, like a meter
                while sub.get_message(timeout=0):  # drop anything older
                    pass
                t = time.perf_counter()
                r.publish(keys.input_channel(d.building), f'{{"timestamp":{ts:.1f},"power_total":{power[i]:.1f}}}')
                while True:
                    msg = sub.get_message(timeout=2.0)
                    if msg is None:
                        raise RuntimeError(f"no prediction for the sample at {ts}")
                    if json.loads(msg["data"])["window_end"] >= ts:
                        lat.append((time.perf_counter() - t) * 1e3)
                        break
            out["end-to-end at 1 Hz"] = stats(lat)
            elapsed = time.monotonic() - t_cpu
            out["cpu_percent_at_1hz"] = {k: round(100 * (v - cpu0.get(k, 0.0)) / elapsed, 2)
                                         for k, v in d.cpu_seconds(r).items()}
            out["memory"] = d.memory(r)
            out["inference_ms_daemon"] = float(d.status(r).get("last_inference_ms", "nan"))
            out["backend_serving"] = d.status(r).get("backend")
        finally:
            d.stop()
    finally:
        r.close()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out
