#!/usr/bin/env python3
"""reorder_book.py -- put ds4.c's chapters in data-flow Parts and renumber once.

    python3 tools/reorder_book.py IN.c OUT.c [--cc cc]

Run by hand, once, after the branches are merged (never by make). It cuts
the file at chapter banners ("/* ===== * Chapter N. Title") and at section
headers ("/* ---- N.M Title" or "/* ----- * N.M Title"), never at line
numbers, so code added inside a chapter moves with it. It then

  1. reassembles the pieces in the order of PLAN (Parts I-VII, appendices);
  2. renumbers chapters 1..K and sections N.M (no primes, no 10b/10c),
     rewriting section headers, banners and cross-references in comments
     ("see 8.3", "(3.7", "chapter 10") through one old -> new map;
  3. writes the table of contents of the preface (Parts, two reading paths);
  4. inserts a prototype for every top-level static function after the
     ground floor, so that a function may be used before the chapter that
     defines it; types cannot be forward-declared that way, so PLAN keeps
     type-defining chapters (JSON) ahead of their users, and the script
     reports any type error it still finds;
  5. checks that OUT.c compiles (cc -fsyntax-only) and prints before/after
     figures: where the forward pass starts, lines per Part.

Nothing is deleted: every line of IN.c appears exactly once in OUT.c, apart
from the renumbered headers and the regenerated table of contents.
"""
import re, subprocess, sys, tempfile, os

# (part title, [pieces]); a piece is a chapter number ("8") or a section ("3.7").
# Sections named here leave their chapter and go where they are listed.
PLAN = [
    ("Part I. Bytes", ["1", "2", "3"]),
    ("Part II. Tensors and weights", ["4"]),
    ("Part III. The model", ["7", "8", "9", "10", "10b"]),
    # JSON comes before text: the DSML parser and the Python-style writer of
    # the chat template build JSON values (struct json), and a type cannot be
    # used before its definition in C.
    ("Part IV. Text", ["5", "6"]),
    ("Part V. Sessions", ["10c"]),
    ("Part VI. The server", ["12"]),
    ("Part VII. The command line", ["13"]),
    ("Appendices", ["3.7", "3.8", "3.8'", "11", "12.7"]),
]
APPENDIX_TITLES = {"3.7": "SIMD twins: x86-64 AVX2", "3.8": "SIMD twins: arm64 NEON",
                   "3.8'": "Any other CPU", "11": None, "12.7": "Test-only code: the server's test script"}

BANNER = re.compile(r"^/\* =+\s*$")
CHAPTER = re.compile(r"^ \* Chapter (\d+[a-z]?)\.\s+(.*?)\s*$")
SEC_INLINE = re.compile(r"^/\* -{3,} (\d+[a-z]?\.\d+(?:\.\d+)?'?) (.*?)\s*-*\s*(\*/)?\s*$")
SEC_BLOCK_HEAD = re.compile(r"^/\* -{10,}\s*$")
SEC_BLOCK_TITLE = re.compile(r"^ \* (\d+[a-z]?\.\d+(?:\.\d+)?'?) (.*)$")


def cut(lines):
    """[(key, title, [lines])]: the preface, chapters, and their top-level
    sections (key '3.7'); the text before the first section stays with the
    chapter key ('3')."""
    pieces, cur = [("preface", "", [])], None
    i = 0
    while i < len(lines):
        l = lines[i]
        if BANNER.match(l) and i + 1 < len(lines) and CHAPTER.match(lines[i + 1]):
            m = CHAPTER.match(lines[i + 1])
            cur = m.group(1)
            pieces.append((cur, m.group(2), []))
        elif cur and (SEC_INLINE.match(l) or (SEC_BLOCK_HEAD.match(l) and i + 1 < len(lines)
                                              and SEC_BLOCK_TITLE.match(lines[i + 1]))):
            m = SEC_INLINE.match(l) or SEC_BLOCK_TITLE.match(lines[i + 1])
            num = m.group(1)
            if num.split(".")[0] == cur and num.count(".") == 1:
                pieces.append((num, m.group(2), []))
        pieces[-1][2].append(l)
        i += 1
    return pieces


