/* C worker benchmark for bench/bench_native.py: `bench_core KEY SECONDS PROCS`
 * Measures, on the table at KEY (owner "bench-c<i>"), with PROCS processes at once:
 *   pair_entity   stated_alloc(entity) + stated_free
 *   pair_anon     stated_alloc_anon + stated_free
 *   sem2          two bare semop acquire/release pairs (SEM_UNDO) on a private semaphore: the floor
 *                 for a semaphore-guarded allocator (alloc and free each take the lock once)
 * Prints "name=pairs_per_second" lines (aggregate over the processes). */
#define _GNU_SOURCE
#define STATED_IMPLEMENTATION
#include "stated_core.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double run(const char *what, stated_table *t, int semid, double seconds, uint64_t ent_base)
{
    struct sembuf acq = {0, -1, SEM_UNDO}, rel = {0, 1, SEM_UNDO};
    uint64_t n = 0;
    double t0 = now_s(), end = t0 + seconds;
    stated_handle h;
    while (now_s() < end) {
        for (int i = 0; i < 64; i++, n++) {
            int rc = 0;
            if (strcmp(what, "pair_entity") == 0) {
                rc = stated_alloc(t, ent_base + n, &h);
                if (!rc)
                    rc = stated_free(t, h);
            } else if (strcmp(what, "pair_anon") == 0) {
                rc = stated_alloc_anon(t, &h);
                if (!rc)
                    rc = stated_free(t, h);
            } else {
                for (int k = 0; k < 2; k++)
                    if (semop(semid, &acq, 1) != 0 || semop(semid, &rel, 1) != 0)
                        rc = -1;
            }
            if (rc) {
                fprintf(stderr, "%s: %s\n", what, stated_errmsg(t));
                exit(4);
            }
        }
    }
    return (double)n / (now_s() - t0);
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: bench_core KEY SECONDS PROCS\n");
        return 2;
    }
    stated_key_t key = (stated_key_t)strtol(argv[1], NULL, 0);
    double seconds = atof(argv[2]);
    int procs = atoi(argv[3]);
    int semid = semget(IPC_PRIVATE, 1, 0600);
    union { int val; struct semid_ds *buf; unsigned short *array; } arg;
    arg.val = 1;
    if (semid < 0 || semctl(semid, 0, SETVAL, arg) != 0) {
        perror("semget");
        return 4;
    }
    const char *names[] = {"pair_entity", "pair_anon", "sem2"};
    for (int w = 0; w < 3; w++) {
        int fds[16][2];
        for (int p = 0; p < procs; p++) {
            if (pipe(fds[p]) != 0)
                return 4;
            if (fork() == 0) {
                stated_table t;
                char owner[32];
                snprintf(owner, sizeof owner, "bench-c%d", p);
                if (stated_open(key, owner, &t) != 0) {
                    fprintf(stderr, "open: %s\n", stated_errmsg(&t));
                    _exit(4);
                }
                double r = run(names[w], &t, semid, seconds, ((uint64_t)getpid() << 32) | 1u);
                stated_close(&t);
                if (write(fds[p][1], &r, sizeof r) != sizeof r)
                    _exit(5);
                _exit(0);
            }
        }
        double total = 0;
        for (int p = 0; p < procs; p++) {
            double r = 0;
            if (read(fds[p][0], &r, sizeof r) != sizeof r)
                r = 0;
            total += r;
            close(fds[p][0]);
            close(fds[p][1]);
        }
        for (int p = 0; p < procs; p++)
            wait(NULL);
        printf("%s=%.0f\n", names[w], total);
        fflush(stdout);
    }
    semctl(semid, 0, IPC_RMID);
    return 0;
}
