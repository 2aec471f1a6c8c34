#!/bin/sh
# tests/server/run.sh [BINARY] -- the HTTP server, end to end.
#
# Starts `BINARY --server` (default ./ds4)
# on the tiny model, on a free 127.0.0.1 port, with a test script of forced
# replies (--test-script, see ds4.c "The test script"), then:
#   - curl: raw HTTP edge cases, each must get the API's own error JSON;
#   - node: sdk.test.mjs drives it with the real `openai` and
#     `@anthropic-ai/sdk` packages (run `npm ci` in tests/server first; the
#     node part is skipped, and counted as failed, when they are missing).
# Ends with "N passed, N failed"; exit 0 iff all passed. Run from the repo root.

BIN=${1:-./ds4}
MODEL=${MODEL:-vectors/tiny.gguf}
DIR=$(cd "$(dirname "$0")" && pwd)
TMP=$(mktemp -d)
KEY=test-key-123
passed=0
failed=0
SERVER_PID=

cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$SERVER_PID" 2>/dev/null
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

ok() { passed=$((passed + 1)); echo "ok   $1"; }
bad() { failed=$((failed + 1)); echo "FAIL $1"; }

# ---- the test script: forced replies, matched in the last user turn
{
    printf '[\n'
    printf ' {"match": "<tool_result>", "reply": "It is 21C in Rome."},\n'
    printf ' {"match": "Weather in Rome", "reply": "Let me check.\\n\\n<\357\275\234DSML\357\275\234tool_calls>\\n<\357\275\234DSML\357\275\234invoke name=\\"get_weather\\">\\n\\n<\357\275\234DSML\357\275\234parameter name=\\"location\\" string=\\"true\\">Rome</\357\275\234DSML\357\275\234parameter>\\n<\357\275\234DSML\357\275\234parameter name=\\"days\\" string=\\"false\\">2</\357\275\234DSML\357\275\234parameter>\\n</\357\275\234DSML\357\275\234invoke>\\n</\357\275\234DSML\357\275\234tool_calls>"},\n'
    printf ' {"match": "Think about", "reply": "Short thought.</think>The answer is 4."},\n'
    printf ' {"match": "stop test", "reply": "alpha beta STOP gamma"},\n'
    printf ' {"match": "unicode", "reply": "h\303\251llo \360\237\230\200 w\303\266rld"},\n'
    i=1
    while [ $i -le 16 ]; do
        printf ' {"match": "concurrency test %d of 16", "reply": "answer %d"},\n' $i $i
        i=$((i + 1))
    done
    printf ' {"match": "scripted thinking", "reply": "I think.</think>Done."}\n'
    printf ']\n'
} > "$TMP/script.json"

# ---- start the server on a free port
"$BIN" --server -m "$MODEL" --port 0 --port-file "$TMP/port" --api-key "$KEY" --cors http://allowed.test \
    --test-script "$TMP/script.json" --log "$TMP/server.log" --ctx 8192 --max-body 1048576 \
    --header-timeout 2 --body-timeout 2 --max-conns 64 >"$TMP/server.out" 2>&1 &
SERVER_PID=$!
PORT=
for _ in $(seq 1 100); do
    [ -s "$TMP/port" ] && PORT=$(cat "$TMP/port") && break
    kill -0 $SERVER_PID 2>/dev/null || break
    sleep 0.1
done
URL=http://127.0.0.1:$PORT
if [ -z "$PORT" ] || ! curl -sf --max-time 5 "$URL/health" >/dev/null; then
    cat "$TMP/server.out"
    echo "server did not start"
    echo "0 passed, 1 failed"
    exit 1
fi
echo "server on $URL (pid $SERVER_PID)"

# check NAME EXPECTED_STATUS BODY_PATTERN -- curl args...
# Runs curl, compares the status and greps the body for a pattern.
check() {
    name=$1 want=$2 pattern=$3
    shift 3
    status=$(curl -s --max-time 10 -o "$TMP/body" -w '%{http_code}' "$@")
    if [ "$status" = "$want" ] && grep -q -- "$pattern" "$TMP/body"; then
        ok "$name"
    else
        bad "$name (status $status, want $want; body: $(head -c 300 "$TMP/body"))"
    fi
}

