#!/usr/bin/env python3
"""Random DeepSeek V4 Flash weights in the released storage formats, and oracle vectors on them.

    fullwidth_oracle.py make    --out DIR [--width full|small] [--layers N] [--seed S]
    fullwidth_oracle.py vectors --checkpoint DIR --out F.json [--oracle v4|official]
                                [--official DIR] [--mode f32|fp8] [--device cuda|cpu]
                                [--lengths 64,2500,4100] [--decode D]

Why: every oracle check of ds4 so far ran on tiny models, where 64 query heads in 8 output
groups, head_dim 512, 256 experts with 6 active, an indexer top-k of 512 that only selects past
2,048 tokens, and the converter's FP8/FP4 paths at real tensor sizes cannot show. `make` writes
a checkpoint in DeepSeek's official naming and layout (config.json, model-*.safetensors, index):

    FP8 e4m3 + ue8m0 128x128 tile scales (`X.scale`, F8_E8M0): wq_a, wq_b, wkv, wo_a, wo_b,
        indexer.wq_b, shared_experts.w1/w2/w3, mtp e_proj/h_proj  (the release's dense linears)
    FP4 e2m1 packed two per byte (I8, low nibble = even column) + ue8m0 per-32 scales:
        routed experts w1/w2/w3
    bf16: embed, head, norms, router gate.weight, compressor wkv/wgate, indexer weights_proj
    f32:  hc_* matrices, attn_sink, compressor ape, gate.bias;  int32: gate.tid2eid

Every stored value is the value the oracle computes with: the oracle never sees the float
weights `make` drew, only what it reads back from the files (FP8/FP4 dequantized exactly in
float32: a code times a power of two). Norm weights are drawn as 1 + noise and rounded to bf16
before they are written; the bf16 number is the weight (the classic trap is to compute with
the unrounded 1 + noise).

`vectors` writes the vectors.json schema that `ds4 --check-vectors` reads. Per prompt length
L it makes two cases from the same tokens: `lenL_prefillL` (one prefill call) and
`lenL_prefillP` (prefill P = L - D, then D decode calls). Oracles:

  --oracle official  DeepSeek's inference/model.py (path in --official, loaded the way
      vectors/gen_vectors.py loads it), on the GPU. --mode f32: every weight dequantized to
      float32 (ds4's semantics; the usual bars apply). --mode fp8: FP8/FP4 weights kept in
      their formats and activations FP8-quantized before every FP8/FP4 product, as DeepSeek
      deploys (reported only). The two schedules of one length are the oracle against itself:
      their row disagreement is printed and stored per case (`oracle_self_rel_err`).
  --oracle v4  tools/v4_torch.py, this project's own batched V4 (it reproduces vectors.json to
      ~1e-6); a stand-in on machines without model.py or a GPU. One batched forward gives all
      rows, so both schedules get the same rows and the self-disagreement is not measured.
"""
import argparse
import datetime
import json
import math
import os
import statistics
import struct
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import v4_torch as V4  # noqa: E402

# ---------------------------------------------------------------- configurations

FLASH = {
    "vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3,
    "n_mtp_layers": 1, "n_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1,
    "n_activated_experts": 6, "score_func": "sqrtsoftplus", "route_scale": 1.5,
    "swiglu_limit": 10.0, "q_lora_rank": 1024, "head_dim": 512, "rope_head_dim": 64,
    "o_groups": 8, "o_lora_rank": 1024, "window_size": 128, "compress_rope_theta": 160000.0,
    "original_seq_len": 65536, "rope_theta": 10000.0, "rope_factor": 16.0, "beta_fast": 32,
    "beta_slow": 1, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-06, "norm_eps": 1e-06,
    "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4", "num_nextn_predict_layers": 1,
}

# Reduced width for a CPU: same storage formats, same window and indexer top-k (512, so the
# 2,500- and 4,100-token prompts make the indexer select), every width a multiple of 128.
SMALL = dict(FLASH, vocab_size=2048, dim=256, moe_inter_dim=128, n_heads=4, head_dim=128,
             n_routed_experts=8, q_lora_rank=128, o_groups=2, o_lora_rank=128,
             index_n_heads=4, index_head_dim=128)


