/* tests/fuzz_http.c -- a bounded mutation fuzzer for what the server reads
 * from strangers: the JSON reader (with its memory budget), the HTTP head
 * parser, the chunked-body decoder and the head reader on a real socket.
 *
 *     tests/bin/fuzz_http [ITERATIONS [SEED]]      (make test: 20000, seed 1)
 *     make fuzz                                     (500,000: about 6 minutes)
 *
 * Built with ASan+UBSan, so "no finding" means no crash, no leak, no
 * out-of-bounds access and no undefined behaviour in any round. Each target
 * also checks a property, not only survival:
 *
 *   json     a budgeted parse either succeeds and equals the unbudgeted one,
 *            or fails with `exceeded` set and `used` <= limit, or fails with
 *            "JSON error at byte N";
 *   head     an accepted head has a method, a path starting with '/', HTTP/1.0
 *            or 1.1, and never both Content-Length and Transfer-Encoding;
 *   chunked  a body encoded with random chunk sizes, extensions and
 *            trailers decodes to itself however the bytes are split, and a
 *            mutated encoding ends in a verdict, never past its input;
 *   socket   http_read_head over a socketpair agrees with the parser.
 *
 * Prints the counts per target, then "N passed, N failed".
 */
#define DS4_NO_MAIN
#include "../ds4.c"

#include "harness.h"

static uint64_t rng;

static uint64_t next(void) {
    return splitmix64(&rng);
}

/* Flip, insert, delete, duplicate a slice, or truncate: 1 to 4 edits. */
static size_t mutate(char *buf, size_t len, size_t cap) {
    static const char interesting[] = "[]{}\",:\\u0eE.-+ \r\n\t;:0123456789abcdefABCDEF\x00\x80\xc3\xff";
    int edits = 1 + (int)(next() % 4);
    for (int e = 0; e < edits && len > 0; e++) {
        size_t at = next() % len;
        char c = (next() & 1) ? (char)next() : interesting[next() % (sizeof interesting - 1)];
        switch (next() % 5) {
        case 0: buf[at] = c; break;
        case 1:
            if (len < cap) { memmove(buf + at + 1, buf + at, len - at); buf[at] = c; len++; }
            break;
        case 2: memmove(buf + at, buf + at + 1, len - at - 1); len--; break;
        case 3: {
            size_t n = next() % 32, from = next() % len;
            char slice[32];
            if (from + n > len) n = len - from;
            if (len + n > cap) break;
            memcpy(slice, buf + from, n);
            memmove(buf + at + n, buf + at, len - at);
            memcpy(buf + at, slice, n);
            len += n;
            break;
        }
        default: if (next() % 4 == 0) len = at; break;
        }
    }
    return len;
}

/* A copy of exactly len bytes, so ASan sees any read past the end. */
static char *exact_copy(const char *src, size_t len) {
    char *p = xmalloc(len ? len : 1);
    memcpy(p, src, len);
    return p;
}

/* ---- json ------------------------------------------------------------------ */

