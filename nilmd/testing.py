"""The harness that the tests and the scripts (bench, soak, restart_time) share: a private
redis-server on a free port, a wait on a condition with a deadline, and `nilmd run` as a real
child process.

It lives in the package, as numpy.testing does, so that there is one copy instead of one per
script; the daemon never imports it (tests/test_layout.py checks).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from nilmd import keys
from nilmd.daemon import roles

# `python -m nilmd` must find this checkout's package even where it is not installed.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what, interval: float = 0.05, not_yet=(Exception,)):
    """Call `condition` until it returns a truthy value, and return that; after `timeout` s raise
    AssertionError saying `what` did not happen. `what` may be a function returning the text, so
    that what it shows (a daemon's log) is read at the failure, not before the wait. An exception
    of a type in `not_yet` means "not yet" (a server still starting); pass `not_yet=()` to fail
    at the first one instead."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except not_yet as e:
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for: {what() if callable(what) else what}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


class RedisServer:
    """A redis-server of our own on `port`, keeping its files in `workdir`. It can be stopped and
    started again on the same port and directory (a Redis restart, with what SAVE wrote)."""

    def __init__(self, port: int, workdir: Path):
        self.port = port
        self.workdir = Path(workdir)
        self.proc = None

    def start(self, timeout: float = 10.0) -> "RedisServer":
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def answers():
            if self.proc.poll() is not None:  # e.g. the port was taken meanwhile: no use waiting
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}")
            return client.ping()

        with redis.Redis(port=self.port) as client:
            wait_for(answers, timeout, f"redis-server on port {self.port} to answer PING",
                     not_yet=(redis.ConnectionError, redis.TimeoutError))
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self, **kw):
        import redis

        return redis.Redis(port=self.port, **kw)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_cluster_port() -> int:
    """A free port P whose cluster bus port, P + 10000, is free too (and so below 65536)."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisCluster:
    """A Redis Cluster of our own: `masters` masters with one replica each, on free loopback
    ports, its nodes' files in `workdir`; `node_timeout_ms` small, so that a replica takes over
    a dead master within a few seconds. `kill(port)` SIGKILLs one node (a failover test)."""

    def __init__(self, workdir: Path, masters: int = 3, node_timeout_ms: int = 1000):
        self.workdir = Path(workdir)
        self.ports = [_free_cluster_port() for _ in range(2 * masters)]
        self.node_timeout_ms = node_timeout_ms
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def port(self) -> int:
        """A seed node (what nilmd's REDIS_PORT names)."""
        return self.ports[0]

    def start(self, timeout: float = 60.0) -> "RedisCluster":
        import redis

        for port in self.ports:
            self._spawn(port)
        try:
            for port in self.ports:
                with redis.Redis(port=port) as c:
                    wait_for(c.ping, timeout, f"cluster node {port} to answer PING",
                             not_yet=(redis.ConnectionError, redis.TimeoutError))
            subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                            "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True,
                           timeout=timeout)
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, port: int) -> None:
        node_dir = self.workdir / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(node_dir / "nodes.conf"), "--cluster-node-timeout", str(self.node_timeout_ms),
             "--save", "", "--appendonly", "no", "--dir", str(node_dir),
             "--repl-diskless-sync-delay", "0"],  # a replica syncs at once, not 5 s later
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def restart(self, port: int, timeout: float = 60.0) -> None:
        """A killed node back: it rejoins from its nodes.conf (a replica of whoever took over)."""
        self._spawn(port)
        self.wait_ok(timeout)

    def replica_of(self, port: int) -> int:
        """The port of the live replica of the master on `port`."""
        import redis

        with redis.Redis(port=port) as c:
            me = next(n["node_id"] for n in c.cluster("nodes").values() if "myself" in n["flags"])
            return next(int(addr.split(":")[1].split("@")[0]) for addr, n in c.cluster("nodes").items()
                        if n["master_id"] == me and "fail" not in n["flags"])

    def alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every live node says cluster_state:ok and agrees on which nodes are masters, and
        every replica has synced with its master (one that has not could not take over)."""
        import redis

        def ok():
            roles = set()
            for port in self.alive():
                with redis.Redis(port=port) as c:
                    if c.cluster("info").get("cluster_state") != "ok":
                        return False
                    replication = c.info("replication")
                    if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                        return False
                    roles.add(frozenset(n for n, v in c.cluster("nodes").items()
                                        if "master" in v["flags"] and "fail" not in v["flags"]))
            return len(roles) == 1
        wait_for(ok, timeout, f"cluster_state:ok and synced replicas on every live node of {self.alive()}",
                 not_yet=(redis.ConnectionError, redis.TimeoutError, redis.ResponseError), interval=0.1)

    def master_of(self, key: str) -> int:
        """The port of the master that holds `key`'s slot now."""
        with self.client() as c:
            return c.get_node_from_key(key).port

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def client(self, **kw):
        import redis

        return redis.RedisCluster(host="127.0.0.1", port=self.alive()[0], **kw)

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def aligned_start(t: float, window: int, interval: int) -> float:
    """The latest whole second t0 <= t such that 1 Hz samples from t0 on have their `window`-th
    sample (second t0 + window - 1) close an interval of the clock, (t0 + window) % interval == 0
    (docs/CONTRACT.md §4): a run that starts there has its first window at that sample, as
    before the schedule was aligned. Written from the contract, not from nilmd.schedule."""
    t0 = int(t // 1)
    return float(t0 - (t0 + window) % interval)


def status(client, building: str) -> dict:
    """The building's status hash, decoded."""
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.status_key(building)).items()}


