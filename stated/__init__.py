"""stated: game-server state in System V shared memory that outlives the game processes.

    import stated
    players = stated.attach("players", owner="zone-3")
    h = players.alloc(entity=42)
    with players.write(h) as p:
        p.name = "alice"; p.hp = 90
"""
from .errors import (
           ConfigError,
           CorruptSegment,
           DaemonError,
           DuplicateEntity,
           ForeignSegment,
           InstallError,
           LayoutMismatch,
           LockTimeout,
           NotOwner,
           OwnerBusy,
           OwnersExhausted,
           ReadOnlyTable,
           SchemaError,
           SegmentExists,
           SegmentNotFound,
           SlotOutOfRange,
           StaleHandle,
           StatedError,
           TableFull,
           TornRecord,
           UnsupportedVersion,
)
from .shm.allocator import Handle
from .shm.segment import PermissionDenied
from .shm.table import Table, attach

__version__ = "0.1.0"

__all__ = ["attach", "Table", "Handle", "StatedError", "ConfigError", "SchemaError", "SegmentNotFound",
           "SegmentExists", "ForeignSegment", "CorruptSegment", "UnsupportedVersion", "LayoutMismatch",
           "TableFull", "DuplicateEntity", "StaleHandle", "SlotOutOfRange", "NotOwner", "OwnerBusy", "OwnersExhausted",
           "ReadOnlyTable", "LockTimeout", "TornRecord", "DaemonError", "PermissionDenied", "InstallError",
           "__version__"]
