#!/usr/bin/env python3
"""Train a tiny DeepSeek V4 (with its MTP block) and export it in official checkpoint naming.

    python3 tools/train_tiny.py --data DIR --out CKPT_DIR [--preset gpu|smoke] [--minutes M]
                                [--steps N] [--device cuda|cpu] [--threads N] [--seed 1]
    python3 tools/train_tiny.py --check [--checkpoint vectors/tiny] [--vectors vectors/vectors.json]
    python3 tools/train_tiny.py --vectors-out FILE.json --checkpoint CKPT_DIR [--like vectors/vectors.json]

DIR comes from tools/make_train_data.py (train.bin, heldout.bin: token ids of the 8192-token
reduced vocabulary, vectors/train-vocab.gguf, uint16 or int32 as stats.json's id_bytes says;
train_names.bin, tool_val.json: see load_data). CKPT_DIR receives config.json,
model-00001-of-00001.safetensors and model.safetensors.index.json, the layout of vectors/tiny/,
so `./ds4-convert CKPT_DIR OUT.gguf --mtp OUT-mtp.gguf --type f16 --vocab
vectors/train-vocab.gguf` turns it into GGUFs (the weights in shards under 12 MiB, the most a
device run brings back per file). It also gets train_log.json (the loss curve, held-out
figures, timings). The checkpoint is exported every --save-every minutes, at the end, on
SIGTERM and on an error, so a cut run still leaves one; --deadline (a time.time() value) ends
the training early enough for the final evaluation and export to finish before it.
On cuda the products run under bf16 autocast (--bf16); parameters, optimizer state, residual
streams, norms, the hyper-connection mixes, the router and the FP8/FP4 round trips stay float32.

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
  * Rows of 1024 tokens, half of them starting at a conversation, and the targets inside
    assistant turns (thinking, DSML tool calls, answers) weighted 3, the called tool's name
    (train_names.bin) 8 (see PRESETS).
  * Every --eval-every steps: held-out perplexity and the tool choice on held-out requests
    (tool_val.json, teacher forced); the export is of the best evaluation, not the last step.
`--check` instead loads vectors/tiny and compares this model's logits with the oracle vectors
made by DeepSeek's own inference/model.py: the training model computes what the oracle does.
Fixed seeds; the data order depends only on --seed.
"""
import argparse
import contextlib
import json
import math
import os
import signal
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
# Training settings, per preset:
#   seq 1024: a whole tool conversation (system prompt with 2-4 tool schemas, user turn, DSML
#     call, tool result, answer) is 750 tokens (median; 942 at most) in the reduced vocabulary,
#     and the call itself starts near token 600. Rows of 512 never held a call behind its
#     prompt; the served prompt always has it.
#   conv_rows, doc_rows: shares of the rows that start at a conversation's BOS and at a text
#     document's BOS; the rest start anywhere (BOS put in front, as ds4 --perplexity does).
#     Few from document starts: rows from 573 starts would repeat the same first 1024 tokens
#     of each document dozens of times in an 8-minute run.
#   asst_weight: the loss weight of the targets inside assistant turns (after <｜Assistant｜>
#     up to its EOS: thinking, DSML tool calls, answers), against 1 for every other token.
#     They are about 8% of the tokens and are all the model is asked to produce when served.
#   name_weight: the loss weight of the tokens of the called tool's name in each call turn
#     (its first mention, in the thinking or the DSML invoke, chooses the tool; about 0.5% of
#     the targets). The first H200 run got every call well formed but named the wrong tool in
#     27 of 50 held-out requests: these are the tokens the bar depends on.
PRESETS = {
    # The shipped candidate: vectors/tiny's shape with the 8192-token vocabulary (~28 MB F16).
    "gpu": dict(COMMON, dim=256, moe_inter_dim=256, n_layers=6, n_hash_layers=3, n_heads=8,
                n_routed_experts=4, n_activated_experts=2, q_lora_rank=128, head_dim=96, o_groups=4,
                o_lora_rank=32, window_size=16, compress_ratios=[0, 0, 4, 128, 4, 128, 0],
                index_n_heads=8, index_head_dim=64, index_topk=8,
                train=dict(seq=1024, batch=32, lr=3e-3, warmup=150, steps=100000, conv_rows=0.5,
                           doc_rows=0.1, asst_weight=3.0, name_weight=8.0)),
    # The CPU smoke run (2 shared cores): the same kinds of layer (hash + window, CSA with its
    # indexer, HCA, MTP), narrow and shallow, same vocabulary.
    "smoke": dict(COMMON, dim=64, moe_inter_dim=64, n_layers=3, n_hash_layers=1, n_heads=2,
                  n_routed_experts=4, n_activated_experts=2, q_lora_rank=32, head_dim=96, o_groups=2,
                  o_lora_rank=16, window_size=16, compress_ratios=[0, 4, 128, 0],
                  index_n_heads=2, index_head_dim=32, index_topk=4,
                  train=dict(seq=1024, batch=2, lr=4e-3, warmup=30, steps=100000, conv_rows=0.5,
                             doc_rows=0.1, asst_weight=3.0, name_weight=8.0)),
}

