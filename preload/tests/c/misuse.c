/* Each argument names one misuse; the allocator must abort with a message naming the pointer.
 * "uninit" is not a misuse: it prints what a fresh block holds (debug mode fills it). */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Moves the calling thread to the n-th CPU it may run on; returns 0 if there is none. */
static int move_to_cpu(int n) {
    cpu_set_t all, one;
    if (sched_getaffinity(0, sizeof all, &all)) return 0;
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (CPU_ISSET(c, &all) && n-- == 0) {
            CPU_ZERO(&one);
            CPU_SET(c, &one);
            return sched_setaffinity(0, sizeof one, &one) == 0;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *c = argc > 1 ? argv[1] : "";
    char *volatile p = malloc(64);
    memset(p, 1, 64);
    if (!strcmp(c, "stack")) { char buf[32]; char *volatile q = buf; free(q); }
    else if (!strcmp(c, "interior")) free(p + 8);
    else if (!strcmp(c, "double")) { free(p); free(p); }
    else if (!strcmp(c, "realloc-stack")) { char buf[32]; char *volatile q = buf; p = realloc(q, 100); }
    else if (!strcmp(c, "realloc-freed")) { free(p); p = realloc(p, 100); }
    else if (!strcmp(c, "double-other-cpu")) {
        /* Freed on one CPU (into its cache), freed again on another. */
        if (!move_to_cpu(0) || !move_to_cpu(1)) { printf("skip: needs two CPUs\n"); return 0; }
        move_to_cpu(0);
        char *volatile q = malloc(48);
        free(q);
        move_to_cpu(1);
        free(q);
    }
    else if (!strcmp(c, "overwrite-link")) {
        /* A write after free over the free-list link, then the allocation that follows it. */
        free(p);
        for (int i = 0; i < 8; i++) ((volatile char *)p)[i] = 0x41;
        char *volatile q = malloc(64);
        char *volatile r = malloc(64);
        printf("got %p %p\n", (void *)q, (void *)r);
    }
    else if (!strcmp(c, "overflow1")) {
        /* Volatile stores: the compiler may not drop a store it can prove is out of bounds. */
        volatile char *q = malloc(100);
        q[100] = 'x';
        free((void *)q);
    }
    else if (!strcmp(c, "write-after-free")) {
        volatile char *q = malloc(100);
        free((void *)q);
        q[40] = 7;
        char *volatile r = malloc(100);
        printf("got %p\n", (void *)r);
    }
    else if (!strcmp(c, "uninit")) {
        unsigned char *volatile q = malloc(40);
        int fill = 1;
        for (int i = 0; i < 40; i++) fill &= q[i] == 0xa5;
        unsigned char *volatile z = calloc(1, 40);
        int zero = 1;
        for (int i = 0; i < 40; i++) zero &= z[i] == 0;
        printf("uninit %s, calloc %s\n", fill ? "filled" : "not filled", zero ? "zero" : "NOT ZERO");
        free(q);
        free(z);
        return 0;
    }
    printf("survived %s\n", c);
    return 0;
}
