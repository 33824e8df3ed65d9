"""Settings: command line over environment over defaults (docs/CONTRACT.md §5).

One table names every setting once: the fields of `Config`. Each field carries, in
`dataclasses.field(metadata=...)` (see `setting()`), its flag, its environment variables (the
original service's names first), its bounds, help text and the note the example settings file
shows. `SETTINGS` is that table read back from `dataclasses.fields(Config)`; the CLI builds its
flags from it, `resolve` turns flags + environment into a validated, picklable `Config` that is
passed to the child processes as is, and `nilmd.settingsdoc` renders the settings table of docs/CONTRACT.md §5 and
systemd/nilmd.env from it (tests/test_settings.py keeps those files equal to what it renders).

Why the dataclass carries the table rather than a table generating the dataclass: `Config` is
what the rest of the code reads and what tests build directly (`Config(window_size=256, ...)`),
so it stays a plain class that a reader, an editor and a type checker can see, with each
field's name, type and default on one line; the type annotation also gives the setting's type,
so nothing is said twice.

A default can depend on the box (`dynamic`: computed when resolving, e.g. $RUNTIME_DIRECTORY) or
on the mode (`per_mode`): in test mode simulated time runs years ahead of the wall clock, so the
clock-skew limit defaults to its maximum there. A value the user gives always wins.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nilmd import days
from nilmd.buildings import ID_RULE, is_building_id, listed, parse_shard
from nilmd.errors import ConfigError
# pip installs the shipped checkpoints as data files under {prefix}/share/nilmd/checkpoints
# (pyproject.toml); an editable install finds them beside the package instead.
PACKAGED_CHECKPOINTS = (Path(sys.prefix) / "share" / "nilmd" / "checkpoints",
                        Path(__file__).resolve().parent.parent / "checkpoints")


def _default_model_dir() -> str:
    if Path("./checkpoints").is_dir():  # a source checkout
        return "./checkpoints"
    return str(next((p for p in PACKAGED_CHECKPOINTS if p.is_dir()), PACKAGED_CHECKPOINTS[0]))


def _default_runtime_dir() -> str:
    # systemd's RuntimeDirectory= (emptied on every stop) when we have one, else /dev/shm.
    return os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or "/dev/shm"


def _default_state_dir() -> str:
    return os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "./state"


@dataclass(frozen=True)
class Setting:
    name: str  # attribute of Config
    flag: str | None
    env: tuple[str, ...]
    type: str  # str, int, float, bool, choice, path
    default: object  # None: computed when resolving (`dynamic`), described by `default_doc`
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False
    group: str = "daemon"  # which commands take it: common (all), redis, list (run, check, status), fleet
    # (run, check: sharing a list), daemon (run, check, export)
    section: str = ""  # where systemd/nilmd.env lists it (nilmd.settingsdoc.SECTIONS)
    note: str | None = None  # its comment in systemd/nilmd.env; None: the help; "": shares the one above
    example: str = ""  # the value nilmd.env shows when the default is computed
    dynamic: Callable[[], object] | None = None
    default_doc: str = ""  # how the settings table describes a computed default
    per_mode: tuple[tuple[str, object, str], ...] = ()  # (mode, default there, why)
    empty_is_unset: bool = True  # False: a variable set to "" is an error, not the default in disguise

    def default_for(self, mode: str) -> object:
        return next((value for m, value, _ in self.per_mode if m == mode), self.default)


def setting(default, flag: str | None, env: str | tuple[str, ...], help: str, *, type: str | None = None,
            secret: bool = False, **more):
    """A Config field that is also a row of the settings table. `default` is the field's own default
    (what `Config()` gets); with `dynamic`, `resolve` computes the default instead."""
    env = (env,) if isinstance(env, str) else tuple(env)
    row = dict(flag=flag, env=env, help=help, type=type, secret=secret, **more)
    return field(default=default, repr=not secret, metadata={"setting": row})


TEN_YEARS = 10 * 365 * 86400.0


@dataclass(frozen=True)
class Config:
    # Redis connection (every command that talks to Redis).
    redis_host: str = setting("localhost", "--redis-host", "REDIS_HOST", "Redis host", group="redis",
                              section="redis", note="Host and port of the Redis server that carries the meter "
                              "input and the predictions.")
    redis_port: int = setting(6379, "--redis-port", "REDIS_PORT", "Redis port", minimum=1, maximum=65535,
                              group="redis", section="redis", note="")
    redis_db: int = setting(0, "--redis-db", "REDIS_DB", "Redis database number", minimum=0, maximum=1023,
                            group="redis", section="redis", note="Database number (0-1023).")
    redis_cluster: bool = setting(False, "--redis-cluster", "REDIS_CLUSTER", "Redis is a Redis Cluster (REDIS_HOST "
                                  "and REDIS_PORT name one node of it)", group="redis", section="redis",
                                  note='Redis Cluster: "true" when Redis is a cluster; REDIS_HOST and REDIS_PORT name '
                                  "any one of its nodes, the client finds the others (docs/OPERATIONS.md, \"Redis Cluster\"). "
                                  "REDIS_DB must stay 0.")
    redis_username: str = setting("", "--redis-username", "REDIS_USERNAME", "Redis ACL user name", group="redis",
                                  section="redis", note="ACL user name (Redis 6+); empty: the default user.")
    # No --redis-password flag on purpose: a flag shows in `ps`. Use the file or the variable.
    redis_password: str = setting(
        "", None, "REDIS_PASSWORD", "Redis password (prefer the file)", secret=True, group="redis", section="redis",
        note="The password: put it in /etc/nilmd/redis-password (root:nilmd, mode 0640, the password alone on "
        "one line). The unit hands that file to the service as a systemd credential "
        "($CREDENTIALS_DIRECTORY/redis-password), which nilmd reads by default; nothing to set here. Last "
        "resort, discouraged: the password itself here, visible to anything that can read this file or the "
        "service's environment.")
    redis_password_file: str = setting(
        "", "--redis-password-file", "REDIS_PASSWORD_FILE", "file holding the Redis password (default: "
        "$CREDENTIALS_DIRECTORY/redis-password when systemd passes one)", type="path", group="redis",
        section="redis", note="Another file holding the password (readable by the nilmd user).")
    redis_tls: bool = setting(False, "--redis-tls", "REDIS_TLS", "connect to Redis over TLS", group="redis",
                              section="redis", note='TLS (rediss://): "true" to connect over TLS, with the CA that '
                              "signed the server certificate and, for mutual TLS, a client certificate and key. "
                              "Put the files under /etc/nilmd (readable by nilmd).")
    redis_tls_ca: str = setting("", "--redis-tls-ca", "REDIS_TLS_CA", "CA bundle that signs the Redis server "
                                "certificate", type="path", group="redis", section="redis", note="")
    redis_tls_cert: str = setting("", "--redis-tls-cert", "REDIS_TLS_CERT", "client certificate for TLS",
                                  type="path", group="redis", section="redis", note="")
    redis_tls_key: str = setting("", "--redis-tls-key", "REDIS_TLS_KEY", "client key for TLS", type="path",
                                 group="redis", section="redis", note="")
    building_id: str = setting(
        "building_1", "--building-id", "BUILDING_ID", "building id in the Redis key names", group="common",
        section="building", note="Building id in the Redis names: input nilm:<id>:input, output "
        "nilm:<id>:predictions, nilm:<id>:latest, status hash nilm:<id>:status. 1-64 of letters, digits, "
        '"_", "-", ".".', empty_is_unset=False)
    building_ids: str = setting(
        "", "--building-ids", "BUILDING_IDS", "serve many buildings: ids separated by commas, or @FILE (one id a "
        "line; reloaded on SIGHUP)", group="list", section="building", note="Many buildings in one daemon "
        "(docs/OPERATIONS.md, \"Many buildings\"): ids separated by commas, or @/etc/nilmd/buildings.list with one id a line "
        "(# comments and blank lines allowed; re-read on systemctl reload). Instead of BUILDING_ID, never with it.")
    # Several instances sharing one list (nilmd.daemon.sharing; docs/OPERATIONS.md, "Past one box").
    shard: str = setting(
        "", "--shard", "NILMD_SHARD", "K/N: serve only shard K of N of the list (by a stable hash of each id)",
        group="fleet", section="building", example="2/3", note="Static shards: K/N (1 <= K <= N) serves only the "
        "buildings of the list whose stable hash falls in shard K of N; every instance gets the same list and its "
        "own K. Empty: the whole list.")
    leases: bool = setting(
        False, "--leases", "NILMD_LEASES", "share the list with the other instances by leases in Redis "
        "(nilm:<id>:lease): an instance that dies is taken over", group="fleet", section="building",
        note='"true": every instance gets the whole list and serves the buildings whose lease it holds; when one '
        "dies, the others take its buildings within NILMD_LEASE_PERIOD (docs/OPERATIONS.md, \"Past one box\").")
    lease_period: float = setting(
        15.0, "--lease-period", "NILMD_LEASE_PERIOD", "seconds a lease lasts unless renewed (renewed every third)",
        minimum=1.0, maximum=3600.0, group="fleet", section="building",
        note="How long a lease lasts unless renewed (every third of it): the longest a dead instance's buildings "
        "wait for another.")
    instance_name: str = setting(
        "", "--instance-name", "NILMD_INSTANCE", "this instance's name among those sharing a list (default: "
        "the host name)", group="fleet", section="building", note="This instance's name among those sharing "
        "the list by leases; keep it across restarts, so its buildings come back to it. Default: the host name "
        "(two instances on one host need their own).")
    log_level: str = setting("info", "--log-level", ("LOG_LEVEL", "NILMD_LOG_LEVEL"), "log level",
                             choices=("debug", "info", "warning", "error"), group="common", section="building",
                             note="debug, info, warning or error. info logs no line per sample.")
    # The daemon.
    mode: str = setting(
        "subscriber", "--mode", "NILMD_MODE",
        "subscriber: read the meter from Redis; test: simulated building, no Redis, predictions on stdout",
        choices=("subscriber", "test"), section="models", note="subscriber: read the meter from Redis. test: a "
        "simulated building, no Redis, predictions on stdout (for trying a box out; not for the service).")
    model_dir: str = setting(
        "./checkpoints", "--model-dir", "MODEL_DIR", "folder of the checkpoints", type="path",
        dynamic=_default_model_dir, default_doc="`./checkpoints` if it exists, else the packaged "
        "checkpoints", example="/var/lib/nilmd/checkpoints", section="models",
        note="Folder of the 11 checkpoints (wavenilm_v3_SOTA_<Appliance>_best.pth). The unit sets this to "
        "/var/lib/nilmd/checkpoints, where the installer puts them.")
    window_size: int = setting(1536, "--window-size", "WINDOW_SIZE", "samples (seconds) per model window",
                               minimum=64, maximum=86400, section="models",
                               note="Samples (seconds at 1 Hz) per model window, 64-86400.")
    inference_interval: int = setting(
        60, "--inference-interval", "INFERENCE_INTERVAL", "seconds of new data between inferences", minimum=1,
        maximum=86400, section="models",
        note="Seconds of new data between two inferences (1 = every second), at most WINDOW_SIZE.")
    device: str = setting(
        "auto", "--device", ("NILMD_DEVICE", "DEVICE"), "where the models run", choices=("auto", "cpu", "cuda"),
        section="models", note="auto (CUDA when a GPU is usable, else CPU), cpu or cuda. A GPU box also needs the "
        "drop-in systemd/gpu.conf (device access) and a CUDA build of torch.")
    backend: str = setting(
        "auto", "--backend", "NILMD_BACKEND", "what runs the models: torch, or ONNX Runtime on the files of "
        "`nilmd export`", choices=("auto", "torch", "onnxruntime"), section="models",
        note="auto (torch on a GPU box; else ONNX Runtime when it is installed and MODEL_DIR's ONNX export matches "
        "the checkpoints; else torch), torch or onnxruntime. One that cannot serve falls back to torch with a "
        "warning, or stops the daemon (exit 78) where torch is not installed. docs/OPERATIONS.md, \"Backends\".")
    threads: int = setting(
        0, "--threads", "NILMD_THREADS", "inference threads (0: torch, the cores this process may use; "
        "ONNX Runtime, 1)",
        minimum=0, maximum=256, section="models", note="Inference threads; 0: for torch the cores this process "
        "may use, for ONNX Runtime 1 (a 2-core box keeps a core for the reader). Set it to match a CPUQuota= "
        "drop-in: a quota does not change the core count torch sees.")
    input_mode: str = setting(
        "pubsub", "--input-mode", "NILMD_INPUT_MODE", "pubsub: SUBSCRIBE the input channel (at-most-once); "
        "stream: read the input stream nilm:{b}:input:stream from where the last run stopped (at-least-once, "
        "nothing lost while down)", choices=("pubsub", "stream"), section="models",
        note="How the meter input is read. pubsub: SUBSCRIBE the channel nilm:<id>:input (at-most-once: what is "
        "published while nilmd is down or restarting is lost). stream: read the Redis stream "
        "nilm:<id>:input:stream from where the last run stopped (at-least-once: nothing lost while down).")
    flood_cooloff: float = setting(
        60.0, "--flood-cooloff", "NILMD_FLOOD_COOLOFF", "pub/sub with several buildings: seconds a flooding "
        "building's channel stays unsubscribed before it is subscribed again", minimum=1.0, maximum=86400.0,
        section="models", note="Pub/sub with several buildings: a channel that sends more than 2000 messages in "
        "one second (a meter sends one) is unsubscribed so its flood cannot cut the others' shared subscription, "
        "and subscribed again after this many seconds (docs/FAULTS.md).")
    ring_capacity: int = setting(
        86400, "--ring-capacity", "NILMD_RING_CAPACITY", "samples kept in the shared-memory ring (at least 2x the "
        "window)", minimum=128, maximum=10_000_000, section="buffering", note="Samples kept in the shared-memory "
        "ring, at least twice WINDOW_SIZE (86400 = one day, 4.8 MB: each sample is kept twice). With "
        "BUILDING_IDS each building has a ring: 2 x WINDOW_SIZE (3072, 174 kB) is what the inference needs.")
    runtime_dir: str = setting(
        "/dev/shm", "--runtime-dir", "NILMD_RUNTIME_DIR", "where the shared memory files live (tmpfs)",
        type="path", dynamic=_default_runtime_dir, default_doc="`$RUNTIME_DIRECTORY`, else `/dev/shm`",
        section="files", note="Shared memory (the ring, nilmd-<building>.ring/.ctl/.lock). Default: "
        "$RUNTIME_DIRECTORY (/run/nilmd, emptied by systemd on every stop), else /dev/shm.")
    state_dir: str = setting(
        "./state", "--state-dir", "NILMD_STATE_DIR", "where ring snapshots and the input history are kept",
        type="path", dynamic=_default_state_dir, default_doc="`$STATE_DIRECTORY`, else `./state`",
        section="files", note="Ring snapshots and the input history (history/<id>/). Default: $STATE_DIRECTORY "
        "(/var/lib/nilmd), else ./state.")
    heartbeat_timeout: float = setting(
        30.0, "--heartbeat-timeout", "NILMD_HEARTBEAT_TIMEOUT", "seconds without a heartbeat before a child "
        "counts as hung", minimum=1.0, maximum=3600.0, section="supervision", note="Seconds without a heartbeat "
        "before the supervisor kills and restarts a hung child. Keep it well below half of WatchdogSec= of the "
        "unit (90 s), so the supervisor recovers a hung child before systemd restarts everything.")
    status_interval: float = setting(2.0, "--status-interval", "NILMD_STATUS_INTERVAL", "seconds between status "
                                     "hash refreshes", minimum=0.2, maximum=300.0, section="supervision",
                                     note="Seconds between refreshes of the status hash in Redis.")
    input_timeout: float = setting(
        0.0, "--input-timeout", "NILMD_INPUT_TIMEOUT", "seconds without an accepted sample (or, with the window "
        "full, without a prediction) before the state is degraded; 0: twice --inference-interval", minimum=0.0,
        maximum=86400.0, section="supervision", note="Seconds without an accepted sample (a silent meter, or "
        "every sample rejected), or with the window full but no prediction, before the state becomes degraded "
        "(nilmd status exits 1, the reason in degraded_reason); 0: twice INFERENCE_INTERVAL.")
    max_gap_fill: int = setting(
        60, "--max-gap-fill", "NILMD_MAX_GAP_FILL", "longest gap (s) filled by holding the last sample; a "
        "longer gap breaks the window", minimum=0, maximum=3600, section="buffering",
        note="Longest gap (s) filled by holding the last sample; a longer gap breaks the window.")
    max_clock_skew: float = setting(
        300.0, "--max-clock-skew", "NILMD_MAX_CLOCK_SKEW", "samples stamped more than this many seconds ahead "
        "of the box's clock are rejected", minimum=1.0, maximum=TEN_YEARS, section="buffering",
        per_mode=(("test", TEN_YEARS, "simulated time runs ahead of the wall clock"),),
        note="Samples stamped more than this many seconds ahead of the box's clock are rejected.")
    # What the predictions add up to (nilmd.daemon.ledger, docs/CONTRACT.md §3.6, §3.7).
    timezone: str = setting(
        "UTC", "--timezone", "NILMD_TIMEZONE", "IANA time zone of the days in the energy hash and the report",
        dynamic=days.box_timezone, default_doc="the box's (`$TZ`, else `/etc/localtime`)",
        example="Europe/Berlin", group="common", section="energy", note="IANA time zone whose local midnight "
        "starts a new day (today_wh) and month (month_wh) in nilm:<id>:energy, and the days of nilmd report. "
        "Default: the box's ($TZ, else /etc/localtime).")
    predictions_history: int = setting(
        86400, "--predictions-history", "NILMD_PREDICTIONS_HISTORY", "seconds of predictions kept in the stream "
        "nilm:{b}:predictions:stream (0: none)", minimum=0, maximum=366 * 86400, section="energy",
        note="Seconds of predictions kept in the stream nilm:<id>:predictions:stream (what nilmd report and "
        "dashboards read; about 1.5 kB each with 11 models), as MAXLEN ~ this / INFERENCE_INTERVAL. 0: no stream.")
    history_days: int = setting(
        14, "--history-days", "NILMD_HISTORY_DAYS", "days of each building's accepted input kept in the state "
        "directory (0: none)", minimum=0, maximum=366, section="energy",
        note="Days of each building's accepted 1 Hz input (power_total and the optional fields) kept under "
        "NILMD_STATE_DIR/history/<id>/, one file a UTC day (docs/CONTRACT.md, \"Input history\"): what labels are "
        "paired with to adapt the models to the house. Older days are deleted. 0: nothing is kept.")
    event_on_intervals: int = setting(
        2, "--event-on-intervals", "NILMD_EVENT_ON_INTERVALS", "consecutive predictions with is_on that start a "
        "run (its start event)", minimum=1, maximum=1440, section="energy",
        note="Hysteresis of the events on nilm:<id>:events: a run starts after this many consecutive predictions "
        "with is_on, or at once when the probability reaches NILMD_EVENT_ON_PROBABILITY; it ends after "
        "NILMD_EVENT_OFF_INTERVALS consecutive predictions without.")
    event_on_probability: float = setting(
        0.9, "--event-on-probability", "NILMD_EVENT_ON_PROBABILITY", "a probability at least this starts a run "
        "at once", minimum=0.0, maximum=1.0, section="energy", note="")
    event_off_intervals: int = setting(
        3, "--event-off-intervals", "NILMD_EVENT_OFF_INTERVALS", "consecutive predictions without is_on that end "
        "a run (its end event)", minimum=1, maximum=1440, section="energy", note="")
    # Exporters (nilmd.daemon.metrics, nilmd.daemon.mqtt): off unless asked for.
    metrics_port: int = setting(0, "--metrics-port", "NILMD_METRICS_PORT", "serve Prometheus /metrics on this "
                                "port (0: off; needs the metrics extra)", minimum=0, maximum=65535,
                                section="exporters", note="Serve Prometheus /metrics on this port from the "
                                "supervisor (0: off). Needs pip install 'nilmd[metrics]'.")
    metrics_host: str = setting("127.0.0.1", "--metrics-host", "NILMD_METRICS_HOST", "address /metrics listens on",
                                section="exporters", note="Address /metrics listens on; 0.0.0.0 for every "
                                "interface (then firewall it: the metrics need no password).")
    mqtt_url: str = setting(
        "", "--mqtt-url", "NILMD_MQTT_URL", "publish to Home Assistant over MQTT: mqtt://user@host:port or mqtts:// "
        "(TLS); empty: off", section="exporters", note="Home Assistant over MQTT: mqtt://user@host:1883, or "
        "mqtts://user@host:8883 for TLS; empty: off. Needs pip install 'nilmd[mqtt]'. The password never goes "
        "in the URL: see the file below.")
    mqtt_password: str = setting(
        "", None, "NILMD_MQTT_PASSWORD", "MQTT password (prefer the file)", secret=True, section="exporters",
        note="The broker password, as for Redis: /etc/nilmd/mqtt-password, which the unit can pass as the "
        "credential $CREDENTIALS_DIRECTORY/mqtt-password (read by default); last resort: the password here.")
    mqtt_password_file: str = setting(
        "", "--mqtt-password-file", "NILMD_MQTT_PASSWORD_FILE", "file holding the MQTT password (default: "
        "$CREDENTIALS_DIRECTORY/mqtt-password when systemd passes one)", type="path", section="exporters",
        note="Another file holding the broker password (readable by the nilmd user).")
    mqtt_tls_ca: str = setting("", "--mqtt-tls-ca", "NILMD_MQTT_TLS_CA", "CA bundle that signs the broker "
                               "certificate (mqtts://; default: the system's)", type="path", section="exporters",
                               note="mqtts://: the CA that signed the broker certificate (default: the system's) "
                               "and, for mutual TLS, a client certificate and key.")
    mqtt_tls_cert: str = setting("", "--mqtt-tls-cert", "NILMD_MQTT_TLS_CERT", "client certificate for MQTT TLS",
                                 type="path", section="exporters", note="")
    mqtt_tls_key: str = setting("", "--mqtt-tls-key", "NILMD_MQTT_TLS_KEY", "client key for MQTT TLS", type="path",
                                section="exporters", note="")
    mqtt_discovery_prefix: str = setting(
        "homeassistant", "--mqtt-discovery-prefix", "NILMD_MQTT_DISCOVERY_PREFIX", "Home Assistant's MQTT "
        "discovery prefix", section="exporters", note="Home Assistant's discovery prefix (its default).")
    speed: float = setting(60.0, "--speed", "NILMD_TEST_SPEED", "test mode: simulated seconds per real second "
                           "after the first window", minimum=0.01, maximum=1e6, section="test",
                           note="Simulated seconds per real second after the first window, and the simulated "
                           "building's seed.")
    seed: int = setting(1, "--seed", "NILMD_TEST_SEED", "test mode: simulated building seed", minimum=0,
                        maximum=2**31 - 1, section="test", note="")

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def public(self) -> dict:
        """Every setting, secrets masked: safe for logs and `nilmd check`."""
        out = {}
        for s in SETTINGS:
            value = getattr(self, s.name)
            out[s.name] = ("***" if value else "") if s.secret else value
        return out


def _row(f: dataclasses.Field) -> Setting:
    row = dict(f.metadata["setting"])
    kind = row.pop("type") or ("choice" if row.get("choices") else f.type)
    default = None if row.get("dynamic") else f.default
    return Setting(name=f.name, type=kind, default=default, **row)


SETTINGS: tuple[Setting, ...] = tuple(_row(f) for f in dataclasses.fields(Config))
_BY_NAME = {s.name: s for s in SETTINGS}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
def metavar(s: Setting) -> str:
    """What --help shows for a setting's value: its choices, else the flag's last word
    (--redis-port PORT, --model-dir DIR, --input-timeout TIMEOUT)."""
    return "{" + ",".join(s.choices) + "}" if s.choices else s.flag.rsplit("-", 1)[-1].upper()


def default_text(s: Setting) -> str:
    """The default as --help says it: the value, or how it is computed (`default_doc`)."""
    default = s.default_doc.replace("`", "") if s.default is None else str(s.default)
    return ", ".join([default] + [f"{v} with --mode {m}" for m, v, _ in s.per_mode])


def add_arguments(parser, groups: tuple[str, ...], sections: dict[str, str]) -> None:
    """Add the flags of the settings in `groups` to an argparse parser (defaults stay None, so
    that resolve() can tell "not given" from "given"), in one argument group per section
    (`sections`: key -> title, nilmd.settingsdoc.SECTIONS), in that order."""
    titled = {}
    rows = [s for s in SETTINGS if s.group in groups and s.flag is not None]
    rows.sort(key=lambda s: list(sections).index(s.section) if s.section in sections else len(sections))
    for s in rows:
        if s.section not in titled:
            titled[s.section] = parser.add_argument_group(sections.get(s.section, s.section))
        where = titled[s.section]
        env = " or ".join("$" + e for e in s.env)
        help_text = f"{s.help} [{env}; default {default_text(s)}]" if env else f"{s.help} [default {default_text(s)}]"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if s.type == "bool":
            where.add_argument(s.flag, dest=s.name, action="store_const", const="true", default=None, help=help_text)
        else:
            where.add_argument(s.flag, dest=s.name, metavar=metavar(s), default=None, help=help_text)


def _convert(s: Setting, raw: object, where: str):
    """`where` names what the user wrote: the flag, or the environment variable."""
    text = str(raw).strip()
    try:
        if s.type == "int":
            value = int(text)
        elif s.type == "float":
            value = float(text)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError
        elif s.type == "bool":
            low = text.lower()
            if low not in _TRUE | _FALSE:
                raise ValueError
            return low in _TRUE
        elif s.type == "choice":
            value = text.lower()
            if value not in s.choices:
                raise ConfigError(f"{where}: {text!r} is not one of {', '.join(s.choices)}")
            return value
        else:
            return text
    except ValueError:
        shown = "(hidden)" if s.secret else repr(text)
        raise ConfigError(f"{where}: {shown} is not a valid {s.type}") from None
    if s.minimum is not None and value < s.minimum or s.maximum is not None and value > s.maximum:
        raise ConfigError(f"{where}: {value} is outside {s.minimum:g}..{s.maximum:g}")
    return value


def resolve(args=None, environ=None, names=None) -> Config:
    """Build a Config from parsed flags (an argparse Namespace or None) and the environment."""
    environ = os.environ if environ is None else environ
    values = {}
    for s in SETTINGS:
        if names is not None and s.name not in names:
            continue
        raw, origin = None, None
        if args is not None and getattr(args, s.name, None) is not None:
            raw, origin = getattr(args, s.name), s.flag
        else:
            for env in s.env:
                if env in environ and environ[env] != "":
                    raw, origin = environ[env], f"${env}"
                    break
                if env in environ and not s.empty_is_unset:
                    raise ConfigError(f"${env} is set but empty: give it a value, or unset it for the default "
                                      f"({s.default})")
        if raw is not None:
            values[s.name] = _convert(s, raw, origin)
    mode = values.get("mode", _BY_NAME["mode"].default)
    for s in SETTINGS:  # defaults that depend on the box or the mode, for what the user left unset
        if s.name not in values and (s.dynamic or s.per_mode):
            values[s.name] = s.dynamic() if s.dynamic else s.default_for(mode)
    if names is None and values.get("building_ids") and "building_id" in values:
        raise ConfigError("--building-id and --building-ids (or $BUILDING_ID and $BUILDING_IDS) are both set: give "
                          "one building with the first or a list with the second")
    cfg = Config(**values)
    return _check(cfg, environ)


def _read_password(cfg: Config, environ, service: str) -> Config:
    """{service}_password from its file: the setting, else the systemd credential {service}-password."""
    password_file = getattr(cfg, f"{service}_password_file")
    if not password_file and not getattr(cfg, f"{service}_password") and environ.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(environ["CREDENTIALS_DIRECTORY"]) / f"{service}-password"
        password_file = str(candidate) if candidate.is_file() else ""
    if not password_file:
        return cfg
    try:
        password = Path(password_file).read_text().strip()
    except OSError as e:
        raise ConfigError(f"--{service}-password-file: cannot read {password_file}: {e.strerror}") from None
    return cfg.replace(**{f"{service}_password": password, f"{service}_password_file": password_file})


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken installation counts as none
        return False


def mqtt_endpoint(url: str) -> tuple[bool, str, str, int]:
    """(tls, user, host, port) of --mqtt-url; a ConfigError says what is wrong with it."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"--mqtt-url: {url!r} has an invalid port") from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"--mqtt-url: {url!r} is not mqtt://[user@]host[:port] or mqtts://[user@]host[:port]")
    if parts.password is not None:  # a URL shows in `ps` and in logs
        raise ConfigError("--mqtt-url: put the password in --mqtt-password-file (or $NILMD_MQTT_PASSWORD), not the URL")
    tls = parts.scheme == "mqtts"
    return tls, urllib.parse.unquote(parts.username or ""), parts.hostname, port or (8883 if tls else 1883)


