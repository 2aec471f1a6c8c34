/* =========================================================================
 * JSON: a strict RFC 8259 reader and a small writer.
 * =========================================================================
 *
 * Spec: [RFC8259] The JavaScript Object Notation (JSON) Data Interchange
 * Format, and [UNICODE §3.9 table 3-7] for well-formed UTF-8.
 * Reader: json_parse(), json_free(), json_get() and friends.
 * Writer: struct strbuf, json_write_string(), json_write_number(), json_write().
 * Tests: tests/test_json.c.
 *
 * Three parts of ds4 read JSON, and they pull in different directions:
 *
 * - the vector checker reads a few megabytes of float arrays, so the reader
 *   must be linear and cheap per number;
 * - chat-message files are small but full of escapes and non-ASCII text;
 * - the HTTP server reads request bodies written by strangers, so every input,
 *   however hostile, must end in either a tree or a one-line error, never in a
 *   crash, a stack overflow, or time that grows faster than the input.
 *
 * The answer is one small recursive-descent reader that builds a read-only
 * tree (a "DOM") and is strict about everything RFC 8259 allows it to be
 * strict about. There are no extensions: no comments, no trailing commas, no
 * single quotes, no NaN, no byte order mark. Anything the grammar does not
 * allow is an error that names the byte offset (counted from 0) and what was
 * expected there:
 *
 *     JSON error at byte 123: expected ',' or ']', found '}'
 *
 * The tree. Every value is a `struct json`. Scalars use `number` or
 * `string`/`len`. An array keeps its elements in `items[0..count)`. An object
 * keeps its values in `items` too, with `keys[i]`/`key_lens[i]` naming
 * `items[i]`, in document order. Strings are decoded (escapes resolved) UTF-8,
 * NUL-terminated for convenience, but `len` is the truth, because `\u0000` is
 * legal JSON and puts a NUL inside the string.
 *
 * Duplicate keys. RFC 8259 says names "SHOULD be unique" and leaves the
 * meaning of duplicates open. We keep every member, in order, and json_get()
 * returns the first match. Keeping them costs nothing and hides nothing.
 *
 * Memory. All nodes and strings of one document live in one arena (see "The arena"),
 * so json_free() is a handful of free() calls, whatever the tree's shape, and
 * a failed parse can drop everything at once without walking a half-built
 * tree. The price: the tree is read-only, and json_free() must be given the
 * root that json_parse() returned, never an inner node.
 *
 * Limits, each chosen so a hostile body cannot hurt the server:
 *
 * - nesting depth: the caller's max_depth, clamped to JSON_DEPTH_CEILING,
 *   because the reader recurses on every level and the stack is finite;
 * - a number token longer than JSON_NUMBER_MAX_CHARS characters is refused
 *   (no double needs that many), and one that overflows a double is refused
 *   ("number out of range"); underflow quietly becomes 0 or a subnormal;
 * - input size is the caller's business (the server caps the body first).
 *   The finished tree takes at most about 32 times the input, since a
 *   two-byte element such as `0,` becomes one 64-byte node; during the
 *   parse the pending stack (below) can briefly hold as much again. A small
 *   request costs about 84 KB: the first arena chunk plus the stacks.
 *
 * Numbers are converted by strtod(), which reads the decimal point of the
 * current locale. ds4 never calls setlocale(), so it runs in the "C" locale
 * where the point is '.', exactly as JSON wants. The grammar itself is
 * checked by our own scanner first, so strtod() only ever sees a valid
 * JSON number, copied into a small NUL-terminated buffer.
 *
 * This chapter uses vsnprintf() and va_list, so ds4.c must include
 * <stdarg.h> alongside the other standard headers.
 */

enum json_kind { JSON_NULL, JSON_FALSE, JSON_TRUE, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT };

struct json {
    enum json_kind kind;
    double number;            /* JSON_NUMBER */
    char *string; size_t len; /* JSON_STRING: decoded UTF-8, NUL-terminated, len excludes NUL (may contain \u0000) */
    struct json *items;       /* JSON_ARRAY elements / JSON_OBJECT values, count of them: */
    char **keys; size_t *key_lens; /* JSON_OBJECT keys (decoded, NUL-terminated), parallel to items */
    size_t count;
};

/* The reader recurses through json_parse_value() once per nesting level,
 * about 180 bytes of stack per level with gcc -O2 on x86-64. 256 levels
 * (under 100 KB) stay well below the 512 KB that macOS gives a secondary
 * thread, and no real request nests that deep. */
#define JSON_DEPTH_CEILING 256

/* The longest number token we hand to strtod(). Seventeen significant
 * digits identify any double; the rest of the budget is for zeros and the
 * exponent, e.g. 0.000...0001 written out in full. */
