"""A building's adapted models (nilmd.models.adapted, issue 22 item 5): what serves, what is
refused with one line and why, going back to the shipped models; on torch and on ONNX Runtime.

Folders are made as `nilmd adapt` leaves them (nilmd.testing.write_adaptation: the shipped
checkpoint with its on-logit bias moved) and then spoiled one way per appliance."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import import_blocker, write_checkpoints
from nilmd.appliances import APPLIANCES, checkpoint_filename
from nilmd.config import Config
from nilmd.daemon import status
from nilmd.models import adapted, backends, checkpoints
from nilmd.models.onnx_backend import sha256
from nilmd.testing import write_adaptation

B = "house_7"


def config(model_dir, state_dir, building=B, **kw) -> Config:
    return Config(model_dir=str(model_dir), state_dir=str(state_dir), building_id=building, device="cpu", **kw)


def rewrite(where, appliance: str, **entry) -> None:
    """Change the record's entry for `appliance` (what a tool that edits it by hand would do)."""
    path = where / adapted.RECORD
    record = json.loads(path.read_text())
    record["appliances"].setdefault(appliance, {}).update(entry)
    path.write_text(json.dumps(record))


def test_no_folder_is_none_and_a_whole_folder_serves(model_dir, tmp_path):
    cfg = config(model_dir, tmp_path)
    got = backends.load_torch(cfg)
    assert got.adaptations == {} and all(c.path.startswith(str(model_dir)) for c in got.predictor.checkpoints)
    where = write_adaptation(tmp_path, B, model_dir, ["ElectricKettle", "Microwave"])
    assert where == tmp_path / "models" / B
    got = backends.load_torch(cfg)
    adaptation = got.adaptations[B]
    assert adaptation.adapted == ("Microwave", "ElectricKettle") and adaptation.lines() == []
    served = {c.appliance: c.path for c in got.predictor.checkpoints}
    assert served["ElectricKettle"] == str(where / checkpoint_filename("ElectricKettle"))
    assert served["Refrigerator"] == str(model_dir / checkpoint_filename("Refrigerator"))
    # another building of the same state directory is not touched
    assert backends.load_torch(config(model_dir, tmp_path, "house_8")).adaptations == {}


