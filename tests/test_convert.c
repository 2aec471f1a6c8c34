/* test_convert.c -- tests for tools/ds4_convert.c.
 *
 * The tool is included whole (its main() is dropped), so these tests call
 * its static functions directly:
 *
 *   1. the checkpoint number formats, on hand-checked bytes;
 *   2. a tiny synthetic checkpoint in /tmp with an FP8 tensor (ragged
 *      128x128 tiles) and an FP4 expert, dequantized element by element;
 *   3. broken checkpoints: each must give a clean error, never a crash,
 *      and no half-written output file;
 *   4. the tiny oracle checkpoint converted at f16 (and q2) and read back
 *      with a GGUF reader written here, independent of the writer;
 *   5. the random blocks of --synthetic decode to finite values of about
 *      the intended size;
 *   6. the command line; 7. the full-size plan against the published files;
 *   8. --vocab: the tokenizer keys of vectors/tiny-vocab.gguf arrive in the
 *      output string for string, and a vocabulary of the wrong size, a
 *      missing file or a file that is not a GGUF is refused, leaving no
 *      output behind.
 *
 * Build and run (also clean under -fsanitize=address,undefined):
 *
 *   gcc -O2 -Wall -Wextra -o tests/bin/test_convert tests/test_convert.c -lm -lpthread
 *   ./tests/bin/test_convert [TINY_CHECKPOINT_DIR]   (default vectors/tiny)
 *
 * Section 8 reads vectors/tiny-vocab.gguf and vectors/ds4-vocab.gguf
 * relative to the working directory (make runs it from the root).
 *
 * The last line is "N passed, M failed"; the exit status is 0 iff M == 0.
 */

#define DS4_CONVERT_NO_MAIN
#include "../tools/ds4_convert.c"
#include "harness.h"

#include <dirent.h>

/* Same float, NaN equal to NaN, -0 equal to 0. */
static bool same_float(float a, float b) {
    return (isnan(a) && isnan(b)) || a == b;
}

/* =========================================================================
 * 1. Number formats
 * ========================================================================= */

/* An independent E4M3 definition, in double precision, for the sweep. */
static double e4m3_reference(uint8_t b) {
    int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    if ((b & 0x7F) == 0x7F) return NAN;
    double v = e == 0 ? m / 512.0 : (1.0 + m / 8.0) * pow(2.0, e - 7);
    return s ? -v : v;
}

static void test_e4m3(void) {
    static const struct { uint8_t b; float v; } cases[] = {
        {0x00, 0.0f}, {0x01, 0.001953125f}, {0x08, 0.015625f}, {0x38, 1.0f},
        {0x7E, 448.0f}, {0xB8, -1.0f}, {0x7F, NAN}, {0xFF, NAN}, {0x07, 7.0f / 512},
        {0x40, 2.0f}, {0x3C, 1.5f},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        float got = convert_e4m3_to_f32(cases[i].b);
        check(same_float(got, cases[i].v), "e4m3 0x%02X -> %g (want %g)", cases[i].b, got,
              cases[i].v);
    }
    int bad = 0;
    for (int b = 0; b < 256; b++)
        bad += !same_float(convert_e4m3_to_f32((uint8_t)b), (float)e4m3_reference((uint8_t)b));
    check(bad == 0, "e4m3 all 256 bytes agree with the double-precision definition (%d off)", bad);
}

static void test_e2m1_e8m0(void) {
    static const float want[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6,
                                   -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};
    int bad = 0;
    for (int n = 0; n < 16; n++) bad += convert_e2m1_to_f32((uint8_t)n) != want[n];
    check(bad == 0, "e2m1 all 16 nibbles (%d off)", bad);
    check(convert_e8m0_to_f32(127) == 1.0f, "e8m0 127 -> 1");
    check(convert_e8m0_to_f32(130) == 8.0f, "e8m0 130 -> 8");
    check(convert_e8m0_to_f32(120) == 1.0f / 128, "e8m0 120 -> 1/128");
    check(convert_e8m0_to_f32(0) == ldexpf(1, -127), "e8m0 0 -> 2^-127");
    check(convert_e8m0_to_f32(254) == ldexpf(1, 127), "e8m0 254 -> 2^127");
    check(isnan(convert_e8m0_to_f32(255)), "e8m0 255 -> NaN");
}

/* =========================================================================
 * 2. A synthetic checkpoint: FP8 with ragged tiles, FP4 experts
 * ========================================================================= */

struct fake_tensor {
    const char *name, *dtype;
    int n_dims;
    int64_t shape[2];
    const void *data;
    size_t bytes;
};

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(2); }
    fputs(text, f);
    fclose(f);
}

/* Write a safetensors file. `end_bonus` inflates the last data_offsets end
 * (to fake a header that points past the file). */
static void write_shard(const char *path, const struct fake_tensor *t, int n, uint64_t end_bonus) {
    char header[8192];
    size_t h = (size_t)snprintf(header, sizeof header, "{\"__metadata__\":{\"format\":\"pt\"}");
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        uint64_t end = off + t[i].bytes + (i == n - 1 ? end_bonus : 0);
        h += (size_t)snprintf(header + h, sizeof header - h,
                              ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld", t[i].name, t[i].dtype,
                              (long long)t[i].shape[0]);
        if (t[i].n_dims == 2)
            h += (size_t)snprintf(header + h, sizeof header - h, ",%lld", (long long)t[i].shape[1]);
        h += (size_t)snprintf(header + h, sizeof header - h, "],\"data_offsets\":[%llu,%llu]}",
                              (unsigned long long)off, (unsigned long long)end);
        off += t[i].bytes;
    }
    h += (size_t)snprintf(header + h, sizeof header - h, "}");
    while (h % 8) header[h++] = ' ';
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(2); }
    uint64_t len = h;
    fwrite(&len, 8, 1, f);
    fwrite(header, 1, h, f);
    for (int i = 0; i < n; i++) fwrite(t[i].data, 1, t[i].bytes, f);
    fclose(f);
}

/* The FP8 test matrix: 130 x 200, so the 128x128 tiles are ragged in both
 * directions (tiles of 128 and 2 rows, 128 and 72 columns). */
enum { FP8_ROWS = 130, FP8_COLS = 200, FP4_ROWS = 3, FP4_COLS = 64 };

static uint8_t fp8_bytes[FP8_ROWS * FP8_COLS];
static uint8_t fp8_scale[2 * 2] = {120, 127, 130, 133};
static uint8_t fp4_bytes[FP4_ROWS * FP4_COLS / 2];
static uint8_t fp4_scale[FP4_ROWS * FP4_COLS / 32] = {127, 126, 128, 129, 100, 150};
static float base_scale[1] = {0.5f};
static uint8_t base_bytes[5 * 7];
static uint16_t bf16_bytes[2 * 3] = {0x3F80, 0xC000, 0x3E00, 0x0000, 0x7F7F, 0x8001};

static void make_fixture_data(void) {
    uint64_t s = 12345;
    for (size_t i = 0; i < sizeof fp8_bytes; i++) {
        fp8_bytes[i] = (uint8_t)convert_rng_next(&s);
        if ((fp8_bytes[i] & 0x7F) == 0x7F) fp8_bytes[i] ^= 1;     /* no NaN */
    }
    for (size_t i = 0; i < sizeof fp4_bytes; i++) fp4_bytes[i] = (uint8_t)convert_rng_next(&s);
    for (size_t i = 0; i < sizeof base_bytes; i++) base_bytes[i] = (uint8_t)(i * 7 % 0x7E);
}

