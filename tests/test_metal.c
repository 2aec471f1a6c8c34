/* tests/test_metal.c -- every kernel of kernels.metal, run on the CPU through
 * the Metal-on-CPU harness (tests/metal/), against its CPU twin in ds4.c.
 * Linked against ds4_cuda.cu instead (emulated: tests/bin/test_cuda; on a GPU:
 * make test-cuda), the same checks run the CUDA twins of the same kernels.
 *
 * Build (make test does this):
 *
 *     clang++ -std=c++14 -O2 -I tests/metal/include -c tests/metal/harness.cpp
 *     cc -O2 tests/test_metal.c harness.o -lstdc++ -lm -lpthread -lsqlite3
 *
 * Each check feeds small random inputs, chosen so that every kernel sees a
 * ragged last threadgroup (row counts not a multiple of the threadgroup) and,
 * for matmul, more tokens than one tile. It prints the largest error against
 * the CPU reference and the tolerance: 0 where the kernel performs the same
 * float operations in the same order (the round trips, embed, routing), a
 * few ulps relative where only the summation order differs (dot products,
 * reductions). The last line is "N passed, N failed".
 */
#define DS4_NO_MAIN
#define DS4_GPU         /* the gpu_* dispatches' declarations (ds4.c 6.14) */
#include "../ds4.c"
#define HARNESS_CHECK_TOL
#include "harness.h"

/* xorshift64*: seeded, the same sequence on every machine. */
static uint64_t rng_state = 0x2545F4914F6CDD1Dull;

static float rng_normal(void) {
    double s = 0;
    for (int i = 0; i < 4; i++) {
        rng_state ^= rng_state >> 12;
        rng_state ^= rng_state << 25;
        rng_state ^= rng_state >> 27;
        s += (double)((rng_state * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0 - 0.5;
    }
    return (float)(s * 1.7320508);
}

static float *random_floats(size_t n, float scale) {
    float *v = xcalloc(n, sizeof(float));
    for (size_t i = 0; i < n; i++) v[i] = rng_normal() * scale;
    return v;
}

static float *copy_floats(const float *x, size_t n) {
    float *v = xcalloc(n, sizeof(float));
    memcpy(v, x, n * sizeof(float));
    return v;
}

/* max |a - b| / max(max |b|, floor): error relative to the reference's scale. */
static double rel_err(const float *a, const float *b, size_t n, double floor_) {
    double worst = 0, scale = floor_;
    for (size_t i = 0; i < n; i++) scale = fmax(scale, fabs(b[i]));
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= worst)) worst = d;   /* a NaN sticks */
    }
    return worst / scale;
}

static double abs_err(const float *a, const float *b, size_t n) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= worst)) worst = d;
    }
    return worst;
}

/* ---- matmul, every weight type ------------------------------------------ */

/* OUT rows of IN random weights of `type`, packed, into w (row_bytes each). */
static uint8_t *random_weights(uint32_t type, int OUT, int IN, size_t *row_bytes_out) {
    size_t row_bytes = type_row_bytes(type, IN);
    uint8_t *w = xcalloc(OUT, row_bytes);
    *row_bytes_out = row_bytes;
    for (int r = 0; r < OUT; r++) {
        float *row = random_floats(IN, 0.5f);
        uint16_t *h = (uint16_t *)(w + r * row_bytes);
        if (type == TYPE_F32) {
            memcpy(w + r * row_bytes, row, IN * sizeof(float));
        } else if (type == TYPE_F16) {
            for (int i = 0; i < IN; i++) h[i] = f32_to_f16(row[i]);
        } else if (type == TYPE_BF16) {
            for (int i = 0; i < IN; i++) {
                uint32_t u;
                memcpy(&u, &row[i], 4);
                h[i] = (uint16_t)(u >> 16);     /* truncation: any bf16 will do */
            }
        } else {
            quantize_row(type, row, w + r * row_bytes, IN);
        }
        free(row);
    }
    return w;
}

