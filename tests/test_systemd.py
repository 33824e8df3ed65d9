"""The shipped unit: systemd-analyze verify and security score, the example env file, and the
real unit under a real (throw-away) systemd 252 with a real Redis.

The slow test boots systemd as PID 1 of a systemd-nspawn container with run-under-systemd.sh, a
helper this repository does not ship ($NILMD_SYSTEMD_TOOL, by default
../shared/tools/run-under-systemd.sh beside the checkout; the test skips without it), installs
systemd/nilmd.service plus tests/systemd/test-overrides.conf (paths of this checkout's venv),
starts it against a password-protected redis-server on the host's loopback (the password travels as
a LoadCredential= file), and checks: active (READY=1), journal lines and fields, watchdog restart
of a SIGSTOPped supervisor, reload, a SIGKILLed inference child coming back, a SIGSTOPped one
replaced by the supervisor before the watchdog can expire, no secret anywhere, a clean stop that
leaves no shared memory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import free_port, wait_for

from nilmd import config, keys
from nilmd.config import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "nilmd.service"
GPU_DROPIN = ROOT / "systemd" / "gpu.conf"
ENV_EXAMPLE = ROOT / "systemd" / "nilmd.env"
TOOL = Path(os.environ.get("NILMD_SYSTEMD_TOOL", ROOT.parent / "shared" / "tools" / "run-under-systemd.sh"))
DEBIAN_SYSTEMD = Path("/usr/lib/python3/dist-packages/systemd")
MAX_EXPOSURE = 2.5


def _analyze():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")


def _checkable_copy(tmp_path: Path, *dropins: Path) -> Path:
    """The unit (with drop-ins appended, later settings win as in a real drop-in) with ExecStart
    pointed at an executable that exists: /opt/nilmd/venv only exists on an installed box, and
    verify rejects a missing ExecStart. test_install.py verifies the installed unit as is."""
    text = UNIT.read_text()
    for d in dropins:
        text += "\n" + d.read_text()
    text = re.sub(r"(?m)^ExecStart=/opt/nilmd/venv/bin/nilmd run$", "ExecStart=/bin/true run", text)
    assert "ExecStart=/bin/true run" in text
    path = tmp_path / "nilmd.service"
    path.write_text(text)
    return path


@pytest.mark.parametrize("dropins", [(), (GPU_DROPIN,)], ids=["unit", "unit+gpu.conf"])
def test_systemd_analyze_verify_is_clean(tmp_path, dropins):
    _analyze()
    unit = _checkable_copy(tmp_path, *dropins)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


def exposure(unit: Path) -> float:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d) ", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr
    return float(m.group(1))


def test_security_score_and_its_record_in_the_guide(tmp_path):
    _analyze()
    score = exposure(_checkable_copy(tmp_path))
    assert score <= MAX_EXPOSURE, f"systemd-analyze security: exposure {score} > {MAX_EXPOSURE}"
    gpu_score = exposure(_checkable_copy(tmp_path, GPU_DROPIN))
    assert gpu_score <= MAX_EXPOSURE, f"with gpu.conf: exposure {gpu_score} > {MAX_EXPOSURE}"
    guide = (ROOT / "docs" / "OPERATIONS.md").read_text()
    section = guide[guide.index("<!-- section: systemd -->"):guide.index("<!-- /section: systemd -->")]
    assert f"exposure {score}" in section and f"{gpu_score} with" in section, (
        f"docs/OPERATIONS.md's systemd section should record the scores {score} and {gpu_score} (with gpu.conf)")


def test_unit_essentials():
    lines = [ln.strip() for ln in UNIT.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for must in ("Type=notify", "NotifyAccess=main", "Restart=on-failure", "ExecReload=/bin/kill -HUP $MAINPID",
                 "EnvironmentFile=-/etc/nilmd/nilmd.env", "RuntimeDirectory=nilmd", "StateDirectory=nilmd",
                 "ConfigurationDirectory=nilmd", "User=nilmd", "KillMode=mixed", "ProtectSystem=strict",
                 "ExecStart=/opt/nilmd/venv/bin/nilmd run", "LoadCredential=redis-password:/etc/nilmd/redis-password"):
        assert must in lines, f"{must} missing from {UNIT.name}"
    assert any(ln.startswith("WatchdogSec=") for ln in lines)
    # PyTorch's oneDNN JIT needs writable+executable memory (pytorch#143651)
    assert not any(ln.startswith("MemoryDenyWriteExecute=") and ln.endswith(("yes", "true", "1")) for ln in lines)


def test_env_example_documents_every_setting():
    text = ENV_EXAMPLE.read_text()
    documented = set(re.findall(r"(?m)^#?([A-Z][A-Z0-9_]*)=", text))
    names = {s.env[0] for s in SETTINGS}
    assert names - documented == set(), f"settings missing from {ENV_EXAMPLE.name}"
    known = {e for s in SETTINGS for e in s.env}
    assert documented - known == set(), f"{ENV_EXAMPLE.name} documents settings nilmd does not have"
    assert not re.search(r"(?m)^[A-Z]", text), "the example must leave every setting commented out (defaults)"
    # Each setting's line shows its default, and the comment above it names every choice.
    lines = text.splitlines()
    for s in SETTINGS:
        i = next(i for i, ln in enumerate(lines) if ln.startswith(f"#{s.env[0]}="))
        shown = lines[i].partition("=")[2]
        if s.default is not None:
            want = {True: "true", False: "false"}.get(s.default) if isinstance(s.default, bool) else (
                f"{s.default:g}" if isinstance(s.default, float) else str(s.default))
            assert shown == want, f"{s.env[0]}: the example shows {shown!r}, the default is {want!r}"
        j = i
        while j > 0 and lines[j - 1].startswith("#") and not re.match(r"#[A-Z_]+=", lines[j - 1]):
            j -= 1
        doc = " ".join(lines[j:i])
        missing = [c for c in s.choices if not re.search(rf"\b{re.escape(c)}\b", doc)]
        assert not missing, f"{s.env[0]}: the comment above it does not explain {missing}"


def test_credential_fallback_means_no_password(tmp_path):
    """Without /etc/nilmd/redis-password the unit's SetCredential= fallback hands the service a
    credential holding a lone newline: that must mean "no password", and must not override a
    REDIS_PASSWORD or REDIS_PASSWORD_FILE the operator set; a real credential file is used."""
    unit_value = re.search(r"(?m)^SetCredential=redis-password:(.*)$", UNIT.read_text()).group(1)
    assert unit_value == "\\n"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "redis-password").write_text("\n")  # what systemd writes for that value
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert config.resolve(environ=env).redis_password == ""
    assert config.resolve(environ={**env, "REDIS_PASSWORD": "from-env"}).redis_password == "from-env"
    (tmp_path / "pw").write_text("from-file\n")
    assert config.resolve(environ={**env, "REDIS_PASSWORD_FILE": str(tmp_path / "pw")}).redis_password == "from-file"
    (creds / "redis-password").write_text("s3cret\n")
    assert config.resolve(environ=env).redis_password == "s3cret"


# -- a real systemd -------------------------------------------------------------------------------

# The tests install nothing on the host: what is missing is a skip naming the command that
# installs it. .ci/run (a fresh machine, as root) installs these before the test command.
def require_nspawn():
    if not TOOL.is_file():
        pytest.skip(f"{TOOL} not found (set NILMD_SYSTEMD_TOOL)")
    if os.geteuid() != 0:
        pytest.skip("a throw-away systemd (systemd-nspawn) needs root")
    if shutil.which("systemd-nspawn") is None:
        pytest.skip("systemd-nspawn is not installed (apt-get install systemd-container)")


def journal_python_path(where: Path) -> Path | None:
    """A directory that makes Debian's python3-systemd importable by the venv's Python (same ABI),
    so the daemon logs through JournalHandler; None if it is not installed (apt-get install
    python3-systemd) or of another ABI: the test then checks the stderr mode instead."""
    abi = f"_journal.cpython-{sys.version_info.major}{sys.version_info.minor}-"
    if not any(p.name.startswith(abi) for p in DEBIAN_SYSTEMD.glob("_journal.*.so")):
        return None
    d = where / "sdpy"
    d.mkdir()
    (d / "systemd").symlink_to(DEBIAN_SYSTEMD)
    return d


class Publisher(threading.Thread):
    """Meter samples on the input channel all along: 10 per 0.1 s on a continuous timeline that
    starts well in the past (fills a window in seconds, never runs ahead of the clock)."""

    def __init__(self, client, building: str):
        super().__init__(daemon=True)
        self.client, self.channel = client, keys.input_channel(building)
        self.ts = time.time() - 30000
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.1):
            pipe = self.client.pipeline(transaction=False)
            for _ in range(10):
                self.ts += 1
                power = 400.0 + 1800.0 * (int(self.ts) // 40 % 2)
                pipe.publish(self.channel, json.dumps({"timestamp": self.ts, "power_total": power}))
            try:
                pipe.execute()
            except Exception:  # noqa: BLE001 - keep publishing through a hiccup
                pass


@pytest.fixture
def password_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    import redis

    password = secrets.token_hex(16)
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", password],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=password)
    try:
        wait_for(lambda: client.ping(), 10, "the password-protected redis-server to answer")
        yield port, password, client
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_unit_under_real_systemd(tmp_path, model_dir, password_redis):
    require_nspawn()
    port, password, client = password_redis
    building = f"sd{uuid.uuid4().hex[:8]}"
    venv = Path(sys.prefix)
    prefix = Path(os.path.realpath(sys.base_prefix))

    srv = tmp_path / "srv"  # everything the service reads, world-readable (pytest's tmp is 0700)
    (srv / "checkpoints").mkdir(parents=True)
    for f in model_dir.iterdir():
        shutil.copy(f, srv / "checkpoints" / f.name)
    (srv / "redis-password").write_text(password + "\n")
    sdpy = journal_python_path(srv)
    log_mode = "fields" if sdpy else "prefix"
    for p in [srv, *srv.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    dropin = tmp_path / "test-overrides.conf"
    dropin.write_text((ROOT / "tests" / "systemd" / "test-overrides.conf").read_text()
                      .replace("@PYPREFIX@", str(prefix)).replace("@VENV@", str(venv)).replace("@SOURCE@", str(ROOT)))

    settings = {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": port, "BUILDING_ID": building,
                "MODEL_DIR": "/srv/nilmd-test/checkpoints", "WINDOW_SIZE": 256, "INFERENCE_INTERVAL": 16,
                "NILMD_RING_CAPACITY": 1024, "NILMD_STATUS_INTERVAL": 0.5, "NILMD_HEARTBEAT_TIMEOUT": 8,
                "NILMD_THREADS": 0}  # the default: as many torch threads as cores, under the seccomp filter
    if sdpy:
        settings["PYTHONPATH"] = "/srv/nilmd-test/sdpy"
    checks = f"sh {ROOT}/tests/systemd/checks.sh"
    cmd = ["bash", str(TOOL), "--venv", str(venv), "--bind-ro", str(ROOT),
           "--bind-ro", f"{srv}:/srv/nilmd-test", "--dropin", str(dropin),
           "--pre", "useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nilmd",
           "--pre", "install -d -m 0750 -g nilmd /etc/nilmd && install -m 0640 -g nilmd "
                    "/srv/nilmd-test/redis-password /etc/nilmd/redis-password",
           "--start-timeout", "90", "--watchdog-test", "--watchdog-timeout", "90",
           "--post", f"{checks} journal {port} {building} {log_mode}",
           "--post", f"{checks} secrets {port} {building}",
           "--post", f"{checks} reload {port} {building}",
           "--post", f"{checks} kill-inference {port} {building}",
           "--post", f"{checks} hang-inference {port} {building}",
           "--post", f"{checks} stop {port} {building}",
           # the journal's lines are checked by the journal step, not the tool's --expect-log: its
           # `journalctl | grep -q` under pipefail fails whenever grep stops reading first
           "--security-threshold", str(int(MAX_EXPOSURE * 10))]
    for key, value in settings.items():
        cmd += ["--setenv", f"{key}={value}"]
    cmd.append(str(UNIT))

    publisher = Publisher(client, building)
    publisher.start()
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env={**os.environ, "TMPDIR": "/tmp"})
    finally:
        publisher.done.set()
        publisher.join(5)
    out = proc.stdout + proc.stderr
    print(out)  # shown for a failure, or with pytest -rP
    tail = f"\n--- run-under-systemd output ({time.monotonic() - t0:.0f} s) ---\n{out[-12000:]}"
    assert proc.returncode == 0, "the unit failed under systemd" + tail
    for expected in ("RESULT: nilmd.service reached active", "RESULT: Type=notify -> systemd received READY=1",
                     "RESULT: watchdog killed hung pid", "RESULT: nilmd.service stopped cleanly", "verify: OK",
                     "RESULT: exposure <= threshold", "OVERALL: PASS"):
        assert expected in out, f"missing {expected!r}" + tail
    passes = re.findall(r"^CHECK PASS: .*$", out, re.M)
    assert len(passes) == (7 if sdpy else 6), "every check step must report a pass" + tail
    assert "CHECK FAIL" not in out, tail
    # After the watchdog's SIGABRT the new supervisor found a clean runtime directory (systemd
    # emptied it), not a stale ring to reclaim.
    assert "removed stale shared memory" not in out, tail
