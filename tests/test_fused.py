"""Fused inference (nilmd.models.fused through Predictor.run) == each model run alone.

Tolerance: the fused network sums the same products in another order (batched matmuls instead
of convolutions) and computes sigmoid through tanh, so it may differ from a model run alone by
float32 rounding and by nothing else. Both are compared with the same model in float64: the
fused result must be within a small multiple of the error that the per-model float32 reference
itself makes. A wrong weight, a shifted tap or a mixed-up model gives errors orders of
magnitude above that (test_a_wrong_weight_is_caught shows the test can fail).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nilmd.models import checkpoints
from nilmd.appliances import APPLIANCES, ON_THRESHOLD_W, checkpoint_filename
from nilmd.features import SCALES
from nilmd.models.model import WaveNILM, WaveNILMConfig
from nilmd.models.predictor import Predictor

ROOT = Path(__file__).resolve().parent.parent
ROUNDING_FACTOR = 8  # fused error <= this x the per-model float32 reference's own error


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: threads only add waiting, and worse on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_checkpoints(configs: dict[str, WaveNILMConfig], seed: int = 0) -> dict[str, checkpoints.Checkpoint]:
    """Real-format checkpoints with random weights (biases too, so no term hides at zero)."""
    torch.manual_seed(seed)
    out = {}
    for name, cfg in configs.items():
        model = WaveNILM(cfg, SCALES)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5).add_(0.05 * torch.randn_like(p))
        data = checkpoints.to_dict(name, model, on_power_threshold_w=ON_THRESHOLD_W[name], max_power_w=3000.0)
        out[name] = checkpoints.Checkpoint(
            path=f"<{name}>", appliance=name, config=cfg, state_dict=data["state_dict"],
            feature_scales=tuple(data["feature_scales"]), on_power_threshold_w=data["on_power_threshold_w"],
            probability_threshold=0.5, max_power_w=3000.0)
    return out


def write_set(directory: Path, configs: dict, seed: int = 0) -> dict:
    """Random-weight checkpoints as files (an ONNX export writes their hashes into its manifest)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, c in make_checkpoints(configs, seed=seed).items():
        data = checkpoints.to_dict(name, c.model(), on_power_threshold_w=c.on_power_threshold_w,
                                   probability_threshold=0.3 + 0.03 * APPLIANCES.index(name), max_power_w=3000.0)
        checkpoints.save(directory / checkpoint_filename(name), data)
    loaded, errors = checkpoints.load_dir(directory)
    assert not [e for e in errors.values() if not e.endswith("file not found")]
    return loaded


def features(n: int, seed: int = 1) -> np.ndarray:
    """A plausible meter trace in physical units: P, Q, I, S, M."""
    rng = np.random.default_rng(seed)
    p = np.abs(np.cumsum(rng.normal(0, 150, n)) + 1500 + 2000 * (rng.random(n) < 0.1))
    q = p * rng.uniform(0, 0.5, n)
    s = np.hypot(p, q)
    return np.stack([p, q, s / 230.0, s, (rng.random(n) < 0.5).astype(float)], axis=1).astype(np.float32)


_models = {}


def reference(predictor: Predictor, x: np.ndarray, dtype=torch.float64) -> tuple[np.ndarray, np.ndarray]:
    """Each model alone (nilmd.models.model.WaveNILM), in predictor.appliances order."""
    xt = torch.from_numpy(x).T.unsqueeze(0).to(dtype)
    power, prob = [], []
    with torch.no_grad():
        for c in predictor.checkpoints:
            key = (id(c.state_dict), dtype)
            if key not in _models:  # building a module costs more than running a small one
                _models[key] = (c.state_dict, c.model().to(dtype))
            p, logit = _models[key][1](xt)
            power.append(p[0].double().numpy())
            prob.append(torch.sigmoid(logit[0]).double().numpy())
    return np.stack(power), np.stack(prob)


def assert_matches_models(predictor: Predictor, x: np.ndarray, power: np.ndarray, prob: np.ndarray,
                          last: int | None = None):
    """(power, prob) [A, last] == each model alone on x, for the newest `last` samples."""
    last = x.shape[0] if last is None else last
    p64, q64 = (r[:, -last:] for r in reference(predictor, x))
    p32, q32 = (r[:, -last:] for r in reference(predictor, x, torch.float32))
    for got, ref32, ref64, what in ((power, p32, p64, "power"), (prob, q32, q64, "probability")):
        assert got.shape == ref64.shape and got.dtype == np.float32
        own = np.abs(ref32 - ref64).max()
        floor = 2e-7 * max(np.abs(ref64).max(), 1.0)  # one float32 ulp at the largest value
        err = np.abs(got - ref64).max()
        assert err <= ROUNDING_FACTOR * own + floor, f"{what}: error {err:.3g}, float32 rounding {own:.3g}"


def test_eleven_models_fuse_into_one_network_equal_to_each_alone():
    cfg = WaveNILMConfig(channels=16, depth=10, head_channels=16)
    pred = Predictor(make_checkpoints({a: cfg for a in APPLIANCES}))
    assert len(pred.groups) == 1 and pred.groups[0][1].n_models == 11
    x = features(1536)
    power, prob = pred.run(x)
    assert_matches_models(pred, x, power, prob)


