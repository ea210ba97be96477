"""The systemd notify protocol, without libsystemd.

A datagram to the AF_UNIX socket named by $NOTIFY_SOCKET ('@' means the
abstract namespace). A no-op when the variable is unset, so the daemon runs
the same under systemd, in a terminal and in tests (which bind their own
socket and pass its path in).
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger("stated.notify")


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None):
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

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def send(self, *lines: str) -> bool:
        """Send "KEY=value" lines in one datagram; False (logged) on failure, never raises."""
        if self.path is None:
            return False
        try:
            if self._sock is None:
                # non-blocking: a service manager that stops reading must never stall the event loop
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                           | socket.SOCK_NONBLOCK)
            self._sock.sendto("\n".join(lines).encode(), self.path)
            return True
        except BlockingIOError:
            log.debug("notify socket %r is full; dropped %s", self.path, lines[0])
            return False
        except OSError as e:
            log.warning("notify socket %r: %s", self.path, e)
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
