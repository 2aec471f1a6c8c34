#!/usr/bin/env python3
"""Regenerate vectors.json: reference outputs of DeepSeek's official inference/model.py
on the tiny checkpoint in vectors/tiny/.

    python3 vectors/gen_vectors.py --official DIR --checkpoint vectors/tiny \
        --like vectors/vectors.json --out vectors/vectors.json [--device cuda|cpu]

DIR holds DeepSeek's inference/model.py (from deepseek-ai/DeepSeek-V4-Flash; not shipped
here) and optionally a kernel.py. Without DIR/kernel.py (or with --kernels) the pure-torch
ports in vectors/official_kernels.py stand in for the tilelang kernels; they also stand in
for the fast_hadamard_transform package. Both `from kernel import ...` and
`from .kernel import ...` forms of model.py load.

Everything runs in float32 (TF32 off): the checkpoint's bf16 matrices are widened after
loading, exactly as the official code would compute with dtype "fp32". The only change made
to the official module is rotate_activation, re-bound without its `x.dtype == bfloat16`
assertion (same Hadamard rotation, scale dim**-0.5), so that the indexer runs in float32.

Cases, tokens, prefill counts, check positions and the greedy prompt are taken from --like,
so the regenerated file describes the same cases. See vectors/README.md and the README of
the tiny checkpoint for the semantics; in short:
  * a case runs as one prefill call of `prefill` tokens at start_pos 0, then one decode call
    per remaining token (teacher forced);
  * logits of every position come from the official head (hc_head, norm, head.weight)
    applied to every position's final hyper-connection stream (the official ParallelHead
    returns only the last position; that row is checked against ours);
  * MTP row i is the MTP block fed the main model's final hyper-connection stream at
    position i (before the hc_head collapse) and the embedding of token i+1, at position i;
    the block's own caches are filled by one prefill call over rows 0..prefill-2, then one
    decode call per later row, as soon as token i+1 is known;
  * greedy: the prompt is prefilled in one call, then the argmax is fed back one token at a
    time.
"""
import argparse
import datetime
import glob
import hashlib
import importlib.util
import json
import math
import os
import statistics
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_official(official_dir, kernels_path):
    """Import DIR/model.py with our kernel / Hadamard stand-ins registered for both import forms."""
    import torch
    for name in ("float8_e4m3fn", "float8_e8m0fnu", "float4_e2m1fn_x2"):
        # torch < 2.1: model.py names these dtypes; with a bf16 checkpoint it only compares
        # against them, and the kernel ports round to e4m3 by hand (official_kernels.py).
        if not hasattr(torch, name):
            setattr(torch, name, type("missing_" + name, (), {})())
    ours = load_module("ds4_official_kernels", os.path.join(HERE, "official_kernels.py"))
    kern = ours if os.path.abspath(kernels_path) == os.path.abspath(ours.__file__) \
        else load_module("ds4_user_kernel", kernels_path)
    pkg = types.ModuleType("ds4_official")
    pkg.__path__ = [os.path.abspath(official_dir)]
    sys.modules["ds4_official"] = pkg
    fht = types.ModuleType("fast_hadamard_transform")
    fht.hadamard_transform = ours.hadamard_transform
    for name, mod in (("kernel", kern), ("fast_hadamard_transform", fht)):
        sys.modules[name] = mod
        sys.modules["ds4_official." + name] = mod
    M = load_module("ds4_official.model", os.path.join(official_dir, "model.py"))

    def rotate_activation(x):
        return ours.hadamard_transform(x, scale=x.size(-1) ** -0.5)

    M.rotate_activation = rotate_activation
    return M


