"""Serving the exported models (nilmd.models.onnx_export) with ONNX Runtime: numpy and
onnxruntime only, so a box without torch runs the daemon.

OnnxPredictor keeps Predictor's contract (run, step following the ring, reset, full_recomputes,
appliances, probability_thresholds, receptive_field). The graphs are steps of fixed sizes; the
backend keeps each layer's history in a circular buffer of `dilation` samples (numpy, sample t in
column t mod dilation), copies into the graph only the samples the layer reads for the new ones
and writes back the layer inputs the graph returns for them: a step moves O(n) samples, not the
whole history (a graph cannot update a buffer in place). Every array a step uses is allocated and
bound to its session once, at load (IO binding), so a step allocates nothing inside.

The manifest beside the graphs says what they were exported from: the SHA-256 of every source
checkpoint. They are served only while the checkpoints in the model directory are exactly those;
a changed, added or removed checkpoint, a damaged graph or an unreadable manifest (or one of an
older export format) is an OnnxExportError, one line saying which file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nilmd.appliances import APPLIANCES, checkpoint_filename
from nilmd.errors import NilmdError
from nilmd.models.following import RingFollower

FORMAT_VERSION = 2  # 2: fixed-step graphs reading only the history they need (1: whole states in and out)
MANIFEST = "nilmd-onnx.json"
# The largest step, for full windows and long inputs. The memory arena keeps what the largest call
# needed: 256 holds the inference process at ~80 MB against ~89 MB with 512, for a full window
# ~10 % slower (measured on the shipped models; without the arena, or shrinking it, a full window
# costs ~40 % more, its activations being faulted in again each time).
CHUNK = 256


def graph_filename(k: int, n: int, heads: bool = True) -> str:
    return f"nilmd-onnx-group{k}-step{n}{'' if heads else '-nohead'}.onnx"


def step_sizes(interval: int) -> list[int]:
    """The step sizes exported: CHUNK (full windows and long inputs), the daemon's interval (one
    longer than CHUNK as CHUNKs and its remainder: a graph's activations grow with its step), 1."""
    interval = int(interval)
    return sorted({CHUNK, interval if interval <= CHUNK else interval % CHUNK or 1, 1}, reverse=True)


PIECE_SAMPLES = 20  # a step costs about what 20 samples do (~0.1 ms against ~5 us a sample, shipped models)


def _fewest(n: int, sizes) -> tuple[list[int], list[int]]:
    """For every j <= n: the fewest steps of `sizes` (which include 1) that sum to j, and the
    last of them."""
    best, last = [0] + [n + 1] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for s in sizes:
            if s <= j and best[j - s] + 1 < best[j]:
                best[j], last[j] = best[j - s] + 1, s
    return best, last


def pieces(n: int, sizes) -> list[int]:
    """n as a sum of the step sizes with the fewest steps, largest first."""
    _, last = _fewest(n, sizes)
    out = []
    while n:
        out.append(last[n])
        n -= last[n]
    return sorted(out, reverse=True)


def span(t: int, need: int, sizes) -> int:
    """How many of a window's t newest samples to compute from the zero history when the outputs
    wanted see `need` of them: at least need (or all t), as cheap a sum of steps as there is."""
    if need >= t:
        return t
    best, _ = _fewest(t, sizes)
    return min(range(need, t + 1), key=lambda n: (PIECE_SAMPLES * best[n] + n, n))


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else \
            hashlib.sha256(f.read()).hexdigest()


class OnnxExportError(NilmdError):
    """The ONNX export cannot serve this model directory (the message says why and what to do)."""


class NoExport(OnnxExportError):
    """There is no ONNX export at all (under NILMD_BACKEND=auto: simply torch, no warning)."""


class Device(NamedTuple):
    type: str = "cpu"

    def __str__(self) -> str:
        return self.type


