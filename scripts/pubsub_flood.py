"""How fast one building can flood its pub/sub channel before another building loses a sample
(issue 23, defect 4). A private redis-server with its default `client-output-buffer-limit pubsub`
(32mb 8mb 60), `nilmd run` with a list of four buildings in pub/sub mode, three of them fed at 1 Hz
while the fourth is flooded at each rate for --seconds; per rate: the messages the flood got out,
the subscription cuts Redis made (`input_disconnects_output_buffer`) and the 1-Hz samples the
three others received against those sent, and how often the flood was shed (unsubscribed for
NILMD_FLOOD_COOLOFF, here --cooloff) and how much of it the reader read at all.

    python scripts/pubsub_flood.py --rates 2000 5000 10000 20000 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nilmd import keys  # noqa: E402
from nilmd.testing import DaemonProcess, RedisServer, flood, free_port, status, wait_for  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=int, nargs="+", default=[2000, 5000, 10000, 20000])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--cooloff", type=float, default=5.0, help="NILMD_FLOOD_COOLOFF: a shed flood is subscribed "
                    "again after it (short, so that each rate starts subscribed)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nilmd-flood-"))
    server = RedisServer(free_port(), work).start()
    client = server.client()
    flooded, quiet = "flood", ["quiet-1", "quiet-2", "quiet-3"]
    env = {"REDIS_PORT": str(server.port), "BUILDING_IDS": ",".join([flooded, *quiet]), "NILMD_RUNTIME_DIR": str(work),
           "NILMD_STATE_DIR": str(work / "state"), "NILMD_RING_CAPACITY": "3072", "NILMD_INPUT_TIMEOUT": "600",
           "NILMD_STATUS_INTERVAL": "0.5", "MODEL_DIR": str(ROOT / "checkpoints"),
           "NILMD_FLOOD_COOLOFF": str(args.cooloff)}
    d = DaemonProcess(flooded, work / "daemon.log", {**os.environ, **env}).start()
    rows = []
    try:
        wait_for(lambda: all(status(client, b).get("input_connected") == "1" for b in quiet), 120,
                 f"the daemon to subscribe\n{d.log()[-2000:]}")
        ts = time.time() - 10 ** 6
        for rate in args.rates:
            wait_for(lambda: client.pubsub_numsub(keys.input_channel(flooded))[0][1] == 1, args.cooloff + 30,
                     "the flooded building to be subscribed again")
            before = {b: int(status(client, b).get("samples_received", 0)) for b in quiet}
            cuts0 = int(status(client, flooded).get("input_disconnects_output_buffer", 0))
            read0 = int(status(client, flooded).get("samples_received", 0))
            sheds0 = d.log().count("unsubscribed for")
            out = multiprocessing.Queue()
            p = multiprocessing.Process(target=flood, args=(server.port, flooded, rate, args.seconds, out))
            p.start()
            sent, t0 = 0, time.monotonic()
            while p.is_alive() or sent < args.seconds:  # the three quiet ones at 1 Hz meanwhile
                ts += 1
                for b in quiet:
                    client.publish(keys.input_channel(b), json.dumps({"timestamp": ts, "power_total": 300.0}))
                sent += 1
                time.sleep(max(0.0, t0 + sent - time.monotonic()))
            flooded_out = out.get()
            p.join()
            # the reader drains what Redis still holds for it: until the flooded count stands still
            last, still = -1, time.monotonic()
            while time.monotonic() - still < 2.0:
                now = int(status(client, flooded).get("samples_received", 0))
                if now != last:
                    last, still = now, time.monotonic()
                time.sleep(0.5)
            got = {b: int(status(client, b).get("samples_received", 0)) - before[b] for b in quiet}
            cuts = int(status(client, flooded).get("input_disconnects_output_buffer", 0)) - cuts0
            row = {"rate": rate, "flood_sent": flooded_out, "flood_rate": round(flooded_out / args.seconds),
                   "flood_read": last - read0, "sheds": d.log().count("unsubscribed for") - sheds0,
                   "cuts": cuts, "quiet_sent": sent, "quiet_lost": {b: sent - got[b] for b in quiet}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        d.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
