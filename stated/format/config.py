"""Config files: TOML via tomllib, validated into plain dataclasses.

Every error names the file, the table and the field. Relative paths in the
config are relative to the config file's directory (for the built-in default,
to the current directory), so a checkout runs without touching anything else.
"""
from __future__ import annotations

import grp
import os
import re
import stat
import tomllib
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SchemaError
from . import layout as layout_mod
from . import store_config
from .schema import parse_fields

BUILTIN = "<built-in default>"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}\Z")
KEY_MIN, KEY_MAX = 1, 0x7FFFFFFF


@dataclass(frozen=True)
class TableConfig:
    name: str
    key: int
    capacity: int
    layout: layout_mod.Layout
    dead_owner: str = "keep"          # "keep" | "release"
    dead_owner_grace: float = 30.0    # seconds before "release" frees a dead owner's slots
    store: bool = False               # written behind to the database ([store]; default true when it exists)


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path
    mode: int = 0o660
    group: str | None = None
    metrics_address: str = "127.0.0.1:9474"
    control_socket: Path = Path("stated.sock")
    lock_timeout: float = 2.0
    repair_interval: float = 5.0
    reap_interval: float = 5.0
    snapshot_interval: float = 60.0
    snapshots_keep: int = 5
    full_every: int = 10
    log_format: str = "text"          # "text" | "json" (stated/logs.py); priorities under journald either way
    max_connections: int = 64         # per listener (metrics, control); clamped to fit the descriptor limit
    idle_timeout: float = 10.0        # seconds a client may stay silent (or not read our reply) before we close


@dataclass(frozen=True)
class Config:
    path: str                      # file path, or BUILTIN
    daemon: DaemonConfig
    tables: dict[str, TableConfig] = field(default_factory=dict)
    store: store_config.StoreConfig | None = None     # [store]: the database (None: no write-behind)

    def table(self, name: str) -> TableConfig:
        try:
            return self.tables[name]
        except KeyError:
            raise ConfigError(f"no table named {name!r}; tables are: {', '.join(self.tables) or 'none'}",
                              path=self.path) from None


_DAEMON_KEYS = {
    "state_dir": str, "mode": int, "group": str, "metrics_address": str, "control_socket": str,
    "lock_timeout": (int, float), "repair_interval": (int, float), "reap_interval": (int, float),
    "snapshot_interval": (int, float), "snapshots_keep": int, "full_every": int, "base_key": int,
    "log_format": str,
    "max_connections": int, "idle_timeout": (int, float),
}
_TABLE_KEYS = {"key": int, "capacity": int, "fields": list, "dead_owner": str,
               "dead_owner_grace": (int, float)}


def _check_types(d: dict, allowed: dict, path: str, table: str | None, where: str) -> None:
    for k, v in d.items():
        if k not in allowed:
            raise ConfigError(f"unknown setting in {where}; known: {', '.join(sorted(allowed))}",
                              path=path, table=table, field=k)
        want = allowed[k]
        if isinstance(v, bool) or not isinstance(v, want):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise ConfigError(f"must be {names}, got {v!r}", path=path, table=table, field=k)


def derive_key(base_key: int, name: str) -> int:
    """Key of a table without an explicit `key`: base_key plus 16 bits of crc32(name)."""
    return (base_key & 0x7FFF0000) | (zlib.crc32(name.encode()) & 0xFFFF)


