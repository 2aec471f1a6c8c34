/* ds4.c -- a small inference engine for one model: DeepSeek V4 Flash.
 *
 * This file is meant to be read from top to bottom, like a book. It follows
 * the data as it flows through the engine:
 *
 *   1. The ground floor: errors, clocks, memory, a thread pool.
 *   2. GGUF: the bytes of the model file, read over mmap with every offset
 *      checked before it is touched.
 *   3. Quant blocks: how a row of weights is packed (F16, Q8_0, Q2_K, Q4_K,
 *      IQ2_XXS, ...) and how we take dot products against it.
 *   4. The model's shape and weights: metadata -> config, tensor names ->
 *      views into the mapped file, every shape validated.
 *   5. Numeric primitives of V4: RMSNorm, interleaved tail RoPE with YaRN,
 *      the FP8 and FP4 round trips, the Hadamard rotation.
 *   6. The forward pass: hyper-connections (mHC) with Sinkhorn, attention
 *      with one shared K=V head, the sliding window, the compressors and the
 *      indexer, the mixture of experts, the output head, the MTP block.
 *   7. Sessions: the state a conversation carries from token to token, and
 *      the one long story function that advances it by a chunk of tokens.
 *   8. Sampling.
 *   9. JSON.
 *  10. Tools built on the engine: the oracle-vector checker and the bench.
 *  11. The command line and main().
 *
 * The CPU path in this file is the source of truth. Every GPU kernel that
 * exists elsewhere mirrors a function here.
 *
 * Two promises this file makes and its tests keep:
 *
 *   - Prefill of N tokens, prefill in chunks of any size, and N single-token
 *     decode steps compute the same logits (up to float summation order).
 *   - Every fast kernel agrees with the scalar reference that defines its
 *     format (up to float summation order).
 *
 * Conventions. A matrix W stored "[out][in]" (GGUF dims [in, out]) maps an
 * input vector x of length in to y[o] = sum_i W[o][i] * x[i]. Positions are
 * 0-based absolute token indices. Activations are float32 throughout.
 */

#define _GNU_SOURCE
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <stdio.h>
#include <stdarg.h>
#include <stdbool.h>
#include <string.h>
#include <math.h>
#include <errno.h>
#include <limits.h>
#include <float.h>
#include <time.h>
#include <pthread.h>
#include <fcntl.h>
#include <unistd.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

/* ============================================================================
 * Chapter 1. The ground floor
 * ============================================================================
 *
 * Errors travel as a small struct that the caller owns. A function that can
 * fail returns false and leaves one line in it; the caller decides whether to
 * print it, wrap it in an HTTP error, or count it as a failed test. Nothing in
 * the engine calls exit() except main() and the out-of-memory path below.
 */

struct ds4_error {
    char msg[512];
};

static bool fail(struct ds4_error *e, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static bool fail(struct ds4_error *e, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return false;
}

/* Running out of memory while holding a half-built model has no sensible
 * recovery, so allocation failures end the process with a clear message. */
static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "ds4: out of memory allocating %zu bytes\n", n);
        exit(1);
    }
    return p;
}

static void *xcalloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) {
        fprintf(stderr, "ds4: out of memory allocating %zu x %zu bytes\n", count, size);
        exit(1);
    }
    return p;
}

static void *xrealloc(void *old, size_t n) {
    void *p = realloc(old, n ? n : 1);
    if (!p) {
        fprintf(stderr, "ds4: out of memory growing a buffer to %zu bytes\n", n);
        exit(1);
    }
    return p;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Read a whole file into memory (NUL-terminated, for text formats). */
static char *read_file(const char *path, size_t *len, struct ds4_error *e) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fail(e, "cannot open %s: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = xmalloc(cap);
    for (;;) {
        if (n + 1 >= cap) buf = xrealloc(buf, cap *= 2);
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        if (got == 0) break;
        n += got;
    }
    bool bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        fail(e, "error reading %s", path);
        return NULL;
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

/* ----------------------------------------------------------------------------
 * A thread pool.
 *
 * Almost all the time of a forward pass goes into "for each output row, take
 * a dot product" and "for each head, attend". Both are embarrassingly
 * parallel, so the pool offers exactly one operation:
 *
 *     parallel_for(pool, n_items, fn, ctx)   calls fn(ctx, i, worker) for
 *                                            every i in [0, n_items)
 *
 * Workers grab items in small batches from a shared atomic counter, so an
 * uneven split (some experts busier than others) balances itself. The
 * calling thread works too, as worker 0. The `worker` index lets a task use
 * per-thread scratch memory without locks.
 * ------------------------------------------------------------------------- */

typedef void (*task_fn)(void *ctx, int64_t item, int worker);

struct thread_pool {
    int n_threads;                 /* including the calling thread */
    pthread_t *threads;
    pthread_mutex_t lock;
    pthread_cond_t work_ready, work_done;
    uint64_t generation;           /* bumped for each parallel_for */
    int busy_workers;
    bool quit;
    /* The job being run. */
    task_fn fn;
    void *ctx;
    int64_t n_items, batch;
    int64_t next_item;             /* atomic */
};

struct worker_arg {
    struct thread_pool *pool;
    int index;
};

static void pool_run_items(struct thread_pool *pool, int worker) {
    for (;;) {
        int64_t start = __atomic_fetch_add(&pool->next_item, pool->batch, __ATOMIC_RELAXED);
        if (start >= pool->n_items) return;
        int64_t end = start + pool->batch;
        if (end > pool->n_items) end = pool->n_items;
        for (int64_t i = start; i < end; i++) pool->fn(pool->ctx, i, worker);
    }
}

static void *pool_worker_main(void *arg) {
    struct worker_arg *wa = arg;
    struct thread_pool *pool = wa->pool;
    uint64_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&pool->lock);
        while (!pool->quit && pool->generation == seen)
            pthread_cond_wait(&pool->work_ready, &pool->lock);
        if (pool->quit) {
            pthread_mutex_unlock(&pool->lock);
            break;
        }
        seen = pool->generation;
        pthread_mutex_unlock(&pool->lock);

        pool_run_items(pool, wa->index);

        pthread_mutex_lock(&pool->lock);
        if (--pool->busy_workers == 0) pthread_cond_signal(&pool->work_done);
        pthread_mutex_unlock(&pool->lock);
    }
    free(wa);
    return NULL;
}

static void pool_init(struct thread_pool *pool, int n_threads) {
    memset(pool, 0, sizeof *pool);
    if (n_threads < 1) n_threads = 1;
    pool->n_threads = n_threads;
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->work_ready, NULL);
    pthread_cond_init(&pool->work_done, NULL);
    pool->threads = xcalloc((size_t)n_threads, sizeof(pthread_t));
    for (int i = 1; i < n_threads; i++) {
        struct worker_arg *wa = xmalloc(sizeof *wa);
        wa->pool = pool;
        wa->index = i;
        if (pthread_create(&pool->threads[i], NULL, pool_worker_main, wa) != 0) {
            fprintf(stderr, "ds4: cannot start worker thread %d\n", i);
            exit(1);
        }
    }
}

static void pool_free(struct thread_pool *pool) {
    pthread_mutex_lock(&pool->lock);
    pool->quit = true;
    pthread_cond_broadcast(&pool->work_ready);
    pthread_mutex_unlock(&pool->lock);
    for (int i = 1; i < pool->n_threads; i++) pthread_join(pool->threads[i], NULL);
    free(pool->threads);
    pthread_mutex_destroy(&pool->lock);
    pthread_cond_destroy(&pool->work_ready);
    pthread_cond_destroy(&pool->work_done);
}

static void parallel_for(struct thread_pool *pool, int64_t n_items, task_fn fn, void *ctx) {
    if (n_items <= 0) return;
    if (pool->n_threads == 1 || n_items == 1) {
        for (int64_t i = 0; i < n_items; i++) fn(ctx, i, 0);
        return;
    }
    /* Batches of ~1/8 of a fair share keep the counter cold and the tail short. */
    int64_t batch = n_items / ((int64_t)pool->n_threads * 8);
    pool->batch = batch < 1 ? 1 : batch;
    pool->fn = fn;
    pool->ctx = ctx;
    pool->n_items = n_items;
    pool->next_item = 0;
    pthread_mutex_lock(&pool->lock);
    pool->busy_workers = pool->n_threads - 1;
    pool->generation++;
    pthread_cond_broadcast(&pool->work_ready);
    pthread_mutex_unlock(&pool->lock);

    pool_run_items(pool, 0);

    pthread_mutex_lock(&pool->lock);
    while (pool->busy_workers > 0) pthread_cond_wait(&pool->work_done, &pool->lock);
    pthread_mutex_unlock(&pool->lock);
}

static int default_thread_count(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    if (n > 256) n = 256;
    return (int)n;
}

/* ============================================================================
 * Chapter 2. GGUF: the model file
 * ============================================================================
 *
 * A GGUF file is a header, a table of metadata key/values, a directory of
 * tensors, and then the tensor bytes. All integers are little-endian.
 *
 *   offset  field
 *   ------  -----------------------------------------------------------
 *   0       u32 magic "GGUF" (0x46554747)
 *   4       u32 version (we accept 3)
 *   8       u64 tensor count
 *   16      u64 metadata count
 *   24      metadata:  { string key; u32 value_type; value }  x count
 *   ...     tensors:   { string name; u32 n_dims; u64 dims[n_dims];
 *                        u32 type; u64 offset }               x count
 *   ...     padding to general.alignment (default 32)
 *   data    tensor bytes; each tensor at data + offset
 *
 * A string is { u64 length; bytes } with no terminator. An array value is
 * { u32 item_type; u64 count; items }, and arrays may nest.
 *
 *   value types: 0 u8   1 i8   2 u16  3 i16  4 u32  5 i32  6 f32  7 bool
 *                8 string      9 array       10 u64 11 i64 12 f64
 *
 * We mmap the whole file read-only and never copy a weight. The reader walks
 * the header once with a cursor that refuses to step past the end of the
 * file, and remembers where each value and each tensor lives. A file that is
 * truncated, lies about its counts or points outside itself produces one line
 * naming the field, never a crash: model files come from the internet.
 * ------------------------------------------------------------------------- */

enum gguf_value_type {
    GGUF_U8 = 0, GGUF_I8 = 1, GGUF_U16 = 2, GGUF_I16 = 3, GGUF_U32 = 4, GGUF_I32 = 5,
    GGUF_F32 = 6, GGUF_BOOL = 7, GGUF_STRING = 8, GGUF_ARRAY = 9, GGUF_U64 = 10,
    GGUF_I64 = 11, GGUF_F64 = 12, GGUF_TYPE_COUNT
};

#define GGUF_MAGIC 0x46554747u
#define GGUF_MAX_DIMS 8
#define GGUF_MAX_ARRAY_DEPTH 8

struct gguf_kv {
    const char *key;            /* points into the map; not NUL-terminated */
    uint64_t key_len;
    uint32_t type;
    const uint8_t *value;       /* the encoded value, right after the type */
};

struct gguf_tensor {
    const char *name;           /* points into the map; not NUL-terminated */
    uint64_t name_len;
    uint32_t n_dims;
    uint64_t dims[GGUF_MAX_DIMS];   /* dims[0] is the fastest-varying (row length) */
    uint32_t type;
    uint64_t offset;            /* relative to the data section */
    uint64_t n_elements;
    uint64_t n_bytes;
    const uint8_t *data;
};

struct gguf {
    char path[1024];
    const uint8_t *map;
    uint64_t size;
    uint32_t version;
    uint64_t n_kv, n_tensors;
    struct gguf_kv *kvs;
    struct gguf_tensor *tensors;
    uint64_t alignment;
    uint64_t data_offset;
};

/* A cursor over the mapped bytes. Every read checks the remaining length
 * first; after the first failure the cursor stays failed and reads return 0,
 * so parsing code can read a whole record and check once. */
struct cursor {
    const uint8_t *base;
    uint64_t pos, size;
    bool failed;
};

static bool cursor_need(struct cursor *c, uint64_t n) {
    if (c->failed || n > c->size - c->pos) {
        c->failed = true;
        return false;
    }
    return true;
}

static uint64_t cursor_uint(struct cursor *c, int bytes) {
    if (!cursor_need(c, (uint64_t)bytes)) return 0;
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++) v |= (uint64_t)c->base[c->pos + i] << (8 * i);
    c->pos += (uint64_t)bytes;
    return v;
}

static uint32_t cursor_u32(struct cursor *c) { return (uint32_t)cursor_uint(c, 4); }
static uint64_t cursor_u64(struct cursor *c) { return cursor_uint(c, 8); }

static const char *cursor_string(struct cursor *c, uint64_t *len) {
    *len = cursor_u64(c);
    if (!cursor_need(c, *len)) return NULL;
    const char *s = (const char *)c->base + c->pos;
    c->pos += *len;
    return s;
}

static int gguf_scalar_size(uint32_t type) {
    switch (type) {
    case GGUF_U8: case GGUF_I8: case GGUF_BOOL: return 1;
    case GGUF_U16: case GGUF_I16: return 2;
    case GGUF_U32: case GGUF_I32: case GGUF_F32: return 4;
    case GGUF_U64: case GGUF_I64: case GGUF_F64: return 8;
    default: return 0;
    }
}

/* Step over one value of the given type, arrays included. The depth guard
 * stops a file that nests arrays a million deep from eating the stack. */
static bool gguf_skip_value(struct cursor *c, uint32_t type, int depth) {
    if (type == GGUF_STRING) {
        uint64_t len;
        cursor_string(c, &len);
        return !c->failed;
    }
    if (type == GGUF_ARRAY) {
        if (depth >= GGUF_MAX_ARRAY_DEPTH) return false;
        uint32_t item_type = cursor_u32(c);
        uint64_t count = cursor_u64(c);
        if (c->failed || item_type >= GGUF_TYPE_COUNT) return false;
        int size = gguf_scalar_size(item_type);
        if (size > 0) {
            if (count > (c->size - c->pos) / (uint64_t)size) return false;
            c->pos += count * (uint64_t)size;
            return true;
        }
        /* Each variable-size item takes at least 8 bytes (a length or a
         * header), so a count larger than that bound is a lie. */
        if (count > (c->size - c->pos) / 8) return false;
        for (uint64_t i = 0; i < count; i++)
            if (!gguf_skip_value(c, item_type, depth + 1)) return false;
        return true;
    }
    int size = gguf_scalar_size(type);
    if (size == 0) return false;
    return cursor_need(c, (uint64_t)size) && (c->pos += (uint64_t)size, true);
}

static void gguf_close(struct gguf *g) {
    if (g->map) munmap((void *)g->map, g->size);
    free(g->kvs);
    free(g->tensors);
    memset(g, 0, sizeof *g);
}

static bool gguf_map_file(struct gguf *g, const char *path, struct ds4_error *e) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return fail(e, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return fail(e, "%s: not a regular file", path);
    }
    if (st.st_size < 24) {
        close(fd);
        return fail(e, "%s: file is %lld bytes, too short for a GGUF header", path,
                    (long long)st.st_size);
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return fail(e, "%s: mmap failed: %s", path, strerror(errno));
    g->map = map;
    g->size = (uint64_t)st.st_size;
    snprintf(g->path, sizeof g->path, "%s", path);
    return true;
}

static bool gguf_read_kvs(struct gguf *g, struct cursor *c, struct ds4_error *e) {
    /* Each KV takes at least 12 bytes, which bounds an honest count. */
    if (g->n_kv > g->size / 12)
        return fail(e, "%s: metadata count %llu is impossible for a %llu-byte file", g->path,
                    (unsigned long long)g->n_kv, (unsigned long long)g->size);
    g->kvs = xcalloc(g->n_kv, sizeof *g->kvs);
    for (uint64_t i = 0; i < g->n_kv; i++) {
        struct gguf_kv *kv = &g->kvs[i];
        kv->key = cursor_string(c, &kv->key_len);
        kv->type = cursor_u32(c);
        if (c->failed) return fail(e, "%s: truncated in metadata entry #%llu", g->path,
                                   (unsigned long long)i);
        if (kv->type >= GGUF_TYPE_COUNT)
            return fail(e, "%s: metadata '%.*s' has unknown value type %u", g->path,
                        (int)kv->key_len, kv->key, kv->type);
        kv->value = c->base + c->pos;
        if (!gguf_skip_value(c, kv->type, 0))
            return fail(e, "%s: metadata '%.*s' is truncated or malformed", g->path,
                        (int)kv->key_len, kv->key);
    }
    return true;
}

static bool gguf_read_tensor_entry(struct gguf *g, struct cursor *c, struct gguf_tensor *t,
                                   uint64_t index, struct ds4_error *e) {
    t->name = cursor_string(c, &t->name_len);
    t->n_dims = cursor_u32(c);
    if (c->failed) return fail(e, "%s: truncated in tensor entry #%llu", g->path,
                               (unsigned long long)index);
    if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS)
        return fail(e, "%s: tensor '%.*s' has %u dims (1..%d allowed)", g->path,
                    (int)t->name_len, t->name, t->n_dims, GGUF_MAX_DIMS);
    t->n_elements = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        t->dims[d] = cursor_u64(c);
        if (t->dims[d] == 0 || t->dims[d] > (1ull << 40) ||
            t->n_elements > (1ull << 46) / t->dims[d])
            return fail(e, "%s: tensor '%.*s' has an absurd dimension %llu", g->path,
                        (int)t->name_len, t->name, (unsigned long long)t->dims[d]);
        t->n_elements *= t->dims[d];
    }
    t->type = cursor_u32(c);
    t->offset = cursor_u64(c);
    if (c->failed) return fail(e, "%s: truncated in tensor entry '%.*s'", g->path,
                               (int)t->name_len, t->name);
    return true;
}

/* forward: defined with the quant blocks in chapter 3 */
static uint64_t tensor_bytes_for(uint32_t type, uint64_t n_elements, uint64_t row_len,
                                 bool *ok);

