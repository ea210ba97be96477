"""The exception hierarchy: everything stated raises derives from StatedError.

Messages are written for a game developer reading a log: they name the table,
the key, the slot or the owner, and say what to do next.
"""


class StatedError(Exception):
    """Root of every error raised by stated."""


class ConfigError(StatedError):
    """A config file is malformed; the message names the file, table and field."""

    def __init__(self, message: str, *, path: str | None = None,
                 table: str | None = None, field: str | None = None):
        where = []
        if path:
            where.append(str(path))
        if table:
            where.append(f"table {table!r}")
        if field:
            where.append(f"field {field!r}")
        self.path, self.table, self.field = path, table, field
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class KernelLimitError(ConfigError):
    """A kernel setting or the machine's memory makes the configured tables impossible or unsafe.

    A config mistake like any other (exit code 78): fix the sysctl or the table, restarting will not help.
    """


class SchemaError(ConfigError):
    """A field declaration cannot be parsed or laid out."""


class SegmentNotFound(StatedError):
    """No shared-memory segment exists at the key (daemon not started, or destroyed)."""


class SegmentExists(StatedError):
    """A segment or semaphore already sits on a key we were asked to create."""


class ForeignSegment(SegmentExists):
    """The object on our key was not made by stated; it is refused, never overwritten."""


class CorruptSegment(StatedError):
    """The segment header fails validation (magic, checksum, offsets, sizes)."""


class SegmentInitialising(CorruptSegment):
    """The segment is still being built (state INITIALISING); `creator_pid` made it."""

    def __init__(self, message: str, creator_pid: int):
        super().__init__(message)
        self.creator_pid = creator_pid


class PermissionDenied(StatedError, PermissionError):
    """The caller's uid/gid may not attach the segment or semaphore with the rights asked."""


class UnsupportedVersion(CorruptSegment):
    """The segment was written by a format version this code does not know."""


class LayoutMismatch(StatedError):
    """The segment's layout hash differs from the schema the caller expects."""


class TableFull(StatedError):
    """Every slot of the table is allocated."""


class DuplicateEntity(StatedError):
    """An allocated slot already carries this entity id."""


class StaleHandle(StatedError):
    """The handle's slot was freed (and maybe reused) since the handle was made."""


class SlotOutOfRange(StatedError, IndexError):
    """A handle names a slot outside the table."""


class NotOwner(StatedError):
    """The caller writes or frees a slot it does not own."""


class OwnerBusy(StatedError):
    """A live process already holds this owner name."""


class OwnersExhausted(StatedError):
    """Every owner entry (255 per table) is taken by owners that still hold slots."""


class ReadOnlyTable(StatedError):
    """A write was attempted through a read-only attach."""


class LockTimeout(StatedError):
    """The table's allocator lock was not obtained within the timeout."""


class TornRecord(StatedError):
    """A consistent read gave up: the record's writer stayed mid-write too long."""


class DaemonError(StatedError):
    """The daemon refused or failed a request (control socket)."""


class AlreadyRunning(DaemonError):
    """Another daemon holds the lock on this state_dir."""


# ---- persistence -------------------------------------------------------------------------------------
class CorruptSnapshot(StatedError):
    """A snapshot file failed its checks (not a regular file, size, checksum, truncation, framing, or
    contents that cannot be true: counters out of range, duplicate slots or entities, ...); it is not used."""


class SnapshotFailed(StatedError):
    """Writing a snapshot failed (disk full, permissions, untrusted directory); the previous snapshots are
    untouched."""


class UnsafePath(StatedError):
    """A directory in state_dir is not ours to trust: a symlink, not a directory, owned by another user,
    or with a wider mode than configured."""


class MigrationRefused(StatedError):
    """A layout change would lose data (or workers are attached) and was not allowed."""


class RestoreError(StatedError):
    """No usable snapshot, or the table already exists."""


# every exception is part of the public API (`from stated import LockTimeout`); tests/test_layers.py checks
__all__ = ["StatedError", "ConfigError", "KernelLimitError", "SchemaError", "SegmentNotFound",
           "SegmentExists", "ForeignSegment", "CorruptSegment", "SegmentInitialising", "PermissionDenied",
           "UnsupportedVersion", "LayoutMismatch", "TableFull", "DuplicateEntity", "StaleHandle",
           "SlotOutOfRange", "NotOwner", "OwnerBusy", "OwnersExhausted", "ReadOnlyTable", "LockTimeout",
           "TornRecord", "DaemonError", "AlreadyRunning", "CorruptSnapshot", "SnapshotFailed", "UnsafePath",
           "MigrationRefused", "RestoreError", "StoreError", "StoreUnavailable",
           "OwnedElsewhere", "StoreRetry", "StoreSchemaMismatch"]


class StoreError(StatedError):
    """The durable store (PostgreSQL) refused or failed a request: bad DSN, wrong password, missing
    database, a row that does not match the layout, a table that is not stored."""


class StoreUnavailable(StoreError):
    """The database could not be reached within the bounded time (claim, flush and release fail
    with this during an outage; the game keeps running and dirty records stay queued in memory)."""


class OwnedElsewhere(StoreError):
    """Another host holds the entity's lease; the message names the holder and when its lease ends."""

    def __init__(self, message: str, *, holder: str = "", lease_until: float = 0.0):
        self.holder, self.lease_until = holder, lease_until
        super().__init__(message)


class StoreRetry(StoreError):
    """A database transaction lost to a concurrent one (deadlock, serialization failure): the same work
    may simply be retried (the write-behind does so on its next pass)."""


class StoreSchemaMismatch(StoreError):
    """The database's tables do not match the config (layout changed without --migrate, a lossy
    change without --allow-lossy, missing columns): an operator must act; not retried until restart."""
