"""A box without torch: nilmd installed with a plain `pip install nilmd` into a fresh venv (numpy,
redis-py, onnxruntime; no torch), serving the ONNX export end to end against a real
redis-server, reloading on SIGHUP, and refusing to start (exit 78) on a stale export.

The export is made here, in the development venv that has torch (as on a developer's machine),
and the daemon runs from the other venv, outside this checkout, so that nothing of it can come
from here. pip installs from the machine's package index (a local mirror on CI). And where torch
is installed, a SIGHUP swaps between the backends as the export goes stale and is made again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nilmd.testing import aligned_start
from conftest import ROOT, publish_samples, wait_for, write_checkpoints
from nilmd.appliances import APPLIANCES, checkpoint_filename
from test_daemon import Subscriber, check_prediction, wait_ready

pytestmark = pytest.mark.slow
pytest.importorskip("onnx", reason="the export needs onnx (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def torchfree_python(tmp_path_factory):
    """The interpreter of a venv with a plain nilmd (no extra) and without torch."""
    where = tmp_path_factory.mktemp("torchfree")
    src = where / "src"
    src.mkdir()
    (src / "docs").mkdir()
    for name in ("nilmd", "pyproject.toml", "LICENSE", "docs/PYPI.md"):  # a copy: pip's build never litters the checkout
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    venv = where / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a venv: {made.stderr.strip()[-200:]}")
    # pip from this venv installs into the other one (--python), which saves bootstrapping a pip there
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                          "--disable-pip-version-check", str(src)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, f"pip install nilmd failed:\n{pip.stderr[-3000:]}"
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import onnxruntime, nilmd.models.onnx_backend; import torch"],
                           capture_output=True, text=True, cwd=where)
    assert "No module named 'torch'" in probe.stderr, f"the venv must have onnxruntime and no torch: {probe.stderr}"
    return python, where


def export_set(models, seed: int) -> None:
    from nilmd.models.onnx_export import export_checked

    write_checkpoints(models, channels=4, depth=8, seed=seed)
    export_checked(models)


def test_serves_reloads_and_refuses_a_stale_export_without_torch(torchfree_python, daemon_factory, redis_client,
                                                                tmp_path):
    python, where = torchfree_python
    models = tmp_path / "models"
    export_set(models, seed=3)
    d = daemon_factory(model_dir=models, python=python, cwd=where).start()
    sub = Subscriber(redis_client, d.building)
    wait_ready(d, redis_client)
    t0 = aligned_start(time.time() - 600, 256, 16)  # the window ends at `last` (CONTRACT §4)
    last = publish_samples(redis_client, d.building, 256 + 16, start=t0)
    check_prediction(sub.until(last), APPLIANCES, 256)
    s = d.status(redis_client)
    assert s["backend"] == "onnxruntime" and s["device"] == "cpu" and s["models_loaded"] == "11"
    print(f"torch-free daemon: {s['memory_total_mb']} MB resident (inference {s['memory_inference_mb']} MB)")

    export_set(models, seed=4)  # new models, exported: the reload serves them
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_for(lambda: "reloaded: 11 models" in d.log(), 60, lambda: f"the re-exported set to load\n{d.log()[-2000:]}")
    last = publish_samples(redis_client, d.building, 16, start=last + 1)
    check_prediction(sub.until(last), APPLIANCES, 256)

    write_checkpoints(models, appliances=["Dryer"], channels=4, depth=8, seed=5)  # retrained, not exported
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_for(lambda: d.status(redis_client)["reload_failures"] == "1", 30, "the failed reload to be counted")
    assert "reload failed, still serving the previous models" in d.log()
    assert f"checkpoint {models / checkpoint_filename('Dryer')} changed since" in d.log()
    last = publish_samples(redis_client, d.building, 16, start=last + 1)
    check_prediction(sub.until(last), APPLIANCES, 256)
    assert d.status(redis_client)["backend"] == "onnxruntime"
    assert d.stop() == 0

    again = daemon_factory(model_dir=models, python=python, cwd=where).start()
    assert again.proc.wait(60) == 78, again.log()[-2000:]
    line = "is stale: checkpoint {} changed since".format(models / checkpoint_filename("Dryer"))
    assert line in again.log() and "torch is not installed to fall back to" in again.log()


def test_plain_install_runs_test_mode_on_the_shipped_models(torchfree_python):
    """`pip install nilmd`, then `nilmd run --mode test`: predictions, with ONNX Runtime, no extra."""
    python, where = torchfree_python
    nilmd = str(Path(python).parent / "nilmd")
    proc = subprocess.Popen([nilmd, "run", "--mode", "test", "--model-dir", str(ROOT / "checkpoints")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=where)
    try:
        line = wait_for(lambda: proc.stdout.readline(), 120, "a prediction on stdout", not_yet=())
        p = json.loads(line)
        assert len(p["predictions"]) == len(APPLIANCES) and "always_on_watts" in p and "other_watts" in p
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "with onnxruntime" in err and "Traceback" not in err, err[-2000:]


def test_a_reload_swaps_between_backends_where_torch_is_installed(daemon_factory, redis_client, tmp_path):
    """auto: ONNX Runtime while the export matches; a retrained checkpoint without a new export
    and a SIGHUP: one warning and torch serves (the swap is whole, no prediction is lost);
    exported again and a SIGHUP: ONNX Runtime again."""
    models = tmp_path / "models"
    export_set(models, seed=3)
    d = daemon_factory(model_dir=models).start()
    sub = Subscriber(redis_client, d.building)
    wait_ready(d, redis_client)
    last = publish_samples(redis_client, d.building, 256 + 16, start=aligned_start(time.time() - 600, 256, 16))
    check_prediction(sub.until(last), APPLIANCES, 256)
    assert d.status(redis_client)["backend"] == "onnxruntime"
    for step, backend in (("retrained", "torch"), ("exported", "onnxruntime")):
        if step == "retrained":
            write_checkpoints(models, appliances=["Dryer"], channels=4, depth=8, seed=6)
        else:
            export_set(models, seed=7)
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_for(lambda: d.log().count("reloaded: 11 models") == (1 if step == "retrained" else 2), 60,
                 lambda: f"the reload after the checkpoints were {step}\n{d.log()[-2000:]}")
        wait_for(lambda: d.status(redis_client)["backend"] == backend, 10, f"status backend={backend}")
        last = publish_samples(redis_client, d.building, 16, start=last + 1)
        check_prediction(sub.until(last), APPLIANCES, 256)
    assert "changed since" in d.log() and "serving with torch instead" in d.log()
    assert d.status(redis_client)["reload_failures"] == "0"
    assert d.stop() == 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "onnxruntime"])
def test_an_onnxruntime_that_fails_to_import_is_one_line_and_torch_serves(daemon_factory, redis_client, tmp_path,
                                                                          backend):
    """onnxruntime installed but broken (here: a package whose import fails as a missing shared
    library makes it fail): one line, torch serves, no traceback, no restart."""
    models = tmp_path / "models"
    export_set(models, seed=3)
    broken = tmp_path / "site" / "onnxruntime"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        'raise ImportError("libonnxruntime.so.1: cannot open shared object file: No such file or directory")\n')
    d = daemon_factory(model_dir=models, extra_env={"NILMD_BACKEND": backend,
                                                     "PYTHONPATH": f"{broken.parent}{os.pathsep}{ROOT}"}).start()
    sub = Subscriber(redis_client, d.building)
    wait_ready(d, redis_client)
    last = publish_samples(redis_client, d.building, 256 + 16, start=aligned_start(time.time() - 600, 256, 16))
    check_prediction(sub.until(last), APPLIANCES, 256)
    assert d.status(redis_client)["backend"] == "torch"
    log = d.log()
    lines = [line for line in log.splitlines() if "cannot be imported" in line]
    assert len(lines) == 1 and "libonnxruntime.so.1" in lines[0] and "serving with torch instead" in lines[0], log
    assert "Traceback" not in log and "failed" not in log.lower(), log
    assert d.stop() == 0
