"""The documents hold: every link and anchor between them resolves, the README stays a front door,
and every shell block marked runnable (`<!-- runnable -->` on the line before a ```sh fence) in the
README and the operator's guide runs, in order, against a private redis-server (issue 24, part 4).

A runnable block is run as the reader would run it: by bash (`-e -o pipefail`), with `nilmd` on
PATH, `REDIS_PORT` naming the private server, the shared memory and state in a temporary folder;
the README's from the checkout (it says so), the guide's from an empty folder (a box). Blocks that
need systemd, root or the network are not marked."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, RedisServer, free_port

README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "OPERATIONS.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "checkpoints" / "README.md"]
README_MAX_LINES = 250
RUNNABLE = "<!-- runnable -->"
BLOCK_DEADLINE_S = 240.0  # the README's block waits for a first prediction: ~20 s, more on a busy box

FENCE = re.compile(r"^```")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str):
    """(line number, line) of each line outside fenced blocks."""
    inside = False
    for number, line in enumerate(text.split("\n"), 1):
        if FENCE.match(line.strip()):
            inside = not inside
        elif not inside:
            yield number, line


def anchors(text: str):
    """GitHub's heading ids: lower case, punctuation (backticks too) dropped, spaces to '-',
    repeats numbered."""
    seen: dict[str, int] = {}
    for _, line in prose(text):
        m = re.match(r"^#{1,6} (.+)$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        yield slug if n == 0 else f"{slug}-{n}"


def links(path: Path):
    """(line number, target) of each relative link in the document's prose (not in code)."""
    for number, line in prose(path.read_text()):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"^[a-z]+:", target):  # http(s):, mailto: are not ours to check
                yield number, target


def runnable_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, script) of every ```sh block marked runnable, in order."""
    lines, blocks = path.read_text().split("\n"), []
    for i, line in enumerate(lines):
        if line.strip() == RUNNABLE:
            fence = lines[i + 1].strip() if i + 1 < len(lines) else ""
            assert fence == "```sh", f"{path.name}:{i + 1}: {RUNNABLE} must come right before a ```sh fence"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
            blocks.append((i + 2, "\n".join(lines[i + 2:end]) + "\n"))
    return blocks


def test_every_link_and_anchor_between_the_documents_resolves():
    broken = []
    for doc in DOCUMENTS:
        for number, target in links(doc):
            file_part, _, anchor = target.partition("#")
            dest = (doc.parent / file_part).resolve() if file_part else doc
            where = f"{doc.relative_to(ROOT)}:{number}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in set(anchors(dest.read_text())):
                broken.append(f"{where} (no heading with that anchor in {dest.relative_to(ROOT)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_anchor_rule_is_githubs():
    """The check above can fail: an anchor is computed as GitHub computes it."""
    text = ("# A\n## Backends: torch or ONNX Runtime\n```\n# not a heading\n```\n## Input: pub/sub\n## Input: pub/sub\n"
            "## Adapted (`nilmd adapt`): later\n")
    assert list(anchors(text)) == ["a", "backends-torch-or-onnx-runtime", "input-pubsub", "input-pubsub-1",
                                   "adapted-nilmd-adapt-later"]


def test_the_readme_is_a_front_door():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: what is not the front door belongs in docs/"
    text = README.read_text()
    # the two commands, exactly as .ci/run and a fresh clone use them
    assert "bash scripts/setup.sh && .venv/bin/nilmd run --mode test" in text
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest " in text


def test_the_readme_and_the_guide_have_runnable_blocks(tmp_path):
    """So that the runs below cannot pass by finding nothing, nor skip a block marked wrongly."""
    assert len(runnable_blocks(README)) >= 1 and len(runnable_blocks(GUIDE)) >= 3
    doc = tmp_path / "doc.md"
    doc.write_text(f"{RUNNABLE}\n```\necho hi\n```\n")
    with pytest.raises(AssertionError, match="must come right before"):
        runnable_blocks(doc)


def run_block(doc: Path, number: int, script: str, cwd: Path, env: dict, logs: Path) -> None:
    """One block in its own bash and process group, under a deadline; whatever it left running
    (its `&` jobs) is stopped with SIGTERM, then SIGKILL, before the next one."""
    where = f"{doc.relative_to(ROOT)}:{number}"
    log = logs / f"block-{doc.stem}-{number}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=BLOCK_DEADLINE_S)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _stop_group(proc.pid)
    output = log.read_text()
    assert rc is not None, f"{where}: the block did not end within {BLOCK_DEADLINE_S:.0f} s:\n{script}\n{output[-3000:]}"
    assert rc == 0, f"{where}: the block exited {rc}:\n{script}\n{output[-3000:]}"


def _stop_group(pgid: int, timeout: float = 20.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("doc", [README, GUIDE], ids=["README", "OPERATIONS"])
def test_the_runnable_blocks_run(doc, tmp_path):
    blocks = runnable_blocks(doc)
    runtime, state, box, workdir = tmp_path / "run", tmp_path / "state", tmp_path / "box", tmp_path / "redis"
    for d in (runtime, state, box, workdir):
        d.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    with RedisServer(free_port(), workdir) as redis:
        env = dict(os.environ, REDIS_PORT=str(redis.port), REDIS_HOST="127.0.0.1", NILMD_RUNTIME_DIR=str(runtime),
                   NILMD_STATE_DIR=str(state), MODEL_DIR=str(ROOT / "checkpoints"),
                   PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""))
        for key in ("BUILDING_ID", "BUILDING_IDS", "REDIS_USERNAME", "REDIS_PASSWORD", "REDIS_PASSWORD_FILE"):
            env.pop(key, None)  # the blocks assume the defaults a reader starts from
        cwd = ROOT if doc == README else box
        for number, script in blocks:
            run_block(doc, number, script, cwd, env, tmp_path)
    assert sorted(p.name for p in runtime.iterdir()) == [], "a block left shared memory behind"
