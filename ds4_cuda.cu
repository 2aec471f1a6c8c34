// ds4_cuda.cu -- the forward pass of DeepSeek V4 Flash on NVIDIA GPUs: the
// CUDA twin of kernels.metal, kernel for kernel, and the host code that
// implements ds4.c 6.14's gpu_* dispatches with it.
//
// STATUS (said plainly, also in README.md): run on one NVIDIA H200 on
// 2026-12-02 (nvcc 13.0, sm_90): `make test-cuda` passes the kernel checks,
// the oracle vectors with and without MTP, greedy identity under drafting,
// snapshot interchange with the CPU backend and compute-sanitizer. It is
// correct, not yet fast: no CUDA graph, float32 FMA matmuls, no tensor-core
// prefill (README has the figures). Without a GPU, the whole file -- kernels
// AND host code -- runs in `make test` compiled as C++ by clang++ with
// DS4_CUDA_EMULATION against tests/cuda/include/ (a CUDA-on-CPU prelude:
// fibers for threads, a guarded host-memory runtime), kernel by kernel
// against the CPU twins (tests/test_metal.c) and as the whole tiny model
// against the CPU backend (tests/test_metal_model.c).
//
// The file has two parts:
//
//   1. The kernels. Every kernel is the twin of one CPU function of ds4.c,
//      carries its name and the comment header of its kernels.metal twin
//      (the formula), and the same decomposition:
//
//          Metal                          CUDA
//          threadgroup                    thread block
//          simdgroup of 32 lanes          warp of 32 lanes (threadIdx.x / 32)
//          threadgroup memory             __shared__ (static, or the dynamic
//                                         block of dynamic_shared_floats())
//          simd_sum / simd_max            warp_sum / warp_max: __shfl_xor_sync
//          threadgroup_barrier            __syncthreads
//
//   2. The host code: gpu_open, the weights uploaded once, backend memory
//      (gpu_alloc and the copies), the gpu_* API of ds4.c 6.14, one stream.
//
// Numerics: build without --use_fast_math (make cuda does), so sqrtf and
// division are IEEE-rounded. CUDA's expf/sinf/cosf/log1pf are within 1-2
// ulp, not libm's results: the kernels that match the CPU bit for bit under
// emulation (routing weights, swiglu) may differ in the last bits on a GPU.
// Subnormals: as kernels.metal says, GPUs may flush them (sm_90 keeps them
// unless -ftz=true; we do not pass it).
#ifdef DS4_CUDA_EMULATION
#include "cuda_emulation.h"        // tests/cuda/include/: the CUDA-on-CPU prelude
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#endif
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <float.h>

// ============================================================================
// Part 1. The kernels
// ============================================================================

// ---- Warp and block collectives ------------------------------------------

#define FULL_WARP 0xffffffffu

// The sum of v over the 32 lanes, in a butterfly: after step o, every lane
// holds the sum of its 2o-lane group; float addition commutes, so all 32
// lanes end with the same bits (what simd_sum gives on Metal).
__device__ float warp_sum(float v) {
    for (int o = 16; o >= 1; o /= 2) v += __shfl_xor_sync(FULL_WARP, v, o);
    return v;
}

__device__ float warp_max(float v) {
    for (int o = 16; o >= 1; o /= 2) v = fmaxf(v, __shfl_xor_sync(FULL_WARP, v, o));
    return v;
}

// The dynamic __shared__ block of a launch (its size is the launch's third
// <<<>>> argument); the emulation prelude provides its own.
#ifndef DS4_CUDA_EMULATION
__device__ float *dynamic_shared_floats() {
    extern __shared__ float ds4_dynamic_shared[];
    return ds4_dynamic_shared;
}
#endif

// ---- Quantized blocks (ds4.c chapter 3; byte layouts drawn there) ---------

struct block_q8_0 {
    __half d;
    int8_t qs[32];
};

struct block_q2_k {
    uint8_t scales[16];
    uint8_t qs[64];
    __half d;
    __half dmin;
};

struct block_q4_k {
    __half d;
    __half dmin;
    uint8_t scales[12];
    uint8_t qs[128];
};

struct block_iq2_xxs {
    __half d;
    uint16_t qs[32];
};

// The IQ2_XXS codebook, byte j of entry g = magnitude of value j. Source:
// `iq2xxs_grid` of GGML (MIT License), reproduced as data, as in ds4.c 3.4.
// In global memory, not __constant__: the 32 lanes of a warp look up 32
// different entries, which the constant cache would serve one at a time.
__device__ const uint64_t iq2_xxs_grid[256] = {
    0x0808080808080808ull, 0x080808080808082bull, 0x0808080808081919ull, 0x0808080808082b08ull,
    0x0808080808082b2bull, 0x0808080808190819ull, 0x0808080808191908ull, 0x08080808082b0808ull,
    0x08080808082b082bull, 0x08080808082b2b08ull, 0x08080808082b2b2bull, 0x0808080819080819ull,
    0x0808080819081908ull, 0x0808080819190808ull, 0x0808080819192b08ull, 0x08080808192b0819ull,
    0x08080808192b1908ull, 0x080808082b080808ull, 0x080808082b08082bull, 0x080808082b082b2bull,
    0x080808082b2b082bull, 0x0808081908080819ull, 0x0808081908081908ull, 0x0808081908190808ull,
    0x0808081908191919ull, 0x0808081919080808ull, 0x080808192b081908ull, 0x080808192b192b08ull,
    0x0808082b08080808ull, 0x0808082b0808082bull, 0x0808082b082b082bull, 0x0808082b2b08082bull,
    0x0808190808080819ull, 0x0808190808081908ull, 0x0808190808190808ull, 0x08081908082b0819ull,
    0x08081908082b1908ull, 0x0808190819080808ull, 0x080819081908082bull, 0x0808190819082b08ull,
    0x08081908192b0808ull, 0x080819082b080819ull, 0x080819082b081908ull, 0x080819082b190808ull,
    0x080819082b2b1908ull, 0x0808191908080808ull, 0x080819190808082bull, 0x0808191908082b08ull,
    0x08081919082b0808ull, 0x080819191908192bull, 0x08081919192b2b19ull, 0x080819192b080808ull,
    0x080819192b190819ull, 0x0808192b08082b19ull, 0x0808192b08190808ull, 0x0808192b19080808ull,
    0x0808192b2b081908ull, 0x0808192b2b2b1908ull, 0x08082b0808080808ull, 0x08082b0808081919ull,
    0x08082b0808082b08ull, 0x08082b0808191908ull, 0x08082b08082b2b08ull, 0x08082b0819080819ull,
    0x08082b0819081908ull, 0x08082b0819190808ull, 0x08082b081919082bull, 0x08082b082b082b08ull,
    0x08082b1908081908ull, 0x08082b1919080808ull, 0x08082b2b0808082bull, 0x08082b2b08191908ull,
    0x0819080808080819ull, 0x0819080808081908ull, 0x0819080808190808ull, 0x08190808082b0819ull,
    0x0819080819080808ull, 0x08190808192b0808ull, 0x081908082b081908ull, 0x081908082b190808ull,
    0x081908082b191919ull, 0x0819081908080808ull, 0x0819081908082b08ull, 0x08190819082b0808ull,
    0x0819081919190808ull, 0x0819081919192b2bull, 0x081908192b080808ull, 0x0819082b082b1908ull,
    0x0819082b19081919ull, 0x0819190808080808ull, 0x0819190808082b08ull, 0x08191908082b0808ull,
    0x08191908082b1919ull, 0x0819190819082b19ull, 0x081919082b080808ull, 0x0819191908192b08ull,
    0x08191919192b082bull, 0x0819192b08080808ull, 0x0819192b0819192bull, 0x08192b0808080819ull,
    0x08192b0808081908ull, 0x08192b0808190808ull, 0x08192b0819080808ull, 0x08192b082b080819ull,
    0x08192b1908080808ull, 0x08192b1908081919ull, 0x08192b192b2b0808ull, 0x08192b2b19190819ull,
    0x082b080808080808ull, 0x082b08080808082bull, 0x082b080808082b2bull, 0x082b080819081908ull,
    0x082b0808192b0819ull, 0x082b08082b080808ull, 0x082b08082b08082bull, 0x082b0819082b2b19ull,
    0x082b081919082b08ull, 0x082b082b08080808ull, 0x082b082b0808082bull, 0x082b190808080819ull,
    0x082b190808081908ull, 0x082b190808190808ull, 0x082b190819080808ull, 0x082b19081919192bull,
    0x082b191908080808ull, 0x082b191919080819ull, 0x082b1919192b1908ull, 0x082b192b2b190808ull,
    0x082b2b0808082b08ull, 0x082b2b08082b0808ull, 0x082b2b082b191908ull, 0x082b2b2b19081908ull,
    0x1908080808080819ull, 0x1908080808081908ull, 0x1908080808190808ull, 0x1908080808192b08ull,
    0x19080808082b0819ull, 0x19080808082b1908ull, 0x1908080819080808ull, 0x1908080819082b08ull,
    0x190808081919192bull, 0x19080808192b0808ull, 0x190808082b080819ull, 0x190808082b081908ull,
    0x190808082b190808ull, 0x1908081908080808ull, 0x19080819082b0808ull, 0x19080819192b0819ull,
    0x190808192b080808ull, 0x190808192b081919ull, 0x1908082b08080819ull, 0x1908082b08190808ull,
    0x1908082b19082b08ull, 0x1908082b1919192bull, 0x1908082b192b2b08ull, 0x1908190808080808ull,
    0x1908190808082b08ull, 0x19081908082b0808ull, 0x190819082b080808ull, 0x190819082b192b19ull,
    0x190819190819082bull, 0x19081919082b1908ull, 0x1908192b08080808ull, 0x19082b0808080819ull,
    0x19082b0808081908ull, 0x19082b0808190808ull, 0x19082b0819080808ull, 0x19082b0819081919ull,
    0x19082b1908080808ull, 0x19082b1919192b08ull, 0x19082b19192b0819ull, 0x19082b192b08082bull,
    0x19082b2b19081919ull, 0x19082b2b2b190808ull, 0x1919080808080808ull, 0x1919080808082b08ull,
    0x1919080808190819ull, 0x1919080808192b19ull, 0x19190808082b0808ull, 0x191908082b080808ull,
    0x191908082b082b08ull, 0x1919081908081908ull, 0x191908191908082bull, 0x191908192b2b1908ull,
    0x1919082b2b190819ull, 0x191919082b190808ull, 0x191919082b19082bull, 0x1919191908082b2bull,
    0x1919192b08080819ull, 0x1919192b19191908ull, 0x19192b0808080808ull, 0x19192b0808190819ull,
    0x19192b0808192b19ull, 0x19192b08192b1908ull, 0x19192b1919080808ull, 0x19192b2b08082b08ull,
    0x192b080808081908ull, 0x192b080808190808ull, 0x192b080819080808ull, 0x192b0808192b2b08ull,
    0x192b081908080808ull, 0x192b081919191919ull, 0x192b082b08192b08ull, 0x192b082b192b0808ull,
    0x192b190808080808ull, 0x192b190808081919ull, 0x192b191908190808ull, 0x192b19190819082bull,
    0x192b19192b081908ull, 0x192b2b081908082bull, 0x2b08080808080808ull, 0x2b0808080808082bull,
    0x2b08080808082b2bull, 0x2b08080819080819ull, 0x2b0808082b08082bull, 0x2b08081908081908ull,
    0x2b08081908192b08ull, 0x2b08081919080808ull, 0x2b08082b08190819ull, 0x2b08190808080819ull,
    0x2b08190808081908ull, 0x2b08190808190808ull, 0x2b08190808191919ull, 0x2b08190819080808ull,
    0x2b081908192b0808ull, 0x2b08191908080808ull, 0x2b0819191908192bull, 0x2b0819192b191908ull,
    0x2b08192b08082b19ull, 0x2b08192b19080808ull, 0x2b08192b192b0808ull, 0x2b082b080808082bull,
    0x2b082b1908081908ull, 0x2b082b2b08190819ull, 0x2b19080808081908ull, 0x2b19080808190808ull,
    0x2b190808082b1908ull, 0x2b19080819080808ull, 0x2b1908082b2b0819ull, 0x2b1908190819192bull,
    0x2b1908192b080808ull, 0x2b19082b19081919ull, 0x2b19190808080808ull, 0x2b191908082b082bull,
    0x2b19190819081908ull, 0x2b19191919190819ull, 0x2b192b082b080819ull, 0x2b192b19082b0808ull,
    0x2b2b08080808082bull, 0x2b2b080819190808ull, 0x2b2b08082b081919ull, 0x2b2b081908082b19ull,
    0x2b2b082b08080808ull, 0x2b2b190808192b08ull, 0x2b2b2b0819190808ull, 0x2b2b2b1908081908ull,
};

// Every weight row is decoded in chunks of 32 values: one Q8_0 block, a
// 32-value sub-block of a K-quant super-block, one IQ2_XXS group, or 32
// halves. A row of n values has n / 32 chunks; chunk c of a 256-value type
// is sub-chunk c % 8 of super-block c / 8.