def test_each_bad_file_is_one_line_naming_it_and_the_shipped_model_serves(model_dir, tmp_path):
    spoiled = ["HeatPump", "Dishwasher", "WashingMachine", "Dryer", "Freezer", "Refrigerator", "Microwave",
               "Computer", "Television"]
    where = write_adaptation(tmp_path, B, model_dir, ["ElectricKettle", *spoiled])
    path = {a: where / checkpoint_filename(a) for a in APPLIANCES}
    # damaged after it was written: its hash no longer matches the record
    path["HeatPump"].write_bytes(path["HeatPump"].read_bytes()[:-100])
    # damaged and its record made to match: torch cannot read it
    path["Dishwasher"].write_bytes(path["Dishwasher"].read_bytes()[:5000])
    rewrite(where, "Dishwasher", sha256=sha256(path["Dishwasher"]))
    # adapted from a shipped checkpoint that is not the one served now (the shipped model changed)
    rewrite(where, "WashingMachine", base_sha256="0" * 64)
    # gone
    path["Dryer"].unlink()
    # another building's file copied in
    other = write_adaptation(tmp_path, "house_8", model_dir, ["Freezer"])
    shutil.copy(other / checkpoint_filename("Freezer"), path["Freezer"])
    rewrite(where, "Freezer", sha256=sha256(path["Freezer"]))
    # another architecture (fine-tuned from something else than the shipped model)
    write_checkpoints(tmp_path / "narrow", ["Refrigerator"], channels=4)
    data = torch.load(tmp_path / "narrow" / checkpoint_filename("Refrigerator"), weights_only=True)
    base = sha256(model_dir / checkpoint_filename("Refrigerator"))
    data["training"]["adapted"] = {"building": B, "base_sha256": base}
    torch.save(data, path["Refrigerator"])
    rewrite(where, "Refrigerator", sha256=sha256(path["Refrigerator"]))
    # another appliance's model under this appliance's name
    shutil.copy(path["ElectricKettle"], path["Microwave"])
    rewrite(where, "Microwave", sha256=sha256(path["Microwave"]))
    # a file outside the folder named in the record, and an appliance nilmd does not know
    rewrite(where, "Computer", file="../../etc/passwd")
    rewrite(where, "Toaster", file="toaster.pth", sha256="0", base_sha256="0")
    # a checkpoint with no mark of adaptation (a shipped file copied in by hand)
    shutil.copy(model_dir / checkpoint_filename("Television"), path["Television"])
    rewrite(where, "Television", sha256=sha256(path["Television"]))

    got = backends.load_torch(config(model_dir, tmp_path))
    adaptation = got.adaptations[B]
    assert adaptation.adapted == ("ElectricKettle",)
    served = {c.appliance: c.path for c in got.predictor.checkpoints}
    assert served["ElectricKettle"] == str(path["ElectricKettle"])
    assert all(served[a] == str(model_dir / checkpoint_filename(a)) for a in spoiled), "the shipped model serves"
    why = {
        "HeatPump": "its SHA-256 is not the one adaptation.json records",
        "Dishwasher": "not a whole torch checkpoint",
        "WashingMachine": "adapted from another shipped checkpoint",
        "Dryer": "file not found",
        "Freezer": "it was adapted for building 'house_8'",
        "Refrigerator": "its architecture",
        "Microwave": "is for 'ElectricKettle', expected 'Microwave'",
        "Computer": "names the file '../../etc/passwd'",
        "Toaster": "unknown appliance 'Toaster'",
        "Television": "no 'adapted' entry",
    }
    lines = adaptation.lines()
    assert len(lines) == len(why), "\n".join(lines)
    for appliance, reason in why.items():
        (line,) = [x for x in lines if f": {appliance}: " in x]
        assert line.startswith(f"building {B}: {appliance}: adapted model {where}/") and reason in line, line
        assert line.endswith("the shipped model serves") and "\n" not in line
    # `nilmd check`: the same lines, and the one that serves
    shipped, _ = checkpoints.load_dir(model_dir)
    checked = backends.check_adapted(config(model_dir, tmp_path), [B, "house_9"], shipped)
    assert [line for ok, line in checked if not ok] == lines
    assert [line for ok, line in checked if ok] == [f"building {B}: ElectricKettle: {path['ElectricKettle']} "
                                                    "(test: on-logit bias)"]


@pytest.mark.parametrize("spoil, reason", [
    (lambda where: (where / adapted.RECORD).unlink(), "adaptation.json is missing"),
    (lambda where: (where / adapted.RECORD).write_text("{not json"), "is unreadable"),
    (lambda where: (where / adapted.RECORD).write_text('{"format_version": 2}'), "format_version 2"),
    (lambda where: rewrite_top(where, building="house_8"), "is for building 'house_8', not 'house_7'"),
    (lambda where: rewrite_top(where, appliances=[1]), "'appliances' is not an object"),
])
def test_a_record_that_cannot_be_used_is_one_line_and_the_shipped_set_serves(model_dir, tmp_path, spoil, reason):
    where = write_adaptation(tmp_path, B, model_dir, ["ElectricKettle"])
    spoil(where)
    got = backends.load_torch(config(model_dir, tmp_path))
    (line,) = got.adaptations[B].lines()
    assert line.startswith(f"building {B}: adapted models in {where} not served: ") and reason in line, line
    assert got.adaptations[B].adapted == ()
    assert all(c.path.startswith(str(model_dir)) for c in got.predictor.checkpoints)


def rewrite_top(where, **fields) -> None:
    path = where / adapted.RECORD
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_reset_renames_the_folder_away_then_deletes_it(model_dir, tmp_path):
    where = write_adaptation(tmp_path, B, model_dir, ["ElectricKettle"])
    assert adapted.reset(tmp_path, B) is True
    assert not where.exists() and list((tmp_path / "models").iterdir()) == []
    assert adapted.reset(tmp_path, B) is False
    assert adapted.folder(tmp_path, "..") == tmp_path / "models" / "nilmd-.."  # a valid id, never a way out


