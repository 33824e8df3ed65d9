"""Prometheus /metrics: a real daemon scraped over HTTP, parsed with prometheus-client's own parser,
and the example alert rules and dashboard (deploy/) checked against what it exposes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from nilmd.testing import aligned_start
from conftest import ROOT, import_blocker, publish_samples, wait_for
from nilmd import keys
from nilmd.appliances import APPLIANCES
from nilmd.daemon.control import LATENCY_BUCKETS_S
from test_daemon import Subscriber, wait_ready

parser = pytest.importorskip("prometheus_client.parser", reason="pip install 'nilmd[metrics]'")

BAD = {"not_json": ["{nope", "[1,", "\xff"], "missing_power": ['{"timestamp": 1.0}', '{"voltage": 230}'],
       "non_numeric": ['{"power_total": "lots"}']}


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def scrape(port: int) -> dict:
    """family name -> {(sample name, sorted labels): value}, from GET /metrics."""
    text = scrape_text(port)
    out = {}
    for family in parser.text_string_to_metric_families(text):
        out[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return out


def value(families, sample: str, **labels) -> float:
    family = next(f for f in families.values() if any(name == sample for name, _ in f))
    matches = [v for (name, got), v in family.items() if name == sample and set(labels.items()) <= set(got)]
    assert len(matches) == 1, f"{sample}{labels}: {len(matches)} samples"
    return matches[0]


def exposed_names(families) -> set[str]:
    return {name for f in families.values() for name, _ in f}


def metric_names_in(expr: str) -> set[str]:
    """nilmd's and the process collector's metric names in a PromQL expression (not labels, not functions)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers may name anything
    return {n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if n.startswith(("nilmd_", "process_"))}


def alert_rules() -> list[dict]:
    """{alert, expr} of deploy/prometheus-alerts.yml: PyYAML where installed, else its plain layout."""
    text = (ROOT / "deploy" / "prometheus-alerts.yml").read_text()
    try:
        import yaml
    except ImportError:
        rules, current, folded = [], None, False
        for line in text.splitlines():
            m = re.match(r"\s*- alert: (\S+)", line)
            if m:
                current = {"alert": m.group(1), "expr": ""}
                rules.append(current)
            elif current is not None and (m := re.match(r"\s*expr: (.*)", line)):
                folded = m.group(1).strip() == ">"
                current["expr"] = "" if folded else m.group(1)
            elif current is not None and (m := re.match(r"\s*(summary|description|runbook_url): \"(.*)\"$", line)):
                current.setdefault("annotations", {})[m.group(1)] = m.group(2)
                folded = False
            elif folded and line.startswith("          "):
                current["expr"] += " " + line.strip()
            else:
                folded = False
        return rules
    return [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]


def promtool(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Prometheus' own checker; the test skips, naming the package, where it is not installed."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; .ci/run installs it)")
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True, timeout=60)


def promtool_check_metrics(text: str) -> None:
    """`promtool check metrics`: exposition format and naming (units, _total), no lint problem."""
    if shutil.which("promtool") is None:
        return  # the rest of the test still runs; test_alert_rules_pass_promtool names the package
    out = promtool("check", "metrics", stdin=text)
    assert out.returncode == 0 and not out.stdout.strip(), f"promtool check metrics:\n{out.stdout}{out.stderr}"


