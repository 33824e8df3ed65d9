"""Shared fixtures: a private redis-server, small real checkpoints, a real daemon process."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from nilmd import keys
# The harness is nilmd.testing (shared with scripts/); test files import these names from here.
from nilmd.testing import DaemonProcess, RedisCluster, RedisServer, aligned_start, free_port, wait_for  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
# Tests import onnxruntime themselves, before nilmd.models.onnx_backend.runtime() could turn its
# telemetry off: the host's $HOME keeps no device id of theirs. The daemons they start turn it off
# on their own (test_onnx::test_onnxruntime_writes_nothing_in_home_and_sends_no_telemetry).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
# matplotlib (the daily picture's tests) keeps its font cache in a folder of the run's own, removed
# at the end, not in the host's ~/.cache/matplotlib.
if "MPLCONFIGDIR" not in os.environ:
    os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="nilmd-tests-mpl-")
    atexit.register(shutil.rmtree, os.environ["MPLCONFIGDIR"], True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A Redis Cluster of three masters and three replicas (nilmd.testing.RedisCluster)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are not installed (apt-get install redis-server)")
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_client(redis_server):
    client = redis_server.client()
    yield client
    client.close()


def import_blocker(package: str) -> str:
    """Python code that, run first in a fresh interpreter, makes importing `package` (or any of
    its submodules) fail with "blocked by the test": what a box without it would say."""
    return f"""
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == {package!r} or name.startswith({package + "."!r}):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
sys.meta_path.insert(0, _Blocked())
"""

def write_checkpoints(directory: Path, appliances=None, channels: int = 8, depth: int = 10, seed: int = 0) -> Path:
    """Real-format checkpoints with untrained weights (for daemon tests; never shipped)."""
    import torch

    from nilmd.models import checkpoints
    from nilmd.appliances import APPLIANCES, ON_THRESHOLD_W, checkpoint_filename
    from nilmd.features import SCALES
    from nilmd.models.model import WaveNILM, WaveNILMConfig

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    for name in appliances or APPLIANCES:
        model = WaveNILM(WaveNILMConfig(channels=channels, depth=depth, head_channels=channels), SCALES)
        data = checkpoints.to_dict(name, model, on_power_threshold_w=ON_THRESHOLD_W[name], max_power_w=3000.0,
                                   training={"note": "untrained test weights"})
        checkpoints.save(directory / checkpoint_filename(name), data)
    return directory


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("models"))


class Daemon(DaemonProcess):
    """`python -m nilmd run` with the tests' small settings and its own building id."""

    def __init__(self, port: int, model_dir: Path, runtime_dir: Path, extra_env=None, args=(), **where):
        building = f"t{uuid.uuid4().hex[:10]}"
        self.runtime_dir = runtime_dir
        env = {
            **os.environ,
            "REDIS_PORT": str(port),
            "REDIS_HOST": "127.0.0.1",
            "MODEL_DIR": str(model_dir),
            "BUILDING_ID": building,
            "WINDOW_SIZE": "256",
            "INFERENCE_INTERVAL": "16",
            "NILMD_RUNTIME_DIR": str(runtime_dir),
            "NILMD_STATE_DIR": str(runtime_dir / "state"),  # ring snapshots: never into the checkout
            "NILMD_RING_CAPACITY": "1024",
            "NILMD_STATUS_INTERVAL": "0.3",
            "NILMD_THREADS": "1",
            # Tests pause between bursts of samples for longer than twice their 16-s interval;
            # tests/test_health.py sets its own limit to see `degraded` come and go.
            "NILMD_INPUT_TIMEOUT": "600",
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        super().__init__(building, runtime_dir / f"{building}.log", env, args, **where)

    def shm_files(self):
        return sorted(p.name for p in self.runtime_dir.glob(f"nilmd-{self.building}*"))


@pytest.fixture
def daemon_factory(redis_server, model_dir, tmp_path):
    started = []

    def make(**kw):
        kw.setdefault("model_dir", model_dir)
        d = Daemon(redis_server.port, runtime_dir=tmp_path, **kw)
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)


