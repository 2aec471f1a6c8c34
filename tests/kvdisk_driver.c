/* tests/kvdisk_driver.c -- a test tool for chapter 12 (sessions on disk):
 * separate processes that save, load and get killed, for tests/kvdisk.sh.
 *
 *     make tests/bin/kvdisk
 *
 *     kvdisk --kv-list DIR | --kv-check DIR | --kv-clear DIR
 *     kvdisk save     -m M [--mtp F] --dir DIR --n N [--seed S] [--chunk C]
 *     kvdisk continue -m M [--mtp F] --dir DIR --n N --extra K [--seed S] [--chunk C]
 *         look the N+K token prompt up by text, load, decode the rest, and compare
 *         every logit bit for bit with a run that never stopped
 *     kvdisk save-loop -m M --dir DIR --n N [--tag T] [--space-mb B]
 *         save the same N-token session forever under keys "<text>#T.i"
 *     kvdisk verify   -m M --dir DIR --n N [--seed S]
 *         open (repair), then load EVERY entry and compare its logits and one
 *         decode step with a fresh computation; print "verify: G good, B bad"
 *     kvdisk bench    -m M [--mtp F] --dir DIR --n N
 *         snapshot size per token vs float32 rows, save and load times
 */
#define DS4_NO_MAIN
#include "../ds4.c"


struct drv {
    const char *mode, *model, *mtp, *dir, *tag;
    int64_t n, extra, space_mb;
    uint64_t seed;
    int chunk;
};

static int32_t *drv_tokens(const struct model *m, int64_t n, uint64_t seed) {
    int32_t *ids = xmalloc((size_t)n * sizeof(int32_t));
    uint64_t st = seed;
    /* ids 0..vocab-1 avoiding the top (special) tokens; plain text pieces */
    int span = m->cfg.vocab > 1100 ? 1000 : m->cfg.vocab;
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)(splitmix64(&st) % (uint64_t)span) + 3;
    return ids;
}

struct drv_env {
    struct model model;
    struct engine eng;
    struct tokenizer tok;
    struct kv_store st;
};

static bool drv_open(struct drv_env *env, const struct drv *d) {
    struct ds4_error e = { "" };
    if (!model_load(&env->model, d->model, d->mtp, &e)) goto fail;
    memset(&env->tok, 0, sizeof env->tok);
    if (!tokenizer_load_gguf(&env->tok, &env->model.file, env->model.cfg.vocab, &e) &&
        strcmp(d->mode, "bench") != 0) goto fail;   /* the bench needs no text */
    engine_init(&env->eng, &env->model, (struct engine_options){ 0 });
    struct kv_store_options o = { .dir = d->dir, .space_mb = d->space_mb, .quiet = false };
    if (!kv_store_open(&env->st, &o, &env->model, &e)) goto fail;
    return true;
fail:
    fprintf(stderr, "kvdisk: %s\n", e.msg);
    return false;
}

static void drv_key(struct drv_env *env, const int32_t *ids, int64_t n, struct strbuf *key) {
    detokenize(&env->tok, ids, (size_t)n, key);
}

static int drv_save(struct drv_env *env, const struct drv *d) {
    struct ds4_error e = { "" };
    int32_t *ids = drv_tokens(&env->model, d->n, d->seed);
    struct session s;
    session_init(&s, &env->eng);
    bool ok = session_feed(&s, ids, d->n, d->chunk, &e);
    struct strbuf key = { 0 };
    drv_key(env, ids, d->n, &key);
    struct kv_save_result r;
    ok = ok && kv_store_save(&env->st, &s, ids, d->n, key.data, key.len, KV_REASON_COLD, &r, &e);
    if (ok) printf("saved %s %lld tokens %llu bytes in %.4f s\n", r.sha1, (long long)d->n,
                   (unsigned long long)r.stats.file_bytes, r.stats.seconds);
    else fprintf(stderr, "kvdisk: %s\n", e.msg);
    strbuf_free(&key);
    session_free(&s);
    free(ids);
    return ok ? 0 : 1;
}

