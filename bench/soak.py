#!/usr/bin/env python3
"""Soak run with fault injection: the daemon and game zones, killed and restarted, state checked.

    .venv/bin/python bench/soak.py --duration 600 [--workers 4] [--seed S] [--keep-dir]
        [--players 200] [--key 0x5F...] [--dir PARENT]

In a fresh temporary directory (under --dir, default the system's), on an unused key (--key, or
0x5F<pid><n> as the other bench scripts), with a config of its own (snapshot every second, a full
every 5 saves, dead owners kept; the players fields come from examples/soak.toml): it starts the
daemon (`python -m stated run`, readiness through a systemd notify socket) and --workers zones
(examples/zone_worker.py, --players each, 20 Hz, each with an ack file). Then, for --duration
seconds, at random moments (seeded) one of:

- **kill a zone** (SIGKILL) and check, while it is down, everything it had acknowledged: every
  player it acknowledged is present exactly once (`lookup(entity)`), in one of its slots, with a
  write counter >= the acknowledged one; it holds no player it never announced; no player it
  logged out is there. Restart it: it must resume exactly the players it held (owned()).
- **kill the daemon** (SIGKILL); the zones keep running; restart it after up to a second: it
  adopts the segments.
- **remove everything** (at least once): SIGKILL every zone and check them as above; stop the
  daemon (SIGTERM, whose last snapshot must then equal the table exactly; or SIGKILL); read the
  newest snapshot chain (`stated.persist.snapshot.chain`); `ipcrm` the segment and the semaphore; start
  the daemon, which restores; the table must be exactly that chain (slots, generations, owners,
  entities, write counters: the floor after a restore is what the last snapshot held); restart
  the zones, each must resume exactly its players of that chain.

At every quiescent point (zones down) and at the end: `Table.verify() == []`, every entity in one
slot only, and `/metrics` agrees with the table (stated_slots allocated + orphaned == used ==
allocated slots, stated_allocations_total - stated_frees_total == used). At the end the zones are
stopped with SIGTERM (exit 0; their final acknowledgements must match the table exactly), then the
daemon (exit 0), and a last remove-and-restore round trip checks the final snapshot. Zone or daemon
logs with VIOLATION, Traceback or ERROR lines count as violations too.

Prints one summary line (kills workers/daemon, restarts, restores, ops, violations) and exits 1 on
any violation. Always cleans up: its processes are killed by pid, its segment and semaphore are
removed (`stated destroy --yes --config ...`), the directory is deleted unless --keep-dir.
Children get PR_SET_PDEATHSIG, so even a kill -9 of this script stops them.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import traceback
import urllib.request
from pathlib import Path
from typing import NamedTuple

from _common import ROOT, exit_on_signals, key_in_use, pick_keys

import stated
from stated.daemon import control
from stated.format import config as config_mod
from stated.format import segment as fmt
from stated.persist import snapshot as snap_mod
from stated.shm.allocator import Handle

ZONE_WORKER = ROOT / "examples" / "zone_worker.py"
SOAK_TOML = ROOT / "examples" / "soak.toml"
TABLE = "players"
PR_SET_PDEATHSIG = 1
MAX_REPORTED = 20            # violations printed in full; the rest are counted


_prctl = ctypes.CDLL(None, use_errno=True).prctl     # looked up here: the forked child only calls it


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when this script dies, however it dies."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class NotifySocket:
    """What systemd does for Type=notify: a datagram socket in $NOTIFY_SOCKET, read all the time.

    It must be drained continuously, as systemd does: the daemon's notify datagrams (STATUS= on
    every repair pass) are blocking sends, so once net.unix.max_dgram_qlen of them wait unread
    the daemon's event loop blocks in sendto() (no snapshots, SIGTERM ignored).
    """

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.cond = threading.Condition()
        self.messages: list[str] = []
        self.count = 0
        self.closed = False
        self.thread = threading.Thread(target=self._drain, name="notify", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while not self.closed:
            try:
                m = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.cond:
                self.messages.append(m.decode(errors="replace"))
                del self.messages[:-200]
                self.count += 1
                self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return self.count

    def wait_ready(self, proc: subprocess.Popen, since: int, timeout: float) -> None:
        """Wait for READY=1 in a datagram received after mark() returned `since`."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                new = self.messages[max(0, len(self.messages) - (self.count - since)):] if self.count > since else []
                if any("READY=1" in m.split("\n") for m in new):
                    return
                if proc.poll() is not None:
                    raise RuntimeError(f"the daemon exited with {proc.returncode} before READY=1")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no READY=1 from the daemon within {timeout}s")
                self.cond.wait(0.1)

    def close(self) -> None:
        self.closed = True
        self.thread.join(timeout=2)
        self.sock.close()


