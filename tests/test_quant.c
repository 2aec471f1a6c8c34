/* tests/test_quant.c -- tests for chapter 5, quantized blocks.
 *
 * Build and run (from the repository root):
 *
 *     gcc -O2 -march=native -Wall -Wextra -o /tmp/tq tests/test_quant.c -lm && /tmp/tq
 *
 * Checks, in order:
 *
 *   1. half and bfloat16 conversions on hand-picked values, plus every
 *      half round-tripping, plus the F16C hardware where available;
 *   2. the fast kernels (dequant_row, vec_dot, dot_f32, axpy_f32) against
 *      the reference ones, for every type, on random rows;
 *   3. one block of each quantized type built byte by byte, with values
 *      worked out by hand in the comments;
 *   4. quantize_row then dequant_row_ref, with an error bound per type;
 *   5. the IQ2_XXS codebook and sign tables;
 *   6. the 8-bit activations of 3.9: the quantizer, the integer kernels
 *      (every variant this CPU runs: AVX-512, AVX2, NEON sdot, ...) against
 *      their scalar reference, and that reference against the float one
 *      within the documented bound.
 *
 * Every check prints what it compared, the largest difference and the
 * tolerance. The last line is "N passed, N failed"; the exit status is 0
 * only if nothing failed.
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <stdio.h>
#include <stdbool.h>

#define DS4_NO_MAIN
#include "../ds4.c"
#define HARNESS_CHECK_TOL
#include "harness.h"

/* ---- Random numbers ------------------------------------------------------ */

/* xorshift64*: small, seeded, same sequence on every machine. */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t rng_u64(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

/* uniform in [0, 1) */
static float rng_uniform(void) {
    return (float)(rng_u64() >> 40) / 16777216.0f;
}

/* standard normal, Box-Muller */
static float rng_normal(void) {
    float u = rng_uniform() + 1e-7f, v = rng_uniform();
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}

static void fill_normal(float *x, int64_t n, float sigma) {
    for (int64_t i = 0; i < n; i++) x[i] = sigma * rng_normal();
}

/* ---- 1. Half and bfloat16 ------------------------------------------------ */

static bool same_float(float a, float b) {
    if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
    return a == b && signbit(a) == signbit(b);
}

static void test_f16_to_f32(void) {
    static const struct { uint16_t h; float f; } cases[] = {
        { 0x0000, 0.0f },            { 0x8000, -0.0f },
        { 0x3c00, 1.0f },            { 0xc000, -2.0f },
        { 0x3555, 0.333251953125f }, /* 1.0101010101b * 2^-2 */
        { 0x7bff, 65504.0f },        /* largest half */
        { 0x0001, 5.9604644775390625e-8f },  /* 2^-24, smallest subnormal */
        { 0x03ff, 6.097555160522461e-5f },   /* 1023 * 2^-24 */
        { 0x0400, 6.103515625e-5f },         /* 2^-14, smallest normal */
        { 0x7c00, INFINITY },        { 0xfc00, -INFINITY },
        { 0x7e00, NAN },
    };
    int bad = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (!same_float(f16_to_f32(cases[i].h), cases[i].f)) {
            printf("     f16_to_f32(0x%04x) = %g, want %g\n", cases[i].h,
                   f16_to_f32(cases[i].h), cases[i].f);
            bad++;
        }
    check("f16_to_f32 on 12 hand-picked halves (count wrong)", bad, 0);
}

static void test_f32_to_f16(void) {
    static const struct { float f; uint16_t h; } cases[] = {
        { 0.0f, 0x0000 },       { -0.0f, 0x8000 },
        { 1.0f, 0x3c00 },       { -65504.0f, 0xfbff },
        { 65519.0f, 0x7bff },   /* below the midpoint to 65536: stays finite */
        { 65520.0f, 0x7c00 },   /* tie between 0x7bff (odd) and inf: even wins */
        { 1e6f, 0x7c00 },       { INFINITY, 0x7c00 },   { -INFINITY, 0xfc00 },
        { 1.00048828125f, 0x3c00 },  /* 1 + 2^-11: tie, 0x3c00 is even */
        { 1.00146484375f, 0x3c02 },  /* 1 + 3*2^-11: tie, 0x3c01 odd -> 0x3c02 */
        { 1.000489234924316f, 0x3c01 }, /* 1 + 2^-11 + 2^-20: above the tie */
        { 0x1p-24f, 0x0001 },        /* smallest subnormal */
        { 0x1p-25f, 0x0000 },        /* half of it: tie with 0, 0 is even */
        { 0x1.000002p-25f, 0x0001 }, /* just above that tie */
        { 0x1.8p-23f, 0x0003 },      /* 3 * 2^-24 exactly */
        { 0x1.8p-24f, 0x0002 },      /* 1.5 * 2^-24: tie, 1 is odd -> 2 */
        { 0x1.ffcp-15f, 0x0400 },    /* 2^-14 - 2^-25: tie, carries into normal */
        { 1e-10f, 0x0000 },     { -1e-10f, 0x8000 },
    };
    int bad = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (f32_to_f16(cases[i].f) != cases[i].h) {
            printf("     f32_to_f16(%.10g) = 0x%04x, want 0x%04x\n", cases[i].f,
                   f32_to_f16(cases[i].f), cases[i].h);
            bad++;
        }
    check("f32_to_f16 on 20 hand-picked floats incl. ties (count wrong)", bad, 0);
    check_true("f32_to_f16(nan) is a nan half", (f32_to_f16(NAN) & 0x7fff) > 0x7c00);

    /* Every half except nan must survive half -> float -> half exactly. */
    int trip_bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        bool is_nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        uint16_t back = f32_to_f16(f16_to_f32((uint16_t)h));
        if (is_nan ? (back & 0x7fff) <= 0x7c00 : back != h) trip_bad++;
    }
    check("all 65536 halves round-trip through float (count wrong)", trip_bad, 0);
}

