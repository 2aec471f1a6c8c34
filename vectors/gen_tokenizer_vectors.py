#!/usr/bin/env python3
"""Reference tokenizer vectors for ds4, from an implementation independent of ours.

Usage:
    python3 vectors/gen_tokenizer_vectors.py --tiktoken deepseek_v3.tiktoken \\
        --out vectors/tokenizer_vectors.json

How the reference ids are made:
  * pre-tokenization: Python's `regex` module runs DeepSeek's three official
    Split(Isolated) patterns (tokenizer.json of DeepSeek V3/V4) one after the
    other, each on every piece of the previous stage;
  * BPE: `tiktoken` encodes every piece with the 128,000-rank table
    (rank == token id), tiktoken's own merge-by-rank algorithm.
Special tokens (only in cases marked "special": true) are split out first,
leftmost-longest, as HF tokenizers does for added tokens.

Input bytes that are not valid UTF-8 are decoded with `surrogateescape`: each
bad byte becomes a lone surrogate, which belongs to no regex class used here,
and is turned back into its byte before BPE.  ds4 does the same thing with
raw bytes.

A second, pure-Python BPE that applies the *merges list* (HF semantics, the
merges derived exactly as tools/make_vocab_gguf.py does) runs too.  If the two
disagree on a case, the case gets "ids_merges" as well and a flag; ds4 follows
the merges list, which is what a GGUF carries.
"""
import argparse
import base64
import json
import random
import sys

import regex

try:
    import tiktoken
except ImportError:  # the generator still runs, marked as not independent
    tiktoken = None

STAGES = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]
COMPILED = [regex.compile(p) for p in STAGES]

SPECIALS = {
    "<｜begin▁of▁sentence｜>": 0, "<｜end▁of▁sentence｜>": 1, "<｜▁pad▁｜>": 2,
    "<｜User｜>": 128803, "<｜Assistant｜>": 128804, "<think>": 128821,
    "</think>": 128822, "｜DSML｜": 128825, "<｜latest_reminder｜>": 128828,
    "<｜begin▁sys｜>": 128826, "<|EOT|>": 128805, "<｜fim▁hole｜>": 128800,
}


def byte_map():
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    t, extra = {}, 0
    for b in range(256):
        if b in keep:
            t[b] = chr(b)
        else:
            t[b] = chr(256 + extra)
            extra += 1
    return t


BYTE_TO_CHAR = byte_map()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def load_ranks(path):
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            b64, r = line.split()
            r = int(r)
            if r < 3:
                continue  # BOS/EOS/pad are added tokens, not BPE tokens
            s = base64.b64decode(b64).decode("utf-8")
            ranks[bytes(CHAR_TO_BYTE[c] for c in s)] = r
    return ranks


def pretokenize(text):
    pieces = [text]
    for pat in COMPILED:
        nxt = []
        for p in pieces:
            pos = 0
            for m in pat.finditer(p):
                if m.start() > pos:
                    nxt.append(p[pos:m.start()])
                if m.end() > m.start():
                    nxt.append(m.group())
                pos = m.end()
            if pos < len(p):
                nxt.append(p[pos:])
        pieces = nxt
    return pieces


def tiktoken_like_bpe(piece, ranks):
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, bi = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, bi = r, i
        if best is None:
            break
        parts[bi:bi + 2] = [parts[bi] + parts[bi + 1]]
    return [ranks[p] for p in parts]


def derive_pair_ranks(ranks):
    """(left, right) -> merge rank, as tools/make_vocab_gguf.py derives them."""
    pair_rank = {}
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        parts = [tok[i:i + 1] for i in range(len(tok))]
        while len(parts) > 2:
            best, bi = None, -1
            for i in range(len(parts) - 1):
                x = ranks.get(parts[i] + parts[i + 1])
                if x is not None and x < r and (best is None or x < best):
                    best, bi = x, i
            if best is None:
                break
            parts[bi:bi + 2] = [parts[bi] + parts[bi + 1]]
        assert len(parts) == 2
        pair_rank[(parts[0], parts[1])] = r
    return pair_rank