#define JSON_NUMBER_MAX_CHARS 256

/* Arena chunks start at 64 KB and double up to 16 MB, so a small request
 * body costs one chunk and a 6 MB vector file (19 MB of nodes) ten. */
#define JSON_CHUNK_FIRST (64 * 1024)
#define JSON_CHUNK_LARGEST (16 * 1024 * 1024)

/* Initial entries in each pending stack (see "HOW CONTAINERS ARE BUILT"). */
#define JSON_STACK_FIRST 256

/* ---- The arena ------------------------------------------------------------ */

/* An arena is a list of chunks; allocation bumps `used` in the newest chunk
 * and opens a new chunk when it is full. Nothing is freed on its own: the
 * whole list goes at once. Every size is rounded up to 8 bytes so that the
 * doubles and pointers inside `struct json` stay aligned (malloc() aligns the
 * chunk, and the header below is 24 bytes, itself a multiple of 8).
 *
 *     chunk:  [ next | used | cap ][ data: used bytes in use ... cap bytes ]
 */
struct json_chunk {
    struct json_chunk *next;
    size_t used, cap;
};

struct json_arena {
    struct json_chunk *newest;
    size_t next_cap;
};

static void json_arena_free(struct json_chunk *chunk) {
    while (chunk) {
        struct json_chunk *next = chunk->next;
        free(chunk);
        chunk = next;
    }
}

static struct json_chunk *json_arena_grow(struct json_arena *a, size_t need) {
    size_t cap = a->next_cap > need ? a->next_cap : need;
    if (cap > SIZE_MAX - sizeof(struct json_chunk)) return NULL;
    struct json_chunk *chunk = malloc(sizeof(*chunk) + cap);
    if (chunk == NULL) return NULL;
    chunk->next = a->newest;
    chunk->used = 0;
    chunk->cap = cap;
    a->newest = chunk;
    if (a->next_cap < JSON_CHUNK_LARGEST) a->next_cap *= 2;
    return chunk;
}

static void *json_arena_alloc(struct json_arena *a, size_t size) {
    if (size > SIZE_MAX - 7) return NULL;
    size = (size + 7) & ~(size_t)7;
    struct json_chunk *chunk = a->newest;
    if (chunk == NULL || chunk->cap - chunk->used < size) {
        chunk = json_arena_grow(a, size);
        if (chunk == NULL) return NULL;
    }
    void *p = (char *)(chunk + 1) + chunk->used;
    chunk->used += size;
    return p;
}

/* What json_parse() hands out is the address of `root`. Because `root` is the
 * first member, json_free() can turn that address back into the document
 * and find the arena (C11 §6.7.2.1: a pointer to a struct, suitably
 * converted, points to its first member, and back). */
struct json_document {
    struct json root;
    struct json_chunk *chunks;
};

/* ---- The reader's state and its errors ------------------------------------ */

/* HOW CONTAINERS ARE BUILT. When the reader meets `[`, it cannot know how many
 * elements follow, and it does not want to scan ahead (that would make
 * nested input quadratic). So elements are pushed on one growable stack
 * shared by the whole parse; when `]` arrives, the top `count` entries are
 * copied into an exactly-sized array in the arena and popped. A nested array
 * pushes and pops above its parent's entries and leaves the stack as it
 * found it. Objects do the same with a second, parallel stack for keys.
 * Each value is copied twice in total, so the work stays linear. */
struct json_parser {
    const char *text;
    size_t len;
    size_t pos;                  /* next byte to read */
    int depth, max_depth;        /* open containers, and how many are allowed */
    struct json_arena arena;
    struct json *values;         /* [values_cap] pending container elements */
    size_t values_len, values_cap;
    char **keys;                 /* [keys_cap] pending object keys ... */
    size_t *key_lens;            /* ... and their lengths */
    size_t keys_len, keys_cap;
    char *err;
    size_t errlen;
    bool failed;
};

/* Record the first error, with its byte offset, and return false so callers
 * can write `return json_fail(...)`. Later errors are consequences of the
 * first one and are dropped. */
static bool json_fail(struct json_parser *p, size_t at, const char *fmt, ...) {
    if (!p->failed && p->err != NULL && p->errlen > 0) {
        char what[160];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(what, sizeof(what), fmt, ap);
        va_end(ap);
        snprintf(p->err, p->errlen, "JSON error at byte %zu: %s", at, what);
    }
    p->failed = true;
    return false;
}

/* "expected X, found Y", where Y is the byte at the current position,
 * shown as a character when it is printable. */
