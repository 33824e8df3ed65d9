"""The MQTT process: each prediction to Home Assistant (nilmd.homeassistant), with --mqtt-url.

Why a child of its own rather than a part of the inference or the supervisor: a broker is one
more remote party that can be slow, down or refuse us, and whatever it does must not delay a
prediction or the supervisor's loop. As a Worker it reads the predictions from Redis like any
other consumer (the channel, `latest` and the energy hash), the inference does not know it
exists, and the supervisor supervises it like the others: heartbeat, restart with backoff, its
pid, memory and restarts in the status hash and in /metrics. A bug or a hang here costs Home
Assistant a few seconds of values, never a window.

One thread: paho's network loop is run from this loop (`Client.loop`), not paho's own thread,
so that reconnecting uses nilmd's one backoff (nilmd.backoff) and every failure is one
throttled line (a broker that is down for an hour logs once a minute, not once a second). The
password never reaches a log line: the broker is named by nilmd.config.mqtt_endpoint's parts.
"""

from __future__ import annotations

import logging
import ssl
import time

from nilmd import config, homeassistant, keys, latest
from nilmd.backoff import Backoff
from nilmd.config import Config
from nilmd.daemon import control as ctlmod
from nilmd.daemon.worker import Worker
from nilmd.errors import EXIT_OK, redis_error

TICK_S = 0.1  # each of the two waits of one loop turn (broker, Redis): the heartbeat stays fresh
UNCOUNTED_WAIT_S = 10.0  # how long a prediction's energy is looked for after it (the ledger may hold it longer)
CONNACK_TIMEOUT_S = 10.0  # a broker that took the TCP connection but never answers CONNECT


class Broker:
    """The connection to the broker: connects when due, announces on every (re)connection."""

    def __init__(self, cfg: Config, log, throttle, ctl):
        import paho.mqtt.client as paho

        self.paho = paho
        tls, user, self.host, self.port = config.mqtt_endpoint(cfg.mqtt_url)
        self.tls = tls
        self.where = f"{'mqtts' if tls else 'mqtt'}://{user + '@' if user else ''}{self.host}:{self.port}"
        self.building, self.prefix = cfg.building_id, cfg.mqtt_discovery_prefix
        self.log, self.throttle, self.ctl = log, throttle, ctl
        self.availability = homeassistant.availability_topic(self.building)
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"nilmd-{self.building}",
                             protocol=paho.MQTTv311)
        if user:
            client.username_pw_set(user, cfg.mqtt_password or None)
        if tls:
            client.tls_set(ca_certs=cfg.mqtt_tls_ca or None, certfile=cfg.mqtt_tls_cert or None,
                           keyfile=cfg.mqtt_tls_key or None)
        client.will_set(self.availability, "offline", qos=1, retain=True)
        client.on_connect, client.on_disconnect = self._on_connect, self._on_disconnect
        self.client = client
        self.backoff = Backoff()
        self.retry_at = 0.0
        self.started = None  # monotonic time of the CONNECT in flight, None when none is
        self.connected = False
        self.states: list[tuple[str, str]] = []  # the newest states, sent again on every connection

    # -- the connection ---------------------------------------------------------------------------
    def poll(self, timeout: float) -> None:
        """Connect when due, then let paho read and write for up to `timeout` s."""
        now = time.monotonic()
        if not self.connected and self.started is None:
            if now < self.retry_at:
                time.sleep(timeout)
                return
            self.ctl["mqtt_state"] = ctlmod.MQTT_CONNECTING
            try:
                self.client.connect(self.host, self.port, keepalive=30)  # TCP (and TLS): connect_timeout 5 s
            except (OSError, ValueError) as e:  # refused, unreachable, a TLS failure (ssl.SSLError is an OSError)
                why = f"cannot connect: {e.strerror or e}" if isinstance(e, OSError) else str(e)
                if self.tls and isinstance(e, (ssl.SSLError, ConnectionResetError, ConnectionAbortedError)):
                    why += (" during the TLS handshake: is that port a TLS listener? (mqtts:// needs one; mqtt:// "
                            "is for a plain listener)")
                self._failed(why)
                return
            self.started = now
        elif self.started is not None and now - self.started > CONNACK_TIMEOUT_S:
            self._failed(f"no answer to CONNECT in {CONNACK_TIMEOUT_S:.0f} s")
            return
        rc = self.client.loop(timeout)
        if rc != self.paho.MQTT_ERR_SUCCESS and (self.connected or self.started is not None):
            self._failed(f"connection lost ({self.paho.error_string(rc)})")

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            self._failed(f"the broker refused the connection: {reason}")
            return
        self.connected, self.started = True, None
        self.ctl["mqtt_state"] = ctlmod.MQTT_CONNECTED
        failures = self.backoff.failures
        self.backoff.reset()
        self.throttle.ok("broker", msg=f"connected to the MQTT broker {self.where}"
                         + (f" after {failures} failed attempts" if failures else ""))
        # Retained, so Home Assistant finds them whenever it starts; sent on every connection
        # because a broker restarted without persistence has forgotten them.
        for topic, payload in homeassistant.discovery(self.building, self.prefix):
            self.send(topic, payload, qos=1)
        self.send(self.availability, "online", qos=1)
        self.publish(self.states)

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        if self.connected or self.started is not None:
            self._failed(f"the connection was closed ({reason})")

    def _failed(self, why: str) -> None:
        """One failure: count it, one throttled line, and the next attempt after the backoff."""
        if not self.connected and self.started is None and time.monotonic() < self.retry_at:
            return  # paho reports one failure through more than one door; it counts once
        self.connected, self.started = False, None
        self.ctl["mqtt_state"] = ctlmod.MQTT_CONNECTING
        self.ctl.add("mqtt_errors")
        delay = self.backoff.next_delay()
        self.retry_at = time.monotonic() + delay
        self.throttle.log("broker", logging.WARNING, f"MQTT broker {self.where}: {why}; Home Assistant gets no "
                          f"values until it is back (trying again with backoff, next in {delay:.1f} s)")

    # -- messages ---------------------------------------------------------------------------------
    def send(self, topic: str, payload: str, qos: int = 0):
        info = self.client.publish(topic, payload, qos=qos, retain=True)
        self.ctl.add("mqtt_published")
        return info

    def publish(self, states: list[tuple[str, str]]) -> None:
        """The newest states: sent now if connected, else kept for the next connection."""
        self.states = states
        if self.connected:
            for topic, value in states:
                self.send(topic, value)

    def close(self, timeout: float = 2.0) -> None:
        """A clean stop: "offline" (retained) first, as the last will would say it."""
        if self.connected:
            info = self.send(self.availability, "offline", qos=1)
            deadline = time.monotonic() + timeout
            while not info.is_published() and time.monotonic() < deadline:
                if self.client.loop(0.05) != self.paho.MQTT_ERR_SUCCESS:
                    break
            self.connected = False  # what follows is our own doing, not a failure to report
            self.client.disconnect()
            self.client.loop(0.05)


