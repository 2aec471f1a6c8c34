#!/usr/bin/env python3
"""book.py -- render ds4.c as a book, and lint it.

    python3 tools/book.py [--out book] ds4.c [tools/ds4_convert.c vectors/README.md]
    python3 tools/book.py --check ds4.c

ds4.c is written to be read from top to bottom. This tool weaves it into HTML:
chapter banners ("/* ===== * Chapter 8. The forward pass") start a page,
section banners become headings, block comments that begin in column 0
outside any function become prose, and everything else is shown as code,
each block anchored to its ds4.c line. Prose markup is the file's own plain
text (style-anchors.md rule 7): a blank line ends a paragraph, "- " starts a
list item, an indented line is verbatim (formulas, tables), `backticks` mark
code. Further files become appendices: C files are rendered the same way,
Markdown files through a small subset (headings, lists, tables, code).

The output is deterministic (no timestamps, no absolute paths, a built-in
highlighter), so CI can regenerate book/ and diff it. Standard library only.
"""
import argparse, html, os, re, sys

KEYWORDS = set("""auto bool break case char const continue default do double else enum
extern float for goto if inline int long register restrict return short signed sizeof
static struct switch typedef union unsigned void volatile while _Atomic _Bool
_Static_assert size_t ssize_t int8_t int16_t int32_t int64_t uint8_t uint16_t uint32_t
uint64_t true false NULL""".split())
LONG_FN_WARN, LONG_FN_FAIL = 60, 150

# ---- 1. Reading C: one regex lexer, brace depth, definitions -----------------

LEX = re.compile(r"""(?P<bc>/\*.*?\*/)|(?P<lc>//[^\n]*)
  |(?P<pp>^[ \t]*\#(?:/\*.*?\*/|\\\n|[^\n])*)
  |(?P<s>"(?:\\.|[^"\\\n])*")|(?P<ch>'(?:\\.|[^'\\\n])*')
  |(?P<id>[A-Za-z_]\w*)|(?P<num>\.?\d[\w.]*)|(?P<nl>\n)|(?P<op>\S)""", re.S | re.M | re.X)


class Source:
    """One C file, lexed: which lines are prose, what is defined where."""

    def __init__(self, path, text):
        self.path, self.text = path, text
        self.lines = text.split("\n")
        n = len(self.lines) + 1
        self.has_code, self.has_comment = [False] * n, [False] * n
        self.prose = []      # (first, last) 1-based lines of column-0 top-level comments
        self.defs = []       # dict(kind, name, line, end)
        self.uses = []       # (name, line) of identifiers in code
        self.defines_in_fn = []
        self._lex()

    def _lex(self):
        t, line, depth, hdr, pending = self.text, 1, 0, None, None
        for m in LEX.finditer(t):
            kind, tok = m.lastgroup, m.group()
            if kind == "nl":
                line += 1
                continue
            span = range(line, line + tok.count("\n") + 1)
            if kind in ("bc", "lc"):
                for l in span:
                    self.has_comment[l] = True
                at_col0 = m.start() == 0 or t[m.start() - 1] == "\n"
                rest = t[m.end():t.find("\n", m.end()) if "\n" in t[m.end():] else len(t)]
                if kind == "bc" and at_col0 and depth == 0 and not rest.strip():
                    self.prose.append((line, span[-1]))
            else:
                for l in span:
                    self.has_code[l] = True
            if kind == "pp":
                d = re.match(r"\s*#\s*define\s+(\w+)", tok)
                if d and depth == 0:
                    self.defs.append(dict(kind="macro", name=d.group(1), line=line, end=line))
                elif d:
                    self.defines_in_fn.append((d.group(1), line))
            elif kind == "id":
                self.uses.append((tok, line))
            if kind not in ("bc", "lc", "pp") and depth == 0 and hdr is None:
                hdr = (m.start(), line)
            if kind == "op" and tok == ";" and depth == 0:
                if pending is not None and hdr:
                    names = re.findall(r"\w+", t[hdr[0]:m.start()])
                    if names and not pending["name"]:
                        pending["name"] = names[-1]
                pending, hdr = None, None
            elif kind == "op" and tok == "{":
                if depth == 0 and hdr:
                    d = self._classify(t[hdr[0]:m.start()], hdr[1])
                    if d:
                        self.defs.append(d)
                    hdr = d
                depth += 1
            elif kind == "op" and tok == "}":
                depth = max(depth - 1, 0)
                if depth == 0:
                    if isinstance(hdr, dict):
                        hdr["end"] = line
                        if hdr["kind"] in ("struct", "union", "enum", "typedef"):
                            pending = hdr
                    hdr = None
            line = span[-1]
        self.defs = [d for d in self.defs if d["name"]]

    @staticmethod
    def _classify(h, line):
        h = " ".join(re.sub(r"/\*.*?\*/|//[^\n]*", " ", h, flags=re.S).split())
        start = dict(line=line, end=line)
        m = re.match(r"(typedef\s+)?(struct|union|enum)\s*(\w*)$", h)
        if m:
            kind = "typedef" if m.group(1) and not m.group(3) else m.group(2)
            return dict(start, kind=kind, name=m.group(3))
        if "=" in h:
            m = re.search(r"(\w+)\s*(\[[^\]]*\]\s*)*=$", h)
            return dict(start, kind="data", name=m.group(1)) if m else None
        for m in re.finditer(r"(\w+)\s*\(", h):
            if m.group(1) not in ("__attribute__", "__declspec") and m.group(1) not in KEYWORDS:
                return dict(start, kind="function", name=m.group(1))
        return None


# ---- 2. Prose: comment text -> paragraphs, lists, verbatim, headings ----------

