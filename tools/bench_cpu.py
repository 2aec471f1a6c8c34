#!/usr/bin/env python3
"""tools/bench_cpu.py -- issue 15's CPU figures for two builds, run alternately.

    python3 tools/bench_cpu.py BEFORE/ds4 AFTER/ds4 [--runs 5] [--full FULL.gguf]
                               [--tiny vectors/tiny.gguf] [--cases kernels,decode,prefill,tiny]

The build machine is shared and noisy, so every figure is the median of --runs runs, and the
runs alternate (before, after, before, after, ...) so that a slow minute hurts both builds
alike. The cases:

  kernels  `--bench --roofline -t 1` on the tiny model: each weight type's dot kernel, GB/s of
           weight bytes from cache and from DRAM, float and 8-bit activations (every column
           the binary prints, by position)
  decode   the full-width file, `--fast`, -t 1 and -t 2: decode tok/s, ms CPU per token and
           the share of the measured read bandwidth (`--roofline`)
  prefill  the full-width file, `--fast`, -t 1 and -t 2: a prefill of --prefill tokens
  tiny     the tiny model, -t 1 and -t 2: decode tok/s and ms CPU per token

Prints one Markdown table per case. Standard library only.
"""
import argparse
import re
import statistics
import subprocess
import sys

FIGURE = re.compile(r"(?<![\w.])[0-9]+\.[0-9]+(?![\w.])")   # the bench prints figures as %.2f


def run(binary, args):
    """stdout + stderr of one bench run (a failed run stops the whole measurement)."""
    p = subprocess.run([binary] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
    if p.returncode != 0:
        sys.exit("%s %s failed (rc %d):\n%s" % (binary, " ".join(args), p.returncode, p.stdout))
    return p.stdout


def field(text, pattern):
    """The first group of `pattern` in `text` as a float, or None."""
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def alternate(binaries, args, runs, parse):
    """{binary: [parse(output) per run]}, the binaries taking turns."""
    out = {b: [] for b in binaries}
    for _ in range(runs):
        for b in binaries:
            out[b].append(parse(run(b, args)))
    return out


def median_of(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=2):
    return "-" if v is None else "%.*f" % (digits, v)


def kernel_lines(text):
    """{kernel label: [numbers]} from the `roofline: kernel` lines."""
    rows = {}
    for line in text.splitlines():
        if not line.startswith("roofline: kernel"):
            continue
        head, _, rest = line.partition("GB/s of weights:")
        label = " ".join(head.replace("roofline: kernel", "").split())
        label += " | " + " ".join(FIGURE.sub("#", rest).split())
        rows[label] = [float(x) for x in FIGURE.findall(rest)]
    return rows


def case_kernels(binaries, a):
    got = alternate(binaries, ["--bench", "--roofline", "-t", "1", "-m", a.tiny,
                               "--bench-decode", "8"], a.runs, kernel_lines)
    print("\n### kernels, 1 thread, GB/s of weight bytes (median of %d)\n" % a.runs)
    for b in binaries:
        print("%s:\n" % b)
        labels = []
        for r in got[b]:
            labels += [k for k in r if k not in labels]
        for k in labels:
            cols = [r.get(k, []) for r in got[b]]
            width = max(len(c) for c in cols)
            med = [median_of([c[i] if i < len(c) else None for c in cols]) for i in range(width)]
            print("    %-70s %s" % (k, " ".join(fmt(m) for m in med)))
        print()


def decode_fields(text):
    return (field(text, r"decode:.*= *([0-9.]+) tokens/s"),
            field(text, r"([0-9.]+) ms CPU per token"),
            field(text, r"= *([0-9.]+)% of that ceiling"),
            field(text, r"prefill:.*= *([0-9.]+) tokens/s"))


def case_threads(binaries, a, model, extra, title, prefill_only=False, threads=("1", "2")):
    print("\n### %s (median of %d alternating runs)\n" % (title, a.runs))
    print("| threads | binary | prefill tok/s | decode tok/s | decode ms CPU / token "
          "| decode % of ceiling |")
    print("|---|---|---|---|---|---|")
    for t in threads:
        got = alternate(binaries, ["-m", model, "-t", t] + extra, a.runs, decode_fields)
        for b in binaries:
            cols = list(zip(*got[b]))
            dec, cpu, share, pre = (median_of(c) for c in cols)
            if prefill_only:
                dec = cpu = share = None
            print("| %s | %s | %s | %s | %s | %s |" % (t, b, fmt(pre), fmt(dec), fmt(cpu),
                                                        fmt(share, 0)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("binaries", nargs="+")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--full", default="/work/bench/fw4.gguf")
    p.add_argument("--tiny", default="vectors/tiny.gguf")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--prefill-threads", default="1,2", help="thread counts of the prefill case")
    p.add_argument("--cases", default="kernels,decode,prefill,tiny")
    a = p.parse_args()
    cases = a.cases.split(",")
    if "kernels" in cases:
        case_kernels(a.binaries, a)
    if "decode" in cases:
        case_threads(a.binaries, a, a.full, ["--bench", "--roofline", "--fast",
                     "--bench-prefill", "16", "--bench-decode", "8"],
                     "full width, --fast, decode")
    if "prefill" in cases:
        case_threads(a.binaries, a, a.full, ["--bench", "--fast", "--bench-prefill",
                     str(a.prefill), "--bench-decode", "1"],
                     "full width, --fast, prefill of %d tokens" % a.prefill, prefill_only=True,
                     threads=a.prefill_threads.split(","))
    if "tiny" in cases:
        case_threads(a.binaries, a, a.tiny, ["--bench", "--bench-decode", "200"],
                     "tiny model, default kernels")


if __name__ == "__main__":
    main()
