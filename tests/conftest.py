"""Shared fixtures: a private redis-server, small real checkpoints, a real daemon process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns a truthy value; fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # a condition that cannot be read yet is just "not yet"
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for: {what}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


class RedisServer:
    def __init__(self, port: int, workdir: Path):
        self.port = port
        self.workdir = workdir
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port)
        wait_for(lambda: client.ping(), 10, f"redis-server on port {self.port} to answer PING")
        client.close()
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self, **kw):
        import redis

        return redis.Redis(port=self.port, **kw)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server):
    client = redis_server.client()
    yield client
    client.close()


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


class Daemon:
    """`python -m nilmd run` as a real child process, with its own building id."""

    def __init__(self, port: int, model_dir: Path, runtime_dir: Path, extra_env=None, args=()):
        self.building = f"t{uuid.uuid4().hex[:10]}"
        self.runtime_dir = runtime_dir
        self.env = {
            **os.environ,
            "REDIS_PORT": str(port),
            "REDIS_HOST": "127.0.0.1",
            "MODEL_DIR": str(model_dir),
            "BUILDING_ID": self.building,
            "WINDOW_SIZE": "256",
            "INFERENCE_INTERVAL": "16",
            "NILMD_RUNTIME_DIR": str(runtime_dir),
            "NILMD_STATE_DIR": str(runtime_dir / "state"),  # ring snapshots: never into the checkout
            "NILMD_RING_CAPACITY": "1024",
            "NILMD_STATUS_INTERVAL": "0.3",
            "NILMD_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        self.args = list(args)
        self.proc = None
        self.log_path = runtime_dir / f"{self.building}.log"

    def start(self):
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "nilmd", "run", *self.args], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self, client) -> dict:
        return {k.decode(): v.decode() for k, v in client.hgetall(f"nilm:{self.building}:status").items()}

    def shm_files(self):
        return sorted(p.name for p in self.runtime_dir.glob(f"nilmd-{self.building}*"))

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"daemon did not stop within {timeout} s after {sig!r}\n{self.log()[-3000:]}")
        self._log.close()
        return self.proc.returncode


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
    from nilmd.daemon import streams

    start = float(int(time.time() - n)) if start is None else start
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        p = 500.0 + 400.0 * ((i // 30) % 3) if power is None else power(i)
        text = json.dumps({"timestamp": start + i, "power_total": p})
        if to == "stream":
            streams.add(pipe, building, text)
        else:
            pipe.publish(f"nilm:{building}:input", text)
    pipe.execute()
    return start + n - 1