RULE = re.compile(r"^\s*[-=]{5,}\s*$")
SECNUM = re.compile(r"^(\d+[a-z]?(?:\.\d+)+'?)\s+\S")
CAPS = re.compile(r"^[A-Z][A-Z0-9 ,/'()-]{3,}[A-Z)]\.?$")


def comment_text(raw):
    """The lines of one block comment without its /* * */ frame.
    Returns (level, inline_title, lines): level 1 for a ==== banner, 2 for
    a ---- banner, 0 for a plain comment."""
    first = raw[0][2:]
    level, title = 0, None
    m = re.match(r"^\s*([-=]{3,})\s*(.*?)\s*-*\s*(\*/)?\s*$", first)
    if m:
        level = 1 if m.group(1)[0] == "=" else 2
        title = m.group(2) or None
        first = ""
    out = [first]
    for l in raw[1:]:
        s = re.match(r"^\s*\*(?!/) ?", l)
        out.append(l[s.end():] if s else re.sub(r"^ {0,3}", "", l))
    out[-1] = re.sub(r"\s*\*/\s*$", "", out[-1])
    out = [l.rstrip() for l in out]
    out = ["" if RULE.match(l) or re.match(r"^\s*-{5,}\s*$", l) else l for l in out]
    while out and not out[0].strip():
        out.pop(0)
    while out and not out[-1].strip():
        out.pop()
    if level and not title and out and (len(out) == 1 or not out[1].strip()):
        title = out.pop(0).strip()
    return level, title, out


def indent(l):
    return len(l) - len(l.lstrip())


def dedent(block):
    cut = min(indent(b) for b in block if b.strip())
    return "\n".join(b[cut:] for b in block)


FIELD = re.compile(r"^[A-Z][\w-]*( [\w-]+)?:( |$)")


def parse_prose(lines, bullets="-"):
    """Plain-text markup -> [(kind, payload)]; kinds: p, ul, ol, pre, fields,
    h (level, text)."""
    out, i, n = [], 0, len(lines)
    item = re.compile(r"^( {0,4})(\d+\.|[%s]) (.*)$" % re.escape(bullets))
    bullet = lambda l: item.match(l) and not item.match(l).group(2)[0].isdigit()
    while i < n:
        l = lines[i]
        if not l.strip():
            i += 1
        elif item.match(l):
            items, d, kind = [], len(item.match(l).group(1)), item.match(l).group(2)[0].isdigit()
            m0 = item.match(l)
            text_col = m0.end(2) + len(l[m0.end(2):]) - len(l[m0.end(2):].lstrip())
            nested = lambda x: indent(x) > text_col or (indent(x) >= text_col and
                                                        re.match(r"\s*([a-z]\.|-)\s", x))
            while i < n:
                m = item.match(lines[i])
                if m and abs(len(m.group(1)) - d) <= 1 and m.group(2)[0].isdigit() == kind:
                    items.append(m.group(3).strip())
                elif lines[i].strip() and nested(lines[i]) and items:
                    items[-1] += "\0" + lines[i]          # deeper than the text: verbatim
                elif lines[i].strip() and indent(lines[i]) > d and items:
                    items[-1] += " " + lines[i].strip()
                elif not lines[i].strip() and i + 1 < n and item.match(lines[i + 1]):
                    pass
                else:
                    break
                i += 1
            out.append(("ol" if kind else "ul", items))
        elif indent(l) >= 2:
            block = []
            while i < n and (indent(lines[i]) >= 2 and lines[i].strip() or
                             not lines[i].strip() and i + 1 < n and indent(lines[i + 1]) >= 2):
                block.append(lines[i])
                i += 1
            out.append(("pre", dedent(block)))
        else:
            para, j = [], i
            while j < n and lines[j].strip() and not bullet(lines[j]):
                para.append(lines[j])
                j += 1
            starts = [k for k, x in enumerate(para) if FIELD.match(x)]
            if FIELD.match(para[0]) and len(starts) >= 2:   # "Spec: ...", "Tests: ..." lines
                fields = []
                for k, x in enumerate(para):
                    if k in starts:
                        key, _, rest = x.partition(":")
                        fields.append([key, rest.strip(), []])
                    elif indent(x) >= 2:
                        fields[-1][2].append(x)
                    else:
                        fields[-1][1] += " " + x.strip()
                out.append(("fields", fields))
                i = j
                continue
            para = []
            while i < n and lines[i].strip() and indent(lines[i]) < 2 and not bullet(lines[i]):
                para.append(lines[i].strip())
                i += 1
            text = " ".join(para)
            if len(para) == 1 and SECNUM.match(text) and len(text) < 90:
                out.append(("h", (2, text.rstrip("."))))
            elif len(para) == 1 and CAPS.match(text):
                out.append(("h", (3, text)))
            else:
                out.append(("p", text))
    return out


# ---- 3. The book: chapters, blocks, statistics --------------------------------

class Chapter:
    def __init__(self, num, title, page, line):
        self.num, self.title, self.page, self.line = num, title, page, line
        self.blocks = []        # (kind, first, last, payload): prose / code / md
        self.sections = []      # (anchor, text)
        self.end = line
        self.prose_lines = self.code_lines = self.comment_lines = 0

    def label(self):
        if self.num in (None, "0"):
            return self.title
        return ("Appendix %s. " if self.num.isalpha() and self.num.isupper() else "Chapter %s. ") % self.num + self.title


def slug(s):
    words = re.sub(r"[^a-z0-9]+", " ", s.lower().replace("'", "")).split()
    out = ""
    for w in words:
        if len(out) + len(w) > 34:
            break
        out += ("-" if out else "") + w
    return out or "x"


