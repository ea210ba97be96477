/* stated_common.inc.h: the format's C helpers (validation, record access, seqlock), pasted by
 * `stated header` into the format section of every generated header. Not a standalone header. */
/* ---- RULES FOR C CODE ----------------------------------------------------------------
 *
 * 1. Validate before trusting anything: stated_validate(base, shm_size) (structure,
 *    crc, size, state) and stated_<table>_check(base) (magic, version, layout hash and
 *    record size compiled into this header). shm_size is shm_segsz from
 *    shmctl(IPC_STAT). A non-zero result means: do not read the segment.
 * 2. Slots and records: slot i's record is at records_offset + i * record_size. Use a
 *    slot only when stated_slot.state == STATED_SLOT_ALLOCATED, and remember its
 *    generation: it changes on free and on reuse.
 * 3. Writing: a C writer must only write slots its owner owns (stated_slot.owner equals
 *    its owner index, see stated_owner_find) - never another worker's slots. Bracket
 *    writes with stated_write_begin()/stated_write_end() (seqlock; write_end sets
 *    dirty = 1), or, for single aligned scalar stores outside a section, call
 *    stated_mark_dirty() after writing. A write that leaves dirty = 0 may be missing
 *    from the next snapshot (and lost on a restore).
 * 4. Do not nest write sections, and keep them short: readers spin while seq is odd;
 *    a writer that dies mid-section leaves seq odd until the owner re-attaches or
 *    the slot is freed (Python readers then raise TornRecord).
 * 5. Allocation, free, owner claims and the entity index belong to the allocator:
 *    use the native core at the end of this header (stated_open, stated_alloc,
 *    stated_free, stated_lookup, ...: compiled in the one translation unit that
 *    defines STATED_IMPLEMENTATION), or the Python API. Never mutate allocator state
 *    (slot states, free stack, index, owners) by hand.
 * 6. Reading: stated_read_begin()/stated_read_retry() around a copy give a consistent
 *    record (see stated_read_record for the full loop with generation and state
 *    checks). Fields written by Python through live views (table.record(h)) are plain
 *    stores outside any section: each aligned scalar <= 8 bytes is atomic, a whole
 *    record is not.
 * 7. str[N] fields are UTF-8, NUL-padded, and NOT NUL-terminated when N bytes long:
 *    print with "%.*s" and strnlen-like loops. bytes[N] are raw. bool is 0 or 1.
 * 8. Memory ordering: these helpers use __atomic builtins and are correct on any CPU.
 *    Python goes through the same native core (write sections, reads, lookups, alloc and
 *    free are fenced); only its live views (table.record(h)) make plain stores
 *    (docs/format.md, "Memory ordering").
 * ------------------------------------------------------------------------------------ */

/* ---- segment-level helpers ----------------------------------------------------------- */
static inline struct stated_segment_header *stated_header(void *base)
{
    return (struct stated_segment_header *)base;
}

static inline struct stated_slot *stated_slot_at(void *base, uint32_t slot)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    return (struct stated_slot *)((unsigned char *)base + h->slots_offset + (size_t)slot * STATED_SLOT_SIZE);
}

/* owner index 1..STATED_OWNERS_CAPACITY (as stored in stated_slot.owner) */
static inline struct stated_owner *stated_owner_at(void *base, uint32_t owner_index)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    return (struct stated_owner *)((unsigned char *)base + h->owners_offset
                                   + (size_t)(owner_index - 1u) * STATED_OWNER_SIZE);
}

static inline struct stated_index_entry *stated_index_at(void *base, uint32_t entry)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    return (struct stated_index_entry *)((unsigned char *)base + h->index_offset
                                         + (size_t)entry * STATED_INDEX_ENTRY_SIZE);
}

