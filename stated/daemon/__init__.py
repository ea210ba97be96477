"""Layer 4, the daemon: `stated run` as a service.

Owns: the one lifecycle — start-up, run, bounded shutdown (`lifecycle`) — bringing tables up
(`provision`), kernel limit checks (`kernel`), the state_dir instance lock (`instance`), the metrics
endpoint (`metrics`; the database store's collector: `store_metrics`), the control socket (`control`)
and its connection limits (`conns`), systemd notify (`notify`), service hardening and process metrics
(`service`), journald-aware logging (`logs`), table status read from segments (`status`), and the
worker thread that runs snapshots and scans beside the loop (`saves`). This is the only layer that
runs an event loop (uvloop) or loads prometheus_client.

It may import: every layer to its left (`errors`, `format`, `shm`, `persist`), asyncio, uvloop,
prometheus_client. Not the tools.
"""
