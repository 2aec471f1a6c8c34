// tests/cuda/stubs/cuda_fp16.h -- __half and __half2float, as declared by
// the real header (see cuda_runtime.h here: for syntax checks only).
#pragma once
struct __half {
    unsigned short x;
};
__attribute__((host)) __attribute__((device)) float __half2float(__half h);
