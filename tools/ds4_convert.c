/* ds4_convert.c -- DeepSeek V4 checkpoint (safetensors) -> ds4 GGUF.
 *
 * This tool turns the official DeepSeek V4 Flash checkpoint, or any smaller
 * checkpoint with the same structure and the same tensor names, into the two
 * GGUF files that ds4 loads:
 *
 *   - the main file: embedding, every transformer block, the output head;
 *   - the MTP file (optional): the one multi-token-prediction block.
 *
 * It writes the PUBLISHED layout -- metadata keys `deepseek4.*`, tensor
 * names `blk.N.attn_q_a.weight` and friends, stacked routed experts, the
 * published tensor types -- so a file made here and a file downloaded from
 * the ds4 release are interchangeable as far as the engine can tell. What it
 * deliberately is not:
 *
 *   - not a general GGUF tool: it knows one model family and refuses
 *     anything it does not recognise;
 *   - not a tokenizer converter: it does not read tokenizer.json. With
 *     `--vocab VOCAB.gguf` it copies the `tokenizer.*` keys, byte for byte,
 *     from a GGUF that already has them (vectors/ds4-vocab.gguf for the real
 *     model, vectors/tiny-vocab.gguf for the tiny one); without it the
 *     output has no tokenizer and the engine runs on token ids only;
 *   - not an imatrix quantizer: quantization goes through `quantize_row()`
 *     of ds4.c, row by row, with whatever importance heuristic it uses.
 *
 * It can also write a random model of the FULL published width with any
 * number of layers (`--synthetic full`), for memory and speed tests of the
 * engine without downloading 80 GB.
 *
 * Usage:
 *
 *   ds4-convert SRC_DIR OUT.gguf [--mtp OUT_MTP.gguf] [--type f16|q8_0|q2|q4]
 *               [--vocab VOCAB.gguf]
 *   ds4-convert --synthetic full --layers N OUT.gguf [--type q2|q4|q8_0|f16]
 *               [--seed S] [--vocab VOCAB.gguf]
 *
 * Reading order: 1 conventions and errors, 2 the number formats of the
 * checkpoint, 3 a small JSON reader, 4 the configuration, 5 safetensors,
 * 6 the GGUF writer (6.2: copying the tokenizer), 7 the tensor plan (names,
 * shapes, types), 8 real conversion, 9 synthetic models, 10 the command line.
 *
 * References:
 *   [FMT]  docs/gguf-layout.md §1 (published GGUF layout) and §2
 *          (quant blocks).
 *   [FWD]  docs/forward.md §1 (configuration) and §10 (the FP8/FP4
 *          checkpoint formats).
 *   [ST]   the safetensors format: u64 header length, JSON header, bytes.
 *   [OFP8] OCP 8-bit floating point spec (E4M3 "fn" variant, E8M0 scales).
 *   [MX]   OCP microscaling formats spec (FP4 E2M1 with E8M0 block scales).
 */

/* ---- Building on the engine ---------------------------------------------
 * The quantizers, the f16/bf16 helpers and the GGUF reader come from ds4.c,
 * which is included whole with its main() switched off. */
#define DS4_NO_MAIN
#pragma GCC diagnostic push        /* the engine's functions we do not call */
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../ds4.c"
#pragma GCC diagnostic pop

#include <stdarg.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <signal.h>
#include <limits.h>
#include <time.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>

/* ===========================================================================
 * 1. Conventions and errors
 * ===========================================================================
 *
 * Every function that can meet bad input returns false and leaves one line in
 * `convert_errmsg`, naming the file, tensor or field and what was expected.
 * Nothing below calls exit(); main() prints the line and exits with status 1,
 * and the tests call the same functions and look at the return value. The
 * only exception is running out of memory, which has no useful recovery.
 *
 * Shapes. The checkpoint stores a matrix PyTorch-style, `[out][in]`. GGUF
 * lists dimensions fastest first, so the same bytes are `[in, out]` there
 * (ne0 = in = row length). Both are written the way their format writes
 * them, and a comment says which one is meant.
 */

static char convert_errmsg[1024];

static bool convert_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static bool convert_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(convert_errmsg, sizeof convert_errmsg, fmt, ap);
    va_end(ap);
    return false;
}

/* Zeroed memory, or a clean exit: ds4.c's xcalloc (chapter 1). */
static void *convert_zalloc(size_t n) { return xcalloc(1, n); }

static char *convert_strdup(const char *s, size_t n) {
    char *p = convert_zalloc(n + 1);
    memcpy(p, s, n);
    return p;
}

static double convert_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ===========================================================================
 * 2. The number formats of the official checkpoint
 * ===========================================================================
 *
 * DeepSeek ships V4 Flash in three storage formats [FWD §10]:
 *
 *   - bf16 / fp32 for norms, the hyper-connection matrices, the router, the
 *     compressors and the embedding;
 *   - FP8 E4M3 for dense linears, with one E8M0 scale per 128x128 tile
 *     (Flash-Base uses fp32 scales instead);
 *   - FP4 E2M1 for routed experts, two values per byte, with one E8M0 scale
 *     per 32 consecutive inputs of a row ("MXFP4").
 *
 * E4M3 ("fn": finite, no infinities), one byte:
 *
 *     bit   7     6 5 4 3    2 1 0
 *           sign  exponent   mantissa        bias 7
 *
 *     e == 0:            value = m * 2^-9                (subnormal)
 *     e == 15, m == 7:   NaN                             (0x7F and 0xFF)
 *     otherwise:         value = (1 + m/8) * 2^(e-7) = (8 + m) * 2^(e-10)
 *
 *   worked bytes: 0x01 = 2^-9, 0x08 = 2^-6, 0x38 = 1.0, 0x7E = 448 (the
 *   largest finite value), 0xB8 = -1.0.
 *
 * E2M1, one nibble: bit 3 is the sign, bits 2..0 index the eight magnitudes
 * {0, 0.5, 1, 1.5, 2, 3, 4, 6}. In a packed byte the LOW nibble holds the
 * even column 2k and the high nibble column 2k+1.
 *
 * E8M0, one byte: a bare exponent, value = 2^(byte - 127); 0xFF is NaN.
 */

static float convert_e4m3_to_f32(uint8_t b) {
    int exponent = (b >> 3) & 15, mantissa = b & 7;
    if (exponent == 15 && mantissa == 7) return NAN;
    float v = exponent == 0 ? ldexpf((float)mantissa, -9)
                            : ldexpf((float)(8 + mantissa), exponent - 10);
    return (b & 0x80) ? -v : v;
}

