#!/bin/sh
# Command-line behaviour of ./ds4 and ./ds4-convert: what a user types, what
# comes back. Each check prints what it ran and what it compared.
# Run from the repository root.

passed=0
failed=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ok()   { passed=$((passed + 1)); echo "ok   $1"; }
bad()  { failed=$((failed + 1)); echo "FAIL $1"; }

# expect STATUS "NEEDLE" DESCRIPTION -- COMMAND...: exit status and a stderr substring
expect() {
    want=$1 needle=$2 what=$3
    shift 4
    "$@" >"$tmp/out" 2>"$tmp/err"
    got=$?
    if [ "$got" -eq "$want" ] && grep -q -- "$needle" "$tmp/err"; then
        ok "$what (status $got, says '$needle')"
    else
        bad "$what: status $got (want $want), stderr: $(head -c 300 "$tmp/err")"
    fi
}

M=vectors/tiny.gguf

# Generation: N ids, in range, deterministic when greedy or seeded.
./ds4 -m $M --tokens "1 2 3" -n 8 >"$tmp/a" 2>/dev/null
count=$(wc -w <"$tmp/a")
[ "$count" -eq 8 ] && ok "--tokens \"1 2 3\" -n 8 prints 8 ids" || bad "-n 8 printed $count ids"
./ds4 -m $M --tokens "1,2,3" -n 8 >"$tmp/b" 2>/dev/null
cmp -s "$tmp/a" "$tmp/b" && ok "greedy generation repeats exactly (comma or space separated)" || bad "greedy runs differ"
./ds4 -m $M --tokens "5 6 7" -n 12 --temp 0.9 --top-p 0.9 --top-k 40 --seed 7 >"$tmp/c" 2>/dev/null
./ds4 -m $M --tokens "5 6 7" -n 12 --temp 0.9 --top-p 0.9 --top-k 40 --seed 7 >"$tmp/d" 2>/dev/null
cmp -s "$tmp/c" "$tmp/d" && ok "sampling with --seed 7 repeats exactly" || bad "seeded sampling differs"
./ds4 -m $M --tokens "5 6 7" -n 12 --temp 0.9 --seed 8 >"$tmp/e" 2>/dev/null
cmp -s "$tmp/c" "$tmp/e" && bad "different seeds gave the same sample" || ok "a different seed gives a different sample"
awk '{ for (i = 1; i <= NF; i++) if ($i < 0 || $i >= 2048) exit 1 }' "$tmp/c" \
    && ok "sampled ids lie inside the vocabulary" || bad "sampled id outside the vocabulary"
./ds4 -m $M --tokens "1 2 3 4 5 6 7 8 9 10" -n 6 --chunk 3 >"$tmp/f" 2>/dev/null
./ds4 -m $M --tokens "1 2 3 4 5 6 7 8 9 10" -n 6 --chunk 128 >"$tmp/g" 2>/dev/null
cmp -s "$tmp/f" "$tmp/g" && ok "--chunk 3 and --chunk 128 generate the same ids" || bad "chunk size changed the output"

# Speculative decoding never changes greedy output.
for k in 1 3; do
    ./ds4 -m $M --mtp vectors/tiny-mtp.gguf --mtp-draft $k --tokens "1 2 3" -n 8 >"$tmp/s$k" 2>"$tmp/s$k.err"
    cmp -s "$tmp/a" "$tmp/s$k" && grep -q "tokens per main forward" "$tmp/s$k.err" \
        && ok "--mtp --mtp-draft $k gives the same 8 ids as plain decoding, and prints MTP statistics" \
        || bad "--mtp-draft $k changed the output or printed no statistics"
done
./ds4 -m $M --mtp vectors/tiny-mtp.gguf --mtp-gate 1 --tokens "1 2 3" -n 8 >"$tmp/g1" 2>"$tmp/g1.err"
grep -q "MTP drafted 0" "$tmp/g1.err" && cmp -s "$tmp/a" "$tmp/g1" \
    && ok "--mtp-gate 1 drafts nothing (no MTP prediction is that sure) and changes nothing" \
    || bad "--mtp-gate 1: $(cat "$tmp/g1.err" | tail -n 1)"