# Token ids in the reduced vocabulary (vectors/train-vocab.gguf keeps DeepSeek's ids).
BOS, EOS, USER, ASSISTANT = 0, 1, 8148, 8149
SHARD_BYTES = 12 << 20     # checkpoint shards: the device tool brings back files under 16 MiB

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


def load_ids(path, id_bytes=4):
    """Little-endian token ids (or positions): 2 bytes (uint16) or 4 (int32/uint32)."""
    import array
    a = array.array({2: "H", 4: "i"}[id_bytes])
    with open(path, "rb") as f:
        a.frombytes(f.read())
    if sys.byteorder != "little":
        a.byteswap()
    return torch.tensor(a, dtype=torch.long)


def load_data(d):
    """(train ids, held-out ids, name mask, validation rows) of a make_train_data.py folder.
    The name mask marks the tokens of the called tool's name in each training call
    (train_names.bin; all False for data made before it existed); the validation rows are
    held-out requests rendered with their call, with the positions of the name."""
    st = os.path.join(d, "stats.json")
    id_bytes = json.load(open(st)).get("id_bytes", 4) if os.path.exists(st) else 4
    ids = load_ids(os.path.join(d, "train.bin"), id_bytes)
    held = load_ids(os.path.join(d, "heldout.bin"), id_bytes)
    names = torch.zeros(len(ids), dtype=torch.bool)
    if os.path.exists(os.path.join(d, "train_names.bin")):
        names[load_ids(os.path.join(d, "train_names.bin"), 4)] = True
    vp = os.path.join(d, "tool_val.json")
    val = json.load(open(vp)) if os.path.exists(vp) else []
    return ids, held, names, val


def document_starts(ids, seq):
    """(conversation starts, text starts): the BOS positions with seq+1 tokens after them,
    split by whether a <｜User｜> comes before the next BOS."""
    bos = (ids == BOS).nonzero().flatten()
    ends = torch.cat([bos[1:], torch.tensor([len(ids)])])
    users = (ids == USER).long().cumsum(0)
    conv = users[ends - 1] - users[bos] > 0
    fits = bos <= len(ids) - seq - 1
    return bos[conv & fits], bos[~conv & fits]


class Batches:
    """Rows of seq+1 tokens: a share conv_rows start at a conversation's BOS, doc_rows at a
    text document's BOS, the rest at a random offset with BOS put in front (as ds4
    --perplexity and every prompt start)."""

    def __init__(self, ids, seq, batch, seed, conv_rows=0.5, doc_rows=0.1, names=None):
        self.ids, self.seq, self.batch = ids, seq, batch
        self.names = names if names is not None else torch.zeros(len(ids), dtype=torch.bool)
        self.conv, self.docs = document_starts(ids, seq)
        self.shares = (conv_rows, conv_rows + doc_rows)
        self.g = torch.Generator().manual_seed(seed)

    def pick(self, starts):
        return starts[torch.randint(len(starts), (1,), generator=self.g)].item()

    def next(self):
        """(tokens [B, seq+1], name mask [B, seq+1]: the token is a called tool's name)."""
        rows, masks = [], []
        for _ in range(self.batch):
            r = torch.rand(1, generator=self.g).item()
            starts = self.conv if r < self.shares[0] else self.docs if r < self.shares[1] else None
            if starts is not None and len(starts):
                b = self.pick(starts)
                rows.append(self.ids[b:b + self.seq + 1])
                masks.append(self.names[b:b + self.seq + 1])
            else:
                o = torch.randint(len(self.ids) - self.seq, (1,), generator=self.g).item()
                rows.append(torch.cat([torch.tensor([BOS]), self.ids[o:o + self.seq]]))
                masks.append(torch.cat([torch.tensor([False]), self.names[o:o + self.seq]]))
        return torch.stack(rows), torch.stack(masks)


# ---------------------------------------------------------------- training