def merges_bpe(piece, ranks, pair_rank):
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, bi = None, -1
        for i in range(len(parts) - 1):
            r = pair_rank.get((parts[i], parts[i + 1]))
            if r is not None and (best is None or r < best):
                best, bi = r, i
        if best is None:
            break
        parts[bi:bi + 2] = [parts[bi] + parts[bi + 1]]
    return [ranks[p] for p in parts]


class Reference:
    def __init__(self, path):
        self.ranks = load_ranks(path)
        self.pair_rank = derive_pair_ranks(self.ranks)
        self.enc = None
        if tiktoken is not None:
            self.enc = tiktoken.Encoding(
                name="deepseek_v3_pieces", pat_str=r"[\s\S]+",
                mergeable_ranks=self.ranks, special_tokens={})

    def bpe_tiktoken(self, piece_bytes):
        if self.enc is None:
            return tiktoken_like_bpe(piece_bytes, self.ranks)
        if hasattr(self.enc, "_encode_single_piece"):
            return list(self.enc._encode_single_piece(piece_bytes))
        return list(self.enc._core_bpe.encode_single_piece(piece_bytes))

    def encode(self, data, special):
        """data: bytes. Returns (pieces as bytes, ids, ids_merges)."""
        text = data.decode("utf-8", errors="surrogateescape")
        chunks = [(text, False)]
        if special:
            alt = "|".join(regex.escape(s) for s in sorted(SPECIALS, key=len, reverse=True))
            chunks, pos = [], 0
            for m in regex.finditer(alt, text):
                if m.start() > pos:
                    chunks.append((text[pos:m.start()], False))
                chunks.append((m.group(), True))
                pos = m.end()
            if pos < len(text):
                chunks.append((text[pos:], False))
        pieces, ids, ids_m = [], [], []
        for chunk, is_special in chunks:
            if is_special:
                pieces.append(chunk.encode("utf-8"))
                ids.append(SPECIALS[chunk])
                ids_m.append(SPECIALS[chunk])
                continue
            for p in pretokenize(chunk):
                pb = p.encode("utf-8", errors="surrogateescape")
                pieces.append(pb)
                ids.extend(self.bpe_tiktoken(pb))
                ids_m.extend(merges_bpe(pb, self.ranks, self.pair_rank))
        return pieces, ids, ids_m


# ---- test strings ----------------------------------------------------------

