#!/bin/sh
# Regenerates the book from the current sources into a temporary directory
# and compares it with the committed book/. A difference means book/ is
# stale: run `make book` and commit the result. Run from the repository root.

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

if ! ${MAKE:-make} -s book BOOK_DIR="$tmp/book" >"$tmp/log" 2>&1; then
    cat "$tmp/log"
    echo "FAIL  tools/book.py could not render the book"
    echo "0 passed, 1 failed"
    exit 1
fi
if diff -r -q book "$tmp/book" >"$tmp/diff" 2>&1; then
    echo "ok    book/ matches what make book generates from the current sources"
    echo "1 passed, 0 failed"
    exit 0
fi
sed 's/^/      /' "$tmp/diff"
echo "FAIL  book/ is stale: run make book and commit book/"
echo "0 passed, 1 failed"
exit 1
