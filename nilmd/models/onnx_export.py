"""`nilmd export`: the checkpoints of a model directory as ONNX graphs that ONNX Runtime serves
without torch (nilmd.models.onnx_backend), and the manifest that ties them to the checkpoints.

Per architecture group (the models nilmd.models.fused stacks) one graph per step size, written
with onnx.helper from the fused weights: the models side by side as grouped convolutions (groups =
models, channels-first [1, A*C, time]: ONNX Runtime's convolutions with the gate's tanh and
sigmoid fused in ran this box's steps faster than batched matmuls, whose bias adds and splits
cost more than the products), the scales folded in. Same arithmetic as WaveNILM, in another
order: the two paths differ by float32 rounding only. The graph restates nilmd.models.model's
gate, skip sum, heads and power as nodes (each marked where it is built; that module names this
one).

A graph is the incremental step for exactly n new samples; the backend keeps each layer's history
and gives the graph only the samples that layer reads (min(dilation, n) of them), so a step costs
O(n), and a full window is steps from the zero history (WaveNILM's left padding):

    inputs   x [1, F, n] (physical units, channels-first), hist_i [1, A*C, min(d_i, n)]: layer
             i's inputs at t-d_i .. t-d_i+min(d_i, n)-1 for the first new sample t
    outputs  power [A, n] W, probability [A, n], h_i [1, A*C, n] (layer i's inputs at the new
             samples: what the backend writes into its history)

The sizes: CHUNK (full windows), the daemon's INFERENCE_INTERVAL and 1; any other count of new
samples is a sum of them (nilmd.models.onnx_backend.pieces). Deterministic: no timestamps, names
from the layer index, weights as float32 bytes, so the same checkpoints give the same files
(tests/test_onnx.py checks it). Needs torch (to read and fuse the checkpoints) and onnx; the box
that serves the files needs neither.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nilmd import __version__
from nilmd.appliances import checkpoint_filename
from nilmd.errors import NilmdError
from nilmd.models import checkpoints
from nilmd.models.fused import FusedWaveNILM
from nilmd.models.model import GATE_FOLD
from nilmd.models.onnx_backend import CHUNK, FORMAT_VERSION, MANIFEST, graph_filename, sha256, step_sizes

OPSET = 17  # ONNX Runtime >= 1.17 runs it (the onnxruntime extra's floor)
IR_VERSION = 8


class _Graph:
    """A tiny builder: nodes in order, constants as initializers, every name from its role."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.array(value, order="C"), name))  # (ascontiguousarray: 1-d scalars)
        return name

    def op(self, kind: str, inputs, out: str, n_out: int = 1, **attrs):
        outs = [out] if n_out == 1 else [f"{out}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(kind, list(inputs), outs, name=out, **attrs))
        return outs[0] if n_out == 1 else outs


def build_group(net: FusedWaveNILM, name: str, n: int, heads: bool = True, history: bool = True) -> onnx.ModelProto:
    """The step graph of one fused group for exactly n new samples (see the module docstring);
    without `heads`, only the layer inputs (for a piece whose outputs nobody wants). Without
    `history`, the same arithmetic with no history in or out (each layer reads zero padding
    instead): not a model, the floor scripts/bench.py measures a step against."""
    w = {k: getattr(net, k).detach().cpu().numpy().astype(np.float32) for k, _ in net.named_buffers()}
    A, C, D = net.n_models, net.channels, net.depth
    F = w["w_in"].shape[1]
    g = _Graph()
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731

    def conv(name, x, weight, bias=None, dilation=1):  # weight [(taps,) A, in, out] (x @ W per model), grouped
        a, cin, cout = weight.shape[-3:]
        kernel = np.ascontiguousarray(np.swapaxes(weight, -1, -2).reshape(-1, a * cout, cin))  # [taps, A*out, in]
        kernel = np.ascontiguousarray(np.moveaxis(kernel, 0, -1)[:, :, None, :])  # [A*out, in, 1, taps]
        inputs = [x, g.const(f"{name}_w", kernel)] + ([] if bias is None else [g.const(f"{name}_b", bias.reshape(-1))])
        pads = {} if history or kernel.shape[-1] == 1 else {"pads": [0, dilation, 0, 0]}  # (the floor: zeros before)
        return g.op("Conv", inputs, name, group=a, dilations=[1, dilation], **pads)

    # The input conv reads the same F features for every model: one dense conv, no groups.
    w_in = np.ascontiguousarray(np.swapaxes(w["w_in"], 1, 2).reshape(A * C, F, 1, 1))
    h = g.op("Conv", ["x", g.const("in_w", w_in), g.const("in_b", w["b_in"].reshape(-1))], "h_0")  # [1, A*C, 1, n]
    skip = None
    for i, d in enumerate(net.dilations):
        m = min(d, n)
        # [the m history samples layer i reads, the n new ones]: one kernel-2 conv of dilation m
        # over it reads h[t - d] and h[t] for every new t (for d >= n, history sample j is t_j - d).
        pair = g.op("Concat", [f"hist_{i}", h], f"l{i}_pair", axis=3) if history else h  # [1, A*C, 1, m + n]
        taps = np.stack([w["w_prev"][i], w["w_cur"][i]])  # [2 taps: t-d, t; A, C, 2C]
        # model.fold scaled the filter rows and the res/skip weights by GATE_FOLD (for
        # model.folded_gate, a tanh through a sigmoid); ONNX Runtime fuses the activations into the
        # convs, so undo it (powers of two: exact) and restate nilmd.models.model.gate: tanh(f) * sigmoid(g).
        unfold = 1.0 / GATE_FOLD
        f = conv(f"l{i}_f", pair, unfold * taps[..., :C], unfold * w["b_conv"][i][..., :C], m)
        f = g.op("Tanh", [f], f"l{i}_tf")
        gate = g.op("Sigmoid", [conv(f"l{i}_g", pair, taps[..., C:], w["b_conv"][i][..., C:], m)], f"l{i}_sg")
        z = g.op("Mul", [f, gate], f"l{i}_z")  # [1, A*C, 1, n]
        # Restates nilmd.models.model's skip sum (b_skip: fold's biases, summed), layer by layer:
        # ONNX Runtime fuses each Add into the conv before it, and z never leaves the blocked
        # layout (one conv over all layers' z stacked needed a reorder and a transpose of every z).
        if heads:
            s = conv(f"l{i}_skip", z, unfold * w["w_skip"][i], w["b_skip"] if i == 0 else None)
            skip = s if skip is None else g.op("Add", [s, skip], f"l{i}_skip_sum")
        if i + 1 < D:
            h = g.op("Add", [conv(f"l{i}_res", z, unfold * w["w_res"][i], w["b_res"][i]), h], f"h_{i + 1}")
    outputs = []
    if heads:  # restates nilmd.models.model.heads and .power, with the on logit's sigmoid (a probability)
        hid = g.op("Relu", [conv("head1", g.op("Relu", [skip], "skip_relu"), w["w_h1"], w["b_h1"])], "head1_relu")
        out = conv("head2", hid, w["w_h2"], w["b_h2"])  # [1, A*2, 1, n]: per model mask, on
        out = g.op("Sigmoid", [g.op("Reshape", [out, g.const("shape_a2n", i64(A, 2, n))], "heads_a2n")], "heads")
        first, second = g.const("c_s0", np.array(0, np.int64)), g.const("c_s1", np.array(1, np.int64))  # scalars
        mask = g.op("Gather", [out, first], "mask", axis=1)
        g.op("Gather", [out, second], "probability", axis=1)
        p = g.op("Reshape", [g.op("Gather", ["x", first], "p_new", axis=1), g.const("shape_1n", i64(1, n))], "p_1n")
        g.op("Mul", [mask, g.op("Relu", [p], "p_pos")], "power")
        outputs += [helper.make_tensor_value_info("power", TensorProto.FLOAT, [A, n]),
                    helper.make_tensor_value_info("probability", TensorProto.FLOAT, [A, n])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, F, 1, n])]
    if history:
        inputs += [helper.make_tensor_value_info(f"hist_{i}", TensorProto.FLOAT, [1, A * C, 1, min(d, n)])
                   for i, d in enumerate(net.dilations)]
        outputs += [helper.make_tensor_value_info(f"h_{i}", TensorProto.FLOAT, [1, A * C, 1, n]) for i in range(D)]
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, producer_name="nilmd", producer_version=__version__,
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def export(model_dir, out_dir=None, ckpts: dict | None = None, interval: int = 60) -> dict:
    """Export the usable checkpoints of `model_dir` (or `ckpts`, loaded already) to `out_dir`
    (default: beside them), with the steps of `interval` (the daemon's INFERENCE_INTERVAL).
    Returns the manifest. Files are written atomically, the manifest last, so a reader sees the
    old set or the new one; graphs of an earlier export that the new one does not name go after."""
    from nilmd.models.predictor import Predictor

    out = Path(out_dir or model_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ckpts is None:
        ckpts, errors = checkpoints.load_dir(model_dir)
        if not ckpts:
            raise ValueError(f"no usable checkpoint in {os.path.abspath(model_dir)}: " + "; ".join(errors.values()))
    pred = Predictor(ckpts, "cpu")
    groups = []
    for k, (rows, net) in enumerate(pred.groups):
        graphs = []
        for n, heads in [(n, True) for n in step_sizes(interval)] + [(CHUNK, False)]:
            data = build_group(net, f"nilmd_group_{k}_step_{n}{'' if heads else '_nohead'}", n, heads)
            data = data.SerializeToString()
            fname = graph_filename(k, n, heads)
            _write(out / fname, data)
            graphs.append({"n": n, "heads": heads, "file": fname, "sha256": hashlib.sha256(data).hexdigest()})
        groups.append({"graphs": graphs, "rows": list(rows),
                       "n_models": net.n_models, "channels": net.channels, "depth": net.depth,
                       "head_channels": int(net.w_h1.shape[2]), "dilations": list(net.dilations),
                       "n_features": int(net.w_in.shape[1])})
    manifest = {
        "format_version": FORMAT_VERSION,
        "producer": f"nilmd {__version__}",
        "opset": OPSET,
        "appliances": pred.appliances,
        "probability_thresholds": [float(c.probability_threshold) for c in pred.checkpoints],
        "feature_scales": [list(c.feature_scales) for c in pred.checkpoints],  # folded into the weights
        "receptive_field": pred.receptive_field,
        "groups": groups,
        "checkpoints": {c.appliance: {"file": checkpoint_filename(c.appliance), "sha256": sha256(c.path)}
                        for c in pred.checkpoints},
    }
    _write(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    named = {gr["file"] for g in groups for gr in g["graphs"]}
    for old in out.glob("nilmd-onnx-group*.onnx"):
        if old.name not in named:
            old.unlink(missing_ok=True)
    return manifest


def export_checked(model_dir, interval: int = 60, *, ckpts: dict | None = None, out_dir=None) -> tuple[dict, float]:
    """`nilmd export`: refuse a directory with a checkpoint that does not load (an export without
    it would never match the directory), export, then run both backends on one test window.
    `ckpts`/`out_dir`: a set loaded already (a building's adapted set, nilmd adapt) and where its
    export goes. Returns the manifest and the largest difference of the probabilities."""
    from nilmd.models.onnx_backend import OnnxPredictor
    from nilmd.models.predictor import Predictor

    if ckpts is None:
        ckpts, errors = checkpoints.load_dir(model_dir)
        bad = [e for e in errors.values() if not e.endswith("file not found")]
        if bad or not ckpts:
            raise NilmdError("not exported: " + ("; ".join(bad) or f"no checkpoint in {os.path.abspath(model_dir)}"))
    out = out_dir or model_dir
    manifest = export(model_dir, out_dir=out, ckpts=ckpts, interval=interval)
    rng = np.random.default_rng(0)
    p = np.abs(np.cumsum(rng.normal(0, 150, 1536)) + 1500).astype(np.float32)
    x = np.stack([p, 0.3 * p, p / 230, 1.04 * p, np.ones_like(p)], axis=1)
    _, want = Predictor(ckpts).run(x)
    _, got = OnnxPredictor(out, sources={a: c.path for a, c in ckpts.items()}).run(x)
    diff = float(np.abs(want - got).max())
    if not diff < 1e-3:
        raise NilmdError(f"the ONNX export of {out} differs from torch by {diff:.3g} in probability: not usable")
    return manifest, diff


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
