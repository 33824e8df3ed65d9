"""Settings: command line over environment over defaults (SPEC §3).

One table, SETTINGS, names every setting once: its flag, its environment variables (the
original service's names first), its type and default. The CLI builds its flags from it and
`resolve` turns flags + environment into a validated, picklable `Config` that is passed to the
child processes as is.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

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
    default: object
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False
    group: str = "daemon"  # which commands take it: common, redis, daemon


SETTINGS: tuple[Setting, ...] = (
    # Redis connection (every command that talks to Redis).
    Setting("redis_host", "--redis-host", ("REDIS_HOST",), "str", "localhost", "Redis host", group="redis"),
    Setting("redis_port", "--redis-port", ("REDIS_PORT",), "int", 6379, "Redis port", minimum=1, maximum=65535, group="redis"),
    Setting("redis_db", "--redis-db", ("REDIS_DB",), "int", 0, "Redis database number", minimum=0, maximum=1023, group="redis"),
    Setting("redis_username", "--redis-username", ("REDIS_USERNAME",), "str", "", "Redis ACL user name", group="redis"),
    # No --redis-password flag on purpose: a flag shows in `ps`. Use the file or the variable.
    Setting("redis_password", None, ("REDIS_PASSWORD",), "str", "", "Redis password (prefer the file)", secret=True, group="redis"),
    Setting("redis_password_file", "--redis-password-file", ("REDIS_PASSWORD_FILE",), "path", "",
            "file holding the Redis password (default: $CREDENTIALS_DIRECTORY/redis-password when systemd passes one)", group="redis"),
    Setting("redis_tls", "--redis-tls", ("REDIS_TLS",), "bool", False, "connect to Redis over TLS", group="redis"),
    Setting("redis_tls_ca", "--redis-tls-ca", ("REDIS_TLS_CA",), "path", "", "CA bundle that signs the Redis server certificate", group="redis"),
    Setting("redis_tls_cert", "--redis-tls-cert", ("REDIS_TLS_CERT",), "path", "", "client certificate for TLS", group="redis"),
    Setting("redis_tls_key", "--redis-tls-key", ("REDIS_TLS_KEY",), "path", "", "client key for TLS", group="redis"),
    Setting("building_id", "--building-id", ("BUILDING_ID",), "str", "building_1", "building id in the Redis key names", group="common"),
    Setting("log_level", "--log-level", ("LOG_LEVEL", "NILMD_LOG_LEVEL"), "choice", "info", "log level",
            choices=("debug", "info", "warning", "error"), group="common"),
    # The daemon.
    Setting("mode", "--mode", ("NILMD_MODE",), "choice", "subscriber",
            "subscriber: read the meter from Redis; test: simulated building, no Redis, predictions on stdout",
            choices=("subscriber", "test")),
    Setting("model_dir", "--model-dir", ("MODEL_DIR",), "path", None, "folder of the checkpoints"),
    Setting("window_size", "--window-size", ("WINDOW_SIZE",), "int", 1536, "samples (seconds) per model window", minimum=64, maximum=86400),
    Setting("inference_interval", "--inference-interval", ("INFERENCE_INTERVAL",), "int", 60,
            "seconds of new data between inferences", minimum=1, maximum=86400),
    Setting("device", "--device", ("NILMD_DEVICE", "DEVICE"), "choice", "auto", "where the models run", choices=("auto", "cpu", "cuda")),
    Setting("threads", "--threads", ("NILMD_THREADS",), "int", 0, "torch threads for inference (0: the cores this process may use)",
            minimum=0, maximum=256),
    Setting("input_mode", "--input-mode", ("NILMD_INPUT_MODE",), "choice", "pubsub",
            "pubsub: SUBSCRIBE the input channel (at-most-once); stream: read the input stream "
            "nilm:{b}:input:stream from where the last run stopped (at-least-once, nothing lost while down)",
            choices=("pubsub", "stream")),
    Setting("ring_capacity", "--ring-capacity", ("NILMD_RING_CAPACITY",), "int", 86400,
            "samples kept in the shared-memory ring (at least 2x the window)", minimum=128, maximum=10_000_000),
    Setting("runtime_dir", "--runtime-dir", ("NILMD_RUNTIME_DIR",), "path", None, "where the shared memory files live (tmpfs)"),
    Setting("state_dir", "--state-dir", ("NILMD_STATE_DIR",), "path", None, "where ring snapshots are kept across restarts"),
    Setting("heartbeat_timeout", "--heartbeat-timeout", ("NILMD_HEARTBEAT_TIMEOUT",), "float", 30.0,
            "seconds without a heartbeat before a child counts as hung", minimum=1.0, maximum=3600.0),
    Setting("status_interval", "--status-interval", ("NILMD_STATUS_INTERVAL",), "float", 2.0,
            "seconds between status hash refreshes", minimum=0.2, maximum=300.0),
    Setting("max_gap_fill", "--max-gap-fill", ("NILMD_MAX_GAP_FILL",), "int", 60,
            "longest gap (s) filled by holding the last sample; a longer gap breaks the window", minimum=0, maximum=3600),
    Setting("max_clock_skew", "--max-clock-skew", ("NILMD_MAX_CLOCK_SKEW",), "float", 300.0,
            "samples stamped more than this many seconds ahead of the box's clock are rejected", minimum=1.0, maximum=10 * 365 * 86400.0),
    Setting("speed", "--speed", ("NILMD_TEST_SPEED",), "float", 60.0,
            "test mode: simulated seconds per real second after the first window", minimum=0.01, maximum=1e6),
    Setting("seed", "--seed", ("NILMD_TEST_SEED",), "int", 1, "test mode: simulated building seed", minimum=0, maximum=2**31 - 1),
)

_BY_NAME = {s.name: s for s in SETTINGS}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_BUILDING_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Config:
    redis_host: str = "localhost"
    redis_port: int = 6379
    redis_db: int = 0
    redis_username: str = ""
    redis_password: str = field(default="", repr=False)
    redis_password_file: str = ""
    redis_tls: bool = False
    redis_tls_ca: str = ""
    redis_tls_cert: str = ""
    redis_tls_key: str = ""
    building_id: str = "building_1"
    log_level: str = "info"
    mode: str = "subscriber"
    model_dir: str = "./checkpoints"
    window_size: int = 1536
    inference_interval: int = 60
    device: str = "auto"
    threads: int = 0
    input_mode: str = "pubsub"
    ring_capacity: int = 86400
    runtime_dir: str = "/dev/shm"
    state_dir: str = "./state"
    heartbeat_timeout: float = 30.0
    status_interval: float = 2.0
    max_gap_fill: int = 60
    max_clock_skew: float = 300.0
    speed: float = 60.0
    seed: int = 1

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def public(self) -> dict:
        """Every setting, secrets masked: safe for logs and `nilmd check`."""
        out = {}
        for s in SETTINGS:
            value = getattr(self, s.name)
            out[s.name] = ("***" if value else "") if s.secret else value
        return out


def add_arguments(parser, groups: tuple[str, ...]) -> None:
    """Add the flags of the settings in `groups` to an argparse parser (defaults stay None, so
    that resolve() can tell "not given" from "given")."""
    for s in SETTINGS:
        if s.group not in groups or s.flag is None:
            continue
        metavar = "|".join(s.choices) if s.choices else s.type.upper()
        env = " or ".join("$" + e for e in s.env)
        default = "see README" if s.default is None else s.default
        help_text = f"{s.help} [{env}; default {default}]" if env else f"{s.help} [default {default}]"
        if s.type == "bool":
            parser.add_argument(s.flag, dest=s.name, action="store_const", const="true", default=None, help=help_text)
        else:
            parser.add_argument(s.flag, dest=s.name, metavar=metavar, default=None, help=help_text)


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
        if raw is not None:
            values[s.name] = _convert(s, raw, origin)
    values.setdefault("model_dir", _default_model_dir())
    values.setdefault("runtime_dir", _default_runtime_dir())
    values.setdefault("state_dir", _default_state_dir())
    cfg = Config(**values)
    return _check(cfg, environ)


def _check(cfg: Config, environ) -> Config:
    if not _BUILDING_RE.match(cfg.building_id):
        raise ConfigError(f"--building-id: {cfg.building_id!r} must be 1-64 letters, digits, '_', '-' or '.'")
    if cfg.ring_capacity < 2 * cfg.window_size:
        raise ConfigError(
            f"--ring-capacity: {cfg.ring_capacity} must be at least twice --window-size ({cfg.window_size})")
    if cfg.inference_interval > cfg.window_size:
        raise ConfigError(
            f"--inference-interval: {cfg.inference_interval} s is longer than the window ({cfg.window_size} samples)")
    password_file = cfg.redis_password_file
    if not password_file and not cfg.redis_password and environ.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(environ["CREDENTIALS_DIRECTORY"]) / "redis-password"
        password_file = str(candidate) if candidate.is_file() else ""
    if password_file:
        try:
            password = Path(password_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"--redis-password-file: cannot read {password_file}: {e.strerror}") from None
        cfg = cfg.replace(redis_password=password, redis_password_file=password_file)
    for name in ("redis_tls_ca", "redis_tls_cert", "redis_tls_key"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"{_BY_NAME[name].flag}: {path} is not a readable file")
    return cfg
