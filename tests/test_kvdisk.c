/* tests/test_kvdisk.c -- tests for the disk KV cache chapter (snapshots and
 * the SQLite-indexed store).
 *
 *     tests/bin/test_kvdisk vectors/tiny.gguf vectors/tiny-mtp.gguf [FOREIGN.gguf]
 *
 *   1. SHA1 against the FIPS 180 vectors; prefix digests; CRC32C check value.
 *   2. FP8/FP4 packing is lossless on every row the engine produced.
 *   3. save -> load (in process) -> continue: logits bit-exact, with and
 *      without MTP; every state array compared.
 *   4. hostile snapshots: flipped bytes, truncations, fields rewritten with
 *      valid CRCs, a foreign model's snapshot: each refused with a message.
 *   5. the store: longest-prefix lookup, deleted file, deleted row, flipped
 *      byte, foreign model, the space budget under 200 saves, the write
 *      budget, the save policy.
 *   6. in-memory checkpoints (12.11): restore + re-feed == straight feed,
 *      bit for bit, with and without MTP; a fork; stale checkpoints refused.
 *
 * Build with ASan+UBSan (the hostile files) and -lsqlite3. Last line:
 * "N passed, N failed".
 */
#define DS4_NO_MAIN
#include "../ds4.c"
#include "harness.h"

/* ---- 1. hashes ----------------------------------------------------------- */

static void test_hashes(void) {
    struct { const char *in; const char *want; } v[] = {
        { "", "da39a3ee5e6b4b0d3255bfef95601890afd80709" },
        { "abc", "a9993e364706816aba3e25717850c26c9cd0d89d" },
        { "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
          "84983e441c3bd26ebaae4aa1f95129e5e54670f1" },
        { "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
          "a49b2446a02c645bf419f995b67091253a04a259" },
    };
    int ok = 0;
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        char hex[41];
        sha1_of(v[i].in, strlen(v[i].in), hex);
        ok += strcmp(hex, v[i].want) == 0;
    }
    check(ok == 4, "SHA1: %d of 4 FIPS 180 vectors (empty, abc, 448-bit, 896-bit)", ok);
    char *million = xmalloc(1000000);
    memset(million, 'a', 1000000);
    struct sha1 c;
    sha1_init(&c);
    for (int i = 0; i < 1000000; i += 999) sha1_update(&c, million + i, i + 999 <= 1000000 ? 999 : 1000000 - i);
    uint8_t d[20];
    char hex[41];
    sha1_digest(&c, d);
    sha1_hex(d, hex);
    check(strcmp(hex, "34aa973cd4c4daa4f61eeb2bdbad27316534016f") == 0,
          "SHA1: one million 'a' fed in 999-byte pieces = 34aa973c...");
    int64_t lens[3] = { 0, 3, 56 };
    char hx[3][41], direct[41];
    const char *txt = v[2].in;
    kv_prefix_hashes((const uint8_t *)txt, 1, lens, 3, hx);
    int same = 0;
    for (int i = 0; i < 3; i++) {
        sha1_of(txt, (size_t)lens[i], direct);
        same += strcmp(direct, hx[i]) == 0;
    }
    check(same == 3, "SHA1 of prefixes in one pass == separate SHA1s (3 lengths)");
    free(million);
    crc32c_init();
    uint32_t crc = crc32c_update(0, "123456789", 9);
    uint32_t split = crc32c_update(crc32c_update(0, "1234", 4), "56789", 5);
    check(crc == 0xe3069283u && split == crc, "CRC32C(\"123456789\") = 0x%08x (want 0xe3069283), "
          "split in two = 0x%08x", crc, split);
}

/* ---- helpers on the model ----------------------------------------------- */

struct env {
    struct model model;
    struct engine eng;
    struct tokenizer tok;
};

static bool env_open(struct env *v, const char *path, const char *mtp) {
    struct ds4_error e = { "" };
    if (!model_load(&v->model, path, mtp, &e)) {
        printf("cannot load %s: %s\n", path, e.msg);
        return false;
    }
    memset(&v->tok, 0, sizeof v->tok);
    if (!tokenizer_load_gguf(&v->tok, &v->model.file, v->model.cfg.vocab, &e)) {
        printf("cannot load the tokenizer: %s\n", e.msg);
        return false;
    }
    engine_init(&v->eng, &v->model, (struct engine_options){ 0 });
    return true;
}

static void env_close(struct env *v) {
    engine_free(&v->eng);
    tokenizer_free(&v->tok);
    model_free(&v->model);
}

static int32_t *make_tokens(int64_t n, uint64_t seed) {
    int32_t *ids = xmalloc((size_t)n * sizeof(int32_t));
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)(splitmix64(&seed) % 1000) + 3;
    return ids;
}

static int64_t count_diff(const float *a, const float *b, int64_t n) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) bad += !same_bits(a[i], b[i]);
    return bad;
}

/* ---- 2. lossless packing -------------------------------------------------- */