expect 2 "needs an integer in 0..15" "--mtp-draft 99" -- ./ds4 -m $M --tokens 1 --mtp-draft 99
expect 2 "not built into this binary" "--backend cuda (not built)" -- \
    ./ds4 -m $M --tokens 1 --backend cuda
expect 2 "unknown backend 'tpu'" "--backend tpu" -- ./ds4 -m $M --tokens 1 --backend tpu
./ds4 -m $M --backend cpu --tokens "1 2 3" -n 8 >"$tmp/be" 2>/dev/null
cmp -s "$tmp/a" "$tmp/be" && ok "--backend cpu generates the same 8 ids as the default" \
    || bad "--backend cpu changed the output"
./ds4 --bench -m $M --mtp vectors/tiny-mtp.gguf --bench-prefill 16 --bench-decode 8 >"$tmp/bench" 2>&1
grep -q "decode with MTP" "$tmp/bench" && grep -q "tokens/s" "$tmp/bench" && grep -q "smaller); save" "$tmp/bench" \
    && ok "--bench with --mtp reports decode with and without MTP, and the snapshot size vs float32 rows" \
    || bad "--bench output: $(head -c 300 "$tmp/bench")"

# --roofline: a float line per weight type, and on x86 an 8-bit line per integer kernel
# variant (ds4.c 3.9), AVX2 always among them; --fast names the variant in use.
./ds4 --bench --roofline --fast -t 1 -m $M --bench-prefill 4 --bench-decode 2 >"$tmp/roof" 2>&1
if [ "$(uname -m)" = x86_64 ]; then
    grep -q "kernel iq2_xxs .*8-bit activations (avx2) " "$tmp/roof" \
        && grep -q "kernel q2_K .*f32 activations " "$tmp/roof" \
        && grep -q "8-bit activations (--fast, $(grep -o 'iq2_xxs .*8-bit activations ([a-z0-9]*)' \
            "$tmp/roof" | head -1 | sed 's/.*(\(.*\))/\1/') kernels)" "$tmp/roof" \
        && ok "--roofline prints a kernel line per variant, the first one the variant --fast uses" \
        || bad "--roofline output: $(grep 'kernel\|model:' "$tmp/roof" | head -c 600)"
fi

# The server decodes speculatively too, and logs the MTP statistics per request.
./ds4 --server -m $M --mtp vectors/tiny-mtp.gguf --mtp-draft 2 --port 0 --port-file "$tmp/port" \
    --log "$tmp/server.log" >"$tmp/server.out" 2>&1 &
server=$!
for _ in $(seq 1 50); do [ -s "$tmp/port" ] && break; sleep 0.1; done
code=$(curl -s -o "$tmp/reply.json" -w '%{http_code}' --max-time 60 "http://127.0.0.1:$(cat "$tmp/port")/v1/chat/completions" \
    -H 'Content-Type: application/json' \
    -d '{"model": "deepseek-chat", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}')
kill $server 2>/dev/null; wait $server 2>/dev/null
[ "$code" = 200 ] && grep -q '"completion_tokens":8' "$tmp/reply.json" && grep -q "mtp_drafted=" "$tmp/server.log" \
    && ok "--server --mtp answers (8 tokens) and logs mtp_drafted/mtp_accepted" \
    || bad "--server --mtp: HTTP $code, $(head -c 200 "$tmp/reply.json"), log: $(tail -n 1 "$tmp/server.log")"

# The default model: the shipped tiny one, announced on stderr.
expect 0 "shipped tiny test model" "no -m uses the tiny model and says so" -- ./ds4 --tokens "1 2 3" -n 2