def publish_samples(client, building: str, n: int, start: float | None = None, power=None, to: str = "pubsub"):
    """Publish n valid 1 Hz samples ending about now (`to` the input stream: XADD them); returns
    the last timestamp."""
    from nilmd import redisconn
    from nilmd.daemon import streams

    start = float(int(time.time() - n)) if start is None else start
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        p = 500.0 + 400.0 * ((i // 30) % 3) if power is None else power(i)
        text = json.dumps({"timestamp": start + i, "power_total": p})
        if to == "stream":
            streams.add(pipe, building, text)
        else:
            redisconn.publish(pipe, keys.input_channel(building), text)
    pipe.execute()
    return start + n - 1


# A simulated house's morning through the daemon with the shipped models (tests/test_energy.py,
# tests/test_report.py): house 3000 (a test house no model trained on), 2024-01-03 06:00-12:00
# UTC, the inference process SIGKILLed once at 06:50, in the middle of a heat pump run.
HOUSE_SEED, HOUSE_DAY, HOUSE_FROM_H, HOUSE_HOURS = 3000, 2, 6, 6


@pytest.fixture(scope="session")
def simulated_morning(redis_server, tmp_path_factory):  # redis_server: skips where redis-server is missing
    from nilmd.daemon import streams
    from nilmd.sim.simulator import Building

    runtime = tmp_path_factory.mktemp("morning")
    # A redis-server of its own: the tests that read this morning run later than others that
    # restart or flush the shared one.
    own = RedisServer(free_port(), runtime).start()
    d = Daemon(own.port, ROOT / "checkpoints", runtime, extra_env={
        "WINDOW_SIZE": "1536", "INFERENCE_INTERVAL": "60", "NILMD_RING_CAPACITY": "86400",
        "NILMD_INPUT_MODE": "stream", "NILMD_TIMEZONE": "UTC"})
    house = Building(HOUSE_SEED)
    t0 = house.start + HOUSE_DAY * 86400 + HOUSE_FROM_H * 3600  # the first interval's first second
    trace = house.trace(t0 - 1536 + 60, 1536 - 60 + HOUSE_HOURS * 3600)
    client = own.client()
    d.start()
    try:
        wait_for(lambda: d.status(client).get("input_connected") == "1", 60,
                 lambda: f"the daemon to read its stream\n{d.log()[-2000:]}")
        sub = client.pubsub(ignore_subscribe_messages=True)
        sub.subscribe(keys.predictions_channel(d.building), keys.events_channel(d.building))
        updated = lambda: client.hget(keys.energy_key(d.building), "updated")  # noqa: E731
        samples = list(trace.messages("full"))
        cut = 1536 - 60 + 50 * 60  # up to 06:50, in the middle of the heat pump's first run (06:28-07:13)
        for part in (samples[:cut], samples[cut:]):
            pipe = client.pipeline(transaction=False)
            for msg in part:
                streams.add(pipe, d.building, json.dumps(msg))
            pipe.execute()
            last = part[-1]["timestamp"]
            wait_for(lambda: updated() is not None and float(updated()) == last, 120,
                     lambda: f"the interval ending {last} to be counted\n{d.log()[-2000:]}")
            if part[0] is samples[0]:
                os.kill(int(d.status(client)["pid_inference"]), signal.SIGKILL)
        messages, quiet_since = [], time.monotonic()
        while time.monotonic() - quiet_since < 1.0:  # everything is published: drain the subscription
            m = sub.get_message(timeout=0.2)
            if m is not None:
                messages.append(m)
                quiet_since = time.monotonic()
        assert d.stop() == 0, d.log()[-2000:]
        status = d.status(client)
    except BaseException:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        own.stop()
        raise
    channel = keys.predictions_channel(d.building).encode()
    published = [json.loads(m["data"]) for m in messages if m["channel"] == channel]
    events = [json.loads(m["data"]) for m in messages if m["channel"] != channel]
    yield dict(building=d.building, trace=trace, t0=t0, published=published, events=events, status=status,
               log=d.log(), client=client)
    client.close()
    own.stop()
