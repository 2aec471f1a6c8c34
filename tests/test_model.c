/* tests/test_model.c -- tests for chapters 5 to 7: the numeric primitives
 * and the forward pass, on the engine itself.
 *
 *     tests/bin/test_model MODEL_F16.gguf [MODEL_Q8_0.gguf MODEL_Q2.gguf]
 *
 * Checks, in the order the book introduces them:
 *
 *   1. FP8 e4m3 and FP4 e2m1 rounding on hand-checked values, the power-of-two
 *      block scale, idempotence of the round trips;
 *   2. the Hadamard transform is orthonormal and its own inverse;
 *   3. RoPE: inverse(rope(x)) == x, and q.k depends only on the offset;
 *   4. Sinkhorn: columns sum to 1, rows nearly so;
 *   5. top-k: order and the lower-index tie rule;
 *   6. the streaming compressor equals a direct batch pooling;
 *   7. prefill == chunked prefill == one-token decode, for several chunk
 *      sizes, on a sequence longer than the window and several compressed
 *      windows (every position's logits compared);
 *   8. for each quantized model given: the fast kernels against the scalar
 *      dequantize-then-f32 reference, whole model, relative row error <= 1e-3;
 *   9. --perplexity (11.3): windows of BOS + text fed in chunks give the same
 *      summed NLL, token count and MTP agreement as one-token decode with the
 *      log-softmax and argmax computed here;
 *  10. the thread pool: every item runs exactly once, a job capped at one
 *      thread never reaches a worker, and the size rule (one thread per
 *      POOL_BYTES_PER_THREAD, no waking sleepers under POOL_WAKE_BYTES).
 *
 * Each check prints what it compared and the largest difference; the last
 * line is "N passed, N failed".
 */
#define DS4_NO_MAIN
#include "../ds4.c"
#define HARNESS_CHECK_TOL
#include "harness.h"

static uint64_t rng = 12345;
static float rnd(void) { return (float)((double)(splitmix64(&rng) >> 11) / 9007199254740992.0 * 2 - 1); }

/* ---- 1. FP8 / FP4 -------------------------------------------------------- */

static void test_small_floats(void) {
    struct { float in, want; } e4m3[] = {
        { 0.3f, 0.3125f },          /* grid step 2^-5 in [0.25, 0.5) */
        { 447.0f, 448.0f },         /* rounds up to the largest finite value */
        { 0.265625f, 0.25f },       /* exact tie between 0.25 and 0.28125: even mantissa */
        { -1.0f, -1.0f },
        { 0x1p-9f, 0x1p-9f },       /* smallest subnormal */
        { 0x1p-10f, 0.0f },         /* tie with 0 goes to even (0) */
        { 17.0f, 16.0f },           /* step 2 in [16, 32): 17 is a tie -> 16 */
    };
    double worst = 0;
    for (size_t i = 0; i < sizeof e4m3 / sizeof e4m3[0]; i++)
        worst = fmax(worst, fabs(round_e4m3(e4m3[i].in) - e4m3[i].want));
    check("round_e4m3 on 7 hand-checked values", worst, 0);

    struct { float in, want; } e2m1[] = {
        { 2.5f, 2.0f }, { 5.0f, 4.0f }, { 0.25f, 0.0f }, { 0.75f, 1.0f },
        { 1.25f, 1.0f }, { -3.5f, -4.0f }, { 6.0f, 6.0f }, { 1.6f, 1.5f },
    };
    worst = 0;
    for (size_t i = 0; i < sizeof e2m1 / sizeof e2m1[0]; i++)
        worst = fmax(worst, fabs(round_e2m1(e2m1[i].in) - e2m1[i].want));
    check("round_e2m1 on 8 hand-checked values (ties to even code)", worst, 0);

    /* pow2_ceil is exact next to powers of two, where ceilf(log2f()) slips. */
    double p = fabs(pow2_ceil(1.0f) - 1.0f) + fabs(pow2_ceil(1.0000001f) - 2.0f) +
               fabs(pow2_ceil(0.75f) - 1.0f) + fabs(pow2_ceil(0x1p-20f) - 0x1p-20f);
    check("pow2_ceil at and next to powers of two", p, 0);

    /* A block whose max is 448 * 2^-3 gets scale exactly 2^-3, so its max survives. */
    float block[64];
    for (int i = 0; i < 64; i++) block[i] = rnd() * 50.0f;
    block[7] = 56.0f;
    fp8_round_trip_block(block, 64);
    check("fp8 block: max element 56 = 448 * 2^-3 kept exactly", fabs(block[7] - 56.0f), 0);

    float a[64], b[64];
    for (int i = 0; i < 64; i++) a[i] = rnd() * 3.0f;
    fp8_round_trip_block(a, 64);
    memcpy(b, a, sizeof a);
    fp8_round_trip_block(b, 64);
    worst = 0;
    for (int i = 0; i < 64; i++) worst = fmax(worst, fabs(a[i] - b[i]));
    check("fp8 round trip is idempotent", worst, 0);
    for (int i = 0; i < 32; i++) a[i] = rnd() * 0.01f;
    fp4_round_trip_block(a, 32);
    memcpy(b, a, 32 * sizeof(float));
    fp4_round_trip_block(b, 32);
    worst = 0;
    for (int i = 0; i < 32; i++) worst = fmax(worst, fabs(a[i] - b[i]));
    check("fp4 round trip is idempotent", worst, 0);
}

