#!/usr/bin/env python3
"""Training data for the tiny DeepSeek V4, made from what this machine has (nothing fetched).

    python3 tools/make_train_data.py --out DIR [--ds4 ./ds4] [--vocab vectors/train-vocab.gguf]
                                     [--text-mb 6] [--convs 10000] [--seed 1]

Sources:
  * Python standard library sources and docstrings (/usr/lib/python3*/ *.py),
  * man pages (/usr/share/man/man*/ *.gz, troff markup stripped),
  * licence texts (/usr/share/common-licenses),
  * synthetic conversations in the official V4 chat encoding, rendered by ds4 itself
    (`ds4 --render-chat`, byte-exact to DeepSeek's encoder): a user asks for something one
    of a handful of tools does, the tools are in the system prompt the way the server renders
    OpenAI tools, the assistant answers with a DSML tool call, the tool result comes back, the
    assistant answers in prose; and plain chat turns (docstring questions, small Python
    functions), with and without a thinking block.

Held out for evaluation: whole stdlib modules and man pages (by a hash of the name), and for
the tool conversations (composed in tools/tool_convs.py: its docstring gives the design) a
disjoint template family of request frames and cores, tool *sets* (combinations) never
offered in training, and argument values (paths, cities, commands) never seen in training.

Everything is tokenized by ds4's own tokenizer (`ds4 --tokenize`, with the reduced
vocabulary), so the model learns exactly the ids the engine feeds it.

Writes DIR/train.bin and DIR/heldout.bin (uint16 token ids, little endian: stats.json's
id_bytes), DIR/train_names.bin (uint32 positions in train.bin of the called tool's name in each
training call, for its loss weight), DIR/heldout_text.txt and DIR/heldout_chat.txt (for
`ds4 --perplexity`), DIR/tool_eval.jsonl (held-out tool requests for eval_tiny.py: tools,
messages, expected tool and arguments; the six tools in turn), DIR/tool_val.json (other
held-out requests rendered and tokenized with their call, and the positions of the tool's
name: the checkpoint choice during training), DIR/train_words.txt (every word of the training
text, one a line), DIR/stats.json (token counts and the unigram
baseline perplexity of the held-out text). Standard library only; fixed seed.
"""
import argparse
import array
import ast
import glob
import gzip
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tool_convs as T  # noqa: E402
from make_vocab_gguf import mapped_to_bytes  # noqa: E402

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def held_out(name, percent=5):
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 100 < percent


# ---------------------------------------------------------------- natural text

def python_sources():
    files = sorted(glob.glob("/usr/lib/python3*/*.py") + glob.glob("/usr/lib/python3*/*/*.py"))
    return [f for f in files if "test" not in f and "site-packages" not in f]


