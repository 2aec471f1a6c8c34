#!/bin/sh
# tests/metal/syntax.sh -- what Linux can check of the Mac host side:
#   1. ds4_metal.m parses and type-checks as Objective-C (ARC) against the
#      stub headers in tests/metal/stubs/ (Apple's selector shapes);
#   2. its kernel table names exactly the `kernel void` functions of
#      kernels.metal (a kernel added on one side only fails here).
# Prints "N passed, N failed". Run from the repository root.
passed=0
failed=0
result() {
    if [ "$1" -eq 0 ]; then echo "ok   $2"; passed=$((passed + 1));
    else echo "FAIL $2"; failed=$((failed + 1)); fi
}
out=$(clang -fsyntax-only -x objective-c -fobjc-runtime=macosx-10.15 -fobjc-arc -fblocks -Wall -Wno-unused-function \
      -I tests/metal/stubs ds4_metal.m 2>&1)
rc=$?
[ -n "$out" ] && echo "$out"
result $rc "ds4_metal.m: clang -fsyntax-only (Objective-C, ARC) against tests/metal/stubs"
k=$(mktemp); t=$(mktemp)
sed -n 's/^kernel void \([a-z0-9_]*\)(.*/\1/p; s/^ *kernel void name(.*/MACRO/p' kernels.metal \
    | grep -v MACRO >"$k"
sed -n 's/^MATMUL\(_ROWS\|_EXPERTS\)*_KERNEL(\([a-z0-9_]*\),.*/\2/p' kernels.metal >>"$k"
sed -n 's/^    \[K_[A-Z0-9_]*\] = { "\([a-z0-9_]*\)".*/\1/p' ds4_metal.m >"$t"
sort -o "$k" "$k"; sort -o "$t" "$t"
echo "kernels.metal: $(wc -l <"$k") kernels; ds4_metal.m table: $(wc -l <"$t") entries"
diff "$k" "$t"
result $? "ds4_metal.m's kernel table == kernels.metal's kernels"
rm -f "$k" "$t"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
