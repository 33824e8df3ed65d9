"""The package's house rules, enforced: which roles may import what (docs/DESIGN.md §9).

Each check runs in a fresh interpreter, so what an earlier test imported cannot hide a violation."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import import_blocker

ROOT = Path(__file__).resolve().parent.parent

DAEMON = ("supervisor", "reader", "inference", "ringbuffer", "control", "mapped", "snapshot", "ingest",
          "sources", "streams", "status", "notify", "ledger", "runs", "mqtt")
# /metrics's module imports its extra, prometheus-client (scripts/setup.sh installs it)
DAEMON += ("metrics",) if importlib.util.find_spec("prometheus_client") else ()

BLOCK_REDIS = import_blocker("redis")


def imported_after(code: str) -> set[str]:
    """The top-level packages and nilmd modules in sys.modules after running `code`."""
    probe = code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{code!r} failed:\n{out.stderr}"
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ["nilmd.daemon.supervisor", "nilmd.daemon.reader", "nilmd.cli"])
def test_supervisor_reader_and_cli_never_import_torch(module):
    mods = imported_after(f"import {module}")
    assert "torch" not in mods, f"importing {module} imported torch"


def test_only_the_report_imports_matplotlib():
    """The `report` extra is optional: the daemon and the command line load without it."""
    mods = imported_after("\n".join(f"import nilmd.daemon.{m}" for m in DAEMON) + "\nimport nilmd.cli, nilmd.report")
    assert "matplotlib" not in mods
def test_exporters_are_imported_only_when_asked_for():
    """A bare edge box has neither extra: the supervisor and the MQTT process's module import
    prometheus-client and paho only where --metrics-port or --mqtt-url are acted on."""
    mods = imported_after("import nilmd.daemon.supervisor, nilmd.daemon.mqtt, nilmd.homeassistant, nilmd.cli")
    leaked = sorted(m for m in mods if m.startswith(("prometheus_client", "paho")))
    assert not leaked, f"importing the daemon imported {leaked}"


def test_the_daemon_needs_neither_the_simulator_nor_the_training_code():
    mods = imported_after("\n".join(f"import nilmd.daemon.{m}" for m in DAEMON))
    leaked = sorted(m for m in mods if m.startswith(("nilmd.sim", "nilmd.training")))
    assert not leaked, f"importing the daemon imported {leaked}"


def test_the_daemon_never_imports_the_test_harness():
    """nilmd.testing and nilmd.soak start servers and processes: tests and scripts only."""
    mods = imported_after("\n".join(f"import nilmd.daemon.{m}" for m in DAEMON) + "\nimport nilmd.cli")
    leaked = sorted(m for m in mods if m in ("nilmd.testing", "nilmd.soak"))
    assert not leaked, f"importing the daemon imported {leaked}"


@pytest.mark.slow  # a fresh interpreter that imports torch: 1.5 s on a quiet box, 4 s under load
def test_models_never_need_the_daemon_simulator_or_training():
    mods = imported_after("import nilmd.models.predictor, nilmd.models.checkpoints, nilmd.models.fused")
    leaked = sorted(m for m in mods if m.startswith(("nilmd.daemon", "nilmd.sim", "nilmd.training")))
    assert not leaked, f"importing the models imported {leaked}"


def test_the_simulator_is_numpy_only():
    mods = imported_after("import nilmd.sim.simulator")
    leaked = sorted(m for m in mods if m == "torch" or m.startswith(("nilmd.daemon", "nilmd.models",
                                                                     "nilmd.training", "redis")))
    assert not leaked, f"importing the simulator imported {leaked}"


def test_supervisor_imports_without_redis_py():
    """The supervisor module itself is Redis-free: redis-py is imported where a process connects."""
    mods = imported_after(BLOCK_REDIS + "import nilmd.daemon.supervisor")
    assert "redis" not in mods


def test_the_redis_blocker_works():
    """The check above can fail: a module that needs redis-py does not import behind the blocker."""
    out = subprocess.run([sys.executable, "-c", BLOCK_REDIS + "import nilmd.redisconn"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "blocked by the test" in out.stderr


BLOCK_TORCH = import_blocker("torch")


def test_the_inference_serves_with_onnxruntime_without_torch(tmp_path):
    """A box without torch: the inference process's modules, the backend choice and the ONNX
    predictor import and run behind a blocker for torch (the export in checkpoints/ is used)."""
    pytest.importorskip("onnxruntime")
    code = BLOCK_TORCH + f"""
import numpy as np
import nilmd.daemon.inference, nilmd.cli
from nilmd.config import Config
from nilmd.models import backends
got = backends.load(Config(model_dir={str(ROOT / "checkpoints")!r}, device="auto"))
assert got.predictor.backend == "onnxruntime", got.choice
assert got.predictor.run(np.ones((100, 5), np.float32))[1].shape == (11, 100)
"""
    mods = imported_after(code)
    assert "torch" not in mods and "onnxruntime" in mods


def test_the_torch_blocker_works():
    out = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import nilmd.models.predictor"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "blocked by the test" in out.stderr


# -- the import graph ------------------------------------------------------------------------------
def import_graph(root: Path, package: str = "nilmd") -> dict[str, set[str]]:
    """Module -> the package's modules it imports, read from the source with ast: module-level and
    function-level imports alike (a function-level import only defers a circle, it does not break
    it). `from a import b` counts as an import of a.b where that is a module, else of a."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package `level - 1` above this one
                    up = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.add(full if full in files else known(base))
        graph[module] = {t for t in targets if t and t != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as a path a -> b -> ... -> a (a depth-first search)."""
    found, done, stack = [], set(), []

    def visit(m: str) -> None:
        if m in stack:
            found.append(stack[stack.index(m):] + [m])
            return
        if m in done:
            return
        stack.append(m)
        for t in sorted(graph[m]):
            visit(t)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    return found


def test_the_package_imports_in_no_circle():
    """A circle, even one hidden behind a function-level import, means two modules that cannot be
    read, changed or tested one without the other: the lower concept belongs in a module of its
    own that both import (nilmd.buildings, nilmd.daemon.batch)."""
    graph = import_graph(ROOT)
    assert {"nilmd.config", "nilmd.daemon.sharing", "nilmd.models.fused"} <= set(graph)  # it read the package
    assert "nilmd.buildings" in graph["nilmd.config"] and "nilmd.daemon.streams" in graph["nilmd.daemon.sources"]
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_circle_check_sees_a_function_level_import(tmp_path):
    """The check above can fail: a circle closed only inside a function is found."""
    pkg = tmp_path / "nilmd"
    (pkg / "daemon").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "daemon" / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def check():\n    from nilmd.daemon.sharing import parse_shard\n")
    (pkg / "daemon" / "sharing.py").write_text("from .. import config\n")
    (pkg / "low.py").write_text("import nilmd.config\n")
    graph = import_graph(tmp_path)
    assert graph["nilmd.low"] == {"nilmd.config"}
    assert circles(graph) == [["nilmd.config", "nilmd.daemon.sharing", "nilmd.config"]]
