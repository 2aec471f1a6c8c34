// kernels.metal -- the forward pass of DeepSeek V4 Flash as Metal kernels.
//
// Every kernel here is the GPU twin of one CPU function of ds4.c and carries
// its name; the comment above each one repeats the formula of the CPU
// function, so the book can set the two side by side. The decomposition is
// chosen so that a CUDA twin maps one to one:
//
//     Metal                              CUDA
//     threadgroup                        thread block
//     simdgroup of 32 lanes              warp of 32 lanes
//     threadgroup memory (argument)      __shared__ memory
//     simd_sum / simd_max                __shfl_xor_sync butterfly
//     threadgroup_barrier                __syncthreads
//
// The host (ds4_metal.m) dispatches each kernel with the threadgroup size
// named in its header ("threads: ..."); the Metal-on-CPU harness
// (tests/metal/) runs this file unchanged, as C++, with the same sizes, and
// compares every kernel with its CPU twin.
//
// Threadgroup memory always arrives as an argument, spelled TG_ARG(n) =
// [[threadgroup(n)]], so that the harness can hand one host buffer to all
// the emulated threads of a threadgroup. No kernel returns early from a
// threadgroup that later meets a barrier.
//
// Numerics: ds4_metal.m compiles with fast math off, so exp, sqrt and
// division are the precise forms. GPUs flush float subnormals to zero; that
// can differ from the CPU only in an FP8/FP4 block whose values are all
// below about 1e-37, where the CPU keeps a subnormal the GPU rounds to 0.
#include <metal_stdlib>
using namespace metal;

#ifndef TG_ARG
#define TG_ARG(n) [[threadgroup(n)]]
#endif

// ---- Quantized blocks (ds4.c chapter 3; byte layouts drawn there) ---------

struct block_q8_0 {
    half d;
    char qs[32];
};

struct block_q2_k {
    uchar scales[16];
    uchar qs[64];
    half d;
    half dmin;
};

struct block_q4_k {
    half d;
    half dmin;
    uchar scales[12];
    uchar qs[128];
};

struct block_iq2_xxs {
    half d;
    ushort qs[32];
};

// The IQ2_XXS codebook, byte j of entry g = magnitude of value j. Source:
// `iq2xxs_grid` of GGML (MIT License), reproduced as data, as in ds4.c 3.4.
constant ulong iq2_xxs_grid[256] = {
    0x0808080808080808ul, 0x080808080808082bul, 0x0808080808081919ul, 0x0808080808082b08ul,
    0x0808080808082b2bul, 0x0808080808190819ul, 0x0808080808191908ul, 0x08080808082b0808ul,
    0x08080808082b082bul, 0x08080808082b2b08ul, 0x08080808082b2b2bul, 0x0808080819080819ul,
    0x0808080819081908ul, 0x0808080819190808ul, 0x0808080819192b08ul, 0x08080808192b0819ul,
    0x08080808192b1908ul, 0x080808082b080808ul, 0x080808082b08082bul, 0x080808082b082b2bul,
    0x080808082b2b082bul, 0x0808081908080819ul, 0x0808081908081908ul, 0x0808081908190808ul,
    0x0808081908191919ul, 0x0808081919080808ul, 0x080808192b081908ul, 0x080808192b192b08ul,
    0x0808082b08080808ul, 0x0808082b0808082bul, 0x0808082b082b082bul, 0x0808082b2b08082bul,
    0x0808190808080819ul, 0x0808190808081908ul, 0x0808190808190808ul, 0x08081908082b0819ul,
    0x08081908082b1908ul, 0x0808190819080808ul, 0x080819081908082bul, 0x0808190819082b08ul,
    0x08081908192b0808ul, 0x080819082b080819ul, 0x080819082b081908ul, 0x080819082b190808ul,
    0x080819082b2b1908ul, 0x0808191908080808ul, 0x080819190808082bul, 0x0808191908082b08ul,
    0x08081919082b0808ul, 0x080819191908192bul, 0x08081919192b2b19ul, 0x080819192b080808ul,
    0x080819192b190819ul, 0x0808192b08082b19ul, 0x0808192b08190808ul, 0x0808192b19080808ul,
    0x0808192b2b081908ul, 0x0808192b2b2b1908ul, 0x08082b0808080808ul, 0x08082b0808081919ul,
    0x08082b0808082b08ul, 0x08082b0808191908ul, 0x08082b08082b2b08ul, 0x08082b0819080819ul,
    0x08082b0819081908ul, 0x08082b0819190808ul, 0x08082b081919082bul, 0x08082b082b082b08ul,
    0x08082b1908081908ul, 0x08082b1919080808ul, 0x08082b2b0808082bul, 0x08082b2b08191908ul,
    0x0819080808080819ul, 0x0819080808081908ul, 0x0819080808190808ul, 0x08190808082b0819ul,
    0x0819080819080808ul, 0x08190808192b0808ul, 0x081908082b081908ul, 0x081908082b190808ul,
    0x081908082b191919ul, 0x0819081908080808ul, 0x0819081908082b08ul, 0x08190819082b0808ul,
    0x0819081919190808ul, 0x0819081919192b2bul, 0x081908192b080808ul, 0x0819082b082b1908ul,
    0x0819082b19081919ul, 0x0819190808080808ul, 0x0819190808082b08ul, 0x08191908082b0808ul,
    0x08191908082b1919ul, 0x0819190819082b19ul, 0x081919082b080808ul, 0x0819191908192b08ul,
    0x08191919192b082bul, 0x0819192b08080808ul, 0x0819192b0819192bul, 0x08192b0808080819ul,
    0x08192b0808081908ul, 0x08192b0808190808ul, 0x08192b0819080808ul, 0x08192b082b080819ul,
    0x08192b1908080808ul, 0x08192b1908081919ul, 0x08192b192b2b0808ul, 0x08192b2b19190819ul,
    0x082b080808080808ul, 0x082b08080808082bul, 0x082b080808082b2bul, 0x082b080819081908ul,
    0x082b0808192b0819ul, 0x082b08082b080808ul, 0x082b08082b08082bul, 0x082b0819082b2b19ul,
    0x082b081919082b08ul, 0x082b082b08080808ul, 0x082b082b0808082bul, 0x082b190808080819ul,
    0x082b190808081908ul, 0x082b190808190808ul, 0x082b190819080808ul, 0x082b19081919192bul,
    0x082b191908080808ul, 0x082b191919080819ul, 0x082b1919192b1908ul, 0x082b192b2b190808ul,
    0x082b2b0808082b08ul, 0x082b2b08082b0808ul, 0x082b2b082b191908ul, 0x082b2b2b19081908ul,
    0x1908080808080819ul, 0x1908080808081908ul, 0x1908080808190808ul, 0x1908080808192b08ul,
    0x19080808082b0819ul, 0x19080808082b1908ul, 0x1908080819080808ul, 0x1908080819082b08ul,
    0x190808081919192bul, 0x19080808192b0808ul, 0x190808082b080819ul, 0x190808082b081908ul,
    0x190808082b190808ul, 0x1908081908080808ul, 0x19080819082b0808ul, 0x19080819192b0819ul,
    0x190808192b080808ul, 0x190808192b081919ul, 0x1908082b08080819ul, 0x1908082b08190808ul,
    0x1908082b19082b08ul, 0x1908082b1919192bul, 0x1908082b192b2b08ul, 0x1908190808080808ul,
    0x1908190808082b08ul, 0x19081908082b0808ul, 0x190819082b080808ul, 0x190819082b192b19ul,
    0x190819190819082bul, 0x19081919082b1908ul, 0x1908192b08080808ul, 0x19082b0808080819ul,
    0x19082b0808081908ul, 0x19082b0808190808ul, 0x19082b0819080808ul, 0x19082b0819081919ul,
    0x19082b1908080808ul, 0x19082b1919192b08ul, 0x19082b19192b0819ul, 0x19082b192b08082bul,
    0x19082b2b19081919ul, 0x19082b2b2b190808ul, 0x1919080808080808ul, 0x1919080808082b08ul,
    0x1919080808190819ul, 0x1919080808192b19ul, 0x19190808082b0808ul, 0x191908082b080808ul,
    0x191908082b082b08ul, 0x1919081908081908ul, 0x191908191908082bul, 0x191908192b2b1908ul,
    0x1919082b2b190819ul, 0x191919082b190808ul, 0x191919082b19082bul, 0x1919191908082b2bul,
    0x1919192b08080819ul, 0x1919192b19191908ul, 0x19192b0808080808ul, 0x19192b0808190819ul,
    0x19192b0808192b19ul, 0x19192b08192b1908ul, 0x19192b1919080808ul, 0x19192b2b08082b08ul,
    0x192b080808081908ul, 0x192b080808190808ul, 0x192b080819080808ul, 0x192b0808192b2b08ul,
    0x192b081908080808ul, 0x192b081919191919ul, 0x192b082b08192b08ul, 0x192b082b192b0808ul,
    0x192b190808080808ul, 0x192b190808081919ul, 0x192b191908190808ul, 0x192b19190819082bul,
    0x192b19192b081908ul, 0x192b2b081908082bul, 0x2b08080808080808ul, 0x2b0808080808082bul,
    0x2b08080808082b2bul, 0x2b08080819080819ul, 0x2b0808082b08082bul, 0x2b08081908081908ul,
    0x2b08081908192b08ul, 0x2b08081919080808ul, 0x2b08082b08190819ul, 0x2b08190808080819ul,
    0x2b08190808081908ul, 0x2b08190808190808ul, 0x2b08190808191919ul, 0x2b08190819080808ul,
    0x2b081908192b0808ul, 0x2b08191908080808ul, 0x2b0819191908192bul, 0x2b0819192b191908ul,
    0x2b08192b08082b19ul, 0x2b08192b19080808ul, 0x2b08192b192b0808ul, 0x2b082b080808082bul,
    0x2b082b1908081908ul, 0x2b082b2b08190819ul, 0x2b19080808081908ul, 0x2b19080808190808ul,
    0x2b190808082b1908ul, 0x2b19080819080808ul, 0x2b1908082b2b0819ul, 0x2b1908190819192bul,
    0x2b1908192b080808ul, 0x2b19082b19081919ul, 0x2b19190808080808ul, 0x2b191908082b082bul,
    0x2b19190819081908ul, 0x2b19191919190819ul, 0x2b192b082b080819ul, 0x2b192b19082b0808ul,
    0x2b2b08080808082bul, 0x2b2b080819190808ul, 0x2b2b08082b081919ul, 0x2b2b081908082b19ul,
    0x2b2b082b08080808ul, 0x2b2b190808192b08ul, 0x2b2b2b0819190808ul, 0x2b2b2b1908081908ul,
};