static bool gguf_place_tensor(struct gguf *g, struct gguf_tensor *t, struct ds4_error *e) {
    bool ok;
    t->n_bytes = tensor_bytes_for(t->type, t->n_elements, t->dims[0], &ok);
    if (!ok)
        return fail(e, "%s: tensor '%.*s' has unsupported type %u or a row length %llu that "
                    "is not a whole number of blocks", g->path, (int)t->name_len, t->name,
                    t->type, (unsigned long long)t->dims[0]);
    uint64_t avail = g->size - g->data_offset;
    if (t->offset > avail || t->n_bytes > avail - t->offset)
        return fail(e, "%s: tensor '%.*s' (%llu bytes at offset %llu) extends past the end "
                    "of the file", g->path, (int)t->name_len, t->name,
                    (unsigned long long)t->n_bytes, (unsigned long long)t->offset);
    if (t->offset % g->alignment != 0)
        return fail(e, "%s: tensor '%.*s' offset %llu is not aligned to %llu", g->path,
                    (int)t->name_len, t->name, (unsigned long long)t->offset,
                    (unsigned long long)g->alignment);
    t->data = g->map + g->data_offset + t->offset;
    return true;
}

static const struct gguf_kv *gguf_find_kv(const struct gguf *g, const char *key) {
    size_t len = strlen(key);
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (g->kvs[i].key_len == len && memcmp(g->kvs[i].key, key, len) == 0) return &g->kvs[i];
    return NULL;
}

static const struct gguf_tensor *gguf_find_tensor(const struct gguf *g, const char *name) {
    size_t len = strlen(name);
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (g->tensors[i].name_len == len && memcmp(g->tensors[i].name, name, len) == 0)
            return &g->tensors[i];
    return NULL;
}

static uint64_t load_le(const uint8_t *p, int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* Read a scalar of any numeric GGUF type as a double. Returns false for
 * strings and arrays. */
static bool gguf_scalar_as_double(uint32_t type, const uint8_t *p, double *out) {
    int size = gguf_scalar_size(type);
    if (size == 0) return false;
    uint64_t bits = load_le(p, size);
    switch (type) {
    case GGUF_U8: case GGUF_U16: case GGUF_U32: case GGUF_U64: case GGUF_BOOL:
        *out = (double)bits; return true;
    case GGUF_I8: *out = (int8_t)bits; return true;
    case GGUF_I16: *out = (int16_t)bits; return true;
    case GGUF_I32: *out = (int32_t)bits; return true;
    case GGUF_I64: *out = (double)(int64_t)bits; return true;
    case GGUF_F32: { uint32_t b = (uint32_t)bits; float f; memcpy(&f, &b, 4); *out = f; return true; }
    case GGUF_F64: { double d; memcpy(&d, &bits, 8); *out = d; return true; }
    default: return false;
    }
}

static bool gguf_get_number(const struct gguf *g, const char *key, double *out) {
    const struct gguf_kv *kv = gguf_find_kv(g, key);
    return kv && gguf_scalar_as_double(kv->type, kv->value, out);
}

static bool gguf_get_string(const struct gguf *g, const char *key, const char **s,
                            uint64_t *len) {
    const struct gguf_kv *kv = gguf_find_kv(g, key);
    if (!kv || kv->type != GGUF_STRING) return false;
    *len = load_le(kv->value, 8);
    *s = (const char *)kv->value + 8;
    return true;
}

/* Arrays: a view with the item type, count and first item. */
struct gguf_array {
    uint32_t item_type;
    uint64_t count;
    const uint8_t *items;
};

static bool gguf_get_array(const struct gguf *g, const char *key, struct gguf_array *a) {
    const struct gguf_kv *kv = gguf_find_kv(g, key);
    if (!kv || kv->type != GGUF_ARRAY) return false;
    a->item_type = (uint32_t)load_le(kv->value, 4);
    a->count = load_le(kv->value + 4, 8);
    a->items = kv->value + 12;
    return true;
}

/* Item i of a numeric array (the header walk already proved it in bounds). */
static bool gguf_array_number(const struct gguf_array *a, uint64_t i, double *out) {
    int size = gguf_scalar_size(a->item_type);
    if (size == 0 || i >= a->count) return false;
    return gguf_scalar_as_double(a->item_type, a->items + i * (uint64_t)size, out);
}

/* Walk a string array once, handing back pointers and lengths into the map. */
static bool gguf_array_strings(const struct gguf_array *a, const char **strs, uint32_t *lens) {
    if (a->item_type != GGUF_STRING) return false;
    const uint8_t *p = a->items;
    for (uint64_t i = 0; i < a->count; i++) {
        uint64_t len = load_le(p, 8);
        if (len > UINT32_MAX) return false;
        strs[i] = (const char *)p + 8;
        lens[i] = (uint32_t)len;
        p += 8 + len;
    }
    return true;
}

static bool gguf_open(struct gguf *g, const char *path, struct ds4_error *e) {
    memset(g, 0, sizeof *g);
    if (!gguf_map_file(g, path, e)) return false;
    struct cursor c = { g->map, 0, g->size, false };
    uint32_t magic = cursor_u32(&c);
    g->version = cursor_u32(&c);
    g->n_tensors = cursor_u64(&c);
    g->n_kv = cursor_u64(&c);
    bool ok = false;
    if (magic != GGUF_MAGIC) {
        fail(e, "%s: not a GGUF file (magic 0x%08x)", path, magic);
    } else if (g->version != 3) {
        fail(e, "%s: GGUF version %u is not supported (need 3)", path, g->version);
    } else if (g->n_tensors > g->size / 24) {
        fail(e, "%s: tensor count %llu is impossible for a %llu-byte file", path,
             (unsigned long long)g->n_tensors, (unsigned long long)g->size);
    } else if (gguf_read_kvs(g, &c, e)) {
        ok = true;
    }
    if (!ok) { gguf_close(g); return false; }

    double alignment = 32;
    if (gguf_find_kv(g, "general.alignment") &&
        (!gguf_get_number(g, "general.alignment", &alignment) || alignment < 1 ||
         alignment > 65536 || ((uint64_t)alignment & ((uint64_t)alignment - 1)))) {
        fail(e, "%s: general.alignment must be a power of two in 1..65536", path);
        gguf_close(g);
        return false;
    }
    g->alignment = (uint64_t)alignment;

    g->tensors = xcalloc(g->n_tensors, sizeof *g->tensors);
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (!gguf_read_tensor_entry(g, &c, &g->tensors[i], i, e)) { gguf_close(g); return false; }
    g->data_offset = (c.pos + g->alignment - 1) / g->alignment * g->alignment;
    if (g->data_offset > g->size) {
        fail(e, "%s: file ends before its data section", path);
        gguf_close(g);
        return false;
    }
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (!gguf_place_tensor(g, &g->tensors[i], e)) { gguf_close(g); return false; }
    return true;
}

/* ============================================================================
 * Chapter 3. Quant blocks
 * ============================================================================ */
#include "staging/quant.c"

/* A tensor's size in bytes, or ok=false when the type is unknown or its rows
 * are not a whole number of blocks. Rows are never split across blocks. */
static uint64_t tensor_bytes_for(uint32_t type, uint64_t n_elements, uint64_t row_len,
                                 bool *ok) {
    const struct type_traits *tt = type_traits_of(type);
    *ok = tt && row_len % (uint64_t)tt->block_values == 0;
    if (!*ok) return 0;
    return n_elements / (uint64_t)tt->block_values * (uint64_t)tt->block_bytes;
}

/* ============================================================================
 * Chapter 4. The model's shape and its weights
 * ============================================================================
 *
 * Everything about the model's shape comes from the GGUF metadata, under the
 * `deepseek4.` prefix the published files use. Nothing is hard-coded: the
 * same code runs the 43-layer Flash model and the 6-layer tiny model that
 * the tests use. The symbols below match the forward-pass notes:
 *
 *   D   dim             residual width of one hyper-connection stream
 *   H   n_heads         query heads (one shared K=V head serves them all)
 *   Dh  head_dim        width of a head and of the K=V row
 *   R   rope_dim        RoPE acts on the last R dims of a head
 *   Q   q_rank          low rank of the query path
 *   G,O o_groups, o_rank  grouped low-rank output projection
 *   E,K n_experts, n_used routed experts, and how many each token uses
 *   F   ffn_dim         hidden width of every expert (routed and shared)
 *   W   window          sliding-window rows, the current token included
 *   HI,DI,KI            indexer heads, head width, rows it selects
 *   n   hc              hyper-connection streams; M = (2+n)*n mixing values
 * ------------------------------------------------------------------------- */

#define DS4_MAX_LAYERS 256

struct ds4_config {
    int n_layers, dim, vocab;
    int n_heads, head_dim, rope_dim, q_rank, o_groups, o_rank;
    int n_experts, n_used, ffn_dim, n_shared, n_hash_layers;
    int window, idx_heads, idx_dim, idx_topk;
    int hc, sinkhorn_iters;
    int ratio[DS4_MAX_LAYERS];          /* compression ratio per layer: 0, 4 or 128 */
    float swiglu_limit[DS4_MAX_LAYERS]; /* clamp per layer; 0 disables */
    float rope_base, compress_rope_base, rope_factor, beta_fast, beta_slow;
    double original_ctx;                /* YaRN's original context; 0 disables YaRN */
    float route_scale, norm_eps, hc_eps;
};

/* The scalar keys, read by one table so that adding a key is one line. */
struct config_key {
    const char *key;
    int *as_int;
    float *as_float;
    double *as_double;
};

static bool config_read_scalars(const struct gguf *g, struct ds4_config *c, struct ds4_error *e) {
    struct config_key keys[] = {
        { "deepseek4.block_count", &c->n_layers, NULL, NULL },
        { "deepseek4.embedding_length", &c->dim, NULL, NULL },
        { "deepseek4.vocab_size", &c->vocab, NULL, NULL },
        { "deepseek4.attention.head_count", &c->n_heads, NULL, NULL },
        { "deepseek4.attention.key_length", &c->head_dim, NULL, NULL },
        { "deepseek4.rope.dimension_count", &c->rope_dim, NULL, NULL },
        { "deepseek4.attention.q_lora_rank", &c->q_rank, NULL, NULL },
        { "deepseek4.attention.output_lora_rank", &c->o_rank, NULL, NULL },
        { "deepseek4.attention.output_group_count", &c->o_groups, NULL, NULL },
        { "deepseek4.expert_count", &c->n_experts, NULL, NULL },
        { "deepseek4.expert_used_count", &c->n_used, NULL, NULL },
        { "deepseek4.expert_feed_forward_length", &c->ffn_dim, NULL, NULL },
        { "deepseek4.expert_shared_count", &c->n_shared, NULL, NULL },
        { "deepseek4.hash_layer_count", &c->n_hash_layers, NULL, NULL },
        { "deepseek4.attention.sliding_window", &c->window, NULL, NULL },
        { "deepseek4.attention.indexer.head_count", &c->idx_heads, NULL, NULL },
        { "deepseek4.attention.indexer.key_length", &c->idx_dim, NULL, NULL },
        { "deepseek4.attention.indexer.top_k", &c->idx_topk, NULL, NULL },
        { "deepseek4.hyper_connection.count", &c->hc, NULL, NULL },
        { "deepseek4.hyper_connection.sinkhorn_iterations", &c->sinkhorn_iters, NULL, NULL },
        { "deepseek4.rope.freq_base", NULL, &c->rope_base, NULL },
        { "deepseek4.attention.compress_rope_freq_base", NULL, &c->compress_rope_base, NULL },
        { "deepseek4.rope.scaling.factor", NULL, &c->rope_factor, NULL },
        { "deepseek4.rope.scaling.yarn_beta_fast", NULL, &c->beta_fast, NULL },
        { "deepseek4.rope.scaling.yarn_beta_slow", NULL, &c->beta_slow, NULL },
        { "deepseek4.rope.scaling.original_context_length", NULL, NULL, &c->original_ctx },
        { "deepseek4.expert_weights_scale", NULL, &c->route_scale, NULL },
        { "deepseek4.attention.layer_norm_rms_epsilon", NULL, &c->norm_eps, NULL },
        { "deepseek4.hyper_connection.epsilon", NULL, &c->hc_eps, NULL },
    };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        double v;
        if (!gguf_get_number(g, keys[i].key, &v))
            return fail(e, "%s: missing or non-numeric metadata '%s'", g->path, keys[i].key);
        if (keys[i].as_int) {
            if (v < 0 || v > (1 << 24) || v != floor(v))
                return fail(e, "%s: metadata '%s' = %g is not a sane count", g->path,
                            keys[i].key, v);
            *keys[i].as_int = (int)v;
        } else if (keys[i].as_float) {
            *keys[i].as_float = (float)v;
        } else {
            *keys[i].as_double = v;
        }
    }
    return true;
}

static bool config_read_layer_arrays(const struct gguf *g, struct ds4_config *c,
                                     struct ds4_error *e) {
    struct gguf_array ratios, clamps;
    if (!gguf_get_array(g, "deepseek4.attention.compress_ratios", &ratios) ||
        ratios.count < (uint64_t)c->n_layers)
        return fail(e, "%s: 'deepseek4.attention.compress_ratios' must be an array of at "
                    "least %d entries", g->path, c->n_layers);
    bool have_clamps = gguf_get_array(g, "deepseek4.swiglu_clamp_exp", &clamps);
    for (int l = 0; l < c->n_layers; l++) {
        double r, s = 10.0;
        if (!gguf_array_number(&ratios, (uint64_t)l, &r) || !(r == 0 || r == 4 || r == 128))
            return fail(e, "%s: compress_ratios[%d] must be 0, 4 or 128", g->path, l);
        if (have_clamps && !gguf_array_number(&clamps, (uint64_t)l, &s))
            return fail(e, "%s: swiglu_clamp_exp[%d] is missing or not a number", g->path, l);
        c->ratio[l] = (int)r;
        c->swiglu_limit[l] = (float)s;
    }
    return true;
}

/* The rules the forward pass relies on. A file that breaks one of them would
 * otherwise make the engine read out of bounds, so each is checked here. */
static bool config_validate(const struct ds4_config *c, const char *path, struct ds4_error *e) {
    if (c->n_layers < 1 || c->n_layers > DS4_MAX_LAYERS - 1)
        return fail(e, "%s: block_count %d outside 1..%d", path, c->n_layers, DS4_MAX_LAYERS - 1);
    if (c->dim < 1 || c->vocab < 2 || c->n_heads < 1 || c->q_rank < 1 || c->o_rank < 1)
        return fail(e, "%s: a model dimension is zero", path);
    if (c->o_groups < 1 || c->n_heads % c->o_groups != 0)
        return fail(e, "%s: head_count %d is not a multiple of output_group_count %d", path,
                    c->n_heads, c->o_groups);
    if (c->rope_dim < 2 || c->rope_dim % 2 || c->rope_dim > c->head_dim)
        return fail(e, "%s: rope dimension %d must be even and at most key_length %d", path,
                    c->rope_dim, c->head_dim);
    if ((c->head_dim - c->rope_dim) % 64 != 0)
        return fail(e, "%s: key_length - rope dims = %d is not a multiple of the FP8 block "
                    "(64)", path, c->head_dim - c->rope_dim);
    if (c->idx_dim < c->rope_dim || c->idx_dim % 32 || (c->idx_dim & (c->idx_dim - 1)))
        return fail(e, "%s: indexer key_length %d must be a power of two, a multiple of 32 "
                    "and at least the rope dims", path, c->idx_dim);
    if (c->n_experts < 1 || c->n_used < 1 || c->n_used > c->n_experts || c->ffn_dim < 1)
        return fail(e, "%s: expert counts are inconsistent (%d used of %d)", path, c->n_used,
                    c->n_experts);
    if (c->n_shared != 1)
        return fail(e, "%s: expert_shared_count is %d; DeepSeek V4 has exactly one", path,
                    c->n_shared);
    if (c->hc < 1 || c->hc > 16 || c->sinkhorn_iters < 1 || c->window < 1 ||
        c->idx_heads < 1 || c->idx_topk < 1 || c->n_hash_layers > c->n_layers)
        return fail(e, "%s: hyper-connection, window or indexer settings are out of range", path);
    return true;
}

static bool config_from_gguf(const struct gguf *g, struct ds4_config *c, struct ds4_error *e) {
    memset(c, 0, sizeof *c);
    return config_read_scalars(g, c, e) && config_validate(c, g->path, e) &&
           config_read_layer_arrays(g, c, e);
}

/* ----------------------------------------------------------------------------
 * Weights.
 *
 * A matrix is a view into the mapped file: its type, its row length (in)
 * and row count (out), and how many bytes one row takes. Routed experts are
 * stored stacked, [in, out, E] in GGUF order, so expert e is simply the slab
 * of `out` rows starting at e * out * row_bytes.
 *
 * One-dimensional weights (norm gains, biases, sinks, hyper-connection
 * scales) are tiny, so they are copied out as float32 at load time whatever
 * their stored type.
 * ------------------------------------------------------------------------- */

struct matrix {
    const uint8_t *data;
    uint32_t type;
    int64_t in, out;
    uint64_t row_bytes;
};

static const uint8_t *matrix_row(const struct matrix *m, int64_t r) {
    return m->data + (uint64_t)r * m->row_bytes;
}

static struct matrix expert_slice(const struct matrix *stacked, int expert) {
    struct matrix m = *stacked;
    m.data = stacked->data + (uint64_t)expert * (uint64_t)stacked->out * stacked->row_bytes;
    return m;
}

struct layer_weights {
    int ratio;                  /* 0, 4 or 128 */
    bool hash_routed;           /* experts chosen by a token-id table */
    float swiglu_limit;
    /* hyper-connections around attention and around the FFN */
    struct matrix hc_attn_fn, hc_ffn_fn;           /* [n*D] -> M */
    float *hc_attn_scale, *hc_attn_base, *hc_ffn_scale, *hc_ffn_base;
    float *attn_norm, *ffn_norm;
    /* attention */
    struct matrix q_a, q_b, kv, out_a, out_b;
    float *q_a_norm, *kv_norm, *sinks;
    /* compressor (ratio > 0) and indexer (ratio 4) */
    struct matrix comp_ape, comp_kv, comp_gate;
    float *comp_norm;
    struct matrix idx_q_b, idx_proj, idx_ape, idx_kv, idx_gate;
    float *idx_norm;
    /* mixture of experts */
    struct matrix router;
    float *router_bias;         /* selection-only bias; NULL on hash layers */
    const int32_t *tid2eid;     /* [vocab][K] expert ids; hash layers only */
    struct matrix gate_exps, up_exps, down_exps;   /* stacked over experts */
    struct matrix gate_shexp, up_shexp, down_shexp;
};