/* Bitwise comparison; returns the number of differing floats. */
static int64_t drv_diff(const float *a, const float *b, int64_t n) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) bad += !same_bits(a[i], b[i]);
    return bad;
}

static int drv_continue(struct drv_env *env, const struct drv *d) {
    struct ds4_error e = { "" };
    int64_t total = d->n + d->extra;
    int V = env->model.cfg.vocab;
    int32_t *ids = drv_tokens(&env->model, total, d->seed);
    struct strbuf text = { 0 };
    drv_key(env, ids, total, &text);
    struct session s, ref;
    session_init(&s, &env->eng);
    session_init(&ref, &env->eng);
    struct kv_hit hit;
    if (!kv_store_lookup(&env->st, &s, text.data, text.len, &hit)) {
        printf("continue: no snapshot found\n");
        return 1;
    }
    printf("continue: loaded %lld tokens (%lld bytes of text) in %.4f s\n", (long long)hit.n_tokens,
           (long long)hit.key_bytes, hit.load_seconds);
    bool ok = session_feed(&ref, ids, hit.n_tokens, d->chunk, &e);
    int64_t bad = drv_diff(ref.logits, s.logits, V);
    printf("continue: logits after the loaded prefix: %lld of %d floats differ\n", (long long)bad, V);
    for (int64_t i = hit.n_tokens; ok && i < total; i++) {
        ok = session_forward(&s, &ids[i], 1, NULL, &e) && session_forward(&ref, &ids[i], 1, NULL, &e);
        bad += drv_diff(ref.logits, s.logits, V);
    }
    if (env->model.has_mtp) bad += drv_diff(ref.last_hc, s.last_hc, (int64_t)env->model.cfg.hc * env->model.cfg.dim);
    printf("continue: %lld decode steps after the load, %lld floats differ from the uninterrupted run\n",
           (long long)(total - hit.n_tokens), (long long)bad);
    if (!ok) fprintf(stderr, "kvdisk: %s\n", e.msg);
    session_free(&s);
    session_free(&ref);
    free(hit.tokens);
    free(ids);
    strbuf_free(&text);
    return ok && bad == 0 ? 0 : 1;
}

static int drv_save_loop(struct drv_env *env, const struct drv *d) {
    struct ds4_error e = { "" };
    int32_t *ids = drv_tokens(&env->model, d->n, d->seed);
    struct session s;
    session_init(&s, &env->eng);
    if (!session_feed(&s, ids, d->n, d->chunk, &e)) return 1;
    env->st.opt.quiet = true;
    printf("ready\n");
    fflush(stdout);
    for (long i = 0;; i++) {
        struct strbuf key = { 0 };
        drv_key(env, ids, d->n, &key);
        strbuf_printf(&key, "#%s.%ld", d->tag ? d->tag : "x", i);
        struct kv_save_result r;
        if (!kv_store_save(&env->st, &s, ids, d->n, key.data, key.len, KV_REASON_CONTINUED, &r, &e))
            fprintf(stderr, "kvdisk: %s\n", e.msg);
        strbuf_free(&key);
        if (d->extra && i + 1 >= d->extra) break;
    }
    session_free(&s);
    free(ids);
    return 0;
}

/* Load every entry and compare with a fresh computation of its tokens (all
 * entries hold a prefix of the seeded sequence; one reference per length). */
struct drv_ref { int64_t n; float *logits, *next_logits; };

