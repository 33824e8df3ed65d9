"""A building's adapted models (issue 22): `$NILMD_STATE_DIR/models/<building>/`, written by
`nilmd adapt`, read and judged here for the daemon, `nilmd check` and `nilmd adapt --reset`
(docs/CONTRACT.md §8.6, docs/ADAPTATION.md).

The folder holds `adaptation.json` (which appliances were kept as adapted, each file's SHA-256
and that of the shipped checkpoint it started from), one checkpoint per adapted appliance in the
shipped format, and optionally the ONNX export of the building's whole set. An adapted file serves
only if everything about it holds; otherwise one line says which building, appliance and file and
why, and the shipped model serves that appliance. Nothing here ever stops the daemon.

Torch-free at import: the record and the hashes are judged by `read`, which a box without torch
can use (the ONNX export's manifest then ties the graphs to the hashed files); `load` opens the
checkpoints with torch, weights_only=True (nilmd.models.checkpoints), and judges what they say.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from nilmd.appliances import APPLIANCES, checkpoint_filename
from nilmd.errors import CheckpointError
from nilmd.models.onnx_backend import sha256

MODELS = "models"  # under the state directory, one folder per building
RECORD = "adaptation.json"
FORMAT_VERSION = 1
RERUN = "run `nilmd adapt` again"


def folder(state_dir, building: str) -> Path:
    """The building's folder. Ids are already safe file names (nilmd.config); only "." and "..",
    valid ids, are not a folder of their own: they get the snapshot's prefix (nilmd-<id>)."""
    return Path(state_dir) / MODELS / (building if building.strip(".") else f"nilmd-{building}")


@dataclass
class Adaptation:
    """What a building's folder holds, as judged so far."""

    building: str
    folder: str
    files: dict[str, str] = field(default_factory=dict)  # appliance -> its adapted checkpoint, usable so far
    refused: dict[str, str] = field(default_factory=dict)  # appliance -> why the shipped model serves instead
    problem: str = ""  # the whole folder cannot be used (then files is empty)
    record: dict = field(default_factory=dict)  # adaptation.json as read

    @property
    def adapted(self) -> tuple[str, ...]:
        """The appliances served adapted, in the fixed order (docs/CONTRACT.md §8.1)."""
        return tuple(a for a in APPLIANCES if a in self.files)

    def refuse(self, appliance: str, why: str) -> None:
        self.files.pop(appliance, None)
        self.refused[appliance] = why

    def refuse_all(self, why: str) -> None:
        for appliance in self.adapted:
            self.refuse(appliance, why)

    def lines(self) -> list[str]:
        """One line per thing not served: what, where and why."""
        if self.problem:
            return [f"building {self.building}: adapted models in {self.folder} not served: {self.problem}; "
                    "the shipped models serve"]
        return [f"building {self.building}: {a}: adapted model {Path(self.folder) / checkpoint_filename(a)} not "
                f"served: {why}; the shipped model serves" for a, why in self.refused.items()]


def say(adaptation: Adaptation | None, log, listed: bool = False) -> None:
    """Log the one line per thing not served (warnings) and what serves (info; debug for one
    building of a list, whose load sums them up)."""
    if adaptation is None:
        return
    for line in adaptation.lines():
        log.warning("%s", line)
    if adaptation.adapted:
        log.log(logging.DEBUG if listed else logging.INFO, "building %s: serving its adapted models of %s",
                adaptation.building, ", ".join(adaptation.adapted))


def shipped_sha256(checkpoints: dict) -> dict[str, str]:
    """appliance -> SHA-256 of the shipped checkpoint file it serves (`checkpoints`: appliance ->
    anything with a `.path`, or a path): what an adapted model's base_sha256 must be."""
    return {a: sha256(getattr(c, "path", c)) for a, c in checkpoints.items()}


def read(state_dir, building: str, shipped: dict[str, str]) -> Adaptation | None:
    """The building's folder judged by its record and the files' hashes, or None without a folder.
    `shipped`: appliance -> SHA-256 of the shipped checkpoint served now (shipped_sha256)."""
    where = folder(state_dir, building)
    if not os.path.lexists(where):
        return None
    out = Adaptation(building, str(where))
    try:
        record, out.problem = _record(where, building)
        if out.problem:
            return out
        out.record = record
        for appliance, entry in record["appliances"].items():
            why = _judge(where, appliance, entry, shipped)
            if why:
                out.refused[appliance] = why
            else:
                out.files[appliance] = str(where / checkpoint_filename(appliance))
    except Exception as e:  # anything at all: one building's folder never stops the daemon
        out.files.clear()
        out.problem = f"cannot be read ({type(e).__name__}: {e})"
    return out


