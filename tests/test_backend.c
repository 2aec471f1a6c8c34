/* tests/test_backend.c -- ds4.c 6.13: the backend table the story calls.
 *
 *     tests/bin/test_backend MODEL.gguf MTP.gguf
 *
 *   1. A counting backend wraps the CPU one. Prefill, decode (with and
 *      without MTP drafting), a snapshot save and load all run through it:
 *      every operation is called the expected number of times per token
 *      (so nothing bypasses the table), and every logit equals the plain
 *      CPU backend's bit for bit.
 *   2. A decoded token allocates nothing: heap_allocations (every xmalloc,
 *      xcalloc, xrealloc) does not move over 32 greedy decode steps, nor
 *      over 16 speculative steps with MTP drafting.
 *   3. --backend NAME: cpu resolves, cuda and metal say they are not built
 *      in, anything else is unknown.
 */
#define DS4_NO_MAIN
#include "../ds4.c"

#define HARNESS_CHECK_TOL
#include "harness.h"

static void check_count(const char *what, int64_t got, int64_t want) {
    bool ok = harness_count(got == want);
    printf("%s %-66s got %lld  want %lld\n", ok ? "ok  " : "FAIL", what, (long long)got,
           (long long)want);
}

static void must(bool ok, const struct ds4_error *e) {
    if (!ok) {
        printf("FAIL forward: %s\n", e->msg);
        exit(1);
    }
}

/* ---- The counting backend ---------------------------------------------------- */

enum op {
    OP_SESSION_OPEN, OP_SESSION_CLOSE, OP_STATE_PULL, OP_STATE_PUSH, OP_BEGIN_CHUNK, OP_EMBED,
    OP_HC_COLLAPSE, OP_ATTENTION, OP_HC_EXPAND, OP_MOE, OP_HEAD, OP_MTP_INPUT, OP_END_CHUNK,
    N_OPS
};

static const char *op_names[N_OPS] = {
    "session_open", "session_close", "state_pull", "state_push", "begin_chunk", "embed",
    "hc_collapse", "attention", "hc_expand", "moe", "head", "mtp_input", "end_chunk",
};

static int64_t calls[N_OPS];
static int64_t head_rows;        /* rows of logits the head produced */
static const struct backend *inner;

static void count_session_open(struct session *s) {
    calls[OP_SESSION_OPEN]++;
    inner->session_open(s);
}

static void count_session_close(struct session *s) {
    calls[OP_SESSION_CLOSE]++;
    inner->session_close(s);
}

static void count_state_pull(struct session *s) { calls[OP_STATE_PULL]++; inner->state_pull(s); }
static void count_state_push(struct session *s) { calls[OP_STATE_PUSH]++; inner->state_push(s); }
static void count_begin_chunk(struct step *st) { calls[OP_BEGIN_CHUNK]++; inner->begin_chunk(st); }
static void count_embed(struct step *st) { calls[OP_EMBED]++; inner->embed(st); }
static void count_attention(struct step *st) { calls[OP_ATTENTION]++; inner->attention(st); }
static void count_hc_expand(struct step *st) { calls[OP_HC_EXPAND]++; inner->hc_expand(st); }
static void count_moe(struct step *st) { calls[OP_MOE]++; inner->moe(st); }
static void count_end_chunk(struct step *st) { calls[OP_END_CHUNK]++; inner->end_chunk(st); }

static void count_hc_collapse(struct step *st, enum sublayer which) {
    calls[OP_HC_COLLAPSE]++;
    inner->hc_collapse(st, which);
}

static void count_head(struct step *st, int64_t row0, int n, float *logits) {
    calls[OP_HEAD]++;
    head_rows += n;
    inner->head(st, row0, n, logits);
}

static void count_mtp_input(struct step *st, const float *hin0, const float *hin_next) {
    calls[OP_MTP_INPUT]++;
    inner->mtp_input(st, hin0, hin_next);
}

