/* stated.shm._native: the CPython face of the native core (stated_core.h). See the module docstring
 * below (MODULE_DOC) for the API the Python package calls. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>       /* first: it defines _GNU_SOURCE, which the core needs */

#define STATED_IMPLEMENTATION
#include "stated_core.h"

#include <limits.h>

PyDoc_STRVAR(MODULE_DOC,
"The native data plane of stated: one C11 implementation (stated/native/stated_core.h) of the\n"
"table lock, intent marks and repair, alloc/free/reap, the entity index, owner claims, the record\n"
"seqlock and the dirty/pinned scans, shared with C workers (`stated header`). docs/format.md is\n"
"the specification; this module only adapts it to Python.\n"
"\n"
"Core(buffer, key, *, table=None, readonly=False, semid=-1, lock_timeout=2.0, read_timeout=0.1,\n"
"     init=None, handle=None, pid=0, proc_root='/proc', trust_uids=None, trust_mode=0,\n"
"     layout_hash=0, require_ready=False)\n"
"    One attached table. `buffer` is the whole segment (memoryview of the SysV shm: writable,\n"
"    or read-only with readonly=True); the header is validated again here (structure, crc, size;\n"
"    the state word only with require_ready; the layout hash when non-zero). The Core holds a\n"
"    buffer export until close(). `semid` is the table's semaphore (-1: semget(key) with the\n"
"    provenance check of `trust_uids`/`trust_mode`; ignored for readonly). `init` is the record\n"
"    initialiser (bytes of record_size: field defaults), `handle` a tuple subclass to build\n"
"    handles with (stated's Handle; default plain tuples). `pid` and `proc_root` may be injected\n"
"    (tests). Not thread-safe: one Core per thread; and not across fork() (the pid is taken\n"
"    once: in a child, the lock is refused with StatedError; the child makes its own Core).\n"
"\n"
"  owner (int, read/write): this worker's owner index (claim_owner sets it; 0 = none).\n"
"  lock_timeout, read_timeout (float seconds, read/write: a config reload changes them).\n"
"  capacity, record_size, key, semid, pid, readonly, closed (read-only attributes).\n"
"  claim_owner(name) -> int           attach as owner `name` (OwnerBusy, OwnersExhausted)\n"
"  set_owner_state(index, state, only_pid=None) -> bool   only_pid: only while attached by that pid\n"
"  reap_owner(index) -> int           free every slot of a non-attached owner\n"
"  alloc(entity=None, init=None) -> handle   TableFull, DuplicateEntity, NotOwner, LockTimeout;\n"
"                                     init: this record's bytes instead of the table's initialiser\n"
"  free(handle, force=False)          StaleHandle, NotOwner, SlotOutOfRange\n"
"  lookup(entity) -> handle | None    lock-free (falls back to the lock under churn)\n"
"  valid(handle) -> bool;  entity(handle) -> int | None\n"
"  read(handle, into) -> into         consistent copy (never torn) into a writable buffer of at\n"
"                                     least record_size bytes (bytearray, ctypes object); `into`\n"
"                                     may be a ctypes type: a new instance is made. StaleHandle,\n"
"                                     TornRecord (after read_timeout)\n"
"  read_bytes(handle) -> bytes\n"
"  write_begin(handle) / write_end(handle)   a write section (seq odd/even, dirty at the end);\n"
"                                     write_begin checks owner and generation and refuses nesting\n"
"  write(handle) -> Section           Table.write in one call: checks owner, generation and nesting\n"
"                                     (StatedError), returns the slot's section over\n"
"                                     view_factory(slot), made once and cached until free()/close()\n"
"  view_factory (read/write)          callable slot -> record view, for write()\n"
"  forget(slot)                       the slot was freed by another process (the daemon): the\n"
"                                     section write() cached for it is disarmed and dropped\n"
"  section(slot, view) -> Section     a reusable `with` object: __enter__ makes seq odd and\n"
"                                     returns `view`, __exit__ makes it even and marks dirty;\n"
"                                     disarm() (after the slot was freed) makes both no-ops\n"
"  mark_dirty(handle)                 after plain stores outside a section\n"
"  changed_slots(clear=True) -> list  slots dirty or pinned (a delta snapshot's set), their dirty\n"
"                                     marks cleared (atomic exchange) before they are listed\n"
"  allocated_slots(clear_dirty=False) -> list   (a full snapshot: every dirty mark cleared first)\n"
"  owned_slots(owner) -> list;  handles(owner=0) -> list of handles (0: every allocated slot)\n"
"  copy_slot(slot, wait=0.05) -> (generation, state, flags, owner, entity, bytes, torn)\n"
"  acquire(); release(); repair(); reopen_semaphore(); intent_pending() -> bool\n"
"  repair_locked()                    repair() inside acquire() ... release()\n"
"  verify(lock=True) -> list[str]     every invariant ([] = consistent)\n"
"  audit() -> list[str]               the daemon's check: problems found (and rebuilt)\n"
"  counters() -> tuple                the u64 counters in format.COUNTERS order\n"
"  used() -> int;  close()\n"
"\n"
"Errors are stated's exceptions (stated.errors, looked up by name): LockTimeout, TableFull,\n"
"DuplicateEntity, StaleHandle, SlotOutOfRange, NotOwner, OwnerBusy, OwnersExhausted,\n"
"ReadOnlyTable, TornRecord, CorruptSegment/UnsupportedVersion/LayoutMismatch (header),\n"
"SegmentNotFound, ForeignSegment, StatedError (anything else); ValueError for bad arguments.\n"
"Blocking waits (semtimedop, polls) release the GIL; a signal during a wait runs the Python\n"
"handler, and an exception it raises aborts the wait (the lock is not kept).");

/* ---- errors -------------------------------------------------------------------------------- */
static PyObject *E_Stated, *E_Corrupt, *E_Version, *E_Layout, *E_Full, *E_Duplicate, *E_Stale, *E_Range,
    *E_NotOwner, *E_OwnerBusy, *E_OwnersExhausted, *E_ReadOnly, *E_LockTimeout, *E_Torn, *E_NotFound,
    *E_Foreign;
static PyObject *logger;
static PyObject *empty_tuple;

static int load_errors(void)
{
    PyObject *m = PyImport_ImportModule("stated.errors");
    if (!m)
        return -1;
    struct {
        PyObject **slot;
        const char *name;
    } names[] = {
        {&E_Stated, "StatedError"}, {&E_Corrupt, "CorruptSegment"}, {&E_Version, "UnsupportedVersion"},
        {&E_Layout, "LayoutMismatch"}, {&E_Full, "TableFull"}, {&E_Duplicate, "DuplicateEntity"},
        {&E_Stale, "StaleHandle"}, {&E_Range, "SlotOutOfRange"}, {&E_NotOwner, "NotOwner"},
        {&E_OwnerBusy, "OwnerBusy"}, {&E_OwnersExhausted, "OwnersExhausted"}, {&E_ReadOnly, "ReadOnlyTable"},
        {&E_LockTimeout, "LockTimeout"}, {&E_Torn, "TornRecord"}, {&E_NotFound, "SegmentNotFound"},
        {&E_Foreign, "ForeignSegment"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *names[i].slot = PyObject_GetAttrString(m, names[i].name);
        if (!*names[i].slot) {
            Py_DECREF(m);
            return -1;
        }
    }
    Py_DECREF(m);
    return 0;
}

static PyObject *error_class(int rc)
{
    switch (rc) {
    case STATED_ERR_MAGIC: case STATED_ERR_RECORD_SIZE: case STATED_ERR_SIZE: case STATED_ERR_CRC:
    case STATED_ERR_REGIONS: case STATED_ERR_STATE: case STATED_ERR_CORRUPT:
        return E_Corrupt;
    case STATED_ERR_VERSION: return E_Version;
    case STATED_ERR_LAYOUT: return E_Layout;
    case STATED_ERR_FREE: case STATED_ERR_STALE: return E_Stale;
    case STATED_ERR_TORN: return E_Torn;
    case STATED_ERR_RANGE: return E_Range;
    case STATED_ERR_FULL: return E_Full;
    case STATED_ERR_DUPLICATE: return E_Duplicate;
    case STATED_ERR_NOT_OWNER: return E_NotOwner;
    case STATED_ERR_OWNER_BUSY: return E_OwnerBusy;
    case STATED_ERR_OWNERS_EXHAUSTED: return E_OwnersExhausted;
    case STATED_ERR_LOCK_TIMEOUT: return E_LockTimeout;
    case STATED_ERR_READONLY: return E_ReadOnly;
    case STATED_ERR_NO_SEGMENT: return E_NotFound;
    case STATED_ERR_FOREIGN: return E_Foreign;
    case STATED_ERR_INVAL: return PyExc_ValueError;
    default: return E_Stated;
    }
}

/* ---- the Core object ------------------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    stated_table t;
    Py_buffer view;
    int have_view;
    int busy;                       /* a call that may drop the GIL is running: close() must wait */
    PyTypeObject *handle_type;      /* tuple subclass, or NULL: plain tuples */
    PyObject *init;                 /* bytes kept alive for t.init */
    PyObject *sections;             /* slot -> Section cached by write(), or NULL */
    PyObject *view_factory;         /* write()'s view for a slot: view_factory(slot), or NULL */
} CoreObject;

/* The thread state saved while a blocking wait runs without the GIL: per thread, not per Core, so
 * that two threads each blocked in a call of the same Core (the core is not thread-safe, but a
 * daemon thread copying snapshots while the loop takes the lock must not corrupt the interpreter)
 * each restore their own. Waits never nest within one thread. */
static _Thread_local PyThreadState *blocked_ts;

static PyObject *raise_rc(CoreObject *self, int rc)
{
    if (rc == STATED_ERR_INTERRUPTED && PyErr_Occurred())
        return NULL;                /* the signal handler's exception */
    PyErr_SetString(error_class(rc), self->t.errmsg[0] ? self->t.errmsg : stated_strerror(rc));
    return NULL;
}

static void hook_block_begin(void *ctx)
{
    (void)ctx;
    blocked_ts = PyEval_SaveThread();
}

static void hook_block_end(void *ctx)
{
    (void)ctx;
    PyEval_RestoreThread(blocked_ts);
    blocked_ts = NULL;
}

static int hook_interrupted(void *ctx)
{
    (void)ctx;
    return PyErr_CheckSignals() != 0;
}

static void hook_log(void *ctx, int level, const char *message)
{
    (void)ctx;
    if (!logger)
        return;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    const char *meth = level >= STATED_LOG_ERROR ? "error" : level >= STATED_LOG_WARNING ? "warning" : "info";
    PyObject *r = PyObject_CallMethod(logger, meth, "s", message);
    if (!r)
        PyErr_Clear();              /* logging must never turn into an error of the operation */
    Py_XDECREF(r);
    PyErr_Restore(et, ev, tb);
}

#define CHECK_OPEN(self)                                                                               \
    do {                                                                                               \
        if (!(self)->have_view) {                                                                      \
            PyErr_Format(E_Stated, "table '%s' is closed; attach again", (self)->t.name);             \
            return NULL;                                                                               \
        }                                                                                              \
    } while (0)

static PyObject *make_handle(CoreObject *self, uint32_t slot, uint32_t gen)
{
    PyObject *s = PyLong_FromUnsignedLong(slot);
    PyObject *g = PyLong_FromUnsignedLong(gen);
    if (!s || !g) {
        Py_XDECREF(s);
        Py_XDECREF(g);
        return NULL;
    }
    PyObject *h = self->handle_type ? self->handle_type->tp_alloc(self->handle_type, 2) : PyTuple_New(2);
    if (!h) {
        Py_DECREF(s);
        Py_DECREF(g);
        return NULL;
    }
    PyTuple_SET_ITEM(h, 0, s);
    PyTuple_SET_ITEM(h, 1, g);
    return h;
}

/* a (slot, generation) pair: SlotOutOfRange outside the table, StaleHandle for a generation
 * that cannot be one (it can never match) */
static int parse_handle(CoreObject *self, PyObject *h, stated_handle *out)
{
    if (!PyTuple_Check(h) || PyTuple_GET_SIZE(h) != 2) {
        PyErr_SetString(PyExc_TypeError, "a handle is a (slot, generation) pair");
        return -1;
    }
    int overflow = 0;
    long long slot = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(h, 0), &overflow);
    if (slot == -1 && PyErr_Occurred())
        return -1;
    if (overflow || slot < 0 || slot >= (long long)self->t.capacity) {
        PyObject *r = PyObject_Repr(PyTuple_GET_ITEM(h, 0));
        PyErr_Format(E_Range, "table '%s': slot %S is outside [0, %u)", self->t.name, r ? r : Py_None,
                     self->t.capacity);
        Py_XDECREF(r);
        return -1;
    }
    long long gen = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(h, 1), &overflow);
    if (gen == -1 && PyErr_Occurred())
        return -1;
    if (overflow || gen < 0 || gen > (long long)UINT32_MAX) {
        PyErr_Format(E_Stale, "table '%s': handle (slot %lld, generation %S) is stale: no slot has that generation",
                     self->t.name, slot, PyTuple_GET_ITEM(h, 1));
        return -1;
    }
    out->slot = (uint32_t)slot;
    out->generation = (uint32_t)gen;
    return 0;
}

static int parse_u64(PyObject *o, uint64_t *v, int *in_range)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "entity ids are ints, not %s", Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (!overflow) {
        *in_range = x >= 0;
        *v = (uint64_t)x;
        return 0;
    }
    if (overflow < 0) {
        *in_range = 0;
        return 0;
    }
    unsigned long long u = PyLong_AsUnsignedLongLong(o);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        *in_range = 0;
        return 0;
    }
    *in_range = 1;
    *v = u;
    return 0;
}