// F32: v[i] = w[32c + i]  (norm-sized matrices some files keep in float)
__device__ void decode_chunk_f32(const uint8_t *row, unsigned c, float *v) {
    const float *w = (const float *)row + 32 * c;
    for (int i = 0; i < 32; i++) v[i] = w[i];
}

// BF16: v[i] = the float whose top 16 bits are w[32c + i]
__device__ void decode_chunk_bf16(const uint8_t *row, unsigned c, float *v) {
    const uint16_t *w = (const uint16_t *)row + 32 * c;
    for (int i = 0; i < 32; i++) v[i] = __uint_as_float((unsigned)w[i] << 16);
}

// F16: v[i] = w[32c + i]
__device__ void decode_chunk_f16(const uint8_t *row, unsigned c, float *v) {
    const __half *w = (const __half *)row + 32 * c;
    for (int i = 0; i < 32; i++) v[i] = __half2float(w[i]);
}

// Q8_0: v[i] = d * qs[i]       (quant_dequant_q8_0_ref)
__device__ void decode_chunk_q8_0(const uint8_t *row, unsigned c, float *v) {
    const block_q8_0 *b = (const block_q8_0 *)row + c;
    float d = __half2float(b->d);
    for (int i = 0; i < 32; i++) v[i] = d * (float)b->qs[i];
}

// Q2_K, values e = 32s .. 32s+31 of the super-block (quant_dequant_q2_k_ref):
//     h = s / 4, j = s % 4:  q = (qs[32h + l] >> 2j) & 3,   k = e / 16
//     v = d * (scales[k] & 15) * q - dmin * (scales[k] >> 4)
__device__ void decode_chunk_q2_k(const uint8_t *row, unsigned c, float *v) {
    const block_q2_k *b = (const block_q2_k *)row + c / 8;
    unsigned s = c % 8, h = s / 4, j = s % 4;
    float d = __half2float(b->d), dmin = __half2float(b->dmin);
    for (int l = 0; l < 32; l++) {
        unsigned k = 2 * s + l / 16;
        int q = (b->qs[32 * h + l] >> (2 * j)) & 3;
        v[l] = d * (float)(b->scales[k] & 15) * (float)q - dmin * (float)(b->scales[k] >> 4);
    }
}

// Q4_K's 6-bit scale and min of sub-block k (quant_q4_k_scale_min).
__device__ void q4_k_scale_min(const uint8_t *scales, unsigned k, int *sc, int *m) {
    if (k < 4) {
        *sc = scales[k] & 63;
        *m = scales[k + 4] & 63;
    } else {
        *sc = (scales[k + 4] & 15) | ((scales[k - 4] >> 6) << 4);
        *m = (scales[k + 4] >> 4) | ((scales[k] >> 6) << 4);
    }
}

// Q4_K, sub-block k = s (quant_dequant_q4_k_ref):
//     byte = qs[32 (k/2) + l];  q = k even ? byte & 15 : byte >> 4
//     v = d * sc[k] * q - dmin * m[k]
__device__ void decode_chunk_q4_k(const uint8_t *row, unsigned c, float *v) {
    const block_q4_k *b = (const block_q4_k *)row + c / 8;
    unsigned k = c % 8;
    int sc, m;
    q4_k_scale_min(b->scales, k, &sc, &m);
    float d = __half2float(b->d) * (float)sc, dm = __half2float(b->dmin) * (float)m;
    for (int l = 0; l < 32; l++) {
        int byte = b->qs[32 * (k / 2) + l];
        int q = k % 2 == 0 ? byte & 15 : byte >> 4;
        v[l] = d * (float)q - dm;
    }
}

// IQ2_XXS, group s (quant_dequant_iq2_xxs_ref):
//     a0 = grid indices g[t] (8 bits each), a1 = signs s[t] (7 bits) | ls << 28
//     db = d (0.5 + ls) / 4;  v[8t + j] = db * grid[g[t]][j] * sign_t(j)
//     sign_t = s[t] | parity(s[t]) << 7
__device__ void decode_chunk_iq2_xxs(const uint8_t *row, unsigned c, float *v) {
    const block_iq2_xxs *b = (const block_iq2_xxs *)row + c / 8;
    unsigned s = c % 8;
    unsigned a0 = (unsigned)b->qs[4 * s] | (unsigned)b->qs[4 * s + 1] << 16;
    unsigned a1 = (unsigned)b->qs[4 * s + 2] | (unsigned)b->qs[4 * s + 3] << 16;
    float db = __half2float(b->d) * (0.5f + (float)(a1 >> 28)) * 0.25f;
    for (int t = 0; t < 4; t++) {
        uint64_t grid = iq2_xxs_grid[(a0 >> (8 * t)) & 255];
        unsigned s7 = (a1 >> (7 * t)) & 127;
        unsigned signs = s7 | (__popc(s7) & 1) << 7;
        for (int j = 0; j < 8; j++) {
            float m = db * (float)((grid >> (8 * j)) & 255);
            v[8 * t + j] = (signs >> j) & 1 ? -m : m;
        }
    }
}

// ---- matmul: y = W x for a chunk of tokens (ds4.c 6.1 matmul / vec_dot) --

// y[t][r] = sum_i W[r][i] x[t][i]          W [out][in], x [n_tok][in]
//
// threads: MATMUL_WARPS warps of 32 per block; warp s of block g owns row
// r = g * MATMUL_WARPS + s. Lane l decodes chunks l, l + 32, ... of the row
// once per tile of MATMUL_TILE tokens and multiplies them with each token of
// the tile; warp_sum then adds the 32 lanes' partial sums. The row is read
// from memory once per tile: decode (n_tok <= 8, one tile) streams every
// weight byte exactly once.
// Summation order: per lane in chunk order, then a butterfly over lanes;
// it differs from vec_dot_ref's left-to-right sum only by float rounding.
#define MATMUL_WARPS 2
#define MATMUL_TILE 8

struct matmul_args {
    unsigned in, out, n_tok;
    unsigned row_bytes;          // bytes of one weight row
    unsigned x_stride, y_stride; // floats between tokens in x and in y
};

// Token j's row of x (or y): j itself, or rows[j] when the tokens are
// gathered (an expert's share of a chunk, 6.9).
__device__ unsigned token_row(const int *rows, unsigned j) {
    return rows ? (unsigned)rows[j] : j;
}

// Staging. A lane's chunk is 34 bytes (Q8_0) to 128 (F32) at an odd
// offset, which the decoders read byte by byte: straight from memory, a
// warp's loads would touch each cache line many times. So a warp first
// copies a segment of its row (MATMUL_SEG_CHUNKS chunks = 8 blocks of 256
// weights) into its own shared memory with 16-byte loads, coalesced across
// the warp, and the decoders read that copy. Lane l still decodes chunks
// l, l + 32, ... in that order: the sums are the same as without staging.
// Each decoder's seg_bytes = bytes_of(MATMUL_SEG_CHUNKS): 2176 for Q8_0, 528
// for IQ2_XXS, so a block of the quantized kernels holds a few KB and the
// multiprocessors keep many warps (their loads) in flight.
#define MATMUL_SEG_CHUNKS 64

struct __align__(16) bytes16 {
    uint32_t word[4];
};

// dst[0 .. bytes) = src[0 .. bytes), the 32 lanes of a warp together.
__device__ void warp_copy(uint8_t *dst, const uint8_t *src, unsigned bytes, unsigned lane) {
    if ((((uintptr_t)src | bytes) & 15) == 0) {
        const bytes16 *s = (const bytes16 *)src;
        bytes16 *d = (bytes16 *)dst;
        for (unsigned i = lane; i < bytes / 16; i += 32) d[i] = s[i];
    } else {
        for (unsigned i = lane; i < bytes; i += 32) dst[i] = src[i];
    }
}

// sum_i v[i] x[i] over one chunk, x read 16 bytes at a time when aligned.
__device__ float chunk_dot(const float *v, const float *x) {
    float s = 0.0f;
    if (((uintptr_t)x & 15) == 0) {
        for (int i = 0; i < 32; i += 4) {
            bytes16 q = *(const bytes16 *)(x + i);
            s += v[i] * __uint_as_float(q.word[0]);
            s += v[i + 1] * __uint_as_float(q.word[1]);
            s += v[i + 2] * __uint_as_float(q.word[2]);
            s += v[i + 3] * __uint_as_float(q.word[3]);
        }
    } else {
        for (int i = 0; i < 32; i++) s += v[i] * x[i];
    }
    return s;
}

// The decoder is a tag type, as in kernels.metal, so each kernel inlines its
// own; Decoder::bytes_of(n) is the size of n chunks from a block boundary.
template <class Decoder>
__device__ void matmul_rows(const uint8_t *w, const float *x, float *y, const matmul_args &a,
                            unsigned row, unsigned lane, const int *x_rows = nullptr,
                            const int *y_rows = nullptr) {
    __shared__ __align__(16) uint8_t staged[MATMUL_WARPS][Decoder::seg_bytes];
    if (row >= a.out) return;                       // the whole warp agrees
    uint8_t *seg = staged[(threadIdx.x / 32) % MATMUL_WARPS];
    const uint8_t *wr = w + (uint64_t)row * a.row_bytes;
    unsigned chunks = a.in / 32;
    for (unsigned t0 = 0; t0 < a.n_tok; t0 += MATMUL_TILE) {
        float acc[MATMUL_TILE];
        for (int j = 0; j < MATMUL_TILE; j++) acc[j] = 0.0f;
        unsigned tile = a.n_tok - t0 < MATMUL_TILE ? a.n_tok - t0 : MATMUL_TILE;
        for (unsigned c0 = 0; c0 < chunks; c0 += MATMUL_SEG_CHUNKS) {
            unsigned n = chunks - c0 < MATMUL_SEG_CHUNKS ? chunks - c0 : MATMUL_SEG_CHUNKS;
            __syncwarp();                              // the last segment is decoded
            warp_copy(seg, wr + Decoder::bytes_of(c0), Decoder::bytes_of(n), lane);
            __syncwarp();
            for (unsigned c = lane; c < n; c += 32) {
                float v[32];
                Decoder::decode(seg, c, v);
                for (unsigned j = 0; j < tile; j++)
                    acc[j] += chunk_dot(v, x + (uint64_t)token_row(x_rows, t0 + j) * a.x_stride +
                                               32 * (c0 + c));
            }
        }
        for (unsigned j = 0; j < tile; j++) {          // tile: the same in every lane
            float s = warp_sum(acc[j]);
            if (lane == 0) y[(uint64_t)token_row(y_rows, t0 + j) * a.y_stride + row] = s;
        }
    }
}

struct decoder_f32 {
    __device__ static void decode(const uint8_t *r, unsigned c, float *v) {
        decode_chunk_f32(r, c, v);
    }
    static const unsigned seg_bytes = 64 * 128;
    __device__ static unsigned bytes_of(unsigned c) { return c * 128; }
};
struct decoder_bf16 {
    __device__ static void decode(const uint8_t *r, unsigned c, float *v) {
        decode_chunk_bf16(r, c, v);
    }
    static const unsigned seg_bytes = 64 * 64;
    __device__ static unsigned bytes_of(unsigned c) { return c * 64; }
};
struct decoder_f16 {
    __device__ static void decode(const uint8_t *r, unsigned c, float *v) {
        decode_chunk_f16(r, c, v);
    }
    static const unsigned seg_bytes = 64 * 64;
    __device__ static unsigned bytes_of(unsigned c) { return c * 64; }
};
struct decoder_q8_0 {
    __device__ static void decode(const uint8_t *r, unsigned c, float *v) {
        decode_chunk_q8_0(r, c, v);
    }
    static const unsigned seg_bytes = 64 * 34;
    __device__ static unsigned bytes_of(unsigned c) { return c * 34; }
};
struct decoder_q2_k {
    __device__ static void decode(const uint8_t *r, unsigned c, float *v) {
        decode_chunk_q2_k(r, c, v);
    }
    static const unsigned seg_bytes = 8 * 84;
    __device__ static unsigned bytes_of(unsigned c) { return c / 8 * 84; }
};
struct decoder_q4_k {
    __device__ static void decode(const uint8_t *r, unsigned c, float *v) {
        decode_chunk_q4_k(r, c, v);
    }
    static const unsigned seg_bytes = 8 * 144;
    __device__ static unsigned bytes_of(unsigned c) { return c / 8 * 144; }
};
struct decoder_iq2_xxs {
    __device__ static void decode(const uint8_t *r, unsigned c, float *v) {
        decode_chunk_iq2_xxs(r, c, v);
    }
    static const unsigned seg_bytes = 8 * 66;
    __device__ static unsigned bytes_of(unsigned c) { return c / 8 * 66; }
};

