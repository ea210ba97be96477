"""The durable store: dirty records written behind to PostgreSQL, leases, handoff between hosts.

Part of the persistence layer; only the daemon and the CLI load it (they run its asyncio code). Rules:

- A worker's `import stated` never loads this package, asyncio or asyncpg: workers claim, flush and
  release through the daemon's control socket (`stated/shm/client.py`, a plain socket).
- `pg.py` is the ONLY module that imports asyncpg. Everything else talks to its `Driver`
  (execute, fetch, copy_binary, transaction, close) and sees only stated's errors (`StoreError`,
  `StoreUnavailable`, `StoreRetry`).
- `schema.py` maps layouts to SQL (DDL, upserts, the native COPY encoder's column plan, row ->
  record); `leases.py` holds the lease SQL; `flush.py` the write-behind and the worker calls. The
  pieces lower layers need live there: `[store]` parsing in `stated/format/store_config.py`, the
  dirty-mark harvest in `stated/shm/marks.py` (in C, with the COPY encoder and the seqlock copies:
  the store's section of `stated/native/_native.c`), the metrics collector in
  `stated/daemon/store_metrics.py`.

See docs/store.md for the schema mapping, versions and epochs, leases and failure behaviour.
"""