/* ---- 2. Hadamard ----------------------------------------------------------- */

static void test_hadamard(void) {
    float v[128], w[128];
    double n0 = 0, n1 = 0, back = 0;
    for (int i = 0; i < 128; i++) {
        v[i] = w[i] = rnd();
        n0 += (double)v[i] * v[i];
    }
    hadamard(w, 128);
    for (int i = 0; i < 128; i++) n1 += (double)w[i] * w[i];
    hadamard(w, 128);
    for (int i = 0; i < 128; i++) back = fmax(back, fabs(w[i] - v[i]));
    check("hadamard keeps the norm (orthonormal)", fabs(n1 - n0) / n0, 1e-5);
    check("hadamard twice is the identity", back, 1e-5);
    float e[4] = { 1, 0, 0, 0 };
    hadamard(e, 4);
    check("hadamard of e0 is a flat row of 1/2", fabs(e[0] - 0.5) + fabs(e[3] - 0.5), 1e-7);
}

/* ---- 3. RoPE --------------------------------------------------------------- */

static void test_rope(void) {
    struct ds4_config c = { 0 };
    c.original_ctx = 65536;
    c.beta_fast = 32;
    c.beta_slow = 1;
    c.rope_factor = 16;
    struct rope plain, yarn;
    rope_init(&plain, 64, 10000.0f, false, &c);
    rope_init(&yarn, 64, 160000.0f, true, &c);
    /* Flash's YaRN frequencies (docs/forward.md §2.2), as precompute_freqs_cis of DeepSeek's
     * model.py gives them at Flash's config; spot-check three. */
    double f = fabs(yarn.freq[1] - 0.687656) / 0.687656 + fabs(yarn.freq[16] - 0.00226563) / 0.00226563 +
               fabs(yarn.freq[31] - 5.68053e-7) / 5.68053e-7;
    check("YaRN frequencies match the tabulated Flash values", f, 1e-4);

    float x[96], y[96];
    for (int i = 0; i < 96; i++) x[i] = y[i] = rnd();
    rope_tail(&yarn, y, 96, 12345, false);
    rope_tail(&yarn, y, 96, 12345, true);
    double worst = 0;
    for (int i = 0; i < 96; i++) worst = fmax(worst, fabs(x[i] - y[i]));
    check("rope then inverse rope returns the input", worst, 1e-5);

    float q[64], k[64], q1[64], k1[64], q2[64], k2[64];
    for (int i = 0; i < 64; i++) q[i] = rnd(), k[i] = rnd();
    memcpy(q1, q, sizeof q); memcpy(k1, k, sizeof k);
    memcpy(q2, q, sizeof q); memcpy(k2, k, sizeof k);
    rope_tail(&plain, q1, 64, 10, false); rope_tail(&plain, k1, 64, 3, false);
    rope_tail(&plain, q2, 64, 107, false); rope_tail(&plain, k2, 64, 100, false);
    double d1 = 0, d2 = 0;
    for (int i = 0; i < 64; i++) d1 += q1[i] * k1[i], d2 += q2[i] * k2[i];
    check("q.k after rope depends only on the position offset", fabs(d1 - d2), 1e-4);
}