static const char *const json_seeds[] = {
    "{\"model\":\"deepseek-chat\",\"messages\":[{\"role\":\"user\",\"content\":\"h\\u00e9llo\"}],"
    "\"stream\":true,\"stream_options\":{\"include_usage\":true},\"max_tokens\":50,\"stop\":[\"a\",\"b\"]}",
    "{\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":{\"type\":\"object\","
    "\"properties\":{\"x\":{\"type\":\"number\",\"minimum\":-1.5e3}}}}}],\"tool_choice\":\"auto\"}",
    "[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,[[[[]]]],{}]",
    "{\"a\":\"\\ud83d\\ude00\",\"a\":null,\"b\":[true,false,null,1e308,-0.0,\"\\\\\\\"\"]}",
};

static bool json_same(const struct json *a, const struct json *b) {
    if (a->kind != b->kind || a->count != b->count) return false;
    if (a->kind == JSON_NUMBER) return a->number == b->number;
    if (a->kind == JSON_STRING) return a->len == b->len && memcmp(a->string, b->string, a->len) == 0;
    for (size_t i = 0; i < a->count; i++) {
        if (a->kind == JSON_OBJECT &&
            (a->key_lens[i] != b->key_lens[i] || memcmp(a->keys[i], b->keys[i], a->key_lens[i]) != 0))
            return false;
        if (!json_same(&a->items[i], &b->items[i])) return false;
    }
    return true;
}

static void fuzz_json(long rounds) {
    long accepted = 0, over = 0, bad = 0, findings = 0;
    char err[200];
    for (long i = 0; i < rounds; i++) {
        const char *seed = json_seeds[next() % 4];
        size_t base = strlen(seed), cap = base * 2 + 64;
        char *buf = xmalloc(cap);
        memcpy(buf, seed, base);
        size_t len = mutate(buf, base, cap);
        char *text = exact_copy(buf, len);
        free(buf);
        struct json_budget b = {.limit = (size_t)(8 << 10) + next() % (200 << 10)};
        struct json *j = json_parse_within(text, len, 32, &b, err, sizeof err);
        struct json *ref = json_parse(text, len, 32, NULL, 0);
        bool good;
        if (j) good = ref && json_same(j, ref) && b.used <= b.limit, accepted++;
        else if (b.exceeded) good = b.used <= b.limit, over++;
        else good = ref == NULL && strncmp(err, "JSON error at byte ", 19) == 0, bad++;
        if (!good && findings++ < 5) printf("  json finding in round %ld: %.*s\n", i, (int)len, text);
        json_free(j);
        json_free(ref);
        free(text);
    }
    check(findings == 0, "json: %ld rounds, %ld parsed, %ld over budget, %ld refused, %ld findings", rounds,
          accepted, over, bad, findings);
}

/* ---- the HTTP head ------------------------------------------------------------ */

static const char *const head_seeds[] = {
    "POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
    "Content-Length: 12\r\nAuthorization: Bearer k\r\nConnection: keep-alive, Upgrade\r\n\r\n",
    "GET /health HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    "POST /v1/messages HTTP/1.1\r\nHost: [::1]:1\r\nTransfer-Encoding: chunked\r\nx-api-key: abc\r\n"
    "Expect: 100-continue\r\nOrigin: http://a.test\r\n\r\n",
    "HEAD /v1/models/deepseek-chat HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
};

static bool head_sane(const struct http_request *r) {
    return r->method[0] && memchr(r->method, '\0', sizeof r->method) && r->path[0] == '/' &&
           memchr(r->path, '\0', sizeof r->path) && (r->minor == 0 || r->minor == 1) &&
           !(r->chunked && r->has_length);
}

static void fuzz_head(long rounds) {
    long accepted = 0, refused = 0, incomplete = 0, findings = 0;
    char err[200];
    for (long i = 0; i < rounds; i++) {
        const char *seed = head_seeds[next() % 4];
        size_t base = strlen(seed), cap = base * 2 + 64;
        char *buf = xmalloc(cap + 1);
        memcpy(buf, seed, base);
        size_t len = mutate(buf, base, cap);
        struct http_request r;
        memset(&r, 0, sizeof r);
        r.buf = exact_copy(buf, len);
        r.buf_len = len;
        free(buf);
        r.head_len = http_head_end(r.buf, r.buf_len);
        if (r.head_len == 0) {
            incomplete++;
        } else if (http_parse_head(&r, err, sizeof err) == 0) {
            accepted++;
            if (!head_sane(&r) && findings++ < 5) printf("  head finding in round %ld\n", i);
        } else {
            refused++;
        }
        http_request_free(&r);
    }
    check(findings == 0, "head: %ld rounds, %ld accepted (all sane), %ld refused, %ld incomplete, %ld findings",
          rounds, accepted, refused, incomplete, findings);
}

/* ---- chunked bodies ------------------------------------------------------------ */

/* Encode body[0..n) with random chunk sizes, extensions and trailers. */
static void chunk_encode(const char *body, size_t n, struct strbuf *out) {
    size_t at = 0;
    while (at < n) {
        size_t k = 1 + next() % 40;
        if (k > n - at) k = n - at;
        strbuf_printf(out, next() % 2 ? "%zx" : "%zX", k);
        if (next() % 4 == 0) strbuf_puts(out, ";name=\"v\"");
        strbuf_puts(out, "\r\n");
        strbuf_append(out, body + at, k);
        strbuf_puts(out, "\r\n");
        at += k;
    }
    strbuf_puts(out, next() % 3 ? "0\r\n" : "000;end\r\n");
    if (next() % 3 == 0) strbuf_puts(out, "X-Trailer: 1\r\n");
    strbuf_puts(out, "\r\n");
}

/* Decode in random splits. Returns the verdict; *used counts the bytes taken. */
static enum chunk_result chunk_decode_split(const char *in, size_t n, size_t max, struct strbuf *out,
                                            size_t *used) {
    struct chunk_decoder d = {.max = max};
    enum chunk_result r = CHUNK_MORE;
    size_t at = 0;
    while (at < n && r == CHUNK_MORE) {
        size_t k = 1 + next() % 64, took = 0;
        if (k > n - at) k = n - at;
        char *piece = exact_copy(in + at, k);
        r = chunk_feed(&d, piece, k, &took);
        free(piece);
        if (took > k) r = CHUNK_BAD, took = k;       /* a finding: flagged by the caller */
        at += took;
        if (r == CHUNK_MORE && took != k) break;
    }
    *used = at;
    *out = d.out;
    return r;
}

static void fuzz_chunked(long rounds) {
    long round_trips = 0, mutants = 0, findings = 0;
    for (long i = 0; i < rounds; i++) {
        char body[300];
        size_t n = next() % sizeof body;
        for (size_t k = 0; k < n; k++) body[k] = (char)next();
        struct strbuf enc = {0}, dec = {0};
        chunk_encode(body, n, &enc);
        strbuf_puts(&enc, "GET /next");            /* a pipelined request after the body */
        size_t used;
        enum chunk_result r = chunk_decode_split(enc.data, enc.len, 1 << 20, &dec, &used);
        bool ok = r == CHUNK_DONE && dec.len == n && (n == 0 || memcmp(dec.data, body, n) == 0) &&
                  used == enc.len - 9;
        round_trips += ok;
        if (!ok && findings++ < 5) printf("  chunked round trip failed in round %ld\n", i);
        strbuf_free(&dec);
        size_t cap = enc.len * 2 + 64;
        char *m = xmalloc(cap);
        memcpy(m, enc.data, enc.len);
        size_t mlen = mutate(m, enc.len, cap);
        r = chunk_decode_split(m, mlen, 64 + next() % 512, &dec, &used);
        mutants++;
        if (used > mlen && findings++ < 5) printf("  chunked decoder read past its input in round %ld\n", i);
        strbuf_free(&dec);
        strbuf_free(&enc);
        free(m);
        (void)r;
    }
    check(findings == 0 && round_trips == rounds, "chunked: %ld round trips of %ld, %ld mutants, %ld findings",
          round_trips, rounds, mutants, findings);
}

/* ---- the head reader on a socket ------------------------------------------------ */

static void fuzz_socket(long rounds) {
    struct server_options o;
    server_options_default(&o);
    o.header_timeout_ms = 200;
    long agree = 0, findings = 0;
    for (long i = 0; i < rounds; i++) {
        const char *seed = head_seeds[next() % 4];
        size_t base = strlen(seed), cap = base * 2 + 64;
        char *buf = xmalloc(cap + 16);
        memcpy(buf, seed, base);
        size_t len = mutate(buf, base, cap);
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) break;
        size_t split = len ? next() % len : 0;
        struct strbuf carry = {0};
        strbuf_append(&carry, buf, split);         /* some bytes arrive as carry-over */
        if (write(sv[1], buf + split, len - split) < 0) perror("write");
        shutdown(sv[1], SHUT_WR);
        struct http_request r, p;
        memset(&r, 0, sizeof r);
        memset(&p, 0, sizeof p);
        char err[200];
        int st = http_read_head(sv[0], &r, &carry, &o, err, sizeof err);
        if (st == 0) st = http_parse_head(&r, err, sizeof err);
        p.buf = exact_copy(buf, len);
        p.buf_len = len;
        p.head_len = http_head_end(p.buf, len);
        int want = p.head_len ? http_parse_head(&p, err, sizeof err) : (len ? 400 : -1);
        bool same = (st == 0) == (want == 0) && (st != 0 || strcmp(r.path, p.path) == 0);
        agree += same;
        if (!same && findings++ < 5) printf("  socket reader disagrees in round %ld: %d vs %d\n", i, st, want);
        http_request_free(&r);
        http_request_free(&p);
        strbuf_free(&carry);
        close(sv[0]);
        close(sv[1]);
        free(buf);
    }
    check(findings == 0, "socket: %ld rounds, %ld agree with the parser, %ld findings", rounds, agree, findings);
}

int main(int argc, char **argv) {
    long rounds = argc > 1 ? atol(argv[1]) : 20000;
    rng = argc > 2 ? (uint64_t)atoll(argv[2]) : 1;
    if (rounds < 1) rounds = 1;
    printf("fuzz: %ld rounds per target, seed %llu\n", rounds, (unsigned long long)rng);
    double t0 = now_seconds();
    fuzz_json(rounds);
    fuzz_head(rounds);
    fuzz_chunked(rounds);
    fuzz_socket(rounds / 10 + 1);
    printf("fuzz: %.1f s\n", now_seconds() - t0);
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed ? 1 : 0;
}