# Bad input: a message and status 2 (usage) or 1 (runtime), never a crash.
expect 2 "unknown option" "unknown flag" -- ./ds4 --frobnicate
expect 2 "needs an integer" "-n with a non-number" -- ./ds4 --tokens 1 -n lots
expect 2 "needs a number" "--temp out of range" -- ./ds4 --tokens 1 --temp -1
expect 2 "needs a value" "-m without a value" -- ./ds4 -m
expect 2 "not a token id" "--tokens with a word" -- ./ds4 -m $M --tokens "1 two 3"
expect 2 "thinking, chat or max" "--mode with an unknown mode" -- ./ds4 --render-chat x.json --mode fast
expect 2 "give one" "--nothink together with --mode" -- ./ds4 -m $M -p hi --nothink --mode chat
expect 2 "not both" "--tokens together with -p" -- ./ds4 -m $M -p hi --tokens 1
expect 1 "cannot open" "--render-chat with a missing file" -- ./ds4 --render-chat "$tmp/none.json"
printf '[{"role": "user", "content": 5}' >"$tmp/chat.json"
expect 1 "JSON error" "--render-chat with broken JSON" -- ./ds4 --render-chat "$tmp/chat.json"
./ds4-convert vectors/tiny "$tmp/novocab.gguf" >/dev/null 2>&1
expect 1 "has no vocabulary" "-p on a model without a vocabulary" -- ./ds4 -m "$tmp/novocab.gguf" -p hi
expect 1 "outside the vocabulary" "token id past the vocabulary" -- ./ds4 -m $M --tokens "1 999999" -n 1
expect 1 "cannot open" "missing model file" -- ./ds4 -m "$tmp/none.gguf" --tokens 1
printf 'GGUF\003\000\000\000garbage' >"$tmp/short.gguf"
expect 1 "too short" "a 15-byte model file" -- ./ds4 -m "$tmp/short.gguf" --tokens 1
expect 1 "cannot open" "--check-vectors with a missing file" -- ./ds4 -m $M --check-vectors "$tmp/none.json"
printf '{"cases": [' >"$tmp/bad.json"
expect 1 "JSON error" "--check-vectors with broken JSON" -- ./ds4 -m $M --check-vectors "$tmp/bad.json"
expect 1 "missing tensor 'mtp.0." "--mtp given the main model instead of the MTP file" -- \
    ./ds4 -m $M --mtp $M --tokens 1

# Text: the official encoder's outputs, one chat turn, the interactive loop.
for i in 1 2 3; do
    ./ds4 --render-chat vectors/encoding/test_input_$i.json >"$tmp/r$i" 2>"$tmp/r$i.err"
    cmp -s "$tmp/r$i" vectors/encoding/test_output_$i.txt \
        && ok "--render-chat test_input_$i.json == official test_output_$i.txt (byte for byte)" \
        || bad "--render-chat case $i differs: $(diff "$tmp/r$i" vectors/encoding/test_output_$i.txt | head -c 300)"
done
# Mid-conversation system messages (ds4.c 11.8 MERGE): bare text after an assistant turn, as
# the encoder renders it; folded into the user turn where it would break the hand-over.
printf '[{"role":"system","content":"S0"},{"role":"user","content":"U1"},{"role":"system","content":"R1"},
 {"role":"assistant","content":"A1"},{"role":"system","content":"S2"},{"role":"user","content":"U2"},
 {"role":"assistant","content":"A2"},{"role":"system","content":"END"}]' >"$tmp/mid.json"
