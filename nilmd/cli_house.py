"""`nilmd history`, `nilmd label` and `nilmd adapt`: what learning a house takes on the command line
(docs/ADAPTATION.md). The parsers are added by nilmd.cli, which runs them."""

from __future__ import annotations

import sys
import time

from nilmd import config, keys
from nilmd.cliutil import command, connect, fail, names, one_building
from nilmd.errors import EXIT_ERROR, EXIT_OK, redis_error
from nilmd.settingsdoc import SECTIONS


def cmd_adapt(args) -> int:
    """Learn one building from its labels (docs/ADAPTATION.md); --reset goes back to the shipped models."""
    from nilmd.models import adapted

    cfg = config.resolve(args, names=names("common", "redis", "daemon"))
    building = cfg.building_id
    if args.reset:
        gone = adapted.reset(cfg.state_dir, building)
        print(f"building {building}: {'adapted models removed' if gone else 'had no adapted models'}; the shipped "
              "models serve it after the daemon reloads (systemctl reload nilmd, or SIGHUP)", file=sys.stderr)
        return EXIT_OK
    from nilmd.models import backends

    if not backends.installed("torch"):
        return fail("nilmd adapt fine-tunes with torch, which is not installed here (pip install torch==2.13.0 "
                     "--index-url https://download.pytorch.org/whl/cpu): docs/ADAPTATION.md, 'Where it runs'",
                     EXIT_ERROR)
    from nilmd import labels
    from nilmd.training import adapt, house

    client = None
    if not args.no_stream and cfg.mode != "test":
        client, redisconn = connect(cfg, "adapt")
        try:
            client.ping()
        except redisconn.ERRORS as e:
            if not args.labels:
                return fail(f"no --labels given and Redis at {redisconn.describe(cfg)} cannot be read for the "
                             f"confirmed runs: {redis_error(e)[1]}", EXIT_ERROR)
            print(f"nilmd adapt: Redis at {redisconn.describe(cfg)} is not reachable ({redis_error(e)[1]}): "
                  "using the label files only", file=sys.stderr)
            client = None
    house.lower_priority()
    labelled = labels.load(cfg.state_dir, building, args.labels or [], client=client, appliances=args.appliances)
    wanted = [a for a in labelled.targets if not args.appliances or a in args.appliances]
    bar = _Bar(len(wanted) * (1 + len(adapt.METHODS)), f"adapting {building}")
    t0 = time.monotonic()
    outcomes = house.learn(cfg, building, labelled, appliances=args.appliances, out_dir=args.out, seed=args.fit_seed,
                           steps=args.steps, progress=bar.update)
    bar.close()
    print(house.table(outcomes))
    kept = [o.appliance for o in outcomes if o.kept]
    where = args.out or adapted.folder(cfg.state_dir, building)
    print(f"{len(kept)} of {len(outcomes)} appliances adapted ({', '.join(kept) or 'none'}) in "
          f"{house.elapsed(t0)}; written to {where}; the daemon serves them after it reloads "
          "(systemctl reload nilmd, or SIGHUP)", file=sys.stderr)
    return EXIT_OK