// Every weight row is decoded in chunks of 32 values: one Q8_0 block, a
// 32-value sub-block of a K-quant super-block, one IQ2_XXS group, or 32
// halves. A row of n values has n / 32 chunks; chunk c of a 256-value type
// is sub-chunk c % 8 of super-block c / 8.

// F32: v[i] = w[32c + i]  (norm-sized matrices some files keep in float)
static void decode_chunk_f32(device const uchar *row, uint c, thread float *v) {
    device const float *w = (device const float *)row + 32 * c;
    for (int i = 0; i < 32; i++) v[i] = w[i];
}

// BF16: v[i] = the float whose top 16 bits are w[32c + i]
static void decode_chunk_bf16(device const uchar *row, uint c, thread float *v) {
    device const ushort *w = (device const ushort *)row + 32 * c;
    for (int i = 0; i < 32; i++) v[i] = as_type<float>(uint(w[i]) << 16);
}

// F16: v[i] = w[32c + i]
static void decode_chunk_f16(device const uchar *row, uint c, thread float *v) {
    device const half *w = (device const half *)row + 32 * c;
    for (int i = 0; i < 32; i++) v[i] = float(w[i]);
}

// Q8_0: v[i] = d * qs[i]       (quant_dequant_q8_0_ref)
static void decode_chunk_q8_0(device const uchar *row, uint c, thread float *v) {
    device const block_q8_0 *b = (device const block_q8_0 *)row + c;
    float d = float(b->d);
    for (int i = 0; i < 32; i++) v[i] = d * float(b->qs[i]);
}

// Q2_K, values e = 32s .. 32s+31 of the super-block (quant_dequant_q2_k_ref):
//     h = s / 4, j = s % 4:  q = (qs[32h + l] >> 2j) & 3,   k = e / 16
//     v = d * (scales[k] & 15) * q - dmin * (scales[k] >> 4)
static void decode_chunk_q2_k(device const uchar *row, uint c, thread float *v) {
    device const block_q2_k *b = (device const block_q2_k *)row + c / 8;
    uint s = c % 8, h = s / 4, j = s % 4;
    float d = float(b->d), dmin = float(b->dmin);
    for (int l = 0; l < 32; l++) {
        uint k = 2 * s + l / 16;
        int q = (b->qs[32 * h + l] >> (2 * j)) & 3;
        v[l] = d * float(b->scales[k] & 15) * float(q) - dmin * float(b->scales[k] >> 4);
    }
}

// Q4_K's 6-bit scale and min of sub-block k (quant_q4_k_scale_min).
static void q4_k_scale_min(device const uchar *scales, uint k, thread int &sc, thread int &m) {
    if (k < 4) {
        sc = scales[k] & 63;
        m = scales[k + 4] & 63;
    } else {
        sc = (scales[k + 4] & 15) | ((scales[k - 4] >> 6) << 4);
        m = (scales[k + 4] >> 4) | ((scales[k] >> 6) << 4);
    }
}

// Q4_K, sub-block k = s (quant_dequant_q4_k_ref):
//     byte = qs[32 (k/2) + l];  q = k even ? byte & 15 : byte >> 4
//     v = d * sc[k] * q - dmin * m[k]
static void decode_chunk_q4_k(device const uchar *row, uint c, thread float *v) {
    device const block_q4_k *b = (device const block_q4_k *)row + c / 8;
    uint k = c % 8;
    int sc, m;
    q4_k_scale_min(b->scales, k, sc, m);
    float d = float(b->d) * float(sc), dm = float(b->dmin) * float(m);
    for (int l = 0; l < 32; l++) {
        int byte = b->qs[32 * (k / 2) + l];
        int q = k % 2 == 0 ? byte & 15 : byte >> 4;
        v[l] = d * float(q) - dm;
    }
}