/* zlib-compatible CRC-32 (IEEE 802.3, reflected, init/xorout 0xFFFFFFFF); chain with crc = 0 first */
static inline uint32_t stated_crc32(uint32_t crc, const void *data, size_t len)
{
    const unsigned char *p = (const unsigned char *)data;
    crc = ~crc;
    while (len--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static inline uint64_t stated_round_up(uint64_t n, uint64_t a)
{
    return (n + a - 1u) / a * a;
}

/* index_capacity for a capacity: the power of two >= 2 * capacity, at least 16 */
static inline uint64_t stated_index_capacity_for(uint64_t capacity)
{
    unsigned bits = 0;
    for (uint64_t v = 2u * capacity - 1u; v; v >>= 1)
        bits++;
    if (bits < 4u)
        bits = 4u;
    return (uint64_t)1 << bits;
}

/* Structural validation of a segment of `size` bytes (shm_segsz); 0 or STATED_ERR_*.
 * Applies every rule of docs/format.md "Validation" except decoding the schema blob
 * (the per-table layout hash check stands in for it). */
static inline int stated_validate(const void *base, size_t size)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    const unsigned char *b = (const unsigned char *)base;
    if (size < STATED_SCHEMA_OFFSET)
        return STATED_ERR_SIZE;
    if (memcmp(h->magic, STATED_MAGIC, 8) != 0)
        return STATED_ERR_MAGIC;
    if (h->format_version != STATED_FORMAT_VERSION)
        return STATED_ERR_VERSION;
    if (h->schema_offset != STATED_SCHEMA_OFFSET || h->schema_size == 0u
        || h->schema_size > STATED_MAX_SCHEMA_SIZE || (uint64_t)h->schema_offset + h->schema_size > size)
        return STATED_ERR_REGIONS;
    uint32_t crc = stated_crc32(0u, b, STATED_HEADER_FIXED_SIZE);
    crc = stated_crc32(crc, b + h->schema_offset, h->schema_size);
    if (crc != h->header_crc)
        return STATED_ERR_CRC;
    uint64_t cap = h->capacity;
    if (cap < 1u || cap > STATED_MAX_CAPACITY || h->record_size == 0u || h->record_size % 8u != 0u
        || h->slot_size != STATED_SLOT_SIZE)
        return STATED_ERR_REGIONS;
    uint64_t owners = stated_round_up((uint64_t)STATED_SCHEMA_OFFSET + h->schema_size, 64u);
    uint64_t header_size = stated_round_up(owners + (uint64_t)STATED_OWNERS_CAPACITY * STATED_OWNER_SIZE,
                                           STATED_PAGE);
    uint64_t slots = header_size;
    uint64_t free_ = stated_round_up(slots + cap * STATED_SLOT_SIZE, 64u);
    uint64_t index = stated_round_up(free_ + cap * 4u, 64u);
    uint64_t icap = stated_index_capacity_for(cap);
    uint64_t records = stated_round_up(index + icap * STATED_INDEX_ENTRY_SIZE, STATED_PAGE);
    uint64_t total = records + cap * h->record_size;
    if (h->owners_offset != owners || h->owners_capacity != STATED_OWNERS_CAPACITY
        || h->header_size != header_size || h->slots_offset != slots || h->free_offset != free_
        || h->index_offset != index || h->index_capacity != icap || h->records_offset != records
        || h->total_size != total)
        return STATED_ERR_REGIONS;
    if (total != size)
        return STATED_ERR_SIZE;
    if (__atomic_load_n(&h->state, __ATOMIC_ACQUIRE) != STATED_STATE_READY)
        return STATED_ERR_STATE;
    return STATED_OK;
}

static inline const char *stated_strerror(int code)
{
    switch (code) {
    case STATED_OK: return "ok";
@ERRORS@
    default: return "unknown error";
    }
}

/* Owner index (1..255) of the owner entry named `name`, or 0 when there is none.
 * A plain read of the owner table: the allocator lock holder may change it meanwhile. */
static inline uint32_t stated_owner_find(void *base, const char *name)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    size_t n = strlen(name);
    if (n == 0u || n > STATED_OWNER_NAME_MAX)
        return 0u;
    for (uint32_t k = 1; k <= h->owners_capacity && k <= STATED_OWNERS_CAPACITY; k++) {
        const struct stated_owner *o = stated_owner_at(base, k);
        if (o->state != STATED_OWNER_EMPTY && memcmp(o->name, name, n) == 0
            && (n == STATED_OWNER_NAME_MAX || o->name[n] == '\0'))
            return k;
    }
    return 0u;
}

/* ---- record seqlock ----------------------------------------------------------------------
 * Writer (only the slot's owner):            Reader (anyone):
 *   stated_write_begin(s);                      do { seq = stated_read_begin(s);
 *   ... store fields ...                             copy the record;
 *   stated_write_end(s);   (sets dirty = 1)      } while (stated_read_retry(s, seq));
 * A reader must also compare s->generation before and after (stated_read_record does),
 * because alloc and free change the slot without touching seq. */
static inline void stated_write_begin(struct stated_slot *s)
{
    uint32_t seq = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);
    /* even -> odd; an odd seq left by a writer that died mid-section is moved on to the next odd */
    __atomic_store_n(&s->seq, (seq + 1u) | 1u, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);   /* seq is odd before any field store is visible */
}

static inline void stated_write_end(struct stated_slot *s)
{
    uint32_t seq = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);
    __atomic_store_n(&s->seq, seq + 1u, __ATOMIC_RELEASE);   /* field stores are visible before seq */
    __atomic_store_n(&s->dirty, (uint8_t)1, __ATOMIC_RELEASE);
}

/* after plain stores outside a write section */
static inline void stated_mark_dirty(struct stated_slot *s)
{
    __atomic_store_n(&s->dirty, (uint8_t)1, __ATOMIC_RELEASE);
}

