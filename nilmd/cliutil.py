"""What every `nilmd` subcommand shares (nilmd.cli, nilmd.cli_house): the one-line error, the Redis
client, the settings of a group, the subcommand with its description."""

from __future__ import annotations

import argparse
import os
import sys

from nilmd import config
from nilmd.errors import EXIT_USAGE


def fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"nilmd: error: {message}", file=sys.stderr)
    return code


def connect(cfg, name: str):
    from nilmd import redisconn

    return redisconn.client(cfg, name=name), redisconn


def names(*groups) -> set[str]:
    return {s.name for s in config.SETTINGS if s.group in groups}


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def command(sub, name: str, help: str, description: str):
    """A subcommand whose --help starts with what it does (`help` is its line in `nilmd --help`)."""
    return sub.add_parser(name, help=help, description=description,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def one_building(args) -> bool:
    """A building was named (--building-id or BUILDING_ID), even where BUILDING_IDS lists many."""
    return args.building_id is not None or bool(os.environ.get("BUILDING_ID"))
