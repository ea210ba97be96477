"""Layer 2, the worker data plane: what a game process loads and calls on its hot path.

Owns: SysV segments and semaphores of one table (`segment`: create, open with provenance and header
validation, destroy), process liveness and the owner table (`owners`), the crash-consistent slot
allocator with its lock, entity index and repair (`allocator`), ctypes record views (`records`), and
`Table`/`attach` (`table`), the API re-exported by `stated`; the dirty-mark harvest shared by the
snapshot saver and the database store (`marks`), and the worker's blocking control-socket call for
claim/flush/release (`store_client`: a plain socket, so a worker needs no asyncio). `_native` is the
C11 native core of the same protocols (stated/native/stated_core.h, shared with C workers) as a
CPython extension; its module docstring is its API, and `Table`/the allocator are to delegate to it. A
worker's `import stated` loads this layer and the formats, nothing heavier: no asyncio, no uvloop, no
prometheus_client, no database driver (tests/test_layers.py checks it).

It may import: `stated.errors`, `stated.format`, the standard library, sysv_ipc, msgpack.
"""