def docstrings(path, src):
    """(qualified name, first paragraph of the docstring) for public functions."""
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return []
    mod = os.path.splitext(os.path.basename(path))[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            d = ast.get_docstring(node)
            if d:
                para = d.strip().split("\n\n")[0].strip()
                if 20 <= len(para) <= 400:
                    out.append(("%s.%s" % (mod, node.name), " ".join(para.split())))
    return out


def strip_troff(text):
    lines = []
    for ln in text.splitlines():
        if ln.startswith(".\\\"") or ln.startswith("'\\\""):
            continue
        if ln.startswith("."):
            words = ln.split(None, 1)
            if len(words) == 2 and words[0] in (".SH", ".SS", ".B", ".I", ".BR", ".IR", ".TP", ".IP"):
                ln = words[1]
            else:
                continue
        ln = re.sub(r"\\f[BIRP]|\\f\(..|\\\(..|\\[&e]|\\-", lambda m: "-" if m.group() == "\\-" else "", ln)
        ln = ln.replace('"', "") if ln.startswith(("SH", "SS")) else ln
        lines.append(ln)
    return "\n".join(lines)


def man_pages():
    return sorted(glob.glob("/usr/share/man/man[1-8]/*.gz"))


def read_man(path):
    try:
        with gzip.open(path, "rt", errors="replace") as f:
            return strip_troff(f.read())
    except (OSError, EOFError):
        return ""


def licences():
    out = []
    for p in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(p) and not os.path.islink(p):
            out.append((os.path.basename(p), open(p, errors="replace").read()))
    return out


# ---------------------------------------------------------------- tools and conversations
# The tool-call conversations are composed in tools/tool_convs.py (phrasings, tools,
# distractors, argument pools and the held-out template family).

SYSTEMS = T.SYSTEMS


CODE_TASKS = [
    ("reverses a string", "def reverse_string(s):\n    return s[::-1]"),
    ("adds two numbers", "def add(a, b):\n    return a + b"),
    ("returns the maximum of a list", "def maximum(items):\n    return max(items)"),
    ("checks whether a number is even", "def is_even(n):\n    return n % 2 == 0"),
    ("counts the words in a string", "def count_words(s):\n    return len(s.split())"),
    ("returns the factorial of n", "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n"
     "        result *= i\n    return result"),
    ("checks whether a string is a palindrome", "def is_palindrome(s):\n    return s == s[::-1]"),
    ("sums a list of numbers", "def total(numbers):\n    return sum(numbers)"),
    ("returns the first n Fibonacci numbers", "def fibonacci(n):\n    out = []\n    a, b = 0, 1\n"
     "    for _ in range(n):\n        out.append(a)\n        a, b = b, a + b\n    return out"),
    ("removes duplicates from a list", "def unique(items):\n    return list(dict.fromkeys(items))"),
    ("converts Celsius to Fahrenheit", "def to_fahrenheit(c):\n    return c * 9 / 5 + 32"),
    ("reads a file and returns its lines", "def read_lines(path):\n    with open(path) as f:\n"
     "        return f.read().splitlines()"),
    ("squares every number in a list", "def squares(numbers):\n    return [x * x for x in numbers]"),
    ("returns the length of a string", "def length(s):\n    return len(s)"),
    ("sorts a list of strings", "def sort_strings(items):\n    return sorted(items)"),
    ("counts the vowels in a string", "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s.lower())"),
]
CODE_ASK = ["Write a Python function that {t}.", "Can you write a function that {t}?",
            "Show me Python code that {t}.", "I need a Python function that {t}.",
            "Give me a small function which {t}.", "How do I write a function that {t} in Python?"]


def chat_conversation(rng, split, think, docs):
    if rng.random() < 0.5:
        task, code = rng.choice(CODE_TASKS)
        user = rng.choice(CODE_ASK[:-2] if split == 0 else CODE_ASK[-2:]).format(t=task)
        answer = "Here is a function that %s:\n\n```python\n%s\n```" % (task, code)
        why = "The user wants a Python function that %s. A short function will do." % task
    else:
        name, doc = rng.choice(docs)
        asks = ["What does %s do?", "Explain %s.", "What is %s for?", "Describe %s briefly.",
                "Tell me about %s."]
        user = rng.choice(asks[:-2] if split == 0 else asks[-2:]) % name
        answer = "`%s`: %s" % (name, doc)
        why = "The user asks about %s from the Python standard library." % name
    asst = {"role": "assistant", "content": answer}
    if think:
        asst["reasoning_content"] = why
    return {"messages": [{"role": "system", "content": rng.choice(SYSTEMS)},
                         {"role": "user", "content": user}, asst]}


def render(ds4, conv, think, tmpdir):
    path = os.path.join(tmpdir, "conv.json")
    with open(path, "w") as f:
        json.dump(conv, f)
    r = subprocess.run([ds4, "--render-chat", path, "--mode", "thinking" if think else "chat"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("ds4 --render-chat failed: " + r.stderr)
    return r.stdout


# ---------------------------------------------------------------- assembling, tokenizing

def tokenize(ds4, vocab, text, tmpdir):
    path = os.path.join(tmpdir, "text.txt")
    with open(path, "w") as f:
        f.write(text)
    r = subprocess.run([ds4, "--tokenize", path, "-m", vocab], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("ds4 --tokenize failed: " + r.stderr)
    return [int(x) for x in r.stdout.split()]


def write_ids(path, ids, typecode="H"):
    """Token ids, little endian: uint16 ("H", the 8192-token vocabulary fits) or int32 ("i")."""
    a = array.array(typecode, ids)
    if sys.byteorder != "little":
        a.byteswap()
    with open(path + ".tmp", "wb") as f:
        a.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def gguf_token_bytes(path):
    """The bytes each token id stands for, read from the vocabulary GGUF's
    tokenizer.ggml.tokens and token_type (control tokens are their own UTF-8 text, the others
    GPT-2 byte-mapped). Used to find where, in a token stream, a span of the text lies."""
    import struct
    data = open(path, "rb").read()
    pos = [8]

    def take(fmt):
        v = struct.unpack_from("<" + fmt, data, pos[0])
        pos[0] += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        n = take("Q")
        pos[0] += n
        return data[pos[0] - n:pos[0]].decode("utf-8")

    sizes = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
             12: "d"}

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        return take(sizes[t])

    take("Q")   # tensor count
    kv = {}
    for _ in range(take("Q")):
        k = string()
        kv[k] = value(take("I"))
    toks, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    return [t.encode() if ty == 3 else mapped_to_bytes(t) for t, ty in zip(toks, types)]


def byte_starts(ids, tok_bytes):
    """starts[k] = byte offset of token k in the decoded stream (len(ids)+1 entries)."""
    out, at = [0], 0
    for t in ids:
        at += len(tok_bytes[t])
        out.append(at)
    return out


def name_spans(rendered, name):
    """Byte spans of the tool's name in the first assistant turn (the call): its mention in
    the thinking and the DSML invoke. These are the tokens that choose the tool."""
    b = rendered.encode()
    start = b.index("<｜Assistant｜>".encode())
    end = b.index("</｜DSML｜invoke>".encode(), start)
    spans, at, n = [], start, name.encode()
    while True:
        k = b.find(n, at, end)
        if k < 0:
            return spans
        spans.append((k, k + len(n)))
        at = k + len(n)


def tokens_in_spans(starts, spans, base=0):
    """Indices of the tokens that overlap any byte span (spans relative to byte `base`)."""
    import bisect
    out = []
    for s, e in spans:
        k = bisect.bisect_right(starts, base + s) - 1
        while k < len(starts) - 1 and starts[k] < base + e:
            out.append(k)
            k += 1
    return out


def gather_text(rng, budget):
    """(train docs, held-out docs, docstring pairs for chat): plain text, each a document."""
    train, held, docs, used = [], [], [], 0
    srcs = python_sources()
    rng.shuffle(srcs)
    mans = man_pages()
    rng.shuffle(mans)
    for i, path in enumerate(srcs):
        src = open(path, errors="replace").read()
        docs += docstrings(path, src)
        if used < budget * 0.6:
            (held if held_out(path) else train).append(src[:40000])
            used += min(len(src), 40000)
    for path in mans:
        if used >= budget * 0.95:
            break
        t = read_man(path)[:20000]
        (held if held_out(path) else train).append(t)
        used += len(t)
    for name, t in licences():
        (held if held_out(name, 10) else train).append(t)
    return train, held, docs


def unigram_ppl(train_ids, held_ids, V):
    counts = [1] * V
    for t in train_ids:
        counts[t] += 1
    total = sum(counts)
    nll = -sum(math.log(counts[t] / total) for t in held_ids) / max(1, len(held_ids))
    return math.exp(nll)


def tool_records(a, rng, tmp):
    """Held-out tool requests: `eval` for eval_tiny.py (the six main tools in turn, each
    block of six in a random order, so any first 50 are balanced) and `val` (other draws of
    the same held-out family) rendered with the call, for the checkpoint choice in training."""
    evals, val = [], []
    for i in range(a.eval_requests + a.val_requests):
        if i % len(T.MAIN) == 0:
            order = list(T.MAIN)
            rng.shuffle(order)
        think = rng.random() < 0.5
        conv, ev = T.tool_conversation(rng, 1, think, order[i % len(T.MAIN)])
        if i < a.eval_requests:
            ev.update(messages=conv["messages"][:2], tools=conv["tools"], think=think)
            evals.append(ev)
        else:
            conv["messages"] = conv["messages"][:3]
            text = render(a.ds4, conv, think, tmp)
            val.append((text, ev["tool"]))
    return evals, val


def val_rows(a, val, tok_bytes, tmp):
    """[{"ids": prompt and call, "name": token positions of the tool's name}]."""
    rows = []
    for text, name in val:
        ids = tokenize(a.ds4, a.vocab, text, tmp)
        starts = byte_starts(ids, tok_bytes)
        if starts[-1] != len(text.encode()):
            sys.exit("token bytes do not add up to the rendered text")
        pos = tokens_in_spans(starts, name_spans(text, name))
        rows.append({"tool": name, "ids": ids, "name": pos})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ds4", default="./ds4")
    ap.add_argument("--vocab", default="vectors/train-vocab.gguf")
    ap.add_argument("--text-mb", type=float, default=6.0, help="bytes of natural text to gather (MB)")
    ap.add_argument("--convs", type=int, default=10000, help="training conversations")
    ap.add_argument("--tool-share", type=float, default=0.65, help="share of tool conversations")
    ap.add_argument("--eval-convs", type=int, default=200, help="held-out conversations")
    ap.add_argument("--eval-requests", type=int, default=120, help="held-out tool requests (eval)")
    ap.add_argument("--val-requests", type=int, default=96,
                    help="held-out tool requests rendered with their call (checkpoint choice)")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ds4-data.") as tmp:   # removed at the end
        build(a, rng, tmp)


def build(a, rng, tmp):
    """Everything main() describes, into a.out; tmp holds the files handed to ds4."""
    tok_bytes = gguf_token_bytes(a.vocab)

    train_docs, held_docs, docs = gather_text(rng, a.text_mb * 1e6)
    rng.shuffle(docs)
    doc_train, doc_held = [d for d in docs if not held_out(d[0])], [d for d in docs if held_out(d[0])]

    # Training pieces: (text, tool name or None). The tool's name tokens get their own loss
    # weight in training (DIR/train_names.bin lists their positions).
    pieces, held_chat = [(BOS + t + EOS, None) for t in train_docs], []
    n_tool = 0
    for i in range(a.convs + a.eval_convs):
        split = 0 if i < a.convs else 1
        think = rng.random() < 0.5
        name = None
        if rng.random() < a.tool_share:
            conv, ev = T.tool_conversation(rng, split, think)
            name = ev["tool"]
            n_tool += split == 0
        else:
            conv = chat_conversation(rng, split, think, doc_train if split == 0 else doc_held)
        text = render(a.ds4, conv, think, tmp)
        if split == 0:
            pieces.append((text, name))
        else:
            held_chat.append(text)
    evals, val = tool_records(a, rng, tmp)
    rng.shuffle(pieces)

    train_text = "".join(t for t, _ in pieces)
    held_text = "".join(BOS + t + EOS for t in held_docs)
    ids_train = tokenize(a.ds4, a.vocab, train_text, tmp)
    starts = byte_starts(ids_train, tok_bytes)
    if starts[-1] != len(train_text.encode()):
        sys.exit("token bytes do not add up to the training text")
    names, base = [], 0
    for text, name in pieces:
        if name:
            names += tokens_in_spans(starts, name_spans(text, name), base)
        base += len(text.encode())
    ids_held_text = tokenize(a.ds4, a.vocab, held_text, tmp)
    ids_held_chat = tokenize(a.ds4, a.vocab, "".join(held_chat), tmp)
    write_ids(os.path.join(a.out, "train.bin"), ids_train)
    write_ids(os.path.join(a.out, "train_names.bin"), names, "I")
    write_ids(os.path.join(a.out, "heldout.bin"), ids_held_text + ids_held_chat)
    # For --perplexity: plain held-out text without the BOS/EOS markers (ds4 adds BOS per window).
    with open(os.path.join(a.out, "heldout_text.txt"), "w") as f:
        f.write("\n\n".join(held_docs)[:200000])
    with open(os.path.join(a.out, "heldout_chat.txt"), "w") as f:
        f.write("".join(held_chat)[:200000])
    with open(os.path.join(a.out, "tool_eval.jsonl"), "w") as f:
        for ev in evals:
            f.write(json.dumps(ev) + "\n")
    with open(os.path.join(a.out, "tool_val.json"), "w") as f:
        json.dump(val_rows(a, val, tok_bytes, tmp), f, separators=(",", ":"))
    # The words of the training text, for the test that greedy output is made of them.
    words = sorted(set(re.findall(r"[A-Za-z_]+", train_text)))
    with open(os.path.join(a.out, "train_words.txt"), "w") as f:
        f.write("\n".join(words) + "\n")
    V = max(ids_train + [0]) + 1
    held_plain = tokenize(a.ds4, a.vocab, open(os.path.join(a.out, "heldout_text.txt")).read(), tmp)
    stats = {"train_tokens": len(ids_train), "heldout_text_tokens": len(ids_held_text),
             "heldout_chat_tokens": len(ids_held_chat), "train_conversations": a.convs,
             "train_tool_conversations": n_tool, "train_name_tokens": len(names),
             "heldout_conversations": len(held_chat), "tool_eval_requests": len(evals),
             "tool_val_requests": len(val), "request_shapes": T.counts(),
             "train_documents": len(train_docs), "heldout_documents": len(held_docs),
             "unigram_ppl_heldout_text": unigram_ppl(ids_train, held_plain, 8192),
             "unigram_ppl_heldout_chat": unigram_ppl(ids_train, ids_held_chat, 8192),
             "id_bytes": 2, "max_id": V - 1, "seed": a.seed}
    with open(os.path.join(a.out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
