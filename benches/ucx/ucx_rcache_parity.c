/*
 * UCX side of the registration-cache parity comparison
 * (shared/bench/rcache-parity.md): the same workloads as
 * `notifier bench rcache` (backends/rdma/src/parity.rs), run against
 * UCX 1.13's registration cache (ucs_rcache in libucs, Debian libucx-dev)
 * driven with a fake mem_reg/mem_dereg that only counts calls and stores a
 * key in the region.
 *
 * Prints one `NAME VALUE UNIT` line per metric with the document's names,
 * and `#` diagnostics. Every correctness check of the document that fails
 * is reported on stderr and makes the program exit with status 1.
 *
 * "Range going away" is delivered with ucm_vm_munmap(addr, len) (public
 * libucm API, ucm/api/ucm.h): it dispatches UCM_EVENT_VM_UNMAPPED to the
 * registered handlers (here the rcache's unmapped callback) under libucm's
 * event lock, exactly what libucm's munmap hook does before the syscall,
 * but without the syscall.
 *
 * Build: see run.sh (gcc -O2 ... $(pkg-config --cflags --libs ucx-ucs)).
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <ucm/api/ucm.h>
#include <ucp/api/ucp_version.h>
#include <ucs/memory/rcache.h>
#include <ucs/type/status.h>

#define REGION      (64ul << 10)
#define STRIDE      (128ul << 10)
#define PROT        (PROT_READ | PROT_WRITE)
#define HIT_WARMUP  100000u
#define HIT_OPS     1000000u
#define HIT_LOOPS   5
#define REGIONS     65536u
#define GROW_ARENA  (8ul << 30)
#define UNMAP_SLOTS 4096u
#define UNMAP_REPS  5

/* Workloads stay separate functions (for callgrind --toggle-collect). */
#define NOINLINE __attribute__((noinline))

/* The region as the cache allocates it: UCX's part, then ours. */
struct fake_region {
    ucs_rcache_region_t super;
    uint64_t            key; /* "memory key" stored by mem_reg */
};

/* Per-cache context: counts of the fake provider, per slot. */
struct ctx {
    uintptr_t base;      /* first slot */
    uint32_t  nslots;
    uint64_t  regs;      /* mem_reg calls */
    uint64_t  deregs;    /* mem_dereg calls */
    uint64_t  bad;       /* calls for a range that is not one whole slot */
    uint64_t  next_key;
    uint32_t *reg_cnt;   /* per slot */
    uint32_t *dereg_cnt; /* per slot */
};

static int      failures;
static uint64_t completions; /* invalidate completion callbacks */
static volatile uint64_t sink;

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "FAIL: " __VA_ARGS__);                             \
            fputc('\n', stderr);                                               \
            ++failures;                                                        \
        }                                                                      \
    } while (0)

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Slot of a region in its cache's arena; nslots if it is not one slot. */
static uint32_t slot_of(struct ctx *c, ucs_rcache_region_t *r)
{
    uintptr_t off = r->super.start - c->base;
    if (r->super.start < c->base || (off & (STRIDE - 1)) ||
        r->super.end - r->super.start != REGION || off / STRIDE >= c->nslots) {
        return c->nslots;
    }
    return (uint32_t)(off / STRIDE);
}

static ucs_status_t fake_mem_reg(void *context, ucs_rcache_t *rcache,
                                 void *arg, ucs_rcache_region_t *region,
                                 uint16_t flags)
{
    struct ctx *c = context;
    uint32_t    s = slot_of(c, region);

    (void)rcache;
    (void)arg;
    (void)flags;
    ++c->regs;
    if (s == c->nslots) {
        ++c->bad;
    } else {
        ++c->reg_cnt[s];
    }
    ((struct fake_region*)region)->key = ++c->next_key;
    return UCS_OK;
}

static void fake_mem_dereg(void *context, ucs_rcache_t *rcache,
                           ucs_rcache_region_t *region)
{
    struct ctx *c = context;
    uint32_t    s = slot_of(c, region);

    (void)rcache;
    ++c->deregs;
    if (s == c->nslots) {
        ++c->bad;
    } else {
        ++c->dereg_cnt[s];
    }
}

static void fake_dump_region(void *context, ucs_rcache_t *rcache,
                             ucs_rcache_region_t *region, char *buf, size_t max)
{
    (void)context;
    (void)rcache;
    snprintf(buf, max, "key %llu",
             (unsigned long long)((struct fake_region*)region)->key);
}

