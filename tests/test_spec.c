/* tests/test_spec.c -- chapter 9: speculative decoding with the MTP block.
 *
 *     tests/bin/test_spec MODEL.gguf MTP.gguf
 *
 *   1. Rollback: a session that verified T tokens and kept `keep` of them is
 *      in EXACTLY the state of a session that only ever saw those `keep`
 *      (ring, compressed rows, frontiers, MTP ring, logits), for every keep,
 *      at a position where the verified tokens close compressor windows.
 *   2. Greedy identity: with the MTP drafter (K = 1, 2, 3) and with a
 *      drafter that is right most of the time (so drafts are accepted and
 *      partly rejected), 200 greedy tokens equal plain decoding's.
 *   3. Sampling: the acceptance rule reproduces the target distribution
 *      (chi-square on a small synthetic case), and seeded speculative
 *      sampling runs produce valid tokens.
 */
#define DS4_NO_MAIN
#include "../ds4.c"
#define HARNESS_CHECK_TOL
#include "harness.h"

static double max_abs_diff(const float *a, const float *b, size_t n) {
    double d = 0;
    for (size_t i = 0; i < n; i++) d = fmax(d, fabs((double)a[i] - b[i]));
    return d;
}

static void must(bool ok, const struct ds4_error *e) {
    if (!ok) {
        printf("FAIL forward: %s\n", e->msg);
        exit(1);
    }
}

/* ---- 1. Rollback ----------------------------------------------------------- */

/* Everything that defines the future of a session, compared exactly. */
static double session_difference(const struct session *a, const struct session *b) {
    const struct ds4_config *c = &a->eng->model->cfg;
    if (a->pos != b->pos || a->mtp_pos != b->mtp_pos) return INFINITY;
    double d = max_abs_diff(a->logits, b->logits, (size_t)c->vocab);
    d = fmax(d, max_abs_diff(a->last_hc, b->last_hc, (size_t)c->hc * c->dim));
    for (int l = 0; l < c->n_layers; l++) {
        const struct layer_state *x = &a->layers[l], *y = &b->layers[l];
        for (int64_t p = a->pos - c->window > 0 ? a->pos - c->window : 0; p < a->pos; p++) {
            size_t at = (size_t)(p % c->window) * c->head_dim;
            d = fmax(d, max_abs_diff(x->ring + at, y->ring + at, (size_t)c->head_dim));
        }
        if (x->comp_rows.n != y->comp_rows.n || x->idx_rows.n != y->idx_rows.n) return INFINITY;
        d = fmax(d, max_abs_diff(x->comp_rows.rows, y->comp_rows.rows, (size_t)x->comp_rows.n * c->head_dim));
        d = fmax(d, max_abs_diff(x->idx_rows.rows, y->idx_rows.rows, (size_t)x->idx_rows.n * c->idx_dim));
        size_t fc = frontier_floats(&x->comp), fi = frontier_floats(&x->idx_comp);
        if (fc) {
            d = fmax(d, max_abs_diff(x->comp.kv, y->comp.kv, fc));
            for (size_t i = 0; i < fc; i++)
                if (x->comp.score[i] != y->comp.score[i] && !(isinf(x->comp.score[i]) && isinf(y->comp.score[i])))
                    d = fmax(d, fabs(x->comp.score[i] - y->comp.score[i]));
        }
        if (fi) d = fmax(d, max_abs_diff(x->idx_comp.kv, y->idx_comp.kv, fi));
    }
    for (int64_t r = a->mtp_pos - c->window > 0 ? a->mtp_pos - c->window : 0; r < a->mtp_pos; r++) {
        size_t at = (size_t)(r % c->window) * c->head_dim;
        d = fmax(d, max_abs_diff(a->mtp_state.ring + at, b->mtp_state.ring + at, (size_t)c->head_dim));
    }
    return d;
}