printf '<\357\275\234begin\342\226\201of\342\226\201sentence\357\275\234>S0<\357\275\234User\357\275\234>U1\n\nR1<\357\275\234Assistant\357\275\234></think>A1<\357\275\234end\342\226\201of\342\226\201sentence\357\275\234>S2<\357\275\234User\357\275\234>U2<\357\275\234Assistant\357\275\234></think>A2<\357\275\234end\342\226\201of\342\226\201sentence\357\275\234><\357\275\234User\357\275\234>END<\357\275\234Assistant\357\275\234></think>' >"$tmp/mid.want"
./ds4 --render-chat "$tmp/mid.json" --mode chat >"$tmp/mid.got" 2>&1
cmp -s "$tmp/mid.got" "$tmp/mid.want" \
    && ok "--render-chat: mid-conversation system messages folded into the user turn where needed" \
    || bad "mid-conversation system rendering: $(cat "$tmp/mid.got" | head -c 300)"
./ds4 --render-chat vectors/encoding/test_input_2.json --mode chat >"$tmp/rc" 2>/dev/null
grep -q '</think>' "$tmp/rc" && ! cmp -s "$tmp/rc" "$tmp/r2" \
    && ok "--mode chat renders the non-thinking prompt (ends the turn with </think>)" || bad "--mode chat rendering"
./ds4 -m $M -p "Hello" -n 6 >"$tmp/p1" 2>/dev/null && [ -s "$tmp/p1" ] \
    && ok "-p \"Hello\" runs one chat turn on the tiny model" || bad "-p failed"
./ds4 -m $M -p "Hello" -n 6 >"$tmp/p2" 2>/dev/null
cmp -s "$tmp/p1" "$tmp/p2" && ok "-p is deterministic at temperature 0" || bad "-p output varies"
printf 'first question\n/nothink\nsecond question\n/think\nthird\n/quit\nnever read\n' \
    | ./ds4 -m $M -n 5 >"$tmp/chat.out" 2>"$tmp/chat.err"
rc=$?
if [ "$rc" -eq 0 ] && grep -q "chat mode" "$tmp/chat.err" && grep -q "thinking mode" "$tmp/chat.err" \
   && [ "$(wc -l <"$tmp/chat.out")" -ge 3 ]; then
    ok "interactive chat: three turns, /nothink, /think, /quit (status 0)"
else
    bad "interactive chat: status $rc, $(head -c 300 "$tmp/chat.err")"
fi
./ds4 -m $M -n 5 </dev/null >/dev/null 2>&1 && ok "interactive chat ends cleanly at end of input" \
    || bad "chat at EOF did not exit 0"

# --tokenize and --perplexity (chapter 18.3, 18.4).
printf 'def reverse(s):\n    return s[::-1]\n<｜User｜>Hello world' >"$tmp/ppl.txt"
./ds4 --tokenize "$tmp/ppl.txt" -m vectors/tiny-vocab.gguf >"$tmp/tk1" 2>/dev/null
./ds4 --tokenize "$tmp/ppl.txt" -m $M >"$tmp/tk2" 2>/dev/null
[ -s "$tmp/tk1" ] && cmp -s "$tmp/tk1" "$tmp/tk2" && grep -q " 2004 " "$tmp/tk1" \
    && ok "--tokenize: a vocabulary-only GGUF gives the model's ids, <｜User｜> as one id ($(wc -w <"$tmp/tk1") ids)" \
    || bad "--tokenize: $(head -c 200 "$tmp/tk1") vs $(head -c 200 "$tmp/tk2")"
./ds4 --tokenize "$tmp/ppl.txt" -m vectors/train-vocab.gguf >"$tmp/tk3" 2>/dev/null
awk '{ for (i = 1; i <= NF; i++) if ($i < 0 || $i >= 8192) exit 1 }' "$tmp/tk3" && grep -q " 8148 " "$tmp/tk3" \
    && ok "--tokenize with vectors/train-vocab.gguf: $(wc -w <"$tmp/tk3") ids, all below 8192" \
    || bad "--tokenize train-vocab: $(head -c 200 "$tmp/tk3")"