static const ucs_rcache_ops_t fake_ops = {
    .mem_reg     = fake_mem_reg,
    .mem_dereg   = fake_mem_dereg,
    .dump_region = fake_dump_region,
};

static void comp_cb(void *arg)
{
    (void)arg;
    ++completions;
}

/*
 * An untouched NORESERVE arena at the address our side uses
 * (backends/rdma/src/parity.rs: BASE = 0x1000_0000_0000), else 1 GiB
 * aligned. The base alignment matters to UCX: its page table stores a
 * region as power-of-two aligned blocks, so a 64 KiB region that is only
 * page aligned takes several entries (see the "+4 KiB" diagnostics).
 */
#ifndef ARENA_HINT
#define ARENA_HINT  0x100000000000ul
#endif
#define ARENA_ALIGN (1ul << 30)

static void *map_arena(size_t len)
{
    int   flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    void *p     = mmap((void*)ARENA_HINT, len, PROT,
                       flags | MAP_FIXED_NOREPLACE, -1, 0);
    uintptr_t a, end;

    if (p == (void*)ARENA_HINT) {
        return p;
    }
    if (p != MAP_FAILED) {
        munmap(p, len);
    }
    p = mmap(NULL, len + ARENA_ALIGN, PROT, flags, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap arena");
        exit(2);
    }
    a   = ((uintptr_t)p + ARENA_ALIGN - 1) & ~(ARENA_ALIGN - 1);
    end = (uintptr_t)p + len + ARENA_ALIGN;
    if (a > (uintptr_t)p) {
        munmap(p, a - (uintptr_t)p);
    }
    if (end > a + len) {
        munmap((void*)(a + len), end - (a + len));
    }
    return (void*)a;
}

static void ctx_init(struct ctx *c, void *base, uint32_t nslots)
{
    memset(c, 0, sizeof(*c));
    c->base      = (uintptr_t)base;
    c->nslots    = nslots;
    c->reg_cnt   = calloc(nslots, sizeof(uint32_t));
    c->dereg_cnt = calloc(nslots, sizeof(uint32_t));
    if (!c->reg_cnt || !c->dereg_cnt) {
        perror("calloc");
        exit(2);
    }
    /* Touch the counters now so that they do not count as cache memory. */
    for (uint32_t i = 0; i < nslots; ++i) {
        ((volatile uint32_t*)c->reg_cnt)[i]   = 0;
        ((volatile uint32_t*)c->dereg_cnt)[i] = 0;
    }
}

static void ctx_fini(struct ctx *c)
{
    free(c->reg_cnt);
    free(c->dereg_cnt);
}

static ucs_rcache_t *rc_new(struct ctx *c)
{
    ucs_rcache_params_t p;
    ucs_rcache_t       *rc;
    ucs_status_t        st;

    memset(&p, 0, sizeof(p));
    p.region_struct_size = sizeof(struct fake_region);
    p.alignment          = 4096;
    p.max_alignment      = 4096;
    p.ucm_events         = UCM_EVENT_VM_UNMAPPED;
    p.ucm_event_priority = 1000; /* uct md default (RCACHE_EVENT_PRIORITY) */
    p.ops                = &fake_ops;
    p.context            = c;
    p.flags              = 0;
    p.max_regions        = (unsigned long)-1; /* unlimited: no LRU eviction */
    p.max_size           = (size_t)-1;
    p.max_unreleased     = (size_t)-1; /* no async cleanup thread wake-up */

    st = ucs_rcache_create(&p, "parity", NULL, &rc);
    if (st != UCS_OK) {
        fprintf(stderr, "ucs_rcache_create: %s\n", ucs_status_string(st));
        exit(2);
    }
    return rc;
}

static inline void *slot_addr(const struct ctx *c, uint32_t i)
{
    return (void*)(c->base + (uintptr_t)i * STRIDE);
}

static struct fake_region *get(ucs_rcache_t *rc, const struct ctx *c,
                               uint32_t i)
{
    ucs_rcache_region_t *r;
    ucs_status_t st = ucs_rcache_get(rc, slot_addr(c, i), REGION, PROT, NULL,
                                     &r);
    if (st != UCS_OK) {
        fprintf(stderr, "FAIL: ucs_rcache_get(slot %u): %s\n", i,
                ucs_status_string(st));
        exit(1);
    }
    return (struct fake_region*)r;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, n, sizeof(double), cmp_double);
    return v[n / 2];
}

