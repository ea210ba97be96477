"""stated: game-server state in System V shared memory that outlives the game processes.

    import stated
    players = stated.attach("players", owner="zone-3")
    h = players.alloc(entity=42)
    with players.write(h) as p:
        p.name = "alice"; p.hp = 90
"""
from . import errors
from .errors import *  # noqa: F403 - every exception is part of the API
from .shm.allocator import Handle
from .shm.table import SlotInfo, Table, attach

__version__ = "0.1.0"

__all__ = ["attach", "Table", "Handle", "SlotInfo", "__version__", *errors.__all__]
