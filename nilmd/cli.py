"""`nilmd` command line: run, produce, watch, status, check, report, export; history, label and adapt in
nilmd.cli_house (docs/CONTRACT.md §5).

Every error a user can cause ends in one line, `nilmd: error: ...`, and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from nilmd import __version__, buildings, config, keys
from nilmd import log as logmod
from nilmd import cli_house
from nilmd.cliutil import command, connect, fail, names, one_building, positive
from nilmd.settingsdoc import SECTIONS
from nilmd.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, ConfigError, NilmdError, redis_error


def cmd_run(args) -> int:
    cfg = config.resolve(args)
    logmod.setup("supervisor", cfg.building_id, cfg.log_level)
    from nilmd.daemon.supervisor import Supervisor

    return Supervisor(cfg).run()


def cmd_produce(args) -> int:
    from nilmd import producer

    cfg = config.resolve(args, names=names("common", "redis"))
    logmod.setup("producer", cfg.building_id, cfg.log_level)
    if args.source == "simulation":
        start = producer.default_start(args.speed, args.count) if args.start is None else args.start
        samples = producer.simulated_samples(args.seed, start, args.count, args.fields)
        rebase = None
    else:
        samples = list(producer.csv_samples(str(producer.csv_path(args.source))))
        span = producer.time_span(samples, args.count)  # a 1-minute file moves 60 s a row, not 1
        start = producer.default_start(args.speed, args.count, span=span) if args.start is None else args.start
        rebase = None if args.timestamps == "file" else start
    client, redisconn = connect(cfg, "producer")
    try:
        t0 = time.monotonic()
        sent = producer.produce(client, cfg.building_id, samples, args.speed, rebase=rebase, count=args.count,
                                to=args.to, maxlen=args.maxlen)
    except redisconn.ERRORS as e:
        return fail(f"Redis at {redisconn.describe(cfg)}: {redis_error(e)[1]}", EXIT_ERROR)
    except KeyboardInterrupt:
        return EXIT_OK
    where = {"pubsub": [keys.input_channel(cfg.building_id)], "stream": [keys.input_stream(cfg.building_id)]}
    where["both"] = where["pubsub"] + where["stream"]
    print(f"published {sent} samples to {' and '.join(where[args.to])} in {time.monotonic() - t0:.1f} s",
          file=sys.stderr)
    return EXIT_OK


def _format_prediction(p: dict) -> str:
    on = [f"{e['appliance']} {e['power_watts']:.0f} W" for e in p["predictions"] if e["is_on"]]
    when = time.strftime("%H:%M:%S", time.localtime(p["window_end"]))
    return f"{when}  total {p['total_power']:7.0f} W  ({p['inference_time_ms']:.1f} ms)  on: {', '.join(on) or '-'}"


def cmd_watch(args) -> int:
    cfg = config.resolve(args, names=names("common", "redis"))
    client, redisconn = connect(cfg, "watch")
    seen = 0
    try:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(keys.predictions_channel(cfg.building_id))
        while args.count is None or seen < args.count:
            msg = pubsub.get_message(timeout=1.0)
            if msg is None:
                continue
            seen += 1
            if args.json:
                print(msg["data"].decode() if isinstance(msg["data"], bytes) else msg["data"], flush=True)
            else:
                try:
                    print(_format_prediction(json.loads(msg["data"])), flush=True)
                except (ValueError, KeyError, TypeError):
                    print(f"(unreadable prediction: {msg['data'][:80]!r})", flush=True)
    except redisconn.ERRORS as e:
        return fail(f"Redis at {redisconn.describe(cfg)}: {redis_error(e)[1]}", EXIT_ERROR)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_status(args) -> int:
    from nilmd.daemon import sharing, status

    cfg = config.resolve(args, names=names("common", "redis", "list"))
    client, redisconn = connect(cfg, "status")
    one = one_building(args)
    if cfg.building_ids and not one:  # a list daemon: its summary and a line per building
        try:
            ids = buildings.listed(cfg)
            # instances sharing the list (leases): every live one, and who holds each building
            live = [] if args.host else sharing.live_names(client)
            instances = [args.host] if args.host else live or [sharing.instance_name(cfg)]
            holders = sharing.holder_names(client, ids) if live else None
            pipe = client.pipeline(transaction=False)
            for name in instances:
                pipe.hgetall(keys.daemon_status_key(name))
            for b in ids:
                pipe.hgetall(keys.status_key(b))
            raws = [{k.decode(): v.decode() for k, v in raw.items()} for raw in pipe.execute()]
        except redisconn.ERRORS as e:
            return _unreadable(args, cfg, redisconn, e)
        daemons, each = dict(zip(instances, raws)), dict(zip(ids, raws[len(instances):]))
        code, text = status.render_list(daemons, each, holders=holders)
        if args.json:
            out = {"daemon": status.typed(daemons[instances[0]]), "buildings": {b: status.typed(f) for b, f in each.items()},
                   "exit_code": code}
            if holders is not None:
                out.update(instances={n: status.typed(d) for n, d in daemons.items()}, holders=holders)
            print(json.dumps(out, indent=2))
        else:
            print(text)
        return code
    try:
        raw = client.hgetall(keys.status_key(cfg.building_id))
    except redisconn.ERRORS as e:
        return _unreadable(args, cfg, redisconn, e)
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    code, verdict = status.judge(fields)
    if args.json:
        print(json.dumps({"verdict": verdict, "exit_code": code, **status.typed(fields)}, indent=2))
    else:
        print(status.render(fields))
    return code


def _unreadable(args, cfg, redisconn, error) -> int:
    """Redis cannot be read: UNKNOWN, as one line, or with --json as JSON (a monitoring check
    that parses it must not get plain text)."""
    from nilmd.daemon import status

    verdict = f"cannot read the status from Redis at {redisconn.describe(cfg)}: {redis_error(error)[1]}"
    if args.json:
        print(json.dumps({"verdict": verdict, "exit_code": status.UNKNOWN}, indent=2))
    else:
        print(f"nilmd: UNKNOWN: {verdict}")
    return status.UNKNOWN


def cmd_report(args) -> int:
    from nilmd import days, report

    cfg = config.resolve(args, names=names("common", "redis"))
    day = args.day or days.yesterday(days.zone(cfg.timezone))
    try:
        start, _ = days.bounds(day, days.zone(cfg.timezone))
    except ValueError:
        return fail(f"--day: {day!r} is not a date (YYYY-MM-DD)")
    except OverflowError:  # 9999-12-31: its next midnight is past what a date holds
        return fail(f"--day: {day} is too late a date: nilmd has no predictions there")
    if start < 0:  # the history's entry ids count milliseconds from 1970: Redis would refuse the range
        return fail(f"--day: {day} is before 1970-01-01: nilmd has no predictions there")
    report.require_matplotlib()
    client, redisconn = connect(cfg, "report")
    try:
        data = report.read_day(client, cfg.building_id, day, cfg.timezone)
    except redisconn.ERRORS as e:
        return fail(f"Redis at {redisconn.describe(cfg)}: {redis_error(e)[1]}", EXIT_ERROR)
    if args.truth:
        report.add_truth(data, args.truth)
    png = report.render(data)
    out = args.out or f"nilmd-{cfg.building_id}-{day}.png"
    written = [out]
    try:
        with open(out, "wb") as f:
            f.write(png)
        if args.html:
            with open(args.html, "w", encoding="utf-8") as f:
                f.write(report.to_html(data, png))
            written.append(args.html)
    except OSError as e:
        return fail(f"cannot write {e.filename}: {e.strerror}", EXIT_ERROR)
    print(f"wrote {' and '.join(written)}: {day}, {len(data.ends)} predictions, {len(data.runs)} runs", file=sys.stderr)
    return EXIT_OK


def cmd_check(args) -> int:
    """Like `nginx -t`: configuration, checkpoints and Redis, one line each; 0 if all good."""
    ok = True
    try:
        cfg = config.resolve(args)
    except ConfigError as e:
        print(f"config       FAIL  {e}")
        return EXIT_ERROR
    shown = {k: v for k, v in cfg.public().items() if v not in ("", None)}
    print("config       ok    " + " ".join(f"{k}={v}" for k, v in shown.items()))
    from nilmd.appliances import APPLIANCES
    from nilmd.models import adapted, backends

    if backends.installed("torch"):
        from nilmd.models import checkpoints

        loaded, errors = checkpoints.load_dir(cfg.model_dir)
        for appliance in APPLIANCES:
            if appliance in loaded:
                c = loaded[appliance]
                f1 = c.metrics.get("f1")
                extra = f", validation F1 {f1:.3f}" if isinstance(f1, (int, float)) else ""
                print(f"checkpoint   ok    {appliance}: {c.path} ({sum(t.numel() for t in c.state_dict.values())} parameters{extra})")
            else:
                print(f"checkpoint   FAIL  {appliance}: {errors[appliance]}")
        ok &= not errors
    else:
        print("checkpoint   skip  torch is not installed: the ONNX export's hashes stand for the checkpoints")
        loaded = None
    # Each building's adapted models (nilmd.models.adapted): a refused one is a warning, since the
    # shipped model serves for it, not a failure.
    served = buildings.listed(cfg)
    for usable, line in backends.check_adapted(cfg, served, loaded):
        print(f"adapted      {'ok  ' if usable else 'WARN'}  {line}")
    print(f"adapted      ok    {sum(adapted.folder(cfg.state_dir, b).exists() for b in served)} of "
          f"{len(served)} buildings have adapted models ({os.path.join(cfg.state_dir, adapted.MODELS)})")
    try:
        choice = backends.choose(cfg)
        if choice.fallback:
            print(f"backend      WARN  {choice.backend}: {choice.fallback}")
        else:
            print(f"backend      ok    {choice.backend} ({choice.reason})")
        if choice.backend == backends.ONNX:  # the building's adapted set needs its own export
            why = backends.building_export(cfg, choice)[2]
            if why:
                print(f"backend      WARN  building {cfg.building_id}: {why}: " + (
                    "torch serves its adapted set" if backends.installed("torch") else "the shipped set serves"))
    except NilmdError as e:
        print(f"backend      FAIL  {e}")
        ok = False
    if cfg.mode == "test":
        print("redis        skip  --mode test needs no Redis")
    else:
        client, redisconn = connect(cfg, "check")
        try:
            t0 = time.perf_counter()
            client.ping()
            print(f"redis        ok    {redisconn.describe(cfg)} answered in {(time.perf_counter() - t0) * 1000:.1f} ms")
        except redisconn.ERRORS as e:  # unreachable, a wrong password, a missing permission: one line
            print(f"redis        FAIL  {redisconn.describe(cfg)}: {redis_error(e)[1]}")
            ok = False
    return EXIT_OK if ok else EXIT_ERROR


def cmd_export(args) -> int:
    """The checkpoints of MODEL_DIR as ONNX files beside them (docs/OPERATIONS.md, "Backends")."""
    cfg = config.resolve(args)
    try:
        from nilmd.models import onnx_export
    except ImportError as e:
        return fail(f"nilmd export needs torch and onnx, and {e.name} is not installed (pip install onnx; torch: "
                     "docs/OPERATIONS.md, Install): export on a machine that has them and copy the files", EXIT_ERROR)
    manifest, diff = onnx_export.export_checked(cfg.model_dir, cfg.inference_interval)
    for g in manifest["groups"]:
        names = [manifest["appliances"][k] for k in g["rows"]]
        files = ", ".join(gr["file"] for gr in g["graphs"])  # one per step size
        print(f"exported     {files}: {len(names)} models of {g['channels']} channels, depth {g['depth']} "
              f"({', '.join(names)})")
    print(f"exported     {onnx_export.MANIFEST} in {cfg.model_dir}; ONNX Runtime against torch on a test window: "
          f"largest difference {diff:.2g}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nilmd", description="Real-time NILM daemon: which appliances are on, "
                                     "from a whole-house meter, over Redis.")
    parser.add_argument("--version", action="version", version=f"nilmd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = command(sub, "run", "run the daemon (the supervisor and its processes)", """\