static void pack_rows(const float *rows, int64_t n, int width, int coded, int block, bool fp4,
                      int64_t *blocks, int64_t *lossy) {
    uint8_t buf[1 + FP8_BLOCK];
    for (int64_t r = 0; r < n; r++)
        for (int b = 0; b + block <= coded; b += block) {
            const float *v = rows + r * width + b;
            bool ok = fp4 ? fp4_encode_block(v, block, buf) : fp8_encode_block(v, block, buf);
            (*blocks)++;
            if (!ok) { (*lossy)++; continue; }
            float sc = ldexpf(1.0f, buf[0] - 127);
            for (int i = 0; i < block; i++) {
                uint8_t code = fp4 ? (buf[1 + i / 2] >> (4 * (i & 1))) & 15 : buf[1 + i];
                float back = (fp4 ? e2m1_value(code) : e4m3_table[code]) * sc;
                if (!same_bits(back, v[i])) { (*lossy)++; break; }
            }
        }
}

static void test_packing(struct env *v, struct session *s) {
    const struct ds4_config *c = &v->model.cfg;
    int64_t kv_blocks = 0, kv_lossy = 0, idx_blocks = 0, idx_lossy = 0;
    int coded = c->head_dim - c->rope_dim;
    for (int l = 0; l < c->n_layers; l++) {
        struct layer_state *st = &s->layers[l];
        pack_rows(st->ring, c->window, c->head_dim, coded, FP8_BLOCK, false, &kv_blocks, &kv_lossy);
        pack_rows(st->comp_rows.rows, st->comp_rows.n, c->head_dim, coded, FP8_BLOCK, false,
                  &kv_blocks, &kv_lossy);
        pack_rows(st->idx_rows.rows, st->idx_rows.n, c->idx_dim, c->idx_dim, FP4_BLOCK, true,
                  &idx_blocks, &idx_lossy);
    }
    check(kv_blocks > 0 && kv_lossy == 0, "FP8 e4m3 packing of %lld engine KV blocks (window + "
          "compressed rows): %lld not bit-exact", (long long)kv_blocks, (long long)kv_lossy);
    check(idx_blocks > 0 && idx_lossy == 0, "FP4 e2m1 packing of %lld engine indexer blocks: %lld "
          "not bit-exact", (long long)idx_blocks, (long long)idx_lossy);
    float plain[64];
    uint64_t seed = 5;
    for (int i = 0; i < 64; i++) plain[i] = (float)((double)(splitmix64(&seed) >> 11) / 9e15);
    uint8_t buf[65];
    check(!fp8_encode_block(plain, 64, buf), "a block that never went through the FP8 round trip "
          "is refused by the encoder (it would be stored as float32)");
}

/* ---- 3. save, load, continue ----------------------------------------------- */

static void compare_states(struct env *v, struct session *a, struct session *b, const char *what) {
    const struct ds4_config *c = &v->model.cfg;
    int64_t bad = count_diff(a->logits, b->logits, c->vocab), n_floats = c->vocab;
    int64_t R = a->pos < c->window ? a->pos : c->window;
    for (int l = 0; l < c->n_layers; l++) {
        struct layer_state *x = &a->layers[l], *y = &b->layers[l];
        for (int64_t p = a->pos - R; p < a->pos; p++) {
            size_t off = (size_t)(p % c->window) * c->head_dim;
            bad += count_diff(x->ring + off, y->ring + off, c->head_dim);
            n_floats += c->head_dim;
        }
        bad += (x->comp_rows.n != y->comp_rows.n) + (x->idx_rows.n != y->idx_rows.n);
        bad += count_diff(x->comp_rows.rows, y->comp_rows.rows, x->comp_rows.n * c->head_dim);
        bad += count_diff(x->idx_rows.rows, y->idx_rows.rows, x->idx_rows.n * c->idx_dim);
        n_floats += x->comp_rows.n * c->head_dim + x->idx_rows.n * c->idx_dim;
    }
    check(bad == 0 && a->pos == b->pos, "%s: %lld state floats (logits, window rows, compressed, "
          "indexer) compared bitwise, %lld differ", what, (long long)n_floats, (long long)bad);
}

