"""systemd/nilmd@.service, one nilmd per building: the template agrees with nilmd.service on every
directive but the instance's own, verifies clean and scores no worse; then two instances from
the template under a real (throw-away) systemd 252 with a real Redis.

The slow test boots systemd with run-under-systemd.sh (see test_systemd.py), which runs one unit:
it gets the template under A's name, and tests/systemd/instance-checks.sh (setup) swaps in the
template itself so that A and B both load from nilmd@.service. The operator's files: a shared
nilmd.env that also holds a stray BUILDING_ID, NILMD_RUNTIME_DIR and NILMD_STATE_DIR (which the
instance's own must beat), B.env with a Redis ACL user that only B's own password
(/etc/nilmd/B/redis-password, through an instance drop-in) opens. Checks: both active (READY)
with their own runtime and state directories and status hashes; stopping A leaves B running and
counting; an escaped instance name fails with exit 2; B stops clean.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from test_systemd import TOOL, Publisher, exposure, password_redis, require_nspawn  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "nilmd.service"
TEMPLATE = ROOT / "systemd" / "nilmd@.service"
INSTANCE_ARGS = " --building-id %i --runtime-dir %t/nilmd/%i --state-dir %S/nilmd/%i"
# What the template changes, and nothing else: every other directive (hardening, credentials,
# watchdog, restart and exit-code rules, reload, limits) must be nilmd.service's, value for value.
OWN = {("Unit", "Description"), ("Unit", "Conflicts"), ("Unit", "After"), ("Service", "ExecStart"), ("Service", "EnvironmentFile"),
       ("Service", "SyslogIdentifier"), ("Service", "RuntimeDirectory"), ("Service", "StateDirectory")}


def directives(path: Path) -> dict[tuple[str, str], list[str]]:
    section, found = "", defaultdict(list)
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found[(section, key)].append(value)
    return dict(found)


def test_template_agrees_with_the_single_unit():
    single, template = directives(UNIT), directives(TEMPLATE)
    drift = {k: (single.get(k), template.get(k)) for k in single.keys() | template.keys()
             if k not in OWN and single.get(k) != template.get(k)}
    assert not drift, f"nilmd@.service and nilmd.service differ (single, template): {drift}"
    assert template[("Service", "ExecStart")] == [single[("Service", "ExecStart")][0] + INSTANCE_ARGS]
    assert template[("Service", "EnvironmentFile")] == single[("Service", "EnvironmentFile")] + ["-/etc/nilmd/%i.env"]
    for key in ("RuntimeDirectory", "StateDirectory"):
        assert template[("Service", key)] == [single[("Service", key)][0] + "/%i"]
    assert template[("Service", "SyslogIdentifier")] == [single[("Service", "SyslogIdentifier")][0] + "@%i"]
    # stopped before an instance starts, and the other way round (systemd orders a stop before a
    # start whichever way After= points)
    assert template[("Unit", "Conflicts")] == ["nilmd.service"]
    assert template[("Unit", "After")] == single[("Unit", "After")] + ["nilmd.service"]
    assert "%i" in template[("Unit", "Description")][0]


def _analyze():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")


def _checkable(tmp_path: Path, unit: Path, name: str) -> Path:
    """A copy that verify accepts (ExecStart at an executable that exists), under an instance's
    name: systemd-analyze resolves the specifiers of a file named nilmd@ID.service."""
    text = re.sub(r"(?m)^ExecStart=/opt/nilmd/venv/bin/nilmd run", "ExecStart=/bin/true run", unit.read_text())
    assert "ExecStart=/bin/true run" in text
    path = tmp_path / name
    path.write_text(text)
    return path


def test_template_verifies_and_scores_no_worse(tmp_path):
    _analyze()
    instance = _checkable(tmp_path, TEMPLATE, "nilmd@house-7.service")
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(instance)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
    single = exposure(_checkable(tmp_path, UNIT, "nilmd.service"))
    assert exposure(instance) <= single, "nilmd@.service is exposed more than nilmd.service"


@pytest.mark.slow
def test_two_instances_under_real_systemd(tmp_path, model_dir, password_redis):
    require_nspawn()
    port, password, client = password_redis
    tag = uuid.uuid4().hex[:6]
    a, b = f"ta{tag}", f"tb-{tag}"  # B's '-' must reach the daemon as it is (%i, not %I)
    own_password = secrets.token_hex(16)
    client.execute_command("ACL", "SETUSER", f"nilmd-{b}", "on", f">{own_password}", "~*", "&*", "+@all")
    venv, prefix = Path(sys.prefix), Path(os.path.realpath(sys.base_prefix))

    srv = tmp_path / "srv"  # everything the container reads, world-readable (pytest's tmp is 0700)
    (srv / "checkpoints").mkdir(parents=True)
    for f in model_dir.iterdir():
        shutil.copy(f, srv / "checkpoints" / f.name)
    (srv / "redis-password").write_text(password + "\n")
    (srv / "B-redis-password").write_text(own_password + "\n")
    shared = {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": port, "MODEL_DIR": "/srv/nilmd-test/checkpoints",
              "WINDOW_SIZE": 256, "INFERENCE_INTERVAL": 16, "NILMD_RING_CAPACITY": 1024,
              "NILMD_STATUS_INTERVAL": 0.5, "NILMD_HEARTBEAT_TIMEOUT": 8, "NILMD_THREADS": 1,
              # left over from a single-unit install: the instance's own must win
              "BUILDING_ID": "building_1", "NILMD_RUNTIME_DIR": "/run/nilmd", "NILMD_STATE_DIR": "/var/lib/nilmd"}
    (srv / "nilmd.env").write_text("".join(f"{k}={v}\n" for k, v in shared.items()))
    (srv / "B.env").write_text(f"REDIS_USERNAME=nilmd-{b}\n")
    shutil.copy(TEMPLATE, srv / "nilmd@.service")
    for p in [srv, *srv.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    overrides = (ROOT / "tests" / "systemd" / "test-overrides.conf").read_text()
    run_line = "ExecStart=@VENV@/bin/python -m nilmd run\n"
    assert run_line in overrides
    dropin = tmp_path / "test-overrides.conf"  # the template's own arguments, the checkout's python
    dropin.write_text(overrides.replace(run_line, run_line.rstrip("\n") + INSTANCE_ARGS + "\n")
                      .replace("@PYPREFIX@", str(prefix)).replace("@VENV@", str(venv)).replace("@SOURCE@", str(ROOT)))

    checks = f"sh {ROOT}/tests/systemd/instance-checks.sh"
    cmd = ["bash", str(TOOL), "--venv", str(venv), "--bind-ro", str(ROOT), "--bind-ro", f"{srv}:/srv/nilmd-test",
           "--dropin", str(dropin), "--pre", f"{checks} setup {port} {a} {b}", "--start-timeout", "120"]
    for step in ("both", "stop-one", "escaped", "stop-other"):
        cmd += ["--post", f"{checks} {step} {port} {a} {b}"]
    cmd += ["--security-threshold", "25",
            str(_checkable_name(tmp_path, a))]

    publishers = [Publisher(client, building) for building in (a, b)]
    for p in publishers:
        p.start()
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env={**os.environ, "TMPDIR": "/tmp"})
    finally:
        for p in publishers:
            p.done.set()
            p.join(5)
    out = proc.stdout + proc.stderr
    print(out)  # shown for a failure, or with pytest -rP
    tail = f"\n--- run-under-systemd output ({time.monotonic() - t0:.0f} s) ---\n{out[-12000:]}"
    assert proc.returncode == 0 and "CHECK FAIL" not in out, "the instances failed under systemd" + tail
    for expected in (f"RESULT: nilmd@{a}.service reached active", "RESULT: Type=notify -> systemd received READY=1",
                     "verify: OK", "RESULT: exposure <= threshold", "OVERALL: PASS"):
        assert expected in out, f"missing {expected!r}" + tail
    assert len(re.findall(r"^CHECK PASS: .*$", out, re.M)) == 5, "every check step must report a pass" + tail


def _checkable_name(tmp_path: Path, building: str) -> Path:
    """The template under A's name, for the tool (which starts the unit named by its file)."""
    path = tmp_path / f"nilmd@{building}.service"
    shutil.copy(TEMPLATE, path)
    return path