static float convert_e2m1_to_f32(uint8_t nibble) {
    static const float magnitude[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    float v = magnitude[nibble & 7];
    return (nibble & 8) ? -v : v;
}

static float convert_e8m0_to_f32(uint8_t b) {
    if (b == 0xFF) return NAN;
    return ldexpf(1.0f, (int)b - 127);
}

static uint16_t convert_load_u16(const uint8_t *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t convert_load_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t convert_load_u64(const uint8_t *p) {
    return (uint64_t)convert_load_u32(p) | (uint64_t)convert_load_u32(p + 4) << 32;
}

static float convert_load_f32(const uint8_t *p) {
    uint32_t bits = convert_load_u32(p);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* ===========================================================================
 * 3. A small JSON reader
 * ===========================================================================
 *
 * Three JSON documents matter here: config.json, the safetensors index, and
 * the header of every shard. They are small (a shard header of the real
 * model is about a megabyte), so the reader is the simplest thing that is
 * still strict: a recursive-descent pass that checks the grammar and records
 * a flat array of tokens, in document order:
 *
 *     {"a": [1, 2], "b": "x"}
 *
 *     index  type    span  text
 *     0      object  7
 *     1      string  1     a
 *     2      array   3
 *     3      number  1     1
 *     4      number  1     2
 *     5      string  1     b
 *     6      string  1     x
 *
 * `span` counts a token and everything inside it, so the next sibling of
 * token i is token i + span. An object's children alternate key, value.
 * Strings keep their raw text between the quotes: tensor names and config
 * keys never contain escapes, and a comparison against a name with an
 * escape in it simply fails, which is the safe outcome.
 */

enum {
    CONVERT_JSON_NULL, CONVERT_JSON_BOOL, CONVERT_JSON_NUMBER,
    CONVERT_JSON_STRING, CONVERT_JSON_ARRAY, CONVERT_JSON_OBJECT
};

#define CONVERT_JSON_MAX_DEPTH 64

struct convert_json_tok {
    int type;
    uint32_t span;            /* this token plus all its descendants */
    const char *text;         /* strings: inside the quotes; numbers: digits */
    uint32_t len;
};

struct convert_json {
    struct convert_json_tok *tok;
    uint32_t n, cap;
    const char *p, *end;      /* parse position and end of input */
    const char *what;         /* file name, for error messages */
    const char *start;
};

static void convert_json_free(struct convert_json *j) {
    free(j->tok);
    memset(j, 0, sizeof *j);
}

static bool convert_json_error(struct convert_json *j, const char *problem) {
    return convert_fail("%s: bad JSON at byte %ld: %s", j->what, (long)(j->p - j->start),
                        problem);
}

static uint32_t convert_json_push(struct convert_json *j, int type, const char *text,
                                  size_t len) {
    if (j->n == j->cap) {
        j->cap = j->cap ? j->cap * 2 : 256;
        j->tok = xrealloc(j->tok, j->cap * sizeof *j->tok);
    }
    j->tok[j->n] = (struct convert_json_tok){type, 1, text, (uint32_t)len};
    return j->n++;
}

static void convert_json_space(struct convert_json *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

/* A string: validates escapes and rejects raw control characters. */
static bool convert_json_string(struct convert_json *j) {
    const char *s = ++j->p;
    while (j->p < j->end && *j->p != '"') {
        unsigned char c = (unsigned char)*j->p;
        if (c < 0x20) return convert_json_error(j, "control character in string");
        if (c == '\\') {
            if (j->end - j->p < 2) break;
            char e = j->p[1];
            if (e == 'u') {
                if (j->end - j->p < 6) break;
                for (int k = 2; k < 6; k++)
                    if (!strchr("0123456789abcdefABCDEF", j->p[k]) || !j->p[k])
                        return convert_json_error(j, "bad \\u escape");
                j->p += 6;
                continue;
            }
            if (!e || !strchr("\"\\/bfnrt", e)) return convert_json_error(j, "bad escape");
            j->p += 2;
            continue;
        }
        j->p++;
    }
    if (j->p >= j->end) return convert_json_error(j, "unterminated string");
    convert_json_push(j, CONVERT_JSON_STRING, s, (size_t)(j->p - s));
    j->p++;
    return true;
}

/* A number, by the JSON grammar:  -? int frac? exp?  */
static bool convert_json_number(struct convert_json *j) {
    const char *s = j->p;
    if (j->p < j->end && *j->p == '-') j->p++;
    const char *digits = j->p;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    if (j->p == digits) return convert_json_error(j, "expected a value");
    if (j->p < j->end && *j->p == '.') {
        const char *frac = ++j->p;
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
        if (j->p == frac) return convert_json_error(j, "digit expected after '.'");
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-')) j->p++;
        const char *exp = j->p;
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
        if (j->p == exp) return convert_json_error(j, "digit expected in exponent");
    }
    convert_json_push(j, CONVERT_JSON_NUMBER, s, (size_t)(j->p - s));
    return true;
}

static bool convert_json_literal(struct convert_json *j) {
    static const char *words[3] = {"null", "true", "false"};
    for (int w = 0; w < 3; w++) {
        size_t n = strlen(words[w]);
        if ((size_t)(j->end - j->p) >= n && memcmp(j->p, words[w], n) == 0) {
            convert_json_push(j, w == 0 ? CONVERT_JSON_NULL : CONVERT_JSON_BOOL, j->p, n);
            j->p += n;
            return true;
        }
    }
    return convert_json_number(j);
}

static bool convert_json_value(struct convert_json *j, int depth);

/* An array or an object: elements separated by commas, keys for objects. */
static bool convert_json_container(struct convert_json *j, int depth) {
    bool object = *j->p == '{';
    char close = object ? '}' : ']';
    uint32_t me = convert_json_push(j, object ? CONVERT_JSON_OBJECT : CONVERT_JSON_ARRAY,
                                    j->p, 0);
    j->p++;
    convert_json_space(j);
    if (j->p < j->end && *j->p == close) {
        j->p++;
        return true;
    }
    for (;;) {
        convert_json_space(j);
        if (object) {
            if (j->p >= j->end || *j->p != '"') return convert_json_error(j, "key expected");
            if (!convert_json_string(j)) return false;
            convert_json_space(j);
            if (j->p >= j->end || *j->p != ':') return convert_json_error(j, "':' expected");
            j->p++;
        }
        if (!convert_json_value(j, depth + 1)) return false;
        convert_json_space(j);
        if (j->p < j->end && *j->p == ',') { j->p++; continue; }
        if (j->p < j->end && *j->p == close) { j->p++; break; }
        return convert_json_error(j, object ? "',' or '}' expected" : "',' or ']' expected");
    }
    j->tok[me].span = j->n - me;
    return true;
}

static bool convert_json_value(struct convert_json *j, int depth) {
    if (depth > CONVERT_JSON_MAX_DEPTH) return convert_json_error(j, "nested too deeply");
    convert_json_space(j);
    if (j->p >= j->end) return convert_json_error(j, "unexpected end of input");
    if (*j->p == '{' || *j->p == '[') return convert_json_container(j, depth);
    if (*j->p == '"') return convert_json_string(j);
    return convert_json_literal(j);
}

/* Parse `len` bytes at `text`; the whole input must be one value. */
static bool convert_json_parse(struct convert_json *j, const char *text, size_t len,
                               const char *what) {
    memset(j, 0, sizeof *j);
    j->p = j->start = text;
    j->end = text + len;
    j->what = what;
    if (!convert_json_value(j, 0)) {
        convert_json_free(j);
        return false;
    }
    convert_json_space(j);
    if (j->p != j->end) {
        convert_json_error(j, "trailing characters after the document");
        convert_json_free(j);
        return false;
    }
    return true;
}

/* Index of the value stored under `key` in object `obj`, or -1. */
static int convert_json_get(const struct convert_json *j, int obj, const char *key) {
    if (obj < 0 || j->tok[obj].type != CONVERT_JSON_OBJECT) return -1;
    size_t klen = strlen(key);
    uint32_t end = (uint32_t)obj + j->tok[obj].span;
    for (uint32_t i = (uint32_t)obj + 1; i < end; ) {
        uint32_t v = i + 1;
        if (j->tok[i].len == klen && memcmp(j->tok[i].text, key, klen) == 0) return (int)v;
        i = v + j->tok[v].span;
    }
    return -1;
}

/* Number of direct children (object: key/value pairs count as two). */
static uint32_t convert_json_count(const struct convert_json *j, int node) {
    uint32_t n = 0, end = (uint32_t)node + j->tok[node].span;
    for (uint32_t i = (uint32_t)node + 1; i < end; i += j->tok[i].span) n++;
    return n;
}

/* The k-th direct child of an array. */
static int convert_json_item(const struct convert_json *j, int arr, uint32_t k) {
    uint32_t end = (uint32_t)arr + j->tok[arr].span, n = 0;
    for (uint32_t i = (uint32_t)arr + 1; i < end; i += j->tok[i].span)
        if (n++ == k) return (int)i;
    return -1;
}

static bool convert_json_double(const struct convert_json *j, int node, double *out) {
    char buf[64];
    if (node < 0 || j->tok[node].type != CONVERT_JSON_NUMBER || j->tok[node].len >= sizeof buf)
        return false;
    memcpy(buf, j->tok[node].text, j->tok[node].len);
    buf[j->tok[node].len] = 0;
    *out = strtod(buf, NULL);
    return isfinite(*out);
}

/* An integer: a number token that is exactly an integer (1, 1.0 and 1e3 are
 * all accepted; 1.5 is not), within +-2^53 so a double holds it exactly. */
static bool convert_json_int(const struct convert_json *j, int node, int64_t *out) {
    double d;
    if (!convert_json_double(j, node, &d) || d != floor(d) || fabs(d) > 9007199254740992.0)
        return false;
    *out = (int64_t)d;
    return true;
}

static bool convert_json_is_string(const struct convert_json *j, int node, const char *s) {
    return node >= 0 && j->tok[node].type == CONVERT_JSON_STRING &&
           j->tok[node].len == strlen(s) && memcmp(j->tok[node].text, s, j->tok[node].len) == 0;
}

/* Read a whole small file (config, index). Refuses files over `limit`. */
static char *convert_read_small_file(const char *path, size_t limit, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        convert_fail("cannot open %s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || st.st_size < 0 || (uint64_t)st.st_size > limit) {
        fclose(f);
        convert_fail("%s: not a regular file of at most %zu bytes", path, limit);
        return NULL;
    }
    char *buf = convert_zalloc((size_t)st.st_size + 1);
    size_t n = fread(buf, 1, (size_t)st.st_size, f);
    bool bad = ferror(f) || n != (size_t)st.st_size;
    fclose(f);
    if (bad) {
        free(buf);
        convert_fail("error reading %s", path);
        return NULL;
    }
    *len = n;
    return buf;
}

/* ===========================================================================
 * 4. The configuration
 * ===========================================================================
 *
 * config.json uses the field names of DeepSeek's own inference code. Every
 * shape the GGUF needs is read from it -- nothing is assumed to be the Flash
 * value -- and checked against a sane range, so a typo cannot make us try
 * to allocate a petabyte. The symbols are those of [FWD §1]:
 *
 *   D dim   L n_layers   H n_heads   Dh head_dim   R rope_head_dim
 *   Q q_lora_rank   G o_groups   O o_lora_rank   E n_routed_experts
 *   K n_activated_experts   F moe_inter_dim   NH n_hash_layers
 *   n hc_mult (so the mix width is M = (2 + n) * n)
 *
 * `compress_ratios` has one entry per main layer and, in the official
 * files, one more for the MTP block (which is 0: a window-only layer).
 */

#define CONVERT_MAX_LAYERS 256

struct convert_config {
    int64_t dim, n_layers, n_heads, head_dim, rope_dim;
    int64_t q_lora, o_groups, o_lora;
    int64_t n_experts, n_used, n_shared, ffn, n_hash;
    int64_t window, idx_heads, idx_dim, idx_topk;
    int64_t hc, hc_iters, vocab;
    int64_t original_seq_len, context_length;
    int64_t n_ratios, ratios[CONVERT_MAX_LAYERS + 1];   /* main layers, then MTP */
    double hc_eps, norm_eps, rope_theta, compress_rope_theta, rope_factor;
    double beta_fast, beta_slow, route_scale, swiglu_limit;
    bool weights_norm;          /* renormalise the top-k weights (not for softmax) */
};

struct convert_int_field { const char *key; size_t offset; int64_t lo, hi; };
struct convert_num_field { const char *key; size_t offset; double lo, hi; };

static const struct convert_int_field convert_int_fields[] = {
    {"dim",                 offsetof(struct convert_config, dim),         1, 1 << 16},
    {"n_layers",            offsetof(struct convert_config, n_layers),    1, CONVERT_MAX_LAYERS},
    {"n_heads",             offsetof(struct convert_config, n_heads),     1, 1 << 12},
    {"head_dim",            offsetof(struct convert_config, head_dim),    2, 1 << 12},
    {"rope_head_dim",       offsetof(struct convert_config, rope_dim),    2, 1 << 12},
    {"q_lora_rank",         offsetof(struct convert_config, q_lora),      1, 1 << 16},
    {"o_groups",            offsetof(struct convert_config, o_groups),    1, 1 << 12},
    {"o_lora_rank",         offsetof(struct convert_config, o_lora),      1, 1 << 16},
    {"n_routed_experts",    offsetof(struct convert_config, n_experts),   1, 1 << 12},
    {"n_activated_experts", offsetof(struct convert_config, n_used),      1, 1 << 12},
    {"moe_inter_dim",       offsetof(struct convert_config, ffn),         1, 1 << 16},
    {"n_hash_layers",       offsetof(struct convert_config, n_hash),      0, CONVERT_MAX_LAYERS},
    {"window_size",         offsetof(struct convert_config, window),      1, 1 << 20},
    {"index_n_heads",       offsetof(struct convert_config, idx_heads),   1, 1 << 12},
    {"index_head_dim",      offsetof(struct convert_config, idx_dim),     2, 1 << 12},
    {"index_topk",          offsetof(struct convert_config, idx_topk),    1, 1 << 20},
    {"hc_mult",             offsetof(struct convert_config, hc),          1, 16},
    {"hc_sinkhorn_iters",   offsetof(struct convert_config, hc_iters),    1, 1000},
    {"vocab_size",          offsetof(struct convert_config, vocab),       1, 1 << 24},
    {"original_seq_len",    offsetof(struct convert_config, original_seq_len), 0, 1ll << 32},
};

static const struct convert_num_field convert_num_fields[] = {
    {"hc_eps",              offsetof(struct convert_config, hc_eps),       0, 1},
    {"norm_eps",            offsetof(struct convert_config, norm_eps),     0, 1},
    {"rope_theta",          offsetof(struct convert_config, rope_theta),   1, 1e12},
    {"compress_rope_theta", offsetof(struct convert_config, compress_rope_theta), 1, 1e12},
    {"rope_factor",         offsetof(struct convert_config, rope_factor),  0, 1e6},
    {"beta_fast",           offsetof(struct convert_config, beta_fast),    0, 1e6},
    {"beta_slow",           offsetof(struct convert_config, beta_slow),    0, 1e6},
    {"route_scale",         offsetof(struct convert_config, route_scale),  0, 1e6},
    {"swiglu_limit",        offsetof(struct convert_config, swiglu_limit), 0, 1e6},
};

static bool convert_config_ints(const struct convert_json *j, const char *path,
                                struct convert_config *c) {
    for (size_t i = 0; i < sizeof convert_int_fields / sizeof convert_int_fields[0]; i++) {
        const struct convert_int_field *f = &convert_int_fields[i];
        int node = convert_json_get(j, 0, f->key);
        int64_t v;
        if (node < 0) return convert_fail("%s: missing field \"%s\"", path, f->key);
        if (!convert_json_int(j, node, &v))
            return convert_fail("%s: field \"%s\" is not an integer", path, f->key);
        if (v < f->lo || v > f->hi)
            return convert_fail("%s: field \"%s\" = %lld is outside [%lld, %lld]", path, f->key,
                                (long long)v, (long long)f->lo, (long long)f->hi);
        *(int64_t *)((char *)c + f->offset) = v;
    }
    return true;
}

static bool convert_config_nums(const struct convert_json *j, const char *path,
                                struct convert_config *c) {
    for (size_t i = 0; i < sizeof convert_num_fields / sizeof convert_num_fields[0]; i++) {
        const struct convert_num_field *f = &convert_num_fields[i];
        int node = convert_json_get(j, 0, f->key);
        double v;
        if (node < 0) return convert_fail("%s: missing field \"%s\"", path, f->key);
        if (!convert_json_double(j, node, &v))
            return convert_fail("%s: field \"%s\" is not a number", path, f->key);
        if (v < f->lo || v > f->hi)
            return convert_fail("%s: field \"%s\" = %g is outside [%g, %g]", path, f->key, v,
                                f->lo, f->hi);
        *(double *)((char *)c + f->offset) = v;
    }
    return true;
}

/* The optional fields, with the values the official code assumes.
 *
 * `score_func` decides `expert_weights_norm`: with sqrt-softplus (Flash) or
 * sigmoid scores the chosen experts' weights are divided by their sum; the
 * official code does not renormalise softmax scores. The context length is
 * only advertised by the engine, never used for sizing, so a missing
 * `max_position_embeddings` falls back to the YaRN-extended length. */
static bool convert_config_optional(const struct convert_json *j, const char *path,
                                    struct convert_config *c) {
    int node = convert_json_get(j, 0, "n_shared_experts");
    c->n_shared = 1;
    if (node >= 0 && !convert_json_int(j, node, &c->n_shared))
        return convert_fail("%s: field \"n_shared_experts\" is not an integer", path);
    node = convert_json_get(j, 0, "score_func");
    c->weights_norm = !convert_json_is_string(j, node, "softmax");
    /* The context the engine may advertise: the YaRN-extended length. */
    node = convert_json_get(j, 0, "max_position_embeddings");
    if (node < 0 || !convert_json_int(j, node, &c->context_length) || c->context_length < 1)
        c->context_length = c->original_seq_len > 0
                                ? (int64_t)((double)c->original_seq_len * fmax(c->rope_factor, 1))
                                : 65536;
    return true;
}

static bool convert_config_ratios(const struct convert_json *j, const char *path,
                                  struct convert_config *c) {
    int arr = convert_json_get(j, 0, "compress_ratios");
    if (arr < 0 || j->tok[arr].type != CONVERT_JSON_ARRAY)
        return convert_fail("%s: missing array field \"compress_ratios\"", path);
    uint32_t n = convert_json_count(j, arr);
    if (n < (uint32_t)c->n_layers || n > CONVERT_MAX_LAYERS + 1)
        return convert_fail("%s: \"compress_ratios\" has %u entries, need %lld (n_layers) or "
                            "one more for the MTP block", path, n, (long long)c->n_layers);
    c->n_ratios = n;
    for (uint32_t i = 0; i < n; i++) {
        int64_t r;
        if (!convert_json_int(j, convert_json_item(j, arr, i), &r) || r < 0 || r > 65536)
            return convert_fail("%s: compress_ratios[%u] is not an integer in [0, 65536]",
                                path, i);
        c->ratios[i] = r;
    }
    return true;
}

/* The relations between fields that the tensor shapes rely on. */
static bool convert_config_check(const struct convert_config *c, const char *path) {
    if (c->n_heads % c->o_groups)
        return convert_fail("%s: n_heads %lld is not a multiple of o_groups %lld", path,
                            (long long)c->n_heads, (long long)c->o_groups);
    if (c->rope_dim % 2 || c->rope_dim > c->head_dim)
        return convert_fail("%s: rope_head_dim %lld must be even and <= head_dim %lld", path,
                            (long long)c->rope_dim, (long long)c->head_dim);
    if (c->n_used > c->n_experts)
        return convert_fail("%s: n_activated_experts %lld > n_routed_experts %lld", path,
                            (long long)c->n_used, (long long)c->n_experts);
    if (c->n_hash > c->n_layers)
        return convert_fail("%s: n_hash_layers %lld > n_layers %lld", path,
                            (long long)c->n_hash, (long long)c->n_layers);
    if (c->n_shared != 1)
        return convert_fail("%s: n_shared_experts is %lld; this model has exactly 1", path,
                            (long long)c->n_shared);
    return true;
}

static bool convert_config_load(const char *dir, struct convert_config *c) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    size_t len;
    char *text = convert_read_small_file(path, 1 << 20, &len);
    if (!text) return false;
    struct convert_json j;
    memset(c, 0, sizeof *c);
    bool ok = convert_json_parse(&j, text, len, path);
    if (ok && j.tok[0].type != CONVERT_JSON_OBJECT) ok = convert_fail("%s: not an object", path);
    ok = ok && convert_config_ints(&j, path, c) && convert_config_nums(&j, path, c) &&
         convert_config_optional(&j, path, c) && convert_config_ratios(&j, path, c) &&
         convert_config_check(c, path);
    if (j.tok) convert_json_free(&j);
    free(text);
    return ok;
}

/* The published Flash shape [FMT §1.2], with the first `layers` layers.
 * Layers 0-1 are window-only, then even layers compress by 4 (with the
 * indexer) and odd layers by 128. */
static void convert_config_flash(struct convert_config *c, int64_t layers) {
    memset(c, 0, sizeof *c);
    c->dim = 4096; c->n_layers = layers; c->n_heads = 64; c->head_dim = 512;
    c->rope_dim = 64; c->q_lora = 1024; c->o_groups = 8; c->o_lora = 1024;
    c->n_experts = 256; c->n_used = 6; c->n_shared = 1; c->ffn = 2048;
    c->n_hash = layers < 3 ? layers : 3;
    c->window = 128; c->idx_heads = 64; c->idx_dim = 128; c->idx_topk = 512;
    c->hc = 4; c->hc_iters = 20; c->vocab = 129280;
    c->original_seq_len = 65536; c->context_length = 1048576;
    c->hc_eps = 1e-6; c->norm_eps = 1e-6; c->rope_theta = 10000;
    c->compress_rope_theta = 160000; c->rope_factor = 16;
    c->beta_fast = 32; c->beta_slow = 1; c->route_scale = 1.5; c->swiglu_limit = 10;
    c->weights_norm = true;
    c->n_ratios = layers + 1;
    for (int64_t l = 0; l < layers; l++) c->ratios[l] = l < 2 ? 0 : (l % 2 == 0 ? 4 : 128);
    c->ratios[layers] = 0;
}

/* The MTP block's ratio: the entry after the main layers, 0 if absent. */
static int64_t convert_mtp_ratio(const struct convert_config *c) {
    return c->n_ratios > c->n_layers ? c->ratios[c->n_layers] : 0;
}

/* ===========================================================================
 * 5. Safetensors: reading the checkpoint
 * ===========================================================================
 *
 * A safetensors shard [ST] is
 *
 *   offset        size   description
 *   0             8      u64 LE  N = length of the JSON header
 *   8             N      JSON:   { "name": { "dtype": "BF16",
 *                                            "shape": [out, in],
 *                                            "data_offsets": [begin, end] },
 *                                  ...,  "__metadata__": {...} }
 *   8 + N         ...    tensor bytes; a tensor lives at 8 + N + begin
 *
 * A big checkpoint is split into shards, and model.safetensors.index.json
 * maps each tensor name to its shard ("weight_map"). We map every shard
 * read-only and keep one sorted table of all tensors, so a lookup is a
 * binary search and reading a tensor is pointer arithmetic.
 *
 * Everything in a header is checked before it is believed: the header must
 * fit in the file, every [begin, end) must lie inside the data area and hold
 * exactly shape x dtype-size bytes, dtypes must be known, and every entry of
 * the index must really be in the shard it names.
 */

enum st_dtype {
    ST_BF16, ST_F16, ST_F32, ST_F64, ST_I8, ST_U8, ST_I16, ST_U16, ST_I32, ST_U32,
    ST_I64, ST_U64, ST_BOOL, ST_F8_E4M3, ST_F8_E5M2, ST_F8_E8M0, ST_DTYPE_COUNT
};

static const struct { const char *name; int size; } st_dtypes[ST_DTYPE_COUNT] = {
    {"BF16", 2}, {"F16", 2}, {"F32", 4}, {"F64", 8}, {"I8", 1}, {"U8", 1}, {"I16", 2},
    {"U16", 2}, {"I32", 4}, {"U32", 4}, {"I64", 8}, {"U64", 8}, {"BOOL", 1},
    {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"F8_E8M0", 1},
};

#define ST_MAX_DIMS 8
#define ST_MAX_HEADER (256ull << 20)   /* the real model's headers are ~1 MB */

struct st_shard {
    char *path;
    const uint8_t *map;       /* the whole file, read-only */
    uint64_t size;
    uint64_t data_base;       /* 8 + header length */
};

struct st_tensor {
    char *name;
    int dtype;                /* enum st_dtype */
    int n_dims;
    int64_t shape[ST_MAX_DIMS];   /* PyTorch order: shape[0] is the slowest */
    uint64_t begin, end;      /* relative to the shard's data_base */
    int shard;
};

struct st_db {
    char *dir;
    struct st_shard *shards;
    int n_shards;
    struct st_tensor *tensors;    /* sorted by name once loading is done */
    int n_tensors, cap_tensors;
};

static void st_db_close(struct st_db *db) {
    for (int i = 0; i < db->n_shards; i++) {
        if (db->shards[i].map) munmap((void *)db->shards[i].map, db->shards[i].size);
        free(db->shards[i].path);
    }
    for (int i = 0; i < db->n_tensors; i++) free(db->tensors[i].name);
    free(db->shards);
    free(db->tensors);
    free(db->dir);
    memset(db, 0, sizeof *db);
}

static const uint8_t *st_data(const struct st_db *db, const struct st_tensor *t) {
    const struct st_shard *s = &db->shards[t->shard];
    return s->map + s->data_base + t->begin;
}

static int64_t st_elements(const struct st_tensor *t) {
    int64_t n = 1;
    for (int d = 0; d < t->n_dims; d++) n *= t->shape[d];
    return n;
}

static const char *st_shape_str(const struct st_tensor *t, char *buf, size_t cap) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < t->n_dims && n < cap; d++)
        n += (size_t)snprintf(buf + n, cap - n, d ? ", %lld" : "%lld", (long long)t->shape[d]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
    return buf;
}

static int st_dtype_of(const struct convert_json *j, int node) {
    for (int d = 0; d < ST_DTYPE_COUNT; d++)
        if (convert_json_is_string(j, node, st_dtypes[d].name)) return d;
    return -1;
}

/* shape: an array of at most 8 non-negative integers whose product stays
 * below 2^40 elements, which also keeps every byte count far from overflow. */
static bool st_parse_shape(const struct convert_json *j, int node, struct st_tensor *t) {
    if (node < 0 || j->tok[node].type != CONVERT_JSON_ARRAY) return false;
    uint32_t n = convert_json_count(j, node);
    if (n > ST_MAX_DIMS) return false;
    int64_t total = 1;
    t->n_dims = (int)n;
    for (uint32_t d = 0; d < n; d++) {
        int64_t v;
        if (!convert_json_int(j, convert_json_item(j, node, d), &v) || v < 0 || v > (1ll << 40))
            return false;
        t->shape[d] = v;
        if (v && total > (1ll << 40) / v) return false;
        total *= v;
    }
    return true;
}

static bool st_parse_offsets(const struct convert_json *j, int node, struct st_tensor *t) {
    int64_t b, e;
    if (node < 0 || j->tok[node].type != CONVERT_JSON_ARRAY || convert_json_count(j, node) != 2)
        return false;
    if (!convert_json_int(j, convert_json_item(j, node, 0), &b) ||
        !convert_json_int(j, convert_json_item(j, node, 1), &e) || b < 0 || e < b)
        return false;
    t->begin = (uint64_t)b;
    t->end = (uint64_t)e;
    return true;
}

static void st_add_tensor(struct st_db *db, const struct st_tensor *t) {
    if (db->n_tensors == db->cap_tensors) {
        db->cap_tensors = db->cap_tensors ? db->cap_tensors * 2 : 1024;
        db->tensors = xrealloc(db->tensors, (size_t)db->cap_tensors * sizeof *db->tensors);
    }
    db->tensors[db->n_tensors++] = *t;
}

/* One header entry: "name": {"dtype": .., "shape": [..], "data_offsets": [..]} */
static bool st_parse_entry(struct st_db *db, const struct convert_json *j, int key,
                           int shard) {
    const struct st_shard *s = &db->shards[shard];
    int val = key + 1;
    struct st_tensor t = {0};
    char *name = convert_strdup(j->tok[key].text, j->tok[key].len);
    t.dtype = st_dtype_of(j, convert_json_get(j, val, "dtype"));
    bool ok = true;
    if (j->tok[val].type != CONVERT_JSON_OBJECT)
        ok = convert_fail("%s: tensor %s: header entry is not an object", s->path, name);
    else if (t.dtype < 0)
        ok = convert_fail("%s: tensor %s: unknown or missing dtype", s->path, name);
    else if (!st_parse_shape(j, convert_json_get(j, val, "shape"), &t))
        ok = convert_fail("%s: tensor %s: bad or absurd shape", s->path, name);
    else if (!st_parse_offsets(j, convert_json_get(j, val, "data_offsets"), &t))
        ok = convert_fail("%s: tensor %s: bad data_offsets", s->path, name);
    else if (t.end > s->size - s->data_base)
        ok = convert_fail("%s: tensor %s: data_offsets [%llu, %llu) run past the end of the "
                          "file (%llu data bytes; truncated shard?)", s->path, name,
                          (unsigned long long)t.begin, (unsigned long long)t.end,
                          (unsigned long long)(s->size - s->data_base));
    else if (t.end - t.begin != (uint64_t)st_elements(&t) * (uint64_t)st_dtypes[t.dtype].size)
        ok = convert_fail("%s: tensor %s: %llu data bytes, but shape x %s needs %llu", s->path,
                          name, (unsigned long long)(t.end - t.begin), st_dtypes[t.dtype].name,
                          (unsigned long long)st_elements(&t) * st_dtypes[t.dtype].size);
    if (!ok) {
        free(name);
        return false;
    }
    t.name = name;
    t.shard = shard;
    st_add_tensor(db, &t);
    return true;
}

static bool st_parse_header(struct st_db *db, int shard) {
    const struct st_shard *s = &db->shards[shard];
    struct convert_json j;
    if (!convert_json_parse(&j, (const char *)s->map + 8, s->data_base - 8, s->path))
        return false;
    bool ok = true;
    if (j.tok[0].type != CONVERT_JSON_OBJECT)
        ok = convert_fail("%s: header is not a JSON object", s->path);
    for (uint32_t i = 1; ok && i < j.tok[0].span; i += 1 + j.tok[i + 1].span) {
        if (j.tok[i].len == 12 && memcmp(j.tok[i].text, "__metadata__", 12) == 0) continue;
        ok = st_parse_entry(db, &j, (int)i, shard);
    }
    convert_json_free(&j);
    return ok;
}

/* Map a shard and read its header. The file is mapped whole and stays
 * mapped until st_db_close(); the kernel pages weights in as we read them. */
static bool st_open_shard(struct st_db *db, const char *file) {
    for (int i = 0; i < db->n_shards; i++)
        if (strcmp(strrchr(db->shards[i].path, '/') + 1, file) == 0) return true;
    db->shards = xrealloc(db->shards, (size_t)(db->n_shards + 1) * sizeof *db->shards);
    struct st_shard *s = &db->shards[db->n_shards];
    memset(s, 0, sizeof *s);
    size_t plen = strlen(db->dir) + strlen(file) + 2;
    s->path = convert_zalloc(plen);
    snprintf(s->path, plen, "%s/%s", db->dir, file);
    db->n_shards++;
    int fd = open(s->path, O_RDONLY);
    if (fd < 0) return convert_fail("cannot open %s: %s", s->path, strerror(errno));
    struct stat st;
    bool ok = fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
    if (!ok) convert_fail("%s: not a regular file", s->path);
    else if (st.st_size < 10) ok = convert_fail("%s: %lld bytes is too short for a safetensors "
                                                "file (truncated?)", s->path, (long long)st.st_size);
    if (ok) {
        void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) ok = convert_fail("%s: mmap failed: %s", s->path, strerror(errno));
        else { s->map = map; s->size = (uint64_t)st.st_size; }
    }
    close(fd);
    if (!ok) return false;
    uint64_t hlen = convert_load_u64(s->map);
    if (hlen < 2 || hlen > ST_MAX_HEADER || hlen > s->size - 8)
        return convert_fail("%s: header length %llu is absurd for a %llu-byte file", s->path,
                            (unsigned long long)hlen, (unsigned long long)s->size);
    s->data_base = 8 + hlen;
    return st_parse_header(db, db->n_shards - 1);
}

static int st_compare_names(const void *a, const void *b) {
    return strcmp(((const struct st_tensor *)a)->name, ((const struct st_tensor *)b)->name);
}

static const struct st_tensor *st_find(const struct st_db *db, const char *name) {
    struct st_tensor key = {.name = (char *)name};
    if (db->n_tensors == 0) return NULL;               /* bsearch() must not see a NULL array */
    return bsearch(&key, db->tensors, (size_t)db->n_tensors, sizeof key, st_compare_names);
}

/* Order by shard, then by where the bytes begin. */
static int st_compare_places(const void *a, const void *b) {
    const struct st_tensor *x = *(const struct st_tensor *const *)a, *y = *(const struct st_tensor *const *)b;
    if (x->shard != y->shard) return x->shard < y->shard ? -1 : 1;
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

/* Two tensors whose data_offsets overlap would share bytes: writing one
 * would be reading the other. A safetensors writer never does that, so a
 * file that does is damaged or crafted; refuse it, naming both. */
static bool st_check_overlaps(const struct st_db *db) {
    const struct st_tensor **by_place = xcalloc((size_t)db->n_tensors, sizeof *by_place);
    for (int i = 0; i < db->n_tensors; i++) by_place[i] = &db->tensors[i];
    qsort(by_place, (size_t)db->n_tensors, sizeof *by_place, st_compare_places);
    bool ok = true;
    for (int i = 1; ok && i < db->n_tensors; i++) {
        const struct st_tensor *a = by_place[i - 1], *b = by_place[i];
        if (a->shard == b->shard && b->begin < a->end && b->end > b->begin)
            ok = convert_fail("%s: tensors %s [%llu, %llu) and %s [%llu, %llu) overlap",
                              db->shards[a->shard].path, a->name, (unsigned long long)a->begin,
                              (unsigned long long)a->end, b->name, (unsigned long long)b->begin,
                              (unsigned long long)b->end);
    }
    free(by_place);
    return ok;
}

/* After loading: refuse an empty list, sort for lookups, and refuse a name
 * defined twice or bytes claimed by two tensors. */
static bool st_finish(struct st_db *db) {
    if (db->n_tensors == 0) return convert_fail("%s: the checkpoint lists no tensors", db->dir);
    qsort(db->tensors, (size_t)db->n_tensors, sizeof *db->tensors, st_compare_names);
    for (int i = 1; i < db->n_tensors; i++)
        if (strcmp(db->tensors[i - 1].name, db->tensors[i].name) == 0)
            return convert_fail("%s: tensor %s is defined twice (in %s and %s)", db->dir,
                                db->tensors[i].name, db->shards[db->tensors[i - 1].shard].path,
                                db->shards[db->tensors[i].shard].path);
    return st_check_overlaps(db);
}

/* A shard name from the index must be a plain file name in the directory:
 * an index that says "../../somewhere" would otherwise let a downloaded
 * checkpoint make us read any file on the machine as weights. */
static bool st_safe_file_name(const char *s, size_t n) {
    if (n == 0 || n > 255 || s[0] == '.') return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] == '/' || s[i] == '\\' || s[i] == 0) return false;
    return true;
}