static int Core_init(CoreObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"buffer", "key", "table", "readonly", "semid", "lock_timeout", "read_timeout",
                             "init", "handle", "pid", "proc_root", "trust_uids", "trust_mode", "layout_hash",
                             "require_ready", NULL};
    PyObject *buffer, *init = Py_None, *handle = Py_None, *trust = Py_None;
    long long key;
    const char *table = NULL, *proc_root = NULL;
    int readonly = 0, semid = -1, require_ready = 0;
    double lock_timeout = 2.0, read_timeout = 0.1;
    unsigned int pid = 0, trust_mode = 0;
    unsigned long long layout_hash = 0;
    if (self->have_view) {
        PyErr_SetString(PyExc_TypeError, "Core is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OL|$zpiddOOIzOIKp", kwlist, &buffer, &key, &table, &readonly,
                                     &semid, &lock_timeout, &read_timeout, &init, &handle, &pid, &proc_root,
                                     &trust, &trust_mode, &layout_hash, &require_ready))
        return -1;
    if (key < INT_MIN || key > (long long)UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "key %lld does not fit a 32-bit key_t", key);
        return -1;
    }
    stated_options o;
    stated_options_init(&o);
    o.name = table;
    o.readonly = readonly;
    o.lock_timeout = lock_timeout;
    o.read_timeout = read_timeout;
    o.pid = pid;
    o.proc_root = proc_root;
    o.trust_mode = trust_mode;
    o.layout_hash = layout_hash;
    o.require_ready = require_ready;
    o.hooks.ctx = self;
    o.hooks.block_begin = hook_block_begin;
    o.hooks.block_end = hook_block_end;
    o.hooks.interrupted = hook_interrupted;
    o.hooks.log = hook_log;
    if (trust != Py_None) {
        PyObject *seq = PySequence_Fast(trust, "trust_uids must be a sequence of uids");
        if (!seq)
            return -1;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        if (n < 1 || n > 8) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "trust_uids holds 1 to 8 uids");
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            unsigned long u = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, i));
            if (u == (unsigned long)-1 && PyErr_Occurred()) {
                Py_DECREF(seq);
                return -1;
            }
            o.trust_uids[i] = (uint32_t)u;
        }
        o.n_trust_uids = (unsigned)n;
        Py_DECREF(seq);
    }
    if (handle != Py_None) {
        if (!PyType_Check(handle) || !PyType_IsSubtype((PyTypeObject *)handle, &PyTuple_Type)) {
            PyErr_SetString(PyExc_TypeError, "handle must be a tuple subclass (stated's Handle)");
            return -1;
        }
        Py_INCREF(handle);
        self->handle_type = (PyTypeObject *)handle;
    }
    if (PyObject_GetBuffer(buffer, &self->view, readonly ? PyBUF_SIMPLE : PyBUF_WRITABLE) != 0)
        return -1;
    self->have_view = 1;
    int rc = stated_attach(&self->t, self->view.buf, (size_t)self->view.len, (stated_key_t)key, readonly ? -1 : semid,
                           &o);
    if (rc) {
        raise_rc(self, rc);
        PyBuffer_Release(&self->view);
        self->have_view = 0;
        return -1;
    }
    if (init != Py_None) {
        if (!PyBytes_Check(init) || PyBytes_GET_SIZE(init) != (Py_ssize_t)self->t.record_size) {
            PyErr_Format(PyExc_ValueError, "init must be bytes of the record size (%u)", self->t.record_size);
            PyBuffer_Release(&self->view);
            self->have_view = 0;
            return -1;
        }
        Py_INCREF(init);
        self->init = init;
        self->t.init = (const unsigned char *)PyBytes_AS_STRING(init);
    }
    return 0;
}

static void disarm_sections(CoreObject *self);
static int drop_section(CoreObject *self, uint32_t slot);

static void Core_release_all(CoreObject *self)
{
    disarm_sections(self);
    if (self->have_view) {
        PyBuffer_Release(&self->view);
        self->have_view = 0;
    }
    self->t.base = NULL;
}

/* A Core is garbage-collected: its cached sections refer back to it, and its view factory is
 * usually a bound method of the Table that owns it. */
static int Core_traverse(CoreObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->sections);
    Py_VISIT(self->view_factory);
    Py_VISIT(self->handle_type);
    return 0;
}

static int Core_clear(CoreObject *self)
{
    Py_CLEAR(self->sections);
    Py_CLEAR(self->view_factory);
    return 0;
}

static void Core_dealloc(CoreObject *self)
{
    PyObject_GC_UnTrack(self);
    Core_release_all(self);
    Core_clear(self);
    Py_XDECREF(self->handle_type);
    Py_XDECREF(self->init);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Core_close(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->busy) {
        PyErr_SetString(E_Stated, "cannot close a table while another thread is inside one of its calls");
        return NULL;
    }
    Core_release_all(self);
    Py_RETURN_NONE;
}

/* ---- allocation ------------------------------------------------------------------------------------ */
static PyObject *Core_alloc(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_OPEN(self);
    if (nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "alloc(entity=None, init=None)");
        return NULL;
    }
    uint64_t entity = 0;
    int has = nargs >= 1 && args[0] != Py_None;
    if (has) {
        int ok = 0;
        if (parse_u64(args[0], &entity, &ok) < 0)
            return NULL;
        if (!ok) {
            PyErr_Format(PyExc_ValueError, "entity ids are u64; %S is out of range", args[0]);
            return NULL;
        }
    }
    Py_buffer init = {0};
    int have_init = nargs == 2 && args[1] != Py_None;
    if (have_init) {                /* this record's initialiser instead of the table's (a row loaded by the daemon) */
        if (PyObject_GetBuffer(args[1], &init, PyBUF_SIMPLE) != 0)
            return NULL;
        if (init.len != (Py_ssize_t)self->t.record_size) {
            PyErr_Format(PyExc_ValueError, "init is %zd bytes: records are %u bytes", init.len, self->t.record_size);
            PyBuffer_Release(&init);
            return NULL;
        }
    }
    stated_handle h;
    self->busy++;
    int rc = stated_alloc_ex(&self->t, has ? &entity : NULL, have_init ? init.buf : NULL, &h);
    self->busy--;
    if (have_init)
        PyBuffer_Release(&init);
    if (rc)
        return raise_rc(self, rc);
    return make_handle(self, h.slot, h.generation);
}

static PyObject *Core_free(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_OPEN(self);
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "free(handle, force=False)");
        return NULL;
    }
    stated_handle h;
    if (parse_handle(self, args[0], &h) < 0)
        return NULL;
    int force = nargs == 2 ? PyObject_IsTrue(args[1]) : 0;
    if (force < 0)
        return NULL;
    self->busy++;
    int rc = stated_free_ex(&self->t, h, force);
    self->busy--;
    if (rc)
        return raise_rc(self, rc);
    if (drop_section(self, h.slot) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Core_lookup(CoreObject *self, PyObject *arg)
{
    CHECK_OPEN(self);
    uint64_t entity;
    int ok = 0;
    if (parse_u64(arg, &entity, &ok) < 0)
        return NULL;
    if (!ok)
        Py_RETURN_NONE;
    stated_handle h;
    self->busy++;
    int rc = stated_lookup(&self->t, entity, &h);
    self->busy--;
    if (rc == STATED_ERR_NOT_FOUND)
        Py_RETURN_NONE;
    if (rc)
        return raise_rc(self, rc);
    return make_handle(self, h.slot, h.generation);
}

static PyObject *Core_valid(CoreObject *self, PyObject *arg)
{
    CHECK_OPEN(self);
    if (!PyTuple_Check(arg) || PyTuple_GET_SIZE(arg) != 2) {
        PyErr_SetString(PyExc_TypeError, "a handle is a (slot, generation) pair");
        return NULL;
    }
    int overflow = 0;
    long long slot = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(arg, 0), &overflow);
    long long gen = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(arg, 1), &overflow);
    if (PyErr_Occurred())
        return NULL;
    if (overflow || slot < 0 || gen < 0 || gen > (long long)UINT32_MAX || slot >= (long long)self->t.capacity)
        Py_RETURN_FALSE;
    stated_handle h = {(uint32_t)slot, (uint32_t)gen};
    return PyBool_FromLong(stated_valid(&self->t, h));
}

static PyObject *Core_entity(CoreObject *self, PyObject *arg)
{
    CHECK_OPEN(self);
    stated_handle h;
    if (parse_handle(self, arg, &h) < 0)
        return NULL;
    const struct stated_slot *s = &self->t.slots[h.slot];
    if (__atomic_load_n(&s->generation, __ATOMIC_ACQUIRE) != h.generation) {
        PyErr_Format(E_Stale, "table '%s': handle (slot %u, generation %u) is stale; look the entity up again",
                     self->t.name, h.slot, h.generation);
        return NULL;
    }
    if (!(__atomic_load_n(&s->flags, __ATOMIC_RELAXED) & STATED_FLAG_HAS_ENTITY))
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&s->entity, __ATOMIC_RELAXED));
}

/* ---- records --------------------------------------------------------------------------------------- */
static PyObject *Core_read(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_OPEN(self);
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "read(handle, into)");
        return NULL;
    }
    stated_handle h;
    if (parse_handle(self, args[0], &h) < 0)
        return NULL;
    PyObject *obj;
    if (PyType_Check(args[1])) {
        PyTypeObject *tp = (PyTypeObject *)args[1];
        obj = tp->tp_new(tp, empty_tuple, NULL);
        if (!obj)
            return NULL;
    } else {
        obj = Py_NewRef(args[1]);
    }
    Py_buffer b;
    if (PyObject_GetBuffer(obj, &b, PyBUF_WRITABLE) != 0) {
        Py_DECREF(obj);
        return NULL;
    }
    if (b.len < (Py_ssize_t)self->t.record_size) {
        PyErr_Format(PyExc_ValueError, "read into %zd bytes: records are %u bytes", b.len, self->t.record_size);
        PyBuffer_Release(&b);
        Py_DECREF(obj);
        return NULL;
    }
    int rc = stated_read(&self->t, h, b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    if (rc) {
        Py_DECREF(obj);
        return raise_rc(self, rc);
    }
    return obj;
}

static PyObject *Core_read_bytes(CoreObject *self, PyObject *arg)
{
    CHECK_OPEN(self);
    stated_handle h;
    if (parse_handle(self, arg, &h) < 0)
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)self->t.record_size);
    if (!out)
        return NULL;
    int rc = stated_read(&self->t, h, PyBytes_AS_STRING(out), self->t.record_size);
    if (rc) {
        Py_DECREF(out);
        return raise_rc(self, rc);
    }
    return out;
}

static PyObject *Core_write_begin(CoreObject *self, PyObject *arg)
{
    CHECK_OPEN(self);
    stated_handle h;
    if (parse_handle(self, arg, &h) < 0)
        return NULL;
    int rc = stated_begin(&self->t, h, NULL);
    if (rc)
        return raise_rc(self, rc);
    Py_RETURN_NONE;
}

static PyObject *Core_write_end(CoreObject *self, PyObject *arg)
{
    CHECK_OPEN(self);
    stated_handle h;
    if (parse_handle(self, arg, &h) < 0)
        return NULL;
    int rc = stated_end(&self->t, h);
    if (rc)
        return raise_rc(self, rc);
    Py_RETURN_NONE;
}

static PyObject *Core_mark_dirty(CoreObject *self, PyObject *arg)
{
    CHECK_OPEN(self);
    stated_handle h;
    if (parse_handle(self, arg, &h) < 0)
        return NULL;
    int rc = stated_mark_dirty_h(&self->t, h);
    if (rc)
        return raise_rc(self, rc);
    Py_RETURN_NONE;
}

/* ---- Section: a reusable `with` object over one slot's seqlock ------------------------------------- */
typedef struct {
    PyObject_HEAD
    CoreObject *core;
    Py_ssize_t slot;                /* -1: disarmed */
    PyObject *view;
    PyObject *bound[2];             /* its __enter__ and __exit__, made once (see "write sections' with") */
} SectionObject;

static PyTypeObject SectionType;

/* a section the Core no longer caches lets go of its bound __enter__/__exit__ (which refer back to
 * it): no cycle is left, so it goes as soon as nothing else holds it */
static void section_drop_bound(SectionObject *s)
{
    Py_CLEAR(s->bound[0]);
    Py_CLEAR(s->bound[1]);
}

static SectionObject *new_section(CoreObject *self, Py_ssize_t slot, PyObject *view)
{
    SectionObject *s = PyObject_GC_New(SectionObject, &SectionType);
    if (!s)
        return NULL;
    s->core = (CoreObject *)Py_NewRef((PyObject *)self);
    s->slot = slot;
    s->view = Py_NewRef(view);
    s->bound[0] = s->bound[1] = NULL;
    PyObject_GC_Track(s);
    return s;
}

/* every section write() cached: disarmed (enter raises StaleHandle, exit does nothing), dropped */
static void disarm_sections(CoreObject *self)
{
    PyObject *d = self->sections;
    if (!d)
        return;
    self->sections = NULL;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(d, &pos, &k, &v)) {
        ((SectionObject *)v)->slot = -1;
        section_drop_bound((SectionObject *)v);
    }
    Py_DECREF(d);
}

/* the section write() cached for `slot` (the slot was freed): disarmed, dropped */
static int drop_section(CoreObject *self, uint32_t slot)
{
    if (!self->sections || PyDict_GET_SIZE(self->sections) == 0)
        return 0;
    PyObject *key = PyLong_FromUnsignedLong(slot);
    if (!key)
        return -1;
    PyObject *v = PyDict_GetItemWithError(self->sections, key);     /* borrowed */
    int r = 0;
    if (v) {
        ((SectionObject *)v)->slot = -1;
        section_drop_bound((SectionObject *)v);
        r = PyDict_DelItem(self->sections, key);
    } else if (PyErr_Occurred()) {
        r = -1;
    }
    Py_DECREF(key);
    return r;
}

static PyObject *Core_forget(CoreObject *self, PyObject *arg)
{
    unsigned long slot = PyLong_AsUnsignedLong(arg);
    if (slot == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (slot <= UINT32_MAX && drop_section(self, (uint32_t)slot) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Core_section(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_OPEN(self);
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "section(slot, view)");
        return NULL;
    }
    Py_ssize_t slot = PyLong_AsSsize_t(args[0]);
    if (slot == -1 && PyErr_Occurred())
        return NULL;
    if (slot < 0 || slot >= (Py_ssize_t)self->t.capacity) {
        PyErr_Format(E_Range, "table '%s': slot %zd is outside [0, %u)", self->t.name, slot, self->t.capacity);
        return NULL;
    }
    if (self->t.readonly) {
        PyErr_Format(E_ReadOnly, "table '%s' is attached readonly; cannot write", self->t.name);
        return NULL;
    }
    return (PyObject *)new_section(self, slot, args[1]);
}

/* write(h): Table.write's checks and its per-slot section, in one C call (the hot path of a write
 * section): the handle names an allocated slot of this owner, not inside a section already; the
 * section is made once per slot over view_factory(slot) and cached until the slot is freed (by
 * free() of this Core) or the Core is closed. */
static PyObject *Core_write(CoreObject *self, PyObject *arg)
{
    CHECK_OPEN(self);
    stated_handle h;
    if (parse_handle(self, arg, &h) < 0)
        return NULL;
    int rc = stated__writable_slot(&self->t, h);
    if (rc)
        return raise_rc(self, rc);
    if (__atomic_load_n(&self->t.slots[h.slot].seq, __ATOMIC_RELAXED) & 1u)
        return raise_rc(self, stated__fail(&self->t, STATED_ERR_NESTED, "slot %u: already inside a write section "
                                           "(write sections do not nest)", h.slot));
    PyObject *key = PyTuple_GET_ITEM(arg, 0);
    if (!PyLong_CheckExact(key))
        key = PyLong_FromUnsignedLong(h.slot);
    else
        Py_INCREF(key);
    if (!key)
        return NULL;
    if (self->sections) {
        PyObject *got = PyDict_GetItemWithError(self->sections, key);
        if (got) {
            Py_DECREF(key);
            return Py_NewRef(got);
        }
        if (PyErr_Occurred()) {
            Py_DECREF(key);
            return NULL;
        }
    } else if (!(self->sections = PyDict_New())) {
        Py_DECREF(key);
        return NULL;
    }
    if (!self->view_factory) {
        Py_DECREF(key);
        PyErr_SetString(PyExc_TypeError, "write() needs view_factory (slot -> the record view) to be set");
        return NULL;
    }
    PyObject *view = PyObject_CallOneArg(self->view_factory, key);
    if (!view) {
        Py_DECREF(key);
        return NULL;
    }
    if (!self->have_view) {             /* the factory closed us */
        Py_DECREF(view);
        Py_DECREF(key);
        PyErr_Format(E_Stated, "table '%s' is closed; attach again", self->t.name);
        return NULL;
    }
    SectionObject *s = new_section(self, (Py_ssize_t)h.slot, view);
    Py_DECREF(view);
    if (!s || !self->sections || PyDict_SetItem(self->sections, key, (PyObject *)s) < 0) {
        Py_XDECREF(s);
        Py_DECREF(key);
        return PyErr_Occurred() ? NULL : raise_rc(self, STATED_ERR_INVAL);
    }
    Py_DECREF(key);
    return (PyObject *)s;
}

static PyObject *Section_enter(SectionObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->slot < 0) {
        PyErr_SetString(E_Stale, "this write section's slot was freed; look the entity up again");
        return NULL;
    }
    if (!self->core->have_view) {
        PyErr_Format(E_Stated, "table '%s' is closed; attach again", self->core->t.name);
        return NULL;
    }
    struct stated_slot *s = &self->core->t.slots[self->slot];
    uint32_t seq = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);
    __atomic_store_n(&s->seq, seq + 1u, __ATOMIC_RELAXED);
    /* odd seq before any field store the body makes (ctypes stores included): see stated_begin */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return Py_NewRef(self->view);
}