def assemble(pieces):
    by_key = {}
    for k, t, ls in pieces:
        by_key.setdefault(k, []).append((k, t, ls))
    chapter_of = lambda k: k.split(".")[0]
    placed = {x for _, keys in PLAN for x in keys}
    order = []                      # (part, chapter key, [piece])
    for part, keys in PLAN:
        for key in keys:
            if "." in key:          # a section moved on its own
                order.append((part, key, by_key.get(key, [])))
                continue
            own = [p for p in pieces if p[0] == key or (chapter_of(p[0]) == key and p[0] not in placed
                                                       and p[0] != "preface")]
            order.append((part, key, own))
    missing = [p[0] for p in pieces if p[0] != "preface" and not any(p in ps for _, _, ps in order)]
    return order, missing


def renumber(order):
    """old chapter number -> new (reading order); sections moved out of their
    chapter -> "new.1"; every other section is mapped by map_sec()."""
    chap_map, sec_map, n = {}, {"_moved": []}, 0
    for part, key, ps in order:
        n += 1
        if "." in key:
            sec_map[key] = "%d.1" % n
            sec_map["_moved"].append(key)
        else:
            chap_map[key] = str(n)
    return chap_map, sec_map


REF_CTX = (r"(?:\(|\b(?:see|of|in|section|sections|and|to|from|by|as in|under|per|chapter)\s+|,\s+|§)")
REF_NUM = r"(\d{1,2}[a-c]?\.\d{1,2}(?:\.\d)?'?)"
REF_END = r"(?=[) ,;:.\-]|$)(?!\s*(?:billion|million|GiB|GB|MB|KB|ms|bits|bpw|x|%%)\b)"


def map_sec(old, chap_map, sec_map):
    if old in sec_map and old != "_moved":
        return sec_map[old]
    parts = old.rstrip("'").split(".")
    parent = ".".join(parts[:2])
    if parent in sec_map and len(parts) > 2:        # 10c.5.1 -> new.k.1
        return sec_map[parent] + old[len(parent):]
    if parent + "'" in sec_map and old.endswith("'"):
        return sec_map[parent + "'"]
    if parts[0] in chap_map and len(parts) >= 2 and parts[1].isdigit():
        # a section that stays in its chapter: its number drops by the
        # sections of the same chapter moved out before it
        m = int(parts[1])
        gone = sum(1 for k in sec_map.get("_moved", ()) if k.split(".")[0] == parts[0]
                   and not k.endswith("'") and int(k.split(".")[1]) < m)   # a primed one had no number
        return "%s.%d%s" % (chap_map[parts[0]], m - gone, old[len(parts[0]) + 1 + len(parts[1]):])
    return old


def rewrite_refs(text, chap_map, sec_map):
    """Section numbers in reference contexts ("see 8.3", "(3.7", "8.6-8.8",
    ", 5.8 for"), section headers, and "chapter N"; nothing else, so that
    numbers such as 1.5 or 3.5 GB stay as they are."""
    one = lambda m: m.group(1) + map_sec(m.group(2), chap_map, sec_map)
    text = re.sub(r"^(/\* -{3,} )" + REF_NUM + r"(?= )",
                  lambda m: m.group(1) + map_sec(m.group(2), chap_map, sec_map), text)
    text = re.sub("(" + REF_CTX + ")" + REF_NUM + REF_END, one, text)
    text = re.sub(r"(\d{1,2}[a-c]?\.\d{1,2}-)" + REF_NUM + REF_END,
                  lambda m: m.group(1) + map_sec(m.group(2), chap_map, sec_map), text)
    text = re.sub(r"\b([Cc]hapters?) (\d{1,2}[a-c]?)\b(?!\.\d)",
                  lambda m: m.group(1) + " " + chap_map.get(m.group(2), m.group(2)), text)
    return text