class _Bar:
    """A progress bar on stderr: tqdm where installed, else a line per step."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self._bar, self._n, self._total, self._desc = None, 0, total, desc

    def update(self) -> None:
        if self._bar is not None:
            self._bar.update(1)
        else:
            self._n += 1
            print(f"{self._desc}: {self._n}/{self._total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
def cmd_history(args) -> int:
    """The input history kept in the state directory (nilmd.history): its days, or one as CSV."""
    import numpy as np

    from nilmd import history

    cfg = config.resolve(args, names=names("common", "daemon"))
    if cfg.building_ids and not one_building(args):
        return fail("--building-id: whose history? (this box serves a list of buildings)")
    b, where = cfg.building_id, history.building_dir(cfg.state_dir, cfg.building_id)
    if args.day is None:
        kept = history.coverage(cfg.state_dir, b)
        if not kept:
            print(f"no input history of {b} in {where} (NILMD_HISTORY_DAYS={cfg.history_days})", file=sys.stderr)
            return EXIT_OK
        print(f"input history of {b} in {where} (UTC days; NILMD_HISTORY_DAYS={cfg.history_days})")
        print(f"{'day':<12}{'recorded':>20}{'size':>12}")
        for d in kept:
            print(f"{d.day:<12}{d.seconds:>9} s ({100.0 * d.seconds / history.DAY_S:5.1f} %){d.bytes / 1000:>9.1f} kB")
        return EXIT_OK
    try:
        start = history.day_start(args.day)
    except ValueError:
        return fail(f"--day: {args.day!r} is not a date (YYYY-MM-DD)")
    if args.day not in history.days(cfg.state_dir, b):
        return fail(f"no input history of {b} on {args.day} in {where} (nilmd history --building-id {b} lists "
                     "the days kept)", EXIT_ERROR)
    rec = history.read(cfg.state_dir, b, start, start + history.DAY_S)
    seen = ~np.isnan(rec.power_total)
    columns = [rec.timestamps[seen].astype(np.int64).astype(str)]
    for name in history.FIELDS:  # float32's shortest exact text ("230.17"), an empty cell where absent
        text = getattr(rec, name)[seen].astype(str)
        columns.append(np.where(text == "nan", "", text))
    lines = ",".join(("timestamp",) + history.FIELDS) + "\n" + "".join(",".join(r) + "\n" for r in zip(*columns))
    if args.out is None:
        sys.stdout.write(lines)
        return EXIT_OK
    try:
        with open(args.out, "w", encoding="ascii") as f:
            f.write(lines)
    except OSError as e:
        return fail(f"cannot write {e.filename}: {e.strerror}", EXIT_ERROR)
    print(f"wrote {args.out}: {b} on {args.day}, {int(seen.sum())} samples", file=sys.stderr)
    return EXIT_OK


def cmd_label(args) -> int:
    """Confirm a run of an appliance (nilm:{b}:labels, docs/ADAPTATION.md "Labels"), list or delete them."""
    from nilmd import confirmed_runs, days

    cfg = config.resolve(args, names=names("common", "redis"))
    tz = days.zone(cfg.timezone)
    given = [a for a in (args.appliance, args.start, args.end) if a is not None]
    if not args.list and not args.delete and len(given) != 3:
        return fail("nilmd label: give APPLIANCE START END, or --list, or --delete ID")
    if given and (args.list or args.delete):
        return fail("nilmd label: APPLIANCE START END, --list and --delete go one at a time")
    if given:
        now = time.time()
        where = f"nilmd label {' '.join(given)}"
        run = confirmed_runs.check_run(args.appliance, confirmed_runs.parse_when(args.start, tz, now),
                                       confirmed_runs.parse_when(args.end, tz, now), where, now)
    client, redisconn = connect(cfg, "label")
    try:
        if args.list:
            for entry_id, f in confirmed_runs.entries(client, cfg.building_id):
                try:
                    start, end = float(f["start"]), float(f["end"])
                    span = (f"{confirmed_runs.when(start, tz)}  {confirmed_runs.when(end, tz)}  "
                            f"{(end - start) / 60:6.1f} min")
                except (KeyError, ValueError):
                    span = f"(not a run: {f})"
                print(f"{entry_id}  {f.get('appliance', '?'):<15} {span}  {f.get('source', '')}")
            return EXIT_OK
        if args.delete:
            gone = confirmed_runs.delete(client, cfg.building_id, args.delete)
            print(f"deleted {gone} of {len(args.delete)} runs from {keys.labels_stream(cfg.building_id)}", file=sys.stderr)
            return EXIT_OK if gone == len(args.delete) else EXIT_ERROR
        entry = confirmed_runs.add(client, cfg.building_id, run)
    except redisconn.ERRORS as e:
        return fail(f"Redis at {redisconn.describe(cfg)}: {redis_error(e)[1]}", EXIT_ERROR)
    print(f"labelled {run.appliance} {confirmed_runs.when(run.start, tz)} to {confirmed_runs.when(run.end, tz)} "
          f"({(run.end - run.start) / 60:.1f} min) as {entry} in {keys.labels_stream(cfg.building_id)}", file=sys.stderr)
    return EXIT_OK


def add_parsers(sub) -> None:
    adapt = command(sub, "adapt", "learn a building from its own labels: adapted models for it only", """\
