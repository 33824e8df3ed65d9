"""Which backend serves the models (NILMD_BACKEND, docs/OPERATIONS.md, "Backends"), and loading the set.

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

from nilmd.appliances import APPLIANCES, checkpoint_filename
from nilmd.errors import NilmdError
from nilmd.models import adapted

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
    adaptations: dict = field(default_factory=dict)  # building with a folder -> its nilmd.models.adapted.Adaptation


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
    try:
        from nilmd.models.onnx_backend import NoExport, OnnxExportError, OnnxPredictor, runtime

        runtime()  # onnx_backend imports it only when a session opens
    except Exception as e:  # installed but broken (a missing shared library, a wrong build): like an absent one
        return None, f"onnxruntime is installed but cannot be imported ({broken(e)})", False
    try:
        return OnnxPredictor(cfg.model_dir, threads=cfg.threads or 1, interval=cfg.inference_interval), "", False
    except OnnxExportError as e:
        return None, str(e), isinstance(e, NoExport)


def broken(e: BaseException) -> str:
    """An import failure in one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


_torch_threads_set = False


def load_torch_threads(cfg) -> None:
    global _torch_threads_set
    if not _torch_threads_set:  # once per process, before the first model runs
        import torch

        torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
        _torch_threads_set = True


def load_torch(cfg, progress=None) -> Loaded:
    """One building's set with torch: the shipped checkpoints, its adapted ones in their place."""
    from nilmd.models import checkpoints
    from nilmd.models.predictor import Predictor

    load_torch_threads(cfg)
    loaded, errors = checkpoints.load_dir(cfg.model_dir, progress=progress)
    if not loaded:
        return Loaded(None, errors)
    own, adaptation = adapted_set(cfg, cfg.building_id, loaded, adapted.shipped_sha256(loaded))
    return Loaded(Predictor({**loaded, **own}, cfg.device), errors,
                  adaptations={cfg.building_id: adaptation} if adaptation else {})


def adapted_set(cfg, building: str, shipped: dict, shipped_sha256: dict) -> tuple[dict, object]:
    """(the building's usable adapted checkpoints by appliance, its Adaptation or None without a
    folder). Whatever is wrong is a line of the Adaptation (nilmd.models.adapted never raises)."""
    adaptation = adapted.read(cfg.state_dir, building, shipped_sha256)
    if adaptation is None or not adaptation.files:
        return {}, adaptation
    return adapted.load(adaptation, shipped), adaptation


def check_adapted(cfg, buildings, shipped: dict | None) -> list[tuple[bool, str]]:
    """`nilmd check`: (usable, line) for each adapted model of each building that has a folder.
    `shipped`: the shipped checkpoints loaded with torch; None on a box without torch, where the
    record and the files' hashes are judged (the ONNX export's manifest ties the graphs to them)."""
    if shipped is None:
        files = {a: os.path.join(cfg.model_dir, checkpoint_filename(a)) for a in APPLIANCES}
        base = adapted.shipped_sha256({a: f for a, f in files.items() if os.path.isfile(f)})
    else:
        base = adapted.shipped_sha256(shipped)
    out = []
    for building in buildings:
        if shipped is None:
            adaptation = adapted.read(cfg.state_dir, building, base)
        else:
            _, adaptation = adapted_set(cfg, building, shipped, base)
        if adaptation is None:
            continue
        for a in adaptation.adapted:
            method = adaptation.record["appliances"][a].get("method")
            out.append((True, f"building {building}: {a}: {adaptation.files[a]}" + (f" ({method})" if method else "")))
        out += [(False, line) for line in adaptation.lines()]
    return out


def load_onnx(cfg, choice: Choice, progress=None) -> Loaded:
    """One building's set with ONNX Runtime: the building folder's own export where it has
    adapted models and that export matches them and the shipped files; else torch serves its
    adapted set, where torch is installed (one line); else the shipped set (one line)."""
    from nilmd.models.onnx_backend import not_served

    errors = not_served(cfg.model_dir, choice.onnx.manifest)
    own, adaptation, why = building_export(cfg, choice)
    if why and installed("torch"):
        choice.backend, choice.fallback = TORCH, f"building {cfg.building_id}: {why}; serving with torch instead"
        return load_torch(cfg, progress)
    if why:
        adaptation.refuse_all(f"{why}, and torch is not installed to serve them")
    return Loaded(own or choice.onnx, errors, adaptations={cfg.building_id: adaptation} if adaptation else {})


