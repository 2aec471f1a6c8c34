#!/bin/sh
# Runs every test suite, shows its output, and adds up the "N passed, N failed"
# line each one ends with. A suite that crashes or exits non-zero without
# reporting a failure counts as one failure, so nothing fails silently.
# Run from the repository root (make test does).

total_passed=0
total_failed=0
log=$(mktemp)

suite() {
    name=$1
    shift
    echo "== $name"
    "$@" >"$log" 2>&1
    rc=$?
    cat "$log"
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
    passed=$(echo "$line" | sed -n 's/^\([0-9]*\) passed.*/\1/p')
    failed=$(echo "$line" | sed -n 's/^[0-9]* passed, \([0-9]*\) failed.*/\1/p')
    [ -n "$passed" ] || passed=0
    [ -n "$failed" ] || failed=0
    if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
        echo "!! $name exited with status $rc without reporting a failure"
        failed=1
    fi
    total_passed=$((total_passed + passed))
    total_failed=$((total_failed + failed))
}

B=tests/bin
suite "quant blocks (fast kernels vs reference)" $B/test_quant
# arm64 under emulation, where the cross compiler and qemu are installed (tests/arm64.sh).
if command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1
then
    suite "quant blocks on arm64 under qemu (NEON kernel variants, detection)" sh tests/arm64.sh
else
    echo "== quant blocks on arm64 under qemu: skipped" \
         "(no aarch64-linux-gnu-gcc or qemu-aarch64 on PATH)"
fi
suite "JSON (ASan+UBSan)" $B/test_json
suite "fuzz: JSON reader, HTTP head, chunked bodies (ASan+UBSan, seed 1)" $B/fuzz_http 20000 1
suite "GGUF hostile files (ASan+UBSan)" $B/test_gguf vectors/tiny.gguf
suite "converter (ASan+UBSan)" $B/test_convert
suite "text: tokenizer, chat template, DSML (ASan+UBSan)" $B/test_text
suite "model: primitives, prefill == chunked == decode, fast vs reference" \
    $B/test_model vectors/tiny.gguf vectors/tiny-mtp.gguf $B/tiny-q8_0.gguf $B/tiny-q2.gguf $B/tiny-q4.gguf
suite "speculative decoding: rollback, greedy identity, sampling rule" \
    $B/test_spec vectors/tiny.gguf vectors/tiny-mtp.gguf
suite "backend table: every op called as expected, output == CPU, no decode allocations" \
    $B/test_backend vectors/tiny.gguf vectors/tiny-mtp.gguf
suite "KV disk cache: snapshots, store, hostile files (ASan+UBSan)" \
    $B/test_kvdisk vectors/tiny.gguf vectors/tiny-mtp.gguf
suite "Metal kernels on the CPU harness vs their CPU twins" $B/test_metal
suite "Metal: the tiny model through the GPU backend on the harness (vs CPU, vectors)" \
    $B/test_metal_model vectors/tiny.gguf vectors/tiny-mtp.gguf vectors/vectors.json \
    $B/tiny-q8_0.gguf $B/tiny-q2.gguf $B/tiny-q4.gguf
suite "Metal host: ds4_metal.m syntax check, kernel table" sh tests/metal/syntax.sh
suite "CUDA kernels (ds4_cuda.cu, emulated on the CPU) vs their CPU twins" $B/test_cuda
suite "CUDA: the tiny model through ds4_cuda.cu emulated (vs CPU, vectors; short)" \
    $B/test_cuda_model --short vectors/tiny.gguf vectors/tiny-mtp.gguf vectors/vectors.json \
    $B/tiny-q2.gguf
suite "CUDA host: ds4_cuda.cu syntax check as CUDA, kernel names" sh tests/cuda/syntax.sh
suite "KV disk cache across processes: restart, kill -9, two writers" sh tests/kvdisk.sh
suite "oracle vectors (tiny f16 + MTP)" \
    ./ds4 --check-vectors vectors/vectors.json -m vectors/tiny.gguf --mtp vectors/tiny-mtp.gguf
suite "command line" sh tests/cli.sh
suite "server: curl edge cases + openai and @anthropic-ai/sdk clients" sh tests/server/run.sh ./ds4
suite "server: raw HTTP/1.1 and hardening (keep-alive, chunked, browsers, slots, memory)" \
    python3 tests/server/http_raw.py ./ds4
suite "server restart: sessions on disk (--kv-disk-dir)" sh tests/server/restart.sh ./ds4
suite "server prompt cache: sessions, checkpoints, rewinds" sh tests/server/cache.sh ./ds4
suite "book: ds4.c renders and passes its lint" python3 tools/book.py --check ds4.c
suite "book tools: the lint fails where it must, twins, lists, index" python3 tests/book_tools_test.py
suite "book in headless Chromium: every page, overflow, internal links" python3 tests/book_browser.py
suite "book/ is in sync with ds4.c" sh tests/book_sync.sh

rm -f "$log"
echo
echo "$total_passed passed, $total_failed failed"
[ "$total_failed" -eq 0 ]
