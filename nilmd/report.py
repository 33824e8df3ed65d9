"""`nilmd report`: one building's day at a glance, as a PNG (and, with --html, one self-contained
page), from what the daemon keeps in Redis: the predictions stream and the events stream
(docs/CONTRACT.md §3.6, §3.7). No database of its own.

The picture: the meter's line with each appliance's estimated power stacked under it, over the
span of the day that has predictions, the time axis named with its time zone. The stack never
rises above the meter: where the estimates add up to more than the meter saw in an interval
(each is at most the meter, their sum need not be) they are scaled down together to the meter,
and the legend says in how many intervals and by how much at most. What the meter saw above the
appliances is "other", a grey band; the always-on load a dashed line. With --truth, the true appliance power of a CSV file (the layout of nilmd.csvfile) the same
way beside it; the runs on a time line; a bar of energy per appliance (estimate and truth); and
the list of runs. Energy per day is added up as the daemon adds `today_wh` (nilmd.days: an
interval counts on the day of its middle), so the bar of today matches the energy hash.

matplotlib (the `report` extra) is imported only here, inside `render`: the daemon never loads it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from nilmd import csvfile, days, keys
from nilmd.appliances import APPLIANCES
from nilmd.errors import NilmdError

SIZE_IN, DPI = (14.0, 16.0), 100  # 1400 x 1600 px, whatever the day holds
LISTED_RUNS = 30  # runs written in the picture; the HTML lists them all
BATCH = 1000  # stream entries per XRANGE


@dataclass
class Day:
    building: str
    day: str
    timezone: str
    start: float  # epoch s of the local midnight that starts the day
    end: float
    ends: np.ndarray  # window_end of each interval, ascending
    interval: np.ndarray  # its length (s)
    total: np.ndarray  # total_power (W)
    power: dict[str, np.ndarray]  # appliance -> power_watts (W), APPLIANCES order
    always_on: np.ndarray | None = None  # always_on_watts (W) of each interval (NaN: an older daemon's)
    runs: list[dict] = field(default_factory=list)  # end events, and start events of runs still open
    truth: dict[str, np.ndarray] | None = None  # appliance -> W on the `truth_t` grid
    truth_t: np.ndarray | None = None  # bin starts (epoch s)
    truth_total: np.ndarray | None = None
    truth_wh: dict[str, float] | None = None

    def energy_wh(self) -> dict[str, float]:
        return {a: float(np.sum(p * self.interval) / 3600) for a, p in self.power.items()}

    def total_wh(self) -> float:
        return float(np.sum(self.total * self.interval) / 3600)

    def shown(self) -> tuple[float, float]:
        """The time axis: from the first interval's start to the last one's end (a few hours of
        data fill the width, not a tenth of it)."""
        return float(self.ends[0] - self.interval[0]), float(self.ends[-1])

    def drawn(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """(each appliance's power as drawn, "other" as drawn, the factor each interval was scaled
        by): the stack scaled down to the meter wherever it would rise above it."""
        stack = np.sum(list(self.power.values()), axis=0) if self.power else np.zeros_like(self.total)
        scale = np.where(stack > self.total, np.maximum(self.total, 0.0) / np.maximum(stack, 1e-9), 1.0)
        power = {a: p * scale for a, p in self.power.items()}
        return power, np.maximum(self.total - stack * scale, 0.0), scale

    def open_run(self, e: dict) -> dict:
        """A run still on at the day's last prediction, as far as the predictions go: its duration
        to that prediction, and its energy and peak over the intervals since it started (the start
        event knows only its first interval)."""
        last = float(self.ends[-1])
        since = self.ends > e["start"]
        p = self.power.get(e["appliance"], np.zeros_like(self.total))[since]
        return {**e, "duration_s": max(last - e["start"], e["duration_s"]),
                "energy_wh": float(np.sum(p * self.interval[since]) / 3600) if p.size else e["energy_wh"],
                "peak_w": float(np.max(p, initial=e["peak_w"]))}


def _entries(client, key: str, first: str):
    """Every entry of a stream from id `first` on, in batches."""
    low = first
    while True:
        batch = client.xrange(key, low, "+", count=BATCH)
        yield from batch
        if len(batch) < BATCH:
            return
        low = "(" + batch[-1][0].decode()


def read_day(client, building: str, day: str, timezone: str) -> Day:
    """The day's predictions and runs from Redis (redis-py errors pass through)."""
    tz = days.zone(timezone)
    start, end = days.bounds(day, tz)
    key = keys.predictions_stream(building)
    rows = []
    # Entry ids are the window's end in ms (nilmd.daemon.ledger); an older daemon's were the box's
    # clock when published, never long before the window's end: an hour's margin covers those and
    # a meter clock running ahead (it is bounded by NILMD_MAX_CLOCK_SKEW).
    for _, fields in _entries(client, key, str(int(start - 3600) * 1000)):
        try:
            p, interval = json.loads(fields[b"json"]), float(fields[b"interval_s"])
            if days.interval_day(p["window_end"], interval, tz)[0] == day:
                rows.append((float(p["window_end"]), interval, float(p["total_power"]),
                             {e["appliance"]: float(e["power_watts"]) for e in p["predictions"]},
                             float(p.get("always_on_watts", "nan"))))
        except (KeyError, ValueError, TypeError):
            continue  # not an entry the daemon wrote: skip it, as a dashboard would
    if not rows:
        held = client.xrange(key, "-", "+", count=1), client.xrevrange(key, "+", "-", count=1)
        span = " to ".join(datetime.fromtimestamp(int(e[0][0].split(b"-")[0]) / 1000, tz).strftime("%Y-%m-%d %H:%M")
                           for e in held if e)
        raise NilmdError(f"no predictions of {day} ({timezone}) in {key}: it holds "
                         f"{span or 'nothing'} (it keeps NILMD_PREDICTIONS_HISTORY seconds; is this the building?)")
    rows.sort(key=lambda r: r[0])
    served = [a for a in APPLIANCES if any(a in r[3] for r in rows)]
    out = Day(building, day, timezone, start, end, np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
              np.array([r[2] for r in rows]), {a: np.array([r[3].get(a, 0.0) for r in rows]) for a in served},
              np.array([r[4] for r in rows]))
    out.runs = [out.open_run(e) if e["end"] is None else e for e in _runs(client, building, start, end)]
    return out


