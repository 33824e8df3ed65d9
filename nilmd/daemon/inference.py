"""Inference process: every INFERENCE_INTERVAL new seconds of each building, its newest window
through every appliance model, and the prediction out to Redis (or stdout in test mode).

Windows are taken on a fixed schedule of ring indices (end = previous end + interval), so the
number of predictions is exactly what the data implies; the first of an unbroken run is the
first full window whose newest sample closes an interval of the clock (nilmd.schedule). The
last end is kept in the building's control block, so a restarted inference process carries on
the same schedule instead of starting over. Many buildings (nilmd.daemon.roster): each has its
schedule (a Track), a heap says which to look at when, and the due ones run together.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import time

from nilmd import schedule
from nilmd.appliances import APPLIANCES
from nilmd.backoff import Backoff
from nilmd.config import Config
from nilmd.daemon import control as ctlmod
from nilmd.daemon.alwayson import AlwaysOn
from nilmd.daemon.fencing import writes
from nilmd.daemon.publish import RedisPublisher, StdoutPublisher  # noqa: F401 (nilmd.daemon.ledger names it here)
from nilmd.daemon.worker import Worker
from nilmd.errors import EXIT_BOOT_ERROR, EXIT_OK, NilmdError
from nilmd.models import adapted

POLL_S = 0.01  # how often to look for due buildings: ~0.1 % of a core, <= 10 ms added latency
MAX_WAIT_S = 1.0  # the longest a building waits to be looked at again (a burst of samples comes early)
CHECKS_PER_S = 1000  # buildings looked at a second, at most, while they wait (a flock'd read each)
BATCH_MAX = 256  # buildings per predictor call and pipeline: batched, and out before the rest is computed
ADVANCE_N = 15  # samples that make a waiting building worth feeding ahead of its window (a few times a minute)
GATHER_S = 0.25  # the longest a due window waits for others closing at the same time, to share one call


class Track:
    """One building's schedule of windows, and its prediction waiting for Redis, if any."""

    def __init__(self, building: str, ring, ctl, cfg: Config, throttle):
        self.building, self.ring, self.ctl, self.cfg, self.throttle = building, ring, ctl, cfg, throttle
        self.held = None  # (end, prediction) not yet published
        self.retry_at = 0.0  # monotonic: when to try it again
        self.backoff = Backoff()
        self.gone = False  # removed from the list: its heap entry is dropped when it comes up
        self.fed = 0  # ring index up to which its samples were fed to the models ahead of time
        self.always_on = AlwaysOn()

    def resuming(self) -> bool:
        """The reader is still reading the stream's history (nilmd.daemon.streams): which of its
        windows an earlier run (another instance, for a lease taken over) predicted is not known yet."""
        return self.cfg.input_mode == "stream" and not self.ctl["input_resumed"]

    def upcoming(self) -> tuple[int | None, int]:
        """(ring index one past the newest sample of the next window to run, or None while the run
        is shorter than a window; the ring's head). The index may lie ahead of the head."""
        head, segment = self.ring.counters()
        size, step = self.cfg.window_size, self.cfg.inference_interval
        if head - segment < size:
            return None, head
        if self.resuming():
            return None, head
        last = int(self.ctl["last_window_end"])  # 0: none yet in this daemon's life
        history = int(self.ctl["history_end"])  # warm restart: an earlier run predicted windows up to here
        if history > last and history >= segment + size:
            # the first aligned window after the earlier run's last one: the schedule stays on the
            # clock however the history ended (another instance's, or a lease handed over early)
            end = self._aligned(history, step, later=True)
            end += step if end == history else 0
        elif last < segment + size or last > head:  # first window of this unbroken run of data
            end = self._aligned(segment + size, step, later=True)
        else:
            end = last + step
        if head - end > self.ring.capacity - size - step:  # fell a ring behind: skip to the newest
            self.throttle.log("behind", logging.WARNING, "inference fell behind the meter; skipping to the newest window")
            end = self._aligned(head, step, later=False)
        return end, head

    def next_end(self) -> int | None:
        """Ring index one past the newest sample of the next window to run, or None."""
        end, head = self.upcoming()
        return end if end is not None and end <= head else None

    def _aligned(self, end: int, step: int, later: bool) -> int:
        """The nearest end at or after (later) or at or before `end` whose newest sample closes
        an interval of the clock. Within an unbroken run the ring's seconds are consecutive."""
        newest = self.ring.window(1, end)
        if newest is None:  # the run broke meanwhile: the next call starts from its new segment
            return end
        wait = schedule.wait_to_align(float(newest.ts[-1]), step)
        return end + wait if later else end - (step - wait) % step

    def wait(self, end: int | None, head: int, now: float, most: float) -> float:
        """Seconds until this building's next window can close: its closing sample arrives about
        (samples missing) seconds after the newest one did, at 1 Hz. A burst comes sooner, so at
        `most` seconds; a late or silent meter is looked at less and less often, up to that."""
        missing = (end if end is not None else head + self.cfg.window_size) - head
        eta = self.ctl["last_arrival"] + max(missing, 1) - now
        if eta < 0:
            return min(most, 0.1 - eta / 2)
        return min(most, max(POLL_S, eta + 0.02))


