/*
 * UCX side of the multi-threaded registration-cache workload
 * (docs/BENCHMARKS.md, "Multi-threaded hits"): N threads share one
 * UCX 1.13 `ucs_rcache` (its page-table rwlock, atomic region refcounts and
 * LRU spinlock, as UCX shares it between the threads of one context) and run
 * hashed get+put over 4,096 cached 64 KiB regions, then all on one region.
 * The same workload as `notifier bench rcache --threads N`.
 *
 * Usage: ucx_rcache_mt N[,N...] (e.g. 1,2,4); prints, per thread count,
 *   mt_hit_getput_r4096 VALUE Mops
 *   mt_hit_getput_r1 VALUE Mops
 * (total throughput of all threads) and `#` diagnostics. A failed
 * correctness check is reported on stderr and the exit status is 1.
 * MT_OPS overrides the ops per thread per timed loop (default 1,000,000).
 *
 * Build: see run_mt.sh.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include <ucm/api/ucm.h>
#include <ucs/memory/rcache.h>
#include <ucs/type/status.h>

#define REGION     (64ul << 10)
#define STRIDE     (128ul << 10)
#define PROT       (PROT_READ | PROT_WRITE)
#define WARMUP     100000u
#define LOOPS      5
#define MAX_THREAD 256

struct fake_region {
    ucs_rcache_region_t super;
    uint64_t            key;
};

/* Provider counters: only the single-threaded set-up registers. */
struct ctx {
    uintptr_t base;
    uint64_t  regs;
    uint64_t  deregs;
    uint64_t  next_key;
};

static int failures;

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

static ucs_status_t fake_mem_reg(void *context, ucs_rcache_t *rcache,
                                 void *arg, ucs_rcache_region_t *region,
                                 uint16_t flags)
{
    struct ctx *c = context;

    (void)rcache;
    (void)arg;
    (void)flags;
    __atomic_fetch_add(&c->regs, 1, __ATOMIC_RELAXED);
    ((struct fake_region*)region)->key =
        __atomic_add_fetch(&c->next_key, 1, __ATOMIC_RELAXED);
    return UCS_OK;
}

static void fake_mem_dereg(void *context, ucs_rcache_t *rcache,
                           ucs_rcache_region_t *region)
{
    struct ctx *c = context;

    (void)rcache;
    (void)region;
    __atomic_fetch_add(&c->deregs, 1, __ATOMIC_RELAXED);
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

/* Same cache parameters as ucx_rcache_parity.c. */
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
    p.ucm_event_priority = 1000;
    p.ops                = &fake_ops;
    p.context            = c;
    p.flags              = 0;
    p.max_regions        = (unsigned long)-1;
    p.max_size           = (size_t)-1;
    p.max_unreleased     = (size_t)-1;

    st = ucs_rcache_create(&p, "parity-mt", NULL, &rc);
    if (st != UCS_OK) {
        fprintf(stderr, "ucs_rcache_create: %s\n", ucs_status_string(st));
        exit(2);
    }
    return rc;
}

static struct fake_region *get(ucs_rcache_t *rc, uintptr_t base, uint32_t i)
{
    ucs_rcache_region_t *r;
    ucs_status_t st = ucs_rcache_get(rc, (void*)(base + (uintptr_t)i * STRIDE),
                                     REGION, PROT, NULL, &r);
    if (st != UCS_OK) {
        fprintf(stderr, "FAIL: ucs_rcache_get(slot %u): %s\n", i,
                ucs_status_string(st));
        exit(1);
    }
    return (struct fake_region*)r;
}

struct shared {
    ucs_rcache_t     *rc;
    uintptr_t         base;
    uint32_t          mask;
    uint32_t          nthreads;
    uint64_t          ops;
    pthread_barrier_t start, done;
};

struct worker {
    struct shared *s;
    uint32_t       t;
    uint64_t       sink;
    uint64_t       wrong; /* gets that returned another slot's region */
};

/*
 * Op i of thread t: g = i * N + t, idx = (u32)(g * 2654435761) & (R - 1):
 * the N threads together walk the single-threaded parity sequence,
 * interleaved, so that at any moment they are on different regions.
 */
static uint64_t run_ops(struct worker *w, uint64_t first, uint64_t n,
                        int verify)
{
    struct shared *s   = w->s;
    uint64_t       acc = 0;

    for (uint64_t i = first; i < first + n; ++i) {
        uint64_t            g   = i * s->nthreads + w->t;
        uint32_t            idx = (uint32_t)(g * 2654435761u) & s->mask;
        struct fake_region *r   = get(s->rc, s->base, idx);
        if (verify &&
            r->super.super.start != s->base + (uintptr_t)idx * STRIDE) {
            ++w->wrong;
        }
        acc += r->key;
        ucs_rcache_region_put(s->rc, &r->super);
    }
    return acc;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct shared *s = w->s;

    w->sink += run_ops(w, 0, WARMUP, 1);
    for (int l = 0; l < LOOPS; ++l) {
        pthread_barrier_wait(&s->start);
        w->sink += run_ops(w, WARMUP + (uint64_t)l * s->ops, s->ops, 0);
        pthread_barrier_wait(&s->done);
    }
    return NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
}

