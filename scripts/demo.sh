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
# The router's admin API (rollout commands) needs a bearer token; Ray workers inherit this
# variable from `ray start`, so it is set before the head starts.
mkdir -p "$STATE"
if [[ ! -s "$STATE/admin_token" ]]; then
  (umask 077; "$BIN/python" -c 'import secrets; print(secrets.token_hex(16))' >"$STATE/admin_token")
fi
export ROLLOUT_ADMIN_TOKEN_FILE="$PWD/$STATE/admin_token"
# Feedback (the users' clicks) decides the A/B test, so it has a credential of its own, held by
# the demo's click pipeline (scripts/demo_rollout.py), not the admin token.
if [[ ! -s "$STATE/feedback_token" ]]; then
  (umask 077; "$BIN/python" -c 'import secrets; print(secrets.token_hex(16))' >"$STATE/feedback_token")
fi
export ROLLOUT_FEEDBACK_TOKEN_FILE="$PWD/$STATE/feedback_token"

step() { printf '\n==> [%s/6] %s\n' "$1" "$2"; }

if [[ "${1:-}" == "--stop" ]]; then
  "$BIN/serve" shutdown -y -a "$DASHBOARD" 2>/dev/null && echo "Serve app removed." || echo "Serve was not running."
  if [[ -f "$STATE/started-ray" ]]; then
    "$BIN/ray" stop && rm -f "$STATE/started-ray" && echo "Stopped the Ray head that 'make demo' started."
  else
    echo "Ray was not started by 'make demo'; leaving it running."
  fi
  exit 0
fi

if [[ "${1:-}" == "--worse" ]]; then
  echo "==> A/B rehearsal: v2 is hot-patched to a worse ranking; the same canary plan is declared"
  "$BIN/python" scripts/demo_rollout.py --plan configs/rollouts/demo-canary.yaml --worse \
    --url "$URL" --dashboard "$DASHBOARD"
  exit $?
fi

if [[ "${1:-}" == "--rollback" ]]; then
  echo "==> rollback rehearsal: v2 fails 50% of its requests; the same canary plan is declared"
  echo "    (without its load stage, which would catch v2 before any user: this rehearses the live gates)"
  "$BIN/python" scripts/demo_rollout.py --plan configs/rollouts/demo-canary.yaml --faulty \
    --url "$URL" --dashboard "$DASHBOARD"
  exit $?
fi

step 1 "Ray head"
if "$BIN/ray" status >/dev/null 2>&1; then
  echo "Reusing the Ray cluster that is already running (the rollout admin API works only if"
  echo "it was started with ROLLOUT_ADMIN_TOKEN_FILE=$ROLLOUT_ADMIN_TOKEN_FILE in its environment)."
else
  # Served as in production (app/ops/serving_mode.py): HAProxy on :8000 in front of the Router
  # replica's own HTTP server (Serve's direct ingress); Serve's Python proxy stays on :8500 for
  # apps with no running Router. HAProxy's files go in a folder of this demo's own (short:
  # HAProxy caps socket paths), so a second cluster on the machine keeps its own.
  HAPROXY_STATE=/tmp/rr-demo-$(id -u)
  mkdir -p "$HAPROXY_STATE"
  eval "$("$BIN/python" -m app.ops.serving_mode --state-dir "$HAPROXY_STATE")"
  "$BIN/ray" start --head --dashboard-host=127.0.0.1 --disable-usage-stats >"$STATE/ray-start.log" 2>&1 \
    || { cat "$STATE/ray-start.log"; exit 1; }
  touch "$STATE/started-ray"
  echo "Started a local Ray head, served by HAProxy on :8000 (log: $STATE/ray-start.log)."
fi

step 2 "rollout validate serve_config.yaml (schema, model configs, checksums, smoke inference)"
"$BIN/rollout" validate serve_config.yaml

step 3 "serve deploy serve_config.yaml"
"$BIN/serve" deploy -a "$DASHBOARD" serve_config.yaml

step 4 "waiting for the app to be RUNNING (up to ${TIMEOUT_S}s)"
"$BIN/python" scripts/wait_ready.py --dashboard "$DASHBOARD" --url "$URL" --timeout "$TIMEOUT_S"

step 5 "a few requests"
"$BIN/python" scripts/demo_requests.py --url "$URL"

step 6 "the rollout: a load stage replays requests at v2 (0% of users), then v2 at 5% until the A/B test on clicks decides, then 10% -> 25% -> 50% -> 100%"
"$BIN/python" scripts/demo_rollout.py --plan configs/rollouts/demo-canary.yaml \
  --url "$URL" --dashboard "$DASHBOARD"

cat <<MSG

The recommender is serving at $URL; the rollout moved all traffic to v2 (v1 is at 0%).

  curl -s $URL/v2/models/recommender/infer -d '{"inputs":[
    {"name":"user","datatype":"BYTES","shape":[1],"data":["loves science fiction"]},
    {"name":"items","datatype":"BYTES","shape":[2],"data":["a space opera","a cooking show"]}]}'
  # pin a version:  .../v2/models/recommender/versions/v2/infer  or  -H 'x-model-version: v2'
  # live split:     curl -s -H "authorization: Bearer \$(cat $ROLLOUT_ADMIN_TOKEN_FILE)" $URL/status
  # rollout:        ROLLOUT_ADMIN_TOKEN_FILE=$ROLLOUT_ADMIN_TOKEN_FILE .venv/bin/rollout status

Change weights or hyperparameters in serve_config.yaml, then: .venv/bin/rollout validate && .venv/bin/serve deploy serve_config.yaml
Rehearse a rollback:  make demo-rollback   (v2 fails 50%; the canary is rolled back by itself)
A worse candidate:    make demo-worse      (v2 ranks worse; the A/B test on clicks rolls it back)
Stop:  make stop     (serve shutdown; ray stop only if 'make demo' started Ray)
MSG
