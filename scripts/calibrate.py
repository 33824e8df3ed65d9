"""Compare the simulated building with real 1-minute data of two UK homes, and (--tracebase) each
simulated appliance model with the real single appliances it imitates.

    python scripts/calibrate.py --real-1min DIR                      # tables on stdout
    python scripts/calibrate.py --real-1min DIR --tracebase DIR2 --out checkpoints/CALIBRATION.md

Real, public data (not in this repository; the folder layout is in nilmd/training/realdata.py):
* REFIT house 2 (CC BY 4.0, Murray et al., University of Strathclyde) and UK-DALE house 2
  (CC BY 4.0, Kelly & Knottenbelt, Imperial College London), as 1-minute
  means in `{REFIT,UKDALE}_House2_YYYY-MM.csv.gz` (Time, Aggregate, Kettle, ...): --real-1min,
  or the environment variable NILMD_REAL_DATA;
* tracebase (ODbL 1.0, github.com/areinhardt/tracebase): the `tracebase` folder holding
  `{complete,incomplete}/<Kind>/*.csv.gz`, German 230 V appliances on smart plugs at ~1 s.
Simulated: the mean (and min-max) over N training houses, each resampled to 1-minute means
exactly like the real data were, so both sides go through the same run detection below; for
tracebase the same houses at 1 Hz, runs cut by realdata.RUN_RULES on both sides.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nilmd.appliances import APPLIANCES, ON_THRESHOLD_W  # noqa: E402
from nilmd.sim.simulator import HOUSE_SEEDS_TRAIN, Building, draw_house  # noqa: E402
from nilmd.training import calibration, realdata  # noqa: E402

DAY = 86400

# column in the real files -> simulator appliance, and how a "run" is found in 1-minute means:
# (on threshold W, gaps of up to this many off minutes are bridged, shortest run in minutes).
# Long cycles pause (soak, drying) and are bridged so one program counts once.
TARGETS = {
    "Kettle": ("ElectricKettle", 500.0, 0, 1),
    "Microwave": ("Microwave", 200.0, 0, 1),
    "Dishwasher": ("Dishwasher", 10.0, 20, 10),
    "WashingMachine": ("WashingMachine", 20.0, 20, 10),
}
HOUR_BINS = (("night 0-6", 0, 6), ("morning 6-12", 6, 12), ("afternoon 12-18", 12, 18),
             ("evening 18-24", 18, 24))


def load_real(data_dir: str, prefix: str):
    """-> (minute of day array, dict column -> float array); gaps (aggregate 0) become NaN."""
    cols = {}
    times = []
    paths = sorted(glob.glob(os.path.join(data_dir, f"{prefix}_*.csv.gz")))
    if not paths:
        raise SystemExit(f"no {prefix}_*.csv.gz in {data_dir}")
    for path in paths:
        with gzip.open(path, "rt") as f:
            header = f.readline().strip().split(",")
            lines = f.read().split("\n")
        rows = [ln.split(",") for ln in lines if ln]
        times.append(np.array([r[0] for r in rows], dtype="datetime64[m]"))
        for j, name in enumerate(header[1:], start=1):
            cols.setdefault(name, []).append(np.array([r[j] for r in rows], dtype=np.float64))
    t = np.concatenate(times)
    cols = {k: np.concatenate(v) for k, v in cols.items()}
    gap = cols["Aggregate"] <= 0
    for v in cols.values():
        v[gap] = np.nan
    minute_of_day = (t - t.astype("datetime64[D]")).astype(np.int64)
    return minute_of_day, cols


def find_runs(on: np.ndarray, bridge: int, min_len: int):
    """Boolean minutes -> list of (start, end) index pairs of runs, short gaps bridged."""
    idx = np.flatnonzero(np.diff(np.concatenate(([0], on.astype(np.int8), [0]))))
    runs = list(zip(idx[0::2], idx[1::2]))
    merged = []
    for s, e in runs:
        if merged and s - merged[-1][1] <= bridge:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return [(s, e) for s, e in merged if e - s >= min_len]


def stats(minute_of_day: np.ndarray, cols: dict) -> dict:
    """The comparison numbers for one home (real or simulated), keyed by row label."""
    agg = cols["Aggregate"]
    valid = ~np.isnan(agg)
    days = valid.sum() / 1440.0
    out = {
        "aggregate p5 (W)": np.percentile(agg[valid], 5),
        "aggregate median (W)": np.median(agg[valid]),
        "aggregate p95 (W)": np.percentile(agg[valid], 95),
        "aggregate mean (W)": agg[valid].mean(),
        "kWh/day": agg[valid].mean() * 24 / 1000,
    }
    for col, (_, thr, bridge, min_len) in TARGETS.items():
        p = np.nan_to_num(cols[col])
        on = p > thr
        runs = find_runs(on, bridge, min_len)
        lengths = np.array([e - s for s, e in runs], dtype=float)
        starts = np.array([minute_of_day[s] // 60 for s, _ in runs])
        out[f"{col}: power on, median (W)"] = np.median(p[on]) if on.any() else np.nan
        out[f"{col}: power on, p10 (W)"] = np.percentile(p[on], 10) if on.any() else np.nan
        out[f"{col}: power on, p90 (W)"] = np.percentile(p[on], 90) if on.any() else np.nan
        out[f"{col}: run length, median (min)"] = np.median(lengths) if runs else np.nan
        out[f"{col}: runs/day"] = len(runs) / days
        out[f"{col}: kWh/day"] = p.sum() / 60 / 1000 / days
        for label, h0, h1 in HOUR_BINS:
            share = ((starts >= h0) & (starts < h1)).mean() if runs else np.nan
            out[f"{col}: share of runs {label}"] = share
    return out


def as_minutes(tr):
    """A simulated trace as 1-minute means, like the real files."""
    days = len(tr) // DAY
    mean = lambda a: a.astype(np.float64).reshape(-1, 60).mean(axis=1)  # noqa: E731
    cols = {"Aggregate": mean(tr.power_total)}
    for col, (name, *_) in TARGETS.items():
        cols[col] = mean(tr.appliances[name])
    minute_of_day = (np.arange(days * 1440) + int(tr.timestamp[0] // 60)) % 1440
    return minute_of_day, cols


def appliance_summary(tr) -> dict:
    """All 11 simulated appliances at 1 Hz: energy, time on and power while on."""
    days = len(tr) / DAY
    out = {}
    for name, p in tr.appliances.items():
        on = p > ON_THRESHOLD_W[name]
        out[name] = (p.sum() / 3.6e6 / days, on.mean(), p[on].mean() if on.any() else np.nan,
                     np.count_nonzero(np.diff(on.astype(np.int8)) == 1) / days)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--houses", type=int, default=8, help="simulated training houses to average")
    ap.add_argument("--days", type=int, default=14, help="simulated days per house")
    ap.add_argument("--day0", type=int, default=0, help="first house's first day (0 = 1 January)")
    ap.add_argument("--out", help="also write the markdown tables to this file")
    ap.add_argument("--real-1min", default=os.environ.get("NILMD_REAL_DATA"),
                    help="folder of the REFIT / UK-DALE 1-minute files (default: $NILMD_REAL_DATA)")
    ap.add_argument("--tracebase", help="tracebase folder ({complete,incomplete}/<Kind>/): also "
                    "compare each appliance model with the real devices it imitates")
    ap.add_argument("--tracebase-days", type=int, default=6, help="days read per tracebase device")
    args = ap.parse_args(argv)
    if not args.real_1min:
        ap.error("give --real-1min DIR or set NILMD_REAL_DATA (the public data: see the docstring)")

    real = {name: stats(*load_real(args.real_1min, prefix)) for name, prefix in
            (("REFIT h2", "REFIT_House2"), ("UK-DALE h2", "UKDALE_House2"))}
    # the appliances that tracebase has, checked at 1 Hz on the very traces the 1-minute table uses
    per_run = {a: calibration.RunSample() for a in APPLIANCES if a in realdata.TRACEBASE_KINDS.values()}
    # each house starts 46 days after the previous one, so the houses cover the seasons
    sims, summaries = [], []
    for i, seed in enumerate(HOUSE_SEEDS_TRAIN[: args.houses]):
        b = Building(seed)
        tr = b.trace(b.start + (args.day0 + 46 * i) * DAY, args.days * DAY)
        sims.append(stats(*as_minutes(tr)))
        summaries.append(appliance_summary(tr))
        if args.tracebase:
            for name, sample in per_run.items():
                sample.add(f"house {seed}", tr.appliances[name], realdata.RUN_RULES[name],
                           full_days=args.days)

    lines = [
        f"Simulated: mean (min–max) over {args.houses} training houses x {args.days} days "
        f"starting 46 days apart from day {args.day0} (all seasons), resampled to 1-minute means. Runs: 1-minute mean above the "
        "threshold (kettle 500 W, microwave 200 W, dishwasher 10 W, washing machine 20 W; "
        "dishwasher/washing machine pauses up to 20 min bridged, runs under 10 min dropped). "
        "Real aggregate gaps (0 W) are masked.",
        "",
        "| quantity | REFIT h2 | UK-DALE h2 | simulated |",
        "|---|---:|---:|---:|",
    ]
    fmt = lambda v: "–" if np.isnan(v) else (f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}")  # noqa: E731
    for key in real["REFIT h2"]:
        vals = np.array([s[key] for s in sims], dtype=float)
        sim = f"{fmt(np.nanmean(vals))} ({fmt(np.nanmin(vals))}–{fmt(np.nanmax(vals))})" \
            if not np.isnan(vals).all() else "–"
        lines.append(f"| {key} | {fmt(real['REFIT h2'][key])} | {fmt(real['UK-DALE h2'][key])} | {sim} |")
    lines += [
        "",
        "All simulated appliances at 1 Hz, mean (min–max) over the same houses and days; "
        "'on' is above the appliance's ON_THRESHOLD_W, a switch-on is one off-to-on step "
        "(thermostat cycles each count). The real homes have none of the heat pump, dryer, "
        "freezer, oven, computer or television channels, and heat with gas: the simulated "
        "aggregate is higher for that.",
        "",
        "| appliance | kWh/day | time on | W while on | switch-ons/day |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in summaries[0]:
        v = np.array([s[name] for s in summaries], dtype=float)
        cell = lambda j, f: f"{f(np.nanmean(v[:, j]))} ({f(np.nanmin(v[:, j]))}–{f(np.nanmax(v[:, j]))})"  # noqa: E731
        pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
        lines.append(f"| {name} | {cell(0, fmt)} | {cell(1, pct)} | {cell(2, fmt)} | {cell(3, fmt)} |")
    text = "\n".join(lines) + "\n"
    if args.tracebase:
        text += "\n" + tracebase_section(args, per_run)
    print(text)
    if args.out:
        title = "real data" if args.tracebase else "real 1-minute data"
        with open(args.out, "w") as f:
            f.write(f"# Simulator calibration against {title}\n\n"
                    "Generated by `python scripts/calibrate.py "
                    + " ".join(shown_args(argv if argv is not None else sys.argv[1:])) + "`"
                    + (" (`$REAL_1MIN`, `$TRACEBASE`: where the public data lie, see the script's "
                       "docstring)" if args.tracebase else "") + ".\n\n" + text)


def tracebase_section(args, per_run: dict) -> str:
    tb, kinds = calibration.tracebase_samples(args.tracebase, args.tracebase_days)
    # heating elements follow V^2: the share of a UK-vs-German power gap that the mains explains
    resistive = {a for a, p in draw_house(HOUSE_SEEDS_TRAIN[0]).appliances.items() if p.v_exp >= 2.0}
    lines = [
        "## Appliance models against tracebase (1 Hz)",
        "",
        f"Each simulated appliance model against the real tracebase devices it imitates (German "
        f"230 V, smart plugs at ~1 s; at most {args.tracebase_days} days per device, whole days "
        f"first). Simulated: the same {args.houses} houses x {args.days} days at 1 Hz, each "
        "appliance's true power. Runs on both sides by `realdata.runs` with `RUN_RULES` (on at "
        ">= on_w, closer runs merged, shorter dropped); a run cut by a gap or the end of a file "
        "is left out of the per-run rows. Cells: median (p10–p90) over runs; runs/day: pooled "
        "over whole days (tracebase `complete/` days only), p10–p90 over devices / houses; "
        "tracebase's whole days are almost all days on which the device ran, so its runs/day is "
        "a rate per day of use, and 'what differs' compares runs per day used. "
        "Mean power while on: over the run's seconds at or above on_w. The heat pump has no "
        "tracebase kind (nothing real here covers it); Cookingstove stands in for the oven.",
        "",
    ]
    lines += calibration.tracebase_table(tb, kinds, per_run, resistive, "houses")
    return "\n".join(lines) + "\n"


def shown_args(argv: list[str]) -> list[str]:
    """argv with the data folders as placeholders: where they lie is this machine's business."""
    out, hide = [], {"--real-1min": "$REAL_1MIN", "--tracebase": "$TRACEBASE"}
    for i, a in enumerate(argv):
        key = a.split("=", 1)[0]
        if key in hide and "=" in a:
            out.append(f"{key}={hide[key]}")
        elif i and argv[i - 1] in hide:
            out.append(hide[argv[i - 1]])
        else:
            out.append(a)
    return out


if __name__ == "__main__":
    main()
