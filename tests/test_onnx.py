"""The ONNX Runtime backend (nilmd.models.onnx_export -> nilmd.models.onnx_backend) == the models.

The reference is the one of test_fused and test_incremental: each model alone in float32 and
float64 (assert_matches_models), so the ONNX path is held to the same float32-rounding bound as
the fused torch path, on full windows and across many incremental steps and wrap-arounds of a
real ring. Random weights of several architectures at once, and the shipped checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import import_blocker

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")

from nilmd.appliances import APPLIANCES, checkpoint_filename  # noqa: E402
from nilmd.config import Config  # noqa: E402
from nilmd.errors import NilmdError  # noqa: E402
from nilmd.models import backends, checkpoints  # noqa: E402
from nilmd.models.model import WaveNILMConfig  # noqa: E402
from nilmd.models.onnx_backend import (MANIFEST, NoExport, OnnxExportError, OnnxPredictor, pieces, span,  # noqa: E402
                                       step_sizes)
from nilmd.models.onnx_export import export  # noqa: E402
from nilmd.models.predictor import Predictor  # noqa: E402
from test_fused import ROOT, assert_matches_models, features, one_thread, write_set  # noqa: E402, F401
from test_incremental import Meter, check_step, walk_plan  # noqa: E402

SMALL = WaveNILMConfig(channels=8, depth=5, head_channels=8)  # receptive field 32
MIXED = {a: SMALL for a in APPLIANCES}  # three groups: 9 small, 2 wide (as a later model may ship), 1 shallow
MIXED.update({"Dryer": WaveNILMConfig(channels=32, depth=5, head_channels=32),
              "HeatPump": WaveNILMConfig(channels=32, depth=5, head_channels=32),
              "Microwave": WaveNILMConfig(channels=4, depth=3, head_channels=12)})


def exported(directory: Path, configs: dict = MIXED, seed: int = 0) -> tuple[Predictor, OnnxPredictor]:
    loaded = write_set(directory, configs, seed)
    export(directory, ckpts=loaded)
    return Predictor(loaded), OnnxPredictor(directory)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return exported(tmp_path_factory.mktemp("mixed"))


@pytest.mark.parametrize("t", [1, 5, 100, 256, 257, 513, 1300])
def test_full_window_equals_each_model_for_several_architectures(mixed, t):
    torch_pred, onnx_pred = mixed
    assert onnx_pred.appliances == torch_pred.appliances == list(APPLIANCES)
    assert sorted(len(g.rows) for g in onnx_pred.groups) == [1, 2, 8]
    assert onnx_pred.receptive_field == torch_pred.receptive_field == 32
    np.testing.assert_array_equal(onnx_pred.probability_thresholds, torch_pred.probability_thresholds)
    x = features(t, seed=t)
    assert_matches_models(torch_pred, x, *onnx_pred.run(x))


def test_a_wrong_weight_in_the_graph_is_caught(tmp_path):
    """The comparison can fail: one weight of one layer of one model slightly off in the file."""
    import onnx
    from onnx import numpy_helper

    torch_pred, _ = exported(tmp_path, {a: SMALL for a in APPLIANCES[:3]})
    path = tmp_path / "nilmd-onnx-group0-step60.onnx"  # 200 samples: 3 steps of 60, 20 of 1
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == "l3_f_w")
    w = numpy_helper.to_array(init).copy()
    w[1, 0, 0] += 1e-3
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    path.write_bytes(model.SerializeToString())
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    graph = next(gr for gr in manifest["groups"][0]["graphs"] if gr["file"] == path.name)
    graph["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    x = features(200)
    with pytest.raises(AssertionError):
        assert_matches_models(torch_pred, x, *OnnxPredictor(tmp_path).run(x))


def test_export_is_deterministic(tmp_path):
    write_set(tmp_path / "a", MIXED, seed=4)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    export(tmp_path / "a")
    export(tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "a").glob("nilmd-onnx*"))
    steps = ("256", "256-nohead", 60, 1)
    assert files == sorted(f"nilmd-onnx-group{k}-step{n}.onnx" for k in range(3) for n in steps) + [MANIFEST]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_the_benchmarks_floor_is_the_step_on_zero_history(mixed):
    """scripts/bench.py's floor (a step graph without history in or out) computes what the step
    graph does from the zero history: the same arithmetic, so a fair floor."""
    from nilmd.models.onnx_backend import runtime
    from nilmd.models.onnx_export import build_group

    ort = runtime()

    x = np.ascontiguousarray(features(60).T[None, :, None, :])
    for k, (_, net) in enumerate(mixed[0].groups):
        step, floor = (ort.InferenceSession(build_group(net, f"g{k}", 60, history=h).SerializeToString(),
                                            providers=["CPUExecutionProvider"]) for h in (True, False))
        assert [i.name for i in floor.get_inputs()] == ["x"]
        zero = {i.name: np.zeros(i.shape, np.float32) for i in step.get_inputs() if i.name != "x"}
        want = step.run(["power", "probability"], {"x": x, **zero})
        got = floor.run(["power", "probability"], {"x": x})
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_shipped_checkpoints_and_their_shipped_export(tmp_path):
    """The export in checkpoints/ is what `nilmd export` makes of the checkpoints there (same
    bytes: so it is current), and it equals each model."""
    shipped = sorted((ROOT / "checkpoints").glob("wavenilm_v3_SOTA_*_best.pth"))
    if not shipped:
        pytest.skip("no trained checkpoints in checkpoints/ yet")
    for p in shipped:
        shutil.copy(p, tmp_path)
    loaded, _ = checkpoints.load_dir(tmp_path)
    export(tmp_path, ckpts=loaded)
    for p in sorted(tmp_path.glob("nilmd-onnx*")):
        ours = ROOT / "checkpoints" / p.name
        assert ours.exists() and ours.read_bytes() == p.read_bytes(), \
            f"checkpoints/{p.name} is not the export of the checkpoints there: run `nilmd export --model-dir checkpoints`"
    x = features(1536, seed=7)
    assert_matches_models(Predictor(loaded), x, *OnnxPredictor(tmp_path).run(x))


# -- following the ring ---------------------------------------------------------------------------
@pytest.mark.parametrize("interval", [pytest.param(1, marks=pytest.mark.slow), 60])  # 1: hundreds of steps
def test_many_steps_across_wraparound(mixed, tmp_path, interval):
    torch_pred, onnx_pred = mixed
    onnx_pred.reset()
    recomputes = onnx_pred.full_recomputes
    m = Meter(tmp_path / "ring", capacity=160)
    try:
        size = 96
        m.write(size)
        check_step(onnx_pred, m.ring, size, interval, torch_pred)
        for _ in range(300 if interval == 1 else 12):  # the ring (160) laps 1.9 and 4.5 times
            m.write(interval)
            check_step(onnx_pred, m.ring, size, interval, torch_pred)
        assert onnx_pred.full_recomputes - recomputes == 1  # only the first
    finally:
        m.close()


@settings(max_examples=10, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 3), st.booleans()), min_size=1, max_size=20))
def test_any_schedule(mixed, tmp_path_factory, plan):
    """Steps of any size, samples written without a step, gaps: always the full recomputation's
    newest outputs; incremental whenever it can be."""
    torch_pred, onnx_pred = mixed
    onnx_pred.reset()
    start = onnx_pred.full_recomputes
    m = Meter(tmp_path_factory.mktemp("ring") / "ring", capacity=200, seed=len(plan))
    try:
        fulls = walk_plan(onnx_pred, m, plan, reference=torch_pred)
        assert onnx_pred.full_recomputes - start == fulls
    finally:
        m.close()


def test_reset_repeats_and_run_between_steps(mixed, tmp_path):
    """reset() and a repeated window recompute; run() in between leaves the position alone;
    a step of an exported size binds nothing new (its arrays are bound once, at load)."""
    torch_pred, onnx_pred = mixed
    onnx_pred.reset()
    start = onnx_pred.full_recomputes
    m = Meter(tmp_path / "ring", capacity=200)
    try:
        m.write(64)
        check_step(onnx_pred, m.ring, 64, 4, torch_pred)
        check_step(onnx_pred, m.ring, 64, 4, torch_pred)  # the same window: nothing new to continue with
        assert onnx_pred.full_recomputes - start == 2
        for _ in range(3):
            m.write(4)
            check_step(onnx_pred, m.ring, 64, 4, torch_pred)
        bound = [{n: (st.io, st.x, st.power, *st.hist, *st.h) for n, st in g.steps.items()} for g in onnx_pred.groups]
        onnx_pred.run(features(300))
        m.write(4)
        check_step(onnx_pred, m.ring, 64, 4, torch_pred)
        assert onnx_pred.full_recomputes - start == 2
        for g, before in zip(onnx_pred.groups, bound):
            for n, held in before.items():
                st = g.steps[n]
                assert all(a is b for a, b in zip((st.io, st.x, st.power, *st.hist, *st.h), held)), "a step re-bound"
        onnx_pred.reset()
        m.write(4)
        check_step(onnx_pred, m.ring, 64, 4, torch_pred)
        assert onnx_pred.full_recomputes - start == 3
    finally:
        m.close()


def test_step_sizes_bound_the_largest_graph():
    assert step_sizes(60) == [256, 60, 1] and step_sizes(1) == [256, 1] and step_sizes(256) == [256, 1]
    assert step_sizes(300) == [256, 44, 1] and step_sizes(3600) == [256, 16, 1] and step_sizes(512) == [256, 1]
    assert pieces(3600, step_sizes(3600)) == [256] * 14 + [16]


def test_pieces_are_the_fewest_steps():
    assert pieces(1536, [256, 60, 1]) == [256] * 6
    assert pieces(121, [256, 60, 1]) == [60, 60, 1]
    assert pieces(300, [300, 256, 1]) == [300] and pieces(512, [300, 256, 1]) == [256, 256]
    assert pieces(7, [256, 60, 1]) == [1] * 7 and pieces(0, [60, 1]) == []


def test_history_buffers_wrap_at_every_offset_and_after_a_break(tmp_path):
    """Dilations up to 128 against steps of 60 (and of sizes that are sums of steps): the circular
    history wraps at a different column every step. A break restarts from the zero history."""
    deep = WaveNILMConfig(channels=4, depth=8, head_channels=8)  # receptive field 256
    torch_pred, onnx_pred = exported(tmp_path / "m", {a: deep for a in APPLIANCES[:4]}, seed=3)
    assert sorted(onnx_pred.groups[0].steps) == [1, 60, 256] and list(onnx_pred.groups[0].quiet) == [256]
    assert onnx_pred.groups[0].dilations[-1] == 128
    m = Meter(tmp_path / "ring", capacity=700, seed=5)
    try:
        size = 300  # the newest 300 - 256 + 1 = 45 outputs see no padding
        m.write(size)
        check_step(onnx_pred, m.ring, size, 45, torch_pred)
        for n in [60] * 13 + [7, 61, 121, 1, 1, 45]:  # 60 does not divide 128: every offset differs
            m.write(n)
            check_step(onnx_pred, m.ring, size, min(n, 45), torch_pred)
        assert onnx_pred.full_recomputes == 1
        assert onnx_pred.groups[0].t == size + 13 * 60 + 7 + 61 + 121 + 2 + 45
        m.ring.mark_break()
        m.write(size)
        check_step(onnx_pred, m.ring, size, 45, torch_pred)
        assert onnx_pred.full_recomputes == 2 and onnx_pred.groups[0].t == size
        for _ in range(5):
            m.write(60)
            check_step(onnx_pred, m.ring, size, 45, torch_pred)
        assert onnx_pred.full_recomputes == 2
    finally:
        m.close()


def test_span_covers_what_the_outputs_see_in_few_steps():
    sizes = [256, 60, 1]
    assert span(1536, 60 + 1023, sizes) == 1084 and pieces(1084, sizes) == [256] * 4 + [60]  # the shipped set
    assert span(1536, 1 + 1023, sizes) == 1024 and span(1536, 1600, sizes) == 1536 and span(100, 100, sizes) == 100
    for t, need in [(300, 17), (700, 301), (1536, 999), (64, 63)]:
        n = span(t, need, sizes)
        assert need <= n <= t and len(pieces(n, sizes)) <= len(pieces(need, sizes))


def test_a_full_recompute_runs_only_the_samples_its_outputs_see(tmp_path):
    """A 600-sample window, receptive field 256, 5 outputs: 316 samples from the zero history (a
    step of 256 and one of 60) give the models' outputs on the whole window; 250 would not (the
    one path from the oldest samples is too weak to show in float32 at 259)."""
    deep = WaveNILMConfig(channels=4, depth=8, head_channels=8)
    torch_pred, onnx_pred = exported(tmp_path / "m", {a: deep for a in APPLIANCES[:3]}, seed=2)
    g = onnx_pred.groups[0]
    m = Meter(tmp_path / "ring", capacity=900, seed=1)
    try:
        m.write(600)
        check_step(onnx_pred, m.ring, 600, 5, torch_pred)
        assert g.t == 316 and onnx_pred.full_recomputes == 1
        x = m.ring.window(600).features.copy()
        g.zero()
        power, prob = g.run(x[-250:], 5)  # 10 samples short of what output 600 - 5 sees
        with pytest.raises(AssertionError):
            assert_matches_models(torch_pred, x, power, prob, last=5)
        onnx_pred.reset()  # (that run moved the history on behind its back)
        m.write(5)
        check_step(onnx_pred, m.ring, 600, 5, torch_pred)
        for _ in range(3):  # and the history a trimmed recompute leaves is exact
            m.write(5)
            check_step(onnx_pred, m.ring, 600, 5, torch_pred)
        assert onnx_pred.full_recomputes == 2
    finally:
        m.close()


@pytest.mark.parametrize("interval", [1, pytest.param(60, marks=pytest.mark.slow)])
def test_daemon_sized_models_and_window(tmp_path, interval):
    """11 models of the shipped architecture on a 1536-sample window (computed in chunks)."""
    shipped = WaveNILMConfig(channels=16, depth=10, head_channels=32)
    torch_pred, onnx_pred = exported(tmp_path / "m", {a: shipped for a in APPLIANCES})
    m = Meter(tmp_path / "ring", capacity=3200)
    try:
        m.write(1536)
        check_step(onnx_pred, m.ring, 1536, interval, torch_pred)
        # the receptive field and the outputs: 4 steps of 256 without heads, then one of the interval
        assert onnx_pred.groups[0].t == {1: 1025, 60: 1084}[interval]
        for _ in range(2):
            m.write(interval)
            check_step(onnx_pred, m.ring, 1536, interval, torch_pred)
        assert onnx_pred.full_recomputes == 1
        assert onnx_pred.groups[0].steps[256].sess is None  # the 256-step with heads: opened when first needed
        x = features(512, seed=2)
        assert_matches_models(torch_pred, x, *onnx_pred.run(x))  # which run() is: 2 steps of 256
        assert onnx_pred.groups[0].steps[256].sess is not None
    finally:
        m.close()


# -- matching the checkpoints -----------------------------------------------------------------------
SET = {a: SMALL for a in APPLIANCES[:3]}


def cfg_for(directory, backend="auto") -> Config:
    return Config(model_dir=str(directory), backend=backend, device="cpu")


def test_an_export_that_matches_is_chosen(tmp_path):
    exported(tmp_path, SET)
    for backend in ("auto", "onnxruntime"):
        got = backends.load(cfg_for(tmp_path, backend))
        assert got.predictor.backend == "onnxruntime" and not got.choice.fallback
        assert set(got.errors) == set(APPLIANCES[3:]) and all(e.endswith("file not found") for e in got.errors.values())
    assert backends.load(cfg_for(tmp_path, "torch")).predictor.backend == "torch"


def test_onnxruntime_writes_nothing_in_home_and_sends_no_telemetry(tmp_path):
    """A served export leaves $HOME as it was: ONNX Runtime's telemetry (a device id under
    ~/.cache/Microsoft, and a warning in the journal where it cannot write one) is off unless the
    operator turns it on. A fresh process, since onnxruntime reads the setting once."""
    exported(tmp_path / "models", SET)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    code = ("import sys; from nilmd.config import Config; from nilmd.models import backends; "
            "from test_fused import features; "
            "p = backends.load(Config(model_dir=sys.argv[1], backend='onnxruntime', device='cpu')).predictor; "
            "p.run(features(1536)); print(p.backend)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "models")], capture_output=True, text=True,
                         env={**env, "HOME": str(home)}, cwd=ROOT / "tests", timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "onnxruntime", out.stdout + out.stderr
    assert "telemetry" not in out.stderr, out.stderr
    assert not list(home.rglob("*")), f"onnxruntime wrote {sorted(map(str, home.rglob('*')))}"


@pytest.mark.parametrize("change", ["retrained", "removed", "added", "damaged graph", "garbage graph", "bad manifest",
                                    "malformed manifest", "old format"])
def test_a_stale_or_broken_export_is_one_line_and_torch_serves(tmp_path, change):
    exported(tmp_path, SET)
    graph = tmp_path / "nilmd-onnx-group0-step60.onnx"  # (the daemon's, INFERENCE_INTERVAL=60: opened at load)
    if change == "retrained":
        write_set(tmp_path, {APPLIANCES[1]: SMALL}, seed=9)
        expect = f"checkpoint {tmp_path / checkpoint_filename(APPLIANCES[1])} changed since"
    elif change == "removed":
        (tmp_path / checkpoint_filename(APPLIANCES[2])).unlink()
        expect = f"checkpoint {tmp_path / checkpoint_filename(APPLIANCES[2])} is gone"
    elif change == "added":
        write_set(tmp_path, {APPLIANCES[5]: SMALL}, seed=9)
        expect = f"checkpoint {tmp_path / checkpoint_filename(APPLIANCES[5])} is not in it"
    elif change == "damaged graph":
        data = bytearray(graph.read_bytes())
        data[len(data) // 2] ^= 0xFF
        graph.write_bytes(bytes(data))
        expect = f"ONNX file {graph} is damaged"
    elif change == "garbage graph":  # the manifest vouches for it, ONNX Runtime does not load it
        graph.write_bytes(b"not a graph")
        manifest = json.loads((tmp_path / MANIFEST).read_text())
        next(gr for gr in manifest["groups"][0]["graphs"] if gr["n"] == 60)["sha256"] = \
            hashlib.sha256(b"not a graph").hexdigest()
        (tmp_path / MANIFEST).write_text(json.dumps(manifest))
        expect = f"ONNX file {graph} does not load"
    elif change == "malformed manifest":  # valid JSON, but not what nilmd export writes
        manifest = json.loads((tmp_path / MANIFEST).read_text())
        del manifest["groups"][0]["graphs"][0]["sha256"]
        (tmp_path / MANIFEST).write_text(json.dumps(manifest))
        expect = f"ONNX manifest {tmp_path / MANIFEST} is malformed"
    elif change == "old format":  # an export of an earlier nilmd: its graphs take other inputs
        manifest = json.loads((tmp_path / MANIFEST).read_text())
        manifest["format_version"] = 1
        (tmp_path / MANIFEST).write_text(json.dumps(manifest))
        expect = f"ONNX manifest {tmp_path / MANIFEST}: format_version 1, this nilmd reads 2: run `nilmd export"
    else:
        (tmp_path / MANIFEST).write_text("{")
        expect = f"ONNX manifest {tmp_path / MANIFEST} is unreadable"
    with pytest.raises(OnnxExportError) as e:
        OnnxPredictor(tmp_path)
    assert expect in str(e.value) and "\n" not in str(e.value)
    for backend in ("auto", "onnxruntime"):
        choice = backends.choose(cfg_for(tmp_path, backend))
        assert choice.backend == "torch" and expect in choice.fallback and choice.fallback.endswith("with torch instead")


def test_the_graphs_the_schedule_never_needs_open_on_first_use(tmp_path):
    torch_pred, _ = exported(tmp_path, SET)

    def opened(pred):
        return [n for n, s in sorted(pred.groups[0].steps.items()) if s.sess is not None]

    assert opened(backends.load(cfg_for(tmp_path).replace(inference_interval=1)).predictor) == [1]
    pred = backends.load(cfg_for(tmp_path)).predictor  # INFERENCE_INTERVAL=60
    assert opened(pred) == [60] and pred.groups[0].quiet[256].sess is not None
    x = features(257, seed=4)
    power, prob = pred.run(x)  # 256 + 1, every output: the 256-step with heads and the 1-s step open now
    assert opened(pred) == [1, 60, 256]
    assert_matches_models(torch_pred, x, power, prob)


def test_an_export_for_another_interval_serves_with_one_line(tmp_path):
    exported(tmp_path, SET)  # made for 60 s
    for interval, slow in ((60, False), (1, False), (120, True), (300, True)):
        choice = backends.choose(cfg_for(tmp_path).replace(inference_interval=interval))
        assert choice.backend == "onnxruntime" and bool(choice.fallback) == slow, (interval, choice.fallback)
    assert choice.fallback == (f"the ONNX export in {tmp_path} has no step of 44 samples for INFERENCE_INTERVAL=300 "
                               "(it was made for another interval): each interval runs as several smaller steps; "
                               "`nilmd export --inference-interval 300` makes it")
    export(tmp_path, interval=300)
    assert not backends.choose(cfg_for(tmp_path).replace(inference_interval=300)).fallback


def test_no_export_is_torch_without_a_warning_under_auto(tmp_path, monkeypatch):
    write_set(tmp_path, SET)
    with pytest.raises(NoExport):
        OnnxPredictor(tmp_path)
    choice = backends.choose(cfg_for(tmp_path))
    assert choice.backend == "torch" and not choice.fallback and "no ONNX export" in choice.reason
    assert backends.choose(cfg_for(tmp_path, "onnxruntime")).fallback  # asked for: said
    # Without torch to fall back to, the same is the one line the inference exits 78 with.
    monkeypatch.setattr(backends, "installed", lambda m: m != "torch")
    with pytest.raises(NilmdError, match="no ONNX export .* and torch is not installed to fall back to"):
        backends.choose(cfg_for(tmp_path))


def test_auto_takes_torch_on_a_gpu_box_and_without_onnxruntime(tmp_path, monkeypatch):
    exported(tmp_path, SET)
    monkeypatch.setattr(backends, "gpu_box", lambda: True)
    assert backends.choose(cfg_for(tmp_path).replace(device="auto")).reason == "auto: a GPU box, where torch runs CUDA"
    assert backends.choose(cfg_for(tmp_path)).backend == "onnxruntime"  # --device cpu on a GPU box
    assert backends.choose(cfg_for(tmp_path, "onnxruntime")).backend == "onnxruntime"  # asked for: CPU all the same
    monkeypatch.setattr(backends, "gpu_box", lambda: False)
    monkeypatch.setattr(backends, "installed", lambda m: m != "onnxruntime")
    quiet = backends.choose(cfg_for(tmp_path))
    assert quiet.backend == "torch" and not quiet.fallback and "onnxruntime is not installed" in quiet.reason
    said = backends.choose(cfg_for(tmp_path, "onnxruntime"))
    assert said.backend == "torch" and "onnxruntime is not installed (a dependency of nilmd: pip install onnxruntime)" in said.fallback


def test_export_without_onnx_is_one_line(tmp_path):
    import subprocess
    import sys

    block = import_blocker("onnx") + "from nilmd import cli\nsys.exit(cli.main(['export', '--model-dir', sys.argv[1]]))\n"
    write_set(tmp_path, SET)
    out = subprocess.run([sys.executable, "-c", block, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "nilmd export needs torch and onnx, and onnx is not installed" in out.stderr
    assert not (tmp_path / MANIFEST).exists()
