"""`nilmd adapt`: learn one building from its labels and write what was learned for the daemon.

The labels (nilmd.labels: sub-metered files, smart-plug logs, confirmed runs) become one labelled
1 Hz stretch; each labelled appliance goes through nilmd.training.adapt; the appliances whose
adapted model beat the shipped one on the held-out days are written, with a record, to
`$NILMD_STATE_DIR/models/<building>/` (nilmd.models.adapted reads and checks it in the daemon).

The box it serves runs it: one thread, lowered priority, while the daemon keeps serving. The
folder is made beside the old one and swapped in by rename, so an interrupted run leaves the old
folder (or none) and never half of a new one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from nilmd.appliances import APPLIANCES, checkpoint_filename
from nilmd.errors import NilmdError
from nilmd.features import derive
from nilmd.models import adapted, checkpoints
from nilmd.models.onnx_backend import sha256
from nilmd.training import adapt

RECORD = adapted.RECORD


def lower_priority() -> None:
    """One thread at nice 10: the daemon on the same box keeps its cores and its deadlines."""
    import torch

    torch.set_num_threads(1)
    try:
        os.nice(10)
    except OSError:
        pass


def learn(cfg, building: str, labelled, *, appliances=None, out_dir=None, seed: int = 0, steps: int | None = None,
          progress=None, say=print) -> list[adapt.Outcome]:
    """Adapt every labelled appliance (or those named) of `building`; write the kept ones.
    -> the outcome of each appliance tried, in the fixed appliance order."""
    wanted = [a for a in APPLIANCES if a in labelled.targets and (not appliances or a in appliances)]
    if appliances:
        missing = [a for a in appliances if a not in labelled.targets]
        if missing:
            raise NilmdError(f"no labels for {', '.join(missing)} in the labels given for building {building!r}")
    if not wanted:
        raise NilmdError(f"the labels given for building {building!r} label no appliance")
    features = derive(np.nan_to_num(labelled.power_total), labelled.voltage, labelled.current, labelled.power_factor)
    valid = np.isfinite(labelled.power_total) & (labelled.power_total > 0)
    acfg = adapt.AdaptConfig(seed=seed, interval=cfg.inference_interval, daemon_window=cfg.window_size,
                             **({"steps": steps} if steps is not None else {}))
    outcomes = []
    for a in wanted:
        path = os.path.join(cfg.model_dir, checkpoint_filename(a))
        base = checkpoints.load(path, a)
        series = adapt.appliance_series(a, labelled.t0, features, valid, labelled.targets[a], labelled.period_s,
                                        name=f"{building} {a}")
        outcomes.append(adapt.adapt_appliance(base, series, acfg, progress=progress,
                                              base_sha256=sha256(path)))
    write(cfg, building, labelled, outcomes, out_dir=out_dir)
    return outcomes


def table(outcomes: list[adapt.Outcome]) -> str:
    """The table `nilmd adapt` prints: shipped against adapted on the held-out days."""
    def f(x, fmt):
        return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)

    head = (f"{'appliance':<15} {'days':>5} {'runs':>7}  {'shipped F1/MAE/energy':>22}  "
            f"{'adapted F1/MAE/energy':>22}  {'method':<9} {'kept':<4} why")
    rows = [head, "-" * len(head)]
    for o in outcomes:
        s, c = o.shipped, o.adapted
        cell = (lambda x: f"{f(x.f1, '.2f')} / {f(x.mae_w, '.1f')} W / {f(x.energy_error, '.0%')}" if x else "-")
        rows.append(f"{o.appliance:<15} {o.labelled_days:>5.1f} {o.runs_fit:>3}+{o.runs_heldout:<3}  {cell(s):>22}  "
                    f"{cell(c):>22}  {o.method or '-':<9} {'yes' if o.kept else 'no':<4} {o.why}")
    return "\n".join(rows)


def write(cfg, building: str, labelled, outcomes: list[adapt.Outcome], *, out_dir=None) -> Path:
    """The building's folder, made whole beside the old one and swapped in by rename. Appliances
    not tried this time keep an earlier adaptation (their files and record are carried over)."""
    final = Path(out_dir) if out_dir else adapted.folder(cfg.state_dir, building)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tried = {o.appliance for o in outcomes}
    previous = _previous(final)
    entries = {a: e for a, e in (previous.get("appliances") or {}).items() if a not in tried
               and (final / e.get("file", "")).is_file()}
    for a in entries:
        shutil.copy2(final / entries[a]["file"], tmp / entries[a]["file"])
    written = {}  # appliance -> its new checkpoint, as loaded back (the export uses it too)
    for o in outcomes:
        if not o.kept:
            continue
        name = checkpoint_filename(o.appliance)
        ck = o.checkpoint
        ck.training = {**ck.training, "adapted": {**ck.training["adapted"], "building": building}}
        data = checkpoints.to_dict(o.appliance, ck.model(), on_power_threshold_w=ck.on_power_threshold_w,
                                   probability_threshold=ck.probability_threshold, max_power_w=ck.max_power_w,
                                   training=ck.training, metrics={"heldout": o.adapted.row(),
                                                                  "heldout_shipped": o.shipped.row()})
        checkpoints.save(tmp / name, data)
        written[o.appliance] = checkpoints.load(tmp / name, o.appliance)  # what we wrote must load
        entries[o.appliance] = {"file": name, "sha256": sha256(tmp / name),
                                "base_sha256": ck.training["adapted"]["base_sha256"],
                                "method": o.method, "heldout": o.adapted.row(), "heldout_shipped": o.shipped.row()}
    record = {
        "format_version": adapted.FORMAT_VERSION, "building": building,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "appliances": entries,
        "labels": labelled.sources,
        "table": [_row(o) for o in outcomes],
        "command": " ".join(["nilmd", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("nilmd") else "",
    }
    record["onnx_max_probability_difference"] = _export_onnx(cfg, tmp, entries, written)
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    _fsync_dir(tmp)
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)
    return final


def _previous(folder: Path) -> dict:
    """The record of an earlier adaptation, to carry over what is not re-learnt ({} if none or unreadable:
    its appliances are then simply not carried over)."""
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _row(o: adapt.Outcome) -> dict:
    return {"appliance": o.appliance, "labelled_days": round(o.labelled_days, 2), "runs_fit": o.runs_fit,
            "runs_heldout": o.runs_heldout, "shipped": o.shipped.row() if o.shipped else None,
            "candidates": {m: s.row() for m, s in o.candidates.items()}, "method": o.method, "kept": o.kept,
            "why": o.why, "cpu_s": round(o.seconds, 1)}


def _export_onnx(cfg, folder: Path, entries: dict, written: dict) -> float | None:
    """Where the shipped set has an ONNX export, the building's whole set is exported too, so an
    onnxruntime daemon serves the adapted models (nilmd.models.backends.building_export); needs the
    onnx package. -> the largest probability difference from torch on a test window, or None."""
    if not entries or not (Path(cfg.model_dir) / "nilmd-onnx.json").exists():
        return None
    try:
        from nilmd.models import onnx_export
    except ImportError:
        print("nilmd adapt: the onnx package is not installed, so no ONNX export of the adapted set was written; "
              "an onnxruntime daemon serves this building's adapted models with torch where torch is installed, "
              "else the shipped ones", file=sys.stderr)
        return None
    ckpts, _ = checkpoints.load_dir(cfg.model_dir)
    for a in entries:
        ckpts[a] = written[a] if a in written else checkpoints.load(folder / entries[a]["file"], a)
    _, diff = onnx_export.export_checked(cfg.model_dir, cfg.inference_interval, ckpts=ckpts, out_dir=folder)
    return diff


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def elapsed(t0: float) -> str:
    return f"{time.monotonic() - t0:.0f} s"
