"""Which backend serves the models (NILMD_BACKEND, README "Backends"), and loading the set.

auto: torch on a GPU box (CUDA is torch's), else ONNX Runtime when it is installed and the ONNX
export in MODEL_DIR matches the checkpoints by hash, else torch. onnxruntime: that, and a line
saying why when it cannot. torch: the fused torch path. A choice that cannot be served falls
back to torch when torch is installed, else it is a NilmdError (the inference exits 78).

Imports neither torch nor onnxruntime until a choice needs one: deciding is cheap, and a box
without torch never tries to import it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass, field

from nilmd.errors import NilmdError

TORCH, ONNX = "torch", "onnxruntime"


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # an import hook that refuses it (tests/test_layout.py)
        return False


def gpu_box() -> bool:
    """An NVIDIA GPU is present (its device nodes), judged without importing torch."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


@dataclass
class Choice:
    backend: str  # TORCH or ONNX
    reason: str  # why, in words (logged, and shown by `nilmd check`)
    fallback: str = ""  # the one line saying why the wanted backend does not serve (or serves slowly), if so
    onnx: object = None  # the OnnxPredictor when backend is ONNX (built while choosing: it checks the files)


@dataclass
class Loaded:
    predictor: object
    errors: dict = field(default_factory=dict)  # appliance -> why it is not served
    choice: Choice | None = None


def choose(cfg) -> Choice:
    want, have_torch = cfg.backend, installed("torch")
    if want == TORCH:
        return Choice(TORCH, "NILMD_BACKEND=torch")
    if want == "auto" and have_torch and (cfg.device == "cuda" or cfg.device == "auto" and gpu_box()):
        return Choice(TORCH, "auto: a GPU box, where torch runs CUDA")
    pred, why, absent = _onnx(cfg)
    if pred is not None:
        return Choice(ONNX, f"{'auto: ' if want == 'auto' else ''}the ONNX export matches the checkpoints",
                      fallback=pred.slow_for(cfg.inference_interval), onnx=pred)
    if not have_torch:
        raise NilmdError(f"cannot serve: {why}, and torch is not installed to fall back to")
    if want == "auto" and absent:  # nothing to use, nothing wrong: no onnxruntime, or no export
        return Choice(TORCH, f"auto: {why}")
    return Choice(TORCH, "fallback", fallback=f"{why}; serving with torch instead")


def _onnx(cfg) -> tuple[object, str, bool]:
    """(the OnnxPredictor or None, why there is none, whether that is simply an absence)."""
    if not installed("onnxruntime"):
        return None, "onnxruntime is not installed (a dependency of nilmd: pip install onnxruntime)", True
    from nilmd.models.onnx_backend import NoExport, OnnxExportError, OnnxPredictor

    try:
        return OnnxPredictor(cfg.model_dir, threads=cfg.threads or 1, interval=cfg.inference_interval), "", False
    except OnnxExportError as e:
        return None, str(e), isinstance(e, NoExport)


_torch_threads_set = False


def load_torch_threads(cfg) -> None:
    global _torch_threads_set
    if not _torch_threads_set:  # once per process, before the first model runs
        import torch

        torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
        _torch_threads_set = True


def load_torch(cfg, progress=None) -> Loaded:
    from nilmd.models import checkpoints
    from nilmd.models.predictor import Predictor

    load_torch_threads(cfg)
    loaded, errors = checkpoints.load_dir(cfg.model_dir, progress=progress)
    return Loaded(Predictor(loaded, cfg.device) if loaded else None, errors)


class Solo:
    """One building's predictor (torch or ONNX Runtime) behind the fleet's interface
    (nilmd.models.fleet.FleetPredictor): the inference asks both the same way, a batch at a time."""

    def __init__(self, predictor):
        self.predictor = predictor

    def __getattr__(self, name):  # appliances, probability_thresholds, device, backend, full_recomputes
        return getattr(self.predictor, name)

    def step(self, items):
        return [self.predictor.step(window, new) for _, window, new in items]

    def reset(self, building: str) -> None:
        self.predictor.reset()

    def forget(self, building: str) -> None:
        self.predictor.reset()


def load_fleet(cfg, progress=None) -> Loaded:
    """Many buildings (--building-ids): torch, batching buildings x appliances in one call."""
    from nilmd.models import checkpoints
    from nilmd.models.fleet import FleetPredictor

    if not installed("torch"):
        raise NilmdError("--building-ids serves the buildings with torch, which is not installed")
    load_torch_threads(cfg)
    choice = Choice(TORCH, "a list of buildings: batched with torch", fallback=(
        "NILMD_BACKEND=onnxruntime serves one building at a time; with --building-ids the buildings are "
        "batched with torch instead" if cfg.backend == ONNX else ""))
    loaded, errors = checkpoints.load_dir(cfg.model_dir, progress=progress)
    return Loaded(FleetPredictor(loaded, cfg.device) if loaded else None, errors, choice)


def load(cfg, progress=None) -> Loaded:
    """The whole set on the backend `cfg` asks for: Loaded.predictor is None if nothing loads.
    `progress()` is called between files (nilmd.models.checkpoints.load_dir)."""
    if cfg.building_ids:
        return load_fleet(cfg, progress)
    choice = choose(cfg)
    if choice.backend == ONNX:
        from nilmd.models.onnx_backend import not_served

        pred = choice.onnx
        out = Loaded(pred, not_served(cfg.model_dir, pred.manifest))
    else:
        out = load_torch(cfg, progress)
    out.choice = choice
    return out