def building_export(cfg, choice: Choice) -> tuple[object, object, str]:
    """(the OnnxPredictor of the building folder's export, or None; the building's Adaptation, or
    None; why its adapted models have no export to serve them, or "")."""
    from nilmd.models.onnx_backend import OnnxExportError, OnnxPredictor

    shipped = {a: entry["sha256"] for a, entry in choice.onnx.manifest["checkpoints"].items()}  # checked already
    adaptation = adapted.read(cfg.state_dir, cfg.building_id, shipped)
    if adaptation is None or not adaptation.files:
        return None, adaptation, ""
    sources = {a: adaptation.files.get(a, os.path.join(cfg.model_dir, checkpoint_filename(a))) for a in APPLIANCES}
    try:
        own = OnnxPredictor(adaptation.folder, threads=cfg.threads or 1, interval=cfg.inference_interval,
                            sources=sources)
        return own, adaptation, ""
    except OnnxExportError as e:
        return None, adaptation, ("its adapted models have no ONNX export that matches them "
                                  f"({str(e).split(': run `nilmd export')[0]})")


class Solo:
    """One building's predictor (torch or ONNX Runtime) behind the fleet's interface
    (nilmd.models.fleet.AdaptedFleet): the inference asks both the same way, a batch at a time."""

    def __init__(self, predictor, adaptation=None):
        self.predictor = predictor
        self._adaptation = adaptation  # its set was chosen at load

    def __getattr__(self, name):  # appliances, probability_thresholds, device, backend, full_recomputes
        return getattr(self.predictor, name)

    def step(self, items):
        return [self.predictor.step(window, new) for _, window, new in items]

    def reset(self, building: str) -> None:
        self.predictor.reset()

    def forget(self, building: str) -> None:
        self.predictor.reset()

    def place(self, building: str):
        return self._adaptation

    def adaptation(self, building: str):
        return self._adaptation

    def thresholds(self, building: str):
        return self.predictor.probability_thresholds


def load_fleet(cfg, progress=None, buildings=()) -> Loaded:
    """Many buildings (--building-ids): torch, batching buildings x appliances in one call; each
    of `buildings` with adapted models on its own set (nilmd.models.fleet.AdaptedFleet)."""
    from nilmd.models import checkpoints
    from nilmd.models.fleet import AdaptedFleet

    if not installed("torch"):
        raise NilmdError("--building-ids serves the buildings with torch, which is not installed")
    load_torch_threads(cfg)
    choice = Choice(TORCH, "a list of buildings: batched with torch", fallback=(
        "NILMD_BACKEND=onnxruntime serves one building at a time; with --building-ids the buildings are "
        "batched with torch instead" if cfg.backend == ONNX else ""))
    loaded, errors = checkpoints.load_dir(cfg.model_dir, progress=progress)
    if not loaded:
        return Loaded(None, errors, choice)
    base = adapted.shipped_sha256(loaded)
    fleet = AdaptedFleet(loaded, cfg.device, lambda b: adapted_set(cfg, b, loaded, base))
    out = Loaded(fleet, errors, choice)
    for building in buildings:
        adaptation = fleet.place(building)
        if adaptation is not None:
            out.adaptations[building] = adaptation
            if progress is not None:
                progress()
    return out


def load(cfg, progress=None, buildings=()) -> Loaded:
    """The whole set on the backend `cfg` asks for: Loaded.predictor is None if nothing loads.
    `progress()` is called between files (nilmd.models.checkpoints.load_dir). With a list,
    `buildings`: those served now, each with its adapted models if it has any."""
    if cfg.building_ids:
        return load_fleet(cfg, progress, buildings)
    choice = choose(cfg)
    out = load_onnx(cfg, choice, progress) if choice.backend == ONNX else load_torch(cfg, progress)
    out.choice = choice
    return out
