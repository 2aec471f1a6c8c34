#!/usr/bin/env python3
"""book_browser.py -- render the book and look at every page in headless Chromium.

    python3 tests/book_browser.py [--strict] [--screenshot FILE.png]

Renders book/ into a temporary directory (make book BOOK_DIR=...), then:
  - checks every internal link (page and #anchor) of every page, statically;
  - loads every page in one headless Chromium (Debian's `chromium`) at a
    1280x900 window, and measures, after layout, whether the page or any
    element of the text column (paragraphs, list items, headings, tables,
    code blocks) is wider than its box: horizontal overflow.
Prose overflow and page overflow fail. Code blocks that scroll sideways are
the lines over 100 columns; they are counted and, until the final layout
pass, reported as a warning (--strict makes them fail too).
Ends with "N passed, N failed". Run from the repository root.
"""
import html.parser, json, os, re, shutil, subprocess, sys, tempfile

PROBE = """<!DOCTYPE html><html><body><script>
var pages = %s, out = {}, k = 0, f = document.createElement('iframe');
f.style.width = '1280px'; f.style.height = '900px'; document.body.appendChild(f);
function measure() {
  var d = f.contentDocument, r = {loaded: !!(d && d.body), page: 0, prose: [], code: 0, code_first: ''};
  if (r.loaded) {
    var vw = d.documentElement.clientWidth;
    r.page = d.documentElement.scrollWidth > vw + 1 ? d.documentElement.scrollWidth - vw : 0;
    d.querySelectorAll('p, li, h1, h2, h3, h4, table, nav, pre').forEach(function (e) {
      if (e.scrollWidth <= e.clientWidth + 1) return;
      if (e.tagName === 'PRE') { if (!r.code) r.code_first = e.textContent.slice(0, 50); r.code++; }
      else if (r.prose.length < 5) r.prose.push(e.tagName + ': ' + e.textContent.slice(0, 50));
    });
  }
  out[pages[k]] = r; k++;
  if (k < pages.length) f.src = pages[k];
  else { var o = document.createElement('pre'); o.id = 'result'; o.textContent = JSON.stringify(out);
         document.body.appendChild(o); }
}
f.onload = measure; f.src = pages[0];
</script></body></html>"""


class Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.hrefs = set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        if tag == "link" and a.get("href"):
            self.hrefs.append(a["href"])


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def main():
    strict = "--strict" in sys.argv
    shot = sys.argv[sys.argv.index("--screenshot") + 1] if "--screenshot" in sys.argv else None
    passed = failed = 0

    def result(ok, msg, warn=False):
        nonlocal passed, failed
        print(("ok    " if ok else "warn  " if warn else "FAIL  ") + msg)
        if ok:
            passed += 1
        elif not warn:
            failed += 1

    tmp = tempfile.mkdtemp(prefix="ds4-book-browser-")
    try:
        book = os.path.join(tmp, "book")
        r = subprocess.run([os.environ.get("MAKE", "make"), "-s", "book", "BOOK_DIR=" + book],
                           capture_output=True, text=True)
        result(r.returncode == 0, "make book renders the book" + ("" if r.returncode == 0 else ": " + r.stderr[-300:]))
        if r.returncode:
            print("%d passed, %d failed" % (passed, failed))
            return 1
        pages = sorted(f for f in os.listdir(book) if f.endswith(".html"))
        parsed = {}
        for p in pages:
            parsed[p] = Links()
            parsed[p].feed(open(os.path.join(book, p), encoding="utf-8").read())
        broken, n_links = [], 0
        for p, doc in parsed.items():
            for h in doc.hrefs:
                if re.match(r"^[a-z]+:", h):
                    continue
                n_links += 1
                target, _, frag = h.partition("#")
                target = target or p
                if target.endswith(".css"):
                    ok = os.path.exists(os.path.join(book, target))
                else:
                    ok = target in parsed and (not frag or frag in parsed[target].ids)
                if not ok:
                    broken.append("%s -> %s" % (p, h))
        result(not broken, "%d internal links on %d pages resolve%s" % (n_links, len(pages),
               "; broken: %d, first: %s" % (len(broken), ", ".join(broken[:5])) if broken else ""))
        chromium = find_chromium()
        result(chromium is not None, "headless Chromium is installed (%s)" % (chromium or "apt-get install chromium"))
        if not chromium:
            print("%d passed, %d failed" % (passed, failed))
            return 1
        probe = os.path.join(book, "_probe.html")
        open(probe, "w").write(PROBE % json.dumps(pages))
        flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                 "--window-size=1300,900", "--user-data-dir=" + os.path.join(tmp, "profile")]
        try:
            r = subprocess.run(flags + ["--virtual-time-budget=60000", "--dump-dom", "file://" + probe],
                               capture_output=True, text=True, timeout=300)
            m = re.search(r'<pre id="result">(.*?)</pre>', r.stdout, re.S)
        except subprocess.TimeoutExpired:
            m = None
        result(m is not None, "Chromium loaded and measured every page")
        if m:
            import html as h
            res = json.loads(h.unescape(m.group(1)))
            unloaded = [p for p in pages if not res.get(p, {}).get("loaded")]
            result(not unloaded, "every page renders (%d pages)%s" % (len(pages),
                   "; not rendered: " + " ".join(unloaded) if unloaded else ""))
            wide = ["%s (+%dpx)" % (p, v["page"]) for p, v in res.items() if v.get("page")]
            result(not wide, "no page is wider than the window%s" % ("; wider: " + ", ".join(wide) if wide else ""))
            prose = ["%s: %s" % (p, x) for p, v in res.items() for x in v.get("prose", [])]
            result(not prose, "no prose overflows the text column%s" % ("; " + " | ".join(prose[:5]) if prose else ""))
            code = {p: v["code"] for p, v in res.items() if v.get("code")}
            total = sum(code.values())
            result(not total, "no code block scrolls sideways%s" % (
                "; %d blocks do, on %d pages (the lines over 100 columns)%s" % (
                    total, len(code), "" if strict else " -- a warning until the final pass") if total else ""),
                warn=not strict)
        if shot:
            target = "file://" + os.path.join(book, "08-the-forward-pass.html")
            subprocess.run(flags + ["--screenshot=" + os.path.abspath(shot), target],
                           capture_output=True, timeout=120)
            result(os.path.exists(shot), "screenshot of chapter 8 written to %s" % shot)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("%d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