def parse(data: dict[str, Any], path: str, base_dir: Path) -> Config:
    """Validate a parsed TOML document. `path` is only used in messages."""
    unknown = set(data) - {"daemon", "tables", "store"}
    if unknown:
        raise ConfigError(f"unknown top-level table(s) {sorted(unknown)}; expected [daemon], [tables.NAME] "
                          f"and optionally [store]", path=path)
    store = store_config.parse(data["store"], path) if "store" in data else None
    d = data.get("daemon", {})
    if not isinstance(d, dict):
        raise ConfigError("[daemon] must be a table", path=path)
    _check_types(d, _DAEMON_KEYS, path, None, "[daemon]")

    def positive(k: str, default: float) -> float:
        v = d.get(k, default)
        if not v > 0:       # also refuses nan
            raise ConfigError(f"must be > 0, got {v}", path=path, field=k)
        return v

    mode = d.get("mode", 0o660)
    if mode & ~0o777 or mode & 0o007:
        raise ConfigError(f"mode {oct(mode)} must be at most 0o770: nothing is world-accessible",
                          path=path, field="mode")
    if mode & 0o600 != 0o600:
        raise ConfigError(f"mode {oct(mode)} must give the owner read and write (0o600)",
                          path=path, field="mode")
    for k in ("state_dir", "control_socket", "group"):
        if "\0" in d.get(k, ""):
            raise ConfigError("must not contain a NUL character", path=path, field=k)
    if d.get("log_format", "text") not in ("text", "json"):
        raise ConfigError(f'must be "text" or "json", got {d["log_format"]!r}', path=path, field="log_format")
    base_key = d.get("base_key", 0x53540000)
    daemon = DaemonConfig(
        state_dir=(base_dir / d.get("state_dir", "var")).resolve(),
        mode=mode,
        group=d.get("group"),
        metrics_address=d.get("metrics_address", "127.0.0.1:9474"),
        # not resolve(): a symlink at the socket's own path must be seen (and refused), not followed
        control_socket=Path(os.path.abspath(base_dir / d.get("control_socket", "stated.sock"))),
        lock_timeout=positive("lock_timeout", 2.0),
        repair_interval=positive("repair_interval", 5.0),
        reap_interval=positive("reap_interval", 5.0),
        snapshot_interval=positive("snapshot_interval", 60.0),
        snapshots_keep=int(positive("snapshots_keep", 5)),
        full_every=int(positive("full_every", 10)),
        log_format=d.get("log_format", "text"),
        max_connections=int(positive("max_connections", 64)),
        idle_timeout=float(positive("idle_timeout", 10.0)),
    )
    host, _, port = daemon.metrics_address.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected host:port, got {daemon.metrics_address!r}", path=path,
                          field="metrics_address")

    tables_raw = data.get("tables", {})
    if not isinstance(tables_raw, dict) or not tables_raw:
        raise ConfigError("no tables: add at least one [tables.NAME] with capacity and fields", path=path)
    tables: dict[str, TableConfig] = {}
    keys: dict[int, str] = {}
    for name, t in tables_raw.items():
        if not _NAME.match(name):
            raise ConfigError("table names are lower-case identifiers (a-z, 0-9, _), at most 31 characters",
                              path=path, table=name)
        if not isinstance(t, dict):
            raise ConfigError("must be a table", path=path, table=name)
        t = dict(t)
        stored = t.pop("store", store is not None)
        if not isinstance(stored, bool):
            raise ConfigError(f"must be true or false, got {stored!r}", path=path, table=name, field="store")
        if stored and store is None:
            raise ConfigError("store = true needs a [store] section with the database's dsn", path=path,
                              table=name, field="store")
        _check_types(t, _TABLE_KEYS, path, name, f"[tables.{name}]")
        for req in ("capacity", "fields"):
            if req not in t:
                raise ConfigError("is required", path=path, table=name, field=req)
        key = t.get("key", derive_key(base_key, name))
        if not KEY_MIN <= key <= KEY_MAX:
            raise ConfigError(f"key {key:#x} must be within [{KEY_MIN:#x}, {KEY_MAX:#x}]",
                              path=path, table=name, field="key")
        if key in keys:
            raise ConfigError(f"key {key:#x} is also used by table {keys[key]!r}",
                              path=path, table=name, field="key")
        keys[key] = name
        cap = t["capacity"]
        if not 1 <= cap <= 1 << 26:
            raise ConfigError(f"capacity must be within [1, {1 << 26}], got {cap}",
                              path=path, table=name, field="capacity")
        try:
            fields = parse_fields(t["fields"])
        except SchemaError as e:
            raise ConfigError(str(e).split(": ", 1)[-1] if e.field else str(e), path=path, table=name,
                              field=f"fields.{e.field}" if e.field else "fields") from None
        policy = t.get("dead_owner", "keep")
        if policy not in ("keep", "release"):
            raise ConfigError(f"must be \"keep\" or \"release\", got {policy!r}",
                              path=path, table=name, field="dead_owner")
        grace = t.get("dead_owner_grace", 30.0)
        if grace < 0:
            raise ConfigError("must be >= 0 seconds", path=path, table=name, field="dead_owner_grace")
        tables[name] = TableConfig(name, key, cap, layout_mod.compute(fields), policy, float(grace), stored)
    return Config(path, daemon, tables, store)


