"""Logging set-up: plain text in a terminal, sd-daemon priorities under journald, JSON for shippers.

Under systemd, stderr is a stream to journald, which stores every line at the unit's
default priority (info) unless the line starts with an sd-daemon prefix `<N>`, and adds
its own timestamp. So when stderr *is* that stream (JOURNAL_STREAM names its device and
inode, sd_journal_stream_fd(3)), each line gets `<3>`/`<4>`/`<6>`/`<7>` and no timestamp,
and `journalctl -p warning -u stated` shows exactly the warnings and errors. Every line of a
multi-line record (a traceback) carries the prefix, since journald reads lines.

Otherwise the text format is unchanged: `2024-01-01 12:00:00,000 WARNING stated.daemon: ...`.
`log_format = "json"` writes one JSON object per line (ts, level, logger, msg, exc, and the
context fields table=, key=, slot=, pid=, owner= found in the message), still prefixed with
the priority under journald.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import IO

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# sd-daemon(3) priorities (syslog levels).
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_CONTEXT = re.compile(r"\b(table|key|slot|pid|owner|entity|shmid|path)=([^\s,;:()]+)")


def priority(levelno: int) -> int:
    """Syslog priority of a logging level: <=DEBUG 7, INFO 6, WARNING 4, ERROR 3, CRITICAL 2."""
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


def journal_stream(stream: IO, env: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is the journald stream systemd connected (JOURNAL_STREAM=dev:inode
    matches the stream's fstat). A mere JOURNAL_STREAM inherited by a process whose stderr
    was redirected elsewhere does not count: that file gets the plain format."""
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """`<N>logger: message`, every line prefixed; journald adds the timestamp."""

    def __init__(self, inner: logging.Formatter | None = None):
        super().__init__()
        self.inner = inner or logging.Formatter("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def __init__(self, clock=time.time):
        super().__init__()
        self.clock = clock

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        ts = record.created
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": msg, "pid": record.process}
        for k, v in _CONTEXT.findall(msg):
            out.setdefault(k, v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def formatter(fmt: str = "text", *, journal: bool = False) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "json":
        return JournalFormatter(JsonFormatter()) if journal else JsonFormatter()
    return JournalFormatter() if journal else logging.Formatter(TEXT_FORMAT)


def configure(level: int = logging.INFO, fmt: str = "text", *, stream: IO | None = None,
              env: Mapping[str, str] | None = None) -> logging.Handler:
    """(Re)configure the root logger: one handler on `stream` (stderr). Returns the handler."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(fmt, journal=journal_stream(stream, env)))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
