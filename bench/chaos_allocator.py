#!/usr/bin/env python3
"""Fault injection for the allocator: SIGKILL workers at random points of alloc/free, check invariants.

    .venv/bin/python bench/chaos_allocator.py [--kills 10000] [--capacity 64] [--seed S]

A fresh table (capacity 64, the default players schema) on an unused key. For each kill: fork a
child that attaches with owner "chaos" (taking over the slots its killed predecessor held), then
allocates (mostly with entity ids) and frees in a tight loop, some iterations inside write
sections; SIGKILL it after a random 0-5 ms; waitpid. The parent then takes the lock within the
lock timeout and checks `Table.verify() == []` (every slot free or allocated once, free +
allocated = capacity, used counter right, entity index agrees with the slots, no intent mark
left). Every ~50 kills the parent also allocates all remaining capacity, checks the table is
exactly full, frees it all again and re-verifies.

Prints kills/s, repairs (counters()["lock_repairs"]), where the kills landed, and every
violation; exits 1 if there was any. The segment is removed on every exit path.
"""
from __future__ import annotations

import argparse
import logging
import mmap
import os
import random
import signal
import struct
import sys
import time
import traceback

from _common import ROOT, exit_on_signals, pick_keys

import stated  # noqa: E402
from stated.errors import TableFull  # noqa: E402
from stated.format import config as config_mod  # noqa: E402
from stated.format import segment as fmt  # noqa: E402
from stated.shm import segment  # noqa: E402

# progress block shared with the child (anonymous MAP_SHARED mmap, inherited across fork):
# u32 phase, u32 in_write, u64 ops, then an error message
PROGRESS = struct.Struct("<IIQ")
PH_FORKED, PH_ATTACHING, PH_LOOP, PH_ERROR = 0, 1, 2, 3
PHASE_NAMES = {PH_FORKED: "before attach", PH_ATTACHING: "attaching (segment.open + claim_owner)",
               PH_LOOP: "alloc/free loop", PH_ERROR: "child error"}
LOCK_TIMEOUT = 2.0


def child(key: int, prog: mmap.mmap, seed: int, ppid: int) -> None:
    """The victim. Never returns: exits via os._exit (or SIGKILL)."""
    code = 0
    try:
        rnd = random.Random(seed)
        PROGRESS.pack_into(prog, 0, PH_ATTACHING, 0, 0)
        t = stated.Table(segment.open(key), name="chaos", owner="chaos", lock_timeout=LOCK_TIMEOUT)
        held = t.owned()                        # what the killed predecessor left: ours now
        PROGRESS.pack_into(prog, 0, PH_LOOP, 0, 0)
        ops = prog_ops = 0
        deadline = time.monotonic() + 5.0       # never outlive a lost parent
        while True:
            r = rnd.random()
            if held and (r < 0.45 or len(held) >= 40):
                t.free(held.pop(rnd.randrange(len(held))))
            else:
                try:
                    held.append(t.alloc(rnd.getrandbits(62) if r < 0.85 else None))
                except TableFull:
                    if held:
                        t.free(held.pop())
            if r > 0.85 and held:
                with t.write(held[-1]) as p:
                    prog[4] = 1                 # seq is odd from here ...
                    p.hp = ops & 0x7FFF
                    p.x = float(ops)
                    p.gold = ops
                    prog[4] = 0                 # ... to here
            ops += 1
            if ops - prog_ops >= 16:
                struct.pack_into("<Q", prog, 8, ops)
                prog_ops = ops
                if time.monotonic() > deadline or os.getppid() != ppid:
                    break
    except BaseException:  # noqa: BLE001 - reported to the parent through the progress block
        msg = traceback.format_exc(limit=3).encode()[-400:]
        PROGRESS.pack_into(prog, 0, PH_ERROR, 0, 0)
        prog[16:16 + len(msg)] = msg
        code = 3
    finally:
        os._exit(code)