static PyObject *Section_exit(SectionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)args;
    (void)nargs;
    if (self->slot >= 0 && self->core->have_view) {
        struct stated_slot *s = &self->core->t.slots[self->slot];
        uint32_t seq = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);
        __atomic_store_n(&s->seq, seq + 1u, __ATOMIC_RELEASE);   /* the body's stores before the even seq */
        __atomic_store_n(&s->dirty, (uint8_t)1, __ATOMIC_RELEASE);
    }
    Py_RETURN_FALSE;
}

static PyObject *Section_disarm(SectionObject *self, PyObject *Py_UNUSED(ignored))
{
    self->slot = -1;
    Py_RETURN_NONE;
}

static int Section_traverse(SectionObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->core);
    Py_VISIT(self->view);
    Py_VISIT(self->bound[0]);
    Py_VISIT(self->bound[1]);
    return 0;
}

static int Section_clear(SectionObject *self)
{
    Py_CLEAR(self->core);
    Py_CLEAR(self->view);
    Py_CLEAR(self->bound[0]);
    Py_CLEAR(self->bound[1]);
    self->slot = -1;
    return 0;
}

static void Section_dealloc(SectionObject *self)
{
    PyObject_GC_UnTrack(self);
    Section_clear(self);
    PyObject_GC_Del(self);
}

static PyObject *Section_get_slot(SectionObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->slot);
}

/* __enter__ and __exit__ are not methods here: install_section_methods() puts descriptors in their place
 * (they call Section_enter / Section_exit; see "write sections' with" near the end of this file) */
static PyMethodDef Section_methods[] = {
    {"disarm", (PyCFunction)Section_disarm, METH_NOARGS, "the slot was freed: enter raises, exit does nothing"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Section_getset[] = {
    {"slot", (getter)Section_get_slot, NULL, "the slot (-1 once disarmed)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SectionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stated.shm._native.Section",
    .tp_basicsize = sizeof(SectionObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A write section over one slot (Core.section): with s as view: ...",
    .tp_dealloc = (destructor)Section_dealloc,
    .tp_traverse = (traverseproc)Section_traverse,
    .tp_clear = (inquiry)Section_clear,
    .tp_methods = Section_methods,
    .tp_getset = Section_getset,
};

/* ---- owners -------------------------------------------------------------------------------------------- */
static PyObject *Core_claim_owner(CoreObject *self, PyObject *arg)
{
    CHECK_OPEN(self);
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "owner names are str");
        return NULL;
    }
    Py_ssize_t n;
    const char *name = PyUnicode_AsUTF8AndSize(arg, &n);
    if (!name)
        return NULL;
    if (n < 1 || n > STATED_OWNER_NAME_MAX || (Py_ssize_t)strlen(name) != n) {
        PyErr_Format(PyExc_ValueError, "owner names are 1 to 32 bytes of UTF-8 without NUL, got %R", arg);
        return NULL;
    }
    uint32_t idx = 0;
    self->busy++;
    int rc = stated_claim_owner(&self->t, name, &idx);
    self->busy--;
    if (rc)
        return raise_rc(self, rc);
    return PyLong_FromUnsignedLong(idx);
}

static PyObject *Core_set_owner_state(CoreObject *self, PyObject *args)
{
    CHECK_OPEN(self);
    unsigned int idx, state;
    PyObject *pid_obj = Py_None;
    if (!PyArg_ParseTuple(args, "II|O", &idx, &state, &pid_obj))
        return NULL;
    unsigned long only_pid = 0;
    if (pid_obj != Py_None) {       /* conditional on that pid, 0 included (the Python contract) */
        only_pid = PyLong_AsUnsignedLong(pid_obj);
        if (only_pid == (unsigned long)-1 && PyErr_Occurred())
            return NULL;
        if (only_pid > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "only_pid must fit a u32");
            return NULL;
        }
    }
    self->busy++;
    int rc = stated__set_owner_state(&self->t, idx, state, pid_obj != Py_None, (uint32_t)only_pid);
    self->busy--;
    if (rc < 0)
        return raise_rc(self, rc);
    return PyBool_FromLong(rc);
}

static PyObject *Core_reap_owner(CoreObject *self, PyObject *arg)
{
    CHECK_OPEN(self);
    unsigned long idx = PyLong_AsUnsignedLong(arg);
    if (idx == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    self->busy++;
    int64_t n = stated_reap_owner(&self->t, (uint32_t)(idx > UINT32_MAX ? 0 : idx));
    self->busy--;
    if (n < 0)
        return raise_rc(self, (int)n);
    return PyLong_FromLongLong(n);
}

/* ---- lock, repair, checks ---------------------------------------------------------------------------------- */
static PyObject *Core_acquire(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self);
    self->busy++;
    int rc = stated_acquire(&self->t);
    self->busy--;
    if (rc)
        return raise_rc(self, rc);
    Py_RETURN_NONE;
}

static PyObject *Core_release(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self);
    stated_release(&self->t);
    Py_RETURN_NONE;
}

static PyObject *Core_repair(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self);
    self->busy++;
    int rc = stated_repair(&self->t);
    self->busy--;
    if (rc)
        return raise_rc(self, rc);
    Py_RETURN_NONE;
}

static PyObject *Core_repair_locked(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self);
    if (self->t.readonly)
        return raise_rc(self, stated__fail(&self->t, STATED_ERR_READONLY, "attached read-only; cannot repair"));
    if (!stated_holding(&self->t)) {
        PyErr_Format(E_Stated, "table '%s': repair_locked() outside acquire() ... release()", self->t.name);
        return NULL;
    }
    int rc = stated_repair_locked(&self->t);
    if (rc)
        return raise_rc(self, rc);
    Py_RETURN_NONE;
}

static PyObject *Core_lock_state(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self);
    /* relaxed loads: a snapshot for the daemon's stuck-lock watch, not a synchronisation */
    return Py_BuildValue("(KI)", (unsigned long long)__atomic_load_n(&self->t.hdr->alloc.lock, __ATOMIC_RELAXED),
                         (unsigned)__atomic_load_n(&self->t.hdr->alloc.lock_seq, __ATOMIC_RELAXED));
}

static PyObject *Core_clear_lock(CoreObject *self, PyObject *arg)
{
    CHECK_OPEN(self);
    unsigned long long w = PyLong_AsUnsignedLongLong(arg);
    if (w == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(stated_clear_lock(&self->t, (uint64_t)w));
}

static PyObject *Core_reopen_semaphore(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self);
    self->busy++;
    int rc = stated_reopen_semaphore(&self->t);
    self->busy--;
    if (rc)
        return raise_rc(self, rc);
    Py_RETURN_NONE;
}

static PyObject *Core_intent_pending(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self);
    return PyBool_FromLong(stated_intent_pending(&self->t));
}

static void collect_problem(void *ctx, const char *problem)
{
    PyObject *list = (PyObject *)ctx;
    if (PyErr_Occurred())
        return;
    PyObject *s = PyUnicode_DecodeUTF8(problem, (Py_ssize_t)strlen(problem), "replace");
    if (s) {
        PyList_Append(list, s);
        Py_DECREF(s);
    }
}

static PyObject *Core_verify(CoreObject *self, PyObject *args, PyObject *kw)
{
    CHECK_OPEN(self);
    static char *kwlist[] = {"lock", NULL};
    int lock = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kwlist, &lock))
        return NULL;
    lock = lock && !self->t.readonly;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    if (lock) {
        self->busy++;
        int rc = stated_acquire(&self->t);
        self->busy--;
        if (rc) {
            Py_DECREF(out);
            return raise_rc(self, rc);
        }
    }
    int rc = stated_verify(&self->t, collect_problem, out);
    if (lock)
        stated_release(&self->t);
    if (rc < 0) {
        Py_DECREF(out);
        return raise_rc(self, rc);
    }
    if (PyErr_Occurred()) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *Core_audit(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self);
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    self->busy++;
    int rc = stated_audit(&self->t, collect_problem, out);
    self->busy--;
    if (rc < 0) {
        Py_DECREF(out);
        return raise_rc(self, rc);
    }
    if (PyErr_Occurred()) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* ---- scans ------------------------------------------------------------------------------------------------- */
typedef struct {
    CoreObject *core;
    PyObject *list;
    int handles;
} scan_ctx;

static int scan_append(void *ctx, uint32_t slot)
{
    scan_ctx *c = (scan_ctx *)ctx;
    PyObject *v;
    if (c->handles)
        v = make_handle(c->core, slot, __atomic_load_n(&c->core->t.slots[slot].generation, __ATOMIC_RELAXED));
    else
        v = PyLong_FromUnsignedLong(slot);
    if (!v)
        return -1;
    int r = PyList_Append(c->list, v);
    Py_DECREF(v);
    return r < 0 ? -1 : 0;
}

static PyObject *run_scan(CoreObject *self, int kind, uint32_t owner, int handles)
{
    scan_ctx c = {self, PyList_New(0), handles};
    if (!c.list)
        return NULL;
    int64_t n = stated_scan(&self->t, kind, owner, scan_append, &c);
    if (n < 0) {
        Py_DECREF(c.list);
        if (n == -1 && PyErr_Occurred())
            return NULL;
        return raise_rc(self, (int)n);
    }
    return c.list;
}

static PyObject *Core_changed_slots(CoreObject *self, PyObject *args, PyObject *kw)
{
    CHECK_OPEN(self);
    static char *kwlist[] = {"clear", NULL};
    int clear = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kwlist, &clear))
        return NULL;
    return run_scan(self, STATED_SCAN_CHANGED | (clear ? STATED_SCAN_CLEAR_DIRTY : 0), 0, 0);
}

static PyObject *Core_allocated_slots(CoreObject *self, PyObject *args, PyObject *kw)
{
    CHECK_OPEN(self);
    static char *kwlist[] = {"clear_dirty", NULL};
    int clear = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kwlist, &clear))
        return NULL;
    return run_scan(self, STATED_SCAN_ALLOCATED | (clear ? STATED_SCAN_CLEAR_DIRTY : 0), 0, 0);
}

static PyObject *Core_owned_slots(CoreObject *self, PyObject *arg)
{
    CHECK_OPEN(self);
    unsigned long owner = PyLong_AsUnsignedLong(arg);
    if (owner == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    return run_scan(self, STATED_SCAN_OWNER, (uint32_t)owner, 0);
}

static PyObject *Core_handles(CoreObject *self, PyObject *args)
{
    CHECK_OPEN(self);
    unsigned int owner = 0;
    if (!PyArg_ParseTuple(args, "|I", &owner))
        return NULL;
    return run_scan(self, owner ? STATED_SCAN_OWNER : STATED_SCAN_ALLOCATED, owner, 1);
}

static PyObject *Core_copy_slot(CoreObject *self, PyObject *args)
{
    CHECK_OPEN(self);
    unsigned int slot;
    double wait = 0.05;
    if (!PyArg_ParseTuple(args, "I|d", &slot, &wait))
        return NULL;
    PyObject *data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)self->t.record_size);
    if (!data)
        return NULL;
    stated_slot_copy c;
    int rc = stated_copy_slot(&self->t, slot, PyBytes_AS_STRING(data), self->t.record_size, &c, wait);
    if (rc) {
        Py_DECREF(data);
        return raise_rc(self, rc);
    }
    return Py_BuildValue("(kBBHKNO)", (unsigned long)c.generation, c.state, c.flags, c.owner,
                         (unsigned long long)c.entity, data, c.torn ? Py_True : Py_False);
}

static PyObject *Core_counters(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self);
    PyObject *out = PyTuple_New(STATED_COUNTER_COUNT);
    if (!out)
        return NULL;
    for (unsigned i = 0; i < STATED_COUNTER_COUNT; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(__atomic_load_n(&self->t.hdr->counters[i], __ATOMIC_RELAXED));
        if (!v) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, v);
    }
    return out;
}

static PyObject *Core_used(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
    CHECK_OPEN(self);
    return PyLong_FromUnsignedLong(__atomic_load_n(&self->t.hdr->alloc.used, __ATOMIC_RELAXED));
}

/* ---- attributes ------------------------------------------------------------------------------------------- */
static PyObject *Core_get_owner(CoreObject *self, void *c)
{
    (void)c;
    return PyLong_FromUnsignedLong(self->t.owner);
}

static int Core_set_owner(CoreObject *self, PyObject *v, void *c)
{
    (void)c;
    if (!v) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete owner");
        return -1;
    }
    unsigned long x = PyLong_AsUnsignedLong(v);
    if (x == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    if (x > STATED_OWNERS_CAPACITY) {
        PyErr_Format(PyExc_ValueError, "owner indexes are 0..%u", STATED_OWNERS_CAPACITY);
        return -1;
    }
    self->t.owner = (uint32_t)x;
    return 0;
}

static int set_timeout(CoreObject *self, PyObject *v, int64_t *field, const char *what)
{
    if (!v) {
        PyErr_Format(PyExc_AttributeError, "cannot delete %s", what);
        return -1;
    }
    double s = PyFloat_AsDouble(v);
    if (s == -1.0 && PyErr_Occurred())
        return -1;
    if (!(s > 0.0) || s > 1e9) {        /* also refuses NaN */
        PyErr_Format(PyExc_ValueError, "%s must be a positive number of seconds, got %R", what, v);
        return -1;
    }
    (void)self;
    *field = (int64_t)(s * 1e9);
    return 0;
}

static PyObject *Core_get_lock_timeout(CoreObject *self, void *c)
{
    (void)c;
    return PyFloat_FromDouble((double)self->t.lock_timeout_ns / 1e9);
}

static int Core_set_lock_timeout(CoreObject *self, PyObject *v, void *c)
{
    (void)c;
    return set_timeout(self, v, &self->t.lock_timeout_ns, "lock_timeout");
}

static PyObject *Core_get_read_timeout(CoreObject *self, void *c)
{
    (void)c;
    return PyFloat_FromDouble((double)self->t.read_timeout_ns / 1e9);
}

static int Core_set_read_timeout(CoreObject *self, PyObject *v, void *c)
{
    (void)c;
    return set_timeout(self, v, &self->t.read_timeout_ns, "read_timeout");
}

static PyObject *Core_get_view_factory(CoreObject *self, void *c)
{
    (void)c;
    return Py_NewRef(self->view_factory ? self->view_factory : Py_None);
}

static int Core_set_view_factory(CoreObject *self, PyObject *v, void *c)
{
    (void)c;
    if (v && v != Py_None && !PyCallable_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "view_factory must be callable (slot -> record view) or None");
        return -1;
    }
    Py_XSETREF(self->view_factory, v && v != Py_None ? Py_NewRef(v) : NULL);
    return 0;
}

