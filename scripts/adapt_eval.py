"""How much learning a house helps, on the real houses: the model card's adaptation table.

For each real house and resolution, the model that never saw the house (checkpoints/folds/
without-<house>: the shipped recipe with that house left out, i.e. the shipped model as a new house
meets it) is adapted by `nilmd.training.adapt` on the first 1, 3 or 7 days of the house's labels and
scored on later days that neither adaptation nor its decision saw, each second by its published
60-s state. Label forms: `submetered` (the sub-meter's watts) and `runs` (only each run's start
and end, its power learned from the aggregate's steps by nilmd.labels, as `nilmd adapt` does).

    python scripts/adapt_eval.py --real-dir DATA --out runs/adapt-eval.jsonl [--seeds 0 1] [--only REFIT_8s]

One JSON line per (house, days, form, seed, appliance), appended as each finishes, so an interrupted
run keeps what it did and `--resume` skips what is there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nilmd.errors import LabelError  # noqa: E402
from nilmd.models import checkpoints  # noqa: E402
from nilmd.models.onnx_backend import sha256  # noqa: E402
from nilmd.training import adapt  # noqa: E402
from nilmd.training.datasets import Series, read_csv  # noqa: E402

DAY = adapt.DAY
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# house/resolution -> (files, fold, label days tried, first scored day, scored days)
HOUSES = {
    "REFIT_8s": (["real-8s/REFIT_House2_8s_2014-04-19.csv.gz", "real-8s/REFIT_House2_8s_2014-04-26.csv.gz"],
                 "REFIT_House2", (1, 3, 7), 7, 7),
    "REFIT_1min": (["real-1min/REFIT_House2_2014-03.csv.gz"], "REFIT_House2", (1, 3, 7), 7, 7),
    "UKDALE_1min": (["real-1min/UKDALE_House2_2013-07.csv.gz"], "UKDALE_House2", (1, 3, 7), 7, 7),
    # Two days three months apart: a day of labels, the other day scored.
    "UKDALE_6s": (["real-6s/UKDALE_House2_6s_2013-06-15.csv.gz", "real-6s/UKDALE_House2_6s_2013-09-01.csv.gz"],
                  "UKDALE_House2", (1,), None, 1),
}


def stretch(paths: list[str]) -> Series:
    """Files of one house on one 1 Hz grid from the first midnight (UTC) on; between them, gaps."""
    parts = [read_csv(p) for p in paths]
    t0 = int(parts[0].info["start"]) // DAY * DAY
    end = max(int(p.info["start"]) + len(p) for p in parts)
    n = end - t0
    feats = np.zeros((n, parts[0].features.shape[1]), np.float32)
    valid = np.zeros(n, bool)
    names = set.intersection(*(set(p.targets) for p in parts))
    targets = {a: np.zeros(n, np.float32) for a in names}
    for p in parts:
        o = int(p.info["start"]) - t0
        feats[o:o + len(p)] = p.features
        valid[o:o + len(p)] = p.valid
        for a in names:
            targets[a][o:o + len(p)] = p.targets[a]
    return Series(name=os.path.basename(paths[0]), features=feats, targets=targets, valid=valid,
                  period_s=parts[0].period_s, info={"start": float(t0)})


def days(s: Series, first: int, count: int) -> Series:
    sl = slice(first * DAY, (first + count) * DAY)
    return Series(name=f"{s.name} days {first}-{first + count}", features=s.features[sl],
                  targets={a: y[sl] for a, y in s.targets.items()}, valid=s.valid[sl], period_s=s.period_s,
                  info={"start": s.info["start"] + first * DAY})


def as_runs(s: Series, appliance: str, work: str) -> np.ndarray:
    """What confirmed runs give, through the product's own path: the house's aggregate recorded as
    the daemon records it (nilmd.history), a runs file of each sub-metered run's start and end, and
    nilmd.labels.load, which learns each run's power from the aggregate's steps. NaN: unlabelled."""
    from nilmd import history, labels

    _, min_on, min_off = adapt.RUN_RULES[appliance]
    y = np.where(s.valid, s.targets[appliance], 0.0)
    spans = adapt.runs(y, (adapt.ON_THRESHOLD_W[appliance], min_on, min_off))
    t0 = int(s.info["start"])
    state = os.path.join(work, "state")
    shutil.rmtree(state, ignore_errors=True)
    seen = np.flatnonzero(s.valid)
    values = np.full((4, len(seen)), np.nan, np.float32)
    values[0] = s.features[seen, 0]
    history.append(state, "house", 1, t0 + seen, values)
    path = os.path.join(work, "runs.csv")
    with open(path, "w") as f:
        f.write("appliance,start,end\n" + "".join(f"{appliance},{t0 + a},{t0 + b}\n" for a, b in spans))
    got = labels.load(state, "house", [path], timezone="UTC")
    out = np.full(len(s), np.nan, np.float32)
    o = got.t0 - t0
    out[max(o, 0):o + len(got)] = got.targets[appliance][max(-o, 0):len(s) - o]
    return out


TARGETS = {"ElectricKettle": 0.91, "Refrigerator": 0.83, "Dishwasher": 0.76, "WashingMachine": 0.75, "Microwave": 0.60}


def table(paths: list[str]) -> str:
    """The model card's tables (markdown) from the JSON lines of one or more runs: per house and
    appliance, the F1 on the later days of the shipped model and of what is served after adapting on
    1, 3 or 7 days, each seed's figure; `*` where the adapted model was kept, `refused` where the
    labels were (nilmd adapt would have said why), `-` where the appliance ran too rarely to adapt."""
    latest: dict = {}  # a later file's case replaces an earlier file's (a re-run after a change)
    for r in (json.loads(line) for p in paths for line in open(p)):
        latest[(r["house"], r["label_days"], r["form"], r["seed"], r["appliance"])] = r
    rows = list(latest.values())
    by: dict = {}
    for r in rows:
        by.setdefault((r["form"], r["house"], r["appliance"]), {}).setdefault(r["label_days"], []).append(r)
    shipped_f1 = {(r["house"], r["appliance"]): f"{r['later_shipped']['f1']:.2f}" for r in rows if "later_shipped" in r}
    out = []
    for form in ("submetered", "runs"):
        out += [f"\n**Labels: {form}** (F1 on the later days, each seed; `*` kept, `-` ran too rarely, "
                "energy error after the 7-day adaptation)\n",
                "| house, resolution | appliance | shipped | 1 day | 3 days | 7 days | daily energy error, shipped -> 7 days |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for (f, house, a), per_days in sorted(by.items()):
            if f != form:
                continue
            shipped, cells, energy = shipped_f1.get((house, a), ""), [], ""
            for d in (1, 3, 7):
                rs = sorted(per_days.get(d, []), key=lambda r: r["seed"])
                if not rs:
                    cells.append("")
                    continue
                parts = []
                for r in rs:
                    if "refused" in r:  # an empty runs file (nothing ran) is "too rarely", not refused
                        parts.append("-" if "no labels for building" in r["refused"] else "refused")
                        continue
                    tried = bool(r["heldout_candidates"])
                    parts.append(f"{r['later_served']['f1']:.2f}{'*' if r['kept'] else ''}" if tried else "-")
                    if d == 7 or (house == "UKDALE_6s" and d == 1):
                        energy = f"{r['later_shipped']['energy_error']:.0%} -> {r['later_served']['energy_error']:.0%}"
                cells.append(" / ".join(parts))
            out.append(f"| {house} | {a} | {shipped} | " + " | ".join(cells) + f" | {energy} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real-dir")
    ap.add_argument("--out")
    ap.add_argument("--table", nargs="*", metavar="JSONL", help="print the model card's tables from these results")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--only", nargs="*", default=list(HOUSES))
    ap.add_argument("--days", type=int, nargs="*", default=[1, 3, 7])
    ap.add_argument("--forms", nargs="*", default=["submetered", "runs"])
    ap.add_argument("--appliances", nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=adapt.AdaptConfig.steps)
    ap.add_argument("--lr-all", type=float, default=adapt.AdaptConfig.lr_all)
    ap.add_argument("--refit", action="store_true", help="serve the kept recipe trained again on all the labels")
    ap.add_argument("--tag", default="", help="a name for this variant in the output (hyper-parameter pilots)")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    if not (args.real_dir and args.out):
        ap.error("--real-dir and --out are needed to run (or --table to print)")
    import torch

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="adapt-eval-")
    done = set()
    if args.resume and os.path.exists(args.out):
        for line in open(args.out):
            r = json.loads(line)
            done.add((r.get("tag", ""), r["house"], r["label_days"], r["form"], r["seed"], r["appliance"]))
    for house in args.only:
        files, fold, tried, first_scored, n_scored = HOUSES[house]
        data = stretch([os.path.join(args.real_dir, f) for f in files])
        fold_dir = os.path.join(ROOT, "checkpoints", "folds", f"without-{fold}")
        if first_scored is None:  # two separate days: the first labels, the second scored
            second = int(read_csv(os.path.join(args.real_dir, files[1])).info["start"]) - int(data.info["start"])
            first_scored = second // DAY
        scored = days(data, first_scored, n_scored)
        for n_days in [d for d in tried if d in args.days]:
            labelled = days(data, 0, n_days)
            for form in args.forms:
                for seed in args.seeds:
                    for a in sorted(labelled.targets):
                        if args.appliances and a not in args.appliances:
                            continue
                        key = (args.tag, house, n_days, form, seed, a)
                        if key in done:
                            continue
                        path = os.path.join(fold_dir, checkpoints.checkpoint_filename(a))
                        ckpt = checkpoints.load(path, a)
                        try:
                            target = labelled.targets[a] if form == "submetered" else as_runs(labelled, a, work)
                        except LabelError as e:  # what nilmd adapt would have refused: recorded, not scored
                            with open(args.out, "a") as f:
                                f.write(json.dumps({"tag": args.tag, "house": house, "label_days": n_days, "form": form,
                                                    "seed": seed, "appliance": a, "refused": str(e)}) + "\n")
                            print(f"{house} {n_days}d {form} s{seed} {a}: labels refused: {e}", flush=True)
                            continue
                        s = adapt.appliance_series(a, int(labelled.info["start"]), labelled.features,
                                                   labelled.valid, target, labelled.period_s)
                        cfg = adapt.AdaptConfig(seed=seed, steps=args.steps, lr_all=args.lr_all, refit=args.refit)
                        t = time.time()
                        out = adapt.adapt_appliance(ckpt, s, cfg, base_sha256=sha256(path))
                        served = out.checkpoint or ckpt
                        score_cfg = adapt.AdaptConfig(seed=seed)
                        on_w = adapt.ON_THRESHOLD_W[a]  # the published figures' "on", whatever the house's
                        shipped_later = adapt.score(ckpt, scored, score_cfg, on_w=on_w)
                        served_later = adapt.score(served, scored, score_cfg, on_w=on_w) if out.kept else shipped_later
                        # Every candidate on the later days too: what the decision rule chose against.
                        later_cands = {m: adapt.score(c, scored, score_cfg, on_w=on_w).row()
                                       for m, c in out.made.items()}
                        row = {
                            "tag": args.tag, "house": house, "label_days": n_days, "form": form, "seed": seed, "appliance": a,
                            "runs_fit": out.runs_fit, "runs_heldout": out.runs_heldout,
                            "runs_scored": adapt.count_runs(scored, a),
                            "heldout_shipped": out.shipped.row() if out.shipped else None,
                            "heldout_candidates": {m: c.row() for m, c in out.candidates.items()},
                            "method": out.method, "kept": out.kept, "why": out.why,
                            "later_shipped": shipped_later.row(), "later_served": served_later.row(),
                            "later_candidates": later_cands, "lr_all": cfg.lr_all, "steps": cfg.steps,
                            "refit": out.refitted is not None,
                            "cpu_s": round(out.seconds, 1), "wall_s": round(time.time() - t, 1),
                        }
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(f"{house} {n_days}d {form} s{seed} {a}: runs {out.runs_fit}/{out.runs_heldout} "
                              f"{out.method or '-'} kept={out.kept} ({out.why}); later F1 "
                              f"{shipped_later.f1:.3f} -> {served_later.f1:.3f}, energy err "
                              f"{shipped_later.energy_error:.2f} -> {served_later.energy_error:.2f} "
                              f"[{row['wall_s']} s]", flush=True)


if __name__ == "__main__":
    main()
