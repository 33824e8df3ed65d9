"""Serving the exported models (nilmd.models.onnx_export) with ONNX Runtime: numpy and
onnxruntime only, so a box without torch runs the daemon.

OnnxPredictor keeps Predictor's contract (run, step following the ring, reset, full_recomputes,
appliances, probability_thresholds, receptive_field). Its state per group is each layer's last
`dilation` inputs, as arrays bound to the graph's state inputs and outputs in two sets that swap
after every call (ONNX Runtime cannot read and write one buffer in a run); the input, the states
and the outputs of each step size are bound once (IO binding), so a step allocates nothing and
copies only the new samples in.

The manifest beside the graphs says what they were exported from: the SHA-256 of every source
checkpoint. They are served only while the checkpoints in the model directory are exactly those;
a changed, added or removed checkpoint, a damaged graph or an unreadable manifest is an
OnnxExportError, one line saying which file and what to do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nilmd.appliances import APPLIANCES, checkpoint_filename
from nilmd.errors import NilmdError
from nilmd.models.following import RingFollower

FORMAT_VERSION = 1
MANIFEST = "nilmd-onnx.json"
# Samples per call on long inputs. The memory arena keeps what the largest call needed: 256 holds
# the inference process at ~80 MB against ~89 MB with 512, for a full window ~10 % slower
# (measured on the shipped models; without the arena, or shrinking it, a full window costs ~40 %
# more, its activations being faulted in again each time).
CHUNK = 256
MAX_BINDINGS = 16  # (samples, outputs, state set) combinations kept bound; the daemon uses 4-6


def group_filename(k: int) -> str:
    return f"nilmd-onnx-group{k}.onnx"


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


def read_manifest(model_dir) -> dict:
    """The manifest, checked against the checkpoints in `model_dir` by hash."""
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
    if wrong or not all(isinstance(g, dict) and {"file", "sha256", "rows", "n_models", "dilations", "n_features"}
                        <= set(g) for g in manifest["groups"]):
        raise OnnxExportError(f"ONNX manifest {path} is malformed ({', '.join(wrong) or 'groups'}): {again}")
    exported = manifest["checkpoints"]
    for appliance in APPLIANCES:
        file = Path(model_dir) / checkpoint_filename(appliance)
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


def session_options(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Threads that spin while they wait take the core from the reader on a small box (see
    # InferenceWorker.prepare_process: the same reason as OMP_WAIT_POLICY=PASSIVE for torch).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class _Group:
    """One exported graph: its session, its rows in appliance order, its states and bindings."""

    def __init__(self, path: Path, spec: dict, so):
        import onnxruntime as ort

        data = path.read_bytes() if path.exists() else b""
        if hashlib.sha256(data).hexdigest() != spec["sha256"]:
            raise OnnxExportError(f"ONNX file {path} is {'missing' if not data else 'damaged'} (its SHA-256 is not "
                                  "the manifest's): export again with `nilmd export`")
        try:
            self.sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/...: all one answer here
            raise OnnxExportError(f"ONNX file {path} does not load ({str(e).splitlines()[0][:200]}): "
                                  "export again with `nilmd export`") from None
        self.ort = ort
        self.rows, self.dilations = list(spec["rows"]), list(spec["dilations"])
        shapes = [i.shape for i in self.sess.get_inputs() if i.name.startswith("state_")]
        self.sets = [[np.zeros(s, np.float32) for s in shapes] for _ in range(2)]
        self.n_models = spec["n_models"]
        self.live = 0  # which set holds the state
        self.n_features = spec["n_features"]
        self._bound = {}

    def zero(self) -> None:
        for s in self.sets[self.live]:
            s.fill(0.0)

    def step(self, x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Feed x [n, F]; (power, probability) [A, m] of the newest m, in buffers reused by the
        next call of this shape."""
        key = (x.shape[0], m, self.live)
        if key not in self._bound:
            if len(self._bound) >= MAX_BINDINGS:
                self._bound.clear()
            self._bound[key] = self._bind(*key)
        io, xbuf, power, prob, _ = self._bound[key]
        xbuf[0] = x.T  # channels-first, as the graph's convolutions read it
        self.sess.run_with_iobinding(io)
        self.live = 1 - self.live
        return power, prob

    def _bind(self, n: int, m: int, live: int):
        ov = self.ort.OrtValue.ortvalue_from_numpy  # CPU: wraps the array, no copy
        a = self.n_models
        xbuf, keep = np.empty((1, self.n_features, n), np.float32), np.array([m], np.int64)
        power, prob = np.empty((a, m), np.float32), np.empty((a, m), np.float32)
        io = self.sess.io_binding()
        held = [ov(xbuf), ov(keep), ov(power), ov(prob)]
        io.bind_ortvalue_input("x", held[0])
        io.bind_ortvalue_input("outputs", held[1])
        io.bind_ortvalue_output("power", held[2])
        io.bind_ortvalue_output("probability", held[3])
        for i, (src, dst) in enumerate(zip(self.sets[live], self.sets[1 - live])):
            held += [ov(src), ov(dst)]
            io.bind_ortvalue_input(f"state_{i}", held[-2])
            io.bind_ortvalue_output(f"state_out_{i}", held[-1])
        return io, xbuf, power, prob, held  # held: the OrtValues must outlive the binding

    def run(self, x: np.ndarray, m: int, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
        """x [n, F] from the current state, in chunks; outputs of the newest m (m <= chunk or
        n): the head runs only in the chunks that hold them."""
        n = x.shape[0]
        outs = []
        for a in range(0, n, chunk):
            part = x[a:a + chunk]
            want = min(part.shape[0], max(0, a + part.shape[0] - (n - m)))
            p, q = self.step(part, max(want, 1))
            if want:
                outs.append((p.copy(), q.copy()) if a + chunk < n else (p, q))
        if len(outs) == 1:
            return outs[0]
        if not outs:  # no samples
            return np.zeros((self.n_models, 0), np.float32), np.zeros((self.n_models, 0), np.float32)
        return np.concatenate([p for p, _ in outs], axis=1), np.concatenate([q for _, q in outs], axis=1)


class OnnxPredictor(RingFollower):
    """The exported models of `model_dir` in ONNX Runtime, in the fixed appliance order."""

    backend = "onnxruntime"
    device = Device("cpu")

    def __init__(self, model_dir, threads: int = 1):
        manifest = read_manifest(model_dir)
        so = session_options(max(1, threads))
        self.model_dir = str(model_dir)
        self.manifest = manifest
        self.appliances = list(manifest["appliances"])
        self.probability_thresholds = np.array(manifest["probability_thresholds"], np.float32)
        self.receptive_field = int(manifest["receptive_field"])
        self.groups = [_Group(Path(model_dir) / g["file"], g, so) for g in manifest["groups"]]
        self.full_recomputes = 0
        self.reset()

    def run(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """features float32 [T, F] -> (power W [A, T], probability [A, T]). Stateless: the
        state the ring follows is kept and restored."""
        t = features.shape[0]
        outs = []
        for g in self.groups:
            kept = [s.copy() for s in g.sets[g.live]]
            g.zero()
            outs.append(g.run(features, t))
            for s, k in zip(g.sets[g.live], kept):
                s[...] = k
        return self._collect(outs, t)

    def _full(self, features: np.ndarray, new: int):
        outs = []
        for g in self.groups:
            g.zero()
            outs.append(g.run(features, new))
        return self._collect(outs, new)

    def _incremental(self, features: np.ndarray, new: int):
        return self._collect([g.run(features, new) for g in self.groups], new)

    def _collect(self, outs, t: int) -> tuple[np.ndarray, np.ndarray]:
        power = np.empty((len(self.appliances), t), np.float32)
        prob = np.empty((len(self.appliances), t), np.float32)
        for g, (p, q) in zip(self.groups, outs):
            power[g.rows] = p
            prob[g.rows] = q
        return power, prob