/* y[t][r] = vec_dot_ref(W[r], x[t]) for out = 37 rows (the last threadgroup
 * half full) and n_tok = 1 (decode) and 11 (two tiles: prefill). IN = 512
 * is one staged segment of a row; IN = 2304 is two, the second partial. */
static void test_matmul(uint32_t type, const char *name, int IN) {
    enum { OUT = 37 };
    size_t row_bytes;
    uint8_t *w = random_weights(type, OUT, IN, &row_bytes);
    int toks[2] = { 1, 11 };
    for (int k = 0; k < 2; k++) {
        int T = toks[k];
        float *x = random_floats((size_t)T * IN, 1.0f);
        float *got = xcalloc((size_t)T * OUT, sizeof(float));
        float *want = xcalloc((size_t)T * OUT, sizeof(float));
        gpu_matmul((int)type, w, x, got, IN, OUT, T, (unsigned)row_bytes, IN, OUT);
        for (int t = 0; t < T; t++)
            for (int r = 0; r < OUT; r++)
                want[t * OUT + r] = vec_dot_ref(type, w + r * row_bytes, x + t * IN, IN);
        char what[96];
        snprintf(what, sizeof what, "matmul_%s (%d x %d, %d tok) vs vec_dot_ref", name, OUT,
                 IN, T);
        /* rounding grows as sqrt(IN): 2e-6 at 512 */
        check(what, rel_err(got, want, (size_t)T * OUT, 1e-3), 2e-6 * sqrt(IN / 512.0));
        free(x), free(got), free(want);
    }
    free(w);
}

/* The two gathered forms against vec_dot_ref on 3 stacked experts:
 *   matmul_rows     y[y_rows[j]] = W x[x_rows[j]]       (an expert's tokens)
 *   matmul_experts  y[i] = W_sel[i] x[i / x_div]        (decode, by slot) */
static void test_matmul_gathered(uint32_t type, const char *name) {
    enum { IN = 512, OUT = 37, E = 3, TOK = 4, K = 3, SLOTS = TOK * K };
    size_t row_bytes;
    uint8_t *w = random_weights(type, E * OUT, IN, &row_bytes);
    size_t expert_bytes = (size_t)OUT * row_bytes;
    float *x = random_floats((size_t)TOK * IN, 1.0f);
    float got[SLOTS * OUT], want[SLOTS * OUT];
    int sel[SLOTS], x_rows[5] = { 3, 0, 2, 2, 1 }, y_rows[5] = { 4, 1, 0, 3, 2 };
    for (int i = 0; i < SLOTS; i++) sel[i] = (i * 5 + 1) % E;
    gpu_matmul_experts((int)type, w, expert_bytes, sel, x, got, IN, OUT, SLOTS,
                       (unsigned)row_bytes, K);
    for (int i = 0; i < SLOTS; i++)
        for (int r = 0; r < OUT; r++)
            want[i * OUT + r] = vec_dot_ref(type, w + sel[i] * expert_bytes + r * row_bytes,
                                            x + (i / K) * IN, IN);
    char what[96];
    snprintf(what, sizeof what, "matmul_experts_%s (%d slots, %d experts) vs vec_dot_ref",
             name, SLOTS, E);
    check(what, rel_err(got, want, (size_t)SLOTS * OUT, 1e-3), 2e-6);
    const uint8_t *w1 = w + expert_bytes;      /* expert 1 */
    gpu_matmul_rows((int)type, w1, x, x_rows, got, y_rows, IN, OUT, 5, (unsigned)row_bytes);
    for (int j = 0; j < 5; j++)
        for (int r = 0; r < OUT; r++)
            want[y_rows[j] * OUT + r] = vec_dot_ref(type, w1 + r * row_bytes,
                                                    x + x_rows[j] * IN, IN);
    snprintf(what, sizeof what, "matmul_rows_%s (5 gathered tokens) vs vec_dot_ref", name);
    check(what, rel_err(got, want, (size_t)5 * OUT, 1e-3), 2e-6);
    free(w), free(x);
}

/* ---- chapter 5 primitives ------------------------------------------------ */

