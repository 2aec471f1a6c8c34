/* tests/test_text.c -- tests for the text chapter (tokenizer, chat template, DSML).
 *
 * Build and run from the repository root (also with
 * -fsanitize=address,undefined -g, which the DSML fuzzing is meant for):
 *
 *     gcc -O2 -Wall -Wextra -o /tmp/tt tests/test_text.c -lm && /tmp/tt
 *
 * Needs vectors/ds4-vocab.gguf, vectors/tiny-vocab.gguf and
 * vectors/tokenizer_vectors.json (tools/make_vocab_gguf.py and
 * vectors/gen_tokenizer_vectors.py make them), and DeepSeek's official
 * encoder tests test_input_N.json / test_output_N.txt, looked up in
 * $DS4_ENCODING_TESTS and vectors/encoding (a copy of the official encoder tests), found from the repository.
 *
 * Every check prints what it compared (the tokenizer vectors print one line
 * per group and one per failure). The last line is "N passed, N failed" and
 * the exit status is 0 only if nothing failed.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <stdbool.h>
#include <stdarg.h>
#include <math.h>
#include <errno.h>
#include <limits.h>

#define DS4_NO_MAIN
#include "../ds4.c"
#include "harness.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint32_t rng(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    struct strbuf b = {0};
    char chunk[65536];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) strbuf_append(&b, chunk, got);
    fclose(f);
    if (b.data == NULL) strbuf_append(&b, "", 0);
    *len = b.len;
    return b.data;
}

/* ---- Loading a vocabulary through the engine's own GGUF reader ------------------ */

static bool load_tokenizer(const char *path, struct tokenizer *t) {
    struct gguf g;
    struct gguf_array toks;
    struct ds4_error e = { "" };
    bool ok = gguf_open(&g, path, &e);
    if (ok) {
        ok = gguf_get_array(&g, "tokenizer.ggml.tokens", &toks) &&
             tokenizer_load_gguf(t, &g, (int)toks.count, &e);
        gguf_close(&g);
    }
    check(ok, "load %s: %u tokens, %u merges %s", path, ok ? t->n_tokens : 0,
          ok ? t->n_merges : 0, e.msg);
    return ok;
}

/* ---- Helpers ------------------------------------------------------------------ */

static bool ids_equal(const int32_t *a, size_t na, const int32_t *b, size_t nb) {
    return na == nb && (na == 0 || memcmp(a, b, na * sizeof *a) == 0);
}

static void print_ids(const char *label, const int32_t *ids, size_t n) {
    printf("      %s:", label);
    for (size_t i = 0; i < n && i < 40; i++) printf(" %d", ids[i]);
    printf(n > 40 ? " ...\n" : "\n");
}

static bool valid_utf8(const char *s, size_t n) {
    for (size_t at = 0, used; at < n; at += used)
        if (utf8_decode((const unsigned char *)s + at, n - at, &used) == TEXT_BAD_BYTE) return false;
    return true;
}

static size_t hex_decode(const char *hex, size_t n, char *out) {
    size_t k = 0;
    for (size_t i = 0; i + 1 < n; i += 2) {
        unsigned v;
        sscanf(hex + i, "%2x", &v);
        out[k++] = (char)v;
    }
    return k;
}

static const char *encoding_dir(void) {
    static const char *dirs[] = {NULL, NULL};
    dirs[0] = getenv("DS4_ENCODING_TESTS");
    dirs[1] = repo_path("vectors/encoding");
    for (int i = 0; i < 2; i++) {
        char path[512];
        if (!dirs[i]) continue;
        snprintf(path, sizeof path, "%s/test_input_1.json", dirs[i]);
        FILE *f = fopen(path, "rb");
        if (f) {
            fclose(f);
            return dirs[i];
        }
    }
    return NULL;
}

/* Tokenize and compare with expected ids. */
static void check_tokens(const struct tokenizer *t, const char *what, const char *text, bool special,
                         const int32_t *want, size_t n_want) {
    int32_t *ids;
    size_t n;
    tokenize(t, text, strlen(text), special, &ids, &n);
    if (!check(ids_equal(ids, n, want, n_want), "tokenize %s: %zu ids as expected", what, n_want)) {
        print_ids("got ", ids, n);
        print_ids("want", want, n_want);
    }
    free(ids);
}

/* ---- 1. The official encoder tests ---------------------------------------------- */

static char *render_case(const char *dir, int k, int mode, size_t *len) {
    char path[512], err[256] = "";
    struct strbuf out = {0};
    snprintf(path, sizeof path, "%s/test_input_%d.json", dir, k);
    if (render_chat_file(path, mode, &out, err, sizeof err) != 0) {
        printf("      render error: %s\n", err);
        strbuf_free(&out);
        return NULL;
    }
    *len = out.len;
    return out.data;
}

