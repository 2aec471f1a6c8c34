// ds4_metal.m -- the host side of the Mac GPU path: device, queue, the
// pipelines of kernels.metal, the weights as no-copy buffers over the mapped
// GGUF, and one command buffer per step.
//
// STATUS (said plainly, also in README.md): this file has NOT run on Apple
// hardware. On Linux it is compiled with `clang -fsyntax-only` against
// tests/metal/stubs/ (tests/metal/syntax.sh, in make test), which catches
// typos and wrong selector shapes, not wrong behaviour. The kernels it
// dispatches HAVE run, under the Metal-on-CPU harness (tests/metal/), with
// the grid and threadgroup sizes written in the table below, against their
// CPU twins in ds4.c. `make test-metal` on a Mac links tests/test_metal.c
// against this file instead of the harness and runs the same checks on the
// GPU.
//
// The pieces, in the order a session uses them:
//
//   1. ds4_metal_open(): the system device, one command queue, kernels.metal
//      compiled from source at start-up (a few hundred ms, once) and one
//      pipeline per kernel of the table.
//   2. ds4_metal_map_weights(): the GGUF is mmapped page-aligned by ds4.c;
//      Metal wraps that memory without copying (newBufferWithBytesNoCopy).
//      One buffer may not exceed device.maxBufferLength (about half the
//      unified memory), and the q2 file is 81 GB, so the mapping is covered
//      by chunks that OVERLAP by the largest tensor: every tensor then lies
//      whole inside one chunk, and a kernel binds (chunk, offset) directly.
//   3. A step (a decode token or a prefill chunk) is one command buffer with
//      one compute encoder: every dispatch of the forward is encoded in the
//      order of the CPU story, the buffer is committed once, and the CPU
//      waits once. Untracked hazard mode plus explicit buffer barriers
//      between dependent dispatches: no per-kernel CPU round trip.
//   4. Session state (KV ring, compressed rows, compressor windows) lives in
//      shared-storage buffers laid out exactly as the CPU session's arrays,
//      so a disk KV snapshot is the same bytes on either backend.
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---- The kernel table: every kernel of kernels.metal, its threadgroup ----
// The threadgroup sizes are the constants of kernels.metal (MATMUL_SIMDS,
// RMSNORM_THREADS, ...); tests/metal/syntax.sh checks that this table and
// the `kernel void` names of kernels.metal are the same set.

enum metal_kernel {
    K_MATMUL_F32, K_MATMUL_BF16, K_MATMUL_F16, K_MATMUL_Q8_0, K_MATMUL_Q2_K, K_MATMUL_Q4_K,
    K_MATMUL_IQ2_XXS,
    K_MATMUL_ROWS_F32, K_MATMUL_ROWS_BF16, K_MATMUL_ROWS_F16, K_MATMUL_ROWS_Q8_0,
    K_MATMUL_ROWS_Q2_K, K_MATMUL_ROWS_Q4_K, K_MATMUL_ROWS_IQ2_XXS,
    K_MATMUL_EXPERTS_F32, K_MATMUL_EXPERTS_BF16, K_MATMUL_EXPERTS_F16, K_MATMUL_EXPERTS_Q8_0,
    K_MATMUL_EXPERTS_Q2_K, K_MATMUL_EXPERTS_Q4_K, K_MATMUL_EXPERTS_IQ2_XXS,
    K_RMSNORM, K_ROPE_TAIL, K_FP8_ROUND_TRIP_NOPE, K_INDEXER_ROUND_TRIP,
    K_HC_PRE, K_HC_POST, K_HC_HEAD_COLLAPSE, K_EMBED_TOKENS, K_ROUTE_TOKEN,
    K_SWIGLU, K_MOE_GATHER_ADD, K_ADD_ROWS, K_POOL_CHANNEL, K_ATTEND_ONE,
    K_INDEXER_SCORES, K_TOPK_ROWS,
    K_COUNT
};

struct metal_kernel_info {
    const char *name;
    unsigned threads;        // threads per threadgroup; 0: per dispatch
};

