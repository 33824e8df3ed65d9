"""Prometheus `/metrics`, served by the supervisor (docs/OPERATIONS.md, "Prometheus"; docs/CONTRACT.md §11).

The supervisor already holds everything an operator graphs: the control block's counters (each
process keeps its own there, across restarts of the others), the children's restarts, the
health state and its reasons. So a custom collector reads them when Prometheus scrapes, rather
than every counter being kept a second time in prometheus-client objects: one bookkeeping, and
a scrape always sees what the status hash would say. What only Redis knows (the latest
prediction's power per appliance, the energy hash) is read in one round trip per scrape.

Units are Prometheus' base units: energy in joules (`*_joules_total`, as node_exporter's RAPL
and Kepler export it; a dashboard divides by 3.6e6 for kWh), power in watts. Each child's
process metrics are one family with a `role` label (nilmd_process_*), not a family per role.

prometheus-client's HTTP server runs in a daemon thread of the supervisor; the collector only
reads (a copy of the control block, plain attributes), so it needs no lock and cannot disturb
the supervisor's loop. Only with --metrics-port; this module imports prometheus-client, so the
supervisor imports it only then.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from nilmd import __version__, latest
from nilmd.daemon import control as ctlmod
from nilmd.daemon import metrics_server
from nilmd.daemon.ingest import REJECT_REASONS, REPAIR_REASONS
from nilmd.daemon.roles import SUPERVISOR
from nilmd.daemon.sources import DISCONNECT_CAUSES
from nilmd.errors import NilmdError, redis_error
from nilmd.log import Throttle

APPLIANCES_OK = "1 if this scrape could read the latest prediction and the energy from Redis"
J_PER_WH = 3600.0
STATES = ("starting", "warming_up", "running", "degraded", "reloading", "stopping", "stopped")


class DaemonCollector:
    def __init__(self, supervisor):
        self.sup = supervisor
        self.building = supervisor.cfg.building_id  # with a list: "" for the daemon, each one's id for its series
        self.throttle = Throttle(logging.getLogger("nilmd.metrics"), period=60.0)  # this thread's own

    def _family(self, kind, name: str, doc: str, values, label: str | None = None):
        """One family, the building label on every sample; `values`: a number, or {label value: number}."""
        labels = ["building"] + ([label] if label else [])
        family = kind(name, doc, labels=labels)
        for key, value in (values.items() if label else [(None, values)]):
            family.add_metric([self.building] + ([key] if label else []), float(value))
        return family

    def collect(self):
        """One building: its series, as always. A list: the daemon's own series (its processes, its
        input connection, the models) once, labelled building="", and each building's series
        labelled with its id (merged into one family per name)."""
        sup, judge = self.sup, self.sup.judge
        served = list(sup.roster.served.values())  # a copy: the loop may change the list meanwhile
        if not sup.roster.listed:
            one = served[0] if served else None
            snap = sup.ctl.snapshot()
            yield from self._process(snap)
            yield from self._building(snap, one.ring if one else None, judge.state, judge.problems)
            yield from self._appliances()
            return
        families: dict[str, object] = {}
        daemon = DaemonCollector.labelled(sup, "")
        merge(families, daemon._process(sup.ctl.snapshot()))
        merge(families, daemon._states(judge.state, judge.problems))
        for one in served:
            merge(families, DaemonCollector.labelled(sup, one.building)._building(
                sup.ctl.snapshot(one.ctl), one.ring, one.state, one.problems))
        yield from families.values()

    @classmethod
    def labelled(cls, sup, building: str) -> "DaemonCollector":
        one = cls.__new__(cls)
        one.sup, one.building, one.throttle = sup, building, None
        return one

    def _process(self, snap):
        """The series of the processes and the input connection."""
        sup = self.sup
        c, g = CounterMetricFamily, GaugeMetricFamily
        f = self._family
        info = GaugeMetricFamily("nilmd_info", "nilmd's version and set-up (always 1)",
                                 labels=["building", "version", "device", "input_mode"])
        info.add_metric([self.building, __version__, "cuda" if snap["device_cuda"] else "cpu", sup.cfg.input_mode], 1)
        yield info
        yield f(g, "nilmd_start_time_seconds", "when the supervisor started (epoch s)", sup.started)
        yield f(c, "nilmd_input_disconnects", "input subscriptions cut, by cause",
                {k: snap[f"disconnects_{k}"] for k in DISCONNECT_CAUSES}, "cause")
        yield f(g, "nilmd_input_connected", "1 while the reader is connected to its input", snap["redis_connected"])
        yield f(c, "nilmd_redis_errors", "Redis commands that failed, by process",
                {"reader": snap["redis_errors"], "inference": snap["inference_redis_errors"],
                 "supervisor": snap["supervisor_redis_errors"]}, "process")
        yield f(g, "nilmd_window_size_samples", "samples per model window", sup.cfg.window_size)
        yield f(g, "nilmd_models_loaded", "appliance models serving", snap["models_loaded"])
        yield f(c, "nilmd_reload_failures", "checkpoint reloads that failed", snap["reload_failed"])
        yield self._latency(snap)
        yield f(c, "nilmd_child_restarts", "restarts of each child process", {
            r: ch.restarts for r, ch in sup.children.items()}, "role")
        yield f(g, "nilmd_child_up", "1 while the child process runs (0 from its death to its restart)", {
            r: _pid_of(ch)() != "none" for r, ch in sup.children.items()}, "role")
        if "mqtt" in sup.children:
            yield f(g, "nilmd_mqtt_connected", "1 while connected to the MQTT broker",
                    snap["mqtt_state"] == ctlmod.MQTT_CONNECTED)
            yield f(c, "nilmd_mqtt_messages", "MQTT messages published (discovery, states, availability)",
                    snap["mqtt_published"])

    def _building(self, snap, ring, state: str, problems):
        """The series of one building's data (`snap`: its block over the daemon's)."""
        sup, now = self.sup, time.time()
        c, g = CounterMetricFamily, GaugeMetricFamily
        f = self._family
        # samples: received = accepted + rejected (by the first reason that applies)
        yield f(c, "nilmd_samples_received", "meter messages received", snap["samples_received"])
        yield f(c, "nilmd_samples_accepted", "samples accepted into the ring", snap["samples_accepted"])
        yield f(c, "nilmd_samples_rejected", "messages rejected, by reason (docs/CONTRACT.md §6.1)",
                {r: snap[f"rejected_{r}"] for r in REJECT_REASONS}, "reason")
        yield f(c, "nilmd_samples_repaired", "samples kept after a repair, by reason (§6.2)",
                {r: snap[f"repaired_{r}"] for r in REPAIR_REASONS}, "reason")
        yield f(c, "nilmd_samples_filled", "gap seconds filled by holding the last sample", snap["samples_filled"])
        yield f(c, "nilmd_gaps_broken", "gaps longer than --max-gap-fill, each starting a new window",
                snap["gaps_broken"])
        yield f(c, "nilmd_input_samples_lost", "samples estimated lost in input cuts", snap["samples_lost"])
        age = now - max(snap["last_arrival"], sup.started)
        yield f(g, "nilmd_last_sample_age_seconds", "seconds since a sample was last accepted (by the box's "
                "clock; since the start if none was)", max(age, 0.0))
        yield f(g, "nilmd_last_sample_timestamp_seconds", "the meter's timestamp of the newest accepted sample",
                snap["last_sample_ts"])
        # the window and the predictions
        run_length = ring.run_length() if ring is not None else 0
        yield f(g, "nilmd_buffer_fill_samples", "samples of the next window already in the ring",
                min(run_length, sup.cfg.window_size))
        yield f(c, "nilmd_predictions", "predictions published", snap["inferences"])
        yield f(g, "nilmd_predictions_pending", "1 while a prediction waits for Redis to take it",
                snap["predictions_pending"])
        yield f(c, "nilmd_overruns", "windows overwritten while read (skipped)", snap["overruns"])
        yield f(g, "nilmd_last_prediction_timestamp_seconds", "when the last prediction was published (epoch s)",
                snap["last_inference_ts"])
        yield from self._adapted(snap)
        yield from self._states(state, problems)

    def _adapted(self, snap):
        """Per served appliance: its adapted model serves (nilmd adapt), or its adapted file was refused."""
        f, g = self._family, GaugeMetricFamily
        served = ctlmod.appliances(snap["models_mask"])
        adapted, refused = ctlmod.appliances(snap["adapted_mask"]), ctlmod.appliances(snap["adapted_refused_mask"])
        yield f(g, "nilmd_model_adapted", "1 if the building's adapted model of the appliance serves, 0 if the "
                "shipped one", {a: a in adapted for a in served}, "appliance")
        yield f(g, "nilmd_model_adapted_refused", "1 if the building's adapted model of the appliance was refused "
                "(the log says why; the shipped one serves)", {a: a in refused for a in served}, "appliance")

    def _states(self, state: str, problems):
        f, g = self._family, GaugeMetricFamily
        yield f(g, "nilmd_state", "1 for the daemon's current state (docs/CONTRACT.md §3.5)",
                {s: s == state for s in STATES}, "state")
        yield f(g, "nilmd_degraded_reason", "1 for each reason the state is degraded (a fixed code; the sentence "
                "is the status hash's degraded_reason)", {p.code: 1 for p in (problems if state == "degraded" else [])},
                "reason")

    def _latency(self, snap):
        family = HistogramMetricFamily("nilmd_inference_latency_seconds", "time of one inference step (all "
                                       "models, one window) of each published prediction", labels=["building"])
        buckets = [(repr(bound), snap[f"latency_le_{i}"]) for i, bound in enumerate(ctlmod.LATENCY_BUCKETS_S)]
        family.add_metric([self.building], buckets + [("+Inf", snap["latency_count"])], snap["latency_sum"])
        return family

    def _appliances(self):
        """Per appliance, from Redis: the latest prediction's power and state, and the energy hash."""
        if self.sup.redis is None:
            return
        try:
            prediction, energy = latest.read(self.sup.redis, self.building)
        except self.sup.redis_errors as e:
            kind, line = redis_error(e)
            self.throttle.log(f"read {kind}", logging.WARNING, f"/metrics: no appliance metrics this scrape, "
                              f"could not read the latest prediction and energy: {line}")
            yield self._family(GaugeMetricFamily, "nilmd_appliance_metrics_ok", APPLIANCES_OK, 0)
            return
        self.throttle.ok("read unreachable")
        yield self._family(GaugeMetricFamily, "nilmd_appliance_metrics_ok", APPLIANCES_OK, 1)
        entries = latest.appliances(prediction)
        f, g = self._family, GaugeMetricFamily
        appliances = {a: e for a, e in energy.items() if a not in latest.PARTS}
        yield f(g, "nilmd_appliance_power_watts", "estimated power of each appliance, mean over the last "
                "prediction's interval", {a: e.get("power_watts", 0.0) for a, e in entries.items()}, "appliance")
        yield f(g, "nilmd_appliance_on", "1 if the appliance was on in the last prediction",
                {a: bool(e.get("is_on")) for a, e in entries.items()}, "appliance")
        yield f(g, "nilmd_appliance_probability", "the model's probability that the appliance is on",
                {a: e.get("probability", 0.0) for a, e in entries.items()}, "appliance")
        yield f(CounterMetricFamily, "nilmd_appliance_energy_joules", "energy of each appliance since counting "
                "began (nilm:<id>:energy, total_wh x 3600)", {a: e["total"] * J_PER_WH for a, e in appliances.items()
                                                               if "total" in e}, "appliance")
        for name, period, since in (("nilmd_appliance_energy_today_joules", "today", "local midnight"),
                                    ("nilmd_appliance_energy_month_joules", "month", "the start of the local month")):
            yield f(g, name, f"energy of each appliance since {since} (the box's time zone)",
                    {a: e[period] * J_PER_WH for a, e in appliances.items() if period in e}, "appliance")
        yield from self._house(prediction, energy)

    def _house(self, prediction, energy):
        """The meter, the always-on load and "other" (what no appliance accounts for)."""
        f, g = self._family, GaugeMetricFamily
        parts = latest.parts(prediction)
        if prediction is not None and isinstance(prediction.get("total_power"), (int, float)):
            yield f(g, "nilmd_meter_power_watts", "the meter's power, mean over the last prediction's interval",
                    prediction["total_power"])
        if "always_on" in parts:
            yield f(g, "nilmd_always_on_watts", "the house's always-on load: a low percentile of the last 24 h",
                    parts["always_on"])
        if "other" in parts:
            yield f(g, "nilmd_other_power_watts", "the meter's power that no appliance accounts for (never "
                    "negative)", parts["other"])
        for name, part, doc in (("nilmd_always_on_energy_joules", "always_on", "the always-on load"),
                                ("nilmd_other_energy_joules", "other", "\"other\"")):
            if "total" in energy.get(part, {}):
                yield f(CounterMetricFamily, name, f"energy of {doc} since counting began", energy[part]["total"] * J_PER_WH)


