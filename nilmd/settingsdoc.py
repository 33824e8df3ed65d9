"""The settings documentation, rendered from the one table (`nilmd.config.SETTINGS`).

    python -m nilmd.settingsdoc --markdown   # the settings table of docs/CONTRACT.md §5, on stdout
    python -m nilmd.settingsdoc --env-file   # systemd/nilmd.env, on stdout
    python -m nilmd.settingsdoc --write      # rewrite both files in this checkout

tests/test_settings.py fails when either file differs from what this renders, so a setting
cannot be added, renamed or re-defaulted without its documentation following.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from nilmd.config import SETTINGS, Setting

ROOT = Path(__file__).resolve().parent.parent
TABLE_DOC = ROOT / "docs" / "CONTRACT.md"  # §5, where the contract states every setting
ENV_FILE = ROOT / "systemd" / "nilmd.env"
REGENERATE = "python -m nilmd.settingsdoc --write"
TABLE_SECTION = ("<!-- section: settings -->", "<!-- /section: settings -->")

# The headings of systemd/nilmd.env, in order; each setting names its own (Setting.section).
SECTIONS = {
    "redis": "Redis",
    "building": "This building",
    "models": "Models and inference",
    "buffering": "Buffering and input checks",
    "supervision": "Supervision",
    "energy": "Energy, events and history",
    "exporters": "Prometheus and Home Assistant (off by default)",
    "files": "Where files go (set by systemd; change only to run outside the unit)",
    "test": "Test mode only (NILMD_MODE=test)",
}

ENV_HEADER = """\
# /etc/nilmd/nilmd.env: settings of the nilmd service (EnvironmentFile= of nilmd.service).
#
# Installed once by scripts/install.sh (root:nilmd, mode 0640) and never overwritten by an
# upgrade: new settings appear in /opt/nilmd/nilmd.env.example. Every setting is listed here,
# commented out at its default. Uncomment and change what you need, then
#     systemctl restart nilmd
# (a reload, `systemctl reload nilmd`, only re-reads the checkpoints, not this file).
#
# Format: KEY=value, one per line, no spaces around "="; quote a value that has spaces.
# Command-line flags win over these, these win over the defaults; `nilmd check` prints the
# result with secrets masked. Every process of the service can read its environment (and so can
# root via /proc), so keep the Redis password out of this file: see REDIS_PASSWORD below.
"""

WIDTH = 99  # the comments' width; the section headings are one shorter


def env_value(value: object) -> str:
    """A value as the environment spells it: booleans as true/false, whole floats without '.0'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent="# ", subsequent_indent="# ",
                         break_long_words=False, break_on_hyphens=False)


def _env_entry(s: Setting, mode_env: str) -> list[str]:
    note = s.help[:1].upper() + s.help[1:] + "." if s.note is None else s.note
    if len(s.env) > 1:
        note += f" ({', '.join(s.env[1:])} is accepted too.)"
    for mode, value, why in s.per_mode:
        note += f" With {mode_env}={mode} the default is {env_value(value)}: {why}."
    shown = s.example if s.default is None else env_value(s.default)
    return _comment(note) + [f"#{s.env[0]}={shown}"]


def render_env_file(settings: tuple[Setting, ...] = SETTINGS) -> str:
    unplaced = [s.name for s in settings if s.section not in SECTIONS]
    if unplaced:
        raise ValueError(f"settings without a known section (nilmd.settingsdoc.SECTIONS): {unplaced}")
    mode_env = next(s.env[0] for s in settings if s.name == "mode")
    out = [ENV_HEADER]
    for key, title in SECTIONS.items():
        rows = [s for s in settings if s.section == key]
        if rows:
            out.append(f"# --- {title} ".ljust(WIDTH - 1, "-"))
            out.extend(line for s in rows for line in _env_entry(s, mode_env))
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def _md_default(s: Setting) -> str:
    if s.default is None:
        shown = s.default_doc or "(computed)"
    elif isinstance(s.default, bool):
        shown = "on" if s.default else "off"
    elif s.default == "":
        shown = "(empty)"
    else:
        shown = f"`{s.default}`"
    return "; ".join([shown] + [f"`{value}` with `--mode {mode}`" for mode, value, _ in s.per_mode])


def _md_meaning(s: Setting) -> str:
    return s.help + "".join(f" (with `--mode {mode}`: {why})" for mode, _, why in s.per_mode)


def render_markdown(settings: tuple[Setting, ...] = SETTINGS) -> str:
    out = ["| environment | flag | default | meaning |", "|---|---|---|---|"]
    for s in settings:
        env = ", ".join(f"`{e}`" for e in s.env)
        flag = f"`{s.flag}`" if s.flag else ("(none: it would show in `ps`)" if s.secret else "(none)")
        out.append(f"| {env} | {flag} | {_md_default(s)} | {_md_meaning(s)} |")
    return "\n".join(out) + "\n"


def table_span(doc: str) -> tuple[int, int]:
    """Where the table sits in the document's settings section: [start, end) character offsets."""
    begin = doc.index(TABLE_SECTION[0])
    stop = doc.index(TABLE_SECTION[1], begin)
    start = doc.index("\n| ", begin, stop) + 1
    end = start
    while end < stop and doc.startswith("|", end):
        end = doc.index("\n", end) + 1
    return start, end


def write(doc_path: Path = TABLE_DOC, env_path: Path = ENV_FILE) -> None:
    doc = doc_path.read_text()
    start, end = table_span(doc)
    doc_path.write_text(doc[:start] + render_markdown() + doc[end:])
    env_path.write_text(render_env_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nilmd.settingsdoc", description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--markdown", action="store_true", help="print the settings table of docs/CONTRACT.md")
    what.add_argument("--env-file", action="store_true", help="print systemd/nilmd.env")
    what.add_argument("--write", action="store_true", help=f"rewrite the table in {TABLE_DOC.name} and {ENV_FILE.name}")
    args = parser.parse_args(argv)
    if args.write:
        write()
    else:
        sys.stdout.write(render_markdown() if args.markdown else render_env_file())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