static const struct backend counting_backend = {
    .name = "counting",
    .session_open = count_session_open,
    .session_close = count_session_close,
    .state_pull = count_state_pull,
    .state_push = count_state_push,
    .begin_chunk = count_begin_chunk,
    .embed = count_embed,
    .hc_collapse = count_hc_collapse,
    .attention = count_attention,
    .hc_expand = count_hc_expand,
    .moe = count_moe,
    .head = count_head,
    .mtp_input = count_mtp_input,
    .end_chunk = count_end_chunk,
};

static void reset_counts(void) {
    memset(calls, 0, sizeof calls);
    head_rows = 0;
}

/* ---- 1. The story goes through the table ------------------------------------- */

enum { PROMPT = 40, CHUNK = 16, DECODE = 12 };

/* Prefill PROMPT tokens in chunks, then DECODE greedy steps; the logits of
 * every step land in out [DECODE+1][V]. */
static void greedy_run(struct engine *eng, const int32_t *prompt, float *out) {
    int V = eng->model->cfg.vocab;
    struct ds4_error e = { "" };
    struct session s;
    session_init(&s, eng);
    must(session_feed(&s, prompt, PROMPT, CHUNK, &e), &e);
    memcpy(out, s.logits, (size_t)V * sizeof(float));
    for (int i = 0; i < DECODE; i++) {
        int32_t next = argmax(s.logits, V);
        must(session_forward(&s, &next, 1, NULL, &e), &e);
        memcpy(out + (size_t)(i + 1) * V, s.logits, (size_t)V * sizeof(float));
    }
    session_free(&s);
}

static double max_abs_diff(const float *a, const float *b, size_t n) {
    double d = 0;
    for (size_t i = 0; i < n; i++) d = fmax(d, fabs((double)a[i] - b[i]));
    return d;
}

/* What one decoded token must cost, in calls: the main model's layers plus
 * the MTP block (when loaded) each run one block. */
static void check_decode_counts(const struct model *m, int tokens) {
    int64_t blocks = (int64_t)m->cfg.n_layers + (m->has_mtp ? 1 : 0);
    char what[128];
    int64_t want[N_OPS] = { 0 };
    want[OP_BEGIN_CHUNK] = want[OP_EMBED] = want[OP_END_CHUNK] = want[OP_HEAD] = tokens;
    want[OP_HC_COLLAPSE] = want[OP_HC_EXPAND] = 2 * blocks * tokens;
    want[OP_ATTENTION] = want[OP_MOE] = blocks * tokens;
    want[OP_MTP_INPUT] = m->has_mtp ? tokens : 0;
    for (int op = 0; op < N_OPS; op++) {
        snprintf(what, sizeof what, "decode %d tokens: %s calls", tokens, op_names[op]);
        check_count(what, calls[op], want[op]);
    }
}