./ds4 -m $M --perplexity "$tmp/ppl.txt" --ppl-window 8 >"$tmp/pp1" 2>/dev/null
./ds4 -m $M --perplexity "$tmp/ppl.txt" --ppl-window 8 --chunk 3 >"$tmp/pp2" 2>/dev/null
n=$(wc -w <"$tmp/tk1")
grep -q "perplexity: .*: $n tokens scored in 4 windows of <= 8" "$tmp/pp1" \
    && [ "$(cut -d'(' -f1 "$tmp/pp1")" = "$(cut -d'(' -f1 "$tmp/pp2")" ] \
    && ok "--perplexity: every token scored once, same figures with --chunk 3: $(cut -d: -f3 "$tmp/pp1" | cut -d'(' -f1)" \
    || bad "--perplexity: $(cat "$tmp/pp1") / $(cat "$tmp/pp2")"
: >"$tmp/empty.txt"
expect 1 "holds no tokens" "--perplexity on an empty file" -- ./ds4 -m $M --perplexity "$tmp/empty.txt"
expect 1 "cannot open" "--perplexity on a missing file" -- ./ds4 -m $M --perplexity "$tmp/none.txt"
expect 2 "ppl-window needs an integer" "--ppl-window 1" -- ./ds4 -m $M --perplexity x --ppl-window 1
expect 1 "no vocabulary" "--tokenize with a GGUF without a vocabulary" -- \
    ./ds4 --tokenize "$tmp/ppl.txt" -m vectors/tiny-mtp.gguf

# Sessions on disk: a second process resumes the prompt from the snapshot
# the first one saved, and prints the same reply as a run without the store.
long=$(awk 'BEGIN { for (i = 0; i < 111; i++) printf "The quick brown fox jumps over the lazy dog. " }')
./ds4 -m $M -p "$long" -n 8 >"$tmp/kv0" 2>/dev/null
./ds4 -m $M -p "$long" -n 8 --kv-disk-dir "$tmp/kv" >"$tmp/kv1" 2>"$tmp/kv1.err"
grep -q "saved 2048 tokens (cold)" "$tmp/kv1.err" && grep -q "(shutdown)" "$tmp/kv1.err" && cmp -s "$tmp/kv0" "$tmp/kv1" \
    && ok "-p with --kv-disk-dir: a cold snapshot (2048 tokens) and a shutdown one saved, reply unchanged" \
    || bad "-p --kv-disk-dir, first run: $(head -c 300 "$tmp/kv1.err")"
./ds4 -m $M -p "$long" -n 8 --kv-disk-dir "$tmp/kv" >"$tmp/kv2" 2>"$tmp/kv2.err"
grep -q "loaded 2048 tokens from $tmp/kv" "$tmp/kv2.err" && cmp -s "$tmp/kv0" "$tmp/kv2" \
    && ok "a second process loads the snapshot and prints the same reply as a run without it: $(grep loaded "$tmp/kv2.err")" \
    || bad "-p --kv-disk-dir, second run: $(head -c 300 "$tmp/kv2.err"), reply same: $(cmp -s "$tmp/kv0" "$tmp/kv2" && echo yes || echo no)"
ids=$(awk 'BEGIN { for (i = 1; i <= 2100; i++) printf "%d ", (i * 7) % 2000 + 10 }')
./ds4 -m $M --tokens "$ids" -n 6 >"$tmp/kt0" 2>/dev/null
./ds4 -m $M --tokens "$ids" -n 6 --kv-disk-dir "$tmp/kvt" >/dev/null 2>&1
./ds4 -m $M --tokens "$ids" -n 6 --kv-disk-dir "$tmp/kvt" >"$tmp/kt2" 2>"$tmp/kt2.err"
grep -q "loaded 2048 tokens" "$tmp/kt2.err" && cmp -s "$tmp/kt0" "$tmp/kt2" \
    && ok "--tokens with --kv-disk-dir: the second process resumes by token ids, same ids out" \
    || bad "--tokens --kv-disk-dir: $(head -c 300 "$tmp/kt2.err")"
