"""A trainable DeepSeek V4 in PyTorch, written from the forward-pass rules ds4 implements.

Why not train DeepSeek's own inference/model.py? It cannot be trained as it stands: its
forward runs under inference_mode with in-place KV caches (kv_cache, kv_state,
score_state) written during the call; its FP8/FP4 round trips go through torch.float8
dtypes (absent before torch 2.1; the Debian torch here is 1.13) with no gradient; and its
top-k/ParallelHead return only the last position. So this file is a second, batched,
differentiable statement of the same maths, and it is held to the oracle: `check` loads
vectors/tiny and compares its logits with vectors/vectors.json, which DeepSeek's own code
produced. The trained checkpoint is then re-checked by gen_vectors.py with the official
code on a machine that has it (tools/train_tiny.sh).

Parameters live in one flat dict under the official checkpoint names (layers.N.attn.wq_a
.weight, mtp.0.e_proj.weight, ...), so export is a plain dump.

Shapes: B batch, T positions (always from position 0), n = hc_mult streams of width D,
H heads of width Dh with a RoPE tail of R dims, E routed experts of which K are active.
"""
import json
import math
import struct

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- rounding (straight-through)


def ste(x, q):
    """Forward q, backward identity: the FP8/FP4 round trips are trained through."""
    return x + (q - x).detach()


def pow2_ceil(y):
    """2^ceil(log2 y), exact next to powers of two (frexp: y = m 2^e, m in [0.5, 1))."""
    m, e = torch.frexp(y)
    e = torch.where(m == 0.5, e - 1, e)
    return torch.ldexp(torch.ones_like(y), e)


def round_e4m3(v):
    """Nearest e4m3fn value (|v| <= 448 given), ties to even mantissa; subnormal step 2^-9."""
    a = v.abs()
    _, e = torch.frexp(a)
    step = torch.ldexp(torch.ones_like(a), torch.clamp(e - 1, min=-6) - 3)
    return torch.sign(v) * torch.round(a / step) * step


def round_e2m1(v):
    """Nearest of {0,.5,1,1.5,2,3,4,6} (|v| <= 6 given), ties to the even code."""
    a = v.abs()
    step = torch.where(a < 2, torch.full_like(a, 0.5), torch.where(a < 4, torch.ones_like(a),
                                                                     torch.full_like(a, 2.0)))
    return torch.sign(v) * torch.round(a / step) * step