#if defined(__F16C__)
/* The hardware converter is an independent reference for the rounding. */
static void test_f16_against_f16c(void) {
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++)
        if (!same_float(f16_to_f32((uint16_t)h), _cvtsh_ss((uint16_t)h))) bad++;
    check("f16_to_f32 == F16C vcvtph2ps, all 65536 halves (count)", bad, 0);
    bad = 0;
    for (int i = 0; i < 2000000; i++) {
        /* random bit patterns with exponents spanning subnormal to overflow */
        uint32_t bits = (uint32_t)rng_u64();
        uint32_t exponent = 97 + (uint32_t)(rng_u64() % 50);
        bits = (bits & 0x807fffff) | exponent << 23;
        float f = quant_f32_from_bits(bits);
        if (f32_to_f16(f) != _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)) bad++;
    }
    check("f32_to_f16 == F16C vcvtps2ph, 2M random floats (count)", bad, 0);
}
#endif

static void test_bf16(void) {
    static const struct { float f; uint16_t h; } cases[] = {
        { 1.0f, 0x3f80 },  { -0.0f, 0x8000 },  { -2.0f, 0xc000 },
        { 1.00390625f, 0x3f80 },   /* 1 + 2^-8: tie, 0x3f80 is even */
        { 1.01171875f, 0x3f82 },   /* 1 + 3*2^-8: tie, 0x3f81 odd -> 0x3f82 */
        { 1.0039072f, 0x3f81 },    /* just above 1 + 2^-8 */
        { INFINITY, 0x7f80 },      { -INFINITY, 0xff80 },
        { 3.4028235e38f, 0x7f80 }, /* FLT_MAX rounds to inf */
    };
    int bad = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (f32_to_bf16(cases[i].f) != cases[i].h) {
            printf("     f32_to_bf16(%.10g) = 0x%04x, want 0x%04x\n", cases[i].f,
                   f32_to_bf16(cases[i].f), cases[i].h);
            bad++;
        }
    check("f32_to_bf16 on 9 hand-picked floats incl. ties (count wrong)", bad, 0);
    /* a nan whose payload sits only in the low 16 bits must stay nan */
    float low_payload_nan = quant_f32_from_bits(0x7f800001);
    check_true("f32_to_bf16(nan with low payload) is nan",
               isnan(bf16_to_f32(f32_to_bf16(low_payload_nan))));
    check_true("bf16_to_f32(0x3f80) == 1, (0xc0a0) == -5",
               bf16_to_f32(0x3f80) == 1.0f && bf16_to_f32(0xc0a0) == -5.0f);
}

/* ---- 2. Fast kernels against the reference -------------------------------- */

static const uint32_t all_types[] = { TYPE_F32, TYPE_F16, TYPE_BF16, TYPE_Q8_0,
                                      TYPE_Q2_K, TYPE_Q4_K, TYPE_IQ2_XXS };

static void test_traits(void) {
    int bad = 0;
    bad += type_row_bytes(TYPE_Q8_0, 4096) != 128 * 34;
    bad += type_row_bytes(TYPE_Q2_K, 4096) != 16 * 84;
    bad += type_row_bytes(TYPE_Q4_K, 4096) != 16 * 144;
    bad += type_row_bytes(TYPE_IQ2_XXS, 4096) != 16 * 66;
    bad += type_row_bytes(TYPE_F16, 7) != 14;
    bad += type_row_bytes(TYPE_I32, 3) != 12;
    bad += type_row_bytes(TYPE_Q4_K, 100) != 0;     /* not whole blocks */
    bad += type_traits_of(2) != NULL;               /* Q4_0: unsupported */
    bad += type_traits_of(1000) != NULL;
    bad += strcmp(type_traits_of(TYPE_IQ2_XXS)->name, "iq2_xxs") != 0;
    check("type_traits_of / type_row_bytes (count wrong)", bad, 0);
}

/* A plausible row of `type`: mostly quantized from normal data, sometimes
 * raw random bytes (every scale, sign and grid pattern) with sane scales. */
static void random_row(uint32_t type, void *row, int64_t n, bool raw_bytes) {
    const struct type_traits *t = type_traits_of(type);
    uint64_t bytes = type_row_bytes(type, (uint64_t)n);
    if (!raw_bytes || t->block_values == 1) {
        float *x = malloc((size_t)n * sizeof(float));
        fill_normal(x, n, 0.05f);
        quantize_row(type, x, row, n);
        free(x);
        return;
    }
    uint8_t *p = row;
    for (uint64_t i = 0; i < bytes; i++) p[i] = (uint8_t)rng_u64();
    for (int64_t b = 0; b < n / t->block_values; b++) {
        uint8_t *block = p + b * t->block_bytes;
        uint16_t d = f32_to_f16(0.001f + 0.01f * rng_uniform());
        uint16_t dmin = f32_to_f16(0.001f + 0.01f * rng_uniform());
        if (type == TYPE_Q2_K) {
            memcpy(block + 80, &d, 2);
            memcpy(block + 82, &dmin, 2);
        } else {
            memcpy(block, &d, 2);                          /* Q8_0, Q4_K, IQ2_XXS */
            if (type == TYPE_Q4_K) memcpy(block + 2, &dmin, 2);
        }
    }
}

/* Compare vec_dot with vec_dot_ref and dequant_row with dequant_row_ref on
 * one row. The dot's tolerance is relative to sum |w*x|, the scale of the
 * rounding errors that a different summation order can produce. */
