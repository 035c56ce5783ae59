/* Each argument names one misuse; the allocator must abort with a message naming the pointer. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    const char *c = argc > 1 ? argv[1] : "";
    char *volatile p = malloc(64);
    memset(p, 1, 64);
    if (!strcmp(c, "stack")) { char buf[32]; char *volatile q = buf; free(q); }
    else if (!strcmp(c, "interior")) free(p + 8);
    else if (!strcmp(c, "double")) { free(p); free(p); }
    else if (!strcmp(c, "realloc-stack")) { char buf[32]; char *volatile q = buf; p = realloc(q, 100); }
    printf("survived %s\n", c);
    return 0;
}