def test_the_status_hash_and_its_rendering_say_what_is_adapted():
    from nilmd.daemon.control import SLOTS

    snap = {name: 0.0 for name in SLOTS}
    snap.update(models_loaded=11, models_mask=2**11 - 1, adapted_mask=1 << 8 | 1 << 7, adapted_refused_mask=1 << 5)
    fields = status.fields(Config(), "running", snap, 0, started=0.0, pids={}, restarts={})
    assert fields["models_adapted"] == "Microwave,ElectricKettle" and fields["models_adapted_refused"] == "Refrigerator"
    text = status.render({k: str(v) for k, v in fields.items()})
    assert "  adapted      Microwave, ElectricKettle; refused (the shipped model serves; the log says why): " \
           "Refrigerator" in text
    _, listing = status.render_list({"host-1": {"summary": "x", "state": "running"}}, {"b": {k: str(v) for k, v in fields.items()}})
    assert listing.splitlines()[-1].rstrip().endswith("2!")


# -- ONNX Runtime --------------------------------------------------------------------------------
@pytest.fixture
def exported_dir(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from nilmd.models.onnx_export import export

    directory = write_checkpoints(tmp_path / "shipped", APPLIANCES[6:9], channels=4, depth=4)
    export(directory)
    return directory


def test_onnx_serves_the_buildings_own_export_else_torch_serves_its_set(exported_dir, tmp_path):
    from nilmd.models.onnx_export import export
    from nilmd.models.predictor import Predictor

    state = tmp_path / "state"
    cfg = config(exported_dir, state, backend="onnxruntime")
    where = write_adaptation(state, B, exported_dir, ["Microwave"])
    # no export in the folder: torch serves the building's adapted set, and one line says why
    choice = backends.choose(cfg)
    got = backends.load_onnx(cfg, choice)
    assert got.predictor.backend == "torch" and choice.backend == "torch"
    assert choice.fallback.startswith(f"building {B}: its adapted models have no ONNX export that matches them")
    assert got.adaptations[B].adapted == ("Microwave",)
    # `nilmd adapt` exports the building's whole set into its folder: ONNX Runtime serves it
    shipped, _ = checkpoints.load_dir(exported_dir)
    own = {**shipped, "Microwave": checkpoints.load(where / checkpoint_filename("Microwave"))}
    export(exported_dir, out_dir=where, ckpts=own)
    choice = backends.choose(cfg)
    got = backends.load_onnx(cfg, choice)
    assert got.predictor.backend == "onnxruntime" and not choice.fallback
    assert got.predictor.model_dir == str(where) and got.adaptations[B].adapted == ("Microwave",)
    x = np.abs(np.random.default_rng(1).normal(800, 300, (300, 5))).astype(np.float32)
    _, want = Predictor(own).run(x)
    _, served = got.predictor.run(x)
    _, plain = Predictor(shipped).run(x)
    assert np.abs(served - want).max() < 1e-3 and np.abs(served[1] - plain[1]).max() > 1e-2
    # a box without torch, the folder's export gone: one line, and the shipped export serves
    for f in where.glob("nilmd-onnx*"):
        f.unlink()
    probe = import_blocker("torch") + f"""
from nilmd.config import Config
from nilmd.models import backends
cfg = Config(model_dir={str(exported_dir)!r}, state_dir={str(state)!r}, building_id={B!r}, backend="onnxruntime")
got = backends.load(cfg)
print(got.predictor.backend, got.predictor.model_dir, got.adaptations[{B!r}].adapted)
print(*got.adaptations[{B!r}].lines(), sep="\\n")
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    first, *lines = run.stdout.splitlines()
    assert first == f"onnxruntime {exported_dir} ()"
    assert len(lines) == 1 and lines[0].startswith(f"building {B}: Microwave: adapted model {where}/"), lines
    assert "no ONNX export that matches them" in lines[0] and "torch is not installed" in lines[0]
