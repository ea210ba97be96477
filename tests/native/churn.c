/* A C worker for the mixed SIGKILL torture: `churn KEY OWNER SEED` allocates (entities 1..499),
 * writes a tag (its pid) into the record inside a write section, reads it back, and frees, until
 * killed. Slots inherited from a killed predecessor under the same owner name are freed but not
 * checked. A tag that is not ours on a slot we allocated means two processes hold one slot:
 * "VIOLATION" on stderr, exit 3. Any other unexpected error: exit 4. Prints "ready" once it has
 * attached. */
#define _GNU_SOURCE
#define STATED_IMPLEMENTATION
#include "stated_core.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define MAX_MINE 40

static uint64_t rng;

static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void die(stated_table *t, int code, const char *what, int rc)
{
    fprintf(stderr, "churn pid %d: %s: %s (%s)\n", (int)getpid(), what, stated_strerror(rc), stated_errmsg(t));
    exit(code);
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: churn KEY OWNER SEED\n");
        return 2;
    }
    stated_key_t key = (stated_key_t)strtol(argv[1], NULL, 0);
    rng = strtoull(argv[3], NULL, 0) * 2654435761u + 1u;
    stated_options o;
    stated_options_init(&o);
    o.lock_timeout = 10.0;
    stated_table t;
    int rc = stated_open_ex(key, argv[2], &o, &t);
    if (rc)
        die(&t, 4, "open", rc);
    const uint64_t tag = (uint64_t)getpid();
    stated_handle mine[MAX_MINE];
    int tagged[MAX_MINE];
    int n = 0;
    for (uint32_t s = 0; s < t.capacity && n < MAX_MINE; s++)    /* take over the predecessor's slots */
        if (t.slots[s].state == STATED_SLOT_ALLOCATED && t.slots[s].owner == t.owner) {
            mine[n].slot = s;
            mine[n].generation = t.slots[s].generation;
            tagged[n++] = 0;
        }
    printf("ready\n");
    fflush(stdout);
    unsigned char *buf = malloc(t.record_size);
    if (!buf)
        return 4;
    for (;;) {
        if (n < MAX_MINE && next_rand() % 100u < 55u) {
            stated_handle h;
            rc = stated_alloc(&t, 1u + next_rand() % 499u, &h);
            if (rc == STATED_ERR_FULL || rc == STATED_ERR_DUPLICATE) {
                if (n) {
                    int i = (int)(next_rand() % (uint64_t)n);
                    if ((rc = stated_free(&t, mine[i])) != 0)
                        die(&t, 4, "free", rc);
                    mine[i] = mine[--n];
                    tagged[i] = tagged[n];
                }
                continue;
            }
            if (rc)
                die(&t, 4, "alloc", rc);
            void *rec;
            if ((rc = stated_begin(&t, h, &rec)) != 0)
                die(&t, 4, "begin", rc);
            memcpy(rec, &tag, sizeof tag);
            memset((unsigned char *)rec + 8, (int)(tag & 0x7F), 32);   /* name */
            if ((rc = stated_end(&t, h)) != 0)
                die(&t, 4, "end", rc);
            mine[n] = h;
            tagged[n++] = 1;
        } else if (n) {
            int i = (int)(next_rand() % (uint64_t)n);
            if (tagged[i]) {
                if ((rc = stated_read(&t, mine[i], buf, t.record_size)) != 0)
                    die(&t, 4, "read", rc);
                uint64_t got;
                memcpy(&got, buf, sizeof got);
                if (got != tag) {
                    fprintf(stderr, "VIOLATION: slot %u holds tag %llu, ours is %llu\n", mine[i].slot,
                            (unsigned long long)got, (unsigned long long)tag);
                    return 3;
                }
            }
            if ((rc = stated_free(&t, mine[i])) != 0)
                die(&t, 4, "free", rc);
            mine[i] = mine[--n];
            tagged[i] = tagged[n];
        }
    }
}
