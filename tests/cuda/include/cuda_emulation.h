// tests/cuda/include/cuda_emulation.h -- just enough of CUDA, as C++, to run
// ds4_cuda.cu unchanged on the CPU: its kernels AND its host code.
//
//     clang++ -std=c++14 -x c++ -DDS4_CUDA_EMULATION -I tests/cuda/include -c ds4_cuda.cu
//
// WHAT IS EMULATED AND HOW
//
//   threads        the fibers of the Metal harness (tests/metal/include/
//                  metal_stdlib, included below): one fiber per thread of a
//                  block, one block at a time, round-robin on the calling
//                  host thread. __syncthreads is its threadgroup barrier; a
//                  warp is its simdgroup (threads 32w .. 32w+31).
//   __shared__     `static`: one variable for all the fibers of the block in
//                  progress, which is exactly what a block sees on a GPU
//                  (blocks run one after another here, so they cannot clash).
//                  The dynamic block is one host buffer per launch.
//   shuffles       __shfl_xor_sync is the harness's simd_shuffle_xor (every
//                  lane publishes, waits, reads its partner, waits again).
//   threadIdx ...  functions of the fiber in progress (x only: ds4's blocks
//                  are one-dimensional; grids are 3-D).
//   __half         the harness's software binary16.
//   the runtime    cudaMalloc is malloc, recorded; cudaMemcpy is memcpy, and
//                  it checks that the side named "device" IS a cudaMalloc'd
//                  range (and the host side is not): host code that passes a
//                  host pointer where the device one belongs fails here
//                  instead of on the GPU. launch_kernel checks every pointer
//                  argument of a launch the same way.
//
// Nothing here knows anything about ds4; it is the GPU, not the program.
#pragma once
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <float.h>
#include <initializer_list>
#include "../../metal/include/metal_stdlib"

// The Metal address-space words are not CUDA's; free the names.
#undef kernel
#undef device
#undef constant
#undef thread
#undef threadgroup

#define __global__
#define __device__
#define __host__
#define __constant__
#define __shared__ static
#define DS4_CUDA_EMULATED 1

typedef half __half;
inline float __half2float(__half h) { return float(h); }
inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline void __syncthreads() { metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup); }

template <class T> inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    return metal::simd_shuffle_xor(v, (ushort)lane_mask);
}

template <class T> inline T __shfl_down_sync(unsigned, T v, unsigned delta) {
    return metal::simd_shuffle_down(v, (ushort)delta);
}

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct emu_index {
    unsigned x, y, z;
};

// The launch in progress (set by launch_kernel).
struct emu_cuda_launch {
    dim3 grid, block;
    float *dynamic_shared;
};

inline emu_cuda_launch *&emu_cuda_current() {
    static emu_cuda_launch *l;
    return l;
}

inline emu_index emu_thread_idx() { return emu_index{ (unsigned)metal::emu_tid(), 0, 0 }; }
inline emu_index emu_block_idx() {
    uint3 tg = metal::emu_current_launch()->tg;
    return emu_index{ tg.x, tg.y, tg.z };
}
inline emu_index emu_block_dim() {
    dim3 b = emu_cuda_current()->block;
    return emu_index{ b.x, b.y, b.z };
}
inline emu_index emu_grid_dim() {
    dim3 g = emu_cuda_current()->grid;
    return emu_index{ g.x, g.y, g.z };
}
#define threadIdx (emu_thread_idx())
#define blockIdx (emu_block_idx())
#define blockDim (emu_block_dim())
#define gridDim (emu_grid_dim())

inline float *dynamic_shared_floats() { return emu_cuda_current()->dynamic_shared; }

// ---- The runtime ----------------------------------------------------------

typedef int cudaError_t;
enum {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorLaunchFailure = 719
};
typedef void *cudaStream_t;
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// The emulated device memory: every live cudaMalloc range.
struct emu_allocation {
    uint8_t *base;
    size_t size;
};

