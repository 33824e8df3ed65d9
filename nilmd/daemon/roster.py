"""Which buildings a daemon serves, and where each one's shared memory lives.

One building (--building-id): its files `nilmd-<id>.ring/.ctl/.lock` are the daemon's, and its
control block is also the daemon block, where the processes keep their own slots (pids,
heartbeats, states, reloads): the files of a single-building daemon are what they always were.
A list (--building-ids): every building has those three files, and the daemon has a block and a
lock of its own, `nilmd-daemon.ctl` and `nilmd-daemon.lock` (one list daemon per runtime dir).

The list can change while the daemon runs (SIGHUP re-reads an @FILE): the supervisor writes the
new one to `nilmd-daemon.roster` (atomically, one id a line) and then bumps `roster_version` in
the daemon block; each child compares that slot on every turn of its loop (one float read) and
re-reads the file only when it moved. A child starting later is handed the current list itself.

`Roster` is the one owner of all of it in the supervisor: the instance lock, every building's
shared memory, and the list as SIGHUP and the leases change it (nilmd.daemon.sharing decides
which buildings are this instance's; the roster opens and closes them).
"""

from __future__ import annotations

import logging
import os
import resource

from nilmd.daemon import sharing
from nilmd.daemon.control import ControlBlock
from nilmd.daemon.instance import InstanceLock
from nilmd.daemon.snapshot import write_atomic
from nilmd.errors import NilmdError

DAEMON = "daemon"  # the name of the daemon's own files with a list (nilmd.config refuses it as an id in one)
SUFFIXES = ("ring", "ctl", "lock")


def building_paths(runtime_dir: str, building: str) -> dict[str, str]:
    prefix = os.path.join(runtime_dir, f"nilmd-{building}")
    return {kind: f"{prefix}.{kind}" for kind in SUFFIXES}


def daemon_paths(runtime_dir: str, buildings: list[str], listed: bool) -> dict:
    """What the children are given. With one building its own paths, as before; with a list the
    daemon block, the roster file and the list itself."""
    if not listed:
        return building_paths(runtime_dir, buildings[0])
    prefix = os.path.join(runtime_dir, f"nilmd-{DAEMON}")
    return {"ctl": prefix + ".ctl", "lock": prefix + ".lock", "roster": prefix + ".roster",
            "runtime_dir": runtime_dir, "buildings": list(buildings)}


def write(path: str, buildings: list[str]) -> None:
    write_atomic(path, "".join(b + "\n" for b in buildings).encode())


def read(path: str) -> list[str]:
    with open(path) as fh:
        return [line.strip() for line in fh if line.strip()]


class Follower:
    """A child's view of the list: `changed()` says when the supervisor published a new one."""

    def __init__(self, paths: dict, ctl, first: str):
        self.paths, self.ctl = paths, ctl
        self.path = paths.get("roster")
        self.seen = ctl["roster_version"]  # before the file: a change after this read shows as changed()
        if self.path is not None and os.path.exists(self.path):
            self.current = read(self.path)  # now, not what the list was when the process was spawned
        else:
            self.current = list(paths["buildings"]) if "buildings" in paths else [first]  # may be empty (leases)

    def changed(self) -> tuple[list[str], list[str]] | None:
        """(added, removed) since the last call, or None (the usual case: one float compared)."""
        if self.path is None or self.ctl["roster_version"] == self.seen:
            return None
        self.seen = self.ctl["roster_version"]
        new = read(self.path)
        old = set(self.current)
        added, removed = [b for b in new if b not in old], [b for b in self.current if b not in set(new)]
        self.current = new
        return added, removed