static void compare_fast_row(uint32_t type, int64_t n, bool raw_bytes,
                             double *dot_err, double *deq_err) {
    void *row = malloc(type_row_bytes(type, (uint64_t)n));
    float *x = malloc((size_t)n * sizeof(float));
    float *w_ref = malloc((size_t)n * sizeof(float));
    float *w_fast = malloc((size_t)n * sizeof(float));
    random_row(type, row, n, raw_bytes);
    fill_normal(x, n, 1.0f);
    dequant_row_ref(type, row, w_ref, n);
    dequant_row(type, row, w_fast, n);
    double abs_sum = 1e-30, max_w = 1e-30, max_dw = 0;
    for (int64_t i = 0; i < n; i++) {
        abs_sum += fabs((double)w_ref[i] * x[i]);
        max_w = fmax(max_w, fabs(w_ref[i]));
        max_dw = fmax(max_dw, fabs((double)w_ref[i] - w_fast[i]));
    }
    double diff = fabs((double)vec_dot(type, row, x, n) - vec_dot_ref(type, row, x, n));
    *dot_err = fmax(*dot_err, diff / abs_sum);
    *deq_err = fmax(*deq_err, max_dw / max_w);
    free(row), free(x), free(w_ref), free(w_fast);
}

static void test_fast_vs_ref(void) {
    static const int64_t lengths_1[] = { 1, 7, 32, 100, 4096, 4099 };
    static const int64_t lengths_32[] = { 32, 96, 4096, 4128 };
    static const int64_t lengths_256[] = { 256, 1024, 4096, 7168 };
    for (size_t ti = 0; ti < sizeof all_types / sizeof all_types[0]; ti++) {
        uint32_t type = all_types[ti];
        int block = type_traits_of(type)->block_values;
        const int64_t *lengths = block == 1 ? lengths_1 : block == 32 ? lengths_32 : lengths_256;
        int count = block == 1 ? 6 : 4;
        double dot_err = 0, deq_err = 0;
        for (int li = 0; li < count; li++)
            for (int rep = 0; rep < 8; rep++)
                compare_fast_row(type, lengths[li], rep % 2 == 1, &dot_err, &deq_err);
        char what[96];
        snprintf(what, sizeof what, "%s vec_dot vs vec_dot_ref, rel. to sum|wx|",
                 type_traits_of(type)->name);
        check(what, dot_err, 1e-5);
        snprintf(what, sizeof what, "%s dequant_row vs dequant_row_ref, rel. to max|w|",
                 type_traits_of(type)->name);
        check(what, deq_err, 1e-6);
    }
}

static void test_dot_axpy_f32(void) {
    static const int64_t lengths[] = { 0, 1, 7, 8, 31, 33, 1000, 4096 };
    double dot_err = 0, axpy_err = 0;
    for (size_t li = 0; li < sizeof lengths / sizeof lengths[0]; li++) {
        int64_t n = lengths[li];
        float *a = malloc((size_t)(n + 1) * sizeof(float));
        float *b = malloc((size_t)(n + 1) * sizeof(float));
        float *y = malloc((size_t)(n + 1) * sizeof(float));
        fill_normal(a, n, 1.0f), fill_normal(b, n, 1.0f), fill_normal(y, n, 1.0f);
        double exact = 0, abs_sum = 1e-30;
        for (int64_t i = 0; i < n; i++) {
            exact += (double)a[i] * b[i];
            abs_sum += fabs((double)a[i] * b[i]);
        }
        dot_err = fmax(dot_err, fabs(dot_f32(a, b, n) - exact) / abs_sum);
        float alpha = 0.37f;
        double *want = malloc((size_t)(n + 1) * sizeof(double));
        /* relative to the size of the terms: y + a*x may cancel to near 0 */
        double *scale = malloc((size_t)(n + 1) * sizeof(double));
        for (int64_t i = 0; i < n; i++) {
            want[i] = y[i] + (double)alpha * a[i];
            scale[i] = fabs(y[i]) + fabs((double)alpha * a[i]);
        }
        axpy_f32(y, alpha, a, n);
        for (int64_t i = 0; i < n; i++)
            axpy_err = fmax(axpy_err, fabs(y[i] - want[i]) / scale[i]);
        free(scale);
        free(a), free(b), free(y), free(want);
    }
    check("dot_f32 vs double sum, lengths 0..4096, rel. to sum|ab|", dot_err, 1e-5);
    check("axpy_f32 vs double, lengths 0..4096, rel. to |y|+|ax|", axpy_err, 1e-6);
}

/* ---- 3. Hand-built blocks ------------------------------------------------- */

struct expected { int index; float value; };

/* Largest |dequant(block)[index] - value| over the list, for both the
 * reference and the fast decoder. */
static double hand_block_error(uint32_t type, const void *block, int n,
                               const struct expected *want, int count) {
    float ref[256], fast[256];
    dequant_row_ref(type, block, ref, n);
    dequant_row(type, block, fast, n);
    double worst = 0;
    for (int i = 0; i < count; i++) {
        worst = fmax(worst, fabs(ref[want[i].index] - want[i].value));
        worst = fmax(worst, fabs(fast[want[i].index] - want[i].value));
        if (ref[want[i].index] != want[i].value)
            printf("     value %d: got %g, want %g\n", want[i].index, ref[want[i].index],
                   want[i].value);
    }
    return worst;
}