inline emu_allocation *emu_allocations(int **count) {
    static emu_allocation table[4096];
    static int n;
    *count = &n;
    return table;
}

// Is [p, p + bytes) inside one cudaMalloc'd range?
inline bool emu_is_device(const void *p, size_t bytes) {
    int *n;
    emu_allocation *t = emu_allocations(&n);
    const uint8_t *b = (const uint8_t *)p;
    for (int i = 0; i < *n; i++)
        if (b >= t[i].base && b + bytes <= t[i].base + t[i].size) return true;
    return false;
}

inline const char *cudaGetErrorString(cudaError_t e) {
    return e == cudaSuccess ? "no error"
         : e == cudaErrorMemoryAllocation ? "out of memory"
         : e == cudaErrorInvalidDevicePointer ? "invalid device pointer (emulation check)"
         : e == cudaErrorLaunchFailure ? "launch failure (emulation check)"
         : "invalid value";
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int *n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaStreamCreate(cudaStream_t *s) { *s = (void *)1; return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total) {
    *free_bytes = *total = (size_t)64 << 30;
    return cudaSuccess;
}

inline cudaError_t cudaMalloc(void **p, size_t size) {
    int *n;
    emu_allocation *t = emu_allocations(&n);
    if (*n == 4096) return cudaErrorMemoryAllocation;
    uint8_t *b = (uint8_t *)calloc(size ? size : 1, 1);
    if (!b) return cudaErrorMemoryAllocation;
    t[(*n)++] = emu_allocation{ b, size };
    *p = b;
    return cudaSuccess;
}

inline cudaError_t cudaFree(void *p) {
    int *n;
    emu_allocation *t = emu_allocations(&n);
    for (int i = 0; i < *n; i++)
        if (t[i].base == p) {
            free(p);
            t[i] = t[--(*n)];
            return cudaSuccess;
        }
    return cudaErrorInvalidDevicePointer;
}

inline cudaError_t cudaMemcpy(void *to, const void *from, size_t bytes, cudaMemcpyKind kind) {
    const void *dev = kind == cudaMemcpyHostToDevice ? to : from;
    const void *host = kind == cudaMemcpyHostToDevice ? from : to;
    if (!emu_is_device(dev, bytes) || emu_is_device(host, 1))
        return cudaErrorInvalidDevicePointer;
    memcpy(to, from, bytes);
    return cudaSuccess;
}

inline cudaError_t cudaMemcpyAsync(void *to, const void *from, size_t bytes,
                                   cudaMemcpyKind kind, cudaStream_t) {
    return cudaMemcpy(to, from, bytes, kind);
}

template <class F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }

// ---- launch_kernel: what <<<grid, block, shared, stream>>> does ------------

template <class T> inline bool emu_device_arg(T *p) { return !p || emu_is_device(p, 1); }
template <class T> inline bool emu_device_arg(const T &) { return true; }

inline bool emu_all(std::initializer_list<bool> v) {
    for (bool b : v)
        if (!b) return false;
    return true;
}

template <class... Params, class... Args>
inline cudaError_t launch_kernel(void (*k)(Params...), dim3 grid, dim3 block, size_t shared,
                                 cudaStream_t, Args... args) {
    if (!emu_all({ emu_device_arg(args)... })) return cudaErrorInvalidDevicePointer;
    if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > 1024)
        return cudaErrorInvalidValue;
    emu_cuda_launch launch = { grid, block, nullptr };
    launch.dynamic_shared = shared ? (float *)calloc(shared, 1) : nullptr;
    emu_cuda_current() = &launch;
    metal::dispatch(uint3{ grid.x, grid.y, grid.z }, (int)block.x,
                    [&](const metal::thread_ids &) { k(args...); });
    emu_cuda_current() = nullptr;
    free(launch.dynamic_shared);
    return cudaSuccess;
}
