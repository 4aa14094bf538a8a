#!/usr/bin/env bash
# Entry point of the Triton services in docker-compose.yml (image nvcr.io/nvidia/tritonserver:24.10-py3,
# tritonserver 2.51: the release the project is tested against). Installs the engine's requirements into
# the image's Python (the one the Python backend's stub embeds), makes the read-only checkout importable
# with a .pth file, and starts Triton the way tools/serve.py does: explicit model control with every model
# loaded, so `python -m tools model-swap` works, and restricted APIs when keys are set (SECURITY.md).
set -euo pipefail

pip install --quiet --no-cache-dir -r /workspace/deploy/requirements-triton.txt
site_packages=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo /workspace > "${site_packages}/peftserve-checkout.pth"

args=(
  --model-repository=/models
  --model-control-mode=explicit
  "--load-model=*"
  --http-port=8000
  --grpc-port=8001
  --metrics-port=8002
  --exit-timeout-secs=30
)
if [ -n "${PEFTSERVE_ADMIN_KEY:-}" ]; then
  spec="model-repository,shared-memory,statistics,trace,logging:x-peftserve-admin-key=${PEFTSERVE_ADMIN_KEY}"
  args+=("--http-restricted-api=${spec}" "--grpc-restricted-protocol=${spec}")
fi
if [ -n "${PEFTSERVE_INFERENCE_KEY:-}" ]; then
  spec="inference:x-api-key=${PEFTSERVE_INFERENCE_KEY}"
  args+=("--http-restricted-api=${spec}" "--grpc-restricted-protocol=${spec}")
fi
exec tritonserver "${args[@]}"
