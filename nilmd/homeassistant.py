"""Home Assistant over MQTT: the topics and payloads nilmd publishes (docs/CONTRACT.md §12).

Per appliance three entities of one device (the building): a sensor with its power (W), a
binary sensor that is on while it runs, and an energy sensor (Wh, `state_class:
total_increasing`, so that Home Assistant's energy dashboard takes it). The house's always-on
load and "other" (what the meter saw that no appliance accounts for) get a power and an energy
sensor each, the same way (the energy dashboard's "individual devices" can list them beside the
appliances, so that the devices add up to the meter). Each is announced by a
retained discovery config under the discovery prefix, and each has a topic of its own carrying
a plain value, so no template is needed to read it. All share one availability topic: "online"
once connected, "offline" as the connection's last will and on a clean stop, so Home Assistant
greys the values out whenever nilmd is not there to keep them current.

No paho here: nilmd.daemon.mqtt sends what these functions build.
"""

from __future__ import annotations

import json
import re

from nilmd import __version__, latest
from nilmd.appliances import APPLIANCES


def node_id(building: str) -> str:
    """The device's id in discovery topics and unique_ids (Home Assistant allows [A-Za-z0-9_-])."""
    return "nilmd_" + re.sub(r"[^A-Za-z0-9_-]", "_", building)


def slug(appliance: str) -> str:
    """HeatPump -> heat_pump."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", appliance).lower()


def availability_topic(building: str) -> str:
    return f"nilmd/{building}/availability"


def state_topic(building: str, appliance: str, what: str) -> str:
    """`what`: power, on or energy."""
    return f"nilmd/{building}/{slug(appliance)}/{what}"


# (component, what, name suffix, fields): the three entities of each appliance
POWER = ("sensor", "power", " power", {"unit_of_measurement": "W", "device_class": "power", "state_class": "measurement"})
ENERGY = ("sensor", "energy", " energy", {"unit_of_measurement": "Wh", "device_class": "energy",
                                          "state_class": "total_increasing"})
ENTITIES = (POWER, ("binary_sensor", "on", "", {"device_class": "running", "payload_on": "ON", "payload_off": "OFF"}),
            ENERGY)
PART_NAMES = {"always_on": "Always on", "other": "Other"}  # latest.PARTS: power and energy, no on/off


def discovery(building: str, prefix: str = "homeassistant") -> list[tuple[str, str]]:
    """(topic, JSON payload) of every discovery config, to publish retained."""
    node = node_id(building)
    device = {"identifiers": [node], "name": f"nilmd {building}", "manufacturer": "nilmd",
              "model": "NILM, WaveNILM v3", "sw_version": __version__}
    out = []
    entities = [(a, a, e) for a in APPLIANCES for e in ENTITIES]
    entities += [(part, PART_NAMES[part], e) for part in latest.PARTS for e in (POWER, ENERGY)]
    for appliance, name, (component, what, suffix, fields) in entities:
        object_id = f"{slug(appliance)}_{what}"
        config = {
            "name": f"{name}{suffix}",
            "unique_id": f"{node}_{object_id}",
            "state_topic": state_topic(building, appliance, what),
            **fields,
            "availability_topic": availability_topic(building),
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": device,
            "origin": {"name": "nilmd", "sw_version": __version__},
        }
        out.append((f"{prefix}/{component}/{node}/{object_id}/config", json.dumps(config, separators=(",", ":"))))
    return out


def states(building: str, prediction: dict | None, energy: dict) -> list[tuple[str, str]]:
    """(topic, value) of every state known: power and on from the prediction, energy (total Wh)
    from the energy hash (nilmd.latest.energy) where it has the appliance; likewise the parts."""
    out = []
    for appliance, entry in latest.appliances(prediction).items():
        out.append((state_topic(building, appliance, "power"), f"{float(entry.get('power_watts', 0.0)):.2f}"))
        out.append((state_topic(building, appliance, "on"), "ON" if entry.get("is_on") else "OFF"))
    for part, watts in latest.parts(prediction).items():
        out.append((state_topic(building, part, "power"), f"{watts:.2f}"))
    for appliance, wh in energy.items():
        if "total" in wh:
            out.append((state_topic(building, appliance, "energy"), f"{wh['total']:.2f}"))
    return out
