#!/usr/bin/env bash
# Install cryovae and everything it needs into a virtual environment (default: ./.venv).
#
#   bash scripts/install.sh            # the workflow
#   bash scripts/install.sh test       # plus the test dependencies
#
# PyTorch: a torch already present in the environment (e.g. a CUDA build a GPU user
# installed first) is kept.  Otherwise the CPU build is preferred: `torch==2.13.0`
# (from the index set by TORCH_INDEX_URL if you give one, e.g. PyTorch's CPU index),
# so that resolving `torch>=2.3` never pulls several GB of CUDA packages by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [[ ! -x $VENV/bin/python ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [[ -n ${TORCH_INDEX_URL:-} ]]; then
    "${PIP[@]}" "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
  else
    "${PIP[@]}" "$TORCH_SPEC"
  fi
fi
extra=""
[[ ${1:-} == test ]] && extra="[test]"
"${PIP[@]}" -e ".$extra"
echo "cryovae installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
