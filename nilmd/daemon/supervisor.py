"""The supervisor: the process systemd starts (after gunicorn's arbiter).

It owns the shared memory, spawns the reader and the inference process (fresh interpreters,
nilmd.daemon.spawn; it never imports torch), and runs one loop that reaps children, checks their
heartbeats, restarts the dead or hung with backoff while the ring buffer survives, publishes the
status hash and is the only process that talks to systemd. Signal handlers only enqueue; each signal has a handle_*
method that the loop calls.

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

from nilmd import config, keys
from nilmd.daemon import control as ctlmod
from nilmd.daemon import fencing, health, inference, mqtt, reader, roster, sharing, status
from nilmd.config import Config
from nilmd.daemon.control import ControlBlock
from nilmd.errors import (EXIT_ALREADY_RUNNING, EXIT_BOOT_ERROR, EXIT_CHILD_FAILING, EXIT_ERROR, EXIT_OK, EXIT_USAGE,
                          NilmdError, redis_error)
from nilmd.log import Throttle
from nilmd.daemon.notify import Notifier
from nilmd.daemon.spawn import Spawned
from nilmd.backoff import Backoff
from nilmd.daemon.instance import InstanceLock

FRESH_S = 5.0  # a heartbeat older than this stops WATCHDOG=1 pings (children beat every <= 0.5 s)


class Child:
    def __init__(self, role: str, target):
        self.role = role
        self.target = target
        self.process = None
        self.started_at = 0.0  # monotonic
        self.backoff = Backoff()  # its failures: deaths since the child last lived HEALTHY_AFTER seconds
        self.restarts = 0
        self.next_start = 0.0
        self.killed_for_hang = False  # judged hung: SIGABRT sent, SIGKILL to follow
        self.aborted_at = 0.0  # monotonic time of that SIGABRT
        self.sigkilled = False

    @property
    def failures(self) -> int:
        return self.backoff.failures

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


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
        self.listed = bool(cfg.building_ids)  # a list of buildings (nilmd.daemon.roster), else the one
        self.served: dict[str, roster.Served] = {}  # by building id, in the list's order
        self.children = {"reader": Child("reader", reader.main), "inference": Child("inference", inference.main)}
        if cfg.mqtt_url:  # Home Assistant: a child of its own (nilmd.daemon.mqtt says why)
            self.children["mqtt"] = Child("mqtt", mqtt.main)
        self.metrics = None  # the /metrics server (nilmd.daemon.metrics), with --metrics-port
        self.notifier = Notifier(unset_environment=True)  # children must not inherit NOTIFY_SOCKET
        self.signals: deque[int] = deque()
        self.exit_code: int | None = None
        self.started = time.time()
        self.ready_sent = False
        self.reloading = False
        self.stopping = False
        self.state = "starting"
        self.problems: list[health.Problem] = []  # why the state is degraded (nilmd.daemon.health)
        self._logged: tuple[str, tuple] = ("starting", ())  # the state and reasons the journal last said
        self.ctl = None  # the daemon block (with one building, that building's block)
        self._wake_r = self._wake_w = -1
        self._last_status = 0.0
        self._last_judged = 0.0
        self._last_ping = 0.0
        self._last_extend = 0.0
        self._status_line = ""
        self.redis, self.redis_errors = None, ()
        if cfg.mode != "test":
            from nilmd import redisconn

            self.redis = redisconn.client(cfg, name="supervisor", socket_timeout=2.0)
            self.redis_errors = redisconn.ERRORS
        # which of the list is ours: its shard, its leases (nilmd.daemon.sharing)
        self.sharing = sharing.Sharing(cfg, self.redis, self.redis_errors, self.throttle)
        self.paths = roster.daemon_paths(cfg.runtime_dir, self.sharing.wanted(), self.listed)
        if self.sharing.fence is not None:  # the children's writes carry this life's lease token
            self.paths["fence_token"] = self.sharing.fence.token
        self.lock = InstanceLock(self.paths["lock"]) if self.listed else None  # one building: its own lock
        # The children get the password inside their Config; in their environment it would be
        # readable in /proc/<pid>/environ and `ps eww` for as long as they live.
        os.environ.pop("REDIS_PASSWORD", None)
        os.environ.pop("NILMD_MQTT_PASSWORD", None)

    # -- shared memory and the instance lock ------------------------------------------------------
    def acquire(self) -> None:
        """Own every building's shared memory: refuse if a live nilmd has one, reclaim a dead one's."""
        os.makedirs(self.cfg.runtime_dir, exist_ok=True)
        ids = self.paths["buildings"] if self.listed else [self.cfg.building_id]
        roster.raise_open_files(len(ids), self.log)
        if self.listed:
            self.lock.acquire(f"a list ({self.cfg.building_ids})", self._where())
            for p in (self.paths["ctl"], self.paths["roster"]):
                if os.path.exists(p):
                    os.unlink(p)
            self.ctl = ControlBlock.create(self.paths["ctl"])
            roster.write(self.paths["roster"], ids)
        for b in ids:
            self.open_building(b)
        if not self.listed:
            self.ctl = self.served[self.cfg.building_id].ctl
        elif self.cfg.mode != "test":
            warm = sum(1 for s in self.served.values() if s.ctl["restored_samples"])
            self.log.info("warm restart: %d of %d buildings restored from their ring snapshots", warm, len(ids))

    def open_building(self, b: str) -> None:
        cfg = self.cfg.replace(building_id=b) if self.listed else self.cfg
        served = roster.Served(cfg, roster.building_paths(self.cfg.runtime_dir, b))
        served.open(self._where(), self.log, quiet=self.listed)
        self.served[b] = served

    def _where(self) -> str:
        """What this daemon serves, for the lock file and so for a second daemon's error line."""
        if self.cfg.mode == "test":
            return "--mode test"
        from nilmd import redisconn

        return f"Redis {redisconn.describe(self.cfg)}"

    def release(self) -> None:
        for served in self.served.values():
            served.close()
        self.served.clear()
        if self.listed and self.ctl is not None:  # (None: another daemon's files, left alone)
            self.ctl.unlink()
            self.ctl.close()
            try:
                os.unlink(self.paths["roster"])
            except FileNotFoundError:
                pass
        if self.listed:
            self.lock.release()
        self.ctl = None

    # -- the list: SIGHUP, leases ------------------------------------------------------------------
    def follow_leases(self) -> None:
        if self.sharing.leases is None:
            return
        fenced = [b for b, served in self.served.items() if served.ctl["fenced"]]
        if fenced:  # the inference stopped serving them already (and said so)
            self.sharing.let_go(fenced)
            self.apply_list(self.sharing.wanted(), "fenced", "Redis refused their writes: their leases are gone")
        if not self.sharing.due():
            return
        self.sharing.claim()
        new = self.sharing.wanted()
        if set(new) != set(self.served):
            self.apply_list(new, "leases", f"{len(self.sharing.leases.instances)} instances live")

    def reload_list(self) -> None:
        """SIGHUP with --building-ids @FILE: serve the file's list now (with leases: its buildings held)."""
        try:
            self.sharing.candidates = self.sharing.read()
        except NilmdError as e:
            self.log.error("SIGHUP: the list of buildings is unchanged: %s", e)
            return
        if self.sharing.leases is not None:
            self.sharing.claim()
        self.apply_list(self.sharing.wanted(), "SIGHUP", self.cfg.building_ids[1:])

    def apply_list(self, new: list[str], why: str, source: str) -> None:
        """Serve `new` from now on, whole or not at all. The list is checked first (open files, shared
        memory), then the new buildings get their shared memory (and snapshot); if any cannot, those
        opened are closed again and the old list keeps serving (one line). Only then do the removed
        ones get a last status and their files unlinked; the children attach and detach when the
        daemon block says the list moved. The others are not touched."""
        added = [b for b in new if b not in self.served]
        removed = [b for b in self.served if b not in set(new)]
        if not added and not removed:
            return  # nothing changed: nothing to say (a renewal every few seconds)
        problem = roster.list_problem(self.cfg, len(new), len(added), self.log)
        opened = []
        try:
            for b in added if problem is None else ():
                self.open_building(b)
                opened.append(b)
        except (NilmdError, OSError) as e:
            problem = f"building {b} cannot be served: {e}"
            for b in opened:
                self.served.pop(b).close()
        if problem is not None:
            line = (f"{why}: the new list of {len(new)} buildings is refused, the {len(self.served)} served go on "
                    f"unchanged: {problem}")
            if why == "SIGHUP":  # asked for: answered every time
                self.log.error("%s", line)
            else:  # leases come back every renewal: once a minute
                self.throttle.log(f"list {why}", logging.ERROR, line)
            if self.sharing.leases is not None and added:  # leases it cannot serve: another instance may
                self.sharing.let_go(added)
            return
        for b in removed:
            served = self.served.pop(b)
            served.state = "stopped"
            self._publish_buildings([served])
            served.close()  # the children's mappings stay valid until they let go (the reader's last snapshot)
        self.paths["buildings"] = list(self.served)
        roster.write(self.paths["roster"], self.paths["buildings"])
        self.ctl.add("roster_version")
        self.log.info("%s: buildings: %d added, %d removed, %d served (%s)", why, len(added), len(removed),
                      len(self.served), source)

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
        if self.listed and self.cfg.building_ids.startswith("@"):
            self.reload_list()
        elif self.listed:
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
    # A successor must not inherit its dead predecessor's "subscribed" or "ready": until it says
    # so itself, it is starting. (Its predecessor is gone, so this is the slot's only writer now.)
    STARTING_STATE = {"reader": ("reader_state", ctlmod.READER_STARTING),
                      "inference": ("inference_state", ctlmod.INFER_LOADING),
                      "mqtt": ("mqtt_state", ctlmod.MQTT_STARTING)}

    def spawn(self, child: Child) -> None:
        slot, starting = self.STARTING_STATE[child.role]
        self.ctl[slot] = starting
        child.process = Spawned(child.target, (self.cfg, dict(self.paths)), f"nilmd-{child.role}")
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
        why = "hung (no heartbeat)" if child.killed_for_hang else _describe_exit(code)
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

    # -- state, systemd and the status hash -----------------------------------------------------
    def update(self) -> None:
        snap = self.ctl.snapshot()
        reader_up = self.children["reader"].alive and snap["reader_state"] == ctlmod.READER_SUBSCRIBED
        models_up = self.children["inference"].alive and snap["inference_state"] != ctlmod.INFER_LOADING
        now = time.monotonic()
        if self.reloading and snap["reload_done"] >= snap["reload_requested"]:
            self.reloading = False
            self.log.info("reload finished (%d models serving)", snap["models_loaded"])
            self.notifier.ready()
        down = [r for r, c in self.children.items() if not c.alive]
        ready = self.ready_sent or (reader_up and models_up)
        # an optional exporter that cannot start: degraded with its reason, the predictions go on
        exporters = [health.Problem("mqtt_unusable", "the MQTT exporter cannot start: its TLS files are not usable "
                                    "(its error is in the log)")] \
            if "mqtt" in self.children and snap["mqtt_state"] == ctlmod.MQTT_UNUSABLE else []
        # Each building judged on its own data: every tick for one, with the status hashes for a
        # list (30 ms a round for 1000 buildings: every tick would be 6 % of a core)
        judge = not self.listed or now - self._last_judged >= self.cfg.status_interval or self.stopping
        if judge:
            self._last_judged = now
        for served in self.served.values() if judge else ():
            bsnap = self.ctl.snapshot(served.ctl)
            served.run_length = served.ring.run_length()
            served.problems = served.health.reasons(bsnap, served.run_length, down=down, input_ok=reader_up) \
                + ([] if self.listed else exporters) if self.ready_sent else []
            served.state = status.judge_state(
                ready=ready, reloading=self.reloading, children_ok=not down, input_ok=reader_up,
                models_loaded=int(snap["models_loaded"]), run_length=served.run_length, window=self.cfg.window_size,
                problems=served.problems)
        if self.listed:
            self.problems = [health.process_down(role) for role in down] + ([] if reader_up else [health.INPUT_DOWN]) \
                + exporters
            self.state = status.judge_daemon(ready=ready, reloading=self.reloading, problems=self.problems,
                                             states=[b.state for b in self.served.values()])
            line = status.fleet_line(self.state, [b.state for b in self.served.values()], snap, self.problems)
        else:
            only = self.served[self.cfg.building_id]
            self.state, self.problems = only.state, only.problems
            line = status.summary_line(self.state, only.run_length, self.cfg.window_size, snap, self.problems)
        if not self.ready_sent and reader_up and models_up:
            self.ready_sent = True
            self.notifier.ready(line)
            self.log.info("ready: %s", line)
            self._logged = (self.state, tuple(self.problems))
        elif line != self._status_line:
            self.notifier.status(line)
        self._status_line = line
        if self.ready_sent and not self.stopping:
            self.log_changes(judge)
        if not self.ready_sent and snap["inference_state"] == ctlmod.INFER_LOADING and now - self._last_extend > 10:
            self.notifier.extend_timeout(self.EXTEND_S)
            self._last_extend = now
        interval = self.notifier.watchdog_interval
        if interval and self.ready_sent and now - self._last_ping >= interval and self.all_fresh():
            self.notifier.watchdog()
            self._last_ping = now
        if now - self._last_status >= self.cfg.status_interval:
            self.publish_status()
            self._last_status = now

    def log_changes(self, judged: bool) -> None:
        """One journal line for each change of state or of its reasons (STATUS= and the hash only
        hold the latest): the daemon's, and with a list each building's into and out of degraded."""
        now = (self.state, tuple(self.problems))
        line = status.change_line(self._logged, now)
        if line:
            self.log.log(logging.WARNING if self.state == "degraded" else logging.INFO, "%s", line)
        self._logged = now
        for served in self.served.values() if self.listed and judged else ():
            now = (served.state, tuple(served.problems))
            was = served.logged
            served.logged = now
            if "degraded" in (was[0], now[0]):
                line = status.change_line(was, now)
                if line:
                    self.log.log(logging.WARNING if now[0] == "degraded" else logging.INFO, "building %s: %s",
                                 served.building, line)

    def _processes(self) -> dict:
        pids = {"supervisor": os.getpid(), **{r: c.pid for r, c in self.children.items()}}
        return dict(pids=pids, restarts={r: c.restarts for r, c in self.children.items()},
                    rss={role: status.rss_mb(pid) for role, pid in pids.items()})

    def publish_status(self) -> None:
        """Every building's status hash (and with a list the daemon's own), in one round trip."""
        self._publish_buildings(list(self.served.values()), daemon=self.listed)

    def _publish_buildings(self, buildings: list, daemon: bool = False) -> None:
        if self.redis is None:
            return
        snap, procs = self.ctl.snapshot(), self._processes()
        if self.stopping:
            for served in buildings:
                served.state = self.state
        try:
            pipe = self.redis.pipeline(transaction=False)
            for served in buildings:
                fields = status.fields(served.cfg, served.state, self.ctl.snapshot(served.ctl), served.ring.run_length(),
                                       started=self.started, problems=served.problems, **procs)
                if self.sharing.fence is None:
                    pipe.hset(status.key(served.cfg), mapping=fields)
                else:  # a building whose lease is gone is another instance's to describe
                    self.sharing.fence.hset(pipe, served.building, status.key(served.cfg), fields)
            if daemon:
                pipe.hset(keys.daemon_status_key(self.sharing.name), mapping={**status.daemon_fields(
                    self.cfg, self.state, self._status_line, [b.state for b in self.served.values()], snap,
                    started=self.started, problems=self.problems, **procs), **self.sharing.fields()})
            replies = pipe.execute(raise_on_error=False)
            failed = next((r for r in replies if isinstance(r, Exception) and not fencing.is_fenced(r)), None)
        except self.redis_errors as e:
            failed = e
        if failed is None:
            self.throttle.ok("status")  # a failure's suppressed repeats: said now as the past, not later
        else:
            self.ctl.add("supervisor_redis_errors")
            kind, line = redis_error(failed)
            self.throttle.log(f"status {kind}", logging.WARNING, f"could not write the status hash: {line}")

    # -- life cycle -----------------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.acquire()
        except NilmdError as e:
            self.release()  # what a list opened before the building another daemon serves
            self.log.critical("%s", e)
            return EXIT_ALREADY_RUNNING
        except OSError as e:  # e.g. --runtime-dir /proc/nilmd: a configuration error, not a crash
            self.release()
            self.log.critical("cannot create the shared memory in %s (--runtime-dir, $NILMD_RUNTIME_DIR): %s",
                              self.cfg.runtime_dir, e.strerror or e)
            return EXIT_USAGE
        try:
            if self.cfg.metrics_port:
                from nilmd.daemon import metrics

                self.metrics = metrics.serve(self)
            self.install_signals()
            served = f"{len(self.served)} buildings ({self.cfg.building_ids})" if self.listed \
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
            self.release()
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
            self.follow_leases()
            self.update()

    def shutdown(self) -> None:
        self.stopping = True
        self.state = "stopping"
        self.notifier.stopping()
        self.publish_status()
        # Inference first: the reader's last snapshot then records every prediction that was
        # published, so a warm restart never makes one twice.
        for child in sorted(self.children.values(), key=lambda c: c.role != "inference"):
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
        self.state = "stopped"
        self.publish_status()
        self.sharing.release(self.log)
        self.throttle.flush(force=True)
        self.log.info("stopped")