def comment_lines(lines):
    """Which lines are inside /* */ comments (a rough lexer: strings with
    comment markers are rare in ds4.c and would only stop a rewrite)."""
    inside, out = False, []
    for l in lines:
        flag = inside or "/*" in l or "//" in l
        out.append(flag)
        pos = 0
        while True:
            if inside:
                e = l.find("*/", pos)
                if e < 0:
                    break
                inside, pos = False, e + 2
            else:
                s = l.find("/*", pos)
                if s < 0:
                    break
                inside, pos = True, s + 2
    return out


# A SIMD twin's prototype may name its vector types (__m256, float32x4_t),
# which exist only under its #if: declare it under the same condition.
SIMD_GUARDS = {"quant_avx2_": "defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)",
               "quant_neon_": "defined(__ARM_NEON)"}


def guard_for(name, proto):
    for prefix, cond in SIMD_GUARDS.items():
        if name.startswith(prefix):
            return "#if %s\n%s\n#endif" % (cond, proto)
    return proto


def prototypes(lines):
    """{line index of the definition: (name, 'static ...;')} for every top-level
    static function outside preprocessor conditionals."""
    out, i, n, depth = {}, 0, len(lines), 0
    while i < n:
        l = lines[i]
        if re.match(r"^\s*#\s*if", l):
            depth += 1
        elif re.match(r"^\s*#\s*endif", l):
            depth -= 1
        if re.match(r"^static\s+[^=;]*\b\w+\s*\(", l) and not l.rstrip().endswith(";"):
            head, j = l, i
            while not head.rstrip().endswith("{") and j + 1 < n and j - i < 8 and ";" not in head:
                j += 1
                head += "\n" + lines[j]
            name = re.search(r"\b(\w+)\s*\(", re.sub(r"__attribute__\s*\(\(.*?\)\)", "", head))
            if head.rstrip().endswith("{") and ")" in head and name:
                out[i] = (name.group(1), head.rstrip()[:-1].rstrip() + ";", depth > 0)
            i = j + 1
            continue
        i += 1
    return out


def figures(lines, label):
    fwd = next((i for i, l in enumerate(lines, 1) if re.match(r"^ \* Chapter \d+[a-z]?\. The forward pass", l)), 0)
    print("%s: %d lines; the forward pass starts at line %d (%.0f%%)" % (label, len(lines), fwd,
                                                                       100.0 * fwd / max(1, len(lines))))


def old_toc(lines):
    """The preface's old contents list: {chapter: one-paragraph description}."""
    out, cur = {}, None
    for l in lines:
        if "The CPU path in this file" in l:
            break
        m = re.match(r"^ \*\s+(\d+[a-c]?)\. (.*)$", l)
        if m:
            cur = m.group(1)
            out[cur] = m.group(2).strip()
        elif cur and re.match(r"^ \*\s{5,}\S", l):
            out[cur] += " " + l[2:].strip()
        else:
            cur = None
    return out


def wrap(text, first, rest, width=78):
    out, line = [], first
    for w in text.split():
        if len(line) + 1 + len(w) > width and line.strip(" *").strip():
            out.append(line)
            line = rest + w
        else:
            line += ("" if line.endswith(" ") else " ") + w
    return out + [line]


def toc(order, chap_map, titles, described=None):
    out = [" * the data as it flows through the engine, in Parts:", " *"]
    described = described or {}
    model_lines = sum(len(b) for p, _, b in order if p.startswith("Part III"))
    for part, keys in PLAN:
        out.append(" *   %s" % part)
        for p, key, ps in order:
            if p == part:
                d = described.get(key)
                if not d or re.search(r"\(\d+[a-c]\)", d):
                    d = titles.get(key, key)
                out += wrap(d, " *   %3s." % chap_map.get(key, "?"), " *        ")
    out += [" *",
            " * Two ways to read it:",
            " *",
            " *   - The model in an evening: Part III (%d lines), from the numeric" % model_lines,
            " *     primitives to speculative decoding, with the essays on each idea.",
            " *   - The whole engine: from the top, Part I to Part VII, then the",
            " *     appendices.",
            " *"]
    return out