static void test_rmsnorm(void) {
    enum { N = 300, ROWS = 3 };
    float *x = random_floats(N * ROWS, 2.0f), *w = random_floats(N, 1.0f);
    float got[N * ROWS], want[N * ROWS];
    gpu_rmsnorm(x, w, got, N, ROWS, 1e-6f);
    for (int r = 0; r < ROWS; r++) rmsnorm(want + r * N, x + r * N, w, N, 1e-6f);
    check("rmsnorm (3 rows of 300, gain) vs rmsnorm", rel_err(got, want, N * ROWS, 1e-3), 1e-6);
    gpu_rmsnorm(x, NULL, got, N, ROWS, 1e-6f);
    for (int r = 0; r < ROWS; r++) rmsnorm(want + r * N, x + r * N, NULL, N, 1e-6f);
    check("rmsnorm (no gain) vs rmsnorm", rel_err(got, want, N * ROWS, 1e-3), 1e-6);
    free(x), free(w);
}

/* Both the plain and the YaRN frequency tables, forward and inverse. */
static void test_rope(void) {
    enum { LEN = 64, DIMS = 16, H = 3, T = 5 };
    struct ds4_config c = { 0 };
    c.original_ctx = 4096, c.beta_fast = 32, c.beta_slow = 1, c.rope_factor = 16;
    for (int yarn = 0; yarn < 2; yarn++) {
        struct rope r;
        rope_init(&r, DIMS, yarn ? 160000.0f : 10000.0f, yarn, &c);
        for (int inverse = 0; inverse < 2; inverse++) {
            float *x = random_floats(T * H * LEN, 1.0f), *want = copy_floats(x, T * H * LEN);
            gpu_rope_tail(x, r.freq, LEN, DIMS, H, T, 1000, inverse);
            for (int t = 0; t < T; t++)
                for (int h = 0; h < H; h++)
                    rope_tail(&r, want + (t * H + h) * LEN, LEN, 1000 + t, inverse);
            char what[96];
            snprintf(what, sizeof what, "rope_tail (%s, %s, pos 1000..1004) vs rope_tail",
                     yarn ? "yarn" : "plain", inverse ? "inverse" : "forward");
            check(what, abs_err(x, want, T * H * LEN), 2e-6);
            free(x), free(want);
        }
    }
}

static void test_round_trips(void) {
    enum { LEN = 192, ROPE = 64, ROWS = 4, NI = 128 };
    float *x = random_floats(LEN * ROWS, 3.0f), *want = copy_floats(x, LEN * ROWS);
    x[5] = want[5] = 0.0f;                       /* a zero, and a tiny block */
    for (int i = 64; i < 128; i++) x[i] = want[i] = 1e-6f * rng_normal();
    gpu_fp8_round_trip_nope(x, LEN, ROPE, ROWS);
    for (int r = 0; r < ROWS; r++) fp8_round_trip_nope(want + r * LEN, LEN, ROPE);
    check("fp8_round_trip_nope (4 rows of 192, tail 64)", abs_err(x, want, LEN * ROWS), 0);
    free(x), free(want);
    x = random_floats(NI * ROWS, 2.0f), want = copy_floats(x, NI * ROWS);
    gpu_indexer_round_trip(x, NI, ROWS);
    for (int r = 0; r < ROWS; r++) indexer_round_trip(want + r * NI, NI);
    check("indexer_round_trip (Hadamard 128 + FP4, 4 rows)", abs_err(x, want, NI * ROWS), 0);
    free(x), free(want);
}

/* ---- hyper-connections --------------------------------------------------- */

