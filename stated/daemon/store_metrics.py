"""Prometheus metrics of the durable store, read at scrape time (O(tables) plus a C-speed scan of two
slot-table byte columns per stored table for the dirty count). Registered by the daemon's metrics
module; exported only when a [store] is configured."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class StoreCollector:
    def __init__(self, get_store: Callable[[], Any], clock: Callable[[], float] = time.monotonic):
        self.get_store, self.clock = get_store, clock

    def collect(self) -> Iterator[Metric]:
        st = self.get_store()
        if st is None:
            return
        L = ["table"]
        up = GaugeMetricFamily("stated_store_up", "1 while the daemon is connected to the database", labels=[])
        up.add_metric([], 1 if st.up else 0)
        flushed = CounterMetricFamily("stated_store_flushed_records", "Records written to the database", labels=L)
        stale = CounterMetricFamily("stated_store_stale_writes", "Writes refused because another host holds "
                                    "the entity's lease (this host's copy is stale)", labels=L)
        lag = GaugeMetricFamily("stated_store_lag_seconds", "Age of the oldest change not yet in the database",
                                labels=L)
        dirty = GaugeMetricFamily("stated_store_dirty_records", "Records changed and not yet in the database",
                                  labels=L)
        leases = GaugeMetricFamily("stated_leases", "Entity leases this host holds", labels=L)
        errors = CounterMetricFamily("stated_store_errors", "Store errors by kind (unavailable, refused, retry, "
                                     "lease_conflict, no_entity, rejected_row)", labels=["kind"])
        now = self.clock()
        for name, ts in st.tables.items():
            flushed.add_metric([name], ts.flushed)
            stale.add_metric([name], ts.stale)
            lag.add_metric([name], ts.lag(now))
            dirty.add_metric([name], ts.dirty_count())
            leases.add_metric([name], len(ts.epochs))
        for kind in ("unavailable", "refused", "retry", "lease_conflict", "no_entity", "rejected_row"):
            errors.add_metric([kind], st.errors.get(kind, 0))
        yield from (up, flushed, stale, lag, dirty, leases, errors)


def register(registry: CollectorRegistry, get_store: Callable[[], Any]) -> Histogram:
    """Add the store collector; returns the flush-duration histogram (its observe is Store's on_flush)."""
    registry.register(StoreCollector(get_store))
    return Histogram("stated_store_flush_duration_seconds", "Time to write one table's pending records",
                     registry=registry, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