def role_processes(fields: dict) -> dict:
    """role -> psutil.Process, from the pids in a status hash (every process it names, nilmd.daemon.roles)."""
    import psutil

    return {role: psutil.Process(int(fields[f"pid_{role}"])) for role in roles.listed(fields)}


def wait_gone(procs, timeout: float, what: str) -> None:
    """Wait until each psutil.Process has exited: gone, or a zombie no one has reaped yet (an
    orphan's parent may be a PID 1 that never does), whose files, sockets among them, are closed."""
    import psutil

    def gone(p) -> bool:
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    wait_for(lambda: all(gone(p) for p in procs), timeout, what)


def daemon_processes(fields: dict, pid: int | None = None) -> dict:
    """Every process of the daemon: the supervisor (`pid`, else the hash's pid_supervisor) and all
    below it, by role where the status hash names its pid, else as name[pid]: what a benchmark's
    memory must count, a helper process nilmd did not mean to start included."""
    import psutil

    roles = {int(v): k[4:] for k, v in fields.items() if k.startswith("pid_") and str(v).isdigit()}
    top = psutil.Process(pid or int(fields["pid_supervisor"]))
    return {roles.get(p.pid, f"{p.name()}[{p.pid}]"): p for p in [top, *top.children(recursive=True)]}


def flood(port: int, building: str, rate: int, seconds: float, out) -> None:
    """Publish `rate` valid samples a second to `building`'s pub/sub channel (in 10-ms batches) for
    `seconds`, in a process of its own; put how many went out on `out` (a multiprocessing.Queue)."""
    import redis

    client = redis.Redis(port=port)
    sent, t0, ts = 0, time.monotonic(), 1e9
    while (now := time.monotonic()) - t0 < seconds:
        due = int((now - t0) * rate) - sent
        if due > 0:
            pipe = client.pipeline(transaction=False)
            for _ in range(due):
                ts += 1
                pipe.publish(keys.input_channel(building), json.dumps({"timestamp": ts, "power_total": 500.0}))
            pipe.execute()
            sent += due
        time.sleep(0.01)
    out.put(sent)


class DaemonProcess:
    """`python -m nilmd run` as a real child process for `building`, its output in `log_path`."""

    def __init__(self, building: str, log_path: Path, env: dict | None = None, args=(), python: str = sys.executable,
                 cwd: Path = PACKAGE_ROOT):
        """`python` and `cwd`: another installation's interpreter, run outside this checkout (a
        torch-free venv: tests/test_torchfree.py)."""
        self.python, self.cwd = python, cwd
        self.building = building
        self.log_path = Path(log_path)
        self.env = dict(os.environ if env is None else env)
        self.args = list(args)
        self.proc = None
        self.started_at = None

    def start(self) -> "DaemonProcess":
        self._log = open(self.log_path, "wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen([self.python, "-m", "nilmd", "run", *self.args], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self, client) -> dict:
        return status(client, self.building)

    def owns(self, fields: dict) -> bool:
        """A status hash is this daemon's, not one left by a SIGKILLed run before it (whose
        "running", and input subscription, linger for a moment after the kill)."""
        return fields.get("pid_supervisor") == str(self.proc.pid)

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send `sig` and return the exit code; one that does not exit in time is SIGKILLed and
        the stop fails, with the end of its log."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    raise AssertionError(f"daemon did not stop within {timeout} s after {sig!r}\n"
                                         f"{self.log()[-3000:]}") from None
        finally:
            self._log.close()
        return self.proc.returncode


def write_adaptation(state_dir, building: str, model_dir, appliances, on_shift: float = 3.0,
                     record_building: str | None = None) -> Path:
    """A building's adapted folder as `nilmd adapt` leaves it (nilmd.models.adapted, docs/CONTRACT.md
    §8.6): each appliance's shipped checkpoint of `model_dir` with its on-logit bias moved by
    `on_shift` (so its probabilities differ from the shipped model's), marked as adapted from that
    file for the building. `record_building`: another building's name in the files (a mix-up)."""
    import json

    import torch

    from nilmd.appliances import checkpoint_filename
    from nilmd.models import adapted, checkpoints
    from nilmd.models.onnx_backend import sha256

    where = adapted.folder(state_dir, building)
    made = where.with_name(f".{where.name}.made")
    shutil.rmtree(made, ignore_errors=True)
    made.mkdir(parents=True)
    mark = record_building or building
    entries = {}
    for appliance in appliances:
        source, name = Path(model_dir) / checkpoint_filename(appliance), checkpoint_filename(appliance)
        data = torch.load(source, map_location="cpu", weights_only=True)
        data["state_dict"]["head.3.bias"] = data["state_dict"]["head.3.bias"] + torch.tensor([0.0, on_shift])
        data["training"] = {**data["training"], "adapted": {"building": mark, "base_sha256": sha256(source)}}
        checkpoints.save(made / name, data)
        entries[appliance] = {"file": name, "sha256": sha256(made / name), "base_sha256": sha256(source),
                              "method": "test: on-logit bias", "scores": {}}
    record = {"format_version": adapted.FORMAT_VERSION, "building": mark,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "appliances": entries, "labels": [], "table": []}
    (made / adapted.RECORD).write_text(json.dumps(record, indent=1))
    adapted.reset(state_dir, building)
    os.rename(made, where)
    return where
