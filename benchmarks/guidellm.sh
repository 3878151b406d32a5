#!/usr/bin/env bash
# guidellm's standard command against the server as users run it: synthetic prompts, 1, 4 and 16
# concurrent streams, OpenAI HTTP backend (it streams with stream_options.include_usage and
# continuous_usage_stats). Starts `python -m server` with SERVER_ARGS, waits for /ready, runs
# the sweep, stops the server. guidellm is heavy and its dependencies differ from ours: install
# it in a venv of its own and point GUIDELLM at it, e.g.
#   python3 -m venv /tmp/guidellm-venv && /tmp/guidellm-venv/bin/pip install guidellm==0.8.1
#   GUIDELLM=/tmp/guidellm-venv/bin/guidellm bash benchmarks/guidellm.sh
# Knobs (environment): PORT, SERVER_ARGS, STREAMS, PROMPT_TOKENS, OUTPUT_TOKENS,
# REQUESTS (per stream count), TOKENIZER (an HF folder; default: the embedded model's
# converted copy), OUT (report folder). The console table and OUT/guidellm.json hold the result.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GUIDELLM=${GUIDELLM:-guidellm}
PORT=${PORT:-8123}
SERVER_ARGS=${SERVER_ARGS:---speculative dspark --verify-policy dspark}
STREAMS=${STREAMS:-1,4,16}
PROMPT_TOKENS=${PROMPT_TOKENS:-256}
OUTPUT_TOKENS=${OUTPUT_TOKENS:-128}
REQUESTS=${REQUESTS:-32}
TOKENIZER=${TOKENIZER:-${DSPARK_CACHE_DIR:-$HOME/.cache/dspark-serve}/models/SmolLM2-135M-Instruct}
OUT=${OUT:-runs/guidellm}
mkdir -p "$OUT"

# shellcheck disable=SC2086 # SERVER_ARGS is a list of flags
"$PY" -m server --port "$PORT" $SERVER_ARGS > "$OUT/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/ready" > /dev/null && break
    kill -0 "$server" 2>/dev/null || { echo "server exited; see $OUT/server.log" >&2; exit 1; }
    sleep 1
done
curl -sf "http://127.0.0.1:$PORT/ready" > /dev/null || { echo "server not ready" >&2; exit 1; }

"$GUIDELLM" run \
    --backend "kind=openai_http,target=http://127.0.0.1:$PORT" \
    --tokenizer "kind=hf_auto,model=$TOKENIZER" \
    --data "kind=synthetic_text,prompt_tokens=$PROMPT_TOKENS,output_tokens=$OUTPUT_TOKENS" \
    --profile kind=concurrent --override profile.streams "$STREAMS" \
    --constraint "kind=max_requests,count=$REQUESTS" \
    --output "kind=json,path=$OUT/guidellm.json" --output kind=console \
    --disable-console-interactive
grep -c ' -> 4[0-9][0-9] ' "$OUT/server.log" | sed 's/^/client errors logged by the server: /' || true