static void make_fixture(const char *dir) {
    const struct fake_tensor t[] = {
        {"a.weight", "F8_E4M3", 2, {FP8_ROWS, FP8_COLS}, fp8_bytes, sizeof fp8_bytes},
        {"a.scale", "F8_E8M0", 2, {2, 2}, fp8_scale, sizeof fp8_scale},
        {"layers.0.ffn.experts.0.w1.weight", "I8", 2, {FP4_ROWS, FP4_COLS / 2}, fp4_bytes,
         sizeof fp4_bytes},
        {"layers.0.ffn.experts.0.w1.scale", "F8_E8M0", 2, {FP4_ROWS, FP4_COLS / 32}, fp4_scale,
         sizeof fp4_scale},
        {"base.weight", "F8_E4M3", 2, {5, 7}, base_bytes, sizeof base_bytes},
        {"base.scale", "F32", 2, {1, 1}, base_scale, sizeof base_scale},
        {"plain.weight", "BF16", 2, {2, 3}, bf16_bytes, sizeof bf16_bytes},
    };
    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    write_shard(path, t, 7, 0);
}

static double fp8_expected(int r, int c) {
    return e4m3_reference(fp8_bytes[r * FP8_COLS + c]) * pow(2.0, fp8_scale[(r / 128) * 2 + c / 128] - 127);
}

static double fp4_expected(int r, int c) {
    static const double mag[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
    uint8_t byte = fp4_bytes[r * FP4_COLS / 2 + c / 2];
    uint8_t nib = c % 2 == 0 ? byte & 15 : byte >> 4;
    double v = mag[nib & 7] * pow(2.0, fp4_scale[r * 2 + c / 32] - 127);
    return nib & 8 ? -v : v;
}

static void test_fp8_source(const struct st_db *db) {
    struct st_source s;
    static float rows[FP8_ROWS * FP8_COLS];
    bool ok = st_source_open(&s, db, "a.weight", FP8_ROWS, FP8_COLS, false);
    check(ok && s.kind == ST_SRC_FP8, "open FP8 tensor [130][200] with 2x2 E8M0 tiles%s%s",
          ok ? "" : ": ", ok ? "" : convert_errmsg);
    if (!ok) return;
    st_source_rows(&s, 0, FP8_ROWS, rows);
    int bad = 0;
    double maxdiff = 0;
    for (int r = 0; r < FP8_ROWS; r++)
        for (int c = 0; c < FP8_COLS; c++) {
            double d = fabs(rows[r * FP8_COLS + c] - fp8_expected(r, c));
            maxdiff = d > maxdiff ? d : maxdiff;
            bad += d != 0;
        }
    check(bad == 0, "FP8 dequant, 26000 elements incl. ragged tiles: %d differ, maxdiff %g",
          bad, maxdiff);
    st_source_rows(&s, 128, 2, rows);       /* the ragged last tile row, read alone */
    bad = 0;
    for (int r = 0; r < 2; r++)
        for (int c = 0; c < FP8_COLS; c++) bad += rows[r * FP8_COLS + c] != (float)fp8_expected(128 + r, c);
    check(bad == 0, "FP8 rows 128..129 read on their own: %d differ", bad);
    /* --type f16 stores these values; with tile scales 2^-7..2^6 every one of
     * them is an f16 number (e4m3 has 3 mantissa bits; the smallest, 2^-9 *
     * 2^-7, is above f16's subnormal step 2^-24), so f16 keeps FP8 exactly. */
    st_source_rows(&s, 0, FP8_ROWS, rows);
    bad = 0;
    for (int i = 0; i < FP8_ROWS * FP8_COLS; i++) bad += f16_to_f32(f32_to_f16(rows[i])) != rows[i];
    check(bad == 0, "FP8 values survive f16 exactly: %d of 26000 change", bad);
}

static void test_fp4_source(const struct st_db *db) {
    struct st_source s;
    float rows[FP4_ROWS * FP4_COLS];
    bool ok = st_source_open(&s, db, "layers.0.ffn.experts.0.w1.weight", FP4_ROWS, FP4_COLS, false);
    check(ok && s.kind == ST_SRC_FP4, "open FP4 expert [3][64] (packed [3][32]) with per-32 scales");
    if (!ok) return;
    st_source_rows(&s, 0, FP4_ROWS, rows);
    int bad = 0;
    for (int r = 0; r < FP4_ROWS; r++)
        for (int c = 0; c < FP4_COLS; c++) bad += rows[r * FP4_COLS + c] != (float)fp4_expected(r, c);
    check(bad == 0, "FP4 dequant, low nibble = even column, 192 elements: %d differ", bad);
    /* f16 keeps FP4 exactly while the scale is within 2^-25..2^13 (rows 0-1 of
     * the fixture, scales 2^-1..2^2); row 2's 2^-27 and 2^23 are outside. */
    int kept = 0, moved = 0;
    for (int i = 0; i < FP4_ROWS * FP4_COLS; i++) {
        bool same = f16_to_f32(f32_to_f16(rows[i])) == rows[i];
        if (i < 2 * FP4_COLS) kept += same;
        else moved += !same && rows[i] != 0;
    }
    check(kept == 2 * FP4_COLS && moved > 0, "FP4 values survive f16 for in-range scales: "
          "%d of 128 kept; %d of row 2's out-of-range ones change", kept, moved);
}

static void test_other_sources(const struct st_db *db) {
    struct st_source s;
    float v[35];
    bool ok = st_source_open(&s, db, "base.weight", 5, 7, false);
    check(ok, "open FP8 tensor with one F32 scale (Flash-Base style)");
    if (ok) {
        st_source_rows(&s, 0, 5, v);
        int bad = 0;
        for (int i = 0; i < 35; i++) bad += v[i] != (float)(e4m3_reference(base_bytes[i]) * 0.5);
        check(bad == 0, "FP8 with F32 scale: %d of 35 differ", bad);
    }
    ok = st_source_open(&s, db, "plain.weight", 2, 3, false);
    check(ok, "open BF16 tensor");
    if (ok) {
        st_source_rows(&s, 0, 2, v);
        int bad = 0;
        for (int i = 0; i < 6; i++) {
            uint32_t bits = (uint32_t)bf16_bytes[i] << 16;
            float want;
            memcpy(&want, &bits, 4);
            bad += !same_float(v[i], want);
        }
        check(bad == 0, "BF16 values are the top halves of f32: %d of 6 differ", bad);
    }
    ok = st_source_open(&s, db, "a.weight", FP8_ROWS, FP8_COLS + 1, false);
    check(!ok, "shape mismatch is reported: %s", convert_errmsg);
    ok = st_source_open(&s, db, "nope.weight", 1, 1, false);
    check(!ok, "a missing tensor is reported: %s", convert_errmsg);
    ok = st_source_open(&s, db, "a.scale", 2, 2, false);
    check(!ok, "E8M0 bytes alone are not a weight: %s", convert_errmsg);
}

static void test_checkpoint_formats(const char *root) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/formats", root);
    mkdir(dir, 0700);
    make_fixture_data();
    make_fixture(dir);
    struct st_db db;
    bool ok = st_db_open(&db, dir);
    check(ok, "open a single-file checkpoint (no index)%s%s", ok ? "" : ": ", ok ? "" : convert_errmsg);
    if (!ok) return;
    test_fp8_source(&db);
    test_fp4_source(&db);
    test_other_sources(&db);
    st_db_close(&db);
}

/* =========================================================================
 * 3. Broken checkpoints
 * ========================================================================= */

/* A fresh directory with one small valid shard, returned in `dir`. */
static void broken_dir(const char *root, const char *name, char *dir, size_t cap) {
    static const uint16_t data[4] = {0x3F80, 0x4000, 0x4040, 0x4080};
    const struct fake_tensor t[] = {{"x.weight", "BF16", 2, {2, 2}, data, sizeof data}};
    char path[600];
    snprintf(dir, cap, "%s/%s", root, name);
    mkdir(dir, 0700);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    write_shard(path, t, 1, 0);
}