static struct drv_ref *drv_reference(struct drv_env *env, const struct drv *d, struct drv_ref *refs,
                                     int *n_refs, const int32_t *ids, int64_t n) {
    for (int i = 0; i < *n_refs; i++)
        if (refs[i].n == n) return &refs[i];
    if (*n_refs == 16) return NULL;
    struct ds4_error e = { "" };
    int V = env->model.cfg.vocab;
    struct session s;
    session_init(&s, &env->eng);
    int32_t next = 7;
    struct drv_ref *r = &refs[(*n_refs)++];
    r->n = n;
    r->logits = xmalloc((size_t)V * sizeof(float));
    r->next_logits = xmalloc((size_t)V * sizeof(float));
    session_feed(&s, ids, n, d->chunk, &e);
    memcpy(r->logits, s.logits, (size_t)V * sizeof(float));
    session_forward(&s, &next, 1, NULL, &e);
    memcpy(r->next_logits, s.logits, (size_t)V * sizeof(float));
    session_free(&s);
    return r;
}

static int drv_verify(struct drv_env *env, const struct drv *d) {
    struct ds4_error e = { "" };
    int V = env->model.cfg.vocab;
    int32_t *ids = drv_tokens(&env->model, 1 << 16, d->seed);
    struct drv_ref refs[16];
    int n_refs = 0;
    struct session s;
    session_init(&s, &env->eng);
    int32_t next = 7;
    sqlite3_stmt *q = kv_prepare(&env->st, "SELECT sha1 FROM snapshots");
    char (*all)[41] = NULL;
    int n = 0, good = 0, bad = 0, removed = 0;
    while (q && sqlite3_step(q) == SQLITE_ROW) {
        all = xrealloc(all, (size_t)(n + 1) * sizeof *all);
        snprintf(all[n++], 41, "%s", (const char *)sqlite3_column_text(q, 0));
    }
    sqlite3_finalize(q);
    for (int i = 0; i < n; i++) {
        struct kv_hit hit = { 0 };
        kv_lock(&env->st);
        bool loaded = kv_try_load(&env->st, &s, all[i], NULL, 0, &hit);
        kv_unlock(&env->st);
        if (!loaded) { removed++; continue; }
        bool same = hit.n_tokens <= (1 << 16) && memcmp(hit.tokens, ids, (size_t)hit.n_tokens * 4) == 0;
        struct drv_ref *r = same ? drv_reference(env, d, refs, &n_refs, ids, hit.n_tokens) : NULL;
        same = r && drv_diff(r->logits, s.logits, V) == 0 &&
               session_forward(&s, &next, 1, NULL, &e) && drv_diff(r->next_logits, s.logits, V) == 0;
        same ? good++ : bad++;
        free(hit.tokens);
    }
    printf("verify: %d entries, %d loaded and equal to a fresh run, %d loaded but WRONG, "
           "%d detected as damaged and removed\n", n, good, bad, removed);
    for (int i = 0; i < n_refs; i++) free(refs[i].logits), free(refs[i].next_logits);
    free(all);
    session_free(&s);
    free(ids);
    return bad ? 1 : 0;
}