FIXED = [
    ("english", "Hello world"),
    ("english", "The quick brown fox jumps over the lazy dog."),
    ("english", "Rispondi in italiano con una frase: chi era Ada Lovelace?"),
    ("english", "I'm sure you'll see they've done it, haven't they? Don't."),
    ("english", "  leading spaces and trailing   "),
    ("english", "Mr. O'Neil's e-mail: john.doe@example.com (urgent!!!)"),
    ("english", "CamelCaseWord snake_case_word kebab-case-word UPPERCASE"),
    ("code", "#include <stdio.h>\nint main(void) {\n    printf(\"hi\\n\");\n    return 0;\n}\n"),
    ("code", "def f(x):\n\treturn x ** 2 + 3*x - 1  # comment\n\n\nprint(f(10))\n"),
    ("code", "for (int i = 0; i < n; i++) { a[i] += b[i] * c; }"),
    ("code", "const x = {\"key\": [1, 2, 3], 'b': null};\r\n"),
    ("code", "    if (x) {\n        y();\n    }\n    \n"),
    ("code", "<div class=\"a\">&nbsp;</div><!-- c -->"),
    ("code", "$ ls -la ~/.config | grep -v '^d' >> out.txt 2>&1"),
    ("code", "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }"),
    ("code", "SELECT * FROM t WHERE a >= 10 AND b <> 'x';"),
    ("code", "x=>y;a->b;c::d;e...f;g?.h;i??j;k!==l;"),
    ("code", "```json\n{\"a\": 1}\n```"),
    ("digits", "2048"),
    ("digits", " 2048"),
    ("digits", "1234567890123"),
    ("digits", "3.14159265358979"),
    ("digits", "pi=3.14, e=2.718, year 2026, 1,000,000"),
    ("digits", "v1.2.3-rc4 0x7fffffff 1e-10 -42"),
    ("digits", "١٢٣٤٥ ०१२३ ½ ² ③ Ⅻ 〇"),
    ("digits", "12abc34def567ghi8901"),
    ("whitespace", " "),
    ("whitespace", "   "),
    ("whitespace", "\n"),
    ("whitespace", "\n\n\n"),
    ("whitespace", "a\n\nb"),
    ("whitespace", "a \n b"),
    ("whitespace", "a  \n\n  b"),
    ("whitespace", "\t\t\tx"),
    ("whitespace", "x\r\n\r\ny"),
    ("whitespace", "a\u00a0b\u3000c\u2003d"),
    ("whitespace", "end with spaces    "),
    ("whitespace", "  \t \n \t  "),
    ("whitespace", "word\u2028next\u2029para"),
    ("cjk", "你好，世界！"),
    ("cjk", "该助手为DeepSeek，由深度求索公司创造。"),
    ("cjk", "小柴胡冲剂和布洛芬能一起吃吗？"),
    ("cjk", "日本語のテキストです。カタカナとひらがな。"),
    ("cjk", "한국어 텍스트입니다."),
    ("cjk", "中文English混合text测试123数字"),
    ("cjk", "【{cursor_id}†L{start_line_id}(-L{end_line_id})?】"),
    ("cjk", "2026-02-21,星期六,广州,App,中文"),
    ("cjk", "龦龥𠀀𪜀 㐀 豈"),
    ("emoji", "😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇮🇹"),
    ("emoji", "I ❤️ Unicode ✨🚀!"),
    ("emoji", "⚠️ Warning: ©®™ ★☆ ♠♥"),
    ("mixed", "Привет, мир! Γειά σου κόσμε. שלום עולם. مرحبا بالعالم"),
    ("mixed", "नमस्ते दुनिया। ทดสอบภาษาไทย"),
    ("mixed", "Café naïve façade résumé — “quotes” ‘single’ «guillemets»"),
    ("mixed", "e\u0301 a\u0308 combining: \u0301\u0302x"),
    ("mixed", "Ünïcödé ÄÖÜ ß ẞ ǅ ﬁ"),
    ("mixed", "math: ∀x∈ℝ, x²≥0 ⇒ √x ∈ ℝ⁺ ∑∫∂"),
    ("mixed", "…—–‐‑‒―•·"),
    ("mixed", "\u200b\u200c\u200d\ufeff zero width"),
    ("mixed", "tab\there, bell\x07, nul\x00, esc\x1b[0m"),
    ("mixed", "\x1c\x1d\x1e\x1f separators"),
    ("mixed", "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ１２３！"),
    ("mixed", "<｜User｜>Hello<｜Assistant｜>"),
    ("mixed", "｜DSML｜ <｜DSML｜invoke name=\"x\">"),
]

SPECIAL_CASES = [
    "<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>",
    "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Capital of Italy?<｜Assistant｜></think>",
    "</｜DSML｜parameter>\n<｜DSML｜invoke name=\"get_weather\">",
    "<think><think></think>x</think>",
    "a<｜User｜b<｜User｜>c",
    "<｜latest_reminder｜>2026<｜begin▁sys｜>x<|EOT|>",
]

INVALID = [
    b"\xff",
    b"abc\xffdef",
    b"\xc3\x28",
    b"\xe4\xbd",
    b"\xe4\xbd a",
    b"\xed\xa0\x80",
    b"\xf0\x9f\x98",
    b"\xc0\xaf overlong",
    b"\x80\x81\x82 stray continuations",
    b"\xf5\x80\x80\x80",
    b"ok \xe4\xbd\xa0\xe5\xa5 half",
    b"\xef\xbd\x9cDSML\xef\xbd",
    b"  \xfe\xfe  \n",
    b"123\xff456",
]