def build_model(M, ckpt_dir, max_seq_len):
    import torch
    try:
        from safetensors.torch import load_file
    except ImportError:  # no safetensors package: the reader of tools/v4_torch.py (no extra deps)
        sys.path.insert(0, os.path.join(HERE, "..", "tools"))
        from v4_torch import read_safetensors as load_file
    cfg = json.load(open(os.path.join(ckpt_dir, "config.json")))
    fields = M.ModelArgs.__dataclass_fields__
    kw = {k: v for k, v in cfg.items() if k in fields}
    kw["compress_ratios"] = tuple(cfg["compress_ratios"])
    kw["max_seq_len"] = max_seq_len
    kw["max_batch_size"] = 1
    kw["dtype"] = "bf16"  # Linear weights are made bf16, loaded bit-exactly, then widened below
    args = M.ModelArgs(**kw)
    model = M.Transformer(args)
    sd = {}
    for f in sorted(glob.glob(os.path.join(ckpt_dir, "model-*.safetensors"))):
        sd.update(load_file(f))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    shared = {"mtp.%d.embed.weight" % i for i in range(len(model.mtp))} | \
             {"mtp.%d.head.weight" % i for i in range(len(model.mtp))}
    if set(missing) - shared or unexpected:
        sys.exit("checkpoint/model mismatch: missing %s unexpected %s" %
                 (sorted(set(missing) - shared), sorted(unexpected)))
    if not len(model.mtp):
        sys.exit("the official model.py built no MTP block (n_mtp_layers=0?)")
    for p in model.parameters():
        if p.dtype.is_floating_point and p.dtype != torch.float32:
            p.data = p.data.float()
        elif p.dtype == torch.int32:  # hash-routing tables: torch < 2 gathers only with int64
            p.data = p.data.long()
    for name, b in model.named_buffers():
        if b.dtype.is_floating_point and b.dtype != torch.float32 and not b.is_complex():
            sys.exit("unexpected non-fp32 buffer %s %s" % (name, b.dtype))
    model.eval()
    return cfg, model


class Oracle:
    def __init__(self, M, model):
        import torch
        import torch.nn.functional as F
        self.torch, self.F, self.model, self.mtp = torch, F, model, model.mtp[0]
        self.captured = []
        # The official head sees (h, hc_fn, hc_scale, hc_base, norm): the main model and the MTP
        # block call the same ParallelHead with their own hc_head_* and norm.
        model.head.register_forward_pre_hook(lambda mod, a: self.captured.append(a))

    def reset(self):
        """Fresh caches, as a newly built model has them."""
        for name, b in self.model.named_buffers():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("kv_cache", "kv_state"):
                b.zero_()
            elif leaf == "score_state":
                b.fill_(float("-inf"))

    def _rows(self, official_last):
        torch, F = self.torch, self.F
        x, hc_fn, hc_scale, hc_base, norm = self.captured[-1]
        self.captured.clear()
        head = self.model.head
        rows = F.linear(norm(head.hc_head(x, hc_fn, hc_scale, hc_base)).float(), head.weight)[0]
        d = (rows[-1] - official_last[0].float()).abs().max().item()
        if d > 1e-4 * max(1.0, official_last.abs().max().item()):
            sys.exit("per-position head disagrees with the official head on the last row (%g)" % d)
        return rows, x

    def main(self, ids, start_pos):
        """Official Transformer.forward on ids (list) at start_pos -> (logits [T,V], h [1,T,hc,d])."""
        torch = self.torch
        with torch.inference_mode():
            out = self.model(torch.tensor([ids], dtype=torch.long), start_pos)
            rows, h = self._rows(out)
            return rows, h.clone()

    def mtp_rows(self, h, next_ids, start_pos):
        torch = self.torch
        with torch.inference_mode():
            out = self.mtp(h, start_pos, torch.tensor([next_ids], dtype=torch.long))
            return self._rows(out)[0]


def top2(row):
    v, i = row.topk(2)
    return int(i[0]), float(v[0] - v[1])


DIGITS = None  # --digits: significant digits kept in the JSON (None: every bit of the float)