// One kernel per weight type, each named as its kernels.metal twin.
__global__ void matmul_f32(const uint8_t *w, const float *x, float *y, matmul_args a) {
    matmul_rows<decoder_f32>(w, x, y, a, blockIdx.x * MATMUL_WARPS + threadIdx.x / 32,
                             threadIdx.x % 32);
}

__global__ void matmul_bf16(const uint8_t *w, const float *x, float *y, matmul_args a) {
    matmul_rows<decoder_bf16>(w, x, y, a, blockIdx.x * MATMUL_WARPS + threadIdx.x / 32,
                              threadIdx.x % 32);
}

__global__ void matmul_f16(const uint8_t *w, const float *x, float *y, matmul_args a) {
    matmul_rows<decoder_f16>(w, x, y, a, blockIdx.x * MATMUL_WARPS + threadIdx.x / 32,
                             threadIdx.x % 32);
}

__global__ void matmul_q8_0(const uint8_t *w, const float *x, float *y, matmul_args a) {
    matmul_rows<decoder_q8_0>(w, x, y, a, blockIdx.x * MATMUL_WARPS + threadIdx.x / 32,
                              threadIdx.x % 32);
}

__global__ void matmul_q2_k(const uint8_t *w, const float *x, float *y, matmul_args a) {
    matmul_rows<decoder_q2_k>(w, x, y, a, blockIdx.x * MATMUL_WARPS + threadIdx.x / 32,
                              threadIdx.x % 32);
}

__global__ void matmul_q4_k(const uint8_t *w, const float *x, float *y, matmul_args a) {
    matmul_rows<decoder_q4_k>(w, x, y, a, blockIdx.x * MATMUL_WARPS + threadIdx.x / 32,
                              threadIdx.x % 32);
}

__global__ void matmul_iq2_xxs(const uint8_t *w, const float *x, float *y, matmul_args a) {
    matmul_rows<decoder_iq2_xxs>(w, x, y, a, blockIdx.x * MATMUL_WARPS + threadIdx.x / 32,
                                 threadIdx.x % 32);
}

// ---- matmul_rows: an expert's tokens, gathered (ds4.c 6.9 run_expert) ----

// y[y_rows[j]][r] = sum_i W[r][i] x[x_rows[j]][i]      j < n_tok
//
// matmul with the tokens gathered through index arrays (either may be NULL:
// token j is row j): an expert reads its tokens' rows of the chunk and
// writes its outputs to their slots, without a copy. Same threads as matmul.
struct matmul_rows_args {
    unsigned in, out, n_tok, row_bytes;
};

template <class Decoder>
__global__ void matmul_rows_kernel(const uint8_t *w, const float *x, const int *x_rows, float *y,
                                   const int *y_rows, matmul_rows_args r) {
    matmul_args a = { r.in, r.out, r.n_tok, r.row_bytes, r.in, r.out };
    matmul_rows<Decoder>(w, x, y, a, blockIdx.x * MATMUL_WARPS + threadIdx.x / 32,
                         threadIdx.x % 32, x_rows, y_rows);
}

// ---- matmul_experts: the routed experts slot by slot (ds4.c 6.9) ----------

// y[i][r] = sum_c W_e[r][c] x[i / x_div][c],   e = sel[i]        i < n_slots
// W_e = w + e * expert_bytes (the stacked experts [E][out][in])
//
// threads: as matmul, one warp per row; grid.y = the slot. The expert id is
// read on the GPU, so a decode token's routed experts need no host step:
// gate and up take x = the chunk's rows (x_div = K: slot t K + k is token
// t's k-th expert), down takes x = the slots' own hidden rows (x_div = 1).
struct matmul_experts_args {
    unsigned in, out, row_bytes, x_div;
    uint64_t expert_bytes;
};

template <class Decoder>
__global__ void matmul_experts_kernel(const uint8_t *w, const int *sel, const float *x, float *y,
                                      matmul_experts_args e) {
    unsigned slot = blockIdx.y;
    matmul_args a = { e.in, e.out, 1, e.row_bytes, e.in, e.out };
    matmul_rows<Decoder>(w + (uint64_t)sel[slot] * e.expert_bytes,
                         x + (uint64_t)(slot / e.x_div) * e.in, y + (uint64_t)slot * e.out, a,
                         blockIdx.x * MATMUL_WARPS + threadIdx.x / 32, threadIdx.x % 32);
}

// ---- rmsnorm (ds4.c chapter 5) --------------------------------------------

// y[i] = x[i] * w[i] / sqrt(mean_j x[j]^2 + eps)        x, y [n_rows][n]
//
// threads: RMSNORM_THREADS per block, one block per row. Each thread sums
// the squares of a strided slice; warp_sum, then every thread adds the
// per-warp partials left in shared[32]. The CPU sums in double; float here
// differs by ~1e-7 relative.
#define RMSNORM_THREADS 256

struct rmsnorm_args {
    unsigned n;
    unsigned has_weight;
    float eps;
};

__device__ float block_sum(float v, float *shared, unsigned tid, unsigned n_threads) {
    float s = warp_sum(v);
    if (tid % 32 == 0) shared[tid / 32] = s;
    __syncthreads();
    float total = 0.0f;
    for (unsigned i = 0; i < n_threads / 32; i++) total += shared[i];
    __syncthreads();
    return total;
}

__global__ void rmsnorm(const float *x, const float *w, float *y, rmsnorm_args a) {
    __shared__ float shared[32];
    unsigned tid = threadIdx.x;
    const float *xr = x + (uint64_t)blockIdx.x * a.n;
    float *yr = y + (uint64_t)blockIdx.x * a.n;
    float ss = 0.0f;
    for (unsigned i = tid; i < a.n; i += RMSNORM_THREADS) ss += xr[i] * xr[i];
    ss = block_sum(ss, shared, tid, RMSNORM_THREADS);
    float scale = 1.0f / sqrtf(ss / (float)a.n + a.eps);
    for (unsigned i = tid; i < a.n; i += RMSNORM_THREADS)
        yr[i] = xr[i] * scale * (a.has_weight ? w[i] : 1.0f);
}

// ---- rope_tail (ds4.c chapter 5) ------------------------------------------

// Pair i of the last R dims of each head turns by the angle p * w_i:
//     y0 = x0 cos - x1 sin,  y1 = x0 sin + x1 cos      (inverse: sin -> -sin)
// x [n_tok][n_heads][len], position of token t = pos0 + t; freq [R/2].
//
// threads: one per pair; grid (R/2 * n_heads, n_tok) threads in blocks of
// ROPE_THREADS along x.
#define ROPE_THREADS 64

struct rope_args {
    unsigned len, dims, n_heads;
    int inverse;
    int64_t pos0;
};

__global__ void rope_tail(float *x, const float *freq, rope_args a) {
    unsigned item = blockIdx.x * ROPE_THREADS + threadIdx.x, half_dims = a.dims / 2;
    if (item >= half_dims * a.n_heads) return;
    unsigned h = item / half_dims, i = item % half_dims, t = blockIdx.y;
    float *tail = x + ((uint64_t)t * a.n_heads + h) * a.len + a.len - a.dims;
    float angle = (float)(a.pos0 + (int64_t)t) * freq[i];
    float c = cosf(angle), s = sinf(angle);
    if (a.inverse) s = -s;
    float x0 = tail[2 * i], x1 = tail[2 * i + 1];
    tail[2 * i] = x0 * c - x1 * s;
    tail[2 * i + 1] = x0 * s + x1 * c;
}

// ---- FP8 / FP4 round trips (ds4.c chapter 5) ------------------------------

// 2^ceil(log2 y), exact (pow2_ceil).
__device__ float pow2_ceil(float y) {
    int e;
    float m = frexpf(y, &e);
    return ldexpf(1.0f, m == 0.5f ? e - 1 : e);
}

// Nearest e4m3 value, ties to even (round_e4m3).
__device__ float round_e4m3(float x) {
    float ax = fabsf(x);
    if (ax == 0.0f) return x;
    float step;
    if (ax < 0.015625f) {             // 2^-6
        step = 0.001953125f;          // 2^-9
    } else {
        int e;
        frexpf(ax, &e);
        step = ldexpf(1.0f, e - 4);
    }
    float r = fminf(rintf(ax / step) * step, 448.0f);
    return copysignf(r, x);
}

// Nearest e2m1 value, ties to the even code (round_e2m1).
__device__ float round_e2m1(float x) {
    const float grid[8] = { 0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f };
    float ax = fabsf(x);
    int best = 0;
    for (int code = 1; code < 8; code++) {
        float d_new = fabsf(ax - grid[code]), d_best = fabsf(ax - grid[best]);
        if (d_new < d_best || (d_new == d_best && code % 2 == 0)) best = code;
    }
    return copysignf(grid[best], x);
}

// fp8_round_trip_nope: the first len - R dims of each row, in blocks of 64:
//     sc = 2^ceil(log2(max(max|v|, 1e-4) / 448));  v = e4m3(clamp(v/sc)) * sc
// threads: one warp (32) per 64-block, 2 values per lane; grid
// (blocks per row, n_rows).
struct fp8_args {
    unsigned len, rope_dims;
};

__global__ void fp8_round_trip_nope(float *rows, fp8_args a) {
    unsigned lane = threadIdx.x;
    float *v = rows + (uint64_t)blockIdx.y * a.len + 64 * blockIdx.x;
    if (64 * blockIdx.x + 64 > a.len - a.rope_dims) return;
    float v0 = v[lane], v1 = v[lane + 32];
    float amax = warp_max(fmaxf(fmaxf(fabsf(v0), fabsf(v1)), 1e-4f));
    float sc = pow2_ceil(amax * (1.0f / 448.0f));
    v[lane] = round_e4m3(fminf(fmaxf(v0 / sc, -448.0f), 448.0f)) * sc;
    v[lane + 32] = round_e4m3(fminf(fmaxf(v1 / sc, -448.0f), 448.0f)) * sc;
}

// indexer_round_trip: Hadamard over n (a power of two), then FP4 in 32-blocks:
//     for st = 1, 2, 4, ...: (a, c) -> (a + c, a - c);  v *= 1/sqrt(n)
//     sc = 2^ceil(log2(max(max|v|, 6 * 2^-126) / 6));  v = e2m1(clamp(v/sc)) * sc
// threads: n per block (one value each, n <= 1024), one block per row; the
// butterflies run in dynamic shared memory [n]; each warp then owns one FP4
// block of 32.
struct indexer_rt_args {
    unsigned n;
};

__global__ void indexer_round_trip(float *rows, indexer_rt_args a) {
    float *shared = dynamic_shared_floats();
    unsigned tid = threadIdx.x;
    float *v = rows + (uint64_t)blockIdx.x * a.n;
    shared[tid] = v[tid];
    __syncthreads();
    for (unsigned st = 1; st < a.n; st *= 2) {
        float mine = shared[tid], other = shared[tid ^ st];
        __syncthreads();
        shared[tid] = (tid & st) ? other - mine : mine + other;
        __syncthreads();
    }
    float h = shared[tid] * (1.0f / sqrtf((float)a.n));
    float amax = warp_max(fmaxf(fabsf(h), 6.0f * FLT_MIN));      // FLT_MIN = 2^-126
    float sc = pow2_ceil(amax * (1.0f / 6.0f));
    v[tid] = round_e2m1(fminf(fmaxf(h / sc, -6.0f), 6.0f)) * sc;
}

// ---- Hyper-connections (ds4.c 6.3) ----------------------------------------

// sinkhorn: row softmax + eps, then `iters` column and iters-1 row
// normalisations, ending on a column step. c is n x n, C[j][k] = c[j n + k].
__device__ void sinkhorn(float *c, int n, int iters, float eps) {
    for (int j = 0; j < n; j++) {
        float mx = -INFINITY, sum = 0.0f;
        for (int k = 0; k < n; k++) mx = fmaxf(mx, c[j * n + k]);
        for (int k = 0; k < n; k++) sum += (c[j * n + k] = expf(c[j * n + k] - mx));
        for (int k = 0; k < n; k++) c[j * n + k] = c[j * n + k] / sum + eps;
    }
    for (int it = 0; it < iters; it++) {
        if (it > 0) {
            for (int j = 0; j < n; j++) {
                float sum = 0.0f;
                for (int k = 0; k < n; k++) sum += c[j * n + k];
                for (int k = 0; k < n; k++) c[j * n + k] /= sum + eps;
            }
        }
        for (int k = 0; k < n; k++) {
            float sum = 0.0f;
            for (int j = 0; j < n; j++) sum += c[j * n + k];
            for (int j = 0; j < n; j++) c[j * n + k] /= sum + eps;
        }
    }
}

struct hc_args {
    unsigned hc, dim, sinkhorn_iters;
    float norm_eps, hc_eps;
};

