/* tests/forward_runs.h -- shared by the tests that compare two backends over
 * a whole prompt (test_metal_model.c, test_cuda_full.c); included after
 * ds4.c. */
#pragma once

/* All-position logits of `tokens` (and the MTP rows, when mtp is given) on
 * an engine with options `opt`: a prefill of `first` tokens, then one token
 * at a time. Returns the seconds it took; stops the program on an error. */
static double run_prompt_logits(struct model *m, struct engine_options opt,
                                const int32_t *tokens, int n, int first, float *logits,
                                float *mtp) {
    struct engine eng;
    engine_init(&eng, m, opt);
    struct session s;
    session_init(&s, &eng);
    int V = m->cfg.vocab;
    struct ds4_error e = { "" };
    double t0 = now_seconds();
    for (int at = 0; at < n;) {
        int T = at == 0 ? first : 1;
        struct forward_request req = { .all_logits = logits + (size_t)at * V,
                                       .mtp_logits = mtp ? mtp + (size_t)at * V : NULL };
        if (!session_forward(&s, tokens + at, T, &req, &e)) {
            fprintf(stderr, "forward: %s\n", e.msg);
            exit(1);
        }
        at += T;
    }
    double dt = now_seconds() - t0;
    session_free(&s);
    engine_free(&eng);
    return dt;
}
