"""`scripts/evaluate.py`: score checkpoints the way the daemon runs them (features.derive +
Predictor.run + make_prediction's served power), and print the model card's tables.

  python scripts/evaluate.py                                   # simulated TEST houses, full and power-only
  python scripts/evaluate.py --no-sim --real DATA              # every real house in DATA, every appliance it has
  python scripts/evaluate.py --no-sim --real DATA \\
      --fold REFIT_House2=runs/fold-REFIT/ckpt --fold UKDALE_House2=runs/fold-UKDALE/ckpt   # cross-house
  python scripts/evaluate.py --no-sim --synth-test DATA        # tracebase test devices on GJW test days
  python scripts/evaluate.py --json runs/eval.json --check-windows 6

Real houses (DATA laid out as nilmd/training/realdata.py says) are scored per house and per
resolution (8 s, 6 s, 1 min: each file held to 1 Hz, as the daemon's gap rule holds a slow
meter's readings), power_total only, per second: each second is scored with the state the daemon
publishes for the interval that holds it (--interval, default 60; --interval 1 scores each
second's own output). Samples whose receptive field holds a gap are not scored. `--fold
HOUSE=DIR` scores HOUSE with the checkpoints of DIR (trained with HOUSE left out) where DIR has
one for the appliance, else with --checkpoints; each table names the files it used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nilmd.appliances import APPLIANCES, ON_THRESHOLD_W
from nilmd.models import checkpoints
from nilmd.models.predictor import Predictor
from nilmd.training import datasets, evaluation, realdata

COLUMNS = (("f1", "F1"), ("precision", "precision"), ("recall", "recall"), ("mae_w", "MAE W"), ("sae", "SAE"),
           ("kwh_per_day_true", "kWh/day true"), ("kwh_per_day_pred", "kWh/day est."), ("on_fraction", "on share"))
ROOT = Path(__file__).resolve().parents[2]


def markdown(title: str, results: dict, note: str = "") -> str:
    lines = [f"### {title}", ""] + ([note, ""] if note else [])
    lines.append("| appliance | on ≥ W | " + " | ".join(c[1] for c in COLUMNS) + " |")
    lines.append("|---|---:|" + "---:|" * len(COLUMNS))
    for a, r in results.items():
        cells = []
        for key, _ in COLUMNS:
            v = r.get(key, float("nan"))
            cells.append("–" if v is None or (isinstance(v, float) and math.isnan(v)) else
                         (f"{v:.1f}" if key == "mae_w" else f"{v:.2f}" if key.startswith("kwh") else f"{v:.3f}"))
        lines.append(f"| {a} | {ON_THRESHOLD_W[a]:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def simulated_test(args) -> tuple[list, list]:
    from nilmd.sim.simulator import HOUSE_SEEDS_TEST
    seeds = list(HOUSE_SEEDS_TEST)[:args.test_houses]
    return datasets.simulated_set(seeds, args.test_segments, args.test_days), seeds


def check_windows(predictor, series, hours: int) -> float:
    """Largest |windows - stream| difference (W and probability) on the first `hours` of a series."""
    feats = series.features[: hours * 3600]
    pw, qw, cw = evaluation.predict_windows(predictor, feats)
    ps, qs, cs = evaluation.predict_stream(predictor, feats)
    assert np.all(cs[cw]), "stream must cover every sample the daemon predicts"
    return float(max(np.abs(pw - ps)[:, cw].max(), np.abs(qw - qs)[:, cw].max()))


def pooled(predictor, series_iter, thresholds, *, interval: int, window: int, aligned: bool = True) -> dict:
    """evaluate() over series read one at a time (a month at 1 Hz is 2.7 M samples), pooled."""
    acc: dict[str, dict[str, list]] = {}
    offset = 0
    for s in series_iter:
        r = evaluation.evaluate(predictor, [s], thresholds, inputs="power", mode="stream", window=window,
                                interval=interval, published=interval > 1, aligned=aligned)
        top = 0
        for a, v in r.items():
            parts = acc.setdefault(a, {k: [] for k in v if k.startswith("_")})
            for k in parts:
                parts[k].append(v[k] + offset if k == "_block" else v[k])
            if "_block" in v and len(v["_block"]):
                top = max(top, int(v["_block"].max()) + 1)
        offset += top
    return {a: evaluation.rescore({k: np.concatenate(x) for k, x in parts.items()}, a, thresholds[a])
            for a, parts in acc.items()}


def load_set(base: str, override: str | None, names) -> tuple[dict, dict]:
    """Checkpoints of `override` (a fold's folder) where it has them, else of `base`."""
    loaded, errors = checkpoints.load_dir(base, names, lookahead_ok=True)
    used = {a: os.path.relpath(c.path) for a, c in loaded.items()}
    if override:
        fold, _ = checkpoints.load_dir(override, names, lookahead_ok=True)
        loaded.update(fold)
        used.update({a: os.path.relpath(c.path) for a, c in fold.items()})
    return loaded, used


def real_houses(args, names, out: dict) -> None:
    folds = dict(f.split("=", 1) for f in args.fold)
    for house, by_period in realdata.house_files(args.real).items():
        if args.houses and house not in args.houses.split(","):
            continue
        loaded, used = load_set(args.checkpoints, folds.get(house), names)
        for period, files in sorted(by_period.items()):
            t = time.time()
            first = datasets.read_csv(files[0])
            have = [a for a in APPLIANCES if a in first.targets and a in loaded]
            if not have:
                continue
            predictor = Predictor({a: loaded[a] for a in have}, device=args.device)
            thresholds = {a: loaded[a].probability_threshold for a in have}
            series = (first if k == 0 else datasets.read_csv(f) for k, f in enumerate(files))
            res = pooled(predictor, series, thresholds, interval=args.interval, window=args.window,
                         aligned=not args.unaligned)
            key = f"real_{house}_{period}s"
            out[key] = {"results": res, "checkpoints": {a: used[a] for a in have}, "files": len(files),
                        "seconds": round(time.time() - t, 1)}
            which = ("trained with this house left out" if folds.get(house) else "as given by --checkpoints")
            res_label = "1 min" if period == 60 else f"{period} s"
            print(markdown(f"Real house {house}, {res_label} held to 1 Hz ({len(files)} files)", res,
                           f"power_total only; each second scored with the state published for its "
                           f"{args.interval}-s interval; checkpoints {which}: "
                           + ", ".join(sorted(set(os.path.dirname(p) or "." for p in used.values()))) + "."),
                  flush=True)


def synth_test(args, names, out: dict) -> None:
    from nilmd.training import mixture
    loaded, used = load_set(args.checkpoints, None, names)
    res: dict[int, dict] = {}
    periods = [int(x) for x in args.synth_hold.split(",")]
    for a in names:
        if a not in loaded:
            continue
        series = mixture.synth_test(a, args.synth_test, Path(args.cache_dir), seed=7)
        if not series:
            continue
        predictor = Predictor({a: loaded[a]}, device=args.device)
        for period in periods:  # the same houses as a meter reporting every `period` s would send them
            held = [dataclasses.replace(s, features=datasets.hold_input(s.features, period, 0)) for s in series]
            res.setdefault(period, {}).update(pooled(predictor, held, {a: loaded[a].probability_threshold},
                                                     interval=args.interval, window=args.window,
                                                     aligned=not args.unaligned))
    out["synth_test"] = {"results": {str(k): v for k, v in res.items()}, "checkpoints": used}
    for period, r in res.items():
        print(markdown(f"Semi-synthetic test houses (tracebase test devices on GJW test days), meter every {period} s",
                       r, f"Real runs of devices never used in training or validation, placed on real 1 Hz days "
                          f"of a house never used as a training background, held as a {period}-s meter would "
                          f"send them; power_total only; {args.interval}-s published states."), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    p.add_argument("--appliances", default="all", help="comma-separated subset (default: every one)")
    p.add_argument("--mode", choices=("windows", "stream"), default="stream")
    p.add_argument("--window", type=int, default=1536)
    p.add_argument("--interval", type=int, default=60)
    p.add_argument("--unaligned", action="store_true",
                   help="score intervals that start wherever the data does, not on the clock (the old schedule)")
    p.add_argument("--test-houses", type=int, default=5)
    p.add_argument("--test-segments", type=int, default=8, help="stretches per house, spread over the year")
    p.add_argument("--test-days", type=float, default=1.0)
    p.add_argument("--no-sim", action="store_true", help="skip the simulated test houses")
    p.add_argument("--real", default=None, help="real-data folder (layout: nilmd/training/realdata.py)")
    p.add_argument("--houses", default="", help="comma-separated subset of the real houses")
    p.add_argument("--fold", action="append", default=[], metavar="HOUSE=DIR",
                   help="score HOUSE with the checkpoints in DIR (trained with HOUSE left out)")
    p.add_argument("--synth-test", default=None, metavar="DATA", help="real-data folder for semi-synthetic test houses")
    p.add_argument("--synth-hold", default="1", metavar="PERIODS", help="meter periods (s) to score the semi-synthetic houses at, e.g. 1,10,60")
    p.add_argument("--cache-dir", default="runs/cache", help="where the parsed tracebase runs are cached")
    p.add_argument("--check-windows", type=int, default=0, metavar="HOURS")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write every number to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    names = APPLIANCES if args.appliances == "all" else [a for a in APPLIANCES if a in args.appliances.split(",")]
    out = {"interval": args.interval, "window": args.window, "aligned": not args.unaligned}
    if not args.no_sim:
        loaded, errors = checkpoints.load_dir(args.checkpoints, names)
        for a, e in errors.items():
            print(f"<!-- {a}: {e} -->", file=sys.stderr)
        if not loaded:
            raise SystemExit(f"no loadable checkpoint in {args.checkpoints}")
        predictor = Predictor(loaded, device=args.device)
        thresholds = {a: c.probability_threshold for a, c in loaded.items()}
        kw = dict(mode=args.mode, window=args.window, interval=args.interval)
        t = time.time()
        test, seeds = simulated_test(args)
        days = args.test_segments * args.test_days
        note = (f"Simulated test houses {seeds} (never used in training or validation), {days:g} days "
                f"each spread over the year; each second's own output (Predictor.run in `{args.mode}` mode).")
        if args.check_windows:
            diff = check_windows(predictor, test[0], args.check_windows)
            out["windows_vs_stream_max_abs_diff"] = diff
            note += f" Literal daemon windows vs stream on {args.check_windows} h: max |Δ| = {diff:.2e}."
        for inputs, label in (("full", "full meter fields"), ("power", "power_total only")):
            res = evaluation.strip_private(evaluation.evaluate(predictor, test, thresholds, inputs=inputs, **kw))
            out[f"sim_{inputs}"] = res
            print(markdown(f"Simulated test houses, {label}", res, note), flush=True)
        out["sim_seconds"] = round(time.time() - t, 1)
    if args.real:
        real_houses(args, names, out)
    if args.synth_test:
        synth_test(args, names, out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