/* Every slot in [0, n) saw exactly `want` calls in `cnt`. */
static int all_equal(const uint32_t *cnt, uint32_t n, uint32_t want)
{
    for (uint32_t i = 0; i < n; ++i) {
        if (cnt[i] != want) {
            return 0;
        }
    }
    return 1;
}

static void metric(const char *name, double v, const char *unit)
{
    printf("%s %.2f %s\n", name, v, unit);
    fflush(stdout);
}

/* hit_getput_r<R> */
NOINLINE static double hit(uint32_t R, size_t off)
{
    struct ctx    c;
    void         *arena = map_arena((size_t)R * STRIDE + off);
    ucs_rcache_t *rc;
    double        loops[HIT_LOOPS];
    uint32_t      mask = R - 1;
    uint64_t      regs, hits = 0;

    ctx_init(&c, (char*)arena + off, R);
    rc = rc_new(&c);
    for (uint32_t i = 0; i < R; ++i) {
        ucs_rcache_region_put(rc, &get(rc, &c, i)->super);
    }
    regs = c.regs;
    CHECK(regs == R && all_equal(c.reg_cnt, R, 1), "r%u: %llu registrations "
          "for %u regions", R, (unsigned long long)regs, R);

    /* Warm-up, every result checked against its slot. */
    for (uint32_t i = 0; i < HIT_WARMUP; ++i) {
        uint32_t            idx = (uint32_t)(i * 2654435761u) & mask;
        struct fake_region *r   = get(rc, &c, idx);
        CHECK(r->super.super.start == (uintptr_t)slot_addr(&c, idx),
              "r%u: get of slot %u returned 0x%lx", R, idx,
              (unsigned long)r->super.super.start);
        ucs_rcache_region_put(rc, &r->super);
        ++hits;
    }
    for (int l = 0; l < HIT_LOOPS; ++l) {
        uint32_t first = HIT_WARMUP + (uint32_t)l * HIT_OPS;
        uint64_t acc   = 0;
        uint64_t t0    = now_ns();
        for (uint32_t i = first; i < first + HIT_OPS; ++i) {
            uint32_t            idx = (uint32_t)(i * 2654435761u) & mask;
            struct fake_region *r   = get(rc, &c, idx);
            acc += r->key;
            ucs_rcache_region_put(rc, &r->super);
        }
        loops[l] = (double)(now_ns() - t0) / HIT_OPS;
        sink += acc;
        hits += HIT_OPS;
    }
    CHECK(c.regs == regs && c.deregs == 0 && c.bad == 0,
          "r%u: registration during the hit loops (%llu registrations, "
          "%llu deregistrations)", R, (unsigned long long)(c.regs - regs),
          (unsigned long long)c.deregs);
    printf("# hit r%u%s: loops [%.2f, %.2f, %.2f, %.2f, %.2f] ns/op, %llu hits, "
           "0 registrations in the loops\n", R, off ? " base +4 KiB" : "", loops[0], loops[1], loops[2],
           loops[3], loops[4], (unsigned long long)hits);

    ucs_rcache_destroy(rc);
    CHECK(all_equal(c.dereg_cnt, R, 1) && c.regs == c.deregs,
          "r%u: %llu registrations, %llu deregistrations at the end", R,
          (unsigned long long)c.regs, (unsigned long long)c.deregs);
    ctx_fini(&c);
    munmap(arena, (size_t)R * STRIDE + off);
    return median(loops, HIT_LOOPS);
}

static long rss_bytes(void)
{
    long  pages = 0, resident = 0;
    FILE *f     = fopen("/proc/self/statm", "r");
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &resident) != 2) {
            resident = 0;
        }
        fclose(f);
    }
    return resident * sysconf(_SC_PAGESIZE);
}

