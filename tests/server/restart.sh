#!/bin/sh
# tests/server/restart.sh [BINARY] -- sessions on disk survive a server restart.
#
#   1. `BINARY --server --kv-disk-dir D` on the tiny model gets a prompt of
#      about 2100 tokens: its prefill saves a cold snapshot at 2048 tokens
#      (dsv4-format.md §5.5: len - 32 rounded down to 2048).
#   2. SIGTERM: the server exits cleanly and saves the live session
#      (reason "shutdown").
#   3. A new server on the same D gets the same conversation plus a reply
#      and a follow-up question: its usage must report >= 2000 cached prompt
#      tokens (OpenAI usage.prompt_tokens_details.cached_tokens), loaded
#      from disk, not prefilled.
#   4. An Anthropic request for the first prompt alone leaves the live
#      session before its end: with --sessions 2 it is served from a fork of
#      that session rewound to its checkpoint at 2048 tokens (12.10), the
#      conversation itself kept whole (usage.cache_read_input_tokens >= 2000).
#   5. A third server with --sessions 1 gets the second conversation, then
#      the first prompt: its one session is saved (reason "evict", or found
#      already saved by the shutdown of server 2) before it rewinds in place.
#
# Loopback only; every server is stopped on exit. Last line: "N passed, N failed".

BIN=${1:-./ds4}
MODEL=${MODEL:-vectors/tiny.gguf}
TMP=$(mktemp -d)
D=$TMP/kv
passed=0
failed=0
PID=

ok() { passed=$((passed + 1)); echo "ok   $1"; }
bad() { failed=$((failed + 1)); echo "FAIL $1"; }

# stop_server: SIGTERM, then wait up to 30 s; sets rc to the exit status.
stop_server() {
    rc=
    [ -n "$PID" ] || return
    kill -TERM "$PID" 2>/dev/null
    for _ in $(seq 1 300); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$PID" 2>/dev/null
    wait "$PID"
    rc=$?
    PID=
}

cleanup() {
    stop_server
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

# start_server N: server number N, its stderr in $TMP/server.N; sets URL.
start_server() {
    rm -f "$TMP/port"
    "$BIN" --server -m "$MODEL" --port 0 --port-file "$TMP/port" --ctx 8192 --kv-disk-dir "$D" \
        --sessions "${SESSIONS:-2}" \
        >"$TMP/server.$1" 2>&1 &
    PID=$!
    URL=
    for _ in $(seq 1 100); do
        [ -s "$TMP/port" ] && URL=http://127.0.0.1:$(cat "$TMP/port") && break
        kill -0 "$PID" 2>/dev/null || break
        sleep 0.1
    done
}

# post PATH BODY_FILE OUT: one request, 120 s at most; prints the HTTP status.
post() {
    curl -s --max-time 120 -o "$3" -w '%{http_code}' "$URL$1" -H 'Content-Type: application/json' \
        -H 'anthropic-version: 2023-06-01' -d @"$2"
}

field() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p" "$2" | head -n 1; }

# About 2100 tokens of user text (19 tokens per sentence in the tiny vocabulary).
long=$(awk 'BEGIN { for (i = 0; i < 110; i++) printf "The quick brown fox jumps over the lazy dog. " }')
printf '{"model": "m", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "%s"}]}' \
    "$long" >"$TMP/first.json"

start_server 1
if [ -z "$URL" ]; then
    cat "$TMP/server.1"
    echo "server did not start"
    echo "0 passed, 1 failed"
    exit 1
fi
code=$(post /v1/chat/completions "$TMP/first.json" "$TMP/r1.json")
prompt=$(field prompt_tokens "$TMP/r1.json")
[ "$code" = 200 ] && [ "${prompt:-0}" -ge 2080 ] && grep -q "saved 2048 tokens (cold)" "$TMP/server.1" \
    && ok "first server: $prompt-token prompt answered, cold snapshot of 2048 tokens saved" \
    || bad "first server: HTTP $code, prompt_tokens $prompt, $(head -c 300 "$TMP/r1.json"); $(tail -n 3 "$TMP/server.1")"
stop_server
[ "$rc" = 0 ] && grep -q "(shutdown)" "$TMP/server.1" \
    && ok "SIGTERM: clean exit (status 0), live session saved: $(grep '(shutdown)' "$TMP/server.1")" \
    || bad "SIGTERM: status $rc, $(tail -n 3 "$TMP/server.1")"

# The reply, as the client would send it back, then a follow-up.
reply=$(sed -n 's/.*"content":"\(\([^"\\]\|\\.\)*\)".*/\1/p' "$TMP/r1.json" | head -n 1)
printf '{"model": "m", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "%s"}, {"role": "assistant", "content": "%s"}, {"role": "user", "content": "And then?"}]}' \
    "$long" "$reply" >"$TMP/second.json"
start_server 2
code=$(post /v1/chat/completions "$TMP/second.json" "$TMP/r2.json")
cached=$(field cached_tokens "$TMP/r2.json")
prompt=$(field prompt_tokens "$TMP/r2.json")
[ "$code" = 200 ] && [ "${cached:-0}" -ge 2000 ] && grep -q "loaded .* tokens from $D" "$TMP/server.2" \
    && ok "restarted server: $cached of $prompt prompt tokens cached (loaded from disk): $(grep 'loaded' "$TMP/server.2" | head -n 1)" \
    || bad "restarted server: HTTP $code, cached_tokens $cached, $(head -c 300 "$TMP/r2.json"); $(tail -n 3 "$TMP/server.2")"

code=$(post /v1/messages "$TMP/first.json" "$TMP/r3.json")
cached=$(field cache_read_input_tokens "$TMP/r3.json")
[ "$code" = 200 ] && [ "${cached:-0}" -ge 2000 ] && grep -q "forked and rewound, $cached of" "$TMP/server.2" \
    && ok "Anthropic request for the first prompt: $cached tokens from a rewound fork of the session ($(grep 'forked' "$TMP/server.2" | tail -n 1))" \
    || bad "fork + rewind: HTTP $code, cache_read_input_tokens $cached, $(head -c 300 "$TMP/r3.json"); $(tail -n 3 "$TMP/server.2")"
stop_server
[ "$rc" = 0 ] && ok "second server stops cleanly" || bad "second server: status $rc"

SESSIONS=1 start_server 3
post /v1/chat/completions "$TMP/second.json" "$TMP/r4.json" >/dev/null
code=$(post /v1/messages "$TMP/first.json" "$TMP/r5.json")
cached=$(field cache_read_input_tokens "$TMP/r5.json")
saved=$(grep -E "\(evict\)|already saved" "$TMP/server.3" | tail -n 1)
[ "$code" = 200 ] && [ "${cached:-0}" -ge 2000 ] && [ -n "$saved" ] \
    && grep -q "session 1 of 1 rewound, $cached of" "$TMP/server.3" \
    && ok "--sessions 1: the session goes to disk ($saved) before it rewinds in place; $cached tokens cached" \
    || bad "--sessions 1 evict: HTTP $code, cache_read_input_tokens $cached; $(tail -n 3 "$TMP/server.3")"
stop_server

list=$("$BIN" --kv-list "$D" | tail -n 1)
check=$("$BIN" --kv-check "$D" | tail -n 1)
echo "$check" | grep -q ", 0 bad" && ok "--kv-check after two servers: $check ($list)" || bad "--kv-check: $check"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
