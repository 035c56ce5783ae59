/* Runs with COREHEAP_SHM=NAME:SIZE under the preload library: every malloc comes from the
 * shared heap. Builds a table of strings (with some churn of malloc, calloc, realloc and
 * free around it), publishes it as the heap's root and exits without freeing it, so that
 * another process can map the heap read-only and read the strings back. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* From the preload library, looked up at run time (the program is not linked with it). */
static int (*coreheap_shm_set_root)(void *);
static void *(*coreheap_shm_root)(void);

struct table {
    uint64_t magic;
    uint64_t count;
    char **items;
};

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    coreheap_shm_set_root = (int (*)(void *))dlsym(RTLD_DEFAULT, "coreheap_shm_set_root");
    coreheap_shm_root = (void *(*)(void))dlsym(RTLD_DEFAULT, "coreheap_shm_root");
    if (!coreheap_shm_set_root || !coreheap_shm_root) {
        puts("not running under coreheap");
        return 1;
    }
    struct table *t = calloc(1, sizeof *t);
    t->items = NULL;
    for (int i = 0; i < n; i++) {
        char buf[128];
        int len = snprintf(buf, sizeof buf, "string %d of %d: %.*s", i, n, i % 60,
                           "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefgh");
        /* Churn that is freed again. */
        char *junk = malloc(16 + i % 3000);
        memset(junk, 0x77, 16 + i % 3000);
        t->items = realloc(t->items, (i + 1) * sizeof(char *));
        t->items[i] = strdup(buf);
        (void)len;
        free(junk);
    }
    t->count = n;
    t->magic = 0x73676e6972747363ULL; /* "cstrings" */
    if (coreheap_shm_set_root(t) != 0) {
        puts("set_root failed: the heap is not shared");
        return 1;
    }
    if (coreheap_shm_root() != t) {
        puts("root does not read back");
        return 1;
    }
    printf("published %d strings at %p\n", n, (void *)t);
    return 0;
}
