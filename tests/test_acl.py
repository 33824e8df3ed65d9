"""Least privilege (issue 12, defect 7): nilmd under the ACL rule of docs/OPERATIONS.md for each input mode,
each missing permission one line that names the command (and the daemon recovering once it is
granted), and the password out of the children's environment."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid

import pytest

from conftest import ROOT, aligned_start, publish_samples, wait_for
from nilmd import keys, redisconn
from test_daemon import Subscriber, wait_ready
from test_streams import wait_ready_stream


def acl_user(client, mode: str, without=(), cluster: bool = False) -> tuple[str, str]:
    """A user made by the documented rule for `mode`, less the commands `without`; `client` may
    be a list of clients, one per node of a cluster (`cluster`: its rule)."""
    user, password = f"nilmd-{uuid.uuid4().hex[:8]}", secrets.token_hex(12)
    rule = redisconn.acl_rule(mode, user, cluster=cluster).split()[2:]  # what follows "ACL SETUSER"
    rule = [f">{password}" if part == ">PASSWORD" else part for part in rule if part.lstrip("+") not in without]
    for node in client if isinstance(client, list) else [client]:
        node.execute_command("ACL", "SETUSER", *rule)
    return user, password


def as_user(user: str, password: str) -> dict:
    return {"extra_env": {"REDIS_USERNAME": user, "REDIS_PASSWORD": password}}


def refused(d, cmd: str, since: int, timeout: float = 20.0) -> list[str]:
    """The log lines after offset `since` that name `cmd` as refused; fails if none comes."""
    def lines():
        return [line for line in d.log()[since:].splitlines() if f"+{cmd} " in line + " " and "NOPERM" in line]
    return wait_for(lines, timeout, lambda: f"a log line naming the refused command {cmd!r}\n{d.log()[since:][-2000:]}")


def revoke(client, user: str, cmd: str, reconnect: bool) -> None:
    client.execute_command("ACL", "SETUSER", user, f"-{cmd}")
    if reconnect:  # the command is sent when a connection is made: make every process reconnect
        client.execute_command("CLIENT", "KILL", "USER", user)


def grant(client, user: str, cmd: str) -> None:
    client.execute_command("ACL", "SETUSER", user, f"+{cmd}")


def fresh_status(d, client, timeout: float = 20.0) -> dict:
    def fresh():
        s = d.status(client)
        return s if s and float(s["updated_at"]) > time.time() - 1.5 else None
    return wait_for(fresh, timeout, lambda: f"the status hash to be written again\n{d.log()[-2000:]}")


def test_the_operators_guide_gives_the_rule_for_each_mode():
    guide = (ROOT / "docs" / "OPERATIONS.md").read_text()
    for mode in ("pubsub", "stream"):
        assert redisconn.acl_rule(mode) in guide, f"docs/OPERATIONS.md lacks the ACL rule for {mode}"


def test_status_without_its_permission_is_one_line_and_unknown(redis_server, redis_client):
    """`nilmd status` needs HGETALL: without it, exit 3 (unknown) and one line naming it."""
    building = f"acl{uuid.uuid4().hex[:8]}"
    redis_client.hset(keys.status_key(building), mapping={"state": "running", "updated_at": time.time(),
                                                          "status_interval_s": 60})
    user, password = acl_user(redis_client, "pubsub", without=("hgetall",))  # the daemon's rule has it (the ledger)
    env = {**os.environ, "REDIS_USERNAME": user, "REDIS_PASSWORD": password}
    args = [sys.executable, "-m", "nilmd", "status", "--redis-port", str(redis_server.port), "--building-id", building]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
        assert out.returncode == 3, out
        lines = (out.stdout + out.stderr).strip().splitlines()
        assert len(lines) == 1 and "'hgetall'" in lines[0] and "+hgetall" in lines[0], lines
        assert password not in out.stdout + out.stderr
        grant(redis_client, user, "hgetall")
        out = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
        assert out.returncode == 0, out
    finally:
        redis_client.acl_deluser(user)
        redis_client.delete(keys.status_key(building))


def environ(pid: int) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


@pytest.mark.slow
def test_pubsub_daemon_under_its_acl_rule_names_each_missing_command(daemon_factory, redis_client):
    """The pubsub rule is enough; then each command taken away (and the connections killed for
    those sent on connecting) is one line naming it, and nilmd recovers when it is given back."""
    user, password = acl_user(redis_client, "pubsub")
    try:
        d = daemon_factory(**as_user(user, password)).start()
        sub = Subscriber(redis_client, d.building)
        wait_ready(d, redis_client)
        last = publish_samples(redis_client, d.building, 256 + 16, start=aligned_start(time.time() - 272, 256, 16))
        sub.until(last, timeout=30)
        s = d.status(redis_client)
        assert b"REDIS_PASSWORD=" in environ(int(s["pid_supervisor"]))  # what systemd or the shell gave it
        for role in ("reader", "inference"):
            env = environ(int(s[f"pid_{role}"]))
            assert b"REDIS_PASSWORD" not in env and password.encode() not in env, f"the {role} inherited it"
            with open(f"/proc/{s[f'pid_{role}']}/cmdline", "rb") as f:
                assert password.encode() not in f.read(), f"the {role}'s command line shows it"

        for cmd, reconnect in (("hset", False), ("publish", False), ("set", False), ("subscribe", True),
                               ("client|setname", True)):
            since = len(d.log())
            revoke(redis_client, user, cmd, reconnect)
            if cmd in ("publish", "set"):
                last = publish_samples(redis_client, d.building, 16, start=last + 1)
            lines = refused(d, cmd, since)
            assert len(lines) <= 3, f"more than one line per process for {cmd}: {lines}"
            grant(redis_client, user, cmd)
            wait_ready(d, redis_client)
            fresh_status(d, redis_client)
            last = publish_samples(redis_client, d.building, 16, start=last + 1)
            sub.until(last, timeout=30)
        ends = [json.loads(m)["window_end"] for m in sub.received]
        assert len(ends) == len(set(ends)), f"a prediction published twice: {ends}"
        assert d.stop() == 0
        log = d.log()
        assert "Traceback" not in log and password not in log, log[-3000:]
        assert int(d.status(redis_client)["restarts"]) == 0, "a missing permission restarted a child"
    finally:
        redis_client.acl_deluser(user)


@pytest.mark.slow
def test_stream_daemon_under_its_acl_rule_names_each_missing_command(daemon_factory, redis_client):
    """The stream rule is enough; GET and HGET (read once, at the first connection) missing at
    start are named one after the other, and the reading commands taken away while running are
    named; nilmd reads on when each is given back."""
    user, password = acl_user(redis_client, "stream", without=("get", "hget"))
    try:
        d = daemon_factory(extra_env={**as_user(user, password)["extra_env"], "NILMD_INPUT_MODE": "stream"}).start()
        refused(d, "get", 0, timeout=30)
        since = len(d.log())
        grant(redis_client, user, "get")
        refused(d, "hget", since)
        grant(redis_client, user, "hget")
        wait_ready_stream(d, redis_client)
        sub = Subscriber(redis_client, d.building)
        t0 = aligned_start(time.time() - 2000, 256, 16)  # the last of 272 samples closes a window
        last = publish_samples(redis_client, d.building, 256 + 16, start=t0, to="stream")
        sub.until(last, timeout=30)

        # (taken away, named): the two commands of the stream script share one line (Redis does not
        # say which one a script lacked); PING is sent when the reader connects again after an error.
        reading = [(("eval",), ("eval",)), (("xrange", "xrevrange"), ("xrange", "xrevrange")),
                   (("ping", "eval"), ("ping",)), (("set",), ("set",))]
        stream_only = set(redisconn.ACL_COMMANDS["stream"]) - set(redisconn.ACL_COMMANDS["pubsub"])
        assert stream_only <= {c for taken, _ in reading for c in taken} | {"get", "hget"}, "a new command untested"
        for taken, named in reading:
            since = len(d.log())
            for cmd in taken:
                revoke(redis_client, user, cmd, reconnect=True)
            last = publish_samples(redis_client, d.building, 16, start=last + 1, to="stream")
            for cmd in named:
                lines = refused(d, cmd, since)
                assert len(lines) <= 3, f"more than one line per process for {cmd}: {lines}"
            for cmd in taken:
                grant(redis_client, user, cmd)
            sub.until(last, timeout=30)  # nothing lost: the stream kept it
        assert d.stop() == 0
        log = d.log()
        assert "Traceback" not in log and password not in log, log[-3000:]
        s = d.status(redis_client)
        assert int(s["restarts"]) == 0 and int(s["samples_accepted"]) == 256 + 16 + 16 * len(reading), s
    finally:
        redis_client.acl_deluser(user)