/* Every "name": "file" pair of the index must name a tensor that the file
 * really holds; a stale or hand-edited index is caught here. */
static bool st_check_index(const struct st_db *db, const struct convert_json *j, int map,
                           const char *ipath) {
    for (uint32_t i = (uint32_t)map + 1; i < (uint32_t)map + j->tok[map].span;
         i += 1 + j->tok[i + 1].span) {
        char *name = convert_strdup(j->tok[i].text, j->tok[i].len);
        char *file = convert_strdup(j->tok[i + 1].text, j->tok[i + 1].len);
        const struct st_tensor *t = st_find(db, name);
        bool ok = t && strcmp(strrchr(db->shards[t->shard].path, '/') + 1, file) == 0;
        if (!ok) convert_fail("%s: weight_map says %s is in %s, but that shard has no such "
                              "tensor", ipath, name, file);
        free(name);
        free(file);
        if (!ok) return false;
    }
    return true;
}

static bool st_open_index(struct st_db *db, const char *ipath) {
    size_t len;
    char *text = convert_read_small_file(ipath, 64u << 20, &len);
    if (!text) return false;
    struct convert_json j;
    if (!convert_json_parse(&j, text, len, ipath)) { free(text); return false; }
    int map = convert_json_get(&j, 0, "weight_map");
    bool ok = map >= 0 && j.tok[map].type == CONVERT_JSON_OBJECT;
    if (!ok) convert_fail("%s: no \"weight_map\" object", ipath);
    for (uint32_t i = (uint32_t)map + 1; ok && i < (uint32_t)map + j.tok[map].span;
         i += 1 + j.tok[i + 1].span) {
        const struct convert_json_tok *f = &j.tok[i + 1];
        if (f->type != CONVERT_JSON_STRING || !st_safe_file_name(f->text, f->len)) {
            ok = convert_fail("%s: weight_map entry %.*s does not name a shard file", ipath,
                              (int)j.tok[i].len, j.tok[i].text);
            break;
        }
        char *file = convert_strdup(f->text, f->len);
        ok = st_open_shard(db, file);
        free(file);
    }
    ok = ok && st_finish(db) && st_check_index(db, &j, map, ipath);
    convert_json_free(&j);
    free(text);
    return ok;
}

/* Open a checkpoint directory: the index and its shards, or a lone
 * model.safetensors. On failure everything opened so far is closed. */
static bool st_db_open(struct st_db *db, const char *dir) {
    memset(db, 0, sizeof *db);
    db->dir = convert_strdup(dir, strlen(dir));
    char ipath[4096];
    snprintf(ipath, sizeof ipath, "%s/model.safetensors.index.json", dir);
    struct stat st;
    bool ok;
    if (stat(ipath, &st) == 0) ok = st_open_index(db, ipath);
    else ok = st_open_shard(db, "model.safetensors") && st_finish(db);
    if (!ok) st_db_close(db);
    return ok;
}

/* ---- 5.1 Reading a weight as float rows -----------------------------------
 *
 * A "source" is one checkpoint matrix [rows][cols] that we are about to read,
 * whatever its storage: plain (BF16/F16/F32), FP8 with 128x128 tile scales,
 * or FP4 with per-32 scales. Opening a source checks the dtype, the shape
 * against what config.json implies, and the companion `.scale` tensor;
 * after that, reading rows cannot fail. A 1-D vector is a source with one
 * row.
 *
 *   FP8:  W[o][i] = e4m3(w[o][i]) * scale[o / 128][i / 128]
 *         scale is [ceil(rows / 128)][ceil(cols / 128)]: the last tile row
 *         and column may be ragged.
 *   FP4:  W[o][2k]   = e2m1(w[o][k] & 15) * scale[o][2k / 32]
 *         W[o][2k+1] = e2m1(w[o][k] >> 4) * scale[o][2k / 32]
 *         w is [rows][cols / 2] bytes (dtype I8 or U8), scale [rows][cols / 32].
 */

enum { ST_SRC_PLAIN, ST_SRC_FP8, ST_SRC_FP4 };

struct st_source {
    const struct st_db *db;
    const struct st_tensor *w, *scale;
    int kind;                  /* ST_SRC_* */
    int64_t rows, cols;
};

