"""`stated run`: the daemon's one lifecycle — start-up, run, bounded shutdown.

Modelled on gunicorn's arbiter: signal handlers only set flags and wake the
main loop; everything else happens on the loop, in order. The daemon is never
on a worker's hot path: workers keep running while it restarts, and SIGTERM
leaves every segment in place for the next start to adopt.

    start-up   descriptor limit -> config -> path and kernel checks -> state_dir lock -> tables
               (create/adopt) -> metrics + control listeners -> READY=1
    run        housekeeping passes (repair, reap, snapshot), watchdog, SIGHUP/`stated reload`;
               snapshots are written by a worker thread (daemon/saves.py), never on the loop
    shutdown   STOPPING=1 -> stop passes (bounded) -> final snapshot (bounded) -> stop listeners
               -> detach, segments stay

Exit codes: 0 after SIGTERM; EXIT_CONFIG (78, sysexits' EX_CONFIG) when the config is
refused before anything was created (invalid file, a control socket path that is not a
socket, a state_dir that is not a directory, tables that cannot fit in shm limits or
memory): restarting cannot help, systemd's RestartPreventExitStatus=78 stops the loop;
1 for everything else (another daemon holds the state_dir, a foreign segment, ...).
"""
from __future__ import annotations

import asyncio
import dataclasses
import grp
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import sysv_ipc

from .. import __version__
from ..errors import ConfigError, KernelLimitError, StatedError
from ..format import config as config_mod
from ..format import segment as fmt
from ..format.config import Config, TableConfig
from ..persist.saver import Saver
from ..persist.snapshot import SnapshotFailed
from ..shm.allocator import Allocator
from ..shm.owners import DEAD, Liveness, Owner
from ..shm.segment import Segment, Trust
from . import control, instance, kernel, provision
from .conns import fit_limit
from .metrics import DaemonMetrics
from .metrics import serve as serve_metrics
from .notify import Notifier
from .saves import Saves
from .service import extending_timeout
from .status import TableStats, segment_stats

log = logging.getLogger("stated.daemon")

SHUTDOWN_TIMEOUT = 4.0   # seconds; systemd's TimeoutStopSec is longer
STORE_FINAL_FLUSH = 5.0  # seconds for the last write-behind at SIGTERM (unsaved records stay marked)
# How long the loop waits, at most, for the GIL while the snapshot thread holds it (CPython's default is
# 5 ms). Each request is a few loop callbacks, each taking the GIL again: at 5 ms a scrape during a save
# of 200k records took 40-80 ms, at 1 ms about 20 (bench/README.md).
GIL_SWITCH_INTERVAL = 0.001
FINAL_SAVE_TIMEOUT = 120.0   # seconds for the saves at SIGTERM (systemd's timeout is extended meanwhile)
STUCK_LOCK_AFTER = 30.0      # seconds one live holder may keep the lock word, with no new acquisition, until cleared
EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 78      # the same numbers as cli.EXIT_*
SHM_DEST = 0o1000        # shm_perm.mode bit: the segment was removed (IPC_RMID) and lives on only while attached