static const struct metal_kernel_info metal_kernels[K_COUNT] = {
    [K_MATMUL_F32] = { "matmul_f32", 64 },
    [K_MATMUL_BF16] = { "matmul_bf16", 64 },
    [K_MATMUL_F16] = { "matmul_f16", 64 },
    [K_MATMUL_Q8_0] = { "matmul_q8_0", 64 },
    [K_MATMUL_Q2_K] = { "matmul_q2_k", 64 },
    [K_MATMUL_Q4_K] = { "matmul_q4_k", 64 },
    [K_MATMUL_IQ2_XXS] = { "matmul_iq2_xxs", 64 },
    [K_MATMUL_ROWS_F32] = { "matmul_rows_f32", 64 },
    [K_MATMUL_ROWS_BF16] = { "matmul_rows_bf16", 64 },
    [K_MATMUL_ROWS_F16] = { "matmul_rows_f16", 64 },
    [K_MATMUL_ROWS_Q8_0] = { "matmul_rows_q8_0", 64 },
    [K_MATMUL_ROWS_Q2_K] = { "matmul_rows_q2_k", 64 },
    [K_MATMUL_ROWS_Q4_K] = { "matmul_rows_q4_k", 64 },
    [K_MATMUL_ROWS_IQ2_XXS] = { "matmul_rows_iq2_xxs", 64 },
    [K_MATMUL_EXPERTS_F32] = { "matmul_experts_f32", 64 },
    [K_MATMUL_EXPERTS_BF16] = { "matmul_experts_bf16", 64 },
    [K_MATMUL_EXPERTS_F16] = { "matmul_experts_f16", 64 },
    [K_MATMUL_EXPERTS_Q8_0] = { "matmul_experts_q8_0", 64 },
    [K_MATMUL_EXPERTS_Q2_K] = { "matmul_experts_q2_k", 64 },
    [K_MATMUL_EXPERTS_Q4_K] = { "matmul_experts_q4_k", 64 },
    [K_MATMUL_EXPERTS_IQ2_XXS] = { "matmul_experts_iq2_xxs", 64 },
    [K_RMSNORM] = { "rmsnorm", 256 },
    [K_ROPE_TAIL] = { "rope_tail", 64 },
    [K_FP8_ROUND_TRIP_NOPE] = { "fp8_round_trip_nope", 32 },
    [K_INDEXER_ROUND_TRIP] = { "indexer_round_trip", 0 },
    [K_HC_PRE] = { "hc_pre", 256 },
    [K_HC_POST] = { "hc_post", 256 },
    [K_HC_HEAD_COLLAPSE] = { "hc_head_collapse", 256 },
    [K_EMBED_TOKENS] = { "embed_tokens", 256 },
    [K_ROUTE_TOKEN] = { "route_token", 32 },
    [K_SWIGLU] = { "swiglu", 256 },
    [K_MOE_GATHER_ADD] = { "moe_gather_add", 256 },
    [K_ADD_ROWS] = { "add_rows", 256 },
    [K_POOL_CHANNEL] = { "pool_channel", 64 },
    [K_ATTEND_ONE] = { "attend_one", 32 },
    [K_INDEXER_SCORES] = { "indexer_scores", 64 },
    [K_TOPK_ROWS] = { "topk_rows", 0 },
};

// The argument structs, field for field those of kernels.metal (MSL uint =
// C unsigned, long = int64).
struct matmul_args { unsigned in, out, n_tok, row_bytes, x_stride, y_stride; };
struct matmul_rows_args { unsigned in, out, n_tok, row_bytes, has_x_rows, has_y_rows; };
struct matmul_experts_args { unsigned in, out, row_bytes, x_div; uint64_t expert_bytes; };
struct rmsnorm_args { unsigned n, has_weight; float eps; };
struct rope_args { unsigned len, dims, n_heads; int inverse; int64_t pos0; };
struct fp8_args { unsigned len, rope_dims; };
struct indexer_rt_args { unsigned n; };
struct hc_args { unsigned hc, dim, sinkhorn_iters; float norm_eps, hc_eps; };
struct embed_args { unsigned dim; };
struct route_args {
    unsigned n_tok, n_experts, n_used, hash_routed, has_bias;
    float route_scale;
};
struct swiglu_args { unsigned ffn, has_weight; float limit; };
struct moe_add_args { unsigned dim, n_used; };
struct add_args { unsigned n, x_period; };
struct pool_args { unsigned ratio, coff, dc; };
struct attend_args {
    unsigned n_heads, head_dim, window, topk;
    int64_t p0;
    unsigned compressed;
};
struct indexer_args { unsigned heads, dim, n_rows, max_rows; float scale; };
struct topk_args { unsigned n_tok, n_rows, max_rows, k; };

// ---- 1. Device, queue, pipelines -----------------------------------------

struct ds4_metal {
    id<MTLDevice> device;
    id<MTLCommandQueue> queue;
    id<MTLComputePipelineState> pipe[K_COUNT];
    NSMutableArray<id<MTLBuffer>> *chunks;   // the weights, step 2
    const uint8_t *map_base;
    size_t chunk_stride, chunk_len;
    id<MTLCommandBuffer> cmd;                // the step in progress, step 3
    id<MTLComputeCommandEncoder> enc;
};