// hc_pre, for token t (X [T][n][D], raw_mix [T][(2+n) n]):
//     rr = 1 / sqrt(mean(x^2) + eps)
//     pre[h]  = sigmoid(m[h] rr s0 + base[h]) + eps_hc
//     post[h] = 2 sigmoid(m[n+h] rr s1 + base[n+h])
//     C = sinkhorn(m[2n..] rr s2 + base[2n..]);   y[d] = sum_h pre[h] X[h][d]
// mix out [T][2n + n n] = pre, post, C (the CPU's struct hc_mix, packed).
// threads: HC_THREADS per block, one block per token; shared[32 + 2n + n n]
// (n <= HC_MAX): reduction partials, then the mix.
#define HC_THREADS 256
#define HC_MAX 16

__device__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

__device__ float hc_inverse_rms(const float *x, unsigned n, float eps, float *shared,
                                unsigned tid) {
    float ss = 0.0f;
    for (unsigned i = tid; i < n; i += HC_THREADS) ss += x[i] * x[i];
    ss = block_sum(ss, shared, tid, HC_THREADS);
    return 1.0f / sqrtf(ss / (float)n + eps);
}

__global__ void hc_pre(const float *X, const float *raw_mix, const float *scale,
                       const float *base, float *mix_out, float *y, hc_args a) {
    __shared__ float shared[32 + 2 * HC_MAX + HC_MAX * HC_MAX];
    unsigned tid = threadIdx.x, n = a.hc, D = a.dim, M = (2 + n) * n;
    const float *Xt = X + (uint64_t)blockIdx.x * n * D;
    const float *m = raw_mix + (uint64_t)blockIdx.x * M;
    float rr = hc_inverse_rms(Xt, n * D, a.norm_eps, shared, tid);
    float *mix = shared + 32;
    for (unsigned h = tid; h < n; h += HC_THREADS) {
        mix[h] = sigmoid(m[h] * rr * scale[0] + base[h]) + a.hc_eps;
        mix[n + h] = 2.0f * sigmoid(m[n + h] * rr * scale[1] + base[n + h]);
    }
    for (unsigned i = tid; i < n * n; i += HC_THREADS)
        mix[2 * n + i] = m[2 * n + i] * rr * scale[2] + base[2 * n + i];
    __syncthreads();
    if (tid == 0) sinkhorn(mix + 2 * n, (int)n, (int)a.sinkhorn_iters, a.hc_eps);
    __syncthreads();
    for (unsigned i = tid; i < M; i += HC_THREADS) mix_out[(uint64_t)blockIdx.x * M + i] = mix[i];
    for (unsigned d = tid; d < D; d += HC_THREADS) {
        float acc = 0.0f;
        for (unsigned h = 0; h < n; h++) acc += mix[h] * Xt[(uint64_t)h * D + d];
        y[(uint64_t)blockIdx.x * D + d] = acc;
    }
}

// hc_post, in place on X (f [T][D], mix as hc_pre wrote it):
//     Xout[k][d] = post[k] f[d] + sum_j C[j][k] Xin[j][d]
// threads: one per (t, d): it reads its column of all n streams before it
// writes any, so in place is safe. Grid (ceil(D / HC_THREADS), T).
__global__ void hc_post(float *X, const float *f, const float *mix, hc_args a) {
    unsigned n = a.hc, D = a.dim, d = blockIdx.x * HC_THREADS + threadIdx.x, t = blockIdx.y;
    if (d >= D) return;
    float *Xt = X + (uint64_t)t * n * D;
    const float *mx = mix + (uint64_t)t * (2 + n) * n;
    float col[HC_MAX];
    for (unsigned j = 0; j < n; j++) col[j] = Xt[(uint64_t)j * D + d];
    for (unsigned k = 0; k < n; k++) {
        float acc = mx[n + k] * f[(uint64_t)t * D + d];
        for (unsigned j = 0; j < n; j++) acc += mx[2 * n + j * n + k] * col[j];
        Xt[(uint64_t)k * D + d] = acc;
    }
}

// hc_head_collapse (raw_mix [T][n]):
//     w[h] = sigmoid(rr m[h] s0 + base[h]) + eps_hc;   y = sum_h w[h] X[h]
// threads: HC_THREADS, one block per token; shared[32 + n].
__global__ void hc_head_collapse(const float *X, const float *raw_mix, const float *scale,
                                 const float *base, float *y, hc_args a) {
    __shared__ float shared[32 + HC_MAX];
    unsigned tid = threadIdx.x, n = a.hc, D = a.dim;
    const float *Xt = X + (uint64_t)blockIdx.x * n * D;
    float rr = hc_inverse_rms(Xt, n * D, a.norm_eps, shared, tid);
    float *w = shared + 32;
    for (unsigned h = tid; h < n; h += HC_THREADS)
        w[h] = sigmoid(raw_mix[(uint64_t)blockIdx.x * n + h] * rr * scale[0] + base[h]) +
               a.hc_eps;
    __syncthreads();
    for (unsigned d = tid; d < D; d += HC_THREADS) {
        float acc = 0.0f;
        for (unsigned h = 0; h < n; h++) acc += w[h] * Xt[(uint64_t)h * D + d];
        y[(uint64_t)blockIdx.x * D + d] = acc;
    }
}

// ---- embed_tokens (ds4.c 6.12) --------------------------------------------

// out[t][i] = float(E[tokens[t]][i])         E [vocab][D] half
// threads: EMBED_THREADS per block, grid (ceil(D / EMBED_THREADS), T).
#define EMBED_THREADS 256

struct embed_args {
    unsigned dim;
};

__global__ void embed_tokens(const __half *E, const int *tokens, float *out, embed_args a) {
    unsigned i = blockIdx.x * EMBED_THREADS + threadIdx.x;
    if (i >= a.dim) return;
    out[(uint64_t)blockIdx.y * a.dim + i] =
        __half2float(E[(uint64_t)tokens[blockIdx.y] * a.dim + i]);
}

// ---- Mixture of experts (ds4.c 6.9) ---------------------------------------

__device__ float softplus(float z) {
    if (z > 20.0f) return z;
    if (z < -20.0f) return expf(z);
    return log1pf(expf(z));
}

// topk_indices: the k highest scores, ties to the LOWER index, in that order.
__device__ int topk_indices(const float *score, int n, int k, int *out) {
    int found = 0;
    for (int i = 0; i < n; i++) {
        if (found == k && !(score[i] > score[out[k - 1]])) continue;
        int at = found < k ? found++ : k - 1;
        while (at > 0 && score[i] > score[out[at - 1]]) {
            out[at] = out[at - 1];
            at--;
        }
        out[at] = i;
    }
    return found;
}

// route_token, for token t (logits [T][E]):
//     s_e = sqrt(softplus(logit_e))
//     chosen = hash layer: tid2eid[token] ; else top-K of s_e + bias_e
//     w_k = route_scale * s_{chosen_k} / sum_k s_{chosen_k}
// The biased scores go to `biased` [T][E] (device scratch), which top-k reads.
// threads: one per token (K <= 16, E <= 1024: a serial scan is cheaper than
// a parallel sort at these sizes); blocks of ROUTE_THREADS.
#define ROUTE_THREADS 32

struct route_args {
    unsigned n_tok, n_experts, n_used;
    unsigned hash_routed, has_bias;
    float route_scale;
};

__global__ void route_token(const float *logits, const int *tokens, const int *tid2eid,
                            const float *bias, float *biased, int *sel, float *wt,
                            route_args a) {
    unsigned t = blockIdx.x * ROUTE_THREADS + threadIdx.x, E = a.n_experts, K = a.n_used;
    if (t >= a.n_tok) return;
    const float *lg = logits + (uint64_t)t * E;
    float *sc = biased + (uint64_t)t * E;
    int chosen[16];
    if (a.hash_routed) {
        for (unsigned k = 0; k < K; k++) chosen[k] = tid2eid[(uint64_t)tokens[t] * K + k];
    } else {
        for (unsigned e = 0; e < E; e++)
            sc[e] = sqrtf(softplus(lg[e])) + (a.has_bias ? bias[e] : 0.0f);
        topk_indices(sc, (int)E, (int)K, chosen);
    }
    float sum = 0.0f;
    for (unsigned k = 0; k < K; k++) sum += sqrtf(softplus(lg[chosen[k]]));
    for (unsigned k = 0; k < K; k++) {
        sel[(uint64_t)t * K + k] = chosen[k];
        wt[(uint64_t)t * K + k] = sqrtf(softplus(lg[chosen[k]])) / sum * a.route_scale;
    }
}

// run_expert's activation, element-wise over [n][F]:
//     g = min(g, lim);  u = clamp(u, -lim, lim)     (lim = 0: no clamp)
//     h = silu(g) * u * weight[i]                   (weight NULL: 1)
// threads: SWIGLU_THREADS per block, grid (ceil(F / SWIGLU_THREADS), n).
#define SWIGLU_THREADS 256

struct swiglu_args {
    unsigned ffn;
    unsigned has_weight;
    float limit;
};

__global__ void swiglu(float *g, const float *u, const float *weight, swiglu_args a) {
    unsigned f = blockIdx.x * SWIGLU_THREADS + threadIdx.x, i = blockIdx.y;
    if (f >= a.ffn) return;
    uint64_t at = (uint64_t)i * a.ffn + f;
    float gv = g[at], uv = u[at];
    if (a.limit > 0.0f) {
        gv = fminf(gv, a.limit);
        uv = fminf(fmaxf(uv, -a.limit), a.limit);
    }
    g[at] = gv / (1.0f + expf(-gv)) * uv * (a.has_weight ? weight[i] : 1.0f);
}

// moe_chunk's gather-add: G[t][x] += sum over the slots of token t of Y[slot][x]
// (Y [slots][D], slot_of [T][K] = row of Y for (t, k), -1 = none).
// threads: ADD_THREADS, grid (ceil(D / ADD_THREADS), T); one thread owns one
// (t, x), so no atomics are needed and the order of the K terms is fixed.
#define ADD_THREADS 256

struct moe_add_args {
    unsigned dim, n_used;
};

__global__ void moe_gather_add(float *G, const float *Y, const int *slot_of, moe_add_args a) {
    unsigned x = blockIdx.x * ADD_THREADS + threadIdx.x, t = blockIdx.y;
    if (x >= a.dim) return;
    float acc = G[(uint64_t)t * a.dim + x];
    for (unsigned k = 0; k < a.n_used; k++) {
        int s = slot_of[(uint64_t)t * a.n_used + k];
        if (s >= 0) acc += Y[(uint64_t)s * a.dim + x];
    }
    G[(uint64_t)t * a.dim + x] = acc;
}

// y[i] += x[i] (the MTP input's h_proj + e; residual adds).
struct add_args {
    unsigned n, x_period;   // x is broadcast: x[i % x_period]
};

__global__ void add_rows(float *y, const float *x, add_args a) {
    unsigned i = blockIdx.x * ADD_THREADS + threadIdx.x;
    if (i < a.n) y[i] += x[i % a.x_period];
}

// ---- Compressor pooling (ds4.c 6.4, pool_channel) -------------------------

// pooled[j] = sum_i softmax_i(z_i[j]) kv_i[j] over the n = coff r candidates;
// -inf scores (empty slots) contribute nothing; all empty -> 0. With overlap
// (coff 2) candidates i >= r read column dc + j.
// threads: POOL_THREADS, one per channel j; grid ceil(dc / POOL_THREADS).
#define POOL_THREADS 64

struct pool_args {
    unsigned ratio, coff, dc;
};

__global__ void pool_channel(const float *kv, const float *score, float *pooled, pool_args a) {
    unsigned j = blockIdx.x * POOL_THREADS + threadIdx.x;
    if (j >= a.dc) return;
    unsigned r = a.ratio, width = a.coff * a.dc, n = a.coff * r;
    float mx = -INFINITY;
    for (unsigned i = 0; i < n; i++) {
        unsigned col = (a.coff == 2 && i >= r) ? a.dc + j : j;
        mx = fmaxf(mx, score[i * width + col]);
    }
    if (mx == -INFINITY) {
        pooled[j] = 0.0f;
        return;
    }
    float num = 0.0f, den = 0.0f;
    for (unsigned i = 0; i < n; i++) {
        unsigned col = (a.coff == 2 && i >= r) ? a.dc + j : j;
        float z = score[i * width + col];
        if (z == -INFINITY) continue;
        float p = expf(z - mx);
        den += p;
        num += p * kv[i * width + col];
    }
    pooled[j] = num / den;
}

// ---- Sparse attention with sinks (ds4.c 6.8, attend_one) ------------------

// For token t at position p = p0 + t, head h, over its rows k_i: the raw
// window rows first..p (first = max(0, p - W + 1)), then its compressed rows
// (all `visible[t]` of them when n_sel[t] < 0, else the indexer's sel[t][..]):
//     l_i = (q . k_i) / sqrt(Dh);   mx = max(sink, max_i l_i)
//     o = sum_i e^(l_i - mx) k_i / (e^(sink - mx) + sum_i e^(l_i - mx))
// (K = V.) A raw row at pos >= p0 is in this chunk's kv, older ones in the
// ring at slot pos mod W, exactly as raw_row() reads them. The inverse RoPE
// on o follows as a separate rope_tail dispatch.
// threads: one warp (32) per (t, h); grid (H, T). Phase 1: lane l scores
// rows l, l + 32, ... into dynamic shared memory logit[] (window + top-k
// floats); phase 2: lane l owns dims l, l + 32, ... of o and walks all rows.
#define ATTEND_THREADS 32

