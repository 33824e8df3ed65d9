"""The many-building half of scripts/bench.py (`--buildings N[,N...]`): one nilmd serving N
buildings at 1 Hz, in real time, against a private redis-server, a prediction every 60 s each.

Per N:
  1. N ring snapshots in the daemon's state directory (a window and an interval of samples each,
     the newest one second ago, the last window marked as predicted), so that it starts warm, as
     after a restart, instead of waiting 26 minutes for its windows;
  2. the daemon, BUILDING_IDS=@file, NILMD_RING_CAPACITY = 2 x the window, until READY;
  3. a producer process PUBLISHes one sample per building per second, stamped with that second
     and sent at it (one pipeline a second, as if every meter sent on the second), for --minutes;
  4. this process PSUBSCRIBEs nilm:*:predictions and times each prediction from its window's
     newest second (the producer sends that sample during that second: the latency counts the
     producer's own sending time too);
  5. at the end every building's status hash is read: samples received = published since the
     start, accepted = received, none rejected or lost, and the predictions each received.
The first interval boundary after the start is reported apart: there the daemon computes every
building's first full window (nothing to continue yet), later boundaries are incremental steps.
Memory: RSS and PSS of every nilmd process at the end. CPU: each process's CPU time over the
steady boundaries, as % of one core and per building.

--adapted-fraction F: that fraction of the buildings (spread over the list) each gets an adapted
set in the state directory before the start, a perturbed copy of every shipped model
(nilmd.testing.write_adaptation), so each is a model set of its own (nilmd.models.fleet.AdaptedFleet);
the latency is then also reported for the adapted and the shipped buildings apart, and every
adapted building's predictions must say so.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
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
from nilmd.testing import DaemonProcess, RedisServer, daemon_processes, free_port, wait_for  # noqa: E402

PUBSUB_LIMIT = "pubsub 512mb 256mb 60"  # N predictions at once to one subscriber (this benchmark's)


def ids(n: int) -> list[str]:
    return [f"b{k:05d}" for k in range(n)]


def trace(n: int, seed: int) -> np.ndarray:
    """A plausible whole-house power trace (W)."""
    rng = np.random.default_rng(seed)
    base = np.abs(np.cumsum(rng.normal(0, 30, n)) + 400)
    kettle = 2000.0 * ((np.arange(n) + seed * 97) % 1800 < 120)
    return (base + kettle).astype(np.float64)


def write_snapshots(state_dir: Path, buildings: list[str], window: int, interval: int, now: int) -> None:
    from nilmd.daemon import snapshot
    from nilmd.features import derive

    n = window + interval
    ts = now - n + np.arange(n, dtype=np.float64)  # newest: now - 1
    # The newest window in the snapshot that closes a clock interval counts as predicted: the
    # daemon's next window is then the first live one (nilmd.schedule).
    last_end = float((now - 1) - ((now - 1) + 1) % interval)
    state_dir.mkdir(parents=True, exist_ok=True)
    for k, b in enumerate(buildings):
        feats = derive(trace(n, k))
        snap = snapshot.Snapshot(ts=ts, flags=np.zeros(n, np.uint8), features=feats, created=float(now),
                                 window_end_ts=last_end, position=None, arrived=time.time())
        snapshot.write_atomic(str(state_dir / f"nilmd-{b}.snapshot"), snapshot.encode(snap))


def produce(port: int, buildings: list[str], start: int, seconds: int, stream: bool, done) -> None:
    """The meters: sample `start + i` of every building PUBLISHed (or XADDed) during second start + i."""
    import redis

    from nilmd.daemon import streams

    r = redis.Redis(port=port)
    channels = [keys.input_channel(b).encode() for b in buildings]
    power = np.stack([trace(seconds + 1, k)[1:] for k in range(len(buildings))])  # [N, seconds]
    late = 0.0
    for i in range(seconds):
        t = start + i
        time.sleep(max(0.0, t - time.time()))
        late = max(late, time.time() - t)
        pipe = r.pipeline(transaction=False)
        for b, c, p in zip(buildings, channels, power[:, i]):
            text = b'{"timestamp":%d,"power_total":%.1f}' % (t, p)
            if stream:
                streams.add(pipe, b, text)
            else:
                pipe.publish(c, text)
        pipe.execute()
    done.put({"seconds": seconds, "late_s": round(late, 3)})


def adapted_ones(buildings: list[str], fraction: float) -> list[str]:
    """floor(n x fraction) of the buildings, evenly spread over the list."""
    return [b for k, b in enumerate(buildings) if int((k + 1) * fraction) > int(k * fraction)]


def write_adaptations(state_dir: Path, buildings: list[str], model_dir: str) -> None:
    from nilmd.appliances import APPLIANCES, checkpoint_filename
    from nilmd.testing import write_adaptation

    shipped = [a for a in APPLIANCES if (Path(model_dir) / checkpoint_filename(a)).exists()]
    for k, b in enumerate(buildings):
        write_adaptation(state_dir, b, model_dir, shipped, on_shift=0.1 + 0.01 * k)


def bench_buildings(model_dir: str, n: int, minutes: int, window: int = 1536, interval: int = 60,
                    input_mode: str = "pubsub", threads: int = 1, adapted_fraction: float = 0.0) -> dict:
    import psutil

    work = Path(tempfile.mkdtemp(prefix=f"nilmd-bench-{n}-"))
    server = RedisServer(free_port(), work)
    buildings = ids(n)
    (work / "buildings.list").write_text("\n".join(buildings) + "\n")
    adapted = set(adapted_ones(buildings, adapted_fraction))
    out = {"buildings": n, "input_mode": input_mode, "minutes": minutes, "adapted_buildings": len(adapted)}
    try:
        server.start()
        r = server.client()
        r.config_set("client-output-buffer-limit", PUBSUB_LIMIT)
        now = int(time.time())
        write_snapshots(work / "state", buildings, window, interval, now)
        write_adaptations(work / "state", sorted(adapted), model_dir)
        args = ["--redis-host", "127.0.0.1", "--redis-port", str(server.port), "--model-dir", model_dir,
                "--building-ids", f"@{work / 'buildings.list'}", "--ring-capacity", str(2 * window),
                "--input-mode", input_mode, "--threads", str(threads), "--backend", "torch",
                "--runtime-dir", str(work / "run"), "--state-dir", str(work / "state"), "--log-level", "warning"]
        (work / "run").mkdir()
        d = DaemonProcess(buildings[0], work / "daemon.log", args=args).start()
        try:
            def ready():
                if d.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited with {d.proc.returncode}: {d.log()[-2000:]}")
                return all(r.hget(keys.status_key(b), "state") not in (None, b"starting") for b in buildings[::97])
            wait_for(ready, 600, "every building READY", interval=0.2, not_yet=())
            out["start_to_ready_s"] = round(time.monotonic() - d.started_at, 1)
            sub = r.pubsub(ignore_subscribe_messages=True)
            sub.psubscribe("nilm:*:predictions")
            start = int(time.time()) + 2
            # from the first live boundary to the end of the last: `minutes` boundaries
            first_end = start + (-(start + 1)) % interval  # the first second that closes an interval
            seconds = first_end - start + 1 + (minutes - 1) * interval + 1
            done = mp.get_context("spawn").Queue()
            producer = mp.get_context("spawn").Process(target=produce, args=(server.port, buildings, start, seconds,
                                                                              input_mode == "stream", done))
            producer.start()
            latencies: dict[int, list[float]] = {}
            by_kind = {True: [], False: []}  # steady latencies of the adapted buildings and of the others
            flagged = set()  # buildings whose predictions say adapted
            got = {b: 0 for b in buildings}
            procs = daemon_processes(d.status(r), d.proc.pid)
            others = {"redis-server": psutil.Process(server.proc.pid), "producer": psutil.Process(producer.pid),
                      "this benchmark": psutil.Process()}
            cpu0 = t0 = None
            deadline = start + seconds + 30
            expected = minutes * n
            while sum(got.values()) < expected and time.time() < deadline:
                msg = sub.get_message(timeout=0.5)
                if msg is None or msg["type"] != "pmessage":
                    continue
                recv = time.time()
                p = json.loads(msg["data"])
                end = int(p["window_end"])
                building = msg["channel"].decode().split(":")[1]
                got[building] += 1
                latencies.setdefault(end, []).append(recv - end)
                if end != first_end:
                    by_kind[building in adapted].append(recv - end)
                if any(e.get("adapted") for e in p["predictions"]):
                    flagged.add(building)
                if cpu0 is None and end == first_end and len(latencies[end]) == n:  # steady from here
                    cpu0 = {k: sum(proc.cpu_times()[:2]) for k, proc in {**procs, **others}.items()}
                    t0 = time.monotonic()
            elapsed = time.monotonic() - t0 if t0 else math.nan
            cpu = {k: sum(proc.cpu_times()[:2]) - cpu0[k] for k, proc in procs.items()} if cpu0 else {}
            cpu_others = {k: sum(proc.cpu_times()[:2]) - cpu0[k] for k, proc in others.items()} if cpu0 else {}
            producer.join(60)
            out["producer"] = done.get(timeout=5) if not done.empty() else {"error": "no report"}
            boundaries = sorted(latencies)
            first = np.asarray(latencies.get(first_end, [math.nan]))
            steady = np.concatenate([latencies[e] for e in boundaries if e != first_end] or [[math.nan]])
            out["first_boundary_s"] = {"median": round(float(np.median(first)), 3), "max": round(float(first.max()), 3),
                                       "n": int(first.size)}
            out["latency_s"] = {"median": round(float(np.median(steady)), 3),
                                "p99": round(float(np.percentile(steady, 99)), 3), "max": round(float(steady.max()), 3),
                                "n": int(steady.size)}
            # each boundary apart: a slow one shows as a row here, where the p99 only says "some"
            out["boundaries"] = {int(e): {"median": round(float(np.median(latencies[e])), 3),
                                          "max": round(float(np.max(latencies[e])), 3), "n": len(latencies[e])}
                                 for e in boundaries}
            out["predictions"] = {"received": sum(got.values()), "expected": expected,
                                  "buildings_short": sum(v < minutes for v in got.values()),
                                  "adapted_as_expected": flagged == adapted}
            if adapted:
                out["latency_by_set_s"] = {kind: {"median": round(float(np.median(v)), 3),
                                                  "p99": round(float(np.percentile(v, 99)), 3), "n": len(v)}
                                           for kind, v in (("adapted", by_kind[True]), ("shipped", by_kind[False])) if v}
            # every sample accounted for, per building, once the status hashes have caught up
            def counts():
                pipe = r.pipeline(transaction=False)
                for b in buildings:
                    pipe.hmget(keys.status_key(b), "samples_received", "samples_accepted", "samples_rejected",
                               "input_samples_lost")
                return np.asarray([[int(v or -1) for v in row] for row in pipe.execute()])

            try:
                wait_for(lambda: (counts()[:, 0] >= seconds).all(), 60, "every building's status to count every "
                         "sample published", interval=0.5, not_yet=())
            except AssertionError as e:
                print(f"warning: {e}", file=sys.stderr)
            rows = counts()
            out["samples"] = {"published_each": seconds, "received_short": int((rows[:, 0] < seconds).sum()),
                              "accepted_short": int((rows[:, 1] < rows[:, 0]).sum()),
                              "rejected": int(rows[:, 2].clip(0).sum()), "lost": int(rows[:, 3].clip(0).sum())}
            mem = {}
            for k, proc in procs.items():
                info = proc.memory_full_info()
                mem[k] = {"rss_mb": round(info.rss / 2**20, 1), "pss_mb": round(info.pss / 2**20, 1)}
            out["memory"] = {"processes": mem, "rss_mb": round(sum(v["rss_mb"] for v in mem.values()), 1),
                             "pss_mb": round(sum(v["pss_mb"] for v in mem.values()), 1)}
            out["cpu_percent"] = {k: round(100 * v / elapsed, 1) for k, v in cpu.items()}
            out["cpu_ms_per_building_per_minute"] = round(sum(cpu.values()) / elapsed * 60 * 1e3 / n, 2) if cpu else None
            out["cpu_percent_others"] = {k: round(100 * v / elapsed, 1) for k, v in cpu_others.items()}
        finally:
            try:
                d.stop(timeout=60)
            except AssertionError as e:
                print(f"warning: {e}", file=sys.stderr)
            out["daemon_log_tail"] = d.log()[-1500:]
        r.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    out["load_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def table(rows: list[dict]) -> str:
    lines = ["| buildings (adapted) | input | first boundary (max) | latency median / p99 / max | predictions | samples short / "
             "rejected / lost | RSS (PSS), all processes | CPU per building | load at end |",
             "|---|---|---|---|---|---|---|---|---|"]
    for o in rows:
        lat, first, s, p, m = o["latency_s"], o["first_boundary_s"], o["samples"], o["predictions"], o["memory"]
        lines.append(f"| {o['buildings']:,} ({o['adapted_buildings']:,}) | {o['input_mode']} | {first['max']:.2f} s | {lat['median']:.2f} / "
                     f"{lat['p99']:.2f} / {lat['max']:.2f} s | {p['received']:,} of {p['expected']:,} | "
                     f"{s['received_short']} / {s['rejected']} / {s['lost']} | {m['rss_mb']:,.0f} MB ({m['pss_mb']:,.0f}) | "
                     f"{o['cpu_ms_per_building_per_minute']} ms CPU a minute | {o['load_end'][0]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--buildings", default="1000", help="comma list of building counts")
    ap.add_argument("--minutes", type=int, default=3, help="prediction boundaries per count (the first is apart)")
    ap.add_argument("--model-dir", default=str(ROOT / "checkpoints"))
    ap.add_argument("--input-mode", default="pubsub", choices=("pubsub", "stream"))
    ap.add_argument("--adapted-fraction", type=float, default=0.0, help="fraction of the buildings with an adapted "
                    "set of their own (a perturbed copy of the shipped models)")
    ap.add_argument("--json")
    a = ap.parse_args()
    results = []
    for count in [int(x) for x in a.buildings.split(",")]:
        print(f"{count} buildings ...", file=sys.stderr)
        results.append(bench_buildings(a.model_dir, count, a.minutes, input_mode=a.input_mode,
                                       adapted_fraction=a.adapted_fraction))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "daemon_log_tail"}), file=sys.stderr)
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