def flash_ratios(n_layers):
    """The release's pattern 0, 0, then 4, 128 alternating, the last main layer 4; MTP 0."""
    r = [0, 0] + [4 if i % 2 == 0 else 128 for i in range(max(0, n_layers - 2))]
    return r[:n_layers] + [0]


def make_config(width, n_layers, experts=0):
    if n_layers < 4:
        sys.exit("--layers must be >= 4 to have layers of compress ratio 0, 4 and 128")
    cfg = dict(FLASH if width == "full" else SMALL)
    if experts:         # --experts: every other width real, fewer experts (a CPU-sized test)
        if experts < cfg["n_activated_experts"]:
            sys.exit("--experts must be >= %d (the active count)" % cfg["n_activated_experts"])
        cfg["n_routed_experts"] = experts
    cfg["n_layers"] = n_layers
    cfg["n_hash_layers"] = min(3, n_layers)
    cfg["compress_ratios"] = flash_ratios(n_layers)
    if n_layers == 43:
        cfg["compress_ratios"][-2] = 4
    return cfg


# ---------------------------------------------------------------- exact FP8 / FP4 encoding


def pow2_exponent_ceil(y):
    """e with 2^e the smallest power of two >= y (y > 0), exact next to powers of two."""
    m, e = torch.frexp(y)
    return torch.where(m == 0.5, e - 1, e)


def e4m3_bytes(v):
    """Bytes of e4m3fn values v (already exactly on the grid, |v| <= 448)."""
    a = v.abs()
    m, e = torch.frexp(a)                 # a = m 2^e, m in [0.5, 1)
    normal = a >= 2.0 ** -6
    exp_field = torch.where(normal, e - 1 + 7, torch.zeros_like(e))
    mant = torch.where(normal, a / torch.ldexp(torch.ones_like(a), e - 4) - 8, a * 512)
    code = exp_field * 8 + mant.round().to(torch.int32)
    code = code + torch.where(v < 0, 128, 0)
    return code.to(torch.uint8)


def e4m3_value(b):
    b = b.to(torch.int32)
    e, m = (b >> 3) & 15, b & 7
    mag = torch.where(e == 0, m.float() * 2.0 ** -9,
                      torch.ldexp((8 + m).float(), (e - 10).to(torch.int32)))
    return torch.where(b >= 128, -mag, mag)


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_codes(v):
    """Nibbles of e2m1 values v (exactly on the grid)."""
    a = v.abs()
    idx = torch.bucketize(a, E2M1.to(v.device))
    return (idx + torch.where(v < 0, 8, 0)).to(torch.uint8)


def e2m1_value(n):
    n = n.to(torch.long)
    mag = E2M1.to(n.device)[n & 7]
    return torch.where(n >= 8, -mag, mag)