static void test_counting(struct model *m, const int32_t *prompt) {
    int V = m->cfg.vocab;
    size_t n = (size_t)(DECODE + 1) * V;
    float *ref = xmalloc(n * sizeof(float)), *got = xmalloc(n * sizeof(float));
    struct engine cpu, counted;
    engine_init(&cpu, m, (struct engine_options){ .backend = NULL });
    inner = backend_cpu();
    engine_init(&counted, m, (struct engine_options){ .backend = &counting_backend });
    greedy_run(&cpu, prompt, ref);
    reset_counts();
    greedy_run(&counted, prompt, got);
    check("counting backend: logits of prefill + 12 decode steps == CPU's",
          max_abs_diff(ref, got, n), 0);
    check_count("one session: session_open calls", calls[OP_SESSION_OPEN], 1);
    check_count("one session: session_close calls", calls[OP_SESSION_CLOSE], 1);
    check_count("prefill of 40 in chunks of 16: begin_chunk calls before decode",
                calls[OP_BEGIN_CHUNK] - DECODE, (PROMPT + CHUNK - 1) / CHUNK);

    /* Decode alone, counted from a prefilled session. */
    struct ds4_error e = { "" };
    struct session s;
    session_init(&s, &counted);
    must(session_feed(&s, prompt, PROMPT, CHUNK, &e), &e);
    reset_counts();
    for (int i = 0; i < DECODE; i++) {
        int32_t next = argmax(s.logits, V);
        must(session_forward(&s, &next, 1, NULL, &e), &e);
    }
    check_decode_counts(m, DECODE);
    check_count("decode: logits rows from the head (one per token)", head_rows, DECODE);

    /* A snapshot is written from, and read into, the host copy of the state. */
    char path[] = "/tmp/ds4_test_backend_XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    int32_t *all = xmalloc((size_t)(PROMPT + DECODE) * sizeof(int32_t));
    memcpy(all, prompt, PROMPT * sizeof(int32_t));
    reset_counts();
    struct snapshot_meta meta = { .key = "k", .key_len = 1, .ctx = 4096 };
    struct session fresh;
    session_init(&fresh, &counted);
    must(session_feed(&fresh, all, PROMPT, CHUNK, &e), &e);
    calls[OP_STATE_PULL] = calls[OP_STATE_PUSH] = 0;
    must(session_save(&fresh, all, PROMPT, path, &meta, NULL, &e), &e);
    check_count("session_save: state_pull calls (before encoding)", calls[OP_STATE_PULL], 1);
    int32_t *ids = NULL;
    int64_t n_ids = 0;
    must(session_load(&fresh, path, &ids, &n_ids, &e), &e);
    check_count("session_load: state_push calls (after decoding)", calls[OP_STATE_PUSH], 1);
    unlink(path);
    free(ids);
    free(all);
    session_free(&fresh);
    session_free(&s);
    engine_free(&counted);
    engine_free(&cpu);
    free(ref);
    free(got);
}

/* Speculative decoding: drafting and verification both go through the
 * table, and the tokens equal the CPU backend's. */
static void spec_run(struct engine *eng, const int32_t *prompt, int32_t *out, int n_out) {
    struct ds4_error e = { "" };
    struct session s;
    session_init(&s, eng);
    must(session_feed(&s, prompt, PROMPT, CHUNK, &e), &e);
    struct sampler sp;
    int V = eng->model->cfg.vocab;
    sampler_init(&sp, (struct sampler_options){ .temperature = 0, .seed = 1 }, V);
    struct generator g;
    generator_init(&g, &s, &sp, (struct spec_options){ .draft = 2 });
    int32_t step[16];
    for (int have = 0; have < n_out;) {
        int k = generator_step(&g, step, &e);
        must(k > 0, &e);
        for (int i = 0; i < k && have < n_out; i++) out[have++] = step[i];
    }
    generator_free(&g);
    sampler_free(&sp);
    session_free(&s);
}

static void test_counting_spec(struct model *m, const int32_t *prompt) {
    if (!m->has_mtp) return;
    int32_t ref[24], got[24];
    struct engine cpu, counted;
    engine_init(&cpu, m, (struct engine_options){ .backend = NULL });
    engine_init(&counted, m, (struct engine_options){ .backend = &counting_backend });
    spec_run(&cpu, prompt, ref, 24);
    reset_counts();
    spec_run(&counted, prompt, got, 24);
    int differ = 0;
    for (int i = 0; i < 24; i++) differ += ref[i] != got[i];
    check_count("MTP draft 2: 24 greedy tokens differing from the CPU backend's", differ, 0);
    printf("     MTP draft 2 through the table: %lld mtp_input, %lld head, %lld state_pull,"
           " %lld state_push\n", (long long)calls[OP_MTP_INPUT], (long long)calls[OP_HEAD],
           (long long)calls[OP_STATE_PULL], (long long)calls[OP_STATE_PUSH]);
    check("drafting calls mtp_input beyond one per forward (drafted rows)",
          calls[OP_MTP_INPUT] > calls[OP_BEGIN_CHUNK] ? 0 : 1, 0);
    check("checkpoints pull the state first (state_pull >= 1 per step)",
          calls[OP_STATE_PULL] >= 1 ? 0 : 1, 0);
    engine_free(&counted);
    engine_free(&cpu);
}