def _runs(client, building: str, start: float, end: float) -> list[dict]:
    """Runs that touch the day: each end event, and the start of a run that has not ended."""
    runs, open_ = [], {}
    for _, fields in _entries(client, keys.events_stream(building), "-"):
        try:
            e = json.loads(fields[b"json"])
            if e["event"] == "start":
                open_[e["appliance"]] = e
            elif e["event"] == "end":
                open_.pop(e["appliance"], None)
                if e["start"] < end and e["end"] > start:
                    runs.append(e)
        except (KeyError, ValueError, TypeError):
            continue
    runs += [e for e in open_.values() if start <= e["start"] < end]
    return sorted(runs, key=lambda e: e["start"])


def add_truth(day: Day, path: str) -> None:
    """True appliance power from a CSV file (nilmd.csvfile's layout), for the same day."""
    table = csvfile.read(path)
    keep = (table.time >= day.start) & (table.time < day.end)
    if not table.appliances:
        raise NilmdError(f"--truth {path}: no appliance column (named as in the predictions, e.g. "
                         f"{', '.join(APPLIANCES[:3])})")
    if not keep.any():
        raise NilmdError(f"--truth {path}: no row on {day.day} ({day.timezone})")
    t = table.time[keep]
    steps = np.diff(t)
    period = float(np.median(steps[steps > 0])) if np.any(steps > 0) else 1.0
    width = float(np.median(day.interval))  # bins as long as the intervals, for the eye
    bins = ((t - day.start) // width).astype(np.int64)
    n = int((day.end - day.start) // width) + 1
    counts = np.maximum(np.bincount(bins, minlength=n), 1)

    def binned(values):
        return np.bincount(bins, weights=np.nan_to_num(values), minlength=n) / counts

    day.truth_t = day.start + width * np.arange(n)
    day.truth = {a: binned(table.appliances[a][keep]) for a in APPLIANCES if a in table.appliances}
    day.truth_total = binned(table.power[keep])
    day.truth_wh = {a: float(np.nansum(table.appliances[a][keep]) * period / 3600) for a in day.truth}


# One colour each, told apart at a glance (tab10's without its grey, which is "other"'s, and navy
# and gold): HeatPump and Television were two blues of tab20.
COLORS = dict(zip(APPLIANCES, ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#17becf", "#9467bd", "#8c564b",
                               "#e377c2", "#bcbd22", "#000080", "#ffd700")))
OTHER_COLOR = "#c8c8c8"


def _clock(ts: float, tz) -> str:
    return datetime.fromtimestamp(ts, tz).strftime("%H:%M")


def _run_line(e: dict, tz) -> str:
    end = _clock(e["end"], tz) if e["end"] is not None else "(still on)"
    return (f"{_clock(e['start'], tz)}-{end}  {e['appliance']}  {e['duration_s'] / 60:.0f} min  "
            f"{e['energy_wh']:.0f} Wh  peak {e['peak_w']:.0f} W")


def require_matplotlib():
    """matplotlib with the Agg backend, or NilmdError naming the extra (asked first, before Redis)."""
    try:
        import matplotlib
    except ImportError:
        raise NilmdError("nilmd report needs matplotlib, which is not installed: "
                         "pip install 'nilmd[report]' (the report extra)") from None
    matplotlib.use("Agg")  # no display on a server; set before pyplot loads
    return matplotlib


def render(day: Day) -> bytes:
    """The PNG (SIZE_IN x DPI pixels)."""
    require_matplotlib()
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    tz = days.zone(day.timezone)
    colors = COLORS
    when = lambda ts: [datetime.fromtimestamp(x, tz) for x in ts]  # noqa: E731
    fig = plt.figure(figsize=SIZE_IN, dpi=DPI)
    grid = fig.add_gridspec(4, 2, height_ratios=[3, 3, 1.8, 3.2], hspace=0.45, wspace=0.35)
    est = fig.add_subplot(grid[0, :] if day.truth is not None else grid[0:2, :])
    axes = [est]
    starts = day.ends - day.interval  # each interval drawn over the seconds it covers
    span = day.shown()
    zone = f"{day.timezone}, UTC{datetime.fromtimestamp(span[0], tz).strftime('%z')}"

    def axis(ax):
        ax.set_xlim(*when(span))
        locator = mdates.AutoDateLocator(tz=tz, minticks=4, maxticks=12)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=tz))
        ax.set_xlabel(f"time ({zone})", fontsize=9)

    def stack(ax, t, series, total, other, title):
        names = [a for a in APPLIANCES if a in series]
        t_end = np.append(t, t[-1] + (t[-1] - t[-2] if len(t) > 1 else 60.0))  # the last interval drawn whole
        pad = lambda v: np.append(v, v[-1])  # noqa: E731  (step="post" draws up to the next point)
        layers = [pad(series[a]) for a in names] + ([pad(other)] if other is not None else [])
        labels = names + (["other (the meter less the appliances)"] if other is not None else [])
        ax.stackplot(when(t_end), layers, labels=labels, step="post", alpha=0.9,
                     colors=[colors[a] for a in names] + ([OTHER_COLOR] if other is not None else []))
        ax.step(when(t_end), pad(total), where="post", color="black", lw=0.8, label="meter")
        ax.set_title(title, loc="left", fontsize=11)
        ax.set_ylabel("W")
        axis(ax)
        ax.set_ylim(bottom=0)

    power, other, scale = day.drawn()
    scaled = scale < 0.999
    title = "estimate: the meter, and each appliance stacked under it"
    stack(est, starts, power, day.total, other, title)
    if day.always_on is not None and np.isfinite(day.always_on).any():
        est.step(when(np.append(starts, day.ends[-1])), np.append(day.always_on, day.always_on[-1]), where="post",
                 color="black", ls="--", lw=1.0, label=f"always on (now {np.nanmax(day.always_on[-1:]):.0f} W)")
    handles, labels = est.get_legend_handles_labels()
    note = (f"estimates scaled down to the meter in {int(scaled.sum())} of {len(scale)} intervals "
            f"(at most by {100 * (1 - scale.min()):.0f} %)" if scaled.any() else "the estimates never exceed the meter")
    handles.append(plt.Line2D([], [], color="none"))
    labels.append(note)
    est.legend(handles, labels, loc="upper left", fontsize=8, ncol=5, framealpha=0.85)
    est.set_ylim(0, max(float(np.max(day.total, initial=0.0)), 1.0) * 1.3)  # room for the legend above the data
    if day.truth is not None:
        truth = fig.add_subplot(grid[1, :], sharex=est, sharey=est)
        stack(truth, day.truth_t, day.truth, day.truth_total, None, "truth (--truth): the meter and appliances")
        axes.append(truth)

    line = fig.add_subplot(grid[2, :], sharex=est)
    rows = [a for a in APPLIANCES if any(e["appliance"] == a for e in day.runs)]
    for e in day.runs:
        end = e["end"] if e["end"] is not None else day.ends[-1]
        s, f = when([max(e["start"], day.start), min(end, day.end)])
        line.barh(rows.index(e["appliance"]), f - s, left=s, color=colors[e["appliance"]], height=0.7)
    line.set_yticks(range(len(rows)), rows, fontsize=8)
    line.set_ylim(-0.5, max(len(rows), 1) - 0.5)
    line.invert_yaxis()
    line.set_title(f"runs ({len(day.runs)})", loc="left", fontsize=11)
    axis(line)

    bar = fig.add_subplot(grid[3, 0])
    names = list(day.power)
    wh = day.energy_wh()
    y = np.arange(len(names))
    if day.truth_wh is not None:
        bar.barh(y - 0.2, [wh[a] / 1000 for a in names], 0.4, color=[colors[a] for a in names], label="estimate")
        bar.barh(y + 0.2, [day.truth_wh.get(a, 0.0) / 1000 for a in names], 0.4, color="lightgrey",
                 edgecolor="grey", label="truth")
        bar.legend(fontsize=8)
    else:
        bar.barh(y, [wh[a] / 1000 for a in names], color=[colors[a] for a in names])
    bar.set_yticks(y, names, fontsize=8)
    bar.invert_yaxis()
    bar.set_xlabel("kWh")
    other_wh = float(np.sum(other * day.interval) / 3600)
    bar.set_title(f"energy per appliance (meter {day.total_wh() / 1000:.2f} kWh, other {other_wh / 1000:.2f} kWh)",
                  loc="left", fontsize=11)

    text = fig.add_subplot(grid[3, 1])
    text.axis("off")
    listed = [_run_line(e, tz) for e in day.runs[:LISTED_RUNS]]
    if len(day.runs) > LISTED_RUNS:
        listed.append(f"... and {len(day.runs) - LISTED_RUNS} more (nilmd report --html lists them all)")
    text.text(0, 1, "\n".join(listed) or "no runs", va="top", family="monospace", fontsize=7.5)
    text.set_title("the runs", loc="left", fontsize=11)

    fig.suptitle(f"{day.building}, {day.day} ({day.timezone}): {len(day.ends)} predictions", fontsize=14, y=0.985)
    fig.subplots_adjust(top=0.94, bottom=0.04, left=0.08, right=0.97)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=DPI)
    plt.close(fig)
    return out.getvalue()