def quantize_fp8(w):
    """w [O,I] float -> (bytes [O,I] u8, scale exponent bytes [ceil(O/128),ceil(I/128)] u8).

        scale[t] = 2^ceil(log2(amax(tile t) / 448)),  q = round_e4m3(w / scale)"""
    O, I = w.shape
    to, ti = -(-O // 128), -(-I // 128)
    pad = torch.zeros(to * 128, ti * 128, device=w.device)
    pad[:O, :I] = w
    tiles = pad.view(to, 128, ti, 128)
    amax = tiles.abs().amax((1, 3)).clamp(min=1e-30)
    ex = pow2_exponent_ceil(amax / 448.0)
    sc = torch.ldexp(torch.ones_like(amax), ex)[:, None, :, None]
    q = V4.round_e4m3((tiles / sc).clamp(-448, 448)).view(to * 128, ti * 128)[:O, :I]
    return e4m3_bytes(q), (ex + 127).to(torch.uint8)


def quantize_fp4(w):
    """w [O,I] float -> (packed [O,I/2] u8 (low nibble = even column), scales [O,I/32] u8)."""
    O, I = w.shape
    blocks = w.view(O, I // 32, 32)
    amax = blocks.abs().amax(-1).clamp(min=1e-30)
    ex = pow2_exponent_ceil(amax / 6.0)
    sc = torch.ldexp(torch.ones_like(amax), ex)[..., None]
    codes = e2m1_codes(V4.round_e2m1((blocks / sc).clamp(-6, 6))).view(O, I)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, (ex + 127).to(torch.uint8)


def dequant_fp8(b, s, O, I):
    sc = torch.ldexp(torch.ones(s.shape, device=b.device), s.to(torch.int32) - 127)
    sc = sc.repeat_interleave(128, 0)[:O].repeat_interleave(128, 1)[:, :I]
    return e4m3_value(b) * sc


def dequant_fp4(b, s):
    O = b.shape[0]
    codes = torch.stack([b & 15, b >> 4], -1).view(O, -1)
    sc = torch.ldexp(torch.ones(s.shape, device=b.device), s.to(torch.int32) - 127)
    return e2m1_value(codes) * sc.repeat_interleave(32, 1)


# ---------------------------------------------------------------- the tensor list


def tensor_specs(cfg):
    """[(name, shape, kind, std, mean)] in official naming. kind: fp8 fp4 bf16 f32 ids."""
    D, H, Dh = cfg["dim"], cfg["n_heads"], cfg["head_dim"]
    QL, G, OL, F = cfg["q_lora_rank"], cfg["o_groups"], cfg["o_lora_rank"], cfg["moe_inter_dim"]
    E, K, Vv, n = cfg["n_routed_experts"], cfg["n_activated_experts"], cfg["vocab_size"], cfg["hc_mult"]
    HI, DI = cfg["index_n_heads"], cfg["index_head_dim"]
    mix = (2 + n) * n
    out = [("embed.weight", [Vv, D], "bf16", 1.0, 0.0), ("head.weight", [Vv, D], "bf16", D ** -0.5, 0.0),
           ("norm.weight", [D], "bf16", 0.2, 1.0), ("hc_head_fn", [n, n * D], "f32", (n * D) ** -0.5, 0.0),
           ("hc_head_base", [n], "f32", 0.4, 0.0), ("hc_head_scale", [1], "f32", 0.3, 1.0)]

    def lin(name, o, i, kind, gain=1.0):
        out.append((name, [o, i], kind, gain * i ** -0.5, 0.0))

    def compressor(pre, d, ratio):
        coff = 2 if ratio == 4 else 1
        out.append((pre + "ape", [ratio, coff * d], "f32", 0.5, 0.0))
        lin(pre + "wkv.weight", coff * d, D, "bf16")
        lin(pre + "wgate.weight", coff * d, D, "bf16")
        out.append((pre + "norm.weight", [d], "bf16", 0.2, 1.0))

    def block(pre, ratio, hashed):
        for side in ("attn", "ffn"):
            out.append((pre + "%s_norm.weight" % side, [D], "bf16", 0.2, 1.0))
            out.append((pre + "hc_%s_fn" % side, [mix, n * D], "f32", (n * D) ** -0.5, 0.0))
            out.append((pre + "hc_%s_base" % side, [mix], "f32", 0.5, 0.0))
            out.append((pre + "hc_%s_scale" % side, [3], "f32", 0.3, 0.8))
        a = pre + "attn."
        out.append((a + "attn_sink", [H], "f32", 1.0, 0.0))
        lin(a + "wq_a.weight", QL, D, "fp8")
        out.append((a + "q_norm.weight", [QL], "bf16", 0.2, 1.0))
        lin(a + "wq_b.weight", H * Dh, QL, "fp8", 1.4)
        lin(a + "wkv.weight", Dh, D, "fp8")
        out.append((a + "kv_norm.weight", [Dh], "bf16", 0.2, 1.0))
        lin(a + "wo_a.weight", G * OL, H * Dh // G, "fp8", 1.1)
        lin(a + "wo_b.weight", D, G * OL, "fp8", 1.4)
        if ratio:
            compressor(a + "compressor.", Dh, ratio)
        if ratio == 4:
            lin(a + "indexer.wq_b.weight", HI * DI, QL, "fp8", 1.4)
            lin(a + "indexer.weights_proj.weight", HI, D, "bf16")
            compressor(a + "indexer.compressor.", DI, 4)
        f = pre + "ffn."
        lin(f + "gate.weight", E, D, "bf16")
        if hashed:
            out.append((f + "gate.tid2eid", [Vv, K], "ids", 0, 0))
        else:
            out.append((f + "gate.bias", [E], "f32", 0.05, 0.0))
        for e in range(E):
            for w, o, i in (("w1", F, D), ("w2", D, F), ("w3", F, D)):
                lin(f + "experts.%d.%s.weight" % (e, w), o, i, "fp4", 4.0)
        for w, o, i in (("w1", F, D), ("w2", D, F), ("w3", F, D)):
            lin(f + "shared_experts.%s.weight" % w, o, i, "fp8")

    L = cfg["n_layers"]
    for l in range(L):
        block("layers.%d." % l, cfg["compress_ratios"][l], l < cfg["n_hash_layers"])
    m = "mtp.0."
    block(m, cfg["compress_ratios"][L], False)
    lin(m + "e_proj.weight", D, D, "fp8")
    lin(m + "h_proj.weight", D, D, "fp8")
    for nm in ("enorm", "hnorm", "norm"):
        out.append((m + nm + ".weight", [D], "bf16", 0.2, 1.0))
    out += [(m + "hc_head_fn", [n, n * D], "f32", (n * D) ** -0.5, 0.0),
            (m + "hc_head_base", [n], "f32", 0.4, 0.0), (m + "hc_head_scale", [1], "f32", 0.3, 1.0)]
    return out


def stored(spec, gen, device, cfg):
    """[(name, safetensors dtype, shape, uint8 tensor)] for one spec (two for fp8/fp4)."""
    name, shape, kind, std, mean = spec
    if kind == "ids":      # six distinct experts per token, like the release's table
        ids = torch.rand(shape[0], cfg["n_routed_experts"], generator=gen, device=device).argsort(-1)
        ids = ids[:, :shape[1]].to(torch.int32).cpu()
        return [(name, "I32", shape, ids.view(torch.uint8))]
    w = torch.randn(shape, generator=gen, device=device) * std + mean
    if kind == "f32":
        return [(name, "F32", shape, w.float().cpu().contiguous().view(torch.uint8))]
    if kind == "bf16":
        return [(name, "BF16", shape, w.to(torch.bfloat16).cpu().contiguous().view(torch.uint8))]
    base = name[:-len(".weight")]
    if kind == "fp8":
        b, s = quantize_fp8(w)
        return [(name, "F8_E4M3", shape, b.cpu()), (base + ".scale", "F8_E8M0", list(s.shape), s.cpu())]
    b, s = quantize_fp4(w)
    return [(name, "I8", list(b.shape), b.cpu()), (base + ".scale", "F8_E8M0", list(s.shape), s.cpu())]


# ---------------------------------------------------------------- safetensors, streamed


class ShardWriter:
    """One safetensors shard written tensor by tensor: header first (sizes are known from the
    shapes), data streamed after it, then fsync + rename. Nothing is held in memory."""

    SIZE = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "BF16": 2, "F32": 4, "I32": 4}

    def __init__(self, path, entries):
        self.path, self.tmp = path, path + ".tmp"
        hdr, off = {}, 0
        for name, dt, shape in entries:
            nbytes = self.SIZE[dt] * math.prod(shape)
            hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + nbytes]}
            off += nbytes
        self.order = [e[0] for e in entries]
        self.hdr = hdr
        h = json.dumps(hdr, separators=(",", ":")).encode()
        h += b" " * ((8 - len(h) % 8) % 8)
        self.f = open(self.tmp, "wb")
        self.f.write(struct.pack("<Q", len(h)) + h)
        self.next = 0

    def put(self, name, raw):
        if self.order[self.next] != name:
            sys.exit("internal: shard order %s != %s" % (self.order[self.next], name))
        a, b = self.hdr[name]["data_offsets"]
        if raw.numel() != b - a:
            sys.exit("internal: %s has %d bytes, header says %d" % (name, raw.numel(), b - a))
        self.f.write(raw.contiguous().numpy().tobytes())
        self.next += 1

    def close(self):
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)