/* Total Mops of N threads over R regions: the median of LOOPS loops. */
static double mt_hit(uint32_t R, uint32_t N, uint64_t ops)
{
    size_t         len   = (size_t)R * STRIDE;
    void          *arena = mmap(NULL, len, PROT,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                                -1, 0);
    struct ctx     c;
    struct shared  s;
    struct worker  w[MAX_THREAD];
    pthread_t      th[MAX_THREAD];
    double         mops[LOOPS];
    uint64_t       regs, wrong = 0;

    if (arena == MAP_FAILED) {
        perror("mmap arena");
        exit(2);
    }
    memset(&c, 0, sizeof(c));
    c.base = (uintptr_t)arena;
    memset(&s, 0, sizeof(s));
    s.rc       = rc_new(&c);
    s.base     = c.base;
    s.mask     = R - 1;
    s.nthreads = N;
    s.ops      = ops;
    for (uint32_t i = 0; i < R; ++i) {
        ucs_rcache_region_put(s.rc, &get(s.rc, s.base, i)->super);
    }
    regs = c.regs;
    CHECK(regs == R, "r%u: %llu registrations for %u regions", R,
          (unsigned long long)regs, R);

    pthread_barrier_init(&s.start, NULL, N + 1);
    pthread_barrier_init(&s.done, NULL, N + 1);
    for (uint32_t t = 0; t < N; ++t) {
        w[t] = (struct worker){.s = &s, .t = t};
        if (pthread_create(&th[t], NULL, worker_main, &w[t]) != 0) {
            perror("pthread_create");
            exit(2);
        }
    }
    for (int l = 0; l < LOOPS; ++l) {
        uint64_t t0;
        pthread_barrier_wait(&s.start);
        t0 = now_ns();
        pthread_barrier_wait(&s.done);
        mops[l] = (double)N * (double)ops * 1e3 / (double)(now_ns() - t0);
    }
    for (uint32_t t = 0; t < N; ++t) {
        pthread_join(th[t], NULL);
        wrong += w[t].wrong;
    }
    pthread_barrier_destroy(&s.start);
    pthread_barrier_destroy(&s.done);
    CHECK(wrong == 0, "r%u N=%u: %llu gets returned another slot's region", R,
          N, (unsigned long long)wrong);
    CHECK(c.regs == regs && c.deregs == 0,
          "r%u N=%u: registration during the hit loops (%llu registrations, "
          "%llu deregistrations)", R, N, (unsigned long long)(c.regs - regs),
          (unsigned long long)c.deregs);
    printf("# mt r%u threads %u: loops [%.2f, %.2f, %.2f, %.2f, %.2f] Mops, "
           "%llu ops per thread per loop, 0 registrations in the loops\n", R,
           N, mops[0], mops[1], mops[2], mops[3], mops[4],
           (unsigned long long)ops);
    ucs_rcache_destroy(s.rc);
    CHECK(c.regs == c.deregs, "r%u: %llu registrations, %llu deregistrations "
          "at the end", R, (unsigned long long)c.regs,
          (unsigned long long)c.deregs);
    munmap(arena, len);
    qsort(mops, LOOPS, sizeof(double), cmp_double);
    return mops[LOOPS / 2];
}

int main(int argc, char **argv)
{
    const char *list = argc > 1 ? argv[1] : "1,2";
    const char *env  = getenv("MT_OPS");
    uint64_t    ops  = env ? strtoull(env, NULL, 10) : 1000000u;
    char       *copy, *tok, *save = NULL;

    if (ops == 0) {
        fprintf(stderr, "MT_OPS must be a positive integer\n");
        return 2;
    }
    printf("# ucx ucs_rcache shared by N threads (rwlock page table, atomic "
           "refcount, LRU spinlock); region 64 KiB at 128 KiB stride; "
           "fake mem_reg/mem_dereg; %u warm-up + %d x %llu ops per thread\n",
           WARMUP, LOOPS, (unsigned long long)ops);
    fflush(stdout);
    copy = strdup(list);
    for (tok = strtok_r(copy, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        char         *end;
        unsigned long n = strtoul(tok, &end, 10);
        if (*end != '\0' || n == 0 || n > MAX_THREAD) {
            fprintf(stderr, "bad thread count '%s' (1..%d)\n", tok,
                    MAX_THREAD);
            return 2;
        }
        printf("# threads %lu\n", n);
        printf("mt_hit_getput_r4096 %.2f Mops\n", mt_hit(4096, n, ops));
        fflush(stdout);
        printf("mt_hit_getput_r1 %.2f Mops\n", mt_hit(1, n, ops));
        fflush(stdout);
    }
    free(copy);
    if (failures) {
        fprintf(stderr, "%d correctness check(s) failed\n", failures);
        return 1;
    }
    printf("# all correctness checks passed\n");
    return 0;
}