static struct ds4_metal metal;

static bool metal_fail(const char *what, NSError *err) {
    fprintf(stderr, "ds4: metal: %s%s%s\n", what, err ? ": " : "",
            err ? err.localizedDescription.UTF8String : "");
    return false;
}

static bool metal_build_pipelines(id<MTLLibrary> lib) {
    for (int k = 0; k < K_COUNT; k++) {
        NSString *name = [NSString stringWithUTF8String:metal_kernels[k].name];
        id<MTLFunction> fn = [lib newFunctionWithName:name];
        if (!fn) return metal_fail(metal_kernels[k].name, nil);
        NSError *err = nil;
        metal.pipe[k] = [metal.device newComputePipelineStateWithFunction:fn error:&err];
        if (!metal.pipe[k]) return metal_fail(metal_kernels[k].name, err);
    }
    return true;
}

// kernels_path: kernels.metal, next to the binary or given by --metal-kernels.
// Fast math stays off: exp, sqrt and division must match the CPU's ulps.
bool ds4_metal_open(const char *kernels_path) {
    metal.device = MTLCreateSystemDefaultDevice();
    if (!metal.device) return metal_fail("no Metal device", nil);
    metal.queue = [metal.device newCommandQueue];
    NSError *err = nil;
    NSString *path = [NSString stringWithUTF8String:kernels_path];
    NSString *src = [NSString stringWithContentsOfFile:path encoding:NSUTF8StringEncoding
                                                 error:&err];
    if (!src) return metal_fail(kernels_path, err);
    MTLCompileOptions *opt = [[MTLCompileOptions alloc] init];
    opt.fastMathEnabled = NO;
    id<MTLLibrary> lib = [metal.device newLibraryWithSource:src options:opt error:&err];
    if (!lib) return metal_fail("compiling kernels.metal", err);
    return metal_build_pipelines(lib);
}

// The kernels' source: the repository's kernels.metal, whose absolute path
// the Makefile compiles in (DS4_KERNELS_PATH).
#ifndef DS4_KERNELS_PATH
#define DS4_KERNELS_PATH "kernels.metal"
#endif

// --bench --profile: not measured on Metal yet (each dispatch waits for its
// own command buffer; GPU start/end times would come from it).
void gpu_profile_begin(void) {}
int gpu_profile_end(int tokens) {
    (void)tokens;
    printf("gpu profile: not measured by the Metal backend yet\n");
    return -1;
}

int gpu_available(void) {
    @autoreleasepool {
        return MTLCreateSystemDefaultDevice() != nil;
    }
}

int gpu_open(void) {
    return ds4_metal_open(DS4_KERNELS_PATH);
}

// Every gpu_* below waits for its own command buffer, so there is never
// anything outstanding; with one command buffer per step this commits the
// step so far and waits (ds4.c 6.14 calls it before every host access).
void gpu_sync(void) {
}

// ---- 2. Weights: no-copy buffers over the mapping ---------------------------

// ds4.c 8.14 announces each mapped GGUF. The gpu_* functions below copy
// their arguments into fresh buffers, so nothing is needed yet; the engine
// path that binds weight chunks directly calls ds4_metal_map_weights.
int gpu_map_weights(const void *base, size_t size) {
    (void)base;
    (void)size;
    return 1;
}

// Chunk i covers [i * stride, i * stride + len) with len - stride >= the
// largest tensor, so a tensor starting in [i * stride, (i + 1) * stride)
// ends inside chunk i. base and len must be page-aligned (ds4.c maps the
// whole file, whose size it rounds up to a page).
bool ds4_metal_map_weights(void *base, size_t size, size_t largest_tensor) {
    const size_t page = 16384;
    size_t limit = metal.device.maxBufferLength / page * page;
    size_t overlap = (largest_tensor + page - 1) / page * page;
    if (overlap >= limit) return metal_fail("a tensor exceeds the device buffer limit", nil);
    metal.map_base = base;
    metal.chunk_len = size < limit ? (size + page - 1) / page * page : limit;
    metal.chunk_stride = metal.chunk_len - (size < limit ? 0 : overlap);
    metal.chunks = [NSMutableArray array];
    for (size_t at = 0; at < size; at += metal.chunk_stride) {
        size_t len = size - at < metal.chunk_len ? (size - at + page - 1) / page * page
                                                 : metal.chunk_len;
        id<MTLBuffer> b = [metal.device newBufferWithBytesNoCopy:(uint8_t *)base + at
                                                          length:len
                                                         options:MTLResourceStorageModeShared
                                                     deallocator:nil];
        if (!b) return metal_fail("wrapping the model mapping", nil);
        [metal.chunks addObject:b];
        if (len < metal.chunk_len) break;
    }
    return true;
}