#define GETTER(fname, expr)                                          \
    static PyObject *Core_get_##fname(CoreObject *self, void *c)     \
    {                                                                \
        (void)c;                                                     \
        return expr;                                                 \
    }
GETTER(capacity, PyLong_FromUnsignedLong(self->t.capacity))
GETTER(record_size, PyLong_FromUnsignedLong(self->t.record_size))
GETTER(key, PyLong_FromLong((long)(uint32_t)self->t.key))
GETTER(semid, PyLong_FromLong(self->t.semid))
GETTER(pid, PyLong_FromUnsignedLong(self->t.pid))
GETTER(readonly, PyBool_FromLong(self->t.readonly))
GETTER(closed, PyBool_FromLong(!self->have_view))
GETTER(table, PyUnicode_FromString(self->t.name))

static PyGetSetDef Core_getset[] = {
    {"owner", (getter)Core_get_owner, (setter)Core_set_owner, "this worker's owner index (0 = none)", NULL},
    {"view_factory", (getter)Core_get_view_factory, (setter)Core_set_view_factory,
     "write()'s record view of a slot: view_factory(slot) (called once per slot; None: unset)", NULL},
    {"lock_timeout", (getter)Core_get_lock_timeout, (setter)Core_set_lock_timeout, "seconds a lock wait may take",
     NULL},
    {"read_timeout", (getter)Core_get_read_timeout, (setter)Core_set_read_timeout,
     "seconds a consistent read waits for a writer", NULL},
    {"capacity", (getter)Core_get_capacity, NULL, NULL, NULL},
    {"record_size", (getter)Core_get_record_size, NULL, NULL, NULL},
    {"key", (getter)Core_get_key, NULL, NULL, NULL},
    {"semid", (getter)Core_get_semid, NULL, NULL, NULL},
    {"pid", (getter)Core_get_pid, NULL, NULL, NULL},
    {"readonly", (getter)Core_get_readonly, NULL, NULL, NULL},
    {"closed", (getter)Core_get_closed, NULL, NULL, NULL},
    {"table", (getter)Core_get_table, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

#define FAST(f) (PyCFunction)(void (*)(void))(f)
static PyMethodDef Core_methods[] = {
    {"alloc", FAST(Core_alloc), METH_FASTCALL, "alloc(entity=None, init=None) -> handle"},
    {"free", FAST(Core_free), METH_FASTCALL, "free(handle, force=False)"},
    {"lookup", (PyCFunction)Core_lookup, METH_O, "lookup(entity) -> handle | None"},
    {"valid", (PyCFunction)Core_valid, METH_O, "valid(handle) -> bool"},
    {"entity", (PyCFunction)Core_entity, METH_O, "entity(handle) -> int | None"},
    {"read", FAST(Core_read), METH_FASTCALL, "read(handle, into) -> into: consistent copy"},
    {"read_bytes", (PyCFunction)Core_read_bytes, METH_O, "read_bytes(handle) -> bytes: consistent copy"},
    {"write_begin", (PyCFunction)Core_write_begin, METH_O, "write_begin(handle): seq odd"},
    {"write_end", (PyCFunction)Core_write_end, METH_O, "write_end(handle): seq even, dirty"},
    {"section", FAST(Core_section), METH_FASTCALL, "section(slot, view) -> Section"},
    {"write", (PyCFunction)Core_write, METH_O, "write(handle) -> the slot's cached Section, checked"},
    {"forget", (PyCFunction)Core_forget, METH_O, "forget(slot): freed elsewhere; write()'s section disarmed"},
    {"mark_dirty", (PyCFunction)Core_mark_dirty, METH_O, "mark_dirty(handle)"},
    {"claim_owner", (PyCFunction)Core_claim_owner, METH_O, "claim_owner(name) -> owner index"},
    {"set_owner_state", (PyCFunction)Core_set_owner_state, METH_VARARGS,
     "set_owner_state(index, state, only_pid=None) -> bool"},
    {"reap_owner", (PyCFunction)Core_reap_owner, METH_O, "reap_owner(index) -> slots freed"},
    {"acquire", (PyCFunction)Core_acquire, METH_NOARGS, "take the table lock (settling or repairing first)"},
    {"release", (PyCFunction)Core_release, METH_NOARGS, "give the table lock back"},
    {"repair", (PyCFunction)Core_repair, METH_NOARGS, "rebuild derived state from the slot table (takes the lock)"},
    {"repair_locked", (PyCFunction)Core_repair_locked, METH_NOARGS,
     "repair() for a caller that already holds the lock (acquire() ... release())"},
    {"reopen_semaphore", (PyCFunction)Core_reopen_semaphore, METH_NOARGS, "semget again (it was removed)"},
    {"lock_state", (PyCFunction)Core_lock_state, METH_NOARGS,
     "(lock word, lock_seq): the word is 0 when free, else the holder (format.LOCK_*)"},
    {"clear_lock", (PyCFunction)Core_clear_lock, METH_O,
     "clear_lock(word): the daemon's remedy for a word stuck on a live process; CAS from exactly `word` "
     "to 0, refused (False) when it changed or its holder is stopped"},
    {"intent_pending", (PyCFunction)Core_intent_pending, METH_NOARGS, "an intent mark is set"},
    {"verify", (PyCFunction)(void (*)(void))Core_verify, METH_VARARGS | METH_KEYWORDS, "verify(lock=True) -> problems"},
    {"audit", (PyCFunction)Core_audit, METH_NOARGS, "audit() -> problems found (and rebuilt)"},
    {"changed_slots", (PyCFunction)(void (*)(void))Core_changed_slots, METH_VARARGS | METH_KEYWORDS,
     "changed_slots(clear=True) -> slots dirty or pinned"},
    {"allocated_slots", (PyCFunction)(void (*)(void))Core_allocated_slots, METH_VARARGS | METH_KEYWORDS,
     "allocated_slots(clear_dirty=False) -> slots"},
    {"owned_slots", (PyCFunction)Core_owned_slots, METH_O, "owned_slots(owner) -> slots"},
    {"handles", (PyCFunction)Core_handles, METH_VARARGS, "handles(owner=0) -> handles"},
    {"copy_slot", (PyCFunction)Core_copy_slot, METH_VARARGS,
     "copy_slot(slot, wait=0.05) -> (generation, state, flags, owner, entity, bytes, torn)"},
    {"counters", (PyCFunction)Core_counters, METH_NOARGS, "counters in format.COUNTERS order"},
    {"used", (PyCFunction)Core_used, METH_NOARGS, "allocated slots (the used word)"},
    {"close", (PyCFunction)Core_close, METH_NOARGS, "release the buffer; every later call raises StatedError"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stated.shm._native.Core",
    .tp_basicsize = sizeof(CoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One attached table over the native core; see the module docstring.",
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_clear = (inquiry)Core_clear,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
};

/* ==== record views: range-checked integer fields (issue 11) =============================================
 *
 * CheckedInt(cfield, owner, name, type, lo, hi, doc=None): the descriptor stated.shm.records installs on
 * the record class `owner` for each integer field, in place of a Python property. It stands for the raw
 * ctypes field `cfield` (the CField of `_raw_<name>`): reads give what the CField gives; writes are
 * range-checked first, so that `p.hp = 2**40` raises ValueError naming the field and its range and
 * writes nothing instead of wrapping like C.
 *
 * What a write accepts or refuses is exactly what the Python setter it replaces did
 * (`if lo <= v <= hi: self._raw = v else: raise ValueError(...)`, tests/test_records.py):
 *  - an exact int or a bool is compared in C (the same result int's comparison gives);
 *  - anything else (int subclasses, which may override the comparison, floats, str, None, ...) goes
 *    through the same two rich comparisons Python's chained `lo <= v <= hi` makes, so it raises the
 *    same TypeError, or passes and then meets ctypes' own conversion (a float in range: TypeError);
 *  - in range, an exact int or bool is stored, anything else goes to the CField's setter unchanged
 *    (ctypes converts it: IntEnum members, objects with __index__).
 * Read-only and dead views never reach this: their classes override __setattr__/__getattribute__.
 *
 * The hot path (`direct`): a ctypes instance starts, after PyObject_HEAD, with `char *b_ptr`, the
 * address of its bytes (ctypes' CDataObject). With that, a read is one load and PyLong_From..., and a
 * checked exact int one store: no call into ctypes, whose CField path re-derives the same pointer
 * through three functions (PyCField_get -> PyCData_get -> the field's getfunc). The layout is ctypes'
 * private one, so it is not assumed: module init compares b_ptr with ctypes.addressof() on real
 * instances (direct_layout_check), and every descriptor checks its field (offset and size inside
 * sizeof(owner), the size its type has) and each instance's class (an instance of `owner`: a manual
 * `__get__(other)` is refused). If a layout or field check fails, the CField's own getter and setter
 * are used (the same semantics, slower). Loads and stores go through memcpy of the field's width, as
 * ctypes itself does (one plain access for an aligned field). */
typedef struct {
    PyObject_HEAD
    char *b_ptr;
} CDataPrefix;

static int direct_layout_ok;        /* set at module init by direct_layout_check() */
static int direct_enabled = 1;      /* tests turn the direct path off to run the CField path */

typedef struct {
    PyObject_HEAD
    PyObject *cfield;               /* the ctypes CField of the raw field */
    descrgetfunc cget;              /* its type's tp_descr_get / tp_descr_set, taken once */
    descrsetfunc cset;
    PyTypeObject *owner;            /* the record class the field belongs to */
    PyObject *name;                 /* str: the field's name, for messages */
    PyObject *type;                 /* str: "i32", "u64", ... for messages */
    PyObject *lo, *hi;              /* ints: the inclusive range (the generic path compares with them) */
    PyObject *doc;
    long long slo, shi;             /* the range in C, for signed kinds */
    unsigned long long uhi;         /* ... and for unsigned ones (lo is 0) */
    int is_unsigned;
    int width;                      /* bytes: 1, 2, 4 or 8 */
    int direct;                     /* this field's checks passed: b_ptr + offset, width bytes */
    Py_ssize_t offset;
} CheckedIntObject;

static PyTypeObject CheckedIntType;

/* b_ptr == ctypes.addressof(o) for a plain instance and one over a foreign buffer, or the direct path
 * stays off. -1 only on an unexpected Python error. */
static int direct_layout_check(void)
{
    PyObject *ctypes = PyImport_ImportModule("ctypes");
    if (!ctypes)
        return -1;
    int ok = 1;
    PyObject *buf = PyByteArray_FromStringAndSize("0123456789abcdef", 16);
    PyObject *objs[2] = {NULL, NULL};
    objs[0] = PyObject_CallMethod(ctypes, "c_uint64", "K", 0x0123456789abcdefULL);
    PyObject *cls = PyObject_GetAttrString(ctypes, "c_int32");
    if (cls && buf)
        objs[1] = PyObject_CallMethod(cls, "from_buffer", "Oi", buf, 4);
    for (int i = 0; i < 2 && ok; i++) {
        PyObject *addr = objs[i] ? PyObject_CallMethod(ctypes, "addressof", "O", objs[i]) : NULL;
        void *a = addr ? PyLong_AsVoidPtr(addr) : NULL;
        if (!addr || PyErr_Occurred() || a != (void *)((CDataPrefix *)objs[i])->b_ptr)
            ok = 0;
        Py_XDECREF(addr);
    }
    if (ok && memcmp(((CDataPrefix *)objs[1])->b_ptr, "456789ab", 4) != 0)
        ok = 0;
    PyErr_Clear();
    Py_XDECREF(objs[0]);
    Py_XDECREF(objs[1]);
    Py_XDECREF(cls);
    Py_XDECREF(buf);
    Py_DECREF(ctypes);
    direct_layout_ok = ok;
    return 0;
}

/* the CField's offset and size, and sizeof(owner): is b_ptr + offset, `width` bytes, inside every
 * instance of owner? (0 when anything does not fit: the field then uses the CField path) */
static int direct_field_fits(CheckedIntObject *self, PyObject *cfield, PyObject *owner)
{
    PyObject *ctypes = PyImport_ImportModule("ctypes");
    PyObject *off = PyObject_GetAttrString(cfield, "offset");
    PyObject *size = PyObject_GetAttrString(cfield, "size");
    PyObject *total = ctypes ? PyObject_CallMethod(ctypes, "sizeof", "O", owner) : NULL;
    Py_ssize_t o = off ? PyLong_AsSsize_t(off) : -1;
    Py_ssize_t n = size ? PyLong_AsSsize_t(size) : -1;
    Py_ssize_t t = total ? PyLong_AsSsize_t(total) : -1;
    PyErr_Clear();
    Py_XDECREF(ctypes);
    Py_XDECREF(off);
    Py_XDECREF(size);
    Py_XDECREF(total);
    if (o < 0 || n != self->width || t < 0 || o > t - n)
        return 0;
    self->offset = o;
    return 1;
}

static int CheckedInt_init(CheckedIntObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"cfield", "owner", "name", "type", "lo", "hi", "doc", NULL};
    PyObject *cfield, *owner, *name, *type, *lo, *hi, *doc = Py_None;
    if (self->cfield) {
        PyErr_SetString(PyExc_TypeError, "CheckedInt is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO!UUO!O!|O", kwlist, &cfield, &PyType_Type, &owner, &name, &type,
                                     &PyLong_Type, &lo, &PyLong_Type, &hi, &doc))
        return -1;
    PyTypeObject *ct = Py_TYPE(cfield);
    if (!ct->tp_descr_get || !ct->tp_descr_set) {
        PyErr_Format(PyExc_TypeError, "CheckedInt wraps a ctypes field (a data descriptor), not %s", ct->tp_name);
        return -1;
    }
    int overflow = 0;
    long long l = PyLong_AsLongLongAndOverflow(lo, &overflow);
    if (l == -1 && PyErr_Occurred())
        return -1;
    if (overflow) {
        PyErr_SetString(PyExc_ValueError, "CheckedInt: lo must fit 64 bits");
        return -1;
    }
    unsigned long long span;        /* hi - lo: 2**bits - 1 for the integer kinds */
    if (l >= 0) {                   /* unsigned kind: [0, hi], hi up to 2**64 - 1 */
        unsigned long long u = PyLong_AsUnsignedLongLong(hi);
        if (u == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        if (l != 0) {
            PyErr_SetString(PyExc_ValueError, "CheckedInt: an unsigned range starts at 0");
            return -1;
        }
        self->is_unsigned = 1;
        self->uhi = u;
        span = u;
    } else {
        long long h = PyLong_AsLongLongAndOverflow(hi, &overflow);
        if (h == -1 && PyErr_Occurred())
            return -1;
        if (overflow || h < l) {
            PyErr_SetString(PyExc_ValueError, "CheckedInt: hi must fit 64 bits and be >= lo");
            return -1;
        }
        self->is_unsigned = 0;
        self->slo = l;
        self->shi = h;
        span = (unsigned long long)h - (unsigned long long)l;
    }
    self->width = span == 0xFFu ? 1 : span == 0xFFFFu ? 2 : span == 0xFFFFFFFFu ? 4 : span == UINT64_MAX ? 8 : 0;
    self->cget = ct->tp_descr_get;
    self->cset = ct->tp_descr_set;
    self->direct = direct_layout_ok && self->width && direct_field_fits(self, cfield, owner);
    self->cfield = Py_NewRef(cfield);
    self->owner = (PyTypeObject *)Py_NewRef(owner);
    self->name = Py_NewRef(name);
    self->type = Py_NewRef(type);
    self->lo = Py_NewRef(lo);
    self->hi = Py_NewRef(hi);
    self->doc = Py_NewRef(doc);
    return 0;
}

/* An attribute lookup only finds the descriptor on instances of owner (or its read-only and dead
 * subclasses); anything else is a manual __get__/__set__ call, refused like CPython's own descriptors
 * refuse a foreign object (it must not read or write at another object's b_ptr + offset). */
static int checked_instance(CheckedIntObject *self, PyObject *obj)
{
    if (PyObject_TypeCheck(obj, self->owner))
        return 1;
    PyErr_Format(PyExc_TypeError, "descriptor %R for '%.100s' objects doesn't apply to a '%.100s' object",
                 self->name, self->owner->tp_name, Py_TYPE(obj)->tp_name);
    return 0;
}

/* p.hp */
static PyObject *CheckedInt_get(CheckedIntObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None || !self->cfield)
        return Py_NewRef((PyObject *)self);     /* on the class: the descriptor (help() shows the doc) */
    if (!checked_instance(self, obj))
        return NULL;
    if (!(self->direct && direct_enabled))
        return self->cget(self->cfield, obj, type);         /* ctypes' own read */
    const char *p = ((CDataPrefix *)obj)->b_ptr + self->offset;
    if (self->is_unsigned) {
        switch (self->width) {
        case 1: { uint8_t v; memcpy(&v, p, 1); return PyLong_FromUnsignedLong(v); }
        case 2: { uint16_t v; memcpy(&v, p, 2); return PyLong_FromUnsignedLong(v); }
        case 4: { uint32_t v; memcpy(&v, p, 4); return PyLong_FromUnsignedLong(v); }
        default: { uint64_t v; memcpy(&v, p, 8); return PyLong_FromUnsignedLongLong(v); }
        }
    }
    switch (self->width) {
    case 1: { int8_t v; memcpy(&v, p, 1); return PyLong_FromLong(v); }
    case 2: { int16_t v; memcpy(&v, p, 2); return PyLong_FromLong(v); }
    case 4: { int32_t v; memcpy(&v, p, 4); return PyLong_FromLong(v); }
    default: { int64_t v; memcpy(&v, p, 8); return PyLong_FromLongLong(v); }
    }
}

/* an in-range value of this field's kind into its bytes (little or big endian: the host's, as ctypes) */
static void checked_store(CheckedIntObject *self, char *p, unsigned long long bits)
{
    switch (self->width) {
    case 1: { uint8_t v = (uint8_t)bits; memcpy(p, &v, 1); break; }
    case 2: { uint16_t v = (uint16_t)bits; memcpy(p, &v, 2); break; }
    case 4: { uint32_t v = (uint32_t)bits; memcpy(p, &v, 4); break; }
    default: { uint64_t v = (uint64_t)bits; memcpy(p, &v, 8); break; }
    }
}

/* p.hp = v */
static int CheckedInt_set(CheckedIntObject *self, PyObject *obj, PyObject *value)
{
    if (!self->cfield) {
        PyErr_SetString(PyExc_TypeError, "CheckedInt is not initialised");
        return -1;
    }
    if (!checked_instance(self, obj))
        return -1;
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "field %R of '%.100s' object cannot be deleted", self->name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    int ok;
    unsigned long long bits = 0;    /* an exact int's value, two's complement, when ok on the fast path */
    int exact = PyLong_CheckExact(value) || PyBool_Check(value);
    if (exact) {
        /* Fast path: an exact int or a bool (an int with int's comparison) is range-checked in C.
         * PyLong_AsLongLongAndOverflow cannot fail on one (no __index__ call); outside 64 bits it says
         * which side (overflow < 0: below every range; > 0: above, unless u64 takes it). */
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (!overflow) {
            ok = self->is_unsigned ? x >= 0 && (unsigned long long)x <= self->uhi : x >= self->slo && x <= self->shi;
            bits = (unsigned long long)x;
        } else if (overflow < 0 || !self->is_unsigned) {
            ok = 0;
        } else {
            unsigned long long u = PyLong_AsUnsignedLongLong(value);     /* 2**63 <= v: u64 up to 2**64 - 1 */
            if (u == (unsigned long long)-1 && PyErr_Occurred()) {
                if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                    return -1;
                PyErr_Clear();
                ok = 0;
            } else {
                ok = u <= self->uhi;
                bits = u;
            }
        }
    } else {
        /* Anything else: Python's `lo <= v <= hi`, comparison by comparison (its TypeErrors included) */
        ok = PyObject_RichCompareBool(self->lo, value, Py_LE);
        if (ok > 0)
            ok = PyObject_RichCompareBool(value, self->hi, Py_LE);
        if (ok < 0)
            return -1;
    }
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "field %R is %U: %R is outside [%S, %S]", self->name, self->type, value,
                     self->lo, self->hi);
        return -1;
    }
    if (exact && self->direct && direct_enabled) {
        checked_store(self, ((CDataPrefix *)obj)->b_ptr + self->offset, bits);
        return 0;
    }
    return self->cset(self->cfield, obj, value);            /* ctypes converts and stores */
}

static int CheckedInt_traverse(CheckedIntObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->cfield);
    Py_VISIT(self->owner);
    Py_VISIT(self->doc);
    return 0;
}

