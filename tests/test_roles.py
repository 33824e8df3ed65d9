"""nilmd.daemon.roles: one table of child roles, and everything that lists processes reads it."""

from __future__ import annotations

from conftest import wait_for
from test_layout import imported_after
from nilmd.config import Config
from nilmd.daemon import control, roles, status
from nilmd.daemon.spawn import Spawned


def test_every_role_has_its_slots_and_only_the_asked_for_optional_ones_run():
    for role in roles.ROLES:
        assert {f"{role.name}_pid", f"{role.name}_heartbeat", f"{role.name}_state"} <= set(control.SLOTS), role
    assert [r.name for r in roles.serving(Config())] == ["reader", "inference"]
    assert [r.name for r in roles.serving(Config(mqtt_url="mqtt://127.0.0.1:1883"))] == ["reader", "inference", "mqtt"]
    assert roles.PROCESSES[0] == roles.SUPERVISOR and set(roles.PROCESSES[1:]) == set(roles.NAMES)


def test_nilmd_status_lists_every_process_the_hash_names():
    """The MQTT process was counted in memory_total_mb but not listed (issue 24: 223.6 MB shown,
    the three listed added up to 176.5)."""
    fields = {"state": "running", "updated_at": "999", "status_interval_s": "2", "memory_total_mb": "223.6"}
    for role, pid, mb in (("supervisor", 10, "40.1"), ("reader", 11, "50.2"), ("inference", 12, "86.2"),
                          ("mqtt", 13, "47.1")):
        fields.update({f"pid_{role}": str(pid), f"memory_{role}_mb": mb})
    text = status.render(fields, now=1000.0)
    assert "processes    supervisor 10, reader 11, inference 12, mqtt 13;" in text, text
    assert "memory       223.6 MB (supervisor 40.1, reader 50.2, inference 86.2, mqtt 47.1)" in text, text
    del fields["pid_mqtt"], fields["memory_mqtt_mb"]
    assert "processes    supervisor 10, reader 11, inference 12;" in status.render(fields, now=1000.0)


def test_a_role_entry_is_a_name_the_child_imports():
    """The supervisor spawns "module:function" without importing the module itself."""
    p = Spawned("os:_exit", (7,), "nilmd-test")
    wait_for(lambda: not p.is_alive(), 30, "the child to exit")
    assert p.exitcode == 7


def test_the_supervisor_imports_none_of_its_children():
    """What a child needs (torch, paho, the models) is loaded in the child only."""
    mods = imported_after("import nilmd.daemon.supervisor")
    leaked = sorted(m for m in mods if m in {r.entry.split(":")[0] for r in roles.ROLES})
    assert not leaked, f"importing the supervisor imported {leaked}"
