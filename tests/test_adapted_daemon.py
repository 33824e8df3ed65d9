"""The daemon serves what was learned (issue 22, item 5): a real daemon, a real redis-server,
real SIGHUPs. A building's adapted models serve for it only; its predictions, status hash and
/metrics say so; a corrupt file is one line and the shipped model serves; SIGHUP follows the
folders as they come and go (nilmd adapt, nilmd adapt --reset) and a building added to the list."""

from __future__ import annotations

import json
import signal
import time

import pytest

from conftest import aligned_start, free_port, publish_samples, wait_for
from nilmd import keys
from nilmd.appliances import checkpoint_filename
from nilmd.models import adapted
from nilmd.models.onnx_backend import sha256
from nilmd.testing import write_adaptation
from test_daemon import check_prediction, wait_ready
from test_metrics import scrape, value
from test_multi import WINDOW, STEP, list_daemon, statuses
from test_multi import wait_ready as wait_list_ready


class Published:
    """Every prediction of every building, whole (PSUBSCRIBE)."""

    def __init__(self, client):
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("nilm:*:predictions")
        self.by_building: dict[str, dict[float, dict]] = {}

    def at(self, buildings, window_end: float, d, timeout: float = 60.0) -> dict[str, dict]:
        """Each building's prediction for the window ending at `window_end`, by appliance."""
        def all_there():
            while (msg := self.pubsub.get_message(timeout=0.05)) is not None:
                p = json.loads(msg["data"])
                self.by_building.setdefault(msg["channel"].decode().split(":")[1], {})[p["window_end"]] = p
            return all(window_end in self.by_building.get(b, {}) for b in buildings)
        wait_for(all_there, timeout, lambda: f"predictions for the window ending {window_end}\n{d.log()[-3000:]}",
                 interval=0.1)
        return {b: {e["appliance"]: e for e in self.by_building[b][window_end]["predictions"]} for b in buildings}


def corrupt(where, appliance: str) -> None:
    """The file cut short, and the record made to match it: only torch can tell."""
    path = where / checkpoint_filename(appliance)
    path.write_bytes(path.read_bytes()[:4000])
    record = json.loads((where / adapted.RECORD).read_text())
    record["appliances"][appliance]["sha256"] = sha256(path)
    (where / adapted.RECORD).write_text(json.dumps(record))


def same(a: dict, b: dict, appliance: str) -> bool:
    return abs(a[appliance]["probability"] - b[appliance]["probability"]) <= 2e-4


@pytest.mark.slow
def test_one_building_serves_its_adapted_models_and_a_reload_goes_back(daemon_factory, redis_client):
    d = daemon_factory()
    state = d.runtime_dir / "state"
    where = write_adaptation(state, d.building, d.env["MODEL_DIR"], ["ElectricKettle", "Microwave"])
    corrupt(where, "Microwave")
    d.start()
    try:
        wait_ready(d, redis_client)
        published = Published(redis_client)
        t0 = aligned_start(time.time() - 600, WINDOW, STEP)
        last = publish_samples(redis_client, d.building, WINDOW, start=t0)
        p = published.at([d.building], last, d)[d.building]
        check_prediction(published.by_building[d.building][last], list(p), WINDOW)
        assert {a for a, e in p.items() if e["adapted"]} == {"ElectricKettle"}
        s = wait_for(lambda: (lambda s: s if s.get("models_adapted") == "ElectricKettle" else None)(
            d.status(redis_client)), 10, "the status hash to say what is adapted")
        assert s["models_adapted_refused"] == "Microwave" and s["models_loaded"] == "11"
        refused = [line for line in d.log().splitlines() if "not served" in line]
        assert len(refused) == 1 and f"building {d.building}: Microwave: adapted model {where}/" in refused[0] \
            and "not a whole torch checkpoint" in refused[0] and "the shipped model serves" in refused[0], refused
        # nilmd adapt --reset, then a reload: the shipped models again
        assert adapted.reset(state, d.building)
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: d.status(redis_client).get("models_adapted") == "" and
                 d.status(redis_client).get("state") != "reloading", 20, lambda: f"the reload\n{d.log()[-2000:]}")
        last = publish_samples(redis_client, d.building, STEP, start=last + 1)
        p = published.at([d.building], last, d)[d.building]
        assert not any(e["adapted"] for e in p.values())
        assert d.status(redis_client)["models_adapted_refused"] == ""
        assert d.stop() == 0
        assert "Traceback" not in d.log()
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)