/* miss_getput_grow and destroy_dereg */
NOINLINE static void miss_grow_and_destroy(size_t off, double *grow,
                                           double *destroy)
{
    struct ctx     c;
    void          *arena = map_arena(GROW_ARENA + off);
    ucs_rcache_t  *rc;
    struct mallinfo2 m0, m1;
    long           rss0, rss1;
    uint64_t       t0;

    ctx_init(&c, (char*)arena + off, REGIONS);
    rc   = rc_new(&c);
    m0   = mallinfo2();
    rss0 = rss_bytes();
    t0   = now_ns();
    for (uint32_t i = 0; i < REGIONS; ++i) {
        ucs_rcache_region_put(rc, &get(rc, &c, i)->super);
    }
    *grow = (double)(now_ns() - t0) / REGIONS;
    rss1  = rss_bytes();
    m1    = mallinfo2();
    CHECK(c.regs == REGIONS && c.deregs == 0 && c.bad == 0 &&
          all_equal(c.reg_cnt, REGIONS, 1),
          "miss_getput_grow: %llu registrations, %llu deregistrations for "
          "%u regions", (unsigned long long)c.regs,
          (unsigned long long)c.deregs, REGIONS);
    if (!off) printf("# arena base %p (%s)\n", (void*)c.base,
                     c.base == ARENA_HINT ? "as on our side"
                                          : "1 GiB aligned fallback");
    if (!off) printf("# ucx memory per cached region: region struct %zu B "
           "(ucs_rcache_region_t %zu + key 8), malloc in use (mallinfo2 "
           "uordblks) +%.1f B, process RSS +%.1f B (malloc heap and the "
           "rcache page-table directories from its mmap mpool); %u regions\n",
           sizeof(struct fake_region), sizeof(ucs_rcache_region_t),
           (double)((long)m1.uordblks - (long)m0.uordblks) / REGIONS,
           (double)(rss1 - rss0) / REGIONS, REGIONS);

    t0 = now_ns();
    ucs_rcache_destroy(rc);
    *destroy = (double)(now_ns() - t0) / REGIONS;
    CHECK(c.deregs == REGIONS && all_equal(c.dereg_cnt, REGIONS, 1) &&
          c.bad == 0, "destroy_dereg: %llu deregistrations for %u regions",
          (unsigned long long)c.deregs, REGIONS);
    ctx_fini(&c);
    munmap(arena, GROW_ARENA + off);
}

/* Fixed cost of creating and destroying an empty cache (diagnostic). */
NOINLINE static void empty_cache_cost(void)
{
    struct ctx    c;
    ucs_rcache_t *rcs[8];
    uint64_t      t0, t1, t2;

    ctx_init(&c, (void*)0x10000, 1);
    t0 = now_ns();
    for (int i = 0; i < 8; ++i) {
        rcs[i] = rc_new(&c);
    }
    t1 = now_ns();
    for (int i = 7; i >= 0; --i) {
        ucs_rcache_destroy(rcs[i]);
    }
    t2 = now_ns();
    printf("# empty cache: create %.1f us, destroy %.1f us (mean of 8; the "
           "last destroy also stops the async cleanup handler)\n",
           (double)(t1 - t0) / 8e3, (double)(t2 - t1) / 8e3);
    ctx_fini(&c);
}

/* reg_dereg_cycle */
NOINLINE static double reg_dereg_cycle(void)
{
    struct ctx    c;
    void         *arena = map_arena(GROW_ARENA);
    ucs_rcache_t *rc;
    uint64_t      t0, comps = completions;
    double        v;

    ctx_init(&c, arena, REGIONS);
    rc = rc_new(&c);
    t0 = now_ns();
    for (uint32_t i = 0; i < REGIONS; ++i) {
        struct fake_region *r = get(rc, &c, i);
        ucs_rcache_region_invalidate(rc, &r->super, comp_cb, NULL);
        ucs_rcache_region_put(rc, &r->super);
    }
    v = (double)(now_ns() - t0) / REGIONS;
    CHECK(c.regs == REGIONS && c.deregs == REGIONS && c.bad == 0 &&
          all_equal(c.reg_cnt, REGIONS, 1) &&
          all_equal(c.dereg_cnt, REGIONS, 1) &&
          completions - comps == REGIONS,
          "reg_dereg_cycle: %llu registrations, %llu deregistrations, %llu "
          "completions for %u regions", (unsigned long long)c.regs,
          (unsigned long long)c.deregs,
          (unsigned long long)(completions - comps), REGIONS);
    /* No stale hit: a get after the invalidation registers anew. */
    for (uint32_t i = 0; i < REGIONS; i += 64) {
        ucs_rcache_region_put(rc, &get(rc, &c, i)->super);
        CHECK(c.reg_cnt[i] == 2, "reg_dereg_cycle: stale hit on slot %u", i);
    }
    ucs_rcache_destroy(rc);
    CHECK(c.regs == c.deregs, "reg_dereg_cycle: %llu registrations but %llu "
          "deregistrations at the end", (unsigned long long)c.regs,
          (unsigned long long)c.deregs);
    ctx_fini(&c);
    munmap(arena, GROW_ARENA);
    return v;
}

