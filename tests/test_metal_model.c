/* tests/test_metal_model.c -- the whole tiny model through the GPU backend
 * (ds4.c 6.14), its kernels run by the Metal-on-CPU harness.
 *
 *     cc -DDS4_GPU tests/test_metal_model.c tests/bin/metal_harness.o -lstdc++ ...
 *     tests/bin/test_metal_model vectors/tiny.gguf vectors/tiny-mtp.gguf vectors/vectors.json \
 *         [tests/bin/tiny-q2.gguf ...]
 *
 * 1. The GPU backend against the CPU backend on one 70-token prompt, prefill
 *    then decode: every position's logits (and MTP logits), relative row
 *    error. 70 tokens reach the compressed rows of both ratio-4 and the
 *    indexer's top-k (17 rows visible > 8). Then one decode token's kernel
 *    order, and 24 tokens of each quantized model given after vectors.json.
 * 2. --check-vectors on a few cases of vectors/vectors.json (both schedules),
 *    with the backend set to the GPU one: the oracle's own bars.
 * Prints "N passed, N failed".
 */
#define DS4_NO_MAIN
#define DS4_GPU
#include "../ds4.c"

void gpu_trace_start(const char **names, int cap);
int gpu_trace_stop(int *syncs);

#define HARNESS_CHECK_TOL
#include "harness.h"
#include "forward_runs.h"

/* max over rows of |a - b| / max |b|, a row = V logits. */
static double row_err(const float *a, const float *b, int rows, int V) {
    double worst = 0;
    for (int r = 0; r < rows; r++) {
        double d = 0, scale = 1e-6;
        for (int i = 0; i < V; i++) {
            scale = fmax(scale, fabs(b[(size_t)r * V + i]));
            double x = fabs((double)a[(size_t)r * V + i] - b[(size_t)r * V + i]);
            if (!(x <= d)) d = x;
        }
        if (!(d / scale <= worst)) worst = d / scale;
    }
    return worst;
}

static void test_against_cpu(struct model *m, const char *label, int N, int FIRST) {
    int V = m->cfg.vocab;
    int32_t tokens[128];
    for (int i = 0; i < N; i++) tokens[i] = (i * 131 + 7) % V;
    float *cpu = xcalloc((size_t)N * V, sizeof(float)), *gpu = xcalloc((size_t)N * V, 4);
    float *cpu_mtp = xcalloc((size_t)N * V, 4), *gpu_mtp = xcalloc((size_t)N * V, 4);
    run_prompt_logits(m, (struct engine_options){ .threads = 1, .backend = backend_cpu() },
                      tokens, N, FIRST, cpu, cpu_mtp);
    run_prompt_logits(m, (struct engine_options){ .threads = 1, .backend = &gpu_backend },
                      tokens, N, FIRST, gpu, gpu_mtp);
    char what[128];
    snprintf(what, sizeof what, "%s, %d tokens (prefill %d + decode): logits, gpu vs cpu", label,
             N, FIRST);
    check(what, row_err(gpu, cpu, N, V), 1e-4);
    int argmax_diff = 0;
    for (int r = 0; r < N; r++)
        argmax_diff += argmax(gpu + (size_t)r * V, V) != argmax(cpu + (size_t)r * V, V);
    snprintf(what, sizeof what, "%s: positions whose argmax differs", label);
    check(what, argmax_diff, 0);
    if (m->has_mtp) {  /* row 0 of the first chunk has no MTP row */
        snprintf(what, sizeof what, "%s: MTP logits, gpu vs cpu", label);
        check(what, row_err(gpu_mtp + V, cpu_mtp + V, N - 1, V), 1e-4);
    }
    free(cpu), free(gpu), free(cpu_mtp), free(gpu_mtp);
}

/* The kernel order of one decode token (position 43: a ratio-4 window
 * completes, 11 compressed rows are visible so the indexer selects 8). Prints
 * the first block's dispatches in order and every kernel's count; checks
 * that each kernel of the decode path ran. */