/* The MTP block: one extra layer plus the glue that feeds it. */
struct mtp_weights {
    struct layer_weights block;
    struct matrix e_proj, h_proj;
    float *enorm, *hnorm, *norm;
    struct matrix hc_head_fn;
    float *hc_head_base, *hc_head_scale;
};

struct model {
    struct gguf file, mtp_file;
    struct ds4_config cfg;
    struct matrix token_embd, output;
    struct matrix hc_head_fn;
    float *hc_head_base, *hc_head_scale, *output_norm;
    struct layer_weights layers[DS4_MAX_LAYERS];
    bool has_mtp;
    struct mtp_weights mtp;
    /* every float vector copied out at load, freed together */
    float **owned;
    int n_owned;
};

/* Binding looks a tensor up by name, checks its shape against the config,
 * and fills a view. The name is built from a prefix ("blk.7." or "mtp.0.")
 * and a suffix, so the same table serves main layers and the MTP block. */
struct binder {
    const struct gguf *file;
    struct model *model;
    struct ds4_error *e;
    const char *prefix;
    bool ok;
};

static const struct gguf_tensor *bind_lookup(struct binder *b, const char *suffix,
                                             bool required, char *name, size_t name_cap) {
    snprintf(name, name_cap, "%s%s", b->prefix, suffix);
    const struct gguf_tensor *t = gguf_find_tensor(b->file, name);
    if (!t && required && b->ok) b->ok = fail(b->e, "%s: missing tensor '%s'", b->file->path, name);
    return t;
}

static bool is_matrix_type(uint32_t type) {
    return type == TYPE_F32 || type == TYPE_F16 || type == TYPE_BF16 || type == TYPE_Q8_0 ||
           type == TYPE_Q2_K || type == TYPE_Q4_K || type == TYPE_IQ2_XXS;
}

/* A matrix of `out` rows of `in` values, stacked `experts` times (1 = plain). */
static struct matrix bind_matrix(struct binder *b, const char *suffix, int64_t in, int64_t out,
                                 int64_t experts) {
    struct matrix m = { 0 };
    char name[256];
    const struct gguf_tensor *t = bind_lookup(b, suffix, true, name, sizeof name);
    if (!t || !b->ok) return m;
    uint32_t want_dims = experts > 1 ? 3 : 2;
    bool shape_ok = t->dims[0] == (uint64_t)in && t->dims[1] == (uint64_t)out &&
                    (t->n_dims == want_dims || (experts == 1 && t->n_dims == 3 && t->dims[2] == 1)) &&
                    (experts == 1 || t->dims[2] == (uint64_t)experts);
    if (!shape_ok) {
        b->ok = fail(b->e, "%s: tensor '%s' has shape [%llu, %llu%s] but the metadata implies "
                     "[%lld, %lld%s]", b->file->path, name, (unsigned long long)t->dims[0],
                     (unsigned long long)(t->n_dims > 1 ? t->dims[1] : 1),
                     t->n_dims > 2 ? ", ..." : "", (long long)in, (long long)out,
                     experts > 1 ? ", experts" : "");
        return m;
    }
    if (!is_matrix_type(t->type)) {
        b->ok = fail(b->e, "%s: tensor '%s' has type %u, which is not a weight-matrix type",
                     b->file->path, name, t->type);
        return m;
    }
    m.data = t->data;
    m.type = t->type;
    m.in = in;
    m.out = out;
    m.row_bytes = type_row_bytes(t->type, (uint64_t)in);
    return m;
}

static float *bind_vector(struct binder *b, const char *suffix, int64_t n, bool required) {
    char name[256];
    const struct gguf_tensor *t = bind_lookup(b, suffix, required, name, sizeof name);
    if (!t || !b->ok) return NULL;
    if (t->n_elements != (uint64_t)n || t->dims[0] != (uint64_t)n) {
        b->ok = fail(b->e, "%s: tensor '%s' has %llu values, expected %lld", b->file->path, name,
                     (unsigned long long)t->n_elements, (long long)n);
        return NULL;
    }
    if (t->type != TYPE_F32 && t->type != TYPE_F16 && t->type != TYPE_BF16) {
        b->ok = fail(b->e, "%s: tensor '%s' must be F32, F16 or BF16 (type %u)", b->file->path,
                     name, t->type);
        return NULL;
    }
    float *v = xmalloc((size_t)n * sizeof(float));
    dequant_row_ref(t->type, t->data, v, n);
    struct model *m = b->model;
    m->owned = xrealloc(m->owned, (size_t)(m->n_owned + 1) * sizeof(float *));
    m->owned[m->n_owned++] = v;
    return v;
}

static const int32_t *bind_tid2eid(struct binder *b, const char *suffix, int k, int vocab) {
    char name[256];
    const struct gguf_tensor *t = bind_lookup(b, suffix, true, name, sizeof name);
    if (!t || !b->ok) return NULL;
    if (t->type != TYPE_I32 || t->dims[0] != (uint64_t)k || t->n_dims != 2 ||
        t->dims[1] != (uint64_t)vocab) {
        b->ok = fail(b->e, "%s: tensor '%s' must be I32 [%d, %d]", b->file->path, name, k, vocab);
        return NULL;
    }
    return (const int32_t *)t->data;
}

/* Every id in a hash table must name a real expert, or routing would index
 * past the expert slabs. Checked once at load. */
static bool check_tid2eid(const int32_t *table, int k, int vocab, int n_experts,
                          const char *path, int layer, struct ds4_error *e) {
    for (int64_t i = 0; i < (int64_t)k * vocab; i++)
        if (table[i] < 0 || table[i] >= n_experts)
            return fail(e, "%s: blk.%d.ffn_gate_tid2eid has expert id %d at %lld (must be "
                        "0..%d)", path, layer, table[i], (long long)i, n_experts - 1);
    return true;
}

static void bind_hc(struct binder *b, const struct ds4_config *c, const char *which,
                    struct matrix *fn, float **scale, float **base) {
    char suffix[64];
    int mix = (2 + c->hc) * c->hc;
    snprintf(suffix, sizeof suffix, "hc_%s_fn.weight", which);
    *fn = bind_matrix(b, suffix, (int64_t)c->hc * c->dim, mix, 1);
    snprintf(suffix, sizeof suffix, "hc_%s_scale.weight", which);
    *scale = bind_vector(b, suffix, 3, true);
    snprintf(suffix, sizeof suffix, "hc_%s_base.weight", which);
    *base = bind_vector(b, suffix, mix, true);
}

static void bind_attention(struct binder *b, const struct ds4_config *c, struct layer_weights *L) {
    int64_t group_in = (int64_t)c->n_heads / c->o_groups * c->head_dim;
    L->attn_norm = bind_vector(b, "attn_norm.weight", c->dim, true);
    L->q_a = bind_matrix(b, "attn_q_a.weight", c->dim, c->q_rank, 1);
    L->q_a_norm = bind_vector(b, "attn_q_a_norm.weight", c->q_rank, true);
    L->q_b = bind_matrix(b, "attn_q_b.weight", c->q_rank, (int64_t)c->n_heads * c->head_dim, 1);
    L->kv = bind_matrix(b, "attn_kv.weight", c->dim, c->head_dim, 1);
    L->kv_norm = bind_vector(b, "attn_kv_a_norm.weight", c->head_dim, true);
    L->sinks = bind_vector(b, "attn_sinks.weight", c->n_heads, true);
    L->out_a = bind_matrix(b, "attn_output_a.weight", group_in, (int64_t)c->o_groups * c->o_rank, 1);
    L->out_b = bind_matrix(b, "attn_output_b.weight", (int64_t)c->o_groups * c->o_rank, c->dim, 1);
}

/* Compressor width: ratio-4 layers overlap consecutive windows, so each token
 * projects to two halves (coff = 2); ratio-128 layers do not (coff = 1). */
static int compressor_coff(int ratio) { return ratio == 4 ? 2 : 1; }

static void bind_compressors(struct binder *b, const struct ds4_config *c, struct layer_weights *L) {
    int r = L->ratio, width = compressor_coff(r) * c->head_dim;
    L->comp_ape = bind_matrix(b, "attn_compressor_ape.weight", width, r, 1);
    L->comp_kv = bind_matrix(b, "attn_compressor_kv.weight", c->dim, width, 1);
    L->comp_gate = bind_matrix(b, "attn_compressor_gate.weight", c->dim, width, 1);
    L->comp_norm = bind_vector(b, "attn_compressor_norm.weight", c->head_dim, true);
    if (r != 4) return;
    int iw = 2 * c->idx_dim;
    L->idx_q_b = bind_matrix(b, "indexer.attn_q_b.weight", c->q_rank,
                             (int64_t)c->idx_heads * c->idx_dim, 1);
    L->idx_proj = bind_matrix(b, "indexer.proj.weight", c->dim, c->idx_heads, 1);
    L->idx_ape = bind_matrix(b, "indexer_compressor_ape.weight", iw, r, 1);
    L->idx_kv = bind_matrix(b, "indexer_compressor_kv.weight", c->dim, iw, 1);
    L->idx_gate = bind_matrix(b, "indexer_compressor_gate.weight", c->dim, iw, 1);
    L->idx_norm = bind_vector(b, "indexer_compressor_norm.weight", c->idx_dim, true);
}

static void bind_moe(struct binder *b, const struct ds4_config *c, struct layer_weights *L) {
    L->ffn_norm = bind_vector(b, "ffn_norm.weight", c->dim, true);
    L->router = bind_matrix(b, "ffn_gate_inp.weight", c->dim, c->n_experts, 1);
    L->router_bias = bind_vector(b, "exp_probs_b.bias", c->n_experts, !L->hash_routed);
    if (L->hash_routed) L->tid2eid = bind_tid2eid(b, "ffn_gate_tid2eid.weight", c->n_used, c->vocab);
    L->gate_exps = bind_matrix(b, "ffn_gate_exps.weight", c->dim, c->ffn_dim, c->n_experts);
    L->up_exps = bind_matrix(b, "ffn_up_exps.weight", c->dim, c->ffn_dim, c->n_experts);
    L->down_exps = bind_matrix(b, "ffn_down_exps.weight", c->ffn_dim, c->dim, c->n_experts);
    L->gate_shexp = bind_matrix(b, "ffn_gate_shexp.weight", c->dim, c->ffn_dim, 1);
    L->up_shexp = bind_matrix(b, "ffn_up_shexp.weight", c->dim, c->ffn_dim, 1);
    L->down_shexp = bind_matrix(b, "ffn_down_shexp.weight", c->ffn_dim, c->dim, 1);
}

static void bind_block(struct binder *b, const struct ds4_config *c, struct layer_weights *L) {
    bind_hc(b, c, "attn", &L->hc_attn_fn, &L->hc_attn_scale, &L->hc_attn_base);
    bind_hc(b, c, "ffn", &L->hc_ffn_fn, &L->hc_ffn_scale, &L->hc_ffn_base);
    bind_attention(b, c, L);
    if (L->ratio > 0) bind_compressors(b, c, L);
    bind_moe(b, c, L);
}

static bool bind_main_weights(struct model *m, struct ds4_error *e) {
    const struct ds4_config *c = &m->cfg;
    struct binder b = { &m->file, m, e, "", true };
    m->token_embd = bind_matrix(&b, "token_embd.weight", c->dim, c->vocab, 1);
    m->output = bind_matrix(&b, "output.weight", c->dim, c->vocab, 1);
    m->hc_head_fn = bind_matrix(&b, "output_hc_fn.weight", (int64_t)c->hc * c->dim, c->hc, 1);
    m->hc_head_base = bind_vector(&b, "output_hc_base.weight", c->hc, true);
    m->hc_head_scale = bind_vector(&b, "output_hc_scale.weight", 1, true);
    m->output_norm = bind_vector(&b, "output_norm.weight", c->dim, true);
    for (int l = 0; l < c->n_layers && b.ok; l++) {
        char prefix[32];
        snprintf(prefix, sizeof prefix, "blk.%d.", l);
        b.prefix = prefix;
        struct layer_weights *L = &m->layers[l];
        L->ratio = c->ratio[l];
        L->hash_routed = l < c->n_hash_layers;
        L->swiglu_limit = c->swiglu_limit[l];
        bind_block(&b, c, L);
        if (b.ok && L->hash_routed &&
            !check_tid2eid(L->tid2eid, c->n_used, c->vocab, c->n_experts, m->file.path, l, e))
            return false;
    }
    return b.ok;
}

/* The MTP block lives in its own GGUF under "mtp.0."; it is a window-only,
 * top-k routed layer (never hash-routed) with a few extra tensors. */
static bool bind_mtp_weights(struct model *m, struct ds4_error *e) {
    const struct ds4_config *c = &m->cfg;
    struct binder b = { &m->mtp_file, m, e, "mtp.0.", true };
    struct mtp_weights *w = &m->mtp;
    w->block.ratio = 0;
    w->block.hash_routed = false;
    w->block.swiglu_limit = c->swiglu_limit[c->n_layers - 1];
    bind_block(&b, c, &w->block);
    w->e_proj = bind_matrix(&b, "e_proj.weight", c->dim, c->dim, 1);
    w->h_proj = bind_matrix(&b, "h_proj.weight", c->dim, c->dim, 1);
    w->enorm = bind_vector(&b, "enorm.weight", c->dim, true);
    w->hnorm = bind_vector(&b, "hnorm.weight", c->dim, true);
    w->norm = bind_vector(&b, "norm.weight", c->dim, true);
    w->hc_head_fn = bind_matrix(&b, "hc_head_fn.weight", (int64_t)c->hc * c->dim, c->hc, 1);
    w->hc_head_base = bind_vector(&b, "hc_head_base.weight", c->hc, true);
    w->hc_head_scale = bind_vector(&b, "hc_head_scale.weight", 1, true);
    return b.ok;
}

static void model_free(struct model *m) {
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    gguf_close(&m->file);
    if (m->has_mtp) gguf_close(&m->mtp_file);
    memset(m, 0, sizeof *m);
}

/* Open a model (and optionally its MTP file) and bind every weight. */
static bool model_load(struct model *m, const char *path, const char *mtp_path,
                       struct ds4_error *e) {
    memset(m, 0, sizeof *m);
    quant_tables_init();
    if (!gguf_open(&m->file, path, e)) return false;
    if (!config_from_gguf(&m->file, &m->cfg, e) || !bind_main_weights(m, e)) {
        model_free(m);
        return false;
    }
    if (mtp_path) {
        if (!gguf_open(&m->mtp_file, mtp_path, e)) {
            model_free(m);
            return false;
        }
        m->has_mtp = true;
        if (!bind_mtp_weights(m, e)) {
            model_free(m);
            return false;
        }
    }
    return true;
}

/* ============================================================================
 * Chapter 5. Numeric primitives of DeepSeek V4
 * ============================================================================
 *
 * Small, exact building blocks. Each one is a formula from the forward-pass
 * notes; the comment above each function states it.
 * ------------------------------------------------------------------------- */

/* RMSNorm:  y[i] = x[i] * w[i] / sqrt(mean_j x[j]^2 + eps)   (w = NULL: no gain)
 * The sum of squares is accumulated in double; it costs nothing here and
 * removes one source of summation-order noise. In place is allowed. */
static void rmsnorm(float *y, const float *x, const float *w, int64_t n, float eps) {
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float scale = (float)(1.0 / sqrt(ss / (double)n + eps));
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * scale * (w ? w[i] : 1.0f);
}

static float sigmoidf(float z) { return 1.0f / (1.0f + expf(-z)); }
static float siluf(float z) { return z / (1.0f + expf(-z)); }

/* softplus(z) = ln(1 + e^z), evaluated without overflow at either end. */
static float softplusf(float z) {
    if (z > 20.0f) return z;
    if (z < -20.0f) return expf(z);
    return log1pf(expf(z));
}

/* ----------------------------------------------------------------------------
 * Rotary position embedding on the tail.
 *
 * Only the last R dims of a head rotate, as R/2 ADJACENT pairs (x[b+2i],
 * x[b+2i+1]) with b = len - R ("interleaved" RoPE). Pair i turns by the angle
 * p * w_i:
 *
 *     w_i = base^(-2i/R)                                  i = 0 .. R/2-1
 *     y0 = x0 cos(p w_i) - x1 sin(p w_i)
 *     y1 = x0 sin(p w_i) + x1 cos(p w_i)
 *
 * Compressed layers (ratio > 0) use another base and YaRN: pairs whose
 * wavelength is long compared with the original training context have their
 * frequency divided by the factor s, with a linear ramp between two
 * correction dims lo and hi:
 *
 *     corr(beta) = R ln(L0 / (2 pi beta)) / (2 ln base)
 *     lo = max(floor(corr(beta_fast)), 0),  hi = min(ceil(corr(beta_slow)), R-1)
 *     ramp_i = clamp((i - lo) / (hi - lo), 0, 1)
 *     w_i = w_i / s * ramp_i + w_i * (1 - ramp_i)
 *
 * There is no YaRN magnitude factor anywhere, neither on cos/sin nor on the
 * softmax scale. The frequencies and the angle p*w_i are formed in float32,
 * as the official code does; cos and sin of that float angle are exact.
 * ------------------------------------------------------------------------- */

struct rope {
    int dims;              /* R */
    float freq[256];       /* w_i, i < R/2 */
};

static void rope_init(struct rope *r, int dims, float base, bool yarn, const struct ds4_config *c) {
    r->dims = dims;
    int half = dims / 2;
    for (int i = 0; i < half; i++)
        r->freq[i] = 1.0f / powf(base, (float)(2 * i) / (float)dims);
    if (!yarn) return;
    double corr_fast = dims * log(c->original_ctx / (c->beta_fast * 2 * M_PI)) / (2 * log(base));
    double corr_slow = dims * log(c->original_ctx / (c->beta_slow * 2 * M_PI)) / (2 * log(base));
    double lo = floor(corr_fast), hi = ceil(corr_slow);
    if (lo < 0) lo = 0;
    if (hi > dims - 1) hi = dims - 1;
    if (lo == hi) hi += 0.001;
    for (int i = 0; i < half; i++) {
        float ramp = ((float)i - (float)lo) / (float)(hi - lo);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        float smooth = 1.0f - ramp;
        r->freq[i] = r->freq[i] / c->rope_factor * (1.0f - smooth) + r->freq[i] * smooth;
    }
}