static void test_hand_q8_0(void) {
    struct block_q8_0 b;
    memset(&b, 0, sizeof b);
    b.d = 0x3800;          /* half 0.5 */
    b.qs[0] = 1;           /* 0.5 * 1    =   0.5 */
    b.qs[1] = -128;        /* 0.5 * -128 = -64   */
    b.qs[5] = 127;         /* 0.5 * 127  =  63.5 */
    b.qs[31] = -3;         /* 0.5 * -3   =  -1.5 */
    static const struct expected want[] = {
        { 0, 0.5f }, { 1, -64.0f }, { 5, 63.5f }, { 31, -1.5f }, { 2, 0.0f } };
    check("Q8_0 hand-built block: 5 values", hand_block_error(TYPE_Q8_0, &b, 32, want, 5), 0);
}

static void test_hand_q2_k(void) {
    struct block_q2_k b;
    memset(&b, 0, sizeof b);
    b.d = 0x3c00;          /* d = 1 */
    b.dmin = 0x3800;       /* dmin = 0.5 */
    b.qs[0] = 0xe4;        /* bit pairs j=0..3: 0, 1, 2, 3 */
    b.scales[0] = 0x21;    /* sub-block 0: sc 1, m 2 */
    b.scales[2] = 0x03;    /* sub-block 2: sc 3, m 0 */
    b.scales[4] = 0x15;    /* sub-block 4: sc 5, m 1 */
    b.scales[6] = 0xf0;    /* sub-block 6: sc 0, m 15 */
    b.qs[16] = 0x03;       /* value 16 (h 0, j 0, l 16): q 3, sub-block 1 */
    b.scales[1] = 0x12;    /* sub-block 1: sc 2, m 1 */
    b.qs[32 + 17] = 0x02;  /* value 145 (h 1, j 0, l 17): q 2, sub-block 9 */
    b.scales[9] = 0x44;    /* sub-block 9: sc 4, m 4 */
    /* y = d*sc*q - dmin*m:
     *   value   0: q 0, sub 0:  1*1*0 - 0.5*2  = -1
     *   value  32: q 1, sub 2:  1*3*1 - 0      =  3
     *   value  64: q 2, sub 4:  1*5*2 - 0.5*1  =  9.5
     *   value  96: q 3, sub 6:  1*0*3 - 0.5*15 = -7.5
     *   value  16: q 3, sub 1:  1*2*3 - 0.5*1  =  5.5
     *   value 145: q 2, sub 9:  1*4*2 - 0.5*4  =  6
     *   value  17: q 0, sub 1:  0 - 0.5*1      = -0.5 */
    static const struct expected want[] = {
        { 0, -1.0f }, { 32, 3.0f }, { 64, 9.5f }, { 96, -7.5f },
        { 16, 5.5f }, { 145, 6.0f }, { 17, -0.5f } };
    check("Q2_K hand-built block: 7 values", hand_block_error(TYPE_Q2_K, &b, 256, want, 7), 0);
}

static void test_hand_q4_k(void) {
    struct block_q4_k b;
    memset(&b, 0, sizeof b);
    b.d = 0x3800;            /* d = 0.5 */
    b.dmin = 0x3400;         /* dmin = 0.25 */
    b.scales[0] = 0x0a;      /* sub-block 0: sc 10 */
    b.scales[4] = 0x03;      /* sub-block 0: m 3 */
    b.scales[1] = 0x42;      /* sub-block 1: sc 2 (low 6 bits); top bits 01 -> sc[5] bits 4-5 */
    b.scales[5] = 0x80;      /* sub-block 1: m 0 (low 6 bits); top bits 10 -> m[5] bits 4-5 */
    b.scales[9] = 0x21;      /* sub-block 5: sc low nibble 1, m low nibble 2 */
    b.qs[0] = 0xf7;          /* value 0: low nibble 7; value 32: high nibble 15 */
    b.qs[64 + 3] = 0x90;     /* chunk 2, l 3: value 128+3 low 0, value 160+3 high 9 */
    /* Sub-block 5: sc = 1 | 1<<4 = 17, m = 2 | 2<<4 = 34.
     *   value   0: sub 0: 0.5*10*7  - 0.25*3  = 34.25
     *   value  32: sub 1: 0.5*2*15  - 0       = 15
     *   value 163: sub 5: 0.5*17*9  - 0.25*34 = 68
     *   value 131: sub 4 (sc 0, m 0): 0
     *   value 161: sub 5, q 0:    0 - 0.25*34 = -8.5 */
    static const struct expected want[] = {
        { 0, 34.25f }, { 32, 15.0f }, { 163, 68.0f }, { 131, 0.0f }, { 161, -8.5f } };
    check("Q4_K hand-built block: 5 values", hand_block_error(TYPE_Q4_K, &b, 256, want, 5), 0);
}

