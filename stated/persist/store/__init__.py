"""The durable store: dirty records written behind to PostgreSQL, leases, handoff between hosts.

Layer rules (this package sits in the persistence layer, beside snapshots and migration):

- Only the daemon imports this package's `pg`, `flush` and `leases` modules: they need asyncio and
  the database driver. A worker's `import stated` must never load asyncpg; workers claim, flush and
  release through the daemon's control socket.
- `pg.py` is the ONLY module that imports asyncpg. Everything else talks to the `Driver` interface
  it defines (connect, execute, fetch, copy_upsert, transaction, close) and sees only stated's
  errors (`StoreError`, `StoreUnavailable`).
- `schema.py` and `config.py` are pure: layout -> SQL DDL and row codec, `[store]` settings. No I/O.
- Imports inside the package are relative and reach outside it only for the pure format layer
  (format, layout, schema, marks, errors), so the package can move (e.g. under `stated/persist/`)
  by moving the folder.

See docs/store.md for the schema mapping, versions and epochs, and failure behaviour.
"""
