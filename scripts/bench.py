#!/usr/bin/env python3
"""nilmd benchmark: model timings, the real daemon against a real Redis, memory, and the
hardware limit, on this machine in one run.

    python scripts/bench.py                       # everything, shipped checkpoints
    python scripts/bench.py --json bench.json     # also write the results as JSON
    python scripts/bench.py --no-daemon           # model timings only (no redis-server needed)
    python scripts/bench.py --backends torch      # torch only (default: torch and onnxruntime)

Rows (median and p99 of wall time; cpu = this process's CPU time, which a busy machine inflates
less than wall time):
  full window, per-model loop   every model alone on the window (the original service's way)
  full window, fused            Predictor.step after reset(): one fused network, all models (the
                                daemon's full recompute: the newest 60 outputs; the ONNX backend
                                computes only the samples they see, receptive field + 59)
  whole window, every output    Predictor.run: all 1536 outputs of the window (evaluation's call)
  incremental, 60 s / 1 s       Predictor.step on a real ring after 60 / 1 new samples
  (backend onnxruntime: the same rows through OnnxPredictor, on the models exported here)
  60-s step graph alone (floor) the floor: the step's arithmetic alone in ONNX Runtime (the step
                                graph on zero padding, no history in or out, no ring)
  memory holding the models     RSS of a fresh process that loaded them and ran one window
  end-to-end at 1 Hz            a sample PUBLISHed -> its prediction received (real daemon,
                                INFERENCE_INTERVAL=1, own redis-server)
  ingest                        samples/s from PUBLISH into the ring (a burst, the ring's head)
  start -> READY                process start until the status hash leaves `starting`
  memory                        RSS of every daemon process, the supervisor and all below it (and
                                PSS: shared pages split fairly)
Hardware limit: the FLOPs of one full window over the throughput of a large float32 matmul.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the inference process does (nilmd/daemon/inference.py)

from bench_daemon import bench_daemon, stats, window_features  # noqa: E402  (scripts/: the daemon half)


def machine(threads: list[int]) -> dict:
    import torch

    model = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        from nilmd.models.onnx_backend import runtime

        ort = runtime().__version__
    except ImportError:
        ort = "not installed"
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "onnxruntime": ort,
            "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_start": [round(x, 2) for x in os.getloadavg()]}


def timed(fn, reps: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    return stats(wall, cpu)


# -- models ----------------------------------------------------------------------------------------
def load_models(model_dir: str, out_dir: Path):
    """The shipped checkpoints; appliances without one get random weights of the same
    architecture (timing does not depend on the weights), and the note says so. All 11 are
    also written to out_dir in the real format, for the daemon."""
    import torch

    from nilmd.models import checkpoints
    from nilmd.appliances import APPLIANCES, ON_THRESHOLD_W, checkpoint_filename
    from nilmd.models.model import WaveNILM, WaveNILMConfig

    loaded, _ = checkpoints.load_dir(model_dir)
    like = next(iter(loaded.values()), None)
    cfg = like.config if like else WaveNILMConfig(channels=16, head_channels=32)
    scales = like.feature_scales if like else (2.0**14, 2.0**12, 2.0**7, 2.0**14, 1.0)
    filled = [a for a in APPLIANCES if a not in loaded]
    torch.manual_seed(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    for a in APPLIANCES:
        if a in loaded:
            shutil.copy(loaded[a].path, out_dir / checkpoint_filename(a))
        else:
            data = checkpoints.to_dict(a, WaveNILM(cfg, scales), on_power_threshold_w=ON_THRESHOLD_W[a],
                                       max_power_w=3000.0, training={"note": "random weights, for timing only"})
            checkpoints.save(out_dir / checkpoint_filename(a), data)
    loaded, errors = checkpoints.load_dir(out_dir)
    assert not errors, errors
    archs = sorted({str(c.config) for c in loaded.values()})
    note = f"{len(APPLIANCES) - len(filled)} shipped checkpoints" + (
        f", {len(filled)} with random weights (not shipped yet: {', '.join(filled)})" if filled else "")
    return loaded, note, archs


def bench_models(ckpts, size: int, threads: int, reps: int, device: str = "cpu", backend: str = "torch",
                 model_dir: str = "") -> dict:
    import torch

    from nilmd.models.predictor import Predictor

    torch.set_num_threads(threads)
    if backend == "onnxruntime":
        from nilmd.models.onnx_backend import OnnxPredictor

        return {**bench_steps(OnnxPredictor(model_dir, threads=threads), size, reps),
                "60-s step graph alone (floor)": timed(step_floor(Predictor(ckpts), threads, 60), reps)}
    pred = Predictor(ckpts, device)
    models = [c.model().to(pred.device) for c in pred.checkpoints]
    x = torch.from_numpy(window_features(size)).T.unsqueeze(0).to(pred.device)

    @torch.inference_mode()
    def loop():  # the seed's Predictor.run: each model alone on the window, results to the host
        for m in models:
            power, logit = m(x)
            power.cpu(), torch.sigmoid(logit).cpu()

    out = {"full window, per-model loop": timed(loop, max(10, reps // 4)), **bench_steps(pred, size, reps)}
    if pred.device.type == "cuda":
        out["_gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def step_floor(pred, threads: int, n: int):
    """The arithmetic of an n-sample step in ONNX Runtime and nothing else: each group's step graph
    without the history in and out (nilmd.models.onnx_export.build_group(history=False): the same
    convolutions on zero padding), bound once. The step row minus this one is what moving the
    history costs; this one is what the export's arithmetic costs in this runtime on this box."""
    from nilmd.models.onnx_backend import runtime, session_options
    from nilmd.models.onnx_export import build_group

    ort = runtime()
    so, runs, held = session_options(threads), [], []
    for k, (_, net) in enumerate(pred.groups):
        sess = ort.InferenceSession(build_group(net, f"floor{k}", n, history=False).SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        arrays = {"x": np.ones((1, net.w_in.shape[1], 1, n), np.float32),
                  "power": np.empty((net.n_models, n), np.float32), "probability": np.empty((net.n_models, n), np.float32)}
        io = sess.io_binding()
        for name, a in arrays.items():
            held.append(ort.OrtValue.ortvalue_from_numpy(a))  # (wraps the array: both must outlive the binding)
            (io.bind_ortvalue_input if name == "x" else io.bind_ortvalue_output)(name, held[-1])
        held.append(arrays)
        runs.append((sess, io))

    def fn():
        for sess, io in runs:
            sess.run_with_iobinding(io)
    fn.held = held
    return fn


def bench_steps(pred, size: int, reps: int) -> dict:
    """pred.step on a real ring: after reset() (a full window), and after 60 and 1 new samples."""
    from nilmd.daemon.ringbuffer import RingBuffer

    data = window_features(size + 200_000)
    # A directory of our own (mode 0700): a guessable name in /dev/shm could be a planted symlink.
    shm = tempfile.mkdtemp(prefix="nilmd-bench-", dir="/dev/shm")
    ring = RingBuffer.create(os.path.join(shm, "ring"), capacity=4 * size, n_features=data.shape[1])  # wraps often
    head = [0]

    def feed(n):
        i = head[0]
        ring.write(np.arange(i, i + n, dtype=np.float64), data[i:i + n], np.zeros(n, np.uint8))
        head[0] += n

    def step(n, full=False):
        def fn():
            feed(n)
            if full:
                pred.reset()
            window = ring.window(size)
            pred.step(window, n)
            del window
        return fn

    try:
        feed(size)
        whole = window_features(size)
        out = {
            "full window, fused": timed(step(60, full=True), reps),
            "whole window, every output": timed(lambda: pred.run(whole), max(10, reps // 4)),
            "incremental, 60 s": timed(step(60), reps),
            "incremental, 1 s": timed(step(1), reps * 3),
        }
        out["_full_recomputes"] = pred.full_recomputes
    finally:
        ring.close()
        shutil.rmtree(shm, ignore_errors=True)
    return out


HOLD = """import sys, numpy as np, psutil
model_dir, backend = sys.argv[1], sys.argv[2]
if backend == "torch":
    from nilmd.models import checkpoints
    from nilmd.models.predictor import Predictor
    pred = Predictor(checkpoints.load_dir(model_dir)[0])
else:
    from nilmd.models.onnx_backend import OnnxPredictor
    pred = OnnxPredictor(model_dir)
pred.run(np.ones((1536, 5), np.float32))
print(psutil.Process().memory_info().rss / 2**20, "torch" in sys.modules)
"""


def holding_rss(model_dir: str, backend: str) -> dict:
    """RSS of a fresh interpreter holding the models (and whether it imported torch)."""
    out = subprocess.run([sys.executable, "-c", HOLD, model_dir, backend], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True).stdout.split()
    return {"rss_mb": round(float(out[0]), 1), "torch_imported": out[1] == "True"}


def model_flops(ckpts, size: int) -> int:
    """FLOPs (2 per multiply-add) of one full window through every model, as WaveNILM defines it."""
    total = 0
    for c in ckpts.values():
        f, ch, h = c.config.n_features, c.config.channels, c.config.head_channels
        per_sample = 2 * f * ch + c.config.depth * (2 * 2 * ch * 2 * ch + 2 * ch * 2 * ch) + 2 * ch * h + 2 * h * 2
        total += per_sample * size
    return total


def matmul_gflops(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(30):  # the best of many short runs: what the cores do when nothing preempts them
        t = time.perf_counter()
        for _ in range(2):
            a @ b
        best = min(best, (time.perf_counter() - t) / 2)
    return 2 * 1024**3 / best / 1e9


# -- report ----------------------------------------------------------------------------------------
def table(results: dict) -> str:
    m = results["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, onnxruntime {m['onnxruntime']}, device "
             f"{m['device']}, load average {m['load_start'][0]} at start, {m['load_end'][0]} at end",
             f"models: {results['models']}; {'; '.join(results['architectures'])}",
             "", f"| {'measure':34s} | backend | threads | median | p99 | cpu median |", "|---|---|---|---|---|---|"]
    for backend, by_threads in results["models_by_backend"].items():
        for threads, rows in by_threads.items():
            for name, s in rows.items():
                if not name.startswith("_"):
                    lines.append(f"| {name:34s} | {backend} | {threads} | {s['median_ms']:.2f} ms | {s['p99_ms']:.2f} ms "
                                 f"| {s['cpu_median_ms']:.2f} ms |")
            if "_gpu_max_allocated_mb" in rows:
                lines.append(f"| {'GPU memory (torch, peak)':34s} | {backend} | {threads} | "
                             f"{rows['_gpu_max_allocated_mb']:.0f} MB | | |")
    for backend, v in results.get("holding", {}).items():
        lines.append(f"| {'memory holding the models':34s} | {backend} | | RSS {v['rss_mb']} MB | "
                     f"{'torch imported' if v['torch_imported'] else 'no torch'} | |")
    for backend, d in results.get("daemon", {}).items():
        t = d["threads"] or "default"
        e = d["end-to-end at 1 Hz"]
        lines.append(f"| {'end-to-end at 1 Hz':34s} | {backend} | {t} | {e['median_ms']:.1f} ms | {e['p99_ms']:.1f} ms | |")
        lines.append(f"| {'start -> READY':34s} | {backend} | {t} | {d['start -> READY']['median_ms'] / 1e3:.2f} s | | |")
        cpu = ", ".join(f"{k} {v}%" for k, v in d["cpu_percent_at_1hz"].items())
        lines.append(f"| {'CPU of a core at 1 Hz':34s} | {backend} | {t} | {cpu} | | |")
        ing = d["ingest"]
        lines.append(f"| {'reader ingest (burst of %d)' % ing['n']:34s} | {backend} | | {ing['samples_per_s']:,} "
                     f"samples/s | published in {ing['publish_s']} s | |")
        for role, v in d["memory"].items():
            lines.append(f"| {'memory ' + role:34s} | {backend} | | RSS {v['rss_mb']} MB | PSS {v['pss_mb']} MB | |")
    h = results["limit"]
    lines += ["", f"hardware limit: {h['gflop_per_window']:.3f} GFLOP per full window / {h['matmul_gflops']:.0f} "
              f"GFLOP/s (1024^2 float32 matmul, best of {h['matmul_gflops_by_threads']} by threads) = "
              f"{h['limit_ms']:.2f} ms; "
              f"per 60-s step {h['limit_60_ms']:.3f} ms, per 1-s step {h['limit_1_ms'] * 1e3:.1f} us"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(ROOT / "checkpoints"))
    ap.add_argument("--window-size", type=int, default=1536)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the daemon runs with the same)")
    ap.add_argument("--threads", default="1,2", help="torch threads to time the models with (comma list)")
    ap.add_argument("--daemon-threads", type=int, default=0,
                    help="--threads of the benchmarked daemon (default 0, the daemon's own default: torch all "
                    "cores, onnxruntime 1)")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--e2e-seconds", type=int, default=60, help="live 1 Hz samples for the end-to-end latency")
    ap.add_argument("--ingest-samples", type=int, default=50_000)
    ap.add_argument("--no-daemon", action="store_true", help="skip the daemon (no redis-server needed)")
    ap.add_argument("--backends", default="torch,onnxruntime", help="comma list: torch, onnxruntime (exported here)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    results = {"machine": {**machine(threads), "device": args.device}}
    tmp = Path(tempfile.mkdtemp(prefix="nilmd-bench-models-"))
    ckpts, results["models"], results["architectures"] = load_models(args.model_dir, tmp)
    backends = args.backends.split(",")
    if "onnxruntime" in backends:  # the checkpoints copied to tmp, exported beside them
        from nilmd.models.onnx_export import export

        export(tmp, ckpts=ckpts)
    results["models_by_backend"] = {b: {} for b in backends}
    for t in threads:
        for b in backends:
            print(f"timing the models on {b} with {t} thread(s) ...", file=sys.stderr)
            results["models_by_backend"][b][t] = bench_models(ckpts, args.window_size, t, args.reps, args.device, b,
                                                              str(tmp))
    results["holding"] = {b: holding_rss(str(tmp), b) for b in backends}
    flops = model_flops(ckpts, args.window_size)
    measured = {t: matmul_gflops(t) for t in threads}  # a busy machine can make more threads slower
    best = max(measured, key=measured.get)
    gflops = measured[best]
    results["limit"] = {"gflop_per_window": flops / 1e9, "matmul_gflops": gflops, "threads": best,
                        "matmul_gflops_by_threads": {t: round(g, 1) for t, g in measured.items()},
                        "limit_ms": flops / gflops / 1e6, "limit_60_ms": flops * 60 / args.window_size / gflops / 1e6,
                        "limit_1_ms": flops / args.window_size / gflops / 1e6}
    if not args.no_daemon:
        if shutil.which("redis-server") is None:
            print("redis-server not found: skipping the daemon (--no-daemon to silence)", file=sys.stderr)
        else:
            results["daemon"] = {}
            for b in backends:
                print(f"running the daemon on {b} against a private redis-server ...", file=sys.stderr)
                results["daemon"][b] = {"threads": args.daemon_threads, **bench_daemon(
                    str(tmp), args.window_size, args.daemon_threads, args.e2e_seconds, args.ingest_samples,
                    args.device, b)}
    shutil.rmtree(tmp, ignore_errors=True)
    results["machine"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
