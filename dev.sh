#!/usr/bin/env bash
# Install what is missing, then run the demo or the test suite.
#
#   ./dev.sh demo [demo args]     the Eagle3 TTT demo (tools/demo.py)
#   ./dev.sh test [pytest args]   the test suite
#
# torch: kept where it is installed (GPU users have their own CUDA build); where it is missing,
# the CPU build torch==2.13.0 is installed. The package itself asks only for torch>=2.11.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi

case "${1:-}" in
  demo)
    shift
    "$PY" -m pip install -q -e .
    exec "$PY" tools/demo.py "$@"
    ;;
  test)
    shift
    "$PY" -m pip install -q -e ".[test]"
    exec "$PY" -m pytest -q "$@"
    ;;
  *)
    echo "usage: ./dev.sh demo [args] | ./dev.sh test [pytest args]" >&2
    exit 2
    ;;
esac