/* ---- 4. Sinkhorn ----------------------------------------------------------- */

static void test_sinkhorn(void) {
    float c[16];
    for (int i = 0; i < 16; i++) c[i] = rnd() * 4;
    sinkhorn(c, 4, 20, 1e-6f);
    double col = 0, row = 0;
    for (int k = 0; k < 4; k++) {
        double s = 0;
        for (int j = 0; j < 4; j++) s += c[j * 4 + k];
        col = fmax(col, fabs(s - 1));
    }
    for (int j = 0; j < 4; j++) {
        double s = 0;
        for (int k = 0; k < 4; k++) s += c[j * 4 + k];
        row = fmax(row, fabs(s - 1));
    }
    check("sinkhorn: column sums are 1", col, 1e-5);
    check("sinkhorn: row sums are close to 1", row, 1e-2);
}

/* ---- 5. top-k -------------------------------------------------------------- */

static void test_topk(void) {
    float s[8] = { 0.5f, 2.0f, 2.0f, -1.0f, 3.0f, 2.0f, 0.0f, 3.0f };
    int out[4];
    int n = topk_indices(s, 8, 4, out);
    int want[4] = { 4, 7, 1, 2 };
    double bad = n != 4;
    for (int i = 0; i < 4; i++) bad += out[i] != want[i];
    check("top-4 picks 4,7,1,2 (ties: lower index first)", bad, 0);
    n = topk_indices(s, 3, 8, out);
    check("top-k with k > n returns all n", n != 3 || out[0] != 1 || out[1] != 2 || out[2] != 0, 0);
}

/* ---- 6. Compressor --------------------------------------------------------- */

/* Direct definition of row w for ratio r (coff 1) and r = 4 (coff 2). */
static float direct_pool(int r, int coff, int dc, float *k, float *z, int w, int j) {
    double num = 0, den = 0, mx = -INFINITY;
    int width = coff * dc;
    for (int pass = 0; pass < 2; pass++)
        for (int t = (w - (coff == 2)) * r; t < (w + 1) * r; t++) {
            if (t < 0) continue;
            int col = coff == 2 ? (t < w * r ? j : dc + j) : j;
            double zz = z[t * width + col];
            if (pass == 0) { mx = fmax(mx, zz); continue; }
            double p = exp(zz - mx);
            num += p * k[t * width + col];
            den += p;
        }
    return (float)(num / den);
}

static void test_compressor(void) {
    int dc = 8;
    for (int r = 4; r <= 8; r += 4) {
        int coff = r == 4 ? 2 : 1, width = coff * dc, n = 3 * r + 1;
        float *k = xmalloc((size_t)n * width * sizeof(float)), *z = xmalloc((size_t)n * width * sizeof(float));
        for (int i = 0; i < n * width; i++) k[i] = rnd(), z[i] = 3 * rnd();
        struct compressor_state cs;
        cs.ratio = r, cs.coff = coff, cs.dc = dc;
        cs.kv = xcalloc((size_t)coff * r * width, sizeof(float));
        cs.score = xmalloc((size_t)coff * r * width * sizeof(float));
        for (int i = 0; i < coff * r * width; i++) cs.score[i] = -INFINITY;
        double worst = 0;
        int rows = 0;
        float pooled[8];
        for (int t = 0; t < n; t++)
            if (compressor_push(&cs, k + t * width, z + t * width, t, pooled)) {
                for (int j = 0; j < dc; j++)
                    worst = fmax(worst, fabs(pooled[j] - direct_pool(r, coff, dc, k, z, rows, j)));
                rows++;
            }
        char what[96];
        snprintf(what, sizeof what, "streaming compressor == batch pooling (ratio %d, %d rows)", r, rows);
        check(what, rows == 3 ? worst : 1.0, 1e-6);
        free(k); free(z); free(cs.kv); free(cs.score);
    }
}