class InferenceWorker(Worker):
    role = "inference"

    def __init__(self, cfg: Config, paths: dict):
        super().__init__(cfg, paths)
        self.predictor = None
        self.reload_seen = self.ctl["reload_requested"]
        self.publisher = None
        self.tracks: dict[str, Track] = {}
        self._heap: list = []  # (monotonic time to look at it, tie-breaker, Track): each track once
        self._pushed = itertools.count()
        self._gathered: list = []  # [(track, end)] due, waiting (GATHER_S at most) for the rest of their batch
        self._gathered_at = 0.0
        self._feedable: list = []  # [(track, ring index)]: buildings whose new samples can be fed early
        self.add_buildings(self.roster.current)

    # -- the buildings ---------------------------------------------------------------------------
    def add_building(self, building: str) -> None:
        ring, ctl, cfg = self.attach(building)
        track = self.tracks[building] = Track(building, ring, ctl, cfg, self.throttle)
        if self.predictor is not None:  # added to a list while serving: its adapted models, if any
            adapted.say(self.predictor.place(building), self.log, self.listed)
            self._mark(track)
        self._push(track, time.monotonic())

    def remove_building(self, building: str) -> None:
        track = self.tracks.pop(building, None)
        if track is None:
            return
        track.gone = True
        if self.predictor is not None:
            self.predictor.forget(building)
        if self.publisher is not None:
            self.publisher.forget(building)
        track.ring.close()
        track.ctl.close()

    def _push(self, track: Track, when: float) -> None:
        heapq.heappush(self._heap, (when, next(self._pushed), track))

    def next_end(self) -> int | None:
        """The one building's next window (nilmd.daemon.inference.Track.next_end)."""
        return self.tracks[self.roster.current[0]].next_end()

    # -- models ----------------------------------------------------------------------------------
    def _load_set(self):
        from nilmd.models import backends

        # NILMD_BACKEND: torch or ONNX Runtime (nilmd.models.backends); a beat after each file
        got = backends.load(self.cfg, progress=self.beat, buildings=list(self.tracks))
        if got.choice.fallback:
            self.log.warning("%s", got.choice.fallback)
        return got.predictor.appliances if got.predictor else [], got.errors, got

    def load(self) -> None:
        """First load. Raises NilmdError if nothing at all can be served."""
        self.ctl["inference_state"] = ctlmod.INFER_LOADING
        self.beat()
        loaded, errors, got = self._load_set()
        for appliance, message in errors.items():
            self.log.error("%s: not served: %s", appliance, message, extra={"NILMD_APPLIANCE": appliance})
        if got.predictor is None:
            raise NilmdError(f"no usable checkpoint in {os.path.abspath(self.cfg.model_dir)}: nothing to serve")
        self._install(got)
        self.ctl["reload_done"] = self.reload_seen  # a fresh load answers any reload asked before it
        self.log.info("models loaded: %d of %d (%s) on %s with %s", len(loaded), len(APPLIANCES),
                      ", ".join(self.predictor.appliances), self.predictor.device, self.predictor.backend)

    def reload(self) -> None:
        """SIGHUP: load the new set beside the old one; swap only if it is whole."""
        self.ctl["inference_state"] = ctlmod.INFER_RELOADING
        serving = set(self.predictor.appliances)
        try:
            loaded, errors, got = self._load_set()
            # A file that exists but fails, or a served model whose file vanished, spoils the set.
            # (An adapted model that fails does not: the shipped one serves for it, nilmd.models.adapted.)
            bad = {a: e for a, e in errors.items() if a in serving or not e.endswith("file not found")}
            if bad or got.predictor is None:
                raise NilmdError("; ".join(bad.values()) or "no usable checkpoint")
        except Exception as e:  # anything at all: the old models keep serving
            self.ctl.add("reload_failed")
            self.log.error("reload failed, still serving the previous models: %s", e)
        else:
            self._install(got)
            self.log.info("reloaded: %d models (%s) with %s", len(loaded), ", ".join(self.predictor.appliances),
                          self.predictor.backend)
        self.ctl["inference_state"] = ctlmod.INFER_READY
        self.ctl["reload_done"] = self.reload_seen

    def _install(self, got) -> None:
        from nilmd.models.backends import Solo

        # One building or many, the loop asks the same thing: a batch of windows in one call.
        predictor = got.predictor
        self.predictor = predictor if hasattr(predictor, "forget") else Solo(predictor, got.adaptations.get(
            self.cfg.building_id))
        if hasattr(predictor, "reserve"):  # the fleet's state for every building at once, not doubled as it grows
            predictor.reserve(len(self.tracks))
        for adaptation in got.adaptations.values():
            adapted.say(adaptation, self.log, self.listed)
        if self.listed and got.adaptations:
            self.log.info("adapted models serve for %d of %d buildings", sum(bool(a.adapted) for a in
                          got.adaptations.values()), len(self.tracks))
        for track in self.tracks.values():
            self._mark(track)
        self.ctl["models_loaded"] = len(predictor.appliances)
        self.ctl["models_mask"] = ctlmod.mask(predictor.appliances)
        self.ctl["device_cuda"] = 1.0 if predictor.device.type == "cuda" else 0.0
        self.ctl["backend_onnx"] = 1.0 if predictor.backend == "onnxruntime" else 0.0
        self.ctl["inference_state"] = ctlmod.INFER_READY

    def _mark(self, track: Track) -> None:
        """Which of the building's appliances are adapted, for its status hash and /metrics."""
        adaptation = self.predictor.adaptation(track.building)
        track.ctl["adapted_mask"] = ctlmod.mask(adaptation.adapted if adaptation else ())
        track.ctl["adapted_refused_mask"] = ctlmod.mask(adaptation.refused if adaptation else ())

    # -- the windows -----------------------------------------------------------------------------
    def infer(self, due: list[tuple[Track, int]]) -> list[tuple[Track, int, dict | None]]:
        """Every due building's window through the models in one call; a prediction each (None: its
        window is gone, or was overwritten while it was read: skipped)."""
        from nilmd.models.prediction import make_prediction

        size, n = self.cfg.window_size, self.cfg.inference_interval
        taken = [(track, end, track.ring.window(size, end)) for track, end in due]
        items = [(track.building, window, n) for track, _, window in taken if window is not None]
        t0 = time.perf_counter()
        outs = iter(self.predictor.step(items) if items else [])  # only the new samples when it can
        ms = (time.perf_counter() - t0) * 1000.0
        out = []
        for track, end, window in taken:
            if window is None:
                out.append((track, end, None))
                continue
            power, prob = next(outs)
            track.fed = end  # the models' state is here now: feeding ahead goes on after it
            aggregate = window.features[-n:, 0].copy()
            window_end = float(window.ts[-1])
            intact = track.ring.intact(window)
            del window  # drop the views into shared memory before anything else can happen
            if not intact:
                self.predictor.reset(track.building)  # its state may hold overwritten samples: recompute next time
                track.ctl.add("overruns")
                self.throttle.log("overrun", logging.WARNING, ("" if not self.listed else f"building {track.building}: ")
                                  + "the meter overwrote a window while it was read; skipped")
                out.append((track, end, None))
                continue
            adaptation = self.predictor.adaptation(track.building)
            out.append((track, end, make_prediction(
                self.predictor.appliances, power[:, -n:], prob[:, -n:], self.predictor.thresholds(track.building),
                aggregate, timestamp=time.time(), window_start=window_end - size, window_end=window_end,
                inference_ms=ms, adapted=adaptation.adapted if adaptation else (),
                always_on=track.always_on.update(track.ring, window_end))))
        del taken
        return out

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
                token = self.paths.get("fence_token")  # with --leases (nilmd.daemon.fencing)
                fence = writes(token, self.cfg.redis_cluster)
                publisher = RedisPublisher(self.cfg, self.log, self.throttle, self.ctl, fence)
        except (NilmdError, RuntimeError) as e:
            self.log.critical("cannot start: %s", e)
            return EXIT_BOOT_ERROR
        return self.serve(publisher)

    # -- the loop --------------------------------------------------------------------------------
    def due(self, now: float) -> tuple[list, list]:
        """(fresh: [(track, window end)] to predict, retry: tracks whose held prediction is due
        again), from the buildings whose time has come: the heap, never a look at every ring."""
        fresh, retry, wall = [], [], time.time()
        heap = self._heap
        # A waiting building is looked at again within `most` s: every POLL_S for one building (a
        # burst is predicted at once), at most CHECKS_PER_S looks a second in all for many.
        most = min(MAX_WAIT_S, max(POLL_S, len(self.tracks) / CHECKS_PER_S))
        while heap and heap[0][0] <= now:
            _, _, track = heapq.heappop(heap)
            if track.gone:
                continue
            if track.held is not None:
                retry.append(track)
                continue
            newest = track.ctl["last_sample_ts"]  # read before the ring: the reader wrote the sample first
            end, head = track.upcoming()
            if end is not None and end <= head:
                fresh.append((track, end))
            else:
                if end is not None or not track.resuming():  # every window its samples close is out
                    track.ctl["predicted_through_ts"] = newest
                self._push(track, now + track.wait(end, head, wall, most))
                if end is not None and min(head, end - 1) - track.fed >= ADVANCE_N:
                    self._feedable.append((track, min(head, end - 1)))
        return fresh, retry

    def serve(self, publisher) -> int:
        """Predict each building's windows in order, the due ones together. A prediction Redis does
        not take is held and tried again with backoff, and that building's schedule waits on it:
        `last_window_end` moves only once a window's prediction is out, so none is lost while Redis
        is away, and an inference process that dies meanwhile leaves its successor the same window
        to make again (the ring holds it). The other buildings go on meanwhile."""
        self.publisher = publisher
        while self.alive:
            self.beat()
            if self.ctl["reload_requested"] != self.reload_seen:
                self.reload_seen = self.ctl["reload_requested"]
                self.reload()
            self.follow_roster()
            now = time.monotonic()
            fresh, retry = self.due(now)
            if fresh and not self._gathered:
                self._gathered_at = now
            self._gathered += fresh
            if not retry and not self._batch_now(now):
                if not self._advance():
                    time.sleep(POLL_S)
                self.throttle.flush()
                continue
            fresh, self._gathered = [(t, end) for t, end in self._gathered if not t.gone], []
            # In parts, each published as soon as it is made, with a heartbeat after each: the
            # first buildings' predictions go out while the others are computed, and a thousand
            # full windows (15 s on 2 cores) never look like a hang.
            for k in range(0, max(len(fresh), 1), BATCH_MAX):
                part = retry if k == 0 else []
                for track, end, prediction in self.infer(fresh[k:k + BATCH_MAX]):
                    if prediction is None:  # overrun: skipped, nothing to publish
                        track.ctl["last_window_end"] = end
                        self._push(track, now)
                    else:
                        track.held = (end, prediction)
                        part.append(track)
                self._publish(publisher, part)
                self.beat()
            self.throttle.flush()
        return EXIT_OK

    def _advance(self) -> bool:
        """Idle time: feed the models the samples that came since a building was last fed, up to just
        before its next window's end, so that the step at the boundary has only the last few to
        compute (FleetPredictor.advance; one building's predictor has none). True if it did."""
        feedable, self._feedable = self._feedable[:BATCH_MAX], self._feedable[BATCH_MAX:]
        if not feedable or not hasattr(self.predictor, "advance"):
            self._feedable = []
            return False
        taken = [(track, track.ring.window(self.cfg.window_size, end)) for track, end in feedable
                 if not track.gone]
        taken = [(track, window) for track, window in taken if window is not None]
        self.predictor.advance([(track.building, window) for track, window in taken])
        for track, window in taken:
            if track.ring.intact(window):
                track.fed = window.end
            else:  # overwritten while read: its state may hold the new samples; the step recomputes
                self.predictor.reset(track.building)
        del taken
        self.beat()
        return True

    def _batch_now(self, now: float) -> bool:
        """Whether to run the gathered windows now. One call costs about as much for one building as
        for ten (measured: 5 ms and 7 ms), and a full window for 1000 in one call 2 s where one
        at a time took 18 s, so the buildings whose windows close together (a clock interval) go
        together: after GATHER_S at most, or at once when no other building is due within it."""
        if not self._gathered:
            return False
        if now - self._gathered_at >= GATHER_S or len(self._gathered) >= len(self.tracks):
            return True
        return not self._heap or self._heap[0][0] > self._gathered_at + GATHER_S

    def _publish(self, publisher, tracks: list[Track]) -> None:
        results = publisher.publish_many([(t.cfg, t.held[1]) for t in tracks]) if tracks else []
        now = time.monotonic()
        for track, ok in zip(tracks, results):
            end, prediction = track.held
            ctl = track.ctl
            if track.building in getattr(publisher, "fenced", ()):
                self._fenced(track)
                continue
            if ok:
                track.held = None
                ctl["last_window_end"] = end
                ctl["predictions_pending"] = 0
                ctl.add("inferences")
                ctl["last_inference_ts"] = prediction["timestamp"]
                ctl["last_inference_ms"] = prediction["inference_time_ms"]
                self.ctl.observe_latency(prediction["inference_time_ms"] / 1000.0)
                if track.backoff.failures:
                    self.throttle.log("caught up", logging.INFO, f"{'building ' + track.building + ': ' if self.listed else ''}"
                                      f"published the held prediction (window ending {prediction['window_end']}) "
                                      f"after {track.backoff.failures} failed attempts; catching up")
                    track.backoff.reset()
                self._push(track, now)  # the next window may be due already (catching up)
            else:
                ctl["predictions_pending"] = 1
                track.retry_at = now + track.backoff.next_delay()
                self._push(track, track.retry_at)


    def _fenced(self, track: Track) -> None:
        """Redis refused this building's writes: another instance holds its lease now (this one was
        paused, cut off or slow past the lease period). Stop serving it at once; the supervisor lets
        it go when it sees the flag, and takes it again only with a fresh lease."""
        self.publisher.fenced.discard(track.building)
        self.log.error("building %s: fenced: Redis refused the prediction of the window ending %s because this "
                       "instance no longer holds the building's lease; no longer served here",
                       track.building, track.held[1]["window_end"])
        track.ctl["fenced"] = 1
        self.remove_building(track.building)
        if track.building in self.roster.current:  # taken again later: the list's change re-attaches it
            self.roster.current.remove(track.building)


def main(cfg: Config, paths: dict) -> None:
    """Entry point of the inference process (what nilmd.daemon.spawn runs)."""
    InferenceWorker.main(cfg, paths)