/* A scale byte or float, as a multiplier. */
static float st_scale_at(const struct st_source *s, int64_t index) {
    const uint8_t *p = st_data(s->db, s->scale);
    switch (s->scale->dtype) {
    case ST_F32: return convert_load_f32(p + 4 * index);
    case ST_BF16: return bf16_to_f32(convert_load_u16(p + 2 * index));
    default: return convert_e8m0_to_f32(p[index]);     /* F8_E8M0 or U8 */
    }
}

static bool st_shape_is(const struct st_tensor *t, int n_dims, int64_t d0, int64_t d1) {
    return t->n_dims == n_dims && t->shape[0] == d0 && (n_dims < 2 || t->shape[1] == d1);
}

static bool st_wrong_shape(const struct st_source *s, const struct st_tensor *t, int n_dims,
                           int64_t d0, int64_t d1) {
    char got[128];
    st_shape_str(t, got, sizeof got);
    if (n_dims == 1)
        return convert_fail("%s: tensor %s has shape %s, expected [%lld] from config.json",
                            s->db->shards[t->shard].path, t->name, got, (long long)d0);
    return convert_fail("%s: tensor %s has shape %s, expected [%lld, %lld] from config.json",
                        s->db->shards[t->shard].path, t->name, got, (long long)d0,
                        (long long)d1);
}

/* Find the `.scale` companion of a quantized `X.weight`: `X.scale`. */
static bool st_open_scale(struct st_source *s) {
    char name[512];
    size_t n = strlen(s->w->name);
    if (n > 7 && strcmp(s->w->name + n - 7, ".weight") == 0) n -= 7;
    snprintf(name, sizeof name, "%.*s.scale", (int)n, s->w->name);
    s->scale = st_find(s->db, name);
    if (!s->scale)
        return convert_fail("%s: tensor %s is %s but its scale tensor %s is missing",
                            s->db->shards[s->w->shard].path, s->w->name,
                            st_dtypes[s->w->dtype].name, name);
    int d = s->scale->dtype;
    if (d != ST_F8_E8M0 && d != ST_U8 && d != ST_F32 && d != ST_BF16)
        return convert_fail("%s: scale tensor %s has dtype %s (want F8_E8M0, U8, F32 or BF16)",
                            s->db->shards[s->scale->shard].path, name, st_dtypes[d].name);
    return true;
}

static bool st_open_fp8(struct st_source *s, bool one_d) {
    if (one_d || !st_shape_is(s->w, 2, s->rows, s->cols))
        return st_wrong_shape(s, s->w, one_d ? 1 : 2, one_d ? s->cols : s->rows, s->cols);
    if (!st_open_scale(s)) return false;
    int64_t tr = (s->rows + 127) / 128, tc = (s->cols + 127) / 128;
    if (!st_shape_is(s->scale, 2, tr, tc)) return st_wrong_shape(s, s->scale, 2, tr, tc);
    s->kind = ST_SRC_FP8;
    return true;
}

static bool st_open_fp4(struct st_source *s, bool one_d) {
    if (one_d || s->cols % 32 != 0)
        return convert_fail("%s: tensor %s is packed FP4 but %lld columns are not a multiple "
                            "of 32", s->db->shards[s->w->shard].path, s->w->name,
                            (long long)s->cols);
    if (!st_shape_is(s->w, 2, s->rows, s->cols / 2))
        return st_wrong_shape(s, s->w, 2, s->rows, s->cols / 2);
    if (!st_open_scale(s)) return false;
    if (!st_shape_is(s->scale, 2, s->rows, s->cols / 32))
        return st_wrong_shape(s, s->scale, 2, s->rows, s->cols / 32);
    s->kind = ST_SRC_FP4;
    return true;
}

/* Open checkpoint tensor `name`, expected [rows][cols] (or [cols] if one_d).
 *
 * The dtype decides the storage format, and the format decides which shape
 * to expect: a packed FP4 tensor is half as wide as the matrix it holds, so
 * "shape mismatch" is judged against the matrix, not the bytes. The expected
 * shape always comes from config.json; the checkpoint is never allowed to
 * tell us how big a layer is. That is what turns a wrong or truncated file
 * into an error message here rather than a wrong model later. */
static bool st_source_open(struct st_source *s, const struct st_db *db, const char *name,
                           int64_t rows, int64_t cols, bool one_d) {
    memset(s, 0, sizeof *s);
    s->db = db;
    s->rows = one_d ? 1 : rows;
    s->cols = cols;
    s->w = st_find(db, name);
    if (!s->w) return convert_fail("%s: tensor %s is missing from the checkpoint", db->dir, name);
    switch (s->w->dtype) {
    case ST_BF16: case ST_F16: case ST_F32:
        s->kind = ST_SRC_PLAIN;
        if (one_d ? st_shape_is(s->w, 1, cols, 0) : st_shape_is(s->w, 2, rows, cols)) return true;
        return st_wrong_shape(s, s->w, one_d ? 1 : 2, one_d ? cols : rows, cols);
    case ST_F8_E4M3: return st_open_fp8(s, one_d);
    case ST_I8: case ST_U8: return st_open_fp4(s, one_d);
    default:
        return convert_fail("%s: tensor %s has dtype %s, which is not a weight format",
                            db->shards[s->w->shard].path, name, st_dtypes[s->w->dtype].name);
    }
}

static void st_row_plain(const struct st_source *s, int64_t r, float *dst) {
    const uint8_t *p = st_data(s->db, s->w);
    int64_t base = r * s->cols;
    for (int64_t i = 0; i < s->cols; i++) {
        switch (s->w->dtype) {
        case ST_BF16: dst[i] = bf16_to_f32(convert_load_u16(p + 2 * (base + i))); break;
        case ST_F16: dst[i] = f16_to_f32(convert_load_u16(p + 2 * (base + i))); break;
        default: dst[i] = convert_load_f32(p + 4 * (base + i)); break;
        }
    }
}

static void st_row_fp8(const struct st_source *s, int64_t r, float *dst) {
    const uint8_t *w = st_data(s->db, s->w) + r * s->cols;
    int64_t tile_cols = (s->cols + 127) / 128, tile_row = r / 128;
    for (int64_t t = 0; t < tile_cols; t++) {
        float scale = st_scale_at(s, tile_row * tile_cols + t);
        int64_t end = (t + 1) * 128 < s->cols ? (t + 1) * 128 : s->cols;
        for (int64_t i = t * 128; i < end; i++) dst[i] = convert_e4m3_to_f32(w[i]) * scale;
    }
}

static void st_row_fp4(const struct st_source *s, int64_t r, float *dst) {
    const uint8_t *w = st_data(s->db, s->w) + r * (s->cols / 2);
    int64_t blocks = s->cols / 32;
    for (int64_t b = 0; b < blocks; b++) {
        float scale = st_scale_at(s, r * blocks + b);
        for (int64_t k = b * 16; k < b * 16 + 16; k++) {
            dst[2 * k] = convert_e2m1_to_f32(w[k] & 15) * scale;
            dst[2 * k + 1] = convert_e2m1_to_f32(w[k] >> 4) * scale;
        }
    }
}

/* Rows [row0, row0 + n) as floats, into dst [n][cols]. */
static void st_source_rows(const struct st_source *s, int64_t row0, int64_t n, float *dst) {
    for (int64_t r = 0; r < n; r++) {
        float *out = dst + r * s->cols;
        if (s->kind == ST_SRC_FP8) st_row_fp8(s, row0 + r, out);
        else if (s->kind == ST_SRC_FP4) st_row_fp4(s, row0 + r, out);
        else st_row_plain(s, row0 + r, out);
    }
}

/* The hash-routing table: [V][K] expert ids per token (I32 or I64 in the
 * checkpoint), every id in [0, E). Out: int32 [V][K], the GGUF layout. */
static bool st_read_ids(const struct st_db *db, const char *name, int64_t v, int64_t k,
                        int64_t n_experts, int32_t *dst) {
    const struct st_tensor *t = st_find(db, name);
    if (!t) return convert_fail("%s: tensor %s is missing from the checkpoint", db->dir, name);
    const char *path = db->shards[t->shard].path;
    if (t->dtype != ST_I32 && t->dtype != ST_I64)
        return convert_fail("%s: tensor %s has dtype %s, expected I32 or I64", path, name,
                            st_dtypes[t->dtype].name);
    if (!st_shape_is(t, 2, v, k)) {
        struct st_source fake = {.db = db};
        return st_wrong_shape(&fake, t, 2, v, k);
    }
    const uint8_t *p = st_data(db, t);
    for (int64_t i = 0; i < v * k; i++) {
        int64_t id = t->dtype == ST_I32 ? (int32_t)convert_load_u32(p + 4 * i)
                                        : (int64_t)convert_load_u64(p + 8 * i);
        if (id < 0 || id >= n_experts)
            return convert_fail("%s: tensor %s: entry %lld is expert %lld, outside [0, %lld)",
                                path, name, (long long)i, (long long)id, (long long)n_experts);
        dst[i] = (int32_t)id;
    }
    return true;
}

/* ===========================================================================
 * 6. The GGUF writer
 * ===========================================================================
 *
 * The layout we write (GGUF v3, all integers little-endian, which is also
 * the byte order of every machine this runs on, so values are copied as
 * they sit in memory):
 *
 *   offset  size  description
 *   0       4     magic "GGUF"
 *   4       4     u32 version = 3
 *   8       8     u64 tensor count
 *   16      8     u64 metadata count
 *   24      ...   metadata: { u64 len, key bytes; u32 value type; value }
 *   ...     ...   tensor directory: { u64 len, name bytes; u32 n_dims;
 *                 u64 ne[n_dims] (ne0 = row length first); u32 type;
 *                 u64 offset from the start of the data section }
 *   ...     ...   zero padding to a multiple of 32 (general.alignment)
 *   data    ...   each tensor's bytes, each padded to a multiple of 32
 *
 * The header and the directory are built in memory (they are small, and
 * every size is known before the first weight is read). The weights are
 * then streamed through one large buffer into a temporary file next to the
 * output. Only a complete file is renamed into place: the temporary is
 * fsync()ed, renamed over OUT, and removed on any error or on ^C, so a
 * crashed conversion never leaves a half-written OUT.gguf behind.
 */

#define GGUF_WRITE_ALIGN 32
#define GGUF_WRITE_BUFFER (16u << 20)

enum { GGUF_WRITE_U32 = 4, GGUF_WRITE_F32 = 6, GGUF_WRITE_BOOL = 7, GGUF_WRITE_STRING = 8,
       GGUF_WRITE_ARRAY = 9, GGUF_WRITE_U64 = 10 };

/* A growing byte buffer, for the header. */
struct convert_buf {
    uint8_t *p;
    size_t n, cap;
    uint64_t count;            /* number of records put into it */
};

static void gguf_write_put(struct convert_buf *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        while (b->n + n > b->cap) b->cap = b->cap ? b->cap * 2 : 4096;
        b->p = xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void gguf_write_u32(struct convert_buf *b, uint32_t v) { gguf_write_put(b, &v, 4); }
static void gguf_write_u64(struct convert_buf *b, uint64_t v) { gguf_write_put(b, &v, 8); }

static void gguf_write_str(struct convert_buf *b, const char *s) {
    gguf_write_u64(b, strlen(s));
    gguf_write_put(b, s, strlen(s));
}

static void gguf_write_key(struct convert_buf *b, const char *key, uint32_t type) {
    gguf_write_str(b, key);
    gguf_write_u32(b, type);
    b->count++;
}

static void gguf_write_kv_u32(struct convert_buf *b, const char *key, int64_t v) {
    gguf_write_key(b, key, GGUF_WRITE_U32);
    gguf_write_u32(b, (uint32_t)v);
}

static void gguf_write_kv_u64(struct convert_buf *b, const char *key, int64_t v) {
    gguf_write_key(b, key, GGUF_WRITE_U64);
    gguf_write_u64(b, (uint64_t)v);
}

static void gguf_write_kv_f32(struct convert_buf *b, const char *key, double v) {
    float f = (float)v;
    gguf_write_key(b, key, GGUF_WRITE_F32);
    gguf_write_put(b, &f, 4);
}

static void gguf_write_kv_bool(struct convert_buf *b, const char *key, bool v) {
    uint8_t byte = v ? 1 : 0;
    gguf_write_key(b, key, GGUF_WRITE_BOOL);
    gguf_write_put(b, &byte, 1);
}

static void gguf_write_kv_str(struct convert_buf *b, const char *key, const char *v) {
    gguf_write_key(b, key, GGUF_WRITE_STRING);
    gguf_write_str(b, v);
}

static void gguf_write_kv_u32_array(struct convert_buf *b, const char *key, const int64_t *v,
                                    int64_t n) {
    gguf_write_key(b, key, GGUF_WRITE_ARRAY);
    gguf_write_u32(b, GGUF_WRITE_U32);
    gguf_write_u64(b, (uint64_t)n);
    for (int64_t i = 0; i < n; i++) gguf_write_u32(b, (uint32_t)v[i]);
}

static void gguf_write_kv_f32_array(struct convert_buf *b, const char *key, double v,
                                    int64_t n) {
    float f = (float)v;
    gguf_write_key(b, key, GGUF_WRITE_ARRAY);
    gguf_write_u32(b, GGUF_WRITE_F32);
    gguf_write_u64(b, (uint64_t)n);
    for (int64_t i = 0; i < n; i++) gguf_write_put(b, &f, 4);
}

/* ---- 6.1 The output file ------------------------------------------------- */

struct gguf_writer {
    int fd;
    char *tmp_path, *final_path;
    uint8_t *buf;              /* GGUF_WRITE_BUFFER bytes of pending output */
    size_t used;
    uint64_t pos;              /* bytes handed to gguf_write_bytes() so far */
};

/* The temporary file being written, for the ^C handler in main(). */
static char convert_tmp_for_signal[4096];

static bool gguf_write_open(struct gguf_writer *w, const char *path) {
    memset(w, 0, sizeof *w);
    size_t n = strlen(path) + 16;
    w->tmp_path = convert_zalloc(n);
    snprintf(w->tmp_path, n, "%s.tmp-XXXXXX", path);
    w->fd = mkstemp(w->tmp_path);
    if (w->fd < 0) {
        bool r = convert_fail("cannot create a temporary file next to %s: %s", path,
                              strerror(errno));
        free(w->tmp_path);
        w->tmp_path = NULL;
        return r;
    }
    mode_t mask = umask(0);
    umask(mask);
    fchmod(w->fd, 0666 & ~mask);
    snprintf(convert_tmp_for_signal, sizeof convert_tmp_for_signal, "%s", w->tmp_path);
    w->final_path = convert_strdup(path, strlen(path));
    w->buf = convert_zalloc(GGUF_WRITE_BUFFER);
    return true;
}

static bool gguf_write_flush(struct gguf_writer *w) {
    size_t done = 0;
    while (done < w->used) {
        ssize_t k = write(w->fd, w->buf + done, w->used - done);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0)
            return convert_fail("writing %s: %s", w->tmp_path, k < 0 ? strerror(errno) : "no progress");
        done += (size_t)k;
    }
    w->used = 0;
    return true;
}

static bool gguf_write_bytes(struct gguf_writer *w, const void *src, size_t n) {
    const uint8_t *p = src;
    w->pos += n;
    while (n > 0) {
        size_t k = GGUF_WRITE_BUFFER - w->used < n ? GGUF_WRITE_BUFFER - w->used : n;
        memcpy(w->buf + w->used, p, k);
        w->used += k;
        p += k;
        n -= k;
        if (w->used == GGUF_WRITE_BUFFER && !gguf_write_flush(w)) return false;
    }
    return true;
}

