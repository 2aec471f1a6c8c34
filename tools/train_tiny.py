#!/usr/bin/env python3
"""Train a tiny DeepSeek V4 (with its MTP block) and export it in official checkpoint naming.

    python3 tools/train_tiny.py --data DIR --out CKPT_DIR [--preset gpu|smoke] [--minutes M]
                                [--steps N] [--device cuda|cpu] [--threads N] [--seed 1]
    python3 tools/train_tiny.py --check [--checkpoint vectors/tiny] [--vectors vectors/vectors.json]
    python3 tools/train_tiny.py --vectors-out FILE.json --checkpoint CKPT_DIR [--like vectors/vectors.json]

DIR comes from tools/make_train_data.py (train.bin, heldout.bin: int32 token ids of the
8192-token reduced vocabulary, vectors/train-vocab.gguf). CKPT_DIR receives config.json,
model-00001-of-00001.safetensors and model.safetensors.index.json, the layout of vectors/tiny/,
so `./ds4-convert CKPT_DIR OUT.gguf --mtp OUT-mtp.gguf --type f16 --vocab
vectors/train-vocab.gguf` turns it into GGUFs. It also gets train_log.json (the loss curve,
held-out figures, timings).

The model is tools/v4_torch.py: every piece of the V4 structure, trained end to end.
  * FP8 (KV rows, compressed rows) and Hadamard+FP4 (indexer) round trips: straight through.
  * The indexer's top-k is discrete, so the indexer gets its own loss: the KL divergence
    from the main attention's (dense, detached) distribution over the compressed rows to the
    indexer's softmax, as in DeepSeek's sparse attention warm-up.
  * Hash-routed layers (l < n_hash_layers) route by a fixed random token->experts table
    (tid2eid); the other layers route top-k on sqrt-softplus scores plus a selection bias that
    is nudged towards balanced expert load after every step (auxiliary-loss-free balancing).
  * The MTP block is trained on its own objective: at position i it sees the main model's
    final streams at i and the embedding of token i+1 and predicts token i+2, with the same
    shared head; its loss is weighted 0.3.
`--check` instead loads vectors/tiny and compares this model's logits with the oracle vectors
made by DeepSeek's own inference/model.py: the training model computes what the oracle does.
Fixed seeds; the data order depends only on --seed.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import v4_torch as V  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = {
    "vocab_size": 8192, "n_mtp_layers": 1, "num_nextn_predict_layers": 1, "n_shared_experts": 1,
    "score_func": "sqrtsoftplus", "route_scale": 1.5, "swiglu_limit": 10.0, "rope_head_dim": 32,
    "compress_rope_theta": 160000.0, "original_seq_len": 65536, "rope_theta": 10000.0,
    "rope_factor": 16.0, "beta_fast": 32, "beta_slow": 1, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-06, "norm_eps": 1e-06, "dtype": "bf16", "scale_fmt": "ue8m0", "expert_dtype": None,
}
PRESETS = {
    # The shipped candidate: vectors/tiny's shape with the 8192-token vocabulary (~28 MB F16).
    "gpu": dict(COMMON, dim=256, moe_inter_dim=256, n_layers=6, n_hash_layers=3, n_heads=8,
                n_routed_experts=4, n_activated_experts=2, q_lora_rank=128, head_dim=96, o_groups=4,
                o_lora_rank=32, window_size=16, compress_ratios=[0, 0, 4, 128, 4, 128, 0],
                index_n_heads=8, index_head_dim=64, index_topk=8,
                train=dict(seq=512, batch=32, lr=3e-3, warmup=200, steps=6000)),
    # The CPU smoke run: the same kinds of layer, narrower and shallower.
    # The CPU smoke run (2 shared cores): the same kinds of layer (hash + window, CSA with its
    # indexer, HCA, MTP), narrow and shallow, same vocabulary.
    "smoke": dict(COMMON, dim=64, moe_inter_dim=64, n_layers=3, n_hash_layers=1, n_heads=2,
                  n_routed_experts=4, n_activated_experts=2, q_lora_rank=32, head_dim=96, o_groups=2,
                  o_lora_rank=16, window_size=16, compress_ratios=[0, 4, 128, 0],
                  index_n_heads=2, index_head_dim=32, index_topk=4,
                  train=dict(seq=256, batch=4, lr=4e-3, warmup=30, steps=100000)),
}

F32_NAMES = ("hc_", "attn_sink", "ape", "gate.bias")   # kept float32 in the checkpoint, as in vectors/tiny


# ---------------------------------------------------------------- parameters


def layer_names(cfg, pre, ratio, hashed, mtp):
    D, H, Dh, Q = cfg["dim"], cfg["n_heads"], cfg["head_dim"], cfg["q_lora_rank"]
    n, E, Fi, G, O = cfg["hc_mult"], cfg["n_routed_experts"], cfg["moe_inter_dim"], cfg["o_groups"], cfg["o_lora_rank"]
    M = (2 + n) * n
    s = {pre + "hc_attn_fn": (M, n * D), pre + "hc_attn_base": (M,), pre + "hc_attn_scale": (3,),
         pre + "hc_ffn_fn": (M, n * D), pre + "hc_ffn_base": (M,), pre + "hc_ffn_scale": (3,),
         pre + "attn_norm.weight": (D,), pre + "ffn_norm.weight": (D,),
         pre + "attn.wq_a.weight": (Q, D), pre + "attn.q_norm.weight": (Q,),
         pre + "attn.wq_b.weight": (H * Dh, Q), pre + "attn.wkv.weight": (Dh, D),
         pre + "attn.kv_norm.weight": (Dh,), pre + "attn.attn_sink": (H,),
         pre + "attn.wo_a.weight": (G * O, H * Dh // G), pre + "attn.wo_b.weight": (D, G * O),
         pre + "ffn.gate.weight": (E, D)}
    if ratio > 0:
        coff = 2 if ratio == 4 else 1
        c = pre + "attn.compressor."
        s.update({c + "wkv.weight": (coff * Dh, D), c + "wgate.weight": (coff * Dh, D),
                  c + "ape": (ratio, coff * Dh), c + "norm.weight": (Dh,)})
    if ratio == 4:
        HI, DI = cfg["index_n_heads"], cfg["index_head_dim"]
        i = pre + "attn.indexer."
        s.update({i + "wq_b.weight": (HI * DI, Q), i + "weights_proj.weight": (HI, D),
                  i + "compressor.wkv.weight": (2 * DI, D), i + "compressor.wgate.weight": (2 * DI, D),
                  i + "compressor.ape": (4, 2 * DI), i + "compressor.norm.weight": (DI,)})
    if not hashed:
        s[pre + "ffn.gate.bias"] = (E,)
    for e in list(range(E)) + ["shared"]:
        x = pre + ("ffn.experts.%d." % e if e != "shared" else "ffn.shared_experts.")
        s.update({x + "w1.weight": (Fi, D), x + "w3.weight": (Fi, D), x + "w2.weight": (D, Fi)})
    if mtp:
        s.update({pre + "e_proj.weight": (D, D), pre + "h_proj.weight": (D, D), pre + "enorm.weight": (D,),
                  pre + "hnorm.weight": (D,), pre + "norm.weight": (D,), pre + "hc_head_fn": (n, n * D),
                  pre + "hc_head_base": (n,), pre + "hc_head_scale": (1,)})
    return s


def all_shapes(cfg):
    D, n, Vv = cfg["dim"], cfg["hc_mult"], cfg["vocab_size"]
    s = {"embed.weight": (Vv, D), "head.weight": (Vv, D), "norm.weight": (D,),
         "hc_head_fn": (n, n * D), "hc_head_base": (n,), "hc_head_scale": (1,)}
    for l in range(cfg["n_layers"]):
        s.update(layer_names(cfg, "layers.%d." % l, cfg["compress_ratios"][l], l < cfg["n_hash_layers"], False))
    s.update(layer_names(cfg, "mtp.0.", cfg["compress_ratios"][cfg["n_layers"]], False, True))
    return s


def init_params(cfg, seed):
    """Seeded initial values. The hyper-connections start as four plain residual streams:
    pre = 1/2 each, post = 1, comb = (nearly) the identity."""
    g = torch.Generator().manual_seed(seed)
    n, L = cfg["hc_mult"], cfg["n_layers"]
    P = {}
    for name, shp in sorted(all_shapes(cfg).items()):
        if name.endswith("norm.weight") or name.endswith("_scale"):
            t = torch.ones(shp)
        elif name.endswith(("_base", "attn_sink", "ape", "gate.bias")):
            t = torch.zeros(shp)
            if name.endswith("_base") and shp[0] == (2 + n) * n:
                t[2 * n:] = 4.0 * torch.eye(n).flatten()
        elif name.endswith("_fn"):
            t = torch.randn(shp, generator=g) * 1e-2 / math.sqrt(shp[1])
        elif name == "embed.weight":
            t = torch.randn(shp, generator=g)
        else:
            t = torch.randn(shp, generator=g) / math.sqrt(shp[1])
            if name.endswith(("wo_b.weight", "w2.weight")):
                t = t * 0.5 / math.sqrt(2 * (L + 1))
        P[name] = t
    E, K = cfg["n_routed_experts"], cfg["n_activated_experts"]
    for l in range(cfg["n_hash_layers"]):
        P["layers.%d.ffn.gate.tid2eid" % l] = torch.rand(cfg["vocab_size"], E, generator=g).argsort(-1)[:, :K].int()
    return P


# ---------------------------------------------------------------- data


def load_ids(path):
    import array
    a = array.array("i")
    with open(path, "rb") as f:
        a.frombytes(f.read())
    if sys.byteorder != "little":
        a.byteswap()
    return torch.tensor(a, dtype=torch.long)


class Batches:
    """Windows of seq+1 tokens: half start at a document's BOS, half at a random offset with
    BOS put in front (as ds4 --perplexity and every prompt start)."""

    def __init__(self, ids, seq, batch, seed, bos=0):
        self.ids, self.seq, self.batch, self.bos = ids, seq, batch, bos
        self.starts = (ids[:-seq - 1] == bos).nonzero().flatten()
        self.g = torch.Generator().manual_seed(seed)

    def next(self):
        rows = []
        for _ in range(self.batch):
            if len(self.starts) and torch.rand(1, generator=self.g).item() < 0.5:
                b = self.starts[torch.randint(len(self.starts), (1,), generator=self.g)].item()
                rows.append(self.ids[b:b + self.seq + 1])
            else:
                o = torch.randint(len(self.ids) - self.seq, (1,), generator=self.g).item()
                rows.append(torch.cat([torch.tensor([self.bos]), self.ids[o:o + self.seq]]))
        return torch.stack(rows)


# ---------------------------------------------------------------- training


def losses(P, x, cfg):
    inp = x[:, :-1]
    logits, mtp, aux, stats = V.forward(P, inp, cfg)
    Vv = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, Vv), x[:, 1:].reshape(-1))
    mce = F.cross_entropy(mtp.reshape(-1, Vv), x[:, 2:].reshape(-1))
    # 1-token draft acceptance, teacher forced: MTP row i and main row i+1 both predict token i+2.
    acc = (mtp.argmax(-1) == logits[:, 1:].argmax(-1)).float().mean()
    idx = torch.stack(aux).mean() if aux else torch.zeros(())
    return ce, mce, idx, acc, stats


def balance_bias(P, stats, rate=1e-3):
    with torch.no_grad():
        for pre, load in stats.items():
            b = P[pre + "gate.bias"]
            b -= rate * torch.sign(load - load.mean())


def evaluate(P, cfg, batches):
    with torch.no_grad():
        r = [losses(P, x, cfg)[:4] for x in batches]
    ce = sum(float(a[0]) for a in r) / len(r)
    mce = sum(float(a[1]) for a in r) / len(r)
    acc = sum(float(a[3]) for a in r) / len(r)
    return {"ppl": math.exp(ce), "mtp_ppl": math.exp(mce), "mtp_accept": acc}


def lr_at(step, tr, total, time_fraction=None):
    """Linear warm-up, then cosine down to 10% over the steps (or over the --minutes budget)."""
    if step < tr["warmup"]:
        return tr["lr"] * (step + 1) / tr["warmup"]
    p = min(1.0, (step - tr["warmup"]) / max(1, total - tr["warmup"]))
    if time_fraction is not None:
        p = min(1.0, time_fraction)
    return tr["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train(a):
    cfg = json.loads(json.dumps(PRESETS[a.preset]))
    tr = cfg.pop("train")
    for k in ("seq", "batch", "steps"):
        if getattr(a, k):
            tr[k] = getattr(a, k)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device if a.device != "cuda" or torch.cuda.is_available() else "cpu")
    P = {k: v.to(dev) for k, v in init_params(cfg, a.seed).items()}
    V.prepare(cfg)
    cfg["_freqs"] = {k: v.to(dev) for k, v in cfg["_freqs"].items()}
    cfg["_hadamard"] = cfg["_hadamard"].to(dev)
    for k, v in P.items():
        if v.dtype.is_floating_point and not k.endswith("gate.bias"):
            v.requires_grad_(True)
    decay = [v for k, v in P.items() if v.requires_grad and v.dim() == 2 and not k.startswith("embed")
             and "hc_" not in k and "ape" not in k]
    rest = [v for k, v in P.items() if v.requires_grad and not any(v is d for d in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=tr["lr"], betas=(0.9, 0.95), eps=1e-8)
    ids = load_ids(os.path.join(a.data, "train.bin"))
    held = load_ids(os.path.join(a.data, "heldout.bin"))
    if int(ids.max()) >= cfg["vocab_size"]:
        sys.exit("token id %d outside the %d-token vocabulary" % (int(ids.max()), cfg["vocab_size"]))
    data = Batches(ids, tr["seq"], tr["batch"], a.seed)
    hb = Batches(held, tr["seq"], tr["batch"], a.seed + 1)
    held_batches = [hb.next().to(dev) for _ in range(a.eval_batches)]
    n_params = sum(v.numel() for v in P.values())
    print("preset %s: %d parameters, %d train tokens, seq %d, batch %d, device %s" %
          (a.preset, n_params, len(ids), tr["seq"], tr["batch"], dev), flush=True)
    log = {"preset": a.preset, "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
           "train": tr, "seed": a.seed, "parameters": n_params, "train_tokens": len(ids), "curve": [],
           "eval": []}
    t0 = time.time()
    step = 0
    total = tr["steps"]
    while step < total:
        if a.minutes and time.time() - t0 > a.minutes * 60:
            break
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, tr, total, (time.time() - t0) / (a.minutes * 60) if a.minutes else None)
        x = data.next().to(dev)
        ce, mce, idx, acc, stats = losses(P, x, cfg)
        loss = ce + 0.3 * mce + 0.1 * idx
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([v for v in P.values() if v.requires_grad], 1.0)
        opt.step()
        balance_bias(P, stats)
        step += 1
        if step % a.log_every == 0 or step == 1:
            el = time.time() - t0
            row = {"step": step, "tokens": step * tr["batch"] * tr["seq"], "seconds": round(el, 1),
                   "loss": round(float(ce), 4), "mtp_loss": round(float(mce), 4),
                   "indexer_kl": round(float(idx), 4), "mtp_accept": round(float(acc), 3)}
            log["curve"].append(row)
            print(json.dumps(row), flush=True)
        if step % a.eval_every == 0:
            ev = dict(step=step, **evaluate(P, cfg, held_batches))
            log["eval"].append(ev)
            print("eval", json.dumps(ev), flush=True)
    ev = dict(step=step, **evaluate(P, cfg, held_batches))
    log["eval"].append(ev)
    log["seconds"] = round(time.time() - t0, 1)
    log["steps"] = step
    print("final eval", json.dumps(ev), "after %d steps, %.1f s" % (step, log["seconds"]), flush=True)
    export(P, cfg, a.out, log)


# ---------------------------------------------------------------- export


def export(P, cfg, out, log):
    os.makedirs(out, exist_ok=True)
    tensors = {}
    for k, v in P.items():
        v = v.detach().cpu()
        if v.dtype == torch.int32:
            tensors[k] = v
        elif any(s in k for s in F32_NAMES):
            tensors[k] = v.float().contiguous()
        else:
            tensors[k] = v.to(torch.bfloat16).contiguous()
    fname = "model-00001-of-00001.safetensors"
    V.write_safetensors(os.path.join(out, fname), tensors)
    official = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "n_mtp_layers"}
    official["n_mtp_layers"] = cfg.get("n_mtp_layers", 1)
    write_json(os.path.join(out, "config.json"), official)
    write_json(os.path.join(out, "model.safetensors.index.json"),
               {"metadata": {}, "weight_map": {k: fname for k in sorted(tensors)}})
    write_json(os.path.join(out, "train_log.json"), log)
    print("exported %d tensors to %s" % (len(tensors), out), flush=True)


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- --check


def check(a):
    """This training model against DeepSeek's oracle vectors (same bars as ds4 --check-vectors)."""
    cfg, P = V.load_checkpoint(a.checkpoint)
    d = json.load(open(a.vectors))
    bad = 0
    for c in d["cases"]:
        if "greedy" in c or c["prefill"] != len(c["tokens"]):
            continue   # the other cases repeat these tokens with another schedule (no cache here)
        with torch.no_grad():
            lg, mtp, _, _ = V.forward(P, torch.tensor([c["tokens"]]), cfg)
        rel = lambda row, ref: float((row - ref).abs().max() / ref.abs().max())
        e = sorted(rel(lg[0, p], torch.tensor(r)) for p, r in zip(c["check_positions"], c["logits"]))
        me = sorted(rel(mtp[0, p], torch.tensor(r)) for p, r in zip(c["mtp_check_positions"], c["mtp_logits"]))
        agree = float((lg[0].argmax(-1) == torch.tensor(c["argmax"])).float().mean())
        ok = e[len(e) // 2] <= 2e-3 and e[-1] <= 8e-2 and agree >= 0.98 and (not me or me[-1] <= 8e-2)
        bad += not ok
        print("%s %-18s logits median %.2e max %.2e argmax %.1f%%%s" % (
            "ok  " if ok else "FAIL", c["name"], e[len(e) // 2], e[-1], 100 * agree,
            "  mtp median %.2e max %.2e" % (me[len(me) // 2], me[-1]) if me else ""), flush=True)
    print("%d cases failed" % bad)
    return 1 if bad else 0


def own_vectors(a):
    """vectors.json for a checkpoint, computed by this training model (not by DeepSeek's code):
    the cases, tokens and check positions of --like, every schedule given the numbers of one
    full prefill (the maths is the same for any schedule). ds4 --check-vectors on the result
    shows that the engine computes what was trained; gen_vectors.py with the official
    model.py is the independent oracle."""
    cfg, P = V.load_checkpoint(a.checkpoint)
    like = json.load(open(a.like))
    out = {k: v for k, v in like.items() if k != "cases"}
    out["oracle"] = "tools/train_tiny.py (tools/v4_torch.py), float32, on %s" % a.checkpoint
    out["config"] = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cache, cases = {}, []
    for c in like["cases"]:
        nc = dict(c)
        toks = [t % cfg["vocab_size"] for t in c["tokens"]]
        nc["tokens"] = toks
        if "greedy" in c:
            seq = list(toks)
            g, gm = [], []
            with torch.no_grad():
                for _ in range(len(c["greedy"])):
                    row = V.forward(P, torch.tensor([seq]), cfg, with_mtp=False)[0][0, -1]
                    v, i = row.topk(2)
                    g.append(int(i[0]))
                    gm.append(float(v[0] - v[1]))
                    seq.append(int(i[0]))
            nc["greedy"], nc["greedy_margin"] = g, gm
            cases.append(nc)
            continue
        key = tuple(toks)
        if key not in cache:
            with torch.no_grad():
                lg, mtp, _, _ = V.forward(P, torch.tensor([toks]), cfg)
            cache[key] = (lg[0], mtp[0] if mtp is not None else None)
        lg, mtp = cache[key]
        top = lg.topk(2, -1)
        nc["argmax"] = top.indices[:, 0].tolist()
        nc["margin"] = (top.values[:, 0] - top.values[:, 1]).tolist()
        nc["logits"] = [lg[p].tolist() for p in c["check_positions"]]
        nc["mtp_logits"] = [mtp[p].tolist() for p in c["mtp_check_positions"]] if mtp is not None else []
        nc["mtp_argmax"] = mtp.argmax(-1).tolist() if mtp is not None else []
        cases.append(nc)
        print("case %s done" % c["name"], flush=True)
    out["cases"] = cases
    write_json(a.vectors_out, out)
    print("wrote", a.vectors_out)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the oracle vectors and exit")
    ap.add_argument("--checkpoint", default=os.path.join(HERE, "vectors", "tiny"))
    ap.add_argument("--vectors", default=os.path.join(HERE, "vectors", "vectors.json"))
    ap.add_argument("--vectors-out", help="write vectors.json for --checkpoint made by this model, exit")
    ap.add_argument("--like", default=os.path.join(HERE, "vectors", "vectors.json"))
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
    ap.add_argument("--minutes", type=float, default=0, help="stop after this much training time")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--seq", type=int, default=0)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-batches", type=int, default=4)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.check:
        return check(a)
    if a.vectors_out:
        return own_vectors(a)
    if not a.data or not a.out:
        ap.error("--data and --out are needed to train")
    train(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
