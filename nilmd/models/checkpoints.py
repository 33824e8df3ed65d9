"""Checkpoint files: one plain dict per appliance, loaded with weights_only=True (docs/CONTRACT.md §8.2).

{
  "format_version": 1,
  "architecture": "wavenilm_v3",
  "appliance": "ElectricKettle",
  "hparams": {WaveNILMConfig fields},
  "state_dict": {name: tensor},
  "features": ["P", "Q", "I", "S", "M"],
  "feature_scales": [16384.0, 4096.0, 128.0, 16384.0, 1.0],
  "on_power_threshold_w": 2000.0,
  "probability_threshold": 0.5,
  "max_power_w": 3100.0,
  "training": {data, seed, steps, code version, ...},
  "metrics": {validation metrics},
}
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nilmd.appliances import APPLIANCES, checkpoint_filename
from nilmd.errors import CheckpointError
from nilmd.features import FEATURES
from nilmd.models.model import WaveNILM, WaveNILMConfig

FORMAT_VERSION = 1
ARCHITECTURE = "wavenilm_v3"


@dataclass
class Checkpoint:
    path: str
    appliance: str
    config: WaveNILMConfig
    state_dict: dict
    feature_scales: tuple[float, ...]
    on_power_threshold_w: float
    probability_threshold: float
    max_power_w: float
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def model(self) -> WaveNILM:
        """The network with these weights, in eval mode, on the CPU."""
        net = WaveNILM(self.config, self.feature_scales)
        net.load_state_dict(self.state_dict, strict=True)
        return net.eval()


def to_dict(appliance: str, model: WaveNILM, *, on_power_threshold_w: float, probability_threshold: float = 0.5,
            max_power_w: float, training: dict | None = None, metrics: dict | None = None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "appliance": appliance,
        "hparams": dataclasses.asdict(model.config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "features": list(FEATURES),
        "feature_scales": [float(1.0 / s) for s in model.inv_scale.view(-1).tolist()],
        "on_power_threshold_w": float(on_power_threshold_w),
        "probability_threshold": float(probability_threshold),
        "max_power_w": float(max_power_w),
        "training": training or {},
        "metrics": metrics or {},
    }


def save(path, data: dict) -> None:
    """Write atomically: a reader (or a reload) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(data, tmp)
    os.replace(tmp, path)


def _require(data: dict, key: str, kind, path):
    if key not in data:
        raise CheckpointError(path, f"missing key {key!r}")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(path, f"{key!r} is {type(value).__name__}, expected {getattr(kind, '__name__', kind)}")
    return value


def lookahead_s(ckpt: Checkpoint) -> int:
    """Seconds after the state it describes that the model saw (scripts/train.py --lookahead)."""
    return int((ckpt.training.get("config") or {}).get("lookahead") or 0)


def load(path, appliance: str | None = None, *, lookahead_ok: bool = False) -> Checkpoint:
    """Load and check one file. Every failure is a CheckpointError naming the file and why.
    A look-ahead model (an experiment) is refused unless `lookahead_ok`: the daemon publishes
    real-time states, and such a model's outputs describe seconds further back."""
    path = str(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "file not found")
    try:
        # torch.save writes a zip archive; one cut short has lost its central directory, at the end,
        # and torch then says only "[Errno 22] Invalid argument".
        whole = zipfile.is_zipfile(path)
    except OSError as e:
        raise CheckpointError(path, f"unreadable ({e.strerror or e})") from None
    if not whole:
        raise CheckpointError(path, f"not a whole torch checkpoint ({os.path.getsize(path)} bytes, no zip "
                              "directory at its end): truncated, or not written by torch.save")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refused something that would run code when unpickled. torch's message goes on
        # to advise loading it with weights_only=False: never repeat that about a file that may be hostile.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(path, f"refused: it holds Python objects{what} that could run code when loaded, not "
                              "only weights; nilmd never loads such a file") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"unreadable ({text.split('. ')[0][:200]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, f"holds a {type(data).__name__}, not a checkpoint dict")
    version = _require(data, "format_version", int, path)
    if version != FORMAT_VERSION:
        raise CheckpointError(path, f"format_version {version}, this nilmd reads {FORMAT_VERSION}")
    if _require(data, "architecture", str, path) != ARCHITECTURE:
        raise CheckpointError(path, f"architecture {data['architecture']!r}, expected {ARCHITECTURE!r}")
    name = _require(data, "appliance", str, path)
    if appliance is not None and name != appliance:
        raise CheckpointError(path, f"is for {name!r}, expected {appliance!r}")
    if name not in APPLIANCES:
        raise CheckpointError(path, f"unknown appliance {name!r}")
    features = _require(data, "features", list, path)
    if features != list(FEATURES):
        raise CheckpointError(path, f"features {features}, this nilmd provides {list(FEATURES)}")
    scales = _require(data, "feature_scales", list, path)
    if len(scales) != len(FEATURES) or not all(isinstance(s, (int, float)) and s > 0 for s in scales):
        raise CheckpointError(path, "feature_scales must be one positive number per feature")
    hparams = _require(data, "hparams", dict, path)
    try:
        config = WaveNILMConfig(**hparams)
    except TypeError as e:
        raise CheckpointError(path, f"bad hparams: {e}") from None
    if config.n_features != len(FEATURES):
        raise CheckpointError(path, f"hparams.n_features {config.n_features} != {len(FEATURES)}")
    numbers = {}
    for key in ("on_power_threshold_w", "probability_threshold", "max_power_w"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(path, f"{key!r} must be a finite number")
        numbers[key] = float(value)
    if not 0.0 < numbers["probability_threshold"] < 1.0:
        raise CheckpointError(path, "probability_threshold must be in (0, 1)")
    state = _require(data, "state_dict", dict, path)
    ckpt = Checkpoint(path=path, appliance=name, config=config, state_dict=state,
                      feature_scales=tuple(float(s) for s in scales), training=data.get("training") or {},
                      metrics=data.get("metrics") or {}, **numbers)
    if lookahead_s(ckpt) and not lookahead_ok:
        raise CheckpointError(path, f"trained with a look-ahead of {lookahead_s(ckpt)} s (an experiment of "
                              "scripts/train.py --lookahead); the daemon publishes real-time states only")
    try:  # shapes and names must match the architecture the hparams describe
        ckpt.model()
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(path, f"weights do not fit the architecture: {str(e).splitlines()[0][:200]}") from None
    return ckpt


def load_dir(model_dir, appliances=APPLIANCES, *, lookahead_ok: bool = False, progress=None
             ) -> tuple[dict[str, Checkpoint], dict[str, str]]:
    """Every appliance's checkpoint in `model_dir`: (loaded by appliance, error line by appliance).
    `progress()` is called after each file: the inference's heartbeat, so that a slow box loading
    many files is not taken for hung while one file that never opens still is."""
    loaded, errors = {}, {}
    for appliance in appliances:
        path = Path(model_dir) / checkpoint_filename(appliance)
        try:
            loaded[appliance] = load(path, appliance, lookahead_ok=lookahead_ok)
        except CheckpointError as e:
            errors[appliance] = str(e)
        if progress is not None:
            progress()
    return loaded, errors
