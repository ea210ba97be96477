/* c_worker.c: a C game worker on the `players` table of a running stated.
 *
 * Build (from the repository root):
 *
 *     stated header --config config/stated.toml > examples/stated_tables.h
 *     cc -std=c11 -Wall -Wextra -O2 -o examples/c_worker examples/c_worker.c
 *
 * or `make -C examples`. Regenerate stated_tables.h whenever the schema changes: the
 * layout hash check refuses a segment created from another schema.
 *
 * Run it while the daemon is up, as a user in the daemon's group:
 *
 *     ./examples/c_worker                  list every player (read-only observer)
 *     ./examples/c_worker --play c-zone 6  as owner "c-zone": log in 6 players, write, free half
 *
 * Listing attaches read-only by the key compiled into the header (STATED_PLAYERS_KEY),
 * validates the segment (size, checksum, region placement, state, layout hash and record
 * size), then prints name/level/hp of every allocated slot, each copied under the record
 * seqlock so no record is ever printed half-written.
 *
 * --play uses the native core that `stated header` appends (this file defines
 * STATED_IMPLEMENTATION, so the core is compiled here): stated_open_players attaches as a named
 * owner (a restarted worker gets its slots back), stated_alloc/stated_lookup/stated_free go
 * through the table's allocator (semaphore, intent mark, repair: the same code Python uses),
 * and records are written inside stated_begin/stated_end write sections (seqlock, dirty mark).
 */
#define _XOPEN_SOURCE 700
#define STATED_IMPLEMENTATION   /* this translation unit compiles the native core */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/shm.h>

#include "stated_tables.h"

#define READ_TRIES 1000000u   /* attempts before giving up on a record whose writer died mid-write */

/* Log in `n` players (entity 1000000 + i) as owner `owner`, write them in write sections, read
 * them back consistently, then log out (free) every odd one. A player already there (this owner
 * ran before and was restarted) is found with stated_lookup instead of allocated again. */
static int play(const char *owner, int n)
{
    stated_table t;
    int rc = stated_open_players(owner, &t);
    if (rc != STATED_OK) {
        fprintf(stderr, "players: %s\n", stated_errmsg(&t));
        return 2;
    }
    for (int i = 0; i < n; i++) {
        uint64_t entity = 1000000u + (uint64_t)i;
        stated_handle h;
        rc = stated_lookup(&t, entity, &h);
        if (rc == STATED_ERR_NOT_FOUND)
            rc = stated_alloc(&t, entity, &h);            /* the record starts at the field defaults */
        struct stated_players *p = NULL;
        if (rc == STATED_OK)
            rc = stated_begin(&t, h, (void **)&p);
        if (rc != STATED_OK) {
            fprintf(stderr, "players: entity %llu: %s\n", (unsigned long long)entity, stated_errmsg(&t));
            stated_close(&t);
            return 3;
        }
        snprintf(p->name, sizeof p->name, "c-player-%d", i);
        p->level = (uint16_t)(10 + i);
        p->hp -= i;                                       /* from its default, 100 */
        p->gold = 1000u * (uint64_t)i;
        stated_end(&t, h);                                /* seq even again, slot marked dirty */
        struct stated_players copy;
        rc = stated_read(&t, h, &copy, sizeof copy);      /* consistent copy, as another process would */
        if (rc != STATED_OK) {
            fprintf(stderr, "players: read: %s\n", stated_errmsg(&t));
            stated_close(&t);
            return 3;
        }
        printf("login slot=%u entity=%llu name=%.*s level=%u hp=%d\n", h.slot, (unsigned long long)entity,
               (int)strnlen(copy.name, sizeof copy.name), copy.name, (unsigned)copy.level, (int)copy.hp);
        if (i % 2 == 1 && (rc = stated_free(&t, h)) != STATED_OK) {
            fprintf(stderr, "players: free: %s\n", stated_errmsg(&t));
            stated_close(&t);
            return 3;
        }
    }
    printf("used=%u\n", (unsigned)t.hdr->alloc.used);
    stated_close(&t);                                     /* owner marked detached; its slots stay */
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "--play") == 0) {
        if (argc < 4) {
            fprintf(stderr, "usage: c_worker --play OWNER N\n");
            return 64;
        }
        return play(argv[2], atoi(argv[3]));
    }
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
