"""`nilmd adapt` end to end: a simulated house whose kettle (1.7 kW) and fridge (another cycle)
are unlike the training houses', its meter recorded as the daemon records it, a smart plug's log
for the kettle and a sub-metered file for the fridge; `nilmd adapt` learns them, writes the
building's folder with its record, and a real daemon then serves them for that building."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from conftest import aligned_start, publish_samples  # noqa: E402
from nilmd import history  # noqa: E402
from nilmd.models import adapted  # noqa: E402
from test_adapt import DAY, simulated_house  # noqa: E402
from test_adapted_daemon import Published  # noqa: E402
from test_daemon import wait_ready  # noqa: E402
from test_multi import STEP, WINDOW  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record_history(state, building: str, tr) -> None:
    """The house's meter as the daemon's reader records it (nilmd.history)."""
    values = np.stack([tr.power_total, tr.voltage, tr.current, tr.power_factor]).astype(np.float32)
    history.append(state, building, 1, tr.timestamp.astype(np.int64), values)


def nilmd(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "nilmd", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


@pytest.mark.slow
def test_adapt_learns_a_simulated_house_and_the_daemon_serves_it(daemon_factory, redis_client, tmp_path):
    d = daemon_factory(model_dir=os.path.join(ROOT, "checkpoints"))  # the shipped models, adapted
    state = d.runtime_dir / "state"
    b = simulated_house()
    b.start = float(int(time.time()) // DAY * DAY - 3 * DAY)  # the last three whole days, recorded
    tr = b.trace(b.start, 3 * DAY)
    record_history(state, d.building, tr)
    plug = tmp_path / "kettle-plug.csv"
    with open(plug, "w") as f:  # a smart plug logging every 10 s
        f.write("timestamp,W\n" + "".join(f"{int(t)},{w:.1f}\n" for t, w in
                                          zip(tr.timestamp[::10], tr.appliances["ElectricKettle"][::10])))
    sub = tmp_path / "fridge.csv"
    with open(sub, "w") as f:  # a sub-metered period, at 1 Hz, with its own aggregate
        f.write("timestamp,power_total,Refrigerator\n" + "".join(
            f"{int(t)},{p:.1f},{w:.1f}\n" for t, p, w in zip(tr.timestamp, tr.power_total, tr.appliances["Refrigerator"])))
    env = {"NILMD_STATE_DIR": str(state), "MODEL_DIR": d.env["MODEL_DIR"], "BUILDING_ID": d.building}
    r = nilmd("adapt", "--no-stream", "--steps", "100", "--labels", f"ElectricKettle={plug}", str(sub), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    table = r.stdout
    assert "ElectricKettle" in table and "Refrigerator" in table, table
    where = adapted.folder(state, d.building)
    record = json.loads((where / adapted.RECORD).read_text())
    rows = {row["appliance"]: row for row in record["table"]}
    for a in ("ElectricKettle", "Refrigerator"):
        assert rows[a]["kept"], (a, rows[a])
        best = rows[a]["candidates"][rows[a]["method"]]
        assert best["f1"] > rows[a]["shipped"]["f1"] + 0.1, (a, rows[a])  # held-out F1 improved
        assert a in record["appliances"] and (where / record["appliances"][a]["file"]).is_file()
    assert rows["ElectricKettle"]["shipped"]["f1"] < 0.2  # a 2-kW threshold never sees a 1.7-kW kettle
    forms = sorted(s["form"] for s in record["labels"])
    assert len(forms) == 2 and all(len(s["sha256"]) == 64 for s in record["labels"]), record["labels"]
    assert not [p for p in where.parent.iterdir() if p.name.startswith(".")]  # nothing half-written left
    assert record["onnx_max_probability_difference"] < 1e-3  # the set exported for an onnxruntime daemon too

    # The daemon serves them, for this building.
    d.start()
    wait_ready(d, redis_client)
    published = Published(redis_client)
    last = publish_samples(redis_client, d.building, WINDOW, start=aligned_start(time.time() - 600, WINDOW, STEP))
    p = published.at([d.building], last, d)[d.building]
    assert {a for a, e in p.items() if e["adapted"]} == {"ElectricKettle", "Refrigerator"}

    # --reset: back to the shipped models (after a reload).
    r = nilmd("adapt", "--reset", env=env)
    assert r.returncode == 0 and not where.exists(), r.stderr