def _check(cfg: Config, environ) -> Config:
    if not is_building_id(cfg.building_id):
        raise ConfigError(f"--building-id: {cfg.building_id!r} must be {ID_RULE}")
    if cfg.building_ids:
        listed(cfg)  # a bad list: one line now (the supervisor reads it again on SIGHUP)
        if cfg.mode == "test":
            raise ConfigError("--building-ids: --mode test simulates one building; give --building-id")
        if cfg.mqtt_url:
            raise ConfigError("--building-ids: the MQTT publisher serves one building (--mqtt-url); run it with "
                              "--building-id, or one nilmd@.service instance per building")
    if cfg.shard:
        try:
            parse_shard(cfg.shard)
        except ValueError as e:
            raise ConfigError(f"--shard: {e}") from None
    for name, on in (("--shard", cfg.shard), ("--leases", cfg.leases)):
        if on and not cfg.building_ids:
            raise ConfigError(f"{name}: instances share a list: give it with --building-ids (or $BUILDING_IDS)")
    if cfg.leases and cfg.mode == "test":
        raise ConfigError("--leases: --mode test has no Redis to hold the leases in")
    if cfg.ring_capacity < 2 * cfg.window_size:
        raise ConfigError(
            f"--ring-capacity: {cfg.ring_capacity} must be at least twice --window-size ({cfg.window_size})")
    if cfg.inference_interval > cfg.window_size:
        raise ConfigError(
            f"--inference-interval: {cfg.inference_interval} s is longer than the window ({cfg.window_size} samples)")
    if cfg.redis_cluster and cfg.redis_db:
        raise ConfigError(f"--redis-db: {cfg.redis_db}: a Redis Cluster has only database 0 (--redis-cluster)")
    days.zone(cfg.timezone)  # a zone this box does not know: one line now, not in the inference later
    cfg = _read_password(cfg, environ, "redis")
    cfg = _read_password(cfg, environ, "mqtt")
    for name in ("redis_tls_ca", "redis_tls_cert", "redis_tls_key", "mqtt_tls_ca", "mqtt_tls_cert", "mqtt_tls_key"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"{_BY_NAME[name].flag}: {path} is not a readable file")
    if cfg.mqtt_url:
        mqtt_endpoint(cfg.mqtt_url)
        if cfg.mode == "test":
            raise ConfigError("--mqtt-url: the MQTT process reads the predictions from Redis, and --mode test "
                              "has none (it prints them)")
    # An exporter asked for without its extra: one line now, not a traceback in a child later.
    for on, module, package, flag, extra in (
            (cfg.metrics_port, "prometheus_client", "prometheus-client", "--metrics-port", "metrics"),
            (cfg.mqtt_url, "paho", "paho-mqtt", "--mqtt-url", "mqtt")):
        if on and not _installed(module):
            raise ConfigError(f"{flag} needs the Python package {package}, which is not installed: "
                              f"pip install 'nilmd[{extra}]'")
    return cfg
