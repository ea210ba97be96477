#!/usr/bin/env python3
"""A simulated game zone: players log in and out, move, fight and earn gold in shared memory.

    python examples/zone_worker.py --config examples/soak.toml --zone 1 [--players 200]
        [--tick-hz 20] [--duration SECONDS] [--ack-file PATH] [--seed S]

It attaches the `players` table as owner `zone-N` and, first thing, resumes the players that
owner already holds (`owned()`): a zone restarted after a crash (kill -9) carries on with its
players exactly as they were. Then, at a fixed tick rate:

- logins and logouts: `alloc(entity=N*1_000_000 + i)` (ids never reused within a zone) and
  `free`; the zone ramps up to --players and then churns a few players a second;
- movement through live views (`t.record(h)`): x/y/z += velocity * dt;
- combat and loot: damage and gold changes inside write sections (`with t.write(h) as p:`).

The players table needs a `writes: u64` field (examples/soak.toml has it): every write section
increments it, and the zone checks that it finds the value it last wrote (anything else means a
write was lost or someone else wrote its record; it prints a VIOLATION line).

With --ack-file the zone records, outside shared memory, what it knows is in the table: after
every tick it rewrites (atomically: temporary + rename) a small JSON document

    {"zone", "pid", "state", "tick", "ops", "next_id", "players": {"<entity>": <writes>, ...},
     "pending_login": [...], "pending_logout": [...], "logged_out": [...], "logouts",
     "resumed": {"players", "entity_sum", "writes_sum"}, ...}

`players` holds, for each logged-in player, the last `writes` value this zone knows was written
(a write section that completed). Before a tick logs players in or out, the document is rewritten
with those entities in `pending_login` / `pending_logout`, so a checker that finds the zone killed
mid-tick knows which players may or may not be there. `logged_out` lists the last 1000 players
this zone logged out (carried across restarts); they must be gone from the table. `resumed` describes what
this process took back from owned() at start (its first document, state "resumed", is written
before the first tick). bench/soak.py checks all of this after every kill.

SIGTERM or SIGINT: finish the tick, write the document, `close()` (the owner is marked detached,
its players stay) and exit 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import stated

ENTITY_BASE = 1_000_000      # entity ids of zone N: N * ENTITY_BASE + i
WORLD = 1000.0               # players move inside [-WORLD, WORLD]^2, z inside [0, 100]
RAMP_PER_TICK = 25           # logins per tick while below --players
CHURN = 0.15                 # probability per tick of one logout + one login once at --players
RAID = 0.02                  # probability per tick that a party of 5-10 leaves and as many arrive
LOGGED_OUT_KEPT = 1000       # logouts remembered in the ack file (the checker looks them up)
COMBAT = 0.10                # fraction of players in a write section per tick


STOP = False


def _on_signal(signum, frame):
    global STOP
    STOP = True


class Player:
    __slots__ = ("entity", "h", "view", "vx", "vy", "vz", "writes")

    def __init__(self, entity, h, view, writes, rnd):
        self.entity, self.h, self.view, self.writes = entity, h, view, writes
        self.vx, self.vy, self.vz = rnd.uniform(-5, 5), rnd.uniform(-5, 5), rnd.uniform(-0.5, 0.5)


class AckFile:
    """The zone's acknowledgements, rewritten atomically (temporary file + rename)."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.tmp = self.path.with_name(f".{self.path.name}.tmp") if self.path else None

    def load(self) -> dict:
        if self.path is None:
            return {}
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as e:      # never happens with rename; say so if it does
            print(f"warning: unreadable ack file {self.path}: {e}", file=sys.stderr, flush=True)
            return {}

    def write(self, doc: dict) -> None:
        if self.path is None:
            return
        with open(self.tmp, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(self.tmp, self.path)   # no fsync: this guards against kill -9, not power loss


class Zone:
    def __init__(self, args):
        self.n = args.zone
        self.owner = f"zone-{self.n}"
        self.target = args.players
        self.dt = 1.0 / args.tick_hz
        self.rnd = random.Random(args.seed)
        self.ack = AckFile(args.ack_file)
        self.t = stated.attach("players", owner=self.owner, config=args.config)
        if "writes" not in self.t.layout.names():
            self.t.close()
            raise SystemExit(f"{self.owner}: the players table in {args.config} has no 'writes: u64' field; "
                             f"use examples/soak.toml or add the field")
        self.players: dict[int, Player] = {}
        self.tick = self.ops = self.logins = self.logouts = self.violations = 0
        self.work_ms = 0.0           # the last tick's work before its acknowledgement
        prev = self.ack.load()
        # the most recent LOGGED_OUT_KEPT logouts, oldest first (a dict as an ordered set)
        self.logged_out: dict[int, None] = dict.fromkeys(prev.get("logged_out", []))
        self.next_id = max(int(prev.get("next_id", 0)), self.n * ENTITY_BASE)
        self.resume()

    # ---- start: take back what this owner holds ------------------------------------------------
    def resume(self) -> None:
        t = self.t
        stray = 0
        for h in t.owned():
            e = t.entity(h)
            if e is None:            # cannot happen with this worker; do not keep a record we cannot name
                stray += 1
                t.free(h)
                continue
            self.players[e] = Player(e, h, t.record(h), t.get(h, "writes"), self.rnd)
            self.next_id = max(self.next_id, e + 1)
        # a player restored from an older snapshot may be one this zone had logged out since
        for e in self.players:
            self.logged_out.pop(e, None)
        # what this process found, in every document it writes: a checker compares it with the table
        self.resumed = {"players": len(self.players), "entity_sum": sum(self.players),
                        "writes_sum": sum(p.writes for p in self.players.values())}
        print(f"{self.owner}: resumed {len(self.players)} players (pid {os.getpid()})"
              + (f", freed {stray} records without an entity" if stray else ""), flush=True)
        self.write_ack(state="resumed")

    def write_ack(self, state: str = "running", login=(), logout=()) -> None:
        self.ack.write({"zone": self.n, "owner": self.owner, "pid": os.getpid(), "state": state,
                        "tick": self.tick, "ops": self.ops, "next_id": self.next_id,
                        "players": {str(e): p.writes for e, p in self.players.items()},
                        "pending_login": list(login), "pending_logout": list(logout),
                        "logged_out": list(self.logged_out), "logins": self.logins, "logouts": self.logouts,
                        "resumed": self.resumed, "violations": self.violations, "work_ms": self.work_ms,
                        "time": time.time()})

    def violation(self, msg: str) -> None:
        self.violations += 1
        print(f"VIOLATION {self.owner}: {msg}", file=sys.stderr, flush=True)

    # ---- one tick ---------------------------------------------------------------------------------
    def step(self) -> None:
        t, rnd, dt = self.t, self.rnd, self.dt
        t0 = time.perf_counter()
        self.tick += 1
        logout: list[int] = []
        login: list[int] = []
        if len(self.players) < self.target:
            k = min(RAMP_PER_TICK, self.target - len(self.players))
            login = list(range(self.next_id, self.next_id + k))
        elif self.players and rnd.random() < CHURN + RAID:
            k = 1 if rnd.random() < CHURN / (CHURN + RAID) else min(len(self.players), rnd.randint(5, 10))
            logout = rnd.sample(list(self.players), k)
            login = list(range(self.next_id, self.next_id + k))
        if login or logout:
            self.next_id += len(login)
            self.write_ack(login=login, logout=logout)     # intent first: a kill mid-tick is explainable
        for e in logout:
            p = self.players.pop(e)
            t.free(p.h)
            self.logged_out[e] = None
            if len(self.logged_out) > LOGGED_OUT_KEPT:
                del self.logged_out[next(iter(self.logged_out))]
            self.logouts += 1
        for e in login:
            h = t.alloc(entity=e)
            with t.write(h) as r:
                r.id = e
                r.name = f"z{self.n}-p{e - self.n * ENTITY_BASE}"
                r.zone = self.n
                r.level = 1 + e % 60
                r.x, r.y, r.z = rnd.uniform(-WORLD, WORLD), rnd.uniform(-WORLD, WORLD), rnd.uniform(0, 100)
                r.writes = 1
            self.players[e] = Player(e, h, t.record(h), 1, rnd)
            self.logins += 1
        self.ops += len(login) + len(logout)

        # movement: live views, straight to shared memory
        for p in self.players.values():
            v = p.view
            x, y = v.x + p.vx * dt, v.y + p.vy * dt
            if not -WORLD <= x <= WORLD:
                p.vx = -p.vx
            if not -WORLD <= y <= WORLD:
                p.vy = -p.vy
            v.x, v.y, v.z = x, y, min(100.0, max(0.0, v.z + p.vz * dt))
        self.ops += len(self.players)

        # combat and loot: write sections, each one bumps `writes`
        n = len(self.players)
        if n:
            for p in rnd.sample(list(self.players.values()), max(1, math.ceil(n * COMBAT))):
                with t.write(p.h) as r:
                    if r.writes != p.writes:
                        self.violation(f"entity {p.entity} slot {p.h.slot}: writes is {r.writes}, this zone "
                                       f"last wrote {p.writes}")
                    hp = r.hp - rnd.randint(0, 30)
                    if hp <= 0:                     # respawn
                        hp = 100
                        r.x, r.y = rnd.uniform(-WORLD, WORLD), rnd.uniform(-WORLD, WORLD)
                    r.hp = hp
                    r.gold = max(0, r.gold + rnd.randint(-20, 50))
                    r.inventory[rnd.randrange(32)] = self.tick & 0xFFFFFFFF
                    r.writes = p.writes + 1
                p.writes += 1
            self.ops += max(1, math.ceil(n * COMBAT))
        self.work_ms = (time.perf_counter() - t0) * 1000
        self.write_ack()

    def run(self, duration: float | None) -> int:
        deadline = None if duration is None else time.monotonic() + duration
        nxt = time.monotonic()
        while not STOP:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            self.step()
            nxt += self.dt
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:       # fell far behind (machine busy): do not try to catch up
                nxt = time.monotonic()
        self.write_ack(state="stopped")
        print(f"{self.owner}: stopped after {self.tick} ticks: {len(self.players)} players, {self.ops} ops, "
              f"{self.logins} logins, {self.logouts} logouts, {self.violations} violations", flush=True)
        for p in self.players.values():
            p.view = None
        self.t.close()
        return 1 if self.violations else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="stated config with a players table that has 'writes: u64'")
    ap.add_argument("--zone", type=int, required=True, help="zone number N: owner zone-N, entities N*1e6+i")
    ap.add_argument("--players", type=int, default=200, help="players to keep logged in (default 200)")
    ap.add_argument("--tick-hz", type=float, default=20.0, help="ticks per second (default 20)")
    ap.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: never)")
    ap.add_argument("--ack-file", help="write acknowledgements here after every tick (JSON, atomic rename)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    args = ap.parse_args(argv)
    if not 0 <= args.zone <= 0xFFFF:
        ap.error("--zone must be within [0, 65535] (the zone field is u16)")
    if args.tick_hz <= 0 or args.players < 0:
        ap.error("--tick-hz must be > 0 and --players >= 0")
    signal.signal(signal.SIGTERM, _on_signal)      # before attaching: a stop request is never lost
    signal.signal(signal.SIGINT, _on_signal)
    zone = Zone(args)
    return zone.run(args.duration)


if __name__ == "__main__":
    sys.exit(main())