static bool json_fail_expected(struct json_parser *p, const char *expected) {
    if (p->pos >= p->len)
        return json_fail(p, p->pos, "expected %s, found end of input", expected);
    unsigned char c = (unsigned char)p->text[p->pos];
    if (c >= 0x20 && c < 0x7f)
        return json_fail(p, p->pos, "expected %s, found '%c'", expected, c);
    return json_fail(p, p->pos, "expected %s, found byte 0x%02x", expected, c);
}

static bool json_out_of_memory(struct json_parser *p) {
    return json_fail(p, p->pos, "out of memory");
}

/* The next byte, or -1 at the end of the input. */
static int json_peek(const struct json_parser *p) {
    return p->pos < p->len ? (unsigned char)p->text[p->pos] : -1;
}

/* RFC 8259 whitespace is exactly these four bytes. */
static void json_skip_space(struct json_parser *p) {
    while (p->pos < p->len) {
        char c = p->text[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

/* ---- Growing the pending stacks ------------------------------------------- */

/* The stacks start with JSON_STACK_FIRST entries (allocated by json_parse(),
 * so they are never NULL) and double when full. They are bounded by the
 * input length (every pending element consumed at least one byte), so the
 * doubling cannot overflow for any input that fits in memory; the check is
 * belt and braces. Returns the grown array, or NULL with `data` untouched. */
static void *json_grow(void *data, size_t cap, size_t elem_size) {
    if (cap > SIZE_MAX / 2 / elem_size) return NULL;
    return realloc(data, cap * 2 * elem_size);
}

static bool json_push_value(struct json_parser *p, const struct json *v) {
    if (p->values_len == p->values_cap) {
        struct json *grown = json_grow(p->values, p->values_cap, sizeof(struct json));
        if (grown == NULL) return json_out_of_memory(p);
        p->values = grown;
        p->values_cap *= 2;
    }
    p->values[p->values_len++] = *v;
    return true;
}

/* The key stack is two arrays (pointers and lengths) grown in step. If the
 * second realloc() fails, the first array is merely larger than needed. */
static bool json_push_key(struct json_parser *p, char *key, size_t key_len) {
    if (p->keys_len == p->keys_cap) {
        char **keys = json_grow(p->keys, p->keys_cap, sizeof(char *));
        if (keys == NULL) return json_out_of_memory(p);
        p->keys = keys;
        size_t *lens = json_grow(p->key_lens, p->keys_cap, sizeof(size_t));
        if (lens == NULL) return json_out_of_memory(p);
        p->key_lens = lens;
        p->keys_cap *= 2;
    }
    p->keys[p->keys_len] = key;
    p->key_lens[p->keys_len] = key_len;
    p->keys_len++;
    return true;
}

/* Copy `n` elements from the top of a pending stack into the arena. An empty
 * container gets NULL, so callers must look at `count`, not at the pointer. */
static void *json_arena_copy(struct json_parser *p, const void *src, size_t n, size_t elem_size) {
    if (n == 0) return NULL;
    void *dst = json_arena_alloc(&p->arena, n * elem_size);
    if (dst != NULL) memcpy(dst, src, n * elem_size);
    return dst;
}

/* ---- UTF-8 ---------------------------------------------------------------- */

/* The length of the well-formed UTF-8 sequence at s[0..avail), or 0 if the
 * bytes there are not one. This is table 3-7 of the Unicode standard, which
 * excludes overlong forms (C0, C1, E0 80..9F, F0 80..8F), the UTF-16
 * surrogates (ED A0..BF) and code points above U+10FFFF (F4 90.., F5..FF):
 *
 *     U+0000..U+007F      00..7F
 *     U+0080..U+07FF      C2..DF  80..BF
 *     U+0800..U+0FFF      E0      A0..BF  80..BF
 *     U+1000..U+CFFF      E1..EC  80..BF  80..BF
 *     U+D000..U+D7FF      ED      80..9F  80..BF
 *     U+E000..U+FFFF      EE..EF  80..BF  80..BF
 *     U+10000..U+3FFFF    F0      90..BF  80..BF  80..BF
 *     U+40000..U+FFFFF    F1..F3  80..BF  80..BF  80..BF
 *     U+100000..U+10FFFF  F4      80..8F  80..BF  80..BF
 *
 * Only the second byte has a lead-dependent range; the others are always
 * 80..BF. The reader uses this to reject bad input, the writer to replace
 * bad bytes with U+FFFD. */
static size_t json_utf8_length(const unsigned char *s, size_t avail) {
    unsigned char lead = s[0], lo = 0x80, hi = 0xBF;
    size_t need;
    if (lead < 0x80) return 1;
    else if (lead >= 0xC2 && lead <= 0xDF) need = 2;
    else if (lead == 0xE0) { need = 3; lo = 0xA0; }
    else if (lead == 0xED) { need = 3; hi = 0x9F; }
    else if (lead >= 0xE1 && lead <= 0xEF) need = 3;
    else if (lead == 0xF0) { need = 4; lo = 0x90; }
    else if (lead >= 0xF1 && lead <= 0xF3) need = 4;
    else if (lead == 0xF4) { need = 4; hi = 0x8F; }
    else return 0;
    if (avail < need || s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < need; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return need;
}

/* Encode one code point (at most U+10FFFF, never a surrogate) and return the
 * number of bytes written, 1 to 4. */
static size_t json_utf8_encode(char *out, uint32_t cp) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* ---- Strings -------------------------------------------------------------- */

/* A string is read in two passes over the same bytes. The first finds the
 * closing quote (skipping the byte after every backslash), which bounds the
 * second pass and sizes the output: decoding never makes a string longer,
 * because every escape is at least as long as what it stands for:
 *
 *     \n        2 bytes  ->  1 byte
 *     \u00e9    6 bytes  ->  2 bytes (C3 A9)
 *     \ud83d\ude00  12   ->  4 bytes (F0 9F 98 80)
 *     \ud800    6 bytes  ->  3 bytes (U+FFFD, a lone surrogate)
 *
 * Returns the offset of the closing quote, or p->len if there is none. */
static size_t json_string_end(const struct json_parser *p, size_t from) {
    size_t i = from;
    while (i < p->len) {
        char c = p->text[i];
        if (c == '"') return i;
        i += (c == '\\') ? 2 : 1;
    }
    return p->len;
}

/* Four hex digits as a number 0..0xFFFF, or -1 if any is not a hex digit. */
static long json_hex4(const char *s) {
    long v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        int d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return -1;
        v = v * 16 + d;
    }
    return v;
}

/* If a `\uDC00`..`\uDFFF` escape starts at `at` (before `end`), its value;
 * otherwise -1. */
static long json_low_surrogate_at(const struct json_parser *p, size_t at, size_t end) {
    if (end - at < 6 || p->text[at] != '\\' || p->text[at + 1] != 'u') return -1;
    long lo = json_hex4(p->text + at + 2);
    return (lo >= 0xDC00 && lo <= 0xDFFF) ? lo : -1;
}

/* `\uXXXX`. Characters outside the Basic Multilingual Plane arrive as a
 * UTF-16 surrogate pair, a high half D800..DBFF then a low half DC00..DFFF:
 *
 *     cp = 0x10000 + (high - 0xD800) * 0x400 + (low - 0xDC00)
 *
 * A half without its partner cannot be written in UTF-8 at all. Rejecting it
 * would refuse text that JavaScript produces when it cuts a string in the
 * middle of an emoji, so instead the half becomes U+FFFD, the replacement
 * character, and whatever followed it is read on its own. */
static bool json_decode_unicode_escape(struct json_parser *p, size_t end, char *dst, size_t *n) {
    size_t at = p->pos;
    long cp = end - at >= 6 ? json_hex4(p->text + at + 2) : -1;
    if (cp < 0) return json_fail(p, at, "\\u must be followed by four hex digits");
    p->pos += 6;
    if (cp >= 0xD800 && cp <= 0xDBFF) {
        long low = json_low_surrogate_at(p, p->pos, end);
        if (low >= 0) {
            cp = 0x10000 + (cp - 0xD800) * 0x400 + (low - 0xDC00);
            p->pos += 6;
        } else {
            cp = 0xFFFD;
        }
    } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
        cp = 0xFFFD;
    }
    *n += json_utf8_encode(dst + *n, (uint32_t)cp);
    return true;
}

/* One backslash escape. The first pass guarantees a byte after the
 * backslash before `end`. */
static bool json_decode_escape(struct json_parser *p, size_t end, char *dst, size_t *n) {
    char c;
    switch (p->text[p->pos + 1]) {
    case '"':  c = '"';  break;
    case '\\': c = '\\'; break;
    case '/':  c = '/';  break;
    case 'b':  c = '\b'; break;
    case 'f':  c = '\f'; break;
    case 'n':  c = '\n'; break;
    case 'r':  c = '\r'; break;
    case 't':  c = '\t'; break;
    case 'u':  return json_decode_unicode_escape(p, end, dst, n);
    default:   return json_fail(p, p->pos, "invalid escape sequence");
    }
    dst[(*n)++] = c;
    p->pos += 2;
    return true;
}

/* Raw bytes 80..FF must form well-formed UTF-8; they are copied unchanged.
 * The closing quote is ASCII, so a sequence cut short by it fails the check
 * like one cut short by the end of the input. */
static bool json_copy_utf8(struct json_parser *p, size_t end, char *dst, size_t *n) {
    size_t k = json_utf8_length((const unsigned char *)p->text + p->pos, end - p->pos);
    if (k == 0) return json_fail(p, p->pos, "invalid UTF-8 in string");
    memcpy(dst + *n, p->text + p->pos, k);
    *n += k;
    p->pos += k;
    return true;
}

/* string = '"' *char '"', where a char is an escape, or any well-formed UTF-8
 * except '"', '\' and the control characters 00..1F, which must be escaped. */
static bool json_parse_string(struct json_parser *p, char **out, size_t *out_len) {
    size_t open = p->pos++;
    size_t end = json_string_end(p, p->pos);
    if (end == p->len) return json_fail(p, open, "unterminated string");
    char *dst = json_arena_alloc(&p->arena, end - p->pos + 1);
    if (dst == NULL) return json_out_of_memory(p);
    size_t n = 0;
    while (p->pos < end) {
        unsigned char c = (unsigned char)p->text[p->pos];
        bool ok = true;
        if (c == '\\') ok = json_decode_escape(p, end, dst, &n);
        else if (c < 0x20)
            return json_fail(p, p->pos, "control character 0x%02x in string must be escaped", c);
        else if (c >= 0x80) ok = json_copy_utf8(p, end, dst, &n);
        else { dst[n++] = (char)c; p->pos++; }
        if (!ok) return false;
    }
    p->pos++;
    dst[n] = '\0';
    *out = dst;
    *out_len = n;
    return true;
}

/* ---- Numbers and literals ------------------------------------------------- */

/* The number grammar of RFC 8259 §6, checked byte by byte:
 *
 *     number = [ "-" ] int [ frac ] [ exp ]
 *     int    = "0" / ( digit1-9 *DIGIT )
 *     frac   = "." 1*DIGIT
 *     exp    = ( "e" / "E" ) [ "-" / "+" ] 1*DIGIT
 *
 * So "01", "1.", ".5", "+1", "1e" and "0x10" are all errors, and strtod(),
 * which would accept most of them, only sees what passed. */
static bool json_is_digit(int c) {
    return c >= '0' && c <= '9';
}

static bool json_skip_digits(struct json_parser *p) {
    size_t start = p->pos;
    while (json_is_digit(json_peek(p))) p->pos++;
    return p->pos > start;
}

static bool json_scan_number(struct json_parser *p) {
    if (json_peek(p) == '-') p->pos++;
    if (json_peek(p) == '0') {
        p->pos++;
        if (json_is_digit(json_peek(p)))
            return json_fail(p, p->pos - 1, "leading zeros are not allowed");
    } else if (!json_skip_digits(p)) {
        return json_fail_expected(p, "a digit");
    }
    if (json_peek(p) == '.') {
        p->pos++;
        if (!json_skip_digits(p)) return json_fail_expected(p, "a digit after '.'");
    }
    if (json_peek(p) == 'e' || json_peek(p) == 'E') {
        p->pos++;
        if (json_peek(p) == '+' || json_peek(p) == '-') p->pos++;
        if (!json_skip_digits(p)) return json_fail_expected(p, "a digit in the exponent");
    }
    return true;
}

static bool json_parse_number(struct json_parser *p, struct json *out) {
    size_t start = p->pos;
    if (!json_scan_number(p)) return false;
    size_t n = p->pos - start;
    if (n > JSON_NUMBER_MAX_CHARS)
        return json_fail(p, start, "number longer than %d characters", JSON_NUMBER_MAX_CHARS);
    char copy[JSON_NUMBER_MAX_CHARS + 1];
    memcpy(copy, p->text + start, n);
    copy[n] = '\0';
    double v = strtod(copy, NULL);
    if (isinf(v)) return json_fail(p, start, "number out of range for a double");
    out->kind = JSON_NUMBER;
    out->number = v;
    return true;
}

static bool json_parse_literal(struct json_parser *p, const char *word, enum json_kind kind,
                               struct json *out) {
    size_t n = strlen(word);
    if (p->len - p->pos < n || memcmp(p->text + p->pos, word, n) != 0)
        return json_fail(p, p->pos, "invalid literal, expected '%s'", word);
    p->pos += n;
    out->kind = kind;
    return true;
}

/* ---- Arrays, objects, values ---------------------------------------------- */

/* The three functions below call each other, which is the one place this
 * chapter needs a forward declaration. */
static bool json_parse_value(struct json_parser *p, struct json *out);

static bool json_enter(struct json_parser *p) {
    if (p->depth >= p->max_depth)
        return json_fail(p, p->pos, "nesting deeper than %d levels", p->max_depth);
    p->depth++;
    return true;
}

/* After an element: ',' means another one follows, `close` ends the
 * container. Returns 1 to continue, 0 when closed, -1 on error. */
static int json_after_element(struct json_parser *p, char close, const char *expected) {
    json_skip_space(p);
    int c = json_peek(p);
    if (c == ',' || c == close) {
        p->pos++;
        return c == ',';
    }
    json_fail_expected(p, expected);
    return -1;
}

/* array = '[' [ value *( ',' value ) ] ']' */
static bool json_parse_array(struct json_parser *p, struct json *out) {
    if (!json_enter(p)) return false;
    p->pos++;
    size_t base = p->values_len;
    json_skip_space(p);
    int more = 1;
    if (json_peek(p) == ']') {
        p->pos++;
        more = 0;
    }
    while (more == 1) {
        struct json item;
        if (!json_parse_value(p, &item) || !json_push_value(p, &item)) return false;
        more = json_after_element(p, ']', "',' or ']'");
    }
    if (more < 0) return false;
    out->kind = JSON_ARRAY;
    out->count = p->values_len - base;
    out->items = json_arena_copy(p, p->values + base, out->count, sizeof(struct json));
    p->values_len = base;
    p->depth--;
    return out->count == 0 || out->items != NULL || json_out_of_memory(p);
}

/* member = string ':' value. The key goes on the key stack only after its
 * value is read, so that a nested object's keys come and go in between. */
static bool json_parse_member(struct json_parser *p) {
    char *key;
    size_t key_len;
    struct json value;
    json_skip_space(p);
    if (json_peek(p) != '"') return json_fail_expected(p, "a string key");
    if (!json_parse_string(p, &key, &key_len)) return false;
    json_skip_space(p);
    if (json_peek(p) != ':') return json_fail_expected(p, "':'");
    p->pos++;
    if (!json_parse_value(p, &value)) return false;
    return json_push_key(p, key, key_len) && json_push_value(p, &value);
}

/* Pop the top `count` keys and values into the arena. */
static bool json_finish_object(struct json_parser *p, size_t key_base, size_t value_base,
                               struct json *out) {
    size_t count = p->keys_len - key_base;
    out->kind = JSON_OBJECT;
    out->count = count;
    out->items = json_arena_copy(p, p->values + value_base, count, sizeof(struct json));
    out->keys = json_arena_copy(p, p->keys + key_base, count, sizeof(char *));
    out->key_lens = json_arena_copy(p, p->key_lens + key_base, count, sizeof(size_t));
    p->values_len = value_base;
    p->keys_len = key_base;
    if (count > 0 && (out->items == NULL || out->keys == NULL || out->key_lens == NULL))
        return json_out_of_memory(p);
    return true;
}

/* object = '{' [ member *( ',' member ) ] '}' */
static bool json_parse_object(struct json_parser *p, struct json *out) {
    if (!json_enter(p)) return false;
    p->pos++;
    size_t key_base = p->keys_len, value_base = p->values_len;
    json_skip_space(p);
    int more = 1;
    if (json_peek(p) == '}') {
        p->pos++;
        more = 0;
    }
    while (more == 1) {
        if (!json_parse_member(p)) return false;
        more = json_after_element(p, '}', "',' or '}'");
    }
    if (more < 0) return false;
    p->depth--;
    return json_finish_object(p, key_base, value_base, out);
}

/* value = object / array / string / number / true / false / null,
 * with optional whitespace before it. The first byte decides which. */
static bool json_parse_value(struct json_parser *p, struct json *out) {
    memset(out, 0, sizeof(*out));
    json_skip_space(p);
    int c = json_peek(p);
    switch (c) {
    case '{': return json_parse_object(p, out);
    case '[': return json_parse_array(p, out);
    case '"':
        out->kind = JSON_STRING;
        return json_parse_string(p, &out->string, &out->len);
    case 't': return json_parse_literal(p, "true", JSON_TRUE, out);
    case 'f': return json_parse_literal(p, "false", JSON_FALSE, out);
    case 'n': return json_parse_literal(p, "null", JSON_NULL, out);
    default:
        if (c == '-' || json_is_digit(c)) return json_parse_number(p, out);
        return json_fail_expected(p, "a value");
    }
}

/* ---- The reader's entry points --------------------------------------------- */

/* After the value only whitespace may follow: "[1] [2]" is an error, not
 * two documents. */
static bool json_parse_end(struct json_parser *p) {
    json_skip_space(p);
    return p->pos == p->len || json_fail_expected(p, "end of input after the value");
}

/* Parse text[0..len): one value, optionally surrounded by whitespace, and
 * nothing else. Returns the root of a tree to be released with json_free(),
 * or NULL with a one-line message in err (which may be NULL). A max_depth of
 * 0 accepts only scalars at the top. */
static struct json *json_parse(const char *text, size_t len, int max_depth, char *err, size_t errlen) {
    struct json_parser p = {0};
    p.text = text;
    p.len = len;
    p.max_depth = max_depth < 0 ? 0 : max_depth;
    if (p.max_depth > JSON_DEPTH_CEILING) p.max_depth = JSON_DEPTH_CEILING;
    p.arena.next_cap = JSON_CHUNK_FIRST;
    p.err = err;
    p.errlen = errlen;
    p.values_cap = p.keys_cap = JSON_STACK_FIRST;
    p.values = malloc(JSON_STACK_FIRST * sizeof(struct json));
    p.keys = malloc(JSON_STACK_FIRST * sizeof(char *));
    p.key_lens = malloc(JSON_STACK_FIRST * sizeof(size_t));

    struct json_document *doc = malloc(sizeof(*doc));
    bool ok;
    if (doc == NULL || p.values == NULL || p.keys == NULL || p.key_lens == NULL)
        ok = json_out_of_memory(&p);
    else
        ok = json_parse_value(&p, &doc->root) && json_parse_end(&p);
    free(p.values);
    free(p.keys);
    free(p.key_lens);
    if (!ok) {
        json_arena_free(p.arena.newest);
        free(doc);
        return NULL;
    }
    doc->chunks = p.arena.newest;
    if (err != NULL && errlen > 0) err[0] = '\0';
    return &doc->root;
}

/* Release a whole tree. Only the root from json_parse() may be passed. */
static void json_free(struct json *j) {
    if (j == NULL) return;
    struct json_document *doc = (struct json_document *)j;
    json_arena_free(doc->chunks);
    free(doc);
}

/* ---- Looking things up ------------------------------------------------------ */

/* The accessors accept NULL and the wrong kind, and answer NULL or false, so
 * a lookup path can be written in one expression and checked once:
 *
 *     const char *role = json_str(json_at(json_get(req, "messages"), 0), "role");
 */
static bool json_is(const struct json *j, enum json_kind kind) {
    return j != NULL && j->kind == kind;
}

/* The value of the first member named `key` (see "Duplicate keys" above).
 * A linear scan: request objects have a handful of members. */
static const struct json *json_get(const struct json *obj, const char *key) {
    if (!json_is(obj, JSON_OBJECT) || key == NULL) return NULL;
    size_t key_len = strlen(key);
    for (size_t i = 0; i < obj->count; i++)
        if (obj->key_lens[i] == key_len && memcmp(obj->keys[i], key, key_len) == 0)
            return &obj->items[i];
    return NULL;
}

/* Element i of an array (or the i-th member value of an object). */
static const struct json *json_at(const struct json *arr, size_t i) {
    if (!json_is(arr, JSON_ARRAY) && !json_is(arr, JSON_OBJECT)) return NULL;
    return i < arr->count ? &arr->items[i] : NULL;
}

static const char *json_str(const struct json *obj, const char *key) {
    const struct json *v = json_get(obj, key);
    return json_is(v, JSON_STRING) ? v->string : NULL;
}

static bool json_num(const struct json *obj, const char *key, double *out) {
    const struct json *v = json_get(obj, key);
    if (!json_is(v, JSON_NUMBER)) return false;
    *out = v->number;
    return true;
}

/* ---- The output buffer ------------------------------------------------------ */

/* A strbuf is a growable byte string; `{0}` is an empty one. After any
 * successful append, data[len] is '\0', so the text can be printed directly.
 * If memory runs out, `oom` is set and every later append does nothing, so a
 * writer can append freely and check `oom` once at the end. */
struct strbuf { char *data; size_t len, cap; bool oom; };

/* Make room for `extra` more bytes plus the terminating NUL. */
static bool strbuf_reserve(struct strbuf *b, size_t extra) {
    if (b->oom) return false;
    if (b->cap > b->len && b->cap - b->len > extra) return true;
    if (extra > SIZE_MAX / 2 - b->len) {
        b->oom = true;
        return false;
    }
    size_t need = b->len + extra + 1;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need) cap *= 2;
    char *grown = realloc(b->data, cap);
    if (grown == NULL) {
        b->oom = true;
        return false;
    }
    b->data = grown;
    b->cap = cap;
    return true;
}

static void strbuf_append(struct strbuf *b, const char *s, size_t n) {
    if (!strbuf_reserve(b, n)) return;
    if (n > 0) memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void strbuf_puts(struct strbuf *b, const char *s) {
    strbuf_append(b, s, strlen(s));
}

/* Formatting happens twice: once to measure, once into the reserved room. */
static void strbuf_printf(struct strbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !strbuf_reserve(b, (size_t)n)) return;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

static void strbuf_free(struct strbuf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
    b->oom = false;
}

/* ---- The writer -------------------------------------------------------------- */

/* The escape for one ASCII byte that cannot appear raw inside a JSON string:
 * the quote, the backslash, and the control characters 00..1F. The five with
 * a short form use it (a chat reply full of `\n` stays readable); the rest
 * become \u00XX. */
static void json_write_escape(struct strbuf *b, unsigned char c) {
    switch (c) {
    case '"':  strbuf_append(b, "\\\"", 2); break;
    case '\\': strbuf_append(b, "\\\\", 2); break;
    case '\b': strbuf_append(b, "\\b", 2); break;
    case '\f': strbuf_append(b, "\\f", 2); break;
    case '\n': strbuf_append(b, "\\n", 2); break;
    case '\r': strbuf_append(b, "\\r", 2); break;
    case '\t': strbuf_append(b, "\\t", 2); break;
    default:   strbuf_printf(b, "\\u%04x", c); break;
    }
}

/* Write s[0..n) as a quoted JSON string. Text generated by the model can be
 * cut in the middle of a UTF-8 sequence, so the writer never trusts its
 * input: each byte that does not start a well-formed sequence becomes U+FFFD
 * and the output is always valid JSON. Bytes that need no change are
 * gathered into runs and appended with one copy per run. */
static void json_write_string(struct strbuf *b, const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t run = 0, i = 0;
    strbuf_append(b, "\"", 1);
    while (i < n) {
        unsigned char c = u[i];
        size_t k = (c >= 0x20 && c != '"' && c != '\\') ? json_utf8_length(u + i, n - i) : 0;
        if (k > 0) {
            i += k;
            continue;
        }
        strbuf_append(b, s + run, i - run);
        if (c < 0x80) json_write_escape(b, c);
        else strbuf_append(b, "\xEF\xBF\xBD", 3);
        run = ++i;
    }
    strbuf_append(b, s + run, i - run);
    strbuf_append(b, "\"", 1);
}

/* Numbers. JSON has no NaN or infinity, so those become `null`. Integral
 * values below 1e16 (beyond 2^53 ~ 9.007e15 not every integer is a double
 * anyway) print as integers: `3`, not `3.0` or `3e+00`. Everything else tries
 * 15, 16, then 17 significant digits and keeps the first that reads back as
 * the same double; 17 always does [IEEE 754-2008 §5.12.2]. This is not the
 * shortest form in every case (that needs Ryu or Grisu), but it is short for
 * the values people type and exact for all of them. */
static void json_write_number(struct strbuf *b, double v) {
    char text[40];
    if (!isfinite(v)) {
        strbuf_puts(b, "null");
        return;
    }
    if (v == floor(v) && fabs(v) < 1e16) {
        snprintf(text, sizeof(text), "%.0f", v);
    } else {
        for (int digits = 15; digits <= 17; digits++) {
            snprintf(text, sizeof(text), "%.*g", digits, v);
            if (strtod(text, NULL) == v) break;
        }
    }
    strbuf_puts(b, text);
}

/* Serialize a tree compactly: no spaces, no newlines. */
static void json_write(struct strbuf *b, const struct json *j) {
    if (j == NULL) {
        strbuf_puts(b, "null");
        return;
    }
    switch (j->kind) {
    case JSON_NULL:   strbuf_puts(b, "null"); break;
    case JSON_FALSE:  strbuf_puts(b, "false"); break;
    case JSON_TRUE:   strbuf_puts(b, "true"); break;
    case JSON_NUMBER: json_write_number(b, j->number); break;
    case JSON_STRING: json_write_string(b, j->string, j->len); break;
    case JSON_ARRAY:
        strbuf_append(b, "[", 1);
        for (size_t i = 0; i < j->count; i++) {
            if (i > 0) strbuf_append(b, ",", 1);
            json_write(b, &j->items[i]);
        }
        strbuf_append(b, "]", 1);
        break;
    case JSON_OBJECT:
        strbuf_append(b, "{", 1);
        for (size_t i = 0; i < j->count; i++) {
            if (i > 0) strbuf_append(b, ",", 1);
            json_write_string(b, j->keys[i], j->key_lens[i]);
            strbuf_append(b, ":", 1);
            json_write(b, &j->items[i]);
        }
        strbuf_append(b, "}", 1);
        break;
    }
}
