#!/bin/sh
# tests/cuda/device.sh -- every CUDA check that needs the GPU, in one run
# (make test-cuda calls it after building ./ds4 with --backend cuda):
#   1. the kernels on the GPU against their CPU twins (test_cuda_gpu);
#   2. the oracle vectors through --backend cuda, without and with MTP;
#   3. greedy output with --mtp-draft 1, 2, 3 == greedy without drafting;
#   4. a disk snapshot saved by the CUDA backend continues on the CPU, and
#      back: the next 16 greedy tokens agree;
#   5. compute-sanitizer (memcheck) on a short run, when installed;
#   6. CUDA against CPU on a full-width synthetic model, every position of a
#      300-token prompt (FULL_LAYERS layers, default 4; FULL_LAYERS=0 skips;
#      FULL_REFERENCE=0 skips the CPU-against-itself figure, SANITIZE=0 step 5).
# Prints "N passed, N failed". Run from the repository root.
B=tests/bin
passed=0
failed=0
result() {
    if [ "$1" -eq 0 ]; then echo "ok   $2"; passed=$((passed + 1));
    else echo "FAIL $2"; failed=$((failed + 1)); fi
}
counts() {   # the "N passed, N failed" line of log $1 into the totals
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$1" | tail -n 1)
    p=$(echo "$line" | sed -n 's/^\([0-9]*\) passed.*/\1/p')
    f=$(echo "$line" | sed -n 's/.* \([0-9]*\) failed.*/\1/p')
    passed=$((passed + ${p:-0})); failed=$((failed + ${f:-1}))
}
M="-m vectors/tiny.gguf"
MTP="--mtp vectors/tiny-mtp.gguf"
$B/test_cuda_gpu >$B/cuda-kernels.log 2>&1; cat $B/cuda-kernels.log; counts $B/cuda-kernels.log
./ds4 --backend cuda --check-vectors vectors/vectors.json $M >$B/cuda-vectors.log 2>&1
cat $B/cuda-vectors.log; counts $B/cuda-vectors.log
./ds4 --backend cuda --check-vectors vectors/vectors.json $M $MTP >$B/cuda-vectors-mtp.log 2>&1
cat $B/cuda-vectors-mtp.log; counts $B/cuda-vectors-mtp.log

# 3. Speculative decoding does not change greedy output.
P=$(seq -s ' ' 11 3 400)
base=$(./ds4 --backend cuda $M $MTP --mtp-draft 0 --tokens "$P" -n 48 2>/dev/null)
for k in 1 2 3; do
    out=$(./ds4 --backend cuda $M $MTP --mtp-draft $k --tokens "$P" -n 48 2>/dev/null)
    [ -n "$base" ] && [ "$out" = "$base" ]
    result $? "cuda: greedy with --mtp-draft $k == without drafting (48 tokens)"
done

# 4. Snapshots interchange: CUDA saves, CPU loads and continues; and back.
D=$(mktemp -d)
chmod 700 "$D"
P=$(seq -s ' ' 5 900)
o1=$(./ds4 --backend cuda $M --tokens "$P" -n 16 --kv-disk-dir "$D" 2>/dev/null)
P2="$P $o1 7 8 9"
ref2=$(./ds4 --backend cpu $M --tokens "$P2" -n 16 2>/dev/null)
o2=$(./ds4 --backend cpu $M --tokens "$P2" -n 16 --kv-disk-dir "$D" 2>$B/cuda-kv1.log)
grep -q "loaded 912 tokens" $B/cuda-kv1.log && [ -n "$o2" ] && [ "$o2" = "$ref2" ]
result $? "snapshot saved by cuda, loaded by cpu: the next 16 greedy tokens agree"
P3="$P2 $o2 1 2 3"
ref3=$(./ds4 --backend cuda $M --tokens "$P3" -n 16 2>/dev/null)
o3=$(./ds4 --backend cuda $M --tokens "$P3" -n 16 --kv-disk-dir "$D" 2>$B/cuda-kv2.log)
grep -q "loaded 931 tokens" $B/cuda-kv2.log && [ -n "$o3" ] && [ "$o3" = "$ref3" ]
result $? "snapshot saved by cpu, loaded by cuda: the next 16 greedy tokens agree"
rm -rf "$D"

# 5. compute-sanitizer.
if [ "${SANITIZE:-1}" = 0 ]; then
    echo "skip compute-sanitizer (SANITIZE=0)"
elif command -v compute-sanitizer >/dev/null 2>&1; then
    compute-sanitizer --tool memcheck --error-exitcode 3 ./ds4 --backend cuda $M $MTP \
        --tokens "$(seq -s ' ' 1 60)" -n 8 >$B/cuda-sanitizer.log 2>&1
    rc=$?
    tail -n 3 $B/cuda-sanitizer.log
    result $rc "compute-sanitizer memcheck: prefill 60 + 8 tokens with MTP"
else
    echo "skip compute-sanitizer not installed"
fi

# 6. Full width.
L=${FULL_LAYERS:-4}
if [ "$L" -gt 0 ]; then
    F=${FULL_MODEL:-/dev/shm/ds4-full-$L.gguf}
    [ -f "$F" ] || ./ds4-convert --synthetic full --layers "$L" "$F" --type q2 >/dev/null
    ref=$([ "${FULL_REFERENCE:-1}" = 0 ] && echo --no-reference)
    $B/test_cuda_full "$F" 300 $ref >$B/cuda-full.log 2>&1
    cat $B/cuda-full.log; counts $B/cuda-full.log
fi
echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