AUTH="Authorization: Bearer $KEY"
JSON="Content-Type: application/json"
CHAT="$URL/v1/chat/completions"

check "health needs no key" 200 '"ok"' "$URL/health"
check "missing key: 401 OpenAI shape" 401 '"type":"authentication_error"' "$URL/v1/models"
check "wrong key: 401" 401 'invalid API key' -H "Authorization: Bearer nope" "$URL/v1/models"
check "missing key on /v1/messages: Anthropic shape" 401 '"type":"error","error":{"type":"authentication_error"' \
    -H "$JSON" -d '{}' "$URL/v1/messages"
check "x-api-key accepted" 200 'deepseek-v4-flash' -H "x-api-key: $KEY" "$URL/v1/models"
check "model by id" 200 '"object":"model"' -H "$AUTH" "$URL/v1/models/deepseek-chat"
check "unknown model: 404" 404 'model_not_found' -H "$AUTH" "$URL/v1/models/gpt-9"
check "unknown route: 404" 404 'unknown endpoint' -H "$AUTH" "$URL/v2/whatever"
check "wrong method: 405" 405 '"error"' -H "$AUTH" "$CHAT"
check "DELETE: 405" 405 '"error"' -X DELETE -H "$AUTH" "$URL/v1/models"
check "bad JSON: 400" 400 'invalid request body: JSON error' -H "$AUTH" -H "$JSON" -d '{"messages": [' "$CHAT"
check "empty body: 400" 400 'invalid request body' -H "$AUTH" -H "$JSON" -d '' "$CHAT"
check "body not an object: 400" 400 'must be a JSON object' -H "$AUTH" -H "$JSON" -d '[1,2]' "$CHAT"
check "missing messages: 400" 400 "'messages' must be a non-empty array" -H "$AUTH" -H "$JSON" -d '{"model":"x"}' "$CHAT"
check "wrong field type: 400" 400 "'temperature' must be a number" -H "$AUTH" -H "$JSON" \
    -d '{"messages":[{"role":"user","content":"hi"}],"temperature":"hot"}' "$CHAT"
check "stream not a bool: 400" 400 "'stream' must be a boolean" -H "$AUTH" -H "$JSON" \
    -d '{"messages":[{"role":"user","content":"hi"}],"stream":"yes"}' "$CHAT"
check "unknown role: 400" 400 "unknown role" -H "$AUTH" -H "$JSON" -d '{"messages":[{"role":"wizard","content":"hi"}]}' "$CHAT"
check "image part: 400" 400 "not supported" -H "$AUTH" -H "$JSON" \
    -d '{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}' "$CHAT"
check "deep nesting: 400" 400 'invalid request body' -H "$AUTH" -H "$JSON" \
    -d "{\"messages\":$(printf '%.0s[' $(seq 1 300))" "$CHAT"
check "previous_response_id: 400" 400 'replay the full input' -H "$AUTH" -H "$JSON" \
    -d '{"input":"hi","previous_response_id":"resp_1"}' "$URL/v1/responses"
check "anthropic bad request: Anthropic shape" 400 '"type":"invalid_request_error"' -H "x-api-key: $KEY" -H "$JSON" \
    -d '{"max_tokens":5}' "$URL/v1/messages"

head -c 2000000 /dev/zero | tr '\0' 'a' > "$TMP/huge"
check "huge body: 413" 413 'larger than the limit' -H "$AUTH" -H "$JSON" --data-binary @"$TMP/huge" "$CHAT"
check "huge body without Expect: 413" 413 'larger than the limit' -H "$AUTH" -H "$JSON" -H 'Expect:' \
    --data-binary @"$TMP/huge" "$CHAT"
check "huge header: 431" 431 'request head larger' -H "X-Big: $(head -c 70000 /dev/zero | tr '\0' b)" "$URL/health"
check "chunked upload: decoded, then judged (400 on empty messages)" 400 "'messages' must be a non-empty array" \
    -H "$AUTH" -H "$JSON" -H 'Transfer-Encoding: chunked' -d '{"messages":[]}' "$CHAT"
check "body shorter than Content-Length: 408 after --body-timeout" 408 'not received' -H "$AUTH" -H "$JSON" \
    -H 'Content-Length: 100' -d '{"messages":' "$CHAT"