// IQ2_XXS, group s (quant_dequant_iq2_xxs_ref):
//     a0 = grid indices g[t] (8 bits each), a1 = signs s[t] (7 bits) | ls << 28
//     db = d (0.5 + ls) / 4;  v[8t + j] = db * grid[g[t]][j] * sign_t(j)
//     sign_t = s[t] | parity(s[t]) << 7
static void decode_chunk_iq2_xxs(device const uchar *row, uint c, thread float *v) {
    device const block_iq2_xxs *b = (device const block_iq2_xxs *)row + c / 8;
    uint s = c % 8;
    uint a0 = uint(b->qs[4 * s]) | uint(b->qs[4 * s + 1]) << 16;
    uint a1 = uint(b->qs[4 * s + 2]) | uint(b->qs[4 * s + 3]) << 16;
    float db = float(b->d) * (0.5f + float(a1 >> 28)) * 0.25f;
    for (int t = 0; t < 4; t++) {
        ulong grid = iq2_xxs_grid[(a0 >> (8 * t)) & 255];
        uint s7 = (a1 >> (7 * t)) & 127;
        uint signs = s7 | (popcount(s7) & 1) << 7;
        for (int j = 0; j < 8; j++) {
            float m = db * float((grid >> (8 * j)) & 255);
            v[8 * t + j] = (signs >> j) & 1 ? -m : m;
        }
    }
}

// ---- matmul: y = W x for a chunk of tokens (ds4.c 6.1 matmul / vec_dot) --

// y[t][r] = sum_i W[r][i] x[t][i]          W [out][in], x [n_tok][in]
//
// threads: MATMUL_SIMDS simdgroups of 32 per threadgroup; simdgroup s of
// threadgroup g owns row r = g * MATMUL_SIMDS + s. Lane l decodes chunks
// l, l + 32, ... of the row once per tile of MATMUL_TILE tokens and
// multiplies them with each token of the tile; simd_sum then adds the 32
// lanes' partial sums. The row is read from memory once per tile: decode
// (n_tok <= 8, one tile) streams every weight byte exactly once.
// Summation order: per lane in chunk order, then a butterfly over lanes;
// it differs from vec_dot_ref's left-to-right sum only by float rounding.
#define MATMUL_SIMDS 2
#define MATMUL_TILE 8

struct matmul_args {
    uint in, out, n_tok;
    uint row_bytes;          // bytes of one weight row
    uint x_stride, y_stride; // floats between tokens in x and in y
};

// Token j's row of x (or y): j itself, or rows[j] when the tokens are
// gathered (an expert's share of a chunk, 6.9).
static uint token_row(device const int *rows, uint j) {
    return rows ? (uint)rows[j] : j;
}

// The decoder is a template argument (a tag type; MSL has no function
// pointers as template arguments), so each kernel inlines its own.
template <class Decoder>
static void matmul_rows(device const uchar *w, device const float *x, device float *y,
                        constant matmul_args &a, uint row, ushort lane,
                        device const int *x_rows, device const int *y_rows) {
    if (row >= a.out) return;                       // whole simdgroup agrees
    device const uchar *wr = w + (ulong)row * a.row_bytes;
    uint chunks = a.in / 32;
    for (uint t0 = 0; t0 < a.n_tok; t0 += MATMUL_TILE) {
        float acc[MATMUL_TILE];
        for (int j = 0; j < MATMUL_TILE; j++) acc[j] = 0.0f;
        uint tile = min(a.n_tok - t0, (uint)MATMUL_TILE);
        for (uint c = lane; c < chunks; c += 32) {
            float v[32];
            Decoder::decode(wr, c, v);
            for (uint j = 0; j < tile; j++) {
                device const float *xs = x + (ulong)token_row(x_rows, t0 + j) * a.x_stride + 32 * c;
                float s = 0.0f;
                for (int i = 0; i < 32; i++) s += v[i] * xs[i];
                acc[j] += s;
            }
        }
        for (uint j = 0; j < tile; j++) {              // tile: the same in every lane
            float s = simd_sum(acc[j]);
            if (lane == 0) y[(ulong)token_row(y_rows, t0 + j) * a.y_stride + row] = s;
        }
    }
}

struct decoder_f32 {
    static void decode(device const uchar *r, uint c, thread float *v) {
        decode_chunk_f32(r, c, v);
    }
};
struct decoder_bf16 {
    static void decode(device const uchar *r, uint c, thread float *v) {
        decode_chunk_bf16(r, c, v);
    }
};
struct decoder_f16 {
    static void decode(device const uchar *r, uint c, thread float *v) {
        decode_chunk_f16(r, c, v);
    }
};
struct decoder_q8_0 {
    static void decode(device const uchar *r, uint c, thread float *v) {
        decode_chunk_q8_0(r, c, v);
    }
};
struct decoder_q2_k {
    static void decode(device const uchar *r, uint c, thread float *v) {
        decode_chunk_q2_k(r, c, v);
    }
};
struct decoder_q4_k {
    static void decode(device const uchar *r, uint c, thread float *v) {
        decode_chunk_q4_k(r, c, v);
    }
};
struct decoder_iq2_xxs {
    static void decode(device const uchar *r, uint c, thread float *v) {
        decode_chunk_iq2_xxs(r, c, v);
    }
};

#define MATMUL_KERNEL(name, decoder)                                                   \
    kernel void name(device const uchar *w [[buffer(0)]],                             \
                     device const float *x [[buffer(1)]],                             \
                     device float *y [[buffer(2)]],                                   \
                     constant matmul_args &a [[buffer(3)]],                           \
                     uint3 tg [[threadgroup_position_in_grid]],                       \
                     ushort lane [[thread_index_in_simdgroup]],                       \
                     ushort simd [[simdgroup_index_in_threadgroup]]) {                \
        matmul_rows<decoder>(w, x, y, a, tg.x * MATMUL_SIMDS + simd, lane, nullptr,    \
                             nullptr);                                                \
    }

MATMUL_KERNEL(matmul_f32, decoder_f32)
MATMUL_KERNEL(matmul_bf16, decoder_bf16)
MATMUL_KERNEL(matmul_f16, decoder_f16)
MATMUL_KERNEL(matmul_q8_0, decoder_q8_0)
MATMUL_KERNEL(matmul_q2_k, decoder_q2_k)
MATMUL_KERNEL(matmul_q4_k, decoder_q4_k)
MATMUL_KERNEL(matmul_iq2_xxs, decoder_iq2_xxs)

// ---- matmul_rows: an expert's tokens, gathered (ds4.c 6.9 run_expert) ----

// y[y_rows[j]][r] = sum_i W[r][i] x[x_rows[j]][i]      j < n_tok
//
// matmul with the tokens gathered through index arrays (has_x_rows /
// has_y_rows 0: token j is row j; the unused buffer slot is bound to x):
// an expert reads its tokens' rows of the chunk and writes its outputs to
// their slots, without a copy. Same threads as matmul.
struct matmul_rows_args {
    uint in, out, n_tok, row_bytes;
    uint has_x_rows, has_y_rows;
};

template <class Decoder>
static void matmul_gathered(device const uchar *w, device const float *x,
                            device const int *x_rows, device float *y, device const int *y_rows,
                            constant matmul_rows_args &r, uint row, ushort lane) {
    matmul_args a = { r.in, r.out, r.n_tok, r.row_bytes, r.in, r.out };
    matmul_rows<Decoder>(w, x, y, a, row, lane, r.has_x_rows ? x_rows : nullptr,
                         r.has_y_rows ? y_rows : nullptr);
}

#define MATMUL_ROWS_KERNEL(name, decoder)                                              \
    kernel void name(device const uchar *w [[buffer(0)]],                             \
                     device const float *x [[buffer(1)]],                             \
                     device const int *x_rows [[buffer(2)]],                          \
                     device float *y [[buffer(3)]],                                   \
                     device const int *y_rows [[buffer(4)]],                          \
                     constant matmul_rows_args &a [[buffer(5)]],                      \
                     uint3 tg [[threadgroup_position_in_grid]],                       \
                     ushort lane [[thread_index_in_simdgroup]],                       \
                     ushort simd [[simdgroup_index_in_threadgroup]]) {                \
        matmul_gathered<decoder>(w, x, x_rows, y, y_rows, a, tg.x * MATMUL_SIMDS + simd,  \
                                 lane);                                               \
    }