def fill_and_drain(t: stated.Table, rnd: random.Random) -> list[str]:
    """Allocate every free slot, check the table is exactly full, free them all. Problems found."""
    problems = []
    free_before = t.capacity - len(t)
    got = []
    try:
        while True:
            got.append(t.alloc(rnd.getrandbits(62)))
    except TableFull:
        pass
    if len(got) != free_before:
        problems.append(f"fill: allocated {len(got)} slots but {free_before} were free")
    if len(t) != t.capacity:
        problems.append(f"fill: table reports {len(t)} used after filling, capacity {t.capacity}")
    if len({h.slot for h in got}) != len(got):
        problems.append("fill: one slot handed out twice")
    problems += [f"while full: {p}" for p in t.verify()]
    for h in got:
        t.free(h)
    problems += [f"after drain: {p}" for p in t.verify()]
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10000)
    ap.add_argument("--capacity", type=int, default=64)
    ap.add_argument("--max-delay-ms", type=float, default=5.0)
    ap.add_argument("--fill-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--delay-from", choices=("fork", "loop"), default="fork",
                    help="start the random delay at fork (default) or once the child is in its alloc/free loop")
    ap.add_argument("--self-test", action="store_true",
                    help="corrupt the used counter after kill 5 (no intent mark) to show a violation is caught")
    ap.add_argument("-v", "--verbose", action="store_true", help="show stated's repair warnings")
    args = ap.parse_args()
    exit_on_signals()
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR, format="%(name)s: %(message)s")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    rnd = random.Random(seed)
    layout = config_mod.load(str(ROOT / "config" / "stated.toml")).tables["players"].layout
    (key,) = pick_keys(1, salt=0x800)
    prog = mmap.mmap(-1, 4096)                  # MAP_SHARED | MAP_ANONYMOUS
    violations: list[tuple[int, str]] = []
    phases = {k: 0 for k in PHASE_NAMES}
    in_write = ops_total = fills = 0
    pid = None
    created = False
    print(f"chaos: {args.kills} SIGKILLs, capacity {args.capacity}, delay 0-{args.max_delay_ms} ms from "
          f"{args.delay_from}, "
          f"key {key:#010x}, seed {seed}", flush=True)
    t0 = time.monotonic()
    try:
        segment.create(key, args.capacity, layout, mode=0o600).detach()
        created = True
        t = stated.Table(segment.open(key), name="chaos", owner="chaos-parent", lock_timeout=LOCK_TIMEOUT)
        me = os.getpid()
        last_print = t0
        for i in range(1, args.kills + 1):
            prog[0:16] = bytes(16)
            cseed = rnd.getrandbits(32)
            delay = rnd.uniform(0, args.max_delay_ms / 1000)
            pid = os.fork()
            if pid == 0:
                child(key, prog, cseed, me)
            if args.delay_from == "loop":
                spin_until = time.monotonic() + 1.0
                while prog[0] < PH_LOOP and time.monotonic() < spin_until:
                    time.sleep(0.0001)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            pid = None
            phase, w, ops = PROGRESS.unpack_from(prog, 0)
            phases[phase] += 1
            in_write += w
            ops_total += ops
            if phase == PH_ERROR or not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                msg = bytes(prog[16:]).rstrip(b"\0").decode(errors="replace")
                violations.append((i, f"child exited on its own (status {status:#x}): {msg.strip()}"))
            if args.self_test and i == 5:
                t.views.h32[fmt.W_USED] += 1      # a lost update no repair is triggered for
            try:
                problems = t.verify()
            except stated.StatedError as e:
                problems = [f"verify failed: {type(e).__name__}: {e}"]
            violations += [(i, p) for p in problems]
            if i % args.fill_every == 0:
                fills += 1
                violations += [(i, p) for p in fill_and_drain(t, rnd)]
            for j, p in violations[-10:]:
                if j == i:
                    print(f"VIOLATION after kill {i}: {p}", flush=True)
            if len(violations) > 50:
                print("more than 50 violations: stopping early", flush=True)
                break
            now = time.monotonic()
            if now - last_print > 10:
                c = t.counters()
                print(f"  {i} kills, {i / (now - t0):.0f}/s, repairs {c['lock_repairs']}, "
                      f"violations {len(violations)}", flush=True)
                last_print = now
        kills = i
        elapsed = time.monotonic() - t0
        c = t.counters()
        final = t.verify()
        violations += [(kills, f"final: {p}") for p in final]
        t.close()
    finally:
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        if created:
            segment.destroy(key)
    print(f"kills: {kills} in {elapsed:.1f} s = {kills / elapsed:.0f} kills/s; full fill/drain cycles: {fills}")
    print("where the kills landed: " + ", ".join(f"{PHASE_NAMES[k]} {v}" for k, v in phases.items() if v)
          + f"; inside a write section (seq odd) {in_write}; mean alloc/free ops per child {ops_total / kills:.1f}")
    print(f"counters: lock_repairs {c['lock_repairs']}, settled_slots {c['settled_slots']}, "
          f"owner_takeovers {c['owner_takeovers']}, allocations {c['allocations']}, frees {c['frees']}, "
          f"lock_timeouts {c['lock_timeouts']}")
    if violations:
        print(f"FAILED: {len(violations)} violation(s); first: kill {violations[0][0]}: {violations[0][1]}")
        return 1
    print("OK: verify() == [] after every kill and every fill/drain; segment removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
