#!/usr/bin/env bash
# Every GPU check of the engine in one prepared run, on a GPU host that has CUDA PyTorch, triton and
# transformers' own dependencies but no network and none of our pins: the lent device machine, or any
# CUDA PyTorch image. Our pure-Python pins and pydantic travel as wheels in build/gpu-wheels (`make gpu-wheels`
# fetches them where pip reaches an index); the repository's own code runs from the working tree.
#
#   bash tools/gpu_session.sh            # results under $OUT (default loadtests/reports/gpu-session)
#   TOOL_ARGS="--tiny --device cpu" bash tools/gpu_session.sh   # the same steps on a CPU, small (a unit test)
#
# The demo model travels too (ignored files: carry model_repository/peft_llm/base_model and .../adapters, 4 MB),
# or the CUDA test of decoding graphs builds it first.
#
# Steps, each under its own time limit so one that hangs leaves the others their time (about 10 minutes in
# all): the CUDA-only tests (compiled kernels against the torch path and gathered attention, captured decoding
# steps against eager ones), then `python -m tools.gpu_engine_check` (sliding window, KV budget, throughput,
# KV reads gathered vs in place, decoding eager vs CUDA graphs),
# then `python -m tools.bench_gpu` (tokens/s against the bandwidth floor, mixed/base ratios, bf16 exactness).
# Each step's log, JSON and plot land in $OUT; the summary lines print as they finish.
set -u
OUT=${OUT:-loadtests/reports/gpu-session}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
read -r -a TOOL_ARGS <<< "${TOOL_ARGS:-}"

WHEELS=${WHEELS:-build/gpu-wheels}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    echo "no wheels in $WHEELS: using the packages installed here"
    export PYTHONPATH=$PWD
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PYTHON" - <<'EOF' | tee "$OUT/versions.txt"
import peft, pydantic, torch, transformers, triton
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"{device}; torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}, pydantic {pydantic.__version__}")
EOF

step() {
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    echo "== $name (at most $limit s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s"
    tail -n 30 "$OUT/$name.log"
}

step cuda-kernel-tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda \
    tests/unit/test_paged_attention.py tests/unit/test_lora_kernels.py tests/unit/test_decode_graphs.py \
    tests/unit/test_packed_adapter.py
step gpu-engine-check 240 "$PYTHON" -m tools.gpu_engine_check "${TOOL_ARGS[@]}" --out "$OUT/gpu-engine-check.json"
step bench-gpu 240 "$PYTHON" -m tools.bench_gpu "${TOOL_ARGS[@]}" --out "$OUT/bench-gpu.json"