static void test_roundtrip(struct env *v, const char *label, const char *dir) {
    struct ds4_error e = { "" };
    const struct ds4_config *c = &v->model.cfg;
    int64_t N = 301, K = 40;      /* 301: mid-window for ratio 4 and 128, past the window */
    int32_t *ids = make_tokens(N + K, 99);
    struct session a, b, ref;
    session_init(&a, &v->eng);
    session_init(&b, &v->eng);
    session_init(&ref, &v->eng);
    session_feed(&a, ids, N, 37, &e);
    session_feed(&ref, ids, N, 37, &e);
    test_packing(v, &a);
    char path[600];
    snprintf(path, sizeof path, "%s/rt.kv", dir);
    struct snapshot_meta meta = { "key", 3, KV_REASON_COLD, 0 };
    struct snapshot_stats ss;
    bool ok = session_save(&a, ids, N, path, &meta, &ss, &e);
    check(ok && ss.raw_blocks == 0, "%s: saved %lld tokens, %llu bytes, %llu rows packed, %llu "
          "raw blocks (%s)", label, (long long)N, (unsigned long long)ss.file_bytes,
          (unsigned long long)ss.rows, (unsigned long long)ss.raw_blocks, ok ? "ok" : e.msg);
    int32_t *got = NULL;
    int64_t n = 0;
    ok = session_load(&b, path, &got, &n, &e);
    check(ok && n == N && memcmp(got, ids, (size_t)N * 4) == 0,
          "%s: loaded %lld tokens, ids equal (%s)", label, (long long)n, ok ? "ok" : e.msg);
    compare_states(v, &a, &b, label);
    struct forward_request ra = { 0 }, rb = { 0 };
    float *ma = NULL, *mb = NULL;
    if (v->model.has_mtp) {
        ma = xcalloc((size_t)c->vocab, sizeof(float));
        mb = xcalloc((size_t)c->vocab, sizeof(float));
        ra.mtp_logits = ma;
        rb.mtp_logits = mb;
    }
    int64_t bad = 0, mtp_bad = 0;
    for (int64_t i = N; i < N + K; i++) {
        session_forward(&ref, &ids[i], 1, &ra, &e);
        session_forward(&b, &ids[i], 1, &rb, &e);
        bad += count_diff(ref.logits, b.logits, c->vocab);
        if (ma) mtp_bad += count_diff(ma, mb, c->vocab);
    }
    check(bad == 0 && mtp_bad == 0, "%s: %lld decode steps after the load vs the uninterrupted "
          "session: %lld logits differ, %lld MTP logits differ%s", label, (long long)K,
          (long long)bad, (long long)mtp_bad, ma ? "" : " (no MTP)");
    free(ma);
    free(mb);
    free(got);
    session_free(&a);
    session_free(&b);
    session_free(&ref);
    free(ids);
}

/* ---- 4. hostile snapshots ------------------------------------------------- */

static bool try_load_bytes(struct env *v, const char *dir, const uint8_t *bytes, size_t n,
                           char *msg, size_t cap) {
    char path[600];
    snprintf(path, sizeof path, "%s/hostile.kv", dir);
    FILE *f = fopen(path, "wb");
    fwrite(bytes, 1, n, f);
    fclose(f);
    struct session s;
    session_init(&s, &v->eng);
    int32_t *got = NULL;
    int64_t got_n = 0;
    struct ds4_error e = { "" };
    bool ok = session_load(&s, path, &got, &got_n, &e);
    snprintf(msg, cap, "%s", e.msg);
    bool empty = ok || s.pos == 0;
    session_free(&s);
    free(got);
    return ok || !empty;
}

/* Recompute both CRCs, as a hostile writer who knows the format would. */
static void reseal(uint8_t *b, size_t n) {
    uint64_t key = load_le(b + 64, 8);
    (void)key;
    put_le(b + 72, n - KV_HEADER_BYTES - load_le(b + 64, 8), 8);
    put_le(b + 80, crc32c_update(0, b + KV_HEADER_BYTES, n - KV_HEADER_BYTES), 4);
    put_le(b + 92, crc32c_update(0, b, 92), 4);
}

