/*
 * UCX's registration cache driven by our monitor alone.
 *
 * UCX's own memory hooks are off (run with UCX_MEM_MALLOC_HOOKS=no
 * UCX_MEM_MMAP_HOOK_MODE=none, as tests/run_c.sh does) and
 * UCM_EVENT_VM_UNMAPPED is declared external (ucm_set_external_event):
 * UCX then hears of unmapped memory only through ucm_vm_munmap(), which a
 * hook on our monitor calls for every unmap or zap of watched memory.
 *
 * 1. register a buffer in a ucs_rcache (fake mem_reg that counts), hit it;
 * 2. munmap it, map new memory at the same address: UCX's next get is a
 *    fresh registration (a new key), and the old one was deregistered;
 * 3. control: with our hook removed, the same unmap/remap gives a stale
 *    hit, so nothing but our monitor told UCX in step 2.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#include <ucm/api/ucm.h>
#include <ucs/memory/rcache.h>
#include <ucs/type/status.h>

#include "common.h"

#define LEN   (64ul << 10)
#define PROT  (PROT_READ | PROT_WRITE)

struct region {
    ucs_rcache_region_t super;
    uint64_t            key;
};

static uint64_t regs, deregs, next_key;
static volatile uint64_t hook_calls;

static ucs_status_t mem_reg(void *ctx, ucs_rcache_t *rc, void *arg,
                            ucs_rcache_region_t *r, uint16_t flags)
{
    (void)ctx; (void)rc; (void)arg; (void)flags;
    ++regs;
    ((struct region *)r)->key = ++next_key;
    return UCS_OK;
}

static void mem_dereg(void *ctx, ucs_rcache_t *rc, ucs_rcache_region_t *r)
{
    (void)ctx; (void)rc; (void)r;
    ++deregs;
}

static void dump(void *ctx, ucs_rcache_t *rc, ucs_rcache_region_t *r,
                 char *buf, size_t max)
{
    (void)ctx; (void)rc;
    snprintf(buf, max, "key %llu", (unsigned long long)((struct region *)r)->key);
}

static const ucs_rcache_ops_t ops = {
    .mem_reg = mem_reg, .mem_dereg = mem_dereg, .dump_region = dump,
};

/* Our monitor's hook: tell UCX, as its own munmap hook would. Allocates
 * nothing; ucm_vm_munmap takes only libucm's event lock. */
static void to_ucm(void *arg, void *addr, size_t len, uint32_t event)
{
    (void)arg;
    if (event == NOTIFIER_EVENT_UNMAP || event == NOTIFIER_EVENT_CLEAR) {
        ucm_vm_munmap(addr, len);
        __atomic_fetch_add(&hook_calls, 1, __ATOMIC_SEQ_CST);
    }
}

static struct region *get(ucs_rcache_t *rc, void *addr)
{
    ucs_rcache_region_t *r = NULL;
    ucs_status_t st = ucs_rcache_get(rc, addr, LEN, PROT, NULL, &r);
    if (st != UCS_OK) {
        fprintf(stderr, "FAIL: ucs_rcache_get: %s\n", ucs_status_string(st));
        exit(1);
    }
    return (struct region *)r;
}

/* Unmap [addr, +LEN), wait until the monitor applied it, map it again. */
static void unmap_remap(notifier_monitor m, void *addr)
{
    CHECK(munmap(addr, LEN) == 0, "munmap");
    CHECK(notifier_monitor_sync(m) == NOTIFIER_OK, "sync");
    void *p = mmap(addr, LEN, PROT, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p != addr) {
        fprintf(stderr, "FAIL: could not map again at %p\n", addr);
        exit(1);
    }
}

int main(void)
{
    const char *malloc_hooks = getenv("UCX_MEM_MALLOC_HOOKS");
    const char *mmap_mode    = getenv("UCX_MEM_MMAP_HOOK_MODE");
    notifier_monitor m       = monitor_or_skip("ucx_external_events");
    ucs_rcache_params_t p;
    ucs_rcache_t *rc;
    uint32_t hook;
    struct region *r;
    uint64_t key;

    CHECK(malloc_hooks && !strcmp(malloc_hooks, "no") && mmap_mode &&
              !strcmp(mmap_mode, "none"),
          "run with UCX_MEM_MALLOC_HOOKS=no UCX_MEM_MMAP_HOOK_MODE=none "
          "(UCX's own hooks off)");
    ucm_set_external_event(UCM_EVENT_VM_UNMAPPED);
    CHECK(notifier_monitor_add_hook(m, to_ucm, NULL, &hook) == NOTIFIER_OK, "add_hook");

    memset(&p, 0, sizeof(p));
    p.region_struct_size = sizeof(struct region);
    p.alignment          = 4096;
    p.max_alignment      = 4096;
    p.ucm_events         = UCM_EVENT_VM_UNMAPPED;
    p.ucm_event_priority = 1000;
    p.ops                = &ops;
    p.max_regions        = (unsigned long)-1;
    p.max_size           = (size_t)-1;
    p.max_unreleased     = (size_t)-1;
    if (ucs_rcache_create(&p, "notifier-test", NULL, &rc) != UCS_OK) {
        fprintf(stderr, "FAIL: ucs_rcache_create\n");
        return 1;
    }

    void *buf = mmap(NULL, LEN, PROT, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(buf != MAP_FAILED, "mmap");
    CHECK(notifier_monitor_watch(m, buf, LEN) == NOTIFIER_OK, "watch");

    /* 1. register, then hit */
    r = get(rc, buf);
    key = r->key;
    ucs_rcache_region_put(rc, &r->super);
    r = get(rc, buf);
    CHECK(r->key == key && regs == 1, "second get should hit (regs %llu)",
          (unsigned long long)regs);
    ucs_rcache_region_put(rc, &r->super);

    /* 2. unmap, remap at the same address: a fresh registration */
    unmap_remap(m, buf);
    CHECK(hook_calls >= 1, "our hook never ran");
    CHECK(notifier_monitor_watch(m, buf, LEN) == NOTIFIER_OK, "watch again");
    r = get(rc, buf);
    CHECK(r->key != key && regs == 2,
          "after munmap UCX served key %llu again (regs %llu): stale",
          (unsigned long long)r->key, (unsigned long long)regs);
    CHECK(deregs == 1, "the old registration was not deregistered (%llu)",
          (unsigned long long)deregs);
    printf("ucx: munmap -> our monitor -> ucm_vm_munmap -> rcache: key %llu -> %llu, "
           "%llu registrations, %llu deregistration, %llu hook calls\n",
           (unsigned long long)key, (unsigned long long)r->key,
           (unsigned long long)regs, (unsigned long long)deregs,
           (unsigned long long)hook_calls);
    key = r->key;
    ucs_rcache_region_put(rc, &r->super);

    /* 3. control: without our hook UCX does not hear of the unmap */
    CHECK(notifier_monitor_remove_hook(m, hook) == NOTIFIER_OK, "remove_hook");
    unmap_remap(m, buf);
    r = get(rc, buf);
    CHECK(r->key == key && regs == 2,
          "without our hook UCX still saw the unmap: its own hooks are on");
    printf("ucx: control without our hook: key %llu served again (UCX's own hooks are off)\n",
           (unsigned long long)r->key);
    ucs_rcache_region_put(rc, &r->super);

    ucs_rcache_destroy(rc);
    munmap(buf, LEN);
    CHECK(notifier_monitor_destroy(m) == NOTIFIER_OK, "destroy");
    return finish("ucx_external_events");
}