def _record(where: Path, building: str) -> tuple[dict, str]:
    """(adaptation.json, "") or ({}, why the folder cannot be used)."""
    path = where / RECORD
    if not where.is_dir():
        return {}, "not a folder"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, f"{RECORD} is missing: {RERUN}, or `nilmd adapt --reset` to go back to the shipped models"
    except (OSError, ValueError) as e:
        return {}, f"{path} is unreadable ({getattr(e, 'strerror', None) or e}): {RERUN}"
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        version = record.get("format_version") if isinstance(record, dict) else None
        return {}, f"{path}: format_version {version!r}, this nilmd reads {FORMAT_VERSION}: {RERUN}"
    if record.get("building") != building:
        return {}, f"{path} is for building {record.get('building')!r}, not {building!r}"
    if not isinstance(record.get("appliances"), dict):
        return {}, f"{path}: 'appliances' is not an object: {RERUN}"
    return record, ""


def _judge(where: Path, appliance: str, entry, shipped: dict[str, str]) -> str:
    """Why this entry of the record cannot serve, or ""."""
    if appliance not in APPLIANCES:
        return f"unknown appliance {appliance!r}"
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("file", "sha256", "base_sha256")):
        return f"its entry in {RECORD} lacks file, sha256 or base_sha256"
    name = checkpoint_filename(appliance)
    if entry["file"] != name:  # also keeps every file inside the folder
        return f"{RECORD} names the file {entry['file']!r}; it must be {name!r}"
    path = where / name
    if not path.is_file():
        return "file not found"
    try:
        got = sha256(path)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if got != entry["sha256"]:
        return f"its SHA-256 is not the one {RECORD} records (damaged or replaced since): {RERUN}"
    if appliance not in shipped:
        return "the shipped model it was adapted from is not served (its checkpoint does not load)"
    if entry["base_sha256"] != shipped[appliance]:
        return (f"it was adapted from another shipped checkpoint (SHA-256 {entry['base_sha256'][:12]}) than the one "
                f"served now ({shipped[appliance][:12]}): the shipped model changed since: {RERUN}")
    return ""


def load(adaptation: Adaptation, shipped: dict) -> dict:
    """The usable adapted checkpoints (appliance -> nilmd.models.checkpoints.Checkpoint), each
    loaded with weights_only=True and refused (on `adaptation`) unless it is the building's, from
    the base the record names, and of the shipped model's architecture (`shipped`: appliance ->
    Checkpoint served)."""
    from nilmd.models import checkpoints  # torch: only where a set is loaded with it
    from nilmd.models.fused import arch_key

    out = {}
    for appliance, path in list(adaptation.files.items()):
        try:
            ckpt = checkpoints.load(path, appliance)
        except CheckpointError as e:
            adaptation.refuse(appliance, e.reason)
            continue
        except Exception as e:  # whatever else torch raises on a strange file: that file only
            adaptation.refuse(appliance, f"unreadable ({type(e).__name__}: {e})")
            continue
        why = _mismatch(ckpt, adaptation, shipped[appliance], arch_key)
        if why:
            adaptation.refuse(appliance, why)
        else:
            out[appliance] = ckpt
    return out


def _mismatch(ckpt, adaptation: Adaptation, base, arch_key) -> str:
    mark = ckpt.training.get("adapted")
    if not isinstance(mark, dict):
        return "its training record has no 'adapted' entry: not written by nilmd adapt"
    if mark.get("building") != adaptation.building:
        return f"it was adapted for building {mark.get('building')!r}"
    if mark.get("base_sha256") != adaptation.record["appliances"][ckpt.appliance]["base_sha256"]:
        return f"its training['adapted'].base_sha256 is not the one {RECORD} records"
    if arch_key(ckpt.config) != arch_key(base.config) or tuple(ckpt.feature_scales) != tuple(base.feature_scales):
        return (f"its architecture (hparams {ckpt.config}, feature_scales {list(ckpt.feature_scales)}) is not the "
                "shipped model's")
    return ""


def reset(state_dir, building: str) -> bool:
    """Go back to the shipped models: the building's folder is renamed away at once (a reload or
    start from then on sees none), then deleted. False if there was none."""
    where = folder(state_dir, building)
    if not os.path.lexists(where):
        return False
    gone = where.with_name(f".{where.name}.reset{os.getpid()}")
    os.rename(where, gone)
    if gone.is_dir() and not gone.is_symlink():
        shutil.rmtree(gone)
    else:
        gone.unlink()
    return True