static void test_hostile(struct env *v, struct env *foreign, const char *dir) {
    struct ds4_error e = { "" };
    int64_t N = 150;
    int32_t *ids = make_tokens(N, 3);
    struct session s;
    session_init(&s, &v->eng);
    session_feed(&s, ids, N, 64, &e);
    char path[600], msg[512];
    snprintf(path, sizeof path, "%s/good.kv", dir);
    struct snapshot_meta meta = { "k", 1, KV_REASON_COLD, 0 };
    session_save(&s, ids, N, path, &meta, NULL, &e);
    size_t len;
    uint8_t *good = (uint8_t *)read_file(path, &len, &e);
    uint8_t *bad = xmalloc(len + 64);
    uint64_t rng = 17;
    int refused = 0, trials = 400;
    for (int t = 0; t < trials; t++) {
        memcpy(bad, good, len);
        size_t at = (size_t)(splitmix64(&rng) % len);
        bad[at] ^= (uint8_t)(1u << (splitmix64(&rng) % 8));
        refused += !try_load_bytes(v, dir, bad, len, msg, sizeof msg) && msg[0];
    }
    check(refused == trials, "flipped bit at %d random offsets: %d refused with a message "
          "(last: %s)", trials, refused, msg);
    refused = 0;
    int cuts = 0;
    for (size_t cut = 0; cut < len; cut += len / 97 + 1, cuts++)
        refused += !try_load_bytes(v, dir, good, cut, msg, sizeof msg) && msg[0];
    check(refused == cuts, "truncated to %d lengths from 0 to %zu bytes: %d refused (last: %s)",
          cuts, len, refused, msg);
    memcpy(bad, good, len);
    memcpy(bad + len, "extra", 5);
    reseal(bad, len + 5);
    check(!try_load_bytes(v, dir, bad, len + 5, msg, sizeof msg), "5 trailing bytes, CRCs "
          "resealed: refused (%s)", msg);
    /* Fields rewritten with both CRCs recomputed: the structural checks must
     * catch them, not the checksum. Payload offsets of the table in 12.5. */
    size_t payload = KV_HEADER_BYTES + 1;
    struct { size_t off; int bytes; uint64_t value; const char *what; } edits[] = {
        { 56, 8, 1ull << 40, "header token count 2^40" },
        { 56, 8, 0, "header token count 0" },
        { payload + 0, 4, 7, "n_layers 7" },
        { payload + 8, 4, 5, "vocab 5" },
        { payload + 40 + 6 * 4, 8, 151, "payload token count 151" },
        { payload + 40 + 6 * 4, 8, 1ull << 61, "payload token count 2^61" },
        { payload + 40 + 6 * 4 + 8, 4, 0x7fffffff, "token id 2^31-1" },
        { payload + 40 + 6 * 4 + 8 + N * 4, 4, 0x7fc00000, "logit NaN" },
        { payload + 40 + 6 * 4 + 8 + N * 4 + 2048 * 4, 8, 1ull << 50, "window row count 2^50" },
        { payload + 40 + 6 * 4 + 8 + N * 4 + 2048 * 4 + 8, 1, 0, "FP8 scale byte 0" },
        { payload + 40 + 6 * 4 + 8 + N * 4 + 2048 * 4 + 8 + 1, 1, 0x7f, "FP8 code 0x7f (NaN)" },
        { 85, 1, 200, "save reason 200" },
    };
    int caught = 0, n_edits = (int)(sizeof edits / sizeof edits[0]);
    for (int i = 0; i < n_edits; i++) {
        memcpy(bad, good, len);
        put_le(bad + edits[i].off, edits[i].value, edits[i].bytes);
        reseal(bad, len);
        bool loaded = try_load_bytes(v, dir, bad, len, msg, sizeof msg);
        printf("      %-28s -> %s\n", edits[i].what, loaded ? "LOADED" : msg);
        caught += !loaded;
    }
    check(caught == n_edits, "%d fields rewritten with valid CRCs: %d refused by the field checks",
          n_edits, caught);
    if (foreign) {
        struct session fs;
        session_init(&fs, &foreign->eng);
        int32_t *got = NULL;
        int64_t n = 0;
        bool ok = session_load(&fs, path, &got, &n, &e);
        check(!ok && fs.pos == 0, "a snapshot of another model is refused: %s", e.msg);
        session_free(&fs);
        free(got);
    }
    free(good);
    free(bad);
    free(ids);
    session_free(&s);
}

/* ---- 5. the store --------------------------------------------------------- */

static int64_t dir_bytes(const char *dir, int *files) {
    DIR *d = opendir(dir);
    struct dirent *de;
    int64_t total = 0;
    *files = 0;
    char sha[41], path[1200];
    while ((de = readdir(d)) != NULL) {
        if (!is_entry_name(de->d_name, sha)) continue;
        struct stat sb;
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        if (stat(path, &sb) == 0) total += sb.st_size, (*files)++;
    }
    closedir(d);
    return total;
}

static void save_prefix(struct kv_store *st, struct env *v, const int32_t *ids, int64_t n,
                        char sha1[41]) {
    struct ds4_error e = { "" };
    struct session s;
    session_init(&s, &v->eng);
    session_feed(&s, ids, n, 64, &e);
    struct strbuf key = { 0 };
    detokenize(&v->tok, ids, (size_t)n, &key);
    struct kv_save_result r;
    if (!kv_store_save(st, &s, ids, n, key.data, key.len, KV_REASON_COLD, &r, &e))
        printf("save failed: %s\n", e.msg);
    if (sha1) snprintf(sha1, 41, "%s", r.sha1);
    strbuf_free(&key);
    session_free(&s);
}

static int64_t lookup_len(struct kv_store *st, struct env *v, const int32_t *ids, int64_t n) {
    struct strbuf text = { 0 };
    detokenize(&v->tok, ids, (size_t)n, &text);
    struct session s;
    session_init(&s, &v->eng);
    struct kv_hit hit;
    int64_t got = kv_store_lookup(st, &s, text.data, text.len, &hit) ? hit.n_tokens : 0;
    free(hit.tokens);
    session_free(&s);
    strbuf_free(&text);
    return got;
}

