/* glibc's interfaces as glibc answers them: the legacy mallinfo, malloc_stats' format
 * (checked by the test harness on stderr), and no cancellation point inside the allocator:
 * a thread with a cancellation pending completes malloc_stats and fork (with COREHEAP_SHM,
 * whose fork handlers wait for the child) before it is cancelled.
 *
 *   glibc_formats            prints "formats ok" when every check passed */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile int stats_done;
static volatile pid_t forked = -1;

static void *stats_then_cancel(void *arg) {
    (void)arg;
    pthread_cancel(pthread_self());
    malloc_stats();
    stats_done = 1;
    pthread_testcancel();
    return NULL;
}

static void *fork_then_cancel(void *arg) {
    (void)arg;
    pthread_cancel(pthread_self());
    pid_t pid = fork();
    if (pid == 0)
        _exit(0);
    forked = pid;
    pthread_testcancel();
    return NULL;
}

static int run_cancelled(void *(*fn)(void *)) {
    pthread_t t;
    void *ret;
    if (pthread_create(&t, NULL, fn, NULL) != 0)
        return 0;
    pthread_join(t, &ret);
    return ret == PTHREAD_CANCELED;
}

int main(void) {
    int fails = 0;
    struct mallinfo before = mallinfo();
    char *volatile p = malloc(1 << 20);
    memset(p, 1, 1 << 20);
    struct mallinfo during = mallinfo();
    struct mallinfo2 during2 = mallinfo2();
    if (during.uordblks - before.uordblks < (1 << 20)) {
        printf("FAIL: mallinfo's uordblks grew by %d for a 1 MiB block\n",
               during.uordblks - before.uordblks);
        fails++;
    }
    if ((size_t)during.arena != during2.arena || (size_t)during.uordblks != during2.uordblks ||
        during.fordblks != during.arena - during.uordblks || during.usmblks != 0) {
        printf("FAIL: mallinfo and mallinfo2 disagree, or fordblks != arena - uordblks\n");
        fails++;
    }
    free(p);
    char *volatile h = malloc(8 << 20);
    h[0] = 1;
    struct mallinfo huge = mallinfo();
    if (huge.hblks < 1 || huge.hblkhd < (8 << 20)) {
        printf("FAIL: an 8 MiB block is not in hblks/hblkhd (%d, %d)\n", huge.hblks, huge.hblkhd);
        fails++;
    }
    free(h);

    if (!run_cancelled(stats_then_cancel) || !stats_done) {
        printf("FAIL: malloc_stats was cancelled before it finished\n");
        fails++;
    }
    if (!run_cancelled(fork_then_cancel) || forked <= 0) {
        printf("FAIL: fork lost its child's pid to a pending cancellation\n");
        fails++;
    } else {
        int st;
        waitpid(forked, &st, 0);
    }
    if (fails == 0)
        printf("formats ok\n");
    return fails != 0;
}