static bool gguf_write_pad(struct gguf_writer *w) {
    static const uint8_t zeros[GGUF_WRITE_ALIGN];
    size_t pad = (size_t)((GGUF_WRITE_ALIGN - w->pos % GGUF_WRITE_ALIGN) % GGUF_WRITE_ALIGN);
    return gguf_write_bytes(w, zeros, pad);
}

static void gguf_write_release(struct gguf_writer *w) {
    if (w->fd >= 0) close(w->fd);
    convert_tmp_for_signal[0] = 0;
    free(w->buf);
    free(w->tmp_path);
    free(w->final_path);
    memset(w, 0, sizeof *w);
    w->fd = -1;
}

/* Give up: remove the temporary. Safe to call on a writer that failed to open. */
static void gguf_write_abort(struct gguf_writer *w) {
    if (w->tmp_path) unlink(w->tmp_path);
    gguf_write_release(w);
}

/* Flush, fsync, and atomically rename the finished file over OUT. */
static bool gguf_write_commit(struct gguf_writer *w) {
    bool ok = gguf_write_flush(w);
    if (ok && fsync(w->fd) != 0) ok = convert_fail("fsync %s: %s", w->tmp_path, strerror(errno));
    if (ok && close(w->fd) != 0) ok = convert_fail("close %s: %s", w->tmp_path, strerror(errno));
    w->fd = -1;
    if (ok && rename(w->tmp_path, w->final_path) != 0)
        ok = convert_fail("rename %s -> %s: %s", w->tmp_path, w->final_path, strerror(errno));
    if (!ok) {
        gguf_write_abort(w);
        return false;
    }
    gguf_write_release(w);
    return true;
}

/* ---- 6.2 The tokenizer, copied from a vocabulary GGUF ----------------------
 *
 * The official checkpoint carries its tokenizer as tokenizer.json, a format
 * this tool does not read. The engine wants the llama.cpp-style keys instead
 * (`tokenizer.ggml.tokens`, `.merges`, `.token_type`, the special ids, ...),
 * and those already exist in a small GGUF with no tensors: the vocabulary
 * file given with `--vocab`. Every metadata key of it whose name starts with
 * `tokenizer.` is copied into the main file's header exactly as it is
 * stored, byte for byte, whatever its type. Nothing is decoded and
 * re-encoded, so nothing can drift: a 129,280-entry string array goes
 * across as one memcpy. Other keys (`general.*` above all) stay behind; the
 * output describes the model, not the vocabulary file. The MTP file gets no
 * tokenizer: the engine reads it only for weights.
 *
 * A GGUF KV does not record its own length. The value starts at `kv->value`
 * and ends where gguf_skip_value() -- the walk gguf_open() already used to
 * check it -- stops, so that walk is simply run again over a cursor.
 *
 * Checks, all made before any output file is created:
 *
 *   - the file is a well-formed GGUF v3 (ds4.c's gguf_open());
 *   - `tokenizer.ggml.tokens` is an array of strings;
 *   - it has exactly one entry per row of the embedding (`vocab_size`):
 *     a tokenizer for another model would produce ids past the end of
 *     token_embd, or leave rows that no text can reach.
 */

struct convert_vocab {
    struct gguf file;          /* mapped read-only; all zero when there is no --vocab */
    uint64_t n_keys;           /* tokenizer.* keys found */
};

static bool convert_is_tokenizer_key(const struct gguf_kv *kv) {
    return kv->key_len > 10 && memcmp(kv->key, "tokenizer.", 10) == 0;
}

/* Bytes of the value of `kv`, found by stepping over it once more. */
static uint64_t convert_kv_value_bytes(const struct gguf *g, const struct gguf_kv *kv) {
    uint64_t start = (uint64_t)(kv->value - g->map);
    struct cursor c = { g->map, start, g->size, false };
    bool ok = gguf_skip_value(&c, kv->type, 0);
    return ok ? c.pos - start : 0;    /* never 0: gguf_open() walked this value */
}

static bool convert_vocab_check(struct convert_vocab *v, const char *path, int64_t vocab_size) {
    struct gguf_array toks;
    if (!gguf_get_array(&v->file, "tokenizer.ggml.tokens", &toks) ||
        toks.item_type != GGUF_STRING)
        return convert_fail("--vocab: %s: no tokenizer.ggml.tokens array of strings", path);
    if (toks.count != (uint64_t)vocab_size)
        return convert_fail("--vocab: %s: tokenizer.ggml.tokens has %llu tokens, but the "
                            "model's vocab_size is %lld", path, (unsigned long long)toks.count,
                            (long long)vocab_size);
    for (uint64_t i = 0; i < v->file.n_kv; i++)
        v->n_keys += convert_is_tokenizer_key(&v->file.kvs[i]);
    return true;
}

/* Open and check VOCAB.gguf; a NULL path leaves an empty vocabulary. */
static bool convert_vocab_open(struct convert_vocab *v, const char *path, int64_t vocab_size) {
    struct ds4_error e = { "" };
    memset(v, 0, sizeof *v);
    if (!path) return true;
    if (!gguf_open(&v->file, path, &e)) return convert_fail("--vocab: %s", e.msg);
    if (convert_vocab_check(v, path, vocab_size)) return true;
    gguf_close(&v->file);
    return false;
}

static void convert_vocab_close(struct convert_vocab *v) {
    gguf_close(&v->file);
}

/* Append every tokenizer.* KV, as stored: key, type, value bytes. */
static void convert_vocab_write(struct convert_buf *kv, const struct convert_vocab *v) {
    for (uint64_t i = 0; i < v->file.n_kv; i++) {
        const struct gguf_kv *src = &v->file.kvs[i];
        if (!convert_is_tokenizer_key(src)) continue;
        gguf_write_u64(kv, src->key_len);
        gguf_write_put(kv, src->key, (size_t)src->key_len);
        gguf_write_u32(kv, src->type);
        gguf_write_put(kv, src->value, (size_t)convert_kv_value_bytes(&v->file, src));
        kv->count++;
    }
}

/* ===========================================================================
 * 7. The tensor plan: published names, shapes and types
 * ===========================================================================
 *
 * Before a byte is written we make the complete list of output tensors: the
 * GGUF name, the checkpoint name it comes from, the GGUF shape and the
 * type. Because every size is then known, the header can be written first
 * and the weights streamed after it, and because every source is opened
 * and checked before the output file is even created, a bad checkpoint
 * fails in a second, not after an hour of quantizing.
 *
 * Names and shapes are those of the published files [FMT §1.3]. The rule
 * that links the two sides is always the same: checkpoint [out][in] is
 * GGUF [in, out] (ne0 = in), so a tensor's checkpoint shape is [ne1][ne0].
 * The one 3-D kind, routed experts, stacks E checkpoint matrices
 * `ffn.experts.e.w1` into one GGUF tensor [in, out, E]: expert e is the e-th
 * slab of `out` rows [FMT §1.4].
 *
 * Types. Each tensor has a role, and the role and --type pick the type:
 *
 *   role          f16    q8_0   q2        q4      tensors
 *   vector        F32    F32    F32       F32     norms, biases, sinks, hc scale/base
 *   plain         F16    F16    F16       F16     embedding, compressors, indexer
 *   fn            F32    F16    F16       F16     hc fn matrices, router
 *                 (F32 in the MTP file at every type)
 *   projection    F16    Q8_0   Q8_0      Q8_0    attn q_a/q_b/kv/output_a/b,
 *                                                 shared expert, output, e/h_proj
 *   expert gate   F16    Q8_0   IQ2_XXS   Q4_K    ffn_{gate,up}_exps
 *   expert down   F16    Q8_0   Q2_K      Q4_K    ffn_down_exps
 *   ids           I32    I32    I32       I32     ffn_gate_tid2eid
 *
 * The MTP file follows the published DeepSeek-V4-Flash-MTP-Q4K-Q8_0-F32:
 * its "fn" tensors are F32, and at q2 its experts are Q4_K.
 *
 * Why "fn" is F32 at f16 while the published main files store it F16: f16 is
 * the type that keeps the checkpoint's values, and the hyper-connection fn
 * matrices are float32 in the checkpoint (model.py builds them under
 * float32). Rounding them to f16 (11 significant bits) moves every mix
 * coefficient by up to 2^-12 relative, and that shows: on a random
 * checkpoint in the release formats (tools/fullwidth_oracle.py, width
 * small) it put the logits 5.5e-5 (median) from the float32 oracle and the
 * MTP rows 6.6e-4; stored F32 they are 1.8e-6 and 3.7e-6. The matrices are
 * small (24 x 16384 per block at full width, 1.5 MiB in F32), so the cost is
 * nothing. q8_0/q2/q4 keep the published F16 layout.
 * A matrix whose rows are not a whole number of blocks of its type (Q8_0
 * needs 32 | ne0, the K and IQ2 types 256 | ne0) is written as F16 instead,
 * with a note; this only happens for small test models. BF16 is never
 * written: the engine refuses it.
 */

enum convert_qtype { CONVERT_Q_F16, CONVERT_Q_Q8_0, CONVERT_Q_Q2, CONVERT_Q_Q4 };

enum convert_role {
    ROLE_VECTOR, ROLE_PLAIN, ROLE_FN, ROLE_PROJ, ROLE_EXP_GATE_UP, ROLE_EXP_DOWN, ROLE_IDS
};

/* What a synthetic model puts in a tensor (section 9). */
enum convert_fill { FILL_WEIGHT, FILL_ONES, FILL_ZEROS, FILL_SMALL, FILL_IDS };

struct convert_tensor {
    char name[96];             /* GGUF name */
    char src[128];             /* checkpoint name; experts: "layers.3.ffn.experts" */
    const char *part;          /* experts only: "w1", "w3" or "w2" */
    int role, fill;
    int n_dims;
    int64_t ne[3];             /* GGUF order: ne[0] is the row length */
    uint32_t type;
    uint64_t offset, n_bytes;  /* within the data section */
};

struct convert_plan {
    struct convert_tensor *t;
    int n, cap;
    const struct convert_config *cfg;
    const struct st_db *db;    /* the checkpoint; NULL for a synthetic model */
    int qtype;                 /* enum convert_qtype */
    bool mtp;                  /* planning the MTP file */
    uint64_t seed;             /* synthetic models only */
    const struct convert_vocab *vocab;  /* tokenizer.* keys to copy; NULL: none */
    uint64_t data_bytes;
};

static const char *convert_type_name(uint32_t type) {
    switch (type) {
    case TYPE_F32: return "F32";
    case TYPE_F16: return "F16";
    case TYPE_Q8_0: return "Q8_0";
    case TYPE_Q2_K: return "Q2_K";
    case TYPE_Q4_K: return "Q4_K";
    case TYPE_IQ2_XXS: return "IQ2_XXS";
    case TYPE_I32: return "I32";
    default: return "?";
    }
}

static int64_t convert_block_values(uint32_t type) {
    if (type == TYPE_F32 || type == TYPE_F16 || type == TYPE_I32) return 1;
    return type_traits_of(type)->block_values;
}

static uint64_t convert_row_bytes(uint32_t type, int64_t n) {
    if (type == TYPE_F32 || type == TYPE_I32) return 4 * (uint64_t)n;
    if (type == TYPE_F16) return 2 * (uint64_t)n;
    return (uint64_t)type_row_bytes(type, n);
}

static uint32_t convert_pick_type(int role, int qtype, bool mtp) {
    static const uint32_t gate[4] = {TYPE_F16, TYPE_Q8_0, TYPE_IQ2_XXS, TYPE_Q4_K};
    static const uint32_t down[4] = {TYPE_F16, TYPE_Q8_0, TYPE_Q2_K, TYPE_Q4_K};
    switch (role) {
    case ROLE_VECTOR: return TYPE_F32;
    case ROLE_PLAIN: return TYPE_F16;
    case ROLE_FN: return mtp || qtype == CONVERT_Q_F16 ? TYPE_F32 : TYPE_F16;
    case ROLE_IDS: return TYPE_I32;
    case ROLE_PROJ: return qtype == CONVERT_Q_F16 ? TYPE_F16 : TYPE_Q8_0;
    case ROLE_EXP_GATE_UP: return mtp && qtype == CONVERT_Q_Q2 ? TYPE_Q4_K : gate[qtype];
    default: return mtp && qtype == CONVERT_Q_Q2 ? TYPE_Q4_K : down[qtype];
    }
}

