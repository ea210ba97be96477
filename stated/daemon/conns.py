"""Bounded client connections for the daemon's listeners (metrics, control).

Every accepted connection costs a descriptor, and a daemon out of descriptors
cannot read /proc, write snapshots or accept the operator's CLI. So each
listener holds at most `limit` connections. When a new one arrives at the limit,
the connection that has been idle the longest (connected but not sending a
request) is closed to make room: a flood of idle connections then only evicts
itself, while a client that sends its request right away is served. When every
connection is busy the newcomer is closed instead. Idle connections are also
closed after `idle_timeout` by the handlers themselves (every read and write
there is bounded by it).

The daemon picks `limit` so that both listeners together leave room for its own
descriptors (see fit_limit).
"""
from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("stated.conns")

FD_RESERVE = 32          # descriptors the daemon keeps for itself: /proc, snapshots, listeners, the loop
WARN_EVERY = 60.0        # seconds between "at its limit" warnings per listener


def fit_limit(configured: int, nofile: int, listeners: int = 2) -> int:
    """Connections per listener that fit in `nofile` descriptors.

    Half of what is left after FD_RESERVE is shared by the listeners; the other half absorbs connections
    accepted in one burst before the over-limit ones are closed.
    """
    room = max(0, nofile - FD_RESERVE) // (2 * listeners)
    return max(1, min(configured, room))


class ConnectionLimiter:
    """The connections of one listener: admit (evicting the longest-idle at the limit), mark busy/idle, done."""

    def __init__(self, name: str, limit: int, idle_timeout: float, clock=time.monotonic):
        self.name, self.limit, self.idle_timeout = name, max(1, limit), idle_timeout
        self.clock = clock
        self._idle_since: dict[asyncio.WriteTransport, float | None] = {}   # None while serving a request
        self.evicted = 0
        self.refused = 0
        self._warned = float("-inf")

    def __len__(self) -> int:
        return len(self._idle_since)

    def admit(self, transport: asyncio.WriteTransport) -> bool:
        """Register a new connection; False (and the connection is aborted) when every slot is busy."""
        if len(self._idle_since) >= self.limit:
            idle = [(since, i, t) for i, (t, since) in enumerate(self._idle_since.items()) if since is not None]
            self._warn()
            if not idle:
                self.refused += 1
                transport.abort()
                return False
            _, _, oldest = min(idle)
            self.evicted += 1
            self.done(oldest)
            oldest.abort()
        self._idle_since[transport] = self.clock()
        return True

    def busy(self, transport: asyncio.WriteTransport) -> None:
        if transport in self._idle_since:
            self._idle_since[transport] = None

    def idle(self, transport: asyncio.WriteTransport) -> None:
        if transport in self._idle_since:
            self._idle_since[transport] = self.clock()

    def done(self, transport: asyncio.WriteTransport) -> None:
        self._idle_since.pop(transport, None)

    def _warn(self) -> None:
        now = self.clock()
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            log.warning("%s listener at its limit of %d connections: closing the longest-idle ones "
                        "(%d evicted, %d refused so far; a connection flood?)", self.name, self.limit,
                        self.evicted, self.refused)
