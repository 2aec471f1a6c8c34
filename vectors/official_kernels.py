# Pure-torch ports of the kernels that DeepSeek V4's official inference/model.py imports from
# its inference/kernel.py (tilelang) and from the fast_hadamard_transform package. Written for
# ds4 so that the official model code runs in float32 on any torch device (see gen_vectors.py):
#   act_quant      FP8 e4m3 round trip, per-block absmax scale (power of two with ue8m0)
#   fp4_act_quant  FP4 e2m1 round trip, block 32, power-of-two scales
#   sparse_attn    attention over gathered top-k KV rows with a per-head sink logit
#   hc_split_sinkhorn  hyper-connection pre/post/comb weights with Sinkhorn normalisation
#   hadamard_transform unnormalised Walsh-Hadamard transform times `scale`
#   fp8_gemm, fp4_gemm  products with FP8 e4m3 (128x128 block scales) and FP4 e2m1 (per-32
#                      scales) weights; the tiny checkpoint has none, tools/fullwidth_oracle.py
#                      uses them on its release-format checkpoints
# MODE picks what the FP8/FP4 products see as their input (set by the caller):
#   "fp8"  DeepSeek's deployment numerics: `linear` quantizes x with act_quant (FP8 e4m3, one
#          ue8m0 scale per 128 values) before every FP8/FP4 product;
#   "f32"  ds4's semantics: act_quant called for a product (not in place) hands x through in
#          float32 and the weight is dequantized exactly to float32. The in-place round trips
#          (the FP8 KV rows, the indexer's FP4) are model numerics and stay in both modes.
import torch
import torch.nn.functional as F

MODE = "fp8"

FP8_MAX = 448.0
FP4_MAX = 6.0

def _pow2_ceil(x):
    return torch.exp2(torch.ceil(torch.log2(x)))

def _round_e4m3(v):
    # torch < 2.1 has no float8_e4m3fn: the same rounding by hand. e4m3fn has 3 mantissa bits,
    # so the step of a value of exponent e (>= -6; below that the subnormal step 2^-9) is
    # 2^(e-3); torch.round rounds half to even, as the cast does. |v| <= 448 is given.
    _, e = torch.frexp(v.abs())                       # |v| = m * 2^e, m in [0.5, 1)
    step = torch.ldexp(torch.ones_like(v), torch.clamp(e - 1, min=-6) - 3)
    return torch.round(v / step) * step

def _to_e4m3(v):
    if isinstance(getattr(torch, "float8_e4m3fn", None), torch.dtype):
        return v.to(torch.float8_e4m3fn)
    return _round_e4m3(v)