static void test_official_encoder(const char *dir) {
    for (int k = 1; k <= 3; k++) {
        char path[512];
        size_t got_len = 0, want_len = 0;
        snprintf(path, sizeof path, "%s/test_output_%d.txt", dir, k);
        char *want = slurp(path, &want_len);
        char *got = render_case(dir, k, CHAT_MODE_THINKING, &got_len);
        bool same = got && want && got_len == want_len && memcmp(got, want, got_len) == 0;
        check(same, "official encoder case %d (thinking): %zu bytes rendered vs %zu in test_output_%d.txt",
              k, got_len, want_len, k);
        if (!same && got && want) {
            size_t i = 0;
            while (i < got_len && i < want_len && got[i] == want[i]) i++;
            printf("      first difference at byte %zu: got \"%.40s\" want \"%.40s\"\n", i, got + i, want + i);
        }
        free(got);
        free(want);
    }
}

/* ---- 2. The DSML parser ------------------------------------------------------------ */

struct parse_result {
    struct dsml_parser p;
    int n_starts, n_calls;
    char start_name[64];
};

static void count_events(void *user, const struct dsml_event *ev) {
    struct parse_result *r = user;
    if (ev->kind == DSML_EV_CALL_START) {
        r->n_starts++;
        snprintf(r->start_name, sizeof r->start_name, "%s", ev->name);
    }
    if (ev->kind == DSML_EV_CALL) r->n_calls++;
}

/* Parse text fed in pieces of 1..max_piece bytes (0: all at once). */
static void parse_text(struct parse_result *r, const char *text, size_t n, bool thinking, size_t max_piece) {
    memset(r, 0, sizeof *r);
    dsml_parser_init(&r->p, thinking, count_events, r);
    for (size_t at = 0; at < n;) {
        size_t k = max_piece ? 1 + rng() % max_piece : n;
        if (k > n - at) k = n - at;
        dsml_parser_feed(&r->p, text + at, k);
        at += k;
    }
    dsml_parser_finish(&r->p);
}

static bool sb_is(const struct strbuf *b, const char *s) {
    return b->len == strlen(s) && (b->len == 0 || memcmp(b->data, s, b->len) == 0);
}

static bool same_parse(const struct dsml_parser *a, const struct dsml_parser *b) {
    if (a->reasoning.len != b->reasoning.len || a->content.len != b->content.len) return false;
    if (a->reasoning.len && memcmp(a->reasoning.data, b->reasoning.data, a->reasoning.len)) return false;
    if (a->content.len && memcmp(a->content.data, b->content.data, a->content.len)) return false;
    if (a->flags != b->flags || a->n_calls != b->n_calls) return false;
    for (size_t i = 0; i < a->n_calls; i++)
        if (strcmp(a->calls[i].name, b->calls[i].name) || strcmp(a->calls[i].arguments, b->calls[i].arguments))
            return false;
    return true;
}

/* The text of the assistant turn that starts after the n-th (or last, n<0)
 * "<｜Assistant｜><think>" and ends before the next "<｜User｜>". */
static char *turn_text(const char *prompt, int n, size_t *len) {
    const char *marker = "<｜Assistant｜><think>", *at = NULL, *p = prompt;
    for (int i = 0; (p = strstr(p, marker)) != NULL; i++, p++) {
        at = p;
        if (i == n) break;
    }
    if (!at) return NULL;
    at += strlen(marker);
    const char *end = strstr(at, "<｜User｜>");
    *len = end ? (size_t)(end - at) : strlen(at);
    char *s = xmalloc(*len + 1);
    memcpy(s, at, *len);
    s[*len] = '\0';
    return s;
}

