/* c_worker.c: a minimal C program reading the `players` table of a running stated.
 *
 * Build (from the repository root):
 *
 *     stated header --config config/stated.toml > examples/stated_tables.h
 *     cc -std=c11 -Wall -Wextra -O2 -o examples/c_worker examples/c_worker.c
 *
 * or `make -C examples`. Regenerate stated_tables.h whenever the schema changes: the
 * layout hash check below refuses a segment created from another schema.
 *
 * Run it while the daemon is up, as a user in the daemon's group:
 *
 *     ./examples/c_worker
 *
 * It attaches read-only by the key compiled into the header (STATED_PLAYERS_KEY),
 * validates the segment (size, checksum, region placement, state, layout hash and
 * record size), then prints name/level/hp of every allocated slot, each copied under
 * the record seqlock so no record is ever printed half-written. It never writes: a C
 * program that writes records must follow the rules at the top of the header (write
 * only its own owner's slots, inside stated_write_begin/stated_write_end).
 */
#define _XOPEN_SOURCE 700

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/shm.h>

#include "stated_tables.h"

#define READ_TRIES 1000000u   /* attempts before giving up on a record whose writer died mid-write */

int main(void)
{
    int id = shmget((key_t)STATED_PLAYERS_KEY, 0, 0);
    if (id < 0) {
        fprintf(stderr, "players: no segment at key 0x%08x: %s (is the daemon running?)\n",
                (unsigned)STATED_PLAYERS_KEY, strerror(errno));
        return 1;
    }
    struct shmid_ds ds;
    if (shmctl(id, IPC_STAT, &ds) != 0) {
        fprintf(stderr, "players: shmctl(IPC_STAT): %s\n", strerror(errno));
        return 1;
    }
    void *base = shmat(id, NULL, SHM_RDONLY);
    if (base == (void *)-1) {
        fprintf(stderr, "players: shmat: %s (run in the daemon's group)\n", strerror(errno));
        return 1;
    }

    /* Validate before trusting any offset in the header. */
    int rc = stated_validate(base, ds.shm_segsz);
    if (rc == STATED_OK)
        rc = stated_players_check(base);
    if (rc != STATED_OK) {
        fprintf(stderr, "players: segment at key 0x%08x rejected: %s\n", (unsigned)STATED_PLAYERS_KEY,
                stated_strerror(rc));
        shmdt(base);
        return 2;
    }

    const struct stated_segment_header *h = stated_header(base);
    uint32_t allocated = 0;
    for (uint32_t slot = 0; slot < h->capacity; slot++) {
        const struct stated_slot *s = stated_players_slot(base, slot);
        if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != STATED_SLOT_ALLOCATED)
            continue;

        /* Seqlock read: copy, then retry if a writer was inside a write section or the
         * slot was freed/reused (generation changed) while we copied. */
        struct stated_players p;
        bool ok = false, gone = false;
        for (uint32_t t = 0; t < READ_TRIES && !ok && !gone; t++) {
            uint32_t seq = stated_read_begin(s);
            uint32_t gen = __atomic_load_n(&s->generation, __ATOMIC_ACQUIRE);
            if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != STATED_SLOT_ALLOCATED) {
                gone = true;
                break;
            }
            memcpy(&p, stated_players_at(base, slot), sizeof p);
            ok = !stated_read_retry(s, seq) && __atomic_load_n(&s->generation, __ATOMIC_RELAXED) == gen;
        }
        if (gone)
            continue;
        if (!ok) {
            printf("slot=%u <torn: its writer died mid-write>\n", slot);
            continue;
        }
        allocated++;
        /* str[N] fields are NUL-padded but not NUL-terminated when full: bound the print */
        int name_len = (int)strnlen(p.name, sizeof p.name);
        printf("slot=%u name=%.*s level=%u hp=%d\n", slot, name_len, p.name, (unsigned)p.level, (int)p.hp);
    }
    printf("allocated=%u capacity=%u\n", allocated, (unsigned)h->capacity);
    shmdt(base);
    return 0;
}