/* The descriptor and its record class refer to each other (class dict -> descriptor -> owner): the
 * class's own clear (its dict) breaks that cycle, so owner and cfield, which get/set use, stay until
 * dealloc and a call during a collection never meets them NULL. */
static int CheckedInt_clear(CheckedIntObject *self)
{
    Py_CLEAR(self->doc);
    return 0;
}

static void CheckedInt_dealloc(CheckedIntObject *self)
{
    PyObject_GC_UnTrack(self);
    CheckedInt_clear(self);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->cfield);
    Py_CLEAR(self->name);
    Py_CLEAR(self->type);
    Py_CLEAR(self->lo);
    Py_CLEAR(self->hi);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *CheckedInt_repr(CheckedIntObject *self)
{
    if (!self->cfield)
        return PyUnicode_FromString("<CheckedInt (uninitialised)>");
    return PyUnicode_FromFormat("<CheckedInt %R: %U [%S, %S]>", self->name, self->type, self->lo, self->hi);
}

/* introspection (tests, help()): getters, no structmember.h needed */
#define CHECKED_INT_GETTER(fname, member)                                          \
    static PyObject *CheckedInt_get_##fname(CheckedIntObject *self, void *c)       \
    {                                                                              \
        (void)c;                                                                   \
        return Py_NewRef(self->member ? (PyObject *)self->member : Py_None);       \
    }
CHECKED_INT_GETTER(doc, doc)
CHECKED_INT_GETTER(field, cfield)
CHECKED_INT_GETTER(owner, owner)
CHECKED_INT_GETTER(name, name)
CHECKED_INT_GETTER(type, type)
CHECKED_INT_GETTER(lo, lo)
CHECKED_INT_GETTER(hi, hi)

static PyObject *CheckedInt_get_direct(CheckedIntObject *self, void *c)
{
    (void)c;
    return PyBool_FromLong(self->direct && direct_enabled);
}

static PyGetSetDef CheckedInt_getset[] = {
    {"__doc__", (getter)CheckedInt_get_doc, NULL, NULL, NULL},
    {"field", (getter)CheckedInt_get_field, NULL, "the raw ctypes field", NULL},
    {"owner", (getter)CheckedInt_get_owner, NULL, "the record class", NULL},
    {"name", (getter)CheckedInt_get_name, NULL, "the field's name", NULL},
    {"type", (getter)CheckedInt_get_type, NULL, "its type name (i8 ... u64)", NULL},
    {"lo", (getter)CheckedInt_get_lo, NULL, "the smallest value accepted", NULL},
    {"hi", (getter)CheckedInt_get_hi, NULL, "the largest value accepted", NULL},
    {"direct", (getter)CheckedInt_get_direct, NULL,
     "reads and checked int writes go straight to the record's bytes (else through the ctypes field)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CheckedIntType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stated.shm._native.CheckedInt",
    .tp_basicsize = sizeof(CheckedIntObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "CheckedInt(cfield, owner, name, type, lo, hi, doc=None): an integer field of the record class\n"
              "`owner` over its ctypes field `cfield`; an assignment outside [lo, hi] raises ValueError (nothing\n"
              "written).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)CheckedInt_init,
    .tp_dealloc = (destructor)CheckedInt_dealloc,
    .tp_traverse = (traverseproc)CheckedInt_traverse,
    .tp_clear = (inquiry)CheckedInt_clear,
    .tp_repr = (reprfunc)CheckedInt_repr,
    .tp_getset = CheckedInt_getset,
    .tp_descr_get = (descrgetfunc)CheckedInt_get,
    .tp_descr_set = (descrsetfunc)CheckedInt_set,
};

/* direct_field_access(on=None) -> bool: whether CheckedInt fields take the direct path (tests turn it
 * off to run the CField path; it cannot be turned on when the layout check failed) */
static PyObject *mod_direct_field_access(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    (void)m;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "direct_field_access(on=None)");
        return NULL;
    }
    if (nargs == 1 && args[0] != Py_None) {
        int on = PyObject_IsTrue(args[0]);
        if (on < 0)
            return NULL;
        direct_enabled = on;
    }
    return PyBool_FromLong(direct_enabled && direct_layout_ok);
}

/* ==== write sections' `with`: no allocation per statement (issue 11) =====================================
 *
 * CPython's `with s as p:` looks __enter__ and __exit__ up on the type and binds each to `s`
 * (_PyObject_LookupSpecial): for a method defined in C that is a new builtin-method object per lookup,
 * allocated, GC-tracked and freed again on every `with` (two per statement). Here the type's __enter__
 * and __exit__ are SectionMethod descriptors whose __get__ hands out the section's own bound callable
 * (SectionBound), made on first use and kept in the section: a `with` then costs two reference count
 * changes instead of two allocations. The bound callables refer to their section and it to them; the
 * Core breaks that cycle when it drops a section it cached (free(), forget(), close():
 * section_drop_bound), and the GC collects the rest (sections of Core.section()). Called, they
 * are the methods they replace: Section_enter (no arguments) and Section_exit (any positional ones). The
 * descriptors are callable too, as unbound methods (Section.__enter__(s); contextlib.ExitStack). */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    SectionObject *section;         /* strong */
    int is_exit;
} SectionBoundObject;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int is_exit;
} SectionMethodObject;

static PyTypeObject SectionBoundType, SectionMethodType;

static const char *const section_method_name[2] = {"__enter__", "__exit__"};

/* the call itself: enter takes no arguments (like METH_NOARGS), exit any positional ones (METH_FASTCALL) */
static PyObject *section_call(SectionObject *s, int is_exit, Py_ssize_t nargs, PyObject *kwnames)
{
    if (kwnames && PyTuple_GET_SIZE(kwnames)) {
        PyErr_Format(PyExc_TypeError, "Section.%s() takes no keyword arguments", section_method_name[is_exit]);
        return NULL;
    }
    if (is_exit)
        return Section_exit(s, NULL, 0);
    if (nargs) {
        PyErr_Format(PyExc_TypeError, "Section.__enter__() takes no arguments (%zd given)", nargs);
        return NULL;
    }
    return Section_enter(s, NULL);
}

static PyObject *SectionBound_vectorcall(SectionBoundObject *self, PyObject *const *args, size_t nargsf,
                                         PyObject *kwnames)
{
    (void)args;
    return section_call(self->section, self->is_exit, PyVectorcall_NARGS(nargsf), kwnames);
}

static int SectionBound_traverse(SectionBoundObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->section);
    return 0;
}

static int SectionBound_clear(SectionBoundObject *self)
{
    Py_CLEAR(self->section);
    return 0;
}

static void SectionBound_dealloc(SectionBoundObject *self)
{
    PyObject_GC_UnTrack(self);
    SectionBound_clear(self);
    PyObject_GC_Del(self);
}

static PyObject *SectionBound_repr(SectionBoundObject *self)
{
    return PyUnicode_FromFormat("<bound method Section.%s of %R>", section_method_name[self->is_exit],
                                self->section ? (PyObject *)self->section : Py_None);
}

static PyTypeObject SectionBoundType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stated.shm._native.SectionBound",
    .tp_basicsize = sizeof(SectionBoundObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "a Section's __enter__ or __exit__, bound to it (made once per section)",
    .tp_vectorcall_offset = offsetof(SectionBoundObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_dealloc = (destructor)SectionBound_dealloc,
    .tp_traverse = (traverseproc)SectionBound_traverse,
    .tp_clear = (inquiry)SectionBound_clear,
    .tp_repr = (reprfunc)SectionBound_repr,
};

/* Section.__enter__ / __exit__ looked up on a section: its bound callable, made on the first lookup */
static PyObject *SectionMethod_get(SectionMethodObject *self, PyObject *obj, PyObject *type)
{
    (void)type;
    if (obj == NULL || obj == Py_None)
        return Py_NewRef((PyObject *)self);
    if (!Py_IS_TYPE(obj, &SectionType)) {
        PyErr_Format(PyExc_TypeError, "Section.%s does not apply to a '%.100s' object",
                     section_method_name[self->is_exit], Py_TYPE(obj)->tp_name);
        return NULL;
    }
    SectionObject *s = (SectionObject *)obj;
    PyObject *b = s->bound[self->is_exit];
    if (b)
        return Py_NewRef(b);
    SectionBoundObject *nb = PyObject_GC_New(SectionBoundObject, &SectionBoundType);
    if (!nb)
        return NULL;
    nb->vectorcall = (vectorcallfunc)SectionBound_vectorcall;
    nb->section = (SectionObject *)Py_NewRef(obj);
    nb->is_exit = self->is_exit;
    PyObject_GC_Track(nb);
    s->bound[self->is_exit] = Py_NewRef((PyObject *)nb);
    return (PyObject *)nb;
}

/* Section.__enter__(s) / Section.__exit__(s, *exc): the unbound form */
static PyObject *SectionMethod_vectorcall(SectionMethodObject *self, PyObject *const *args, size_t nargsf,
                                          PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1 || !Py_IS_TYPE(args[0], &SectionType)) {
        PyErr_Format(PyExc_TypeError, "Section.%s() needs a Section as its first argument",
                     section_method_name[self->is_exit]);
        return NULL;
    }
    return section_call((SectionObject *)args[0], self->is_exit, nargs - 1, kwnames);
}

static PyObject *SectionMethod_repr(SectionMethodObject *self)
{
    return PyUnicode_FromFormat("<method '%s' of 'stated.shm._native.Section' objects>",
                                section_method_name[self->is_exit]);
}