static void test_store(struct env *v, struct env *foreign, const char *dir) {
    struct ds4_error e = { "" };
    struct kv_store st;
    struct kv_store_options o = { .dir = dir, .quiet = true };
    check(kv_store_open(&st, &o, &v->model, &e), "store opened at %s (%s)", dir, e.msg);
    int32_t *ids = make_tokens(400, 11);
    char s100[41], s200[41], s300[41];
    save_prefix(&st, v, ids, 100, s100);
    save_prefix(&st, v, ids, 200, s200);
    save_prefix(&st, v, ids, 300, s300);
    int64_t got = lookup_len(&st, v, ids, 400);
    check(got == 300, "lookup of a 400-token prompt picks the longest saved prefix: %lld (want 300)",
          (long long)got);
    got = lookup_len(&st, v, ids, 250);
    check(got == 200, "lookup of a 250-token prompt: %lld (want 200)", (long long)got);
    int32_t *other = make_tokens(400, 12);
    got = lookup_len(&st, v, other, 400);
    check(got == 0, "an unrelated prompt misses: %lld", (long long)got);
    struct session s;
    session_init(&s, &v->eng);
    struct kv_hit hit;
    bool by_ids = kv_store_lookup_tokens(&st, &s, ids, 260, &hit);
    check(by_ids && hit.n_tokens == 200, "lookup by token ids (no text) of 260 ids: %lld",
          (long long)hit.n_tokens);
    free(hit.tokens);
    session_free(&s);

    /* deleted file: the lookup falls back to the next shorter prefix */
    char path[1000];
    kv_path(&st, s300, path, sizeof path);
    unlink(path);
    got = lookup_len(&st, v, ids, 400);
    check(got == 200 && !kv_row_exists(&st, s300), "file of the 300-token entry deleted: lookup "
          "gets %lld, its row is gone", (long long)got);
    /* flipped byte: detected on load, removed, fallback */
    kv_path(&st, s200, path, sizeof path);
    FILE *f = fopen(path, "r+b");
    fseek(f, 5000, SEEK_SET);
    int ch = fgetc(f);
    fseek(f, 5000, SEEK_SET);
    fputc(ch ^ 0x10, f);
    fclose(f);
    got = lookup_len(&st, v, ids, 400);
    check(got == 100 && !kv_row_exists(&st, s200) && access(path, F_OK) != 0,
          "flipped byte in the 200-token file: refused, file and row removed, lookup gets %lld",
          (long long)got);
    /* deleted row: the orphan file is removed at the next open */
    save_prefix(&st, v, ids, 350, s300);
    kv_exec(&st, "DELETE FROM snapshots WHERE tokens=350", &e);
    kv_store_close(&st);
    kv_store_open(&st, &o, &v->model, &e);
    kv_path(&st, s300, path, sizeof path);
    check(access(path, F_OK) != 0, "row of the 350-token entry deleted: its file is removed at open");
    /* foreign model: a file of another model placed under this model's row */
    if (foreign) {
        struct kv_store fst;
        char fdir[700];
        snprintf(fdir, sizeof fdir, "%s-foreign", dir);
        struct kv_store_options fo = { .dir = fdir, .quiet = true };
        kv_store_open(&fst, &fo, &foreign->model, &e);
        char fsha[41];
        save_prefix(&fst, foreign, ids, 100, fsha);
        got = lookup_len(&fst, foreign, ids, 100);
        check(got == 100 && strcmp(fsha, s100) == 0, "the other model saved the same text "
              "(same file name %.12s...) in its own directory", fsha);
        char from[1000], to[1000];
        kv_path(&fst, fsha, from, sizeof from);
        kv_path(&st, s100, to, sizeof to);
        char cmd[2100];
        snprintf(cmd, sizeof cmd, "cp %s %s", from, to);
        if (system(cmd) != 0) printf("cp failed\n");
        kv_exec(&st, "UPDATE snapshots SET bytes=(SELECT bytes FROM snapshots) ", &e);
        kv_store_close(&fst);
        struct stat sb;
        stat(to, &sb);
        char sql[200];
        snprintf(sql, sizeof sql, "UPDATE snapshots SET bytes=%lld WHERE sha1='%s'",
                 (long long)sb.st_size, s100);
        kv_exec(&st, sql, &e);
        got = lookup_len(&st, v, ids, 400);
        check(got == 0 && !kv_row_exists(&st, s100), "a foreign model's file under this model's "
              "row: refused and removed (lookup %lld)", (long long)got);
    }
    kv_store_close(&st);

    /* the space budget under 200 saves */
    char bdir[700];
    snprintf(bdir, sizeof bdir, "%s-budget", dir);
    struct kv_store_options bo = { .dir = bdir, .space_mb = 2, .quiet = true };
    kv_store_open(&st, &bo, &v->model, &e);
    struct session bs;
    session_init(&bs, &v->eng);
    session_feed(&bs, ids, 200, 64, &e);
    int64_t worst = 0;
    int files = 0, saved = 0;
    for (int i = 0; i < 200; i++) {
        char key[64];
        snprintf(key, sizeof key, "budget test %d", i);
        struct kv_save_result r;
        kv_store_save(&st, &bs, ids, 200, key, strlen(key), KV_REASON_CONTINUED, &r, &e);
        saved += r.saved;
        int64_t b = dir_bytes(bdir, &files);
        if (b > worst) worst = b;
    }
    int64_t rows = kv_query_int(&st, "SELECT COUNT(*) FROM snapshots WHERE bytes>=?", 0);
    check(saved == 200 && worst <= 2 << 20 && rows == files, "200 saves into a 2 MiB budget: "
          "largest directory size %lld bytes, %d files = %lld rows at the end", (long long)worst,
          files, (long long)rows);
    kv_store_close(&st);
    /* the write budget */
    bo.space_mb = 64;
    bo.write_mb_per_hour = 1;
    kv_store_open(&st, &bo, &v->model, &e);
    kv_exec(&st, "DELETE FROM writes", &e);
    saved = 0;
    for (int i = 0; i < 50; i++) {
        char key[64];
        snprintf(key, sizeof key, "write budget %d", i);
        struct kv_save_result r;
        kv_store_save(&st, &bs, ids, 200, key, strlen(key), KV_REASON_CONTINUED, &r, &e);
        saved += r.saved;
    }
    int64_t written = kv_query_int(&st, "SELECT SUM(bytes) FROM writes WHERE bytes>=?", 0);
    check(written <= 1 << 20 && saved > 0 && saved < 50, "write budget 1 MiB/h: %d of 50 saves "
          "written, %lld bytes in the ledger", saved, (long long)written);
    kv_store_close(&st);
    session_free(&bs);
    free(ids);
    free(other);
}

