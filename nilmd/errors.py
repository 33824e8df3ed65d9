"""Errors that end in one clear line, and the exit codes that say what happened."""

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


class CheckpointError(NilmdError):
    def __init__(self, path, reason: str):
        super().__init__(f"checkpoint {path}: {reason}")
        self.path = str(path)
        self.reason = reason