static void test_official_parse(const char *dir) {
    size_t len, tl;
    struct parse_result r, r2;
    char *prompt = render_case(dir, 1, CHAT_MODE_THINKING, &len);
    char *turn = prompt ? turn_text(prompt, 0, &tl) : NULL;
    if (!check(turn != NULL, "official case 1: found the first assistant turn")) goto done;
    parse_text(&r, turn, tl, true, 0);
    check(sb_is(&r.p.reasoning, "The user wants to know the weather in Beijing. I should use the get_weather tool."),
          "parse case 1, turn 1: reasoning_content");
    check(sb_is(&r.p.content, ""), "parse case 1, turn 1: content is empty");
    check(r.p.n_calls == 1 && strcmp(r.p.calls[0].name, "get_weather") == 0,
          "parse case 1, turn 1: one tool call, get_weather");
    check(r.p.n_calls == 1 && strcmp(r.p.calls[0].arguments, "{\"location\": \"Beijing\", \"unit\": \"celsius\"}") == 0,
          "parse case 1, turn 1: arguments {\"location\": \"Beijing\", \"unit\": \"celsius\"} (got %s)",
          r.p.n_calls ? r.p.calls[0].arguments : "none");
    check(r.n_starts == 1 && strcmp(r.start_name, "get_weather") == 0 && r.n_calls == 1 && r.p.flags == 0,
          "parse case 1, turn 1: events CALL_START(get_weather), CALL; no flags");
    for (size_t piece = 1; piece <= 8; piece *= 2) {
        parse_text(&r2, turn, tl, true, piece);
        check(same_parse(&r.p, &r2.p), "parse case 1, turn 1: fed in pieces of 1..%zu bytes, same result", piece);
        dsml_parser_free(&r2.p);
    }
    dsml_parser_free(&r.p);
    free(turn);
    turn = turn_text(prompt, -1, &tl);
    parse_text(&r, turn, tl, true, 0);
    check(sb_is(&r.p.reasoning, "Got the weather data. Let me format a nice response."),
          "parse case 1, last turn: reasoning_content");
    check(strstr(r.p.content.data ? r.p.content.data : "", "22°C") != NULL && r.p.n_calls == 0,
          "parse case 1, last turn: content mentions 22°C, no tool calls");
    dsml_parser_free(&r.p);
    free(turn);
    free(prompt);

    prompt = render_case(dir, 2, CHAT_MODE_THINKING, &len);
    turn = prompt ? turn_text(prompt, -1, &tl) : NULL;
    if (!check(turn != NULL, "official case 2: found the last assistant turn")) goto done;
    parse_text(&r, turn, tl, true, 3);
    check(sb_is(&r.p.reasoning, "The user asks about the capital of France. It is Paris.") &&
          sb_is(&r.p.content, "The capital of France is Paris.") && r.p.n_calls == 0,
          "parse case 2, last turn: reasoning, content \"The capital of France is Paris.\", no calls");
    check(strstr(prompt, "The user said hello") == NULL, "case 2: the first turn's reasoning was dropped");
    dsml_parser_free(&r.p);
    free(turn);
    free(prompt);

    prompt = render_case(dir, 3, CHAT_MODE_THINKING, &len);
    turn = prompt ? turn_text(prompt, 0, &tl) : NULL;
    if (turn) {
        parse_text(&r, turn, tl, true, 5);
        check(r.p.n_calls == 1 && strcmp(r.p.calls[0].name, "search") == 0 &&
              strcmp(r.p.calls[0].arguments, "{\"queries\": \"小柴胡冲剂 布洛芬 相互作用 一起吃\"}") == 0,
              "parse case 3, turn 1: search {\"queries\": ...} as in test_input_3.json");
        dsml_parser_free(&r.p);
    }
    free(turn);
done:
    free(prompt);
}

/* Failure shapes: each has a defined result. */
static void test_dsml_shapes(void) {
    struct parse_result r;
    const char *s;

    s = "thinking without end";
    parse_text(&r, s, strlen(s), true, 0);
    check(sb_is(&r.p.reasoning, s) && r.p.content.len == 0 && r.p.flags == DSML_THINK_UNCLOSED,
          "DSML: missing </think> -> all reasoning, DSML_THINK_UNCLOSED");
    dsml_parser_free(&r.p);

    s = "hmm\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"ls\">\n"
        "<｜DSML｜parameter name=\"path\" string=\"true\">/tmp</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls>";
    parse_text(&r, s, strlen(s), true, 2);
    check(sb_is(&r.p.reasoning, "hmm") && r.p.n_calls == 1 &&
          strcmp(r.p.calls[0].arguments, "{\"path\": \"/tmp\"}") == 0 &&
          r.p.flags == (DSML_THINK_UNCLOSED | DSML_CALL_IN_THINKING),
          "DSML: tool call inside thinking -> reasoning ends, call parsed, flags set");
    dsml_parser_free(&r.p);

    s = "</think>ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"a\">\n</｜DSML｜invoke>\n"
        "<｜DSML｜invoke name=\"b\">\n<｜DSML｜parameter name=\"x\" string=\"true\">hal";
    parse_text(&r, s, strlen(s), true, 1);
    check(sb_is(&r.p.content, "ok") && r.p.n_calls == 1 && strcmp(r.p.calls[0].arguments, "{}") == 0 &&
          r.n_starts == 2 && strcmp(r.start_name, "b") == 0 && r.p.flags == DSML_UNTERMINATED,
          "DSML: unterminated block -> complete call kept, started call 'b' reported then dropped");
    dsml_parser_free(&r.p);

    s = "</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
        "<｜DSML｜parameter name=\"n\" string=\"false\">{\"k\": [1, 2]}</｜DSML｜parameter>\n"
        "<｜DSML｜parameter name=\"n\" string=\"false\">3</｜DSML｜parameter>\n"
        "<｜DSML｜parameter name=\"s\" string=\"true\">a \"q\"\nb</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>garbage";
    parse_text(&r, s, strlen(s), true, 0);
    check(r.p.n_calls == 1 &&
          strcmp(r.p.calls[0].arguments, "{\"n\": {\"k\": [1, 2]}, \"s\": \"a \\\"q\\\"\\nb\"}") == 0 &&
          r.p.flags == (DSML_DUPLICATE_PARAM | DSML_TRAILING_TEXT),
          "DSML: JSON value verbatim, string value JSON-escaped, duplicate dropped, trailing text flagged (%s)",
          r.p.n_calls ? r.p.calls[0].arguments : "none");
    dsml_parser_free(&r.p);

    s = "</think>x\n\n<｜DSML｜tool_calls>\nnonsense";
    parse_text(&r, s, strlen(s), true, 0);
    check(sb_is(&r.p.content, "x") && r.p.n_calls == 0 && (r.p.flags & DSML_MALFORMED) && r.p.error[0],
          "DSML: malformed block -> DSML_MALFORMED, message \"%s\"", r.p.error);
    dsml_parser_free(&r.p);

    s = "plain answer<｜end▁of▁sentence｜>ignored";
    parse_text(&r, s, strlen(s), false, 1);
    check(sb_is(&r.p.content, "plain answer") && r.p.flags == 0, "DSML: chat mode, EOS ends the content");
    dsml_parser_free(&r.p);

    s = "a</thi";
    parse_text(&r, s, strlen(s), true, 1);
    check(sb_is(&r.p.reasoning, "a</thi"), "DSML: a held-back partial marker is released at the end");
    dsml_parser_free(&r.p);
}

