"""Inference process: every INFERENCE_INTERVAL new seconds, the newest window through every
appliance model, and the prediction out to Redis (or stdout in test mode).

Windows are taken on a fixed schedule of ring indices (end = previous end + interval), so the
number of predictions is exactly what the data implies; the first of an unbroken run is the
first full window whose newest sample closes an interval of the clock (nilmd.schedule). The
last end is kept in the control block, so a restarted inference process carries on the same
schedule instead of starting over.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import numpy as np

from nilmd.daemon import control as ctlmod
from nilmd import keys, schedule
from nilmd.appliances import APPLIANCES
from nilmd.backoff import Backoff
from nilmd.config import Config
from nilmd.daemon.ledger import PENDING_MAX, Ledger
from nilmd.errors import EXIT_BOOT_ERROR, EXIT_OK, NilmdError, redis_error
from nilmd.daemon.worker import Worker

POLL_S = 0.01  # how often to look for new samples: ~0.1 % of a core, <= 10 ms added latency


class RedisPublisher:
    """SET latest, the inference's status fields and the ledger's parts, and PUBLISH the
    prediction, in one pipeline."""

    def __init__(self, cfg: Config, logger, throttle, ctl):
        from nilmd import redisconn

        self.redisconn = redisconn
        self.client = redisconn.client(cfg, name="inference", socket_timeout=2.0)
        self.errors = redisconn.ERRORS  # every Redis error, a refusal (OOM, NOPERM) too
        self.b = cfg.building_id
        self.log, self.throttle, self.ctl = logger, throttle, ctl
        self.ledger = Ledger(cfg)  # energy, events and history: one script beside the prediction

    def publish(self, prediction: dict) -> bool:
        text = json.dumps(prediction, separators=(",", ":"))
        counted = False
        try:
            counted = self._ledger_ready()
            pipe = self.client.pipeline(transaction=False)
            pipe.set(keys.latest_key(self.b), text)
            pipe.hset(keys.status_key(self.b), mapping={
                "last_inference_ts": prediction["timestamp"],
                "last_inference_ms": prediction["inference_time_ms"],
                "last_window_end": prediction["window_end"],
            })
            if counted:
                self.ledger.queue(pipe, prediction, text)
            # PUBLISH last: Redis runs it once it has read the whole pipeline, so its reply leaves
            # with the message itself; first, a connection cut after the message went out but
            # before the rest was read would make this prediction go out again. And a
            # subscriber that reads `latest` on the message finds this one.
            self.redisconn.publish(pipe, keys.predictions_channel(self.b), text)
            replies = pipe.execute(raise_on_error=False)
        except self.errors as e:
            replies = e  # nothing is known to have been done: for the ledger, each part failed
        if isinstance(replies, Exception):
            published, stored, parts = replies, [], replies
        else:
            published, stored, parts = replies[-1], replies[:2], replies[2:-1]
        if counted:
            error, dropped = self.ledger.settle(parts)
            if error is not None and not isinstance(published, Exception):  # else one line says it
                self._failed(error, "could not count a prediction's energy and events yet (tried again with the "
                             "next one)", "ledger")
            for part in dropped:
                self.log.error("gave up counting the %s of the interval ending %s: Redis did not take it while "
                               "%d later parts waited", part.kind, part.window_end, PENDING_MAX)
        if isinstance(published, Exception):
            # The caller keeps the prediction and tries again (InferenceWorker.serve).
            self._failed(published, "could not publish a prediction")
            return False
        refused = [r for r in stored if isinstance(r, Exception)]
        if refused:
            # Out of memory or a missing SET/HSET permission: the prediction is on the channel
            # already, so it is not sent again (that would deliver it twice); `latest` is stale.
            self._failed(refused[0], "published a prediction but could not store it (latest, status)")
        return True

    def _ledger_ready(self) -> bool:
        """The run tracker's state is known (read from Redis if need be); False: not counting now."""
        if self.ledger.state is None:
            try:
                self.ledger.load(self.client)
            except self.errors as e:
                if redis_error(e)[0] == "unreachable":
                    raise  # the prediction cannot go out either: it is held and tried again, counted then
                self._failed(e, "could not read the run tracker's state (energy and events of this interval are "
                             "not counted)", "ledger")
                return False
        return True

    def _failed(self, error: Exception, what: str, topic: str = "publish") -> None:
        self.ctl.add("inference_redis_errors")
        kind, line = redis_error(error, script=Ledger.COMMANDS)
        self.throttle.log(f"{topic} {kind}", logging.ERROR, f"{what}: {line}")


