/* Shared helpers of the C tests (tests/run_c.sh builds and runs them). */
#ifndef NOTIFIER_TEST_COMMON_H
#define NOTIFIER_TEST_COMMON_H
#include <notifier.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);               \
            fprintf(stderr, __VA_ARGS__);                                      \
            fputc('\n', stderr);                                               \
            ++failures;                                                        \
        }                                                                      \
    } while (0)

/* A monitor, or exit 77 (skip) when userfaultfd is unavailable, unless
 * NOTIFIER_REQUIRE_UFFD=1 (then exit 1). */
static notifier_monitor monitor_or_skip(const char *test)
{
    notifier_monitor m;
    int st = notifier_monitor_create(0, &m);
    if (st != NOTIFIER_OK) {
        char err[1024];
        const char *req = getenv("NOTIFIER_REQUIRE_UFFD");
        notifier_last_error(err, sizeof err);
        fprintf(stderr, "%s: %s: %s (%d: %s)\n", test,
                req && !strcmp(req, "1") ? "FAIL: userfaultfd required"
                                         : "SKIP: userfaultfd unavailable",
                err, st, notifier_strerror(st));
        exit(req && !strcmp(req, "1") ? 1 : 77);
    }
    return m;
}

static int finish(const char *test)
{
    if (failures) {
        fprintf(stderr, "%s: %d check(s) failed\n", test, failures);
        return 1;
    }
    printf("%s: all checks passed\n", test);
    return 0;
}
#endif