/* Random fragments, fed in random pieces: never crash, and the result does
 * not depend on how the text was split. */
static void test_dsml_fuzz(void) {
    static const char *frags[] = {
        "<think>", "</think>", "\n\n", "\n", " ", "hello", "世界", "😀", "<", ">", "\"", "｜", "DSML",
        "<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>", "<｜DSML｜invoke name=\"f\">", "<｜DSML｜invoke",
        "</｜DSML｜invoke>", "<｜DSML｜parameter name=\"a\" string=\"true\">",
        "<｜DSML｜parameter name=\"b\" string=\"false\">", "<｜DSML｜parameter name=\"c\">",
        "</｜DSML｜parameter>", "{\"x\": 1}", "<｜end▁of▁sentence｜>", "name=\"", "string=\"false\"",
        "\n\n<｜DSML｜tool_calls>\n", "</", "｜DSML｜", "\xe4\xbd", "\xff",
    };
    const int n_frags = sizeof frags / sizeof frags[0];
    int same = 0, runs = 3000;
    for (int run = 0; run < runs; run++) {
        struct strbuf text = {0};
        int n = (int)(rng() % 40);
        for (int i = 0; i < n; i++) strbuf_puts(&text, frags[rng() % n_frags]);
        bool thinking = rng() & 1;
        struct parse_result a, b;
        parse_text(&a, text.data ? text.data : "", text.len, thinking, 0);
        parse_text(&b, text.data ? text.data : "", text.len, thinking, 1 + rng() % 9);
        if (same_parse(&a.p, &b.p)) same++;
        else if (same + 5 > run) printf("      split-dependent result for: %s\n", text.data);
        dsml_parser_free(&a.p);
        dsml_parser_free(&b.p);
        strbuf_free(&text);
    }
    check(same == runs, "DSML fuzz: %d random fragment sequences fed whole and in random pieces: %d agree",
          runs, same);
}

/* ---- 3. Chat template cases beyond the official tests ------------------------------ */

static void check_render(const char *what, const char *messages_json, const char *tools_json,
                         struct chat_options opt, const char *want) {
    char err[256] = "";
    struct json *m = json_parse(messages_json, strlen(messages_json), 64, err, sizeof err);
    struct json *t = tools_json ? json_parse(tools_json, strlen(tools_json), 64, err, sizeof err) : NULL;
    struct strbuf out = {0};
    int rc = m ? chat_render(m, t, &opt, &out, err, sizeof err) : -1;
    bool ok = rc == 0 && out.data && strcmp(out.data, want) == 0;
    if (!check(ok, "render %s", what)) {
        printf("      got : %s\n      want: %s\n      err : %s\n", out.data ? out.data : "(null)", want, err);
    }
    strbuf_free(&out);
    json_free(m);
    json_free(t);
}

