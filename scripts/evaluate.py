"""Score shipped checkpoints the way the daemon runs them: features.derive + Predictor.run.

  python scripts/evaluate.py                        # simulated TEST houses, full and power-only
  python scripts/evaluate.py --real shared/data/real-1min --real-files 'UKDALE_*'
  python scripts/evaluate.py --json runs/eval.json --check-windows 6

(a) simulated houses never used in training (HOUSE_SEEDS_TEST), with every meter field and with
    power_total only; (b) real 1-minute homes (the shared/data layout or any CSV of the generic
    layout, see nilmd/training/datasets.py), each minute held for 60 samples so that the 1 Hz models can
    run on them: a 1 Hz model scored on 1-minute data, reported apart. Samples whose receptive
    field holds a gap are not scored.

--mode windows runs Predictor.run on a 1536-sample window every 60 s, exactly as the inference
process does; --mode stream runs long overlapping chunks, which gives the same outputs for a
causal model (nilmd/training/evaluation.py) at a 25th of the cost. --check-windows H measures the largest
difference between the two on H hours of a test house, so a table made with --mode stream says
how far it is from the literal daemon path.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nilmd.models import checkpoints
from nilmd.training import datasets, evaluation  # noqa: E402
from nilmd.appliances import APPLIANCES, ON_THRESHOLD_W  # noqa: E402
from nilmd.models.predictor import Predictor  # noqa: E402

COLUMNS = (("f1", "F1"), ("precision", "precision"), ("recall", "recall"), ("mae_w", "MAE W"), ("sae", "SAE"),
           ("estimation_accuracy", "EA"), ("f1_power", "F1 (power ≥ thr.)"), ("on_fraction", "on share"))


def markdown(title: str, results: dict, note: str = "") -> str:
    lines = [f"### {title}", ""] + ([note, ""] if note else [])
    lines.append("| appliance | on ≥ W | " + " | ".join(c[1] for c in COLUMNS) + " |")
    lines.append("|---|---:|" + "---:|" * len(COLUMNS))
    for a, r in results.items():
        cells = []
        for key, _ in COLUMNS:
            v = r.get(key, float("nan"))
            cells.append("–" if v is None or (isinstance(v, float) and math.isnan(v)) else
                         (f"{v:.1f}" if key == "mae_w" else f"{v:.3f}"))
        lines.append(f"| {a} | {ON_THRESHOLD_W[a]:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def simulated_test(args) -> list:
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    p.add_argument("--appliances", default="all", help="comma-separated subset (default: every one)")
    p.add_argument("--mode", choices=("windows", "stream"), default="stream")
    p.add_argument("--window", type=int, default=1536)
    p.add_argument("--interval", type=int, default=60)
    p.add_argument("--test-houses", type=int, default=5)
    p.add_argument("--test-segments", type=int, default=8, help="stretches per house, spread over the year")
    p.add_argument("--test-days", type=float, default=1.0)
    p.add_argument("--no-sim", action="store_true", help="skip the simulated test houses")
    p.add_argument("--real", default=None, help="folder of real CSV files (e.g. shared/data/real-1min)")
    p.add_argument("--real-files", default="*.csv*", help="glob inside --real")
    p.add_argument("--check-windows", type=int, default=0, metavar="HOURS")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write every number to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    names = APPLIANCES if args.appliances == "all" else [a for a in APPLIANCES if a in args.appliances.split(",")]
    loaded, errors = checkpoints.load_dir(args.checkpoints, names)
    for a, e in errors.items():
        print(f"<!-- {a}: {e} -->", file=sys.stderr)
    if not loaded:
        raise SystemExit(f"no loadable checkpoint in {args.checkpoints}")
    predictor = Predictor(loaded, device=args.device)
    thresholds = {a: c.probability_threshold for a, c in loaded.items()}
    kw = dict(mode=args.mode, window=args.window, interval=args.interval)
    out = {"checkpoints": {a: os.path.basename(c.path) for a, c in loaded.items()}, "mode": args.mode,
           "window": args.window, "interval": args.interval, "missing": errors}

    if not args.no_sim:
        t = time.time()
        test, seeds = simulated_test(args)
        days = args.test_segments * args.test_days
        note = (f"Simulated test houses {seeds} (never used in training or validation), {days:g} days "
                f"each spread over the year; Predictor.run in `{args.mode}` mode.")
        if args.check_windows:
            diff = check_windows(predictor, test[0], args.check_windows)
            out["windows_vs_stream_max_abs_diff"] = diff
            note += f" Literal daemon windows vs stream on {args.check_windows} h: max |Δ| = {diff:.2e}."
        for inputs, label in (("full", "full meter fields"), ("power", "power_total only")):
            res = evaluation.strip_private(evaluation.evaluate(predictor, test, thresholds, inputs=inputs, **kw))
            out[f"sim_{inputs}"] = res
            print(markdown(f"Simulated test houses, {label}", res, note))
        out["sim_seconds"] = round(time.time() - t, 1)

    if args.real and not any(datasets.appliance_name(c) in loaded for c in ("Kettle", "Microwave", "Dishwasher",
                                                                          "WashingMachine")):
        print("<!-- no checkpoint for an appliance of the real homes: real data skipped -->", file=sys.stderr)
    elif args.real:
        files = sorted(glob.glob(os.path.join(args.real, args.real_files)))
        real = {datasets.appliance_name(c): loaded[datasets.appliance_name(c)] for c in
                ("Kettle", "Microwave", "Dishwasher", "WashingMachine") if datasets.appliance_name(c) in loaded}
        by_home: dict[str, list] = {}
        for f in files:
            by_home.setdefault(os.path.basename(f).split(".")[0].rsplit("_", 1)[0], []).append(f)  # home_YYYY-MM
        rp = Predictor(real, device=args.device)
        for home, fs in by_home.items():
            t = time.time()
            res = {}
            for f in fs:  # one file at a time: a month at 1 Hz is 2.7 M samples
                r = evaluation.evaluate(rp, [datasets.read_csv(f)], thresholds, inputs="full", **kw)
                for a, v in r.items():
                    acc = res.setdefault(a, {"_power": [], "_prob": [], "_true": []})
                    for k in acc:
                        acc[k].append(v[k])
            res = {a: evaluation.rescore({k: np.concatenate(v) for k, v in acc.items()}, a, thresholds[a])
                   for a, acc in res.items()}
            out[f"real_{home}"] = res
            print(markdown(f"Real home {home}: 1-minute data held at 1 Hz ({len(fs)} monthly files)", res,
                           "A 1 Hz model on 1-minute data (each minute repeated 60 times), power_total only; "
                           "aggregate gaps and the 17 minutes after each are not scored. Not a 1 Hz result."))
            out[f"real_{home}_seconds"] = round(time.time() - t, 1)

    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
