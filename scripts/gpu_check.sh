#!/usr/bin/env bash
# The GPU check, in one go (issue #8): install what is missing, run tests/gpu, the GPU
# benchmark (benchmarks/gpu.py) and dynamic batching on the GPU (benchmarks/batching.py
# --device cuda:0), printing tables. Ends well inside 9 minutes.
#
#   scripts/gpu_check.sh                      # on a machine with CUDA and a CUDA build of torch
#   STEPS="tests batching" scripts/gpu_check.sh   # some of the steps: tests, gpu, batching
#
# It uses the python3 that holds a CUDA build of torch (PYTHON=... to choose another).
# Missing packages are installed from wheels in .whl/ when that folder exists (machines
# without network), else from PyPI, into a private folder; nothing else is changed.
# Logs and the benchmark's JSON go to $OUT (default: gpu-check/).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
SITE=${SITE:-/tmp/libtorchrt-gpu-site}

"$PY" - <<'PY' || { echo "gpu_check: this python has no CUDA device (or no CUDA build of torch)"; exit 2; }
import torch, sys
ok = torch.cuda.is_available()
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "|", torch.cuda.get_device_name(0) if ok else "no CUDA device")
sys.exit(0 if ok else 1)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader || true

if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
else
  "$PY" -m pip install -q --no-cache-dir --upgrade --target "$SITE" 'pyzmq>=25' 'msgpack>=1.0' 'protobuf>=7.35.1'
fi || { echo "gpu_check: could not install pyzmq, msgpack, protobuf (no network? put their wheels in .whl/)"; exit 3; }
"$PY" -c "import pytest, pytest_timeout" 2>/dev/null || "$PY" -m pip install -q --target "$SITE" pytest pytest-timeout
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

STEPS=" ${STEPS:-tests gpu batching} "
set -o pipefail
tests=0 bench=0 batching=0
if [[ $STEPS == *" tests "* ]]; then
  echo "== tests/gpu"
  timeout 210 "$PY" -m pytest -q -rs -p no:cacheprovider --timeout 100 --durations=8 tests/gpu 2>&1 | tee "$OUT/tests.log"
  tests=$?
fi
if [[ $STEPS == *" gpu "* ]]; then
  echo "== benchmarks/gpu.py"
  timeout 170 "$PY" benchmarks/gpu.py --seconds "${SECONDS_PER_ROW:-2}" --json "$OUT/gpu-bench.json" 2>&1 | tee "$OUT/bench.log"
  bench=$?
fi
if [[ $STEPS == *" batching "* ]]; then
  echo "== benchmarks/batching.py --device cuda:0"
  timeout 150 "$PY" benchmarks/batching.py --device cuda:0 --seconds 2 --no-overload 2>&1 | tee "$OUT/batching.log"
  batching=$?
fi
echo "gpu_check: tests exit $tests, benchmark exit $bench, batching exit $batching"
exit $(( tests != 0 || bench != 0 || batching != 0 ))