static void test_rollback(struct engine *eng, int prompt_len, int T) {
    const struct ds4_config *c = &eng->model->cfg;
    struct ds4_error e = { "" };
    int V = c->vocab;
    int64_t n_d = (int64_t)c->hc * c->dim;
    int32_t *tokens = xmalloc((size_t)(prompt_len + T + 1) * sizeof(int32_t));
    uint64_t rng = 77;
    for (int i = 0; i < prompt_len + T + 1; i++) tokens[i] = (int32_t)(splitmix64(&rng) % (uint64_t)V);
    int32_t *verify = tokens + prompt_len;
    for (int keep = 1; keep <= T; keep++) {
        struct session a, b;
        session_init(&a, eng);
        session_init(&b, eng);
        must(session_feed(&a, tokens, prompt_len, 64, &e), &e);
        must(session_feed(&b, tokens, prompt_len, 64, &e), &e);

        struct checkpoint cp;
        struct compressor_journal j;
        checkpoint_take(&cp, &a, T, true);
        journal_init(&j, c, T);
        float *logits = xmalloc((size_t)T * V * sizeof(float)), *hc = xmalloc((size_t)T * n_d * sizeof(float));
        struct forward_request req = { .all_logits = logits, .all_hc = hc, .journal = &j };
        must(session_forward(&a, verify, T, &req, &e), &e);
        if (keep < T) session_rollback(&a, &cp, &j, keep, logits, hc);
        must(session_forward(&b, verify, keep, NULL, &e), &e);

        char what[128];
        snprintf(what, sizeof what, "verify %d at %d, keep %d == never saw the rest (state)", T,
                 prompt_len, keep);
        check(what, session_difference(&a, &b), 0);
        /* and the futures agree: one more token each */
        int32_t next = verify[T - 1] ^ 1;
        must(session_forward(&a, &next, 1, NULL, &e), &e);
        must(session_forward(&b, &next, 1, NULL, &e), &e);
        snprintf(what, sizeof what, "verify %d at %d, keep %d: next token's state too", T, prompt_len, keep);
        check(what, session_difference(&a, &b), 0);

        free(logits);
        free(hc);
        journal_free(&j, c->n_layers);
        checkpoint_free(&cp, c->n_layers);
        session_free(&a);
        session_free(&b);
    }
    free(tokens);
}

/* ---- 2. Greedy identity ------------------------------------------------------ */

/* A drafter that knows the right answer and lies every third token. */
struct oracle_drafter {
    const int32_t *truth;     /* the plain continuation */
    int n_truth;
    int64_t first_pos;        /* session position where truth[0] was chosen */
    int calls;
};

static int oracle_draft(struct generator *g, int32_t first, int32_t *drafts) {
    struct oracle_drafter *o = g->drafter_ctx;
    int V = g->s->eng->model->cfg.vocab, n = 0;
    int64_t at = g->s->pos - o->first_pos + 1;    /* index of the token after `first` */
    (void)first;
    for (; n < g->spec.draft && at + n < o->n_truth; n++) {
        int32_t d = o->truth[at + n];
        if (++o->calls % 3 == 0) d = (d + 1) % V;
        drafts[n] = d;
        float *q = g->q + (size_t)n * V;
        memset(q, 0, (size_t)V * sizeof(float));
        q[d] = 1.0f;
    }
    return n;
}

static int32_t *run_generation(struct engine *eng, const int32_t *prompt, int n_prompt, int n,
                               struct spec_options spec, struct sampler_options so,
                               struct oracle_drafter *oracle, struct spec_stats *stats) {
    struct ds4_error e = { "" };
    struct session s;
    struct sampler sp;
    struct generator g;
    session_init(&s, eng);
    sampler_init(&sp, so, eng->model->cfg.vocab);
    generator_init(&g, &s, &sp, spec);
    if (oracle) {
        g.drafter = oracle_draft;
        g.drafter_ctx = oracle;
        oracle->first_pos = n_prompt;
    }
    must(session_feed(&s, prompt, n_prompt, 64, &e), &e);
    int32_t *out = xmalloc((size_t)(n + MATMUL_DECODE_PATH_MAX_TOKENS) * sizeof(int32_t));
    int have = 0;
    while (have < n) {
        int got = generator_step(&g, out + have, &e);
        must(got > 0, &e);
        have += got;
    }
    if (stats) *stats = g.stats;
    generator_free(&g);
    sampler_free(&sp);
    session_free(&s);
    return out;
}

