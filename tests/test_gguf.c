/* tests/test_gguf.c -- chapter 2 and 4: hostile model files.
 *
 *     tests/bin/test_gguf MODEL.gguf        (built with ASan + UBSan)
 *
 * Model files come from the internet, so the reader must turn every broken
 * file into one clear error line. This test takes a good GGUF and breaks it
 * in the ways files really break -- truncation, flipped bytes, lying counts,
 * wrong shapes and types -- and checks that opening and binding either
 * succeed or fail with a message, never crash (the sanitizers would abort
 * the run), and that the targeted corruptions fail with a message naming
 * the field.
 */
#define DS4_NO_MAIN
#include "../ds4.c"
#define HARNESS_CHECK_DETAIL
#include "harness.h"

static char tmp_path[256];

static void write_bytes(const uint8_t *data, size_t n) {
    FILE *f = fopen(tmp_path, "wb");
    if (!f || fwrite(data, 1, n, f) != n) {
        perror(tmp_path);
        exit(1);
    }
    fclose(f);
}

/* Open and bind the bytes as a model; returns true on success, the message in e. */
static bool try_load(const uint8_t *data, size_t n, struct ds4_error *e) {
    write_bytes(data, n);
    struct model m;
    if (!model_load(&m, tmp_path, NULL, e)) return false;
    model_free(&m);
    return true;
}

static uint64_t rng = 2024;

/* Locate header fields of the good file through the reader itself. */
struct layout {
    uint64_t header_end;        /* where the tensor directory ends */
    uint64_t kv_count_at, tensor_count_at;
    uint64_t first_dim_at;      /* dims[0] of tensor "blk.0.attn_q_a.weight" */
    uint64_t type_at;           /* its type field */
    uint64_t offset_at;         /* its offset field */
    uint64_t key_at;            /* first byte of key "deepseek4.block_count" */
    uint64_t tid2eid_data_at;   /* first id of blk.0.ffn_gate_tid2eid.weight */
};

static struct layout find_layout(const char *path) {
    struct gguf g;
    struct ds4_error e;
    struct layout L = { 0 };
    if (!gguf_open(&g, path, &e)) {
        printf("cannot open %s: %s\n", path, e.msg);
        exit(1);
    }
    L.tensor_count_at = 8;
    L.kv_count_at = 16;
    L.header_end = g.data_offset;
    const struct gguf_tensor *t = gguf_find_tensor(&g, "blk.0.attn_q_a.weight");
    const struct gguf_kv *kv = gguf_find_kv(&g, "deepseek4.block_count");
    const struct gguf_tensor *hash = gguf_find_tensor(&g, "blk.0.ffn_gate_tid2eid.weight");
    if (!t || !kv || !hash) {
        printf("test model lacks expected names\n");
        exit(1);
    }
    uint64_t name_at = (uint64_t)((const uint8_t *)t->name - g.map);
    L.first_dim_at = name_at + t->name_len + 4;
    L.type_at = L.first_dim_at + 8 * t->n_dims;
    L.offset_at = L.type_at + 4;
    L.key_at = (uint64_t)((const uint8_t *)kv->key - g.map);
    L.tid2eid_data_at = (uint64_t)(hash->data - g.map);
    gguf_close(&g);
    return L;
}

static void put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* One targeted corruption: apply, load, expect failure mentioning `needle`. */
static void expect_error(const uint8_t *good, size_t n, const char *what,
                         void (*mutate)(uint8_t *, const struct layout *), const struct layout *L,
                         const char *needle) {
    uint8_t *bad = xmalloc(n);
    memcpy(bad, good, n);
    mutate(bad, L);
    struct ds4_error e = { "" };
    bool loaded = try_load(bad, n, &e);
    bool ok = !loaded && strstr(e.msg, needle) != NULL;
    check(ok, what, loaded ? "(loaded!)" : e.msg);
    free(bad);
}

static void bad_magic(uint8_t *b, const struct layout *L) { (void)L; b[0] = 'X'; }
static void bad_version(uint8_t *b, const struct layout *L) { (void)L; put_u32(b + 4, 2); }
static void huge_tensor_count(uint8_t *b, const struct layout *L) { put_u64(b + L->tensor_count_at, 1ull << 60); }
static void huge_kv_count(uint8_t *b, const struct layout *L) { put_u64(b + L->kv_count_at, 1ull << 62); }
static void absurd_dim(uint8_t *b, const struct layout *L) { put_u64(b + L->first_dim_at, 1ull << 50); }
static void wrong_dim(uint8_t *b, const struct layout *L) { put_u64(b + L->first_dim_at, 512); }
static void unknown_type(uint8_t *b, const struct layout *L) { put_u32(b + L->type_at, 77); }
static void far_offset(uint8_t *b, const struct layout *L) { put_u64(b + L->offset_at, 1ull << 40); }
static void misaligned(uint8_t *b, const struct layout *L) { put_u64(b + L->offset_at, 3); }
static void renamed_key(uint8_t *b, const struct layout *L) { b[L->key_at + 10] ^= 0x20; }
static void bad_expert_id(uint8_t *b, const struct layout *L) { put_u32(b + L->tid2eid_data_at, 99); }

/* A real-valued hyper-parameter set to a value the forward pass cannot use
 * (NaN, infinity, zero, negative) must stop the load with the key's name. */
