"""Errors that end in one clear line, and the exit codes that say what happened."""

import re

# Exit codes of `nilmd run` (and of the child processes, which the supervisor reads).
EXIT_OK = 0
EXIT_ERROR = 1  # unexpected failure
EXIT_USAGE = 2  # bad command line or configuration (argparse uses 2 too)
EXIT_CHILD_FAILING = 3  # a child kept crashing or hanging: let systemd's Restart= take over
EXIT_ALREADY_RUNNING = 4  # another nilmd owns this building's shared memory
EXIT_BOOT_ERROR = 78  # EX_CONFIG: a child cannot start at all (no usable checkpoint, ...)


class NilmdError(Exception):
    """An error whose message is the whole story: printed as one line, no traceback."""


class ConfigError(NilmdError):
    pass


class LabelError(NilmdError):
    """A building's labels that cannot be used (nilmd.labels): the line says what and where."""


class CheckpointError(NilmdError):
    def __init__(self, path, reason: str):
        super().__init__(f"checkpoint {path}: {reason}")
        self.path = str(path)
        self.reason = reason


_NOPERM_COMMAND = re.compile(r"permissions to run the '([^']+)' command")
_REDIS_REFUSALS = (  # redis-py's class name -> what Redis refused and why, in words
    ("OutOfMemoryError", "OOM", "Redis is out of memory (used memory > maxmemory and nothing to evict): it "
                                "refuses writes until it has room"),
    ("ReadOnlyError", "READONLY", "Redis is a read-only replica: point nilmd at the primary"),
    ("BusyLoadingError", "LOADING", "Redis is loading its data set"),
    ("AuthenticationError", "AUTH", "Redis refused the user name or password"),
)


def redis_error(e: BaseException, script: tuple[str, ...] = ("xrange", "xrevrange")) -> tuple[str, str]:
    """(kind, one line) for anything a Redis call raised: the kind keys a log throttle (one line
    per kind and period), the line says what Redis refused and what to do. By class name, so
    that processes without redis-py imported can use it; never holds the password (redis-py's
    messages do not). `script`: the commands of the script the caller ran, if it ran one."""
    names = {cls.__name__ for cls in type(e).__mro__}
    text = str(e)
    if "NoPermissionError" in names:
        m = _NOPERM_COMMAND.search(text)
        if m:
            cmd = m.group(1)
            return (f"NOPERM {cmd}", f"Redis refuses the command '{cmd}' to this ACL user (NOPERM): "
                    f"add +{cmd} to its ACL rule (docs/OPERATIONS.md, \"Redis ACL\")")
        return "NOPERM names", (f"Redis refuses this ACL user a key or channel (NOPERM: {text}): its rule needs "
                                "~nilm:* and &nilm:* (docs/OPERATIONS.md, \"Redis ACL\")")
    if "can't run this command or subcommand script" in text:
        # Redis does not say which command a script was refused: name every one the script runs
        # (the stream reader's, nilmd.daemon.streams, by default; the ledger's, nilmd.daemon.ledger).
        return "NOPERM script", (f"Redis refuses this ACL user a command of one of nilmd's scripts (NOPERM: "
                                 f"{' or '.join(c.upper() for c in script)}): add "
                                 f"{' '.join('+' + c for c in script)} to its ACL rule (docs/OPERATIONS.md, \"Redis ACL\")")
    for name, kind, line in _REDIS_REFUSALS:
        if name in names:
            return kind, f"{line} ({kind}: {text})"
    # A cluster without a master for a slot (CLUSTERDOWN, failing over) or with no node that
    # answers is away for now, like a lost connection: the caller backs off and tries again.
    if names & {"ConnectionError", "TimeoutError", "OSError", "ClusterDownError", "SlotNotCoveredError"} or (
            "RedisClusterException" in names and "cannot be connected" in text):
        return "unreachable", f"unreachable ({type(e).__name__}: {text})"
    if text.startswith("BUSY"):
        return "BUSY", f"Redis is busy running a script or function ({text})"
    return type(e).__name__, f"Redis refused a command ({type(e).__name__}: {text})"
