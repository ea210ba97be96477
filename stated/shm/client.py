"""The blocking client of the daemon's control socket: `exchange` (one request/reply, used by the CLI
through daemon/control.py) and `call` (the worker's claim, flush and release).

Workers never load a database driver, nor asyncio (`stated/control.py` is the daemon's asyncio
server; this is a plain blocking socket speaking the same frames: a 4-byte big-endian length, then a
msgpack map). The daemon's error reply carries the error's class name (`kind`), so the worker raises
the same StatedError subclass: OwnedElsewhere, StoreUnavailable, StoreError, DuplicateEntity, ...
"""
from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any

import msgpack

from .. import errors

_LEN = struct.Struct(">I")
MAX_REPLY = 1 << 20      # a status reply of many tables fits; anything larger is refused


def exchange(path: Path | str, op: str, timeout: float, **args: Any) -> dict:
    """One request/reply on the daemon's control socket, within `timeout` seconds in all; the raw reply
    map. Raises OSError (no daemon, timed out, connection closed) or DaemonError (malformed reply)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        while True:
            try:
                s.connect(str(path))
                break
            except BlockingIOError:      # the listen queue is full (a busy daemon, or a flood): wait a little
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"the daemon on {path} did not accept a connection within "
                                          f"{timeout:g}s") from None
                time.sleep(0.02)
        body = msgpack.packb({"op": op, **args}, use_bin_type=True)
        s.sendall(_LEN.pack(len(body)) + body)
        (n,) = _LEN.unpack(_recv(s, 4))
        if n > MAX_REPLY:
            raise errors.DaemonError(f"reply of {n} bytes is too large")
        reply = msgpack.unpackb(_recv(s, n), raw=False)
    if not isinstance(reply, dict):
        raise errors.DaemonError(f"{op}: malformed reply")
    return reply


def call(path: Path | str, op: str, timeout: float, **args: Any) -> dict:
    """Send one request and wait at most `timeout` seconds in all for the reply.

    Raises StoreUnavailable when the daemon does not answer in time or is not running (the worker
    cannot tell a stuck database from a stuck daemon, and either way the call failed within bounds)."""
    try:
        reply = exchange(path, op, timeout, **args)
    except TimeoutError:
        raise errors.StoreUnavailable(f"{op}: the daemon did not answer within {timeout:g}s") from None
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise errors.StoreUnavailable(f"{op}: no daemon on {path} ({e.strerror}); claim, flush and release go "
                                      f"through the running daemon") from None
    except OSError as e:
        raise errors.StoreUnavailable(f"{op}: control socket {path}: {e.strerror or e}") from None
    if not reply.get("ok"):
        kind = reply.get("kind")
        cls = getattr(errors, kind, None) if isinstance(kind, str) else None
        msg = str(reply.get("error"))
        if isinstance(cls, type) and issubclass(cls, errors.StatedError) and cls is not errors.ConfigError:
            raise cls(msg)
        raise errors.DaemonError(f"daemon refused {op!r}: {msg}")
    return reply


def _recv(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("daemon closed the connection")
        buf += chunk
    return bytes(buf)
