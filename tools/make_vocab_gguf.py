#!/usr/bin/env python3
"""Build vocabulary-only GGUF files for ds4 from DeepSeek's tiktoken table.

Usage:
    python3 tools/make_vocab_gguf.py --tiktoken deepseek_v3.tiktoken \\
        --out vectors/ds4-vocab.gguf --tiny-out vectors/tiny-vocab.gguf

Standard library only.

INPUT.  deepseek_v3.tiktoken has one line per base token, "BASE64 RANK", ranks
0..127999, rank == token id.  The base64 decodes to the token's string in
GPT-2 byte-to-unicode form (a space is U+0120 "Ġ"), except ids 0..2 which are
the literal BOS/EOS/pad strings.  There is no merges list.

MERGES.  A byte-level BPE in the HF/GGUF style needs merges "LEFT RIGHT" in
priority order.  tiktoken instead merges the adjacent pair whose
*concatenation* has the lowest rank.  The usual conversion: for every token T
of two or more bytes, run tiktoken's BPE on T's bytes while only allowing
tokens of rank < rank(T).  It stops at exactly two parts (L, R) and then
"L R" is the merge that creates T; its position in the list is T's rank
order.  We check that every multi-byte token splits into exactly two parts.

SPECIAL TOKENS.  Ids 128000..129279 are added tokens.  The named ones come
from docs/dsv4-format.md §3.5 (V4 tokenizer tests and the V3 tokenizer
config); every other id in that range is a filler "<｜place▁holder▁no▁N｜>"
with N = id - 128000, the V3 convention.  (Later V4.1 vocabularies put
multimodal span placeholders at 128847..129279; no V4-Flash tool ever emits
or parses them, so only their spelling differs.)

OUTPUT.  GGUF v3, zero tensors, these keys:
    general.architecture        "deepseek4"
    general.name                "ds4 vocabulary"
    tokenizer.ggml.model        "gpt2"
    tokenizer.ggml.pre          "deepseek-v3"
    tokenizer.ggml.tokens       [string]   index = token id
    tokenizer.ggml.token_type   [int32]    1 normal, 3 control (added tokens)
    tokenizer.ggml.merges       [string]   index = merge rank
    tokenizer.ggml.bos_token_id u32 0
    tokenizer.ggml.eos_token_id u32 1
    tokenizer.ggml.padding_token_id u32 1   (HF uses EOS as pad)
"""
import argparse
import base64
import struct

VOCAB_SIZE = 129280

# Named added tokens of DeepSeek V4 (ids from dsv4-format.md §3.5).
NAMED_SPECIALS = {
    0: "<｜begin▁of▁sentence｜>",
    1: "<｜end▁of▁sentence｜>",
    2: "<｜▁pad▁｜>",
    128800: "<｜fim▁hole｜>",
    128801: "<｜fim▁begin｜>",
    128802: "<｜fim▁end｜>",
    128803: "<｜User｜>",
    128804: "<｜Assistant｜>",
    128805: "<|EOT|>",
    128806: "<｜tool▁calls▁begin｜>",
    128807: "<｜tool▁calls▁end｜>",
    128808: "<｜tool▁call▁begin｜>",
    128809: "<｜tool▁call▁end｜>",
    128810: "<｜tool▁outputs▁begin｜>",
    128811: "<｜tool▁outputs▁end｜>",
    128812: "<｜tool▁output▁begin｜>",
    128813: "<｜tool▁output▁end｜>",
    128814: "<｜tool▁sep｜>",
    128815: "<｜begin▁of▁repo▁name｜>",
    128816: "<｜end▁of▁repo▁name｜>",
    128817: "<｜begin▁of▁file▁name｜>",
    128818: "<｜end▁of▁file▁name｜>",
    128819: "<｜begin▁of▁file｜>",
    128820: "<｜end▁of▁file｜>",
    128821: "<think>",
    128822: "</think>",
    128823: "<｜place▁holder▁for▁copy｜>",
    128824: "<｜place▁holder▁for▁pointer▁replace｜>",
    128825: "｜DSML｜",
    128826: "<｜begin▁sys｜>",
    128827: "<｜end▁sys｜>",
    128828: "<｜latest_reminder｜>",
    128829: "<｜action｜>",
    128830: "<｜query｜>",
    128831: "<｜authority｜>",
    128832: "<｜domain｜>",
    128833: "<｜task｜>",
    128834: "<｜political｜>",
    128835: "<｜entity｜>",
    128836: "<｜title｜>",
    128837: "<｜safety｜>",
    128838: "<｜answer｜>",
    128839: "<｜search｜>",
    128840: "<dsml:",
    128841: "</dsml:",
    128842: "<｜search▁begin｜>",
    128843: "<｜search▁end｜>",
    128844: "<｜extracted_url｜>",
    128845: "<｜read_url｜>",
    128846: "<｜end_of_query｜>",
}

TOKEN_NORMAL, TOKEN_CONTROL = 1, 3


def bytes_to_unicode():
    """GPT-2's reversible byte <-> printable-code-point map."""
    keep = (list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) +
            list(range(0xAE, 0x100)))
    table = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def mapped_to_bytes(s):
    return bytes(CHAR_TO_BYTE[c] for c in s)


def bytes_to_mapped(b):
    return "".join(BYTE_TO_CHAR[x] for x in b)


