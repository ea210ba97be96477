"""Snapshots: checksummed msgpack streams of a table's allocated slots, and restore.

File = 16-byte preamble (b"STATEDSN", u32 version, u32 0) then frames:
    u32 length, u32 crc32(body), body (msgpack)
frame 0: header  {"format", "kind" (full|delta), "table", "key", "schema", "layout_hash", "record_size",
                  "capacity", "seq", "base" (seq of the full a delta applies to; itself for a full),
                  "prev" (seq of the snapshot a delta follows), "time", "counters"}
frame 1: owners  [[index, name, state, since_ms], ...]
frames:  chunks  {"n", "slots", "gens", "owners", "entities", "states", "flags", "records"}
                 (packed little-endian columns: u32, u32, u16, u64, u8, u8, n*record_size bytes)
last:    end     {"end": true, "records": total, "chunks": k}

A file is valid only if every frame's crc matches and the end frame is there
with the right totals: a truncated or damaged file is refused whole, never
half-loaded. Files are written to a dot-named temporary, fsynced, renamed and
the directory fsynced, so a crash mid-write leaves only a temporary that no
reader ever lists.
"""
from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import msgpack

from . import layout as layout_mod
from .errors import StatedError
from .schema import from_wire

log = logging.getLogger("stated.snapshot")

MAGIC = b"STATEDSN"
VERSION = 1
PREAMBLE = struct.Struct("<8sII")
FRAME = struct.Struct("<II")
CHUNK = 4096
MAX_FRAME = 256 << 20
SEQ_WAIT = 0.05       # seconds to wait for a writer mid-section before flagging the slot
FLAG_TORN = 0x80      # in a snapshot's flags column: the writer stayed mid-write; bytes may be torn


class CorruptSnapshot(StatedError):
    """A snapshot file failed its checks (checksum, truncation, framing); it is not used."""


class SnapshotFailed(StatedError):
    """Writing a snapshot failed (disk full, permissions); the previous snapshots are untouched."""


@dataclass
class SnapshotInfo:
    path: Path
    kind: str
    seq: int
    base: int
    prev: int
    header: dict
    records: int


# ---- writing ------------------------------------------------------------------------------------
def _frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return FRAME.pack(len(body), zlib.crc32(body)) + body


def capture(alloc, records: memoryview, record_size: int, slots: list[int]) -> Iterator[dict]:
    """Consistent copies of `slots` in chunks (seqlock per slot; a dead writer's slot is flagged)."""
    s32, s16, s8, s64 = alloc._s32, alloc._s16, alloc._s8, alloc._s64
    for start in range(0, len(slots), CHUNK):
        part = slots[start:start + CHUNK]
        sl, gens, owners, ents = array("I"), array("I"), array("H"), array("Q")
        states, flags = bytearray(), bytearray()
        recs = []
        for slot in part:
            deadline = None
            off = slot * record_size
            while True:
                seq = s32[8 * slot]
                gen = s32[8 * slot + 1]
                data = records[off:off + record_size].tobytes()
                st, fl, ow, ent = s8[32 * slot + 18], s8[32 * slot + 19], s16[16 * slot + 8], s64[4 * slot + 1]
                if s32[8 * slot] == seq and s32[8 * slot + 1] == gen and (not seq & 1):
                    break
                now = time.monotonic()
                deadline = deadline or now + SEQ_WAIT
                if now > deadline and s32[8 * slot] == seq:   # stuck odd: its writer died mid-section
                    fl |= FLAG_TORN
                    log.warning("table=%s slot=%d: writer died mid-write; saved as is and flagged torn",
                                alloc.table, slot)
                    break
            sl.append(slot)
            gens.append(gen)
            owners.append(ow)
            ents.append(ent)
            states.append(st)
            flags.append(fl)
            recs.append(data)
        yield {"n": len(part), "slots": sl.tobytes(), "gens": gens.tobytes(), "owners": owners.tobytes(),
               "entities": ents.tobytes(), "states": bytes(states), "flags": bytes(flags),
               "records": b"".join(recs)}