def in_assistant(x):
    """[B,L] bool: after token k we are inside an assistant turn (the last <｜Assistant｜> up to
    k is later than the last BOS, EOS or <｜User｜> up to k). Target k+1 is then the model's
    own output when served."""
    at = torch.arange(x.shape[1], device=x.device).expand_as(x)
    opened = torch.where(x == ASSISTANT, at, -1).cummax(1).values
    closed = torch.where((x == EOS) | (x == USER) | (x == BOS), at, -1).cummax(1).values
    return opened > closed


def weighted_ce(logits, target, w):
    """(plain mean cross-entropy, sum(w ce) / sum(w), greedy accuracy where w > 1)."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                         reduction="none").view(target.shape)
    hit = (logits.argmax(-1) == target).float()
    sel = (w > 1).float()
    return ce.mean(), (ce * w).sum() / w.sum(), (hit * sel).sum() / sel.sum().clamp(min=1)


def target_weights(x, m, tr):
    """[B,T+1] loss weight of target k+1 at index k: 1, asst_weight inside assistant turns,
    name_weight where the target is a token of the called tool's name (m [B,T+1], or None)."""
    w = 1.0 + (tr.get("asst_weight", 1.0) - 1.0) * in_assistant(x).float()
    if m is not None and tr.get("name_weight"):
        nxt = torch.zeros_like(m)
        nxt[:, :-1] = m[:, 1:]
        w = torch.where(nxt, torch.full_like(w, tr["name_weight"]), w)
    return w


def losses(P, x, cfg, tr, m=None):
    """x [B,T+1]: main loss on targets x[:,1:], MTP on x[:,2:], each weighted by asst_weight
    inside assistant turns (and name_weight on the tool names, mask m); plus the indexer's KL
    and the teacher-forced draft acceptance."""
    T = x.shape[1] - 1
    logits, mtp, aux, stats = V.forward(P, x[:, :-1], cfg)
    w = target_weights(x, m, tr)
    ce, wce, asst_acc = weighted_ce(logits, x[:, 1:], w[:, :T])
    mce, wmce, _ = weighted_ce(mtp, x[:, 2:], w[:, 1:T])
    # 1-token draft acceptance, teacher forced: MTP row i and main row i+1 both predict token i+2.
    acc = (mtp.argmax(-1) == logits[:, 1:].argmax(-1)).float().mean()
    idx = torch.stack(aux).mean() if aux else torch.zeros((), device=x.device)
    return dict(ce=ce, wce=wce, mce=mce, wmce=wmce, idx=idx, acc=acc, asst_acc=asst_acc), stats


def balance_bias(P, stats, rate=1e-3):
    with torch.no_grad():
        for pre, load in stats.items():
            b = P[pre + "gate.bias"]
            b -= rate * torch.sign(load - load.mean())


def first_run(pos):
    """The first run of consecutive positions: the tokens of the name's first mention."""
    out = pos[:1]
    for p in pos[1:]:
        if p != out[-1] + 1:
            break
        out.append(p)
    return out


def tool_choice(P, cfg, val, dev, amp, chunk=8):
    """Share of held-out requests (rendered with their call) whose tool name, at its first
    mention in the assistant's turn (the thinking, or the DSML invoke), is predicted token by
    token at greedy, teacher forced. The prompt up to there is fixed text, so this is close to
    the served tool choice, at the cost of one forward pass per request."""
    right = 0
    with torch.no_grad(), amp():
        for i in range(0, len(val), chunk):
            rows = val[i:i + chunk]
            L = max(len(r["ids"]) for r in rows)
            x = torch.full((len(rows), L), EOS, dtype=torch.long)
            for j, r in enumerate(rows):
                x[j, :len(r["ids"])] = torch.tensor(r["ids"])
            guess = V.forward(P, x.to(dev), cfg, with_mtp=False)[0].argmax(-1).cpu()
            for j, r in enumerate(rows):
                pos = first_run(r["name"])
                right += bool(pos) and all(int(guess[j, p - 1]) == r["ids"][p] for p in pos)
    return right / max(1, len(val))


def evaluate(P, cfg, tr, batches, amp, val=(), dev=None):
    """Held-out figures: perplexity of every target and of the MTP's, teacher-forced draft
    acceptance, the greedy token accuracy inside assistant turns (tool calls included), and
    the tool choice on the validation requests (when the data has them)."""
    with torch.no_grad(), amp():
        r = [losses(P, x, cfg, tr)[0] for x in batches]
    mean = lambda k: sum(float(d[k]) for d in r) / len(r)
    out = {"ppl": round(math.exp(mean("ce")), 3), "mtp_ppl": round(math.exp(mean("mce")), 3),
           "mtp_accept": round(mean("acc"), 4), "assistant_token_acc": round(mean("asst_acc"), 4)}
    if val:
        out["tool_choice"] = round(tool_choice(P, cfg, val, dev, amp), 4)
    return out


