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
"""

from __future__ import annotations

import os
import resource

from nilmd.daemon.snapshot import write_atomic

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
        from nilmd.daemon.instance import InstanceLock

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
        from nilmd.daemon.control import ControlBlock
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
