// tests/metal/harness.cpp -- kernels.metal, unchanged, compiled as C++ and
// dispatched on the CPU with the threadgroup sizes ds4_metal.m uses.
//
//     clang++ -std=c++14 -I tests/metal/include -c tests/metal/harness.cpp
//
// `#include <metal_stdlib>` inside kernels.metal finds our prelude
// (tests/metal/include/metal_stdlib). Each gpu_* function below is what one
// dispatch of ds4_metal.m does: fill the argument struct, pick the grid and
// the threadgroup size, bind the buffers; here the buffers are host pointers
// and metal::dispatch() runs the threads as fibers. tests/test_metal.c, a C
// program that includes ds4.c, calls them and compares with the CPU twins.
#include "../../kernels.metal"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

using metal::dispatch;
using metal::thread_ids;

static uint groups_of(uint n, uint per) { return (n + per - 1) / per; }

// The dispatch trace: kernel names in the order they ran, and the number of
// host synchronisation points, while tracing is on (tests print the kernel
// order of a decode step from it).
static bool tracing;
static const char **trace_names;
static int trace_count, trace_cap, trace_syncs;

static void trace(const char *kernel_name) {
    if (!tracing) return;
    if (trace_count < trace_cap) trace_names[trace_count] = kernel_name;
    trace_count++;
}

