"""Leases: which host holds each stored entity, and the epoch that fences stale writers.

Rules (docs/store.md, "Versions and epochs"):

- A lease row (tbl, entity) is never deleted: its epoch only grows. Release sets host_id = '' and
  lease_until = now(), keeping the epoch.
- `claim` takes the lease when it is free (released, expired) or already ours, and always bumps the
  epoch, past the epoch of the stored row's version too (so versions keep growing even if an operator
  deleted lease rows). Held by another host and not expired: OwnedElsewhere, naming holder and expiry.
- `acquire` is what the flusher does for entities allocated here without a claim (new entities, or
  after a daemon restart): it takes only leases that are ours already (bumping the epoch: each
  daemon life is a new epoch, so its write counter may restart) or entities with neither a lease nor
  a row. It never takes an entity another host held last, nor one that exists in the database
  without a lease: that one must be claim()ed (which loads the row) rather than overwritten.
- A lease lives until `lease_until` (set at claim) or, after that, as long as its host's heartbeat
  (`hosts.alive_until`) does: `heartbeat` renews every lease of a host with one row write, so renewal
  costs O(hosts), not O(entities) (100k players renewed per entity every 10 s would be 10k row
  updates a second, a large share of what the database can write). Leases of entities freed here
  without release() are released explicitly (`release_many`).
- A host that lost a lease (claimed elsewhere after expiry) finds out at its next write: the upsert's
  lease check refuses it (stated/persist/store/flush.py).

All functions take the Driver and a TableMapping; the SQL is portable (ON CONFLICT, unnest, arrays).
"""
from __future__ import annotations

import datetime as dt

from ...errors import OwnedElsewhere
from .pg import Driver
from .schema import TableMapping, entity_from_sql, entity_to_sql


async def claim(drv: Driver, m: TableMapping, host_id: str, ttl: float, entity: int) -> tuple[int, dict | None]:
    """Take the lease for `entity`, then load its row. Returns (epoch, row or None).

    Two statements, each committing on its own (two round trips; an explicit transaction would add
    BEGIN and COMMIT round trips for nothing). The row is read after the lease is committed, in its own
    statement and so its own snapshot: a write by the previous holder either committed before the lease
    changed hands (its upsert holds FOR SHARE on the lease row until it commits, so the lease statement
    waits for it) and is loaded here, or comes later and is fenced out (its epoch is no longer the
    lease's). If the row cannot be read (the connection dropped), the lease stays with this host
    without a slot here: the claim fails, a retry takes it again, and otherwise it is released like
    any claim whose answer was lost (`sweep`) once its lease_until has passed."""
    e = entity_to_sql(entity)
    rows = await drv.fetch(
        f"INSERT INTO {m.leases} AS l (tbl, entity, host_id, epoch, lease_until)\n"
        f"VALUES ($1, $2, $3, COALESCE((SELECT d.version >> 32 FROM {m.qualified} d WHERE d.entity = $2), 0) + 1,\n"
        f"        now() + make_interval(secs => $4))\n"
        f"ON CONFLICT (tbl, entity) DO UPDATE SET host_id = EXCLUDED.host_id,\n"
        f"    epoch = GREATEST(l.epoch, EXCLUDED.epoch - 1) + 1, lease_until = EXCLUDED.lease_until\n"
        f"WHERE l.host_id = EXCLUDED.host_id OR l.host_id = '' OR ({_expiry(m, 'l')}) < now()\n"
        f"RETURNING epoch", m.name, e, host_id, float(ttl))
    if not rows:
        held = await drv.fetch(f"SELECT host_id, {_expiry(m, 'l')} AS lease_until, "
                               f"extract(epoch FROM {_expiry(m, 'l')} - now()) AS left_s "
                               f"FROM {m.leases} l WHERE tbl = $1 AND entity = $2", m.name, e)
        h = held[0] if held else {"host_id": "?", "lease_until": None, "left_s": 0}
        until = h["lease_until"]
        raise OwnedElsewhere(
            f"table {m.name!r} entity {entity} is held by host {h['host_id']!r} until "
            f"{until.isoformat() if isinstance(until, dt.datetime) else until} "
            f"(in {float(h['left_s'] or 0):.1f}s); claim it after that host releases it or its lease expires",
            holder=str(h["host_id"]), lease_until=until.timestamp() if isinstance(until, dt.datetime) else 0.0)
    epoch = rows[0]["epoch"]
    found = await drv.fetch(m.select_sql(), e)
    return epoch, (found[0] if found else None)