static void expect_bad_value(const uint8_t *good, size_t n, const char *path, const char *key, double v) {
    struct gguf g;
    struct ds4_error e = { "" };
    if (!gguf_open(&g, path, &e)) { check(false, key, e.msg); return; }
    const struct gguf_kv *kv = gguf_find_kv(&g, key);
    uint64_t at = kv ? (uint64_t)(kv->value - g.map) : 0;
    uint32_t type = kv ? kv->type : 0;
    gguf_close(&g);
    if (!kv || (type != GGUF_F32 && type != GGUF_F64)) {
        check(false, key, "not a float key in the test model");
        return;
    }
    uint8_t *bad = xmalloc(n);
    memcpy(bad, good, n);
    if (type == GGUF_F32) { float f = (float)v; memcpy(bad + at, &f, 4); }
    else memcpy(bad + at, &v, 8);
    bool loaded = try_load(bad, n, &e);
    char what[160];
    snprintf(what, sizeof what, "%s = %g refused", key + 10, v);
    check(!loaded && strstr(e.msg, key) != NULL, what, loaded ? "(loaded!)" : e.msg);
    free(bad);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL.gguf\n", argv[0]);
        return 2;
    }
    snprintf(tmp_path, sizeof tmp_path, "/tmp/ds4-test-gguf-%d.gguf", (int)getpid());
    size_t n;
    struct ds4_error e = { "" };
    uint8_t *good = (uint8_t *)read_file(argv[1], &n, &e);
    if (!good) {
        printf("%s\n", e.msg);
        return 1;
    }
    struct layout L = find_layout(argv[1]);
    check(try_load(good, n, &e), "the untouched model loads", e.msg);

    /* Truncation anywhere must fail: the last tensor ends at the end of file. */
    int trunc_ok = 0, trunc_total = 0;
    size_t header_step = L.header_end / 1500 + 1, data_step = n / 40 + 1;
    for (size_t len = 0; len < n; len += len < L.header_end ? header_step : data_step) {
        trunc_total++;
        e.msg[0] = 0;
        trunc_ok += !try_load(good, len, &e) && e.msg[0];
    }
    char detail[128];
    snprintf(detail, sizeof detail, "%d/%d truncations rejected with a message", trunc_ok, trunc_total);
    check(trunc_ok == trunc_total, "truncated files fail cleanly", detail);

    /* Random byte flips in the header: any outcome but a crash is fine. */
    uint8_t *fuzz = xmalloc(n);
    int rejected = 0, trials = 300;
    for (int i = 0; i < trials; i++) {
        memcpy(fuzz, good, n);
        int flips = 1 + (int)(splitmix64(&rng) % 4);
        for (int f = 0; f < flips; f++) fuzz[splitmix64(&rng) % L.header_end] ^= (uint8_t)(1 + splitmix64(&rng) % 255);
        rejected += !try_load(fuzz, n, &e);
    }
    free(fuzz);
    snprintf(detail, sizeof detail, "%d/%d mutants rejected, none crashed", rejected, trials);
    check(true, "random header corruption never crashes", detail);

    expect_error(good, n, "wrong magic", bad_magic, &L, "not a GGUF file");
    expect_error(good, n, "unsupported version", bad_version, &L, "version 2");
    expect_error(good, n, "absurd tensor count", huge_tensor_count, &L, "tensor count");
    expect_error(good, n, "absurd metadata count", huge_kv_count, &L, "metadata count");
    expect_error(good, n, "absurd dimension", absurd_dim, &L, "absurd dimension");
    expect_error(good, n, "shape that disagrees with the metadata", wrong_dim, &L, "blk.0.attn_q_a.weight");
    expect_error(good, n, "unknown tensor type", unknown_type, &L, "unsupported type");
    expect_error(good, n, "tensor data past the end of file", far_offset, &L, "past the end");
    expect_error(good, n, "misaligned tensor data", misaligned, &L, "aligned");
    expect_error(good, n, "missing metadata key", renamed_key, &L, "deepseek4.block_count");
    expect_error(good, n, "hash table naming a nonexistent expert", bad_expert_id, &L, "tid2eid");

    static const char *const real_keys[] = {
        "deepseek4.attention.layer_norm_rms_epsilon", "deepseek4.rope.freq_base",
        "deepseek4.expert_weights_scale", "deepseek4.rope.scaling.factor",
    };
    for (size_t k = 0; k < sizeof real_keys / sizeof real_keys[0]; k++) {
        expect_bad_value(good, n, argv[1], real_keys[k], NAN);
        expect_bad_value(good, n, argv[1], real_keys[k], INFINITY);
        expect_bad_value(good, n, argv[1], real_keys[k], 0.0);
        expect_bad_value(good, n, argv[1], real_keys[k], -1.0);
    }

    /* Non-finite logits stop generation with an error, never a token. */
    struct model m;
    if (model_load(&m, argv[1], NULL, &e)) {
        struct engine eng;
        struct session s;
        struct sampler sp;
        struct generator g;
        engine_init(&eng, &m, (struct engine_options){ .threads = 0 });
        session_init(&s, &eng);
        sampler_init(&sp, (struct sampler_options){ .temperature = 0 }, m.cfg.vocab);
        generator_init(&g, &s, &sp, (struct spec_options){ 0 });
        int32_t prompt[3] = { 1, 2, 3 }, out[MATMUL_DECODE_PATH_MAX_TOKENS];
        bool fed = session_feed(&s, prompt, 3, 64, &e);
        int got_good = fed ? generator_step(&g, out, &e) : -1;
        s.logits[7] = NAN;
        e.msg[0] = 0;
        int got_nan = generator_step(&g, out, &e);
        char nan_detail[400];
        snprintf(nan_detail, sizeof nan_detail, "finite: %d token(s); NaN: %d (%s)", got_good, got_nan, e.msg);
        check(got_good == 1 && got_nan < 0 && strstr(e.msg, "not finite"), "NaN logits: an error, no token",
              nan_detail);
        generator_free(&g);
        sampler_free(&sp);
        session_free(&s);
        engine_free(&eng);
        model_free(&m);
    }

    unlink(tmp_path);
    free(good);
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed ? 1 : 0;
}
