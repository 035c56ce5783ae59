/* Threads allocate and free without pause while the main thread forks many times; each child
 * allocates from a new thread and exits. A child that hangs is killed by alarm(). */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile int stop;

static void *churn(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg;
    void *slots[64] = {0};
    while (!stop) {
        unsigned i = rand_r(&seed) % 64;
        free(slots[i]);
        size_t sz = (rand_r(&seed) % 8 == 0) ? (rand_r(&seed) % 300000) : (rand_r(&seed) % 512);
        slots[i] = malloc(sz + 1);
        if (slots[i]) memset(slots[i], (int)i, sz + 1);
    }
    for (int i = 0; i < 64; i++) free(slots[i]);
    return NULL;
}

static void *child_thread(void *arg) {
    (void)arg;
    for (int i = 0; i < 1000; i++) {
        char *p = malloc(i * 13 + 1);
        if (!p) return (void *)1;
        p[0] = 1;
        free(p);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int forks = argc > 1 ? atoi(argv[1]) : 300;
    pthread_t t[4];
    for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, churn, (void *)(i + 1));
    char *inherited = malloc(1000);
    memset(inherited, 7, 1000);
    for (int f = 0; f < forks; f++) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid == 0) {
            alarm(10);
            pthread_t ct;
            void *res = (void *)1;
            char *mine = malloc(12345);
            if (!mine) _exit(3);
            if (pthread_create(&ct, NULL, child_thread, NULL) != 0) _exit(4);
            pthread_join(ct, &res);
            for (int i = 0; i < 1000; i++) if (inherited[i] != 7) _exit(5);
            free(mine);
            free(inherited);
            _exit(res == NULL ? 0 : 6);
        }
        int st;
        if (waitpid(pid, &st, 0) != pid) { perror("waitpid"); return 1; }
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "child %d failed: status %#x\n", f, st);
            return 1;
        }
    }
    stop = 1;
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    printf("forks ok %d\n", forks);
    return 0;
}