def test_alert_rules_pass_promtool_and_fire_when_the_target_is_gone():
    """`promtool check rules`, and its rule unit tests (deploy/prometheus-alerts.test.yml): NilmdDown
    fires on up == 0 and NilmdAbsent when no nilmd target is scraped at all."""
    out = promtool("check", "rules", str(ROOT / "deploy" / "prometheus-alerts.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout and "warn" not in (out.stdout + out.stderr).lower(), out.stdout + out.stderr
    out = promtool("test", "rules", str(ROOT / "deploy" / "prometheus-alerts.test.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_links_the_runbook_and_describes_itself():
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip("# ").lower()).replace(" ", "-")
               for h in operations.splitlines() if h.startswith("#")}
    for rule in alert_rules():
        if "annotations" not in rule:
            pytest.skip("PyYAML is not installed: the annotations are checked with it")
        notes = rule["annotations"]
        assert notes.get("description") and notes.get("summary"), rule["alert"]
        url = notes.get("runbook_url", "")
        assert "docs/OPERATIONS.md#" in url, f"{rule['alert']}: runbook_url {url!r}"
        assert url.split("#", 1)[1] in anchors, f"{rule['alert']}: no heading #{url.split('#', 1)[1]} in OPERATIONS.md"


def test_dashboard_provisions_from_a_file_and_reads_well():
    """No Grafana server can run here (no package of it in this machine's sources): the structure
    file provisioning needs, checked as Grafana reads it. The data source is a variable, never an
    __inputs placeholder (grafana/grafana#10786); every query names metrics nilmd exports."""
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    text = json.dumps(dashboard)
    assert "__inputs" not in dashboard and "${DS_" not in text
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"building", "instance"} <= set(variables)
    source = {"type": "prometheus", "uid": "${datasource}"}
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exported = set(re.findall(r"nilmd_[a-z_]+", (ROOT / "nilmd" / "daemon" / "metrics.py").read_text()))
    exported |= {n + "_total" for n in exported} | {"nilmd_inference_latency_seconds_bucket"}
    exported |= {"nilmd_process_" + n for n in ("resident_memory_bytes", "cpu_seconds_total", "open_fds")}
    for p in panels:
        assert p["datasource"] == source, p["title"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        for t in p["targets"]:
            assert t.get("datasource", source) == source, p["title"]
            assert "instance=~\"$instance\"" in t["expr"], f"{p['title']}: {t['expr']}"
            unknown = {n for n in metric_names_in(t["expr"]) if n.startswith("nilmd_")} - exported
            assert not unknown, f"{p['title']}: {unknown}"
    by_title = {p["title"]: p for p in panels}
    onoff = by_title["On / off"]["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert onoff["0"]["text"] == "off" and onoff["1"]["text"] == "on"
    assert by_title["Meter samples"]["fieldConfig"]["defaults"]["unit"] != "reqps"
    memory = by_title["Memory per process"]["targets"][0]
    assert "nilmd_process_resident_memory_bytes" in memory["expr"] and "{{role}}" in memory["legendFormat"]
    assert "joules" in by_title["Energy today"]["targets"][0]["expr"]
    assert by_title["Energy today"]["fieldConfig"]["defaults"]["unit"] == "kwatth"


def test_energy_hash_read_defensively_and_by_its_own_day():
    """nilm:{b}:energy as the contract has it (§3.6): unknown or unreadable fields are left out,
    and today_wh/month_wh of a past day or month (not yet reset by a new interval) read as 0."""
    from nilmd import latest

    noon = 1764590400.0  # 2025-12-01 12:00 UTC, 13:00 in Berlin
    raw = {b"Dryer:today_wh": b"5.5", b"Dryer:month_wh": b"70", b"Dryer:total_wh": b"900", b"Oven:total_wh": b"1",
           b"Television:total_wh": b"nan", b"Computer:today_wh": b"x", b"Computer:total_wh": b"3",
           b"day": b"2025-12-01", b"month": b"2025-12", b"timezone": b"Europe/Berlin", b"updated": b"1764590000"}
    assert latest.energy(raw, noon) == {"Dryer": {"today": 5.5, "month": 70.0, "total": 900.0},
                                        "Computer": {"total": 3.0}}
    assert latest.energy({**raw, b"other:total_wh": b"4"}, noon)["other"] == {"total": 4.0}, "a part, kept"
    next_day = latest.energy(raw, noon + 86400)["Dryer"]
    assert next_day == {"today": 0.0, "month": 70.0, "total": 900.0}
    assert latest.energy(raw, noon + 31 * 86400)["Dryer"] == {"today": 0.0, "month": 0.0, "total": 900.0}
    # 23:30 UTC on the 1st is already the 2nd in Berlin
    assert latest.energy(raw, noon + 11.5 * 3600)["Dryer"]["today"] == 0.0
    assert latest.energy({}, noon) == {}


def test_alert_rules_cover_the_four_cases_and_each_has_an_expression():
    rules = {r["alert"]: r["expr"] for r in alert_rules()}
    assert {"NilmdDown", "NilmdAbsent", "NilmdMeterSilent", "NilmdRejectedShareHigh", "NilmdChildRestarting"} <= set(rules)
    assert all(e.strip() for e in rules.values()), rules
    assert "up{" in rules["NilmdDown"] and "absent(up{" in rules["NilmdAbsent"]


def test_metrics_port_taken_is_one_line_and_exit_2(daemon_factory):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = daemon_factory(args=["--metrics-port", str(port)]).start()
        code = d.proc.wait(30)
    lines = [line for line in d.log().splitlines() if "CRITICAL" in line or "ERROR" in line]
    assert code == 2, d.log()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], d.log()
    assert "Traceback" not in d.log()


def test_metrics_without_the_extra_is_one_clear_line(tmp_path):
    """A box without prometheus-client: `nilmd check` names the package and the extra."""
    block = import_blocker("prometheus_client") + ("from nilmd.cli import main\n"
                                                   "sys.exit(main(['check', '--mode', 'test', '--metrics-port', '9105']))\n")
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0
    assert "--metrics-port needs the Python package prometheus-client" in out.stdout + out.stderr, out
    assert "nilmd[metrics]" in out.stdout + out.stderr


@pytest.mark.slow
def test_scraped_metrics_are_what_was_fed(daemon_factory, redis_client):
    from nilmd.testing import free_port

    port = free_port()
    d = daemon_factory(args=["--metrics-port", str(port)]).start()
    sub = Subscriber(redis_client, d.building)
    wait_ready(d, redis_client)
    # The energy hash as the inference writes it (the energy counting lands on another branch;
    # until then the test writes it with HSET as that component would, contract: docs/CONTRACT.md §3.1).
    redis_client.hset(keys.energy_key(d.building), mapping={
        "Dryer:today_wh": "12.5", "Dryer:month_wh": "300.25", "Dryer:total_wh": "1234.75",
        "HeatPump:total_wh": "99", "HeatPump:today_wh": "not a number", "Nonsense:total_wh": "5",
        "other:total_wh": "10", "always_on:total_wh": "2.5",
        "day": time.strftime("%Y-%m-%d", time.gmtime()), "month": time.strftime("%Y-%m", time.gmtime()),
        "timezone": "UTC", "updated": str(time.time())})
    t0 = aligned_start(time.time() - 400, 256, 16)  # the window ends at `last` (CONTRACT §4)
    last = publish_samples(redis_client, d.building, 256 + 16, start=t0)
    pipe = redis_client.pipeline(transaction=False)
    for bad in BAD.values():
        for text in bad:
            pipe.publish(keys.input_channel(d.building), text)
    pipe.execute()
    last = publish_samples(redis_client, d.building, 16, start=last + 1)
    predictions = [sub.next() for _ in range(3)]
    assert predictions[-1]["window_end"] == last
    n_bad = sum(len(v) for v in BAD.values())
    status = wait_for(lambda: (lambda s: s if s.get("inferences") == "3" and s.get("samples_received") == str(
        288 + n_bad) else None)(d.status(redis_client)), 20, "status to count every sample and 3 predictions")

    m = scrape(port)
    b = {"building": d.building}
    assert value(m, "nilmd_samples_received_total", **b) == 288 + n_bad
    assert value(m, "nilmd_samples_accepted_total", **b) == 288
    for reason, texts in BAD.items():
        assert value(m, "nilmd_samples_rejected_total", reason=reason, **b) == len(texts), reason
    assert value(m, "nilmd_samples_rejected_total", reason="future", **b) == 0
    assert value(m, "nilmd_predictions_total", **b) == 3
    assert value(m, "nilmd_buffer_fill_samples", **b) == 256
    assert value(m, "nilmd_state", state="running", **b) == 1 and value(m, "nilmd_state", state="degraded", **b) == 0
    assert 0 <= value(m, "nilmd_last_sample_age_seconds", **b) < 30
    assert value(m, "nilmd_last_sample_timestamp_seconds", **b) == last
    assert value(m, "nilmd_models_loaded", **b) == len(APPLIANCES)
    # the latency histogram: exactly the published predictions' step times
    seconds = [p["inference_time_ms"] / 1000 for p in predictions]
    assert value(m, "nilmd_inference_latency_seconds_count", **b) == 3
    assert value(m, "nilmd_inference_latency_seconds_sum", **b) == pytest.approx(sum(seconds))
    for bound in LATENCY_BUCKETS_S:
        expected = sum(s <= bound for s in seconds)
        assert value(m, "nilmd_inference_latency_seconds_bucket", le=repr(bound), **b) == expected, bound
    assert value(m, "nilmd_inference_latency_seconds_bucket", le="+Inf", **b) == 3
    # per appliance: the latest prediction, and the energy hash (unreadable and unknown fields left out)
    for e in json.loads(redis_client.get(keys.latest_key(d.building)))["predictions"]:
        a = {"appliance": e["appliance"], **b}
        assert value(m, "nilmd_appliance_power_watts", **a) == pytest.approx(e["power_watts"])
        assert value(m, "nilmd_appliance_on", **a) == float(e["is_on"])
    # energy in joules, Prometheus' base unit (the hash counts Wh)
    assert value(m, "nilmd_appliance_energy_joules_total", appliance="Dryer", **b) == 1234.75 * 3600
    assert value(m, "nilmd_appliance_energy_joules_total", appliance="HeatPump", **b) == 99 * 3600
    assert value(m, "nilmd_appliance_energy_today_joules", appliance="Dryer", **b) == 12.5 * 3600
    assert value(m, "nilmd_appliance_energy_month_joules", appliance="Dryer", **b) == 300.25 * 3600
    energy_labels = {dict(labels).get("appliance") for _, labels in m["nilmd_appliance_energy_joules"]}
    assert energy_labels == {"Dryer", "HeatPump"}, "the parts are families of their own, not appliances"
    assert {dict(labels)["appliance"] for _, labels in m["nilmd_appliance_energy_today_joules"]} == {"Dryer"}
    assert not [n for n in exposed_names(m) if "watthours" in n]
    # the house: the meter, its always-on load and "other", as the latest prediction says them
    newest = json.loads(redis_client.get(keys.latest_key(d.building)))
    assert value(m, "nilmd_meter_power_watts", **b) == pytest.approx(newest["total_power"])
    assert value(m, "nilmd_always_on_watts", **b) == pytest.approx(newest["always_on_watts"])
    assert value(m, "nilmd_other_power_watts", **b) == pytest.approx(newest["other_watts"])
    assert value(m, "nilmd_other_energy_joules_total", **b) == 10 * 3600
    assert value(m, "nilmd_always_on_energy_joules_total", **b) == 2.5 * 3600
    # process_* of the supervisor; nilmd_process_*{role} of every process, one family, with the building
    pids = {role: int(status[f"pid_{role}"]) for role in ("supervisor", "reader", "inference")}
    assert value(m, "process_start_time_seconds") == pytest.approx(psutil.Process(pids["supervisor"]).create_time(),
                                                                   abs=1.0)
    for role in ("supervisor", "reader", "inference"):
        assert value(m, "nilmd_process_start_time_seconds", role=role, **b) == pytest.approx(
            psutil.Process(pids[role]).create_time(), abs=1.0)
        assert value(m, "nilmd_process_resident_memory_bytes", role=role, **b) > 10e6
        assert value(m, "nilmd_process_cpu_seconds_total", role=role, **b) >= 0
    assert not [n for n in exposed_names(m) if re.match(r"nilmd_(reader|inference|mqtt)_process_", n)]
    for name, samples in m.items():  # the documented rule: every nilmd_* series carries the building
        if name.startswith("nilmd_"):
            assert all("building" in dict(labels) for _, labels in samples), name
    promtool_check_metrics(scrape_text(port))
    assert value(m, "nilmd_child_restarts_total", role="reader", **b) == 0
    os.kill(pids["reader"], signal.SIGKILL)
    wait_for(lambda: d.status(redis_client).get("restarts_reader") == "1", 20, "the reader to be restarted")
    m = scrape(port)
    assert value(m, "nilmd_child_restarts_total", role="reader", **b) == 1
    assert value(m, "nilmd_child_restarts_total", role="inference", **b) == 0
    assert value(m, "nilmd_samples_received_total", **b) == 288 + n_bad, "a counter lost with its process"

    # what deploy/ refers to exists
    exposed = exposed_names(m) | {"up"}
    for rule in alert_rules():
        missing = metric_names_in(rule["expr"]) - exposed
        assert not missing, f"alert {rule['alert']} uses {missing}, which /metrics does not expose"
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        missing = metric_names_in(expr) - exposed
        assert not missing, f"dashboard query {expr!r} uses {missing}, which /metrics does not expose"
    assert d.stop() == 0
    assert "Traceback" not in d.log()
