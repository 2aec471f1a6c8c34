#!/usr/bin/env python3
"""Training data for the tiny DeepSeek V4, made from what this machine has (nothing fetched).

    python3 tools/make_train_data.py --out DIR [--ds4 ./ds4] [--vocab vectors/train-vocab.gguf]
                                     [--text-mb 6] [--convs 4000] [--seed 1]

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

Held out for evaluation: whole stdlib modules and man pages (by a hash of the name), the
conversation phrasings marked held-out below, tool *sets* (combinations) never offered in
training, and argument values (paths, cities, commands) never seen in training.

Everything is tokenized by ds4's own tokenizer (`ds4 --tokenize`, with the reduced
vocabulary), so the model learns exactly the ids the engine feeds it.

Writes DIR/train.bin and DIR/heldout.bin (int32 token ids, little endian), DIR/heldout_text.txt
and DIR/heldout_chat.txt (for `ds4 --perplexity`), DIR/tool_eval.jsonl (held-out tool requests:
tools, messages, expected tool and arguments), DIR/train_words.txt (every word of the training
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

def tool(name, desc, props, required):
    return {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": props, "required": required}}}


S = lambda d: {"type": "string", "description": d}
TOOLS = {
    "read_file": tool("read_file", "Read a text file and return its contents", {"path": S("Path of the file")}, ["path"]),
    "list_dir": tool("list_dir", "List the entries of a directory", {"path": S("Directory to list")}, ["path"]),
    "run_command": tool("run_command", "Run a shell command and return its output",
                        {"command": S("The command line to run")}, ["command"]),
    "get_weather": tool("get_weather", "Get the current weather for a city",
                        {"location": S("The city name"),
                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                                  "description": "Temperature unit"}}, ["location"]),
    "search": tool("search", "Search the web for information",
                   {"query": S("Search query"),
                    "num_results": {"type": "integer", "description": "Number of results"}}, ["query"]),
    "write_file": tool("write_file", "Write text to a file", {"path": S("Path of the file"),
                                                             "content": S("Text to write")}, ["path", "content"]),
}

# Phrasings: the last two of each list are held out.
ASK = {
    "read_file": ["Show me the contents of {path}.", "What is in {path}?", "Can you read {path} for me?",
                  "Please open {path} and tell me what it says.", "Read the file {path}.",
                  "I need to see {path}.", "Print {path}, please.", "Could you look inside {path}?"],
    "list_dir": ["What files are in {path}?", "List the directory {path}.", "Show me what {path} contains.",
                 "Which entries does {path} have?", "Can you list {path}?",
                 "Give me a listing of {path}.", "What is inside the folder {path}?", "ls {path} please."],
    "run_command": ["Run `{command}`.", "Please execute {command} and show me the output.",
                    "What does `{command}` print?", "Can you run {command} for me?",
                    "Execute the command {command}.", "Try running {command}.",
                    "I want the output of {command}.", "Go ahead and run {command}."],
    "get_weather": ["What's the weather in {location}?", "How is the weather in {location} today?",
                    "Is it warm in {location} right now?", "Tell me the weather for {location}.",
                    "What is the temperature in {location}?", "Weather in {location}, please.",
                    "Should I take an umbrella in {location}?", "How hot is it in {location}?"],
    "search": ["Search the web for {query}.", "Look up {query}.", "Find information about {query}.",
               "Can you search for {query}?", "I want to know about {query}; search for it.",
               "Do a web search on {query}.", "Please find {query} online.", "Google {query} for me."],
    "write_file": ["Write '{content}' to {path}.", "Save the text '{content}' in {path}.",
                   "Create {path} containing '{content}'.", "Put '{content}' into the file {path}.",
                   "Please write {path} with the text '{content}'.", "Store '{content}' in {path}.",
                   "Make a file {path} that says '{content}'.", "Fill {path} with '{content}'."],
}

PATHS = ["README.md", "setup.py", "src/main.c", "notes.txt", "config.json", "Makefile", "docs/index.md",
         "tests/test_app.py", "/etc/hostname", "app/models.py", "data/input.csv", "LICENSE",
         "scripts/build.sh", "lib/util.js", "pyproject.toml", "CHANGELOG.md", "src/server.go", "todo.txt"]
DIRS = [".", "src", "tests", "docs", "/tmp", "/var/log", "scripts", "app", "lib", "data", "build", "~/projects"]
COMMANDS = ["ls -la", "git status", "make test", "python3 --version", "df -h", "uname -a", "pwd", "date",
            "git log --oneline -5", "npm test", "cargo build", "pytest -q", "free -m", "whoami", "uptime"]
CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Beijing", "Cairo", "Lima", "Oslo", "Sydney",
          "Toronto", "Mumbai", "Seoul", "Lagos", "Vienna", "Dublin", "Prague", "Lisbon", "Athens"]
QUERIES = ["the history of Unix", "how to sort a list in Python", "the boiling point of water",
           "the tallest mountain in Europe", "how TCP works", "the population of Canada", "recipes with rice",
           "the rules of chess", "what a hash table is", "how to learn Rust", "the speed of light",
           "the best hiking trails", "how vaccines work", "the origin of the word robot"]
CONTENTS = ["hello world", "TODO: fix the tests", "done", "version 1.2.0", "meeting at noon", "ok"]


def split_values(values):
    """Every fifth value is held out."""
    return [v for i, v in enumerate(values) if i % 5 != 4], [v for i, v in enumerate(values) if i % 5 == 4]


VALUES = {k: split_values(v) for k, v in
          {"path": PATHS, "dir": DIRS, "command": COMMANDS, "location": CITIES, "query": QUERIES,
           "content": CONTENTS}.items()}


def make_args(name, rng, split):
    pick = lambda k: rng.choice(VALUES[k][split])
    if name == "read_file":
        return {"path": pick("path")}
    if name == "list_dir":
        return {"path": pick("dir")}
    if name == "run_command":
        return {"command": pick("command")}
    if name == "get_weather":
        a = {"location": pick("location")}
        if rng.random() < 0.5:
            a["unit"] = rng.choice(["celsius", "fahrenheit"])
        return a
    if name == "search":
        a = {"query": pick("query")}
        if rng.random() < 0.3:
            a["num_results"] = rng.choice([3, 5, 10])
        return a
    return {"path": pick("path"), "content": pick("content")}


def fake_result(name, args, rng):
    if name == "read_file":
        return "# %s\n\nThis file has %d lines. The first one says: hello." % (args["path"], rng.randint(3, 200))
    if name == "list_dir":
        return "\n".join(rng.sample(["main.c", "README.md", "util.py", "a.txt", "build", "Makefile", "x.json"], 4))
    if name == "run_command":
        return "exit status 0\n" + rng.choice(["ok", "3 files changed", "all tests passed", "Linux", "12:00"])
    if name == "get_weather":
        unit = args.get("unit", "celsius")
        t = rng.randint(-5, 35) if unit == "celsius" else rng.randint(25, 95)
        return json.dumps({"temperature": t, "unit": unit, "condition": rng.choice(["sunny", "cloudy", "rain"])})
    if name == "search":
        return json.dumps({"results": [{"title": "About " + args["query"], "url": "https://example.org/1"}]})
    return json.dumps({"written": len(args["content"]), "path": args["path"]})


def final_answer(name, args, result):
    if name == "get_weather":
        r = json.loads(result)
        return "In %s it is %s and %d degrees %s." % (args["location"], r["condition"], r["temperature"],
                                                       r["unit"])
    if name == "read_file":
        return "Here is what %s contains: %s" % (args["path"], result.split("\n")[-1])
    if name == "list_dir":
        return "%s contains: %s." % (args["path"], ", ".join(result.split("\n")))
    if name == "run_command":
        return "I ran `%s`. It finished with %s" % (args["command"], result.replace("\n", ", output: ") + ".")
    if name == "search":
        return "I searched for %s. The top result is \"About %s\"." % (args["query"], args["query"])
    return "Done: I wrote %d characters to %s." % (len(args["content"]), args["path"])


def thought(name, args):
    return "The user wants something the %s tool does. I will call it with %s." % (
        name, ", ".join("%s %s" % kv for kv in args.items()))


# Tool sets: every combination of 2..4 tools containing the target; a hash holds some out.
def tool_set(name, rng, split):
    for _ in range(100):
        others = rng.sample([t for t in TOOLS if t != name], rng.randint(1, 3))
        names = sorted(others + [name])
        if held_out("|".join(names), 20) == (split == 1):
            rng.shuffle(names)
            return names
    return [name]


SYSTEMS = ["You are a helpful assistant.", "You are a coding assistant with access to tools.",
           "You are a careful assistant. Use a tool when it helps."]


def tool_conversation(rng, split, think):
    name = rng.choice(sorted(TOOLS))
    args = make_args(name, rng, split)
    phr = ASK[name][:-2] if split == 0 else ASK[name][-2:]
    user = rng.choice(phr).format(**{**args, "path": args.get("path", "")})
    names = tool_set(name, rng, split)
    result = fake_result(name, args, rng)
    call = {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": name, "arguments": json.dumps(args)}}]}
    done = {"role": "assistant", "content": final_answer(name, args, result)}
    if think:
        call["reasoning_content"] = thought(name, args)
        done["reasoning_content"] = "I have the result of %s. I will summarise it." % name
    msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}, {"role": "user", "content": user}, call,
            {"role": "tool", "tool_call_id": "call_1", "content": result}, done]
    tools = [TOOLS[n] for n in names]
    return {"messages": msgs, "tools": tools}, {"tool": name, "arguments": args, "user": user}


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


def write_ids(path, ids):
    a = array.array("i", ids)
    if sys.byteorder != "little":
        a.byteswap()
    with open(path + ".tmp", "wb") as f:
        a.tofile(f)
    os.replace(path + ".tmp", path)


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ds4", default="./ds4")
    ap.add_argument("--vocab", default="vectors/train-vocab.gguf")
    ap.add_argument("--text-mb", type=float, default=6.0, help="bytes of natural text to gather (MB)")
    ap.add_argument("--convs", type=int, default=4000, help="training conversations")
    ap.add_argument("--eval-convs", type=int, default=200, help="held-out conversations")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    os.makedirs(a.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="ds4-data.")

    train_docs, held_docs, docs = gather_text(rng, a.text_mb * 1e6)
    rng.shuffle(docs)
    doc_train, doc_held = [d for d in docs if not held_out(d[0])], [d for d in docs if held_out(d[0])]

    train_chat, held_chat, evals = [], [], []
    for i in range(a.convs + a.eval_convs):
        split = 0 if i < a.convs else 1
        think = rng.random() < 0.5
        if rng.random() < 0.6:
            conv, ev = tool_conversation(rng, split, think)
            if split:
                ev["messages"] = conv["messages"][:2]
                ev["tools"] = conv["tools"]
                ev["think"] = think
                evals.append(ev)
        else:
            conv = chat_conversation(rng, split, think, doc_train if split == 0 else doc_held)
        (train_chat if split == 0 else held_chat).append(render(a.ds4, conv, think, tmp))

    wrap = lambda t: BOS + t + EOS
    train_text = [wrap(t) for t in train_docs] + train_chat
    rng.shuffle(train_text)
    held_text = "".join(wrap(t) for t in held_docs)
    ids_train = tokenize(a.ds4, a.vocab, "".join(train_text), tmp)
    ids_held_text = tokenize(a.ds4, a.vocab, held_text, tmp)
    ids_held_chat = tokenize(a.ds4, a.vocab, "".join(held_chat), tmp)
    write_ids(os.path.join(a.out, "train.bin"), ids_train)
    write_ids(os.path.join(a.out, "heldout.bin"), ids_held_text + ids_held_chat)
    # For --perplexity: plain held-out text without the BOS/EOS markers (ds4 adds BOS per window).
    with open(os.path.join(a.out, "heldout_text.txt"), "w") as f:
        f.write("\n\n".join(held_docs)[:200000])
    with open(os.path.join(a.out, "heldout_chat.txt"), "w") as f:
        f.write("".join(held_chat)[:200000])
    with open(os.path.join(a.out, "tool_eval.jsonl"), "w") as f:
        for ev in evals:
            f.write(json.dumps(ev) + "\n")
    # The words of the training text, for the test that greedy output is made of them.
    words = sorted(set(re.findall(r"[A-Za-z_]+", "".join(train_text))))
    with open(os.path.join(a.out, "train_words.txt"), "w") as f:
        f.write("\n".join(words) + "\n")
    V = max(ids_train + [0]) + 1
    held_plain = tokenize(a.ds4, a.vocab, open(os.path.join(a.out, "heldout_text.txt")).read(), tmp)
    stats = {"train_tokens": len(ids_train), "heldout_text_tokens": len(ids_held_text),
             "heldout_chat_tokens": len(ids_held_chat), "train_conversations": len(train_chat),
             "heldout_conversations": len(held_chat), "tool_eval_requests": len(evals),
             "train_documents": len(train_docs), "heldout_documents": len(held_docs),
             "unigram_ppl_heldout_text": unigram_ppl(ids_train, held_plain, 8192),
             "unigram_ppl_heldout_chat": unigram_ppl(ids_train, ids_held_chat, 8192),
             "max_id": V - 1, "seed": a.seed}
    with open(os.path.join(a.out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