/* ---- 2. Decoding allocates nothing ------------------------------------------- */

static void test_decode_allocations(struct model *m, const int32_t *prompt) {
    struct engine eng;
    engine_init(&eng, m, (struct engine_options){ .backend = NULL });
    int V = m->cfg.vocab;
    struct ds4_error e = { "" };
    struct session s;
    session_init(&s, &eng);
    must(session_feed(&s, prompt, PROMPT, CHUNK, &e), &e);
    int32_t next = argmax(s.logits, V);
    must(session_forward(&s, &next, 1, NULL, &e), &e);   /* first decode: T = 1 fits */
    int64_t before = heap_allocations;
    for (int i = 0; i < 32; i++) {
        next = argmax(s.logits, V);
        must(session_forward(&s, &next, 1, NULL, &e), &e);
    }
    int64_t per_32 = heap_allocations - before;
    printf("     heap allocations over 32 decoded tokens (pos %d..%d): %lld\n", PROMPT + 1,
           PROMPT + 32, (long long)per_32);
    check_count("decode: heap allocations over 32 tokens", per_32, 0);

    /* Speculative steps: checkpoints, journal and verification outputs are
     * the generator's, allocated once. */
    if (m->has_mtp) {
        struct sampler sp;
        sampler_init(&sp, (struct sampler_options){ .temperature = 0, .seed = 1 }, V);
        struct generator g;
        generator_init(&g, &s, &sp, (struct spec_options){ .draft = 3 });
        int32_t step[16];
        must(generator_step(&g, step, &e) > 0, &e);
        before = heap_allocations;
        int emitted = 0;
        for (int i = 0; i < 16; i++) {
            int k = generator_step(&g, step, &e);
            must(k > 0, &e);
            emitted += k;
        }
        int64_t spec_allocs = heap_allocations - before;
        printf("     heap allocations over 16 MTP steps (draft 3, %d tokens): %lld\n", emitted,
               (long long)spec_allocs);
        check_count("MTP decode: heap allocations over 16 steps", spec_allocs, 0);
        generator_free(&g);
        sampler_free(&sp);
    }
    session_free(&s);
    engine_free(&eng);
}

/* ---- 3. --backend NAME -------------------------------------------------------- */

static void test_backend_names(void) {
    struct ds4_error e = { "" };
    check_count("backend_by_name(\"cpu\") is the CPU table",
                backend_by_name("cpu", &e) == backend_cpu(), 1);
    const char *gpus[] = { "cuda", "metal" };
    for (int i = 0; i < 2; i++) {
        e.msg[0] = 0;
        bool refused = !backend_by_name(gpus[i], &e) && strstr(e.msg, "not built into this binary");
        printf("     --backend %s: %s\n", gpus[i], e.msg);
        check_count("a GPU backend not built in is refused with a clear message", refused, 1);
    }
    e.msg[0] = 0;
    bool unknown = !backend_by_name("tpu", &e) && strstr(e.msg, "unknown backend");
    check_count("an unknown backend name is refused", unknown, 1);
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
    int32_t prompt[PROMPT];
    uint64_t rng = 5;
    for (int i = 0; i < PROMPT; i++)
        prompt[i] = (int32_t)(splitmix64(&rng) % (uint64_t)m.cfg.vocab);
    test_counting(&m, prompt);
    test_counting_spec(&m, prompt);
    test_decode_allocations(&m, prompt);
    test_backend_names();
    model_free(&m);
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed ? 1 : 0;
}
