"""The database driver behind one small interface. The ONLY module that imports asyncpg.

Everything else in stated sees `Driver` and stated's errors:

- `StoreUnavailable`: the server could not be reached or did not answer in time (retry later);
- `StoreError`: the server answered no (wrong password, missing database or table, a constraint, a
  malformed DSN). Messages carry the redacted DSN, never a password.

One connection per Driver: the daemon writes behind from one task, and claims are short. asyncpg's
own statement cache is kept (prepared upserts are reused across flushes).
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import asyncpg

from ...errors import StoreError, StoreRetry, StoreUnavailable
from ...format.store_config import redact

__all__ = ["Driver", "connect"]

# errors that mean "the server is not there or went away": retry with backoff
_UNAVAILABLE = (OSError, asyncio.TimeoutError, TimeoutError, ConnectionError, socket.gaierror,
                asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.exceptions.CannotConnectNowError,
                asyncpg.exceptions.ConnectionFailureError, asyncpg.exceptions.AdminShutdownError,
                asyncpg.exceptions.CrashShutdownError, asyncpg.exceptions.TooManyConnectionsError,
                asyncpg.exceptions.InterfaceError)
# a transaction lost to a concurrent one: retrying the same work is correct
_RETRY = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)



def _translate(e: BaseException, dsn: str, what: str) -> StoreError:
    d = redact(dsn)
    if isinstance(e, _RETRY):
        return StoreRetry(f"{what}: {type(e).__name__}: {e}")
    if isinstance(e, asyncpg.exceptions.InvalidPasswordError):
        return StoreError(f"database {d}: password authentication failed for the configured user")
    if isinstance(e, asyncpg.exceptions.InvalidAuthorizationSpecificationError):
        return StoreError(f"database {d}: the server refused the user: {e}")
    if isinstance(e, asyncpg.exceptions.InvalidCatalogNameError):
        return StoreError(f"database {d}: the database does not exist ({e}); create it or fix the dsn")
    if isinstance(e, _UNAVAILABLE):
        msg = str(e) or type(e).__name__
        return StoreUnavailable(f"database {d} unavailable during {what}: {msg}")
    if isinstance(e, asyncpg.exceptions.PostgresError):
        return StoreError(f"database {d}: {what} failed: {type(e).__name__}: {e}")
    if isinstance(e, ValueError):          # asyncpg's DSN parser
        return StoreError(f"malformed dsn {d}: {e}")
    return StoreError(f"database {d}: {what} failed: {type(e).__name__}: {e}")


async def connect(dsn: str, *, timeout: float = 5.0, application_name: str = "stated") -> Driver:
    """Open one connection. Raises StoreUnavailable (unreachable) or StoreError (refused)."""
    try:
        conn = await asyncio.wait_for(
            asyncpg.connect(dsn, timeout=timeout, command_timeout=None,
                            server_settings={"application_name": application_name}),
            timeout=timeout + 0.5)
    except BaseException as e:
        if isinstance(e, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
            raise
        raise _translate(e, dsn, "connect") from None
    return Driver(conn, dsn, timeout)


class Driver:
    """One connection; every call is bounded by `timeout` (or the call's own)."""

    def __init__(self, conn: Any, dsn: str, timeout: float):
        self._conn, self._dsn, self.timeout = conn, dsn, timeout
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed or self._conn.is_closed()

    async def _call(self, what: str, coro, timeout: float | None):
        try:
            return await asyncio.wait_for(coro, timeout=timeout or self.timeout)
        except BaseException as e:
            if isinstance(e, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
            err = _translate(e, self._dsn, what)
            if isinstance(err, StoreUnavailable):
                self.abort()       # the connection is in an unknown state; a new one is made on retry
            raise err from None

    async def execute(self, sql: str, *args: Any, timeout: float | None = None) -> str:
        return await self._call("execute", self._conn.execute(sql, *args), timeout)

    async def fetch(self, sql: str, *args: Any, timeout: float | None = None) -> list[dict]:
        rows = await self._call("query", self._conn.fetch(sql, *args), timeout)
        return [dict(r) for r in rows]

    async def fetchval(self, sql: str, *args: Any, timeout: float | None = None) -> Any:
        return await self._call("query", self._conn.fetchval(sql, *args), timeout)

    @contextlib.asynccontextmanager
    async def transaction(self, timeout: float | None = None) -> AsyncIterator[Driver]:
        """`async with driver.transaction():` BEGIN ... COMMIT (ROLLBACK on error)."""
        tr = self._conn.transaction()
        await self._call("begin", tr.start(), timeout)
        try:
            yield self
        except BaseException:
            if not self._conn.is_closed():
                try:
                    await asyncio.wait_for(tr.rollback(), timeout=timeout or self.timeout)
                except BaseException:  # noqa: BLE001 - the original error matters; the connection is dropped
                    self.abort()
            raise
        await self._call("commit", tr.commit(), timeout)

    async def copy_records(self, table: str, columns: Sequence[str], records: Iterable[tuple],
                           timeout: float | None = None) -> None:
        """COPY rows (binary) into `table` (an unqualified temporary table name, unquoted)."""
        await self._call("copy", self._conn.copy_records_to_table(table, records=records, columns=list(columns)),
                         timeout)

    async def copy_binary(self, table: str, columns: Sequence[str], data: bytes,
                          timeout: float | None = None) -> None:
        """COPY a complete binary-format payload (header, tuples, trailer) into `table` (unquoted name).
        A memoryview: asyncpg would take plain bytes for a file path."""
        await self._call("copy", self._conn.copy_to_table(table, source=memoryview(data), columns=list(columns),
                                                          format="binary"), timeout)

    def abort(self) -> None:
        """Drop the connection at once (no network round trip)."""
        self._closed = True
        try:
            self._conn.terminate()
        except Exception:  # noqa: BLE001 - already gone
            pass

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self._conn.close(), timeout=1.0)
        except BaseException as e:  # noqa: BLE001 - closing a dead connection must not fail shutdown
            if isinstance(e, asyncio.CancelledError):
                raise
            self._conn.terminate()
