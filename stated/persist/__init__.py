"""Layer 3, persistence: state that outlives the segments.

Owns: snapshot files — their wire format, checks and the state_dir trust rules (`snapshot`) — the
saver that writes full and delta snapshots of a live table and restores from a chain (`saver`), and
layout migration (`migrate`), and the database store (`store`: write-behind to PostgreSQL, leases,
handoff; docs/store.md). Code here runs in the daemon and in offline CLI commands, never on a worker's
hot path.

It may import: `stated.errors`, `stated.format`, `stated.shm`, the standard library, msgpack, and
asyncpg (only `store/pg.py`, the store's driver module). Not the daemon or the tools.
"""
