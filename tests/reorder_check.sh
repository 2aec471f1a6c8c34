#!/bin/sh
# The reorder script (tools/reorder_book.py) on a copy of ds4.c: it must
# place every chapter, compile (cc -fsyntax-only), keep every code line, and
# leave a file that passes the book lint. The lead runs it once on the merged
# tree; this test keeps it working while the chapters grow. Run from the root.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
passed=0; failed=0
result() { if [ "$1" = 0 ]; then echo "ok    $2"; passed=$((passed + 1)); else echo "FAIL  $2"; failed=$((failed + 1)); fi; }

cp -r docs "$tmp/docs"
python3 tools/reorder_book.py ds4.c "$tmp/ds4.c" >"$tmp/log" 2>&1
rc=$?
sed 's/^/      /' "$tmp/log"
result $rc "tools/reorder_book.py reorders a copy of ds4.c and the result compiles"
# Every code line (not a comment) of the input appears in the output as often.
python3 - ds4.c "$tmp/ds4.c" <<'PY'
import sys, re
from collections import Counter
def code(p):
    out, inside = Counter(), False
    for l in open(p, encoding="utf-8"):
        s = l.strip()
        if inside or s.startswith("/*") or s.startswith("*") or not s:
            inside = (inside or s.startswith("/*")) and "*/" not in s
            continue
        out[re.sub(r"/\*.*?\*/", "", l).rstrip()] += 1     # trailing comments are renumbered
    return out
a, b = code(sys.argv[1]), code(sys.argv[2])
lost = a - b
print("      code lines of the input missing from the output: %d" % sum(lost.values()))
for l in list(lost)[:5]:
    print("        " + l.rstrip())
sys.exit(1 if lost else 0)
PY
result $? "every code line of ds4.c is kept"
python3 tools/book.py --check "$tmp/ds4.c" >"$tmp/check" 2>&1
rc=$?
grep -E '^(FAIL|  the forward pass)' "$tmp/check" | sed 's/^/      /'
result $rc "the reordered file passes book-check (chapters numbered, references resolve)"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