class ProcessesCollector:
    """prometheus-client's process metrics (memory, CPU, file descriptors, start time) of every
    process of the daemon, renamed nilmd_process_* and labelled with the building and the role
    (supervisor and each child role, nilmd.daemon.roles): one family to graph and filter, not one per role."""

    def __init__(self, supervisor):
        self.building = supervisor.cfg.building_id  # "" with a list: the processes are the daemon's
        roles = {SUPERVISOR: lambda: "self", **{r: _pid_of(c) for r, c in supervisor.children.items()}}
        self.each = {role: ProcessCollector(pid=pid, registry=None) for role, pid in roles.items()}

    def collect(self):
        families = {}
        for role, collector in self.each.items():
            for family in collector.collect():  # nothing for a child that is down
                name = "nilmd_" + family.name
                if name not in families:
                    kind = CounterMetricFamily if family.type == "counter" else GaugeMetricFamily
                    families[name] = kind(name, family.documentation, labels=["building", "role"])
                families[name].add_metric([self.building, role], family.samples[0].value)
        yield from families.values()


def merge(families: dict, more) -> None:
    """Add the samples of `more` (families) to the family of the same name in `families`."""
    for family in more:
        if family.name in families:
            families[family.name].samples.extend(family.samples)
        else:
            families[family.name] = family


def _pid_of(child):
    """Its pid until the supervisor reaps it, else "none" (no /proc entry). Only reads: waiting
    on a child (is_alive) is the supervisor loop's job, and this thread runs beside it."""
    def pid():
        try:
            process = child.process
            return process.pid if process is not None else "none"
        except ValueError:  # closed by the loop between the two reads
            return "none"
    return pid


def serve(supervisor):
    """Start /metrics (NilmdError if the address cannot be bound); returns the server to shut down."""
    cfg = supervisor.cfg
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # the conventional process_* of the supervisor
    registry.register(ProcessesCollector(supervisor))  # and nilmd_process_*{role} of every process
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(DaemonCollector(supervisor))
    try:
        server = metrics_server.start(cfg.metrics_port, cfg.metrics_host, registry)  # connections capped
    except OSError as e:
        raise NilmdError(f"cannot serve /metrics on {cfg.metrics_host}:{cfg.metrics_port} (--metrics-host, "
                         f"--metrics-port): {e.strerror or e}") from None
    logging.getLogger("nilmd.supervisor").info("serving Prometheus metrics on http://%s:%d/metrics",
                                               cfg.metrics_host, cfg.metrics_port)
    return server