/* Append one tensor. ne1 == 0 means a vector, ne2 == 0 a matrix. */
static struct convert_tensor *convert_plan_add(struct convert_plan *p, int role, int fill,
                                               const char *name, const char *src,
                                               int64_t ne0, int64_t ne1, int64_t ne2) {
    if (p->n == p->cap) {
        p->cap = p->cap ? p->cap * 2 : 256;
        p->t = xrealloc(p->t, (size_t)p->cap * sizeof *p->t);
    }
    struct convert_tensor *t = &p->t[p->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    snprintf(t->src, sizeof t->src, "%s", src);
    t->role = role;
    t->fill = fill;
    t->n_dims = ne1 == 0 ? 1 : ne2 == 0 ? 2 : 3;
    t->ne[0] = ne0;
    t->ne[1] = ne1 ? ne1 : 1;
    t->ne[2] = ne2 ? ne2 : 1;
    return t;
}

/* The same, for a tensor of one block: "blk.3" + "attn_q_a.weight" from
 * "layers.3" + "attn.wq_a.weight". */
static struct convert_tensor *convert_plan_layer(struct convert_plan *p, int role, int fill,
                                                 const char *gguf_prefix, const char *gguf_name,
                                                 const char *src_prefix, const char *src_name,
                                                 int64_t ne0, int64_t ne1, int64_t ne2) {
    char name[96], src[128];
    snprintf(name, sizeof name, "%s.%s", gguf_prefix, gguf_name);
    snprintf(src, sizeof src, "%s.%s", src_prefix, src_name);
    return convert_plan_add(p, role, fill, name, src, ne0, ne1, ne2);
}

/* ---- 7.1 One transformer block --------------------------------------------
 *
 * The table below is the per-block part of [FMT §1.3], in the published
 * order. Dimensions are symbolic so the same table serves Flash and every
 * smaller model; `convert_dim()` turns a symbol into a number. `when` says
 * which layers have the tensor: all, compressed layers (ratio != 0), or
 * layers with an indexer (ratio == 4). The compressor width is
 * CW = coff * Dh with coff = 2 when the ratio is 4 (overlapping windows)
 * and 1 otherwise; the indexer compressor is 2 * DI wide for the same reason.
 */

enum convert_dim_symbol {
    DIM_NONE, DIM_1, DIM_3, DIM_4, DIM_D, DIM_Q, DIM_H, DIM_DH, DIM_H_DH, DIM_GROUP_IN,
    DIM_G_O, DIM_N_D, DIM_M, DIM_E, DIM_F, DIM_CW, DIM_RATIO, DIM_HI, DIM_HI_DI, DIM_DI,
    DIM_2DI, DIM_HC, DIM_V
};

enum { WHEN_ALL, WHEN_COMPRESSED, WHEN_INDEXER };

struct convert_layer_row {
    const char *gguf, *src;
    int role, fill, when;
    int d0, d1;                /* GGUF ne0, ne1 */
};

static const struct convert_layer_row convert_block_rows[] = {
    {"hc_attn_fn.weight",     "hc_attn_fn",          ROLE_FN,     FILL_WEIGHT, WHEN_ALL, DIM_N_D, DIM_M},
    {"hc_attn_scale.weight",  "hc_attn_scale",       ROLE_VECTOR, FILL_SMALL, WHEN_ALL, DIM_3, DIM_NONE},
    {"hc_attn_base.weight",   "hc_attn_base",        ROLE_VECTOR, FILL_SMALL, WHEN_ALL, DIM_M, DIM_NONE},
    {"attn_norm.weight",      "attn_norm.weight",    ROLE_VECTOR, FILL_ONES,  WHEN_ALL, DIM_D, DIM_NONE},
    {"attn_q_a.weight",       "attn.wq_a.weight",    ROLE_PROJ,   FILL_WEIGHT, WHEN_ALL, DIM_D, DIM_Q},
    {"attn_q_a_norm.weight",  "attn.q_norm.weight",  ROLE_VECTOR, FILL_ONES,  WHEN_ALL, DIM_Q, DIM_NONE},
    {"attn_q_b.weight",       "attn.wq_b.weight",    ROLE_PROJ,   FILL_WEIGHT, WHEN_ALL, DIM_Q, DIM_H_DH},
    {"attn_kv.weight",        "attn.wkv.weight",     ROLE_PROJ,   FILL_WEIGHT, WHEN_ALL, DIM_D, DIM_DH},
    {"attn_kv_a_norm.weight", "attn.kv_norm.weight", ROLE_VECTOR, FILL_ONES,  WHEN_ALL, DIM_DH, DIM_NONE},
    {"attn_sinks.weight",     "attn.attn_sink",      ROLE_VECTOR, FILL_ZEROS, WHEN_ALL, DIM_H, DIM_NONE},
    {"attn_output_a.weight",  "attn.wo_a.weight",    ROLE_PROJ,   FILL_WEIGHT, WHEN_ALL, DIM_GROUP_IN, DIM_G_O},
    {"attn_output_b.weight",  "attn.wo_b.weight",    ROLE_PROJ,   FILL_WEIGHT, WHEN_ALL, DIM_G_O, DIM_D},
    {"attn_compressor_ape.weight",  "attn.compressor.ape",          ROLE_PLAIN,  FILL_SMALL,  WHEN_COMPRESSED, DIM_CW, DIM_RATIO},
    {"attn_compressor_kv.weight",   "attn.compressor.wkv.weight",   ROLE_PLAIN,  FILL_WEIGHT, WHEN_COMPRESSED, DIM_D, DIM_CW},
    {"attn_compressor_gate.weight", "attn.compressor.wgate.weight", ROLE_PLAIN,  FILL_WEIGHT, WHEN_COMPRESSED, DIM_D, DIM_CW},
    {"attn_compressor_norm.weight", "attn.compressor.norm.weight",  ROLE_VECTOR, FILL_ONES,   WHEN_COMPRESSED, DIM_DH, DIM_NONE},
    {"indexer.attn_q_b.weight",        "attn.indexer.wq_b.weight",                ROLE_PLAIN,  FILL_WEIGHT, WHEN_INDEXER, DIM_Q, DIM_HI_DI},
    {"indexer.proj.weight",            "attn.indexer.weights_proj.weight",        ROLE_PLAIN,  FILL_WEIGHT, WHEN_INDEXER, DIM_D, DIM_HI},
    {"indexer_compressor_ape.weight",  "attn.indexer.compressor.ape",             ROLE_PLAIN,  FILL_SMALL,  WHEN_INDEXER, DIM_2DI, DIM_RATIO},
    {"indexer_compressor_kv.weight",   "attn.indexer.compressor.wkv.weight",      ROLE_PLAIN,  FILL_WEIGHT, WHEN_INDEXER, DIM_D, DIM_2DI},
    {"indexer_compressor_gate.weight", "attn.indexer.compressor.wgate.weight",    ROLE_PLAIN,  FILL_WEIGHT, WHEN_INDEXER, DIM_D, DIM_2DI},
    {"indexer_compressor_norm.weight", "attn.indexer.compressor.norm.weight",     ROLE_VECTOR, FILL_ONES,   WHEN_INDEXER, DIM_DI, DIM_NONE},
    {"hc_ffn_fn.weight",      "hc_ffn_fn",           ROLE_FN,     FILL_WEIGHT, WHEN_ALL, DIM_N_D, DIM_M},
    {"hc_ffn_scale.weight",   "hc_ffn_scale",        ROLE_VECTOR, FILL_SMALL, WHEN_ALL, DIM_3, DIM_NONE},
    {"hc_ffn_base.weight",    "hc_ffn_base",         ROLE_VECTOR, FILL_SMALL, WHEN_ALL, DIM_M, DIM_NONE},
    {"ffn_norm.weight",       "ffn_norm.weight",     ROLE_VECTOR, FILL_ONES,  WHEN_ALL, DIM_D, DIM_NONE},
    {"ffn_gate_inp.weight",   "ffn.gate.weight",     ROLE_FN,     FILL_WEIGHT, WHEN_ALL, DIM_D, DIM_E},
};

/* The shared expert: always present, one Q8_0 SwiGLU MLP of width F. */
static const struct convert_layer_row convert_shared_rows[] = {
    {"ffn_gate_shexp.weight", "ffn.shared_experts.w1.weight", ROLE_PROJ, FILL_WEIGHT, WHEN_ALL, DIM_D, DIM_F},
    {"ffn_up_shexp.weight",   "ffn.shared_experts.w3.weight", ROLE_PROJ, FILL_WEIGHT, WHEN_ALL, DIM_D, DIM_F},
    {"ffn_down_shexp.weight", "ffn.shared_experts.w2.weight", ROLE_PROJ, FILL_WEIGHT, WHEN_ALL, DIM_F, DIM_D},
};

static int64_t convert_dim(const struct convert_config *c, int symbol, int64_t ratio) {
    switch (symbol) {
    case DIM_1: return 1;
    case DIM_3: return 3;
    case DIM_4: return 4;
    case DIM_D: return c->dim;
    case DIM_Q: return c->q_lora;
    case DIM_H: return c->n_heads;
    case DIM_DH: return c->head_dim;
    case DIM_H_DH: return c->n_heads * c->head_dim;
    case DIM_GROUP_IN: return c->n_heads * c->head_dim / c->o_groups;
    case DIM_G_O: return c->o_groups * c->o_lora;
    case DIM_N_D: return c->hc * c->dim;
    case DIM_M: return (2 + c->hc) * c->hc;
    case DIM_E: return c->n_experts;
    case DIM_F: return c->ffn;
    case DIM_CW: return (ratio == 4 ? 2 : 1) * c->head_dim;
    case DIM_RATIO: return ratio;
    case DIM_HI: return c->idx_heads;
    case DIM_HI_DI: return c->idx_heads * c->idx_dim;
    case DIM_DI: return c->idx_dim;
    case DIM_2DI: return 2 * c->idx_dim;
    case DIM_HC: return c->hc;
    case DIM_V: return c->vocab;
    default: return 0;
    }
}

static void convert_plan_rows(struct convert_plan *p, const struct convert_layer_row *rows,
                              size_t n, const char *gp, const char *sp, int64_t ratio) {
    for (size_t i = 0; i < n; i++) {
        const struct convert_layer_row *r = &rows[i];
        if (r->when == WHEN_COMPRESSED && ratio == 0) continue;
        if (r->when == WHEN_INDEXER && ratio != 4) continue;
        convert_plan_layer(p, r->role, r->fill, gp, r->gguf, sp, r->src,
                           convert_dim(p->cfg, r->d0, ratio), convert_dim(p->cfg, r->d1, ratio), 0);
    }
}

/* The router bias `ffn.gate.bias` only steers top-k selection, so hash
 * layers (which do not select) usually lack it; it is written when the
 * checkpoint has it and required where top-k routing needs it. */
static bool convert_wants_bias(const struct convert_plan *p, const char *sp, bool hash) {
    char src[128];
    snprintf(src, sizeof src, "%s.ffn.gate.bias", sp);
    if (!hash) return true;
    return p->db && st_find(p->db, src);
}

static void convert_plan_experts(struct convert_plan *p, const char *gp, const char *sp) {
    const struct convert_config *c = p->cfg;
    static const char *gguf[3] = {"ffn_gate_exps.weight", "ffn_up_exps.weight",
                                  "ffn_down_exps.weight"};
    static const char *part[3] = {"w1", "w3", "w2"};
    for (int k = 0; k < 3; k++) {
        bool down = k == 2;
        struct convert_tensor *t =
            convert_plan_layer(p, down ? ROLE_EXP_DOWN : ROLE_EXP_GATE_UP, FILL_WEIGHT, gp,
                               gguf[k], sp, "ffn.experts", down ? c->ffn : c->dim,
                               down ? c->dim : c->ffn, c->n_experts);
        t->part = part[k];
    }
}

/* One block: gp is the GGUF prefix ("blk.3", "mtp.0"), sp the checkpoint
 * prefix ("layers.3", "mtp.0"). */
static void convert_plan_block(struct convert_plan *p, const char *gp, const char *sp,
                               int64_t ratio, bool hash) {
    const struct convert_config *c = p->cfg;
    convert_plan_rows(p, convert_block_rows,
                      sizeof convert_block_rows / sizeof convert_block_rows[0], gp, sp, ratio);
    if (convert_wants_bias(p, sp, hash))
        convert_plan_layer(p, ROLE_VECTOR, FILL_ZEROS, gp, "exp_probs_b.bias", sp,
                           "ffn.gate.bias", c->n_experts, 0, 0);
    if (hash)
        convert_plan_layer(p, ROLE_IDS, FILL_IDS, gp, "ffn_gate_tid2eid.weight", sp,
                           "ffn.gate.tid2eid", c->n_used, c->vocab, 0);
    convert_plan_experts(p, gp, sp);
    convert_plan_rows(p, convert_shared_rows,
                      sizeof convert_shared_rows / sizeof convert_shared_rows[0], gp, sp, ratio);
}

/* ---- 7.2 The two files ------------------------------------------------------ */

/* The main file: embedding, the output head (written first, as published),
 * then every block. */
static void convert_plan_main(struct convert_plan *p) {
    const struct convert_config *c = p->cfg;
    convert_plan_add(p, ROLE_PLAIN, FILL_WEIGHT, "token_embd.weight", "embed.weight",
                     c->dim, c->vocab, 0);
    convert_plan_add(p, ROLE_VECTOR, FILL_SMALL, "output_hc_base.weight", "hc_head_base",
                     c->hc, 0, 0);
    convert_plan_add(p, ROLE_FN, FILL_WEIGHT, "output_hc_fn.weight", "hc_head_fn",
                     c->hc * c->dim, c->hc, 0);
    convert_plan_add(p, ROLE_VECTOR, FILL_SMALL, "output_hc_scale.weight", "hc_head_scale",
                     1, 0, 0);
    convert_plan_add(p, ROLE_VECTOR, FILL_ONES, "output_norm.weight", "norm.weight",
                     c->dim, 0, 0);
    convert_plan_add(p, ROLE_PROJ, FILL_WEIGHT, "output.weight", "head.weight",
                     c->dim, c->vocab, 0);
    for (int64_t l = 0; l < c->n_layers; l++) {
        char gp[32], sp[32];
        snprintf(gp, sizeof gp, "blk.%lld", (long long)l);
        snprintf(sp, sizeof sp, "layers.%lld", (long long)l);
        convert_plan_block(p, gp, sp, c->ratios[l], l < c->n_hash);
    }
}

/* The MTP file [FMT §1.5]: its own HC head and the two input projections,
 * then one block that never hash-routes. The embedding and output head are
 * shared with the main file and not repeated. */
static void convert_plan_mtp(struct convert_plan *p) {
    const struct convert_config *c = p->cfg;
    convert_plan_add(p, ROLE_VECTOR, FILL_SMALL, "mtp.0.hc_head_base.weight",
                     "mtp.0.hc_head_base", c->hc, 0, 0);
    convert_plan_add(p, ROLE_FN, FILL_WEIGHT, "mtp.0.hc_head_fn.weight", "mtp.0.hc_head_fn",
                     c->hc * c->dim, c->hc, 0);
    convert_plan_add(p, ROLE_VECTOR, FILL_SMALL, "mtp.0.hc_head_scale.weight",
                     "mtp.0.hc_head_scale", 1, 0, 0);
    convert_plan_add(p, ROLE_PROJ, FILL_WEIGHT, "mtp.0.e_proj.weight", "mtp.0.e_proj.weight",
                     c->dim, c->dim, 0);
    convert_plan_add(p, ROLE_PROJ, FILL_WEIGHT, "mtp.0.h_proj.weight", "mtp.0.h_proj.weight",
                     c->dim, c->dim, 0);
    convert_plan_add(p, ROLE_VECTOR, FILL_ONES, "mtp.0.enorm.weight", "mtp.0.enorm.weight",
                     c->dim, 0, 0);
    convert_plan_add(p, ROLE_VECTOR, FILL_ONES, "mtp.0.hnorm.weight", "mtp.0.hnorm.weight",
                     c->dim, 0, 0);
    convert_plan_add(p, ROLE_VECTOR, FILL_ONES, "mtp.0.norm.weight", "mtp.0.norm.weight",
                     c->dim, 0, 0);
    convert_plan_block(p, "mtp.0", "mtp.0", convert_mtp_ratio(c), false);
}

/* Types and offsets, once the list is complete. */
static void convert_plan_finish(struct convert_plan *p) {
    uint64_t offset = 0;
    for (int i = 0; i < p->n; i++) {
        struct convert_tensor *t = &p->t[i];
        t->type = convert_pick_type(t->role, p->qtype, p->mtp);
        if (t->ne[0] % convert_block_values(t->type) != 0) {
            fprintf(stderr, "note: %s: rows of %lld values are not whole %s blocks of %lld; "
                    "writing F16\n", t->name, (long long)t->ne[0], convert_type_name(t->type),
                    (long long)convert_block_values(t->type));
            t->type = TYPE_F16;
        }
        t->n_bytes = convert_row_bytes(t->type, t->ne[0]) * (uint64_t)(t->ne[1] * t->ne[2]);
        t->offset = offset;
        offset += (t->n_bytes + GGUF_WRITE_ALIGN - 1) / GGUF_WRITE_ALIGN * GGUF_WRITE_ALIGN;
    }
    p->data_bytes = offset;
}

static void convert_plan_init(struct convert_plan *p, const struct convert_config *cfg,
                              const struct st_db *db, int qtype, bool mtp) {
    memset(p, 0, sizeof *p);
    p->cfg = cfg;
    p->db = db;
    p->qtype = qtype;
    p->mtp = mtp;
    if (mtp) convert_plan_mtp(p);
    else convert_plan_main(p);
    convert_plan_finish(p);
}

static void convert_plan_free(struct convert_plan *p) {
    free(p->t);
    memset(p, 0, sizeof *p);
}

/* ---- 7.3 Metadata ----------------------------------------------------------
 *
 * Every `deepseek4.*` key the engine reads [FMT §1.2], with its value taken
 * from the configuration, plus `general.*`. Both files get the same keys: the
 * engine reads none from the MTP file, but a self-describing file is easier
 * to check. Per-layer arrays have one entry per main layer. With --vocab,
 * the main file's metadata ends with the copied `tokenizer.*` keys (6.2).
 */

static void convert_write_metadata(struct convert_buf *kv, const struct convert_config *c,
                                   const char *name) {
    gguf_write_kv_str(kv, "general.architecture", "deepseek4");
    gguf_write_kv_str(kv, "general.name", name);
    gguf_write_kv_u32(kv, "general.alignment", GGUF_WRITE_ALIGN);
    gguf_write_kv_u32(kv, "deepseek4.block_count", c->n_layers);
    gguf_write_kv_u64(kv, "deepseek4.context_length", c->context_length);
    gguf_write_kv_u32(kv, "deepseek4.embedding_length", c->dim);
    gguf_write_kv_u32(kv, "deepseek4.vocab_size", c->vocab);
    gguf_write_kv_u32(kv, "deepseek4.attention.head_count", c->n_heads);
    gguf_write_kv_u32(kv, "deepseek4.attention.head_count_kv", 1);
    gguf_write_kv_u32(kv, "deepseek4.attention.key_length", c->head_dim);
    gguf_write_kv_u32(kv, "deepseek4.attention.value_length", c->head_dim);
    gguf_write_kv_u32(kv, "deepseek4.rope.dimension_count", c->rope_dim);
    gguf_write_kv_u32(kv, "deepseek4.attention.q_lora_rank", c->q_lora);
    gguf_write_kv_u32(kv, "deepseek4.attention.output_lora_rank", c->o_lora);
    gguf_write_kv_u32(kv, "deepseek4.attention.output_group_count", c->o_groups);
    gguf_write_kv_u32(kv, "deepseek4.expert_count", c->n_experts);
    gguf_write_kv_u32(kv, "deepseek4.expert_used_count", c->n_used);
    gguf_write_kv_u32(kv, "deepseek4.expert_feed_forward_length", c->ffn);
    gguf_write_kv_u32(kv, "deepseek4.expert_shared_count", c->n_shared);
    gguf_write_kv_u32(kv, "deepseek4.hash_layer_count", c->n_hash);
    gguf_write_kv_u32(kv, "deepseek4.expert_group_count", 0);
    gguf_write_kv_u32(kv, "deepseek4.expert_group_used_count", 0);
    gguf_write_kv_u32(kv, "deepseek4.attention.sliding_window", c->window);
    gguf_write_kv_u32(kv, "deepseek4.attention.indexer.head_count", c->idx_heads);
    gguf_write_kv_u32(kv, "deepseek4.attention.indexer.key_length", c->idx_dim);
    gguf_write_kv_u32(kv, "deepseek4.attention.indexer.top_k", c->idx_topk);
    gguf_write_kv_u32(kv, "deepseek4.hyper_connection.count", c->hc);
    gguf_write_kv_u32(kv, "deepseek4.hyper_connection.sinkhorn_iterations", c->hc_iters);
    gguf_write_kv_u32_array(kv, "deepseek4.attention.compress_ratios", c->ratios, c->n_layers);
    gguf_write_kv_f32_array(kv, "deepseek4.swiglu_clamp_exp", c->swiglu_limit, c->n_layers);
    gguf_write_kv_u64(kv, "deepseek4.rope.scaling.original_context_length", c->original_seq_len);
    gguf_write_kv_f32(kv, "deepseek4.rope.freq_base", c->rope_theta);
    gguf_write_kv_f32(kv, "deepseek4.rope.scaling.factor", c->rope_factor);
    gguf_write_kv_f32(kv, "deepseek4.rope.scaling.yarn_beta_fast", c->beta_fast);
    gguf_write_kv_f32(kv, "deepseek4.rope.scaling.yarn_beta_slow", c->beta_slow);
    gguf_write_kv_f32(kv, "deepseek4.attention.compress_rope_freq_base", c->compress_rope_theta);
    gguf_write_kv_f32(kv, "deepseek4.expert_weights_scale", c->route_scale);
    gguf_write_kv_f32(kv, "deepseek4.attention.layer_norm_rms_epsilon", c->norm_eps);
    gguf_write_kv_f32(kv, "deepseek4.hyper_connection.epsilon", c->hc_eps);
    gguf_write_kv_bool(kv, "deepseek4.expert_weights_norm", c->weights_norm);
}

/* Header + metadata + tensor directory + padding, as one buffer. */
static void convert_build_header(struct convert_buf *h, const struct convert_plan *p,
                                 const char *name) {
    struct convert_buf kv = {0};
    convert_write_metadata(&kv, p->cfg, name);
    if (p->vocab) convert_vocab_write(&kv, p->vocab);
    gguf_write_u32(h, 0x46554747u);            /* "GGUF" */
    gguf_write_u32(h, 3);
    gguf_write_u64(h, (uint64_t)p->n);
    gguf_write_u64(h, kv.count);
    gguf_write_put(h, kv.p, kv.n);
    for (int i = 0; i < p->n; i++) {
        const struct convert_tensor *t = &p->t[i];
        gguf_write_str(h, t->name);
        gguf_write_u32(h, (uint32_t)t->n_dims);
        for (int d = 0; d < t->n_dims; d++) gguf_write_u64(h, (uint64_t)t->ne[d]);
        gguf_write_u32(h, t->type);
        gguf_write_u64(h, t->offset);
    }
    static const uint8_t zeros[GGUF_WRITE_ALIGN];
    gguf_write_put(h, zeros, (GGUF_WRITE_ALIGN - h->n % GGUF_WRITE_ALIGN) % GGUF_WRITE_ALIGN);
    free(kv.p);
}

/* ===========================================================================
 * 8. Converting a checkpoint
 * ===========================================================================
 *
 * For each planned tensor: read a chunk of rows as floats (section 5.1),
 * encode them in the output type, append them to the file. A chunk is at
 * most CONVERT_CHUNK_FLOATS floats, so memory stays flat however large the
 * model is: the biggest single matrix of Flash, the 129280 x 4096 embedding,
 * goes through in 2 GB of f32 if read at once, and in 32 MB this way.
 *
 * Quantization is the only slow step (IQ2_XXS searches a grid for every
 * group of 8 values), so the rows of a chunk are split over threads. The
 * first row of every chunk is encoded alone before the threads start, so
 * a quantizer that builds lookup tables on first use builds them once,
 * race-free.
 */

#define CONVERT_CHUNK_FLOATS (8 << 20)
#define CONVERT_MAX_THREADS 64

static bool convert_quiet;     /* tests turn progress lines off */

struct convert_encode_task {
    uint32_t type;
    const float *src;          /* [rows][cols] */
    uint8_t *dst;              /* [rows][row_bytes] */
    int64_t cols, r0, r1;
    uint64_t row_bytes;
};

static void convert_encode_range(const struct convert_encode_task *t) {
    for (int64_t r = t->r0; r < t->r1; r++) {
        const float *x = t->src + r * t->cols;
        uint8_t *y = t->dst + (uint64_t)r * t->row_bytes;
        if (t->type == TYPE_F32) {
            memcpy(y, x, (size_t)t->cols * 4);
        } else if (t->type == TYPE_F16) {
            for (int64_t i = 0; i < t->cols; i++) {
                uint16_t h = f32_to_f16(x[i]);
                memcpy(y + 2 * i, &h, 2);
            }
        } else {
            quantize_row(t->type, x, y, t->cols);
        }
    }
}

static void *convert_encode_thread(void *arg) {
    convert_encode_range(arg);
    return NULL;
}

static int convert_thread_count(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > CONVERT_MAX_THREADS ? CONVERT_MAX_THREADS : (int)n;
}

/* Encode rows [0, n) of src into dst.
 *
 * F32 and F16 are memory-bound and stay on one thread. Quantized rows are
 * split into equal contiguous ranges, one per thread; every row is
 * independent, so the output bytes do not depend on the thread count (the
 * tests rely on that: two conversions of the same checkpoint are identical
 * byte for byte). */
static void convert_encode_rows(uint32_t type, const float *src, int64_t n, int64_t cols,
                                uint8_t *dst) {
    struct convert_encode_task all = {type, src, dst, cols, 0, n, convert_row_bytes(type, cols)};
    int threads = convert_thread_count();
    if (type == TYPE_F32 || type == TYPE_F16 || n < 2 || threads < 2) {
        convert_encode_range(&all);
        return;
    }
    struct convert_encode_task first = all, task[CONVERT_MAX_THREADS];
    pthread_t tid[CONVERT_MAX_THREADS];
    bool started[CONVERT_MAX_THREADS] = {0};
    first.r1 = 1;
    convert_encode_range(&first);
    if (threads > n - 1) threads = (int)(n - 1);
    for (int k = 0; k < threads; k++) {
        task[k] = all;
        task[k].r0 = 1 + (n - 1) * k / threads;
        task[k].r1 = 1 + (n - 1) * (k + 1) / threads;
        started[k] = pthread_create(&tid[k], NULL, convert_encode_thread, &task[k]) == 0;
        if (!started[k]) convert_encode_range(&task[k]);
    }
    for (int k = 0; k < threads; k++)
        if (started[k]) pthread_join(tid[k], NULL);
}

/* Scratch memory for one chunk: floats in, encoded bytes out. */
struct convert_scratch {
    float *f;
    uint8_t *q;
    size_t f_cap, q_cap;
};

static void convert_scratch_need(struct convert_scratch *s, size_t floats, size_t bytes) {
    if (floats > s->f_cap) {
        free(s->f);
        s->f = convert_zalloc(floats * sizeof *s->f);
        s->f_cap = floats;
    }
    if (bytes > s->q_cap) {
        free(s->q);
        s->q = convert_zalloc(bytes);
        s->q_cap = bytes;
    }
}

static void convert_scratch_free(struct convert_scratch *s) {
    free(s->f);
    free(s->q);
    memset(s, 0, sizeof *s);
}

static int64_t convert_chunk_rows(int64_t cols) {
    return cols >= CONVERT_CHUNK_FLOATS ? 1 : CONVERT_CHUNK_FLOATS / cols;
}

/* Read, encode and write all rows of one source. */
static bool convert_stream_source(struct gguf_writer *w, const struct st_source *src,
                                  uint32_t type, struct convert_scratch *sc) {
    int64_t step = convert_chunk_rows(src->cols);
    uint64_t row_bytes = convert_row_bytes(type, src->cols);
    convert_scratch_need(sc, (size_t)(step * src->cols), (size_t)(step * (int64_t)row_bytes));
    for (int64_t r0 = 0; r0 < src->rows; r0 += step) {
        int64_t n = src->rows - r0 < step ? src->rows - r0 : step;
        st_source_rows(src, r0, n, sc->f);
        convert_encode_rows(type, sc->f, n, src->cols, sc->q);
        if (!gguf_write_bytes(w, sc->q, (size_t)((uint64_t)n * row_bytes))) return false;
    }
    return true;
}

static void convert_expert_name(char *buf, size_t cap, const struct convert_tensor *t,
                                int64_t e) {
    snprintf(buf, cap, "%s.%lld.%s.weight", t->src, (long long)e, t->part);
}

/* Open (and so validate) every checkpoint tensor behind one planned tensor.
 * With w == NULL this is the dry run made before the output file exists. */
static bool convert_emit_checkpoint(const struct convert_plan *p, const struct convert_tensor *t,
                                    struct gguf_writer *w, struct convert_scratch *sc) {
    struct st_source src;
    if (t->role == ROLE_IDS) {
        int32_t *ids = convert_zalloc((size_t)(t->ne[0] * t->ne[1]) * sizeof *ids);
        bool ok = st_read_ids(p->db, t->src, t->ne[1], t->ne[0], p->cfg->n_experts, ids) &&
                  (!w || gguf_write_bytes(w, ids, (size_t)t->n_bytes));
        free(ids);
        return ok;
    }
    if (t->n_dims == 3) {
        for (int64_t e = 0; e < t->ne[2]; e++) {
            char name[160];
            convert_expert_name(name, sizeof name, t, e);
            if (!st_source_open(&src, p->db, name, t->ne[1], t->ne[0], false)) return false;
            if (w && !convert_stream_source(w, &src, t->type, sc)) return false;
        }
        return true;
    }
    if (!st_source_open(&src, p->db, t->src, t->ne[1], t->ne[0], t->n_dims == 1)) return false;
    return !w || convert_stream_source(w, &src, t->type, sc);
}

static bool convert_check_plan(const struct convert_plan *p) {
    for (int i = 0; i < p->n; i++)
        if (!convert_emit_checkpoint(p, &p->t[i], NULL, NULL)) return false;
    return true;
}

/* ===========================================================================
 * 9. Synthetic models
 * ===========================================================================
 *
 * `--synthetic full --layers N` writes a model with the full published
 * width and random weights. Its purpose is to exercise the engine's memory
 * layout, loading and speed at real size, so the weights need only be VALID
 * (every block decodes to finite numbers) and TAME (activations neither
 * vanish nor explode): a matrix with `in` inputs gets values of standard
 * deviation about 1/sqrt(in), so y = W x keeps the scale of x. Norm weights
 * are 1, biases and attention sinks 0, hc scales and bases small.
 *
 * Running the real quantizer over 2 GB per layer would take minutes, so
 * quantized blocks are generated directly: random codes plus scales chosen
 * to give the target deviation s. With q uniform on its code range:
 *
 *   Q8_0     y = d q, q in [-127, 127]             rms(q) = 73.3
 *            d = s / 73.3
 *   Q2_K     y = d sc q - dmin m, q in 0..3, sc in 4..10, m = round(1.5 sc),
 *            dmin = d, so y ~ d sc (q - 1.5)       rms ~ 8.1 d
 *   Q4_K     y = d sc q - dmin m, q in 0..15, sc in 24..40, dmin = 8 d,
 *            m = round(7.5 sc / 8), so y ~ d sc (q - 7.5)   rms ~ 149 d
 *   IQ2_XXS  y = d (0.5 + s4) / 4 * grid * sign, grid bytes in {8, 25, 43},
 *            s4 in 0..15                            rms ~ 54 d
 *
 * Any byte is a valid IQ2_XXS grid index and any 7 bits a valid sign index,
 * so random bytes plus the 4-bit scale make valid blocks. The block layouts
 * are those of [FMT §2]. A fast xorshift generator, seeded from --seed and
 * the tensor name, makes the output reproducible.
 */

static uint64_t convert_rng_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

/* Uniform in [-1, 1). */
static float convert_rng_sym(uint64_t *s) {
    return (float)(convert_rng_next(s) >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

static void convert_rng_bytes(uint64_t *s, uint8_t *dst, size_t n) {
    for (size_t i = 0; i < n; i += 8) {
        uint64_t r = convert_rng_next(s);
        memcpy(dst + i, &r, n - i < 8 ? n - i : 8);
    }
}

static void convert_put_f16(uint8_t *dst, float v) {
    uint16_t h = f32_to_f16(v);
    memcpy(dst, &h, 2);
}

static void convert_synth_q8_0(uint64_t *s, uint8_t *b, float sd) {
    convert_put_f16(b, sd / 73.3f);
    convert_rng_bytes(s, b + 2, 32);
    for (int i = 2; i < 34; i++)
        if (b[i] == 0x80) b[i] = 0x81;        /* -128 -> -127 */
}

/* Q2_K: scales[16] | qs[64] | d | dmin  (84 bytes) */
static void convert_synth_q2_k(uint64_t *s, uint8_t *b, float sd) {
    for (int k = 0; k < 16; k++) {
        int sc = 4 + (int)(convert_rng_next(s) % 7);
        int m = (3 * sc + 1) / 2;
        b[k] = (uint8_t)(sc | m << 4);
    }
    convert_rng_bytes(s, b + 16, 64);
    convert_put_f16(b + 80, sd / 8.1f);
    convert_put_f16(b + 82, sd / 8.1f);
}

/* Q4_K: d | dmin | scales[12] | qs[128]  (144 bytes). The 6-bit scale sc[k]
 * and min m[k] of the 8 sub-blocks are packed as [FMT §2.3] reads them:
 * k < 4 in the low 6 bits of bytes k and k+4, k >= 4 split into a low
 * nibble in byte k+4 and two high bits on top of bytes k-4 and k. */
static void convert_synth_q4_k(uint64_t *s, uint8_t *b, float sd) {
    int sc[8], m[8];
    for (int k = 0; k < 8; k++) {
        sc[k] = 24 + (int)(convert_rng_next(s) % 17);
        m[k] = (15 * sc[k] + 8) / 16;
    }
    convert_put_f16(b, sd / 149.0f);
    convert_put_f16(b + 2, 8.0f * sd / 149.0f);
    uint8_t *q = b + 4;
    for (int k = 0; k < 4; k++) {
        q[k] = (uint8_t)(sc[k] | (sc[k + 4] >> 4) << 6);
        q[k + 4] = (uint8_t)(m[k] | (m[k + 4] >> 4) << 6);
        q[k + 8] = (uint8_t)((sc[k + 4] & 15) | (m[k + 4] & 15) << 4);
    }
    convert_rng_bytes(s, b + 16, 128);
}

/* IQ2_XXS: d | 8 groups of { u32 grid indices, u32 signs | scale << 28 } */
static void convert_synth_iq2_xxs(uint64_t *s, uint8_t *b, float sd) {
    convert_put_f16(b, sd / 54.0f);
    convert_rng_bytes(s, b + 2, 64);
}

/* `n` floats of the given fill for a tensor whose rows have `cols` values. */
static void convert_synth_floats(uint64_t *s, int fill, int64_t cols, float *dst, int64_t n) {
    float a = sqrtf(3.0f / (float)cols);      /* uniform [-a, a] has sd 1/sqrt(cols) */
    for (int64_t i = 0; i < n; i++) {
        switch (fill) {
        case FILL_ONES: dst[i] = 1.0f; break;
        case FILL_ZEROS: dst[i] = 0.0f; break;
        case FILL_SMALL: dst[i] = 0.05f * convert_rng_sym(s); break;
        default: dst[i] = a * convert_rng_sym(s); break;
        }
    }
}

/* Hash routing ids: each token gets K distinct experts out of E. The real
 * table never repeats an expert within a token (a repeat would just double
 * that expert's weight), so the random one does not either. */
static void convert_synth_ids(uint64_t *s, int64_t k, int64_t n_experts, int32_t *row) {
    for (int64_t i = 0; i < k; i++) {
        bool again = true;
        while (again) {
            row[i] = (int32_t)(convert_rng_next(s) % (uint64_t)n_experts);
            again = false;
            for (int64_t j = 0; j < i && k <= n_experts; j++) again |= row[j] == row[i];
        }
    }
}

/* Rows of random blocks of a quantized type. */
static void convert_synth_blocks(uint64_t *s, uint32_t type, int64_t cols, uint8_t *dst,
                                 int64_t rows) {
    float sd = 1.0f / sqrtf((float)cols);
    int64_t bytes = type_traits_of(type)->block_bytes;
    int64_t blocks = rows * (cols / type_traits_of(type)->block_values);
    for (int64_t i = 0; i < blocks; i++, dst += bytes) {
        if (type == TYPE_Q8_0) convert_synth_q8_0(s, dst, sd);
        else if (type == TYPE_Q2_K) convert_synth_q2_k(s, dst, sd);
        else if (type == TYPE_Q4_K) convert_synth_q4_k(s, dst, sd);
        else convert_synth_iq2_xxs(s, dst, sd);
    }
}

static uint64_t convert_seed_for(uint64_t seed, const char *name) {
    uint64_t h = 1469598103934665603ull ^ seed;
    for (const char *c = name; *c; c++) h = (h ^ (uint8_t)*c) * 1099511628211ull;
    return h ? h : 1;
}

/* Write one synthetic tensor, chunk by chunk. */
static bool convert_emit_synthetic(const struct convert_plan *p, const struct convert_tensor *t,
                                   struct gguf_writer *w, struct convert_scratch *sc) {
    uint64_t rng = convert_seed_for(p->seed, t->name);
    int64_t cols = t->ne[0], rows = t->ne[1] * t->ne[2];
    int64_t step = convert_chunk_rows(cols);
    uint64_t row_bytes = convert_row_bytes(t->type, cols);
    convert_scratch_need(sc, (size_t)(step * cols), (size_t)(step * (int64_t)row_bytes));
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
        int64_t n = rows - r0 < step ? rows - r0 : step;
        if (t->type == TYPE_I32) {
            for (int64_t r = 0; r < n; r++)
                convert_synth_ids(&rng, cols, p->cfg->n_experts, (int32_t *)sc->q + r * cols);
        } else if (t->type == TYPE_F32 || t->type == TYPE_F16) {
            convert_synth_floats(&rng, t->fill, cols, sc->f, n * cols);
            convert_encode_rows(t->type, sc->f, n, cols, sc->q);
        } else {
            convert_synth_blocks(&rng, t->type, cols, sc->q, n);
        }
        if (!gguf_write_bytes(w, sc->q, (size_t)((uint64_t)n * row_bytes))) return false;
    }
    return true;
}

/* ===========================================================================
 * 10. Writing a file, and the command line
 * ===========================================================================
 */

/* "blk.12.attn_q_a.weight" -> 12; -1 for tensors outside the blocks. */
static int convert_block_of(const char *name) {
    return strncmp(name, "blk.", 4) == 0 ? atoi(name + 4) : -1;
}

static void convert_progress(const struct convert_plan *p, int i, const struct gguf_writer *w,
                             double t0) {
    int block = convert_block_of(p->t[i].name);
    bool last = i + 1 == p->n || convert_block_of(p->t[i + 1].name) != block;
    if (convert_quiet || !last || block < 0) return;
    fprintf(stderr, "  blk.%-3d done  %9.1f MB written  %7.1f s\n", block,
            (double)w->pos / 1e6, convert_now() - t0);
}

static void convert_summary(const struct convert_plan *p, const char *path, uint64_t bytes,
                            double seconds) {
    static const uint32_t types[] = {TYPE_F32, TYPE_F16, TYPE_Q8_0, TYPE_Q2_K, TYPE_Q4_K,
                                     TYPE_IQ2_XXS, TYPE_I32};
    if (convert_quiet) return;
    fprintf(stderr, "wrote %s: %d tensors, %llu bytes (%.2f GiB) in %.1f s  [", path, p->n,
            (unsigned long long)bytes, (double)bytes / (1u << 30), seconds);
    for (size_t k = 0; k < sizeof types / sizeof types[0]; k++) {
        int n = 0;
        for (int i = 0; i < p->n; i++) n += p->t[i].type == types[k];
        if (n) fprintf(stderr, " %s:%d", convert_type_name(types[k]), n);
    }
    fprintf(stderr, " ]");
    if (p->vocab && p->vocab->n_keys)
        fprintf(stderr, " + %llu tokenizer keys", (unsigned long long)p->vocab->n_keys);
    fprintf(stderr, "\n");
}

/* Write the whole planned file to `path` (atomically, see section 6).
 *
 * The header goes first because its size, and so every tensor's offset, was
 * fixed by the plan. Each tensor is then produced in plan order and checked
 * against its planned size -- a mismatch would shift every later tensor, so
 * it is treated as a bug and stops the write -- and padded to 32 bytes, the
 * alignment the engine's mmap-based loader relies on for aligned loads. */
static bool convert_write_plan(const struct convert_plan *p, const char *path,
                               const char *name) {
    struct convert_buf header = {0};
    struct convert_scratch sc = {0};
    struct gguf_writer w;
    double t0 = convert_now();
    convert_build_header(&header, p, name);
    if (!gguf_write_open(&w, path)) {
        free(header.p);
        return false;
    }
    bool ok = gguf_write_bytes(&w, header.p, header.n);
    for (int i = 0; ok && i < p->n; i++) {
        const struct convert_tensor *t = &p->t[i];
        uint64_t start = w.pos;
        ok = p->db ? convert_emit_checkpoint(p, t, &w, &sc) : convert_emit_synthetic(p, t, &w, &sc);
        if (ok && w.pos - start != t->n_bytes)
            ok = convert_fail("internal error: %s wrote %llu bytes, planned %llu", t->name,
                              (unsigned long long)(w.pos - start), (unsigned long long)t->n_bytes);
        ok = ok && gguf_write_pad(&w);
        if (ok) convert_progress(p, i, &w, t0);
    }
    uint64_t total = w.pos;
    if (ok) ok = gguf_write_commit(&w);
    else gguf_write_abort(&w);
    if (ok) convert_summary(p, path, total, convert_now() - t0);
    free(header.p);
    convert_scratch_free(&sc);
    return ok;
}

/* The name recorded in general.name: the checkpoint directory's last part. */
static void convert_model_name(const char *dir, char *buf, size_t cap) {
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/') n--;
    size_t s = n;
    while (s > 0 && dir[s - 1] != '/') s--;
    snprintf(buf, cap, "%.*s", (int)(n - s), dir + s);
}

/* SRC_DIR -> OUT (and MTP_OUT when not NULL), with the tokenizer of VOCAB
 * when not NULL. The vocabulary and every source tensor of both files are
 * checked before either file is created. */
static bool convert_checkpoint(const char *src_dir, const char *out, const char *mtp_out,
                               int qtype, const char *vocab_path) {
    struct convert_config cfg;
    struct convert_vocab vocab;
    struct st_db db;
    struct convert_plan main_plan, mtp_plan;
    char name[256];
    if (!convert_config_load(src_dir, &cfg)) return false;
    if (!convert_vocab_open(&vocab, vocab_path, cfg.vocab)) return false;
    if (!st_db_open(&db, src_dir)) {
        convert_vocab_close(&vocab);
        return false;
    }
    convert_plan_init(&main_plan, &cfg, &db, qtype, false);
    convert_plan_init(&mtp_plan, &cfg, &db, qtype, true);
    main_plan.vocab = &vocab;
    convert_model_name(src_dir, name, sizeof name);
    bool ok = convert_check_plan(&main_plan) && (!mtp_out || convert_check_plan(&mtp_plan));
    ok = ok && convert_write_plan(&main_plan, out, name);
    ok = ok && (!mtp_out || convert_write_plan(&mtp_plan, mtp_out, name));
    convert_plan_free(&main_plan);
    convert_plan_free(&mtp_plan);
    st_db_close(&db);
    convert_vocab_close(&vocab);
    return ok;
}

/* A random model of the published width; its vocabulary is the real one
 * (129,280 tokens), so --vocab vectors/ds4-vocab.gguf fits it. */
static bool convert_synthetic(const char *out, int64_t layers, int qtype, uint64_t seed,
                              const char *vocab_path) {
    struct convert_config cfg;
    struct convert_vocab vocab;
    struct convert_plan plan;
    char name[64];
    if (layers < 1 || layers > CONVERT_MAX_LAYERS)
        return convert_fail("--layers %lld is outside [1, %d]", (long long)layers,
                            CONVERT_MAX_LAYERS);
    convert_config_flash(&cfg, layers);
    if (!convert_vocab_open(&vocab, vocab_path, cfg.vocab)) return false;
    convert_plan_init(&plan, &cfg, NULL, qtype, false);
    plan.seed = seed;
    plan.vocab = &vocab;
    snprintf(name, sizeof name, "ds4 synthetic full, %lld layers", (long long)layers);
    bool ok = convert_write_plan(&plan, out, name);
    convert_plan_free(&plan);
    convert_vocab_close(&vocab);
    return ok;
}

/* ---- 10.1 main -------------------------------------------------------------- */

struct convert_args {
    const char *src, *out, *mtp, *synthetic, *vocab;
    int qtype;
    int64_t layers;
    uint64_t seed;
};

static bool convert_parse_type(const char *s, int *qtype) {
    static const char *names[4] = {"f16", "q8_0", "q2", "q4"};
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0) { *qtype = i; return true; }
    return convert_fail("--type %s: expected f16, q8_0, q2 or q4 (BF16 is never written: "
                        "the engine rejects it)", s);
}

static bool convert_parse_int(const char *flag, const char *s, int64_t *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < 0) return convert_fail("%s %s: not a number", flag, s);
    *out = v;
    return true;
}

