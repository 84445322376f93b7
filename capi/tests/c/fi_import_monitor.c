/*
 * Our monitor imported into libfabric (fi_import of a struct
 * fid_mem_monitor, rdma/fi_ext.h).
 *
 * 1. import: libfabric takes it as the default memory monitor;
 * 2. round trip: subscribe (through the export ops libfabric's MR cache
 *    calls) -> munmap -> our monitor -> libfabric's notify; valid() is
 *    false while the notify is in flight, true again after;
 * 3. re-entrancy (libfabric issue 9003): libfabric's notify takes mm_lock,
 *    and libfabric calls subscribe/unsubscribe/valid with mm_lock held. A
 *    thread holding a stand-in for mm_lock (which our interposed notify
 *    takes, as libfabric's does) calls subscribe, valid and unsubscribe
 *    while a notify waits for that lock: none of them may wait for the
 *    notify (alarm(20) fails the test on a deadlock);
 * 4. providers: with the monitor imported, fi_mr_reg on the providers that
 *    run without RDMA hardware (tcp, udp, sockets, with rxm/rxd): the
 *    test reports whether libfabric's MR cache subscribed anything.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_ext.h>

#include "common.h"

#define LEN  (256ul << 10)
#define PROT (PROT_READ | PROT_WRITE)

static struct fi_ops_mem_notify *lf_notify; /* libfabric's, saved */
static struct fi_ops_mem_notify  spy_notify;
static struct fi_ops_mem_monitor spy_export;
static const struct fi_ops_mem_monitor *our_export;
static struct fid_mem_monitor *mon;

static pthread_mutex_t mm = PTHREAD_MUTEX_INITIALIZER; /* stand-in for mm_lock */
static volatile int      in_notify;
static volatile uint64_t notifies, subscribes;
static const void       *last_addr;
static size_t            last_len;
static int               valid_during_notify = -1;

/* libfabric's notify, interposed: records, checks valid(), takes the
 * mm_lock stand-in (as libfabric's does), then calls libfabric's. */
static void spy(struct fid_mem_monitor *m, const void *addr, size_t len)
{
    __atomic_store_n(&in_notify, 1, __ATOMIC_SEQ_CST);
    valid_during_notify = our_export->valid(m, addr, len);
    pthread_mutex_lock(&mm);
    last_addr = addr;
    last_len  = len;
    __atomic_fetch_add(&notifies, 1, __ATOMIC_SEQ_CST);
    lf_notify->notify(m, addr, len);
    pthread_mutex_unlock(&mm);
    __atomic_store_n(&in_notify, 0, __ATOMIC_SEQ_CST);
}

static int spy_subscribe(struct fid_mem_monitor *m, const void *addr, size_t len)
{
    __atomic_fetch_add(&subscribes, 1, __ATOMIC_SEQ_CST);
    return our_export->subscribe(m, addr, len);
}