static void test_identity(struct engine *eng) {
    int V = eng->model->cfg.vocab, n = 200;
    struct sampler_options greedy = { 0, 1, 0, 0, 1 };
    for (int prompt_case = 0; prompt_case < 3; prompt_case++) {
        int n_prompt = 5 + 37 * prompt_case;
        int32_t prompt[100];
        uint64_t rng = 1000 + (uint64_t)prompt_case;
        for (int i = 0; i < n_prompt; i++) prompt[i] = (int32_t)(splitmix64(&rng) % (uint64_t)V);
        int32_t *plain = run_generation(eng, prompt, n_prompt, n, (struct spec_options){ 0, 0 }, greedy, NULL, NULL);
        for (int K = 1; K <= 3; K++) {
            struct spec_stats st;
            int32_t *spec = run_generation(eng, prompt, n_prompt, n, (struct spec_options){ K, 0 }, greedy, NULL, &st);
            int diff = 0;
            for (int i = 0; i < n; i++) diff += spec[i] != plain[i];
            char what[160];
            snprintf(what, sizeof what, "prompt %d: greedy -n %d with MTP K=%d == plain (%lld/%lld accepted)",
                     prompt_case, n, K, (long long)st.accepted, (long long)st.drafted);
            check(what, diff, 0);
            free(spec);

            struct oracle_drafter o = { plain, n, 0, 0 };
            spec = run_generation(eng, prompt, n_prompt, n, (struct spec_options){ K, 0 }, greedy, &o, &st);
            diff = 0;
            for (int i = 0; i < n; i++) diff += spec[i] != plain[i];
            snprintf(what, sizeof what, "prompt %d: K=%d mostly-right drafter == plain, %lld/%lld accepted, %.2f tok/fwd",
                     prompt_case, K, (long long)st.accepted, (long long)st.drafted,
                     (double)st.emitted / (double)st.main_forwards);
            check(what, diff + (st.accepted == 0 || st.accepted == st.drafted ? 1000 : 0), 0);
            free(spec);
        }
        free(plain);
    }
}

/* ---- 3. Sampling -------------------------------------------------------------- */

/* Draw d ~ q, apply the acceptance rule, resample on rejection: the result
 * must be distributed as p. Chi-square with 5 degrees of freedom; the 0.1%
 * critical value is 20.5. */
static void test_acceptance_distribution(void) {
    enum { V = 6, TRIALS = 200000 };
    const float p[V] = { 0.30f, 0.25f, 0.20f, 0.15f, 0.10f, 0.00f };
    const float q[V] = { 0.05f, 0.10f, 0.40f, 0.05f, 0.20f, 0.20f };
    long count[V] = { 0 };
    uint64_t state = 12345;
    float work[V];
    for (int t = 0; t < TRIALS; t++) {
        int d = draw_token(q, V, &state);
        memcpy(work, p, sizeof work);
        int out = accept_draft(work, q, d, V, &state) ? d : draw_token(work, V, &state);
        count[out]++;
    }
    double chi2 = 0;
    for (int i = 0; i < V; i++) {
        double expect = (double)p[i] * TRIALS;
        if (expect > 0) chi2 += (count[i] - expect) * (count[i] - expect) / expect;
        else if (count[i] > 0) chi2 = INFINITY;
    }
    check("speculative sampling reproduces p: chi-square (df 5, 200k draws)", chi2, 20.5);
}

static void test_sampled_runs(struct engine *eng) {
    int V = eng->model->cfg.vocab;
    int32_t prompt[8] = { 1, 2, 3, 4, 5, 6, 7, 8 };
    struct sampler_options warm = { 0.8f, 0.95f, 0.0f, 50, 42 };
    struct spec_stats st;
    int32_t *a = run_generation(eng, prompt, 8, 100, (struct spec_options){ 2, 0 }, warm, NULL, &st);
    int32_t *b = run_generation(eng, prompt, 8, 100, (struct spec_options){ 2, 0 }, warm, NULL, NULL);
    int bad = 0, diff = 0;
    for (int i = 0; i < 100; i++) {
        bad += a[i] < 0 || a[i] >= V;
        diff += a[i] != b[i];
    }
    check("seeded speculative sampling: valid ids, and the same seed repeats", bad + diff, 0);
    free(a);
    free(b);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL.gguf MTP.gguf\n", argv[0]);
        return 2;
    }
    struct model m;
    struct ds4_error e = { "" };
    if (!model_load(&m, argv[1], argv[2], &e)) {
        printf("FAIL cannot load: %s\n", e.msg);
        return 1;
    }
    struct engine eng;
    engine_init(&eng, &m, (struct engine_options){ .threads = 0 });
    test_rollback(&eng, 126, 5);   /* positions 126..130 close a 128-window and 4-windows */
    test_rollback(&eng, 37, 3);
    test_identity(&eng);
    test_acceptance_distribution();
    test_sampled_runs(&eng);
    engine_free(&eng);
    model_free(&m);
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed ? 1 : 0;
}