@pytest.mark.slow
def test_a_list_serves_each_building_its_own_set_and_sighup_follows_the_folders(redis_server, redis_client,
                                                                                model_dir, tmp_path):
    listing, port = tmp_path / "buildings.list", free_port()
    d = list_daemon(redis_server, model_dir, tmp_path, 3, listing=listing, extra_env={"NILMD_METRICS_PORT": str(port)})
    state = tmp_path / "state"
    b0, b1, b2 = d.ids
    corrupt(write_adaptation(state, b1, model_dir, ["ElectricKettle", "Microwave"]), "Microwave")
    d.start()
    try:
        wait_list_ready(d, redis_client)
        published = Published(redis_client)
        t0 = aligned_start(time.time() - 900, WINDOW, STEP)
        last = [publish_samples(redis_client, b, WINDOW, start=t0) for b in d.ids][0]  # the same input for all
        p = published.at(d.ids, last, d)
        assert [a for a, e in p[b1].items() if e["adapted"]] == ["ElectricKettle"]
        assert not any(e["adapted"] for b in (b0, b2) for e in p[b].values())
        assert not same(p[b1], p[b0], "ElectricKettle"), "the adapted kettle model serves building 1"
        assert all(same(p[b1], p[b0], a) and same(p[b2], p[b0], a) for a in p[b0] if a != "ElectricKettle")
        s = wait_for(lambda: (lambda s: s if s[b1].get("models_adapted") == "ElectricKettle" else None)(
            statuses(redis_client, d.ids)), 10, "the status hashes to say what is adapted")
        assert s[b1]["models_adapted_refused"] == "Microwave" and s[b0]["models_adapted"] == ""
        m = scrape(port)
        assert value(m, "nilmd_model_adapted", building=b1, appliance="ElectricKettle") == 1
        assert value(m, "nilmd_model_adapted", building=b0, appliance="ElectricKettle") == 0
        assert value(m, "nilmd_model_adapted_refused", building=b1, appliance="Microwave") == 1
        assert sum(f"building {b1}: Microwave: adapted model" in line for line in d.log().splitlines()) == 1
        # nilmd adapt --reset for building 1, building 2 learned, and a new building 3 comes with its folder
        b3 = f"{d.building}-3"
        assert adapted.reset(state, b1)
        write_adaptation(state, b2, model_dir, ["Refrigerator"])
        write_adaptation(state, b3, model_dir, ["ElectricKettle"])
        listing.write_text("".join(b + "\n" for b in [*d.ids, b3]))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: (lambda s: s[b2].get("models_adapted") == "Refrigerator" and s[b1].get("models_adapted") == ""
                          and s[b3].get("models_adapted") == "ElectricKettle")(statuses(redis_client, [b1, b2, b3])),
                 30, f"the reload to follow the folders\n{d.log()[-3000:]}")
        wait_for(lambda: redis_client.pubsub_numsub(keys.input_channel(b3))[0][1] == 1, 10, "the new building's input")
        last = [publish_samples(redis_client, b, STEP, start=last + 1) for b in d.ids][0]
        publish_samples(redis_client, b3, WINDOW, start=last + 1 - WINDOW)
        p = published.at([*d.ids, b3], last, d)
        assert [a for a, e in p[b2].items() if e["adapted"]] == ["Refrigerator"]
        assert [a for a, e in p[b3].items() if e["adapted"]] == ["ElectricKettle"]
        assert not any(e["adapted"] for b in (b0, b1) for e in p[b].values())
        assert same(p[b1], p[b0], "ElectricKettle") and not same(p[b2], p[b0], "Refrigerator")
        assert not same(p[b3], p[b0], "ElectricKettle")
        assert d.stop() == 0
        assert "Traceback" not in d.log()
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