MATMUL_ROWS_KERNEL(matmul_rows_f32, decoder_f32)
MATMUL_ROWS_KERNEL(matmul_rows_bf16, decoder_bf16)
MATMUL_ROWS_KERNEL(matmul_rows_f16, decoder_f16)
MATMUL_ROWS_KERNEL(matmul_rows_q8_0, decoder_q8_0)
MATMUL_ROWS_KERNEL(matmul_rows_q2_k, decoder_q2_k)
MATMUL_ROWS_KERNEL(matmul_rows_q4_k, decoder_q4_k)
MATMUL_ROWS_KERNEL(matmul_rows_iq2_xxs, decoder_iq2_xxs)

// ---- matmul_experts: the routed experts slot by slot (ds4.c 6.9) ----------

// y[i][r] = sum_c W_e[r][c] x[i / x_div][c],   e = sel[i]        i < n_slots
// W_e = w + e * expert_bytes (the stacked experts [E][out][in])
//
// threads: as matmul, one simdgroup per row; grid.y = the slot. The expert
// id is read on the GPU, so a decode token's routed experts need no host
// step: gate and up take x = the chunk's rows (x_div = K: slot t K + k is
// token t's k-th expert), down takes the slots' own hidden rows (x_div = 1).
struct matmul_experts_args {
    uint in, out, row_bytes, x_div;
    ulong expert_bytes;
};

template <class Decoder>
static void matmul_expert_slot(device const uchar *w, device const int *sel,
                               device const float *x, device float *y,
                               constant matmul_experts_args &e, uint slot, uint row,
                               ushort lane) {
    matmul_args a = { e.in, e.out, 1, e.row_bytes, e.in, e.out };
    matmul_rows<Decoder>(w + (ulong)sel[slot] * e.expert_bytes,
                         x + (ulong)(slot / e.x_div) * e.in, y + (ulong)slot * e.out, a, row,
                         lane, nullptr, nullptr);
}

#define MATMUL_EXPERTS_KERNEL(name, decoder)                                           \
    kernel void name(device const uchar *w [[buffer(0)]],                             \
                     device const int *sel [[buffer(1)]],                             \
                     device const float *x [[buffer(2)]],                             \
                     device float *y [[buffer(3)]],                                   \
                     constant matmul_experts_args &a [[buffer(4)]],                   \
                     uint3 tg [[threadgroup_position_in_grid]],                       \
                     ushort lane [[thread_index_in_simdgroup]],                       \
                     ushort simd [[simdgroup_index_in_threadgroup]]) {                \
        matmul_expert_slot<decoder>(w, sel, x, y, a, tg.y, tg.x * MATMUL_SIMDS + simd,    \
                                    lane);                                            \
    }

MATMUL_EXPERTS_KERNEL(matmul_experts_f32, decoder_f32)
MATMUL_EXPERTS_KERNEL(matmul_experts_bf16, decoder_bf16)
MATMUL_EXPERTS_KERNEL(matmul_experts_f16, decoder_f16)
MATMUL_EXPERTS_KERNEL(matmul_experts_q8_0, decoder_q8_0)
MATMUL_EXPERTS_KERNEL(matmul_experts_q2_k, decoder_q2_k)
MATMUL_EXPERTS_KERNEL(matmul_experts_q4_k, decoder_q4_k)
MATMUL_EXPERTS_KERNEL(matmul_experts_iq2_xxs, decoder_iq2_xxs)

// ---- rmsnorm (ds4.c chapter 5) --------------------------------------------

// y[i] = x[i] * w[i] / sqrt(mean_j x[j]^2 + eps)        x, y [n_rows][n]
//
// threads: RMSNORM_THREADS per threadgroup, one threadgroup per row. Each
// thread sums the squares of a strided slice; simd_sum, then simdgroup 0
// adds the per-simdgroup partials left in threadgroup memory (shared[32]).
// The CPU sums in double; float here differs by ~1e-7 relative.
#define RMSNORM_THREADS 256

struct rmsnorm_args {
    uint n;
    uint has_weight;
    float eps;
};

