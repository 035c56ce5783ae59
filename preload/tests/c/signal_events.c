/* Signal handlers that interrupt malloc: a timer fires every 2 ms while the program
 * allocates and frees blocks of up to 70,000 bytes; the handler either forks (the child
 * _exits at once, or with "forkrun" returns from the handler, so that the code it interrupted
 * goes on in the child, allocates and frees for 20 more rounds of 64 and then _exits) or
 * allocates and frees itself.
 *
 *   signal_events fork|forkrun|malloc single|threads SECONDS [PERIOD_US]
 *
 * PERIOD_US (default 2000) is the timer's period in microseconds. A fork from the handler can
 * take longer than 2 ms (a COREHEAP_SHM child copies the heap before the parent goes on): the
 * next signal is then pending when the handler returns and the handler runs again at once,
 * so the interrupted code hardly moves and is interrupted at few places; a longer period
 * lets it run between the handler's runs.
 *
 * "single": the main thread alone; "threads": two more threads allocate too, with the timer
 * signal blocked (so one thread at a time runs the handler: two threads that each fork from a
 * handler that interrupted them inside malloc can wait for each other's locks, under glibc's
 * malloc as under coreheap). Prints "signal events ok: N handler runs" when done; a hang is
 * the test harness's to catch (it kills the program after its time limit). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t runs;
static volatile sig_atomic_t failures;
static volatile int stop;
static int handler_forks;
static int child_runs;
static volatile sig_atomic_t in_child;

static double now(void);
static double deadline;

static void on_timer(int sig) {
    (void)sig;
    int saved = errno;
    if (now() >= deadline) {
        /* Past the deadline: the timer goes off (setitimer and clock_gettime are
         * async-signal-safe). Without this, on a loaded machine where a fork takes longer
         * than the 2 ms period, the handler would run back to back and the interrupted loop
         * would never get to look at the clock. */
        struct itimerval off = {{0, 0}, {0, 0}};
        setitimer(ITIMER_REAL, &off, NULL);
    } else if (handler_forks) {
        pid_t pid = fork();
        if (pid == 0) {
            if (!child_runs)
                _exit(0);
            /* The child's only thread: no timer (fork does not inherit it), back to the
             * interrupted code, which churn() ends after a few rounds. */
            in_child = 1;
        }
        if (pid > 0) {
            int st;
            while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
            }
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
                failures++;
        }
    } else {
        /* Not async-signal-safe by POSIX; the allocator must serve it or say why not. */
        size_t n = 16 + (size_t)runs % 9000;
        char *p = malloc(n);
        if (p == NULL) {
            failures++;
        } else {
            memset(p, 0x5a, n);
            free(p);
        }
    }
    runs++;
    errno = saved;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *churn(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg;
    if (seed != 3) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGALRM);
        pthread_sigmask(SIG_BLOCK, &set, NULL);
    }
    void *slots[32] = {0};
    size_t sizes[32] = {0};
    int child_rounds = 0;
    while (!stop && now() < deadline) {
        if (in_child && ++child_rounds > 20)
            _exit(0);
        for (int k = 0; k < 64; k++) {
            unsigned i = rand_r(&seed) % 32;
            if (slots[i]) {
                if (((unsigned char *)slots[i])[sizes[i] - 1] != (unsigned char)i) {
                    printf("FAIL: block %u damaged\n", i);
                    exit(1);
                }
                free(slots[i]);
            }
            size_t sz = 1 + rand_r(&seed) % 70000;
            if (rand_r(&seed) % 4)
                sz = 1 + sz % 600;
            slots[i] = malloc(sz);
            sizes[i] = sz;
            if (slots[i] == NULL) {
                printf("FAIL: malloc(%zu) returned null\n", sz);
                exit(1);
            }
            memset(slots[i], (int)i, sz);
        }
    }
    for (int i = 0; i < 32; i++)
        free(slots[i]);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr,
                "usage: signal_events fork|forkrun|malloc single|threads SECONDS [PERIOD_US]\n");
        return 2;
    }
    child_runs = strcmp(argv[1], "forkrun") == 0;
    handler_forks = child_runs || strcmp(argv[1], "fork") == 0;
    int threads = strcmp(argv[2], "threads") == 0;
    deadline = now() + atof(argv[3]);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_timer;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    /* Started after the first malloc, so the heap is initialised before any handler runs. */
    free(malloc(1));
    pthread_t t[2];
    if (threads)
        for (int i = 0; i < 2; i++)
            pthread_create(&t[i], NULL, churn, (void *)(uintptr_t)(i + 7));
    long period = argc == 5 ? atol(argv[4]) : 2000;
    if (period < 1 || period > 999999) {
        fprintf(stderr, "signal_events: PERIOD_US must be 1 to 999999\n");
        return 2;
    }
    struct itimerval it = {{0, period}, {0, period}};
    setitimer(ITIMER_REAL, &it, NULL);
    churn((void *)(uintptr_t)3);
    if (in_child)
        _exit(0); /* a "forkrun" child past the deadline: its other threads are the parent's */
    stop = 1;
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    if (threads)
        for (int i = 0; i < 2; i++)
            pthread_join(t[i], NULL);
    if (failures) {
        printf("FAIL: %d handler runs failed\n", (int)failures);
        return 1;
    }
    printf("signal events ok: %d handler runs\n", (int)runs);
    return 0;
}
