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
import socket
import struct
from pathlib import Path
from typing import Any, Awaitable, Callable

import msgpack

from .errors import DaemonError, StatedError

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


async def serve(path: Path, mode: int, handlers: dict[str, Handler], group_gid: int | None = None
                ) -> asyncio.AbstractServer:
    """Listen on `path` (mode applied before anyone can connect). Refuses if a daemon answers there."""
    if path.exists():
        if ping(path):
            raise DaemonError(f"another daemon answers on {path}; stop it first")
        path.unlink()
    if not path.parent.is_dir():     # created by us: group may traverse, others may not, whatever the umask
        path.parent.mkdir(parents=True)
        os.chmod(path.parent, 0o750)
        if group_gid is not None:
            os.chown(path.parent, -1, group_gid)
    ops = set(handlers)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    (n,) = _LEN.unpack(await reader.readexactly(4))
                except asyncio.IncompleteReadError:
                    return
                if n > MAX_FRAME:
                    writer.write(encode({"ok": False, "error": f"frame of {n} bytes exceeds {MAX_FRAME}"}))
                    await writer.drain()
                    return
                body = await asyncio.wait_for(reader.readexactly(n), timeout=5)
                try:
                    req = decode_request(body, ops)
                    reply = handlers[req["op"]](req)
                    if asyncio.iscoroutine(reply):
                        reply = await reply
                    reply = {"ok": True, **reply}
                except (ValueError, StatedError) as e:
                    reply = {"ok": False, "error": str(e)}
                writer.write(encode(reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass
        except Exception:   # noqa: BLE001 - one bad client must not take the daemon down
            log.exception("control request failed")
        finally:
            writer.close()

    old = os.umask(0o777 & ~mode)     # the socket is born with the right mode: no window
    try:
        server = await asyncio.start_unix_server(handle, path=str(path))
    finally:
        os.umask(old)
    os.chmod(path, mode & 0o770)
    if group_gid is not None:
        os.chown(path, -1, group_gid)
    return server


def request(path: Path | str, op: str, timeout: float = 10.0, **args: Any) -> dict:
    """Send one request and wait for the reply. Raises ConnectionError if no daemon answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(encode({"op": op, **args}))
        (n,) = _LEN.unpack(_recv(s, 4))
        if n > 16 * MAX_FRAME:
            raise DaemonError(f"reply of {n} bytes is too large")
        reply = msgpack.unpackb(_recv(s, n), raw=False)
    if not reply.get("ok"):
        raise DaemonError(f"daemon refused {op!r}: {reply.get('error')}")
    return reply


def _recv(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("daemon closed the connection")
        buf += chunk
    return bytes(buf)


def ping(path: Path | str) -> bool:
    try:
        request(path, "ping", timeout=2)
        return True
    except (OSError, StatedError, ValueError):
        return False
