#!/bin/sh
# tests/arm64.sh -- the quant tests (tests/test_quant.c) built for arm64 and
# run under qemu's user-mode emulator, on CPU models with and without the
# dot-product extension, so that every NEON kernel variant of ds4.c 3.9 and
# its start-up detection are exercised on an x86 machine. Run by
# `make test-arm64` and by tests/run.sh when the tools are present:
#
#     apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
#
# qemu only checks results; its timings say nothing about arm64 hardware.
#
# test_quant includes ds4.c, which includes <sqlite3.h>; the arm64 sysroot
# has no SQLite, but the header is the same on every architecture and the
# test calls no SQLite function, so a copy of the host's header is enough
# (and nothing is linked against SQLite).
#
# With --model it also runs tests/test_model.c (the tiny model, float and
# 8-bit activations, against the reference kernels) under -cpu max: some 12
# minutes, so make test leaves it out; `make test-arm64-model` runs it.
#
# Prints each run's output and then the total, "N passed, N failed".

AARCH64_CC=${AARCH64_CC:-aarch64-linux-gnu-gcc}
QEMU=${QEMU_AARCH64:-qemu-aarch64}
out=tests/bin/arm64
mkdir -p "$out/include" || exit 1

host_header=$(echo '#include <sqlite3.h>' | ${CC:-cc} -E -M -x c - 2>/dev/null |
              tr ' \\' '\n\n' | grep 'sqlite3\.h$' | head -n 1)
if [ -z "$host_header" ]; then
    echo "no sqlite3.h on this machine to lend the arm64 build"
    echo "0 passed, 1 failed"
    exit 1
fi
cp "$host_header" "$out/include/sqlite3.h" || exit 1

passed=0
failed=0
log=$(mktemp)

# build NAME MARCH [SOURCE [FLAGS]]: tests/test_quant.c (or SOURCE) for arm64,
# statically linked (qemu then needs no arm64 libraries at run time).
build() {
    echo "== build $1 ($2)"
    if ! "$AARCH64_CC" -O2 -g -march="$2" $4 -Wall -Wextra -Wno-unused-function -D_GNU_SOURCE \
         -I "$out/include" -static -o "$out/$1" "${3:-tests/test_quant.c}" -lm -lpthread; then
        failed=$((failed + 1))
        return 1
    fi
}

# run NAME CPU ARGS...: one run under qemu.
run() {
    name=$1 cpu=$2
    shift 2
    echo "== $name on qemu -cpu $cpu $*"
    "$QEMU" -cpu "$cpu" "$out/$name" "$@" >"$log" 2>&1
    rc=$?
    cat "$log"
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
    p=$(echo "$line" | sed -n 's/^\([0-9]*\) passed.*/\1/p')
    f=$(echo "$line" | sed -n 's/^[0-9]* passed, \([0-9]*\) failed.*/\1/p')
    [ -n "$p" ] || p=0
    [ -n "$f" ] || f=0
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "!! exited with status $rc without reporting a failure"
        f=1
    fi
    passed=$((passed + p))
    failed=$((failed + f))
}

# The baseline build (arm64 v8.0, what a Linux distribution compiles for):
# sdot only in the functions marked for it, chosen at run time.
expect=--expect-q8-variants
if build test_quant armv8-a; then
    run test_quant max $expect neon-dotprod,neon            # every extension qemu has
    run test_quant neoverse-n1 $expect neon-dotprod,neon    # dotprod, no i8mm
    run test_quant cortex-a53 $expect neon                  # plain NEON
fi
# A build for a CPU with sdot everywhere (as Apple's compilers do by default).
if build test_quant_dotprod armv8.2-a+dotprod; then
    run test_quant_dotprod max $expect neon-dotprod,neon
fi
# GCC 12's vectorizer crashes (an internal compiler error in
# vect_transform_reduction) on test_model.c for arm64, so that one build goes
# without it; ds4.c alone compiles with it.
if [ "$1" = "--model" ] &&
   build test_model armv8-a tests/test_model.c -fno-tree-vectorize; then
    run test_model max vectors/tiny.gguf vectors/tiny-mtp.gguf tests/bin/tiny-q8_0.gguf \
        tests/bin/tiny-q2.gguf tests/bin/tiny-q4.gguf
fi

rm -f "$log"
echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
