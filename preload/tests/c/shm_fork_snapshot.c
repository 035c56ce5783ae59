/* COREHEAP_SHM: a fork child's heap is the parent's heap at one instant, also while another
 * thread of the parent writes into its objects (the child copies the shared heap into private
 * memory after the fork; the parent's other threads must not run meanwhile).
 *
 *   shm_fork_snapshot FORKS [noreadv]
 *
 * With "noreadv", a seccomp filter first makes process_vm_readv fail with EPERM (as nspawn
 * without CAP_SYS_PTRACE does): the stop cannot read the set a sigwaitinfo waits for.
 *
 * A writer thread loops on `last = c; first = c; c++` (release stores) on the last and the
 * first word of a 48 MiB block, fully touched so that the child's copy takes milliseconds.
 * At any instant first <= last <= first + 1; each child checks that of its copy (the copy runs
 * from low addresses to high: a torn one shows last far ahead of first) and exits with 0 if
 * so. Prints "snapshot ok FORKS" when every child did, else "torn K of FORKS".
 *
 * Another thread blocks every signal and waits for them with sigwaitinfo, as programs with a
 * signal-handling thread do: the stop must not hand it a signal (it would see one it never
 * asked for), nor wait for it. A third thread creates short-lived threads that allocate, one
 * after another, so that threads appear and exit while a fork stops them. Prints the slowest
 * fork too. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define WORDS ((48u << 20) / sizeof(uint64_t))

static uint64_t *block;
static volatile int stop;
static volatile int unexpected;

static void *short_lived(void *arg) {
    char *p = malloc((size_t)(uintptr_t)arg);
    if (p)
        p[0] = 1;
    free(p);
    return NULL;
}

static void *spawner(void *arg) {
    (void)arg;
    for (uintptr_t i = 0; !stop; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, short_lived, (void *)(i % 5000 + 1)) == 0)
            pthread_join(t, NULL);
    }
    return NULL;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void *signal_waiter(void *arg) {
    (void)arg;
    sigset_t all;
    sigfillset(&all);
    while (!stop) {
        int sig = sigwaitinfo(&all, NULL);
        if (sig > 0 && sig != SIGUSR1)
            unexpected = sig;
    }
    return NULL;
}

static void *writer(void *arg) {
    (void)arg;
    uint64_t c = 1;
    while (!stop) {
        __atomic_store_n(&block[WORDS - 1], c, __ATOMIC_RELEASE);
        __atomic_store_n(&block[0], c, __ATOMIC_RELEASE);
        c++;
    }
    return NULL;
}

/* process_vm_readv fails with EPERM from now on, in every thread created after. */
static int deny_process_vm_readv(void) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_process_vm_readv, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof f / sizeof f[0], f};
    return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
           prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0;
}

int main(int argc, char **argv) {
    int forks = argc > 1 ? atoi(argv[1]) : 50;
    if (argc > 2 && strcmp(argv[2], "noreadv") == 0 && !deny_process_vm_readv()) {
        printf("FAIL: no seccomp filter\n");
        return 1;
    }
    block = malloc(WORDS * sizeof(uint64_t));
    if (!block) {
        printf("FAIL: no block\n");
        return 1;
    }
    memset(block, 0, WORDS * sizeof(uint64_t));
    pthread_t t, w, sp;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int made = pthread_create(&w, NULL, signal_waiter, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (made != 0 || pthread_create(&t, NULL, writer, NULL) != 0 ||
        pthread_create(&sp, NULL, spawner, NULL) != 0) {
        printf("FAIL: no thread\n");
        return 1;
    }
    while (__atomic_load_n(&block[0], __ATOMIC_ACQUIRE) == 0) {
    }
    int torn = 0;
    double slowest = 0;
    for (int i = 0; i < forks; i++) {
        double start = now_ms();
        pid_t pid = fork();
        if (pid < 0) {
            printf("FAIL: fork\n");
            return 1;
        }
        if (pid == 0) {
            uint64_t first = block[0], last = block[WORDS - 1];
            /* A child that cannot tell gets killed by the parent's time limit. */
            _exit(last >= first && last - first <= 1 ? 0 : 1);
        }
        int st;
        if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st)) {
            printf("FAIL: child %d did not exit normally\n", i);
            return 1;
        }
        torn += WEXITSTATUS(st) != 0;
        if (now_ms() - start > slowest)
            slowest = now_ms() - start;
    }
    uint64_t before = __atomic_load_n(&block[0], __ATOMIC_ACQUIRE);
    int moving = 0;
    for (int i = 0; i < 5000 && !moving; i++) {
        usleep(1000);
        moving = __atomic_load_n(&block[0], __ATOMIC_ACQUIRE) != before;
    }
    stop = 1;
    pthread_join(t, NULL);
    pthread_join(sp, NULL);
    pthread_kill(w, SIGUSR1);
    pthread_join(w, NULL);
    free(block);
    if (!moving)
        printf("FAIL: the writer stopped after the forks\n");
    if (unexpected)
        printf("FAIL: the signal-waiting thread received signal %d\n", unexpected);
    if (torn)
        printf("torn %d of %d\n", torn, forks);
    else
        printf("snapshot ok %d\n", forks);
    printf("slowest fork %.1f ms\n", slowest);
    return torn != 0 || !moving || unexpected;
}
