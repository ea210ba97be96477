"""Prometheus metrics: a collector over the shared counters, and the HTTP endpoint.

The collector reads each table's header at scrape time: cost O(tables),
independent of capacity; no per-player, per-slot or per-pid labels. Counters
that workers bump live in shared memory, so they survive worker and daemon
restarts. The dirty-slot count needs a scan, so the housekeeping pass computes
it and the collector reports the last value.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..format import segment as fmt
from .conns import ConnectionLimiter
from .service import register_process_metrics
from .status import TableStats

log = logging.getLogger("stated.metrics")

MAX_REQUEST = 8192


class TableCollector:
    """Reports every table's numbers when Prometheus scrapes.

    `stats` is the injectable input (as prometheus_client's own collectors take theirs): the daemon
    passes its `stats` method, which reads the shared counters at that moment (O(tables)).
    """

    def __init__(self, stats: Callable[[], list[TableStats]]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        L = ["table"]
        slots = GaugeMetricFamily("stated_slots", "Slots by state (orphaned: held by a dead owner)",
                                  labels=["table", "state"])
        capacity = GaugeMetricFamily("stated_capacity_slots", "Slots in the table", labels=L)
        allocs = CounterMetricFamily("stated_allocations", "Slots allocated", labels=L)
        frees = CounterMetricFamily("stated_frees", "Slots freed (by workers and the reaper)", labels=L)
        fails = CounterMetricFamily("stated_alloc_failures", "Allocations refused", labels=["table", "reason"])
        repairs = CounterMetricFamily("stated_lock_repairs",
                                      "Repairs after a lock holder died mid-update", labels=L)
        timeouts = CounterMetricFamily("stated_lock_timeouts", "Allocator lock waits that timed out", labels=L)
        reaped = CounterMetricFamily("stated_reaped_slots", "Slots released from dead owners", labels=L)
        torn = CounterMetricFamily("stated_torn_reads", "Consistent reads that gave up on a dead writer",
                                   labels=L)
        settled = CounterMetricFamily("stated_settled_slots", "Records settled after a writer died mid-write",
                                      labels=L)
        owners = GaugeMetricFamily("stated_owners", "Named owners by liveness (unknown: /proc unreadable, kept "
                                   "as alive)", labels=["table", "state"])
        lost = CounterMetricFamily("stated_table_segment_lost", "Times the table's segment was removed from its "
                                   "key under the daemon", labels=L)
        attached = GaugeMetricFamily("stated_attached_processes", "Processes attached (shm_nattch)", labels=L)
        size = GaugeMetricFamily("stated_segment_size_bytes", "Shared-memory segment size", labels=L)
        rebuilds = CounterMetricFamily("stated_allocator_rebuilds",
                                       "Allocator state found inconsistent with the slot table and rebuilt",
                                       labels=L)
        up = GaugeMetricFamily("stated_table_up", "1 while the daemon serves the table and its segment is on "
                               "its key; 0 when it cannot serve it, or the segment was removed (ipcrm -M) and "
                               "is not recreated yet (see the daemon log and `stated status`)", labels=L)
        dirty = GaugeMetricFamily("stated_dirty_slots",
                                  "Slots changed since the last save (as of the last housekeeping pass)",
                                  labels=L)
        last = GaugeMetricFamily("stated_snapshot_last_success_timestamp_seconds",
                                 "Unix time of the last snapshot written", labels=L)
        snap_size = GaugeMetricFamily("stated_snapshot_size_bytes", "Size of the last snapshot file", labels=L)
        for st in self.stats():
            name = st.table
            if st.error is not None:
                up.add_metric([name], 0)
                continue
            c = st.counters
            slots.add_metric([name, "free"], st.free)
            slots.add_metric([name, "allocated"], st.used - st.orphaned)
            slots.add_metric([name, "orphaned"], st.orphaned)
            capacity.add_metric([name], st.capacity)
            allocs.add_metric([name], c["allocations"])
            frees.add_metric([name], c["frees"])
            fails.add_metric([name, "full"], c["alloc_failures_full"])
            fails.add_metric([name, "duplicate"], c["alloc_failures_duplicate"])
            repairs.add_metric([name], c["lock_repairs"])
            timeouts.add_metric([name], c["lock_timeouts"])
            reaped.add_metric([name], c["reaped_slots"])
            torn.add_metric([name], c["torn_reads"])
            settled.add_metric([name], c["settled_slots"])
            rebuilds.add_metric([name], c["rebuilds"])
            owners.add_metric([name, "alive"], st.owners_alive)
            owners.add_metric([name, "dead"], st.owners_dead)
            owners.add_metric([name, "detached"], st.owners_detached)
            owners.add_metric([name, "unknown"], st.owners_unknown)
            up.add_metric([name], 1 if st.up else 0)
            lost.add_metric([name], st.lost)
            attached.add_metric([name], st.attached)
            size.add_metric([name], st.size_bytes)
            dirty.add_metric([name], st.dirty or 0)
            if st.snapshot_time is not None:
                last.add_metric([name], st.snapshot_time)
                snap_size.add_metric([name], st.snapshot_size)
        yield from (last, snap_size)
        info = GaugeMetricFamily("stated_build_info", "stated version and segment format",
                                 labels=["version", "format_version"])
        info.add_metric([__version__, str(fmt.FORMAT_VERSION)], 1)
        yield from (slots, capacity, allocs, frees, fails, repairs, timeouts, reaped, torn, settled, rebuilds,
                    up, lost, owners, attached, size, dirty, info)


class DaemonMetrics:
    """The daemon's own registry: the table collector plus pass timings."""

    def __init__(self, stats: Callable[[], list[TableStats]], store: Callable[[], Any] = lambda: None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(TableCollector(stats))
        register_process_metrics(self.registry)          # process_start_time_seconds: restarts
        self.housekeeping = Histogram("stated_housekeeping_duration_seconds", "Duration of housekeeping passes",
                                      ["pass"], registry=self.registry,
                                      buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))

        self.snapshot_duration = Histogram("stated_snapshot_duration_seconds", "Time to write one snapshot",
                                           ["table"], registry=self.registry,
                                           buckets=(.001, .005, .01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.snapshot_failures = Counter("stated_snapshot_failures", "Snapshots that failed to write",
                                         ["table"], registry=self.registry)
        self.restored = Counter("stated_restored_records", "Records restored from snapshots at start-up",
                                ["table"], registry=self.registry)
        self.migrated = Counter("stated_migrated_records", "Records copied by layout migrations",
                                ["table"], registry=self.registry)
        from . import store_metrics  # exports nothing unless [store] is configured
        self.store_flush = store_metrics.register(self.registry, store)

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve(metrics: DaemonMetrics, host: str, port: int, *, max_connections: int = 64,
                idle_timeout: float = 10.0) -> asyncio.Server:
    """A minimal HTTP/1.0 server on the event loop: GET /metrics, GET / (a pointer), else 404.

    At most `max_connections` clients (the longest-idle is closed to make room, see conns.py); the
    request head must arrive, and the reply be read, within `idle_timeout` seconds each.
    """
    limiter = ConnectionLimiter("metrics", max_connections, idle_timeout)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tr = writer.transport
        if not limiter.admit(tr):
            return
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=idle_timeout)
            limiter.busy(tr)
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ") + ["", ""]
            path = path.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, metrics.render()
            elif path == "/":
                status, ctype, body = "200 OK", "text/html", b'<a href="/metrics">/metrics</a>\n'
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            hdr = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                   f"Connection: close\r\n\r\n").encode()
            writer.write(hdr if method == "HEAD" else hdr + body)
            await asyncio.wait_for(writer.drain(), timeout=idle_timeout)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                UnicodeDecodeError, ValueError):
            pass
        except Exception:   # noqa: BLE001 - a scrape must never take the daemon down
            log.exception("metrics request failed")
        finally:
            limiter.done(tr)
            if tr.get_write_buffer_size():
                tr.abort()    # a scraper that does not read must not keep the descriptor
            else:
                writer.close()

    server = await asyncio.start_server(handle, host, port, limit=MAX_REQUEST,
                                        backlog=max(8, min(128, max_connections)))
    return server