/* K "range going away" events, one per slot, without a syscall. */
static double deliver(const struct ctx *c)
{
    uint64_t t0 = now_ns();
    for (uint32_t i = 0; i < UNMAP_SLOTS; ++i) {
        ucm_vm_munmap(slot_addr(c, i), REGION);
    }
    return (double)(now_ns() - t0) / UNMAP_SLOTS;
}

/* vm_unmap_event_* and deferred_dereg_drain */
NOINLINE static void unmap_events(size_t off, double *unreg_p, double *reg_p,
                                  double *drain_p)
{
    size_t        len = (size_t)UNMAP_SLOTS * STRIDE;
    struct ctx    c;
    void         *arena;
    ucs_rcache_t *rc;
    double        unreg[UNMAP_REPS], reg[UNMAP_REPS], drain[UNMAP_REPS];
    uint64_t     *keys;
    uint64_t      dereg_in_events = 0;

    /* Nothing registered. */
    arena = map_arena(len + off);
    ctx_init(&c, (char*)arena + off, UNMAP_SLOTS);
    rc = rc_new(&c);
    for (int rep = 0; rep < UNMAP_REPS; ++rep) {
        unreg[rep] = deliver(&c);
    }
    CHECK(c.regs == 0 && c.deregs == 0, "unregistered events: %llu "
          "registrations, %llu deregistrations", (unsigned long long)c.regs,
          (unsigned long long)c.deregs);
    ucs_rcache_destroy(rc);
    ctx_fini(&c);
    munmap(arena, len + off);

    /* One idle cached registration per slot. */
    arena = map_arena(len + off);
    ctx_init(&c, (char*)arena + off, UNMAP_SLOTS);
    keys = calloc(UNMAP_SLOTS, sizeof(*keys));
    rc   = rc_new(&c);
    for (uint32_t i = 0; i < UNMAP_SLOTS; ++i) {
        struct fake_region *r = get(rc, &c, i);
        keys[i]               = r->key;
        ucs_rcache_region_put(rc, &r->super);
    }
    for (int rep = 0; rep < UNMAP_REPS; ++rep) {
        uint64_t regs = c.regs, deregs = c.deregs, t0;
        struct fake_region *r;

        reg[rep] = deliver(&c);
        dereg_in_events += c.deregs - deregs;

        /* The first get drains the K invalidations (and registers anew). */
        t0        = now_ns();
        r         = get(rc, &c, 0);
        drain[rep] = (double)(now_ns() - t0) / UNMAP_SLOTS;
        ucs_rcache_region_put(rc, &r->super);
        CHECK(c.deregs - deregs == UNMAP_SLOTS, "rep %d: %llu "
              "deregistrations after %u events and one get", rep,
              (unsigned long long)(c.deregs - deregs), UNMAP_SLOTS);

        /* No stale hit: every slot registers anew, with a new key. */
        for (uint32_t i = 0; i < UNMAP_SLOTS; ++i) {
            r = get(rc, &c, i);
            ucs_rcache_region_put(rc, &r->super);
            CHECK(r->key != keys[i], "rep %d: stale hit on slot %u after "
                  "its unmap event", rep, i);
            keys[i] = r->key;
        }
        CHECK(c.regs - regs == UNMAP_SLOTS &&
              all_equal(c.reg_cnt, UNMAP_SLOTS, (uint32_t)rep + 2) &&
              all_equal(c.dereg_cnt, UNMAP_SLOTS, (uint32_t)rep + 1),
              "rep %d: %llu new registrations after %u invalidations", rep,
              (unsigned long long)(c.regs - regs), UNMAP_SLOTS);
    }
    ucs_rcache_destroy(rc);
    CHECK(c.regs == c.deregs && c.bad == 0, "%llu registrations but %llu "
          "deregistrations at the end", (unsigned long long)c.regs,
          (unsigned long long)c.deregs);
    if (!off) printf("# unmap events: %u slots x %d reps; ucm_vm_munmap() -> rcache "
           "unmapped callback; %llu deregistrations inside the events "
           "(deferred to the gc list); registrations == deregistrations == "
           "%llu at the end\n", UNMAP_SLOTS, UNMAP_REPS,
           (unsigned long long)dereg_in_events, (unsigned long long)c.regs);
    if (!off) printf("# unmap events ns/region: unregistered [%.2f, %.2f, %.2f, %.2f, "
           "%.2f], registered [%.2f, %.2f, %.2f, %.2f, %.2f]\n", unreg[0],
           unreg[1], unreg[2], unreg[3], unreg[4], reg[0], reg[1], reg[2],
           reg[3], reg[4]);
    free(keys);
    ctx_fini(&c);
    munmap(arena, len + off);

    *unreg_p = median(unreg, UNMAP_REPS);
    *reg_p   = median(reg, UNMAP_REPS);
    *drain_p = median(drain, UNMAP_REPS);
}

