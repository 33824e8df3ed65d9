"""The network's maths has one home (nilmd/models/model.py): every path that serves it gives the
same outputs as WaveNILM itself, on random weights of two architectures served side by side.

The paths: the fused network of one building (Predictor: a whole window, then incremental steps),
many buildings at once (FleetPredictor), and the ONNX graphs (nilmd export, served by
OnnxPredictor). All are held to the bound of test_fused (assert_matches_models: within a small
multiple of float32 rounding of each model alone in float64).
"""

from __future__ import annotations

import pytest
import torch

from nilmd.appliances import APPLIANCES
from nilmd.models.fleet import FleetPredictor
from nilmd.models.model import GATE_FOLD, WaveNILMConfig, fold, folded_gate, gate
from nilmd.models.predictor import Predictor
from test_fused import assert_matches_models, features, one_thread, write_set  # noqa: F401 (autouse)
from test_incremental import Meter

# Two architectures in one set, so the paths also keep two groups apart and in appliance order
# (the ONNX path reads its checkpoints from files: test_fused.write_set)
WIDE_SHALLOW = WaveNILMConfig(channels=32, depth=6, head_channels=32)
NARROW_DEEP = WaveNILMConfig(channels=16, depth=10, head_channels=16)
CONFIGS = {a: NARROW_DEEP if k % 2 else WIDE_SHALLOW for k, a in enumerate(APPLIANCES[:4])}
SIZE, NEW = 1100, 60  # the window holds the deeper receptive field (1024) and one interval


def test_the_folded_gate_is_the_gate():
    """fold's scaled filter rows through folded_gate give gate / GATE_FOLD (what w_res and w_skip undo)."""
    torch.manual_seed(0)
    f, g = 4 * torch.randn(1000, 8, dtype=torch.float64), 4 * torch.randn(1000, 8, dtype=torch.float64)
    got = folded_gate(torch.cat([GATE_FOLD * f, g], dim=1), 8)
    torch.testing.assert_close(GATE_FOLD * got, gate(f, g), rtol=0, atol=1e-12)


def test_fold_names_every_weight_once(tmp_path):
    ckpts = write_set(tmp_path, CONFIGS)
    for c in ckpts.values():
        model, folded = c.model(), fold(c.model())
        cfg, F = c.config, c.config.n_features
        C, D, H = cfg.channels, cfg.depth, cfg.head_channels
        shapes = {"w_in": (F, C), "b_in": (1, C), "w_prev": (D, C, 2 * C), "w_cur": (D, C, 2 * C),
                  "b_conv": (D, 1, 2 * C), "w_res": (D, C, C), "b_res": (D, 1, C), "w_skip": (D, C, C),
                  "b_skip": (1, C), "w_h1": (C, H), "b_h1": (1, H), "w_h2": (H, 2), "b_h2": (1, 2)}
        assert {k: tuple(v.shape) for k, v in folded.items()} == shapes
        assert sum(v.numel() for v in folded.values()) == sum(p.numel() for p in model.parameters()) - (D - 1) * C


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
    from nilmd.models.onnx_backend import OnnxPredictor
    from nilmd.models.onnx_export import export

    directory = tmp_path_factory.mktemp("two-architectures")
    ckpts = write_set(directory, CONFIGS)
    export(directory, ckpts=ckpts, interval=NEW)
    predictor = Predictor(ckpts)
    assert sorted((net.channels, net.depth) for _, net in predictor.groups) == [(16, 10), (32, 6)]
    return ckpts, predictor, OnnxPredictor(directory, interval=NEW)


def test_every_path_on_a_whole_window(paths):
    _, predictor, onnx_predictor = paths
    x = features(SIZE, seed=4)
    for name, run in (("fused", predictor.run), ("onnx", onnx_predictor.run)):
        power, prob = run(x)
        assert power.shape == (len(CONFIGS), SIZE), name
        assert_matches_models(predictor, x, power, prob)


def test_every_path_step_by_step(paths, tmp_path):
    """A whole window, then intervals one at a time, two buildings at other phases: the newest
    outputs of each step equal WaveNILM's on the window."""
    ckpts, predictor, onnx_predictor = paths
    fleet = FleetPredictor(ckpts, slots=2, keep=NEW)
    meters = [Meter(tmp_path / f"ring{k}", capacity=2 * SIZE, seed=k) for k in range(2)]
    try:
        for k, m in enumerate(meters):
            m.write(SIZE + 17 * k)
        for _ in range(3):
            windows = [m.ring.window(SIZE) for m in meters]
            x = [w.features.copy() for w in windows]
            got = {"fleet": fleet.step([(f"b{k}", w, NEW) for k, w in enumerate(windows)]),
                   "fused": [predictor.step(windows[0], NEW)], "onnx": [onnx_predictor.step(windows[0], NEW)]}
            assert all(m.ring.intact(w) for m, w in zip(meters, windows))
            del windows
            for name, outputs in got.items():
                for xk, (power, prob) in zip(x, outputs):
                    assert_matches_models(predictor, xk, power, prob, last=NEW)
            for m in meters:
                m.write(NEW)
        assert fleet.full_recomputes == 2 and predictor.full_recomputes == onnx_predictor.full_recomputes == 1
    finally:
        for m in meters:
            m.close()
