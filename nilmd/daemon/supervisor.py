"""The supervisor: the process systemd starts, an arbiter after gunicorn's.

It spawns one child per role of nilmd.daemon.roles (fresh interpreters, nilmd.daemon.spawn; it
never imports torch), and runs one loop that reaps them, checks their heartbeats and restarts
the dead or hung with backoff while the ring buffer survives, and is the only process that talks
to systemd. Signal handlers only enqueue; each signal has a handle_* method that the loop calls.
What it supervises belongs to others: the buildings and their shared memory to the roster
(nilmd.daemon.roster), the verdict to health.Judge, the status hash to status.Writer, /metrics
to nilmd.daemon.metrics.

Exit codes (nilmd.errors): 0 stopped on request, 3 a child kept failing, 4 another nilmd owns
this building, 78 a child cannot start at all (no usable checkpoint, no such device).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from collections import deque

from nilmd.config import Config
from nilmd.daemon import control as ctlmod
from nilmd.daemon import health, roles, roster, status
from nilmd.daemon.notify import Notifier
from nilmd.daemon.spawn import Child, Spawned, describe_exit
from nilmd.errors import (EXIT_ALREADY_RUNNING, EXIT_BOOT_ERROR, EXIT_CHILD_FAILING, EXIT_ERROR, EXIT_OK, EXIT_USAGE,
                          NilmdError)
from nilmd.log import Throttle

FRESH_S = 5.0  # a heartbeat older than this stops WATCHDOG=1 pings (children beat every <= 0.5 s)


class Supervisor:
    TICK = 0.5
    HEALTHY_AFTER = 60.0
    MAX_FAILURES = 5
    STOP_TIMEOUT = 5.0
    EXTEND_S = 30.0
    # SIGABRT to SIGKILL: shorter than TICK, so the next regular tick sends it even when a signal
    # woke the loop in between; faulthandler needs milliseconds to write a traceback.
    ABORT_GRACE = 0.4

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.log = logging.getLogger("nilmd.supervisor")
        self.throttle = Throttle(self.log, period=60.0)
        self.children = {r.name: Child(r) for r in roles.serving(cfg)}
        self.metrics = None  # the /metrics server (nilmd.daemon.metrics), with --metrics-port
        self.notifier = Notifier(unset_environment=True)  # children must not inherit NOTIFY_SOCKET
        self.signals: deque[int] = deque()
        self.exit_code: int | None = None
        self.started = time.time()
        self.reloading = False
        self.stopping = False
        self._wake_r = self._wake_w = -1
        self._last_status = self._last_ping = self._last_extend = 0.0
        self.redis, self.redis_errors = None, ()
        if cfg.mode != "test":
            from nilmd import redisconn  # imports redis-py: a test-mode supervisor runs without it

            self.redis = redisconn.client(cfg, name="supervisor", socket_timeout=2.0)
            self.redis_errors = redisconn.ERRORS
        self.roster = roster.Roster(cfg, self.redis, self.redis_errors, self.throttle,
                                    farewell=lambda buildings: self.publish_status(buildings))
        self.judge = health.Judge(cfg, self.roster, self.log)
        self.writer = status.Writer(cfg, self.redis, self.redis_errors, self.roster.sharing, self.throttle,
                                    self.started)
        # The children get the password inside their Config; in their environment it would be
        # readable in /proc/<pid>/environ and `ps eww` for as long as they live.
        os.environ.pop("REDIS_PASSWORD", None)
        os.environ.pop("NILMD_MQTT_PASSWORD", None)

    @property
    def ctl(self):
        """The daemon block (with one building, that building's block): the children's slots."""
        return self.roster.ctl

    # -- signals: handlers only enqueue ---------------------------------------------------------
    def install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._enqueue)

    def _enqueue(self, signum, frame) -> None:
        self.signals.append(signum)

    def sleep(self) -> None:
        if self.signals:
            return
        # poll, not select: with many buildings open, the pipe's fd is past select's limit of 1024
        waiter = select.poll()
        waiter.register(self._wake_r, select.POLLIN)
        try:
            ready = waiter.poll(self.TICK * 1000)
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
            handler = {signal.SIGTERM: self.handle_term, signal.SIGINT: self.handle_int,
                       signal.SIGHUP: self.handle_hup, signal.SIGCHLD: self.handle_chld}[signum]
            handler()

    def handle_term(self) -> None:
        self.log.info("SIGTERM: stopping")
        self.exit_code = EXIT_OK

    def handle_int(self) -> None:
        self.log.info("SIGINT: stopping")
        self.exit_code = EXIT_OK

    def handle_hup(self) -> None:
        if self.roster.listed and self.cfg.building_ids.startswith("@"):
            self.roster.reload()
        elif self.roster.listed:
            self.log.info("SIGHUP: the buildings were given inline (--building-ids a,b,c): the list cannot change "
                          "on reload (give it as @FILE for that)")
        child = self.children["inference"]
        if not child.alive:
            self.log.info("SIGHUP: the inference process is not running; it loads the current checkpoints when it starts")
            return
        self.log.info("SIGHUP: reloading checkpoints from %s", self.cfg.model_dir)
        self.reloading = True
        self.notifier.reloading()
        self.ctl["reload_requested"] = self.ctl["reload_requested"] + 1

    def handle_chld(self) -> None:
        pass  # the loop reaps right after handling signals

    # -- children -------------------------------------------------------------------------------
    def spawn(self, child: Child) -> None:
        # A successor must not inherit its dead predecessor's "subscribed" or "ready": until it says
        # so itself, it is starting. (Its predecessor is gone, so this is the slot's only writer now.)
        self.ctl[f"{child.role}_state"] = ctlmod.STARTING
        child.process = Spawned(child.target, (self.cfg, dict(self.roster.paths)), f"nilmd-{child.role}")
        child.started_at = time.monotonic()
        child.killed_for_hang = child.sigkilled = False
        self.ctl[f"{child.role}_pid"] = child.process.pid
        self.log.info("started the %s process (pid %d)", child.role, child.process.pid)

    def reap(self) -> None:
        for child in self.children.values():
            if child.process is None or child.alive:
                continue
            code, pid = child.process.exitcode, child.process.pid
            child.process.close()
            child.process = None
            self.child_died(child, pid, code)

    def child_died(self, child: Child, pid: int, code: int | None) -> None:
        if self.stopping:
            return
        lived = time.monotonic() - child.started_at
        why = "hung (no heartbeat)" if child.killed_for_hang else describe_exit(code)
        if code == EXIT_BOOT_ERROR:
            self.log.critical("the %s process cannot start (see its error above): stopping", child.role)
            self.exit_code = EXIT_BOOT_ERROR
            return
        if lived >= self.HEALTHY_AFTER:
            child.backoff.reset()
        delay = child.backoff.next_delay()
        if child.failures >= self.MAX_FAILURES:
            self.log.critical("the %s process failed %d times in a row (last: pid %d, %s, after %.1f s): giving up",
                              child.role, child.failures, pid, why, lived)
            self.exit_code = EXIT_CHILD_FAILING
            return
        child.next_start = time.monotonic() + delay
        child.restarts += 1
        self.log.error("the %s process (pid %d) died: %s after %.1f s; restarting in %.1f s (failure %d of %d)",
                       child.role, pid, why, lived, delay, child.failures, self.MAX_FAILURES)

    def respawn(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.process is None and now >= child.next_start and self.exit_code is None:
                self.spawn(child)

    def heartbeat_age(self, child: Child) -> float:
        beat = max(self.ctl[f"{child.role}_heartbeat"], child.started_at)
        return time.monotonic() - beat

    def check_heartbeats(self) -> None:
        """A hung child gets SIGABRT (its faulthandler writes where it is stuck to the journal and
        the signal ends it), then SIGKILL on the next tick if it is still alive (SIGSTOPped, or
        stuck where no signal is delivered). A hung process cannot act on SIGTERM."""
        now = time.monotonic()
        for child in self.children.values():
            if not child.alive:
                continue
            if child.killed_for_hang:
                if not child.sigkilled and now - child.aborted_at >= self.ABORT_GRACE:
                    self.log.error("the %s process (pid %d) is still alive %.1f s after SIGABRT: sending SIGKILL",
                                   child.role, child.pid, now - child.aborted_at)
                    child.sigkilled = True
                    os.kill(child.pid, signal.SIGKILL)
                continue
            age = self.heartbeat_age(child)
            if age > self.cfg.heartbeat_timeout:
                # Logged before the signal, not after: the child writes its traceback to the same
                # stream the moment SIGABRT lands, and a line of ours written meanwhile would split it.
                self.log.error("the %s process (pid %d) sent no heartbeat for %.0f s: sending SIGABRT (its "
                               "traceback shows where it hung); SIGKILL on the next tick if it is still alive",
                               child.role, child.pid, age)
                child.killed_for_hang = True
                child.aborted_at = now
                os.kill(child.pid, signal.SIGABRT)

    def all_fresh(self) -> bool:
        return all(c.alive and self.heartbeat_age(c) < FRESH_S for c in self.children.values())

    # -- systemd and the status hash ------------------------------------------------------------
    def update(self) -> None:
        """The verdict (health.Judge), said to systemd, the journal and, every interval, the status hash."""
        snap = self.ctl.snapshot()
        now = time.monotonic()
        if self.reloading and snap["reload_done"] >= snap["reload_requested"]:
            self.reloading = False
            self.log.info("reload finished (%d models serving)", snap["models_loaded"])
            self.notifier.ready()
        down = [r for r, c in self.children.items() if not c.alive]
        said = self.judge.line
        if self.judge.tick(snap, list(self.children), down, reloading=self.reloading):
            self.notifier.ready(self.judge.line)
            self.log.info("ready: %s", self.judge.line)
        elif self.judge.line != said:
            self.notifier.status(self.judge.line)
        if self.judge.ready:
            self.judge.log_changes()
        elif snap["inference_state"] == ctlmod.INFER_LOADING and now - self._last_extend > 10:
            self.notifier.extend_timeout(self.EXTEND_S)
            self._last_extend = now
        interval = self.notifier.watchdog_interval
        if interval and self.judge.ready and now - self._last_ping >= interval and self.all_fresh():
            self.notifier.watchdog()
            self._last_ping = now
        if now - self._last_status >= self.cfg.status_interval:
            self.publish_status()
            self._last_status = now

    def processes(self) -> dict:
        """pids, restarts and resident memory by role: the status hash's processes."""
        pids = {roles.SUPERVISOR: os.getpid(), **{r: c.pid for r, c in self.children.items()}}
        return dict(pids=pids, restarts={r: c.restarts for r, c in self.children.items()},
                    rss={role: status.rss_mb(pid) for role, pid in pids.items()})

    def publish_status(self, buildings=None) -> None:
        """Every building's status hash (and with a list the daemon's own), or only `buildings`'."""
        self.writer.write(self.roster, self.judge, self.processes(), buildings)

    # -- life cycle -----------------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.roster.acquire()
        except NilmdError as e:
            self.roster.release()  # what a list opened before the building another daemon serves
            self.log.critical("%s", e)
            return EXIT_ALREADY_RUNNING
        except OSError as e:  # e.g. --runtime-dir /proc/nilmd: a configuration error, not a crash
            self.roster.release()
            self.log.critical("cannot create the shared memory in %s (--runtime-dir, $NILMD_RUNTIME_DIR): %s",
                              self.cfg.runtime_dir, e.strerror or e)
            return EXIT_USAGE
        try:
            if self.cfg.metrics_port:
                from nilmd.daemon import metrics  # imports prometheus-client: only with --metrics-port

                self.metrics = metrics.serve(self)
            self.install_signals()
            served = f"{len(self.roster.served)} buildings ({self.cfg.building_ids})" if self.roster.listed \
                else f"building {self.cfg.building_id}"
            self.log.info("nilmd starting: %s, window %d s, a prediction every %d s, models from %s", served,
                          self.cfg.window_size, self.cfg.inference_interval, self.cfg.model_dir)
            self.notifier.status("starting: loading models")
            for child in self.children.values():
                self.spawn(child)
            try:
                self.loop()
            except Exception:
                # A bug must not leave the daemon half alive: the children would keep running,
                # nothing would answer SIGTERM and the interpreter's exit would wait on them.
                self.log.critical("unexpected error in the supervisor: stopping", exc_info=True)
                self.exit_code = EXIT_ERROR
            self.shutdown()
        except NilmdError as e:  # /metrics cannot listen: before any child started
            self.log.critical("%s", e)
            self.exit_code = EXIT_USAGE
        finally:
            if self.metrics is not None:
                self.metrics.shutdown()
            for child in self.children.values():  # shutdown() itself failed: no child may outlive us
                if child.alive:
                    child.process.kill()
            self.roster.release()
            self.notifier.close()
            if self.redis is not None:
                self.redis.close()
        return self.exit_code

    def loop(self) -> None:
        while self.exit_code is None:
            self.sleep()
            self.handle_signals()
            self.reap()
            if self.exit_code is not None:
                break
            self.check_heartbeats()
            self.respawn()
            self.roster.follow_leases()
            self.update()

    def shutdown(self) -> None:
        self.stopping = True
        self.judge.stop("stopping")
        self.notifier.stopping()
        self.publish_status()
        for child in sorted(self.children.values(), key=lambda c: not c.stops_first):
            if child.process is None:
                continue
            if child.alive:
                child.process.terminate()
            child.process.join(self.STOP_TIMEOUT)
            if child.process.is_alive():
                self.log.warning("the %s process (pid %d) ignored SIGTERM for %.0f s: killing it",
                                 child.role, child.pid, self.STOP_TIMEOUT)
                child.process.kill()
                child.process.join(2.0)
        self.judge.stop("stopped")
        self.publish_status()
        self.roster.sharing.release(self.log)
        self.throttle.flush(force=True)
        self.log.info("stopped")