static unsigned mode_of(const char *path) {
    struct stat sb;
    return lstat(path, &sb) == 0 ? (unsigned)(sb.st_mode & 0777) : 07777;
}

/* The store is private (0700 / 0600), refuses a directory it does not own
 * or that is a symlink, never follows a planted temp-file symlink, and
 * trusts a row only when it matches its file's header. */
static void test_privacy(struct env *v, const char *dir) {
    struct ds4_error e = { "" };
    struct kv_store st;
    char pdir[700], path[1000];
    snprintf(pdir, sizeof pdir, "%s-private", dir);
    struct kv_store_options o = { .dir = pdir, .quiet = true };
    check(kv_store_open(&st, &o, &v->model, &e), "private store opened (%s)", e.msg);
    int32_t *ids = make_tokens(200, 21);
    char sha[41];
    save_prefix(&st, v, ids, 120, sha);
    kv_path(&st, sha, path, sizeof path);
    char idx[800], lock[800];
    snprintf(idx, sizeof idx, "%s/index.sqlite", pdir);
    snprintf(lock, sizeof lock, "%s/lock", pdir);
    check(mode_of(pdir) == 0700 && mode_of(path) == 0600 && mode_of(idx) == 0600 && mode_of(lock) == 0600,
          "modes: dir %03o (want 700), snapshot %03o, index %03o, lock %03o (want 600)", mode_of(pdir),
          mode_of(path), mode_of(idx), mode_of(lock));
    /* Row and header disagree (ctx): the entry is not trusted. */
    char sql[200];
    snprintf(sql, sizeof sql, "UPDATE snapshots SET ctx=ctx+7 WHERE sha1='%s'", sha);
    kv_exec(&st, sql, &e);
    int64_t got = lookup_len(&st, v, ids, 200);
    check(got == 0 && !kv_row_exists(&st, sha), "index row ctx != file header ctx: refused and removed "
          "(lookup %lld)", (long long)got);
    /* A symlink planted where a temp file will be written is not followed. */
    char tmp[800], victim[800];
    snprintf(tmp, sizeof tmp, "%s/tmp.planted", pdir);
    snprintf(victim, sizeof victim, "%s-victim", dir);
    FILE *f = fopen(victim, "w");
    fputs("precious", f);
    fclose(f);
    if (symlink(victim, tmp) != 0) perror("symlink");
    struct session s;
    session_init(&s, &v->eng);
    session_feed(&s, ids, 50, 64, &e);
    struct snapshot_meta meta = { "k", 1, KV_REASON_COLD, 0 };
    bool wrote = snapshot_write_file(&s, ids, 50, tmp, &meta, NULL, &e);
    size_t vlen = 0;
    char *vtext = read_file(victim, &vlen, &e);
    struct stat tsb;
    bool regular = lstat(tmp, &tsb) == 0 && S_ISREG(tsb.st_mode) && (tsb.st_mode & 0777) == 0600;
    check(vtext && vlen == 8 && memcmp(vtext, "precious", 8) == 0 && (!wrote || regular),
          "a symlink planted at the temp path: not followed (write %s%s, victim still %zu bytes)",
          wrote ? "went to a new 0600 file" : "refused", wrote && !regular ? " NOT REGULAR" : "", vlen);
    free(vtext);
    session_free(&s);
    kv_store_close(&st);
    unlink(tmp);
    unlink(victim);
    /* An existing directory open to others is tightened. */
    chmod(pdir, 0755);
    unsigned before = mode_of(pdir);
    bool reopened = kv_store_open(&st, &o, &v->model, &e);
    unsigned after = mode_of(pdir);
    check(reopened && before == 0755 && after == 0700, "an existing %03o store is tightened to %03o", before,
          after);
    kv_store_close(&st);
    /* Someone else's directory, or a symlink, is refused. */
    char odir[700], ldir[700];
    snprintf(odir, sizeof odir, "%s-other", dir);
    mkdir(odir, 0700);
    bool chowned = chown(odir, geteuid() + 4242, (gid_t)-1) == 0;
    struct kv_store_options oo = { .dir = odir, .quiet = true };
    bool opened = kv_store_open(&st, &oo, &v->model, &e);
    if (opened) kv_store_close(&st);
    check(!chowned || (!opened && strstr(e.msg, "belongs to uid")), "a directory owned by another "
          "user is refused (%s)", chowned ? e.msg : "cannot chown here: skipped");
    snprintf(ldir, sizeof ldir, "%s-link", dir);
    if (symlink(pdir, ldir) != 0) perror("symlink");
    struct kv_store_options lo = { .dir = ldir, .quiet = true };
    opened = kv_store_open(&st, &lo, &v->model, &e);
    if (opened) kv_store_close(&st);
    check(!opened && strstr(e.msg, "not a directory"), "a symlink as the store directory is refused (%s)",
          e.msg);
    unlink(ldir);
    char cmd[2200];
    snprintf(cmd, sizeof cmd, "rm -rf %s %s", pdir, odir);
    if (system(cmd) != 0) printf("cleanup failed\n");
    free(ids);
}