def fp8_sim(x, block=64):
    """FP8 e4m3 round trip of x [..., k*block] in blocks, power-of-two scale per block.
    Always in float32 (under bf16 autocast the input may be bf16; frexp wants float)."""
    x = x.float()
    shp = x.shape
    xb = x.reshape(*shp[:-1], shp[-1] // block, block)
    sc = pow2_ceil(xb.detach().abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448.0)
    q = round_e4m3((xb / sc).clamp(-448.0, 448.0)) * sc
    return ste(xb, q).reshape(shp)


def fp4_sim(x, block=32):
    x = x.float()
    shp = x.shape
    xb = x.reshape(*shp[:-1], shp[-1] // block, block)
    sc = pow2_ceil(xb.detach().abs().amax(-1, keepdim=True).clamp(min=1e-4) / 6.0)
    q = round_e2m1((xb / sc).clamp(-6.0, 6.0)) * sc
    return ste(xb, q).reshape(shp)


def hadamard_matrix(n):
    """Sylvester order: H[i][j] = (-1)^popcount(i & j), times n^-1/2 (orthonormal)."""
    i = torch.arange(n)
    bits = (i[:, None] & i[None, :])
    par = torch.zeros(n, n, dtype=torch.long)
    while bits.any():
        par ^= bits & 1
        bits = bits >> 1
    return (1.0 - 2.0 * par.float()) / math.sqrt(n)


# ---------------------------------------------------------------- primitives


def rmsnorm(x, w, eps):
    x = x.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * w if w is not None else y


def rope_freqs(cfg, ratio):
    """Per-pair frequencies w_i = theta^(-2i/R); compressed layers use their theta + YaRN."""
    R = cfg["rope_head_dim"]
    theta = cfg["compress_rope_theta"] if ratio > 0 else cfg["rope_theta"]
    i = torch.arange(R // 2, dtype=torch.float32)
    w = theta ** (-2.0 * i / R)
    L0, s = cfg.get("original_seq_len", 0), cfg.get("rope_factor", 1.0)
    if ratio > 0 and L0 > 0:
        def corr(beta):
            return R * math.log(L0 / (2 * math.pi * beta)) / (2 * math.log(theta))
        lo = max(math.floor(corr(cfg["beta_fast"])), 0)
        hi = min(math.ceil(corr(cfg["beta_slow"])), R - 1)
        if lo == hi:
            hi += 0.001
        g = ((i - lo) / (hi - lo)).clamp(0, 1)
        w = w * (1 - g) + (w / s) * g
    return w


def rope(x, pos, freqs, R, inverse=False):
    """Rotate the last R dims of x [..., T, (heads,) Dh] as adjacent pairs at positions pos [T]."""
    ang = pos.float()[:, None] * freqs[None, :]           # [T, R/2], fp32 product
    cos, sin = torch.cos(ang), torch.sin(ang)
    if inverse:
        sin = -sin
    while cos.dim() < x.dim() - 1:                         # broadcast over a heads axis
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    head, tail = x[..., :-R], x[..., -R:]
    t = tail.reshape(*tail.shape[:-1], R // 2, 2)
    x0, x1 = t[..., 0], t[..., 1]
    y = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).reshape(tail.shape)
    return torch.cat([head, y], -1)


def linear(x, w):
    return x @ w.t()


def linear32(x, w):
    """x @ w^T in float32 even under bf16 autocast: the hyper-connection mixes and the router
    are small and sensitive (ds4 keeps their weights F32 too)."""
    with torch.autocast(x.device.type, enabled=False):
        return x.float() @ w.float().t()


# ---------------------------------------------------------------- hyper-connections


def sinkhorn(c, iters, eps):
    """Row softmax, +eps, then column/row normalisations ending on a column step."""
    c = c.softmax(-1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def hc_pre(X, fn, scale, base, cfg):
    """X [B,T,n,D] -> y [B,T,D], post [B,T,n], C [B,T,n,n] (C[j][k]: source j, destination k)."""
    n = cfg["hc_mult"]
    flat = X.flatten(-2)
    m = linear32(flat, fn) * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + cfg["norm_eps"])
    pre = torch.sigmoid(m[..., :n] * scale[0] + base[:n]) + cfg["hc_eps"]
    post = 2 * torch.sigmoid(m[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = (m[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    C = sinkhorn(comb, cfg["hc_sinkhorn_iters"], cfg["hc_eps"])
    y = (pre.unsqueeze(-1) * X).sum(-2)
    return y, post, C


def hc_post(f, X, post, C):
    """Xout[k] = post[k] f + sum_j C[j][k] X[j]. The residual streams stay float32."""
    with torch.autocast(X.device.type, enabled=False):
        mixed = torch.einsum("btjk,btjd->btkd", C.float(), X.float())
    return post.unsqueeze(-1) * f.float().unsqueeze(-2) + mixed


def hc_head(X, fn, scale, base, cfg):
    flat = X.flatten(-2)
    m = linear32(flat, fn) * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + cfg["norm_eps"])
    w = torch.sigmoid(m * scale[0] + base) + cfg["hc_eps"]
    return (w.unsqueeze(-1) * X).sum(-2)


# ---------------------------------------------------------------- compressor and indexer


def compress(P, pre, a, ratio, Dc, cfg):
    """Pooled rows [B, T//ratio, Dc] of the compressor `pre` over a [B,T,D], before the norm.

    r = 4 overlaps: each token's 2*Dc outputs are an A half (for the next window's row) and a
    B half (for its own window's row); row w pools A of window w-1 and B of window w, a
    softmax over 8 candidates per channel. r = 128 pools its own r tokens only."""
    B, T, _ = a.shape
    nw = T // ratio
    if nw == 0:
        return a.new_zeros(B, 0, Dc)
    kp = linear(a[:, :nw * ratio], P[pre + "wkv.weight"])
    zp = linear(a[:, :nw * ratio], P[pre + "wgate.weight"])
    zp = zp + P[pre + "ape"].repeat(nw, 1)
    kp = kp.view(B, nw, ratio, -1)
    zp = zp.view(B, nw, ratio, -1)
    if ratio == 4:
        kA, kB = kp[..., :Dc], kp[..., Dc:]
        zA, zB = zp[..., :Dc], zp[..., Dc:]
        kA = torch.cat([torch.zeros_like(kA[:, :1]), kA[:, :-1]], 1)
        zA = torch.cat([torch.full_like(zA[:, :1], float("-inf")), zA[:, :-1]], 1)
        kp, zp = torch.cat([kA, kB], 2), torch.cat([zA, zB], 2)
    return (zp.softmax(2) * kp).sum(2)


def finish_rows(P, pre, pooled, ratio, freqs, cfg, indexer):
    R = cfg["rope_head_dim"]
    rows = rmsnorm(pooled, P[pre + "norm.weight"], cfg["norm_eps"])
    pos = torch.arange(rows.shape[1], device=rows.device) * ratio   # first token of each window
    rows = rope(rows, pos, freqs, R)
    if indexer:
        return fp4_sim(rows @ cfg["_hadamard"])
    return torch.cat([fp8_sim(rows[..., :-R]), rows[..., -R:]], -1)


def topk_lower_first(x, k):
    """Indices of the k largest along the last axis; equal values go to the lower index, as
    in ds4. FP4-rounded indexer scores tie often, so the rule matters for parity."""
    return torch.sort(x.float(), stable=True, dim=-1, descending=True).indices[..., :k]


def visible_rows(T, nw, ratio, device):
    """[T, nw] bool: query t may use compressed row c iff c < floor((t+1)/ratio)."""
    t = torch.arange(T, device=device)[:, None]
    return torch.arange(nw, device=device)[None, :] < (t + 1) // ratio


def indexer_select(P, pre, a, qr, ratio, freqs, cfg, vis):
    """Selection mask [B,T,nw] and the indexer's log-distribution (for its training loss)."""
    B, T, _ = a.shape
    HI, DI, R = cfg["index_n_heads"], cfg["index_head_dim"], cfg["rope_head_dim"]
    a, qr = a.detach(), qr.detach()                          # the indexer learns on its own
    krows = finish_rows(P, pre + "compressor.", compress(P, pre + "compressor.", a, ratio, DI, cfg),
                        ratio, freqs, cfg, True)             # [B,nw,DI]
    q = linear(qr, P[pre + "wq_b.weight"]).view(B, T, HI, DI)
    q = fp4_sim(rope(q, torch.arange(T, device=a.device), freqs, R) @ cfg["_hadamard"])
    w = linear(a, P[pre + "weights_proj.weight"]) * (DI ** -0.5 * HI ** -0.5)
    score = torch.einsum("bth,bthc->btc", w, F.relu(torch.einsum("bthd,bcd->bthc", q, krows))).float()
    k = min(cfg["index_topk"], score.shape[-1])
    sel = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        top = topk_lower_first(score.detach().masked_fill(~vis, float("-inf")), k)
        sel.scatter_(-1, top, True)
    # For the loss, invisible rows get a large finite logit gap (not -inf: a query with no
    # visible row would give NaN); their target mass is 0 anyway.
    return sel & vis, score.masked_fill(~vis, -1e9).log_softmax(-1)


# ---------------------------------------------------------------- attention


def attention(P, pre, a, cfg, ratio, freqs, aux):
    """One attention sublayer on a [B,T,D] at positions 0..T-1 -> [B,T,D]."""
    B, T, _ = a.shape
    H, Dh, R, eps = cfg["n_heads"], cfg["head_dim"], cfg["rope_head_dim"], cfg["norm_eps"]
    pos = torch.arange(T, device=a.device)
    qr = rmsnorm(linear(a, P[pre + "wq_a.weight"]), P[pre + "q_norm.weight"], eps)
    q = rmsnorm(linear(qr, P[pre + "wq_b.weight"]).view(B, T, H, Dh), None, eps)
    q = rope(q, pos, freqs, R)
    kv = rmsnorm(linear(a, P[pre + "wkv.weight"]), P[pre + "kv_norm.weight"], eps)
    kv = rope(kv, pos, freqs, R)
    kv = torch.cat([fp8_sim(kv[..., :-R]), kv[..., -R:]], -1)   # [B,T,Dh]

    # The sliding window as a band: query t sees sources t-W+1 .. t (kvw[b,t,:,w] is source
    # t-W+1+w; the W-1 rows in front of position 0 are padding, masked). Same numbers as a
    # [T,T] score matrix masked to the window, at W/T of its cost.
    scale, W = Dh ** -0.5, cfg["window_size"]
    kvw = F.pad(kv, (0, 0, W - 1, 0)).unfold(1, W, 1)          # [B,T,Dh,W]
    s_raw = torch.einsum("bthd,btdw->bhtw", q, kvw).float() * scale
    window = (pos[:, None] - (W - 1) + torch.arange(W, device=a.device)[None, :]) >= 0   # [T,W]
    s_raw = s_raw.masked_fill(~window, float("-inf"))
    parts, values = [s_raw], [kv]
    if ratio > 0:
        rows = finish_rows(P, pre + "compressor.", compress(P, pre + "compressor.", a, ratio, Dh, cfg),
                           ratio, freqs, cfg, False)        # [B,nw,Dh]
        nw = rows.shape[1]
        vis = visible_rows(T, nw, ratio, a.device).unsqueeze(0).expand(B, T, nw)
        s_cmp = torch.einsum("bthd,bcd->bhtc", q, rows).float() * scale
        if ratio == 4:
            sel, logq = indexer_select(P, pre + "indexer.", a, qr, ratio, freqs, cfg, vis)
            if nw > 0:                                       # the indexer's target: dense attention
                tgt = s_cmp.detach().masked_fill(~vis.unsqueeze(1), float("-inf")).softmax(-1)
                tgt = torch.nan_to_num(tgt.mean(1), nan=0.0)
                has = vis.any(-1)
                kl = (tgt * (torch.log(tgt.clamp(min=1e-12)) - logq)).sum(-1)
                aux.append(torch.where(has, kl, torch.zeros_like(kl)).sum() / has.sum().clamp(min=1))
            vis = sel
        parts.append(s_cmp.masked_fill(~vis.unsqueeze(1), float("-inf")))
        values.append(rows)
    sink = P[pre + "attn_sink"].float().view(1, H, 1, 1).expand(B, H, T, 1)
    p = torch.cat(parts + [sink], -1).softmax(-1)
    o = torch.einsum("bhtw,btdw->bthd", p[..., :W], kvw)
    if ratio > 0:
        o = o + torch.einsum("bhtc,bcd->bthd", p[..., W:-1], values[1])
    o = rope(o, pos, freqs, R, inverse=True)

    G, O = cfg["o_groups"], cfg["o_lora_rank"]
    og = o.reshape(B, T, G, H // G * Dh)
    wo_a = P[pre + "wo_a.weight"].view(G, O, H // G * Dh)
    low = torch.einsum("btgi,goi->btgo", og, wo_a).reshape(B, T, G * O)
    return linear(low, P[pre + "wo_b.weight"])


# ---------------------------------------------------------------- MoE


def expert(P, pre, b, lim):
    g = linear(b, P[pre + "w1.weight"])
    u = linear(b, P[pre + "w3.weight"])
    if lim > 0:
        g = g.clamp(max=lim)
        u = u.clamp(-lim, lim)
    return F.silu(g) * u


def moe(P, pre, b, tokens, hashed, cfg, stats):
    E, K, lim = cfg["n_routed_experts"], cfg["n_activated_experts"], cfg["swiglu_limit"]
    sc = torch.sqrt(F.softplus(linear32(b, P[pre + "gate.weight"])))   # [B,T,E]
    if hashed:
        sel = P[pre + "gate.tid2eid"].long()[tokens]                  # [B,T,K]
    else:
        sel = topk_lower_first(sc.detach() + P[pre + "gate.bias"], K)
        stats[pre] = torch.bincount(sel.flatten(), minlength=E).float()
    w = sc.gather(-1, sel)
    w = w / w.sum(-1, keepdim=True) * cfg["route_scale"]
    dense = torch.zeros_like(sc).scatter(-1, sel, w)                   # [B,T,E]
    out = 0
    for e in range(E):
        h = expert(P, pre + "experts.%d." % e, b, lim) * dense[..., e:e + 1]
        out = out + linear(h, P[pre + "experts.%d.w2.weight" % e])
    sh = expert(P, pre + "shared_experts.", b, lim)
    return out + linear(sh, P[pre + "shared_experts.w2.weight"])


# ---------------------------------------------------------------- blocks, model, MTP


def block(P, pre, X, tokens, cfg, ratio, hashed, aux, stats):
    eps = cfg["norm_eps"]
    freqs = cfg["_freqs"][ratio > 0]
    y, post, C = hc_pre(X, P[pre + "hc_attn_fn"], P[pre + "hc_attn_scale"], P[pre + "hc_attn_base"], cfg)
    f = attention(P, pre + "attn.", rmsnorm(y, P[pre + "attn_norm.weight"], eps), cfg, ratio, freqs, aux)
    X = hc_post(f, X, post, C)
    y, post, C = hc_pre(X, P[pre + "hc_ffn_fn"], P[pre + "hc_ffn_scale"], P[pre + "hc_ffn_base"], cfg)
    g = moe(P, pre + "ffn.", rmsnorm(y, P[pre + "ffn_norm.weight"], eps), tokens, hashed, cfg, stats)
    return hc_post(g, X, post, C)


def head(P, pre, X, cfg):
    h = hc_head(X, P[pre + "hc_head_fn"], P[pre + "hc_head_scale"], P[pre + "hc_head_base"], cfg)
    return linear(rmsnorm(h, P[pre + "norm.weight"], cfg["norm_eps"]), P["head.weight"])


def prepare(cfg):
    """Derived constants the forward needs (RoPE tables, the Hadamard matrix)."""
    cfg["_freqs"] = {False: rope_freqs(cfg, 0), True: rope_freqs(cfg, 1)}
    cfg["_hadamard"] = hadamard_matrix(cfg["index_head_dim"])
    return cfg


def forward(P, tokens, cfg, with_mtp=True):
    """tokens [B,T] at positions 0..T-1 -> (logits [B,T,V], mtp logits [B,T-1,V] or None,
    aux losses, router loads). MTP row i: main streams at i + embedding of token i+1, at
    position i, predicting token i+2."""
    n, eps = cfg["hc_mult"], cfg["norm_eps"]
    aux, stats = [], {}
    X = P["embed.weight"][tokens].unsqueeze(-2).expand(*tokens.shape, n, cfg["dim"])
    for l in range(cfg["n_layers"]):
        X = block(P, "layers.%d." % l, X, tokens, cfg, cfg["compress_ratios"][l],
                  l < cfg["n_hash_layers"], aux, stats)
    logits = head(P, "", X, cfg)
    mtp = None
    if with_mtp and cfg.get("n_mtp_layers", 0) > 0 and tokens.shape[1] > 1:
        nxt = tokens[:, 1:]
        e = linear(rmsnorm(P["embed.weight"][nxt], P["mtp.0.enorm.weight"], eps), P["mtp.0.e_proj.weight"])
        Xm = linear(rmsnorm(X[:, :-1], P["mtp.0.hnorm.weight"], eps), P["mtp.0.h_proj.weight"])
        Xm = (Xm + e.unsqueeze(-2)).float()           # streams stay float32 under autocast
        Xm = block(P, "mtp.0.", Xm, nxt, cfg, cfg["compress_ratios"][cfg["n_layers"]], False, aux, stats)
        mtp = head(P, "mtp.0.", Xm, cfg)
    return logits, mtp, aux, stats


# ---------------------------------------------------------------- safetensors (no extra package)

_DT = {"BF16": (torch.bfloat16, 2), "F16": (torch.float16, 2), "F32": (torch.float32, 4),
       "I32": (torch.int32, 4), "I64": (torch.int64, 8)}


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
        data = bytearray(f.read())
    out = {}
    for name, h in hdr.items():
        if name == "__metadata__":
            continue
        dt, _ = _DT[h["dtype"]]
        a, b = h["data_offsets"]
        raw = torch.frombuffer(data[a:b], dtype=torch.uint8) if b > a else torch.zeros(0, dtype=torch.uint8)
        out[name] = raw.view(dt).reshape(h["shape"]).clone()
    return out


def write_safetensors(path, tensors):
    """tensors: name -> tensor (already in the dtype to store). Written atomically."""
    import os
    inv = {v[0]: k for k, v in _DT.items()}
    hdr, blobs, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        hdr[name] = {"dtype": inv[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(d):
    import glob
    import os
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.setdefault("n_mtp_layers", cfg.get("num_nextn_predict_layers", 0))
    P = {}
    for f in sorted(glob.glob(os.path.join(d, "model-*.safetensors"))):
        P.update(read_safetensors(f))
    for k, v in P.items():
        if v.dtype.is_floating_point:
            P[k] = v.float()
    return prepare(cfg), P