static void test_hand_iq2_xxs(void) {
    struct block_iq2_xxs b;
    memset(&b, 0, sizeof b);
    b.d = 0x3c00;                                   /* d = 1 */
    uint32_t a0 = 0u | 1u << 8 | 255u << 16 | 2u << 24;  /* grid entries 0, 1, 255, 2 */
    uint32_t a1 = 0u | 1u << 7 | 3u << 14 | 0u << 21 | 3u << 28;  /* signs 0,1,3,0; ls 3 */
    memcpy(&b.qs[0], &a0, 4);
    memcpy(&b.qs[2], &a1, 4);
    uint32_t a1_last = 15u << 28;                   /* group 7: grid 0, ls 15 */
    memcpy(&b.qs[30], &a1_last, 4);
    /* Group 0: db = 1 * (0.5 + 3) / 4 = 0.875.
     *   piece 0, grid[0] = 0x0808080808080808, signs 0:      all  0.875*8 = 7
     *   piece 1, grid[1] = 0x080808080808082b, signs(1) = 0x81 (one odd bit,
     *            parity adds bit 7): value 8 = -0.875*43 = -37.625,
     *            values 9..14 = 7, value 15 = -7
     *   piece 2, grid[255] = 0x2b2b2b1908081908 (bytes, low first:
     *            08 19 08 08 19 2b 2b 2b), signs(3) = 0x03 (even, no parity):
     *            -7, -21.875, 7, 7, 21.875, 37.625, 37.625, 37.625
     *   piece 3, grid[2] = 0x0808080808081919: 21.875, 21.875, then 7s
     * Group 1 is all zero bytes: grid 0, ls 0, db = 1/8: every value 1.
     * Group 7: ls 15, db = 15.5/4 = 3.875: every value 31. */
    static const struct expected want[] = {
        { 0, 7.0f }, { 7, 7.0f }, { 8, -37.625f }, { 9, 7.0f }, { 15, -7.0f },
        { 16, -7.0f }, { 17, -21.875f }, { 18, 7.0f }, { 20, 21.875f }, { 23, 37.625f },
        { 24, 21.875f }, { 25, 21.875f }, { 26, 7.0f }, { 32, 1.0f }, { 63, 1.0f },
        { 224, 31.0f }, { 255, 31.0f } };
    check("IQ2_XXS hand-built block: 17 values",
          hand_block_error(TYPE_IQ2_XXS, &b, 256, want, 17), 0);
}

/* ---- 4. Quantize, then decode --------------------------------------------- */

/* RMS(x - decode(encode(x))) / RMS(x) over a few normal rows. */
static double roundtrip_rms(uint32_t type, int64_t n, int rows) {
    double err2 = 0, sig2 = 0;
    void *row = malloc(type_row_bytes(type, (uint64_t)n));
    float *x = malloc((size_t)n * sizeof(float)), *y = malloc((size_t)n * sizeof(float));
    for (int r = 0; r < rows; r++) {
        fill_normal(x, n, 0.02f);
        quantize_row(type, x, row, n);
        dequant_row_ref(type, row, y, n);
        for (int64_t i = 0; i < n; i++) {
            err2 += ((double)x[i] - y[i]) * ((double)x[i] - y[i]);
            sig2 += (double)x[i] * x[i];
        }
    }
    free(row), free(x), free(y);
    return sqrt(err2 / sig2);
}

/* Q8_0 has a hard bound: each value within d/2 of the input, d the stored
 * half scale (5.10). Reported as max |error| / (d/2), which reaches 1 on
 * values that fall on a rounding tie; the 1e-5 allows for x * (1/d) being
 * computed in float. */
static void test_roundtrip_q8_0(void) {
    enum { N = 4096 };
    static float x[N], y[N];
    static struct block_q8_0 b[N / 32];
    double worst = 0;
    for (int rep = 0; rep < 20; rep++) {
        fill_normal(x, N, rep % 2 ? 1e-3f : 3.0f);
        x[rep] = 0;  /* a zero in every row; also one all-zero block below */
        if (rep == 0) memset(x, 0, 32 * sizeof(float));
        quantize_row(TYPE_Q8_0, x, b, N);
        dequant_row_ref(TYPE_Q8_0, b, y, N);
        for (int i = 0; i < N; i++) {
            double half_step = 0.5 * f16_to_f32(b[i / 32].d);
            double err = fabs((double)x[i] - y[i]);
            worst = fmax(worst, half_step > 0 ? err / half_step : err * 1e30);
        }
    }
    check("Q8_0 round trip: max |x-y| / (d/2)", worst, 1.0 + 1e-5);
}

static void test_roundtrip_16bit(void) {
    enum { N = 4096 };
    static float x[N], y[N];
    static uint16_t h[N];
    double worst_f16 = 0, worst_bf16 = 0;
    fill_normal(x, N, 10.0f);   /* well inside the normal range of a half */
    quantize_row(TYPE_F16, x, h, N);
    dequant_row_ref(TYPE_F16, h, y, N);
    for (int i = 0; i < N; i++)
        if (fabsf(x[i]) > 1e-3f) worst_f16 = fmax(worst_f16, fabs(x[i] - y[i]) / fabs(x[i]));
    quantize_row(TYPE_BF16, x, h, N);
    dequant_row_ref(TYPE_BF16, h, y, N);
    for (int i = 0; i < N; i++)   /* (an fmax() here crashes gcc 12's aarch64 vectorizer) */
        if (fabsf(x[i]) > 0.0f && fabs(x[i] - y[i]) / fabs(x[i]) > worst_bf16)
            worst_bf16 = fabs(x[i] - y[i]) / fabs(x[i]);
    /* Round to nearest: relative error at most half an ulp, 2^-11 and 2^-8. */
    check("F16 round trip: max relative error (2^-11)", worst_f16, 1.0 / 2048);
    check("BF16 round trip: max relative error (2^-8)", worst_bf16, 1.0 / 256);
}

/* The low-bit formats have no hard bound, only a typical error. Measured
 * with this test's seed on 8 rows of 4096 normal values (x86-64, gcc 12):
 *
 *     Q4_K 0.0706    Q2_K 0.2689    IQ2_XXS 0.3273
 *
 * The bounds add about 10%. Changing the seed moves these numbers in the
 * third digit; a broken encoder or decoder moves them by far more (a wrong
 * sub-block index, for example, gives errors near 1). */