def test_default_architecture_full_window():
    pred = Predictor(make_checkpoints({a: WaveNILMConfig() for a in APPLIANCES[:4]}, seed=3))
    x = features(1536, seed=3)
    assert_matches_models(pred, x, *pred.run(x))


def test_other_architectures_run_beside_in_appliance_order():
    small = WaveNILMConfig(channels=8, depth=6, head_channels=8)
    configs = {a: small for a in APPLIANCES}
    configs["Dryer"] = WaveNILMConfig(channels=4, depth=6, head_channels=12)
    configs["Microwave"] = configs["Computer"] = WaveNILMConfig(channels=8, depth=4, head_channels=8)
    pred = Predictor(make_checkpoints(configs, seed=5))
    assert pred.appliances == list(APPLIANCES)
    assert sorted(net.n_models for _, net in pred.groups) == [1, 2, 8]
    assert pred.receptive_field == 64
    x = features(300, seed=5)
    assert_matches_models(pred, x, *pred.run(x))


@pytest.mark.parametrize("t", [1, 5, 511, 512, 513, 1300])
def test_any_length_and_chunk_boundaries(t):
    cfg = WaveNILMConfig(channels=8, depth=7, head_channels=8)
    pred = Predictor(make_checkpoints({a: cfg for a in APPLIANCES[:3]}, seed=t))
    x = features(t, seed=t)
    assert_matches_models(pred, x, *pred.run(x))


def test_a_wrong_weight_is_caught():
    cfg = WaveNILMConfig(channels=8, depth=6, head_channels=8)
    pred = Predictor(make_checkpoints({a: cfg for a in APPLIANCES[:3]}))
    x = features(200)
    net = pred.groups[0][1]
    net.w_prev[3, 1, 0, 0] += 1e-3  # one weight of one layer of one model, slightly off
    with pytest.raises(AssertionError):
        assert_matches_models(pred, x, *pred.run(x))


def test_no_models_or_no_samples():
    power, prob = Predictor({}).run(features(10))
    assert power.shape == prob.shape == (0, 10)
    pred = Predictor(make_checkpoints({a: WaveNILMConfig(channels=4, depth=3, head_channels=4) for a in APPLIANCES[:2]}))
    power, prob = pred.run(features(10)[:0])
    assert power.shape == prob.shape == (2, 0)


def test_shipped_checkpoints():
    loaded, _ = checkpoints.load_dir(ROOT / "checkpoints")
    if not loaded:
        pytest.skip("no trained checkpoints in checkpoints/ yet")
    pred = Predictor(loaded)
    x = features(1536, seed=7)
    assert_matches_models(pred, x, *pred.run(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    cfg = WaveNILMConfig()
    ckpts = make_checkpoints({a: cfg for a in APPLIANCES})
    x = features(1536)
    cpu, gpu = Predictor(ckpts, "cpu"), Predictor(ckpts, "cuda")
    assert gpu.graphs
    assert_matches_models(gpu, x, *gpu.run(x))
    for a, b in zip(cpu.run(x), gpu.run(x)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_checkpoint_files_round_trip(tmp_path):
    """The fused network built from files on disk (the daemon's path) is the same network."""
    ckpts = make_checkpoints({a: WaveNILMConfig(channels=8, depth=5, head_channels=8) for a in APPLIANCES[:2]})
    for name, c in ckpts.items():
        model = c.model()
        checkpoints.save(tmp_path / checkpoint_filename(name), checkpoints.to_dict(
            name, model, on_power_threshold_w=c.on_power_threshold_w, max_power_w=c.max_power_w))
    (tmp_path / checkpoint_filename(APPLIANCES[2])).write_bytes(b"not a checkpoint")
    beats = []  # the inference's heartbeat: once after every file, loaded, broken or missing alike
    loaded, errors = checkpoints.load_dir(tmp_path, progress=lambda: beats.append(1))
    assert len(beats) == len(APPLIANCES)
    assert loaded.keys() == ckpts.keys() and APPLIANCES[2] in errors
    x = features(100)
    np.testing.assert_array_equal(Predictor(loaded).run(x)[0], Predictor(ckpts).run(x)[0])


def test_per_layer_weights_follow_the_module_when_its_buffers_are_replaced():
    """.to(device) (here: another dtype, the same mechanism) replaces the stacked buffers; the
    per-layer views that every step uses must be cut from the new ones, never left on the old."""
    cfg = WaveNILMConfig(channels=4, depth=3, head_channels=4)
    net = Predictor(make_checkpoints({a: cfg for a in APPLIANCES[:2]})).groups[0][1]
    net.to(torch.float64)
    assert len(net.layer_weights) == cfg.depth
    for i, weights in enumerate(net.layer_weights):
        for name, w in zip(("w_cur", "w_prev", "b_conv", "w_res", "b_res", "w_skip"), weights):
            assert w.dtype == torch.float64 and w.data_ptr() == getattr(net, name)[i].data_ptr(), name