def preflight(cfg: Config) -> None:
    """Check the config against this host before the daemon creates or removes anything.

    - state_dir must be a directory if it exists (a file there would give READY, then every save fails);
    - control_socket must be a socket if anything exists at its path: the daemon removes a stale socket
      before binding, and must never remove an operator's regular file, directory or symlink;
    - their parents, when they exist, must be directories;
    - the group, when set, must exist.
    Raises ConfigError naming the config file and the setting (`stated run` exits 78).
    """
    d = cfg.daemon
    if d.group is not None:
        try:
            grp.getgrnam(d.group)
        except KeyError:
            raise ConfigError(f"group {d.group!r} does not exist; create it (systemd/stated.sysusers.conf) or "
                              f"change the setting", path=cfg.path, field="group") from None
    try:
        st = os.stat(d.state_dir)          # a symlink to a directory is the operator's choice: followed
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise ConfigError(f"{d.state_dir}: a parent is not a directory", path=cfg.path, field="state_dir") from None
    except OSError as e:
        raise ConfigError(f"{d.state_dir}: {e.strerror}", path=cfg.path, field="state_dir") from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{d.state_dir} exists and is not a directory; point state_dir at a directory "
                          f"(snapshots go there)", path=cfg.path, field="state_dir")
    try:
        st = os.lstat(d.control_socket)    # never follow: whatever sits there is what we would unlink
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise ConfigError(f"{d.control_socket}: a parent is not a directory", path=cfg.path,
                          field="control_socket") from None
    except OSError as e:
        raise ConfigError(f"{d.control_socket}: {e.strerror}", path=cfg.path, field="control_socket") from None
    if st is not None and not stat.S_ISSOCK(st.st_mode):
        kind = ("a regular file" if stat.S_ISREG(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
                else "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket")
        raise ConfigError(f"{d.control_socket} exists and is {kind}, not a socket; the daemon will not replace "
                          f"it: choose another path", path=cfg.path, field="control_socket")


def load(path: str | os.PathLike | None = None) -> Config:
    """Load a config file, or the built-in default when `path` is None."""
    if path is None:
        text = resources.files("stated").joinpath("default.toml").read_text()
        return loads(text, BUILTIN, Path.cwd())
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", path=str(p)) from None
    return loads(text, str(p), p.resolve().parent)


def loads(text: str, path: str, base_dir: Path) -> Config:
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as e:   # ValueError: int digit limit
        raise ConfigError(f"not valid TOML: {e}", path=path) from None
    return parse(data, path, base_dir)


SYSTEM_CONFIG = "/etc/stated/stated.toml"


def default_path(env: Mapping[str, str] | None = None, system: str = SYSTEM_CONFIG) -> str | None:
    """The config used when --config is not given: $STATED_CONFIG, else the installed service's
    /etc/stated/stated.toml when it exists (so `stated status` on a server means that daemon),
    else None: the built-in default."""
    env = os.environ if env is None else env
    if env.get("STATED_CONFIG"):
        return env["STATED_CONFIG"]
    return system if os.path.isfile(system) else None
