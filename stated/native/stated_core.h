/* stated_core.h: the native core of stated's data plane, one C11 implementation shared by the
 * CPython extension (stated.shm._native) and by C/C++ game workers.
 *
 * stb-style: every translation unit may include this header for the declarations; exactly one
 * defines STATED_IMPLEMENTATION before including it, and that one compiles the core:
 *
 *     #define _GNU_SOURCE                 (or _XOPEN_SOURCE 700, ahead of every system header)
 *     #define STATED_IMPLEMENTATION
 *     then include "stated_tables.h"      (what `stated header` prints: format + tables + this core)
 *
 * It needs the segment-format definitions (struct stated_segment_header, stated_slot, ...,
 * STATED_* constants, stated_validate, stated_strerror) that `stated header` generates from
 * stated/format.py; on its own it includes stated_format.h, the same text checked in next to it
 * (tests/test_native_core.py checks that it is exactly what cheader generates).
 *
 * What it implements (docs/format.md is the specification; the section names below are its):
 *   - the table lock: a word in the segment taken by compare-and-swap (no system call unless
 *     someone waits), the semaphore only to sleep and wake waiters (semtimedop, one deadline across
 *     EINTR retries and a removed semaphore), a dead holder's word taken over with proof of its
 *     death, intent marks repaired;
 *   - alloc / free / reap, the entity index (insert, backward-shift delete, lock-free lookup),
 *     owner claims and states, repair and the rebuild of inconsistent state (`rebuilds`),
 *     verify and audit;
 *   - the record seqlock: write sections and a consistent read; dirty/pinned scans.
 * Every step that another process can observe without the lock uses C11-style atomics
 * (GCC/Clang __atomic builtins on naturally aligned words); the ordering argument for each is
 * written next to it and in docs/format.md, "Memory ordering".
 *
 * Return values: 0 (STATED_OK) on success, a negative STATED_ERR_* code otherwise; the text of
 * a code is stated_strerror(code), the detail of the last error of a table (names the table, key,
 * slot, pid) is stated_errmsg(t). Not thread-safe: one stated_table per thread (tables of one process
 * share its lock id; each knows whether it took the lock itself). Not across fork(): a table attached
 * before a fork is refused the lock in the child (attach again there).
 */
#ifndef STATED_CORE_H
#define STATED_CORE_H

#ifndef STATED_COMMON_FORMAT_2_H
#include "stated_format.h"
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* a SysV key (key_t is int on Linux; the implementation checks it): the declarations need no
 * POSIX headers, so they compile in strict -std=c11 */
typedef int stated_key_t;

/* A reference to one allocated record: valid while the slot keeps this generation. */
typedef struct stated_handle {
    uint32_t slot;
    uint32_t generation;
} stated_handle;

/* What a generated header knows about one table (stated_known_table(key)). */
typedef struct stated_table_info {
    const char *name;
    uint32_t key;
    uint64_t layout_hash;
    uint32_t record_size;
    const void *defaults;            /* record_size bytes: every field at its default */
} stated_table_info;

/* Embedding hooks (the CPython extension drops the GIL around blocking waits and lets Python
 * signal handlers run on EINTR). All optional. block_begin/block_end bracket every blocking
 * wait (semtimedop, a poll sleep); interrupted() is called (outside the bracket) when a wait
 * returned EINTR: non-zero aborts the call with STATED_ERR_INTERRUPTED (the lock not held). */
typedef struct stated_hooks {
    void *ctx;
    void (*block_begin)(void *ctx);
    void (*block_end)(void *ctx);
    int (*interrupted)(void *ctx);
    void (*log)(void *ctx, int level, const char *message);   /* level: STATED_LOG_* */
} stated_hooks;

#define STATED_LOG_INFO 1
#define STATED_LOG_WARNING 2
#define STATED_LOG_ERROR 3

typedef struct stated_options {
    const char *name;                /* table name for messages (NULL: the key in hex) */
    uint64_t layout_hash;            /* expected layout hash; 0 accepts any */
    const void *init;                /* record initialiser (record_size bytes); NULL: zeros */
    double lock_timeout;             /* seconds; <= 0: 2.0 */
    double read_timeout;             /* seconds a consistent read waits for a writer; <= 0: 0.1 */
    const char *proc_root;           /* NULL: "/proc" */
    int readonly;                    /* observer: SHM_RDONLY, no semaphore, no writes */
    int require_ready;               /* refuse a segment whose state word is not ready (stated_open: always) */
    uint32_t pid;                    /* 0: getpid() */
    uint32_t trust_uids[8];          /* creator uids accepted for the segment and semaphore */
    unsigned n_trust_uids;           /* 0: {0, geteuid()} */
    unsigned trust_mode;             /* permission bits allowed; 0: 0770 (no world bits) */
    stated_hooks hooks;
} stated_options;

typedef struct stated_table {
    /* set by open/attach; read them, do not write them */
    unsigned char *base;
    size_t size;
    stated_key_t key;
    int semid;                       /* -1 for observers */
    int readonly;
    int attached;                    /* the core did shmat: stated_close detaches */
    uint32_t owner;                  /* this worker's owner index 1..255, 0 = none */
    uint32_t pid;
    uint64_t start_time;             /* ours, clock ticks since boot (0 until claim) */
    uint64_t lock_id;                /* what the lock word holds while we hold it (pid | start time) */
    int held;                        /* this table took the lock (the word names the process, not the table) */
    unsigned forks;                  /* the process's fork count at attach: another one means we are a child */
    uint32_t capacity, record_size, index_capacity, index_mask;
    unsigned index_shift;            /* 64 - log2(index_capacity) */
    struct stated_segment_header *hdr;
    struct stated_slot *slots;
    uint32_t *free_stack;
    struct stated_index_entry *index;
    struct stated_owner *owners;     /* owners[k - 1] is owner index k */
    unsigned char *records;
    const unsigned char *init;
    int64_t lock_timeout_ns, read_timeout_ns;
    char proc_root[128];
    uint32_t trust_uids[8];
    unsigned n_trust_uids, trust_mode;
    stated_hooks hooks;
    int sys_errno;                   /* errno behind the last STATED_ERR_SYSTEM / PERMISSION */
    char name[64];
    char errmsg[320];
} stated_table;

/* Copy of one slot for snapshots (stated_copy_slot). */
typedef struct stated_slot_copy {
    uint32_t generation;
    uint8_t state, flags, torn;
    uint16_t owner;
    uint64_t entity;
} stated_slot_copy;

typedef void (*stated_problem_fn)(void *ctx, const char *problem);
typedef int (*stated_slot_fn)(void *ctx, uint32_t slot);

/* ---- attach ---------------------------------------------------------------------------- */
void stated_options_init(stated_options *o);
/* Attach the table at `key`: provenance (creator uid, mode), header validation (structure,
 * crc, size, ready; the layout hash against the tables compiled into a generated header), the
 * semaphore, and with `owner` non-NULL the owner claim. `owner` NULL: read-only observer. */
int stated_open(stated_key_t key, const char *owner, stated_table *t);
int stated_open_ex(stated_key_t key, const char *owner, const stated_options *o, stated_table *t);
/* Use a segment the caller mapped (the Python extension): validate the header over
 * [base, base + size) and open the semaphore (semid >= 0: use it; -1: semget(key)). */
int stated_attach(stated_table *t, void *base, size_t size, stated_key_t key, int semid,
                  const stated_options *o);
/* Mark this owner detached (its slots stay), detach what stated_open attached. */
void stated_close(stated_table *t);
const char *stated_errmsg(const stated_table *t);

/* ---- owners ------------------------------------------------------------------------------ */
int stated_claim_owner(stated_table *t, const char *name, uint32_t *index);
/* 1 changed, 0 refused (only_pid != 0 and the entry no longer names that attached pid), < 0 error */
int stated_set_owner_state(stated_table *t, uint32_t index, uint32_t state, uint32_t only_pid);
/* frees every slot of owner `index` unless it is attached; returns how many, or < 0 */
int64_t stated_reap_owner(stated_table *t, uint32_t index);

/* ---- allocation ---------------------------------------------------------------------------- */
int stated_alloc(stated_table *t, uint64_t entity, stated_handle *h);
int stated_alloc_anon(stated_table *t, stated_handle *h);             /* no entity */
/* entity NULL: none; init NULL: the table's initialiser */
int stated_alloc_ex(stated_table *t, const uint64_t *entity, const void *init, stated_handle *h);
int stated_free(stated_table *t, stated_handle h);
int stated_free_ex(stated_table *t, stated_handle h, int force);    /* force: any owner (daemon) */
/* 0 and *h, or STATED_ERR_NOT_FOUND */
int stated_lookup(stated_table *t, uint64_t entity, stated_handle *h);
int stated_valid(const stated_table *t, stated_handle h);           /* 1 valid, 0 not */

/* ---- records ------------------------------------------------------------------------------- */
void *stated_record(const stated_table *t, uint32_t slot);           /* NULL out of range */
/* Write section over a slot this owner owns: begin makes seq odd and gives the record,
 * end makes it even and marks the slot dirty. Sections do not nest. */
int stated_begin(stated_table *t, stated_handle h, void **record);
int stated_end(stated_table *t, stated_handle h);
/* Consistent copy (never torn) of the record into out[0, size); size >= record_size.
 * STATED_ERR_STALE when the slot was freed, STATED_ERR_TORN after read_timeout. */
int stated_read(stated_table *t, stated_handle h, void *out, size_t size);
int stated_mark_dirty_h(stated_table *t, stated_handle h);          /* after stores outside a section */

/* ---- the lock, repair, checks ------------------------------------------------------------------ */
int stated_acquire(stated_table *t);
int stated_release(stated_table *t);
int stated_holding(const stated_table *t);                           /* 1: the lock word names us */
int stated_clear_lock(stated_table *t, uint64_t expected);           /* the daemon's, for a stuck word */
int stated_repair(stated_table *t);                                  /* takes the lock */
int stated_repair_locked(stated_table *t);
int stated_reopen_semaphore(stated_table *t);
int stated_intent_pending(const stated_table *t);
/* Every invariant; fn(ctx, text) per problem; returns the number of problems. The caller holds
 * the lock (or is an observer and accepts a racy answer). */
int stated_verify(stated_table *t, stated_problem_fn fn, void *ctx);
/* The daemon's periodic check: without the lock, then (only if something disagrees) under it,
 * rebuilding. Returns the number of problems found (each reported to fn), or < 0. */
int stated_audit(stated_table *t, stated_problem_fn fn, void *ctx);

/* ---- scans (persistence) ------------------------------------------------------------------------ */
#define STATED_SCAN_ALLOCATED 1      /* state allocated */
#define STATED_SCAN_OWNER 2          /* allocated and owned by `owner` */
#define STATED_SCAN_CHANGED 3        /* dirty or pinned: what the next delta snapshot must hold */
#define STATED_SCAN_CLEAR_DIRTY 0x100 /* clear dirty (atomic exchange) of every slot scanned (ALLOCATED:
                                        every slot) before reporting it: a full/delta snapshot */
/* fn(ctx, slot) for each selected slot in ascending order (non-zero stops the scan and is
 * returned); returns the count selected. */
int64_t stated_scan(stated_table *t, int kind, uint32_t owner, stated_slot_fn fn, void *ctx);
/* Record + slot fields under the seqlock, waiting up to wait_s for a writer; a writer that
 * stays inside its section gives the bytes as they are with copy->torn = 1. */
int stated_copy_slot(stated_table *t, uint32_t slot, void *out, size_t size, stated_slot_copy *copy, double wait_s);

#ifdef __cplusplus
}
#endif

#endif /* STATED_CORE_H */

/* ==== STATED_IMPLEMENTATION ==== */
#if defined(STATED_IMPLEMENTATION) && !defined(STATED_CORE_IMPLEMENTED)
#define STATED_CORE_IMPLEMENTED

#if !defined(_GNU_SOURCE) && !defined(_XOPEN_SOURCE) && !(defined(_POSIX_C_SOURCE) && _POSIX_C_SOURCE >= 200809L)
#error "the stated core needs POSIX: #define _GNU_SOURCE (or _XOPEN_SOURCE 700) before the first #include"
#endif

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <time.h>
#include <unistd.h>

/* glibc declares semtimedop only under _GNU_SOURCE; the symbol is always there */
extern int semtimedop(int semid, struct sembuf *sops, size_t nsops, const struct timespec *timeout);
_Static_assert(sizeof(key_t) == sizeof(stated_key_t) && (key_t)-1 < 0, "stated_key_t must be key_t");

