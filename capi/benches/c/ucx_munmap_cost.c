/*
 * Cost per munmap of a cached region: UCX's registration cache told by
 * our monitor (`ours`: UCX's hooks off, a monitor hook calls
 * ucm_vm_munmap) or by UCX's own mmap hooks (`ucx`). Each round maps a
 * 64 KiB buffer, registers it in a ucs_rcache (fake mem_reg), puts it,
 * then times munmap until UCX has been told (ours: munmap +
 * notifier_monitor_sync; ucx: munmap, whose hook dispatches before the
 * system call), and checks the region was invalidated. Prints the median
 * and p90 in ns. Run by capi/benches/ucx_munmap.sh, both modes in one run.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include <notifier.h>
#include <ucm/api/ucm.h>
#include <ucs/memory/rcache.h>

#define LEN    (64ul << 10)
#define ROUNDS 2000

static uint64_t regs, deregs;
static volatile uint64_t told;

static ucs_status_t reg(void *c, ucs_rcache_t *r, void *a, ucs_rcache_region_t *g, uint16_t f)
{ (void)c; (void)r; (void)a; (void)g; (void)f; ++regs; return UCS_OK; }
static void dereg(void *c, ucs_rcache_t *r, ucs_rcache_region_t *g) { (void)c; (void)r; (void)g; ++deregs; }
static void dump(void *c, ucs_rcache_t *r, ucs_rcache_region_t *g, char *b, size_t m)
{ (void)c; (void)r; (void)g; snprintf(b, m, "-"); }
static const ucs_rcache_ops_t ops = { .mem_reg = reg, .mem_dereg = dereg, .dump_region = dump };

static void hook(void *arg, void *addr, size_t len, uint32_t ev)
{
    (void)arg;
    if (ev == NOTIFIER_EVENT_UNMAP || ev == NOTIFIER_EVENT_CLEAR) {
        ucm_vm_munmap(addr, len);
        ++told;
    }
}

static uint64_t now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int ours = argc > 1 && !strcmp(argv[1], "ours");
    notifier_monitor m = {0};
    ucs_rcache_params_t p;
    ucs_rcache_t *rc;
    static uint64_t t[ROUNDS];

    if (ours) {
        ucm_set_external_event(UCM_EVENT_VM_UNMAPPED);
        if (notifier_monitor_create(0, &m) || notifier_monitor_add_hook(m, hook, NULL, NULL)) {
            fprintf(stderr, "SKIP: no monitor\n");
            return 77;
        }
    }
    memset(&p, 0, sizeof(p));
    p.region_struct_size = sizeof(ucs_rcache_region_t);
    p.alignment = p.max_alignment = 4096;
    p.ucm_events = UCM_EVENT_VM_UNMAPPED;
    p.ucm_event_priority = 1000;
    p.ops = &ops;
    p.max_regions = (unsigned long)-1;
    p.max_size = p.max_unreleased = (size_t)-1;
    if (ucs_rcache_create(&p, "munmap-cost", NULL, &rc) != UCS_OK) {
        fprintf(stderr, "FAIL: ucs_rcache_create (%s hooks)\n", ours ? "ours" : "UCX's");
        return 1;
    }
    for (int i = 0; i < ROUNDS; ++i) {
        ucs_rcache_region_t *r;
        char *b = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (b == MAP_FAILED || (ours && notifier_monitor_watch(m, b, LEN))) return 1;
        b[0] = 1;
        if (ucs_rcache_get(rc, b, LEN, PROT_READ | PROT_WRITE, NULL, &r) != UCS_OK) return 1;
        ucs_rcache_region_put(rc, r);
        uint64_t t0 = now();
        munmap(b, LEN);
        if (ours) notifier_monitor_sync(m);
        t[i] = now() - t0;
    }
    /* One more get drains the invalidations: every region deregistered. */
    {
        ucs_rcache_region_t *r;
        char *b = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        ucs_rcache_get(rc, b, LEN, PROT_READ | PROT_WRITE, NULL, &r);
        ucs_rcache_region_put(rc, r);
        munmap(b, LEN);
    }
    qsort(t, ROUNDS, sizeof(t[0]), cmp);
    printf("%s: munmap of a cached 64 KiB region until UCX is told: median %llu ns, p90 %llu ns "
           "(%d rounds, %llu registrations, %llu deregistrations)\n",
           ours ? "our monitor -> ucm_vm_munmap" : "UCX's own mmap hooks",
           (unsigned long long)t[ROUNDS / 2], (unsigned long long)t[ROUNDS * 9 / 10], ROUNDS,
           (unsigned long long)regs, (unsigned long long)deregs);
    ucs_rcache_destroy(rc);
    if (ours) notifier_monitor_destroy(m);
    if (deregs < ROUNDS) {
        fprintf(stderr, "FAIL: only %llu of %d unmapped regions were deregistered\n",
                (unsigned long long)deregs, ROUNDS);
        return 1;
    }
    return 0;
}