/* UCX_PARITY_ONLY=hit|miss|misaligned|cycle|unmap runs one group (for profiling). */
static int run(const char *group)
{
    const char *only = getenv("UCX_PARITY_ONLY");
    return only == NULL || strcmp(only, group) == 0;
}

int main(void)
{
    static const uint32_t rs[] = {1, 64, 4096};
    static const char *names[] = {"hit_getput_r1", "hit_getput_r64",
                                  "hit_getput_r4096"};
    double grow, destroy, unreg, reg, drain;

    /* Under valgrind libucm cannot install its mmap hooks and the cache
     * cannot be created; declaring the event external (delivered by the
     * caller, which is what this program does anyway) skips the hooks. */
    if (getenv("UCX_PARITY_EXTERNAL_EVENTS")) {
        ucm_set_external_event(UCM_EVENT_VM_UNMAPPED);
        printf("# UCM_EVENT_VM_UNMAPPED declared external: no libucm mmap "
               "hooks installed\n");
    }

    printf("# ucx ucs_rcache, headers UCP API %d.%d%s%s, fake mem_reg/mem_dereg "
           "(count + key); region 64 KiB at 128 KiB stride, prot rw; "
           "alignment 4096, max_regions/max_size/max_unreleased unlimited, "
           "UCX_RCACHE_CHECK_PFN=%s\n", UCP_API_MAJOR, UCP_API_MINOR,
#ifdef UCX_PKG_VERSION
           ", package ", UCX_PKG_VERSION,
#else
           "", "",
#endif
           getenv("UCX_RCACHE_CHECK_PFN") ? getenv("UCX_RCACHE_CHECK_PFN")
                                           : "0 (default)");
    fflush(stdout);

    for (int k = 0; k < 3 && run("hit"); ++k) {
        metric(names[k], hit(rs[k], 0), "ns/op");
    }
    if (run("miss")) {
        miss_grow_and_destroy(0, &grow, &destroy);
        metric("miss_getput_grow", grow, "ns/op");
        metric("destroy_dereg", destroy, "ns/region");
        empty_cache_cost();
    }
    if (run("misaligned")) {
        /* Diagnostics: the same with a base that is page aligned only. */
        hit(4096, 4096);
        miss_grow_and_destroy(4096, &grow, &destroy);
        printf("# base +4 KiB (regions page aligned, not 64 KiB aligned): "
               "miss_getput_grow %.2f ns/op, destroy_dereg %.2f ns/region\n",
               grow, destroy);
        unmap_events(4096, &unreg, &reg, &drain);
        printf("# base +4 KiB: vm_unmap_event_unregistered %.2f, "
               "vm_unmap_event_registered %.2f, invalidate_overhead %.2f, "
               "deferred_dereg_drain %.2f ns/region\n", unreg, reg,
               reg - unreg, drain);
    }
    if (run("cycle")) {
        metric("reg_dereg_cycle", reg_dereg_cycle(), "ns/op");
    }
    if (run("unmap")) {
        unmap_events(0, &unreg, &reg, &drain);
        metric("vm_unmap_event_unregistered", unreg, "ns/region");
        metric("vm_unmap_event_registered", reg, "ns/region");
        metric("vm_unmap_event_invalidate_overhead", reg - unreg, "ns/region");
        printf("# deregistration is deferred: the unmapped callback removes "
               "the region from the page table and queues it on the gc list; "
               "the next slow-path get drains it\n");
        metric("deferred_dereg_drain", drain, "ns/region");
    }

    if (failures) {
        fprintf(stderr, "%d correctness check(s) failed\n", failures);
        return 1;
    }
    printf("# all correctness checks passed (sink %llu)\n",
           (unsigned long long)(sink & 1));
    return 0;
}
