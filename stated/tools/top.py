"""`stated top`: a live terminal view of every table, refreshed each second.

Reads the segments directly and read-only (SHM_RDONLY), like `stated status` without a
daemon: it works whether the daemon runs or not and never takes a lock. Rates are counter
differences between two samples; `dirty` is counted from the slot table (dirty or pinned
marks: what the next snapshot copies), the same scan the daemon does.

Keys: q (or Ctrl-C) quits. `--once` prints one sample as plain text for scripts.
"""
from __future__ import annotations

import curses
import sys
import time
from collections.abc import Callable

from ..daemon.status import TableStats, table_status
from ..errors import StatedError
from ..format.config import Config

# The columns first (they fit in 80 columns); the rest follow on wider terminals.
COLUMNS = ("TABLE", "USED", "CAPACITY", "FILL", "ALLOC/s", "FREE/s", "DIRTY", "OWNERS", "REPAIRS", "ORPHANED",
           "TIMEOUTS", "ATTACHED")


def sample(cfg: Config) -> list[TableStats]:
    """One reading of every configured table (the numbers `stated status` shows); a missing or broken
    table is a row with an error."""
    return [table_status(tc.name, tc.key, tc.capacity) for tc in cfg.tables.values()]


def render(rows: list[TableStats], prev: dict[str, TableStats], dt: float) -> list[str]:
    """Text lines of the table view: the header, then one line per table."""
    lines = [" ".join(f"{c:>{w}}" for c, w in zip(COLUMNS, _WIDTHS))]
    for r in rows:
        if r.error:
            lines.append(f"{r.table[:10]:>10} {r.error}")
            continue
        p = prev.get(r.table)

        def rate(name: str, r: TableStats = r, p: TableStats | None = p) -> str:
            if p is None or p.error or dt <= 0:
                return "-"
            return f"{max(0, r.counters.get(name, 0) - p.counters.get(name, 0)) / dt:.0f}"

        fill = f"{100 * r.used / r.capacity:.1f}%" if r.capacity else "-"
        cells = (r.table[:10], r.used, r.capacity, fill, rate("allocations"), rate("frees"),
                 "-" if r.dirty is None else r.dirty, f"{r.owners_alive}/{r.owners_dead + r.owners_detached}",
                 r.counters.get("lock_repairs", 0), r.orphaned, r.counters.get("lock_timeouts", 0), r.attached)
        lines.append(" ".join(f"{str(c):>{w}}" for c, w in zip(cells, _WIDTHS)))
    return lines


_WIDTHS = (10, 8, 8, 6, 7, 7, 7, 6, 7, 8, 8, 8)


def _title(cfg: Config, interval: float, clock: Callable[[], float]) -> str:
    return (f"stated top - {time.strftime('%H:%M:%S', time.localtime(clock()))} - {cfg.path} - every "
            f"{interval:g}s - OWNERS alive/dead - q quits")


def run(cfg: Config, *, interval: float = 1.0, iterations: int = 0, once: bool = False,
        clock: Callable[[], float] = time.time) -> int:
    if interval <= 0:
        raise StatedError(f"--interval must be > 0, got {interval}")
    if once or not sys.stdout.isatty():
        print(_title(cfg, interval, clock))
        print("\n".join(render(sample(cfg), {}, 0)))
        return 0
    return curses.wrapper(_loop, cfg, interval, iterations, clock)


def _loop(scr, cfg: Config, interval: float, iterations: int, clock) -> int:
    curses.curs_set(0)
    scr.timeout(int(interval * 1000))
    prev: dict[str, TableStats] = {}
    t_prev = time.monotonic()
    n = 0
    while True:
        rows = sample(cfg)
        now = time.monotonic()
        lines = [_title(cfg, interval, clock), ""] + render(rows, prev, now - t_prev)
        prev, t_prev = {r.table: r for r in rows}, now
        scr.erase()
        h, w = scr.getmaxyx()
        for y, line in enumerate(lines[:h]):
            attr = curses.A_BOLD if y in (0, 2) else curses.A_NORMAL
            scr.addnstr(y, 0, line, max(0, w - 1), attr)
        scr.refresh()
        n += 1
        if iterations and n >= iterations:
            return 0
        deadline = now + interval
        while True:           # wait for the next refresh, or q
            ch = scr.getch()
            if ch in (ord("q"), ord("Q"), 27):
                return 0
            if time.monotonic() >= deadline:
                break
            scr.timeout(max(1, int((deadline - time.monotonic()) * 1000)))
        scr.timeout(int(interval * 1000))