def raise_nofile_limit() -> int:
    """Raise the soft descriptor limit to the hard one (systemd's default soft limit is 1024); return it.

    Connections, /proc reads and snapshot files all need descriptors; running out must never happen
    because of a default nobody chose.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, e)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


@dataclass
class TableState:
    """What the daemon holds per table."""

    name: str
    tc: TableConfig
    seg: Segment
    alloc: Allocator
    how: str                      # created / adopted / restored
    saver: Saver | None = None
    dirty: int = 0
    lost: int = 0                 # times its segment was removed from its key under us
    down: bool = False            # removed and not recreated yet
    saved_after_loss: bool = False
    last_error: str = ""          # the last recreate failure, logged once (not every pass)
    lock_seen: tuple[int, int, float] | None = None   # (lock word, lock_seq, since): the stuck-lock watch


class Daemon:
    """The daemon of one loaded config. OS inputs (environment for systemd notify, /proc, /proc/sys,
    clocks) come in through the constructor so tests run the real code on their own resources."""

    def __init__(self, cfg: Config, *, env: Mapping[str, str] | None = None,
                 proc_root: str = "/proc", sysctl_root: str = "/proc/sys", wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, migrate: bool = False, allow_lossy: bool = False,
                 force: bool = False):
        self.cfg = cfg
        # what reload() reads again (None: the built-in default)
        self.config_path: str | None = None if cfg.path == config_mod.BUILTIN else cfg.path
        self.migrate, self.allow_lossy, self.force = migrate, allow_lossy, force
        self.sysctl_root = sysctl_root
        self.meminfo = f"{proc_root}/meminfo"
        self.nofile = 1024
        self._lock: instance.InstanceLock | None = None
        self._control_ident: tuple[int, int] | None = None
        self.wall = wall
        self.monotonic = monotonic     # durations (dead-owner grace): immune to wall-clock steps
        self.liveness = Liveness(proc_root)
        self.notifier = Notifier(env)
        self.store: Any = None          # stated.persist.store.flush.Store when [store] is configured (loaded only then)
        self.metrics = DaemonMetrics(self.stats, lambda: self.store)
        self.tables: dict[str, TableState] = {}
        self.broken: dict[str, str] = {}      # tables not served, with the reason (status, metrics)
        self._gone_since: dict[tuple, float] = {}   # (table, owner entry) -> monotonic time first seen gone
        self.metrics_port: int | None = None
        self.started_at = wall()
        self._stop = False
        self._reload = False
        self._wake: asyncio.Event | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self.saves = Saves()                  # snapshots off the loop, one at a time per table
        self.final_save_timeout = FINAL_SAVE_TIMEOUT

    # ---- signals: flags only --------------------------------------------------------------
    def _on_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stop = True
        elif signum == signal.SIGHUP:
            self._reload = True
        if self._wake is not None:
            self._wake.set()

    # ---- lifecycle ----------------------------------------------------------------------------
    def run(self) -> int:
        """Run to completion; returns the process exit code."""
        self.nofile = raise_nofile_limit()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        try:
            import uvloop
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:   # pragma: no cover - uvloop is a dependency; asyncio keeps us alive without it
            log.warning("uvloop unavailable; using asyncio's default loop")
            loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(self._main(loop))
        finally:
            loop.close()

    def startup(self) -> None:
        """Check paths and the kernel, lock the state_dir, bring every table up.

        Raises ConfigError (nothing was created: exit 78) or another StatedError: do not start.
        """
        cfg = self.cfg
        config_mod.preflight(cfg)
        kernel.check(cfg, self.sysctl_root, meminfo=self.meminfo)
        if os.geteuid() == 0:
            log.warning("running as root: in production run stated as the 'stated' user through "
                        "systemd/stated.service (User=stated), with workers in group 'stated'")
        self._make_state_dir()
        self._lock = instance.acquire(cfg.daemon.state_dir)
        for tc in cfg.tables.values():
            try:
                self._add_table(tc)
            except MemoryError:    # shmget's ENOMEM: the checks above could not see it coming (overcommit)
                raise KernelLimitError(f"table {tc.name!r}: the kernel has no memory for its "
                                       f"{kernel.segment_size(tc)}-byte segment: lower its capacity") from None
        if cfg.store is not None:
            self._start_store()

    def _start_store(self) -> None:
        """The write-behind store: only imported (with asyncpg) when [store] is configured. Connecting
        happens in the store loop: an unreachable database at start is logged and retried, never fatal."""
        assert self.cfg is not None and self.cfg.store is not None
        from ..format.store_config import redact
        from ..persist.store.flush import Store
        self.store = Store(self.cfg.store, migrate=self.migrate, allow_lossy=self.allow_lossy,
                           on_flush=self.metrics.store_flush.observe)
        for ts in self.tables.values():
            self._store_table(ts)
        log.info("store: %s as host_id=%s, stored tables: %s", redact(self.cfg.store.dsn), self.cfg.store.host_id,
                 ", ".join(self.store.tables) or "none")

    def _store_table(self, ts: TableState) -> None:
        if self.store is None or not ts.tc.store:
            return
        self.store.add_table(ts.name, ts.tc.layout, ts.alloc, ts.seg)
        if ts.how == "restored":        # rebuilt from snapshots after a reboot: the marks were lost with memory
            n = self.store.mark_all(ts.name)
            log.info("store: table=%s restored from snapshots: %d records queued for the database", ts.name, n)

    def _make_state_dir(self) -> None:
        """Create state_dir if missing: mode from the config (x bits added), its group, whatever the umask."""
        d = self.cfg.daemon
        if os.path.isdir(d.state_dir):
            return
        d.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(d.state_dir, (d.mode & 0o770) | ((d.mode & 0o440) >> 2))
        if d.group:
            os.chown(d.state_dir, -1, grp.getgrnam(d.group).gr_gid)

    def _add_table(self, tc: TableConfig) -> bool:
        """Bring one table up. A table that cannot be (foreign or damaged segment, bad snapshot,
        layout change without --migrate) is logged and recorded in `broken`, and the others are
        served: one broken table must not take the rest down. Reload retries it."""
        try:
            seg, how, restored = provision.ensure(tc, self.cfg.daemon, migrate=self.migrate,
                                                  allow_lossy=self.allow_lossy, force=self.force)
        except (StatedError, sysv_ipc.Error, OSError) as e:
            log.error("table=%s key=%#010x: not served: %s", tc.name, tc.key, e)
            self.broken[tc.name] = f"{type(e).__name__}: {e}"
            return False
        self.broken.pop(tc.name, None)
        alloc = Allocator(seg, table=tc.name, lock_timeout=self.cfg.daemon.lock_timeout, liveness=self.liveness,
                          trust=Trust.daemon(self.cfg.daemon.mode))
        ts = self.tables[tc.name] = TableState(tc.name, tc, seg, alloc, how)
        ts.saver = Saver(tc, seg, alloc, self.cfg.daemon)
        self.metrics.snapshot_failures.labels(tc.name)     # exported at 0 from the start
        self.metrics.restored.labels(tc.name).inc(restored if how == "restored" else 0)
        self.metrics.migrated.labels(tc.name).inc(restored if how == "migrated" else 0)
        self._count_dirty(self.tables[tc.name])
        return True

    async def _listen(self) -> None:
        d = self.cfg.daemon
        conns = fit_limit(d.max_connections, self.nofile)
        if conns < d.max_connections:
            log.warning("max_connections %d per listener does not fit the descriptor limit %d; using %d "
                        "(raise LimitNOFILE= in the unit)", d.max_connections, self.nofile, conns)
        host, _, port = d.metrics_address.rpartition(":")
        srv = await serve_metrics(self.metrics, host.strip("[]"), int(port), max_connections=conns,
                                  idle_timeout=d.idle_timeout)
        self._servers.append(srv)
        self.metrics_port = srv.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)
        gid = grp.getgrnam(d.group).gr_gid if d.group else None
        handlers: dict[str, control.Handler] = {
            "ping": lambda req: {"pid": os.getpid()}, "status": self._op_status, "reload": self._op_reload,
            "reap": self._op_reap, "snapshot": self._op_snapshot,
            "store_claim": self._op_store_claim, "store_flush": self._op_store_flush,
            "store_release": self._op_store_release, "store_status": self._op_store_status,
            "store_export": self._op_store_export}
        self._servers.append(await control.serve(d.control_socket, d.mode, handlers, gid, max_connections=conns,
                                                 idle_timeout=d.idle_timeout))
        st = os.lstat(d.control_socket)
        self._control_ident = (st.st_dev, st.st_ino)
        log.info("control socket %s (at most %d connections per listener, idle timeout %gs)", d.control_socket,
                 conns, d.idle_timeout)

    async def _main(self, loop: asyncio.AbstractEventLoop) -> int:
        self._wake = asyncio.Event()
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(s, self._on_signal, s)
        try:
            with extending_timeout(self.notifier.path):    # restores can outlast TimeoutStartSec=
                self.startup()
            await self._listen()
        except ConfigError as e:
            log.error("config refused: %s", e)
            await self._close_servers()
            self._detach_all()
            self._unlock()
            return EXIT_CONFIG
        except (StatedError, OSError) as e:
            log.error("start-up failed: %s", e)
            await self._close_servers()
            self._detach_all()
            self._unlock()
            return EXIT_ERROR
        tasks = [loop.create_task(self._every("repair", lambda: self.cfg.daemon.repair_interval, self.repair_pass)),
                 loop.create_task(self._every("reap", lambda: self.cfg.daemon.reap_interval, self.reap_pass)),
                 loop.create_task(self._every("snapshot", lambda: self.cfg.daemon.snapshot_interval,
                                              self.snapshot_pass))]
        if self.notifier.watchdog_usec:
            tasks.append(loop.create_task(self._watchdog()))
        if self.store is not None:
            tasks.append(loop.create_task(self._store_loop()))
        log.info("ready: %d tables (%s), pid %d", len(self.tables), ", ".join(self.tables), os.getpid())
        self.notifier.ready(self.summary())
        while not self._stop:
            await self._wake.wait()
            self._wake.clear()
            if self._reload and not self._stop:
                self._reload = False
                self.reload()
        log.info("stopping")
        self.notifier.stopping()
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=SHUTDOWN_TIMEOUT)
        with extending_timeout(self.notifier.path):        # can outlast TimeoutStopSec=
            if self.store is not None:    # the final flush, bounded; what stays unsaved stays marked
                await self.store.final_flush(STORE_FINAL_FLUSH)
                await self.store.close()
            await self._final_snapshot()
        await self._close_servers()
        self._detach_all()
        self.saves.shutdown()
        self._unlock()
        self.notifier.close()
        log.info("stopped; segments left in place")
        return EXIT_OK

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    async def _close_servers(self) -> None:
        for srv in self._servers:
            srv.close()
        for srv in self._servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), timeout=1.0)
            except TimeoutError:
                pass
        self._servers.clear()
        if self.cfg is not None:     # only the socket we bound: never another daemon's, never an operator's file
            control.remove_socket(self.cfg.daemon.control_socket, self._control_ident)
            self._control_ident = None

    async def _final_snapshot(self) -> None:
        """Save every table once more (after any save still running), within final_save_timeout. A table
        whose save outlasts it is logged and left attached (its thread still reads it); the exit goes on."""
        try:
            await asyncio.wait_for(self.snapshot_pass(), timeout=self.final_save_timeout)
        except TimeoutError:
            log.error("final snapshot did not finish within %gs; exiting without it for table(s) %s",
                      self.final_save_timeout, ", ".join(n for n in self.tables if self.saves.running(n)) or "-")

    def _detach_all(self) -> None:
        if self.store is not None:
            self.store.close_tables()
        for name, ts in self.tables.items():
            if self.saves.running(name):    # its save's thread still reads the segment: the exit detaches it
                continue
            if ts.saver is not None:
                ts.saver.close()
            ts.alloc.release_views()
            ts.seg.detach()
        self.tables.clear()

    def reload(self) -> bool:
        """Re-read the config; keep the last good one when the new one is invalid.

        Reloadable: intervals, lock timeout, dead-owner policy and grace, new tables.
        A table whose key, capacity or layout changed keeps running as before (restart
        with --migrate for that); listener addresses need a restart.
        """
        self.notifier.reloading()
        try:
            new = config_mod.load(self.config_path)
        except StatedError as e:
            log.error("reload failed, keeping the running config: %s", e)
            self.notifier.ready(self.summary())
            return False
        for name, tc in new.tables.items():
            ts = self.tables.get(name)
            if ts is None:
                self.cfg = new
                if self._add_table(tc):
                    self._store_table(self.tables[name])
                    log.info("reload: table=%s added", name)
            elif (tc.key, tc.capacity, tc.layout.hash) != (ts.tc.key, ts.tc.capacity, ts.tc.layout.hash):
                log.error("reload: table=%s changed key, capacity or layout; keeping the running one "
                          "(restart with --migrate to change it)", name)
                new.tables[name] = ts.tc
            else:
                ts.tc = tc
                ts.alloc.lock_timeout = new.daemon.lock_timeout
        old_d = self.cfg.daemon
        if new.daemon.state_dir != old_d.state_dir:    # the lock is on the running one: never write elsewhere
            log.error("reload: state_dir changes need a restart; keeping %s", old_d.state_dir)
            new = dataclasses.replace(new, daemon=dataclasses.replace(new.daemon, state_dir=old_d.state_dir))
        if (new.daemon.metrics_address, new.daemon.control_socket, new.daemon.max_connections,
                new.daemon.idle_timeout) != (old_d.metrics_address, old_d.control_socket, old_d.max_connections,
                                             old_d.idle_timeout):
            log.warning("reload: metrics_address/control_socket/max_connections/idle_timeout changes take effect "
                        "at the next restart")
        if new.store != self.cfg.store:
            log.warning("reload: [store] changes take effect at the next restart")
            new = dataclasses.replace(new, store=self.cfg.store)
        self.cfg = new
        log.info("reloaded %s", self.config_path or config_mod.BUILTIN)
        self.notifier.ready(self.summary())
        return True

    # ---- housekeeping ---------------------------------------------------------------------
    async def _every(self, name: str, interval, fn) -> None:
        hist = self.metrics.housekeeping.labels(name)
        while True:
            await asyncio.sleep(interval())
            t0 = time.perf_counter()
            try:
                await fn()
            except Exception:   # noqa: BLE001 - a failing pass is logged and retried, never fatal
                log.exception("%s pass failed", name)
            hist.observe(time.perf_counter() - t0)

    async def _store_loop(self) -> None:
        """Write-behind every flush_interval, at a fixed rate (a long pass is not followed by a full
        interval of sleep: the lag stays near one interval plus one pass)."""
        assert self.store is not None and self.cfg is not None and self.cfg.store is not None
        while True:
            t0 = self.monotonic()
            try:
                await self.store.tick()
            except Exception:   # noqa: BLE001 - a failing pass is logged and retried, never fatal
                log.exception("store pass failed")
            await asyncio.sleep(max(0.01, self.cfg.store.flush_interval - (self.monotonic() - t0)))

    async def _watchdog(self) -> None:
        period = self.notifier.watchdog_usec / 2e6
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(period)

    async def repair_pass(self) -> None:
        """Per table: notice a segment removed from its key (save it, recreate the table), restore a
        scribbled header from the validated copy, recreate a removed semaphore, repair a table left
        mid-update, audit the allocator state against the slot table (rebuilding what is derivable),
        refresh the dirty count. A table whose state cannot be rebuilt is logged; the other tables are
        not affected. The dirty count (O(capacity) column copies) runs in the worker thread, after any
        save of the table, so the loop stays free."""
        for name, ts in list(self.tables.items()):
            if ts.down or not self.segment_on_key(ts):
                try:
                    await self._segment_lost(ts)
                except Exception:   # noqa: BLE001 - one broken table must not stop the pass for the others
                    log.exception("table=%s key=%#010x: handling the removed segment failed", name, ts.tc.key)
            self._repair_table(ts)
            # the dirty count is three column copies (tens of ms for a million slots): in the worker thread
            ts.dirty = await self.saves.run(name, lambda ts=ts: ts.alloc.views.marked_slots())
        self.notifier.status(self.summary())

    def _repair_table(self, ts: TableState) -> None:
        """repair_pass's work on one table, on the loop: the allocator's core is used by one thread only
        (shm/allocator.py), and its checks run in C."""
        name = ts.name
        try:
            fixed = ts.seg.repair_header()
            if fixed:
                log.error("table=%s key=%#010x: header was overwritten (%s); restored from the validated "
                          "copy", name, ts.tc.key, fixed)
            if provision.ensure_semaphore(ts.tc, self.cfg.daemon):
                ts.alloc.reopen_semaphore()
                ts.alloc.acquire()
                try:
                    ts.alloc.repair()     # whoever ran under the old semaphore may have raced
                finally:
                    ts.alloc.release()
            elif ts.alloc.intent_pending():
                ts.alloc.acquire()        # acquiring repairs when the intent's setter is dead
                ts.alloc.release()
            self._watch_lock(ts)
            problems = ts.alloc.audit()
            if problems:
                log.error("table=%s key=%#010x: allocator state disagreed with the slot table (%s); rebuilt",
                          name, ts.tc.key, "; ".join(problems))
        except StatedError as e:
            log.error("table=%s key=%#010x: repair pass failed: %s", name, ts.tc.key, e)

    def _watch_lock(self, ts: TableState) -> None:
        """Clear a lock word that has named the same holder, with no acquisition in between, for
        STUCK_LOCK_AFTER seconds. A dead holder's word is taken over by the next waiter; this is for
        a word naming a *live* process that is not inside (a stale value written back over the word):
        every acquire would time out for as long as that process lives. A section lasts microseconds,
        a rebuild of a huge table well under a second, so half a minute is no legitimate hold; the core
        still refuses when the holder is stopped (SIGSTOP, a debugger) and could resume inside."""
        word, seq = ts.alloc.lock_state()
        now = self.monotonic()
        if word == 0 or ts.lock_seen is None or ts.lock_seen[:2] != (word, seq):
            ts.lock_seen = None if word == 0 else (word, seq, now)
            return
        held = now - ts.lock_seen[2]
        if held >= STUCK_LOCK_AFTER and ts.alloc.clear_lock(word):
            log.error("table=%s key=%#010x pid=%d: the lock word named live pid %d for %.0fs without a new "
                      "acquisition (no section lasts that long: a stale word); cleared it", ts.name, ts.tc.key,
                      os.getpid(), word & ((1 << fmt.LOCK_PID_BITS) - 1), held)
            ts.lock_seen = None

    # ---- a table's segment removed under us (ipcrm -M) -------------------------------------------
    def segment_on_key(self, ts: TableState) -> bool:
        """Our segment still sits on the table's key (not removed with IPC_RMID, e.g. `ipcrm -M`)."""
        try:
            return not ts.seg.shm.mode & SHM_DEST
        except sysv_ipc.Error:
            return False

    async def _segment_lost(self, ts: TableState) -> None:
        """The table's segment was removed from its key while we (and maybe workers) are still attached.

        What we do, in order, one step per pass until done:
        1. log an error; stated_table_up{table} is 0 from now on (read at scrape time);
        2. take a full snapshot from the copy we are still attached to (if it fails, retry next pass:
           recreating from an older snapshot would throw away what the removed copy still holds);
        3. recreate the table on its key from that snapshot so new workers can attach again, carrying
           over owners whose process is still running (their name stays taken: no second writer under it).
        Workers still attached to the removed copy keep running on it; whatever they change after the
        snapshot is lost when they restart and attach to the new segment, which the log says.
        """
        tc = ts.tc
        if not ts.down:
            ts.down, ts.saved_after_loss = True, False
            ts.lost += 1
            try:
                others = ts.seg.shm.number_attached - 1
            except sysv_ipc.Error:
                others = -1
            log.error("table=%s key=%#010x shmid=%d: the table's segment was removed from its key (ipcrm -M?) "
                      "while %d other process(es) are attached to it; saving it and recreating the table",
                      tc.name, tc.key, ts.seg.shm.id, others)
        if not ts.saved_after_loss and ts.saver is not None:
            try:
                r = await self.saves.save(ts, "full")
            except SnapshotFailed as e:
                self.metrics.snapshot_failures.labels(tc.name).inc()
                log.error("table=%s: snapshot of the removed segment failed (%s); not recreating the table from "
                          "older snapshots, retrying next pass", tc.name, e)
                return
            ts.saved_after_loss = True
            log.info("table=%s: full snapshot %s of the removed segment: %d records", tc.name, r.path.name, r.records)
        async with self.saves.exclusive(ts.name):       # no save reads the old segment while it is swapped
            await self._recreate(ts)

    async def _recreate(self, ts: TableState) -> None:
        tc, dc = ts.tc, self.cfg.daemon
        # provision.ensure adopts a valid stated segment that appeared on the key (a `stated restore`?),
        # refuses anybody else's, and otherwise restores from the newest snapshot: the one just taken.
        # Our semaphore is still on the key; segment.create reuses it (it is ours: provenance checked).
        # On the loop, like start-up: the restore repairs through an allocator core, which only this
        # thread uses (shm/allocator.py).
        try:
            seg, how, n = provision.ensure(tc, dc)
        except (StatedError, OSError, MemoryError) as e:
            self._recreate_failed(ts, str(e))
            return
        alloc = Allocator(seg, table=tc.name, lock_timeout=dc.lock_timeout, liveness=self.liveness,
                          trust=Trust.daemon(dc.mode))
        carried = self._carry_owners(ts.alloc, alloc)
        try:
            others = ts.seg.shm.number_attached - 1
        except sysv_ipc.Error:
            others = 0
        old_id = ts.seg.shm.id
        if ts.saver is not None:
            ts.saver.close()
        ts.alloc.release_views()
        ts.seg.detach()
        ts.seg, ts.alloc, ts.how, ts.down, ts.last_error = seg, alloc, "recreated", False, ""
        ts.saver = Saver(tc, seg, alloc, dc)
        if self.store is not None and tc.name in self.store.tables:
            self.store.rebind(tc.name, alloc, seg)
        self._count_dirty(ts)
        log.warning("table=%s key=%#010x shmid=%d: recreated (%s, %d records) in place of removed shmid %d; "
                    "%d owner(s) still running keep their names; %d process(es) still attached to the removed "
                    "copy: restart them (their changes since the snapshot are lost)", tc.name, tc.key, seg.shm.id,
                    how, n, old_id, carried, others)

    def _recreate_failed(self, ts: TableState, why: str) -> None:
        """Logged as an error once per distinct reason (the pass retries every repair_interval)."""
        level = logging.DEBUG if why == ts.last_error else logging.ERROR
        ts.last_error = why
        log.log(level, "table=%s key=%#010x: cannot recreate the table (retrying every pass; new workers cannot "
                "attach meanwhile): %s", ts.tc.name, ts.tc.key, why)

    def _carry_owners(self, old: Allocator, new: Allocator) -> int:
        """Owners attached to the removed copy whose process still runs stay attached (same pid and start
        time) in the new segment, so a second worker cannot take their name while they live."""
        running = {o.index: o for o in old.owners()
                   if o.state == fmt.OWNER_ATTACHED and self.liveness.state(o.pid, o.start_time) != DEAD}
        if not running:
            return 0
        n = 0
        new.acquire()
        try:
            off = new.seg.header.regions.owners_offset
            for e in new.owners():
                o = running.get(e.index)
                if o is None or o.name != e.name or e.state == fmt.OWNER_ATTACHED:
                    continue
                fmt.OWNER.pack_into(new.seg.buf, off + (e.index - 1) * fmt.OWNER_SIZE, o.name.encode()[:32],
                                    o.pid, fmt.OWNER_ATTACHED, o.start_time, e.slots, 0, e.since_ms)
                n += 1
        finally:
            new.release()
        return n

    async def snapshot_pass(self, kind: str | None = None) -> dict[str, Any]:
        """Save every table (full or delta as the saver decides), in the worker thread, one after the
        other. A failure is logged and counted; the daemon keeps running and the previous snapshots stay
        untouched."""
        out: dict[str, Any] = {}
        for name, ts in list(self.tables.items()):
            if ts.saver is None:
                continue
            try:
                r = await self.saves.save(ts, kind)
            except SnapshotFailed as e:
                log.error("table=%s: snapshot failed: %s", name, e)
                self.metrics.snapshot_failures.labels(name).inc()
                out[name] = {"error": str(e)}
                continue
            self.metrics.snapshot_duration.labels(name).observe(r.seconds)
            log.info("table=%s: %s snapshot %s: %d records, %d bytes in %.3fs", name, r.kind, r.path.name,
                     r.records, r.bytes, r.seconds)
            out[name] = {"path": str(r.path), "kind": r.kind, "records": r.records, "bytes": r.bytes,
                         "seconds": r.seconds}
        return out

    async def reap_pass(self) -> dict[str, int]:
        """Mark owners whose process died; with policy "release", free their slots after the grace."""
        reaped: dict[str, int] = {}
        now = self.monotonic()
        seen: set[tuple] = set()
        for name, ts in list(self.tables.items()):
            for o in ts.alloc.owners():
                if o.state == fmt.OWNER_ATTACHED and self.liveness.state(o.pid, o.start_time) == DEAD:
                    if ts.alloc.set_owner_state(o.index, fmt.OWNER_DEAD, only_pid=o.pid):
                        log.warning("table=%s owner=%s pid=%d died holding %d slots (policy %s)",
                                    name, o.name, o.pid, o.slots, ts.tc.dead_owner)
                    continue   # the grace period starts now
                if o.state not in (fmt.OWNER_DEAD, fmt.OWNER_DETACHED) or not o.slots:
                    continue
                # the grace is measured on our monotonic clock from when we first saw this owner
                # gone (the entry's own time is wall-clock and written by another process)
                gone = (name, o.index, o.pid, o.state, o.since_ms)
                seen.add(gone)
                since = self._gone_since.setdefault(gone, now)
                if ts.tc.dead_owner == "release" and now - since >= ts.tc.dead_owner_grace:
                    n = await self._release_owner(ts, o)
                    if n:
                        log.warning("table=%s owner=%s: released %d slots after %.0fs grace",
                                    name, o.name, n, ts.tc.dead_owner_grace)
                        reaped[name] = reaped.get(name, 0) + n
        self._gone_since = {k: v for k, v in self._gone_since.items() if k in seen}
        return reaped

    async def _release_owner(self, ts: TableState, o: Owner) -> int:
        """Free a gone owner's slots, only after they are saved (by a save started after this call).
        Returns how many were freed."""
        alloc = ts.alloc
        if ts.saver is not None:
            try:
                await self.saves.save(ts)
            except SnapshotFailed as e:
                log.error("table=%s: not releasing %s's slots: snapshot failed: %s", ts.name, o.name, e)
                self.metrics.snapshot_failures.labels(ts.name).inc()
                return 0
        if ts.alloc is not alloc:       # the table was recreated while it saved: the next pass decides again
            return 0
        return alloc.reap_owner(o.index)

    def _count_dirty(self, ts: TableState) -> None:
        """Slots dirty or pinned (the next snapshot must copy them): a C-speed scan of two byte columns."""
        ts.dirty = ts.alloc.views.marked_slots()

    # ---- numbers for metrics / status ----------------------------------------------------------
    def table_stats(self, ts: TableState) -> TableStats:
        """One served table's numbers (the same computation `stated status` does without a daemon),
        plus what only the daemon knows: dirty count of the last pass, up, losses, last snapshot."""
        st = segment_stats(ts.name, ts.seg, ts.alloc.views, self.liveness)
        st.dirty, st.up, st.lost = ts.dirty, self.segment_on_key(ts), ts.lost
        if ts.saver is not None:
            st.snapshot_time, st.snapshot_size = ts.saver.last_success, ts.saver.last_size
        return st

    def stats(self) -> list[TableStats]:
        """Every configured table: served ones with their numbers, broken ones with their error."""
        out = [self.table_stats(ts) for ts in self.tables.values()]
        for name, why in self.broken.items():
            tc = self.cfg.tables.get(name)
            out.append(TableStats(name, tc.key if tc else 0, error=f"not served: {why}", up=False))
        return out

    def summary(self) -> str:
        used = sum(ts.alloc.used() for ts in self.tables.values())
        cap = sum(ts.alloc.capacity for ts in self.tables.values())
        return f"{len(self.tables)} tables, {used}/{cap} slots used"

    # ---- control-socket ops ------------------------------------------------------------------------
    def _op_status(self, req: dict) -> dict:
        rows = [st.to_dict() for st in self.stats()]
        return {"daemon": {"pid": os.getpid(), "version": __version__, "uptime": self.wall() - self.started_at,
                           "metrics_port": self.metrics_port, "config": self.cfg.path},
                "tables": rows}

    def _op_reload(self, req: dict) -> dict:
        ok = self.reload()
        if not ok:
            raise StatedError("the new config is invalid; the daemon keeps the running one (see its log)")
        return {"tables": list(self.tables)}

    async def _op_reap(self, req: dict) -> dict:
        owner = req.get("owner")
        if owner is None:
            return {"reaped": await self.reap_pass()}
        if not isinstance(owner, str):
            raise StatedError("owner must be a name")
        table = req.get("table")
        reaped: dict[str, int] = {}
        found = False
        for name, ts in list(self.tables.items()):
            if table is not None and name != table:
                continue
            for o in ts.alloc.owners():
                if o.name != owner:
                    continue
                found = True
                if o.state == fmt.OWNER_ATTACHED and self.liveness.alive(o.pid, o.start_time):
                    raise StatedError(f"table {name!r}: owner {owner!r} is attached by live pid {o.pid}; "
                                      f"stop that worker first")
                n = await self._release_owner(ts, o)
                log.warning("table=%s owner=%s: released %d slots on request (stated reap --owner)", name, owner, n)
                reaped[name] = n
        if not found:
            raise StatedError(f"no owner named {owner!r}" + (f" in table {table!r}" if table else ""))
        return {"reaped": reaped}

    async def _op_snapshot(self, req: dict) -> dict:
        kind = req.get("kind", "full")
        if kind not in ("full", "delta"):
            raise StatedError(f"kind must be full or delta, got {kind!r}")
        out = await self.snapshot_pass(kind)
        failed = {k: v["error"] for k, v in out.items() if "error" in v}
        if failed:
            raise StatedError(f"snapshot failed: {failed}")
        return {"tables": out}

    # ---- durable store ops (workers' claim/flush/release; stated store ...) ---------------------------
    def _stored(self, req: dict) -> tuple[Any, TableState]:
        from ..errors import StoreError
        name = req.get("table")
        if self.store is None:
            raise StoreError("no [store] is configured: claim, flush and release need the database")
        if not isinstance(name, str) or name not in self.tables:
            raise StoreError(f"no table named {name!r}")
        if name not in self.store.tables:
            raise StoreError(f"table {name!r} is not stored (store = false); claim, flush and release need a "
                             f"stored table")
        return self.store, self.tables[name]

    @staticmethod
    def _owner_index(ts: TableState, owner: Any) -> int:
        if not isinstance(owner, str):
            raise StatedError("owner must be the worker's owner name")
        for o in ts.alloc.owners():
            if o.name == owner and o.state == fmt.OWNER_ATTACHED:
                return o.index
        raise StatedError(f"table {ts.name!r}: no attached owner named {owner!r}; attach with owner=... first")

    @staticmethod
    def _int_arg(req: dict, k: str) -> int:
        v = req.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise StatedError(f"{k} must be a non-negative integer, got {v!r}")
        return v

    async def _op_store_claim(self, req: dict) -> dict:
        store, ts = self._stored(req)
        slot, gen = await store.claim(ts.name, self._int_arg(req, "entity"), self._owner_index(ts, req.get("owner")))
        return {"slot": slot, "generation": gen}

    async def _op_store_flush(self, req: dict) -> dict:
        store, ts = self._stored(req)
        wrote = await store.flush_handle(ts.name, self._int_arg(req, "slot"), self._int_arg(req, "generation"))
        return {"written": wrote}

    async def _op_store_release(self, req: dict) -> dict:
        store, ts = self._stored(req)
        await store.release(ts.name, self._int_arg(req, "slot"), self._int_arg(req, "generation"),
                            self._owner_index(ts, req.get("owner")))
        return {}

    def _op_store_status(self, req: dict) -> dict:
        from ..errors import StoreError
        if self.store is None:
            raise StoreError("no [store] is configured (the default config runs without a database)")
        return {"store": self.store.status()}

    async def _op_store_export(self, req: dict) -> dict:
        store, ts = self._stored(req)
        return {"row": await store.export(ts.name, self._int_arg(req, "entity"))}