def read_manifest(model_dir, sources: dict | None = None) -> dict:
    """The manifest, checked against the checkpoints in `model_dir` by hash. `sources`: appliance
    -> the checkpoint file each row must come from, where they are not all in `model_dir` (a
    building's adapted set, nilmd.models.adapted: its own files and the shipped ones)."""
    path = Path(model_dir) / MANIFEST
    again = f"run `nilmd export --model-dir {model_dir}` where torch is installed"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise NoExport(f"no ONNX export in {model_dir} ({MANIFEST} not found): {again}") from None
    except (OSError, ValueError) as e:
        raise OnnxExportError(f"ONNX manifest {path} is unreadable ({e}): {again}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise OnnxExportError(f"ONNX manifest {path}: format_version {version!r}, "
                              f"this nilmd reads {FORMAT_VERSION}: {again}")
    need = {"appliances": list, "probability_thresholds": list, "receptive_field": int, "groups": list,
            "checkpoints": dict}
    wrong = [k for k, kind in need.items() if not isinstance(manifest.get(k), kind)]
    if wrong or not all(isinstance(g, dict) and {"graphs", "rows", "n_models", "dilations", "n_features"} <= set(g)
                        and isinstance(g["graphs"], list)
                        and all(isinstance(gr, dict) and {"n", "heads", "file", "sha256"} <= set(gr)
                                for gr in g["graphs"])
                        and {1} <= {gr["n"] for gr in g["graphs"] if gr["heads"]}  # any count is a sum of them
                        for g in manifest["groups"]):
        raise OnnxExportError(f"ONNX manifest {path} is malformed ({', '.join(wrong) or 'groups'}): {again}")
    exported = manifest["checkpoints"]
    for appliance in APPLIANCES:
        file = Path(sources[appliance]) if sources else Path(model_dir) / checkpoint_filename(appliance)
        if appliance in exported and not file.exists():
            raise OnnxExportError(f"ONNX export in {model_dir} is stale: checkpoint {file} is gone: {again}")
        if appliance in exported and sha256(file) != exported[appliance].get("sha256"):
            raise OnnxExportError(f"ONNX export in {model_dir} is stale: checkpoint {file} changed since: {again}")
        if appliance not in exported and file.exists():
            raise OnnxExportError(f"ONNX export in {model_dir} is stale: checkpoint {file} is not in it: {again}")
    return manifest


def not_served(model_dir, manifest: dict) -> dict[str, str]:
    """Appliances without a checkpoint, in nilmd.models.checkpoints.load_dir's words."""
    return {a: f"checkpoint {Path(model_dir) / checkpoint_filename(a)}: file not found"
            for a in APPLIANCES if a not in manifest["appliances"]}


