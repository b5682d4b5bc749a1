#!/usr/bin/env bash
# `make demo`: start (or reuse) a local Ray head, validate and deploy serve_config.yaml, wait
# until the app serves, send a few requests, and leave it serving.
# `make stop` (this script with --stop): remove the app, and stop Ray if this script started it.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=.venv/bin
STATE=.ray-demo
URL=${ROLLOUT_URL:-http://127.0.0.1:8000}
DASHBOARD=${RAY_DASHBOARD_ADDRESS:-http://127.0.0.1:8265}
TIMEOUT_S=${DEMO_TIMEOUT_S:-300}
export HF_HUB_OFFLINE=1

step() { printf '\n==> [%s/5] %s\n' "$1" "$2"; }

if [[ "${1:-}" == "--stop" ]]; then
  "$BIN/serve" shutdown -y -a "$DASHBOARD" 2>/dev/null && echo "Serve app removed." || echo "Serve was not running."
  if [[ -f "$STATE/started-ray" ]]; then
    "$BIN/ray" stop && rm -f "$STATE/started-ray" && echo "Stopped the Ray head that 'make demo' started."
  else
    echo "Ray was not started by 'make demo'; leaving it running."
  fi
  exit 0
fi

step 1 "Ray head"
if "$BIN/ray" status >/dev/null 2>&1; then
  echo "Reusing the Ray cluster that is already running."
else
  mkdir -p "$STATE"
  "$BIN/ray" start --head --dashboard-host=127.0.0.1 --disable-usage-stats >"$STATE/ray-start.log" 2>&1 \
    || { cat "$STATE/ray-start.log"; exit 1; }
  touch "$STATE/started-ray"
  echo "Started a local Ray head (log: $STATE/ray-start.log)."
fi

step 2 "rollout validate serve_config.yaml (schema, model configs, checksums, smoke inference)"
"$BIN/rollout" validate serve_config.yaml

step 3 "serve deploy serve_config.yaml"
"$BIN/serve" deploy -a "$DASHBOARD" serve_config.yaml

step 4 "waiting for the app to be RUNNING (up to ${TIMEOUT_S}s)"
"$BIN/python" scripts/wait_ready.py --dashboard "$DASHBOARD" --url "$URL" --timeout "$TIMEOUT_S"

step 5 "a few requests"
"$BIN/python" scripts/demo_requests.py --url "$URL"

cat <<MSG

The recommender is serving at $URL (v1 90% / v2 10%, see serve_config.yaml).

  curl -s $URL/v2/models/recommender/infer -d '{"inputs":[
    {"name":"user","datatype":"BYTES","shape":[1],"data":["loves science fiction"]},
    {"name":"items","datatype":"BYTES","shape":[2],"data":["a space opera","a cooking show"]}]}'
  # pin a version:  .../v2/models/recommender/versions/v2/infer  or  -H 'x-model-version: v2'
  # live split:     curl -s $URL/status

Change weights or hyperparameters in serve_config.yaml, then: .venv/bin/rollout validate && .venv/bin/serve deploy serve_config.yaml
Stop:  make stop     (serve shutdown; ray stop only if 'make demo' started Ray)
MSG