/* Rotate the last R values of x[0..len) to position pos; inverse = rotate back. */
static void rope_tail(const struct rope *r, float *x, int len, int64_t pos, bool inverse) {
    float *tail = x + len - r->dims;
    for (int i = 0; i < r->dims / 2; i++) {
        float angle = (float)pos * r->freq[i];
        float c = (float)cos((double)angle), s = (float)sin((double)angle);
        if (inverse) s = -s;
        float x0 = tail[2 * i], x1 = tail[2 * i + 1];
        tail[2 * i] = x0 * c - x1 * s;
        tail[2 * i + 1] = x0 * s + x1 * c;
    }
}

/* ----------------------------------------------------------------------------
 * The FP8 and FP4 round trips.
 *
 * DeepSeek trained V4 with its KV cache stored as FP8 (e4m3) and its indexer
 * working in FP4 (e2m1). Those roundings are part of the model: a reference
 * that skips them drifts away from the official logits (and the indexer's
 * top-k choice flips). So we simulate them exactly: scale a block by a power
 * of two, round each value to the nearest representable small float (ties to
 * the even mantissa), scale back.
 *
 *     a  = max(max_i |v_i|, tiny)
 *     sc = 2^ceil(log2(a / max_code))     (a power of two: "ue8m0" scale)
 *     v_i = round_to_format(clamp(v_i / sc, -max_code, max_code)) * sc
 *
 *   format  max_code  block  grid
 *   e4m3    448       64     (1 + m/8) 2^(e-7), e = 1..15; subnormals m 2^-9
 *   e2m1    6         32     0, 0.5, 1, 1.5, 2, 3, 4, 6
 * ------------------------------------------------------------------------- */

/* 2^ceil(log2(y)) for y > 0, exact: frexp gives y = m 2^e with m in [0.5, 1);
 * then ceil(log2 y) is e-1 when m is exactly 0.5 and e otherwise. */
static float pow2_ceil(float y) {
    int e;
    float m = frexpf(y, &e);
    return ldexpf(1.0f, m == 0.5f ? e - 1 : e);
}

/* Nearest e4m3 value to x (|x| <= 448), ties to even. Between 2^k and 2^(k+1)
 * the grid step is 2^(k-3); below 2^-6 it is the subnormal step 2^-9. rintf
 * in the default rounding mode breaks ties to even, which here is exactly the
 * even mantissa. */
static float round_e4m3(float x) {
    float ax = fabsf(x);
    if (ax == 0) return x;
    float step;
    if (ax < 0x1p-6f) {
        step = 0x1p-9f;
    } else {
        int e;
        frexpf(ax, &e);              /* ax in [2^(e-1), 2^e) */
        step = ldexpf(1.0f, e - 1 - 3);
    }
    float r = rintf(ax / step) * step;
    if (r > 448.0f) r = 448.0f;
    return copysignf(r, x);
}

/* Nearest e2m1 value, ties to the even code (codes 0..7 = 0,.5,1,1.5,2,3,4,6). */
static float round_e2m1(float x) {
    static const float grid[8] = { 0, 0.5f, 1, 1.5f, 2, 3, 4, 6 };
    float ax = fabsf(x);
    int best = 0;
    for (int code = 1; code < 8; code++) {
        float d_new = fabsf(ax - grid[code]), d_best = fabsf(ax - grid[best]);
        if (d_new < d_best || (d_new == d_best && code % 2 == 0)) best = code;
    }
    return copysignf(grid[best], x);
}

static void fp8_round_trip_block(float *v, int n) {
    float a = 1e-4f;
    for (int i = 0; i < n; i++) a = fmaxf(a, fabsf(v[i]));
    float sc = pow2_ceil(a * (1.0f / 448.0f));
    for (int i = 0; i < n; i++) {
        float q = fminf(fmaxf(v[i] / sc, -448.0f), 448.0f);
        v[i] = round_e4m3(q) * sc;
    }
}

static void fp4_round_trip_block(float *v, int n) {
    float a = 6.0f * 0x1p-126f;
    for (int i = 0; i < n; i++) a = fmaxf(a, fabsf(v[i]));
    float sc = pow2_ceil(a * (1.0f / 6.0f));
    for (int i = 0; i < n; i++) {
        float q = fminf(fmaxf(v[i] / sc, -6.0f), 6.0f);
        v[i] = round_e2m1(q) * sc;
    }
}

/* The K=V rows keep their RoPE tail in full precision; only the first
 * len - R ("nope") dims go through FP8, in blocks of 64. */
static void fp8_round_trip_nope(float *row, int len, int rope_dims) {
    for (int b = 0; b + 64 <= len - rope_dims; b += 64) fp8_round_trip_block(row + b, 64);
}

/* Orthonormal Walsh-Hadamard transform in natural (Sylvester) order:
 *
 *     for each stride st = 1, 2, 4, ... < n:  (a, c) -> (a + c, a - c)
 *     then scale by 1/sqrt(n)
 *
 * The indexer applies it before FP4 rounding, which spreads outliers across
 * the block so that the coarse 4-bit grid loses less. */
static void hadamard(float *v, int n) {
    for (int st = 1; st < n; st *= 2)
        for (int b = 0; b < n; b += 2 * st)
            for (int i = 0; i < st; i++) {
                float a = v[b + i], c = v[b + st + i];
                v[b + i] = a + c;
                v[b + st + i] = a - c;
            }
    float scale = 1.0f / sqrtf((float)n);
    for (int i = 0; i < n; i++) v[i] *= scale;
}

/* Indexer quantization-aware round trip: Hadamard, then FP4 in 32-blocks. */
static void indexer_round_trip(float *v, int n) {
    hadamard(v, n);
    for (int b = 0; b < n; b += 32) fp4_round_trip_block(v + b, 32);
}

/* Top-k selection with a deterministic tie rule: the higher score wins, and
 * between equal scores the LOWER index wins. Writes the chosen indices in
 * that order. k is small (6 experts, 512 indexer rows), n up to a few
 * hundred thousand; a k-element insertion list is simple and fast enough. */
static int topk_indices(const float *score, int n, int k, int *out) {
    int found = 0;
    for (int i = 0; i < n; i++) {
        if (found == k && !(score[i] > score[out[k - 1]])) continue;
        int at = found < k ? found++ : k - 1;
        while (at > 0 && score[i] > score[out[at - 1]]) {
            out[at] = out[at - 1];
            at--;
        }
        out[at] = i;
    }
    return found;
}

/* ============================================================================
 * Chapter 6. The forward pass
 * ============================================================================
 *
 * 6.1 The engine and its matrix multiply.
 *
 * The engine owns the model, the thread pool and per-thread scratch memory.
 * Its one heavy operation is
 *
 *     Y[t][o] = sum_i W[o][i] * X[t][i]      W: [out][in], X: [T][in], Y: [T][out]
 *
 * For one token (decode) each output row is one fused dequantize-and-dot.
 * For a chunk of T tokens (prefill) each weight row is dequantized ONCE into
 * a small float buffer that stays in L1, then dotted with all T inputs: the
 * weights, which dominate memory traffic, are read once per chunk. Threads
 * split the rows.
 *
 * With `reference_kernels` set, every product goes through the scalar
 * "dequantize, then a plain float loop" definition instead. Tests run the
 * whole model both ways and compare.
 * ------------------------------------------------------------------------- */

struct engine_options {
    int threads;                  /* 0 = one per online CPU */
    bool reference_kernels;       /* scalar dequant-then-f32 products */
};

struct engine {
    struct model *model;
    struct engine_options opt;
    struct thread_pool pool;
    struct rope rope_window;      /* ratio-0 layers and the MTP block */
    struct rope rope_compressed;  /* compressed layers, their compressors, the indexer */
    int64_t max_row;              /* longest weight row, for the dequant scratch */
    float **row_scratch;          /* [threads][max_row] */
    float **attn_scratch;         /* [threads][attn_scratch_cap] */
    int64_t attn_scratch_cap;
};

static void engine_init(struct engine *eng, struct model *m, struct engine_options opt) {
    memset(eng, 0, sizeof *eng);
    eng->model = m;
    eng->opt = opt;
    int threads = opt.threads > 0 ? opt.threads : default_thread_count();
    pool_init(&eng->pool, threads);
    const struct ds4_config *c = &m->cfg;
    rope_init(&eng->rope_window, c->rope_dim, c->rope_base, false, c);
    rope_init(&eng->rope_compressed, c->rope_dim, c->compress_rope_base, c->original_ctx > 0, c);
    int64_t sizes[] = { (int64_t)c->hc * c->dim, c->dim, c->q_rank, c->ffn_dim,
                        (int64_t)c->o_groups * c->o_rank,
                        (int64_t)c->n_heads / c->o_groups * c->head_dim };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (sizes[i] > eng->max_row) eng->max_row = sizes[i];
    eng->row_scratch = xcalloc((size_t)threads, sizeof(float *));
    eng->attn_scratch = xcalloc((size_t)threads, sizeof(float *));
    for (int i = 0; i < threads; i++) eng->row_scratch[i] = xmalloc((size_t)eng->max_row * sizeof(float));
}

static void engine_free(struct engine *eng) {
    for (int i = 0; i < eng->pool.n_threads; i++) {
        free(eng->row_scratch[i]);
        free(eng->attn_scratch[i]);
    }
    free(eng->row_scratch);
    free(eng->attn_scratch);
    pool_free(&eng->pool);
}

/* Make sure every thread has `n` floats of attention scratch. Called from the
 * main thread between parallel sections. */
static void engine_reserve_attn_scratch(struct engine *eng, int64_t n) {
    if (n <= eng->attn_scratch_cap) return;
    for (int i = 0; i < eng->pool.n_threads; i++) {
        free(eng->attn_scratch[i]);
        eng->attn_scratch[i] = xmalloc((size_t)n * sizeof(float));
    }
    eng->attn_scratch_cap = n;
}

struct matmul_job {
    struct engine *eng;
    const struct matrix *w;
    const float *x;
    int64_t x_stride;
    float *y;
    int64_t y_stride;
    int n_tok;
};

enum { MATMUL_ROWS_PER_ITEM = 8 };

static void matmul_rows(void *ctx, int64_t item, int worker) {
    struct matmul_job *j = ctx;
    const struct matrix *w = j->w;
    int64_t r0 = item * MATMUL_ROWS_PER_ITEM, r1 = r0 + MATMUL_ROWS_PER_ITEM;
    if (r1 > w->out) r1 = w->out;
    float *row = j->eng->row_scratch[worker];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = matrix_row(w, r);
        if (j->eng->opt.reference_kernels) {
            for (int t = 0; t < j->n_tok; t++)
                j->y[t * j->y_stride + r] = vec_dot_ref(w->type, wr, j->x + t * j->x_stride, w->in);
        } else if (j->n_tok == 1) {
            j->y[r] = vec_dot(w->type, wr, j->x, w->in);
        } else {
            dequant_row(w->type, wr, row, w->in);
            for (int t = 0; t < j->n_tok; t++)
                j->y[t * j->y_stride + r] = dot_f32(row, j->x + t * j->x_stride, w->in);
        }
    }
}

/* Y[t][o] = W[o] . X[t] for t < n_tok; strides are in floats. */
static void matmul_strided(struct engine *eng, float *y, int64_t y_stride, const struct matrix *w,
                           const float *x, int64_t x_stride, int n_tok) {
    struct matmul_job j = { eng, w, x, x_stride, y, y_stride, n_tok };
    int64_t items = (w->out + MATMUL_ROWS_PER_ITEM - 1) / MATMUL_ROWS_PER_ITEM;
    parallel_for(&eng->pool, items, matmul_rows, &j);
}

static void matmul(struct engine *eng, float *y, const struct matrix *w, const float *x, int n_tok) {
    matmul_strided(eng, y, w->out, w, x, w->in, n_tok);
}

/* One row of a small matrix as floats (the compressor's positional bias). */
static void matrix_row_f32(const struct matrix *m, int64_t r, float *out) {
    dequant_row_ref(m->type, matrix_row(m, r), out, m->in);
}

/* ----------------------------------------------------------------------------
 * 6.2 Session state: what a conversation carries from token to token.
 *
 * The hyper-connection state, the MoE and the query path are per token and
 * forgotten at once. What persists, per layer:
 *
 *   ring          [W][Dh]        K=V rows of the last W positions, slot p % W
 *   comp_rows     [P/r][Dh]      finished compressed rows (ratio > 0)
 *   comp          frontier       the compressor's partial window (6.4)
 *   idx_rows      [P/4][DI]      finished indexer rows (ratio 4)
 *   idx_comp      frontier       the indexer compressor's partial window
 *
 * plus the position P (tokens processed), the last position's logits, and,
 * for the MTP block, the main model's final hyper-connection state at P-1
 * and the MTP block's own ring.
 * ------------------------------------------------------------------------- */

struct row_store {
    float *rows;
    int64_t n, cap;
    int width;
};

static float *row_store_append(struct row_store *rs) {
    if (rs->n == rs->cap) {
        rs->cap = rs->cap ? rs->cap * 2 : 64;
        rs->rows = xrealloc(rs->rows, (size_t)rs->cap * (size_t)rs->width * sizeof(float));
    }
    return rs->rows + rs->n++ * rs->width;
}

/* The streaming compressor (6.4): `score` starts at -inf, meaning "no token
 * here yet", which the pooling softmax turns into weight 0. */
struct compressor_state {
    int ratio, coff, dc;          /* dc = output row width; each token projects coff*dc */
    float *kv, *score;            /* [coff*ratio][coff*dc] each */
};

struct layer_state {
    float *ring;                  /* [W][Dh] */
    struct row_store comp_rows, idx_rows;
    struct compressor_state comp, idx_comp;
};

struct session {
    struct engine *eng;
    int64_t pos;                  /* tokens processed so far */
    struct layer_state *layers;   /* [n_layers] */
    float *logits;                /* [vocab] logits after the last token */
    /* MTP */
    struct layer_state mtp_state;
    int64_t mtp_pos;              /* MTP rows processed (lags pos by one) */
    float *last_hc;               /* [n*D] main final HC state at pos-1 */
};

static void compressor_init(struct compressor_state *cs, int ratio, int dc) {
    cs->ratio = ratio;
    cs->coff = compressor_coff(ratio);
    cs->dc = dc;
    size_t n = (size_t)cs->coff * ratio * cs->coff * dc;
    cs->kv = xcalloc(n, sizeof(float));
    cs->score = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) cs->score[i] = -INFINITY;
}

static void layer_state_init(struct layer_state *st, const struct ds4_config *c, int ratio) {
    memset(st, 0, sizeof *st);
    st->ring = xcalloc((size_t)c->window * c->head_dim, sizeof(float));
    st->comp_rows.width = c->head_dim;
    st->idx_rows.width = c->idx_dim;
    if (ratio > 0) compressor_init(&st->comp, ratio, c->head_dim);
    if (ratio == 4) compressor_init(&st->idx_comp, ratio, c->idx_dim);
}

static void layer_state_free(struct layer_state *st) {
    free(st->ring);
    free(st->comp_rows.rows);
    free(st->idx_rows.rows);
    free(st->comp.kv);
    free(st->comp.score);
    free(st->idx_comp.kv);
    free(st->idx_comp.score);
}

static void session_init(struct session *s, struct engine *eng) {
    memset(s, 0, sizeof *s);
    const struct ds4_config *c = &eng->model->cfg;
    s->eng = eng;
    s->layers = xcalloc((size_t)c->n_layers, sizeof *s->layers);
    for (int l = 0; l < c->n_layers; l++) layer_state_init(&s->layers[l], c, c->ratio[l]);
    layer_state_init(&s->mtp_state, c, 0);
    s->logits = xcalloc((size_t)c->vocab, sizeof(float));
    s->last_hc = xcalloc((size_t)c->hc * c->dim, sizeof(float));
}

static void session_free(struct session *s) {
    const struct ds4_config *c = &s->eng->model->cfg;
    for (int l = 0; l < c->n_layers; l++) layer_state_free(&s->layers[l]);
    layer_state_free(&s->mtp_state);
    free(s->layers);
    free(s->logits);
    free(s->last_hc);
    memset(s, 0, sizeof *s);
}

/* ----------------------------------------------------------------------------
 * 6.3 Hyper-connections (mHC).
 *
 * Instead of one residual stream, every token carries n = 4 streams X[h] of
 * width D. Around each sublayer, a tiny learned mixer decides how to read
 * from the streams and how to write back:
 *
 *     x^  = flatten(X)                            [n*D]
 *     rr  = 1 / sqrt(mean(x^^2) + eps)
 *     m   = rr * (fn . x^)                        [M = (2+n)*n]
 *     pre[h]  = sigmoid(m[h] s_pre + base[h]) + eps_hc             h < n
 *     post[h] = 2 sigmoid(m[n+h] s_post + base[n+h])
 *     C[j][k] = m[2n + j n + k] s_comb + base[2n + j n + k]       -> sinkhorn(C)
 *     y       = sum_h pre[h] X[h]                 sublayer input (then RMSNorm)
 *
 * and after the sublayer produced f:
 *
 *     Xout[k] = post[k] f + sum_j C[j][k] Xin[j]  (C's first index is the SOURCE)
 *
 * The fn . x^ products of a whole chunk are one matmul; the rest is per token.
 * ------------------------------------------------------------------------- */

/* Sinkhorn-Knopp: a row softmax, +eps, then alternate column and row
 * normalisations, T column steps and T-1 row steps in all, ending on a
 * column step. C is n x n, row-major, C[j][k] = c[j*n + k]. */
static void sinkhorn(float *c, int n, int iters, float eps) {
    for (int j = 0; j < n; j++) {
        float mx = -INFINITY, sum = 0;
        for (int k = 0; k < n; k++) mx = fmaxf(mx, c[j * n + k]);
        for (int k = 0; k < n; k++) sum += (c[j * n + k] = expf(c[j * n + k] - mx));
        for (int k = 0; k < n; k++) c[j * n + k] = c[j * n + k] / sum + eps;
    }
    for (int it = 0; it < iters; it++) {
        if (it > 0) {
            for (int j = 0; j < n; j++) {
                float sum = 0;
                for (int k = 0; k < n; k++) sum += c[j * n + k];
                for (int k = 0; k < n; k++) c[j * n + k] /= sum + eps;
            }
        }
        for (int k = 0; k < n; k++) {
            float sum = 0;
            for (int j = 0; j < n; j++) sum += c[j * n + k];
            for (int j = 0; j < n; j++) c[j * n + k] /= sum + eps;
        }
    }
}

