"""`nilmd` command line: run, produce, watch, status, check, report, export (docs/CONTRACT.md §5).

Every error a user can cause ends in one line, `nilmd: error: ...`, and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from nilmd import __version__, config, keys
from nilmd import log as logmod
from nilmd.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, ConfigError, NilmdError, redis_error


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"nilmd: error: {message}", file=sys.stderr)
    return code


def cmd_run(args) -> int:
    cfg = config.resolve(args)
    logmod.setup("supervisor", cfg.building_id, cfg.log_level)
    from nilmd.daemon.supervisor import Supervisor

    return Supervisor(cfg).run()


def _redis(cfg, name: str):
    from nilmd import redisconn

    return redisconn.client(cfg, name=name), redisconn


def cmd_produce(args) -> int:
    from nilmd import producer

    cfg = config.resolve(args, names=_names("common", "redis"))
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
    client, redisconn = _redis(cfg, "producer")
    try:
        t0 = time.monotonic()
        sent = producer.produce(client, cfg.building_id, samples, args.speed, rebase=rebase, count=args.count,
                                to=args.to, maxlen=args.maxlen)
    except redisconn.ERRORS as e:
        return _fail(f"Redis at {redisconn.describe(cfg)}: {redis_error(e)[1]}", EXIT_ERROR)
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
    cfg = config.resolve(args, names=_names("common", "redis"))
    client, redisconn = _redis(cfg, "watch")
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
        return _fail(f"Redis at {redisconn.describe(cfg)}: {redis_error(e)[1]}", EXIT_ERROR)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_status(args) -> int:
    from nilmd.daemon import sharing, status

    cfg = config.resolve(args, names=_names("common", "redis"))
    client, redisconn = _redis(cfg, "status")
    one = args.building_id is not None or bool(os.environ.get("BUILDING_ID"))
    if cfg.building_ids and not one:  # a list daemon: its summary and a line per building
        try:
            ids = config.buildings(cfg)
            # instances sharing the list (leases): every live one, and who holds each building
            live = [] if args.host else sharing.live_names(client)
            names = [args.host] if args.host else live or [sharing.instance_name(cfg)]
            holders = sharing.holder_names(client, ids) if live else None
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(keys.daemon_status_key(name))
            for b in ids:
                pipe.hgetall(keys.status_key(b))
            raws = [{k.decode(): v.decode() for k, v in raw.items()} for raw in pipe.execute()]
        except redisconn.ERRORS as e:
            print(f"nilmd: UNKNOWN: cannot read the status from Redis at {redisconn.describe(cfg)}: "
                  f"{redis_error(e)[1]}")
            return status.UNKNOWN
        daemons, each = dict(zip(names, raws)), dict(zip(ids, raws[len(names):]))
        code, text = status.render_list(daemons, each, holders=holders)
        if args.json:
            out = {"daemon": daemons[names[0]], "buildings": each, "exit_code": code}
            if holders is not None:
                out.update(instances=daemons, holders=holders)
            print(json.dumps(out, indent=2))
        else:
            print(text)
        return code
    try:
        raw = client.hgetall(keys.status_key(cfg.building_id))
    except redisconn.ERRORS as e:
        print(f"nilmd: UNKNOWN: cannot read the status from Redis at {redisconn.describe(cfg)}: {redis_error(e)[1]}")
        return status.UNKNOWN
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    code, verdict = status.judge(fields)
    if args.json:
        print(json.dumps({"verdict": verdict, "exit_code": code, **fields}, indent=2))
    else:
        print(status.render(fields))
    return code


def cmd_report(args) -> int:
    from nilmd import days, report

    cfg = config.resolve(args, names=_names("common", "redis"))
    day = args.day or days.yesterday(days.zone(cfg.timezone))
    try:
        start, _ = days.bounds(day, days.zone(cfg.timezone))
    except ValueError:
        return _fail(f"--day: {day!r} is not a date (YYYY-MM-DD)")
    except OverflowError:  # 9999-12-31: its next midnight is past what a date holds
        return _fail(f"--day: {day} is too late a date: nilmd has no predictions there")
    if start < 0:  # the history's entry ids count milliseconds from 1970: Redis would refuse the range
        return _fail(f"--day: {day} is before 1970-01-01: nilmd has no predictions there")
    report.require_matplotlib()
    client, redisconn = _redis(cfg, "report")
    try:
        data = report.read_day(client, cfg.building_id, day, cfg.timezone)
    except redisconn.ERRORS as e:
        return _fail(f"Redis at {redisconn.describe(cfg)}: {redis_error(e)[1]}", EXIT_ERROR)
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
        return _fail(f"cannot write {e.filename}: {e.strerror}", EXIT_ERROR)
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
    from nilmd.models import backends

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
    try:
        choice = backends.choose(cfg)
        if choice.fallback:
            print(f"backend      WARN  {choice.backend}: {choice.fallback}")
        else:
            print(f"backend      ok    {choice.backend} ({choice.reason})")
    except NilmdError as e:
        print(f"backend      FAIL  {e}")
        ok = False
    if cfg.mode == "test":
        print("redis        skip  --mode test needs no Redis")
    else:
        client, redisconn = _redis(cfg, "check")
        try:
            t0 = time.perf_counter()
            client.ping()
            print(f"redis        ok    {redisconn.describe(cfg)} answered in {(time.perf_counter() - t0) * 1000:.1f} ms")
        except redisconn.ERRORS as e:  # unreachable, a wrong password, a missing permission: one line
            print(f"redis        FAIL  {redisconn.describe(cfg)}: {redis_error(e)[1]}")
            ok = False
    return EXIT_OK if ok else EXIT_ERROR


def cmd_export(args) -> int:
    """The checkpoints of MODEL_DIR as ONNX files beside them (README, "Backends")."""
    cfg = config.resolve(args)
    try:
        from nilmd.models import onnx_export
    except ImportError as e:
        return _fail(f"nilmd export needs torch and onnx, and {e.name} is not installed (pip install onnx; torch: "
                     "README, Install): export on a machine that has them and copy the files", EXIT_ERROR)
    manifest, diff = onnx_export.export_checked(cfg.model_dir, cfg.inference_interval)
    for g in manifest["groups"]:
        names = [manifest["appliances"][k] for k in g["rows"]]
        files = ", ".join(gr["file"] for gr in g["graphs"])  # one per step size
        print(f"exported     {files}: {len(names)} models of {g['channels']} channels, depth {g['depth']} "
              f"({', '.join(names)})")
    print(f"exported     {onnx_export.MANIFEST} in {cfg.model_dir}; ONNX Runtime against torch on a test window: "
          f"largest difference {diff:.2g}")
    return EXIT_OK


def _names(*groups) -> set[str]:
    return {s.name for s in config.SETTINGS if s.group in groups}


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nilmd", description="Real-time NILM daemon: which appliances are on, "
                                     "from a whole-house meter, over Redis.")
    parser.add_argument("--version", action="version", version=f"nilmd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run the daemon (the supervisor and its processes)")
    config.add_arguments(run, ("common", "redis", "daemon"))
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="check configuration, checkpoints and Redis, like nginx -t")
    config.add_arguments(check, ("common", "redis", "daemon"))
    check.set_defaults(func=cmd_check)

    export = sub.add_parser("export", help="write MODEL_DIR's checkpoints as ONNX files beside them, for "
                            "NILMD_BACKEND=onnxruntime (needs torch and onnx)")
    config.add_arguments(export, ("common", "daemon"))
    export.set_defaults(func=cmd_export)

    status = sub.add_parser("status", help="show the daemon's status hash; exit 0 ok, 1 warning, 2 critical, 3 unknown")
    config.add_arguments(status, ("common", "redis"))
    status.add_argument("--json", action="store_true", help="print the hash as JSON")
    status.add_argument("--host", default=None, help="with --building-ids: the instance whose daemon hash to read "
                        "(nilm:nilmd:NAME:status; default: every live instance sharing the list, else this one)")
    status.set_defaults(func=cmd_status)

    watch = sub.add_parser("watch", help="print predictions as they arrive")
    config.add_arguments(watch, ("common", "redis"))
    watch.add_argument("--json", action="store_true", help="print each prediction's JSON")
    watch.add_argument("--count", type=int, default=None, help="stop after N predictions")
    watch.set_defaults(func=cmd_watch)

    report = sub.add_parser("report", help="draw a building's day: power, energy and runs (PNG, --html)")
    config.add_arguments(report, ("common", "redis"))
    report.add_argument("--day", default=None, help="the local day, YYYY-MM-DD (default: yesterday)")
    report.add_argument("--out", default=None, help="the PNG (default: nilmd-BUILDING-DAY.png here)")
    report.add_argument("--html", default=None, help="also one self-contained HTML page (the PNG inlined, tables)")
    report.add_argument("--truth", default=None, help="a CSV of true appliance power to draw beside the estimate "
                        "(the layout nilmd produce and training read)")
    report.set_defaults(func=cmd_report)

    produce = sub.add_parser("produce", help="publish meter samples: simulated, or replayed from a CSV file")
    config.add_arguments(produce, ("common", "redis"))
    produce.add_argument("--source", default="simulation", help="'simulation' or a CSV file (.csv or .csv.gz)")
    produce.add_argument("--speed", type=_positive, default=1.0, help="samples' seconds per real second (default 1)")
    produce.add_argument("--count", type=int, default=None, help="stop after N samples (default: never / end of file)")
    produce.add_argument("--start", type=float, default=None,
                         help="epoch of the first sample (default: now, or --count seconds ago when --speed > 1)")
    produce.add_argument("--fields", choices=("full", "power"), default="full",
                         help="simulation: all meter fields, or timestamp and power_total only")
    produce.add_argument("--seed", type=int, default=1, help="simulation: which simulated house")
    produce.add_argument("--timestamps", choices=("now", "file"), default="now",
                         help="CSV: shift the file's times to start at --start, or keep them")
    produce.add_argument("--to", choices=("pubsub", "stream", "both"), default="pubsub",
                         help="PUBLISH on the input channel (default), XADD to the input stream (for "
                         "--input-mode stream: durable), or both")
    produce.add_argument("--maxlen", type=int, default=None,
                         help="stream: keep about this many entries (default 86400, a day at 1 Hz)")
    produce.set_defaults(func=cmd_produce)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, NilmdError) as e:
        return _fail(str(e), EXIT_USAGE if isinstance(e, ConfigError) else EXIT_ERROR)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `nilmd watch | head`
        return EXIT_OK