static void test_chat_cases(void) {
    struct chat_options chat = {.mode = CHAT_MODE_CHAT}, think = {.mode = CHAT_MODE_THINKING};
    struct chat_options max_big = {.mode = CHAT_MODE_THINK_MAX, .context_tokens = 1048576};
    struct chat_options max_small = {.mode = CHAT_MODE_THINK_MAX, .context_tokens = 65536};

    check_render("doc example A (chat mode)",
                 "[{\"role\":\"system\",\"content\":\"You are terse.\"},{\"role\":\"user\",\"content\":\"Capital of Italy?\"}]",
                 NULL, chat,
                 "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Capital of Italy?<｜Assistant｜></think>");
    check_render("doc example B (thinking, earlier reasoning dropped)",
                 "[{\"role\":\"user\",\"content\":\"Hi\"},{\"role\":\"assistant\",\"reasoning_content\":\"Greeting.\","
                 "\"content\":\"Hello!\"},{\"role\":\"user\",\"content\":\"2+2?\"}]",
                 NULL, think,
                 "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>Hello!<｜end▁of▁sentence｜>"
                 "<｜User｜>2+2?<｜Assistant｜><think>");
    const char *one = "[{\"role\":\"user\",\"content\":\"Q\"}]";
    char want[2048];
    snprintf(want, sizeof want, "<｜begin▁of▁sentence｜>%s<｜User｜>Q<｜Assistant｜><think>", CHAT_THINK_MAX_TEXT);
    check_render("Think Max with a 1M context: paragraph after BOS", one, NULL, max_big, want);
    check_render("Think Max with a 64K context: plain thinking", one, NULL, max_small,
                 "<｜begin▁of▁sentence｜><｜User｜>Q<｜Assistant｜><think>");
    check_render("developer message before the last user is dropped (thinking, no tools)",
                 "[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"developer\",\"content\":\"D\"},"
                 "{\"role\":\"user\",\"content\":\"U1\"},{\"role\":\"assistant\",\"reasoning_content\":\"R\","
                 "\"content\":\"c\"},{\"role\":\"user\",\"content\":\"U2\"}]",
                 NULL, think,
                 "<｜begin▁of▁sentence｜>S<｜User｜>U1<｜Assistant｜></think>c<｜end▁of▁sentence｜>"
                 "<｜User｜>U2<｜Assistant｜><think>");
    check_render("tool results sorted by call order, joined by blank lines; DSML arguments",
                 "[{\"role\":\"user\",\"content\":\"U\"},{\"role\":\"assistant\",\"reasoning_content\":\"R\",\"content\":\"\","
                 "\"tool_calls\":[{\"id\":\"a\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}},"
                 "{\"id\":\"b\",\"type\":\"function\",\"function\":{\"name\":\"g\",\"arguments\":"
                 "\"{\\\"n\\\": 1.5, \\\"l\\\": [1, true, null], \\\"s\\\": \\\"x\\\"}\"}}]},"
                 "{\"role\":\"tool\",\"tool_call_id\":\"b\",\"content\":\"B\"},"
                 "{\"role\":\"tool\",\"tool_call_id\":\"a\",\"content\":\"A\"},{\"role\":\"user\",\"content\":\"next\"}]",
                 NULL, think,
                 "<｜begin▁of▁sentence｜><｜User｜>U<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n"
                 "<｜DSML｜invoke name=\"f\">\n\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"g\">\n"
                 "<｜DSML｜parameter name=\"n\" string=\"false\">1.5</｜DSML｜parameter>\n"
                 "<｜DSML｜parameter name=\"l\" string=\"false\">[1, true, null]</｜DSML｜parameter>\n"
                 "<｜DSML｜parameter name=\"s\" string=\"true\">x</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
                 "</｜DSML｜tool_calls><｜end▁of▁sentence｜><｜User｜><tool_result>A</tool_result>\n\n"
                 "<tool_result>B</tool_result>\n\nnext<｜Assistant｜><think>");
    check_render("assistant prefill with wo_eos",
                 "[{\"role\":\"user\",\"content\":\"Hi\"},{\"role\":\"assistant\",\"content\":\"Sure\",\"wo_eos\":true}]",
                 NULL, chat, "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>Sure");
    check_render("quick task 'title'", "[{\"role\":\"user\",\"content\":\"x\",\"task\":\"title\"}]", NULL, chat,
                 "<｜begin▁of▁sentence｜><｜User｜>x<｜title｜>");
    check_render("quick task 'action' (thinking)", "[{\"role\":\"user\",\"content\":\"x\",\"task\":\"action\"}]",
                 NULL, think, "<｜begin▁of▁sentence｜><｜User｜>x<｜Assistant｜><think><｜action｜>");
    check_render("latest_reminder after the last user",
                 "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"latest_reminder\",\"content\":\"r\"}]", NULL, think,
                 "<｜begin▁of▁sentence｜><｜User｜>q<｜Assistant｜><think><｜latest_reminder｜>r");
    check_render("response_format",
                 "[{\"role\":\"system\",\"content\":\"S\",\"response_format\":{\"type\":\"json_object\"}},"
                 "{\"role\":\"user\",\"content\":\"u\"}]",
                 NULL, chat,
                 "<｜begin▁of▁sentence｜>S\n\n## Response Format:\n\nYou MUST strictly adhere to the following "
                 "schema to reply:\n{\"type\": \"json_object\"}<｜User｜>u<｜Assistant｜></think>");
}

/* Tools given next to the messages, when the first message is a user turn. */
static void test_chat_tools_first(void) {
    char want[4096], err[256] = "";
    snprintf(want, sizeof want, "<｜begin▁of▁sentence｜>\n\n%s{\"name\": \"t\", \"parameters\": {}}%s"
             "<｜User｜>u<｜Assistant｜><think>r</think><｜end▁of▁sentence｜>", CHAT_TOOLS_HEAD, CHAT_TOOLS_TAIL);
    const char *msgs = "[{\"role\":\"user\",\"content\":\"u\"},{\"role\":\"assistant\",\"reasoning_content\":\"r\"}]";
    const char *tools = "[{\"type\":\"function\",\"function\":{\"name\":\"t\",\"parameters\":{}}}]";
    struct json *m = json_parse(msgs, strlen(msgs), 64, err, sizeof err);
    struct json *t = json_parse(tools, strlen(tools), 64, err, sizeof err);
    struct chat_options think = {.mode = CHAT_MODE_THINKING};
    struct strbuf out = {0};
    chat_render(m, t, &think, &out, err, sizeof err);
    if (!check(out.data && strcmp(out.data, want) == 0,
               "render request tools with no system message: an empty system message carries them"))
        printf("      got: %s\n", out.data ? out.data : "(null)");
    strbuf_free(&out);
    json_free(m);
    json_free(t);
}