def split_c(src, chapters, appendix=None):
    """Cut a lexed C file into chapters (ds4.c) or one appendix chapter."""
    prose = {a: b for a, b in src.prose}
    if appendix:
        chapters.append(Chapter(appendix[0], appendix[1], appendix[2], 1))
    else:
        chapters.append(Chapter("0", "Preface", "00-preface.html", 1))
    ch, i, n, code = chapters[-1], 1, len(src.lines), []

    def flush():
        while code and not src.lines[code[0] - 1].strip():
            code.pop(0)
        while code and not src.lines[code[-1] - 1].strip():
            code.pop()
        if code:
            ch.blocks.append(("code", code[0], code[-1], None))
            ch.code_lines += sum(1 for l in code if src.has_code[l])
            ch.comment_lines += sum(1 for l in code if src.has_comment[l] and not src.has_code[l])
        code.clear()

    while i <= n:
        if i in prose:
            flush()
            last = prose[i]
            level, title, lines = comment_text(src.lines[i - 1:last])
            m = re.match(r"Chapter (\d+[a-z]?)\.\s+(.*?)\.?$", title or "")
            if m and not appendix:
                ch.end = i - 1
                ch = Chapter(m.group(1), m.group(2), "", i)
                ch.page = "%02d%s-%s.html" % (int(re.match(r"\d+", ch.num).group()),
                                              ch.num.lstrip("0123456789"), slug(ch.title.split(":")[0]))
                chapters.append(ch)
                title = None
            elif title:
                level = (2 if level == 1 else 3) if appendix else 2
            elems = ([("h", (level, title))] if title else []) + parse_prose(lines)
            ch.blocks.append(("prose", i, last, elems))
            ch.prose_lines += sum(1 for l in src.lines[i - 1:last] if l.strip() and not RULE.match(l.strip("/* ")))
            ch.comment_lines += sum(1 for l in src.lines[i - 1:last] if l.strip())
            i = last + 1
        else:
            code.append(i)
            i += 1
    flush()
    ch.end = n


def split_md(path, text, chapter):
    lines = text.split("\n")
    elems, buf, i = [], [], 0

    def flush():
        if buf:
            elems.extend(parse_prose(buf, bullets="-*"))
            buf.clear()
    while i < len(lines):
        l = lines[i]
        if l.startswith("#"):
            flush()
            h = l.lstrip("#")
            if l.startswith("##"):
                elems.append(("h", (len(l) - len(h), h.strip())))
        elif l.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.match(r"^:?-+:?$", c) for c in cells):
                    rows.append(cells)
                i += 1
            elems.append(("table", rows))
            continue
        elif l.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            elems.append(("pre", "\n".join(lines[i + 1:j])))  # fenced: kept as written
            i = j
        else:
            buf.append(l)
        i += 1
    flush()
    chapter.blocks.append(("prose", 1, len(lines), elems))
    chapter.prose_lines = sum(1 for l in lines if l.strip())
    chapter.end = len(lines)


# ---- 4. HTML -------------------------------------------------------------------

class Linker:
    """Where each definition lives, and how to write a link to it."""

    def __init__(self):
        self.defs = {}       # name -> (anchor, page, def)

    def add(self, d, page, fname):
        if d["name"] not in self.defs:
            a = {"function": "f-", "macro": "m-", "data": "v-"}.get(d["kind"], "t-") + d["name"]
            self.defs[d["name"]] = (a, page, dict(d, file=fname))

    def href(self, name, here, single):
        a, page, _ = self.defs[name]
        return "#" + a if single or page == here else page + "#" + a


TOK = re.compile(r"""(?P<c>//.*|/\*.*?(?:\*/|$))|(?P<s>"(?:\\.|[^"\\])*"?|'(?:\\.|[^'\\])*'?)
  |(?P<n>\b0[xX][0-9a-fA-F]+[uUlL]*\b|(?<![\w.])\.?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?[uUlLfF]*\b)
  |(?P<id>[A-Za-z_]\w*)""", re.X)


def linkable(name, before, linker, num):
    """Link a use, not a definition; a tag only after struct/enum/union, and
    never a member after . or ->."""
    if name not in linker.defs or linker.defs[name][2]["line"] == num or re.search(r"(\.|->)\s*$", before):
        return False
    return linker.defs[name][0][0] != "t" or re.search(r"\b(struct|enum|union)\s+$", before) is not None


def highlight(lines, linker, here, single, anchors):
    """A line-at-a-time highlighter: comments, strings, numbers, preprocessor,
    keywords; identifiers defined elsewhere in the book become links."""
    out, in_comment, pp = [], False, False
    esc = lambda s: html.escape(s, quote=False)
    for num, l in lines:
        o, pos = "".join('<span id="%s"></span>' % a for a in anchors.get(num, ())), 0
        if in_comment:
            e = l.find("*/")
            pos = len(l) if e < 0 else e + 2
            o += '<span class="c">%s</span>' % esc(l[:pos])
            in_comment = e < 0
        m = re.match(r"\s*#\s*\w+", l)
        if pos == 0 and (m or pp):
            pos = m.end() if m else 0
            o += '<span class="p">%s</span>' % esc(l[:pos])
        pp = (m is not None or pp) and l.endswith("\\")
        for t in TOK.finditer(l, pos):
            o += esc(l[pos:t.start()])
            k, s = t.lastgroup, t.group()
            if k == "c":
                in_comment = s.startswith("/*") and (len(s) < 4 or not s.endswith("*/"))
            if k == "id" and s in KEYWORDS:
                o += '<span class="k">%s</span>' % s
            elif k == "id" and linkable(s, l[:t.start()], linker, num):
                o += '<a href="%s">%s</a>' % (linker.href(s, here, single), s)
            elif k == "id":
                o += s
            else:
                o += '<span class="%s">%s</span>' % (k, esc(s))
            pos = t.end()
        out.append(o + esc(l[pos:]))
    return "\n".join(out)