#define STATED__INCONSISTENT (-1000)     /* internal: shared state disagrees with the slot table */
#define STATED__POLL_NS 500000          /* 0.5 ms: the poll interval of docs/format.md */
#define STATED__SPINS 400               /* ~10-40 us of spinning before a lock wait sleeps */

static inline void stated__cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
#endif
}

/* Atomic access to shared words. RELAXED where the lock (its ACQUIRE and RELEASE compare-and-swaps
 * order everything between lock holders) or a seqlock fence orders the access; ACQUIRE/RELEASE at the
 * steps that lock-free readers synchronise with. */
#define S_LD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define S_LDA(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define S_ST(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define S_STR(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

/* ---- small helpers ---------------------------------------------------------------------------- */
static int stated__fail(stated_table *t, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int stated__fail(stated_table *t, int code, const char *fmt, ...)
{
    int n = snprintf(t->errmsg, sizeof t->errmsg, "table '%s' (key 0x%08x): ", t->name, (unsigned)t->key);
    if (n < 0 || (size_t)n >= sizeof t->errmsg)
        n = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->errmsg + n, sizeof t->errmsg - (size_t)n, fmt, ap);
    va_end(ap);
    return code;
}

static void stated__log(stated_table *t, int level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void stated__log(stated_table *t, int level, const char *fmt, ...)
{
    char msg[384];
    int n = snprintf(msg, sizeof msg, "table=%s key=%#010x pid=%u: ", t->name, (unsigned)t->key, t->pid);
    if (n < 0 || (size_t)n >= sizeof msg)
        n = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
    va_end(ap);
    if (t->hooks.log)
        t->hooks.log(t->hooks.ctx, level, msg);
    else if (level >= STATED_LOG_WARNING)
        fprintf(stderr, "stated: %s\n", msg);
}

const char *stated_errmsg(const stated_table *t)
{
    return t->errmsg[0] ? t->errmsg : "ok";
}

static int64_t stated__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t stated__unix_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void stated__block_begin(stated_table *t)
{
    if (t->hooks.block_begin)
        t->hooks.block_begin(t->hooks.ctx);
}

static void stated__block_end(stated_table *t)
{
    if (t->hooks.block_end)
        t->hooks.block_end(t->hooks.ctx);
}

/* Sleep `ns` (a poll interval). 0, or STATED_ERR_INTERRUPTED when a signal arrived and the
 * interrupted hook asks to abort. */
static int stated__sleep(stated_table *t, int64_t ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
    stated__block_begin(t);
    int rc = nanosleep(&ts, NULL);
    int e = errno;
    stated__block_end(t);
    if (rc != 0 && e == EINTR && t->hooks.interrupted && t->hooks.interrupted(t->hooks.ctx))
        return stated__fail(t, STATED_ERR_INTERRUPTED, "interrupted by a signal");
    return 0;
}

/* ---- liveness: pid + start time (/proc/<pid>/stat field 22) ----------------------------------
 * A process is called dead only with proof: kill(pid, 0) fails with ESRCH, /proc shows a zombie,
 * or the start time differs from the one recorded (a recycled pid). Anything that only stops us
 * from reading /proc (EMFILE, EACCES, hidepid) is "unknown", which every caller treats as alive:
 * freeing a live worker's slots is far worse than keeping a dead one's a little longer. The same
 * rules as stated/owners.py (Liveness). */
#define STATED__PID_MAX_LIMIT (1u << 22)    /* Linux never hands out a pid at or above this */

/* kill(pid, 0): 1 exists (EPERM: under another uid), 0 gone (ESRCH), -1 cannot tell */
static int stated__pid_exists(uint32_t pid)
{
    if (kill((pid_t)pid, 0) == 0 || errno == EPERM)
        return 1;
    return errno == ESRCH ? 0 : -1;
}

/* Read a small /proc file from `fd` into buf (NUL-terminated, at most size - 1 bytes) and close it;
 * returns the length read. EINTR is retried; any other error ends the read. */
static size_t stated__read_closing(int fd, char *buf, size_t size)
{
    size_t len = 0;
    for (;;) {
        ssize_t n = read(fd, buf + len, size - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
        if (len == size - 1)
            break;
    }
    close(fd);
    buf[len] = '\0';
    return len;
}

/* The "Threads:" count of /proc/<pid>/status; 0 if it cannot be read. A 'Z' in /proc/<pid>/stat is
 * the state of the thread-group leader only: a process whose main thread called pthread_exit shows
 * it while its other threads run on (one of them may hold the lock). A process that really exited
 * and waits to be reaped counts 1. */
static unsigned stated__threads(const stated_table *t, uint32_t pid)
{
    char path[192], buf[2048];
    snprintf(path, sizeof path, "%s/%u/status", t->proc_root, pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    (void)stated__read_closing(fd, buf, sizeof buf);
    const char *p = strstr(buf, "\nThreads:");
    if (p == NULL)
        return 0;
    p += 9;
    while (*p == ' ' || *p == '\t')
        p++;
    unsigned v = 0;
    for (int i = 0; i < 9 && *p >= '0' && *p <= '9'; i++, p++)
        v = v * 10u + (unsigned)(*p - '0');
    return v;
}

/* 1: alive, *start (and *state, its /proc state letter, when non-NULL) set; 0: dead (proven);
 * -1: unknown (never called dead for that) */
static int stated__proc_stat(const stated_table *t, uint32_t pid, uint64_t *start, char *state)
{
    if (pid == 0u || pid >= STATED__PID_MAX_LIMIT)    /* owner entries are shared memory: any u32 can be there */
        return 0;
    if (stated__pid_exists(pid) == 0)
        return 0;
    char path[192];
    snprintf(path, sizeof path, "%s/%u/stat", t->proc_root, pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        /* ENOENT/ESRCH: it exited just now, or /proc hides it (hidepid): ask kill(2) again */
        if ((errno == ENOENT || errno == ESRCH) && stated__pid_exists(pid) == 0)
            return 0;
        return -1;
    }
    char buf[1024];
    size_t len = stated__read_closing(fd, buf, sizeof buf);
    char *p = NULL;
    for (size_t i = 0; i < len; i++)      /* comm may hold spaces and ')': split after the last ')' */
        if (buf[i] == ')')
            p = buf + i;
    if (p == NULL || p[1] != ' ')
        return -1;
    p += 2;
    /* fields after comm: [0] state ... [19] starttime */
    char *fields[20];
    int nf = 0;
    while (*p && nf < 20) {
        while (*p == ' ' || *p == '\n')
            p++;
        if (!*p)
            break;
        fields[nf++] = p;
        while (*p && *p != ' ' && *p != '\n')
            p++;
    }
    if (nf < 20 || fields[19][0] < '0' || fields[19][0] > '9')
        return -1;
    if (fields[0][0] == 'X' || (fields[0][0] == 'Z' && stated__threads(t, pid) == 1))
        return 0;                          /* exited, not yet reaped by its parent */
    uint64_t v = 0;
    for (const char *q = fields[19]; *q >= '0' && *q <= '9'; q++)
        v = v * 10u + (uint64_t)(*q - '0');
    if (start)
        *start = v;
    if (state)
        *state = fields[0][0];
    return 1;
}

static int stated__proc_start(const stated_table *t, uint32_t pid, uint64_t *start)
{
    return stated__proc_stat(t, pid, start, NULL);
}

/* (pid, start_time) is not proven dead */
static int stated__alive(const stated_table *t, uint32_t pid, uint64_t start_time)
{
    uint64_t st = 0;
    int r = stated__proc_start(t, pid, &st);
    return r < 0 || (r == 1 && st == start_time);
}

/* ---- provenance --------------------------------------------------------------------------------- */
static int stated__trusted(const stated_table *t, uid_t cuid, unsigned mode)
{
    if ((mode & 0777u) & ~t->trust_mode)
        return 0;
    for (unsigned i = 0; i < t->n_trust_uids; i++)
        if (t->trust_uids[i] == (uint32_t)cuid)
            return 1;
    return 0;
}

static int stated__open_sem(stated_table *t)
{
    int id = semget(t->key, 1, 0);
    if (id < 0) {
        t->sys_errno = errno;
        if (errno == ENOENT)
            return stated__fail(t, STATED_ERR_NO_SEGMENT, "no semaphore at the key: the daemon recreates it on "
                                "its next pass (`stated run`)");
        if (errno == EACCES)
            return stated__fail(t, STATED_ERR_PERMISSION, "no permission to use its semaphore; run the worker "
                                "in the daemon's group");
        return stated__fail(t, STATED_ERR_SYSTEM, "semget: %s", strerror(errno));
    }
    struct semid_ds ds;
    union { int val; struct semid_ds *buf; unsigned short *array; } arg;
    arg.buf = &ds;
    if (semctl(id, 0, IPC_STAT, arg) != 0) {
        t->sys_errno = errno;
        if (errno == EACCES)
            return stated__fail(t, STATED_ERR_PERMISSION, "no permission to use its semaphore; run the worker "
                                "in the daemon's group");
        return stated__fail(t, STATED_ERR_SYSTEM, "semctl(IPC_STAT): %s", strerror(errno));
    }
    if (!stated__trusted(t, ds.sem_perm.cuid, ds.sem_perm.mode))
        return stated__fail(t, STATED_ERR_FOREIGN, "the semaphore (id %d) was created by uid %u with mode %04o; "
                            "stated accepts only its own or root's, with no permission beyond %04o. It may have "
                            "been planted: inspect it with `ipcs -si %d`, remove it with `ipcrm -s %d`, then "
                            "restart the daemon", id, (unsigned)ds.sem_perm.cuid, (unsigned)ds.sem_perm.mode & 0777u,
                            t->trust_mode, id, id);
    t->semid = id;
    return 0;
}

/* The semaphore was removed (ipcrm, systemd RemoveIPC=): wait, up to `deadline`, for the daemon
 * to recreate it. */
static int stated__reopen_until(stated_table *t, int64_t deadline)
{
    for (;;) {
        int rc = stated__open_sem(t);
        if (rc == 0) {
            stated__log(t, STATED_LOG_WARNING, "semaphore was removed; reopened the new one (id %d)", t->semid);
            return 0;
        }
        if (rc != STATED_ERR_NO_SEGMENT)
            return rc;
        if (stated__now_ns() > deadline)
            return stated__fail(t, STATED_ERR_LOCK_TIMEOUT, "its semaphore was removed and not recreated within "
                                "%.3gs; is the daemon running?", (double)t->lock_timeout_ns / 1e9);
        rc = stated__sleep(t, 10000000);
        if (rc)
            return rc;
    }
}

int stated_reopen_semaphore(stated_table *t)
{
    if (t->readonly)
        return stated__fail(t, STATED_ERR_READONLY, "attached read-only: no semaphore");
    return stated__reopen_until(t, stated__now_ns() + t->lock_timeout_ns);
}

/* ---- segment accessors ------------------------------------------------------------------------- */
#define SLOT(t, i) (&(t)->slots[(i)])
#define IDX(t, e) (&(t)->index[(e)])
#define A(t) (&(t)->hdr->alloc)
#define CNT(t, c) (&(t)->hdr->counters[(c)])

static void stated__bump(stated_table *t, unsigned c)
{
    /* counters are written under the lock (a plain increment would do); lock_timeouts and
     * torn_reads are bumped without it, so every bump is an atomic RMW (wraps mod 2^64) */
    __atomic_fetch_add(CNT(t, c), (uint64_t)1, __ATOMIC_RELAXED);
}

static uint32_t stated__home(const stated_table *t, uint64_t entity)
{
    return (uint32_t)((entity * STATED_HASH_MUL) >> t->index_shift);
}

void *stated_record(const stated_table *t, uint32_t slot)
{
    if (slot >= t->capacity)
        return NULL;
    return t->records + (size_t)slot * t->record_size;
}

int stated_intent_pending(const stated_table *t)
{
    return S_LDA(&t->hdr->alloc.intent_op) != 0u;
}

/* ---- the lock ----------------------------------------------------------------------------------
 * docs/format.md "Taking and releasing the lock". The lock is the 64-bit word alloc.lock: 0 when
 * free, else the holder's lock id (pid | start time << STATED_LOCK_PID_BITS) and the WAITERS bit.
 * Taken by compare-and-swap 0 -> our id and given back by compare-and-swap id -> 0: no system call
 * while nobody waits. The semaphore only puts waiters to sleep: a waiter sets WAITERS in the word
 * before it sleeps, and a release that clears a word carrying WAITERS posts one wake-up (semop +1,
 * no SEM_UNDO: a wake-up is not a lock; a spare one costs a waiter one extra look).
 * A holder that dies leaves its id in the word: no kernel gives it back. Waiters look at the
 * holder after every sleep slice and take the word over, by CAS from exactly that value, only with
 * proof that it is dead (gone, a zombie, or its pid recycled: another start time); the intent mark
 * it left is then repaired. The start time in the word is what makes a recycled pid tell. */
#define STATED__LOCK_PID_MASK ((UINT64_C(1) << STATED_LOCK_PID_BITS) - 1u)
#define STATED__LOCK_START_MASK ((UINT64_C(1) << STATED_LOCK_START_BITS) - 1u)
#define STATED__LOCK(t) (&A(t)->lock)
#define STATED__SLICE_MIN_NS 1000000    /* a sleeping waiter looks at the holder after 1 ms, */
#define STATED__SLICE_MAX_NS 16000000   /* then 2, 4, 8, 16 ms: a dead holder costs at most ~16 ms */

static uint64_t stated__lock_id(uint32_t pid, uint64_t start)
{
    return ((uint64_t)pid & STATED__LOCK_PID_MASK) | ((start & STATED__LOCK_START_MASK) << STATED_LOCK_PID_BITS);
}

static uint32_t stated__lock_pid(uint64_t w)
{
    return (uint32_t)(w & STATED__LOCK_PID_MASK);
}

/* 1: the holder named by word `w` is dead with proof; 0: alive, or we cannot tell (never taken
 * over for that). *state: its /proc state letter when alive ('T'/'t' stopped, 'D' in the kernel). */
static int stated__holder_dead(const stated_table *t, uint64_t w, char *state)
{
    uint64_t start = (w >> STATED_LOCK_PID_BITS) & STATED__LOCK_START_MASK, st = 0;
    int r = stated__proc_stat(t, stated__lock_pid(w), &st, state);
    if (r <= 0)
        return r == 0;
    /* a recycled pid; start 0 is no holder's word either (a holder knows its start time) */
    return (st & STATED__LOCK_START_MASK) != start;
}

static int stated__timeout(stated_table *t, uint64_t w, char state)
{
    stated__bump(t, STATED_COUNTER_LOCK_TIMEOUTS);
    return stated__fail(t, STATED_ERR_LOCK_TIMEOUT, "allocator lock not obtained within %.3gs; held by pid %u%s",
                        (double)t->lock_timeout_ns / 1e9, (unsigned)stated__lock_pid(w),
                        state == 'T' || state == 't' ? ", which is stopped (SIGSTOP or a debugger): continue or kill it"
                        : ". If that process is stuck, stop it: a dead holder's lock is taken over");
}

/* One wake-up for a sleeping waiter. ERANGE (32767 spare wake-ups already pending) wakes someone
 * anyway. EIDRM/EINVAL: the semaphore we opened was removed (ipcrm, RemoveIPC=); sleepers poll
 * until the daemon recreates it, then sleep on the new one (their lock wait reopens it), so the
 * wake-up they are owed goes there: look it up again (provenance checked) and post once more. A
 * process that never waits would otherwise post every wake-up to the removed id for good, and
 * each one would be lost (its sleeper woken only by its slice). Only on that error path: a
 * release normally costs one semop. The error detail of the call that released is kept. */
static void stated__wake(stated_table *t)
{
    struct sembuf sb = {0, 1, 0};
    for (int tries = 0; tries < 2; tries++) {
        int rc = -1, e = EIDRM;
        if (t->semid >= 0) {
            while ((rc = semop(t->semid, &sb, 1)) != 0 && errno == EINTR) {
            }
            e = errno;
        }
        if (rc == 0 || (e != EIDRM && e != EINVAL) || tries > 0)
            return;
        char keep[sizeof t->errmsg];
        int keep_errno = t->sys_errno;
        memcpy(keep, t->errmsg, sizeof keep);
        t->semid = -1;
        int r = stated__open_sem(t);         /* none yet (the daemon's next pass), or refused: no post */
        memcpy(t->errmsg, keep, sizeof keep);
        t->sys_errno = keep_errno;
        if (r != 0)
            return;
    }
}

static int stated__rebuild(stated_table *t, const char *why);
static int stated__settle_intent(stated_table *t);

/* The wait has lasted lock_timeout: fail, naming the holder. A live holder's word is never
 * cleared here, however long it holds: it may be stopped (SIGSTOP, a debugger) or descheduled
 * inside its section, and would resume there. A word naming a live process that is not inside
 * (copied back from an old value) is the daemon's to clear: stated_clear_lock. */
static int stated__lock_timed_out(stated_table *t, uint64_t first)
{
    uint64_t w = S_LD(STATED__LOCK(t));
    char state = 0;
    if (w != 0u)
        (void)stated__holder_dead(t, w, &state);
    return stated__timeout(t, w ? w : first, state);
}

/* The slow path of stated_acquire: the word was `cur` (not 0, or our CAS lost a race). */
static int stated__lock_wait(stated_table *t, uint64_t cur)
{
    const uint64_t me = t->lock_id;
    uint64_t *lock = STATED__LOCK(t);
    /* Spin first: a critical section lasts well under a microsecond, while a sleep costs a
     * context switch and a wake-up system call on both sides. Plain loads while it is taken (no
     * cache-line ping-pong), a CAS only when it reads free. ACQUIRE on success: pairs with the
     * previous holder's RELEASE CAS, so everything it wrote under the lock is visible to us. */
    for (int i = 0; i < STATED__SPINS; i++) {
        stated__cpu_relax();
        cur = S_LD(lock);
        if (cur == 0u && __atomic_compare_exchange_n(lock, &cur, me, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            return 0;
    }
    const int64_t deadline = stated__now_ns() + t->lock_timeout_ns;
    const uint64_t first = cur;
    int64_t slice = STATED__SLICE_MIN_NS;
    for (;;) {
        cur = S_LD(lock);
        if (cur == 0u) {
            /* Take it with WAITERS set: others may be asleep, and we cannot tell, so our release
             * must wake one. Each failed CAS means another process took or flagged the word. */
            if (__atomic_compare_exchange_n(lock, &cur, me | STATED_LOCK_WAITERS, false, __ATOMIC_ACQUIRE,
                                            __ATOMIC_RELAXED))
                return 0;
        } else if ((cur & STATED_LOCK_WAITERS) == 0u) {
            /* Flag before sleeping, by CAS from the value we saw: if the holder released in
             * between, the CAS fails and we look again; if it succeeds, the holder's release
             * CAS sees the bit and posts a wake-up, which the semaphore keeps until we take
             * it: no lost wake-up whichever of the two runs first. RELAXED: no data is published. */
            if (__atomic_compare_exchange_n(lock, &cur, cur | STATED_LOCK_WAITERS, false, __ATOMIC_RELAXED,
                                            __ATOMIC_RELAXED))
                cur |= STATED_LOCK_WAITERS;
        }
        int64_t now = stated__now_ns();
        if (now >= deadline)
            return stated__lock_timed_out(t, first);
        if (cur == 0u || (cur & STATED_LOCK_WAITERS) == 0u)
            continue;                        /* the word changed under the CAS: look again */
        int64_t ns = deadline - now < slice ? deadline - now : slice;
        struct timespec ts = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
        struct sembuf wb = {0, -1, 0};
        int rc = -1, e = EIDRM;
        if (t->semid >= 0) {
            stated__block_begin(t);
            rc = semtimedop(t->semid, &wb, 1, &ts);
            e = errno;
            stated__block_end(t);
        }
        if (rc == 0)
            continue;                        /* woken: look again */
        if (e == EAGAIN || e == EIDRM || e == EINVAL) {
            if (e != EAGAIN) {
                /* the semaphore was removed (ipcrm, RemoveIPC=): the lock does not need it; poll
                 * the slice instead, and pick up the daemon's new one when it is there */
                t->semid = -1;
                int r = stated__open_sem(t);
                if (r == STATED_ERR_FOREIGN || r == STATED_ERR_PERMISSION)
                    return r;                /* planted, or not ours to use: refused, never waited on */
                if (r != 0) {
                    t->errmsg[0] = '\0';
                    if ((r = stated__sleep(t, ns)) != 0)
                        return r;
                }
            }
            /* slept a whole slice: is the holder still there? */
            uint64_t w = S_LD(lock);
            if (w != 0u && stated__holder_dead(t, w, NULL)
                && __atomic_compare_exchange_n(lock, &w, me | STATED_LOCK_WAITERS, false, __ATOMIC_ACQUIRE,
                                               __ATOMIC_RELAXED)) {
                /* from exactly the dead holder's word: nobody else took it over meanwhile */
                stated__log(t, STATED_LOG_WARNING, "took the lock over from pid %u, which died holding it",
                            stated__lock_pid(w));
                return 0;
            }
            if (slice < STATED__SLICE_MAX_NS)
                slice *= 2;
        } else if (e == EINTR) {             /* a signal: go on with the time left, one deadline */
            if (t->hooks.interrupted && t->hooks.interrupted(t->hooks.ctx))
                return stated__fail(t, STATED_ERR_INTERRUPTED, "interrupted by a signal while waiting for the lock");
        } else if (e == EACCES) {
            t->sys_errno = e;
            return stated__fail(t, STATED_ERR_PERMISSION, "no permission to use its semaphore; run the worker in "
                                "the daemon's group");
        } else {
            t->sys_errno = e;
            return stated__fail(t, STATED_ERR_SYSTEM, "semtimedop: %s", strerror(e));
        }
    }
}

/* fork() count of this process, bumped in the child of every fork (pthread_atfork): a table
 * attached before a fork carries the parent's pid in its lock id. Used in the child, that id would
 * make a child killed inside the lock look like its live parent (no waiter takes it over), and the
 * child's release of a lock its parent held at fork time would let a third process in beside the
 * parent. A plain counter compared on each acquire: no system call (getpid() is one). The child
 * handler runs while the child has a single thread; threads it starts later see the value through
 * pthread_create. */
static unsigned stated__fork_count;
static pthread_once_t stated__atfork_once = PTHREAD_ONCE_INIT;

static void stated__in_child(void)
{
    __atomic_fetch_add(&stated__fork_count, 1u, __ATOMIC_RELAXED);
}

static void stated__register_atfork(void)
{
    (void)pthread_atfork(NULL, NULL, stated__in_child);
}

static int stated__forked(const stated_table *t)
{
    return t->forks != __atomic_load_n(&stated__fork_count, __ATOMIC_RELAXED);
}

/* Take the table lock within lock_timeout. */
int stated_acquire(stated_table *t)
{
    if (t->readonly)
        return stated__fail(t, STATED_ERR_READONLY, "attached read-only; cannot take the allocator lock");
    if (stated__forked(t))
        return stated__fail(t, STATED_ERR_SYSTEM, "attached by pid %u, before a fork(): the lock word would name "
                            "that process, not this one; attach again in the child", t->pid);
    if (t->held)
        return stated__fail(t, STATED_ERR_NESTED, "this table already holds its allocator lock (acquire() inside "
                            "acquire() ... release())");
    if (t->lock_id >> STATED_LOCK_PID_BITS == 0u)
        return stated__fail(t, STATED_ERR_SYSTEM, "cannot read our own start time from %s/%u/stat: the lock word "
                            "must name this process beyond its pid", t->proc_root, t->pid);
    /* The fast path: one CAS, no system call. ACQUIRE on success pairs with the previous holder's
     * RELEASE CAS (its writes under the lock are visible to us); RELAXED on failure: only the
     * value is looked at, and the slow path takes the word with its own ACQUIRE CAS. */
    uint64_t cur = 0u;
    if (!__atomic_compare_exchange_n(STATED__LOCK(t), &cur, t->lock_id, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        int rc = stated__lock_wait(t, cur);
        if (rc)
            return rc;
    }
    /* ours, not only the process's: another table of this process (another thread's) has the same
     * lock id, and must neither release this hold nor repair under it */
    t->held = 1;
    /* one more hold (under the lock, so a plain increment): lets a waiter tell one long hold from
     * many short ones by the same process (stated__lock_timed_out) */
    S_ST(&A(t)->lock_seq, S_LD(&A(t)->lock_seq) + 1u);
    if (S_LDA(&A(t)->intent_op) != 0u) {
        int rc = stated__settle_intent(t);
        if (rc) {
            stated_release(t);
            return rc;
        }
    }
    return 0;
}

int stated_holding(const stated_table *t)
{
    return !t->readonly && t->held && !stated__forked(t)
           && ((S_LD(STATED__LOCK(t)) ^ t->lock_id) & ~STATED_LOCK_WAITERS) == 0u;
}

/* The daemon's remedy for a word that names a live process far longer than any section lasts
 * (a word copied back from an old value; the daemon watched the word and lock_seq stay put):
 * clear it by CAS from exactly `expected`, and wake a waiter. 1 cleared; 0 not: the word changed,
 * or its holder is stopped (SIGSTOP, a debugger) or in uninterruptible sleep and may resume inside
 * its section. The next holder repairs whatever intent is left. */
int stated_clear_lock(stated_table *t, uint64_t expected)
{
    if (t->readonly || expected == 0u)
        return 0;
    char state = 0;
    if (!stated__holder_dead(t, expected, &state) && (state == 'T' || state == 't' || state == 'D'))
        return 0;                            /* stopped or in the kernel: it may resume inside its section */
    /* RELAXED: nothing of ours is published; the next holder's ACQUIRE CAS reads the word */
    if (!__atomic_compare_exchange_n(STATED__LOCK(t), &expected, 0u, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        return 0;
    stated__log(t, STATED_LOG_WARNING, "cleared a lock word naming pid %u, held without a new acquisition for far "
                "longer than any section lasts", stated__lock_pid(expected));
    if (expected & STATED_LOCK_WAITERS)
        stated__wake(t);
    return 1;
}

/* Give the lock back. An op of ours left half-done by an error is repaired first. */
int stated_release(stated_table *t)
{
    if (t->readonly || !t->held)
        return 0;                            /* not taken by this table: the word may name a sibling's hold */
    t->held = 0;
    if (stated__forked(t))
        return 0;                            /* a copy of the parent's hold, made by fork(): the parent's to give back */
    if (S_LD(&A(t)->intent_op) != 0u && S_LD(&A(t)->intent_pid) == t->pid)
        stated__rebuild(t, "an operation was interrupted by an error");
    /* RELEASE: every mutation of ours is visible before the word says free (pairs with the next
     * holder's ACQUIRE CAS). A CAS from our id, with or without WAITERS, in a loop because a waiter
     * may set WAITERS at any moment; the value it replaced tells whether to wake one. A word that
     * no longer names us (scribbled, or cleared as stuck) is left alone. Bounded: the only change
     * a waiter can make to a word naming us is setting WAITERS, once. */
    uint64_t cur = S_LD(STATED__LOCK(t));
    for (int tries = 0; tries < 4 && ((cur ^ t->lock_id) & ~STATED_LOCK_WAITERS) == 0u; tries++) {
        if (__atomic_compare_exchange_n(STATED__LOCK(t), &cur, 0u, false, __ATOMIC_RELEASE, __ATOMIC_RELAXED)) {
            if (cur & STATED_LOCK_WAITERS)
                stated__wake(t);
            return 0;
        }
    }
    stated__log(t, STATED_LOG_WARNING, "the lock word no longer named this process at release (0x%016llx)",
                (unsigned long long)cur);
    return 0;
}

/* An intent mark is set when we take the lock: its setter died mid-operation (a live one holds
 * the lock, and an op of ours left by an error was repaired at our release). Repair. */
static int stated__settle_intent(stated_table *t)
{
    uint32_t op = S_LDA(&A(t)->intent_op);
    if (op != 0u) {
        stated__log(t, STATED_LOG_WARNING, "repairing after pid %u died during op %u on slot %u",
                    S_LD(&A(t)->intent_pid), op, S_LD(&A(t)->intent_slot));
        stated_repair_locked(t);
    }
    return 0;
}

/* ---- entity index -------------------------------------------------------------------------------
 * Every probe loop is bounded by index_capacity: the index is shared memory, and an index with no
 * empty entry (scribbled) must fail, never spin under the lock. */

/* slot per the index, or -1 (not there). The caller holds the lock or checks index_seq. */
static int64_t stated__find(const stated_table *t, uint64_t entity)
{
    uint32_t e = stated__home(t, entity);
    for (uint32_t n = 0; n < t->index_capacity; n++) {
        uint32_t sp1 = S_LD(&IDX(t, e)->slot_plus_one);
        if (sp1 == 0u)
            return -1;
        if (S_LD(&IDX(t, e)->entity) == entity)
            return (int64_t)sp1 - 1;
        e = (e + 1u) & t->index_mask;
    }
    return -1;
}

static int stated__holds(const stated_table *t, int64_t slot, uint64_t entity)
{
    if (slot < 0 || (uint64_t)slot >= t->capacity)
        return 0;
    const struct stated_slot *s = SLOT(t, slot);
    return S_LD(&s->state) == STATED_SLOT_ALLOCATED && (S_LD(&s->flags) & STATED_FLAG_HAS_ENTITY)
           && S_LD(&s->entity) == entity;
}

/* find under the lock, checked against the slot table; an entry naming a free slot, a slot
 * out of range or another entity is scribbled: rebuild, then answer from the rebuilt index. */
static int64_t stated__find_checked(stated_table *t, uint64_t entity)
{
    int64_t slot = stated__find(t, entity);
    if (slot < 0)
        return -1;
    if (stated__holds(t, slot, entity))
        return slot;
    char why[128];
    snprintf(why, sizeof why, "index entry for entity %llu names slot %lld, which does not hold it",
             (unsigned long long)entity, (long long)slot);
    stated__rebuild(t, why);
    slot = stated__find(t, entity);
    return stated__holds(t, slot, entity) ? slot : -1;
}

/* Index seqlock, writer side (lock held). Odd store, then a RELEASE fence: a lock-free reader
 * that sees any entry store made after the fence also sees the odd index_seq on its re-check
 * (its ACQUIRE fence pairs with ours) and retries. */
static uint32_t stated__iseq_begin(stated_table *t)
{
    uint32_t seq = S_LD(&A(t)->index_seq);
    S_ST(&A(t)->index_seq, seq + 1u);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return seq + 1u;
}

/* even again with RELEASE: the entry stores are visible to whoever reads the new even value */
static void stated__iseq_end(stated_table *t, uint32_t odd)
{
    S_STR(&A(t)->index_seq, odd + 1u);
}

static int stated__index_insert(stated_table *t, uint64_t entity, uint32_t slot)
{
    uint32_t odd = stated__iseq_begin(t);
    uint32_t e = stated__home(t, entity);
    uint32_t n = 0;
    for (; n < t->index_capacity; n++) {
        if (S_LD(&IDX(t, e)->slot_plus_one) == 0u)
            break;
        e = (e + 1u) & t->index_mask;
    }
    if (n == t->index_capacity)
        return STATED__INCONSISTENT;     /* index_seq stays odd: the rebuild that follows evens it */
    S_ST(&IDX(t, e)->entity, entity);
    S_ST(&IDX(t, e)->slot_plus_one, slot + 1u);
    S_ST(&A(t)->index_count, S_LD(&A(t)->index_count) + 1u);
    stated__iseq_end(t, odd);
    return 0;
}

/* backward-shift deletion: keeps every probe chain unbroken without tombstones */
static int stated__index_delete(stated_table *t, uint64_t entity)
{
    uint32_t e = stated__home(t, entity), n = 0;
    for (; n < t->index_capacity; n++) {
        if (S_LD(&IDX(t, e)->slot_plus_one) == 0u)
            return 0;                    /* not there (repair will agree) */
        if (S_LD(&IDX(t, e)->entity) == entity)
            break;
        e = (e + 1u) & t->index_mask;
    }
    if (n == t->index_capacity)
        return STATED__INCONSISTENT;
    uint32_t odd = stated__iseq_begin(t);
    uint32_t hole = e, j = e;
    for (n = 0;; n++) {
        if (n == t->index_capacity)
            return STATED__INCONSISTENT;
        j = (j + 1u) & t->index_mask;
        uint32_t sp1 = S_LD(&IDX(t, j)->slot_plus_one);
        if (sp1 == 0u)
            break;
        uint64_t ent = S_LD(&IDX(t, j)->entity);
        uint32_t k = stated__home(t, ent);
        /* entry j may stay when its home k lies cyclically in (hole, j] */
        if ((hole < j && hole < k && k <= j) || (hole > j && (k > hole || k <= j)))
            continue;
        S_ST(&IDX(t, hole)->entity, ent);
        S_ST(&IDX(t, hole)->slot_plus_one, sp1);
        hole = j;
    }
    S_ST(&IDX(t, hole)->entity, (uint64_t)0);
    S_ST(&IDX(t, hole)->slot_plus_one, 0u);
    S_ST(&A(t)->index_count, S_LD(&A(t)->index_count) - 1u);
    stated__iseq_end(t, odd);
    return 0;
}

/* Lock-free lookup, docs/format.md "Entity index". Reader side of the index seqlock: ACQUIRE
 * load of index_seq, relaxed loads of the entries and of the slot, an ACQUIRE fence, relaxed
 * re-load of index_seq. Writers try 8 times, then search under the lock; observers (no lock)
 * keep trying, bounded by lock_timeout. */
int stated_lookup(stated_table *t, uint64_t entity, stated_handle *h)
{
    const uint64_t tries = t->readonly ? UINT64_MAX : 8u;
    int64_t deadline = 0;
    for (uint64_t i = 0; i < tries; i++) {
        if (i && i % 64u == 0u) {
            int64_t now = stated__now_ns();
            if (!deadline)
                deadline = now + t->lock_timeout_ns;
            else if (now > deadline)
                return stated__fail(t, STATED_ERR_LOCK_TIMEOUT, "the entity index kept changing for %.3gs (a writer "
                                    "died mid-update?); retry", (double)t->lock_timeout_ns / 1e9);
            sched_yield();
        }
        uint32_t seq = S_LDA(&A(t)->index_seq);
        if (seq & 1u)
            continue;
        int64_t slot = stated__find(t, entity);
        uint32_t gen = 0;
        int ok = 0;
        if (slot >= 0 && (uint64_t)slot < t->capacity) {
            const struct stated_slot *s = SLOT(t, slot);
            gen = S_LD(&s->generation);
            ok = S_LD(&s->state) == STATED_SLOT_ALLOCATED && (S_LD(&s->flags) & STATED_FLAG_HAS_ENTITY)
                 && S_LD(&s->entity) == entity;
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (S_LD(&A(t)->index_seq) != seq)
            continue;
        if (slot == -1)
            return STATED_ERR_NOT_FOUND;
        if (ok) {
            h->slot = (uint32_t)slot;
            h->generation = gen;
            return 0;
        }
        if (t->readonly && i >= 8u)
            return STATED_ERR_NOT_FOUND;  /* an observer cannot repair; the index disagrees with the slots */
    }
    int rc = stated_acquire(t);
    if (rc)
        return rc;
    int64_t slot = stated__find_checked(t, entity);
    if (slot >= 0) {
        h->slot = (uint32_t)slot;
        h->generation = S_LD(&SLOT(t, slot)->generation);
    }
    stated_release(t);
    return slot >= 0 ? 0 : STATED_ERR_NOT_FOUND;
}

/* ---- repair ---------------------------------------------------------------------------------------
 * Rebuilds everything derived from the slot states (docs/format.md "Repair"). Lock held. A crash
 * anywhere inside leaves intent_op = REPAIR set, so the next holder repairs again. */
int stated_repair_locked(stated_table *t)
{
    struct stated_allocator *a = A(t);
    const uint32_t cap = t->capacity;
    uint32_t op = S_LD(&a->intent_op), islot = S_LD(&a->intent_slot);
    if (islot < cap) {        /* count the interrupted op exactly once, whether or not it took effect */
        uint8_t st = S_LD(&SLOT(t, islot)->state);
        uint64_t c1 = S_LD(&a->intent_count), c2 = S_LD(&a->intent_count2);
        if (op == STATED_INTENT_ALLOC) {
            S_ST(CNT(t, STATED_COUNTER_ALLOCATIONS), c1 + (st == STATED_SLOT_ALLOCATED));
        } else if (op == STATED_INTENT_FREE || op == STATED_INTENT_REAP) {
            S_ST(CNT(t, STATED_COUNTER_FREES), c1 + (st == STATED_SLOT_FREE));
            if (op == STATED_INTENT_REAP)
                S_ST(CNT(t, STATED_COUNTER_REAPED_SLOTS), c2 + (st == STATED_SLOT_FREE));
        }
    }
    S_STR(&a->intent_op, STATED_INTENT_REPAIR);
    /* index_seq odd (|= 1) then the same RELEASE fence as an index update: lock-free lookups
     * retry until the rebuilt index is published with an even index_seq */
    uint32_t iseq = S_LD(&a->index_seq) | 1u;
    S_ST(&a->index_seq, iseq);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    for (uint32_t e = 0; e < t->index_capacity; e++) {
        S_ST(&IDX(t, e)->slot_plus_one, 0u);
        S_ST(&IDX(t, e)->entity, (uint64_t)0);
        S_ST(&IDX(t, e)->reserved, 0u);
    }
    uint32_t owner_counts[STATED_OWNERS_CAPACITY + 1];
    memset(owner_counts, 0, sizeof owner_counts);
    uint32_t nfree = 0, count = 0;
    for (uint32_t slot = cap; slot-- > 0;) {
        struct stated_slot *s = SLOT(t, slot);
        uint8_t st = S_LD(&s->state);
        if (st == STATED_SLOT_ALLOCATED) {
            uint16_t ow = S_LD(&s->owner);
            if (ow > STATED_OWNERS_CAPACITY) {
                S_ST(&s->owner, (uint16_t)0);
                ow = 0;
            }
            owner_counts[ow]++;
            if (S_LD(&s->flags) & STATED_FLAG_HAS_ENTITY) {
                uint64_t ent = S_LD(&s->entity);
                if (stated__find(t, ent) >= 0) {   /* two slots claim one entity: the first met keeps it */
                    S_ST(&s->flags, (uint8_t)0);
                    continue;
                }
                uint32_t e = stated__home(t, ent);
                /* ends: the index was cleared and holds <= capacity of >= 2 * capacity entries */
                for (uint32_t n = 0; n < t->index_capacity && S_LD(&IDX(t, e)->slot_plus_one); n++)
                    e = (e + 1u) & t->index_mask;
                S_ST(&IDX(t, e)->entity, ent);
                S_ST(&IDX(t, e)->slot_plus_one, slot + 1u);
                count++;
            }
        } else {
            if (st != STATED_SLOT_FREE)
                S_ST(&s->state, (uint8_t)STATED_SLOT_FREE);
            uint32_t seq = S_LD(&s->seq);
            if (seq & 1u)                 /* freed inside a write section: nobody writes it now */
                S_STR(&s->seq, seq + 1u);
            S_ST(&t->free_stack[nfree], slot);   /* free[0] = highest free slot, top = lowest */
            nfree++;
        }
    }
    S_ST(&a->free_top, nfree);
    S_ST(&a->used, cap - nfree);
    S_ST(&a->index_count, count);
    uint64_t allocs = S_LD(CNT(t, STATED_COUNTER_ALLOCATIONS)), frees = S_LD(CNT(t, STATED_COUNTER_FREES));
    if (allocs - frees != (uint64_t)(cap - nfree))   /* scribbled counters: keep frees, fix allocations */
        S_ST(CNT(t, STATED_COUNTER_ALLOCATIONS), frees + (cap - nfree));
    for (uint32_t k = 1; k <= STATED_OWNERS_CAPACITY; k++)
        S_ST(&t->owners[k - 1].slots, owner_counts[k]);
    stated__bump(t, STATED_COUNTER_LOCK_REPAIRS);
    S_STR(&a->index_seq, iseq + 1u);
    S_STR(&a->intent_op, 0u);
    return 0;
}

int stated_repair(stated_table *t)
{
    int rc = stated_acquire(t);
    if (rc)
        return rc;
    stated_repair_locked(t);
    stated_release(t);
    return 0;
}

/* Allocator state disagreed with the slot table (scribbled memory, or a bug): rebuild what is
 * derivable, count it (`rebuilds`) and log it. Lock held. */
static int stated__rebuild(stated_table *t, const char *why)
{
    stated__bump(t, STATED_COUNTER_REBUILDS);
    stated__log(t, STATED_LOG_ERROR, "allocator state inconsistent (%s); rebuilt free stack, entity index and "
                "counts from the slot table", why);
    return stated_repair_locked(t);
}

/* ---- intent mark -----------------------------------------------------------------------------------
 * Fields first, op LAST with RELEASE: a crash (or a reader of the mark) that sees op != 0 sees
 * the whole mark. The lock already orders it for the next holder; RELEASE also keeps the
 * compiler from sinking the field stores below op, which is what crash consistency needs
 * (a SIGKILL leaves exactly the stores before the kill in program order). */
static void stated__intent(stated_table *t, uint32_t op, uint32_t slot, uint64_t entity, uint32_t owner,
                           uint64_t count, uint64_t count2)
{
    struct stated_allocator *a = A(t);
    S_ST(&a->intent_slot, slot);
    S_ST(&a->intent_entity, entity);
    S_ST(&a->intent_owner, owner);
    S_ST(&a->intent_pid, t->pid);
    S_ST(&a->intent_count, count);
    S_ST(&a->intent_count2, count2);
    S_STR(&a->intent_op, op);
}

/* the mutation is complete: RELEASE orders every store of it before the cleared mark */
static void stated__intent_done(stated_table *t)
{
    S_STR(&A(t)->intent_op, 0u);
}

/* ---- alloc / free ------------------------------------------------------------------------------------ */
static int stated__free_top_slow(stated_table *t, uint32_t top, uint32_t *out_top, uint32_t *out_slot)
{
    uint32_t n_free = 0;
    for (uint32_t i = 0; i < t->capacity; i++)
        n_free += S_LD(&SLOT(t, i)->state) == STATED_SLOT_FREE;
    if (top || n_free) {
        char why[128];
        snprintf(why, sizeof why, "free stack (top %u) disagrees with the slot table (%u free slots)", top, n_free);
        stated__rebuild(t, why);
        top = S_LD(&A(t)->free_top);
    }
    if (top == 0u) {
        stated__bump(t, STATED_COUNTER_ALLOC_FAILURES_FULL);
        return stated__fail(t, STATED_ERR_FULL, "table is full: all %u slots are allocated. Free some, or raise "
                            "capacity in the config and migrate", t->capacity);
    }
    uint32_t slot = top <= t->capacity ? S_LD(&t->free_stack[top - 1u]) : t->capacity;
    if (slot >= t->capacity || S_LD(&SLOT(t, slot)->state) != STATED_SLOT_FREE)
        return stated__fail(t, STATED_ERR_CORRUPT, "free stack still inconsistent after repair");
    *out_top = top;
    *out_slot = slot;
    return 0;
}

static int stated__alloc_locked(stated_table *t, const uint64_t *entity, const void *init, stated_handle *h)
{
    struct stated_allocator *a = A(t);
    if (entity && stated__find_checked(t, *entity) >= 0) {
        stated__bump(t, STATED_COUNTER_ALLOC_FAILURES_DUPLICATE);
        return stated__fail(t, STATED_ERR_DUPLICATE, "entity %llu already has a slot; use lookup(%llu) to get its "
                            "handle", (unsigned long long)*entity, (unsigned long long)*entity);
    }
    uint32_t top = S_LD(&a->free_top);
    /* free_top, and the slot it names, are shared memory: bounds-checked before use */
    uint32_t slot = (top > 0u && top <= t->capacity) ? S_LD(&t->free_stack[top - 1u]) : t->capacity;
    if (slot >= t->capacity || S_LD(&SLOT(t, slot)->state) != STATED_SLOT_FREE) {
        int rc = stated__free_top_slow(t, top, &top, &slot);
        if (rc)
            return rc;
    }
    stated__intent(t, STATED_INTENT_ALLOC, slot, entity ? *entity : 0u, t->owner,
                   S_LD(CNT(t, STATED_COUNTER_ALLOCATIONS)), S_LD(&a->intent_count2));
    S_ST(&a->free_top, top - 1u);
    struct stated_slot *s = SLOT(t, slot);
    /* The initialiser is written inside a seqlock section of its own (seq odd, then even again), so
     * that a consumer copying the slot meanwhile (the snapshot saver, the store's write-behind of a
     * freed slot's last write) retries instead of taking a half-initialised record for a consistent
     * one. The generation goes first (mod 2^32), before the state changes: no stale handle matches
     * the new allocation. The RELEASE fence orders the odd seq and the bump before the record
     * initialiser's stores (the write-section fence), so a reader that copied any of those bytes
     * sees them changed on its re-check. */
    uint32_t seq = S_LD(&s->seq) & ~1u;      /* even: free() settled it (a scribbled odd one is settled here) */
    S_ST(&s->seq, seq + 1u);
    uint32_t gen = S_LD(&s->generation) + 1u;
    S_ST(&s->generation, gen);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    unsigned char *rec = t->records + (size_t)slot * t->record_size;
    if (init)
        memcpy(rec, init, t->record_size);
    else
        memset(rec, 0, t->record_size);
    S_STR(&s->seq, seq + 2u);                /* RELEASE: the initialiser before the even seq */
    S_ST(&s->entity, entity ? *entity : (uint64_t)0);
    S_ST(&s->flags, (uint8_t)(entity ? STATED_FLAG_HAS_ENTITY : 0u));
    S_ST(&s->owner, (uint16_t)t->owner);
    S_ST(&s->dirty, (uint8_t)1);     /* a new record must reach the next snapshot */
    S_ST(&s->pinned, (uint8_t)0);
    /* RELEASE: whoever sees state == allocated sees the generation, record and slot fields */
    S_STR(&s->state, (uint8_t)STATED_SLOT_ALLOCATED);
    if (entity) {
        int rc = stated__index_insert(t, *entity, slot);
        if (rc)
            return rc;
    }
    S_ST(&a->used, S_LD(&a->used) + 1u);
    if (t->owner)
        S_ST(&t->owners[t->owner - 1u].slots, S_LD(&t->owners[t->owner - 1u].slots) + 1u);
    S_ST(CNT(t, STATED_COUNTER_ALLOCATIONS), S_LD(CNT(t, STATED_COUNTER_ALLOCATIONS)) + 1u);
    stated__intent_done(t);
    h->slot = slot;
    h->generation = gen;
    return 0;
}

static int stated__need_writer(stated_table *t, const char *what)
{
    if (t->readonly)
        return stated__fail(t, STATED_ERR_READONLY, "attached read-only; cannot %s", what);
    if (t->owner == 0u)
        return stated__fail(t, STATED_ERR_NOT_OWNER, "attach with an owner name to %s", what);
    return 0;
}

int stated_alloc_ex(stated_table *t, const uint64_t *entity, const void *init, stated_handle *h)
{
    int rc = stated__need_writer(t, "allocate");
    if (rc)
        return rc;
    if (!init)
        init = t->init;
    rc = stated_acquire(t);
    if (rc)
        return rc;
    for (int attempt = 0; attempt < 2; attempt++) {
        rc = stated__alloc_locked(t, entity, init, h);
        if (rc != STATED__INCONSISTENT)
            break;
        if (attempt) {
            rc = stated__fail(t, STATED_ERR_CORRUPT, "allocator state still inconsistent after a rebuild");
            break;
        }
        int done = S_LD(&A(t)->intent_op) == STATED_INTENT_ALLOC && S_LD(&A(t)->intent_pid) == t->pid;
        uint32_t slot = S_LD(&A(t)->intent_slot);
        stated__rebuild(t, "entity index has no empty entry");
        if (done && slot < t->capacity && S_LD(&SLOT(t, slot)->state) == STATED_SLOT_ALLOCATED
            && S_LD(&SLOT(t, slot)->owner) == t->owner) {
            h->slot = slot;                /* the rebuild completed it */
            h->generation = S_LD(&SLOT(t, slot)->generation);
            rc = 0;
            break;
        }
    }
    stated_release(t);
    return rc;
}

int stated_alloc(stated_table *t, uint64_t entity, stated_handle *h)
{
    return stated_alloc_ex(t, &entity, NULL, h);
}

int stated_alloc_anon(stated_table *t, stated_handle *h)
{
    return stated_alloc_ex(t, NULL, NULL, h);
}

static int stated__free_locked(stated_table *t, uint32_t slot, uint32_t op)
{
    struct stated_allocator *a = A(t);
    struct stated_slot *s = SLOT(t, slot);
    uint64_t entity = S_LD(&s->entity);
    uint16_t slot_owner = S_LD(&s->owner);
    stated__intent(t, op, slot, entity, slot_owner, S_LD(CNT(t, STATED_COUNTER_FREES)),
                   S_LD(CNT(t, STATED_COUNTER_REAPED_SLOTS)));
    S_ST(&s->generation, S_LD(&s->generation) + 1u);
    /* RELEASE: a reader that sees the slot free also sees the new generation */
    S_STR(&s->state, (uint8_t)STATED_SLOT_FREE);
    S_ST(&s->dirty, (uint8_t)1);          /* the next delta records the free */
    S_ST(&s->pinned, (uint8_t)0);
    uint32_t seq = S_LD(&s->seq);
    if (seq & 1u)                        /* a writer died (or is) mid-section: settle it */
        S_STR(&s->seq, seq + 1u);
    if (S_LD(&s->flags) & STATED_FLAG_HAS_ENTITY) {
        int rc = stated__index_delete(t, entity);
        if (rc)
            return rc;
    }
    S_ST(&s->flags, (uint8_t)0);
    S_ST(&s->owner, (uint16_t)0);
    uint32_t top = S_LD(&a->free_top);
    if (top >= t->capacity)
        return STATED__INCONSISTENT;
    S_ST(&t->free_stack[top], slot);
    S_ST(&a->free_top, top + 1u);
    S_ST(&a->used, S_LD(&a->used) - 1u);
    if (slot_owner > 0u && slot_owner <= STATED_OWNERS_CAPACITY) {
        uint32_t *os = &t->owners[slot_owner - 1u].slots;
        if (S_LD(os))
            S_ST(os, S_LD(os) - 1u);
    }
    S_ST(CNT(t, STATED_COUNTER_FREES), S_LD(CNT(t, STATED_COUNTER_FREES)) + 1u);
    if (op == STATED_INTENT_REAP)
        S_ST(CNT(t, STATED_COUNTER_REAPED_SLOTS), S_LD(CNT(t, STATED_COUNTER_REAPED_SLOTS)) + 1u);
    stated__intent_done(t);
    return 0;
}

int stated_free_ex(stated_table *t, stated_handle h, int force)
{
    int rc = stated__need_writer(t, "free");
    if (rc && !(force && !t->readonly))
        return rc;
    if (h.slot >= t->capacity)
        return stated__fail(t, STATED_ERR_RANGE, "slot %u is outside [0, %u)", h.slot, t->capacity);
    rc = stated_acquire(t);
    if (rc)
        return rc;
    struct stated_slot *s = SLOT(t, h.slot);
    uint32_t now = S_LD(&s->generation);
    if (now != h.generation || S_LD(&s->state) != STATED_SLOT_ALLOCATED) {
        rc = stated__fail(t, STATED_ERR_STALE, "slot %u generation %u was already freed (now generation %u)",
                          h.slot, h.generation, now);
    } else if (S_LD(&s->owner) != t->owner && !force) {
        rc = stated__fail(t, STATED_ERR_NOT_OWNER, "slot %u belongs to owner #%u, not to this worker's owner #%u",
                          h.slot, (unsigned)S_LD(&s->owner), t->owner);
    } else {
        rc = stated__free_locked(t, h.slot, STATED_INTENT_FREE);
        if (rc == STATED__INCONSISTENT) {
            /* the slot state was set free before anything that can fail: the rebuild completes the free */
            stated__rebuild(t, "free stack or entity index disagrees with the slot table");
            rc = 0;
        }
    }
    stated_release(t);
    return rc;
}

int stated_free(stated_table *t, stated_handle h)
{
    return stated_free_ex(t, h, 0);
}

int stated_valid(const stated_table *t, stated_handle h)
{
    if (h.slot >= t->capacity)
        return 0;
    const struct stated_slot *s = SLOT(t, h.slot);
    uint8_t st = S_LDA(&s->state);
    return S_LD(&s->generation) == h.generation && st == STATED_SLOT_ALLOCATED;
}

/* ---- owners --------------------------------------------------------------------------------------------- */
static int stated__name_eq(const struct stated_owner *o, const char padded[STATED_OWNER_NAME_MAX])
{
    return memcmp(o->name, padded, STATED_OWNER_NAME_MAX) == 0;
}

static int stated__settle_owner_slots(stated_table *t, uint32_t idx)
{
    for (uint32_t slot = 0; slot < t->capacity; slot++) {
        struct stated_slot *s = SLOT(t, slot);
        if (S_LD(&s->owner) != idx || S_LD(&s->state) != STATED_SLOT_ALLOCATED)
            continue;
        uint32_t seq = S_LD(&s->seq);
        if (seq & 1u) {
            S_STR(&s->seq, seq + 1u);        /* RELEASE: as a write section's end */
            S_ST(&s->dirty, (uint8_t)1);     /* the settled record reaches the next save */
            stated__bump(t, STATED_COUNTER_SETTLED_SLOTS);
            stated__log(t, STATED_LOG_WARNING, "slot=%u: writer died mid-write; record settled as last written", slot);
        }
    }
    return 0;
}

int stated_claim_owner(stated_table *t, const char *name, uint32_t *index)
{
    if (t->readonly)
        return stated__fail(t, STATED_ERR_READONLY, "attached read-only; cannot claim an owner name");
    size_t n = name ? strlen(name) : 0u;
    if (n == 0u || n > STATED_OWNER_NAME_MAX)
        return stated__fail(t, STATED_ERR_INVAL, "owner names are 1 to %u bytes of UTF-8", STATED_OWNER_NAME_MAX);
    char padded[STATED_OWNER_NAME_MAX];
    memset(padded, 0, sizeof padded);
    memcpy(padded, name, n);
    uint64_t start = 0;
    if (stated__proc_start(t, t->pid, &start) != 1) {
        t->sys_errno = errno;
        return stated__fail(t, STATED_ERR_SYSTEM, "cannot read our own start time from %s/%u/stat", t->proc_root,
                            t->pid);
    }
    int rc = stated_acquire(t);
    if (rc)
        return rc;
    uint32_t idx = 0, prev_slots = 0;
    for (uint32_t k = 1; k <= STATED_OWNERS_CAPACITY; k++) {
        struct stated_owner *o = &t->owners[k - 1];
        if (S_LD(&o->state) != STATED_OWNER_EMPTY && stated__name_eq(o, padded)) {
            idx = k;
            break;
        }
    }
    if (idx) {
        struct stated_owner *o = &t->owners[idx - 1];
        uint32_t opid = S_LD(&o->pid);
        if (S_LD(&o->state) == STATED_OWNER_ATTACHED && opid != t->pid && stated__alive(t, opid, S_LD(&o->start_time))) {
            stated_release(t);
            return stated__fail(t, STATED_ERR_OWNER_BUSY, "owner '%s' is held by live pid %u; stop that worker first, "
                                "or use another owner name", name, opid);
        }
        prev_slots = S_LD(&o->slots);
        if (opid != t->pid && prev_slots) {
            stated__bump(t, STATED_COUNTER_OWNER_TAKEOVERS);
            stated__log(t, STATED_LOG_INFO, "owner=%s: pid %u takes over %u slots from pid %u", name, t->pid,
                        prev_slots, opid);
        }
    } else {
        for (uint32_t k = 1; k <= STATED_OWNERS_CAPACITY && !idx; k++)
            if (S_LD(&t->owners[k - 1].state) == STATED_OWNER_EMPTY)
                idx = k;
        for (uint32_t k = 1; k <= STATED_OWNERS_CAPACITY && !idx; k++) {   /* reuse a gone owner holding nothing */
            struct stated_owner *o = &t->owners[k - 1];
            if (S_LD(&o->slots) == 0u
                && !(S_LD(&o->state) == STATED_OWNER_ATTACHED && stated__alive(t, S_LD(&o->pid), S_LD(&o->start_time))))
                idx = k;
        }
        if (!idx) {
            stated_release(t);
            return stated__fail(t, STATED_ERR_OWNERS_EXHAUSTED, "all %u owner names are taken by owners that still "
                                "hold slots, so owner '%s' cannot attach. Reuse a retired worker's name, or release a "
                                "dead owner's slots: `stated reap --owner NAME` (after the daemon saves them), or set "
                                "dead_owner = \"release\" for this table", STATED_OWNERS_CAPACITY, name);
        }
    }
    stated__intent(t, STATED_INTENT_OWNER, 0u, 0u, idx, S_LD(CNT(t, STATED_COUNTER_FREES)),
                   S_LD(CNT(t, STATED_COUNTER_REAPED_SLOTS)));
    struct stated_owner *o = &t->owners[idx - 1];
    memcpy(o->name, padded, STATED_OWNER_NAME_MAX);
    S_ST(&o->pid, t->pid);
    S_ST(&o->start_time, start);
    S_ST(&o->slots, prev_slots);
    S_ST(&o->reserved, 0u);
    S_ST(&o->since_ms, stated__unix_ms());
    S_STR(&o->state, STATED_OWNER_ATTACHED);
    stated__settle_owner_slots(t, idx);
    stated__bump(t, STATED_COUNTER_ATTACHES);
    stated__intent_done(t);
    stated_release(t);
    t->owner = idx;
    t->start_time = start;
    if (index)
        *index = idx;
    return 0;
}

/* `conditional`: only while the entry is attached and names `only_pid` (which may be 0: a pid an
 * entry can hold only when scribbled, and the daemon still marks such an entry dead) */
static int stated__set_owner_state(stated_table *t, uint32_t index, uint32_t state, int conditional,
                                   uint32_t only_pid)
{
    if (index < 1u || index > STATED_OWNERS_CAPACITY)
        return stated__fail(t, STATED_ERR_INVAL, "owner index %u is outside [1, %u]", index, STATED_OWNERS_CAPACITY);
    int rc = stated_acquire(t);
    if (rc)
        return rc;
    struct stated_owner *o = &t->owners[index - 1];
    int changed = 0;
    if (!conditional || (S_LD(&o->pid) == only_pid && S_LD(&o->state) == STATED_OWNER_ATTACHED)) {
        S_ST(&o->since_ms, stated__unix_ms());
        S_STR(&o->state, state);
        changed = 1;
    }
    stated_release(t);
    return changed;
}

int stated_set_owner_state(stated_table *t, uint32_t index, uint32_t state, uint32_t only_pid)
{
    return stated__set_owner_state(t, index, state, only_pid != 0u, only_pid);
}

int64_t stated_reap_owner(stated_table *t, uint32_t index)
{
    if (index < 1u || index > STATED_OWNERS_CAPACITY)
        return stated__fail(t, STATED_ERR_INVAL, "owner index %u is outside [1, %u]", index, STATED_OWNERS_CAPACITY);
    int rc = stated_acquire(t);
    if (rc)
        return rc;
    int64_t n = 0;
    if (S_LD(&t->owners[index - 1].state) != STATED_OWNER_ATTACHED) {   /* it may have come back meanwhile */
        for (uint32_t slot = 0; slot < t->capacity; slot++) {
            struct stated_slot *s = SLOT(t, slot);
            if (S_LD(&s->owner) != index || S_LD(&s->state) != STATED_SLOT_ALLOCATED)
                continue;
            if (stated__free_locked(t, slot, STATED_INTENT_REAP) == STATED__INCONSISTENT)
                stated__rebuild(t, "free stack or entity index disagrees with the slot table (reap)");
            n++;
        }
    }
    stated_release(t);
    return n;
}

/* ---- record seqlock ---------------------------------------------------------------------------------------
 * Writer: seq odd (relaxed), RELEASE fence, field stores, seq even with RELEASE, dirty = 1.
 *   The fence orders the odd seq before every field store (whoever does them: C code, or a Python
 *   ctypes view between begin and end): a reader whose copy saw a field store sees seq changed.
 *   The RELEASE store of the even seq orders the field stores before it.
 * Reader: seq with ACQUIRE, copy, ACQUIRE fence, seq and generation again (relaxed). */
static int stated__writable_slot(stated_table *t, stated_handle h)
{
    int rc = stated__need_writer(t, "write");
    if (rc)
        return rc;
    if (h.slot >= t->capacity)
        return stated__fail(t, STATED_ERR_RANGE, "slot %u is outside [0, %u)", h.slot, t->capacity);
    const struct stated_slot *s = SLOT(t, h.slot);
    if (S_LD(&s->generation) != h.generation || S_LDA(&s->state) != STATED_SLOT_ALLOCATED)
        return stated__fail(t, STATED_ERR_STALE, "handle (slot %u, generation %u) is stale; the slot was freed "
                            "(generation now %u). Look the entity up again", h.slot, h.generation,
                            S_LD(&s->generation));
    if (S_LD(&s->owner) != t->owner)
        return stated__fail(t, STATED_ERR_NOT_OWNER, "slot %u belongs to owner #%u, not to #%u; only a slot's owner "
                            "writes it", h.slot, (unsigned)S_LD(&s->owner), t->owner);
    return 0;
}

int stated_begin(stated_table *t, stated_handle h, void **record)
{
    int rc = stated__writable_slot(t, h);
    if (rc)
        return rc;
    struct stated_slot *s = SLOT(t, h.slot);
    uint32_t seq = S_LD(&s->seq);
    if (seq & 1u)
        return stated__fail(t, STATED_ERR_NESTED, "slot %u: already inside a write section (write sections do not "
                            "nest)", h.slot);
    S_ST(&s->seq, seq + 1u);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    if (record)
        *record = t->records + (size_t)h.slot * t->record_size;
    return 0;
}

int stated_end(stated_table *t, stated_handle h)
{
    if (h.slot >= t->capacity)
        return stated__fail(t, STATED_ERR_RANGE, "slot %u is outside [0, %u)", h.slot, t->capacity);
    struct stated_slot *s = SLOT(t, h.slot);
    if (S_LD(&s->generation) != h.generation)
        return 0;          /* freed inside its own section: free settled the seq; the slot may be someone else's */
    uint32_t seq = S_LD(&s->seq);
    if (!(seq & 1u))
        return stated__fail(t, STATED_ERR_INVAL, "slot %u: stated_end without stated_begin", h.slot);
    S_STR(&s->seq, seq + 1u);
    S_STR(&s->dirty, (uint8_t)1);
    return 0;
}

int stated_mark_dirty_h(stated_table *t, stated_handle h)
{
    int rc = stated__writable_slot(t, h);
    if (rc)
        return rc;
    S_STR(&SLOT(t, h.slot)->dirty, (uint8_t)1);
    return 0;
}

int stated_read(stated_table *t, stated_handle h, void *out, size_t size)
{
    if (h.slot >= t->capacity)
        return stated__fail(t, STATED_ERR_RANGE, "slot %u is outside [0, %u)", h.slot, t->capacity);
    if (size < t->record_size)
        return stated__fail(t, STATED_ERR_RECORD_SIZE, "read buffer of %zu bytes for %u-byte records", size,
                            t->record_size);
    const struct stated_slot *s = SLOT(t, h.slot);
    const unsigned char *rec = t->records + (size_t)h.slot * t->record_size;
    int64_t deadline = 0;
    for (uint64_t spins = 1;; spins++) {
        uint32_t s1 = S_LDA(&s->seq);
        if (S_LD(&s->generation) != h.generation)
            return stated__fail(t, STATED_ERR_STALE, "handle (slot %u, generation %u) is stale; the slot was freed "
                                "(generation now %u). Look the entity up again", h.slot, h.generation,
                                S_LD(&s->generation));
        if (!(s1 & 1u)) {
            memcpy(out, rec, t->record_size);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (S_LD(&s->seq) == s1) {
                if (S_LD(&s->generation) != h.generation)
                    continue;          /* reported as stale at the top */
                return 0;
            }
        }
        if (spins % 64u == 0u) {
            int64_t now = stated__now_ns();
            if (!deadline) {
                deadline = now + t->read_timeout_ns;
            } else if (now > deadline) {
                if (!t->readonly)
                    stated__bump(t, STATED_COUNTER_TORN_READS);
                return stated__fail(t, STATED_ERR_TORN, "slot %u: its writer has been mid-write for over %.3gs (owner "
                                    "#%u probably died inside a write section); the daemon or the owner's next "
                                    "attach settles it", h.slot, (double)t->read_timeout_ns / 1e9,
                                    (unsigned)S_LD(&s->owner));
            }
            sched_yield();
        }
    }
}

int stated_copy_slot(stated_table *t, uint32_t slot, void *out, size_t size, stated_slot_copy *c, double wait_s)
{
    if (slot >= t->capacity)
        return stated__fail(t, STATED_ERR_RANGE, "slot %u is outside [0, %u)", slot, t->capacity);
    if (size < t->record_size)
        return stated__fail(t, STATED_ERR_RECORD_SIZE, "copy buffer of %zu bytes for %u-byte records", size,
                            t->record_size);
    const struct stated_slot *s = SLOT(t, slot);
    const unsigned char *rec = t->records + (size_t)slot * t->record_size;
    int64_t deadline = 0;
    for (uint64_t spins = 1;; spins++) {
        uint32_t seq = S_LDA(&s->seq);
        uint32_t gen = S_LD(&s->generation);
        memcpy(out, rec, t->record_size);
        c->generation = gen;
        c->state = S_LD(&s->state);
        c->flags = S_LD(&s->flags);
        c->owner = S_LD(&s->owner);
        c->entity = S_LD(&s->entity);
        c->torn = 0;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        uint32_t seq2 = S_LD(&s->seq);
        if (seq2 == seq && S_LD(&s->generation) == gen && !(seq & 1u))
            return 0;
        int64_t now = stated__now_ns();
        if (!deadline)
            deadline = now + (int64_t)(wait_s * 1e9);
        /* stuck odd: its writer died mid-section. A writer that never leaves a gap between its
         * sections is given up on too, after twice the wait: every wait is bounded. */
        if ((now > deadline && seq2 == seq) || now > deadline + (int64_t)(wait_s * 1e9)) {
            c->torn = 1;
            return 0;
        }
        if (spins % 64u == 0u)
            sched_yield();
    }
}

/* ---- scans --------------------------------------------------------------------------------------------------- */
int64_t stated_scan(stated_table *t, int kind, uint32_t owner, stated_slot_fn fn, void *ctx)
{
    int clear = (kind & STATED_SCAN_CLEAR_DIRTY) != 0;
    kind &= 0xFF;
    if (clear && t->readonly)
        return stated__fail(t, STATED_ERR_READONLY, "attached read-only; cannot clear dirty marks");
    int64_t n = 0;
    for (uint32_t slot = 0; slot < t->capacity; slot++) {
        struct stated_slot *s = SLOT(t, slot);
        int pick;
        if (kind == STATED_SCAN_CHANGED) {
            pick = S_LD(&s->dirty) || S_LD(&s->pinned);
            /* The contract (docs/format.md "Dirty and pinned"): dirty is cleared BEFORE the record
             * is copied. An atomic exchange (not a plain store): a writer's dirty = 1 either comes
             * after it in the mark's modification order (the slot stays dirty for the next delta)
             * or is read by it, and then the ACQUIRE half makes that writer's record visible to
             * the copy. A plain store could land after the writer's mark and lose it. */
            if (pick && clear)
                __atomic_exchange_n(&s->dirty, (uint8_t)0, __ATOMIC_ACQ_REL);
        } else {
            if (clear && S_LD(&s->dirty))
                __atomic_exchange_n(&s->dirty, (uint8_t)0, __ATOMIC_ACQ_REL);
            pick = S_LDA(&s->state) == STATED_SLOT_ALLOCATED && (kind != STATED_SCAN_OWNER || S_LD(&s->owner) == owner);
        }
        if (pick) {
            n++;
            if (fn) {
                int r = fn(ctx, slot);
                if (r)
                    return r;
            }
        }
    }
    return n;
}

/* ---- verify / audit ------------------------------------------------------------------------------------------ */
static void stated__problem(stated_problem_fn fn, void *ctx, int *n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void stated__problem(stated_problem_fn fn, void *ctx, int *n, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    (*n)++;
    if (fn)
        fn(ctx, msg);
}

int stated_verify(stated_table *t, stated_problem_fn fn, void *ctx)
{
    int n = 0;
    const uint32_t cap = t->capacity;
    uint32_t n_alloc = 0, n_bad = 0, first_bad = 0, n_ent = 0;
    for (uint32_t i = 0; i < cap; i++) {
        uint8_t st = S_LD(&SLOT(t, i)->state);
        if (st == STATED_SLOT_ALLOCATED) {
            n_alloc++;
            n_ent += (S_LD(&SLOT(t, i)->flags) & STATED_FLAG_HAS_ENTITY) != 0;
        } else if (st != STATED_SLOT_FREE && n_bad++ == 0u) {
            first_bad = i;
        }
    }
    if (n_bad)
        stated__problem(fn, ctx, &n, "slots with invalid state: %u (first: slot %u)", n_bad, first_bad);
    uint32_t top = S_LD(&A(t)->free_top);
    uint32_t distinct_free = 0;
    if (top > cap) {
        stated__problem(fn, ctx, &n, "free stack top %u > capacity %u", top, cap);
    } else {
        unsigned char *seen = (unsigned char *)calloc(cap, 1);
        if (!seen)
            return stated__fail(t, STATED_ERR_SYSTEM, "out of memory");
        int twice = 0, notfree = 0;
        for (uint32_t i = 0; i < top; i++) {
            uint32_t s = S_LD(&t->free_stack[i]);
            if (s >= cap || S_LD(&SLOT(t, s)->state) != STATED_SLOT_FREE) {
                if (!notfree++)
                    stated__problem(fn, ctx, &n, "free stack holds slot %u which is not free", s);
                continue;
            }
            if (seen[s])
                twice = 1;
            else
                distinct_free++;
            seen[s] = 1;
        }
        free(seen);
        if (twice)
            stated__problem(fn, ctx, &n, "free stack holds a slot twice");
    }
    if (distinct_free + n_alloc != cap)
        stated__problem(fn, ctx, &n, "free %u + allocated %u != capacity %u", distinct_free, n_alloc, cap);
    if (S_LD(&A(t)->used) != n_alloc)
        stated__problem(fn, ctx, &n, "used counter %u != allocated %u", S_LD(&A(t)->used), n_alloc);
    /* every index entry names an allocated slot holding that entity; every entity is reachable;
     * no entity is held twice */
    uint32_t n_indexed = 0, bad_entries = 0;
    for (uint32_t e = 0; e < t->index_capacity; e++) {
        uint32_t sp1 = S_LD(&IDX(t, e)->slot_plus_one);
        if (!sp1)
            continue;
        n_indexed++;
        if (!stated__holds(t, (int64_t)sp1 - 1, S_LD(&IDX(t, e)->entity)))
            bad_entries++;
    }
    if (n_indexed != n_ent || bad_entries)
        stated__problem(fn, ctx, &n, "entity index (%u entries, %u wrong) disagrees with slot table (%u entities)",
                        n_indexed, bad_entries, n_ent);
    for (uint32_t i = 0; i < cap; i++) {
        const struct stated_slot *s = SLOT(t, i);
        if (S_LD(&s->state) != STATED_SLOT_ALLOCATED || !(S_LD(&s->flags) & STATED_FLAG_HAS_ENTITY))
            continue;
        int64_t found = stated__find(t, S_LD(&s->entity));
        if (found != (int64_t)i) {
            if (found >= 0 && stated__holds(t, found, S_LD(&s->entity)))
                stated__problem(fn, ctx, &n, "entity %llu held by slots %lld and %u",
                                (unsigned long long)S_LD(&s->entity), (long long)found, i);
            else
                stated__problem(fn, ctx, &n, "entity %llu not reachable by probing", (unsigned long long)S_LD(&s->entity));
            break;
        }
    }
    if (S_LD(&A(t)->intent_op))
        stated__problem(fn, ctx, &n, "intent mark %u left set", S_LD(&A(t)->intent_op));
    uint32_t odd = 0, first_odd = 0;
    for (uint32_t i = 0; i < cap; i++)
        if (S_LD(&SLOT(t, i)->state) == STATED_SLOT_FREE && (S_LD(&SLOT(t, i)->seq) & 1u) && odd++ == 0u)
            first_odd = i;
    if (odd)
        stated__problem(fn, ctx, &n, "free slots left inside a write section (odd seq): %u (first: slot %u)", odd,
                        first_odd);
    uint32_t counts[STATED_OWNERS_CAPACITY + 1];
    memset(counts, 0, sizeof counts);
    for (uint32_t i = 0; i < cap; i++)
        if (S_LD(&SLOT(t, i)->state) == STATED_SLOT_ALLOCATED) {
            uint16_t ow = S_LD(&SLOT(t, i)->owner);
            counts[ow <= STATED_OWNERS_CAPACITY ? ow : 0]++;
        }
    for (uint32_t k = 1; k <= STATED_OWNERS_CAPACITY; k++)
        if (S_LD(&t->owners[k - 1].slots) != counts[k]) {
            stated__problem(fn, ctx, &n, "owner slot counts disagree with the slot table (owner #%u: %u != %u)", k,
                            S_LD(&t->owners[k - 1].slots), counts[k]);
            break;
        }
    uint64_t allocs = S_LD(CNT(t, STATED_COUNTER_ALLOCATIONS)), frees = S_LD(CNT(t, STATED_COUNTER_FREES));
    if (allocs - frees != n_alloc)
        stated__problem(fn, ctx, &n, "counters: allocations %llu - frees %llu != allocated %u",
                        (unsigned long long)allocs, (unsigned long long)frees, n_alloc);
    return n;
}

/* counts only (no per-entry probing): what the audit compares before taking the lock */
static int stated__quick_check(stated_table *t, stated_problem_fn fn, void *ctx)
{
    int n = 0;
    const uint32_t cap = t->capacity;
    uint32_t n_free = 0, n_alloc = 0, n_ent = 0, odd_free = 0;
    uint32_t per_owner[STATED_OWNERS_CAPACITY + 1];
    memset(per_owner, 0, sizeof per_owner);
    for (uint32_t i = 0; i < cap; i++) {
        const struct stated_slot *s = SLOT(t, i);
        uint8_t st = S_LD(&s->state);
        if (st == STATED_SLOT_FREE) {
            n_free++;
            odd_free += S_LD(&s->seq) & 1u;
        } else if (st == STATED_SLOT_ALLOCATED) {
            n_alloc++;
            n_ent += (S_LD(&s->flags) & STATED_FLAG_HAS_ENTITY) != 0;
            uint16_t ow = S_LD(&s->owner);
            per_owner[ow <= STATED_OWNERS_CAPACITY ? ow : 0]++;
        }
    }
    if (n_free + n_alloc != cap)
        stated__problem(fn, ctx, &n, "%u slots with an invalid state", cap - n_free - n_alloc);
    if (S_LD(&A(t)->free_top) != n_free)
        stated__problem(fn, ctx, &n, "free stack top %u != %u free slots", S_LD(&A(t)->free_top), n_free);
    if (S_LD(&A(t)->used) != n_alloc)
        stated__problem(fn, ctx, &n, "used %u != %u allocated slots", S_LD(&A(t)->used), n_alloc);
    uint32_t n_indexed = 0;
    for (uint32_t e = 0; e < t->index_capacity; e++)
        n_indexed += S_LD(&IDX(t, e)->slot_plus_one) != 0u;
    if (n_indexed != n_ent || S_LD(&A(t)->index_count) != n_ent)
        stated__problem(fn, ctx, &n, "entity index holds %u entries (count word %u) for %u entities", n_indexed,
                        S_LD(&A(t)->index_count), n_ent);
    for (uint32_t k = 1; k <= STATED_OWNERS_CAPACITY; k++)
        if (S_LD(&t->owners[k - 1].slots) != per_owner[k]) {
            stated__problem(fn, ctx, &n, "owner #%u slot count %u != %u", k, S_LD(&t->owners[k - 1].slots), per_owner[k]);
            break;
        }
    if (S_LD(CNT(t, STATED_COUNTER_ALLOCATIONS)) - S_LD(CNT(t, STATED_COUNTER_FREES)) != n_alloc)
        stated__problem(fn, ctx, &n, "counters: allocations - frees != allocated slots");
    if (odd_free)
        stated__problem(fn, ctx, &n, "a free slot is left inside a write section (odd seq)");
    return n;
}

typedef struct {
    char text[640];
} stated__joined;

static void stated__join(void *ctx, const char *p)
{
    stated__joined *j = (stated__joined *)ctx;
    size_t len = strlen(j->text);
    if (len + 3 < sizeof j->text)
        snprintf(j->text + len, sizeof j->text - len, "%s%s", len ? "; " : "", p);
}

int stated_audit(stated_table *t, stated_problem_fn fn, void *ctx)
{
    if (stated__quick_check(t, NULL, NULL) == 0)
        return 0;
    int rc = stated_acquire(t);
    if (rc)
        return rc;
    stated__joined j;
    j.text[0] = '\0';
    int n = stated__quick_check(t, stated__join, &j);   /* again under the lock: a mutation in flight is no damage */
    if (n) {
        stated__quick_check(t, fn, ctx);
        stated__rebuild(t, j.text);
        stated__joined left;
        left.text[0] = '\0';
        if (stated_verify(t, stated__join, &left) > 0) {
            stated_release(t);
            return stated__fail(t, STATED_ERR_CORRUPT, "still inconsistent after a rebuild: %s", left.text);
        }
    }
    stated_release(t);
    return n;
}

/* ---- attach ------------------------------------------------------------------------------------------------------ */
void stated_options_init(stated_options *o)
{
    memset(o, 0, sizeof *o);
}

static int stated__setup(stated_table *t, void *base, size_t size, stated_key_t key, const stated_options *o)
{
    memset(t, 0, sizeof *t);
    t->semid = -1;
    t->key = key;
    if (o->name && o->name[0])
        snprintf(t->name, sizeof t->name, "%s", o->name);
    else
        snprintf(t->name, sizeof t->name, "0x%08x", (unsigned)key);
    t->readonly = o->readonly != 0;
    t->pid = o->pid ? o->pid : (uint32_t)getpid();
    pthread_once(&stated__atfork_once, stated__register_atfork);
    t->forks = __atomic_load_n(&stated__fork_count, __ATOMIC_RELAXED);
    t->lock_timeout_ns = (int64_t)((o->lock_timeout > 0 ? o->lock_timeout : 2.0) * 1e9);
    t->read_timeout_ns = (int64_t)((o->read_timeout > 0 ? o->read_timeout : 0.1) * 1e9);
    snprintf(t->proc_root, sizeof t->proc_root, "%s", o->proc_root ? o->proc_root : "/proc");
    if (o->n_trust_uids) {
        t->n_trust_uids = o->n_trust_uids > 8u ? 8u : o->n_trust_uids;
        memcpy(t->trust_uids, o->trust_uids, t->n_trust_uids * sizeof(uint32_t));
    } else {
        t->trust_uids[0] = 0u;
        t->trust_uids[1] = (uint32_t)geteuid();
        t->n_trust_uids = 2;
    }
    t->trust_mode = o->trust_mode ? (o->trust_mode & 0777u) : 0770u;
    t->hooks = o->hooks;
    if (!base)
        return 0;
    int rc = stated_validate(base, size);
    if (rc == STATED_ERR_STATE && !o->require_ready)
        rc = 0;
    if (rc)
        return stated__fail(t, rc, "segment rejected: %s", stated_strerror(rc));
    struct stated_segment_header *h = (struct stated_segment_header *)base;
    if (o->layout_hash && h->layout_hash != o->layout_hash)
        return stated__fail(t, STATED_ERR_LAYOUT, "segment has layout 0x%016llx, expected 0x%016llx: the segment was "
                            "created from another schema; regenerate the header or migrate",
                            (unsigned long long)h->layout_hash, (unsigned long long)o->layout_hash);
    t->base = (unsigned char *)base;
    t->size = size;
    t->hdr = h;
    t->capacity = h->capacity;
    t->record_size = h->record_size;
    t->index_capacity = h->index_capacity;
    t->index_mask = h->index_capacity - 1u;
    unsigned bits = 0;
    while ((1u << bits) < h->index_capacity)
        bits++;
    t->index_shift = 64u - bits;
    t->slots = (struct stated_slot *)(t->base + h->slots_offset);
    t->free_stack = (uint32_t *)(t->base + h->free_offset);
    t->index = (struct stated_index_entry *)(t->base + h->index_offset);
    t->owners = (struct stated_owner *)(t->base + h->owners_offset);
    t->records = t->base + h->records_offset;
    t->init = (const unsigned char *)o->init;
    if (!t->readonly) {
        /* our lock id: the start time makes a recycled pid tell (0 if /proc will not say: then
         * stated_acquire refuses, as the owner claim does) */
        uint64_t start = 0;
        if (stated__proc_start(t, t->pid, &start) != 1)
            start = 0;
        t->lock_id = stated__lock_id(t->pid, start);
    }
    return 0;
}

int stated_attach(stated_table *t, void *base, size_t size, stated_key_t key, int semid, const stated_options *o)
{
    stated_options dflt;
    if (!o) {
        stated_options_init(&dflt);
        o = &dflt;
    }
    int rc = stated__setup(t, base, size, key, o);
    if (rc)
        return rc;
    if (!t->readonly) {
        if (semid >= 0)
            t->semid = semid;
        else if ((rc = stated__open_sem(t)) != 0)
            return rc;
    }
    return 0;
}

int stated_open_ex(stated_key_t key, const char *owner, const stated_options *o, stated_table *t)
{
    stated_options opts;
    if (o)
        opts = *o;
    else
        stated_options_init(&opts);
    opts.readonly = owner == NULL;
    opts.require_ready = 1;
    int rc = stated__setup(t, NULL, 0, key, &opts);
    if (rc)
        return rc;
#ifdef STATED_KNOWN_TABLE_FN
    /* a generated header: the key must be one of its tables, whose layout hash is checked and
     * whose field defaults initialise new records */
    stated_table_info info;
    if (!STATED_KNOWN_TABLE_FN((uint32_t)key, &info))
        return stated__fail(t, STATED_ERR_LAYOUT, "the key is not a table of the header that compiled the stated "
                            "core; regenerate it, or use stated_open_<table>() / stated_open_ex()");
    if (!opts.name)
        opts.name = info.name;
    if (!opts.layout_hash)
        opts.layout_hash = info.layout_hash;
    if (!opts.init)
        opts.init = info.defaults;
#endif
    int id = shmget(key, 0, 0);
    if (id < 0) {
        t->sys_errno = errno;
        if (errno == ENOENT)
            return stated__fail(t, STATED_ERR_NO_SEGMENT, "no segment at the key: start the daemon (`stated run`) so "
                                "it creates or restores it, or check the key");
        if (errno == EACCES)
            return stated__fail(t, STATED_ERR_PERMISSION, "permission denied; run the worker as a member of the "
                                "daemon's group");
        return stated__fail(t, STATED_ERR_SYSTEM, "shmget: %s", strerror(errno));
    }
    struct shmid_ds ds;
    if (shmctl(id, IPC_STAT, &ds) != 0) {
        t->sys_errno = errno;
        return stated__fail(t, errno == EACCES ? STATED_ERR_PERMISSION : STATED_ERR_SYSTEM, "shmctl(IPC_STAT): %s",
                            strerror(errno));
    }
    if (!stated__trusted(t, ds.shm_perm.cuid, ds.shm_perm.mode))
        return stated__fail(t, STATED_ERR_FOREIGN, "the segment (id %d) was created by uid %u with mode %04o; stated "
                            "accepts only its own or root's, with no permission beyond %04o. It may have been "
                            "planted: inspect it with `ipcs -mi %d`, remove it with `ipcrm -m %d`",
                            id, (unsigned)ds.shm_perm.cuid, (unsigned)ds.shm_perm.mode & 0777u, t->trust_mode, id, id);
    void *base = shmat(id, NULL, opts.readonly ? SHM_RDONLY : 0);
    if (base == (void *)-1) {
        t->sys_errno = errno;
        return stated__fail(t, errno == EACCES ? STATED_ERR_PERMISSION : STATED_ERR_SYSTEM, "shmat: %s",
                            strerror(errno));
    }
    /* a segment still being built (state initialising): wait up to 2 s, as Python does */
    const struct stated_segment_header *h = (const struct stated_segment_header *)base;
    int64_t until = stated__now_ns() + 2000000000;
    while (ds.shm_segsz >= STATED_SCHEMA_OFFSET && S_LDA(&h->state) == STATED_STATE_INITIALISING
           && stated__now_ns() < until) {
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
    }
    stated_hooks hooks = t->hooks;
    rc = stated__setup(t, base, ds.shm_segsz, key, &opts);
    t->hooks = hooks;
    if (rc) {
        shmdt(base);
        return rc;
    }
    t->attached = 1;
    if (!t->readonly) {
        rc = stated__open_sem(t);
        if (rc == 0 && owner)
            rc = stated_claim_owner(t, owner, NULL);
        if (rc) {
            int keep = rc;
            char msg[sizeof t->errmsg];
            memcpy(msg, t->errmsg, sizeof msg);
            shmdt(base);
            t->attached = 0;
            t->base = NULL;
            memcpy(t->errmsg, msg, sizeof msg);
            return keep;
        }
    }
    return 0;
}

int stated_open(stated_key_t key, const char *owner, stated_table *t)
{
    return stated_open_ex(key, owner, NULL, t);
}

void stated_close(stated_table *t)
{
    if (t->base && t->owner && !t->readonly)
        stated_set_owner_state(t, t->owner, STATED_OWNER_DETACHED, t->pid);
    if (t->attached && t->base)
        shmdt(t->base);
    t->attached = 0;
    t->base = NULL;
    t->owner = 0;
}

#undef SLOT
#undef IDX
#undef A
#undef CNT
#undef S_LD
#undef S_LDA
#undef S_ST
#undef S_STR

#endif /* STATED_IMPLEMENTATION */