def act_quant(x, block_size=128, scale_fmt=None, scale_dtype=torch.float32, inplace=False):
    if MODE == "f32" and not inplace:
        return x.float(), None
    shp = x.shape
    xf = x.float().reshape(*shp[:-1], shp[-1] // block_size, block_size)
    amax = xf.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    s = amax / FP8_MAX
    if scale_fmt is not None:
        s = _pow2_ceil(s)
    q = _to_e4m3((xf / s).clamp(-FP8_MAX, FP8_MAX))
    if inplace:
        x.copy_((q.float() * s).reshape(shp).to(x.dtype))
        return x
    return q.reshape(shp), s.squeeze(-1)

_E2M1 = torch.tensor([0., 0.5, 1., 1.5, 2., 3., 4., 6.])

def _round_e2m1(v):
    a = v.abs()
    grid = _E2M1.to(v.device)
    # round to nearest, ties to even (mantissa-even) on the e2m1 grid
    idx = torch.bucketize(a, grid)
    idx = idx.clamp(1, len(grid) - 1)
    lo = grid[idx - 1]; hi = grid[idx]
    dlo = a - lo; dhi = hi - a
    pick_hi = (dhi < dlo) | ((dhi == dlo) & ((idx % 2) == 0))
    r = torch.where(pick_hi, hi, lo)
    r = torch.where(a >= 6.0, torch.full_like(a, 6.0), r)
    return torch.sign(v) * r

def fp4_act_quant(x, block_size=32, inplace=False):
    shp = x.shape
    xf = x.float().reshape(*shp[:-1], shp[-1] // block_size, block_size)
    amax = xf.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    s = _pow2_ceil(amax / FP4_MAX)
    q = _round_e2m1((xf / s).clamp(-FP4_MAX, FP4_MAX))
    if inplace:
        x.copy_((q * s).reshape(shp).to(x.dtype))
        return x
    return q.reshape(shp), s.squeeze(-1)

def _input(a, a_s):
    # x [..., K] (FP8 codes with a_s [..., K/128], or float32 with a_s None) -> float32
    if a_s is None:
        return a.float()
    k = a.shape[-1]
    return (a.float().unflatten(-1, (k // 128, 128)) * a_s.float().unsqueeze(-1)).flatten(-2)

def _out_dtype():
    return torch.float32 if MODE == "f32" else torch.get_default_dtype()

def fp8_weight(b, b_s):
    # W[o][i] = e4m3(b[o][i]) * b_s[o/128][i/128]; b [N,K], b_s [ceil(N/128), ceil(K/128)]
    n, k = b.shape
    s = b_s.float().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return b.float() * s

_E2M1_SIGNED = torch.tensor([0., 0.5, 1., 1.5, 2., 3., 4., 6., -0., -0.5, -1., -1.5, -2., -3., -4., -6.])

def fp4_weight(b, b_s):
    # W[o][2j] = e2m1(low nibble of b[o][j]), W[o][2j+1] = e2m1(high nibble), times b_s[o][i/32]
    u = b.view(torch.uint8).long()
    n = u.shape[0]
    lut = _E2M1_SIGNED.to(u.device)
    w = torch.stack([lut[u & 15], lut[u >> 4]], -1).reshape(n, -1)
    return w * b_s.float().repeat_interleave(32, 1)

def fp8_gemm(a, a_s, b, b_s, scale_dtype=None):
    return F.linear(_input(a, a_s), fp8_weight(b, b_s)).to(_out_dtype())

def fp4_gemm(a, a_s, b, b_s, scale_dtype=None):
    return F.linear(_input(a, a_s), fp4_weight(b, b_s)).to(_out_dtype())

def sparse_attn(q, kv, attn_sink, topk_idxs, softmax_scale):
    # q [b,m,h,d], kv [b,n,d], attn_sink [h], topk_idxs [b,m,k] (-1 = invalid)
    b, m, h, d = q.shape
    k = topk_idxs.shape[-1]
    idx = topk_idxs.long()
    valid = idx >= 0
    g = torch.gather(kv.float().unsqueeze(1).expand(b, m, kv.shape[1], d), 2,
                     idx.clamp(min=0).unsqueeze(-1).expand(b, m, k, d))
    sc = torch.einsum('bmhd,bmkd->bmhk', q.float(), g) * softmax_scale
    sc = sc.masked_fill(~valid.unsqueeze(2), float('-inf'))
    sink = attn_sink.float().view(1, 1, h, 1).expand(b, m, h, 1)
    p = torch.softmax(torch.cat([sc, sink], -1), -1)[..., :k]
    o = torch.einsum('bmhk,bmkd->bmhd', p, g)
    return o.to(q.dtype)

def hc_split_sinkhorn(mixes, hc_scale, hc_base, hc_mult=4, sinkhorn_iters=20, eps=1e-6):
    hc = hc_mult
    pre = torch.sigmoid(mixes[..., :hc] * hc_scale[0] + hc_base[:hc]) + eps
    post = 2 * torch.sigmoid(mixes[..., hc:2 * hc] * hc_scale[1] + hc_base[hc:2 * hc])
    comb = (mixes[..., 2 * hc:] * hc_scale[2] + hc_base[2 * hc:]).unflatten(-1, (hc, hc))
    comb = comb.softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


def hadamard_transform(x, scale=1.0):
    n = x.shape[-1]
    y = x.float().reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack([a + b, a - b], dim=2)
        h *= 2
    return (y.reshape(x.shape) * scale).to(x.dtype)