def inline(text, linker, here, single):
    def code(m):
        s = html.unescape(m.group(1))
        name = re.sub(r"^(struct|enum|union)\s+|\(.*\)$|\[.*\]$", "", s)
        if name in linker.defs:
            return '<a href="%s"><code>%s</code></a>' % (linker.href(name, here, single), m.group(1))
        return "<code>%s</code>" % m.group(1)

    def call(m):
        if m.group(1) in linker.defs:
            return '<a href="%s">%s</a>' % (linker.href(m.group(1), here, single), m.group(0))
        return m.group(0)
    parts = re.split(r"(`[^`]+`)", html.escape(text, quote=False))
    for k, p in enumerate(parts):
        if k % 2:
            parts[k] = code(re.match(r"`(.*)`", p))
        else:
            p = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", p)
            p = re.sub(r"(?<![\w*])\*([A-Za-z][\w ,'-]*[\w])\*(?![\w*])", r"<em>\1</em>", p)
            if k == 0:                          # "HOW IT WORKS." "WHAT IF" "INVARIANTS"
                p = re.sub(r"^([A-Z]{2,}(?:[ -][A-Z]{2,})+\.?|[A-Z]{4,}\.)(?= )", r"<strong>\1</strong>", p)
            parts[k] = re.sub(r"\b([a-z_]\w*)\(\)", call, p)
    return "".join(parts)


def list_item(x, linker, here, single):
    """One list item: its text, then any lines indented deeper than the text
    (a table or formula under the item) as verbatim."""
    text, *pre = x.split("\0")
    body = inline(text, linker, here, single)
    if pre:
        body += '<pre class="verbatim">%s</pre>' % html.escape(dedent(pre), quote=False)
    return body


def render_blocks(ch, src_of, linker, single, seen):
    here, out = ch.page, []
    src = src_of.get(ch.page)
    prefix = "L" if ch.num is None or not ch.num.isupper() else ch.num + "-L"
    fname = src.path if src else ""
    anchors = {}
    if src:
        for d in src.defs:
            if d["name"] in linker.defs and linker.defs[d["name"]][2]["line"] == d["line"] \
                    and linker.defs[d["name"]][1] == here:
                anchors.setdefault(d["line"], []).append(linker.defs[d["name"]][0])
    for kind, first, last, payload in ch.blocks:
        if kind == "code":
            lines = [(k, src.lines[k - 1]) for k in range(first, last + 1)]
            ref = "%s:%d" % (fname, first) if first == last else "%s:%d-%d" % (fname, first, last)
            out.append('<div class="code" id="%s%d"><a class="ln" href="#%s%d">%s</a>\n<pre>%s</pre></div>'
                       % (prefix, first, prefix, first, ref, highlight(lines, linker, here, single, anchors)))
            for d in (x for x in (src.defs if src else ()) if x["kind"] == "function" and first <= x["line"] <= last):
                for label, path, a, b, body in sorted(getattr(linker, "twins", {}).get(d["name"], ())):
                    out.append('<div class="code gpu"><span class="ln">%s twin of %s: %s:%d-%d</span>\n<pre>%s</pre>'
                               '</div>' % (label, html.escape(d["name"]), html.escape(path), a, b,
                                           highlight([(0, l) for l in body], linker, here, single, {})))
            continue
        out.append('<div class="prose" id="%s%d">' % (prefix, first) if src else '<div class="prose">')
        for k, p in payload:
            if k == "h":
                lvl, text = p[0], p[1].rstrip(".")
                a = "sec-" + slug(text) + ("" if ch.num is None else "-" + ch.num.lower())
                m = SECNUM.match(text + " x")
                if m and lvl == 2:
                    a = "sec-" + m.group(1).rstrip("'")
                base, k2 = a, 1
                while a in seen:
                    k2 += 1
                    a = "%s-%d" % (base, k2)
                seen.add(a)
                if lvl == 2 and (a, text) not in ch.sections:
                    ch.sections.append((a, text))
                out.append('<h%d id="%s">%s</h%d>' % (lvl, a, inline(text, linker, here, single), lvl))
            elif k == "p":
                out.append("<p>%s</p>" % inline(p, linker, here, single))
            elif k in ("ul", "ol"):
                out.append("<%s>%s</%s>" % (k, "".join("<li>%s</li>" % list_item(x, linker, here, single)
                                                       for x in p), k))
            elif k == "fields":
                out.append('<table class="fields">%s</table>' % "".join(
                    "<tr><th>%s</th><td>%s%s</td></tr>" % (html.escape(key), inline(v, linker, here, single),
                    '<pre class="verbatim">%s</pre>' % html.escape(dedent(pre), quote=False) if pre else "")
                    for key, v, pre in p))
            elif k == "pre":
                out.append('<pre class="verbatim">%s</pre>' % html.escape(p, quote=False))
            elif k == "table":
                rows = ["<tr>%s</tr>" % "".join("<%s>%s</%s>" % (c, inline(x, linker, here, single), c)
                                                for x in r) for r, c in zip(p, ["th"] + ["td"] * len(p))]
                out.append("<table>%s</table>" % "".join(rows))
        out.append("</div>")
    return "\n".join(out)


