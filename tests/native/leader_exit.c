/* A C worker whose main thread exits while another thread holds the table lock:
 * `leader_exit KEY SECONDS`. The holder thread takes the lock, prints "held", keeps it SECONDS,
 * prints "released" after giving it back (and "lost" if the lock word no longer named it by then:
 * someone took it over while it was inside), then exits the process. main() calls pthread_exit
 * right after starting it: /proc/<pid>/stat of the process then shows 'Z' (the thread-group
 * leader is a zombie) although the process lives on, inside the lock. */
#define _GNU_SOURCE
#define STATED_IMPLEMENTATION
#include "stated_core.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static stated_table t;
static double seconds;

static void *hold(void *arg)
{
    (void)arg;
    int rc = stated_acquire(&t);
    if (rc) {
        fprintf(stderr, "leader_exit: acquire: %s (%s)\n", stated_strerror(rc), stated_errmsg(&t));
        exit(4);
    }
    printf("held\n");
    fflush(stdout);
    struct timespec ts = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    nanosleep(&ts, NULL);
    int still = stated_holding(&t);
    stated_release(&t);
    printf("%s\n", still ? "released" : "lost");
    fflush(stdout);
    exit(0);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: leader_exit KEY SECONDS\n");
        return 2;
    }
    stated_key_t key = (stated_key_t)strtol(argv[1], NULL, 0);
    seconds = strtod(argv[2], NULL);
    stated_options o;
    stated_options_init(&o);
    int rc = stated_open_ex(key, "leader", &o, &t);
    if (rc) {
        fprintf(stderr, "leader_exit: open: %s (%s)\n", stated_strerror(rc), stated_errmsg(&t));
        return 4;
    }
    pthread_t th;
    if (pthread_create(&th, NULL, hold, NULL) != 0)
        return 4;
    pthread_exit(NULL);
}
