/* Several threads fork at the same time while others allocate; each child allocates, checks
 * a block it inherited and exits. Recent glibc (2.36 here) runs the fork handlers of
 * concurrent forks concurrently (it holds its handler lock only between them),
 * so the allocator's handlers must serialise them themselves. Prints "forks ok N" when
 * every child exited with 0 and the program could still open and close a stream (the stdio
 * list lock the handlers take is free again). A hang is killed by the caller's time limit.
 *
 * EMPTY (default 0) empty fork handler entries are registered after the allocator's: glibc
 * walks such entries with its fork handler lock held, as each fork enters and after its last
 * parent handler, which widens the moments when another thread's fork holds that lock (a
 * thread stopped there by a COREHEAP_SHM prepare handler once made the forking thread wait
 * for it for ever).
 *
 *   fork_concurrent FORKS_PER_THREAD [EMPTY] */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define FORKERS 4

static volatile int stop;
static int per_thread;
static char *inherited;
static int failed;

static void *churn(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg;
    void *slots[64] = {0};
    while (!stop) {
        unsigned i = rand_r(&seed) % 64;
        free(slots[i]);
        size_t sz = rand_r(&seed) % 2048;
        slots[i] = malloc(sz + 1);
        if (slots[i])
            memset(slots[i], (int)i, sz + 1);
    }
    for (int i = 0; i < 64; i++)
        free(slots[i]);
    return NULL;
}

static void *forker(void *arg) {
    (void)arg;
    for (int f = 0; f < per_thread; f++) {
        pid_t pid = fork();
        if (pid < 0) {
            __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
            return NULL;
        }
        if (pid == 0) {
            alarm(10);
            for (int i = 0; i < 100; i++) {
                char *p = malloc(i * 37 + 1);
                if (!p)
                    _exit(3);
                p[0] = 1;
                free(p);
            }
            for (int i = 0; i < 1000; i++)
                if (inherited[i] != 7)
                    _exit(5);
            _exit(0);
        }
        int st;
        if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
            __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

int main(int argc, char **argv) {
    per_thread = argc > 1 ? atoi(argv[1]) : 100;
    inherited = malloc(1000);
    memset(inherited, 7, 1000);
    int empty = argc > 2 ? atoi(argv[2]) : 0;
    for (int i = 0; i < empty; i++)
        if (pthread_atfork(NULL, NULL, NULL) != 0)
            return 2;
    pthread_t c[2], f[FORKERS];
    for (long i = 0; i < 2; i++)
        pthread_create(&c[i], NULL, churn, (void *)(i + 1));
    for (int i = 0; i < FORKERS; i++)
        pthread_create(&f[i], NULL, forker, NULL);
    for (int i = 0; i < FORKERS; i++)
        pthread_join(f[i], NULL);
    stop = 1;
    for (int i = 0; i < 2; i++)
        pthread_join(c[i], NULL);
    FILE *fp = fopen("/dev/null", "w");
    if (!fp || fclose(fp) != 0)
        failed = 1;
    free(inherited);
    if (failed) {
        printf("FAIL: a fork or a child failed\n");
        return 1;
    }
    printf("forks ok %d\n", per_thread * FORKERS);
    return 0;
}