def fl(row):
    if DIGITS is None:
        return [float(x) for x in row.tolist()]
    return [float("%.*g" % (DIGITS, x)) for x in row.tolist()]


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def run_case(o, tokens, prefill, with_mtp=True):
    """Return (logits [n,V] tensor, mtp logits [n-1,V] tensor or None)."""
    n = len(tokens)
    o.reset()
    rows, h = o.main(tokens[:prefill], 0)
    logits = [rows]
    mtp = []
    if with_mtp and prefill >= 2:
        mtp.append(o.mtp_rows(h[:, :prefill - 1], tokens[1:prefill], 0))
    last_h = h[:, prefill - 1:prefill]
    for i in range(prefill, n):
        rows, h = o.main(tokens[i:i + 1], i)
        logits.append(rows)
        if with_mtp:  # token i is known now: MTP row i-1 (main state at i-1, embedding of token i)
            mtp.append(o.mtp_rows(last_h, tokens[i:i + 1], i - 1))
        last_h = h
    logits = o.torch.cat(logits, 0)
    mtp = o.torch.cat(mtp, 0) if mtp else None
    assert logits.shape[0] == n and (mtp is None or mtp.shape[0] == n - 1)
    return logits, mtp


def run_greedy(o, prompt, steps):
    o.reset()
    rows, _ = o.main(prompt, 0)
    toks, margins = [], []
    pos = len(prompt)
    for s in range(steps):
        t, m = top2(rows[-1])
        toks.append(t)
        margins.append(m)
        if s + 1 < steps:
            rows, _ = o.main([t], pos)
            pos += 1
    return toks, margins


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="directory with DeepSeek's inference/model.py")
    ap.add_argument("--kernels", help="kernel module to use (default DIR/kernel.py if present, "
                    "else vectors/official_kernels.py)")
    ap.add_argument("--official-rev", default="60d8d70", help="upstream commit of model.py, for provenance")
    ap.add_argument("--checkpoint", default=os.path.join(HERE, "tiny"))
    ap.add_argument("--like", default=os.path.join(HERE, "vectors.json"),
                    help="existing vectors.json whose cases (tokens, prefill, positions) are rerun")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", help="cuda (falls back to cpu) or cpu")
    ap.add_argument("--digits", type=int, help="significant digits per logit (default all; 7 keeps "
                    "1e-7 relative, far under the check bars, in half the bytes)")
    ap.add_argument("--name", help="how the oracle line names the checkpoint (default its path)")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    a = ap.parse_args()
    global DIGITS
    DIGITS = a.digits

    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if a.device == "cuda" and not torch.cuda.is_available():
        a.device = "cpu"
    torch.set_default_dtype(torch.float32)
    if hasattr(torch, "set_default_device"):  # torch >= 2.0; older ones run on the CPU anyway
        torch.set_default_device(a.device)
    elif a.device != "cpu":
        sys.exit("torch %s has no set_default_device: use --device cpu" % torch.__version__)

    kernels = a.kernels or (os.path.join(a.official, "kernel.py") if os.path.exists(os.path.join(a.official, "kernel.py"))
                            else os.path.join(HERE, "official_kernels.py"))
    M = load_official(a.official, kernels)
    like = json.load(open(a.like))
    cases = like["cases"]
    need = max(len(c["tokens"]) + len(c.get("greedy", [])) for c in cases)
    max_seq_len = max(512, 128 * math.ceil((need + 1) / 128))
    cfg, model = build_model(M, a.checkpoint, max_seq_len)
    o = Oracle(M, model)
    msha = hashlib.sha256(open(os.path.join(a.official, "model.py"), "rb").read()).hexdigest()
    print("model.py sha256 %s, kernels %s, device %s, max_seq_len %d" % (msha, kernels, a.device, max_seq_len), flush=True)

    out = {k: v for k, v in like.items() if k != "cases"}
    # --like may describe another checkpoint (the random tiny one, for the trained one): then its
    # cases are only reused as inputs, its config is replaced and nothing is compared with it.
    same_model = like.get("config", {}).get("vocab_size") == cfg["vocab_size"]
    if "config" in like:
        out["config"] = {k: cfg.get(k, v) for k, v in like["config"].items()}
    if not same_model:
        out.pop("seed", None)
        print("--like describes another model (vocab %s, this one %d): its cases are inputs only" %
              (like.get("config", {}).get("vocab_size"), cfg["vocab_size"]), flush=True)
    out["oracle"] = ("DeepSeek V4 official inference/model.py @%s (sha256 %s), float32 on %s%s, "
                     "FP8 e4m3 KV and Hadamard+FP4 e2m1 indexer round trips with ue8m0 power-of-two "
                     "scales (pure-torch kernel ports), regenerated from the %s "
                     "checkpoint by vectors/gen_vectors.py on %s" %
                     (a.official_rev, msha[:12], a.device, " (TF32 off)" if a.device == "cuda" else "",
                      a.name or "shipped " + os.path.relpath(a.checkpoint), a.date))
    full = {}
    new_cases = []
    for c in cases:
        name = c["name"]
        if "greedy" in c:
            g, gm = run_greedy(o, c["tokens"], len(c["greedy"]))
            same = sum(x == y for x, y in zip(g, c["greedy"]))
            if same_model:
                print("%-20s greedy: %d/%d tokens as in --like, first difference at %s" %
                  (name, same, len(g), next((i for i, (x, y) in enumerate(zip(g, c["greedy"])) if x != y), None)), flush=True)
            nc = {k: v for k, v in c.items()}
            nc["greedy"], nc["greedy_margin"] = g, gm
            new_cases.append(nc)
            continue
        toks, prefill = c["tokens"], c["prefill"]
        logits, mtp = run_case(o, toks, prefill)
        full[(tuple(toks), prefill)] = logits
        nc = {}
        for k in c:  # keep key order
            nc[k] = c[k]
        am = [top2(r) for r in logits]
        nc["argmax"] = [x[0] for x in am]
        nc["margin"] = [x[1] for x in am]
        nc["logits"] = [fl(logits[p]) for p in c["check_positions"]]
        nc["mtp_logits"] = [fl(mtp[p]) for p in c["mtp_check_positions"]]
        nc["mtp_argmax"] = [int(r.argmax()) for r in mtp] if mtp is not None else []
        if not same_model:
            new_cases.append(nc)
            continue
        old0 = torch.tensor(c["logits"][0]) if c["check_positions"] and c["check_positions"][0] == 0 else None
        e = [rel_err(logits[p], torch.tensor(r)) for p, r in zip(c["check_positions"], c["logits"])]
        em = [rel_err(mtp[p], torch.tensor(r)) for p, r in zip(c["mtp_check_positions"], c["mtp_logits"])]
        agree = sum(x == y for x, y in zip(nc["argmax"], c["argmax"])) / len(c["argmax"])
        print("%-20s new vs --like: pos0 rel %.3e | rows median %.3e max %.3e | argmax agree %.1f%% | "
              "mtp rows median %s" % (name, rel_err(logits[0], old0) if old0 is not None else float("nan"),
                                      statistics.median(e), max(e), 100 * agree,
                                      "%.3e" % statistics.median(em) if em else "-"), flush=True)
        new_cases.append(nc)
    out["cases"] = new_cases

    # The oracle against itself: the longest case as one prefill call vs token-by-token decode.
    longest = max((c for c in cases if "greedy" not in c), key=lambda c: len(c["tokens"]))
    toks = longest["tokens"]
    n = len(toks)
    pre = full.get((tuple(toks), n)) if (tuple(toks), n) in full else run_case(o, toks, n, False)[0]
    dec = full.get((tuple(toks), 1)) if (tuple(toks), 1) in full else run_case(o, toks, 1, False)[0]
    errs = [rel_err(dec[i], pre[i]) for i in range(n)]
    out["prefill_vs_decode_rel_err"] = statistics.median(errs)
    print("prefill vs decode (%d tokens): median %.3e  max %.3e  (all rows)" % (n, statistics.median(errs), max(errs)))
    ce = [errs[p] for p in longest["check_positions"]]
    print("   at the check positions: median %.3e max %.3e" % (statistics.median(ce), max(ce)))

    with open(a.out, "w") as f:
        json.dump(out, f)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
