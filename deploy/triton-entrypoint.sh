#!/usr/bin/env bash
# Entry point of the peftserve Triton image (Dockerfile). Starts Triton the way `make serve` does:
# explicit model control with every model loaded, so `python -m tools model-swap` works. Inside a
# container the server listens on every interface, so the management APIs (model repository, shared
# memory, statistics, trace, logging) always need PEFTSERVE_ADMIN_KEY: without it this refuses to start.
# PEFTSERVE_INFERENCE_KEY, when set, is required for inference too. Extra arguments go to tritonserver.
set -euo pipefail

if [ -z "${PEFTSERVE_ADMIN_KEY:-}" ]; then
  cat >&2 <<'MESSAGE'
error: PEFTSERVE_ADMIN_KEY is not set. Without it anyone who reaches port 8000/8001 could load and
unload models, and a model load can carry code. Set it to a long random value, e.g.
  export PEFTSERVE_ADMIN_KEY=$(openssl rand -hex 32)
and send it as the header x-peftserve-admin-key (python -m tools --config deploy/serving_config.compose.yaml ... does).
MESSAGE
  exit 64
fi

args=(
  --model-repository=/models
  --model-control-mode=explicit
  "--load-model=*"
  --http-port=8000
  --grpc-port=8001
  --metrics-port=8002
  --exit-timeout-secs=30
)
spec="model-repository,shared-memory,statistics,trace,logging:x-peftserve-admin-key=${PEFTSERVE_ADMIN_KEY}"
args+=("--http-restricted-api=${spec}" "--grpc-restricted-protocol=${spec}")
if [ -n "${PEFTSERVE_INFERENCE_KEY:-}" ]; then
  spec="inference:x-api-key=${PEFTSERVE_INFERENCE_KEY}"
  args+=("--http-restricted-api=${spec}" "--grpc-restricted-protocol=${spec}")
fi
exec tritonserver "${args[@]}" "$@"