static bool convert_parse_args(int argc, char **argv, struct convert_args *a) {
    int positional = 0;
    int64_t seed = 1;
    memset(a, 0, sizeof *a);
    a->qtype = -1;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        bool has_value = i + 1 < argc;
        if (arg[0] == '-' && arg[1] == '-' && !has_value)
            return convert_fail("%s needs a value", arg);
        if (strcmp(arg, "--mtp") == 0) a->mtp = argv[++i];
        else if (strcmp(arg, "--vocab") == 0) a->vocab = argv[++i];
        else if (strcmp(arg, "--type") == 0) { if (!convert_parse_type(argv[++i], &a->qtype)) return false; }
        else if (strcmp(arg, "--synthetic") == 0) a->synthetic = argv[++i];
        else if (strcmp(arg, "--layers") == 0) { if (!convert_parse_int(arg, argv[++i], &a->layers)) return false; }
        else if (strcmp(arg, "--seed") == 0) { if (!convert_parse_int(arg, argv[++i], &seed)) return false; }
        else if (arg[0] == '-') return convert_fail("unknown option %s", arg);
        else if (positional == 0) { a->src = arg; positional++; }
        else if (positional == 1) { a->out = arg; positional++; }
        else return convert_fail("unexpected argument %s", arg);
    }
    a->seed = (uint64_t)seed;
    if (a->synthetic) {
        if (strcmp(a->synthetic, "full") != 0)
            return convert_fail("--synthetic %s: only \"full\" is known", a->synthetic);
        if (positional != 1 || a->layers == 0 || a->mtp)
            return convert_fail("usage: --synthetic full --layers N OUT.gguf");
        a->out = a->src;
        a->src = NULL;
        if (a->qtype < 0) a->qtype = CONVERT_Q_Q2;
        return true;
    }
    if (positional != 2) return convert_fail("expected SRC_DIR and OUT.gguf");
    if (a->qtype < 0) a->qtype = CONVERT_Q_F16;
    return true;
}