// The (buffer, offset) a kernel binds for weight bytes at host address p.
static id<MTLBuffer> metal_weight_buffer(const void *p, size_t *offset) {
    size_t at = (size_t)((const uint8_t *)p - metal.map_base);
    size_t i = at / metal.chunk_stride;
    *offset = at - i * metal.chunk_stride;
    return metal.chunks[i];
}

// ---- 3. A step: one command buffer, one encoder --------------------------

void ds4_metal_step_begin(void) {
    metal.cmd = [metal.queue commandBuffer];
    metal.enc = [metal.cmd computeCommandEncoder];
}

bool ds4_metal_step_end(void) {
    [metal.enc endEncoding];
    [metal.cmd commit];
    [metal.cmd waitUntilCompleted];
    bool ok = metal.cmd.status == MTLCommandBufferStatusCompleted;
    if (!ok) metal_fail("command buffer", metal.cmd.error);
    metal.enc = nil;
    metal.cmd = nil;
    return ok;
}

// One buffer binding of a dispatch: a device buffer and an offset.
struct metal_arg {
    id<MTLBuffer> buf;
    size_t offset;
};

// Encode kernel k over `groups` threadgroups of `threads` threads, with the
// buffers at indices 0.., the argument struct after them, and tg_bytes of
// threadgroup memory at [[threadgroup(0)]]. The barrier orders it after the
// previous dispatch (every dispatch of the forward reads its predecessor).
static void metal_encode(enum metal_kernel k, MTLSize groups, unsigned threads,
                         const struct metal_arg *bufs, int n_bufs, const void *args,
                         size_t args_len, size_t tg_bytes) {
    id<MTLComputeCommandEncoder> e = metal.enc;
    [e setComputePipelineState:metal.pipe[k]];
    for (int i = 0; i < n_bufs; i++) [e setBuffer:bufs[i].buf offset:bufs[i].offset atIndex:i];
    [e setBytes:args length:args_len atIndex:n_bufs];
    if (tg_bytes) [e setThreadgroupMemoryLength:(tg_bytes + 15) / 16 * 16 atIndex:0];
    [e dispatchThreadgroups:groups threadsPerThreadgroup:MTLSizeMake(threads, 1, 1)];
    [e memoryBarrierWithScope:MTLBarrierScopeBuffers];
}

static unsigned groups_of(unsigned n, unsigned per) { return (n + per - 1) / per; }

// ---- 4. The gpu_* dispatches (host pointers in, host pointers out) ----------
// These are the functions tests/test_metal.c calls; tests/metal/harness.cpp
// implements the same list on the CPU. Here each one copies its inputs into
// shared buffers, runs one step holding one dispatch, and copies back: the
// shape a kernel check needs. The engine's forward binds session buffers and
// weight chunks instead and encodes a whole step before waiting.

static struct metal_arg metal_copy_in(const void *p, size_t bytes) {
    struct metal_arg a = { nil, 0 };
    a.buf = [metal.device newBufferWithBytes:(p ? p : "") length:(bytes ? bytes : 16)
                                     options:MTLResourceStorageModeShared];
    return a;
}

static void metal_copy_out(void *p, struct metal_arg a, size_t bytes) {
    memcpy(p, [a.buf contents], bytes);
}

static void metal_run_one(enum metal_kernel k, MTLSize groups, unsigned threads,
                          const struct metal_arg *bufs, int n_bufs, const void *args,
                          size_t args_len, size_t tg_bytes) {
    ds4_metal_step_begin();
    metal_encode(k, groups, threads, bufs, n_bufs, args, args_len, tg_bytes);
    ds4_metal_step_end();
}

static size_t metal_type_row_bytes(int type, unsigned n) {
    switch (type) {
    case 0: return (size_t)n * 4;
    case 1: case 30: return (size_t)n * 2;
    case 8: return (size_t)n / 32 * 34;
    case 10: return (size_t)n / 256 * 84;
    case 12: return (size_t)n / 256 * 144;
    case 16: return (size_t)n / 256 * 66;
    default: return 0;
    }
}

