#!/bin/sh
# tests/server/cache.sh [BINARY] -- the prompt cache in memory (ds4.c 13.10).
#
# Real sampling (temperature 0, no test script) on the tiny model, with
# --sessions 2 --checkpoint-every 64 --chunk 32, raw HTTP through curl:
#
#   1. the same prompt twice, in each API (chat, completions, responses,
#      messages): the second time every prompt token is cached (usage), and
#      the reply is the same;
#   2. a side request between two turns of a conversation: the second turn
#      still reuses the first turn's prompt (the side request took the other
#      session instead of evicting this one);
#   3. an edited earlier turn: the prompt is served from the last checkpoint
#      inside the common prefix, and the reply equals, token for token
#      (text and completion_tokens), that of a fresh server given the edited
#      prompt alone;
#   4. --sessions 1: the side request now replaces the conversation, which
#      is what the several sessions avoid (control for 2).
#
# Prints the cached/prompt figures of each case. Loopback only; ports from
# $CACHE_PORT (default 0 = any free port). Last line: "N passed, N failed".

BIN=${1:-./ds4}
MODEL=${MODEL:-vectors/tiny.gguf}
PORT0=${CACHE_PORT:-0}
TMP=$(mktemp -d)
passed=0
failed=0
PID=

ok() { passed=$((passed + 1)); echo "ok   $1"; }
bad() { failed=$((failed + 1)); echo "FAIL $1"; }