static float hc_inverse_rms(const float *x, int64_t n, float eps) {
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    return (float)(1.0 / sqrt(ss / (double)n + eps));
}

struct hc_mix {
    float pre[16], post[16], comb[256];
};

/* Turn the raw m = fn . x^ of one token into its pre/post/comb weights and
 * collapse the streams into the sublayer input y (not yet normed). */
static void hc_pre(const struct ds4_config *c, const float *X, const float *raw_mix,
                   const float *scale, const float *base, struct hc_mix *mix, float *y) {
    int n = c->hc, D = c->dim;
    float rr = hc_inverse_rms(X, (int64_t)n * D, c->norm_eps);
    for (int h = 0; h < n; h++) {
        mix->pre[h] = sigmoidf(raw_mix[h] * rr * scale[0] + base[h]) + c->hc_eps;
        mix->post[h] = 2.0f * sigmoidf(raw_mix[n + h] * rr * scale[1] + base[n + h]);
    }
    for (int i = 0; i < n * n; i++)
        mix->comb[i] = raw_mix[2 * n + i] * rr * scale[2] + base[2 * n + i];
    sinkhorn(mix->comb, n, c->sinkhorn_iters, c->hc_eps);
    for (int d = 0; d < D; d++) {
        float acc = 0;
        for (int h = 0; h < n; h++) acc += mix->pre[h] * X[(int64_t)h * D + d];
        y[d] = acc;
    }
}

/* Xout[k][d] = post[k] f[d] + sum_j C[j][k] Xin[j][d], in place on X. */
static void hc_post(const struct ds4_config *c, float *X, const float *f, const struct hc_mix *mix,
                    float *tmp) {
    int n = c->hc, D = c->dim;
    memcpy(tmp, X, (size_t)n * D * sizeof(float));
    for (int k = 0; k < n; k++) {
        float *out = X + (int64_t)k * D;
        for (int d = 0; d < D; d++) {
            float acc = mix->post[k] * f[d];
            for (int j = 0; j < n; j++) acc += mix->comb[j * n + k] * tmp[(int64_t)j * D + d];
            out[d] = acc;
        }
    }
}

/* The output head's collapse: like hc_pre's `pre`, with no Sinkhorn, no post.
 *     w[h] = sigmoid(rr (fn_h . x^) scale + base[h]) + eps_hc;   y = sum_h w[h] X[h] */
static void hc_head_collapse(const struct ds4_config *c, const float *X, const float *raw_mix,
                             const float *scale, const float *base, float *y) {
    int n = c->hc, D = c->dim;
    float rr = hc_inverse_rms(X, (int64_t)n * D, c->norm_eps);
    float w[16];
    for (int h = 0; h < n; h++) w[h] = sigmoidf(raw_mix[h] * rr * scale[0] + base[h]) + c->hc_eps;
    for (int d = 0; d < D; d++) {
        float acc = 0;
        for (int h = 0; h < n; h++) acc += w[h] * X[(int64_t)h * D + d];
        y[d] = acc;
    }
}

/* ----------------------------------------------------------------------------
 * 6.4 The compressors.
 *
 * Beyond the sliding window, a compressed layer sees the whole past through
 * "compressed rows": every r consecutive tokens are pooled into one K=V row.
 * Each token projects its normed input a to a value k and a gate score z
 * (plus a learned bias for its slot in the window); per channel j, a softmax
 * over the window's tokens weighs the values:
 *
 *     k_t = Wkv a_t,   z_t = Wgate a_t + ape[p_t mod r]          [coff*Dc] each
 *     pooled[j] = sum_t softmax_t(z_t[j]) k_t[j]
 *
 * Ratio-128 layers pool disjoint windows. Ratio-4 layers overlap: each token
 * projects two halves; the first half (A) of window w-1 and the second half
 * (B) of window w are pooled together into row w, so row w covers tokens
 * 4w-4 .. 4w+3:
 *
 *     tokens:   | w-1: t t t t | w: t t t t |
 *     halves:      A A A A        B B B B     -> 8 candidates per channel
 *
 * Row w is finished when its window's last token arrives, before that
 * token's own attention, so the token already sees it. Finishing: RMSNorm,
 * RoPE at the row's position w*r (its first token), then the KV format's
 * round trip (FP8 for attention rows; Hadamard + FP4 for indexer rows).
 *
 * Streaming form. The state holds the kv/score rows of the window in
 * progress (slots r..2r-1 for overlap layers, 0..r-1 otherwise) and, for
 * overlap layers, the previous window in slots 0..r-1. Prefill and decode
 * both feed tokens through it one by one, which is what makes them agree.
 *
 *     slot = (coff == 2 ? r : 0) + p mod r
 *     state[slot] = (k_t, z_t)
 *     if (p+1) mod r == 0:  pool, finish, and (overlap) shift slots r..2r-1 down
 * ------------------------------------------------------------------------- */

/* Pool channel j over the candidates: (score, value) pairs, where a -inf
 * score (a slot no token has filled yet) contributes nothing. With overlap,
 * slots 0..r-1 (previous window) are read in the A half, column j, and
 * slots r..2r-1 (this window) in the B half, column dc + j. */
static float pool_channel(const struct compressor_state *cs, int j) {
    int r = cs->ratio, width = cs->coff * cs->dc, n = cs->coff * r;
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) {
        int col = (cs->coff == 2 && i >= r) ? cs->dc + j : j;
        mx = fmaxf(mx, cs->score[i * width + col]);
    }
    if (mx == -INFINITY) return 0.0f;
    float num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        int col = (cs->coff == 2 && i >= r) ? cs->dc + j : j;
        float z = cs->score[i * width + col];
        if (z == -INFINITY) continue;
        float p = expf(z - mx);
        den += p;
        num += p * cs->kv[i * width + col];
    }
    return num / den;
}

/* Push one token's projections; returns true and fills `pooled` [dc] when
 * this token completes a window. */
static bool compressor_push(struct compressor_state *cs, const float *k, const float *z,
                            int64_t pos, float *pooled) {
    int r = cs->ratio, width = cs->coff * cs->dc;
    int slot = (cs->coff == 2 ? r : 0) + (int)(pos % r);
    memcpy(cs->kv + (size_t)slot * width, k, (size_t)width * sizeof(float));
    memcpy(cs->score + (size_t)slot * width, z, (size_t)width * sizeof(float));
    if ((pos + 1) % r != 0) return false;
    for (int j = 0; j < cs->dc; j++) pooled[j] = pool_channel(cs, j);
    if (cs->coff == 2) {
        size_t half = (size_t)r * width;
        memcpy(cs->kv, cs->kv + half, half * sizeof(float));
        memcpy(cs->score, cs->score + half, half * sizeof(float));
    }
    return true;
}

/* ----------------------------------------------------------------------------
 * 6.5 Working memory for one chunk.
 *
 * A forward call processes a chunk of T consecutive tokens layer by layer.
 * All intermediate arrays for the chunk are allocated once per call, sized
 * for T, and reused by every layer (and by the MTP block).
 * ------------------------------------------------------------------------- */

struct chunk_work {
    int T;
    float *mix;        /* [T][M]        raw hyper-connection mixes */
    struct hc_mix *hc; /* [T]           their decoded pre/post/comb */
    float *a;          /* [T][D]        normed sublayer input */
    float *f;          /* [T][D]        sublayer output */
    float *y;          /* [T][D]        collapsed streams */
    float *tmp;        /* [n*D]         hc_post's copy of the old streams */
    float *qr;         /* [T][Q]        low-rank query (also feeds the indexer) */
    float *q;          /* [T][H*Dh]     query heads */
    float *o;          /* [T][H*Dh]     attention output heads */
    float *kv;         /* [T][Dh]       this chunk's K=V rows */
    float *ck, *cz;    /* [T][2*Dh]     compressor values and scores */
    float *ik, *iz;    /* [T][2*DI]     indexer-compressor values and scores */
    float *iq;         /* [T][HI*DI]    indexer queries */
    float *iw;         /* [T][HI]       indexer head weights */
    float *low;        /* [T][G*O]      grouped output projection */
    float *pooled;     /* [Dh]          one pooled compressor row */
    int64_t *visible;  /* [T]           compressed rows visible to token t */
    int *sel;          /* [T][KI]       indexer-selected rows */
    int *n_sel;        /* [T]           how many, or -1 = all visible rows */
    float *router;     /* [T][E]        router logits */
    int *route_sel;    /* [T][K]        chosen experts */
    float *route_wt;   /* [T][K]        their weights */
    int *expert_tokens;/* [T*K]         tokens grouped by expert (slots) */
    int *expert_count; /* [E+1]         group boundaries */
    float *xe, *ye;    /* [T][D]        gathered expert inputs and outputs */
    float *hg, *hu;    /* [T][F]        expert gate and up activations */
    float *xm;         /* [T][n*D]      MTP block streams */
    float *hn;         /* [T][n*D]      MTP: normed main streams */
};

static void chunk_work_init(struct chunk_work *w, const struct ds4_config *c, int T) {
    size_t t = (size_t)T, n_d = (size_t)c->hc * c->dim, D = (size_t)c->dim;
    size_t heads = (size_t)c->n_heads * c->head_dim, K = (size_t)c->n_used;
    memset(w, 0, sizeof *w);
    w->T = T;
    w->mix = xcalloc(t * (size_t)(2 + c->hc) * c->hc, sizeof(float));
    w->hc = xcalloc(t, sizeof(struct hc_mix));
    w->a = xcalloc(t * D, sizeof(float));
    w->f = xcalloc(t * D, sizeof(float));
    w->y = xcalloc(t * D, sizeof(float));
    w->tmp = xcalloc(n_d, sizeof(float));
    w->qr = xcalloc(t * (size_t)c->q_rank, sizeof(float));
    w->q = xcalloc(t * heads, sizeof(float));
    w->o = xcalloc(t * heads, sizeof(float));
    w->kv = xcalloc(t * (size_t)c->head_dim, sizeof(float));
    w->ck = xcalloc(t * 2 * (size_t)c->head_dim, sizeof(float));
    w->cz = xcalloc(t * 2 * (size_t)c->head_dim, sizeof(float));
    w->ik = xcalloc(t * 2 * (size_t)c->idx_dim, sizeof(float));
    w->iz = xcalloc(t * 2 * (size_t)c->idx_dim, sizeof(float));
    w->iq = xcalloc(t * (size_t)c->idx_heads * c->idx_dim, sizeof(float));
    w->iw = xcalloc(t * (size_t)c->idx_heads, sizeof(float));
    w->low = xcalloc(t * (size_t)c->o_groups * c->o_rank, sizeof(float));
    w->pooled = xcalloc((size_t)c->head_dim, sizeof(float));
    w->visible = xcalloc(t, sizeof(int64_t));
    w->sel = xcalloc(t * (size_t)c->idx_topk, sizeof(int));
    w->n_sel = xcalloc(t, sizeof(int));
    w->router = xcalloc(t * (size_t)c->n_experts, sizeof(float));
    w->route_sel = xcalloc(t * K, sizeof(int));
    w->route_wt = xcalloc(t * K, sizeof(float));
    w->expert_tokens = xcalloc(t * K, sizeof(int));
    w->expert_count = xcalloc((size_t)c->n_experts + 1, sizeof(int));
    w->xe = xcalloc(t * D, sizeof(float));
    w->ye = xcalloc(t * D, sizeof(float));
    w->hg = xcalloc(t * (size_t)c->ffn_dim, sizeof(float));
    w->hu = xcalloc(t * (size_t)c->ffn_dim, sizeof(float));
    w->xm = xcalloc(t * n_d, sizeof(float));
    w->hn = xcalloc(t * n_d, sizeof(float));
}

static void chunk_work_free(struct chunk_work *w) {
    void *all[] = { w->mix, w->hc, w->a, w->f, w->y, w->tmp, w->qr, w->q, w->o, w->kv, w->ck,
                    w->cz, w->ik, w->iz, w->iq, w->iw, w->low, w->pooled, w->visible, w->sel,
                    w->n_sel, w->router, w->route_sel, w->route_wt, w->expert_tokens,
                    w->expert_count, w->xe, w->ye, w->hg, w->hu, w->xm, w->hn };
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]);
    memset(w, 0, sizeof *w);
}

/* ----------------------------------------------------------------------------
 * 6.6 Attention.
 *
 * Query path (per token, H heads of width Dh):
 *
 *     qr  = rmsnorm(Wq_a a, q_norm)                 [Q]
 *     q_h = rmsnorm(Wq_b qr)_h  (no gain), then RoPE on its tail at p
 *
 * Key/value path: ONE head shared by all query heads, and the key is the
 * value:
 *
 *     kv  = rmsnorm(Wkv a, kv_norm); RoPE tail at p; FP8 round trip on the rest
 *
 * Each head attends over the raw rows of the last W positions (itself
 * included) plus, on compressed layers, compressed rows (all of them at
 * ratio 128, the indexer's choice at ratio 4), in ONE softmax that also
 * holds a learned per-head "sink" logit with no value:
 *
 *     l_j = q_h . k_j / sqrt(Dh)
 *     o_h = sum_j exp(l_j - mx) k_j / (exp(sink_h - mx) + sum_j exp(l_j - mx))
 *
 * Since values carry RoPE at their own positions, o_h is rotated back by
 * the query's position, leaving relative rotations. Finally a grouped
 * low-rank projection: heads split into G groups, each group's concatenated
 * heads map to O values with its own slice of Wo_a, and Wo_b maps the G*O
 * values back to D.
 * ------------------------------------------------------------------------- */

static const struct rope *layer_rope(const struct engine *eng, const struct layer_weights *L) {
    return L->ratio > 0 ? &eng->rope_compressed : &eng->rope_window;
}

static void attention_project_qkv(struct engine *eng, const struct layer_weights *L,
                                  const float *A, int64_t p0, int T, struct chunk_work *w) {
    const struct ds4_config *c = &eng->model->cfg;
    const struct rope *rope = layer_rope(eng, L);
    int Dh = c->head_dim;
    matmul(eng, w->qr, &L->q_a, A, T);
    for (int t = 0; t < T; t++) {
        float *qr = w->qr + (size_t)t * c->q_rank;
        rmsnorm(qr, qr, L->q_a_norm, c->q_rank, c->norm_eps);
    }
    matmul(eng, w->q, &L->q_b, w->qr, T);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < c->n_heads; h++) {
            float *qh = w->q + ((size_t)t * c->n_heads + h) * Dh;
            rmsnorm(qh, qh, NULL, Dh, c->norm_eps);
            rope_tail(rope, qh, Dh, p0 + t, false);
        }
    matmul(eng, w->kv, &L->kv, A, T);
    for (int t = 0; t < T; t++) {
        float *kv = w->kv + (size_t)t * Dh;
        rmsnorm(kv, kv, L->kv_norm, Dh, c->norm_eps);
        rope_tail(rope, kv, Dh, p0 + t, false);
        fp8_round_trip_nope(kv, Dh, c->rope_dim);
    }
}

/* Finish a pooled row: norm, RoPE at the row's first token, KV round trip. */
static void finish_attention_row(const struct engine *eng, const struct layer_weights *L,
                                 const float *pooled, int64_t row_pos, float *row) {
    const struct ds4_config *c = &eng->model->cfg;
    rmsnorm(row, pooled, L->comp_norm, c->head_dim, c->norm_eps);
    rope_tail(&eng->rope_compressed, row, c->head_dim, row_pos, false);
    fp8_round_trip_nope(row, c->head_dim, c->rope_dim);
}

static void finish_indexer_row(const struct engine *eng, const struct layer_weights *L,
                               const float *pooled, int64_t row_pos, float *row) {
    const struct ds4_config *c = &eng->model->cfg;
    rmsnorm(row, pooled, L->idx_norm, c->idx_dim, c->norm_eps);
    rope_tail(&eng->rope_compressed, row, c->idx_dim, row_pos, false);
    indexer_round_trip(row, c->idx_dim);
}

/* Add the positional bias of slot (p mod r) to every token's scores. */
static void add_compressor_bias(const struct matrix *ape, float *z, int64_t p0, int T, int width,
                                float *bias) {
    for (int t = 0; t < T; t++) {
        matrix_row_f32(ape, (p0 + t) % ape->out, bias);
        for (int i = 0; i < width; i++) z[(size_t)t * width + i] += bias[i];
    }
}

/* Run this chunk's tokens through the layer's compressors in order, and
 * record how many compressed rows each token may see: rows finished by a
 * LATER token of the chunk must stay invisible to earlier ones. */
static void compress_chunk(struct engine *eng, const struct layer_weights *L,
                           struct layer_state *st, const float *A, int64_t p0, int T,
                           struct chunk_work *w) {
    const struct ds4_config *c = &eng->model->cfg;
    int r = L->ratio, width = compressor_coff(r) * c->head_dim, iwidth = 2 * c->idx_dim;
    float *bias = w->tmp;   /* free here; hc_post is not running */
    matmul(eng, w->ck, &L->comp_kv, A, T);
    matmul(eng, w->cz, &L->comp_gate, A, T);
    add_compressor_bias(&L->comp_ape, w->cz, p0, T, width, bias);
    if (r == 4) {
        matmul(eng, w->ik, &L->idx_kv, A, T);
        matmul(eng, w->iz, &L->idx_gate, A, T);
        add_compressor_bias(&L->idx_ape, w->iz, p0, T, iwidth, bias);
    }
    for (int t = 0; t < T; t++) {
        int64_t p = p0 + t;
        if (compressor_push(&st->comp, w->ck + (size_t)t * width, w->cz + (size_t)t * width, p,
                            w->pooled))
            finish_attention_row(eng, L, w->pooled, p + 1 - r, row_store_append(&st->comp_rows));
        if (r == 4 && compressor_push(&st->idx_comp, w->ik + (size_t)t * iwidth,
                                      w->iz + (size_t)t * iwidth, p, w->pooled))
            finish_indexer_row(eng, L, w->pooled, p + 1 - r, row_store_append(&st->idx_rows));
        w->visible[t] = st->comp_rows.n;
    }
}