static void expect_open_error(const char *dir, const char *what, const char *needle) {
    struct st_db db;
    convert_errmsg[0] = 0;
    bool ok = st_db_open(&db, dir);
    if (ok) st_db_close(&db);
    check(!ok && strstr(convert_errmsg, needle) != NULL, "%s -> error: %s", what, convert_errmsg);
}

static void overwrite_bytes(const char *path, long at, const void *bytes, size_t n) {
    FILE *f = fopen(path, "r+b");
    if (!f) { perror(path); exit(2); }
    fseek(f, at, SEEK_SET);
    fwrite(bytes, 1, n, f);
    fclose(f);
}

static void test_broken_shards(const char *root) {
    char dir[512], path[600];

    broken_dir(root, "truncated", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    struct stat st;
    stat(path, &st);
    if (truncate(path, st.st_size - 3) != 0) perror("truncate");
    expect_open_error(dir, "truncated shard", "past the end");

    broken_dir(root, "past-end", dir, sizeof dir);
    static const uint16_t data[4] = {0};
    const struct fake_tensor t[] = {{"x.weight", "BF16", 2, {2, 2}, data, sizeof data}};
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    write_shard(path, t, 1, 1u << 20);
    expect_open_error(dir, "header offsets past the end of the file", "past the end");

    broken_dir(root, "bad-dtype", dir, sizeof dir);
    const struct fake_tensor q[] = {{"x.weight", "Q99", 2, {2, 2}, data, sizeof data}};
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    write_shard(path, q, 1, 0);
    expect_open_error(dir, "unknown dtype Q99", "dtype");

    broken_dir(root, "absurd-header", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    uint64_t huge = 1ull << 60;
    overwrite_bytes(path, 0, &huge, 8);
    expect_open_error(dir, "header length 2^60", "absurd");

    broken_dir(root, "bad-json", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    overwrite_bytes(path, 8, "[", 1);
    expect_open_error(dir, "header that is not JSON", "JSON");

    broken_dir(root, "wrong-size", dir, sizeof dir);
    const struct fake_tensor w[] = {{"x.weight", "F32", 2, {2, 2}, data, sizeof data}};
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    write_shard(path, w, 1, 0);
    expect_open_error(dir, "byte count that does not match shape x dtype", "needs");

    /* Two tensors claiming the same bytes: [0, 8) and [4, 12). */
    broken_dir(root, "overlap", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    const char overlap[] = "{\"a.weight\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[0,8]},"
                           "\"b.weight\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[4,12]}}";
    FILE *f = fopen(path, "wb");
    uint64_t olen = sizeof overlap - 1;
    static const uint8_t zeros[12] = {0};
    fwrite(&olen, 8, 1, f);
    fwrite(overlap, 1, olen, f);
    fwrite(zeros, 1, sizeof zeros, f);
    fclose(f);
    expect_open_error(dir, "overlapping data_offsets", "overlap");

    broken_dir(root, "no-tensors", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    write_shard(path, t, 0, 0);
    expect_open_error(dir, "a shard with no tensors", "no tensors");

    snprintf(dir, sizeof dir, "%s/empty", root);
    mkdir(dir, 0700);
    expect_open_error(dir, "directory without checkpoint", "cannot open");
}

static void test_broken_index(const char *root) {
    char dir[512], path[600];
    broken_dir(root, "index-missing-entry", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    write_text(path, "{\"weight_map\":{\"x.weight\":\"model.safetensors\","
                     "\"y.weight\":\"model.safetensors\"}}");
    expect_open_error(dir, "index entry the shard does not hold", "no such tensor");

    broken_dir(root, "index-escape", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    write_text(path, "{\"weight_map\":{\"x.weight\":\"../model.safetensors\"}}");
    expect_open_error(dir, "index naming a file outside the directory", "shard file");

    broken_dir(root, "index-no-shard", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    write_text(path, "{\"weight_map\":{\"x.weight\":\"model-00009.safetensors\"}}");
    expect_open_error(dir, "index naming a missing shard", "cannot open");

    broken_dir(root, "index-empty-map", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    write_text(path, "{\"weight_map\":{}}");
    expect_open_error(dir, "index with an empty weight_map (no NULL to qsort/bsearch)", "no tensors");

    broken_dir(root, "index-bad-json", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    write_text(path, "{\"weight_map\":{\"x.weight\":\"model.safetensors\",}}");
    expect_open_error(dir, "index with a trailing comma", "bad JSON");
}

/* No file named OUT, and no OUT.tmp-* left next to it. */
static bool no_output_left(const char *dir, const char *base) {
    DIR *d = opendir(dir);
    bool clean = true;
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL)
        if (strncmp(e->d_name, base, strlen(base)) == 0) clean = false;
    if (d) closedir(d);
    return clean;
}

static void copy_file(const char *from, const char *to) {
    size_t len;
    char *text = convert_read_small_file(from, 1 << 20, &len);
    if (!text) { fprintf(stderr, "%s\n", convert_errmsg); exit(2); }
    FILE *f = fopen(to, "wb");
    fwrite(text, 1, len, f);
    fclose(f);
    free(text);
}

static void test_broken_config(const char *root, const char *tiny) {
    char dir[512], path[600], src[600], out[700];
    struct convert_config cfg;
    broken_dir(root, "config", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/config.json", dir);
    write_text(path, "{\"dim\": 256, ");
    check(!convert_config_load(dir, &cfg), "config.json cut short -> error: %s", convert_errmsg);
    write_text(path, "{\"dim\": 256}");
    check(!convert_config_load(dir, &cfg), "config.json without n_layers -> error: %s",
          convert_errmsg);
    snprintf(src, sizeof src, "%s/config.json", tiny);
    copy_file(src, path);
    check(convert_config_load(dir, &cfg) && cfg.dim == 256, "the tiny config.json loads");
    /* The right config, but the checkpoint holds one tensor: conversion must
     * fail before creating OUT, naming the first missing tensor. */
    snprintf(out, sizeof out, "%s/out.gguf", dir);
    convert_quiet = true;
    bool ok = convert_checkpoint(dir, out, NULL, CONVERT_Q_F16, NULL);
    check(!ok && strstr(convert_errmsg, "embed.weight"), "checkpoint missing tensors -> error: %s",
          convert_errmsg);
    check(no_output_left(dir, "out.gguf"), "no OUT and no temporary left after the failure");
    write_text(path, "{\"dim\": 1e15}");
    check(!convert_config_load(dir, &cfg), "absurd dim -> error: %s", convert_errmsg);
}

/* =========================================================================
 * 4. The tiny checkpoint, converted and read back
 * ========================================================================= */

/* A minimal GGUF reader, written from the format description alone. */
struct rd_tensor {
    char name[128];
    uint32_t n_dims, type;
    uint64_t ne[4], offset;
};

struct rd_gguf {
    uint8_t *map;
    size_t size;
    uint64_t n_tensors, n_kv, data_start;
    struct rd_tensor *t;
    size_t pos;
    bool bad;
};

static uint64_t rd_uint(struct rd_gguf *g, int bytes) {
    uint64_t v = 0;
    if (g->pos + (size_t)bytes > g->size) { g->bad = true; return 0; }
    for (int i = 0; i < bytes; i++) v |= (uint64_t)g->map[g->pos + (size_t)i] << (8 * i);
    g->pos += (size_t)bytes;
    return v;
}

static void rd_skip_value(struct rd_gguf *g, uint32_t type) {
    static const int size[13] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    if (type == 8) { g->pos += rd_uint(g, 8); return; }
    if (type == 9) {
        uint32_t it = (uint32_t)rd_uint(g, 4);
        uint64_t n = rd_uint(g, 8);
        for (uint64_t i = 0; i < n && !g->bad; i++) rd_skip_value(g, it);
        return;
    }
    if (type > 12) { g->bad = true; return; }
    g->pos += (size_t)size[type];
}

/* Find metadata key `key`; returns the position of its value or 0. */
static size_t rd_find_kv(struct rd_gguf *g, const char *key, uint32_t *type) {
    g->pos = 24;
    for (uint64_t i = 0; i < g->n_kv && !g->bad; i++) {
        uint64_t n = rd_uint(g, 8);
        bool match = n == strlen(key) && g->pos + n <= g->size && memcmp(g->map + g->pos, key, n) == 0;
        g->pos += n;
        *type = (uint32_t)rd_uint(g, 4);
        if (match) return g->pos;
        rd_skip_value(g, *type);
    }
    return 0;
}

static bool rd_open(struct rd_gguf *g, const char *path) {
    memset(g, 0, sizeof *g);
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) return false;
    g->size = (size_t)st.st_size;
    g->map = mmap(NULL, g->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (g->map == MAP_FAILED || rd_uint(g, 4) != 0x46554747u || rd_uint(g, 4) != 3) return false;
    g->n_tensors = rd_uint(g, 8);
    g->n_kv = rd_uint(g, 8);
    for (uint64_t i = 0; i < g->n_kv && !g->bad; i++) {
        g->pos += rd_uint(g, 8);
        rd_skip_value(g, (uint32_t)rd_uint(g, 4));
    }
    g->t = calloc(g->n_tensors, sizeof *g->t);
    for (uint64_t i = 0; i < g->n_tensors && !g->bad; i++) {
        struct rd_tensor *t = &g->t[i];
        uint64_t n = rd_uint(g, 8);
        if (n >= sizeof t->name || g->pos + n > g->size) return false;
        memcpy(t->name, g->map + g->pos, n);
        g->pos += n;
        t->n_dims = (uint32_t)rd_uint(g, 4);
        for (uint32_t d = 0; d < t->n_dims && d < 4; d++) t->ne[d] = rd_uint(g, 8);
        t->type = (uint32_t)rd_uint(g, 4);
        t->offset = rd_uint(g, 8);
    }
    g->data_start = (g->pos + 31) / 32 * 32;
    return !g->bad;
}

static void rd_close(struct rd_gguf *g) {
    if (g->map && g->map != MAP_FAILED) munmap(g->map, g->size);
    free(g->t);
}

static const struct rd_tensor *rd_tensor(const struct rd_gguf *g, const char *name) {
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (strcmp(g->t[i].name, name) == 0) return &g->t[i];
    return NULL;
}

static const uint8_t *rd_data(const struct rd_gguf *g, const struct rd_tensor *t) {
    return g->map + g->data_start + t->offset;
}

static void check_tensor_info(const struct rd_gguf *g, const char *name, uint32_t type,
                              uint64_t ne0, uint64_t ne1, uint64_t ne2) {
    const struct rd_tensor *t = rd_tensor(g, name);
    uint32_t nd = ne1 == 0 ? 1 : ne2 == 0 ? 2 : 3;
    bool ok = t && t->type == type && t->n_dims == nd && t->ne[0] == ne0 &&
              (nd < 2 || t->ne[1] == ne1) && (nd < 3 || t->ne[2] == ne2);
    check(ok, "%-36s type %-7s shape [%llu%s%.0llu%s%.0llu]", name, convert_type_name(type),
          (unsigned long long)ne0, nd > 1 ? ", " : "", (unsigned long long)ne1, nd > 2 ? ", " : "",
          (unsigned long long)ne2);
}

static void check_kv_u32(struct rd_gguf *g, const char *key, uint32_t want) {
    uint32_t type = 0;
    size_t at = rd_find_kv(g, key, &type);
    uint32_t got = at && type == 4 ? convert_load_u32(g->map + at) : 0xFFFFFFFFu;
    check(got == want, "metadata %s = %u (want %u)", key, got, want);
}

/* Every value of checkpoint tensor `src` ([rows][cols] as floats) against
 * F16 row data in the GGUF: the f16 must be the correctly rounded source. */
static void compare_f16(const struct st_db *db, const char *src, const uint8_t *gguf,
                        int64_t src_rows, int64_t rows, int64_t cols, const char *label) {
    struct st_source s;
    if (!st_source_open(&s, db, src, src_rows, cols, false)) {
        check(false, "%s: %s", label, convert_errmsg);
        return;
    }
    float *x = convert_zalloc((size_t)(rows * cols) * sizeof *x);
    st_source_rows(&s, 0, rows, x);
    double maxdiff = 0;
    int64_t bad = 0;
    for (int64_t i = 0; i < rows * cols; i++) {
        float got = f16_to_f32(convert_load_u16(gguf + 2 * i));
        double d = fabs((double)got - x[i]);
        maxdiff = d > maxdiff ? d : maxdiff;
        bad += convert_load_u16(gguf + 2 * i) != f32_to_f16(x[i]);
    }
    check(bad == 0, "%s: %lld values, f16 == round(source) for all, maxdiff %.3g", label,
          (long long)(rows * cols), maxdiff);
    free(x);
}

static void test_tiny_layout(struct rd_gguf *g) {
    check(g->n_tensors == 178, "tiny.gguf has %llu tensors (want 178)",
          (unsigned long long)g->n_tensors);
    check_kv_u32(g, "deepseek4.block_count", 6);
    check_kv_u32(g, "deepseek4.embedding_length", 256);
    check_kv_u32(g, "deepseek4.attention.key_length", 96);
    check_kv_u32(g, "deepseek4.rope.dimension_count", 32);
    check_kv_u32(g, "deepseek4.attention.sliding_window", 16);
    check_kv_u32(g, "deepseek4.attention.indexer.head_count", 8);
    check_kv_u32(g, "deepseek4.attention.indexer.key_length", 64);
    check_kv_u32(g, "deepseek4.attention.indexer.top_k", 8);
    check_kv_u32(g, "deepseek4.expert_count", 4);
    check_kv_u32(g, "deepseek4.expert_used_count", 2);
    check_kv_u32(g, "deepseek4.hash_layer_count", 3);
    check_tensor_info(g, "token_embd.weight", TYPE_F16, 256, 2048, 0);
    check_tensor_info(g, "output_hc_fn.weight", TYPE_F32, 1024, 4, 0);
    check_tensor_info(g, "output_norm.weight", TYPE_F32, 256, 0, 0);
    check_tensor_info(g, "blk.0.attn_q_a.weight", TYPE_F16, 256, 128, 0);
    check_tensor_info(g, "blk.0.hc_attn_fn.weight", TYPE_F32, 1024, 24, 0);
    check_tensor_info(g, "blk.0.ffn_gate_inp.weight", TYPE_F32, 256, 4, 0);
    check_tensor_info(g, "blk.0.ffn_gate_tid2eid.weight", TYPE_I32, 2, 2048, 0);
    check_tensor_info(g, "blk.2.attn_compressor_ape.weight", TYPE_F16, 192, 4, 0);
    check_tensor_info(g, "blk.2.indexer_compressor_ape.weight", TYPE_F16, 128, 4, 0);
    check_tensor_info(g, "blk.3.attn_compressor_ape.weight", TYPE_F16, 96, 128, 0);
    check_tensor_info(g, "blk.2.ffn_gate_exps.weight", TYPE_F16, 256, 256, 4);
    check_tensor_info(g, "blk.5.ffn_down_exps.weight", TYPE_F16, 256, 256, 4);
    check_tensor_info(g, "blk.3.exp_probs_b.bias", TYPE_F32, 4, 0, 0);
    check(rd_tensor(g, "blk.0.exp_probs_b.bias") == NULL, "hash layer 0 has no exp_probs_b.bias");
    check(rd_tensor(g, "blk.3.indexer.proj.weight") == NULL, "ratio-128 layer 3 has no indexer");
    check(rd_tensor(g, "blk.0.attn_compressor_kv.weight") == NULL, "ratio-0 layer 0 has no compressor");
}

static void test_tiny_values(struct rd_gguf *g, const struct st_db *db) {
    const struct rd_tensor *t = rd_tensor(g, "blk.0.attn_q_a.weight");
    if (t) compare_f16(db, "layers.0.attn.wq_a.weight", rd_data(g, t), 128, 1, 256,
                       "blk.0.attn_q_a row 0 vs bf16 source");
    if (t) compare_f16(db, "layers.0.attn.wq_a.weight", rd_data(g, t), 128, 128, 256,
                       "blk.0.attn_q_a whole");
    t = rd_tensor(g, "blk.2.ffn_down_exps.weight");
    if (t) compare_f16(db, "layers.2.ffn.experts.3.w2.weight", rd_data(g, t) + 3 * 256 * 256 * 2,
                       256, 256, 256, "blk.2.ffn_down_exps expert 3 vs experts.3.w2");
    t = rd_tensor(g, "blk.3.attn_compressor_ape.weight");
    if (t) compare_f16(db, "layers.3.attn.compressor.ape", rd_data(g, t), 128, 128, 96,
                       "blk.3 compressor ape [96,128] vs f32 [128][96]");
    /* The hc fn matrices are f32 in the checkpoint; at f16 they stay F32, bit
     * for bit (rounded to f16 they moved the logits by 5e-5, see the types
     * table in ds4_convert.c). */
    t = rd_tensor(g, "blk.1.hc_ffn_fn.weight");
    const struct st_tensor *fn = st_find(db, "layers.1.hc_ffn_fn");
    check(t && fn && t->type == TYPE_F32 && memcmp(rd_data(g, t), st_data(db, fn), 24 * 1024 * 4) == 0,
          "blk.1.hc_ffn_fn is F32 and its bytes equal the f32 source [24][1024]");
    t = rd_tensor(g, "blk.1.ffn_gate_tid2eid.weight");
    const struct st_tensor *ids = st_find(db, "layers.1.ffn.gate.tid2eid");
    check(t && ids && memcmp(rd_data(g, t), st_data(db, ids), 2048 * 2 * 4) == 0,
          "blk.1 tid2eid bytes equal the I32 source [2048][2]");
    t = rd_tensor(g, "blk.4.exp_probs_b.bias");
    const struct st_tensor *bias = st_find(db, "layers.4.ffn.gate.bias");
    check(t && bias && memcmp(rd_data(g, t), st_data(db, bias), 16) == 0,
          "blk.4 exp_probs_b.bias equals ffn.gate.bias (f32)");
}

static void test_tiny_mtp(const char *path, const struct st_db *db) {
    struct rd_gguf g;
    bool ok = rd_open(&g, path);
    check(ok && g.n_tensors == 32, "tiny-mtp.gguf opens, %llu tensors (want 32)",
          (unsigned long long)g.n_tensors);
    if (ok) {
        check_kv_u32(&g, "deepseek4.block_count", 6);
        check_tensor_info(&g, "mtp.0.e_proj.weight", TYPE_F16, 256, 256, 0);
        check_tensor_info(&g, "mtp.0.hc_head_fn.weight", TYPE_F32, 1024, 4, 0);
        check_tensor_info(&g, "mtp.0.hc_attn_fn.weight", TYPE_F32, 1024, 24, 0);
        check_tensor_info(&g, "mtp.0.ffn_gate_inp.weight", TYPE_F32, 256, 4, 0);
        check_tensor_info(&g, "mtp.0.exp_probs_b.bias", TYPE_F32, 4, 0, 0);
        check_tensor_info(&g, "mtp.0.ffn_up_exps.weight", TYPE_F16, 256, 256, 4);
        check_tensor_info(&g, "mtp.0.enorm.weight", TYPE_F32, 256, 0, 0);
        const struct rd_tensor *t = rd_tensor(&g, "mtp.0.hc_head_fn.weight");
        const struct st_tensor *s = st_find(db, "mtp.0.hc_head_fn");
        check(t && s && memcmp(rd_data(&g, t), st_data(db, s), 4 * 1024 * 4) == 0,
              "mtp.0.hc_head_fn F32 bytes equal the source exactly");
        t = rd_tensor(&g, "mtp.0.e_proj.weight");
        if (t) compare_f16(db, "mtp.0.e_proj.weight", rd_data(&g, t), 256, 256, 256, "mtp.0.e_proj");
    }
    rd_close(&g);
}

/* At q2, the Q8_0 attention projection decodes close to the source. */
static void test_tiny_q2(const char *path, const struct st_db *db) {
    struct rd_gguf g;
    bool ok = rd_open(&g, path);
    check(ok && g.n_tensors == 178, "q2 file opens with 178 tensors");
    if (!ok) { rd_close(&g); return; }
    check_tensor_info(&g, "blk.3.ffn_gate_exps.weight", TYPE_IQ2_XXS, 256, 256, 4);
    check_tensor_info(&g, "blk.3.ffn_down_exps.weight", TYPE_Q2_K, 256, 256, 4);
    check_tensor_info(&g, "blk.3.attn_q_b.weight", TYPE_Q8_0, 128, 768, 0);
    check_tensor_info(&g, "blk.3.attn_output_a.weight", TYPE_Q8_0, 192, 128, 0);
    check_tensor_info(&g, "output.weight", TYPE_Q8_0, 256, 2048, 0);
    check_tensor_info(&g, "blk.3.attn_compressor_kv.weight", TYPE_F16, 256, 96, 0);
    check_tensor_info(&g, "blk.3.hc_attn_fn.weight", TYPE_F16, 1024, 24, 0);
    const struct rd_tensor *t = rd_tensor(&g, "blk.3.attn_q_b.weight");
    struct st_source s;
    if (t && st_source_open(&s, db, "layers.3.attn.wq_b.weight", 768, 128, false)) {
        float x[128], y[128];
        double maxdiff = 0, maxabs = 0;
        for (int r = 0; r < 768; r++) {
            st_source_rows(&s, r, 1, x);
            dequant_row_ref(TYPE_Q8_0, rd_data(&g, t) + (size_t)r * 4 * 34, y, 128);
            for (int i = 0; i < 128; i++) {
                maxdiff = fmax(maxdiff, fabs(y[i] - x[i]));
                maxabs = fmax(maxabs, fabs(x[i]));
            }
        }
        check(maxdiff <= maxabs / 127.0 * 0.51 + 1e-6,
              "q2 attn_q_b (Q8_0) decodes within half a step: maxdiff %.3g, max|w| %.3g",
              maxdiff, maxabs);
    }
    rd_close(&g);
}

static void test_tiny(const char *root, const char *tiny) {
    char out[600], mtp[600], q2[600];
    snprintf(out, sizeof out, "%s/tiny.gguf", root);
    snprintf(mtp, sizeof mtp, "%s/tiny-mtp.gguf", root);
    snprintf(q2, sizeof q2, "%s/tiny-q2.gguf", root);
    convert_quiet = true;
    bool ok = convert_checkpoint(tiny, out, mtp, CONVERT_Q_F16, NULL);
    check(ok, "convert %s at f16%s%s", tiny, ok ? "" : ": ", ok ? "" : convert_errmsg);
    if (!ok) return;
    struct st_db db;
    struct rd_gguf g;
    if (!st_db_open(&db, tiny)) { check(false, "reopen tiny: %s", convert_errmsg); return; }
    ok = rd_open(&g, out);
    check(ok, "tiny.gguf reads back with the test's own GGUF reader");
    if (ok) {
        test_tiny_layout(&g);
        test_tiny_values(&g, &db);
    }
    rd_close(&g);
    test_tiny_mtp(mtp, &db);
    ok = convert_checkpoint(tiny, q2, NULL, CONVERT_Q_Q2, NULL);
    check(ok, "convert tiny at q2%s%s", ok ? "" : ": ", ok ? "" : convert_errmsg);
    if (ok) test_tiny_q2(q2, &db);
    st_db_close(&db);
    unlink(out);
    unlink(mtp);
    unlink(q2);
}

/* =========================================================================
 * 5. Synthetic blocks
 * ========================================================================= */

static void test_synthetic_blocks(void) {
    static const uint32_t types[4] = {TYPE_Q8_0, TYPE_Q2_K, TYPE_Q4_K, TYPE_IQ2_XXS};
    enum { COLS = 4096, ROWS = 64 };
    uint8_t *q = convert_zalloc((size_t)type_row_bytes(TYPE_Q8_0, COLS) * ROWS);  /* the largest */
    float *y = convert_zalloc(COLS * sizeof *y);
    quant_tables_init();
    for (int k = 0; k < 4; k++) {
        uint64_t rng = 99;
        convert_synth_blocks(&rng, types[k], COLS, q, ROWS);
        double sum2 = 0, sum = 0;
        bool finite = true;
        for (int r = 0; r < ROWS; r++) {
            dequant_row_ref(types[k], q + (size_t)r * type_row_bytes(types[k], COLS), y, COLS);
            for (int i = 0; i < COLS; i++) {
                finite &= isfinite(y[i]) != 0;
                sum += y[i];
                sum2 += (double)y[i] * y[i];
            }
        }
        double n = (double)ROWS * COLS, mean = sum / n, sd = sqrt(sum2 / n - mean * mean);
        double want = 1.0 / sqrt(COLS);
        check(finite && sd > 0.6 * want && sd < 1.6 * want && fabs(mean) < 0.3 * want,
              "synthetic %-7s blocks: finite, sd %.4f (target %.4f), mean %+.5f",
              convert_type_name(types[k]), sd, want, mean);
    }
    free(q);
    free(y);
}

/* =========================================================================
 * 6. The command line
 * ========================================================================= */

static bool parse(const char *line, struct convert_args *a) {
    char buf[256], *argv[16];
    int argc = 0;
    snprintf(buf, sizeof buf, "ds4-convert %s", line);
    for (char *tok = strtok(buf, " "); tok && argc < 16; tok = strtok(NULL, " ")) argv[argc++] = tok;
    return convert_parse_args(argc, argv, a);
}

static void test_command_line(void) {
    struct convert_args a;
    bool ok = parse("src out.gguf", &a);
    check(ok && a.qtype == CONVERT_Q_F16 && !a.mtp, "SRC OUT -> f16 by default, no MTP");
    ok = parse("src out.gguf --mtp m.gguf --type q2", &a);
    check(ok && a.qtype == CONVERT_Q_Q2 && a.mtp && strcmp(a.mtp, "m.gguf") == 0,
          "--mtp and --type q2");
    ok = parse("--synthetic full --layers 3 out.gguf --seed 7", &a);
    check(ok && a.layers == 3 && a.seed == 7 && a.qtype == CONVERT_Q_Q2 &&
          strcmp(a.out, "out.gguf") == 0, "--synthetic full --layers 3 OUT (q2 by default)");
    check(!parse("src out.gguf --type bf16", &a), "--type bf16 refused: %s", convert_errmsg);
    check(!parse("src", &a), "one positional refused: %s", convert_errmsg);
    check(!parse("src out.gguf --type", &a), "option without value: %s", convert_errmsg);
    check(!parse("--synthetic half --layers 1 out.gguf", &a), "--synthetic half: %s",
          convert_errmsg);
    check(!parse("--synthetic full out.gguf", &a), "--synthetic without --layers: %s",
          convert_errmsg);
    ok = parse("src out.gguf --vocab v.gguf", &a);
    check(ok && a.vocab && strcmp(a.vocab, "v.gguf") == 0, "--vocab VOCAB with a checkpoint");
    ok = parse("--synthetic full --layers 1 out.gguf --vocab v.gguf", &a);
    check(ok && a.vocab && strcmp(a.out, "out.gguf") == 0, "--vocab VOCAB with --synthetic");
    ok = parse("src out.gguf", &a);
    check(ok && !a.vocab, "no --vocab: no tokenizer");
    check(!convert_synthetic("/nonexistent-dir/x.gguf", 1, CONVERT_Q_Q2, 1, NULL),
          "unwritable output -> error: %s", convert_errmsg);
    check(!convert_synthetic("/tmp/never.gguf", 100000, CONVERT_Q_Q2, 1, NULL),
          "absurd --layers -> error: %s", convert_errmsg);
}

/* =========================================================================
 * 7. The plan at full size, against the published files [FMT §1.3, §1.4]
 * ========================================================================= */

static const struct convert_tensor *plan_find(const struct convert_plan *p, const char *name) {
    for (int i = 0; i < p->n; i++)
        if (strcmp(p->t[i].name, name) == 0) return &p->t[i];
    return NULL;
}

static void test_full_plan(void) {
    struct convert_config cfg;
    struct convert_plan p;
    convert_config_flash(&cfg, 43);
    convert_plan_init(&p, &cfg, NULL, CONVERT_Q_Q2, false);
    check(p.n == 1328, "Flash main file: %d tensors (want 6 + 2x24 + 34 + 20x28 + 20x34 = 1328)", p.n);
    const struct convert_tensor *t = plan_find(&p, "blk.7.ffn_gate_exps.weight");
    check(t && t->type == TYPE_IQ2_XXS && t->n_bytes == 256ull * 2162688,
          "q2 gate experts: IQ2_XXS, 2,162,688 bytes per expert");
    t = plan_find(&p, "blk.7.ffn_down_exps.weight");
    check(t && t->type == TYPE_Q2_K && t->n_bytes == 256ull * 2752512,
          "q2 down experts: Q2_K, 2,752,512 bytes per expert");
    double gib = (double)p.data_bytes / (1u << 30);
    check(fabs(gib - 80.8) < 0.3, "q2 weights total %.2f GiB (published file: 80.8 GiB)", gib);
    t = plan_find(&p, "blk.42.indexer_compressor_ape.weight");
    check(t && t->ne[0] == 256 && t->ne[1] == 4 && t->type == TYPE_F16,
          "blk.42 indexer_compressor_ape [256, 4] F16");
    t = plan_find(&p, "blk.41.attn_compressor_ape.weight");
    check(t && t->ne[0] == 512 && t->ne[1] == 128, "blk.41 attn_compressor_ape [512, 128]");
    check(plan_find(&p, "blk.2.ffn_gate_tid2eid.weight") && !plan_find(&p, "blk.3.ffn_gate_tid2eid.weight"),
          "tid2eid in hash layers 0-2 only");
    convert_plan_free(&p);
    convert_plan_init(&p, &cfg, NULL, CONVERT_Q_Q4, false);
    gib = (double)p.data_bytes / (1u << 30);
    check(fabs(gib - 153.3) < 0.3, "q4 weights total %.2f GiB (published file: 153.3 GiB)", gib);
    convert_plan_free(&p);
    convert_plan_init(&p, &cfg, NULL, CONVERT_Q_Q2, true);
    t = plan_find(&p, "mtp.0.ffn_gate_exps.weight");
    check(p.n == 32 && t && t->type == TYPE_Q4_K, "MTP plan: 32 tensors, Q4_K experts at q2");
    convert_plan_free(&p);
    cfg.ffn = 160;                 /* 160 is 5 x 32 but not a multiple of 256 */
    convert_plan_init(&p, &cfg, NULL, CONVERT_Q_Q2, false);
    t = plan_find(&p, "blk.3.ffn_down_exps.weight");
    const struct convert_tensor *g = plan_find(&p, "blk.3.ffn_gate_exps.weight");
    check(t && t->type == TYPE_F16 && g && g->type == TYPE_IQ2_XXS,
          "rows of 160 cannot be Q2_K: down experts fall back to F16, gate stays IQ2_XXS");
    convert_plan_free(&p);
}

/* =========================================================================
 * 8. --vocab: the tokenizer copied from a vocabulary GGUF
 * ========================================================================= */

#define TINY_VOCAB "vectors/tiny-vocab.gguf"      /* 2048 tokens, the tiny model's */
#define FULL_VOCAB "vectors/ds4-vocab.gguf"       /* 129280 tokens, the real V4 one */

/* The tokenizer keys both vocabulary files hold. */
static const char *const vocab_keys[] = {
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
};
enum { N_VOCAB_KEYS = sizeof vocab_keys / sizeof vocab_keys[0] };

/* Array `key` of strings: its count and the offset of its first item. */
static bool rd_string_array(struct rd_gguf *g, const char *key, uint64_t *count, size_t *first) {
    uint32_t type = 0;
    size_t at = rd_find_kv(g, key, &type);
    if (!at || type != 9 || at + 12 > g->size || convert_load_u32(g->map + at) != 8) return false;
    *count = convert_load_u64(g->map + at + 4);
    *first = at + 12;
    return true;
}

/* The string at *pos, bounds-checked; *pos moves past it. */
static bool rd_next_string(const struct rd_gguf *g, size_t *pos, const uint8_t **s,
                           uint64_t *len) {
    if (*pos + 8 > g->size) return false;
    *len = convert_load_u64(g->map + *pos);
    if (*len > g->size - *pos - 8) return false;
    *s = g->map + *pos + 8;
    *pos += 8 + (size_t)*len;
    return true;
}

/* String array `key` of `out` against the same array of `vocab`: the same
 * count, and every string equal byte for byte. */
static void check_same_strings(struct rd_gguf *out, struct rd_gguf *vocab, const char *key,
                               uint64_t want) {
    uint64_t n_out = 0, n_vocab = 0, differ = 0;
    size_t p_out = 0, p_vocab = 0;
    bool ok = rd_string_array(out, key, &n_out, &p_out) &&
              rd_string_array(vocab, key, &n_vocab, &p_vocab) && n_out == n_vocab;
    for (uint64_t i = 0; ok && i < n_out; i++) {
        const uint8_t *a, *b;
        uint64_t la, lb;
        ok = rd_next_string(out, &p_out, &a, &la) && rd_next_string(vocab, &p_vocab, &b, &lb);
        differ += ok && (la != lb || memcmp(a, b, (size_t)la) != 0);
    }
    check(ok && differ == 0 && n_out == want, "%s: %llu strings out, %llu in the vocabulary "
          "(want %llu), %llu differ", key, (unsigned long long)n_out,
          (unsigned long long)n_vocab, (unsigned long long)want, (unsigned long long)differ);
}

/* The encoded value of `key`: where it starts and how many bytes it takes. */
static bool rd_value_span(struct rd_gguf *g, const char *key, uint32_t *type, size_t *start,
                          size_t *len) {
    *start = rd_find_kv(g, key, type);
    if (!*start) return false;
    rd_skip_value(g, *type);
    *len = g->pos - *start;
    return !g->bad && g->pos <= g->size;
}

/* Every tokenizer key, whatever its type, is a byte-for-byte copy. */
static void check_keys_copied(struct rd_gguf *out, struct rd_gguf *vocab) {
    int same = 0;
    for (int k = 0; k < N_VOCAB_KEYS; k++) {
        uint32_t ta, tb;
        size_t sa, la, sb, lb;
        same += rd_value_span(out, vocab_keys[k], &ta, &sa, &la) &&
                rd_value_span(vocab, vocab_keys[k], &tb, &sb, &lb) && ta == tb && la == lb &&
                memcmp(out->map + sa, vocab->map + sb, la) == 0;
    }
    check(same == N_VOCAB_KEYS, "%d of %d tokenizer.* keys are byte-for-byte copies", same,
          N_VOCAB_KEYS);
}

/* Metadata keys written without --vocab, for the count check. */
static uint64_t model_key_count(const struct convert_config *cfg) {
    struct convert_buf kv = {0};
    convert_write_metadata(&kv, cfg, "x");
    free(kv.p);
    return kv.count;
}

static bool rd_string_is(struct rd_gguf *g, const char *key, const char *want) {
    uint32_t type = 0;
    size_t at = rd_find_kv(g, key, &type);
    return at && type == 8 && convert_load_u64(g->map + at) == strlen(want) &&
           memcmp(g->map + at + 8, want, strlen(want)) == 0;
}

/* The engine's own loader takes the copied vocabulary. */
static void check_engine_tokenizer(const char *path, int vocab) {
    struct gguf g;
    struct tokenizer tok;
    struct ds4_error e = { "" };
    memset(&tok, 0, sizeof tok);
    bool ok = gguf_open(&g, path, &e) && tokenizer_load_gguf(&tok, &g, vocab, &e);
    check(ok, "the engine loads the tokenizer of the output%s%s", ok ? "" : ": ", e.msg);
    if (ok) tokenizer_free(&tok);
    gguf_close(&g);
}

static void test_vocab_tiny(const char *root, const char *tiny) {
    char out[600], mtp[600];
    struct convert_config cfg;
    struct rd_gguf g, v, m;
    snprintf(out, sizeof out, "%s/tiny-vocab-out.gguf", root);
    snprintf(mtp, sizeof mtp, "%s/tiny-vocab-mtp.gguf", root);
    convert_quiet = true;
    bool ok = convert_checkpoint(tiny, out, mtp, CONVERT_Q_F16, TINY_VOCAB);
    check(ok, "convert %s --vocab %s%s%s", tiny, TINY_VOCAB, ok ? "" : ": ",
          ok ? "" : convert_errmsg);
    if (!ok || !convert_config_load(tiny, &cfg)) return;
    bool ok_g = rd_open(&g, out), ok_v = rd_open(&v, TINY_VOCAB);
    check(ok_g && ok_v, "output and vocabulary read back with the test's reader");
    if (ok_g && ok_v) {
        check_same_strings(&g, &v, "tokenizer.ggml.tokens", 2048);
        check_same_strings(&g, &v, "tokenizer.ggml.merges", 1742);
        check_keys_copied(&g, &v);
        check(g.n_kv == model_key_count(&cfg) + N_VOCAB_KEYS,
              "output has %llu metadata keys = the model's + %d tokenizer keys",
              (unsigned long long)g.n_kv, N_VOCAB_KEYS);
        check(rd_string_is(&g, "general.name", "tiny"),
              "general.name is the model's, not the vocabulary file's");
        check(g.n_tensors == 178, "the tensors are unchanged: %llu (want 178)",
              (unsigned long long)g.n_tensors);
    }
    rd_close(&g);
    rd_close(&v);
    uint32_t type;
    check(rd_open(&m, mtp) && rd_find_kv(&m, "tokenizer.ggml.tokens", &type) == 0,
          "the MTP file gets no tokenizer");
    rd_close(&m);
    check_engine_tokenizer(out, 2048);
    unlink(out);
    unlink(mtp);
}

/* --synthetic full: the header alone (no 3 GB of weights) with the real
 * vocabulary in it. */
static void test_vocab_synthetic(const char *root) {
    struct convert_config cfg;
    struct convert_vocab vocab;
    struct convert_plan plan;
    struct convert_buf h = {0};
    char path[600];
    convert_config_flash(&cfg, 1);
    bool ok = convert_vocab_open(&vocab, FULL_VOCAB, cfg.vocab);
    check(ok, "%s fits --synthetic full (129280 tokens)%s%s", FULL_VOCAB, ok ? "" : ": ",
          ok ? "" : convert_errmsg);
    if (!ok) return;
    convert_plan_init(&plan, &cfg, NULL, CONVERT_Q_Q2, false);
    plan.vocab = &vocab;
    convert_build_header(&h, &plan, "synthetic");
    snprintf(path, sizeof path, "%s/synthetic-header.gguf", root);
    FILE *f = fopen(path, "wb");
    if (f) { fwrite(h.p, 1, h.n, f); fclose(f); }
    struct rd_gguf g, v;
    if (rd_open(&g, path) && rd_open(&v, FULL_VOCAB)) {
        check_same_strings(&g, &v, "tokenizer.ggml.tokens", 129280);
        check_same_strings(&g, &v, "tokenizer.ggml.merges", 127741);
        check_keys_copied(&g, &v);
    } else {
        check(false, "synthetic header and %s read back", FULL_VOCAB);
    }
    rd_close(&g);
    rd_close(&v);
    free(h.p);
    convert_plan_free(&plan);
    convert_vocab_close(&vocab);
    unlink(path);
}

/* Converting tiny (or a synthetic model) with `vocab` must fail with an
 * error holding every needle, and leave no OUT and no temporary. */
static void expect_vocab_refused(const char *root, const char *tiny, const char *vocab,
                                 const char *what, const char *n1, const char *n2) {
    char dir[512], out[600], mtp[600];
    snprintf(dir, sizeof dir, "%s/vocab-refused", root);
    mkdir(dir, 0700);
    snprintf(out, sizeof out, "%s/out.gguf", dir);
    snprintf(mtp, sizeof mtp, "%s/mtp.gguf", dir);
    convert_errmsg[0] = 0;
    bool ok = tiny ? convert_checkpoint(tiny, out, mtp, CONVERT_Q_F16, vocab)
                   : convert_synthetic(out, 1, CONVERT_Q_Q2, 1, vocab);
    check(!ok && strstr(convert_errmsg, vocab) && strstr(convert_errmsg, n1) &&
          (!n2 || strstr(convert_errmsg, n2)), "%s -> error: %s", what, convert_errmsg);
    check(no_output_left(dir, "out.gguf") && no_output_left(dir, "mtp.gguf"),
          "  ... and no output file or temporary is left");
}

/* A well-formed GGUF whose tokenizer.ggml.tokens holds 2048 numbers, not
 * strings: the right count, the wrong type. */
static void write_numeric_vocab(const char *path) {
    static int64_t ids[2048];
    struct convert_buf kv = {0}, h = {0};
    gguf_write_kv_u32_array(&kv, "tokenizer.ggml.tokens", ids, 2048);
    gguf_write_u32(&h, 0x46554747u);
    gguf_write_u32(&h, 3);
    gguf_write_u64(&h, 0);
    gguf_write_u64(&h, kv.count);
    gguf_write_put(&h, kv.p, kv.n);
    while (h.n % 32) gguf_write_put(&h, "", 1);     /* an empty, aligned data section */
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(2); }
    fwrite(h.p, 1, h.n, f);
    fclose(f);
    free(kv.p);
    free(h.p);
}

/* The first `n` bytes of `from`, as `to`. */
static void write_prefix(const char *from, const char *to, size_t n) {
    size_t len;
    char *bytes = convert_read_small_file(from, 1 << 20, &len);
    if (!bytes) { fprintf(stderr, "%s\n", convert_errmsg); exit(2); }
    FILE *f = fopen(to, "wb");
    if (!f) { perror(to); exit(2); }
    fwrite(bytes, 1, n < len ? n : len, f);
    fclose(f);
    free(bytes);
}

static void test_vocab_refused(const char *root, const char *tiny) {
    char missing[600], text[600], numeric[600], cut[600];
    snprintf(missing, sizeof missing, "%s/no-such-vocab.gguf", root);
    snprintf(text, sizeof text, "%s/text-vocab.gguf", root);
    snprintf(numeric, sizeof numeric, "%s/numeric-vocab.gguf", root);
    snprintf(cut, sizeof cut, "%s/cut-vocab.gguf", root);
    write_text(text, "this is a text file that only claims to be a GGUF vocabulary\n");
    write_numeric_vocab(numeric);
    write_prefix(TINY_VOCAB, cut, 30000);
    expect_vocab_refused(root, tiny, FULL_VOCAB, "tiny with the 129280-token vocabulary",
                         "129280", "2048");
    expect_vocab_refused(root, NULL, TINY_VOCAB, "--synthetic full with the 2048-token one",
                         "2048", "129280");
    expect_vocab_refused(root, tiny, missing, "a missing vocabulary file", "cannot open", NULL);
    expect_vocab_refused(root, tiny, text, "a text file", "not a GGUF", NULL);
    expect_vocab_refused(root, tiny, cut, "a vocabulary cut at 30000 bytes", "truncated", NULL);
    expect_vocab_refused(root, tiny, numeric, "tokens that are numbers, not strings",
                         "array of strings", NULL);
}

static void test_vocab(const char *root, const char *tiny) {
    if (access(TINY_VOCAB, R_OK) != 0 || access(FULL_VOCAB, R_OK) != 0) {
        check(false, "%s and %s are readable (run from the repository root)", TINY_VOCAB,
              FULL_VOCAB);
        return;
    }
    test_vocab_tiny(root, tiny);
    test_vocab_synthetic(root);
    test_vocab_refused(root, tiny);
}

int main(int argc, char **argv) {
    /* The tiny checkpoint: the argument, else the repository's copy, found
     * from the working directory or any parent that holds ds4.c. */
    const char *tiny = argc > 1 ? argv[1] : repo_path("vectors/tiny/config.json") ? repo_path("vectors/tiny") : NULL;
    if (!tiny) {
        check(false, "the tiny checkpoint vectors/tiny is in the repository (or pass its path)");
        return harness_report();
    }
    char root[] = "/tmp/test_convert-XXXXXX";
    if (!mkdtemp(root)) { perror("mkdtemp"); return 2; }
    printf("-- 1. number formats\n");
    test_e4m3();
    test_e2m1_e8m0();
    printf("-- 2. a synthetic checkpoint (FP8 ragged tiles, FP4 experts)\n");
    test_checkpoint_formats(root);
    printf("-- 3. broken checkpoints\n");
    test_broken_shards(root);
    test_broken_index(root);
    test_broken_config(root, tiny);
    printf("-- 4. the tiny checkpoint, f16 and q2, read back\n");
    test_tiny(root, tiny);
    printf("-- 5. synthetic blocks\n");
    test_synthetic_blocks();
    printf("-- 6. the command line\n");
    test_command_line();
    printf("-- 7. the plan at full size\n");
    test_full_plan();
    printf("-- 8. --vocab: the tokenizer from a vocabulary GGUF\n");
    test_vocab(root, tiny);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", root);
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed == 0 ? 0 : 1;
}
