"""The control socket: a Unix stream socket speaking length-prefixed msgpack.

Frame: 4-byte big-endian length, then a msgpack map. Requests are
{"op": NAME, ...}; replies are {"ok": true, ...} or {"ok": false, "error": MSG}.
Frames over MAX_FRAME or that do not decode to a map with a known op get an
error reply (or a closed connection); they never reach the daemon's state.
"""
from __future__ import annotations

import asyncio
import logging
import os
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack

from ..errors import ConfigError, DaemonError, StatedError
from ..shm.client import exchange
from .conns import ConnectionLimiter

log = logging.getLogger("stated.control")

MAX_FRAME = 64 * 1024
_LEN = struct.Struct(">I")

Handler = Callable[[dict], Awaitable[dict] | dict]


def encode(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def decode_request(body: bytes, ops: set[str]) -> dict:
    """Validate one request body; raise ValueError with a message for the reply."""
    try:
        req = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (msgpack.UnpackException, ValueError, TypeError) as e:
        raise ValueError(f"malformed frame: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise ValueError("a request is a map with a string 'op'")
    if req["op"] not in ops:
        raise ValueError(f"unknown op {req['op']!r}; known: {', '.join(sorted(ops))}")
    return req


async def serve(path: Path, mode: int, handlers: dict[str, Handler], group_gid: int | None = None, *,
                max_connections: int = 64, idle_timeout: float = 10.0) -> asyncio.Server:
    """Listen on `path` (mode applied before anyone can connect).

    Refuses (DaemonError) if a daemon answers there, and (ConfigError) if something other than a
    socket sits at the path: only a stale socket is ever removed. At most `max_connections` clients;
    a client silent for `idle_timeout` seconds between requests, or that does not read its reply
    within that time, is disconnected (see conns.py).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{path} exists and is not a socket; the daemon will not replace it",
                              field="control_socket")
        if ping(path):
            raise DaemonError(f"another daemon answers on {path}; stop it first")
        path.unlink()
    if not path.parent.is_dir():     # created by us: group may traverse, others may not, whatever the umask
        path.parent.mkdir(parents=True)
        os.chmod(path.parent, 0o750)
        if group_gid is not None:
            os.chown(path.parent, -1, group_gid)
    ops = set(handlers)
    limiter = ConnectionLimiter("control", max_connections, idle_timeout)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tr = writer.transport
        if not limiter.admit(tr):
            return
        try:
            while True:
                limiter.idle(tr)
                try:
                    (n,) = _LEN.unpack(await asyncio.wait_for(reader.readexactly(4), timeout=idle_timeout))
                except asyncio.IncompleteReadError:
                    return
                limiter.busy(tr)
                if n > MAX_FRAME:
                    writer.write(encode({"ok": False, "error": f"frame of {n} bytes exceeds {MAX_FRAME}"}))
                    await asyncio.wait_for(writer.drain(), timeout=idle_timeout)
                    return
                body = await asyncio.wait_for(reader.readexactly(n), timeout=idle_timeout)
                try:
                    req = decode_request(body, ops)
                    answer: Any = handlers[req["op"]](req)
                    if asyncio.iscoroutine(answer):
                        answer = await answer
                    reply = {"ok": True, **answer}
                except (ValueError, StatedError) as e:
                    # `kind` lets a client raise the same StatedError subclass (claim: OwnedElsewhere, ...)
                    reply = {"ok": False, "error": str(e), "kind": type(e).__name__}
                writer.write(encode(reply))
                await asyncio.wait_for(writer.drain(), timeout=idle_timeout)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:   # noqa: BLE001 - one bad client must not take the daemon down
            log.exception("control request failed")
        finally:
            limiter.done(tr)
            if tr.get_write_buffer_size():
                tr.abort()    # a client that does not read its reply must not keep the descriptor
            else:
                writer.close()

    old = os.umask(0o777 & ~mode)     # the socket is born with the right mode: no window
    try:
        server = await asyncio.start_unix_server(handle, path=str(path), backlog=max(8, min(128, max_connections)))
    finally:
        os.umask(old)
    os.chmod(path, mode & 0o770)
    if group_gid is not None:
        os.chown(path, -1, group_gid)
    return server


def remove_socket(path: Path, ident: tuple[int, int] | None) -> None:
    """Unlink the control socket at shutdown, only if it is still the one we bound ((st_dev, st_ino))."""
    if ident is None:
        return
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == ident:
        path.unlink()
    else:
        log.warning("control socket %s was replaced while we ran; leaving it in place", path)


def request(path: Path | str, op: str, timeout: float = 10.0, **args: Any) -> dict:
    """Send one request and wait for the reply (the shared blocking client, shm/client.py).
    Raises OSError/ConnectionError if no daemon answers, DaemonError if it refuses."""
    reply = exchange(path, op, timeout, **args)
    if not reply.get("ok"):
        raise DaemonError(f"daemon refused {op!r}: {reply.get('error')}")
    return reply


def ping(path: Path | str) -> bool:
    try:
        request(path, "ping", timeout=2)
        return True
    except (OSError, StatedError, ValueError):
        return False
