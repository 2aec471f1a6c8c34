#!/bin/sh
# tests/agents/run.sh [BINARY] -- the four coding agents against `ds4 --server` (make test-agents).
#
# Installs the current npm releases of Claude Code, Codex, opencode and Pi
# into a temporary prefix (or reuses DS4_AGENTS_PREFIX if it holds them),
# starts `BINARY --server` (default ./ds4) on the tiny model with a test
# script of forced replies (--test-script, ds4.c 13.7), and runs, for each
# agent, configured as README.md says:
#   - one non-interactive turn: the reply "Hello from ds4 (AGENT)." must be printed;
#   - one tool loop: the scripted reply calls the agent's own shell tool with
#     `echo ds4-ok-AGENT`; the agent runs it and sends the output back; the
#     script answers that with "Tool loop done (AGENT)." only if the output
#     came back, and the agent must print it.
# Requests pass through tests/agents/proxy.mjs, which records each one
# (the fields of each agent's requests are printed at the end).
# Telemetry, update checks and auto-updates are off; every agent run is
# bounded by `timeout`. Each agent gets its own HOME and config dirs.
# The tiny model prefills ~120 tokens/s on a small CPU, so Claude Code runs
# with --bare --tools Bash and a short system prompt (its full 35k-token
# prompt takes minutes here; DS4_AGENTS_FULL=1 runs it as is).
# Ends with "N passed, N failed"; exit 0 iff all passed. Run from the repo root.

BIN=${1:-./ds4}
MODEL=${MODEL:-vectors/tiny.gguf}
DIR=$(cd "$(dirname "$0")" && pwd)
PORT=${DS4_AGENTS_PORT:-18111}          # the proxy; the server listens on PORT+1
SPORT=$((PORT + 1))
TMP=$(mktemp -d)
PREFIX=${DS4_AGENTS_PREFIX:-$TMP/prefix}
LIMIT=${DS4_AGENTS_TIMEOUT:-420}
KEY=ds4-agents-key
passed=0
failed=0
SERVER_PID=
PROXY_PID=