async def acquire(drv: Driver, m: TableMapping, host_id: str, ttl: float, entities: list[int]) -> dict[int, int]:
    """Leases for entities allocated here without a claim (see module doc). Returns {entity: epoch}
    for those taken; the others are held by another host or exist only in the database."""
    if not entities:
        return {}
    arr = sorted(entity_to_sql(x) for x in entities)
    rows = await drv.fetch(
        f"INSERT INTO {m.leases} AS l (tbl, entity, host_id, epoch, lease_until)\n"
        f"SELECT $1, u.e, $2, COALESCE(d.version >> 32, 0) + 1, now() + make_interval(secs => $3)\n"
        f"FROM unnest($4::bigint[]) AS u(e) LEFT JOIN {m.qualified} d ON d.entity = u.e\n"
        f"WHERE d.entity IS NULL OR EXISTS (SELECT 1 FROM {m.leases} x WHERE x.tbl = $1 AND x.entity = u.e\n"
        f"                                  AND x.host_id = $2)\n"
        f"ORDER BY u.e\n"
        f"ON CONFLICT (tbl, entity) DO UPDATE SET epoch = GREATEST(l.epoch, EXCLUDED.epoch - 1) + 1,\n"
        f"    lease_until = EXCLUDED.lease_until\n"
        f"WHERE l.host_id = EXCLUDED.host_id\n"
        f"RETURNING entity, epoch", m.name, host_id, float(ttl), arr)
    return {entity_from_sql(r["entity"]): r["epoch"] for r in rows}


def _expiry(m: TableMapping, alias: str) -> str:
    """SQL for when the lease `alias` ends: its own deadline or its host's heartbeat, whichever is later."""
    hosts = m.leases.rsplit(".", 1)[0] + ".hosts"
    return (f"GREATEST({alias}.lease_until, COALESCE((SELECT h.alive_until FROM {hosts} h "
            f"WHERE h.host_id = {alias}.host_id), '-infinity'::timestamptz))")


async def heartbeat(drv: Driver, schema_sql: str, host_id: str, ttl: float) -> None:
    """Renew every lease this host holds: one row. `schema_sql` is the quoted schema name."""
    await drv.execute(f"INSERT INTO {schema_sql}.hosts AS h (host_id, alive_until) "
                      f"VALUES ($1, now() + make_interval(secs => $2)) "
                      f"ON CONFLICT (host_id) DO UPDATE SET alive_until = EXCLUDED.alive_until", host_id, float(ttl))


async def sweep(drv: Driver, m: TableMapping, host_id: str, keep: list[int]) -> int:
    """Release this host's leases on entities it no longer has (`keep`: every entity allocated or
    pending here) whose own deadline has passed: leases orphaned by a claim whose answer was lost
    (COMMIT done, connection gone), which the heartbeat would otherwise keep alive forever. A claim in
    progress is never touched: its lease_until is still in the future."""
    r = await drv.execute(
        f"UPDATE {m.leases} SET host_id = '', lease_until = now() "
        f"WHERE tbl = $1 AND host_id = $2 AND lease_until < now() AND NOT (entity = ANY($3::bigint[]))",
        m.name, host_id, sorted(entity_to_sql(e) for e in keep))
    return int(r.rsplit(" ", 1)[1])


async def release_many(drv: Driver, m: TableMapping, host_id: str, held: dict[int, int]) -> int:
    """Release {entity: epoch} leases at once (entities freed here without release())."""
    if not held:
        return 0
    ents = sorted(held)
    r = await drv.execute(
        f"UPDATE {m.leases} l SET host_id = '', lease_until = now() "
        f"FROM unnest($3::bigint[], $4::bigint[]) AS u(e, ep) "
        f"WHERE l.tbl = $1 AND l.host_id = $2 AND l.entity = u.e AND l.epoch = u.ep",
        m.name, host_id, [entity_to_sql(e) for e in ents], [held[e] for e in ents])
    return int(r.rsplit(" ", 1)[1])


async def release(drv: Driver, m: TableMapping, host_id: str, entity: int, epoch: int) -> bool:
    """Drop the lease (host_id '' , expired now, epoch kept). False if it was no longer ours."""
    r = await drv.execute(f"UPDATE {m.leases} SET host_id = '', lease_until = now() "
                          f"WHERE tbl = $1 AND entity = $2 AND host_id = $3 AND epoch = $4",
                          m.name, entity_to_sql(entity), host_id, epoch)
    return r.endswith(" 1")


async def holder(drv: Driver, m: TableMapping, entity: int) -> dict | None:
    until = _expiry(m, "l")
    rows = await drv.fetch(f"SELECT host_id, epoch, {until} AS lease_until, {until} > now() AS live "
                           f"FROM {m.leases} l WHERE tbl = $1 AND entity = $2", m.name, entity_to_sql(entity))
    return rows[0] if rows else None