def runtime():
    """onnxruntime, imported with its telemetry off. Since 1.2x it otherwise writes a device id
    under $HOME/.cache/Microsoft and, under systemd where that is not writable, warns about it in
    the journal at every start of the inference process; an edge box reports to no one. An
    operator's own ORT_DISABLE_TELEMETRY stands. Every import of onnxruntime in nilmd is this one."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    return onnxruntime


_shared_arena = False


def session_options(threads: int):
    ort = runtime()

    global _shared_arena
    if not _shared_arena:  # once per process: one memory arena for every session (see below)
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _shared_arena = True
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Threads that spin while they wait take the core from the reader on a small box (see
    # InferenceWorker.prepare_process: the same reason as OMP_WAIT_POLICY=PASSIVE for torch).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The sessions of the step sizes run one at a time: in one arena the largest step's memory
    # serves them all, where each of its own kept its peak (~3 MB more for the daemon).
    so.add_session_config_entry("session.use_env_allocators", "1")
    so.log_severity_level = 3
    return so


class _Step:
    """One graph of a fixed step size n: its session and the arrays bound to it once (the input
    and layer arrays those of `like`, a graph of the same n: they run one at a time). A `lazy`
    one is checked now and opened on its first step, from the bytes checked (the file may be a
    newer export by then): a session holds ~1.5-2 MB, its file 0.7, and the daemon's schedule
    never needs some (the 256-step with heads: run() and odd counts of samples)."""

    def __init__(self, path: Path, sha: str, so, n: int, spec: dict, heads: bool = True, like: "_Step | None" = None,
                 lazy: bool = False):
        self.path, self.so, self.n, self.heads = path, so, n, heads
        a, ac = spec["n_models"], spec["n_models"] * spec["channels"]
        if like is not None:
            self.x, self.hist, self.h = like.x, like.hist, like.h
        else:
            self.x = np.empty((1, spec["n_features"], 1, n), np.float32)
            self.hist = [np.zeros((1, ac, 1, min(d, n)), np.float32) for d in spec["dilations"]]
            self.h = [np.empty((1, ac, 1, n), np.float32) for _ in spec["dilations"]]
        self.power, self.prob = (np.empty((a, n), np.float32), np.empty((a, n), np.float32)) if heads else (None, None)
        # per layer: its dilation, where its history samples go, the newest min(d, n) layer inputs
        self.moves = [(d, into[0, :, 0], h[0, :, 0, n - min(d, n):]) for d, into, h in zip(spec["dilations"], self.hist,
                                                                                          self.h)]
        self.x_in = self.x[0, :, 0]  # [F, n]
        self.sess = self.io = None
        data = path.read_bytes() if path.exists() else b""
        if hashlib.sha256(data).hexdigest() != sha:
            raise OnnxExportError(f"ONNX file {path} is {'missing' if not data else 'damaged'} (its SHA-256 is not "
                                  "the manifest's): export again with `nilmd export`")
        self._data = data
        if not lazy:
            self.open()

    def open(self) -> None:
        ort = runtime()

        data, self._data = self._data, None
        try:
            self.sess = ort.InferenceSession(data, self.so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/...: all one answer here
            raise OnnxExportError(f"ONNX file {self.path} does not load ({str(e).splitlines()[0][:200]}): "
                                  "export again with `nilmd export`") from None
        ov = ort.OrtValue.ortvalue_from_numpy  # CPU: wraps the array, no copy
        self.io = self.sess.io_binding()
        self._held = []  # the OrtValues must outlive the binding
        for name, arr, out in ([("x", self.x, False)] + [(f"hist_{i}", v, False) for i, v in enumerate(self.hist)]
                               + [("power", self.power, True), ("probability", self.prob, True)] * self.heads
                               + [(f"h_{i}", v, True) for i, v in enumerate(self.h)]):
            self._held.append(ov(arr))
            (self.io.bind_ortvalue_output if out else self.io.bind_ortvalue_input)(name, self._held[-1])


class _Group:
    """One architecture group: a graph per step size, its rows in appliance order, and each
    layer's history: hist[i] [A*C, d_i], sample t of the sequence in column t mod d_i."""

    def __init__(self, model_dir: Path, spec: dict, so, eager=None):
        """eager: the step sizes to open now (None: all but the 256-step with heads)."""
        self.rows, self.dilations = list(spec["rows"]), list(spec["dilations"])
        self.n_models = spec["n_models"]
        graphs = [(gr, gr["heads"]) for gr in spec["graphs"]]
        quiet = {gr["n"] for gr, heads in graphs if not heads}
        lazy = (lambda n: n in quiet) if eager is None else (lambda n: n not in eager)
        self.steps = {gr["n"]: _Step(model_dir / gr["file"], gr["sha256"], so, gr["n"], spec, lazy=lazy(gr["n"]))
                      for gr, heads in graphs if heads}
        # A full window wants the outputs of its last piece only: the others run without the
        # skip sum and the heads (~20 % of a step), where the export has such a graph.
        self.quiet = {gr["n"]: _Step(model_dir / gr["file"], gr["sha256"], so, gr["n"], spec, False,
                                     self.steps.get(gr["n"])) for gr, heads in graphs if not heads}
        self.sizes = sorted(self.steps, reverse=True)
        ac = spec["n_models"] * spec["channels"]
        self.hist = [np.zeros((ac, d), np.float32) for d in self.dilations]
        self.t = 0  # samples since the zero history
        self.receptive_field = 2 * self.dilations[-1]  # 1 + the sum of the dilations
        self._pieces = {}  # n -> pieces(n, sizes), for the counts seen
        self._spans = {}  # (window, outputs) -> span(...), for the windows seen

    def zero(self) -> None:
        for h in self.hist:
            h.fill(0.0)
        self.t = 0

    def full(self, x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """run() from the zero history, on only the newest samples the newest m outputs see (and
        the history of the layers is exact from there on): what zero padding would have given
        the older ones never reaches them, so they are the same, for less work."""
        self.zero()
        n = x.shape[0]
        if (n, m) not in self._spans:
            # the newest outputs in one small step with heads (the last piece: pieces() sorts
            # them largest first), what comes before in steps without where there are such
            tail = min((k for k in self.sizes if k >= m), default=0)
            need = m + self.receptive_field - 1
            self._spans[n, m] = tail + span(n - tail, max(need - tail, 0), self.sizes) if need < n else n
        return self.run(x[n - self._spans[n, m]:], m)

    def step(self, x: np.ndarray, s: _Step) -> None:
        """Feed x [s.n, F] through the graph of its size; outputs in s.power, s.prob."""
        t = self.t
        s.x_in[:] = x.T  # channels-first, as the graph's convolutions read it
        for buf, (d, into, _) in zip(self.hist, s.moves):  # samples t-d .. t-d+m-1
            _read(buf, t % d, into)
        if s.io is None:
            s.open()
        s.sess.run_with_iobinding(s.io)
        t += s.n
        for buf, (d, _, keep) in zip(self.hist, s.moves):  # the newest min(d, n) inputs stay
            _write(buf, (t - keep.shape[1]) % d, keep)
        self.t = t

    def run(self, x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """x [n, F] from the current history; (power, probability) [A, m] of the newest m. One
        step of the size n when there is one (the outputs are its buffers, reused by its next
        call), else steps of the sizes n is a sum of."""
        n = x.shape[0]
        if n in self.steps:
            s = self.steps[n]
            self.step(x, s)
            return s.power[:, n - m:], s.prob[:, n - m:]
        if n not in self._pieces:
            self._pieces[n] = pieces(n, self.sizes)
        power, prob = np.empty((self.n_models, m), np.float32), np.empty((self.n_models, m), np.float32)
        a = 0
        for k in self._pieces[n]:
            lo = max(0, a + k - (n - m))  # the wanted outputs this piece holds: the last lo of it
            s = self.steps[k] if lo or k not in self.quiet else self.quiet[k]
            self.step(x[a:a + k], s)
            a += k
            if lo:
                take = min(lo, k)
                power[:, lo - take:lo] = s.power[:, k - take:]
                prob[:, lo - take:lo] = s.prob[:, k - take:]
        return power, prob


def _read(buf: np.ndarray, p: int, into: np.ndarray) -> None:
    """into [C, m] = buf's columns p, p+1, ... (circular)."""
    m, d = into.shape[1], buf.shape[1]
    if p + m <= d:
        into[:] = buf[:, p:p + m]
    else:
        into[:, :d - p] = buf[:, p:]
        into[:, d - p:] = buf[:, :m - (d - p)]


def _write(buf: np.ndarray, p: int, src: np.ndarray) -> None:
    """buf's columns p, p+1, ... (circular) = src [C, k], k <= d."""
    k, d = src.shape[1], buf.shape[1]
    if p + k <= d:
        buf[:, p:p + k] = src
    else:
        buf[:, p:] = src[:, :d - p]
        buf[:, :k - (d - p)] = src[:, d - p:]


class OnnxPredictor(RingFollower):
    """The exported models of `model_dir` in ONNX Runtime, in the fixed appliance order."""

    backend = "onnxruntime"
    device = Device("cpu")

    def __init__(self, model_dir, threads: int = 1, interval: int | None = None, sources: dict | None = None):
        """interval: the daemon's INFERENCE_INTERVAL: the graphs its schedule never needs (an
        interval of 60 s needs no 1-s step) open on first use instead of at load. sources: as for
        read_manifest."""
        manifest = read_manifest(model_dir, sources)
        so = session_options(max(1, threads))
        self.model_dir = str(model_dir)
        self.manifest = manifest
        self.appliances = list(manifest["appliances"])
        self.probability_thresholds = np.array(manifest["probability_thresholds"], np.float32)
        self.receptive_field = int(manifest["receptive_field"])
        eager = None if interval is None else set(pieces(interval, step_sizes(interval)))  # a step and a recompute
        self.groups = [_Group(Path(model_dir), g, so, eager) for g in manifest["groups"]]
        self.full_recomputes = 0
        self.reset()

    def slow_for(self, interval: int) -> str:
        """One line when the export lacks the steps of `interval` (made for another one: each
        interval then runs as several smaller steps), else ""."""
        have = {n for g in self.groups for n in g.steps}
        lacking = sorted(set(step_sizes(interval)) - have)
        if not lacking:
            return ""
        return (f"the ONNX export in {self.model_dir} has no step of {lacking[0]} samples for INFERENCE_INTERVAL="
                f"{interval} (it was made for another interval): each interval runs as several smaller steps; "
                f"`nilmd export --inference-interval {interval}` makes it")

    def run(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """features float32 [T, F] -> (power W [A, T], probability [A, T]). Stateless: the
        state the ring follows is kept and restored."""
        t = features.shape[0]
        outs = []
        for g in self.groups:
            kept, at = [h.copy() for h in g.hist], g.t
            g.zero()
            outs.append(g.run(features, t))
            for h, k in zip(g.hist, kept):
                h[...] = k
            g.t = at
        return self._collect(outs, t)

    def _full(self, features: np.ndarray, new: int):
        return self._collect([g.full(features, new) for g in self.groups], new)

    def _incremental(self, features: np.ndarray, new: int):
        return self._collect([g.run(features, new) for g in self.groups], new)

    def _collect(self, outs, t: int) -> tuple[np.ndarray, np.ndarray]:
        power = np.empty((len(self.appliances), t), np.float32)
        prob = np.empty((len(self.appliances), t), np.float32)
        for g, (p, q) in zip(self.groups, outs):
            power[g.rows] = p
            prob[g.rows] = q
        return power, prob