struct attend_args {
    unsigned n_heads, head_dim, window, topk;
    int64_t p0;
    unsigned compressed;      // the layer has compressed rows (ratio > 0)
};

__device__ const float *attend_row(const float *chunk_kv, const float *ring, const float *comp,
                                   const int *sel, int n_sel, const attend_args &a,
                                   int64_t first, unsigned n_raw, unsigned i) {
    if (i < n_raw) {
        int64_t pos = first + (int64_t)i;
        if (pos >= a.p0) return chunk_kv + (uint64_t)(pos - a.p0) * a.head_dim;
        return ring + (uint64_t)(pos % (int64_t)a.window) * a.head_dim;
    }
    unsigned r = n_sel < 0 ? i - n_raw : (unsigned)sel[i - n_raw];
    return comp + (uint64_t)r * a.head_dim;
}

__global__ void attend_one(const float *q, const float *chunk_kv, const float *ring,
                           const float *comp, const int64_t *visible, const int *sel,
                           const int *n_sel, const float *sinks, float *o, attend_args a) {
    float *logit = dynamic_shared_floats();
    unsigned h = blockIdx.x, t = blockIdx.y, Dh = a.head_dim, lane = threadIdx.x;
    int64_t p = a.p0 + (int64_t)t;
    int64_t first = p - (int64_t)a.window + 1 < 0 ? 0 : p - (int64_t)a.window + 1;
    unsigned n_raw = (unsigned)(p - first + 1);
    int ns = n_sel[t];
    unsigned n_comp = !a.compressed ? 0 : ns < 0 ? (unsigned)visible[t] : (unsigned)ns;
    const int *sel_t = sel + (uint64_t)t * a.topk;
    const float *qh = q + ((uint64_t)t * a.n_heads + h) * Dh;
    float scale = 1.0f / sqrtf((float)Dh), sink = sinks[h], mx = sink;
    for (unsigned i = lane; i < n_raw + n_comp; i += 32) {
        const float *k = attend_row(chunk_kv, ring, comp, sel_t, ns, a, first, n_raw, i);
        float s = 0.0f;
        for (unsigned d = 0; d < Dh; d++) s += qh[d] * k[d];
        logit[i] = s * scale;
        mx = fmaxf(mx, logit[i]);
    }
    mx = warp_max(mx);
    float den = 0.0f;
    for (unsigned i = lane; i < n_raw + n_comp; i += 32) den += (logit[i] = expf(logit[i] - mx));
    den = warp_sum(den) + expf(sink - mx);
    __syncthreads();
    float *oh = o + ((uint64_t)t * a.n_heads + h) * Dh;
    for (unsigned d = lane; d < Dh; d += 32) {
        float acc = 0.0f;
        for (unsigned i = 0; i < n_raw + n_comp; i++)
            acc += logit[i] * attend_row(chunk_kv, ring, comp, sel_t, ns, a, first, n_raw, i)[d];
        oh[d] = acc / den;
    }
}

// ---- The indexer's selection (ds4.c 6.7, select_rows_for_token) ----------

// For token t over its nv visible indexer rows KI[c] (HI heads of DI):
//     wI[h] = iw[t][h] * scale
//     score[t][c] = sum_h wI[h] * max(0, qI[t][h] . KI[c])
// threads: INDEXER_THREADS per block, one thread per row c; grid
// (ceil(nv / INDEXER_THREADS), T). The heads are summed in order h = 0..HI-1,
// as on the CPU.
#define INDEXER_THREADS 64

struct indexer_args {
    unsigned heads, dim, n_rows, max_rows;
    float scale;
};

__global__ void indexer_scores(const float *iq, const float *iw, const float *krows,
                               float *score, indexer_args a) {
    unsigned r = blockIdx.x * INDEXER_THREADS + threadIdx.x, t = blockIdx.y, DI = a.dim;
    if (r >= a.n_rows) return;
    const float *k = krows + (uint64_t)r * DI;
    float s = 0.0f;
    for (unsigned h = 0; h < a.heads; h++) {
        const float *q = iq + ((uint64_t)t * a.heads + h) * DI;
        float d = 0.0f;
        for (unsigned i = 0; i < DI; i++) d += q[i] * k[i];
        if (d > 0.0f) s += iw[(uint64_t)t * a.heads + h] * a.scale * d;
    }
    score[(uint64_t)t * a.max_rows + r] = s;
}

// topk_indices over each token's scores [T][max_rows] (first n_rows valid):
// the k highest, ties to the lower index, written in that order to
// sel [T][k]; n_sel[t] = min(k, n_rows).
//
// threads: one block per token, TOPK_THREADS(k) = the power of two >= k
// (32 .. TOPK_MAX) threads. A radix select, then a sort of the k chosen:
//   1. key(s) = the float's bits made monotonic as an unsigned (flip all
//      bits of negatives, the sign bit of the rest): s > s' <=> key > key'.
//   2. thr = the k-th largest key, found bit by bit from the top: keep a
//      bit when at least k keys are >= the prefix with it set (32 counting
//      passes over the row, each a block sum).
//   3. Chosen: every key > thr, and the first (k - count(> thr)) keys == thr
//      by index (the CPU's tie rule). Each thread owns a contiguous range of
//      indices, so a scan of the per-thread counts keeps index order.
//   4. A bitonic sort of the chosen (key descending, index ascending) in
//      shared memory gives the CPU's output order.
// The CPU's insertion list is O(n k); this is O(32 n / threads + k log^2 k).
#define TOPK_MAX 1024

struct topk_args {
    unsigned n_tok, n_rows, max_rows, k;
};