static void test_hc(void) {
    enum { N = 4, D = 96, T = 3, M = (2 + N) * N };
    struct ds4_config c = { 0 };
    c.hc = N, c.dim = D, c.sinkhorn_iters = 20, c.norm_eps = 1e-6f, c.hc_eps = 1e-6f;
    float *X = random_floats(T * N * D, 1.0f), *raw = random_floats(T * M, 3.0f);
    float scale[3] = { 0.7f, 1.3f, 0.9f }, *base = random_floats(M, 0.5f);
    float mix[T * M], y[T * D], want_y[T * D], want_mix[T * M];
    struct hc_mix ref[T];
    gpu_hc_pre(X, raw, scale, base, mix, y, N, D, 20, c.norm_eps, c.hc_eps, T);
    for (int t = 0; t < T; t++) {
        hc_pre(&c, X + t * N * D, raw + t * M, scale, base, &ref[t], want_y + t * D);
        memcpy(want_mix + t * M, ref[t].pre, N * sizeof(float));
        memcpy(want_mix + t * M + N, ref[t].post, N * sizeof(float));
        memcpy(want_mix + t * M + 2 * N, ref[t].comb, N * N * sizeof(float));
    }
    check("hc_pre: pre, post, sinkhorn(C) vs hc_pre", rel_err(mix, want_mix, T * M, 1e-3), 2e-6);
    check("hc_pre: collapsed y vs hc_pre", rel_err(y, want_y, T * D, 1e-3), 2e-6);

    float *f = random_floats(T * D, 1.0f), *Xg = copy_floats(X, T * N * D), tmp[N * D];
    gpu_hc_post(Xg, f, want_mix, N, D, T);
    for (int t = 0; t < T; t++) hc_post(&c, X + t * N * D, f + t * D, &ref[t], tmp);
    check("hc_post (in place) vs hc_post", rel_err(Xg, X, T * N * D, 1e-3), 1e-6);

    float *raw_head = random_floats(T * N, 3.0f);
    gpu_hc_head_collapse(X, raw_head, scale, base, y, N, D, c.norm_eps, c.hc_eps, T);
    for (int t = 0; t < T; t++)
        hc_head_collapse(&c, X + t * N * D, raw_head + t * N, scale, base, want_y + t * D);
    check("hc_head_collapse vs hc_head_collapse", rel_err(y, want_y, T * D, 1e-3), 2e-6);
    free(X), free(raw), free(base), free(f), free(Xg), free(raw_head);
}

/* ---- embedding, routing, experts ---------------------------------------- */

static void test_embed(void) {
    enum { V = 50, D = 300, T = 4 };
    uint16_t E[V * D];
    for (int i = 0; i < V * D; i++) E[i] = f32_to_f16(rng_normal());
    int tokens[T] = { 0, 49, 7, 7 };
    float got[T * D], want[T * D];
    gpu_embed_tokens(E, tokens, got, D, T);
    for (int t = 0; t < T; t++) dequant_row_ref(TYPE_F16, E + tokens[t] * D, want + t * D, D);
    check("embed_tokens (F16 rows) vs dequant_row_ref", abs_err(got, want, T * D), 0);
}

/* Top-k with planted ties (equal scores: the lower expert id must win), and
 * a hash-routed layer. */
static void test_route(void) {
    enum { E = 40, K = 6, T = 35, VOCAB = 64 };
    struct ds4_config c = { 0 };
    c.n_experts = E, c.n_used = K, c.route_scale = 1.5f;
    float *logits = random_floats(T * E, 2.0f), *bias = random_floats(E, 0.1f);
    for (int t = 0; t < T; t++) logits[t * E + 9] = logits[t * E + 3];
    bias[9] = bias[3];
    /* Emulated, the kernel's expf/sqrtf are libm's: bit for bit. A GPU's expf
     * is within 2 ulp of libm's (CUDA's documented bound), so its weights
     * (<= route_scale) may differ in the last bits: 2 ulp of 1.0. */
#if defined(DS4_CUDA_GPU) || defined(DS4_METAL_GPU)
    const double route_weight_tol = 2.5e-7;
#else
    const double route_weight_tol = 0;
#endif
    int32_t tid2eid[VOCAB * K], tokens[T];
    for (int i = 0; i < VOCAB * K; i++) tid2eid[i] = (i * 7 + 3) % E;
    for (int t = 0; t < T; t++) tokens[t] = (t * 13) % VOCAB;
    float biased[T * E], wt[T * K], want_wt[T * K];
    int sel[T * K], want_sel[T * K];
    for (int hash = 0; hash < 2; hash++) {
        struct layer_weights L = { 0 };
        L.hash_routed = hash, L.router_bias = hash ? NULL : bias, L.tid2eid = tid2eid;
        gpu_route_token(logits, tokens, hash ? tid2eid : NULL, hash ? NULL : bias, biased, sel,
                        wt, T, E, K, c.route_scale);
        for (int t = 0; t < T; t++)
            route_token(&c, &L, logits + t * E, tokens[t], want_sel + t * K, want_wt + t * K);
        int wrong = 0;
        for (int i = 0; i < T * K; i++) wrong += sel[i] != want_sel[i];
        check(hash ? "route_token (hash layer): ids differing" :
                     "route_token (top-6 of 40, ties): ids differing", wrong, 0);
        check(hash ? "route_token (hash layer): weights" : "route_token (top-6 of 40): weights",
              abs_err(wt, want_wt, T * K), route_weight_tol);
    }
    free(logits), free(bias);
}