/* ----------------------------------------------------------------------------
 * 6.7 The indexer (ratio-4 layers).
 *
 * A ratio-4 layer accumulates a compressed row every 4 tokens: a quarter of
 * the whole context. Attending to all of them would cost as much as dense
 * attention, so a small "lightning indexer" picks the KI most relevant rows:
 *
 *     qI_h = Hadamard+FP4( RoPE_p( (WI_q qr)_h ) )      HI heads of DI
 *     wI   = (WI_w a) / sqrt(DI * HI)                  [HI]
 *     score[c] = sum_h wI[h] * max(0, qI_h . KI[c])    over visible rows c
 *     selected = top-KI rows by score (ties: lower row first)
 *
 * When no more than KI rows are visible, all are taken and no score is
 * needed: the result is the same.
 * ------------------------------------------------------------------------- */

static void indexer_queries(struct engine *eng, const struct layer_weights *L, const float *A,
                            int64_t p0, int T, struct chunk_work *w) {
    const struct ds4_config *c = &eng->model->cfg;
    int HI = c->idx_heads, DI = c->idx_dim;
    matmul(eng, w->iq, &L->idx_q_b, w->qr, T);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < HI; h++) {
            float *qh = w->iq + ((size_t)t * HI + h) * DI;
            rope_tail(&eng->rope_compressed, qh, DI, p0 + t, false);
            indexer_round_trip(qh, DI);
        }
    matmul(eng, w->iw, &L->idx_proj, A, T);
    float scale = 1.0f / sqrtf((float)DI * (float)HI);
    for (int64_t i = 0; i < (int64_t)T * HI; i++) w->iw[i] *= scale;
}

struct select_job {
    struct engine *eng;
    const struct layer_state *st;
    struct chunk_work *w;
};

static void select_rows_for_token(void *ctx, int64_t t, int worker) {
    struct select_job *j = ctx;
    const struct ds4_config *c = &j->eng->model->cfg;
    struct chunk_work *w = j->w;
    int64_t nv = w->visible[t];
    int HI = c->idx_heads, DI = c->idx_dim, KI = c->idx_topk;
    if (nv <= KI) {
        w->n_sel[t] = -1;
        return;
    }
    float *score = j->eng->attn_scratch[worker];
    for (int64_t r = 0; r < nv; r++) {
        const float *krow = j->st->idx_rows.rows + r * DI;
        float s = 0;
        for (int h = 0; h < HI; h++) {
            float d = dot_f32(w->iq + ((size_t)t * HI + h) * DI, krow, DI);
            if (d > 0) s += w->iw[(size_t)t * HI + h] * d;
        }
        score[r] = s;
    }
    w->n_sel[t] = topk_indices(score, (int)nv, KI, w->sel + (size_t)t * KI);
}

/* Decide, per token, which compressed rows it attends: all visible rows
 * (n_sel = -1), or the indexer's top-KI. */
static void select_compressed_rows(struct engine *eng, const struct layer_weights *L,
                                   const struct layer_state *st, const float *A, int64_t p0,
                                   int T, struct chunk_work *w) {
    const struct ds4_config *c = &eng->model->cfg;
    bool need_indexer = false;
    for (int t = 0; t < T; t++) {
        w->n_sel[t] = -1;
        if (L->ratio == 4 && w->visible[t] > c->idx_topk) need_indexer = true;
    }
    if (!need_indexer) return;
    indexer_queries(eng, L, A, p0, T, w);
    engine_reserve_attn_scratch(eng, w->visible[T - 1]);
    struct select_job j = { eng, st, w };
    parallel_for(&eng->pool, T, select_rows_for_token, &j);
}

/* ----------------------------------------------------------------------------
 * 6.8 Attending: one (token, head) pair per work item.
 *
 * Raw rows come from two places. Positions before the chunk live in the
 * ring (slot j % W); positions inside the chunk come from the chunk's own
 * kv array, because a long chunk would otherwise overwrite ring slots that
 * its earlier tokens still need. The ring is updated only after the whole
 * chunk has attended.
 * ------------------------------------------------------------------------- */

struct attend_job {
    struct engine *eng;
    const struct layer_weights *L;
    const struct layer_state *st;
    struct chunk_work *w;
    int64_t p0;
};

static const float *raw_row(const struct attend_job *j, int64_t pos) {
    const struct ds4_config *c = &j->eng->model->cfg;
    if (pos >= j->p0) return j->w->kv + (size_t)(pos - j->p0) * c->head_dim;
    return j->st->ring + (size_t)(pos % c->window) * c->head_dim;
}

static const float *compressed_row(const struct attend_job *j, int t, int64_t i) {
    int64_t r = j->w->n_sel[t] < 0 ? i : j->w->sel[(size_t)t * j->eng->model->cfg.idx_topk + i];
    return j->st->comp_rows.rows + r * j->st->comp_rows.width;
}

static void attend_one(void *ctx, int64_t item, int worker) {
    struct attend_job *j = ctx;
    const struct ds4_config *c = &j->eng->model->cfg;
    int H = c->n_heads, Dh = c->head_dim;
    int t = (int)(item / H), h = (int)(item % H);
    int64_t p = j->p0 + t;
    int64_t first = p - c->window + 1 < 0 ? 0 : p - c->window + 1;
    int64_t n_raw = p - first + 1;
    int64_t n_comp = j->L->ratio == 0 ? 0 : j->w->n_sel[t] < 0 ? j->w->visible[t] : j->w->n_sel[t];
    const float *q = j->w->q + ((size_t)t * H + h) * Dh;
    float *o = j->w->o + ((size_t)t * H + h) * Dh;
    float *logit = j->eng->attn_scratch[worker];
    float scale = 1.0f / sqrtf((float)Dh), sink = j->L->sinks[h], mx = sink;

    for (int64_t i = 0; i < n_raw + n_comp; i++) {
        const float *k = i < n_raw ? raw_row(j, first + i) : compressed_row(j, t, i - n_raw);
        logit[i] = dot_f32(q, k, Dh) * scale;
        mx = fmaxf(mx, logit[i]);
    }
    float den = expf(sink - mx);
    memset(o, 0, (size_t)Dh * sizeof(float));
    for (int64_t i = 0; i < n_raw + n_comp; i++) {
        const float *k = i < n_raw ? raw_row(j, first + i) : compressed_row(j, t, i - n_raw);
        float pw = expf(logit[i] - mx);
        den += pw;
        axpy_f32(o, pw, k, Dh);
    }
    float inv = 1.0f / den;
    for (int d = 0; d < Dh; d++) o[d] *= inv;
    rope_tail(layer_rope(j->eng, j->L), o, Dh, p, true);
}

static void attend_chunk(struct engine *eng, const struct layer_weights *L,
                         struct layer_state *st, int64_t p0, int T, struct chunk_work *w) {
    const struct ds4_config *c = &eng->model->cfg;
    int64_t most_comp = 0;
    for (int t = 0; t < T; t++) {
        int64_t n = L->ratio == 0 ? 0 : w->n_sel[t] < 0 ? w->visible[t] : w->n_sel[t];
        if (n > most_comp) most_comp = n;
    }
    engine_reserve_attn_scratch(eng, c->window + most_comp);
    struct attend_job j = { eng, L, st, w, p0 };
    parallel_for(&eng->pool, (int64_t)T * c->n_heads, attend_one, &j);

    /* Only now may the chunk's rows enter the ring. */
    for (int t = T > c->window ? T - c->window : 0; t < T; t++)
        memcpy(st->ring + (size_t)((p0 + t) % c->window) * c->head_dim,
               w->kv + (size_t)t * c->head_dim, (size_t)c->head_dim * sizeof(float));
}

/* f = Wo_b . concat_g( Wo_a[g] . concat(heads of group g) ) */
static void attention_output(struct engine *eng, const struct layer_weights *L, int T,
                             struct chunk_work *w, float *F) {
    const struct ds4_config *c = &eng->model->cfg;
    int64_t group_in = (int64_t)c->n_heads / c->o_groups * c->head_dim;
    int64_t all_heads = (int64_t)c->n_heads * c->head_dim, low_width = (int64_t)c->o_groups * c->o_rank;
    for (int g = 0; g < c->o_groups; g++) {
        struct matrix part = L->out_a;
        part.data = matrix_row(&L->out_a, (int64_t)g * c->o_rank);
        part.out = c->o_rank;
        matmul_strided(eng, w->low + (int64_t)g * c->o_rank, low_width, &part,
                       w->o + g * group_in, all_heads, T);
    }
    matmul(eng, F, &L->out_b, w->low, T);
}

static void attention_chunk(struct engine *eng, const struct layer_weights *L,
                            struct layer_state *st, const float *A, int64_t p0, int T,
                            struct chunk_work *w, float *F) {
    attention_project_qkv(eng, L, A, p0, T, w);
    if (L->ratio > 0) {
        compress_chunk(eng, L, st, A, p0, T, w);
        select_compressed_rows(eng, L, st, A, p0, T, w);
    }
    attend_chunk(eng, L, st, p0, T, w);
    attention_output(eng, L, T, w, F);
}

/* ----------------------------------------------------------------------------
 * 6.9 Mixture of experts.
 *
 * A router scores every expert; each token uses K of E routed experts plus
 * one shared expert that every token uses:
 *
 *     s_e = sqrt(softplus(router_e . b))
 *     chosen = first NH layers: tid2eid[token]   (a fixed hash table by token id)
 *              other layers:   top-K of s_e + bias_e   (bias only for choosing)
 *     w_k = route_scale * s_{chosen_k} / sum_k s_{chosen_k}
 *
 * Every expert is a clamped SwiGLU of width F:
 *
 *     g = min(W1 b, limit);  u = clamp(W3 b, -limit, limit)
 *     expert(b) = W2 (silu(g) * u * w)             (w applied before W2)
 *
 * For a chunk, tokens are grouped by expert so that each expert's weights
 * are read once for all the tokens that chose it.
 * ------------------------------------------------------------------------- */

static void route_token(const struct ds4_config *c, const struct layer_weights *L,
                        const float *logits, int32_t token, int *sel, float *wt) {
    float score[1024], biased[1024];
    int E = c->n_experts, K = c->n_used;
    for (int e = 0; e < E; e++) score[e] = sqrtf(softplusf(logits[e]));
    if (L->hash_routed) {
        for (int k = 0; k < K; k++) sel[k] = L->tid2eid[(int64_t)token * K + k];
    } else {
        for (int e = 0; e < E; e++) biased[e] = score[e] + (L->router_bias ? L->router_bias[e] : 0);
        topk_indices(biased, E, K, sel);
    }
    float sum = 0;
    for (int k = 0; k < K; k++) sum += score[sel[k]];
    for (int k = 0; k < K; k++) wt[k] = score[sel[k]] / sum * c->route_scale;
}

/* Y[i] = W2 (silu(min(W1 X[i], lim)) * clamp(W3 X[i], -lim, lim) * weight[i]) */
static void run_expert(struct engine *eng, const struct matrix *gate, const struct matrix *up,
                       const struct matrix *down, const float *X, const float *weight, int n,
                       float limit, struct chunk_work *w, float *Y) {
    int F = (int)gate->out;
    matmul(eng, w->hg, gate, X, n);
    matmul(eng, w->hu, up, X, n);
    for (int i = 0; i < n; i++)
        for (int f = 0; f < F; f++) {
            float g = w->hg[(size_t)i * F + f], u = w->hu[(size_t)i * F + f];
            if (limit > 0) {
                g = fminf(g, limit);
                u = fminf(fmaxf(u, -limit), limit);
            }
            w->hg[(size_t)i * F + f] = siluf(g) * u * (weight ? weight[i] : 1.0f);
        }
    matmul(eng, Y, down, w->hg, n);
}

/* Bucket the chunk's (token, k) choices by expert: a counting sort. */
static void group_by_expert(const struct ds4_config *c, int T, struct chunk_work *w) {
    int E = c->n_experts, K = c->n_used;
    memset(w->expert_count, 0, (size_t)(E + 1) * sizeof(int));
    for (int i = 0; i < T * K; i++) w->expert_count[w->route_sel[i] + 1]++;
    for (int e = 0; e < E; e++) w->expert_count[e + 1] += w->expert_count[e];
    int *fill = w->expert_tokens;
    int cursor[1024];
    for (int e = 0; e < E; e++) cursor[e] = w->expert_count[e];
    for (int i = 0; i < T * K; i++) fill[cursor[w->route_sel[i]]++] = i;
}

static void moe_chunk(struct engine *eng, const struct layer_weights *L, const float *B,
                      const int32_t *tokens, int T, struct chunk_work *w, float *G) {
    const struct ds4_config *c = &eng->model->cfg;
    int D = c->dim, K = c->n_used;
    matmul(eng, w->router, &L->router, B, T);
    for (int t = 0; t < T; t++)
        route_token(c, L, w->router + (size_t)t * c->n_experts, tokens[t],
                    w->route_sel + (size_t)t * K, w->route_wt + (size_t)t * K);
    group_by_expert(c, T, w);
    memset(G, 0, (size_t)T * D * sizeof(float));
    float weights[4096];
    for (int e = 0; e < c->n_experts; e++) {
        int begin = w->expert_count[e], n = w->expert_count[e + 1] - begin;
        for (int done = 0; done < n; done += 4096) {
            int m = n - done < 4096 ? n - done : 4096;
            for (int i = 0; i < m; i++) {
                int slot = w->expert_tokens[begin + done + i];
                memcpy(w->xe + (size_t)i * D, B + (size_t)(slot / K) * D, (size_t)D * sizeof(float));
                weights[i] = w->route_wt[slot];
            }
            struct matrix g = expert_slice(&L->gate_exps, e), u = expert_slice(&L->up_exps, e),
                          d = expert_slice(&L->down_exps, e);
            run_expert(eng, &g, &u, &d, w->xe, weights, m, L->swiglu_limit, w, w->ye);
            for (int i = 0; i < m; i++) {
                int t = w->expert_tokens[begin + done + i] / K;
                for (int x = 0; x < D; x++) G[(size_t)t * D + x] += w->ye[(size_t)i * D + x];
            }
        }
    }
    run_expert(eng, &L->gate_shexp, &L->up_shexp, &L->down_shexp, B, NULL, T, L->swiglu_limit, w,
               w->ye);
    for (size_t i = 0; i < (size_t)T * D; i++) G[i] += w->ye[i];
}

/* ----------------------------------------------------------------------------
 * 6.10 One block, for a chunk of T tokens: X is [T][n][D], updated in place.
 *
 *     (y, mix) = hc_pre(X);  a = rmsnorm(y, attn_norm);  X = hc_post(attention(a), X, mix)
 *     (y, mix) = hc_pre(X);  b = rmsnorm(y, ffn_norm);   X = hc_post(moe(b), X, mix)
 * ------------------------------------------------------------------------- */

static void hc_collapse_chunk(struct engine *eng, const struct matrix *fn, const float *scale,
                              const float *base, const float *norm, float *X, int T,
                              struct chunk_work *w, float *out) {
    const struct ds4_config *c = &eng->model->cfg;
    int M = (2 + c->hc) * c->hc;
    int64_t nD = (int64_t)c->hc * c->dim;
    matmul(eng, w->mix, fn, X, T);
    for (int t = 0; t < T; t++) {
        hc_pre(c, X + t * nD, w->mix + (size_t)t * M, scale, base, &w->hc[t], w->y);
        rmsnorm(out + (size_t)t * c->dim, w->y, norm, c->dim, c->norm_eps);
    }
}

static void hc_expand_chunk(const struct ds4_config *c, float *X, const float *F, int T,
                            struct chunk_work *w) {
    int64_t nD = (int64_t)c->hc * c->dim;
    for (int t = 0; t < T; t++) hc_post(c, X + t * nD, F + (size_t)t * c->dim, &w->hc[t], w->tmp);
}

static void block_chunk(struct engine *eng, const struct layer_weights *L, struct layer_state *st,
                        float *X, const int32_t *tokens, int64_t p0, int T, struct chunk_work *w) {
    const struct ds4_config *c = &eng->model->cfg;
    hc_collapse_chunk(eng, &L->hc_attn_fn, L->hc_attn_scale, L->hc_attn_base, L->attn_norm, X, T,
                      w, w->a);
    attention_chunk(eng, L, st, w->a, p0, T, w, w->f);
    hc_expand_chunk(c, X, w->f, T, w);
    hc_collapse_chunk(eng, &L->hc_ffn_fn, L->hc_ffn_scale, L->hc_ffn_base, L->ffn_norm, X, T, w,
                      w->a);
    moe_chunk(eng, L, w->a, tokens, T, w, w->f);
    hc_expand_chunk(c, X, w->f, T, w);
}

/* ----------------------------------------------------------------------------
 * 6.11 The output head: collapse the streams, norm, project to the vocab.
 *
 *     w[h] = sigmoid(rr (hc_fn_h . x^) hc_scale + hc_base[h]) + eps_hc
 *     logits = Wout . rmsnorm(sum_h w[h] X[h], norm)
 * ------------------------------------------------------------------------- */

static void head_chunk(struct engine *eng, const struct matrix *hc_fn, const float *hc_scale,
                       const float *hc_base, const float *norm, const float *X, int T,
                       struct chunk_work *w, float *logits) {
    const struct ds4_config *c = &eng->model->cfg;
    int64_t nD = (int64_t)c->hc * c->dim;
    matmul(eng, w->mix, hc_fn, X, T);
    for (int t = 0; t < T; t++) {
        float *y = w->a + (size_t)t * c->dim;
        hc_head_collapse(c, X + t * nD, w->mix + (size_t)t * c->hc, hc_scale, hc_base, y);
        rmsnorm(y, y, norm, c->dim, c->norm_eps);
    }
    matmul(eng, logits, &eng->model->output, w->a, T);
}

/* ----------------------------------------------------------------------------
 * 6.12 The MTP block.
 *
 * DeepSeek V4 ships one multi-token-prediction block: a full extra layer
 * that, given the main model's final streams at position i and the embedding
 * of token i+1, predicts token i+2. Its input:
 *
 *     e     = We_proj . rmsnorm(embed[t_{i+1}], enorm)               [D]
 *     X[h]  = Wh_proj . rmsnorm(Hmain_i[h], hnorm) + e               per stream
 *
 * then the block at position i (window-only attention with its own ring),
 * its own HC head and norm, and the SHARED output matrix. Row i can only be
 * computed once token i+1 is known, so the MTP block runs one position
 * behind the main model; over a prompt it fills its window exactly as the
 * official code does.
 * ------------------------------------------------------------------------- */