int gpu_matmul(int type, const void *w, const float *x, float *y, unsigned in, unsigned out,
               unsigned n_tok, unsigned row_bytes, unsigned x_stride, unsigned y_stride) {
    enum metal_kernel k;
    switch (type) {
    case 0: k = K_MATMUL_F32; break;
    case 30: k = K_MATMUL_BF16; break;
    case 1: k = K_MATMUL_F16; break;
    case 8: k = K_MATMUL_Q8_0; break;
    case 10: k = K_MATMUL_Q2_K; break;
    case 12: k = K_MATMUL_Q4_K; break;
    case 16: k = K_MATMUL_IQ2_XXS; break;
    default: return -1;
    }
    struct matmul_args a = { in, out, n_tok, row_bytes, x_stride, y_stride };
    size_t y_bytes = (size_t)n_tok * y_stride * sizeof(float);
    struct metal_arg b[3] = { metal_copy_in(w, (size_t)out * metal_type_row_bytes(type, in)),
                              metal_copy_in(x, (size_t)n_tok * x_stride * sizeof(float)),
                              metal_copy_in(y, y_bytes) };
    metal_run_one(k, MTLSizeMake(groups_of(out, 2), 1, 1), 64, b, 3, &a, sizeof a, 0);
    metal_copy_out(y, b[2], y_bytes);
    return 0;
}

// The offset of a GGML type's kernel from its matmul_<type> (same order in
// the three groups of the kernel table), or -1.
static int metal_type_offset(int type) {
    switch (type) {
    case 0: return 0;
    case 30: return 1;
    case 1: return 2;
    case 8: return 3;
    case 10: return 4;
    case 12: return 5;
    case 16: return 6;
    default: return -1;
    }
}

static int metal_largest(const int *v, unsigned n) {
    int most = 0;
    for (unsigned i = 0; i < n; i++) most = v[i] > most ? v[i] : most;
    return most;
}

int gpu_matmul_rows(int type, const void *w, const float *x, const int *x_rows, float *y,
                    const int *y_rows, unsigned in, unsigned out, unsigned n_tok,
                    unsigned row_bytes) {
    int k = metal_type_offset(type);
    if (k < 0) return -1;
    struct matmul_rows_args a = { in, out, n_tok, row_bytes, x_rows != NULL, y_rows != NULL };
    size_t x_n = x_rows ? (size_t)metal_largest(x_rows, n_tok) + 1 : n_tok;
    size_t y_n = y_rows ? (size_t)metal_largest(y_rows, n_tok) + 1 : n_tok;
    size_t y_bytes = y_n * out * sizeof(float);
    struct metal_arg b[5] = { metal_copy_in(w, (size_t)out * row_bytes),
                              metal_copy_in(x, x_n * in * sizeof(float)),
                              metal_copy_in(x_rows, x_rows ? n_tok * sizeof(int) : 0),
                              metal_copy_in(y, y_bytes),
                              metal_copy_in(y_rows, y_rows ? n_tok * sizeof(int) : 0) };
    metal_run_one((enum metal_kernel)(K_MATMUL_ROWS_F32 + k), MTLSizeMake(groups_of(out, 2), 1, 1),
                  64, b, 5, &a, sizeof a, 0);
    metal_copy_out(y, b[3], y_bytes);
    return 0;
}

int gpu_matmul_experts(int type, const void *w, size_t expert_bytes, const int *sel,
                       const float *x, float *y, unsigned in, unsigned out, unsigned n_slots,
                       unsigned row_bytes, unsigned x_div) {
    int k = metal_type_offset(type);
    if (k < 0 || x_div == 0) return -1;
    struct matmul_experts_args a = { in, out, row_bytes, x_div, (uint64_t)expert_bytes };
    size_t experts = (size_t)metal_largest(sel, n_slots) + 1;
    size_t y_bytes = (size_t)n_slots * out * sizeof(float);
    struct metal_arg b[4] = { metal_copy_in(w, experts * expert_bytes),
                              metal_copy_in(sel, n_slots * sizeof(int)),
                              metal_copy_in(x, (size_t)((n_slots + x_div - 1) / x_div) * in *
                                                   sizeof(float)),
                              metal_copy_in(y, y_bytes) };
    metal_run_one((enum metal_kernel)(K_MATMUL_EXPERTS_F32 + k),
                  MTLSizeMake(groups_of(out, 2), n_slots, 1), 64, b, 4, &a, sizeof a, 0);
    metal_copy_out(y, b[3], y_bytes);
    return 0;
}

// Unified memory: backend memory is host memory the dispatches copy from
// (each gpu_* waits for its own command buffer, so nothing is in flight).
void *gpu_alloc(size_t bytes) {
    void *p = calloc(bytes ? bytes : 1, 1);
    if (!p) {
        fprintf(stderr, "ds4: metal: out of memory allocating %zu bytes\n", bytes);
        exit(1);
    }
    return p;
}