static void check_pyjson(double v, const char *want) {
    struct strbuf b = {0};
    pyjson_number(&b, v);
    check(b.data && strcmp(b.data, want) == 0, "Python repr of %.17g is \"%s\" (got \"%s\")", v, want,
          b.data ? b.data : "");
    strbuf_free(&b);
}

static void test_pyjson(void) {
    check_pyjson(1e20, "1e+20");
    check_pyjson(0.1, "0.1");
    check_pyjson(-2.5e-7, "-2.5e-07");
    check_pyjson(100, "100");
    check_pyjson(123456.789, "123456.789");
    check_pyjson(1e16, "1e+16");
    check_pyjson(1.5e300, "1.5e+300");
    check_pyjson(0.0001, "0.0001");
    check_pyjson(1234567890123456.7, "1234567890123456.8");
    struct strbuf b = {0};
    pyjson_string(&b, "a\"b\\c\n\x01\x7f\xc3\xa9", 10);
    check(strcmp(b.data, "\"a\\\"b\\\\c\\n\\u0001\x7f\xc3\xa9\"") == 0,
          "Python json.dumps string escaping: %s", b.data);
    strbuf_free(&b);
}

/* ---- 4. The tokenizer ---------------------------------------------------------------- */

struct piece_list {
    struct strbuf hex;      /* pieces as hex, comma separated */
    const char *text;
};

static void collect_piece(void *ctx, size_t start, size_t end) {
    struct piece_list *l = ctx;
    if (l->hex.len) strbuf_append(&l->hex, ",", 1);
    for (size_t i = start; i < end; i++) strbuf_printf(&l->hex, "%02x", (unsigned char)l->text[i]);
}

static void test_vectors(const struct tokenizer *t, const char *path) {
    size_t len;
    char *text = slurp(path, &len), err[256] = "";
    struct json *root = text ? json_parse(text, len, 16, err, sizeof err) : NULL;
    const struct json *cases = json_get(root, "cases");
    if (!check(json_is(cases, JSON_ARRAY), "read %s: %zu cases %s", path, cases ? cases->count : 0, err)) {
        free(text);
        return;
    }
    const char *kinds[] = {"english", "code", "digits", "whitespace", "cjk", "emoji", "mixed", "special",
                           "invalid_utf8", "long", "random"};
    int pass[11] = {0}, total[11] = {0}, piece_pass = 0, piece_total = 0;
    size_t total_ids = 0;
    for (size_t c = 0; c < cases->count; c++) {
        const struct json *k = &cases->items[c];
        const struct json *hex = json_get(k, "hex"), *want = json_get(k, "ids_merges");
        if (!want) want = json_get(k, "ids");
        bool special = json_is(json_get(k, "special"), JSON_TRUE);
        char *bytes = xmalloc(hex->len / 2 + 1);
        size_t n = hex_decode(hex->string, hex->len, bytes);
        int32_t *ids, *exp = xmalloc((want->count + 1) * sizeof *exp);
        size_t n_ids;
        for (size_t i = 0; i < want->count; i++) exp[i] = (int32_t)want->items[i].number;
        tokenize(t, bytes, n, special, &ids, &n_ids);
        total_ids += want->count;
        int kind = 0;
        while (kind < 10 && !chat_is_str(json_get(k, "kind"), kinds[kind])) kind++;
        total[kind]++;
        bool ok = ids_equal(ids, n_ids, exp, want->count);
        pass[kind] += ok;
        if (!check_quiet(ok, "tokenizer vector %zu (%s): %zu ids", c, kinds[kind], want->count)) {
            printf("      text hex: %.120s\n", hex->string);
            print_ids("got ", ids, n_ids);
            print_ids("want", exp, want->count);
        }
        if (!special) {   /* the pre-tokenizer alone, piece by piece */
            struct piece_list pl = {.text = bytes};
            const struct json *pieces = json_get(k, "pieces");
            struct strbuf joined = {0};
            for (size_t i = 0; i < pieces->count; i++) {
                if (i) strbuf_append(&joined, ",", 1);
                strbuf_append(&joined, pieces->items[i].string, pieces->items[i].len);
            }
            pretokenize(bytes, n, collect_piece, &pl);
            bool same = pl.hex.len == joined.len && (joined.len == 0 || memcmp(pl.hex.data, joined.data, joined.len) == 0);
            piece_total++;
            piece_pass += same;
            if (!check_quiet(same, "pre-tokenizer pieces of vector %zu (%s)", c, kinds[kind]))
                printf("      got : %.200s\n      want: %.200s\n", pl.hex.data ? pl.hex.data : "", joined.data ? joined.data : "");
            strbuf_free(&pl.hex);
            strbuf_free(&joined);
        }
        free(ids);
        free(exp);
        free(bytes);
    }
    for (int k = 0; k < 11; k++)
        if (total[k])
            printf("%s tokenizer vectors [%s]: %d/%d match the regex+tiktoken reference (counted above)\n",
                   pass[k] == total[k] ? "ok  " : "FAIL", kinds[k], pass[k], total[k]);
    printf("%s pre-tokenizer pieces: %d/%d match Python regex; %zu reference ids in all (counted above)\n",
           piece_pass == piece_total ? "ok  " : "FAIL", piece_pass, piece_total, total_ids);
    json_free(root);
    free(text);
}