static float threadgroup_sum(float v, threadgroup float *shared, uint tid, uint n_threads) {
    float s = simd_sum(v);
    if (tid % 32 == 0) shared[tid / 32] = s;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float total = 0.0f;
    for (uint i = 0; i < n_threads / 32; i++) total += shared[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return total;
}


kernel void rmsnorm(device const float *x [[buffer(0)]],
                    device const float *w [[buffer(1)]],
                    device float *y [[buffer(2)]],
                    constant rmsnorm_args &a [[buffer(3)]],
                    threadgroup float *shared TG_ARG(0),
                    uint3 tg [[threadgroup_position_in_grid]],
                    uint tid [[thread_index_in_threadgroup]]) {
    device const float *xr = x + (ulong)tg.x * a.n;
    device float *yr = y + (ulong)tg.x * a.n;
    float ss = 0.0f;
    for (uint i = tid; i < a.n; i += RMSNORM_THREADS) ss += xr[i] * xr[i];
    ss = threadgroup_sum(ss, shared, tid, RMSNORM_THREADS);
    float scale = 1.0f / sqrt(ss / float(a.n) + a.eps);
    for (uint i = tid; i < a.n; i += RMSNORM_THREADS)
        yr[i] = xr[i] * scale * (a.has_weight ? w[i] : 1.0f);
}

// ---- rope_tail (ds4.c chapter 5) ------------------------------------------

// Pair i of the last R dims of each head turns by the angle p * w_i:
//     y0 = x0 cos - x1 sin,  y1 = x0 sin + x1 cos      (inverse: sin -> -sin)
// x [n_tok][n_heads][len], position of token t = pos0 + t; freq [R/2].
//
// threads: one per pair; grid (R/2 * n_heads, n_tok) threads in
// threadgroups of ROPE_THREADS along x.
#define ROPE_THREADS 64

struct rope_args {
    uint len, dims, n_heads;
    int inverse;
    long pos0;
};

kernel void rope_tail(device float *x [[buffer(0)]],
                      device const float *freq [[buffer(1)]],
                      constant rope_args &a [[buffer(2)]],
                      uint3 tg [[threadgroup_position_in_grid]],
                      uint tid [[thread_index_in_threadgroup]]) {
    uint item = tg.x * ROPE_THREADS + tid, half_dims = a.dims / 2;
    if (item >= half_dims * a.n_heads) return;
    uint h = item / half_dims, i = item % half_dims, t = tg.y;
    device float *tail = x + ((ulong)t * a.n_heads + h) * a.len + a.len - a.dims;
    float angle = float(a.pos0 + (long)t) * freq[i];
    float c = precise::cos(angle), s = precise::sin(angle);
    if (a.inverse) s = -s;
    float x0 = tail[2 * i], x1 = tail[2 * i + 1];
    tail[2 * i] = x0 * c - x1 * s;
    tail[2 * i + 1] = x0 * s + x1 * c;
}

// ---- FP8 / FP4 round trips (ds4.c chapter 5) ------------------------------

// 2^ceil(log2 y), exact (pow2_ceil).
static float pow2_ceil(float y) {
    int e;
    float m = frexp(y, e);
    return ldexp(1.0f, m == 0.5f ? e - 1 : e);
}

// Nearest e4m3 value, ties to even (round_e4m3).
static float round_e4m3(float x) {
    float ax = fabs(x);
    if (ax == 0.0f) return x;
    float step;
    if (ax < 0.015625f) {             // 2^-6, written in decimal: MSL is C++14,
        step = 0.001953125f;          // which has no hex floats; 2^-9
    } else {
        int e;
        frexp(ax, e);
        step = ldexp(1.0f, e - 4);
    }
    float r = min(rint(ax / step) * step, 448.0f);
    return copysign(r, x);
}

// Nearest e2m1 value, ties to the even code (round_e2m1).
static float round_e2m1(float x) {
    const float grid[8] = { 0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f };
    float ax = fabs(x);
    int best = 0;
    for (int code = 1; code < 8; code++) {
        float d_new = fabs(ax - grid[code]), d_best = fabs(ax - grid[best]);
        if (d_new < d_best || (d_new == d_best && code % 2 == 0)) best = code;
    }
    return copysign(grid[best], x);
}

// fp8_round_trip_nope: the first len - R dims of each row, in blocks of 64:
//     sc = 2^ceil(log2(max(max|v|, 1e-4) / 448));  v = e4m3(clamp(v/sc)) * sc
// threads: one simdgroup (32) per 64-block, 2 values per lane; grid
// (blocks per row, n_rows).
struct fp8_args {
    uint len, rope_dims;
};

kernel void fp8_round_trip_nope(device float *rows [[buffer(0)]],
                                constant fp8_args &a [[buffer(1)]],
                                uint3 tg [[threadgroup_position_in_grid]],
                                ushort lane [[thread_index_in_simdgroup]]) {
    device float *v = rows + (ulong)tg.y * a.len + 64 * tg.x;
    if (64 * tg.x + 64 > a.len - a.rope_dims) return;
    float v0 = v[lane], v1 = v[lane + 32];
    float amax = simd_max(max(max(fabs(v0), fabs(v1)), 1e-4f));
    float sc = pow2_ceil(amax * (1.0f / 448.0f));
    v[lane] = round_e4m3(clamp(v0 / sc, -448.0f, 448.0f)) * sc;
    v[lane + 32] = round_e4m3(clamp(v1 / sc, -448.0f, 448.0f)) * sc;
}

// indexer_round_trip: Hadamard over n (a power of two), then FP4 in 32-blocks:
//     for st = 1, 2, 4, ...: (a, c) -> (a + c, a - c);  v *= 1/sqrt(n)
//     sc = 2^ceil(log2(max(max|v|, 6 * 2^-126) / 6));  v = e2m1(clamp(v/sc)) * sc
// threads: n per threadgroup (one value each, n <= 1024), one threadgroup per
// row; the butterflies run in threadgroup memory shared[n]; each simdgroup
// then owns one FP4 block of 32.
struct indexer_rt_args {
    uint n;
};

kernel void indexer_round_trip(device float *rows [[buffer(0)]],
                               constant indexer_rt_args &a [[buffer(1)]],
                               threadgroup float *shared TG_ARG(0),
                               uint3 tg [[threadgroup_position_in_grid]],
                               uint tid [[thread_index_in_threadgroup]]) {
    device float *v = rows + (ulong)tg.x * a.n;
    shared[tid] = v[tid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint st = 1; st < a.n; st *= 2) {
        float mine = shared[tid], other = shared[tid ^ st];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        shared[tid] = (tid & st) ? other - mine : mine + other;
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    float h = shared[tid] * (1.0f / sqrt(float(a.n)));
    float amax = simd_max(max(fabs(h), 6.0f * FLT_MIN));      // FLT_MIN = 2^-126
    float sc = pow2_ceil(amax * (1.0f / 6.0f));
    v[tid] = round_e2m1(clamp(h / sc, -6.0f, 6.0f)) * sc;
}

// ---- Hyper-connections (ds4.c 6.3) ----------------------------------------

// sinkhorn: row softmax + eps, then `iters` column and iters-1 row
// normalisations, ending on a column step. c is n x n, C[j][k] = c[j n + k].
static void sinkhorn(threadgroup float *c, int n, int iters, float eps) {
    for (int j = 0; j < n; j++) {
        float mx = -INFINITY, sum = 0.0f;
        for (int k = 0; k < n; k++) mx = max(mx, c[j * n + k]);
        for (int k = 0; k < n; k++) sum += (c[j * n + k] = exp(c[j * n + k] - mx));
        for (int k = 0; k < n; k++) c[j * n + k] = c[j * n + k] / sum + eps;
    }
    for (int it = 0; it < iters; it++) {
        if (it > 0) {
            for (int j = 0; j < n; j++) {
                float sum = 0.0f;
                for (int k = 0; k < n; k++) sum += c[j * n + k];
                for (int k = 0; k < n; k++) c[j * n + k] /= sum + eps;
            }
        }
        for (int k = 0; k < n; k++) {
            float sum = 0.0f;
            for (int j = 0; j < n; j++) sum += c[j * n + k];
            for (int j = 0; j < n; j++) c[j * n + k] /= sum + eps;
        }
    }
}

struct hc_args {
    uint hc, dim, sinkhorn_iters;
    float norm_eps, hc_eps;
};

// hc_pre, for token t (X [T][n][D], raw_mix [T][(2+n) n]):
//     rr = 1 / sqrt(mean(x^2) + eps)
//     pre[h]  = sigmoid(m[h] rr s0 + base[h]) + eps_hc
//     post[h] = 2 sigmoid(m[n+h] rr s1 + base[n+h])
//     C = sinkhorn(m[2n..] rr s2 + base[2n..]);   y[d] = sum_h pre[h] X[h][d]
// mix out [T][2n + n n] = pre, post, C (the CPU's struct hc_mix, packed).
// threads: HC_THREADS per threadgroup, one threadgroup per token;
// shared[32 + 2n + n n]: reduction partials, then the mix.
#define HC_THREADS 256

static float sigmoid(float z) { return 1.0f / (1.0f + exp(-z)); }

static float hc_inverse_rms(device const float *x, uint n, float eps,
                            threadgroup float *shared, uint tid) {
    float ss = 0.0f;
    for (uint i = tid; i < n; i += HC_THREADS) ss += x[i] * x[i];
    ss = threadgroup_sum(ss, shared, tid, HC_THREADS);
    return 1.0f / sqrt(ss / float(n) + eps);
}

kernel void hc_pre(device const float *X [[buffer(0)]],
                   device const float *raw_mix [[buffer(1)]],
                   device const float *scale [[buffer(2)]],
                   device const float *base [[buffer(3)]],
                   device float *mix_out [[buffer(4)]],
                   device float *y [[buffer(5)]],
                   constant hc_args &a [[buffer(6)]],
                   threadgroup float *shared TG_ARG(0),
                   uint3 tg [[threadgroup_position_in_grid]],
                   uint tid [[thread_index_in_threadgroup]]) {
    uint n = a.hc, D = a.dim, M = (2 + n) * n;
    device const float *Xt = X + (ulong)tg.x * n * D;
    device const float *m = raw_mix + (ulong)tg.x * M;
    float rr = hc_inverse_rms(Xt, n * D, a.norm_eps, shared, tid);
    threadgroup float *mix = shared + 32;
    for (uint h = tid; h < n; h += HC_THREADS) {
        mix[h] = sigmoid(m[h] * rr * scale[0] + base[h]) + a.hc_eps;
        mix[n + h] = 2.0f * sigmoid(m[n + h] * rr * scale[1] + base[n + h]);
    }
    for (uint i = tid; i < n * n; i += HC_THREADS)
        mix[2 * n + i] = m[2 * n + i] * rr * scale[2] + base[2 * n + i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) sinkhorn(mix + 2 * n, (int)n, (int)a.sinkhorn_iters, a.hc_eps);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint i = tid; i < M; i += HC_THREADS) mix_out[(ulong)tg.x * M + i] = mix[i];
    for (uint d = tid; d < D; d += HC_THREADS) {
        float acc = 0.0f;
        for (uint h = 0; h < n; h++) acc += mix[h] * Xt[(ulong)h * D + d];
        y[(ulong)tg.x * D + d] = acc;
    }
}

// hc_post, in place on X (f [T][D], mix as hc_pre wrote it):
//     Xout[k][d] = post[k] f[d] + sum_j C[j][k] Xin[j][d]
// threads: one per (t, d): it reads its column of all n streams before it
// writes any, so in place is safe. Grid (ceil(D / HC_THREADS), T).
kernel void hc_post(device float *X [[buffer(0)]],
                    device const float *f [[buffer(1)]],
                    device const float *mix [[buffer(2)]],
                    constant hc_args &a [[buffer(3)]],
                    uint3 tg [[threadgroup_position_in_grid]],
                    uint tid [[thread_index_in_threadgroup]]) {
    uint n = a.hc, D = a.dim, d = tg.x * HC_THREADS + tid, t = tg.y;
    if (d >= D) return;
    device float *Xt = X + (ulong)t * n * D;
    device const float *mx = mix + (ulong)t * (2 + n) * n;
    float col[16];
    for (uint j = 0; j < n; j++) col[j] = Xt[(ulong)j * D + d];
    for (uint k = 0; k < n; k++) {
        float acc = mx[n + k] * f[(ulong)t * D + d];
        for (uint j = 0; j < n; j++) acc += mx[2 * n + j * n + k] * col[j];
        Xt[(ulong)k * D + d] = acc;
    }
}

// hc_head_collapse (raw_mix [T][n]):
//     w[h] = sigmoid(rr m[h] s0 + base[h]) + eps_hc;   y = sum_h w[h] X[h]
// threads: HC_THREADS, one threadgroup per token; shared[32 + n].
kernel void hc_head_collapse(device const float *X [[buffer(0)]],
                             device const float *raw_mix [[buffer(1)]],
                             device const float *scale [[buffer(2)]],
                             device const float *base [[buffer(3)]],
                             device float *y [[buffer(4)]],
                             constant hc_args &a [[buffer(5)]],
                             threadgroup float *shared TG_ARG(0),
                             uint3 tg [[threadgroup_position_in_grid]],
                             uint tid [[thread_index_in_threadgroup]]) {
    uint n = a.hc, D = a.dim;
    device const float *Xt = X + (ulong)tg.x * n * D;
    float rr = hc_inverse_rms(Xt, n * D, a.norm_eps, shared, tid);
    threadgroup float *w = shared + 32;
    for (uint h = tid; h < n; h += HC_THREADS)
        w[h] = sigmoid(raw_mix[(ulong)tg.x * n + h] * rr * scale[0] + base[h]) + a.hc_eps;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint d = tid; d < D; d += HC_THREADS) {
        float acc = 0.0f;
        for (uint h = 0; h < n; h++) acc += w[h] * Xt[(ulong)h * D + d];
        y[(ulong)tg.x * D + d] = acc;
    }
}

