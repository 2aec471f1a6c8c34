#!/usr/bin/env python3
"""Generate the Unicode class table used by the ds4 pre-tokenizer.

Usage:  python3 tools/gen_unicode.py [/usr/share/unicode/UnicodeData.txt] > table.inc

The DeepSeek V3/V4 pre-tokenizer regex only ever asks five questions about a
code point: is it a letter or mark (\\p{L}, \\p{M}; the regex always uses them
together or in a way where they behave alike), a number (\\p{N}), punctuation
or symbol (\\p{P}, \\p{S}; always used as a union), white space (\\s, the
Unicode White_Space property), or none of these.  So we collapse the general
categories into five classes and write one sorted table of boundaries:

    entry = (first_code_point << 3) | class

Each entry covers code points from its own start up to the next entry's
start.  The C code finds a code point's class with one binary search.

The input is Debian's `unicode-data` package (apt-get install unicode-data).
The output is the fenced block pasted into staging/text.c between the
"BEGIN GENERATED UNICODE TABLE" / "END GENERATED UNICODE TABLE" markers.
"""
import sys

U_OTHER, U_LETTER, U_NUMBER, U_PUNCT, U_SPACE = 0, 1, 2, 3, 4
NAMES = ["U_OTHER", "U_LETTER", "U_NUMBER", "U_PUNCT", "U_SPACE"]

# PropList.txt White_Space (stable since Unicode 6.3).
WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0),
               (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
               (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]


def category_class(gc):
    if gc[0] in "LM":
        return U_LETTER
    if gc[0] == "N":
        return U_NUMBER
    if gc[0] in "PS":
        return U_PUNCT
    return U_OTHER


def load(path):
    cls = bytearray(0x110000)  # U_OTHER everywhere, including unassigned
    first = None
    version = "?"
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split(";")
            cp, name, gc = int(fields[0], 16), fields[1], fields[2]
            c = category_class(gc)
            if name.endswith(", First>"):
                first = cp
                continue
            if name.endswith(", Last>"):
                for x in range(first, cp + 1):
                    cls[x] = c
                first = None
                continue
            cls[cp] = c
    for a, b in WHITE_SPACE:
        for x in range(a, b + 1):
            cls[x] = U_SPACE
    return cls


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/unicode/UnicodeData.txt"
    cls = load(path)
    entries = []
    prev = None
    for cp in range(0x110000):
        if cls[cp] != prev:
            entries.append((cp << 3) | cls[cp])
            prev = cls[cp]
    out = []
    out.append("/* BEGIN GENERATED UNICODE TABLE: tools/gen_unicode.py from %s"
               % path.split("/")[-1])
    out.append(" * (Debian unicode-data 15.0.0). %d entries; do not edit by hand. */"
               % len(entries))
    out.append("static const uint32_t unicode_class_table[%d] = {" % len(entries))
    for i in range(0, len(entries), 8):
        out.append("    " + ",".join("0x%x" % e for e in entries[i:i + 8]) + ",")
    out.append("};")
    out.append("/* END GENERATED UNICODE TABLE */")
    print("\n".join(out))


if __name__ == "__main__":
    main()