./ds4 --kv-list "$tmp/kv" >"$tmp/list" 2>&1
grep -q "^2 snapshots" "$tmp/list" && grep -q " cold " "$tmp/list" && grep -q " shutdown " "$tmp/list" \
    && ok "--kv-list: $(tail -n 1 "$tmp/list") (cold, shutdown)" || bad "--kv-list: $(cat "$tmp/list")"
./ds4 --kv-check "$tmp/kv" >"$tmp/check" 2>&1 && grep -q "2 snapshots verified, 0 bad" "$tmp/check" \
    && ok "--kv-check: $(tail -n 1 "$tmp/check")" || bad "--kv-check: $(cat "$tmp/check")"
cp -r "$tmp/kv" "$tmp/kvbad"
f=$(ls "$tmp/kvbad"/*.kv | head -n 1)
at=$(( $(wc -c <"$f") - 1000 ))          # a byte of the payload: the CRC must catch it
byte=$(dd if="$f" bs=1 skip=$at count=1 2>/dev/null | od -An -tx1 | tr -d ' ')
[ "$byte" = 58 ] && flip=Y || flip=X
printf '%s' "$flip" | dd of="$f" bs=1 seek=$at conv=notrunc 2>/dev/null
./ds4 --kv-check "$tmp/kvbad" >"$tmp/check" 2>&1
rc=$?
[ "$rc" -eq 1 ] && grep -q "1 bad" "$tmp/check" && [ ! -e "$f" ] \
    && ok "--kv-check finds a flipped byte (status 1) and removes that entry" || bad "--kv-check on a damaged file: status $rc, $(cat "$tmp/check")"
./ds4 --kv-clear "$tmp/kv" >"$tmp/clear" 2>&1 && grep -q "removed 2 snapshots" "$tmp/clear" \
    && ./ds4 --kv-list "$tmp/kv" 2>&1 | grep -q "^0 snapshots" && [ -z "$(ls "$tmp/kv" | grep '\.kv$')" ] \
    && ok "--kv-clear: $(cat "$tmp/clear"); the list is empty" || bad "--kv-clear: $(cat "$tmp/clear")"
expect 1 "is not a directory" "--kv-list on a missing directory" -- ./ds4 --kv-list "$tmp/none"
expect 1 "is not a directory" "--kv-check on a missing directory" -- ./ds4 --kv-check "$tmp/none"
expect 1 "is not a directory" "--kv-clear on a missing directory" -- ./ds4 --kv-clear "$tmp/none"
expect 1 "not a KV cache directory" "--kv-clear on a directory that is not a store" -- ./ds4 --kv-clear "$tmp"
expect 2 "need --kv-disk-dir" "--kv-disk-space-mb without --kv-disk-dir" -- ./ds4 --tokens 1 --kv-disk-space-mb 100
expect 2 "needs an integer" "--kv-disk-write-mb-per-hour 0" -- ./ds4 --tokens 1 --kv-disk-dir "$tmp/kv" --kv-disk-write-mb-per-hour 0

# The converter's command line.
expect 2 "usage" "ds4-convert without arguments" -- ./ds4-convert
expect 1 "config.json" "ds4-convert on a directory without a checkpoint" -- ./ds4-convert "$tmp" "$tmp/x.gguf"

# The full published width: one synthetic layer loads and runs.
if ./ds4-convert --synthetic full --layers 1 "$tmp/full.gguf" >"$tmp/conv.log" 2>&1; then
    ok "ds4-convert --synthetic full --layers 1 writes a full-width model"
    ./ds4 -m "$tmp/full.gguf" --tokens "0 1 128803 129279" -n 3 >"$tmp/full.out" 2>"$tmp/full.err"
    n=$(wc -w <"$tmp/full.out")
    [ "$n" -eq 3 ] && ok "the full-width model (dim 4096, 256 experts, vocab 129280) generates 3 ids" \
                   || bad "full-width run: $(head -c 300 "$tmp/full.err")"
else
    bad "synthetic full-width model: $(tail -n 3 "$tmp/conv.log")"
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