static void embed_tokens(const struct model *m, const int32_t *tokens, int T, float *out) {
    for (int t = 0; t < T; t++)
        dequant_row_ref(m->token_embd.type, matrix_row(&m->token_embd, tokens[t]),
                        out + (size_t)t * m->cfg.dim, m->cfg.dim);
}

/* MTP rows for positions p0-1 .. p0+T-2 (those >= 0). X holds the main
 * model's final streams for the chunk; s->last_hc those of position p0-1. */
static void mtp_chunk(struct session *s, const int32_t *tokens, const float *X, int T,
                      struct chunk_work *w, float *mtp_logits) {
    struct engine *eng = s->eng;
    const struct model *m = eng->model;
    const struct ds4_config *c = &m->cfg;
    const struct mtp_weights *mw = &m->mtp;
    int n = c->hc, D = c->dim, first = s->pos == 0 ? 1 : 0, Tm = T - first;
    int64_t nD = (int64_t)n * D;
    if (Tm <= 0) return;
    embed_tokens(m, tokens + first, Tm, w->y);
    for (int i = 0; i < Tm; i++) {
        float *e = w->y + (size_t)i * D;
        rmsnorm(e, e, mw->enorm, D, c->norm_eps);
        const float *hin = first + i == 0 ? s->last_hc : X + (first + i - 1) * nD;
        for (int h = 0; h < n; h++)
            rmsnorm(w->hn + i * nD + (int64_t)h * D, hin + (int64_t)h * D, mw->hnorm, D, c->norm_eps);
    }
    matmul(eng, w->f, &mw->e_proj, w->y, Tm);
    matmul(eng, w->xm, &mw->h_proj, w->hn, Tm * n);
    for (int i = 0; i < Tm; i++)
        for (int h = 0; h < n; h++)
            for (int d = 0; d < D; d++) w->xm[i * nD + (int64_t)h * D + d] += w->f[(size_t)i * D + d];
    block_chunk(eng, &mw->block, &s->mtp_state, w->xm, tokens + first, s->mtp_pos, Tm, w);
    if (mtp_logits)
        head_chunk(eng, &mw->hc_head_fn, mw->hc_head_scale, mw->hc_head_base, mw->norm, w->xm, Tm,
                   w, mtp_logits + (size_t)first * c->vocab);
    s->mtp_pos += Tm;
}

/* ============================================================================
 * Chapter 7. The story: advancing a session by a chunk of tokens
 * ============================================================================
 *
 * This is the forward pass from end to end. Everything above is a chapter
 * of it. Prefill calls it with a long chunk, decode with one token; since
 * every per-position rule (window, compressor, indexer visibility, hash
 * routing) is applied token by token in position order, both produce the
 * same numbers.
 *
 *   tokens [T] at positions P .. P+T-1
 *     |
 *     embed, copy into n streams                        X: [T][n][D]
 *     for each layer: X = block(X)                      (6.10)
 *     logits = head(X)                                  last row, or all rows
 *     MTP rows P-1 .. P+T-2 (when an MTP file is loaded)
 *     P += T
 * ------------------------------------------------------------------------- */

struct forward_request {
    float *all_logits;    /* [T][V]: logits of every position, or NULL */
    float *mtp_logits;    /* [T][V]: row t = MTP row of position P-1+t, or NULL */
};

static bool session_forward(struct session *s, const int32_t *tokens, int T,
                            const struct forward_request *req, struct ds4_error *e) {
    struct engine *eng = s->eng;
    const struct model *m = eng->model;
    const struct ds4_config *c = &m->cfg;
    int64_t nD = (int64_t)c->hc * c->dim, p0 = s->pos;
    if (T < 1) return fail(e, "nothing to process (empty chunk)");
    for (int t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= c->vocab)
            return fail(e, "token id %d at chunk offset %d is outside the vocabulary (0..%d)",
                        tokens[t], t, c->vocab - 1);

    struct chunk_work w;
    chunk_work_init(&w, c, T);
    float *X = xmalloc((size_t)T * nD * sizeof(float));

    /* Embedding: every stream starts as the same copy of the token's row. */
    embed_tokens(m, tokens, T, w.f);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < c->hc; h++)
            memcpy(X + t * nD + (int64_t)h * c->dim, w.f + (size_t)t * c->dim,
                   (size_t)c->dim * sizeof(float));

    /* The layers. */
    for (int l = 0; l < c->n_layers; l++)
        block_chunk(eng, &m->layers[l], &s->layers[l], X, tokens, p0, T, &w);

    /* The head: every row if asked (the checker wants them), else the last. */
    if (req && req->all_logits) {
        head_chunk(eng, &m->hc_head_fn, m->hc_head_scale, m->hc_head_base, m->output_norm, X, T,
                   &w, req->all_logits);
        memcpy(s->logits, req->all_logits + (size_t)(T - 1) * c->vocab,
               (size_t)c->vocab * sizeof(float));
    } else {
        head_chunk(eng, &m->hc_head_fn, m->hc_head_scale, m->hc_head_base, m->output_norm,
                   X + (T - 1) * nD, 1, &w, s->logits);
    }

    /* The MTP block runs one position behind, fed by these streams. */
    if (m->has_mtp) mtp_chunk(s, tokens, X, T, &w, req ? req->mtp_logits : NULL);
    memcpy(s->last_hc, X + (T - 1) * nD, (size_t)nD * sizeof(float));
    s->pos += T;

    free(X);
    chunk_work_free(&w);
    return true;
}

/* Feed any number of tokens in chunks of at most `chunk` tokens. */
static bool session_feed(struct session *s, const int32_t *tokens, int64_t n, int chunk,
                         struct ds4_error *e) {
    for (int64_t done = 0; done < n; done += chunk) {
        int T = (int)(n - done < chunk ? n - done : chunk);
        if (!session_forward(s, tokens + done, T, NULL, e)) return false;
    }
    return true;
}

/* ============================================================================
 * Chapter 8. Sampling
 * ============================================================================
 *
 * From logits to the next token. Temperature 0 means greedy: the highest
 * logit, and between equal logits the lower id (the same tie rule as every
 * other top-k in this file). Otherwise the filters run in the usual order:
 *
 *     p_i = softmax(logit_i / temperature)
 *     keep the top_k most likely (top_k > 0)
 *     drop tokens with p_i < min_p * max_j p_j (min_p > 0)
 *     keep the smallest prefix, most likely first, whose mass reaches top_p
 *     draw from what is left, renormalised
 *
 * The generator is splitmix64, seeded by --seed, so a seeded run repeats.
 * ------------------------------------------------------------------------- */

struct sampler_options {
    float temperature, top_p, min_p;
    int top_k;
    uint64_t seed;
};

struct sampler {
    struct sampler_options opt;
    uint64_t state;
    int *order;           /* [vocab] candidate ids */
    float *prob;          /* [vocab] their probabilities */
};

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double random_unit(uint64_t *state) {
    return (double)(splitmix64(state) >> 11) * (1.0 / 9007199254740992.0);
}

static void sampler_init(struct sampler *sp, struct sampler_options opt, int vocab) {
    sp->opt = opt;
    sp->state = opt.seed;
    sp->order = xmalloc((size_t)vocab * sizeof(int));
    sp->prob = xmalloc((size_t)vocab * sizeof(float));
}

static void sampler_free(struct sampler *sp) {
    free(sp->order);
    free(sp->prob);
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static const float *sort_probs;
static int by_prob_desc(const void *a, const void *b) {
    int ia = *(const int *)a, ib = *(const int *)b;
    if (sort_probs[ia] != sort_probs[ib]) return sort_probs[ia] > sort_probs[ib] ? -1 : 1;
    return ia - ib;
}

static int sample_token(struct sampler *sp, const float *logits, int vocab) {
    const struct sampler_options *o = &sp->opt;
    if (o->temperature <= 0) return argmax(logits, vocab);
    float mx = logits[argmax(logits, vocab)];
    for (int i = 0; i < vocab; i++) sp->prob[i] = expf((logits[i] - mx) / o->temperature);
    /* Unnormalised, the most likely token has weight exactly 1, so the min_p
     * floor "min_p * max_j p_j" is simply min_p. */
    int n = 0;
    float keep_above = o->min_p > 0 ? o->min_p : 0;
    for (int i = 0; i < vocab; i++)
        if (sp->prob[i] >= keep_above) sp->order[n++] = i;
    sort_probs = sp->prob;
    qsort(sp->order, (size_t)n, sizeof(int), by_prob_desc);
    if (o->top_k > 0 && n > o->top_k) n = o->top_k;
    double mass = 0, kept_total = 0;
    for (int i = 0; i < n; i++) kept_total += sp->prob[sp->order[i]];
    if (o->top_p > 0 && o->top_p < 1) {
        int cut = 0;
        while (cut < n && mass < o->top_p * kept_total) mass += sp->prob[sp->order[cut++]];
        n = cut;
        kept_total = mass;
    }
    double r = random_unit(&sp->state) * kept_total, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += sp->prob[sp->order[i]];
        if (r < acc) return sp->order[i];
    }
    return sp->order[n - 1];
}

/* ============================================================================
 * Chapter 9. JSON
 * ============================================================================ */
#include "staging/json.c"

/* ============================================================================
 * Chapter 10. Tools built on the engine: the oracle checker and the bench
 * ============================================================================
 *
 * 10.1 --check-vectors FILE.json
 *
 * The oracle vectors come from DeepSeek's own inference code on a tiny model
 * with the exact V4 structure. Each case is a token sequence with reference
 * logits at some positions and the reference argmax at every position. We
 * run every case twice:
 *
 *   "own"      the case's own schedule: prefill `prefill` tokens in one call,
 *              then decode the rest one token at a time;
 *   "chunk7"   the whole sequence in chunks of 7 tokens.
 *
 * The oracle is itself discontinuous (FP8/FP4 rounding and top-k choices
 * flip on tiny differences), so it is compared statistically. With the
 * relative error of a row defined as max_i |ours_i - ref_i| / max_i |ref_i|,
 * a run passes when, over the check positions:
 *
 *     median <= 2e-3,   90th percentile <= 1e-2,   max <= 8e-2,
 *     argmax agrees with the reference at >= 98% of positions,
 *
 * and the same for the MTP rows when an MTP file is loaded. The greedy case
 * must reproduce the reference tokens up to the first step whose reference
 * margin (top1 - top2) is below 0.2, and, fed the reference tokens, must
 * pick the reference token at every step whose margin is at least 0.2.
 * Percentiles use the nearest-rank rule on the sorted errors.
 * ------------------------------------------------------------------------- */

enum { CHECK_CHUNK = 7 };

struct error_stats {
    double median, p90, max;
    int count;
};

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static struct error_stats error_stats_of(double *err, int n) {
    struct error_stats s = { 0, 0, 0, n };
    if (n == 0) return s;
    qsort(err, (size_t)n, sizeof(double), cmp_double);
    s.median = n % 2 ? err[n / 2] : 0.5 * (err[n / 2 - 1] + err[n / 2]);
    int rank = (int)ceil(0.9 * n);
    s.p90 = err[rank < 1 ? 0 : rank - 1];
    s.max = err[n - 1];
    return s;
}

static double row_relative_error(const float *ours, const struct json *ref, int vocab) {
    double max_diff = 0, max_ref = 0;
    for (int i = 0; i < vocab; i++) {
        double r = ref->items[i].number;
        max_diff = fmax(max_diff, fabs(ours[i] - r));
        max_ref = fmax(max_ref, fabs(r));
    }
    return max_ref > 0 ? max_diff / max_ref : max_diff;
}

/* Pull a JSON array of integers into a fresh int32 array. */
static int32_t *json_int_array(const struct json *arr, int *n, struct ds4_error *e,
                               const char *what) {
    if (!arr || arr->kind != JSON_ARRAY) {
        fail(e, "vectors: '%s' is missing or not an array", what);
        return NULL;
    }
    int32_t *out = xmalloc((arr->count ? arr->count : 1) * sizeof(int32_t));
    for (size_t i = 0; i < arr->count; i++) {
        if (arr->items[i].kind != JSON_NUMBER) {
            free(out);
            fail(e, "vectors: '%s'[%zu] is not a number", what, i);
            return NULL;
        }
        out[i] = (int32_t)arr->items[i].number;
    }
    *n = (int)arr->count;
    return out;
}

/* Run tokens[0..n) through a fresh session with the given schedule
 * (first chunk of `first` tokens, then chunks of `rest`), collecting the
 * logits of every position and the MTP rows. */
static bool run_schedule(struct engine *eng, const int32_t *tokens, int n, int first, int rest,
                         float *logits, float *mtp_logits, struct ds4_error *e) {
    struct session s;
    session_init(&s, eng);
    int V = eng->model->cfg.vocab;
    bool ok = true;
    for (int done = 0; ok && done < n;) {
        int T = done == 0 ? first : rest;
        if (T > n - done) T = n - done;
        struct forward_request req = { logits + (size_t)done * V,
                                       mtp_logits ? mtp_logits + (size_t)done * V : NULL };
        ok = session_forward(&s, tokens + done, T, &req, e);
        done += T;
    }
    session_free(&s);
    return ok;
}

struct check_result {
    struct error_stats logit, mtp;
    double argmax_agree, mtp_argmax_agree;
    bool pass;
};

static bool stats_pass(const struct error_stats *s) {
    return s->median <= 2e-3 && s->p90 <= 1e-2 && s->max <= 8e-2;
}

/* Compare rows listed in `positions` (with `refs`) and argmax everywhere.
 * offset shifts our row index: MTP row i sits at our index i + 1. */
static void compare_rows(const float *ours, int V, int offset, const struct json *positions,
                         const struct json *refs, const struct json *ref_argmax,
                         struct error_stats *stats, double *agree) {
    int np = positions ? (int)positions->count : 0;
    double *err = xmalloc((size_t)(np ? np : 1) * sizeof(double));
    for (int i = 0; i < np; i++) {
        int pos = (int)positions->items[i].number;
        err[i] = row_relative_error(ours + (size_t)(pos + offset) * V, &refs->items[i], V);
    }
    *stats = error_stats_of(err, np);
    free(err);
    int na = ref_argmax ? (int)ref_argmax->count : 0, same = 0;
    for (int i = 0; i < na; i++)
        same += argmax(ours + (size_t)(i + offset) * V, V) == (int)ref_argmax->items[i].number;
    *agree = na ? (double)same / na : 1.0;
}

static bool check_shapes(const struct json *c, int n, int V, bool mtp, struct ds4_error *e) {
    const char *keys[] = { "check_positions", "logits", "argmax" };
    for (int k = 0; k < 3; k++)
        if (!json_is(json_get(c, keys[k]), JSON_ARRAY))
            return fail(e, "vectors: case lacks array '%s'", keys[k]);
    const struct json *pos = json_get(c, "check_positions"), *rows = json_get(c, "logits");
    if (pos->count != rows->count || json_get(c, "argmax")->count > (size_t)n)
        return fail(e, "vectors: check_positions/logits/argmax sizes disagree");
    for (size_t i = 0; i < pos->count; i++) {
        const struct json *row = &rows->items[i];
        double p = pos->items[i].number;
        if (row->kind != JSON_ARRAY || row->count != (size_t)V || p < 0 || p >= n)
            return fail(e, "vectors: logits row %zu has %zu values (vocab %d) or bad position",
                        i, row->kind == JSON_ARRAY ? row->count : 0, V);
    }
    (void)mtp;
    return true;
}

static bool check_logit_case(struct engine *eng, const struct json *c, int first, int rest,
                             struct check_result *res, struct ds4_error *e) {
    int V = eng->model->cfg.vocab, n;
    int32_t *tokens = json_int_array(json_get(c, "tokens"), &n, e, "tokens");
    if (!tokens) return false;
    bool mtp = eng->model->has_mtp;
    if (n < 1 || !check_shapes(c, n, V, mtp, e)) { free(tokens); return n >= 1 ? false : fail(e, "vectors: empty case"); }
    float *logits = xmalloc((size_t)n * V * sizeof(float));
    float *mtp_logits = mtp ? xcalloc((size_t)n * V, sizeof(float)) : NULL;
    bool ok = run_schedule(eng, tokens, n, first, rest, logits, mtp_logits, e);
    if (ok) {
        compare_rows(logits, V, 0, json_get(c, "check_positions"), json_get(c, "logits"),
                     json_get(c, "argmax"), &res->logit, &res->argmax_agree);
        res->pass = stats_pass(&res->logit) && res->argmax_agree >= 0.98;
        if (mtp) {
            compare_rows(mtp_logits, V, 1, json_get(c, "mtp_check_positions"),
                         json_get(c, "mtp_logits"), json_get(c, "mtp_argmax"), &res->mtp,
                         &res->mtp_argmax_agree);
            res->pass = res->pass && stats_pass(&res->mtp) && res->mtp_argmax_agree >= 0.98;
        }
    }
    free(tokens);
    free(logits);
    free(mtp_logits);
    return ok;
}

/* The greedy case: free-running until the first low-margin step, and
 * teacher-forced at every confident step. */
static bool check_greedy_case(struct engine *eng, const struct json *c, int chunk,
                              int *free_ok, int *free_needed, int *forced_ok, int *forced_needed,
                              struct ds4_error *e) {
    int n, ng, nm, V = eng->model->cfg.vocab;
    int32_t *prompt = json_int_array(json_get(c, "tokens"), &n, e, "tokens");
    int32_t *ref = prompt ? json_int_array(json_get(c, "greedy"), &ng, e, "greedy") : NULL;
    const struct json *margin = json_get(c, "greedy_margin");
    bool ok = ref && margin && margin->kind == JSON_ARRAY && (nm = (int)margin->count) == ng && n > 0;
    if (!ok && ref) fail(e, "vectors: greedy case is malformed");
    *free_ok = *free_needed = *forced_ok = *forced_needed = 0;
    for (int pass = 0; ok && pass < 2; pass++) {
        bool forced = pass == 1, diverged = false;
        struct session s;
        session_init(&s, eng);
        ok = session_feed(&s, prompt, n, chunk, e);
        for (int i = 0; ok && i < ng; i++) {
            int ours = argmax(s.logits, V);
            bool confident = margin->items[i].number >= 0.2;
            if (!forced && !diverged && confident) {
                (*free_needed)++;
                *free_ok += ours == ref[i];
            }
            if (!confident) diverged = true;
            if (forced && confident) {
                (*forced_needed)++;
                *forced_ok += ours == ref[i];
            }
            int32_t next = forced ? ref[i] : ours;
            if (i + 1 < ng) ok = session_forward(&s, &next, 1, NULL, e);
        }
        session_free(&s);
    }
    free(prompt);
    free(ref);
    return ok;
}