stop_pid() {
    [ -n "$1" ] || return 0
    kill "$1" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do kill -0 "$1" 2>/dev/null || return 0; sleep 0.2; done
    kill -9 "$1" 2>/dev/null
}
cleanup() {
    stop_pid "$PROXY_PID"
    stop_pid "$SERVER_PID"
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM
ok() { passed=$((passed + 1)); echo "ok   $1"; }
bad() { failed=$((failed + 1)); echo "FAIL $1"; }

# ---- the agents, from npm
PKGS="@anthropic-ai/claude-code @openai/codex opencode-ai @mariozechner/pi-coding-agent"
B=$PREFIX/node_modules/.bin
if [ ! -x "$B/claude" ] || [ ! -x "$B/codex" ] || [ ! -x "$B/opencode" ] || [ ! -x "$B/pi" ]; then
    echo "installing $PKGS into $PREFIX"
    mkdir -p "$PREFIX"
    if ! timeout 900 npm install --prefix "$PREFIX" --no-audit --no-fund --loglevel=error $PKGS >"$TMP/npm.log" 2>&1; then
        tail -n 20 "$TMP/npm.log"
        echo "0 passed, 1 failed"
        exit 1
    fi
fi
for p in $PKGS; do echo "  $p $(node -p "require('$PREFIX/node_modules/$p/package.json').version" 2>/dev/null)"; done

# ---- the script: a turn and a tool loop per agent. Claude Code always asks
# for thinking, so its replies close the reasoning first, as the model would.
node - "$TMP/script.json" <<'JS'
const fs = require('fs');
const D = '\uff5cDSML\uff5c';
const call = (name, params) => `Running it.\n\n<${D}tool_calls>\n<${D}invoke name="${name}">\n` +
  Object.entries(params).map(([k, v]) => `<${D}parameter name="${k}" string="true">${v}</${D}parameter>`).join('\n') +
  `\n</${D}invoke>\n</${D}tool_calls>`;
const agents = {
  claude: ['Bash', { command: 'echo ds4-ok-claude', description: 'print a marker' }, 'Brief thought.</think>'],
  codex: ['exec_command', { cmd: 'echo ds4-ok-codex' }, ''],
  opencode: ['bash', { command: 'echo ds4-ok-opencode', description: 'print a marker' }, ''],
  pi: ['bash', { command: 'echo ds4-ok-pi' }, ''],
};
const rules = [];
for (const [a, [tool, params, think]] of Object.entries(agents)) {
  rules.push({ match: `ds4-ok-${a}`, reply: `${think}Tool loop done (${a}).` });
  rules.push({ match: `DS4LOOP-${a}`, reply: think + call(tool, params) });
  rules.push({ match: `DS4TURN-${a}`, reply: `${think}Hello from ds4 (${a}).` });
}
rules.push({ match: '', reply: 'Title' });            // side requests (titles, summaries)
fs.writeFileSync(process.argv[2], JSON.stringify(rules));
JS

# ---- the server (README: --kv-disk-dir recommended) and the recording proxy
mkdir -p "$TMP/requests"
"$BIN" --server -m "$MODEL" --port "$SPORT" --api-key "$KEY" --test-script "$TMP/script.json" \
    --kv-disk-dir "$TMP/kv" --log "$TMP/server.log" >"$TMP/server.out" 2>&1 &
SERVER_PID=$!
node "$DIR/proxy.mjs" "$PORT" "$SPORT" "$TMP/requests" >"$TMP/proxy.out" 2>&1 &
PROXY_PID=$!
for _ in $(seq 1 100); do
    curl -sf --max-time 2 "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 0.2
done
if ! curl -sf --max-time 2 "http://127.0.0.1:$PORT/health" >/dev/null; then
    cat "$TMP/server.out" "$TMP/proxy.out"
    echo "0 passed, 1 failed"
    exit 1
fi
URL=http://127.0.0.1:$PORT
echo "server on 127.0.0.1:$SPORT behind the recording proxy on $URL"

# Every agent: its own HOME, nothing written outside $TMP, no telemetry.
mkdir -p "$TMP/work"
cd "$TMP/work" || exit 1
git init -q . 2>/dev/null
AGENT_ENV="HOME=$TMP/home XDG_CONFIG_HOME=$TMP/home/.config XDG_DATA_HOME=$TMP/home/.local/share
XDG_CACHE_HOME=$TMP/home/.cache XDG_STATE_HOME=$TMP/home/.local/state NO_UPDATE_NOTIFIER=1
DO_NOT_TRACK=1"
mkdir -p "$TMP/home/.config/opencode" "$TMP/home/.pi/agent" "$TMP/home/.codex"

# run NAME EXPECTED -- command...: bounded run, output in $TMP/NAME.out, grep for EXPECTED.
run() {
    name=$1 want=$2
    shift 2
    start=$(date +%s)
    env $AGENT_ENV timeout "$LIMIT" "$@" </dev/null >"$TMP/$name.out" 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    if grep -q "$want" "$TMP/$name.out"; then
        ok "$name (${secs}s)"
    else
        bad "$name (rc $rc, ${secs}s): $(tail -c 400 "$TMP/$name.out" | tr '\n' ' ')"
    fi
}

# -- Claude Code: README's environment
CLAUDE_ENV="ANTHROPIC_BASE_URL=$URL ANTHROPIC_AUTH_TOKEN=$KEY ANTHROPIC_MODEL=deepseek-chat
ANTHROPIC_SMALL_FAST_MODEL=deepseek-chat DISABLE_TELEMETRY=1 DISABLE_AUTOUPDATER=1
DISABLE_ERROR_REPORTING=1 CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1"
if [ -n "$DS4_AGENTS_FULL" ]; then CLAUDE_ARGS=""; else
    CLAUDE_ARGS="--bare --tools Bash --system-prompt You-are-a-coding-agent."; fi
run "claude turn" "Hello from ds4 (claude)" env $CLAUDE_ENV "$B/claude" $CLAUDE_ARGS -p "DS4TURN-claude say hello"
run "claude tool loop" "Tool loop done (claude)" env $CLAUDE_ENV "$B/claude" $CLAUDE_ARGS \
    --allowedTools Bash -p "DS4LOOP-claude run the marker command"

# -- Codex: README's config.toml (env_key), plus a long stream timeout for the slow tiny model
cat > "$TMP/home/.codex/config.toml" <<TOML
model = "deepseek-chat"
model_provider = "ds4"
web_search = "disabled"
[model_providers.ds4]
name = "ds4"
base_url = "$URL/v1"
wire_api = "responses"
env_key = "DS4_API_KEY"
stream_idle_timeout_ms = 600000
TOML
CODEX_ENV="CODEX_HOME=$TMP/home/.codex DS4_API_KEY=$KEY"
run "codex turn" "Hello from ds4 (codex)" env $CODEX_ENV "$B/codex" exec --skip-git-repo-check "DS4TURN-codex say hello"
run "codex tool loop" "Tool loop done (codex)" env $CODEX_ENV "$B/codex" exec --skip-git-repo-check \
    --dangerously-bypass-approvals-and-sandbox "DS4LOOP-codex run the marker command"

# -- opencode: README's opencode.json (options.apiKey, limit.context)
cat > "$TMP/home/.config/opencode/opencode.json" <<JSON
{ "\$schema": "https://opencode.ai/config.json", "autoupdate": false, "share": "disabled",
  "provider": { "ds4": { "npm": "@ai-sdk/openai-compatible", "name": "ds4",
    "options": { "baseURL": "$URL/v1", "apiKey": "$KEY" },
    "models": { "deepseek-chat": { "limit": { "context": 131072, "output": 32768 } },
                "deepseek-v4-flash": { "limit": { "context": 131072, "output": 32768 } } } } } }
JSON
OC_ENV="OPENCODE_DISABLE_AUTOUPDATE=1 OPENCODE_DISABLE_MODELS_FETCH=1"
run "opencode turn" "Hello from ds4 (opencode)" env $OC_ENV "$B/opencode" run -m ds4/deepseek-chat "DS4TURN-opencode say hello"
run "opencode tool loop" "Tool loop done (opencode)" env $OC_ENV "$B/opencode" run -m ds4/deepseek-chat \
    "DS4LOOP-opencode run the marker command"

# -- Pi: README's models.json (apiKey, contextWindow)
cat > "$TMP/home/.pi/agent/models.json" <<JSON
{ "providers": { "ds4": { "baseUrl": "$URL/v1", "api": "openai-completions", "apiKey": "$KEY",
    "models": [ { "id": "deepseek-chat", "contextWindow": 131072, "maxTokens": 32768 } ] } } }
JSON
run "pi turn" "Hello from ds4 (pi)" "$B/pi" -p --provider ds4 --model deepseek-chat "DS4TURN-pi say hello"
run "pi tool loop" "Tool loop done (pi)" "$B/pi" -p --provider ds4 --model deepseek-chat "DS4LOOP-pi run the marker command"

# ---- what the agents sent: one line per request
echo "--- requests (method path: top-level fields; roles)"
node -e '
const fs = require("fs"), dir = process.argv[1];
for (const f of fs.readdirSync(dir).filter((f) => f.endsWith(".json")).sort()) {
  const r = JSON.parse(fs.readFileSync(dir + "/" + f, "utf8"));
  const b = typeof r.body === "object" && r.body ? r.body : {};
  const roles = (b.messages || b.input || []).map ? (b.messages || (Array.isArray(b.input) ? b.input : [])).map((m) => m.role || m.type) : [];
  console.log(`${f} ${r.headers["user-agent"] || "?"} ${r.method} ${r.url}: ${Object.keys(b).sort().join(",")} [${roles.join(",")}]`);
}' "$TMP/requests"
[ -s "$TMP/requests/proxy-errors.txt" ] && { echo "--- proxy errors"; cat "$TMP/requests/proxy-errors.txt"; }
echo "--- server log"
cat "$TMP/server.log"
echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