extern "C" {

// The emulated device is always there, and always idle between dispatches.
int gpu_available(void) { return 1; }

// --bench --profile: the harness runs on the CPU and keeps no GPU time.
void gpu_profile_begin(void) {}
int gpu_profile_end(int) {
    printf("gpu profile: not measured by the Metal harness\n");
    return -1;
}
int gpu_open(void) { return 1; }

// Unified memory: the kernels read the mapping where it is.
int gpu_map_weights(const void *, size_t) { return 1; }

void gpu_sync(void) {
    if (tracing) trace_syncs++;
}

// Start recording into names[cap]; gpu_trace_stop returns the dispatch count
// (which may exceed cap) and the sync count.
void gpu_trace_start(const char **names, int cap) {
    tracing = true;
    trace_names = names;
    trace_cap = cap;
    trace_count = trace_syncs = 0;
}

int gpu_trace_stop(int *syncs) {
    tracing = false;
    *syncs = trace_syncs;
    return trace_count;
}

// type: GGML type id (0 F32, 1 F16, 8 Q8_0, 10 Q2_K, 12 Q4_K, 16 IQ2_XXS, 30 BF16).
int gpu_matmul(int type, const void *w, const float *x, float *y, uint in, uint out,
               uint n_tok, uint row_bytes, uint x_stride, uint y_stride) {
    matmul_args a = { in, out, n_tok, row_bytes, x_stride, y_stride };
    const uchar *wb = (const uchar *)w;
    void (*k)(const uchar *, const float *, float *, const matmul_args &, uint3, ushort,
              ushort) = nullptr;
    switch (type) {
    case 0: k = matmul_f32; break;
    case 1: k = matmul_f16; break;
    case 30: k = matmul_bf16; break;
    case 8: k = matmul_q8_0; break;
    case 10: k = matmul_q2_k; break;
    case 12: k = matmul_q4_k; break;
    case 16: k = matmul_iq2_xxs; break;
    default: return -1;
    }
    trace(type == 0 ? "matmul_f32" : type == 1 ? "matmul_f16" : type == 8 ? "matmul_q8_0"
          : type == 10 ? "matmul_q2_k" : type == 12 ? "matmul_q4_k"
          : type == 16 ? "matmul_iq2_xxs" : "matmul_bf16");
    dispatch(uint3{groups_of(out, MATMUL_SIMDS), 1, 1}, 32 * MATMUL_SIMDS,
             [&](const thread_ids &t) { k(wb, x, y, a, t.tg, t.lane, t.simd); });
    return 0;
}


// The index of a GGML type in the kernel tables below, or -1.
static int matmul_type_index(int type) {
    switch (type) {
    case 0: return 0;
    case 1: return 1;
    case 30: return 2;
    case 8: return 3;
    case 10: return 4;
    case 12: return 5;
    case 16: return 6;
    default: return -1;
    }
}

typedef void (*matmul_rows_fn)(const uchar *, const float *, const int *, float *, const int *,
                               const matmul_rows_args &, uint3, ushort, ushort);
typedef void (*matmul_experts_fn)(const uchar *, const int *, const float *, float *,
                                  const matmul_experts_args &, uint3, ushort, ushort);

int gpu_matmul_rows(int type, const void *w, const float *x, const int *x_rows, float *y,
                    const int *y_rows, uint in, uint out, uint n_tok, uint row_bytes) {
    static const matmul_rows_fn ks[] = { matmul_rows_f32, matmul_rows_f16, matmul_rows_bf16,
                                         matmul_rows_q8_0, matmul_rows_q2_k, matmul_rows_q4_k,
                                         matmul_rows_iq2_xxs };
    static const char *const names[] = { "matmul_rows_f32", "matmul_rows_f16",
                                         "matmul_rows_bf16", "matmul_rows_q8_0",
                                         "matmul_rows_q2_k", "matmul_rows_q4_k",
                                         "matmul_rows_iq2_xxs" };
    int i = matmul_type_index(type);
    if (i < 0) return -1;
    matmul_rows_args a = { in, out, n_tok, row_bytes, x_rows != nullptr, y_rows != nullptr };
    const uchar *wb = (const uchar *)w;
    const int *xr = x_rows ? x_rows : (const int *)x, *yr = y_rows ? y_rows : (const int *)x;
    trace(names[i]);
    dispatch(uint3{groups_of(out, MATMUL_SIMDS), 1, 1}, 32 * MATMUL_SIMDS,
             [&](const thread_ids &t) { ks[i](wb, x, xr, y, yr, a, t.tg, t.lane, t.simd); });
    return 0;
}

int gpu_matmul_experts(int type, const void *w, size_t expert_bytes, const int *sel,
                       const float *x, float *y, uint in, uint out, uint n_slots,
                       uint row_bytes, uint x_div) {
    static const matmul_experts_fn ks[] = { matmul_experts_f32, matmul_experts_f16,
                                            matmul_experts_bf16, matmul_experts_q8_0,
                                            matmul_experts_q2_k, matmul_experts_q4_k,
                                            matmul_experts_iq2_xxs };
    static const char *const names[] = { "matmul_experts_f32", "matmul_experts_f16",
                                         "matmul_experts_bf16", "matmul_experts_q8_0",
                                         "matmul_experts_q2_k", "matmul_experts_q4_k",
                                         "matmul_experts_iq2_xxs" };
    int i = matmul_type_index(type);
    if (i < 0 || x_div == 0) return -1;
    matmul_experts_args a = { in, out, row_bytes, x_div, (ulong)expert_bytes };
    const uchar *wb = (const uchar *)w;
    trace(names[i]);
    dispatch(uint3{groups_of(out, MATMUL_SIMDS), n_slots, 1}, 32 * MATMUL_SIMDS,
             [&](const thread_ids &t) { ks[i](wb, sel, x, y, a, t.tg, t.lane, t.simd); });
    return 0;
}

// Unified memory: backend memory is host memory, and the copies are memcpy.
void *gpu_alloc(size_t bytes) {
    void *p = calloc(bytes ? bytes : 1, 1);
    if (!p) {
        fprintf(stderr, "metal harness: out of memory\n");
        exit(1);
    }
    return p;
}

void gpu_free(void *p) { free(p); }
void gpu_upload(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
void gpu_download(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
void gpu_copy(void *dst, const void *src, size_t bytes) { memmove(dst, src, bytes); }
void gpu_zero(void *dst, size_t bytes) { memset(dst, 0, bytes); }

void gpu_rmsnorm(const float *x, const float *w, float *y, uint n, uint n_rows, float eps) {
    trace("rmsnorm");
    rmsnorm_args a = { n, w != nullptr, eps };
    float shared[32];
    dispatch(uint3{n_rows, 1, 1}, RMSNORM_THREADS,
             [&](const thread_ids &t) { rmsnorm(x, w, y, a, shared, t.tg, t.tid); });
}

void gpu_rope_tail(float *x, const float *freq, uint len, uint dims, uint n_heads, uint n_tok,
                   long pos0, int inverse) {
    trace("rope_tail");
    rope_args a = { len, dims, n_heads, inverse, pos0 };
    dispatch(uint3{groups_of(dims / 2 * n_heads, ROPE_THREADS), n_tok, 1}, ROPE_THREADS,
             [&](const thread_ids &t) { rope_tail(x, freq, a, t.tg, t.tid); });
}

void gpu_fp8_round_trip_nope(float *rows, uint len, uint rope_dims, uint n_rows) {
    trace("fp8_round_trip_nope");
    fp8_args a = { len, rope_dims };
    dispatch(uint3{(len - rope_dims) / 64, n_rows, 1}, 32,
             [&](const thread_ids &t) { fp8_round_trip_nope(rows, a, t.tg, t.lane); });
}

void gpu_indexer_round_trip(float *rows, uint n, uint n_rows) {
    trace("indexer_round_trip");
    indexer_rt_args a = { n };
    float *shared = new float[n];
    dispatch(uint3{n_rows, 1, 1}, (int)n,
             [&](const thread_ids &t) { indexer_round_trip(rows, a, shared, t.tg, t.tid); });
    delete[] shared;
}

void gpu_hc_pre(const float *X, const float *raw_mix, const float *scale, const float *base,
                float *mix_out, float *y, uint hc, uint dim, uint iters, float norm_eps,
                float hc_eps, uint n_tok) {
    trace("hc_pre");
    hc_args a = { hc, dim, iters, norm_eps, hc_eps };
    float shared[32 + 2 * 16 + 16 * 16];
    dispatch(uint3{n_tok, 1, 1}, HC_THREADS, [&](const thread_ids &t) {
        hc_pre(X, raw_mix, scale, base, mix_out, y, a, shared, t.tg, t.tid);
    });
}

void gpu_hc_post(float *X, const float *f, const float *mix, uint hc, uint dim, uint n_tok) {
    trace("hc_post");
    hc_args a = { hc, dim, 0, 0.0f, 0.0f };
    dispatch(uint3{groups_of(dim, HC_THREADS), n_tok, 1}, HC_THREADS,
             [&](const thread_ids &t) { hc_post(X, f, mix, a, t.tg, t.tid); });
}

void gpu_hc_head_collapse(const float *X, const float *raw_mix, const float *scale,
                          const float *base, float *y, uint hc, uint dim, float norm_eps,
                          float hc_eps, uint n_tok) {
    trace("hc_head_collapse");
    hc_args a = { hc, dim, 0, norm_eps, hc_eps };
    float shared[32 + 16];
    dispatch(uint3{n_tok, 1, 1}, HC_THREADS, [&](const thread_ids &t) {
        hc_head_collapse(X, raw_mix, scale, base, y, a, shared, t.tg, t.tid);
    });
}

void gpu_embed_tokens(const uint16_t *E, const int *tokens, float *out, uint dim, uint n_tok) {
    trace("embed_tokens");
    embed_args a = { dim };
    dispatch(uint3{groups_of(dim, EMBED_THREADS), n_tok, 1}, EMBED_THREADS,
             [&](const thread_ids &t) {
                 embed_tokens((const half *)E, tokens, out, a, t.tg, t.tid);
             });
}

void gpu_route_token(const float *logits, const int *tokens, const int *tid2eid,
                     const float *bias, float *biased, int *sel, float *wt, uint n_tok,
                     uint n_experts, uint n_used, float route_scale) {
    trace("route_token");
    route_args a = { n_tok, n_experts, n_used, tid2eid != nullptr, bias != nullptr,
                     route_scale };
    dispatch(uint3{groups_of(n_tok, ROUTE_THREADS), 1, 1}, ROUTE_THREADS,
             [&](const thread_ids &t) {
                 route_token(logits, tokens, tid2eid, bias, biased, sel, wt, a, t.tg, t.tid);
             });
}

void gpu_swiglu(float *g, const float *u, const float *weight, uint ffn, uint n, float limit) {
    trace("swiglu");
    swiglu_args a = { ffn, weight != nullptr, limit };
    dispatch(uint3{groups_of(ffn, SWIGLU_THREADS), n, 1}, SWIGLU_THREADS,
             [&](const thread_ids &t) { swiglu(g, u, weight, a, t.tg, t.tid); });
}

void gpu_moe_gather_add(float *G, const float *Y, const int *slot_of, uint dim, uint n_used,
                        uint n_tok) {
    trace("moe_gather_add");
    moe_add_args a = { dim, n_used };
    dispatch(uint3{groups_of(dim, ADD_THREADS), n_tok, 1}, ADD_THREADS,
             [&](const thread_ids &t) { moe_gather_add(G, Y, slot_of, a, t.tg, t.tid); });
}

void gpu_add_rows(float *y, const float *x, uint n, uint x_period) {
    trace("add_rows");
    add_args a = { n, x_period };
    dispatch(uint3{groups_of(n, ADD_THREADS), 1, 1}, ADD_THREADS,
             [&](const thread_ids &t) { add_rows(y, x, a, t.tg, t.tid); });
}

void gpu_pool_channel(const float *kv, const float *score, float *pooled, uint ratio,
                      uint coff, uint dc) {
    trace("pool_channel");
    pool_args a = { ratio, coff, dc };
    dispatch(uint3{groups_of(dc, POOL_THREADS), 1, 1}, POOL_THREADS,
             [&](const thread_ids &t) { pool_channel(kv, score, pooled, a, t.tg, t.tid); });
}

void gpu_attend_one(const float *q, const float *chunk_kv, const float *ring, const float *comp,
                    const int64_t *visible, const int *sel, const int *n_sel, const float *sinks,
                    float *o, uint n_heads, uint head_dim, uint window, uint topk, long p0,
                    uint compressed, uint max_rows, uint n_tok) {
    trace("attend_one");
    attend_args a = { n_heads, head_dim, window, topk, p0, compressed };
    float *logit = new float[max_rows];
    dispatch(uint3{n_heads, n_tok, 1}, ATTEND_THREADS, [&](const thread_ids &t) {
        attend_one(q, chunk_kv, ring, comp, (const long *)visible, sel, n_sel, sinks, o, a, logit,
                   t.tg, t.lane);
    });
    delete[] logit;
}

} // extern "C"

extern "C" {

void gpu_indexer_scores(const float *iq, const float *iw, const float *krows, float *score,
                        uint heads, uint dim, uint n_rows, uint max_rows, float scale,
                        uint n_tok) {
    trace("indexer_scores");
    indexer_args a = { heads, dim, n_rows, max_rows, scale };
    dispatch(uint3{groups_of(n_rows, INDEXER_THREADS), n_tok, 1}, INDEXER_THREADS,
             [&](const thread_ids &t) { indexer_scores(iq, iw, krows, score, a, t.tg, t.tid); });
}

void gpu_topk_rows(const float *score, int *sel, int *n_sel, uint n_tok, uint n_rows,
                   uint max_rows, uint k) {
    trace("topk_rows");
    topk_args a = { n_tok, n_rows, max_rows, k };
    uint threads = 32, P = 32;
    while (threads < k) threads *= 2;
    while (P < (k < n_rows ? k : n_rows)) P *= 2;
    uint *shared = (uint *)calloc(2 * P + threads + 32, sizeof(uint));
    dispatch(uint3{n_tok, 1, 1}, (int)threads, [&](const thread_ids &t) {
        topk_rows(score, sel, n_sel, a, shared, t.tg, t.tid, threads);
    });
    free(shared);
}

} // extern "C"