class StdoutPublisher:
    """`--mode test`: one JSON line per prediction, with the simulator's truth beside it."""

    def __init__(self, cfg: Config):
        from nilmd.sim.simulator import Building

        self.building = Building(cfg.seed)
        self.interval = cfg.inference_interval

    def publish(self, prediction: dict) -> bool:
        n = self.interval
        trace = self.building.trace(prediction["window_end"] - n + 1, n)
        prediction["truth"] = {
            name: round(float(np.mean(trace.appliances[name])), 2) for name in APPLIANCES
        }
        try:
            sys.stdout.write(json.dumps(prediction, separators=(",", ":")) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # `nilmd run --mode test | head`: whoever read the predictions is gone, and with it the
            # point of test mode. Stop the whole daemon as SIGTERM does (exit 0), not crash five times.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            logging.getLogger("nilmd.inference").info("stdout was closed by its reader: ending test mode")
            os.kill(os.getppid(), signal.SIGTERM)
            return False
        return True


class InferenceWorker(Worker):
    role = "inference"

    def __init__(self, cfg: Config, paths: dict):
        super().__init__(cfg, paths)
        self.predictor = None
        self.reload_seen = self.ctl["reload_requested"]

    # -- models ----------------------------------------------------------------------------------
    def _load_set(self):
        from nilmd.models import backends

        got = backends.load(self.cfg)  # NILMD_BACKEND: torch or ONNX Runtime (nilmd.models.backends)
        if got.choice.fallback:
            self.log.warning("%s", got.choice.fallback)
        return got.predictor.appliances if got.predictor else [], got.errors, got.predictor

    def load(self) -> None:
        """First load. Raises NilmdError if nothing at all can be served."""
        self.ctl["inference_state"] = ctlmod.INFER_LOADING
        self.beat()
        loaded, errors, predictor = self._load_set()
        for appliance, message in errors.items():
            self.log.error("%s: not served: %s", appliance, message, extra={"NILMD_APPLIANCE": appliance})
        if predictor is None:
            raise NilmdError(f"no usable checkpoint in {os.path.abspath(self.cfg.model_dir)}: nothing to serve")
        self._install(predictor)
        self.ctl["reload_done"] = self.reload_seen  # a fresh load answers any reload asked before it
        self.log.info("models loaded: %d of %d (%s) on %s with %s", len(loaded), len(APPLIANCES),
                      ", ".join(predictor.appliances), predictor.device, predictor.backend)

    def reload(self) -> None:
        """SIGHUP: load the new set beside the old one; swap only if it is whole."""
        self.ctl["inference_state"] = ctlmod.INFER_RELOADING
        serving = set(self.predictor.appliances)
        try:
            loaded, errors, predictor = self._load_set()
            # A file that exists but fails, or a served model whose file vanished, spoils the set.
            bad = {a: e for a, e in errors.items() if a in serving or not e.endswith("file not found")}
            if bad or predictor is None:
                raise NilmdError("; ".join(bad.values()) or "no usable checkpoint")
        except Exception as e:  # anything at all: the old models keep serving
            self.ctl.add("reload_failed")
            self.log.error("reload failed, still serving the previous models: %s", e)
        else:
            self._install(predictor)
            self.log.info("reloaded: %d models (%s) with %s", len(loaded), ", ".join(predictor.appliances),
                          predictor.backend)
        self.ctl["inference_state"] = ctlmod.INFER_READY
        self.ctl["reload_done"] = self.reload_seen

    def _install(self, predictor) -> None:
        self.predictor = predictor
        self.ctl["models_loaded"] = len(predictor.appliances)
        self.ctl["models_mask"] = sum(1 << APPLIANCES.index(a) for a in predictor.appliances)
        self.ctl["device_cuda"] = 1.0 if predictor.device.type == "cuda" else 0.0
        self.ctl["backend_onnx"] = 1.0 if predictor.backend == "onnxruntime" else 0.0
        self.ctl["inference_state"] = ctlmod.INFER_READY

    # -- schedule --------------------------------------------------------------------------------
    def next_end(self) -> int | None:
        """Ring index one past the newest sample of the next window to run, or None."""
        head, segment = self.ring.counters()
        size, step = self.cfg.window_size, self.cfg.inference_interval
        if head - segment < size:
            return None
        last = int(self.ctl["last_window_end"])  # 0: none yet in this daemon's life
        history = int(self.ctl["history_end"])  # warm restart: an earlier run predicted windows up to here
        if history > last:  # keep its schedule (or start one) at the newest window it already predicted
            last = last + (history - last) // step * step if last >= segment + size else history
        if last < segment + size or last > head:  # first window of this unbroken run of data
            end = self._aligned(segment + size, step, later=True)
        else:
            end = last + step
        if head - end > self.ring.capacity - size - step:  # fell a ring behind: skip to the newest
            self.throttle.log("behind", logging.WARNING, "inference fell behind the meter; skipping to the newest window")
            end = self._aligned(head, step, later=False)
        return end if end <= head else None

    def _aligned(self, end: int, step: int, later: bool) -> int:
        """The nearest end at or after (later) or at or before `end` whose newest sample closes
        an interval of the clock. Within an unbroken run the ring's seconds are consecutive."""
        newest = self.ring.window(1, end)
        if newest is None:  # the run broke meanwhile: the next call starts from its new segment
            return end
        wait = schedule.wait_to_align(float(newest.ts[-1]), step)
        return end + wait if later else end - (step - wait) % step

    def infer(self, end: int) -> dict | None:
        from nilmd.models.prediction import make_prediction

        size, n = self.cfg.window_size, self.cfg.inference_interval
        window = self.ring.window(size, end)
        if window is None:
            return None
        t0 = time.perf_counter()
        power, prob = self.predictor.step(window, n)  # only the new samples when it can (nilmd.models.predictor)
        ms = (time.perf_counter() - t0) * 1000.0
        aggregate = window.features[-n:, 0].copy()
        window_end = float(window.ts[-1])
        intact = self.ring.intact(window)
        del window  # drop the views into shared memory before anything else can happen
        if not intact:
            self.predictor.reset()  # its state may hold overwritten samples: recompute next time
            self.ctl.add("overruns")
            self.throttle.log("overrun", logging.WARNING, "the meter overwrote a window while it was read; skipped")
            return None
        return make_prediction(self.predictor.appliances, power[:, -n:], prob[:, -n:],
                               self.predictor.probability_thresholds, aggregate, timestamp=time.time(),
                               window_start=window_end - size, window_end=window_end, inference_ms=ms)

    # -- the process -----------------------------------------------------------------------------
    @classmethod
    def prepare_process(cls, cfg: Config) -> None:
        # OpenMP threads that spin while they wait take the core from the thread they wait for when
        # anything else runs on a small box: measured on 2 busy cores, 2 spinning threads made a 1-s
        # step 240 ms instead of 0.5 ms. Read by the OpenMP runtime when torch loads; a set value wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # torch is imported (and its threads set) by the first load that serves with it
        # (nilmd.models.backends): a box that serves with ONNX Runtime never imports it.

    def run(self) -> int:
        try:
            self.load()
            if self.cfg.mode == "test":
                publisher = StdoutPublisher(self.cfg)
            else:
                publisher = RedisPublisher(self.cfg, self.log, self.throttle, self.ctl)
        except (NilmdError, RuntimeError) as e:
            self.log.critical("cannot start: %s", e)
            return EXIT_BOOT_ERROR
        return self.serve(publisher)

    # -- the loop --------------------------------------------------------------------------------
    def serve(self, publisher) -> int:
        """Predict the schedule's windows in order. A prediction Redis does not take is held and
        tried again with backoff, and the schedule waits on it: `last_window_end` moves only once
        a window's prediction is out, so none is lost while Redis is away, and an inference process
        that dies meanwhile leaves its successor the same window to make again (the ring holds it)."""
        ctl = self.ctl
        backoff = Backoff()
        held, retry_at = None, 0.0  # (end, prediction) not yet published; when to try it again
        while self.alive:
            self.beat()
            if ctl["reload_requested"] != self.reload_seen:
                self.reload_seen = ctl["reload_requested"]
                self.reload()
            if held is None:
                end = self.next_end()
                if end is None:
                    time.sleep(POLL_S)
                    continue
                prediction = self.infer(end)
                if prediction is None:  # overrun: skipped, nothing to publish
                    ctl["last_window_end"] = end
                    continue
                held = (end, prediction)
            elif time.monotonic() < retry_at:
                time.sleep(POLL_S)
                self.throttle.flush()
                continue
            end, prediction = held
            if publisher.publish(prediction):
                held = None
                ctl["last_window_end"] = end
                ctl["predictions_pending"] = 0
                ctl.add("inferences")
                ctl["last_inference_ts"] = prediction["timestamp"]
                ctl["last_inference_ms"] = prediction["inference_time_ms"]
                ctl.observe_latency(prediction["inference_time_ms"] / 1000.0)
                if backoff.failures:
                    self.log.info("published the held prediction (window ending %s) after %d failed attempts; "
                                  "catching up", prediction["window_end"], backoff.failures)
                    backoff.reset()
            else:
                ctl["predictions_pending"] = 1
                retry_at = time.monotonic() + backoff.next_delay()
            self.throttle.flush()
        return EXIT_OK


def main(cfg: Config, paths: dict) -> None:
    """Entry point of the inference process (multiprocessing spawn target)."""
    InferenceWorker.main(cfg, paths)