class Best:
    """The parameters at the best held-out evaluation so far (on the CPU): the most tool
    choices right on the validation requests, then the lowest held-out perplexity. The run
    overfits if it goes on long enough (the first H200 run's held-out loss was best at step
    750 of 1432), so this is what gets exported, not the last step."""

    def __init__(self):
        self.key, self.params, self.eval = None, None, None

    def offer(self, P, ev):
        key = (ev.get("tool_choice", 0.0), -ev["ppl"])
        if self.key is None or key > self.key:
            self.key, self.eval = key, dict(ev)
            self.params = {k: v.detach().to("cpu", copy=True) for k, v in P.items()}
            return True
        return False

    def or_current(self, P):
        return self.params if self.params is not None else P


def lr_at(step, tr, total, time_fraction=None):
    """Linear warm-up, then cosine down to 10% over the steps (or over the --minutes budget)."""
    if step < tr["warmup"]:
        return tr["lr"] * (step + 1) / tr["warmup"]
    p = min(1.0, (step - tr["warmup"]) / max(1, total - tr["warmup"]))
    if time_fraction is not None:
        p = min(1.0, time_fraction)
    return tr["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def amp_context(a, dev):
    """bf16 autocast for the big products on the GPU (--bf16 auto); the parameters, the
    residual streams and everything v4_torch keeps in float32 stay float32."""
    on = a.bf16 == "on" or (a.bf16 == "auto" and dev.type == "cuda")
    if not on:
        return contextlib.nullcontext, False
    return (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)), True


def setup(a):
    """The preset's config and training settings, the seeded parameters on the device, and
    AdamW (weight decay on the matrices only)."""
    cfg = json.loads(json.dumps(PRESETS[a.preset]))
    tr = cfg.pop("train")
    for k in ("seq", "batch", "steps", "lr"):
        if getattr(a, k):
            tr[k] = getattr(a, k)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device if a.device != "cuda" or torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False   # float32 stays float32 (hc, router)
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
    return cfg, tr, dev, P, opt


def time_budget(a, t0, reserve=30.0):
    """Seconds of training: --minutes, cut so that the final evaluation and export (reserve)
    end before --deadline (absolute, time.time() seconds; the shell step's hard end)."""
    b = a.minutes * 60 if a.minutes else float("inf")
    if a.deadline:
        b = min(b, a.deadline - reserve - t0)
    return b


