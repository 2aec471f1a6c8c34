/* tests/test_json.c -- tests for the JSON chapter.
 *
 * Build and run (also with -fsanitize=address,undefined -g):
 *
 *     gcc -O2 -Wall -Wextra -o /tmp/tj tests/test_json.c -lm && /tmp/tj
 *
 * Every check prints what it compared. The last line is "N passed, N failed"
 * and the exit status is 0 only if nothing failed. An optional argument names
 * the tiny vector file (default: vectors/tiny/vectors.json, then
 * vectors/vectors.json).
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <stdbool.h>
#include <stdarg.h>
#include <math.h>
#include <errno.h>
#include <time.h>

#define DS4_NO_MAIN
#include "../ds4.c"
#include "harness.h"

static struct json *parse(const char *text, char *err, size_t errlen) {
    return json_parse(text, strlen(text), 64, err, errlen);
}

/* Deep equality of two trees: same kinds, same numbers (bit-for-bit sign
 * of zero is not compared), same bytes in strings and keys, same order. */
static bool json_equal(const struct json *a, const struct json *b) {
    if (a->kind != b->kind) return false;
    switch (a->kind) {
    case JSON_NUMBER: return a->number == b->number;
    case JSON_STRING: return a->len == b->len && memcmp(a->string, b->string, a->len) == 0;
    case JSON_ARRAY:
    case JSON_OBJECT:
        if (a->count != b->count) return false;
        for (size_t i = 0; i < a->count; i++) {
            if (a->kind == JSON_OBJECT &&
                (a->key_lens[i] != b->key_lens[i] || memcmp(a->keys[i], b->keys[i], a->key_lens[i]) != 0))
                return false;
            if (!json_equal(&a->items[i], &b->items[i])) return false;
        }
        return true;
    default: return true;
    }
}

