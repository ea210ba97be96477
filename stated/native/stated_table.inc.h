/* stated_table.inc.h: per-table accessors; `stated header` pastes this once per table with
 * @T@ replaced by the table name and @U@ by its upper-case name. Not a standalone header. */
static inline struct stated_@T@ *stated_@T@_at(void *base, uint32_t slot)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    return (struct stated_@T@ *)((unsigned char *)base + h->records_offset
                                 + (size_t)slot * STATED_@U@_RECORD_SIZE);
}

static inline struct stated_slot *stated_@T@_slot(void *base, uint32_t slot)
{
    return stated_slot_at(base, slot);
}

/* 0 when the segment at `base` holds this table's layout; STATED_ERR_MAGIC,
 * STATED_ERR_VERSION, STATED_ERR_LAYOUT or STATED_ERR_RECORD_SIZE otherwise.
 * Call stated_validate(base, shm_size) as well to check structure, crc and state. */
static inline int stated_@T@_check(const void *base)
{
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    if (memcmp(h->magic, STATED_MAGIC, 8) != 0)
        return STATED_ERR_MAGIC;
    if (h->format_version != STATED_FORMAT_VERSION)
        return STATED_ERR_VERSION;
    if (h->layout_hash != STATED_@U@_LAYOUT_HASH)
        return STATED_ERR_LAYOUT;
    if (h->record_size != STATED_@U@_RECORD_SIZE)
        return STATED_ERR_RECORD_SIZE;
    return STATED_OK;
}

/* Attach this table with the native core (key, layout hash and field defaults compiled in);
 * owner NULL: read-only observer. See stated_open_ex. */
static inline int stated_open_@T@(const char *owner, stated_table *t)
{
    stated_options o;
    stated_options_init(&o);
    o.name = "@T@";
    o.layout_hash = STATED_@U@_LAYOUT_HASH;
    o.init = stated_@T@_defaults();
    return stated_open_ex((stated_key_t)STATED_@U@_KEY, owner, &o, t);
}

/* consistent copy of one record; see stated_read_record */
static inline int stated_@T@_read(void *base, uint32_t slot, struct stated_@T@ *out, uint32_t *generation,
                                  uint32_t max_tries)
{
    return stated_read_record(base, slot, out, sizeof *out, generation, max_tries);
}