class Served:
    """The supervisor's side of one building: its shared memory, its lock, its health and state.
    With one building its control block is also the daemon block, and its lock the daemon's."""

    def __init__(self, cfg, paths: dict[str, str]):
        from nilmd.daemon.health import Health

        self.building, self.cfg, self.paths = cfg.building_id, cfg, paths
        self.lock = InstanceLock(paths["lock"])
        self.ring = self.ctl = None
        self.health = Health(cfg)
        self.state = "starting"
        self.problems: list = []  # nilmd.daemon.health.Problem
        self.logged: tuple[str, tuple] = ("starting", ())  # what the journal last said of it (a list's)
        self.run_length = 0

    def open(self, where: str, log, quiet: bool = False) -> None:
        """`quiet`: one of many, its warm restart's info line at debug (the caller sums them up)."""
        # Lock (NilmdError: another daemon serves it), clear a dead run's files, create, restore.
        from nilmd.daemon import snapshot
        from nilmd.daemon.ringbuffer import RingBuffer
        from nilmd.features import N_FEATURES

        self.lock.acquire(self.building, where)
        try:
            stale = [p for key, p in self.paths.items() if key != "lock" and os.path.exists(p)]
            if stale:
                log.warning("removed stale shared memory left by an earlier run: %s", ", ".join(stale))
                for p in stale:
                    os.unlink(p)
            self.ring = RingBuffer.create(self.paths["ring"], self.cfg.ring_capacity, N_FEATURES)
            self.ctl = ControlBlock.create(self.paths["ctl"])
            if self.cfg.mode != "test":  # warm restart: before any child touches the ring
                snapshot.restore_at_start(self.cfg, self.ring, self.ctl, _Quiet(log) if quiet else log)
                self.ring.drop_resident()  # from here on this process reads only its header
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for mapped in (self.ring, self.ctl):
            if mapped is not None:
                mapped.unlink()
                mapped.close()
        self.ring = self.ctl = None
        self.lock.release()


class _Quiet:
    """A logger whose info lines go to debug: what one building of a thousand says at every start."""

    def __init__(self, log):
        self.info, self.warning, self.error = log.debug, log.warning, log.error


FILES_PER_BUILDING, FILES_BASE = 3, 64  # ring, block and lock per building; the process's own


def open_files_needed(buildings: int) -> int:
    return FILES_PER_BUILDING * buildings + FILES_BASE


def building_bytes(cfg) -> int:
    """Shared memory a building takes in the runtime dir: its ring and its control block."""
    from nilmd.daemon import control
    from nilmd.daemon.ringbuffer import file_size
    from nilmd.features import N_FEATURES

    return file_size(cfg.ring_capacity, N_FEATURES) + control.SIZE


def list_problem(cfg, total: int, added: int, log) -> str | None:
    """Why a list of `total` buildings, `added` of them new, cannot be served whole here (the open
    files limit, raised first as far as it goes; the free space of the runtime dir for the new
    rings), or None. Checked before anything changes, so a list is applied whole or not at all."""
    raise_open_files(total, log)
    need, soft = open_files_needed(total), resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < need:
        return (f"{total} buildings need about {need} open files and the limit is {soft} (systemd: "
                f"LimitNOFILE={need} or more in a drop-in)")
    per = building_bytes(cfg)
    st = os.statvfs(cfg.runtime_dir)
    free = st.f_bavail * st.f_frsize
    if added * per > free:
        return (f"its {added} new buildings need {added * per / 1e6:.1f} MB of shared memory in {cfg.runtime_dir} "
                f"({per / 1e3:.0f} kB each with NILMD_RING_CAPACITY={cfg.ring_capacity}) and {free / 1e6:.1f} MB "
                "are free")
    return None