def to_html(day: Day, png: bytes) -> str:
    """One self-contained page: the picture inlined, and its numbers as tables."""
    tz = days.zone(day.timezone)
    esc = html.escape
    wh = day.energy_wh()
    head = "<tr><th>appliance</th><th>estimate (Wh)</th>" + ("<th>truth (Wh)</th>" if day.truth_wh else "") + "</tr>"
    energy = "".join(
        f"<tr><td>{esc(a)}</td><td>{wh[a]:.1f}</td>"
        + (f"<td>{day.truth_wh[a]:.1f}</td>" if day.truth_wh and a in day.truth_wh else "<td></td>" * bool(day.truth_wh))
        + "</tr>" for a in wh)
    runs = "".join(
        f"<tr><td>{esc(e['appliance'])}</td><td>{_clock(e['start'], tz)}</td>"
        f"<td>{_clock(e['end'], tz) if e['end'] is not None else 'still on'}</td><td>{e['duration_s'] / 60:.1f}</td>"
        f"<td>{e['energy_wh']:.1f}</td><td>{e['peak_w']:.0f}</td><td>{e['mean_probability']:.3f}</td></tr>"
        for e in day.runs)
    title = esc(f"nilmd report: {day.building}, {day.day} ({day.timezone})")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} td:first-child{{text-align:left}}</style></head>
<body><h1>{title}</h1>
<p>{len(day.ends)} predictions; aggregate {day.total_wh():.1f} Wh.</p>
<img alt="the day" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<h2>Energy per appliance</h2><table>{head}{energy}</table>
<h2>Runs</h2><table><tr><th>appliance</th><th>start</th><th>end</th><th>minutes</th><th>Wh</th><th>peak W</th>
<th>mean probability</th></tr>{runs}</table>
</body></html>
"""