static void test_policy(void) {
    struct kv_policy p = kv_default_policy();
    int32_t *ids = xcalloc(40000, sizeof(int32_t));
    enum { USER = 9, ASSIST = 10 };
    ids[700] = USER;
    ids[900] = USER;
    ids[950] = ASSIST;
    ids[3000] = USER;
    int64_t a = kv_cold_save_point(&p, ids, 5000, USER, ASSIST);
    ids[900] = 0;
    ids[700] = 0;
    int64_t b = kv_cold_save_point(&p, ids, 5000, USER, ASSIST);
    int64_t c = kv_cold_save_point(&p, ids, 2070, USER, ASSIST);
    int64_t d = kv_cold_save_point(&p, ids, 35000, USER, ASSIST);
    int64_t f = kv_cold_save_point(&p, ids, 300, USER, ASSIST);
    p.cold_max_tokens = 30000;
    int64_t g = kv_cold_save_point(&p, ids, 35000, USER, ASSIST);
    check(a == 900 && b == 4096 && c == 0 && d == 34816 && f == 0 && g == 0, "cold save point: "
          "last User before Assistant %lld (900); else trim+align %lld (4096); 2070 tokens %lld "
          "(0: 2038 rounds to 0); 35000 %lld (34816: no upper limit by default); 300 %lld (0); "
          "35000 with cold_max 30000 %lld (0)", (long long)a, (long long)b, (long long)c,
          (long long)d, (long long)f, (long long)g);
    int64_t n1 = kv_next_continued_point(&p, 0, 25000), n2 = kv_next_continued_point(&p, 10240, 20479);
    check(n1 == 10240 && n2 == 0, "continued save points: first %lld (10240), none in "
          "(10240, 20479]: %lld", (long long)n1, (long long)n2);
    free(ids);
}

/* ---- 6. in-memory checkpoints: rewind and re-feed ----------------------------
 *
 * A straight feed of N tokens is compared, bit for bit, with a session that
 * was fed C tokens, checkpointed, fed 150 other tokens (which overwrite the
 * ring, move the frontiers and append rows), restored and fed tokens C..N
 * again with the same chunk boundaries. C = 96 is a multiple of the chunk,
 * C = 101 leaves every compressor mid-window. Then both decode 20 steps. */

static int64_t feed_checked(struct session *s, const int32_t *ids, int64_t n, struct ds4_error *e) {
    return session_feed(s, ids, n, 32, e) ? n : -1;
}

static void rewind_case(struct env *v, const char *label, int64_t C) {
    struct ds4_error e = { "" };
    const struct ds4_config *c = &v->model.cfg;
    int64_t N = 260, J = 150, D = 20;
    int32_t *ids = make_tokens(N + D, 7), *junk = make_tokens(J, 8);
    struct session a, b;
    session_init(&a, &v->eng);
    session_init(&b, &v->eng);
    feed_checked(&a, ids, C, &e);
    feed_checked(&a, ids + C, N - C, &e);
    feed_checked(&b, ids, C, &e);
    struct mem_checkpoint cp;
    checkpoint_encode(&cp, &b, ids);
    feed_checked(&b, junk, J, &e);
    bool ok = checkpoint_restore(&b, &cp, ids, &e);
    check(ok && b.pos == C, "%s: checkpoint at %lld (%zu bytes) restored after %lld other tokens "
          "(%s)", label, (long long)C, cp.len, (long long)J, ok ? "ok" : e.msg);
    feed_checked(&b, ids + C, N - C, &e);
    char what[160];
    snprintf(what, sizeof what, "%s: restore at %lld + re-feed to %lld vs straight feed", label,
             (long long)C, (long long)N);
    compare_states(v, &a, &b, what);
    struct forward_request ra = { 0 }, rb = { 0 };
    float *ma = NULL, *mb = NULL;
    if (v->model.has_mtp) {
        ra.mtp_logits = ma = xcalloc((size_t)c->vocab, sizeof(float));
        rb.mtp_logits = mb = xcalloc((size_t)c->vocab, sizeof(float));
    }
    int64_t bad = 0, mtp_bad = 0;
    for (int64_t i = N; i < N + D; i++) {
        session_forward(&a, &ids[i], 1, &ra, &e);
        session_forward(&b, &ids[i], 1, &rb, &e);
        bad += count_diff(a.logits, b.logits, c->vocab);
        if (ma) mtp_bad += count_diff(ma, mb, c->vocab);
    }
    check(bad == 0 && mtp_bad == 0, "%s: %lld decode steps after the rewind: %lld of %lld logits "
          "differ, %lld MTP logits differ%s", label, (long long)D, (long long)bad,
          (long long)(D * c->vocab), (long long)mtp_bad, ma ? "" : " (no MTP)");
    free(ma);
    free(mb);
    checkpoint_release(&cp);
    session_free(&a);
    session_free(&b);
    free(ids);
    free(junk);
}