def read_tiktoken(path):
    """Returns {id: mapped_string} for every line of the file."""
    out = {}
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            b64, rank = line.split()
            out[int(rank)] = base64.b64decode(b64).decode("utf-8")
    return out


def split_for_merge(token, ranks, max_rank):
    """tiktoken BPE on `token` using only ranks < max_rank."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def derive_merges(base):
    """base: {id: raw bytes} for the BPE tokens. Returns merges in rank order."""
    ranks = {b: i for i, b in base.items()}
    merges = []
    for rank in sorted(base):
        tok = base[rank]
        if len(tok) < 2:
            continue
        parts = split_for_merge(tok, ranks, rank)
        if len(parts) != 2:
            raise SystemExit("token %d %r does not split into two parts: %r"
                             % (rank, tok, parts))
        merges.append(bytes_to_mapped(parts[0]) + " " + bytes_to_mapped(parts[1]))
    return merges


# ---- GGUF v3 writer ------------------------------------------------------

GGUF_UINT32, GGUF_INT32, GGUF_STRING, GGUF_ARRAY = 4, 5, 8, 9


def gguf_str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def kv_string(key, value):
    return gguf_str(key) + struct.pack("<I", GGUF_STRING) + gguf_str(value)


def kv_u32(key, value):
    return gguf_str(key) + struct.pack("<II", GGUF_UINT32, value)


def kv_str_array(key, values):
    body = b"".join(gguf_str(v) for v in values)
    return (gguf_str(key) + struct.pack("<IIQ", GGUF_ARRAY, GGUF_STRING, len(values)) + body)


def kv_i32_array(key, values):
    body = struct.pack("<%di" % len(values), *values)
    return (gguf_str(key) + struct.pack("<IIQ", GGUF_ARRAY, GGUF_INT32, len(values)) + body)


def write_gguf(path, name, tokens, types, merges):
    kvs = [
        kv_string("general.architecture", "deepseek4"),
        kv_string("general.name", name),
        kv_string("tokenizer.ggml.model", "gpt2"),
        kv_string("tokenizer.ggml.pre", "deepseek-v3"),
        kv_str_array("tokenizer.ggml.tokens", tokens),
        kv_i32_array("tokenizer.ggml.token_type", types),
        kv_str_array("tokenizer.ggml.merges", merges),
        kv_u32("tokenizer.ggml.bos_token_id", 0),
        kv_u32("tokenizer.ggml.eos_token_id", 1),
        kv_u32("tokenizer.ggml.padding_token_id", 1),
    ]
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs)
    data += b"\0" * ((32 - len(data) % 32) % 32)  # data section alignment
    with open(path, "wb") as f:
        f.write(data)
    print("wrote %s: %d tokens, %d merges, %d bytes" % (path, len(tokens), len(merges), len(data)))


def build_full(table):
    base = {i: mapped_to_bytes(s) for i, s in table.items() if i >= 3}
    assert len(base) == 127997 and min(base) == 3 and max(base) == 127999
    assert sorted(len(b) for b in base.values())[:256] == [1] * 256
    merges = derive_merges(base)
    tokens, types = [], []
    for i in range(VOCAB_SIZE):
        if i in NAMED_SPECIALS:
            tokens.append(NAMED_SPECIALS[i])
            types.append(TOKEN_CONTROL)
        elif i < 128000:
            tokens.append(table[i])
            types.append(TOKEN_NORMAL)
        else:
            tokens.append("<｜place▁holder▁no▁%d｜>" % (i - 128000))
            types.append(TOKEN_CONTROL)
    assert len(set(tokens)) == VOCAB_SIZE
    return tokens, types, merges


def build_tiny(tokens, types, merges, size=2048):
    """A `size`-token vocabulary for a tiny model (2048 for vectors/tiny).

    Ids 0..2 are BOS/EOS/pad, ids 3..258 the 256 single bytes (same order as
    the real vocabulary), then the earliest real merges, which only ever use
    earlier tokens, so the prefix of the real merge list is self-contained.
    The named V4 special tokens (<｜User｜>, <think>, ｜DSML｜, ...) fill the
    top ids, so the whole chat path runs on the tiny model."""
    specials = [NAMED_SPECIALS[i] for i in sorted(NAMED_SPECIALS) if i >= 128000]
    n_merges = size - 259 - len(specials)
    t = tokens[:259 + n_merges] + specials
    ty = types[:259 + n_merges] + [TOKEN_CONTROL] * len(specials)
    # token id 259 + k is created by merge k in the real vocabulary; check it.
    for k in range(n_merges):
        left, right = merges[k].split(" ")
        assert left + right == tokens[259 + k], (k, merges[k], tokens[259 + k])
    assert len(t) == size
    return t, ty, merges[:n_merges]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiktoken", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny-out")
    ap.add_argument("--tiny-size", type=int, default=2048,
                    help="tokens in the --tiny-out vocabulary (2048 for vectors/tiny, 8192 for "
                         "the trained model)")
    a = ap.parse_args()
    table = read_tiktoken(a.tiktoken)
    tokens, types, merges = build_full(table)
    write_gguf(a.out, "ds4 vocabulary (DeepSeek V4)", tokens, types, merges)
    if a.tiny_out:
        t, ty, m = build_tiny(tokens, types, merges, a.tiny_size)
        write_gguf(a.tiny_out, "ds4 tiny vocabulary", t, ty, m)


if __name__ == "__main__":
    main()