/* run_expert's activation: g = min(g, lim), u = clamp(u), silu(g) u w. */
static void test_swiglu(void) {
    enum { F = 300, N = 3 };
    float *g = random_floats(F * N, 6.0f), *u = random_floats(F * N, 6.0f);
    float weight[N] = { 0.5f, 1.0f, 2.0f }, want[F * N];
    for (int pass = 0; pass < 2; pass++) {
        float limit = pass ? 7.0f : 0.0f, *gg = copy_floats(g, F * N);
        gpu_swiglu(gg, u, pass ? weight : NULL, F, N, limit);
        for (int i = 0; i < N; i++)
            for (int f = 0; f < F; f++) {
                float gv = g[i * F + f], uv = u[i * F + f];
                if (limit > 0) gv = fminf(gv, limit), uv = fminf(fmaxf(uv, -limit), limit);
                want[i * F + f] = siluf(gv) * uv * (pass ? weight[i] : 1.0f);
            }
        check(pass ? "swiglu (clamp 7, route weights) vs run_expert's loop" :
                     "swiglu (no clamp) vs run_expert's loop",
              rel_err(gg, want, F * N, 1e-3), 1e-6);
        free(gg);
    }
    free(g), free(u);
}

static void test_moe_add(void) {
    enum { D = 300, K = 3, T = 4, S = 10 };
    float *G = random_floats(T * D, 1.0f), *Y = random_floats(S * D, 1.0f);
    float *want = copy_floats(G, T * D);
    int slot_of[T * K] = { 0, 1, 2, 3, -1, 4, 5, 6, 7, 8, 9, -1 };
    gpu_moe_gather_add(G, Y, slot_of, D, K, T);
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++)
            for (int x = 0; x < D && slot_of[t * K + k] >= 0; x++)
                want[t * D + x] += Y[slot_of[t * K + k] * D + x];
    check("moe_gather_add vs moe_chunk's sum", abs_err(G, want, T * D), 0);
    float *b = random_floats(D, 1.0f);
    memcpy(want, G, T * D * sizeof(float));
    gpu_add_rows(G, b, T * D, D);
    for (int i = 0; i < T * D; i++) want[i] += b[i % D];
    check("add_rows (broadcast) vs y + x", abs_err(G, want, T * D), 0);
    free(G), free(Y), free(want), free(b);
}

/* ---- compressor pooling -------------------------------------------------- */

/* Overlap (coff 2, ratio 4) and plain (coff 1, ratio 8) windows, with empty
 * (-inf) slots and one channel whose slots are all empty. */