def build(pieces, plan):
    """The reordered file for one plan: (lines, out_order, chap_map, n_protos)."""
    global PLAN
    PLAN = plan
    order, missing = assemble(pieces)
    if missing:
        raise SystemExit("error: pieces not in PLAN: %s (add them to PLAN)" % ", ".join(missing))
    global SEC_MAP
    chap_map, sec_map = renumber(order)
    SEC_MAP = sec_map
    titles = {k: t for k, t, _ in pieces}
    parent_title = {k: t for k, t, _ in pieces if "." not in k}
    for k, t in APPENDIX_TITLES.items():
        if t:
            titles[k] = t
    out_order, new_no = [], 0
    for part, key, ps in order:
        new_no += 1
        body = [l for p in ps for l in p[2]]
        banner = None
        if "." in key and body:        # a moved section gets a chapter banner of its own
            banner = ["/* " + "=" * 76, " * Chapter %d. %s" % (new_no, titles[key]), " * " + "=" * 76,
                      " *", " * An appendix to the chapter \"%s\"." % parent_title.get(key.split(".")[0], "?"),
                      " */", ""]
            chap_map[key] = str(new_no)
        out_order.append((part, key, body, banner))
    result = list(pieces[0][2])
    for part, key, body, banner in out_order:
        flags = comment_lines(body)
        prev = ""
        for l, is_c in zip(body, flags):
            m = CHAPTER.match(l)
            h = re.match(r"^( \* )" + REF_NUM + r"( [A-Z-].*)$", l)
            if m:
                l = " * Chapter %s. %s" % (chap_map.get(m.group(1), m.group(1)), m.group(2))
            elif h and is_c and re.match(r"^(/\* -{10,}| \*)\s*$", prev):
                l = h.group(1) + map_sec(h.group(2), chap_map, sec_map) + rewrite_refs(h.group(3), chap_map, sec_map)
            elif is_c:
                l = rewrite_refs(l, chap_map, sec_map)
            prev = l
            result.append(l)
        if banner:
            at = len(result) - len(body)
            result[at:at] = banner
    start = next((i for i, l in enumerate(result) if "the data as it flows through the engine" in l), None)
    end = next((i for i, l in enumerate(result) if "The CPU path in this file" in l), None)
    if start is not None and end is not None and start < end:
        result[start:end] = toc([(p, k, b) for p, k, b, _ in out_order], chap_map, titles,
                                old_toc(pieces[0][2]))
    else:
        print("note: no table of contents found in the preface; left as it was")
    defs = prototypes(result)
    starts = [i for i, l in enumerate(result) if CHAPTER.match(l)]
    need, done = {}, set()
    flags = comment_lines(result)
    for at, (name, proto, guarded) in sorted(defs.items()):
        if name in done:          # the same function in another #if branch
            continue
        done.add(name)
        pat = re.compile(r"\b%s\b" % re.escape(name))
        first = next((i for i in range(at) if not flags[i] and pat.search(result[i])), None)
        if first is not None:
            ch = max([s0 for s0 in starts if s0 <= first] or [1]) - 1   # the banner's /* line
            ch_def = max([s0 for s0 in starts if s0 <= at] or [1]) - 1
            if ch == ch_def:      # used earlier in its own chapter: already declared there
                continue
            need.setdefault(ch, []).append(guard_for(name, proto))
    for at in sorted(need, reverse=True):
        tags = sorted(set(re.findall(r"\bstruct (\w+)", " ".join(need[at]))))
        block = ["/* Declared ahead: defined in a later chapter. */"]
        block += ["struct %s;" % t for t in tags] + need[at] + [""]
        result[at:at] = block
    return result, [(p, k, b) for p, k, b, _ in out_order], chap_map, sum(len(v) for v in need.values())


