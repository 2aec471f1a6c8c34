/* ds4.c -- a small inference engine for one model: DeepSeek V4 Flash.
 *
 * This file is meant to be read from top to bottom, like a book. It follows
 * the data as it flows through the engine, in Parts:
 *
 *   Part I. Bytes
 *     1. The ground floor: errors, clocks, memory, a thread pool.
 *     2. GGUF: the bytes of the model file, read over mmap with every offset
 *        checked before it is touched.
 *     3. Quantized blocks: how a row of weights is packed (F16, Q8_0, Q2_K,
 *        Q4_K, IQ2_XXS, ...) and how we take dot products against it.
 *   Part II. Tensors and weights
 *     4. The model's shape and weights: metadata -> config, tensor names ->
 *        views into the mapped file, every shape validated.
 *   Part III. The model
 *     5. Numeric primitives of V4: RMSNorm, interleaved tail RoPE with YaRN,
 *        the FP8 and FP4 round trips, the Hadamard rotation, top-k.
 *     6. The forward pass: hyper-connections (mHC) with Sinkhorn, attention
 *        with one shared K=V head, the sliding window, the compressors and
 *        the indexer, the mixture of experts, the output head, the MTP block.
 *     7. The story: the one function that advances a session by a chunk of
 *        tokens, for prefill and decode alike.
 *     8. Sampling
 *     9. Speculative decoding with the MTP block
 *   Part IV. Text
 *    10. JSON: chat messages, API requests and the oracle vectors arrive so.
 *    11. Text: the byte-level BPE tokenizer, the V4 chat template, and the
 *        parser for the DSML tool calls the model writes.
 *   Part V. Sessions
 *    12. Sessions on disk: snapshots and the KV store
 *   Part VI. The server
 *    13. The HTTP server: OpenAI- and Anthropic-compatible APIs for agents.
 *   Part VII. The command line
 *    14. The command line, the interactive chat, and main().
 *   Appendices
 *    15. SIMD twins: x86-64 AVX2
 *    16. SIMD twins: arm64 NEON
 *    17. Any other CPU
 *    18. Tools built on the engine: the oracle-vector checker and the bench.
 *
 * Two ways to read it:
 *
 *   - The model in an evening: Part III (2902 lines), from the numeric
 *     primitives to speculative decoding, with the essays on each idea.
 *   - The whole engine: from the top, Part I to Part VII, then the
 *     appendices.
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
 *
 * BIBLIOGRAPHY
 *
 * Citations in this file are written [V4] or [V4 §mHC]: a tag, optionally a
 * section. Every tag is listed here, and `make book-check` fails on one that
 * is not. The project's
 * own notes come first; they live in docs/ and cite their sources in turn.
 *
 * - [LAYOUT] docs/gguf-layout.md: the published GGUF (keys, tensor names,
 *   types, experts), the quant blocks, the vocabulary, the chat format, DSML.
 * - [FWD] docs/forward.md: the forward pass as formulas with shapes, each
 *   matched to its function in [MODEL].
 * - [API] docs/server-api.md: the endpoints and streaming shapes the server
 *   speaks.
 * - [VEC] docs/vectors.md: the schema of the oracle vectors.
 *
 * DeepSeek's model and code:
 *
 * - [V4] DeepSeek-AI, "DeepSeek-V4: Towards Highly Efficient Million-Token
 *   Context Intelligence", technical report, 2026 (DeepSeek_V4.pdf in the
 *   model repository). Cited by section name: §CSA and §HCA (compressed
 *   sparse and heavily compressed attention), §mHC, §MoE, §MTP, §FP4 (the
 *   quantization-aware training of experts and indexer).
 * - [V3] DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv:2412.19437, 2024
 *   (§2.1.2 auxiliary-loss-free balancing, §2.2 multi-token prediction).
 * - [V32] DeepSeek-AI, "DeepSeek-V3.2-Exp" technical report, 2025: DeepSeek
 *   Sparse Attention and its lightning indexer.
 * - [MODEL] deepseek-ai/DeepSeek-V4-Flash (Hugging Face), inference/model.py
 *   and inference/kernel.py at revision 60d8d70, in full
 *   60d8d70770c6776ff598c94bb586a859a38244f1, MIT license. The functions this
 *   file follows are named where they are used: Block.hc_pre, Block.hc_post, hc_split_sinkhorn,
 *   Compressor.forward, Indexer.forward, Attention.forward, sparse_attn,
 *   Gate.forward, Expert.forward, MoE.forward, ParallelHead.hc_head,
 *   MTPBlock.forward, precompute_freqs_cis, apply_rotary_emb,
 *   rotate_activation, act_quant, fp4_act_quant.
 * - [ENC] the same repository, encoding/encoding_dsv4.py at revision 60d8d70:
 *   encode_messages() and the DSML parser.
 * - [TOKJ] the same repository, tokenizer.json: the pre-tokenizer and BPE.
 *
 * Papers:
 *
 * - [MHC] Z. Xie et al., "mHC: Manifold-Constrained Hyper-Connections",
 *   arXiv:2512.24880, 2025.
 * - [HC] D. Zhu et al., "Hyper-Connections", arXiv:2409.19606, 2024.
 * - [SINKHORN] R. Sinkhorn and P. Knopp, "Concerning nonnegative matrices
 *   and doubly stochastic matrices", Pacific J. Math. 21(2), 1967.
 * - [SINKS] G. Xiao et al., "Efficient Streaming Language Models with
 *   Attention Sinks", arXiv:2309.17453, 2023.
 * - [ROPE] J. Su et al., "RoFormer: Enhanced Transformer with Rotary
 *   Position Embedding", arXiv:2104.09864, 2021.
 * - [YARN] B. Peng et al., "YaRN: Efficient Context Window Extension of
 *   Large Language Models", arXiv:2309.00071, 2023.
 * - [RMSNORM] B. Zhang and R. Sennrich, "Root Mean Square Layer
 *   Normalization", arXiv:1910.07467, 2019.
 * - [SWIGLU] N. Shazeer, "GLU Variants Improve Transformer",
 *   arXiv:2002.05202, 2020.
 * - [LOSSFREE] L. Wang et al., "Auxiliary-Loss-Free Load Balancing Strategy
 *   for Mixture-of-Experts", arXiv:2408.15664, 2024.
 * - [HASH] S. Roller et al., "Hash Layers For Large Sparse Models",
 *   arXiv:2106.04426, 2021.
 * - [MTP] F. Gloeckle et al., "Better & Faster Large Language Models via
 *   Multi-token Prediction", arXiv:2404.19737, 2024.
 * - [SPEC] Y. Leviathan, M. Kalman, Y. Matias, "Fast Inference from
 *   Transformers via Speculative Decoding", arXiv:2211.17192, 2023.
 * - [SPEC2] C. Chen et al., "Accelerating Large Language Model Decoding with
 *   Speculative Sampling", arXiv:2302.01318, 2023.
 * - [FP8] P. Micikevicius et al., "FP8 Formats for Deep Learning",
 *   arXiv:2209.05433, 2022 (e4m3).
 * - [MX] Open Compute Project, "OCP Microscaling Formats (MX)
 *   Specification", v1.0, 2023 (e2m1 elements, e8m0 scales).
 * - [QUAROT] S. Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in
 *   Rotated LLMs", arXiv:2404.00456, 2024 (Hadamard rotations before
 *   low-bit rounding).
 * - [NUCLEUS] A. Holtzman et al., "The Curious Case of Neural Text
 *   Degeneration", arXiv:1904.09751, 2019 (top-p sampling).
 * - [GPT2] A. Radford et al., "Language Models are Unsupervised Multitask
 *   Learners", OpenAI, 2019 (the byte-to-unicode map of byte-level BPE).
 *
 * Formats and protocols:
 *
 * - [GGML] ggml-org/ggml and ggml-org/llama.cpp, MIT license: the GGUF
 *   container (docs/gguf.md) and the quant block layouts (ggml-common.h,
 *   ggml-quants.c), which chapter 3 reproduces by value.
 * - [RFC8259] T. Bray, "The JavaScript Object Notation (JSON) Data
 *   Interchange Format", IETF RFC 8259, 2017.
 * - [RFC9110] R. Fielding et al., "HTTP Semantics", IETF RFC 9110, 2022.
 * - [RFC9112] R. Fielding et al., "HTTP/1.1", IETF RFC 9112, 2022.
 * - [HTML] WHATWG, "HTML Living Standard", §9.2 server-sent events.
 * - [UNICODE] The Unicode Consortium, "The Unicode Standard", §3.9
 *   (well-formed UTF-8, table 3-7).
 * - [FIPS180] NIST, "Secure Hash Standard (SHS)", FIPS 180-4, 2015 (SHA1).
 * - [RFC3720] J. Satran et al., "iSCSI", IETF RFC 3720, 2004 (CRC32C).
 * - [SQLITE] SQLite, the database file format and SQL language reference.
 * - [OPENAI] OpenAI API reference: Chat Completions, Completions, Responses.
 * - [ANTHROPIC] Anthropic API reference: Messages and their streaming.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE   /* memmem, MAP_* and friends; tests define it first too */
#endif
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
#include <sched.h>
#include <fcntl.h>
#include <unistd.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/resource.h>
#include <sys/file.h>
#include <dirent.h>
#include <sqlite3.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <poll.h>
#include <stdatomic.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>      /* getauxval: which arm64 extensions the CPU has (3.9) */
#endif
#if defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>    /* sysctlbyname: the same on macOS */
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
 * recovery, so allocation failures end the process with a clear message.
 *
 * Every allocation also bumps `heap_allocations` (relaxed atomic: workers may
 * allocate too). Nothing reads it but the tests and the bench, which check
 * that decoding a token allocates nothing: buffers live as long as a session. */
static int64_t heap_allocations;

static void count_allocation(void) {
    __atomic_add_fetch(&heap_allocations, 1, __ATOMIC_RELAXED);
}

static void *xmalloc(size_t n) {
    count_allocation();
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "ds4: out of memory allocating %zu bytes\n", n);
        exit(1);
    }
    return p;
}

static void *xcalloc(size_t count, size_t size) {
    count_allocation();
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) {
        fprintf(stderr, "ds4: out of memory allocating %zu x %zu bytes\n", count, size);
        exit(1);
    }
    return p;
}

static void *xrealloc(void *old, size_t n) {
    count_allocation();
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

/* CPU time of the whole process, every thread (the bench's second clock). */
static double cpu_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
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

/* Numbers from the command line and config: the whole string must be a
 * number inside [lo, hi], or the caller reports the flag. */
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
 *
 * WHY WORKERS SPIN BEFORE THEY SLEEP
 *
 * One decode token of the tiny model is a few hundred matrix products of
 * 10-50 microseconds each. Waking a sleeping thread through a condition
 * variable costs a system call on each side and tens of microseconds before
 * the worker runs, so a pool that sleeps between products makes two threads
 * slower than one. Here a job is published by bumping an atomic
 * `generation`; an idle worker watches it in a loop with the CPU's pause
 * hint for about POOL_SPIN_ROUNDS rounds (about 6 ms on a Zen 3, longer
 * than a whole decode token of a small model, so that a worker stays awake
 * from one token to the next and small products can be split without a
 * wake-up) and only then sleeps on the
 * condition variable, counting itself in `sleepers`. The publisher takes the
 * lock and broadcasts only when someone sleeps.
 *
 * WHY THE CALLER WAITS ONLY FOR WORKERS THAT JOINED
 *
 * On a machine with more busy threads than cores, a worker may not run for
 * milliseconds after a job is published. The caller then does every item
 * itself, and must not wait for a worker that never started. So items are
 * claimed from a `cursor` that holds the job's number in its top 32 bits
 * and the next item in its low 32: a claim is a compare-and-swap that only
 * succeeds for the job the worker joined, and a worker counts itself in
 * `busy_workers` before its first claim. The caller, having found no item
 * left, waits only while that count is non-zero. Before rewriting the job
 * fields for the next job, the caller first closes the cursor (new number,
 * index past any end), so a late worker's claim on the old job fails.
 *
 * The spin costs CPU time while the machine is idle between tokens, at most
 * one spin period (some milliseconds) per worker per pause.
 *
 * WHY SMALL JOBS STAY ON ONE THREAD
 *
 * Handing out a job is not free even when nobody sleeps: the job's cache
 * lines travel to the worker and back, the worker's share of the rows must
 * travel to its cache, and the caller waits for the slowest joiner, who may
 * have lost its core to another process. Measured on the tiny model (2
 * cores, loaded by other jobs), a product of a 12 KB matrix took 3 us on
 * one thread and 14 us on two. On the quiet machine, with the worker kept
 * spinning, splitting the tiny model's 128 KB products in two made decode
 * 1.3x faster than one thread (2026-12-02, README), and splitting from 64 KB
 * about the same: hence one thread per 48 KB. So a job may
 * say how many threads are worth its work: parallel_for_threads() takes that
 * count, and pool_threads_for_bytes() derives it from the bytes the job
 * reads, one thread per POOL_BYTES_PER_THREAD. Workers past the count do not
 * join (a late one that reads the next job's count instead is harmless: its
 * claims carry the old job's number and fail). A worker that has gone to
 * sleep costs a wake-up on top (a system call, then tens of microseconds
 * or, on a busy machine, a whole time slice), so a job under POOL_WAKE_BYTES
 * uses only workers that are still spinning: when all sleep, it runs on the
 * caller. Small models then run their products on one thread while a large
 * model's split as before.
 * ------------------------------------------------------------------------- */

typedef void (*task_fn)(void *ctx, int64_t item, int worker);

enum { POOL_SPIN_ROUNDS = 200000, POOL_BYTES_PER_THREAD = 48 << 10, POOL_WAKE_BYTES = 2 << 20 };

struct thread_pool {
    int n_threads;                 /* including the calling thread */
    pthread_t *threads;
    pthread_mutex_t lock;
    pthread_cond_t work_ready;
    uint64_t generation;           /* atomic; bumped for each parallel_for */
    uint64_t cursor;               /* atomic; job number << 32 | next item */
    int busy_workers;              /* atomic; workers that joined the job */
    int sleepers;                  /* atomic; workers asleep on work_ready */
    int job_threads;               /* atomic; threads the job may use, caller included */
    bool quit;                     /* atomic */
    /* The job being run. */
    task_fn fn;
    void *ctx;
    int64_t n_items, batch;
};

struct worker_arg {
    struct thread_pool *pool;
    int index;
};

static uint64_t pool_cursor(uint32_t job, int64_t item) {
    return (uint64_t)job << 32 | (uint64_t)item;
}

/* Claim and run batches of job `job` until none is left (or the job is over). */
static void pool_run_items(struct thread_pool *pool, int worker, uint32_t job) {
    for (;;) {
        uint64_t cur = __atomic_load_n(&pool->cursor, __ATOMIC_ACQUIRE);
        if ((uint32_t)(cur >> 32) != job) return;
        int64_t start = (int64_t)(uint32_t)cur, n = pool->n_items;
        if (start >= n) return;
        int64_t end = start + pool->batch < n ? start + pool->batch : n;
        if (!__atomic_compare_exchange_n(&pool->cursor, &cur, pool_cursor(job, end), false,
                                         __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            continue;
        for (int64_t i = start; i < end; i++) pool->fn(pool->ctx, i, worker);
    }
}

static void pool_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static bool pool_has_news(struct thread_pool *pool, uint64_t seen) {
    return __atomic_load_n(&pool->quit, __ATOMIC_ACQUIRE) ||
           __atomic_load_n(&pool->generation, __ATOMIC_ACQUIRE) != seen;
}

/* Wait until the generation moves past `seen` (or quit): spin, then sleep. */
static void pool_wait_for_job(struct thread_pool *pool, uint64_t seen) {
    for (int i = 0; i < POOL_SPIN_ROUNDS; i++) {
        if (pool_has_news(pool, seen)) return;
        pool_pause();
    }
    pthread_mutex_lock(&pool->lock);
    __atomic_fetch_add(&pool->sleepers, 1, __ATOMIC_SEQ_CST);
    while (!pool_has_news(pool, seen)) pthread_cond_wait(&pool->work_ready, &pool->lock);
    __atomic_fetch_sub(&pool->sleepers, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&pool->lock);
}

static void *pool_worker_main(void *arg) {
    struct worker_arg *wa = arg;
    struct thread_pool *pool = wa->pool;
    uint64_t seen = 0;
    for (;;) {
        pool_wait_for_job(pool, seen);
        if (__atomic_load_n(&pool->quit, __ATOMIC_ACQUIRE)) break;
        seen = __atomic_load_n(&pool->generation, __ATOMIC_ACQUIRE);
        if (wa->index >= __atomic_load_n(&pool->job_threads, __ATOMIC_ACQUIRE)) continue;
        __atomic_fetch_add(&pool->busy_workers, 1, __ATOMIC_SEQ_CST);
        pool_run_items(pool, wa->index, (uint32_t)seen);
        __atomic_fetch_sub(&pool->busy_workers, 1, __ATOMIC_RELEASE);
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

/* Publish a new generation (or quit) and wake whoever sleeps. Taking the lock
 * before the broadcast closes the gap between a worker's last check and its
 * pthread_cond_wait. */
static void pool_wake(struct thread_pool *pool) {
    if (__atomic_load_n(&pool->sleepers, __ATOMIC_SEQ_CST) == 0) return;
    pthread_mutex_lock(&pool->lock);
    pthread_cond_broadcast(&pool->work_ready);
    pthread_mutex_unlock(&pool->lock);
}

static void pool_free(struct thread_pool *pool) {
    pthread_mutex_lock(&pool->lock);
    __atomic_store_n(&pool->quit, true, __ATOMIC_SEQ_CST);
    pthread_cond_broadcast(&pool->work_ready);
    pthread_mutex_unlock(&pool->lock);
    for (int i = 1; i < pool->n_threads; i++) pthread_join(pool->threads[i], NULL);
    free(pool->threads);
    pthread_mutex_destroy(&pool->lock);
    pthread_cond_destroy(&pool->work_ready);
}

/* The caller waits for the last worker by spinning; on a machine with more
 * threads than free cores that worker may be off the CPU, so after a spin
 * period the caller yields its core on every round instead of burning it. */
static void pool_wait_for_workers(struct thread_pool *pool) {
    for (int i = 0; __atomic_load_n(&pool->busy_workers, __ATOMIC_ACQUIRE) > 0; i++) {
        if (i < POOL_SPIN_ROUNDS) pool_pause();
        else sched_yield();
    }
}

/* The threads worth a job that reads `bytes` (1 .. n_threads). The count
 * of sleepers is read without the lock: it is only a hint. */
static int pool_threads_for_bytes(struct thread_pool *pool, double bytes) {
    double n = bytes / POOL_BYTES_PER_THREAD;
    if (n < 2) return 1;
    if (bytes < POOL_WAKE_BYTES &&
        __atomic_load_n(&pool->sleepers, __ATOMIC_RELAXED) >= pool->n_threads - 1)
        return 1;
    return n >= pool->n_threads ? pool->n_threads : (int)n;
}

/* parallel_for() on at most `threads` threads (the caller one of them). */
static void parallel_for_threads(struct thread_pool *pool, int64_t n_items, task_fn fn, void *ctx,
                                 int threads) {
    if (n_items <= 0) return;
    if (threads > pool->n_threads) threads = pool->n_threads;
    if (threads <= 1 || n_items == 1 || n_items >= INT32_MAX) {
        for (int64_t i = 0; i < n_items; i++) fn(ctx, i, 0);
        return;
    }
    uint32_t job = (uint32_t)(__atomic_load_n(&pool->generation, __ATOMIC_RELAXED) + 1);
    __atomic_store_n(&pool->cursor, pool_cursor(job, UINT32_MAX), __ATOMIC_SEQ_CST);
    /* Batches of ~1/8 of a fair share keep the counter cold and the tail short. */
    int64_t batch = n_items / ((int64_t)threads * 8);
    pool->batch = batch < 1 ? 1 : batch;
    __atomic_store_n(&pool->job_threads, threads, __ATOMIC_RELAXED);
    pool->fn = fn;
    pool->ctx = ctx;
    pool->n_items = n_items;
    __atomic_store_n(&pool->cursor, pool_cursor(job, 0), __ATOMIC_RELEASE);
    __atomic_fetch_add(&pool->generation, 1, __ATOMIC_SEQ_CST);
    pool_wake(pool);

    pool_run_items(pool, 0, job);

    pool_wait_for_workers(pool);
}

static void parallel_for(struct thread_pool *pool, int64_t n_items, task_fn fn, void *ctx) {
    parallel_for_threads(pool, n_items, fn, ctx, pool->n_threads);
}

static int default_thread_count(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    if (n > 256) n = 256;
    return (int)n;
}

/* Declared ahead: defined in a later chapter. */
static uint64_t tensor_bytes_for(uint32_t type, uint64_t n_elements, uint64_t row_len,
                                 bool *ok);

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

/* Sources. The container is GGML's GGUF, version 3 [GGML] (its docs/gguf.md);
 * the keys and tensors of the published V4 files are in [LAYOUT §1.1] and
 * [LAYOUT §1.2]. */

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

/* HOW THE WEIGHTS MEET MEMORY
 *
 * The file is mapped, never copied: every kernel reads its weight rows
 * straight out of the page cache, so a decode token reads each byte it
 * needs once. Three optional requests to the OS make that cheaper; each is
 * advice, and a refusal is reported but not fatal:
 *
 *     hugepage  madvise(MADV_HUGEPAGE): back the mapping with 2 MiB pages
 *               where the kernel can (fewer TLB misses on a 80 GiB scan)
 *     populate  read every page once now (MADV_WILLNEED, then a touch per
 *               page), so the first tokens do not pay for page faults
 *     mlock     lock the pages in RAM, so a server never waits for a page
 *               the OS evicted (needs RLIMIT_MEMLOCK or CAP_IPC_LOCK) */
struct map_options {
    bool hugepage, populate, mlock;
};

static void gguf_advise(const struct gguf *g, struct map_options o) {
    if (!g->map) return;
#ifdef MADV_HUGEPAGE
    if (o.hugepage && madvise((void *)g->map, (size_t)g->size, MADV_HUGEPAGE) != 0)
        fprintf(stderr, "ds4: %s: MADV_HUGEPAGE refused: %s\n", g->path, strerror(errno));
#endif
    if (o.populate) {
        madvise((void *)g->map, (size_t)g->size, MADV_WILLNEED);
        volatile uint8_t sink = 0;
        long page = sysconf(_SC_PAGESIZE);
        for (uint64_t i = 0; i < g->size; i += (uint64_t)page) sink ^= g->map[i];
        (void)sink;
    }
    if (o.mlock && mlock(g->map, (size_t)g->size) != 0)
        fprintf(stderr, "ds4: %s: mlock refused: %s\n", g->path, strerror(errno));
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
    case GGUF_F32: {
        uint32_t b = (uint32_t)bits;
        float f;
        memcpy(&f, &b, 4);
        *out = f;
        return true;
    }
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

/* Declared ahead: defined in a later chapter. */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
static float quant_avx2_hsum(__m256 v);
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
static float quant_avx2_half(uint16_t h);
#endif
static float quant_fast_dot_f32(const float *a, const float *b, int64_t n);
static void quant_fast_axpy_f32(float *y, float a, const float *x, int64_t n);
static float quant_fast_vec_dot(uint32_t type, const void *w, const float *x, int64_t n);
static void quant_fast_dequant(uint32_t type, const void *src, float *y, int64_t n);

/* =========================================================================
 * Chapter 3. Quantized blocks
 * =========================================================================
 *
 * Format: [GGML] block layouts [LAYOUT §2].
 * CPU: dequant_row_ref(), vec_dot_ref() (the definitions);
 *      dequant_row(), vec_dot() (the fast paths used by the engine).
 * Tests: tests/test_quant.c.
 *
 * The GGUF file stores most of DeepSeek V4 Flash's weights not as floats but
 * as *quantized blocks*: a run of 32 or 256 consecutive values of one
 * weight row, squeezed into a few bytes that hold small integers plus one or
 * two shared scale factors. The routed experts of the "q2" file cost about
 * 2.25 bits per weight instead of 16 (80.8 GiB instead of roughly seven
 * times that [LAYOUT §1.4]), which is what lets the model fit
 * on one machine. This chapter is the only place that knows what those
 * bytes mean.
 *
 * Five formats appear in the model, all byte-compatible with GGML so that
 * files made by existing tools load unchanged:
 *
 *     type      values/block  bytes/block  bits/weight  where
 *     F16             1            2          16        embeddings, HC, router,
 *                                                       compressor, indexer
 *     Q8_0           32           34           8.5      attention, shared expert,
 *                                                       output head
 *     Q2_K          256           84           2.625    routed down (q2 file)
 *     Q4_K          256          144           4.5      routed experts (q4 file)
 *     IQ2_XXS       256           66           2.0625   routed gate/up (q2 file)
 *
 * plus F32 (norms, biases), BF16 (not used by the released files, accepted
 * for home-made conversions) and I32 (the hash-routing table; not a weight).
 *
 * HOW TO READ THIS CHAPTER
 *
 * Every format is defined twice. The *reference* functions (3.5) decode one
 * value at a time in plain C: they are the specification, short enough to
 * check against the byte tables below by eye. The *fast* functions (15.1 for
 * x86-64 AVX2, 16.1 for arm64 NEON) decode eight or four values per
 * instruction and are tested against the reference (tests/test_quant.c).
 * Nothing else in the engine looks inside a block.
 *
 * WHY ACTIVATIONS STAY FLOAT
 *
 * GGML and the original ds4 quantize the *activation* vector too (to "Q8_K",
 * 8-bit with one scale per 256) so the inner loop can be an integer dot
 * product. By default we do not: the weights are decoded to float in registers and
 * multiplied with the float32 activations (3.9 adds the integer path as
 * the `--fast` option). It costs some speed, but then
 * vec_dot() differs from "dequantize the row, then an ordinary float dot
 * product" only by float rounding (the order of the additions, 3.6), so the
 * whole engine can be checked against one obvious definition, to about 1e-5
 * relative, with no second source of error.
 *
 * CONVENTIONS
 *
 * - All multi-byte fields are little-endian; every supported target is
 *   little-endian, so blocks are read through C structs whose layout (no
 *   padding) is checked at compile time.
 * - `n` is always the number of *values* (not blocks or bytes) and must be a
 *   multiple of the type's block size. type_row_bytes() returns 0 when it is
 *   not, so the loader can reject such a tensor; kernels do not check.
 * - Kernels hold no state. The only global state is the IQ2_XXS float tables
 *   (3.4) and the choice among the CPU's integer kernels (3.9), both made
 *   once by quant_tables_init() before any thread starts.
 */

/* ---- 3.1 Types and their sizes ------------------------------------------ */

/* Type ids are GGML's `ggml_type` numbers, as written in the GGUF tensor
 * table. Only the ones this engine can read are listed. */
enum tensor_type {
    TYPE_F32 = 0,
    TYPE_F16 = 1,
    TYPE_Q8_0 = 8,
    TYPE_Q2_K = 10,
    TYPE_Q4_K = 12,
    TYPE_IQ2_XXS = 16,
    TYPE_I32 = 26,
    TYPE_BF16 = 30
};

/* What the loader needs to know about a type: a name for messages and the
 * size of one block. A row of `n` values takes n / block_values blocks. */
struct type_traits {
    const char *name;
    int block_values;   /* values per block */
    int block_bytes;    /* bytes per block */
};

static const struct type_traits quant_type_table[] = {
    [TYPE_F32]     = { "f32",      1,   4 },
    [TYPE_F16]     = { "f16",      1,   2 },
    [TYPE_Q8_0]    = { "q8_0",    32,  34 },
    [TYPE_Q2_K]    = { "q2_K",   256,  84 },
    [TYPE_Q4_K]    = { "q4_K",   256, 144 },
    [TYPE_IQ2_XXS] = { "iq2_xxs", 256,  66 },
    [TYPE_I32]     = { "i32",      1,   4 },
    [TYPE_BF16]    = { "bf16",     1,   2 },
};

/* Returns NULL for a type id this engine does not support (the table has
 * holes: those entries have a NULL name). */
static const struct type_traits *type_traits_of(uint32_t type) {
    size_t count = sizeof(quant_type_table) / sizeof(quant_type_table[0]);
    if (type >= count || quant_type_table[type].name == NULL) return NULL;
    return &quant_type_table[type];
}

/* Bytes of one row of `n_values`. Returns 0 for an unsupported type or a
 * length that is not a whole number of blocks, so the loader can report it. */
static uint64_t type_row_bytes(uint32_t type, uint64_t n_values) {
    const struct type_traits *t = type_traits_of(type);
    if (t == NULL || n_values % (uint64_t)t->block_values != 0) return 0;
    return n_values / (uint64_t)t->block_values * (uint64_t)t->block_bytes;
}

/* Reaching a kernel with a type the loader should have rejected is a bug in
 * the engine, not bad input: say which and stop. */
static void quant_die_unsupported(const char *fn, uint32_t type) {
    fprintf(stderr, "ds4: %s: unsupported tensor type %u\n", fn, (unsigned)type);
    abort();
}

/* ---- 3.2 Half and bfloat16 floats --------------------------------------- */

/* Two 16-bit float formats appear: IEEE binary16 ("half", F16), used for
 * whole tensors and for every block scale below, and bfloat16, which is
 * simply the top half of a float32.
 *
 *     bit   15    14..10      9..0          half:  (-1)^s * 2^(e-15) * 1.m
 *     half  sign  exponent e  mantissa m           e = 0:  (-1)^s * 2^-14 * 0.m
 *                                                  e = 31: inf (m = 0) or nan
 *     bit   15    14..7       6..0
 *     bf16  sign  exponent    mantissa      bf16 = float32 bits >> 16
 *
 * These are the portable versions; the fast paths use the hardware
 * conversion (F16C `vcvtph2ps`, NEON `fcvtl`), which gives the same results. */

static float quant_f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t quant_bits_from_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* Half to float is exact: every half is a float. A normal half moves its
 * exponent from bias 15 to bias 127 (add 112) and its mantissa from 10 to 23
 * bits. A subnormal half is m * 2^-24, which float32 holds exactly. */
static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 31;
    uint32_t mantissa = h & 0x3ff;
    if (exponent == 31) return quant_f32_from_bits(sign | 0x7f800000 | (mantissa << 13));
    if (exponent != 0)
        return quant_f32_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
    float magnitude = (float)mantissa * (1.0f / 16777216.0f);   /* m * 2^-24 */
    return sign ? -magnitude : magnitude;
}

/* Keep the top `kept` bits of `value` (dropping the low `dropped` bits),
 * rounding to nearest with ties going to an even result. A carry out of the
 * mantissa correctly bumps the exponent, up to infinity. */
static uint32_t quant_round_shift(uint32_t value, int dropped) {
    uint32_t kept = value >> dropped;
    uint32_t rest = value & ((1u << dropped) - 1);
    uint32_t half = 1u << (dropped - 1);
    if (rest > half || (rest == half && (kept & 1))) kept++;
    return kept;
}

/* Float to half, rounding to nearest even. Three ranges:
 *
 *     |f| >= 65520        -> inf  (65504 is the largest half; the rounding
 *                                  carry produces inf for the upper part)
 *     2^-14 <= |f|        -> normal half, mantissa rounded from 23 to 10 bits
 *     |f| < 2^-14         -> subnormal half m * 2^-24, m rounded; values up
 *                            to 2^-25 (a tie) round to zero
 *
 * Nan stays nan (quiet bit set, so a payload that shifts away stays nan). */
static uint16_t f32_to_f16(float f) {
    uint32_t x = quant_bits_from_f32(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t exponent = (x >> 23) & 0xff;
    uint32_t mantissa = x & 0x7fffff;
    if (exponent == 0xff)
        return sign | 0x7c00 | (mantissa ? 0x200 | (mantissa >> 13) : 0);
    int e = (int)exponent - 127 + 15;              /* half exponent field */
    if (e >= 31) return sign | 0x7c00;
    if (e >= 1)
        return sign | (uint16_t)quant_round_shift(((uint32_t)e << 23) | mantissa, 13);
    if (e < -10) return sign;                      /* below 2^-25: zero */
    /* Subnormal: restore the implicit 1 and shift so one unit is 2^-24. */
    return sign | (uint16_t)quant_round_shift(mantissa | 0x800000, 14 - e);
}

static float bf16_to_f32(uint16_t h) {
    return quant_f32_from_bits((uint32_t)h << 16);
}

/* Float to bfloat16 rounds to nearest even by adding 0x7fff plus the lowest
 * kept bit before truncating. Nan must be handled first: the addition could
 * carry a nan's payload into the exponent and turn it into infinity. */
static uint16_t f32_to_bf16(float f) {
    uint32_t x = quant_bits_from_f32(f);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40);
    return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

/* ---- 3.3 Block layouts --------------------------------------------------- */

/* Q8_0: 32 values, 34 bytes.  y[i] = d * qs[i]
 *
 *     OFFSET  SIZE  DESCRIPTION
 *        0      2   d, half: the block scale, max|x| / 127
 *        2     32   qs[32], int8: the values in units of d
 */
struct block_q8_0 {
    uint16_t d;
    int8_t qs[32];
};

/* Q2_K: 256 values ("super-block"), 84 bytes, 16 sub-blocks of 16 values.
 * Each sub-block k has its own 4-bit scale and 4-bit min:
 *
 *     y = d * sc[k] * q  -  dmin * m[k]          q in 0..3
 *
 *     OFFSET  SIZE  DESCRIPTION
 *        0     16   scales[16]: low nibble sc[k], high nibble m[k]
 *       16     64   qs[64]: four 2-bit q per byte
 *       80      2   d, half: scale of the sub-block scales
 *       82      2   dmin, half: scale of the sub-block mins
 *
 * The 2-bit values are not stored in order. Value e (0..255) lives at
 *
 *     h = e / 128, j = (e % 128) / 32, l = e % 32
 *     q = (qs[32*h + l] >> (2*j)) & 3,    sub-block k = e / 16
 *
 * i.e. each 128-value half uses 32 bytes, and bit pair j of byte l holds
 * value 32*j + l. This interleaving lets a SIMD decoder get 32 consecutive
 * values with one shift and one mask of a 32-byte register. */
struct block_q2_k {
    uint8_t scales[16];
    uint8_t qs[64];
    uint16_t d;
    uint16_t dmin;
};

/* Q4_K: 256 values, 144 bytes, 8 sub-blocks of 32 values, each with a 6-bit
 * scale and a 6-bit min:
 *
 *     y = d * sc[k] * q  -  dmin * m[k]          q in 0..15
 *
 *     OFFSET  SIZE  DESCRIPTION
 *        0      2   d, half
 *        2      2   dmin, half
 *        4     12   scales[12]: eight 6-bit sc and eight 6-bit m, packed
 *       16    128   qs[128]: two 4-bit q per byte
 *
 * The 16 six-bit numbers are packed into 12 bytes as follows (k = 0..3):
 *
 *     scales[k]   = sc[k]  | (sc[k+4] >> 4) << 6
 *     scales[k+4] = m[k]   | (m[k+4]  >> 4) << 6
 *     scales[k+8] = (sc[k+4] & 15) | (m[k+4] & 15) << 4
 *
 * Values come in four chunks of 64; chunk c uses bytes qs[32c .. 32c+31]:
 * the low nibbles are values 64c + l (sub-block 2c), the high nibbles are
 * values 64c + 32 + l (sub-block 2c+1). So sub-block k is the low (k even)
 * or high (k odd) nibbles of the 32 bytes at qs[32 * (k/2)]. */
struct block_q4_k {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[12];
    uint8_t qs[128];
};

/* IQ2_XXS: 256 values, 66 bytes, 8 groups of 32 values, each made of four
 * 8-value pieces drawn from a fixed codebook (3.4):
 *
 *     OFFSET  SIZE  DESCRIPTION
 *        0      2   d, half
 *        2     64   qs: 8 groups x 8 bytes, each read as two u32 a0, a1
 *
 *     a0: bits 8t..8t+7    grid index g[t] of piece t (t = 0..3)
 *     a1: bits 7t..7t+6    sign index s[t] of piece t
 *         bits 28..31      group scale ls
 *
 *     db = d * (0.5 + ls) / 4
 *     y[8t + j] = db * grid[g[t]][j] * (bit j of signs(s[t]) ? -1 : +1)
 *
 * Only 7 signs per piece are stored; the 8th is chosen so that every piece
 * has an even number of minus signs (3.4 explains). */
struct block_iq2_xxs {
    uint16_t d;
    uint16_t qs[32];
};

_Static_assert(sizeof(struct block_q8_0) == 34, "Q8_0 block is 34 bytes");
_Static_assert(sizeof(struct block_q2_k) == 84, "Q2_K block is 84 bytes");
_Static_assert(sizeof(struct block_q4_k) == 144, "Q4_K block is 144 bytes");
_Static_assert(sizeof(struct block_iq2_xxs) == 66, "IQ2_XXS block is 66 bytes");

/* Unpack sub-block k's 6-bit scale and min from Q4_K's 12 scale bytes (the
 * inverse of the packing drawn above). */
static void quant_q4_k_scale_min(const uint8_t *scales, int k, int *sc, int *m) {
    if (k < 4) {
        *sc = scales[k] & 63;
        *m = scales[k + 4] & 63;
    } else {
        *sc = (scales[k + 4] & 15) | ((scales[k - 4] >> 6) << 4);
        *m = (scales[k + 4] >> 4) | ((scales[k] >> 6) << 4);
    }
}

/* ---- 3.4 The IQ2_XXS codebook -------------------------------------------- */

/* HOW IT WORKS
 *
 * IQ2_XXS spends 16 bits on 8 weights: 8 bits choose one of 256 magnitude
 * patterns, 7 bits choose signs, and the remaining bit is a share of the
 * group scale. The magnitudes in a pattern are each one of only three
 * levels, 8, 25 and 43 (roughly 1 : 3 : 5), and the 256 patterns are the
 * ones that best cover the 8-dimensional points real weight vectors fall
 * on. They were found by training, not by a rule, so the table below is a
 * fact that has to be copied rather than computed.
 *
 * Each u64 holds a pattern's 8 bytes; byte j (least significant first) is
 * the magnitude of value j of the piece.
 *
 * WHY ONLY SEVEN SIGNS
 *
 * Storing 8 signs would cost one more bit per 8 weights. Instead the encoder
 * promises an even number of minus signs, and the decoder recovers the 8th
 * sign as the parity of the other 7:
 *
 *     signs(s) = s | (popcount(s) & 1) << 7        s = 0..127
 *
 * When a piece's weights have an odd number of negatives, the encoder flips
 * the sign of the one with the smallest magnitude, where the damage is least.
 *
 * Source: `iq2xxs_grid` in ggml/src/ggml-common.h of GGML / llama.cpp,
 * Copyright (c) 2023-2024 The ggml authors, MIT License. Reproduced as data;
 * tests/test_quant.c checks that it has 256 distinct entries made only of
 * the bytes 0x08, 0x19, 0x2b. */
static const uint64_t quant_iq2_xxs_grid[256] = {
    0x0808080808080808, 0x080808080808082b, 0x0808080808081919, 0x0808080808082b08,
    0x0808080808082b2b, 0x0808080808190819, 0x0808080808191908, 0x08080808082b0808,
    0x08080808082b082b, 0x08080808082b2b08, 0x08080808082b2b2b, 0x0808080819080819,
    0x0808080819081908, 0x0808080819190808, 0x0808080819192b08, 0x08080808192b0819,
    0x08080808192b1908, 0x080808082b080808, 0x080808082b08082b, 0x080808082b082b2b,
    0x080808082b2b082b, 0x0808081908080819, 0x0808081908081908, 0x0808081908190808,
    0x0808081908191919, 0x0808081919080808, 0x080808192b081908, 0x080808192b192b08,
    0x0808082b08080808, 0x0808082b0808082b, 0x0808082b082b082b, 0x0808082b2b08082b,
    0x0808190808080819, 0x0808190808081908, 0x0808190808190808, 0x08081908082b0819,
    0x08081908082b1908, 0x0808190819080808, 0x080819081908082b, 0x0808190819082b08,
    0x08081908192b0808, 0x080819082b080819, 0x080819082b081908, 0x080819082b190808,
    0x080819082b2b1908, 0x0808191908080808, 0x080819190808082b, 0x0808191908082b08,
    0x08081919082b0808, 0x080819191908192b, 0x08081919192b2b19, 0x080819192b080808,
    0x080819192b190819, 0x0808192b08082b19, 0x0808192b08190808, 0x0808192b19080808,
    0x0808192b2b081908, 0x0808192b2b2b1908, 0x08082b0808080808, 0x08082b0808081919,
    0x08082b0808082b08, 0x08082b0808191908, 0x08082b08082b2b08, 0x08082b0819080819,
    0x08082b0819081908, 0x08082b0819190808, 0x08082b081919082b, 0x08082b082b082b08,
    0x08082b1908081908, 0x08082b1919080808, 0x08082b2b0808082b, 0x08082b2b08191908,
    0x0819080808080819, 0x0819080808081908, 0x0819080808190808, 0x08190808082b0819,
    0x0819080819080808, 0x08190808192b0808, 0x081908082b081908, 0x081908082b190808,
    0x081908082b191919, 0x0819081908080808, 0x0819081908082b08, 0x08190819082b0808,
    0x0819081919190808, 0x0819081919192b2b, 0x081908192b080808, 0x0819082b082b1908,
    0x0819082b19081919, 0x0819190808080808, 0x0819190808082b08, 0x08191908082b0808,
    0x08191908082b1919, 0x0819190819082b19, 0x081919082b080808, 0x0819191908192b08,
    0x08191919192b082b, 0x0819192b08080808, 0x0819192b0819192b, 0x08192b0808080819,
    0x08192b0808081908, 0x08192b0808190808, 0x08192b0819080808, 0x08192b082b080819,
    0x08192b1908080808, 0x08192b1908081919, 0x08192b192b2b0808, 0x08192b2b19190819,
    0x082b080808080808, 0x082b08080808082b, 0x082b080808082b2b, 0x082b080819081908,
    0x082b0808192b0819, 0x082b08082b080808, 0x082b08082b08082b, 0x082b0819082b2b19,
    0x082b081919082b08, 0x082b082b08080808, 0x082b082b0808082b, 0x082b190808080819,
    0x082b190808081908, 0x082b190808190808, 0x082b190819080808, 0x082b19081919192b,
    0x082b191908080808, 0x082b191919080819, 0x082b1919192b1908, 0x082b192b2b190808,
    0x082b2b0808082b08, 0x082b2b08082b0808, 0x082b2b082b191908, 0x082b2b2b19081908,
    0x1908080808080819, 0x1908080808081908, 0x1908080808190808, 0x1908080808192b08,
    0x19080808082b0819, 0x19080808082b1908, 0x1908080819080808, 0x1908080819082b08,
    0x190808081919192b, 0x19080808192b0808, 0x190808082b080819, 0x190808082b081908,
    0x190808082b190808, 0x1908081908080808, 0x19080819082b0808, 0x19080819192b0819,
    0x190808192b080808, 0x190808192b081919, 0x1908082b08080819, 0x1908082b08190808,
    0x1908082b19082b08, 0x1908082b1919192b, 0x1908082b192b2b08, 0x1908190808080808,
    0x1908190808082b08, 0x19081908082b0808, 0x190819082b080808, 0x190819082b192b19,
    0x190819190819082b, 0x19081919082b1908, 0x1908192b08080808, 0x19082b0808080819,
    0x19082b0808081908, 0x19082b0808190808, 0x19082b0819080808, 0x19082b0819081919,
    0x19082b1908080808, 0x19082b1919192b08, 0x19082b19192b0819, 0x19082b192b08082b,
    0x19082b2b19081919, 0x19082b2b2b190808, 0x1919080808080808, 0x1919080808082b08,
    0x1919080808190819, 0x1919080808192b19, 0x19190808082b0808, 0x191908082b080808,
    0x191908082b082b08, 0x1919081908081908, 0x191908191908082b, 0x191908192b2b1908,
    0x1919082b2b190819, 0x191919082b190808, 0x191919082b19082b, 0x1919191908082b2b,
    0x1919192b08080819, 0x1919192b19191908, 0x19192b0808080808, 0x19192b0808190819,
    0x19192b0808192b19, 0x19192b08192b1908, 0x19192b1919080808, 0x19192b2b08082b08,
    0x192b080808081908, 0x192b080808190808, 0x192b080819080808, 0x192b0808192b2b08,
    0x192b081908080808, 0x192b081919191919, 0x192b082b08192b08, 0x192b082b192b0808,
    0x192b190808080808, 0x192b190808081919, 0x192b191908190808, 0x192b19190819082b,
    0x192b19192b081908, 0x192b2b081908082b, 0x2b08080808080808, 0x2b0808080808082b,
    0x2b08080808082b2b, 0x2b08080819080819, 0x2b0808082b08082b, 0x2b08081908081908,
    0x2b08081908192b08, 0x2b08081919080808, 0x2b08082b08190819, 0x2b08190808080819,
    0x2b08190808081908, 0x2b08190808190808, 0x2b08190808191919, 0x2b08190819080808,
    0x2b081908192b0808, 0x2b08191908080808, 0x2b0819191908192b, 0x2b0819192b191908,
    0x2b08192b08082b19, 0x2b08192b19080808, 0x2b08192b192b0808, 0x2b082b080808082b,
    0x2b082b1908081908, 0x2b082b2b08190819, 0x2b19080808081908, 0x2b19080808190808,
    0x2b190808082b1908, 0x2b19080819080808, 0x2b1908082b2b0819, 0x2b1908190819192b,
    0x2b1908192b080808, 0x2b19082b19081919, 0x2b19190808080808, 0x2b191908082b082b,
    0x2b19190819081908, 0x2b19191919190819, 0x2b192b082b080819, 0x2b192b19082b0808,
    0x2b2b08080808082b, 0x2b2b080819190808, 0x2b2b08082b081919, 0x2b2b081908082b19,
    0x2b2b082b08080808, 0x2b2b190808192b08, 0x2b2b2b0819190808, 0x2b2b2b1908081908,
};

/* Magnitude j (0..7) of codebook entry g. */
static int quant_iq2_grid_byte(int g, int j) {
    return (int)((quant_iq2_xxs_grid[g] >> (8 * j)) & 0xff);
}

/* The 8 sign bits of a piece from its 7 stored ones: bit j set means value
 * j is negative, and bit 7 restores an even count. */
static int quant_iq2_signs(int s7) {
    int odd = __builtin_popcount((unsigned)s7) & 1;
    return s7 | (odd << 7);
}

/* The fast decoders want the codebook in a form a vector load can use
 * directly, instead of unpacking bytes and computing parities per piece:
 *
 *     quant_iq2_grid_f32[g][j]  = grid magnitude as a float      [256][8]  8 KB
 *     quant_iq2_sign_bits[s][j] = 0x80000000 if value j negative [128][8]  4 KB
 *
 * A piece is then load(grid) XOR load(sign): flipping a float's sign bit
 * negates it exactly. Both tables fit in L1 next to the activations.
 * (The original ds4 instead expands a 256 KB int8 table [256][128][8] with
 * the signs applied; 12 KB suits a float kernel better.)
 *
 * THREADS: quant_tables_init() must run once, before any thread calls a fast
 * kernel; the engine calls it at start-up. After that the tables are only
 * read, so no locking is needed. Calling it again is harmless but must not
 * race with readers. The reference functions do not use these tables. */
static _Alignas(32) float quant_iq2_grid_f32[256][8];
static _Alignas(32) uint32_t quant_iq2_sign_bits[128][8];
static bool quant_tables_ready;

/* The AVX-512 integer kernel (3.9) looks the codebook up by register
 * permutes instead of loads, so it wants the table small: each magnitude is
 * one of three levels, a 2-bit code, and an entry's 8 codes fit in 16 bits,
 * kept as a table of low bytes and one of high bytes:
 *
 *     code[g] = sum_j level(grid[g][j]) << 2j,  level(8, 25, 43) = 0, 1, 2
 *     quant_iq2_code_bytes[0][g] = code[g] & 255,  [1][g] = code[g] >> 8   [2][256]
 *
 * Each table is 256 bytes, four 64-byte registers. */
static _Alignas(64) uint8_t quant_iq2_code_bytes[2][256];

static void quant_q8_choose_variant(void);

static int quant_iq2_level(int magnitude) {
    return magnitude == 8 ? 0 : magnitude == 25 ? 1 : 2;
}

static void quant_tables_init(void) {
    for (int g = 0; g < 256; g++) {
        int code = 0;
        for (int j = 0; j < 8; j++) {
            quant_iq2_grid_f32[g][j] = (float)quant_iq2_grid_byte(g, j);
            code |= quant_iq2_level(quant_iq2_grid_byte(g, j)) << (2 * j);
        }
        quant_iq2_code_bytes[0][g] = (uint8_t)(code & 255);
        quant_iq2_code_bytes[1][g] = (uint8_t)(code >> 8);
    }
    for (int s = 0; s < 128; s++) {
        int signs = quant_iq2_signs(s);
        for (int j = 0; j < 8; j++)
            quant_iq2_sign_bits[s][j] = (signs >> j) & 1 ? 0x80000000u : 0;
    }
    quant_q8_choose_variant();          /* the integer kernels for this CPU (3.9) */
    quant_tables_ready = true;
}

/* A fast IQ2_XXS kernel reading all-zero tables would silently return zero;
 * make the missing start-up call loud instead. */
static void quant_require_tables(void) {
    if (quant_tables_ready) return;
    fprintf(stderr, "ds4: quant_tables_init() was not called before an IQ2_XXS kernel\n");
    abort();
}

/* ---- 3.5 Reference decoders: the definition of each format --------------- */

/* One function per type, each decoding `nb` consecutive blocks into
 * y[nb * block_values]. The loops follow the formulas of 3.3 literally and
 * use no tables other than the codebook. */

/* y[i] = d * qs[i] */
static void quant_dequant_q8_0_ref(const struct block_q8_0 *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b++) {
        float d = f16_to_f32(b->d);
        for (int l = 0; l < 32; l++) *y++ = d * (float)b->qs[l];
    }
}

/* y[e] = d * sc[k] * q[e] - dmin * m[k],   k = e / 16 */
static void quant_dequant_q2_k_ref(const struct block_q2_k *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b++, y += 256) {
        float d = f16_to_f32(b->d), dmin = f16_to_f32(b->dmin);
        for (int e = 0; e < 256; e++) {
            int h = e / 128, j = (e % 128) / 32, l = e % 32, k = e / 16;
            int q = (b->qs[32 * h + l] >> (2 * j)) & 3;
            y[e] = d * (float)(b->scales[k] & 15) * (float)q
                 - dmin * (float)(b->scales[k] >> 4);
        }
    }
}

/* y[e] = d * sc[k] * q[e] - dmin * m[k],   k = e / 32 */
static void quant_dequant_q4_k_ref(const struct block_q4_k *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b++, y += 256) {
        float d = f16_to_f32(b->d), dmin = f16_to_f32(b->dmin);
        for (int e = 0; e < 256; e++) {
            int c = e / 64, k = e / 32, sc, m;
            int byte = b->qs[32 * c + e % 32];
            int q = k % 2 == 0 ? byte & 15 : byte >> 4;
            quant_q4_k_scale_min(b->scales, k, &sc, &m);
            y[e] = d * (float)sc * (float)q - dmin * (float)m;
        }
    }
}

/* The two 32-bit words of IQ2_XXS group `group` (0..7). qs is only
 * 2-byte aligned, hence memcpy. */
static void quant_iq2_group_words(const struct block_iq2_xxs *b, int group,
                                  uint32_t *a0, uint32_t *a1) {
    memcpy(a0, &b->qs[4 * group], 4);
    memcpy(a1, &b->qs[4 * group + 2], 4);
}

/* db = d * (0.5 + ls) / 4, ls = the top 4 bits of a1 */
static float quant_iq2_group_scale(float d, uint32_t a1) {
    return d * (0.5f + (float)(a1 >> 28)) * 0.25f;
}

/* y[32*g + 8*t + j] = db * grid[g_t][j] * sign_t(j) */
static void quant_dequant_iq2_xxs_ref(const struct block_iq2_xxs *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b++) {
        float d = f16_to_f32(b->d);
        for (int group = 0; group < 8; group++) {
            uint32_t a0, a1;
            quant_iq2_group_words(b, group, &a0, &a1);
            float db = quant_iq2_group_scale(d, a1);
            for (int t = 0; t < 4; t++) {
                int g = (a0 >> (8 * t)) & 255;
                int signs = quant_iq2_signs((a1 >> (7 * t)) & 127);
                for (int j = 0; j < 8; j++) {
                    float v = db * (float)quant_iq2_grid_byte(g, j);
                    *y++ = (signs >> j) & 1 ? -v : v;
                }
            }
        }
    }
}

/* Decode a row of `n` values of any supported type into floats. I32 is
 * converted value by value (exact below 2^24), so that a table such as the
 * hash-routing ids can be inspected with the same function. */
static void dequant_row_ref(uint32_t type, const void *src, float *dst, int64_t n) {
    const uint16_t *h = src;
    switch (type) {
    case TYPE_F32: memcpy(dst, src, (size_t)n * sizeof(float)); break;
    case TYPE_F16: for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(h[i]); break;
    case TYPE_BF16: for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(h[i]); break;
    case TYPE_I32: for (int64_t i = 0; i < n; i++) dst[i] = (float)((const int32_t *)src)[i]; break;
    case TYPE_Q8_0: quant_dequant_q8_0_ref(src, dst, n / 32); break;
    case TYPE_Q2_K: quant_dequant_q2_k_ref(src, dst, n / 256); break;
    case TYPE_Q4_K: quant_dequant_q4_k_ref(src, dst, n / 256); break;
    case TYPE_IQ2_XXS: quant_dequant_iq2_xxs_ref(src, dst, n / 256); break;
    default: quant_die_unsupported("dequant_row_ref", type);
    }
}

/* The reference dot product of a weight row with float activations:
 *
 *     sum = sum_i w[i] * x[i],   w = dequant_row_ref(row),  i in order
 *
 * accumulated in float, one term at a time. Decoding goes through a 256-value
 * stack buffer (one super-block, or eight 32-blocks) rather than a
 * whole-row allocation; the order of the additions is the same. */
enum { QUANT_REF_CHUNK = 256 };

static float vec_dot_ref(uint32_t type, const void *w, const float *x, int64_t n) {
    float chunk[QUANT_REF_CHUNK];
    const uint8_t *row = w;
    float sum = 0.0f;
    for (int64_t start = 0; start < n; start += QUANT_REF_CHUNK) {
        int64_t len = n - start < QUANT_REF_CHUNK ? n - start : QUANT_REF_CHUNK;
        dequant_row_ref(type, row + type_row_bytes(type, (uint64_t)start), chunk, len);
        for (int64_t i = 0; i < len; i++) sum += chunk[i] * x[start + i];
    }
    return sum;
}

/* ---- 3.6 Fast paths: the plan -------------------------------------------- */

/* Decoding a token multiplies every active weight once, so this is the hot
 * loop of the whole engine. Each SIMD section below provides the same four
 * entry points, and 3.7 dispatches to them:
 *
 *     quant_fast_dot_f32(a, b, n)        sum a[i]*b[i]
 *     quant_fast_axpy_f32(y, a, x, n)    y[i] += a*x[i]
 *     quant_fast_vec_dot(type, w, x, n)  vec_dot_ref, rearranged
 *     quant_fast_dequant(type, w, y, n)  dequant_row_ref, vectorized
 *
 * ONE SHAPE FOR EVERY QUANTIZED TYPE
 *
 * Seen from far enough, all four block formats say the same thing: inside
 * sub-block k (16 or 32 values; a whole block for Q8_0, a group for IQ2_XXS)
 *
 *     w[i] = scale_k * q[i] - min_k
 *
 * where q[i] is a small integer (for IQ2_XXS a signed grid magnitude) and
 * min_k is zero for Q8_0 and IQ2_XXS. So each type gets a *decoder* that
 * turns one sub-block of bytes into its q values as float registers, and
 * the scale and min are two scalars computed beside it. Dequantizing is
 * then one fused multiply-subtract per register and a store.
 *
 * The dot product rearranges the sum over a sub-block:
 *
 *     sum_i w[i] * x[i]  =  scale_k * sum_i q[i] * x[i]  -  min_k * sum_i x[i]
 *
 * Per 8 weights this costs one FMA (q*x) and one add (x), instead of
 * forming w (one FMA) and then w*x (another FMA); the scale and min are
 * applied once per sub-block. On the x86 test machine (a shared AMD EPYC
 * VM) this took Q4_K from 11.5 to 10.4 billion weights per second per core.
 *
 * WHAT THE REARRANGEMENT COSTS IN ACCURACY
 *
 * vec_dot differs from vec_dot_ref only in float rounding: the order of the
 * additions, and the distributive law above. The second's error is about
 * 1e-7 of sum_i (|scale*q[i]| + |min|) * |x[i]|, which can be a few times
 * sum |w*x| when a sub-block's min is large. The tests hold vec_dot to 1e-5
 * of sum |w*x| and measure about 1e-7.
 *
 * Each sum is kept in a few separate registers ("accumulators") that are
 * added together at the end: an FMA's result arrives about 4 cycles after
 * it starts, so a single running sum would make every step wait for the
 * previous one. */

/* ---- 3.7 The kernels the engine calls ------------------------------------ */

/* Decode a row of `n` values of any type into floats (3.5 gives the meaning).
 * The IQ2_XXS table check is made here, on every build, so a missing
 * quant_tables_init() fails the same way on a machine without SIMD. */
static void dequant_row(uint32_t type, const void *src, float *dst, int64_t n) {
    if (type == TYPE_IQ2_XXS) quant_require_tables();
    quant_fast_dequant(type, src, dst, n);
}

/* Dot product of one weight row of any type with float32 activations x[n].
 * Equal to vec_dot_ref() up to the order of the float additions. */
static float vec_dot(uint32_t type, const void *w, const float *x, int64_t n) {
    if (type == TYPE_IQ2_XXS) quant_require_tables();
    return quant_fast_vec_dot(type, w, x, n);
}

static float dot_f32(const float *a, const float *b, int64_t n) {
    return quant_fast_dot_f32(a, b, n);
}

/* y[i] += a * x[i] */
static void axpy_f32(float *y, float a, const float *x, int64_t n) {
    quant_fast_axpy_f32(y, a, x, n);
}

/* ---- 3.8 Encoders -------------------------------------------------------- */

/* The engine only reads quantized weights; these encoders exist for the
 * converter and for the tests, which need blocks with known content. They
 * aim to be simple and reasonable, not to match GGML's quantizers bit for
 * bit: any block they write is valid and decodes by 3.5, which is all the
 * format promises. Rounding is always roundf(), i.e. to nearest with ties
 * away from zero. */

static int quant_clamp_round(float v, int lo, int hi) {
    int r = (int)roundf(v);
    return r < lo ? lo : r > hi ? hi : r;
}

static float quant_max_abs(const float *x, int n) {
    float m = 0.0f;
    for (int i = 0; i < n; i++) m = fmaxf(m, fabsf(x[i]));
    return m;
}

/* Q8_0:  d = max|x| / 127,  qs[i] = round(x[i] / d)
 *
 * d is rounded to half *before* dividing by it, so that qs fits the scale
 * that is actually stored: every value then decodes within d/2 of x (the
 * clamp can cost at most 127 * d * 2^-11, about 0.06 d, for the largest). */
static void quant_quantize_q8_0(const float *x, struct block_q8_0 *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b++, x += 32) {
        b->d = f32_to_f16(quant_max_abs(x, 32) / 127.0f);
        float d = f16_to_f32(b->d), inv = d > 0.0f ? 1.0f / d : 0.0f;
        for (int l = 0; l < 32; l++) b->qs[l] = (int8_t)quant_clamp_round(x[l] * inv, -127, 127);
    }
}

/* K-QUANT SUB-BLOCKS: FITTING  x ~ scale * q - offset
 *
 * Q2_K and Q4_K describe each sub-block of n values by q[i] in 0..qmax and
 *
 *     x[i] ~ scale * q[i] - offset,      scale >= 0, offset >= 0
 *
 * (offset >= 0 because the min is stored unsigned: the grid always reaches
 * down to 0 or below). The obvious fit spreads q over [lo, hi] =
 * [min(0, min x), max x], but for 2-bit q that wastes levels on the extreme
 * values. So we try a few grids: for each candidate step
 *
 *     step = (hi - lo) / (qmax + t/10),  t = -10..10
 *
 * assign q[i] = round((x[i] - lo) / step), then, holding q fixed, solve the
 * least-squares line x ~ a*q + b exactly:
 *
 *     a = (n*Sqx - Sq*Sx) / (n*Sqq - Sq*Sq),   b = (Sx - a*Sq) / n
 *
 * (if b > 0 the offset would be negative: pin b = 0 and a = Sqx / Sqq), and
 * keep the candidate with the smallest squared error. 21 tries is a small
 * search. Measured on normal data (tests/test_quant.c), it lowers the RMS
 * error of Q2_K from 0.286 to 0.269 and of Q4_K from 0.075 to 0.071 compared
 * with the single least-squares fit at t = 0; 41 tries gain nothing more. */
enum { QUANT_FIT_TRIES = 10 };

struct quant_fit {
    float scale, offset, err;
};

/* Squared error of x against a*q - offset with q assigned from grid `step`. */
static struct quant_fit quant_fit_grid(const float *x, int n, int qmax, float lo, float step) {
    float sq = 0, sx = 0, sqq = 0, sqx = 0;
    uint8_t q[32];
    for (int i = 0; i < n; i++) {
        q[i] = (uint8_t)quant_clamp_round((x[i] - lo) / step, 0, qmax);
        sq += q[i];
        sx += x[i];
        sqq += (float)(q[i] * q[i]);
        sqx += q[i] * x[i];
    }
    /* All q equal (det = 0): only the offset can be fitted, to the mean. */
    float det = n * sqq - sq * sq;
    float a = det > 0 ? (n * sqx - sq * sx) / det : 0.0f;
    float b = det > 0 ? (sx - a * sq) / n : sx / n;
    if (b > 0) {
        b = 0;
        a = sqq > 0 ? sqx / sqq : 0.0f;
    }
    if (a < 0) a = 0;
    struct quant_fit fit = { a, -b, 0 };
    for (int i = 0; i < n; i++) {
        float r = a * q[i] + b - x[i];
        fit.err += r * r;
    }
    return fit;
}

static struct quant_fit quant_fit_affine(const float *x, int n, int qmax) {
    float lo = 0.0f, hi = 0.0f;
    for (int i = 0; i < n; i++) lo = fminf(lo, x[i]), hi = fmaxf(hi, x[i]);
    if (hi == lo) return (struct quant_fit){ 0.0f, -lo, 0.0f };
    struct quant_fit best = { (hi - lo) / qmax, -lo, INFINITY };
    for (int t = -QUANT_FIT_TRIES; t <= QUANT_FIT_TRIES; t++) {
        struct quant_fit fit = quant_fit_grid(x, n, qmax, lo, (hi - lo) / (qmax + 0.1f * t));
        if (fit.err < best.err) best = fit;
    }
    return best;
}

/* From per-sub-block (scale, offset) to the stored form: two halves d and
 * dmin, and integer sc[k], m[k] of `bits` bits each:
 *
 *     d = max_k scale[k] / (2^bits - 1),   sc[k] = round(scale[k] / d)
 *
 * and the same for the offsets. Then every q is re-chosen against the
 * rounded values actually stored, q = round((x + dmin*m) / (d*sc)). */
static void quant_k_scales(const struct quant_fit *fit, int count, int bits,
                           uint16_t *d_half, uint16_t *dmin_half, int *sc, int *m) {
    int top = (1 << bits) - 1;
    float max_scale = 0, max_offset = 0;
    for (int k = 0; k < count; k++)
        max_scale = fmaxf(max_scale, fit[k].scale), max_offset = fmaxf(max_offset, fit[k].offset);
    *d_half = f32_to_f16(max_scale / top);
    *dmin_half = f32_to_f16(max_offset / top);
    float d = f16_to_f32(*d_half), dmin = f16_to_f32(*dmin_half);
    for (int k = 0; k < count; k++) {
        sc[k] = d > 0 ? quant_clamp_round(fit[k].scale / d, 0, top) : 0;
        m[k] = dmin > 0 ? quant_clamp_round(fit[k].offset / dmin, 0, top) : 0;
    }
}

/* q for one value, given its sub-block's stored scale and offset. */
static int quant_k_value(float x, float scale, float offset, int qmax) {
    return scale > 0 ? quant_clamp_round((x + offset) / scale, 0, qmax) : 0;
}

static void quant_quantize_q2_k(const float *x, struct block_q2_k *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b++, x += 256) {
        struct quant_fit fit[16];
        int sc[16], m[16];
        for (int k = 0; k < 16; k++) fit[k] = quant_fit_affine(x + 16 * k, 16, 3);
        quant_k_scales(fit, 16, 4, &b->d, &b->dmin, sc, m);
        float d = f16_to_f32(b->d), dmin = f16_to_f32(b->dmin);
        memset(b->qs, 0, sizeof b->qs);
        for (int k = 0; k < 16; k++) b->scales[k] = (uint8_t)(sc[k] | m[k] << 4);
        for (int e = 0; e < 256; e++) {
            int h = e / 128, j = (e % 128) / 32, l = e % 32, k = e / 16;
            int q = quant_k_value(x[e], d * sc[k], dmin * m[k], 3);
            b->qs[32 * h + l] |= (uint8_t)(q << (2 * j));
        }
    }
}

static void quant_pack_q4_k_scales(const int *sc, const int *m, uint8_t scales[12]) {
    for (int k = 0; k < 4; k++) {
        scales[k] = (uint8_t)(sc[k] | (sc[k + 4] >> 4) << 6);
        scales[k + 4] = (uint8_t)(m[k] | (m[k + 4] >> 4) << 6);
        scales[k + 8] = (uint8_t)((sc[k + 4] & 15) | (m[k + 4] & 15) << 4);
    }
}

static void quant_quantize_q4_k(const float *x, struct block_q4_k *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b++, x += 256) {
        struct quant_fit fit[8];
        int sc[8], m[8];
        for (int k = 0; k < 8; k++) fit[k] = quant_fit_affine(x + 32 * k, 32, 15);
        quant_k_scales(fit, 8, 6, &b->d, &b->dmin, sc, m);
        quant_pack_q4_k_scales(sc, m, b->scales);
        float d = f16_to_f32(b->d), dmin = f16_to_f32(b->dmin);
        memset(b->qs, 0, sizeof b->qs);
        for (int e = 0; e < 256; e++) {
            int c = e / 64, k = e / 32;
            int q = quant_k_value(x[e], d * sc[k], dmin * m[k], 15);
            b->qs[32 * c + e % 32] |= (uint8_t)(k % 2 == 0 ? q : q << 4);
        }
    }
}

/* IQ2_XXS ENCODER
 *
 * For each super-block:
 *
 * 1. d from the max: the largest |x| should be reachable with the largest
 *    group scale (ls = 15, db = d * 15.5/4) and the largest magnitude (43):
 *
 *        d = max|x| / (43 * 15.5 / 4)
 *
 *    Trying smaller d as well (max|x| mapped to 41, 39, ... 25) was measured
 *    and changed the RMS error on normal data from 0.3273 to 0.3269: the
 *    per-group scale in step 3 already absorbs it, so we do not search.
 *
 * 2. Each 8-value piece gets its signs from x: bit j set when x[j] < 0. If
 *    that gives an odd number of negatives, the smallest |x[j]| has its sign
 *    bit flipped (3.4). With the signs fixed, piece value j is
 *    sign[j] * db * grid[g][j], so its squared error is
 *
 *        err(g) = sum_j (db * grid[g][j] - a[j])^2,    a[j] = sign[j] * x[j]
 *               = db^2 * G2[g] - 2 db * A[g] + sum_j a[j]^2
 *
 *    with G2[g] = sum_j grid[g][j]^2 and A[g] = sum_j grid[g][j] * a[j].
 *    A[g] is computed once per piece; then trying every grid entry g for a
 *    given db costs one multiply-add each.
 *
 * 3. Each 32-value group tries all 16 scales ls, picks for each its best g
 *    per piece by brute force over the 256 entries, and keeps the ls with
 *    the smallest total error.
 *
 * Cost: about 100 multiply-adds per value. This is fine for tests and for
 * occasional conversions; the released IQ2_XXS files were made with GGML's
 * slower, importance-weighted search, so the engine never needs to beat it. */

struct quant_iq2_piece {
    int sign7;          /* the 7 stored sign bits */
    float a2;           /* sum_j a[j]^2 */
    float dots[256];    /* A[g] */
};

static void quant_iq2_prepare_piece(const float *x, struct quant_iq2_piece *p) {
    int signs = 0, smallest = 0;
    for (int j = 0; j < 8; j++) {
        if (x[j] < 0) signs |= 1 << j;
        if (fabsf(x[j]) < fabsf(x[smallest])) smallest = j;
    }
    if (__builtin_popcount((unsigned)signs) & 1) signs ^= 1 << smallest;
    float a[8];
    p->a2 = 0;
    for (int j = 0; j < 8; j++) {
        a[j] = (signs >> j) & 1 ? -x[j] : x[j];
        p->a2 += a[j] * a[j];
    }
    for (int g = 0; g < 256; g++) {
        float dot = 0;
        for (int j = 0; j < 8; j++) dot += (float)quant_iq2_grid_byte(g, j) * a[j];
        p->dots[g] = dot;
    }
    p->sign7 = signs & 127;
}

/* Best grid entry for one piece at scale db; returns its squared error. */
static float quant_iq2_best_entry(const struct quant_iq2_piece *p, const float *grid_sq,
                                  float db, int *best_g) {
    float best = INFINITY;
    for (int g = 0; g < 256; g++) {
        float err = db * db * grid_sq[g] - 2 * db * p->dots[g];
        if (err < best) {
            best = err;
            *best_g = g;
        }
    }
    return best + p->a2;
}

/* Encode one 32-value group with super-block scale d; writes its 8 bytes. */
static void quant_iq2_encode_group(const float *x, float d, const float *grid_sq,
                                   uint16_t qs[4]) {
    struct quant_iq2_piece piece[4];
    for (int t = 0; t < 4; t++) quant_iq2_prepare_piece(x + 8 * t, &piece[t]);
    float best_err = INFINITY;
    uint32_t best_a0 = 0, best_a1 = 0;
    for (int ls = 0; ls < 16; ls++) {
        float db = d * (0.5f + ls) * 0.25f, err = 0;
        uint32_t a0 = 0, a1 = (uint32_t)ls << 28;
        for (int t = 0; t < 4; t++) {
            int g = 0;
            err += quant_iq2_best_entry(&piece[t], grid_sq, db, &g);
            a0 |= (uint32_t)g << (8 * t);
            a1 |= (uint32_t)piece[t].sign7 << (7 * t);
        }
        if (err < best_err) {
            best_err = err;
            best_a0 = a0;
            best_a1 = a1;
        }
    }
    memcpy(&qs[0], &best_a0, 4);
    memcpy(&qs[2], &best_a1, 4);
}

static void quant_quantize_iq2_xxs(const float *x, struct block_iq2_xxs *b, int64_t nb) {
    float grid_sq[256];
    for (int g = 0; g < 256; g++) {
        grid_sq[g] = 0;
        for (int j = 0; j < 8; j++)
            grid_sq[g] += (float)(quant_iq2_grid_byte(g, j) * quant_iq2_grid_byte(g, j));
    }
    for (int64_t i = 0; i < nb; i++, b++, x += 256) {
        b->d = f32_to_f16(quant_max_abs(x, 256) / (43.0f * 15.5f * 0.25f));
        float d = f16_to_f32(b->d);
        for (int group = 0; group < 8; group++)
            quant_iq2_encode_group(x + 32 * group, d, grid_sq, &b->qs[4 * group]);
    }
}

/* Encode a row of `n` floats as `type`. */
static void quantize_row(uint32_t type, const float *src, void *dst, int64_t n) {
    uint16_t *h = dst;
    switch (type) {
    case TYPE_F32: memcpy(dst, src, (size_t)n * sizeof(float)); break;
    case TYPE_F16: for (int64_t i = 0; i < n; i++) h[i] = f32_to_f16(src[i]); break;
    case TYPE_BF16: for (int64_t i = 0; i < n; i++) h[i] = f32_to_bf16(src[i]); break;
    case TYPE_Q8_0: quant_quantize_q8_0(src, dst, n / 32); break;
    case TYPE_Q2_K: quant_quantize_q2_k(src, dst, n / 256); break;
    case TYPE_Q4_K: quant_quantize_q4_k(src, dst, n / 256); break;
    case TYPE_IQ2_XXS: quant_quantize_iq2_xxs(src, dst, n / 256); break;
    default: quant_die_unsupported("quantize_row", type);
    }
}

/* A tensor's size in bytes, or ok=false when the type is unknown or its rows
 * are not a whole number of blocks. Rows are never split across blocks. */
static uint64_t tensor_bytes_for(uint32_t type, uint64_t n_elements, uint64_t row_len,
                                 bool *ok) {
    const struct type_traits *tt = type_traits_of(type);
    *ok = tt && row_len % (uint64_t)tt->block_values == 0;
    if (!*ok) return 0;
    return n_elements / (uint64_t)tt->block_values * (uint64_t)tt->block_bytes;
}

/* ---- 3.9 Eight-bit activations: integer dot products -------------------- */

/* WHY QUANTIZE THE ACTIVATIONS AFTER ALL
 *
 * The float kernels of 15.1 spend their time *decoding*: turning each 2-bit
 * or grid-coded weight into a float register costs several instructions per
 * 8 weights, so on the 2-bit expert matrices they run at under 1 GB/s, far
 * below what memory can deliver. Integer dot products remove the decoding
 * to float altogether: an x86 `pmaddubsw` multiplies 32 unsigned bytes by 32
 * signed bytes and adds neighbouring pairs in one instruction, so a
 * sub-block of small integer weights meets an 8-bit copy of the activations
 * directly, and the block scales are applied once per 32 values. (arm64's
 * `sdot` does the same for 16 signed bytes, adding fours into 32 bits; the
 * NEON kernels follow the x86 ones below.)
 *
 * The price is a second source of error, which is why this path is a
 * choice (engine option q8_activations, 6.1) and the float kernels remain
 * the reference. Each block b of 32 activations is quantized as
 *
 *     d[b] = max_{i in b} |x[i]| / 127,     q[i] = round(x[i] / d[b])
 *     s[k] = sum_{i in 16-run k} x[i]       (exact float sums)      x: [n]
 *
 * (a scale per 32 rather than per 256: it follows the activations' outliers
 * more closely and lines up with every block size in use). The products
 * become, with w's integer parts and scales as in 3.3:
 *
 *     Q8_0:     sum_b  dw[b] d[b] sum_{i in b} qs[i] q[i]
 *     Q2_K:     sum_k  d sc[k] d[b(k)] sum_i q2[i] q[i]  -  dmin m[k] s[k]
 *     Q4_K:     sum_k  d sc[k] d[k]    sum_i q4[i] q[i]  -  dmin m[k] (s[2k] + s[2k+1])
 *     IQ2_XXS:  sum_g  d (2 ls + 1) / 8 d[g] sum_i grid[i] sign[i] q[i]
 *
 * The mins use the exact sums s[k], so only the scale terms see rounded x.
 *
 * THE ERROR BOUND
 *
 * Rounding moves each activation by at most half a step, |x[i] - d[b] q[i]|
 * <= d[b] / 2, so for any weight row w
 *
 *     |dot_q8 - dot|  <=  sum_b d[b]/2 * sum_{i in b} |w[i]|   (+ float rounding)
 *
 * tests/test_quant.c checks every kernel against this bound on random rows,
 * and the integer kernels against the scalar vec_dot_q8_ref() below to 1e-5
 * of sum |w*x| (they differ only in the order of float additions). On
 * normal data the error measures at most 2e-3 of sum |w*x| per row, which is
 * about what rounding the weights to Q8_0 costs.
 *
 * WHY IT IS NOT THE DEFAULT
 *
 * Through a whole model those errors add up like a second Q8_0 rounding. On
 * the tiny oracle model quantized to q8_0, --check-vectors moves from a
 * median row error of 4.1e-2 to 5.7e-2 and its 90th percentile from 6.0e-2
 * to 3.7e-1 (top-k choices flip), so the 8-bit path stays an explicit choice,
 * `--fast`, and float activations remain the default and the reference.
 *
 * The path is also chaotic in a way the float one is not: every product's
 * output is rounded to 8 bits again as the next one's input, so a last-bit
 * difference in a sum can move a value across a rounding boundary, and its
 * 8-bit copy then moves by a whole step d[b]. Kernels that add the same integer
 * sums in another float order therefore print different --check-vectors
 * figures: on the q8_0 tiny model, merely merging the AVX2 Q8_0 kernel's two
 * accumulators into one moves the median of len600_prefill600 from 5.88e-2
 * to 5.15e-2, and the AVX-512 kernels give 5.98e-2 (2026-12-02). Each
 * product is still within 1e-7 of sum |w*x| of the reference; the float path
 * prints the same figures with either kernel set.
 *
 * The inner integer sums cannot overflow: `pmaddubsw` saturates at 32767,
 * and the largest pair is 128 * 127 * 2 = 32512 (a Q8_0 weight of -128 made
 * positive), the rest far less (43 * 127 * 2 for IQ2_XXS); `vpdpbusd` adds
 * four products of at most 128 * 127 into 32 bits, without saturation. */

/* The activations are quantized once per product and then read by every
 * row, so anything that makes a row's work cheaper may be spent on them.
 * The IQ2_XXS kernels (below) want each block of 256 in other orders. The
 * AVX2 one pairs group g with group g + 4, so `q_pairs` holds a second copy:
 *
 *     q_pairs[256 i + 32 (2g + h) + l] = q[256 i + 32 g + 16 h + l]         l < 16
 *                                      = q[256 i + 32 (g + 4) + 16 h + l - 16]   l >= 16
 *
 * for g = 0..3, h = 0..1. The AVX-512 one reads piece t (8 values) of all
 * eight groups as one register, so `q_pieces` holds a third, the block seen
 * as an [8 groups][4 pieces][8] array and transposed to [4][8][8]:
 *
 *     q_pieces[256 i + 64 t + 8 g + j] = q[256 i + 32 g + 8 t + j]     t < 4, g < 8
 *
 * In both a tail shorter than 256 is copied as it is. */
struct act_q8 {
    int64_t n;          /* values; a multiple of 32 */
    int8_t *q;          /* [n] */
    int8_t *q_pairs;    /* [n] q reordered for the AVX2 IQ2_XXS kernel, as above */
    int8_t *q_pieces;   /* [n] q reordered for the AVX-512 IQ2_XXS kernel */
    float *d;           /* [n / 32] */
    float *sum16;       /* [n / 16] */
};

/* Bytes of storage for one quantized vector of n values (act_q8_view). */
static size_t act_q8_bytes(int64_t n) {
    return 3 * (size_t)n + (size_t)(n / 32) * sizeof(float) + (size_t)(n / 16) * sizeof(float);
}

/* Lay a quantized vector of n values over `mem` (act_q8_bytes(n) bytes, float
 * aligned: the floats come first). */
static struct act_q8 act_q8_view(void *mem, int64_t n) {
    float *f = mem;
    int8_t *q = (int8_t *)(f + n / 32 + n / 16);
    struct act_q8 a = { n, q, q + n, q + 2 * n, f, f + n / 32 };
    return a;
}

/* q_pairs from q, as defined above. */
static void act_q8_pair_groups(struct act_q8 *a) {
    int64_t i = 0;
    for (; i + 256 <= a->n; i += 256)
        for (int g = 0; g < 4; g++)
            for (int h = 0; h < 2; h++) {
                int8_t *dst = a->q_pairs + i + 32 * (2 * g + h);
                memcpy(dst, a->q + i + 32 * g + 16 * h, 16);
                memcpy(dst + 16, a->q + i + 32 * (g + 4) + 16 * h, 16);
            }
    memcpy(a->q_pairs + i, a->q + i, (size_t)(a->n - i));
}

/* q_pieces from q, as defined above. */
static void act_q8_transpose_pieces(struct act_q8 *a) {
    int64_t i = 0;
    for (; i + 256 <= a->n; i += 256)
        for (int t = 0; t < 4; t++)
            for (int g = 0; g < 8; g++)
                memcpy(a->q_pieces + i + 64 * t + 8 * g, a->q + i + 32 * g + 8 * t, 8);
    memcpy(a->q_pieces + i, a->q + i, (size_t)(a->n - i));
}

/* d[b], q[i] and s[k] as defined above. */
static void act_quantize_q8(const float *x, struct act_q8 *a) {
    for (int64_t b = 0; b < a->n / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f, lo = 0.0f, hi = 0.0f;
        for (int l = 0; l < 32; l++) amax = fmaxf(amax, fabsf(xb[l]));
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        a->d[b] = amax / 127.0f;
        for (int l = 0; l < 32; l++) a->q[32 * b + l] = (int8_t)lrintf(xb[l] * inv);
        for (int l = 0; l < 16; l++) lo += xb[l], hi += xb[16 + l];
        a->sum16[2 * b] = lo;
        a->sum16[2 * b + 1] = hi;
    }
    act_q8_pair_groups(a);
    act_q8_transpose_pieces(a);
}

/* The reference integer products, one term per sub-block, literally as in
 * the formulas above. The integer sums are exact, so the fast kernels may
 * only differ in how the float terms are added up. */
static float quant_q8_ref_q8_0(const struct block_q8_0 *w, const struct act_q8 *a) {
    float sum = 0.0f;
    for (int64_t b = 0; b < a->n / 32; b++, w++) {
        int isum = 0;
        for (int l = 0; l < 32; l++) isum += w->qs[l] * a->q[32 * b + l];
        sum += f16_to_f32(w->d) * a->d[b] * (float)isum;
    }
    return sum;
}

static float quant_q8_ref_q2_k(const struct block_q2_k *w, const struct act_q8 *a) {
    float sum = 0.0f;
    for (int64_t i = 0; i < a->n / 256; i++, w++) {
        float d = f16_to_f32(w->d), dmin = f16_to_f32(w->dmin);
        for (int k = 0; k < 16; k++) {
            int isum = 0;
            for (int e = 16 * k; e < 16 * k + 16; e++) {
                int h = e / 128, j = (e % 128) / 32, l = e % 32;
                isum += ((w->qs[32 * h + l] >> (2 * j)) & 3) * a->q[256 * i + e];
            }
            sum += d * (float)(w->scales[k] & 15) * a->d[8 * i + k / 2] * (float)isum;
            sum -= dmin * (float)(w->scales[k] >> 4) * a->sum16[16 * i + k];
        }
    }
    return sum;
}

static float quant_q8_ref_q4_k(const struct block_q4_k *w, const struct act_q8 *a) {
    float sum = 0.0f;
    for (int64_t i = 0; i < a->n / 256; i++, w++) {
        float d = f16_to_f32(w->d), dmin = f16_to_f32(w->dmin);
        for (int k = 0; k < 8; k++) {
            int sc, m, isum = 0;
            quant_q4_k_scale_min(w->scales, k, &sc, &m);
            for (int l = 0; l < 32; l++) {
                int byte = w->qs[32 * (k / 2) + l];
                isum += (k % 2 == 0 ? byte & 15 : byte >> 4) * a->q[256 * i + 32 * k + l];
            }
            sum += d * (float)sc * a->d[8 * i + k] * (float)isum;
            sum -= dmin * (float)m * (a->sum16[16 * i + 2 * k] + a->sum16[16 * i + 2 * k + 1]);
        }
    }
    return sum;
}

static float quant_q8_ref_iq2_xxs(const struct block_iq2_xxs *w, const struct act_q8 *a) {
    float sum = 0.0f;
    for (int64_t i = 0; i < a->n / 256; i++, w++) {
        for (int group = 0; group < 8; group++) {
            uint32_t a0, a1;
            int isum = 0;
            quant_iq2_group_words(w, group, &a0, &a1);
            for (int t = 0; t < 4; t++) {
                int g = (a0 >> (8 * t)) & 255, signs = quant_iq2_signs((a1 >> (7 * t)) & 127);
                for (int j = 0; j < 8; j++) {
                    int v = quant_iq2_grid_byte(g, j) * a->q[256 * i + 32 * group + 8 * t + j];
                    isum += (signs >> j) & 1 ? -v : v;
                }
            }
            float scale = f16_to_f32(w->d) * (float)(2 * (a1 >> 28) + 1) * 0.125f;
            sum += scale * a->d[8 * i + group] * (float)isum;
        }
    }
    return sum;
}

/* The types with an integer kernel; the others (F32, F16, BF16) keep float
 * activations, since their weights need no decoding anyway. */
static bool quant_has_q8_dot(uint32_t type) {
    return type == TYPE_Q8_0 || type == TYPE_Q2_K || type == TYPE_Q4_K || type == TYPE_IQ2_XXS;
}

/* READING AHEAD IN THE ROW
 *
 * A one-token product reads each weight byte once, straight from DRAM, so
 * on one core its speed is how many misses are in flight at a time. The
 * hardware prefetcher follows a stream only inside a 4 KiB page and starts
 * each page with misses of its own, and the integer kernels below compute
 * enough per line that the out-of-order window holds few loads ahead. So
 * each step of the x86 kernels (these integer ones and the float ones of
 * 15.1) asks for the lines a fixed distance ahead of
 * the bytes it is reading (`prefetcht0`, every line of those bytes once):
 *
 *   step reads  w[p, p + n)        asks for  w[p + D, p + D + n)   D = 4 KiB
 *
 * The distance runs past the end of a row into the next one, which for a
 * matrix is the next row in memory, and past the last row into whatever
 * follows: a prefetch never faults and never changes a result. Measured on
 * one core with the roofline's 256 MiB pass (Xeon with AVX-512, 2026-12-02,
 * best of five, two runs), in GB/s of Q8_0 weights: no prefetch 8.15 and
 * 8.21 GB/s; the whole next row asked for in one burst before each row,
 * 7.38 GB/s and 7.52 GB/s (the burst takes the line buffers that the row
 * being read needs); 2 KiB ahead in each step 9.39 and 10.18 GB/s; 4 KiB
 * ahead 9.88 and 10.49 GB/s, against a plain read at 9.4-10.5 GB/s. From
 * cache the prefetches cost at most a few per cent. */
enum { QUANT_READ_AHEAD = 4096 };

static inline void quant_read_ahead(const void *p, size_t n) {
    const char *ahead = (const char *)p + QUANT_READ_AHEAD;
    for (size_t at = 0; at < n; at += 64) __builtin_prefetch(ahead + at, 0, 3);
    __builtin_prefetch(ahead + n - 1, 0, 3);
}

static float vec_dot_q8_ref(uint32_t type, const void *w, const struct act_q8 *a) {
    switch (type) {
    case TYPE_Q8_0: return quant_q8_ref_q8_0(w, a);
    case TYPE_Q2_K: return quant_q8_ref_q2_k(w, a);
    case TYPE_Q4_K: return quant_q8_ref_q4_k(w, a);
    case TYPE_IQ2_XXS: return quant_q8_ref_iq2_xxs(w, a);
    default: quant_die_unsupported("vec_dot_q8_ref", type);
    }
    return 0.0f;
}

/* One row of integer kernels: an instruction set's four products with
 * 8-bit activations. Each SIMD block below lists its rows best first and
 * points quant_q8_active at the one in use; quant_fast_vec_dot_q8(), after
 * the blocks, calls through it. */
struct quant_q8_kernels {
    const char *name;
    float (*q8_0)(const struct block_q8_0 *w, const struct act_q8 *a);
    float (*q2_k)(const struct block_q2_k *w, const struct act_q8 *a);
    float (*q4_k)(const struct block_q4_k *w, const struct act_q8 *a);
    float (*iq2_xxs)(const struct block_iq2_xxs *w, const struct act_q8 *a);
    bool needs_sdot;    /* arm64: uses the dot-product extension */
    bool avx2_tiles;    /* x86: 3.10's AVX2 tiles return this row's floats (else its own twins) */
};

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

/* x86-64 AVX2. Every kernel ends a 32-value block the same way: eight int32
 * partial sums, converted to float and added with their block's scale,
 * alternating between two accumulators. */
static __m256i quant_avx2_load_i8(const void *p) {
    return _mm256_loadu_si256((const __m256i *)p);
}

/* Eight int32 sums of unsigned u[i] * signed s[i], times a 16-bit factor. */
static __m256i quant_avx2_madd_u8s8(__m256i u, __m256i s, __m256i factor16) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), factor16);
}

static __m256 quant_avx2_scaled(__m256 acc, float scale, __m256i isum) {
    return _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(isum), acc);
}

/* Four vectors of eight int32 partial sums, s0..s3, folded into one whose
 * 128-bit lanes both read (s0, s1, s2, s3): the low lane sums lanes 0-3 of
 * each, the high lane lanes 4-7; adding the two lanes finishes the sums.
 * Unpacks and adds rather than phaddd, which costs three uops on x86. */
static __m256i quant_avx2_fold4(__m256i s0, __m256i s1, __m256i s2, __m256i s3) {
    __m256i t01 = _mm256_add_epi32(_mm256_unpacklo_epi32(s0, s1), _mm256_unpackhi_epi32(s0, s1));
    __m256i t23 = _mm256_add_epi32(_mm256_unpacklo_epi32(s2, s3), _mm256_unpackhi_epi32(s2, s3));
    return _mm256_add_epi32(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23));
}

/* The eight sums of two folds f0 (sums 0-3) and f1 (sums 4-7), in order. */
static __m256i quant_avx2_fold8(__m256i f0, __m256i f1) {
    return _mm256_add_epi32(_mm256_permute2x128_si256(f0, f1, 0x20),
                            _mm256_permute2x128_si256(f0, f1, 0x31));
}

/* Q8_0: both sides signed. |w| is unsigned, and w's sign moves onto q. */
static __m256 quant_avx2_q8_block_q8_0(const struct block_q8_0 *w, const struct act_q8 *a,
                                        int64_t b, __m256 acc) {
    __m256i wq = quant_avx2_load_i8(w->qs), xq = quant_avx2_load_i8(a->q + 32 * b);
    __m256i isum = quant_avx2_madd_u8s8(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq),
                                        _mm256_set1_epi16(1));
    return quant_avx2_scaled(acc, quant_avx2_half(w->d) * a->d[b], isum);
}

/* Two accumulators in two named variables (an indexed pair would live in
 * memory and chain every step through a store and a load). */
static float quant_avx2_q8_dot_q8_0(const struct block_q8_0 *w, const struct act_q8 *a) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t nb = a->n / 32, b = 0;
    for (; b + 2 <= nb; b += 2) {
        quant_read_ahead(w + b, 2 * sizeof *w);
        acc0 = quant_avx2_q8_block_q8_0(w + b, a, b, acc0);
        acc1 = quant_avx2_q8_block_q8_0(w + b + 1, a, b + 1, acc1);
    }
    if (b < nb) acc0 = quant_avx2_q8_block_q8_0(w + b, a, b, acc0);
    return quant_avx2_hsum(_mm256_add_ps(acc0, acc1));
}

/* Q2_K: shift j of the 32 bytes of half h is one activation block, whose low
 * 16 lanes are sub-block 8h+2j and high 16 lanes sub-block 8h+2j+1; a
 * factor register with each sub-block's scale in its half applies both. */

/* dmin * sum_k m[k] s[k] of one Q2_K block, 16 mins at a time. */
static __m256 quant_avx2_q2_k_mins(const struct block_q2_k *w, const float *s16, __m256 acc) {
    __m128i m = _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128((const __m128i *)w->scales), 4),
                              _mm_set1_epi8(15));
    __m256 m_lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m));
    __m256 m_hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(m, 8)));
    __m256 ms = _mm256_fmadd_ps(m_lo, _mm256_loadu_ps(s16),
                                _mm256_mul_ps(m_hi, _mm256_loadu_ps(s16 + 8)));
    return _mm256_fmadd_ps(_mm256_set1_ps(quant_avx2_half(w->dmin)), ms, acc);
}

/* Eight int32 partial sums of activation block 4h + j: the 2-bit values at
 * shift 2j of the 32 bytes `bits`, times x, times the sub-block scales. The
 * scale bytes of the block sit in both 128-bit lanes of `sc`; one in-lane
 * byte shuffle puts sc[k] (k = 8h + 2j) in the low lane's 16-bit factors and
 * sc[k + 1] in the high lane's, with zero high bytes. */
static inline __m256i quant_avx2_q2_k_part(__m256i bits, int j, __m256i sc, int k,
                                           const int8_t *x8) {
    char lo = (char)k, hi = (char)(k + 1), z = (char)0x80;
    __m256i pick = _mm256_setr_epi8(lo, z, lo, z, lo, z, lo, z, lo, z, lo, z, lo, z, lo, z,
                                    hi, z, hi, z, hi, z, hi, z, hi, z, hi, z, hi, z, hi, z);
    __m256i q = _mm256_and_si256(_mm256_srli_epi16(bits, 2 * j), _mm256_set1_epi8(3));
    return quant_avx2_madd_u8s8(q, quant_avx2_load_i8(x8), _mm256_shuffle_epi8(sc, pick));
}

/* Half h (128 values, four activation blocks) of a Q2_K block, folded as in
 * IQ2_XXS: lanes (j0, j1, j2, j3 | j0, j1, j2, j3) of partial sums. */
static inline __m256i quant_avx2_q2_k_half(const struct block_q2_k *w, int h, __m256i sc,
                                           const int8_t *xq) {
    __m256i bits = quant_avx2_load_i8(w->qs + 32 * h);
    const int8_t *x = xq + 128 * h;
    return quant_avx2_fold4(quant_avx2_q2_k_part(bits, 0, sc, 8 * h, x),
                            quant_avx2_q2_k_part(bits, 1, sc, 8 * h + 2, x + 32),
                            quant_avx2_q2_k_part(bits, 2, sc, 8 * h + 4, x + 64),
                            quant_avx2_q2_k_part(bits, 3, sc, 8 * h + 6, x + 96));
}

/* Per block: the eight activation blocks' integer sums in one vector,
 * converted once, times d dx[b]; the mins as before. */
static float quant_avx2_q8_dot_q2_k(const struct block_q2_k *w, const struct act_q8 *a) {
    __m256 acc = _mm256_setzero_ps(), mins = _mm256_setzero_ps();
    for (int64_t i = 0; i < a->n / 256; i++, w++) {
        const int8_t *xq = a->q + 256 * i;
        quant_read_ahead(w, sizeof *w);
        mins = quant_avx2_q2_k_mins(w, a->sum16 + 16 * i, mins);
        __m256i sc = _mm256_and_si256(
            _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)w->scales)),
            _mm256_set1_epi8(15));
        __m256i sums = quant_avx2_fold8(quant_avx2_q2_k_half(w, 0, sc, xq),
                                        quant_avx2_q2_k_half(w, 1, sc, xq));
        __m256 dx = _mm256_mul_ps(_mm256_loadu_ps(a->d + 8 * i),
                                  _mm256_set1_ps(quant_avx2_half(w->d)));
        acc = _mm256_fmadd_ps(dx, _mm256_cvtepi32_ps(sums), acc);
    }
    return quant_avx2_hsum(acc) - quant_avx2_hsum(mins);
}

/* Q4_K: the low nibbles of chunk c are sub-block 2c, the high ones 2c+1,
 * each one whole activation block. */
static float quant_avx2_q8_dot_q4_k(const struct block_q4_k *w, const struct act_q8 *a) {
    __m256 acc[2] = { _mm256_setzero_ps(), _mm256_setzero_ps() };
    __m256i low4 = _mm256_set1_epi8(15);
    float mins = 0.0f;
    for (int64_t i = 0; i < a->n / 256; i++, w++) {
        const int8_t *xq = a->q + 256 * i;
        const float *dx = a->d + 8 * i, *s16 = a->sum16 + 16 * i;
        quant_read_ahead(w, sizeof *w);
        float d = quant_avx2_half(w->d), dmin = quant_avx2_half(w->dmin);
        int sc[8], m[8];
        for (int k = 0; k < 8; k++) {
            quant_q4_k_scale_min(w->scales, k, &sc[k], &m[k]);
            mins += dmin * (float)m[k] * (s16[2 * k] + s16[2 * k + 1]);
        }
        for (int c = 0; c < 4; c++) {
            __m256i bytes = quant_avx2_load_i8(w->qs + 32 * c);
            __m256i lo = _mm256_and_si256(bytes, low4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
            __m256i s_lo = quant_avx2_madd_u8s8(lo, quant_avx2_load_i8(xq + 64 * c),
                                                _mm256_set1_epi16((short)sc[2 * c]));
            __m256i s_hi = quant_avx2_madd_u8s8(hi, quant_avx2_load_i8(xq + 64 * c + 32),
                                                _mm256_set1_epi16((short)sc[2 * c + 1]));
            acc[0] = quant_avx2_scaled(acc[0], d * dx[2 * c], s_lo);
            acc[1] = quant_avx2_scaled(acc[1], d * dx[2 * c + 1], s_hi);
        }
    }
    return quant_avx2_hsum(_mm256_add_ps(acc[0], acc[1])) - mins;
}

/* IQ2_XXS: the eight groups of a block are done together, so that the work
 * which is not a product happens once per block and in vector registers:
 *
 *   A[g]     = sign word a1 of group g                           [8] uint32
 *   S[g][t]  = ((A[g] >> 7t) & 127) | parity << 7                [8][4] bytes
 *   sc[g]    = d/8 (2 (A[g] >> 28) + 1) dx[g]                     [8] float
 *
 * The sign bytes (3.4) come from shifts, ands and one 16-entry parity
 * lookup by pshufb, no table load per piece; the scales are one float
 * vector. S keeps groups 0-3 in its low 128 bits and 4-7 in its high ones,
 * and an in-lane byte shuffle reaches only its own half. So each 32-byte
 * register holds half h (16 values) of group g in its low lane and half h of
 * group g + 4 in its high lane, g = 0..3: the activations come in that
 * order already (q_pairs, above), the grid entries are loaded into it, and
 * one shuffle of S spreads the sign bytes of both. Per register that is
 * four 8-byte grid loads, the shuffle, a compare that turns the signs into
 * byte masks (-1 where negative), and one multiply-add:
 *
 *   p[g][h] = sum_{pairs} grid[i] ((x[i] ^ neg[i]) - neg[i])      [16] int16
 *
 * The two halves of a pair of groups are added as 16-bit sums (each term is
 * at most 2 * 43 * 127, two of them stay below 32767), widened once, and
 * the four pairs folded (quant_avx2_fold4) straight into the order
 * (g0, g1, g2, g3 | g4, g5, g6, g7) of sc: no lane crossing is left.
 *
 * WHERE THE TIME GOES. About 11 vector instructions per 32 values and 40
 * per block remain; the pairing made the kernel some 10 % faster than
 * folding each group's sums (from cache, 2.95 GB/s against 2.62 on 2026-12-02,
 * Zen 3). Tried and no faster there: a hardware gather of the four grid
 * entries, broadcasts and blends instead of movq/movhps and an insert,
 * phaddd for the fold, per-group float scaling by a lane permute, the next
 * block's sign bytes computed one block ahead (-4 %), a negated copy of x
 * chosen by the masks with vpblendvb instead of the xor and subtract (-7 %),
 * and grid entries pre-placed in 16- and 32-byte tables and or-ed instead
 * of merged by shuffles (-6 %). */
static __m256i quant_avx2_iq2_sign_words(const struct block_iq2_xxs *w) {
    __m256 lo = _mm256_castsi256_ps(quant_avx2_load_i8(&w->qs[0]));
    __m256 hi = _mm256_castsi256_ps(quant_avx2_load_i8(&w->qs[16]));
    /* the odd dwords, in the order g = 0, 1, 4, 5 | 2, 3, 6, 7, then sorted */
    __m256i odd = _mm256_castps_si256(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm256_permute4x64_epi64(odd, _MM_SHUFFLE(3, 1, 2, 0));
}

/* S[g][t] as byte t of dword g. */
static __m256i quant_avx2_iq2_sign_bytes(__m256i A) {
    /* byte t wants A << t (its 7 bits then sit at 8t..8t+6): bytes 2 and 3
     * take A << 2, then bytes 1 and 3 one shift more; the eighth bits go */
    __m256i hi2 = _mm256_set1_epi32((int)0xffff0000u), odd1 = _mm256_set1_epi32((int)0xff00ff00u);
    __m256i u = _mm256_blendv_epi8(A, _mm256_slli_epi32(A, 2), hi2);
    __m256i s = _mm256_and_si256(_mm256_blendv_epi8(u, _mm256_slli_epi32(u, 1), odd1),
                                 _mm256_set1_epi8(0x7f));
    /* a byte's parity is its two nibbles' xor's parity: parity(n) << 7 for
     * n = 0..15, looked up once */
    const __m256i odd = _mm256_setr_epi8(
        0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0,
        0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0);
    __m256i nibbles = _mm256_and_si256(_mm256_xor_si256(s, _mm256_srli_epi16(s, 4)),
                                       _mm256_set1_epi8(15));
    return _mm256_or_si256(s, _mm256_shuffle_epi8(odd, nibbles));
}

/* -1 in lane l of register (g, h) where its value is negative: lanes 0-7
 * are piece 2h of group g, 8-15 piece 2h + 1, and the high lane the same
 * pieces of group g + 4, whose sign bytes sit at the same offsets of S's
 * high lane. */
static inline __m256i quant_avx2_iq2_neg_mask(__m256i S, int g, int h) {
    char b = (char)(4 * g + 2 * h), c = (char)(4 * g + 2 * h + 1);
    __m256i spread = _mm256_setr_epi8(b, b, b, b, b, b, b, b, c, c, c, c, c, c, c, c,
                                      b, b, b, b, b, b, b, b, c, c, c, c, c, c, c, c);
    __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    __m256i bytes = _mm256_shuffle_epi8(S, spread);
    return _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
}

/* Two 8-byte loads into one register (movq, then movhps: a load and a
 * merge, no shuffle). */
static inline __m128i quant_avx2_two_u64(const uint64_t *lo, const uint64_t *hi) {
    __m128 v = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)lo));
    return _mm_castps_si128(_mm_loadh_pi(v, (const __m64 *)hi));
}

/* The sixteen int16 sums of register (g, h): grid magnitudes times signed x. */
static inline __m256i quant_avx2_iq2_half(const struct block_iq2_xxs *w, int g, int h,
                                          const int8_t *xp, __m256i S) {
    const uint8_t *lo = (const uint8_t *)&w->qs[4 * g] + 2 * h;
    const uint8_t *hi = (const uint8_t *)&w->qs[4 * (g + 4)] + 2 * h;
    const uint64_t *grid = quant_iq2_xxs_grid;
    __m256i mag = _mm256_setr_m128i(quant_avx2_two_u64(&grid[lo[0]], &grid[lo[1]]),
                                    quant_avx2_two_u64(&grid[hi[0]], &grid[hi[1]]));
    __m256i neg = quant_avx2_iq2_neg_mask(S, g, h);
    __m256i x8 = _mm256_sub_epi8(_mm256_xor_si256(quant_avx2_load_i8(xp + 32 * (2 * g + h)), neg),
                                 neg);
    return _mm256_maddubs_epi16(mag, x8);
}

/* Eight int32 sums: lanes 0-3 group g, lanes 4-7 group g + 4. */
static inline __m256i quant_avx2_iq2_pair(const struct block_iq2_xxs *w, int g, const int8_t *xp,
                                          __m256i S) {
    __m256i p = _mm256_add_epi16(quant_avx2_iq2_half(w, g, 0, xp, S),
                                 quant_avx2_iq2_half(w, g, 1, xp, S));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* sc[g] for the eight groups of block w. */
static inline __m256 quant_avx2_iq2_scales(const struct block_iq2_xxs *w, __m256i A,
                                           const float *dx) {
    /* 2 ls + 1 = (A >> 27) | 1: the sign bit below ls is overwritten */
    __m256i ls2 = _mm256_or_si256(_mm256_srli_epi32(A, 27), _mm256_set1_epi32(1));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(ls2), _mm256_loadu_ps(dx)),
                         _mm256_set1_ps(quant_avx2_half(w->d) * 0.125f));
}

/* Per block: the eight group sums, converted once and multiplied by sc. */
static float quant_avx2_q8_dot_iq2_xxs(const struct block_iq2_xxs *w, const struct act_q8 *a) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < a->n / 256; i++, w++) {
        const int8_t *xp = a->q_pairs + 256 * i;
        quant_read_ahead(w, sizeof *w);
        __m256i A = quant_avx2_iq2_sign_words(w);
        __m256i S = quant_avx2_iq2_sign_bytes(A);
        __m256 sc = quant_avx2_iq2_scales(w, A, a->d + 8 * i);
        __m256i sums = quant_avx2_fold4(quant_avx2_iq2_pair(w, 0, xp, S),
                                        quant_avx2_iq2_pair(w, 1, xp, S),
                                        quant_avx2_iq2_pair(w, 2, xp, S),
                                        quant_avx2_iq2_pair(w, 3, xp, S));
        acc = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(sums), acc);
    }
    return quant_avx2_hsum(acc);
}

/* ---- AVX-512: the same integer products, 64 values per register ---------- */

/* WHY AVX-512 HELPS IQ2_XXS MOST
 *
 * Zen 4 and the Intel server cores since Ice Lake add, beside the wider
 * registers, four things the 2-bit formats were waiting for:
 *
 *   - `vpdpbusd` (VNNI) multiplies 64 unsigned bytes by 64 signed ones and
 *     adds each four products into an int32 lane, in one instruction where
 *     AVX2 needs `pmaddubsw`, `pmaddwd` and an add.
 *   - Mask registers: a 64-bit k register holds one bit per byte lane, and
 *     most instructions take one. IQ2_XXS stores a sign bit per value, so
 *     the 64 signs of a register's 64 values are exactly one mask, and
 *     `_mm512_mask_sub_epi8(x, neg, 0, x)` negates the activations under it
 *     in one instruction. `vpshufbitqmb` (BITALG) builds that mask directly:
 *     it gathers 8 chosen bits of each 64-bit lane of a register into the 8
 *     mask bits of that lane, so the stored sign fields are read where they
 *     lie, no byte masks are built.
 *   - Byte permutes across the whole register (VBMI): `vpermi2b` looks 64
 *     bytes up in a 128-byte table held in two registers, and
 *     `vpmultishiftqb` cuts 8 arbitrary 8-bit fields out of each 64-bit
 *     lane. The IQ2_XXS codebook, written as 2-bit level codes (3.4), is
 *     512 bytes: eight registers. The 64 grid lookups of two blocks become
 *     four byte permutes and two blends, with no load per piece.
 *   - GF(2) affine byte transforms (GFNI): `vgf2p8affineqb` makes each
 *     output bit the xor of any chosen bits of the same input byte. That is
 *     a 2-bit code's level (8, 25, 43) in one instruction, and a piece's
 *     eighth sign bit, the parity of the other seven, in another.
 *
 * So the IQ2_XXS kernel here does no scalar work per block but the load of
 * its scale: one load of the 64 code bytes, then the lookups, the signs and
 * the products in registers. The other three types gain less: their AVX2
 * kernels were not held back by decoding, and here they save the `pmaddwd`
 * of each product and read 64 values per instruction.
 *
 * These functions are compiled for AVX-512 by a target attribute, whatever
 * the -march of the rest, and run only where quant_q8_choose_variant()
 * (below) found the features at start-up; the AVX2 kernels stay the
 * fallback on other CPUs. */
#define QUANT_AVX512 __attribute__((target( \
    "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx512bitalg,gfni")))

QUANT_AVX512 static inline __m512i quant_avx512_load(const void *p) {
    return _mm512_loadu_si512(p);
}

/* The 32 bytes at p in both halves of a register. */
QUANT_AVX512 static inline __m512i quant_avx512_both_halves(const void *p) {
    return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
}

/* x negated in the lanes whose bit in `neg` is set. */
QUANT_AVX512 static inline __m512i quant_avx512_negate(__m512i x, __mmask64 neg) {
    return _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
}

/* Four registers of sixteen int32 partial sums, s0..s3, folded so that
 * int32 lane 4L + m is the sum of 128-bit lane L of s_m (the AVX2 fold4,
 * in each of the four lanes). */
QUANT_AVX512 static inline __m512i quant_avx512_fold4(__m512i s0, __m512i s1, __m512i s2,
                                                      __m512i s3) {
    __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(s0, s1), _mm512_unpackhi_epi32(s0, s1));
    __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(s2, s3), _mm512_unpackhi_epi32(s2, s3));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
}

/* Q8_0, two blocks per register: |w| against x carrying w's signs, which
 * `vpmovb2m` takes straight into a mask; one scale per 256-bit half. Four
 * blocks per step, so that their four half scales are converted by one
 * `vcvtph2ps` and multiplied with dx by one multiply:
 *
 *   sc[l]   = d[b + l] dx[b + l]                                    [4] float
 *   acc[l] += sc[l / 8] sum_{4 lanes} |w| (sign(w) x),  blocks b, b+1    [16]
 *   acc'[l] += the same for blocks b + 2, b + 3
 *
 * (Two blocks per step, their scales converted one at a time, ran at 34.9
 * GB/s from cache against 40.8 for this, and AVX2's 33.4; Zen 4.) */
QUANT_AVX512 static inline __m512i quant_avx512_q8_0_pair_sums(const struct block_q8_0 *w,
                                                               const int8_t *x) {
    __m512i wq = _mm512_inserti64x4(_mm512_castsi256_si512(quant_avx2_load_i8(w[0].qs)),
                                    quant_avx2_load_i8(w[1].qs), 1);
    __m512i xs = quant_avx512_negate(quant_avx512_load(x), _mm512_movepi8_mask(wq));
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(wq), xs);
}

QUANT_AVX512 static inline __m128 quant_avx512_q8_0_scales4(const struct block_q8_0 *w,
                                                            const float *dx) {
    __m128i d = _mm_setr_epi16((short)w[0].d, (short)w[1].d, (short)w[2].d, (short)w[3].d,
                               0, 0, 0, 0);
    return _mm_mul_ps(_mm_cvtph_ps(d), _mm_loadu_ps(dx));
}

QUANT_AVX512 static float quant_avx512_q8_dot_q8_0(const struct block_q8_0 *w,
                                                   const struct act_q8 *a) {
    const __m512i first = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i second = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t nb = a->n / 32, b = 0;
    for (; b + 4 <= nb; b += 4) {
        quant_read_ahead(w + b, 4 * sizeof *w);
        __m512 sc = _mm512_castps128_ps512(quant_avx512_q8_0_scales4(w + b, a->d + b));
        __m512i s01 = quant_avx512_q8_0_pair_sums(w + b, a->q + 32 * b);
        __m512i s23 = quant_avx512_q8_0_pair_sums(w + b + 2, a->q + 32 * b + 64);
        acc0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(first, sc), _mm512_cvtepi32_ps(s01), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(second, sc), _mm512_cvtepi32_ps(s23), acc1);
    }
    __m256 tail = _mm256_setzero_ps();
    for (; b < nb; b++) tail = quant_avx2_q8_block_q8_0(w + b, a, b, tail);
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + quant_avx2_hsum(tail);
}

/* Q2_K, 64 values per register. Register m holds the 2-bit values at shifts
 * j = 2(m%2) and j + 1 of half m/2's 32 bytes (3.3), which are activations
 * 64m .. 64m + 63 in order, so x is one plain load; each 128-bit lane L is
 * sub-block k = 4m + L. The values are not shifted down: an and with
 * 3 << 2j leaves 4^j q, at most 192, still an unsigned byte, and the power
 * of 4 comes off with the float scale, exactly. The sums are taken without
 * the scales (`vpdpbusd`) and folded so that int32 lane 4L + m is sub-block
 * 4m + L:
 *
 *   S[4L + m] = sum_{i in sub-block 4m + L} 4^j(L, m) q2[i] x[i]        [16] int32
 *   acc[p]   += d sc[k(p)] 4^-j(p) dx[k(p) / 2] S[p]     k(4L + m) = 4m + L  [16] float
 *   mins[k]  += dmin m[k] s[k]                                         [16] float
 *
 * with j(L, m) = 2(m%2) + L/2. */
QUANT_AVX512 static inline __m512i quant_avx512_q2_k_part(const struct block_q2_k *w, int m,
                                                          const int8_t *x) {
    int j = 2 * (m % 2);
    __m512i keep = _mm512_mask_blend_epi8(0xffffffff00000000ull,
                                          _mm512_set1_epi8((char)(3 << (2 * j))),
                                          _mm512_set1_epi8((char)(3 << (2 * j + 2))));
    __m512i q = _mm512_and_si512(quant_avx512_both_halves(w->qs + 32 * (m / 2)), keep);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, quant_avx512_load(x + 64 * m));
}

/* The 16 scale bytes widened once: sc[k] = low nibbles, moved into S's
 * order by a dword permute, m[k] = high nibbles in natural order; d and
 * dmin converted together. Shifting each value down (`vpsrlvw`) instead of
 * the float 4^-j cost 10 % (12.3 GB/s from cache against 13.5, Zen 4). */
QUANT_AVX512 static float quant_avx512_q8_dot_q2_k(const struct block_q2_k *w,
                                                   const struct act_q8 *a) {
    const __m512i in_s_order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13,
                                                 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i dx_of = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 1, 3, 5, 7, 1, 3, 5, 7);
    const __m512 unshift = _mm512_setr_ps(1, 1.f / 16, 1, 1.f / 16, 1, 1.f / 16, 1, 1.f / 16,
                                          1.f / 4, 1.f / 64, 1.f / 4, 1.f / 64,
                                          1.f / 4, 1.f / 64, 1.f / 4, 1.f / 64);     /* 4^-j(p) */
    __m512 acc = _mm512_setzero_ps(), mins = _mm512_setzero_ps();
    for (int64_t i = 0; i < a->n / 256; i++, w++) {
        const int8_t *x = a->q + 256 * i;
        quant_read_ahead(w, sizeof *w);
        __m512i S = quant_avx512_fold4(quant_avx512_q2_k_part(w, 0, x),
                                       quant_avx512_q2_k_part(w, 1, x),
                                       quant_avx512_q2_k_part(w, 2, x),
                                       quant_avx512_q2_k_part(w, 3, x));
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)w->scales));
        __m512i sc = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
        __m512 sc_f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_permutexvar_epi32(in_s_order, sc)),
                                    unshift);
        __m512 m_f = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
        __m128 d_dmin = _mm_cvtph_ps(_mm_setr_epi16((short)w->d, (short)w->dmin, 0, 0, 0, 0, 0, 0));
        __m512 dx = _mm512_castps256_ps512(_mm256_loadu_ps(a->d + 8 * i));
        __m512 dxs = _mm512_permutexvar_ps(dx_of, dx);
        __m512 scale = _mm512_mul_ps(_mm512_mul_ps(sc_f, dxs), _mm512_broadcastss_ps(d_dmin));
        acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(S), acc);
        __m512 dmin = _mm512_permutexvar_ps(_mm512_set1_epi32(1), _mm512_castps128_ps512(d_dmin));
        mins = _mm512_fmadd_ps(_mm512_mul_ps(m_f, _mm512_loadu_ps(a->sum16 + 16 * i)), dmin, mins);
    }
    return _mm512_reduce_add_ps(acc) - _mm512_reduce_add_ps(mins);
}

/* Q4_K, 64 values per register: chunk c's 32 bytes in both halves, the low
 * half's low nibbles (sub-block 2c) and the high half's high nibbles
 * (sub-block 2c + 1) are activations 64c .. 64c + 63 in order. The high
 * nibbles are kept in place (16 q, an unsigned byte) and the 16 comes off
 * with the float scale, as in Q2_K. Folded, the sums of the two halves of
 * the four chunks land in the order (k0, k2, k4, k6 | k1, k3, k5, k7), and
 * one permute sorts them:
 *
 *   S[k]   = sum_{i in sub-block k} 16^(k%2) q4[i] x[i]                 [8] int32
 *   acc[k] += d sc[k] 16^-(k%2) dx[k] S[k]                             [8] float
 *   mins[2k + h] += dmin m[k] s[2k + h]                                [16] float */
QUANT_AVX512 static inline __m512i quant_avx512_q4_k_chunk(const struct block_q4_k *w, int c,
                                                           const int8_t *x) {
    __m512i keep = _mm512_mask_blend_epi8(0xffffffff00000000ull, _mm512_set1_epi8(0x0f),
                                          _mm512_set1_epi8((char)0xf0));
    __m512i q = _mm512_and_si512(quant_avx512_both_halves(w->qs + 32 * c), keep);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, quant_avx512_load(x + 64 * c));
}

/* The eight 6-bit scales (low 64 bits) and mins (high 64 bits) as bytes,
 * unpacked four at a time from the three 32-bit words u of the packing in
 * 3.3: bytes 0-3 keep their low 6 bits, bytes 4-7 take the low (scales) or
 * high (mins) nibble of u[2] and the top two bits of u[0] or u[1]. */
QUANT_AVX512 static inline __m128i quant_avx512_q4_k_scale_bytes(const uint8_t *scales) {
    uint32_t u[3];
    memcpy(u, scales, 12);
    uint32_t sc_hi = (u[2] & 0x0f0f0f0f) | ((u[0] >> 2) & 0x30303030);
    uint32_t m_hi = ((u[2] >> 4) & 0x0f0f0f0f) | ((u[1] >> 2) & 0x30303030);
    return _mm_setr_epi32((int)(u[0] & 0x3f3f3f3f), (int)sc_hi, (int)(u[1] & 0x3f3f3f3f),
                          (int)m_hi);
}

QUANT_AVX512 static float quant_avx512_q8_dot_q4_k(const struct block_q4_k *w,
                                                   const struct act_q8 *a) {
    const __m256i sorted = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256 unshift = _mm256_setr_ps(1, 1.f / 16, 1, 1.f / 16, 1, 1.f / 16, 1, 1.f / 16);
    __m256 acc = _mm256_setzero_ps();
    __m512 mins = _mm512_setzero_ps();
    for (int64_t i = 0; i < a->n / 256; i++, w++) {
        const int8_t *x = a->q + 256 * i;
        quant_read_ahead(w, sizeof *w);
        __m512i F = quant_avx512_fold4(quant_avx512_q4_k_chunk(w, 0, x),
                                       quant_avx512_q4_k_chunk(w, 1, x),
                                       quant_avx512_q4_k_chunk(w, 2, x),
                                       quant_avx512_q4_k_chunk(w, 3, x));
        __m512i lanes = _mm512_shuffle_i64x2(F, F, _MM_SHUFFLE(3, 1, 2, 0));
        __m256i S = _mm256_add_epi32(_mm512_castsi512_si256(lanes),
                                     _mm512_extracti64x4_epi64(lanes, 1));
        __m128i scm = quant_avx512_q4_k_scale_bytes(w->scales);
        __m256 sc = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(scm)), unshift);
        __m256 scale = _mm256_mul_ps(_mm256_mul_ps(sc, _mm256_loadu_ps(a->d + 8 * i)),
                                     _mm256_set1_ps(quant_avx2_half(w->d)));
        acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(S, sorted)),
                              acc);
        __m128i m2 = _mm_unpackhi_epi8(scm, scm);
        __m512 ms = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m2)),
                                  _mm512_loadu_ps(a->sum16 + 16 * i));
        mins = _mm512_fmadd_ps(_mm512_set1_ps(quant_avx2_half(w->dmin)), ms, mins);
    }
    return quant_avx2_hsum(acc) - _mm512_reduce_add_ps(mins);
}

/* IQ2_XXS, the block of 256 as four registers of 64 values: register t
 * holds piece t (8 values) of each of the eight groups, 64-bit lane g for
 * group g, so that every 64-bit lane of every register belongs to one group
 * and group g's 8 code bytes Q (3.3: a0 in the low half of lane g, a1 in the
 * high half) already lie in the lane they serve. The activations come in
 * that order (q_pieces, above). Two blocks A, B are done per step, which
 * lets their 64 grid indices share the lookups and their 16 group sums one
 * conversion:
 *
 *   Q[g]      = a1[g] << 32 | a0[g]                   [8] u64, one load per block
 *   C[g]      = code(grid index t of a0[g]), t = 0..3          [8][4] u16
 *   mag_t[g]  = level(code bits 2j, 2j+1), j = 0..7           [8][8] bytes
 *   neg_t     = the sign bits of piece t of every group          64-bit mask
 *   S[2g+h]  += sum_{4 values} mag_t (x_t negated under neg_t)   [16] int32, t = 0..3
 *   acc[8b+g] += d_b/8 (2 ls[g] + 1) dx[g] (S_b[2g] + S_b[2g+1])   [16] float, b = A, B
 *
 * THE LOOKUP. One `vpermi2b` gathers the 64 grid-index bytes of A and B into
 * a register I (A's group g piece t at byte 4g + t, B's at 32 + 4g + t). The
 * codes' low and high bytes are two 256-byte tables, four registers each;
 * `vpermi2b` reads 128 table bytes by the index's low 7 bits, so two of
 * them and a blend by bit 7 (`vpmovb2m` puts the 64 top bits in a mask) look
 * up 64 low bytes, as many again the high ones. A dword permute of the two
 * results then gives C_A and C_B: lane g = the four low code bytes of group
 * g, then its four high ones. `vpmultishiftqb` cuts the 2-bit code of value
 * j of piece t out of lane g into byte j (bit 8t + 2j for j < 4, 32 + 8t +
 * 2(j - 4) above), and one GF(2) affine byte transform (`vgf2p8affineqb`,
 * GFNI: each output bit the xor of chosen input bits, plus a constant)
 * maps the code's two bits c1 c0 to the level, ignoring the bits above:
 *
 *   level = 0b00001000 ^ (c0 ^ c1) << 0 ^ c1 << 1 ^ c0 << 4 ^ c1 << 5
 *         = 8, 25, 43 for c = 0, 1, 2
 *
 * THE SIGNS. A piece stores 7 sign bits, s[t] = bits 7t..7t+6 of a1, and the
 * 8th is their parity (3.4). One multishift puts s[t] into byte t of lane g,
 * and one affine transform makes it the whole sign byte: bits 0-6 copied,
 * bit 7 the xor of bits 0-6, the junk 8th bit dropped:
 *
 *   B[g] byte t = s[t] | parity(s[t]) << 7
 *
 * `vpshufbitqmb` with bit positions 8t + j then fills the mask neg_t.
 *
 * WHERE THE TIME GOES, measured from cache by CPU time, one thread, Zen 4
 * (2026-12-02, best of 25 round-robin timings of 64 rows of 4096): the AVX2
 * kernel 5.8 GB/s. One block per step with the codes as one u16 table of
 * eight registers (four `vpermi2w` and three blends per block) and the
 * parity by `vpopcntb`: 7.8. Grid entries by 64-bit gathers (`vpgatherqq`)
 * instead of permutes: 3.8, gathers are slow on Zen 4. Two blocks per step
 * with byte tables: 8.7; levels by the affine transform instead of a
 * `vpermb` table: 8.9; parity by the affine transform instead of and,
 * `vpopcntb` and a blend: 9.3 (this kernel). Left out, the lookups would
 * give 10.9 and the float scaling 9.8, so those are what costs most. */
struct quant_iq2_codebook { __m512i low[4], high[4]; };

/* C_A and C_B as above, from the 64 code bytes QA, QB of two blocks. */
QUANT_AVX512 static inline void quant_avx512_iq2_codes(__m512i QA, __m512i QB,
                                                       const struct quant_iq2_codebook *cb,
                                                       __m512i *CA, __m512i *CB) {
    const __m512i index_bytes = _mm512_set_epi32(
        0x7b7a7978, 0x73727170, 0x6b6a6968, 0x63626160, 0x5b5a5958, 0x53525150,
        0x4b4a4948, 0x43424140, 0x3b3a3938, 0x33323130, 0x2b2a2928, 0x23222120,
        0x1b1a1918, 0x13121110, 0x0b0a0908, 0x03020100);
    __m512i I = _mm512_permutex2var_epi8(QA, index_bytes, QB);
    __mmask64 top = _mm512_movepi8_mask(I);
    __m512i low = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(cb->low[0], I, cb->low[1]),
                                         _mm512_permutex2var_epi8(cb->low[2], I, cb->low[3]));
    __m512i high = _mm512_mask_blend_epi8(top,
                                          _mm512_permutex2var_epi8(cb->high[0], I, cb->high[1]),
                                          _mm512_permutex2var_epi8(cb->high[2], I, cb->high[3]));
    const __m512i lanes_a = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19,
                                              4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i lanes_b = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27,
                                              12, 28, 13, 29, 14, 30, 15, 31);
    *CA = _mm512_permutex2var_epi32(low, lanes_a, high);
    *CB = _mm512_permutex2var_epi32(low, lanes_b, high);
}

/* An affine byte transform's matrix has one byte per output bit, most
 * significant byte first: byte 7 - i holds the input bits whose xor is
 * output bit i. */

/* B as above: multishift by 32 + 7t into byte t, then bits 0-6 kept and
 * bit 7 = xor of bits 0-6 (matrix bytes 0x01..0x40 and 0x7f). */
QUANT_AVX512 static inline __m512i quant_avx512_iq2_sign_bytes(__m512i Q) {
    __m512i fields = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(0x352e2720), Q);
    return _mm512_gf2p8affine_epi64_epi8(fields, _mm512_set1_epi64(0x010204081020407fll), 0);
}

/* neg_t as above. */
QUANT_AVX512 static inline __mmask64 quant_avx512_iq2_signs(__m512i B, int t) {
    long long bits = 0x0706050403020100ll + t * 0x0808080808080808ll;    /* 8t + j */
    return _mm512_bitshuffle_epi64_mask(B, _mm512_set1_epi64(bits));
}

/* mag_t as above: output bit 0 = c0 ^ c1 (matrix byte 7 = 0x03), bit 1 = c1
 * (byte 6 = 0x02), bit 4 = c0 (byte 3 = 0x01), bit 5 = c1 (byte 2 = 0x02),
 * bit 3 from the constant 8. */
QUANT_AVX512 static inline __m512i quant_avx512_iq2_magnitudes(__m512i C, int t) {
    long long shifts = 0x2624222006040200ll + t * 0x0808080808080808ll;
    __m512i codes = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(shifts), C);
    return _mm512_gf2p8affine_epi64_epi8(codes, _mm512_set1_epi64(0x0302000001020000ll), 8);
}

/* S += the products of piece t of the eight groups. */
QUANT_AVX512 static inline __m512i quant_avx512_iq2_piece(__m512i C, __m512i B, int t,
                                                          const int8_t *xt, __m512i S) {
    __m512i x = quant_avx512_negate(quant_avx512_load(xt + 64 * t), quant_avx512_iq2_signs(B, t));
    return _mm512_dpbusd_epi32(S, quant_avx512_iq2_magnitudes(C, t), x);
}

/* S of one block. */
QUANT_AVX512 static inline __m512i quant_avx512_iq2_block(__m512i C, __m512i Q,
                                                          const int8_t *xt) {
    __m512i B = quant_avx512_iq2_sign_bytes(Q);
    __m512i S = quant_avx512_iq2_piece(C, B, 0, xt, _mm512_setzero_si512());
    S = quant_avx512_iq2_piece(C, B, 1, xt, S);
    S = quant_avx512_iq2_piece(C, B, 2, xt, S);
    return quant_avx512_iq2_piece(C, B, 3, xt, S);
}

/* Two blocks' code bytes, integer sums and scales d, as the scaling reads
 * them. */
struct quant_iq2_pair { __m512i Q[2], S[2]; uint16_t d[2]; };

/* acc as above, without the common 1/8: the group sums of A and B side by
 * side, the factors 2 ls + 1 from the a1 words ((a1 >> 27) | 1, as in the
 * AVX2 kernel), d_A and d_B converted together. `dx_lanes` masks the load of
 * dx when B is not there (a last odd block: S[1] = 0, d[1] = 0). */
QUANT_AVX512 static inline __m512 quant_avx512_iq2_scaled(const struct quant_iq2_pair *p,
                                                          const float *dx, __mmask16 dx_lanes,
                                                          __m512 acc) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14,
                                           16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15,
                                          17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512i sums = _mm512_add_epi32(_mm512_permutex2var_epi32(p->S[0], even, p->S[1]),
                                    _mm512_permutex2var_epi32(p->S[0], odd, p->S[1]));
    __m512i a1 = _mm512_permutex2var_epi32(p->Q[0], odd, p->Q[1]);
    __m512i ls2 = _mm512_or_si512(_mm512_srli_epi32(a1, 27), _mm512_set1_epi32(1));
    __m128 d = _mm_cvtph_ps(_mm_setr_epi16((short)p->d[0], (short)p->d[1], 0, 0, 0, 0, 0, 0));
    __m512 db = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(d));
    __m512 scale = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(dx_lanes, dx), db),
                                 _mm512_cvtepi32_ps(ls2));
    return _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums), acc);
}

/* Blocks i and i + 1 (i alone when `pair` is false) into acc; inlined in
 * both places, so that each copy knows `pair` (a call costs 10 %). */
QUANT_AVX512 __attribute__((always_inline))
static inline __m512 quant_avx512_iq2_step(const struct block_iq2_xxs *w, const struct act_q8 *a,
                                           int64_t i, bool pair,
                                           const struct quant_iq2_codebook *cb, __m512 acc) {
    quant_read_ahead(w + i, (pair ? 2 : 1) * sizeof *w);
    struct quant_iq2_pair p = { { quant_avx512_load(w[i].qs) }, { _mm512_setzero_si512() },
                                { w[i].d, 0 } };
    p.Q[1] = pair ? quant_avx512_load(w[i + 1].qs) : p.Q[0];
    __m512i C[2];
    quant_avx512_iq2_codes(p.Q[0], p.Q[1], cb, &C[0], &C[1]);
    p.S[0] = quant_avx512_iq2_block(C[0], p.Q[0], a->q_pieces + 256 * i);
    if (pair) {
        p.S[1] = quant_avx512_iq2_block(C[1], p.Q[1], a->q_pieces + 256 * i + 256);
        p.d[1] = w[i + 1].d;
    }
    return quant_avx512_iq2_scaled(&p, a->d + 8 * i, pair ? 0xffff : 0x00ff, acc);
}

QUANT_AVX512 static float quant_avx512_q8_dot_iq2_xxs(const struct block_iq2_xxs *w,
                                                      const struct act_q8 *a) {
    struct quant_iq2_codebook cb;
    for (int k = 0; k < 4; k++) {
        cb.low[k] = _mm512_load_si512(quant_iq2_code_bytes[0] + 64 * k);
        cb.high[k] = _mm512_load_si512(quant_iq2_code_bytes[1] + 64 * k);
    }
    __m512 acc = _mm512_setzero_ps();
    int64_t nb = a->n / 256, i = 0;
    for (; i + 2 <= nb; i += 2) acc = quant_avx512_iq2_step(w, a, i, true, &cb, acc);
    if (i < nb) acc = quant_avx512_iq2_step(w, a, i, false, &cb, acc);
    return _mm512_reduce_add_ps(acc) * 0.125f;
}

/* ---- Choosing the kernels once ---------------------------------------------
 *
 * One row of function pointers per instruction set, best first; the
 * start-up choice is the first row whose features the CPU reports
 * (`__builtin_cpu_supports` reads what the C runtime learnt from cpuid once).
 * Tests and --bench --roofline step through the rows this CPU can run.
 * There is no AVX-VNNI row (the 256-bit VEX `vpdpbusd` of Alder Lake and
 * Zen 5): the only machine here with AVX-VNNI also has AVX-512, which wins,
 * and a row never measured where it would be chosen would be a guess. */
static const struct quant_q8_kernels quant_q8_variants[] = {
    { "avx512vnni", quant_avx512_q8_dot_q8_0, quant_avx512_q8_dot_q2_k,
      quant_avx512_q8_dot_q4_k, quant_avx512_q8_dot_iq2_xxs, false, false },
    { "avx2", quant_avx2_q8_dot_q8_0, quant_avx2_q8_dot_q2_k, quant_avx2_q8_dot_q4_k,
      quant_avx2_q8_dot_iq2_xxs, false, true },
};
enum { QUANT_Q8_VARIANTS = sizeof quant_q8_variants / sizeof quant_q8_variants[0] };

/* The first row this CPU can run (the AVX2 row always: this code is only
 * compiled for AVX2), and the row in use. */
static int quant_q8_first;
static const struct quant_q8_kernels *quant_q8_active = &quant_q8_variants[1];

static bool quant_cpu_has_avx512_q8(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
           __builtin_cpu_supports("avx512bitalg") && __builtin_cpu_supports("gfni");
}

static int quant_q8_variant_count(void) {
    return QUANT_Q8_VARIANTS - quant_q8_first;
}

static const char *quant_q8_variant_name(int v) {
    return v >= 0 && v < quant_q8_variant_count() ? quant_q8_variants[quant_q8_first + v].name
                                                  : NULL;
}

/* v counts from the best this CPU runs; 0 is the start-up choice. Like the
 * tables, the choice is read without a lock: change it only while no
 * product runs (the tests and the single-threaded roofline do). */
static void quant_q8_use_variant(int v) {
    if (v < 0 || v >= quant_q8_variant_count()) {
        fprintf(stderr, "ds4: no integer kernel variant %d on this CPU\n", v);
        abort();
    }
    quant_q8_active = &quant_q8_variants[quant_q8_first + v];
}

static void quant_q8_choose_variant(void) {
    quant_q8_first = quant_cpu_has_avx512_q8() ? 0 : 1;
    quant_q8_use_variant(0);
}

#elif defined(__aarch64__) && defined(__ARM_NEON)

/* arm64 NEON. Every arm64 CPU has NEON; most made since 2017, and every
 * Apple Silicon Mac, also have the dot-product extension (FEAT_DotProd, the
 * `sdot` instruction), and the M2 and later Macs the 8-bit matrix multiply
 * (FEAT_I8MM). So the kernels come in variants, chosen once at start-up
 * from what the CPU reports, and each type's kernel is written once: the
 * variants differ only in one step, the dot product of 16 signed bytes
 *
 *     dot16(acc, a, b)[j] = acc[j] + (partial sums of a[i] b[i])     [4] int32
 *
 * whose four lanes add up to sum_{i<16} a[i] b[i]. Nothing reads a lane by
 * itself, so the two variants may split the sum differently:
 *
 *   neon-dotprod  sdot: lane j += sum_{i=4j..4j+3} a[i] b[i], one instruction;
 *   neon          smull, smlal2 (16-bit products, the two halves added),
 *                 sadalp (neighbours added into 32 bits): three instructions.
 *
 * WHY NO SIGN TRANSFER
 *
 * x86's pmaddubsw multiplies unsigned by signed bytes, so the AVX2 kernels
 * first move the weights' signs onto the activations. sdot and smull are
 * signed on both sides, and every weight integer here fits in a signed byte
 * (Q8_0 -128..127, Q4_K 0..15, Q2_K 0..3, IQ2_XXS's grid +-8, 25, 43), so
 * the weights meet the activations as they are.
 *
 * WHY NO I8MM VARIANT
 *
 * FEAT_I8MM adds usdot (unsigned by signed, which x86 needs and sdot makes
 * unnecessary, see above) and smmla, a 2x8 by 8x2 product of bytes into a
 * 2x2 block of int32: four 8-long dot products per instruction. It pays off
 * when two weight rows meet two activation vectors at once (a batch of two
 * tokens); a single row times a single vector would use one of the four
 * results, or two on a diagonal, which is sdot's work at sdot's cost. The
 * kernels here are row-times-vector, so an i8mm variant would be sdot under
 * another name; the CPU's i8mm is not used (yet).
 *
 * OVERFLOW. The 16-bit step of the plain variant holds two products: at
 * most 2 * 128 * 127 = 32512 < 32767 (Q8_0; the activations stay within
 * +-127). sdot adds straight into 32 bits. */

/* Which variants this compiler can build. GCC's arm_neon.h declares every
 * intrinsic under its own target pragma, so a function marked with a target
 * attribute may use sdot whatever the command line says. Clang did the same
 * only from LLVM 19 (Apple clang 17, by Apple's version history; neither is
 * tried here); before that, sdot exists only when the whole file is compiled
 * for it (-march=...+dotprod, or Apple's default -mcpu=apple-m1; clang 14
 * was tried both ways). The two compilers also spell the attribute differently,
 * and GCC wants the architecture its arm_neon.h names for sdot (v8.2), not
 * "+dotprod" on top of the default v8.0. Where the whole file has sdot, no
 * attribute is needed. */
#if defined(__ARM_FEATURE_DOTPROD) || (!defined(__clang__) && __GNUC__ >= 8) || \
    (defined(__clang__) && !defined(__apple_build_version__) && __clang_major__ >= 19) || \
    (defined(__clang__) && defined(__apple_build_version__) && __clang_major__ >= 17)
#define QUANT_NEON_HAVE_SDOT 1
#else
#define QUANT_NEON_HAVE_SDOT 0
#endif
#if defined(__ARM_FEATURE_DOTPROD)
#define QUANT_NEON_TARGET_SDOT
#elif defined(__clang__)
#define QUANT_NEON_TARGET_SDOT __attribute__((target("dotprod")))
#else
#define QUANT_NEON_TARGET_SDOT __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

/* Whether this CPU runs sdot: the kernel's answer on Linux (hardware
 * capability bits), sysctl on macOS, and "no" where neither can be asked,
 * unless the compiler was told the CPU has it. */
#if defined(__linux__) && !defined(HWCAP_ASIMDDP)
#define HWCAP_ASIMDDP (1 << 20)
#endif
static bool quant_neon_cpu_has_sdot(void) {
#if defined(__ARM_FEATURE_DOTPROD)
    return true;
#elif defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
    int value = 0;
    size_t len = sizeof value;
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &value, &len, NULL, 0) == 0 && value;
#else
    return false;
#endif
}

typedef int32x4_t (*quant_neon_dot16_fn)(int32x4_t acc, int8x16_t a, int8x16_t b);

static inline int32x4_t quant_neon_dot16_mull(int32x4_t acc, int8x16_t a, int8x16_t b) {
    int16x8_t pairs = vmlal_high_s8(vmull_s8(vget_low_s8(a), vget_low_s8(b)), a, b);
    return vpadalq_s16(acc, pairs);
}

#if QUANT_NEON_HAVE_SDOT
QUANT_NEON_TARGET_SDOT
static inline int32x4_t quant_neon_dot16_sdot(int32x4_t acc, int8x16_t a, int8x16_t b) {
    return vdotq_s32(acc, a, b);
}
#endif

/* The kernels below take dot16 as an argument and are always inlined into
 * one small function per variant, where the argument is a constant: the
 * compiler then calls (and inlines) that variant's step directly. */
#define QUANT_NEON_INLINE static inline __attribute__((always_inline))

/* A half float by the hardware's conversion (exact, like f16_to_f32). */
static inline float quant_neon_half(uint16_t h) {
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}

/* Lane k = the total of the four lanes of p_k: four sums side by side. */
static inline int32x4_t quant_neon_fold4(int32x4_t p0, int32x4_t p1, int32x4_t p2,
                                         int32x4_t p3) {
    return vpaddq_s32(vpaddq_s32(p0, p1), vpaddq_s32(p2, p3));
}

/* sum_{i<32} w[i] x[i] of two 16-byte halves, in four lanes. */
QUANT_NEON_INLINE int32x4_t quant_neon_dot32(int8x16_t w0, int8x16_t w1, const int8_t *x,
                                             quant_neon_dot16_fn dot16) {
    return dot16(dot16(vdupq_n_s32(0), w0, vld1q_s8(x)), w1, vld1q_s8(x + 16));
}

/* 16 unsigned bytes to four float vectors. */
static void quant_neon_q8_u8_f32(uint8x16_t bytes, float32x4_t f[4]) {
    uint16x8_t lo = vmovl_u8(vget_low_u8(bytes)), hi = vmovl_high_u8(bytes);
    f[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
    f[1] = vcvtq_f32_u32(vmovl_high_u16(lo));
    f[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
    f[3] = vcvtq_f32_u32(vmovl_high_u16(hi));
}

/* Q8_0, per block b:  acc += (dw[b] dx[b]) * dot32(w, q)   (two accumulators) */
QUANT_NEON_INLINE float quant_neon_q8_q8_0(const struct block_q8_0 *w, const struct act_q8 *a,
                                           quant_neon_dot16_fn dot16) {
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    int64_t nb = a->n / 32, b = 0;
    for (; b + 2 <= nb; b += 2) {
        int32x4_t p0 = quant_neon_dot32(vld1q_s8(w[b].qs), vld1q_s8(w[b].qs + 16),
                                        a->q + 32 * b, dot16);
        int32x4_t p1 = quant_neon_dot32(vld1q_s8(w[b + 1].qs), vld1q_s8(w[b + 1].qs + 16),
                                        a->q + 32 * b + 32, dot16);
        acc0 = vfmaq_n_f32(acc0, vcvtq_f32_s32(p0), quant_neon_half(w[b].d) * a->d[b]);
        acc1 = vfmaq_n_f32(acc1, vcvtq_f32_s32(p1), quant_neon_half(w[b + 1].d) * a->d[b + 1]);
    }
    if (b < nb) {
        int32x4_t p = quant_neon_dot32(vld1q_s8(w[b].qs), vld1q_s8(w[b].qs + 16),
                                       a->q + 32 * b, dot16);
        acc0 = vfmaq_n_f32(acc0, vcvtq_f32_s32(p), quant_neon_half(w[b].d) * a->d[b]);
    }
    return vaddvq_f32(vaddq_f32(acc0, acc1));
}

/* Q2_K. Shift j of the 16 bytes qs[32h + 16u ..] holds sub-block
 * k = 8h + 2j + u (3.3), so one half h gives eight sub-blocks' 2-bit values,
 * each 16 long. Their sums are folded four at a time, in the order of k,
 * and scaled by a vector of the sixteen
 *
 *     scale[k] = d sc[k] dx[k / 2]                                    [16] float
 *
 * The mins come from the exact 16-value sums:  dmin sum_k m[k] s[k]. */
static void quant_neon_q2_k_crumbs(const uint8_t *qs, int8x16_t q[4]) {
    uint8x16_t bytes = vld1q_u8(qs), three = vdupq_n_u8(3);
    q[0] = vreinterpretq_s8_u8(vandq_u8(bytes, three));
    q[1] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(bytes, 2), three));
    q[2] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(bytes, 4), three));
    q[3] = vreinterpretq_s8_u8(vshrq_n_u8(bytes, 6));
}

/* scale[4r .. 4r+3] for r = 0..3, and the mins' contribution of one block. */
static inline float32x4_t quant_neon_q2_k_scales(const struct block_q2_k *w, const float *dx,
                                          const float *s16, float32x4_t scale[4],
                                          float32x4_t mins) {
    uint8x16_t packed = vld1q_u8(w->scales);
    float32x4_t sc[4], m[4];
    quant_neon_q8_u8_f32(vandq_u8(packed, vdupq_n_u8(15)), sc);
    quant_neon_q8_u8_f32(vshrq_n_u8(packed, 4), m);
    float32x4_t dx_lo = vld1q_f32(dx), dx_hi = vld1q_f32(dx + 4);
    float32x4_t dx2[4] = { vzip1q_f32(dx_lo, dx_lo), vzip2q_f32(dx_lo, dx_lo),
                           vzip1q_f32(dx_hi, dx_hi), vzip2q_f32(dx_hi, dx_hi) };
    float d = quant_neon_half(w->d);
    float32x4_t ms = vdupq_n_f32(0.0f);
    for (int r = 0; r < 4; r++) {
        scale[r] = vmulq_n_f32(vmulq_f32(sc[r], dx2[r]), d);
        ms = vfmaq_f32(ms, m[r], vld1q_f32(s16 + 4 * r));
    }
    return vfmaq_n_f32(mins, ms, quant_neon_half(w->dmin));
}

/* The sums of sub-blocks 8h + 2j .. 8h + 2j + 3 (shifts j and j + 1). */
QUANT_NEON_INLINE int32x4_t quant_neon_q2_k_four(const int8x16_t lo[4], const int8x16_t hi[4],
                                                 int j, const int8_t *x,
                                                 quant_neon_dot16_fn dot16) {
    int32x4_t z = vdupq_n_s32(0);
    return quant_neon_fold4(dot16(z, lo[j], vld1q_s8(x)), dot16(z, hi[j], vld1q_s8(x + 16)),
                            dot16(z, lo[j + 1], vld1q_s8(x + 32)),
                            dot16(z, hi[j + 1], vld1q_s8(x + 48)));
}

QUANT_NEON_INLINE float quant_neon_q8_q2_k(const struct block_q2_k *w, const struct act_q8 *a,
                                           quant_neon_dot16_fn dot16) {
    float32x4_t acc = vdupq_n_f32(0.0f), mins = vdupq_n_f32(0.0f), scale[4];
    for (int64_t i = 0; i < a->n / 256; i++, w++) {
        mins = quant_neon_q2_k_scales(w, a->d + 8 * i, a->sum16 + 16 * i, scale, mins);
        for (int h = 0; h < 2; h++) {
            int8x16_t lo[4], hi[4];
            const int8_t *x = a->q + 256 * i + 128 * h;
            quant_neon_q2_k_crumbs(w->qs + 32 * h, lo);
            quant_neon_q2_k_crumbs(w->qs + 32 * h + 16, hi);
            int32x4_t s0 = quant_neon_q2_k_four(lo, hi, 0, x, dot16);
            int32x4_t s1 = quant_neon_q2_k_four(lo, hi, 2, x + 64, dot16);
            acc = vfmaq_f32(acc, scale[2 * h], vcvtq_f32_s32(s0));
            acc = vfmaq_f32(acc, scale[2 * h + 1], vcvtq_f32_s32(s1));
        }
    }
    return vaddvq_f32(acc) - vaddvq_f32(mins);
}

/* Q4_K. Chunk c's low nibbles are sub-block 2c and its high ones 2c + 1,
 * each one activation block; the eight sums are folded four at a time and
 * scaled by
 *
 *     scale[k] = d sc[k] dx[k],   mins: dmin sum_k m[k] (s[2k] + s[2k+1])  [8] */
QUANT_NEON_INLINE int32x4_t quant_neon_q4_k_two(const uint8_t *qs, const int8_t *x,
                                                quant_neon_dot16_fn dot16, int32x4_t *high) {
    uint8x16_t b0 = vld1q_u8(qs), b1 = vld1q_u8(qs + 16), low4 = vdupq_n_u8(15);
    *high = quant_neon_dot32(vreinterpretq_s8_u8(vshrq_n_u8(b0, 4)),
                             vreinterpretq_s8_u8(vshrq_n_u8(b1, 4)), x + 32, dot16);
    return quant_neon_dot32(vreinterpretq_s8_u8(vandq_u8(b0, low4)),
                            vreinterpretq_s8_u8(vandq_u8(b1, low4)), x, dot16);
}

/* The four sums of chunks c and c + 1 (sub-blocks 2c .. 2c + 3). */
QUANT_NEON_INLINE int32x4_t quant_neon_q4_k_four(const struct block_q4_k *w, int c,
                                                 const int8_t *xq, quant_neon_dot16_fn dot16) {
    int32x4_t p1, p3;
    int32x4_t p0 = quant_neon_q4_k_two(w->qs + 32 * c, xq + 64 * c, dot16, &p1);
    int32x4_t p2 = quant_neon_q4_k_two(w->qs + 32 * c + 32, xq + 64 * c + 64, dot16, &p3);
    return quant_neon_fold4(p0, p1, p2, p3);
}

/* scale[0..7] as two vectors, and the mins' contribution of one block. */
static inline float32x4_t quant_neon_q4_k_scales(const struct block_q4_k *w, const float *dx,
                                          const float *s16, float32x4_t scale[2],
                                          float32x4_t mins) {
    int32_t sc[8], m[8];
    for (int k = 0; k < 8; k++) quant_q4_k_scale_min(w->scales, k, &sc[k], &m[k]);
    float d = quant_neon_half(w->d), dmin = quant_neon_half(w->dmin);
    for (int r = 0; r < 2; r++) {
        float32x4_t pair_sums = vpaddq_f32(vld1q_f32(s16 + 8 * r), vld1q_f32(s16 + 8 * r + 4));
        scale[r] = vmulq_n_f32(vmulq_f32(vcvtq_f32_s32(vld1q_s32(sc + 4 * r)),
                                         vld1q_f32(dx + 4 * r)), d);
        mins = vfmaq_f32(mins, vmulq_n_f32(vcvtq_f32_s32(vld1q_s32(m + 4 * r)), dmin),
                         pair_sums);
    }
    return mins;
}

QUANT_NEON_INLINE float quant_neon_q8_q4_k(const struct block_q4_k *w, const struct act_q8 *a,
                                           quant_neon_dot16_fn dot16) {
    float32x4_t acc = vdupq_n_f32(0.0f), mins = vdupq_n_f32(0.0f), scale[2];
    for (int64_t i = 0; i < a->n / 256; i++, w++) {
        const int8_t *xq = a->q + 256 * i;
        mins = quant_neon_q4_k_scales(w, a->d + 8 * i, a->sum16 + 16 * i, scale, mins);
        acc = vfmaq_f32(acc, scale[0], vcvtq_f32_s32(quant_neon_q4_k_four(w, 0, xq, dot16)));
        acc = vfmaq_f32(acc, scale[1], vcvtq_f32_s32(quant_neon_q4_k_four(w, 2, xq, dot16)));
    }
    return vaddvq_f32(acc) - vaddvq_f32(mins);
}

/* IQ2_XXS, four groups (128 values) at a time. Group g's two words a0, a1
 * (3.3) sit at bytes 8g and 8g + 4 of the block, so two 16-byte loads and
 * one unzip give the sign words of groups 0-3 (or 4-7) in one vector A:
 *
 *   A[g]       = a1 of group g                                    [4] uint32
 *   S[4g + t]  = (A[g] >> 7t) & 127 | parity << 7                 [16] bytes
 *   sc[g]      = d/8 (2 (A[g] >> 28) + 1) dx[g]                   [4] float
 *
 * The four 7-bit fields move to the four bytes of their word with three
 * shifts, masks and ors; the eighth sign bit (3.4) is the parity of the
 * other seven: cnt (popcount per byte), and 1, shift to bit 7.
 *
 * A register holds pieces 2h and 2h + 1 of group g: two 8-byte grid entries
 * loaded side by side. Its signs come from S by a table lookup (tbl) that
 * copies sign byte 4g + 2h into lanes 0-7 and 4g + 2h + 1 into lanes 8-15,
 * then cmtst against (1, 2, 4, .. 128, 1, 2, .. 128): lane l becomes -1
 * where its bit is set, i.e. where the value is negative. A bit-select then
 * takes the negated grid byte there:
 *
 *   v[l] = neg[l] ? -grid[l] : grid[l],   sum = dot16(v, x)          [16] int8 */
static uint8x16_t quant_neon_iq2_sign_bytes(uint32x4_t A) {
    uint32x4_t s = vandq_u32(A, vdupq_n_u32(0x7f));
    s = vorrq_u32(s, vandq_u32(vshlq_n_u32(A, 1), vdupq_n_u32(0x7f00)));
    s = vorrq_u32(s, vandq_u32(vshlq_n_u32(A, 2), vdupq_n_u32(0x7f0000)));
    s = vorrq_u32(s, vandq_u32(vshlq_n_u32(A, 3), vdupq_n_u32(0x7f000000)));
    uint8x16_t bytes = vreinterpretq_u8_u32(s);
    uint8x16_t odd = vandq_u8(vcntq_u8(bytes), vdupq_n_u8(1));
    return vorrq_u8(bytes, vshlq_n_u8(odd, 7));
}

/* Pieces 2h, 2h + 1 of group g (grid indices at idx[0], idx[1]), signed. */
static inline int8x16_t quant_neon_iq2_pieces(const uint8_t *idx, uint8x16_t S, int g, int h) {
    const uint64_t *grid = quant_iq2_xxs_grid;
    uint8x16_t mag = vreinterpretq_u8_u64(vcombine_u64(vld1_u64(&grid[idx[0]]),
                                                       vld1_u64(&grid[idx[1]])));
    uint8x16_t pick = vcombine_u8(vdup_n_u8((uint8_t)(4 * g + 2 * h)),
                                  vdup_n_u8((uint8_t)(4 * g + 2 * h + 1)));
    uint8x16_t bit = vreinterpretq_u8_u64(vdupq_n_u64(0x8040201008040201ull));
    uint8x16_t neg = vtstq_u8(vqtbl1q_u8(S, pick), bit);
    int8x16_t v = vreinterpretq_s8_u8(mag);
    return vbslq_s8(neg, vnegq_s8(v), v);
}

/* The four lanes whose total is group g's integer sum. */
QUANT_NEON_INLINE int32x4_t quant_neon_iq2_group(const uint8_t *words, uint8x16_t S, int g,
                                                 const int8_t *x, quant_neon_dot16_fn dot16) {
    const uint8_t *idx = words + 8 * g;     /* a0's bytes: the four grid indices */
    return quant_neon_dot32(quant_neon_iq2_pieces(idx, S, g, 0),
                            quant_neon_iq2_pieces(idx + 2, S, g, 1), x + 32 * g, dot16);
}

QUANT_NEON_INLINE float32x4_t quant_neon_iq2_four(const uint8_t *words, float d8,
                                                  const float *dx, const int8_t *x,
                                                  quant_neon_dot16_fn dot16, float32x4_t acc) {
    uint32x4_t A = vuzp2q_u32(vreinterpretq_u32_u8(vld1q_u8(words)),
                              vreinterpretq_u32_u8(vld1q_u8(words + 16)));
    uint8x16_t S = quant_neon_iq2_sign_bytes(A);
    /* 2 ls + 1 = (A >> 27) | 1: the sign bit below ls is overwritten */
    uint32x4_t ls2 = vorrq_u32(vshrq_n_u32(A, 27), vdupq_n_u32(1));
    float32x4_t sc = vmulq_n_f32(vmulq_f32(vcvtq_f32_u32(ls2), vld1q_f32(dx)), d8);
    int32x4_t sums = quant_neon_fold4(quant_neon_iq2_group(words, S, 0, x, dot16),
                                      quant_neon_iq2_group(words, S, 1, x, dot16),
                                      quant_neon_iq2_group(words, S, 2, x, dot16),
                                      quant_neon_iq2_group(words, S, 3, x, dot16));
    return vfmaq_f32(acc, sc, vcvtq_f32_s32(sums));
}

QUANT_NEON_INLINE float quant_neon_q8_iq2_xxs(const struct block_iq2_xxs *w,
                                              const struct act_q8 *a,
                                              quant_neon_dot16_fn dot16) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int64_t i = 0; i < a->n / 256; i++, w++) {
        const uint8_t *words = (const uint8_t *)w->qs;
        const int8_t *x = a->q + 256 * i;
        float d8 = quant_neon_half(w->d) * 0.125f;
        acc = quant_neon_iq2_four(words, d8, a->d + 8 * i, x, dot16, acc);
        acc = quant_neon_iq2_four(words + 32, d8, a->d + 8 * i + 4, x + 128, dot16, acc);
    }
    return vaddvq_f32(acc);
}

/* The variants: one function per type and step, and a table of them. */
static float quant_neon_q8_0_mull(const struct block_q8_0 *w, const struct act_q8 *a) {
    return quant_neon_q8_q8_0(w, a, quant_neon_dot16_mull);
}
static float quant_neon_q2_k_mull(const struct block_q2_k *w, const struct act_q8 *a) {
    return quant_neon_q8_q2_k(w, a, quant_neon_dot16_mull);
}
static float quant_neon_q4_k_mull(const struct block_q4_k *w, const struct act_q8 *a) {
    return quant_neon_q8_q4_k(w, a, quant_neon_dot16_mull);
}
static float quant_neon_iq2_xxs_mull(const struct block_iq2_xxs *w, const struct act_q8 *a) {
    return quant_neon_q8_iq2_xxs(w, a, quant_neon_dot16_mull);
}

#if QUANT_NEON_HAVE_SDOT
QUANT_NEON_TARGET_SDOT
static float quant_neon_q8_0_sdot(const struct block_q8_0 *w, const struct act_q8 *a) {
    return quant_neon_q8_q8_0(w, a, quant_neon_dot16_sdot);
}
QUANT_NEON_TARGET_SDOT
static float quant_neon_q2_k_sdot(const struct block_q2_k *w, const struct act_q8 *a) {
    return quant_neon_q8_q2_k(w, a, quant_neon_dot16_sdot);
}
QUANT_NEON_TARGET_SDOT
static float quant_neon_q4_k_sdot(const struct block_q4_k *w, const struct act_q8 *a) {
    return quant_neon_q8_q4_k(w, a, quant_neon_dot16_sdot);
}
QUANT_NEON_TARGET_SDOT
static float quant_neon_iq2_xxs_sdot(const struct block_iq2_xxs *w, const struct act_q8 *a) {
    return quant_neon_q8_iq2_xxs(w, a, quant_neon_dot16_sdot);
}
#endif

/* Best first; the last one runs on every arm64 CPU. */
static const struct quant_q8_kernels quant_neon_q8_all[] = {
#if QUANT_NEON_HAVE_SDOT
    { "neon-dotprod", quant_neon_q8_0_sdot, quant_neon_q2_k_sdot, quant_neon_q4_k_sdot,
      quant_neon_iq2_xxs_sdot, true, false },
#endif
    { "neon", quant_neon_q8_0_mull, quant_neon_q2_k_mull, quant_neon_q4_k_mull,
      quant_neon_iq2_xxs_mull, false, false },
};
enum { QUANT_NEON_Q8_ALL = sizeof quant_neon_q8_all / sizeof quant_neon_q8_all[0] };

/* The variants this CPU runs, found once (quant_neon_q8_detect), and the
 * one in use. Until quant_tables_init() runs, the plain one is in use. */
static const struct quant_q8_kernels *quant_neon_q8_usable[QUANT_NEON_Q8_ALL];
static int quant_neon_q8_n_usable;
static const struct quant_q8_kernels *quant_q8_active =
    &quant_neon_q8_all[QUANT_NEON_Q8_ALL - 1];

static void quant_neon_q8_detect(void) {
    if (quant_neon_q8_n_usable > 0) return;
    bool sdot = quant_neon_cpu_has_sdot();
    for (int v = 0; v < QUANT_NEON_Q8_ALL; v++)
        if (!quant_neon_q8_all[v].needs_sdot || sdot)
            quant_neon_q8_usable[quant_neon_q8_n_usable++] = &quant_neon_q8_all[v];
}

static int quant_q8_variant_count(void) {
    quant_neon_q8_detect();
    return quant_neon_q8_n_usable;
}

static const char *quant_q8_variant_name(int v) {
    quant_neon_q8_detect();
    return v >= 0 && v < quant_neon_q8_n_usable ? quant_neon_q8_usable[v]->name : NULL;
}

/* Not thread-safe: at start-up (quant_tables_init), or in tests and the
 * bench between products. */
static void quant_q8_use_variant(int v) {
    quant_neon_q8_detect();
    if (v < 0 || v >= quant_neon_q8_n_usable) {
        fprintf(stderr, "ds4: no integer kernel variant %d on this CPU\n", v);
        abort();
    }
    quant_q8_active = quant_neon_q8_usable[v];
}

static void quant_q8_choose_variant(void) {
    quant_q8_use_variant(0);
}

#else

/* Any other CPU: the scalar reference is the only variant. */
static int quant_q8_variant_count(void) {
    return 1;
}

static const char *quant_q8_variant_name(int v) {
    return v == 0 ? "scalar" : NULL;
}

static void quant_q8_use_variant(int v) {
    if (v == 0) return;
    fprintf(stderr, "ds4: no integer kernel variant %d on this CPU\n", v);
    abort();
}

static void quant_q8_choose_variant(void) {
}

static float quant_fast_vec_dot_q8(uint32_t type, const void *w, const struct act_q8 *a) {
    return vec_dot_q8_ref(type, w, a);
}

#endif

#if (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)) || \
    (defined(__aarch64__) && defined(__ARM_NEON))
static float quant_fast_vec_dot_q8(uint32_t type, const void *w, const struct act_q8 *a) {
    switch (type) {
    case TYPE_Q8_0: return quant_q8_active->q8_0(w, a);
    case TYPE_Q2_K: return quant_q8_active->q2_k(w, a);
    case TYPE_Q4_K: return quant_q8_active->q4_k(w, a);
    case TYPE_IQ2_XXS: return quant_q8_active->iq2_xxs(w, a);
    default: return vec_dot_q8_ref(type, w, a);
    }
}
#endif

/* Dot product of a weight row with 8-bit activations (for the types where
 * quant_has_q8_dot() holds). Within the bound above of vec_dot(). */
static float vec_dot_q8(uint32_t type, const void *w, const struct act_q8 *a) {
    if (type == TYPE_IQ2_XXS) quant_require_tables();
    return quant_fast_vec_dot_q8(type, w, a);
}

/* ---- 3.10 Many tokens at once: a weight row decoded once ------------------ */

/* WHY A SECOND SET OF KERNELS
 *
 * In a prefill every weight row meets every token of the chunk, and the
 * one-token kernels of 3.9 redo the row's work for each of them: the
 * IQ2_XXS kernel spends most of its 11 instructions per 32 values turning
 * grid indices and sign bits into bytes, the Q8_0 kernel converts the block
 * scale and takes |w| again, and every kernel folds its partial sums across
 * lanes once per block. Here a row's work is done once and shared by the
 * tokens of a tile.
 *
 * THE SAME FLOATS AS 3.9. The 8-bit path promises that prefill, chunked
 * prefill and decode compute bit for bit the same products (6.1): one
 * rounding of an 8-bit input that flips in a later layer moves a small
 * model's logits by tenths. So these kernels produce, for every token,
 * exactly the float that vec_dot_q8() returns: the same integer sums
 * (exact), and the same float operations on them in the same order. Where
 * 3.9's kernel changes its order, its twin here must follow (test_quant
 * and test_model compare them for equality).
 *
 * Q8_0 needs no decoding: its 32-byte blocks are read as stored, |w| once
 * per tile of tokens instead of once per token, and only the block scales
 * are converted once per row, so that the products dw dx[b] are formed
 * eight at a time.
 *
 * Q2_K and IQ2_XXS are decoded once per row into plain bytes,
 *
 *     v[i]      signed weight integer: IQ2_XXS grid * sign, Q2_K sc[k] * q2
 *               (|v| <= 45)                                       [n] int8
 *     mag[i]    |v[i]|                                             [n] uint8
 *
 * whose block sums sum_{i in b} v[i] q[i] are 3.9's integer sums (Q2_K's two
 * sub-blocks of a block are summed as integers before any float, as there).
 * 3.9 ends each block of 256 with one vector of its eight block sums; here
 * each group of 256 values (blocks b = 0..7) is stored transposed by dwords,
 *
 *     t[32 k + 4 b + l] = v[32 b + 4 k + l]        k, b < 8, l < 4
 *
 * for the weights and the same for the activations. Register k then holds
 * dword k of all eight blocks, and its int32 lane b is a partial sum of
 * block b alone: eight registers added lane by lane give that vector of
 * eight block sums with no folding. Per token and 32 values: a load, a
 * sign, pmaddubsw, pmaddwd and an add.
 *
 * WITH VNNI. vpdpbusd multiplies unsigned by signed bytes into 32-bit sums
 * without saturating, so there the sign goes too: the token's copy holds
 * x + 128 as unsigned bytes (x ^ 0x80), and the row the correction
 *
 *     bias[b] = 128 sum_{i in b} v[i]:   sum (x[i] + 128) v[i] - bias[b] = sum x[i] v[i]
 *
 * one instruction per token and 32 values (mag is then unused).
 *
 * THE TILE. Four tokens share each load of a row's bytes; their inputs stay
 * in L1 while the eight rows of a work item (6.1) are decoded in a scratch
 * buffer that stays in L2. A remainder of one to three tokens calls
 * vec_dot_q8() itself.
 *
 * WHICH TWIN. All of the above copies the AVX2 row of 3.9. When the
 * AVX-512 row is in use, each type has a twin of that row's kernel
 * instead, which reads the blocks as stored and shares the weights' part
 * of each step (bytes, |w|, codes, sign masks, Q2_K's masked fields and
 * scales) among the tokens. Having nothing to decode, these twins also take
 * a remainder of two or three tokens where that gains
 * (quant_tile_least_tokens). */
struct q8_row {
    uint32_t type;
    int64_t n;
    const void *w;      /* the row as stored */
    int8_t *v;          /* [n] transposed (Q2_K, IQ2_XXS) */
    uint8_t *mag;       /* [n] (without VNNI) */
    int32_t *bias;      /* [n / 32] (with VNNI) */
    float *ls;          /* [n / 32] IQ2_XXS 2 ls + 1; Q8_0 d */
    float *m;           /* [n / 16] Q2_K mins m[k] */
    float *d;           /* [n / 256] IQ2_XXS d / 8, Q2_K d */
    float *dmin;        /* [n / 256] Q2_K dmin */
};

/* Bytes of storage for one decoded row of n values. */
static size_t q8_row_bytes(int64_t n) {
    return 2 * (size_t)n + (size_t)(2 * (n / 32) + n / 16 + 2 * (n / 256)) * sizeof(float);
}

static struct q8_row q8_row_view(void *mem, int64_t n) {
    float *f = mem;
    int32_t *bias = (int32_t *)(f + n / 32 + n / 16 + 2 * (n / 256));
    int8_t *v = (int8_t *)(bias + n / 32);
    struct q8_row r = { 0, n, NULL, v, (uint8_t *)(v + n), bias, f, f + n / 32,
                        f + n / 32 + n / 16, f + n / 32 + n / 16 + n / 256 };
    return r;
}

/* The inputs of one token: its act_q8 and the transposed copy. */
struct q8_token {
    struct act_q8 a;
    const int8_t *t;    /* [n], transposed as above (Q2_K, IQ2_XXS) */
};

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
enum { QUANT_TILE_VNNI = 1 };
#else
enum { QUANT_TILE_VNNI = 0 };
#endif

/* t from v as defined above, for n values (whole groups transposed, the
 * tail copied). */
static void q8_transpose_groups(const int8_t *v, int8_t *t, int64_t n) {
    int64_t i = 0;
    for (; i + 256 <= n; i += 256)
        for (int k = 0; k < 8; k++)
            for (int b = 0; b < 8; b++) memcpy(t + i + 32 * k + 4 * b, v + i + 32 * b + 4 * k, 4);
    memcpy(t + i, v + i, (size_t)(n - i));
}

/* A token's copy for the tile kernels, made once per token and product:
 * transposed, and with VNNI offset to x + 128. */
static void q8_tile_input(const int8_t *q, int8_t *t, int64_t n) {
    q8_transpose_groups(q, t, n);
    if (QUANT_TILE_VNNI)
        for (int64_t i = 0; i < n; i++) t[i] = (int8_t)((uint8_t)t[i] ^ 0x80);
}


#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

/* The AVX2 tiles copy the AVX2 kernels' float steps, so they serve only
 * while those kernels are the ones in use: with the AVX-512 row (which adds
 * the same integer sums in another order) a prefill through them would
 * differ from decode in the last bits, and through 8-bit inputs that grows
 * to visible differences (test_model's chunk 1 == chunk 64). The AVX-512
 * row has twins of its own (quant_tile_avx512_*, below). */
static bool quant_has_q8_tile(uint32_t type) {
    return type == TYPE_Q8_0 || type == TYPE_Q2_K || type == TYPE_IQ2_XXS;
}

/* Whether a type's tile kernel wants the decoded row and the transposed
 * copies (the AVX2 twins; the AVX-512 ones read the blocks as stored). */
static bool q8_tile_wants_copy(uint32_t type) {
    return quant_q8_active->avx2_tiles && (type == TYPE_Q2_K || type == TYPE_IQ2_XXS);
}

/* The 8x8 dword transpose of one group: r[b] holds block b in plain order;
 * t receives register k = dword k of every block, and mag its |t| or bias
 * the group's eight corrections. Three rounds of unpacks and lane swaps
 * (24 shuffles per 256 values, once per row). */
static void quant_tile_store_group(const __m256i r[8], int8_t *t, uint8_t *mag, int32_t *bias) {
    __m256i a[8], c[8], sum = _mm256_setzero_si256();
    (void)mag, (void)sum;
    for (int p = 0; p < 4; p++) {
        a[2 * p] = _mm256_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
        a[2 * p + 1] = _mm256_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
    }
    for (int h = 0; h < 2; h++)
        for (int p = 0; p < 2; p++) {
            c[4 * h + 2 * p] = _mm256_unpacklo_epi64(a[4 * h + p], a[4 * h + p + 2]);
            c[4 * h + 2 * p + 1] = _mm256_unpackhi_epi64(a[4 * h + p], a[4 * h + p + 2]);
        }
    /* c[k] (k < 4) holds dword k of blocks 0-3 in its low lane and k + 4 in
     * its high one; c[k + 4] the same of blocks 4-7 */
    for (int k = 0; k < 4; k++) {
        __m256i lo = _mm256_permute2x128_si256(c[k], c[k + 4], 0x20);
        __m256i hi = _mm256_permute2x128_si256(c[k], c[k + 4], 0x31);
        _mm256_storeu_si256((__m256i *)(t + 32 * k), lo);
        _mm256_storeu_si256((__m256i *)(t + 32 * (k + 4)), hi);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        /* lane b of each register is 4 values of block b: their sums */
        sum = _mm256_dpbusd_epi32(sum, _mm256_set1_epi8(1), lo);
        sum = _mm256_dpbusd_epi32(sum, _mm256_set1_epi8(1), hi);
#else
        _mm256_storeu_si256((__m256i *)(mag + 32 * k), _mm256_abs_epi8(lo));
        _mm256_storeu_si256((__m256i *)(mag + 32 * (k + 4)), _mm256_abs_epi8(hi));
#endif
    }
    _mm256_storeu_si256((__m256i *)bias, _mm256_slli_epi32(sum, 7));
}

/* Q2_K: block 4h + j of a 256 is the 2-bit field at shift 2j of the 32
 * bytes of half h; both bytes of a 16-bit lane belong to one sub-block, and
 * sc * q2 <= 45 fits a byte, so one 16-bit multiply scales two values. */
static void quant_tile_decode_q2_k(const struct block_q2_k *w, struct q8_row *row) {
    for (int64_t i = 0; i < row->n / 256; i++, w++) {
        __m256i sc = _mm256_and_si256(
            _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)w->scales)),
            _mm256_set1_epi8(15));
        __m256i r[8], pick0 = _mm256_set1_epi16((short)0x8000);
        pick0 = _mm256_blend_epi32(pick0, _mm256_set1_epi16((short)0x8001), 0xf0);
        for (int h = 0; h < 2; h++) {
            __m256i bits = quant_avx2_load_i8(w->qs + 32 * h);
            for (int j = 0; j < 4; j++) {
                /* sc[k] into the low lane's 16-bit factors, sc[k + 1] the high's */
                __m256i pick = _mm256_add_epi8(pick0, _mm256_set1_epi16((short)(8 * h + 2 * j)));
                __m256i q = _mm256_and_si256(_mm256_srli_epi16(bits, 2 * j), _mm256_set1_epi8(3));
                r[4 * h + j] = _mm256_mullo_epi16(q, _mm256_shuffle_epi8(sc, pick));
            }
        }
        row->d[i] = quant_avx2_half(w->d);
        row->dmin[i] = quant_avx2_half(w->dmin);
        for (int k = 0; k < 16; k++) row->m[16 * i + k] = (float)(w->scales[k] >> 4);
        quant_tile_store_group(r, row->v + 256 * i, row->mag + 256 * i, row->bias + 8 * i);
    }
}

/* IQ2_XXS: the registers (g, h) of 3.9's kernel, with the signs applied to
 * the grid magnitudes instead of to x; half h of group g is in the low 128
 * bits and half h of group g + 4 in the high ones. */
static inline void quant_tile_iq2_half(const struct block_iq2_xxs *w, int g, int h, __m256i S,
                                       int8_t *plain) {
    const uint8_t *lo = (const uint8_t *)&w->qs[4 * g] + 2 * h;
    const uint8_t *hi = (const uint8_t *)&w->qs[4 * (g + 4)] + 2 * h;
    const uint64_t *grid = quant_iq2_xxs_grid;
    __m256i mag = _mm256_setr_m128i(quant_avx2_two_u64(&grid[lo[0]], &grid[lo[1]]),
                                    quant_avx2_two_u64(&grid[hi[0]], &grid[hi[1]]));
    __m256i neg = quant_avx2_iq2_neg_mask(S, g, h);
    __m256i v = _mm256_sub_epi8(_mm256_xor_si256(mag, neg), neg);
    _mm_storeu_si128((__m128i *)(plain + 32 * g + 16 * h), _mm256_castsi256_si128(v));
    _mm_storeu_si128((__m128i *)(plain + 32 * (g + 4) + 16 * h), _mm256_extracti128_si256(v, 1));
}

/* Groups g and g + 4 of one block into plain order. */
static inline void quant_tile_iq2_pair(const struct block_iq2_xxs *w, int g, __m256i S,
                                       int8_t *plain) {
    quant_tile_iq2_half(w, g, 0, S, plain);
    quant_tile_iq2_half(w, g, 1, S, plain);
}

static void quant_tile_decode_iq2_xxs(const struct block_iq2_xxs *w, struct q8_row *row) {
    for (int64_t i = 0; i < row->n / 256; i++, w++) {
        __m256i A = quant_avx2_iq2_sign_words(w), S = quant_avx2_iq2_sign_bytes(A);
        __m256i ls2 = _mm256_or_si256(_mm256_srli_epi32(A, 27), _mm256_set1_epi32(1));
        _mm256_storeu_ps(row->ls + 8 * i, _mm256_cvtepi32_ps(ls2));
        row->d[i] = quant_avx2_half(w->d) * 0.125f;
        int8_t plain[256];
        quant_tile_iq2_pair(w, 0, S, plain);
        quant_tile_iq2_pair(w, 1, S, plain);
        quant_tile_iq2_pair(w, 2, S, plain);
        quant_tile_iq2_pair(w, 3, S, plain);
        __m256i r[8];
        for (int g = 0; g < 8; g++) r[g] = quant_avx2_load_i8(plain + 32 * g);
        quant_tile_store_group(r, row->v + 256 * i, row->mag + 256 * i, row->bias + 8 * i);
    }
}

/* Prepare one row of w for the tile kernels (Q8_0: nothing to decode). */
static void q8_row_decode(uint32_t type, const void *w, struct q8_row *row) {
    row->type = type;
    row->w = w;
    switch (type) {
    case TYPE_Q8_0:     /* the AVX-512 twin converts dw itself, four at a time */
        if (!quant_q8_active->avx2_tiles) break;
        for (int64_t b = 0; b < row->n / 32; b++)
            row->ls[b] = quant_avx2_half(((const struct block_q8_0 *)w)[b].d);
        break;
    case TYPE_Q2_K:
        if (q8_tile_wants_copy(type)) quant_tile_decode_q2_k(w, row);
        break;
    case TYPE_IQ2_XXS:
        if (q8_tile_wants_copy(type)) quant_tile_decode_iq2_xxs(w, row);
        break;
    default: quant_die_unsupported("q8_row_decode", type);
    }
}

/* acc + the eight int32 lane sums of v times x (without VNNI: |v| times x
 * signed like v; with it: v times the offset copy). */
static inline __m256i quant_tile_step(__m256i acc, __m256i mag, __m256i v, const int8_t *x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    (void)mag;
    return _mm256_dpbusd_epi32(acc, quant_avx2_load_i8(x), v);
#else
    __m256i sx = _mm256_sign_epi8(quant_avx2_load_i8(x), v);
    __m256i p = _mm256_maddubs_epi16(mag, sx);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}

/* Registers k and k + 1 of a group for four tokens, into two sets of sums:
 * eight independent chains, enough to hide vpdpbusd's latency. */
static inline void quant_tile_two_steps(const struct q8_row *row, const struct q8_token *x,
                                        int64_t o, __m256i *a, __m256i *b) {
    __m256i mag = quant_avx2_load_i8(row->mag + o), v = quant_avx2_load_i8(row->v + o);
    __m256i mag1 = quant_avx2_load_i8(row->mag + o + 32), v1 = quant_avx2_load_i8(row->v + o + 32);
    a[0] = quant_tile_step(a[0], mag, v, x[0].t + o);
    a[1] = quant_tile_step(a[1], mag, v, x[1].t + o);
    a[2] = quant_tile_step(a[2], mag, v, x[2].t + o);
    a[3] = quant_tile_step(a[3], mag, v, x[3].t + o);
    b[0] = quant_tile_step(b[0], mag1, v1, x[0].t + o + 32);
    b[1] = quant_tile_step(b[1], mag1, v1, x[1].t + o + 32);
    b[2] = quant_tile_step(b[2], mag1, v1, x[2].t + o + 32);
    b[3] = quant_tile_step(b[3], mag1, v1, x[3].t + o + 32);
}

/* Four vectors, one per token of a tile, kept in named fields: a loop over
 * an indexed array would keep them in memory and chain every step through
 * a store and a load. */
struct quant_tile_i4 { __m256i t0, t1, t2, t3; };
struct quant_tile_f4 { __m256 t0, t1, t2, t3; };

static inline __m256i quant_tile_unbias(__m256i sums, const struct q8_row *row, int64_t g) {
    if (!QUANT_TILE_VNNI) return sums;
    return _mm256_sub_epi32(sums, _mm256_loadu_si256((const __m256i *)(row->bias + 8 * g)));
}

/* The eight block sums of group g for the four tokens: the vector 3.9's
 * kernels fold into, here without a fold. */
static inline struct quant_tile_i4 quant_tile_group_sums(const struct q8_row *row,
                                                         const struct q8_token *x, int64_t g) {
    __m256i a[4], b[4];
    a[0] = a[1] = a[2] = a[3] = b[0] = b[1] = b[2] = b[3] = _mm256_setzero_si256();
    quant_tile_two_steps(row, x, 256 * g, a, b);
    quant_tile_two_steps(row, x, 256 * g + 64, a, b);
    quant_tile_two_steps(row, x, 256 * g + 128, a, b);
    quant_tile_two_steps(row, x, 256 * g + 192, a, b);
    struct quant_tile_i4 s = { quant_tile_unbias(_mm256_add_epi32(a[0], b[0]), row, g),
                               quant_tile_unbias(_mm256_add_epi32(a[1], b[1]), row, g),
                               quant_tile_unbias(_mm256_add_epi32(a[2], b[2]), row, g),
                               quant_tile_unbias(_mm256_add_epi32(a[3], b[3]), row, g) };
    return s;
}

/* IQ2_XXS, one token's share of group g, as quant_avx2_q8_dot_iq2_xxs:
 *     acc += ((2 ls + 1) dx) (d / 8) * sums */
static inline __m256 quant_tile_iq2_acc(__m256 acc, __m256 ls, __m256 d8, const float *dx,
                                        __m256i sums) {
    __m256 sc = _mm256_mul_ps(_mm256_mul_ps(ls, _mm256_loadu_ps(dx)), d8);
    return _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(sums), acc);
}

static void quant_tile_iq2_dot4(const struct q8_row *row, const struct q8_token *x, float *y) {
    __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    for (int64_t g = 0; g < row->n / 256; g++) {
        struct quant_tile_i4 s = quant_tile_group_sums(row, x, g);
        __m256 ls = _mm256_loadu_ps(row->ls + 8 * g), d8 = _mm256_set1_ps(row->d[g]);
        f0 = quant_tile_iq2_acc(f0, ls, d8, x[0].a.d + 8 * g, s.t0);
        f1 = quant_tile_iq2_acc(f1, ls, d8, x[1].a.d + 8 * g, s.t1);
        f2 = quant_tile_iq2_acc(f2, ls, d8, x[2].a.d + 8 * g, s.t2);
        f3 = quant_tile_iq2_acc(f3, ls, d8, x[3].a.d + 8 * g, s.t3);
    }
    y[0] = quant_avx2_hsum(f0), y[1] = quant_avx2_hsum(f1);
    y[2] = quant_avx2_hsum(f2), y[3] = quant_avx2_hsum(f3);
}

/* Q2_K, one token's share of group g, as quant_avx2_q8_dot_q2_k:
 *     acc  += (dx d) * sums
 *     mins += dmin (m[0..8) s[0..8) + m[8..16) s[8..16)) */
static inline void quant_tile_q2_k_acc(__m256 *acc, __m256 *mins, const struct q8_row *row,
                                       int64_t g, const struct act_q8 *a, __m256i sums) {
    const float *s16 = a->sum16 + 16 * g, *m = row->m + 16 * g;
    __m256 ms = _mm256_fmadd_ps(_mm256_loadu_ps(m), _mm256_loadu_ps(s16),
                                _mm256_mul_ps(_mm256_loadu_ps(m + 8), _mm256_loadu_ps(s16 + 8)));
    *mins = _mm256_fmadd_ps(_mm256_set1_ps(row->dmin[g]), ms, *mins);
    __m256 dx = _mm256_mul_ps(_mm256_loadu_ps(a->d + 8 * g), _mm256_set1_ps(row->d[g]));
    *acc = _mm256_fmadd_ps(dx, _mm256_cvtepi32_ps(sums), *acc);
}

static void quant_tile_q2_k_dot4(const struct q8_row *row, const struct q8_token *x, float *y) {
    __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    __m256 m0 = f0, m1 = f0, m2 = f0, m3 = f0;
    for (int64_t g = 0; g < row->n / 256; g++) {
        struct quant_tile_i4 s = quant_tile_group_sums(row, x, g);
        quant_tile_q2_k_acc(&f0, &m0, row, g, &x[0].a, s.t0);
        quant_tile_q2_k_acc(&f1, &m1, row, g, &x[1].a, s.t1);
        quant_tile_q2_k_acc(&f2, &m2, row, g, &x[2].a, s.t2);
        quant_tile_q2_k_acc(&f3, &m3, row, g, &x[3].a, s.t3);
    }
    y[0] = quant_avx2_hsum(f0) - quant_avx2_hsum(m0);
    y[1] = quant_avx2_hsum(f1) - quant_avx2_hsum(m1);
    y[2] = quant_avx2_hsum(f2) - quant_avx2_hsum(m2);
    y[3] = quant_avx2_hsum(f3) - quant_avx2_hsum(m3);
}

/* Q8_0, one token's share of block b, as quant_avx2_q8_block_q8_0:
 *     acc += (dw dx[b]) * sum_l |w| (x signed by w) */
static inline __m256 quant_tile_q8_0_acc(__m256 acc, __m256i aw, __m256i wq, float sc,
                                         const struct act_q8 *a, int64_t b) {
    __m256i sx = _mm256_sign_epi8(quant_avx2_load_i8(a->q + 32 * b), wq);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    __m256i isum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
#else
    __m256i isum = quant_avx2_madd_u8s8(aw, sx, _mm256_set1_epi16(1));
#endif
    return quant_avx2_scaled(acc, sc, isum);
}

/* One Q8_0 block for four tokens: |w| once; sc[t] = dw dx_t[b], the
 * products 3.9 forms one at a time, made eight blocks at a time below. */
static inline struct quant_tile_f4 quant_tile_q8_0_block(const struct block_q8_0 *w,
                                                         const struct q8_token *x, int64_t b,
                                                         const float sc[4][8], int j,
                                                         struct quant_tile_f4 f) {
    __m256i wq = quant_avx2_load_i8(w->qs), aw = _mm256_sign_epi8(wq, wq);
    f.t0 = quant_tile_q8_0_acc(f.t0, aw, wq, sc[0][j], &x[0].a, b);
    f.t1 = quant_tile_q8_0_acc(f.t1, aw, wq, sc[1][j], &x[1].a, b);
    f.t2 = quant_tile_q8_0_acc(f.t2, aw, wq, sc[2][j], &x[2].a, b);
    f.t3 = quant_tile_q8_0_acc(f.t3, aw, wq, sc[3][j], &x[3].a, b);
    return f;
}

/* sc[t][j] = dw[b + j] dx_t[b + j] for the `count` blocks from b. */
static void quant_tile_q8_0_scales(const struct q8_row *row, const struct q8_token *x, int64_t b,
                                   int count, float sc[4][8]) {
    for (int t = 0; t < 4; t++) {
        if (count == 8) {
            _mm256_storeu_ps(sc[t], _mm256_mul_ps(_mm256_loadu_ps(row->ls + b),
                                                  _mm256_loadu_ps(x[t].a.d + b)));
            continue;
        }
        for (int j = 0; j < count; j++) sc[t][j] = row->ls[b + j] * x[t].a.d[b + j];
    }
}

/* Q8_0, four tokens: even blocks into one accumulator and odd ones into
 * another, an odd last block into the first, as quant_avx2_q8_dot_q8_0. */
static void quant_tile_q8_0_dot4(const struct q8_row *row, const struct q8_token *x, float *y) {
    const struct block_q8_0 *w = row->w;
    __m256 z = _mm256_setzero_ps();
    struct quant_tile_f4 even = { z, z, z, z }, odd = even;
    int64_t nb = row->n / 32;
    float sc[4][8];
    for (int64_t b8 = 0; b8 < nb; b8 += 8) {
        int count = nb - b8 < 8 ? (int)(nb - b8) : 8, j = 0;
        quant_tile_q8_0_scales(row, x, b8, count, sc);
        for (; j + 2 <= count; j += 2) {
            even = quant_tile_q8_0_block(w + b8 + j, x, b8 + j, sc, j, even);
            odd = quant_tile_q8_0_block(w + b8 + j + 1, x, b8 + j + 1, sc, j + 1, odd);
        }
        if (j < count) even = quant_tile_q8_0_block(w + b8 + j, x, b8 + j, sc, j, even);
    }
    y[0] = quant_avx2_hsum(_mm256_add_ps(even.t0, odd.t0));
    y[1] = quant_avx2_hsum(_mm256_add_ps(even.t1, odd.t1));
    y[2] = quant_avx2_hsum(_mm256_add_ps(even.t2, odd.t2));
    y[3] = quant_avx2_hsum(_mm256_add_ps(even.t3, odd.t3));
}

/* The AVX-512 row's Q8_0 twin, four tokens: quant_avx512_q8_dot_q8_0's
 * steps exactly, per token, with what depends on the weights only (the
 * bytes, |w|, the sign mask, dw) done once for the four. Per step of four
 * blocks b..b+3 and token t:
 *
 *   sc_t[l]   = dw[b + l] dx_t[b + l]                              [4] float
 *   S_t       = sum_{4 lanes} |w| (x_t signed by w), blocks b, b+1   [16] int32
 *   acc0_t   += sc_t[lane / 8] S_t;  acc1_t the same for b+2, b+3    [16] float
 *
 * and the last blocks of an odd count one at a time, as the one-token
 * kernel does. */
QUANT_AVX512 __attribute__((always_inline))
static inline void quant_tile_avx512_q8_0_body(const struct q8_row *row,
                                                    const struct q8_token *x, int nt, float *y) {
    const struct block_q8_0 *w = row->w;
    const __m512i first = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i second = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    __m512 acc0[4], acc1[4];
    for (int t = 0; t < 4; t++) acc0[t] = acc1[t] = _mm512_setzero_ps();
    int64_t nb = row->n / 32, b = 0;
    for (; b + 4 <= nb; b += 4) {
        __m512i w01 = _mm512_inserti64x4(_mm512_castsi256_si512(quant_avx2_load_i8(w[b].qs)),
                                         quant_avx2_load_i8(w[b + 1].qs), 1);
        __m512i w23 = _mm512_inserti64x4(_mm512_castsi256_si512(quant_avx2_load_i8(w[b + 2].qs)),
                                         quant_avx2_load_i8(w[b + 3].qs), 1);
        __mmask64 n01 = _mm512_movepi8_mask(w01), n23 = _mm512_movepi8_mask(w23);
        __m512i a01 = _mm512_abs_epi8(w01), a23 = _mm512_abs_epi8(w23);
        __m128 dw = _mm_cvtph_ps(_mm_setr_epi16((short)w[b].d, (short)w[b + 1].d,
                                                (short)w[b + 2].d, (short)w[b + 3].d, 0, 0, 0, 0));
        for (int t = 0; t < nt; t++) {
            const int8_t *q = x[t].a.q + 32 * b;
            __m512 sc = _mm512_castps128_ps512(_mm_mul_ps(dw, _mm_loadu_ps(x[t].a.d + b)));
            __m512i s01 = _mm512_dpbusd_epi32(
                _mm512_setzero_si512(), a01, quant_avx512_negate(quant_avx512_load(q), n01));
            __m512i s23 = _mm512_dpbusd_epi32(
                _mm512_setzero_si512(), a23, quant_avx512_negate(quant_avx512_load(q + 64), n23));
            acc0[t] = _mm512_fmadd_ps(_mm512_permutexvar_ps(first, sc), _mm512_cvtepi32_ps(s01),
                                      acc0[t]);
            acc1[t] = _mm512_fmadd_ps(_mm512_permutexvar_ps(second, sc), _mm512_cvtepi32_ps(s23),
                                      acc1[t]);
        }
    }
    for (int t = 0; t < nt; t++) {
        __m256 tail = _mm256_setzero_ps();
        for (int64_t k = b; k < nb; k++) tail = quant_avx2_q8_block_q8_0(w + k, &x[t].a, k, tail);
        y[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t])) + quant_avx2_hsum(tail);
    }
}

/* The AVX-512 row's IQ2_XXS twin, four tokens: quant_avx512_q8_dot_iq2_xxs's
 * steps exactly, per token, with the weights' part of a pair of blocks (the
 * code lookups, the magnitudes M[b][p] of piece p and the sign masks N[b][p])
 * done once for the four:
 *
 *   S_t[b]  = sum_p dpbusd(M[b][p], x_t pieces negated where N[b][p])  [16] int32
 *   acc_t  += scale(b, b + 1, dx_t) (S_t[b], S_t[b + 1])                 [16] float
 *   y_t     = sum acc_t / 8 */
QUANT_AVX512 __attribute__((always_inline))
static inline void quant_tile_avx512_iq2_body(const struct q8_row *row,
                                                   const struct q8_token *x, int nt, float *y) {
    const struct block_iq2_xxs *w = row->w;
    struct quant_iq2_codebook cb;
    for (int k = 0; k < 4; k++) {
        cb.low[k] = _mm512_load_si512(quant_iq2_code_bytes[0] + 64 * k);
        cb.high[k] = _mm512_load_si512(quant_iq2_code_bytes[1] + 64 * k);
    }
    __m512 acc[4];
    for (int t = 0; t < 4; t++) acc[t] = _mm512_setzero_ps();
    int64_t nb = row->n / 256;
    for (int64_t i = 0; i < nb; i += 2) {
        bool pair = i + 1 < nb;
        int blocks = pair ? 2 : 1;
        struct quant_iq2_pair p = { { quant_avx512_load(w[i].qs) }, { _mm512_setzero_si512() },
                                    { w[i].d, pair ? w[i + 1].d : 0 } };
        p.Q[1] = pair ? quant_avx512_load(w[i + 1].qs) : p.Q[0];
        __m512i C[2], M[2][4];
        __mmask64 N[2][4];
        quant_avx512_iq2_codes(p.Q[0], p.Q[1], &cb, &C[0], &C[1]);
        for (int b = 0; b < blocks; b++) {
            __m512i B = quant_avx512_iq2_sign_bytes(p.Q[b]);
            for (int q = 0; q < 4; q++) {
                M[b][q] = quant_avx512_iq2_magnitudes(C[b], q);
                N[b][q] = quant_avx512_iq2_signs(B, q);
            }
        }
        for (int t = 0; t < nt; t++) {
            struct quant_iq2_pair pt = p;
            for (int b = 0; b < blocks; b++) {
                const int8_t *xt = x[t].a.q_pieces + 256 * (i + b);
                __m512i S = _mm512_setzero_si512();
                for (int q = 0; q < 4; q++)
                    S = _mm512_dpbusd_epi32(
                        S, M[b][q], quant_avx512_negate(quant_avx512_load(xt + 64 * q), N[b][q]));
                pt.S[b] = S;
            }
            acc[t] = quant_avx512_iq2_scaled(&pt, x[t].a.d + 8 * i, pair ? 0xffff : 0x00ff,
                                             acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) y[t] = _mm512_reduce_add_ps(acc[t]) * 0.125f;
}

/* The AVX-512 row's Q2_K twin, one to four tokens: quant_avx512_q8_dot_q2_k's
 * steps exactly, per token, with the block's weight part (the four masked
 * 2-bit registers, the scales sc[k] 4^-j and mins m[k] as floats, d and
 * dmin) done once for the tokens. Per block and token t:
 *
 *   S_t      = fold4 of the four dpbusd(q_m, x_t part m)             [16] int32
 *   acc_t   += (sc 4^-j dx_t[k / 2]) d S_t                            [16] float
 *   mins_t  += (m s_t[k]) dmin                                        [16] float
 *   y_t      = sum acc_t - sum mins_t */
QUANT_AVX512 __attribute__((always_inline))
static inline void quant_tile_avx512_q2_k_body(const struct q8_row *row,
                                                    const struct q8_token *x, int nt, float *y) {
    const struct block_q2_k *w = row->w;
    const __m512i in_s_order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13,
                                                 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i dx_of = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 1, 3, 5, 7, 1, 3, 5, 7);
    const __m512 unshift = _mm512_setr_ps(1, 1.f / 16, 1, 1.f / 16, 1, 1.f / 16, 1, 1.f / 16,
                                          1.f / 4, 1.f / 64, 1.f / 4, 1.f / 64,
                                          1.f / 4, 1.f / 64, 1.f / 4, 1.f / 64);
    __m512 acc[4], mins[4];
    for (int t = 0; t < 4; t++) acc[t] = mins[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < row->n / 256; i++, w++) {
        __m512i q[4];
        for (int m = 0; m < 4; m++) {
            int j = 2 * (m % 2);
            __m512i keep = _mm512_mask_blend_epi8(0xffffffff00000000ull,
                                                  _mm512_set1_epi8((char)(3 << (2 * j))),
                                                  _mm512_set1_epi8((char)(3 << (2 * j + 2))));
            q[m] = _mm512_and_si512(quant_avx512_both_halves(w->qs + 32 * (m / 2)), keep);
        }
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)w->scales));
        __m512i sc = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
        __m512 sc_f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_permutexvar_epi32(in_s_order, sc)),
                                    unshift);
        __m512 m_f = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
        __m128 d_dmin = _mm_cvtph_ps(_mm_setr_epi16((short)w->d, (short)w->dmin, 0, 0, 0, 0, 0, 0));
        __m512 d = _mm512_broadcastss_ps(d_dmin);
        __m512 dmin = _mm512_permutexvar_ps(_mm512_set1_epi32(1), _mm512_castps128_ps512(d_dmin));
        for (int t = 0; t < nt; t++) {
            const int8_t *xt = x[t].a.q + 256 * i;
            __m512i part[4];
            for (int m = 0; m < 4; m++)
                part[m] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[m],
                                              quant_avx512_load(xt + 64 * m));
            __m512i S = quant_avx512_fold4(part[0], part[1], part[2], part[3]);
            __m512 dx = _mm512_castps256_ps512(_mm256_loadu_ps(x[t].a.d + 8 * i));
            __m512 scale = _mm512_mul_ps(_mm512_mul_ps(sc_f, _mm512_permutexvar_ps(dx_of, dx)), d);
            acc[t] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(S), acc[t]);
            mins[t] = _mm512_fmadd_ps(_mm512_mul_ps(m_f, _mm512_loadu_ps(x[t].a.sum16 + 16 * i)),
                                      dmin, mins[t]);
        }
    }
    for (int t = 0; t < nt; t++)
        y[t] = _mm512_reduce_add_ps(acc[t]) - _mm512_reduce_add_ps(mins[t]);
}

/* The AVX-512 twins with the token count a constant, so that the compiler
 * unrolls the per-token loops and keeps the accumulators in registers (with
 * a variable count they lived on the stack: the Q8_0 twin of four tokens
 * took 138 ns per row and token instead of 91, 4096 values from cache). */
QUANT_AVX512 __attribute__((always_inline))
static inline void quant_tile_avx512_body(const struct q8_row *row, const struct q8_token *x,
                                          int nt, float *y) {
    switch (row->type) {
    case TYPE_Q8_0: quant_tile_avx512_q8_0_body(row, x, nt, y); break;
    case TYPE_Q2_K: quant_tile_avx512_q2_k_body(row, x, nt, y); break;
    case TYPE_IQ2_XXS: quant_tile_avx512_iq2_body(row, x, nt, y); break;
    default: quant_die_unsupported("quant_tile_avx512_dot", row->type);
    }
}

QUANT_AVX512 static void quant_tile_avx512_dot(const struct q8_row *row,
                                              const struct q8_token *x, int nt, float *y) {
    switch (nt) {
    case 1: quant_tile_avx512_body(row, x, 1, y); break;
    case 2: quant_tile_avx512_body(row, x, 2, y); break;
    case 3: quant_tile_avx512_body(row, x, 3, y); break;
    default: quant_tile_avx512_body(row, x, 4, y); break;
    }
}

/* The fewest tokens for which the row in use's tile kernel is worth
 * calling. The AVX2 tiles take four (the remainder goes to vec_dot_q8);
 * the AVX-512 twins, which decode nothing, take fewer where that gains,
 * as measured per row and token against the one-token kernel (4096 values
 * from cache, one thread, Xeon with AVX-512, 2026-12-02): Q8_0 1.39x at
 * two tokens, 1.56x at three, 1.70x at four; Q2_K 0.94x, 1.05x, 1.13x;
 * IQ2_XXS 1.00x, 1.12x, 1.17x (for one token all three lose). */
static int quant_tile_least_tokens(uint32_t type) {
    if (quant_q8_active->avx2_tiles) return 4;
    return type == TYPE_Q8_0 ? 2 : 3;
}

/* y[t] for nt tokens: four, or for the AVX-512 twins one to four. */
static void quant_tile_dot(const struct q8_row *row, const struct q8_token *x, int nt, float *y) {
    if (!quant_q8_active->avx2_tiles) {
        quant_tile_avx512_dot(row, x, nt, y);
        return;
    }
    switch (row->type) {
    case TYPE_Q8_0: quant_tile_q8_0_dot4(row, x, y); break;
    case TYPE_Q2_K: quant_tile_q2_k_dot4(row, x, y); break;
    case TYPE_IQ2_XXS: quant_tile_iq2_dot4(row, x, y); break;
    default: quant_die_unsupported("quant_tile_dot", row->type);
    }
}

#else

/* No tile kernels for this CPU: the engine dots each token with
 * vec_dot_q8() (6.1), which is always correct. */
static bool quant_has_q8_tile(uint32_t type) {
    (void)type;
    return false;
}

static bool q8_tile_wants_copy(uint32_t type) {
    (void)type;
    return false;
}

static void q8_row_decode(uint32_t type, const void *w, struct q8_row *row) {
    (void)w, (void)row;
    quant_die_unsupported("q8_row_decode", type);
}

static int quant_tile_least_tokens(uint32_t type) {
    (void)type;
    return 4;
}

static void quant_tile_dot(const struct q8_row *row, const struct q8_token *x, int nt, float *y) {
    (void)x, (void)nt, (void)y;
    quant_die_unsupported("quant_tile_dot", row->type);
}

#endif

/* y[i] = the row against tokens x[0 .. n_tok): four at a time by the tile
 * kernels, the remainder by the tile kernel too where it takes fewer
 * tokens, else by vec_dot_q8() (the same floats either way). */
static void q8_row_dot_tokens(const struct q8_row *row, const struct q8_token *x, int n_tok,
                              float *y) {
    int t = 0;
    for (; t + 4 <= n_tok; t += 4) quant_tile_dot(row, x + t, 4, y + t);
    if (n_tok - t >= quant_tile_least_tokens(row->type))
        quant_tile_dot(row, x + t, n_tok - t, y + t);
    else
        for (; t < n_tok; t++) y[t] = vec_dot_q8(row->type, row->w, &x[t].a);
}

/* ============================================================================
 * Chapter 4. The model's shape and its weights
 * ============================================================================
 *
 * Everything about the model's shape comes from the GGUF metadata, under the
 * `deepseek4.` prefix the published files use. Nothing is hard-coded: the
 * same code runs the 43-layer Flash model and the 6-layer tiny model that
 * the tests use. The symbols below match the forward-pass notes [FWD §1]:
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

/* Sources. The shape symbols are the fields of ModelArgs in DeepSeek's
 * inference/model.py [MODEL] under the GGUF key names of [LAYOUT §1.2]; the
 * tensor names, shapes and types are those of [LAYOUT §1.3], each matched to
 * the checkpoint name of the model.py module that owns it (Attention.wq_a,
 * Compressor.wkv, Gate.tid2eid, ...). */

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

/* The real-valued keys and the ranges the forward pass needs. Each one is a
 * divisor, a logarithm's argument or a scale somewhere: NaN, infinity, zero
 * or a negative value would not fail loudly, it would turn every logit into
 * NaN and the sampler's argmax into token 0. So they are refused at load,
 * with the key's name. `lo` is exclusive when `open_lo`. */
struct config_range {
    const char *key;
    double lo, hi;
    bool open_lo;
};

static const struct config_range CONFIG_RANGES[] = {
    { "deepseek4.rope.freq_base", 0, 1e12, true },
    { "deepseek4.attention.compress_rope_freq_base", 0, 1e12, true },
    { "deepseek4.rope.scaling.factor", 0, 1e6, true },
    { "deepseek4.rope.scaling.yarn_beta_fast", 0, 1e6, false },
    { "deepseek4.rope.scaling.yarn_beta_slow", 0, 1e6, false },
    { "deepseek4.rope.scaling.original_context_length", 0, 1e12, false },
    { "deepseek4.expert_weights_scale", 0, 1e6, true },
    { "deepseek4.attention.layer_norm_rms_epsilon", 0, 1, true },
    { "deepseek4.hyper_connection.epsilon", 0, 1, true },
};

static bool config_check_range(const char *path, const char *key, double v, struct ds4_error *e) {
    for (size_t i = 0; i < sizeof CONFIG_RANGES / sizeof CONFIG_RANGES[0]; i++) {
        const struct config_range *r = &CONFIG_RANGES[i];
        if (strcmp(r->key, key) != 0) continue;
        bool ok = isfinite(v) && (r->open_lo ? v > r->lo : v >= r->lo) && v <= r->hi;
        if (!ok)
            return fail(e, "%s: metadata '%s' = %g must be a finite number in %s%g, %g]", path, key,
                        v, r->open_lo ? "(" : "[", r->lo, r->hi);
    }
    return true;
}

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
        } else if (!config_check_range(g->path, keys[i].key, v, e)) {
            return false;
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
        if (have_clamps && (!gguf_array_number(&clamps, (uint64_t)l, &s) || !isfinite(s) || s < 0))
            return fail(e, "%s: swiglu_clamp_exp[%d] is missing, negative or not a finite number",
                        g->path, l);
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
    if (c->rope_dim < 2 || c->rope_dim % 2 || c->rope_dim > c->head_dim || c->rope_dim > 512)
        return fail(e, "%s: rope dimension %d must be even and at most key_length %d", path,
                    c->rope_dim, c->head_dim);
    if ((c->head_dim - c->rope_dim) % 64 != 0)
        return fail(e, "%s: key_length - rope dims = %d is not a multiple of the FP8 block "
                    "(64)", path, c->head_dim - c->rope_dim);
    if (c->idx_dim < c->rope_dim || c->idx_dim % 32 || (c->idx_dim & (c->idx_dim - 1)))
        return fail(e, "%s: indexer key_length %d must be a power of two, a multiple of 32 "
                    "and at least the rope dims", path, c->idx_dim);
    if (c->n_experts < 1 || c->n_experts > 1024 || c->n_used < 1 || c->n_used > c->n_experts ||
        c->ffn_dim < 1)
        return fail(e, "%s: expert counts are out of range (%d used of %d; at most 1024)", path,
                    c->n_used, c->n_experts);
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

/* Ask for row r's bytes (if the matrix has a row r) ahead of use; see
 * READING AHEAD in 6.1 for why the product does this. Locality 1 is
 * `prefetcht2` on x86: into L2, not L1, where it would evict the inputs. */
static void matrix_prefetch_row(const struct matrix *m, int64_t r) {
    if (r >= m->out) return;
    const char *p = (const char *)matrix_row(m, r);
    for (uint64_t at = 0; at < m->row_bytes; at += 64) __builtin_prefetch(p + at, 0, 1);
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
    bool shape_ok =
        t->dims[0] == (uint64_t)in && t->dims[1] == (uint64_t)out &&
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
    L->out_a =
        bind_matrix(b, "attn_output_a.weight", group_in, (int64_t)c->o_groups * c->o_rank, 1);
    L->out_b = bind_matrix(b, "attn_output_b.weight", (int64_t)c->o_groups * c->o_rank, c->dim, 1);
}

/* Compressor width: ratio-4 layers overlap consecutive windows, so each token
 * projects to two halves (coff = 2); ratio-128 layers do not (coff = 1). */
static int compressor_coff(int ratio) { return ratio == 4 ? 2 : 1; }

static void bind_compressors(struct binder *b, const struct ds4_config *c,
                             struct layer_weights *L) {
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
    if (L->hash_routed)
        L->tid2eid = bind_tid2eid(b, "ffn_gate_tid2eid.weight", c->n_used, c->vocab);
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
static bool bind_mtp_weights(struct model *m, const struct gguf *file, struct ds4_error *e) {
    const struct ds4_config *c = &m->cfg;
    struct binder b = { file, m, e, "mtp.0.", true };
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
    if (m->mtp_file.map) gguf_close(&m->mtp_file);
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
    /* The MTP block comes from its own file, or from the model file when
     * that carries the mtp.0.* tensors too. */
    const struct gguf *mtp_source =
        gguf_find_tensor(&m->file, "mtp.0.e_proj.weight") ? &m->file : NULL;
    if (mtp_path) {
        if (!gguf_open(&m->mtp_file, mtp_path, e)) {
            model_free(m);
            return false;
        }
        mtp_source = &m->mtp_file;
    }
    if (mtp_source) {
        m->has_mtp = true;
        if (!bind_mtp_weights(m, mtp_source, e)) {
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
 * Small, exact building blocks. Each one is a formula of the forward-pass
 * notes [FWD §2]; the comment above each function states it.
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

/* Sources. RoPE is [ROPE]; the frequency ramp is YaRN [YARN]; the two
 * functions of [MODEL] this section follows are precompute_freqs_cis (the
 * frequencies, with YaRN on compressed layers only) and apply_rotary_emb
 * (interleaved pairs, inverse=True for the output). RMSNorm above is
 * [RMSNORM], RMSNorm.forward of [MODEL]. */

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

/* WHY ROUND TRIPS, AND WHY THESE
 *
 * V4 was trained quantization-aware [V4 §FP4]: the forward pass used in
 * training rounded some tensors to tiny float formats and back, and the
 * weights learned to live with exactly that rounding. The rounding is
 * therefore part of the model's function, not an implementation detail:
 *
 *     K=V rows, dims [0, Dh-R)     e4m3 [FP8], blocks of 64   (act_quant)
 *     K=V rows, dims [Dh-R, Dh)    kept: RoPE phases encode distance, and
 *                                  rounding them would blur positions
 *     indexer q and k              Hadamard, then e2m1 [MX], blocks of 32
 *                                  (rotate_activation, fp4_act_quant)
 *
 * The scales are powers of two ("ue8m0"), so dividing by a scale and
 * multiplying back is exact: the grid rounding is the only error, and it is
 * the one the model saw. Ties go to the even code, as in the hardware
 * formats. Skipping these steps costs little accuracy per value but flips
 * discrete choices downstream (the indexer's top-k), which is why the
 * oracle vectors (18.1) include them. Source: [MODEL] act_quant and
 * fp4_act_quant in kernel.py; [FWD §2.3] and [FWD §2.4].
 */

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
 * One token of DeepSeek V4 travels through 43 blocks. Each block is two
 * sublayers -- attention, then a mixture of experts -- and around each one
 * the four hyper-connection streams are mixed down into a single input and
 * the sublayer's output is mixed back up. Attention sees the last W tokens
 * raw and the whole past through compressed rows; on half the layers a small
 * indexer picks which compressed rows matter. This chapter builds those
 * pieces bottom-up: the matrix multiply that dominates the time (6.1), the
 * state a session keeps (6.2), the streams (6.3), the compressors (6.4),
 * attention and the indexer (6.6-6.8), the experts (6.9), one block (6.10),
 * the output head (6.11) and the MTP block (6.12). Chapter 7 then tells the
 * whole story in one function.
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
 *
 * With `q8_activations` set, products with Q8_0, Q2_K, Q4_K and IQ2_XXS
 * weights quantize each input row X[t] to 8 bits first (3.9) and use the
 * integer kernels, for every chunk size: the row of W is hot in L1 while it
 * meets the T inputs, and prefill, chunked prefill and decode still compute
 * bit for bit the same products. For 4 tokens or more the Q8_0, Q2_K and
 * IQ2_XXS products go through the tiles of 3.10, which decode a row once
 * for all the tokens and return the same floats. F16 and F32 weights keep
 * float inputs.
 *
 * WORK SPLIT
 *
 * A work item is a group of 8 rows and a group of tokens. For decode there
 * is one token group; for a chunk whose matrix has too few rows to give
 * every thread 8 items, the tokens are split too, so a narrow product over
 * 512 tokens still keeps every core busy.
 *
 * READING AHEAD
 *
 * A one-token product leaves reading ahead to its kernel: each step of the
 * x86 kernels asks for the bytes 4 KiB ahead of the ones it reads
 * (READING AHEAD IN THE ROW, 3.9), which runs from row to row without a
 * seam. An earlier version asked, before each row, for the whole next row
 * at once (matrix_prefetch_row, one `prefetcht2` per 64-byte line); timed
 * against the in-kernel read-ahead that burst was slower than no prefetch
 * at all. With both changes decode at full width (`--fast`) went from 60
 * to 67 % of the ceiling at -t 1 and from 57 to 65 % at -t 2 (medians of 5
 * alternating runs, Xeon, 2026-12-02).
 * The tiles of 3.10 still ask for each next row before decoding it: they
 * read a row once for up to 512 tokens, so its misses are a small part of
 * their time, and timings with and without it did not tell apart. A
 * prefetch is a hint: it never changes a result.
 * ------------------------------------------------------------------------- */

struct backend;

struct engine_options {
    int threads;                  /* 0 = one per online CPU */
    bool reference_kernels;       /* scalar dequant-then-f32 products */
    const struct backend *backend;   /* --backend; NULL = the CPU backend (6.13) */
    bool q8_activations;          /* 8-bit inputs and integer kernels (3.9) */
    bool gpu_profile;             /* --profile: --bench prints GPU time per kernel (18.2) */
};

/* The table of operations the story calls (6.13); the CPU one is this chapter. */
static const struct backend *backend_cpu(void);

/* Rows in one work item of a product (WORK SPLIT above). */
enum { MATMUL_ROWS_PER_ITEM = 8 };

struct engine {
    struct model *model;
    struct engine_options opt;
    const struct backend *be;     /* chosen once, at start-up */
    struct thread_pool pool;
    struct rope rope_window;      /* ratio-0 layers and the MTP block */
    struct rope rope_compressed;  /* compressed layers, their compressors, the indexer */
    int64_t max_row;              /* longest weight row, for the dequant scratch */
    float **row_scratch;          /* [threads][max_row] */
    void **tile_scratch;          /* [threads]: MATMUL_ROWS_PER_ITEM decoded rows (3.10) */
    float **attn_scratch;         /* [threads][attn_scratch_cap] */
    int64_t attn_scratch_cap;
    void *act_mem;                /* the 8-bit inputs of the running product */
    size_t act_cap;
};

static void engine_init(struct engine *eng, struct model *m, struct engine_options opt) {
    memset(eng, 0, sizeof *eng);
    eng->model = m;
    eng->opt = opt;
    eng->be = opt.backend ? opt.backend : backend_cpu();
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
    eng->tile_scratch = xcalloc((size_t)threads, sizeof(void *));
    eng->attn_scratch = xcalloc((size_t)threads, sizeof(float *));
    for (int i = 0; i < threads; i++) {
        eng->row_scratch[i] = xmalloc((size_t)eng->max_row * sizeof(float));
        eng->tile_scratch[i] = xmalloc(MATMUL_ROWS_PER_ITEM * q8_row_bytes(eng->max_row));
    }
}

static void engine_free(struct engine *eng) {
    for (int i = 0; i < eng->pool.n_threads; i++) {
        free(eng->row_scratch[i]);
        free(eng->tile_scratch[i]);
        free(eng->attn_scratch[i]);
    }
    free(eng->row_scratch);
    free(eng->tile_scratch);
    free(eng->attn_scratch);
    free(eng->act_mem);
    pool_free(&eng->pool);
}

/* Make sure every thread has `n` floats of attention scratch. Called from the
 * main thread between parallel sections. The scratch grows with the context
 * (one logit per visible row), so it grows by doubling: a long decode then
 * reallocates it a logarithmic number of times, not once per new row. */
static void engine_reserve_attn_scratch(struct engine *eng, int64_t n) {
    if (n <= eng->attn_scratch_cap) return;
    if (n < 2 * eng->attn_scratch_cap) n = 2 * eng->attn_scratch_cap;
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
    int tok_per_item;             /* tokens in one work item */
    int64_t row_items;            /* row groups */
    const uint8_t *xq;            /* 8-bit inputs, xq_stride bytes apart, or NULL */
    size_t xq_stride;
    bool per_token;               /* the chunk is a decode or a verification (below) */
    bool tiles;                   /* rows decoded once for many tokens (3.10) */
};

/* Up to this many tokens, each row is dotted with the fused decode kernel
 * once per token instead of being dequantized once: the row is hot in L1
 * either way, and a speculative verification of a few drafted tokens then
 * computes bit for bit what one-token decode would have. */
enum { MATMUL_DECODE_PATH_MAX_TOKENS = 16 };

static struct act_q8 matmul_input_q8(const struct matmul_job *j, int t) {
    return act_q8_view((void *)(j->xq + (size_t)t * j->xq_stride), j->w->in);
}

/* With tiles, each token's slot holds its act_q8 and then, 32-byte aligned,
 * the transposed copy of its bytes (3.10). */
static size_t matmul_tile_offset(int64_t n) {
    return (act_q8_bytes(n) + 31) / 32 * 32;
}

static struct q8_token matmul_input_tile(const struct matmul_job *j, int t) {
    const uint8_t *slot = j->xq + (size_t)t * j->xq_stride;
    struct q8_token x = { matmul_input_q8(j, t),
                          (const int8_t *)(slot + matmul_tile_offset(j->w->in)) };
    return x;
}

/* Y[t][r] for the rows and tokens of one item, by one of the three paths. */
static void matmul_row_tokens(const struct matmul_job *j, int64_t r, int t0, int t1, float *row) {
    const struct matrix *w = j->w;
    const uint8_t *wr = matrix_row(w, r);
    if (j->eng->opt.reference_kernels) {
        for (int t = t0; t < t1; t++)
            j->y[t * j->y_stride + r] = vec_dot_ref(w->type, wr, j->x + t * j->x_stride, w->in);
    } else if (j->xq) {
        for (int t = t0; t < t1; t++) {
            struct act_q8 a = matmul_input_q8(j, t);
            j->y[t * j->y_stride + r] = vec_dot_q8(w->type, wr, &a);
        }
    } else if (j->per_token) {
        for (int t = t0; t < t1; t++)
            j->y[t * j->y_stride + r] = vec_dot(w->type, wr, j->x + t * j->x_stride, w->in);
    } else {
        dequant_row(w->type, wr, row, w->in);
        for (int t = t0; t < t1; t++)
            j->y[t * j->y_stride + r] = dot_f32(row, j->x + t * j->x_stride, w->in);
    }
}

/* Rows r0..r1 against tokens t0..t1 by tiles (3.10): the rows are decoded
 * into the worker's scratch once, then each group of up to 4 tokens, whose
 * inputs stay in L1, meets all of them. */
enum { MATMUL_TILE_TOKENS = 4 };

/* Decoding a Q2_K or IQ2_XXS row costs about what two or three one-token
 * products of it do (3.10), so a product of fewer tokens than the tile
 * kernel takes (an expert that few tokens chose) keeps the one-token
 * kernels: four for the AVX2 tiles, two or three for the AVX-512 twins
 * (quant_tile_least_tokens). The tiles compute the same floats, so the
 * choice never changes a result. */
static void matmul_rows_tiled(const struct matmul_job *j, int64_t r0, int64_t r1, int t0, int t1,
                              int worker) {
    const struct matrix *w = j->w;
    struct q8_row rows[MATMUL_ROWS_PER_ITEM];
    uint8_t *mem = j->eng->tile_scratch[worker];
    for (int64_t r = r0; r < r1; r++) {
        matrix_prefetch_row(w, r + 1);
        rows[r - r0] = q8_row_view(mem + (size_t)(r - r0) * q8_row_bytes(w->in), w->in);
        q8_row_decode(w->type, matrix_row(w, r), &rows[r - r0]);
    }
    for (int t = t0; t < t1; t += MATMUL_TILE_TOKENS) {
        int nt = t1 - t < MATMUL_TILE_TOKENS ? t1 - t : MATMUL_TILE_TOKENS;
        struct q8_token x[MATMUL_TILE_TOKENS];
        float y[MATMUL_TILE_TOKENS];
        for (int i = 0; i < nt; i++) x[i] = matmul_input_tile(j, t + i);
        for (int64_t r = r0; r < r1; r++) {
            q8_row_dot_tokens(&rows[r - r0], x, nt, y);
            for (int i = 0; i < nt; i++) j->y[(t + i) * j->y_stride + r] = y[i];
        }
    }
}

static void matmul_rows(void *ctx, int64_t item, int worker) {
    struct matmul_job *j = ctx;
    int64_t rg = item % j->row_items, tg = item / j->row_items;
    int64_t r0 = rg * MATMUL_ROWS_PER_ITEM, r1 = r0 + MATMUL_ROWS_PER_ITEM;
    if (r1 > j->w->out) r1 = j->w->out;
    int t0 = (int)tg * j->tok_per_item, t1 = t0 + j->tok_per_item;
    if (t1 > j->n_tok) t1 = j->n_tok;
    if (j->tiles) {
        matmul_rows_tiled(j, r0, r1, t0, t1, worker);
        return;
    }
    for (int64_t r = r0; r < r1; r++)
        matmul_row_tokens(j, r, t0, t1, j->eng->row_scratch[worker]);
}

static void matmul_quantize_input(void *ctx, int64_t t, int worker) {
    (void)worker;
    struct matmul_job *j = ctx;
    struct act_q8 a = matmul_input_q8(j, (int)t);
    act_quantize_q8(j->x + t * j->x_stride, &a);
    if (j->tiles && q8_tile_wants_copy(j->w->type))
        q8_tile_input(a.q, (int8_t *)matmul_input_tile(j, (int)t).t, a.n);
}

/* Quantize the n_tok inputs into the engine's buffer (grown here, on the
 * main thread, only when a wider product comes along). */
static void matmul_prepare_q8(struct engine *eng, struct matmul_job *j) {
    size_t slot = j->tiles && q8_tile_wants_copy(j->w->type)
                      ? matmul_tile_offset(j->w->in) + (size_t)j->w->in
                      : act_q8_bytes(j->w->in);
    j->xq_stride = (slot + 63) / 64 * 64;
    size_t need = j->xq_stride * (size_t)j->n_tok;
    if (need > eng->act_cap) {
        free(eng->act_mem);
        eng->act_mem = xmalloc(need);
        eng->act_cap = need;
    }
    j->xq = eng->act_mem;
    parallel_for(&eng->pool, j->n_tok, matmul_quantize_input, j);
}

/* Y[t][o] = W[o] . X[t] for t < n_tok; strides are in floats. The product
 * belongs to a chunk of chunk_tokens tokens (n_tok of them for most, fewer
 * for an expert's share). With float inputs a chunk of up to
 * MATMUL_DECODE_PATH_MAX_TOKENS takes the fused one-token kernels for every
 * product, so that a verification computes bit for bit what decode does; a
 * longer one dequantizes each row once, even for an expert that only 10 of
 * its tokens chose. With 8-bit inputs the tiles (3.10) compute what the
 * one-token kernels do, so they serve any chunk of 4 tokens or more. */
static struct matmul_job matmul_job_for(struct engine *eng, float *y, int64_t y_stride,
                                        const struct matrix *w, const float *x,
                                        int64_t x_stride, int n_tok, int chunk_tokens) {
    struct matmul_job j = { eng, w, x, x_stride, y, y_stride, n_tok, n_tok, 0, NULL, 0,
                            chunk_tokens <= MATMUL_DECODE_PATH_MAX_TOKENS, false };
    j.row_items = (w->out + MATMUL_ROWS_PER_ITEM - 1) / MATMUL_ROWS_PER_ITEM;
    int64_t want = 8 * (int64_t)eng->pool.n_threads;
    if (n_tok > 1 && eng->pool.n_threads > 1 && j.row_items < want) {
        int64_t groups = (want + j.row_items - 1) / j.row_items;
        if (groups > n_tok) groups = n_tok;
        j.tok_per_item = (int)((n_tok + groups - 1) / groups);
    }
    if (eng->opt.q8_activations && !eng->opt.reference_kernels && quant_has_q8_dot(w->type))
        j.tiles = n_tok >= quant_tile_least_tokens(w->type) && quant_has_q8_tile(w->type);
    return j;
}

static bool matmul_wants_q8(const struct matmul_job *j) {
    const struct engine_options *o = &j->eng->opt;
    return o->q8_activations && !o->reference_kernels && quant_has_q8_dot(j->w->type);
}

static int64_t matmul_items(const struct matmul_job *j) {
    return j->row_items * ((j->n_tok + j->tok_per_item - 1) / j->tok_per_item);
}

/* Threads worth a job: every token reads the whole matrix (from cache after
 * the first). */
static int matmul_threads(struct engine *eng, const struct matmul_job *j, int matrices) {
    const struct matrix *w = j->w;
    double bytes = (double)w->out * (double)type_row_bytes(w->type, w->in) * j->n_tok;
    return pool_threads_for_bytes(&eng->pool, bytes * matrices);
}

static void matmul_in_chunk(struct engine *eng, float *y, int64_t y_stride,
                            const struct matrix *w, const float *x, int64_t x_stride, int n_tok,
                            int chunk_tokens) {
    struct matmul_job j = matmul_job_for(eng, y, y_stride, w, x, x_stride, n_tok, chunk_tokens);
    if (matmul_wants_q8(&j)) matmul_prepare_q8(eng, &j);
    parallel_for_threads(&eng->pool, matmul_items(&j), matmul_rows, &j,
                         matmul_threads(eng, &j, 1));
}

/* Two products of one input (an expert's W1 and W3) as one job: the input
 * is quantized once and the threads meet once, not twice. Items below
 * first_items are the first product's. */
struct matmul_pair { struct matmul_job a, b; int64_t first_items; };

static void matmul_pair_rows(void *ctx, int64_t item, int worker) {
    struct matmul_pair *p = ctx;
    if (item < p->first_items) matmul_rows(&p->a, item, worker);
    else matmul_rows(&p->b, item - p->first_items, worker);
}

/* Ya = Wa X and Yb = Wb X, Y [n_tok][out]; two jobs unless Wa and Wb have
 * one type and shape (a file may mix them), since they share the input. */
static void matmul_pair_in_chunk(struct engine *eng, float *ya, const struct matrix *wa,
                                 float *yb, const struct matrix *wb, const float *x, int n_tok,
                                 int chunk_tokens) {
    if (wa->type != wb->type || wa->in != wb->in || wa->out != wb->out) {
        matmul_in_chunk(eng, ya, wa->out, wa, x, wa->in, n_tok, chunk_tokens);
        matmul_in_chunk(eng, yb, wb->out, wb, x, wb->in, n_tok, chunk_tokens);
        return;
    }
    struct matmul_pair p = {
        matmul_job_for(eng, ya, wa->out, wa, x, wa->in, n_tok, chunk_tokens),
        matmul_job_for(eng, yb, wb->out, wb, x, wb->in, n_tok, chunk_tokens), 0 };
    if (matmul_wants_q8(&p.a)) {
        matmul_prepare_q8(eng, &p.a);
        p.b.xq = p.a.xq;
        p.b.xq_stride = p.a.xq_stride;
    }
    p.first_items = matmul_items(&p.a);
    parallel_for_threads(&eng->pool, p.first_items + matmul_items(&p.b), matmul_pair_rows, &p,
                         matmul_threads(eng, &p.a, 2));
}

static void matmul_strided(struct engine *eng, float *y, int64_t y_stride, const struct matrix *w,
                           const float *x, int64_t x_stride, int n_tok) {
    matmul_in_chunk(eng, y, y_stride, w, x, x_stride, n_tok, n_tok);
}

static void matmul(struct engine *eng, float *y, const struct matrix *w, const float *x,
                   int n_tok) {
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

struct chunk_work;

struct session {
    struct engine *eng;
    struct chunk_work *work;      /* working buffers, grown to the largest chunk (6.5) */
    void *device;                 /* a GPU backend's own copy of this state, or NULL */
    int64_t pos;                  /* tokens processed so far */
    struct layer_state *layers;   /* [n_layers] */
    float *logits;                /* [vocab] logits after the last token */
    /* MTP */
    struct layer_state mtp_state;
    int64_t mtp_pos;              /* MTP rows processed (lags pos by one) */
    float *last_hc;               /* [n*D] main final HC state at pos-1 */
};

/* The floats of a compressor frontier (kv or score); 0 for none. */
static size_t frontier_floats(const struct compressor_state *cs) {
    return cs->kv ? (size_t)cs->coff * cs->ratio * cs->coff * cs->dc : 0;
}

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

/* The backend's side of a session's life (6.13): its working buffers and,
 * for a GPU, its copy of the state. */
static void backend_session_open(struct session *s);
static void backend_session_close(struct session *s);

static void session_init(struct session *s, struct engine *eng) {
    memset(s, 0, sizeof *s);
    const struct ds4_config *c = &eng->model->cfg;
    s->eng = eng;
    s->layers = xcalloc((size_t)c->n_layers, sizeof *s->layers);
    for (int l = 0; l < c->n_layers; l++) layer_state_init(&s->layers[l], c, c->ratio[l]);
    layer_state_init(&s->mtp_state, c, 0);
    s->logits = xcalloc((size_t)c->vocab, sizeof(float));
    s->last_hc = xcalloc((size_t)c->hc * c->dim, sizeof(float));
    backend_session_open(s);
}

static void session_free(struct session *s) {
    const struct ds4_config *c = &s->eng->model->cfg;
    backend_session_close(s);
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

/* WHY THE MIXING MATRIX IS DOUBLY STOCHASTIC
 *
 * What. Hyper-connections [HC] widen the residual stream from one vector to
 * n = 4 streams X [n][D] and let each sublayer learn how to read them (pre
 * [n]), where to write its output (post [n]) and how the streams flow past
 * it (C [n][n]). V4 uses the manifold-constrained form [MHC] [V4 §mHC]: C is
 * pushed onto the doubly stochastic matrices, every entry >= 0 and every row
 * and column summing to 1.
 *
 * Why. The residual path of a deep model is the product of every layer's C:
 * 43 layers x 2 sublayers = 86 factors. Unconstrained, such a product can
 * grow or shrink the signal geometrically, and plain HC loses the identity
 * shortcut that made residual networks trainable. Doubly stochastic matrices
 * are closed under products, so the whole path stays doubly stochastic:
 *
 *     sum_k C[j][k] = 1   source j hands out all of itself, no more:
 *                         sum_k Xout[k] = (sum_k post[k]) f + sum_j X[j]
 *     sum_j C[j][k] = 1   each stream k receives a weighted AVERAGE of the
 *                         sources, so no stream exceeds the largest one
 *     ||C||_2 = 1         no direction is amplified, however deep the stack
 *
 * and the identity (the plain residual) is one of them, so "do nothing" is
 * always reachable. pre = sigmoid(..) >= 0 and post = 2 sigmoid(..) in (0, 2)
 * keep the read and the write non-negative and bounded for the same reason.
 *
 * How. Sinkhorn and Knopp [SINKHORN] showed that alternately normalizing the
 * rows and columns of a positive matrix converges to a doubly stochastic one.
 * The model was trained with exactly 20 rounds in a fixed order (a row
 * softmax first, eps added at fixed points, a column step last), so we
 * reproduce those rounds step for step rather than iterate to convergence:
 * the rounded result IS the model. C: [n][n] = [4][4]; the raw mix m comes
 * from fn [M][n*D] applied to the flattened, RMS-scaled streams [n*D].
 *
 * Source: [MODEL] Block.hc_pre (mix, pre, collapse), hc_split_sinkhorn in
 * kernel.py (pre, post, Sinkhorn on C), Block.hc_post (the write back);
 * [FWD §3].
 */

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

/* WHY COMPRESSED ATTENTION: A WINDOW, A SUMMARY, AND A CHOICE
 *
 * What. Every layer attends to the last W = 128 tokens exactly. Beyond the
 * window, a layer with ratio r > 0 sees the past only as compressed rows,
 * one per r tokens [V4 §CSA §HCA]. Flash alternates two kinds:
 *
 *     HCA  r = 128   heavily compressed: every row is attended, dense
 *     CSA  r = 4     compressed sparse: the indexer (6.7) picks KI = 512
 *
 * plus two window-only layers at the bottom.
 *
 * Why. At a context of P tokens, a layer's cache holds W + P/r rows of Dh
 * floats instead of P. At P = 1M that is 8,320 rows for HCA and 262,272
 * for CSA instead of 1,048,576, and a CSA query reads only W + KI = 640 of
 * them. One shared K=V head (the key is the value) halves the cache again.
 * The window keeps the recent past sharp, where exact token order matters
 * most; the compressed rows keep the distant past reachable at a cost that
 * grows with P/r, not P.
 *
 * How a row is made. The pooling is learned and per channel: token t of the
 * window offers a value k_t and a score z_t for each of the coff*Dh
 * channels, and channel j of the row is the softmax_t(z_t[j]) average of
 * k_t[j]. Different channels can thus keep different tokens of the window.
 * The position bias ape[p mod r] lets the pool prefer a slot (say the last
 * token of a window). At r = 4 the windows overlap by half (each row pools 8
 * tokens, two halves of projection), so a phrase cut by a window boundary
 * still lands whole in one row. A row exists only once its last token is
 * seen; the unfinished window waits in the compressor state (6.2).
 *
 * Source: [MODEL] Compressor.forward and Compressor.overlap_transform,
 * get_compress_topk_idxs (which rows a HCA query sees); [FWD §5].
 */

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
 * 6.5 Working memory for one chunk, and the step context.
 *
 * A forward call processes a chunk of T consecutive tokens layer by layer.
 * All intermediate arrays live in the session's `chunk_work`, sized for the
 * largest chunk the session has run so far (grown on demand, never shrunk),
 * and are reused by every layer, the MTP block and every later call: a
 * decoded token allocates nothing.
 *
 * What one step of the forward pass needs to know -- the engine, the
 * session, the chunk (tokens, first position, length), the block being run
 * (its weights and state) and the streams it updates -- travels as ONE
 * pointer, a `struct step`. The story (chapter 7) fills in the chunk's
 * fields once and the block's before each block; the operations only read
 * it. The math helpers below it (rmsnorm, hc_pre, sinkhorn, route_token...)
 * stay pure functions of their arrays.
 * ------------------------------------------------------------------------- */

/* A speculative verification may have to take tokens back. Everything it
 * changed can be restored from a checkpoint except the compressor frontier,
 * which depends on every token since the last window closed. So a
 * verification records each token's compressor inputs (values and biased
 * scores, per layer), and a rollback replays the accepted ones (chapter 9). */
struct compressor_journal {
    float **k, **z;       /* [layer] -> [T][coff*Dh] main compressor inputs */
    float **ik, **iz;     /* [layer] -> [T][2*DI]   indexer compressor inputs */
};

struct chunk_work {
    int T;             /* capacity: the longest chunk these buffers hold */
    float *x;          /* [T][n*D]      the main model's streams */
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

/* Where the buffers live. The activations come from the backend's
 * allocator (host memory for the CPU, device memory for a GPU, 6.14); the
 * few index arrays the host itself fills or reads (visible counts, the
 * expert grouping, the decoded mixes) are always host memory. Allocators
 * return zeroed memory and exit when there is none. */
struct buffer_allocator {
    void *(*alloc)(size_t bytes);
    void (*release)(void *p);
};

static void *host_buffer_alloc(size_t bytes) {
    return xcalloc(1, bytes);
}

static const struct buffer_allocator host_buffers = { host_buffer_alloc, free };

static void chunk_work_init(struct chunk_work *w, const struct ds4_config *c, int T,
                            const struct buffer_allocator *ba) {
    size_t t = (size_t)T, n_d = (size_t)c->hc * c->dim, D = (size_t)c->dim;
    size_t heads = (size_t)c->n_heads * c->head_dim, K = (size_t)c->n_used, f = sizeof(float);
    void *(*A)(size_t) = ba->alloc;
    memset(w, 0, sizeof *w);
    w->T = T;
    w->x = A(t * n_d * f);
    w->mix = A(t * (size_t)(2 + c->hc) * c->hc * f);
    w->hc = xcalloc(t, sizeof(struct hc_mix));
    w->a = A(t * D * f);
    w->f = A(t * D * f);
    w->y = A(t * D * f);
    w->tmp = xcalloc(n_d, sizeof(float));
    w->qr = A(t * (size_t)c->q_rank * f);
    w->q = A(t * heads * f);
    w->o = A(t * heads * f);
    w->kv = A(t * (size_t)c->head_dim * f);
    w->ck = A(t * 2 * (size_t)c->head_dim * f);
    w->cz = A(t * 2 * (size_t)c->head_dim * f);
    w->ik = A(t * 2 * (size_t)c->idx_dim * f);
    w->iz = A(t * 2 * (size_t)c->idx_dim * f);
    w->iq = A(t * (size_t)c->idx_heads * c->idx_dim * f);
    w->iw = A(t * (size_t)c->idx_heads * f);
    w->low = A(t * (size_t)c->o_groups * c->o_rank * f);
    w->pooled = A((size_t)c->head_dim * f);
    w->visible = xcalloc(t, sizeof(int64_t));
    w->sel = A(t * (size_t)c->idx_topk * sizeof(int));
    w->n_sel = A(t * sizeof(int));
    w->router = A(t * (size_t)c->n_experts * f);
    w->route_sel = A(t * K * sizeof(int));
    w->route_wt = A(t * K * f);
    w->expert_tokens = xcalloc(t * K, sizeof(int));
    w->expert_count = xcalloc((size_t)c->n_experts + 1, sizeof(int));
    w->xe = A(t * D * f);
    w->ye = A(t * D * f);
    w->hg = A(t * (size_t)c->ffn_dim * f);
    w->hu = A(t * (size_t)c->ffn_dim * f);
    w->xm = A(t * n_d * f);
    w->hn = A(t * n_d * f);
}

static void chunk_work_free(struct chunk_work *w, const struct buffer_allocator *ba) {
    void *backend[] = { w->x, w->mix, w->a, w->f, w->y, w->qr, w->q, w->o, w->kv, w->ck,
                        w->cz, w->ik, w->iz, w->iq, w->iw, w->low, w->pooled, w->sel, w->n_sel,
                        w->router, w->route_sel, w->route_wt, w->xe, w->ye, w->hg, w->hu,
                        w->xm, w->hn };
    void *host[] = { w->hc, w->tmp, w->visible, w->expert_tokens, w->expert_count };
    if (w->T) {
        for (size_t i = 0; i < sizeof backend / sizeof backend[0]; i++) ba->release(backend[i]);
        for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) free(host[i]);
    }
    memset(w, 0, sizeof *w);
}

/* Make the buffers hold a chunk of T tokens. No code reads a working buffer
 * before writing it, so regrown buffers need no old contents. */
static void chunk_work_reserve(struct chunk_work *w, const struct ds4_config *c, int T,
                               const struct buffer_allocator *ba) {
    if (T <= w->T) return;
    chunk_work_free(w, ba);
    chunk_work_init(w, c, T, ba);
}

/* Which of a block's two sublayers a hyper-connection collapse feeds. */
enum sublayer { SUBLAYER_ATTENTION, SUBLAYER_FFN };

/* What a caller of the story wants back besides the session's logits. */
struct forward_request {
    float *all_logits;    /* [T][V]: logits of every position, or NULL */
    float *mtp_logits;    /* [T][V]: row t = MTP row of position P-1+t, or NULL */
    float *all_hc;        /* [T][n*D]: final streams of every position, or NULL */
    struct compressor_journal *journal;   /* compressor inputs, or NULL (chapter 9) */
};

struct step {
    /* The session and its engine, for the whole chunk. */
    struct engine *eng;
    const struct ds4_config *c;          /* = &eng->model->cfg */
    struct session *s;
    struct chunk_work *w;                /* = s->work, reserved for T by begin_chunk */
    const struct forward_request *req;   /* what the caller wants back, or NULL */
    /* The chunk: tokens[t] sits at position p0 + t. */
    const int32_t *tokens;               /* [T] */
    int64_t p0;
    int T;
    /* The block being run. */
    int layer;                           /* main layer index; -1 for the MTP block */
    bool is_mtp;                         /* the MTP block (its own head, no journal) */
    const struct layer_weights *L;
    struct layer_state *st;
    const struct rope *rope;             /* the layer's RoPE (6.6) */
    float *X;                            /* [T][n][D] streams the block updates in place */
    struct compressor_journal *journal;  /* record compressor inputs here, or NULL (chapter 9) */
};

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

/* WHAT THE ATTENTION SINK DOES
 *
 * A softmax's weights sum to 1, so a head must put its whole attention
 * somewhere, even when nothing it can see is relevant. Models trained
 * without a way out learn to park that mass on the first tokens of the text
 * and use them as a "sink" [SINKS]. V4 cannot rely on that trick: with a
 * sliding window and compressed rows, the first token is usually out of
 * sight. So each head h gets a learned logit sink_h that competes in the
 * softmax but carries no value:
 *
 *     g_h = e^sink_h / (e^sink_h + sum_j e^l_j)          in (0, 1)
 *     o_h = (1 - g_h) * (the usual softmax average of the rows)
 *
 * A head that finds nothing shrinks its output toward zero instead of
 * averaging noise; a head that finds a strong match (l_j >> sink_h) is
 * unaffected. sink: [H], one float per head, the tensor attn_sinks.
 *
 * Source: [MODEL] Attention.attn_sink and sparse_attn in kernel.py, which
 * adds e^sink to the softmax denominator; [FWD §4].
 */

static const struct rope *layer_rope(const struct engine *eng, const struct layer_weights *L) {
    return L->ratio > 0 ? &eng->rope_compressed : &eng->rope_window;
}

/* qr, q and kv of the chunk from the normed input a (st->w->a). */
static void attention_project_qkv(struct step *st) {
    struct engine *eng = st->eng;
    const struct ds4_config *c = st->c;
    const struct layer_weights *L = st->L;
    const struct rope *rope = st->rope;
    struct chunk_work *w = st->w;
    const float *A = w->a;
    int64_t p0 = st->p0;
    int Dh = c->head_dim, T = st->T;
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
/* Record this chunk's compressor inputs for a possible rollback (chapter 9). */
static void journal_compressor_inputs(const struct step *st) {
    const struct chunk_work *w = st->w;
    struct compressor_journal *j = st->journal;
    int l = st->layer, r = st->L->ratio, T = st->T;
    size_t width = (size_t)compressor_coff(r) * st->c->head_dim;
    size_t iwidth = 2 * (size_t)st->c->idx_dim;
    memcpy(j->k[l], w->ck, (size_t)T * width * sizeof(float));
    memcpy(j->z[l], w->cz, (size_t)T * width * sizeof(float));
    if (r == 4) {
        memcpy(j->ik[l], w->ik, (size_t)T * iwidth * sizeof(float));
        memcpy(j->iz[l], w->iz, (size_t)T * iwidth * sizeof(float));
    }
}

static void compress_chunk(struct step *st) {
    struct engine *eng = st->eng;
    const struct layer_weights *L = st->L;
    struct layer_state *ls = st->st;
    struct chunk_work *w = st->w;
    const float *A = w->a;
    int64_t p0 = st->p0;
    int T = st->T, r = L->ratio;
    int width = compressor_coff(r) * st->c->head_dim, iwidth = 2 * st->c->idx_dim;
    float *bias = w->tmp;   /* free here; hc_post is not running */
    matmul(eng, w->ck, &L->comp_kv, A, T);
    matmul(eng, w->cz, &L->comp_gate, A, T);
    add_compressor_bias(&L->comp_ape, w->cz, p0, T, width, bias);
    if (r == 4) {
        matmul(eng, w->ik, &L->idx_kv, A, T);
        matmul(eng, w->iz, &L->idx_gate, A, T);
        add_compressor_bias(&L->idx_ape, w->iz, p0, T, iwidth, bias);
    }
    if (st->journal) journal_compressor_inputs(st);
    for (int t = 0; t < T; t++) {
        int64_t p = p0 + t;
        if (compressor_push(&ls->comp, w->ck + (size_t)t * width, w->cz + (size_t)t * width, p,
                            w->pooled))
            finish_attention_row(eng, L, w->pooled, p + 1 - r, row_store_append(&ls->comp_rows));
        if (r == 4 && compressor_push(&ls->idx_comp, w->ik + (size_t)t * iwidth,
                                      w->iz + (size_t)t * iwidth, p, w->pooled))
            finish_indexer_row(eng, L, w->pooled, p + 1 - r, row_store_append(&ls->idx_rows));
        w->visible[t] = ls->comp_rows.n;
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

/* WHY A LIGHTNING INDEXER, AND WHY IT WORKS IN FP4
 *
 * What. DeepSeek Sparse Attention [V32] [V4 §CSA]: a second, much smaller
 * attention scores every compressed row, and only the KI best rows enter the
 * real attention. Its score is a sum of per-head votes:
 *
 *     score[c] = sum_h wI[h] * relu(qI_h . KI[c])     qI: [HI][DI], KI: [rows][DI]
 *
 * Why this shape. It is cheap: HI * DI = 64 x 128 per query against rows of
 * DI = 128, where the main attention has 64 heads of 512 against rows of
 * 512. The relu lets a head vote only FOR rows it matches, never against;
 * the weights wI come from the token itself, so the query decides which
 * indexer heads to trust. Selection by score, not by recency, lets a token
 * reach back to any part of a long context.
 *
 * Why the Hadamard and FP4. The indexer was trained in FP4 (e2m1, 8
 * magnitudes) [V4 §FP4]. A 4-bit block format shares one scale among 32
 * values, and one outlier channel would crush the rest to zero. The
 * normalized Hadamard matrix is orthogonal -- (Hq).(Hk) = q.k -- and spreads
 * every channel over all of them, so the block scale fits [QUAROT]. Because
 * the top-k is a discrete choice, a reference that skipped the rounding
 * would pick different rows; we round exactly as the model was trained (7).
 *
 * Source: [MODEL] Indexer.forward (queries, weights, scores, top-k),
 * Compressor.forward with rotate=True (its own compressed rows),
 * rotate_activation, fp4_act_quant; [FWD §6].
 */

static void indexer_queries(struct step *st) {
    struct engine *eng = st->eng;
    const struct layer_weights *L = st->L;
    struct chunk_work *w = st->w;
    const float *A = w->a;
    int64_t p0 = st->p0;
    int HI = st->c->idx_heads, DI = st->c->idx_dim, T = st->T;
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

static void select_rows_for_token(void *ctx, int64_t t, int worker) {
    const struct step *j = ctx;
    const struct ds4_config *c = j->c;
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
static void select_compressed_rows(struct step *st) {
    struct chunk_work *w = st->w;
    int T = st->T;
    bool need_indexer = false;
    for (int t = 0; t < T; t++) {
        w->n_sel[t] = -1;
        if (st->L->ratio == 4 && w->visible[t] > st->c->idx_topk) need_indexer = true;
    }
    if (!need_indexer) return;
    indexer_queries(st);
    engine_reserve_attn_scratch(st->eng, w->visible[T - 1]);
    parallel_for(&st->eng->pool, T, select_rows_for_token, st);
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

static const float *raw_row(const struct step *j, int64_t pos) {
    const struct ds4_config *c = j->c;
    if (pos >= j->p0) return j->w->kv + (size_t)(pos - j->p0) * c->head_dim;
    return j->st->ring + (size_t)(pos % c->window) * c->head_dim;
}

static const float *compressed_row(const struct step *j, int t, int64_t i) {
    int64_t r = j->w->n_sel[t] < 0 ? i : j->w->sel[(size_t)t * j->c->idx_topk + i];
    return j->st->comp_rows.rows + r * j->st->comp_rows.width;
}

static void attend_one(void *ctx, int64_t item, int worker) {
    const struct step *j = ctx;
    const struct ds4_config *c = j->c;
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
    rope_tail(j->rope, o, Dh, p, true);
}

static void attend_chunk(struct step *st) {
    const struct ds4_config *c = st->c;
    struct chunk_work *w = st->w;
    int64_t p0 = st->p0, most_comp = 0;
    int T = st->T;
    for (int t = 0; t < T; t++) {
        int64_t n = st->L->ratio == 0 ? 0 : w->n_sel[t] < 0 ? w->visible[t] : w->n_sel[t];
        if (n > most_comp) most_comp = n;
    }
    engine_reserve_attn_scratch(st->eng, c->window + most_comp);
    /* each head reads its keys twice (logits, then the weighted sum) */
    double bytes = 2.0 * T * c->n_heads * (double)(c->window + most_comp) * c->head_dim * 4;
    parallel_for_threads(&st->eng->pool, (int64_t)T * c->n_heads, attend_one, st,
                         pool_threads_for_bytes(&st->eng->pool, bytes));

    /* Only now may the chunk's rows enter the ring. */
    for (int t = T > c->window ? T - c->window : 0; t < T; t++)
        memcpy(st->st->ring + (size_t)((p0 + t) % c->window) * c->head_dim,
               w->kv + (size_t)t * c->head_dim, (size_t)c->head_dim * sizeof(float));
}

/* f = Wo_b . concat_g( Wo_a[g] . concat(heads of group g) ), into st->w->f */
static void attention_output(struct step *st) {
    struct engine *eng = st->eng;
    const struct ds4_config *c = st->c;
    const struct layer_weights *L = st->L;
    struct chunk_work *w = st->w;
    int T = st->T;
    int64_t group_in = (int64_t)c->n_heads / c->o_groups * c->head_dim;
    int64_t all_heads = (int64_t)c->n_heads * c->head_dim,
            low_width = (int64_t)c->o_groups * c->o_rank;
    for (int g = 0; g < c->o_groups; g++) {
        struct matrix part = L->out_a;
        part.data = matrix_row(&L->out_a, (int64_t)g * c->o_rank);
        part.out = c->o_rank;
        matmul_strided(eng, w->low + (int64_t)g * c->o_rank, low_width, &part,
                       w->o + g * group_in, all_heads, T);
    }
    matmul(eng, w->f, &L->out_b, w->low, T);
}

/* The CPU backend's attention: f = attention(a) for the chunk, the layer's
 * state (ring, compressed rows, frontiers) advanced by T positions. */
static void attention_chunk(struct step *st) {
    attention_project_qkv(st);
    if (st->L->ratio > 0) {
        compress_chunk(st);
        select_compressed_rows(st);
    }
    attend_chunk(st);
    attention_output(st);
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

/* THE ROUTING CHOICES, AND WHY
 *
 * Shapes: router [E][D], bias [E], tid2eid [V][K]; per token s [E], chosen
 * [K], w [K]; E = 256, K = 6 for Flash.
 *
 * Why sqrt(softplus). The score must be positive (it becomes a weight) and
 * must keep ordering the experts at any logit. V3 used a sigmoid [V3];
 * a sigmoid saturates at 1, so two strongly matching experts look alike.
 * sqrt(softplus(z)) is positive, smooth, near e^(z/2) for very negative z and
 * near sqrt(z) for large z: it still separates large logits, but grows
 * slowly enough that one expert cannot swamp the normalized weights. (The
 * report gives the function; this reading of it is ours.)
 *
 * Why the bias only selects. V4 balances expert load without an auxiliary
 * loss [LOSSFREE] [V3 §2.1.2]: during training a per-expert bias is nudged
 * up for idle experts and down for busy ones. Added before the top-K, it
 * changes WHICH experts a token uses; kept out of the weights, it never
 * changes HOW MUCH a chosen expert contributes, so balancing does not bend
 * the function the experts learn. We must copy that asymmetry exactly.
 *
 * Why the first layers are hash-routed. In layers 0 .. NH-1 (NH = 3) the
 * experts come from a fixed table indexed by the token id [HASH]. Near the
 * bottom, a token's hidden state is still mostly its own embedding, so a
 * learned router would mostly route by token anyway; a fixed table does that
 * with perfect, precomputed balance and nothing to train or collapse. The
 * weights still come from the router scores.
 *
 * Why the route scale. The K weights are normalized to sum to 1, so the
 * expert output does not depend on how sharp the router is; route_scale
 * (1.5) then sets its size against the always-on shared expert. The SwiGLU
 * [SWIGLU] clamp (limit 10) bounds activations for low-precision arithmetic.
 *
 * Source: [MODEL] Gate.forward (scores, bias, hash, weights), Expert.forward
 * (clamped SwiGLU), MoE.forward (routed + shared); [V4 §MoE]; [FWD §7].
 */

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

/* One expert applied to n gathered rows. */
struct expert_call {
    struct matrix gate, up, down;     /* W1 [F][D], W3 [F][D], W2 [D][F] */
    const float *x;                   /* [n][D] inputs */
    const float *weight;              /* [n] route weights, or NULL = 1 (shared expert) */
    int n;
    float *y;                         /* [n][D] outputs */
};

/* Y[i] = W2 (silu(min(W1 X[i], lim)) * clamp(W3 X[i], -lim, lim) * weight[i]) */
static void run_expert(struct step *st, const struct expert_call *ex) {
    struct chunk_work *w = st->w;
    float limit = st->L->swiglu_limit;
    int F = (int)ex->gate.out, n = ex->n;
    matmul_pair_in_chunk(st->eng, w->hg, &ex->gate, w->hu, &ex->up, ex->x, n, st->T);
    for (int i = 0; i < n; i++)
        for (int f = 0; f < F; f++) {
            float g = w->hg[(size_t)i * F + f], u = w->hu[(size_t)i * F + f];
            if (limit > 0) {
                g = fminf(g, limit);
                u = fminf(fmaxf(u, -limit), limit);
            }
            w->hg[(size_t)i * F + f] = siluf(g) * u * (ex->weight ? ex->weight[i] : 1.0f);
        }
    matmul_in_chunk(st->eng, ex->y, ex->down.out, &ex->down, w->hg, F, n, st->T);
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

/* The CPU backend's MoE: g = moe(b) for the chunk, b = st->w->a, g into st->w->f. */
static void moe_chunk(struct step *st) {
    const struct ds4_config *c = st->c;
    const struct layer_weights *L = st->L;
    struct chunk_work *w = st->w;
    const float *B = w->a;
    float *G = w->f;
    int D = c->dim, K = c->n_used, T = st->T;
    matmul(st->eng, w->router, &L->router, B, T);
    for (int t = 0; t < T; t++)
        route_token(c, L, w->router + (size_t)t * c->n_experts, st->tokens[t],
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
                memcpy(w->xe + (size_t)i * D, B + (size_t)(slot / K) * D,
                       (size_t)D * sizeof(float));
                weights[i] = w->route_wt[slot];
            }
            struct expert_call ex = { expert_slice(&L->gate_exps, e), expert_slice(&L->up_exps, e),
                                      expert_slice(&L->down_exps, e), w->xe, weights, m, w->ye };
            run_expert(st, &ex);
            for (int i = 0; i < m; i++) {
                int t = w->expert_tokens[begin + done + i] / K;
                for (int x = 0; x < D; x++) G[(size_t)t * D + x] += w->ye[(size_t)i * D + x];
            }
        }
    }
    struct expert_call shared = { L->gate_shexp, L->up_shexp, L->down_shexp, B, NULL, T, w->ye };
    run_expert(st, &shared);
    for (size_t i = 0; i < (size_t)T * D; i++) G[i] += w->ye[i];
}

/* ----------------------------------------------------------------------------
 * 6.10 One block, for a chunk of T tokens: X is [T][n][D], updated in place.
 *
 *     (y, mix) = hc_pre(X);  a = rmsnorm(y, attn_norm);  X = hc_post(attention(a), X, mix)
 *     (y, mix) = hc_pre(X);  b = rmsnorm(y, ffn_norm);   X = hc_post(moe(b), X, mix)
 *
 * The two halves of each line are the CPU backend's hc_collapse and
 * hc_expand; the story (chapter 7, run_block) strings them together.
 * ------------------------------------------------------------------------- */

/* a = rmsnorm(hc_pre(X), norm) for every token; the decoded mixes stay in
 * st->w->hc for the hc_expand that follows. */
static void hc_collapse_chunk(struct step *st, enum sublayer which) {
    const struct ds4_config *c = st->c;
    const struct layer_weights *L = st->L;
    struct chunk_work *w = st->w;
    bool attn = which == SUBLAYER_ATTENTION;
    const float *scale = attn ? L->hc_attn_scale : L->hc_ffn_scale;
    const float *base = attn ? L->hc_attn_base : L->hc_ffn_base;
    const float *norm = attn ? L->attn_norm : L->ffn_norm;
    int M = (2 + c->hc) * c->hc;
    int64_t nD = (int64_t)c->hc * c->dim;
    matmul(st->eng, w->mix, attn ? &L->hc_attn_fn : &L->hc_ffn_fn, st->X, st->T);
    for (int t = 0; t < st->T; t++) {
        hc_pre(c, st->X + t * nD, w->mix + (size_t)t * M, scale, base, &w->hc[t], w->y);
        rmsnorm(w->a + (size_t)t * c->dim, w->y, norm, c->dim, c->norm_eps);
    }
}

/* X = hc_post(f, X, mix) for every token, f = st->w->f. */
static void hc_expand_chunk(struct step *st) {
    const struct ds4_config *c = st->c;
    struct chunk_work *w = st->w;
    int64_t nD = (int64_t)c->hc * c->dim;
    for (int t = 0; t < st->T; t++)
        hc_post(c, st->X + t * nD, w->f + (size_t)t * c->dim, &w->hc[t], w->tmp);
}

/* ----------------------------------------------------------------------------
 * 6.11 The output head: collapse the streams, norm, project to the vocab.
 *
 *     w[h] = sigmoid(rr (hc_fn_h . x^) hc_scale + hc_base[h]) + eps_hc
 *     logits = Wout . rmsnorm(sum_h w[h] X[h], norm)
 * ------------------------------------------------------------------------- */

/* logits [n][V] of stream rows row0 .. row0+n-1 of st->X; the MTP block has
 * its own collapse and norm but shares the output matrix. */
static void head_chunk(struct step *st, int64_t row0, int n, float *logits) {
    const struct model *m = st->eng->model;
    const struct ds4_config *c = st->c;
    struct chunk_work *w = st->w;
    const struct matrix *hc_fn = st->is_mtp ? &m->mtp.hc_head_fn : &m->hc_head_fn;
    const float *hc_scale = st->is_mtp ? m->mtp.hc_head_scale : m->hc_head_scale;
    const float *hc_base = st->is_mtp ? m->mtp.hc_head_base : m->hc_head_base;
    const float *norm = st->is_mtp ? m->mtp.norm : m->output_norm;
    int64_t nD = (int64_t)c->hc * c->dim;
    const float *X = st->X + row0 * nD;
    matmul(st->eng, w->mix, hc_fn, X, n);
    for (int t = 0; t < n; t++) {
        float *y = w->a + (size_t)t * c->dim;
        hc_head_collapse(c, X + t * nD, w->mix + (size_t)t * c->hc, hc_scale, hc_base, y);
        rmsnorm(y, y, norm, c->dim, c->norm_eps);
    }
    matmul(st->eng, logits, &m->output, w->a, n);
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

/* WHY A MULTI-TOKEN-PREDICTION BLOCK
 *
 * What. During training, V4 (like V3 [V3 §2.2], after [MTP]) also learns
 * to predict the token after next: one extra block reads the main model's
 * final streams at position i [n][D] and the embedding of token i+1 [D],
 * and its logits [V] are trained on token i+2 [V4 §MTP].
 *
 * Why it is shipped. At inference it is a draft model for speculative
 * decoding (chapter 9): one block instead of 43, sharing the embedding and
 * the output matrix, and far better informed than a separate small model,
 * because it starts from everything the main model computed about the
 * context. A wrong guess costs little: the main model verifies all drafts in
 * one chunk, and the acceptance rule keeps the output distribution exactly
 * the main model's [SPEC] [SPEC2].
 *
 * Why it runs one position behind. Its row i needs token i+1, which exists
 * only after the main model has produced it; so its own window ring is
 * always one row behind the main model's.
 *
 * Source: [MODEL] MTPBlock.forward (e_proj, h_proj, enorm, hnorm, the block,
 * hc_head, the shared head); [FWD §8].
 */

static void embed_tokens(const struct model *m, const int32_t *tokens, int T, float *out) {
    for (int t = 0; t < T; t++)
        dequant_row_ref(m->token_embd.type, matrix_row(&m->token_embd, tokens[t]),
                        out + (size_t)t * m->cfg.dim, m->cfg.dim);
}

/* The CPU backend's embedding: every stream starts as the same copy of the
 * token's row, X[t][h] = embed[tokens[t]]. */
static void embed_chunk(struct step *st) {
    const struct ds4_config *c = st->c;
    int64_t nD = (int64_t)c->hc * c->dim;
    embed_tokens(st->eng->model, st->tokens, st->T, st->w->f);
    for (int t = 0; t < st->T; t++)
        for (int h = 0; h < c->hc; h++)
            memcpy(st->X + t * nD + (int64_t)h * c->dim, st->w->f + (size_t)t * c->dim,
                   (size_t)c->dim * sizeof(float));
}

/* The MTP block's input streams for Tm rows:
 *
 *     Xm[i][h] = Wh_proj . rmsnorm(Hin_i[h], hnorm) + We_proj . rmsnorm(embed[tok_i], enorm)
 *
 * Hin_0 is `hin0` and Hin_i (i >= 1) is hin_next[i-1], each [n][D];
 * Xm = st->X is [Tm][n][D], tok = st->tokens, Tm = st->T. The h_proj product
 * runs over all Tm*n streams at once. */
static void mtp_input(struct step *st, const float *hin0, const float *hin_next) {
    struct engine *eng = st->eng;
    const struct model *m = eng->model;
    const struct ds4_config *c = st->c;
    const struct mtp_weights *mw = &m->mtp;
    const int32_t *tokens = st->tokens;
    struct chunk_work *w = st->w;
    float *Xm = st->X;
    int n = c->hc, D = c->dim, Tm = st->T;
    int64_t nD = (int64_t)n * D;
    embed_tokens(m, tokens, Tm, w->y);
    for (int i = 0; i < Tm; i++) {
        float *e = w->y + (size_t)i * D;
        rmsnorm(e, e, mw->enorm, D, c->norm_eps);
        const float *hin = i == 0 ? hin0 : hin_next + (i - 1) * nD;
        for (int h = 0; h < n; h++)
            rmsnorm(w->hn + i * nD + (int64_t)h * D, hin + (int64_t)h * D, mw->hnorm, D,
                    c->norm_eps);
    }
    matmul(eng, w->f, &mw->e_proj, w->y, Tm);
    matmul(eng, Xm, &mw->h_proj, w->hn, Tm * n);
    for (int i = 0; i < Tm; i++)
        for (int h = 0; h < n; h++)
            for (int d = 0; d < D; d++) Xm[i * nD + (int64_t)h * D + d] += w->f[(size_t)i * D + d];
}

/* ----------------------------------------------------------------------------
 * 6.13 Backends: the operations the story calls.
 *
 * The story (chapter 7) is written once. It calls the forward pass through
 * a small table of operations, `struct backend`, chosen once at start-up
 * (--backend, kept in engine->be); the functions of this chapter are the
 * CPU backend's entries. A GPU backend fills the same table with sequences
 * of kernels, and the story reads the same for every backend.
 *
 * Granularity: one operation per step of the story (a GPU runs each as a few
 * kernel launches, or records them into one graph between begin_chunk and
 * end_chunk). Every operation takes the step context (6.5); the fields it
 * reads are set by the story before the call:
 *
 *   chunk fields  eng, c, s, w, req, tokens [T], p0, T     (begin_chunk .. end_chunk)
 *   block fields  layer, is_mtp, L, st, rope, X, journal   (before each block)
 *
 * Buffers. st->w (`struct chunk_work`) is the backend's working memory,
 * reserved by begin_chunk; its pointers, and st->X (= w->x for the main
 * model, w->xm for the MTP block), are BACKEND memory: the story passes them
 * between operations but never reads or writes through them. On the CPU
 * they are host arrays; a GPU backend may keep device addresses there.
 * Everything else an operation is given -- tokens, the logits it writes, and
 * the session's state in `struct session` -- is host memory.
 *
 * Session state. The CPU layout of 6.2 (`struct session`: rings, compressed
 * rows, compressor frontiers, pos, mtp_pos, logits, last_hc) is the one
 * state every backend agrees on. A GPU backend keeps its own copy in
 * s->device while it runs; `state_pull` makes the host copy current (before
 * a snapshot is encoded or a checkpoint taken), `state_push` tells the
 * backend the host copy changed (after a snapshot is decoded, a rollback or
 * a restore). On the CPU both are no-ops: the host copy is the state. Hence
 * a disk snapshot written by one backend loads in another.
 *
 *   op             reads                          writes
 *   session_open   s (session_init has built it)  s->work, s->device
 *   session_close  s->work, s->device             frees both
 *   state_pull     the backend's state            s->layers, mtp_state, last_hc, logits
 *   state_push     the host state                 the backend's state
 *   begin_chunk    T                              w reserved for >= T tokens
 *   embed          tokens                         X [T][n][D] = embed[tokens[t]] per stream
 *   hc_collapse    X, L (attn or ffn mixer+norm)  w->a [T][D]; the mixes (for hc_expand)
 *   attention      w->a, L, st, p0, rope, journal w->f [T][D]; st: ring, rows, frontiers
 *                                                 (journal: compressor inputs, layer >= 0)
 *   hc_expand      X, w->f, the mixes             X (in place)
 *   moe            w->a, L, tokens                w->f [T][D]
 *   head           X rows row0 .. row0+n-1        logits [n][V], host (MTP head if is_mtp)
 *   mtp_input      hin0 [n*D], hin_next [T-1][n*D], tokens   X [T][n][D] (the MTP streams)
 *                  hin0 is s->last_hc (state) or a row of backend streams;
 *                  hin_next rows of backend streams, or NULL when T = 1
 *   end_chunk      X                              s->last_hc = X[T-1]; req->all_hc = X
 *
 * attention is the whole of 6.6-6.8: the q path, the kv path with its FP8
 * round trip and RoPE, the compressors and the indexer (ratio > 0), sparse
 * attention with sinks over ring + chunk + compressed rows, the inverse
 * RoPE, the grouped output projection, and finally the ring update. moe is
 * the whole of 6.9: router, routing (hash or biased top-k), the routed
 * experts and the shared one. Results must match the CPU backend's: bit for
 * bit on the CPU, within the bars of the GPU checks elsewhere.
 * ------------------------------------------------------------------------- */

struct backend {
    const char *name;
    void (*session_open)(struct session *s);
    void (*session_close)(struct session *s);
    void (*state_pull)(struct session *s);
    void (*state_push)(struct session *s);
    void (*begin_chunk)(struct step *st);
    void (*embed)(struct step *st);
    void (*hc_collapse)(struct step *st, enum sublayer which);
    void (*attention)(struct step *st);
    void (*hc_expand)(struct step *st);
    void (*moe)(struct step *st);
    void (*head)(struct step *st, int64_t row0, int n, float *logits);
    void (*mtp_input)(struct step *st, const float *hin0, const float *hin_next);
    void (*end_chunk)(struct step *st);
};

static void cpu_session_open(struct session *s) {
    s->work = xcalloc(1, sizeof *s->work);   /* capacity 0: the first chunk sizes it */
}

static void cpu_session_close(struct session *s) {
    if (!s->work) return;
    chunk_work_free(s->work, &host_buffers);
    free(s->work);
    s->work = NULL;
}

/* The host copy IS the CPU backend's state. */
static void cpu_state_sync(struct session *s) {
    (void)s;
}

static void cpu_begin_chunk(struct step *st) {
    chunk_work_reserve(st->w, st->c, st->T, &host_buffers);
}

static void cpu_end_chunk(struct step *st) {
    int64_t nD = (int64_t)st->c->hc * st->c->dim;
    if (st->req && st->req->all_hc)
        memcpy(st->req->all_hc, st->X, (size_t)st->T * nD * sizeof(float));
    memcpy(st->s->last_hc, st->X + (st->T - 1) * nD, (size_t)nD * sizeof(float));
}

static const struct backend cpu_backend = {
    .name = "cpu",
    .session_open = cpu_session_open,
    .session_close = cpu_session_close,
    .state_pull = cpu_state_sync,
    .state_push = cpu_state_sync,
    .begin_chunk = cpu_begin_chunk,
    .embed = embed_chunk,
    .hc_collapse = hc_collapse_chunk,
    .attention = attention_chunk,
    .hc_expand = hc_expand_chunk,
    .moe = moe_chunk,
    .head = head_chunk,
    .mtp_input = mtp_input,
    .end_chunk = cpu_end_chunk,
};

static const struct backend *backend_cpu(void) {
    return &cpu_backend;
}

static void backend_session_open(struct session *s) {
    s->eng->be->session_open(s);
}

static void backend_session_close(struct session *s) {
    s->eng->be->session_close(s);
}

/* ----------------------------------------------------------------------------
 * 6.14 The GPU backend: the story's steps as kernel dispatches.
 *
 * Built when DS4_GPU is defined: by `make` on macOS, where ds4_metal.m
 * implements the gpu_* dispatches on the GPU; by `make cuda`, where
 * ds4_cuda.cu does on an NVIDIA GPU; and by tests/test_metal_model.c, where
 * tests/metal/harness.cpp runs the same kernels.metal on the CPU (or
 * ds4_cuda.cu runs emulated). So the sequence below is the one the GPUs run
 * and the one `make test` checks against the oracle vectors.
 *
 * Each gpu_* call is one dispatch of the kernel of the same name (it carries
 * the CPU function's name, and its formula, in kernels.metal and
 * ds4_cuda.cu).
 *
 * Memory. Everything a dispatch reads or writes again and again lives in
 * BACKEND memory, from gpu_alloc: the chunk's activations (`struct
 * chunk_work`, allocated through the backend's buffer_allocator), the
 * session's state (a device twin of every `struct layer_state`, kept in
 * `struct gpu_state` at s->device), and the routed experts' slot buffers.
 * On a discrete GPU that is device memory, which the host must not touch:
 * the host moves bytes only through gpu_upload, gpu_download, gpu_copy and
 * gpu_zero, which run in order with the dispatches. On unified memory
 * (Apple silicon, the emulators) it is plain memory and those four are
 * memcpy and memset. The weights stay in the mapped file; a discrete GPU
 * uploads them once (gpu_map_weights) and translates pointers into them.
 *
 * The host keeps what only the host uses: the counts (rows per store,
 * visible rows per token), the expert grouping of a long chunk, the logits
 * the caller reads. A dispatch may also be handed host memory (a token
 * list, a count array): it reads it when it is made, so the host may reuse
 * the array at once. The host waits only where it reads backend memory: the
 * logits and the chunk's last streams (head, end_chunk), the routing of
 * chunks longer than GPU_SLOT_TOKENS (the host sorts it by expert), and
 * chapter 9's journal and state copies. A decode token runs from embedding
 * to head without the host waiting.
 *
 * The session state on the host (6.2) is the layout every backend agrees
 * on; state_pull downloads the device twin into it, state_push uploads it
 * (6.13), so a snapshot written from one backend loads in another.
 * ------------------------------------------------------------------------- */

#ifdef DS4_GPU
int gpu_matmul(int type, const void *w, const float *x, float *y, unsigned in, unsigned out,
               unsigned n_tok, unsigned row_bytes, unsigned x_stride, unsigned y_stride);
int gpu_matmul_rows(int type, const void *w, const float *x, const int *x_rows, float *y,
                    const int *y_rows, unsigned in, unsigned out, unsigned n_tok,
                    unsigned row_bytes);
int gpu_matmul_experts(int type, const void *w, size_t expert_bytes, const int *sel,
                       const float *x, float *y, unsigned in, unsigned out, unsigned n_slots,
                       unsigned row_bytes, unsigned x_div);
void gpu_rmsnorm(const float *x, const float *w, float *y, unsigned n, unsigned n_rows, float eps);
void gpu_rope_tail(float *x, const float *freq, unsigned len, unsigned dims, unsigned n_heads,
                   unsigned n_tok, long pos0, int inverse);
void gpu_fp8_round_trip_nope(float *rows, unsigned len, unsigned rope_dims, unsigned n_rows);
void gpu_indexer_round_trip(float *rows, unsigned n, unsigned n_rows);
void gpu_hc_pre(const float *X, const float *raw_mix, const float *scale, const float *base,
                float *mix_out, float *y, unsigned hc, unsigned dim, unsigned iters,
                float norm_eps, float hc_eps, unsigned n_tok);
void gpu_hc_post(float *X, const float *f, const float *mix, unsigned hc, unsigned dim,
                 unsigned n_tok);
void gpu_hc_head_collapse(const float *X, const float *raw_mix, const float *scale,
                          const float *base, float *y, unsigned hc, unsigned dim,
                          float norm_eps, float hc_eps, unsigned n_tok);
void gpu_embed_tokens(const uint16_t *E, const int *tokens, float *out, unsigned dim,
                      unsigned n_tok);
void gpu_route_token(const float *logits, const int *tokens, const int *tid2eid,
                     const float *bias, float *biased, int *sel, float *wt, unsigned n_tok,
                     unsigned n_experts, unsigned n_used, float route_scale);
void gpu_swiglu(float *g, const float *u, const float *weight, unsigned ffn, unsigned n,
                float limit);
void gpu_moe_gather_add(float *G, const float *Y, const int *slot_of, unsigned dim,
                        unsigned n_used, unsigned n_tok);
void gpu_add_rows(float *y, const float *x, unsigned n, unsigned x_period);
void gpu_pool_channel(const float *kv, const float *score, float *pooled, unsigned ratio,
                      unsigned coff, unsigned dc);
void gpu_attend_one(const float *q, const float *chunk_kv, const float *ring, const float *comp,
                    const int64_t *visible, const int *sel, const int *n_sel, const float *sinks,
                    float *o, unsigned n_heads, unsigned head_dim, unsigned window, unsigned topk,
                    long p0, unsigned compressed, unsigned max_rows, unsigned n_tok);
void gpu_indexer_scores(const float *iq, const float *iw, const float *krows, float *score,
                        unsigned heads, unsigned dim, unsigned n_rows, unsigned max_rows,
                        float scale, unsigned n_tok);
void gpu_topk_rows(const float *score, int *sel, int *n_sel, unsigned n_tok, unsigned n_rows,
                   unsigned max_rows, unsigned k);
int gpu_available(void);   /* is there a device? (quietly; opens nothing) */
int gpu_open(void);   /* device, queue, pipelines; 0 on failure (it says why) */
void gpu_sync(void);  /* wait until every dispatch so far has completed */
/* --bench --profile: GPU time per kernel name over the dispatches between
 * begin and end, printed per token (CUDA: events around each launch). */
void gpu_profile_begin(void);
int gpu_profile_end(int tokens);   /* prints the table; returns the dispatches timed */
/* A mapped GGUF whose bytes the kernels will read: a discrete GPU (CUDA)
 * uploads it once and translates pointers into it; unified memory (Metal)
 * reads it in place. 0: not uploaded (the dispatches then copy). */
int gpu_map_weights(const void *base, size_t size);
/* Backend memory: zeroed; the program stops with a message when there is
 * none. The copies run in order with the dispatches; gpu_upload has read
 * `src` when it returns, gpu_download waits until `dst` holds the bytes. */
void *gpu_alloc(size_t bytes);
void gpu_free(void *p);
void gpu_upload(void *dst, const void *src, size_t bytes);
void gpu_download(void *dst, const void *src, size_t bytes);
void gpu_copy(void *dst, const void *src, size_t bytes);
void gpu_zero(void *dst, size_t bytes);

/* Which GPU implements the gpu_* calls: make cuda builds with "cuda". */
#ifndef DS4_GPU_NAME
#define DS4_GPU_NAME "metal"
#endif

/* Chunks of at most this many tokens run the routed experts slot by slot,
 * each slot reading its expert id on the GPU; longer chunks group their
 * tokens by expert on the host, so each expert's weights are read once per
 * tile of tokens. MTP verification (draft + 1 <= 4 tokens) stays below. */
enum { GPU_SLOT_TOKENS = 8 };

static const struct buffer_allocator gpu_buffers = { gpu_alloc, gpu_free };

/* The backend's own part of a session: the device twins of the layer
 * states ([n_layers] is the MTP block's), and working memory the CPU
 * backend does not need, sized for `T` tokens with chunk_work. */
struct gpu_state {
    struct layer_state *layers;   /* [n_layers + 1], device arrays, host counts */
    int T;                        /* capacity of the buffers below, in tokens */
    float *slot_gate, *slot_up;   /* [T*K][F] routed experts, one row per slot */
    float *slot_out;              /* [T*K][D] */
    int *identity;                /* [T*K] = 0, 1, 2, ...: slot i's output is row i */
    int *group_of;                /* [T*G] = i mod G: output group of slot i (6.8) */
    int *slot_token, *slot_list;  /* [T*K] grouped slots: their token, the slot itself */
    float *slot_weight;           /* [T*K] their route weights, in grouped order */
    float *bias;                  /* [T][2*max(Dh, DI)] compressor slot biases */
    float *biased;                /* [T][E] route_token's biased scores */
    float *score;                 /* [score_cap] the indexer's scores for one token */
    int64_t score_cap;
    /* host memory */
    int *route_sel_host;          /* [T*K] the routing, for the grouping */
    float *route_wt_host;         /* [T*K] */
    int *slot_token_host;         /* [T*K] */
    float *weight_host, *bias_host;     /* [T*K], [T][2*max(Dh, DI)] */
    int *n_sel_host;              /* [T] all -1: "every visible row" */
};

static struct gpu_state *gpu_state_of(const struct session *s) {
    return (struct gpu_state *)s->device;
}

/* The device twin of the layer a step runs. */
static struct layer_state *gpu_layer(const struct step *st) {
    const struct ds4_config *c = st->c;
    return &gpu_state_of(st->s)->layers[st->is_mtp ? c->n_layers : st->layer];
}

static size_t gpu_ring_bytes(const struct ds4_config *c) {
    return (size_t)c->window * c->head_dim * sizeof(float);
}

static size_t row_bytes_of(const struct row_store *rs, int64_t n) {
    return (size_t)n * (size_t)rs->width * sizeof(float);
}

/* A device twin with the host's shapes: ring and compressor frontiers
 * allocated, no compressed rows yet. */
static void gpu_layer_open(struct layer_state *d, const struct layer_state *h,
                           const struct ds4_config *c) {
    memset(d, 0, sizeof *d);
    d->ring = gpu_alloc(gpu_ring_bytes(c));
    d->comp_rows.width = h->comp_rows.width;
    d->idx_rows.width = h->idx_rows.width;
    d->comp = h->comp;
    d->idx_comp = h->idx_comp;
    if (h->comp.kv) d->comp.kv = gpu_alloc(frontier_floats(&h->comp) * sizeof(float));
    if (h->comp.kv) d->comp.score = gpu_alloc(frontier_floats(&h->comp) * sizeof(float));
    if (h->idx_comp.kv) d->idx_comp.kv = gpu_alloc(frontier_floats(&h->idx_comp) * sizeof(float));
    if (h->idx_comp.kv)
        d->idx_comp.score = gpu_alloc(frontier_floats(&h->idx_comp) * sizeof(float));
}

static void gpu_layer_close(struct layer_state *d) {
    void *all[] = { d->ring, d->comp_rows.rows, d->idx_rows.rows, d->comp.kv, d->comp.score,
                    d->idx_comp.kv, d->idx_comp.score };
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) gpu_free(all[i]);
    memset(d, 0, sizeof *d);
}

/* Room for n rows in a device row store; `keep` says whether the rows so
 * far must survive (an append) or are about to be overwritten (a push). */
static void gpu_rows_reserve(struct row_store *d, int64_t n, bool keep) {
    if (n <= d->cap) return;
    int64_t cap = d->cap ? d->cap : 64;
    while (cap < n) cap *= 2;
    float *rows = gpu_alloc(row_bytes_of(d, cap));
    if (keep && d->n) gpu_copy(rows, d->rows, row_bytes_of(d, d->n));
    gpu_free(d->rows);
    d->rows = rows;
    d->cap = cap;
}

/* row_store_append for a device twin: the count moves on the host copy too
 * (the host's rows stay stale until the next state_pull). */
static float *gpu_row_append(struct row_store *host, struct row_store *d) {
    gpu_rows_reserve(d, d->n + 1, true);
    host->n = d->n + 1;
    return d->rows + d->n++ * d->width;
}

static void gpu_rows_push(struct row_store *d, const struct row_store *h) {
    gpu_rows_reserve(d, h->n, false);
    if (h->n) gpu_upload(d->rows, h->rows, row_bytes_of(h, h->n));
    d->n = h->n;
}

static void gpu_rows_pull(struct row_store *h, const struct row_store *d) {
    if (d->n > h->cap) {
        h->cap = d->n;
        h->rows = xrealloc(h->rows, row_bytes_of(h, h->cap));
    }
    if (d->n) gpu_download(h->rows, d->rows, row_bytes_of(d, d->n));
    h->n = d->n;
}

static void gpu_frontier_move(struct compressor_state *to, const struct compressor_state *from,
                              bool up) {
    size_t bytes = frontier_floats(from) * sizeof(float);
    if (!bytes) return;
    (up ? gpu_upload : gpu_download)(to->kv, from->kv, bytes);
    (up ? gpu_upload : gpu_download)(to->score, from->score, bytes);
}

static void gpu_layer_push(struct layer_state *d, const struct layer_state *h,
                           const struct ds4_config *c) {
    gpu_upload(d->ring, h->ring, gpu_ring_bytes(c));
    gpu_rows_push(&d->comp_rows, &h->comp_rows);
    gpu_rows_push(&d->idx_rows, &h->idx_rows);
    gpu_frontier_move(&d->comp, &h->comp, true);
    gpu_frontier_move(&d->idx_comp, &h->idx_comp, true);
}

static void gpu_layer_pull(struct layer_state *h, const struct layer_state *d,
                           const struct ds4_config *c) {
    gpu_download(h->ring, d->ring, gpu_ring_bytes(c));
    gpu_rows_pull(&h->comp_rows, &d->comp_rows);
    gpu_rows_pull(&h->idx_rows, &d->idx_rows);
    gpu_frontier_move(&h->comp, &d->comp, false);
    gpu_frontier_move(&h->idx_comp, &d->idx_comp, false);
}

/* The host state of layer l (l = n_layers: the MTP block's). */
static struct layer_state *host_layer(struct session *s, int l) {
    return l < s->eng->model->cfg.n_layers ? &s->layers[l] : &s->mtp_state;
}

static void gpu_state_push(struct session *s) {
    const struct ds4_config *c = &s->eng->model->cfg;
    for (int l = 0; l <= c->n_layers; l++)
        gpu_layer_push(&gpu_state_of(s)->layers[l], host_layer(s, l), c);
}

static void gpu_state_pull(struct session *s) {
    const struct ds4_config *c = &s->eng->model->cfg;
    for (int l = 0; l <= c->n_layers; l++)
        gpu_layer_pull(host_layer(s, l), &gpu_state_of(s)->layers[l], c);
}

/* The device is opened with the first session; without one, nothing runs. */
static void gpu_session_open(struct session *s) {
    static int opened;
    const struct model *m = s->eng->model;
    const struct ds4_config *c = &m->cfg;
    if (!opened && !(opened = gpu_open())) {
        fprintf(stderr, "ds4: the %s backend has no usable device; try --backend cpu\n",
                DS4_GPU_NAME);
        exit(1);
    }
    gpu_map_weights(m->file.map, (size_t)m->file.size);
    if (m->has_mtp) gpu_map_weights(m->mtp_file.map, (size_t)m->mtp_file.size);
    s->work = xcalloc(1, sizeof *s->work);
    struct gpu_state *g = xcalloc(1, sizeof *g);
    g->layers = xcalloc((size_t)c->n_layers + 1, sizeof *g->layers);
    for (int l = 0; l <= c->n_layers; l++) gpu_layer_open(&g->layers[l], host_layer(s, l), c);
    s->device = g;
    gpu_state_push(s);
}

static void gpu_state_buffers_free(struct gpu_state *g) {
    void *dev[] = { g->slot_gate, g->slot_up, g->slot_out, g->identity, g->group_of,
                    g->slot_token, g->slot_list, g->slot_weight, g->bias, g->biased };
    void *host[] = { g->route_sel_host, g->route_wt_host, g->slot_token_host, g->weight_host,
                     g->bias_host, g->n_sel_host };
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) gpu_free(dev[i]);
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) free(host[i]);
}

static void gpu_session_close(struct session *s) {
    struct gpu_state *g = gpu_state_of(s);
    if (!g) return;
    const struct ds4_config *c = &s->eng->model->cfg;
    chunk_work_free(s->work, &gpu_buffers);
    free(s->work);
    s->work = NULL;
    for (int l = 0; l <= c->n_layers; l++) gpu_layer_close(&g->layers[l]);
    free(g->layers);
    gpu_state_buffers_free(g);
    gpu_free(g->score);
    free(g);
    s->device = NULL;
}

/* An index table [n] in backend memory: entry i = i mod period. */
static int *gpu_index_table(size_t n, size_t period) {
    int *host = xcalloc(n, sizeof(int));
    for (size_t i = 0; i < n; i++) host[i] = (int)(i % period);
    int *dev = gpu_alloc(n * sizeof(int));
    gpu_upload(dev, host, n * sizeof(int));
    free(host);
    return dev;
}

/* The backend's own buffers for chunks of up to T tokens. */
static void gpu_state_buffers_alloc(struct gpu_state *g, const struct ds4_config *c, int T) {
    size_t TK = (size_t)T * c->n_used, F = (size_t)c->ffn_dim, f = sizeof(float);
    size_t bias = (size_t)T * 2 * (c->head_dim > c->idx_dim ? c->head_dim : c->idx_dim);
    g->T = T;
    g->slot_gate = gpu_alloc(TK * F * f);
    g->slot_up = gpu_alloc(TK * F * f);
    g->slot_out = gpu_alloc(TK * (size_t)c->dim * f);
    g->slot_token = gpu_alloc(TK * sizeof(int));
    g->slot_list = gpu_alloc(TK * sizeof(int));
    g->slot_weight = gpu_alloc(TK * f);
    g->bias = gpu_alloc(bias * f);
    g->biased = gpu_alloc((size_t)T * c->n_experts * f);
    g->identity = gpu_index_table(TK, TK);
    g->group_of = gpu_index_table((size_t)T * c->o_groups, (size_t)c->o_groups);
    g->route_sel_host = xcalloc(TK, sizeof(int));
    g->route_wt_host = xcalloc(TK, f);
    g->slot_token_host = xcalloc(TK, sizeof(int));
    g->weight_host = xcalloc(TK, f);
    g->bias_host = xcalloc(bias, f);
    g->n_sel_host = xcalloc((size_t)T, sizeof(int));
    for (int t = 0; t < T; t++) g->n_sel_host[t] = -1;
}

/* chunk_work in backend memory, and the backend's own buffers, for T tokens. */
static void gpu_begin_chunk(struct step *st) {
    struct gpu_state *g = gpu_state_of(st->s);
    chunk_work_reserve(st->w, st->c, st->T, &gpu_buffers);
    if (st->T <= g->T) return;
    gpu_state_buffers_free(g);
    gpu_state_buffers_alloc(g, st->c, st->T);
}

/* y[t] = W x[t] for n tokens, contiguous rows: one matmul_<type> dispatch. */
static void gpu_mm(const struct matrix *m, const float *x, float *y, int n) {
    gpu_matmul((int)m->type, m->data, x, y, (unsigned)m->in, (unsigned)m->out, (unsigned)n,
               (unsigned)m->row_bytes, (unsigned)m->in, (unsigned)m->out);
}

/* The packed mixes hc_pre writes, [T][2n + n n], live in w->y's memory
 * ([T][D], larger than a packed mix; y is free between a collapse and its
 * expansion). */
static float *gpu_mixes(struct step *st) {
    return st->w->y;
}

/* X[t][h] = embed[tokens[t]] for every stream h. */
static void gpu_embed(struct step *st) {
    const struct ds4_config *c = st->c;
    int64_t nD = (int64_t)c->hc * c->dim;
    gpu_embed_tokens((const uint16_t *)st->eng->model->token_embd.data, st->tokens, st->w->f,
                     (unsigned)c->dim, (unsigned)st->T);
    gpu_zero(st->X, (size_t)st->T * nD * sizeof(float));
    for (int t = 0; t < st->T; t++)
        gpu_add_rows(st->X + t * nD, st->w->f + (size_t)t * c->dim, (unsigned)nD,
                     (unsigned)c->dim);
}

/* a = rmsnorm(hc_pre(fn . X), norm): matmul, hc_pre, rmsnorm. */
static void gpu_hc_collapse(struct step *st, enum sublayer which) {
    const struct ds4_config *c = st->c;
    const struct layer_weights *L = st->L;
    struct chunk_work *w = st->w;
    bool attn = which == SUBLAYER_ATTENTION;
    gpu_mm(attn ? &L->hc_attn_fn : &L->hc_ffn_fn, st->X, w->mix, st->T);
    gpu_hc_pre(st->X, w->mix, attn ? L->hc_attn_scale : L->hc_ffn_scale,
               attn ? L->hc_attn_base : L->hc_ffn_base, gpu_mixes(st), w->a, (unsigned)c->hc,
               (unsigned)c->dim, (unsigned)c->sinkhorn_iters, c->norm_eps, c->hc_eps,
               (unsigned)st->T);
    gpu_rmsnorm(w->a, attn ? L->attn_norm : L->ffn_norm, w->a, (unsigned)c->dim,
                (unsigned)st->T, c->norm_eps);
}

static void gpu_hc_expand(struct step *st) {
    gpu_hc_post(st->X, st->w->f, gpu_mixes(st), (unsigned)st->c->hc, (unsigned)st->c->dim,
                (unsigned)st->T);
}

/* The q path and the kv path of attention_project_qkv. */
static void gpu_project_qkv(struct step *st) {
    const struct ds4_config *c = st->c;
    const struct layer_weights *L = st->L;
    struct chunk_work *w = st->w;
    unsigned T = (unsigned)st->T, Dh = (unsigned)c->head_dim, H = (unsigned)c->n_heads;
    unsigned R = (unsigned)st->rope->dims;
    gpu_mm(&L->q_a, w->a, w->qr, st->T);
    gpu_rmsnorm(w->qr, L->q_a_norm, w->qr, (unsigned)c->q_rank, T, c->norm_eps);
    gpu_mm(&L->q_b, w->qr, w->q, st->T);
    gpu_rmsnorm(w->q, NULL, w->q, Dh, T * H, c->norm_eps);
    gpu_rope_tail(w->q, st->rope->freq, Dh, R, H, T, st->p0, 0);
    gpu_mm(&L->kv, w->a, w->kv, st->T);
    gpu_rmsnorm(w->kv, L->kv_norm, w->kv, Dh, T, c->norm_eps);
    gpu_rope_tail(w->kv, st->rope->freq, Dh, R, 1, T, st->p0, 0);
    gpu_fp8_round_trip_nope(w->kv, Dh, (unsigned)c->rope_dim, T);
}

/* compressor_push on a device frontier; true when a row finished. The
 * ratio-4 compressor's second half becomes its first (the overlap). */
static bool gpu_compressor_push(struct compressor_state *cs, const float *k, const float *z,
                                int64_t pos, float *pooled) {
    int r = cs->ratio, width = cs->coff * cs->dc;
    int slot = (cs->coff == 2 ? r : 0) + (int)(pos % r);
    gpu_copy(cs->kv + (size_t)slot * width, k, (size_t)width * sizeof(float));
    gpu_copy(cs->score + (size_t)slot * width, z, (size_t)width * sizeof(float));
    if ((pos + 1) % r != 0) return false;
    gpu_pool_channel(cs->kv, cs->score, pooled, (unsigned)r, (unsigned)cs->coff,
                     (unsigned)cs->dc);
    if (cs->coff == 2) {
        size_t half = (size_t)r * width;
        gpu_copy(cs->kv, cs->kv + half, half * sizeof(float));
        gpu_copy(cs->score, cs->score + half, half * sizeof(float));
    }
    return true;
}

/* finish_attention_row / finish_indexer_row: norm, RoPE at the row's first
 * token, then the round trip of its format. */
static void gpu_finish_row(struct step *st, const float *pooled, const float *norm, int width,
                           int64_t row_pos, bool indexer, float *row) {
    const struct ds4_config *c = st->c;
    const struct rope *rope = &st->eng->rope_compressed;
    gpu_rmsnorm(pooled, norm, row, (unsigned)width, 1, c->norm_eps);
    gpu_rope_tail(row, rope->freq, (unsigned)width, (unsigned)rope->dims, 1, 1, row_pos, 0);
    if (indexer) gpu_indexer_round_trip(row, (unsigned)width, 1);
    else gpu_fp8_round_trip_nope(row, (unsigned)width, (unsigned)c->rope_dim, 1);
}

/* z[t] += ape[(p0 + t) mod r]: the host decodes the chunk's bias rows, one
 * upload, one add. */
static void gpu_add_slot_bias(struct step *st, const struct matrix *ape, float *z, int width) {
    struct gpu_state *g = gpu_state_of(st->s);
    for (int t = 0; t < st->T; t++)
        matrix_row_f32(ape, (st->p0 + t) % ape->out, g->bias_host + (size_t)t * width);
    size_t n = (size_t)st->T * width;
    gpu_upload(g->bias, g->bias_host, n * sizeof(float));
    gpu_add_rows(z, g->bias, (unsigned)n, (unsigned)n);
}

/* journal_compressor_inputs, from device memory (chapter 9's rollback). */
static void gpu_journal(const struct step *st) {
    const struct chunk_work *w = st->w;
    struct compressor_journal *j = st->journal;
    int l = st->layer, r = st->L->ratio;
    size_t width = (size_t)compressor_coff(r) * st->c->head_dim * st->T * sizeof(float);
    size_t iwidth = 2 * (size_t)st->c->idx_dim * st->T * sizeof(float);
    gpu_download(j->k[l], w->ck, width);
    gpu_download(j->z[l], w->cz, width);
    if (r == 4) gpu_download(j->ik[l], w->ik, iwidth);
    if (r == 4) gpu_download(j->iz[l], w->iz, iwidth);
}

static void gpu_compress(struct step *st) {
    const struct layer_weights *L = st->L;
    struct layer_state *ls = st->st, *d = gpu_layer(st);
    struct chunk_work *w = st->w;
    int r = L->ratio, width = compressor_coff(r) * st->c->head_dim, iwidth = 2 * st->c->idx_dim;
    gpu_mm(&L->comp_kv, w->a, w->ck, st->T);
    gpu_mm(&L->comp_gate, w->a, w->cz, st->T);
    gpu_add_slot_bias(st, &L->comp_ape, w->cz, width);
    if (r == 4) {
        gpu_mm(&L->idx_kv, w->a, w->ik, st->T);
        gpu_mm(&L->idx_gate, w->a, w->iz, st->T);
        gpu_add_slot_bias(st, &L->idx_ape, w->iz, iwidth);
    }
    if (st->journal) gpu_journal(st);
    for (int t = 0; t < st->T; t++) {
        int64_t p = st->p0 + t;
        if (gpu_compressor_push(&d->comp, w->ck + (size_t)t * width, w->cz + (size_t)t * width,
                                p, w->pooled))
            gpu_finish_row(st, w->pooled, L->comp_norm, st->c->head_dim, p + 1 - r, false,
                           gpu_row_append(&ls->comp_rows, &d->comp_rows));
        if (r == 4 && gpu_compressor_push(&d->idx_comp, w->ik + (size_t)t * iwidth,
                                          w->iz + (size_t)t * iwidth, p, w->pooled))
            gpu_finish_row(st, w->pooled, L->idx_norm, st->c->idx_dim, p + 1 - r, true,
                           gpu_row_append(&ls->idx_rows, &d->idx_rows));
        w->visible[t] = ls->comp_rows.n;
    }
}

/* The indexer's score buffer holds one token's visible rows. */
static float *gpu_score_buffer(struct gpu_state *g, int64_t n) {
    if (n > g->score_cap) {
        gpu_free(g->score);
        g->score_cap = n > 2 * g->score_cap ? n : 2 * g->score_cap;
        g->score = gpu_alloc((size_t)g->score_cap * sizeof(float));
    }
    return g->score;
}

/* select_compressed_rows: the indexer's queries, scores and top-k. */
static void gpu_select(struct step *st) {
    const struct ds4_config *c = st->c;
    const struct layer_weights *L = st->L;
    struct chunk_work *w = st->w;
    struct gpu_state *g = gpu_state_of(st->s);
    unsigned T = (unsigned)st->T, HI = (unsigned)c->idx_heads, DI = (unsigned)c->idx_dim;
    gpu_upload(w->n_sel, g->n_sel_host, T * sizeof(int));
    if (L->ratio != 4 || w->visible[st->T - 1] <= c->idx_topk) return;
    const struct rope *rope = &st->eng->rope_compressed;
    gpu_mm(&L->idx_q_b, w->qr, w->iq, st->T);
    gpu_rope_tail(w->iq, rope->freq, DI, (unsigned)rope->dims, HI, T, st->p0, 0);
    gpu_indexer_round_trip(w->iq, DI, T * HI);
    gpu_mm(&L->idx_proj, w->a, w->iw, st->T);
    float *score = gpu_score_buffer(g, w->visible[st->T - 1]);
    const float *krows = gpu_layer(st)->idx_rows.rows;
    float scale = 1.0f / sqrtf((float)DI * (float)HI);
    for (int t = 0; t < st->T; t++) {
        unsigned nv = (unsigned)w->visible[t];
        if (nv <= (unsigned)c->idx_topk) continue;
        gpu_indexer_scores(w->iq + (size_t)t * HI * DI, w->iw + (size_t)t * HI, krows, score, HI,
                           DI, nv, nv, scale, 1);
        gpu_topk_rows(score, w->sel + (size_t)t * c->idx_topk, w->n_sel + t, 1, nv, nv,
                      (unsigned)c->idx_topk);
    }
}

/* The most compressed rows any token of the chunk attends to: all visible
 * ones, or the indexer's top-k of them. */
static int64_t gpu_most_rows(const struct step *st) {
    const struct ds4_config *c = st->c;
    int64_t most = 0;
    for (int t = 0; t < st->T && st->L->ratio > 0; t++) {
        int64_t n = st->w->visible[t];
        if (st->L->ratio == 4 && n > c->idx_topk) n = c->idx_topk;
        if (n > most) most = n;
    }
    return most;
}

/* attention_output's first half: low[t][g] = Wo_a[g] o[t][g] for the G head
 * groups. A short chunk runs it as one matmul_experts dispatch whose "experts"
 * are the groups (slot t G + g reads group g's rows and o[t][g]); a long one
 * as G matmuls, each reading its group's weights once per tile of tokens. */
static void gpu_output_groups(struct step *st) {
    const struct ds4_config *c = st->c;
    const struct matrix *wa = &st->L->out_a;
    struct chunk_work *w = st->w;
    unsigned T = (unsigned)st->T, G = (unsigned)c->o_groups, O = (unsigned)c->o_rank;
    unsigned HD = (unsigned)(c->n_heads * c->head_dim), group_in = HD / G;
    if (st->T <= GPU_SLOT_TOKENS) {
        gpu_matmul_experts((int)wa->type, wa->data, (size_t)O * wa->row_bytes,
                           gpu_state_of(st->s)->group_of, w->o, w->low, group_in, O, T * G,
                           (unsigned)wa->row_bytes, 1);
        return;
    }
    for (unsigned g = 0; g < G; g++)
        gpu_matmul((int)wa->type, matrix_row(wa, (int64_t)g * O), w->o + g * group_in,
                   w->low + g * O, group_in, O, T, (unsigned)wa->row_bytes, HD, G * O);
}

/* attend_chunk, the inverse RoPE, the ring update, attention_output. */
static void gpu_attend_and_project(struct step *st) {
    const struct ds4_config *c = st->c;
    const struct layer_weights *L = st->L;
    struct chunk_work *w = st->w;
    struct layer_state *d = gpu_layer(st);
    unsigned T = (unsigned)st->T, H = (unsigned)c->n_heads, Dh = (unsigned)c->head_dim;
    gpu_attend_one(w->q, w->kv, d->ring, d->comp_rows.rows, w->visible, w->sel, w->n_sel,
                   L->sinks, w->o, H, Dh, (unsigned)c->window, (unsigned)c->idx_topk, st->p0,
                   L->ratio > 0, (unsigned)(c->window + gpu_most_rows(st)), T);
    gpu_rope_tail(w->o, st->rope->freq, Dh, (unsigned)st->rope->dims, H, T, st->p0, 1);
    for (int t = st->T > c->window ? st->T - c->window : 0; t < st->T; t++)
        gpu_copy(d->ring + (size_t)((st->p0 + t) % c->window) * c->head_dim,
                 w->kv + (size_t)t * c->head_dim, (size_t)c->head_dim * sizeof(float));
    gpu_output_groups(st);
    gpu_mm(&L->out_b, w->low, w->f, st->T);
}

static void gpu_attention(struct step *st) {
    gpu_project_qkv(st);
    if (st->L->ratio > 0) {
        gpu_compress(st);
        gpu_select(st);
    }
    gpu_attend_and_project(st);
}

/* run_expert for the shared expert: gate and up matmuls, swiglu, down. */
static void gpu_shared_expert(struct step *st) {
    const struct layer_weights *L = st->L;
    struct chunk_work *w = st->w;
    gpu_mm(&L->gate_shexp, w->a, w->hg, st->T);
    gpu_mm(&L->up_shexp, w->a, w->hu, st->T);
    gpu_swiglu(w->hg, w->hu, NULL, (unsigned)L->gate_shexp.out, (unsigned)st->T,
               st->L->swiglu_limit);
    gpu_mm(&L->down_shexp, w->hg, w->ye, st->T);
}

static size_t expert_bytes(const struct matrix *stacked) {
    return (size_t)stacked->out * stacked->row_bytes;
}

/* The routed experts slot by slot: slot i = t K + k runs expert sel[i] on
 * token t, and its output is row i of slot_out. No host step. */
static void gpu_experts_by_slot(struct step *st) {
    const struct layer_weights *L = st->L;
    struct chunk_work *w = st->w;
    struct gpu_state *g = gpu_state_of(st->s);
    unsigned K = (unsigned)st->c->n_used, n = (unsigned)st->T * K;
    unsigned D = (unsigned)st->c->dim, F = (unsigned)L->gate_exps.out;
    const struct matrix *gate = &L->gate_exps, *up = &L->up_exps, *down = &L->down_exps;
    gpu_matmul_experts((int)gate->type, gate->data, expert_bytes(gate), w->route_sel, w->a,
                       g->slot_gate, D, F, n, (unsigned)gate->row_bytes, K);
    gpu_matmul_experts((int)up->type, up->data, expert_bytes(up), w->route_sel, w->a, g->slot_up,
                       D, F, n, (unsigned)up->row_bytes, K);
    gpu_swiglu(g->slot_gate, g->slot_up, w->route_wt, F, n, L->swiglu_limit);
    gpu_matmul_experts((int)down->type, down->data, expert_bytes(down), w->route_sel,
                       g->slot_gate, g->slot_out, F, D, n, (unsigned)down->row_bytes, 1);
}

/* The routed experts grouped by expert (HOST: download the routing, the
 * counting sort of group_by_expert, one upload of the groups). Expert e
 * reads its tokens' rows of a through slot_token and writes its outputs to
 * their slots' rows of slot_out through slot_list. */
static void gpu_experts_grouped(struct step *st) {
    const struct ds4_config *c = st->c;
    const struct layer_weights *L = st->L;
    struct chunk_work *w = st->w;
    struct gpu_state *g = gpu_state_of(st->s);
    int K = c->n_used, n = st->T * K;
    gpu_download(g->route_sel_host, w->route_sel, (size_t)n * sizeof(int));
    gpu_download(g->route_wt_host, w->route_wt, (size_t)n * sizeof(float));
    struct chunk_work grouped = { .route_sel = g->route_sel_host,
                                  .expert_tokens = w->expert_tokens,
                                  .expert_count = w->expert_count };
    group_by_expert(c, st->T, &grouped);
    for (int i = 0; i < n; i++) {
        int slot = w->expert_tokens[i];
        g->slot_token_host[i] = slot / K;
        g->weight_host[i] = g->route_wt_host[slot];
    }
    gpu_upload(g->slot_token, g->slot_token_host, (size_t)n * sizeof(int));
    gpu_upload(g->slot_list, w->expert_tokens, (size_t)n * sizeof(int));
    gpu_upload(g->slot_weight, g->weight_host, (size_t)n * sizeof(float));
    unsigned D = (unsigned)c->dim, F = (unsigned)L->gate_exps.out;
    for (int e = 0; e < c->n_experts; e++) {
        int begin = w->expert_count[e], m = w->expert_count[e + 1] - begin;
        if (m == 0) continue;
        struct matrix gate = expert_slice(&L->gate_exps, e), up = expert_slice(&L->up_exps, e);
        struct matrix down = expert_slice(&L->down_exps, e);
        gpu_matmul_rows((int)gate.type, gate.data, w->a, g->slot_token + begin, g->slot_gate,
                        NULL, D, F, (unsigned)m, (unsigned)gate.row_bytes);
        gpu_matmul_rows((int)up.type, up.data, w->a, g->slot_token + begin, g->slot_up, NULL, D,
                        F, (unsigned)m, (unsigned)up.row_bytes);
        gpu_swiglu(g->slot_gate, g->slot_up, g->slot_weight + begin, F, (unsigned)m,
                   L->swiglu_limit);
        gpu_matmul_rows((int)down.type, down.data, g->slot_gate, NULL, g->slot_out,
                        g->slot_list + begin, F, D, (unsigned)m, (unsigned)down.row_bytes);
    }
}

/* moe_chunk: router, route_token, the routed experts into slot_out, their
 * sum per token in slot order (the CPU adds them in expert order: the two
 * differ by rounding), then the shared expert. */
static void gpu_moe(struct step *st) {
    const struct ds4_config *c = st->c;
    const struct layer_weights *L = st->L;
    struct chunk_work *w = st->w;
    struct gpu_state *g = gpu_state_of(st->s);
    int E = c->n_experts, K = c->n_used, T = st->T;
    gpu_mm(&L->router, w->a, w->router, T);
    gpu_route_token(w->router, st->tokens, L->hash_routed ? L->tid2eid : NULL, L->router_bias,
                    g->biased, w->route_sel, w->route_wt, (unsigned)T, (unsigned)E, (unsigned)K,
                    c->route_scale);
    if (T <= GPU_SLOT_TOKENS) gpu_experts_by_slot(st);
    else gpu_experts_grouped(st);
    gpu_zero(w->f, (size_t)T * c->dim * sizeof(float));
    gpu_moe_gather_add(w->f, g->slot_out, g->identity, (unsigned)c->dim, (unsigned)K,
                       (unsigned)T);
    gpu_shared_expert(st);
    gpu_add_rows(w->f, w->ye, (unsigned)(T * c->dim), (unsigned)(T * c->dim));
}

/* head_chunk: matmul, hc_head_collapse, rmsnorm, the output matmul. The
 * logits are host memory: the dispatch that writes them waits. */
static void gpu_head(struct step *st, int64_t row0, int n, float *logits) {
    const struct model *m = st->eng->model;
    const struct ds4_config *c = st->c;
    struct chunk_work *w = st->w;
    int64_t nD = (int64_t)c->hc * c->dim;
    const float *X = st->X + row0 * nD;
    gpu_mm(st->is_mtp ? &m->mtp.hc_head_fn : &m->hc_head_fn, X, w->mix, n);
    gpu_hc_head_collapse(X, w->mix, st->is_mtp ? m->mtp.hc_head_scale : m->hc_head_scale,
                         st->is_mtp ? m->mtp.hc_head_base : m->hc_head_base, w->a,
                         (unsigned)c->hc, (unsigned)c->dim, c->norm_eps, c->hc_eps, (unsigned)n);
    gpu_rmsnorm(w->a, st->is_mtp ? m->mtp.norm : m->output_norm, w->a, (unsigned)c->dim,
                (unsigned)n, c->norm_eps);
    gpu_mm(&m->output, w->a, logits, n);
    gpu_sync();                               /* the caller reads the logits */
}

/* mtp_input: Xm[i][h] = Wh . rmsnorm(Hin_i[h], hnorm) + We . rmsnorm(embed[tok_i], enorm).
 * hin0 is s->last_hc (host) or a row of backend streams. */
static void gpu_mtp_input(struct step *st, const float *hin0, const float *hin_next) {
    const struct mtp_weights *mw = &st->eng->model->mtp;
    const struct ds4_config *c = st->c;
    struct chunk_work *w = st->w;
    unsigned n = (unsigned)c->hc, D = (unsigned)c->dim, Tm = (unsigned)st->T;
    int64_t nD = (int64_t)n * D;
    gpu_embed_tokens((const uint16_t *)st->eng->model->token_embd.data, st->tokens, w->y, D, Tm);
    gpu_rmsnorm(w->y, mw->enorm, w->y, D, Tm, c->norm_eps);
    gpu_rmsnorm(hin0, mw->hnorm, w->hn, D, n, c->norm_eps);
    if (Tm > 1) gpu_rmsnorm(hin_next, mw->hnorm, w->hn + nD, D, (Tm - 1) * n, c->norm_eps);
    gpu_mm(&mw->e_proj, w->y, w->f, (int)Tm);
    gpu_mm(&mw->h_proj, w->hn, st->X, (int)(Tm * n));
    for (unsigned i = 0; i < Tm; i++)
        gpu_add_rows(st->X + i * nD, w->f + (size_t)i * D, (unsigned)nD, D);
}

/* cpu_end_chunk from device streams. */
static void gpu_end_chunk(struct step *st) {
    int64_t nD = (int64_t)st->c->hc * st->c->dim;
    if (st->req && st->req->all_hc)
        gpu_download(st->req->all_hc, st->X, (size_t)st->T * nD * sizeof(float));
    gpu_download(st->s->last_hc, st->X + (st->T - 1) * nD, (size_t)nD * sizeof(float));
}

static const struct backend gpu_backend = {
    .name = DS4_GPU_NAME,
    .session_open = gpu_session_open,
    .session_close = gpu_session_close,
    .state_pull = gpu_state_pull,
    .state_push = gpu_state_push,
    .begin_chunk = gpu_begin_chunk,
    .embed = gpu_embed,
    .hc_collapse = gpu_hc_collapse,
    .attention = gpu_attention,
    .hc_expand = gpu_hc_expand,
    .moe = gpu_moe,
    .head = gpu_head,
    .mtp_input = gpu_mtp_input,
    .end_chunk = gpu_end_chunk,
};
#endif /* DS4_GPU */

/* --backend NAME. The GPU backends are known by name, so that asking for one
 * in a binary built without it says so instead of "unknown". */
static const struct backend *backend_by_name(const char *name, struct ds4_error *e) {
    if (strcmp(name, "cpu") == 0) return &cpu_backend;
#ifdef DS4_GPU
    if (strcmp(name, gpu_backend.name) == 0) return &gpu_backend;
#endif
    if (strcmp(name, "cuda") == 0 || strcmp(name, "metal") == 0) {
        fail(e, "backend '%s' is not built into this binary (built with: cpu)", name);
        return NULL;
    }
    fail(e, "unknown backend '%s' (cpu, cuda or metal)", name);
    return NULL;
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
 *
 * Every step goes through the session's backend (6.13), so this chapter is
 * the same story whichever backend runs it; it owns no arrays of its own.
 * ------------------------------------------------------------------------- */

/* Source. This is Transformer.forward of [MODEL] (embed, copy into hc_mult
 * streams, the blocks, ParallelHead) run over a chunk, with the state of
 * [FWD §9] carried between calls; MTPBlock.forward supplies the MTP rows. */

/* One block through the table: the two sublayers of 6.10. */
static void run_block(const struct backend *be, struct step *st) {
    be->hc_collapse(st, SUBLAYER_ATTENTION);
    be->attention(st);
    be->hc_expand(st);
    be->hc_collapse(st, SUBLAYER_FFN);
    be->moe(st);
    be->hc_expand(st);
}

/* The step context of a chunk; the block fields are filled per block. */
static struct step step_for_chunk(struct session *s, const int32_t *tokens, int64_t p0, int T,
                                  const struct forward_request *req) {
    struct step st = { .eng = s->eng, .c = &s->eng->model->cfg, .s = s, .w = s->work,
                       .req = req, .tokens = tokens, .p0 = p0, .T = T };
    return st;
}

static void step_at_layer(struct step *st, int l) {
    const struct model *m = st->eng->model;
    st->layer = l;
    st->is_mtp = false;
    st->L = &m->layers[l];
    st->st = &st->s->layers[l];
    st->rope = layer_rope(st->eng, st->L);
    st->X = st->w->x;
    st->journal = st->req ? st->req->journal : NULL;
}

/* The MTP block's step: Tm rows from position s->mtp_pos, on its own streams. */
static struct step step_for_mtp(struct session *s, const int32_t *tokens, int Tm,
                                const struct forward_request *req) {
    struct step ms = step_for_chunk(s, tokens, s->mtp_pos, Tm, req);
    ms.layer = -1;
    ms.is_mtp = true;
    ms.L = &s->eng->model->mtp.block;
    ms.st = &s->mtp_state;
    ms.rope = layer_rope(s->eng, ms.L);
    ms.X = ms.w->xm;
    return ms;
}

/* MTP rows for positions p0-1 .. p0+T-2 (those >= 0). The main streams of
 * the chunk are in main->X; s->last_hc holds those of position p0-1. */
static void mtp_step(const struct backend *be, const struct step *main) {
    struct session *s = main->s;
    int first = main->p0 == 0 ? 1 : 0, Tm = main->T - first;
    int64_t nD = (int64_t)main->c->hc * main->c->dim;
    if (Tm <= 0) return;
    struct step ms = step_for_mtp(s, main->tokens + first, Tm, main->req);
    /* Row p0-1 reads the streams saved from the last call; the others this chunk's. */
    if (first == 0) be->mtp_input(&ms, s->last_hc, main->X);
    else be->mtp_input(&ms, main->X, main->X + nD);
    run_block(be, &ms);
    if (main->req && main->req->mtp_logits)
        be->head(&ms, 0, Tm, main->req->mtp_logits + (size_t)first * main->c->vocab);
    s->mtp_pos += Tm;
}

static bool check_chunk(const struct ds4_config *c, const int32_t *tokens, int T,
                        struct ds4_error *e) {
    if (T < 1) return fail(e, "nothing to process (empty chunk)");
    for (int t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= c->vocab)
            return fail(e, "token id %d at chunk offset %d is outside the vocabulary (0..%d)",
                        tokens[t], t, c->vocab - 1);
    return true;
}

static bool session_forward(struct session *s, const int32_t *tokens, int T,
                            const struct forward_request *req, struct ds4_error *e) {
    const struct backend *be = s->eng->be;
    const struct model *m = s->eng->model;
    const struct ds4_config *c = &m->cfg;
    if (!check_chunk(c, tokens, T, e)) return false;
    struct step st = step_for_chunk(s, tokens, s->pos, T, req);
    be->begin_chunk(&st);

    /* Embedding: every stream starts as the same copy of the token's row. */
    st.X = st.w->x;
    be->embed(&st);

    /* The layers. */
    for (int l = 0; l < c->n_layers; l++) {
        step_at_layer(&st, l);
        run_block(be, &st);
    }

    /* The head: every row if asked (the checker wants them), else the last. */
    if (req && req->all_logits) {
        be->head(&st, 0, T, req->all_logits);
        memcpy(s->logits, req->all_logits + (size_t)(T - 1) * c->vocab,
               (size_t)c->vocab * sizeof(float));
    } else {
        be->head(&st, T - 1, 1, s->logits);
    }

    /* The MTP block runs one position behind, fed by these streams. */
    if (m->has_mtp) mtp_step(be, &st);
    be->end_chunk(&st);
    s->pos += T;
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

/* Sources. The filters are the usual ones of the APIs the server speaks
 * [API §1.3]; top-p is the nucleus of Holtzman et al. [NUCLEUS]. */

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
    float *dist;          /* [vocab] the distribution of the last draw */
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
    sp->dist = xmalloc((size_t)vocab * sizeof(float));
}

static void sampler_free(struct sampler *sp) {
    free(sp->order);
    free(sp->prob);
    free(sp->dist);
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

/* The distribution the sampler draws from, written into dist[vocab]:
 * filtered tokens get 0, the rest sum to 1. At temperature 0 it is one-hot
 * at the argmax. Speculative sampling needs the distribution itself, not
 * just a draw from it (chapter 9). */
static void sampler_distribution(struct sampler *sp, const float *logits, int vocab, float *dist) {
    const struct sampler_options *o = &sp->opt;
    if (o->temperature <= 0) {
        memset(dist, 0, (size_t)vocab * sizeof(float));
        dist[argmax(logits, vocab)] = 1.0f;
        return;
    }
    float mx = logits[argmax(logits, vocab)];
    for (int i = 0; i < vocab; i++) sp->prob[i] = expf((logits[i] - mx) / o->temperature);
    /* Unnormalised, the most likely token has weight exactly 1, so the min_p
     * floor "min_p * max_j p_j" is simply min_p. */
    int n = 0;
    for (int i = 0; i < vocab; i++)
        if (sp->prob[i] >= o->min_p) sp->order[n++] = i;
    sort_probs = sp->prob;
    qsort(sp->order, (size_t)n, sizeof(int), by_prob_desc);
    if (o->top_k > 0 && n > o->top_k) n = o->top_k;
    if (o->top_p > 0 && o->top_p < 1) {
        double total = 0, mass = 0;
        for (int i = 0; i < n; i++) total += sp->prob[sp->order[i]];
        int cut = 0;
        while (cut < n && mass < o->top_p * total) mass += sp->prob[sp->order[cut++]];
        n = cut;
    }
    double kept = 0;
    for (int i = 0; i < n; i++) kept += sp->prob[sp->order[i]];
    memset(dist, 0, (size_t)vocab * sizeof(float));
    for (int i = 0; i < n; i++) dist[sp->order[i]] = (float)(sp->prob[sp->order[i]] / kept);
}

/* One draw from a distribution (entries summing to ~1). */
static int draw_token(const float *dist, int vocab, uint64_t *state) {
    double r = random_unit(state), acc = 0;
    int last = 0;
    for (int i = 0; i < vocab; i++) {
        if (dist[i] <= 0) continue;
        acc += dist[i];
        last = i;
        if (r < acc) return i;
    }
    return last;     /* rounding left r just above the total */
}

static int sample_token(struct sampler *sp, const float *logits, int vocab) {
    if (sp->opt.temperature <= 0) return argmax(logits, vocab);
    sampler_distribution(sp, logits, vocab, sp->dist);
    return draw_token(sp->dist, vocab, &sp->state);
}

/* ============================================================================
 * Chapter 9. Speculative decoding with the MTP block
 * ============================================================================
 *
 * Decode reads every weight to produce one token. Verifying several tokens
 * at once costs barely more, since the weights are read once for all of
 * them. The MTP block guesses ("drafts") the next tokens cheaply; the main
 * model then checks them all in one chunk and keeps the longest prefix it
 * agrees with:
 *
 *   session at P, next token t_P already chosen from the main logits
 *   draft:  d_1 = MTP(H_{P-1}, t_P)          at position P-1
 *           d_j = MTP(X_{j-1}, d_{j-1})      chaining on the MTP's own streams
 *   verify: main forward of [t_P, d_1 .. d_n] at P .. P+n   (one chunk)
 *   accept: greedy -- d_j survives while it equals the main argmax before it;
 *           sampling -- d_j survives with probability min(1, p(d_j)/q(d_j)),
 *           and the first rejection resamples from norm(max(0, p - q)).
 *   roll the session back to just after the last kept token.
 *
 * The acceptance rule makes the output distribution exactly the main
 * model's [SPEC] [SPEC2]; in greedy mode the
 * tokens are identical to plain decoding, because a verification of up to
 * MATMUL_DECODE_PATH_MAX_TOKENS tokens runs the same arithmetic as decode.
 *
 * Rolling back. A verification changes: the window ring slots of its
 * positions, the compressed-row counts, the compressor frontiers, the MTP
 * ring, the final streams and logits. A checkpoint taken before it holds
 * the old ring slots, counts and frontiers; the verification journals each
 * token's compressor inputs; the rollback restores the checkpoint and
 * replays the accepted tokens' compressor inputs, which re-emits exactly the
 * rows they emitted.
 * ------------------------------------------------------------------------- */

/* Sources. The draft model is the MTP block [V3 §2.2] [MTP] (6.12); the
 * verification and the acceptance rule are [SPEC] and [SPEC2]. */

struct spec_options {
    int draft;               /* drafted tokens per step, 0 = plain decoding */
    float gate;              /* stop drafting below this MTP top-1 probability */
};

struct spec_stats {
    int64_t main_forwards;   /* forward calls of the main model */
    int64_t drafted, accepted, emitted;
    double cpu_seconds;          /* process CPU time of the decode (the bench fills it) */
    int64_t heap_allocations;    /* allocations during the decode (the bench fills it) */
};

struct checkpoint {
    int64_t pos, mtp_pos;
    int span;                  /* positions pos .. pos+span-1 may be taken back */
    float *ring;               /* [layers][span][Dh] ring slots before the change */
    float *mtp_ring;           /* [span][Dh] MTP slots of rows pos-1 .. pos+span-2 */
    int64_t *comp_n, *idx_n;   /* [layers] row counts */
    float **frontier;          /* [layers] comp kv|score then idx kv|score */
};

/* Room for checkpoints of up to `span` positions, allocated once (the
 * generator keeps two and reuses them every step). Drafting touches only the
 * MTP ring; a verification touches everything: `with_layers` says whether
 * the main layers' state is saved too. */
static void checkpoint_alloc(struct checkpoint *cp, const struct session *s, int span,
                             bool with_layers) {
    const struct ds4_config *c = &s->eng->model->cfg;
    int L = with_layers ? c->n_layers : 0, Dh = c->head_dim;
    memset(cp, 0, sizeof *cp);
    cp->span = span;
    cp->mtp_ring = xmalloc((size_t)span * Dh * sizeof(float));
    if (!with_layers) return;
    cp->ring = xmalloc((size_t)L * span * Dh * sizeof(float));
    cp->comp_n = xmalloc((size_t)L * sizeof(int64_t));
    cp->idx_n = xmalloc((size_t)L * sizeof(int64_t));
    cp->frontier = xcalloc((size_t)L, sizeof(float *));
    for (int l = 0; l < L; l++) {
        const struct layer_state *st = &s->layers[l];
        size_t fc = frontier_floats(&st->comp), fi = frontier_floats(&st->idx_comp);
        cp->frontier[l] = xmalloc((2 * (fc + fi) + 1) * sizeof(float));
    }
}

/* Save the state `span` (<= the allocated span) positions may change, into
 * a checkpoint from checkpoint_alloc with the same `with_layers`. */
static void checkpoint_save(struct checkpoint *cp, const struct session *s, int span) {
    const struct ds4_config *c = &s->eng->model->cfg;
    int L = cp->ring ? c->n_layers : 0, W = c->window, Dh = c->head_dim;
    cp->pos = s->pos;
    cp->mtp_pos = s->mtp_pos;
    cp->span = span;
    for (int l = 0; l < L; l++) {
        const struct layer_state *st = &s->layers[l];
        for (int i = 0; i < span; i++)
            memcpy(cp->ring + ((size_t)l * span + i) * Dh,
                   st->ring + (size_t)((s->pos + i) % W) * Dh, (size_t)Dh * sizeof(float));
        cp->comp_n[l] = st->comp_rows.n;
        cp->idx_n[l] = st->idx_rows.n;
        size_t fc = frontier_floats(&st->comp), fi = frontier_floats(&st->idx_comp);
        float *f = cp->frontier[l];
        if (fc) {   /* a window-only layer has no frontier (and NULL arrays) */
            memcpy(f, st->comp.kv, fc * sizeof(float));
            memcpy(f + fc, st->comp.score, fc * sizeof(float));
        }
        if (fi) {
            memcpy(f + 2 * fc, st->idx_comp.kv, fi * sizeof(float));
            memcpy(f + 2 * fc + fi, st->idx_comp.score, fi * sizeof(float));
        }
    }
    for (int i = 0; i < span; i++) {
        int64_t row = s->pos - 1 + i;
        if (row >= 0)
            memcpy(cp->mtp_ring + (size_t)i * Dh, s->mtp_state.ring + (size_t)(row % W) * Dh,
                   (size_t)Dh * sizeof(float));
    }
}

/* A one-off checkpoint: allocate and save. */
static void checkpoint_take(struct checkpoint *cp, const struct session *s, int span,
                            bool with_layers) {
    checkpoint_alloc(cp, s, span, with_layers);
    checkpoint_save(cp, s, span);
}

static void checkpoint_free(struct checkpoint *cp, int n_layers) {
    for (int l = 0; cp->frontier && l < n_layers; l++) free(cp->frontier[l]);
    free(cp->frontier);
    free(cp->ring);
    free(cp->mtp_ring);
    free(cp->comp_n);
    free(cp->idx_n);
}

/* Put back the MTP ring slots of rows >= first_row, and the MTP count. */
static void restore_mtp(struct session *s, const struct checkpoint *cp, int64_t first_row) {
    const struct ds4_config *c = &s->eng->model->cfg;
    for (int i = 0; i < cp->span; i++) {
        int64_t row = cp->pos - 1 + i;
        if (row >= first_row && row >= 0)
            memcpy(s->mtp_state.ring + (size_t)(row % c->window) * c->head_dim,
                   cp->mtp_ring + (size_t)i * c->head_dim, (size_t)c->head_dim * sizeof(float));
    }
    s->mtp_pos = first_row;
}

/* Restore layer l's compressors to the checkpoint, then replay the first
 * `keep` journaled tokens through them. */
static void replay_compressors(struct session *s, const struct checkpoint *cp,
                               const struct compressor_journal *j, int l, int keep, float *pooled) {
    struct engine *eng = s->eng;
    const struct layer_weights *L = &eng->model->layers[l];
    struct layer_state *st = &s->layers[l];
    size_t fc = frontier_floats(&st->comp), fi = frontier_floats(&st->idx_comp);
    const float *f = cp->frontier[l];
    memcpy(st->comp.kv, f, fc * sizeof(float));
    memcpy(st->comp.score, f + fc, fc * sizeof(float));
    if (fi) {   /* ratio-128 layers have no indexer compressor */
        memcpy(st->idx_comp.kv, f + 2 * fc, fi * sizeof(float));
        memcpy(st->idx_comp.score, f + 2 * fc + fi, fi * sizeof(float));
    }
    st->comp_rows.n = cp->comp_n[l];
    st->idx_rows.n = cp->idx_n[l];
    int r = L->ratio, width = compressor_coff(r) * eng->model->cfg.head_dim;
    int iwidth = 2 * eng->model->cfg.idx_dim;
    for (int i = 0; i < keep; i++) {
        int64_t p = cp->pos + i;
        if (compressor_push(&st->comp, j->k[l] + (size_t)i * width, j->z[l] + (size_t)i * width, p,
                            pooled))
            finish_attention_row(eng, L, pooled, p + 1 - r, row_store_append(&st->comp_rows));
        if (r == 4 && compressor_push(&st->idx_comp, j->ik[l] + (size_t)i * iwidth,
                                      j->iz[l] + (size_t)i * iwidth, p, pooled))
            finish_indexer_row(eng, L, pooled, p + 1 - r, row_store_append(&st->idx_rows));
    }
}

/* Take back everything after the first `keep` tokens of a verification
 * that started at the checkpoint. all_logits/all_hc are its outputs. */
static void session_rollback(struct session *s, const struct checkpoint *cp,
                             const struct compressor_journal *j, int keep,
                             const float *all_logits, const float *all_hc) {
    const struct ds4_config *c = &s->eng->model->cfg;
    int W = c->window, Dh = c->head_dim;
    int64_t n_d = (int64_t)c->hc * c->dim, new_pos = cp->pos + keep;
    float *pooled = s->work->tmp;   /* [n*D] >= [Dh], host memory idle between forwards */
    for (int l = 0; l < c->n_layers; l++) {
        for (int i = keep; i < cp->span && cp->pos + i < s->pos; i++)
            memcpy(s->layers[l].ring + (size_t)((cp->pos + i) % W) * Dh,
                   cp->ring + ((size_t)l * cp->span + i) * Dh, (size_t)Dh * sizeof(float));
        if (c->ratio[l] > 0) replay_compressors(s, cp, j, l, keep, pooled);
    }
    if (s->eng->model->has_mtp) restore_mtp(s, cp, new_pos - 1);
    memcpy(s->last_hc, all_hc + (keep - 1) * n_d, (size_t)n_d * sizeof(float));
    memcpy(s->logits, all_logits + (size_t)(keep - 1) * c->vocab, (size_t)c->vocab * sizeof(float));
    s->pos = new_pos;
}

static void journal_init(struct compressor_journal *j, const struct ds4_config *c, int T) {
    int L = c->n_layers;
    j->k = xcalloc((size_t)L, sizeof(float *));
    j->z = xcalloc((size_t)L, sizeof(float *));
    j->ik = xcalloc((size_t)L, sizeof(float *));
    j->iz = xcalloc((size_t)L, sizeof(float *));
    for (int l = 0; l < L; l++) {
        if (c->ratio[l] == 0) continue;
        size_t width = (size_t)compressor_coff(c->ratio[l]) * c->head_dim,
               iw = 2 * (size_t)c->idx_dim;
        j->k[l] = xmalloc((size_t)T * width * sizeof(float));
        j->z[l] = xmalloc((size_t)T * width * sizeof(float));
        if (c->ratio[l] == 4) {
            j->ik[l] = xmalloc((size_t)T * iw * sizeof(float));
            j->iz[l] = xmalloc((size_t)T * iw * sizeof(float));
        }
    }
}

static void journal_free(struct compressor_journal *j, int n_layers) {
    for (int l = 0; l < n_layers; l++) {
        free(j->k[l]);
        free(j->z[l]);
        free(j->ik[l]);
        free(j->iz[l]);
    }
    free(j->k);
    free(j->z);
    free(j->ik);
    free(j->iz);
}

/* ----------------------------------------------------------------------------
 * Drafting: the MTP block run on its own outputs.
 * ------------------------------------------------------------------------- */

/* One MTP row at ms->p0: streams `hin` [n*D] and the token ms->tokens[0]
 * in, the block's output streams (ms->X) and logits [V] out. */
static void mtp_row(const struct backend *be, struct step *ms, const float *hin, float *logits) {
    be->mtp_input(ms, hin, NULL);
    run_block(be, ms);
    be->head(ms, 0, 1, logits);
}

/* Probability of the most likely token under plain softmax (the gate). */
static float top1_probability(const float *logits, int V) {
    float mx = logits[argmax(logits, V)];
    double sum = 0;
    for (int i = 0; i < V; i++) sum += exp((double)logits[i] - mx);
    return (float)(1.0 / sum);
}

struct generator;
/* A drafter proposes up to spec.draft tokens after `first`, writes their
 * draft distributions to g->q, and returns how many. The MTP block is the
 * real one; tests plug in drafters that are right or wrong on purpose. */
typedef int (*drafter_fn)(struct generator *g, int32_t first, int32_t *drafts);

struct generator {
    struct session *s;
    struct sampler *sp;
    struct spec_options spec;
    struct spec_stats stats;
    drafter_fn drafter;      /* draft_tokens unless a test replaces it */
    void *drafter_ctx;
    float *q;                /* [draft][V] draft distributions */
    float *p;                /* [V] target distribution */
    float *draft_logits;     /* [V] the MTP block's logits while drafting */
    /* A step's verification state, allocated once for draft+1 positions. */
    int n_layers;
    struct checkpoint draft_cp, verify_cp;
    struct compressor_journal journal;
    float *all_logits;       /* [draft+1][V] */
    float *all_hc;           /* [draft+1][n*D] */
    bool have_residual;      /* the next token comes from `p`, a residual */
};

/* Draft up to spec.draft tokens after `first`; returns how many. The MTP
 * state is left exactly as it was. */
static int draft_tokens(struct generator *g, int32_t first, int32_t *drafts) {
    struct session *s = g->s;
    const struct backend *be = s->eng->be;
    int V = s->eng->model->cfg.vocab, K = g->spec.draft;
    float *logits = g->draft_logits;
    be->state_pull(s);
    struct checkpoint *cp = &g->draft_cp;
    checkpoint_save(cp, s, K + 1);
    int32_t token = first;
    struct step ms = step_for_mtp(s, &token, 1, NULL);
    be->begin_chunk(&ms);
    /* Row n reads the streams row n-1 wrote, so two stream buffers take
     * turns: the MTP's own and the main model's, idle between forwards. */
    float *streams[2] = { ms.w->xm, ms.w->x };
    const float *hin = s->last_hc;
    int n = 0;
    for (; n < K; n++) {
        ms.p0 = s->pos - 1 + n;
        ms.X = streams[n % 2];
        mtp_row(be, &ms, hin, logits);
        if (top1_probability(logits, V) < g->spec.gate) break;
        float *q = g->q + (size_t)n * V;
        sampler_distribution(g->sp, logits, V, q);
        drafts[n] =
            g->sp->opt.temperature <= 0 ? argmax(logits, V) : draw_token(q, V, &g->sp->state);
        token = drafts[n];
        hin = ms.X;
    }
    restore_mtp(s, cp, s->pos - 1);
    s->mtp_pos = cp->mtp_pos;
    be->state_push(s);
    return n;
}

static void generator_init(struct generator *g, struct session *s, struct sampler *sp,
                           struct spec_options spec) {
    memset(g, 0, sizeof *g);
    const struct ds4_config *c = &s->eng->model->cfg;
    if (!s->eng->model->has_mtp) spec.draft = 0;
    /* A verification chunk must fit the window ring and the decode kernel path. */
    int most = MATMUL_DECODE_PATH_MAX_TOKENS - 1 < c->window - 1 ? MATMUL_DECODE_PATH_MAX_TOKENS - 1
                                                                 : c->window - 1;
    if (spec.draft > most) spec.draft = most;
    g->s = s;
    g->sp = sp;
    g->spec = spec;
    g->q = xmalloc((size_t)(spec.draft > 0 ? spec.draft : 1) * c->vocab * sizeof(float));
    g->p = xmalloc((size_t)c->vocab * sizeof(float));
    g->draft_logits = xmalloc((size_t)c->vocab * sizeof(float));
    g->drafter = draft_tokens;
    if (spec.draft == 0) return;
    int T = spec.draft + 1;
    g->n_layers = c->n_layers;
    checkpoint_alloc(&g->draft_cp, s, T, false);
    checkpoint_alloc(&g->verify_cp, s, T, true);
    journal_init(&g->journal, c, T);
    g->all_logits = xmalloc((size_t)T * c->vocab * sizeof(float));
    g->all_hc = xmalloc((size_t)T * c->hc * c->dim * sizeof(float));
}

static void generator_free(struct generator *g) {
    free(g->q);
    free(g->p);
    free(g->draft_logits);
    if (g->spec.draft > 0) {
        int L = g->n_layers;
        checkpoint_free(&g->draft_cp, L);
        checkpoint_free(&g->verify_cp, L);
        journal_free(&g->journal, L);
        free(g->all_logits);
        free(g->all_hc);
    }
}

/* Speculative sampling's acceptance test for draft token d with target p and
 * draft q: accept with probability min(1, p[d]/q[d]); on rejection, turn p
 * into the residual norm(max(0, p - q)) to draw the replacement from. */
static bool accept_draft(float *p, const float *q, int d, int V, uint64_t *state) {
    if (q[d] > 0 && random_unit(state) * q[d] < p[d]) return true;
    double total = 0;
    for (int i = 0; i < V; i++) total += p[i] = fmaxf(p[i] - q[i], 0.0f);
    if (total <= 0) return true;      /* p == q: rejection has probability 0 */
    for (int i = 0; i < V; i++) p[i] = (float)(p[i] / total);
    return false;
}

/* Count the drafts the main model keeps (greedy or sampled). */
static int count_accepted(struct generator *g, const int32_t *drafts, int n,
                          const float *all_logits) {
    int V = g->s->eng->model->cfg.vocab;
    for (int i = 0; i < n; i++) {
        const float *logits = all_logits + (size_t)i * V;
        if (g->sp->opt.temperature <= 0) {
            if (drafts[i] != argmax(logits, V)) return i;
            continue;
        }
        sampler_distribution(g->sp, logits, V, g->p);
        if (!accept_draft(g->p, g->q + (size_t)i * V, drafts[i], V, &g->sp->state)) {
            g->have_residual = true;
            return i;
        }
    }
    return n;
}

/* A model with broken weights (or hyper-parameters that slipped past
 * Chapter 4) makes NaN or infinite logits, and argmax over NaN picks token 0
 * forever. Generation stops with an error instead of printing such tokens.
 * One pass over the vocabulary per step: noise next to the forward pass. */
static bool logits_finite(const float *logits, int n) {
    for (int i = 0; i < n; i++)
        if (!isfinite(logits[i])) return false;
    return true;
}

/* Choose the next token from the session's logits (or a pending residual). */
static int32_t generator_choose(struct generator *g) {
    int V = g->s->eng->model->cfg.vocab;
    if (g->have_residual) {
        g->have_residual = false;
        return draw_token(g->p, V, &g->sp->state);
    }
    return sample_token(g->sp, g->s->logits, V);
}

/* Advance by at least one token. The chosen tokens (1 .. draft+1) are written
 * to out, all of them already in the session, whose logits now predict the
 * token after them. */
static int generator_step(struct generator *g, int32_t *out, struct ds4_error *e) {
    struct session *s = g->s;
    const struct ds4_config *c = &s->eng->model->cfg;
    if (!g->have_residual && !logits_finite(s->logits, c->vocab))
        return fail(e, "the model's logits are not finite (NaN or infinity): broken weights?") ? 0
                                                                                               : -1;
    out[0] = generator_choose(g);
    int n = g->spec.draft > 0 ? g->drafter(g, out[0], out + 1) : 0;
    g->stats.main_forwards++;
    g->stats.drafted += n;
    if (n == 0) {
        g->stats.emitted++;
        return session_forward(s, out, 1, NULL, e) ? 1 : -1;
    }
    int T = n + 1;
    s->eng->be->state_pull(s);
    checkpoint_save(&g->verify_cp, s, T);
    struct forward_request req = { .all_logits = g->all_logits, .all_hc = g->all_hc,
                                   .journal = &g->journal };
    int kept = -1;
    if (session_forward(s, out, T, &req, e)) {
        kept = 1 + count_accepted(g, out + 1, n, g->all_logits);
        if (kept < T) {
            s->eng->be->state_pull(s);    /* the kept positions' rows are on the backend */
            session_rollback(s, &g->verify_cp, &g->journal, kept, g->all_logits, g->all_hc);
            s->eng->be->state_push(s);
        }
        g->stats.accepted += kept - 1;
        g->stats.emitted += kept;
    }
    return kept;
}


/* =========================================================================
 * Chapter 10. JSON: a strict RFC 8259 reader and a small writer
 * =========================================================================
 *
 * Spec: [RFC8259] The JavaScript Object Notation (JSON) Data Interchange
 * Format, and [UNICODE §3.7 table 3-7] for well-formed UTF-8.
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
 * returns the LAST match, as Python's json.loads() and JavaScript's
 * JSON.parse() do: a body that a proxy or a client library checked with
 * either of them means here what it meant there. (Keeping the first would
 * let `{"model":"a","model":"b"}` read one way in the client, another here.)
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
 * - memory: that factor of 64 is why json_parse_within() exists. It takes a
 *   budget in bytes for everything the parse allocates (arena chunks and
 *   pending stacks, counted by capacity) and stops with "memory budget
 *   exceeded" the moment a growth would pass it, so an 8 MB `[0,0,...]`
 *   costs the budget, not half a gigabyte, and reports what it used, so the
 *   server can hold a reservation of that size while the tree lives. The
 *   server passes its --max-parse-mem; json_parse() is the same unbounded.
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

enum json_kind {
    JSON_NULL,
    JSON_FALSE,
    JSON_TRUE,
    JSON_NUMBER,
    JSON_STRING,
    JSON_ARRAY,
    JSON_OBJECT
};

struct json {
    enum json_kind kind;
    double number;            /* JSON_NUMBER */
    /* JSON_STRING: decoded UTF-8, NUL-terminated, len excludes NUL (may contain \u0000) */
    char *string; size_t len;
    struct json *items;       /* JSON_ARRAY elements / JSON_OBJECT values, count of them: */
    /* JSON_OBJECT keys (decoded, NUL-terminated), parallel to items */
    char **keys; size_t *key_lens;
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
    struct json_parser *owner;   /* charged for every chunk (json_charge) */
};

static void json_arena_free(struct json_chunk *chunk) {
    while (chunk) {
        struct json_chunk *next = chunk->next;
        free(chunk);
        chunk = next;
    }
}

struct json_parser;
static bool json_charge(struct json_parser *p, size_t bytes);

static struct json_chunk *json_arena_grow(struct json_arena *a, size_t need) {
    size_t cap = a->next_cap > need ? a->next_cap : need;
    if (cap > SIZE_MAX - sizeof(struct json_chunk)) return NULL;
    if (a->owner && !json_charge(a->owner, sizeof(struct json_chunk) + cap)) return NULL;
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
 * and find the arena (C11 §11.7.2.1: a pointer to a struct, suitably
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
    size_t budget, charged;      /* bytes allowed (0: no limit), bytes allocated */
    bool over_budget;
};

/* What a parse may allocate, and what it did: the caller sets `limit` (0: no
 * limit); json_parse_within() fills `used` and `exceeded`. */
struct json_budget {
    size_t limit, used;
    bool exceeded;
};

/* Count `bytes` more of allocation against the budget. Returns false (and
 * records the error) when it would pass it; nothing is allocated then. */
static bool json_fail(struct json_parser *p, size_t at, const char *fmt, ...);
static bool json_charge(struct json_parser *p, size_t bytes) {
    if (p->budget != 0 && bytes > p->budget - p->charged) {
        p->over_budget = true;
        return json_fail(p, p->pos, "memory budget exceeded: the parse needs more than %zu bytes",
                         p->budget);
    }
    p->charged += bytes;
    return true;
}

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
    return json_fail(p, p->pos, "out of memory");   /* a no-op after a budget error */
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
static void *json_grow(struct json_parser *p, void *data, size_t cap, size_t elem_size) {
    if (cap > SIZE_MAX / 2 / elem_size) return NULL;
    if (!json_charge(p, cap * elem_size)) return NULL;     /* the new half */
    return realloc(data, cap * 2 * elem_size);
}

static bool json_push_value(struct json_parser *p, const struct json *v) {
    if (p->values_len == p->values_cap) {
        struct json *grown = json_grow(p, p->values, p->values_cap, sizeof(struct json));
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
        char **keys = json_grow(p, p->keys, p->keys_cap, sizeof(char *));
        if (keys == NULL) return json_out_of_memory(p);
        p->keys = keys;
        size_t *lens = json_grow(p, p->key_lens, p->keys_cap, sizeof(size_t));
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

/* The number grammar of [RFC8259 §6], checked byte by byte:
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
 * 0 accepts only scalars at the top. `budget` bounds the bytes the parse
 * allocates: b->limit (0: no bound) goes in; b->used (bytes, stacks counted
 * at their largest) and b->exceeded (the reason for a NULL) come out. */
static struct json *json_parse_within(const char *text, size_t len, int max_depth,
                                      struct json_budget *b, char *err, size_t errlen) {
    struct json_parser p = {0};
    p.text = text;
    p.len = len;
    p.budget = b->limit;
    p.arena.owner = &p;
    size_t stacks = JSON_STACK_FIRST * (sizeof(struct json) + sizeof(char *) + sizeof(size_t));
    bool fits = json_charge(&p, stacks + sizeof(struct json_document));
    b->used = p.charged;
    b->exceeded = !fits;
    if (!fits) return NULL;
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
    b->used = p.charged;
    b->exceeded = p.over_budget;
    if (!ok) {
        json_arena_free(p.arena.newest);
        free(doc);
        return NULL;
    }
    doc->chunks = p.arena.newest;
    if (err != NULL && errlen > 0) err[0] = '\0';
    return &doc->root;
}

static struct json *json_parse(const char *text, size_t len, int max_depth, char *err,
                               size_t errlen) {
    struct json_budget unlimited = {0};
    return json_parse_within(text, len, max_depth, &unlimited, err, errlen);
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

/* The value of the last member named `key` (see "Duplicate keys" above).
 * A linear scan from the end: request objects have a handful of members. */
static const struct json *json_get(const struct json *obj, const char *key) {
    if (!json_is(obj, JSON_OBJECT) || key == NULL) return NULL;
    size_t key_len = strlen(key);
    for (size_t i = obj->count; i-- > 0;)
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
 * the same double; 17 always does [IEEE 754-2008 §10.12.2]. This is not the
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

/* =========================================================================
 * Chapter 11. Text: byte-level BPE, the chat template and DSML tool calls.
 * =========================================================================
 *
 * Spec: [LAYOUT §3] (vocabulary), [LAYOUT §4] (chat format), [LAYOUT §5] (DSML).
 * References:
 *   [TOKJ] DeepSeek V3/V4 tokenizer.json: the pre-tokenizer and the BPE model.
 *   [ENC]  DeepSeek V4 encoding/encoding_dsv4.py: encode_messages() and
 *          parse_message_from_completion_text().
 *   [GPT2] Radford et al., "Language Models are Unsupervised Multitask
 *          Learners" (2019), §2.2: byte-level BPE.
 * Tests: tests/test_text.c, vectors/tokenizer_vectors.json (made by
 * vectors/gen_tokenizer_vectors.py with Python's `regex` and `tiktoken`).
 *
 * The model reads and writes token ids; people read and write text. This
 * chapter is the border crossing, both ways:
 *
 *     text  --pre-tokenizer-->  pieces  --BPE merges-->  token ids
 *     ids   --decode------------------------------------>  bytes (UTF-8)
 *     messages + tools  --chat template-->  prompt text (then tokenized)
 *     generated text    --DSML parser---->  reasoning, content, tool calls
 *
 * Every step must be byte-exact. A tokenizer that is "almost" right gives the
 * model inputs it never saw in training, and the answers degrade quietly; a
 * chat template that differs by one newline does the same, and also breaks
 * prompt-cache reuse between requests. So each part below follows a named
 * reference line by line in behaviour (never in code), and the tests compare
 * against outputs of those references.
 *
 * The sections:
 *
 *   6.1  UTF-8 and the Unicode classes the pre-tokenizer asks about
 *   6.2  The pre-tokenizer: three regex stages, written by hand
 *   6.3  The vocabulary: GPT-2 byte map, token and merge hash tables
 *   6.4  BPE: merging one piece by rank with a heap
 *   6.5  tokenize(): special tokens, then pieces, then merges
 *   6.6  Decoding, and a streaming decoder that never splits a character
 *   6.7  Python-style JSON, because the template embeds json.dumps() output
 *   6.8  The chat template of DeepSeek V4
 *   6.9  The DSML parser for model output
 *   6.10 --render-chat: a message file in, the prompt out
 */

/* ---- 11.1 UTF-8 and Unicode classes ---------------------------------------- */

/* UTF-8 [Unicode §3.7, table 3-7] writes a code point in one to four bytes.
 * The first byte says how many follow; the second byte has a narrower range
 * for a few lead bytes, which is how overlong forms (C0 AF for '/'),
 * surrogates (ED A0 80) and values above U+10FFFF (F4 90 ...) are refused:
 *
 *     lead     continuation bytes   2nd byte range
 *     00..7F   0
 *     C2..DF   1                    80..BF
 *     E0       2                    A0..BF
 *     E1..EC   2                    80..BF
 *     ED       2                    80..9F
 *     EE..EF   2                    80..BF
 *     F0       3                    90..BF
 *     F1..F3   3                    80..BF
 *     F4       3                    80..8F
 *
 * Text handed to the tokenizer is not always valid UTF-8 (a file cut in the
 * middle, a binary blob in a tool result). We never reject it. A byte that
 * does not start a well-formed sequence becomes a "code point" of its own
 * with the value TEXT_BAD_BYTE: it belongs to no Unicode class, and BPE later
 * encodes it like any other byte. Python's `surrogateescape` error handler
 * does exactly this (each bad byte becomes one lone surrogate), which is how
 * the reference vectors cover invalid input. */

#define TEXT_BAD_BYTE 0xFFFFFFFFu

/* How many continuation bytes the lead byte c wants, and the allowed range
 * of the first of them. Returns false if c cannot start a sequence. */
static bool utf8_lead(unsigned char c, size_t *need, unsigned char *lo, unsigned char *hi) {
    *lo = 0x80;
    *hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) *need = 1;
    else if (c >= 0xE0 && c <= 0xEF) *need = 2;
    else if (c >= 0xF0 && c <= 0xF4) *need = 3;
    else return false;
    if (c == 0xE0) *lo = 0xA0;
    if (c == 0xED) *hi = 0x9F;
    if (c == 0xF0) *lo = 0x90;
    if (c == 0xF4) *hi = 0x8F;
    return true;
}

/* Decode one code point from s[0..n), n >= 1. Sets *len to the bytes used:
 * the whole sequence, or 1 for a bad byte (then returns TEXT_BAD_BYTE). */
static uint32_t utf8_decode(const unsigned char *s, size_t n, size_t *len) {
    size_t need;
    unsigned char lo, hi;
    *len = 1;
    if (s[0] < 0x80) return s[0];
    if (!utf8_lead(s[0], &need, &lo, &hi) || n < need + 1) return TEXT_BAD_BYTE;
    uint32_t cp = s[0] & (0x7F >> (need + 1));
    for (size_t k = 1; k <= need; k++) {
        if (s[k] < lo || s[k] > hi) return TEXT_BAD_BYTE;
        lo = 0x80;
        hi = 0xBF;
        cp = (cp << 6) | (s[k] & 0x3F);
    }
    *len = need + 1;
    return cp;
}

static size_t utf8_encode(char *out, uint32_t cp) {
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

/* If s[0..n) ends in the first bytes of a character whose remaining bytes
 * have not arrived yet, return how many bytes that unfinished tail has
 * (1..3); otherwise 0. "Unfinished" means every byte so far is valid for
 * that position, so the tail can still become a well-formed character. A
 * tail that is already broken returns 0: waiting would not mend it. */
static size_t utf8_unfinished_tail(const unsigned char *s, size_t n) {
    for (size_t k = 1; k <= 3 && k <= n; k++) {
        size_t p = n - k, need;
        unsigned char lo, hi;
        if ((s[p] & 0xC0) == 0x80) continue;       /* a continuation byte: look further back */
        if (!utf8_lead(s[p], &need, &lo, &hi) || need < k) return 0;
        for (size_t i = p + 1; i < n; i++) {
            if (s[i] < lo || s[i] > hi) return 0;
            lo = 0x80;
            hi = 0xBF;
        }
        return k;
    }
    return 0;
}

/* The pre-tokenizer regex [TOKJ] asks five questions about a code point:
 * is it in \p{L} or \p{M} (letters and combining marks), \p{N} (numbers),
 * \p{P} or \p{S} (punctuation and symbols), \s (white space), or none of
 * these? Letters and marks always appear together in the regex, or in a way
 * where they behave alike (see 11.2), and so do punctuation and symbols; so
 * five classes are enough.
 *
 * The table below maps every code point to its class. It is generated by
 * tools/gen_unicode.py from UnicodeData.txt (Debian's unicode-data package,
 * Unicode 15.0) plus the White_Space property. Each entry packs the first
 * code point of a run and the run's class:
 *
 *     entry = (first_code_point << 3) | class
 *
 * and a run lasts until the next entry starts. Unassigned code points are
 * U_OTHER. One binary search over about 1,900 entries finds any class. */

enum unicode_class { U_OTHER, U_LETTER, U_NUMBER, U_PUNCT, U_SPACE };

/* BEGIN GENERATED UNICODE TABLE: tools/gen_unicode.py from UnicodeData.txt
 * (Debian unicode-data 15.0.0). 1923 entries; do not edit by hand. */
static const uint32_t unicode_class_table[1923] = {
    0x0,0x4c,0x70,0x104,0x10b,0x182,0x1d3,0x209,
    0x2db,0x309,0x3db,0x3f8,0x42c,0x430,0x504,0x50b,
    0x551,0x55b,0x568,0x573,0x592,0x5a3,0x5a9,0x5b3,
    0x5ca,0x5d1,0x5db,0x5e2,0x5fb,0x601,0x6bb,0x6c1,
    0x7bb,0x7c1,0x1613,0x1631,0x1693,0x1701,0x172b,0x1761,
    0x176b,0x1771,0x177b,0x1801,0x1bab,0x1bb1,0x1bc0,0x1bd1,
    0x1bf3,0x1bf9,0x1c00,0x1c23,0x1c31,0x1c3b,0x1c41,0x1c58,
    0x1c61,0x1c68,0x1c71,0x1d10,0x1d19,0x1fb3,0x1fb9,0x2413,
    0x2419,0x2980,0x2989,0x2ab8,0x2ac9,0x2ad3,0x2b01,0x2c4b,
    0x2c58,0x2c6b,0x2c80,0x2c89,0x2df3,0x2df9,0x2e03,0x2e09,
    0x2e1b,0x2e21,0x2e33,0x2e39,0x2e40,0x2e81,0x2f58,0x2f79,
    0x2f9b,0x2fa8,0x3033,0x3081,0x30db,0x30e0,0x30eb,0x3101,
    0x3302,0x3353,0x3371,0x36a3,0x36a9,0x36e8,0x36f3,0x36f9,
    0x374b,0x3751,0x3782,0x37d1,0x37eb,0x37f9,0x3803,0x3870,
    0x3881,0x3a58,0x3a69,0x3d90,0x3e02,0x3e51,0x3fb3,0x3fd1,
    0x3fd8,0x3fe9,0x3ff3,0x4001,0x4170,0x4183,0x41f8,0x4201,
    0x42e0,0x42f3,0x42f8,0x4301,0x4358,0x4381,0x4443,0x4449,
    0x4478,0x44c1,0x4710,0x4719,0x4b23,0x4b32,0x4b83,0x4b89,
    0x4c20,0x4c29,0x4c68,0x4c79,0x4c88,0x4c99,0x4d48,0x4d51,
    0x4d88,0x4d91,0x4d98,0x4db1,0x4dd0,0x4de1,0x4e28,0x4e39,
    0x4e48,0x4e59,0x4e78,0x4eb9,0x4ec0,0x4ee1,0x4ef0,0x4ef9,
    0x4f20,0x4f32,0x4f81,0x4f93,0x4fa2,0x4fd3,0x4fe1,0x4feb,
    0x4ff1,0x4ff8,0x5009,0x5020,0x5029,0x5058,0x5079,0x5088,
    0x5099,0x5148,0x5151,0x5188,0x5191,0x51a0,0x51a9,0x51b8,
    0x51c1,0x51d0,0x51e1,0x51e8,0x51f1,0x5218,0x5239,0x5248,
    0x5259,0x5270,0x5289,0x5290,0x52c9,0x52e8,0x52f1,0x52f8,
    0x5332,0x5381,0x53b3,0x53b8,0x5409,0x5420,0x5429,0x5470,
    0x5479,0x5490,0x5499,0x5548,0x5551,0x5588,0x5591,0x55a0,
    0x55a9,0x55d0,0x55e1,0x5630,0x5639,0x5650,0x5659,0x5670,
    0x5681,0x5688,0x5701,0x5720,0x5732,0x5783,0x5790,0x57c9,
    0x5800,0x5809,0x5820,0x5829,0x5868,0x5879,0x5888,0x5899,
    0x5948,0x5951,0x5988,0x5991,0x59a0,0x59a9,0x59d0,0x59e1,
    0x5a28,0x5a39,0x5a48,0x5a59,0x5a70,0x5aa9,0x5ac0,0x5ae1,
    0x5af0,0x5af9,0x5b20,0x5b32,0x5b83,0x5b89,0x5b92,0x5bc0,
    0x5c11,0x5c20,0x5c29,0x5c58,0x5c71,0x5c88,0x5c91,0x5cb0,
    0x5cc9,0x5cd8,0x5ce1,0x5ce8,0x5cf1,0x5d00,0x5d19,0x5d28,
    0x5d41,0x5d58,0x5d71,0x5dd0,0x5df1,0x5e18,0x5e31,0x5e48,
    0x5e51,0x5e70,0x5e81,0x5e88,0x5eb9,0x5ec0,0x5f32,0x5f9b,
    0x5fd8,0x6001,0x6068,0x6071,0x6088,0x6091,0x6148,0x6151,
    0x61d0,0x61e1,0x6228,0x6231,0x6248,0x6251,0x6270,0x62a9,
    0x62b8,0x62c1,0x62d8,0x62e9,0x62f0,0x6301,0x6320,0x6332,
    0x6380,0x63bb,0x63c2,0x63fb,0x6401,0x6423,0x6429,0x6468,
    0x6471,0x6488,0x6491,0x6548,0x6551,0x65a0,0x65a9,0x65d0,
    0x65e1,0x6628,0x6631,0x6648,0x6651,0x6670,0x66a9,0x66b8,
    0x66e9,0x66f8,0x6701,0x6720,0x6732,0x6780,0x6789,0x67a0,
    0x6801,0x6868,0x6871,0x6888,0x6891,0x6a28,0x6a31,0x6a48,
    0x6a51,0x6a7b,0x6a80,0x6aa1,0x6ac2,0x6af9,0x6b20,0x6b32,
    0x6bcb,0x6bd1,0x6c00,0x6c09,0x6c20,0x6c29,0x6cb8,0x6cd1,
    0x6d90,0x6d99,0x6de0,0x6de9,0x6df0,0x6e01,0x6e38,0x6e51,
    0x6e58,0x6e79,0x6ea8,0x6eb1,0x6eb8,0x6ec1,0x6f00,0x6f32,
    0x6f80,0x6f91,0x6fa3,0x6fa8,0x7009,0x71d8,0x71fb,0x7201,
    0x727b,0x7282,0x72d3,0x72e0,0x7409,0x7418,0x7421,0x7428,
    0x7431,0x7458,0x7461,0x7520,0x7529,0x7530,0x7539,0x75f0,
    0x7601,0x7628,0x7631,0x7638,0x7641,0x7678,0x7682,0x76d0,
    0x76e1,0x7700,0x7801,0x780b,0x78c1,0x78d3,0x7902,0x79a3,
    0x79a9,0x79b3,0x79b9,0x79c3,0x79c9,0x79d3,0x79f1,0x7a40,
    0x7a49,0x7b68,0x7b89,0x7c2b,0x7c31,0x7cc0,0x7cc9,0x7de8,
    0x7df3,0x7e31,0x7e3b,0x7e68,0x7e73,0x7ed8,0x8001,0x8202,
    0x8253,0x8281,0x8482,0x84d1,0x84f3,0x8501,0x8630,0x8639,
    0x8640,0x8669,0x8670,0x8681,0x87db,0x87e1,0x9248,0x9251,
    0x9270,0x9281,0x92b8,0x92c1,0x92c8,0x92d1,0x92f0,0x9301,
    0x9448,0x9451,0x9470,0x9481,0x9588,0x9591,0x95b0,0x95c1,
    0x95f8,0x9601,0x9608,0x9611,0x9630,0x9641,0x96b8,0x96c1,
    0x9888,0x9891,0x98b0,0x98c1,0x9ad8,0x9ae9,0x9b03,0x9b4a,
    0x9be8,0x9c01,0x9c83,0x9cd0,0x9d01,0x9fb0,0x9fc1,0x9ff0,
    0xa003,0xa009,0xb36b,0xb379,0xb404,0xb409,0xb4db,0xb4e8,
    0xb501,0xb75b,0xb772,0xb789,0xb7c8,0xb801,0xb8b0,0xb8f9,
    0xb9ab,0xb9b8,0xba01,0xbaa0,0xbb01,0xbb68,0xbb71,0xbb88,
    0xbb91,0xbba0,0xbc01,0xbea3,0xbeb9,0xbec3,0xbee1,0xbef0,
    0xbf02,0xbf50,0xbf82,0xbfd0,0xc003,0xc059,0xc070,0xc079,
    0xc082,0xc0d0,0xc101,0xc3c8,0xc401,0xc558,0xc581,0xc7b0,
    0xc801,0xc8f8,0xc901,0xc960,0xc981,0xc9e0,0xca03,0xca08,
    0xca23,0xca32,0xca81,0xcb70,0xcb81,0xcba8,0xcc01,0xcd60,
    0xcd81,0xce50,0xce82,0xced8,0xcef3,0xd001,0xd0e0,0xd0f3,
    0xd101,0xd2f8,0xd301,0xd3e8,0xd3f9,0xd402,0xd450,0xd482,
    0xd4d0,0xd503,0xd539,0xd543,0xd570,0xd581,0xd678,0xd801,
    0xda68,0xda82,0xdad3,0xdb59,0xdba3,0xdbf8,0xdc01,0xdd82,
    0xddd1,0xdfa0,0xdfe3,0xe001,0xe1c0,0xe1db,0xe202,0xe250,
    0xe269,0xe282,0xe2d1,0xe3f3,0xe401,0xe448,0xe481,0xe5d8,
    0xe5e9,0xe603,0xe640,0xe681,0xe69b,0xe6a1,0xe7d8,0xe801,
    0xf8b0,0xf8c1,0xf8f0,0xf901,0xfa30,0xfa41,0xfa70,0xfa81,
    0xfac0,0xfac9,0xfad0,0xfad9,0xfae0,0xfae9,0xfaf0,0xfaf9,
    0xfbf0,0xfc01,0xfda8,0xfdb1,0xfdeb,0xfdf1,0xfdfb,0xfe11,
    0xfe28,0xfe31,0xfe6b,0xfe81,0xfea0,0xfeb1,0xfee0,0xfeeb,
    0xff01,0xff6b,0xff80,0xff91,0xffa8,0xffb1,0xffeb,0xfff8,
    0x10004,0x10058,0x10083,0x10144,0x10150,0x1017c,0x10183,0x102fc,
    0x10300,0x10382,0x10389,0x10390,0x103a2,0x103d3,0x103f9,0x10402,
    0x10453,0x10478,0x10481,0x104e8,0x10503,0x10608,0x10681,0x10788,
    0x10803,0x10811,0x1081b,0x10839,0x10843,0x10851,0x108a3,0x108a9,
    0x108b3,0x108c9,0x108f3,0x10921,0x1092b,0x10931,0x1093b,0x10941,
    0x1094b,0x10951,0x10973,0x10979,0x109d3,0x109e1,0x10a03,0x10a29,
    0x10a53,0x10a71,0x10a7b,0x10a82,0x10c19,0x10c2a,0x10c53,0x10c60,
    0x10c83,0x12138,0x12203,0x12258,0x12302,0x124e3,0x12752,0x12803,
    0x13bb2,0x13ca3,0x15ba0,0x15bb3,0x15cb0,0x15cbb,0x16001,0x1672b,
    0x16759,0x167a0,0x167cb,0x167ea,0x167f3,0x16801,0x16930,0x16939,
    0x16940,0x16969,0x16970,0x16981,0x16b40,0x16b79,0x16b83,0x16b88,
    0x16bf9,0x16cb8,0x16d01,0x16d38,0x16d41,0x16d78,0x16d81,0x16db8,
    0x16dc1,0x16df8,0x16e01,0x16e38,0x16e41,0x16e78,0x16e81,0x16eb8,
    0x16ec1,0x16ef8,0x16f01,0x17003,0x17179,0x17183,0x172f0,0x17403,
    0x174d0,0x174db,0x177a0,0x17803,0x17eb0,0x17f83,0x17fe0,0x18004,
    0x1800b,0x18029,0x1803a,0x18043,0x1810a,0x18151,0x18183,0x18189,
    0x181b3,0x181c2,0x181d9,0x181eb,0x18200,0x18209,0x184b8,0x184c9,
    0x184db,0x184e9,0x18503,0x18509,0x187db,0x187e1,0x18800,0x18829,
    0x18980,0x18989,0x18c78,0x18c83,0x18c92,0x18cb3,0x18d01,0x18e03,
    0x18f20,0x18f81,0x19003,0x190f8,0x19102,0x19153,0x19242,0x19283,
    0x1928a,0x19303,0x19402,0x19453,0x1958a,0x19603,0x1a001,0x26e03,
    0x27001,0x52468,0x52483,0x52638,0x52681,0x527f3,0x52801,0x5306b,
    0x53081,0x53102,0x53151,0x53160,0x53201,0x5339b,0x533a1,0x533f3,
    0x533f9,0x53732,0x53781,0x53793,0x537c0,0x53803,0x538b9,0x53903,
    0x53911,0x53c4b,0x53c59,0x53e58,0x53e81,0x53e90,0x53e99,0x53ea0,
    0x53ea9,0x53ed0,0x53f91,0x54143,0x54161,0x54168,0x54182,0x541b3,
    0x541d0,0x54201,0x543a3,0x543c0,0x54401,0x54630,0x54673,0x54682,
    0x546d0,0x54701,0x547c3,0x547d9,0x547e3,0x547e9,0x54802,0x54851,
    0x54973,0x54981,0x54aa0,0x54afb,0x54b01,0x54be8,0x54c01,0x54e0b,
    0x54e70,0x54e79,0x54e82,0x54ed0,0x54ef3,0x54f01,0x54f82,0x54fd1,
    0x54ff8,0x55001,0x551b8,0x55201,0x55270,0x55282,0x552d0,0x552e3,
    0x55301,0x553bb,0x553d1,0x55618,0x556d9,0x556f3,0x55701,0x55783,
    0x55791,0x557b8,0x55809,0x55838,0x55849,0x55878,0x55889,0x558b8,
    0x55901,0x55938,0x55941,0x55978,0x55981,0x55adb,0x55ae1,0x55b53,
    0x55b60,0x55b81,0x55f5b,0x55f61,0x55f70,0x55f82,0x55fd0,0x56001,
    0x6bd20,0x6bd81,0x6be38,0x6be59,0x6bfe0,0x7c801,0x7d370,0x7d381,
    0x7d6d0,0x7d801,0x7d838,0x7d899,0x7d8c0,0x7d8e9,0x7d94b,0x7d951,
    0x7d9b8,0x7d9c1,0x7d9e8,0x7d9f1,0x7d9f8,0x7da01,0x7da10,0x7da19,
    0x7da28,0x7da31,0x7dd93,0x7de18,0x7de99,0x7e9f3,0x7ea81,0x7ec80,
    0x7ec91,0x7ee40,0x7ee7b,0x7ee80,0x7ef81,0x7efe3,0x7f001,0x7f083,
    0x7f0d0,0x7f101,0x7f183,0x7f298,0x7f2a3,0x7f338,0x7f343,0x7f360,
    0x7f381,0x7f3a8,0x7f3b1,0x7f7e8,0x7f80b,0x7f882,0x7f8d3,0x7f909,
    0x7f9db,0x7fa09,0x7fadb,0x7fb31,0x7fdf8,0x7fe11,0x7fe40,0x7fe51,
    0x7fe80,0x7fe91,0x7fec0,0x7fed1,0x7fee8,0x7ff03,0x7ff38,0x7ff43,
    0x7ff78,0x7ffe3,0x7fff0,0x80001,0x80060,0x80069,0x80138,0x80141,
    0x801d8,0x801e1,0x801f0,0x801f9,0x80270,0x80281,0x802f0,0x80401,
    0x807d8,0x80803,0x80818,0x8083a,0x809a0,0x809bb,0x80a02,0x80bcb,
    0x80c52,0x80c63,0x80c78,0x80c83,0x80ce8,0x80d03,0x80d08,0x80e83,
    0x80fe9,0x80ff0,0x81401,0x814e8,0x81501,0x81688,0x81701,0x8170a,
    0x817e0,0x81801,0x81902,0x81920,0x81969,0x81a0a,0x81a11,0x81a52,
    0x81a58,0x81a81,0x81bd8,0x81c01,0x81cf0,0x81cfb,0x81d01,0x81e20,
    0x81e41,0x81e83,0x81e8a,0x81eb0,0x82001,0x824f0,0x82502,0x82550,
    0x82581,0x826a0,0x826c1,0x827e0,0x82801,0x82940,0x82981,0x82b20,
    0x82b7b,0x82b81,0x82bd8,0x82be1,0x82c58,0x82c61,0x82c98,0x82ca1,
    0x82cb0,0x82cb9,0x82d10,0x82d19,0x82d90,0x82d99,0x82dd0,0x82dd9,
    0x82de8,0x83001,0x839b8,0x83a01,0x83ab0,0x83b01,0x83b40,0x83c01,
    0x83c30,0x83c39,0x83d88,0x83d91,0x83dd8,0x84001,0x84030,0x84041,
    0x84048,0x84051,0x841b0,0x841b9,0x841c8,0x841e1,0x841e8,0x841f9,
    0x842b0,0x842bb,0x842c2,0x84301,0x843bb,0x843ca,0x84401,0x844f8,
    0x8453a,0x84580,0x84701,0x84798,0x847a1,0x847b0,0x847da,0x84801,
    0x848b2,0x848e0,0x848fb,0x84901,0x849d0,0x849fb,0x84a00,0x84c01,
    0x84dc0,0x84de2,0x84df1,0x84e02,0x84e80,0x84e92,0x85001,0x85020,
    0x85029,0x85038,0x85061,0x850a0,0x850a9,0x850c0,0x850c9,0x851b0,
    0x851c1,0x851d8,0x851f9,0x85202,0x85248,0x85283,0x852c8,0x85301,
    0x853ea,0x853fb,0x85401,0x854ea,0x85500,0x85601,0x85643,0x85649,
    0x85738,0x8575a,0x85783,0x857b8,0x85801,0x859b0,0x859cb,0x85a01,
    0x85ab0,0x85ac2,0x85b01,0x85b98,0x85bc2,0x85c01,0x85c90,0x85ccb,
    0x85ce8,0x85d4a,0x85d80,0x86001,0x86248,0x86401,0x86598,0x86601,
    0x86798,0x867d2,0x86801,0x86940,0x86982,0x869d0,0x87302,0x873f8,
    0x87401,0x87550,0x87559,0x8756b,0x87570,0x87581,0x87590,0x877e9,
    0x878ea,0x87939,0x87940,0x87981,0x87a8a,0x87aab,0x87ad0,0x87b81,
    0x87c33,0x87c50,0x87d81,0x87e2a,0x87e60,0x87f01,0x87fb8,0x88001,
    0x8823b,0x88270,0x88292,0x88381,0x883b0,0x883f9,0x885db,0x885e8,
    0x885f3,0x88611,0x88618,0x88681,0x88748,0x88782,0x887d0,0x88801,
    0x889a8,0x889b2,0x88a03,0x88a21,0x88a40,0x88a81,0x88ba3,0x88bb1,
    0x88bb8,0x88c01,0x88e2b,0x88e49,0x88e6b,0x88e71,0x88e82,0x88ed1,
    0x88edb,0x88ee1,0x88eeb,0x88f00,0x88f0a,0x88fa8,0x89001,0x89090,
    0x89099,0x891c3,0x891f1,0x89210,0x89401,0x89438,0x89441,0x89448,
    0x89451,0x89470,0x89479,0x894f0,0x894f9,0x8954b,0x89550,0x89581,
    0x89758,0x89782,0x897d0,0x89801,0x89820,0x89829,0x89868,0x89879,
    0x89888,0x89899,0x89948,0x89951,0x89988,0x89991,0x899a0,0x899a9,
    0x899d0,0x899d9,0x89a28,0x89a39,0x89a48,0x89a59,0x89a70,0x89a81,
    0x89a88,0x89ab9,0x89ac0,0x89ae9,0x89b20,0x89b31,0x89b68,0x89b81,
    0x89ba8,0x8a001,0x8a25b,0x8a282,0x8a2d3,0x8a2e0,0x8a2eb,0x8a2f1,
    0x8a310,0x8a401,0x8a633,0x8a639,0x8a640,0x8a682,0x8a6d0,0x8ac01,
    0x8adb0,0x8adc1,0x8ae0b,0x8aec1,0x8aef0,0x8b001,0x8b20b,0x8b221,
    0x8b228,0x8b282,0x8b2d0,0x8b303,0x8b368,0x8b401,0x8b5cb,0x8b5d0,
    0x8b602,0x8b650,0x8b801,0x8b8d8,0x8b8e9,0x8b960,0x8b982,0x8b9e3,
    0x8ba01,0x8ba38,0x8c001,0x8c1db,0x8c1e0,0x8c501,0x8c702,0x8c798,
    0x8c7f9,0x8c838,0x8c849,0x8c850,0x8c861,0x8c8a0,0x8c8a9,0x8c8b8,
    0x8c8c1,0x8c9b0,0x8c9b9,0x8c9c8,0x8c9d9,0x8ca23,0x8ca38,0x8ca82,
    0x8cad0,0x8cd01,0x8cd40,0x8cd51,0x8cec0,0x8ced1,0x8cf13,0x8cf19,
    0x8cf28,0x8d001,0x8d1fb,0x8d239,0x8d240,0x8d281,0x8d4d3,0x8d4e9,
    0x8d4f3,0x8d518,0x8d581,0x8d7c8,0x8d803,0x8d850,0x8e001,0x8e048,
    0x8e051,0x8e1b8,0x8e1c1,0x8e20b,0x8e230,0x8e282,0x8e368,0x8e383,
    0x8e391,0x8e480,0x8e491,0x8e540,0x8e549,0x8e5b8,0x8e801,0x8e838,
    0x8e841,0x8e850,0x8e859,0x8e9b8,0x8e9d1,0x8e9d8,0x8e9e1,0x8e9f0,
    0x8e9f9,0x8ea40,0x8ea82,0x8ead0,0x8eb01,0x8eb30,0x8eb39,0x8eb48,
    0x8eb51,0x8ec78,0x8ec81,0x8ec90,0x8ec99,0x8ecc8,0x8ed02,0x8ed50,
    0x8f701,0x8f7bb,0x8f7c8,0x8f801,0x8f888,0x8f891,0x8f9d8,0x8f9f1,
    0x8fa1b,0x8fa82,0x8fad0,0x8fd81,0x8fd88,0x8fe02,0x8feab,0x8ff90,
    0x8fffb,0x90001,0x91cd0,0x92002,0x92378,0x92383,0x923a8,0x92401,
    0x92a20,0x97c81,0x97f8b,0x97f98,0x98001,0x9a180,0x9a201,0x9a2b0,
    0xa2001,0xa3238,0xb4001,0xb51c8,0xb5201,0xb52f8,0xb5302,0xb5350,
    0xb5373,0xb5381,0xb55f8,0xb5602,0xb5650,0xb5681,0xb5770,0xb5781,
    0xb57ab,0xb57b0,0xb5801,0xb59bb,0xb5a01,0xb5a23,0xb5a30,0xb5a82,
    0xb5ad0,0xb5ada,0xb5b10,0xb5b19,0xb5bc0,0xb5be9,0xb5c80,0xb7201,
    0xb7402,0xb74bb,0xb74d8,0xb7801,0xb7a58,0xb7a79,0xb7c40,0xb7c79,
    0xb7d00,0xb7f01,0xb7f13,0xb7f19,0xb7f28,0xb7f81,0xb7f90,0xb8001,
    0xc3fc0,0xc4001,0xc66b0,0xc6801,0xc6848,0xd7f81,0xd7fa0,0xd7fa9,
    0xd7fe0,0xd7fe9,0xd7ff8,0xd8001,0xd8918,0xd8991,0xd8998,0xd8a81,
    0xd8a98,0xd8aa9,0xd8ab0,0xd8b21,0xd8b40,0xd8b81,0xd97e0,0xde001,
    0xde358,0xde381,0xde3e8,0xde401,0xde448,0xde481,0xde4d0,0xde4e3,
    0xde4e9,0xde4fb,0xde500,0xe7801,0xe7970,0xe7981,0xe7a38,0xe7a83,
    0xe7e20,0xe8003,0xe87b0,0xe8803,0xe8938,0xe894b,0xe8b29,0xe8b53,
    0xe8b69,0xe8b98,0xe8bd9,0xe8c1b,0xe8c29,0xe8c63,0xe8d51,0xe8d73,
    0xe8f58,0xe9003,0xe9211,0xe922b,0xe9230,0xe9602,0xe96a0,0xe9702,
    0xe97a0,0xe9803,0xe9ab8,0xe9b02,0xe9bc8,0xea001,0xea2a8,0xea2b1,
    0xea4e8,0xea4f1,0xea500,0xea511,0xea518,0xea529,0xea538,0xea549,
    0xea568,0xea571,0xea5d0,0xea5d9,0xea5e0,0xea5e9,0xea620,0xea629,
    0xea830,0xea839,0xea858,0xea869,0xea8a8,0xea8b1,0xea8e8,0xea8f1,
    0xea9d0,0xea9d9,0xea9f8,0xeaa01,0xeaa28,0xeaa31,0xeaa38,0xeaa51,
    0xeaa88,0xeaa91,0xeb530,0xeb541,0xeb60b,0xeb611,0xeb6db,0xeb6e1,
    0xeb7db,0xeb7e1,0xeb8ab,0xeb8b1,0xeb9ab,0xeb9b1,0xeba7b,0xeba81,
    0xebb7b,0xebb81,0xebc4b,0xebc51,0xebd4b,0xebd51,0xebe1b,0xebe21,
    0xebe60,0xebe72,0xec003,0xed001,0xed1bb,0xed1d9,0xed36b,0xed3a9,
    0xed3b3,0xed421,0xed42b,0xed460,0xed4d9,0xed500,0xed509,0xed580,
    0xef801,0xef8f8,0xef929,0xef958,0xf0001,0xf0038,0xf0041,0xf00c8,
    0xf00d9,0xf0110,0xf0119,0xf0128,0xf0131,0xf0158,0xf0181,0xf0370,
    0xf0479,0xf0480,0xf0801,0xf0968,0xf0981,0xf09f0,0xf0a02,0xf0a50,
    0xf0a71,0xf0a7b,0xf0a80,0xf1481,0xf1578,0xf1601,0xf1782,0xf17d0,
    0xf17fb,0xf1800,0xf2681,0xf2782,0xf27d0,0xf3f01,0xf3f38,0xf3f41,
    0xf3f60,0xf3f69,0xf3f78,0xf3f81,0xf3ff8,0xf4001,0xf4628,0xf463a,
    0xf4681,0xf46b8,0xf4801,0xf4a60,0xf4a82,0xf4ad0,0xf4af3,0xf4b00,
    0xf638a,0xf6563,0xf656a,0xf6583,0xf658a,0xf65a8,0xf680a,0xf6973,
    0xf697a,0xf69f0,0xf7001,0xf7020,0xf7029,0xf7100,0xf7109,0xf7118,
    0xf7121,0xf7128,0xf7139,0xf7140,0xf7149,0xf7198,0xf71a1,0xf71c0,
    0xf71c9,0xf71d0,0xf71d9,0xf71e0,0xf7211,0xf7218,0xf7239,0xf7240,
    0xf7249,0xf7250,0xf7259,0xf7260,0xf7269,0xf7280,0xf7289,0xf7298,
    0xf72a1,0xf72a8,0xf72b9,0xf72c0,0xf72c9,0xf72d0,0xf72d9,0xf72e0,
    0xf72e9,0xf72f0,0xf72f9,0xf7300,0xf7309,0xf7318,0xf7321,0xf7328,
    0xf7339,0xf7358,0xf7361,0xf7398,0xf73a1,0xf73c0,0xf73c9,0xf73e8,
    0xf73f1,0xf73f8,0xf7401,0xf7450,0xf7459,0xf74e0,0xf7509,0xf7520,
    0xf7529,0xf7550,0xf7559,0xf75e0,0xf7783,0xf7790,0xf8003,0xf8160,
    0xf8183,0xf84a0,0xf8503,0xf8578,0xf858b,0xf8600,0xf860b,0xf8680,
    0xf868b,0xf87b0,0xf8802,0xf886b,0xf8d70,0xf8f33,0xf9018,0xf9083,
    0xf91e0,0xf9203,0xf9248,0xf9283,0xf9290,0xf9303,0xf9330,0xf9803,
    0xfb6c0,0xfb6e3,0xfb768,0xfb783,0xfb7e8,0xfb803,0xfbbb8,0xfbbdb,
    0xfbed0,0xfbf03,0xfbf60,0xfbf83,0xfbf88,0xfc003,0xfc060,0xfc083,
    0xfc240,0xfc283,0xfc2d0,0xfc303,0xfc440,0xfc483,0xfc570,0xfc583,
    0xfc590,0xfc803,0xfd2a0,0xfd303,0xfd370,0xfd383,0xfd3e8,0xfd403,
    0xfd448,0xfd483,0xfd5f0,0xfd5fb,0xfd630,0xfd673,0xfd6e0,0xfd703,
    0xfd748,0xfd783,0xfd7c8,0xfd803,0xfdc98,0xfdca3,0xfde58,0xfdf82,
    0xfdfd0,0x100001,0x153700,0x153801,0x15b9d0,0x15ba01,0x15c0f0,0x15c101,
    0x167510,0x167581,0x175f08,0x17c001,0x17d0f0,0x180001,0x189a58,0x189a81,
    0x191d80,0x700801,0x700f80,
};
/* END GENERATED UNICODE TABLE */

static enum unicode_class unicode_class_of(uint32_t cp) {
    size_t lo = 0, hi = sizeof(unicode_class_table) / sizeof(unicode_class_table[0]);
    if (cp > 0x10FFFF) return U_OTHER;                  /* includes TEXT_BAD_BYTE */
    while (hi - lo > 1) {                               /* last entry starting <= cp */
        size_t mid = lo + (hi - lo) / 2;
        if ((unicode_class_table[mid] >> 3) <= cp) lo = mid;
        else hi = mid;
    }
    return (enum unicode_class)(unicode_class_table[lo] & 7);
}

/* ---- 11.2 The pre-tokenizer --------------------------------------------------- */

/* BPE never merges across piece boundaries, so how text is cut into pieces
 * before BPE shapes every token the model sees. DeepSeek V3 and V4 cut in
 * three stages [TOKJ]. Each stage is a regex used in "isolated" mode: both
 * the matches and the stretches between matches become pieces, and each
 * stage runs on every piece the previous stage produced.
 *
 *     1.  \p{N}{1,3}
 *     2.  [一-龥぀-ゟ゠-ヿ]+             (U+4E00-9FA5, U+3040-309F, U+30A0-30FF)
 *     3.  one alternation, tried left to right at each position:
 *         a.  [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+
 *         b.  [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+
 *         c.   ?[\p{P}\p{S}]+[\r\n]*
 *         d.  \s*[\r\n]+
 *         e.  \s+(?!\S)
 *         f.  \s+
 *
 * What that means in practice:
 *
 *   - digits go in threes from the left: "2048" is "204" "8", and the space
 *     before a number stays alone: " 2048" is " " "204" "8";
 *   - one ASCII punctuation mark glues to the ASCII word after it: ".json",
 *     "(buf", "#include";
 *   - a word takes one leading non-letter with it, usually its space:
 *     " world";
 *   - punctuation runs keep their trailing newlines: ");\n";
 *   - in a run of spaces before a word, the last space goes with the word:
 *     "    int" is "   " " int" (that is rule e's lookahead at work);
 *   - Chinese and Japanese kana runs are cut out whole before rule 3 sees
 *     them, so "中文English" is "中文" "English".
 *
 * Rule b in detail, because it hides a subtlety. Its optional first
 * character may be anything except \r, \n, a letter, punctuation or a
 * symbol: so a space, a digit, a mark, a control character. Then comes a run
 * of letters and marks. If the character at the start is itself a letter or
 * a mark, the run simply starts there (for a mark, taking it as the optional
 * character or as the first of the run gives the same match). This is why
 * letters and marks can share one class.
 *
 * We implement the stages by hand on an array of decoded code points, with
 * no regex engine. Stages 1 and 2 are plain run splitting. Stage 3 is
 * `pretok_match()`, which answers "the longest match of the alternation
 * starting exactly here", reproducing the backtracking of each rule:
 *
 *   d.  \s* first eats the whole white-space run, then gives characters back
 *       until [\r\n]+ can match: so the match ends just after the LAST
 *       newline of the run;
 *   e.  \s+ eats the run; if the piece ends there, done. Otherwise the next
 *       character is not white space, so (?!\S) fails, and \s+ gives back
 *       one character: the match is the run minus its last character (and
 *       needs at least two characters);
 *   f.  otherwise the whole run (a single white-space character before a
 *       non-space lands here).
 *
 * Lookahead never sees past the end of the current piece, because each
 * stage runs on pieces, not on the whole text; the stages must therefore be
 * applied strictly one piece at a time, as below. */

struct pretok_text {
    const char *bytes;      /* the span being cut */
    uint32_t *cp;           /* [n] code points, TEXT_BAD_BYTE for bad bytes */
    uint8_t *cls;           /* [n] enum unicode_class of each */
    size_t *off;            /* [n+1] byte offset of each code point; off[n] = span length */
    size_t n;
};

/* Where pieces go: `emit(ctx, byte_start, byte_end)`, in text order. */
typedef void (*pretok_emit_fn)(void *ctx, size_t start, size_t end);

static bool pretok_is_cjk(uint32_t c) {
    return (c >= 0x4E00 && c <= 0x9FA5) || (c >= 0x3040 && c <= 0x309F) ||
           (c >= 0x30A0 && c <= 0x30FF);
}

static bool pretok_is_ascii_punct(uint32_t c) {
    return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) ||
           (c >= 0x5B && c <= 0x60) || (c >= 0x7B && c <= 0x7E);
}

static bool pretok_is_ascii_letter(uint32_t c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static bool pretok_is_newline(uint32_t c) {
    return c == '\r' || c == '\n';
}

/* End of the run of class `cls` that starts at i (i itself must qualify). */
static size_t pretok_run_end(const struct pretok_text *t, size_t i, size_t end,
                             enum unicode_class cls) {
    while (i < end && t->cls[i] == cls) i++;
    return i;
}

/* Stage 3: the end of the match starting at i, or i if nothing matches. */
static size_t pretok_match(const struct pretok_text *t, size_t i, size_t end) {
    const uint32_t *cp = t->cp;
    const uint8_t *cls = t->cls;
    bool has_next = i + 1 < end;

    /* a. one ASCII punctuation mark + ASCII letters */
    if (pretok_is_ascii_punct(cp[i]) && has_next && pretok_is_ascii_letter(cp[i + 1])) {
        size_t j = i + 1;
        while (j < end && pretok_is_ascii_letter(cp[j])) j++;
        return j;
    }
    /* b. optional non-letter/punct/newline, then letters and marks */
    if (cls[i] == U_LETTER) return pretok_run_end(t, i, end, U_LETTER);
    if (!pretok_is_newline(cp[i]) && cls[i] != U_PUNCT && has_next && cls[i + 1] == U_LETTER)
        return pretok_run_end(t, i + 1, end, U_LETTER);
    /* c. optional space, punctuation/symbols, trailing newlines */
    size_t k = (cp[i] == ' ' && has_next && cls[i + 1] == U_PUNCT) ? i + 1 : i;
    if (cls[k] == U_PUNCT) {
        size_t j = pretok_run_end(t, k, end, U_PUNCT);
        while (j < end && pretok_is_newline(cp[j])) j++;
        return j;
    }
    if (cls[i] != U_SPACE) return i;
    /* d, e, f: white space */
    size_t j = pretok_run_end(t, i, end, U_SPACE);
    for (size_t q = j; q > i; q--)
        if (pretok_is_newline(cp[q - 1])) return q;    /* d */
    if (j == end) return j;                             /* e, at the end of the piece */
    if (j - i >= 2) return j - 1;                       /* e, giving one back */
    return j;                                           /* f */
}

/* Stage 3 on code points [a, b): matches and the gaps between them. */
static void pretok_stage3(const struct pretok_text *t, size_t a, size_t b, pretok_emit_fn emit,
                          void *ctx) {
    size_t gap = a, i = a;
    while (i < b) {
        size_t m = pretok_match(t, i, b);
        if (m == i) {
            i++;
            continue;
        }
        if (gap < i) emit(ctx, t->off[gap], t->off[i]);
        emit(ctx, t->off[i], t->off[m]);
        i = gap = m;
    }
    if (gap < b) emit(ctx, t->off[gap], t->off[b]);
}

/* Stage 2 on [a, b): alternate CJK runs and non-CJK runs. */
static void pretok_stage2(const struct pretok_text *t, size_t a, size_t b, pretok_emit_fn emit,
                          void *ctx) {
    size_t i = a;
    while (i < b) {
        bool cjk = pretok_is_cjk(t->cp[i]);
        size_t j = i;
        while (j < b && pretok_is_cjk(t->cp[j]) == cjk) j++;
        pretok_stage3(t, i, j, emit, ctx);
        i = j;
    }
}

/* Stage 1 on the whole span: groups of at most three numbers, and the
 * stretches between them. */
static void pretok_stage1(const struct pretok_text *t, pretok_emit_fn emit, void *ctx) {
    size_t i = 0;
    while (i < t->n) {
        size_t j = i;
        if (t->cls[i] == U_NUMBER)
            while (j < t->n && t->cls[j] == U_NUMBER && j - i < 3) j++;
        else
            while (j < t->n && t->cls[j] != U_NUMBER) j++;
        pretok_stage2(t, i, j, emit, ctx);
        i = j;
    }
}

/* Cut s[0..len) into pieces. The decoded arrays live only for this call. */
static void pretokenize(const char *s, size_t len, pretok_emit_fn emit, void *ctx) {
    struct pretok_text t = {.bytes = s};
    if (len == 0) return;
    t.cp = xmalloc(len * sizeof *t.cp);
    t.cls = xmalloc(len);
    t.off = xmalloc((len + 1) * sizeof *t.off);
    for (size_t at = 0, used; at < len; at += used) {
        t.off[t.n] = at;
        t.cp[t.n] = utf8_decode((const unsigned char *)s + at, len - at, &used);
        t.cls[t.n] = (uint8_t)unicode_class_of(t.cp[t.n]);
        t.n++;
    }
    t.off[t.n] = len;
    pretok_stage1(&t, emit, ctx);
    free(t.cp);
    free(t.cls);
    free(t.off);
}

/* ---- 11.3 The vocabulary ------------------------------------------------------ */

/* BPE works on bytes, but a vocabulary file stores tokens as text. GPT-2's
 * trick [GPT2] is a reversible map from the 256 byte values to 256
 * printable code points, so every byte string is a printable string:
 *
 *   - bytes 0x21-0x7E, 0xA1-0xAC and 0xAE-0xFF map to the code point of the
 *     same value ('a' is 'a', 0xE9 is 'é');
 *   - the other 68 bytes (controls, space, 0x7F-0xA0, 0xAD) map, in
 *     ascending byte order, to U+0100, U+0101, ... U+0143. So a space is
 *     U+0120 'Ġ' and a newline U+010A 'Ċ'.
 *
 * The GGUF keys the loader hands us [LAYOUT §3.1]:
 *
 *     tokenizer.ggml.tokens   129,280 strings; index = token id; each in
 *                             byte-mapped form, except the added tokens
 *                             (<｜User｜>, <think>, ...) which are literal
 *     tokenizer.ggml.merges   127,741 strings "LEFT RIGHT" (one ASCII space,
 *                             which never occurs inside a mapped token);
 *                             index = merge rank, lower merges first
 *
 * Which tokens are "special"? The file has no flag we rely on. A base token
 * is either one mapped byte or the product of a merge; anything else was
 * added to the vocabulary by hand (BOS, EOS, <｜User｜>, <think>, ｜DSML｜,
 * the place holders...). Those are the special tokens: they are never made
 * by BPE, they decode to their literal text, and tokenize() finds them by
 * string, but only when the caller asks it to.
 *
 * Lookups go through two open-addressing hash tables (linear probing, size a
 * power of two at least twice the entries): token string -> id, and
 * (left id, right id) -> (rank, merged id). */

struct tok_merge {
    uint32_t left, right;   /* token ids of the pair; left == UINT32_MAX: empty slot */
    uint32_t rank;          /* index in tokenizer.ggml.merges */
    uint32_t merged;        /* token id of left+right */
};

/* One node of the special-token trie: a byte, the token ending here (or -1),
 * the first child and the next sibling (0 = none; node 0 is the root). */
struct tok_trie_node {
    int32_t token;
    uint32_t child, sibling;
    unsigned char byte;
};

/* Ids of the special tokens the engine and the chat template use, looked up
 * by their strings; -1 where the vocabulary lacks one. */
struct special_tokens {
    int32_t bos;            /* <｜begin▁of▁sentence｜>   0 in DeepSeek V4 */
    int32_t eos;            /* <｜end▁of▁sentence｜>     1 */
    int32_t pad;            /* <｜▁pad▁｜>               2 */
    int32_t user;           /* <｜User｜>                128803 */
    int32_t assistant;      /* <｜Assistant｜>           128804 */
    int32_t think_start;    /* <think>                  128821 */
    int32_t think_end;      /* </think>                 128822 */
    int32_t dsml;           /* ｜DSML｜                  128825 */
    int32_t latest_reminder;/* <｜latest_reminder｜>     128828 */
    int32_t eot;            /* <|EOT|>                  128805 */
};

struct tokenizer {
    uint32_t n_tokens;
    char *text;             /* all token strings, as in the file, back to back */
    size_t *text_off;       /* [n_tokens+1] token i is text[text_off[i] .. text_off[i+1]) */
    char *bytes;            /* all tokens decoded to raw bytes */
    size_t *bytes_off;      /* [n_tokens+1] like text_off */
    uint8_t *special;       /* [n_tokens] 1 for added tokens */
    int32_t byte_token[256];/* the single-byte token of each byte value */
    uint32_t *vocab;        /* [vocab_mask+1] hash slots holding id+1, 0 = empty */
    uint32_t vocab_mask;
    struct tok_merge *merges; /* [merge_mask+1] hash slots */
    uint32_t merge_mask;
    uint32_t n_merges;
    struct tok_trie_node *trie; /* special tokens by string; node 0 is the root */
    uint32_t n_trie;
    struct special_tokens sp;
};

static void tok_byte_to_codepoint(uint32_t map[256]) {
    uint32_t extra = 0;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        map[b] = printable ? (uint32_t)b : 256 + extra++;
    }
}

static int tok_fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int tok_fail(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (err && errlen) vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

/* FNV-1a for strings, and a 64-bit mixer (from SplitMix64) for id pairs. */
static uint64_t tok_hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

static uint64_t tok_hash_pair(uint32_t a, uint32_t b) {
    uint64_t x = ((uint64_t)a << 32) | b;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint32_t tok_table_mask(size_t entries) {
    size_t size = 16;
    while (size < 2 * entries) size *= 2;
    return (uint32_t)(size - 1);
}

static int32_t tok_lookup(const struct tokenizer *t, const char *s, size_t n) {
    for (uint64_t h = tok_hash_bytes(s, n) & t->vocab_mask;; h = (h + 1) & t->vocab_mask) {
        uint32_t slot = t->vocab[h];
        if (slot == 0) return -1;
        size_t a = t->text_off[slot - 1], len = t->text_off[slot] - a;
        if (len == n && memcmp(t->text + a, s, n) == 0) return (int32_t)(slot - 1);
    }
}

static const struct tok_merge *tok_find_merge(const struct tokenizer *t, uint32_t left,
                                              uint32_t right) {
    for (uint64_t h = tok_hash_pair(left, right) & t->merge_mask;; h = (h + 1) & t->merge_mask) {
        const struct tok_merge *m = &t->merges[h];
        if (m->left == UINT32_MAX) return NULL;
        if (m->left == left && m->right == right) return m;
    }
}

/* Copy the token strings and index them. A repeated string keeps its first
 * id, so lookups are deterministic even for a malformed file. */
static void tok_build_vocab(struct tokenizer *t, const char *const *tokens, const uint32_t *lens) {
    size_t total = 0;
    for (uint32_t i = 0; i < t->n_tokens; i++) total += lens[i];
    t->text = xmalloc(total + 1);
    t->text_off = xmalloc((t->n_tokens + 1) * sizeof *t->text_off);
    total = 0;
    for (uint32_t i = 0; i < t->n_tokens; i++) {
        t->text_off[i] = total;
        memcpy(t->text + total, tokens[i], lens[i]);
        total += lens[i];
    }
    t->text_off[t->n_tokens] = total;
    t->vocab_mask = tok_table_mask(t->n_tokens);
    t->vocab = xcalloc((size_t)t->vocab_mask + 1, sizeof *t->vocab);
    for (uint32_t i = 0; i < t->n_tokens; i++) {
        const char *s = t->text + t->text_off[i];
        size_t n = lens[i];
        if (tok_lookup(t, s, n) >= 0) continue;
        uint64_t h = tok_hash_bytes(s, n) & t->vocab_mask;
        while (t->vocab[h] != 0) h = (h + 1) & t->vocab_mask;
        t->vocab[h] = i + 1;
    }
}

static int tok_build_byte_tokens(struct tokenizer *t, char *err, size_t errlen) {
    uint32_t map[256];
    tok_byte_to_codepoint(map);
    for (int b = 0; b < 256; b++) {
        char u[4];
        size_t n = utf8_encode(u, map[b]);
        t->byte_token[b] = tok_lookup(t, u, n);
        if (t->byte_token[b] < 0)
            return tok_fail(err, errlen, "tokenizer: no token for the single byte 0x%02x", b);
    }
    return 0;
}

/* Parse "LEFT RIGHT" number `rank` and enter the pair. All three tokens
 * (left, right and their concatenation) must exist. */
static int tok_add_merge(struct tokenizer *t, uint32_t rank, const char *s, size_t n, char *err,
                         size_t errlen) {
    const char *space = memchr(s, ' ', n);
    if (space == NULL || space == s || space == s + n - 1)
        return tok_fail(err, errlen, "tokenizer: merge %u is not \"LEFT RIGHT\"", rank);
    size_t nl = (size_t)(space - s), nr = n - nl - 1;
    char *joined = xmalloc(nl + nr);
    memcpy(joined, s, nl);
    memcpy(joined + nl, space + 1, nr);
    int32_t left = tok_lookup(t, s, nl), right = tok_lookup(t, space + 1, nr);
    int32_t merged = tok_lookup(t, joined, nl + nr);
    free(joined);
    if (left < 0 || right < 0 || merged < 0)
        return tok_fail(err, errlen,
                        "tokenizer: merge %u (\"%.*s\") names a token not in the vocabulary", rank,
                        (int)(n > 60 ? 60 : n), s);
    if (tok_find_merge(t, (uint32_t)left, (uint32_t)right)) return 0;   /* keep the lower rank */
    uint64_t h = tok_hash_pair((uint32_t)left, (uint32_t)right) & t->merge_mask;
    while (t->merges[h].left != UINT32_MAX) h = (h + 1) & t->merge_mask;
    t->merges[h] = (struct tok_merge){(uint32_t)left, (uint32_t)right, rank, (uint32_t)merged};
    t->special[merged] = 0;                             /* made by a merge: a base token */
    return 0;
}

static int tok_build_merges(struct tokenizer *t, uint32_t n_merges, const char *const *merges,
                            const uint32_t *lens, char *err, size_t errlen) {
    t->n_merges = n_merges;
    t->merge_mask = tok_table_mask(n_merges);
    t->merges = xmalloc(((size_t)t->merge_mask + 1) * sizeof *t->merges);
    for (size_t i = 0; i <= t->merge_mask; i++) t->merges[i].left = UINT32_MAX;
    for (uint32_t r = 0; r < n_merges; r++)
        if (tok_add_merge(t, r, merges[r], lens[r], err, errlen) != 0) return -1;
    return 0;
}

/* Decode every token once, at load time, so detokenizing is a copy. A base
 * token's characters go back through the inverse byte map; a code point the
 * map does not cover (a stray non-mapped character) is kept as its UTF-8.
 * A special token is its literal text. */
static void tok_build_bytes(struct tokenizer *t) {
    uint32_t map[256];
    int16_t inverse[324];
    tok_byte_to_codepoint(map);
    for (int i = 0; i < 324; i++) inverse[i] = -1;
    for (int b = 0; b < 256; b++) inverse[map[b]] = (int16_t)b;
    t->bytes = xmalloc(t->text_off[t->n_tokens] + 1);
    t->bytes_off = xmalloc((t->n_tokens + 1) * sizeof *t->bytes_off);
    size_t out = 0;
    for (uint32_t id = 0; id < t->n_tokens; id++) {
        const unsigned char *s = (const unsigned char *)t->text + t->text_off[id];
        size_t n = t->text_off[id + 1] - t->text_off[id];
        t->bytes_off[id] = out;
        for (size_t at = 0, used; at < n; at += used) {
            uint32_t cp = utf8_decode(s + at, n - at, &used);
            if (!t->special[id] && cp < 324 && inverse[cp] >= 0) {
                t->bytes[out++] = (char)inverse[cp];
            } else {
                memcpy(t->bytes + out, s + at, used);
                out += used;
            }
        }
    }
    t->bytes_off[t->n_tokens] = out;
}

/* The trie of special-token strings, for longest-match search in 11.5. */
static uint32_t tok_trie_child(struct tokenizer *t, uint32_t node, unsigned char byte) {
    uint32_t c = t->trie[node].child;
    for (; c != 0; c = t->trie[c].sibling)
        if (t->trie[c].byte == byte) return c;
    c = t->n_trie++;
    t->trie[c] = (struct tok_trie_node){-1, 0, t->trie[node].child, byte};
    t->trie[node].child = c;
    return c;
}

static void tok_build_trie(struct tokenizer *t) {
    size_t nodes = 1;
    for (uint32_t id = 0; id < t->n_tokens; id++)
        if (t->special[id]) nodes += t->text_off[id + 1] - t->text_off[id];
    t->trie = xmalloc(nodes * sizeof *t->trie);
    t->trie[0] = (struct tok_trie_node){-1, 0, 0, 0};
    t->n_trie = 1;
    for (uint32_t id = 0; id < t->n_tokens; id++) {
        if (!t->special[id]) continue;
        uint32_t node = 0;
        for (size_t i = t->text_off[id]; i < t->text_off[id + 1]; i++)
            node = tok_trie_child(t, node, (unsigned char)t->text[i]);
        if (node != 0 && t->trie[node].token < 0) t->trie[node].token = (int32_t)id;
    }
}

static int32_t tok_special_id(const struct tokenizer *t, const char *s) {
    return tok_lookup(t, s, strlen(s));
}

static void tok_find_specials(struct tokenizer *t) {
    struct special_tokens *sp = &t->sp;
    sp->bos = tok_special_id(t, "<｜begin▁of▁sentence｜>");
    sp->eos = tok_special_id(t, "<｜end▁of▁sentence｜>");
    sp->pad = tok_special_id(t, "<｜▁pad▁｜>");
    sp->user = tok_special_id(t, "<｜User｜>");
    sp->assistant = tok_special_id(t, "<｜Assistant｜>");
    sp->think_start = tok_special_id(t, "<think>");
    sp->think_end = tok_special_id(t, "</think>");
    sp->dsml = tok_special_id(t, "｜DSML｜");
    sp->latest_reminder = tok_special_id(t, "<｜latest_reminder｜>");
    sp->eot = tok_special_id(t, "<|EOT|>");
}

static void tokenizer_free(struct tokenizer *t) {
    free(t->text);
    free(t->text_off);
    free(t->bytes);
    free(t->bytes_off);
    free(t->special);
    free(t->vocab);
    free(t->merges);
    free(t->trie);
    memset(t, 0, sizeof *t);
}

/* Build a tokenizer from the two GGUF arrays. The strings are copied, so the
 * caller may unmap the file afterwards. Returns 0, or -1 with a message. */
static int tokenizer_init(struct tokenizer *t, uint32_t n_tokens, const char *const *tokens,
                          const uint32_t *token_lens, uint32_t n_merges, const char *const *merges,
                          const uint32_t *merge_lens, char *err, size_t errlen) {
    memset(t, 0, sizeof *t);
    if (n_tokens < 256 || n_tokens > INT32_MAX)
        return tok_fail(err, errlen, "tokenizer: %u tokens is not a byte-level vocabulary",
                        n_tokens);
    t->n_tokens = n_tokens;
    tok_build_vocab(t, tokens, token_lens);
    t->special = xmalloc(n_tokens);
    memset(t->special, 1, n_tokens);
    if (tok_build_byte_tokens(t, err, errlen) != 0) goto fail;
    for (int b = 0; b < 256; b++) t->special[t->byte_token[b]] = 0;
    if (tok_build_merges(t, n_merges, merges, merge_lens, err, errlen) != 0) goto fail;
    tok_build_bytes(t);
    tok_build_trie(t);
    tok_find_specials(t);
    return 0;
fail:
    tokenizer_free(t);
    return -1;
}

/* ---- 11.4 BPE: merging one piece -------------------------------------------- */

/* A piece starts as one symbol per byte (its single-byte token). Then,
 * repeatedly, the adjacent pair with the lowest merge rank is replaced by
 * its merged token, the leftmost one if a rank occurs twice; when no
 * adjacent pair has a rank, the symbols are the piece's tokens.
 *
 * Rescanning all pairs after every merge costs O(n^2) on a long piece (a run
 * of 5,000 'x', a base64 blob). Instead the symbols form a doubly linked
 * list, and every candidate pair sits in a min-heap keyed by (rank, left
 * position). A merge changes only the two pairs around the new symbol, so
 * each merge pushes at most two new candidates: O(n log n) in all.
 *
 * The heap may hold stale candidates (a pair whose symbols were since merged
 * into something else). We do not remove them; when one reaches the top we
 * check that the two neighbours still carry the ids it was pushed with, and
 * skip it if not. A pushed pair's rank depends only on its two ids, so a
 * candidate that passes the check is exactly as valid as a fresh one. */

struct bpe_candidate {
    uint32_t rank;
    uint32_t pos;           /* index of the left symbol */
    int32_t left, right;    /* the ids it was pushed with */
};

struct bpe_work {
    int32_t *id;            /* [n] symbol token id; -1 once merged away */
    int32_t *prev, *next;   /* [n] neighbours in the list, -1 at the ends */
    struct bpe_candidate *heap;
    size_t n_heap, cap;     /* cap: symbols the arrays can hold */
};

static bool bpe_before(const struct bpe_candidate *a, const struct bpe_candidate *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void bpe_push(struct bpe_work *w, struct bpe_candidate c) {
    size_t i = w->n_heap++;
    while (i > 0 && bpe_before(&c, &w->heap[(i - 1) / 2])) {
        w->heap[i] = w->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    w->heap[i] = c;
}

static struct bpe_candidate bpe_pop(struct bpe_work *w) {
    struct bpe_candidate top = w->heap[0], last = w->heap[--w->n_heap];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= w->n_heap) break;
        if (c + 1 < w->n_heap && bpe_before(&w->heap[c + 1], &w->heap[c])) c++;
        if (!bpe_before(&w->heap[c], &last)) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (w->n_heap > 0) w->heap[i] = last;
    return top;
}

/* Push the pair starting at symbol `pos` if it has a merge. */
static void bpe_consider(const struct tokenizer *t, struct bpe_work *w, int32_t pos) {
    if (pos < 0 || w->next[pos] < 0) return;
    int32_t l = w->id[pos], r = w->id[w->next[pos]];
    const struct tok_merge *m = tok_find_merge(t, (uint32_t)l, (uint32_t)r);
    if (m) bpe_push(w, (struct bpe_candidate){m->rank, (uint32_t)pos, l, r});
}

static void bpe_reserve(struct bpe_work *w, size_t n) {
    if (n <= w->cap) return;
    w->cap = n;
    w->id = xrealloc(w->id, n * sizeof *w->id);
    w->prev = xrealloc(w->prev, n * sizeof *w->prev);
    w->next = xrealloc(w->next, n * sizeof *w->next);
    /* each merge pushes at most two candidates on top of the n-1 initial ones */
    w->heap = xrealloc(w->heap, 3 * n * sizeof *w->heap);
}

/* Encode one piece s[0..n) and append its ids to ids[] (grown as needed). */
static void bpe_piece(const struct tokenizer *t, struct bpe_work *w, const unsigned char *s,
                      size_t n, int32_t **ids, size_t *n_ids, size_t *cap_ids) {
    bpe_reserve(w, n);
    w->n_heap = 0;
    for (size_t i = 0; i < n; i++) {
        w->id[i] = t->byte_token[s[i]];
        w->prev[i] = (int32_t)i - 1;
        w->next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    for (size_t i = 0; i + 1 < n; i++) bpe_consider(t, w, (int32_t)i);
    while (w->n_heap > 0) {
        struct bpe_candidate c = bpe_pop(w);
        int32_t l = (int32_t)c.pos, r = w->next[l];
        if (r < 0 || w->id[l] != c.left || w->id[r] != c.right) continue;   /* stale */
        w->id[l] = (int32_t)tok_find_merge(t, (uint32_t)c.left, (uint32_t)c.right)->merged;
        w->id[r] = -1;
        w->next[l] = w->next[r];
        if (w->next[r] >= 0) w->prev[w->next[r]] = l;
        bpe_consider(t, w, w->prev[l]);
        bpe_consider(t, w, l);
    }
    for (int32_t i = n ? 0 : -1; i >= 0; i = w->next[i]) {
        if (*n_ids == *cap_ids) {
            *cap_ids = *cap_ids ? 2 * *cap_ids : 64;
            *ids = xrealloc(*ids, *cap_ids * sizeof **ids);
        }
        (*ids)[(*n_ids)++] = w->id[i];
    }
}

static void bpe_work_free(struct bpe_work *w) {
    free(w->id);
    free(w->prev);
    free(w->next);
    free(w->heap);
}

/* ---- 11.5 tokenize() ------------------------------------------------------------ */

/* Special tokens come first. With parse_special, the text is scanned for
 * special-token strings, the longest one wins at each position (as HF
 * tokenizers does for added tokens), and the plain text between them goes
 * through the pre-tokenizer and BPE on its own. Without it, "<｜User｜>"
 * typed by a user is just characters, tokenized like any others: this is
 * what keeps user text from forging turn markers. The chat template output
 * is tokenized with parse_special = true; user-supplied raw text with false.
 *
 * The pre-tokenizer calls back once per piece; the callback runs BPE. */

struct tok_run {
    const struct tokenizer *t;
    struct bpe_work work;
    const char *text;       /* the span being pre-tokenized */
    int32_t *ids;
    size_t n_ids, cap_ids;
};

static void tok_emit_piece(void *ctx, size_t start, size_t end) {
    struct tok_run *r = ctx;
    bpe_piece(r->t, &r->work, (const unsigned char *)r->text + start, end - start, &r->ids,
              &r->n_ids, &r->cap_ids);
}

static void tok_plain(struct tok_run *r, const char *s, size_t n) {
    r->text = s;
    pretokenize(s, n, tok_emit_piece, r);
}

/* The special token that starts at s (longest match), or -1; *len its length. */
static int32_t tok_match_special(const struct tokenizer *t, const char *s, size_t n, size_t *len) {
    int32_t best = -1;
    uint32_t node = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t c = t->trie[node].child;
        while (c != 0 && t->trie[c].byte != (unsigned char)s[i]) c = t->trie[c].sibling;
        if (c == 0) break;
        node = c;
        if (t->trie[node].token >= 0) {
            best = t->trie[node].token;
            *len = i + 1;
        }
    }
    return best;
}

/* Tokenize text[0..len) into a new array *out of *n ids (free() it).
 * Always succeeds (returns 0); invalid UTF-8 is encoded byte by byte. */
static int tokenize(const struct tokenizer *t, const char *text, size_t len, bool parse_special,
                    int32_t **out, size_t *n) {
    struct tok_run r = {.t = t};
    size_t plain = 0;
    for (size_t i = 0; parse_special && i < len; i++) {
        size_t mlen = 0;
        int32_t id = tok_match_special(t, text + i, len - i, &mlen);
        if (id < 0) continue;
        tok_plain(&r, text + plain, i - plain);
        if (r.n_ids == r.cap_ids) {
            r.cap_ids = r.cap_ids ? 2 * r.cap_ids : 64;
            r.ids = xrealloc(r.ids, r.cap_ids * sizeof *r.ids);
        }
        r.ids[r.n_ids++] = id;
        i += mlen - 1;
        plain = i + 1;
    }
    tok_plain(&r, text + plain, len - plain);
    bpe_work_free(&r.work);
    *out = r.ids;
    *n = r.n_ids;
    return 0;
}

/* ---- 11.6 Decoding ---------------------------------------------------------------- */

/* The bytes of one token, or NULL for an id outside the vocabulary. */
static const char *token_bytes(const struct tokenizer *t, int32_t id, size_t *len) {
    if (id < 0 || (uint32_t)id >= t->n_tokens) return NULL;
    *len = t->bytes_off[id + 1] - t->bytes_off[id];
    return t->bytes + t->bytes_off[id];
}

/* Append the bytes of ids[0..n) to out. Ids outside the vocabulary are
 * skipped. The result may be invalid UTF-8 if the ids are (a sampled
 * sequence can stop in the middle of a character). */
static void detokenize(const struct tokenizer *t, const int32_t *ids, size_t n,
                       struct strbuf *out) {
    for (size_t i = 0; i < n; i++) {
        size_t len;
        const char *b = token_bytes(t, ids[i], &len);
        if (b) strbuf_append(out, b, len);
    }
}

/* Streaming. A token can end in the middle of a character: "😀" is four
 * bytes, often split over two or three tokens. Printing each token's bytes
 * at once would show a broken character on a terminal, and an HTTP client
 * would turn it into U+FFFD for good (and send that back next turn, which
 * also defeats prompt caching). So the stream holds back an unfinished
 * character (at most 3 bytes) until a later token completes it.
 *
 * Bytes that can never become a valid character are passed through at once:
 * holding them would only delay the same bytes. token_stream_flush() at the
 * end of generation releases whatever is still held. The concatenation of
 * everything a stream emits always equals detokenize() of the same ids. */

struct token_stream {
    char held[4];
    size_t n_held;
};

static void token_stream_bytes(struct token_stream *s, const char *b, size_t n,
                               struct strbuf *out) {
    size_t start = out->len;
    strbuf_append(out, s->held, s->n_held);
    strbuf_append(out, b, n);
    if (out->oom) return;
    size_t keep = utf8_unfinished_tail((const unsigned char *)out->data + start, out->len - start);
    memcpy(s->held, out->data + out->len - keep, keep);
    s->n_held = keep;
    out->len -= keep;
    out->data[out->len] = '\0';
}

static void token_stream_push(const struct tokenizer *t, struct token_stream *s, int32_t id,
                              struct strbuf *out) {
    size_t len;
    const char *b = token_bytes(t, id, &len);
    if (b) token_stream_bytes(s, b, len, out);
}

static void token_stream_flush(struct token_stream *s, struct strbuf *out) {
    strbuf_append(out, s->held, s->n_held);
    s->n_held = 0;
}

/* ---- 11.7 Python-style JSON ------------------------------------------------------ */

/* The official encoder [ENC] writes JSON with Python's
 * json.dumps(value, ensure_ascii=False): tool schemas in the system prompt,
 * non-string tool arguments in DSML, the response format. The bytes matter,
 * so we reproduce that writer rather than use the compact one of the JSON
 * chapter:
 *
 *   - separators ", " and ": ";
 *   - strings escape only '"', '\\' and the controls below 0x20 (\n \r \t
 *     \b \f by name, the rest as \u00xx with lowercase hex); all other
 *     characters, including non-ASCII, are written as they are;
 *   - an object is a Python dict: if a key repeats, it appears once, at the
 *     place of its first occurrence, with the value of its last;
 *   - numbers: Python keeps integers and floats apart, and prints a float
 *     with repr(): the shortest digits that read back to the same double,
 *     in positional notation when the decimal exponent is in [-4, 16), else
 *     as "1.5e+20"; always with a '.' or an 'e' ("2.0", not "2").
 *
 * LIMITATION. Our JSON tree keeps a number only as a double, so we cannot
 * tell "2" from "2.0" in the input. We print every integral value below 1e16
 * as an integer, which is right for the integers that tool schemas and
 * arguments are made of, and wrong only for floats written with a zero
 * fraction ("2.0" comes out as "2"). */

static void pyjson_string(struct strbuf *b, const char *s, size_t n) {
    size_t run = 0;
    strbuf_append(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        strbuf_append(b, s + run, i - run);
        run = i + 1;
        switch (c) {
        case '"':  strbuf_puts(b, "\\\""); break;
        case '\\': strbuf_puts(b, "\\\\"); break;
        case '\n': strbuf_puts(b, "\\n"); break;
        case '\r': strbuf_puts(b, "\\r"); break;
        case '\t': strbuf_puts(b, "\\t"); break;
        case '\b': strbuf_puts(b, "\\b"); break;
        case '\f': strbuf_puts(b, "\\f"); break;
        default:   strbuf_printf(b, "\\u%04x", c); break;
        }
    }
    strbuf_append(b, s + run, n - run);
    strbuf_append(b, "\"", 1);
}

/* Python's repr() of a float: find the fewest significant digits (1..17)
 * that read back exactly, then lay them out as described above. */
static void pyjson_float(struct strbuf *b, double v) {
    char sci[40], digits[24];
    int prec, exp10 = 0;
    for (prec = 1; prec <= 17; prec++) {
        snprintf(sci, sizeof sci, "%.*e", prec - 1, v);
        if (strtod(sci, NULL) == v) break;
    }
    /* sci is "-d.ddde+XX": collect the digits and the exponent */
    size_t nd = 0;
    const char *p = sci;
    if (*p == '-') {
        strbuf_append(b, "-", 1);
        p++;
    }
    for (; *p && *p != 'e'; p++)
        if (*p >= '0' && *p <= '9') digits[nd++] = *p;
    if (*p == 'e') exp10 = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    digits[nd] = '\0';
    if (exp10 >= -4 && exp10 < 16) {
        if (exp10 < 0) {
            strbuf_puts(b, "0.");
            for (int i = -1; i > exp10; i--) strbuf_append(b, "0", 1);
            strbuf_append(b, digits, nd);
            return;
        }
        size_t whole = (size_t)exp10 + 1;
        for (size_t i = 0; i < whole; i++) strbuf_append(b, i < nd ? &digits[i] : "0", 1);
        strbuf_append(b, ".", 1);
        if (nd > whole) strbuf_append(b, digits + whole, nd - whole);
        else strbuf_append(b, "0", 1);
        return;
    }
    strbuf_append(b, digits, 1);
    if (nd > 1) {
        strbuf_append(b, ".", 1);
        strbuf_append(b, digits + 1, nd - 1);
    }
    strbuf_printf(b, "e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
}

static void pyjson_number(struct strbuf *b, double v) {
    if (isnan(v)) strbuf_puts(b, "NaN");
    else if (isinf(v)) strbuf_puts(b, v > 0 ? "Infinity" : "-Infinity");
    else if (v == 0) strbuf_puts(b, "0");
    else if (v == floor(v) && fabs(v) < 1e16) strbuf_printf(b, "%.0f", v);
    else pyjson_float(b, v);
}

/* Dict semantics for repeated keys: member i is written only if no earlier
 * member has its key, and then with the value of the last member that does. */
static bool pyjson_same_key(const struct json *obj, size_t i, size_t j) {
    return obj->key_lens[i] == obj->key_lens[j] &&
           memcmp(obj->keys[i], obj->keys[j], obj->key_lens[i]) == 0;
}

static bool pyjson_first_of_key(const struct json *obj, size_t i) {
    for (size_t j = 0; j < i; j++)
        if (pyjson_same_key(obj, i, j)) return false;
    return true;
}

static const struct json *pyjson_last_value(const struct json *obj, size_t i) {
    for (size_t j = obj->count; j-- > i;)
        if (pyjson_same_key(obj, i, j)) return &obj->items[j];
    return &obj->items[i];
}

static void pyjson_write(struct strbuf *b, const struct json *j) {
    if (j == NULL) {
        strbuf_puts(b, "null");
        return;
    }
    switch (j->kind) {
    case JSON_NULL:   strbuf_puts(b, "null"); break;
    case JSON_FALSE:  strbuf_puts(b, "false"); break;
    case JSON_TRUE:   strbuf_puts(b, "true"); break;
    case JSON_NUMBER: pyjson_number(b, j->number); break;
    case JSON_STRING: pyjson_string(b, j->string, j->len); break;
    case JSON_ARRAY:
        strbuf_append(b, "[", 1);
        for (size_t i = 0; i < j->count; i++) {
            if (i > 0) strbuf_append(b, ", ", 2);
            pyjson_write(b, &j->items[i]);
        }
        strbuf_append(b, "]", 1);
        break;
    case JSON_OBJECT: {
        bool first = true;
        strbuf_append(b, "{", 1);
        for (size_t i = 0; i < j->count; i++) {
            if (!pyjson_first_of_key(j, i)) continue;
            if (!first) strbuf_append(b, ", ", 2);
            first = false;
            pyjson_string(b, j->keys[i], j->key_lens[i]);
            strbuf_append(b, ": ", 2);
            pyjson_write(b, pyjson_last_value(j, i));
        }
        strbuf_append(b, "}", 1);
        break;
    }
    }
}

/* ---- 11.8 The chat template ------------------------------------------------------ */

/* DeepSeek ships no Jinja template for V4; the source of truth is the Python
 * encoder [ENC]. What it produces, for a conversation of messages:
 *
 *     BOS [Think-Max paragraph] message message ...
 *
 * and per message [LAYOUT §4.2]:
 *
 *     system        content [\n\n tools section] [\n\n response format]
 *     developer     <｜User｜> content [\n\n tools] [\n\n response format]
 *     user          <｜User｜> part \n\n part ...   (text, <tool_result>s)
 *     latest_reminder   <｜latest_reminder｜> content
 *     assistant     [reasoning </think>] content [\n\n DSML tool calls] EOS
 *
 * then, after a user or developer message that ends the list or is followed
 * by an assistant or latest_reminder message, the "transition" that hands
 * the turn to the model: <｜Assistant｜> and then <think> (thinking mode) or
 * </think> (chat mode, or a past turn whose reasoning was dropped).
 *
 * Before rendering, the encoder reshapes the list, and we do the same:
 *
 *   1. MERGE. There is no tool role in the prompt. A tool message becomes a
 *      tool-result block of a user turn; consecutive tool results, and a
 *      user message right after them, fold into one user turn whose parts
 *      are joined by a blank line.
 *   2. SORT. Inside such a turn, tool results are put in the order of the
 *      calls in the preceding assistant message (matched by call id).
 *   3. DROP. Reasoning is expensive context. In thinking mode, unless any
 *      message carries tools, assistant turns before the last user message
 *      lose their reasoning (and then open with </think>), and developer
 *      messages before it disappear.
 *
 * THINK MAX. With reasoning effort "max", a fixed paragraph asking for
 * exhaustive reasoning goes right after BOS. DeepSeek recommends it only
 * for contexts of at least 384K tokens (the reasoning it triggers is long),
 * so chat_render() silently uses normal thinking below that.
 *
 Choices of ours where the encoder has no answer:
 *
 *   - tools given next to the messages (an OpenAI request's "tools") attach
 *     to the first message, as DeepSeek's own tests do; if that message is
 *     not a system or developer message, an empty system message is put in
 *     front to carry them (the encoder would silently drop a tools list on
 *     a user message); a request-level response format attaches the same way;
 *   - a system message in the middle of the conversation that would break
 *     the hand-over to the model is folded into the user turn (MERGE, below);
 *   - a message "content" that is a list of parts has its text parts joined
 *     with "\n\n"; tool-call "arguments" given as a JSON object instead of
 *     a string are used as is. */

#define CHAT_THINK_MAX_MIN_CONTEXT 393216      /* 384K tokens, from the V4 model card */

enum chat_mode { CHAT_MODE_CHAT, CHAT_MODE_THINKING, CHAT_MODE_THINK_MAX };

struct chat_options {
    enum chat_mode mode;
    uint64_t context_tokens;   /* the session's context size; gates Think Max */
    bool keep_reasoning;       /* never drop earlier reasoning (drop_thinking=False) */
    bool no_bos;               /* continuing an already encoded prefix */
    const struct json *response_format;   /* request-level format; rendered like the tools */
};

static const char CHAT_BOS[] = "<｜begin▁of▁sentence｜>";
static const char CHAT_EOS[] = "<｜end▁of▁sentence｜>";
static const char CHAT_USER[] = "<｜User｜>";
static const char CHAT_ASSISTANT[] = "<｜Assistant｜>";
static const char CHAT_REMINDER[] = "<｜latest_reminder｜>";
static const char CHAT_THINK[] = "<think>";
static const char CHAT_END_THINK[] = "</think>";

/* The Think-Max paragraph and the tools section, byte for byte as the
 * official encoder writes them (they are data the model was trained on). */
static const char CHAT_THINK_MAX_TEXT[] =
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n";

static const char CHAT_TOOLS_HEAD[] =
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by "
    "writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n"
    "<｜DSML｜tool_calls>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
    "<｜DSML｜parameter name=\"$PARAMETER_NAME\" "
    "string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types "
    "(numbers, booleans, arrays, objects), pass the value in JSON format and set "
    "`string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning "
    "inside <think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n";

static const char CHAT_TOOLS_TAIL[] = "\n\nYou MUST strictly follow the above defined tool name "
                                      "and parameter schemas to invoke tool calls.\n";

static const char CHAT_RESPONSE_FORMAT[] =
    "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";

/* The quick-task markers a user message may request with "task". */
static const char *const CHAT_TASKS[][2] = {
    {"action", "<｜action｜>"}, {"query", "<｜query｜>"}, {"authority", "<｜authority｜>"},
    {"domain", "<｜domain｜>"}, {"title", "<｜title｜>"}, {"read_url", "<｜read_url｜>"},
};

enum chat_role {
    CHAT_SYSTEM,
    CHAT_USER_ROLE,
    CHAT_ASSISTANT_ROLE,
    CHAT_DEVELOPER,
    CHAT_LATEST_REMINDER,
    CHAT_TOOL,
    CHAT_UNKNOWN
};

/* One part of a merged user turn. */
struct chat_block {
    bool tool_result;
    const struct json *body;        /* text block: its text; tool result: its content */
    const struct json *call_id;     /* tool result: the tool_call_id it answers */
};

/* A message after MERGE: a view on the caller's JSON plus the merged parts. */
struct chat_msg {
    enum chat_role role;
    const struct json *src;         /* the message object; NULL for the synthetic system message */
    const struct json *tools;       /* its "tools" (or the request's tools) */
    const struct json *response_format;   /* its "response_format" (or the request's) */
    const struct json *task;        /* "task", or NULL */
    bool drop_reasoning;            /* set by DROP */
    struct chat_block *blocks;      /* user turns only */
    size_t n_blocks, cap_blocks;
};

struct chat_list {
    struct chat_msg *m;
    size_t n, cap;
};

/* Python truthiness, which the encoder uses for "if tools:" and friends. */
static bool chat_truthy(const struct json *v) {
    if (v == NULL) return false;
    switch (v->kind) {
    case JSON_NULL: case JSON_FALSE: return false;
    case JSON_TRUE: return true;
    case JSON_NUMBER: return v->number != 0;
    case JSON_STRING: return v->len > 0;
    default: return v->count > 0;
    }
}

static bool chat_is_str(const struct json *v, const char *s) {
    return json_is(v, JSON_STRING) && v->len == strlen(s) && memcmp(v->string, s, v->len) == 0;
}

static enum chat_role chat_role_of(const struct json *msg) {
    static const char *const names[] = {"system",          "user", "assistant", "developer",
                                        "latest_reminder", "tool"};
    const struct json *role = json_get(msg, "role");
    for (int r = 0; r < 6; r++)
        if (chat_is_str(role, names[r])) return (enum chat_role)r;
    return CHAT_UNKNOWN;
}

static struct chat_msg *chat_push(struct chat_list *l, enum chat_role role,
                                  const struct json *src) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 16;
        l->m = xrealloc(l->m, l->cap * sizeof *l->m);
    }
    struct chat_msg *m = &l->m[l->n++];
    memset(m, 0, sizeof *m);
    m->role = role;
    m->src = src;
    m->tools = json_get(src, "tools");
    m->response_format = json_get(src, "response_format");
    return m;
}

static void chat_add_block(struct chat_msg *m, bool tool_result, const struct json *body,
                           const struct json *id) {
    if (m->n_blocks == m->cap_blocks) {
        m->cap_blocks = m->cap_blocks ? 2 * m->cap_blocks : 4;
        m->blocks = xrealloc(m->blocks, m->cap_blocks * sizeof *m->blocks);
    }
    m->blocks[m->n_blocks++] = (struct chat_block){tool_result, body, id};
}

static void chat_list_free(struct chat_list *l) {
    for (size_t i = 0; i < l->n; i++) free(l->m[i].blocks);
    free(l->m);
}

/* MID-CONVERSATION SYSTEM MESSAGES. The encoder renders a system message
 * as its bare text wherever it stands, and hands the turn to the model only
 * after a user or developer message. That is sound at the start and after
 * an assistant's EOS, but a system message right after a user turn (as
 * agents send reminders) would land between <｜User｜>... and
 * <｜Assistant｜> and swallow the hand-over, and one that ends the list
 * after an assistant turn would leave the prompt with no <｜Assistant｜>
 * at all. There is no place for them in the official encoding, so we fold
 * them into the nearest valid position, the user turn:
 *
 *     user U, system S           ->  <｜User｜>U\n\nS<｜Assistant｜>...
 *     assistant A, system S (end) -> A<EOS><｜User｜>S<｜Assistant｜>...
 *
 * (a system message carrying tools or a response format keeps its place,
 * since a user turn has no room for them). */
static bool chat_system_folds(const struct json *src, const struct chat_msg *last, bool is_final) {
    if (!last || chat_truthy(json_get(src, "tools")) ||
        chat_truthy(json_get(src, "response_format")))
        return false;
    if (last->role == CHAT_USER_ROLE) return last->n_blocks > 0 && last->task == NULL;
    return last->role == CHAT_ASSISTANT_ROLE && is_final;
}

/* Step 1, MERGE. A user turn that carries a task starts a turn of its own
 * and accepts no later parts. */
static void chat_merge(struct chat_list *l, const struct json *messages) {
    for (size_t i = 0; i < messages->count; i++) {
        const struct json *src = &messages->items[i];
        enum chat_role role = chat_role_of(src);
        struct chat_msg *last = l->n ? &l->m[l->n - 1] : NULL;
        bool open_user = last && last->role == CHAT_USER_ROLE && last->n_blocks > 0;
        if (role == CHAT_SYSTEM && chat_system_folds(src, last, i + 1 == messages->count)) {
            if (last->role != CHAT_USER_ROLE) last = chat_push(l, CHAT_USER_ROLE, NULL);
            chat_add_block(last, false, json_get(src, "content"), NULL);
        } else if (role == CHAT_TOOL) {
            if (!open_user) last = chat_push(l, CHAT_USER_ROLE, NULL);
            chat_add_block(last, true, json_get(src, "content"), json_get(src, "tool_call_id"));
        } else if (role == CHAT_USER_ROLE) {
            if (!open_user || last->task != NULL) {
                last = chat_push(l, CHAT_USER_ROLE, src);
                last->task =
                    json_is(json_get(src, "task"), JSON_NULL) ? NULL : json_get(src, "task");
            }
            chat_add_block(last, false, json_get(src, "content"), NULL);
        } else {
            chat_push(l, role, src);
        }
    }
}

/* The call id of tool call `tc` (its "id", else its function's "id"). */
static const struct json *chat_call_id(const struct json *tc) {
    const struct json *id = json_get(tc, "id");
    if (!chat_truthy(id)) id = json_get(json_get(tc, "function"), "id");
    return chat_truthy(id) ? id : NULL;
}

/* The position of call id `id` in the calls list, or 0 if absent, with the
 * encoder's dict semantics (a repeated id maps to its last position). */
static size_t chat_call_order(const struct json *calls, const struct json *id) {
    size_t order = 0;
    for (size_t k = 0; json_is(id, JSON_STRING) && k < calls->count; k++) {
        const struct json *cid = chat_call_id(&calls->items[k]);
        if (json_is(cid, JSON_STRING) && cid->len == id->len &&
            memcmp(cid->string, id->string, id->len) == 0)
            order = k;
    }
    return order;
}

/* Step 2, SORT: order the tool-result blocks of one turn by call order
 * (a stable insertion sort, like Python's sorted()), and put them back into
 * the slots tool results had; text blocks keep their places. */
static void chat_sort_turn(struct chat_msg *m, const struct json *calls) {
    struct chat_block *sorted = xmalloc(m->n_blocks * sizeof *sorted);
    size_t *key = xmalloc(m->n_blocks * sizeof *key);
    size_t n = 0;
    for (size_t b = 0; b < m->n_blocks; b++) {
        if (!m->blocks[b].tool_result) continue;
        size_t k = chat_call_order(calls, m->blocks[b].call_id), j = n++;
        for (; j > 0 && key[j - 1] > k; j--) {
            sorted[j] = sorted[j - 1];
            key[j] = key[j - 1];
        }
        sorted[j] = m->blocks[b];
        key[j] = k;
    }
    n = 0;
    for (size_t b = 0; b < m->n_blocks; b++)
        if (m->blocks[b].tool_result) m->blocks[b] = sorted[n++];
    free(sorted);
    free(key);
}

static void chat_sort(struct chat_list *l) {
    const struct json *calls = NULL;
    for (size_t i = 0; i < l->n; i++) {
        struct chat_msg *m = &l->m[i];
        const struct json *tc = json_get(m->src, "tool_calls");
        if (m->role == CHAT_ASSISTANT_ROLE && chat_truthy(tc)) {
            calls = NULL;
            for (size_t k = 0; k < tc->count; k++)
                if (chat_call_id(&tc->items[k])) calls = tc;   /* any call with an id */
        } else if (m->role == CHAT_USER_ROLE && calls) {
            size_t n_results = 0;
            for (size_t b = 0; b < m->n_blocks; b++) n_results += m->blocks[b].tool_result;
            if (n_results > 1) chat_sort_turn(m, calls);
        }
    }
}

static long chat_last_user(const struct chat_list *l) {
    for (size_t i = l->n; i-- > 0;)
        if (l->m[i].role == CHAT_USER_ROLE || l->m[i].role == CHAT_DEVELOPER) return (long)i;
    return -1;
}

/* Step 3, DROP. Messages at or after the last user/developer message stay
 * as they are; before it, assistants lose their reasoning and everything
 * but system, user and latest_reminder messages is removed. */
static void chat_drop(struct chat_list *l) {
    long last = chat_last_user(l);
    size_t out = 0;
    for (size_t i = 0; i < l->n; i++) {
        struct chat_msg m = l->m[i];
        bool keep = (long)i >= last || m.role == CHAT_SYSTEM || m.role == CHAT_USER_ROLE ||
                    m.role == CHAT_LATEST_REMINDER;
        if (!keep && m.role == CHAT_ASSISTANT_ROLE) {
            m.drop_reasoning = true;
            keep = true;
        }
        if (keep) l->m[out++] = m;
        else free(m.blocks);
    }
    l->n = out;
}

/* The text of a content value: a string as is, null as nothing, a list of
 * parts as their texts joined by blank lines, anything else as JSON. */
static void chat_text(struct strbuf *out, const struct json *v) {
    if (v == NULL || v->kind == JSON_NULL) return;
    if (v->kind == JSON_STRING) {
        strbuf_append(out, v->string, v->len);
    } else if (v->kind == JSON_ARRAY) {
        for (size_t i = 0; i < v->count; i++) {
            const struct json *part = &v->items[i];
            if (i > 0) strbuf_puts(out, "\n\n");
            if (part->kind == JSON_STRING) chat_text(out, part);
            else chat_text(out, json_get(part, "text"));
        }
    } else {
        pyjson_write(out, v);
    }
}

/* A tool result's content; a list keeps its text blocks and names the others. */
static void chat_tool_result(struct strbuf *out, const struct json *content) {
    strbuf_puts(out, "<tool_result>");
    if (json_is(content, JSON_ARRAY)) {
        for (size_t i = 0; i < content->count; i++) {
            const struct json *b = &content->items[i];
            const struct json *type = json_get(b, "type");
            if (i > 0) strbuf_puts(out, "\n\n");
            if (chat_is_str(type, "text")) chat_text(out, json_get(b, "text"));
            else if (json_is(type, JSON_STRING))
                strbuf_printf(out, "[Unsupported %s]", type->string);
            else strbuf_puts(out, "[Unsupported None]");
        }
    } else {
        chat_text(out, content);
    }
    strbuf_puts(out, "</tool_result>");
}

/* The tools section: the fixed text, then one json.dumps() line per tool
 * (the "function" object of each OpenAI tool entry). */
static void chat_tools(struct strbuf *out, const struct json *tools) {
    strbuf_puts(out, "\n\n");
    strbuf_puts(out, CHAT_TOOLS_HEAD);
    for (size_t i = 0; i < tools->count; i++) {
        const struct json *fn = json_get(&tools->items[i], "function");
        if (i > 0) strbuf_puts(out, "\n");
        pyjson_write(out, fn ? fn : &tools->items[i]);
    }
    strbuf_puts(out, CHAT_TOOLS_TAIL);
}

static void chat_system_extras(struct strbuf *out, const struct chat_msg *m) {
    const struct json *rf = m->response_format;
    if (json_is(m->tools, JSON_ARRAY) && chat_truthy(m->tools)) chat_tools(out, m->tools);
    if (chat_truthy(rf)) {
        strbuf_puts(out, CHAT_RESPONSE_FORMAT);
        pyjson_write(out, rf);
    }
}

/* One DSML parameter. Strings go in raw; everything else as JSON. */
static void chat_dsml_param(struct strbuf *out, const char *key, size_t key_len,
                            const struct json *v) {
    bool is_str = v->kind == JSON_STRING;
    strbuf_puts(out, "<｜DSML｜parameter name=\"");
    strbuf_append(out, key, key_len);
    strbuf_puts(out, is_str ? "\" string=\"true\">" : "\" string=\"false\">");
    if (is_str) strbuf_append(out, v->string, v->len);
    else pyjson_write(out, v);
    strbuf_puts(out, "</｜DSML｜parameter>");
}

/* The parameters of one call, from its "arguments": normally a string of
 * JSON holding an object. If it does not parse to an object, the whole
 * string becomes a single string parameter named "arguments". */
static void chat_dsml_params(struct strbuf *out, const struct json *args) {
    struct json *parsed = NULL;
    const struct json *obj = args;
    if (json_is(args, JSON_STRING)) {
        char err[8];
        parsed = json_parse(args->string, args->len, 64, err, sizeof err);
        obj = parsed;
        if (!json_is(obj, JSON_OBJECT)) {
            chat_dsml_param(out, "arguments", 9, args);
            json_free(parsed);
            return;
        }
    }
    bool first = true;
    for (size_t i = 0; json_is(obj, JSON_OBJECT) && i < obj->count; i++) {
        if (!pyjson_first_of_key(obj, i)) continue;
        if (!first) strbuf_puts(out, "\n");
        first = false;
        chat_dsml_param(out, obj->keys[i], obj->key_lens[i], pyjson_last_value(obj, i));
    }
    json_free(parsed);
}

/* The DSML block of an assistant turn [LAYOUT §5.1]:
 *
 *     \n\n<｜DSML｜tool_calls>\n
 *     <｜DSML｜invoke name="NAME">\n PARAM \n PARAM ... \n</｜DSML｜invoke>\n
 *     ...
 *     </｜DSML｜tool_calls>
 */
static void chat_dsml_calls(struct strbuf *out, const struct json *calls) {
    strbuf_puts(out, "\n\n<｜DSML｜tool_calls>\n");
    for (size_t i = 0; i < calls->count; i++) {
        const struct json *fn = json_get(&calls->items[i], "function");
        if (i > 0) strbuf_puts(out, "\n");
        strbuf_puts(out, "<｜DSML｜invoke name=\"");
        chat_text(out, json_get(fn, "name"));
        strbuf_puts(out, "\">\n");
        chat_dsml_params(out, json_get(fn, "arguments"));
        strbuf_puts(out, "\n</｜DSML｜invoke>");
    }
    strbuf_puts(out, "\n</｜DSML｜tool_calls>");
}

struct chat_render_state {
    const struct chat_list *l;
    bool thinking, think_max, drop;
    long last_user;
};

static void chat_assistant(struct strbuf *out, const struct chat_render_state *s, size_t i) {
    const struct chat_msg *m = &s->l->m[i];
    const struct json *calls = json_get(m->src, "tool_calls");
    bool prev_task = i > 0 && s->l->m[i - 1].task != NULL;
    if (s->thinking && !prev_task && (!s->drop || (long)i > s->last_user)) {
        if (!m->drop_reasoning) chat_text(out, json_get(m->src, "reasoning_content"));
        strbuf_puts(out, CHAT_END_THINK);
    }
    chat_text(out, json_get(m->src, "content"));
    if (json_is(calls, JSON_ARRAY) && calls->count > 0) chat_dsml_calls(out, calls);
    if (!chat_truthy(json_get(m->src, "wo_eos"))) strbuf_puts(out, CHAT_EOS);
}

/* After message i: hand the turn to the model if it is the model's turn. */
static int chat_transition(struct strbuf *out, const struct chat_render_state *s, size_t i,
                           char *err, size_t errlen) {
    const struct chat_msg *m = &s->l->m[i];
    if (i + 1 < s->l->n) {
        enum chat_role next = s->l->m[i + 1].role;
        if (next != CHAT_ASSISTANT_ROLE && next != CHAT_LATEST_REMINDER) return 0;
    }
    if (m->task != NULL) {
        for (size_t k = 0; k < sizeof CHAT_TASKS / sizeof CHAT_TASKS[0]; k++) {
            if (!chat_is_str(m->task, CHAT_TASKS[k][0])) continue;
            if (k == 0) {   /* "action" answers as the assistant, then the marker */
                strbuf_puts(out, CHAT_ASSISTANT);
                strbuf_puts(out, s->thinking ? CHAT_THINK : CHAT_END_THINK);
            }
            strbuf_puts(out, CHAT_TASKS[k][1]);
            return 0;
        }
        return tok_fail(err, errlen, "chat: message %zu has an unknown task", i);
    }
    if (m->role == CHAT_USER_ROLE || m->role == CHAT_DEVELOPER) {
        bool think = s->thinking && (!s->drop || (long)i >= s->last_user);
        strbuf_puts(out, CHAT_ASSISTANT);
        strbuf_puts(out, think ? CHAT_THINK : CHAT_END_THINK);
    }
    return 0;
}

static int chat_message(struct strbuf *out, const struct chat_render_state *s, size_t i, char *err,
                        size_t errlen) {
    const struct chat_msg *m = &s->l->m[i];
    const struct json *content = json_get(m->src, "content");
    if (i == 0 && s->think_max) strbuf_puts(out, CHAT_THINK_MAX_TEXT);
    switch (m->role) {
    case CHAT_SYSTEM:
        chat_text(out, content);
        chat_system_extras(out, m);
        break;
    case CHAT_DEVELOPER:
        if (!chat_truthy(content))
            return tok_fail(err, errlen, "chat: developer message %zu has no content", i);
        strbuf_puts(out, CHAT_USER);
        chat_text(out, content);
        chat_system_extras(out, m);
        break;
    case CHAT_USER_ROLE:
        strbuf_puts(out, CHAT_USER);
        for (size_t b = 0; b < m->n_blocks; b++) {
            if (b > 0) strbuf_puts(out, "\n\n");
            if (m->blocks[b].tool_result) chat_tool_result(out, m->blocks[b].body);
            else chat_text(out, m->blocks[b].body);
        }
        break;
    case CHAT_LATEST_REMINDER:
        strbuf_puts(out, CHAT_REMINDER);
        chat_text(out, content);
        break;
    case CHAT_ASSISTANT_ROLE:
        chat_assistant(out, s, i);
        break;
    default:
        return tok_fail(err, errlen, "chat: message %zu has an unknown role", i);
    }
    return chat_transition(out, s, i, err, errlen);
}

/* Render messages (a JSON array of message objects) and optional request
 * tools into out, appending. Returns 0, or -1 with a message. */
static int chat_render(const struct json *messages, const struct json *tools,
                       const struct chat_options *opt, struct strbuf *out, char *err,
                       size_t errlen) {
    struct chat_list l = {0};
    int rc = 0;
    if (!json_is(messages, JSON_ARRAY))
        return tok_fail(err, errlen, "chat: messages must be an array");
    for (size_t i = 0; i < messages->count; i++)
        if (!json_is(&messages->items[i], JSON_OBJECT))
            return tok_fail(err, errlen, "chat: message %zu is not an object", i);
    bool format = chat_truthy(opt->response_format);
    if (chat_truthy(tools) || format) {
        enum chat_role first = messages->count ? chat_role_of(&messages->items[0]) : CHAT_UNKNOWN;
        if (first != CHAT_SYSTEM && first != CHAT_DEVELOPER) chat_push(&l, CHAT_SYSTEM, NULL);
    }
    chat_merge(&l, messages);
    if (chat_truthy(tools) && l.n > 0) l.m[0].tools = tools;
    if (format && l.n > 0) l.m[0].response_format = opt->response_format;
    chat_sort(&l);

    struct chat_render_state s = {.l = &l};
    s.thinking = opt->mode != CHAT_MODE_CHAT;
    s.think_max =
        opt->mode == CHAT_MODE_THINK_MAX && opt->context_tokens >= CHAT_THINK_MAX_MIN_CONTEXT;
    s.drop = !opt->keep_reasoning;
    for (size_t i = 0; i < l.n; i++)
        if (chat_truthy(l.m[i].tools)) s.drop = false;
    if (s.thinking && s.drop) chat_drop(&l);
    s.last_user = chat_last_user(&l);

    if (!opt->no_bos) strbuf_puts(out, CHAT_BOS);
    for (size_t i = 0; i < l.n && rc == 0; i++) rc = chat_message(out, &s, i, err, errlen);
    chat_list_free(&l);
    if (rc == 0 && out->oom) rc = tok_fail(err, errlen, "chat: out of memory");
    return rc;
}

/* ---- 11.9 The DSML parser ---------------------------------------------------------- */

/* What the model writes after the prompt's <｜Assistant｜><think> is, when
 * all goes well [LAYOUT §5.1]:
 *
 *     REASONING </think> CONTENT [\n\n TOOL BLOCK] EOS
 *
 *     TOOL BLOCK := <｜DSML｜tool_calls>\n INVOKE (\n INVOKE)* \n</｜DSML｜tool_calls>
 *     INVOKE     := <｜DSML｜invoke name="NAME">\n (PARAM \n)* </｜DSML｜invoke>
 *     PARAM      := <｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>
 *
 * (in chat mode the REASONING </think> part is absent). A string="true"
 * VALUE is raw text; a string="false" VALUE is JSON. The arguments handed to
 * the client are built as the official parser [ENC] builds them:
 *
 *     {"KEY": json.dumps(VALUE), "KEY2": VALUE2, ...}    (", " and ": ")
 *
 * THE PARSER IS INCREMENTAL. The server streams reasoning and content to the
 * client as tokens arrive, and an agent wants to know "a call to read_file
 * has started" long before the file's contents have been written out. So
 * the parser is fed text piece by piece (whole characters, from the
 * streaming decoder of 11.6), and it reports events as soon as they are
 * certain:
 *
 *     DSML_EV_REASONING / DSML_EV_CONTENT   a piece of text for that channel
 *     DSML_EV_CALL_START                    an invoke header is complete: name known
 *     DSML_EV_CALL                          an invoke is complete: name + arguments
 *
 * Text can be released only when it can no longer be the start of a marker.
 * If the text so far ends in "</thi" or "\n\n<｜DS", that tail is held back
 * until the next piece decides it. Inside the tool block, a tag is read only
 * once it is complete, and a parameter value once its closing tag arrived.
 *
 * WHEN THINGS GO WRONG. Models under a token limit, or confused, produce
 * shapes the official parser rejects with an exception. Every one of them
 * has a defined result here; the caller sees it in `flags`:
 *
 *   - text ends with no </think> (thinking mode): everything was reasoning,
 *     content is empty; DSML_THINK_UNCLOSED;
 *   - a tool block starts inside the reasoning: the reasoning ends there
 *     (as if </think> had been written) and the block is parsed as usual;
 *     DSML_CALL_IN_THINKING | DSML_THINK_UNCLOSED;
 *   - text ends inside a tool block: the invokes completed so far are kept,
 *     a half-written one is dropped; DSML_UNTERMINATED;
 *   - text inside the block that fits no rule: parsing stops there, calls so
 *     far are kept, the rest is ignored; DSML_MALFORMED and `error`;
 *   - a parameter name given twice in one invoke: the first wins;
 *     DSML_DUPLICATE_PARAM;
 *   - text after </｜DSML｜tool_calls> other than white space and EOS: it is
 *     ignored; DSML_TRAILING_TEXT.
 *
 * We are lenient where the official parser is strict but the meaning is
 * clear: any white space may separate tags (it demands exactly ">\n"), a
 * tool block is recognised even without the blank line before it, and a
 * parameter with no string= attribute is taken as a string. The model
 * output that the official parser accepts parses to the same result. */

enum dsml_state { DSML_REASONING, DSML_CONTENT, DSML_TOOLS, DSML_AFTER_TOOLS, DSML_DONE };
enum dsml_tool_state { DSML_AT_OPEN, DSML_AT_BETWEEN, DSML_AT_INVOKE };

enum dsml_flag {
    DSML_THINK_UNCLOSED = 1,
    DSML_CALL_IN_THINKING = 2,
    DSML_UNTERMINATED = 4,
    DSML_MALFORMED = 8,
    DSML_DUPLICATE_PARAM = 16,
    DSML_TRAILING_TEXT = 32,
};

enum dsml_event_kind { DSML_EV_REASONING, DSML_EV_CONTENT, DSML_EV_CALL_START, DSML_EV_CALL };

struct dsml_event {
    enum dsml_event_kind kind;
    const char *text;       /* REASONING, CONTENT: the new text ... */
    size_t len;             /* ... and its length */
    size_t call;            /* CALL_START, CALL: index into calls[] */
    const char *name;       /* CALL_START, CALL: the tool name */
    const char *arguments;  /* CALL: the arguments, a JSON object */
};

typedef void (*dsml_event_fn)(void *user, const struct dsml_event *ev);

struct dsml_call {
    char *name;             /* NUL-terminated */
    char *arguments;        /* NUL-terminated JSON object text */
};

struct dsml_parser {
    enum dsml_state state;
    enum dsml_tool_state tool;
    struct strbuf pending;  /* received, not yet consumed */
    struct strbuf reasoning, content;
    struct dsml_call *calls;/* completed calls */
    size_t n_calls, cap_calls;
    char *call_name;        /* the invoke being read, or NULL */
    struct strbuf args;     /* its arguments so far: "{"KEY": VALUE, ..." */
    struct strbuf keys;     /* its parameter names, each followed by a NUL */
    unsigned flags;         /* enum dsml_flag */
    char error[160];
    dsml_event_fn on_event;
    void *user;
};

static const char DSML_END_THINK[] = "</think>";
static const char DSML_BLOCK_NL[] = "\n\n<｜DSML｜tool_calls";
static const char DSML_BLOCK[] = "<｜DSML｜tool_calls";
static const char DSML_BLOCK_OPEN[] = "<｜DSML｜tool_calls>";
static const char DSML_BLOCK_CLOSE[] = "</｜DSML｜tool_calls>";
static const char DSML_INVOKE[] = "<｜DSML｜invoke";
static const char DSML_INVOKE_CLOSE[] = "</｜DSML｜invoke>";
static const char DSML_PARAM[] = "<｜DSML｜parameter";
static const char DSML_PARAM_CLOSE[] = "</｜DSML｜parameter>";
static const char DSML_EOS[] = "<｜end▁of▁sentence｜>";

static void dsml_parser_init(struct dsml_parser *p, bool thinking, dsml_event_fn on_event,
                             void *user) {
    memset(p, 0, sizeof *p);
    p->state = thinking ? DSML_REASONING : DSML_CONTENT;
    p->on_event = on_event;
    p->user = user;
}

static void dsml_parser_free(struct dsml_parser *p) {
    for (size_t i = 0; i < p->n_calls; i++) {
        free(p->calls[i].name);
        free(p->calls[i].arguments);
    }
    free(p->calls);
    free(p->call_name);
    strbuf_free(&p->pending);
    strbuf_free(&p->reasoning);
    strbuf_free(&p->content);
    strbuf_free(&p->args);
    strbuf_free(&p->keys);
    memset(p, 0, sizeof *p);
}

/* First occurrence of the NUL-terminated `lit` in s[0..n), or n. */
static size_t dsml_search(const char *s, size_t n, const char *lit) {
    size_t m = strlen(lit);
    for (size_t i = 0; i + m <= n; i++)
        if (memcmp(s + i, lit, m) == 0) return i;
    return n;
}

/* Does s[0..n) start with lit? 1 yes, 0 "not yet" (s is a proper prefix of
 * lit, more text may complete it), -1 no. */
static int dsml_starts(const char *s, size_t n, const char *lit) {
    size_t m = strlen(lit);
    if (n == 0) return 0;
    if (n >= m) return memcmp(s, lit, m) == 0 ? 1 : -1;
    return memcmp(s, lit, n) == 0 ? 0 : -1;
}

/* The longest tail of s[0..n) that is a proper prefix of lit. */
static size_t dsml_partial_tail(const char *s, size_t n, const char *lit) {
    size_t m = strlen(lit);
    for (size_t k = m - 1 < n ? m - 1 : n; k > 0; k--)
        if (memcmp(s + n - k, lit, k) == 0) return k;
    return 0;
}

static void dsml_consume(struct dsml_parser *p, size_t n) {
    if (n == 0) return;
    memmove(p->pending.data, p->pending.data + n, p->pending.len - n);
    p->pending.len -= n;
}

static void dsml_emit_text(struct dsml_parser *p, const char *s, size_t n) {
    bool reasoning = p->state == DSML_REASONING;
    if (n == 0) return;
    strbuf_append(reasoning ? &p->reasoning : &p->content, s, n);
    if (p->on_event) {
        struct dsml_event ev = {
            .kind = reasoning ? DSML_EV_REASONING : DSML_EV_CONTENT, .text = s, .len = n};
        p->on_event(p->user, &ev);
    }
}

static bool dsml_malformed(struct dsml_parser *p, const char *what) {
    const char *s = p->pending.data;
    size_t n = p->pending.len < 40 ? p->pending.len : 40;
    p->flags |= DSML_MALFORMED;
    snprintf(p->error, sizeof p->error, "DSML: %s at \"%.*s\"", what, (int)n, s ? s : "");
    p->state = DSML_DONE;
    return true;
}

/* Reasoning or content: release text up to the next marker, act on it. */
static bool dsml_text_step(struct dsml_parser *p, bool final) {
    static const char *const markers[] = {DSML_END_THINK, DSML_BLOCK_NL, DSML_BLOCK, DSML_EOS};
    const char *s = p->pending.data;
    size_t n = p->pending.len, at = n, hold = 0;
    int which = -1;
    for (int k = p->state == DSML_REASONING ? 0 : 1; k < 4; k++) {
        size_t pos = dsml_search(s, n, markers[k]);
        if (pos < at) {
            at = pos;
            which = k;
        }
        size_t tail = dsml_partial_tail(s, n, markers[k]);
        if (tail > hold) hold = tail;
    }
    if (which < 0) {                    /* no marker: keep only a possible start of one */
        size_t release = final ? n : n - hold;
        dsml_emit_text(p, s, release);
        dsml_consume(p, release);
        return false;
    }
    dsml_emit_text(p, s, at);
    if (which == 0) {
        dsml_consume(p, at + strlen(DSML_END_THINK));
        p->state = DSML_CONTENT;
        return true;
    }
    if (p->state == DSML_REASONING)
        p->flags |= DSML_THINK_UNCLOSED | (which != 3 ? DSML_CALL_IN_THINKING : 0);
    if (which == 3) {
        p->state = DSML_DONE;
        return true;
    }
    dsml_consume(p, at + (which == 1 ? 2 : 0));     /* drop the blank line before the block */
    p->state = DSML_TOOLS;
    p->tool = DSML_AT_OPEN;
    return true;
}

/* The value of attribute `key` in a tag header h[0..n) (the text between
 * the tag name and '>'), e.g. ` name="x" string="true"`. NULL if absent. */
static const char *dsml_attr(const char *h, size_t n, const char *key, size_t *len) {
    size_t k = strlen(key);
    for (size_t i = 0; i + k + 2 <= n; i++) {
        bool at_word = i == 0 || h[i - 1] == ' ' || h[i - 1] == '\t' || h[i - 1] == '\n';
        if (!at_word || memcmp(h + i, key, k) != 0 || h[i + k] != '=' || h[i + k + 1] != '"')
            continue;
        const char *v = h + i + k + 2;
        const char *q = memchr(v, '"', n - (size_t)(v - h));
        if (q == NULL) return NULL;
        *len = (size_t)(q - v);
        return v;
    }
    return NULL;
}

static void dsml_start_call(struct dsml_parser *p, const char *name, size_t len) {
    p->call_name = xmalloc(len + 1);
    memcpy(p->call_name, name, len);
    p->call_name[len] = '\0';
    p->args.len = p->keys.len = 0;
    strbuf_puts(&p->args, "{");
    p->tool = DSML_AT_INVOKE;
    if (p->on_event) {
        struct dsml_event ev = {
            .kind = DSML_EV_CALL_START, .call = p->n_calls, .name = p->call_name};
        p->on_event(p->user, &ev);
    }
}

static bool dsml_seen_key(const struct dsml_parser *p, const char *key, size_t len) {
    for (size_t at = 0; at < p->keys.len; at += strlen(p->keys.data + at) + 1)
        if (strlen(p->keys.data + at) == len && memcmp(p->keys.data + at, key, len) == 0)
            return true;
    return false;
}

static void dsml_add_param(struct dsml_parser *p, const char *key, size_t klen, bool is_string,
                           const char *value, size_t vlen) {
    if (dsml_seen_key(p, key, klen)) {
        p->flags |= DSML_DUPLICATE_PARAM;
        return;
    }
    strbuf_append(&p->keys, key, klen);
    strbuf_append(&p->keys, "", 1);
    if (p->args.len > 1) strbuf_puts(&p->args, ", ");
    pyjson_string(&p->args, key, klen);
    strbuf_puts(&p->args, ": ");
    if (is_string) pyjson_string(&p->args, value, vlen);
    else strbuf_append(&p->args, value, vlen);
}

static void dsml_finish_call(struct dsml_parser *p) {
    strbuf_puts(&p->args, "}");
    if (p->n_calls == p->cap_calls) {
        p->cap_calls = p->cap_calls ? 2 * p->cap_calls : 4;
        p->calls = xrealloc(p->calls, p->cap_calls * sizeof *p->calls);
    }
    struct dsml_call *c = &p->calls[p->n_calls++];
    c->name = p->call_name;
    c->arguments = xmalloc(p->args.len + 1);
    memcpy(c->arguments, p->args.data ? p->args.data : "", p->args.len);
    c->arguments[p->args.len] = '\0';
    p->call_name = NULL;
    p->tool = DSML_AT_BETWEEN;
    if (p->on_event) {
        struct dsml_event ev = {.kind = DSML_EV_CALL, .call = p->n_calls - 1, .name = c->name,
                                .arguments = c->arguments};
        p->on_event(p->user, &ev);
    }
}

/* Inside a tool block, at a tag that starts at s[0]. Each returns the bytes
 * the tag used, 0 if it is not complete yet. */
static size_t dsml_read_invoke(struct dsml_parser *p, const char *s, size_t n) {
    size_t head = strlen(DSML_INVOKE), end = head + dsml_search(s + head, n - head, ">");
    if (end >= n) return 0;
    size_t len = 0;
    const char *name = dsml_attr(s + head, end - head, "name", &len);
    dsml_start_call(p, name ? name : "", name ? len : 0);
    return end + 1;
}

static size_t dsml_read_param(struct dsml_parser *p, const char *s, size_t n) {
    size_t head = strlen(DSML_PARAM), end = head + dsml_search(s + head, n - head, ">");
    if (end >= n) return 0;
    size_t close = end + 1 + dsml_search(s + end + 1, n - end - 1, DSML_PARAM_CLOSE);
    if (close >= n) return 0;
    size_t klen = 0, slen = 0;
    const char *key = dsml_attr(s + head, end - head, "name", &klen);
    const char *str = dsml_attr(s + head, end - head, "string", &slen);
    bool is_string = !(str && slen == 5 && memcmp(str, "false", 5) == 0);
    dsml_add_param(p, key ? key : "", key ? klen : 0, is_string, s + end + 1, close - end - 1);
    return close + strlen(DSML_PARAM_CLOSE);
}

/* Which tags may come next, by tool state. */
static bool dsml_tools_step(struct dsml_parser *p, bool final) {
    const char *s = p->pending.data;
    size_t n = p->pending.len, i = 0, used = 0;
    if (p->tool != DSML_AT_OPEN)
        while (i < n && (s[i] == ' ' || s[i] == '\n' || s[i] == '\t' || s[i] == '\r')) i++;
    const char *t = s + i;
    size_t m = n - i;
    int wait = 0;                       /* some tag could still begin here */
    if (p->tool == DSML_AT_OPEN) {
        int r = dsml_starts(t, m, DSML_BLOCK_OPEN);
        if (r > 0) {
            used = strlen(DSML_BLOCK_OPEN);
            p->tool = DSML_AT_BETWEEN;
        }
        wait = r == 0;
    } else if (p->tool == DSML_AT_BETWEEN) {
        int a = dsml_starts(t, m, DSML_INVOKE), b = dsml_starts(t, m, DSML_BLOCK_CLOSE);
        if (a > 0) used = dsml_read_invoke(p, t, m);
        if (b > 0) {
            used = strlen(DSML_BLOCK_CLOSE);
            p->state = DSML_AFTER_TOOLS;
        }
        wait = a >= 0 || b == 0;
    } else {
        int a = dsml_starts(t, m, DSML_PARAM), b = dsml_starts(t, m, DSML_INVOKE_CLOSE);
        if (a > 0) used = dsml_read_param(p, t, m);
        if (b > 0) {
            used = strlen(DSML_INVOKE_CLOSE);
            dsml_finish_call(p);
        }
        wait = a >= 0 || b == 0;
    }
    if (used > 0) {
        dsml_consume(p, i + used);
        return true;
    }
    if (wait && !final) return false;
    if (wait || m == 0) {
        p->flags |= DSML_UNTERMINATED;
        p->state = DSML_DONE;
        return true;
    }
    return dsml_malformed(p, "unexpected text in the tool block");
}

/* After the block only white space and EOS may follow. */
static bool dsml_after_step(struct dsml_parser *p, bool final) {
    const char *s = p->pending.data;
    size_t n = p->pending.len, i = 0;
    while (i < n && (s[i] == ' ' || s[i] == '\n' || s[i] == '\t' || s[i] == '\r')) i++;
    int r = dsml_starts(s + i, n - i, DSML_EOS);
    if (r == 0 && !final) return false;
    if (r < 0 && i < n) p->flags |= DSML_TRAILING_TEXT;
    p->state = DSML_DONE;
    return true;
}

static void dsml_run(struct dsml_parser *p, bool final) {
    for (;;) {
        bool progress = false;
        switch (p->state) {
        case DSML_REASONING:
        case DSML_CONTENT:    progress = dsml_text_step(p, final); break;
        case DSML_TOOLS:      progress = dsml_tools_step(p, final); break;
        case DSML_AFTER_TOOLS: progress = dsml_after_step(p, final); break;
        case DSML_DONE:       p->pending.len = 0; return;
        }
        if (!progress) return;
    }
}

/* Feed the next piece of model output. */
static void dsml_parser_feed(struct dsml_parser *p, const char *text, size_t len) {
    if (p->state == DSML_DONE) return;
    strbuf_append(&p->pending, text, len);
    dsml_run(p, false);
}

/* The output has ended: release held text and settle the flags. */
static void dsml_parser_finish(struct dsml_parser *p) {
    dsml_run(p, true);
    if (p->state == DSML_REASONING) p->flags |= DSML_THINK_UNCLOSED;
    free(p->call_name);
    p->call_name = NULL;
    p->state = DSML_DONE;
}

/* ---- 11.10 --render-chat ------------------------------------------------------------ */

/* `ds4 --render-chat FILE [--mode chat|thinking|max]` prints the prompt the
 * engine would feed the model. FILE is either a message list or an object
 * {"messages": [...], "tools": [...]}, the shapes of DeepSeek's encoder
 * tests. The rendering assumes a context large enough for Think Max.
 * mode: enum chat_mode. Appends to out; returns 0 or -1 with a message. */
static int render_chat_file(const char *path, int mode, struct strbuf *out, char *err,
                            size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) return tok_fail(err, errlen, "cannot open %s: %s", path, strerror(errno));
    struct strbuf text = {0};
    char chunk[65536];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) strbuf_append(&text, chunk, got);
    bool bad = ferror(f) || text.oom;
    fclose(f);
    if (bad) {
        strbuf_free(&text);
        return tok_fail(err, errlen, "cannot read %s", path);
    }
    struct json *root = json_parse(text.data ? text.data : "", text.len, 128, err, errlen);
    strbuf_free(&text);
    if (root == NULL) return -1;
    const struct json *messages = root, *tools = NULL;
    if (json_is(root, JSON_OBJECT)) {
        messages = json_get(root, "messages");
        tools = json_get(root, "tools");
    }
    struct chat_options opt = {.mode = (enum chat_mode)mode,
                               .context_tokens = CHAT_THINK_MAX_MIN_CONTEXT};
    int rc = chat_render(messages, tools, &opt, out, err, errlen);
    json_free(root);
    return rc;
}

/* The vocabulary lives in the model GGUF as two string arrays: the tokens
 * (index = id) and the merges ("left right", index = rank). A model without
 * them still runs on token ids; text prompts then report a clear error. */
static bool tokenizer_load_gguf(struct tokenizer *t, const struct gguf *g, int vocab,
                                struct ds4_error *e) {
    struct gguf_array toks, merges = { GGUF_STRING, 0, NULL };
    if (!gguf_get_array(g, "tokenizer.ggml.tokens", &toks))
        return fail(e, "%s has no vocabulary (tokenizer.ggml.tokens): use --tokens, or "
                    "convert it with ds4-convert --vocab", g->path);
    if (toks.item_type != GGUF_STRING || toks.count != (uint64_t)vocab)
        return fail(e, "%s: tokenizer.ggml.tokens must hold %d strings (one per token id)",
                    g->path, vocab);
    if (gguf_get_array(g, "tokenizer.ggml.merges", &merges) && merges.item_type != GGUF_STRING)
        return fail(e, "%s: tokenizer.ggml.merges must be an array of strings", g->path);
    const char **strs = xmalloc((size_t)(toks.count + merges.count + 1) * sizeof(char *));
    uint32_t *lens = xmalloc((size_t)(toks.count + merges.count + 1) * sizeof(uint32_t));
    bool ok =
        gguf_array_strings(&toks, strs, lens) &&
        (merges.count == 0 || gguf_array_strings(&merges, strs + toks.count, lens + toks.count));
    char err[256] = "a vocabulary string is longer than 4 GB";
    ok = ok && tokenizer_init(t, (uint32_t)toks.count, strs, lens, (uint32_t)merges.count,
                              strs + toks.count, lens + toks.count, err, sizeof err) == 0;
    free(strs);
    free(lens);
    return ok || fail(e, "%s: %s", g->path, err);
}

/* ============================================================================
 * Chapter 12. Sessions on disk: snapshots and the KV store
 * ============================================================================
 *
 * Agents resend the whole conversation every turn. Re-prefilling 25k tokens
 * costs minutes on a laptop, yet the first 24.9k of them are the same as
 * last time. This chapter makes the session state (6.2) a file: everything
 * needed to continue exactly as if the process had never stopped, and a
 * directory of such files indexed by the text they cover.
 *
 * HOW IT WORKS. A snapshot holds the token ids, the next-token logits, and
 * per layer the state of 6.2: the sliding-window rows in logical order, the
 * compressed rows, the indexer rows and the two compressors' unfinished
 * windows, plus the MTP block's ring and the streams it reads. Loading it
 * into a fresh session and feeding the next token computes the same logits,
 * bit for bit, as the session that was saved.
 *
 * The rows are stored in the precision the model gave them. Every K=V row
 * already went through the FP8 round trip of chapter 5 (nope dims) and every
 * indexer row through Hadamard + FP4, so writing their e4m3 / e2m1 codes and
 * power-of-two block scales loses nothing: decode(encode(row)) is the row,
 * and the encoder checks that for every block (a block that fails is stored
 * as float32 and counted, so the format stays lossless even if the forward
 * pass changes). The RoPE tail (rope_dim dims) is float32, as in the engine.
 *
 * The store is a directory:
 *
 *     DIR/index.sqlite     one row per snapshot (WAL mode)
 *     DIR/<sha1>.kv        the snapshot whose key text has this SHA1
 *     DIR/lock             flock()ed around every change of the pair (file, row)
 *     DIR/tmp.<pid>.<sha1> a snapshot being written
 *
 * A snapshot's key is the rendered text of the prefix it covers (the
 * detokenized bytes of its tokens, special tokens written literally). A new
 * prompt is matched by TEXT, and only its suffix after the cached text is
 * tokenized: tokenizing the whole prompt would merge bytes across the
 * boundary differently from the cached tokens and miss the cache.
 *
 * INVARIANTS (what the code below keeps true):
 *
 *   1. A file named <sha1>.kv is complete: it is written as tmp.*, fsync'd,
 *      renamed, and the directory fsync'd, before its row is committed.
 *   2. A row is only trusted together with its file: on load every header
 *      field is compared with the row and with the running model, and both
 *      CRCs are checked before a single byte reaches the session.
 *   3. Anything inconsistent (row without file, file without row, a CRC or
 *      model mismatch, a tmp.* of a dead process) is logged and removed,
 *      never loaded. The directory is a cache; losing an entry is allowed,
 *      loading a wrong one is not.
 *   4. The rename and the row commit, eviction and repair all happen under
 *      an exclusive flock on DIR/lock, so another process never sees the
 *      half-way state of invariant 1 (file renamed, row not yet committed).
 *      Encoding and writing the tmp file, the slow part, happens outside it.
 *      SQLite itself waits up to 10 s on a busy database (busy_timeout).
 *   5. Files are never rewritten in place. Hit counts and last-use times
 *      live only in SQLite.
 *
 * WHAT IF a process is killed? Killed while writing tmp.*: the tmp file is
 * removed by the next open (its pid is dead). Killed between rename and
 * commit: the file has no row and is removed (invariant 3); the older
 * entries were never touched. Killed inside a SQLite transaction: SQLite's
 * WAL rolls it back.
 *
 * LIMITATIONS. A snapshot binds to one model file (the identity hash
 * covers the GGUF metadata and tensor directory, so a q2 snapshot does not
 * load into q4: the logits would differ). --kv-check verifies headers,
 * SHA1 of the key text and both CRCs, but decodes no payload (that needs
 * the model); a load decodes and validates everything.
 * ------------------------------------------------------------------------- */

/* Sources. SHA1 is [FIPS180]; CRC32C (Castagnoli) is the checksum of
 * [RFC3720] (iSCSI); the index is [SQLITE]. The file format itself is this
 * project's own, specified in this chapter. */


/* ---- 12.1 SHA1 (FIPS 180-4) ---------------------------------------------
 *
 * Names files after the text they cover and identifies models. Not for
 * security: collisions are only a cache miss or, at worst, a load that the
 * byte-exact key comparison of 12.7 rejects.
 *
 *     per 64-byte block: W[t] = block words (big-endian), t < 16
 *                        W[t] = rotl1(W[t-3] ^ W[t-8] ^ W[t-14] ^ W[t-16])
 *     80 rounds: T = rotl5(a) + f_t(b,c,d) + e + K_t + W[t]
 *                (e,d,c,b,a) = (d, c, rotl30(b), a, T)
 *     f/K: Ch 0x5a827999 (t<20), Parity 0x6ed9eba1, Maj 0x8f1bbcdc, Parity 0xca62c1d6
 *     padding: 0x80, zeros, 64-bit big-endian bit length
 * ------------------------------------------------------------------------- */

struct sha1 {
    uint32_t h[5];
    uint64_t len;          /* bytes hashed so far */
    uint8_t buf[64];
};

static uint32_t rotl32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(uint32_t h[5], const uint8_t *p) {
    uint32_t w[80];
    for (int t = 0; t < 16; t++)
        w[t] = (uint32_t)p[4 * t] << 24 | (uint32_t)p[4 * t + 1] << 16 |
               (uint32_t)p[4 * t + 2] << 8 | p[4 * t + 3];
    for (int t = 16; t < 80; t++) w[t] = rotl32(w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int t = 0; t < 80; t++) {
        uint32_t f, k;
        if (t < 20)      { f = (b & c) | (~b & d);          k = 0x5a827999; }
        else if (t < 40) { f = b ^ c ^ d;                   k = 0x6ed9eba1; }
        else if (t < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8f1bbcdc; }
        else             { f = b ^ c ^ d;                   k = 0xca62c1d6; }
        uint32_t tmp = rotl32(a, 5) + f + e + k + w[t];
        e = d; d = c; c = rotl32(b, 30); b = a; a = tmp;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
}

static void sha1_init(struct sha1 *c) {
    static const uint32_t iv[5] = { 0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476, 0xc3d2e1f0 };
    memcpy(c->h, iv, sizeof iv);
    c->len = 0;
}

static void sha1_update(struct sha1 *c, const void *data, size_t n) {
    const uint8_t *p = data;
    size_t have = (size_t)(c->len % 64);
    c->len += n;
    if (have) {
        size_t take = 64 - have < n ? 64 - have : n;
        memcpy(c->buf + have, p, take);
        p += take, n -= take, have += take;
        if (have < 64) return;
        sha1_block(c->h, c->buf);
    }
    for (; n >= 64; p += 64, n -= 64) sha1_block(c->h, p);
    memcpy(c->buf, p, n);
}

/* Finish a COPY, so that a caller can keep hashing after taking a digest of
 * the prefix so far (the lookup of 12.7 does exactly that). */
static void sha1_digest(const struct sha1 *ctx, uint8_t out[20]) {
    struct sha1 c = *ctx;
    uint64_t bits = c.len * 8;
    uint8_t pad[72] = { 0x80 };
    size_t padn = (size_t)((c.len % 64) < 56 ? 56 - c.len % 64 : 120 - c.len % 64);
    sha1_update(&c, pad, padn);
    uint8_t lenb[8];
    for (int i = 0; i < 8; i++) lenb[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha1_update(&c, lenb, 8);
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 4; j++) out[4 * i + j] = (uint8_t)(c.h[i] >> (24 - 8 * j));
}

static void sha1_hex(const uint8_t d[20], char out[41]) {
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 20; i++) {
        out[2 * i] = hex[d[i] >> 4];
        out[2 * i + 1] = hex[d[i] & 15];
    }
    out[40] = 0;
}

static void sha1_of(const void *data, size_t n, char hex[41]) {
    struct sha1 c;
    uint8_t d[20];
    sha1_init(&c);
    sha1_update(&c, data, n);
    sha1_digest(&c, d);
    sha1_hex(d, hex);
}

/* ---- 12.2 CRC32C ----------------------------------------------------------
 *
 * The payload checksum. Castagnoli's polynomial (reflected 0x82f63b78),
 * which catches all burst errors up to 32 bits; the slicing-by-8 tables
 * process 8 bytes per step (about 1-2 GB/s in plain C, several times SHA1).
 *
 *     table[0][b] = crc of the single byte b
 *     table[k][b] = (table[k-1][b] >> 8) ^ table[0][table[k-1][b] & 0xff]
 *     crc(0 bytes) = 0;   crc is pre- and post-inverted
 * ------------------------------------------------------------------------- */

static uint32_t crc32c_table[8][256];

static void crc32c_init(void) {
    if (crc32c_table[0][1]) return;
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82f63b78u : c >> 1;
        crc32c_table[0][b] = c;
    }
    for (int k = 1; k < 8; k++)
        for (int b = 0; b < 256; b++)
            crc32c_table[k][b] = (crc32c_table[k - 1][b] >> 8) ^
                                 crc32c_table[0][crc32c_table[k - 1][b] & 0xff];
}

/* Continue a CRC: crc32c_update(0, ...) starts one. */
static uint32_t crc32c_update(uint32_t crc, const void *data, size_t n) {
    const uint8_t *p = data;
    crc = ~crc;
    for (; n >= 8; p += 8, n -= 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                             (uint32_t)p[3] << 24);
        crc = crc32c_table[7][lo & 0xff] ^ crc32c_table[6][(lo >> 8) & 0xff] ^
              crc32c_table[5][(lo >> 16) & 0xff] ^ crc32c_table[4][lo >> 24] ^
              crc32c_table[3][p[4]] ^ crc32c_table[2][p[5]] ^ crc32c_table[1][p[6]] ^
              crc32c_table[0][p[7]];
    }
    while (n--) crc = (crc >> 8) ^ crc32c_table[0][(crc ^ *p++) & 0xff];
    return ~crc;
}

/* ---- 12.3 Model identity --------------------------------------------------
 *
 * A snapshot is only meaningful for the weights that produced it. The
 * identity is the SHA1 of the GGUF bytes from offset 0 to the start of the
 * tensor data (header, metadata, tensor directory, padding), and of the MTP
 * file's likewise when one is loaded. That covers every hyperparameter,
 * every tensor's name, shape, type and offset: a reconversion, another
 * quantization or another vocabulary all give another identity. It reads a
 * few MB (most of it the vocabulary), once per process.
 * ------------------------------------------------------------------------- */

static void kv_model_identity(const struct model *m, char hex[41]) {
    struct sha1 c;
    uint8_t d[20];
    sha1_init(&c);
    sha1_update(&c, m->file.map, (size_t)m->file.data_offset);
    if (m->has_mtp) sha1_update(&c, m->mtp_file.map, (size_t)m->mtp_file.data_offset);
    sha1_digest(&c, d);
    sha1_hex(d, hex);
}

/* The routed experts' bits per weight, for --kv-list (informational: the
 * identity already separates quantizations). */
static int kv_quant_bits(const struct model *m) {
    switch (m->layers[0].gate_exps.type) {
    case TYPE_Q2_K: case TYPE_IQ2_XXS: return 2;
    case TYPE_Q4_K: return 4;
    case TYPE_Q8_0: return 8;
    case TYPE_F16: case TYPE_BF16: return 16;
    default: return 32;
    }
}

/* ---- 12.4 FP8 and FP4 codes -----------------------------------------------
 *
 * Chapter 5 SIMULATES the formats: it rounds floats to the e4m3 / e2m1 grids
 * times a power-of-two scale. Here we write the actual codes.
 *
 *     e4m3 byte:  s eeee mmm    e = 0: (-1)^s m 2^-9;   else (-1)^s (1 + m/8) 2^(e-7)
 *                               0x7f and 0xff are NaN (never written)
 *     e2m1 nibble: s mmm        mmm indexes 0, .5, 1, 1.5, 2, 3, 4, 6
 *     scale byte:  k + 127      the block scale is 2^k (OCP "ue8m0");
 *                               0xff = this block is stored as float32
 *
 * The encoder recomputes the scale the way the round trip did, encodes
 * each value, and accepts the block only if decoding gives back the same
 * float bits for every value. For a block that really went through the
 * round trip this always holds; the scale may come out half the original
 * (when the block's largest value rounded down to 224 or 3), and then every
 * code is simply twice as large, still on the grid.
 * ------------------------------------------------------------------------- */

enum { KV_SCALE_RAW = 0xff, FP8_BLOCK = 64, FP4_BLOCK = 32 };

static float e4m3_table[256];
static const float e2m1_grid[8] = { 0, 0.5f, 1, 1.5f, 2, 3, 4, 6 };

static void e4m3_table_init(void) {
    for (int code = 0; code < 256; code++) {
        int e = (code >> 3) & 15, m = code & 7;
        float v = e == 0 ? ldexpf((float)m, -9) : ldexpf(1.0f + m / 8.0f, e - 7);
        if ((code & 0x7f) == 0x7f) v = NAN;
        e4m3_table[code] = code & 0x80 ? -v : v;
    }
}

/* The code of q, assuming q is on the grid (the caller verifies). */
static uint8_t e4m3_code(float q) {
    uint8_t sign = signbit(q) ? 0x80 : 0;
    float a = fabsf(q);
    if (!(a <= 448.0f)) return 0x7f;
    if (a < 0x1p-6f) return sign | (uint8_t)(a * 512.0f);
    int e;
    float m = frexpf(a, &e);                /* a = (2m) 2^(e-1), 2m in [1, 2) */
    return sign | (uint8_t)((e - 1 + 7) << 3) | (uint8_t)((2 * m - 1) * 8);
}

static uint8_t e2m1_code(float q) {
    uint8_t sign = signbit(q) ? 8 : 0;
    for (int i = 0; i < 8; i++)
        if (fabsf(q) == e2m1_grid[i]) return sign | (uint8_t)i;
    return 0;
}

static float e2m1_value(uint8_t code) {
    float v = e2m1_grid[code & 7];
    return code & 8 ? -v : v;
}

static bool same_bits(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

/* The scale exponent k of a block, exactly as fp8/fp4_round_trip_block
 * choose it: 2^k = pow2_ceil(max(floor, max|v|) / max_code). */
static int block_scale_exp(const float *v, int n, float floor_abs, float max_code) {
    float a = floor_abs;
    for (int i = 0; i < n; i++) a = fmaxf(a, fabsf(v[i]));
    return ilogbf(pow2_ceil(a / max_code));
}

/* Encode one block into out[] (1 scale byte + codes); false if not lossless. */
static bool fp8_encode_block(const float *v, int n, uint8_t *out) {
    int k = block_scale_exp(v, n, 1e-4f, 448.0f);
    if (k + 127 < 1 || k + 127 > 254) return false;
    float sc = ldexpf(1.0f, k);
    out[0] = (uint8_t)(k + 127);
    for (int i = 0; i < n; i++) {
        out[1 + i] = e4m3_code(v[i] / sc);
        if (!same_bits(e4m3_table[out[1 + i]] * sc, v[i])) return false;
    }
    return true;
}

static bool fp4_encode_block(const float *v, int n, uint8_t *out) {
    int k = block_scale_exp(v, n, 6.0f * 0x1p-126f, 6.0f);
    if (k + 127 < 1 || k + 127 > 254) return false;
    float sc = ldexpf(1.0f, k);
    out[0] = (uint8_t)(k + 127);
    memset(out + 1, 0, (size_t)n / 2);
    for (int i = 0; i < n; i++) {
        uint8_t code = e2m1_code(v[i] / sc);
        if (!same_bits(e2m1_value(code) * sc, v[i])) return false;
        out[1 + i / 2] |= (uint8_t)(code << (4 * (i & 1)));
    }
    return true;
}

/* ---- 12.5 The snapshot file -----------------------------------------------
 *
 * All integers little-endian, floats IEEE-754 binary32 little-endian.
 *
 *     OFFSET  SIZE  DESCRIPTION
 *         0      8  magic "DS4KVSNP"
 *         8      4  format version (1)
 *        12      4  header size (96)
 *        16     20  model identity (12.3), raw SHA1 bytes
 *        36     20  SHA1 of the key text (the file is named after its hex)
 *        56      8  token count N (>= 1)
 *        64      8  key text bytes K
 *        72      8  payload bytes P
 *        80      4  CRC32C of the key text and the payload (bytes 96..96+K+P)
 *        84      1  routed-expert quant bits (informational)
 *        85      1  save reason (enum kv_reason)
 *        86      2  reserved, 0
 *        88      4  context size the session ran with (0 = unlimited)
 *        92      4  CRC32C of bytes 0..91
 *        96      K  key text: the rendered bytes the snapshot covers
 *      96+K      P  payload, below
 *
 * The file is exactly 96 + K + P bytes. The payload is written and read by
 * ONE function, snap_session(), which walks the session: in write mode each
 * field is appended, in read mode the same field is read back and checked,
 * so the two directions cannot drift apart (a field added to the session
 * is added once, there). Fields marked "=" are checked against what the
 * running model and N imply; a mismatch names the field.
 *
 *     = u32 x 10      n_layers, dim, vocab, head_dim, rope_dim, idx_dim,
 *                     window W, hc, has_mtp, FP8 block
 *     = u32 x L       compression ratio of each layer
 *     = u64           N
 *       u32 x N       token ids (each < vocab)
 *       f32 x vocab   logits for token N (so the session can sample at once)
 *       per layer l:  layer record (ratio r = ratio[l], position P = N)
 *       if has_mtp:   = u64 MTP position (N - 1)
 *                     f32 x hc*dim   last_hc
 *                     layer record (ratio 0, position N - 1)
 *     = u32           end mark "DS4E"
 *
 *     layer record:
 *     = u64 R = min(P, W);  R kv rows, positions P-R .. P-1 (oldest first)
 *       if r > 0:  = u64 P/r;  P/r kv rows (compressed)
 *                  frontier of the attention compressor
 *       if r == 4: = u64 P/4;  P/4 indexer rows
 *                  frontier of the indexer compressor
 *
 *     kv row (width Dh):    (Dh - rope_dim) / 64 FP8 blocks, the rest f32
 *     indexer row (DI):     DI / 32 FP4 blocks, the rest f32
 *     FP8 block:  u8 scale, 64 x e4m3   (scale 0xff: 64 x f32 instead)
 *     FP4 block:  u8 scale, 16 bytes, low nibble first (0xff: 32 x f32)
 *     frontier:   = u64 S = live slots; S x coff*dc f32 values, then
 *                 S x coff*dc f32 scores (may be -inf)
 *
 * A compressor's live slots are those a future pool will read: the tokens
 * of the window in progress, P mod r, plus for overlapping (ratio 4)
 * compressors the previous window's r slots in front. The other slots hold
 * values that are always overwritten before they are read, so they are not
 * saved and a loaded session has them in their initial state.
 * ------------------------------------------------------------------------- */

enum { KV_HEADER_BYTES = 96, KV_FORMAT_VERSION = 1 };
static const char kv_magic[8] = { 'D', 'S', '4', 'K', 'V', 'S', 'N', 'P' };

enum kv_reason { KV_REASON_UNKNOWN, KV_REASON_COLD, KV_REASON_CONTINUED, KV_REASON_EVICT,
                 KV_REASON_SHUTDOWN, KV_REASON_COUNT };
static const char *const kv_reason_names[KV_REASON_COUNT] = {
    "unknown", "cold", "continued", "evict", "shutdown"
};

/* The parsed header. */
struct kv_header {
    uint8_t model[20], key_sha1[20];
    uint64_t n_tokens, key_bytes, payload_bytes;
    uint32_t crc, ctx;
    int quant_bits, reason;
};

static void put_le(uint8_t *p, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void kv_header_encode(const struct kv_header *h, uint8_t out[KV_HEADER_BYTES]) {
    memset(out, 0, KV_HEADER_BYTES);
    memcpy(out, kv_magic, 8);
    put_le(out + 8, KV_FORMAT_VERSION, 4);
    put_le(out + 12, KV_HEADER_BYTES, 4);
    memcpy(out + 16, h->model, 20);
    memcpy(out + 36, h->key_sha1, 20);
    put_le(out + 56, h->n_tokens, 8);
    put_le(out + 64, h->key_bytes, 8);
    put_le(out + 72, h->payload_bytes, 8);
    put_le(out + 80, h->crc, 4);
    out[84] = (uint8_t)h->quant_bits;
    out[85] = (uint8_t)h->reason;
    put_le(out + 88, h->ctx, 4);
    put_le(out + 92, crc32c_update(0, out, 92), 4);
}

/* Parse and check a header against the size of its file. */
static bool kv_header_decode(const uint8_t *in, uint64_t file_size, struct kv_header *h,
                             struct ds4_error *e) {
    if (file_size < KV_HEADER_BYTES)
        return fail(e, "file is %llu bytes, shorter than the %d-byte header",
                    (unsigned long long)file_size, KV_HEADER_BYTES);
    if (memcmp(in, kv_magic, 8) != 0) return fail(e, "bad magic (not a ds4 KV snapshot)");
    if (load_le(in + 92, 4) != crc32c_update(0, in, 92)) return fail(e, "header CRC mismatch");
    if (load_le(in + 8, 4) != KV_FORMAT_VERSION)
        return fail(e, "format version %u, this build reads %d", (unsigned)load_le(in + 8, 4),
                    KV_FORMAT_VERSION);
    if (load_le(in + 12, 4) != KV_HEADER_BYTES)
        return fail(e, "header size is not %d", KV_HEADER_BYTES);
    memcpy(h->model, in + 16, 20);
    memcpy(h->key_sha1, in + 36, 20);
    h->n_tokens = load_le(in + 56, 8);
    h->key_bytes = load_le(in + 64, 8);
    h->payload_bytes = load_le(in + 72, 8);
    h->crc = (uint32_t)load_le(in + 80, 4);
    h->quant_bits = in[84];
    h->reason = in[85];
    h->ctx = (uint32_t)load_le(in + 88, 4);
    uint64_t room = file_size - KV_HEADER_BYTES;
    if (h->n_tokens < 1 || h->n_tokens > room / 4)
        return fail(e, "token count %llu is impossible for a %llu-byte file",
                    (unsigned long long)h->n_tokens, (unsigned long long)file_size);
    if (h->key_bytes > room || h->payload_bytes != room - h->key_bytes)
        return fail(e, "key (%llu) + payload (%llu) bytes do not add up to the file size %llu",
                    (unsigned long long)h->key_bytes, (unsigned long long)h->payload_bytes,
                    (unsigned long long)file_size);
    if (h->reason >= KV_REASON_COUNT || load_le(in + 86, 2) != 0)
        return fail(e, "save reason %d or reserved bytes invalid", h->reason);
    return true;
}

/* ---- 12.5.1 The serializer: one walk, two directions ---------------------- */

struct snap_io {
    bool writing;
    struct ds4_error *e;
    bool failed;
    /* writing: a buffer flushed to fd; CRC and size accumulate */
    int fd;
    uint8_t *buf;
    size_t len, cap;
    uint64_t written;
    uint32_t crc;
    /* reading: a cursor over the payload in memory */
    const uint8_t *in;
    uint64_t pos, size;
    /* statistics for the bench line */
    uint64_t rows_packed, blocks_raw, f32_equivalent;
    /* in-memory checkpoints (12.11): fd < 0 grows buf instead of writing,
     * and the row stores travel as their counts only */
    bool rows_by_count;
};

static void snap_flush(struct snap_io *io) {
    if (io->fd < 0) {                   /* a memory sink: make room, keep everything */
        io->cap *= 2;
        io->buf = xrealloc(io->buf, io->cap);
        return;
    }
    size_t off = 0;
    while (!io->failed && off < io->len) {
        ssize_t got = write(io->fd, io->buf + off, io->len - off);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) io->failed = !fail(io->e, "write failed: %s", strerror(errno));
        else off += (size_t)got;
    }
    io->len = 0;
}

/* Move n bytes between p and the stream; `what` names the field in errors. */
static void snap_bytes(struct snap_io *io, void *p, size_t n, const char *what) {
    if (io->failed) return;
    if (io->writing) {
        io->crc = crc32c_update(io->crc, p, n);
        io->written += n;
        const uint8_t *src = p;
        while (n > 0 && !io->failed) {
            size_t take = io->cap - io->len < n ? io->cap - io->len : n;
            memcpy(io->buf + io->len, src, take);
            io->len += take, src += take, n -= take;
            if (io->len == io->cap) snap_flush(io);
        }
        return;
    }
    if (n > io->size - io->pos) {
        io->failed = !fail(io->e, "payload truncated at byte %llu reading %s",
                           (unsigned long long)io->pos, what);
        return;
    }
    memcpy(p, io->in + io->pos, n);
    io->pos += n;
}

/* Read mode: fail unless `n` items of at least `min_bytes` each can still be
 * present. Checked BEFORE allocating for them, so a hostile count cannot
 * make us allocate more than the file could fill. */
static bool snap_room(struct snap_io *io, uint64_t n, uint64_t min_bytes, const char *what) {
    if (io->failed) return false;
    if (io->writing || n <= (io->size - io->pos) / min_bytes) return true;
    io->failed = !fail(io->e, "%s: %llu items cannot fit in the %llu bytes left", what,
                       (unsigned long long)n, (unsigned long long)(io->size - io->pos));
    return false;
}

/* A value both sides must agree on: written as is, read back and compared. */
static void snap_expect(struct snap_io *io, uint64_t want, int bytes, const char *what) {
    uint8_t b[8];
    put_le(b, want, bytes);
    snap_bytes(io, b, (size_t)bytes, what);
    if (io->writing || io->failed) return;
    uint64_t got = load_le(b, bytes);
    if (got != want)
        io->failed = !fail(io->e, "%s is %llu in the snapshot, %llu expected here", what,
                           (unsigned long long)got, (unsigned long long)want);
}

/* Floats as they are in memory (ds4 runs on little-endian hosts only).
 * NaN never occurs in a healthy session, so it marks a damaged file. */
static void snap_f32(struct snap_io *io, float *v, size_t n, const char *what) {
    snap_bytes(io, v, n * sizeof(float), what);
    if (io->writing || io->failed) return;
    for (size_t i = 0; i < n; i++)
        if (isnan(v[i])) {
            io->failed = !fail(io->e, "%s holds a NaN at %zu", what, i);
            return;
        }
}

/* One block of n values through fp8 or fp4 codes, or raw when not lossless. */
static void snap_block(struct snap_io *io, float *v, int n, bool fp4, const char *what) {
    uint8_t packed[1 + FP8_BLOCK];
    size_t code_bytes = fp4 ? (size_t)n / 2 : (size_t)n;
    if (io->writing) {
        bool ok = fp4 ? fp4_encode_block(v, n, packed) : fp8_encode_block(v, n, packed);
        if (!ok) {
            packed[0] = KV_SCALE_RAW;
            io->blocks_raw++;
        }
        snap_bytes(io, packed, ok ? 1 + code_bytes : 1, what);
        if (!ok) snap_bytes(io, v, (size_t)n * sizeof(float), what);
        return;
    }
    snap_bytes(io, packed, 1, what);
    if (io->failed) return;
    if (packed[0] == KV_SCALE_RAW) {
        snap_f32(io, v, (size_t)n, what);
        return;
    }
    if (packed[0] == 0) {
        io->failed = !fail(io->e, "%s: scale byte 0 is not used by this format", what);
        return;
    }
    snap_bytes(io, packed + 1, code_bytes, what);
    if (io->failed) return;
    float sc = ldexpf(1.0f, packed[0] - 127);
    for (int i = 0; i < n; i++) {
        uint8_t code = fp4 ? (uint8_t)(packed[1 + i / 2] >> (4 * (i & 1)) & 15) : packed[1 + i];
        if (!fp4 && (code & 0x7f) == 0x7f) {
            io->failed = !fail(io->e, "%s: e4m3 code 0x%02x is NaN", what, code);
            return;
        }
        v[i] = (fp4 ? e2m1_value(code) : e4m3_table[code]) * sc;
    }
}

/* A row: `coded` leading dims in blocks of `block`, the rest float32. */
static void snap_row(struct snap_io *io, float *row, int width, int coded, int block, bool fp4,
                     const char *what) {
    int b = 0;
    for (; b + block <= coded; b += block) snap_block(io, row + b, block, fp4, what);
    snap_f32(io, row + b, (size_t)(width - b), what);
    io->rows_packed++;
    io->f32_equivalent += (uint64_t)width * sizeof(float);
}

static void snap_kv_row(struct snap_io *io, const struct ds4_config *c, float *row,
                        const char *what) {
    snap_row(io, row, c->head_dim, c->head_dim - c->rope_dim, FP8_BLOCK, false, what);
}

/* The least bytes a kv row can take, for snap_room(). */
static uint64_t kv_row_min_bytes(int width, int coded, int block, bool fp4) {
    int blocks = coded / block;
    return (uint64_t)blocks * (1 + (uint64_t)(fp4 ? block / 2 : block)) +
           (uint64_t)(width - blocks * block) * 4 + (blocks == 0);
}

/* Make room for exactly n rows in a row store (read mode). */
static void kv_rows_resize(struct row_store *rs, int64_t n) {
    if (n > rs->cap) {
        rs->cap = n;
        rs->rows = xrealloc(rs->rows, (size_t)rs->cap * (size_t)rs->width * sizeof(float));
    }
    rs->n = n;
}

static void snap_row_store(struct snap_io *io, const struct ds4_config *c, struct row_store *rs,
                           int64_t n, bool indexer, const char *what) {
    snap_expect(io, (uint64_t)n, 8, what);
    if (io->rows_by_count) {            /* 12.11: rows before n never change */
        if (!io->writing && !io->failed && rs->n < n)
            io->failed = !fail(io->e, "%s: the session has %lld rows, the checkpoint needs %lld",
                               what, (long long)rs->n, (long long)n);
        else if (!io->writing && !io->failed) rs->n = n;
        return;
    }
    int coded = indexer ? rs->width : rs->width - c->rope_dim;
    int block = indexer ? FP4_BLOCK : FP8_BLOCK;
    if (!snap_room(io, (uint64_t)n, kv_row_min_bytes(rs->width, coded, block, indexer), what))
        return;
    if (!io->writing) kv_rows_resize(rs, n);
    for (int64_t i = 0; i < n && !io->failed; i++)
        snap_row(io, rs->rows + i * rs->width, rs->width, coded, block, indexer, what);
}

static void snap_frontier(struct snap_io *io, struct compressor_state *cs, int64_t pos,
                          const char *what) {
    int r = cs->ratio, width = cs->coff * cs->dc;
    int64_t live = (cs->coff == 2 ? r : 0) + pos % r;
    snap_expect(io, (uint64_t)live, 8, what);
    snap_f32(io, cs->kv, (size_t)live * width, what);
    snap_bytes(io, cs->score, (size_t)live * width * sizeof(float), what);   /* -inf allowed */
}

static void snap_layer(struct snap_io *io, const struct ds4_config *c, struct layer_state *st,
                       int ratio, int64_t pos) {
    int64_t R = pos < c->window ? pos : c->window;
    snap_expect(io, (uint64_t)R, 8, "window row count");
    for (int64_t p = pos - R; p < pos && !io->failed; p++)
        snap_kv_row(io, c, st->ring + (size_t)(p % c->window) * c->head_dim, "window row");
    if (ratio > 0) {
        snap_row_store(io, c, &st->comp_rows, pos / ratio, false, "compressed rows");
        snap_frontier(io, &st->comp, pos, "compressor frontier");
    }
    if (ratio == 4) {
        snap_row_store(io, c, &st->idx_rows, pos / 4, true, "indexer rows");
        snap_frontier(io, &st->idx_comp, pos, "indexer compressor frontier");
    }
}

/* THE payload: see the table in 12.5. `tokens` has n ids. */
static void snap_session(struct snap_io *io, struct session *s, int32_t *tokens, int64_t n) {
    const struct model *m = s->eng->model;
    const struct ds4_config *c = &m->cfg;
    uint32_t shape[] = { (uint32_t)c->n_layers, (uint32_t)c->dim, (uint32_t)c->vocab,
                         (uint32_t)c->head_dim, (uint32_t)c->rope_dim, (uint32_t)c->idx_dim,
                         (uint32_t)c->window, (uint32_t)c->hc, m->has_mtp, FP8_BLOCK };
    for (size_t i = 0; i < sizeof shape / sizeof shape[0]; i++)
        snap_expect(io, shape[i], 4, "shape");
    for (int l = 0; l < c->n_layers; l++) snap_expect(io, (uint64_t)c->ratio[l], 4, "layer ratio");
    snap_expect(io, (uint64_t)n, 8, "token count");
    if (!snap_room(io, (uint64_t)n, 4, "token ids")) return;
    snap_bytes(io, tokens, (size_t)n * sizeof(int32_t), "token ids");
    for (int64_t i = 0; !io->writing && !io->failed && i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab)
            io->failed = !fail(io->e, "token id %d at %lld is outside the vocabulary", tokens[i],
                               (long long)i);
    snap_f32(io, s->logits, (size_t)c->vocab, "logits");
    for (int l = 0; l < c->n_layers && !io->failed; l++)
        snap_layer(io, c, &s->layers[l], c->ratio[l], n);
    if (m->has_mtp) {
        int64_t mtp_pos = n - 1;
        snap_expect(io, (uint64_t)mtp_pos, 8, "MTP position");
        snap_f32(io, s->last_hc, (size_t)c->hc * c->dim, "last_hc");
        snap_layer(io, c, &s->mtp_state, 0, mtp_pos);
    }
    snap_expect(io, 0x45345344u, 4, "end mark");
}

/* ---- 12.5.2 Writing: temp file, fsync, rename, fsync the directory -------- */

struct snapshot_meta {
    const char *key;              /* rendered bytes the snapshot covers */
    size_t key_len;
    enum kv_reason reason;
    uint32_t ctx;                 /* 0 = unlimited */
};

struct snapshot_stats {
    uint64_t file_bytes, payload_bytes, f32_row_bytes, packed_row_bytes, rows, raw_blocks;
    double seconds;
};

static bool fsync_dir_of(const char *path, struct ds4_error *e) {
    char dir[1024];
    const char *slash = strrchr(path, '/');
    snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - path) : 1, slash ? path : ".");
    if (slash == path) snprintf(dir, sizeof dir, "/");
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return fail(e, "cannot open directory %s: %s", dir, strerror(errno));
    bool ok = fsync(fd) == 0;
    close(fd);
    return ok || fail(e, "fsync of directory %s failed: %s", dir, strerror(errno));
}

static void kv_tables_init(void) {
    crc32c_init();
    e4m3_table_init();
}

/* Write the snapshot of s (which has processed exactly tokens[0..n)) to
 * tmp_path, complete and fsync'd. The caller renames it into place. */
static bool snapshot_write_file(const struct session *s, const int32_t *tokens, int64_t n,
                                const char *tmp_path, const struct snapshot_meta *meta,
                                struct snapshot_stats *stats, struct ds4_error *e) {
    kv_tables_init();
    if (n < 1 || s->pos != n)
        return fail(e, "a snapshot of %lld tokens needs a session at that position (it is at %lld)",
                    (long long)n, (long long)s->pos);
    double t0 = now_seconds();
    /* O_EXCL | O_NOFOLLOW: a file or symlink planted under this name is never
     * followed or overwritten; 0600: a snapshot holds a whole conversation. */
    int flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
    int fd = open(tmp_path, flags, 0600);
    if (fd < 0 && errno == EEXIST && unlink(tmp_path) == 0)   /* a stale one of a reused pid */
        fd = open(tmp_path, flags, 0600);
    if (fd < 0) return fail(e, "cannot create %s: %s", tmp_path, strerror(errno));
    struct kv_header h = { .n_tokens = (uint64_t)n, .key_bytes = meta->key_len,
                           .ctx = meta->ctx, .reason = meta->reason,
                           .quant_bits = kv_quant_bits(s->eng->model) };
    char hex[41];
    kv_model_identity(s->eng->model, hex);
    for (int i = 0; i < 20; i++) sscanf(hex + 2 * i, "%2hhx", &h.model[i]);
    struct sha1 kc;
    sha1_init(&kc);
    sha1_update(&kc, meta->key, meta->key_len);
    sha1_digest(&kc, h.key_sha1);

    uint8_t header[KV_HEADER_BYTES] = { 0 };
    struct snap_io io = { .writing = true, .e = e, .fd = fd, .cap = 1 << 20 };
    io.buf = xmalloc(io.cap);
    snap_bytes(&io, header, KV_HEADER_BYTES, "header");
    io.crc = 0;                             /* the payload CRC starts after the header */
    io.written = 0;
    snap_bytes(&io, (void *)meta->key, meta->key_len, "key");
    uint64_t key_end = io.written;
    int32_t *ids = (int32_t *)tokens;       /* write mode never modifies */
    s->eng->be->state_pull((struct session *)s);   /* the host copy, in the CPU layout (6.13) */
    snap_session(&io, (struct session *)s, ids, n);
    snap_flush(&io);
    h.payload_bytes = io.written - key_end;
    h.crc = io.crc;
    kv_header_encode(&h, header);
    bool ok = !io.failed;
    if (ok && pwrite(fd, header, KV_HEADER_BYTES, 0) != KV_HEADER_BYTES)
        ok = fail(e, "cannot write the header of %s: %s", tmp_path, strerror(errno));
    if (ok && fsync(fd) != 0) ok = fail(e, "fsync %s: %s", tmp_path, strerror(errno));
    if (close(fd) != 0 && ok) ok = fail(e, "close %s: %s", tmp_path, strerror(errno));
    free(io.buf);
    if (!ok) {
        unlink(tmp_path);
        return false;
    }
    if (stats) {
        stats->file_bytes = KV_HEADER_BYTES + io.written;
        stats->payload_bytes = h.payload_bytes;
        stats->rows = io.rows_packed;
        stats->raw_blocks = io.blocks_raw;
        stats->f32_row_bytes = io.f32_equivalent;
        stats->seconds = now_seconds() - t0;
    }
    return true;
}

/* rename(2) is atomic; the directory fsync makes the new name durable. */
static bool snapshot_publish(const char *tmp_path, const char *path, struct ds4_error *e) {
    if (rename(tmp_path, path) != 0) {
        fail(e, "rename %s -> %s: %s", tmp_path, path, strerror(errno));
        unlink(tmp_path);
        return false;
    }
    return fsync_dir_of(path, e);
}

static bool session_save(const struct session *s, const int32_t *tokens, int64_t n,
                         const char *path, const struct snapshot_meta *meta,
                         struct snapshot_stats *stats, struct ds4_error *e) {
    char tmp[1100];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    return snapshot_write_file(s, tokens, n, tmp, meta, stats, e) && snapshot_publish(tmp, path, e);
}

/* ---- 12.5.3 Reading -------------------------------------------------------- */

/* The whole file, its header parsed and both CRCs checked. */
struct snapshot_file {
    uint8_t *bytes;
    uint64_t size;
    struct kv_header h;
};

static bool snapshot_read_verified(const char *path, struct snapshot_file *f, struct ds4_error *e) {
    kv_tables_init();
    memset(f, 0, sizeof *f);
    struct ds4_error re;
    size_t len;
    char *bytes = read_file(path, &len, &re);
    if (!bytes) return fail(e, "%s", re.msg);
    f->bytes = (uint8_t *)bytes;
    f->size = len;
    struct ds4_error he;
    bool ok = kv_header_decode(f->bytes, f->size, &f->h, &he);
    if (!ok) fail(e, "%s: %s", path, he.msg);
    if (ok && crc32c_update(0, f->bytes + KV_HEADER_BYTES, f->size - KV_HEADER_BYTES) != f->h.crc)
        ok = fail(e, "%s: payload CRC mismatch (damaged file)", path);
    uint8_t d[20];
    if (ok) {
        struct sha1 kc;
        sha1_init(&kc);
        sha1_update(&kc, f->bytes + KV_HEADER_BYTES, f->h.key_bytes);
        sha1_digest(&kc, d);
        if (memcmp(d, f->h.key_sha1, 20) != 0)
            ok = fail(e, "%s: key text does not match its SHA1", path);
    }
    if (!ok) {
        free(f->bytes);
        f->bytes = NULL;
    }
    return ok;
}

/* Load a snapshot into s. On success s is at position N and *tokens holds
 * the N ids (free() them); on failure s is an empty session (position 0):
 * a half-loaded state is never left behind. If `key`/`key_len` are given,
 * the file's key text must equal them byte for byte. */
static bool session_load_file(struct session *s, const struct snapshot_file *f,
                              int32_t **tokens, struct ds4_error *e) {
    char want[41], have[41];
    kv_model_identity(s->eng->model, want);
    sha1_hex(f->h.model, have);
    if (strcmp(want, have) != 0)
        return fail(e, "snapshot is for model %.12s..., this is %.12s...", have, want);
    struct engine *eng = s->eng;
    session_free(s);
    session_init(s, eng);
    int64_t n = (int64_t)f->h.n_tokens;
    int32_t *ids = xmalloc((size_t)n * sizeof(int32_t));
    struct snap_io io = { .writing = false, .e = e,
                          .in = f->bytes + KV_HEADER_BYTES + f->h.key_bytes,
                          .size = f->h.payload_bytes };
    snap_session(&io, s, ids, n);
    if (!io.failed && io.pos != io.size)
        io.failed = !fail(e, "%llu trailing bytes after the payload",
                          (unsigned long long)(io.size - io.pos));
    if (io.failed) {
        free(ids);
        session_free(s);
        session_init(s, eng);
        return false;
    }
    s->pos = n;
    s->mtp_pos = eng->model->has_mtp ? n - 1 : 0;
    eng->be->state_push(s);
    *tokens = ids;
    return true;
}

static bool session_load(struct session *s, const char *path, int32_t **tokens, int64_t *n,
                         struct ds4_error *e) {
    struct snapshot_file f;
    if (!snapshot_read_verified(path, &f, e)) return false;
    struct ds4_error le;
    bool ok = session_load_file(s, &f, tokens, &le);
    if (ok) *n = (int64_t)f.h.n_tokens;
    else fail(e, "%s: %s", path, le.msg);
    free(f.bytes);
    return ok;
}

/* The size of the same state as float32 rows (a plain dump of
 * the same rows), for the bench comparison. */
static uint64_t snapshot_f32_bytes(const struct ds4_config *c, bool has_mtp, int64_t n) {
    uint64_t b = (uint64_t)n * 4 + (uint64_t)c->vocab * 4;
    int64_t R = n < c->window ? n : c->window;
    for (int l = 0; l < c->n_layers; l++) {
        int r = c->ratio[l];
        b += (uint64_t)R * c->head_dim * 4;
        if (r > 0)
            b += (uint64_t)(n / r) * c->head_dim * 4 +
                 2ull * compressor_coff(r) * r * compressor_coff(r) * c->head_dim * 4;
        if (r == 4) b += (uint64_t)(n / 4) * c->idx_dim * 4 + 2ull * 8 * 2 * c->idx_dim * 4;
    }
    if (has_mtp) b += (uint64_t)c->hc * c->dim * 4 + (uint64_t)R * c->head_dim * 4;
    return b;
}

/* ---- 12.6 The store: an SQLite index over a directory --------------------
 *
 * One table, one row per snapshot file:
 *
 *     column      meaning
 *     ----------  -----------------------------------------------------------
 *     sha1        hex SHA1 of the key text = file name stem (primary key)
 *     model       hex model identity (12.3)
 *     key_bytes   length of the key text
 *     tokens      token count N
 *     token_hash  hex SHA1 of the N token ids as u32 LE (lookup by ids)
 *     bytes       file size
 *     crc         payload CRC32C (ties the row to one version of the file)
 *     quant_bits  routed-expert bits
 *     ctx         context size at save (0 = unlimited)
 *     created     unix milliseconds
 *     last_used   unix milliseconds (the LRU clock)
 *     hits        times loaded
 *     reason      cold / continued / evict / shutdown
 *
 * Indexes: (model, key_bytes) drives the text lookup, (model, tokens) the
 * token lookup, (last_used) the eviction. A second table, `writes`, is the
 * ledger of bytes written in the last hour for the write budget, shared by
 * every process using the directory.
 * ------------------------------------------------------------------------- */

struct kv_store_options {
    const char *dir;
    int64_t space_mb;             /* budget; 0 = 4096 */
    int64_t write_mb_per_hour;    /* 0 = 8192 */
    uint32_t ctx;                 /* the running context size, 0 = unlimited */
    bool quiet;                   /* no log lines (tests) */
};

struct kv_store {
    struct kv_store_options opt;
    char dir[900];
    sqlite3 *db;
    int lock_fd;
    int lock_depth;
    const struct model *model;    /* NULL for the model-free commands */
    char model_id[41];
    uint64_t space_bytes, write_bytes_per_hour;
};

static void kv_log(const struct kv_store *st, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void kv_log(const struct kv_store *st, const char *fmt, ...) {
    if (st->opt.quiet) return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "ds4: kv-disk: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

static int64_t now_unix_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void kv_path(const struct kv_store *st, const char *sha1, char *out, size_t cap) {
    snprintf(out, cap, "%s/%s.kv", st->dir, sha1);
}

/* Exclusive lock on DIR/lock, re-entrant within the process. */
static void kv_lock(struct kv_store *st) {
    if (st->lock_depth++ == 0)
        while (flock(st->lock_fd, LOCK_EX) != 0 && errno == EINTR) {}
}

static void kv_unlock(struct kv_store *st) {
    if (--st->lock_depth == 0) flock(st->lock_fd, LOCK_UN);
}

static bool kv_exec(struct kv_store *st, const char *sql, struct ds4_error *e) {
    char *msg = NULL;
    if (sqlite3_exec(st->db, sql, NULL, NULL, &msg) == SQLITE_OK) return true;
    fail(e, "sqlite: %s (in: %.60s)", msg ? msg : "?", sql);
    sqlite3_free(msg);
    return false;
}

static sqlite3_stmt *kv_prepare(struct kv_store *st, const char *sql) {
    sqlite3_stmt *q = NULL;
    if (sqlite3_prepare_v2(st->db, sql, -1, &q, NULL) != SQLITE_OK) {
        kv_log(st, "sqlite: %s", sqlite3_errmsg(st->db));
        return NULL;
    }
    return q;
}

static const char kv_schema[] =
    "PRAGMA journal_mode=WAL;"
    "PRAGMA synchronous=NORMAL;"
    "CREATE TABLE IF NOT EXISTS snapshots("
    " sha1 TEXT PRIMARY KEY, model TEXT NOT NULL, key_bytes INTEGER NOT NULL,"
    " tokens INTEGER NOT NULL, token_hash TEXT NOT NULL, bytes INTEGER NOT NULL,"
    " crc INTEGER NOT NULL, quant_bits INTEGER NOT NULL, ctx INTEGER NOT NULL,"
    " created INTEGER NOT NULL, last_used INTEGER NOT NULL, hits INTEGER NOT NULL,"
    " reason TEXT NOT NULL);"
    "CREATE INDEX IF NOT EXISTS snapshots_by_key ON snapshots(model, key_bytes);"
    "CREATE INDEX IF NOT EXISTS snapshots_by_tokens ON snapshots(model, tokens);"
    "CREATE INDEX IF NOT EXISTS snapshots_by_use ON snapshots(last_used);"
    "CREATE TABLE IF NOT EXISTS writes(at INTEGER NOT NULL, bytes INTEGER NOT NULL);";

static void kv_remove_entry(struct kv_store *st, const char *sha1, const char *why);
static void kv_store_repair(struct kv_store *st);

/* PRIVACY. Snapshots hold whole conversations (the key is the prompt text),
 * so the store is private to its user: DIR is created 0700, every file in it
 * 0600. A DIR that already exists must be a real directory (not a symlink)
 * owned by this user; if group or others can enter it, it is tightened to
 * 0700, with a note. A directory owned by someone else is refused: its
 * owner could read every conversation, or plant files for us to load. */
static bool kv_dir_private(const char *dir, struct ds4_error *e) {
    if (mkdir(dir, 0700) != 0 && errno != EEXIST)
        return fail(e, "cannot create %s: %s", dir, strerror(errno));
    struct stat sb;
    if (lstat(dir, &sb) != 0) return fail(e, "cannot stat %s: %s", dir, strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return fail(e, "%s is not a directory (a symlink?): refused for the KV store", dir);
    if (sb.st_uid != geteuid())
        return fail(e, "%s belongs to uid %u, not to us (uid %u): refused for the KV store", dir,
                    (unsigned)sb.st_uid, (unsigned)geteuid());
    if ((sb.st_mode & 077) != 0) {
        if (chmod(dir, 0700) != 0)
            return fail(e, "cannot make %s private: %s", dir, strerror(errno));
        fprintf(stderr, "ds4: kv: %s was mode %03o; now 0700 (snapshots hold conversations)\n", dir,
                (unsigned)(sb.st_mode & 0777));
    }
    return true;
}

/* Open (creating) DIR and its index. `model` may be NULL for --kv-list etc. */
static bool kv_store_open(struct kv_store *st, const struct kv_store_options *opt,
                          const struct model *model, struct ds4_error *e) {
    memset(st, 0, sizeof *st);
    st->opt = *opt;
    st->lock_fd = -1;
    kv_tables_init();
    snprintf(st->dir, sizeof st->dir, "%s", opt->dir);
    if (!kv_dir_private(st->dir, e)) return false;
    char path[1000];
    snprintf(path, sizeof path, "%s/lock", st->dir);
    st->lock_fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (st->lock_fd < 0) return fail(e, "cannot open %s: %s", path, strerror(errno));
    snprintf(path, sizeof path, "%s/index.sqlite", st->dir);
    int idx = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);  /* created private */
    if (idx < 0) return fail(e, "cannot open %s: %s", path, strerror(errno));
    fchmod(idx, 0600);
    close(idx);
    if (sqlite3_open(path, &st->db) != SQLITE_OK) {
        fail(e, "cannot open %s: %s", path, st->db ? sqlite3_errmsg(st->db) : "?");
        sqlite3_close(st->db);
        close(st->lock_fd);
        return false;
    }
    sqlite3_busy_timeout(st->db, 10000);
    kv_lock(st);
    bool ok = kv_exec(st, kv_schema, e);
    kv_unlock(st);
    if (!ok) {
        sqlite3_close(st->db);
        close(st->lock_fd);
        return false;
    }
    st->model = model;
    if (model) kv_model_identity(model, st->model_id);
    st->space_bytes = (uint64_t)(opt->space_mb > 0 ? opt->space_mb : 4096) << 20;
    st->write_bytes_per_hour =
        (uint64_t)(opt->write_mb_per_hour > 0 ? opt->write_mb_per_hour : 8192) << 20;
    kv_store_repair(st);
    return true;
}

static void kv_store_close(struct kv_store *st) {
    if (st->db) sqlite3_close(st->db);
    if (st->lock_fd >= 0) close(st->lock_fd);
    memset(st, 0, sizeof *st);
    st->lock_fd = -1;
}

/* ---- 12.6.1 Consistency repair ---------------------------------------------
 *
 * Run at open (under the lock), it restores the invariants after a crash:
 *
 *   1. tmp.<pid>.* of a process that no longer exists: removed.
 *   2. a row whose file is missing, or whose file size differs: removed.
 *   3. a <40 hex>.kv file with no row: removed.
 *
 * Step 3 reads the directory listing; that happens here, once per open,
 * never on a lookup. CRC and model mismatches are found when a file is
 * loaded (12.7) or by --kv-check, and removed the same way.
 * ------------------------------------------------------------------------- */

static bool is_entry_name(const char *name, char sha1[41]) {
    size_t len = strlen(name);
    if (len != 43 || strcmp(name + 40, ".kv") != 0) return false;
    for (int i = 0; i < 40; i++)
        if (!((name[i] >= '0' && name[i] <= '9') || (name[i] >= 'a' && name[i] <= 'f')))
            return false;
    memcpy(sha1, name, 40);
    sha1[40] = 0;
    return true;
}

static bool kv_row_exists(struct kv_store *st, const char *sha1) {
    sqlite3_stmt *q = kv_prepare(st, "SELECT 1 FROM snapshots WHERE sha1=?");
    if (!q) return true;      /* when in doubt, delete nothing */
    sqlite3_bind_text(q, 1, sha1, -1, SQLITE_STATIC);
    bool found = sqlite3_step(q) == SQLITE_ROW;
    sqlite3_finalize(q);
    return found;
}

static void kv_repair_directory(struct kv_store *st) {
    DIR *d = opendir(st->dir);
    if (!d) return;
    struct dirent *de;
    char sha1[41], path[1200];
    while ((de = readdir(d)) != NULL) {
        snprintf(path, sizeof path, "%s/%s", st->dir, de->d_name);
        int pid;
        if (sscanf(de->d_name, "tmp.%d.", &pid) == 1) {
            if (pid != getpid() && kill(pid, 0) != 0 && errno == ESRCH) {
                unlink(path);
                kv_log(st, "removed %s, left by a process that died while saving", de->d_name);
            }
        } else if (is_entry_name(de->d_name, sha1) && !kv_row_exists(st, sha1)) {
            unlink(path);
            kv_log(st, "removed %s: file without an index row", de->d_name);
        }
    }
    closedir(d);
}

static void kv_repair_rows(struct kv_store *st) {
    sqlite3_stmt *q = kv_prepare(st, "SELECT sha1, bytes FROM snapshots");
    if (!q) return;
    char (*bad)[41] = NULL;
    int n_bad = 0;
    while (sqlite3_step(q) == SQLITE_ROW) {
        const char *sha1 = (const char *)sqlite3_column_text(q, 0);
        char path[1000];
        struct stat sb;
        kv_path(st, sha1, path, sizeof path);
        if (stat(path, &sb) == 0 && (uint64_t)sb.st_size == (uint64_t)sqlite3_column_int64(q, 1))
            continue;
        bad = xrealloc(bad, (size_t)(n_bad + 1) * sizeof *bad);
        snprintf(bad[n_bad++], 41, "%s", sha1);
    }
    sqlite3_finalize(q);
    for (int i = 0; i < n_bad; i++)
        kv_remove_entry(st, bad[i], "file missing or of the wrong size");
    free(bad);
}

static void kv_store_repair(struct kv_store *st) {
    kv_lock(st);
    kv_repair_rows(st);
    kv_repair_directory(st);
    kv_unlock(st);
}

/* Delete the row, then the file (a crash in between leaves a file without
 * a row, which repair removes). */
static void kv_remove_entry(struct kv_store *st, const char *sha1, const char *why) {
    kv_lock(st);
    sqlite3_stmt *q = kv_prepare(st, "DELETE FROM snapshots WHERE sha1=?");
    if (q) {
        sqlite3_bind_text(q, 1, sha1, -1, SQLITE_STATIC);
        sqlite3_step(q);
        sqlite3_finalize(q);
    }
    char path[1000];
    kv_path(st, sha1, path, sizeof path);
    unlink(path);
    kv_unlock(st);
    kv_log(st, "removed %.12s...: %s", sha1, why);
}

/* ---- 12.7 Lookup -------------------------------------------------------------
 *
 * Given the rendered text of a new prompt, find the snapshot of this model
 * whose key text is the longest prefix of it:
 *
 *   1. SELECT DISTINCT key_bytes for this model, <= the prompt's length
 *      (index snapshots_by_key). There are at most as many as entries.
 *   2. Hash the prompt ONCE, left to right, taking a digest at each of those
 *      lengths (sha1_digest finishes a copy): the SHA1 of every candidate
 *      prefix for the price of one pass.
 *   3. From the longest down, SELECT the row with that sha1 (primary key).
 *   4. Read and verify the file: header vs row, CRCs, key text equal to the
 *      prompt prefix byte for byte, model identity; decode into the session.
 *      A failure removes the entry (invariant 3) and tries the next length.
 *
 * The whole lookup holds the directory lock, so no eviction can remove the
 * file between the query and the read.
 * ------------------------------------------------------------------------- */

struct kv_hit {
    bool found;
    char sha1[41];
    int64_t n_tokens;             /* tokens now in the session */
    int64_t key_bytes;            /* prompt bytes they cover */
    int32_t *tokens;              /* [n_tokens], free() it */
    double load_seconds;
};

/* Lengths (ascending) of this model's keys that fit in `limit`. */
static int64_t *kv_candidate_lengths(struct kv_store *st, const char *len_column, int64_t limit,
                                     int *count) {
    char sql[200];
    snprintf(sql, sizeof sql, "SELECT DISTINCT %s FROM snapshots WHERE model=? AND %s<=? AND "
             "(?=0 OR tokens<?) ORDER BY %s", len_column, len_column, len_column);
    sqlite3_stmt *q = kv_prepare(st, sql);
    *count = 0;
    if (!q) return NULL;
    sqlite3_bind_text(q, 1, st->model_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(q, 2, limit);
    sqlite3_bind_int64(q, 3, st->opt.ctx);
    sqlite3_bind_int64(q, 4, st->opt.ctx);
    int64_t *lens = NULL;
    while (sqlite3_step(q) == SQLITE_ROW) {
        lens = xrealloc(lens, (size_t)(*count + 1) * sizeof *lens);
        lens[(*count)++] = sqlite3_column_int64(q, 0);
    }
    sqlite3_finalize(q);
    return lens;
}

/* hex SHA1 of data[0 .. lens[i]*unit) for every i, in one pass. */
static void kv_prefix_hashes(const uint8_t *data, size_t unit, const int64_t *lens, int count,
                             char (*hex)[41]) {
    struct sha1 c;
    sha1_init(&c);
    int64_t done = 0;
    for (int i = 0; i < count; i++) {
        sha1_update(&c, data + done * unit, (size_t)(lens[i] - done) * unit);
        done = lens[i];
        uint8_t d[20];
        sha1_digest(&c, d);
        sha1_hex(d, hex[i]);
    }
}

/* Invariant 2: the row must describe the file it names. Every field the
 * row shares with the header is compared; a mismatch means the row or the
 * file was replaced behind our back, and the entry is not trusted. */
static bool kv_row_matches(struct kv_store *st, const char *sha1, const struct snapshot_file *f,
                           struct ds4_error *e) {
    sqlite3_stmt *q = kv_prepare(st, "SELECT model, key_bytes, tokens, bytes, crc, quant_bits, ctx"
                                     " FROM snapshots WHERE sha1=?");
    if (!q) return fail(e, "cannot read the index row");
    sqlite3_bind_text(q, 1, sha1, -1, SQLITE_STATIC);
    bool ok = sqlite3_step(q) == SQLITE_ROW;
    char model[41];
    sha1_hex(f->h.model, model);
    const char *row_model = ok ? (const char *)sqlite3_column_text(q, 0) : NULL;
    const struct { const char *name; uint64_t header; } fields[] = {
        {"key_bytes", f->h.key_bytes}, {"tokens", f->h.n_tokens}, {"bytes", f->size},
        {"crc", f->h.crc}, {"quant_bits", (uint64_t)f->h.quant_bits}, {"ctx", f->h.ctx},
    };
    if (!ok) fail(e, "no index row");
    else if (!row_model || strcmp(row_model, model) != 0)
        ok = fail(e, "index row and file disagree: model");
    for (int i = 0; ok && i < 6; i++)
        if ((uint64_t)sqlite3_column_int64(q, i + 1) != fields[i].header)
            ok = fail(e, "index row and file disagree: %s", fields[i].name);
    sqlite3_finalize(q);
    return ok;
}

/* Try to load the entry `sha1` (found by a key of `key_len` bytes of `key`). */
static bool kv_try_load(struct kv_store *st, struct session *s, const char *sha1,
                        const char *key, int64_t key_len, struct kv_hit *hit) {
    char path[1000];
    kv_path(st, sha1, path, sizeof path);
    struct ds4_error e;
    struct snapshot_file f;
    double t0 = now_seconds();
    if (!snapshot_read_verified(path, &f, &e)) {
        kv_remove_entry(st, sha1, e.msg);
        return false;
    }
    bool ok = kv_row_matches(st, sha1, &f, &e);
    if (ok && key && ((int64_t)f.h.key_bytes != key_len ||
                memcmp(f.bytes + KV_HEADER_BYTES, key, (size_t)key_len) != 0))
        ok = fail(&e, "key text differs from the prompt prefix");
    if (ok) ok = session_load_file(s, &f, &hit->tokens, &e);
    if (ok) {
        hit->found = true;
        hit->n_tokens = (int64_t)f.h.n_tokens;
        hit->key_bytes = (int64_t)f.h.key_bytes;
        snprintf(hit->sha1, sizeof hit->sha1, "%s", sha1);
        hit->load_seconds = now_seconds() - t0;
    }
    free(f.bytes);
    if (!ok) kv_remove_entry(st, sha1, e.msg);
    return ok;
}

static void kv_touch(struct kv_store *st, const char *sha1) {
    sqlite3_stmt *q = kv_prepare(st, "UPDATE snapshots SET hits=hits+1, last_used=? WHERE sha1=?");
    if (!q) return;
    sqlite3_bind_int64(q, 1, now_unix_ms());
    sqlite3_bind_text(q, 2, sha1, -1, SQLITE_STATIC);
    sqlite3_step(q);
    sqlite3_finalize(q);
}

/* The common loop of both lookups: candidates from longest to shortest. */
static bool kv_lookup_by(struct kv_store *st, struct session *s, const char *len_column,
                         const char *hash_column, const uint8_t *data, size_t unit, int64_t len,
                         bool text, struct kv_hit *hit) {
    memset(hit, 0, sizeof *hit);
    if (!st->model) return false;
    kv_lock(st);
    int count;
    int64_t *lens = kv_candidate_lengths(st, len_column, len, &count);
    char (*hex)[41] = xmalloc((size_t)(count ? count : 1) * sizeof *hex);
    kv_prefix_hashes(data, unit, lens, count, hex);
    char sql[160];
    snprintf(sql, sizeof sql, "SELECT sha1 FROM snapshots WHERE model=? AND %s=? AND %s=?",
             hash_column, len_column);
    for (int i = count - 1; i >= 0 && !hit->found; i--) {
        sqlite3_stmt *q = kv_prepare(st, sql);
        if (!q) break;
        sqlite3_bind_text(q, 1, st->model_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 2, hex[i], -1, SQLITE_STATIC);
        sqlite3_bind_int64(q, 3, lens[i]);
        char sha1[41] = "";
        if (sqlite3_step(q) == SQLITE_ROW)
            snprintf(sha1, sizeof sha1, "%s", (const char *)sqlite3_column_text(q, 0));
        sqlite3_finalize(q);
        if (sha1[0] && kv_try_load(st, s, sha1, text ? (const char *)data : NULL, lens[i], hit))
            kv_touch(st, sha1);
    }
    kv_unlock(st);
    free(lens);
    free(hex);
    return hit->found;
}

/* Longest cached prefix of a rendered prompt: on a hit the session holds it. */
static bool kv_store_lookup(struct kv_store *st, struct session *s, const char *text, size_t len,
                            struct kv_hit *hit) {
    return kv_lookup_by(st, s, "key_bytes", "sha1", (const uint8_t *)text, 1, (int64_t)len, true,
                        hit);
}

/* The same by token ids (for --tokens prompts, which have no text). */
static bool kv_store_lookup_tokens(struct kv_store *st, struct session *s, const int32_t *ids,
                                   int64_t n, struct kv_hit *hit) {
    return kv_lookup_by(st, s, "tokens", "token_hash", (const uint8_t *)ids, 4, n, false, hit);
}

/* ---- 12.8 Saving, the space budget and the write budget -------------------
 *
 *   1. Skip if an entry with this key already holds the same tokens for this
 *      model (refresh its last_used instead): no rewrite storms.
 *   2. Skip if the write ledger says the last hour already wrote more than
 *      the write budget (default 8 GiB/h: a save every 10 s of 200 MB for an
 *      hour; a laptop SSD rated for 600 TBW survives decades of that).
 *   3. Skip if the snapshot alone would exceed the space budget.
 *   4. Encode into DIR/tmp.<pid>.<sha1> and fsync (no lock held).
 *   5. Under the lock: rename, fsync DIR, upsert the row, add to the ledger,
 *      then evict least-recently-used entries (never the new one) until the
 *      sum of `bytes` fits the space budget.
 * ------------------------------------------------------------------------- */

static int64_t kv_query_int(struct kv_store *st, const char *sql, int64_t arg) {
    sqlite3_stmt *q = kv_prepare(st, sql);
    if (!q) return -1;
    sqlite3_bind_int64(q, 1, arg);
    int64_t v = sqlite3_step(q) == SQLITE_ROW ? sqlite3_column_int64(q, 0) : -1;
    sqlite3_finalize(q);
    return v;
}

static void kv_evict(struct kv_store *st, const char *keep) {
    for (;;) {
        int64_t total =
            kv_query_int(st, "SELECT COALESCE(SUM(bytes),0) FROM snapshots WHERE bytes>=?", 0);
        if (total < 0 || (uint64_t)total <= st->space_bytes) return;
        sqlite3_stmt *q = kv_prepare(st, "SELECT sha1 FROM snapshots WHERE sha1<>? "
                                         "ORDER BY last_used, created LIMIT 1");
        if (!q) return;
        sqlite3_bind_text(q, 1, keep, -1, SQLITE_STATIC);
        char victim[41] = "";
        if (sqlite3_step(q) == SQLITE_ROW)
            snprintf(victim, sizeof victim, "%s", (const char *)sqlite3_column_text(q, 0));
        sqlite3_finalize(q);
        if (!victim[0]) return;
        kv_remove_entry(st, victim, "evicted (least recently used, over the space budget)");
    }
}

static bool kv_insert_row(struct kv_store *st, const char *sha1, const struct snapshot_meta *meta,
                          const int32_t *tokens, int64_t n, const struct snapshot_stats *ss,
                          uint32_t crc) {
    sqlite3_stmt *q = kv_prepare(st,
        "INSERT OR REPLACE INTO snapshots(sha1, model, key_bytes, tokens, token_hash, bytes, crc,"
        " quant_bits, ctx, created, last_used, hits, reason) VALUES(?,?,?,?,?,?,?,?,?,?,?,0,?)");
    if (!q) return false;
    char token_hash[41];
    sha1_of(tokens, (size_t)n * sizeof(int32_t), token_hash);
    int64_t now = now_unix_ms();
    sqlite3_bind_text(q, 1, sha1, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, st->model_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(q, 3, (int64_t)meta->key_len);
    sqlite3_bind_int64(q, 4, n);
    sqlite3_bind_text(q, 5, token_hash, -1, SQLITE_STATIC);
    sqlite3_bind_int64(q, 6, (int64_t)ss->file_bytes);
    sqlite3_bind_int64(q, 7, crc);
    sqlite3_bind_int(q, 8, kv_quant_bits(st->model));
    sqlite3_bind_int64(q, 9, meta->ctx);
    sqlite3_bind_int64(q, 10, now);
    sqlite3_bind_int64(q, 11, now);
    sqlite3_bind_text(q, 12, kv_reason_names[meta->reason], -1, SQLITE_STATIC);
    bool ok = sqlite3_step(q) == SQLITE_DONE;
    sqlite3_finalize(q);
    q = kv_prepare(st, "INSERT INTO writes(at, bytes) VALUES(?, ?)");
    if (q) {
        sqlite3_bind_int64(q, 1, now);
        sqlite3_bind_int64(q, 2, (int64_t)ss->file_bytes);
        sqlite3_step(q);
        sqlite3_finalize(q);
    }
    return ok;
}

/* Does the entry exist with these very tokens? Then only refresh it. */
static bool kv_already_saved(struct kv_store *st, const char *sha1, int64_t n) {
    sqlite3_stmt *q = kv_prepare(st, "UPDATE snapshots SET last_used=? WHERE sha1=? AND model=? "
                                     "AND tokens=?");
    if (!q) return false;
    sqlite3_bind_int64(q, 1, now_unix_ms());
    sqlite3_bind_text(q, 2, sha1, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 3, st->model_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(q, 4, n);
    sqlite3_step(q);
    sqlite3_finalize(q);
    return sqlite3_changes(st->db) > 0;
}

/* An upper bound of the file size, for the budgets (no raw blocks). */
static uint64_t snapshot_estimate_bytes(const struct ds4_config *c, bool has_mtp, int64_t n,
                                        size_t key_len) {
    int nope_blocks = (c->head_dim - c->rope_dim) / FP8_BLOCK;
    uint64_t kv_row = (uint64_t)nope_blocks * (1 + FP8_BLOCK) +
                      (uint64_t)(c->head_dim - nope_blocks * FP8_BLOCK) * 4;
    uint64_t f32 = snapshot_f32_bytes(c, has_mtp, n);
    uint64_t rows = (uint64_t)(n < c->window ? n : c->window) * (c->n_layers + has_mtp);
    for (int l = 0; l < c->n_layers; l++)
        if (c->ratio[l] > 0) rows += (uint64_t)(n / c->ratio[l]);
    return KV_HEADER_BYTES + key_len + 1024 + f32 - rows * ((uint64_t)c->head_dim * 4 - kv_row);
}

struct kv_save_result {
    bool saved;
    char sha1[41];
    struct snapshot_stats stats;
    const char *skipped;          /* why nothing was written, or NULL */
};

static bool kv_store_save(struct kv_store *st, const struct session *s, const int32_t *tokens,
                          int64_t n, const char *key, size_t key_len, enum kv_reason reason,
                          struct kv_save_result *res, struct ds4_error *e) {
    memset(res, 0, sizeof *res);
    const struct ds4_config *c = &st->model->cfg;
    sha1_of(key, key_len, res->sha1);
    kv_lock(st);
    bool done = kv_already_saved(st, res->sha1, n);
    int64_t hour = kv_query_int(st, "SELECT COALESCE(SUM(bytes),0) FROM writes WHERE at>?",
                                now_unix_ms() - 3600 * 1000);
    kv_exec(st, "DELETE FROM writes WHERE at < strftime('%s','now')*1000 - 3600000", e);
    kv_unlock(st);
    uint64_t estimate = snapshot_estimate_bytes(c, st->model->has_mtp, n, key_len);
    if (done) res->skipped = "already saved";
    else if ((uint64_t)hour + estimate > st->write_bytes_per_hour)
        res->skipped = "write budget for this hour used up";
    else if (estimate + estimate / 100 > st->space_bytes)
        res->skipped = "larger than the space budget";
    if (res->skipped) {
        kv_log(st, "not saving %lld tokens: %s", (long long)n, res->skipped);
        return true;
    }
    char tmp[1100], path[1000];
    snprintf(tmp, sizeof tmp, "%s/tmp.%d.%s", st->dir, (int)getpid(), res->sha1);
    kv_path(st, res->sha1, path, sizeof path);
    struct snapshot_meta meta = { key, key_len, reason, st->opt.ctx };
    if (!snapshot_write_file(s, tokens, n, tmp, &meta, &res->stats, e)) return false;
    struct snapshot_file f;             /* the CRC that ties the row to this file */
    uint8_t header[KV_HEADER_BYTES];
    int fd = open(tmp, O_RDONLY);
    bool ok = fd >= 0 && read(fd, header, KV_HEADER_BYTES) == KV_HEADER_BYTES &&
              kv_header_decode(header, res->stats.file_bytes, &f.h, e);
    if (fd >= 0) close(fd);
    kv_lock(st);
    ok = ok && snapshot_publish(tmp, path, e);
    ok = ok && kv_insert_row(st, res->sha1, &meta, tokens, n, &res->stats, f.h.crc);
    if (ok) kv_evict(st, res->sha1);
    kv_unlock(st);
    if (!ok) {
        unlink(tmp);
        return fail(e, "saving %s: %s", res->sha1, e->msg);
    }
    res->saved = true;
    kv_log(st, "saved %lld tokens (%s) as %.12s..., %.1f MB in %.3f s", (long long)n,
           kv_reason_names[reason], res->sha1, res->stats.file_bytes / 1e6, res->stats.seconds);
    return true;
}

/* ---- 12.9 When to save -----------------------------------------------------
 *
 *     setting                             default
 *     ----------------------------------  -------------------------------
 *     min_tokens                          512     smaller prefixes are cheap to prefill
 *     cold_max_tokens                     0       larger prompts skip the cold save
 *                                                 (0 = no limit: an agent's 40k-token
 *                                                 first prompt is the one most worth it)
 *     interval                            10240   continued saves at multiples of this
 *     trim                                32      tokens left off the end of a prompt
 *     align                               2048    cold save points are multiples of this
 *
 * The moments:
 *
 *   - cold: a full miss on a prompt of at least min (and at most cold_max,
 *     when set) tokens. The save point
 *     is the last <｜User｜> before the first <｜Assistant｜> (the stable
 *     system + tools prefix that every later turn repeats) if that is at
 *     least min_tokens; else (n - trim) rounded down to `align`. The tail
 *     is trimmed because the last tokens of a prompt (the assistant prefix,
 *     a thinking tag) are often rendered differently next turn; aligning
 *     makes turns of similar length share save points.
 *   - continued: whenever the session reaches a multiple of `interval`
 *     (prefill or decode).
 *   - evict: the live session (>= min_tokens) is about to be replaced.
 *   - shutdown: clean exit, the live session (>= min_tokens).
 *
 * kv_store_feed() below is the prefill with these save points (the server,
 * whose prefill loop also keeps clients alive, uses kv_next_stop() itself);
 * evict and shutdown are kv_store_save_live() of the whole live session,
 * keyed by its text. The CLI (14.2) and the server's worker (13.10) are the
 * two users.
 * ------------------------------------------------------------------------- */

struct kv_policy {
    int64_t min_tokens, cold_max_tokens, interval, trim, align;
};

static struct kv_policy kv_default_policy(void) {
    struct kv_policy p = { 512, 0, 10240, 32, 2048 };
    return p;
}

/* The cold save point of a prompt of n tokens, or 0 for none. */
static int64_t kv_cold_save_point(const struct kv_policy *p, const int32_t *ids, int64_t n,
                                  int32_t user_id, int32_t assistant_id) {
    if (n < p->min_tokens || (p->cold_max_tokens > 0 && n > p->cold_max_tokens)) return 0;
    int64_t last_user = -1;
    for (int64_t i = 0; i < n && ids[i] != assistant_id; i++)
        if (ids[i] == user_id) last_user = i;
    if (last_user >= p->min_tokens) return last_user;
    int64_t at = (n - p->trim) / p->align * p->align;
    return at >= p->min_tokens ? at : 0;
}

/* The next multiple of the interval in (from, to], or 0. */
static int64_t kv_next_continued_point(const struct kv_policy *p, int64_t from, int64_t to) {
    if (p->interval <= 0) return 0;
    int64_t next = (from / p->interval + 1) * p->interval;
    return next <= to ? next : 0;
}

static int32_t kv_special_id(const struct tokenizer *tok, const char *text) {
    size_t mlen = 0;
    int32_t id = tok_match_special(tok, text, strlen(text), &mlen);
    return mlen == strlen(text) ? id : -1;
}

/* Save the session (at ids[0..n)) keyed by the detokenized text. */
static bool kv_store_save_tokens(struct kv_store *st, const struct session *s,
                                 const struct tokenizer *tok, const int32_t *ids, int64_t n,
                                 enum kv_reason reason, struct ds4_error *e) {
    struct strbuf key = { 0 };
    detokenize(tok, ids, (size_t)n, &key);
    struct kv_save_result res;
    bool ok = !key.oom && kv_store_save(st, s, ids, n, key.data ? key.data : "", key.len, reason,
                                        &res, e);
    strbuf_free(&key);
    return ok;
}

/* Where a prefill step from `pos` that would end at `end` must stop: at the
 * cold point `cold_at` (0 = none) or the next continued point, if one lies
 * in (pos, end], with *why saying which; else at `end`. */
static int64_t kv_next_stop(const struct kv_policy *p, int64_t pos, int64_t end, int64_t cold_at,
                            enum kv_reason *why) {
    *why = KV_REASON_UNKNOWN;
    int64_t cont = kv_next_continued_point(p, pos, end);
    if (cont) end = cont, *why = KV_REASON_CONTINUED;
    if (cold_at > pos && cold_at <= end) end = cold_at, *why = KV_REASON_COLD;
    return end;
}

/* Save the session, which holds exactly ids[0..n), if the policy finds it
 * worth a file. A failed save is logged, never fatal: the store is a cache. */
static void kv_store_save_live(struct kv_store *st, const struct kv_policy *p,
                               const struct session *s, const struct tokenizer *tok,
                               const int32_t *ids, int64_t n, enum kv_reason reason) {
    if (n < p->min_tokens) return;
    struct ds4_error e = { "" };
    if (s->pos != n) kv_log(st, "not saving: the session is at %lld, its token list at %lld",
                            (long long)s->pos, (long long)n);
    else if (!kv_store_save_tokens(st, s, tok, ids, n, reason, &e))
        kv_log(st, "save failed: %s", e.msg);
}

/* Prefill ids[s->pos .. n) in chunks, stopping at the cold point `cold_at`
 * (0 = none) and at continued points to save. */
static bool kv_store_feed(struct kv_store *st, const struct kv_policy *p, struct session *s,
                          const struct tokenizer *tok, const int32_t *ids, int64_t n,
                          int64_t cold_at, int chunk, struct ds4_error *e) {
    while (s->pos < n) {
        enum kv_reason why;
        int64_t stop = kv_next_stop(p, s->pos, n, cold_at, &why);
        if (!session_feed(s, ids + s->pos, stop - s->pos, chunk, e)) return false;
        if (why != KV_REASON_UNKNOWN) kv_store_save_live(st, p, s, tok, ids, stop, why);
    }
    return true;
}

/* ---- 12.9.1 Resuming a prompt from the store ------------------------------
 *
 * The live session cannot serve a prompt (it holds another conversation, or
 * nothing). Look the prompt's rendered text up; on a hit the session holds
 * the cached tokens, and the prompt to feed becomes
 *
 *     hit.tokens  ++  tokenize(text[hit.key_bytes ..])
 *
 * Only the suffix is tokenized (chapter 12, "HOW IT WORKS"). This may differ from
 * tokenize(text) near the boundary, where BPE would have merged across it;
 * so from here on the caller's token list must be this one, the session's
 * own, not its first tokenization of the text.
 * ------------------------------------------------------------------------- */

/* Returns the new prompt (free() it; *n ids), or NULL on a miss (the
 * session is then empty). hit->tokens is freed here. */
static int32_t *kv_store_resume(struct kv_store *st, struct session *s, const struct tokenizer *tok,
                                const char *text, size_t len, size_t *n, struct kv_hit *hit) {
    if (!kv_store_lookup(st, s, text, len, hit)) return NULL;
    int32_t *rest = NULL;
    size_t n_rest = 0;
    tokenize(tok, text + hit->key_bytes, len - (size_t)hit->key_bytes, true, &rest, &n_rest);
    *n = (size_t)hit->n_tokens + n_rest;
    int32_t *ids = xmalloc((*n ? *n : 1) * sizeof(int32_t));
    memcpy(ids, hit->tokens, (size_t)hit->n_tokens * sizeof(int32_t));
    if (n_rest) memcpy(ids + hit->n_tokens, rest, n_rest * sizeof(int32_t));
    free(rest);
    free(hit->tokens);
    hit->tokens = NULL;
    kv_log(st, "loaded %lld tokens from %s (%.12s..., %lld of the prompt's %zu bytes) in %.3f s",
           (long long)hit->n_tokens, st->dir, hit->sha1, (long long)hit->key_bytes, len,
           hit->load_seconds);
    return ids;
}

/* ---- 12.10 --kv-list, --kv-check, --kv-clear ------------------------------- */

static bool kv_open_for_command(struct kv_store *st, const char *dir) {
    struct kv_store_options o = { .dir = dir };
    struct ds4_error e;
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        fprintf(stderr, "ds4: %s is not a directory\n", dir);
        return false;
    }
    /* Never turn a directory the user mistyped into a store. */
    char index[1000];
    snprintf(index, sizeof index, "%s/index.sqlite", dir);
    if (access(index, F_OK) != 0) {
        fprintf(stderr, "ds4: %s is not a KV cache directory (it has no index.sqlite)\n", dir);
        return false;
    }
    if (kv_store_open(st, &o, NULL, &e)) return true;
    fprintf(stderr, "ds4: %s\n", e.msg);
    return false;
}

static int kv_list_command(const char *dir) {
    struct kv_store st;
    if (!kv_open_for_command(&st, dir)) return 1;
    sqlite3_stmt *q = kv_prepare(&st, "SELECT sha1, tokens, bytes, model, quant_bits, hits, reason,"
                                      " created, last_used FROM snapshots ORDER BY last_used DESC");
    int64_t n = 0, total = 0;
    printf("%-12s %9s %12s %-12s %4s %5s %-9s %-19s\n", "sha1", "tokens", "bytes", "model", "bits",
           "hits", "reason", "last used");
    while (q && sqlite3_step(q) == SQLITE_ROW) {
        time_t used = (time_t)(sqlite3_column_int64(q, 8) / 1000);
        char when[32];
        strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", localtime(&used));
        printf("%-12.12s %9lld %12lld %-12.12s %4d %5d %-9s %s\n", sqlite3_column_text(q, 0),
               (long long)sqlite3_column_int64(q, 1), (long long)sqlite3_column_int64(q, 2),
               sqlite3_column_text(q, 3), sqlite3_column_int(q, 4), sqlite3_column_int(q, 5),
               sqlite3_column_text(q, 6), when);
        n++;
        total += sqlite3_column_int64(q, 2);
    }
    sqlite3_finalize(q);
    printf("%lld snapshots, %.1f MB\n", (long long)n, total / 1e6);
    kv_store_close(&st);
    return 0;
}

/* Verify one entry's file against its row: header, CRCs, key SHA1, model. */
static bool kv_check_entry(struct kv_store *st, sqlite3_stmt *row, struct ds4_error *e) {
    const char *sha1 = (const char *)sqlite3_column_text(row, 0);
    char path[1000], model[41];
    kv_path(st, sha1, path, sizeof path);
    struct snapshot_file f;
    if (!snapshot_read_verified(path, &f, e)) return false;
    char key_hex[41];
    sha1_hex(f.h.key_sha1, key_hex);
    sha1_hex(f.h.model, model);
    bool ok = true;
    if (strcmp(key_hex, sha1) != 0) ok = fail(e, "%s: file name does not match its key", path);
    else if (strcmp(model, (const char *)sqlite3_column_text(row, 1)) != 0)
        ok = fail(e, "%s: model in the file differs from the index", path);
    else if ((int64_t)f.h.n_tokens != sqlite3_column_int64(row, 2) ||
             (int64_t)f.size != sqlite3_column_int64(row, 3) ||
             (int64_t)f.h.crc != sqlite3_column_int64(row, 4))
        ok = fail(e, "%s: tokens, size or CRC differ from the index", path);
    free(f.bytes);
    return ok;
}

static int kv_check_command(const char *dir) {
    struct kv_store st;
    if (!kv_open_for_command(&st, dir)) return 1;
    kv_lock(&st);
    sqlite3_stmt *q = kv_prepare(&st, "SELECT sha1, model, tokens, bytes, crc FROM snapshots");
    int good = 0, bad = 0;
    char (*doomed)[41] = NULL;
    while (q && sqlite3_step(q) == SQLITE_ROW) {
        struct ds4_error e;
        if (kv_check_entry(&st, q, &e)) { good++; continue; }
        printf("BAD  %s\n", e.msg);
        doomed = xrealloc(doomed, (size_t)(bad + 1) * sizeof *doomed);
        snprintf(doomed[bad++], 41, "%s", (const char *)sqlite3_column_text(q, 0));
    }
    sqlite3_finalize(q);
    for (int i = 0; i < bad; i++) kv_remove_entry(&st, doomed[i], "failed --kv-check");
    kv_unlock(&st);
    free(doomed);
    printf("%d snapshots verified, %d bad (removed)\n", good, bad);
    kv_store_close(&st);
    return bad ? 1 : 0;
}

static int kv_clear_command(const char *dir) {
    struct kv_store st;
    if (!kv_open_for_command(&st, dir)) return 1;
    kv_lock(&st);
    sqlite3_stmt *q = kv_prepare(&st, "SELECT sha1 FROM snapshots");
    char (*all)[41] = NULL;
    int n = 0;
    while (q && sqlite3_step(q) == SQLITE_ROW) {
        all = xrealloc(all, (size_t)(n + 1) * sizeof *all);
        snprintf(all[n++], 41, "%s", (const char *)sqlite3_column_text(q, 0));
    }
    sqlite3_finalize(q);
    st.opt.quiet = true;
    for (int i = 0; i < n; i++) kv_remove_entry(&st, all[i], "cleared");
    struct ds4_error e;
    kv_exec(&st, "DELETE FROM writes; PRAGMA wal_checkpoint(TRUNCATE);", &e);
    kv_unlock(&st);
    free(all);
    printf("removed %d snapshots from %s\n", n, dir);
    kv_store_close(&st);
    return 0;
}

/* ---- 12.11 Checkpoints in memory: rewinding a session ---------------------
 *
 * A session only moves forward (6.2), yet agents go back: a retried request
 * resends the same prompt after the session has generated past it, an edited
 * turn changes the middle of the conversation. The state at an earlier
 * position P cannot be had by truncation: the window ring has overwritten
 * the rows of P-W .. P-1 with later ones, and the compressors' unfinished
 * windows have moved on. But most of the state is append-only:
 *
 *     state at P                    after more tokens          to get P back
 *     ----------------------------  -------------------------  --------------
 *     compressed / indexer rows     more rows appended         keep P/r rows
 *     ring rows of P-W .. P-1       overwritten                must be saved
 *     compressor frontiers          moved on                   must be saved
 *     logits, last_hc, MTP ring     overwritten                must be saved
 *
 * So a checkpoint is the snapshot of 12.5 with every row store replaced by
 * its count: the same serializer walks the same fields (snap_io with
 * rows_by_count), into memory instead of a file, with the ring rows in FP8
 * as on disk. It costs a window's rows per layer plus the frontiers and the
 * logits, whatever P is, and restoring it is exact for the same reason a
 * snapshot load is: every row went through the FP8 round trip already.
 *
 * A checkpoint only fits the session it was taken from, and only while the
 * rows before P are the ones it had: rewinding to an earlier checkpoint and
 * feeding other tokens invalidates the later ones (the caller drops them).
 * The token ids travel along and a restore compares them with the tokens
 * the caller believes the session holds, so a stale checkpoint is refused
 * rather than restored.
 * ------------------------------------------------------------------------- */

struct mem_checkpoint {
    int64_t pos;                  /* the session's position when taken */
    uint8_t *bytes;               /* the 12.5 payload, rows by count */
    size_t len;
};

/* Checkpoint s, which holds tokens[0 .. s->pos). */
static void checkpoint_encode(struct mem_checkpoint *cp, const struct session *s,
                              const int32_t *tokens) {
    kv_tables_init();
    struct ds4_error e = { "" };
    struct snap_io io = { .writing = true, .e = &e, .fd = -1, .cap = 1 << 16,
                          .rows_by_count = true };
    io.buf = xmalloc(io.cap);
    snap_session(&io, (struct session *)s, (int32_t *)tokens, s->pos);   /* write mode reads only */
    cp->pos = s->pos;
    cp->len = io.len;
    cp->bytes = xrealloc(io.buf, io.len ? io.len : 1);
}

static void checkpoint_release(struct mem_checkpoint *cp) {
    free(cp->bytes);
    memset(cp, 0, sizeof *cp);
}

/* Put s back at the checkpoint. `tokens` are the ids s is believed to hold
 * up to at least cp->pos; they must equal the checkpoint's. On failure s
 * may be half restored: the caller resets it. */
static bool checkpoint_restore(struct session *s, const struct mem_checkpoint *cp,
                               const int32_t *tokens, struct ds4_error *e) {
    kv_tables_init();
    if (cp->pos < 1) return fail(e, "an empty checkpoint cannot be restored");
    int32_t *ids = xmalloc((size_t)cp->pos * sizeof(int32_t));
    struct snap_io io = { .writing = false, .e = e, .in = cp->bytes, .size = cp->len,
                          .rows_by_count = true };
    snap_session(&io, s, ids, cp->pos);
    bool ok = !io.failed;
    if (ok && memcmp(ids, tokens, (size_t)cp->pos * sizeof(int32_t)) != 0)
        ok = fail(e, "the checkpoint at %lld holds other tokens than the session",
                  (long long)cp->pos);
    free(ids);
    if (!ok) return false;
    s->pos = cp->pos;
    s->mtp_pos = s->eng->model->has_mtp ? cp->pos - 1 : 0;
    return true;
}

/* A fork: dst (initialized, any state) becomes an independent copy of src. */
static void row_store_copy(struct row_store *dst, const struct row_store *src) {
    kv_rows_resize(dst, src->n);
    size_t bytes = (size_t)src->n * (size_t)src->width * sizeof(float);
    if (bytes) memcpy(dst->rows, src->rows, bytes);
}

static void layer_state_copy(struct layer_state *dst, const struct layer_state *src,
                             const struct ds4_config *c) {
    memcpy(dst->ring, src->ring, (size_t)c->window * c->head_dim * sizeof(float));
    row_store_copy(&dst->comp_rows, &src->comp_rows);
    row_store_copy(&dst->idx_rows, &src->idx_rows);
    size_t fc = frontier_floats(&src->comp), fi = frontier_floats(&src->idx_comp);
    if (fc) memcpy(dst->comp.kv, src->comp.kv, fc * sizeof(float));
    if (fc) memcpy(dst->comp.score, src->comp.score, fc * sizeof(float));
    if (fi) memcpy(dst->idx_comp.kv, src->idx_comp.kv, fi * sizeof(float));
    if (fi) memcpy(dst->idx_comp.score, src->idx_comp.score, fi * sizeof(float));
}

static void session_copy(struct session *dst, const struct session *src) {
    const struct ds4_config *c = &src->eng->model->cfg;
    src->eng->be->state_pull((struct session *)src);   /* the host copies are the ones copied */
    for (int l = 0; l < c->n_layers; l++) layer_state_copy(&dst->layers[l], &src->layers[l], c);
    layer_state_copy(&dst->mtp_state, &src->mtp_state, c);
    memcpy(dst->logits, src->logits, (size_t)c->vocab * sizeof(float));
    memcpy(dst->last_hc, src->last_hc, (size_t)c->hc * c->dim * sizeof(float));
    dst->pos = src->pos;
    dst->mtp_pos = src->mtp_pos;
    dst->eng->be->state_push(dst);
}

/* ============================================================================
 * Chapter 13. The HTTP server: OpenAI and Anthropic APIs for coding agents
 * ============================================================================
 *
 * Spec: [API] (the API surface), [LAYOUT §4] (chat format), [LAYOUT §5] (DSML).
 * Tests: tests/server/run.sh (curl edge cases) and tests/server/sdk.test.mjs
 * (the real `openai` and `@anthropic-ai/sdk` client libraries).
 *
 * `ds4 --server` serves the one loaded model over HTTP/1.1 to agent clients
 * (Claude Code, opencode, Codex, Pi) in the three dialects they speak:
 *
 *     POST /v1/chat/completions   OpenAI chat, streamed or not, with tools
 *     POST /v1/completions        OpenAI legacy text completion
 *     POST /v1/responses          OpenAI Responses (Codex)
 *     POST /v1/messages           Anthropic Messages (Claude Code)
 *     POST /v1/messages/count_tokens
 *     GET  /v1/models, /v1/models/{id}, /health, /metrics (and HEAD of each)
 *
 * HOW IT WORKS. There are three kinds of thread:
 *
 *     accept thread --one per connection--> client thread --queue--> worker
 *        (server_main)                       (conn_main)             (worker_main)
 *
 *   - The accept thread takes connections; above --max-conns it first
 *     reclaims the slot of an idle or slow client (13.12 SLOTS), else it
 *     refuses with a 503 at once (a health check still gets its 200), so a
 *     flood cannot pile up threads.
 *   - A client thread reads requests under deadlines, one after another on
 *     a kept-alive connection (13.2 KEEP-ALIVE), checks the key,
 *     parses the JSON, turns the request of whichever dialect into one
 *     canonical message list, renders it with the V4 chat template
 *     (chat_render), tokenizes it, and queues a `struct job`. It then only
 *     waits, watching its socket so that a client that leaves while queued
 *     is dropped from the queue.
 *   - The one worker thread owns the engine and the sessions in memory. It
 *     takes jobs in order, reuses the longest token prefix a session (or
 *     one of its checkpoints) already holds, prefills the rest, samples,
 *     and writes the reply to the
 *     client's socket itself, token by token, in that client's dialect.
 *
 * Why does the worker write to the socket? Because then a token goes from
 * the sampler to the wire with no hand-off, and a failed write is the
 * earliest possible sign that the client left: generation stops on the next
 * token. Writes have a send timeout (SERVER_SEND_TIMEOUT_S), so a client
 * that stops reading cannot hold the worker for longer than that.
 *
 * One model, one worker: requests are served one at a time. Sixteen agents
 * sharing a server all get complete answers, in turn.
 *
 * The chapter's sections:
 *
 *   13.1  Options
 *   13.2  Bytes on the wire: reading a request under limits
 *   13.3  Writing responses: status lines, CORS, the API's error shapes
 *   13.4  Request fields: typed reads, sampling, thinking, limits
 *   13.5  Three dialects, one conversation
 *   13.6  Exact replay of tool calls
 *   13.7  The test script: forced replies (tests only)
 *   13.8  Jobs and the queue
 *   13.8.1 Guided decoding: tool_choice, JSON replies, penalties, logprobs
 *   13.9  The reply in each dialect: streaming events and whole bodies
 *   13.10 The worker: prefix reuse, prefill, decode, DSML, stop strings
 *   13.11 Handlers and routing
 *   13.12 The accept loop and server_main()
 *
 * LIMITATIONS, by design, to keep the chapter small:
 *
 *   - Requests on one connection are served in order, never interleaved:
 *     a pipelined request waits until the previous reply is complete.
 *   - A session rewinds only to its checkpoints (every --checkpoint-every
 *     prompt tokens and each prompt's end, 13.10): a prompt that leaves
 *     every session in memory between two checkpoints re-feeds from the
 *     one below. With --kv-disk-dir a miss falls back to the longest
 *     prefix saved on disk (chapter 12).
 *   - User text is tokenized together with the template, so a user who types
 *     a special token such as <｜User｜> gets that token (as in the official
 *     encoder).
 */

/* ---- 13.1 Options ---------------------------------------------------------- */

/* Every knob of the server, parsed once (server_parse_option) and then
 * read-only. Defaults come from server_options_default(). */
struct server_options {
    const char *host;          /* --host ADDR        bind address; 127.0.0.1 */
    int port;                  /* --port N           8000; 0 picks a free port */
    const char *api_key;       /* --api-key KEY      required on all but /health; NULL = open */
    /* --cors ORIGIN      allowed browser origin ("*" only if given); NULL = no CORS */
    const char *cors_origin;
    /* --allow-host LIST  more Host names to accept, comma-separated; "*" any */
    const char *allow_hosts;
    const char *log_path;      /* --log FILE         one line per request, appended */
    const char *model_name;    /* --model-name NAME  id in /v1/models; deepseek-v4-flash */
    const char *test_script;   /* --test-script FILE forced replies, for tests only (13.7) */
    const char *port_file;     /* --port-file FILE   write the bound port there (tests) */
    size_t max_body;           /* --max-body BYTES   8 MiB */
    int max_header;            /* --max-header BYTES 64 KiB: request line plus headers */
    int header_timeout_ms;     /* --header-timeout S 10 s for the whole head (slowloris) */
    int body_timeout_ms;       /* --body-timeout S   60 s for the whole body */
    int max_tokens_cap;        /* --max-tokens-cap N 32768: the most any request may generate */
    int max_conns;             /* --max-conns N      64 open connections */
    int max_conns_per_client;  /* --max-conns-per-client N  32 from one address */
    size_t max_parse_mem;      /* --max-parse-mem BYTES 64 MiB: one body's JSON tree, at most */
    int max_parses;            /* --max-parses N     4 such trees at once (the total pool) */
    /* --keepalive-timeout S 5 s idle between requests; 0: one per connection */
    int keepalive_ms;
    int keepalive_requests;    /* --keepalive-requests N 100 requests per connection */
    int ctx;                   /* --ctx N            131072: prompt + reply tokens */
    /* --chunk N          prefill chunk (shared with the CLI's --chunk) */
    int chunk;
    int tool_memory;           /* --tool-memory N    1024 remembered tool-call blocks (13.6) */
    int sessions;              /* --sessions N       kept in memory; 0 = sized at start (13.10) */
    int checkpoint_every;      /* --checkpoint-every K  2048 (13.10); 0 = at prompt ends only */
    bool no_exact_replay;      /* --no-exact-replay  render tool calls canonically */
    struct spec_options spec;  /* --mtp-draft, --mtp-gate: speculative decoding (chapter 9) */
    /* --kv-disk-*: sessions on disk (chapter 12), parsed with the CLI's flags */
    struct kv_store_options kv;
};

#define SERVER_SEND_TIMEOUT_S 30       /* a client that reads nothing for this long is dropped */
#define SERVER_KEEPALIVE_S 5.0         /* ": prefill" comment interval during a long prefill */
#define SERVER_PROGRESS_MIN_TOKENS 512 /* prefills at least this long report progress on stderr */
#define SERVER_MAX_STOPS 16            /* stop strings per request */
#define SERVER_MAX_STOP_LEN 256        /* bytes per stop string */
#define SERVER_JSON_DEPTH 64           /* nesting allowed in a request body */
#define SERVER_TOP_K_CAP 1024
#define SERVER_MAX_TOP_LOGPROBS 20     /* OpenAI's limit for top_logprobs */

/* The default context. Claude Code's first request is a ~40k-token prompt
 * (system text and tool schemas) with max_tokens 32000, and the
 * conversation grows from there; 128K holds that with room for a long
 * session. It is a limit, not a reservation: a session's memory grows with
 * the tokens it holds (6.2), so a small conversation costs what it is. */
#define SERVER_DEFAULT_CTX 131072

static void server_options_default(struct server_options *o) {
    memset(o, 0, sizeof *o);
    o->host = "127.0.0.1";
    o->port = 8000;
    o->model_name = "deepseek-v4-flash";
    o->max_body = 8u << 20;
    o->max_header = 64 << 10;
    o->header_timeout_ms = 10000;
    o->body_timeout_ms = 60000;
    o->max_tokens_cap = 32768;
    o->max_conns = 64;
    o->max_conns_per_client = 32;
    o->max_parse_mem = 64u << 20;
    o->max_parses = 4;
    o->keepalive_ms = 5000;
    o->keepalive_requests = 100;
    o->ctx = SERVER_DEFAULT_CTX;
    o->chunk = 128;
    o->tool_memory = 1024;
    o->checkpoint_every = 2048;
}

static const char SERVER_USAGE[] =
    "server (ds4 --server):\n"
    "      --host ADDR        bind address (default 127.0.0.1)\n"
    "      --port N           TCP port (default 8000; 0 = any free port)\n"
    "      --api-key KEY      require 'Authorization: Bearer KEY' or 'x-api-key: KEY'\n"
    "      --cors ORIGIN      allow browser requests from ORIGIN ('*' for any)\n"
    "      --allow-host LIST  also accept these Host names (comma-separated; '*' any)\n"
    "      --log FILE         append one line per request with timings\n"
    "      --model-name NAME  model id to report (default deepseek-v4-flash)\n"
    "      --ctx N            context: prompt plus reply tokens (default 131072)\n"
    "      --max-body BYTES   largest request body (default 8388608)\n"
    "      --max-header BYTES largest request head (default 65536)\n"
    "      --header-timeout S seconds to send the request head (default 10)\n"
    "      --body-timeout S   seconds to send the request body (default 60)\n"
    "      --max-tokens-cap N most tokens one reply may have (default 32768)\n"
    "      --max-conns N      most open connections (default 64)\n"
    "      --max-conns-per-client N  most from one address (default 32)\n"
    "      --max-parse-mem BYTES     memory one request's JSON may take (default 67108864)\n"
    "      --max-parses N     request trees alive at once, a pool of N x max-parse-mem (default "
    "4)\n"
    "      --keepalive-timeout S     idle seconds kept between requests (default 5; 0 = close)\n"
    "      --keepalive-requests N    requests per connection (default 100)\n"
    "      --tool-memory N    tool-call blocks kept for exact replay (default 1024)\n"
    "      --sessions N       conversations kept in memory (default: as many as fit in half\n"
    "                         the available memory at full --ctx, 1..4)\n"
    "      --checkpoint-every K  rewind points every K prompt tokens (default 2048; 0 = only\n"
    "                         at the end of each prompt)\n"
    "      --no-exact-replay  always render tool calls canonically\n"
    "      --test-script FILE TESTS ONLY: forced replies instead of sampling\n"
    "      --port-file FILE   write the bound port to FILE once listening\n";

/* Parse one server flag at argv[*i]. Returns 1 if it was a server flag (and
 * advances *i past its value), 0 if it is not ours, -1 on a bad value. The
 * CLI calls this for every argument it does not know itself. */
static int server_parse_option(struct server_options *o, int argc, char **argv, int *i,
                               struct ds4_error *e) {
    const char *a = argv[*i], *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    struct { const char *name; const char **dst;
    } strs[] = {
        {"--host", &o->host},
        {"--api-key", &o->api_key},
        {"--cors", &o->cors_origin},
        {"--log", &o->log_path},
        {"--model-name", &o->model_name},
        {"--allow-host", &o->allow_hosts},
        {"--test-script", &o->test_script},
        {"--port-file", &o->port_file},
    };
    struct { const char *name; long lo, hi, scale; int *dst; } ints[] = {
        {"--port", 0, 65535, 1, &o->port}, {"--max-header", 1024, 1 << 24, 1, &o->max_header},
        {"--header-timeout", 1, 3600, 1000, &o->header_timeout_ms},
        {"--body-timeout", 1, 3600, 1000, &o->body_timeout_ms},
        {"--max-tokens-cap", 1, 1 << 24, 1, &o->max_tokens_cap},
        {"--max-conns", 1, 4096, 1, &o->max_conns}, {"--ctx", 16, 1 << 24, 1, &o->ctx},
        {"--tool-memory", 0, 1 << 20, 1, &o->tool_memory},
        {"--max-conns-per-client", 1, 4096, 1, &o->max_conns_per_client},
        {"--max-parses", 1, 1024, 1, &o->max_parses},
        {"--keepalive-timeout", 0, 3600, 1000, &o->keepalive_ms},
        {"--keepalive-requests", 1, 1 << 20, 1, &o->keepalive_requests},
        {"--sessions", 1, 64, 1, &o->sessions},
        {"--checkpoint-every", 0, 1 << 24, 1, &o->checkpoint_every},
    };
    if (strcmp(a, "--no-exact-replay") == 0) {
        o->no_exact_replay = true;
        return 1;
    }
    for (size_t k = 0; k < sizeof strs / sizeof strs[0]; k++) {
        if (strcmp(a, strs[k].name) != 0) continue;
        if (!v) {
            fail(e, "%s needs a value", a);
            return -1;
        }
        if (strs[k].dst == &o->api_key && v[0] == '\0') {
            fail(e,
                 "--api-key is empty: it would lock every client out; give a key or drop the flag");
            return -1;
        }
        *strs[k].dst = v;
        (*i)++;
        return 1;
    }
    for (size_t k = 0; k < sizeof ints / sizeof ints[0]; k++) {
        long n;
        if (strcmp(a, ints[k].name) != 0) continue;
        if (!v || !parse_long(v, ints[k].lo, ints[k].hi, &n)) {
            fail(e, "%s needs an integer in %ld..%ld", a, ints[k].lo, ints[k].hi);
            return -1;
        }
        *ints[k].dst = (int)(n * ints[k].scale);
        (*i)++;
        return 1;
    }
    bool body = strcmp(a, "--max-body") == 0, parse = strcmp(a, "--max-parse-mem") == 0;
    if (body || parse) {
        long n, lo = body ? 1024 : 1L << 20, hi = body ? 1L << 30 : 1L << 34;
        if (!v || !parse_long(v, lo, hi, &n)) {
            fail(e, "%s needs a byte count in %ld..%ld", a, lo, hi);
            return -1;
        }
        *(body ? &o->max_body : &o->max_parse_mem) = (size_t)n;
        (*i)++;
        return 1;
    }
    return 0;
}

/* ---- 13.2 Bytes on the wire: reading a request under limits ---------------- */

/* An HTTP/1.1 request [RFC9112] is a head and an optional body:
 *
 *     POST /v1/messages?beta=true HTTP/1.1\r\n      request line
 *     Host: 127.0.0.1:8000\r\n                      header fields ...
 *     Content-Length: 123\r\n
 *     \r\n                                          end of the head
 *     {"model": ...}                                exactly 123 body bytes
 *
 * Everything a client sends is hostile until checked. Three limits bound
 * what one connection can cost, and each has its own answer:
 *
 *     head larger than --max-header              431, before reading more
 *     head not complete within --header-timeout  408 (a "slowloris" client
 *                                                 trickling bytes gets this)
 *     Content-Length above --max-body            413, the body is not read
 *     chunked body growing past --max-body       413, reading stops there
 *     body not complete within --body-timeout    408
 *     connection closed before the whole body    400 "truncated body"
 *
 * The deadlines are absolute (now + timeout at the start), not per read: a
 * client sending one byte a second would otherwise never time out.
 *
 * KEEP-ALIVE [RFC 9112 §9.3]. An HTTP/1.1 connection carries requests one
 * after another until either side says `Connection: close`. Between two
 * requests the connection is idle; it may stay so for --keepalive-timeout,
 * and serve at most --keepalive-requests. Bytes that arrive after one
 * request's body (a pipelining client) are the start of the next request:
 * they are carried over (`struct strbuf *carry` below), never dropped.
 * After an answer that leaves the stream in an unknown state (the body was
 * refused unread, a timeout, a malformed head) the server closes.
 *
 * STRICT FRAMING. Two parsers that disagree about where a body ends are how
 * "request smuggling" works, so the framing headers are read strictly:
 * Content-Length is 1*DIGIT and nothing else (no sign, no list, no blanks
 * inside); two different values, or Content-Length together with
 * Transfer-Encoding, are refused; the only transfer coding is "chunked". */

struct http_request {
    char method[16];
    char path[2048];            /* the target without its query string */
    int minor;                  /* HTTP/1.minor */
    char *authorization, *api_key;  /* heap copies of any length, or NULL */
    char origin[256], host[256], content_type[128];
    size_t content_length;
    bool has_length, has_host, chunked, bad_coding, expect_continue;
    bool conn_close, conn_keep_alive;   /* tokens of the Connection header */
    char *buf;                  /* head, then the first body bytes read with it */
    size_t buf_len, head_len;
    size_t consumed;            /* bytes of buf this request used; the rest is the next one's */
    char *body;                 /* [body_len] + NUL, or NULL */
    size_t body_len;
};

/* Wait for fd to become readable before the deadline (now_seconds() time).
 * Returns 1 readable (or closed), 0 timed out, -1 error. */
static int srv_wait_readable(int fd, double deadline) {
    for (;;) {
        double left = deadline - now_seconds();
        if (left <= 0) return 0;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, (int)(left * 1000) + 1);
        if (r > 0) return 1;
        if (r == 0) continue;              /* loop re-checks the clock */
        if (errno != EINTR) return -1;
    }
}

/* Read what is there (at most cap bytes). Returns the count, 0 at end of
 * stream, -1 on error, -2 when the deadline passed first. */
static ssize_t srv_recv(int fd, char *buf, size_t cap, double deadline) {
    int w = srv_wait_readable(fd, deadline);
    if (w == 0) return -2;
    if (w < 0) return -1;
    for (;;) {
        ssize_t n = recv(fd, buf, cap, 0);
        if (n >= 0 || errno != EINTR) return n < 0 ? -1 : n;
    }
}

/* Write all of data, or report failure (the peer left, or it stopped
 * reading for SERVER_SEND_TIMEOUT_S). MSG_NOSIGNAL: a closed peer gives
 * EPIPE, not a SIGPIPE that would end the process. */
static bool srv_send_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        data += n;
        len -= (size_t)n;
    }
    return true;
}

/* HALF-CLOSE. A client may shut down its sending side once the request is
 * out (`shutdown(SHUT_WR)`, `nc -N`, some proxies): the server then reads
 * end-of-stream, yet the client still reads the reply [RFC 9112 §9.6]. A
 * client that closed its socket altogether looks the same from here, until
 * something is written to it: its kernel answers with a reset, and from then
 * on poll() reports POLLHUP/POLLERR. So end-of-stream alone never means
 * "gone"; the caller writes something harmless to find out (13.8: a 1xx
 * interim response, which HTTP/1.1 clients must skip, or an SSE comment).
 *
 * srv_peer_state() answers without consuming anything: */
enum peer_state { PEER_THERE, PEER_EOF, PEER_GONE };

static enum peer_state srv_peer_state(int fd) {
    char c;
    struct pollfd p = {.fd = fd, .events = 0};
    if (poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLERR)) != 0) return PEER_GONE;
    ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return PEER_EOF;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return PEER_GONE;
    return PEER_THERE;
}

/* The end of the head: the offset just past "\r\n\r\n", or 0 if not there. */
static size_t http_head_end(const char *buf, size_t len) {
    for (size_t i = 3; i < len; i++)
        if (buf[i] == '\n' && buf[i - 1] == '\r' && buf[i - 2] == '\n' && buf[i - 3] == '\r')
            return i + 1;
    return 0;
}

/* Read until the head is complete. `carry` holds bytes of this request that
 * came with the previous one; it is emptied. Returns 0, or the HTTP status
 * to answer with (-1: the client sent nothing at all; close without an
 * answer). */
static int http_read_head(int fd, struct http_request *r, struct strbuf *carry,
                          const struct server_options *o, char *err, size_t errlen) {
    double deadline = now_seconds() + o->header_timeout_ms / 1000.0;
    size_t cap = (size_t)o->max_header + 4096;
    r->buf = xmalloc(cap + 1);
    if (carry && carry->len > 0) {
        r->buf_len = carry->len < cap ? carry->len : cap;
        memcpy(r->buf, carry->data, r->buf_len);
        carry->len = 0;
    }
    while ((r->head_len = http_head_end(r->buf, r->buf_len)) == 0) {
        if (r->buf_len >= (size_t)o->max_header) {
            snprintf(err, errlen, "request head larger than %d bytes", o->max_header);
            return 431;
        }
        ssize_t n = srv_recv(fd, r->buf + r->buf_len, cap - r->buf_len, deadline);
        if (n == -2) {
            snprintf(err, errlen, "request head not received within %d s",
                     o->header_timeout_ms / 1000);
            return 408;
        }
        if (n <= 0) {
            snprintf(err, errlen, "connection closed in the middle of the request head");
            return r->buf_len == 0 ? -1 : 400;
        }
        r->buf_len += (size_t)n;
    }
    if (r->head_len > (size_t)o->max_header) {
        snprintf(err, errlen, "request head larger than %d bytes", o->max_header);
        return 431;
    }
    r->consumed = r->head_len;
    return 0;
}

/* Header names are case-insensitive [RFC9110 §5.1]. */
static bool http_name_is(const char *line, size_t name_len, const char *name) {
    return strlen(name) == name_len && strncasecmp(line, name, name_len) == 0;
}

/* A header value without its surrounding blanks: *v and *n are narrowed. */
static void http_trim(const char **v, size_t *n) {
    while (*n > 0 && (**v == ' ' || **v == '\t')) (*v)++, (*n)--;
    while (*n > 0 && ((*v)[*n - 1] == ' ' || (*v)[*n - 1] == '\t')) (*n)--;
}

/* Copy a trimmed header value into dst (truncated to fit: used only for
 * values compared with short names, which a truncated one never equals). */
static void http_copy_value(char *dst, size_t cap, const char *v, size_t n) {
    http_trim(&v, &n);
    if (n >= cap) n = cap - 1;
    memcpy(dst, v, n);
    dst[n] = '\0';
}

/* A trimmed header value on the heap, whole: API keys of any length (up to
 * --max-header) must compare equal, so they are never cut. */
static char *http_dup_value(const char *v, size_t n) {
    http_trim(&v, &n);
    char *d = xmalloc(n + 1);
    memcpy(d, v, n);
    d[n] = '\0';
    return d;
}

/* The request line: METHOD SP TARGET SP HTTP/1.x */
static bool http_parse_request_line(struct http_request *r, const char *line, size_t n) {
    const char *sp1 = memchr(line, ' ', n);
    if (!sp1 || sp1 == line || (size_t)(sp1 - line) >= sizeof r->method) return false;
    const char *target = sp1 + 1;
    const char *sp2 = memchr(target, ' ', n - (size_t)(target - line));
    if (!sp2 || sp2 == target || *target != '/') return false;
    size_t rest = n - (size_t)(sp2 + 1 - line);
    if (rest != 8 || strncmp(sp2 + 1, "HTTP/1.", 7) != 0) return false;
    if (sp2[8] != '0' && sp2[8] != '1') return false;
    r->minor = sp2[8] - '0';
    memcpy(r->method, line, (size_t)(sp1 - line));
    r->method[sp1 - line] = '\0';
    size_t path_len = (size_t)(sp2 - target);
    const char *q = memchr(target, '?', path_len);
    if (q) path_len = (size_t)(q - target);
    if (path_len >= sizeof r->path) return false;
    memcpy(r->path, target, path_len);
    r->path[path_len] = '\0';
    return true;
}

/* Content-Length = 1*DIGIT [RFC 9110 §8.6], at most 18 digits. */
static bool http_parse_length(const char *v, size_t n, size_t *out) {
    http_trim(&v, &n);
    if (n == 0 || n > 18) return false;
    unsigned long long len = 0;
    for (size_t i = 0; i < n; i++) {
        if (v[i] < '0' || v[i] > '9') return false;
        len = len * 10 + (unsigned long long)(v[i] - '0');
    }
    *out = len > SIZE_MAX ? SIZE_MAX : (size_t)len;
    return true;
}

/* The comma-separated tokens of a Connection header. */
static void http_parse_connection(struct http_request *r, const char *v, size_t n) {
    while (n > 0) {
        const char *comma = memchr(v, ',', n);
        size_t k = comma ? (size_t)(comma - v) : n;
        const char *t = v;
        size_t tn = k;
        http_trim(&t, &tn);
        if (tn == 5 && strncasecmp(t, "close", 5) == 0) r->conn_close = true;
        if (tn == 10 && strncasecmp(t, "keep-alive", 10) == 0) r->conn_keep_alive = true;
        v += k + (comma ? 1 : 0);
        n -= k + (comma ? 1 : 0);
    }
}

/* The framing fields: Content-Length and Transfer-Encoding. */
static bool http_parse_framing(struct http_request *r, bool is_length, const char *v, size_t vn) {
    if (is_length) {
        size_t len;
        if (!http_parse_length(v, vn, &len)) return false;
        if (r->has_length && r->content_length != len) return false;   /* conflicting lengths */
        r->content_length = len;
        r->has_length = true;
        return true;
    }
    char value[64];
    http_copy_value(value, sizeof value, v, vn);
    if (r->chunked || strcasecmp(value, "chunked") != 0) r->bad_coding = true;
    r->chunked = true;
    return true;
}

/* One "Name: value" line; only the fields the server acts on are kept. */
static bool http_parse_field(struct http_request *r, const char *line, size_t n) {
    const char *colon = memchr(line, ':', n);
    if (!colon || colon == line) return false;
    size_t name_len = (size_t)(colon - line);
    /* RFC 9112 §10.1 */
    if (line[name_len - 1] == ' ' || line[name_len - 1] == '\t') return false;
    const char *v = colon + 1;
    size_t vn = n - name_len - 1;
    char value[64];
    if (http_name_is(line, name_len, "content-length")) {
        return http_parse_framing(r, true, v, vn);
    } else if (http_name_is(line, name_len, "transfer-encoding")) {
        return http_parse_framing(r, false, v, vn);
    } else if (http_name_is(line, name_len, "expect")) {
        http_copy_value(value, sizeof value, v, vn);
        r->expect_continue = strcasecmp(value, "100-continue") == 0;
    } else if (http_name_is(line, name_len, "authorization")) {
        free(r->authorization);
        r->authorization = http_dup_value(v, vn);
    } else if (http_name_is(line, name_len, "x-api-key")) {
        free(r->api_key);
        r->api_key = http_dup_value(v, vn);
    } else if (http_name_is(line, name_len, "origin")) {
        http_copy_value(r->origin, sizeof r->origin, v, vn);
    } else if (http_name_is(line, name_len, "host")) {
        if (r->has_host) return false;                  /* two Host fields: RFC 9112 §3.2 */
        http_copy_value(r->host, sizeof r->host, v, vn);
        r->has_host = true;
    } else if (http_name_is(line, name_len, "content-type")) {
        http_copy_value(r->content_type, sizeof r->content_type, v, vn);
    } else if (http_name_is(line, name_len, "connection")) {
        http_parse_connection(r, v, vn);
    }
    return true;
}

/* Split the head into lines and parse them. Returns 0 or 400. */
static int http_parse_head(struct http_request *r, char *err, size_t errlen) {
    const char *p = r->buf, *end = r->buf + r->head_len - 2;     /* before the final CRLF */
    bool first = true;
    while (p < end) {
        const char *eol = memchr(p, '\r', (size_t)(end - p));
        if (!eol || eol + 1 >= r->buf + r->head_len || eol[1] != '\n') break;
        size_t n = (size_t)(eol - p);
        if (memchr(p, '\0', n) || memchr(p, '\n', n)) break;       /* bare LF or NUL: refuse */
        bool ok = first ? http_parse_request_line(r, p, n) : http_parse_field(r, p, n);
        if (!ok) {
            snprintf(err, errlen, first ? "malformed request line" : "malformed header field");
            return 400;
        }
        first = false;
        p = eol + 2;
    }
    if (first || p != end) {
        snprintf(err, errlen, "malformed request head");
        return 400;
    }
    if (r->chunked && r->has_length) {
        snprintf(err, errlen, "Content-Length together with Transfer-Encoding is refused");
        return 400;
    }
    if (r->minor == 1 && !r->has_host) {
        snprintf(err, errlen, "an HTTP/1.1 request needs a Host header");
        return 400;
    }
    return 0;
}

/* May the connection carry another request after this one? */
static bool http_wants_keep_alive(const struct http_request *r) {
    return r->minor == 1 ? !r->conn_close : r->conn_keep_alive && !r->conn_close;
}

/* ---- 13.2.1 Chunked request bodies -------------------------------------------- */

/* Transfer-Encoding: chunked [RFC 9112 §7.1] sends a body of unknown length
 * as pieces, each announced by its size in hex:
 *
 *     1a;ext=1\r\n  <26 bytes>\r\n     a chunk (extensions are ignored)
 *     0\r\n                            the last chunk
 *     Trailer: x\r\n                   optional trailer fields (ignored)
 *     \r\n                             the end
 *
 * The decoder is a byte-at-a-time state machine fed whatever arrived, so a
 * body split anywhere (the fuzz test splits it everywhere) decodes the same.
 * It bounds the decoded size (max), each chunk-size line and the trailer
 * (HTTP_CHUNK_LINE_MAX bytes a line). */
#define HTTP_CHUNK_LINE_MAX 4096

enum chunk_state { CH_SIZE, CH_EXT, CH_SIZE_LF, CH_DATA, CH_DATA_CR, CH_DATA_LF,
                   CH_TRAILER, CH_TRAILER_TEXT, CH_TRAILER_LF, CH_END_LF, CH_DONE };

struct chunk_decoder {
    enum chunk_state state;
    size_t size, digits, line;  /* the chunk being read; bytes in the current line */
    size_t max;                 /* decoded bytes allowed */
    struct strbuf out;          /* the decoded body */
};

enum chunk_result { CHUNK_MORE, CHUNK_DONE, CHUNK_BAD, CHUNK_TOO_LARGE };

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* One byte of a size line (CH_SIZE / CH_EXT / CH_SIZE_LF). */
static enum chunk_result chunk_size_byte(struct chunk_decoder *d, char c) {
    if (++d->line > HTTP_CHUNK_LINE_MAX) return CHUNK_BAD;
    if (d->state == CH_SIZE_LF) {
        if (c != '\n') return CHUNK_BAD;
        d->line = 0;
        d->state = d->size == 0 ? CH_TRAILER : CH_DATA;
        if (d->size > d->max - d->out.len) return CHUNK_TOO_LARGE;
        return CHUNK_MORE;
    }
    if (c == '\r' && d->digits > 0) d->state = CH_SIZE_LF;
    else if (d->state == CH_EXT) return c == '\n' || c == '\0' ? CHUNK_BAD : CHUNK_MORE;
    else if (c == ';' && d->digits > 0) d->state = CH_EXT;
    else if (hex_digit(c) < 0 || ++d->digits > 15) return CHUNK_BAD;
    else d->size = d->size * 16 + (size_t)hex_digit(c);
    return CHUNK_MORE;
}

/* One byte after the last chunk: trailer lines, then the empty line. */
static enum chunk_result chunk_trailer_byte(struct chunk_decoder *d, char c) {
    if (++d->line > HTTP_CHUNK_LINE_MAX) return CHUNK_BAD;
    switch (d->state) {
    case CH_TRAILER: d->state = c == '\r' ? CH_END_LF : CH_TRAILER_TEXT; return CHUNK_MORE;
    case CH_TRAILER_TEXT:
        if (c == '\r') d->state = CH_TRAILER_LF;
        return c == '\n' || c == '\0' ? CHUNK_BAD : CHUNK_MORE;
    case CH_TRAILER_LF:
        d->line = 0;
        d->state = CH_TRAILER;
        return c == '\n' ? CHUNK_MORE : CHUNK_BAD;
    default:                                           /* CH_END_LF */
        d->state = CH_DONE;
        return c == '\n' ? CHUNK_DONE : CHUNK_BAD;
    }
}

/* Feed in[0..n). *used says how many bytes belonged to the body (on
 * CHUNK_DONE the rest is the next request's). */
static enum chunk_result chunk_feed(struct chunk_decoder *d, const char *in, size_t n,
                                    size_t *used) {
    size_t i = 0;
    enum chunk_result r = CHUNK_MORE;
    while (i < n && r == CHUNK_MORE) {
        if (d->state == CH_DATA) {
            size_t k = n - i < d->size ? n - i : d->size;
            strbuf_append(&d->out, in + i, k);
            if (d->out.oom) return CHUNK_TOO_LARGE;
            d->size -= k;
            i += k;
            if (d->size == 0) d->state = CH_DATA_CR;
            continue;
        }
        char c = in[i++];
        if (d->state == CH_DATA_CR) r = c == '\r' ? (d->state = CH_DATA_LF, CHUNK_MORE) : CHUNK_BAD;
        else if (d->state == CH_DATA_LF)
            r = c == '\n' ? (d->state = CH_SIZE, d->digits = 0, CHUNK_MORE) : CHUNK_BAD;
        else if (d->state <= CH_SIZE_LF) r = chunk_size_byte(d, c);
        else r = chunk_trailer_byte(d, c);
    }
    *used = i;
    return r;
}

/* Read a chunked body: first what came with the head, then from the socket. */
static int http_read_chunked(int fd, struct http_request *r, struct strbuf *carry,
                             const struct server_options *o, char *err, size_t errlen) {
    struct chunk_decoder d = {.max = o->max_body};
    double deadline = now_seconds() + o->body_timeout_ms / 1000.0;
    char chunk[16384];
    const char *in = r->buf + r->head_len;
    size_t n = r->buf_len - r->head_len, used = 0;
    enum chunk_result res = chunk_feed(&d, in, n, &used);
    r->consumed = r->head_len + used;
    while (res == CHUNK_MORE) {
        ssize_t got = srv_recv(fd, chunk, sizeof chunk, deadline);
        if (got == -2 || got <= 0) {
            snprintf(err, errlen,
                     got == -2 ? "request body not received within %d s"
                               : "truncated chunked body (%d s limit)",
                     o->body_timeout_ms / 1000);
            strbuf_free(&d.out);
            return got == -2 ? 408 : 400;
        }
        in = chunk;
        n = (size_t)got;
        res = chunk_feed(&d, in, n, &used);
    }
    if (res == CHUNK_DONE && carry && used < n && in == chunk)
        strbuf_append(carry, in + used, n - used);
    if (res != CHUNK_DONE) {
        strbuf_free(&d.out);
        if (res == CHUNK_TOO_LARGE)
            snprintf(err, errlen, "chunked request body is larger than the limit of %zu",
                     o->max_body);
        else snprintf(err, errlen, "malformed chunked request body");
        return res == CHUNK_TOO_LARGE ? 413 : 400;
    }
    r->body_len = d.out.len;
    r->body = d.out.data ? d.out.data : xcalloc(1, 1);
    return 0;
}

/* Read the body announced by Content-Length, or a chunked one. The head's
 * read may already hold its first bytes. Returns 0 or the HTTP status to
 * answer with. */
static int http_read_body(int fd, struct http_request *r, struct strbuf *carry,
                          const struct server_options *o, char *err, size_t errlen) {
    if (r->bad_coding) {
        snprintf(err, errlen, "the only transfer coding accepted is 'chunked'");
        return 501;
    }
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    if (!r->chunked && !r->has_length) {
        snprintf(err, errlen, "a request body with Content-Length (or chunked) is required");
        return 411;
    }
    if (r->has_length && r->content_length > o->max_body) {
        snprintf(err, errlen, "request body of %zu bytes is larger than the limit of %zu",
                 r->content_length, o->max_body);
        return 413;
    }
    if (r->expect_continue && !srv_send_all(fd, cont, sizeof cont - 1)) return -1;
    if (r->chunked) return http_read_chunked(fd, r, carry, o, err, errlen);
    size_t have = r->buf_len - r->head_len;
    if (have > r->content_length) have = r->content_length;   /* the rest is a pipelined request */
    r->consumed = r->head_len + have;
    r->body = xmalloc(r->content_length + 1);
    memcpy(r->body, r->buf + r->head_len, have);
    double deadline = now_seconds() + o->body_timeout_ms / 1000.0;
    while (have < r->content_length) {
        ssize_t n = srv_recv(fd, r->body + have, r->content_length - have, deadline);
        if (n == -2) {
            snprintf(err, errlen, "request body not received within %d s",
                     o->body_timeout_ms / 1000);
            return 408;
        }
        if (n <= 0) {
            snprintf(err, errlen, "truncated body: got %zu of %zu bytes", have, r->content_length);
            return 400;
        }
        have += (size_t)n;
    }
    r->body[have] = '\0';
    r->body_len = have;
    return 0;
}

/* Keep what follows this request in buf (the next one's first bytes). */
static void http_request_carry(const struct http_request *r, struct strbuf *carry) {
    if (r->buf && r->consumed < r->buf_len)
        strbuf_append(carry, r->buf + r->consumed, r->buf_len - r->consumed);
}

static void http_request_free(struct http_request *r) {
    free(r->buf);
    free(r->body);
    free(r->authorization);
    free(r->api_key);
    memset(r, 0, sizeof *r);
}

/* ---- 13.3 Writing responses: status lines, CORS, the API's error shapes ---- */

/* Which dialect a request speaks decides the shape of its errors. */
enum api_kind { API_CHAT, API_COMPLETIONS, API_MESSAGES, API_RESPONSES, API_NONE };

struct server;                  /* 12.8; a connection only carries a pointer */

/* One accepted connection, owned by its client thread. The worker writes to
 * `fd` while it serves this connection's job; nobody else does then. */
enum conn_phase { PHASE_READING, PHASE_IDLE, PHASE_BUSY };

struct conn {
    int fd;
    struct server *srv;
    const struct server_options *opt;
    char origin[256];           /* the request's Origin header, for CORS */
    enum api_kind api;          /* error shape */
    int status;                 /* status sent, for the log */
    bool gone;                  /* a write failed: the client left */
    bool keep_alive;            /* this answer says keep-alive (13.2) */
    int requests_left;          /* --keepalive-requests minus those served */
    bool head_only;             /* HEAD: headers as for GET, no body */
    bool stream_open;           /* the stream's head went out (maybe while queued, 13.8) */
    bool probed;                /* end-of-stream seen, a 1xx sent to tell half-close from gone */

    /* The accept loop's view, under server.lock (13.12). */
    enum conn_phase phase;
    double phase_since;
    char peer[64];              /* the client's address, for --max-conns-per-client */
    bool evicted;               /* its slot was given to a newer connection */
    struct conn *prev, *next;
};

static const char *http_reason(int status) {
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    default:  return "Error";
    }
}

/* CORS [Fetch standard]: only with --cors, and then only for that origin
 * (or any origin if the operator wrote "*"). A browser page from elsewhere
 * gets no Access-Control-Allow-Origin and cannot read the answers. */
static void http_cors_headers(const struct conn *c, struct strbuf *h) {
    const char *allowed = c->opt->cors_origin;
    if (!allowed) return;
    if (strcmp(allowed, "*") == 0) {
        strbuf_puts(h, "Access-Control-Allow-Origin: *\r\n");
    } else if (c->origin[0] && strcmp(c->origin, allowed) == 0) {
        strbuf_printf(h, "Access-Control-Allow-Origin: %s\r\nVary: Origin\r\n", allowed);
    } else {
        return;
    }
    strbuf_puts(h,
                "Access-Control-Allow-Methods: GET, POST, OPTIONS\r\n"
                "Access-Control-Allow-Headers: authorization, content-type, x-api-key, "
                "anthropic-version, anthropic-beta, openai-beta, x-stainless-os, x-stainless-lang, "
                "x-stainless-package-version, x-stainless-runtime, x-stainless-runtime-version, "
                "x-stainless-arch, x-stainless-retry-count, x-stainless-timeout\r\n"
                "Access-Control-Max-Age: 600\r\n");
}

/* The status line and the headers every answer has. `Connection` says
 * whether this connection takes another request (13.2 KEEP-ALIVE); a 503
 * says when to come back. */
static void http_status_line(const struct conn *c, struct strbuf *h, int status) {
    strbuf_printf(h, "HTTP/1.1 %d %s\r\nServer: ds4\r\n", status, http_reason(status));
    if (c->keep_alive)
        strbuf_printf(h, "Connection: keep-alive\r\nKeep-Alive: timeout=%d, max=%d\r\n",
                      c->opt->keepalive_ms / 1000, c->requests_left);
    else strbuf_puts(h, "Connection: close\r\n");
    if (status == 503) strbuf_puts(h, "Retry-After: 1\r\n");
    http_cors_headers(c, h);
}

static void conn_send(struct conn *c, const char *data, size_t len) {
    if (!c->gone && !srv_send_all(c->fd, data, len)) c->gone = true;
}

/* A whole response with a Content-Length. `extra` is more header lines. */
static void http_respond(struct conn *c, int status, const char *type, const char *body, size_t len,
                         const char *extra) {
    struct strbuf h = {0};
    http_status_line(c, &h, status);
    if (extra) strbuf_puts(&h, extra);
    if (type) strbuf_printf(&h, "Content-Type: %s\r\n", type);
    strbuf_printf(&h, "Content-Length: %zu\r\n\r\n", len);
    if (!c->head_only) strbuf_append(&h, body, len);     /* HEAD: the length, never the bytes */
    conn_send(c, h.data, h.len);
    c->status = status;
    strbuf_free(&h);
}

static void http_respond_json(struct conn *c, int status, const struct strbuf *body) {
    http_respond(c, status, "application/json", body->data ? body->data : "", body->len, NULL);
}

/* The error "type" each dialect uses for a status. */
static const char *api_error_type(enum api_kind api, int status) {
    bool anthropic = api == API_MESSAGES;
    switch (status) {
    case 401: return "authentication_error";
    case 404: return "not_found_error";
    case 408: return anthropic ? "timeout_error" : "invalid_request_error";
    case 413: return anthropic ? "request_too_large" : "invalid_request_error";
    case 503: return anthropic ? "overloaded_error" : "server_error";
    default:
        return status >= 500 ? (anthropic ? "api_error" : "server_error") : "invalid_request_error";
    }
}

/* The error object of a dialect, without status line:
 *
 *     OpenAI     {"error":{"message":M,"type":T,"param":P,"code":C, EXTRA}}
 *     Anthropic  {"type":"error","error":{"type":T,"message":M, EXTRA}}
 *
 * `extra` is more members (",\"n_ctx\":...") or NULL. */
static void api_error_json(struct strbuf *b, enum api_kind api, int status, const char *msg,
                           const char *param, const char *code, const char *extra) {
    const char *type = api_error_type(api, status);
    if (api == API_MESSAGES) {
        strbuf_printf(b, "{\"type\":\"error\",\"error\":{\"type\":\"%s\",\"message\":", type);
        json_write_string(b, msg, strlen(msg));
    } else {
        strbuf_puts(b, "{\"error\":{\"message\":");
        json_write_string(b, msg, strlen(msg));
        strbuf_printf(b, ",\"type\":\"%s\",\"param\":", type);
        if (param) json_write_string(b, param, strlen(param));
        else strbuf_puts(b, "null");
        strbuf_puts(b, ",\"code\":");
        if (code) json_write_string(b, code, strlen(code));
        else strbuf_puts(b, "null");
    }
    if (extra) strbuf_puts(b, extra);
    strbuf_puts(b, "}}");
}

static void http_error_full(struct conn *c, int status, const char *msg, const char *param,
                            const char *code, const char *extra) {
    struct strbuf b = {0};
    api_error_json(&b, c->api, status, msg, param, code, extra);
    http_respond(c, status, "application/json", b.data, b.len,
                 status == 405 ? "Allow: GET, POST, OPTIONS\r\n" : NULL);
    strbuf_free(&b);
}

static void http_error(struct conn *c, int status, const char *msg) {
    http_error_full(c, status, msg, NULL, NULL, NULL);
}

/* An error that leaves the request stream in an unknown state (the body
 * unread, a timeout, a malformed head): answer, then close. */
static void http_error_close(struct conn *c, int status, const char *msg) {
    c->keep_alive = false;
    http_error(c, status, msg);
}

/* Streams: Server-Sent Events [HTML §9.2] in HTTP/1.1 chunked framing
 * [RFC9112 §7.1], so the client can tell a finished stream ("0\r\n\r\n")
 * from one cut off by a crash. */
static void http_stream_begin(struct conn *c) {
    if (c->stream_open) return;                 /* sent already, while the job was queued */
    c->stream_open = true;
    struct strbuf h = {0};
    http_status_line(c, &h, 200);
    strbuf_puts(&h, "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                    "X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n\r\n");
    conn_send(c, h.data, h.len);
    c->status = 200;
    strbuf_free(&h);
}

static void http_chunk(struct conn *c, const char *data, size_t len) {
    char size[24];
    if (len == 0) return;               /* a zero-size chunk would end the stream */
    int n = snprintf(size, sizeof size, "%zx\r\n", len);
    struct strbuf b = {0};
    strbuf_append(&b, size, (size_t)n);
    strbuf_append(&b, data, len);
    strbuf_append(&b, "\r\n", 2);
    conn_send(c, b.data, b.len);
    strbuf_free(&b);
}

static void http_stream_end(struct conn *c) {
    conn_send(c, "0\r\n\r\n", 5);
}

/* One SSE event: an optional "event:" line, then "data: JSON". */
static void sse_send(struct conn *c, const char *event, const struct strbuf *json) {
    struct strbuf b = {0};
    if (event) strbuf_printf(&b, "event: %s\n", event);
    strbuf_puts(&b, "data: ");
    strbuf_append(&b, json->data ? json->data : "", json->len);
    strbuf_puts(&b, "\n\n");
    http_chunk(c, b.data, b.len);
    strbuf_free(&b);
}

/* ---- 13.4 Request fields: typed reads, sampling, thinking, limits ---------- */

enum tool_choice { CHOICE_AUTO, CHOICE_NONE, CHOICE_REQUIRED, CHOICE_NAMED };

/* What every generation request asks for, whatever its dialect. */
struct gen_params {
    const char *model;            /* echoed back; the server's name if absent */
    bool stream, include_usage;
    enum chat_mode mode;
    struct sampler_options sampling;
    bool seeded;
    int max_tokens;               /* 0: as many as the context allows, up to the cap */
    const char *stops[SERVER_MAX_STOPS];  /* into the request's JSON tree */
    size_t stop_lens[SERVER_MAX_STOPS];
    int n_stops;
    bool tools_on;                /* tools given and tool_choice is not "none" */
    enum tool_choice choice;      /* tool_choice, in any dialect's spelling */
    const char *choice_name;      /* CHOICE_NAMED: the tool */
    bool serial_tools;            /* parallel_tool_calls false: at most one call */
    bool json_reply;              /* response_format json_object / json_schema */
    const struct json *json_schema;   /* json_schema: the format object, rendered in the prompt */
    float presence_penalty, frequency_penalty;
    bool logprobs;
    int top_logprobs;
};

/* Typed field reads. An absent field or a JSON null leaves *out as it was
 * (the default); a field of the wrong type or out of range is the client's
 * error, reported with the field's name, never silently ignored. */
static bool field_is_set(const struct json *v) {
    return v != NULL && v->kind != JSON_NULL;
}

static bool field_bool(const struct json *obj, const char *key, bool *out, struct ds4_error *e) {
    const struct json *v = json_get(obj, key);
    if (!field_is_set(v)) return true;
    if (v->kind != JSON_TRUE && v->kind != JSON_FALSE)
        return fail(e, "'%s' must be a boolean", key);
    *out = v->kind == JSON_TRUE;
    return true;
}

static bool field_number(const struct json *obj, const char *key, double lo, double hi, double *out,
                         struct ds4_error *e) {
    const struct json *v = json_get(obj, key);
    if (!field_is_set(v)) return true;
    if (v->kind != JSON_NUMBER || !(v->number >= lo && v->number <= hi))
        return fail(e, "'%s' must be a number in %g..%g", key, lo, hi);
    *out = v->number;
    return true;
}

static bool field_float(const struct json *obj, const char *key, double lo, double hi, float *out,
                        struct ds4_error *e) {
    double d = *out;
    if (!field_number(obj, key, lo, hi, &d, e)) return false;
    *out = (float)d;
    return true;
}

static bool field_int(const struct json *obj, const char *key, double lo, double hi, int *out,
                      struct ds4_error *e) {
    double d = *out;
    if (!field_number(obj, key, lo, hi, &d, e)) return false;
    if (d != floor(d)) return fail(e, "'%s' must be an integer", key);
    *out = (int)d;
    return true;
}

static bool field_string(const struct json *obj, const char *key, const char **out,
                         struct ds4_error *e) {
    const struct json *v = json_get(obj, key);
    if (!field_is_set(v)) return true;
    if (v->kind != JSON_STRING) return fail(e, "'%s' must be a string", key);
    *out = v->string;
    return true;
}

/* Reasoning effort names of the three dialects, mapped to the template's
 * modes [API §1.2]: "max" is Think Max, "none" turns thinking off,
 * every other level is ordinary thinking (V4 has no finer steps). */
static bool effort_mode(const char *effort, enum chat_mode *mode) {
    static const char *const thinking[] = {"xhigh", "high", "medium", "low", "minimal"};
    if (strcmp(effort, "none") == 0) {
        *mode = CHAT_MODE_CHAT;
        return true;
    }
    if (strcmp(effort, "max") == 0) {
        *mode = CHAT_MODE_THINK_MAX;
        return true;
    }
    for (size_t i = 0; i < sizeof thinking / sizeof thinking[0]; i++)
        if (strcmp(effort, thinking[i]) == 0) {
            *mode = CHAT_MODE_THINKING;
            return true;
        }
    return false;
}

static bool read_effort(const struct json *obj, const char *key, enum chat_mode *mode,
                        struct ds4_error *e) {
    const char *effort = NULL;
    if (!field_string(obj, key, &effort, e)) return false;
    if (effort && !effort_mode(effort, mode))
        return fail(e, "'%s' must be one of none, minimal, low, medium, high, xhigh, max", key);
    return true;
}

/* "thinking": true/false, or {"type": "enabled"|"adaptive"|"disabled"}. */
static bool read_thinking_switch(const struct json *req, enum chat_mode *mode,
                                 struct ds4_error *e) {
    const struct json *t = json_get(req, "thinking");
    bool on = *mode != CHAT_MODE_CHAT;
    if (json_is(t, JSON_OBJECT)) {
        const char *type = NULL;
        if (!field_string(t, "type", &type, e)) return false;
        if (type && strcmp(type, "disabled") == 0) on = false;
        else if (type && (strcmp(type, "enabled") == 0 || strcmp(type, "adaptive") == 0)) on = true;
        else return fail(e, "'thinking.type' must be enabled, adaptive or disabled");
    } else if (!field_bool(req, "thinking", &on, e)) {
        return false;
    }
    if (!field_bool(req, "think", &on, e)) return false;
    if (!on) *mode = CHAT_MODE_CHAT;
    else if (*mode == CHAT_MODE_CHAT) *mode = CHAT_MODE_THINKING;
    return true;
}

/* The mode, from weakest to strongest signal: the dialect's default, the
 * model alias (deepseek-chat answers without thinking, deepseek-reasoner
 * with), then the explicit switches and effort levels. */
static bool read_mode(const struct json *req, enum api_kind api, struct gen_params *g,
                      struct ds4_error *e) {
    g->mode = api == API_COMPLETIONS ? CHAT_MODE_CHAT : CHAT_MODE_THINKING;
    if (g->model && strcmp(g->model, "deepseek-chat") == 0) g->mode = CHAT_MODE_CHAT;
    if (g->model && strcmp(g->model, "deepseek-reasoner") == 0) g->mode = CHAT_MODE_THINKING;
    if (!read_thinking_switch(req, &g->mode, e)) return false;
    if (!read_effort(req, "reasoning_effort", &g->mode, e)) return false;
    if (api == API_MESSAGES && !read_effort(json_get(req, "output_config"), "effort", &g->mode, e))
        return false;
    if (api == API_RESPONSES && !read_effort(json_get(req, "reasoning"), "effort", &g->mode, e))
        return false;
    return true;
}

/* "stop" (OpenAI: a string or a list) or "stop_sequences" (Anthropic). */
static bool read_stops(const struct json *req, const char *key, struct gen_params *g,
                       struct ds4_error *e) {
    const struct json *v = json_get(req, key);
    if (!field_is_set(v)) return true;
    size_t n = v->kind == JSON_ARRAY ? v->count : 1;
    if (v->kind != JSON_STRING && v->kind != JSON_ARRAY)
        return fail(e, "'%s' must be a string or an array of strings", key);
    if (n > SERVER_MAX_STOPS)
        return fail(e, "'%s' may hold at most %d strings", key, SERVER_MAX_STOPS);
    for (size_t i = 0; i < n; i++) {
        const struct json *s = v->kind == JSON_ARRAY ? &v->items[i] : v;
        if (!json_is(s, JSON_STRING) || s->len == 0 || s->len > SERVER_MAX_STOP_LEN)
            return fail(e, "'%s' must hold non-empty strings of at most %d bytes", key,
                        SERVER_MAX_STOP_LEN);
        g->stops[g->n_stops] = s->string;
        g->stop_lens[g->n_stops++] = s->len;
    }
    return true;
}

/* The sampler's knobs [API §1.3]: temperature 1, top_p 1, min_p
 * 0.05, top_k off, a random seed unless one is given. top_k is capped at
 * SERVER_TOP_K_CAP: more candidates change nothing but the sort time. */
static bool read_sampling(const struct json *req, struct gen_params *g, struct ds4_error *e) {
    struct sampler_options *s = &g->sampling;
    double seed = -1;
    s->temperature = 1.0f;
    s->top_p = 1.0f;
    s->min_p = 0.05f;
    s->top_k = 0;
    if (!field_float(req, "temperature", 0, 2, &s->temperature, e)) return false;
    if (!field_float(req, "top_p", 0, 1, &s->top_p, e)) return false;
    if (!field_float(req, "min_p", 0, 1, &s->min_p, e)) return false;
    if (!field_int(req, "top_k", 0, 1e9, &s->top_k, e)) return false;
    if (!field_number(req, "seed", -9.2e18, 9.2e18, &seed, e)) return false;
    if (s->top_k > SERVER_TOP_K_CAP) s->top_k = SERVER_TOP_K_CAP;
    g->seeded = json_is(json_get(req, "seed"), JSON_NUMBER);
    if (g->seeded) s->seed = (uint64_t)(int64_t)seed;
    return true;
}

/* tool_choice in its three spellings:
 *
 *     OpenAI chat   "auto" | "none" | "required" | {"type":"function","function":{"name":N}}
 *     Responses     "auto" | "none" | "required" | {"type":"function","name":N}
 *     Anthropic     {"type":"auto"|"any"|"none"} | {"type":"tool","name":N},
 *                   each with an optional "disable_parallel_tool_use"
 *
 * "required"/"any" and a named tool are enforced while decoding (13.8.1). */
static bool read_tool_choice(const struct json *req, struct gen_params *g, struct ds4_error *e) {
    const struct json *tc = json_get(req, "tool_choice");
    const char *type = json_is(tc, JSON_STRING) ? tc->string : json_str(tc, "type");
    bool parallel = true;
    if (!field_bool(req, "parallel_tool_calls", &parallel, e)) return false;
    if (json_is(tc, JSON_OBJECT) &&
        !field_bool(tc, "disable_parallel_tool_use", &g->serial_tools, e))
        return false;
    g->serial_tools = g->serial_tools || !parallel;
    if (!field_is_set(tc)) return true;
    if (!type) return fail(e, "'tool_choice' must be a string or an object with a 'type'");
    if (strcmp(type, "auto") == 0) g->choice = CHOICE_AUTO;
    else if (strcmp(type, "none") == 0) g->choice = CHOICE_NONE;
    else if (strcmp(type, "required") == 0 || strcmp(type, "any") == 0) g->choice = CHOICE_REQUIRED;
    else if (strcmp(type, "function") == 0 || strcmp(type, "tool") == 0 ||
             strcmp(type, "custom") == 0) {
        const struct json *fn = json_get(tc, "function");
        g->choice = CHOICE_NAMED;
        g->choice_name = json_str(fn ? fn : tc, "name");
        if (!g->choice_name)
            return fail(e, "'tool_choice' names no tool ('name' must be a string)");
    } else {
        return fail(e, "'tool_choice' of type '%s' is not supported (auto, none, required or "
                       "a named tool)", type);
    }
    return true;
}

/* A json_schema format object must hold its schema as an object. */
static bool check_schema(const struct json *schema, const char *key, struct ds4_error *e) {
    if (!json_is(schema, JSON_OBJECT)) return fail(e, "'%s' must hold a JSON schema object", key);
    return true;
}

/* The reply's format: free text, or JSON, under the dialect's name for it:
 *
 *     OpenAI chat   response_format {"type":"json_object"}
 *                                 | {"type":"json_schema","json_schema":{schema}}
 *     Responses     text.format     {"type":"json_object"} | {"type":"json_schema","schema":...}
 *     Anthropic     output_config.format {"type":"json_schema","schema":...}
 *
 * A JSON reply is sampled under the JSON grammar (13.8.1); a schema is also
 * shown to the model in the official "Response Format" section (11.8). */
static bool read_format(const struct json *req, enum api_kind api, struct gen_params *g,
                        struct ds4_error *e) {
    const char *key = api == API_RESPONSES  ? "text.format"
                      : api == API_MESSAGES ? "output_config.format"
                                            : "response_format";
    const struct json *f = api == API_RESPONSES ? json_get(json_get(req, "text"), "format")
                         : api == API_MESSAGES  ? json_get(json_get(req, "output_config"), "format")
                                                : json_get(req, "response_format");
    if (!field_is_set(f)) return true;
    const char *type = json_str(f, "type");
    if (!type) return fail(e, "'%s' must be an object with a 'type'", key);
    if (strcmp(type, "text") == 0) return true;
    if (strcmp(type, "json_object") == 0 && api != API_MESSAGES) {
        g->json_reply = true;
        return true;
    }
    if (strcmp(type, "json_schema") != 0)
        return fail(e, "'%s' of type '%s' is not supported (text, json_object or json_schema)",
                    key, type);
    const struct json *inner = api == API_CHAT ? json_get(f, "json_schema") : f;
    if (!check_schema(json_get(inner, "schema"), key, e)) return false;
    g->json_reply = true;
    g->json_schema = f;
    return true;
}

/* presence_penalty, frequency_penalty (OpenAI's definitions, 13.8.1) and
 * logprobs / top_logprobs (OpenAI chat only: the other dialects have no
 * place for them in their replies). */
static bool read_penalties_logprobs(const struct json *req, enum api_kind api, struct gen_params *g,
                                    struct ds4_error *e) {
    if (!field_float(req, "presence_penalty", -2, 2, &g->presence_penalty, e)) return false;
    if (!field_float(req, "frequency_penalty", -2, 2, &g->frequency_penalty, e)) return false;
    if (api == API_CHAT) {
        if (!field_bool(req, "logprobs", &g->logprobs, e)) return false;
        if (!field_int(req, "top_logprobs", 0, SERVER_MAX_TOP_LOGPROBS, &g->top_logprobs, e))
            return false;
        if (g->top_logprobs > 0 && !g->logprobs)
            return fail(e, "'top_logprobs' needs 'logprobs': true");
        if (g->logprobs && g->stream)
            return fail(e, "'logprobs' is supported only without 'stream'");
        return true;
    }
    const struct json *lp = json_get(req, "logprobs"), *top = json_get(req, "top_logprobs");
    if ((field_is_set(lp) && lp->kind != JSON_FALSE &&
         !(lp->kind == JSON_NUMBER && lp->number == 0)) ||
        (field_is_set(top) && !(top->kind == JSON_NUMBER && top->number == 0)))
        return fail(e, "'%s' is supported only on /v1/chat/completions",
                    field_is_set(lp) ? "logprobs" : "top_logprobs");
    return true;
}

/* NO SILENT DROPS. Every top-level field of a request is either read by
 * this chapter or listed here as bookkeeping that cannot change the reply
 * (ids, metadata, storage and cache hints of hosted services). Anything
 * else is answered with a 400 naming it, so a client never believes a
 * setting took effect when it did not. */
static const char *const KNOWN_FIELDS[] = {
    /* read by 13.4-13.5 */
    "model",
    "stream",
    "stream_options",
    "n",
    "temperature",
    "top_p",
    "min_p",
    "top_k",
    "seed",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "stop",
    "stop_sequences",
    "thinking",
    "think",
    "reasoning_effort",
    "reasoning",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "messages",
    "system",
    "input",
    "instructions",
    "prompt",
    "output_config",
    "text",
    "previous_response_id",
    "conversation",
    /* bookkeeping: no effect on what the model writes */
    "metadata",
    "user",
    "store",
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "client_metadata",
    "include",
    "context_management",
    "cache_control",
    "usage",
    "include_reasoning",
    "truncation",
    "background",
};

static bool check_known_fields(const struct json *req, struct ds4_error *e) {
    for (size_t i = 0; i < req->count; i++) {
        bool known = false;
        for (size_t k = 0; !known && k < sizeof KNOWN_FIELDS / sizeof KNOWN_FIELDS[0]; k++)
            known = strcmp(req->keys[i], KNOWN_FIELDS[k]) == 0;
        if (!known)
            return fail(e, "unknown field '%s': this server does not support it", req->keys[i]);
    }
    return true;
}

/* Anthropic's output_config: effort (read with the mode) and format. */
static bool check_output_config(const struct json *req, struct ds4_error *e) {
    const struct json *oc = json_get(req, "output_config");
    if (!field_is_set(oc)) return true;
    if (oc->kind != JSON_OBJECT) return fail(e, "'output_config' must be an object");
    for (size_t i = 0; i < oc->count; i++)
        if (strcmp(oc->keys[i], "effort") != 0 && strcmp(oc->keys[i], "format") != 0)
            return fail(e, "unknown field 'output_config.%s'", oc->keys[i]);
    return true;
}

/* The fields every dialect shares, under the names each one uses. */
static bool read_gen_params(const struct json *req, enum api_kind api, struct gen_params *g,
                            struct ds4_error *e) {
    memset(g, 0, sizeof *g);
    int n = 1;
    if (!field_string(req, "model", &g->model, e) || !field_bool(req, "stream", &g->stream, e))
        return false;
    if (!field_bool(json_get(req, "stream_options"), "include_usage", &g->include_usage, e))
        return false;
    if (!field_int(req, "n", 1, 1, &n, e)) return fail(e, "only 'n': 1 is supported");
    if (!read_mode(req, api, g, e) || !read_sampling(req, g, e)) return false;
    if (!check_known_fields(req, e) || !check_output_config(req, e)) return false;
    if (!read_tool_choice(req, g, e) || !read_format(req, api, g, e)) return false;
    if (!read_penalties_logprobs(req, api, g, e)) return false;
    const char *max_keys[] = {"max_tokens", "max_completion_tokens", "max_output_tokens"};
    for (size_t k = 0; k < 3; k++)
        if (!field_int(req, max_keys[k], 1, 1e9, &g->max_tokens, e)) return false;
    return read_stops(req, api == API_MESSAGES ? "stop_sequences" : "stop", g, e);
}

/* ---- 13.5 Three dialects, one conversation --------------------------------- */

/* OpenAI chat, Anthropic Messages and OpenAI Responses describe the same
 * thing (a conversation with tool calls) in three shapes:
 *
 *     OpenAI chat          Anthropic Messages           Responses
 *     ------------------   --------------------------   --------------------------
 *     system message       "system" (string, blocks)    "instructions", system item
 *     assistant message    assistant message with       reasoning item, message
 *      reasoning_content    thinking / text / tool_use   item, function_call items
 *      content, tool_calls  blocks                       (consecutive = one turn)
 *     tool message         user message with            function_call_output item
 *                           tool_result blocks
 *     tools[].function     tools[] with input_schema    tools[] (flat function)
 *
 * Each handler walks its request and calls the few conv_* functions below,
 * which write ONE canonical message list in the OpenAI chat shape that
 * chat_render() (11.8) takes. So the template, the DSML rendering of past
 * tool calls and the exact replay (13.6) exist once, not three times.
 *
 * The builder gathers a system text (consecutive system parts are joined by
 * a blank line, as ds4 does for several system or developer messages) and
 * an assistant turn (reasoning, text and calls may arrive as separate
 * blocks or items), and writes each out when something else begins. */

struct conv {
    struct strbuf out;            /* "[" message "," message ... */
    size_t n_msgs;
    struct strbuf system;         /* the system text being gathered */
    bool system_open;
    struct strbuf reasoning, content, calls;   /* the assistant turn being gathered */
    bool assistant_open, has_reasoning;
    size_t n_calls;
    bool tool_context;            /* the history holds tool calls or results */
};

static void conv_free(struct conv *c) {
    strbuf_free(&c->out);
    strbuf_free(&c->system);
    strbuf_free(&c->reasoning);
    strbuf_free(&c->content);
    strbuf_free(&c->calls);
}

static void conv_open_msg(struct conv *c, const char *role) {
    strbuf_puts(&c->out, c->n_msgs++ ? "," : "[");
    strbuf_printf(&c->out, "{\"role\":\"%s\",\"content\":", role);
}

static void conv_flush_system(struct conv *c) {
    if (!c->system_open) return;
    conv_open_msg(c, "system");
    json_write_string(&c->out, c->system.data ? c->system.data : "", c->system.len);
    strbuf_puts(&c->out, "}");
    c->system.len = 0;
    c->system_open = false;
}

static void conv_flush_assistant(struct conv *c) {
    if (!c->assistant_open) return;
    conv_open_msg(c, "assistant");
    json_write_string(&c->out, c->content.data ? c->content.data : "", c->content.len);
    if (c->has_reasoning) {
        strbuf_puts(&c->out, ",\"reasoning_content\":");
        json_write_string(&c->out, c->reasoning.data ? c->reasoning.data : "", c->reasoning.len);
    }
    if (c->n_calls > 0) {
        strbuf_puts(&c->out, ",\"tool_calls\":[");
        strbuf_append(&c->out, c->calls.data, c->calls.len);
        strbuf_puts(&c->out, "]");
    }
    strbuf_puts(&c->out, "}");
    c->reasoning.len = c->content.len = c->calls.len = 0;
    c->assistant_open = c->has_reasoning = false;
    c->n_calls = 0;
}

static void conv_flush(struct conv *c) {
    conv_flush_system(c);
    conv_flush_assistant(c);
}

static void conv_system(struct conv *c, const char *s, size_t n) {
    conv_flush_assistant(c);
    if (c->system_open) strbuf_puts(&c->system, "\n\n");
    strbuf_append(&c->system, s, n);
    c->system_open = true;
}

static void conv_user(struct conv *c, const char *s, size_t n) {
    conv_flush(c);
    conv_open_msg(c, "user");
    json_write_string(&c->out, s, n);
    strbuf_puts(&c->out, "}");
}

static void conv_tool_result(struct conv *c, const char *call_id, const char *s, size_t n) {
    conv_flush(c);
    conv_open_msg(c, "tool");
    json_write_string(&c->out, s, n);
    strbuf_puts(&c->out, ",\"tool_call_id\":");
    json_write_string(&c->out, call_id, strlen(call_id));
    strbuf_puts(&c->out, "}");
    c->tool_context = true;
}

static void conv_assistant_open(struct conv *c) {
    conv_flush_system(c);
    c->assistant_open = true;
}

static void conv_reasoning(struct conv *c, const char *s, size_t n) {
    if (c->assistant_open && (c->content.len > 0 || c->n_calls > 0)) conv_flush_assistant(c);
    conv_assistant_open(c);
    strbuf_append(&c->reasoning, s, n);
    c->has_reasoning = true;
}

static void conv_text(struct conv *c, const char *s, size_t n) {
    if (c->assistant_open && c->n_calls > 0) conv_flush_assistant(c);
    conv_assistant_open(c);
    strbuf_append(&c->content, s, n);
}

/* A past tool call; `args` is the JSON text of its arguments object. */
static void conv_call(struct conv *c, const char *id, const char *name, const char *args,
                      size_t args_len) {
    conv_assistant_open(c);
    if (c->n_calls++ > 0) strbuf_puts(&c->calls, ",");
    strbuf_puts(&c->calls, "{\"id\":");
    json_write_string(&c->calls, id, strlen(id));
    strbuf_puts(&c->calls, ",\"type\":\"function\",\"function\":{\"name\":");
    json_write_string(&c->calls, name, strlen(name));
    strbuf_puts(&c->calls, ",\"arguments\":");
    json_write_string(&c->calls, args, args_len);
    strbuf_puts(&c->calls, "}}");
    c->tool_context = true;
}

static void conv_finish(struct conv *c) {
    conv_flush(c);
    strbuf_puts(&c->out, c->n_msgs ? "]" : "[]");
}

/* The text of a content value: a string, or a list of parts whose "text"
 * members are joined by blank lines. Parts that are not text (images,
 * documents) are refused: this model reads text only. */
static bool content_text(const struct json *v, struct strbuf *out, const char *where,
                         struct ds4_error *e) {
    if (!field_is_set(v)) return true;
    if (v->kind == JSON_STRING) {
        strbuf_append(out, v->string, v->len);
        return true;
    }
    if (v->kind != JSON_ARRAY)
        return fail(e, "%s: content must be a string or an array of parts", where);
    for (size_t i = 0; i < v->count; i++) {
        const struct json *part = &v->items[i];
        const char *type = json_str(part, "type");
        const struct json *text = json_is(part, JSON_STRING) ? part : json_get(part, "text");
        bool is_text = !type || strcmp(type, "text") == 0 || strcmp(type, "input_text") == 0 ||
                       strcmp(type, "output_text") == 0;
        if (!is_text || !json_is(text, JSON_STRING))
            return fail(e, "%s: content part of type '%s' is not supported (text only)", where,
                        type ? type : "?");
        if (i > 0) strbuf_puts(out, "\n\n");
        strbuf_append(out, text->string, text->len);
    }
    return true;
}

/* A required string member, with a message naming where it was missing. */
static const char *need_string(const struct json *obj, const char *key, const char *where,
                               struct ds4_error *e) {
    const char *s = json_str(obj, key);
    if (!s) fail(e, "%s: '%s' must be a string", where, key);
    return s;
}

/* Arguments of a past call as JSON text: a string is used as is (OpenAI,
 * Responses), an object is serialized (Anthropic's "input"). */
static void call_args_text(const struct json *args, struct strbuf *out) {
    if (json_is(args, JSON_STRING)) strbuf_append(out, args->string, args->len);
    else if (field_is_set(args)) json_write(out, args);
    else strbuf_puts(out, "{}");
}

/* The tools list handed to chat_render(): OpenAI "function" entries
 * {"type":"function","function":{name, description, parameters}}. */
static void tools_add(struct strbuf *tools, size_t *n, const struct json *name,
                      const struct json *desc, const struct json *params) {
    strbuf_puts(tools, (*n)++ ? "," : "[");
    strbuf_puts(tools, "{\"type\":\"function\",\"function\":{\"name\":");
    json_write(tools, name);
    if (field_is_set(desc)) {
        strbuf_puts(tools, ",\"description\":");
        json_write(tools, desc);
    }
    if (field_is_set(params)) {
        strbuf_puts(tools, ",\"parameters\":");
        json_write(tools, params);
    }
    strbuf_puts(tools, "}}");
}

/* The names a request declared, for the decoder: every tool (tool_choice
 * "required" picks among them, 13.8.1), and which ones are Responses
 * `custom` tools, whose calls go back as custom_tool_call items. Each list
 * is names back to back, each followed by a NUL. */
struct tool_table {
    struct strbuf names, custom;
};

static void tool_table_free(struct tool_table *tt) {
    strbuf_free(&tt->names);
    strbuf_free(&tt->custom);
}

static bool tool_listed(const struct strbuf *list, const char *name) {
    for (size_t at = 0; at < list->len; at += strlen(list->data + at) + 1)
        if (strcmp(list->data + at, name) == 0) return true;
    return false;
}

/* A Responses custom tool takes free-form text. The model knows only
 * DSML calls with named parameters, so it is shown as a function with one
 * string parameter "input" (the text), its grammar, if any, in the
 * description; its calls go back as custom_tool_call items. */
static void tools_add_custom(struct strbuf *tools, size_t *n, const struct json *name,
                             const struct json *t) {
    struct strbuf desc = {0};
    const struct json *d = json_get(t, "description"), *fmt = json_get(t, "format");
    const char *def = json_str(fmt, "definition");
    if (json_is(d, JSON_STRING)) strbuf_append(&desc, d->string, d->len);
    strbuf_puts(&desc, desc.len ? "\n\n" : "");
    strbuf_puts(&desc, "Pass the whole free-form input as the string parameter `input`.");
    const char *syntax = json_str(fmt, "syntax");
    if (def)
        strbuf_printf(&desc, " It must follow this %s grammar:\n%s", syntax ? syntax : "", def);
    struct json dj = {.kind = JSON_STRING, .string = desc.data, .len = desc.len};
    static char params_text[] =
        "{\"type\":\"object\",\"properties\":{\"input\":{\"type\":\"string\"}},"
        "\"required\":[\"input\"]}";
    char err[8];
    struct json *params = json_parse(params_text, sizeof params_text - 1, 8, err, sizeof err);
    tools_add(tools, n, name, &dj, params);
    json_free(params);
    strbuf_free(&desc);
}

/* One tool entry of any dialect, or a 400. OpenAI chat nests the function
 * under "function"; Responses is flat and adds `custom` and `namespace`
 * tools; Anthropic names the schema "input_schema". Hosted tools (web
 * search, file search, computer use, Anthropic's server tools) are refused:
 * the model cannot run them, and dropping them would let a client believe
 * they exist. */
static bool read_tool(const struct json *t, const char *prefix, enum api_kind api,
                      struct strbuf *tools, size_t *n, struct tool_table *tt, const char *where,
                      struct ds4_error *e) {
    const struct json *fn = json_get(t, "function");
    const char *type = json_str(t, "type");
    if (!json_is(t, JSON_OBJECT)) return fail(e, "%s must be an object", where);
    if (api == API_RESPONSES && type && strcmp(type, "namespace") == 0) {
        const struct json *inner = json_get(t, "tools");
        const char *ns = json_str(t, "name");
        if (!ns || !json_is(inner, JSON_ARRAY))
            return fail(e, "%s: a namespace needs 'name' and 'tools'", where);
        for (size_t k = 0; k < inner->count; k++)
            if (!read_tool(&inner->items[k], ns, api, tools, n, tt, where, e)) return false;
        return true;
    }
    bool custom = api == API_RESPONSES && type && strcmp(type, "custom") == 0;
    if (api == API_CHAT && json_is(fn, JSON_OBJECT) && (!type || strcmp(type, "function") == 0))
        t = fn;
    else if (api == API_MESSAGES ? !json_get(t, "input_schema")
                                 : !custom && (!type || strcmp(type, "function")))
        return fail(e,
                    "%s: tool type '%s' is not supported (function tools only; hosted tools cannot "
                    "run here)",
                    where, type ? type : "?");
    const struct json *name = json_get(t, "name");
    if (!json_is(name, JSON_STRING)) return fail(e, "%s has no name", where);
    /* A namespaced tool is shown as NAMESPACE.NAME: tool names cannot hold
     * a dot, so the reply can split it again (13.9). */
    struct strbuf full = {0};
    if (prefix) strbuf_printf(&full, "%s.", prefix);
    strbuf_append(&full, name->string, name->len);
    struct json full_name = {.kind = JSON_STRING, .string = full.data, .len = full.len};
    if (custom) tools_add_custom(tools, n, &full_name, t);
    else tools_add(tools, n, &full_name, json_get(t, "description"),
                   json_get(t, api == API_MESSAGES ? "input_schema" : "parameters"));
    strbuf_append(&tt->names, full.data, full.len + 1);
    if (custom) strbuf_append(&tt->custom, full.data, full.len + 1);
    strbuf_free(&full);
    return true;
}

static bool read_tools(const struct json *req, enum api_kind api, struct strbuf *tools,
                       struct tool_table *tt, struct ds4_error *e) {
    const struct json *list = json_get(req, "tools");
    size_t n = 0;
    if (!field_is_set(list)) return true;
    if (list->kind != JSON_ARRAY) return fail(e, "'tools' must be an array");
    for (size_t i = 0; i < list->count; i++) {
        char where[32];
        snprintf(where, sizeof where, "tools[%zu]", i);
        if (!read_tool(&list->items[i], NULL, api, tools, &n, tt, where, e)) return false;
    }
    if (n > 0) strbuf_puts(tools, "]");
    return true;
}

/* tool_choice "none" (OpenAI) or {"type":"none"} (Anthropic) hides the tools;
 * "required" and named choices are enforced while decoding (13.8.1). */
static bool tool_choice_none(const struct json *req) {
    const struct json *tc = json_get(req, "tool_choice");
    if (json_is(tc, JSON_STRING)) return strcmp(tc->string, "none") == 0;
    const char *type = json_str(tc, "type");
    return type && strcmp(type, "none") == 0;
}

/* OpenAI chat: "messages" [{role, content, reasoning_content, tool_calls,
 * tool_call_id}]. Each assistant message is one turn. */
static bool conv_from_chat(struct conv *c, const struct json *req, struct ds4_error *e) {
    const struct json *msgs = json_get(req, "messages");
    if (!json_is(msgs, JSON_ARRAY) || msgs->count == 0)
        return fail(e, "'messages' must be a non-empty array");
    struct strbuf text = {0}, args = {0};
    bool ok = true;
    for (size_t i = 0; ok && i < msgs->count; i++) {
        const struct json *m = &msgs->items[i];
        const char *role = json_str(m, "role");
        char where[48];
        snprintf(where, sizeof where, "messages[%zu]", i);
        text.len = 0;
        if (!role) {
            ok = fail(e, "%s: 'role' must be a string", where);
        } else if (strcmp(role, "system") == 0 || strcmp(role, "developer") == 0) {
            ok = content_text(json_get(m, "content"), &text, where, e);
            if (ok) conv_system(c, text.data ? text.data : "", text.len);
        } else if (strcmp(role, "user") == 0) {
            ok = content_text(json_get(m, "content"), &text, where, e);
            if (ok) conv_user(c, text.data ? text.data : "", text.len);
        } else if (strcmp(role, "tool") == 0) {
            const char *id = json_str(m, "tool_call_id");
            ok = content_text(json_get(m, "content"), &text, where, e);
            if (ok) conv_tool_result(c, id ? id : "", text.data ? text.data : "", text.len);
        } else if (strcmp(role, "assistant") == 0) {
            const struct json *r = json_get(m, "reasoning_content"),
                              *calls = json_get(m, "tool_calls");
            conv_flush_assistant(c);
            conv_assistant_open(c);
            if (json_is(r, JSON_STRING)) conv_reasoning(c, r->string, r->len);
            ok = content_text(json_get(m, "content"), &text, where, e);
            if (ok && text.len) conv_text(c, text.data, text.len);
            if (ok && field_is_set(calls) && !json_is(calls, JSON_ARRAY))
                ok = fail(e, "%s: 'tool_calls' must be an array", where);
            for (size_t k = 0; ok && json_is(calls, JSON_ARRAY) && k < calls->count; k++) {
                const struct json *fn = json_get(&calls->items[k], "function");
                const char *id = json_str(&calls->items[k], "id");
                const char *name = need_string(fn, "name", where, e);
                args.len = 0;
                call_args_text(json_get(fn, "arguments"), &args);
                if (name) conv_call(c, id ? id : "", name, args.data ? args.data : "{}", args.len);
                ok = name != NULL;
            }
            conv_flush_assistant(c);
        } else {
            ok = fail(e, "%s: unknown role '%s'", where, role);
        }
    }
    strbuf_free(&text);
    strbuf_free(&args);
    return ok;
}

/* Anthropic "system": a string, or text blocks. Blocks whose text starts
 * with "x-anthropic-" are client bookkeeping (billing headers that Claude
 * Code sends) and change every request, so they are dropped: they would
 * defeat prefix reuse and mean nothing to the model. */
static bool conv_anthropic_system(struct conv *c, const struct json *sys, struct ds4_error *e) {
    if (!field_is_set(sys)) return true;
    if (sys->kind == JSON_STRING) {
        conv_system(c, sys->string, sys->len);
        return true;
    }
    if (sys->kind != JSON_ARRAY)
        return fail(e, "'system' must be a string or an array of text blocks");
    for (size_t i = 0; i < sys->count; i++) {
        const struct json *t = json_get(&sys->items[i], "text");
        if (!json_is(t, JSON_STRING)) return fail(e, "system[%zu] must be a text block", i);
        if (strncmp(t->string, "x-anthropic-", 12) == 0) continue;
        conv_system(c, t->string, t->len);
    }
    return true;
}

/* One Anthropic content block of a user message: text, or a tool result. */
static bool conv_anthropic_user_block(struct conv *c, const struct json *b, struct strbuf *text,
                                      const char *where, struct ds4_error *e) {
    const char *type = json_str(b, "type");
    if (type && strcmp(type, "tool_result") == 0) {
        struct strbuf result = {0};
        const char *id = json_str(b, "tool_use_id");
        bool ok = content_text(json_get(b, "content"), &result, where, e);
        if (ok) conv_tool_result(c, id ? id : "", result.data ? result.data : "", result.len);
        strbuf_free(&result);
        return ok;
    }
    const struct json *t = json_get(b, "text");
    if (!type || strcmp(type, "text") != 0 || !json_is(t, JSON_STRING))
        return fail(e, "%s: content block of type '%s' is not supported", where, type ? type : "?");
    if (text->len) strbuf_puts(text, "\n\n");
    strbuf_append(text, t->string, t->len);
    return true;
}

/* One Anthropic content block of an assistant message. */
static bool conv_anthropic_assistant_block(struct conv *c, const struct json *b, const char *where,
                                           struct ds4_error *e) {
    const char *type = json_str(b, "type");
    const struct json *t = json_get(b, "text"), *th = json_get(b, "thinking");
    if (type && strcmp(type, "text") == 0 && json_is(t, JSON_STRING)) {
        conv_text(c, t->string, t->len);
    } else if (type && strcmp(type, "thinking") == 0 && json_is(th, JSON_STRING)) {
        conv_reasoning(c, th->string, th->len);
    } else if (type && strcmp(type, "redacted_thinking") == 0) {
        /* opaque: nothing to render */
    } else if (type && strcmp(type, "tool_use") == 0) {
        const char *id = need_string(b, "id", where, e), *name = need_string(b, "name", where, e);
        struct strbuf args = {0};
        if (!id || !name) return false;
        call_args_text(json_get(b, "input"), &args);
        conv_call(c, id, name, args.data, args.len);
        strbuf_free(&args);
    } else {
        return fail(e, "%s: content block of type '%s' is not supported", where, type ? type : "?");
    }
    return true;
}

/* Anthropic Messages: "system" plus "messages" [{role, content}], where
 * content is a string or a list of blocks. Claude Code also puts system
 * (and developer) messages inside "messages"; they are read like the
 * top-level "system" and rendered where they stand (11.8 folds one that
 * follows a user turn into it). */
static bool conv_from_messages(struct conv *c, const struct json *req, struct ds4_error *e) {
    const struct json *msgs = json_get(req, "messages");
    if (!json_is(msgs, JSON_ARRAY) || msgs->count == 0)
        return fail(e, "'messages' must be a non-empty array");
    if (!conv_anthropic_system(c, json_get(req, "system"), e)) return false;
    bool ok = true;
    struct strbuf text = {0};
    for (size_t i = 0; ok && i < msgs->count; i++) {
        const struct json *m = &msgs->items[i], *content = json_get(m, "content");
        const char *role = json_str(m, "role");
        char where[48];
        snprintf(where, sizeof where, "messages[%zu]", i);
        bool user = role && strcmp(role, "user") == 0,
             assistant = role && strcmp(role, "assistant") == 0;
        bool system = role && (strcmp(role, "system") == 0 || strcmp(role, "developer") == 0);
        text.len = 0;
        if (system) {
            ok = conv_anthropic_system(c, content, e);
        } else if (!user && !assistant) {
            ok = fail(e, "%s: 'role' must be user, assistant or system", where);
        } else if (json_is(content, JSON_STRING)) {
            if (user) conv_user(c, content->string, content->len);
            else conv_text(c, content->string, content->len);
        } else if (!json_is(content, JSON_ARRAY)) {
            ok = fail(e, "%s: 'content' must be a string or an array of blocks", where);
        } else {
            if (assistant) conv_flush_assistant(c);
            for (size_t k = 0; ok && k < content->count; k++)
                ok = user ? conv_anthropic_user_block(c, &content->items[k], &text, where, e)
                          : conv_anthropic_assistant_block(c, &content->items[k], where, e);
            if (ok && user && text.len) conv_user(c, text.data, text.len);
        }
        if (assistant) conv_flush_assistant(c);
    }
    strbuf_free(&text);
    return ok;
}

/* A Responses reasoning item: its summary texts (what we send out), or
 * its full reasoning_text content when a client kept that instead. */
static void conv_responses_reasoning(struct conv *c, const struct json *item) {
    struct strbuf text = {0};
    const struct json *parts = json_get(item, "content");
    if (!json_is(parts, JSON_ARRAY) || parts->count == 0) parts = json_get(item, "summary");
    for (size_t i = 0; json_is(parts, JSON_ARRAY) && i < parts->count; i++) {
        const struct json *t = json_get(&parts->items[i], "text");
        if (!json_is(t, JSON_STRING)) continue;
        if (text.len) strbuf_puts(&text, "\n\n");
        strbuf_append(&text, t->string, t->len);
    }
    conv_reasoning(c, text.data ? text.data : "", text.len);
    strbuf_free(&text);
}

/* A Responses "message" item (typed or the short {role, content} form). */
static bool conv_responses_message(struct conv *c, const struct json *item, const char *where,
                                   struct ds4_error *e) {
    const char *role = need_string(item, "role", where, e);
    struct strbuf text = {0};
    bool ok = role && content_text(json_get(item, "content"), &text, where, e);
    const char *s = text.data ? text.data : "";
    if (!ok) {
        /* the message is already in e */
    } else if (strcmp(role, "system") == 0 || strcmp(role, "developer") == 0) {
        conv_system(c, s, text.len);
    } else if (strcmp(role, "user") == 0) {
        conv_user(c, s, text.len);
    } else if (strcmp(role, "assistant") == 0) {
        conv_text(c, s, text.len);
    } else {
        ok = fail(e, "%s: unknown role '%s'", where, role);
    }
    strbuf_free(&text);
    return ok;
}

/* One Responses input item. Custom tool calls (free-form input, as Codex's
 * apply_patch) are rendered as a call with one string parameter "input". */
static bool conv_responses_item(struct conv *c, const struct json *item, const char *where,
                                struct ds4_error *e) {
    const char *type = json_str(item, "type");
    struct strbuf text = {0};
    bool ok = true;
    if (!json_is(item, JSON_OBJECT)) {
        ok = fail(e, "%s must be an object", where);
    } else if (!type || strcmp(type, "message") == 0) {
        ok = conv_responses_message(c, item, where, e);
    } else if (strcmp(type, "reasoning") == 0) {
        conv_responses_reasoning(c, item);
    } else if (strcmp(type, "function_call") == 0 || strcmp(type, "custom_tool_call") == 0) {
        bool custom = type[0] == 'c';
        const char *id = need_string(item, "call_id", where, e),
                   *name = need_string(item, "name", where, e);
        const char *ns = json_str(item, "namespace");
        struct strbuf full = {0};
        ok = id && name;
        /* a namespaced tool is NAMESPACE.NAME (13.5 read_tool) */
        if (ok && ns) {
            strbuf_printf(&full, "%s.%s", ns, name);
            name = full.data;
        }
        if (ok && custom) {
            strbuf_puts(&text, "{\"input\":");
            json_write(&text, json_get(item, "input"));
            strbuf_puts(&text, "}");
        } else if (ok) {
            call_args_text(json_get(item, "arguments"), &text);
        }
        if (ok) conv_call(c, id, name, text.data, text.len);
        strbuf_free(&full);
    } else if (strcmp(type, "function_call_output") == 0 ||
               strcmp(type, "custom_tool_call_output") == 0) {
        const char *id = need_string(item, "call_id", where, e);
        ok = id && content_text(json_get(item, "output"), &text, where, e);
        if (ok) conv_tool_result(c, id, text.data ? text.data : "", text.len);
    } else {
        ok = fail(e, "%s: input item type '%s' is not supported", where, type);
    }
    strbuf_free(&text);
    return ok;
}

/* OpenAI Responses: "instructions" plus "input" (a string or items). The
 * server keeps no stored responses: the client replays the whole input. */
static bool conv_from_responses(struct conv *c, const struct json *req, struct ds4_error *e) {
    const struct json *input = json_get(req, "input");
    const char *instructions = NULL;
    if (field_is_set(json_get(req, "previous_response_id")))
        return fail(e, "'previous_response_id' is not supported; replay the full input instead");
    if (field_is_set(json_get(req, "conversation")))
        return fail(e, "'conversation' is not supported; replay the full input instead");
    if (!field_string(req, "instructions", &instructions, e)) return false;
    if (instructions) conv_system(c, instructions, strlen(instructions));
    if (json_is(input, JSON_STRING)) {
        conv_user(c, input->string, input->len);
        return true;
    }
    if (!json_is(input, JSON_ARRAY) || input->count == 0)
        return fail(e, "'input' must be a string or a non-empty array of items");
    for (size_t i = 0; i < input->count; i++) {
        char where[32];
        snprintf(where, sizeof where, "input[%zu]", i);
        if (!conv_responses_item(c, &input->items[i], where, e)) return false;
    }
    return true;
}

/* Legacy completions: the prompt becomes one user turn under the fixed
 * system text ds4 uses [LAYOUT §4.3]. */
static bool conv_from_completions(struct conv *c, const struct json *req, struct ds4_error *e) {
    static const char system[] = "You are a helpful assistant";
    const struct json *p = json_get(req, "prompt");
    if (json_is(p, JSON_ARRAY) && p->count == 1) p = &p->items[0];
    if (!json_is(p, JSON_STRING))
        return fail(e, "'prompt' must be a string (or an array of one string)");
    conv_system(c, system, sizeof system - 1);
    conv_user(c, p->string, p->len);
    return true;
}

/* ---- 13.6 Exact replay of tool calls --------------------------------------- */

/* THE PROBLEM. An agent turn with tools goes:
 *
 *     request 1   ... <｜Assistant｜></think>
 *     model       Let me look.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="read">...
 *                 </｜DSML｜tool_calls>                  (now in the session's KV)
 *     reply       tool_calls: [{id: call_X, name: "read", arguments: "{\"path\": \"a.c\"}"}]
 *     request 2   the same history + that assistant message + the tool result
 *
 * Request 2 comes back as JSON, and chat_render() turns the call back into
 * DSML in its canonical form (one parameter per line, Python-style JSON for
 * non-strings). The model, though, may have written it differently: other
 * spacing, another parameter order, `1.0` where json.dumps writes `1.0`
 * but a client re-serializes `1`. Then the rendered prompt differs from the
 * session's tokens at that point, and everything after it -- typically the
 * whole agent context -- is prefilled again, on every turn.
 *
 * THE FIX. Remember, per tool-call id, the exact text the model sampled for
 * the whole tool block, and when a history message carries exactly those
 * ids, put that text back where the canonical block was rendered. The ids
 * are random and unguessable (13.9), so a client cannot make us replay text
 * it did not receive. Memory is a ring of --tool-memory blocks: the oldest
 * is forgotten first, and a forgotten id falls back to the canonical form,
 * which is still a correct prompt, just a slower one.
 *
 * The canonical block is found in the rendered prompt by rendering it again
 * with the same function chat_render() used (chat_dsml_calls), searching
 * forward from the previous replacement, so blocks are matched in order. */

struct tool_memory_entry {
    char *first_id;             /* the key: the block's first call id */
    char *ids;                  /* all its call ids, each followed by '\n' */
    char *dsml; /* "\n\n<｜DSML｜tool_calls>...</｜DSML｜tool_calls>" as sampled */
};

struct tool_memory {
    pthread_mutex_t lock;
    struct tool_memory_entry *slots;   /* [cap], a ring */
    size_t cap, next;
};

static void tool_memory_init(struct tool_memory *m, int cap) {
    pthread_mutex_init(&m->lock, NULL);
    m->cap = cap > 0 ? (size_t)cap : 0;
    m->slots = xcalloc(m->cap ? m->cap : 1, sizeof *m->slots);
    m->next = 0;
}

static void tool_memory_entry_free(struct tool_memory_entry *t) {
    free(t->first_id);
    free(t->ids);
    free(t->dsml);
    memset(t, 0, sizeof *t);
}

static void tool_memory_free(struct tool_memory *m) {
    for (size_t i = 0; i < m->cap; i++) tool_memory_entry_free(&m->slots[i]);
    free(m->slots);
    pthread_mutex_destroy(&m->lock);
}

static char *srv_strndup(const char *s, size_t n) {
    char *d = xmalloc(n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

static void tool_memory_put(struct tool_memory *m, const char *first_id, const char *ids,
                            const char *dsml, size_t len) {
    if (m->cap == 0) return;
    pthread_mutex_lock(&m->lock);
    struct tool_memory_entry *t = &m->slots[m->next];
    m->next = (m->next + 1) % m->cap;
    tool_memory_entry_free(t);
    t->first_id = srv_strndup(first_id, strlen(first_id));
    t->ids = srv_strndup(ids, strlen(ids));
    t->dsml = srv_strndup(dsml, len);
    pthread_mutex_unlock(&m->lock);
}

/* The remembered block for exactly these ids, as a copy, or NULL. A linear
 * scan: a few thousand string compares cost microseconds, against a
 * prefill of milliseconds at the least. */
static char *tool_memory_get(struct tool_memory *m, const char *first_id, const char *ids) {
    char *found = NULL;
    pthread_mutex_lock(&m->lock);
    for (size_t i = 0; i < m->cap && !found; i++) {
        const struct tool_memory_entry *t = &m->slots[i];
        if (t->first_id && strcmp(t->first_id, first_id) == 0 && strcmp(t->ids, ids) == 0)
            found = srv_strndup(t->dsml, strlen(t->dsml));
    }
    pthread_mutex_unlock(&m->lock);
    return found;
}

/* The ids of a tool_calls array, each followed by '\n'. False if any lacks one. */
static bool call_ids(const struct json *calls, struct strbuf *ids) {
    for (size_t k = 0; k < calls->count; k++) {
        const struct json *id = json_get(&calls->items[k], "id");
        if (!json_is(id, JSON_STRING) || id->len == 0) return false;
        strbuf_append(ids, id->string, id->len);
        strbuf_puts(ids, "\n");
    }
    return calls->count > 0;
}

/* Replace canonical tool blocks in `prompt` by remembered exact ones. */
static void replay_tool_calls(struct tool_memory *mem, const struct json *messages,
                              struct strbuf *prompt) {
    struct strbuf out = {0}, canon = {0}, ids = {0};
    size_t cursor = 0;
    for (size_t i = 0; i < messages->count; i++) {
        const struct json *calls = json_get(&messages->items[i], "tool_calls");
        if (!json_is(calls, JSON_ARRAY) || calls->count == 0) continue;
        canon.len = ids.len = 0;
        chat_dsml_calls(&canon, calls);
        if (!call_ids(calls, &ids) || canon.oom) continue;
        const char *at = memmem(prompt->data + cursor, prompt->len - cursor, canon.data, canon.len);
        char *exact = at ? tool_memory_get(mem, json_str(&calls->items[0], "id"), ids.data) : NULL;
        if (!exact) continue;
        size_t pos = (size_t)(at - prompt->data);
        strbuf_append(&out, prompt->data + cursor, pos - cursor);
        strbuf_puts(&out, exact);
        cursor = pos + canon.len;
        free(exact);
    }
    if (cursor > 0) {
        strbuf_append(&out, prompt->data + cursor, prompt->len - cursor);
        strbuf_free(prompt);
        *prompt = out;
    } else {
        strbuf_free(&out);
    }
    strbuf_free(&canon);
    strbuf_free(&ids);
}

/* ---- 13.7 The test script: forced replies (tests only) --------------------- */

/* The tiny test model has random weights: what it samples is noise, so no
 * test could ever see a well-formed tool call come out of it. With
 * --test-script FILE the worker does everything it normally does -- the
 * prompt is prefilled, every reply token goes through the forward pass and
 * into the KV, through the streaming decoder, the DSML parser and the
 * dialect's writer -- except that the token it "samples" is the next one of
 * a scripted reply. FILE is a JSON array of rules:
 *
 *     [{"match": "weather", "reply": "\n\n<｜DSML｜tool_calls>\n..."},
 *      {"match": "",        "reply": "Hello."}]
 *
 * The first rule whose `match` occurs in the last user turn of the rendered
 * prompt (from the last <｜User｜> on, so tool results count) gives the
 * reply, tokenized like any prompt text. An empty `match` matches all; with
 * no match the model samples as usual. After the reply, EOS. A thinking-mode
 * reply must contain its own "</think>", exactly as the model would write.
 *
 * Never use this in production: it is a way to make a server say anything. */

struct script_rule {
    char *match;
    int32_t *ids;
    size_t n_ids;
};

struct test_script {
    struct script_rule *rules;
    size_t n;
};

static bool test_script_load(struct test_script *s, const char *path, const struct tokenizer *tok,
                             struct ds4_error *e) {
    size_t len;
    char *text = read_file(path, &len, e), err[200];
    if (!text) return false;
    struct json *root = json_parse(text, len, 8, err, sizeof err);
    free(text);
    if (!json_is(root, JSON_ARRAY)) {
        json_free(root);
        return fail(e, "%s: a test script is a JSON array of {match, reply} (%s)", path, err);
    }
    s->rules = xcalloc(root->count, sizeof *s->rules);
    for (size_t i = 0; i < root->count; i++) {
        const struct json *match = json_get(&root->items[i], "match"),
                          *reply = json_get(&root->items[i], "reply");
        if (!json_is(match, JSON_STRING) || !json_is(reply, JSON_STRING)) {
            json_free(root);
            return fail(e, "%s: rule %zu needs string 'match' and 'reply'", path, i);
        }
        struct script_rule *r = &s->rules[s->n++];
        r->match = srv_strndup(match->string, match->len);
        tokenize(tok, reply->string, reply->len, true, &r->ids, &r->n_ids);
    }
    json_free(root);
    return true;
}

static void test_script_free(struct test_script *s) {
    for (size_t i = 0; i < s->n; i++) {
        free(s->rules[i].match);
        free(s->rules[i].ids);
    }
    free(s->rules);
}

/* The rule for a prompt, or NULL. */
static const struct script_rule *test_script_find(const struct test_script *s, const char *prompt) {
    const char *turn = prompt, *p;
    while ((p = strstr(turn + 1, CHAT_USER)) != NULL) turn = p;
    for (size_t i = 0; i < s->n; i++)
        if (strstr(turn, s->rules[i].match)) return &s->rules[i];
    return NULL;
}

/* ---- 13.8 Jobs and the queue ----------------------------------------------- */

/* A job is one generation request on its way through the worker. The
 * client thread fills the first part and queues it; the worker fills the
 * rest while it writes the reply; the client thread frees it after `done`.
 *
 *     client thread                       worker
 *     -------------                       ------
 *     job_submit  -> queue (FIFO) ------> job_take (started = true)
 *     job_wait: watch the socket          prefill, decode, write the reply
 *       left while queued? unlink it      left while running? stop, finish
 *     <---------------------------------- job_finish (done = true, broadcast)
 *     free the job, close the socket
 */

enum finish { FINISH_STOP, FINISH_LENGTH, FINISH_TOOLS, FINISH_ERROR, FINISH_CANCELLED };

/* Anthropic content blocks, in the order a reply opens them. */
enum block_kind { BLOCK_NONE, BLOCK_THINKING, BLOCK_TEXT, BLOCK_TOOL };

struct job_call {
    bool custom;                /* Responses: a custom tool, answered as custom_tool_call */
    size_t ns_len;              /* Responses: "NAMESPACE." prefix of name, 0 if none */
    char id[48];                /* call_<hex> (OpenAI, Responses) or toolu_<hex> (Anthropic) */
    char item_id[48];           /* Responses: the output item's fc_<hex> */
    char *name;
    struct strbuf args;         /* arguments sent so far; the whole object once done */
    int out_index;              /* Responses: output index */
};

struct job {
    /* Set by the client thread. */
    struct conn *conn;
    enum api_kind api;
    struct gen_params p;
    const char *model;          /* echoed in replies */
    char id[64];                /* chatcmpl-<hex>, msg_<hex>, resp_<hex>, cmpl-<hex> */
    long created;               /* Unix time */
    int32_t *prompt;            /* [n_prompt] */
    size_t n_prompt;
    /* the rendered prompt (the test script and the disk store read it) */
    char *prompt_text;
    struct tool_table tt;       /* the declared tools' names (13.5) */
    size_t prompt_text_len;
    int max_tokens;             /* after the caps */

    /* Set by the worker. */
    int64_t n_cached;           /* prompt tokens found in the session */
    int n_generated, n_reasoning;
    int64_t drafted, accepted;     /* MTP speculative decoding, this reply */
    enum finish finish;
    char error[256];
    const char *stop_hit;       /* the stop string that ended the reply */
    struct strbuf raw;          /* everything the model wrote, as text */
    struct strbuf reasoning, content;   /* what the client was sent */
    struct job_call *calls;
    size_t n_calls, cap_calls;
    double t_queued, t_started, t_prefilled, t_finished;

    /* The worker's reading of the output. */
    struct guide *guide;        /* guided decoding (13.8.1), NULL when not needed */
    struct token_stream ts;
    struct dsml_parser dsml;
    size_t args_sent;           /* bytes of the open call's arguments already sent */
    struct strbuf held;         /* content held back while it may start a stop string */
    double last_keepalive;

    /* The dialect writers' state. */
    int seq;                    /* Responses: sequence_number of the next event */
    int n_items;                /* Responses: output items opened so far */
    int rs_index, msg_index;    /* Responses: their output indexes, -1 = not open */
    char rs_id[48], msg_id[48];
    enum block_kind block;      /* Anthropic: the open content block */
    int n_blocks;               /* Anthropic: blocks opened so far */

    /* The handshake, under server.lock. */
    bool started, done;
    bool noting;                /* the client thread is writing a queue note (13.8) */
    double last_note;
    atomic_bool cancelled;
    struct job *next;
};

/* What /metrics reports [Prometheus text exposition format 0.0.4]. */
struct server_metrics {
    uint64_t requests, by_class[6];     /* HTTP requests; answers by class 1xx..5xx */
    uint64_t generations, cache_hits;   /* generation requests; those that reused tokens */
    uint64_t prompt_tokens, cached_tokens, generated_tokens;
    double prefill_seconds, decode_seconds;
    double last_prefill_tps, last_decode_tps;
    uint64_t evicted, refused, over_budget;
};
struct cache_slot;              /* 12.10: one session in memory */

struct server {
    const struct server_options *opt;
    struct engine *eng;
    const struct tokenizer *tok;
    int listen_fd;

    pthread_mutex_t lock;       /* the queue, n_conns, job started/done */
    pthread_cond_t wake;        /* the worker waits for jobs */
    pthread_cond_t job_done;    /* client threads wait for their job */
    struct job *head, *tail;
    struct job *running;        /* the job the worker holds, or NULL */
    int n_conns;
    struct conn *conns;         /* every open connection, for eviction (13.12) */
    atomic_bool stopping;
    pthread_cond_t parse_room;  /* the parse pool has room again */
    size_t parse_in_use;        /* bytes reserved for request trees (13.11) */
    struct server_metrics m;    /* /metrics, under lock */

    /* The worker's own: the sessions in memory (13.10) and the one in use. */
    struct cache_slot *slots;   /* [n_slots], never moved */
    int n_slots;
    struct cache_slot *cur;     /* the session the current job runs in */
    uint64_t clock;             /* bumped each time a slot serves a job (LRU) */
    struct sampler sp;
    struct generator gen;       /* plain or speculative decoding over s and sp */
    float *guide_logits;        /* [vocab] guided decoding's adjusted logits (13.8.1) */
    int32_t *token_count;       /* [vocab] tokens of the current reply, for penalties */
    struct kv_store kv;         /* --kv-disk-dir: sessions on disk (chapter 12), when kv_on */
    bool kv_on;
    struct kv_policy kv_policy;

    struct tool_memory mem;     /* its own lock */
    struct test_script script;  /* read-only after start */
    FILE *log;                  /* --log, under log_lock */
    pthread_mutex_t log_lock;
};

static bool job_submit(struct server *srv, struct job *j) {
    pthread_mutex_lock(&srv->lock);
    bool ok = !atomic_load(&srv->stopping);
    if (ok) {
        j->t_queued = now_seconds();
        if (srv->tail) srv->tail->next = j;
        else srv->head = j;
        srv->tail = j;
        pthread_cond_signal(&srv->wake);
    }
    pthread_mutex_unlock(&srv->lock);
    return ok;
}

/* Under srv->lock: take a job that never started out of the queue. */
static void job_unlink(struct server *srv, struct job *j) {
    struct job **link = &srv->head, *prev = NULL;
    while (*link && *link != j) {
        prev = *link;
        link = &(*link)->next;
    }
    if (!*link) return;
    *link = j->next;
    if (srv->tail == j) srv->tail = prev;
}

/* Has the client left? End-of-stream alone may be a half-close (13.2
 * HALF-CLOSE), so the first time it is seen something harmless is written:
 * an SSE comment if the stream is open, else a "102 Processing" interim
 * response, which HTTP/1.1 clients skip [RFC 9110 §15.2]. A client that is
 * really gone answers with a reset, and the next look sees PEER_GONE. Only
 * the thread that writes this connection's reply may call it. */
static bool conn_peer_gone(struct conn *c) {
    static const char processing[] = "HTTP/1.1 102 Processing\r\n\r\n";
    enum peer_state ps = srv_peer_state(c->fd);
    if (ps == PEER_GONE) c->gone = true;
    if (ps == PEER_EOF && !c->probed && !c->gone) {
        c->probed = true;
        if (c->stream_open) http_chunk(c, ": still there?\n\n", 16);
        else conn_send(c, processing, sizeof processing - 1);
    }
    return c->gone;
}

/* Under srv->lock: how many requests are ahead of j (the running one too). */
static int job_position(const struct server *srv, const struct job *j) {
    int ahead = srv->running != NULL;
    for (const struct job *q = srv->head; q && q != j; q = q->next) ahead++;
    return ahead;
}

/* QUEUE NOTES. A request waits while others are served, and clients with
 * short timeouts give up on a silent socket. A streaming request therefore
 * gets its stream's head at once and an SSE comment with its place in line
 * every SERVER_KEEPALIVE_S (": queued, 2 requests ahead"); comments are
 * ignored by every SSE reader. Every 503 says Retry-After. Called with
 * srv->lock held; it is released around the write, with j->noting set so
 * the worker does not take the connection in between. */
static void job_note(struct server *srv, struct job *j, bool stopping, bool due) {
    struct conn *c = j->conn;
    int ahead = job_position(srv, j);
    char note[96];
    int n = snprintf(note, sizeof note, ": queued, %d request%s ahead\n\n", ahead,
                     ahead == 1 ? "" : "s");
    j->noting = true;
    j->last_note = now_seconds();
    pthread_mutex_unlock(&srv->lock);
    if (stopping && !c->stream_open) {
        http_error(c, 503, "the server is shutting down");
    } else if (stopping) {
        http_chunk(c, ": the server is shutting down\n\n", 31);
        http_stream_end(c);
    } else if (due) {
        http_stream_begin(c);
        http_chunk(c, note, (size_t)n);
    }
    conn_peer_gone(c);
    pthread_mutex_lock(&srv->lock);
    j->noting = false;
    pthread_cond_broadcast(&srv->job_done);
}

/* Wait for the worker to finish the job. While it is still queued, watch
 * the socket: a client that gave up is taken out of the line at once. */
static void job_wait(struct server *srv, struct job *j) {
    pthread_mutex_lock(&srv->lock);
    while (!j->done) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 200 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&srv->job_done, &srv->lock, &ts);
        if (j->started || j->done) continue;
        bool stop = atomic_load(&srv->stopping);
        bool due = j->p.stream &&
                   (j->last_note == 0 || now_seconds() - j->last_note >= SERVER_KEEPALIVE_S);
        if (stop || due || srv_peer_state(j->conn->fd) != PEER_THERE) job_note(srv, j, stop, due);
        if (j->started || j->done) continue;
        if (stop || j->conn->gone) {
            job_unlink(srv, j);
            j->finish = FINISH_CANCELLED;
            j->done = true;
        }
    }
    pthread_mutex_unlock(&srv->lock);
}

/* The worker's side: the next job, or NULL when the server stops. */
static struct job *job_take(struct server *srv) {
    pthread_mutex_lock(&srv->lock);
    while (!srv->head && !atomic_load(&srv->stopping)) pthread_cond_wait(&srv->wake, &srv->lock);
    struct job *j = atomic_load(&srv->stopping) ? NULL : srv->head;
    if (j) {
        srv->head = j->next;
        if (!srv->head) srv->tail = NULL;
        j->started = true;
        srv->running = j;
        while (j->noting) pthread_cond_wait(&srv->job_done, &srv->lock);
    }
    pthread_mutex_unlock(&srv->lock);
    return j;
}

static void job_finish(struct server *srv, struct job *j) {
    pthread_mutex_lock(&srv->lock);
    j->done = true;
    srv->running = NULL;
    pthread_cond_broadcast(&srv->job_done);
    pthread_mutex_unlock(&srv->lock);
}

struct guide;
static void guide_free(struct guide *g);

static void job_free(struct job *j) {
    free(j->prompt);
    free(j->prompt_text);
    strbuf_free(&j->raw);
    strbuf_free(&j->reasoning);
    strbuf_free(&j->content);
    strbuf_free(&j->held);
    for (size_t i = 0; i < j->n_calls; i++) {
        free(j->calls[i].name);
        strbuf_free(&j->calls[i].args);
    }
    free(j->calls);
    tool_table_free(&j->tt);
    if (j->guide) guide_free(j->guide);
    free(j->guide);
    dsml_parser_free(&j->dsml);
    free(j);
}

/* Unguessable ids: PREFIX + 32 hex digits from the kernel's generator. */
static void random_id(char *out, size_t cap, const char *prefix) {
    unsigned char bytes[16] = {0};
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    bool ok = fd >= 0 && read(fd, bytes, sizeof bytes) == (ssize_t)sizeof bytes;
    if (fd >= 0) close(fd);
    if (!ok) {                                  /* no /dev/urandom: still unique, less secret */
        uint64_t s = (uint64_t)(now_seconds() * 1e9) ^ (uint64_t)(uintptr_t)out;
        for (size_t i = 0; i < sizeof bytes; i++) bytes[i] = (unsigned char)splitmix64(&s);
    }
    size_t n = (size_t)snprintf(out, cap, "%s", prefix);
    for (size_t i = 0; i < sizeof bytes && n + 2 < cap; i++, n += 2)
        snprintf(out + n, cap - n, "%02x", bytes[i]);
}

/* ---- 13.8.1 Guided decoding: tool_choice, JSON replies, penalties, logprobs ---- */

/* Some request fields are promises about the reply that sampling alone
 * cannot keep: "call a tool", "call this tool", "at most one call", "reply
 * in JSON". They are kept by steering the decoder, step by step:
 *
 *     FORCED TOKENS   text the reply must contain next is tokenized and fed
 *                     as if sampled: the opening of a DSML block
 *                     "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"", or
 *                     the block's close after the first call when parallel
 *                     calls are off;
 *     MASKS           a token is allowed only if its bytes keep the reply
 *                     valid: the tool name being written must stay a prefix
 *                     of a declared name followed by `">`; a JSON reply must
 *                     stay a prefix of a JSON object (the machine below);
 *                     masked tokens get logit -inf before the sampler runs;
 *     BUDGET          a JSON reply must close before max_tokens: a token is
 *                     allowed only if the shortest completion after it (one
 *                     single-byte token per byte) and EOS still fit; if the
 *                     limit is too small even for that, the completion is
 *                     forced byte by byte.
 *
 * In thinking mode the reasoning is left free: the promises apply to the
 * answer, from the token after </think>. A test script's replies (13.7)
 * are scripted, but forced tokens still go first, so the tests see them.
 *
 * PENALTIES, as OpenAI defines them, over the tokens of this reply so far
 * (c[t] = how often token t was generated):
 *
 *     logit[t] -= c[t] * frequency_penalty + (c[t] > 0) * presence_penalty
 *
 * LOGPROBS are those of the distribution the sampler drew from, before
 * temperature: log softmax of the logits after penalties and masks, for
 * each token of the answer (not the reasoning, not the DSML block), with
 * the top_logprobs most likely alternatives.
 *
 * A guided job decodes one token per step (MTP drafting is off for it):
 * every step needs the mask of the state the previous token left. */

/* -- The JSON machine: one byte at a time, is this still a JSON prefix? --
 *
 * A pushdown automaton with a stack of open containers. Modes say what may
 * come next; numbers end at the first byte that cannot extend them, which
 * is then read as the next token of the structure. The top level must be
 * an object (json_object's contract). Strings take any byte >= 0x20 but
 * '"' and '\\'; escapes are the eight of RFC 8259 and \uXXXX. */

#define JM_DEPTH 32

enum jm_mode {
    JM_START,          /* nothing yet: '{' */
    JM_VALUE,          /* a value (after ':' or ',' in an array) */
    JM_VALUE_OR_END,   /* after '[': a value or ']' */
    JM_KEY_OR_END,     /* after '{': '"' or '}' */
    JM_KEY,            /* after ',' in an object: '"' */
    JM_COLON,          /* after a key */
    JM_AFTER,          /* after a value: ',' or the closer */
    JM_STRING, JM_ESCAPE, JM_HEX,
    JM_NUM_SIGN,       /* after '-': a digit */
    JM_NUM_ZERO,       /* "0": '.', 'e' or the end */
    JM_NUM_INT,        /* "[1-9][0-9]*" */
    JM_NUM_DOT,        /* after '.': a digit */
    JM_NUM_FRAC,
    JM_NUM_EXP,        /* after 'e': sign or digit */
    JM_NUM_EXP_SIGN,   /* after 'e+': a digit */
    JM_NUM_EXP_DIGITS,
    JM_LITERAL,        /* inside true / false / null */
    JM_DONE,           /* the top-level object is closed */
};

struct json_machine {
    enum jm_mode mode;
    bool key;               /* the string being read is a key */
    uint8_t hex;            /* \u digits still to come */
    const char *literal;    /* JM_LITERAL: the rest of the word */
    int depth;
    char stack[JM_DEPTH];   /* '{' or '[' */
};

static bool jm_is_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* After a value ends: the container decides what comes next. */
static void jm_value_done(struct json_machine *m) {
    m->mode = m->depth == 0 ? JM_DONE : JM_AFTER;
}

static bool jm_open(struct json_machine *m, char c) {
    if (m->depth == JM_DEPTH) return false;
    m->stack[m->depth++] = c;
    m->mode = c == '{' ? JM_KEY_OR_END : JM_VALUE_OR_END;
    return true;
}

static bool jm_close(struct json_machine *m, char c) {
    if (m->depth == 0 || m->stack[m->depth - 1] != (c == '}' ? '{' : '[')) return false;
    m->depth--;
    jm_value_done(m);
    return true;
}

/* The first byte of a value. */
static bool jm_value_start(struct json_machine *m, unsigned char c) {
    static const char *const words[] = {"true", "false", "null"};
    if (c == '{' || c == '[') return jm_open(m, (char)c);
    if (c == '"') {
        m->mode = JM_STRING;
        m->key = false;
        return true;
    }
    if (c == '-') return (m->mode = JM_NUM_SIGN), true;
    if (c == '0') return (m->mode = JM_NUM_ZERO), true;
    if (c >= '1' && c <= '9') return (m->mode = JM_NUM_INT), true;
    for (int k = 0; k < 3; k++)
        if (c == (unsigned char)words[k][0]) {
            m->mode = JM_LITERAL;
            m->literal = words[k] + 1;
            return true;
        }
    return false;
}

/* A byte that ends a number is read again as structure. */
static bool jm_feed(struct json_machine *m, unsigned char c);

static bool jm_number_end(struct json_machine *m, unsigned char c) {
    jm_value_done(m);
    return m->mode != JM_DONE && jm_feed(m, c);
}

static bool jm_feed_string(struct json_machine *m, unsigned char c) {
    switch (m->mode) {
    case JM_STRING:
        if (c == '"') {
            if (m->key) m->mode = JM_COLON;
            else jm_value_done(m);
        } else if (c == '\\') {
            m->mode = JM_ESCAPE;
        } else if (c < 0x20) {
            return false;
        }
        return true;
    case JM_ESCAPE:
        if (c == 'u') {
            m->mode = JM_HEX;
            m->hex = 4;
            return true;
        }
        m->mode = JM_STRING;
        return strchr("\"\\/bfnrt", c) != NULL && c != '\0';
    default: { /* JM_HEX (braces: a declaration after a label is C23, and clang 14 refuses it) */
        bool hex = (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'f');
        if (!hex) return false;
        if (--m->hex == 0) m->mode = JM_STRING;
        return true;
    }
    }
}

static bool jm_feed_number(struct json_machine *m, unsigned char c) {
    bool digit = c >= '0' && c <= '9';
    switch (m->mode) {
    case JM_NUM_SIGN:
        if (!digit) return false;
        m->mode = c == '0' ? JM_NUM_ZERO : JM_NUM_INT;
        return true;
    case JM_NUM_ZERO: case JM_NUM_INT: case JM_NUM_FRAC:
        if (digit && m->mode != JM_NUM_ZERO) return true;
        if (c == '.' && m->mode != JM_NUM_FRAC) return (m->mode = JM_NUM_DOT), true;
        if (c == 'e' || c == 'E') return (m->mode = JM_NUM_EXP), true;
        return jm_number_end(m, c);
    case JM_NUM_DOT:
        return digit && ((m->mode = JM_NUM_FRAC), true);
    case JM_NUM_EXP:
        if (c == '+' || c == '-') return (m->mode = JM_NUM_EXP_SIGN), true;
        return digit && ((m->mode = JM_NUM_EXP_DIGITS), true);
    case JM_NUM_EXP_SIGN:
        return digit && ((m->mode = JM_NUM_EXP_DIGITS), true);
    default:   /* JM_NUM_EXP_DIGITS */
        return digit || jm_number_end(m, c);
    }
}

/* Feed one byte; false if no JSON object starts with what was fed. */
static bool jm_feed(struct json_machine *m, unsigned char c) {
    if (m->mode >= JM_STRING && m->mode <= JM_HEX) return jm_feed_string(m, c);
    if (m->mode >= JM_NUM_SIGN && m->mode <= JM_NUM_EXP_DIGITS) return jm_feed_number(m, c);
    if (m->mode == JM_LITERAL) {
        if (c != (unsigned char)*m->literal) return false;
        if (*++m->literal == '\0') jm_value_done(m);
        return true;
    }
    if (jm_is_space(c)) return m->mode != JM_DONE;
    switch (m->mode) {
    case JM_START: return c == '{' && jm_open(m, '{');
    case JM_VALUE: return jm_value_start(m, c);
    case JM_VALUE_OR_END: return c == ']' ? jm_close(m, ']') : jm_value_start(m, c);
    case JM_KEY_OR_END: case JM_KEY:
        if (c == '}' && m->mode == JM_KEY_OR_END) return jm_close(m, '}');
        if (c != '"') return false;
        m->mode = JM_STRING;
        m->key = true;
        return true;
    case JM_COLON: return c == ':' && ((m->mode = JM_VALUE), true);
    case JM_AFTER:
        if (c == ',') {
            m->mode = m->stack[m->depth - 1] == '{' ? JM_KEY : JM_VALUE;
            return true;
        }
        return (c == '}' || c == ']') && jm_close(m, (char)c);
    default: return false;   /* JM_DONE */
    }
}

/* One byte that moves toward the shortest completion of the object:
 *
 *     start "{"   open '{' "}"   key "\"\"" then ":0"   string '"'
 *     escape 'n'  hex '0'        number: a digit if one is owed, else the closer
 *     literal: its next letter   after a value: the innermost closer */
static unsigned char jm_closing_byte(const struct json_machine *m) {
    char closer = m->depth > 0 && m->stack[m->depth - 1] == '[' ? ']' : '}';
    switch (m->mode) {
    case JM_START: return '{';
    case JM_VALUE: return '0';
    case JM_VALUE_OR_END: return ']';
    case JM_KEY_OR_END: return '}';
    case JM_KEY: case JM_STRING: return '"';
    case JM_COLON: return ':';
    case JM_ESCAPE: return 'n';
    case JM_HEX: return '0';
    case JM_NUM_SIGN: case JM_NUM_DOT: case JM_NUM_EXP: case JM_NUM_EXP_SIGN: return '0';
    case JM_LITERAL: return (unsigned char)*m->literal;
    default: return (unsigned char)closer;   /* after a value, or a complete number */
    }
}

/* The bytes of the shortest completion, written to out (cap bytes at most);
 * returns their count. */
static size_t jm_completion(const struct json_machine *m, char *out, size_t cap) {
    struct json_machine t = *m;
    size_t n = 0;
    while (t.mode != JM_DONE && n < cap) {
        unsigned char c = jm_closing_byte(&t);
        if (!jm_feed(&t, c)) break;
        out[n++] = (char)c;
    }
    return n;
}

/* Does a token's text keep the machine valid? (It is advanced if so.) */
static bool jm_feed_bytes(struct json_machine *m, const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!jm_feed(m, (unsigned char)s[i])) return false;
    return true;
}

/* -- The guide: the job's promises, checked around every step -- */

struct token_logprob {
    int32_t id;
    float logprob;
    int n_top;
    int32_t top_id[SERVER_MAX_TOP_LOGPROBS];
    float top_logprob[SERVER_MAX_TOP_LOGPROBS];
};

struct guide {
    int32_t *forced;            /* [n_forced] tokens to emit before sampling again */
    size_t n_forced, at_forced;
    bool call_opened;           /* the forced DSML opening was queued */
    bool name_open;             /* the invoke name is being written under the name mask */
    struct strbuf name;         /* its bytes so far */
    bool closer_queued;         /* parallel calls off: the block's close was queued */
    bool json_on;               /* the JSON machine is running (answer started) */
    struct json_machine jm;
    size_t script_at;           /* the next scripted token (13.7) */
    struct token_logprob *lp;   /* logprobs of the answer's tokens */
    size_t n_lp, cap_lp;
};

static void guide_free(struct guide *g) {
    free(g->forced);
    strbuf_free(&g->name);
    free(g->lp);
}

/* Does this job need the guided path at all? */
static bool guide_wanted(const struct gen_params *p) {
    bool calls = p->tools_on &&
                 (p->choice == CHOICE_REQUIRED || p->choice == CHOICE_NAMED || p->serial_tools);
    return calls || p->json_reply || p->presence_penalty != 0 || p->frequency_penalty != 0 ||
           p->logprobs;
}

static void guide_force_text(struct guide *g, const struct tokenizer *tok, const char *text) {
    int32_t *ids;
    size_t n;
    tokenize(tok, text, strlen(text), true, &ids, &n);
    g->forced = xrealloc(g->forced, (g->n_forced + n + 1) * sizeof *g->forced);
    memcpy(g->forced + g->n_forced, ids, n * sizeof *ids);
    g->n_forced += n;
    free(ids);
}

/* Is `name` + token text still a prefix of some declared `NAME">`? Sets
 * *complete when it is exactly one. */
static bool guide_name_fits(const struct strbuf *names, const char *named, const char *s, size_t n,
                            bool *complete) {
    *complete = false;
    bool any = false;
    for (size_t at = 0; at < names->len; at += strlen(names->data + at) + 1) {
        const char *cand = names->data + at;
        if (named && strcmp(cand, named) != 0) continue;
        size_t cl = strlen(cand);
        /* compare s[0..n) with cand + "\">" */
        bool ok = n <= cl + 2;
        for (size_t i = 0; ok && i < n; i++) ok = s[i] == (i < cl ? cand[i] : i == cl ? '"' : '>');
        if (ok) any = true;
        if (ok && n == cl + 2) *complete = true;
    }
    return any;
}

/* The answer has begun (chat mode: at once; thinking: after </think>). */
static bool guide_in_answer(const struct job *j) {
    return j->dsml.state == DSML_CONTENT;
}

/* Before a step: queue what the promises require now. */
static void guide_prepare(const struct tokenizer *tok, struct job *j) {
    struct guide *g = j->guide;
    const struct gen_params *p = &j->p;
    bool must_call = p->tools_on && (p->choice == CHOICE_REQUIRED || p->choice == CHOICE_NAMED);
    if (must_call && !g->call_opened && guide_in_answer(j) && j->content.len == 0 &&
        j->held.len == 0) {
        guide_force_text(g, tok, "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"");
        g->call_opened = true;
    }
    if (g->call_opened && !g->name_open && g->name.len == 0 && g->at_forced == g->n_forced &&
        j->dsml.state == DSML_TOOLS && !j->dsml.call_name && j->dsml.n_calls == 0) {
        g->name_open = true;
    }
    bool between =
        j->dsml.state == DSML_TOOLS && j->dsml.tool == DSML_AT_BETWEEN && j->dsml.n_calls > 0;
    if (p->serial_tools && between && !g->closer_queued && g->at_forced == g->n_forced) {
        bool nl = j->raw.len > 0 && j->raw.data[j->raw.len - 1] == '\n';
        guide_force_text(g, tok, nl ? "</｜DSML｜tool_calls>" : "\n</｜DSML｜tool_calls>");
        g->closer_queued = true;
    }
    if (p->json_reply && !g->json_on && guide_in_answer(j)) {
        memset(&g->jm, 0, sizeof g->jm);
        g->json_on = true;
    }
}

/* logit[t] -= c[t] * frequency + (c[t] > 0) * presence, over [V]. */
static void guide_penalize(const struct gen_params *p, const int32_t *count, float *logits, int V) {
    if (p->presence_penalty == 0 && p->frequency_penalty == 0) return;
    for (int t = 0; t < V; t++)
        if (count[t] > 0) logits[t] -= (float)count[t] * p->frequency_penalty + p->presence_penalty;
}

/* Token t's bytes, or NULL for special tokens and ids past the vocabulary. */
static const char *guide_plain_bytes(const struct tokenizer *tok, int32_t t, size_t *n) {
    if ((uint32_t)t >= tok->n_tokens || tok->special[t]) return NULL;
    return token_bytes(tok, t, n);
}

/* Can a JSON reply in state m still close in `room` tokens, EOS included?
 * Its shortest completion takes at most one token per byte. */
static bool jm_fits(const struct json_machine *m, int room) {
    char done[3 * JM_DEPTH + 16];
    if (m->mode == JM_DONE) return room >= 1;
    return (int)jm_completion(m, done, sizeof done) + 1 <= room;
}

/* The masks of the name and of the JSON machine, as -inf logits. A JSON
 * token must also leave room to close the object before the token limit
 * (`left` counts this step), so a reply cut by max_tokens is still JSON. */
static void guide_mask(const struct tokenizer *tok, const struct job *j, int left, float *logits,
                       int V) {
    const struct guide *g = j->guide;
    bool json = g->json_on && g->jm.mode != JM_DONE,
         json_done = g->json_on && g->jm.mode == JM_DONE;
    if (!g->name_open && !json && !json_done) return;
    char buf[512];
    for (int t = 0; t < V; t++) {
        size_t n = 0;
        const char *s = guide_plain_bytes(tok, t, &n);
        bool ok = false, complete;
        if (json_done) {
            ok = t == tok->sp.eos;
        } else if (s && g->name_open && g->name.len + n <= sizeof buf) {
            memcpy(buf, g->name.data ? g->name.data : "", g->name.len);
            memcpy(buf + g->name.len, s, n);
            const char *named = j->p.choice == CHOICE_NAMED ? j->p.choice_name : NULL;
            ok = n > 0 && guide_name_fits(&j->tt.names, named, buf, g->name.len + n, &complete);
        } else if (s && json) {
            struct json_machine m = g->jm;
            ok = n > 0 && jm_feed_bytes(&m, s, n) && jm_fits(&m, left - 1);
        }
        if (!ok) logits[t] = -INFINITY;
    }
}

/* The JSON budget: the token to force now, or -1. `left` counts this step. */
static int32_t guide_budget_token(const struct tokenizer *tok, const struct guide *g, int left) {
    if (!g->json_on || g->jm.mode == JM_DONE) return -1;
    char done[2 * JM_DEPTH + 16];
    size_t need = jm_completion(&g->jm, done, sizeof done);
    if (need == 0 || (size_t)left > need + 1) return -1;
    return tok->byte_token[(unsigned char)done[0]];
}

/* log softmax of logits[V] at `id`, and the n most likely alternatives. */
static void guide_logprob(const float *logits, int V, int32_t id, int n_top,
                          struct token_logprob *out) {
    float mx = -INFINITY;
    for (int t = 0; t < V; t++) mx = logits[t] > mx ? logits[t] : mx;
    double sum = 0;
    for (int t = 0; t < V; t++) sum += isinf(logits[t]) ? 0.0 : exp((double)logits[t] - mx);
    float lse = mx + (float)log(sum);
    out->id = id;
    out->logprob = logits[id] - lse;
    out->n_top = 0;
    /* The k-th best is the best below the (k-1)-th in the order (logit
     * descending, id ascending): one pass over the vocabulary each. */
    for (int k = 0; k < n_top; k++) {
        int best = -1, prev = k > 0 ? out->top_id[k - 1] : -1;
        for (int t = 0; t < V; t++) {
            if (isinf(logits[t])) continue;
            bool below =
                prev < 0 || logits[t] < logits[prev] || (logits[t] == logits[prev] && t > prev);
            if (below && (best < 0 || logits[t] > logits[best])) best = t;
        }
        if (best < 0) break;
        out->top_id[k] = best;
        out->top_logprob[k] = logits[best] - lse;
        out->n_top++;
    }
}

static void guide_record(struct guide *g, const struct token_logprob *lp) {
    if (g->n_lp == g->cap_lp) {
        g->cap_lp = g->cap_lp ? 2 * g->cap_lp : 64;
        g->lp = xrealloc(g->lp, g->cap_lp * sizeof *g->lp);
    }
    g->lp[g->n_lp++] = *lp;
}

/* One guided step: the token to emit. Forced tokens first, then the test
 * script, then the JSON budget, then a draw from the masked, penalized
 * logits. `left` is the tokens the reply may still have; `session_logits`
 * are the serving session's logits for the next token. */
static int32_t guide_step(struct server *srv, struct job *j, const struct script_rule *rule,
                          int left, const float *session_logits) {
    struct guide *g = j->guide;
    const struct tokenizer *tok = srv->tok;
    int V = srv->eng->model->cfg.vocab;
    float *logits = srv->guide_logits;
    guide_prepare(tok, j);
    memcpy(logits, session_logits, (size_t)V * sizeof(float));
    guide_penalize(&j->p, srv->token_count, logits, V);
    int32_t id = -1;
    if (g->at_forced < g->n_forced) id = g->forced[g->at_forced++];
    else if (rule) id = g->script_at < rule->n_ids ? rule->ids[g->script_at++] : tok->sp.eos;
    else id = guide_budget_token(tok, g, left);
    if (id < 0) {
        guide_mask(tok, j, left, logits, V);
        id = sample_token(&srv->sp, logits, V);
    }
    if (j->p.logprobs && guide_in_answer(j) && id != tok->sp.eos) {
        struct token_logprob lp;
        guide_logprob(logits, V, id, j->p.top_logprobs, &lp);
        guide_record(g, &lp);
    }
    return id;
}

/* After the token went through the parser: the state it leaves. */
static void guide_after(struct server *srv, struct job *j, int32_t id) {
    struct guide *g = j->guide;
    size_t n = 0;
    const char *s = token_bytes(srv->tok, id, &n);
    if ((uint32_t)id < (uint32_t)srv->eng->model->cfg.vocab) srv->token_count[id]++;
    if (!s) return;
    if (g->name_open) {
        bool complete = false;
        strbuf_append(&g->name, s, n);
        const char *named = j->p.choice == CHOICE_NAMED ? j->p.choice_name : NULL;
        guide_name_fits(&j->tt.names, named, g->name.data, g->name.len, &complete);
        if (complete) g->name_open = false;
    }
    if (g->json_on && g->jm.mode != JM_DONE && !jm_feed_bytes(&g->jm, s, n))
        g->jm.mode = JM_DONE;   /* a scripted reply left JSON: stop masking rather than fight it */
}

/* ---- 13.9 The reply in each dialect: streaming events and whole bodies ----- */

/* The worker reports what the model wrote as a handful of events, the same
 * for every dialect; a `struct dialect` turns them into that dialect's wire
 * format [API §2]:
 *
 *     begin        stream: the response head and the opening events
 *     reasoning    a piece of the thinking text
 *     content      a piece of the answer text
 *     call_start   tool call i has a name (its id is assigned)
 *     call_args    more bytes of call i's arguments (JSON text)
 *     call_end     call i is complete
 *     end          stream: the closing events, usage, the end of the body
 *     body         not streaming: the whole response object
 *
 * Streaming writers send each event at once; the non-streaming path only
 * calls `body` at the end, from what the job gathered. */

struct dialect {
    void (*begin)(struct job *j);
    void (*reasoning)(struct job *j, const char *s, size_t n);
    void (*content)(struct job *j, const char *s, size_t n);
    void (*call_start)(struct job *j, size_t i);
    void (*call_args)(struct job *j, size_t i, const char *s, size_t n);
    void (*call_end)(struct job *j, size_t i);
    void (*end)(struct job *j);
    void (*body)(struct job *j, struct strbuf *b);
};

static void put_str(struct strbuf *b, const char *s) {
    json_write_string(b, s, strlen(s));
}

static void put_buf(struct strbuf *b, const struct strbuf *s) {
    json_write_string(b, s->data ? s->data : "", s->len);
}

static const char *openai_finish(const struct job *j) {
    switch (j->finish) {
    case FINISH_LENGTH: return "length";
    case FINISH_TOOLS:  return "tool_calls";
    case FINISH_ERROR:  return "error";
    default:            return "stop";
    }
}

static void usage_openai(struct strbuf *b, const struct job *j) {
    strbuf_printf(b,
                  "{\"prompt_tokens\":%zu,\"completion_tokens\":%d,\"total_tokens\":%zu,"
                  "\"prompt_tokens_details\":{\"cached_tokens\":%lld},"
                  "\"completion_tokens_details\":{\"reasoning_tokens\":%d}}",
                  j->n_prompt, j->n_generated, j->n_prompt + (size_t)j->n_generated,
                  (long long)j->n_cached, j->n_reasoning);
}

/* -- OpenAI chat completions -- */

/* {"id":..,"object":"chat.completion.chunk",..,
 *  "choices":[{"index":0,"delta":DELTA,"finish_reason":F}]} */
static void chat_chunk(struct job *j, const char *delta, const char *finish) {
    struct strbuf b = {0};
    strbuf_printf(
        &b, "{\"id\":\"%s\",\"object\":\"chat.completion.chunk\",\"created\":%ld,\"model\":", j->id,
        j->created);
    put_str(&b, j->model);
    strbuf_printf(
        &b, ",\"choices\":[{\"index\":0,\"delta\":%s,\"logprobs\":null,\"finish_reason\":", delta);
    if (finish) put_str(&b, finish);
    else strbuf_puts(&b, "null");
    strbuf_puts(&b, "}]}");
    sse_send(j->conn, NULL, &b);
    strbuf_free(&b);
}

static void chat_begin(struct job *j) {
    http_stream_begin(j->conn);
    chat_chunk(j, "{\"role\":\"assistant\",\"content\":\"\"}", NULL);
}

static void chat_text_delta(struct job *j, const char *field, const char *s, size_t n) {
    struct strbuf d = {0};
    strbuf_printf(&d, "{\"%s\":", field);
    json_write_string(&d, s, n);
    strbuf_puts(&d, "}");
    chat_chunk(j, d.data, NULL);
    strbuf_free(&d);
}

static void chat_reasoning(struct job *j, const char *s, size_t n) {
    chat_text_delta(j, "reasoning_content", s, n);
}

static void chat_content(struct job *j, const char *s, size_t n) {
    chat_text_delta(j, "content", s, n);
}

static void chat_call_start(struct job *j, size_t i) {
    struct strbuf d = {0};
    strbuf_printf(&d,
                  "{\"tool_calls\":[{\"index\":%zu,\"id\":\"%s\",\"type\":\"function\","
                  "\"function\":{\"name\":",
                  i, j->calls[i].id);
    put_str(&d, j->calls[i].name);
    strbuf_puts(&d, ",\"arguments\":\"\"}}]}");
    chat_chunk(j, d.data, NULL);
    strbuf_free(&d);
}

static void chat_call_args(struct job *j, size_t i, const char *s, size_t n) {
    struct strbuf d = {0};
    strbuf_printf(&d, "{\"tool_calls\":[{\"index\":%zu,\"function\":{\"arguments\":", i);
    json_write_string(&d, s, n);
    strbuf_puts(&d, "}}]}");
    chat_chunk(j, d.data, NULL);
    strbuf_free(&d);
}

static void chat_call_end(struct job *j, size_t i) {
    (void)j;
    (void)i;
}

/* An error after the stream began can only travel inside the stream. */
static void openai_stream_error(struct job *j) {
    struct strbuf b = {0};
    api_error_json(&b, API_CHAT, 500, j->error, NULL, NULL, NULL);
    sse_send(j->conn, NULL, &b);
    strbuf_free(&b);
}

static void openai_usage_chunk(struct job *j, const char *object) {
    struct strbuf b = {0};
    strbuf_printf(&b, "{\"id\":\"%s\",\"object\":\"%s\",\"created\":%ld,\"model\":", j->id, object,
                  j->created);
    put_str(&b, j->model);
    strbuf_puts(&b, ",\"choices\":[],\"usage\":");
    usage_openai(&b, j);
    strbuf_puts(&b, "}");
    sse_send(j->conn, NULL, &b);
    strbuf_free(&b);
}

static void openai_stream_done(struct job *j) {
    static const char done[] = "data: [DONE]\n\n";
    http_chunk(j->conn, done, sizeof done - 1);
    http_stream_end(j->conn);
}

static void chat_end(struct job *j) {
    if (j->finish == FINISH_ERROR) openai_stream_error(j);
    else chat_chunk(j, "{}", openai_finish(j));
    if (j->p.include_usage) openai_usage_chunk(j, "chat.completion.chunk");
    openai_stream_done(j);
}

static void chat_tool_calls(struct strbuf *b, const struct job *j) {
    strbuf_puts(b, ",\"tool_calls\":[");
    for (size_t i = 0; i < j->n_calls; i++) {
        strbuf_printf(b, "%s{\"id\":\"%s\",\"type\":\"function\",\"function\":{\"name\":",
                      i ? "," : "", j->calls[i].id);
        put_str(b, j->calls[i].name);
        strbuf_puts(b, ",\"arguments\":");
        put_buf(b, &j->calls[i].args);
        strbuf_puts(b, "}}");
    }
    strbuf_puts(b, "]");
}

/* One token as OpenAI writes it in logprobs: its text, value and bytes
 * (the bytes matter when a token is part of a UTF-8 character). A masked
 * alternative has no value; OpenAI's stand-in for -inf is -9999. */
static void chat_logprob_token(struct strbuf *b, const struct tokenizer *tok, int32_t id,
                               float lp) {
    size_t n = 0;
    const char *s = token_bytes(tok, id, &n);
    strbuf_puts(b, "{\"token\":");
    json_write_string(b, s ? s : "", s ? n : 0);
    strbuf_printf(b, ",\"logprob\":%.6g,\"bytes\":[", isinf(lp) ? -9999.0 : (double)lp);
    for (size_t i = 0; s && i < n; i++) strbuf_printf(b, "%s%u", i ? "," : "", (unsigned char)s[i]);
    strbuf_puts(b, "]");
}

static void chat_logprobs(struct strbuf *b, const struct job *j) {
    const struct guide *g = j->guide;
    if (!j->p.logprobs || !g) {
        strbuf_puts(b, "null");
        return;
    }
    strbuf_puts(b, "{\"content\":[");
    for (size_t i = 0; i < g->n_lp; i++) {
        const struct token_logprob *lp = &g->lp[i];
        if (i > 0) strbuf_puts(b, ",");
        chat_logprob_token(b, j->conn->srv->tok, lp->id, lp->logprob);
        strbuf_puts(b, ",\"top_logprobs\":[");
        for (int k = 0; k < lp->n_top; k++) {
            if (k > 0) strbuf_puts(b, ",");
            chat_logprob_token(b, j->conn->srv->tok, lp->top_id[k], lp->top_logprob[k]);
            strbuf_puts(b, "}");
        }
        strbuf_puts(b, "]}");
    }
    strbuf_puts(b, "],\"refusal\":null}");
}

static void chat_body(struct job *j, struct strbuf *b) {
    strbuf_printf(b,
                  "{\"id\":\"%s\",\"object\":\"chat.completion\",\"created\":%ld,\"model\":", j->id,
                  j->created);
    put_str(b, j->model);
    strbuf_puts(b, ",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":");
    if (j->content.len == 0 && j->n_calls > 0) strbuf_puts(b, "null");
    else put_buf(b, &j->content);
    if (j->p.mode != CHAT_MODE_CHAT) {
        strbuf_puts(b, ",\"reasoning_content\":");
        put_buf(b, &j->reasoning);
    }
    if (j->n_calls > 0) chat_tool_calls(b, j);
    strbuf_puts(b, "},\"logprobs\":");
    chat_logprobs(b, j);
    strbuf_printf(b, ",\"finish_reason\":\"%s\"}],\"usage\":", openai_finish(j));
    usage_openai(b, j);
    strbuf_puts(b, "}");
}

static const struct dialect DIALECT_CHAT = {
    chat_begin,     chat_reasoning, chat_content, chat_call_start,
    chat_call_args, chat_call_end,  chat_end,     chat_body,
};

/* -- OpenAI legacy completions: the answer text only -- */

static void completion_chunk(struct job *j, const char *s, size_t n, const char *finish) {
    struct strbuf b = {0};
    strbuf_printf(&b,
                  "{\"id\":\"%s\",\"object\":\"text_completion\",\"created\":%ld,\"model\":", j->id,
                  j->created);
    put_str(&b, j->model);
    strbuf_puts(&b, ",\"choices\":[{\"index\":0,\"text\":");
    json_write_string(&b, s, n);
    strbuf_puts(&b, ",\"logprobs\":null,\"finish_reason\":");
    if (finish) put_str(&b, finish);
    else strbuf_puts(&b, "null");
    strbuf_puts(&b, "}]}");
    sse_send(j->conn, NULL, &b);
    strbuf_free(&b);
}

static void completion_begin(struct job *j) {
    http_stream_begin(j->conn);
}

static void completion_ignore_text(struct job *j, const char *s, size_t n) {
    (void)j, (void)s, (void)n;
}

static void completion_content(struct job *j, const char *s, size_t n) {
    completion_chunk(j, s, n, NULL);
}

static void completion_ignore_call(struct job *j, size_t i) {
    (void)j, (void)i;
}

static void completion_ignore_args(struct job *j, size_t i, const char *s, size_t n) {
    (void)j, (void)i, (void)s, (void)n;
}

static void completion_end(struct job *j) {
    if (j->finish == FINISH_ERROR) openai_stream_error(j);
    else completion_chunk(j, "", 0, openai_finish(j));
    if (j->p.include_usage) openai_usage_chunk(j, "text_completion");
    openai_stream_done(j);
}

static void completion_body(struct job *j, struct strbuf *b) {
    strbuf_printf(b,
                  "{\"id\":\"%s\",\"object\":\"text_completion\",\"created\":%ld,\"model\":", j->id,
                  j->created);
    put_str(b, j->model);
    strbuf_puts(b, ",\"choices\":[{\"index\":0,\"text\":");
    put_buf(b, &j->content);
    strbuf_printf(b, ",\"logprobs\":null,\"finish_reason\":\"%s\"}],\"usage\":", openai_finish(j));
    usage_openai(b, j);
    strbuf_puts(b, "}");
}

static const struct dialect DIALECT_COMPLETIONS = {
    completion_begin, completion_ignore_text, completion_content, completion_ignore_call,
    completion_ignore_args, completion_ignore_call, completion_end, completion_body,
};

/* -- Anthropic Messages -- */

/* Anthropic counts cached prompt tokens apart: input_tokens is only the part
 * that was processed now, so input + cache_read is the whole prompt. */
static void usage_anthropic(struct strbuf *b, const struct job *j) {
    strbuf_printf(b,
                  "{\"input_tokens\":%lld,\"output_tokens\":%d,\"cache_read_input_tokens\":%lld,"
                  "\"cache_creation_input_tokens\":0}",
                  (long long)j->n_prompt - (long long)j->n_cached, j->n_generated,
                  (long long)j->n_cached);
}

static void anthropic_stop_reason(struct strbuf *b, const struct job *j) {
    const char *reason = j->finish == FINISH_LENGTH ? "max_tokens"
                       : j->finish == FINISH_TOOLS  ? "tool_use"
                       : j->stop_hit                ? "stop_sequence"
                                                    : "end_turn";
    strbuf_printf(b, "\"stop_reason\":\"%s\",\"stop_sequence\":", reason);
    if (j->stop_hit) put_str(b, j->stop_hit);
    else strbuf_puts(b, "null");
}

static void anthropic_event(struct job *j, const char *event, const struct strbuf *b) {
    sse_send(j->conn, event, b);
}

static void anthropic_begin(struct job *j) {
    struct strbuf b = {0};
    http_stream_begin(j->conn);
    strbuf_printf(&b, "{\"type\":\"message_start\",\"message\":{\"id\":\"%s\",\"type\":\"message\","
                      "\"role\":\"assistant\",\"model\":", j->id);
    put_str(&b, j->model);
    strbuf_puts(&b, ",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":");
    usage_anthropic(&b, j);
    strbuf_puts(&b, "}}");
    anthropic_event(j, "message_start", &b);
    strbuf_free(&b);
}

/* Close the open block. A thinking block gets its signature first; ours is
 * the message id (there is nothing to verify, but clients expect one). */
static void anthropic_close_block(struct job *j) {
    struct strbuf b = {0};
    if (j->block == BLOCK_NONE) return;
    if (j->block == BLOCK_THINKING) {
        strbuf_printf(&b,
                      "{\"type\":\"content_block_delta\",\"index\":%d,\"delta\":{\"type\":"
                      "\"signature_delta\","
                      "\"signature\":\"%s\"}}",
                      j->n_blocks - 1, j->id);
        anthropic_event(j, "content_block_delta", &b);
        b.len = 0;
    }
    strbuf_printf(&b, "{\"type\":\"content_block_stop\",\"index\":%d}", j->n_blocks - 1);
    anthropic_event(j, "content_block_stop", &b);
    j->block = BLOCK_NONE;
    strbuf_free(&b);
}

/* Open a block of `kind` unless one is open already; `start` is its
 * content_block object. */
static void anthropic_open_block(struct job *j, enum block_kind kind, const char *start) {
    struct strbuf b = {0};
    if (j->block == kind && kind != BLOCK_TOOL) return;
    anthropic_close_block(j);
    strbuf_printf(&b, "{\"type\":\"content_block_start\",\"index\":%d,\"content_block\":%s}",
                  j->n_blocks++, start);
    anthropic_event(j, "content_block_start", &b);
    j->block = kind;
    strbuf_free(&b);
}

static void anthropic_delta(struct job *j, const char *type, const char *field, const char *s,
                            size_t n) {
    struct strbuf b = {0};
    strbuf_printf(
        &b, "{\"type\":\"content_block_delta\",\"index\":%d,\"delta\":{\"type\":\"%s\",\"%s\":",
        j->n_blocks - 1, type, field);
    json_write_string(&b, s, n);
    strbuf_puts(&b, "}}");
    anthropic_event(j, "content_block_delta", &b);
    strbuf_free(&b);
}

static void anthropic_reasoning(struct job *j, const char *s, size_t n) {
    anthropic_open_block(j, BLOCK_THINKING,
                         "{\"type\":\"thinking\",\"thinking\":\"\",\"signature\":\"\"}");
    anthropic_delta(j, "thinking_delta", "thinking", s, n);
}

static void anthropic_content(struct job *j, const char *s, size_t n) {
    anthropic_open_block(j, BLOCK_TEXT, "{\"type\":\"text\",\"text\":\"\"}");
    anthropic_delta(j, "text_delta", "text", s, n);
}

static void anthropic_call_start(struct job *j, size_t i) {
    struct strbuf start = {0};
    strbuf_printf(&start, "{\"type\":\"tool_use\",\"id\":\"%s\",\"name\":", j->calls[i].id);
    put_str(&start, j->calls[i].name);
    strbuf_puts(&start, ",\"input\":{}}");
    anthropic_open_block(j, BLOCK_TOOL, start.data);
    strbuf_free(&start);
}

static void anthropic_call_args(struct job *j, size_t i, const char *s, size_t n) {
    (void)i;
    anthropic_delta(j, "input_json_delta", "partial_json", s, n);
}

static void anthropic_call_end(struct job *j, size_t i) {
    (void)i;
    anthropic_close_block(j);
}

static void anthropic_end(struct job *j) {
    struct strbuf b = {0};
    if (j->finish == FINISH_ERROR) {
        api_error_json(&b, API_MESSAGES, 500, j->error, NULL, NULL, NULL);
        anthropic_event(j, "error", &b);
    } else {
        /* Reasoning alone would leave the client with no text block at all. */
        if (j->content.len == 0 && j->n_calls == 0)
            anthropic_open_block(j, BLOCK_TEXT, "{\"type\":\"text\",\"text\":\"\"}");
        anthropic_close_block(j);
        strbuf_puts(&b, "{\"type\":\"message_delta\",\"delta\":{");
        anthropic_stop_reason(&b, j);
        strbuf_printf(&b, "},\"usage\":{\"output_tokens\":%d}}", j->n_generated);
        anthropic_event(j, "message_delta", &b);
        b.len = 0;
        strbuf_puts(&b, "{\"type\":\"message_stop\"}");
        anthropic_event(j, "message_stop", &b);
    }
    http_stream_end(j->conn);
    strbuf_free(&b);
}

/* A tool_use block's "input" must be an object. Arguments the model wrote
 * as broken JSON are passed on as {"arguments": "<the text>"}. */
static void anthropic_input(struct strbuf *b, const struct strbuf *args) {
    char err[8];
    struct json *obj =
        json_parse(args->data ? args->data : "", args->len, JSON_DEPTH_CEILING, err, sizeof err);
    if (json_is(obj, JSON_OBJECT)) {
        json_write(b, obj);
    } else {
        strbuf_puts(b, "{\"arguments\":");
        put_buf(b, args);
        strbuf_puts(b, "}");
    }
    json_free(obj);
}

static void anthropic_body(struct job *j, struct strbuf *b) {
    bool first = true;
    strbuf_printf(b,
                  "{\"id\":\"%s\",\"type\":\"message\",\"role\":\"assistant\",\"model\":", j->id);
    put_str(b, j->model);
    strbuf_puts(b, ",\"content\":[");
    if (j->reasoning.len > 0) {
        strbuf_puts(b, "{\"type\":\"thinking\",\"thinking\":");
        put_buf(b, &j->reasoning);
        strbuf_printf(b, ",\"signature\":\"%s\"}", j->id);
        first = false;
    }
    if (j->content.len > 0 || j->n_calls == 0) {
        strbuf_puts(b, first ? "{\"type\":\"text\",\"text\":" : ",{\"type\":\"text\",\"text\":");
        put_buf(b, &j->content);
        strbuf_puts(b, "}");
        first = false;
    }
    for (size_t i = 0; i < j->n_calls; i++) {
        strbuf_printf(b, "%s{\"type\":\"tool_use\",\"id\":\"%s\",\"name\":", first ? "" : ",",
                      j->calls[i].id);
        put_str(b, j->calls[i].name);
        strbuf_puts(b, ",\"input\":");
        anthropic_input(b, &j->calls[i].args);
        strbuf_puts(b, "}");
        first = false;
    }
    strbuf_puts(b, "],");
    anthropic_stop_reason(b, j);
    strbuf_puts(b, ",\"usage\":");
    usage_anthropic(b, j);
    strbuf_puts(b, "}");
}

static const struct dialect DIALECT_MESSAGES = {
    anthropic_begin,     anthropic_reasoning, anthropic_content, anthropic_call_start,
    anthropic_call_args, anthropic_call_end,  anthropic_end,     anthropic_body,
};

/* -- OpenAI Responses -- */

static void usage_responses(struct strbuf *b, const struct job *j) {
    strbuf_printf(b, "{\"input_tokens\":%zu,\"input_tokens_details\":{\"cached_tokens\":%lld},"
                     "\"output_tokens\":%d,\"output_tokens_details\":{\"reasoning_tokens\":%d},"
                     "\"total_tokens\":%zu}",
                  j->n_prompt, (long long)j->n_cached, j->n_generated, j->n_reasoning,
                  j->n_prompt + (size_t)j->n_generated);
}

/* The output items, in the order the stream opened them: reasoning, the
 * message, the calls. `status` is that of the message item. */
static void responses_reasoning_item(struct strbuf *b, const struct job *j) {
    strbuf_printf(
        b,
        "{\"id\":\"%s\",\"type\":\"reasoning\",\"summary\":[{\"type\":\"summary_text\",\"text\":",
        j->rs_id);
    put_buf(b, &j->reasoning);
    strbuf_puts(b, "}]}");
}

static void responses_message_item(struct strbuf *b, const struct job *j, const char *status) {
    strbuf_printf(b, "{\"id\":\"%s\",\"type\":\"message\",\"status\":\"%s\",\"role\":\"assistant\","
                     "\"content\":[{\"type\":\"output_text\",\"text\":", j->msg_id, status);
    put_buf(b, &j->content);
    strbuf_puts(b, ",\"annotations\":[]}]}");
}

/* A custom tool's free-form input: the "input" string of the call's
 * arguments (it was shown to the model as that one parameter, 13.5). */
static void custom_input(const struct job_call *c, struct strbuf *out) {
    char err[8];
    struct json *args =
        c->args.data ? json_parse(c->args.data, c->args.len, 8, err, sizeof err) : NULL;
    const struct json *in = json_get(args, "input");
    if (json_is(in, JSON_STRING)) strbuf_append(out, in->string, in->len);
    else if (c->args.data) strbuf_append(out, c->args.data, c->args.len);
    json_free(args);
}

static void responses_call_item(struct strbuf *b, const struct job_call *c, const char *status) {
    strbuf_printf(b,
                  "{\"id\":\"%s\",\"type\":\"%s\",\"status\":\"%s\",\"call_id\":\"%s\",\"name\":",
                  c->item_id, c->custom ? "custom_tool_call" : "function_call", status, c->id);
    put_str(b, c->name + c->ns_len);
    if (c->ns_len > 0) {
        strbuf_puts(b, ",\"namespace\":");
        json_write_string(b, c->name, c->ns_len - 1);
    }
    if (c->custom) {
        struct strbuf in = {0};
        custom_input(c, &in);
        strbuf_puts(b, ",\"input\":");
        put_buf(b, &in);
        strbuf_free(&in);
    } else {
        strbuf_puts(b, ",\"arguments\":");
        put_buf(b, &c->args);
    }
    strbuf_puts(b, "}");
}

/* The response object: in_progress at the start, then completed,
 * incomplete (the token limit) or failed. */
static void responses_object(struct strbuf *b, const struct job *j, const char *status,
                             bool with_output) {
    strbuf_printf(
        b, "{\"id\":\"%s\",\"object\":\"response\",\"created_at\":%ld,\"status\":\"%s\",\"model\":",
        j->id, j->created, status);
    put_str(b, j->model);
    strbuf_puts(b, ",\"output\":[");
    bool first = true;
    if (with_output && j->reasoning.len > 0) {
        responses_reasoning_item(b, j);
        first = false;
    }
    if (with_output && j->content.len > 0) {
        if (!first) strbuf_puts(b, ",");
        responses_message_item(b, j, "completed");
        first = false;
    }
    for (size_t i = 0; with_output && i < j->n_calls; i++) {
        if (!first) strbuf_puts(b, ",");
        responses_call_item(b, &j->calls[i], "completed");
        first = false;
    }
    strbuf_puts(b,
                "],\"parallel_tool_calls\":true,\"tool_choice\":\"auto\",\"tools\":[],\"error\":");
    if (strcmp(status, "failed") == 0) {
        strbuf_puts(b, "{\"code\":\"server_error\",\"message\":");
        put_str(b, j->error);
        strbuf_puts(b, "}");
    } else {
        strbuf_puts(b, "null");
    }
    strbuf_puts(b, ",\"incomplete_details\":");
    strbuf_puts(b,
                strcmp(status, "incomplete") == 0 ? "{\"reason\":\"max_output_tokens\"}" : "null");
    strbuf_puts(b, ",\"usage\":");
    if (with_output) usage_responses(b, j);
    else strbuf_puts(b, "null");
    strbuf_puts(b, "}");
}

/* Every event: {"type":T,"sequence_number":N, FIELDS}. */
static void responses_event(struct job *j, const char *type, const char *fields) {
    struct strbuf b = {0};
    strbuf_printf(&b, "{\"type\":\"%s\",\"sequence_number\":%d,%s}", type, j->seq++, fields);
    sse_send(j->conn, type, &b);
    strbuf_free(&b);
}

/* output_item.added / .done around an item written by `item`. */
static void responses_item_event(struct job *j, const char *type, int index,
                                 const struct strbuf *item) {
    struct strbuf f = {0};
    strbuf_printf(&f, "\"output_index\":%d,\"item\":%s", index, item->data);
    responses_event(j, type, f.data);
    strbuf_free(&f);
}

static void responses_begin(struct job *j) {
    struct strbuf f = {0};
    http_stream_begin(j->conn);
    strbuf_puts(&f, "\"response\":");
    responses_object(&f, j, "in_progress", false);
    responses_event(j, "response.created", f.data);
    responses_event(j, "response.in_progress", f.data);
    strbuf_free(&f);
}

static void responses_close_reasoning(struct job *j) {
    struct strbuf f = {0}, item = {0};
    if (j->rs_index < 0) return;
    strbuf_printf(&f,
                  "\"item_id\":\"%s\",\"output_index\":%d,\"summary_index\":0,\"text\":", j->rs_id,
                  j->rs_index);
    put_buf(&f, &j->reasoning);
    responses_event(j, "response.reasoning_summary_text.done", f.data);
    f.len = 0;
    strbuf_printf(&f, "\"item_id\":\"%s\",\"output_index\":%d,\"summary_index\":0,"
                      "\"part\":{\"type\":\"summary_text\",\"text\":", j->rs_id, j->rs_index);
    put_buf(&f, &j->reasoning);
    strbuf_puts(&f, "}");
    responses_event(j, "response.reasoning_summary_part.done", f.data);
    responses_reasoning_item(&item, j);
    responses_item_event(j, "response.output_item.done", j->rs_index, &item);
    j->rs_index = -1;
    strbuf_free(&f);
    strbuf_free(&item);
}

static void responses_close_message(struct job *j) {
    struct strbuf f = {0}, item = {0};
    if (j->msg_index < 0) return;
    strbuf_printf(&f,
                  "\"item_id\":\"%s\",\"output_index\":%d,\"content_index\":0,\"text\":", j->msg_id,
                  j->msg_index);
    put_buf(&f, &j->content);
    responses_event(j, "response.output_text.done", f.data);
    f.len = 0;
    strbuf_printf(&f, "\"item_id\":\"%s\",\"output_index\":%d,\"content_index\":0,"
                      "\"part\":{\"type\":\"output_text\",\"text\":", j->msg_id, j->msg_index);
    put_buf(&f, &j->content);
    strbuf_puts(&f, ",\"annotations\":[]}");
    responses_event(j, "response.content_part.done", f.data);
    responses_message_item(&item, j, "completed");
    responses_item_event(j, "response.output_item.done", j->msg_index, &item);
    j->msg_index = -1;
    strbuf_free(&f);
    strbuf_free(&item);
}

static void responses_reasoning(struct job *j, const char *s, size_t n) {
    struct strbuf f = {0};
    if (j->rs_index < 0) {
        j->rs_index = j->n_items++;
        strbuf_printf(&f, "{\"id\":\"%s\",\"type\":\"reasoning\",\"summary\":[]}", j->rs_id);
        responses_item_event(j, "response.output_item.added", j->rs_index, &f);
        f.len = 0;
        strbuf_printf(&f,
                      "\"item_id\":\"%s\",\"output_index\":%d,\"summary_index\":0,"
                      "\"part\":{\"type\":\"summary_text\",\"text\":\"\"}",
                      j->rs_id, j->rs_index);
        responses_event(j, "response.reasoning_summary_part.added", f.data);
        f.len = 0;
    }
    strbuf_printf(&f,
                  "\"item_id\":\"%s\",\"output_index\":%d,\"summary_index\":0,\"delta\":", j->rs_id,
                  j->rs_index);
    json_write_string(&f, s, n);
    responses_event(j, "response.reasoning_summary_text.delta", f.data);
    strbuf_free(&f);
}

static void responses_content(struct job *j, const char *s, size_t n) {
    struct strbuf f = {0};
    responses_close_reasoning(j);
    if (j->msg_index < 0) {
        j->msg_index = j->n_items++;
        strbuf_printf(
            &f,
            "{\"id\":\"%s\",\"type\":\"message\",\"status\":\"in_progress\",\"role\":\"assistant\","
            "\"content\":[]}",
            j->msg_id);
        responses_item_event(j, "response.output_item.added", j->msg_index, &f);
        f.len = 0;
        strbuf_printf(&f,
                      "\"item_id\":\"%s\",\"output_index\":%d,\"content_index\":0,"
                      "\"part\":{\"type\":\"output_text\",\"text\":\"\",\"annotations\":[]}",
                      j->msg_id, j->msg_index);
        responses_event(j, "response.content_part.added", f.data);
        f.len = 0;
    }
    strbuf_printf(&f, "\"item_id\":\"%s\",\"output_index\":%d,\"content_index\":0,\"delta\":",
                  j->msg_id, j->msg_index);
    json_write_string(&f, s, n);
    responses_event(j, "response.output_text.delta", f.data);
    strbuf_free(&f);
}

static void responses_call_start(struct job *j, size_t i) {
    struct strbuf item = {0};
    responses_close_reasoning(j);
    responses_close_message(j);
    j->calls[i].out_index = j->n_items++;
    responses_call_item(&item, &j->calls[i], "in_progress");
    responses_item_event(j, "response.output_item.added", j->calls[i].out_index, &item);
    strbuf_free(&item);
}

/* Codex reads the arguments from output_item.done, so they go out whole,
 * in one delta, once the call is complete [API §2.3]. */
static void responses_call_end(struct job *j, size_t i) {
    struct job_call *c = &j->calls[i];
    struct strbuf f = {0}, item = {0};
    if (c->custom) {
        struct strbuf in = {0};
        custom_input(c, &in);
        strbuf_printf(&f, "\"item_id\":\"%s\",\"output_index\":%d,\"delta\":", c->item_id,
                      c->out_index);
        put_buf(&f, &in);
        responses_event(j, "response.custom_tool_call_input.delta", f.data);
        f.len = 0;
        strbuf_printf(&f, "\"item_id\":\"%s\",\"output_index\":%d,\"input\":", c->item_id,
                      c->out_index);
        put_buf(&f, &in);
        responses_event(j, "response.custom_tool_call_input.done", f.data);
        strbuf_free(&in);
        responses_call_item(&item, c, "completed");
        responses_item_event(j, "response.output_item.done", c->out_index, &item);
        strbuf_free(&f);
        strbuf_free(&item);
        return;
    }
    strbuf_printf(&f, "\"item_id\":\"%s\",\"output_index\":%d,\"delta\":", c->item_id,
                  c->out_index);
    put_buf(&f, &c->args);
    responses_event(j, "response.function_call_arguments.delta", f.data);
    f.len = 0;
    strbuf_printf(&f, "\"item_id\":\"%s\",\"output_index\":%d,\"arguments\":", c->item_id,
                  c->out_index);
    put_buf(&f, &c->args);
    responses_event(j, "response.function_call_arguments.done", f.data);
    responses_call_item(&item, c, "completed");
    responses_item_event(j, "response.output_item.done", c->out_index, &item);
    strbuf_free(&f);
    strbuf_free(&item);
}

static void responses_end(struct job *j) {
    struct strbuf f = {0};
    const char *status = j->finish == FINISH_ERROR    ? "failed"
                         : j->finish == FINISH_LENGTH ? "incomplete"
                                                      : "completed";
    responses_close_reasoning(j);
    responses_close_message(j);
    strbuf_puts(&f, "\"response\":");
    responses_object(&f, j, status, true);
    char type[40];
    snprintf(type, sizeof type, "response.%s", status);
    responses_event(j, type, f.data);
    http_stream_end(j->conn);
    strbuf_free(&f);
}

static void responses_body(struct job *j, struct strbuf *b) {
    responses_object(b, j, j->finish == FINISH_LENGTH ? "incomplete" : "completed", true);
}

static const struct dialect DIALECT_RESPONSES = {
    responses_begin,        responses_reasoning, responses_content, responses_call_start,
    completion_ignore_args, responses_call_end,  responses_end,     responses_body,
};

static const struct dialect *dialect_of(enum api_kind api) {
    switch (api) {
    case API_COMPLETIONS: return &DIALECT_COMPLETIONS;
    case API_MESSAGES:    return &DIALECT_MESSAGES;
    case API_RESPONSES:   return &DIALECT_RESPONSES;
    default:              return &DIALECT_CHAT;
    }
}

/* ---- 13.10 The worker: prefix reuse, prefill, decode, DSML, stop strings ---- */

/* PREFIX REUSE. The session holds the tokens `fed`, in order: the last
 * prompt and the reply sampled after it. An agent's next request is
 * normally that same text plus a tool result or a user message, so its
 * tokens start with `fed`, and only the new tail needs a forward pass:
 *
 *     fed      [ prompt 1 ............ | reply 1 ....... ]
 *     prompt 2 [ prompt 1 ............ | reply 1 ....... | tool result ... ]
 *                 reused: reported as cached tokens        prefilled
 *
 * A prompt that leaves `fed` before its end is served from a checkpoint,
 * another session or the disk (below). Reply tokens are fed
 * too (each sampled token must go through the model anyway to get the next
 * one), except EOS, which the next prompt renders in the same place.
 *
 * SESSIONS ON DISK (--kv-disk-dir, chapter 12). Starting over need not
 * mean starting from nothing:
 *
 *     a session is given up   -> save it (evict), if >= 512 tokens
 *     prompt text             -> longest saved prefix: load it, report its
 *                                tokens as cached, prefill only the rest
 *     full miss               -> prefill, saving at the cold point
 *     every 10240 tokens      -> save (continued)
 *     SIGINT / SIGTERM        -> save every session in memory (shutdown)
 *
 * So a restarted server, or one that served another client in between,
 * answers an agent's next turn from disk. The lookup is by rendered text,
 * and after a hit the job's prompt is the cached tokens plus the rest of
 * the text tokenized alone (12.9.1). */

/* SEVERAL SESSIONS, AND REWINDS. Agents do not send one conversation in a
 * straight line. opencode sends a small title request between two turns of
 * its main conversation; a retry resends the prompt the session has already
 * generated past; an edited turn changes the middle. So the worker keeps
 * several sessions (slots, --sessions N) and, in each, checkpoints (12.11)
 * at every multiple of K = --checkpoint-every prompt tokens and at the end
 * of every prompt. For a new prompt each slot offers
 *
 *     its whole token list, if that is a prefix of the prompt  (extend)
 *     else its last checkpoint inside the common prefix         (rewind)
 *     else nothing
 *
 * and the job takes the slot that offers the most tokens:
 *
 *     extend        run in that slot, prefill the rest
 *     rewind        copy the slot into the least recently used one (a fork,
 *                   so the conversation it held stays whole for its next
 *                   turn), restore the checkpoint there, prefill the rest;
 *                   in place if only the last reply is lost (a retry), or
 *                   with --sessions 1
 *     nothing       give the least recently used slot (an empty one first)
 *                   to the job; with --kv-disk-dir its session is saved to
 *                   disk first (evict) and the prompt is looked up there
 *
 * A rewind restores the nearest checkpoint AT OR BELOW the common prefix and
 * re-feeds from there: the window ring and the compressor frontiers cannot
 * be truncated (12.11). A prompt sent twice hits its own prompt-end
 * checkpoint and prefills nothing. `n_cached` -- the `cached_tokens` of
 * every API -- is exactly the number of prompt tokens not fed again.
 *
 * The prefill cuts its chunks at multiples of --chunk counted from position
 * 0 (and at the checkpoints), so a rewound session re-feeds with the chunk
 * boundaries a fresh session has: the matmul path depends on the chunk
 * length (6.1), and this way a rewound session computes the same bits as a
 * fresh one fed the same prompt. Decoded tokens get no checkpoints (the
 * generator advances by one or several tokens); the prompt-end checkpoint
 * is where a reply begins.
 *
 * SIZE. A session at full context costs, as float32, what
 * snapshot_f32_bytes() counts, plus its checkpoints (a window of rows per
 * layer and the logits, about ctx/K + 4 of them). The default N is as many
 * such sessions as fit in half of MemAvailable at start, at least 1, at most
 * 4 (a main conversation, its side requests, a fork or two). */

struct cache_slot {
    struct session s;
    int32_t *fed;                 /* [n_fed] tokens in the session, in order */
    int64_t n_fed, cap_fed;
    struct mem_checkpoint *cps;   /* [n_cps], by position, all <= n_fed */
    int n_cps, cap_cps;
    int64_t prompt_end;           /* where the last prompt ended: after it, only a reply */
    uint64_t last_used;           /* srv->clock when it last served a job */
};

enum { CACHE_PROMPT_END_CHECKPOINTS = 4, CACHE_DEFAULT_MAX_SESSIONS = 4 };

static void slot_drop_checkpoints_after(struct cache_slot *sl, int64_t pos) {
    while (sl->n_cps > 0 && sl->cps[sl->n_cps - 1].pos > pos)
        checkpoint_release(&sl->cps[--sl->n_cps]);
}

static void slot_free(struct cache_slot *sl) {
    slot_drop_checkpoints_after(sl, -1);
    free(sl->cps);
    free(sl->fed);
    session_free(&sl->s);
}

static void slot_reset(struct server *srv, struct cache_slot *sl) {
    session_free(&sl->s);
    session_init(&sl->s, srv->eng);
    sl->n_fed = 0;
    sl->prompt_end = 0;
    slot_drop_checkpoints_after(sl, -1);
}

static void slot_push_token(struct cache_slot *sl, int32_t id) {
    if (sl->n_fed == sl->cap_fed) {
        sl->cap_fed = sl->cap_fed ? 2 * sl->cap_fed : 4096;
        sl->fed = xrealloc(sl->fed, (size_t)sl->cap_fed * sizeof(int32_t));
    }
    sl->fed[sl->n_fed++] = id;
}

static void worker_remember(struct server *srv, int32_t id) {
    slot_push_token(srv->cur, id);
}

static void worker_reset_session(struct server *srv) {
    slot_reset(srv, srv->cur);
}

/* Keep the grid checkpoints (multiples of K) and the last few others. */
static void slot_prune(struct cache_slot *sl, int every) {
    int off_grid = 0, oldest = -1;
    for (int i = 0; i < sl->n_cps; i++)
        if (every <= 0 || sl->cps[i].pos % every != 0) {
            if (oldest < 0) oldest = i;
            off_grid++;
        }
    if (off_grid <= CACHE_PROMPT_END_CHECKPOINTS) return;
    checkpoint_release(&sl->cps[oldest]);
    memmove(&sl->cps[oldest], &sl->cps[oldest + 1],
            (size_t)(sl->n_cps - oldest - 1) * sizeof *sl->cps);
    sl->n_cps--;
}

/* A checkpoint of the current slot at its position, unless it has one. */
static void worker_checkpoint(struct server *srv) {
    struct cache_slot *sl = srv->cur;
    if (sl->s.pos < 1 || sl->s.pos != sl->n_fed) return;
    if (sl->n_cps > 0 && sl->cps[sl->n_cps - 1].pos >= sl->s.pos) return;
    if (sl->n_cps == sl->cap_cps) {
        sl->cap_cps = sl->cap_cps ? 2 * sl->cap_cps : 16;
        sl->cps = xrealloc(sl->cps, (size_t)sl->cap_cps * sizeof *sl->cps);
    }
    checkpoint_encode(&sl->cps[sl->n_cps++], &sl->s, sl->fed);
    slot_prune(sl, srv->opt->checkpoint_every);
}

/* What slot sl offers the job: all of its tokens when they are a prefix of
 * the prompt (*cp = -1), else its last checkpoint inside the common prefix
 * (*cp = its index), else 0. */
static int64_t slot_offer(const struct cache_slot *sl, const struct job *j, int *cp) {
    int64_t same = 0;
    int64_t n = (int64_t)j->n_prompt;
    while (same < n && same < sl->n_fed && sl->fed[same] == j->prompt[same]) same++;
    *cp = -1;
    if (same == sl->n_fed) return same;
    for (int i = sl->n_cps - 1; i >= 0; i--)
        if (sl->cps[i].pos <= same) {
            *cp = i;
            return sl->cps[i].pos;
        }
    return 0;
}

/* Give up a slot: its session goes to disk first (evict), if worth it. */
static void worker_evict(struct server *srv, struct cache_slot *sl) {
    if (srv->kv_on && sl->n_fed > 0)
        kv_store_save_live(&srv->kv, &srv->kv_policy, &sl->s, srv->tok, sl->fed, sl->n_fed,
                           KV_REASON_EVICT);
    slot_reset(srv, sl);
}

/* Empty slots sort first, then by last use. */
static uint64_t slot_age(const struct cache_slot *sl) {
    return sl->n_fed == 0 ? 0 : sl->last_used + 1;
}

/* The slot for a new conversation or a fork: an empty one, else the least
 * recently used, never `keep`; emptied. */
static struct cache_slot *worker_victim(struct server *srv, const struct cache_slot *keep) {
    struct cache_slot *v = NULL;
    for (int i = 0; i < srv->n_slots; i++) {
        struct cache_slot *sl = &srv->slots[i];
        if (sl == keep) continue;
        if (!v || slot_age(sl) < slot_age(v)) v = sl;
    }
    worker_evict(srv, v);
    return v;
}

/* Rewind `from` to its checkpoint cp for the job. When that loses prompt
 * tokens (a conversation the slot may yet continue) the rewind happens in a
 * fork if there is more than one slot, else in place after saving the
 * session to disk. When it only loses the last reply (a retry, or a client
 * that renders the reply differently next turn) it happens in place.
 * Returns the position restored, or 0 if the restore failed. */
static int64_t worker_rewind(struct server *srv, struct cache_slot *from, int cp) {
    int64_t pos = from->cps[cp].pos;
    struct cache_slot *sl = from;
    bool reply_only = pos >= from->prompt_end;
    if (srv->n_slots > 1 && !reply_only) {
        sl = worker_victim(srv, from);
        session_copy(&sl->s, &from->s);
        for (int64_t i = 0; i < pos; i++) slot_push_token(sl, from->fed[i]);
        sl->prompt_end = pos;
        sl->cps = xrealloc(sl->cps, (size_t)(cp + 1) * sizeof *sl->cps);
        sl->cap_cps = cp + 1;
        for (int i = 0; i <= cp; i++) {
            sl->cps[i] = from->cps[i];
            sl->cps[i].bytes = xmalloc(from->cps[i].len ? from->cps[i].len : 1);
            memcpy(sl->cps[i].bytes, from->cps[i].bytes, from->cps[i].len);
        }
        sl->n_cps = cp + 1;
    } else if (srv->kv_on && !reply_only) {
        kv_store_save_live(&srv->kv, &srv->kv_policy, &sl->s, srv->tok, sl->fed, sl->n_fed,
                           KV_REASON_EVICT);
    }
    srv->cur = sl;
    struct ds4_error e = {""};
    if (!checkpoint_restore(&sl->s, &sl->cps[cp], sl->fed, &e)) {
        fprintf(stderr, "ds4-server: cache: %s; starting over\n", e.msg);
        slot_reset(srv, sl);
        return 0;
    }
    sl->n_fed = pos;
    if (sl->prompt_end > pos) sl->prompt_end = pos;
    slot_drop_checkpoints_after(sl, pos);
    return pos;
}

/* The session starts over, from the disk store: the longest cached prefix
 * of the prompt's text is loaded, and the job's prompt becomes the cached
 * tokens plus the rest of the text (12.9.1). Returns the cached count. */
static int64_t worker_resume(struct server *srv, struct job *j) {
    struct kv_hit hit;
    size_t n;
    int32_t *ids = kv_store_resume(&srv->kv, &srv->cur->s, srv->tok, j->prompt_text,
                                   j->prompt_text_len, &n, &hit);
    if (!ids) return 0;
    if (n >= (size_t)srv->opt->ctx) {          /* the suffix tokenized longer: no room */
        free(ids);
        worker_reset_session(srv);
        return 0;
    }
    free(j->prompt);
    j->prompt = ids;
    j->n_prompt = n;
    if (j->max_tokens > srv->opt->ctx - (int)n) j->max_tokens = srv->opt->ctx - (int)n;
    for (int64_t i = 0; i < hit.n_tokens; i++) worker_remember(srv, ids[i]);
    srv->cur->prompt_end = hit.n_tokens;
    worker_checkpoint(srv);
    return hit.n_tokens;
}

/* Choose the job's slot (see above) and return how many leading prompt
 * tokens it holds now. */
static int64_t worker_reuse(struct server *srv, struct job *j) {
    struct cache_slot *best = NULL;
    int64_t got = 0;
    int cp = -1;
    for (int i = 0; i < srv->n_slots; i++) {
        int c;
        int64_t u = slot_offer(&srv->slots[i], j, &c);
        bool better = u > got || (u == got && u > 0 && c < 0 && cp >= 0);   /* extend over rewind */
        if (better) best = &srv->slots[i], got = u, cp = c;
    }
    const char *how = "extended";
    if (got == 0) {
        srv->cur = worker_victim(srv, NULL);
        got = srv->kv_on ? worker_resume(srv, j) : 0;
        how = got ? "new, from disk" : "new";
    } else if (cp < 0) {
        srv->cur = best;
    } else {
        bool fork = srv->n_slots > 1 && best->cps[cp].pos < best->prompt_end;
        how = fork ? "forked and rewound" : "rewound";
        got = worker_rewind(srv, best, cp);
    }
    srv->cur->last_used = ++srv->clock;
    fprintf(stderr, "ds4-server: cache: session %d of %d %s, %lld of %zu prompt tokens reused\n",
            (int)(srv->cur - srv->slots) + 1, srv->n_slots, how, (long long)got, j->n_prompt);
    return got;
}

/* --sessions by default (see SIZE above). */
static uint64_t available_memory_bytes(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    unsigned long long kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
    if (f) fclose(f);
    if (kb) return (uint64_t)kb * 1024;
    long pages = sysconf(_SC_AVPHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    return pages > 0 && size > 0 ? (uint64_t)pages * (uint64_t)size : 0;
}

static int cache_default_sessions(const struct model *m, const struct server_options *o,
                                  uint64_t avail) {
    const struct ds4_config *c = &m->cfg;
    uint64_t ckpt = (uint64_t)(c->n_layers + 1) * c->window * c->head_dim * 4 +
                    (uint64_t)c->vocab * 4;
    uint64_t n_ckpt = (o->checkpoint_every > 0 ? (uint64_t)(o->ctx / o->checkpoint_every) : 0) +
                      CACHE_PROMPT_END_CHECKPOINTS;
    uint64_t one = snapshot_f32_bytes(c, m->has_mtp, o->ctx) + n_ckpt * ckpt;
    uint64_t fit = avail / 2 / (one ? one : 1);
    return fit < 1 ? 1 : fit > CACHE_DEFAULT_MAX_SESSIONS ? CACHE_DEFAULT_MAX_SESSIONS : (int)fit;
}

/* Should the job stop now? The server is stopping, or the client left: a
 * write failed, or its socket reads end-of-stream. One non-blocking peek
 * per token costs about a microsecond. */
static bool job_abandoned(struct server *srv, struct job *j) {
    if (atomic_load(&srv->stopping) || j->conn->gone || atomic_load(&j->cancelled)) return true;
    return conn_peer_gone(j->conn);
}

/* -- Content, with stop strings -- */

static void job_emit_content(struct job *j, const char *s, size_t n) {
    if (n == 0) return;
    strbuf_append(&j->content, s, n);
    if (j->p.stream) dialect_of(j->api)->content(j, s, n);
}

/* STOP STRINGS. The client must never see a stop string, nor anything after
 * it, yet a stop string can arrive split over several tokens. So content is
 * held back while it could still be the start of one: the last
 * (longest stop - 1) bytes, moved back to a character boundary so no UTF-8
 * sequence is split. When a stop string appears, the text before it goes
 * out and the reply ends. */
static void job_content(struct job *j, const char *s, size_t n) {
    if (j->stop_hit) return;
    if (j->p.n_stops == 0) {
        job_emit_content(j, s, n);
        return;
    }
    strbuf_append(&j->held, s, n);
    size_t best = SIZE_MAX, longest = 0;
    for (int k = 0; k < j->p.n_stops; k++) {
        const char *at = memmem(j->held.data, j->held.len, j->p.stops[k], j->p.stop_lens[k]);
        if (at && (size_t)(at - j->held.data) < best) {
            best = (size_t)(at - j->held.data);
            j->stop_hit = j->p.stops[k];
        }
        if (j->p.stop_lens[k] > longest) longest = j->p.stop_lens[k];
    }
    if (j->stop_hit) {
        job_emit_content(j, j->held.data, best);
        j->held.len = 0;
        return;
    }
    size_t keep = longest - 1 < j->held.len ? longest - 1 : j->held.len;
    size_t cut = j->held.len - keep;
    while (cut > 0 && cut < j->held.len && ((unsigned char)j->held.data[cut] & 0xC0) == 0x80) cut--;
    job_emit_content(j, j->held.data, cut);
    memmove(j->held.data, j->held.data + cut, j->held.len - cut);
    j->held.len -= cut;
}

/* -- Tool calls -- */

static void job_call_args(struct job *j, size_t i, const char *s, size_t n) {
    if (n == 0) return;
    strbuf_append(&j->calls[i].args, s, n);
    if (j->p.stream) dialect_of(j->api)->call_args(j, i, s, n);
}

static void job_call_start(struct job *j, const char *name) {
    if (j->n_calls == j->cap_calls) {
        j->cap_calls = j->cap_calls ? 2 * j->cap_calls : 4;
        j->calls = xrealloc(j->calls, j->cap_calls * sizeof *j->calls);
    }
    struct job_call *c = &j->calls[j->n_calls++];
    memset(c, 0, sizeof *c);
    random_id(c->id, sizeof c->id, j->api == API_MESSAGES ? "toolu_" : "call_");
    random_id(c->item_id, sizeof c->item_id, "fc_");
    c->name = srv_strndup(name, strlen(name));
    c->custom = tool_listed(&j->tt.custom, name);
    const char *dot = strchr(name, '.');
    if (dot && tool_listed(&j->tt.names, name)) c->ns_len = (size_t)(dot - name) + 1;
    j->args_sent = 0;
    if (j->p.stream) dialect_of(j->api)->call_start(j, j->n_calls - 1);
}

/* Arguments grow one parameter at a time inside the parser (dsml.args,
 * "{"KEY": VALUE, ..."); whatever is new since the last look goes out as
 * an argument delta, so a client sees a long file argument arrive in
 * pieces rather than all at the end. */
static void job_stream_open_args(struct job *j) {
    const struct dsml_parser *p = &j->dsml;
    if (!p->call_name || j->n_calls == 0 || p->args.len <= j->args_sent) return;
    job_call_args(j, j->n_calls - 1, p->args.data + j->args_sent, p->args.len - j->args_sent);
    j->args_sent = p->args.len;
}

/* The DSML parser's events (11.9), routed to the job and its dialect. */
static void job_on_dsml(void *user, const struct dsml_event *ev) {
    struct job *j = user;
    switch (ev->kind) {
    case DSML_EV_REASONING:
        strbuf_append(&j->reasoning, ev->text, ev->len);
        if (j->p.stream) dialect_of(j->api)->reasoning(j, ev->text, ev->len);
        break;
    case DSML_EV_CONTENT:
        job_content(j, ev->text, ev->len);
        break;
    case DSML_EV_CALL_START:
        if (!j->stop_hit) job_call_start(j, ev->name);
        break;
    case DSML_EV_CALL:
        if (j->stop_hit || j->n_calls == 0) break;
        job_call_args(j, j->n_calls - 1, ev->arguments + j->args_sent,
                      strlen(ev->arguments) - j->args_sent);
        j->args_sent = 0;
        if (j->p.stream) dialect_of(j->api)->call_end(j, j->n_calls - 1);
        break;
    }
}

/* One sampled token: its text through the streaming decoder (whole
 * characters only) into the DSML parser, whose events do the rest. */
static void job_push_token(struct server *srv, struct job *j, int32_t id) {
    struct strbuf piece = {0};
    token_stream_push(srv->tok, &j->ts, id, &piece);
    if (piece.len > 0) {
        strbuf_append(&j->raw, piece.data, piece.len);
        dsml_parser_feed(&j->dsml, piece.data, piece.len);
        job_stream_open_args(j);
    }
    strbuf_free(&piece);
}

/* The end of the output: release held bytes and settle the parser. */
static void job_flush_output(struct job *j) {
    struct strbuf rest = {0};
    token_stream_flush(&j->ts, &rest);
    if (rest.len > 0) {
        strbuf_append(&j->raw, rest.data, rest.len);
        dsml_parser_feed(&j->dsml, rest.data, rest.len);
    }
    dsml_parser_finish(&j->dsml);
    if (!j->stop_hit) job_emit_content(j, j->held.data, j->held.len);
    j->held.len = 0;
    strbuf_free(&rest);
}

/* Remember the exact tool block the model wrote, under its calls' ids (13.6). */
static void job_remember_calls(struct server *srv, struct job *j) {
    unsigned bad =
        DSML_MALFORMED | DSML_UNTERMINATED | DSML_CALL_IN_THINKING | DSML_DUPLICATE_PARAM;
    if (j->n_calls == 0 || (j->dsml.flags & bad) || j->finish != FINISH_TOOLS || !j->raw.data)
        return;
    const char *start = memmem(j->raw.data, j->raw.len, DSML_BLOCK, strlen(DSML_BLOCK));
    const char *close = start ? memmem(start, j->raw.len - (size_t)(start - j->raw.data),
                                       DSML_BLOCK_CLOSE, strlen(DSML_BLOCK_CLOSE))
                              : NULL;
    if (!close) return;
    if (start - j->raw.data >= 2 && start[-1] == '\n' && start[-2] == '\n') start -= 2;
    struct strbuf ids = {0};
    for (size_t i = 0; i < j->n_calls; i++) {
        strbuf_puts(&ids, j->calls[i].id);
        strbuf_puts(&ids, "\n");
    }
    tool_memory_put(&srv->mem, j->calls[0].id, ids.data, start,
                    (size_t)(close + strlen(DSML_BLOCK_CLOSE) - start));
    strbuf_free(&ids);
}

/* -- Prefill and decode -- */

/* Where a prefill step from `pos` ends: the next multiple of --chunk,
 * counted from position 0, or of --checkpoint-every, or `end`. */
static int64_t prefill_step_end(const struct server_options *o, int64_t pos, int64_t end) {
    int64_t stop = (pos / o->chunk + 1) * o->chunk;
    if (o->checkpoint_every > 0) {
        int64_t k = (pos / o->checkpoint_every + 1) * o->checkpoint_every;
        if (k < stop) stop = k;
    }
    return stop < end ? stop : end;
}

/* Feed prompt[from..n) in chunks. Streaming clients get an SSE comment
 * every SERVER_KEEPALIVE_S (proxies and clients drop silent streams); a
 * long prefill prints its progress on stderr about once a second. With
 * --kv-disk-dir a chunk also ends at the save points of 12.9 (`cold_at`,
 * 0 = none, and the continued points), and the session is saved there. */
static bool worker_prefill(struct server *srv, struct job *j, int64_t from, int64_t cold_at,
                           struct ds4_error *e) {
    int64_t n = (int64_t)j->n_prompt - from;
    struct cache_slot *sl = srv->cur;
    int every = srv->opt->checkpoint_every;
    bool report = n >= SERVER_PROGRESS_MIN_TOKENS;
    double t0 = now_seconds(), last_report = t0;
    j->last_keepalive = t0;
    for (int64_t done = 0, T; done < n; done += T) {
        T = prefill_step_end(srv->opt, from + done, from + n) - from - done;
        enum kv_reason why = KV_REASON_UNKNOWN;
        if (srv->kv_on)
            T = kv_next_stop(&srv->kv_policy, from + done, from + done + T, cold_at, &why) - from -
                done;
        if (job_abandoned(srv, j)) return false;
        if (!session_forward(&sl->s, j->prompt + from + done, (int)T, NULL, e)) return false;
        for (int64_t t = 0; t < T; t++) worker_remember(srv, j->prompt[from + done + t]);
        if (every > 0 && sl->s.pos % every == 0) worker_checkpoint(srv);
        if (why != KV_REASON_UNKNOWN)
            kv_store_save_live(&srv->kv, &srv->kv_policy, &sl->s, srv->tok, sl->fed, sl->n_fed,
                               why);
        double now = now_seconds();
        if (j->p.stream && now - j->last_keepalive >= SERVER_KEEPALIVE_S) {
            http_chunk(j->conn, ": prefill\n\n", 11);
            j->last_keepalive = now;
        }
        if (report && (now - last_report >= 1.0 || done + T == n)) {
            fprintf(stderr, "ds4-server: prefill %lld/%lld tokens (%.0f%%), %.1f tokens/s\n",
                    (long long)(done + T), (long long)n, 100.0 * (double)(done + T) / (double)n,
                    (double)(done + T) / (now - t0 + 1e-9));
            last_report = now;
        }
    }
    return true;
}

/* The decode loop. Each step: choose a token (scripted or sampled), stop at
 * EOS, hand its text to the parser, run it through the model, and stop
 * after a stop string or a closed tool block (the model would write EOS
 * next; the next prompt renders it). */
static bool worker_decode(struct server *srv, struct job *j, struct ds4_error *e) {
    const struct script_rule *rule =
        srv->script.n ? test_script_find(&srv->script, j->prompt_text) : NULL;
    int32_t eos = srv->tok->sp.eos;
    j->finish = FINISH_LENGTH;
    struct spec_stats before = srv->gen.stats;
    srv->gen.have_residual = false;
    for (int i = 0; i < j->max_tokens;) {
        if (job_abandoned(srv, j)) {
            j->finish = FINISH_CANCELLED;
            break;
        }
        /* Scripted tokens (tests) go in one by one; sampled ones come from
         * the generator, several at a time when MTP drafts are accepted,
         * already in the session. */
        int32_t ids[MATMUL_DECODE_PATH_MAX_TOKENS];
        int got = 1;
        if (j->guide) {
            ids[0] = guide_step(srv, j, rule, j->max_tokens - i, srv->cur->s.logits);
            if (ids[0] != eos && !session_forward(&srv->cur->s, ids, 1, NULL, e)) return false;
        } else if (rule) {
            ids[0] = (size_t)i < rule->n_ids ? rule->ids[i] : eos;
            if (ids[0] != eos && !session_forward(&srv->cur->s, ids, 1, NULL, e)) return false;
        } else if ((got = generator_step(&srv->gen, ids, e)) <= 0) {
            return false;
        }
        for (int k = 0; k < got; k++)
            if ((!rule && !j->guide) || ids[k] != eos)
                worker_remember(srv, ids[k]);   /* all are in the session */
        bool done = false;
        for (int k = 0; k < got && !done && i < j->max_tokens; k++, i++) {
            if (ids[k] == eos) {
                j->finish = FINISH_STOP;
                done = true;
                break;
            }
            j->n_generated++;
            j->n_reasoning += j->dsml.state == DSML_REASONING;
            job_push_token(srv, j, ids[k]);
            if (j->guide) guide_after(srv, j, ids[k]);
            if (j->stop_hit || j->dsml.state == DSML_AFTER_TOOLS || j->dsml.state == DSML_DONE) {
                j->finish = FINISH_STOP;
                done = true;
            }
        }
        if (done) break;
    }
    j->drafted = srv->gen.stats.drafted - before.drafted;
    j->accepted = srv->gen.stats.accepted - before.accepted;
    return true;
}

static uint64_t random_seed(void) {
    char hex[40];
    random_id(hex, sizeof hex, "");
    return strtoull(hex + 16, NULL, 16);
}

/* One job, from the worker's side: the whole life of a reply. */
static void worker_run(struct server *srv, struct job *j) {
    const struct dialect *d = dialect_of(j->api);
    struct ds4_error e = {""};
    j->t_started = now_seconds();
    srv->sp.opt = j->p.sampling;
    srv->sp.state = j->p.seeded ? j->p.sampling.seed : random_seed();
    dsml_parser_init(&j->dsml, j->p.mode != CHAT_MODE_CHAT, job_on_dsml, j);
    if (guide_wanted(&j->p)) {
        j->guide = xcalloc(1, sizeof *j->guide);
        memset(srv->token_count, 0, (size_t)srv->eng->model->cfg.vocab * sizeof(int32_t));
    }
    j->rs_index = j->msg_index = -1;
    random_id(j->rs_id, sizeof j->rs_id, "rs_");
    random_id(j->msg_id, sizeof j->msg_id, "msg_");

    j->n_cached = worker_reuse(srv, j);
    srv->gen.s = &srv->cur->s;
    int64_t cold_at = srv->kv_on && j->n_cached == 0
                          ? kv_cold_save_point(&srv->kv_policy, j->prompt, (int64_t)j->n_prompt,
                                               srv->tok->sp.user, srv->tok->sp.assistant)
                          : 0;
    if (j->p.stream) d->begin(j);
    bool ok = worker_prefill(srv, j, j->n_cached, cold_at, &e);
    if (ok) worker_checkpoint(srv);               /* the prompt's end: where a retry rewinds to */
    if (ok) srv->cur->prompt_end = srv->cur->s.pos;
    j->t_prefilled = now_seconds();
    if (ok) ok = worker_decode(srv, j, &e);
    else if (!e.msg[0]) j->finish = FINISH_CANCELLED;
    if (!ok && e.msg[0]) {                     /* the engine failed: the session is suspect */
        snprintf(j->error, sizeof j->error, "generation failed: %.200s", e.msg);
        j->finish = FINISH_ERROR;
        worker_reset_session(srv);
    }
    job_flush_output(j);
    if (j->finish == FINISH_STOP && j->n_calls > 0) j->finish = FINISH_TOOLS;
    j->t_finished = now_seconds();
    /* Before the reply leaves: the client's next request, which replays these
     * calls, may be rendered by its connection thread the moment it arrives. */
    if (!srv->opt->no_exact_replay) job_remember_calls(srv, j);

    if (j->finish == FINISH_CANCELLED) {
        if (j->p.stream) http_stream_end(j->conn);
    } else if (j->p.stream) {
        d->end(j);
    } else if (j->finish == FINISH_ERROR) {
        http_error(j->conn, 500, j->error);
    } else {
        struct strbuf body = {0};
        d->body(j, &body);
        http_respond_json(j->conn, 200, &body);
        strbuf_free(&body);
    }
}

static void *worker_main(void *arg) {
    struct server *srv = arg;
    struct job *j;
    while ((j = job_take(srv)) != NULL) {
        worker_run(srv, j);
        job_finish(srv, j);
    }
    return NULL;
}

/* ---- 13.11 Handlers and routing -------------------------------------------- */

static void srv_log(struct server *srv, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* One line per request in --log FILE: UTC time, then the caller's text. */
static void srv_log(struct server *srv, const char *fmt, ...) {
    if (!srv->log) return;
    char stamp[32];
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", &tm);
    va_list ap;
    va_start(ap, fmt);
    pthread_mutex_lock(&srv->log_lock);
    fprintf(srv->log, "%s ", stamp);
    vfprintf(srv->log, fmt, ap);
    fputc('\n', srv->log);
    fflush(srv->log);
    pthread_mutex_unlock(&srv->log_lock);
    va_end(ap);
}

/* THE PARSE POOL. A request's JSON tree costs up to 64 times its body
 * (Chapter 10, "memory"), so trees are paid for out of one pool of
 * --max-parses x --max-parse-mem bytes. A request reserves the most one
 * parse may take (--max-parse-mem) before parsing, waits a bounded time if
 * the pool is spent, keeps only what its tree really used while it lives,
 * and returns that when the tree is freed. So at most --max-parses parses
 * run at once, and all trees together never pass the pool, however many
 * requests are queued. A body whose tree would not fit its budget gets 413.
 */
#define SERVER_PARSE_WAIT_S 10.0

static size_t parse_pool(const struct server_options *o) {
    return (size_t)o->max_parses * o->max_parse_mem;
}

static bool parse_reserve(struct server *srv, size_t bytes) {
    double deadline = now_seconds() + SERVER_PARSE_WAIT_S;
    pthread_mutex_lock(&srv->lock);
    while (srv->parse_in_use + bytes > parse_pool(srv->opt) && !atomic_load(&srv->stopping) &&
           now_seconds() < deadline) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 1;
        pthread_cond_timedwait(&srv->parse_room, &srv->lock, &ts);
    }
    bool ok = srv->parse_in_use + bytes <= parse_pool(srv->opt) && !atomic_load(&srv->stopping);
    if (ok) srv->parse_in_use += bytes;
    pthread_mutex_unlock(&srv->lock);
    return ok;
}

static void parse_release(struct server *srv, size_t bytes) {
    pthread_mutex_lock(&srv->lock);
    srv->parse_in_use -= bytes < srv->parse_in_use ? bytes : srv->parse_in_use;
    pthread_cond_broadcast(&srv->parse_room);
    pthread_mutex_unlock(&srv->lock);
}

/* Parse the body within the budget. On failure the answer is sent (400,
 * 413, 503) and NULL returned. *held is what stays reserved; the body's
 * bytes are freed at once (the tree holds copies of its strings). */
static struct json *srv_parse_body(struct conn *c, struct http_request *r, size_t *held) {
    struct server *srv = c->srv;
    char err[200] = "", msg[300];
    *held = 0;
    if (!parse_reserve(srv, c->opt->max_parse_mem)) {
        http_error(c, 503, "the server is busy parsing other requests; retry shortly");
        return NULL;
    }
    struct json_budget b = {.limit = c->opt->max_parse_mem};
    struct json *req =
        json_parse_within(r->body, r->body_len, SERVER_JSON_DEPTH, &b, err, sizeof err);
    free(r->body);
    r->body = NULL;
    *held = req ? b.used : 0;
    parse_release(srv, c->opt->max_parse_mem - *held);
    if (b.exceeded) {
        pthread_mutex_lock(&srv->lock);
        srv->m.over_budget++;
        pthread_mutex_unlock(&srv->lock);
        snprintf(msg, sizeof msg,
                 "the request's JSON needs more than %zu bytes of memory (--max-parse-mem)",
                 c->opt->max_parse_mem);
        http_error(c, 413, msg);
    } else if (!json_is(req, JSON_OBJECT)) {
        if (req) snprintf(err, sizeof err, "the request body must be a JSON object");
        snprintf(msg, sizeof msg, "invalid request body: %s", err);
        http_error(c, 400, msg);
    } else {
        return req;
    }
    json_free(req);
    parse_release(srv, *held);
    *held = 0;
    return NULL;
}

static void srv_parse_done(struct server *srv, struct json *req, size_t held) {
    json_free(req);
    parse_release(srv, held);
}

/* DOCUMENTED TYPES. Fields the dialect readers only look inside must still
 * have the type the API documents: an object given as a string would
 * otherwise be ignored without a word. Each entry: the field, where it
 * applies, and the kinds allowed (a bit per enum json_kind; null is always
 * allowed, meaning "absent"). */
#define KIND(k) (1u << (k))

static bool field_kind_ok(const struct json *v, unsigned kinds) {
    return v == NULL || v->kind == JSON_NULL || (kinds & KIND(v->kind)) != 0;
}

static const char *kinds_name(unsigned kinds) {
    if (kinds == KIND(JSON_OBJECT)) return "an object";
    if (kinds == (KIND(JSON_OBJECT) | KIND(JSON_STRING))) return "a string or an object";
    if (kinds == KIND(JSON_ARRAY)) return "an array";
    return "of another type";
}

/* tools[i]: an object, and its schema (wherever the dialect puts it) too. */
static bool check_tool_types(const struct json *tools, struct ds4_error *e) {
    static const char *const schema_keys[] = {"parameters", "input_schema"};
    for (size_t i = 0; tools && i < tools->count; i++) {
        const struct json *t = &tools->items[i], *fn = json_get(t, "function");
        if (!json_is(t, JSON_OBJECT)) return fail(e, "'tools[%zu]' must be an object", i);
        if (!field_kind_ok(fn, KIND(JSON_OBJECT)))
            return fail(e, "'tools[%zu].function' must be an object", i);
        for (size_t k = 0; k < 2; k++) {
            if (!field_kind_ok(json_get(t, schema_keys[k]), KIND(JSON_OBJECT)))
                return fail(e, "'tools[%zu].%s' must be an object", i, schema_keys[k]);
            if (!field_kind_ok(json_get(fn, schema_keys[k]), KIND(JSON_OBJECT)))
                return fail(e, "'tools[%zu].function.%s' must be an object", i, schema_keys[k]);
        }
    }
    return true;
}

static bool check_field_types(const struct json *req, struct ds4_error *e) {
    static const struct { const char *key; unsigned kinds; } fields[] = {
        {"stream_options", KIND(JSON_OBJECT)},
        {"tool_choice", KIND(JSON_OBJECT) | KIND(JSON_STRING)},
        {"reasoning", KIND(JSON_OBJECT)},
        {"output_config", KIND(JSON_OBJECT)},
        {"text", KIND(JSON_OBJECT)},
        {"metadata", KIND(JSON_OBJECT)},
        {"tools", KIND(JSON_ARRAY)},
    };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (!field_kind_ok(json_get(req, fields[i].key), fields[i].kinds))
            return fail(e, "'%s' must be %s", fields[i].key, kinds_name(fields[i].kinds));
    const struct json *tools = json_get(req, "tools");
    return check_tool_types(json_is(tools, JSON_ARRAY) ? tools : NULL, e);
}

/* The dialect's request, as canonical messages and tools (13.5). */
static bool job_read_request(struct job *j, const struct json *req, struct conv *cv,
                             struct strbuf *tools, struct ds4_error *e) {
    if (!check_field_types(req, e)) return false;
    if (!read_gen_params(req, j->api, &j->p, e)) return false;
    if (!read_tools(req, j->api, tools, &j->tt, e)) return false;
    bool ok = j->api == API_CHAT        ? conv_from_chat(cv, req, e)
            : j->api == API_MESSAGES    ? conv_from_messages(cv, req, e)
            : j->api == API_RESPONSES   ? conv_from_responses(cv, req, e)
                                        : conv_from_completions(cv, req, e);
    if (!ok) return false;
    conv_finish(cv);
    j->p.tools_on = tools->len > 0 && !tool_choice_none(req);
    if (j->p.choice == CHOICE_NAMED && !tool_listed(&j->tt.names, j->p.choice_name))
        return fail(e, "'tool_choice' names '%s', which is not one of the request's tools",
                    j->p.choice_name);
    return true;
}

/* Canonical messages -> prompt text (chat template, exact replay) -> tokens.
 * Reasoning of earlier turns is kept whenever the history holds tool calls
 * or results, as the template itself does when tools are given [§4.4]. */
static bool job_render(struct server *srv, struct job *j, const struct conv *cv,
                       const struct strbuf *tools, struct ds4_error *e) {
    char err[256] = "";
    struct json *msgs = json_parse(cv->out.data, cv->out.len, JSON_DEPTH_CEILING, err, sizeof err);
    struct json *tl = j->p.tools_on
                          ? json_parse(tools->data, tools->len, JSON_DEPTH_CEILING, err, sizeof err)
                          : NULL;
    struct chat_options co = {.mode = j->p.mode,
                              .context_tokens = (uint64_t)srv->opt->ctx,
                              .keep_reasoning = cv->tool_context,
                              .response_format = j->p.json_schema};
    struct strbuf prompt = {0};
    bool ok =
        msgs && (!j->p.tools_on || tl) && chat_render(msgs, tl, &co, &prompt, err, sizeof err) == 0;
    if (ok && !srv->opt->no_exact_replay) replay_tool_calls(&srv->mem, msgs, &prompt);
    if (ok) tokenize(srv->tok, prompt.data, prompt.len, true, &j->prompt, &j->n_prompt);
    if (!ok) fail(e, "cannot render the conversation: %s", err);
    j->prompt_text = prompt.data;
    j->prompt_text_len = prompt.len;
    json_free(msgs);
    json_free(tl);
    return ok;
}

/* Limits: the prompt must leave room in the context, and the reply gets
 * what the client asked for, at most --max-tokens-cap and the room left. */
static bool job_check_context(struct conn *c, struct job *j) {
    const struct server_options *o = c->opt;
    if (j->n_prompt >= (size_t)o->ctx) {
        char msg[200], extra[80];
        snprintf(msg, sizeof msg, "the prompt has %zu tokens, the context holds %d", j->n_prompt,
                 o->ctx);
        snprintf(extra, sizeof extra, ",\"n_prompt_tokens\":%zu,\"n_ctx\":%d", j->n_prompt, o->ctx);
        const char *param = j->api == API_COMPLETIONS ? "prompt"
                            : j->api == API_RESPONSES ? "input"
                                                      : "messages";
        http_error_full(c, 400, msg, param, "context_length_exceeded", extra);
        return false;
    }
    int room = o->ctx - (int)j->n_prompt,
        want = j->p.max_tokens > 0 ? j->p.max_tokens : o->max_tokens_cap;
    j->max_tokens = want < o->max_tokens_cap ? want : o->max_tokens_cap;
    if (j->max_tokens > room) j->max_tokens = room;
    return true;
}

static bool model_known(const struct server_options *o, const char *id);

/* UNKNOWN MODEL IDS. Agents come configured with a model name, often one
 * they know (gpt-4o, claude-sonnet-...) rather than ours. Answering 404
 * would make a misconfigured agent fail on its first request; we accept any
 * id instead, and say in the reply's "model" which model really answered:
 * one of our ids is echoed, any other is replaced by --model-name. */
static void job_ids(struct job *j, const struct server_options *o) {
    static const char *const prefix[] = {"chatcmpl-", "cmpl-", "msg_", "resp_"};
    random_id(j->id, sizeof j->id, prefix[j->api]);
    j->created = (long)time(NULL);
    j->model = j->p.model && model_known(o, j->p.model) ? j->p.model : o->model_name;
}

/* What one served generation adds to /metrics. */
static void metrics_count_job(struct server *srv, const struct job *j) {
    if (!j->started) return;
    double prefill = j->t_prefilled - j->t_started, decode = j->t_finished - j->t_prefilled;
    int64_t fresh = (int64_t)j->n_prompt - j->n_cached;
    pthread_mutex_lock(&srv->lock);
    struct server_metrics *m = &srv->m;
    m->generations++;
    m->cache_hits += j->n_cached > 0;
    m->prompt_tokens += j->n_prompt;
    m->cached_tokens += (uint64_t)j->n_cached;
    m->generated_tokens += (uint64_t)j->n_generated;
    m->prefill_seconds += prefill;
    m->decode_seconds += decode;
    if (prefill > 0 && fresh > 0) m->last_prefill_tps = (double)fresh / prefill;
    if (decode > 0 && j->n_generated > 0) m->last_decode_tps = j->n_generated / decode;
    pthread_mutex_unlock(&srv->lock);
}

/* POST /v1/chat/completions, /v1/completions, /v1/messages, /v1/responses:
 * parse, render, queue, wait. The worker writes the reply. */
static void handle_generate(struct conn *c, struct http_request *r, char *note, size_t note_cap) {
    struct server *srv = c->srv;
    struct ds4_error e = {""};
    size_t held;
    struct json *req = srv_parse_body(c, r, &held);
    if (!req) return;
    struct job *j = xcalloc(1, sizeof *j);
    struct conv cv = {0};
    struct strbuf tools = {0};
    j->conn = c;
    j->api = c->api;
    bool ok = job_read_request(j, req, &cv, &tools, &e) && job_render(srv, j, &cv, &tools, &e);
    if (!ok) http_error(c, 400, e.msg);
    if (ok) ok = job_check_context(c, j);
    if (ok) {
        job_ids(j, c->opt);
        if (!job_submit(srv, j)) http_error(c, 503, "the server is shutting down");
        else job_wait(srv, j);
        static const char *const finish[] = {"stop", "length", "tool_calls", "error", "cancelled"};
        int at = snprintf(
            note, note_cap,
            "prompt=%zu cached=%lld gen=%d finish=%s queue=%.3fs prefill=%.3fs decode=%.3fs",
            j->n_prompt, (long long)j->n_cached, j->n_generated, finish[j->finish],
            j->started ? j->t_started - j->t_queued : 0,
            j->started ? j->t_prefilled - j->t_started : 0,
            j->started ? j->t_finished - j->t_prefilled : 0);
        if (j->drafted > 0 && at > 0 && (size_t)at < note_cap)
            snprintf(note + at, note_cap - (size_t)at, " mtp_drafted=%lld mtp_accepted=%lld",
                     (long long)j->drafted, (long long)j->accepted);
        metrics_count_job(srv, j);
    }
    conv_free(&cv);
    strbuf_free(&tools);
    job_free(j);
    srv_parse_done(srv, req, held);
}

/* POST /v1/messages/count_tokens: the prompt's size, no generation. */
static void handle_count_tokens(struct conn *c, struct http_request *r, char *note,
                                size_t note_cap) {
    struct ds4_error e = {""};
    size_t held;
    struct json *req = srv_parse_body(c, r, &held);
    if (!req) return;
    struct job *j = xcalloc(1, sizeof *j);
    struct conv cv = {0};
    struct strbuf tools = {0}, body = {0};
    j->api = API_MESSAGES;
    bool ok = job_read_request(j, req, &cv, &tools, &e) && job_render(c->srv, j, &cv, &tools, &e);
    if (ok) {
        strbuf_printf(&body, "{\"input_tokens\":%zu}", j->n_prompt);
        http_respond_json(c, 200, &body);
        snprintf(note, note_cap, "prompt=%zu", j->n_prompt);
    } else {
        http_error(c, 400, e.msg);
    }
    conv_free(&cv);
    strbuf_free(&tools);
    strbuf_free(&body);
    job_free(j);
    srv_parse_done(c->srv, req, held);
}

/* The model object [API §1.1]. */
static void model_object(struct strbuf *b, const struct server_options *o, const char *id) {
    strbuf_puts(b, "{\"id\":");
    put_str(b, id);
    strbuf_puts(
        b,
        ",\"object\":\"model\",\"type\":\"model\",\"created\":0,\"owned_by\":\"ds4.c\",\"name\":");
    put_str(b, id);
    strbuf_puts(b, ",\"display_name\":");
    put_str(b, id);
    strbuf_printf(
        b,
        ",\"created_at\":\"1970-01-01T00:00:00Z\",\"context_length\":%d,\"top_provider\":"
        "{\"context_length\":%d,\"max_completion_tokens\":%d,\"is_moderated\":false},"
        "\"supported_parameters\":[\"max_tokens\",\"temperature\",\"top_p\",\"top_k\",\"min_p\","
        "\"seed\",\"stop\",\"tools\",\"tool_choice\",\"parallel_tool_calls\",\"response_format\","
        "\"structured_outputs\",\"logprobs\",\"top_logprobs\",\"presence_penalty\","
        "\"frequency_penalty\",\"reasoning\",\"include_reasoning\"]}",
        o->ctx, o->ctx, o->max_tokens_cap);
}

static bool model_known(const struct server_options *o, const char *id) {
    return strcmp(id, o->model_name) == 0 || strcmp(id, "deepseek-chat") == 0 ||
           strcmp(id, "deepseek-reasoner") == 0;
}

static void handle_models(struct conn *c, struct http_request *r, char *note, size_t note_cap) {
    struct strbuf b = {0};
    const char *id = r->path + strlen("/v1/models");
    (void)note, (void)note_cap;
    if (*id == '\0') {
        const char *ids[] = {c->opt->model_name, "deepseek-chat", "deepseek-reasoner"};
        strbuf_puts(&b, "{\"object\":\"list\",\"data\":[");
        for (size_t i = 0; i < 3; i++) {
            if (i > 0) strbuf_puts(&b, ",");
            model_object(&b, c->opt, ids[i]);
        }
        strbuf_puts(&b, "],\"has_more\":false}");
        http_respond_json(c, 200, &b);
    } else if (model_known(c->opt, id + 1)) {
        model_object(&b, c->opt, id + 1);
        http_respond_json(c, 200, &b);
    } else {
        http_error_full(c, 404, "no such model", "model", "model_not_found", NULL);
    }
    strbuf_free(&b);
}

static void handle_health(struct conn *c, struct http_request *r, char *note, size_t note_cap) {
    static const char ok[] = "{\"status\":\"ok\"}";
    (void)r, (void)note, (void)note_cap;
    http_respond(c, 200, "application/json", ok, sizeof ok - 1, NULL);
}

/* GET /metrics: Prometheus text format [exposition format 0.0.4], one
 * "# TYPE" line and one sample per metric. Counters end in _total. */
static void metric(struct strbuf *b, const char *name, const char *type, const char *help,
                   double v) {
    strbuf_printf(b, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", name, help, name, type, name, v);
}

static void handle_metrics(struct conn *c, struct http_request *r, char *note, size_t note_cap) {
    struct server *srv = c->srv;
    struct strbuf b = {0};
    (void)r, (void)note, (void)note_cap;
    pthread_mutex_lock(&srv->lock);
    struct server_metrics m = srv->m;
    int queued = 0, conns = srv->n_conns;
    for (const struct job *q = srv->head; q; q = q->next) queued++;
    bool busy = srv->running != NULL;
    size_t parse = srv->parse_in_use;
    pthread_mutex_unlock(&srv->lock);
    metric(&b, "ds4_http_requests_total", "counter", "HTTP requests read", (double)m.requests);
    strbuf_puts(&b, "# HELP ds4_http_responses_total HTTP answers by status class\n"
                    "# TYPE ds4_http_responses_total counter\n");
    for (int k = 1; k <= 5; k++)
        strbuf_printf(&b, "ds4_http_responses_total{class=\"%dxx\"} %llu\n", k,
                      (unsigned long long)m.by_class[k]);
    metric(&b, "ds4_generations_total", "counter", "generation requests served",
           (double)m.generations);
    metric(&b, "ds4_prompt_tokens_total", "counter", "prompt tokens of served requests",
           (double)m.prompt_tokens);
    metric(&b, "ds4_cached_prompt_tokens_total", "counter", "prompt tokens reused, not prefilled",
           (double)m.cached_tokens);
    metric(&b, "ds4_cache_hits_total", "counter", "requests that reused cached tokens",
           (double)m.cache_hits);
    metric(&b, "ds4_generated_tokens_total", "counter", "tokens generated",
           (double)m.generated_tokens);
    metric(&b, "ds4_prefill_seconds_total", "counter", "seconds spent in prefill",
           m.prefill_seconds);
    metric(&b, "ds4_decode_seconds_total", "counter", "seconds spent in decode", m.decode_seconds);
    metric(&b, "ds4_prefill_tokens_per_second", "gauge", "prefill speed of the last request",
           m.last_prefill_tps);
    metric(&b, "ds4_decode_tokens_per_second", "gauge", "decode speed of the last request",
           m.last_decode_tps);
    metric(&b, "ds4_queue_length", "gauge", "requests waiting for the worker", queued);
    metric(&b, "ds4_worker_busy", "gauge", "1 while a request is being served", busy);
    metric(&b, "ds4_connections", "gauge", "open connections", conns);
    metric(&b, "ds4_connections_evicted_total", "counter",
           "idle or slow connections closed for a new one", (double)m.evicted);
    metric(&b, "ds4_connections_refused_total", "counter", "connections refused with 503",
           (double)m.refused);
    metric(&b, "ds4_parse_bytes_reserved", "gauge", "bytes of the parse pool in use",
           (double)parse);
    metric(&b, "ds4_parse_over_budget_total", "counter", "bodies refused by --max-parse-mem",
           (double)m.over_budget);
    http_respond(c, 200, "text/plain; version=0.0.4", b.data ? b.data : "", b.len, NULL);
    strbuf_free(&b);
}

/* The routes. A path ending in '/' matches any path it starts (a model id
 * follows /v1/models/). */
struct route {
    const char *method, *path;
    enum api_kind api;
    bool open;                  /* no API key needed */
    void (*handle)(struct conn *c, struct http_request *r, char *note, size_t note_cap);
};

static const struct route ROUTES[] = {
    {"GET",  "/health",                   API_NONE,        true,  handle_health},
    {"GET",  "/metrics",                  API_NONE,        false, handle_metrics},
    {"GET",  "/v1/models",                API_NONE,        false, handle_models},
    {"GET",  "/v1/models/",               API_NONE,        false, handle_models},
    {"POST", "/v1/chat/completions",      API_CHAT,        false, handle_generate},
    {"POST", "/v1/completions",           API_COMPLETIONS, false, handle_generate},
    {"POST", "/v1/messages",              API_MESSAGES,    false, handle_generate},
    {"POST", "/v1/messages/count_tokens", API_MESSAGES,    false, handle_count_tokens},
    {"POST", "/v1/responses",             API_RESPONSES,   false, handle_generate},
};

static bool route_matches(const struct route *rt, const char *path) {
    size_t n = strlen(rt->path);
    if (rt->path[n - 1] == '/')
        return strncmp(path, rt->path, n) == 0 && path[n] != '\0' && !strchr(path + n, '/');
    return strcmp(path, rt->path) == 0;
}

/* Compare secrets in time independent of where they differ (of the key's
 * length, too: the loop always runs over the longer of the two). */
static bool secret_equal(const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b), n = na > nb ? na : nb;
    unsigned char diff = na != nb;
    for (size_t i = 0; i < n; i++)
        diff |= (unsigned char)((i < na ? a[i] : 0) ^ (i < nb ? b[i] : 0));
    return diff == 0;
}

/* --api-key: "Authorization: Bearer KEY" (OpenAI) or "x-api-key: KEY"
 * (Anthropic). Keys of any length: the header values are whole copies. */
static bool auth_ok(const struct server_options *o, const struct http_request *r) {
    if (!o->api_key) return true;
    if (r->api_key && secret_equal(r->api_key, o->api_key)) return true;
    return r->authorization && strncasecmp(r->authorization, "Bearer ", 7) == 0 &&
           secret_equal(r->authorization + 7, o->api_key);
}

/* BROWSERS. Any web page the user visits can send requests to
 * 127.0.0.1:8000. Three rules keep pages out unless --cors lets one in:
 *
 *   - Origin: browsers name the page's origin on every cross-origin
 *     request; one that is not --cors is refused (403), so a page can
 *     neither read replies nor spend the model's time.
 *   - Content-Type: a page may POST "text/plain" without asking first (a
 *     "simple request", Fetch standard §3.2.3); only application/json is
 *     accepted (415), and that a page can send only after a preflight,
 *     which only --cors answers.
 *   - Host: DNS rebinding points a page's own name at 127.0.0.1, so its
 *     requests become same-origin and carry no Origin; they still carry the
 *     page's name in Host. Accepted Hosts: loopback names and addresses, the
 *     --host name, the names of --allow-host, and any IP literal when the
 *     server listens beyond loopback (a rebinding page always has a name). */
static bool host_is_loopback(const char *h, size_t n) {
    return (n == 9 && strncasecmp(h, "localhost", 9) == 0) ||
           (n >= 4 && strncmp(h, "127.", 4) == 0) || (n == 3 && strncmp(h, "::1", 3) == 0) ||
           (n == 5 && strncmp(h, "[::1]", 5) == 0);
}

static bool host_is_ip_literal(const char *h, size_t n) {
    char buf[64];
    unsigned char addr[16];
    if (n < 2 || n >= sizeof buf) return false;
    bool v6 = h[0] == '[' && h[n - 1] == ']';
    memcpy(buf, h + v6, n - 2 * v6);
    buf[n - 2 * v6] = '\0';
    return inet_pton(v6 ? AF_INET6 : AF_INET, buf, addr) == 1;
}

/* Is `name` (n bytes) one of the comma-separated names of list? */
static bool name_in_list(const char *list, const char *name, size_t n) {
    while (list && *list) {
        const char *comma = strchr(list, ',');
        size_t k = comma ? (size_t)(comma - list) : strlen(list);
        if ((k == 1 && list[0] == '*') || (k == n && strncasecmp(list, name, n) == 0)) return true;
        list = comma ? comma + 1 : NULL;
    }
    return false;
}

static bool host_allowed(const struct server_options *o, const char *host) {
    size_t n = strlen(host);
    const char *colon = strrchr(host, ':');
    /* the port */
    if (colon && (host[0] != '[' || colon > strchr(host, ']'))) n = (size_t)(colon - host);
    bool wide = !host_is_loopback(o->host, strlen(o->host));
    return host_is_loopback(host, n) || name_in_list(o->host, host, n) ||
           name_in_list(o->allow_hosts, host, n) || (wide && host_is_ip_literal(host, n));
}

/* The media type without parameters ("application/json; charset=utf-8"). */
static bool content_type_is_json(const char *ct) {
    size_t n = strcspn(ct, ";");
    while (n > 0 && (ct[n - 1] == ' ' || ct[n - 1] == '\t')) n--;
    return n == 16 && strncasecmp(ct, "application/json", 16) == 0;
}

/* The checks of BROWSERS above. Returns the status to refuse with, or 0. */
static int browser_check(const struct server_options *o, const struct http_request *r, bool post,
                         char *msg, size_t cap) {
    const char *cors = o->cors_origin;
    if (r->has_host && !host_allowed(o, r->host)) {
        snprintf(msg, cap, "Host '%.100s' is not served here (loopback, --host, --allow-host)",
                 r->host);
        return 403;
    }
    if (r->origin[0] && !(cors && (strcmp(cors, "*") == 0 || strcmp(cors, r->origin) == 0))) {
        snprintf(msg, cap, "cross-origin request from '%.100s' refused (see --cors)", r->origin);
        return 403;
    }
    if (post && !content_type_is_json(r->content_type)) {
        snprintf(msg, cap, "Content-Type must be application/json");
        return 415;
    }
    return 0;
}

/* Dispatch one parsed head: CORS preflight, route, browser checks, key,
 * body, handler. HEAD is GET without the body [RFC 9110 §7.3.2]. Until a
 * body is read whole, an answer closes the connection (the unread bytes
 * would be taken for the next request). */
static void conn_route(struct conn *c, struct http_request *r, struct strbuf *carry, char *note,
                       size_t note_cap) {
    const struct route *found = NULL;
    bool path_known = false;
    c->head_only = strcmp(r->method, "HEAD") == 0;
    const char *method = c->head_only ? "GET" : r->method;
    bool keep = c->keep_alive, has_body = r->chunked || (r->has_length && r->content_length > 0);
    if (has_body) c->keep_alive = false;
    for (size_t i = 0; i < sizeof ROUTES / sizeof ROUTES[0]; i++) {
        if (!route_matches(&ROUTES[i], r->path)) continue;
        path_known = true;
        c->api = ROUTES[i].api;
        if (strcmp(method, ROUTES[i].method) == 0) found = &ROUTES[i];
    }
    if (c->api == API_NONE)
        c->api = strncmp(r->path, "/v1/messages", 12) == 0 ? API_MESSAGES : API_CHAT;
    char msg[256];
    int refuse =
        strcmp(r->method, "OPTIONS") == 0 || !found || found->open
            ? 0
            : browser_check(c->opt, r, strcmp(found->method, "POST") == 0, msg, sizeof msg);
    if (strcmp(r->method, "OPTIONS") == 0) {
        http_respond(c, 204, NULL, "", 0, NULL);
    } else if (!path_known) {
        http_error(c, 404, "unknown endpoint");
    } else if (!found) {
        http_error(c, 405, "method not allowed for this endpoint");
    } else if (refuse) {
        http_error(c, refuse, msg);
    } else if (!found->open && !auth_ok(c->opt, r)) {
        http_error(c, 401, c->opt->api_key && (r->api_key || r->authorization) ? "invalid API key"
                                                                               : "missing API key");
    } else if (strcmp(found->method, "POST") == 0) {
        char err[200];
        int status = http_read_body(c->fd, r, carry, c->opt, err, sizeof err);
        if (status > 0) http_error(c, status, err);
        if (status != 0) return;
        c->keep_alive = keep;
        found->handle(c, r, note, note_cap);
    } else {
        found->handle(c, r, note, note_cap);
    }
}

/* ---- 13.12 The accept loop and server_main() ------------------------------- */

/* Closing a socket with unread bytes in it makes the kernel send a reset,
 * which can destroy an error response the client has not read yet (a 413
 * sent while the client is still uploading). So: stop writing, read and
 * discard what is still coming for a short while, then close. */
static void conn_close(struct conn *c) {
    char sink[16384];
    size_t drained = 0;
    double deadline = now_seconds() + 1.0;
    shutdown(c->fd, SHUT_WR);
    while (drained < (32u << 20)) {
        ssize_t n = srv_recv(c->fd, sink, sizeof sink, deadline);
        if (n <= 0) break;
        drained += (size_t)n;
    }
    close(c->fd);
}

/* SLOTS. --max-conns bounds the open connections, so clients that hold one
 * without using it (idle keep-alive connections, or clients trickling a
 * head or a body) must not lock the others out. The accept loop keeps
 * every connection on a list with its phase and since when; when the
 * server is full, or a client already holds --max-conns-per-client, the
 * connection that has been idle or reading the longest is closed to make
 * room (shutdown(): its thread wakes to end-of-stream and leaves). Only
 * connections whose request is being served, or queued, are never taken.
 * A client reading slowly still has its own deadlines (13.2). */
#define SERVER_SLOW_READ_S 1.0         /* reading a request longer than this may be reclaimed */

static void conn_set_phase(struct conn *c, enum conn_phase phase) {
    pthread_mutex_lock(&c->srv->lock);
    c->phase = phase;
    c->phase_since = now_seconds();
    pthread_mutex_unlock(&c->srv->lock);
}

/* Under srv->lock: the connection to reclaim (of `peer` only, if given),
 * or NULL. Idle ones first, then the slowest reader. */
static struct conn *conn_victim(struct server *srv, const char *peer) {
    struct conn *best = NULL;
    double now = now_seconds();
    for (struct conn *c = srv->conns; c; c = c->next) {
        if (c->evicted || c->phase == PHASE_BUSY || (peer && strcmp(c->peer, peer) != 0)) continue;
        if (c->phase == PHASE_READING && now - c->phase_since < SERVER_SLOW_READ_S) continue;
        bool better = !best || (c->phase == PHASE_IDLE && best->phase != PHASE_IDLE) ||
                      (c->phase == best->phase && c->phase_since < best->phase_since);
        if (better) best = c;
    }
    return best;
}

/* Under srv->lock. */
static void conn_evict(struct server *srv, struct conn *v) {
    v->evicted = true;
    shutdown(v->fd, SHUT_RDWR);
    srv->n_conns--;
    srv->m.evicted++;
}

/* Under srv->lock: may a connection from `peer` open, reclaiming a slot
 * if needed? */
static bool conn_admit(struct server *srv, const char *peer) {
    int mine = 0;
    for (struct conn *c = srv->conns; c; c = c->next)
        mine += !c->evicted && strcmp(c->peer, peer) == 0;
    if (mine >= srv->opt->max_conns_per_client) {
        struct conn *v = conn_victim(srv, peer);
        if (!v) return false;
        conn_evict(srv, v);
    }
    if (srv->n_conns >= srv->opt->max_conns) {
        struct conn *v = conn_victim(srv, NULL);
        if (!v) return false;
        conn_evict(srv, v);
    }
    return true;
}

/* Wait for the next request on a kept-alive connection: 1 when bytes came,
 * 0 at end-of-stream, the idle timeout, or eviction. */
static int conn_wait_next(struct conn *c, const struct strbuf *carry) {
    if (carry->len > 0) return 1;
    conn_set_phase(c, PHASE_IDLE);
    int w = srv_wait_readable(c->fd, now_seconds() + c->opt->keepalive_ms / 1000.0);
    return w == 1 && srv_peer_state(c->fd) == PEER_THERE;
}

static void metrics_count_answer(struct server *srv, int status) {
    pthread_mutex_lock(&srv->lock);
    srv->m.requests++;
    if (status >= 100 && status < 600) srv->m.by_class[status / 100]++;
    pthread_mutex_unlock(&srv->lock);
}

/* One request on the connection. Returns whether another may follow. */
static bool conn_serve_one(struct conn *c, struct strbuf *carry) {
    struct server *srv = c->srv;
    struct http_request r;
    char err[200] = "", note[256] = "";
    double t0 = now_seconds();
    memset(&r, 0, sizeof r);
    conn_set_phase(c, PHASE_READING);
    c->status = 0;
    c->head_only = c->stream_open = c->probed = false;
    int status = http_read_head(c->fd, &r, carry, c->opt, err, sizeof err);
    if (status == 0) status = http_parse_head(&r, err, sizeof err);
    c->requests_left--;
    c->keep_alive = status == 0 && c->opt->keepalive_ms > 0 && c->requests_left > 0 &&
                    http_wants_keep_alive(&r);
    if (status == 0) {
        snprintf(c->origin, sizeof c->origin, "%s", r.origin);
        conn_set_phase(c, PHASE_BUSY);
        conn_route(c, &r, carry, note, sizeof note);
    } else if (status > 0) {
        c->api = strncmp(r.path, "/v1/messages", 12) == 0 ? API_MESSAGES : API_CHAT;
        http_error_close(c, status, err);
    }
    if (status >= 0) {
        metrics_count_answer(srv, c->status);
        srv_log(srv, "%s %s %d %.3fs%s%s", r.method[0] ? r.method : "-", r.path[0] ? r.path : "-",
                c->status, now_seconds() - t0, note[0] ? " " : "", note);
    }
    bool again = status == 0 && c->keep_alive && !c->gone && c->status != 0;
    if (again) http_request_carry(&r, carry);
    http_request_free(&r);
    return again;
}

static void *conn_main(void *arg) {
    struct conn *c = arg;
    struct server *srv = c->srv;
    struct strbuf carry = {0};
    c->requests_left = c->opt->keepalive_requests;
    while (conn_serve_one(c, &carry) && !atomic_load(&srv->stopping) && conn_wait_next(c, &carry)) {
    }
    strbuf_free(&carry);
    pthread_mutex_lock(&srv->lock);           /* off the list before the fd can be reused */
    if (c->prev) c->prev->next = c->next;
    else srv->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    if (!c->evicted) srv->n_conns--;
    pthread_cond_broadcast(&srv->job_done);
    pthread_mutex_unlock(&srv->lock);
    conn_close(c);
    free(c);
    return NULL;
}

/* Refuse a connection at once, over the limit or out of threads, with a
 * 503 -- except a health check, which always gets its answer: the head is
 * read for at most SERVER_REFUSE_PEEK_S, on the accept thread. */
#define SERVER_REFUSE_PEEK_S 0.1

static void conn_refuse(struct server *srv, int fd) {
    static const char ok[] = "{\"status\":\"ok\"}";
    struct conn c = {.fd = fd, .srv = srv, .opt = srv->opt, .api = API_CHAT};
    char head[64];
    ssize_t n = srv_recv(fd, head, sizeof head - 1, now_seconds() + SERVER_REFUSE_PEEK_S);
    head[n > 0 ? n : 0] = '\0';
    bool health = strncmp(head, "GET /health ", 12) == 0 || strncmp(head, "HEAD /health ", 13) == 0;
    c.head_only = head[0] == 'H';
    if (health) http_respond(&c, 200, "application/json", ok, sizeof ok - 1, NULL);
    else http_error(&c, 503, "too many connections; retry shortly");
    pthread_mutex_lock(&srv->lock);
    srv->m.refused += !health;
    pthread_mutex_unlock(&srv->lock);
    close(fd);                  /* no draining here: the accept thread must not wait */
}

/* The client's address as text: the key of --max-conns-per-client. */
static void peer_name(int fd, char *out, size_t cap) {
    struct sockaddr_storage a;
    socklen_t len = sizeof a;
    snprintf(out, cap, "?");
    if (getpeername(fd, (struct sockaddr *)&a, &len) != 0) return;
    const void *ip = a.ss_family == AF_INET6 ? (const void *)&((struct sockaddr_in6 *)&a)->sin6_addr
                                             : (const void *)&((struct sockaddr_in *)&a)->sin_addr;
    inet_ntop(a.ss_family, ip, out, (socklen_t)cap);
}

static void conn_start(struct server *srv, int fd) {
    struct timeval send_timeout = {.tv_sec = SERVER_SEND_TIMEOUT_S};
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &send_timeout, sizeof send_timeout);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct conn *c = xcalloc(1, sizeof *c);
    c->fd = fd;
    c->srv = srv;
    c->opt = srv->opt;
    c->api = API_NONE;
    c->phase = PHASE_READING;
    c->phase_since = now_seconds();
    peer_name(fd, c->peer, sizeof c->peer);
    pthread_mutex_lock(&srv->lock);
    bool room = conn_admit(srv, c->peer);
    if (room) {
        srv->n_conns++;
        c->next = srv->conns;
        if (srv->conns) srv->conns->prev = c;
        srv->conns = c;
    }
    pthread_mutex_unlock(&srv->lock);
    if (!room) {
        free(c);
        conn_refuse(srv, fd);
        return;
    }
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &attr, conn_main, c) != 0) {
        pthread_mutex_lock(&srv->lock);
        if (c->prev) c->prev->next = c->next;
        else srv->conns = c->next;
        if (c->next) c->next->prev = c->prev;
        srv->n_conns--;
        pthread_mutex_unlock(&srv->lock);
        free(c);
        conn_refuse(srv, fd);
    }
    pthread_attr_destroy(&attr);
}

/* Bind and listen on host:port. Returns the socket or -1 with a message. */
static int server_listen(const struct server_options *o, int *bound_port, struct ds4_error *e) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE},
                    *res;
    char port[16];
    snprintf(port, sizeof port, "%d", o->port);
    int rc = getaddrinfo(o->host, port, &hints, &res);
    if (rc != 0) {
        fail(e, "cannot resolve --host %s: %s", o->host, gai_strerror(rc));
        return -1;
    }
    int fd = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol), one = 1;
    if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 128) != 0) {
        fail(e, "cannot listen on %s:%d: %s", o->host, o->port, strerror(errno));
        if (fd >= 0) close(fd);
        freeaddrinfo(res);
        return -1;
    }
    freeaddrinfo(res);
    struct sockaddr_storage addr;
    socklen_t len = sizeof addr;
    getsockname(fd, (struct sockaddr *)&addr, &len);
    *bound_port = ntohs(addr.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&addr)->sin6_port
                                                   : ((struct sockaddr_in *)&addr)->sin_port);
    return fd;
}

static volatile sig_atomic_t server_signal;

static void server_on_signal(int sig) {
    server_signal = sig;
}

/* What requests can cost at worst, together: every connection holding a
 * whole body, plus the parse pool (13.11). The server refuses to start when
 * that is more than half the machine's memory, naming the flags to lower,
 * so no combination of limits can be a way to exhaust it. */
static bool server_memory_fits(const struct server_options *o, struct ds4_error *e) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    double worst = (double)o->max_conns * (double)o->max_body + (double)parse_pool(o);
    double half = pages > 0 && page > 0 ? (double)pages * (double)page / 2 : 0;
    if (half > 0 && worst > half)
        return fail(
            e,
            "--max-conns x --max-body + --max-parses x --max-parse-mem = %.1f GiB, more than "
            "half this machine's memory (%.1f GiB): lower them",
            worst / (1 << 30), half / (1 << 30));
    return true;
}

/* Listening beyond loopback with no key lets anyone who can reach the port
 * use the model and read what it says: say so, loudly, at start-up. */
static void server_warn_exposed(const struct server_options *o) {
    if (o->api_key || host_is_loopback(o->host, strlen(o->host))) return;
    fprintf(stderr,
            "ds4-server: ************************************************************\n"
            "ds4-server: WARNING: listening on %s with no --api-key: anyone who can reach\n"
            "ds4-server: WARNING: this port can run generations and read the replies.\n"
            "ds4-server: WARNING: start with --api-key KEY, or --host 127.0.0.1.\n"
            "ds4-server: ************************************************************\n",
            o->host);
}

static bool server_init(struct server *srv, struct engine *eng, const struct tokenizer *tok,
                        const struct server_options *opt, struct ds4_error *e) {
    memset(srv, 0, sizeof *srv);
    srv->opt = opt;
    srv->eng = eng;
    srv->tok = tok;
    srv->listen_fd = -1;
    pthread_mutex_init(&srv->lock, NULL);
    pthread_mutex_init(&srv->log_lock, NULL);
    pthread_cond_init(&srv->wake, NULL);
    pthread_cond_init(&srv->job_done, NULL);
    pthread_cond_init(&srv->parse_room, NULL);
    if (!server_memory_fits(opt, e)) return false;
    tool_memory_init(&srv->mem, opt->no_exact_replay ? 0 : opt->tool_memory);
    srv->n_slots = opt->sessions;
    if (srv->n_slots <= 0)
        srv->n_slots = cache_default_sessions(eng->model, opt, available_memory_bytes());
    srv->slots = xcalloc((size_t)srv->n_slots, sizeof *srv->slots);
    for (int i = 0; i < srv->n_slots; i++) session_init(&srv->slots[i].s, eng);
    srv->cur = &srv->slots[0];
    sampler_init(&srv->sp, (struct sampler_options){0}, eng->model->cfg.vocab);
    generator_init(&srv->gen, &srv->cur->s, &srv->sp, opt->spec);
    srv->guide_logits = xmalloc((size_t)eng->model->cfg.vocab * sizeof(float));
    srv->token_count = xcalloc((size_t)eng->model->cfg.vocab, sizeof(int32_t));
    if (opt->test_script) {
        if (!test_script_load(&srv->script, opt->test_script, tok, e)) return false;
        fprintf(stderr, "ds4-server: TEST SCRIPT %s loaded (%zu rules): replies are scripted\n",
                opt->test_script, srv->script.n);
    }
    if (opt->log_path && !(srv->log = fopen(opt->log_path, "a")))
        return fail(e, "cannot open --log %s: %s", opt->log_path, strerror(errno));
    srv->kv_policy = kv_default_policy();
    if (opt->kv.dir && !kv_store_open(&srv->kv, &opt->kv, eng->model, e)) return false;
    srv->kv_on = opt->kv.dir != NULL;
    return true;
}

static void server_free(struct server *srv) {
    if (srv->listen_fd >= 0) close(srv->listen_fd);
    if (srv->log) fclose(srv->log);
    if (srv->kv_on) kv_store_close(&srv->kv);
    test_script_free(&srv->script);
    tool_memory_free(&srv->mem);
    generator_free(&srv->gen);
    sampler_free(&srv->sp);
    for (int i = 0; srv->slots && i < srv->n_slots; i++) slot_free(&srv->slots[i]);
    free(srv->slots);
    free(srv->guide_logits);
    free(srv->token_count);
    pthread_cond_destroy(&srv->wake);
    pthread_cond_destroy(&srv->job_done);
    pthread_cond_destroy(&srv->parse_room);
    pthread_mutex_destroy(&srv->log_lock);
    pthread_mutex_destroy(&srv->lock);
}

/* Stop: no new connections, wake the worker (it abandons its job), wait a
 * bounded time for client threads, which use the tokenizer, to finish. */
static void server_stop(struct server *srv, pthread_t worker) {
    pthread_mutex_lock(&srv->lock);
    atomic_store(&srv->stopping, true);
    pthread_cond_broadcast(&srv->wake);
    pthread_cond_broadcast(&srv->job_done);
    pthread_mutex_unlock(&srv->lock);
    pthread_join(worker, NULL);
    double deadline = now_seconds() + 10;
    pthread_mutex_lock(&srv->lock);
    while (srv->n_conns > 0 && now_seconds() < deadline) {
        pthread_mutex_unlock(&srv->lock);
        usleep(20000);
        pthread_mutex_lock(&srv->lock);
    }
    pthread_mutex_unlock(&srv->lock);
}

/* The server's entry point: serve until SIGINT or SIGTERM. Returns the
 * process exit status. */
static int server_main(struct engine *eng, const struct tokenizer *tok,
                       const struct server_options *opt) {
    static struct server srv;
    struct ds4_error e = {""};
    int port = 0;
    server_warn_exposed(opt);
    if (!server_init(&srv, eng, tok, opt, &e) ||
        (srv.listen_fd = server_listen(opt, &port, &e)) < 0) {
        fprintf(stderr, "ds4-server: %s\n", e.msg);
        server_free(&srv);
        return 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = server_on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    pthread_t worker;
    pthread_create(&worker, NULL, worker_main, &srv);
    fprintf(stderr, "ds4-server: listening on http://%s:%d (model %s, ctx %d, %d session%s in "
            "memory, checkpoints every %d tokens)%s%s%s\n", opt->host, port, opt->model_name,
            opt->ctx, srv.n_slots, srv.n_slots == 1 ? "" : "s", opt->checkpoint_every,
            opt->api_key ? ", API key required" : "",
            srv.kv_on ? ", sessions on disk in " : "", srv.kv_on ? opt->kv.dir : "");
    if (opt->port_file) {
        FILE *f = fopen(opt->port_file, "w");
        if (f) {
            fprintf(f, "%d\n", port);
            fclose(f);
        }
    }
    while (!server_signal) {
        struct pollfd p = {.fd = srv.listen_fd, .events = POLLIN};
        if (poll(&p, 1, 250) <= 0) continue;
        int fd = accept(srv.listen_fd, NULL, NULL);
        if (fd >= 0) conn_start(&srv, fd);
    }
    fprintf(stderr, "ds4-server: stopping\n");
    server_stop(&srv, worker);
    for (int i = 0; srv.kv_on && i < srv.n_slots; i++)     /* the worker is gone: they are ours */
        kv_store_save_live(&srv.kv, &srv.kv_policy, &srv.slots[i].s, tok, srv.slots[i].fed,
                           srv.slots[i].n_fed, KV_REASON_SHUTDOWN);
    server_free(&srv);
    return 0;
}

/* Declared ahead: defined in a later chapter. */
struct ds4_error;
struct engine;
struct ppl_stats;
struct spec_options;
struct spec_stats;
struct tokenizer;
static int check_vectors(struct engine *eng, const char *path);
static double bench_decode(struct engine *eng, const int32_t *prompt, int n_prompt, int n,
                           struct spec_options spec, struct spec_stats *stats, double *prefill_s,
                           double *prefill_cpu_s, struct ds4_error *e);
static int run_bench(struct engine *eng, int n_prefill, int n_decode, struct spec_options spec,
                     bool roofline);
static bool ppl_window(struct engine *eng, const int32_t *ids, int n, int chunk,
                       struct ppl_stats *st, struct ds4_error *e);
static int perplexity_command(struct engine *eng, const struct tokenizer *tok, const char *path,
                              int window, int chunk);
static int tokenize_command(const char *gguf_path, const char *path);

/* ============================================================================
 * Chapter 14. The command line and main()
 * ============================================================================
 *
 * The last chapter is the front door: one binary that generates from token
 * ids, chats, renders prompts, checks vectors, benchmarks and serves. 13.1
 * parses the options; 13.2 is the text side (one turn, the interactive
 * chat); main() loads what the chosen action needs and dispatches.
 *
 * 14.1 Options. They are parsed once, into one struct, and validated there:
 * a bad flag or value stops with a message and exit status 2 before any
 * model loads.
 * ------------------------------------------------------------------------- */

struct cli_options {
    const char *model_path, *mtp_path, *tokens, *check_vectors;
    const char *prompt, *render_chat, *mode_name;
    const char *backend_name;     /* --backend, resolved into engine.backend */
    const char *perplexity, *tokenize_file;   /* --perplexity FILE, --tokenize FILE (18.3, 18.4) */
    int n_predict, chunk, bench_prefill, bench_decode, ppl_window;
    bool bench, roofline, show_help, raw, nothink;
    struct map_options map;
    enum chat_mode mode;          /* from --mode, or --nothink */
    struct spec_options spec;     /* --mtp-draft, --mtp-gate */
    bool server;                  /* --server */
    struct server_options server_opt;   /* the server's own flags (chapter 13) */
    struct kv_store_options kv;   /* --kv-disk-*: sessions on disk (ch. 12); NULL dir = off */
    const char *kv_list, *kv_check, *kv_clear;   /* the store's commands: need no model */
    struct engine_options engine;
    struct sampler_options sampling;
};

static void print_usage(FILE *f) {
    fprintf(
        f,
        "usage: ds4 [-m MODEL.gguf] [--mtp MTP.gguf] --tokens \"ID ID ...\" [-n N] [options]\n"
        "       ds4 --check-vectors FILE.json [-m MODEL.gguf] [--mtp MTP.gguf]\n"
        "       ds4 --bench [-m MODEL.gguf] [--bench-prefill N] [--bench-decode N]\n"
        "       ds4 [-m MODEL.gguf] -p \"TEXT\" [--nothink] [--raw]     one chat turn\n"
        "       ds4 [-m MODEL.gguf]                   interactive chat (/think /nothink /quit)\n"
        "       ds4 --render-chat FILE.json [--mode thinking|chat|max]\n"
        "       ds4 --perplexity FILE.txt [-m MODEL.gguf] [--mtp MTP.gguf] [--ppl-window N]\n"
        "       ds4 --tokenize FILE.txt [-m MODEL_OR_VOCAB.gguf]\n"
        "       ds4 --server [-m MODEL.gguf] [--host H] [--port N] [--api-key K]\n"
        "       ds4 --kv-list DIR | --kv-check DIR | --kv-clear DIR\n"
        "\n"
        "model:\n"
        "  -m, --model FILE      model GGUF (default ./ds4flash.gguf, else the shipped tiny "
        "model)\n"
        "      --mtp FILE        MTP GGUF (the separate mtp.0.* file): speculative decoding\n"
        "      --mtp-draft K     tokens drafted per step, 0..15 (default 1; 0 = no drafting)\n"
        "      --mtp-gate P      draft only while the MTP's top-1 probability >= P (default 0)\n"
        "generation:\n"
        "  -p, --prompt TEXT     a user message, rendered with the V4 chat template\n"
        "      --raw             send the -p text as is, without the chat template\n"
        "      --nothink         chat mode: answer without a thinking block\n"
        "      --mode M          thinking (default), chat, or max (Think Max)\n"
        "      --render-chat F   print the prompt the chat template makes of F and exit\n"
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
        "      --backend B       cpu, or the GPU built in (make cuda: cuda; macOS: metal),\n"
        "                        which is the default when its device is present\n"
        "      --fast            8-bit activations and integer kernels (see README)\n"
        "      --hugepages       ask for 2 MiB pages for the mapped weights\n"
        "      --populate        read the whole file into memory at start\n"
        "      --mlock           lock the weights in RAM (servers)\n"
        "sessions on disk (chat, -p, --tokens and --server):\n"
        "      --kv-disk-dir DIR  save sessions in DIR and resume prompts from there\n"
        "      --kv-disk-space-mb N  most MB the snapshots in DIR may take (default 4096)\n"
        "      --kv-disk-write-mb-per-hour N  most MB written per hour (default 8192)\n"
        "      --kv-list DIR     list the snapshots in DIR\n"
        "      --kv-check DIR    verify every snapshot in DIR, remove the bad ones\n"
        "      --kv-clear DIR    remove every snapshot in DIR\n"
        "tools:\n"
        "      --check-vectors F run the oracle vectors in F; exit 0 only if all pass\n"
        "      --bench           print prefill/decode speed and weight traffic\n"
        "      --perplexity F    mean NLL and perplexity of text file F (--mtp: draft acceptance)\n"
        "      --ppl-window N    tokens per --perplexity window, BOS included (default 512)\n"
        "      --tokenize F      print the token ids of text file F (-m: any GGUF with a vocab)\n"
        "      --roofline        with --bench: read bandwidth, kernel GB/s, decode vs ceiling\n"
        "      --profile         with --bench on a GPU: GPU time per kernel of a decode token\n"
        "      --server          serve the OpenAI and Anthropic APIs (flags below)\n"
        "  -h, --help            this text\n\n%s",
        SERVER_USAGE);
}

/* Options that take an integer: name, bounds, destination. */
struct int_flag { const char *short_name, *long_name; long lo, hi; int *dst; };
struct float_flag { const char *long_name; double lo, hi; float *dst; };
struct size_flag { const char *long_name; long lo, hi; int64_t *dst; };
struct string_flag { const char *short_name, *long_name; const char **dst; };

static bool flag_is(const char *arg, const char *short_name, const char *long_name) {
    return (short_name && strcmp(arg, short_name) == 0) ||
           (long_name && strcmp(arg, long_name) == 0);
}

/* --mode and --nothink name the chat template's mode; thinking by default. */
static bool parse_mode(struct cli_options *o, struct ds4_error *e) {
    o->mode = o->nothink ? CHAT_MODE_CHAT : CHAT_MODE_THINKING;
    if (!o->mode_name) return true;
    if (o->nothink) return fail(e, "--nothink and --mode both choose the mode: give one");
    if (strcmp(o->mode_name, "thinking") == 0) o->mode = CHAT_MODE_THINKING;
    else if (strcmp(o->mode_name, "chat") == 0) o->mode = CHAT_MODE_CHAT;
    else if (strcmp(o->mode_name, "max") == 0) o->mode = CHAT_MODE_THINK_MAX;
    else return fail(e, "--mode must be thinking, chat or max (got '%s')", o->mode_name);
    return true;
}

/* The disk store's flags: budgets only with a directory, one command at a
 * time. The server's context bounds what a snapshot may hold. */
static bool parse_kv(struct cli_options *o, struct ds4_error *e) {
    if ((o->kv.space_mb || o->kv.write_mb_per_hour) && !o->kv.dir)
        return fail(e, "--kv-disk-space-mb and --kv-disk-write-mb-per-hour need --kv-disk-dir");
    if (!!o->kv_list + !!o->kv_check + !!o->kv_clear > 1)
        return fail(e, "give one of --kv-list, --kv-check and --kv-clear");
    o->server_opt.kv = o->kv;
    o->server_opt.kv.ctx = (uint32_t)o->server_opt.ctx;
    return true;
}

static bool parse_args(int argc, char **argv, struct cli_options *o, struct ds4_error *e) {
    memset(o, 0, sizeof *o);
    server_options_default(&o->server_opt);
    o->n_predict = 16;
    o->chunk = 128;
    o->bench_prefill = 64;
    o->bench_decode = 16;
    o->ppl_window = 512;
    o->sampling.top_p = 1.0f;
    o->sampling.seed = 1;
    o->spec.draft = 1;
    long seed = 1;
    struct int_flag ints[] = {
        { "-n", "--n-predict", 0, 1 << 24, &o->n_predict },
        { "-t", "--threads", 1, 1024, &o->engine.threads },
        { NULL, "--chunk", 1, 1 << 16, &o->chunk },
        { NULL, "--top-k", 0, 1 << 24, &o->sampling.top_k },
        { NULL, "--bench-prefill", 1, 1 << 20, &o->bench_prefill },
        { NULL, "--bench-decode", 1, 1 << 20, &o->bench_decode },
        { NULL, "--mtp-draft", 0, 15, &o->spec.draft },
        { NULL, "--ppl-window", 2, 1 << 20, &o->ppl_window },
    };
    struct float_flag floats[] = {
        { "--temp", 0, 100, &o->sampling.temperature },
        { "--top-p", 0, 1, &o->sampling.top_p },
        { "--min-p", 0, 1, &o->sampling.min_p },
        { "--mtp-gate", 0, 1, &o->spec.gate },
    };
    struct string_flag strings[] = {
        { "-m", "--model", &o->model_path }, { NULL, "--mtp", &o->mtp_path },
        { NULL, "--tokens", &o->tokens }, { NULL, "--check-vectors", &o->check_vectors },
        { "-p", "--prompt", &o->prompt }, { NULL, "--render-chat", &o->render_chat },
        { NULL, "--mode", &o->mode_name }, { NULL, "--kv-disk-dir", &o->kv.dir },
        { NULL, "--kv-list", &o->kv_list }, { NULL, "--kv-check", &o->kv_check },
        { NULL, "--kv-clear", &o->kv_clear }, { NULL, "--backend", &o->backend_name },
        { NULL, "--perplexity", &o->perplexity }, { NULL, "--tokenize", &o->tokenize_file },
    };
    struct size_flag sizes[] = {
        { "--kv-disk-space-mb", 1, 1L << 30, &o->kv.space_mb },
        { "--kv-disk-write-mb-per-hour", 1, 1L << 30, &o->kv.write_mb_per_hour },
    };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (flag_is(a, "-h", "--help")) { o->show_help = true; continue; }
        if (flag_is(a, NULL, "--bench")) { o->bench = true; continue; }
        if (flag_is(a, NULL, "--roofline")) { o->roofline = true; continue; }
        if (flag_is(a, NULL, "--hugepages")) { o->map.hugepage = true; continue; }
        if (flag_is(a, NULL, "--populate")) { o->map.populate = true; continue; }
        if (flag_is(a, NULL, "--mlock")) { o->map.mlock = true; continue; }
        if (flag_is(a, NULL, "--reference-kernels")) {
            o->engine.reference_kernels = true;
            continue;
        }
        if (flag_is(a, NULL, "--fast")) { o->engine.q8_activations = true; continue; }
        if (flag_is(a, NULL, "--profile")) { o->engine.gpu_profile = true; continue; }
        if (flag_is(a, NULL, "--raw")) { o->raw = true; continue; }
        if (flag_is(a, NULL, "--server")) { o->server = true; continue; }
        if (flag_is(a, NULL, "--nothink")) { o->nothink = true; continue; }
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
        for (size_t k = 0; !matched && k < sizeof sizes / sizeof sizes[0]; k++) {
            if (strcmp(a, sizes[k].long_name) != 0) continue;
            long v;
            if (!value || !parse_long(value, sizes[k].lo, sizes[k].hi, &v))
                return fail(e, "%s needs an integer in %ld..%ld", a, sizes[k].lo, sizes[k].hi);
            *sizes[k].dst = v;
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
        if (matched) {
            i++;   /* every option matched above took a value */
            continue;
        }
        int server_flag = server_parse_option(&o->server_opt, argc, argv, &i, e);
        if (server_flag < 0) return false;
        if (server_flag == 0) return fail(e, "unknown option '%s' (try --help)", a);
    }
    o->server_opt.chunk = o->chunk;
    o->server_opt.spec = o->spec;
#ifdef DS4_GPU
    /* A GPU build runs on its GPU when one is there, else on the CPU. */
    if (!o->backend_name) o->backend_name = gpu_available() ? DS4_GPU_NAME : "cpu";
#endif
    if (o->backend_name && !(o->engine.backend = backend_by_name(o->backend_name, e))) return false;
    return parse_kv(o, e) && parse_mode(o, e);
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

static void print_spec_stats(const struct generator *g) {
    const struct spec_stats *st = &g->stats;
    if (g->spec.draft == 0 || st->main_forwards == 0) return;
    fprintf(stderr, "ds4: MTP drafted %lld, accepted %lld (%.1f%%), %.2f tokens per main forward\n",
            (long long)st->drafted, (long long)st->accepted,
            st->drafted ? 100.0 * st->accepted / st->drafted : 0.0,
            (double)st->emitted / st->main_forwards);
}

/* --tokens with --kv-disk-dir: a prompt of ids has no text, so the store is
 * searched by the ids themselves (12.7), and the prompt is fed with the
 * cold and continued saves of 12.9. */
static bool feed_tokens_with_store(struct kv_store *st, struct session *s,
                                   const struct tokenizer *tok, const int32_t *ids, int64_t n,
                                   int chunk, struct ds4_error *e) {
    struct kv_policy p = kv_default_policy();
    struct kv_hit hit;
    int64_t cold_at = 0;
    if (kv_store_lookup_tokens(st, s, ids, n, &hit)) {
        kv_log(st, "loaded %lld tokens from %s (%.12s...) in %.3f s", (long long)hit.n_tokens,
               st->dir, hit.sha1, hit.load_seconds);
        free(hit.tokens);
    } else {
        cold_at = kv_cold_save_point(&p, ids, n, tok->sp.user, tok->sp.assistant);
    }
    return kv_store_feed(st, &p, s, tok, ids, n, cold_at, chunk, e);
}

static int generate(struct engine *eng, const struct tokenizer *tok, const struct cli_options *o) {
    struct ds4_error e = { "" };
    int n;
    int32_t *prompt = parse_token_list(o->tokens, &n, &e);
    if (!prompt) {
        fprintf(stderr, "ds4: %s\n", e.msg);
        return 2;
    }
    struct kv_store st;
    if (o->kv.dir && !kv_store_open(&st, &o->kv, eng->model, &e)) {
        fprintf(stderr, "ds4: %s\n", e.msg);
        free(prompt);
        return 1;
    }
    int V = eng->model->cfg.vocab;
    struct session s;
    session_init(&s, eng);
    struct sampler sp;
    sampler_init(&sp, o->sampling, V);
    struct generator g;
    generator_init(&g, &s, &sp, o->spec);
    int32_t *all = xmalloc(((size_t)n + (size_t)o->n_predict + MATMUL_DECODE_PATH_MAX_TOKENS) *
                           sizeof(int32_t));
    memcpy(all, prompt, (size_t)n * sizeof(int32_t));
    int64_t n_all = n;               /* the tokens in s, for the shutdown save */
    double t0 = now_seconds();
    bool ok = o->kv.dir ? feed_tokens_with_store(&st, &s, tok, prompt, n, o->chunk, &e)
                        : session_feed(&s, prompt, n, o->chunk, &e);
    double t1 = now_seconds();
    int printed = 0;
    while (ok && printed < o->n_predict) {
        int32_t next[MATMUL_DECODE_PATH_MAX_TOKENS];
        int got = generator_step(&g, next, &e);
        ok = got > 0;
        for (int i = 0; i < got; i++) all[n_all++] = next[i];
        for (int i = 0; i < got && printed < o->n_predict; i++)
            printf("%s%d", printed++ ? " " : "", next[i]);
        fflush(stdout);
    }
    double t2 = now_seconds();
    if (o->n_predict > 0) printf("\n");
    if (ok) {
        fprintf(stderr, "ds4: prompt %d tokens in %.3f s, generated %d tokens in %.3f s\n", n,
                t1 - t0, o->n_predict, t2 - t1);
        print_spec_stats(&g);
    } else {
        fprintf(stderr, "ds4: %s\n", e.msg);
    }
    if (o->kv.dir) {
        struct kv_policy p = kv_default_policy();
        if (ok) kv_store_save_live(&st, &p, &s, tok, all, n_all, KV_REASON_SHUTDOWN);
        kv_store_close(&st);
    }
    generator_free(&g);
    sampler_free(&sp);
    session_free(&s);
    free(all);
    free(prompt);
    return ok ? 0 : 1;
}

/* ----------------------------------------------------------------------------
 * 14.2 Text prompts and the interactive chat.
 *
 * A conversation is a list of messages. Each turn renders the WHOLE list
 * with the official V4 template, tokenizes it, and feeds the session only
 * what it has not seen: the longest common prefix of the new prompt and the
 * tokens already in the session is reused. (When the template rewrites
 * history -- earlier reasoning is dropped once a new user turn arrives in
 * thinking mode -- the prefix shrinks and the session starts again, exactly
 * as the official encoder intends.)
 *
 * With --kv-disk-dir the session is also a file (chapter 12): a new
 * process, or a turn that starts over, resumes from the longest prefix of
 * the rendered prompt saved there, and the session is saved at the moments
 * of 12.9 (cold, continued, evict, and shutdown when the program ends
 * normally). `ds4 -p` twice with the same prompt prefills it once.
 *
 * Ctrl+C stops a generation in progress; at the prompt it ends the program.
 * ------------------------------------------------------------------------- */

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig) {
    (void)sig;
    interrupted = 1;
}

struct conversation {
    struct engine *eng;
    const struct tokenizer *tok;
    const struct cli_options *opt;
    struct session s;
    struct sampler sp;
    struct generator gen;         /* plain or speculative decoding */
    int32_t *fed;                 /* tokens the session has processed */
    int64_t n_fed, cap_fed;
    struct strbuf messages;       /* the JSON array of messages so far, without ']' */
    struct kv_store store;        /* --kv-disk-dir, when use_store */
    bool use_store;
    struct kv_policy policy;
};

static bool conversation_init(struct conversation *c, struct engine *eng,
                              const struct tokenizer *tok, const struct cli_options *o,
                              struct ds4_error *e) {
    memset(c, 0, sizeof *c);
    c->eng = eng;
    c->tok = tok;
    c->opt = o;
    session_init(&c->s, eng);
    sampler_init(&c->sp, o->sampling, eng->model->cfg.vocab);
    generator_init(&c->gen, &c->s, &c->sp, o->spec);
    strbuf_puts(&c->messages, "[");
    c->policy = kv_default_policy();
    c->use_store = o->kv.dir && kv_store_open(&c->store, &o->kv, eng->model, e);
    return c->use_store || !o->kv.dir;
}

/* `clean`: the program ends normally, so the session is worth keeping. */
static void conversation_free(struct conversation *c, bool clean) {
    if (c->use_store && clean)
        kv_store_save_live(&c->store, &c->policy, &c->s, c->tok, c->fed, c->n_fed,
                           KV_REASON_SHUTDOWN);
    if (c->use_store) kv_store_close(&c->store);
    print_spec_stats(&c->gen);
    generator_free(&c->gen);
    session_free(&c->s);
    sampler_free(&c->sp);
    free(c->fed);
    strbuf_free(&c->messages);
}

static void remember_fed(struct conversation *c, int32_t id) {
    if (c->n_fed == c->cap_fed) {
        c->cap_fed = c->cap_fed ? 2 * c->cap_fed : 1024;
        c->fed = xrealloc(c->fed, (size_t)c->cap_fed * sizeof(int32_t));
    }
    c->fed[c->n_fed++] = id;
}

/* Feed ids[n_fed .. n) (ids[0 .. n_fed) are in the session already), with
 * the store's save points when there is a store; `cold_at` as in 12.9. */
static bool feed_rest(struct conversation *c, const int32_t *ids, int64_t n, int64_t cold_at,
                      struct ds4_error *e) {
    int64_t from = c->n_fed;
    bool ok = c->use_store
        ? kv_store_feed(&c->store, &c->policy, &c->s, c->tok, ids, n, cold_at, c->opt->chunk, e)
        : session_feed(&c->s, ids + from, n - from, c->opt->chunk, e);
    for (int64_t i = from; ok && i < n; i++) remember_fed(c, ids[i]);
    return ok;
}

/* Start over from the store: the longest cached prefix of `text`, then the
 * rest. A miss prefills `ids`, with a cold save on the way (12.9). */
static bool feed_from_store(struct conversation *c, const char *text, size_t len,
                            const int32_t *ids, int64_t n, struct ds4_error *e) {
    struct kv_hit hit;
    size_t n_resumed;
    int32_t *resumed = kv_store_resume(&c->store, &c->s, c->tok, text, len, &n_resumed, &hit);
    if (!resumed)
        return feed_rest(c, ids, n, kv_cold_save_point(&c->policy, ids, n, c->tok->sp.user,
                                                       c->tok->sp.assistant), e);
    for (int64_t i = 0; i < hit.n_tokens; i++) remember_fed(c, resumed[i]);
    c->gen.have_residual = false;
    bool ok = feed_rest(c, resumed, (int64_t)n_resumed, 0, e);
    free(resumed);
    return ok;
}

/* Bring the session to the prompt `text`, whose tokens are ids[0..n). The
 * common prefix with what the session holds is reused. Otherwise the
 * session starts over, from the disk store if there is one: the session
 * being dropped is saved there first (reason "evict"), and the prompt is
 * looked up by its text (12.9.1). After a hit the session's tokens are
 * the cached ones plus the rest of the text, and `fed` records exactly
 * those. */
static bool feed_prompt(struct conversation *c, const char *text, size_t len, const int32_t *ids,
                        int64_t n, struct ds4_error *e) {
    int64_t same = 0;
    while (same < n && same < c->n_fed && c->fed[same] == ids[same]) same++;
    bool extends = same == c->n_fed && same < n;
    if (extends && (same > 0 || !c->use_store)) return feed_rest(c, ids, n, 0, e);
    if (c->use_store)
        kv_store_save_live(&c->store, &c->policy, &c->s, c->tok, c->fed, c->n_fed, KV_REASON_EVICT);
    session_free(&c->s);                   /* diverged (or nothing new): start over */
    session_init(&c->s, c->eng);
    c->n_fed = 0;
    return c->use_store ? feed_from_store(c, text, len, ids, n, e) : feed_rest(c, ids, n, 0, e);
}

/* Sample up to max_tokens, streaming text to stdout, stopping at the end of
 * sentence token or Ctrl+C. The reply's text is left in `reply`. */
static bool generate_reply(struct conversation *c, int max_tokens, struct strbuf *reply,
                           struct ds4_error *e) {
    struct token_stream ts = { 0 };
    interrupted = 0;
    bool done = false;
    for (int made = 0; made < max_tokens && !done && !interrupted;) {
        int32_t next[MATMUL_DECODE_PATH_MAX_TOKENS];
        int got = generator_step(&c->gen, next, e);
        if (got <= 0) return false;
        for (int i = 0; i < got; i++) remember_fed(c, next[i]);   /* all are in the session */
        for (int i = 0; i < got && !done; i++) {
            done = next[i] == c->tok->sp.eos || ++made >= max_tokens;
            if (next[i] == c->tok->sp.eos) break;
            size_t before = reply->len;
            token_stream_push(c->tok, &ts, next[i], reply);
            fwrite(reply->data + before, 1, reply->len - before, stdout);
        }
        fflush(stdout);
    }
    size_t before = reply->len;
    token_stream_flush(&ts, reply);
    fwrite(reply->data + before, 1, reply->len - before, stdout);
    printf("\n");
    if (interrupted) fprintf(stderr, "[stopped]\n");
    return true;
}

static void add_message(struct conversation *c, const char *role, const char *content, size_t len,
                        const char *reasoning, size_t reasoning_len) {
    if (c->messages.len > 1) strbuf_puts(&c->messages, ",");
    strbuf_printf(&c->messages, "{\"role\":\"%s\",\"content\":", role);
    json_write_string(&c->messages, content, len);
    if (reasoning) {
        strbuf_puts(&c->messages, ",\"reasoning_content\":");
        json_write_string(&c->messages, reasoning, reasoning_len);
    }
    strbuf_puts(&c->messages, "}");
}

/* Render the conversation, feed it, generate one reply, record it. */
static bool chat_turn(struct conversation *c, const char *user_text, enum chat_mode mode,
                      struct ds4_error *e) {
    add_message(c, "user", user_text, strlen(user_text), NULL, 0);
    struct strbuf doc = { 0 }, prompt = { 0 }, reply = { 0 };
    strbuf_append(&doc, c->messages.data, c->messages.len);
    strbuf_puts(&doc, "]");
    char err[256];
    struct json *messages = json_parse(doc.data, doc.len, 64, err, sizeof err);
    struct chat_options co = { .mode = mode, .context_tokens = CHAT_THINK_MAX_MIN_CONTEXT };
    int32_t *ids = NULL;
    size_t n = 0;
    bool ok = messages && chat_render(messages, NULL, &co, &prompt, err, sizeof err) == 0 &&
              tokenize(c->tok, prompt.data, prompt.len, true, &ids, &n) == 0;
    if (!ok) fail(e, "cannot render the conversation: %s", err);
    ok = ok && feed_prompt(c, prompt.data, prompt.len, ids, (int64_t)n, e) &&
         generate_reply(c, c->opt->n_predict, &reply, e);
    if (ok) {
        struct dsml_parser dp;
        dsml_parser_init(&dp, mode != CHAT_MODE_CHAT, NULL, NULL);
        dsml_parser_feed(&dp, reply.data ? reply.data : "", reply.len);
        dsml_parser_finish(&dp);
        add_message(c, "assistant", dp.content.data ? dp.content.data : "", dp.content.len,
                    mode != CHAT_MODE_CHAT ? (dp.reasoning.data ? dp.reasoning.data : "") : NULL,
                    dp.reasoning.len);
        dsml_parser_free(&dp);
    }
    json_free(messages);
    free(ids);
    strbuf_free(&doc);
    strbuf_free(&prompt);
    strbuf_free(&reply);
    return ok;
}

/* -p TEXT: one turn (or, with --raw, the text as the whole prompt). */
static int run_prompt(struct engine *eng, const struct tokenizer *tok,
                      const struct cli_options *o) {
    struct conversation c;
    struct ds4_error e = { "" };
    bool ok = conversation_init(&c, eng, tok, o, &e);
    if (ok && o->raw) {
        int32_t *ids = NULL;
        size_t n = 0;
        struct strbuf reply = { 0 };
        ok = tokenize(tok, o->prompt, strlen(o->prompt), true, &ids, &n) == 0 && n > 0;
        if (!ok) fail(&e, "the prompt tokenizes to nothing");
        ok = ok && feed_prompt(&c, o->prompt, strlen(o->prompt), ids, (int64_t)n, &e) &&
             generate_reply(&c, o->n_predict, &reply, &e);
        free(ids);
        strbuf_free(&reply);
    } else if (ok) {
        ok = chat_turn(&c, o->prompt, o->mode, &e);
    }
    if (!ok) fprintf(stderr, "ds4: %s\n", e.msg);
    conversation_free(&c, ok);
    return ok ? 0 : 1;
}

/* The interactive chat: one line per user message. */
static int run_chat(struct engine *eng, const struct tokenizer *tok, const struct cli_options *o) {
    struct conversation c;
    struct ds4_error e = { "" };
    if (!conversation_init(&c, eng, tok, o, &e)) {
        fprintf(stderr, "ds4: %s\n", e.msg);
        conversation_free(&c, false);
        return 1;
    }
    enum chat_mode mode = o->mode;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;      /* no SA_RESTART: Ctrl+C interrupts the read */
    sigaction(SIGINT, &sa, NULL);
    bool tty = isatty(0);
    if (tty) fprintf(stderr, "ds4 chat: /think, /nothink, /quit; Ctrl+C stops a reply.\n");
    char line[65536];
    int rc = 0;
    for (;;) {
        if (tty) fprintf(stderr, "> ");
        interrupted = 0;
        if (!fgets(line, sizeof line, stdin)) break;       /* EOF or Ctrl+C at the prompt */
        line[strcspn(line, "\r\n")] = 0;
        if (line[0] == 0) continue;
        if (strcmp(line, "/quit") == 0) break;
        if (strcmp(line, "/think") == 0) {
            mode = CHAT_MODE_THINKING;
            fprintf(stderr, "[thinking mode]\n");
            continue;
        }
        if (strcmp(line, "/nothink") == 0) {
            mode = CHAT_MODE_CHAT;
            fprintf(stderr, "[chat mode]\n");
            continue;
        }
        if (!chat_turn(&c, line, mode, &e)) {
            fprintf(stderr, "ds4: %s\n", e.msg);
            rc = 1;
            break;
        }
    }
    conversation_free(&c, rc == 0);
    return rc;
}

static int render_chat_command(const struct cli_options *o) {
    struct strbuf out = { 0 };
    char err[256];
    if (render_chat_file(o->render_chat, o->mode, &out, err, sizeof err) != 0) {
        fprintf(stderr, "ds4: %s\n", err);
        strbuf_free(&out);
        return 1;
    }
    fwrite(out.data ? out.data : "", 1, out.len, stdout);
    strbuf_free(&out);
    return 0;
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
    if (o.render_chat) return render_chat_command(&o);
    if (o.kv_list) return kv_list_command(o.kv_list);
    if (o.kv_check) return kv_check_command(o.kv_check);
    if (o.kv_clear) return kv_clear_command(o.kv_clear);
    if (o.tokens && o.prompt) {
        fprintf(stderr, "ds4: give either --tokens or -p, not both\n");
        return 2;
    }
    char buf[1100];
    const char *path = o.model_path ? o.model_path : default_model_path(argv[0], buf, sizeof buf);
    if (!path) {
        fprintf(stderr, "ds4: no model: pass -m FILE, put ds4flash.gguf here "
                        "(./download_model.sh), or run 'make' to build vectors/tiny.gguf\n");
        return 1;
    }
    if (o.tokenize_file) return tokenize_command(path, o.tokenize_file);
    struct model model;
    if (!model_load(&model, path, o.mtp_path, &e)) {
        fprintf(stderr, "ds4: %s\n", e.msg);
        return 1;
    }
    gguf_advise(&model.file, o.map);
    gguf_advise(&model.mtp_file, o.map);
    /* Text needs the vocabulary; token ids, the checker and the bench do not
     * (unless token ids are saved to disk: a snapshot's key is its text). */
    bool wants_text =
        o.server || (o.tokens && o.kv.dir) || (!o.tokens && !o.check_vectors && !o.bench);
    struct tokenizer tok;
    memset(&tok, 0, sizeof tok);
    if (wants_text && !tokenizer_load_gguf(&tok, &model.file, model.cfg.vocab, &e)) {
        fprintf(stderr, "ds4: %s\n", e.msg);
        model_free(&model);
        return 1;
    }
    struct engine eng;
    engine_init(&eng, &model, o.engine);
    int rc = o.server        ? server_main(&eng, &tok, &o.server_opt)
           : o.check_vectors ? check_vectors(&eng, o.check_vectors)
           : o.bench         ? run_bench(&eng, o.bench_prefill, o.bench_decode, o.spec, o.roofline)
           : o.perplexity    ? perplexity_command(&eng, &tok, o.perplexity, o.ppl_window, o.chunk)
           : o.tokens        ? generate(&eng, &tok, &o)
           : o.prompt        ? run_prompt(&eng, &tok, &o)
                             : run_chat(&eng, &tok, &o);
    engine_free(&eng);
    if (wants_text) tokenizer_free(&tok);
    model_free(&model);
    return rc;
}
#endif

/* ============================================================================
 * Chapter 15. SIMD twins: x86-64 AVX2
 * ============================================================================
 *
 * An appendix to the chapter "Quantized blocks".
 */

/* ---- 15.1 x86-64: AVX2, FMA and F16C -------------------------------------- */

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

/* All three extensions arrived together (Intel Haswell 2013, AMD Zen), so
 * they are one requirement. Build with -march=native or -mavx2 -mfma -mf16c. */

static float quant_avx2_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static float quant_avx2_half(uint16_t h) {
    return _cvtsh_ss(h);
}

static float quant_avx2_sum4(const __m256 acc[4]) {
    return quant_avx2_hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]),
                                         _mm256_add_ps(acc[2], acc[3])));
}

/* Dense rows. F16 converts 8 halves with one instruction (vcvtph2ps); BF16
 * widens 8 values to 32 bits and shifts them into the top half. Each dot
 * takes 32 values per step into four sums, then 8 at a time, then finishes
 * the last n % 8 in scalar code. */
static __m256 quant_avx2_load_f16(const uint16_t *h) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
}

static __m256 quant_avx2_load_bf16(const uint16_t *h) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)h));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

static float quant_avx2_dot_f32(const float *a, const float *b, int64_t n) {
    __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(),
                      _mm256_setzero_ps(), _mm256_setzero_ps() };
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int r = 0; r < 4; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * r),
                                     _mm256_loadu_ps(b + i + 8 * r), acc[r]);
    for (; i + 8 <= n; i += 8)
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc[0]);
    float sum = quant_avx2_sum4(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static float quant_avx2_dot_f16(const uint16_t *w, const float *x, int64_t n) {
    __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(),
                      _mm256_setzero_ps(), _mm256_setzero_ps() };
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int r = 0; r < 4; r++)
            acc[r] = _mm256_fmadd_ps(quant_avx2_load_f16(w + i + 8 * r),
                                     _mm256_loadu_ps(x + i + 8 * r), acc[r]);
    for (; i + 8 <= n; i += 8)
        acc[0] = _mm256_fmadd_ps(quant_avx2_load_f16(w + i), _mm256_loadu_ps(x + i), acc[0]);
    float sum = quant_avx2_sum4(acc);
    for (; i < n; i++) sum += f16_to_f32(w[i]) * x[i];
    return sum;
}

static float quant_avx2_dot_bf16(const uint16_t *w, const float *x, int64_t n) {
    __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(),
                      _mm256_setzero_ps(), _mm256_setzero_ps() };
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int r = 0; r < 4; r++)
            acc[r] = _mm256_fmadd_ps(quant_avx2_load_bf16(w + i + 8 * r),
                                     _mm256_loadu_ps(x + i + 8 * r), acc[r]);
    for (; i + 8 <= n; i += 8)
        acc[0] = _mm256_fmadd_ps(quant_avx2_load_bf16(w + i), _mm256_loadu_ps(x + i), acc[0]);
    float sum = quant_avx2_sum4(acc);
    for (; i < n; i++) sum += bf16_to_f32(w[i]) * x[i];
    return sum;
}

static void quant_avx2_axpy_f32(float *y, float a, const float *x, int64_t n) {
    __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i),
                                                _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

static void quant_avx2_dequant_f16(const uint16_t *h, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, quant_avx2_load_f16(h + i));
    for (; i < n; i++) y[i] = f16_to_f32(h[i]);
}

/* 16 bytes to 16 floats in two registers, unsigned or signed. */
static void quant_avx2_u8x16(__m128i bytes, __m256 q[2]) {
    q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
    q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes)));
}

static void quant_avx2_i8x16(__m128i bytes, __m256 q[2]) {
    q[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    q[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(bytes, bytes)));
}

/* Decoders: the q values of one sub-block, in order, as floats.
 *
 * Q8_0 block: 32 signed bytes, 4 registers. */
static void quant_avx2_q8_0(const struct block_q8_0 *b, __m256 q[4]) {
    quant_avx2_i8x16(_mm_loadu_si128((const __m128i *)b->qs), q);
    quant_avx2_i8x16(_mm_loadu_si128((const __m128i *)(b->qs + 16)), q + 2);
}

/* Q2_K sub-block k: 16 values, 2 registers. They are bit pair j of the 16
 * bytes at qs[32h + 16*(k%2)] (3.3), so one shift and one mask give all 16. */
static void quant_avx2_q2_k(const struct block_q2_k *b, int k, __m256 q[2]) {
    int h = k / 8, j = (k % 8) / 2;
    __m128i packed = _mm_loadu_si128((const __m128i *)(b->qs + 32 * h + 16 * (k % 2)));
    __m128i bits = _mm_srl_epi16(packed, _mm_cvtsi32_si128(2 * j));
    quant_avx2_u8x16(_mm_and_si128(bits, _mm_set1_epi8(3)), q);
}

/* Q4_K sub-block k: 32 values, 4 registers; the low (k even) or high (k
 * odd) nibbles of the 32 bytes at qs[32 * (k/2)]. */
static void quant_avx2_q4_k(const struct block_q4_k *b, int k, __m256 q[4]) {
    const uint8_t *qs = b->qs + 32 * (k / 2);
    __m128i shift = _mm_cvtsi32_si128(4 * (k % 2)), low4 = _mm_set1_epi8(15);
    __m128i lo = _mm_srl_epi16(_mm_loadu_si128((const __m128i *)qs), shift);
    __m128i hi = _mm_srl_epi16(_mm_loadu_si128((const __m128i *)(qs + 16)), shift);
    quant_avx2_u8x16(_mm_and_si128(lo, low4), q);
    quant_avx2_u8x16(_mm_and_si128(hi, low4), q + 2);
}

/* IQ2_XXS group: 32 values, 4 registers; piece t is its grid entry with
 * the sign bits XORed in (3.4). */
static void quant_avx2_iq2_xxs(uint32_t a0, uint32_t a1, __m256 q[4]) {
    for (int t = 0; t < 4; t++) {
        __m256 grid = _mm256_load_ps(quant_iq2_grid_f32[(a0 >> (8 * t)) & 255]);
        __m256i sign = _mm256_load_si256(
            (const __m256i *)quant_iq2_sign_bits[(a1 >> (7 * t)) & 127]);
        q[t] = _mm256_xor_ps(grid, _mm256_castsi256_ps(sign));
    }
}

/* The two things done with decoded registers.
 *
 *     store:  y[8r + l] = scale * q[r][l] - min
 *     dot:    acc[0] += scale * sum_r q[r] * x[8r ..]    (lane-wise)
 *             acc[1] += min   * sum_r x[8r ..]
 *
 * so that the dot over a row is hsum(acc[0] - acc[1]). */
static void quant_avx2_store(float *y, const __m256 *q, int count, float scale, float min) {
    __m256 s = _mm256_set1_ps(scale), m = _mm256_set1_ps(min);
    for (int r = 0; r < count; r++) _mm256_storeu_ps(y + 8 * r, _mm256_fmsub_ps(q[r], s, m));
}

static void quant_avx2_dot(const __m256 *q, int count, float scale, float min,
                           const float *x, __m256 acc[2]) {
    __m256 qx = _mm256_mul_ps(q[0], _mm256_loadu_ps(x));
    __m256 xs = _mm256_loadu_ps(x);
    for (int r = 1; r < count; r++) {
        qx = _mm256_fmadd_ps(q[r], _mm256_loadu_ps(x + 8 * r), qx);
        xs = _mm256_add_ps(xs, _mm256_loadu_ps(x + 8 * r));
    }
    acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(scale), qx, acc[0]);
    if (min != 0.0f) acc[1] = _mm256_fmadd_ps(_mm256_set1_ps(min), xs, acc[1]);
}

/* The row loops: one dot and one dequant per type. Sub-blocks alternate
 * between two accumulator pairs so consecutive ones do not wait on each
 * other. */
static float quant_avx2_finish(const __m256 acc[4]) {
    return quant_avx2_hsum(_mm256_sub_ps(_mm256_add_ps(acc[0], acc[2]),
                                         _mm256_add_ps(acc[1], acc[3])));
}

static float quant_avx2_dot_q8_0(const struct block_q8_0 *b, const float *x, int64_t nb) {
    __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(),
                      _mm256_setzero_ps(), _mm256_setzero_ps() }, q[4];
    for (int64_t i = 0; i < nb; i++, x += 32) {
        quant_read_ahead(b + i, sizeof *b);
        quant_avx2_q8_0(b + i, q);
        quant_avx2_dot(q, 4, quant_avx2_half(b[i].d), 0.0f, x, acc + 2 * (i % 2));
    }
    return quant_avx2_finish(acc);
}

static void quant_avx2_dequant_q8_0(const struct block_q8_0 *b, float *y, int64_t nb) {
    __m256 q[4];
    for (int64_t i = 0; i < nb; i++, y += 32) {
        quant_avx2_q8_0(b + i, q);
        quant_avx2_store(y, q, 4, quant_avx2_half(b[i].d), 0.0f);
    }
}

static float quant_avx2_dot_q2_k(const struct block_q2_k *b, const float *x, int64_t nb) {
    __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(),
                      _mm256_setzero_ps(), _mm256_setzero_ps() }, q[2];
    for (int64_t i = 0; i < nb; i++, b++) {
        quant_read_ahead(b, sizeof *b);
        float d = quant_avx2_half(b->d), dmin = quant_avx2_half(b->dmin);
        for (int k = 0; k < 16; k++, x += 16) {
            quant_avx2_q2_k(b, k, q);
            quant_avx2_dot(q, 2, d * (float)(b->scales[k] & 15),
                           dmin * (float)(b->scales[k] >> 4), x, acc + 2 * (k % 2));
        }
    }
    return quant_avx2_finish(acc);
}

static void quant_avx2_dequant_q2_k(const struct block_q2_k *b, float *y, int64_t nb) {
    __m256 q[2];
    for (int64_t i = 0; i < nb; i++, b++) {
        float d = quant_avx2_half(b->d), dmin = quant_avx2_half(b->dmin);
        for (int k = 0; k < 16; k++, y += 16) {
            quant_avx2_q2_k(b, k, q);
            quant_avx2_store(y, q, 2, d * (float)(b->scales[k] & 15),
                             dmin * (float)(b->scales[k] >> 4));
        }
    }
}

static float quant_avx2_dot_q4_k(const struct block_q4_k *b, const float *x, int64_t nb) {
    __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(),
                      _mm256_setzero_ps(), _mm256_setzero_ps() }, q[4];
    for (int64_t i = 0; i < nb; i++, b++) {
        quant_read_ahead(b, sizeof *b);
        float d = quant_avx2_half(b->d), dmin = quant_avx2_half(b->dmin);
        for (int k = 0; k < 8; k++, x += 32) {
            int sc, m;
            quant_q4_k_scale_min(b->scales, k, &sc, &m);
            quant_avx2_q4_k(b, k, q);
            quant_avx2_dot(q, 4, d * (float)sc, dmin * (float)m, x, acc + 2 * (k % 2));
        }
    }
    return quant_avx2_finish(acc);
}

static void quant_avx2_dequant_q4_k(const struct block_q4_k *b, float *y, int64_t nb) {
    __m256 q[4];
    for (int64_t i = 0; i < nb; i++, b++) {
        float d = quant_avx2_half(b->d), dmin = quant_avx2_half(b->dmin);
        for (int k = 0; k < 8; k++, y += 32) {
            int sc, m;
            quant_q4_k_scale_min(b->scales, k, &sc, &m);
            quant_avx2_q4_k(b, k, q);
            quant_avx2_store(y, q, 4, d * (float)sc, dmin * (float)m);
        }
    }
}

static float quant_avx2_dot_iq2_xxs(const struct block_iq2_xxs *b, const float *x, int64_t nb) {
    __m256 acc[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(),
                      _mm256_setzero_ps(), _mm256_setzero_ps() }, q[4];
    for (int64_t i = 0; i < nb; i++, b++) {
        quant_read_ahead(b, sizeof *b);
        float d = quant_avx2_half(b->d);
        for (int group = 0; group < 8; group++, x += 32) {
            uint32_t a0, a1;
            quant_iq2_group_words(b, group, &a0, &a1);
            quant_avx2_iq2_xxs(a0, a1, q);
            quant_avx2_dot(q, 4, quant_iq2_group_scale(d, a1), 0.0f, x, acc + 2 * (group % 2));
        }
    }
    return quant_avx2_finish(acc);
}

static void quant_avx2_dequant_iq2_xxs(const struct block_iq2_xxs *b, float *y, int64_t nb) {
    __m256 q[4];
    for (int64_t i = 0; i < nb; i++, b++) {
        float d = quant_avx2_half(b->d);
        for (int group = 0; group < 8; group++, y += 32) {
            uint32_t a0, a1;
            quant_iq2_group_words(b, group, &a0, &a1);
            quant_avx2_iq2_xxs(a0, a1, q);
            quant_avx2_store(y, q, 4, quant_iq2_group_scale(d, a1), 0.0f);
        }
    }
}

static float quant_fast_dot_f32(const float *a, const float *b, int64_t n) {
    return quant_avx2_dot_f32(a, b, n);
}

static void quant_fast_axpy_f32(float *y, float a, const float *x, int64_t n) {
    quant_avx2_axpy_f32(y, a, x, n);
}

static float quant_fast_vec_dot(uint32_t type, const void *w, const float *x, int64_t n) {
    switch (type) {
    case TYPE_F32: return quant_avx2_dot_f32(w, x, n);
    case TYPE_F16: return quant_avx2_dot_f16(w, x, n);
    case TYPE_BF16: return quant_avx2_dot_bf16(w, x, n);
    case TYPE_Q8_0: return quant_avx2_dot_q8_0(w, x, n / 32);
    case TYPE_Q2_K: return quant_avx2_dot_q2_k(w, x, n / 256);
    case TYPE_Q4_K: return quant_avx2_dot_q4_k(w, x, n / 256);
    case TYPE_IQ2_XXS: return quant_avx2_dot_iq2_xxs(w, x, n / 256);
    default: return vec_dot_ref(type, w, x, n);
    }
}

static void quant_fast_dequant(uint32_t type, const void *src, float *y, int64_t n) {
    switch (type) {
    case TYPE_F16: quant_avx2_dequant_f16(src, y, n); break;
    case TYPE_Q8_0: quant_avx2_dequant_q8_0(src, y, n / 32); break;
    case TYPE_Q2_K: quant_avx2_dequant_q2_k(src, y, n / 256); break;
    case TYPE_Q4_K: quant_avx2_dequant_q4_k(src, y, n / 256); break;
    case TYPE_IQ2_XXS: quant_avx2_dequant_iq2_xxs(src, y, n / 256); break;
    default: dequant_row_ref(type, src, y, n);
    }
}

/* ============================================================================
 * Chapter 16. SIMD twins: arm64 NEON
 * ============================================================================
 *
 * An appendix to the chapter "Quantized blocks".
 */

/* ---- 16.1 arm64: NEON ----------------------------------------------------- */

#elif defined(__ARM_NEON) && defined(__aarch64__)

/* The same decoders and loops with 4-lane registers: a sub-block of 16
 * values is four float32x4_t instead of two __m256. NEON is part of every
 * arm64 CPU, and arm64 (unlike 32-bit ARM) has the half conversion, fused
 * multiply-add and across-vector add used here. Tested under qemu-aarch64. */

static float32x4_t quant_neon_zero(void) {
    return vdupq_n_f32(0.0f);
}

static float quant_neon_sum4(const float32x4_t acc[4]) {
    return vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
}

static float32x4_t quant_neon_load_f16(const uint16_t *h) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
}

static float32x4_t quant_neon_load_bf16(const uint16_t *h) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(h), 16));
}

/* Dense rows, 16 values per step in four sums, then the tail in scalar. */
static float quant_neon_dot_f32(const float *a, const float *b, int64_t n) {
    float32x4_t acc[4] = { quant_neon_zero(), quant_neon_zero(),
                           quant_neon_zero(), quant_neon_zero() };
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int r = 0; r < 4; r++)
            acc[r] = vfmaq_f32(acc[r], vld1q_f32(a + i + 4 * r), vld1q_f32(b + i + 4 * r));
    float sum = quant_neon_sum4(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static float quant_neon_dot_f16(const uint16_t *w, const float *x, int64_t n) {
    float32x4_t acc[4] = { quant_neon_zero(), quant_neon_zero(),
                           quant_neon_zero(), quant_neon_zero() };
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int r = 0; r < 4; r++)
            acc[r] = vfmaq_f32(acc[r], quant_neon_load_f16(w + i + 4 * r),
                               vld1q_f32(x + i + 4 * r));
    float sum = quant_neon_sum4(acc);
    for (; i < n; i++) sum += f16_to_f32(w[i]) * x[i];
    return sum;
}

static float quant_neon_dot_bf16(const uint16_t *w, const float *x, int64_t n) {
    float32x4_t acc[4] = { quant_neon_zero(), quant_neon_zero(),
                           quant_neon_zero(), quant_neon_zero() };
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int r = 0; r < 4; r++)
            acc[r] = vfmaq_f32(acc[r], quant_neon_load_bf16(w + i + 4 * r),
                               vld1q_f32(x + i + 4 * r));
    float sum = quant_neon_sum4(acc);
    for (; i < n; i++) sum += bf16_to_f32(w[i]) * x[i];
    return sum;
}

static void quant_neon_axpy_f32(float *y, float a, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++) y[i] += a * x[i];
}

static void quant_neon_dequant_f16(const uint16_t *h, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, quant_neon_load_f16(h + i));
    for (; i < n; i++) y[i] = f16_to_f32(h[i]);
}

/* 16 bytes to 16 floats in four registers, unsigned or signed. */
static void quant_neon_u8x16(uint8x16_t bytes, float32x4_t q[4]) {
    uint16x8_t lo = vmovl_u8(vget_low_u8(bytes)), hi = vmovl_high_u8(bytes);
    q[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
    q[1] = vcvtq_f32_u32(vmovl_high_u16(lo));
    q[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
    q[3] = vcvtq_f32_u32(vmovl_high_u16(hi));
}

static void quant_neon_i8x16(int8x16_t bytes, float32x4_t q[4]) {
    int16x8_t lo = vmovl_s8(vget_low_s8(bytes)), hi = vmovl_high_s8(bytes);
    q[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
    q[1] = vcvtq_f32_s32(vmovl_high_s16(lo));
    q[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
    q[3] = vcvtq_f32_s32(vmovl_high_s16(hi));
}

/* Decoders, as in 15.1. A vshlq by a negative count shifts right. */
static void quant_neon_q8_0(const struct block_q8_0 *b, float32x4_t q[8]) {
    quant_neon_i8x16(vld1q_s8(b->qs), q);
    quant_neon_i8x16(vld1q_s8(b->qs + 16), q + 4);
}

static void quant_neon_q2_k(const struct block_q2_k *b, int k, float32x4_t q[4]) {
    int h = k / 8, j = (k % 8) / 2;
    uint8x16_t packed = vld1q_u8(b->qs + 32 * h + 16 * (k % 2));
    uint8x16_t bits = vshlq_u8(packed, vdupq_n_s8((int8_t)(-2 * j)));
    quant_neon_u8x16(vandq_u8(bits, vdupq_n_u8(3)), q);
}

static void quant_neon_q4_k(const struct block_q4_k *b, int k, float32x4_t q[8]) {
    const uint8_t *qs = b->qs + 32 * (k / 2);
    int8x16_t shift = vdupq_n_s8((int8_t)(-4 * (k % 2)));
    uint8x16_t low4 = vdupq_n_u8(15);
    quant_neon_u8x16(vandq_u8(vshlq_u8(vld1q_u8(qs), shift), low4), q);
    quant_neon_u8x16(vandq_u8(vshlq_u8(vld1q_u8(qs + 16), shift), low4), q + 4);
}

static void quant_neon_iq2_xxs(uint32_t a0, uint32_t a1, float32x4_t q[8]) {
    for (int t = 0; t < 4; t++) {
        const float *grid = quant_iq2_grid_f32[(a0 >> (8 * t)) & 255];
        const uint32_t *sign = quant_iq2_sign_bits[(a1 >> (7 * t)) & 127];
        for (int half = 0; half < 2; half++) {
            uint32x4_t bits = veorq_u32(vreinterpretq_u32_f32(vld1q_f32(grid + 4 * half)),
                                        vld1q_u32(sign + 4 * half));
            q[2 * t + half] = vreinterpretq_f32_u32(bits);
        }
    }
}

/* store: y = scale*q - min;  dot: acc[0] += scale*sum q*x, acc[1] += min*sum x */
static void quant_neon_store(float *y, const float32x4_t *q, int count, float scale, float min) {
    float32x4_t neg_min = vdupq_n_f32(-min);
    for (int r = 0; r < count; r++) vst1q_f32(y + 4 * r, vfmaq_n_f32(neg_min, q[r], scale));
}

static void quant_neon_dot(const float32x4_t *q, int count, float scale, float min,
                           const float *x, float32x4_t acc[2]) {
    float32x4_t qx = vmulq_f32(q[0], vld1q_f32(x));
    float32x4_t xs = vld1q_f32(x);
    for (int r = 1; r < count; r++) {
        qx = vfmaq_f32(qx, q[r], vld1q_f32(x + 4 * r));
        xs = vaddq_f32(xs, vld1q_f32(x + 4 * r));
    }
    acc[0] = vfmaq_n_f32(acc[0], qx, scale);
    if (min != 0.0f) acc[1] = vfmaq_n_f32(acc[1], xs, min);
}

static float quant_neon_finish(const float32x4_t acc[4]) {
    return vaddvq_f32(vsubq_f32(vaddq_f32(acc[0], acc[2]), vaddq_f32(acc[1], acc[3])));
}

static float quant_neon_dot_q8_0(const struct block_q8_0 *b, const float *x, int64_t nb) {
    float32x4_t acc[4] = { quant_neon_zero(), quant_neon_zero(),
                           quant_neon_zero(), quant_neon_zero() }, q[8];
    for (int64_t i = 0; i < nb; i++, x += 32) {
        quant_neon_q8_0(b + i, q);
        quant_neon_dot(q, 8, f16_to_f32(b[i].d), 0.0f, x, acc + 2 * (i % 2));
    }
    return quant_neon_finish(acc);
}

static void quant_neon_dequant_q8_0(const struct block_q8_0 *b, float *y, int64_t nb) {
    float32x4_t q[8];
    for (int64_t i = 0; i < nb; i++, y += 32) {
        quant_neon_q8_0(b + i, q);
        quant_neon_store(y, q, 8, f16_to_f32(b[i].d), 0.0f);
    }
}

static float quant_neon_dot_q2_k(const struct block_q2_k *b, const float *x, int64_t nb) {
    float32x4_t acc[4] = { quant_neon_zero(), quant_neon_zero(),
                           quant_neon_zero(), quant_neon_zero() }, q[4];
    for (int64_t i = 0; i < nb; i++, b++) {
        float d = f16_to_f32(b->d), dmin = f16_to_f32(b->dmin);
        for (int k = 0; k < 16; k++, x += 16) {
            quant_neon_q2_k(b, k, q);
            quant_neon_dot(q, 4, d * (float)(b->scales[k] & 15),
                           dmin * (float)(b->scales[k] >> 4), x, acc + 2 * (k % 2));
        }
    }
    return quant_neon_finish(acc);
}

static void quant_neon_dequant_q2_k(const struct block_q2_k *b, float *y, int64_t nb) {
    float32x4_t q[4];
    for (int64_t i = 0; i < nb; i++, b++) {
        float d = f16_to_f32(b->d), dmin = f16_to_f32(b->dmin);
        for (int k = 0; k < 16; k++, y += 16) {
            quant_neon_q2_k(b, k, q);
            quant_neon_store(y, q, 4, d * (float)(b->scales[k] & 15),
                             dmin * (float)(b->scales[k] >> 4));
        }
    }
}

static float quant_neon_dot_q4_k(const struct block_q4_k *b, const float *x, int64_t nb) {
    float32x4_t acc[4] = { quant_neon_zero(), quant_neon_zero(),
                           quant_neon_zero(), quant_neon_zero() }, q[8];
    for (int64_t i = 0; i < nb; i++, b++) {
        float d = f16_to_f32(b->d), dmin = f16_to_f32(b->dmin);
        for (int k = 0; k < 8; k++, x += 32) {
            int sc, m;
            quant_q4_k_scale_min(b->scales, k, &sc, &m);
            quant_neon_q4_k(b, k, q);
            quant_neon_dot(q, 8, d * (float)sc, dmin * (float)m, x, acc + 2 * (k % 2));
        }
    }
    return quant_neon_finish(acc);
}

static void quant_neon_dequant_q4_k(const struct block_q4_k *b, float *y, int64_t nb) {
    float32x4_t q[8];
    for (int64_t i = 0; i < nb; i++, b++) {
        float d = f16_to_f32(b->d), dmin = f16_to_f32(b->dmin);
        for (int k = 0; k < 8; k++, y += 32) {
            int sc, m;
            quant_q4_k_scale_min(b->scales, k, &sc, &m);
            quant_neon_q4_k(b, k, q);
            quant_neon_store(y, q, 8, d * (float)sc, dmin * (float)m);
        }
    }
}

static float quant_neon_dot_iq2_xxs(const struct block_iq2_xxs *b, const float *x, int64_t nb) {
    float32x4_t acc[4] = { quant_neon_zero(), quant_neon_zero(),
                           quant_neon_zero(), quant_neon_zero() }, q[8];
    for (int64_t i = 0; i < nb; i++, b++) {
        float d = f16_to_f32(b->d);
        for (int group = 0; group < 8; group++, x += 32) {
            uint32_t a0, a1;
            quant_iq2_group_words(b, group, &a0, &a1);
            quant_neon_iq2_xxs(a0, a1, q);
            quant_neon_dot(q, 8, quant_iq2_group_scale(d, a1), 0.0f, x, acc + 2 * (group % 2));
        }
    }
    return quant_neon_finish(acc);
}

static void quant_neon_dequant_iq2_xxs(const struct block_iq2_xxs *b, float *y, int64_t nb) {
    float32x4_t q[8];
    for (int64_t i = 0; i < nb; i++, b++) {
        float d = f16_to_f32(b->d);
        for (int group = 0; group < 8; group++, y += 32) {
            uint32_t a0, a1;
            quant_iq2_group_words(b, group, &a0, &a1);
            quant_neon_iq2_xxs(a0, a1, q);
            quant_neon_store(y, q, 8, quant_iq2_group_scale(d, a1), 0.0f);
        }
    }
}

static float quant_fast_dot_f32(const float *a, const float *b, int64_t n) {
    return quant_neon_dot_f32(a, b, n);
}

static void quant_fast_axpy_f32(float *y, float a, const float *x, int64_t n) {
    quant_neon_axpy_f32(y, a, x, n);
}

static float quant_fast_vec_dot(uint32_t type, const void *w, const float *x, int64_t n) {
    switch (type) {
    case TYPE_F32: return quant_neon_dot_f32(w, x, n);
    case TYPE_F16: return quant_neon_dot_f16(w, x, n);
    case TYPE_BF16: return quant_neon_dot_bf16(w, x, n);
    case TYPE_Q8_0: return quant_neon_dot_q8_0(w, x, n / 32);
    case TYPE_Q2_K: return quant_neon_dot_q2_k(w, x, n / 256);
    case TYPE_Q4_K: return quant_neon_dot_q4_k(w, x, n / 256);
    case TYPE_IQ2_XXS: return quant_neon_dot_iq2_xxs(w, x, n / 256);
    default: return vec_dot_ref(type, w, x, n);
    }
}

static void quant_fast_dequant(uint32_t type, const void *src, float *y, int64_t n) {
    switch (type) {
    case TYPE_F16: quant_neon_dequant_f16(src, y, n); break;
    case TYPE_Q8_0: quant_neon_dequant_q8_0(src, y, n / 32); break;
    case TYPE_Q2_K: quant_neon_dequant_q2_k(src, y, n / 256); break;
    case TYPE_Q4_K: quant_neon_dequant_q4_k(src, y, n / 256); break;
    case TYPE_IQ2_XXS: quant_neon_dequant_iq2_xxs(src, y, n / 256); break;
    default: dequant_row_ref(type, src, y, n);
    }
}

/* ============================================================================
 * Chapter 17. Any other CPU
 * ============================================================================
 *
 * An appendix to the chapter "Quantized blocks".
 */

/* ---- 17.1 Any other CPU: the reference ----------------------------------- */

#else

/* Without a known vector unit the fast paths are the reference itself, plus
 * a four-way split of the float dot so the compiler can still vectorize it. */

static float quant_fast_dot_f32(const float *a, const float *b, int64_t n) {
    float acc[4] = { 0, 0, 0, 0 };
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int r = 0; r < 4; r++) acc[r] += a[i + r] * b[i + r];
    float sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static void quant_fast_axpy_f32(float *y, float a, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

static float quant_fast_vec_dot(uint32_t type, const void *w, const float *x, int64_t n) {
    if (type == TYPE_F32) return quant_fast_dot_f32(w, x, n);
    return vec_dot_ref(type, w, x, n);
}

static void quant_fast_dequant(uint32_t type, const void *src, float *y, int64_t n) {
    dequant_row_ref(type, src, y, n);
}

#endif

/* ============================================================================
 * Chapter 18. Tools built on the engine: the oracle checker and the bench
 * ============================================================================
 *
 * Two tools keep the engine honest. The checker compares it with DeepSeek's
 * own code on a tiny model of the exact V4 shape (18.1); the bench measures
 * what a user feels -- prefill and decode speed, and the weight traffic that
 * bounds decode (18.2). Neither asserts a timing: tests assert correctness,
 * the bench prints figures. Two more measure a model rather than the engine:
 * the perplexity of a text file (18.3) and the token ids of one (18.4).
 *
 * 18.1 --check-vectors FILE.json
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
        struct forward_request req = {.all_logits = logits + (size_t)done * V,
                                      .mtp_logits =
                                          mtp_logits ? mtp_logits + (size_t)done * V : NULL};
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
    if (n < 1 || !check_shapes(c, n, V, mtp, e)) {
        free(tokens);
        return n >= 1 ? false : fail(e, "vectors: empty case");
    }
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
    bool ok =
        ref && margin && margin->kind == JSON_ARRAY && (nm = (int)margin->count) == ng && n > 0;
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

static void print_check(const char *name, const char *sched, const struct check_result *r,
                        bool mtp) {
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
    if (doc && !json_is(cases, JSON_ARRAY))
        snprintf(e.msg, sizeof e.msg, "%s: no 'cases' array", path);
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
                ok = check_greedy_case(eng, c, sched == 0 ? 1 << 20 : CHECK_CHUNK, &fo, &fn, &to,
                                       &tn, &e);
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
                int first = sched == 0 ? (int)prefill : CHECK_CHUNK,
                    rest = sched == 0 ? 1 : CHECK_CHUNK;
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
            /* a case at full width can take minutes: a run cut short by a time
             * limit keeps the lines of the cases it finished */
            fflush(stdout);
        }
    }
    printf("%d passed, %d failed\n", passed, failed);
    json_free(doc);
    free(text);
    return failed ? 1 : 0;
}

/* ----------------------------------------------------------------------------
 * 18.2 --bench
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

/* Decode n tokens greedily after `prompt`; returns seconds, or -1. */
/* --profile on a GPU backend: the decode's dispatches, timed by the GPU. */
static void bench_profile(struct engine *eng, bool begin, int tokens) {
#ifdef DS4_GPU
    if (!eng->opt.gpu_profile || eng->be != &gpu_backend) return;
    if (begin) gpu_profile_begin();
    else gpu_profile_end(tokens);
#else
    (void)eng, (void)begin, (void)tokens;
#endif
}

static double bench_decode(struct engine *eng, const int32_t *prompt, int n_prompt, int n,
                           struct spec_options spec, struct spec_stats *stats, double *prefill_s,
                           double *prefill_cpu_s, struct ds4_error *e) {
    struct session s;
    struct sampler sp;
    struct generator g;
    session_init(&s, eng);
    sampler_init(&sp, (struct sampler_options){ 0, 1, 0, 0, 1 }, eng->model->cfg.vocab);
    generator_init(&g, &s, &sp, spec);
    double t0 = now_seconds(), cpu0 = cpu_seconds();
    bool ok = session_forward(&s, prompt, n_prompt, NULL, e);
    double t1 = now_seconds(), cpu1 = cpu_seconds();
    if (prefill_cpu_s) *prefill_cpu_s = cpu1 - cpu0;
    int64_t allocs1 = heap_allocations;
    int32_t out[MATMUL_DECODE_PATH_MAX_TOKENS];
    bench_profile(eng, true, 0);
    for (int done = 0; ok && done < n;) {
        int got = generator_step(&g, out, e);
        ok = got > 0;
        done += got;
    }
    double t2 = now_seconds();
    bench_profile(eng, false, n);
    g.stats.cpu_seconds = cpu_seconds() - cpu1;
    g.stats.heap_allocations = heap_allocations - allocs1;
    *stats = g.stats;
    if (prefill_s) *prefill_s = t1 - t0;
    generator_free(&g);
    sampler_free(&sp);
    session_free(&s);
    return ok ? t2 - t1 : -1;
}

/* Sessions on disk (chapter 12): the size of the snapshot after the bench prompt,
 * against float32 rows (a plain dump of the same rows), and the
 * save and load times. A snapshot has a fixed part (logits, sliding
 * windows) and a part that follows the compressors' unfinished windows,
 * which fill up and empty every `ratio` tokens; so the cost of one more
 * token is the slope between two snapshots a whole number of the largest
 * ratio apart, printed when the prompt holds two such periods. The file
 * lives in /tmp for a moment. */
static bool bench_snapshot(struct engine *eng, const int32_t *tokens, int n, struct ds4_error *e) {
    const struct model *m = eng->model;
    int period = 1;
    for (int l = 0; l < m->cfg.n_layers; l++)
        if (m->cfg.ratio[l] > period) period = m->cfg.ratio[l];
    int first = n - n / 2 / period * period;        /* == n when there is no slope to take */
    char path[64];
    snprintf(path, sizeof path, "/tmp/ds4-bench.%d.kv", (int)getpid());
    struct snapshot_meta meta = { "bench", 5, KV_REASON_UNKNOWN, 0 };
    struct snapshot_stats a, b;
    struct session s, l;
    session_init(&s, eng);
    session_init(&l, eng);
    bool ok = session_feed(&s, tokens, first, 128, e) &&
              session_save(&s, tokens, first, path, &meta, &a, e) &&
              session_feed(&s, tokens + first, n - first, 128, e) &&
              session_save(&s, tokens, n, path, &meta, &b, e);
    int32_t *got = NULL;
    int64_t n_got;
    double t0 = now_seconds();
    ok = ok && session_load(&l, path, &got, &n_got, e);
    double t_load = now_seconds() - t0;
    if (ok) {
        uint64_t f32 = snapshot_f32_bytes(&m->cfg, m->has_mtp, n);
        printf(
            "snapshot: %d tokens = %llu bytes, %.0f per token (float32 rows: %llu, %.0f per token; "
            "%.2fx smaller); save %.4f s, load %.4f s\n",
            n, (unsigned long long)b.file_bytes, (double)b.file_bytes / n, (unsigned long long)f32,
            (double)f32 / n, (double)f32 / (double)b.file_bytes, b.seconds, t_load);
    }
    if (ok && first < n) {
        double per = (double)(b.file_bytes - a.file_bytes) / (n - first);
        double f32_per = (double)(snapshot_f32_bytes(&m->cfg, m->has_mtp, n) -
                                  snapshot_f32_bytes(&m->cfg, m->has_mtp, first)) / (n - first);
        printf("snapshot: one more token (slope over tokens %d..%d) costs %.1f bytes, float32 rows "
               "%.1f "
               "(%.2fx)\n",
               first, n, per, f32_per, f32_per / per);
    }
    if (ok) {                                       /* the server's rewind points (12.11) */
        struct mem_checkpoint cp;
        double t1 = now_seconds();
        checkpoint_encode(&cp, &s, tokens);
        double t_take = now_seconds() - t1;
        t1 = now_seconds();
        ok = checkpoint_restore(&s, &cp, tokens, e);
        double t_restore = now_seconds() - t1;
        if (ok) printf("checkpoint: %d tokens = %zu bytes in memory (rows by count); take %.4f s, "
                       "restore %.4f s\n", n, cp.len, t_take, t_restore);
        checkpoint_release(&cp);
    }
    unlink(path);
    free(got);
    session_free(&l);
    session_free(&s);
    return ok;
}

/* THE ROOFLINE (--bench --roofline)
 *
 * A decode token cannot go faster than its weight bytes divided by the
 * machine's read bandwidth, so that ratio is the ceiling to measure decode
 * against. The bandwidth is measured here, with the engine's own threads:
 * each pass sums a 512 MiB buffer (far larger than any cache) in 64 KiB
 * items through parallel_for, and the best of three passes counts.
 *
 * Beside it, each weight type's dot kernel is timed on one thread, both
 * from cache (the same 64 rows of 4096 values again and again) and from
 * DRAM (passes over 256 MiB of rows), with float activations (15.1) and
 * with 8-bit ones (3.9), each integer kernel variant the CPU runs on a line
 * of its own, in GB/s of weight bytes per CPU second, the best of several
 * timings. The blocks hold random bytes with sane scales: the kernels'
 * speed does not depend on the values. */
enum { ROOF_BUFFER = 512 << 20, ROOF_ITEM = 64 << 10, ROOF_ROW = 4096 };

struct roof_job {
    const uint64_t *data;
    uint64_t *sums;                 /* [threads], kept so the loads stay */
};

static void roof_sum_item(void *ctx, int64_t item, int worker) {
    struct roof_job *j = ctx;
    const uint64_t *p = j->data + item * (ROOF_ITEM / 8);
    uint64_t s[4] = { 0, 0, 0, 0 };
    for (int i = 0; i < ROOF_ITEM / 8; i += 4)
        for (int r = 0; r < 4; r++) s[r] += p[i + r];
    j->sums[worker] += s[0] ^ s[1] ^ s[2] ^ s[3];
}

/* Read bandwidth in bytes per second with the pool's threads. */
static double roof_bandwidth(struct engine *eng) {
    uint64_t *data = xmalloc(ROOF_BUFFER);
    memset(data, 1, ROOF_BUFFER);
    struct roof_job j = { data, xcalloc((size_t)eng->pool.n_threads, sizeof(uint64_t)) };
    double best = 0;
    for (int pass = 0; pass < 3; pass++) {
        double t0 = now_seconds();
        parallel_for(&eng->pool, ROOF_BUFFER / ROOF_ITEM, roof_sum_item, &j);
        double bw = ROOF_BUFFER / (now_seconds() - t0);
        if (bw > best) best = bw;
    }
    free(j.sums);
    free(data);
    return best;
}

/* Random blocks of `type` with every scale field set to a small normal half. */
static void roof_fill(uint32_t type, uint8_t *rows, size_t bytes, uint64_t *rng) {
    for (size_t i = 0; i + 8 <= bytes; i += 8) {
        uint64_t v = splitmix64(rng);
        memcpy(rows + i, &v, 8);
    }
    const struct type_traits *t = type_traits_of(type);
    uint16_t scale = f32_to_f16(0.01f);
    for (size_t b = 0; b + (size_t)t->block_bytes <= bytes; b += (size_t)t->block_bytes) {
        if (type == TYPE_F16) memcpy(rows + b, &scale, 2);
        else if (type == TYPE_Q2_K)
            memcpy(rows + b + 80, &scale, 2), memcpy(rows + b + 82, &scale, 2);
        else if (type == TYPE_Q4_K) memcpy(rows + b, &scale, 2), memcpy(rows + b + 2, &scale, 2);
        else memcpy(rows + b, &scale, 2);
    }
}

/* This thread's CPU seconds: on a shared machine the kernels are timed by
 * the CPU they used, not the wall clock, which counts other tenants too. */
static double thread_cpu_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* One pass of a kernel over `n_rows` rows; a == NULL: float activations. */
static float roof_pass(uint32_t type, const uint8_t *rows, int64_t n_rows, const float *x,
                       const struct act_q8 *a) {
    size_t row_bytes = type_row_bytes(type, ROOF_ROW);
    float sum = 0;
    for (int64_t i = 0; i < n_rows; i++)
        sum += a ? vec_dot_q8(type, rows + i * row_bytes, a)
                 : vec_dot(type, rows + i * row_bytes, x, ROOF_ROW);
    return sum;
}

/* GB/s of one kernel over `n_rows` rows: the best of `tries` timings, each
 * of as many passes as fill `min_seconds` of CPU time (at least one). On a
 * shared machine the best is the figure least disturbed by other tenants: a
 * core shared with another thread or a cache evicted by one only ever makes
 * a timing slower. */
static double roof_kernel(uint32_t type, const uint8_t *rows, int64_t n_rows,
                          double min_seconds, int tries, const float *x,
                          const struct act_q8 *a) {
    double bytes = (double)type_row_bytes(type, ROOF_ROW) * (double)n_rows, best = 0;
    volatile float sink = 0;
    for (int t = 0; t < tries; t++) {
        double t0 = thread_cpu_seconds(), elapsed = 0;
        int passes = 0;
        do {
            sink += roof_pass(type, rows, n_rows, x, a);
            passes++;
            elapsed = thread_cpu_seconds() - t0;
        } while (elapsed < min_seconds);
        if (bytes * passes / elapsed / 1e9 > best) best = bytes * passes / elapsed / 1e9;
    }
    (void)sink;
    return best;
}

/* From cache: 64 rows (at most 280 KB, in L2), passes for 20 ms of CPU per
 * timing, best of 7; from DRAM: one pass over the 256 MiB, best of 3. */
enum { ROOF_CACHE_ROWS = 64, ROOF_CACHE_TRIES = 7, ROOF_DRAM_TRIES = 3 };
static const double roof_cache_seconds = 0.02;

static void roof_print_kernel(uint32_t type, const char *what, const uint8_t *rows,
                              int64_t n_big, const float *x, const struct act_q8 *a) {
    double cache = roof_kernel(type, rows, ROOF_CACHE_ROWS, roof_cache_seconds,
                               ROOF_CACHE_TRIES, x, a);
    double dram = roof_kernel(type, rows, n_big, 0, ROOF_DRAM_TRIES, x, a);
    printf("roofline: kernel %-8s 1 thread, GB/s of weights: %-30s %6.2f cache %6.2f DRAM\n",
           type_traits_of(type)->name, what, cache, dram);
}

/* One line for float activations and one per integer kernel variant this
 * CPU runs (3.9), the start-up choice first; the choice is restored. A
 * build without integer kernels shows its scalar reference instead. */
static void roof_kernels(void) {
    static const uint32_t types[] = { TYPE_F16, TYPE_Q8_0, TYPE_Q4_K, TYPE_Q2_K, TYPE_IQ2_XXS };
    float *x = xmalloc(ROOF_ROW * sizeof(float));
    void *mem = xmalloc(act_q8_bytes(ROOF_ROW));
    uint64_t rng = 7;
    for (int i = 0; i < ROOF_ROW; i++) x[i] = (float)(splitmix64(&rng) % 2001) / 1000.0f - 1.0f;
    struct act_q8 a = act_q8_view(mem, ROOF_ROW);
    act_quantize_q8(x, &a);
    size_t big = 256u << 20;
    uint8_t *rows = xmalloc(big);
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        uint32_t type = types[i];
        int64_t n_big = (int64_t)(big / type_row_bytes(type, ROOF_ROW));
        roof_fill(type, rows, big, &rng);
        roof_print_kernel(type, "f32 activations", rows, n_big, x, NULL);
        int variants = quant_q8_variant_count();
        for (int v = 0; quant_has_q8_dot(type) && v < (variants > 0 ? variants : 1); v++) {
            char what[64];
            if (variants > 0) quant_q8_use_variant(v);
            snprintf(what, sizeof what, "8-bit activations (%s)",
                     variants > 0 ? quant_q8_variant_name(v) : "scalar");
            roof_print_kernel(type, what, rows, n_big, x, &a);
        }
        if (variants > 0) quant_q8_use_variant(0);
    }
    free(rows);
    free(mem);
    free(x);
}

/* The --roofline lines: bandwidth, kernels, and decode against the ceiling. */
static void bench_roofline(struct engine *eng, double decode_bytes_per_s) {
    double bw = roof_bandwidth(eng);
    printf("roofline: read bandwidth %.2f GB/s with %d threads; decode achieves %.2f GB/s = %.0f%% "
           "of that ceiling\n", bw / 1e9, eng->pool.n_threads, decode_bytes_per_s / 1e9,
           100.0 * decode_bytes_per_s / bw);
    roof_kernels();
}

static int run_bench(struct engine *eng, int n_prefill, int n_decode, struct spec_options spec,
                     bool roofline) {
    const struct ds4_config *c = &eng->model->cfg;
    struct ds4_error e = { "" };
    int32_t *tokens = xmalloc((size_t)n_prefill * sizeof(int32_t));
    uint64_t rng = 42;
    for (int i = 0; i < n_prefill; i++)
        tokens[i] = (int32_t)(splitmix64(&rng) % (uint64_t)c->vocab);
    struct spec_stats plain_stats, spec_stats;
    double prefill_s = 0, prefill_cpu_s = 0;
    double plain_s = bench_decode(eng, tokens, n_prefill, n_decode, (struct spec_options){ 0, 0 },
                                  &plain_stats, &prefill_s, &prefill_cpu_s, &e);
    bool with_mtp = eng->model->has_mtp && spec.draft > 0 && plain_s >= 0;
    double spec_s =
        with_mtp ? bench_decode(eng, tokens, n_prefill, n_decode, spec, &spec_stats, NULL, NULL, &e)
                 : 0;
    if (plain_s < 0 || spec_s < 0) {
        free(tokens);
        fprintf(stderr, "ds4: bench failed: %s\n", e.msg);
        return 1;
    }
    double per_token = (double)decode_bytes_per_token(eng->model);
    double decode_tps = plain_stats.emitted / plain_s;
    char mode[80] = "";
    if (eng->opt.reference_kernels) snprintf(mode, sizeof mode, ", reference kernels");
    else if (eng->opt.q8_activations)
        snprintf(mode, sizeof mode, ", 8-bit activations (--fast, %s kernels)",
                 quant_q8_variant_count() > 0 ? quant_q8_variant_name(0) : "scalar");
    printf("model: %d layers, dim %d, %d experts (%d used), vocab %d; %d threads%s\n",
           c->n_layers, c->dim, c->n_experts, c->n_used, c->vocab, eng->pool.n_threads, mode);
    printf("prefill: %d tokens in %.3f s = %.2f tokens/s; %.3f s CPU (all threads)\n", n_prefill,
           prefill_s, n_prefill / prefill_s, prefill_cpu_s);
    printf("decode:  %lld tokens in %.3f s = %.2f tokens/s; %.2f ms CPU per token (all threads)\n",
           (long long)plain_stats.emitted, plain_s, decode_tps,
           1e3 * plain_stats.cpu_seconds /
               (double)(plain_stats.emitted > 0 ? plain_stats.emitted : 1));
    printf("decode heap allocations per token: %.2f\n",
           (double)plain_stats.heap_allocations / plain_stats.emitted);
    printf("decode weight traffic: %.3f MB per token = %.2f GB/s\n", per_token / 1e6,
           per_token * decode_tps / 1e9);
    if (roofline) bench_roofline(eng, per_token * decode_tps);
    if (with_mtp)
        printf("decode with MTP (draft %d, gate %.2f): %lld tokens in %.3f s = %.2f tokens/s; "
               "drafted %lld, accepted %lld (%.1f%%), %.2f tokens per main forward\n",
               spec.draft, spec.gate, (long long)spec_stats.emitted, spec_s,
               spec_stats.emitted / spec_s, (long long)spec_stats.drafted,
               (long long)spec_stats.accepted,
               spec_stats.drafted ? 100.0 * spec_stats.accepted / spec_stats.drafted : 0.0,
               (double)spec_stats.emitted / spec_stats.main_forwards);
    if (with_mtp)
        printf("decode with MTP CPU time: %.3f s (all threads); heap allocations per token: %.2f\n",
               spec_stats.cpu_seconds, (double)spec_stats.heap_allocations / spec_stats.emitted);
    bool snap_ok = n_prefill < 2 || bench_snapshot(eng, tokens, n_prefill, &e);
    free(tokens);
    if (!snap_ok) fprintf(stderr, "ds4: bench snapshot failed: %s\n", e.msg);
    return snap_ok ? 0 : 1;
}

/* ---- 18.3 --perplexity FILE ------------------------------------------------------
 *
 * How well does the model predict a text it was not trained on? The file is
 * tokenized (special tokens such as <｜User｜> count as themselves, so a
 * rendered conversation can be scored too) and cut into windows of at most
 * `window` tokens. Each window starts a fresh session with BOS, as every
 * prompt does, and every text token of it is scored given the ones before:
 *
 *     nll(t) = -log softmax(logits[t-1])[token t]        natural log, per token
 *     mean NLL = sum nll / count,    perplexity = exp(mean NLL)
 *
 * Windows are fed in chunks of `chunk` tokens, asking the engine for the
 * logits of every position. With an MTP block loaded, its rows ride along:
 * MTP row i (main state at i, token i+1) predicts token i+2, and so does the
 * main model at position i+1; greedy drafting accepts a 1-token draft exactly
 * when the two argmaxes agree, so their agreement rate is the acceptance rate
 * of 1-token drafts on this text (teacher forced).
 * ------------------------------------------------------------------------- */

struct ppl_stats {
    double nll;                   /* sum over scored tokens, nats */
    int64_t scored, windows;
    int64_t mtp_rows, mtp_agree;  /* MTP argmax == main argmax at the same row */
};

/* -log softmax(row)[target], in double. row: [V] */
static double row_nll(const float *row, int V, int32_t target) {
    double mx = row[0], sum = 0;
    for (int i = 1; i < V; i++) if (row[i] > mx) mx = row[i];
    for (int i = 0; i < V; i++) sum += exp((double)row[i] - mx);
    return log(sum) + mx - row[target];
}

static int row_argmax(const float *row, int V) {
    int best = 0;
    for (int i = 1; i < V; i++) if (row[i] > row[best]) best = i;
    return best;
}

/* One window: ids[0..n-1] (ids[0] is BOS, never scored). */
static bool ppl_window(struct engine *eng, const int32_t *ids, int n, int chunk,
                       struct ppl_stats *st, struct ds4_error *e) {
    int V = eng->model->cfg.vocab;
    bool mtp = eng->model->has_mtp;
    float *logits = xmalloc((size_t)chunk * V * sizeof(float));
    float *mtp_rows = mtp ? xmalloc((size_t)chunk * V * sizeof(float)) : NULL;
    struct session s;
    session_init(&s, eng);
    bool ok = true;
    for (int p0 = 0; ok && p0 < n; p0 += chunk) {
        int T = n - p0 < chunk ? n - p0 : chunk;
        struct forward_request req = { logits, mtp_rows, NULL, NULL };
        ok = session_forward(&s, ids + p0, T, &req, e);
        for (int t = 0; ok && t < T && p0 + t + 1 < n; t++) {
            st->nll += row_nll(logits + (size_t)t * V, V, ids[p0 + t + 1]);
            st->scored++;
            if (mtp && p0 + t >= 1) {       /* MTP row of position p0+t-1 exists */
                st->mtp_rows++;
                st->mtp_agree += row_argmax(mtp_rows + (size_t)t * V, V) ==
                                 row_argmax(logits + (size_t)t * V, V);
            }
        }
    }
    st->windows++;
    session_free(&s);
    free(mtp_rows);
    free(logits);
    return ok;
}

/* Score ids[0..n-1] (text tokens, no BOS) in windows of BOS + window-1 tokens. */
static bool perplexity_of_tokens(struct engine *eng, int32_t bos, const int32_t *ids, int64_t n,
                                 int window, int chunk, struct ppl_stats *st, struct ds4_error *e) {
    memset(st, 0, sizeof *st);
    if (window < 2) return fail(e, "--ppl-window must be at least 2 (BOS and one token)");
    int32_t *buf = xmalloc((size_t)window * sizeof(int32_t));
    bool ok = true;
    for (int64_t done = 0; ok && done < n; done += window - 1) {
        int m = (int)(n - done < window - 1 ? n - done : window - 1);
        buf[0] = bos;
        memcpy(buf + 1, ids + done, (size_t)m * sizeof(int32_t));
        ok = ppl_window(eng, buf, m + 1, chunk, st, e);
    }
    free(buf);
    return ok;
}

static int perplexity_command(struct engine *eng, const struct tokenizer *tok, const char *path,
                              int window, int chunk) {
    struct ds4_error e = { "" };
    size_t len;
    char *text = read_file(path, &len, &e);
    int32_t *ids = NULL;
    size_t n = 0;
    struct ppl_stats st;
    bool ok = text != NULL;
    if (ok) tokenize(tok, text, len, true, &ids, &n);
    if (ok && n == 0) ok = fail(&e, "%s holds no tokens to score", path);
    if (ok && tok->sp.bos < 0) ok = fail(&e, "the vocabulary has no <｜begin▁of▁sentence｜> token");
    double t0 = now_seconds();
    ok = ok && perplexity_of_tokens(eng, tok->sp.bos, ids, (int64_t)n, window, chunk, &st, &e);
    if (ok) {
        double mean = st.nll / (double)st.scored;
        printf("perplexity: %s: %lld tokens scored in %lld windows of <= %d: mean NLL %.4f nats, "
               "perplexity %.3f (%.1f s)\n", path, (long long)st.scored, (long long)st.windows,
               window, mean, exp(mean), now_seconds() - t0);
        if (st.mtp_rows)
            printf("perplexity: MTP top-1 agrees with the main model's top-1 at %lld of %lld rows "
                   "(%.1f%%): the 1-token draft acceptance rate on this text\n",
                   (long long)st.mtp_agree, (long long)st.mtp_rows,
                   100.0 * st.mtp_agree / st.mtp_rows);
    } else {
        fprintf(stderr, "ds4: %s\n", e.msg);
    }
    free(ids);
    free(text);
    return ok ? 0 : 1;
}

/* ---- 18.4 --tokenize FILE ----------------------------------------------------------
 *
 * The token ids of a text file, space separated on one line, exactly as the
 * engine would tokenize a prompt (special tokens included). -m may name any
 * GGUF with a vocabulary, including a vocabulary-only file such as
 * vectors/train-vocab.gguf: the training data of a tiny model is tokenized
 * by this tokenizer, so the model learns the ids ds4 will feed it.
 * ------------------------------------------------------------------------- */

static int tokenize_command(const char *gguf_path, const char *path) {
    struct ds4_error e = { "" };
    struct gguf g;
    struct gguf_array toks;
    struct tokenizer tok;
    memset(&tok, 0, sizeof tok);
    if (!gguf_open(&g, gguf_path, &e)) {
        fprintf(stderr, "ds4: %s\n", e.msg);
        return 1;
    }
    bool ok = gguf_get_array(&g, "tokenizer.ggml.tokens", &toks) ||
              fail(&e, "%s has no vocabulary (tokenizer.ggml.tokens)", gguf_path);
    ok = ok && toks.count <= INT32_MAX && tokenizer_load_gguf(&tok, &g, (int)toks.count, &e);
    size_t len = 0, n = 0;
    char *text = ok ? read_file(path, &len, &e) : NULL;
    int32_t *ids = NULL;
    ok = ok && text != NULL;
    if (ok) tokenize(&tok, text, len, true, &ids, &n);
    for (size_t i = 0; ok && i < n; i++) printf("%s%d", i ? " " : "", ids[i]);
    if (ok) printf("\n");
    else fprintf(stderr, "ds4: %s\n", e.msg);
    free(ids);
    free(text);
    tokenizer_free(&tok);
    gguf_close(&g);
    return ok ? 0 : 1;
}
