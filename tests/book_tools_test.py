#!/usr/bin/env python3
"""book_tools_test.py -- tools/book.py on small synthetic files: the lint
fails on what it must fail on, and the renderer puts GPU twins beside their
CPU function, nested verbatim inside list items, and one section list per
chapter. Ends with "N passed, N failed". Run from the repository root."""
import os, shutil, subprocess, sys, tempfile

BOOK = os.path.abspath("tools/book.py")
PREFACE = """/* t.c -- a test file.
 *
 * - [DOC] docs/n.md: a note.
 * - [PAPER] A paper.
 */
"""
CH1 = """/* ============================================================================
 * Chapter 1. One
 * ============================================================================
 *
 * The first chapter. Its sections: 1.1 First, 1.2 Second, 1.3 Third.
 *
 *     1.1  First
 *     1.2  Second
 *     1.3  Third
 * ------------------------------------------------------------------------- */

/* ---- 1.1 First ------------------------------------------------------------ */

/* Adds. [PAPER] [DOC §2] */
static int rmsnorm(int a) { return a + 1; }

/* ---- 1.2 Second ----------------------------------------------------------- */

/* The steps:
 *
 *   1.  one alternation:
 *       a.  [abc]+
 *       b.  \\s*
 */
static int two(void) { return 2; }

/* ---- 1.3 Third ------------------------------------------------------------ */

static int three(void) { return 3; }
"""
passed = failed = 0


def result(ok, msg):
    global passed, failed
    print(("ok    " if ok else "FAIL  ") + msg)
    passed, failed = passed + ok, failed + (not ok)


def run(d, *args):
    return subprocess.run([sys.executable, BOOK] + list(args), cwd=d, capture_output=True, text=True)


def main():
    d = tempfile.mkdtemp(prefix="ds4-book-tools-")
    try:
        os.makedirs(os.path.join(d, "docs"))
        open(os.path.join(d, "docs", "n.md"), "w").write("# N\n\n## 1. One\n\n## 2. Two\n")
        good = PREFACE + CH1
        open(os.path.join(d, "t.c"), "w").write(good)
        r = run(d, "--check", "t.c")
        result(r.returncode == 0, "a clean file passes book-check")
        cases = [("[NOPE]", "bibliography"), ("[DOC §9]", "cited section"), ("see 1.7", "cross-reference"),
                 ("chapter 4", "chapter reference"), ("shared/docs/x.md", "outside the repository")]
        for text, what in cases:
            open(os.path.join(d, "t.c"), "w").write(good.replace("/* Adds.", "/* Adds, %s." % text))
            r = run(d, "--check", "t.c")
            result(r.returncode != 0 and what in r.stdout, "book-check fails on %r (%s)" % (text, what))
        open(os.path.join(d, "t.c"), "w").write(good.replace("/* Adds.", "/* Adds.\n *\n *      - deep\n *      - list\n *\n * x"))
        r = run(d, "--check", "t.c")
        result(r.returncode != 0 and "verbatim" in r.stdout, "book-check fails on a list rendered as verbatim")
        open(os.path.join(d, "t.c"), "w").write(good.replace("{ return a + 1; }", "{ return a + 1; }" + " " * 90))
        r = run(d, "--check", "--lax-columns", "t.c")
        result(r.returncode == 0 and "1 lines are" in r.stdout, "--lax-columns: a line over 100 columns is counted, as a warning")
        r = run(d, "--check", "t.c")
        result(r.returncode != 0, "a line over 100 columns fails the check")
        open(os.path.join(d, "t.c"), "w").write(good)
        open(os.path.join(d, "k.cu"), "w").write("__global__ void kernel_rmsnorm(int *a) {\n    a[0]++;\n}\n")
        r = run(d, "--out", "out", "t.c")
        page = open(os.path.join(d, "out", "01-one.html")).read() if r.returncode == 0 else ""
        result("CUDA twin of rmsnorm: k.cu:1-3" in page, "a CUDA kernel named like its CPU twin is shown beside it")
        result('<pre class="verbatim">a.  [abc]+' in page, "lines under a list item render as verbatim inside it")
        result('<ul class="secs">' not in page, "a chapter that lists its own sections is not given a second list")
        idx = open(os.path.join(d, "out", "identifiers.html")).read() if r.returncode == 0 else ""
        result(">Adds. [PAPER] [DOC §2]</td>" in idx, "the index gives a name's chapter and first comment line")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
