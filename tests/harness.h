/* tests/harness.h -- the one small harness every test program shares.
 *
 * Every check prints one line -- "ok  " or "FAIL", what was compared, and
 * for numeric checks the difference and its tolerance -- and counts itself;
 * harness_report() prints the "N passed, N failed" line that tests/run.sh
 * adds up, and returns the exit status.
 *
 * The programs grew three spellings of check(); each file picks its own by
 * defining one selector before including this header, so call sites stay as
 * they are:
 *
 *   HARNESS_CHECK_TOL      check(what, diff, tol)   passes when diff <= tol
 *   HARNESS_CHECK_DETAIL   check(ok, what, detail)
 *   (neither)              check(ok, fmt, ...)      printf-style message
 *
 * The other helpers (check_msg, check_tol, check_quiet, check_true) are
 * available to every file under those names.
 *
 * Test data is found relative to the repository: repo_path("vectors/tiny")
 * tries the path as given (make test runs from the root), then the same
 * path under each parent directory of the working directory that holds
 * ds4.c. No absolute path of any machine is built in.
 */
#ifndef DS4_TESTS_HARNESS_H
#define DS4_TESTS_HARNESS_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int tests_passed, tests_failed;

static bool harness_count(bool ok) {
    if (ok) tests_passed++;
    else tests_failed++;
    return ok;
}

/* ok/FAIL, then the message; quiet passes print nothing (long loops). */
static bool vcheck_msg(bool ok, bool quiet, const char *fmt, va_list ap) {
    harness_count(ok);
    if (ok && quiet) return ok;
    printf("%s ", ok ? "ok  " : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    return ok;
}

static bool check_msg(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool check_msg(bool ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vcheck_msg(ok, false, fmt, ap);
    va_end(ap);
    return ok;
}

static bool check_quiet(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool check_quiet(bool ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vcheck_msg(ok, true, fmt, ap);
    va_end(ap);
    return ok;
}

/* A numeric comparison: passes when diff <= tol, and says both. */
static bool check_tol(const char *what, double diff, double tol) {
    bool ok = diff <= tol;
    harness_count(ok);
    printf("%s %-62s maxdiff %.3e  tol %.1e\n", ok ? "ok  " : "FAIL", what, diff, tol);
    return ok;
}

static bool check_true(const char *what, bool ok) {
    return check_tol(what, ok ? 0.0 : 1.0, 0.0);
}

#if defined(HARNESS_CHECK_TOL)
static bool check(const char *what, double diff, double tol) { return check_tol(what, diff, tol); }
#elif defined(HARNESS_CHECK_DETAIL)
static bool check(bool ok, const char *what, const char *detail) {
    return check_msg(ok, "%-58s %s", what, detail ? detail : "");
}
#else
static bool check(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool check(bool ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vcheck_msg(ok, false, fmt, ap);
    va_end(ap);
    return ok;
}
#endif

static int harness_report(void) {
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed ? 1 : 0;
}

/* `rel` if it exists from here, else `rel` under the nearest parent
 * directory that holds ds4.c (the repository root); NULL if neither. The
 * result lives in a static buffer until the next call. */
static const char *repo_path(const char *rel) {
    static char buf[8192];
    if (access(rel, F_OK) == 0) return rel;
    char dir[4096];
    if (!getcwd(dir, sizeof dir)) return NULL;
    for (;;) {
        int n = snprintf(buf, sizeof buf, "%s/ds4.c", dir);
        if (n > 0 && (size_t)n < sizeof buf && access(buf, F_OK) == 0) {
            n = snprintf(buf, sizeof buf, "%s/%s", dir, rel);
            if (n > 0 && (size_t)n < sizeof buf && access(buf, F_OK) == 0) return buf;
        }
        char *slash = strrchr(dir, '/');
        if (!slash || slash == dir) return NULL;
        *slash = '\0';
    }
}

#endif