static PyTypeObject SectionMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stated.shm._native.SectionMethod",
    .tp_basicsize = sizeof(SectionMethodObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Section.__enter__ / Section.__exit__ (bound once per section)",
    .tp_vectorcall_offset = offsetof(SectionMethodObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_repr = (reprfunc)SectionMethod_repr,
    .tp_descr_get = (descrgetfunc)SectionMethod_get,
};

/* after PyType_Ready(&SectionType): its __enter__ and __exit__ */
static int install_section_methods(void)
{
    if (PyType_Ready(&SectionBoundType) < 0 || PyType_Ready(&SectionMethodType) < 0)
        return -1;
    for (int i = 0; i < 2; i++) {
        SectionMethodObject *m = PyObject_New(SectionMethodObject, &SectionMethodType);
        if (!m)
            return -1;
        m->vectorcall = (vectorcallfunc)SectionMethod_vectorcall;
        m->is_exit = i;
        int r = PyDict_SetItemString(SectionType.tp_dict, section_method_name[i], (PyObject *)m);
        Py_DECREF(m);
        if (r < 0)
            return -1;
    }
    PyType_Modified(&SectionType);
    return 0;
}

/* ---- module --------------------------------------------------------------------------------------------- */
static PyObject *mod_strerror(PyObject *m, PyObject *arg)
{
    (void)m;
    long rc = PyLong_AsLong(arg);
    if (rc == -1 && PyErr_Occurred())
        return NULL;
    return PyUnicode_FromString(stated_strerror((int)rc));
}

static PyMethodDef module_methods[] = {
    {"strerror", mod_strerror, METH_O, "strerror(code) -> text of a STATED_ERR_* code"},
    {"direct_field_access", (PyCFunction)(void (*)(void))mod_direct_field_access, METH_FASTCALL,
     "direct_field_access(on=None) -> bool: record views' integer fields read/write their bytes directly"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "stated.shm._native", MODULE_DOC, -1, module_methods, NULL, NULL, NULL, NULL,
};

static int store_codec_add(PyObject *m);     /* the store's section, at the end of this file */

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&CoreType) < 0 || PyType_Ready(&SectionType) < 0)
        return NULL;
    if (PyType_Ready(&CheckedIntType) < 0 || install_section_methods() < 0 || direct_layout_check() < 0)
        return NULL;
    if (load_errors() < 0)
        return NULL;
    empty_tuple = PyTuple_New(0);
    PyObject *logging = PyImport_ImportModule("logging");
    if (!logging || !empty_tuple)
        return NULL;
    logger = PyObject_CallMethod(logging, "getLogger", "s", "stated.native");
    Py_DECREF(logging);
    if (!logger)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Core", (PyObject *)&CoreType) < 0
        || PyModule_AddObjectRef(m, "Section", (PyObject *)&SectionType) < 0
        || PyModule_AddObjectRef(m, "CheckedInt", (PyObject *)&CheckedIntType) < 0
        || PyModule_AddIntConstant(m, "COUNTER_COUNT", STATED_COUNTER_COUNT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (store_codec_add(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

/* ================================================================================================= */
/* ==== The database store's flush path (issue 12): dirty marks, record copies, binary COPY rows ==== */
/* ================================================================================================= */
/* Nothing above refers to this section except PyInit__native, which calls store_codec_add(); the
 * section uses the Core object and the error classes defined above. Python side:
 * stated/persist/store/schema.py (the column plan, copy_data), stated/shm/marks.py (harvest, marked,
 * count_marked) and stated/persist/store/flush.py (store_copy, store_settle).
 *
 * CopyPlan(columns, record_size, layout_hash)
 *     columns: one (offset, stated_type, count, is_array, sql_type) per field, in the SQL table's column
 *     order: offset of the field in the record, its stated element type ("i8" ... "u64", "f32", "f64",
 *     "bool", "str", "bytes"), its element count (str/bytes: N bytes), whether it is an array, and the
 *     SQL base type it is stored as ("smallint", "integer", "bigint", "numeric(20,0)", "real",
 *     "double precision", "boolean", "text", "bytea"). A pair that could not hold every value of the
 *     field (u16 -> smallint, f64 -> real, ...) is refused with ValueError, as is a field outside the
 *     record. layout_hash: the text of the layout_hash column (ASCII, at most 64 bytes).
 *   encode(rows, epochs, counter) -> bytes
 *     One complete COPY ... (FORMAT binary) payload: header, one tuple per row, trailer. A row is a
 *     tuple whose items 3 and 4 are the entity (int, u64) and the record's bytes (record_size long):
 *     flush.py's Item. Columns: entity (bigint, the u64 as two's complement), version (bigint:
 *     epochs[entity] << 32 | counter; an epoch is 0..2^31-1, a counter 0..2^32-1), layout_hash (text),
 *     then the fields. KeyError for an entity missing from epochs; TypeError/ValueError/OverflowError
 *     for a malformed row (nothing is half-written: the payload is returned only whole).
 *
 * harvest(dirty, snap_pending, store_pending) -> int     (three writable byte columns, same length)
 * marked(column) -> list[int]                             (indexes of non-zero bytes)
 * count_marked(*columns) -> int                           (indexes where any column is non-zero)
 *     Columns are 1-D byte buffers, strided (segment.SegmentViews' slot columns, stride 32) or not.
 * store_copy(core, slots, item_type, tries) -> (items, later)   consistent record copies (seqlock)
 * store_settle(core, items) -> changed items                    store marks cleared after COMMIT
 *     (documented with their code below)
 *
 * Not a second copy of anything in Python: the row encoder, the mark loops, the store's copies and
 * settles exist only here. */

/* ---- PostgreSQL binary format facts -------------------------------------------------------------
 * COPY ... FROM STDIN (FORMAT binary), see the PostgreSQL manual "COPY: Binary Format":
 *   file header: the 11-byte signature "PGCOPY\n\377\r\n\0", an int32 flags word (0: no OIDs), an
 *   int32 header-extension length (0);
 *   each tuple: an int16 field count, then per field an int32 byte length (-1 would be NULL: stated
 *   never writes NULL, every record field has a value) and that many bytes of the type's binary
 *   "send" format;
 *   trailer: an int16 -1.
 * Every integer in the format is big-endian (network order); records are little-endian.
 * Send formats used (PostgreSQL src/backend/utils/adt: each type's send and recv functions):
 *   int2/int4/int8 ("smallint"/"integer"/"bigint"): 2/4/8 bytes, two's complement;
 *   float4/float8 ("real"/"double precision"): the IEEE 754 bits, 4/8 bytes (NaN, +-inf and -0.0 pass
 *     through unchanged: they are bits, not text);
 *   bool: 1 byte, 0 or 1 (boolrecv accepts any non-zero byte as true; stated sends 1);
 *   text: the bytes in the database encoding, no terminator (the server checks the encoding: invalid
 *     UTF-8 fails the whole COPY, and a NUL byte is never valid in text);
 *   bytea: the raw bytes;
 *   numeric: int16 ndigits, int16 weight, int16 sign (0x0000 positive, 0x4000 negative), int16
 *     dscale (digits after the decimal point: 0 for integers), then ndigits int16 base-10000 digits,
 *     most significant first; the value is sum(digit[i] * 10000^(weight - i)). Trailing zero digits
 *     may be left out (weight keeps the magnitude: 10^8 is ndigits 1, weight 2, digit 1); zero is
 *     ndigits 0, weight 0. A u64 has at most 5 base-10000 digits (2^64-1 = 1844 6744 0737 0955 1615);
 *   array (one dimension, no NULLs): int32 ndim (1), int32 flags (0: no NULL elements), int32 element
 *     type OID, then per dimension int32 length (N) and int32 lower bound (1); then per element its
 *     int32 length and its send format. The element OID must be the column's element type (array_recv
 *     refuses another): bool 16, bytea 17, int8 20, int2 21, int4 23, text 25, float4 700,
 *     float8 701, numeric 1700. */

#define PG_OID_BOOL 16u
#define PG_OID_INT8 20u
#define PG_OID_INT2 21u
#define PG_OID_INT4 23u
#define PG_OID_FLOAT4 700u
#define PG_OID_FLOAT8 701u
#define PG_OID_NUMERIC 1700u
#define PG_NUMERIC_MAX 18u              /* 8-byte numeric header + 5 digits of 2 bytes (a u64) */
#define PG_ARRAY_HEADER 20u             /* ndim, flags, element OID, length, lower bound */
#define COPY_SIGNATURE "PGCOPY\n\377\r\n"    /* + its NUL: 11 bytes */
#define COPY_HEADER_LEN 19u             /* signature 11, flags 4, extension length 4 */
#define COPY_TRAILER_LEN 2u
#define COPY_META_COLUMNS 3             /* entity, version, layout_hash */
#define LAYOUT_HASH_MAX 64

enum wire {                             /* the binary send format a column is encoded in */
    W_INT2, W_INT4, W_INT8, W_FLOAT4, W_FLOAT8, W_BOOL, W_NUMERIC, W_TEXT, W_BYTEA,
};

typedef struct {
    uint32_t offset;                    /* in the record */
    uint32_t count;                     /* elements of an array; bytes of str/bytes; 1 for a scalar */
    uint8_t src_size;                   /* bytes of one element in the record */
    uint8_t src_signed;                 /* integer source: sign-extend (i*) or zero-extend (u*, bool) */
    uint8_t wire;                       /* enum wire */
    uint8_t array;
    uint32_t elem_oid;                  /* arrays: the element type's OID */
    uint32_t max_bytes;                 /* most bytes this column adds to a tuple, its length word included */
} copy_col;

typedef struct {
    PyObject_HEAD
    copy_col *cols;
    Py_ssize_t ncols;
    Py_ssize_t record_size;
    Py_ssize_t max_tuple;               /* most bytes one tuple can take */
    char layout_hash[LAYOUT_HASH_MAX];
    uint32_t layout_hash_len;
} CopyPlanObject;

/* big-endian stores into the payload; memcpy: the payload has no alignment */
static inline unsigned char *put_be16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
    return p + 2;
}

static inline unsigned char *put_be32(unsigned char *p, uint32_t v)
{
    v = __builtin_bswap32(v);
    memcpy(p, &v, 4);
    return p + 4;
}

static inline unsigned char *put_be64(unsigned char *p, uint64_t v)
{
    v = __builtin_bswap64(v);
    memcpy(p, &v, 8);
    return p + 8;
}

/* one little-endian element of `size` bytes from the record, sign- or zero-extended to 64 bits */
static inline uint64_t load_le(const unsigned char *p, unsigned size, int sign)
{
    switch (size) {
    case 1:
        return sign ? (uint64_t)(int64_t)(int8_t)p[0] : p[0];
    case 2: {
        uint16_t v = (uint16_t)(p[0] | (uint16_t)p[1] << 8);
        return sign ? (uint64_t)(int64_t)(int16_t)v : v;
    }
    case 4: {
        uint32_t v = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        return sign ? (uint64_t)(int64_t)(int32_t)v : v;
    }
    default: {
        uint64_t v = 0;
        for (int i = 7; i >= 0; i--)
            v = v << 8 | p[i];
        return v;
    }
    }
}

/* a u64 as a binary numeric (see above), without its length word; returns the end */
static unsigned char *put_numeric(unsigned char *p, uint64_t v)
{
    uint16_t d[5];                      /* base-10000 digits, least significant first */
    int n = 0;
    while (v) {
        d[n++] = (uint16_t)(v % 10000u);
        v /= 10000u;
    }
    int low = 0;                        /* trailing zero digits left out: weight keeps the magnitude */
    while (low < n && d[low] == 0)
        low++;
    p = put_be16(p, (uint16_t)(n - low));                 /* ndigits */
    p = put_be16(p, (uint16_t)(n ? n - 1 : 0));           /* weight of the first digit */
    p = put_be16(p, 0);                                   /* sign: positive */
    p = put_be16(p, 0);                                   /* dscale: an integer */
    for (int i = n - 1; i >= low; i--)
        p = put_be16(p, d[i]);
    return p;
}

/* one element (a scalar field, or one array element) in its send format, length word first */
static inline unsigned char *put_elem(unsigned char *p, const copy_col *c, const unsigned char *src)
{
    uint64_t v;
    switch (c->wire) {
    case W_INT2:
        p = put_be32(p, 2);
        return put_be16(p, (uint16_t)load_le(src, c->src_size, c->src_signed));
    case W_INT4:
        p = put_be32(p, 4);
        return put_be32(p, (uint32_t)load_le(src, c->src_size, c->src_signed));
    case W_INT8:
        p = put_be32(p, 8);
        return put_be64(p, load_le(src, c->src_size, c->src_signed));
    case W_FLOAT4:                      /* the IEEE bits, byte-swapped: no conversion through a float */
        p = put_be32(p, 4);
        return put_be32(p, (uint32_t)load_le(src, 4, 0));
    case W_FLOAT8:
        p = put_be32(p, 8);
        return put_be64(p, load_le(src, 8, 0));
    case W_BOOL:
        p = put_be32(p, 1);
        *p = src[0] != 0;
        return p + 1;
    default: {                          /* W_NUMERIC: the length word is known once the digits are */
        v = load_le(src, c->src_size, 0);
        unsigned char *end = put_numeric(p + 4, v);
        put_be32(p, (uint32_t)(end - p - 4));
        return end;
    }
    }
}

/* Strict UTF-8 (Unicode 15, table 3-7: no overlong forms, no surrogates, nothing above U+10FFFF):
 * what PostgreSQL's pg_utf8_islegal accepts. 1 when s[0:n] is well-formed. */
static int utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t k;
        unsigned lo = 0x80, hi = 0xBF;  /* allowed range of the second byte */
        if (c >= 0xC2 && c <= 0xDF)
            k = 1;
        else if (c >= 0xE0 && c <= 0xEF) {
            k = 2;
            if (c == 0xE0)
                lo = 0xA0;              /* overlong */
            else if (c == 0xED)
                hi = 0x9F;              /* surrogates U+D800..U+DFFF */
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3;
            if (c == 0xF0)
                lo = 0x90;              /* overlong */
            else if (c == 0xF4)
                hi = 0x8F;              /* above U+10FFFF */
        } else
            return 0;
        if (n - i <= k || s[i + 1] < lo || s[i + 1] > hi)
            return 0;
        for (size_t j = 2; j <= k; j++)
            if ((s[i + j] & 0xC0) != 0x80)
                return 0;
        i += k + 1;
    }
    return 1;
}

/* str[N] -> text: the bytes up to the first NUL (NUL padding ends a string). A C writer may have
 * stored invalid UTF-8, which would fail the whole batch at the server: such a string is decoded with
 * U+FFFD replacements and then cut, at a character boundary, to at most N bytes (a replacement takes 3
 * bytes where the bad byte took 1). Returns the end, or NULL with an exception set. */
static unsigned char *put_text(unsigned char *p, const unsigned char *src, uint32_t n)
{
    const unsigned char *nul = memchr(src, 0, n);
    size_t len = nul ? (size_t)(nul - src) : n;
    if (utf8_valid(src, len)) {
        p = put_be32(p, (uint32_t)len);
        memcpy(p, src, len);
        return p + len;
    }
    PyObject *u = PyUnicode_DecodeUTF8((const char *)src, (Py_ssize_t)len, "replace");
    if (!u)
        return NULL;
    Py_ssize_t ulen;
    const char *b = PyUnicode_AsUTF8AndSize(u, &ulen);
    if (!b) {
        Py_DECREF(u);
        return NULL;
    }
    size_t m = (size_t)ulen;
    if (m > n) {
        m = n;
        while (m > 0 && ((unsigned char)b[m] & 0xC0) == 0x80)   /* b[m] starts the first character cut */
            m--;
    }
    p = put_be32(p, (uint32_t)m);
    memcpy(p, b, m);
    Py_DECREF(u);
    return p + m;
}

