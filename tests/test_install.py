"""scripts/install.sh: option handling here; the real thing in a throw-away root.

The slow test runs the installer inside a systemd-nspawn container booted by run-under-systemd.sh
(test_systemd.TOOL, a helper outside this repository; skipped without it), whose /etc, /opt and
/var start empty and whose /usr is the host's (Debian 12 with python3, python3-venv): a fresh box,
with systemd as PID 1. Steps (tests/systemd/install-checks.sh): --dry-run changes nothing; install
from scratch; a second run changes nothing; a CUDA build of torch offered on this CPU box is
refused; --enable starts the service from the installed venv as user nilmd against a real Redis
(the shipped unit, no test drop-ins) and leaves the operator's nilmd.env alone; an instance of the
installed template nilmd@.service starts as user nilmd and it and nilmd.service stop each other;
again nothing changed; --uninstall keeps config and state, a second one changes nothing, --purge removes
everything. pip installs from the machine's local package mirror only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_systemd import TOOL, require_nspawn

ROOT = Path(__file__).resolve().parent.parent
INSTALLER = ROOT / "scripts" / "install.sh"
# A local package mirror (a PEP 503 index and a wheelhouse); the test never downloads.
MIRROR = {"PIP_INDEX_URL": "file:///opt/pypi/simple", "PIP_EXTRA_INDEX_URL": "file:///opt/pypi-more/simple",
          "PIP_FIND_LINKS": "/opt/wheels"}
MIRROR_DIRS = ("/opt/pypi", "/opt/pypi-more", "/opt/wheels")


def extra_wheels() -> Path | None:
    """Wheels the box's own Python needs that the local mirror lacks. Debian 12's python3 is
    3.11.2, for which redis-py requires async-timeout (python_full_version < "3.11.3"); a real box
    gets it from PyPI. Fetched once with pip (one small wheel) and cached; None if that fails."""
    proc = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(sys.version_info >= (3, 11, 3))"],
                          capture_output=True, text=True)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nilmd-test-wheels"
    if proc.stdout.strip() == "True" or list(cache.glob("async_timeout-*.whl")):
        cache.mkdir(parents=True, exist_ok=True)
        return cache
    fetch = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:", "--no-deps",
                            "async-timeout>=4.0.3", "-d", str(cache)], capture_output=True, text=True, timeout=120)
    return cache if fetch.returncode == 0 and list(cache.glob("async_timeout-*.whl")) else None


def cuda_only_wheelhouse(where: Path) -> Path:
    """A wheelhouse holding just the metadata of a CUDA-tagged torch 2.13.1 (no code: it must never
    get installed), for the installer's guard against CUDA builds on CPU boxes."""
    import zipfile

    where.mkdir()
    name = "torch-2.13.1+cu128"
    with zipfile.ZipFile(where / f"{name}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}.dist-info/METADATA", "Metadata-Version: 2.1\nName: torch\nVersion: 2.13.1+cu128\n")
        z.writestr(f"{name}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{name}.dist-info/RECORD", "")
    return where


def run_installer(*args, env=None):
    return subprocess.run(["bash", str(INSTALLER), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_usage_errors():
    for args in (["--torch", "rocm"], ["--purge"], ["--frobnicate"], ["--backend", "tensorflow"]):
        proc = run_installer(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.strip(), "a usage error must say what is wrong"
    proc = run_installer("--help")
    assert proc.returncode == 0 and "--uninstall" in proc.stdout and "--dry-run" in proc.stdout


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", "-S", "warning", str(INSTALLER)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_installer_in_a_fresh_root(tmp_path, model_dir, redis_server):
    require_nspawn()
    missing = [d for d in MIRROR_DIRS if not Path(d).is_dir()]
    if missing:
        pytest.skip(f"no local package mirror ({', '.join(missing)}): this test does not download from the internet")
    if not Path("/usr/bin/python3").exists():
        pytest.skip("the container needs the host's /usr/bin/python3 (Debian's python3 and python3-venv)")
    wheels = extra_wheels()
    if wheels is None:
        pytest.skip("Debian's python3 3.11.2 needs async-timeout for redis-py; the local mirror lacks it and pip "
                    "could not fetch it")
    ckpt = tmp_path / "ckpt"  # world-readable copy (pytest's tmp is 0700)
    ckpt.mkdir()
    for f in model_dir.iterdir():
        shutil.copy(f, ckpt / f.name)
    from nilmd.models.onnx_export import export_checked

    export_checked(ckpt)  # for the --backend onnxruntime step (the box itself has no torch to export with)
    for p in (tmp_path, ckpt, *ckpt.iterdir()):  # tmp_path too: the binds below live in it
        p.chmod(0o755 if p.is_dir() else 0o644)
    # A snapshot of the source tree: others may edit the working tree while this runs, and the
    # installer rightly reinstalls a changed tree (which would fail the "nothing changed" step).
    src = tmp_path / "src"
    for part in ("nilmd", "scripts", "systemd", "tests/systemd", "docs", "pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / part).is_dir():
            shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / part, src / part)
    for p in (src, *src.rglob("*")):
        p.chmod(0o755 if p.is_dir() or os.access(p, os.X_OK) else 0o644)
    cuda_only_wheelhouse(tmp_path / "cuda-only")
    building = f"in{uuid.uuid4().hex[:8]}"
    mirror = {**MIRROR, "PIP_FIND_LINKS": MIRROR["PIP_FIND_LINKS"] + " /srv/wheels"}
    env = " ".join(f"{k}='{v}'" for k, v in mirror.items()) + " PIP_NO_CACHE_DIR=1"
    checks = f"{env} bash /srv/src/tests/systemd/install-checks.sh"
    common = "/srv/src /srv/ckpt"
    cmd = ["bash", str(TOOL), "--bind-ro", f"{src}:/srv/src", "--bind-ro", f"{ckpt}:/srv/ckpt",
           "--bind-ro", f"{wheels}:/srv/wheels", "--bind-ro", f"{tmp_path / 'cuda-only'}:/srv/cuda-only", "--no-analyze"]
    for d in MIRROR_DIRS:
        cmd += ["--bind-ro", d]
    steps = ("dry-run", "install", "again", "cuda-guard /srv/cuda-only", f"enable {redis_server.port} {building}",
             f"instance {redis_server.port} {building}", "again --enable", "onnx", "uninstall")
    for step in steps:
        name, _, rest = step.partition(" ")
        cmd += ["--pre", f"{checks} {name} {common} {rest}".strip()]
    cmd.append(str(src / "tests" / "systemd" / "install-probe.service"))

    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "TMPDIR": "/tmp"})
    out = proc.stdout + proc.stderr
    print(out)  # shown for a failure, or with pytest -rP
    tail = f"\n--- run-under-systemd output ({time.monotonic() - t0:.0f} s) ---\n{out[-15000:]}"
    assert "CHECK FAIL" not in out and proc.returncode == 0, "the installer test failed" + tail
    passes = re.findall(r"^CHECK PASS: .*$", out, re.M)
    assert len(passes) == 10, f"expected 10 passing steps, got {passes}" + tail
