"""Snapshot saves off the event loop.

A full snapshot of a million records is seconds of copying, encoding, writing and fsync. The loop
must go on answering /metrics, the control socket and the watchdog meanwhile, so a save never runs
on it: `Saves.save` hands `Saver.save` to one worker thread and awaits it.

The contract:
- the loop never runs a copy, an encoding or an fsync; it only awaits;
- at most one save runs at a time per table (and, with one thread, at all): a save requested
  while another of the same table runs waits for it, then runs (it must see what changed since;
  a caller that saves before it releases slots gets a save started after its request);
- a table's lock is held from the request until the thread has finished with the table, even
  when the awaiting task is cancelled: whoever swaps or detaches a table's segment takes the
  same lock (`exclusive`) and so never pulls memory from under a running copy;
- the thread is a daemon thread: a save stuck in the kernel (an fsync on a dead disk) cannot hold
  the process's exit, which the daemon's bounded shutdown relies on (it then leaves that table
  attached and exits).

The GIL: the worker's long operations (bulk column copies, crc32, write, fsync) are C calls, most
of which release the GIL; the few pure-Python stretches are bounded by the interpreter's switch
interval (5 ms), so the loop waits for the GIL a few milliseconds at most.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, Future
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

from ..persist.saver import Saver, SaveResult
from ..persist.snapshot import SnapshotFailed

log = logging.getLogger("stated.daemon")
T = TypeVar("T")


class HasSaver(Protocol):
    name: str
    saver: Saver | None


class WorkerThread(Executor):
    """An executor of one daemon thread, started on first use: calls run one at a time, in order."""

    def __init__(self, name: str = "stated-save"):
        self.name = name
        self._q: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple, dict] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._start_lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        f: Future = Future()
        with self._start_lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: shut down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._q.put((f, fn, args, kwargs))
        return f

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            f, fn, args, kwargs = item
            if not f.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:      # noqa: BLE001 - handed to whoever awaits the future
                f.set_exception(e)
            else:
                f.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._start_lock:
            self._closed = True
            thread = self._thread
        self._q.put(None)
        if wait and thread is not None:
            thread.join()


class Saves:
    """Every table's saves, run by one worker thread, one at a time per table (see the module doc)."""

    def __init__(self, executor: Executor | None = None):
        self.executor = executor if executor is not None else WorkerThread()
        self._locks: dict[str, asyncio.Lock] = {}
        self._running: dict[str, asyncio.Future] = {}

    def _lock(self, table: str) -> asyncio.Lock:
        lock = self._locks.get(table)
        if lock is None:
            lock = self._locks[table] = asyncio.Lock()
        return lock

    def running(self, table: str) -> bool:
        """A save (or scan) of `table` is queued or in the worker thread (its memory is being read)."""
        f = self._running.get(table)
        return f is not None and not f.done()

    async def save(self, ts: HasSaver, kind: str | None = None) -> SaveResult:
        """ts.saver.save(kind) in the worker thread, after any save of the table requested earlier.

        The saver is the one the table has when the lock is ours (a recreated table has a new one).
        Raises SnapshotFailed (as Saver.save does, and when the table has no saver)."""
        def with_saver() -> SaveResult:
            saver = ts.saver
            if saver is None:
                raise SnapshotFailed(f"table {ts.name!r} has no saver")
            return saver.save(kind)
        return await self.run(ts.name, with_saver)

    async def run(self, table: str, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the worker thread, holding `table`'s lock from the request until the thread is
        done with it, even if the awaiting task is cancelled meanwhile (the lock then goes with the thread)."""
        lock = self._lock(table)
        await lock.acquire()
        try:
            fut = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        except BaseException:
            lock.release()
            raise
        self._running[table] = fut
        try:
            return await asyncio.shield(fut)
        finally:
            if fut.done():
                lock.release()
            else:       # we were cancelled: the thread still reads the table; the lock goes with it
                fut.add_done_callback(functools.partial(self._orphan_done, table, lock=lock))

    @staticmethod
    def _orphan_done(name: str, f: asyncio.Future, *, lock: asyncio.Lock) -> None:
        lock.release()
        if f.cancelled():
            return
        e = f.exception()
        if e is not None:
            log.error("table=%s: work in the save thread failed after its requester was gone: %s", name, e)

    @asynccontextmanager
    async def exclusive(self, table: str) -> AsyncIterator[None]:
        """No save of `table` runs or starts inside: for swapping or detaching its segment and saver."""
        async with self._lock(table):
            yield

    async def idle(self, timeout: float) -> list[str]:
        """Wait up to `timeout` seconds for every running save to finish; the tables still saving."""
        pending = [f for f in self._running.values() if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        return [name for name in self._running if self.running(name)]

    def shutdown(self) -> None:
        """No more saves; a save still running is left to its (daemon) thread."""
        self.executor.shutdown(wait=False)