/* ---- 7. Prefill == chunked == decode --------------------------------------- */

static float *run_chunks(struct engine *eng, const int32_t *tokens, int n, int chunk, bool mtp) {
    int V = eng->model->cfg.vocab;
    float *logits = xmalloc((size_t)n * V * sizeof(float));
    float *mtp_logits = mtp ? xcalloc((size_t)n * V, sizeof(float)) : NULL;
    struct ds4_error e = { "" };
    if (!run_schedule(eng, tokens, n, chunk, chunk, logits, mtp_logits, &e)) {
        printf("forward failed: %s\n", e.msg);
        exit(1);
    }
    if (mtp) {   /* append the MTP rows after the main rows for comparison */
        logits = xrealloc(logits, (size_t)2 * n * V * sizeof(float));
        memcpy(logits + (size_t)n * V, mtp_logits, (size_t)n * V * sizeof(float));
        free(mtp_logits);
    }
    return logits;
}

static double max_row_error(const float *a, const float *b, int rows, int V) {
    double worst = 0;
    for (int r = 0; r < rows; r++) {
        double d = 0, m = 0;
        for (int i = 0; i < V; i++) {
            d = fmax(d, fabs(a[(size_t)r * V + i] - b[(size_t)r * V + i]));
            m = fmax(m, fabs(b[(size_t)r * V + i]));
        }
        worst = fmax(worst, m > 0 ? d / m : d);
    }
    return worst;
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The median over rows of max_i |a - b| / max_i |b|. */
static double median_row_error(const float *a, const float *b, int rows, int V) {
    double *err = xmalloc((size_t)rows * sizeof(double));
    for (int r = 0; r < rows; r++)
        err[r] = max_row_error(a + (size_t)r * V, b + (size_t)r * V, 1, V);
    qsort(err, (size_t)rows, sizeof(double), compare_doubles);
    double median = err[rows / 2];
    free(err);
    return median;
}

static void test_schedules(struct engine *eng, bool mtp) {
    const struct ds4_config *c = &eng->model->cfg;
    int n = 300, V = c->vocab;
    int32_t *tokens = xmalloc((size_t)n * sizeof(int32_t));
    uint64_t s = 7;
    for (int i = 0; i < n; i++) tokens[i] = (int32_t)(splitmix64(&s) % (uint64_t)V);
    float *whole = run_chunks(eng, tokens, n, n, mtp);
    int chunks[] = { 1, 3, 7, c->window - 1, c->window, c->window + 1, 128 };
    int rows = mtp ? 2 * n : n;
    for (size_t i = 0; i < sizeof chunks / sizeof chunks[0]; i++) {
        float *other = run_chunks(eng, tokens, n, chunks[i], mtp);
        char what[128];
        snprintf(what, sizeof what, "%d tokens: chunks of %d == one prefill (%d rows%s)", n,
                 chunks[i], rows, mtp ? " incl. MTP" : "");
        check(what, max_row_error(other, whole, rows, V), 1e-4);
        free(other);
    }
    free(whole);
    free(tokens);
}

/* ---- 8. Fast kernels vs reference on a quantized model ---------------------- */

static void test_fast_vs_reference(const char *path) {
    struct model m;
    struct ds4_error e = { "" };
    if (!model_load(&m, path, NULL, &e)) {
        printf("FAIL cannot load %s: %s\n", path, e.msg);
        tests_failed++;
        return;
    }
    struct engine fast, ref;
    engine_init(&fast, &m, (struct engine_options){ .threads = 0 });
    engine_init(&ref, &m, (struct engine_options){ .reference_kernels = true });
    int n = 64;
    int32_t tokens[64];
    uint64_t s = 99;
    for (int i = 0; i < n; i++) tokens[i] = (int32_t)(splitmix64(&s) % (uint64_t)m.cfg.vocab);
    for (int chunk = 1; chunk <= n; chunk += n - 1) {
        float *a = run_chunks(&fast, tokens, n, chunk, false);
        float *b = run_chunks(&ref, tokens, n, chunk, false);
        char what[160];
        const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
        snprintf(what, sizeof what, "%s: fast == reference kernels (chunk %d)", base, chunk);
        check(what, max_row_error(a, b, n, m.cfg.vocab), 1e-3);
        free(a);
        free(b);
    }
    /* 8-bit activations (3.11, --fast). Rounding the inputs of every product
     * to 8 bits costs about as much as rounding the weights to Q8_0: on the
     * tiny model (random weights, six layers) the logits move by a median of
     * about 5e-2 of the largest logit, the same as q8_0 weights against f16
     * ones, and single rows jump further where a top-k choice flips. So the
     * median row is held to 0.15 (a wrong kernel gives about 1), and the
     * chunked and one-token schedules must still agree exactly. */
    struct engine q8;
    engine_init(&q8, &m, (struct engine_options){ .q8_activations = true });
    float *b = run_chunks(&ref, tokens, n, n, false);
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    /* each integer kernel variant this CPU runs (3.9), the start-up one
     * first; a CPU without any runs the scalar reference once */
    int variants = quant_q8_variant_count();
    for (int v = 0; v < (variants > 0 ? variants : 1); v++) {
        if (variants > 0) quant_q8_use_variant(v);
        const char *variant = variants > 0 ? quant_q8_variant_name(v) : "scalar";
        float *q_whole = run_chunks(&q8, tokens, n, n, false);
        float *q_one = run_chunks(&q8, tokens, n, 1, false);
        char what[160];
        snprintf(what, sizeof what, "%s: 8-bit activations (%s) vs reference, median row", base,
                 variant);
        check(what, median_row_error(q_whole, b, n, m.cfg.vocab), 0.15);
        snprintf(what, sizeof what, "%s: 8-bit activations (%s), chunk 1 == chunk %d", base,
                 variant, n);
        check(what, max_row_error(q_one, q_whole, n, m.cfg.vocab), 1e-4);
        free(q_whole), free(q_one);
    }
    if (variants > 0) quant_q8_use_variant(0);
    free(b);
    engine_free(&q8);
    engine_free(&fast);
    engine_free(&ref);
    model_free(&m);
}

/* ---- 9. Perplexity: chunked windows == token-by-token decode ---------------- */

static void test_perplexity(struct engine *eng) {
    int V = eng->model->cfg.vocab, n = 40, window = 16;
    int32_t tokens[40], buf[16];
    uint64_t s = 5;
    for (int i = 0; i < n; i++) tokens[i] = 3 + (int32_t)(splitmix64(&s) % (uint64_t)(V - 3));
    struct ppl_stats st;
    struct ds4_error e = { "" };
    if (!perplexity_of_tokens(eng, 0, tokens, n, window, 5, &st, &e)) {
        printf("FAIL perplexity_of_tokens: %s\n", e.msg);
        tests_failed++;
        return;
    }
    /* The same windows, one token per call, scored here: nll = logsumexp(row) - row[target]. */
    double nll = 0;
    int64_t scored = 0, rows = 0, agree = 0;
    for (int done = 0; done < n; done += window - 1) {
        int m = n - done < window - 1 ? n - done : window - 1;
        buf[0] = 0;
        memcpy(buf + 1, tokens + done, (size_t)m * sizeof(int32_t));
        float *lg = run_chunks(eng, buf, m + 1, 1, eng->model->has_mtp);
        for (int t = 0; t < m; t++) {
            const float *row = lg + (size_t)t * V;
            double mx = row[0], sum = 0;
            int best = 0, mbest = 0;
            for (int i = 0; i < V; i++) {
                if (row[i] > mx) mx = row[i];
                if (row[i] > row[best]) best = i;
            }
            for (int i = 0; i < V; i++) sum += exp(row[i] - mx);
            nll += log(sum) + mx - row[buf[t + 1]];
            scored++;
            if (eng->model->has_mtp && t >= 1) {
                const float *mr = lg + (size_t)(m + 1 + t) * V;
                for (int i = 0; i < V; i++) if (mr[i] > mr[mbest]) mbest = i;
                rows++;
                agree += mbest == best;
            }
        }
        free(lg);
    }
    char what[128];
    snprintf(what, sizeof what, "perplexity: %d tokens, window %d, chunk 5 == decode (NLL %.3f)",
             n, window, nll);
    check(what, fabs(st.nll - nll) / nll, 1e-5);
    check("perplexity: tokens scored and windows counted",
          (double)llabs(st.scored - scored) + (double)llabs(st.windows - 3), 0);
    check("perplexity: MTP rows and top-1 agreement counted as decode does",
          (double)llabs(st.mtp_rows - rows) + (double)llabs(st.mtp_agree - agree), 0);
}

/* ---- 10. The thread pool: items once, the thread cap, the size rule --------- */

struct pool_probe { int *runs; int *worker; };

static void pool_probe_item(void *ctx, int64_t item, int worker) {
    struct pool_probe *p = ctx;
    volatile double spin = 0;
    for (int i = 0; i < 200; i++) spin += i;     /* enough work that a worker joins */
    __atomic_fetch_add(&p->runs[item], 1, __ATOMIC_RELAXED);
    p->worker[item] = worker;
}

/* Items run != once, and items run by a worker index >= cap, over `n` items. */
static void pool_probe_run(struct thread_pool *pool, int n, int cap, double *wrong, double *over) {
    struct pool_probe p = { calloc((size_t)n, sizeof(int)), calloc((size_t)n, sizeof(int)) };
    parallel_for_threads(pool, n, pool_probe_item, &p, cap);
    for (int i = 0; i < n; i++) {
        *wrong += p.runs[i] != 1;
        *over += p.worker[i] >= cap;
    }
    free(p.runs), free(p.worker);
}

static void test_pool(void) {
    struct thread_pool pool;
    pool_init(&pool, 3);
    double wrong = 0, over_one = 0, over_two = 0;
    for (int rep = 0; rep < 20; rep++) {
        pool_probe_run(&pool, 5000, 1, &wrong, &over_one);
        pool_probe_run(&pool, 5000, 2, &wrong, &over_two);
    }
    check("pool: items not run exactly once (200000 items, caps 1 and 2)", wrong, 0);
    check("pool: items of a 1-thread job run by a worker, not the caller", over_one, 0);
    check("pool (3 threads): items of a 2-thread job run by worker 2", over_two, 0);
    /* let both workers fall asleep (bounded: 2 s) */
    for (int i = 0; i < 2000 && __atomic_load_n(&pool.sleepers, __ATOMIC_SEQ_CST) < 2; i++)
        usleep(1000);
    int small = pool_threads_for_bytes(&pool, 64 << 10);
    int asleep = pool_threads_for_bytes(&pool, POOL_WAKE_BYTES / 2);
    int large = pool_threads_for_bytes(&pool, 64.0 * POOL_WAKE_BYTES);
    printf("     threads for 64 KiB %d, for POOL_WAKE_BYTES/2 with workers asleep %d, for "
           "64x POOL_WAKE_BYTES %d\n", small, asleep, large);
    check("pool: threads for a 64 KiB job, and for a mid-size one while workers sleep, minus 1",
          fabs(small - 1.0) + fabs(asleep - 1.0), 0);
    check("pool: threads for a large job, minus the pool's 3", fabs(large - 3.0), 0);
    pool_free(&pool);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf [MTP.gguf] [QUANTIZED.gguf ...]\n", argv[0]);
        return 2;
    }
    quant_tables_init();
    test_small_floats();
    test_hadamard();
    test_rope();
    test_sinkhorn();
    test_topk();
    test_compressor();
    test_pool();

    struct model m;
    struct ds4_error e = { "" };
    const char *mtp = argc > 2 && strstr(argv[2], "mtp") ? argv[2] : NULL;
    if (!model_load(&m, argv[1], mtp, &e)) {
        printf("FAIL cannot load %s: %s\n", argv[1], e.msg);
        return 1;
    }
    struct engine eng;
    engine_init(&eng, &m, (struct engine_options){ .threads = 0 });
    test_schedules(&eng, m.has_mtp);
    test_perplexity(&eng);
    engine_free(&eng);
    model_free(&m);
    for (int i = mtp ? 3 : 2; i < argc; i++) test_fast_vs_reference(argv[i]);

    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed ? 1 : 0;
}