__device__ unsigned monotonic_key(float f) {
    unsigned u = __float_as_uint(f);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

// The sum of v over the block (blockDim.x a multiple of 32); every thread
// gets it. `partial` holds 32 floats of shared memory.
__device__ unsigned block_count(unsigned v, unsigned *partial) {
    for (int o = 16; o >= 1; o /= 2) v += __shfl_xor_sync(FULL_WARP, v, o);
    unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    unsigned total = 0;
    for (unsigned w = 0; w < warps; w++) total += partial[w];
    return total;
}

// An exclusive scan of one value per thread (blockDim.x <= TOPK_MAX).
__device__ unsigned block_scan(unsigned v, unsigned *buf) {
    __syncthreads();
    buf[threadIdx.x] = v;
    __syncthreads();
    unsigned before = 0;
    for (unsigned i = 0; i < threadIdx.x; i++) before += buf[i];
    return before;
}

// Sort (key, index) pairs [P] (P a power of two): key descending, index
// ascending on equal keys.
__device__ void bitonic_sort_desc(unsigned *key, int *idx, unsigned P) {
    for (unsigned size = 2; size <= P; size *= 2)
        for (unsigned stride = size / 2; stride > 0; stride /= 2) {
            __syncthreads();
            for (unsigned i = threadIdx.x; i < P; i += blockDim.x) {
                unsigned j = i ^ stride;
                if (j <= i) continue;
                bool first = key[i] > key[j] || (key[i] == key[j] && idx[i] < idx[j]);
                bool descending = (i & size) == 0;
                if (first != descending) {
                    unsigned tk = key[i]; key[i] = key[j]; key[j] = tk;
                    int ti = idx[i]; idx[i] = idx[j]; idx[j] = ti;
                }
            }
        }
    __syncthreads();
}

__global__ void topk_rows(const float *score, int *sel, int *n_sel, topk_args a) {
    __shared__ unsigned keys[TOPK_MAX], scan[TOPK_MAX], partial[32];
    __shared__ int ids[TOPK_MAX];
    unsigned t = blockIdx.x, n = a.n_rows, k = a.k < a.n_rows ? a.k : a.n_rows;
    const float *s = score + (uint64_t)t * a.max_rows;
    unsigned thr = 0;
    for (int bit = 31; bit >= 0; bit--) {
        unsigned cand = thr | 1u << bit, mine = 0;
        for (unsigned i = threadIdx.x; i < n; i += blockDim.x) mine += monotonic_key(s[i]) >= cand;
        if (block_count(mine, partial) >= k) thr = cand;
    }
    unsigned per = (n + blockDim.x - 1) / blockDim.x, lo = threadIdx.x * per;
    unsigned hi = lo + per < n ? lo + per : n, gt = 0, eq = 0;
    for (unsigned i = lo; i < hi; i++) {
        unsigned key = monotonic_key(s[i]);
        gt += key > thr;
        eq += key == thr;
    }
    unsigned n_gt = block_count(gt, partial);
    unsigned at_gt = block_scan(gt, scan), at_eq = block_scan(eq, scan);
    unsigned P = 32;
    while (P < k) P *= 2;
    for (unsigned i = threadIdx.x; i < P; i += blockDim.x) keys[i] = 0, ids[i] = 0x7fffffff;
    __syncthreads();
    for (unsigned i = lo; i < hi; i++) {
        unsigned key = monotonic_key(s[i]);
        if (key > thr) keys[at_gt] = key, ids[at_gt++] = (int)i;
        else if (key == thr && n_gt + at_eq < k) keys[n_gt + at_eq] = key, ids[n_gt + at_eq++] = (int)i;
    }
    bitonic_sort_desc(keys, ids, P);
    for (unsigned i = threadIdx.x; i < k; i += blockDim.x) sel[(uint64_t)t * a.k + i] = ids[i];
    if (threadIdx.x == 0) n_sel[t] = (int)k;
}

// ============================================================================
// Part 2. The host code: device, weights, memory, the gpu_* dispatches
// ============================================================================
//
// ds4.c 6.14 hands the gpu_* functions three kinds of pointer, and every
// pointer argument of a dispatch is sorted here, in one place (cuda_bind):
//
//   device    backend memory from gpu_alloc: the chunk's activations, the
//             session's state, the expert slots. Passed through untouched;
//             a decode token's dispatches are almost all of this kind.
//   weights   gpu_map_weights(base, size) uploads a whole mapped GGUF once,
//             at session open, into one cudaMalloc'd buffer; a pointer inside
//             that mapping becomes dev + (p - base). No managed memory.
//   host      anything else (a token list, the visible counts, the logits,
//             and every argument of the kernel checks): inputs are copied
//             into pinned staging memory at once and from there to a device
//             arena in stream order; outputs are copied back after the
//             launch, and only then does the host wait.
//
// So the host waits only where ds4.c asks for host memory back (the
// logits, a download); everything else queues on one stream.

// A CUDA call that fails stops the program with the call's name: a half
// finished forward would hand wrong logits to the caller.
static void cuda_check(cudaError_t err, const char *what) {
    if (err == cudaSuccess) return;
    fprintf(stderr, "ds4: cuda: %s: %s\n", what, cudaGetErrorString(err));
    exit(1);
}

// One uploaded mapping (the model file, the MTP file), with a fingerprint
// of its bytes (see gpu_map_weights).
struct cuda_weight_map {
    const uint8_t *host;
    size_t size;
    uint8_t *dev;
    uint64_t fingerprint;
};

enum { CUDA_MAX_MAPS = 4 };

// One live gpu_alloc range. The table is sorted by address, so that finding
// the range a pointer falls in is a binary search (a decode token sorts a
// few thousand pointers).
struct cuda_range {
    uint8_t *base;
    size_t size;
};

// Pinned staging memory for host inputs, used as a ring: STAGING_PARTS
// parts, each closed by an event when the ring moves past it, and waited on
// before it is written again.
enum { STAGING_BYTES = 32 << 20, STAGING_PARTS = 8 };

struct cuda_device {
    bool open;
    cudaStream_t stream;
    struct cuda_weight_map maps[CUDA_MAX_MAPS];
    int n_maps;
    struct cuda_range *ranges;
    int n_ranges, cap_ranges;
    uint8_t *arena;            // device scratch for the copied host arguments
    size_t arena_cap, arena_at;
    uint8_t *staging;          // pinned, STAGING_BYTES
    size_t staging_at;
    cudaEvent_t part_done[STAGING_PARTS];
    bool part_pending[STAGING_PARTS];
};

static struct cuda_device cuda;

// ---- The dispatch trace (tests print a decode token's kernel order) -------

static bool tracing;
static const char **trace_names;
static int trace_count, trace_cap, trace_syncs;

extern "C" void gpu_trace_start(const char **names, int cap) {
    tracing = true;
    trace_names = names;
    trace_cap = cap;
    trace_count = trace_syncs = 0;
}

extern "C" int gpu_trace_stop(int *syncs) {
    tracing = false;
    *syncs = trace_syncs;
    return trace_count;
}

// ---- Device and weights ---------------------------------------------------

extern "C" int gpu_available(void) {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

extern "C" int gpu_open(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        fprintf(stderr, "ds4: cuda: no CUDA device\n");
        return 0;
    }
    cuda_check(cudaSetDevice(0), "cudaSetDevice");
    cuda_check(cudaStreamCreate(&cuda.stream), "cudaStreamCreate");
    cuda_check(cudaHostAlloc((void **)&cuda.staging, STAGING_BYTES, cudaHostAllocDefault),
               "cudaHostAlloc (staging)");
    for (int i = 0; i < STAGING_PARTS; i++)
        cuda_check(cudaEventCreateWithFlags(&cuda.part_done[i], cudaEventDisableTiming),
                   "cudaEventCreate");
    cuda.open = true;
    return 1;
}

// Every dispatch so far has finished when it returns.
static void cuda_wait(void) {
    if (tracing) trace_syncs++;
    cuda_check(cudaStreamSynchronize(cuda.stream), "cudaStreamSynchronize");
}

extern "C" void gpu_sync(void) {
    cuda_wait();
}

// Upload [base, base + size) once. When the device has not the room (the
// q4 file is larger than an H200's memory), say so and return 0: the
// weights are then copied per dispatch, which is correct and very slow.
//
// Nothing tells this file when a model is unmapped, and a later model may be
// mapped at the same address (the tests load several in turn). So an upload
// is reused only for the same (address, size, fingerprint); any other upload
// overlapping the new mapping is stale and is freed first. The fingerprint
// hashes the first 4 KB (the GGUF header: names, shapes, offsets) and 4 KB
// samples at 64 evenly spaced offsets: two different files agreeing on all
// of them at one address is not a case this guards against.
static uint64_t fingerprint(const uint8_t *p, size_t size) {
    uint64_t h = 1469598103934665603ull ^ size;                  // FNV-1a
    for (int k = 0; k <= 64; k++) {
        size_t at = k == 0 ? 0 : (size_t)((double)size * k / 65.0);
        size_t n = size - at < 4096 ? size - at : 4096;
        for (size_t i = 0; i < n; i++) h = (h ^ p[at + i]) * 1099511628211ull;
    }
    return h;
}

static void forget_overlapping(const uint8_t *b, size_t size) {
    for (int i = 0; i < cuda.n_maps;) {
        struct cuda_weight_map *m = &cuda.maps[i];
        if (m->host < b + size && b < m->host + m->size) {
            cuda_check(cudaFree(m->dev), "cudaFree (stale weights)");
            *m = cuda.maps[--cuda.n_maps];
        } else {
            i++;
        }
    }
}

extern "C" int gpu_map_weights(const void *base, size_t size) {
    const uint8_t *b = (const uint8_t *)base;
    uint64_t fp = fingerprint(b, size);
    for (int i = 0; i < cuda.n_maps; i++)
        if (cuda.maps[i].host == b && cuda.maps[i].size == size && cuda.maps[i].fingerprint == fp)
            return 1;
    forget_overlapping(b, size);
    size_t free_bytes = 0, total = 0;
    cuda_check(cudaMemGetInfo(&free_bytes, &total), "cudaMemGetInfo");
    if (cuda.n_maps == CUDA_MAX_MAPS || size + ((size_t)4 << 30) > free_bytes) {
        fprintf(stderr, "ds4: cuda: %zu MB of weights do not fit in %zu MB free; "
                "they will be copied per dispatch\n", size >> 20, free_bytes >> 20);
        return 0;
    }
    struct cuda_weight_map *m = &cuda.maps[cuda.n_maps];
    cuda_check(cudaMalloc((void **)&m->dev, size), "cudaMalloc (weights)");
    cuda_check(cudaMemcpy(m->dev, base, size, cudaMemcpyHostToDevice), "uploading weights");
    m->host = b;
    m->size = size;
    m->fingerprint = fp;
    cuda.n_maps++;
    return 1;
}

// ---- Backend memory (ds4.c 6.14: gpu_alloc and the four copies) -----------

// The index of the first range whose base is above p.
static int range_after(const void *p) {
    int lo = 0, hi = cuda.n_ranges;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if ((const uint8_t *)p < cuda.ranges[mid].base) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

// Is p inside memory from gpu_alloc?
static bool is_device(const void *p) {
    int i = range_after(p) - 1;
    return i >= 0 && (const uint8_t *)p < cuda.ranges[i].base + cuda.ranges[i].size;
}

extern "C" void *gpu_alloc(size_t bytes) {
    uint8_t *p = nullptr;
    size_t size = bytes ? bytes : 16;
    if (cudaMalloc((void **)&p, size) != cudaSuccess) {
        size_t free_bytes = 0, total = 0;
        cudaMemGetInfo(&free_bytes, &total);
        fprintf(stderr, "ds4: cuda: out of device memory allocating %zu MB (%zu MB free)\n",
                size >> 20, free_bytes >> 20);
        exit(1);
    }
    cuda_check(cudaMemsetAsync(p, 0, size, cuda.stream), "cudaMemsetAsync (gpu_alloc)");
    if (cuda.n_ranges == cuda.cap_ranges) {
        cuda.cap_ranges = cuda.cap_ranges ? 2 * cuda.cap_ranges : 256;
        cuda.ranges = (struct cuda_range *)realloc(cuda.ranges,
                                                   cuda.cap_ranges * sizeof *cuda.ranges);
        if (!cuda.ranges) cuda_check(cudaErrorMemoryAllocation, "the range table");
    }
    int at = range_after(p);
    memmove(cuda.ranges + at + 1, cuda.ranges + at, (cuda.n_ranges - at) * sizeof *cuda.ranges);
    cuda.ranges[at].base = p;
    cuda.ranges[at].size = size;
    cuda.n_ranges++;
    return p;
}

extern "C" void gpu_free(void *p) {
    if (!p) return;
    int i = range_after(p) - 1;
    if (i < 0 || cuda.ranges[i].base != p) {
        fprintf(stderr, "ds4: cuda: gpu_free of memory gpu_alloc did not give\n");
        exit(1);
    }
    memmove(cuda.ranges + i, cuda.ranges + i + 1, (cuda.n_ranges - i - 1) * sizeof *cuda.ranges);
    cuda.n_ranges--;
    cuda_check(cudaFree(p), "cudaFree");
}

// `bytes` of pinned staging, contiguous; NULL when more than one part.
static uint8_t *staging_take(size_t bytes) {
    const size_t part = STAGING_BYTES / STAGING_PARTS;
    bytes = (bytes + 255) / 256 * 256;
    if (bytes > part) return nullptr;
    size_t at = cuda.staging_at;
    if (at / part != (at + bytes - 1) / part || at + bytes > STAGING_BYTES) {
        // Close the part we leave, open the next one (waiting if it is pending).
        int done = (int)(at / part) % STAGING_PARTS, next = (done + 1) % STAGING_PARTS;
        cuda_check(cudaEventRecord(cuda.part_done[done], cuda.stream), "cudaEventRecord");
        cuda.part_pending[done] = true;
        if (cuda.part_pending[next])
            cuda_check(cudaEventSynchronize(cuda.part_done[next]), "cudaEventSynchronize");
        cuda.part_pending[next] = false;
        at = (size_t)next * part;
    }
    cuda.staging_at = at + bytes;
    return cuda.staging + at;
}

// Host to device in stream order; `src` may be reused when this returns.
static void copy_to_device(void *dst, const void *src, size_t bytes) {
    uint8_t *stage = staging_take(bytes);
    if (!stage) {                            // large: a plain, waiting copy
        cuda_wait();
        cuda_check(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy (upload)");
        return;
    }
    memcpy(stage, src, bytes);
    cuda_check(cudaMemcpyAsync(dst, stage, bytes, cudaMemcpyHostToDevice, cuda.stream),
               "cudaMemcpyAsync (upload)");
}

static void require_device(const void *p, const char *what) {
    if (is_device(p)) return;
    fprintf(stderr, "ds4: cuda: %s: %p is not memory from gpu_alloc\n", what, p);
    exit(1);
}

extern "C" void gpu_upload(void *dst, const void *src, size_t bytes) {
    if (!bytes) return;
    require_device(dst, "gpu_upload");
    copy_to_device(dst, src, bytes);
}

extern "C" void gpu_download(void *dst, const void *src, size_t bytes) {
    if (!bytes) return;
    require_device(src, "gpu_download");
    cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cuda.stream),
               "cudaMemcpyAsync (download)");
    cuda_wait();
}

extern "C" void gpu_copy(void *dst, const void *src, size_t bytes) {
    if (!bytes) return;
    require_device(dst, "gpu_copy");
    require_device(src, "gpu_copy");
    cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cuda.stream),
               "cudaMemcpyAsync (device to device)");
}

extern "C" void gpu_zero(void *dst, size_t bytes) {
    if (!bytes) return;
    require_device(dst, "gpu_zero");
    cuda_check(cudaMemsetAsync(dst, 0, bytes, cuda.stream), "cudaMemsetAsync");
}

// ---- Binding a dispatch's pointers ------------------------------------------

// One pointer argument of a dispatch: its host extent, whether the kernel
// writes it (then it is copied back), and the device pointer it became.
enum span_use { SPAN_READ, SPAN_WRITE };

struct span {
    const void *host;
    size_t bytes;
    enum span_use use;
    void *dev;
};

static struct span span_in(const void *p, size_t bytes) {
    struct span s = { p, bytes, SPAN_READ, nullptr };
    return s;
}

// A written host buffer is copied in too: kernels write part of some
// outputs (strided matmul rows, one token's slot) and the rest must survive.
static struct span span_out(void *p, size_t bytes) {
    struct span s = { p, bytes, SPAN_WRITE, nullptr };
    return s;
}

static const uint8_t *mapped_device_address(const void *p, size_t bytes) {
    const uint8_t *b = (const uint8_t *)p;
    for (int i = 0; i < cuda.n_maps; i++) {
        const struct cuda_weight_map *m = &cuda.maps[i];
        if (b >= m->host && b + bytes <= m->host + m->size) return m->dev + (b - m->host);
    }
    return nullptr;
}

static size_t round_up_256(size_t n) { return (n + 255) / 256 * 256; }

// Arena room for this dispatch's host arguments. The arena is used as a
// ring too: a region is rewritten only by a copy queued after the launch
// that read it. Growing it waits for the stream first.
static uint8_t *arena_take(size_t need) {
    if (need > cuda.arena_cap) {
        size_t cap = cuda.arena_cap * 2 > need ? cuda.arena_cap * 2 : need;
        cap = cap < ((size_t)64 << 20) ? (size_t)64 << 20 : cap;
        cuda_wait();
        if (cuda.arena) cuda_check(cudaFree(cuda.arena), "cudaFree (arena)");
        cuda_check(cudaMalloc((void **)&cuda.arena, cap), "cudaMalloc (arena)");
        cuda.arena_cap = cap;
        cuda.arena_at = 0;
    }
    if (cuda.arena_at + need > cuda.arena_cap) cuda.arena_at = 0;
    uint8_t *p = cuda.arena + cuda.arena_at;
    cuda.arena_at += need;
    return p;
}

static bool is_host_span(const struct span &s) {
    return s.host && s.bytes && !is_device(s.host) && !mapped_device_address(s.host, s.bytes);
}

// Give every span a device pointer: NULL stays NULL (optional inputs),
// device memory passes, a mapped weight is translated, host memory is
// copied into the arena.
static void cuda_bind(struct span *s, int n) {
    size_t need = 0;
    for (int i = 0; i < n; i++)
        if (is_host_span(s[i])) need += round_up_256(s[i].bytes);
    uint8_t *arena = need ? arena_take(need) : nullptr;
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        s[i].dev = nullptr;
        if (!s[i].host) continue;
        if (is_device(s[i].host)) {
            s[i].dev = (void *)s[i].host;
            continue;
        }
        if (!s[i].bytes) continue;
        const uint8_t *mapped = mapped_device_address(s[i].host, s[i].bytes);
        if (mapped) {
            s[i].dev = (void *)mapped;
            continue;
        }
        s[i].dev = arena + at;
        at += round_up_256(s[i].bytes);
        copy_to_device(s[i].dev, s[i].host, s[i].bytes);
    }
}

// Copy the written host spans back, and wait only then: the host reads them
// next. Device outputs stay where they are, and nothing waits.
static void cuda_unbind(const struct span *s, int n) {
    bool copied = false;
    for (int i = 0; i < n; i++)
        if (s[i].use == SPAN_WRITE && s[i].dev && s[i].dev != s[i].host &&
            !mapped_device_address(s[i].host, s[i].bytes)) {
            cuda_check(cudaMemcpyAsync((void *)s[i].host, s[i].dev, s[i].bytes,
                                       cudaMemcpyDeviceToHost, cuda.stream),
                       "copying a dispatch's output");
            copied = true;
        }
    if (copied) cuda_wait();
}

// ---- One launch -----------------------------------------------------------

// launch_kernel(k, grid, block, dynamic shared bytes, stream, args...): the
// <<<>>> launch, kept in one function so that the rest of this part is
// plain C++ (the emulation prelude has its own launch_kernel).
#ifndef DS4_CUDA_EMULATION
template <class... Params, class... Args>
static cudaError_t launch_kernel(void (*k)(Params...), dim3 grid, dim3 block, size_t shared,
                                 cudaStream_t stream, Args... args) {
    k<<<grid, block, shared, stream>>>(args...);
    return cudaGetLastError();
}
#endif