static void test_pool(void) {
    enum { DC = 70 };
    int ratios[2] = { 4, 8 }, coffs[2] = { 2, 1 };
    for (int k = 0; k < 2; k++) {
        struct compressor_state cs = { ratios[k], coffs[k], DC, NULL, NULL };
        int n = cs.coff * cs.ratio, width = cs.coff * DC;
        cs.kv = random_floats((size_t)n * width, 1.0f);
        cs.score = random_floats((size_t)n * width, 2.0f);
        for (int c = 0; c < width; c++) cs.score[c] = -INFINITY;       /* slot 0 empty */
        for (int i = 0; i < n; i++) cs.score[i * width + 5] = -INFINITY;
        if (cs.coff == 2)
            for (int i = 0; i < n; i++) cs.score[i * width + DC + 5] = -INFINITY;
        float got[DC], want[DC];
        gpu_pool_channel(cs.kv, cs.score, got, cs.ratio, cs.coff, DC);
        for (int j = 0; j < DC; j++) want[j] = pool_channel(&cs, j);
        check(k == 0 ? "pool_channel (ratio 4, overlap) vs pool_channel" :
                       "pool_channel (ratio 8) vs pool_channel",
              rel_err(got, want, DC, 1e-3), 1e-6);
        free(cs.kv), free(cs.score);
    }
}

/* ---- attention ------------------------------------------------------------ */

/* The real attend_one (and its inverse RoPE) on a hand-built step: a chunk of
 * 5 tokens at p0 = 21 with window 16, so that early tokens read the ring and
 * later ones the chunk; 30 compressed rows, token 0..2 seeing all visible
 * rows, tokens 3..4 an indexer selection. */
static void test_attend(void) {
    enum { H = 3, DH = 64, T = 5, W = 16, NC = 30, KI = 8, P0 = 21, ROPE = 16 };
    struct ds4_config c = { 0 };
    c.n_heads = H, c.head_dim = DH, c.window = W, c.idx_topk = KI;
    float sinks[H] = { 0.5f, -1.0f, 4.0f };
    struct layer_weights L = { 0 };
    L.ratio = 4, L.sinks = sinks;
    struct rope rope;
    rope_init(&rope, ROPE, 10000.0f, false, &c);
    struct chunk_work w = { 0 };
    w.q = random_floats(T * H * DH, 0.5f), w.kv = random_floats(T * DH, 1.0f);
    w.o = xcalloc(T * H * DH, sizeof(float));
    int64_t visible[T] = { 3, 5, 9, 30, 30 };
    int n_sel[T] = { -1, -1, -1, KI, KI }, sel[T * KI];
    for (int i = 0; i < T * KI; i++) sel[i] = (i * 7) % NC;
    w.visible = visible, w.n_sel = n_sel, w.sel = sel;
    struct layer_state ls = { 0 };
    ls.ring = random_floats(W * DH, 1.0f);
    ls.comp_rows.rows = random_floats(NC * DH, 1.0f), ls.comp_rows.width = DH;
    float *scratch = xcalloc(W + NC, sizeof(float));
    struct engine eng = { 0 };
    eng.attn_scratch = &scratch;
    struct step st = { .eng = &eng, .c = &c, .w = &w, .p0 = P0, .T = T, .L = &L, .st = &ls,
                       .rope = &rope };
    for (int item = 0; item < T * H; item++) attend_one(&st, item, 0);
    float got[T * H * DH];
    gpu_attend_one(w.q, w.kv, ls.ring, ls.comp_rows.rows, visible, sel, n_sel, sinks, got, H, DH,
                   W, KI, P0, 1, W + NC, T);
    gpu_rope_tail(got, rope.freq, DH, ROPE, H, T, P0, 1);
    check("attend_one (ring + chunk + compressed/selected rows) vs attend_one",
          rel_err(got, w.o, T * H * DH, 1e-3), 2e-6);
    free(w.q), free(w.kv), free(w.o), free(ls.ring), free(ls.comp_rows.rows), free(scratch);
}

/* ---- the indexer's selection --------------------------------------------- */

/* select_rows_for_token's scores (the formula, with ds4's dot_f32), then
 * topk_indices itself, on scores with planted ties. */
/* The indexer's real shape: 512 of 3000 rows (many per thread of the radix
 * select), a run of equal scores straddling the k-th, and fewer rows than k. */