def raise_open_files(buildings: int, log) -> None:
    """Each building keeps open files in every process (its ring's fd, for the flock, and its block;
    the supervisor its lock too): with many, the soft RLIMIT_NOFILE (often 1024) goes up to the hard
    one, which the children inherit. Too low a hard limit is said at once (systemd: LimitNOFILE=)."""
    need = open_files_needed(buildings)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    top = hard if hard != resource.RLIM_INFINITY else max(need, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    except OSError as e:  # the unit's SystemCallFilter=~@resources refuses setrlimit: its LimitNOFILE= decides
        log.warning("%d buildings need about %d open files and the limit is %d; it cannot be raised here (%s): "
                    "raise it (systemd: LimitNOFILE=%d in a drop-in)", buildings, need, soft, e.strerror or e, need)
        return
    log.info("open files limit raised from %d to %d for %d buildings", soft, top, buildings)
    if top < need:
        log.warning("%d buildings need about %d open files, and the hard limit is %d: raise it (systemd: "
                    "LimitNOFILE=%d)", buildings, need, hard, need)


class Roster:
    """The supervisor's buildings: what it serves now (`served`, by id in the list's order), their
    shared memory and locks, the daemon block (`ctl`; with one building, that building's block)
    and the list as it changes. `farewell(served)` is called with buildings about to be removed,
    still open, so that their last status can be written."""

    def __init__(self, cfg, client=None, errors=(), throttle=None, farewell=lambda buildings: None):
        self.cfg, self.throttle, self.farewell = cfg, throttle, farewell
        self.log = logging.getLogger("nilmd.supervisor")
        self.listed = bool(cfg.building_ids)  # a list of buildings, else the one --building-id
        self.served: dict[str, Served] = {}
        self.ctl = None
        self.sharing = sharing.Sharing(cfg, client, errors, throttle)  # which of the list is ours
        self.paths = daemon_paths(cfg.runtime_dir, self.sharing.wanted(), self.listed)  # what the children get
        if self.sharing.fence.fenced:  # the children's writes carry this life's lease token
            self.paths["fence_token"] = self.sharing.fence.token
        self.lock = InstanceLock(self.paths["lock"]) if self.listed else None  # one building: its own lock

    def acquire(self) -> None:
        """Own every building's shared memory: refuse if a live nilmd has one, reclaim a dead one's."""
        os.makedirs(self.cfg.runtime_dir, exist_ok=True)
        ids = self.paths["buildings"] if self.listed else [self.cfg.building_id]
        raise_open_files(len(ids), self.log)
        if self.listed:
            self.lock.acquire(f"a list ({self.cfg.building_ids})", self.where())
            for p in (self.paths["ctl"], self.paths["roster"]):
                if os.path.exists(p):
                    os.unlink(p)
            self.ctl = ControlBlock.create(self.paths["ctl"])
            write(self.paths["roster"], ids)
        for b in ids:
            self.open_building(b)
        if not self.listed:
            self.ctl = self.served[self.cfg.building_id].ctl
        elif self.cfg.mode != "test":
            warm = sum(1 for s in self.served.values() if s.ctl["restored_samples"])
            self.log.info("warm restart: %d of %d buildings restored from their ring snapshots", warm, len(ids))

    def open_building(self, b: str) -> None:
        cfg = self.cfg.replace(building_id=b) if self.listed else self.cfg
        served = Served(cfg, building_paths(self.cfg.runtime_dir, b))
        served.open(self.where(), self.log, quiet=self.listed)
        self.served[b] = served

    def where(self) -> str:
        """What this daemon serves, for the lock file and so for a second daemon's error line."""
        if self.cfg.mode == "test":
            return "--mode test"
        from nilmd import redisconn  # imports redis-py: not for a supervisor in test mode (tests/test_layout.py)

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
            self.apply(self.sharing.wanted(), "fenced", "Redis refused their writes: their leases are gone")
        if not self.sharing.due():
            return
        self.sharing.claim()
        self.apply(self.sharing.wanted(), "leases", f"{len(self.sharing.leases.instances)} instances live")

    def reload(self) -> None:
        """SIGHUP with --building-ids @FILE: serve the file's list now (with leases: its buildings held)."""
        try:
            self.sharing.candidates = self.sharing.read()
        except NilmdError as e:
            self.log.error("SIGHUP: the list of buildings is unchanged: %s", e)
            return
        if self.sharing.leases is not None:
            self.sharing.claim()
        self.apply(self.sharing.wanted(), "SIGHUP", self.cfg.building_ids[1:])

    def apply(self, new: list[str], why: str, source: str) -> None:
        """Serve `new` from now on, whole or not at all. The list is checked first (open files, shared
        memory), then the new buildings get their shared memory (and snapshot); if any cannot, those
        opened are closed again and the old list keeps serving (one line). Only then do the removed
        ones get a last status and their files unlinked; the children attach and detach when the
        daemon block says the list moved. The others are not touched."""
        added = [b for b in new if b not in self.served]
        keep = set(new)
        removed = [b for b in self.served if b not in keep]
        if not added and not removed:
            return  # nothing changed: nothing to say (a renewal every few seconds)
        problem = list_problem(self.cfg, len(new), len(added), self.log)
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
        gone = [self.served.pop(b) for b in removed]
        for served in gone:
            served.state = "stopped"
        if gone:
            self.farewell(gone)  # one status write for all of them
        for served in gone:
            served.close()  # the children's mappings stay valid until they let go (the reader's last snapshot)
        self.paths["buildings"] = list(self.served)
        write(self.paths["roster"], self.paths["buildings"])
        self.ctl.add("roster_version")
        self.log.info("%s: buildings: %d added, %d removed, %d served (%s)", why, len(added), len(removed),
                      len(self.served), source)
