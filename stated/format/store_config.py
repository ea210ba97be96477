"""`[store]` settings: pure parsing and validation, no I/O (the DSN is checked, never dialled here).

    [store]
    dsn = "postgresql://stated@db.example:5432/game"   # or $STATED_STORE_DSN; a password never appears in logs
    host_id = "host-a"          # default: the hostname; must be unique per host
    flush_interval = 1.0        # seconds between write-behind passes
    batch = 5000                # rows per COPY + upsert
    lease_ttl = 30.0            # seconds a lease lives without renewal
    max_rate = 0                # rows/s cap for catch-up after an outage (0: no cap)
    schema = "stated"           # SQL schema holding the tables
    timeout = 2.0               # bound on claim/flush/release and on each database call
"""
from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}\Z")
_HOST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}\Z")
KEYS: dict[str, Any] = {"dsn": str, "host_id": str, "flush_interval": (int, float), "batch": int,
                        "lease_ttl": (int, float), "max_rate": (int, float), "schema": str,
                        "timeout": (int, float)}
ENV_DSN = "STATED_STORE_DSN"


@dataclass(frozen=True)
class StoreConfig:
    dsn: str
    host_id: str
    flush_interval: float = 1.0
    batch: int = 5000
    lease_ttl: float = 30.0
    max_rate: float = 0.0
    schema: str = "stated"
    timeout: float = 2.0

    def __repr__(self) -> str:        # never print the password
        return (f"StoreConfig(dsn={redact(self.dsn)!r}, host_id={self.host_id!r}, flush_interval="
                f"{self.flush_interval}, batch={self.batch}, lease_ttl={self.lease_ttl}, max_rate={self.max_rate}, "
                f"schema={self.schema!r}, timeout={self.timeout})")

    __str__ = __repr__


def redact(dsn: str) -> str:
    """The DSN with any password replaced by '***' (URL userinfo and ?password= alike)."""
    try:
        u = urllib.parse.urlsplit(dsn)
    except ValueError:
        return "<unparsable dsn>"
    netloc = u.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _pw = userinfo.partition(":")
        netloc = f"{user}{':***' if sep else ''}@{hostport}"
    query = "&".join(("password=***" if q.split("=", 1)[0].lower() == "password" else q)
                     for q in u.query.split("&")) if u.query else ""
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, query, u.fragment))


def check_dsn(dsn: str, path: str = "") -> None:
    """Refuse a malformed DSN with one clear line (never echoing the password)."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"malformed dsn {redact(dsn)!r}: {why}; expected "
                           f"postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE", path=path, field="store.dsn")
    if not isinstance(dsn, str) or not dsn.strip():
        raise bad("empty")
    if any(c in dsn for c in "\0\n\r"):
        raise bad("contains a control character")
    try:
        u = urllib.parse.urlsplit(dsn)
        port = u.port            # raises ValueError on a non-numeric or out-of-range port
    except ValueError as e:
        raise bad(str(e).replace(dsn, "<dsn>")) from None
    if u.scheme not in ("postgres", "postgresql"):
        raise bad(f"scheme must be postgresql://, not {u.scheme + '://' if u.scheme else 'missing'}")
    if not u.hostname and "host=" not in u.query:
        raise bad("no host")
    if port is not None and not 1 <= port <= 65535:
        raise bad(f"port {port} is out of range")
    if not u.path.strip("/"):
        raise bad("no database name")


def parse(d: Mapping[str, Any], path: str = "", env: Mapping[str, str] | None = None,
          hostname: str | None = None) -> StoreConfig:
    """Validate the `[store]` table. `env` and `hostname` are injectable (tests)."""
    if not isinstance(d, Mapping):
        raise ConfigError("[store] must be a table", path=path)
    for k, v in d.items():
        if k not in KEYS:
            raise ConfigError(f"unknown setting in [store]; known: {', '.join(sorted(KEYS))}", path=path,
                              field=f"store.{k}")
        want = KEYS[k]
        if isinstance(v, bool) or not isinstance(v, want):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise ConfigError(f"must be {names}", path=path, field=f"store.{k}")
    env = env if env is not None else os.environ
    dsn = d.get("dsn") or env.get(ENV_DSN, "")
    if not dsn:
        raise ConfigError(f"no database: set dsn in [store] or ${ENV_DSN}", path=path, field="store.dsn")
    check_dsn(dsn, path)
    host_id = d.get("host_id") or hostname or os.uname().nodename
    if not _HOST_ID.match(host_id):
        raise ConfigError(f"host_id {host_id!r} must be 1-128 characters of letters, digits and ._:@-",
                          path=path, field="store.host_id")
    schema = d.get("schema", "stated")
    if not _IDENT.match(schema):
        raise ConfigError(f"schema {schema!r} must be a lower-case SQL identifier", path=path, field="store.schema")

    def positive(k: str, default: float) -> float:
        v = d.get(k, default)
        if not v > 0 or v != v or v == float("inf"):
            raise ConfigError(f"must be a finite number > 0, got {v}", path=path, field=f"store.{k}")
        return float(v)
    batch = d.get("batch", 5000)
    if not 1 <= batch <= 1_000_000:
        raise ConfigError(f"must be within [1, 1000000], got {batch}", path=path, field="store.batch")
    max_rate = d.get("max_rate", 0)
    if not 0 <= max_rate < float("inf"):
        raise ConfigError(f"must be >= 0 rows/s (0: no cap), got {max_rate}", path=path, field="store.max_rate")
    cfg = StoreConfig(dsn=dsn, host_id=host_id, flush_interval=positive("flush_interval", 1.0), batch=batch,
                      lease_ttl=positive("lease_ttl", 30.0), max_rate=float(max_rate), schema=schema,
                      timeout=positive("timeout", 2.0))
    if cfg.lease_ttl < 3 * cfg.flush_interval:
        raise ConfigError(f"lease_ttl ({cfg.lease_ttl}s) must be at least 3 flush intervals "
                          f"({3 * cfg.flush_interval}s): leases are renewed by the flush loop",
                          path=path, field="store.lease_ttl")
    return cfg