CSS = """body { max-width: 52rem; margin: 2rem auto; padding: 0 1rem; font: 16px/1.5 Georgia, serif; color: #222; }
h1, h2, h3, h4, nav, table.toc, .ln { font-family: Helvetica, Arial, sans-serif; }
h1 { font-size: 1.7rem; border-bottom: 2px solid #444; padding-bottom: .3rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; } h3, h4 { font-size: 1rem; letter-spacing: .04em; }
code, pre { font: 13px/1.4 Menlo, Consolas, "DejaVu Sans Mono", monospace; }
pre { overflow-x: auto; margin: 0; }
pre.verbatim { background: #f6f4ee; padding: .5rem .8rem; border-left: 3px solid #c9b98f; }
.code.gpu { background: #f3f7fb; border-left: 3px solid #8fb3d9; }
.code { background: #fafafa; border: 1px solid #e4e4e4; padding: .2rem .8rem .6rem; margin: 1rem 0; }
.ln { display: block; text-align: right; font-size: 11px; color: #999; text-decoration: none; }
.c { color: #6a737d; font-style: italic; } .s { color: #0a6e31; } .n { color: #a3481d; }
.p { color: #8250df; } .k { color: #0b3d91; font-weight: bold; }
.code a { color: inherit; text-decoration: none; border-bottom: 1px dotted #aaa; }
nav { font-size: .9rem; margin: 1rem 0; color: #666; } nav a { margin-right: 1rem; }
table { border-collapse: collapse; font-size: .9rem; } td, th { border-bottom: 1px solid #ddd; padding: .2rem .5rem; text-align: left; vertical-align: top; }
td.r, th.r { text-align: right; } table.fields th { font-weight: normal; font-style: italic; padding-left: 0; } .secs { font-size: .8rem; color: #555; }
@media print {
  body { max-width: none; margin: 0; font-size: 10.5pt; } nav, .ln { display: none; }
  h1 { page-break-before: always; } h1.book { page-break-before: avoid; }
  pre { white-space: pre-wrap; font-size: 8pt; } .code { border: none; padding: 0; background: none; }
  a { color: inherit; text-decoration: none; }
}
"""


def lists_own_sections(ch):
    """True when the chapter's opening prose already lists its sections
    ("12.1  Options", ...): then the page shows that list, not a second one."""
    first = next((b for b in ch.blocks if b[0] == "prose"), None)
    if not first or not ch.sections:
        return False
    text = " ".join(str(p) for _, p in first[3])
    nums = [m.group(1) for _, t in ch.sections for m in [SECNUM.match(t + " x")] if m]
    return len(nums) >= 3 and sum(1 for x in nums if x in text) * 2 >= len(nums)


def first_comment_line(src, d):
    """The first line of the comment just above a definition, or of the
    one inside a struct's first lines: the index's one-line description."""
    k = d["line"] - 2
    while k >= 0 and not src.lines[k].strip():
        k -= 1
    if k < 0 or not src.lines[k].rstrip().endswith("*/"):
        return ""
    while k > 0 and not src.lines[k].lstrip().startswith("/*"):
        k -= 1
    for l in src.lines[k:d["line"] - 1]:
        t = re.sub(r"^\s*(/\*+|\*)\s?|\*/\s*$|^[-=\s]+$", "", l).strip(" -=")
        if t:
            return t
    return ""


def page(title, body):
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            '<title>%s</title>\n<link rel="stylesheet" href="style.css">\n</head>\n<body>\n%s\n</body>\n</html>\n'
            % (html.escape(title), body))


GPU_FILES = (("CUDA", ".cu"), ("Metal", ".metal"))
TWIN_AFFIX = re.compile(r"^(?:kernel_|ds4_|k_)|(?:_kernel|_cuda|_metal|_gpu)$")


def gpu_twins(root):
    """GPU kernels named like their CPU twin (rmsnorm, kernel_rmsnorm,
    rmsnorm_cuda, ...): {cpu name: [(label, path, first, last, lines)]}.
    The GPU sources are optional; when none exist the book has no twins."""
    twins = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("book", "tests", "node_modules")]
        for f in sorted(files):
            label = next((lab for lab, ext in GPU_FILES if f.endswith(ext)), None)
            if not label:
                continue
            path = os.path.join(dirpath, f)
            src = Source(os.path.relpath(path, root), open(path, encoding="utf-8", errors="replace").read())
            for d in src.defs:
                if d["kind"] == "function":
                    name = TWIN_AFFIX.sub("", d["name"])
                    twins.setdefault(name, []).append((label, src.path, d["line"], d["end"],
                                                       src.lines[d["line"] - 1:d["end"]]))
    return twins


