#!/usr/bin/env bash
# Development set-up: a venv in ./.venv with the CPU build of torch, nilmd (editable) and the
# test tools. Idempotent: a second run only checks. Edge boxes use scripts/install.sh instead.
#
#   TORCH_SPEC   the torch requirement (default torch==2.13.0, the CPU build on this project's
#                machines; an unpinned torch pulls several GB of CUDA packages)
#   PIP_ARGS     extra pip arguments (e.g. an --index-url for a CPU wheel index)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing redis-server (the tests start their own instances)"
        apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
    else
        echo "setup: warning: redis-server is not installed; Redis tests will be skipped" >&2
    fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q ${PIP_ARGS:-} "$TORCH_SPEC"
python -m pip install -q ${PIP_ARGS:-} -e ".[test,metrics,mqtt]"  # the exporters' tests need their extras
python -c "import torch, nilmd; print(f'setup: nilmd {nilmd.__version__}, torch {torch.__version__}, CUDA {torch.cuda.is_available()}')"