def write_file(path: Path, header: dict, owners: list, chunks: Iterator[dict], mode: int = 0o660) -> int:
    """Write atomically (temp, fsync, rename, fsync dir). Returns records written. Raises SnapshotFailed."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    total = nchunks = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o660)
        try:
            os.fchmod(fd, mode & 0o660)     # whatever the umask
            with os.fdopen(fd, "wb", buffering=1 << 20) as f:
                f.write(PREAMBLE.pack(MAGIC, VERSION, 0))
                f.write(_frame(header))
                f.write(_frame(owners))
                for c in chunks:
                    f.write(_frame(c))
                    total += c["n"]
                    nchunks += 1
                f.write(_frame({"end": True, "records": total, "chunks": nchunks}))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _unlink(tmp)
            raise
        os.rename(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        _unlink(tmp)
        raise SnapshotFailed(f"cannot write snapshot {path}: {e.strerror or e}") from None
    return total


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


# ---- reading ---------------------------------------------------------------------------------------
def read_file(path: Path) -> tuple[dict, list, list[dict]]:
    """Read and verify a whole file. Raises CorruptSnapshot on any doubt; never returns part of a file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CorruptSnapshot(f"{path}: cannot read ({e.strerror})") from None
    if len(data) < PREAMBLE.size:
        raise CorruptSnapshot(f"{path}: truncated (no preamble)")
    magic, version, _ = PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        raise CorruptSnapshot(f"{path}: not a stated snapshot")
    if version != VERSION:
        raise CorruptSnapshot(f"{path}: snapshot format {version}, this stated reads {VERSION}")
    pos = PREAMBLE.size
    frames = []
    while pos < len(data):
        if pos + FRAME.size > len(data):
            raise CorruptSnapshot(f"{path}: truncated frame header at byte {pos}")
        n, crc = FRAME.unpack_from(data, pos)
        pos += FRAME.size
        if n > MAX_FRAME or pos + n > len(data):
            raise CorruptSnapshot(f"{path}: truncated at byte {pos} (frame of {n} bytes)")
        body = data[pos:pos + n]
        if zlib.crc32(body) != crc:
            raise CorruptSnapshot(f"{path}: checksum mismatch in frame {len(frames)} at byte {pos}")
        pos += n
        try:
            frames.append(msgpack.unpackb(body, raw=False, strict_map_key=False))
        except (msgpack.UnpackException, ValueError, TypeError) as e:
            raise CorruptSnapshot(f"{path}: frame {len(frames)} does not decode ({e})") from None
    if len(frames) < 3:
        raise CorruptSnapshot(f"{path}: truncated ({len(frames)} frames)")
    header, owners, *chunks, end = frames
    if not (isinstance(end, dict) and end.get("end") is True):
        raise CorruptSnapshot(f"{path}: truncated (no end frame)")
    _check_header(path, header)
    rs = header["record_size"]
    total = 0
    for c in chunks:
        _check_chunk(path, c, rs, header["capacity"])
        total += c["n"]
    if end.get("records") != total or end.get("chunks") != len(chunks):
        raise CorruptSnapshot(f"{path}: end frame says {end.get('records')} records, file has {total}")
    if not isinstance(owners, list) or not all(isinstance(o, list) and len(o) == 4 for o in owners):
        raise CorruptSnapshot(f"{path}: owners frame malformed")     # entries are [index, name, state, since_ms]
    return header, owners, chunks