/* Random text of code points from everywhere (valid scalar values), or of
 * random bytes when `bytes` is set. */
static size_t random_text(char *out, size_t max_cps, bool bytes) {
    size_t n = 0, count = 1 + rng() % max_cps;
    for (size_t i = 0; i < count; i++) {
        if (bytes) {
            out[n++] = (char)(rng() & 0xFF);
            continue;
        }
        uint32_t r = rng() % 8, cp;
        if (r < 3) cp = 0x20 + rng() % 0x5F;
        else if (r == 3) cp = rng() % 0x20;
        else if (r == 4) cp = 0x80 + rng() % 0x780;
        else if (r == 5) cp = 0x800 + rng() % 0xF800;
        else if (r == 6) cp = 0x4E00 + rng() % 0x5200;
        else cp = 0x10000 + rng() % 0x100000;
        if (cp >= 0xD800 && cp <= 0xDFFF) cp = 'x';
        n += utf8_encode(out + n, cp);
    }
    return n;
}

static void test_round_trip(const struct tokenizer *t, const char *name, int runs) {
    char text[64 * 4 + 8];
    int ok = 0;
    for (int run = 0; run < runs; run++) {
        size_t n = random_text(text, 64, run % 4 == 3);
        int32_t *ids;
        size_t n_ids;
        struct strbuf back = {0};
        tokenize(t, text, n, run % 2 == 0, &ids, &n_ids);
        detokenize(t, ids, n_ids, &back);
        if (back.len == n && (n == 0 || memcmp(back.data, text, n) == 0)) ok++;
        free(ids);
        strbuf_free(&back);
    }
    check(ok == runs, "%s: decode(encode(x)) == x for %d random strings (1 in 4 random bytes): %d ok", name, runs, ok);
}

/* The streaming decoder: output always equals detokenize(); for ids that
 * came from valid UTF-8, every emitted chunk is whole characters. */
static void test_streaming(const struct tokenizer *t, const char *name) {
    int runs = 500, equal = 0, whole = 0;
    char text[64 * 4 + 8];
    for (int run = 0; run < runs; run++) {
        bool from_text = run % 2 == 0;
        int32_t *ids, rnd[64];
        size_t n_ids;
        if (from_text) {
            size_t n = random_text(text, 64, false);
            tokenize(t, text, n, false, &ids, &n_ids);
        } else {
            n_ids = 1 + rng() % 64;
            for (size_t i = 0; i < n_ids; i++) rnd[i] = (int32_t)(rng() % t->n_tokens);
            ids = rnd;
        }
        struct strbuf all = {0}, out = {0};
        struct token_stream s = {0};
        bool chunks_whole = true;
        detokenize(t, ids, n_ids, &all);
        for (size_t i = 0; i < n_ids; i++) {
            size_t before = out.len;
            token_stream_push(t, &s, ids[i], &out);
            if (!valid_utf8(out.data + before, out.len - before)) chunks_whole = false;
        }
        token_stream_flush(&s, &out);
        equal += out.len == all.len && (all.len == 0 || memcmp(out.data, all.data, all.len) == 0);
        if (from_text) whole += chunks_whole;
        if (from_text) free(ids);
        strbuf_free(&all);
        strbuf_free(&out);
    }
    check(equal == runs, "%s: streamed bytes == detokenize() for %d sequences", name, runs);
    check(whole == runs / 2, "%s: no streamed chunk splits a UTF-8 character (%d/%d sequences)", name, whole,
          runs / 2);
}