Run the daemon: read the building's meter from Redis, keep the newest samples in a shared-memory
ring and publish a prediction every INFERENCE_INTERVAL seconds (docs/CONTRACT.md). Every flag
has an environment variable (in brackets); a flag wins. With --mode test: a simulated house, no
Redis, predictions on stdout.""")
    config.add_arguments(run, ("common", "redis", "list", "fleet", "daemon"), SECTIONS)
    run.set_defaults(func=cmd_run)

    check = command(sub, "check", "check configuration, checkpoints and Redis, like nginx -t", """\
Check what `nilmd run` would use, one line each: the settings, the checkpoints, the backend that
would serve them, and Redis. Exit 0 when all is well, 1 otherwise.""")
    config.add_arguments(check, ("common", "redis", "list", "fleet", "daemon"), SECTIONS)
    check.set_defaults(func=cmd_check)

    export = command(sub, "export", "write MODEL_DIR's checkpoints as ONNX files beside them (needs torch, onnx)", """\
Write MODEL_DIR's checkpoints as ONNX files beside them, checked against torch on a test window,
for the ONNX Runtime backend (the default where the export matches). Needs torch and onnx:
pip install 'nilmd[export]'.""")
    config.add_arguments(export, ("common", "daemon"), SECTIONS)
    export.set_defaults(func=cmd_export)

    status = command(sub, "status", "show the daemon's status; exit 0 ok, 1 warning, 2 critical, 3 unknown", """\
