"""The one settings table (nilmd/config.py) and everything derived from it: the command line's
flags, the settings table of docs/CONTRACT.md, systemd/nilmd.env, and the defaults that depend on the mode."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from argparse import Namespace

import pytest

from conftest import ROOT
from nilmd import buildings, cli, config, settingsdoc
from nilmd.config import SETTINGS, Config
from nilmd.errors import ConfigError

HINT = f"out of date: regenerate it with `{settingsdoc.REGENERATE}` (from the repository root)"


def test_contract_table_is_the_rendered_table():
    doc = settingsdoc.TABLE_DOC.read_text()
    start, end = settingsdoc.table_span(doc)
    assert doc[start:end] == settingsdoc.render_markdown(), f"docs/CONTRACT.md's settings table is {HINT}"


def test_env_example_is_the_rendered_file():
    text = (ROOT / "systemd" / "nilmd.env").read_text()
    assert text == settingsdoc.render_env_file(), f"systemd/nilmd.env is {HINT}"


def test_a_new_setting_changes_both_renderings():
    """The two checks above can fail: a setting added to the table shows up in both files."""
    extra = dataclasses.replace(SETTINGS[-1], name="extra", flag="--extra", env=("NILMD_EXTRA",),
                                help="a setting nobody documented", section="test", note=None)
    table, env = settingsdoc.render_markdown(SETTINGS + (extra,)), settingsdoc.render_env_file(SETTINGS + (extra,))
    assert table != settingsdoc.render_markdown() and "| `NILMD_EXTRA` | `--extra` |" in table
    assert env != settingsdoc.render_env_file() and "# A setting nobody documented.\n#NILMD_EXTRA=1\n" in env
    with pytest.raises(ValueError, match="extra"):
        settingsdoc.render_env_file(SETTINGS + (dataclasses.replace(extra, section="nowhere"),))


def _setting_flags(subparser) -> set[str]:
    return {o for a in subparser._actions for o in a.option_strings} - {"-h", "--help"}


def _subparsers():
    parser = cli.build_parser()
    return next(a for a in parser._actions if a.choices and "run" in a.choices).choices


def test_run_and_check_take_exactly_the_flags_of_the_table():
    table = {s.flag for s in SETTINGS if s.flag}
    for command in ("run", "check"):
        assert _setting_flags(_subparsers()[command]) == table, f"`nilmd {command}` flags differ from the table"


def test_the_redis_commands_take_the_common_and_redis_flags():
    wanted = {s.flag for s in SETTINGS if s.flag and s.group in ("common", "redis")}
    for command in ("status", "watch", "produce"):
        flags = _setting_flags(_subparsers()[command])
        assert wanted <= flags, f"`nilmd {command}` lacks {sorted(wanted - flags)}"


def test_every_flag_reaches_its_setting(tmp_path):
    """Each flag of the table, given on the command line, is what resolve() returns for it."""
    a_file = tmp_path / "file"
    a_file.write_text("secret\n")
    given = {"redis_host": "redis.example", "redis_port": "7001", "redis_db": "3", "redis_username": "nilm",
             "redis_password_file": str(a_file), "redis_tls_ca": str(a_file), "redis_tls_cert": str(a_file),
             "redis_tls_key": str(a_file), "building_id": "flagged", "log_level": "debug", "mode": "test",
             "model_dir": str(tmp_path), "window_size": "512", "inference_interval": "30", "device": "cpu", "backend": "onnxruntime",
             "threads": "2", "input_mode": "stream", "flood_cooloff": "30", "ring_capacity": "4096", "runtime_dir": str(tmp_path / "run"),
             "state_dir": str(tmp_path / "state"), "heartbeat_timeout": "12", "status_interval": "1.5",
             "max_gap_fill": "9", "input_timeout": "45", "max_clock_skew": "42", "speed": "5", "seed": "7",
             "timezone": "America/Chicago", "predictions_history": "7200", "history_days": "30", "event_on_intervals": "3",
             "event_on_probability": "0.8", "event_off_intervals": "5",
             "metrics_port": "9105", "metrics_host": "0.0.0.0", "mqtt_url": "mqtts://ha@broker.example:8884",
             "mqtt_password_file": str(a_file), "mqtt_tls_ca": str(a_file), "mqtt_tls_cert": str(a_file),
             "mqtt_tls_key": str(a_file), "mqtt_discovery_prefix": "ha", "lease_period": "9",
             "instance_name": "box-7"}
    switches = {s.name for s in SETTINGS if s.flag and s.type == "bool"} - {"leases"}
    # --building-ids excludes --building-id, --mode test and --mqtt-url, and --shard and --leases
    # need it: tried on their own
    alone = config.resolve(cli.build_parser().parse_args(["run", "--building-ids", "a,b", "--shard", "2/3",
                                                          "--leases"]), environ={})
    assert alone.building_ids == "a,b" and buildings.listed(alone) == ["a", "b"]
    assert alone.shard == "2/3" and alone.leases is True
    assert set(given) | switches | {"building_ids", "shard", "leases"} == {s.name for s in SETTINGS if s.flag}, \
        "a flag of the table is not tried here"
    # --mode test has no Redis for --mqtt-url, and a cluster has only database 0: one at a time
    for left_out in (("mqtt_url", "redis_cluster"), ("mode", "redis_db")):
        argv = ["run"] + [s.flag for s in SETTINGS if s.name in switches and s.name not in left_out]
        for s in SETTINGS:
            if s.name in given and s.name not in left_out:
                argv += [s.flag, given[s.name]]
        cfg = config.resolve(cli.build_parser().parse_args(argv), environ={})
        assert all(getattr(cfg, name) is True for name in switches if name not in left_out)
        for name, raw in given.items():
            if name not in left_out:
                value = getattr(cfg, name)
                assert value == type(value)(raw), f"{name}: {value!r} from {raw!r}"
        assert cfg.redis_password == "secret" and cfg.mqtt_password == "secret"


def test_defaults_of_the_table_are_the_defaults_of_config():
    cfg = config.resolve(Namespace(), environ={})
    plain = Config(model_dir=cfg.model_dir, runtime_dir=cfg.runtime_dir, state_dir=cfg.state_dir,
                   timezone=cfg.timezone)
    assert cfg == plain


def test_the_time_zone_is_the_boxs_unless_given_and_a_wrong_one_is_one_line():
    probe = "from argparse import Namespace\nfrom nilmd import config\nprint(config.resolve(Namespace()).timezone)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "TZ": "Asia/Tokyo"})
    assert out.stdout.strip() == "Asia/Tokyo", out.stderr
    assert config.resolve(Namespace(), environ={"NILMD_TIMEZONE": "Europe/Berlin"}).timezone == "Europe/Berlin"
    with pytest.raises(ConfigError, match=r"^--timezone: 'Mars/Olympus' is not a time zone this box knows"):
        config.resolve(Namespace(), environ={"NILMD_TIMEZONE": "Mars/Olympus"})


@pytest.mark.parametrize("args, environ, want", [
    (Namespace(), {}, 300.0),
    (Namespace(mode="test"), {}, config.TEN_YEARS),
    (Namespace(), {"NILMD_MODE": "test"}, config.TEN_YEARS),
    (Namespace(mode="test", max_clock_skew="5"), {}, 5.0),
    (Namespace(mode="test"), {"NILMD_MAX_CLOCK_SKEW": "7"}, 7.0),
    (Namespace(mode="subscriber"), {"NILMD_MAX_CLOCK_SKEW": "8"}, 8.0),
])
def test_test_mode_defaults_the_clock_skew_to_ten_years(args, environ, want):
    """Simulated time runs ahead of the wall clock, so test mode needs a wide skew; what the user
    sets still wins."""
    assert config.resolve(args, environ=environ).max_clock_skew == want


def test_the_printing_commands_work_from_a_shell():
    for flag, first in (("--markdown", "| environment | flag |"), ("--env-file", "# /etc/nilmd/nilmd.env")):
        r = subprocess.run([sys.executable, "-m", "nilmd.settingsdoc", flag], capture_output=True, text=True,
                           timeout=60, cwd=ROOT)
        assert r.returncode == 0 and r.stdout.startswith(first), r.stderr


def test_write_rewrites_only_the_table(tmp_path):
    doc, env = tmp_path / "CONTRACT.md", tmp_path / "nilmd.env"
    original = settingsdoc.TABLE_DOC.read_text()
    start, end = settingsdoc.table_span(original)
    doc.write_text(original[:start] + "| stale | table |\n|---|---|\n" + original[end:])
    env.write_text("#STALE=1\n")
    settingsdoc.write(doc, env)
    assert doc.read_text() == original[:start] + settingsdoc.render_markdown() + original[end:]
    assert env.read_text() == settingsdoc.render_env_file()