def out_names(spec, cfg):
    name, shape, kind = spec[:3]
    if kind in ("fp8", "fp4"):
        base = name[:-len(".weight")]
        if kind == "fp8":
            return [(name, "F8_E4M3", shape),
                    (base + ".scale", "F8_E8M0", [-(-shape[0] // 128), -(-shape[1] // 128)])]
        return [(name, "I8", [shape[0], shape[1] // 2]), (base + ".scale", "F8_E8M0", [shape[0], shape[1] // 32])]
    dt = {"f32": "F32", "bf16": "BF16", "ids": "I32"}[kind]
    return [(name, dt, shape)]


def cmd_make(a):
    cfg = make_config(a.width, a.layers, a.experts)
    os.makedirs(a.out, exist_ok=True)
    dev = a.device if (a.device != "cuda" or torch.cuda.is_available()) else "cpu"
    specs = tensor_specs(cfg)
    # Shard by block, as the release does (one shard per layer keeps each file < 4 GB + spare).
    groups = {}
    for s in specs:
        key = ".".join(s[0].split(".")[:2]) if s[0].startswith(("layers.", "mtp.")) else "top"
        groups.setdefault(key, []).append(s)
    keys = list(groups)
    weight_map, total = {}, 0
    for gi, key in enumerate(keys):
        fname = "model-%05d-of-%05d.safetensors" % (gi + 1, len(keys))
        gen = torch.Generator(device=dev)
        gen.manual_seed(a.seed * 1000 + gi)     # each shard its own stream: reproducible in parts
        entries = [e for s in groups[key] for e in out_names(s, cfg)]
        w = ShardWriter(os.path.join(a.out, fname), entries)
        for s in groups[key]:
            for name, dt, shape, raw in stored(s, gen, dev, cfg):
                w.put(name, raw)
                weight_map[name] = fname
                total += raw.numel()
        w.close()
        print("  %s  %-10s %6.2f GB so far" % (fname, key, total / 1e9), flush=True)
    write_json(os.path.join(a.out, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(os.path.join(a.out, "config.json"), cfg)
    print("wrote %s: %d layers + MTP, width %s, %.2f GB" % (a.out, cfg["n_layers"], a.width, total / 1e9))


def write_json(path, obj, indent=1):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- reading back


def read_shard(path):
    """name -> (dtype, shape, uint8 tensor) for one shard (memory-mapped by numpy)."""
    import numpy as np
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, h in hdr.items():
        if name == "__metadata__":
            continue
        a, b = h["data_offsets"]
        out[name] = (h["dtype"], h["shape"], torch.from_numpy(np.array(mm[a:b])))
    return out


def load_dequantized(ckpt, device="cpu", keep_quantized=False):
    """name -> float32 tensor (FP8/FP4 dequantized; ids as int32). With keep_quantized, FP8/FP4
    weights come back as (kind, bytes, scale bytes) for the FP8-mode oracle instead."""
    import glob
    raw = {}
    for f in sorted(glob.glob(os.path.join(ckpt, "model-*.safetensors"))):
        raw.update(read_shard(f))
    P = {}
    for name, (dt, shape, b) in raw.items():
        if name.endswith(".scale"):
            continue
        if dt == "F8_E4M3":
            s = raw[name[:-len("weight")] + "scale"][2].view(raw[name[:-len("weight")] + "scale"][1])
            P[name] = ("fp8", b.view(shape), s) if keep_quantized else \
                dequant_fp8(b.view(shape).to(device), s.to(device), *shape)
        elif dt == "I8":
            s = raw[name[:-len("weight")] + "scale"][2].view(raw[name[:-len("weight")] + "scale"][1])
            P[name] = ("fp4", b.view(shape), s) if keep_quantized else \
                dequant_fp4(b.view(shape).to(device), s.to(device))
        elif dt == "BF16":
            P[name] = b.clone().view(torch.bfloat16).view(shape).to(device).float()
        elif dt == "F32":
            P[name] = b.clone().view(torch.float32).view(shape).to(device)
        elif dt == "I32":
            P[name] = b.clone().view(torch.int32).view(shape).to(device)
        else:
            sys.exit("%s: unexpected dtype %s" % (name, dt))
    return P


# ---------------------------------------------------------------- cases


def thin(picks, k):
    """At most k of the sorted positions, first and last always kept, the rest spread."""
    if k <= 0 or len(picks) <= k:
        return picks
    if k == 1:
        return [picks[-1]]
    return sorted({picks[round(i * (len(picks) - 1) / (k - 1))] for i in range(k)})


def make_cases(vocab, lengths, decode, seed, max_rows=0):
    """Tokens (seeded), prefill counts and check positions for each length. At full width a
    logits row is 129,280 numbers (1.3 MB of JSON), so --max-rows keeps the files small."""
    g = torch.Generator()
    g.manual_seed(seed)
    cases = []
    for L in lengths:
        toks = torch.randint(0, vocab, (L,), generator=g).tolist()
        d = min(decode, L - 1)
        picks = sorted({0, 1, L // 2, L - d - 1, L - d, L - d // 2, L - 2, L - 1} |
                       ({2047, 2048, 2049} & set(range(L))))
        mpicks = thin(sorted({p for p in picks if p <= L - 2}), max(0, max_rows - 1))
        picks = thin(picks, max_rows)
        for prefill in (L, L - d):
            cases.append({"name": "len%d_prefill%d" % (L, prefill), "tokens": toks, "prefill": prefill,
                          "check_positions": picks, "mtp_check_positions": mpicks})
    gp = torch.randint(0, vocab, (64,), generator=g).tolist()
    cases.append({"name": "greedy_64_32", "tokens": gp, "greedy_steps": 32})
    return cases


def top2(row):
    v, i = row.topk(2)
    return int(i[0]), float(v[0] - v[1])


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def fl(row):
    return [float("%.7g" % x) for x in row.tolist()]


class V4Oracle:
    """tools/v4_torch.py on the dequantized weights: all rows from one batched forward."""

    def __init__(self, ckpt, device):
        self.cfg = json.load(open(os.path.join(ckpt, "config.json")))
        self.cfg.setdefault("n_mtp_layers", 1)
        V4.prepare(self.cfg)
        self.P = load_dequantized(ckpt, device)
        self.device = device

    def rows(self, tokens, prefill):
        key = tuple(tokens)         # one batched forward serves every schedule of these tokens
        if getattr(self, "_key", None) != key:
            t = torch.tensor([tokens], device=self.device)
            with torch.no_grad():
                logits, mtp, _, _ = V4.forward(self.P, t, self.cfg)
            self._key, self._rows = key, (logits[0], (mtp[0] if mtp is not None else None))
        return self._rows

    def greedy(self, prompt, steps):
        toks, margins, seq = [], [], list(prompt)
        for _ in range(steps):
            with torch.no_grad():
                logits, _, _, _ = V4.forward(self.P, torch.tensor([seq], device=self.device),
                                             self.cfg, with_mtp=False)
            t, m = top2(logits[0, -1])
            toks.append(t)
            margins.append(m)
            seq.append(t)
        return toks, margins


class OfficialOracle:
    """DeepSeek's inference/model.py, loaded as vectors/gen_vectors.py loads it, with the FP8/FP4
    weights kept in their dtypes (torch.float8_e4m3fn, torch.float4_e2m1fn_x2: a torch that has
    them, 2.8 or later) and every other weight exact. The products go through the kernel ports
    in vectors/official_kernels.py, whose MODE decides the activations: "f32" hands them through
    in float32 and dequantizes the weight exactly (ds4's semantics), "fp8" quantizes them to
    FP8 first (DeepSeek's deployment). Keeping the experts in FP4 is what lets 256 experts x 5
    blocks fit on one GPU (16 GB, where float32 copies would take 128 GB)."""

    def __init__(self, ckpt, official, device, mode, max_seq_len):
        sys.path.insert(0, os.path.join(os.path.dirname(HERE), "vectors"))
        import gen_vectors as GV
        kern = os.path.join(os.path.dirname(HERE), "vectors", "official_kernels.py")
        self.M = GV.load_official(official, kern)
        sys.modules["kernel"].MODE = mode
        cfg = json.load(open(os.path.join(ckpt, "config.json")))
        fields = self.M.ModelArgs.__dataclass_fields__
        kw = {k: v for k, v in cfg.items() if k in fields}
        kw.update(compress_ratios=tuple(cfg["compress_ratios"]), max_seq_len=max_seq_len,
                  max_batch_size=1)
        args = self.M.ModelArgs(**kw)
        self.wide = mode == "f32"
        torch.set_default_dtype(torch.float32 if self.wide else torch.bfloat16)
        torch.set_default_device(device)
        model = self.M.Transformer(args)
        self._load(model, ckpt, device)
        model.eval()
        self.GV, self.model = GV, model
        self.o = GV.Oracle(self.M, model)

    def _plain(self, p, w):
        """A non-FP8/FP4 parameter: float32 in f32 mode, else the dtype model.py declares."""
        return w.float() if (self.wide and w.dtype.is_floating_point) else w.to(p.dtype)

    def _load(self, model, ckpt, device):
        P = load_dequantized(ckpt, "cpu", keep_quantized=True)
        params = dict(model.named_parameters())
        for name, v in P.items():
            if name not in params:
                sys.exit("official model has no parameter %s" % name)
            p = params.pop(name)
            if not isinstance(v, tuple):
                p.data = self._plain(p, v).to(device)
                continue
            kind, b, s = v
            if p.dtype in (torch.float8_e4m3fn, torch.float4_e2m1fn_x2):
                # Bytes go to the device as uint8 and are reinterpreted there: a float4 tensor
                # has few kernels, so no copy or cast is asked of that dtype. A ue8m0 scale
                # byte is the exponent + 127, which is what the checkpoint stores.
                p.data = b.to(device).view(p.dtype)
                sp = params.pop(name[:-len("weight")] + "scale")
                if sp.element_size() == 1:      # float8_e8m0fnu: the bytes as they are
                    sp.data = s.to(device).view(sp.dtype)
                else:
                    sc = torch.ldexp(torch.ones(s.shape, device="cpu"), s.to(torch.int32) - 127)
                    sp.data = sc.to(sp.dtype).to(device)
                p.scale = sp
            else:       # declared plain but stored FP8 in the release (wo_a): exact dequant
                w = dequant_fp8(b, s, *b.shape) if kind == "fp8" else dequant_fp4(b, s)
                p.data = self._plain(p, w).to(device)
        left = {k for k in params if not k.endswith((".embed.weight", ".head.weight"))}
        if left:
            sys.exit("checkpoint lacks %s" % sorted(left)[:8])
        if self.wide:
            for n_, b in model.named_buffers():
                if b.dtype in (torch.bfloat16, torch.float16):
                    b.data = b.data.float()

    def rows(self, tokens, prefill):
        logits, mtp = self.GV.run_case(self.o, tokens, prefill)
        return logits.float(), mtp.float() if mtp is not None else None

    def greedy(self, prompt, steps):
        return self.GV.run_greedy(self.o, prompt, steps)


def cmd_vectors(a):
    cfg = json.load(open(os.path.join(a.checkpoint, "config.json")))
    lengths = [int(x) for x in a.lengths.split(",")]
    cases = make_cases(cfg["vocab_size"], lengths, a.decode, a.seed, a.max_rows)
    dev = a.device if (a.device != "cuda" or torch.cuda.is_available()) else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if a.oracle == "v4":
        if a.mode != "f32":
            sys.exit("--oracle v4 computes with float32 activations only (--mode f32)")
        o = V4Oracle(a.checkpoint, dev)
        desc = "tools/v4_torch.py (this project's batched V4; stand-in for model.py), float32 on %s" % dev
    else:
        if not a.official:
            sys.exit("--oracle official needs --official DIR (DeepSeek's inference/model.py)")
        o = OfficialOracle(a.checkpoint, a.official, dev, a.mode,
                           128 * math.ceil((max(lengths) + 40) / 128))
        import hashlib
        sha = hashlib.sha256(open(os.path.join(a.official, "model.py"), "rb").read()).hexdigest()
        print("model.py sha256 %s, mode %s, device %s" % (sha, a.mode, dev), flush=True)
        desc = ("DeepSeek V4 official inference/model.py (sha256 %s), %s on %s (TF32 off)" %
                (sha[:12], "weights dequantized to float32" if a.mode == "f32" else
                 "FP8/FP4 weights, FP8 activations before every FP8/FP4 product", dev))
    out_cases, full = [], {}
    for c in cases:
        if "greedy_steps" in c:
            g, gm = o.greedy(c["tokens"], c.pop("greedy_steps"))
            c["greedy"], c["greedy_margin"] = g, gm
            out_cases.append(c)
            print("%-22s greedy %d tokens, min margin %.3g" % (c["name"], len(g), min(gm)), flush=True)
            continue
        logits, mtp = o.rows(c["tokens"], c["prefill"])
        am = [top2(r) for r in logits]
        c["argmax"], c["margin"] = [x[0] for x in am], [x[1] for x in am]
        c["logits"] = [fl(logits[p]) for p in c["check_positions"]]
        c["mtp_logits"] = [fl(mtp[p]) for p in c["mtp_check_positions"]]
        c["mtp_argmax"] = [int(r.argmax()) for r in mtp]
        L = len(c["tokens"])
        if L in full and a.oracle == "v4":
            print("%-22s rows done (same batched forward; self-disagreement not measured)" %
                  c["name"], flush=True)
        elif L in full:             # second schedule of this length: the oracle against itself
            other, omtp = full[L]
            e = [rel_err(logits[p], other[p]) for p in range(L)]
            em = [rel_err(mtp[p], omtp[p]) for p in range(L - 1)]
            c["oracle_self_rel_err"] = {"median": statistics.median(e), "max": max(e),
                                        "mtp_median": statistics.median(em), "mtp_max": max(em),
                                        "argmax_agree": sum(int(x.argmax()) == int(y.argmax())
                                                            for x, y in zip(logits, other)) / L}
            print("%-22s oracle prefill vs decode: median %.2e max %.2e | mtp median %.2e max "
                  "%.2e" % (c["name"], c["oracle_self_rel_err"]["median"], max(e),
                            statistics.median(em), max(em)), flush=True)
        else:
            full[L] = (logits, mtp)
            print("%-22s rows done" % c["name"], flush=True)
        out_cases.append(c)
    out = {"oracle": desc + "; checkpoint %s made by tools/fullwidth_oracle.py on %s" %
           (os.path.basename(os.path.abspath(a.checkpoint)), datetime.date.today().isoformat()),
           "config": cfg, "seed": a.seed, "cases": out_cases}
    write_json(a.out, out, indent=None)
    print("wrote", a.out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    m.add_argument("--width", choices=("full", "small"), default="full")
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--seed", type=int, default=14)
    m.add_argument("--experts", type=int, default=0,
                   help="routed experts instead of the width's own (256 at full width)")
    m.add_argument("--device", default="cuda")
    v = sub.add_parser("vectors")
    v.add_argument("--checkpoint", required=True)
    v.add_argument("--out", required=True)
    v.add_argument("--oracle", choices=("v4", "official"), default="official")
    v.add_argument("--official", help="directory with DeepSeek's inference/model.py")
    v.add_argument("--mode", choices=("f32", "fp8"), default="f32")
    v.add_argument("--device", default="cuda")
    v.add_argument("--lengths", default="64,2500,4100")
    v.add_argument("--decode", type=int, default=32, help="decode calls in the second schedule")
    v.add_argument("--seed", type=int, default=1400)
    v.add_argument("--max-rows", type=int, default=0,
                   help="logits rows kept per case (MTP rows: one fewer); 0 keeps all")
    a = ap.parse_args()
    cmd_make(a) if a.cmd == "make" else cmd_vectors(a)


if __name__ == "__main__":
    main()