/* one field of one record, length word included; NULL with an exception set (text only) */
static unsigned char *put_column(unsigned char *p, const copy_col *c, const unsigned char *rec)
{
    const unsigned char *src = rec + c->offset;
    if (c->wire == W_TEXT)
        return put_text(p, src, c->count);
    if (c->wire == W_BYTEA) {           /* all N bytes, zero padding included: bytes[N] is fixed-size */
        p = put_be32(p, c->count);
        memcpy(p, src, c->count);
        return p + c->count;
    }
    if (!c->array)
        return put_elem(p, c, src);
    unsigned char *start = p;
    p += 4;                             /* the array's length word, known at the end */
    p = put_be32(p, 1);                 /* ndim */
    p = put_be32(p, 0);                 /* flags: no NULLs */
    p = put_be32(p, c->elem_oid);
    p = put_be32(p, c->count);          /* length of the one dimension */
    p = put_be32(p, 1);                 /* its lower bound: SQL arrays count from 1 */
    for (uint32_t i = 0; i < c->count; i++)
        p = put_elem(p, c, src + (size_t)i * c->src_size);
    put_be32(start, (uint32_t)(p - start - 4));
    return p;
}

/* stated element type -> (size, signed, kind); kind: 'i' integer, 'f' float, 'b' bool, 's' str, 'y' bytes */
static const struct {
    const char *name;
    uint8_t size, sign;
    char kind;
} src_types[] = {
    {"i8", 1, 1, 'i'}, {"u8", 1, 0, 'i'}, {"i16", 2, 1, 'i'}, {"u16", 2, 0, 'i'}, {"i32", 4, 1, 'i'},
    {"u32", 4, 0, 'i'}, {"i64", 8, 1, 'i'}, {"u64", 8, 0, 'i'}, {"f32", 4, 0, 'f'}, {"f64", 8, 0, 'f'},
    {"bool", 1, 0, 'b'}, {"str", 1, 0, 's'}, {"bytes", 1, 0, 'y'},
};

/* SQL base type -> (wire format, element OID, bytes of a value) */
static const struct {
    const char *name;
    uint8_t wire;
    uint32_t oid, size;
} sql_types[] = {
    {"smallint", W_INT2, PG_OID_INT2, 2}, {"integer", W_INT4, PG_OID_INT4, 4}, {"bigint", W_INT8, PG_OID_INT8, 8},
    {"real", W_FLOAT4, PG_OID_FLOAT4, 4}, {"double precision", W_FLOAT8, PG_OID_FLOAT8, 8},
    {"boolean", W_BOOL, PG_OID_BOOL, 1}, {"numeric(20,0)", W_NUMERIC, PG_OID_NUMERIC, PG_NUMERIC_MAX},
    {"text", W_TEXT, 25u, 0}, {"bytea", W_BYTEA, 17u, 0},
};

/* can every value of the source type be sent as this SQL type, losslessly? */
static int plan_pair_ok(char kind, unsigned size, int sign, unsigned wire, uint32_t wsize)
{
    switch (kind) {
    case 'i':
        if (wire == W_NUMERIC)
            return !sign;               /* numeric carries u64 (the encoder writes non-negative numbers) */
        if (wire != W_INT2 && wire != W_INT4 && wire != W_INT8)
            return 0;
        return sign ? wsize >= size : wsize > size;    /* signed SQL ints: an unsigned needs one more bit */
    case 'f':
        return (wire == W_FLOAT4 && size == 4) || (wire == W_FLOAT8 && size == 8);
    case 'b':
        return wire == W_BOOL;
    case 's':
        return wire == W_TEXT;
    default:
        return wire == W_BYTEA;
    }
}

static int plan_column(PyObject *item, Py_ssize_t i, Py_ssize_t record_size, copy_col *c)
{
    Py_ssize_t offset, count;
    const char *stype, *sqltype;
    int is_array;
    if (!PyTuple_Check(item)
        || !PyArg_ParseTuple(item, "nsnps", &offset, &stype, &count, &is_array, &sqltype)) {
        if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "CopyPlan column %zd: expected (offset, stated_type, count, is_array, "
                         "sql_type)", i);
        }
        return -1;
    }
    size_t s = 0, q = 0;
    while (s < sizeof src_types / sizeof src_types[0] && strcmp(src_types[s].name, stype))
        s++;
    while (q < sizeof sql_types / sizeof sql_types[0] && strcmp(sql_types[q].name, sqltype))
        q++;
    if (s == sizeof src_types / sizeof src_types[0] || q == sizeof sql_types / sizeof sql_types[0]) {
        PyErr_Format(PyExc_ValueError, "CopyPlan column %zd: unknown type %s or %s", i, stype, sqltype);
        return -1;
    }
    char kind = src_types[s].kind;
    unsigned size = src_types[s].size;
    if (!plan_pair_ok(kind, size, src_types[s].sign, sql_types[q].wire, sql_types[q].size)) {
        PyErr_Format(PyExc_ValueError, "CopyPlan column %zd: %s cannot be stored as %s without loss", i, stype,
                     sqltype);
        return -1;
    }
    if (count < 1 || count > (1 << 24) || ((kind == 's' || kind == 'y') && is_array)
        || (!is_array && kind != 's' && kind != 'y' && count != 1)
        || offset < 0 || offset > record_size || count * (Py_ssize_t)size > record_size - offset) {
        PyErr_Format(PyExc_ValueError, "CopyPlan column %zd: %zd x %s at offset %zd%s does not fit a %zd-byte record",
                     i, count, stype, offset, is_array ? " (array)" : "", record_size);
        return -1;
    }
    c->offset = (uint32_t)offset;
    c->count = (uint32_t)count;
    c->src_size = (uint8_t)size;
    c->src_signed = src_types[s].sign;
    c->wire = sql_types[q].wire;
    c->array = (uint8_t)is_array;
    c->elem_oid = sql_types[q].oid;
    uint32_t elem = 4 + sql_types[q].size;                 /* length word + value */
    if (kind == 's' || kind == 'y')
        c->max_bytes = 4 + (uint32_t)count;
    else if (is_array)
        c->max_bytes = 4 + PG_ARRAY_HEADER + (uint32_t)count * elem;
    else
        c->max_bytes = elem;
    return 0;
}

static int CopyPlan_init(CopyPlanObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"columns", "record_size", "layout_hash", NULL};
    PyObject *columns;
    Py_ssize_t record_size;
    const char *lh;
    Py_ssize_t lh_len;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Ons#", kwlist, &columns, &record_size, &lh, &lh_len))
        return -1;
    if (record_size < 1 || record_size > (1 << 24)) {
        PyErr_Format(PyExc_ValueError, "record_size %zd is out of range", record_size);
        return -1;
    }
    if (lh_len > LAYOUT_HASH_MAX || !utf8_valid((const unsigned char *)lh, (size_t)lh_len)
        || memchr(lh, 0, (size_t)lh_len)) {
        PyErr_SetString(PyExc_ValueError, "layout_hash must be text of at most 64 bytes");
        return -1;
    }
    PyObject *seq = PySequence_Fast(columns, "CopyPlan columns must be a sequence");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > 1600 - COPY_META_COLUMNS) {  /* PostgreSQL's MaxHeapAttributeNumber */
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "%zd columns: PostgreSQL tables hold at most 1600", n + COPY_META_COLUMNS);
        return -1;
    }
    copy_col *cols = PyMem_Calloc((size_t)(n ? n : 1), sizeof *cols);
    if (!cols) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t max_tuple = 2 + 12 + 12 + 4 + lh_len;       /* field count, entity, version, layout_hash */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (plan_column(PySequence_Fast_GET_ITEM(seq, i), i, record_size, &cols[i]) < 0) {
            PyMem_Free(cols);
            Py_DECREF(seq);
            return -1;
        }
        max_tuple += cols[i].max_bytes;
    }
    Py_DECREF(seq);
    PyMem_Free(self->cols);
    self->cols = cols;
    self->ncols = n;
    self->record_size = record_size;
    self->max_tuple = max_tuple;
    memcpy(self->layout_hash, lh, (size_t)lh_len);
    self->layout_hash_len = (uint32_t)lh_len;
    return 0;
}

static void CopyPlan_dealloc(CopyPlanObject *self)
{
    PyMem_Free(self->cols);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *CopyPlan_encode(CopyPlanObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "encode(rows, epochs, counter)");
        return NULL;
    }
    if (!self->cols) {
        PyErr_SetString(PyExc_TypeError, "CopyPlan is not initialised");
        return NULL;
    }
    PyObject *epochs = args[1];
    if (!PyDict_Check(epochs)) {
        PyErr_SetString(PyExc_TypeError, "epochs must be a dict (entity -> epoch)");
        return NULL;
    }
    unsigned long long counter = PyLong_AsUnsignedLongLong(args[2]);
    if (counter == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (counter > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "the version counter is 32 bits");
        return NULL;
    }
    PyObject *rows = PySequence_Fast(args[0], "rows must be a sequence");
    if (!rows)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(rows);
    if (n > (PY_SSIZE_T_MAX - COPY_HEADER_LEN - COPY_TRAILER_LEN) / self->max_tuple) {
        Py_DECREF(rows);
        return PyErr_NoMemory();
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, COPY_HEADER_LEN + n * self->max_tuple + COPY_TRAILER_LEN);
    if (!out) {
        Py_DECREF(rows);
        return NULL;
    }
    unsigned char *base = (unsigned char *)PyBytes_AS_STRING(out), *p = base;
    memcpy(p, COPY_SIGNATURE, 11);      /* the literal's terminating NUL is the signature's last byte */
    p = put_be32(p + 11, 0);            /* flags */
    p = put_be32(p, 0);                 /* header extension length */
    PyObject **items = PySequence_Fast_ITEMS(rows);
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject *row = items[r];
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) < 5) {
            PyErr_Format(PyExc_TypeError, "row %zd: expected a tuple (slot, generation, seq, entity, data, ...)", r);
            goto fail;
        }
        PyObject *ent = PyTuple_GET_ITEM(row, 3), *data = PyTuple_GET_ITEM(row, 4);
        if (!PyBytes_Check(data) || PyBytes_GET_SIZE(data) != self->record_size) {
            PyErr_Format(PyExc_ValueError, "row %zd: the record must be %zd bytes", r, self->record_size);
            goto fail;
        }
        unsigned long long e = PyLong_AsUnsignedLongLong(ent);
        if (e == (unsigned long long)-1 && PyErr_Occurred())
            goto fail;
        PyObject *ep = PyDict_GetItemWithError(epochs, ent);
        if (!ep) {
            if (!PyErr_Occurred())
                PyErr_SetObject(PyExc_KeyError, ent);
            goto fail;
        }
        long long epoch = PyLong_AsLongLong(ep);
        if (epoch == -1 && PyErr_Occurred())
            goto fail;
        if (epoch < 0 || epoch > INT32_MAX) {   /* version = epoch << 32 | counter must stay a positive bigint */
            PyErr_Format(PyExc_OverflowError, "entity %llu: epoch %lld does not fit a version", e, epoch);
            goto fail;
        }
        p = put_be16(p, (uint16_t)(self->ncols + COPY_META_COLUMNS));
        p = put_be32(p, 8);
        p = put_be64(p, e);             /* entity: the u64 as a two's complement bigint */
        p = put_be32(p, 8);
        p = put_be64(p, (uint64_t)epoch << 32 | counter);
        p = put_be32(p, self->layout_hash_len);
        memcpy(p, self->layout_hash, self->layout_hash_len);
        p += self->layout_hash_len;
        const unsigned char *rec = (const unsigned char *)PyBytes_AS_STRING(data);
        for (Py_ssize_t i = 0; i < self->ncols; i++) {
            p = put_column(p, &self->cols[i], rec);
            if (!p)
                goto fail;
        }
    }
    p = put_be16(p, 0xFFFF);            /* trailer: a field count of -1 */
    Py_DECREF(rows);
    if (_PyBytes_Resize(&out, p - base) < 0)
        return NULL;
    return out;
fail:
    Py_DECREF(rows);
    Py_DECREF(out);
    return NULL;
}

static PyObject *CopyPlan_get_columns(CopyPlanObject *self, void *c)
{
    (void)c;
    return PyLong_FromSsize_t(self->ncols + COPY_META_COLUMNS);
}

static PyObject *CopyPlan_get_max_tuple(CopyPlanObject *self, void *c)
{
    (void)c;
    return PyLong_FromSsize_t(self->max_tuple);
}