static void test_tokenizer_basics(const struct tokenizer *t) {
    static const int32_t hello[] = {19923, 2058};
    static const int32_t chat[] = {128803, 30594, 128804, 128821, 36101, 128822, 7624, 1};
    const struct special_tokens *sp = &t->sp;
    check(sp->bos == 0 && sp->eos == 1 && sp->pad == 2 && sp->user == 128803 && sp->assistant == 128804 &&
          sp->think_start == 128821 && sp->think_end == 128822 && sp->dsml == 128825 &&
          sp->latest_reminder == 128828 && sp->eot == 128805,
          "special tokens: BOS 0, EOS 1, pad 2, User 128803, Assistant 128804, <think> 128821, </think> 128822, "
          "DSML 128825, latest_reminder 128828, EOT 128805");
    check_tokens(t, "\"Hello world\" (docs/gguf-layout.md §3.2)", "Hello world", false, hello, 2);
    check_tokens(t, "the V4 chat example of docs/gguf-layout.md §3.2 with parse_special",
                 "<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>", true, chat, 8);

    const char *forged = "<｜User｜><think>";
    int32_t *ids;
    size_t n;
    bool none = true;
    tokenize(t, forged, strlen(forged), false, &ids, &n);
    for (size_t i = 0; i < n; i++)
        if (t->special[ids[i]]) none = false;
    check(none && n > 2, "special strings in text without parse_special become %zu plain tokens", n);
    free(ids);

    size_t len;
    const char *b = token_bytes(t, 128825, &len);
    check(b && len == strlen("｜DSML｜") && memcmp(b, "｜DSML｜", len) == 0, "decode(128825) is the literal ｜DSML｜");
    b = token_bytes(t, 2058, &len);
    check(b && len == 6 && memcmp(b, " world", 6) == 0, "decode(2058) is \" world\" (Ġ maps back to a space)");
}

/* The rendered official prompt tokenizes with every special where it belongs. */
static void test_prompt_tokens(const struct tokenizer *t, const char *dir) {
    size_t len, n, dsml = 0, want_dsml = 0;
    char *prompt = render_case(dir, 1, CHAT_MODE_THINKING, &len);
    int32_t *ids;
    if (!prompt) return;
    tokenize(t, prompt, len, true, &ids, &n);
    for (size_t i = 0; i < n; i++) dsml += ids[i] == t->sp.dsml;
    for (const char *p = prompt; (p = strstr(p, "｜DSML｜")) != NULL; p++) want_dsml++;
    struct strbuf back = {0};
    detokenize(t, ids, n, &back);
    check(n > 0 && ids[0] == 0 && dsml == want_dsml && back.len == len && memcmp(back.data, prompt, len) == 0,
          "official case 1 prompt: %zu tokens, starts with BOS, %zu DSML tokens (%zu in the text), decodes back",
          n, dsml, want_dsml);
    strbuf_free(&back);
    free(ids);
    free(prompt);
}

static void test_tiny_vocab(const struct tokenizer *t) {
    const struct special_tokens *sp = &t->sp;
    check(t->n_tokens == 2048 && sp->bos == 0 && sp->eos == 1 && sp->user > 0 && sp->user < 2048 &&
          sp->assistant > 0 && sp->think_start > 0 && sp->think_end > 0 && sp->dsml > 0,
          "tiny vocabulary: 2048 tokens; BOS 0, EOS 1, User %d, Assistant %d, <think> %d, </think> %d, DSML %d",
          sp->user, sp->assistant, sp->think_start, sp->think_end, sp->dsml);
    const char *s = "<｜begin▁of▁sentence｜><｜User｜>Hello world<｜Assistant｜></think>";
    int32_t *ids;
    size_t n;
    tokenize(t, s, strlen(s), true, &ids, &n);
    check(n >= 5 && ids[0] == 0 && ids[1] == sp->user && ids[n - 2] == sp->assistant && ids[n - 1] == sp->think_end,
          "tiny vocabulary: a rendered prompt tokenizes to %zu ids with BOS, User ... Assistant, </think>", n);
    free(ids);
}

int main(int argc, char **argv) {
    const char *vectors = argc > 1 ? argv[1] : "vectors/tokenizer_vectors.json";
    const char *dir = encoding_dir();
    struct tokenizer full, tiny;
    (void)json_write, (void)json_num, (void)json_str, (void)json_at;   /* JSON API this test does not need */

    printf("-- chat template: official encoder tests\n");
    if (check(dir != NULL, "found DeepSeek's encoder tests (test_input_N.json)")) {
        test_official_encoder(dir);
        test_official_parse(dir);
    }
    printf("-- chat template: more cases, Python-style JSON\n");
    test_chat_cases();
    test_chat_tools_first();
    test_pyjson();
    printf("-- DSML parser\n");
    test_dsml_shapes();
    test_dsml_fuzz();
    printf("-- tokenizer (DeepSeek V4 vocabulary)\n");
    if (load_tokenizer("vectors/ds4-vocab.gguf", &full)) {
        test_tokenizer_basics(&full);
        test_vectors(&full, vectors);
        test_round_trip(&full, "V4 vocabulary", 3000);
        test_streaming(&full, "V4 vocabulary");
        if (dir) test_prompt_tokens(&full, dir);
        tokenizer_free(&full);
    }
    printf("-- tokenizer (tiny vocabulary)\n");
    if (load_tokenizer("vectors/tiny-vocab.gguf", &tiny)) {
        test_tiny_vocab(&tiny);
        test_round_trip(&tiny, "tiny vocabulary", 1000);
        test_streaming(&tiny, "tiny vocabulary");
        tokenizer_free(&tiny);
    }
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed == 0 ? 0 : 1;
}