def build(paths, outdir):
    chapters, src_of, linker = [], {}, Linker()
    linker.twins = gpu_twins(os.path.dirname(os.path.abspath(paths[0])))
    for k, path in enumerate(paths):
        text = open(path, encoding="utf-8").read()
        stem = os.path.basename(os.path.dirname(path)) if os.path.basename(path) == "README.md" else path
        stem = os.path.splitext(os.path.basename(stem))[0]
        app = None if k == 0 else (chr(ord("A") + k - 1), path, "%s-%s.html" % (chr(ord("a") + k - 1), slug(stem)))
        if path.endswith(".md"):
            chapters.append(Chapter(app[0], app[1], app[2], 1))
            split_md(path, text, chapters[-1])
            continue
        src = Source(path, text)
        before = len(chapters)
        split_c(src, chapters, app)
        for ch in chapters[before:]:
            src_of[ch.page] = src
            for d in src.defs:
                if ch.line <= d["line"] <= ch.end:
                    linker.add(d, ch.page, path)
    # where each name is used: chapters by page
    used = {}
    for ch in chapters:
        src = src_of.get(ch.page)
        for name, line in (src.uses if src else ()):
            if ch.line <= line <= ch.end and name in linker.defs:
                used.setdefault(name, []).append(ch) if ch not in used.get(name, []) else None
    seen, seen1 = set(), set()
    bodies = {ch.page: render_blocks(ch, src_of, linker, False, seen) for ch in chapters}
    single = [render_blocks(ch, src_of, linker, True, seen1) for ch in chapters]
    os.makedirs(outdir, exist_ok=True)
    files = {"style.css": CSS}
    main = chapters[0].title
    for k, ch in enumerate(chapters):
        nav = '<nav><a href="index.html">Contents</a>%s%s<a href="identifiers.html">Index</a></nav>' % (
            '<a href="%s">&larr; %s</a>' % (chapters[k - 1].page, html.escape(chapters[k - 1].label())) if k else "",
            '<a href="%s">%s &rarr;</a>' % (chapters[k + 1].page, html.escape(chapters[k + 1].label()))
            if k + 1 < len(chapters) else "")
        toc = "" if lists_own_sections(ch) else "".join(
            '<li><a href="#%s">%s</a></li>' % (a, html.escape(t)) for a, t in ch.sections)
        body = "%s\n<h1>%s</h1>\n%s\n%s\n%s" % (nav, html.escape(ch.label()),
                                               '<ul class="secs">%s</ul>' % toc if toc else "", bodies[ch.page], nav)
        files[ch.page] = page(ch.label() + " - ds4", body)
    def toc_row(ch, one):
        total, pg = ch.comment_lines + ch.code_lines, "#" + ch.page[:-5] if one else ch.page
        secs = ", ".join('<a href="%s#%s">%s</a>' % ("" if one else ch.page, a, html.escape(t)) for a, t in ch.sections)
        return ('<tr><td><a href="%s">%s</a>%s</td><td class="r">%d</td><td class="r">%d</td>'
                '<td class="r">%d</td><td class="r">%s</td></tr>'
                % (pg, html.escape(ch.label()), '<div class="secs">%s</div>' % secs if secs else "",
                   ch.end - ch.line + 1, ch.prose_lines, ch.code_lines,
                   "%.2f" % (ch.comment_lines / total) if total and ch.code_lines else "-"))
    rows, rows1 = [toc_row(ch, False) for ch in chapters], [toc_row(ch, True) for ch in chapters]
    intro = ("<p>This book is <code>%s</code> itself, rendered by <code>tools/book.py</code>: the prose is the "
             "file's column-0 comments, the code is the file's code, in the file's order. Each code block is "
             "labelled with its line in the source. Regenerate with <code>make book</code>.</p>"
             '<p><a href="ds4-book.html">The whole book on one page</a> (for printing) &middot; '
             '<a href="identifiers.html">Index of identifiers</a></p>' % html.escape(paths[0]))
    table = ('<table class="toc"><tr><th>Chapter</th><th class="r">lines</th><th class="r">prose</th>'
             '<th class="r">code</th><th class="r">comment ratio</th></tr>%s</table>')
    table, table1 = table % "".join(rows), table % "".join(rows1)
    files["index.html"] = page("ds4: the book", '<h1 class="book">ds4: the book</h1>\n%s\n%s' % (intro, table))
    idx = []
    for name in sorted(linker.defs, key=lambda s: (s.lower().lstrip("_"), s)):
        a, pg, d = linker.defs[name]
        ch = next(c for c in chapters if c.page == pg)
        uses = ", ".join('<a href="%s">%s</a>' % (c.page, html.escape(c.num or "")) for c in used.get(name, [])
                         if c is not ch)
        src = src_of.get(pg)
        desc = first_comment_line(src, d) if src else ""
        idx.append('<tr><td><a href="%s#%s"><code>%s</code></a></td><td>%s</td><td><a href="%s">%s</a></td>'
                   '<td>%s</td><td>%s:%d</td><td>%s</td></tr>'
                   % (pg, a, name, d["kind"], pg, html.escape(ch.num or ch.title), inline(desc, linker, "identifiers.html", False),
                      d["file"], d["line"], uses))
    idx_html = ('<p>Every function, type, macro and table defined at the top level, where it is defined, '
                'the first line of the comment above it, and the other chapters whose code uses it.</p>'
                '<table class="idx"><tr><th>name</th><th>kind</th><th>chapter</th><th>what it is</th>'
                '<th>defined at</th><th>used in</th></tr>\n%s\n</table>' % "\n".join(idx))
    files["identifiers.html"] = page("Index of identifiers - ds4", '<nav><a href="index.html">Contents</a></nav>\n'
                                     '<h1>Index of identifiers</h1>\n' + idx_html)
    one = ['<h1 class="book">ds4: the book</h1>', table1]
    for ch, b in zip(chapters, single):
        one.append('<h1 id="%s">%s</h1>\n%s' % (ch.page[:-5], html.escape(ch.label()), b))
    files["ds4-book.html"] = page("ds4: the book", "\n".join(one))
    for name, content in files.items():
        with open(os.path.join(outdir, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(content)
    return chapters


# ---- 5. The linter ---------------------------------------------------------------

REF = re.compile(r"(?:\(|\b(?:see|of|in|section|and|to|from|by)\s+)(\d{1,2}[a-c]?)\.([1-9]\d?(?:\.\d)?)"
                 r"(?=[) ,;:.]|$)(?!\s+(?:billion|million|GiB|GB|MB|ms|bits)\b)")


CITE = re.compile(r"\[([A-Z][A-Z0-9]{2,})(?: §([^\]]+))?\]")
BIB_ENTRY = re.compile(r"^\s*-\s+\[([A-Z][A-Z0-9]{2,})\]\s+(\S+)")
OUTSIDE = re.compile(r"shared/|dsv4-format|dsv4-forward|style-anchors")
XREF = re.compile(r"(?:\(|\b(?:see|of|in|section|sections|and|to|from|by|as in|under|per)\s+|,\s+)"
                  r"(\d{1,2}[a-c]?)\.([1-9]\d?(?:\.\d)?)"
                  r"(?=[) ,;:.]|$)(?!\s+(?:billion|million|GiB|GB|MB|ms|bits|x)\b)")
CHREF = re.compile(r"\b[Cc]hapters? (\d{1,2}[a-c]?)\b(?!\.\d)(?:(?:,| and| or) (\d{1,2}[a-c]?)\b(?!\.\d))?")
COLUMNS = 100


def bibliography(src):
    """Tags listed in the preface (the file's first comment): {tag: first word}."""
    first = src.prose[0] if src.prose else (1, 0)
    tags = {}
    for l in src.lines[first[0] - 1:first[1]]:
        m = BIB_ENTRY.match(re.sub(r"^\s*\*", "", l))
        if m:
            tags[m.group(1)] = m.group(2)
    return tags


def doc_sections(root, doc):
    """Section numbers of one of our Markdown notes: "1", "1.2", ..."""
    path = os.path.join(root, doc)
    if not os.path.exists(path):
        return None
    return {m.group(1) for m in re.finditer(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", open(path).read(), re.M)}


def comment_spans(src):
    """(line, text) of every comment line of the file."""
    return [(i, l) for i, l in enumerate(src.lines, 1) if src.has_comment[i]]


def check_citations(src, path, result):
    tags = bibliography(src)
    root = os.path.dirname(os.path.abspath(path))
    unknown, bad_sec, used, outside = [], [], set(), []
    for i, l in comment_spans(src):
        if OUTSIDE.search(l):
            outside.append(str(i))
        for m in CITE.finditer(l):
            tag, sec = m.group(1), m.group(2)
            if tag not in tags:
                unknown.append("%d [%s]" % (i, tag))
                continue
            used.add(tag)
            doc = tags[tag]
            if sec and doc.startswith("docs/"):
                secs = doc_sections(root, doc.rstrip(":,"))
                if secs is None or sec.strip() not in secs:
                    bad_sec.append("%d [%s §%s]" % (i, tag, sec))
    result(bool(tags), "the preface has a bibliography (%d tags)" % len(tags))
    result(not unknown, "every citation tag is in the bibliography (%d tags cited)%s"
           % (len(used), "; unknown: " + ", ".join(unknown) if unknown else ""))
    result(not bad_sec, "every cited section of docs/ exists%s" % ("; missing: " + ", ".join(bad_sec) if bad_sec else ""))
    result(not outside, "no comment cites a path outside the repository%s"
           % ("; at lines " + " ".join(outside) if outside else ""))
    return len(used), len(tags)


def check_xrefs(src, chapters, known, result):
    nums = {c.num for c in chapters[1:]}
    with_secs = {k.split(".")[0] for k in known}
    stale, bad_ch = [], []
    for i, l in comment_spans(src):
        for m in XREF.finditer(l):
            ref = m.group(1) + "." + m.group(2)
            lead, after = m.group(0)[0], l[m.end():m.end() + 2]
            if lead == "," and re.search(r"(?:^|[\s(])[\d.]+,\s*$", l[:m.start() + 1]):
                continue                      # a list of numbers: "1, 1.5, 2"
            if lead == "(" and m.group(1) not in with_secs and not re.match(r" [a-z]", after):
                continue                      # a value in parentheses: "(1.5)"
            if m.group(1) in nums and ref not in known:
                stale.append("%d (%s)" % (i, ref))
        for m in CHREF.finditer(l):
            for n in (m.group(1), m.group(2)):
                if n and n not in nums:
                    bad_ch.append("%d (chapter %s)" % (i, n))
    result(not stale, "every section cross-reference resolves%s" % ("; stale at lines: " + ", ".join(stale) if stale else ""))
    result(not bad_ch, "every chapter reference resolves%s" % ("; unknown at lines: " + ", ".join(bad_ch) if bad_ch else ""))


def check_layout(src, chapters, result, strict_columns):
    wide = [i for i, l in enumerate(src.lines, 1) if len(l) > COLUMNS]
    result(not wide, "no line over %d columns%s" % (COLUMNS, "; %d lines are (first: %s)%s"
           % (len(wide), " ".join(map(str, wide[:8])), "" if strict_columns else " -- a warning with --lax-columns")
           if wide else ""), warn=not strict_columns)
    as_code = []
    for c in chapters:
        for kind, first, _, elems in c.blocks:
            for k, x in (elems if kind == "prose" else ()):
                if k == "pre" and re.match(r"^\s*- \S", x) and not re.search(r"^\s*[^-\s]", x, re.M):
                    as_code.append(str(first))
    result(not as_code, "list items render as lists, not as verbatim%s"
           % ("; verbatim lists in comments at lines " + " ".join(as_code) if as_code else ""))
    return len(wide)


def wide_signatures(src, limit=7):
    """Functions taking `limit` or more parameters: [(count, name, line)]."""
    out = []
    for d in src.defs:
        if d["kind"] != "function":
            continue
        head = " ".join(src.lines[d["line"] - 1:d["line"] + 8])
        m = re.search(r"\b%s\s*\(([^)]*)\)" % re.escape(d["name"]), head)
        if m and m.group(1).strip() not in ("", "void"):
            n = m.group(1).count(",") + 1
            if n >= limit:
                out.append((n, d["name"], d["line"]))
    return sorted(out, key=lambda x: (-x[0], x[2]))


def check(path, strict_columns=False):
    src = Source(path, open(path, encoding="utf-8").read())
    chapters = []
    split_c(src, chapters)
    passed = failed = 0

    def result(ok, msg, warn=False):
        nonlocal passed, failed
        print(("ok    " if ok else "warn  " if warn else "FAIL  ") + msg)
        if ok:
            passed += 1
        elif not warn:
            failed += 1

    nums, prev, bad = [c.num for c in chapters[1:]], None, []
    for n in nums:
        d, letter = int(re.match(r"\d+", n).group()), n.lstrip("0123456789")
        if prev is None:
            ok = d == 1 and not letter
        else:
            pd, pl = prev
            ok = (d == pd + 1 and not letter) or (d == pd and letter and chr(ord(pl or "a") + 1) == letter)
        if not ok:
            bad.append(n)
        prev = (d, letter)
    result(not bad and nums, "chapters numbered continuously: %s%s"
           % (" ".join(nums), "; out of order: " + " ".join(bad) if bad else ""))
    no_intro = []
    for c in chapters[1:]:
        first = c.blocks[0] if c.blocks else None
        elems = first[3] if first and first[0] == "prose" and first[1] == c.line else []
        body = [e for e in elems if e[0] != "fields"]     # Spec:/Tests: lines come first
        if not any(k == "p" for k, _ in body):
            no_intro.append(c.num)
        elif body[0][0] != "p":
            result(False, "chapter %s opens with section %r, no chapter-level introduction before it (%s:%d)"
                   % (c.num, body[0][1][1], path, c.line), warn=True)
    result(not no_intro, "every chapter opens with an intro paragraph%s"
           % ("; missing in " + " ".join(no_intro) if no_intro else ""))
    secs = {}
    for c in chapters:
        for kind, _, _, elems in c.blocks:
            for k, x in (elems if kind == "prose" else ()):
                m = SECNUM.match(x[1] + " x") if k == "h" else None
                if m:
                    secs.setdefault(c.num, []).append(m.group(1).rstrip("'"))
    for num, ss in secs.items():
        tops = sorted({int(x.split(".")[1]) for x in ss if x.split(".")[0] == num})
        if tops != list(range(1, len(tops) + 1)):
            result(False, "chapter %s numbers its sections %s" % (num, " ".join(ss)), warn=True)
    known = {x for ss in secs.values() for x in ss}
    check_xrefs(src, chapters, known, result)
    cited, listed = check_citations(src, path, result)
    n_wide = check_layout(src, chapters, result, strict_columns)
    fns = sorted((d for d in src.defs if d["kind"] == "function"), key=lambda d: (d["line"] - d["end"], d["line"]))
    lens = [(d["end"] - d["line"] + 1, d) for d in fns]
    for n, d in lens:
        if n > LONG_FN_FAIL:
            result(False, "function %s is %d lines (over %d), %s:%d" % (d["name"], n, LONG_FN_FAIL, path, d["line"]))
    if not any(n > LONG_FN_FAIL for n, _ in lens):
        result(True, "no function over %d lines (%d functions, longest %s at %d lines)"
               % (LONG_FN_FAIL, len(lens), lens[0][1]["name"] if lens else "-", lens[0][0] if lens else 0))
    for n, d in lens:
        if LONG_FN_WARN < n <= LONG_FN_FAIL:
            result(False, "function %s is %d lines (over %d), %s:%d" % (d["name"], n, LONG_FN_WARN, path, d["line"]),
                   warn=True)
    ge = [l for name, l in src.uses if name == "getenv"]
    result(not ge, "no getenv in %s%s" % (os.path.basename(path), "; at lines " + " ".join(map(str, ge)) if ge else ""))
    for name, line in src.defines_in_fn:
        result(False, "#define %s inside a function body, %s:%d" % (name, path, line), warn=True)
    print("\n  chapter  lines  prose   code  comment ratio")
    for c in chapters:
        tot = c.comment_lines + c.code_lines
        print("  %7s %6d %6d %6d  %.2f" % (c.num, c.end - c.line + 1, c.prose_lines, c.code_lines,
                                          c.comment_lines / tot if tot else 0))
    tot_c = sum(c.comment_lines for c in chapters)
    tot = tot_c + sum(c.code_lines for c in chapters)
    print("  %7s %6d %6d %6d  %.2f\n" % ("all", len(src.lines), sum(c.prose_lines for c in chapters),
                                         sum(c.code_lines for c in chapters), tot_c / tot if tot else 0))
    wide = wide_signatures(src)
    fwd = next((dict(line=c.line) for c in chapters if c.title.lower().startswith("the forward pass")), None)
    print("  functions with >= 7 parameters: %d (%s)" % (len(wide), ", ".join("%s %d" % (n, k) for k, n, _ in wide[:6])))
    if fwd:
        print("  the forward pass (its chapter banner) starts at line %d (%.0f%%)" % (fwd["line"], 100.0 * fwd["line"] / len(src.lines)))
    print("  citation tags: %d listed, %d cited, all resolved: %s" % (listed, cited, "yes" if failed == 0 else "see above"))
    print("  lines over %d columns: %d" % (COLUMNS, n_wide))
    print("%d passed, %d failed" % (passed, failed))
    return failed == 0


def main():
    ap = argparse.ArgumentParser(description="Render ds4.c as a book, or lint it (--check).")
    ap.add_argument("--check", action="store_true", help="lint the first file; write nothing")
    ap.add_argument("--lax-columns", action="store_true",
                    help="with --check: lines over 100 columns warn instead of failing")
    ap.add_argument("--out", default="book", help="output directory (default: book)")
    ap.add_argument("files", nargs="+", help="ds4.c, then appendices (.c or .md)")
    a = ap.parse_args()
    if a.check:
        return 0 if check(a.files[0], not a.lax_columns) else 1
    chapters = build(a.files, a.out)
    print("book: %d chapters and appendices written to %s/" % (len(chapters), a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
