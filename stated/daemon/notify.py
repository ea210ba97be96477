"""The systemd notify protocol, without libsystemd.

A datagram to the AF_UNIX socket named by $NOTIFY_SOCKET ('@' means the
abstract namespace). A no-op when the variable is unset, so the daemon runs
the same under systemd, in a terminal and in tests (which bind their own
socket and pass its path in).

READY=1, RELOADING=1 and STOPPING=1 change what systemd believes about the
service (a lost READY fails the start after TimeoutStartSec), so they are sent
reliably: when the socket's receive queue is full, the send waits for room, up to
RELIABLE_TIMEOUT seconds (a kernel send timeout, SO_SNDTIMEO, no busy loop).
STATUS and WATCHDOG are sent best-effort (MSG_DONTWAIT): the next one follows soon,
and the event loop must never stall for them.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Mapping

log = logging.getLogger("stated.notify")

RELIABLE_TIMEOUT = 3.0    # seconds READY/RELOADING/STOPPING wait for room in a full notify queue


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None, reliable_timeout: float = RELIABLE_TIMEOUT):
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET") or None
        if path and path.startswith("@"):
            path = "\0" + path[1:]
        self.path = path
        self.watchdog_usec = 0
        wd = env.get("WATCHDOG_USEC")
        wd_pid = env.get("WATCHDOG_PID")
        if wd and wd.isdigit() and (not wd_pid or wd_pid == str(os.getpid())):
            self.watchdog_usec = int(wd)
        self._sock: socket.socket | None = None
        self.reliable_timeout = reliable_timeout

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def send(self, *lines: str, reliable: bool = False) -> bool:
        """Send "KEY=value" lines in one datagram; False (logged) on failure, never raises.

        reliable=False: dropped if the receiver's queue is full. reliable=True: waits for room, at most
        `reliable_timeout` seconds.
        """
        if self.path is None:
            return False
        try:
            if self._sock is None:
                # blocking, with a kernel send timeout: only reliable sends may wait, and only that long
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sec = int(self.reliable_timeout)
                usec = int((self.reliable_timeout - sec) * 1e6)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", sec, usec))
                self._sock = sock
            data = "\n".join(lines).encode()
            if reliable:
                self._sock.sendto(data, self.path)
            else:
                self._sock.sendto(data, socket.MSG_DONTWAIT, self.path)
            return True
        except BlockingIOError:
            if reliable:
                log.warning("notify socket %r stayed full for %.1fs; %s was not delivered", self.path,
                            self.reliable_timeout, lines[0])
            else:
                log.debug("notify socket %r is full; dropped %s", self.path, lines[0])
            return False
        except OSError as e:
            log.warning("notify socket %r: %s", self.path, e)
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}", reliable=True)

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", reliable=True)

    def stopping(self) -> None:
        self.send("STOPPING=1", reliable=True)

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
