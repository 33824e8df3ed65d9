"""Leases that fence (issue 23, defect 1): a lease holder whose supervisor is SIGSTOPped (its reader
and inference run on) loses its buildings to the other instance, and Redis refuses every write it
still tries for them, on one server and on a 3+3 Redis Cluster. Every window of every building is
predicted once: none twice while both run, none missing once the survivor holds it, and the paused
instance takes its share back when it resumes. Real redis-servers, daemons and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import Daemon, aligned_start, publish_samples, wait_for
from nilmd import keys
from nilmd.daemon import fencing
from nilmd.daemon.sharing import owner
from test_faults import schedule
from test_multi import Predictions

WINDOW, STEP = 256, 16


@pytest.fixture(params=["server", "cluster"])
def redis_target(request):
    """(port, extra env, a client) of a single redis-server or of the 3+3 cluster."""
    if request.param == "server":
        server = request.getfixturevalue("redis_server")
        client = server.client()
        yield server.port, {}, client
    else:
        cluster = request.getfixturevalue("redis_cluster")
        client = cluster.client()
        yield cluster.port, {"REDIS_CLUSTER": "1"}, client
    client.close()


def lease_instance(port, env, model_dir, tmp_path, name: str, listing, **more) -> Daemon:
    run = tmp_path / name
    run.mkdir()
    d = Daemon(port, model_dir, run, extra_env={**env, "BUILDING_IDS": f"@{listing}", "NILMD_INSTANCE": name,
                                              "NILMD_LEASES": "true", "NILMD_LEASE_PERIOD": "2",
                                              "NILMD_INPUT_MODE": "stream", **more})
    d.env.pop("BUILDING_ID")
    return d.start()


def holders(client, ids) -> dict[str, str]:
    """building -> the instance name in its lease (or ''); one GET each (a cluster's keys lie apart)."""
    out = {}
    for b in ids:
        v = client.get(keys.lease_key(b))
        out[b] = v.decode().rpartition("#")[0] if v else ""
    return out


class Both:
    def __init__(self, *daemons):
        self.daemons = daemons

    def log(self) -> str:
        return "\n".join(f"--- instance {k}:\n{d.log()[-2500:]}" for k, d in enumerate(self.daemons))


def exactly(preds: Predictions, expected: dict, both: Both) -> None:
    try:
        preds.wait(expected, 60, both)
    except AssertionError as e:
        raise AssertionError(f"{e}\nexpected {expected}\nreceived {preds.by_building}") from None
    time.sleep(0.5)  # a duplicate would come within this
    preds.drain()
    for b, ends in expected.items():
        assert preds.by_building.get(b) == ends, (b, both.log())


def instances_in_status(d: Daemon, ids, share) -> None:
    """Issue 23, defect 6: `nilmd status` with the list, run from a third place (no instance name of
    its own), shows every live instance, who serves each building and its state; exit by the worst."""
    env = {k: v for k, v in d.env.items() if k != "NILMD_INSTANCE"}
    run = subprocess.run([sys.executable, "-m", "nilmd", "status"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode in (0, 1), run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert [x.split(":")[0] for x in lines[:2]] == ["instance a", "instance b"], run.stdout
    for x in ids:
        row = next(r.split() for r in lines if r.split()[:1] == [x])
        assert row[1] == share[x] and row[2] in ("running", "warming_up"), run.stdout


@pytest.mark.slow
def test_a_paused_holder_is_fenced_and_every_window_is_predicted_once(redis_target, model_dir, tmp_path):
    port, env, client = redis_target
    ids = [f"fence-{k}" for k in (4, 8, 9, 11)]  # two each (rendezvous hashing)
    share = {x: owner(x, ["a", "b"]) for x in ids}
    assert set(share.values()) == {"a", "b"}
    listing = tmp_path / "buildings.list"
    listing.write_text("\n".join(ids) + "\n")
    preds = Predictions(client)
    # one sample in each stream before any instance: the first holder records its position there, so
    # whichever holder reads a stream later reads it whole from t0 (a first start with no position
    # reads only the newest window, however much is there)
    t0 = aligned_start(time.time() - 600, WINDOW, STEP)
    for x in ids:
        publish_samples(client, x, 1, start=t0, to="stream")
    a = lease_instance(port, env, model_dir, tmp_path, "a", listing)
    b = lease_instance(port, env, model_dir, tmp_path, "b", listing)
    both = Both(a, b)
    try:
        wait_for(lambda: holders(client, ids) == share, 30, lambda: f"the two instances to settle\n{both.log()}")
        # every building read by its holder before any input (a first start reads only the newest window)
        wait_for(lambda: all(client.exists(keys.position_key(x)) for x in ids), 60,
                 lambda: f"every stream read\n{both.log()}")
        if env:  # on a cluster the token is also beside every key each one writes
            for x in ids:
                assert {client.get(g) for g in fencing.guard_keys(x)} == {client.get(keys.lease_key(x))}, x
        first = {x: publish_samples(client, x, WINDOW + 2 * STEP - 1, start=t0 + 1, to="stream") for x in ids}
        exactly(preds, {x: schedule(t0, first[x]) for x in ids}, both)
        instances_in_status(a, ids, share)

        os.kill(a.proc.pid, signal.SIGSTOP)  # a's supervisor only: its reader and inference run on
        try:
            wait_for(lambda: set(holders(client, ids).values()) == {"b"}, 15,
                     lambda: f"b to take a's buildings\n{both.log()}")
            # new samples: a's reader reads them from the streams and its inference tries to publish
            last = {x: publish_samples(client, x, 3 * STEP, start=first[x] + 1, to="stream") for x in ids}
            exactly(preds, {x: schedule(t0, last[x]) for x in ids}, both)
            for x in (x for x in ids if share[x] == "a"):
                wait_for(lambda: f"building {x}: fenced" in a.log(), 20,
                         lambda: f"a to say {x} was fenced\n{a.log()[-3000:]}")
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)

        wait_for(lambda: holders(client, ids) == share, 30, lambda: f"a to take its share back\n{both.log()}")
        wait_for(lambda: all(client.hget(keys.status_key(x), "state") in (b"running", b"warming_up") for x in ids),
                 30, f"every building served again\n{both.log()}")
        more = {x: publish_samples(client, x, 2 * STEP, start=last[x] + 1, to="stream") for x in ids}
        exactly(preds, {x: schedule(t0, more[x]) for x in ids}, both)
        assert a.log().count(": fenced: Redis refused") == sum(1 for x in ids if share[x] == "a"), a.log()  # one line each
    finally:
        for d in (a, b):
            if d.proc.poll() is None:
                d.stop()
        for x in ids:  # the next parameter's instances start from nothing
            client.delete(keys.lease_key(x), keys.position_key(x), keys.input_stream(x), keys.predictions_stream(x),
                          keys.status_key(x), keys.latest_key(x), keys.energy_key(x), keys.runs_key(x),
                          keys.events_stream(x))
        preds.pubsub.close()
