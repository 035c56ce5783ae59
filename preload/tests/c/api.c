/* Checks the C allocation interface under LD_PRELOAD=libcoreheap_preload.so.
 * Prints "ok <name>" per check; exits non-zero at the first failure. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <dlfcn.h>

static int failures;
#define CHECK(name, cond) do { if (cond) printf("ok %s\n", name); \
    else { printf("FAIL %s (line %d)\n", name, __LINE__); failures++; } } while (0)

static int aligned(void *p, size_t a) { return ((uintptr_t)p & (a - 1)) == 0; }

int main(void) {
    /* The library really is the allocator of this process. */
    void *sym = dlsym(RTLD_DEFAULT, "malloc");
    Dl_info info;
    CHECK("malloc resolves to coreheap", sym && dladdr(sym, &info) && info.dli_fname &&
          strstr(info.dli_fname, "coreheap_preload") != NULL);

    /* cfree and glibc's __libc_* entry points reach coreheap too: a block from one may be
     * freed by any other. (Called through dlsym: glibc links cfree for old binaries only.) */
    {
        const char *names[] = {"__libc_malloc", "__libc_free", "__libc_calloc",
                               "__libc_realloc", "__libc_memalign", "cfree"};
        void *f[6];
        int all = 1;
        for (size_t i = 0; i < 6; i++) {
            Dl_info di;
            f[i] = dlsym(RTLD_DEFAULT, names[i]);
            all &= f[i] && dladdr(f[i], &di) && di.dli_fname &&
                   strstr(di.dli_fname, "coreheap_preload") != NULL;
        }
        CHECK("cfree and __libc_* resolve to coreheap", all);
        if (all) {
            void *(*lmalloc)(size_t) = (void *(*)(size_t))f[0];
            void (*lfree)(void *) = (void (*)(void *))f[1];
            void *(*lcalloc)(size_t, size_t) = (void *(*)(size_t, size_t))f[2];
            void *(*lrealloc)(void *, size_t) = (void *(*)(void *, size_t))f[3];
            void *(*lmemalign)(size_t, size_t) = (void *(*)(size_t, size_t))f[4];
            void (*lcfree)(void *) = (void (*)(void *))f[5];
            char *m = lmalloc(100);
            char *c = lcalloc(10, 10);
            char *al = lmemalign(256, 100);
            memset(m, 7, 100);
            m = lrealloc(m, 5000);
            CHECK("__libc_* blocks", m && c && al && aligned(al, 256) && m[99] == 7 &&
                  c[99] == 0 && malloc_usable_size(m) >= 5000);
            free(m);
            lfree(c);
            lcfree(al);
            lfree(malloc(40));
        }
    }

    /* malloc_info: glibc's XML layout; mallopt: glibc's parameters accepted, others not. */
    {
        FILE *f = tmpfile();
        void *keep = malloc(100);
        free(malloc(48));
        int r = malloc_info(0, f);
        char xml[65536] = {0};
        rewind(f);
        size_t n = fread(xml, 1, sizeof xml - 1, f);
        fclose(f);
        CHECK("malloc_info writes glibc's XML", r == 0 && n > 0 &&
              strncmp(xml, "<malloc version=\"1\">\n<heap nr=\"0\">", 32) == 0 &&
              strstr(xml, "<total type=\"mmap\"") && strstr(xml, "</malloc>\n"));
        errno = 0;
        CHECK("malloc_info options EINVAL", malloc_info(1, stdout) == -1 && errno == EINVAL);
        CHECK("mallopt accepts glibc's parameters", mallopt(M_MMAP_THRESHOLD, 1 << 20) == 1 &&
              mallopt(M_TRIM_THRESHOLD, 1 << 20) == 1 && mallopt(M_ARENA_MAX, 2) == 1);
        CHECK("mallopt refuses others", mallopt(12345, 1) == 0);
        free(keep);
    }

    /* mallopt(M_TRIM_THRESHOLD) is coreheap's dirty limit: with 1 MiB, of 32 MiB freed in
     * runs that cannot merge (every other block of 64 MiB) at most an eighth of what is
     * mapped stays dirty (mallinfo's keepcost); with 1 GiB all of it. */
    {
        size_t kept[2];
        int limits[2] = {1 << 20, 1 << 30};
        for (int round = 0; round < 2; round++) {
            static void *blocks[256];
            mallopt(M_TRIM_THRESHOLD, limits[round]);
            for (int i = 0; i < 256; i++) {
                blocks[i] = malloc(256 << 10);
                if (blocks[i]) memset(blocks[i], 1, 256 << 10);
            }
            for (int i = 0; i < 256; i += 2) free(blocks[i]);
            kept[round] = mallinfo2().keepcost;
            for (int i = 1; i < 256; i += 2) free(blocks[i]);
        }
        CHECK("mallopt(M_TRIM_THRESHOLD) sets the dirty limit",
              kept[0] <= (10u << 20) && kept[1] >= (30u << 20));
        printf("  keepcost with 1 MiB: %zu, with 1 GiB: %zu\n", kept[0], kept[1]);
        mallopt(M_TRIM_THRESHOLD, 64 << 20); /* coreheap's default again */
    }

    void *a = malloc(0), *b = malloc(0);
    CHECK("malloc(0) unique and freeable", a && b && a != b);
    free(a); free(b);

    errno = 0;
    CHECK("malloc above PTRDIFF_MAX", malloc((size_t)PTRDIFF_MAX + 1) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK("calloc overflow", calloc(SIZE_MAX / 2, 3) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK("reallocarray overflow", reallocarray(NULL, SIZE_MAX / 2, 3) == NULL && errno == ENOMEM);

    void *p = NULL;
    CHECK("posix_memalign EINVAL non power of two", posix_memalign(&p, 24, 8) == EINVAL);
    CHECK("posix_memalign EINVAL below sizeof(void*)", posix_memalign(&p, 4, 8) == EINVAL);
    CHECK("posix_memalign ENOMEM", posix_memalign(&p, 64, (size_t)PTRDIFF_MAX + 1) == ENOMEM);
    size_t aligns[] = {8, 16, 64, 4096, 65536, 1 << 20, 4 << 20};
    int all_ok = 1;
    for (unsigned i = 0; i < sizeof aligns / sizeof *aligns; i++) {
        for (size_t sz = 1; sz < (8 << 20); sz = sz * 7 + 3) {
            p = NULL;
            if (posix_memalign(&p, aligns[i], sz) != 0 || !aligned(p, aligns[i])) all_ok = 0;
            else { memset(p, 0xab, sz); free(p); }
        }
    }
    CHECK("posix_memalign alignments 8..4MiB", all_ok);

    p = aligned_alloc(256, 1000);
    CHECK("aligned_alloc", p && aligned(p, 256));
    free(p);
    p = memalign(64, 100);
    CHECK("memalign", p && aligned(p, 64));
    free(p);
    p = valloc(10);
    CHECK("valloc", p && aligned(p, 4096));
    free(p);
    p = pvalloc(5000);
    CHECK("pvalloc rounds to pages", p && aligned(p, 4096) && malloc_usable_size(p) >= 8192);
    free(p);

    all_ok = 1;
    for (size_t sz = 1; sz < (16 << 20); sz = sz * 3 + 1) {
        unsigned char *q = malloc(sz);
        if (!q || !aligned(q, 16)) { all_ok = 0; break; }
        size_t u = malloc_usable_size(q);
        if (u < sz) { all_ok = 0; break; }
        memset(q, 0x5a, u); /* every usable byte is writable */
        free(q);
    }
    CHECK("16-byte aligned, usable size >= request and writable", all_ok);
    CHECK("malloc_usable_size(NULL) == 0", malloc_usable_size(NULL) == 0);

    /* Every small size and alignment: aligned, usable >= size, every usable byte writable,
     * realloc keeps a block while its size needs its class (is above the class below) and
     * moves it into the class below when it fits there, but for classes above 1 KiB, which
     * keep a block that shrinks to no less than half (front::SHRINK_MOVE_MAX). The usable sizes
     * are the classes: powers of two, or (finer classes) at most 25% apart above 64. Debug
     * mode (COREHEAP_DEBUG=1) reports requested sizes and moves on every realloc. */
    const char *dbg = getenv("COREHEAP_DEBUG");
    int debug = dbg && strcmp(dbg, "0") != 0;
    all_ok = 1;
    size_t classes[64], nclasses = 0;
    for (size_t sz = 1; sz <= 8193 && all_ok; sz++) {
        for (size_t al = 16; al <= 4096 && all_ok; al *= 2) {
            if (al > 16 && sz % 7 != 0 && sz % 16 > 1) continue; /* a spread of sizes */
            void *q = NULL;
            if (posix_memalign(&q, al, sz) != 0 || !aligned(q, al)) { all_ok = 0; break; }
            size_t u = malloc_usable_size(q);
            if (u < sz) { all_ok = 0; break; }
            memset(q, 0x33, u);
            if (debug) { free(q); continue; }
            if (al == 16 && sz <= 8192 && (nclasses == 0 || classes[nclasses - 1] != u)) {
                if (nclasses == 64 || (nclasses && classes[nclasses - 1] > u)) all_ok = 0;
                else classes[nclasses++] = u;
            }
            if (sz <= 8192 && al == 16) {
                size_t below = nclasses >= 2 ? classes[nclasses - 2] : 0;
                void *r = realloc(q, u);
                void *s = r == q ? realloc(r, below + 1) : NULL;
                if (r != q || s != q) { printf("realloc moved %zu\n", sz); all_ok = 0; }
                q = s ? s : r;
                if (all_ok && below) {
                    void *t = realloc(q, below);
                    if (u > 1024 && below * 2 >= u) {
                        if (t != q) { printf("realloc of %zu to %zu moved\n", sz, below); all_ok = 0; }
                    } else if (!t || t == q || malloc_usable_size(t) != below) {
                        printf("realloc of %zu to %zu kept the block\n", sz, below);
                        all_ok = 0;
                    }
                    q = t ? t : q;
                }
            }
            free(q);
        }
    }
    for (size_t i = 1; i < nclasses && all_ok; i++) {
        size_t a = classes[i - 1], b = classes[i];
        int pow2 = nclasses <= 10;
        if (pow2 ? b != 2 * a : (a >= 64 && (b - a) * 4 > a)) {
            printf("classes %zu -> %zu\n", a, b);
            all_ok = 0;
        }
    }
    CHECK("every small size and alignment: aligned, writable, realloc in place, classes", all_ok
          && (debug || (nclasses >= 10 && classes[nclasses - 1] == 8192)));

    /* calloc reads zero even when it reuses freed memory. */
    all_ok = 1;
    for (int round = 0; round < 50; round++) {
        size_t sz = 16 + round * 997;
        unsigned char *d = malloc(sz);
        memset(d, 0xff, sz);
        free(d);
        unsigned char *z = calloc(1, sz);
        for (size_t i = 0; i < sz; i++) if (z[i]) { all_ok = 0; break; }
        free(z);
    }
    CHECK("calloc zeroes reused memory", all_ok);

    /* realloc keeps contents, grows and shrinks, crosses size regimes. */
    all_ok = 1;
    unsigned char *r = malloc(10);
    for (int i = 0; i < 10; i++) r[i] = (unsigned char)i;
    size_t sizes[] = {20, 100, 5000, 70000, 3 << 20, 9 << 20, 100000, 50, 11};
    size_t have = 10;
    for (unsigned k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        unsigned char *n = realloc(r, sizes[k]);
        if (!n) { all_ok = 0; break; }
        size_t keep = have < sizes[k] ? have : sizes[k];
        for (size_t i = 0; i < keep; i++) if (n[i] != (unsigned char)(i * 31 % 251) && !(i < 10 && n[i] == i)) { all_ok = 0; break; }
        for (size_t i = 0; i < sizes[k]; i++) n[i] = (unsigned char)(i * 31 % 251);
        r = n; have = sizes[k];
    }
    CHECK("realloc keeps contents across sizes", all_ok);
    errno = 0;
    CHECK("failed realloc leaves block intact", realloc(r, (size_t)PTRDIFF_MAX + 1) == NULL &&
          errno == ENOMEM && r[5] == (unsigned char)(5 * 31 % 251));
    CHECK("realloc(p, 0) frees and returns NULL", realloc(r, 0) == NULL);
    r = realloc(NULL, 33);
    CHECK("realloc(NULL, n) is malloc", r != NULL);
    free(r);

    errno = 4321;
    free(NULL);
    void *e = malloc(100);
    errno = 4321;
    free(e);
    CHECK("free preserves errno", errno == 4321);

    CHECK("malloc_trim", malloc_trim(0) == 1);
    struct mallinfo2 mi = mallinfo2();
    char *volatile big = malloc(50 << 20);
    big[0] = 1;
    struct mallinfo2 mi2 = mallinfo2();
    /* glibc's meanings: a directly mapped block is in hblks/hblkhd, not in uordblks. */
    CHECK("mallinfo2 counts a huge block", mi2.hblkhd >= mi.hblkhd + (50 << 20) && mi2.hblks >= mi.hblks + 1);
    free(big);
    malloc_stats();

    if (failures) { printf("%d failures\n", failures); return 1; }
    printf("all ok\n");
    return 0;
}