# A prompt longer than the context (8192 here).
words=$(head -c 60000 /dev/zero | tr '\0' 'x' | sed 's/x\{6\}/hello /g')
printf '{"messages":[{"role":"user","content":"%s"}]}' "$words" > "$TMP/long.json"
check "context overflow: 400 context_length_exceeded" 400 '"code":"context_length_exceeded"' -H "$AUTH" -H "$JSON" \
    --data-binary @"$TMP/long.json" "$CHAT"

# CORS: only the configured origin is echoed.
curl -s --max-time 5 -D "$TMP/h" -o /dev/null -X OPTIONS -H 'Origin: http://allowed.test' \
    -H 'Access-Control-Request-Method: POST' "$CHAT"
if grep -qi '^Access-Control-Allow-Origin: http://allowed.test' "$TMP/h" && grep -q ' 204 ' "$TMP/h"; then
    ok "CORS preflight for the allowed origin"
else
    bad "CORS preflight for the allowed origin: $(cat "$TMP/h")"
fi
curl -s --max-time 5 -D "$TMP/h" -o /dev/null -H 'Origin: http://evil.test' "$URL/health"
if grep -qi '^Access-Control-Allow-Origin' "$TMP/h"; then bad "CORS: other origin must get no ACAO"; else ok "CORS: other origin gets no ACAO"; fi

# Plain generation with curl: non-streaming and streaming.
check "curl chat: scripted reply" 200 'h\\u00e9llo\|héllo' -H "$AUTH" -H "$JSON" \
    -d '{"model":"deepseek-chat","messages":[{"role":"user","content":"unicode please"}]}' "$CHAT"
check "curl stream ends with [DONE]" 200 'data: \[DONE\]' -N -H "$AUTH" -H "$JSON" \
    -d '{"model":"deepseek-chat","stream":true,"messages":[{"role":"user","content":"unicode please"}]}' "$CHAT"
check "curl completions" 200 '"object":"text_completion"' -H "$AUTH" -H "$JSON" \
    -d '{"prompt":"unicode please","max_tokens":20}' "$URL/v1/completions"

# ---- the real client libraries
if [ -d "$DIR/node_modules/openai" ] && [ -d "$DIR/node_modules/@anthropic-ai/sdk" ]; then
    DS4_URL=$URL DS4_KEY=$KEY DS4_PORT=$PORT timeout 300 node "$DIR/sdk.test.mjs" > "$TMP/node.out" 2>&1
    rc=$?
    cat "$TMP/node.out"
    np=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1/p' "$TMP/node.out" | tail -n 1)
    nf=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\2/p' "$TMP/node.out" | tail -n 1)
    [ -n "$np" ] || np=0
    [ -n "$nf" ] || nf=1
    [ "$rc" -ne 0 ] && [ "$nf" -eq 0 ] && nf=1
    passed=$((passed + np))
    failed=$((failed + nf))
else
    bad "node SDK tests: run 'npm ci' in tests/server first"
fi

# Protocol fidelity (issue 9): its own server, its own script.
if [ -d "$DIR/node_modules/openai" ] && [ -d "$DIR/node_modules/@anthropic-ai/sdk" ]; then
    DS4_BIN=$BIN MODEL=$MODEL timeout 600 node "$DIR/protocol.test.mjs" > "$TMP/protocol.out" 2>&1
    rc=$?
    cat "$TMP/protocol.out"
    np=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1/p' "$TMP/protocol.out" | tail -n 1)
    nf=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\2/p' "$TMP/protocol.out" | tail -n 1)
    [ -n "$np" ] || np=0
    [ -n "$nf" ] || nf=1
    [ "$rc" -ne 0 ] && [ "$nf" -eq 0 ] && nf=1
    passed=$((passed + np))
    failed=$((failed + nf))
fi

# The server survived all of it.
check "server still healthy at the end" 200 '"ok"' "$URL/health"
if grep -q 'finish=cancelled' "$TMP/server.log"; then ok "log shows a cancelled generation"; else bad "log shows a cancelled generation"; fi
echo "--- server log (last 5 lines)"
tail -n 5 "$TMP/server.log"

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