static void test_roundtrip_low_bit(void) {
    struct { uint32_t type; double bound; } cases[] = {
        { TYPE_Q4_K, 0.078 },
        { TYPE_Q2_K, 0.300 },
        { TYPE_IQ2_XXS, 0.360 },
    };
    for (int i = 0; i < 3; i++) {
        char what[96];
        snprintf(what, sizeof what, "%s round trip: RMS(x-y)/RMS(x), normal data",
                 type_traits_of(cases[i].type)->name);
        check(what, roundtrip_rms(cases[i].type, 4096, 8), cases[i].bound);
    }
    /* Zero rows must encode to exact zeros, not nans. */
    static float zero[256], y[256];
    static uint8_t row[512];    /* 256 values of the widest type: Q8_0, 272 bytes */
    int bad = 0;
    for (int i = 3; i < 7; i++) {
        uint32_t type = all_types[i];
        quantize_row(type, zero, row, 256);
        dequant_row_ref(type, row, y, 256);
        for (int j = 0; j < 256; j++) bad += y[j] != 0.0f;
    }
    check("all-zero rows encode to zeros in every quant type (count)", bad, 0);
}

/* ---- 5. IQ2_XXS tables ---------------------------------------------------- */

static void test_iq2_tables(void) {
    int bad_bytes = 0, duplicates = 0;
    for (int g = 0; g < 256; g++) {
        for (int j = 0; j < 8; j++) {
            int v = quant_iq2_grid_byte(g, j);
            bad_bytes += v != 0x08 && v != 0x19 && v != 0x2b;
        }
        for (int h = 0; h < g; h++) duplicates += quant_iq2_xxs_grid[g] == quant_iq2_xxs_grid[h];
    }
    check("IQ2 grid: bytes outside {0x08,0x19,0x2b} (count)", bad_bytes, 0);
    check("IQ2 grid: duplicate entries among 256 (count)", duplicates, 0);

    /* Signs: low 7 bits kept, even popcount, and GGML's ksigns_iq2xs values
     * at a few indices: [1] = 129, [3] = 3, [7] = 135, [126] = 126, [127] = 255. */
    int bad_signs = 0;
    for (int s = 0; s < 128; s++) {
        int v = quant_iq2_signs(s);
        bad_signs += (v & 127) != s || (__builtin_popcount((unsigned)v) & 1) != 0;
    }
    bad_signs += quant_iq2_signs(1) != 129 || quant_iq2_signs(3) != 3;
    bad_signs += quant_iq2_signs(7) != 135 || quant_iq2_signs(126) != 126;
    bad_signs += quant_iq2_signs(127) != 255;
    check("IQ2 signs: parity rule and known values (count wrong)", bad_signs, 0);

    /* The float tables built by quant_tables_init agree with the bytes. */
    int bad_tables = 0;
    for (int g = 0; g < 256; g++)
        for (int j = 0; j < 8; j++)
            bad_tables += quant_iq2_grid_f32[g][j] != (float)quant_iq2_grid_byte(g, j);
    for (int s = 0; s < 128; s++)
        for (int j = 0; j < 8; j++)
            bad_tables += (quant_iq2_sign_bits[s][j] != 0) != ((quant_iq2_signs(s) >> j) & 1);
    check("IQ2 float grid and sign-bit tables match (count wrong)", bad_tables, 0);
}

/* ---- 6. Eight-bit activations (3.9) --------------------------------------- */

/* The quantized activations themselves: every value within half a step of
 * x, and the 16-value sums exact to float rounding. */
static void test_act_quantize(void) {
    static const int64_t lengths[] = { 32, 256, 4096, 4128 };
    double step_err = 0, sum_err = 0, pair_wrong = 0, piece_wrong = 0;
    for (size_t li = 0; li < sizeof lengths / sizeof lengths[0]; li++) {
        int64_t n = lengths[li];
        float *x = malloc((size_t)n * sizeof(float));
        void *mem = malloc(act_q8_bytes(n));
        fill_normal(x, n, 1.0f);
        if (n >= 256) memset(x + 64, 0, 32 * sizeof(float));     /* an all-zero block */
        struct act_q8 a = act_q8_view(mem, n);
        act_quantize_q8(x, &a);
        for (int64_t i = 0; i < n; i++) {
            double d = a.d[i / 32];
            double err = fabs(x[i] - d * a.q[i]);
            step_err = fmax(step_err, d > 0 ? err / (d / 2) : err);
        }
        for (int64_t k = 0; k < n / 16; k++) {
            double want = 0, mag = 1e-30;
            for (int l = 0; l < 16; l++) want += x[16 * k + l], mag += fabs(x[16 * k + l]);
            sum_err = fmax(sum_err, fabs(a.sum16[k] - want) / mag);
        }
        /* q_pairs: register 2g+h of a block of 256 holds half h of group g,
         * then half h of group g+4; a tail under 256 is q itself */
        for (int64_t i = 0; i < n; i++) {
            int64_t base = i / 256 * 256, r = (i % 256) / 32, l = i % 32, src = i;
            if (base + 256 <= n)
                src = base + 32 * (r / 2 + (l >= 16 ? 4 : 0)) + 16 * (r % 2) + l % 16;
            pair_wrong += a.q_pairs[i] != a.q[src];
        }
        /* q_pieces: register t of a block of 256 holds piece t (8 values)
         * of groups 0..7 in turn; a tail under 256 is q itself */
        for (int64_t i = 0; i < n; i++) {
            int64_t base = i / 256 * 256, t = (i % 256) / 64, g = (i % 64) / 8, src = i;
            if (base + 256 <= n) src = base + 32 * g + 8 * t + i % 8;
            piece_wrong += a.q_pieces[i] != a.q[src];
        }
        free(x), free(mem);
    }
    check("act_quantize_q8: |x - d*q| in half steps (<= 1)", step_err, 1.0 + 1e-5);
    check("act_quantize_q8: 16-value sums vs double, rel. to sum|x|", sum_err, 1e-6);
    check("act_quantize_q8: q_pairs values not where the IQ2_XXS kernel reads them", pair_wrong, 0);
    check("act_quantize_q8: q_pieces values not where the AVX-512 IQ2_XXS kernel reads them",
          piece_wrong, 0);
}