Show the daemon's status hash (nilm:BUILDING:status) and judge it as a monitoring plugin does:
exit 0 running, 1 warning (degraded, warming up), 2 critical (dead, stopped), 3 unknown (no
status, Redis unreachable). With BUILDING_IDS: the daemon's summary and a line per building.""")
    config.add_arguments(status, ("common", "redis", "list"), SECTIONS)
    status.add_argument("--json", action="store_true", help="print the status as JSON, numbers as numbers "
                        "(also when Redis cannot be read)")
    status.add_argument("--host", default=None, metavar="NAME", help="with --building-ids: the instance whose "
                        "daemon hash to read (nilm:nilmd:NAME:status; default: every live instance sharing the list, "
                        "else this one)")
    status.set_defaults(func=cmd_status)

    watch = command(sub, "watch", "print predictions as they arrive", """\
Print the building's predictions as the daemon publishes them: one line each (the appliances
that are on), or the JSON of each with --json.""")
    config.add_arguments(watch, ("common", "redis"), SECTIONS)
    watch.add_argument("--json", action="store_true", help="print each prediction's JSON")
    watch.add_argument("--count", type=int, default=None, metavar="N", help="stop after N predictions")
    watch.set_defaults(func=cmd_watch)

    report = command(sub, "report", "draw a building's day: power, energy and runs (PNG, --html)", """\
Draw one building's day from what the daemon keeps in Redis (the predictions and events
streams): the meter and each appliance's estimate, the always-on load and "other", the runs and
the energy per appliance. Needs matplotlib: pip install 'nilmd[report]'.""")
    config.add_arguments(report, ("common", "redis"), SECTIONS)
    report.add_argument("--day", default=None, metavar="YYYY-MM-DD", help="the local day (default: yesterday)")
    report.add_argument("--out", default=None, metavar="FILE", help="the PNG (default: nilmd-BUILDING-DAY.png here)")
    report.add_argument("--html", default=None, metavar="FILE",
                        help="also one self-contained HTML page (the PNG inlined, tables)")
    report.add_argument("--truth", default=None, metavar="CSV", help="a CSV of true appliance power to draw beside "
                        "the estimate (the layout nilmd produce and training read)")
    report.set_defaults(func=cmd_report)

    cli_house.add_parsers(sub)

    produce = command(sub, "produce", "publish meter samples: simulated, or replayed from a CSV file", """\
Publish meter samples to the building's input, as a meter would: a simulated house, or a CSV file
replayed (its times shifted to now unless --timestamps file).""")
    config.add_arguments(produce, ("common", "redis"), SECTIONS)
    produce.add_argument("--source", default="simulation", metavar="SOURCE",
                         help="'simulation' or a CSV file (.csv or .csv.gz) (default simulation)")
    produce.add_argument("--speed", type=positive, default=1.0, metavar="FACTOR",
                         help="samples' seconds per real second (default 1)")
    produce.add_argument("--count", type=int, default=None, metavar="N",
                         help="stop after N samples (default: never / end of file)")
    produce.add_argument("--start", type=float, default=None, metavar="EPOCH",
                         help="epoch of the first sample (default: now, or --count seconds ago when --speed > 1)")
    produce.add_argument("--fields", choices=("full", "power"), default="full",
                         help="simulation: all meter fields, or timestamp and power_total only (default full)")
    produce.add_argument("--seed", type=int, default=1, metavar="N", help="simulation: which simulated house (default 1)")
    produce.add_argument("--timestamps", choices=("now", "file"), default="now",
                         help="CSV: shift the file's times to start at --start, or keep them (default now)")
    produce.add_argument("--to", choices=("pubsub", "stream", "both"), default="pubsub",
                         help="PUBLISH on the input channel (default), XADD to the input stream (for "
                         "--input-mode stream: durable), or both")
    produce.add_argument("--maxlen", type=int, default=None, metavar="N",
                         help="stream: keep about this many entries (default 86400, a day at 1 Hz)")
    produce.set_defaults(func=cmd_produce)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, NilmdError) as e:
        return fail(str(e), EXIT_USAGE if isinstance(e, ConfigError) else EXIT_ERROR)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `nilmd watch | head`
        return EXIT_OK