/* xorshift64*: a fixed seed keeps the fuzz runs reproducible. */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng_next(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

static const char *sample_doc =
    "{\"model\":\"ds4\",\"stream\":false,\"temperature\":0.7,\"max_tokens\":128,"
    "\"stop\":null,\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\\n\"},"
    "{\"role\":\"user\",\"content\":\"caf\\u00e9 \xe2\x82\xac \\ud83d\\ude00 \\\"quoted\\\" \\\\ \\/\"}],"
    "\"logits\":[[-0.5136927962303162,0.022489875555038452,1e-7,-3E+2],[]],"
    "\"nested\":{\"a\":{\"b\":[true,false,null,{}]}},\"empty\":\"\"}";

/* ---- Kinds, nesting, lookups ------------------------------------------------- */

static void test_kinds(void) {
    char err[128];
    struct json *j;
    j = parse(" null ", err, sizeof(err));
    check(j && j->kind == JSON_NULL, "' null ' -> JSON_NULL");
    json_free(j);
    j = parse("true", err, sizeof(err));
    check(j && j->kind == JSON_TRUE, "'true' -> JSON_TRUE");
    json_free(j);
    j = parse("false", err, sizeof(err));
    check(j && j->kind == JSON_FALSE, "'false' -> JSON_FALSE");
    json_free(j);
    j = parse("-12.5e-1", err, sizeof(err));
    check(j && j->kind == JSON_NUMBER && j->number == -1.25, "'-12.5e-1' -> number -1.25 (got %g)", j ? j->number : 0);
    json_free(j);
    j = parse("\"hi\"", err, sizeof(err));
    check(j && j->kind == JSON_STRING && j->len == 2 && strcmp(j->string, "hi") == 0, "'\"hi\"' -> string \"hi\" len 2");
    json_free(j);
    j = parse("[1,2,3]", err, sizeof(err));
    check(j && j->kind == JSON_ARRAY && j->count == 3 && json_at(j, 2)->number == 3 && json_at(j, 3) == NULL,
          "'[1,2,3]' -> array of 3, [2]==3, [3]==NULL");
    json_free(j);
    j = parse("[ ]", err, sizeof(err));
    check(j && j->kind == JSON_ARRAY && j->count == 0 && json_at(j, 0) == NULL, "'[ ]' -> empty array");
    json_free(j);
    j = parse("{ }", err, sizeof(err));
    check(j && j->kind == JSON_OBJECT && j->count == 0 && json_get(j, "a") == NULL, "'{ }' -> empty object");
    json_free(j);
    j = parse("0", err, sizeof(err));
    check(j && j->kind == JSON_NUMBER && j->number == 0, "'0' -> 0");
    json_free(j);
    j = parse("-0", err, sizeof(err));
    check(j && j->number == 0 && signbit(j->number), "'-0' -> negative zero");
    json_free(j);
    j = parse("1e-400", err, sizeof(err));
    check(j && j->number == 0, "'1e-400' underflows to 0 (accepted)");
    json_free(j);
    j = parse("9007199254740993", err, sizeof(err));
    check(j && j->number == 9007199254740992.0, "'9007199254740993' rounds to 2^53 (strtod rounding)");
    json_free(j);
    j = parse("1.7976931348623157e308", err, sizeof(err));
    check(j && j->number == 1.7976931348623157e308, "DBL_MAX parses");
    json_free(j);
}

static void test_nesting_and_lookup(void) {
    char err[128];
    struct json *j = parse(sample_doc, err, sizeof(err));
    check(j != NULL, "sample document parses (%s)", j ? "ok" : err);
    if (!j) return;
    double t = 0, mt = 0;
    check(json_num(j, "temperature", &t) && t == 0.7, "json_num(temperature) == 0.7");
    check(json_num(j, "max_tokens", &mt) && mt == 128, "json_num(max_tokens) == 128");
    check(!json_num(j, "model", &t), "json_num on a string member is false");
    check(json_str(j, "model") && strcmp(json_str(j, "model"), "ds4") == 0, "json_str(model) == \"ds4\"");
    check(json_str(j, "stream") == NULL, "json_str on a bool member is NULL");
    check(json_is(json_get(j, "stop"), JSON_NULL), "stop is null");
    check(json_is(json_get(j, "stream"), JSON_FALSE), "stream is false");
    check(json_get(j, "missing") == NULL, "missing key -> NULL");
    const char *role = json_str(json_at(json_get(j, "messages"), 1), "role");
    check(role && strcmp(role, "user") == 0, "messages[1].role == \"user\" via one chained expression");
    const struct json *b = json_get(json_get(json_get(j, "nested"), "a"), "b");
    check(json_is(b, JSON_ARRAY) && b->count == 4 && json_is(json_at(b, 0), JSON_TRUE) &&
          json_is(json_at(b, 3), JSON_OBJECT), "nested.a.b == [true,false,null,{}]");
    const struct json *logits = json_get(j, "logits");
    check(json_at(json_at(logits, 0), 1)->number == 0.022489875555038452, "logits[0][1] exact double");
    check(json_at(json_at(logits, 0), 3)->number == -300, "logits[0][3] == -3E+2 == -300");
    check(json_at(logits, 1)->count == 0, "logits[1] is empty");
    check(json_get(json_at(logits, 0), "x") == NULL && json_at(json_get(j, "model"), 0) == NULL,
          "json_get on array and json_at on string -> NULL");
    check(json_get(NULL, "x") == NULL && json_at(NULL, 0) == NULL && json_str(NULL, "x") == NULL && !json_is(NULL, JSON_NULL),
          "accessors accept NULL");
    const struct json *empty = json_get(j, "empty");
    check(json_is(empty, JSON_STRING) && empty->len == 0 && empty->string[0] == '\0', "empty string member");
    json_free(j);

    j = parse("{\"a\":1,\"b\":2,\"a\":3}", err, sizeof(err));
    check(j && j->count == 3 && json_get(j, "a")->number == 3 && j->items[0].number == 1,
          "duplicate keys: all 3 kept, json_get returns the last (as Python and JS do)");
    json_free(j);
}

/* ---- The memory budget ------------------------------------------------------- */

/* An 8 MB `[0,0,...]` is 4M nodes of 64 bytes: without a budget the parse
 * allocates ~0.5 GB. With one it must stop at the budget, say why, and
 * still parse what fits. */
static void test_budget(void) {
    size_t n = 4u << 20, len = 2 * n + 1;
    char *body = malloc(len + 1), err[160] = "";
    body[0] = '[';
    for (size_t i = 0; i < n; i++) body[1 + 2 * i] = '0', body[2 + 2 * i] = ',';
    body[len - 1] = ']';
    body[len] = '\0';
    struct json_budget b = {.limit = 64u << 20};
    struct json *j = json_parse_within(body, len, 64, &b, err, sizeof err);
    check(j == NULL && b.exceeded && b.used <= b.limit && strstr(err, "memory budget exceeded") != NULL,
          "8 MB [0,0,...] with a 64 MB budget: refused, used %zu <= %zu (%s)", b.used, b.limit, err);
    json_free(j);
    struct json_budget none = {0};
    j = json_parse_within(body, len, 64, &none, err, sizeof err);
    check(j != NULL && none.used > (256u << 20), "the same without a budget: parsed, %zu MB allocated",
          none.used >> 20);
    json_free(j);
    const char *small = "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    j = json_parse_within(small, strlen(small), 64, &b, err, sizeof err);
    check(j != NULL && !b.exceeded, "a small request fits the same budget (used %zu bytes)", b.used);
    json_free(j);
    struct json_budget tiny = {.limit = 1024};
    j = json_parse_within(small, strlen(small), 64, &tiny, err, sizeof err);
    check(j == NULL && tiny.exceeded, "a 1 KB budget refuses even that (the first stacks cost more)");
    json_free(j);
    /* 1 MB of text in one string costs about 1 MB, well inside the budget. */
    size_t tn = 1u << 20;
    char *text = malloc(tn + 3);
    text[0] = '"';
    memset(text + 1, 'a', tn);
    text[tn + 1] = '"';
    text[tn + 2] = '\0';
    struct json_budget four = {.limit = 4u << 20};
    j = json_parse_within(text, tn + 2, 64, &four, err, sizeof err);
    check(j != NULL && j->len == tn, "1 MB string inside a 4 MB budget: parsed, len %zu", j ? j->len : 0);
    json_free(j);
    free(text);
    free(body);
}

/* ---- Strings and escapes ------------------------------------------------------ */

static void expect_string(const char *json_text, const char *want, size_t want_len) {
    char err[128];
    struct json *j = parse(json_text, err, sizeof(err));
    bool ok = j && j->kind == JSON_STRING && j->len == want_len && memcmp(j->string, want, want_len) == 0 &&
              j->string[want_len] == '\0';
    check(ok, "string %-24s decodes to %zu expected bytes%s%s", json_text, want_len, j ? "" : ": ", j ? "" : err);
    json_free(j);
}

static void test_strings(void) {
    expect_string("\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"", "\"\\/\b\f\n\r\t", 8);
    expect_string("\"\\u0041\\u00e9\\u20AC\"", "A\xc3\xa9\xe2\x82\xac", 6);
    expect_string("\"\\ud83d\\ude00\"", "\xf0\x9f\x98\x80", 4);
    expect_string("\"\\uDBFF\\uDFFF\"", "\xf4\x8f\xbf\xbf", 4);
    expect_string("\"a\\u0000b\"", "a\0b", 3);
    expect_string("\"\\ud800\"", "\xef\xbf\xbd", 3);
    expect_string("\"\\udc00x\"", "\xef\xbf\xbdx", 4);
    expect_string("\"\\ud800\\u0041\"", "\xef\xbf\xbd" "A", 4);
    expect_string("\"\\ud800\\ud800\\udc00\"", "\xef\xbf\xbd\xf0\x90\x80\x80", 7);
    expect_string("\"\\ude00\\ud83d\"", "\xef\xbf\xbd\xef\xbf\xbd", 6);
    expect_string("\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"", "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", 14);
    expect_string("\"\x7f\"", "\x7f", 1);
    expect_string("\"\xef\xbf\xbf\xf4\x8f\xbf\xbf\"", "\xef\xbf\xbf\xf4\x8f\xbf\xbf", 7);

    char err[128];
    struct json *j = parse("{\"k\\u0000ey\":1}", err, sizeof(err));
    check(j && j->key_lens[0] == 4 && memcmp(j->keys[0], "k\0ey", 4) == 0, "object key with \\u0000 keeps length 4");
    json_free(j);
}

/* ---- Invalid input ------------------------------------------------------------ */

struct bad_case { const char *text; size_t len; const char *why; };

static void test_invalid(void) {
    static const struct bad_case cases[] = {
        {"", 0, "empty input"},
        {"   ", 3, "only whitespace"},
        {"[1,]", 4, "trailing comma in array"},
        {"{\"a\":1,}", 8, "trailing comma in object"},
        {"[1,,2]", 6, "double comma"},
        {"[1 2]", 5, "missing comma"},
        {"{\"a\" 1}", 7, "missing colon"},
        {"{1:2}", 5, "non-string key"},
        {"{'a':1}", 7, "single quotes"},
        {"01", 2, "leading zero"},
        {"-01", 3, "negative leading zero"},
        {"1.", 2, "no digits after point"},
        {".5", 2, "no digits before point"},
        {"1e", 2, "empty exponent"},
        {"1e+", 3, "exponent sign only"},
        {"+1", 2, "leading plus"},
        {"-", 1, "lone minus"},
        {"0x10", 4, "hex number"},
        {"NaN", 3, "NaN"},
        {"-Infinity", 9, "infinity"},
        {"1e400", 5, "huge number (overflow)"},
        {"-1e99999", 8, "huge negative number"},
        {"tru", 3, "truncated literal"},
        {"nul", 3, "truncated null"},
        {"True", 4, "capitalised literal"},
        {"[", 1, "unclosed array"},
        {"{", 1, "unclosed object"},
        {"\"abc", 4, "unterminated string"},
        {"\"\\", 2, "backslash at end"},
        {"\"\\x\"", 4, "bad escape \\x"},
        {"\"\\U0041\"", 8, "bad escape \\U"},
        {"\"\\u12\"", 6, "short \\u escape"},
        {"\"\\u12G4\"", 8, "non-hex \\u escape"},
        {"\"a\tb\"", 5, "raw tab in string"},
        {"\"a\nb\"", 5, "raw newline in string"},
        {"\"\x01\"", 3, "raw control char 0x01"},
        {"\"a\0b\"", 5, "raw NUL in string"},
        {"\"\xff\"", 3, "invalid UTF-8 byte 0xff"},
        {"\"\x80\"", 3, "lone continuation byte"},
        {"\"\xc0\xaf\"", 4, "overlong '/'"},
        {"\"\xe0\x80\xaf\"", 5, "overlong 3-byte"},
        {"\"\xed\xa0\x80\"", 5, "UTF-8 encoded surrogate"},
        {"\"\xf4\x90\x80\x80\"", 6, "code point above U+10FFFF"},
        {"\"\xe2\x82\"", 4, "truncated UTF-8 sequence"},
        {"\xef\xbb\xbf[]", 5, "byte order mark"},
        {"[1]x", 4, "trailing garbage"},
        {"[] []", 5, "two documents"},
        {"/* c */ 1", 9, "comment"},
        {"[1,\x0b" "2]", 6, "vertical tab as whitespace"},
        {"\x00", 1, "NUL byte"},
    };
    size_t n = sizeof(cases) / sizeof(cases[0]);
    for (size_t i = 0; i < n; i++) {
        char err[160] = "";
        struct json *j = json_parse(cases[i].text, cases[i].len, 64, err, sizeof(err));
        bool ok = j == NULL && strncmp(err, "JSON error at byte ", 19) == 0;
        check(ok, "rejects %-28s -> %s", cases[i].why, err);
        json_free(j);
    }

    char big[400];
    memset(big, '9', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    char err[160];
    struct json *j = parse(big, err, sizeof(err));
    check(j == NULL, "rejects a 399-digit integer -> %s", err);
    json_free(j);

    j = parse("[1,2,x]", err, sizeof(err));
    check(j == NULL && strstr(err, "at byte 5:") != NULL, "error offset: '[1,2,x]' -> %s", err);
    json_free(j);
    j = parse("{\"a\":[1,2}", err, sizeof(err));
    check(j == NULL && strcmp(err, "JSON error at byte 9: expected ',' or ']', found '}'") == 0,
          "exact message: %s", err);
    json_free(j);
    j = json_parse("[1]x", 4, 64, NULL, 0);
    check(j == NULL, "err == NULL is allowed");
    char tiny[8];
    j = json_parse("[1]x", 4, 64, tiny, sizeof(tiny));
    check(j == NULL && strlen(tiny) == sizeof(tiny) - 1, "message truncated to errlen: '%s'", tiny);
}

/* Every proper prefix of an object is incomplete, so each must fail. */
static void test_truncation(void) {
    size_t len = strlen(sample_doc), rejected = 0, messages = 0;
    char err[160], last[160] = "";
    for (size_t k = 0; k < len; k++) {
        struct json *j = json_parse(sample_doc, k, 64, err, sizeof(err));
        if (j == NULL) rejected++;
        if (j == NULL && strncmp(err, "JSON error at byte ", 19) == 0) messages++;
        if (k == len / 2) snprintf(last, sizeof(last), "%s", err);
        json_free(j);
    }
    check(rejected == len && messages == len, "all %zu truncations of the sample rejected with a message (%zu)",
          len, rejected);
    printf("     e.g. cut at byte %zu: %s\n", len / 2, last);
}

static char *repeat(const char *unit, size_t times, const char *tail) {
    size_t u = strlen(unit), t = strlen(tail);
    char *s = malloc(u * times + t + 1);
    for (size_t i = 0; i < times; i++) memcpy(s + i * u, unit, u);
    memcpy(s + u * times, tail, t + 1);
    return s;
}

static void test_depth(void) {
    char err[160];
    char *bomb = repeat("[", 100000, "");
    double t0 = now_seconds();
    struct json *j = json_parse(bomb, strlen(bomb), 64, err, sizeof(err));
    check(j == NULL && strstr(err, "nesting") != NULL, "depth bomb [[[... x100000 -> %s (%.3f ms)", err,
          (now_seconds() - t0) * 1e3);
    json_free(j);
    j = json_parse(bomb, strlen(bomb), 1000000, err, sizeof(err));
    check(j == NULL && strstr(err, "256") != NULL, "max_depth 1e6 is clamped -> %s", err);
    json_free(j);
    free(bomb);

    char *objs = repeat("{\"a\":", 100000, "");
    j = parse(objs, err, sizeof(err));
    check(j == NULL && strstr(err, "nesting") != NULL, "object bomb {\"a\":{\"a\":... -> %s", err);
    json_free(j);
    free(objs);

    char *ok64 = repeat("[", 64, ""), *bad65;
    char *close64 = repeat("]", 64, "");
    size_t n = strlen(ok64);
    char *doc = malloc(2 * n + 4);
    memcpy(doc, ok64, n);
    memcpy(doc + n, close64, n + 1);
    j = json_parse(doc, strlen(doc), 64, err, sizeof(err));
    check(j != NULL, "64 nested arrays accepted with max_depth 64");
    json_free(j);
    bad65 = malloc(2 * n + 4);
    snprintf(bad65, 2 * n + 4, "[%s]", doc);
    j = json_parse(bad65, strlen(bad65), 64, err, sizeof(err));
    check(j == NULL, "65 nested arrays rejected with max_depth 64 -> %s", err);
    json_free(j);
    j = json_parse("[]", 2, 0, err, sizeof(err));
    check(j == NULL, "max_depth 0 rejects '[]' -> %s", err);
    json_free(j);
    j = json_parse("7", 1, 0, err, sizeof(err));
    check(j != NULL, "max_depth 0 accepts a scalar");
    json_free(j);
    free(ok64);
    free(close64);
    free(doc);
    free(bad65);
}

/* ---- The writer ----------------------------------------------------------------- */

static void expect_written_string(const char *in, size_t n, const char *want) {
    struct strbuf b = {0};
    json_write_string(&b, in, n);
    bool ok = !b.oom && b.len == strlen(want) && memcmp(b.data, want, b.len) == 0;
    check(ok, "json_write_string -> %s (want %s)", b.data ? b.data : "(null)", want);
    strbuf_free(&b);
}

static void test_write_string(void) {
    expect_written_string("plain", 5, "\"plain\"");
    expect_written_string("", 0, "\"\"");
    expect_written_string("a\"b\\c", 5, "\"a\\\"b\\\\c\"");
    expect_written_string("\n\r\t\b\f", 5, "\"\\n\\r\\t\\b\\f\"");
    expect_written_string("\x01\x1f\0", 3, "\"\\u0001\\u001f\\u0000\"");
    expect_written_string("/\x7f", 2, "\"/\x7f\"");
    expect_written_string("caf\xc3\xa9 \xf0\x9f\x98\x80", 10, "\"caf\xc3\xa9 \xf0\x9f\x98\x80\"");
    expect_written_string("a\xffz", 3, "\"a\xef\xbf\xbdz\"");
    expect_written_string("\xe2\x82", 2, "\"\xef\xbf\xbd\xef\xbf\xbd\"");
    expect_written_string("\xc0\xaf", 2, "\"\xef\xbf\xbd\xef\xbf\xbd\"");
    expect_written_string("\xed\xa0\x80", 3, "\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\"");
    expect_written_string("x\xe2\x82\xac", 4, "\"x\xe2\x82\xac\"");

    /* Whatever bytes go in, what comes out parses back. */
    size_t reparsed = 0;
    char bytes[64];
    for (int round = 0; round < 2000; round++) {
        for (size_t i = 0; i < sizeof(bytes); i++) bytes[i] = (char)rng_next();
        struct strbuf b = {0};
        json_write_string(&b, bytes, sizeof(bytes));
        struct json *j = json_parse(b.data, b.len, 4, NULL, 0);
        reparsed += j != NULL && j->kind == JSON_STRING;
        json_free(j);
        strbuf_free(&b);
    }
    check(reparsed == 2000, "2000 random 64-byte strings written and re-parsed as valid JSON (%zu)", reparsed);
}

static void expect_written_number(double v, const char *want) {
    struct strbuf b = {0};
    json_write_number(&b, v);
    check(b.data && strcmp(b.data, want) == 0, "json_write_number(%.17g) -> %s (want %s)", v, b.data, want);
    strbuf_free(&b);
}

static void test_write_number(void) {
    expect_written_number(0, "0");
    expect_written_number(-0.0, "-0");
    expect_written_number(3, "3");
    expect_written_number(-42, "-42");
    expect_written_number(123456789012.0, "123456789012");
    expect_written_number(9007199254740992.0, "9007199254740992");
    expect_written_number(1.5, "1.5");
    expect_written_number(0.1, "0.1");
    expect_written_number(0.1 + 0.2, "0.30000000000000004");
    expect_written_number(1e300, "1e+300");
    expect_written_number(1e-7, "1e-07");
    expect_written_number(2.5e-300, "2.5e-300");
    expect_written_number(0.022489875555038452, "0.022489875555038452");
    expect_written_number(NAN, "null");
    expect_written_number(INFINITY, "null");
    expect_written_number(-INFINITY, "null");

    size_t exact = 0, tries = 0;
    while (tries < 100000) {
        uint64_t bits = rng_next();
        double v;
        memcpy(&v, &bits, sizeof(v));
        if (!isfinite(v)) continue;
        tries++;
        struct strbuf b = {0};
        json_write_number(&b, v);
        struct json *j = json_parse(b.data, b.len, 1, NULL, 0);
        exact += j != NULL && j->number == v;
        json_free(j);
        strbuf_free(&b);
    }
    check(exact == tries, "%zu random doubles: write -> parse is exact for %zu", tries, exact);
}

static void test_strbuf(void) {
    struct strbuf b = {0};
    strbuf_puts(&b, "a");
    for (int i = 0; i < 1000; i++) strbuf_printf(&b, "%d:%s,", i, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
    strbuf_append(&b, "", 0);
    size_t want = 1;
    char tmp[64];
    for (int i = 0; i < 1000; i++) want += (size_t)snprintf(tmp, sizeof(tmp), "%d:%s,", i, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
    check(!b.oom && b.len == want && strlen(b.data) == want && strncmp(b.data, "a0:xx", 5) == 0,
          "strbuf_printf x1000 grows to %zu bytes, NUL-terminated", b.len);
    strbuf_free(&b);
    check(b.data == NULL && b.len == 0, "strbuf_free resets the buffer");
}

/* ---- Round trip ------------------------------------------------------------------- */

static void test_round_trip(void) {
    char err[160];
    struct json *a = parse(sample_doc, err, sizeof(err));
    struct strbuf w1 = {0}, w2 = {0};
    json_write(&w1, a);
    struct json *b = json_parse(w1.data, w1.len, 64, err, sizeof(err));
    check(a && b && json_equal(a, b), "parse -> write -> parse gives an equal tree (%zu bytes written)", w1.len);
    json_write(&w2, b);
    check(w1.len == w2.len && memcmp(w1.data, w2.data, w1.len) == 0, "writing twice gives identical text");
    printf("     written: %.160s...\n", w1.data);
    json_free(a);
    json_free(b);
    strbuf_free(&w1);
    strbuf_free(&w2);

    struct strbuf w = {0};
    json_write(&w, NULL);
    check(w.data && strcmp(w.data, "null") == 0, "json_write(NULL) -> null");
    strbuf_free(&w);
}

/* ---- Speed and scale ------------------------------------------------------------- */

/* About 6 MB shaped like the vector file: rows of floats printed the way
 * Python prints a float32 widened to double. */
static char *make_float_document(size_t target, size_t *len_out) {
    struct strbuf b = {0};
    strbuf_puts(&b, "{\"cases\":[");
    for (int row = 0; b.len < target; row++) {
        strbuf_puts(&b, row ? ",[" : "[");
        for (int i = 0; i < 2048; i++) {
            float f = (float)((double)(rng_next() >> 11) / 9007199254740992.0 * 8.0 - 4.0);
            strbuf_printf(&b, i ? ", %.17g" : "%.17g", (double)f);
        }
        strbuf_puts(&b, "]");
    }
    strbuf_puts(&b, "]}");
    *len_out = b.len;
    return b.data;
}

static void test_speed(void) {
    size_t len;
    char *doc = make_float_document(6 * 1000 * 1000, &len);
    char err[160];
    double best = 1e9;
    size_t numbers = 0;
    for (int run = 0; run < 3; run++) {
        double t0 = now_seconds();
        struct json *j = json_parse(doc, len, 64, err, sizeof(err));
        double dt = now_seconds() - t0;
        if (dt < best) best = dt;
        const struct json *rows = json_get(j, "cases");
        numbers = 0;
        for (size_t r = 0; rows && r < rows->count; r++) numbers += rows->items[r].count;
        json_free(j);
    }
    printf("     parse speed: %.2f MB, %zu numbers in %.1f ms (%.0f MB/s, best of 3)\n", len / 1e6, numbers,
           best * 1e3, len / 1e6 / best);
    check(numbers > 0 && numbers % 2048 == 0, "6 MB float document parsed: %zu numbers in %.1f ms", numbers, best * 1e3);
    free(doc);

    /* Shapes that would expose quadratic behaviour: one long string full of
     * escapes, one wide object, one long flat array. */
    char *s = repeat("\\u00e9\\n\\ud83d\\ude00", 100000, "\"");
    s[0] = '"';
    double t0 = now_seconds();
    struct json *j = json_parse(s, strlen(s), 64, err, sizeof(err));
    check(j && j->kind == JSON_STRING, "1.9 MB escaped string parsed in %.1f ms", (now_seconds() - t0) * 1e3);
    json_free(j);
    free(s);

    struct strbuf b = {0};
    strbuf_puts(&b, "{");
    for (int i = 0; i < 200000; i++) strbuf_printf(&b, "%s\"k%d\":%d", i ? "," : "", i, i);
    strbuf_puts(&b, "}");
    t0 = now_seconds();
    j = json_parse(b.data, b.len, 64, err, sizeof(err));
    check(j && j->count == 200000 && json_get(j, "k199999")->number == 199999,
          "200000-member object parsed in %.1f ms", (now_seconds() - t0) * 1e3);
    json_free(j);
    strbuf_free(&b);

    char *zeros = repeat("0,", 1000000, "0]");
    char *arr = malloc(strlen(zeros) + 2);
    arr[0] = '[';
    strcpy(arr + 1, zeros);
    t0 = now_seconds();
    j = json_parse(arr, strlen(arr), 64, err, sizeof(err));
    check(j && j->count == 1000001, "[0,0,...] with 1000001 elements parsed in %.1f ms", (now_seconds() - t0) * 1e3);
    json_free(j);
    free(zeros);
    free(arr);
}

/* ---- The real vector file ---------------------------------------------------------- */

static char *slurp_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *data = size >= 0 ? malloc((size_t)size + 1) : NULL;
    if (data && fread(data, 1, (size_t)size, f) != (size_t)size) {
        free(data);
        data = NULL;
    }
    fclose(f);
    *len = (size_t)size;
    return data;
}

static void test_vector_file(const char *path) {
    const char *candidates[] = {path, repo_path("vectors/vectors.json")};
    size_t len = 0;
    char *data = NULL;
    const char *used = NULL;
    for (int i = 0; i < 2 && !data; i++)
        if (candidates[i]) data = slurp_file(used = candidates[i], &len);
    if (!check(data != NULL, "the oracle vector file vectors/vectors.json is found (or pass its path)"))
        return;
    char err[160];
    double t0 = now_seconds();
    struct json *j = json_parse(data, len, 64, err, sizeof(err));
    double dt = now_seconds() - t0;
    const struct json *cases = json_get(j, "cases");
    check(json_is(cases, JSON_ARRAY) && cases->count == 10, "%s (%.1f MB, %.1f ms) has %zu cases, want 10%s%s",
          used, len / 1e6, dt * 1e3, cases ? cases->count : 0, j ? "" : ": ", j ? "" : err);
    const char *name = json_str(json_at(cases, 0), "name");
    check(name != NULL, "cases[0].name = %s", name ? name : "(missing)");
    json_free(j);
    free(data);
}

/* ---- Fuzz ----------------------------------------------------------------------- */

/* Mutate the sample (flip, insert, delete, duplicate, truncate), parse it,
 * and when it still parses, check that it writes and re-parses to an equal
 * tree. The point is "never crash"; run this under the sanitizers. */
static size_t mutate(char *buf, size_t len, size_t cap) {
    int edits = 1 + (int)(rng_next() % 4);
    static const char interesting[] = "[]{}\",:\\u0eE.-+ \x00\x80\xc3\xed\xf4\xff";
    for (int e = 0; e < edits && len > 0; e++) {
        size_t at = rng_next() % len;
        char c = (rng_next() & 1) ? (char)rng_next() : interesting[rng_next() % (sizeof(interesting) - 1)];
        switch (rng_next() % 5) {
        case 0: buf[at] = c; break;
        case 1:
            if (len < cap) { memmove(buf + at + 1, buf + at, len - at); buf[at] = c; len++; }
            break;
        case 2: memmove(buf + at, buf + at + 1, len - at - 1); len--; break;
        case 3: {
            char slice[16];
            size_t n = rng_next() % 16, from = rng_next() % len;
            if (from + n > len) n = len - from;
            if (len + n > cap) break;
            memcpy(slice, buf + from, n);
            memmove(buf + at + n, buf + at, len - at);
            memcpy(buf + at, slice, n);
            len += n;
            break;
        }
        default: len = at; break;
        }
    }
    return len;
}

static void test_fuzz(void) {
    size_t base_len = strlen(sample_doc), cap = base_len * 2 + 64;
    size_t accepted = 0, stable = 0;
    char err[160];
    for (int round = 0; round < 20000; round++) {
        char *buf = malloc(cap);
        memcpy(buf, sample_doc, base_len);
        size_t len = mutate(buf, base_len, cap);
        /* Shrink to exactly len bytes so ASan sees any read past the end. */
        char *exact = malloc(len ? len : 1);
        memcpy(exact, buf, len);
        free(buf);
        struct json *j = json_parse(exact, len, 16, err, sizeof(err));
        if (j) {
            accepted++;
            struct strbuf w = {0};
            json_write(&w, j);
            struct json *again = json_parse(w.data, w.len, 16, err, sizeof(err));
            stable += again != NULL && json_equal(j, again);
            json_free(again);
            strbuf_free(&w);
        } else if (strncmp(err, "JSON error at byte ", 19) != 0) {
            check(false, "fuzz round %d: rejected without a proper message: %s", round, err);
        }
        json_free(j);
        free(exact);
    }
    check(stable == accepted, "20000 mutations: no crash, %zu accepted, %zu of them round-trip", accepted, stable);
}

int main(int argc, char **argv) {
    test_kinds();
    test_nesting_and_lookup();
    test_budget();
    test_strings();
    test_invalid();
    test_truncation();
    test_depth();
    test_write_string();
    test_write_number();
    test_strbuf();
    test_round_trip();
    test_speed();
    test_vector_file(argc > 1 ? argv[1] : NULL);
    test_fuzz();
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed == 0 ? 0 : 1;
}