#ifndef DS4_CONVERT_NO_MAIN
static void convert_usage(void) {
    fprintf(stderr,
            "usage: ds4-convert SRC_DIR OUT.gguf [--mtp OUT_MTP.gguf] [--type f16|q8_0|q2|q4]\n"
            "                   [--vocab VOCAB.gguf]\n"
            "       ds4-convert --synthetic full --layers N OUT.gguf [--type q2|q4|q8_0|f16]\n"
            "                   [--seed S] [--vocab VOCAB.gguf]\n"
            "  --vocab VOCAB.gguf  copy its tokenizer.* metadata into OUT.gguf; its\n"
            "                      tokenizer.ggml.tokens must hold vocab_size tokens\n");
}

/* ^C or kill while writing: remove the temporary, then die of the signal
 * as usual. Only async-signal-safe calls: unlink, signal, raise. */
static void convert_on_signal(int sig) {
    if (convert_tmp_for_signal[0]) unlink(convert_tmp_for_signal);
    signal(sig, SIG_DFL);
    raise(sig);
}

int main(int argc, char **argv) {
    struct convert_args a;
    if (argc < 2 || !convert_parse_args(argc, argv, &a)) {
        if (argc >= 2) fprintf(stderr, "ds4-convert: error: %s\n", convert_errmsg);
        convert_usage();
        return 2;   /* a bad command line, as opposed to bad input files (1) */
    }
    signal(SIGINT, convert_on_signal);
    signal(SIGTERM, convert_on_signal);
    bool ok = a.synthetic ? convert_synthetic(a.out, a.layers, a.qtype, a.seed, a.vocab)
                          : convert_checkpoint(a.src, a.out, a.mtp, a.qtype, a.vocab);
    if (!ok) {
        fprintf(stderr, "ds4-convert: error: %s\n", convert_errmsg);
        return 1;
    }
    return 0;
}
#endif
