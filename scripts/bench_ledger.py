#!/usr/bin/env python3
"""What counting energy and events costs per prediction (docs/PERFORMANCE.md; the ledger:
docs/DESIGN.md §11): the ledger's round trip (run tracker + its scripts) against the prediction's own
pipeline, on a private redis-server (or, with --cluster, a private Redis Cluster of three masters
and three replicas: docs/OPERATIONS.md, "Redis Cluster"), 11 appliances.

    .venv/bin/python scripts/bench_ledger.py [--n 2000] [--cluster]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nilmd import keys, redisconn  # noqa: E402
from nilmd.appliances import APPLIANCES  # noqa: E402
from nilmd.config import Config  # noqa: E402
from nilmd.daemon.ledger import Ledger  # noqa: E402
from nilmd.testing import RedisCluster, RedisServer, free_port  # noqa: E402


def prediction(window_end: float, k: int) -> dict:
    on = k % 7 < 3  # runs of three intervals, pauses of four: every appliance starts and ends a run
    return {"timestamp": window_end, "window_start": window_end - 1536, "window_end": window_end,
            "total_power": 5000.0, "inference_time_ms": 1.0,
            "predictions": [{"appliance": a, "power_watts": 500.0 if on else 0.0, "probability": 0.8 if on else 0.1,
                             "is_on": on, "confidence": 0.6} for a in APPLIANCES]}


def ms(samples: list[float]) -> str:
    samples = sorted(samples)
    return f"{samples[len(samples) // 2]:.3f} | {samples[int(len(samples) * 0.99)]:.3f}"


def commandstats(client, cluster: bool) -> list[dict]:
    """INFO commandstats of the server, or of every master of the cluster."""
    if not cluster:
        return [client.info("commandstats")]
    return [node.redis_connection.info("commandstats") for node in client.get_primaries()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="predictions per measurement")
    parser.add_argument("--cluster", action="store_true", help="on a Redis Cluster instead of one redis-server")
    args = parser.parse_args()
    n = args.n
    with tempfile.TemporaryDirectory() as work, (RedisCluster(Path(work)) if args.cluster
                                                 else RedisServer(free_port(), Path(work))) as server:
        client = redisconn.client(Config(redis_host="127.0.0.1", redis_port=server.port, redis_cluster=args.cluster),
                                  name="bench")
        cfg = Config(building_id="bench", inference_interval=60, timezone="UTC")
        ledger, t0 = Ledger(cfg), 1704261600.0
        counted, plain = [], []
        cpu = {"plain": 0.0, "ledger": 0.0}  # this process's CPU (the client's side), s
        for k in range(n):
            p = prediction(t0 + 60 * k, k)
            text = json.dumps(p, separators=(",", ":"))
            start, cpu0 = time.perf_counter(), time.process_time()
            pipe = client.pipeline(transaction=False)
            redisconn.publish(pipe, keys.predictions_channel("bench"), text)
            pipe.set(keys.latest_key("bench"), text)
            pipe.hset(keys.status_key("bench"), mapping={"last_window_end": p["window_end"]})
            pipe.execute()
            plain.append((time.perf_counter() - start) * 1000)
            cpu["plain"] += time.process_time() - cpu0
            start, cpu0 = time.perf_counter(), time.process_time()
            if ledger.state is None:
                ledger.load(client)
            pipe = client.pipeline(transaction=False)
            ledger.queue(pipe, p, text)
            error, dropped = ledger.settle(pipe.execute(raise_on_error=False))
            assert error is None and not dropped, error
            counted.append((time.perf_counter() - start) * 1000)
            cpu["ledger"] += time.process_time() - cpu0
        per_entry = client.memory_usage(keys.predictions_stream("bench")) / client.xlen(keys.predictions_stream("bench"))
        redis_us = sum(info.get("cmdstat_eval", {}).get("usec", 0) for info in commandstats(client, args.cluster)) / n
        client.close()
    print(f"{'Redis Cluster (3 masters, 3 replicas)' if args.cluster else 'one redis-server'}, "
          f"load average {open('/proc/loadavg').read().split()[0]}\n")
    print("| per prediction | median ms | p99 ms | client CPU ms |\n|---|---:|---:|---:|")
    print(f"| PUBLISH + SET + HSET (the prediction) | {ms(plain)} | {cpu['plain'] / n * 1000:.3f} |")
    print(f"| the ledger: run tracker + its scripts | {ms(counted)} | {cpu['ledger'] / n * 1000:.3f} |")
    print(f"\nRedis's own CPU for the ledger's scripts (INFO commandstats): {redis_us:.0f} us per prediction")
    print(f"history stream: {per_entry:.0f} bytes of Redis memory per prediction ({n} predictions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
