#include <notifier.h>
#include <stdio.h>
#include <stdlib.h>
int main(void) {
    notifier_monitor m; notifier_registry r; notifier_mr a, b; notifier_stats s;
    char err[512]; size_t len = 1 << 20;                 /* glibc mmaps a 1 MiB malloc */
    if (notifier_monitor_create(0, &m)) { notifier_last_error(err, sizeof err); puts(err); return 77; }
    notifier_registry_create(m, NULL, &r);
    char *buf = malloc(len); notifier_monitor_watch(m, buf, len);
    notifier_registry_get(r, buf, len, NOTIFIER_ACCESS_LOCAL_WRITE, &a); notifier_registry_put(r, &a);
    free(buf);                                           /* munmap: the monitor invalidates */
    notifier_monitor_sync(m);                            /* ... before this returns */
    buf = malloc(len); notifier_monitor_watch(m, buf, len);
    notifier_registry_get(r, buf, len, NOTIFIER_ACCESS_LOCAL_WRITE, &b); notifier_registry_put(r, &b);
    notifier_registry_stats(r, &s);
    printf("lkey %#x -> %#x, %llu invalidated, %llu registered\n", a.lkey, b.lkey,
           (unsigned long long)s.invalidations, (unsigned long long)s.misses);
    notifier_registry_destroy(r); notifier_monitor_destroy(m); free(buf);
    return !(s.invalidations == 1 && s.misses == 2 && a.lkey != b.lkey);
}