static PyMethodDef CopyPlan_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))CopyPlan_encode, METH_FASTCALL,
     "encode(rows, epochs, counter) -> bytes: a binary COPY payload"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef CopyPlan_getset[] = {
    {"columns", (getter)CopyPlan_get_columns, NULL, "columns per tuple (entity, version, layout_hash, fields)", NULL},
    {"max_tuple", (getter)CopyPlan_get_max_tuple, NULL, "most bytes one tuple can take", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CopyPlanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stated.shm._native.CopyPlan",
    .tp_basicsize = sizeof(CopyPlanObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A table's column plan for PostgreSQL binary COPY; see the module source (store section).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)CopyPlan_init,
    .tp_dealloc = (destructor)CopyPlan_dealloc,
    .tp_methods = CopyPlan_methods,
    .tp_getset = CopyPlan_getset,
};

/* ---- dirty marks: the daemon's harvest and scans (format.md "Dirty marks with two consumers") ----------
 * A column is a 1-D byte buffer: one byte per slot, `stride` bytes apart (32 for the slot table). */
typedef struct {
    Py_buffer view;
    unsigned char *p;
    Py_ssize_t n, stride;
} mark_col;

static int mark_col_get(PyObject *o, mark_col *c, int writable)
{
    if (PyObject_GetBuffer(o, &c->view, PyBUF_STRIDES | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (c->view.ndim != 1 || c->view.itemsize != 1) {
        PyBuffer_Release(&c->view);
        PyErr_SetString(PyExc_TypeError, "a mark column is a 1-D buffer of bytes");
        return -1;
    }
    c->p = c->view.buf;
    c->n = c->view.shape[0];
    c->stride = c->view.strides[0];
    return 0;
}

/* harvest(dirty, snap_pending, store_pending) -> number of marks moved
 *
 * For every slot whose `dirty` byte is non-zero: store_pending = 1, snap_pending = 1, then dirty = 0.
 * Ordering (writers: record stores, `seq` even with release, then `dirty = 1` with release):
 * - the scan's load of `dirty` is relaxed: it only selects slots; a mark it misses (set after the load)
 *   stays set for the next harvest;
 * - the two consumer marks are stored before the clear, and the clear is an atomic exchange with
 *   acquire-release ordering. Its RELEASE half keeps both consumer stores before it (for the compiler
 *   and, on a weakly ordered CPU, for every other observer): a daemon SIGKILLed anywhere in here, or the
 *   other consumer looking at the slot, finds the change marked in `dirty` or in both pending bytes,
 *   never in neither;
 * - a writer's `dirty = 1` racing with the clear either comes after the exchange in the byte's
 *   modification order (the slot stays dirty for the next harvest) or is the value the exchange reads:
 *   then the exchange's ACQUIRE half synchronises with that release store, so the writer's record
 *   stores are visible to every copy this thread makes afterwards (the store's seqlock copy, the
 *   saver's capture). A plain store of 0 would not do, even on x86-64: the store could sit in the
 *   store buffer while the copy's loads go ahead, and land after a writer's 1, losing that write
 *   from both consumers;
 * - the exchange's result is not needed: a byte cleared meanwhile (a harvest in another thread of this
 *   daemon: the GIL is held here, so only between calls) costs one extra write, never a lost one.
 * The GIL is held throughout: a harvest in the saver thread and one on the event loop never interleave. */
static PyObject *mod_harvest(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    (void)m;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "harvest(dirty, snap_pending, store_pending)");
        return NULL;
    }
    mark_col c[3];
    int got = 0;
    for (; got < 3; got++)
        if (mark_col_get(args[got], &c[got], 1) < 0)
            goto done;
    if (c[1].n != c[0].n || c[2].n != c[0].n) {
        PyErr_SetString(PyExc_ValueError, "harvest: the three columns differ in length");
        goto done;
    }
    Py_ssize_t moved = 0;
    unsigned char *d = c[0].p, *snap = c[1].p, *store = c[2].p;
    for (Py_ssize_t i = 0; i < c[0].n; i++, d += c[0].stride, snap += c[1].stride, store += c[2].stride) {
        if (!__atomic_load_n(d, __ATOMIC_RELAXED))
            continue;
        __atomic_store_n(store, (unsigned char)1, __ATOMIC_RELAXED);
        __atomic_store_n(snap, (unsigned char)1, __ATOMIC_RELAXED);
        (void)__atomic_exchange_n(d, (unsigned char)0, __ATOMIC_ACQ_REL);
        moved++;
    }
    for (int k = 0; k < 3; k++)
        PyBuffer_Release(&c[k].view);
    return PyLong_FromSsize_t(moved);
done:
    for (int k = 0; k < got; k++)
        PyBuffer_Release(&c[k].view);
    return NULL;
}

/* marked(column) -> indexes of the non-zero bytes, ascending. Any non-zero value is a mark (a
 * scribbled 2 errs towards one extra write). Relaxed loads: the caller copies each selected record
 * under its seqlock (acquire on `seq`), which is what orders the record's bytes. */
static PyObject *mod_marked(PyObject *m, PyObject *arg)
{
    (void)m;
    mark_col c;
    if (mark_col_get(arg, &c, 0) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    const unsigned char *p = c.p;
    for (Py_ssize_t i = 0; out && i < c.n; i++, p += c.stride) {
        if (!__atomic_load_n(p, __ATOMIC_RELAXED))
            continue;
        PyObject *v = PyLong_FromSsize_t(i);
        if (!v || PyList_Append(out, v) < 0)
            Py_CLEAR(out);
        Py_XDECREF(v);
    }
    PyBuffer_Release(&c.view);
    return out;
}

/* count_marked(*columns) -> how many indexes have a non-zero byte in any of the columns */
static PyObject *mod_count_marked(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    (void)m;
    if (nargs < 1 || nargs > 8) {
        PyErr_SetString(PyExc_TypeError, "count_marked(*columns): 1 to 8 columns");
        return NULL;
    }
    mark_col c[8];
    Py_ssize_t got = 0, count = 0;
    for (; got < nargs; got++)
        if (mark_col_get(args[got], &c[got], 0) < 0)
            goto done;
    for (Py_ssize_t k = 1; k < nargs; k++)
        if (c[k].n != c[0].n) {
            PyErr_SetString(PyExc_ValueError, "count_marked: the columns differ in length");
            goto done;
        }
    for (Py_ssize_t i = 0; i < c[0].n; i++)
        for (Py_ssize_t k = 0; k < nargs; k++)
            if (__atomic_load_n(c[k].p + i * c[k].stride, __ATOMIC_RELAXED)) {
                count++;
                break;
            }
    for (Py_ssize_t k = 0; k < got; k++)
        PyBuffer_Release(&c[k].view);
    return PyLong_FromSsize_t(count);
done:
    for (Py_ssize_t k = 0; k < got; k++)
        PyBuffer_Release(&c[k].view);
    return NULL;
}

/* ---- the store's record copies: consistent copies out of the segment, and the settle after COMMIT ----
 * store_copy(core, slots, item_type, tries) -> (items, later)
 *     A consistent copy of each slot's record (format.md "Record seqlock"): item_type(slot, generation,
 *     seq, entity, data, pinned) per slot copied (item_type: a tuple subclass, flush.py's Item); entity
 *     -1 for an allocated slot without one; a freed slot (a free marks the slot) is copied under the
 *     entity it last had; pinned only for an allocated slot. `later`: slots still mid-write (or changed
 *     under every copy) after `tries` rounds: left for the next pass.
 * store_settle(core, items) -> list of the items that changed
 *     After COMMIT: clears store_pending of each item's slot whose seq, generation and record bytes are
 *     still what was copied; returns the others (their marks stay: what the database lacks is newer).
 * SlotOutOfRange for a slot outside the table, StatedError on a closed core. */

/* one consistent copy of `slot` into `out`; 0 when consistent, else -1 (retry)
 *
 * Reader protocol: seq with ACQUIRE (an allocated slot with an odd seq is inside a write section:
 * retry); state with ACQUIRE (alloc and free store it with release after the generation, and alloc
 * after the entity, flags and record initialiser: an allocated state read here makes those visible);
 * generation, entity, flags, pinned and the record (relaxed); an ACQUIRE fence; then seq, generation
 * and state again. Unchanged means one allocation and no write section overlapped the copy: a writer's
 * section stores `seq` odd and then fences (release) before its field stores, and alloc bumps the
 * generation and fences (release) before its initialiser stores, so a copy that read any of those
 * stores sees the odd seq or the new generation on its re-check.
 * Known limit (as before in Python): a freed slot being allocated again at this very moment (between
 * the alloc's generation bump and its state store, ~100 ns) can read as a consistent freed copy whose
 * generation is already the new one and whose record is partly the initialiser; nothing in the slot
 * marks an allocation in progress without the table lock. */
static int store_copy_one(stated_table *t, uint32_t slot, unsigned char *out, uint32_t *gen, uint32_t *seq,
                          uint8_t *state, uint8_t *flags, uint64_t *entity, uint8_t *pinned)
{
    const struct stated_slot *s = &t->slots[slot];
    uint32_t q = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
    uint8_t st = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
    if ((q & 1u) && st == STATED_SLOT_ALLOCATED)
        return -1;
    uint32_t g = __atomic_load_n(&s->generation, __ATOMIC_RELAXED);
    *flags = __atomic_load_n(&s->flags, __ATOMIC_RELAXED);
    *entity = __atomic_load_n(&s->entity, __ATOMIC_RELAXED);
    *pinned = __atomic_load_n(&s->pinned, __ATOMIC_RELAXED);
    memcpy(out, t->records + (size_t)slot * t->record_size, t->record_size);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (__atomic_load_n(&s->seq, __ATOMIC_RELAXED) != q || __atomic_load_n(&s->generation, __ATOMIC_RELAXED) != g
        || __atomic_load_n(&s->state, __ATOMIC_RELAXED) != st)
        return -1;
    *gen = g;
    *seq = q;
    *state = st;
    return 0;
}

static CoreObject *store_core(PyObject *o)
{
    if (!PyObject_TypeCheck(o, &CoreType)) {
        PyErr_SetString(PyExc_TypeError, "expected a stated.shm._native.Core");
        return NULL;
    }
    CoreObject *c = (CoreObject *)o;
    if (!c->have_view) {
        PyErr_Format(E_Stated, "table '%s' is closed; attach again", c->t.name);
        return NULL;
    }
    return c;
}

/* a slot number from Python, checked against the table */
static int store_slot(CoreObject *c, PyObject *o, uint32_t *slot)
{
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v >= (long long)c->t.capacity) {
        PyErr_Format(E_Range, "table '%s': slot %lld is outside [0, %u)", c->t.name, v, c->t.capacity);
        return -1;
    }
    *slot = (uint32_t)v;
    return 0;
}

static PyObject *store_item(PyTypeObject *type, uint32_t slot, uint32_t gen, uint32_t seq, int64_t entity,
                            uint64_t uentity, PyObject *data, int pinned)
{
    PyObject *it = type->tp_alloc(type, 6);
    if (!it) {
        Py_DECREF(data);
        return NULL;
    }
    PyObject *v[6] = {PyLong_FromUnsignedLong(slot), PyLong_FromUnsignedLong(gen), PyLong_FromUnsignedLong(seq),
                      entity < 0 ? PyLong_FromLong(-1) : PyLong_FromUnsignedLongLong(uentity), data,
                      Py_NewRef(pinned ? Py_True : Py_False)};
    int ok = 1;
    for (int i = 0; i < 6; i++) {
        if (!v[i])
            ok = 0;
        PyTuple_SET_ITEM(it, i, v[i]);   /* a NULL item is fine for the dealloc below */
    }
    if (!ok) {
        Py_DECREF(it);
        return NULL;
    }
    return it;
}

#define STORE_MAX_TRIES 64

static PyObject *mod_store_copy(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    (void)m;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "store_copy(core, slots, item_type, tries)");
        return NULL;
    }
    CoreObject *c = store_core(args[0]);
    if (!c)
        return NULL;
    if (!PyType_Check(args[2]) || !PyType_IsSubtype((PyTypeObject *)args[2], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "item_type must be a tuple subclass");
        return NULL;
    }
    PyTypeObject *type = (PyTypeObject *)args[2];
    long tries = PyLong_AsLong(args[3]);
    if (tries == -1 && PyErr_Occurred())
        return NULL;
    if (tries < 1 || tries > STORE_MAX_TRIES) {
        PyErr_Format(PyExc_ValueError, "tries must be 1..%d", STORE_MAX_TRIES);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[1], "slots must be a sequence of slot numbers");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **in = PySequence_Fast_ITEMS(seq);
    PyObject *items = PyList_New(0), *later = PyList_New(0), *retry = NULL, *out = NULL;
    stated_table *t = &c->t;
    if (!items || !later)
        goto done;
    /* round 1 over every slot, then up to tries - 1 more rounds over the ones mid-write, yielding the
     * CPU between rounds (a writer in another process may be waiting for it to finish its section) */
    Py_ssize_t todo_n = n;
    PyObject **todo_in = in;
    for (long round = 0; round < tries && todo_n; round++) {
        PyObject *again = PyList_New(0);
        if (!again)
            goto done;
        if (round)
            sched_yield();
        for (Py_ssize_t i = 0; i < todo_n; i++) {
            uint32_t slot, gen, sq;
            uint8_t st, fl, pin;
            uint64_t ent;
            if (store_slot(c, todo_in[i], &slot) < 0) {
                Py_DECREF(again);
                goto done;
            }
            PyObject *data = PyBytes_FromStringAndSize(NULL, t->record_size);
            if (!data) {
                Py_DECREF(again);
                goto done;
            }
            if (store_copy_one(t, slot, (unsigned char *)PyBytes_AS_STRING(data), &gen, &sq, &st, &fl, &ent,
                               &pin) < 0) {
                Py_DECREF(data);
                if (PyList_Append(again, todo_in[i]) < 0) {
                    Py_DECREF(again);
                    goto done;
                }
                continue;
            }
            int allocated = st == STATED_SLOT_ALLOCATED;
            int no_entity = allocated && !(fl & STATED_FLAG_HAS_ENTITY);
            PyObject *it = store_item(type, slot, gen, sq, no_entity ? -1 : 0, ent, data, allocated && pin);
            if (!it || PyList_Append(items, it) < 0) {
                Py_XDECREF(it);
                Py_DECREF(again);
                goto done;
            }
            Py_DECREF(it);
        }
        Py_XSETREF(retry, again);
        todo_n = PyList_GET_SIZE(retry);
        todo_in = PySequence_Fast_ITEMS(retry);
    }
    if (retry && PyList_SetSlice(later, 0, 0, retry) < 0)
        goto done;
    out = PyTuple_Pack(2, items, later);
done:
    Py_XDECREF(retry);
    Py_XDECREF(items);
    Py_XDECREF(later);
    Py_DECREF(seq);
    return out;
}

/* Settle after COMMIT. The compare and the clear happen with the GIL held: the saver thread's harvest
 * (the only other writer of store_pending, in this process) cannot set the mark between them and have
 * it cleared by us. A writer's later change is never hidden by the clear: its mark is `dirty`, which
 * is not touched here (the next harvest moves it). The clear is relaxed: only this daemon reads the
 * byte, and the GIL orders its threads. */
static PyObject *mod_store_settle(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    (void)m;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "store_settle(core, items)");
        return NULL;
    }
    CoreObject *c = store_core(args[0]);
    if (!c)
        return NULL;
    if (c->t.readonly) {
        PyErr_Format(E_ReadOnly, "table '%s' is attached read-only", c->t.name);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[1], "items must be a sequence");
    if (!seq)
        return NULL;
    PyObject *changed = PyList_New(0);
    stated_table *t = &c->t;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **in = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; changed && i < n; i++) {
        PyObject *it = in[i];
        uint32_t slot;
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) < 5 || !PyBytes_Check(PyTuple_GET_ITEM(it, 4))
            || PyBytes_GET_SIZE(PyTuple_GET_ITEM(it, 4)) != (Py_ssize_t)t->record_size) {
            PyErr_Format(PyExc_TypeError, "item %zd: expected (slot, generation, seq, entity, data, ...) with "
                         "%u bytes of data", i, t->record_size);
            Py_CLEAR(changed);
            break;
        }
        unsigned long gen = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(it, 1));
        unsigned long sq = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(it, 2));
        if (PyErr_Occurred() || store_slot(c, PyTuple_GET_ITEM(it, 0), &slot) < 0) {
            Py_CLEAR(changed);
            break;
        }
        struct stated_slot *s = &t->slots[slot];
        const unsigned char *rec = t->records + (size_t)slot * t->record_size;
        if (__atomic_load_n(&s->seq, __ATOMIC_ACQUIRE) == sq && __atomic_load_n(&s->generation, __ATOMIC_RELAXED) == gen
            && !memcmp(rec, PyBytes_AS_STRING(PyTuple_GET_ITEM(it, 4)), t->record_size)) {
            __atomic_store_n(&s->store_pending, (uint8_t)0, __ATOMIC_RELAXED);
            continue;
        }
        if (PyList_Append(changed, it) < 0)
            Py_CLEAR(changed);
    }
    Py_DECREF(seq);
    return changed;
}

static PyMethodDef store_methods[] = {
    {"harvest", (PyCFunction)(void (*)(void))mod_harvest, METH_FASTCALL,
     "harvest(dirty, snap_pending, store_pending) -> marks moved (dirty -> both pending marks)"},
    {"marked", mod_marked, METH_O, "marked(column) -> indexes of non-zero bytes"},
    {"count_marked", (PyCFunction)(void (*)(void))mod_count_marked, METH_FASTCALL,
     "count_marked(*columns) -> indexes with a non-zero byte in any column"},
    {"store_copy", (PyCFunction)(void (*)(void))mod_store_copy, METH_FASTCALL,
     "store_copy(core, slots, item_type, tries) -> (items, later): consistent record copies"},
    {"store_settle", (PyCFunction)(void (*)(void))mod_store_settle, METH_FASTCALL,
     "store_settle(core, items) -> items changed since their copy (the others' store marks cleared)"},
    {NULL, NULL, 0, NULL},
};

static int store_codec_add(PyObject *m)
{
    if (PyType_Ready(&CopyPlanType) < 0 || PyModule_AddFunctions(m, store_methods) < 0)
        return -1;
    return PyModule_AddObjectRef(m, "CopyPlan", (PyObject *)&CopyPlanType);
}