stop_server() {
    [ -n "$PID" ] || return
    kill -TERM "$PID" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$PID" 2>/dev/null
    wait "$PID" 2>/dev/null
    PID=
}
cleanup() {
    stop_server
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

# start_server NAME SESSIONS PORT: stderr in $TMP/NAME.err; sets URL.
start_server() {
    rm -f "$TMP/port"
    "$BIN" --server -m "$MODEL" --port "$3" --port-file "$TMP/port" --ctx 4096 --sessions "$2" \
        --checkpoint-every 64 --chunk 32 >"$TMP/$1.err" 2>&1 &
    PID=$!
    URL=
    for _ in $(seq 1 100); do
        [ -s "$TMP/port" ] && URL=http://127.0.0.1:$(cat "$TMP/port") && break
        kill -0 "$PID" 2>/dev/null || break
        sleep 0.1
    done
    [ -n "$URL" ] || { cat "$TMP/$1.err"; echo "server did not start"; echo "0 passed, 1 failed"; exit 1; }
}
next_port() { [ "$PORT0" = 0 ] && echo 0 || echo $((PORT0 + $1)); }

# post PATH BODY OUT: one request, 120 s at most; prints the HTTP status.
post() {
    printf '%s' "$2" >"$TMP/body.json"
    curl -s --max-time 120 -o "$3" -w '%{http_code}' "$URL$1" -H 'Content-Type: application/json' \
        -H 'anthropic-version: 2023-06-01' -d @"$TMP/body.json"
}
num() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p" "$2" | head -n 1; }
text() { sed -n "s/.*\"$1\":\"\(\([^\"\\\\]\|\\\\.\)*\)\".*/\1/p" "$2" | head -n 1; }

long=$(awk 'BEGIN { for (i = 0; i < 20; i++) printf "The quick brown fox jumps over the lazy dog. " }')
chat() { printf '{"model": "deepseek-chat", "max_tokens": 24, "temperature": 0, "messages": [%s]}' "$1"; }
user() { printf '{"role": "user", "content": "%s"}' "$1"; }
asst() { printf '{"role": "assistant", "content": "%s"}' "$1"; }

start_server main 2 "$(next_port 0)"

# ---- 1. the same prompt twice, per API
same_twice() {   # NAME PATH BODY CACHED_FIELD PROMPT_FIELD CONTENT_FIELD
    c1=$(post "$2" "$3" "$TMP/a.json")
    c2=$(post "$2" "$3" "$TMP/b.json")
    p1=$(num "$5" "$TMP/a.json")
    k1=$(num "$4" "$TMP/a.json")
    p2=$(num "$5" "$TMP/b.json")
    k2=$(num "$4" "$TMP/b.json")
    t1=$(text "$6" "$TMP/a.json")
    t2=$(text "$6" "$TMP/b.json")
    want=$p2
    [ "$1" = messages ] && want=$((p2 + k2)) && p2=$((p2 + k2)) && p1=$((p1 + k1))
    if [ "$c1" = 200 ] && [ "$c2" = 200 ] && [ "${k2:-0}" -eq "$want" ] && [ "$want" -gt 0 ] \
        && [ "$t1" = "$t2" ] && [ -n "$t1" ]; then
        ok "$1, same prompt twice: cached/prompt $k1/$p1 then $k2/$p2, same reply ($(echo "$t1" | head -c 40)...)"
    else
        bad "$1, same prompt twice: HTTP $c1/$c2, cached/prompt $k1/$p1 then $k2/$p2, replies '$t1' / '$t2'"
    fi
}
same_twice chat /v1/chat/completions "$(chat "$(user "$long Question one?")")" \
    cached_tokens prompt_tokens content
same_twice completions /v1/completions \
    "{\"model\": \"m\", \"max_tokens\": 24, \"temperature\": 0, \"prompt\": \"$long Once upon a time\"}" \
    cached_tokens prompt_tokens text
same_twice responses /v1/responses \
    "{\"model\": \"deepseek-chat\", \"max_output_tokens\": 24, \"temperature\": 0, \"input\": \"$long Responses?\"}" \
    cached_tokens input_tokens text
same_twice messages /v1/messages \
    "{\"model\": \"deepseek-chat\", \"max_tokens\": 24, \"temperature\": 0, \"messages\": [$(user "$long Messages?")]}" \
    cache_read_input_tokens input_tokens text

# ---- 2. a side request between two turns
turn1=$(chat "$(user "$long Side test?")")
side=$(chat "$(user "Write a five word title.")")
two_turns() {   # LABEL: runs turn 1, the side request, turn 2; sets p1 k2 p2 ks ps
    post /v1/chat/completions "$turn1" "$TMP/t1.json" >/dev/null
    p1=$(num prompt_tokens "$TMP/t1.json")
    r1=$(text content "$TMP/t1.json")
    post /v1/chat/completions "$side" "$TMP/s.json" >/dev/null
    ks=$(num cached_tokens "$TMP/s.json")
    ps=$(num prompt_tokens "$TMP/s.json")
    turn2=$(chat "$(user "$long Side test?"), $(asst "$r1"), $(user "And then?")")
    post /v1/chat/completions "$turn2" "$TMP/t2.json" >/dev/null
    k2=$(num cached_tokens "$TMP/t2.json")
    p2=$(num prompt_tokens "$TMP/t2.json")
}
two_turns
[ "${k2:-0}" -ge $((${p1:-1} - 64)) ] && [ "${k2:-0}" -lt "${p2:-0}" ] \
    && ok "side request between two turns: turn 1 prompt $p1, side request $ks/$ps cached, turn 2 $k2/$p2 cached" \
    || bad "side request: turn 1 prompt $p1, side $ks/$ps, turn 2 cached/prompt $k2/$p2; $(tail -n 4 "$TMP/main.err")"

# ---- 3. an edited earlier turn
orig=$(chat "$(user "$long Edit me: first version?"), $(asst "Fine."), $(user "Next question?")")
edit=$(chat "$(user "$long Edit me: the second, edited version?"), $(asst "Fine."), $(user "Next question?")")
post /v1/chat/completions "$orig" "$TMP/o.json" >/dev/null
ko=$(num cached_tokens "$TMP/o.json")
po=$(num prompt_tokens "$TMP/o.json")
post /v1/chat/completions "$edit" "$TMP/e.json" >/dev/null
ke=$(num cached_tokens "$TMP/e.json")
pe=$(num prompt_tokens "$TMP/e.json")
te=$(text content "$TMP/e.json")
ne=$(num completion_tokens "$TMP/e.json")
grep -q "rewound, $ke of $pe prompt tokens reused" "$TMP/main.err" && how=$(grep "rewound, $ke of" "$TMP/main.err" | tail -n 1 | sed 's/^ds4-server: cache: //')
[ "${ke:-0}" -ge 256 ] && [ "${ke:-0}" -lt "${pe:-0}" ] && [ $((ke % 64)) -eq 0 ] && [ -n "$how" ] \
    && ok "edited earlier turn: original $ko/$po cached, edited $ke/$pe cached ($how)" \
    || bad "edited earlier turn: original $ko/$po, edited cached/prompt $ke/$pe; $(tail -n 3 "$TMP/main.err")"
stop_server

start_server fresh 2 "$(next_port 1)"
post /v1/chat/completions "$edit" "$TMP/f.json" >/dev/null
kf=$(num cached_tokens "$TMP/f.json")
tf=$(text content "$TMP/f.json")
nf=$(num completion_tokens "$TMP/f.json")
[ -n "$te" ] && [ "$te" = "$tf" ] && [ "$ne" = "$nf" ] && [ "${kf:-1}" = 0 ] \
    && ok "rewound session == fresh session, greedy: $ne tokens, same text ($(echo "$te" | head -c 40)...); fresh cached $kf" \
    || bad "rewound vs fresh: '$te' ($ne tokens) vs '$tf' ($nf tokens), fresh cached $kf"
stop_server

# ---- 4. control: one session, the side request evicts the conversation
start_server one 1 "$(next_port 2)"
two_turns
[ "${k2:-0}" -lt $((${p1:-1} - 64)) ] \
    && ok "control, --sessions 1: the side request replaced the conversation, turn 2 only $k2/$p2 cached" \
    || bad "control, --sessions 1: turn 2 $k2/$p2 cached (expected a miss)"
stop_server

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