def train(a):
    cfg, tr, dev, P, opt = setup(a)
    amp, bf16 = amp_context(a, dev)
    ids, held, names, val = load_data(a.data)
    val = val[:a.val_rows] if a.val_rows >= 0 else val
    if int(ids.max()) >= cfg["vocab_size"]:
        sys.exit("token id %d outside the %d-token vocabulary" % (int(ids.max()), cfg["vocab_size"]))
    mix = (tr.get("conv_rows", 0.5), tr.get("doc_rows", 0.1))
    data = Batches(ids, tr["seq"], tr["batch"], a.seed, *mix, names=names)
    hb = Batches(held, tr["seq"], tr["batch"], a.seed + 1, *mix)
    held_batches = [hb.next()[0].to(dev) for _ in range(a.eval_batches)]
    best = Best()
    n_params = sum(v.numel() for v in P.values())
    print("preset %s: %d parameters, %d train tokens (%d conversations, %d documents), seq %d, batch %d, "
          "device %s, bf16 %s; %d tool-name targets, %d validation requests" % (
              a.preset, n_params, len(ids), len(data.conv), len(data.docs), tr["seq"], tr["batch"], dev,
              bf16, int(names.sum()), len(val)), flush=True)
    log = {"preset": a.preset, "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
           "train": tr, "seed": a.seed, "parameters": n_params, "train_tokens": len(ids), "bf16": bf16,
           "curve": [], "eval": []}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    t0 = time.time()
    budget = time_budget(a, t0)
    log["budget_seconds"] = round(budget, 1) if budget != float("inf") else None
    step, last_save = 0, t0
    try:
        while step < tr["steps"] and not stop:
            el = time.time() - t0
            if el > budget:
                break
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step, tr, tr["steps"], el / budget if budget != float("inf") else None)
            x, m = data.next()
            x, m = x.to(dev, non_blocking=True), m.to(dev, non_blocking=True)
            with amp():
                L, stats = losses(P, x, cfg, tr, m)
                loss = L["wce"] + 0.3 * L["wmce"] + 0.1 * L["idx"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([v for v in P.values() if v.requires_grad], 1.0)
            opt.step()
            balance_bias(P, stats)
            step += 1
            if step % a.log_every == 0 or step == 1:
                el = time.time() - t0
                row = {"step": step, "tokens": step * tr["batch"] * tr["seq"], "seconds": round(el, 1),
                       "tok_per_s": round(step * tr["batch"] * tr["seq"] / max(el, 1e-9)),
                       "loss": round(float(L["ce"]), 4), "weighted_loss": round(float(L["wce"]), 4),
                       "mtp_loss": round(float(L["mce"]), 4), "indexer_kl": round(float(L["idx"]), 4),
                       "mtp_accept": round(float(L["acc"]), 3),
                       "assistant_token_acc": round(float(L["asst_acc"]), 3)}
                log["curve"].append(row)
                print(json.dumps(row), flush=True)
            if step % a.eval_every == 0:
                ev = dict(step=step, seconds=round(time.time() - t0, 1),
                          **evaluate(P, cfg, tr, held_batches, amp, val, dev))
                ev["best"] = best.offer(P, ev)
                log["eval"].append(ev)
                print("eval", json.dumps(ev), flush=True)
            if a.save_every and time.time() - last_save > a.save_every * 60:
                log.update(steps=step, seconds=round(time.time() - t0, 1), partial=True,
                           exported=best.eval)
                export(best.or_current(P), cfg, a.out, log)
                last_save = time.time()
    except BaseException as e:   # keep what was learnt (an OOM, Ctrl+C), then fail as before
        if step:
            log.update(steps=step, seconds=round(time.time() - t0, 1), partial=True, error=repr(e),
                       exported=best.eval)
            export(best.or_current(P), cfg, a.out, log)
        raise
    if not stop:
        ev = dict(step=step, seconds=round(time.time() - t0, 1),
                  **evaluate(P, cfg, tr, held_batches, amp, val, dev))
        ev["best"] = best.offer(P, ev)
        log["eval"].append(ev)
        print("final eval", json.dumps(ev), flush=True)
    log.update(steps=step, seconds=round(time.time() - t0, 1), partial=bool(stop), exported=best.eval)
    print("after %d steps, %.1f s%s; exporting the evaluation of step %s: %s" % (
        step, log["seconds"], " (stopped by %s)" % stop[0] if stop else "",
        best.eval and best.eval["step"], json.dumps(best.eval)), flush=True)
    export(best.or_current(P), cfg, a.out, log)


# ---------------------------------------------------------------- export


def shard(tensors, limit=SHARD_BYTES):
    """Names grouped in order into shards of at most `limit` bytes (a bigger tensor alone)."""
    groups, size = [[]], 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    return groups


def export(P, cfg, out, log):
    """The checkpoint in official naming, in shards under SHARD_BYTES, each file written
    atomically; shards of an earlier export that this one does not name are removed."""
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
    groups = shard(tensors)
    names = ["model-%05d-of-%05d.safetensors" % (i + 1, len(groups)) for i in range(len(groups))]
    weight_map = {}
    for fname, keys in zip(names, groups):
        V.write_safetensors(os.path.join(out, fname), {k: tensors[k] for k in keys})
        weight_map.update({k: fname for k in keys})
    official = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "n_mtp_layers"}
    official["n_mtp_layers"] = cfg.get("n_mtp_layers", 1)
    write_json(os.path.join(out, "config.json"), official)
    write_json(os.path.join(out, "model.safetensors.index.json"),
               {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})
    for f in os.listdir(out):
        if f.startswith("model-") and f.endswith(".safetensors") and f not in names:
            os.remove(os.path.join(out, f))
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
    ap.add_argument("--lr", type=float, default=0)
    ap.add_argument("--bf16", default="auto", choices=("auto", "on", "off"),
                    help="bf16 autocast (auto: on for cuda)")
    ap.add_argument("--deadline", type=float, default=0,
                    help="time.time() by which training, final evaluation and export must be done")
    ap.add_argument("--save-every", type=float, default=2.0, help="export every M minutes while training")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--val-rows", type=int, default=-1,
                    help="validation tool requests used per evaluation (-1: all of tool_val.json)")
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
