#!/usr/bin/env bash
# Regenerate libtorchrt/config/model_config_pb2.py and model_config_pb2.pyi
# from libtorchrt/config/model_config.proto.
#
# Needs grpcio-tools (a dev-only dependency): pip install grpcio-tools
# Uses $PYTHON if set, else .venv/bin/python if present, else python.
set -euo pipefail

cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python
  fi
fi

# Proto path is the repo root, so the descriptor is registered under the
# unique name "libtorchrt/config/model_config.proto".
"$PYTHON" -m grpc_tools.protoc \
  --proto_path=. \
  --python_out=. \
  --pyi_out=. \
  libtorchrt/config/model_config.proto