class MqttWorker(Worker):
    role = "mqtt"

    def run(self) -> int:
        from nilmd import redisconn

        self.redis = redisconn.client(self.cfg, name="mqtt", socket_timeout=3.0)  # < heartbeat timeout
        self.errors = redisconn.ERRORS
        try:
            self.broker = Broker(self.cfg, self.log, self.throttle, self.ctl)
        except (OSError, ValueError) as e:  # TLS files that exist but are no certificate or key
            # An optional exporter: Home Assistant gets nothing, the predictions go on. The process
            # idles (restarting it would fail the same way) and the supervisor says `degraded`.
            self.log.error("cannot use the MQTT TLS files (--mqtt-tls-ca, --mqtt-tls-cert, --mqtt-tls-key): %s; "
                           "Home Assistant gets nothing until they are fixed and nilmd restarted", e)
            self.ctl["mqtt_state"] = ctlmod.MQTT_UNUSABLE
            while self.alive:
                self.beat()
                time.sleep(TICK_S * 5)
            return EXIT_OK
        self.pubsub = None
        self.redis_backoff, self.redis_retry_at = Backoff(), 0.0
        self.uncounted, self.uncounted_until = None, 0.0  # the newest prediction whose energy Redis lacked
        self.log.info("publishing to Home Assistant via %s (discovery prefix %s)", self.broker.where,
                      self.cfg.mqtt_discovery_prefix)
        try:
            while self.alive:
                self.beat()
                self.broker.poll(TICK_S)
                update = self.newest()
                if update is not None:
                    self.broker.publish(homeassistant.states(self.cfg.building_id, *update))
                self.throttle.flush()
        finally:
            self.broker.close()
        return EXIT_OK

    def newest(self):
        """(prediction, energy) when a prediction is new, else None. After a backlog only the
        newest counts: Home Assistant shows states, not a history."""
        b = self.cfg.building_id
        try:
            if self.pubsub is None:
                if time.monotonic() < self.redis_retry_at:
                    return None
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(keys.predictions_channel(b))
                self.pubsub = pubsub
                prediction, energy = latest.read(self.redis, b)  # what there is already, at once
                if self.redis_backoff.failures:
                    self.throttle.ok("redis", msg="reading the predictions from Redis again")
                self.redis_backoff.reset()
                return (prediction, energy) if prediction else None
            newest, msg = None, self.pubsub.get_message(timeout=TICK_S)
            while msg is not None:
                if msg.get("type") == "message":
                    newest = latest.prediction(msg["data"]) or newest
                msg = self.pubsub.get_message(timeout=0.0)
            if newest is None and (self.uncounted is None or time.monotonic() > self.uncounted_until):
                self.uncounted = None
                return None
            raw = self.redis.hgetall(keys.energy_key(b))
            if newest is None:  # only the energy of the last one to send, once Redis has it
                if not latest.counted(raw, self.uncounted):
                    return None
                newest = self.uncounted
            # The energy may come after the prediction: on a Redis Cluster the energy hash and the
            # channel are on different nodes. Its states go again once Redis counted it.
            self.uncounted = None if latest.counted(raw, newest) else newest
            self.uncounted_until = time.monotonic() + UNCOUNTED_WAIT_S
            return newest, latest.energy(raw)
        except self.errors as e:
            self.ctl.add("mqtt_errors")
            kind, line = redis_error(e)
            delay = self.redis_backoff.next_delay()
            self.redis_retry_at = time.monotonic() + delay
            self.throttle.log("redis", logging.WARNING, f"cannot read the predictions from Redis: {line}; "
                              f"trying again in {delay:.1f} s")
            if self.pubsub is not None:
                try:
                    self.pubsub.close()
                except Exception:  # a broken connection may raise on close; it is gone either way
                    pass
            self.pubsub = None
            return None


def main(cfg: Config, paths: dict) -> None:
    """Entry point of the MQTT process (what nilmd.daemon.spawn runs)."""
    MqttWorker.main(cfg, paths)