static void print_check(const char *name, const char *sched, const struct check_result *r, bool mtp) {
    printf("  %-20s %-7s logits: median %.2e p90 %.2e max %.2e argmax %5.1f%%", name, sched,
           r->logit.median, r->logit.p90, r->logit.max, 100 * r->argmax_agree);
    if (mtp)
        printf(" | mtp: median %.2e p90 %.2e max %.2e argmax %5.1f%%", r->mtp.median, r->mtp.p90,
               r->mtp.max, 100 * r->mtp_argmax_agree);
    printf("  %s\n", r->pass ? "ok" : "FAIL");
}

static int check_vectors(struct engine *eng, const char *path) {
    struct ds4_error e = { "" };
    size_t len;
    char *text = read_file(path, &len, &e);
    char jerr[256];
    struct json *doc = text ? json_parse(text, len, 64, jerr, sizeof jerr) : NULL;
    if (text && !doc) snprintf(e.msg, sizeof e.msg, "%s: %s", path, jerr);
    const struct json *cases = doc ? json_get(doc, "cases") : NULL;
    if (doc && !json_is(cases, JSON_ARRAY)) snprintf(e.msg, sizeof e.msg, "%s: no 'cases' array", path);
    if (!cases || cases->kind != JSON_ARRAY) {
        fprintf(stderr, "ds4: %s\n", e.msg);
        json_free(doc);
        free(text);
        return 1;
    }
    int passed = 0, failed = 0;
    bool mtp = eng->model->has_mtp;
    printf("checking %zu cases from %s%s\n", cases->count, path, mtp ? " (with MTP rows)" : "");
    for (size_t i = 0; i < cases->count; i++) {
        const struct json *c = &cases->items[i];
        const char *name = json_str(c, "name") ? json_str(c, "name") : "?";
        for (int sched = 0; sched < 2; sched++) {
            bool ok;
            if (json_get(c, "greedy")) {
                int fo, fn, to, tn;
                ok = check_greedy_case(eng, c, sched == 0 ? 1 << 20 : CHECK_CHUNK, &fo, &fn, &to, &tn, &e);
                bool pass = ok && fo == fn && to == tn;
                if (ok)
                    printf("  %-20s %-7s greedy: %d/%d tokens before the first low-margin step, "
                           "%d/%d confident steps teacher-forced  %s\n", name,
                           sched ? "chunk7" : "own", fo, fn, to, tn, pass ? "ok" : "FAIL");
                ok = pass;
            } else {
                struct check_result r = { 0 };
                double prefill = 0;
                json_num(c, "prefill", &prefill);
                int first = sched == 0 ? (int)prefill : CHECK_CHUNK, rest = sched == 0 ? 1 : CHECK_CHUNK;
                if (first < 1) first = 1;
                ok = check_logit_case(eng, c, first, rest, &r, &e);
                if (ok) print_check(name, sched ? "chunk7" : "own", &r, mtp);
                ok = ok && r.pass;
            }
            if (!ok && e.msg[0]) {
                printf("  %-20s error: %s\n", name, e.msg);
                e.msg[0] = 0;
            }
            ok ? passed++ : failed++;
        }
    }
    printf("%d passed, %d failed\n", passed, failed);
    json_free(doc);
    free(text);
    return failed ? 1 : 0;
}

/* ----------------------------------------------------------------------------
 * 10.2 --bench
 *
 * Decode on a CPU is bound by memory bandwidth: every token streams every
 * weight it touches. So besides tokens per second the bench reports the
 * bytes one decode token reads (dense weights, the shared expert, K routed
 * experts, the head) and the bandwidth that implies. Prefill is bound by
 * arithmetic instead, since a chunk reads each weight once for all its
 * tokens. The figures are printed, never asserted: timing belongs here, not
 * in tests.
 * ------------------------------------------------------------------------- */

static uint64_t matrix_bytes(const struct matrix *m) {
    return m->data ? m->row_bytes * (uint64_t)m->out : 0;
}

static uint64_t layer_decode_bytes(const struct layer_weights *L, int n_used) {
    const struct matrix *dense[] = { &L->hc_attn_fn, &L->hc_ffn_fn, &L->q_a, &L->q_b, &L->kv,
                                     &L->out_a, &L->out_b, &L->comp_kv, &L->comp_gate,
                                     &L->idx_q_b, &L->idx_proj, &L->idx_kv, &L->idx_gate,
                                     &L->router, &L->gate_shexp, &L->up_shexp, &L->down_shexp };
    uint64_t bytes = 0;
    for (size_t i = 0; i < sizeof dense / sizeof dense[0]; i++) bytes += matrix_bytes(dense[i]);
    bytes += (uint64_t)n_used * (matrix_bytes(&L->gate_exps) + matrix_bytes(&L->up_exps) +
                                 matrix_bytes(&L->down_exps));
    return bytes;
}

static uint64_t decode_bytes_per_token(const struct model *m) {
    const struct ds4_config *c = &m->cfg;
    uint64_t bytes = matrix_bytes(&m->output) + matrix_bytes(&m->hc_head_fn) +
                     m->token_embd.row_bytes;
    for (int l = 0; l < c->n_layers; l++) bytes += layer_decode_bytes(&m->layers[l], c->n_used);
    if (m->has_mtp)
        bytes += layer_decode_bytes(&m->mtp.block, c->n_used) + matrix_bytes(&m->mtp.e_proj) +
                 matrix_bytes(&m->mtp.h_proj) + matrix_bytes(&m->mtp.hc_head_fn);
    return bytes;
}

static int run_bench(struct engine *eng, int n_prefill, int n_decode) {
    const struct ds4_config *c = &eng->model->cfg;
    struct ds4_error e = { "" };
    int32_t *tokens = xmalloc((size_t)n_prefill * sizeof(int32_t));
    uint64_t rng = 42;
    for (int i = 0; i < n_prefill; i++) tokens[i] = (int32_t)(splitmix64(&rng) % (uint64_t)c->vocab);
    struct session s;
    session_init(&s, eng);
    double t0 = now_seconds();
    bool ok = session_forward(&s, tokens, n_prefill, NULL, &e);
    double t1 = now_seconds();
    for (int i = 0; ok && i < n_decode; i++) {
        int32_t next = argmax(s.logits, c->vocab);
        ok = session_forward(&s, &next, 1, NULL, &e);
    }
    double t2 = now_seconds();
    session_free(&s);
    free(tokens);
    if (!ok) {
        fprintf(stderr, "ds4: bench failed: %s\n", e.msg);
        return 1;
    }
    double per_token = (double)decode_bytes_per_token(eng->model);
    double decode_tps = n_decode / (t2 - t1);
    printf("model: %d layers, dim %d, %d experts (%d used), vocab %d; %d threads%s\n",
           c->n_layers, c->dim, c->n_experts, c->n_used, c->vocab, eng->pool.n_threads,
           eng->opt.reference_kernels ? ", reference kernels" : "");
    printf("prefill: %d tokens in %.3f s = %.2f tokens/s\n", n_prefill, t1 - t0, n_prefill / (t1 - t0));
    printf("decode:  %d tokens in %.3f s = %.2f tokens/s\n", n_decode, t2 - t1, decode_tps);
    printf("decode weight traffic: %.3f MB per token = %.2f GB/s\n", per_token / 1e6,
           per_token * decode_tps / 1e9);
    return 0;
}

/* ============================================================================
 * Chapter 11. The command line and main()
 * ============================================================================
 *
 * Options are parsed once, into one struct, and validated there: a bad flag
 * or value stops with a message and exit status 2 before any model loads.
 * ------------------------------------------------------------------------- */

struct cli_options {
    const char *model_path, *mtp_path, *tokens, *check_vectors;
    int n_predict, chunk, bench_prefill, bench_decode;
    bool bench, show_help;
    struct engine_options engine;
    struct sampler_options sampling;
};

static void print_usage(FILE *f) {
    fprintf(f,
        "usage: ds4 [-m MODEL.gguf] [--mtp MTP.gguf] --tokens \"ID ID ...\" [-n N] [options]\n"
        "       ds4 --check-vectors FILE.json [-m MODEL.gguf] [--mtp MTP.gguf]\n"
        "       ds4 --bench [-m MODEL.gguf] [--bench-prefill N] [--bench-decode N]\n"
        "\n"
        "model:\n"
        "  -m, --model FILE      model GGUF (default ./ds4flash.gguf, else the shipped tiny model)\n"
        "      --mtp FILE        MTP GGUF (the separate mtp.0.* file)\n"
        "generation:\n"
        "      --tokens \"IDS\"    prompt as token ids separated by spaces or commas\n"
        "  -n, --n-predict N     tokens to generate (default 16)\n"
        "      --temp T          temperature; 0 = greedy (default 0)\n"
        "      --top-p P         nucleus sampling mass in (0,1] (default 1 = off)\n"
        "      --top-k K         keep the K most likely tokens (default 0 = off)\n"
        "      --min-p P         drop tokens below P x the most likely (default 0 = off)\n"
        "      --seed S          sampling seed (default 1)\n"
        "engine:\n"
        "  -t, --threads N       worker threads (default: one per CPU)\n"
        "      --chunk N         prefill chunk size in tokens (default 128)\n"
        "      --reference-kernels  use the scalar reference dot products\n"
        "tools:\n"
        "      --check-vectors F run the oracle vectors in F; exit 0 only if all pass\n"
        "      --bench           print prefill/decode speed and weight traffic\n"
        "  -h, --help            this text\n");
}

static bool parse_long(const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return false;
    *out = v;
    return true;
}

static bool parse_float(const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) return false;
    *out = v;
    return true;
}

/* Options that take an integer: name, bounds, destination. */
struct int_flag { const char *short_name, *long_name; long lo, hi; int *dst; };
struct float_flag { const char *long_name; double lo, hi; float *dst; };
struct string_flag { const char *short_name, *long_name; const char **dst; };

static bool flag_is(const char *arg, const char *short_name, const char *long_name) {
    return (short_name && strcmp(arg, short_name) == 0) || (long_name && strcmp(arg, long_name) == 0);
}

static bool parse_args(int argc, char **argv, struct cli_options *o, struct ds4_error *e) {
    memset(o, 0, sizeof *o);
    o->n_predict = 16;
    o->chunk = 128;
    o->bench_prefill = 64;
    o->bench_decode = 16;
    o->sampling.top_p = 1.0f;
    o->sampling.seed = 1;
    long seed = 1;
    struct int_flag ints[] = {
        { "-n", "--n-predict", 0, 1 << 24, &o->n_predict },
        { "-t", "--threads", 1, 1024, &o->engine.threads },
        { NULL, "--chunk", 1, 1 << 16, &o->chunk },
        { NULL, "--top-k", 0, 1 << 24, &o->sampling.top_k },
        { NULL, "--bench-prefill", 1, 1 << 20, &o->bench_prefill },
        { NULL, "--bench-decode", 1, 1 << 20, &o->bench_decode },
    };
    struct float_flag floats[] = {
        { "--temp", 0, 100, &o->sampling.temperature },
        { "--top-p", 0, 1, &o->sampling.top_p },
        { "--min-p", 0, 1, &o->sampling.min_p },
    };
    struct string_flag strings[] = {
        { "-m", "--model", &o->model_path }, { NULL, "--mtp", &o->mtp_path },
        { NULL, "--tokens", &o->tokens }, { NULL, "--check-vectors", &o->check_vectors },
    };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (flag_is(a, "-h", "--help")) { o->show_help = true; continue; }
        if (flag_is(a, NULL, "--bench")) { o->bench = true; continue; }
        if (flag_is(a, NULL, "--reference-kernels")) { o->engine.reference_kernels = true; continue; }
        bool matched = false;
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        for (size_t k = 0; !matched && k < sizeof ints / sizeof ints[0]; k++) {
            if (!flag_is(a, ints[k].short_name, ints[k].long_name)) continue;
            long v;
            if (!value || !parse_long(value, ints[k].lo, ints[k].hi, &v))
                return fail(e, "%s needs an integer in %ld..%ld", a, ints[k].lo, ints[k].hi);
            *ints[k].dst = (int)v;
            matched = true;
        }
        for (size_t k = 0; !matched && k < sizeof floats / sizeof floats[0]; k++) {
            if (strcmp(a, floats[k].long_name) != 0) continue;
            double v;
            if (!value || !parse_float(value, floats[k].lo, floats[k].hi, &v))
                return fail(e, "%s needs a number in %g..%g", a, floats[k].lo, floats[k].hi);
            *floats[k].dst = (float)v;
            matched = true;
        }
        for (size_t k = 0; !matched && k < sizeof strings / sizeof strings[0]; k++) {
            if (!flag_is(a, strings[k].short_name, strings[k].long_name)) continue;
            if (!value) return fail(e, "%s needs a value", a);
            *strings[k].dst = value;
            matched = true;
        }
        if (!matched && strcmp(a, "--seed") == 0) {
            if (!value || !parse_long(value, 0, LONG_MAX, &seed))
                return fail(e, "--seed needs a non-negative integer");
            o->sampling.seed = (uint64_t)seed;
            matched = true;
        }
        if (!matched) return fail(e, "unknown option '%s' (try --help)", a);
        i++;   /* every matched option here took a value */
    }
    return true;
}

/* Parse "1 2 3" or "1,2,3" into ids. */
static int32_t *parse_token_list(const char *s, int *n, struct ds4_error *e) {
    int cap = 16;
    int32_t *ids = xmalloc((size_t)cap * sizeof(int32_t));
    *n = 0;
    while (*s) {
        if (*s == ' ' || *s == ',' || *s == '\t' || *s == '\n') { s++; continue; }
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (end == s || errno || v < 0 || v > INT32_MAX) {
            free(ids);
            fail(e, "--tokens: '%.20s' is not a token id", s);
            return NULL;
        }
        if (*n == cap) ids = xrealloc(ids, (size_t)(cap *= 2) * sizeof(int32_t));
        ids[(*n)++] = (int32_t)v;
        s = end;
    }
    if (*n == 0) {
        free(ids);
        fail(e, "--tokens: no token ids given");
        return NULL;
    }
    return ids;
}

/* Without -m: the real model if it sits in the current directory, else the
 * tiny model that ships with the sources (built by make). */
static const char *default_model_path(const char *argv0, char *buf, size_t cap) {
    if (access("ds4flash.gguf", R_OK) == 0) return "ds4flash.gguf";
    if (access("vectors/tiny.gguf", R_OK) == 0) {
        fprintf(stderr, "ds4: no -m given and no ./ds4flash.gguf: using the shipped tiny test "
                        "model vectors/tiny.gguf (random weights; its output is meaningless)\n");
        return "vectors/tiny.gguf";
    }
    const char *slash = strrchr(argv0, '/');
    if (slash) {
        snprintf(buf, cap, "%.*s/vectors/tiny.gguf", (int)(slash - argv0), argv0);
        if (access(buf, R_OK) == 0) {
            fprintf(stderr, "ds4: no -m given and no ./ds4flash.gguf: using the shipped tiny "
                            "test model %s (random weights; its output is meaningless)\n", buf);
            return buf;
        }
    }
    return NULL;
}

static int generate(struct engine *eng, const struct cli_options *o) {
    struct ds4_error e = { "" };
    int n;
    int32_t *prompt = parse_token_list(o->tokens, &n, &e);
    if (!prompt) {
        fprintf(stderr, "ds4: %s\n", e.msg);
        return 2;
    }
    int V = eng->model->cfg.vocab;
    struct session s;
    session_init(&s, eng);
    struct sampler sp;
    sampler_init(&sp, o->sampling, V);
    double t0 = now_seconds();
    bool ok = session_feed(&s, prompt, n, o->chunk, &e);
    double t1 = now_seconds();
    for (int i = 0; ok && i < o->n_predict; i++) {
        int32_t next = sample_token(&sp, s.logits, V);
        printf("%s%d", i ? " " : "", next);
        fflush(stdout);
        if (i + 1 < o->n_predict) ok = session_forward(&s, &next, 1, NULL, &e);
    }
    double t2 = now_seconds();
    if (o->n_predict > 0) printf("\n");
    if (ok)
        fprintf(stderr, "ds4: prompt %d tokens in %.3f s, generated %d tokens in %.3f s\n", n,
                t1 - t0, o->n_predict, t2 - t1);
    else
        fprintf(stderr, "ds4: %s\n", e.msg);
    sampler_free(&sp);
    session_free(&s);
    free(prompt);
    return ok ? 0 : 1;
}

#ifndef DS4_NO_MAIN
int main(int argc, char **argv) {
    struct cli_options o;
    struct ds4_error e = { "" };
    if (!parse_args(argc, argv, &o, &e)) {
        fprintf(stderr, "ds4: %s\n", e.msg);
        return 2;
    }
    if (o.show_help) {
        print_usage(stdout);
        return 0;
    }
    if (!o.tokens && !o.check_vectors && !o.bench) {
        print_usage(stderr);
        fprintf(stderr, "\nds4: nothing to do: give --tokens, --check-vectors or --bench\n");
        return 2;
    }
    char buf[1100];
    const char *path = o.model_path ? o.model_path : default_model_path(argv[0], buf, sizeof buf);
    if (!path) {
        fprintf(stderr, "ds4: no model: pass -m FILE, put ds4flash.gguf here "
                        "(./download_model.sh), or run 'make' to build vectors/tiny.gguf\n");
        return 1;
    }
    struct model model;
    if (!model_load(&model, path, o.mtp_path, &e)) {
        fprintf(stderr, "ds4: %s\n", e.msg);
        return 1;
    }
    struct engine eng;
    engine_init(&eng, &model, o.engine);
    int rc = o.check_vectors ? check_vectors(&eng, o.check_vectors)
           : o.bench         ? run_bench(&eng, o.bench_prefill, o.bench_decode)
                             : generate(&eng, &o);
    engine_free(&eng);
    model_free(&model);
    return rc;
}
#endif