/* One row: every integer kernel variant this CPU runs (3.9) against the
 * scalar integer reference (to 1e-5 of sum |w*x|), and the reference against
 * the float vec_dot_ref, measured in units of the bound
 * sum_b d[b]/2 sum_{i in b} |w[i]| (3.9). */
enum { MAX_Q8_VARIANTS = 8 };
struct q8_errors { double fast[MAX_Q8_VARIANTS], bound_units, relative; };

static void compare_q8_row(uint32_t type, int64_t n, bool raw_bytes, struct q8_errors *err) {
    void *row = malloc(type_row_bytes(type, (uint64_t)n));
    float *x = malloc((size_t)n * sizeof(float)), *w = malloc((size_t)n * sizeof(float));
    void *mem = malloc(act_q8_bytes(n));
    random_row(type, row, n, raw_bytes);
    fill_normal(x, n, 1.0f);
    struct act_q8 a = act_q8_view(mem, n);
    act_quantize_q8(x, &a);
    dequant_row_ref(type, row, w, n);
    double abs_sum = 1e-30, bound = 1e-30;
    for (int64_t i = 0; i < n; i++) {
        abs_sum += fabs((double)w[i] * x[i]);
        bound += a.d[i / 32] / 2 * fabs(w[i]);
    }
    double ref_q8 = vec_dot_q8_ref(type, row, &a), ref_f32 = vec_dot_ref(type, row, x, n);
    for (int v = 0; v < quant_q8_variant_count() && v < MAX_Q8_VARIANTS; v++) {
        quant_q8_use_variant(v);
        err->fast[v] = fmax(err->fast[v], fabs(vec_dot_q8(type, row, &a) - ref_q8) / abs_sum);
    }
    quant_q8_use_variant(0);
    /* the bound plus the float rounding of both sums */
    double diff = fabs(ref_q8 - ref_f32);
    err->bound_units = fmax(err->bound_units, diff / (bound + 2e-6 * abs_sum));
    if (!raw_bytes) err->relative = fmax(err->relative, diff / abs_sum);
    free(row), free(x), free(w), free(mem);
}

/* The variants this CPU offers, as "a,b,c"; when the caller says which to
 * expect (tests/arm64.sh runs qemu with CPUs of known features), they must
 * be exactly those, which tests the start-up detection. */
static void test_q8_variants(const char *expected) {
    char list[256] = "";
    int count = quant_q8_variant_count(), bad = 0;
    for (int v = 0; v < count; v++) {
        const char *name = quant_q8_variant_name(v);
        if (!name || !*name) { bad++; continue; }
        for (int u = 0; u < v; u++) bad += strcmp(name, quant_q8_variant_name(u)) == 0;
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", v ? "," : "", name);
    }
    bad += quant_q8_variant_name(count) != NULL;
    check_true("integer kernel variants: at least one, named, distinct",
               count >= 1 && count <= MAX_Q8_VARIANTS && !bad);
    printf("     variants on this CPU: %s\n", list);
    if (expected) {
        char what[160];
        snprintf(what, sizeof what, "integer kernel variants are \"%s\"", expected);
        check_true(what, strcmp(list, expected) == 0);
    }
}

/* Every kernel variant this CPU runs (3.9: quant_q8_variant_count), each
 * held to the reference on the same kinds of rows. Q8_0 also gets lengths
 * that end in an odd 32-value block, the tail its kernels do one at a time;
 * the other types come in whole blocks of 256, and 256 and 768 give the
 * AVX-512 IQ2_XXS kernel, which pairs blocks, its odd last one. */
static void test_q8_kernels(void) {
    static const uint32_t types[] = { TYPE_Q8_0, TYPE_Q2_K, TYPE_Q4_K, TYPE_IQ2_XXS };
    static const int64_t lengths_256[] = { 256, 768, 4096, 7168 };
    static const int64_t lengths_32[] = { 32, 96, 4096, 4128 };
    for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++) {
        const int64_t *lengths = types[ti] == TYPE_Q8_0 ? lengths_32 : lengths_256;
        struct q8_errors err = { { 0 }, 0, 0 };
        for (int li = 0; li < 4; li++)
            for (int rep = 0; rep < 8; rep++)
                compare_q8_row(types[ti], lengths[li], rep % 2 == 1, &err);
        const char *name = type_traits_of(types[ti])->name;
        char what[128];
        for (int v = 0; v < quant_q8_variant_count() && v < MAX_Q8_VARIANTS; v++) {
            snprintf(what, sizeof what, "%s vec_dot_q8 (%s) vs vec_dot_q8_ref, rel. to sum|wx|",
                     name, quant_q8_variant_name(v));
            check(what, err.fast[v], 1e-5);
        }
        snprintf(what, sizeof what, "%s vec_dot_q8_ref vs vec_dot_ref, in bound units", name);
        check(what, err.bound_units, 1.0);
        snprintf(what, sizeof what, "%s vec_dot_q8_ref vs vec_dot_ref, rel. sum|wx|, normal", name);
        check(what, err.relative, 1e-2);
    }
}

/* ---- 7. many tokens at once (3.10) ---------------------------------------- */

/* One row decoded once against n_tok tokens: every token's result must be
 * the very float vec_dot_q8() returns (the tiles promise bit for bit, so
 * that prefill and decode agree); the worst difference is reported
 * relative to sum |w*x| and must be 0. */