// ---- embed_tokens (ds4.c 6.12) --------------------------------------------

// out[t][i] = float(E[tokens[t]][i])         E [vocab][D] half
// threads: EMBED_THREADS per threadgroup, grid (ceil(D / EMBED_THREADS), T).
#define EMBED_THREADS 256

struct embed_args {
    uint dim;
};

kernel void embed_tokens(device const half *E [[buffer(0)]],
                         device const int *tokens [[buffer(1)]],
                         device float *out [[buffer(2)]],
                         constant embed_args &a [[buffer(3)]],
                         uint3 tg [[threadgroup_position_in_grid]],
                         uint tid [[thread_index_in_threadgroup]]) {
    uint i = tg.x * EMBED_THREADS + tid;
    if (i >= a.dim) return;
    out[(ulong)tg.y * a.dim + i] = float(E[(ulong)tokens[tg.y] * a.dim + i]);
}

// ---- Mixture of experts (ds4.c 6.9) ---------------------------------------

static float softplus(float z) {
    if (z > 20.0f) return z;
    if (z < -20.0f) return exp(z);
    return log1p(exp(z));
}

// topk_indices: the k highest scores, ties to the LOWER index, in that order.
static int topk_indices(device const float *score, int n, int k, thread int *out) {
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

// route_token, for token t (logits [T][E]):
//     s_e = sqrt(softplus(logit_e))
//     chosen = hash layer: tid2eid[token] ; else top-K of s_e + bias_e
//     w_k = route_scale * s_{chosen_k} / sum_k s_{chosen_k}
// The biased scores go to `biased` [T][E] (device scratch), which top-k reads.
// threads: one per token (K <= 16, E <= 1024: a serial scan is cheaper than
// a parallel sort at these sizes); threadgroups of ROUTE_THREADS.
#define ROUTE_THREADS 32

struct route_args {
    uint n_tok, n_experts, n_used;
    uint hash_routed, has_bias;
    float route_scale;
};

kernel void route_token(device const float *logits [[buffer(0)]],
                        device const int *tokens [[buffer(1)]],
                        device const int *tid2eid [[buffer(2)]],
                        device const float *bias [[buffer(3)]],
                        device float *biased [[buffer(4)]],
                        device int *sel [[buffer(5)]],
                        device float *wt [[buffer(6)]],
                        constant route_args &a [[buffer(7)]],
                        uint3 tg [[threadgroup_position_in_grid]],
                        uint tid [[thread_index_in_threadgroup]]) {
    uint t = tg.x * ROUTE_THREADS + tid, E = a.n_experts, K = a.n_used;
    if (t >= a.n_tok) return;
    device const float *lg = logits + (ulong)t * E;
    device float *sc = biased + (ulong)t * E;
    int chosen[16];
    if (a.hash_routed) {
        for (uint k = 0; k < K; k++) chosen[k] = tid2eid[(ulong)tokens[t] * K + k];
    } else {
        for (uint e = 0; e < E; e++)
            sc[e] = sqrt(softplus(lg[e])) + (a.has_bias ? bias[e] : 0.0f);
        topk_indices(sc, (int)E, (int)K, chosen);
    }
    float sum = 0.0f;
    for (uint k = 0; k < K; k++) sum += sqrt(softplus(lg[chosen[k]]));
    for (uint k = 0; k < K; k++) {
        sel[(ulong)t * K + k] = chosen[k];
        wt[(ulong)t * K + k] = sqrt(softplus(lg[chosen[k]])) / sum * a.route_scale;
    }
}

// run_expert's activation, element-wise over [n][F]:
//     g = min(g, lim);  u = clamp(u, -lim, lim)     (lim = 0: no clamp)
//     h = silu(g) * u * weight[i]                   (weight NULL: 1)
// threads: SWIGLU_THREADS per threadgroup, grid (ceil(F / SWIGLU_THREADS), n).
#define SWIGLU_THREADS 256

struct swiglu_args {
    uint ffn;
    uint has_weight;
    float limit;
};

kernel void swiglu(device float *g [[buffer(0)]],
                   device const float *u [[buffer(1)]],
                   device const float *weight [[buffer(2)]],
                   constant swiglu_args &a [[buffer(3)]],
                   uint3 tg [[threadgroup_position_in_grid]],
                   uint tid [[thread_index_in_threadgroup]]) {
    uint f = tg.x * SWIGLU_THREADS + tid, i = tg.y;
    if (f >= a.ffn) return;
    ulong at = (ulong)i * a.ffn + f;
    float gv = g[at], uv = u[at];
    if (a.limit > 0.0f) {
        gv = min(gv, a.limit);
        uv = clamp(uv, -a.limit, a.limit);
    }
    g[at] = gv / (1.0f + exp(-gv)) * uv * (a.has_weight ? weight[i] : 1.0f);
}

// moe_chunk's gather-add: G[t][x] += sum over the slots of token t of Y[slot][x]
// (Y [slots][D], slot_of [T][K] = row of Y for (t, k), -1 = none).
// threads: ADD_THREADS, grid (ceil(D / ADD_THREADS), T); one thread owns one
// (t, x), so no atomics are needed and the order of the K terms is fixed.
#define ADD_THREADS 256

struct moe_add_args {
    uint dim, n_used;
};

kernel void moe_gather_add(device float *G [[buffer(0)]],
                           device const float *Y [[buffer(1)]],
                           device const int *slot_of [[buffer(2)]],
                           constant moe_add_args &a [[buffer(3)]],
                           uint3 tg [[threadgroup_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]]) {
    uint x = tg.x * ADD_THREADS + tid, t = tg.y;
    if (x >= a.dim) return;
    float acc = G[(ulong)t * a.dim + x];
    for (uint k = 0; k < a.n_used; k++) {
        int s = slot_of[(ulong)t * a.n_used + k];
        if (s >= 0) acc += Y[(ulong)s * a.dim + x];
    }
    G[(ulong)t * a.dim + x] = acc;
}

// y[i] += x[i] (the MTP input's h_proj + e; residual adds).
struct add_args {
    uint n, x_period;   // x is broadcast: x[i % x_period]
};

kernel void add_rows(device float *y [[buffer(0)]],
                     device const float *x [[buffer(1)]],
                     constant add_args &a [[buffer(2)]],
                     uint3 tg [[threadgroup_position_in_grid]],
                     uint tid [[thread_index_in_threadgroup]]) {
    uint i = tg.x * ADD_THREADS + tid;
    if (i < a.n) y[i] += x[i % a.x_period];
}

// ---- Compressor pooling (ds4.c 6.4, pool_channel) -------------------------

// pooled[j] = sum_i softmax_i(z_i[j]) kv_i[j] over the n = coff r candidates;
// -inf scores (empty slots) contribute nothing; all empty -> 0. With overlap
// (coff 2) candidates i >= r read column dc + j.
// threads: POOL_THREADS, one per channel j; grid ceil(dc / POOL_THREADS).
#define POOL_THREADS 64

struct pool_args {
    uint ratio, coff, dc;
};

kernel void pool_channel(device const float *kv [[buffer(0)]],
                         device const float *score [[buffer(1)]],
                         device float *pooled [[buffer(2)]],
                         constant pool_args &a [[buffer(3)]],
                         uint3 tg [[threadgroup_position_in_grid]],
                         uint tid [[thread_index_in_threadgroup]]) {
    uint j = tg.x * POOL_THREADS + tid;
    if (j >= a.dc) return;
    uint r = a.ratio, width = a.coff * a.dc, n = a.coff * r;
    float mx = -INFINITY;
    for (uint i = 0; i < n; i++) {
        uint col = (a.coff == 2 && i >= r) ? a.dc + j : j;
        mx = max(mx, score[i * width + col]);
    }
    if (mx == -INFINITY) {
        pooled[j] = 0.0f;
        return;
    }
    float num = 0.0f, den = 0.0f;
    for (uint i = 0; i < n; i++) {
        uint col = (a.coff == 2 && i >= r) ? a.dc + j : j;
        float z = score[i * width + col];
        if (z == -INFINITY) continue;
        float p = exp(z - mx);
        den += p;
        num += p * kv[i * width + col];
    }
    pooled[j] = num / den;
}

// ---- Sparse attention with sinks (ds4.c 6.8, attend_one) ------------------

// For token t at position p = p0 + t, head h, over its rows k_i: the raw
// window rows first..p (first = max(0, p - W + 1)), then its compressed rows
// (all `visible[t]` of them when n_sel[t] < 0, else the indexer's sel[t][..]):
//     l_i = (q . k_i) / sqrt(Dh);   mx = max(sink, max_i l_i)
//     o = sum_i e^(l_i - mx) k_i / (e^(sink - mx) + sum_i e^(l_i - mx))
// (K = V.) A raw row at pos >= p0 is in this chunk's kv, older ones in the
// ring at slot pos mod W, exactly as raw_row() reads them. The inverse RoPE
// on o follows as a separate rope_tail dispatch.
// threads: one simdgroup (32) per (t, h); grid (H, T). Phase 1: lane l scores
// rows l, l + 32, ... into threadgroup memory logit[] (window + top-k
// floats); phase 2: lane l owns dims l, l + 32, ... of o and walks all rows.
#define ATTEND_THREADS 32

struct attend_args {
    uint n_heads, head_dim, window, topk;
    long p0;
    uint compressed;      // the layer has compressed rows (ratio > 0)
};

static device const float *attend_row(device const float *chunk_kv, device const float *ring,
                                      device const float *comp, device const int *sel,
                                      int n_sel, constant attend_args &a, long first,
                                      uint n_raw, uint i) {
    if (i < n_raw) {
        long pos = first + (long)i;
        if (pos >= a.p0) return chunk_kv + (ulong)(pos - a.p0) * a.head_dim;
        return ring + (ulong)(pos % (long)a.window) * a.head_dim;
    }
    uint r = n_sel < 0 ? i - n_raw : (uint)sel[i - n_raw];
    return comp + (ulong)r * a.head_dim;
}

kernel void attend_one(device const float *q [[buffer(0)]],
                       device const float *chunk_kv [[buffer(1)]],
                       device const float *ring [[buffer(2)]],
                       device const float *comp [[buffer(3)]],
                       device const long *visible [[buffer(4)]],
                       device const int *sel [[buffer(5)]],
                       device const int *n_sel [[buffer(6)]],
                       device const float *sinks [[buffer(7)]],
                       device float *o [[buffer(8)]],
                       constant attend_args &a [[buffer(9)]],
                       threadgroup float *logit TG_ARG(0),
                       uint3 tg [[threadgroup_position_in_grid]],
                       ushort lane [[thread_index_in_simdgroup]]) {
    uint h = tg.x, t = tg.y, Dh = a.head_dim;
    long p = a.p0 + (long)t, first = p - (long)a.window + 1 < 0 ? 0 : p - (long)a.window + 1;
    uint n_raw = (uint)(p - first + 1);
    int ns = n_sel[t];
    uint n_comp = !a.compressed ? 0 : ns < 0 ? (uint)visible[t] : (uint)ns;
    device const int *sel_t = sel + (ulong)t * a.topk;
    device const float *qh = q + ((ulong)t * a.n_heads + h) * Dh;
    float scale = 1.0f / sqrt(float(Dh)), sink = sinks[h], mx = sink;
    for (uint i = lane; i < n_raw + n_comp; i += 32) {
        device const float *k = attend_row(chunk_kv, ring, comp, sel_t, ns, a, first, n_raw, i);
        float s = 0.0f;
        for (uint d = 0; d < Dh; d++) s += qh[d] * k[d];
        logit[i] = s * scale;
        mx = max(mx, logit[i]);
    }
    mx = simd_max(mx);
    float den = 0.0f;
    for (uint i = lane; i < n_raw + n_comp; i += 32) den += (logit[i] = exp(logit[i] - mx));
    den = simd_sum(den) + exp(sink - mx);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    device float *oh = o + ((ulong)t * a.n_heads + h) * Dh;
    for (uint d = lane; d < Dh; d += 32) {
        float acc = 0.0f;
        for (uint i = 0; i < n_raw + n_comp; i++)
            acc += logit[i] * attend_row(chunk_kv, ring, comp, sel_t, ns, a, first, n_raw, i)[d];
        oh[d] = acc / den;
    }
}

// ---- The indexer's selection (ds4.c 6.7, select_rows_for_token) ----------

// For token t over its nv visible indexer rows KI[c] (HI heads of DI):
//     wI[h] = iw[t][h] * scale
//     score[t][c] = sum_h wI[h] * max(0, qI[t][h] . KI[c])
// threads: INDEXER_THREADS per threadgroup, one thread per row c; grid
// (ceil(nv / INDEXER_THREADS), T). The heads are summed in order h = 0..HI-1,
// as on the CPU.
#define INDEXER_THREADS 64

struct indexer_args {
    uint heads, dim, n_rows, max_rows;
    float scale;
};

kernel void indexer_scores(device const float *iq [[buffer(0)]],
                           device const float *iw [[buffer(1)]],
                           device const float *krows [[buffer(2)]],
                           device float *score [[buffer(3)]],
                           constant indexer_args &a [[buffer(4)]],
                           uint3 tg [[threadgroup_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]]) {
    uint r = tg.x * INDEXER_THREADS + tid, t = tg.y, DI = a.dim;
    if (r >= a.n_rows) return;
    device const float *k = krows + (ulong)r * DI;
    float s = 0.0f;
    for (uint h = 0; h < a.heads; h++) {
        device const float *q = iq + ((ulong)t * a.heads + h) * DI;
        float d = 0.0f;
        for (uint i = 0; i < DI; i++) d += q[i] * k[i];
        if (d > 0.0f) s += iw[(ulong)t * a.heads + h] * a.scale * d;
    }
    score[(ulong)t * a.max_rows + r] = s;
}

// topk_indices over each token's scores [T][max_rows] (first n_rows valid):
// the k highest, ties to the lower index, written in that order to
// sel [T][k]; n_sel[t] = min(k, n_rows).
//
// threads: one threadgroup per token, TOPK_THREADS(k) = the power of two
// >= k (32 .. TOPK_MAX) threads. A radix select, then a sort of the k chosen:
//   1. key(s) = the float's bits made monotonic as an unsigned (flip all
//      bits of negatives, the sign bit of the rest): s > s' <=> key > key'.
//   2. thr = the k-th largest key, found bit by bit from the top: keep a
//      bit when at least k keys are >= the prefix with it set (32 counting
//      passes over the row, each a threadgroup sum).
//   3. Chosen: every key > thr, and the first (k - count(> thr)) keys == thr
//      by index (the CPU's tie rule). Each thread owns a contiguous range of
//      indices, so a scan of the per-thread counts keeps index order.
//   4. A bitonic sort of the chosen (key descending, index ascending) in
//      threadgroup memory gives the CPU's output order.
// Threadgroup memory (TG_ARG 0): keys [P], ids [P], scan [threads],
// partial [32], as uints (P = the power of two >= k, at least 32).
#define TOPK_MAX 1024

struct topk_args {
    uint n_tok, n_rows, max_rows, k;
};

static uint monotonic_key(float f) {
    uint u = as_type<uint>(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The sum of v over the threadgroup (n_threads a multiple of 32).
static uint group_count(uint v, threadgroup uint *partial, uint tid, uint n_threads) {
    v = simd_sum(v);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid % 32 == 0) partial[tid / 32] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    uint total = 0;
    for (uint w = 0; w < n_threads / 32; w++) total += partial[w];
    return total;
}

// An exclusive scan of one value per thread.
static uint group_scan(uint v, threadgroup uint *buf, uint tid) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    buf[tid] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    uint before = 0;
    for (uint i = 0; i < tid; i++) before += buf[i];
    return before;
}

// Sort (key, index) pairs [P]: key descending, index ascending on equal keys.
static void bitonic_sort_desc(threadgroup uint *key, threadgroup uint *idx, uint P, uint tid,
                              uint n_threads) {
    for (uint size = 2; size <= P; size *= 2)
        for (uint stride = size / 2; stride > 0; stride /= 2) {
            threadgroup_barrier(mem_flags::mem_threadgroup);
            for (uint i = tid; i < P; i += n_threads) {
                uint j = i ^ stride;
                if (j <= i) continue;
                bool first = key[i] > key[j] || (key[i] == key[j] && idx[i] < idx[j]);
                bool descending = (i & size) == 0;
                if (first != descending) {
                    uint tk = key[i]; key[i] = key[j]; key[j] = tk;
                    uint ti = idx[i]; idx[i] = idx[j]; idx[j] = ti;
                }
            }
        }
    threadgroup_barrier(mem_flags::mem_threadgroup);
}

kernel void topk_rows(device const float *score [[buffer(0)]],
                      device int *sel [[buffer(1)]],
                      device int *n_sel [[buffer(2)]],
                      constant topk_args &a [[buffer(3)]],
                      threadgroup uint *shared TG_ARG(0),
                      uint3 tg [[threadgroup_position_in_grid]],
                      uint tid [[thread_index_in_threadgroup]],
                      uint n_threads [[threads_per_threadgroup]]) {
    uint t = tg.x, n = a.n_rows, k = min(a.k, a.n_rows);
    uint P = 32;
    while (P < k) P *= 2;
    threadgroup uint *keys = shared, *ids = shared + P, *scan = shared + 2 * P;
    threadgroup uint *partial = scan + n_threads;
    device const float *s = score + (ulong)t * a.max_rows;
    uint thr = 0;
    for (int bit = 31; bit >= 0; bit--) {
        uint cand = thr | 1u << bit, mine = 0;
        for (uint i = tid; i < n; i += n_threads) mine += monotonic_key(s[i]) >= cand ? 1 : 0;
        if (group_count(mine, partial, tid, n_threads) >= k) thr = cand;
    }
    uint per = (n + n_threads - 1) / n_threads, lo = tid * per;
    uint hi = min(lo + per, n), gt = 0, eq = 0;
    for (uint i = lo; i < hi; i++) {
        uint key = monotonic_key(s[i]);
        gt += key > thr ? 1 : 0;
        eq += key == thr ? 1 : 0;
    }
    uint n_gt = group_count(gt, partial, tid, n_threads);
    uint at_gt = group_scan(gt, scan, tid), at_eq = group_scan(eq, scan, tid);
    for (uint i = tid; i < P; i += n_threads) keys[i] = 0, ids[i] = 0x7fffffffu;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint i = lo; i < hi; i++) {
        uint key = monotonic_key(s[i]);
        if (key > thr) keys[at_gt] = key, ids[at_gt++] = i;
        else if (key == thr && n_gt + at_eq < k) keys[n_gt + at_eq] = key, ids[n_gt + at_eq++] = i;
    }
    bitonic_sort_desc(keys, ids, P, tid, n_threads);
    for (uint i = tid; i < k; i += n_threads) sel[(ulong)t * a.k + i] = (int)ids[i];
    if (tid == 0) n_sel[t] = (int)k;
}
