"""`nilmd report` (docs/OPERATIONS.md, "Energy, events and the daily report"): the PNG and its HTML twin drawn
from the predictions and events streams that the daemon wrote for a simulated morning
(`simulated_morning`, tests/conftest.py), with the simulator's truth as a --truth CSV."""

from __future__ import annotations

import base64
import csv
import re
import struct
import subprocess
import sys

import pytest

from conftest import ROOT, import_blocker
from nilmd import keys
from nilmd.appliances import APPLIANCES

pytestmark = pytest.mark.slow
DAY = "2024-01-03"  # house 3000's day 2 (tests/conftest.py)
BLOCK_MATPLOTLIB = import_blocker("matplotlib")


def nilmd(m, *args, prelude: str = ""):
    code = prelude + "import sys\nfrom nilmd.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, "report", "--redis-port",
                           str(m["client"].connection_pool.connection_kwargs["port"]), "--building-id", m["building"],
                           "--timezone", "UTC", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, "no IHDR first"
    return struct.unpack(">II", data[16:24])


def truth_csv(m, path) -> dict[str, float]:
    """The simulator's true power of the predicted span, as nilmd.csvfile reads it; its Wh per appliance."""
    tr = m["trace"]
    span = slice(len(tr) - 6 * 3600, None)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "power_total", *APPLIANCES])
        for i in range(span.start, len(tr)):
            w.writerow([int(tr.timestamp[i]), f"{tr.power_total[i]:.1f}", *(f"{tr.appliances[a][i]:.1f}" for a in APPLIANCES)])
    return {a: float(tr.appliances[a][span].astype(float).round(1).sum()) / 3600 for a in APPLIANCES}


def test_the_report_is_a_png_of_its_size_and_an_html_twin_with_the_truth(simulated_morning, tmp_path):
    """1400 x 1600 px whatever the day holds (docs/OPERATIONS.md); the page's energy table is the daemon's
    today_wh and the truth file's Wh, its runs table the events."""
    pytest.importorskip("matplotlib", reason="the report extra: pip install 'nilmd[report]'")
    m = simulated_morning
    true_wh = truth_csv(m, tmp_path / "truth.csv")
    out = nilmd(m, "--day", DAY, "--out", str(tmp_path / "day.png"), "--html", str(tmp_path / "day.html"),
                "--truth", str(tmp_path / "truth.csv"))
    assert out.returncode == 0, out.stderr
    png = (tmp_path / "day.png").read_bytes()
    assert png_size(png) == (1400, 1600)
    page = (tmp_path / "day.html").read_text()
    inlined = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    assert inlined and base64.b64decode(inlined.group(1)) == png, "the page does not carry the picture itself"
    assert "<script" not in page and "http" not in page.split("<body>", 1)[1], "not self-contained"
    rows = {a: (float(e), float(t)) for a, e, t in
            re.findall(r"<tr><td>(\w+)</td><td>([\d.]+)</td><td>([\d.]+)</td></tr>", page)}
    assert set(rows) == set(APPLIANCES), "an appliance missing from the energy table"
    energy = m["client"].hgetall(keys.energy_key(m["building"]))
    for a in APPLIANCES:  # the day's bar is the daemon's today_wh; the truth is the CSV's
        assert rows[a][0] == pytest.approx(float(energy[f"{a}:today_wh".encode()]), abs=0.06), a
        assert rows[a][1] == pytest.approx(true_wh[a], abs=0.06), a
    ends = sum(1 for e in m["events"] if e["event"] == "end")
    assert page.count("<td>still on</td>") + ends == len(re.findall(r"<tr><td>\w+</td><td>\d\d:\d\d</td>", page))


def test_without_matplotlib_one_line_names_the_extra(simulated_morning, tmp_path):
    out = nilmd(simulated_morning, "--day", DAY, "--out", str(tmp_path / "x.png"), prelude=BLOCK_MATPLOTLIB)
    assert out.returncode == 1 and not (tmp_path / "x.png").exists()
    assert out.stderr.strip().splitlines() == [
        "nilmd: error: nilmd report needs matplotlib, which is not installed: pip install 'nilmd[report]' "
        "(the report extra)"]


def test_a_day_without_predictions_says_what_the_stream_holds(simulated_morning, tmp_path):
    out = nilmd(simulated_morning, "--day", "2024-01-05", "--out", str(tmp_path / "x.png"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "no predictions of 2024-01-05 (UTC)" in lines[0], out.stderr
