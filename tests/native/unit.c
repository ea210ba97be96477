/* Unit tests of the native core in C, on a real segment and semaphore made by the pytest fixture
 * (players layout): `unit KEY`. Prints "ok <name>" per test and "all ok"; exits 1 with the
 * failing check otherwise. Built with -Wall -Wextra -Werror -std=c11 -pedantic by gcc and clang,
 * and with ASan + UBSan (tests/test_native_core.py). */
#define _GNU_SOURCE
#define STATED_IMPLEMENTATION
#include "stated_core.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *current = "";

#define CHECK(cond)                                                                                   \
    do {                                                                                              \
        if (!(cond)) {                                                                                \
            fprintf(stderr, "FAIL %s: %s (line %d): %s\n", current, #cond, __LINE__, stated_errmsg(&t)); \
            exit(1);                                                                                  \
        }                                                                                             \
    } while (0)

#define RC(expr, want)                                                                                \
    do {                                                                                              \
        int rc_ = (int)(expr);                                                                        \
        if (rc_ != (want)) {                                                                          \
            fprintf(stderr, "FAIL %s: %s = %d (%s), want %d (line %d): %s\n", current, #expr, rc_,    \
                    stated_strerror(rc_), (want), __LINE__, stated_errmsg(&t));                       \
            exit(1);                                                                                  \
        }                                                                                             \
    } while (0)

static int count_problems(stated_table *tp)
{
    stated_acquire(tp);
    int n = stated_verify(tp, NULL, NULL);
    stated_release(tp);
    return n;
}

static void print_problem(void *ctx, const char *p)
{
    (void)ctx;
    fprintf(stderr, "  problem: %s\n", p);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int collect(void *ctx, uint32_t slot)
{
    uint32_t *n = (uint32_t *)ctx;
    (void)slot;
    (*n)++;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: unit KEY\n");
        return 2;
    }
    stated_key_t key = (stated_key_t)strtol(argv[1], NULL, 0);
    stated_table t;
    stated_handle h, h2;

    current = "open";
    RC(stated_open(key, "c-unit", &t), 0);
    CHECK(t.owner >= 1 && t.capacity == 16 && t.record_size == 200);
    CHECK(count_problems(&t) == 0);
    uint64_t *counters = t.hdr->counters;
    puts("ok open");

    current = "alloc_lookup_free";
    RC(stated_alloc(&t, 7, &h), 0);
    CHECK(h.slot == 0 && h.generation == 1);
    RC(stated_lookup(&t, 7, &h2), 0);
    CHECK(h2.slot == h.slot && h2.generation == h.generation);
    RC(stated_lookup(&t, 8, &h2), STATED_ERR_NOT_FOUND);
    RC(stated_alloc(&t, 7, &h2), STATED_ERR_DUPLICATE);
    CHECK(counters[STATED_COUNTER_ALLOC_FAILURES_DUPLICATE] == 1);
    CHECK(stated_valid(&t, h));
    RC(stated_free(&t, h), 0);
    CHECK(!stated_valid(&t, h));
    RC(stated_free(&t, h), STATED_ERR_STALE);
    RC(stated_lookup(&t, 7, &h2), STATED_ERR_NOT_FOUND);
    stated_handle out = {16, 0};
    RC(stated_free(&t, out), STATED_ERR_RANGE);
    CHECK(count_problems(&t) == 0);
    puts("ok alloc_lookup_free");

    current = "sections";
    RC(stated_alloc(&t, 9, &h), 0);
    void *rec = NULL;
    RC(stated_begin(&t, h, &rec), 0);
    CHECK(rec == stated_record(&t, h.slot));
    memset(rec, 0x5A, t.record_size);
    RC(stated_begin(&t, h, &rec), STATED_ERR_NESTED);
    RC(stated_end(&t, h), 0);
    CHECK((t.slots[h.slot].seq & 1u) == 0 && t.slots[h.slot].dirty == 1);
    unsigned char buf[200];
    RC(stated_read(&t, h, buf, sizeof buf), 0);
    CHECK(buf[0] == 0x5A && buf[199] == 0x5A);
    RC(stated_read(&t, h, buf, 8), STATED_ERR_RECORD_SIZE);
    /* a seq at the wrap: 0xFFFFFFFE -> odd 0xFFFFFFFF -> even 0 */
    t.slots[h.slot].seq = 0xFFFFFFFEu;
    RC(stated_begin(&t, h, &rec), 0);
    RC(stated_end(&t, h), 0);
    CHECK(t.slots[h.slot].seq == 0u);
    /* free inside the slot's own section: free settles the seq, end is a no-op */
    RC(stated_begin(&t, h, &rec), 0);
    RC(stated_free(&t, h), 0);
    RC(stated_end(&t, h), 0);
    CHECK((t.slots[h.slot].seq & 1u) == 0);
    RC(stated_read(&t, h, buf, sizeof buf), STATED_ERR_STALE);
    CHECK(count_problems(&t) == 0);
    puts("ok sections");

    current = "full";
    stated_handle all[16];
    for (int i = 0; i < 16; i++)
        RC(stated_alloc_anon(&t, &all[i]), 0);
    RC(stated_alloc_anon(&t, &h), STATED_ERR_FULL);
    CHECK(counters[STATED_COUNTER_ALLOC_FAILURES_FULL] == 1);
    for (int i = 0; i < 16; i++)
        RC(stated_free(&t, all[i]), 0);
    CHECK(t.hdr->alloc.used == 0 && count_problems(&t) == 0);
    puts("ok full");

    current = "scribbles";
    uint64_t rebuilds = counters[STATED_COUNTER_REBUILDS];
    t.hdr->alloc.free_top = 0;                      /* an empty table must not look full */
    RC(stated_alloc_anon(&t, &h), 0);
    CHECK(counters[STATED_COUNTER_REBUILDS] == rebuilds + 1);
    t.hdr->alloc.free_top = 1000000;                /* beyond capacity */
    RC(stated_free(&t, h), 0);
    RC(stated_alloc_anon(&t, &h), 0);
    RC(stated_free(&t, h), 0);
    CHECK(count_problems(&t) == 0);
    /* a full index (no empty entry): insert and delete terminate, the rebuild fixes it */
    RC(stated_alloc(&t, 77, &h), 0);
    for (uint32_t e = 0; e < t.index_capacity; e++) {
        t.index[e].entity = 1000000000u + e;
        t.index[e].slot_plus_one = 1;
    }
    double t0 = now_s();
    RC(stated_alloc(&t, 78, &h2), 0);
    RC(stated_free(&t, h), 0);
    CHECK(now_s() - t0 < 2.0);
    RC(stated_lookup(&t, 78, &h), 0);
    CHECK(h.slot == h2.slot);
    RC(stated_lookup(&t, 77, &h), STATED_ERR_NOT_FOUND);
    RC(stated_free(&t, h2), 0);
    /* a phantom index entry naming a free slot never yields it */
    uint32_t home = (uint32_t)((999u * STATED_HASH_MUL) >> t.index_shift);
    t.index[home].entity = 999;
    t.index[home].slot_plus_one = 3;
    RC(stated_lookup(&t, 999, &h), STATED_ERR_NOT_FOUND);
    RC(stated_alloc(&t, 999, &h), 0);
    RC(stated_lookup(&t, 999, &h2), 0);
    CHECK(h2.slot == h.slot);
    RC(stated_free(&t, h), 0);
    /* used scribbled to 0: free still works, the audit finds and rebuilds it */
    RC(stated_alloc_anon(&t, &h), 0);
    t.hdr->alloc.used = 0;
    RC(stated_free(&t, h), 0);
    CHECK(stated_audit(&t, print_problem, NULL) > 0);
    CHECK(stated_audit(&t, NULL, NULL) == 0);
    CHECK(count_problems(&t) == 0);
    CHECK(counters[STATED_COUNTER_REBUILDS] > rebuilds + 1);
    puts("ok scribbles");

    current = "repair";
    uint64_t repairs = counters[STATED_COUNTER_LOCK_REPAIRS];
    RC(stated_alloc(&t, 5, &h), 0);
    /* a holder that died mid-alloc: intent set, the free stack pop not done */
    t.hdr->alloc.intent_op = STATED_INTENT_ALLOC;
    t.hdr->alloc.intent_slot = h.slot;
    t.hdr->alloc.intent_count = counters[STATED_COUNTER_ALLOCATIONS] - 1u;
    t.hdr->alloc.intent_pid = 0x7FFFFFF0u;          /* no such process */
    t.hdr->alloc.free_top += 1u;
    CHECK(stated_intent_pending(&t));
    RC(stated_free(&t, h), 0);                      /* acquiring repairs first */
    CHECK(counters[STATED_COUNTER_LOCK_REPAIRS] == repairs + 1);
    CHECK(count_problems(&t) == 0);
    /* the index seq at the wrap during a repair */
    RC(stated_alloc(&t, 1, &h), 0);
    t.hdr->alloc.index_seq = 0xFFFFFFFFu;
    t.hdr->alloc.intent_op = STATED_INTENT_ALLOC;
    t.hdr->alloc.intent_slot = 1000;
    t.hdr->alloc.intent_pid = 0x7FFFFFF0u;
    RC(stated_alloc(&t, 2, &h2), 0);
    CHECK((t.hdr->alloc.index_seq & 1u) == 0);
    RC(stated_lookup(&t, 2, &h), 0);
    RC(stated_free(&t, h), 0);
    RC(stated_lookup(&t, 1, &h), 0);
    RC(stated_free(&t, h), 0);
    /* counters wrap at 2^64 */
    counters[STATED_COUNTER_ALLOCATIONS] = UINT64_MAX;
    counters[STATED_COUNTER_FREES] = UINT64_MAX;
    RC(stated_alloc_anon(&t, &h), 0);
    RC(stated_free(&t, h), 0);
    CHECK(counters[STATED_COUNTER_ALLOCATIONS] == 0 && counters[STATED_COUNTER_FREES] == 0);
    CHECK(count_problems(&t) == 0);
    puts("ok repair");

    current = "scans";
    RC(stated_alloc(&t, 11, &h), 0);
    RC(stated_alloc(&t, 12, &h2), 0);
    uint32_t n = 0;
    CHECK(stated_scan(&t, STATED_SCAN_CHANGED | STATED_SCAN_CLEAR_DIRTY, 0, collect, &n) >= 2);
    n = 0;
    CHECK(stated_scan(&t, STATED_SCAN_CHANGED, 0, collect, &n) == 0 && n == 0);
    RC(stated_begin(&t, h2, &rec), 0);
    RC(stated_end(&t, h2), 0);
    CHECK(stated_scan(&t, STATED_SCAN_CHANGED, 0, NULL, NULL) == 1);
    t.slots[h.slot].pinned = 1;
    CHECK(stated_scan(&t, STATED_SCAN_CHANGED | STATED_SCAN_CLEAR_DIRTY, 0, NULL, NULL) == 2);
    CHECK(stated_scan(&t, STATED_SCAN_CHANGED, 0, NULL, NULL) == 1);   /* pinned stays */
    CHECK(stated_scan(&t, STATED_SCAN_ALLOCATED, 0, NULL, NULL) == 2);
    CHECK(stated_scan(&t, STATED_SCAN_OWNER, t.owner, NULL, NULL) == 2);
    CHECK(stated_scan(&t, STATED_SCAN_OWNER, t.owner + 1, NULL, NULL) == 0);
    stated_slot_copy c;
    RC(stated_copy_slot(&t, h2.slot, buf, sizeof buf, &c, 0.01), 0);
    CHECK(c.generation == h2.generation && c.state == 1 && c.entity == 12 && c.flags == 1 && !c.torn);
    t.slots[h2.slot].seq |= 1u;                     /* a writer stuck inside its section */
    RC(stated_copy_slot(&t, h2.slot, buf, sizeof buf, &c, 0.01), 0);
    CHECK(c.torn == 1);
    RC(stated_read(&t, h2, buf, sizeof buf), STATED_ERR_TORN);
    CHECK(counters[STATED_COUNTER_TORN_READS] == 1);
    RC(stated_free(&t, h2), 0);                     /* free settles the odd seq */
    RC(stated_free(&t, h), 0);
    CHECK(count_problems(&t) == 0);
    puts("ok scans");

    current = "observer";
    stated_table ro;
    RC(stated_alloc(&t, 21, &h), 0);
    if (stated_open(key, NULL, &ro) != 0) {
        fprintf(stderr, "FAIL observer open: %s\n", stated_errmsg(&ro));
        return 1;
    }
    CHECK(ro.readonly && ro.semid == -1);
    RC(stated_lookup(&ro, 21, &h2), 0);
    CHECK(h2.slot == h.slot);
    RC(stated_read(&ro, h2, buf, sizeof buf), 0);
    RC(stated_alloc_anon(&ro, &h2), STATED_ERR_READONLY);
    stated_close(&ro);
    RC(stated_free(&t, h), 0);
    puts("ok observer");

    current = "owners";
    RC(stated_alloc(&t, 31, &h), 0);
    pid_t pid = fork();
    if (pid == 0) {                                 /* a second process may not take a live owner's name */
        stated_table c2;
        int rc = stated_open(key, "c-unit", &c2);
        _exit(rc == STATED_ERR_OWNER_BUSY ? 0 : 10);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    /* a dead owner's slots: reaped only when it is not attached */
    RC(stated_reap_owner(&t, t.owner), 0);
    RC(stated_set_owner_state(&t, t.owner, STATED_OWNER_DEAD, 12345), 0);      /* not that pid */
    RC(stated_set_owner_state(&t, t.owner, STATED_OWNER_DEAD, t.pid), 1);
    uint64_t reaped = counters[STATED_COUNTER_REAPED_SLOTS];
    RC(stated_reap_owner(&t, t.owner), 1);
    CHECK(counters[STATED_COUNTER_REAPED_SLOTS] == reaped + 1 && !stated_valid(&t, h));
    uint32_t idx = 0;
    RC(stated_claim_owner(&t, "c-unit", &idx), 0);  /* re-attach */
    CHECK(idx == t.owner && t.owners[idx - 1].state == STATED_OWNER_ATTACHED);
    RC(stated_claim_owner(&t, "", &idx), STATED_ERR_INVAL);
    CHECK(count_problems(&t) == 0);
    puts("ok owners");

    current = "lock";
    int pipefd[2];
    CHECK(pipe(pipefd) == 0);
    pid = fork();
    if (pid == 0) {                                 /* holds the lock until killed */
        stated_table c3;
        stated_options o;
        stated_options_init(&o);
        if (stated_open_ex(key, "c-holder", &o, &c3) != 0 || stated_acquire(&c3) != 0)
            _exit(10);
        if (write(pipefd[1], "x", 1) != 1)
            _exit(11);
        for (;;)
            pause();
    }
    char ch;
    CHECK(read(pipefd[0], &ch, 1) == 1);
    t.lock_timeout_ns = 200000000;                  /* 0.2 s */
    uint64_t timeouts = counters[STATED_COUNTER_LOCK_TIMEOUTS];
    t0 = now_s();
    RC(stated_alloc_anon(&t, &h), STATED_ERR_LOCK_TIMEOUT);
    double took = now_s() - t0;
    CHECK(took >= 0.19 && took < 1.0);
    CHECK(counters[STATED_COUNTER_LOCK_TIMEOUTS] == timeouts + 1);
    CHECK((t.hdr->alloc.lock & ((UINT64_C(1) << STATED_LOCK_PID_BITS) - 1u)) == (uint32_t)pid);
    kill(pid, SIGKILL);                             /* the lock word still names the dead holder */
    waitpid(pid, &status, 0);
    t.lock_timeout_ns = 2000000000;
    t0 = now_s();
    RC(stated_alloc_anon(&t, &h), 0);               /* a waiter takes the word over from the dead holder */
    CHECK(now_s() - t0 < 0.1);                      /* within a sleep slice or two, not the lock timeout */
    CHECK(t.hdr->alloc.lock == 0u);
    RC(stated_free(&t, h), 0);
    close(pipefd[0]);
    close(pipefd[1]);
    CHECK(count_problems(&t) == 0);
    puts("ok lock");

    current = "close";
    uint32_t mine = t.owner;
    stated_close(&t);
    {
        stated_table *tp = &t;
        (void)tp;
    }
    RC(stated_open(key, NULL, &ro), 0);
    CHECK(ro.owners[mine - 1].state == STATED_OWNER_DETACHED);
    stated_close(&ro);
    puts("ok close");
    puts("all ok");
    return 0;
}
