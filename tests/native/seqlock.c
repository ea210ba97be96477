/* Two-process seqlock stress, the C side:
 *   seqlock writer KEY OWNER ENTITY      allocate ENTITY (or find it), then rewrite the whole record
 *                                        with one counter value per write section, until killed
 *   seqlock reader KEY ENTITY SECONDS    read the record for SECONDS; a copy whose 4-byte words are
 *                                        not all equal is torn. Prints "reads=N torn=M distinct=D".
 * Every word of the record holds the same u32 in a consistent copy. */
#define _GNU_SOURCE
#define STATED_IMPLEMENTATION
#include "stated_core.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: seqlock writer KEY OWNER ENTITY | reader KEY ENTITY SECONDS\n");
        return 2;
    }
    stated_key_t key = (stated_key_t)strtol(argv[2], NULL, 0);
    stated_table t;
    stated_handle h;
    int rc;
    if (strcmp(argv[1], "writer") == 0) {
        if ((rc = stated_open(key, argv[3], &t)) != 0) {
            fprintf(stderr, "open: %s\n", stated_errmsg(&t));
            return 4;
        }
        uint64_t entity = strtoull(argv[4], NULL, 0);
        if (stated_lookup(&t, entity, &h) != 0 && (rc = stated_alloc(&t, entity, &h)) != 0) {
            fprintf(stderr, "alloc: %s\n", stated_errmsg(&t));
            return 4;
        }
        uint32_t words = t.record_size / 4u;
        for (uint32_t v = 1;; v++) {
            uint32_t *rec;
            if ((rc = stated_begin(&t, h, (void **)&rec)) != 0) {
                fprintf(stderr, "begin: %s\n", stated_errmsg(&t));
                return 4;
            }
            for (uint32_t i = 0; i < words; i++)      /* word by word: a reader can only be torn by the protocol */
                __atomic_store_n(&rec[i], v, __ATOMIC_RELAXED);
            stated_end(&t, h);
            if (v == 1) {   /* ready only now: until the first section ends the record holds field defaults */
                printf("ready %u %u\n", h.slot, h.generation);
                fflush(stdout);
            }
            for (volatile int k = 0; k < 300; k++) {   /* a gap between sections, as real writers leave */
            }
        }
    }
    if ((rc = stated_open(key, NULL, &t)) != 0) {
        fprintf(stderr, "open: %s\n", stated_errmsg(&t));
        return 4;
    }
    uint64_t entity = strtoull(argv[3], NULL, 0);
    if ((rc = stated_lookup(&t, entity, &h)) != 0) {
        fprintf(stderr, "lookup: %s\n", stated_strerror(rc));
        return 4;
    }
    double end = now_s() + atof(argv[4]);
    uint32_t buf[1024];
    unsigned long long reads = 0, torn = 0, distinct = 0;
    uint32_t last = 0;
    uint32_t words = t.record_size / 4u;
    while (now_s() < end) {
        for (int k = 0; k < 256; k++) {
            rc = stated_read(&t, h, buf, sizeof buf);
            if (rc == STATED_ERR_TORN)
                continue;                 /* the writer was inside a section for read_timeout: no copy */
            if (rc) {
                fprintf(stderr, "read: %s\n", stated_errmsg(&t));
                return 4;
            }
            reads++;
            for (uint32_t i = 1; i < words; i++)
                if (buf[i] != buf[0]) {
                    torn++;
                    break;
                }
            distinct += buf[0] != last;
            last = buf[0];
        }
    }
    printf("reads=%llu torn=%llu distinct=%llu\n", reads, torn, distinct);
    return 0;
}
