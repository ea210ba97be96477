"""The `stated` command line: run, status, destroy, header, check-config, get, top (and daemon requests).

Exit codes: 0 success; 1 a stated error (message on stderr); 2 usage error;
3 the daemon is not running (for commands that need it); 78 (EX_CONFIG) `stated run`
refused its config or the installation (systemd's RestartPreventExitStatus=78: retrying
cannot help).

Global options (--config, -v) are accepted before or after the command.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from .. import __version__
from ..daemon import logs
from ..errors import ConfigError, StatedError
from ..format import config as config_mod
from ..format import segment as fmt
from ..format.units import human_bytes, human_seconds
from ..shm import segment

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
EXIT_CONFIG = 78        # EX_CONFIG (sysexits.h): the unit's RestartPreventExitStatus=
DIST = "stated-shm"     # the distribution's name on PyPI; the package and the command are `stated`

log = logging.getLogger("stated.cli")


def _config(args) -> config_mod.Config:
    return config_mod.load(args.config if args.config else config_mod.default_path())


def cmd_run(args) -> int:
    from ..daemon.lifecycle import Daemon
    from ..daemon.service import protect_core_dumps
    path = args.config or config_mod.default_path()
    try:
        cfg = config_mod.load(path)          # the daemon is built from it (and reload() reads the path again)
    except ConfigError as e:
        log.error("start-up refused: %s", e)
        return EXIT_CONFIG
    logs.configure(logging.DEBUG if args.verbose else logging.INFO, cfg.daemon.log_format)
    protect_core_dumps()                     # no player data in a core file, however we were started
    return Daemon(cfg, migrate=args.migrate, allow_lossy=args.allow_lossy, force=args.force).run()


def cmd_migrate(args) -> int:
    """Offline migration (daemon stopped): every table whose layout or capacity changed."""
    from ..daemon import control, provision
    cfg = _config(args)
    if control.ping(cfg.daemon.control_socket):
        print("stated migrate: the daemon is running; stop it, or restart it with `stated run --migrate`",
              file=sys.stderr)
        return EXIT_ERROR
    for tc in cfg.tables.values():
        seg, how, n = provision.ensure(tc, cfg.daemon, migrate=True, allow_lossy=args.allow_lossy, force=args.force)
        seg.detach()
        print(f"{tc.name}: {how}" + (f" ({n} records)" if how in ("migrated", "restored") else ""))
    return EXIT_OK


def _daemon(cfg: config_mod.Config, op: str, **kw) -> dict | None:
    """Ask the running daemon; None when none answers on the control socket."""
    from ..daemon import control
    try:
        return control.request(cfg.daemon.control_socket, op, **kw)
    except (ConnectionError, FileNotFoundError, OSError):
        return None


def cmd_status(args) -> int:
    from ..daemon.status import config_status
    cfg = _config(args)
    reply = _daemon(cfg, "status")
    daemon = reply["daemon"] if reply else None
    rows = reply["tables"] if reply else [st.to_dict() for st in config_status(cfg)]
    if args.json:
        print(json.dumps({"config": cfg.path, "daemon": daemon, "tables": rows}, indent=2))
    else:
        print(f"config: {cfg.path}")
        if daemon:
            print(f"daemon: pid {daemon['pid']}, up {human_seconds(daemon['uptime'])}, "
                  f"metrics on port {daemon['metrics_port']}")
        else:
            print("daemon: not running (read the segments directly)")
        hdr = f"{'TABLE':<12} {'KEY':<10} {'SHMID':>7} {'USED':>8} {'CAPACITY':>8} {'ATTACHED':>8} {'MODE':>5} " \
              f"{'SIZE':>10}  LAYOUT"
        print(hdr)
        for r in rows:
            if "error" in r:
                print(f"{r['table']:<12} {r['key']:#010x}  {r['error']}")
                continue
            print(f"{r['table']:<12} {r['key']:#010x} {r['shmid']:>7} {r['used']:>8} {r['capacity']:>8} "
                  f"{r['attached']:>8} {r['mode']:>5} {human_bytes(r['size_bytes']):>10}  {r['layout_hash']}")
            for o in r["owners"]:
                print(f"    owner {o['name']:<20} pid {o['pid']:<8} {o['state']:<9} {o['liveness']:<8} "
                      f"{o['slots']} slots")
            if "warning" in r:
                print(f"    warning: {r['warning']}")
    return EXIT_OK if all("error" not in r for r in rows) else EXIT_ERROR


def cmd_destroy(args) -> int:
    cfg = _config(args)
    if not args.yes:
        print("refusing to destroy without --yes: this deletes every table's shared state "
              f"({', '.join(cfg.tables)})", file=sys.stderr)
        return EXIT_USAGE
    rc = EXIT_OK
    names = args.tables or list(cfg.tables)
    for name in names:
        tc = cfg.table(name)
        try:
            removed = segment.destroy(tc.key)
        except StatedError as e:
            print(f"{name}: {e}", file=sys.stderr)
            rc = EXIT_ERROR
            continue
        print(f"{name} ({tc.key:#010x}): {'removed' if removed else 'nothing to remove'}")
    return rc


def cmd_restore(args) -> int:
    from ..daemon import control
    from ..persist import saver as persist
    cfg = _config(args)
    if control.ping(cfg.daemon.control_socket):
        print("stated restore: the daemon is running; stop it first (it restores absent tables by itself at "
              "start-up)", file=sys.stderr)
        return EXIT_ERROR
    from ..persist import snapshot
    table = args.table or snapshot.read_file(Path(args.from_)).header.table
    out = persist.restore_by_hand(cfg.table(table), cfg.daemon, Path(args.from_), args.force)
    print(json.dumps(out, indent=2) if args.json else
          f"{table}: restored {out['records']} records from {', '.join(out['from'])}"
          + (f" (safety snapshot: {out['safety_snapshot']})" if out["safety_snapshot"] else "")
          + (f"; saved as {out['saved_as']}" if out.get("saved_as") else ""))
    return EXIT_OK


def _verify(args) -> int:
    from ..persist import saver as persist
    rc = EXIT_OK
    for f in args.verify:
        try:
            info = persist.verify_file(Path(f))
            print(json.dumps(info) if args.json else
                  f"{f}: ok, {info['kind']} snapshot of {info['table']!r} seq {info['seq']}, "
                  f"{info['records']} records" + (f", {info['torn_flagged']} flagged torn" if info["torn_flagged"]
                                                   else ""))
        except StatedError as e:
            print(f"{f}: INVALID: {e}", file=sys.stderr)
            rc = EXIT_ERROR
    return rc


def _daemon_op(op: str):
    def run(args) -> int:
        if getattr(args, "verify", None):
            return _verify(args)
        cfg = _config(args)
        from ..daemon import control
        extra = {k: v for k in ("owner", "table") if (v := getattr(args, k, None)) is not None}
        try:
            reply = control.request(cfg.daemon.control_socket, op, timeout=args.timeout, **extra)
        except (ConnectionError, FileNotFoundError, OSError) as e:
            print(f"stated {op}: no daemon answers on {cfg.daemon.control_socket} ({e})", file=sys.stderr)
            return EXIT_NOT_RUNNING
        reply.pop("ok", None)
        print(json.dumps(reply, indent=2) if args.json else f"{op}: ok {reply or ''}".rstrip())
        return EXIT_OK
    return run


def cmd_header(args) -> int:
    from . import cheader
    cfg = _config(args)
    names = args.tables or list(cfg.tables)
    sys.stdout.write(cheader.generate([(n, cfg.table(n).key, cfg.table(n).layout) for n in names]))
    return EXIT_OK


def cmd_check_config(args) -> int:
    """Like `promtool check config`: each file parsed and laid out as the daemon would; exit 1 if any fails.

    Also warns about paths the systemd unit cannot write (ProtectSystem=strict makes /etc and
    /usr read-only): a relative `control_socket` in /etc/stated/stated.toml resolves under /etc/stated.
    """
    paths = args.files or [args.config or config_mod.default_path()]
    rc = EXIT_OK
    for path in paths:
        print(f"Checking {path or config_mod.BUILTIN}")
        try:
            cfg = config_mod.load(path)
        except StatedError as e:
            print(f"  FAILED: {e}")
            rc = EXIT_ERROR
            continue
        tables = ", ".join(f"{t.name} ({t.capacity} x {t.layout.record_size} B)" for t in cfg.tables.values())
        print(f"  SUCCESS: {len(cfg.tables)} tables: {tables}")
        for what, p in (("state_dir", cfg.daemon.state_dir), ("control_socket", cfg.daemon.control_socket)):
            if p.is_relative_to("/etc") or p.is_relative_to("/usr"):
                print(f"  WARNING: {what} = {p} is read-only for the systemd service (ProtectSystem=strict); "
                      f"use {'/var/lib/stated' if what == 'state_dir' else '/run/stated/stated.sock'}")
        host = cfg.daemon.metrics_address.rpartition(":")[0].strip("[]")
        if host not in ("127.0.0.1", "::1", "localhost"):
            print(f"  WARNING: metrics_address {cfg.daemon.metrics_address} is not loopback: anyone who can reach "
                  "it reads table names and counters")
    return rc


def _jsonable(v):
    """bytes fields as hex; NaN and infinities as null (JSON has neither)."""
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def cmd_get(args) -> int:
    """One record as JSON, through a read-only attach (SHM_RDONLY): safe while workers run."""
    from ..shm.table import attach
    with attach(args.table, config=args.config or config_mod.default_path(), readonly=True) as t:
        h = t.lookup(args.entity)
        if h is None:
            print(f"stated get: table {args.table!r} has no record for entity {args.entity}", file=sys.stderr)
            return EXIT_ERROR
        rec = t.read(h)
        info = t.slot_info(h)
        out = {"table": args.table, "entity": args.entity, "slot": h.slot, "generation": h.generation,
               "owner": info.owner, "dirty": info.dirty,
               "record": {k: _jsonable(v) for k, v in rec.to_dict().items()}}
    print(json.dumps(out, indent=None if args.compact else 2))
    return EXIT_OK


def cmd_top(args) -> int:
    from . import top
    return top.run(_config(args), interval=args.interval, iterations=args.iterations, once=args.once)


def cmd_completion(args) -> int:
    from . import completion
    sys.stdout.write(completion.script(build_parser(), args.shell))
    return EXIT_OK


def cmd_store(args) -> int:
    """`stated store status | init [--print-sql] | export TABLE ENTITY`."""
    cfg = _config(args)
    if cfg.store is None:
        print("stated store: no [store] in the config (the default config runs without a database; add "
              "[store] with dsn = \"postgresql://...\" or set $STATED_STORE_DSN)", file=sys.stderr)
        return EXIT_ERROR
    stored = [tc for tc in cfg.tables.values() if tc.store]
    from ..format.store_config import redact
    from ..persist.store.schema import TableMapping, ddl
    mappings = [TableMapping(tc.name, tc.layout, cfg.store.schema) for tc in stored]
    if args.store_cmd == "init" and args.print_sql:
        sys.stdout.write(ddl(mappings, cfg.store.schema))
        return EXIT_OK
    if args.store_cmd == "status":
        from ..daemon import control
        try:
            reply = control.request(cfg.daemon.control_socket, "store_status", timeout=args.timeout)
        except (ConnectionError, FileNotFoundError, OSError) as e:
            print(f"stated store status: no daemon answers on {cfg.daemon.control_socket} ({e})", file=sys.stderr)
            return EXIT_NOT_RUNNING
        st = reply["store"]
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            print(f"database {st['dsn']} as host {st['host_id']}: {'up' if st['up'] else 'DOWN'}"
                  + (f" ({st['last_error']})" if st["last_error"] else ""))
            print(f"{'table':16} {'dirty':>8} {'lag':>8} {'leases':>8} {'flushed':>10} {'stale':>7}")
            for name, t in st["tables"].items():
                print(f"{name:16} {t['dirty']:8d} {t['lag_seconds']:7.1f}s {t['leases']:8d} {t['flushed']:10d} "
                      f"{t['stale']:7d}")
        return EXIT_OK if st["up"] else EXIT_ERROR

    import asyncio

    from ..persist.store import pg
    from ..persist.store.flush import setup_schema

    store = cfg.store

    async def go() -> int:
        drv = await pg.connect(store.dsn, timeout=store.timeout, application_name="stated-cli")
        try:
            if args.store_cmd == "init":
                for line in await setup_schema(drv, store.schema, mappings, migrate=args.migrate,
                                               allow_lossy=args.allow_lossy):
                    print(line)
                print(f"schema {store.schema!r} in {redact(store.dsn)} is ready")
                return EXIT_OK
            m = next((x for x in mappings if x.name == args.table), None)
            if m is None:
                print(f"stated store export: table {args.table!r} is not stored; stored tables: "
                      f"{', '.join(x.name for x in mappings) or 'none'}", file=sys.stderr)
                return EXIT_ERROR
            from ..persist.store.schema import entity_to_sql
            rows = await drv.fetch(m.select_sql(), entity_to_sql(args.entity))
            if not rows:
                print(f"stated store export: table {args.table!r} has no row for entity {args.entity}",
                      file=sys.stderr)
                return EXIT_ERROR
            print(json.dumps(m.to_json(rows[0]), indent=2, default=str))
            return EXIT_OK
        finally:
            await drv.close()
    return asyncio.run(go())


def _int(text: str) -> int:
    """An entity id: decimal or 0x-hex."""
    return int(text, 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stated", description="Shared-memory state daemon for game servers.",
        epilog=f"Installed from the Python distribution {DIST!r} (pip install {DIST}); the package and the "
               "command are `stated`. Shell completion: `stated completion bash`.")
    p.add_argument("--version", action="version",
                   version=f"stated {__version__} ({DIST}, segment format {fmt.FORMAT_VERSION})")
    # Global options: also accepted after the command. The command's copies default to SUPPRESS,
    # so a value given before the command is not reset by the subparser.
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--config", metavar="PATH",
                   help="config file (default: $STATED_CONFIG, else /etc/stated/stated.toml if it exists, "
                        "else the built-in default)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="config file (default: $STATED_CONFIG, else /etc/stated/stated.toml if it exists, "
                        "else the built-in default)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, parents=[common])
        sp.set_defaults(func=func)
        return sp

    run = add("run", cmd_run, "run the daemon in the foreground (creates, adopts or restores the tables)")
    mig = add("migrate", cmd_migrate, "convert tables whose layout changed in the config (daemon stopped)")
    for sp in (run, mig):
        if sp is run:
            sp.add_argument("--migrate", action="store_true",
                            help="convert tables whose layout/capacity changed (safety snapshot first)")
        sp.add_argument("--allow-lossy", action="store_true",
                        help="accept removed fields, narrowed types and shorter strings when migrating")
        sp.add_argument("--force", action="store_true", help="migrate even while workers are attached")
    s = add("status", cmd_status, "show tables: key, shmid, used/capacity, attached processes, owners")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    d = add("destroy", cmd_destroy, "remove tables' segments and semaphores (their state is lost)")
    d.add_argument("--yes", action="store_true", help="confirm")
    d.add_argument("tables", nargs="*", metavar="TABLE", help="tables to remove (default: all)")
    for op, text in (("reload", "make the running daemon re-read its config (waits for the answer)"),
                     ("reap", "run the dead-owner pass now"), ("snapshot", "take a snapshot now")):
        r = add(op, _daemon_op(op), text)
        r.add_argument("--json", action="store_true", help="machine-readable output")
        r.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon")
        if op == "snapshot":
            r.add_argument("--verify", nargs="+", metavar="FILE",
                           help="check snapshot files offline instead (exit 1 if any is invalid)")
        if op == "reap":
            r.add_argument("--owner", metavar="NAME",
                           help="release this gone owner's slots now, whatever the dead-owner policy (they are "
                                "saved first); frees its owner entry for new names")
            r.add_argument("--table", metavar="TABLE", help="with --owner: only in this table")
    rs = add("restore", cmd_restore, "rebuild a table from a snapshot file (daemon stopped)")
    rs.add_argument("--from", dest="from_", required=True, metavar="FILE", help="full or delta snapshot file")
    rs.add_argument("--table", help="table to restore (default: the one named in the file)")
    rs.add_argument("--force", action="store_true",
                    help="replace an existing segment (a safety snapshot of it is taken first)")
    rs.add_argument("--json", action="store_true", help="machine-readable output")
    h = add("header", cmd_header, "print a C11 header for the tables' layouts")
    h.add_argument("tables", nargs="*", metavar="TABLE", help="tables to include (default: all)")
    cc = add("check-config", cmd_check_config, "check config files (exit 1 if any is invalid)")
    cc.add_argument("files", nargs="*", metavar="FILE", help="files to check (default: the --config one)")
    g = add("get", cmd_get, "print one record as JSON (read-only attach)")
    g.add_argument("table", metavar="TABLE")
    g.add_argument("entity", metavar="ENTITY", type=_int, help="entity id (decimal or 0x...)")
    g.add_argument("--compact", action="store_true", help="one line")
    t = add("top", cmd_top, "live view of the tables: fill, alloc/free rates, dirty, owners, lock repairs")
    t.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    t.add_argument("--iterations", type=int, default=0, metavar="N", help="stop after N refreshes (0: until q)")
    t.add_argument("--once", action="store_true", help="print one sample as plain text and exit")
    st = add("store", cmd_store, "the database store: status, init [--print-sql], export TABLE ENTITY")
    ssub = st.add_subparsers(dest="store_cmd", required=True, metavar="STORE_COMMAND")
    s1 = ssub.add_parser("status", help="connection, lag, dirty records and leases (asks the daemon)",
                         parents=[common])
    s1.add_argument("--json", action="store_true", help="machine-readable output")
    s1.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon")
    s2 = ssub.add_parser("init", help="create (or check) the schema in the database; --print-sql prints the DDL "
                         "for a DBA instead", parents=[common])
    s2.add_argument("--print-sql", action="store_true", help="print the DDL instead of applying it")
    s2.add_argument("--migrate", action="store_true", help="convert tables whose layout changed")
    s2.add_argument("--allow-lossy", action="store_true", help="with --migrate: accept lossy changes")
    s3 = ssub.add_parser("export", help="print an entity's row as JSON (reads the database)", parents=[common])
    s3.add_argument("table", metavar="TABLE")
    s3.add_argument("entity", metavar="ENTITY", type=_int, help="entity id (decimal or 0x...)")
    c = add("completion", cmd_completion, "print a shell completion script")
    c.add_argument("shell", choices=["bash", "zsh", "fish"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except StatedError as e:
        print(f"stated {args.command}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:          # `stated header | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
