"""The wheel as PyPI would carry it: metadata (the SPDX licence and its file, a short long
description, dependencies a plain install serves with, no test-only packages) and the shipped
models among its data files. Built with `pip wheel` from a copy of the sources."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    where = tmp_path_factory.mktemp("wheel")
    src = where / "src"
    (src / "docs").mkdir(parents=True)
    for name in ("nilmd", "pyproject.toml", "LICENSE", "docs/PYPI.md", "checkpoints"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(where / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "License classifiers are deprecated" not in built.stderr and "SetuptoolsDeprecationWarning" not in built.stderr
    (path,) = (where / "dist").glob("nilmd-*.whl")
    return zipfile.ZipFile(path)


def metadata(wheel) -> tuple[object, str]:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    text = wheel.read(name).decode()
    return Parser().parsestr(text), text


def test_licence_is_spdx_and_its_file_is_in_the_wheel(wheel):
    meta, _ = metadata(wheel)
    assert meta["License-Expression"] == "MIT" and meta["License"] is None
    licence = next(n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE"))
    text = wheel.read(licence).decode()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the nilmd authors" in text


def test_a_plain_install_serves_and_carries_no_test_tools(wheel):
    meta, text = metadata(wheel)
    plain = [r.split(";")[0].strip() for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip() for r in plain}
    assert names == {"numpy", "redis", "onnxruntime"}, plain
    extras = set(meta.get_all("Provides-Extra"))
    assert {"torch", "train", "export", "report", "metrics", "mqtt", "journal", "test"} <= extras
    assert any(r.startswith("psutil") and 'extra == "test"' in r for r in meta.get_all("Requires-Dist"))
    assert len(meta.get_payload()) < 4000, "the long description is a page, not the operator guide"
    assert len(text) < 8000


def test_the_shipped_models_and_their_onnx_export_are_data_files(wheel):
    data = {n.split("/share/nilmd/checkpoints/", 1)[1] for n in wheel.namelist() if "/share/nilmd/checkpoints/" in n}
    assert "nilmd-onnx.json" in data and any(n.endswith(".onnx") for n in data)
    assert sum(n.endswith("_best.pth") for n in data) == 11
