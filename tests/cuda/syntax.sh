#!/bin/sh
# tests/cuda/syntax.sh -- what a machine without the CUDA toolkit can check of
# ds4_cuda.cu beyond running it emulated (tests/test_cuda*, make test):
#   1. the whole file parses and type-checks as CUDA for the host side
#      (clang++ -x cuda --cuda-host-only -nocudainc) against the declarations
#      in tests/cuda/stubs/: the runtime calls, the <<<>>> launch;
#   2. the same for the device side (--cuda-device-only, sm_80: the newest
#      arch clang 14 knows; sm_90 code is the same source);
#   3. where nvcc is installed (no GPU needed): it compiles for sm_90 and no
#      kernel spills registers;
#   4. its __global__ kernels are exactly the `kernel void` functions of
#      kernels.metal (a kernel added to one backend only fails here).
# Prints "N passed, N failed". Run from the repository root.
passed=0
failed=0
result() {
    if [ "$1" -eq 0 ]; then echo "ok   $2"; passed=$((passed + 1));
    else echo "FAIL $2"; failed=$((failed + 1)); fi
}
flags="-x cuda -nocudainc -nocudalib -std=c++14 -fsyntax-only -Wall -Wno-unknown-cuda-version"
out=$(clang++ $flags --cuda-host-only -I tests/cuda/stubs ds4_cuda.cu 2>&1)
rc=$?
[ -n "$out" ] && echo "$out"
result $rc "ds4_cuda.cu: clang++ -x cuda --cuda-host-only against tests/cuda/stubs"
out=$(clang++ $flags --cuda-device-only --cuda-gpu-arch=sm_80 -I tests/cuda/stubs ds4_cuda.cu 2>&1)
rc=$?
[ -n "$out" ] && echo "$out"
result $rc "ds4_cuda.cu: clang++ -x cuda --cuda-device-only (sm_80) against tests/cuda/stubs"
# 3. nvcc, when installed.
if command -v nvcc >/dev/null 2>&1; then
    o=$(mktemp)
    out=$(nvcc -O2 -std=c++14 -arch=sm_90 -Xptxas -v -Xcompiler -Wall -c -o "$o" ds4_cuda.cu 2>&1)
    rc=$?
    echo "$out" | grep -E 'error|warning' | grep -v 'ptxas info'
    spills=$(echo "$out" | grep -c '[1-9][0-9]* bytes spill')
    entries=$(echo "$out" | grep -c 'Compiling entry function')
    echo "nvcc: $entries kernels compiled for sm_90, $spills with register spills"
    result $rc "ds4_cuda.cu: nvcc -arch=sm_90 compiles it"
    [ "$spills" -eq 0 ] && [ "$entries" -eq 37 ]
    result $? "nvcc: 37 kernels (23 + 7 types x matmul_rows, matmul_experts), none spilling"
    rm -f "$o"
else
    echo "skip nvcc not on PATH: ds4_cuda.cu not compiled for a GPU here"
fi
k=$(mktemp); c=$(mktemp)
sed -n 's/^kernel void \([a-z0-9_]*\)(.*/\1/p' kernels.metal >"$k"
sed -n 's/^MATMUL\(_ROWS\|_EXPERTS\)*_KERNEL(\([a-z0-9_]*\),.*/\2/p' kernels.metal >>"$k"
# CUDA: the plain kernels, and the per-type instances of the two matmul
# templates by the names the host table gives them.
sed -n 's/^__global__ void \([a-z0-9_]*\)(.*/\1/p' ds4_cuda.cu | grep -v '_kernel$' >"$c"
grep -o '"matmul_\(rows\|experts\)_[a-z0-9_]*"' ds4_cuda.cu | tr -d '"' | sort -u >>"$c"
sort -o "$k" "$k"; sort -o "$c" "$c"
echo "kernels.metal: $(wc -l <"$k") kernels; ds4_cuda.cu: $(wc -l <"$c") __global__ kernels"
diff "$k" "$c"
result $? "ds4_cuda.cu's kernels == kernels.metal's kernels (same names)"
rm -f "$k" "$c"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