class Slot(NamedTuple):
    slot: int
    gen: int
    owner: str | None
    entity: int | None
    writes: int


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.dir = Path(tempfile.mkdtemp(prefix="stated-soak-", dir=args.dir))
        self.key = args.key if args.key is not None else pick_keys(1, salt=0x5AB)[0]
        self.zones = list(range(1, args.workers + 1))
        self.cfg_path = self.dir / "soak.toml"
        self._write_config()
        self.cfg = config_mod.load(self.cfg_path)
        self.tc = self.cfg.table(TABLE)
        self.state_dir = snap_mod.table_dir(self.cfg.daemon.state_dir, TABLE)
        fl = {f.name: f for f in self.tc.layout.fields}
        if "writes" not in fl or fl["writes"].field.type != "u64":
            raise SystemExit(f"{SOAK_TOML}: the players table needs a 'writes: u64' field")
        self.writes_off = fl["writes"].offset
        self.notify = NotifySocket(self.dir / "notify.sock")
        self.daemon: subprocess.Popen | None = None
        self.workers: dict[int, subprocess.Popen] = {}
        self.all_procs: list[subprocess.Popen] = []
        self.stats = {"kills_workers": 0, "kills_daemon": 0, "restarts": 0, "restores": 0, "ops": 0,
                      "checked": 0, "daemon_stops": 0}
        self.violations: list[str] = []
        self.torn: set[int] = set()
        self.t0 = time.monotonic()

    # ---- setup -------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        src = tomllib.loads(SOAK_TOML.read_text())["tables"][TABLE]
        n = self.args.workers * self.args.players
        capacity = max(1024, 2 * n + 64)
        lines = ["[daemon]", 'state_dir = "var"', 'control_socket = "var/stated.sock"',
                 'metrics_address = "127.0.0.1:0"', "mode = 0o600", "snapshot_interval = 1.0",
                 "full_every = 5", "snapshots_keep = 3", "repair_interval = 0.5", "reap_interval = 0.5",
                 "lock_timeout = 2.0", "", f"[tables.{TABLE}]", f"key = {self.key:#010x}",
                 f"capacity = {capacity}", f"fields = {json.dumps(src['fields'])}", 'dead_owner = "keep"', ""]
        self.cfg_path.write_text("\n".join(lines))

    # ---- reporting ---------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"[{time.monotonic() - self.t0:7.2f}s] {msg}", flush=True)

    def violation(self, msg: str) -> None:
        self.violations.append(msg)
        if len(self.violations) <= MAX_REPORTED:
            print(f"[{time.monotonic() - self.t0:7.2f}s] VIOLATION: {msg}", flush=True)

    # ---- processes -----------------------------------------------------------------------------------
    def _spawn(self, cmd: list[str], logname: str, env=None) -> subprocess.Popen:
        with open(self.dir / logname, "ab") as log:
            # preexec_fn with the notify thread running: _die_with_parent only calls a prctl pointer
            # looked up before any fork, nothing that could wait on a lock another thread held
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=str(ROOT), env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509
        self.all_procs.append(p)
        return p

    def start_daemon(self, expect: str) -> None:
        """Start `stated run` and wait for READY=1; `expect` is created/adopted/restored."""
        logf = self.dir / "daemon.log"
        offset = logf.stat().st_size if logf.exists() else 0
        mark = self.notify.mark()
        env = dict(os.environ, NOTIFY_SOCKET=self.notify.path,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        env.pop("WATCHDOG_USEC", None)
        self.daemon = self._spawn([sys.executable, "-m", "stated", "run", "--config", str(self.cfg_path)],
                                  "daemon.log", env)
        try:
            self.notify.wait_ready(self.daemon, mark, timeout=30)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; daemon log:\n{self._tail(logf, offset)}") from None
        text = logf.read_text(errors="replace")[offset:]
        how = next((w for w in ("restored", "adopted", "created") if f": {w} " in text), "?")
        if how != expect:
            self.violation(f"daemon start: expected the table to be {expect}, the daemon says {how}")
        self.log(f"daemon pid {self.daemon.pid} ready ({how})")

    def stop_daemon(self, sig: int) -> None:
        p, self.daemon = self.daemon, None
        assert p is not None
        os.kill(p.pid, sig)
        try:
            rc = p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.violation(f"daemon pid {p.pid} did not exit within 15 s of {signal.Signals(sig).name}: "
                           f"{self._stuck(p.pid)}")
            os.kill(p.pid, signal.SIGKILL)
            rc = p.wait()
        if sig == signal.SIGTERM and rc != 0:
            self.violation(f"daemon pid {p.pid} exited with {rc} on SIGTERM (expected 0)")
        if sig == signal.SIGKILL:
            self.stats["kills_daemon"] += 1
        else:
            self.stats["daemon_stops"] += 1

    def ack_path(self, z: int) -> Path:
        return self.dir / f"zone-{z}.ack.json"

    def read_ack(self, z: int) -> dict:
        try:
            return json.loads(self.ack_path(z).read_text())
        except FileNotFoundError:
            return {}

    def start_worker(self, z: int) -> subprocess.Popen:
        a = self.args
        p = self._spawn([sys.executable, str(ZONE_WORKER), "--config", str(self.cfg_path), "--zone", str(z),
                         "--players", str(a.players), "--tick-hz", str(a.tick_hz), "--ack-file",
                         str(self.ack_path(z)), "--seed", str(self.rng.randrange(1 << 32)),
                         "--duration", str(a.duration + 900)], f"zone-{z}.log")
        self.workers[z] = p
        return p

    def wait_worker(self, z: int, p: subprocess.Popen, timeout: float = 30) -> dict:
        """Wait for the zone's first acknowledgement (written right after it resumed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.read_ack(z)
            if doc.get("pid") == p.pid:
                return doc
            if p.poll() is not None:
                raise RuntimeError(f"zone-{z} pid {p.pid} exited with {p.returncode} at start:\n"
                                   f"{self._tail(self.dir / f'zone-{z}.log')}")
            time.sleep(0.01)
        raise RuntimeError(f"zone-{z} pid {p.pid} wrote no acknowledgement within {timeout}s")

    def kill_worker(self, z: int, how: str = "random") -> dict:
        """SIGKILL a zone; returns its last acknowledgement. `how` picks the moment:

        - random: now (a zone at 20 Hz mostly sleeps between ticks, so this mostly lands there);
        - tick: inside a tick: wait for the zone to finish one (its ack file changes), then kill at
          a random point of the next tick's work, estimated from work_ms in the acknowledgement;
        - section: stop (SIGSTOP) the zone at moments inside its ticks until it is caught inside a
          write section (a slot of its own with an odd seq) or an allocator operation (the intent
          mark carries its pid), and SIGKILL it right there; a plain kill after 3 s without a catch;
        - alloc: the same, but only inside an allocator operation (alloc/free, under the table lock),
          probing right after the zone announced logins/logouts (pending_* in its ack file).
        """
        p = self.workers.pop(z)
        where = "died" if p.poll() is not None else how
        if where == "tick":
            time.sleep(self._until_next_tick(z, self.rng.random()))
        elif where in ("section", "alloc"):
            where = self._catch_in_section(z, p, alloc_only=how == "alloc")
        if where == "died" or p.poll() is not None:
            self.violation(f"zone-{z} pid {p.pid} exited by itself with {p.returncode}:\n"
                           f"{self._tail(self.dir / f'zone-{z}.log', n=15)}")
        else:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        self.stats["kills_workers"] += 1
        self.stats[f"kills_in_{where}"] = self.stats.get(f"kills_in_{where}", 0) + 1
        doc = self.read_ack(z)
        if doc.get("pid") != p.pid:
            raise RuntimeError(f"zone-{z}: the ack file is not from pid {p.pid}")
        self.stats["ops"] += doc.get("ops", 0)
        doc["_killed_in"] = where
        return doc

    def _until_next_tick(self, z: int, frac: float) -> float:
        """Seconds from now to `frac` (0..1) of the way through the zone's next tick's work."""
        path, dt = self.ack_path(z), 1.0 / self.args.tick_hz
        m0 = path.stat().st_mtime_ns
        deadline = time.monotonic() + 1.0
        while path.stat().st_mtime_ns == m0 and time.monotonic() < deadline:
            time.sleep(0.0001)
        seen = time.monotonic()
        work = min(dt / 2, self.read_ack(z).get("work_ms", 1.5) / 1000)
        return max(0.0, seen + dt - work - 0.0003 + frac * work - time.monotonic())

    def _catch_in_section(self, z: int, p: subprocess.Popen, alloc_only: bool, budget: float = 3.0) -> str:
        """Leave the zone stopped inside a write section or an allocator op; returns what caught it."""
        path = self.ack_path(z)
        with self.attach() as t:
            v = t.views
            idx = next((o.index for o in t.owners() if o.name == f"zone-{z}"), None)
            seqs, owners = v.seq, v.owner
            end = time.monotonic() + budget
            while time.monotonic() < end:
                if alloc_only:       # wait for an announcement of logins/logouts, then probe at once
                    m0 = path.stat().st_mtime_ns
                    while path.stat().st_mtime_ns == m0 and time.monotonic() < end:
                        time.sleep(0.00005)
                    doc = self.read_ack(z)
                    if not (doc.get("pending_login") or doc.get("pending_logout")):
                        continue
                else:
                    time.sleep(self._until_next_tick(z, 0.0))
                probe_end = time.monotonic() + 0.003
                while time.monotonic() < probe_end:
                    os.kill(p.pid, signal.SIGSTOP)
                    _, status = os.waitpid(p.pid, os.WUNTRACED)     # returns once it is stopped
                    if not os.WIFSTOPPED(status):                   # it exited on its own: reaped now
                        p.returncode = os.waitstatus_to_exitcode(status)
                        return "died"
                    if v.h32[fmt.W_INTENT_OP] and v.h32[fmt.W_INTENT_PID] == p.pid:
                        return "alloc"
                    if not alloc_only and any(s & 1 and owners[i] == idx for i, s in enumerate(seqs.tolist())):
                        return "write"
                    os.kill(p.pid, signal.SIGCONT)
                    if not alloc_only:
                        time.sleep(self.rng.uniform(0, 0.0002))
            return "random"

    def _stuck(self, pid: int) -> str:
        """Where a hung process is: kernel wait channel and syscall; then SIGUSR1, which dumps the
        Python stacks into its log when faulthandler is registered for it (else it just dies)."""
        info = []
        for f in ("wchan", "syscall"):
            try:
                info.append(f"{f}={Path(f'/proc/{pid}/{f}').read_text().strip()}")
            except OSError:
                pass
        try:
            os.kill(pid, signal.SIGUSR1)
            time.sleep(0.5)
        except ProcessLookupError:
            pass
        return ", ".join(info)

    def _tail(self, path: Path, offset: int = 0, n: int = 30) -> str:
        try:
            return "\n".join(path.read_text(errors="replace")[offset:].splitlines()[-n:])
        except OSError:
            return "(no log)"

    # ---- looking at the table ------------------------------------------------------------------------
    def attach(self) -> stated.Table:
        # no owner, not readonly: lookups may fall back to the allocator lock, writes are refused
        return stated.attach(key=self.key, lock_timeout=5.0)

    def scan(self, t: stated.Table) -> dict[int, Slot]:
        """Every allocated slot (slot table columns as docs/format.md lays them out)."""
        v = t.views
        names = {o.index: o.name for o in t.owners()}
        states = v.state.tobytes()
        out = {}
        self.torn = set()           # slots whose writer died inside a write section (odd seq)
        for slot in (i for i, st in enumerate(states) if st == fmt.SLOT_ALLOCATED):
            if v.seq[slot] & 1:
                self.torn.add(slot)
            gen = v.generation[slot]
            ow = v.owner[slot]
            ent = v.entity[slot] if v.flags[slot] & fmt.FLAG_HAS_ENTITY else None
            try:
                w = t.get(Handle(slot, gen), "writes")      # one aligned u64: atomic, no seqlock needed
            except stated.StaleHandle:
                continue                                    # freed meanwhile by a running zone
            out[slot] = Slot(slot, gen, names.get(ow, f"#{ow}") if ow else None, ent, w)
        return out

    def check_zone(self, t: stated.Table, z: int, doc: dict, scan: dict[int, Slot], *, clean: bool) -> None:
        """Zone z is not running: the table must hold what its last acknowledgement says."""
        owner = f"zone-{z}"
        mine: dict[int, Slot] = {}
        for s in scan.values():
            if s.owner != owner:
                continue
            if s.entity is None:
                self.violation(f"{owner}: slot {s.slot} has no entity")
            else:
                mine[s.entity] = s
        acked = {int(e): w for e, w in doc.get("players", {}).items()}
        pin, pout = set(doc.get("pending_login", [])), set(doc.get("pending_logout", []))
        if clean and (pin or pout or doc.get("state") != "stopped"):
            self.violation(f"{owner}: clean stop but its last acknowledgement is {doc.get('state')!r} "
                           f"with pending logins {sorted(pin)} / logouts {sorted(pout)}")
        for e, w in acked.items():
            self.stats["checked"] += 1
            h = t.lookup(e)
            if h is None:
                if e not in pout:
                    self.violation(f"{owner}: acknowledged player {e} (writes {w}) is missing")
                continue
            s = mine.get(e)
            if s is None or s.slot != h.slot or s.gen != h.generation:
                self.violation(f"{owner}: player {e}: lookup gives {tuple(h)}, the slot table {s}")
                continue
            if s.writes < w:
                self.violation(f"{owner}: player {e} slot {s.slot}: writes {s.writes} < acknowledged {w} "
                               f"(a write was lost)")
            elif clean and s.writes != w:
                self.violation(f"{owner}: player {e} slot {s.slot}: writes {s.writes} != {w} acknowledged at a "
                               f"clean stop")
        for e, s in mine.items():
            if e not in acked and e not in pin:
                self.violation(f"{owner}: holds player {e} (slot {s.slot}) it never acknowledged or announced")
        for e in doc.get("logged_out", []):
            if t.lookup(e) is not None:
                self.violation(f"{owner}: player {e} was logged out but is still in the table")

    def check_global(self, t: stated.Table, where: str) -> dict[int, Slot]:
        """Quiescent (no zone running): allocator invariants, one slot per entity."""
        for p in t.verify():
            self.violation(f"{where}: verify: {p}")
        scan = self.scan(t)
        seen: dict[int, int] = {}
        for s in scan.values():
            if s.entity is None:
                continue
            if s.entity in seen:
                self.violation(f"{where}: entity {s.entity} is in slots {seen[s.entity]} and {s.slot}")
            seen[s.entity] = s.slot
            h = t.lookup(s.entity)
            if h is None or h.slot != s.slot:
                self.violation(f"{where}: lookup({s.entity}) = {h}, the slot table says slot {s.slot}")
        if len(t) != len(scan):
            self.violation(f"{where}: len(table) {len(t)} != {len(scan)} allocated slots")
        return scan

    def scrape(self) -> dict:
        from prometheus_client.parser import text_string_to_metric_families
        port = control.request(self.cfg.daemon.control_socket, "status")["daemon"]["metrics_port"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.labels.get("table", TABLE) == TABLE:
                    out[(s.name, s.labels.get("state") or s.labels.get("reason"))] = s.value
        return out

    def check_metrics(self, used: int, where: str, restored: int | None = None) -> None:
        m = self.scrape()
        alloc, orph = m[("stated_slots", "allocated")], m[("stated_slots", "orphaned")]
        if alloc + orph != used:
            self.violation(f"{where}: metrics stated_slots allocated {alloc:.0f} + orphaned {orph:.0f} != used {used}")
        if m[("stated_slots", "free")] != self.tc.capacity - used:
            self.violation(f"{where}: metrics stated_slots free {m[('stated_slots', 'free')]:.0f} != "
                           f"{self.tc.capacity - used}")
        a, f = m[("stated_allocations_total", None)], m[("stated_frees_total", None)]
        if a - f != used:
            self.violation(f"{where}: metrics allocations_total {a:.0f} - frees_total {f:.0f} = {a - f:.0f} "
                           f"!= used {used}")
        if restored is not None and m[("stated_restored_records_total", None)] != restored:
            self.violation(f"{where}: stated_restored_records_total "
                           f"{m[('stated_restored_records_total', None)]:.0f} != {restored} records in the chain")

    # ---- snapshots -----------------------------------------------------------------------------------
    def chain_state(self) -> tuple[dict[int, Slot], dict | None, list[str]]:
        """What a restore must produce: the newest valid chain, applied slot by slot."""
        chain = snap_mod.chain(self.state_dir)
        for w in chain.warnings:
            self.log(f"snapshot chain: {w}")
        if not chain:        # killed before its first snapshot: the next start creates an empty table
            return {}, None, []
        raw: dict[int, tuple] = {}
        for f in chain.files:
            rs = f.header.record_size
            for c in f.chunks:
                for i in range(c.n):
                    raw[c.slots[i]] = (c.states[i], c.gens[i], c.owners[i], c.entities[i], c.flags[i],
                                       struct.unpack_from("<Q", c.records, i * rs + self.writes_off)[0])
        names = {o.index: o.name for o in chain.newest.owners}
        out = {}
        for slot, (st, gen, ow, ent, fl, w) in raw.items():
            if st == fmt.SLOT_ALLOCATED:
                out[slot] = Slot(slot, gen, names.get(ow, f"#{ow}") if ow else None,
                                 ent if fl & fmt.FLAG_HAS_ENTITY else None, w)
        return out, chain.newest.header.counters, chain.names()

    def compare(self, have: dict[int, Slot], want: dict[int, Slot], where: str, torn=frozenset()) -> None:
        """Slot by slot. In `torn` slots (a writer died inside a write section) the record may differ:
        a snapshot copies a slot when it is dirty or pinned, and a section that never ended never
        marked it dirty, so the last copy can predate the torn writes (which nobody acknowledged)."""
        diffs = 0
        for slot in sorted(set(have) | set(want)):
            h, w = have.get(slot), want.get(slot)
            if slot in torn and h and w:
                h, w = h._replace(writes=0), w._replace(writes=0)
            if h != w:
                diffs += 1
                if diffs <= 5:
                    self.violation(f"{where}: slot {slot}: table {have.get(slot)} != snapshot {want.get(slot)}")
        if diffs > 5:
            self.violation(f"{where}: {diffs - 5} more slots differ")

    def ipcrm(self) -> None:
        for flag in ("-M", "-S"):
            r = subprocess.run(["ipcrm", flag, f"{self.key:#x}"], check=False, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"ipcrm {flag} {self.key:#x}: {r.stderr.strip()}")
        if key_in_use(self.key):
            raise RuntimeError(f"key {self.key:#x} still in use after ipcrm")

    # ---- actions -------------------------------------------------------------------------------------
    def act_kill_worker(self) -> None:
        z = self.rng.choice(self.zones)
        doc = self.kill_worker(z, self.rng.choice(("random", "tick", "section", "section", "alloc")))
        with self.attach() as t:
            scan = self.scan(t)
            self.check_zone(t, z, doc, scan, clean=False)
        held = {s.entity: s.writes for s in scan.values() if s.owner == f"zone-{z}" and s.entity is not None}
        p = self.start_worker(z)
        new = self.wait_worker(z, p)
        self.stats["restarts"] += 1
        self._check_resumed(z, new, held)
        self.log(f"killed zone-{z} pid {doc['pid']} ({doc['_killed_in']}) at tick {doc['tick']} "
                 f"({len(doc['players'])} acknowledged, pending +{len(doc['pending_login'])}/"
                 f"-{len(doc['pending_logout'])}); restarted as pid {p.pid}: resumed {new['resumed']['players']}")

    def _check_resumed(self, z: int, doc: dict, held: dict[int, int]) -> None:
        want = {"players": len(held), "entity_sum": sum(held), "writes_sum": sum(held.values())}
        if doc["resumed"] != want:
            self.violation(f"zone-{z}: resumed {doc['resumed']} via owned(), but it held {want}")

    def act_kill_daemon(self) -> None:
        self.stop_daemon(signal.SIGKILL)
        self.stats["daemon_kills_live"] = self.stats.get("daemon_kills_live", 0) + 1
        down = self.rng.uniform(0.0, 1.0)
        time.sleep(down)              # the zones keep playing without it
        self.start_daemon("adopted")
        self.stats["restarts"] += 1
        self.log(f"killed the daemon, down {down:.2f}s, restarted (adopted)")

    def act_restore(self, final: bool = False) -> None:
        """Zones down, daemon down, segments and semaphores removed; the daemon restores."""
        docs = {}
        if not final:
            for z in list(self.workers):
                docs[z] = self.kill_worker(z, self.rng.choice(("random", "tick", "section")))
            with self.attach() as t:
                scan = self.check_global(t, "before removal")
                for z, doc in docs.items():
                    self.check_zone(t, z, doc, scan, clean=False)
            self.check_metrics(len(scan), "before removal")
        else:
            with self.attach() as t:
                scan = self.scan(t)
        how = "SIGTERM" if final or self.rng.random() < 0.5 else "SIGKILL"
        self.stop_daemon(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
        want, counters, files = self.chain_state()
        if how == "SIGTERM":          # its last snapshot was taken with no zone running: exactly the table
            self.compare(scan, want, "last snapshot at SIGTERM vs table", torn=self.torn)
        self.ipcrm()
        self.start_daemon("restored" if files else "created")
        with self.attach() as t:
            have = self.check_global(t, "after restore")
            self.compare(have, want, "restored table vs snapshot chain")
            c = t.counters()
            for k in ("allocations", "frees"):      # counters never go back
                if counters is not None and c[k] < counters[k]:
                    self.violation(f"after restore: counter {k} {c[k]} < {counters[k]} in the snapshot")
        self.check_metrics(len(have), "after restore", restored=len(want) if files else 0)
        self.log(f"{'final ' if final else ''}restore after daemon {how}: {len(want)} records from "
                 + (f"{files[0]}" + (f" + {len(files) - 1} deltas" if len(files) > 1 else "") if files
                    else "nothing (no snapshot yet: created empty)"))
        if final:
            return
        self.stats["restores"] += 1
        self.stats["restarts"] += 1       # the daemon
        started = {z: self.start_worker(z) for z in self.zones}
        for z, p in started.items():
            new = self.wait_worker(z, p)
            self.stats["restarts"] += 1
            self._check_resumed(z, new, {s.entity: s.writes for s in want.values()
                                         if s.owner == f"zone-{z}" and s.entity is not None})

    def watch(self, seconds: float) -> None:
        """Sleep, noticing zones or the daemon dying on their own."""
        end = time.monotonic() + seconds
        while True:
            for z, p in list(self.workers.items()):
                if p.poll() is not None:
                    self.violation(f"zone-{z} pid {p.pid} exited by itself with {p.returncode}:\n"
                                   f"{self._tail(self.dir / f'zone-{z}.log', n=15)}")
                    del self.workers[z]
                    doc = self.read_ack(z)
                    self.stats["ops"] += doc.get("ops", 0) if doc.get("pid") == p.pid else 0
                    self.wait_worker(z, self.start_worker(z))
                    self.stats["restarts"] += 1
            if self.daemon is not None and self.daemon.poll() is not None:
                self.violation(f"the daemon pid {self.daemon.pid} exited by itself with {self.daemon.returncode}")
                self.daemon = None
                self.start_daemon("adopted")
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.1, left))

    # ---- the run -------------------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        self.log(f"dir {self.dir}, key {self.key:#010x}, {len(self.zones)} zones x {a.players} players, "
                 f"seed {a.seed}")
        self.start_daemon("created")
        for z in self.zones:
            self.start_worker(z)
        for z in self.zones:
            self.wait_worker(z, self.workers[z])
        end = time.monotonic() + a.duration
        self.watch(min(2.0, a.duration / 4))     # let the zones log in before the first fault
        restore_at = time.monotonic() + a.duration * self.rng.uniform(0.3, 0.6)   # at least one of each
        daemon_kill_at = time.monotonic() + a.duration * self.rng.uniform(0.1, 0.7)
        while True:
            self.watch(self.rng.uniform(0.4, 2.4))
            now = time.monotonic()
            if now >= end:
                break
            r = self.rng.random()
            if self.stats["restores"] == 0 and now >= restore_at or r < 0.08:
                self.act_restore()
            elif self.stats.get("daemon_kills_live", 0) == 0 and now >= daemon_kill_at or r < 0.30:
                self.act_kill_daemon()
            else:
                self.act_kill_worker()
        self.finish()
        return 1 if self.violations else 0

    def finish(self) -> None:
        """Stop the zones (SIGTERM, exit 0), check everything, then a last remove-and-restore."""
        docs = {}
        for p in list(self.workers.values()):
            os.kill(p.pid, signal.SIGTERM)
        for z, p in list(self.workers.items()):
            try:
                rc = p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.violation(f"zone-{z} pid {p.pid} did not stop within 15 s of SIGTERM")
                os.kill(p.pid, signal.SIGKILL)
                rc = p.wait()
            if rc != 0:
                self.violation(f"zone-{z} pid {p.pid} exited with {rc} on SIGTERM:\n"
                               f"{self._tail(self.dir / f'zone-{z}.log', n=15)}")
            doc = docs[z] = self.read_ack(z)
            self.stats["ops"] += doc.get("ops", 0)
            del self.workers[z]
        with self.attach() as t:
            scan = self.check_global(t, "end")
            for z, doc in docs.items():
                self.check_zone(t, z, doc, scan, clean=True)
            attached = [o.name for o in t.owners() if o.state == fmt.OWNER_ATTACHED]
            if attached:
                self.violation(f"end: owners still attached after a clean stop: {attached}")
            self.final_counters = t.counters()
        self.check_metrics(len(scan), "end")
        self.final_used = len(scan)
        self.act_restore(final=True)
        self.stop_daemon(signal.SIGTERM)
        for name in sorted(self.dir.glob("*.log")):
            text = name.read_text(errors="replace")
            bad = [ln for ln in text.splitlines()
                   if "VIOLATION" in ln or "Traceback" in ln or " ERROR " in ln or " CRITICAL " in ln]
            for ln in bad[:5]:
                self.violation(f"{name.name}: {ln.strip()}")
            if len(bad) > 5:
                self.violation(f"{name.name}: {len(bad) - 5} more such lines")

    def summary(self, elapsed: float) -> str:
        s = self.stats
        c = getattr(self, "final_counters", {})
        return (f"soak: {self.args.duration:g}s ({elapsed:.0f}s wall), {len(self.zones)} workers, seed "
                f"{self.args.seed}: kills={s['kills_workers']}/{s['kills_daemon']} (workers/daemon) "
                f"restarts={s['restarts']} restores={s['restores']} ops={s['ops']} "
                f"kills_in_write_section={s.get('kills_in_write', 0)} kills_in_alloc={s.get('kills_in_alloc', 0)} "
                f"checked_players={s['checked']} used_at_end={getattr(self, 'final_used', '?')} "
                f"lock_repairs={c.get('lock_repairs', '?')} settled={c.get('settled_slots', '?')} "
                f"violations={len(self.violations)}")

    def cleanup(self) -> None:
        for p in self.all_procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    print(f"soak: pid {p.pid} did not die", file=sys.stderr)
        self.notify.close()
        r = subprocess.run([sys.executable, "-m", "stated", "destroy", "--yes", "--config", str(self.cfg_path)],
                           check=False, capture_output=True, text=True, cwd=str(ROOT),
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if r.returncode != 0 or key_in_use(self.key):
            print(f"soak: stated destroy: {r.stdout}{r.stderr}".strip(), file=sys.stderr)
            for flag in ("-M", "-S"):      # whatever is left (a half-created segment is not "stated's")
                subprocess.run(["ipcrm", flag, f"{self.key:#x}"], check=False, capture_output=True)
        if self.args.keep_dir:
            print(f"soak: kept {self.dir}", flush=True)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, required=True, help="seconds of fault injection")
    ap.add_argument("--workers", type=int, default=4, help="zones (default 4)")
    ap.add_argument("--players", type=int, default=200, help="players per zone (default 200)")
    ap.add_argument("--tick-hz", type=float, default=20.0, help="zone tick rate (default 20)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    ap.add_argument("--key", type=lambda s: int(s, 0), default=None,
                    help="IPC key for the players table (default: an unused 0x5F... key)")
    ap.add_argument("--dir", default=None, help="parent of the temporary directory (default: the system's)")
    ap.add_argument("--keep-dir", action="store_true", help="keep the directory (logs, snapshots, ack files)")
    ap.add_argument("--quiet", action="store_true", help="only the violations and the summary line")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    if args.workers < 1 or args.duration < 0:
        ap.error("--workers must be >= 1 and --duration >= 0")
    if args.key is not None and key_in_use(args.key):
        ap.error(f"key {args.key:#x} is in use; soak.py only runs on a key nobody uses")
    exit_on_signals()
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, stream=sys.stdout,
                        format="           %(name)s: %(message)s")    # the allocator's repair messages
    t0 = time.monotonic()
    soak = Soak(args)
    rc = 1
    try:
        rc = soak.run()
    except BaseException as e:      # noqa: BLE001 - report, clean up, exit 1
        if not isinstance(e, SystemExit):
            traceback.print_exc()
        soak.violation(f"run aborted: {type(e).__name__}: {e}")
        rc = 1
    finally:
        soak.cleanup()
    if len(soak.violations) > 1:
        kinds: dict[str, int] = {}
        for v in soak.violations:        # the same check failing again and again shows up once, counted
            k = re.sub(r"\d+", "N", v.split("\n")[0])[:100]
            kinds[k] = kinds.get(k, 0) + 1
        print("violations by kind:", flush=True)
        for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"  {n:5d}  {k}", flush=True)
    print(soak.summary(time.monotonic() - t0), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