def compile_errors(cc, path):
    r = subprocess.run([cc, "-fsyntax-only", "-D_GNU_SOURCE", "-w", path], capture_output=True, text=True)
    return r.returncode, [l for l in r.stderr.split("\n") if "error" in l]


def main():
    args = sys.argv[1:]
    cc = "cc"
    if "--cc" in args:
        cc = args[args.index("--cc") + 1]
        args = [a for a in args if a not in ("--cc", cc)]
    extra = []
    if "--refs" in args:
        extra = args[args.index("--refs") + 1:]
        args = args[:args.index("--refs")]
    if len(args) != 2:
        print(__doc__)
        return 2
    src, dst = args
    lines = open(src, encoding="utf-8").read().split("\n")
    figures(lines, "before")
    pieces = cut(lines)
    plan, notes = [(p, list(k)) for p, k in PLAN], []
    for attempt in range(6):
        result, out_order, chap_map, n_protos = build(pieces, plan)
        open(dst, "w", encoding="utf-8").write("\n".join(result))
        rc, errs = compile_errors(cc, dst)
        if rc == 0:
            break
        # A type used before its definition: put the moved section that defines
        # it back into its chapter (types cannot be declared ahead).
        types = set(re.findall(r"(?:incomplete type|undefined type|unknown type name)[^‘']*[‘']"
                               r"(?:const )?(?:struct )?(\w+)", "\n".join(errs)))
        moved = [k for _, keys in plan for k in keys if "." in k]
        culprit = next((k for k in moved for t in types for _, _, ls in [x for x in pieces if x[0] == k]
                        if re.search(r"^(?:struct|typedef struct|enum) %s\b|\b%s;\s*$" % (t, t), "\n".join(ls), re.M)),
                       None)
        if not culprit:
            break
        notes.append("section %s defines %s, used earlier as a complete type: kept in its chapter"
                     % (culprit, ", ".join(sorted(types))))
        plan = [(p, [k for k in keys if k != culprit]) for p, keys in plan]
    for path in extra:
        text = open(path, encoding="utf-8").read()
        # "ds4.c 8.3", "ds4.c section 8.3", "ds4.c chapter 9" in any file; a marker
        # (\x01) keeps the rewritten number from being rewritten twice below.
        mark = lambda m: m.group(1) + "\x01" + map_sec(m.group(2), chap_map, SEC_MAP)
        new = re.sub(r"(\bds4\.c (?:section |sections )?)" + REF_NUM + REF_END, mark, text)
        new = re.sub(r"(\x01\d{1,2}\.\d{1,2}-)" + REF_NUM + REF_END, mark, new)
        new = re.sub(r"(\bds4\.c [Cc]hapters? )(\d{1,2}[a-c]?)\b(?!\.\d)",
                     lambda m: m.group(1) + "\x01" + chap_map.get(m.group(2), m.group(2)), new)
        # Comments of the tests and GPU files cite ds4.c's sections bare too;
        # docs and the converter (which has its own numbering) only as above.
        if not path.endswith(".md") and not path.endswith("ds4_convert.c"):
            new = "\n".join(rewrite_refs(l, chap_map, SEC_MAP) for l in new.split("\n"))
        new = new.replace("\x01", "")
        if new != text:
            open(path, "w", encoding="utf-8").write(new)
            print("  references rewritten in %s" % path)
    figures(result, "after")
    for part, _ in plan:
        n = sum(len(b) for p, _, b in out_order if p == part)
        print("  %-32s %6d lines (%4.1f%%)" % (part, n, 100.0 * n / len(result)))
    print("  renumbered: %s" % ", ".join("%s->%s" % kv for kv in chap_map.items()))
    print("  declared ahead: %d prototypes of functions used before their chapter" % n_protos)
    for n in notes:
        print("  " + n)
    print("  cc -fsyntax-only: %s" % ("ok" if rc == 0 else "%d errors" % len(errs)))
    for l in errs[:15]:
        print("    " + l)
    return rc


if __name__ == "__main__":
    sys.exit(main())
