/* Headers this chapter needs (hoisted to the top of ds4.c):
 *
 *     #include <stdint.h> <stddef.h> <stdlib.h> <string.h> <math.h>
 *     #include <stdio.h> <stdbool.h>
 *     <immintrin.h> when __AVX2__, <arm_neon.h> when __ARM_NEON
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <stdio.h>
#include <stdbool.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

/* =========================================================================
 * 5. Quantized blocks.
 * =========================================================================
 *
 * Format: [GGML] block layouts, see docs/dsv4-format.md §2.
 * CPU: dequant_row_ref(), vec_dot_ref() (the definitions);
 *      dequant_row(), vec_dot() (the fast paths used by the engine).
 * Tests: tests/test_quant.c.
 *
 * The GGUF file stores most of DeepSeek V4 Flash's weights not as floats but
 * as *quantized blocks*: a run of 32 or 256 consecutive values of one
 * weight row, squeezed into a few bytes that hold small integers plus one or
 * two shared scale factors. The routed experts of the "q2" file cost about
 * 2.25 bits per weight instead of 16 (80.8 GiB instead of roughly seven
 * times that, docs/dsv4-format.md §1.4), which is what lets the model fit
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
 * Every format is defined twice. The *reference* functions (5.5) decode one
 * value at a time in plain C: they are the specification, short enough to
 * check against the byte tables below by eye. The *fast* functions (5.7 for
 * x86-64 AVX2, 5.8 for arm64 NEON) decode eight or four values per
 * instruction and are tested against the reference (tests/test_quant.c).
 * Nothing else in the engine looks inside a block.
 *
 * WHY ACTIVATIONS STAY FLOAT
 *
 * GGML and the original ds4 quantize the *activation* vector too (to "Q8_K",
 * 8-bit with one scale per 256) so the inner loop can be an integer dot
 * product. We do not: the weights are decoded to float in registers and
 * multiplied with the float32 activations. It costs some speed, but then
 * vec_dot() differs from "dequantize the row, then an ordinary float dot
 * product" only by float rounding (the order of the additions, 5.6), so the
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
 *   (5.4), built once by quant_tables_init() before any thread starts.
 */

/* ---- 5.1 Types and their sizes ------------------------------------------ */

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

/* ---- 5.2 Half and bfloat16 floats --------------------------------------- */

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

/* ---- 5.3 Block layouts --------------------------------------------------- */

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
 * 8-value pieces drawn from a fixed codebook (5.4):
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
 * has an even number of minus signs (5.4 explains). */
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

/* ---- 5.4 The IQ2_XXS codebook -------------------------------------------- */

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

static void quant_tables_init(void) {
    for (int g = 0; g < 256; g++)
        for (int j = 0; j < 8; j++)
            quant_iq2_grid_f32[g][j] = (float)quant_iq2_grid_byte(g, j);
    for (int s = 0; s < 128; s++) {
        int signs = quant_iq2_signs(s);
        for (int j = 0; j < 8; j++)
            quant_iq2_sign_bits[s][j] = (signs >> j) & 1 ? 0x80000000u : 0;
    }
    quant_tables_ready = true;
}

/* A fast IQ2_XXS kernel reading all-zero tables would silently return zero;
 * make the missing start-up call loud instead. */
static void quant_require_tables(void) {
    if (quant_tables_ready) return;
    fprintf(stderr, "ds4: quant_tables_init() was not called before an IQ2_XXS kernel\n");
    abort();
}

/* ---- 5.5 Reference decoders: the definition of each format --------------- */

/* One function per type, each decoding `nb` consecutive blocks into
 * y[nb * block_values]. The loops follow the formulas of 5.3 literally and
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

/* ---- 5.6 Fast paths: the plan -------------------------------------------- */

/* Decoding a token multiplies every active weight once, so this is the hot
 * loop of the whole engine. Each SIMD section below provides the same four
 * entry points, and 5.9 dispatches to them:
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
 * VM) this took Q4_K from 6.5 to 10.4 billion weights per second per core.
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

/* ---- 5.7 x86-64: AVX2, FMA and F16C -------------------------------------- */

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
 * bytes at qs[32h + 16*(k%2)] (5.3), so one shift and one mask give all 16. */
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
 * the sign bits XORed in (5.4). */
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

/* ---- 5.8 arm64: NEON ----------------------------------------------------- */

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

/* Decoders, as in 5.7. A vshlq by a negative count shifts right. */
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

/* ---- 5.8' Any other CPU: the reference ----------------------------------- */

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

/* ---- 5.9 The kernels the engine calls ------------------------------------ */

/* Decode a row of `n` values of any type into floats (5.5 gives the meaning).
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

/* ---- 5.10 Encoders -------------------------------------------------------- */

/* The engine only reads quantized weights; these encoders exist for the
 * converter and for the tests, which need blocks with known content. They
 * aim to be simple and reasonable, not to match GGML's quantizers bit for
 * bit: any block they write is valid and decodes by 5.5, which is all the
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
 *    bit flipped (5.4). With the signs fixed, piece value j is
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
