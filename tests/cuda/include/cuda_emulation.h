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
//   the runtime    cudaMalloc carves page-aligned ranges out of one mapping
//                  (the emulated device memory); cudaMemcpy is memcpy, and
//                  it checks that the side named "device" IS a cudaMalloc'd
//                  range (and the host side is not): host code that passes a
//                  host pointer where the device one belongs fails here
//                  instead of on the GPU. launch_kernel checks every pointer
//                  argument of a launch the same way. Between runtime calls
//                  the device mapping is PROT_NONE, so host code that reads
//                  or writes device memory directly -- which on a real GPU
//                  reads garbage or faults -- faults here too (SIGSEGV), at
//                  the offending line. cudaHostAlloc is plain host memory.
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
#include <sys/mman.h>
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
inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline void __syncthreads() { metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup); }
inline void __syncwarp(unsigned = 0xffffffffu) {
    metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup);
}
#define __align__(n) __attribute__((aligned(n)))

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
typedef void *cudaEvent_t;
enum cudaMemcpyKind {
    cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
#define cudaHostAllocDefault 0

// The emulated device memory: one reserved mapping, handed out by a bump
// pointer in whole pages (freed ranges are returned to the OS, not reused:
// the tests allocate far less than the reservation), and every live range.
struct emu_allocation {
    uint8_t *base;
    size_t size;
};

struct emu_device_memory {
    uint8_t *base;
    size_t reserved, used, top;   // guarded ranges grow up from base, big ones down
    emu_allocation table[8192];
    int n;
};

inline emu_device_memory &emu_memory() {
    static emu_device_memory m;
    if (!m.base) {
        m.reserved = (size_t)64 << 30;
        void *p = mmap(nullptr, m.reserved, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p == MAP_FAILED) {
            fprintf(stderr, "cuda emulation: cannot reserve the device memory\n");
            abort();
        }
        m.base = (uint8_t *)p;
    }
    return m;
}

// The host may touch device memory only inside a runtime call: open it
// for the call, close it after.
// Ranges of EMU_GUARDED_MAX bytes or more (the uploaded weights) are carved
// from the top of the reservation and never closed: the host never touches
// them, and toggling them would cost most of the tests' time.
#define EMU_GUARDED_MAX ((size_t)4 << 20)

inline void emu_device_access(bool open) {
    emu_device_memory &m = emu_memory();
    if (m.used) mprotect(m.base, m.used, open ? PROT_READ | PROT_WRITE : PROT_NONE);
}

// Is [p, p + bytes) inside one cudaMalloc'd range?
inline bool emu_is_device(const void *p, size_t bytes) {
    emu_device_memory &m = emu_memory();
    const uint8_t *b = (const uint8_t *)p;
    if (b < m.base || b >= m.base + m.reserved) return false;
    for (int i = 0; i < m.n; i++)
        if (b >= m.table[i].base && b + bytes <= m.table[i].base + m.table[i].size) return true;
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
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned) {
    *e = (void *)1;
    return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t, cudaEvent_t) {
    *ms = 0;      // the emulator keeps no GPU time
    return cudaSuccess;
}
#define cudaEventDisableTiming 2
inline cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total) {
    *free_bytes = *total = (size_t)64 << 30;
    return cudaSuccess;
}

inline cudaError_t cudaMalloc(void **p, size_t size) {
    emu_device_memory &m = emu_memory();
    size_t pages = ((size ? size : 1) + 4095) / 4096 * 4096;
    bool guarded = pages < EMU_GUARDED_MAX;
    if (m.n == 8192 || m.used + m.top + pages > m.reserved) return cudaErrorMemoryAllocation;
    uint8_t *b = guarded ? m.base + m.used : m.base + m.reserved - m.top - pages;
    if (guarded) m.used += pages;
    else m.top += pages;
    mprotect(b, pages, PROT_READ | PROT_WRITE);
    memset(b, 0, pages);
    if (guarded) mprotect(b, pages, PROT_NONE);
    m.table[m.n++] = emu_allocation{ b, size };
    *p = b;
    return cudaSuccess;
}

inline cudaError_t cudaFree(void *p) {
    emu_device_memory &m = emu_memory();
    for (int i = 0; i < m.n; i++)
        if (m.table[i].base == p) {
            size_t pages = (m.table[i].size + 4095) / 4096 * 4096;
            madvise(p, pages ? pages : 4096, MADV_DONTNEED);
            m.table[i] = m.table[--m.n];
            return cudaSuccess;
        }
    return cudaErrorInvalidDevicePointer;
}

inline cudaError_t cudaHostAlloc(void **p, size_t size, unsigned) {
    *p = calloc(size ? size : 1, 1);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}

inline cudaError_t cudaFreeHost(void *p) {
    free(p);
    return cudaSuccess;
}

inline cudaError_t cudaMemcpy(void *to, const void *from, size_t bytes, cudaMemcpyKind kind) {
    bool to_dev = kind != cudaMemcpyDeviceToHost, from_dev = kind != cudaMemcpyHostToDevice;
    if (!bytes) return cudaSuccess;
    if (emu_is_device(to, bytes) != to_dev || emu_is_device(from, bytes) != from_dev)
        return cudaErrorInvalidDevicePointer;
    if (!to_dev && emu_is_device(to, 1)) return cudaErrorInvalidDevicePointer;
    if (!from_dev && emu_is_device(from, 1)) return cudaErrorInvalidDevicePointer;
    emu_device_access(true);
    memmove(to, from, bytes);
    emu_device_access(false);
    return cudaSuccess;
}

inline cudaError_t cudaMemcpyAsync(void *to, const void *from, size_t bytes,
                                   cudaMemcpyKind kind, cudaStream_t) {
    return cudaMemcpy(to, from, bytes, kind);
}

inline cudaError_t cudaMemsetAsync(void *p, int value, size_t bytes, cudaStream_t) {
    if (!bytes) return cudaSuccess;
    if (!emu_is_device(p, bytes)) return cudaErrorInvalidDevicePointer;
    emu_device_access(true);
    memset(p, value, bytes);
    emu_device_access(false);
    return cudaSuccess;
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
    emu_device_access(true);
    metal::dispatch(uint3{ grid.x, grid.y, grid.z }, (int)block.x,
                    [&](const metal::thread_ids &) { k(args...); });
    emu_device_access(false);
    emu_cuda_current() = nullptr;
    free(launch.dynamic_shared);
    return cudaSuccess;
}