// ---- --bench --profile: GPU time per kernel ---------------------------------

// While profiling, each launch is bracketed by two events; gpu_profile_end
// waits, sums cudaEventElapsedTime per kernel name and prints the table.
enum { PROFILE_MAX = 1 << 15 };

struct profile_mark {
    const char *name;
    cudaEvent_t start, end;
};

static struct profile_mark *marks;
static int n_marks;
static bool profiling;

extern "C" void gpu_profile_begin(void) {
    if (!marks) {
        marks = (struct profile_mark *)calloc(PROFILE_MAX, sizeof *marks);
        if (!marks) cuda_check(cudaErrorMemoryAllocation, "the profile marks");
        for (int i = 0; i < PROFILE_MAX; i++) {
            cuda_check(cudaEventCreateWithFlags(&marks[i].start, 0), "cudaEventCreate");
            cuda_check(cudaEventCreateWithFlags(&marks[i].end, 0), "cudaEventCreate");
        }
    }
    n_marks = 0;
    profiling = true;
}

struct profile_row {
    const char *name;
    int count;
    double ms;
};

static int by_time(const void *a, const void *b) {
    double x = ((const struct profile_row *)a)->ms, y = ((const struct profile_row *)b)->ms;
    return x < y ? 1 : x > y ? -1 : 0;
}

extern "C" int gpu_profile_end(int tokens) {
    profiling = false;
    cuda_wait();
    struct profile_row rows[128];
    int n_rows = 0;
    double total = 0;
    for (int i = 0; i < n_marks; i++) {
        float ms = 0;
        cuda_check(cudaEventElapsedTime(&ms, marks[i].start, marks[i].end), "cudaEventElapsedTime");
        int r = 0;
        while (r < n_rows && strcmp(rows[r].name, marks[i].name) != 0) r++;
        if (r == n_rows && n_rows < 128) rows[n_rows++] = { marks[i].name, 0, 0.0 };
        if (r < n_rows) rows[r].count++, rows[r].ms += ms;
        total += ms;
    }
    qsort(rows, (size_t)n_rows, sizeof rows[0], by_time);
    double per = tokens > 0 ? tokens : 1;
    printf("gpu profile: %d tokens, %.1f dispatches and %.3f ms of kernel time per token%s\n",
           tokens, n_marks / per, total / per, n_marks == PROFILE_MAX ? " (marks ran out)" : "");
    for (int r = 0; r < n_rows; r++)
        printf("  %-24s %7.1f per token %9.1f us per token %5.1f%%\n", rows[r].name,
               rows[r].count / per, 1000.0 * rows[r].ms / per,
               total > 0 ? 100.0 * rows[r].ms / total : 0.0);
    return n_marks;
}

template <class... Params, class... Args>
static void cuda_run(const char *name, void (*k)(Params...), dim3 grid, unsigned threads,
                     size_t shared, Args... args) {
    if (tracing) {
        if (trace_count < trace_cap) trace_names[trace_count] = name;
        trace_count++;
    }
    bool timed = profiling && n_marks < PROFILE_MAX;
    if (timed) cuda_check(cudaEventRecord(marks[n_marks].start, cuda.stream), "cudaEventRecord");
    cuda_check(launch_kernel(k, grid, dim3(threads, 1, 1), shared, cuda.stream, args...), name);
    if (timed) {
        cuda_check(cudaEventRecord(marks[n_marks].end, cuda.stream), "cudaEventRecord");
        marks[n_marks++].name = name;
    }
}

static unsigned groups_of(unsigned n, unsigned per) { return (n + per - 1) / per; }

// Device pointers of bound spans, typed as the kernel wants them.
static float *dev_f(const struct span &s) { return (float *)s.dev; }
static int *dev_i(const struct span &s) { return (int *)s.dev; }

// The extent of a strided [n_tok][width] array: the last row ends at
// (n_tok - 1) * stride + width.
static size_t strided_bytes(unsigned n_tok, unsigned stride, unsigned width) {
    return n_tok ? ((size_t)(n_tok - 1) * stride + width) * sizeof(float) : 0;
}

static int largest_index(const int *v, size_t n) {
    int most = 0;
    for (size_t i = 0; i < n; i++) most = v[i] > most ? v[i] : most;
    return most;
}

// ---- The gpu_* dispatches of ds4.c 6.14 -----------------------------------
// Each: bind its pointers, launch with the block size of the kernel's
// header, copy host outputs back (device ones stay). tests/test_metal.c calls
// the same list with host pointers.

// The kernels of one weight type. type: GGML type id (0 F32, 1 F16, 8 Q8_0,
// 10 Q2_K, 12 Q4_K, 16 IQ2_XXS, 30 BF16).
struct matmul_kernels {
    const char *name, *rows_name, *experts_name;
    void (*plain)(const uint8_t *, const float *, float *, matmul_args);
    void (*rows)(const uint8_t *, const float *, const int *, float *, const int *,
                 matmul_rows_args);
    void (*experts)(const uint8_t *, const int *, const float *, float *, matmul_experts_args);
};

template <class D>
static struct matmul_kernels kernels_of(const char *name, const char *rows, const char *experts,
                                        void (*plain)(const uint8_t *, const float *, float *,
                                                      matmul_args)) {
    struct matmul_kernels k = { name, rows, experts, plain, matmul_rows_kernel<D>,
                                matmul_experts_kernel<D> };
    return k;
}

static bool matmul_kernels_for(int type, struct matmul_kernels *k) {
    switch (type) {
    case 0: *k = kernels_of<decoder_f32>("matmul_f32", "matmul_rows_f32", "matmul_experts_f32",
                                         matmul_f32); return true;
    case 1: *k = kernels_of<decoder_f16>("matmul_f16", "matmul_rows_f16", "matmul_experts_f16",
                                         matmul_f16); return true;
    case 30: *k = kernels_of<decoder_bf16>("matmul_bf16", "matmul_rows_bf16",
                                           "matmul_experts_bf16", matmul_bf16); return true;
    case 8: *k = kernels_of<decoder_q8_0>("matmul_q8_0", "matmul_rows_q8_0",
                                          "matmul_experts_q8_0", matmul_q8_0); return true;
    case 10: *k = kernels_of<decoder_q2_k>("matmul_q2_k", "matmul_rows_q2_k",
                                           "matmul_experts_q2_k", matmul_q2_k); return true;
    case 12: *k = kernels_of<decoder_q4_k>("matmul_q4_k", "matmul_rows_q4_k",
                                           "matmul_experts_q4_k", matmul_q4_k); return true;
    case 16: *k = kernels_of<decoder_iq2_xxs>("matmul_iq2_xxs", "matmul_rows_iq2_xxs",
                                              "matmul_experts_iq2_xxs", matmul_iq2_xxs);
        return true;
    default: return false;
    }
}