static void test_topk_long(void) {
    enum { N = 3000, K = 512 };
    float *score = random_floats(N, 1.0f);
    for (int i = 100; i < 3000; i += 9) score[i] = score[50];   /* ~330 equal scores */
    static int sel[K], want[K];
    int n_sel = 0, wrong = 0;
    gpu_topk_rows(score, sel, &n_sel, 1, N, N, K);
    int n = topk_indices(score, N, K, want);
    wrong += n != n_sel;
    for (int i = 0; i < K; i++) wrong += sel[i] != want[i];
    gpu_topk_rows(score, sel, &n_sel, 1, 300, N, K);        /* n < k: all 300, sorted */
    n = topk_indices(score, 300, K, want);
    wrong += n != n_sel;
    for (int i = 0; i < n; i++) wrong += sel[i] != want[i];
    check("topk_rows (512 of 3000 with ties; 300 < 512) vs topk_indices: ids differing", wrong,
          0);
    free(score);
}

static void test_indexer_select(void) {
    enum { HI = 4, DI = 64, NV = 150, T = 3, KI = 16 };
    float *iq = random_floats(T * HI * DI, 1.0f), *iw = random_floats(T * HI, 1.0f);
    float *krows = random_floats(NV * DI, 1.0f), got[T * NV], want[T * NV];
    float scale = 1.0f / sqrtf((float)DI * HI);
    gpu_indexer_scores(iq, iw, krows, got, HI, DI, NV, NV, scale, T);
    for (int t = 0; t < T; t++)
        for (int r = 0; r < NV; r++) {
            float s = 0;
            for (int h = 0; h < HI; h++) {
                float d = dot_f32(iq + (t * HI + h) * DI, krows + r * DI, DI);
                if (d > 0) s += iw[t * HI + h] * scale * d;
            }
            want[t * NV + r] = s;
        }
    check("indexer_scores (4 heads, 150 rows) vs select_rows_for_token",
          rel_err(got, want, T * NV, 1e-3), 2e-6);
    for (int t = 0; t < T; t++)
        for (int r = 0; r < NV; r += 7) want[t * NV + r] = want[t * NV + 3];   /* ties */
    int sel[T * KI], n_sel[T], want_sel[KI], wrong = 0;
    gpu_topk_rows(want, sel, n_sel, T, NV, NV, KI);
    for (int t = 0; t < T; t++) {
        int n = topk_indices(want + t * NV, NV, KI, want_sel);
        wrong += n != n_sel[t];
        for (int i = 0; i < KI; i++) wrong += sel[t * KI + i] != want_sel[i];
    }
    check("topk_rows (16 of 150, ties) vs topk_indices: ids differing", wrong, 0);
    test_topk_long();
    free(iq), free(iw), free(krows);
}

#ifdef DS4_METAL_GPU
bool ds4_metal_open(const char *kernels_path);
#endif
int gpu_open(void);

int main(void) {
#ifdef DS4_METAL_GPU
    if (!ds4_metal_open("kernels.metal")) return 1;   /* make test-metal, on a Mac */
#endif
#ifdef DS4_CUDA_GPU
    if (!gpu_open()) return 1;                        /* make test-cuda, on an NVIDIA box */
#endif
    quant_tables_init();
    static const struct { uint32_t type; const char *name; } types[] = {
        { TYPE_F32, "f32" }, { TYPE_BF16, "bf16" }, { TYPE_F16, "f16" }, { TYPE_Q8_0, "q8_0" },
        { TYPE_Q2_K, "q2_k" }, { TYPE_Q4_K, "q4_k" }, { TYPE_IQ2_XXS, "iq2_xxs" } };
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        test_matmul(types[i].type, types[i].name, 512);
        test_matmul(types[i].type, types[i].name, 2304);
        test_matmul_gathered(types[i].type, types[i].name);
    }
    test_rmsnorm();
    test_rope();
    test_round_trips();
    test_hc();
    test_embed();
    test_route();
    test_swiglu();
    test_moe_add();
    test_pool();
    test_attend();
    test_indexer_select();
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed ? 1 : 0;
}