/* A fork continues like its source; stale checkpoints are refused. */
static void test_fork_and_stale(struct env *v) {
    struct ds4_error e = { "" };
    const struct ds4_config *c = &v->model.cfg;
    int32_t *ids = make_tokens(200, 11), *other = make_tokens(200, 12);
    struct session a, b;
    session_init(&a, &v->eng);
    session_init(&b, &v->eng);
    feed_checked(&a, ids, 64, &e);
    struct mem_checkpoint early, late;
    checkpoint_encode(&early, &a, ids);
    feed_checked(&a, ids + 64, 64, &e);
    checkpoint_encode(&late, &a, ids);
    feed_checked(&b, other, 100, &e);          /* b holds something else entirely */
    session_copy(&b, &a);
    feed_checked(&a, ids + 128, 40, &e);
    feed_checked(&b, ids + 128, 40, &e);
    compare_states(v, &a, &b, "fork: a copied session fed 40 more tokens vs its source");
    bool r1 = checkpoint_restore(&a, &early, ids, &e);
    struct ds4_error e2 = { "" }, e3 = { "" };
    bool r2 = checkpoint_restore(&a, &late, ids, &e2);     /* rows after 64 were dropped */
    bool r3 = checkpoint_restore(&b, &late, other, &e3);   /* other tokens than the checkpoint's */
    check(r1 && !r2 && !r3, "stale checkpoints refused: a later one after a rewind (%s), one of "
          "other tokens (%s)", e2.msg, e3.msg);
    (void)c;
    checkpoint_release(&early);
    checkpoint_release(&late);
    session_free(&a);
    session_free(&b);
    free(ids);
    free(other);
}

/* The documented --sessions default: half of the available memory over the
 * size of one session at full --ctx (float32 state + its checkpoints), 1..4. */
static void test_default_sessions(struct env *v) {
    const struct ds4_config *c = &v->model.cfg;
    struct server_options o;
    server_options_default(&o);
    o.ctx = 4096;
    uint64_t ckpt = (uint64_t)(c->n_layers + 1) * c->window * c->head_dim * 4 + (uint64_t)c->vocab * 4;
    uint64_t one = snapshot_f32_bytes(c, false, o.ctx) + (4096 / 2048 + CACHE_PROMPT_END_CHECKPOINTS) * ckpt;
    int none = cache_default_sessions(&v->model, &o, 0);
    int three = cache_default_sessions(&v->model, &o, 2 * 3 * one + 1);
    int many = cache_default_sessions(&v->model, &o, (uint64_t)1 << 50);
    check(none == 1 && three == 3 && many == 4, "--sessions default: %d with no memory (1), %d with "
          "room for 3 sessions of %llu bytes (3), %d with 1 PiB (the cap, 4)", none, three,
          (unsigned long long)one, many);
}

static void test_checkpoints(struct env *plain, struct env *mtp) {
    test_default_sessions(plain);
    rewind_case(plain, "tiny", 96);
    rewind_case(plain, "tiny", 101);
    rewind_case(mtp, "tiny+MTP", 101);
    test_fork_and_stale(mtp);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: test_kvdisk TINY.gguf TINY-MTP.gguf [FOREIGN.gguf]\n");
        return 2;
    }
    char dir[] = "/tmp/test_kvdisk.XXXXXX";
    if (!mkdtemp(dir)) return 2;
    test_hashes();
    test_policy();
    struct env plain, mtp, foreign;
    if (!env_open(&plain, argv[1], NULL) || !env_open(&mtp, argv[1], argv[2])) return 1;
    bool have_foreign = argc > 3 && env_open(&foreign, argv[3], NULL);
    if (argc > 3 && !have_foreign) printf("(foreign model not usable; the MTP model stands in)\n");
    kv_tables_init();
    test_roundtrip(&plain, "tiny", dir);
    test_roundtrip(&mtp, "tiny+MTP", dir);
    test_hostile(&plain, &mtp, dir);
    test_checkpoints(&plain, &mtp);
    char sdir[600];
    snprintf(sdir, sizeof sdir, "%s/store", dir);
    test_store(&plain, have_foreign ? &foreign : &mtp, sdir);
    test_privacy(&plain, sdir);
    env_close(&plain);
    env_close(&mtp);
    if (have_foreign) env_close(&foreign);
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "rm -rf %s %s-foreign %s-budget", dir, sdir, sdir);
    if (system(cmd) != 0) printf("cleanup failed\n");
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed ? 1 : 0;
}
