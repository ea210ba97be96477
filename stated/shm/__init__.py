"""Layer 2, the worker data plane: what a game process loads and calls on its hot path.

Owns: SysV segments and semaphores of one table (`segment`: create, open with provenance and header
validation, destroy), process liveness for the daemon and the owner table's codec (`owners`), the
crash-consistent slot allocator (`allocator`), ctypes record views (`records`), and `Table`/`attach`
(`table`), the API re-exported by `stated`; the dirty-mark harvest shared by the snapshot saver and the
database store (`marks`), and the worker's blocking control-socket call for claim/flush/release
(`client`: a plain socket, so a worker needs no asyncio). The algorithms (table lock, intent marks
and repair, alloc/free/reap, entity index, owner claims, record seqlock, dirty scans) are the C11 native
core's (stated/native/stated_core.h, shared with C workers), through its CPython extension `_native`
(its module docstring is its API): `allocator` and `table` build it and delegate to it; there is no
Python copy of them. A worker's `import stated` loads this layer and the formats, nothing heavier: no
asyncio, no uvloop, no prometheus_client, no database driver (tests/test_layers.py checks it).

It may import: `stated.errors`, `stated.format`, the standard library, sysv_ipc, msgpack.
"""