static double compare_q8_tile(uint32_t type, int64_t n, int n_tok, bool raw_bytes) {
    void *row = malloc(type_row_bytes(type, (uint64_t)n));
    float *x = malloc((size_t)n * sizeof(float)), *w = malloc((size_t)n * sizeof(float));
    void *dec = malloc(q8_row_bytes(n));
    void **mem = malloc((size_t)n_tok * sizeof(void *));
    int8_t **xt = malloc((size_t)n_tok * sizeof(int8_t *));
    struct q8_token *tok = malloc((size_t)n_tok * sizeof(struct q8_token));
    float *y = malloc((size_t)n_tok * sizeof(float));
    random_row(type, row, n, raw_bytes);
    dequant_row_ref(type, row, w, n);
    double worst = 0;
    for (int t = 0; t < n_tok; t++) {
        mem[t] = malloc(act_q8_bytes(n));
        xt[t] = malloc((size_t)n);
        fill_normal(x, n, 1.0f);
        tok[t].a = act_q8_view(mem[t], n);
        act_quantize_q8(x, &tok[t].a);
        q8_tile_input(tok[t].a.q, xt[t], n);
        tok[t].t = xt[t];
    }
    struct q8_row r = q8_row_view(dec, n);
    q8_row_decode(type, row, &r);
    q8_row_dot_tokens(&r, tok, n_tok, y);
    for (int t = 0; t < n_tok; t++) {
        double abs_sum = 1e-30;
        for (int64_t i = 0; i < n; i++)
            abs_sum += fabs((double)w[i] * tok[t].a.d[i / 32] * tok[t].a.q[i]);
        worst = fmax(worst, fabs(y[t] - vec_dot_q8(type, row, &tok[t].a)) / abs_sum);
        /* and the integer sums are right: against the scalar reference */
        worst = fmax(worst, fabs(y[t] - vec_dot_q8_ref(type, row, &tok[t].a)) / abs_sum > 1e-5);
        free(mem[t]), free(xt[t]);
    }
    free(row), free(x), free(w), free(dec), free(mem), free(xt), free(tok), free(y);
    return worst;
}

/* One type under the variant in use: the tiles against vec_dot_q8. */
static void check_q8_tiles(uint32_t type, const char *variant) {
    static const int64_t lengths[] = { 32, 96, 256, 320, 1024, 4096, 7168 };
    static const int tokens[] = { 1, 2, 3, 4, 5, 6, 7, 17 };
    double worst = 0;
    int rows = 0;
    for (size_t li = 0; li < sizeof lengths / sizeof lengths[0]; li++) {
        if (lengths[li] % type_traits_of(type)->block_values) continue;
        for (size_t k = 0; k < sizeof tokens / sizeof tokens[0]; k++)
            for (int rep = 0; rep < 4; rep++, rows++)
                worst = fmax(worst, compare_q8_tile(type, lengths[li], tokens[k], rep % 2 == 1));
    }
    char what[128];
    snprintf(what, sizeof what, "%s row once x 1..17 tokens == vec_dot_q8 (%s), %d rows",
             type_traits_of(type)->name, variant, rows);
    check(what, worst, 0);
}

/* Every variant this CPU runs: where the tiles serve it (3.10: they copy
 * one variant's float steps), they must return its floats exactly. */
static void test_q8_tiles(void) {
    static const uint32_t types[] = { TYPE_Q8_0, TYPE_Q2_K, TYPE_IQ2_XXS };
    int served = 0;
    for (int v = 0; v < quant_q8_variant_count(); v++) {
        quant_q8_use_variant(v);
        for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++) {
            if (quant_has_q8_tile(types[ti])) {
                check_q8_tiles(types[ti], quant_q8_variant_name(v));
                served++;
            } else {
                printf("note: no tile kernel for %s under %s (the engine loops vec_dot_q8)\n",
                       type_traits_of(types[ti])->name, quant_q8_variant_name(v));
            }
        }
    }
    quant_q8_use_variant(0);
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    /* Q8_0, Q2_K and IQ2_XXS under AVX2, and under AVX-512 where the CPU has it */
    int want = 3 + 3 * (quant_q8_variant_count() > 1);
    check_msg(served == want, "x86: tiles serve %d (variant, type) pairs, want %d", served, want);
#else
    (void)served;
#endif
}

/* Usage: test_quant [--expect-q8-variants a,b,c] */
int main(int argc, char **argv) {
    const char *expect_variants = NULL;
    if (argc == 3 && strcmp(argv[1], "--expect-q8-variants") == 0) expect_variants = argv[2];
    else if (argc != 1) {
        fprintf(stderr, "usage: %s [--expect-q8-variants a,b,c]\n", argv[0]);
        return 2;
    }
    quant_tables_init();
    printf("-- 1. half and bfloat16\n");
    test_f16_to_f32();
    test_f32_to_f16();
#if defined(__F16C__)
    test_f16_against_f16c();
#endif
    test_bf16();
    printf("-- 2. fast kernels vs reference\n");
    test_traits();
    test_fast_vs_ref();
    test_dot_axpy_f32();
    printf("-- 3. hand-built blocks\n");
    test_hand_q8_0();
    test_hand_q2_k();
    test_hand_q4_k();
    test_hand_iq2_xxs();
    printf("-- 4. quantize then decode\n");
    test_roundtrip_q8_0();
    test_roundtrip_16bit();
    test_roundtrip_low_bit();
    printf("-- 5. IQ2_XXS tables\n");
    test_iq2_tables();
    printf("-- 6. eight-bit activations\n");
    test_act_quantize();
    test_q8_variants(expect_variants);
    test_q8_kernels();
    printf("-- 7. many tokens at once\n");
    test_q8_tiles();
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed == 0 ? 0 : 1;
}