extern "C" {

int gpu_matmul(int type, const void *w, const float *x, float *y, unsigned in, unsigned out,
               unsigned n_tok, unsigned row_bytes, unsigned x_stride, unsigned y_stride) {
    struct matmul_kernels k;
    if (!matmul_kernels_for(type, &k)) return -1;
    matmul_args a = { in, out, n_tok, row_bytes, x_stride, y_stride };
    struct span s[3] = { span_in(w, (size_t)out * row_bytes),
                         span_in(x, strided_bytes(n_tok, x_stride, in)),
                         span_out(y, strided_bytes(n_tok, y_stride, out)) };
    cuda_bind(s, 3);
    cuda_run(k.name, k.plain, dim3(groups_of(out, MATMUL_WARPS), 1, 1), 32 * MATMUL_WARPS, 0,
             (const uint8_t *)s[0].dev, (const float *)s[1].dev, dev_f(s[2]), a);
    cuda_unbind(s, 3);
    return 0;
}

// The rows an index array reaches: n, or (host arrays) its largest entry + 1.
static size_t rows_reached(const int *rows, unsigned n) {
    if (!rows || is_device(rows)) return n;
    return (size_t)largest_index(rows, n) + 1;
}

int gpu_matmul_rows(int type, const void *w, const float *x, const int *x_rows, float *y,
                    const int *y_rows, unsigned in, unsigned out, unsigned n_tok,
                    unsigned row_bytes) {
    struct matmul_kernels k;
    if (!matmul_kernels_for(type, &k)) return -1;
    matmul_rows_args a = { in, out, n_tok, row_bytes };
    struct span s[5] = { span_in(w, (size_t)out * row_bytes),
                         span_in(x, rows_reached(x_rows, n_tok) * in * sizeof(float)),
                         span_in(x_rows, x_rows ? n_tok * sizeof(int) : 0),
                         span_out(y, rows_reached(y_rows, n_tok) * out * sizeof(float)),
                         span_in(y_rows, y_rows ? n_tok * sizeof(int) : 0) };
    cuda_bind(s, 5);
    cuda_run(k.rows_name, k.rows, dim3(groups_of(out, MATMUL_WARPS), 1, 1), 32 * MATMUL_WARPS,
             0, (const uint8_t *)s[0].dev, (const float *)s[1].dev, dev_i(s[2]), dev_f(s[3]),
             dev_i(s[4]), a);
    cuda_unbind(s, 5);
    return 0;
}

int gpu_matmul_experts(int type, const void *w, size_t expert_bytes, const int *sel,
                       const float *x, float *y, unsigned in, unsigned out, unsigned n_slots,
                       unsigned row_bytes, unsigned x_div) {
    struct matmul_kernels k;
    if (!matmul_kernels_for(type, &k) || x_div == 0) return -1;
    matmul_experts_args a = { in, out, row_bytes, x_div, (uint64_t)expert_bytes };
    // The stacked experts reached: all of them up to the largest id (host
    // sel), or the whole tensor's first expert onwards (device sel: mapped).
    size_t experts = is_device(sel) ? 1 : (size_t)largest_index(sel, n_slots) + 1;
    if (is_device(sel) && !mapped_device_address(w, expert_bytes)) {
        fprintf(stderr, "ds4: cuda: matmul_experts needs the weights on the device\n");
        exit(1);
    }
    struct span s[4] = { span_in(w, experts * expert_bytes),
                         span_in(sel, n_slots * sizeof(int)),
                         span_in(x, (size_t)((n_slots + x_div - 1) / x_div) * in * sizeof(float)),
                         span_out(y, (size_t)n_slots * out * sizeof(float)) };
    cuda_bind(s, 4);
    cuda_run(k.experts_name, k.experts, dim3(groups_of(out, MATMUL_WARPS), n_slots, 1),
             32 * MATMUL_WARPS, 0, (const uint8_t *)s[0].dev, dev_i(s[1]),
             (const float *)s[2].dev, dev_f(s[3]), a);
    cuda_unbind(s, 4);
    return 0;
}

void gpu_rmsnorm(const float *x, const float *w, float *y, unsigned n, unsigned n_rows,
                 float eps) {
    rmsnorm_args a = { n, w != nullptr, eps };
    size_t bytes = (size_t)n * n_rows * sizeof(float);
    struct span s[3] = { span_in(x, bytes), span_in(w, n * sizeof(float)), span_out(y, bytes) };
    cuda_bind(s, 3);
    cuda_run("rmsnorm", rmsnorm, dim3(n_rows, 1, 1), RMSNORM_THREADS, 0, dev_f(s[0]),
             dev_f(s[1]), dev_f(s[2]), a);
    cuda_unbind(s, 3);
}

void gpu_rope_tail(float *x, const float *freq, unsigned len, unsigned dims, unsigned n_heads,
                   unsigned n_tok, long pos0, int inverse) {
    rope_args a = { len, dims, n_heads, inverse, (int64_t)pos0 };
    struct span s[2] = { span_out(x, (size_t)n_tok * n_heads * len * sizeof(float)),
                         span_in(freq, dims / 2 * sizeof(float)) };
    cuda_bind(s, 2);
    cuda_run("rope_tail", rope_tail, dim3(groups_of(dims / 2 * n_heads, ROPE_THREADS), n_tok, 1),
             ROPE_THREADS, 0, dev_f(s[0]), (const float *)s[1].dev, a);
    cuda_unbind(s, 2);
}

void gpu_fp8_round_trip_nope(float *rows, unsigned len, unsigned rope_dims, unsigned n_rows) {
    fp8_args a = { len, rope_dims };
    struct span s[1] = { span_out(rows, (size_t)len * n_rows * sizeof(float)) };
    cuda_bind(s, 1);
    cuda_run("fp8_round_trip_nope", fp8_round_trip_nope,
             dim3((len - rope_dims) / 64, n_rows, 1), 32, 0, dev_f(s[0]), a);
    cuda_unbind(s, 1);
}

void gpu_indexer_round_trip(float *rows, unsigned n, unsigned n_rows) {
    if (n < 32 || n > 1024 || (n & (n - 1))) {
        fprintf(stderr, "ds4: cuda: indexer_round_trip needs a power of two in 32..1024, "
                "not %u\n", n);
        exit(1);
    }
    indexer_rt_args a = { n };
    struct span s[1] = { span_out(rows, (size_t)n * n_rows * sizeof(float)) };
    cuda_bind(s, 1);
    cuda_run("indexer_round_trip", indexer_round_trip, dim3(n_rows, 1, 1), n,
             n * sizeof(float), dev_f(s[0]), a);
    cuda_unbind(s, 1);
}

// hc_pre and hc_head_collapse keep the mix in static shared memory sized
// for HC_MAX streams (the model has 4).
static void require_hc(unsigned hc) {
    if (hc > HC_MAX) {
        fprintf(stderr, "ds4: cuda: %u hyper-connection streams (the kernels hold %d)\n", hc,
                HC_MAX);
        exit(1);
    }
}

void gpu_hc_pre(const float *X, const float *raw_mix, const float *scale, const float *base,
                float *mix_out, float *y, unsigned hc, unsigned dim, unsigned iters,
                float norm_eps, float hc_eps, unsigned n_tok) {
    require_hc(hc);
    hc_args a = { hc, dim, iters, norm_eps, hc_eps };
    size_t M = (size_t)(2 + hc) * hc * sizeof(float);
    struct span s[6] = { span_in(X, (size_t)n_tok * hc * dim * sizeof(float)),
                         span_in(raw_mix, n_tok * M), span_in(scale, 3 * sizeof(float)),
                         span_in(base, M), span_out(mix_out, n_tok * M),
                         span_out(y, (size_t)n_tok * dim * sizeof(float)) };
    cuda_bind(s, 6);
    cuda_run("hc_pre", hc_pre, dim3(n_tok, 1, 1), HC_THREADS, 0, dev_f(s[0]), dev_f(s[1]),
             dev_f(s[2]), dev_f(s[3]), dev_f(s[4]), dev_f(s[5]), a);
    cuda_unbind(s, 6);
}

void gpu_hc_post(float *X, const float *f, const float *mix, unsigned hc, unsigned dim,
                 unsigned n_tok) {
    require_hc(hc);
    hc_args a = { hc, dim, 0, 0.0f, 0.0f };
    struct span s[3] = { span_out(X, (size_t)n_tok * hc * dim * sizeof(float)),
                         span_in(f, (size_t)n_tok * dim * sizeof(float)),
                         span_in(mix, (size_t)n_tok * (2 + hc) * hc * sizeof(float)) };
    cuda_bind(s, 3);
    cuda_run("hc_post", hc_post, dim3(groups_of(dim, HC_THREADS), n_tok, 1), HC_THREADS, 0,
             dev_f(s[0]), dev_f(s[1]), dev_f(s[2]), a);
    cuda_unbind(s, 3);
}

void gpu_hc_head_collapse(const float *X, const float *raw_mix, const float *scale,
                          const float *base, float *y, unsigned hc, unsigned dim,
                          float norm_eps, float hc_eps, unsigned n_tok) {
    require_hc(hc);
    hc_args a = { hc, dim, 0, norm_eps, hc_eps };
    struct span s[5] = { span_in(X, (size_t)n_tok * hc * dim * sizeof(float)),
                         span_in(raw_mix, (size_t)n_tok * hc * sizeof(float)),
                         span_in(scale, sizeof(float)), span_in(base, hc * sizeof(float)),
                         span_out(y, (size_t)n_tok * dim * sizeof(float)) };
    cuda_bind(s, 5);
    cuda_run("hc_head_collapse", hc_head_collapse, dim3(n_tok, 1, 1), HC_THREADS, 0,
             dev_f(s[0]), dev_f(s[1]), dev_f(s[2]), dev_f(s[3]), dev_f(s[4]), a);
    cuda_unbind(s, 5);
}

// E [vocab][dim] halves: in the mapped file, or (kernel checks) the rows
// up to the largest token.
void gpu_embed_tokens(const uint16_t *E, const int *tokens, float *out, unsigned dim,
                      unsigned n_tok) {
    embed_args a = { dim };
    size_t rows = (size_t)largest_index(tokens, n_tok) + 1;
    struct span s[3] = { span_in(E, rows * dim * 2), span_in(tokens, n_tok * sizeof(int)),
                         span_out(out, (size_t)n_tok * dim * sizeof(float)) };
    cuda_bind(s, 3);
    cuda_run("embed_tokens", embed_tokens, dim3(groups_of(dim, EMBED_THREADS), n_tok, 1),
             EMBED_THREADS, 0, (const __half *)s[0].dev, dev_i(s[1]), dev_f(s[2]), a);
    cuda_unbind(s, 3);
}

void gpu_route_token(const float *logits, const int *tokens, const int *tid2eid,
                     const float *bias, float *biased, int *sel, float *wt, unsigned n_tok,
                     unsigned n_experts, unsigned n_used, float route_scale) {
    if (n_used > 16) {
        fprintf(stderr, "ds4: cuda: route_token holds 16 experts per token, not %u\n", n_used);
        exit(1);
    }
    route_args a = { n_tok, n_experts, n_used, tid2eid != nullptr, bias != nullptr,
                     route_scale };
    size_t rows = (size_t)largest_index(tokens, n_tok) + 1;
    struct span s[7] = {
        span_in(logits, (size_t)n_tok * n_experts * sizeof(float)),
        span_in(tokens, n_tok * sizeof(int)),
        span_in(tid2eid, tid2eid ? rows * n_used * sizeof(int) : 0),
        span_in(bias, bias ? n_experts * sizeof(float) : 0),
        span_out(biased, (size_t)n_tok * n_experts * sizeof(float)),
        span_out(sel, (size_t)n_tok * n_used * sizeof(int)),
        span_out(wt, (size_t)n_tok * n_used * sizeof(float)) };
    cuda_bind(s, 7);
    cuda_run("route_token", route_token, dim3(groups_of(n_tok, ROUTE_THREADS), 1, 1),
             ROUTE_THREADS, 0, dev_f(s[0]), dev_i(s[1]), dev_i(s[2]), dev_f(s[3]), dev_f(s[4]),
             dev_i(s[5]), dev_f(s[6]), a);
    cuda_unbind(s, 7);
}

void gpu_swiglu(float *g, const float *u, const float *weight, unsigned ffn, unsigned n,
                float limit) {
    swiglu_args a = { ffn, weight != nullptr, limit };
    size_t bytes = (size_t)ffn * n * sizeof(float);
    struct span s[3] = { span_out(g, bytes), span_in(u, bytes),
                         span_in(weight, weight ? n * sizeof(float) : 0) };
    cuda_bind(s, 3);
    cuda_run("swiglu", swiglu, dim3(groups_of(ffn, SWIGLU_THREADS), n, 1), SWIGLU_THREADS, 0,
             dev_f(s[0]), dev_f(s[1]), dev_f(s[2]), a);
    cuda_unbind(s, 3);
}

void gpu_moe_gather_add(float *G, const float *Y, const int *slot_of, unsigned dim,
                        unsigned n_used, unsigned n_tok) {
    moe_add_args a = { dim, n_used };
    size_t rows = is_device(slot_of) ? (size_t)n_tok * n_used     // the host cannot look
                                     : (size_t)largest_index(slot_of, (size_t)n_tok * n_used) + 1;
    struct span s[3] = { span_out(G, (size_t)n_tok * dim * sizeof(float)),
                         span_in(Y, rows * dim * sizeof(float)),
                         span_in(slot_of, (size_t)n_tok * n_used * sizeof(int)) };
    cuda_bind(s, 3);
    cuda_run("moe_gather_add", moe_gather_add, dim3(groups_of(dim, ADD_THREADS), n_tok, 1),
             ADD_THREADS, 0, dev_f(s[0]), dev_f(s[1]), dev_i(s[2]), a);
    cuda_unbind(s, 3);
}

void gpu_add_rows(float *y, const float *x, unsigned n, unsigned x_period) {
    add_args a = { n, x_period };
    struct span s[2] = { span_out(y, (size_t)n * sizeof(float)),
                         span_in(x, (size_t)x_period * sizeof(float)) };
    cuda_bind(s, 2);
    cuda_run("add_rows", add_rows, dim3(groups_of(n, ADD_THREADS), 1, 1), ADD_THREADS, 0,
             dev_f(s[0]), dev_f(s[1]), a);
    cuda_unbind(s, 2);
}

void gpu_pool_channel(const float *kv, const float *score, float *pooled, unsigned ratio,
                      unsigned coff, unsigned dc) {
    pool_args a = { ratio, coff, dc };
    size_t bytes = (size_t)coff * ratio * coff * dc * sizeof(float);
    struct span s[3] = { span_in(kv, bytes), span_in(score, bytes),
                         span_out(pooled, dc * sizeof(float)) };
    cuda_bind(s, 3);
    cuda_run("pool_channel", pool_channel, dim3(groups_of(dc, POOL_THREADS), 1, 1),
             POOL_THREADS, 0, dev_f(s[0]), dev_f(s[1]), dev_f(s[2]), a);
    cuda_unbind(s, 3);
}

void gpu_attend_one(const float *q, const float *chunk_kv, const float *ring, const float *comp,
                    const int64_t *visible, const int *sel, const int *n_sel, const float *sinks,
                    float *o, unsigned n_heads, unsigned head_dim, unsigned window, unsigned topk,
                    long p0, unsigned compressed, unsigned max_rows, unsigned n_tok) {
    attend_args a = { n_heads, head_dim, window, topk, (int64_t)p0, compressed };
    int64_t most = 0;
    for (unsigned t = 0; t < n_tok && compressed; t++) most = visible[t] > most ? visible[t] : most;
    size_t qo = (size_t)n_tok * n_heads * head_dim * sizeof(float);
    size_t row = (size_t)head_dim * sizeof(float), logits = (size_t)max_rows * sizeof(float);
    struct span s[9] = { span_in(q, qo), span_in(chunk_kv, n_tok * row),
                         span_in(ring, window * row), span_in(comp, (size_t)most * row),
                         span_in(visible, n_tok * sizeof(int64_t)),
                         span_in(sel, (size_t)n_tok * topk * sizeof(int)),
                         span_in(n_sel, n_tok * sizeof(int)),
                         span_in(sinks, n_heads * sizeof(float)), span_out(o, qo) };
    // More than the default 48 KB of dynamic shared memory must be asked for.
    if (logits > 48 * 1024)
        cuda_check(cudaFuncSetAttribute(attend_one, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)logits), "attend_one: shared memory for logits");
    cuda_bind(s, 9);
    cuda_run("attend_one", attend_one, dim3(n_heads, n_tok, 1), ATTEND_THREADS, logits,
             dev_f(s[0]), dev_f(s[1]), dev_f(s[2]), dev_f(s[3]), (const int64_t *)s[4].dev,
             dev_i(s[5]), dev_i(s[6]), dev_f(s[7]), dev_f(s[8]), a);
    cuda_unbind(s, 9);
}

void gpu_indexer_scores(const float *iq, const float *iw, const float *krows, float *score,
                        unsigned heads, unsigned dim, unsigned n_rows, unsigned max_rows,
                        float scale, unsigned n_tok) {
    indexer_args a = { heads, dim, n_rows, max_rows, scale };
    struct span s[4] = { span_in(iq, (size_t)n_tok * heads * dim * sizeof(float)),
                         span_in(iw, (size_t)n_tok * heads * sizeof(float)),
                         span_in(krows, (size_t)n_rows * dim * sizeof(float)),
                         span_out(score, strided_bytes(n_tok, max_rows, n_rows)) };
    cuda_bind(s, 4);
    cuda_run("indexer_scores", indexer_scores,
             dim3(groups_of(n_rows, INDEXER_THREADS), n_tok, 1), INDEXER_THREADS, 0,
             dev_f(s[0]), dev_f(s[1]), dev_f(s[2]), dev_f(s[3]), a);
    cuda_unbind(s, 4);
}

void gpu_topk_rows(const float *score, int *sel, int *n_sel, unsigned n_tok, unsigned n_rows,
                   unsigned max_rows, unsigned k) {
    topk_args a = { n_tok, n_rows, max_rows, k };
    struct span s[3] = { span_in(score, strided_bytes(n_tok, max_rows, n_rows)),
                         span_out(sel, (size_t)n_tok * k * sizeof(int)),
                         span_out(n_sel, n_tok * sizeof(int)) };
    if (k > TOPK_MAX) {
        fprintf(stderr, "ds4: cuda: topk_rows selects at most %d rows, not %u\n", TOPK_MAX, k);
        exit(1);
    }
    unsigned threads = 32;
    while (threads < k) threads *= 2;
    cuda_bind(s, 3);
    cuda_run("topk_rows", topk_rows, dim3(n_tok, 1, 1), threads, 0, dev_f(s[0]), dev_i(s[1]),
             dev_i(s[2]), a);
    cuda_unbind(s, 3);
}

} // extern "C"
