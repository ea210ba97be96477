"""`stated run`: the daemon's one lifecycle — start-up, run, bounded shutdown.

Modelled on gunicorn's arbiter: signal handlers only set flags and wake the
main loop; everything else happens in the loop, in order. The daemon is never
on a worker's hot path: workers keep running while it restarts, and SIGTERM
leaves every segment in place for the next start to adopt.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field

from . import config as config_mod
from . import provision
from .allocator import Allocator
from .config import Config
from .errors import StatedError
from .owners import Liveness
from .segment import Segment

log = logging.getLogger("stated.daemon")

SHUTDOWN_TIMEOUT = 4.0   # seconds; systemd's TimeoutStopSec is longer


@dataclass
class TableState:
    """What the daemon holds per table."""

    name: str
    seg: Segment
    alloc: Allocator
    created: bool
    pass_errors: int = 0
    extra: dict = field(default_factory=dict)


class Daemon:
    def __init__(self, config_path: str | None, *, proc_root: str = "/proc", clock=time.monotonic):
        self.config_path = config_path
        self.proc_root = proc_root
        self.clock = clock
        self.liveness = Liveness(proc_root)
        self.cfg: Config | None = None
        self.tables: dict[str, TableState] = {}
        self._stop = False
        self._reload = False
        self._wake: asyncio.Event | None = None

    # ---- signals: flags only --------------------------------------------------------------
    def _on_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stop = True
        elif signum == signal.SIGHUP:
            self._reload = True
        if self._wake is not None:
            self._wake.set()

    # ---- lifecycle ----------------------------------------------------------------------------
    def startup(self) -> None:
        """Load config and bring every table up. Raises StatedError: the daemon must not start."""
        self.cfg = config_mod.load(self.config_path)
        if os.geteuid() == 0:
            log.warning("running as root: the systemd unit (systemd/stated.service) runs stated as the "
                        "'stated' user instead; do that in production")
        for tc in self.cfg.tables.values():
            seg, created = provision.ensure(tc, self.cfg.daemon)
            alloc = Allocator(seg, table=tc.name, lock_timeout=self.cfg.daemon.lock_timeout,
                              liveness=self.liveness)
            self.tables[tc.name] = TableState(tc.name, seg, alloc, created)

    def run(self) -> int:
        """Run to completion; returns the process exit code."""
        try:
            import uvloop
            loop = uvloop.new_event_loop()
        except ImportError:   # pragma: no cover - uvloop is a dependency; asyncio keeps us alive without it
            log.warning("uvloop unavailable; using asyncio's default loop")
            loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(self._main(loop))
        finally:
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> int:
        self._wake = asyncio.Event()
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(s, self._on_signal, s)
        try:
            self.startup()
        except StatedError as e:
            log.error("start-up failed: %s", e)
            return 1
        log.info("ready: %d tables (%s)", len(self.tables), ", ".join(self.tables))
        tasks = [loop.create_task(self._housekeeping())]
        while not self._stop:
            await self._wake.wait()
            self._wake.clear()
            if self._reload and not self._stop:
                self._reload = False
                self.reload()
        log.info("stopping")
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=SHUTDOWN_TIMEOUT)
        self.shutdown()
        return 0

    def reload(self) -> bool:
        """Re-read the config; keep the last good one when the new one is invalid."""
        try:
            new = config_mod.load(self.config_path)
        except StatedError as e:
            log.error("reload failed, keeping the running config: %s", e)
            return False
        self.cfg = new
        log.info("reloaded %s", self.config_path or config_mod.BUILTIN)
        return True

    def shutdown(self) -> None:
        """Leave every segment in place; just let go of our attachments."""
        for ts in self.tables.values():
            ts.alloc.release_views()
            ts.seg.detach()
        self.tables.clear()
        log.info("stopped; segments left in place")

    # ---- housekeeping ---------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        assert self.cfg is not None
        while True:
            await asyncio.sleep(self.cfg.daemon.repair_interval)
            self.repair_pass()

    def repair_pass(self) -> None:
        """Recreate missing semaphores and repair tables whose intent mark was left behind."""
        assert self.cfg is not None
        for name, ts in self.tables.items():
            tc = self.cfg.tables.get(name)
            if tc is None:
                continue
            try:
                if provision.ensure_semaphore(tc, self.cfg.daemon):
                    ts.alloc._reopen_semaphore()
                    ts.alloc.acquire()
                    try:
                        ts.alloc.repair()
                    finally:
                        ts.alloc.release()
                elif ts.alloc.intent_pending():
                    ts.alloc.acquire()      # acquiring repairs when the intent's setter is dead
                    ts.alloc.release()
            except StatedError as e:
                log.error("table=%s key=%#010x: repair pass failed: %s", name, tc.key, e)