def _check_header(path, h) -> None:
    need = {"format": int, "kind": str, "table": str, "key": int, "schema": list, "layout_hash": int,
            "record_size": int, "capacity": int, "seq": int, "base": int, "prev": int, "time": (int, float),
            "counters": dict}
    if not isinstance(h, dict):
        raise CorruptSnapshot(f"{path}: header frame malformed")
    for k, t in need.items():
        if not isinstance(h.get(k), t):
            raise CorruptSnapshot(f"{path}: header field {k!r} missing or malformed")
    if h["kind"] not in ("full", "delta") or not 1 <= h["capacity"] <= 1 << 26:
        raise CorruptSnapshot(f"{path}: header kind/capacity invalid")
    try:
        lay = layout_mod.compute(from_wire(h["schema"]))
    except StatedError as e:
        raise CorruptSnapshot(f"{path}: schema unreadable ({e})") from None
    if lay.hash != h["layout_hash"] or lay.record_size != h["record_size"]:
        raise CorruptSnapshot(f"{path}: layout hash does not match its own schema")


def _check_chunk(path, c, rs: int, cap: int) -> None:
    if not isinstance(c, dict) or not isinstance(c.get("n"), int):
        raise CorruptSnapshot(f"{path}: chunk malformed")
    n = c["n"]
    sizes = {"slots": 4 * n, "gens": 4 * n, "owners": 2 * n, "entities": 8 * n, "states": n, "flags": n,
             "records": rs * n}
    for k, size in sizes.items():
        v = c.get(k)
        if not isinstance(v, bytes) or len(v) != size:
            raise CorruptSnapshot(f"{path}: chunk column {k!r} has the wrong size")
    if n and max(memoryview(c["slots"]).cast("I")) >= cap:
        raise CorruptSnapshot(f"{path}: chunk names a slot beyond capacity {cap}")


def snapshot_layout(header: dict) -> layout_mod.Layout:
    return layout_mod.compute(from_wire(header["schema"]))


# ---- the set of files of one table -------------------------------------------------------------------
def table_dir(state_dir: Path, table: str) -> Path:
    return Path(state_dir) / table


def file_name(table: str, seq: int, kind: str) -> str:
    return f"{table}.{seq:010d}.{kind}.snap"


def list_files(d: Path) -> list[tuple[int, str, Path]]:
    """(seq, kind, path) of every snapshot-named file, oldest first. Temporaries never match."""
    out = []
    if not d.is_dir():
        return out
    for p in d.iterdir():
        parts = p.name.split(".")
        if p.name.startswith(".") or len(parts) != 4 or parts[3] != "snap" or parts[2] not in ("full", "delta") \
                or not parts[1].isdigit():
            continue
        out.append((int(parts[1]), parts[2], p))
    return sorted(out)


def remove_stale_temporaries(d: Path) -> None:
    """Delete temporaries left by a writer that died mid-snapshot (their pid is gone)."""
    if not d.is_dir():
        return
    for p in d.glob(".*.tmp"):
        pid = p.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _unlink(p)
            log.info("removed temporary %s left by dead pid %s", p.name, pid)


def chain(d: Path) -> tuple[list[tuple[Path, dict, list, list[dict]]], list[str]]:
    """The newest restorable chain, parsed: newest valid full + its valid deltas in order; and warnings.

    A damaged full is skipped (falling back to the previous full); the first damaged or
    out-of-order delta ends the chain (later deltas would miss its changes).
    """
    files = list_files(d)
    warnings: list[str] = []
    fulls = [(seq, p) for seq, kind, p in files if kind == "full"]
    for seq, p in reversed(fulls):
        try:
            out = [(p, *read_file(p))]
        except CorruptSnapshot as e:
            warnings.append(f"skipped {e}")
            continue
        prev = seq
        for dseq, kind, dp in files:
            if kind != "delta" or dseq <= seq:
                continue
            try:
                parsed = read_file(dp)
            except CorruptSnapshot as e:
                warnings.append(f"stopped at {e}")
                break
            h = parsed[0]
            if h["base"] != seq:
                break
            if h["prev"] != prev:
                warnings.append(f"stopped at {dp}: it follows {h['prev']}, expected {prev}")
                break
            out.append((dp, *parsed))
            prev = dseq
        return out, warnings
    return [], warnings
