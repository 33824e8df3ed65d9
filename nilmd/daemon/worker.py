"""The skeleton the reader and the inference process share (after gunicorn's workers/base.py).

What every child does the same way lives here, once: the `alive` flag that ends its loop, the
check that its parent is still the supervisor that started it, the heartbeat in the control
block, the signals, and the pid slot. A subclass names its `role` (its control-block slots and
its logger are named after it) and writes `run()`.

A child whose heartbeat goes stale gets SIGABRT from the supervisor, then SIGKILL on the
supervisor's next tick if it is still alive. faulthandler is enabled before anything else runs,
and its handler is C code: it runs even while the child is stuck in a system call or in C code
that never returns to the interpreter, writes every thread's Python traceback to stderr (the
journal under systemd) and lets the signal kill the process. So the journal says where a hung
child was stuck ("Fatal Python error: Aborted", then "Current thread ... (most recent call
first)"), and a crash in C code (SIGSEGV, SIGBUS, SIGFPE, SIGILL) says where it crashed. Only a
child SIGSTOPped or blocked where no signal reaches it needs the SIGKILL, and leaves no traceback.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import time

from nilmd import log as logmod
from nilmd.config import Config
from nilmd.daemon import roster
from nilmd.daemon.control import ControlBlock
from nilmd.daemon.ringbuffer import RingBuffer


class Worker:
    role = ""  # "reader" or "inference": set by each subclass

    def __init__(self, cfg: Config, paths: dict):
        self.cfg = cfg
        self.log = logging.getLogger(f"nilmd.{self.role}")
        self.throttle = logmod.Throttle(self.log, period=60.0)
        self.paths = paths
        self.listed = "roster" in paths  # a list of buildings (nilmd.daemon.roster), else the one --building-id
        self.ctl = ControlBlock.attach(paths["ctl"])  # the daemon block: this process's slots
        self.ring = None if self.listed else RingBuffer.attach(paths["ring"])
        self.roster = roster.Follower(paths, self.ctl, cfg.building_id)
        self.alive = True
        self.parent = os.getppid()
        self._heartbeat_slot = f"{self.role}_heartbeat"  # formatted once: the inference beats every 10 ms

    # -- the process --------------------------------------------------------------------------------
    @classmethod
    def main(cls, cfg: Config, paths: dict) -> None:
        """Entry point of the child process (what nilmd.daemon.spawn runs)."""
        faulthandler.enable(all_threads=True)  # first: even a hang while importing shows where
        logmod.process_main(cls.role, cfg.building_id, cfg.log_level, lambda log: cls._boot(cfg, paths))

    @classmethod
    def _boot(cls, cfg: Config, paths: dict) -> int:
        cls.prepare_process(cfg)
        return cls(cfg, paths).init_process()

    @classmethod
    def prepare_process(cls, cfg: Config) -> None:
        """Process-wide set-up that must come before the worker is built; none by default."""

    def init_process(self) -> int:
        """Signals and the pid slot, then the worker's life; returns its exit code."""
        self.init_signals()
        self.ctl[f"{self.role}_pid"] = os.getpid()
        try:
            return self.run()
        finally:
            self.throttle.flush(force=True)

    def init_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.handle_term)
        # Ctrl-C reaches the whole process group, SIGHUP is the supervisor's: it decides what
        # they mean and tells a child through the control block (reloads) or with SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # SIGABRT stays with faulthandler's handler (a Python handler would replace it and only
        # run once the interpreter gets control back, which a hung child may never give it).

    def handle_term(self, signum, frame) -> None:
        self.alive = False

    # -- the loop -----------------------------------------------------------------------------------
    def beat(self) -> None:
        """Stamp the heartbeat; call at least every 0.5 s from the loop."""
        self.ctl[self._heartbeat_slot] = time.monotonic()
        if os.getppid() != self.parent:  # the supervisor died (SIGKILL): do not outlive it
            self.alive = False

    def run(self) -> int:
        raise NotImplementedError

    # -- the buildings ------------------------------------------------------------------------------
    def attach(self, building: str):
        """(ring, control block, Config) of one building: with one building, the daemon's own."""
        if not self.listed:
            return self.ring, self.ctl, self.cfg
        p = roster.building_paths(self.paths["runtime_dir"], building)
        return RingBuffer.attach(p["ring"]), ControlBlock.attach(p["ctl"]), self.cfg.replace(building_id=building)

    def follow_roster(self) -> None:
        """Attach the buildings the supervisor added, detach those it removed (a SIGHUP's new list)."""
        change = self.roster.changed()
        if change is None:
            return
        added, removed = change
        for b in removed:
            self.remove_building(b)
        self.add_buildings(added)
        self.log.info("buildings: %d added, %d removed, %d served", len(added), len(removed),
                      len(self.roster.current))

    def add_buildings(self, buildings: list[str]) -> None:
        for b in buildings:
            try:
                self.add_building(b)
            except (OSError, ValueError) as e:  # removed again meanwhile (a reload, a lease given back): skip it
                self.log.warning("building %s: cannot attach its shared memory (removed meanwhile?): %s", b, e)

    def add_building(self, building: str) -> None:
        """A subclass that serves buildings attaches one here."""

    def remove_building(self, building: str) -> None:
        """...and lets one go here."""
