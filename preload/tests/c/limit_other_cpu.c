/* A fresh process pins itself to one CPU before its first allocation of its own (the arena
 * of that CPU maps a chunk), then, under an address-space limit that leaves no room for
 * another chunk, moves to a second CPU and allocates blocks of several small and large
 * classes there: the second CPU's arena cannot map memory, so the first one must serve them
 * (through the per-CPU cache's refill too, not only the locked path). Prints "other cpu ok"
 * on success, "skipped: ..." where there are not two CPUs to use.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static int pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    return sched_setaffinity(0, sizeof s, &s);
}

static size_t vm_size(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long pages = 0;
    if (f) {
        if (fscanf(f, "%lu", &pages) != 1)
            pages = 0;
        fclose(f);
    }
    return pages * (size_t)sysconf(_SC_PAGESIZE);
}

int main(void) {
    cpu_set_t allowed;
    int cpus[2], n = 0;
    if (sched_getaffinity(0, sizeof allowed, &allowed) != 0)
        return 2;
    for (int i = 0; i < CPU_SETSIZE && n < 2; i++)
        if (CPU_ISSET(i, &allowed))
            cpus[n++] = i;
    if (n < 2 || pin(cpus[0]) != 0) {
        printf("skipped: fewer than two CPUs\n");
        return 0;
    }
    int c1 = cpus[1];
    free(malloc(100));
    /* Everything so far ran on the first CPU; its arena has a chunk. */
    size_t vm = vm_size();
    if (vm == 0)
        return 2;
    struct rlimit rl = {vm + (1 << 20), vm + (1 << 20)};
    if (setrlimit(RLIMIT_AS, &rl) != 0)
        return 2;
    if (pin(c1) != 0) {
        printf("skipped: cannot move to CPU %d\n", c1);
        return 0;
    }
    static void *kept[5][40];
    static const size_t sizes[5] = {16, 100, 1000, 4000, 9000};
    for (int s = 0; s < 5; s++) {
        for (int i = 0; i < 40; i++) {
            void *p = malloc(sizes[s]);
            if (p == NULL) {
                fprintf(stderr, "malloc(%zu) failed on CPU %d (block %d)\n", sizes[s], c1, i);
                return 1;
            }
            memset(p, 0x5a, sizes[s]);
            kept[s][i] = p;
        }
    }
    for (int s = 0; s < 5; s++)
        for (int i = 0; i < 40; i++) {
            unsigned char *p = kept[s][i];
            if (p[0] != 0x5a || p[sizes[s] - 1] != 0x5a) {
                fprintf(stderr, "block of %zu bytes damaged\n", sizes[s]);
                return 1;
            }
            free(p);
        }
    printf("other cpu ok\n");
    return 0;
}