static void test_decode_trace(struct model *m) {
    enum { P = 43, CAP = 4096 };
    struct engine_options opt = { .threads = 1, .backend = &gpu_backend };
    struct engine eng;
    engine_init(&eng, m, opt);
    struct session s;
    session_init(&s, &eng);
    int32_t tokens[P + 1];
    for (int i = 0; i <= P; i++) tokens[i] = (i * 131 + 7) % m->cfg.vocab;
    struct ds4_error e = { "" };
    static const char *names[CAP];
    int syncs = 0, n = 0;
    int profiled = 0;
    if (session_forward(&s, tokens, P, NULL, &e)) {
        gpu_trace_start(names, CAP);
        gpu_profile_begin();
        session_forward(&s, tokens + P, 1, NULL, &e);
        n = gpu_trace_stop(&syncs);
        profiled = gpu_profile_end(1);
    }
    /* --bench --profile times every launch (CUDA; the Metal harness has no clock). */
    if (profiled >= 0) check("--profile: dispatches timed == dispatches traced", profiled - n, 0);
    printf("one decode token (position %d, %d layers + MTP): %d dispatches, %d host syncs\n",
           P, m->cfg.n_layers, n, syncs);
    printf("  embedding + block 0:");
    for (int i = 0, posts = 0; i < n && i < CAP && posts < 2; i++) {
        printf("%s %s", i % 6 == 0 ? "\n   " : "", names[i]);
        posts += strcmp(names[i], "hc_post") == 0;
    }
    printf("\n");
    const char *expect[] = { "embed_tokens", "add_rows", "matmul_f16", "hc_pre", "rmsnorm",
                             "rope_tail", "fp8_round_trip_nope", "pool_channel",
                             "indexer_round_trip", "indexer_scores", "topk_rows", "attend_one",
                             "hc_post", "route_token", "swiglu", "moe_gather_add",
                             "hc_head_collapse" };
    int missing = 0;
    for (size_t k = 0; k < sizeof expect / sizeof expect[0]; k++) {
        int count = 0;
        for (int i = 0; i < n && i < CAP; i++) count += strcmp(names[i], expect[k]) == 0;
        printf("  %-22s x%d\n", expect[k], count);
        missing += count == 0;
    }
    check("decode trace: kernels of the decode path that never ran", missing, 0);
    session_free(&s);
    engine_free(&eng);
}

/* A vectors file holding only the named cases (the others would take
 * minutes under emulation). */
static bool write_subset(const char *from, const char *to, const char *const *names, int n) {
    struct ds4_error e = { "" };
    size_t len;
    char *text = read_file(from, &len, &e), jerr[256];
    struct json *doc = text ? json_parse(text, len, 64, jerr, sizeof jerr) : NULL;
    const struct json *cases = doc ? json_get(doc, "cases") : NULL;
    if (!cases || !json_is(cases, JSON_ARRAY)) return false;
    struct strbuf b = { 0 };
    strbuf_puts(&b, "{\"cases\":[");
    int written = 0;
    for (size_t i = 0; i < cases->count; i++) {
        const char *name = json_str(&cases->items[i], "name");
        for (int k = 0; k < n; k++)
            if (name && strcmp(name, names[k]) == 0) {
                if (written++) strbuf_puts(&b, ",");
                json_write(&b, &cases->items[i]);
            }
    }
    strbuf_puts(&b, "]}");
    FILE *f = fopen(to, "w");
    bool ok = f && fwrite(b.data, 1, b.len, f) == b.len && written == n;
    if (f) fclose(f);
    strbuf_free(&b);
    json_free(doc);
    free(text);
    return ok;
}

int main(int argc, char **argv) {
    /* --short: 44 tokens instead of 70 (the indexer still selects from
     * position 35 on) and two vector cases, for a second backend's run. */
    bool short_run = argc > 1 && strcmp(argv[1], "--short") == 0;
    if (short_run) argc--, argv++;
    if (argc < 4) {
        fprintf(stderr, "usage: %s [--short] tiny.gguf tiny-mtp.gguf vectors.json "
                "[QUANT.gguf...]\n", argv[0]);
        return 2;
    }
    struct model m;
    struct ds4_error e = { "" };
    if (!model_load(&m, argv[1], argv[2], &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    test_against_cpu(&m, "f16 + MTP", short_run ? 44 : 70, short_run ? 23 : 41);
    test_decode_trace(&m);
    const char *names[] = { "len1_prefill1", "len3_prefill3", "len17_prefill17" };
    int n_names = short_run ? 2 : 3;
    char path[] = "/tmp/ds4-metal-vectors-XXXXXX";
    int fd = mkstemp(path);
    if (fd >= 0) close(fd);
    bool subset = fd >= 0 && write_subset(argv[3], path, names, n_names);
    if (!subset) {
        printf("FAIL could not write the vector subset\n");
        tests_failed++;
    } else {
        struct engine_options opt = { .threads = 1, .backend = &gpu_backend };
        struct engine eng;
        engine_init(&eng, &m, opt);
        printf("--check-vectors through the emulated GPU backend:\n");
        int rc = check_vectors(&eng, path);
        check(short_run ? "check-vectors (2 cases x 2 schedules) on the gpu backend"
                        : "check-vectors (3 cases x 2 schedules) on the gpu backend", rc, 0);
        engine_free(&eng);
    }
    if (fd >= 0) unlink(path);
    model_free(&m);
    /* The quantized conversions (Q8_0 attention, Q2_K / IQ2_XXS / Q4_K experts):
     * the other matmul kernels inside the model. */
    for (int i = 4; i < argc; i++) {
        if (!model_load(&m, argv[i], NULL, &e)) {
            printf("FAIL %s: %s\n", argv[i], e.msg);
            tests_failed++;
            continue;
        }
        const char *base = strrchr(argv[i], '/');
        test_against_cpu(&m, base ? base + 1 : argv[i], 24, 13);
        model_free(&m);
    }
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed ? 1 : 0;
}