void gpu_free(void *p) { free(p); }
void gpu_upload(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
void gpu_download(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
void gpu_copy(void *dst, const void *src, size_t bytes) { memmove(dst, src, bytes); }
void gpu_zero(void *dst, size_t bytes) { memset(dst, 0, bytes); }

void gpu_rmsnorm(const float *x, const float *w, float *y, unsigned n, unsigned n_rows,
                 float eps) {
    struct rmsnorm_args a = { n, w != NULL, eps };
    size_t bytes = (size_t)n * n_rows * sizeof(float);
    struct metal_arg b[3] = { metal_copy_in(x, bytes), metal_copy_in(w, n * sizeof(float)),
                              metal_copy_in(NULL, bytes) };
    metal_run_one(K_RMSNORM, MTLSizeMake(n_rows, 1, 1), 256, b, 3, &a, sizeof a,
                  32 * sizeof(float));
    metal_copy_out(y, b[2], bytes);
}

void gpu_rope_tail(float *x, const float *freq, unsigned len, unsigned dims, unsigned n_heads,
                   unsigned n_tok, long pos0, int inverse) {
    struct rope_args a = { len, dims, n_heads, inverse, pos0 };
    size_t bytes = (size_t)n_tok * n_heads * len * sizeof(float);
    struct metal_arg b[2] = { metal_copy_in(x, bytes),
                              metal_copy_in(freq, dims / 2 * sizeof(float)) };
    metal_run_one(K_ROPE_TAIL, MTLSizeMake(groups_of(dims / 2 * n_heads, 64), n_tok, 1), 64, b,
                  2, &a, sizeof a, 0);
    metal_copy_out(x, b[0], bytes);
}

void gpu_fp8_round_trip_nope(float *rows, unsigned len, unsigned rope_dims, unsigned n_rows) {
    struct fp8_args a = { len, rope_dims };
    size_t bytes = (size_t)len * n_rows * sizeof(float);
    struct metal_arg b[1] = { metal_copy_in(rows, bytes) };
    metal_run_one(K_FP8_ROUND_TRIP_NOPE, MTLSizeMake((len - rope_dims) / 64, n_rows, 1), 32, b,
                  1, &a, sizeof a, 0);
    metal_copy_out(rows, b[0], bytes);
}

void gpu_indexer_round_trip(float *rows, unsigned n, unsigned n_rows) {
    struct indexer_rt_args a = { n };
    size_t bytes = (size_t)n * n_rows * sizeof(float);
    struct metal_arg b[1] = { metal_copy_in(rows, bytes) };
    metal_run_one(K_INDEXER_ROUND_TRIP, MTLSizeMake(n_rows, 1, 1), n, b, 1, &a, sizeof a,
                  n * sizeof(float));
    metal_copy_out(rows, b[0], bytes);
}

void gpu_hc_pre(const float *X, const float *raw_mix, const float *scale, const float *base,
                float *mix_out, float *y, unsigned hc, unsigned dim, unsigned iters,
                float norm_eps, float hc_eps, unsigned n_tok) {
    struct hc_args a = { hc, dim, iters, norm_eps, hc_eps };
    unsigned M = (2 + hc) * hc;
    struct metal_arg b[6] = {
        metal_copy_in(X, (size_t)n_tok * hc * dim * 4), metal_copy_in(raw_mix, n_tok * M * 4),
        metal_copy_in(scale, 3 * 4), metal_copy_in(base, M * 4),
        metal_copy_in(NULL, n_tok * M * 4), metal_copy_in(NULL, (size_t)n_tok * dim * 4) };
    metal_run_one(K_HC_PRE, MTLSizeMake(n_tok, 1, 1), 256, b, 6, &a, sizeof a, (32 + M) * 4);
    metal_copy_out(mix_out, b[4], n_tok * M * 4);
    metal_copy_out(y, b[5], (size_t)n_tok * dim * 4);
}

void gpu_hc_post(float *X, const float *f, const float *mix, unsigned hc, unsigned dim,
                 unsigned n_tok) {
    struct hc_args a = { hc, dim, 0, 0.0f, 0.0f };
    size_t bytes = (size_t)n_tok * hc * dim * 4;
    struct metal_arg b[3] = { metal_copy_in(X, bytes), metal_copy_in(f, (size_t)n_tok * dim * 4),
                              metal_copy_in(mix, n_tok * (2 + hc) * hc * 4) };
    metal_run_one(K_HC_POST, MTLSizeMake(groups_of(dim, 256), n_tok, 1), 256, b, 3, &a,
                  sizeof a, 0);
    metal_copy_out(X, b[0], bytes);
}

void gpu_hc_head_collapse(const float *X, const float *raw_mix, const float *scale,
                          const float *base, float *y, unsigned hc, unsigned dim,
                          float norm_eps, float hc_eps, unsigned n_tok) {
    struct hc_args a = { hc, dim, 0, norm_eps, hc_eps };
    struct metal_arg b[5] = {
        metal_copy_in(X, (size_t)n_tok * hc * dim * 4), metal_copy_in(raw_mix, n_tok * hc * 4),
        metal_copy_in(scale, 4), metal_copy_in(base, hc * 4),
        metal_copy_in(NULL, (size_t)n_tok * dim * 4) };
    metal_run_one(K_HC_HEAD_COLLAPSE, MTLSizeMake(n_tok, 1, 1), 256, b, 5, &a, sizeof a,
                  (32 + hc) * 4);
    metal_copy_out(y, b[4], (size_t)n_tok * dim * 4);
}

void gpu_embed_tokens(const uint16_t *E, const int *tokens, float *out, unsigned dim,
                      unsigned n_tok) {
    struct embed_args a = { dim };
    int most = 0;
    for (unsigned t = 0; t < n_tok; t++) most = tokens[t] > most ? tokens[t] : most;
    struct metal_arg b[3] = { metal_copy_in(E, (size_t)(most + 1) * dim * 2),
                              metal_copy_in(tokens, n_tok * 4),
                              metal_copy_in(NULL, (size_t)n_tok * dim * 4) };
    metal_run_one(K_EMBED_TOKENS, MTLSizeMake(groups_of(dim, 256), n_tok, 1), 256, b, 3, &a,
                  sizeof a, 0);
    metal_copy_out(out, b[2], (size_t)n_tok * dim * 4);
}

void gpu_route_token(const float *logits, const int *tokens, const int *tid2eid,
                     const float *bias, float *biased, int *sel, float *wt, unsigned n_tok,
                     unsigned n_experts, unsigned n_used, float route_scale) {
    struct route_args a = { n_tok, n_experts, n_used, tid2eid != NULL, bias != NULL,
                            route_scale };
    int most = 0;
    for (unsigned t = 0; t < n_tok; t++) most = tokens[t] > most ? tokens[t] : most;
    struct metal_arg b[7] = {
        metal_copy_in(logits, n_tok * n_experts * 4), metal_copy_in(tokens, n_tok * 4),
        metal_copy_in(tid2eid, tid2eid ? (size_t)(most + 1) * n_used * 4 : 0),
        metal_copy_in(bias, bias ? n_experts * 4 : 0), metal_copy_in(NULL, n_tok * n_experts * 4),
        metal_copy_in(NULL, n_tok * n_used * 4), metal_copy_in(NULL, n_tok * n_used * 4) };
    metal_run_one(K_ROUTE_TOKEN, MTLSizeMake(groups_of(n_tok, 32), 1, 1), 32, b, 7, &a, sizeof a,
                  0);
    metal_copy_out(biased, b[4], n_tok * n_experts * 4);
    metal_copy_out(sel, b[5], n_tok * n_used * 4);
    metal_copy_out(wt, b[6], n_tok * n_used * 4);
}

void gpu_swiglu(float *g, const float *u, const float *weight, unsigned ffn, unsigned n,
                float limit) {
    struct swiglu_args a = { ffn, weight != NULL, limit };
    size_t bytes = (size_t)ffn * n * 4;
    struct metal_arg b[3] = { metal_copy_in(g, bytes), metal_copy_in(u, bytes),
                              metal_copy_in(weight, weight ? n * 4 : 0) };
    metal_run_one(K_SWIGLU, MTLSizeMake(groups_of(ffn, 256), n, 1), 256, b, 3, &a, sizeof a, 0);
    metal_copy_out(g, b[0], bytes);
}

void gpu_moe_gather_add(float *G, const float *Y, const int *slot_of, unsigned dim,
                        unsigned n_used, unsigned n_tok) {
    struct moe_add_args a = { dim, n_used };
    int most = 0;
    for (unsigned i = 0; i < n_tok * n_used; i++) most = slot_of[i] > most ? slot_of[i] : most;
    struct metal_arg b[3] = { metal_copy_in(G, (size_t)n_tok * dim * 4),
                              metal_copy_in(Y, (size_t)(most + 1) * dim * 4),
                              metal_copy_in(slot_of, n_tok * n_used * 4) };
    metal_run_one(K_MOE_GATHER_ADD, MTLSizeMake(groups_of(dim, 256), n_tok, 1), 256, b, 3, &a,
                  sizeof a, 0);
    metal_copy_out(G, b[0], (size_t)n_tok * dim * 4);
}

void gpu_add_rows(float *y, const float *x, unsigned n, unsigned x_period) {
    struct add_args a = { n, x_period };
    struct metal_arg b[2] = { metal_copy_in(y, (size_t)n * 4),
                              metal_copy_in(x, (size_t)x_period * 4) };
    metal_run_one(K_ADD_ROWS, MTLSizeMake(groups_of(n, 256), 1, 1), 256, b, 2, &a, sizeof a, 0);
    metal_copy_out(y, b[0], (size_t)n * 4);
}

void gpu_pool_channel(const float *kv, const float *score, float *pooled, unsigned ratio,
                      unsigned coff, unsigned dc) {
    struct pool_args a = { ratio, coff, dc };
    size_t bytes = (size_t)coff * ratio * coff * dc * 4;
    struct metal_arg b[3] = { metal_copy_in(kv, bytes), metal_copy_in(score, bytes),
                              metal_copy_in(NULL, dc * 4) };
    metal_run_one(K_POOL_CHANNEL, MTLSizeMake(groups_of(dc, 64), 1, 1), 64, b, 3, &a, sizeof a,
                  0);
    metal_copy_out(pooled, b[2], dc * 4);
}

void gpu_attend_one(const float *q, const float *chunk_kv, const float *ring, const float *comp,
                    const int64_t *visible, const int *sel, const int *n_sel, const float *sinks,
                    float *o, unsigned n_heads, unsigned head_dim, unsigned window, unsigned topk,
                    long p0, unsigned compressed, unsigned max_rows, unsigned n_tok) {
    struct attend_args a = { n_heads, head_dim, window, topk, p0, compressed };
    int64_t most = 0;
    for (unsigned t = 0; t < n_tok; t++) most = visible[t] > most ? visible[t] : most;
    size_t qo = (size_t)n_tok * n_heads * head_dim * 4, row = (size_t)head_dim * 4;
    struct metal_arg b[9] = {
        metal_copy_in(q, qo), metal_copy_in(chunk_kv, n_tok * row),
        metal_copy_in(ring, window * row), metal_copy_in(comp, (size_t)most * row),
        metal_copy_in(visible, n_tok * 8), metal_copy_in(sel, (size_t)n_tok * topk * 4),
        metal_copy_in(n_sel, n_tok * 4), metal_copy_in(sinks, n_heads * 4),
        metal_copy_in(NULL, qo) };
    metal_run_one(K_ATTEND_ONE, MTLSizeMake(n_heads, n_tok, 1), 32, b, 9, &a, sizeof a,
                  max_rows * 4);
    metal_copy_out(o, b[8], qo);
}
void gpu_indexer_scores(const float *iq, const float *iw, const float *krows, float *score,
                        unsigned heads, unsigned dim, unsigned n_rows, unsigned max_rows,
                        float scale, unsigned n_tok) {
    struct indexer_args a = { heads, dim, n_rows, max_rows, scale };
    size_t out = (size_t)n_tok * max_rows * 4;
    struct metal_arg b[4] = {
        metal_copy_in(iq, (size_t)n_tok * heads * dim * 4), metal_copy_in(iw, n_tok * heads * 4),
        metal_copy_in(krows, (size_t)n_rows * dim * 4), metal_copy_in(NULL, out) };
    metal_run_one(K_INDEXER_SCORES, MTLSizeMake(groups_of(n_rows, 64), n_tok, 1), 64, b, 4, &a,
                  sizeof a, 0);
    metal_copy_out(score, b[3], out);
}

void gpu_topk_rows(const float *score, int *sel, int *n_sel, unsigned n_tok, unsigned n_rows,
                   unsigned max_rows, unsigned k) {
    struct topk_args a = { n_tok, n_rows, max_rows, k };
    struct metal_arg b[3] = { metal_copy_in(score, (size_t)n_tok * max_rows * 4),
                              metal_copy_in(NULL, n_tok * k * 4), metal_copy_in(NULL, n_tok * 4) };
    unsigned threads = 32, P = 32, kk = k < n_rows ? k : n_rows;
    while (threads < k) threads *= 2;
    while (P < kk) P *= 2;
    metal_run_one(K_TOPK_ROWS, MTLSizeMake(n_tok, 1, 1), threads, b, 3, &a, sizeof a,
                  (2 * P + threads + 32) * sizeof(unsigned));
    metal_copy_out(sel, b[1], n_tok * k * 4);
    metal_copy_out(n_sel, b[2], n_tok * 4);
}
