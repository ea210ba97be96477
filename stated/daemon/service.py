"""What the daemon does about its own process as a service: core dumps, process metrics,
start-up time extensions.

Each is a small function that daemon/cli call with one line, so that the daemon's
lifecycle code stays about tables. OS inputs (/proc root, the notify socket path)
come in as arguments so tests can point them elsewhere.
"""
from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("stated.service")

# coredump_filter bits (core(5)): 1 anonymous shared, 3 file-backed shared, 6 shared huge
# pages, 8 shared DAX. SysV segments are shared memory (shmem, or hugetlbfs with
# SHM_HUGETLB): with any of these bits set, a core dump of the daemon would hold every
# player's record. Private memory (the interpreter's heap) stays in the dump.
SHARED_BITS = (1 << 1) | (1 << 3) | (1 << 6) | (1 << 8)


def protect_core_dumps(proc_root: str | Path = "/proc") -> int | None:
    """Clear the shared-memory bits of this process's coredump_filter; children inherit it.

    Done by the daemon itself at start so it holds however it is started (systemd, a
    container, a terminal); the unit's LimitCORE=0 is a second layer. Returns the new
    filter, or None when /proc does not let us (logged: a missing safeguard is worth a
    warning, not a refusal to run).
    """
    path = Path(proc_root) / "self" / "coredump_filter"
    try:
        old = int(path.read_text().strip(), 16)
        new = old & ~SHARED_BITS
        if new != old:
            path.write_text(f"{new:#x}\n")
        return int(path.read_text().strip(), 16)
    except (OSError, ValueError) as e:
        log.warning("could not keep shared memory out of core dumps (%s: %s); set LimitCORE=0", path, e)
        return None


def register_process_metrics(registry, proc_root: str | Path = "/proc") -> None:
    """process_start_time_seconds, process_resident_memory_bytes, process_cpu_seconds_total,
    process_open_fds, ... (the standard client-library names) in the daemon's registry.

    process_start_time_seconds changing is how the alerts count restarts.
    """
    from prometheus_client import ProcessCollector
    ProcessCollector(registry=registry, proc=str(proc_root))


@contextmanager
def extending_timeout(notify_path: str | None, *, every: float = 5.0, extend: float = 30.0) -> Iterator[None]:
    """While the body runs, tell systemd every `every` seconds that we need `extend` more.

    Start-up (a restore of a large table) and the final snapshot run synchronously and can
    take longer than TimeoutStartSec=/TimeoutStopSec=; EXTEND_TIMEOUT_USEC= keeps systemd
    from killing a daemon that is making progress. It never shortens a timeout (sd_notify(3)).
    A thread, because the body blocks the event loop; it only sends datagrams. A no-op
    without a notify socket.
    """
    if not notify_path:
        yield
        return
    addr = "\0" + notify_path[1:] if notify_path.startswith("@") else notify_path
    msg = f"EXTEND_TIMEOUT_USEC={int(extend * 1e6)}".encode()
    done = threading.Event()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    def send() -> None:
        try:
            sock.sendto(msg, addr)
        except OSError as e:    # full or gone: the next one may get through
            log.debug("notify socket %r: %s", notify_path, e)

    def loop() -> None:
        while not done.wait(every):
            send()

    send()
    t = threading.Thread(target=loop, name="stated-extend-timeout", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join(timeout=every + 1.0)
        sock.close()
