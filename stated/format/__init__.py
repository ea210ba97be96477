"""Layer 1, formats: what stated's bytes and files mean, as pure definitions.

Owns: field schemas and their parsing (`schema`), the C-compatible record layout and its hash
(`layout`), the segment format — header, regions, slot, owner and index entries, and the named views
over them (`segment`) — and the config file (`config`; `[store]`: `store_config`). Everything here is
a pure function of its inputs: no SysV calls, no sockets, no event loop, no threads. The one exception
is reading a config file from disk, which is still just parsing.

It may import: the standard library, msgpack, and `stated.errors`. Nothing else of stated: every other
layer builds on this one, so a change here is a format change (see docs/format.md).
"""
