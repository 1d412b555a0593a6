#!/usr/bin/env bash
# Smoke test of the demo service: start it, wait until ready, run one real search, stop it.
# Usage: scripts/demo-check.sh VENV_BIN DEMO_DIR PORT
set -euo pipefail
BIN=$1 DEMO=$2 PORT=$3
LOG=$(mktemp)
start=$(date +%s)
"$BIN/imgsim" serve --model "$DEMO/resnet50-demo" --index "$DEMO/resnet50-demo-index" --port "$PORT" >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG" /tmp/imgsim-demo-query.jpg' EXIT
until curl -fsS -m 2 "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; do
  if ! kill -0 $PID 2>/dev/null || [ $(( $(date +%s) - start )) -gt 180 ]; then
    echo "demo-check: service did not become ready" >&2; cat "$LOG" >&2; exit 1
  fi
  sleep 1
done
echo "demo-check: /readyz answered after $(( $(date +%s) - start )) s: $(curl -fsS "http://127.0.0.1:$PORT/readyz")"
"$BIN/python" -c "from skimage import data; from PIL import Image; Image.fromarray(data.chelsea()).save('/tmp/imgsim-demo-query.jpg')"
out=$(curl -fsS -F file=@/tmp/imgsim-demo-query.jpg "http://127.0.0.1:$PORT/v1/analyze")
echo "demo-check: $out" | cut -c1-400
n=$("$BIN/python" -c "import json,sys; print(len(json.loads(sys.argv[1])['results']))" "$out")
[ "$n" = 5 ] || { echo "demo-check: expected 5 results, got $n" >&2; exit 1; }
echo "demo-check: PASSED (5 results)"
