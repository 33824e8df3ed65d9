"""Home Assistant over MQTT against a real mosquitto (Debian package `mosquitto`) started here,
with a real paho subscriber checking the discovery payloads, the states and the availability."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time

import pytest

from conftest import publish_samples, wait_for
from nilmd import keys
from nilmd.appliances import APPLIANCES
from nilmd.testing import aligned_start, free_port
from test_daemon import Subscriber, wait_ready

paho = pytest.importorskip("paho.mqtt.client", reason="pip install 'nilmd[mqtt]'")

CONFIGS = 3 * len(APPLIANCES) + 4  # each appliance 3 entities; always-on and other 2 each


class Mosquitto:
    """A mosquitto of our own: a plain listener on `port` and a TLS one on `tls_port` (a
    self-signed certificate for 127.0.0.1), both wanting a user name and password."""

    def __init__(self, workdir, port: int, users: dict):
        self.workdir, self.port, self.tls_port, self.users = workdir, port, free_port(), users
        self.proc = None
        self.ca = workdir / "cert.pem"
        passwd = workdir / "passwd"
        for i, (user, password) in enumerate(users.items()):
            subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwd), user, password],
                           check=True, capture_output=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout",
                        str(workdir / "key.pem"), "-out", str(self.ca)], check=True, capture_output=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"user {os.environ.get('USER') or 'root'}\npersistence false\nallow_anonymous false\n"
            f"password_file {passwd}\nlog_dest stderr\n"
            f"listener {port} 127.0.0.1\n"
            f"listener {self.tls_port} 127.0.0.1\ncertfile {self.ca}\nkeyfile {workdir / 'key.pem'}\n")

    def start(self) -> "Mosquitto":
        self.log = open(self.workdir / "mosquitto.log", "wb")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=self.log, stderr=subprocess.STDOUT)
        user, password = next(iter(self.users.items()))
        probe = MqttSubscriber(self.port, user, password, connect=False)
        wait_for(lambda: self.proc.poll() is None and probe.try_connect(), 10,
                 f"mosquitto on port {self.port} to accept a login ({(self.workdir / 'mosquitto.log').read_text()})")
        probe.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc is not None:
            self.log.close()


class MqttSubscriber:
    """A paho client that records every message of `nilmd/#` and `homeassistant/#`."""

    def __init__(self, port: int, user: str, password: str, connect: bool = True):
        self.port = port
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-{secrets.token_hex(4)}")
        self.client.username_pw_set(user, password)
        self.messages: list[tuple[str, str, bool]] = []  # (topic, payload, retained), in arrival order
        self.lock = threading.Lock()
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, reason, p: not reason.is_failure and c.subscribe(
            [("nilmd/#", 1), ("homeassistant/#", 1)])
        if connect:
            self.client.connect("127.0.0.1", port)
            self.client.loop_start()

    def try_connect(self) -> bool:
        try:
            return self.client.connect("127.0.0.1", self.port) == 0
        except OSError:
            return False

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload.decode(), bool(msg.retain)))

    def last(self, prefix: str = "") -> dict[str, str]:
        """topic -> its newest payload."""
        with self.lock:
            return {t: p for t, p, _ in self.messages if t.startswith(prefix)}

    def history(self, topic: str) -> list[str]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def broker(tmp_path):
    if shutil.which("mosquitto") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    users = {"nilmd": secrets.token_urlsafe(12), "ha": secrets.token_urlsafe(12)}
    (tmp_path / "mqtt").mkdir()
    server = Mosquitto(tmp_path / "mqtt", free_port(), users)
    yield server
    server.stop()


def check_discovery(configs: dict, building: str) -> dict:
    """The 37 discovery configs: (component, unique_id) -> config, every field Home Assistant needs."""
    from nilmd.homeassistant import node_id

    node = node_id(building)
    assert len(configs) == CONFIGS, sorted(configs)
    by_kind = {}
    for topic, payload in configs.items():
        prefix, component, node_in_topic, object_id, last = topic.split("/")
        assert (prefix, node_in_topic, last) == ("homeassistant", node, "config") and component in (
            "sensor", "binary_sensor"), topic
        c = json.loads(payload)
        assert c["unique_id"] == f"{node}_{object_id}"
        assert c["availability_topic"] == f"nilmd/{building}/availability"
        assert (c["payload_available"], c["payload_not_available"]) == ("online", "offline")
        assert c["device"]["identifiers"] == [node] and building in c["device"]["name"]
        assert c["state_topic"].startswith(f"nilmd/{building}/")
        by_kind[(component, object_id.rsplit("_", 1)[1])] = by_kind.get((component, object_id.rsplit("_", 1)[1]), 0) + 1
        if object_id.endswith("_power"):
            assert (component, c["device_class"], c["unit_of_measurement"], c["state_class"]) == (
                "sensor", "power", "W", "measurement")
        elif object_id.endswith("_energy"):
            assert (component, c["device_class"], c["unit_of_measurement"], c["state_class"]) == (
                "sensor", "energy", "Wh", "total_increasing")
        else:
            assert object_id.endswith("_on") and component == "binary_sensor"
            assert c["device_class"] == "running" and (c["payload_on"], c["payload_off"]) == ("ON", "OFF")
    assert len({json.loads(p)["unique_id"] for p in configs.values()}) == len(configs)
    # 11 appliances, and the house's always-on load and "other": power and energy, no on/off
    assert by_kind == {("sensor", "power"): 13, ("binary_sensor", "on"): 11, ("sensor", "energy"): 13}
    names = {json.loads(p)["name"] for p in configs.values()}
    assert {"Always on power", "Always on energy", "Other power", "Other energy"} <= names
    return configs


def states_match(sub: MqttSubscriber, building: str, prediction: dict, energy_wh: dict) -> bool:
    from nilmd.homeassistant import slug

    got = sub.last(f"nilmd/{building}/")
    for e in prediction["predictions"]:
        base = f"nilmd/{building}/{slug(e['appliance'])}"
        if got.get(f"{base}/on") != ("ON" if e["is_on"] else "OFF"):
            return False
        if abs(float(got.get(f"{base}/power", "nan")) - e["power_watts"]) > 0.006:
            return False
    for part, field in (("always_on", "always_on_watts"), ("other", "other_watts")):
        if abs(float(got.get(f"nilmd/{building}/{part}/power", "nan")) - prediction[field]) > 0.006:
            return False
    return all(abs(float(got.get(f"nilmd/{building}/{slug(a)}/energy", "nan")) - wh) < 0.006
               for a, wh in energy_wh.items())


@pytest.mark.slow
def test_home_assistant_discovery_states_and_availability(broker, daemon_factory, redis_client, tmp_path):
    user, password = "nilmd", broker.users["nilmd"]
    (tmp_path / "mqtt-password").write_text(password + "\n")
    d = daemon_factory(args=["--mqtt-url", f"mqtt://{user}@127.0.0.1:{broker.port}",
                             "--mqtt-password-file", str(tmp_path / "mqtt-password")])
    d.start()
    # The broker is down at first: the daemon starts, predicts, and says so once.
    wait_ready(d, redis_client)
    sub_redis = Subscriber(redis_client, d.building)
    last = publish_samples(redis_client, d.building, 256 + 16, start=aligned_start(time.time() - 272, 256, 16))
    first = sub_redis.until(last)
    wait_for(lambda: "cannot connect" in d.log(), 20, "a line saying the broker is unreachable")
    where = f"mqtt://nilmd@127.0.0.1:{broker.port}"
    assert any(where in line and "Connection refused" in line for line in d.log().splitlines())

    broker.start()
    sub = MqttSubscriber(broker.port, "ha", broker.users["ha"])
    configs = wait_for(lambda: (lambda c: c if len(c) == CONFIGS else None)(sub.last("homeassistant/")), 30,
                       lambda: f"{CONFIGS} discovery configs\n{d.log()[-2000:]}")
    check_discovery(configs, d.building)
    availability = f"nilmd/{d.building}/availability"
    wait_for(lambda: sub.last().get(availability) == "online", 10, "availability online")
    # the prediction made while the broker was away is sent on connecting
    wait_for(lambda: states_match(sub, d.building, first, {}), 10, f"states of the first prediction {sub.last()}")

    # The energy sensors carry what the inference counted into nilm:{b}:energy (docs/CONTRACT.md §3.6).
    def counted() -> dict:
        h = {k.decode(): v for k, v in redis_client.hgetall(keys.energy_key(d.building)).items()}
        return {k.rsplit(":", 1)[0]: float(v) for k, v in h.items() if k.endswith(":total_wh")}

    last = publish_samples(redis_client, d.building, 16, start=last + 1)
    p = sub_redis.until(last)
    energy = wait_for(lambda: (lambda e: e if len(e) == 13 else None)(counted()), 10,
                      "11 appliances, always-on and other counted")
    assert any(wh > 0 for wh in energy.values()), f"a simulated house draws something: {energy}"
    wait_for(lambda: states_match(sub, d.building, p, energy), 10,
             f"states of the new prediction and the energy {sub.last()}")

    warnings = [line for line in d.log().splitlines() if "MQTT broker" in line and "WARNING" in line]
    assert len(warnings) == 1, f"a broker down for seconds is one line, throttled: {warnings}"

    # The broker restarts (and forgets everything: no persistence): the same process reconnects
    # with backoff and announces everything again, the newest states included.
    sub.close()
    broker.stop()
    wait_for(lambda: "connection lost" in d.log() or "connection was closed" in d.log(), 10,
             "the lost connection noticed")
    broker.start()
    sub = MqttSubscriber(broker.port, "ha", broker.users["ha"])
    wait_for(lambda: len(sub.last("homeassistant/")) == CONFIGS and states_match(
        sub, d.building, p, energy), 30, lambda: f"everything again\n{d.log()[-2000:]}")
    assert d.status(redis_client)["restarts_mqtt"] == "0"

    # A crash of the MQTT process: the broker sends its last will, the supervisor restarts it.
    mqtt_pid = int(wait_for(lambda: d.status(redis_client).get("pid_mqtt"), 5, "pid_mqtt in the status hash"))
    os.kill(mqtt_pid, signal.SIGKILL)
    wait_for(lambda: sub.history(availability)[-1:] == ["offline"], 10, "the last will: offline")
    wait_for(lambda: sub.history(availability)[-1:] == ["online"], 20, "online again after the restart")
    assert d.status(redis_client)["restarts_mqtt"] == "1"

    assert d.stop() == 0
    wait_for(lambda: sub.history(availability)[-1:] == ["offline"], 10, "offline at a clean stop")
    sub.close()
    fresh = MqttSubscriber(broker.port, "ha", broker.users["ha"])  # what Home Assistant finds when it starts
    wait_for(lambda: fresh.last().get(availability) == "offline" and len(fresh.last("homeassistant/")) == CONFIGS, 10,
             "the retained availability (offline) and discovery configs")
    fresh.close()
    log = d.log()
    assert password not in log and "Traceback" not in log, log[-3000:]


def make_broker(tmp_path, url: str, password: str, **tls):
    """nilmd.daemon.mqtt.Broker as the MQTT process builds it, on a real control block."""
    from nilmd.config import Config
    from nilmd.daemon.control import ControlBlock
    from nilmd.daemon.mqtt import Broker
    from nilmd.log import Throttle

    log = logging.getLogger("nilmd.mqtt.test")
    ctl = ControlBlock.create(str(tmp_path / f"ctl-{secrets.token_hex(4)}"))
    cfg = Config(building_id="tls.house", mqtt_url=url, mqtt_password=password, **tls)
    return Broker(cfg, log, Throttle(log), ctl), ctl


@pytest.mark.slow
def test_tls_a_wrong_ca_and_a_wrong_password(broker, tmp_path, caplog):
    """mqtts:// with the CA that signed the broker: discovery arrives; a CA that did not, or a
    wrong password, is a clear line and no connection."""
    broker.start()
    sub = MqttSubscriber(broker.port, "ha", broker.users["ha"])
    other_ca = tmp_path / "other.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=x",
                    "-keyout", str(tmp_path / "other.key"), "-out", str(other_ca)], check=True, capture_output=True)
    caplog.set_level(logging.WARNING, logger="nilmd.mqtt.test")
    tls_url = f"mqtts://nilmd@127.0.0.1:{broker.tls_port}"
    for url, password, ca, expected in ((tls_url, broker.users["nilmd"], other_ca, "certificate verify failed"),
                                        (f"mqtt://nilmd@127.0.0.1:{broker.port}", "wrong", "", "refused")):
        b, ctl = make_broker(tmp_path, url, password, mqtt_tls_ca=str(ca) if ca else "")
        wait_for(lambda: (b.poll(0.05), ctl["mqtt_errors"] >= 1)[1], 10, f"{url} to fail")
        assert not b.connected
        line = caplog.records[-1].getMessage()
        assert expected in line and password not in line and url in line, line
    b, ctl = make_broker(tmp_path, tls_url, broker.users["nilmd"], mqtt_tls_ca=str(broker.ca))
    wait_for(lambda: (b.poll(0.05), b.connected)[1], 10, f"a TLS connection ({caplog.text})")
    wait_for(lambda: (b.poll(0.05), len(sub.last("homeassistant/")) == CONFIGS)[1], 10, "discovery over TLS")
    check_discovery(sub.last("homeassistant/"), "tls.house")
    b.close()
    wait_for(lambda: sub.last().get("nilmd/tls.house/availability") == "offline", 10, "offline after close")
    sub.close()


@pytest.mark.parametrize("env, says", [
    ({"NILMD_MQTT_URL": "mqtt://nilmd:hunter2@broker"}, "put the password in --mqtt-password-file"),
    ({"NILMD_MQTT_URL": "http://broker"}, "is not mqtt://[user@]host[:port]"),
    ({"NILMD_MQTT_URL": "mqtt://broker:0x50"}, "has an invalid port"),
    ({"NILMD_MQTT_URL": "mqtt://broker", "NILMD_MODE": "test"}, "--mode test"),
    ({"NILMD_MQTT_URL": "mqtt://broker", "NILMD_MQTT_PASSWORD_FILE": "/nonexistent/pw"}, "cannot read /nonexistent/pw"),
    ({"NILMD_MQTT_URL": "mqtts://broker", "NILMD_MQTT_TLS_CA": "/nonexistent/ca.pem"}, "--mqtt-tls-ca"),
])
def test_mqtt_settings_that_cannot_work_are_one_line(env, says):
    from nilmd import config
    from nilmd.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        config.resolve(None, environ=env)
    assert says in str(e.value) and "hunter2" not in str(e.value) and "\n" not in str(e.value)


def test_mqtt_password_from_the_systemd_credential(tmp_path):
    from nilmd import config

    (tmp_path / "mqtt-password").write_text("s3cret\n")
    cfg = config.resolve(None, environ={"NILMD_MQTT_URL": "mqtt://nilmd@broker",
                                        "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert cfg.mqtt_password == "s3cret" and "s3cret" not in repr(cfg) and cfg.public()["mqtt_password"] == "***"
    assert config.mqtt_endpoint(cfg.mqtt_url) == (False, "nilmd", "broker", 1883)


@pytest.mark.slow
def test_tls_files_that_are_no_certificate_degrade_and_predictions_go_on(daemon_factory, redis_client, tmp_path):
    """Issue 23, defect 7: a CA file that exists (the settings check passes) but holds no
    certificate: the MQTT process says so in one line and idles, the daemon is `degraded` with the
    reason (`nilmd status` exits 1), and every window is still predicted."""
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    d = daemon_factory(extra_env={"NILMD_MQTT_URL": "mqtts://nilmd@127.0.0.1:1",
                                  "NILMD_MQTT_TLS_CA": str(tmp_path / "ca.pem")}).start()
    t0 = aligned_start(time.time() - 400, 256, 16)
    wait_for(lambda: d.status(redis_client).get("input_connected") == "1", 60,
             lambda: f"the daemon to subscribe\n{d.log()[-3000:]}")
    publish_samples(redis_client, d.building, 256 + 16, start=t0)
    wait_for(lambda: d.status(redis_client).get("inferences") == "2", 30, lambda: f"two predictions\n{d.log()[-3000:]}")
    st = wait_for(lambda: (lambda s: s if s.get("state") == "degraded" else None)(d.status(redis_client)), 10,
                  lambda: f"the daemon to be degraded\n{d.log()[-3000:]}")
    assert "MQTT exporter cannot start" in st["degraded_reason"], st
    assert json.loads(redis_client.get(keys.latest_key(d.building)))["window_end"] == t0 + 256 + 15
    lines = [x for x in d.log().splitlines() if "--mqtt-tls-ca" in x]
    assert len(lines) == 1 and "no certificate" in lines[0] and "CRITICAL" not in d.log(), d.log()[-3000:]
    assert d.proc.poll() is None and "failed" not in d.log()
    assert d.stop() == 0


def test_mqtts_to_a_plain_listener_names_tls(broker, tmp_path, caplog):
    """Issue 23, defect 7: mqtts:// to a port that speaks plain MQTT says it is the TLS handshake."""
    broker.start()
    caplog.set_level(logging.WARNING, logger="nilmd.mqtt.test")
    b, ctl = make_broker(tmp_path, f"mqtts://nilmd@127.0.0.1:{broker.port}", broker.users["nilmd"],
                         mqtt_tls_ca=str(broker.ca))
    wait_for(lambda: (b.poll(0.05), ctl["mqtt_errors"] >= 1)[1], 10, "mqtts:// to a plain listener to fail")
    line = caplog.records[-1].getMessage()
    assert "TLS handshake" in line and "plain listener" in line, line
