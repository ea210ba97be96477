"""`stated.attach` and `Table`: what a game worker touches.

Three ways to a record, fastest first:

- `p = t.record(h)`: a live ctypes view over the record. Attribute reads and
  writes go straight to shared memory (one aligned field of <= 8 bytes is
  atomic). Creating a view pins the slot as "written outside write sections",
  so persistence copies it on every save until the slot is freed: writes
  through views are never lost, they just cost a copy per snapshot.
- `t.get(h, "hp")` / `t.set(h, "hp", 90)`: one field, checked; `set` marks
  the slot dirty. Strings and arrays go through the seqlock.
- `with t.write(h) as p: ...` and `t.read(h)`: a seqlock write section (marks
  the slot dirty) and a consistent whole-record read. A reader gives up with
  TornRecord after `read_timeout` if the writer died mid-section.

Allocation, lookup, the write section's seqlock steps and the consistent read are the native
core's (`stated.shm._native`, the same C code C workers compile; see allocator.py): this class
binds its methods once and adds only what is Python's own — ctypes views and their lifetimes,
field checks, and the error messages of the column paths.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, NamedTuple

from ..errors import NotOwner, ReadOnlyTable, SlotOutOfRange, StaleHandle, StatedError, StoreError
from ..format import config as config_mod
from ..format import segment as fmt
from ..format.schema import check_value
from . import segment as segment_mod
from ._native import Section
from .allocator import Allocator, Handle
from .owners import Owner
from .records import RecordBase, dead_class, default_record, readonly_class, record_class
from .segment import Segment

log = logging.getLogger("stated.table")

_F32_MAX = 3.4028234663852886e38

__all__ = ["attach", "Table", "Handle"]


def attach(name: str | None = None, *, key: int | None = None, owner: str | None = None,
           config: str | None = None, readonly: bool = False, lock_timeout: float | None = None,
           read_timeout: float = 0.1, proc_root: str = "/proc") -> Table:
    """Attach to a table by name (through the config) or by key (schema from the header).

    `owner` names this worker ("zone-3"); it is required to allocate or write, and a
    restarted worker using the same name gets its slots back through `owned()`.
    `readonly=True` attaches with SHM_RDONLY for observers (no owner, no writes).
    """
    if (name is None) == (key is None):
        raise TypeError("attach() takes a table name or key=, not both")
    expect = capacity = None
    trust = segment_mod.Trust.worker()
    store = None
    if name is not None:
        cfg = config_mod.load(config if config is not None else config_mod.default_path())
        tc = cfg.table(name)
        key, expect, capacity = tc.key, tc.layout, tc.capacity
        trust = segment_mod.Trust.worker(cfg.daemon.mode, cfg.daemon.state_dir)
        if lock_timeout is None:
            lock_timeout = cfg.daemon.lock_timeout
        if tc.store and cfg.store is not None:
            store = StoreLink(cfg.daemon.control_socket, cfg.store.timeout * 2 + 1.0)
    assert key is not None
    seg = segment_mod.open(key, readonly=readonly, expect=expect, expect_capacity=capacity, table=name, trust=trust)
    try:
        return Table(seg, name=name or f"{key:#010x}", owner=None if readonly else owner,
                     lock_timeout=lock_timeout or 2.0, read_timeout=read_timeout, proc_root=proc_root,
                     trust=trust, store=store)
    except BaseException:
        seg.detach()
        raise


class SlotInfo(NamedTuple):
    """A slot's bookkeeping: its owner's name (None: no owner), dirty (changed since the last save),
    pinned (written through a live view, so every save copies it)."""

    owner: str | None
    dirty: bool
    pinned: bool


class StoreLink:
    """How a worker reaches the durable store of a stored table: the local daemon's control socket
    (the daemon talks to the database; the worker never loads a driver). `timeout` bounds each call."""

    __slots__ = ("socket", "timeout")

    def __init__(self, socket: Any, timeout: float):
        self.socket, self.timeout = socket, timeout

    def call(self, op: str, **args: Any) -> dict:
        from .client import call  # plain socket + msgpack: no asyncio, no driver
        return call(self.socket, op, self.timeout, **args)


class Table:
    """One attached table. Not thread-safe: use one Table per thread."""

    def __init__(self, seg: Segment, *, name: str, owner: str | None = None, lock_timeout: float = 2.0,
                 read_timeout: float = 0.1, proc_root: str = "/proc", trust: segment_mod.Trust | None = None,
                 store: StoreLink | None = None):
        h = seg.header
        self.name, self.key, self.readonly = name, seg.key, seg.readonly
        self.capacity, self.layout = h.capacity, h.layout
        self.store = store              # set when the table is stored ([store] in the config)
        self._seg = seg
        self._closed = False
        cls = record_class(h.layout, name)
        self._cls = cls
        self._view_cls = readonly_class(cls) if seg.readonly else cls
        self._alloc = Allocator(seg, table=name, lock_timeout=lock_timeout, read_timeout=read_timeout,
                                proc_root=proc_root, trust=trust, init=default_record(cls))
        core = self._core = self._alloc.core
        core.view_factory = self._view       # write(h)'s section is made over the slot's live view
        # the core's methods, bound once: the hot paths call them without an attribute lookup
        self._c_alloc, self._c_free, self._c_read = core.alloc, core.free, core.read
        self._c_valid, self._c_handles, self._c_mark_dirty = core.valid, core.handles, core.mark_dirty
        # the two hot paths that are one core call, bound on the instance so that they cost what the
        # core's call costs (the methods of the same names below document them and do the same)
        self.lookup = core.lookup           # type: ignore[method-assign,assignment]
        self.write = core.write             # type: ignore[method-assign,assignment]
        sv = self._alloc.views      # the format's named columns: sv.seq[slot], sv.generation[slot], ...
        self._gen, self._own, self._state = sv.generation, sv.owner, sv.state
        self._dirty, self._pinned = sv.dirty, sv.pinned
        rs = self.record_size = h.record_size
        self._rec = sv.records
        self._rec_off_abs = h.regions.records_offset
        self._views: dict[int, RecordBase] = {}
        # every view handed out and still referenced somewhere (views are unhashable: keyed by id)
        self._all_views: dict[int, weakref.ref[RecordBase]] = {}
        self._stale_cls = dead_class(self._view_cls, StaleHandle, f"table {name!r}: this record view's slot "
                                     f"was freed; look the entity up again and take a new view")
        self._closed_cls = dead_class(self._view_cls, StatedError, f"table {name!r} was closed; this record "
                                      f"view can no longer be used")
        self._casts: dict[str, memoryview] = {}
        self._acc: dict[str, tuple] = {}
        self._cols: list[memoryview] = []
        for fl in h.layout.fields:
            f = fl.field
            if f.array or f.is_string:
                self._acc[fl.name] = (None, f)
            else:
                v = self._casts.get(f.code)
                if v is None:
                    v = self._casts[f.code] = self._rec.cast(f.code)  # type: ignore[call-overload]
                # a strided view: element [slot] is this field of record `slot`
                col = v[fl.offset // f.size::rs // f.size]
                self._cols.append(col)
                self._acc[fl.name] = (col, f if f.type == "f32" else None)
        self._getcol = {name: acc[0] for name, acc in self._acc.items()}   # get()'s one dict lookup
        self.owner = owner
        self._owner = 0
        if owner is not None:
            try:
                self._owner = self._alloc.claim_owner(owner)
            except BaseException:
                self._alloc.release_views()     # the caller detaches the segment
                raise

    @property
    def read_timeout(self) -> float:
        """Seconds read() waits for a writer inside its write section before TornRecord."""
        return self._core.read_timeout

    @read_timeout.setter
    def read_timeout(self, seconds: float) -> None:
        self._core.read_timeout = seconds

    # ---- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Detach: the owner is marked detached (its slots stay), buffers are released.

        Every record view handed out raises StatedError from now on. If any of them (or an array
        taken from one) is still referenced, the mapping is swapped for private zero pages rather
        than unmapped: a live ctypes object over unmapped memory would SIGSEGV on its next use.
        """
        if self._closed:
            return
        if self._owner and not self.readonly:
            try:
                self._alloc.set_owner_state(self._owner, fmt.OWNER_DETACHED)
            except StatedError as e:
                log.warning("table=%s owner=%s: could not mark detached: %s", self.name, self.owner, e)
        views_alive = False
        for ref in list(self._all_views.values()):
            v = ref()
            if v is not None:
                object.__setattr__(v, "__class__", self._closed_cls)
                views_alive = True
        self._all_views.clear()
        self._views.clear()
        for col in self._cols:
            col.release()
        self._cols.clear()
        self._getcol.clear()
        for cast in self._casts.values():
            cast.release()
        self._casts.clear()
        self._acc.clear()
        self._alloc.release_views()
        if views_alive or not self._seg.detach():
            self._seg.detach_under_views()
        self._closed = True
        object.__setattr__(self, "__class__", _ClosedTable)

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Table {self.name} key={self.key:#010x} capacity={self.capacity} "
                f"owner={self.owner!r}{' readonly' if self.readonly else ''}>")

    # ---- allocation ---------------------------------------------------------------------------
    def alloc(self, entity: int | None = None) -> Handle:
        """Allocate a slot for this owner, its record set to the field defaults.

        Raises TableFull, DuplicateEntity (entity already has a slot), LockTimeout; NotOwner
        without an owner, ReadOnlyTable on a read-only attach.
        """
        if entity is None and self.store is not None:
            raise StoreError(f"table {self.name!r} is stored in the database: alloc() needs an entity (the row's "
                             f"primary key); use claim(entity) to load an existing one")
        return self._c_alloc(entity)

    # ---- durable store (stored tables): through the local daemon ------------------------------------
    def claim(self, entity: int) -> Handle:
        """Take this host's lease on `entity` and load its row (defaults when there is none) into a new
        slot owned by this worker. Raises OwnedElsewhere (another host holds it: the message names it
        and when its lease ends), StoreUnavailable (no answer within the bound), StoreError (not a
        stored table, a row that does not fit the layout), DuplicateEntity (already here)."""
        link = self._store_link("claim")
        r = link.call("store_claim", table=self.name, entity=entity, owner=self.owner)
        return Handle(r["slot"], r["generation"])

    def flush(self, h: Handle) -> None:
        """Return once the record, as it is now, is committed in the database (trades, purchases)."""
        link = self._store_link("flush")
        self._check(h)
        link.call("store_flush", table=self.name, slot=h[0], generation=h[1])

    def release(self, h: Handle) -> None:
        """Flush, free the slot and drop the lease (a logout or a handoff to another host). The row
        stays in the database; the handle is stale afterwards, like after free()."""
        link = self._store_link("release")
        self._check(h)
        if self._own[h[0]] != self._owner:
            raise self._refused(h)
        link.call("store_release", table=self.name, slot=h[0], generation=h[1], owner=self.owner)
        self._forget(h[0])

    def _store_link(self, what: str) -> StoreLink:
        if self.store is None:
            raise StoreError(f"table {self.name!r} is not stored: {what}() needs a [store] section in the config "
                             f"(and the table attached by name)")
        if not self._owner:
            raise self._cannot_write(what)
        return self.store

    def free(self, h: Handle) -> None:
        """Give the slot back. The handle (and any copy of it) becomes stale."""
        self._c_free(h)                     # (the core disarms the slot's write section)
        self._retire_view(h[0])

    def _forget(self, slot: int) -> None:
        """The slot was freed by another process (the daemon, for release()): views of it raise from
        now on, its write section is disarmed."""
        self._core.forget(slot)
        self._retire_view(slot)

    def _retire_view(self, slot: int) -> None:
        """The cached view of a freed slot raises StaleHandle from now on (its class is switched:
        the live path pays nothing), and the next allocation of the slot gets a fresh view."""
        v = self._views.pop(slot, None)
        if v is not None:
            object.__setattr__(v, "__class__", self._stale_cls)

    def lookup(self, entity: int) -> Handle | None:
        """Handle of the record holding `entity`, or None (lock-free)."""
        return self._core.lookup(entity)

    def owned(self) -> list[Handle]:
        """Handles of every slot this owner holds: how a restarted worker finds its players."""
        if not self._owner:
            return []
        return self._c_handles(self._owner)

    def handles(self) -> list[Handle]:
        """Every allocated slot's handle, whoever owns it (an O(capacity) scan)."""
        return self._c_handles(0)

    def entity(self, h: Handle) -> int | None:
        """The entity id the slot is indexed under (None: allocated without one)."""
        return self._core.entity(h)

    @property
    def views(self) -> fmt.SegmentViews:
        """The segment's named columns (docs/format.md), for tools, benchmarks and tests that inspect
        the slot table. Writing through them bypasses every check and the allocator's protocol."""
        return self._alloc.views

    def slot_info(self, h: Handle) -> SlotInfo:
        """Who owns the record and whether the next snapshot copies it (for tools, not the hot path)."""
        self._check(h)
        idx = self._own[h[0]]
        owner = next((o.name for o in self.owners() if o.index == idx), None)
        return SlotInfo(owner, bool(self._dirty[h[0]] or self._alloc.views.snap_pending[h[0]]),
                        bool(self._pinned[h[0]]))

    def valid(self, h: Handle) -> bool:
        """True while `h` still names a live allocation."""
        return self._c_valid(h)

    def __len__(self) -> int:
        return self._core.used()

    # ---- record access (hot path) ------------------------------------------------------------
    def get(self, h: Handle, name: str) -> Any:
        """One field. Scalars are read atomically; strings and arrays through a consistent read."""
        slot, gen = h
        try:
            col = self._getcol[name]
            ok = self._gen[slot] == gen and slot >= 0
        except IndexError:
            raise self._out_of_range(slot) from None
        except KeyError:
            raise self._no_field(name) from None
        if not ok:
            raise self._stale(h)
        if col is not None:
            return col[slot]
        return getattr(self.read(h), name)

    def set(self, h: Handle, name: str, value: Any) -> None:
        """Write one field and mark the slot dirty; ValueError (nothing written) if it does not fit."""
        slot, gen = h
        try:
            col, f32 = self._acc[name]
            ok = self._gen[slot] == gen and slot >= 0 and self._own[slot] == self._owner
        except IndexError:
            raise self._out_of_range(slot) from None
        except KeyError:
            raise self._no_field(name) from None
        if not ok or not self._owner:
            raise self._refused(h)
        if col is not None:
            if f32 is not None:
                try:
                    inside = -_F32_MAX <= value <= _F32_MAX
                except TypeError:
                    inside = False
                if not inside:
                    check_value(f32, value)      # raises for overflow and non-numbers; lets inf/nan through
            try:
                col[slot] = value
            except (ValueError, TypeError) as e:
                raise ValueError(f"table {self.name!r} field {name!r}: {value!r} does not fit ({e})") from None
            self._c_mark_dirty(h)       # a release store: the field's store is ordered before it on any CPU
        else:
            with self._core.write(h) as p:
                setattr(p, name, value)

    def record(self, h: Handle) -> RecordBase:
        """Live view of the record; pins the slot dirty until it is freed (see module doc)."""
        slot, gen = h
        if not 0 <= slot < self.capacity:
            raise self._out_of_range(slot)
        if self._gen[slot] != gen:
            raise self._stale(h)
        if not self.readonly:
            if self._own[slot] != self._owner or not self._owner:
                raise self._refused(h)
            self._pinned[slot] = 1
        return self._view(slot)

    def write(self, h: Handle) -> Section:
        """`with t.write(h) as p:` a seqlock write section over the live view (marks the slot dirty).

        Refused (nothing written) for a stale handle (StaleHandle), another owner's slot (NotOwner),
        a read-only attach (ReadOnlyTable), a slot already inside a section (StatedError: sections
        do not nest). The section object is made once per slot and reused; free() disarms it.
        """
        return self._core.write(h)

    def read(self, h: Handle) -> RecordBase:
        """A consistent copy of the whole record (never torn). Raises StaleHandle, TornRecord (after
        `read_timeout`, when its writer died inside a write section), SlotOutOfRange."""
        return self._c_read(h, self._cls)

    def _view(self, slot: int) -> RecordBase:
        v = self._views.get(slot)
        if v is None:
            off = slot * self.record_size
            if self.readonly:
                v = self._view_cls.from_address(self._seg.shm.address + self._rec_off_abs + off)
            else:
                v = self._cls.from_buffer(self._rec, off)
            self._views[slot] = v
            views, key = self._all_views, id(v)
            views[key] = weakref.ref(v, lambda _ref: views.pop(key, None))
        return v

    # ---- introspection --------------------------------------------------------------------------
    def owners(self) -> list[Owner]:
        return self._alloc.owners()

    def counters(self) -> dict[str, int]:
        return self._alloc.counters()

    def verify(self) -> list[str]:
        """Check allocator invariants under the lock (an observer's answer is racy); [] when consistent."""
        return self._alloc.verify()

    def _check(self, h: Handle) -> None:
        slot, gen = h
        if not 0 <= slot < self.capacity:
            raise self._out_of_range(slot)
        if self._gen[slot] != gen:
            raise self._stale(h)

    # ---- errors (off the hot path) -------------------------------------------------------------------
    def _out_of_range(self, slot: int) -> SlotOutOfRange:
        return SlotOutOfRange(f"table {self.name!r}: slot {slot} is outside [0, {self.capacity})")

    def _no_field(self, name: str) -> KeyError:
        return KeyError(f"table {self.name!r} has no field {name!r}; fields: {', '.join(self.layout.names())}")

    def _stale(self, h: Handle) -> StaleHandle:
        slot, gen = h
        now = self._gen[slot]
        return StaleHandle(f"table {self.name!r}: handle (slot {slot}, generation {gen}) is stale; the slot was "
                           f"freed{' and reused' if self._state[slot] else ''} (generation now {now}). "
                           f"Look the entity up again")

    def _cannot_write(self, what: str) -> StatedError:
        if self.readonly:
            return ReadOnlyTable(f"table {self.name!r} is attached readonly; cannot {what}")
        return NotOwner(f"table {self.name!r}: attach with owner=\"...\" to {what}")

    def _refused(self, h: Handle) -> StatedError:
        slot, gen = h
        if self.readonly or not self._owner:
            return self._cannot_write("write")
        if self._gen[slot] != gen:
            return self._stale(h)
        return NotOwner(f"table {self.name!r}: slot {slot} belongs to owner #{self._own[slot]}, "
                        f"not to {self.owner!r} (#{self._owner}); only a slot's owner writes it")




class _ClosedTable(Table):
    """What a Table becomes after close(): every use raises StatedError instead of touching
    released buffers (which would raise ValueError, or worse, read unmapped memory)."""

    _ALLOWED = frozenset({"close", "name", "key", "readonly", "owner", "capacity", "layout", "record_size",
                          "_seg", "_closed", "__class__", "__repr__", "__enter__", "__exit__", "__dict__"})

    def __getattribute__(self, k: str) -> Any:
        if k in _ClosedTable._ALLOWED:
            return object.__getattribute__(self, k)
        raise StatedError(f"table {object.__getattribute__(self, 'name')!r} is closed; attach again")

    def __len__(self) -> int:
        raise StatedError(f"table {self.name!r} is closed; attach again")