static void *map(void)
{
    void *p = mmap(NULL, LEN, PROT, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return p;
}

static void *unmapper(void *p)
{
    munmap(p, LEN);
    return NULL;
}

static int wait_flag(volatile int *f)
{
    for (int i = 0; i < 10000 && !__atomic_load_n(f, __ATOMIC_SEQ_CST); ++i) {
        usleep(1000);
    }
    return __atomic_load_n(f, __ATOMIC_SEQ_CST);
}

static void probe_provider(const char *prov)
{
    struct fi_info *hints = fi_allocinfo(), *info = NULL;
    struct fid_fabric *fab = NULL;
    struct fid_domain *dom = NULL;
    struct fid_mr *mr = NULL;
    uint64_t before = subscribes;
    void *buf = map();
    int ret;

    hints->fabric_attr->prov_name = strdup(prov);
    hints->caps = FI_MSG | FI_RMA;
    hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY;
    ret = fi_getinfo(FI_VERSION(1, 13), NULL, NULL, 0, hints, &info);
    if (ret) {
        printf("libfabric provider %-12s: not available here (%s)\n", prov, fi_strerror(-ret));
        goto out;
    }
    if ((ret = fi_fabric(info->fabric_attr, &fab, NULL)) ||
        (ret = fi_domain(fab, info, &dom, NULL)) ||
        (ret = fi_mr_reg(dom, buf, LEN, FI_SEND | FI_RECV | FI_READ | FI_WRITE, 0, 0, 0, &mr, NULL))) {
        printf("libfabric provider %-12s: %s failed: %s\n", prov,
               !fab ? "fi_fabric" : !dom ? "fi_domain" : "fi_mr_reg", fi_strerror(-ret));
        goto out;
    }
    printf("libfabric provider %-12s (%s): fi_mr_reg ok, MR cache subscriptions to our "
           "monitor: %llu -> %s\n", prov, info->fabric_attr->prov_name,
           (unsigned long long)(subscribes - before),
           subscribes > before ? "libfabric's cache uses our monitor"
                               : "this provider registers without libfabric's MR cache: "
                                 "cache invalidation on munmap could not be shown with it");
out:
    if (mr) fi_close(&mr->fid);
    if (dom) fi_close(&dom->fid);
    if (fab) fi_close(&fab->fid);
    if (info) fi_freeinfo(info);
    fi_freeinfo(hints);
    munmap(buf, LEN);
}

int main(void)
{
    notifier_monitor m = monitor_or_skip("fi_import_monitor");
    void *p = NULL, *buf, *buf2, *buf3;
    pthread_t t;
    int ret;

    alarm(20); /* a deadlock fails the test (SIGALRM) instead of hanging CI */
    CHECK(notifier_fi_monitor_create(m, &p) == NOTIFIER_OK && p, "fi_monitor_create");
    mon = p;
    CHECK(mon->fid.fclass == FI_CLASS_MEM_MONITOR, "fclass %zu", mon->fid.fclass);
    CHECK(notifier_monitor_destroy(m) == NOTIFIER_EBUSY,
          "a monitor with an exported libfabric monitor must not be destroyed");

    /* 1. import (after libfabric initialised its monitors: fi_getinfo) */
    {
        struct fi_info *all = NULL;
        if (fi_getinfo(FI_VERSION(1, 13), NULL, NULL, 0, NULL, &all) == 0) {
            fi_freeinfo(all);
        }
    }
    ret = fi_import(FI_VERSION(1, 13), "mr_cache", NULL, 0, 0, &mon->fid, NULL);
    CHECK(ret == 0, "fi_import: %s", fi_strerror(-ret));
    CHECK(mon->import_ops && mon->import_ops->notify, "libfabric gave no notify");
    our_export = mon->export_ops;
    lf_notify  = mon->import_ops;
    spy_notify.size   = sizeof(spy_notify);
    spy_notify.notify = spy;
    mon->import_ops   = &spy_notify;
    spy_export           = *our_export;
    spy_export.subscribe = spy_subscribe;
    mon->export_ops      = &spy_export;

    /* 2. round trip (the calls libfabric's cache makes) */
    CHECK(our_export->start(mon) == 0, "start");
    buf = map();
    CHECK(mon->export_ops->subscribe(mon, (char *)buf + 100, 5000) == 0, "subscribe");
    CHECK(our_export->valid(mon, (char *)buf + 100, 5000), "valid before any event");
    munmap(buf, LEN);
    CHECK(notifier_monitor_sync(m) == NOTIFIER_OK, "sync");
    CHECK(notifies == 1, "%llu notifies after munmap", (unsigned long long)notifies);
    CHECK((uintptr_t)last_addr <= (uintptr_t)buf + 100 &&
              (uintptr_t)last_addr + last_len >= (uintptr_t)buf + 5100,
          "notify %p+%zu does not cover the subscription", last_addr, last_len);
    CHECK(valid_during_notify == 0, "valid() was true while the notify was in flight");
    CHECK(our_export->valid(mon, (char *)buf + 100, 5000), "valid after the notify returned");
    printf("libfabric: subscribe %p+5000 -> munmap -> notify(%p, %zu) through fi_import; "
           "valid() false during the notify, true after\n", (char *)buf + 100, last_addr, last_len);

    /* 3. re-entrancy: subscribe/valid/unsubscribe under "mm_lock" while a
     * notify waits for it */
    buf2 = map();
    buf3 = map();
    CHECK(mon->export_ops->subscribe(mon, buf2, LEN) == 0, "subscribe buf2");
    pthread_mutex_lock(&mm);
    pthread_create(&t, NULL, unmapper, buf2);
    CHECK(wait_flag(&in_notify), "the notify for buf2 never started");
    CHECK(mon->export_ops->subscribe(mon, buf3, LEN) == 0, "subscribe under mm_lock");
    CHECK(!our_export->valid(mon, buf2, LEN), "valid(buf2) true while its notify waits");
    our_export->unsubscribe(mon, buf3, LEN);
    our_export->stop(mon); /* never waits for the notify in flight */
    CHECK(our_export->start(mon) == 0, "start again");
    pthread_mutex_unlock(&mm);
    pthread_join(t, NULL);
    CHECK(notifier_monitor_sync(m) == NOTIFIER_OK, "sync");
    CHECK(notifies == 2 && last_addr == buf2, "notify for buf2 (%llu notifies)",
          (unsigned long long)notifies);
    printf("libfabric: subscribe, valid, unsubscribe, stop and start under the mm_lock "
           "stand-in while a notify waited for it: no deadlock\n");
    munmap(buf3, LEN);

    /* 4. providers without RDMA hardware */
    probe_provider("tcp");
    probe_provider("udp");
    probe_provider("sockets");

    /* teardown */
    our_export->stop(mon);
    mon->import_ops = lf_notify;
    mon->export_ops = (struct fi_ops_mem_monitor *)our_export;
    CHECK(fi_close(&mon->fid) == 0, "fi_close");
    CHECK(notifier_fi_monitor_destroy(p) == NOTIFIER_OK, "fi_monitor_destroy");
    CHECK(notifier_fi_monitor_destroy(p) == NOTIFIER_EBADHANDLE, "double destroy");
    CHECK(notifier_fi_monitor_destroy(&ret) == NOTIFIER_EBADHANDLE, "foreign pointer");
    CHECK(notifier_monitor_destroy(m) == NOTIFIER_OK, "monitor destroy");
    alarm(0);
    return finish("fi_import_monitor");
}
