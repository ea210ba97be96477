"""Layer 5, tools: what an operator or a C programmer runs.

Owns: the `stated` command line (`cli`: run, status, snapshot, restore, reap, get, top, …), the live
terminal view (`top`), shell completion (`completion`) and the C11 header generator (`cheader`).

It may import: every layer. Nothing imports this layer except `stated.__main__`.
"""