POOLS = [
    (0x20, 0x7E), (0x20, 0x7E), (0x20, 0x7E), (0x30, 0x39), (0xA0, 0xFF),
    (0x100, 0x17F), (0x300, 0x36F), (0x391, 0x3C9), (0x410, 0x44F),
    (0x5D0, 0x5EA), (0x620, 0x64A), (0x660, 0x669), (0x900, 0x97F),
    (0xE01, 0xE3A), (0x2000, 0x206F), (0x2190, 0x21FF), (0x2200, 0x22FF),
    (0x3000, 0x303F), (0x3040, 0x30FF), (0x4E00, 0x9FA5), (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3), (0xFF01, 0xFF5E), (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF),
]
WS = [" ", " ", " ", "\n", "\t", "  ", "\r\n", "\n\n", "\u00a0"]


def random_text(rng, n):
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.25:
            out.append(rng.choice(WS))
        else:
            a, b = rng.choice(POOLS)
            cp = rng.randint(a, b)
            if 0xD800 <= cp <= 0xDFFF:
                cp = 0x41
            out.append(chr(cp))
    return "".join(out)


def long_texts():
    para = ("DeepSeek V4 Flash is a mixture-of-experts model. It has 43 layers, "
            "256 experts and a 1,048,576-token context window.\n\n")
    code = "".join("static int f%d(int x) {\n    return x * %d + %d;\n}\n\n" % (i, i, i * 7)
                   for i in range(300))
    cjk = "深度求索的模型支持长上下文。" * 200
    ws = ("a" + " " * 37 + "\n" * 5 + "\t" * 9) * 60
    digits = "".join(str(i) for i in range(3000))
    return [("long", para * 60), ("long", code), ("long", cjk), ("long", ws),
            ("long", digits), ("long", "x" * 5000), ("long", "😀" * 1000)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiktoken", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--random", type=int, default=300)
    ap.add_argument("--seed", type=int, default=4)
    a = ap.parse_args()

    ref = Reference(a.tiktoken)
    cases = []

    def add(kind, data, special=False):
        pieces, ids, ids_m = ref.encode(data, special)
        c = {"kind": kind, "hex": data.hex(), "special": special,
             "pieces": [p.hex() for p in pieces], "ids": ids}
        try:
            c["text"] = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        if ids_m != ids:
            c["ids_merges"] = ids_m
        cases.append(c)

    for kind, s in FIXED:
        add(kind, s.encode("utf-8"))
    for s in SPECIAL_CASES:
        add("special", s.encode("utf-8"), special=True)
    for b in INVALID:
        add("invalid_utf8", b)
    for kind, s in long_texts():
        add(kind, s.encode("utf-8"))
    rng = random.Random(a.seed)
    for _ in range(a.random):
        add("random", random_text(rng, rng.randint(1, 80)).encode("utf-8"))

    # Which code points below U+3100 does regex's \s match?  ds4 uses the
    # Unicode White_Space property; record the reference's view for the note.
    ws = [cp for cp in range(0x3100) if regex.match(r"\s", chr(cp))]
    meta = {
        "generator": "vectors/gen_tokenizer_vectors.py",
        "python": sys.version.split()[0],
        "regex": getattr(regex, "__version__", "?"),
        "tiktoken": getattr(tiktoken, "__version__", None) if tiktoken else None,
        "independent_bpe": ref.enc is not None,
        "stages": STAGES,
        "regex_whitespace_below_3100": ws,
        "n_cases": len(cases),
        "n_merges_semantics_differ": sum(1 for c in cases if "ids_merges" in c),
    }
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "cases": cases}, f, ensure_ascii=False, indent=0)
    print(json.dumps(meta, ensure_ascii=False))


if __name__ == "__main__":
    main()