Learn one building from its own labels (sub-metered files, smart-plug logs, confirmed runs) and
its recorded input history: each labelled appliance is adapted from the shipped model and kept
only where it beats it on held-out days. The daemon serves the result after a reload.
docs/ADAPTATION.md says how it decides and what it writes.""")
    config.add_arguments(adapt, ("common", "redis", "daemon"), SECTIONS)
    adapt.add_argument("--labels", nargs="*", default=[], metavar="FILE",
                       help="label files: sub-metered CSV, a smart plug's log (APPLIANCE=FILE), confirmed runs")
    adapt.add_argument("--appliances", nargs="*", default=None, metavar="APPLIANCE",
                       help="adapt only these (default: every labelled one); earlier adaptations of the others stay")
    adapt.add_argument("--out", default=None, metavar="DIR",
                       help="write here instead of STATE_DIR/models/BUILDING (where the daemon looks)")
    adapt.add_argument("--reset", action="store_true", help="remove the building's adapted models: the shipped "
                       "ones serve it again after a reload")
    adapt.add_argument("--no-stream", action="store_true",
                       help="do not read confirmed runs from the Redis stream nilm:{BUILDING}:labels")
    adapt.add_argument("--fit-seed", type=int, default=0, metavar="N", help="the fine-tuning's random seed (default 0)")
    adapt.add_argument("--steps", type=int, default=None, metavar="N",
                       help="fine-tuning steps per candidate (default 300: about half a CPU-minute each)")
    adapt.set_defaults(func=cmd_adapt)

    hist = command(sub, "history", "the input history kept in the state directory", """\
The input the daemon recorded for a building (NILMD_HISTORY_DAYS days, in the state directory):
the days kept with their coverage, or one UTC day as CSV (--day), the layout nilmd produce and
training read.""")
    config.add_arguments(hist, ("common", "daemon"), SECTIONS)
    hist.add_argument("--day", default=None, metavar="YYYY-MM-DD", help="write this UTC day as CSV: "
                      "timestamp,power_total,voltage,current,power_factor")
    hist.add_argument("--out", default=None, metavar="FILE", help="with --day: the CSV file (default: stdout)")
    hist.set_defaults(func=cmd_history)

    label = command(sub, "label", "confirm that an appliance ran (a label nilmd adapt learns from)", """\
Confirm that an appliance ran from START to END: appended to the Redis stream nilm:{b}:labels,
which nilmd adapt reads. --list prints them, --delete removes one. docs/ADAPTATION.md, "Labels".""")
    config.add_arguments(label, ("common", "redis"), SECTIONS)
    label.add_argument("appliance", nargs="?", help="the appliance (ElectricKettle, or kettle, fridge, ...)")
    label.add_argument("start", nargs="?", help="when it went on: ISO 8601 (2024-05-01T07:30; without an offset: "
                       "the box's time zone, NILMD_TIMEZONE), a clock time today (07:30), or epoch seconds")
    label.add_argument("end", nargs="?", help="when it went off, likewise")
    label.add_argument("--list", action="store_true", help="print the building's confirmed runs")
    label.add_argument("--delete", action="append", metavar="ID", help="delete the run with this entry id (from "
                       "--list); may be repeated")
    label.set_defaults(func=cmd_label)
