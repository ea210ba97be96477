"""Worker programs the tests run as real processes: `python tests/workers.py MODE KEY OWNER [ARGS]`.

Each prints "ready" (flushed) when its work is done, then sleeps until killed.
"""
import sys
import time

import stated


def write_players(t, n, base=1000):
    for i in range(n):
        h = t.alloc(entity=base + i)
        with t.write(h) as p:
            p.name = f"player-{i}"
            p.hp = 100 - i
            p.gold = i * 1000
            p.inventory = [i, i + 1, i + 2]
        t.set(h, "level", (i % 60) + 1)


def write_players_offset(t, n):
    for i in range(n):
        h = t.alloc(entity=5000 + i)
        t.set(h, "hp", i)


def hold_write_section(t, n):
    h = t.alloc(entity=1)
    w = t.write(h)
    p = w.__enter__()
    p.hp = 1            # then get killed with the seq odd
    return h


def churn(t, n):
    """alloc/free forever, asserting nobody else ever holds a slot we got."""
    import random
    mine = []
    seen = 0
    while True:
        if len(mine) < n and random.random() < 0.6:
            try:
                h = t.alloc()
            except stated.TableFull:
                continue
            p = t.record(h)
            if p.id != 0:
                print(f"VIOLATION slot {h.slot} already tagged {p.id}", flush=True)
            p.id = t._owner          # tag the record with our owner index
            mine.append(h)
        elif mine:
            h = mine.pop(random.randrange(len(mine)))
            p = t.record(h)
            if p.id != t._owner:
                print(f"VIOLATION slot {h.slot} tag {p.id} != {t._owner}", flush=True)
            p.id = 0
            t.free(h)
        seen += 1
        if seen == 2000:
            print("ready", flush=True)


def store_flush(key: int, dsn: str, host_id: str) -> None:
    """The daemon's write-behind alone, flushing forever (tests SIGKILL it mid-flush)."""
    import asyncio

    from helpers import StoreHost
    host = StoreHost(key, dsn, host_id, batch=2000)

    async def go():
        assert await host.store.ensure_connected()
        print("ready", flush=True)
        while True:
            await host.store.tick()
            await asyncio.sleep(0.01)
    asyncio.run(go())


def store_worker(config: str, owner: str, n: int, value: int) -> None:
    """Claim players 1..n through the daemon, write gold=value, flush each (acknowledged), print
    "ready", then keep writing value+1 without flushing (writes a host loss may take with it)."""
    t = stated.attach("players", owner=owner, config=config)
    hs = [t.claim(e) for e in range(1, n + 1)]
    for h in hs:
        t.set(h, "gold", value)
        t.flush(h)
    print("ready", flush=True)
    while True:
        for h in hs:
            t.set(h, "gold", value + 1)
        time.sleep(0.01)


def rewrite(t, n):
    """Allocate n entities, say ready, then rewrite them forever, each write setting hp, gold and every
    inventory element to one value: a copy that mixes two writes shows it."""
    hs = [t.alloc(entity=7000 + i) for i in range(n)]
    k = 0
    while True:
        for h in hs:
            with t.write(h) as p:
                p.hp = k
                p.gold = k
                p.inventory = [k] * 32
        if k == 0:
            print("ready", flush=True)
        k += 1


def main():
    if sys.argv[1] == "store_worker":
        return store_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    if sys.argv[1] == "store_flush":
        return store_flush(int(sys.argv[2], 0), sys.argv[3], sys.argv[4])
    mode, key, owner = sys.argv[1], int(sys.argv[2], 0), sys.argv[3]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 10
    extra = [int(a) for a in sys.argv[5:]]
    t = stated.attach(key=key, owner=owner)
    {"write_players": write_players, "hold_write_section": hold_write_section,
     "write_players_offset": write_players_offset, "churn": churn,
     "rewrite": rewrite}[mode](t, n, *extra)
    print("ready", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