static int drv_bench(struct drv_env *env, const struct drv *d) {
    struct ds4_error e = { "" };
    const struct ds4_config *c = &env->model.cfg;
    int64_t X = d->extra > 0 ? d->extra : 256;
    int32_t *ids = drv_tokens(&env->model, d->n + X, d->seed);
    struct session s;
    session_init(&s, &env->eng);
    double t0 = now_seconds();
    if (!session_feed(&s, ids, d->n, d->chunk, &e)) { fprintf(stderr, "%s\n", e.msg); return 1; }
    double t_feed = now_seconds() - t0;
    char path[1000];
    snprintf(path, sizeof path, "%s/bench.kv", d->dir);
    struct snapshot_meta meta = { "bench", 5, KV_REASON_UNKNOWN, 0 };
    struct snapshot_stats a, b;
    if (!session_save(&s, ids, d->n, path, &meta, &a, &e)) { fprintf(stderr, "%s\n", e.msg); return 1; }
    /* a second size point gives the per-token slope without the fixed part */
    session_feed(&s, ids + d->n, X, d->chunk, &e);
    if (!session_save(&s, ids, d->n + X, path, &meta, &b, &e)) { fprintf(stderr, "%s\n", e.msg); return 1; }
    struct session l;
    session_init(&l, &env->eng);
    int32_t *got;
    int64_t n;
    t0 = now_seconds();
    bool ok = session_load(&l, path, &got, &n, &e);
    double t_load = now_seconds() - t0;
    uint64_t f32a = snapshot_f32_bytes(c, env->model.has_mtp, d->n);
    uint64_t f32b = snapshot_f32_bytes(c, env->model.has_mtp, d->n + X);
    printf("bench: model %s, layers %d, head_dim %d, window %d, prefill of %lld tokens %.2f s\n",
           d->model, c->n_layers, c->head_dim, c->window, (long long)d->n, t_feed);
    printf("bench: snapshot of %lld tokens: %llu bytes (float32 rows: %llu, %.2fx smaller)\n",
           (long long)d->n, (unsigned long long)a.file_bytes, (unsigned long long)f32a,
           (double)f32a / a.file_bytes);
    printf("bench: snapshot of %lld tokens: %llu bytes (float32 rows: %llu, %.2fx smaller)\n",
           (long long)d->n + X, (unsigned long long)b.file_bytes, (unsigned long long)f32b,
           (double)f32b / b.file_bytes);
    printf("bench: per token (slope over %lld tokens): %.1f bytes packed vs %.1f float32 (%.2fx); "
           "rows packed %llu, raw blocks %llu\n",
           (long long)X, (b.file_bytes - a.file_bytes) / (double)X, (f32b - f32a) / (double)X,
           (double)(f32b - f32a) / (double)(b.file_bytes - a.file_bytes),
           (unsigned long long)b.rows, (unsigned long long)b.raw_blocks);
    printf("bench: save %.4f s (%.0f MB/s), load %.4f s (%.0f MB/s), load %s\n", b.seconds,
           b.file_bytes / 1e6 / b.seconds, t_load, b.file_bytes / 1e6 / t_load, ok ? "ok" : e.msg);
    unlink(path);
    if (ok) free(got);
    session_free(&l);
    session_free(&s);
    free(ids);
    return ok ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--kv-list") == 0) return kv_list_command(argv[2]);
    if (argc == 3 && strcmp(argv[1], "--kv-check") == 0) return kv_check_command(argv[2]);
    if (argc == 3 && strcmp(argv[1], "--kv-clear") == 0) return kv_clear_command(argv[2]);
    struct drv d = { .seed = 1, .chunk = 64 };
    d.mode = argc > 1 ? argv[1] : "";
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *a = argv[i], *v = argv[i + 1];
        if (!strcmp(a, "-m")) d.model = v;
        else if (!strcmp(a, "--mtp")) d.mtp = v;
        else if (!strcmp(a, "--dir")) d.dir = v;
        else if (!strcmp(a, "--tag")) d.tag = v;
        else if (!strcmp(a, "--n")) d.n = atoll(v);
        else if (!strcmp(a, "--extra")) d.extra = atoll(v);
        else if (!strcmp(a, "--seed")) d.seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--chunk")) d.chunk = atoi(v);
        else if (!strcmp(a, "--space-mb")) d.space_mb = atoll(v);
        else { fprintf(stderr, "kvdisk: unknown option %s\n", a); return 2; }
    }
    if (!d.model || !d.dir || d.n < 1) {
        fprintf(stderr, "usage: see the comment at the top of staging/kvdisk_main.c\n");
        return 2;
    }
    struct drv_env env;
    if (!drv_open(&env, &d)) return 1;
    int rc = !strcmp(d.mode, "save")      ? drv_save(&env, &d)
           : !strcmp(d.mode, "continue")  ? drv_continue(&env, &d)
           : !strcmp(d.mode, "save-loop") ? drv_save_loop(&env, &d)
           : !strcmp(d.mode, "verify")    ? drv_verify(&env, &d)
           : !strcmp(d.mode, "bench")     ? drv_bench(&env, &d)
                                          : 2;
    kv_store_close(&env.st);
    engine_free(&env.eng);
    tokenizer_free(&env.tok);
    model_free(&env.model);
    return rc;
}