static inline uint32_t stated_read_begin(const struct stated_slot *s)
{
    return __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
}

/* true when the copy made since stated_read_begin() returned `seq` must be discarded */
static inline bool stated_read_retry(const struct stated_slot *s, uint32_t seq)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);   /* the copy's loads complete before seq is re-read */
    return (seq & 1u) != 0u || __atomic_load_n(&s->seq, __ATOMIC_RELAXED) != seq;
}

/* Consistent copy of slot `slot`'s record (record_size bytes) into `out`.
 * Returns 0 (and *generation when non-NULL), STATED_ERR_RANGE, STATED_ERR_FREE (not
 * allocated), STATED_ERR_RECORD_SIZE, or STATED_ERR_TORN after max_tries attempts. */
static inline int stated_read_record(void *base, uint32_t slot, void *out, size_t record_size,
                                     uint32_t *generation, uint32_t max_tries)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    if (slot >= h->capacity)
        return STATED_ERR_RANGE;
    if (record_size != h->record_size)
        return STATED_ERR_RECORD_SIZE;
    const struct stated_slot *s = stated_slot_at(base, slot);
    const unsigned char *rec = (const unsigned char *)base + h->records_offset + (size_t)slot * record_size;
    for (uint32_t i = 0; i < max_tries; i++) {
        uint32_t seq = stated_read_begin(s);
        uint32_t gen = __atomic_load_n(&s->generation, __ATOMIC_ACQUIRE);
        if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != STATED_SLOT_ALLOCATED)
            return STATED_ERR_FREE;
        if (seq & 1u)
            continue;
        memcpy(out, rec, record_size);
        if (stated_read_retry(s, seq) || __atomic_load_n(&s->generation, __ATOMIC_RELAXED) != gen)
            continue;
        if (generation)
            *generation = gen;
        return STATED_OK;
    }
    return STATED_ERR_TORN;
}

/* Home entry of an entity: ((entity * STATED_HASH_MUL) mod 2^64) >> (64 - log2(index_capacity)) */
static inline uint64_t stated_index_home(uint64_t entity, uint64_t index_capacity)
{
    unsigned bits = 0;
    while (((uint64_t)1 << bits) < index_capacity)
        bits++;
    return (entity * STATED_HASH_MUL) >> (64u - bits);
}

/* Lock-free entity lookup over a mapped segment (the index seqlock of docs/format.md), for
 * readers that do not use the core's stated_lookup(stated_table *, ...). 0 and *slot (and
 * *generation) when found, STATED_ERR_NOT_FOUND, or STATED_ERR_TORN when the index kept
 * changing for max_tries attempts (the core then takes the lock; a reader may simply retry). */
static inline int stated_index_lookup(void *base, uint64_t entity, uint32_t *slot, uint32_t *generation,
                                uint32_t max_tries)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    uint64_t icap = h->index_capacity, mask = icap - 1u;
    for (uint32_t t = 0; t < max_tries; t++) {
        uint32_t seq = __atomic_load_n(&h->alloc.index_seq, __ATOMIC_ACQUIRE);
        if (seq & 1u)
            continue;
        int64_t found = -1;
        uint64_t e = stated_index_home(entity, icap);
        for (uint64_t n = 0; n < icap; n++, e = (e + 1u) & mask) {
            const struct stated_index_entry *ie = stated_index_at(base, (uint32_t)e);
            uint32_t sp1 = __atomic_load_n(&ie->slot_plus_one, __ATOMIC_RELAXED);
            if (sp1 == 0u)
                break;
            if (__atomic_load_n(&ie->entity, __ATOMIC_RELAXED) == entity) {
                found = (int64_t)sp1 - 1;
                break;
            }
        }
        uint32_t gen = 0;
        bool ok = false;
        if (found >= 0 && (uint64_t)found < h->capacity) {
            const struct stated_slot *s = stated_slot_at(base, (uint32_t)found);
            gen = __atomic_load_n(&s->generation, __ATOMIC_ACQUIRE);
            ok = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == STATED_SLOT_ALLOCATED
                 && (__atomic_load_n(&s->flags, __ATOMIC_RELAXED) & STATED_FLAG_HAS_ENTITY)
                 && __atomic_load_n(&s->entity, __ATOMIC_RELAXED) == entity;
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&h->alloc.index_seq, __ATOMIC_RELAXED) != seq)
            continue;
        if (found < 0)
            return STATED_ERR_NOT_FOUND;
        if (!ok)
            continue;   /* index and slot table disagree for a moment (mid-free): look again */
        if (slot)
            *slot = (uint32_t)found;
        if (generation)
            *generation = gen;
        return STATED_OK;
    }
    return STATED_ERR_TORN;
}
