#!/usr/bin/env bash
# Install what is missing, then run the demo, the test suite or the trainer.
#
#   ./dev.sh demo  [demo args]      the Eagle3 TTT demo (tools/demo.py)
#   ./dev.sh test  [pytest args]    the test suite (what CI runs)
#   ./dev.sh train [train args]     python tools/train.py
#
# Where things go (README, "Set-up"):
#   default          a virtual environment in .venv/, made by python3 (BASE_PYTHON=python3.12 to
#                    pick another); Debian's system Python works, it only needs python3-venv.
#                    torch==2.13.0 goes into .venv from your pip index unless .venv has a torch:
#                    from PyPI on Linux that is the CUDA build (~2.7 GB with its nvidia-*
#                    packages); TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gets the
#                    CPU-only build (~200 MB) instead.
#   PYTHON=/path     use that interpreter as it is, no .venv: its torch (your CUDA build) is kept
#                    and compiled-mask (editable) plus the extras are installed into it.
# The package step runs again when pyproject.toml changes (DEV_REINSTALL=1 forces it).
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION=2.13.0

say() { printf 'dev.sh: %s\n' "$*" >&2; }
usage() {
  echo "usage: ./dev.sh demo [demo args] | ./dev.sh test [pytest args] | ./dev.sh train [train args]" >&2
  exit 2
}

cmd=${1:-}
case "$cmd" in
  demo | test | train) shift ;;
  *) usage ;;
esac

# --- the interpreter: PYTHON as it is, or our own .venv -------------------------------------------
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
  where="$PYTHON (PYTHON is set: no .venv)"
  stamp_dir=build/dev-stamps/$(printf '%s' "$(command -v "$PY" || echo "$PY")" | cksum | cut -d' ' -f1)
else
  PY=.venv/bin/python
  where=.venv
  stamp_dir=.venv
  if ! "$PY" -m pip --version >/dev/null 2>&1; then
    base=${BASE_PYTHON:-python3}
    if ! command -v "$base" >/dev/null; then
      say "no '$base' on PATH: install Python 3.10 or newer, or set BASE_PYTHON=/path/to/python3"
      exit 1
    fi
    if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
      say "$base is $("$base" --version 2>&1); compiled-mask needs Python >= 3.10 (set BASE_PYTHON)"
      exit 1
    fi
    say "creating a virtual environment in .venv/ with $("$base" --version 2>&1) ($(command -v "$base"))"
    rm -rf .venv
    if ! "$base" -m venv .venv; then
      rm -rf .venv
      say "could not create .venv; on Debian/Ubuntu: sudo apt install python3-venv"
      exit 1
    fi
  fi
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  say "$PY does not run, or is older than Python 3.10"
  exit 1
fi

# --- torch: kept where present; else torch==2.13.0 from the index, saying which build that is -----
# (read from the installed metadata: importing torch costs seconds on every run)
torch_version() {
  "$PY" -c 'import importlib.metadata as m
try: print(m.version("torch"))
except m.PackageNotFoundError: pass'
}
if [ -z "$(torch_version)" ]; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    say "installing torch==$TORCH_VERSION into $where from $TORCH_INDEX_URL"
    "$PY" -m pip install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  else
    say "installing torch==$TORCH_VERSION into $where from your pip index (pip config; PyPI by default)."
    say "  From PyPI on Linux that is the CUDA build, ~2.7 GB with its nvidia-* packages. Instead:"
    say "    CPU-only build (~200 MB):  TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu ./dev.sh $cmd"
    say "    a torch you already have:  PYTHON=/path/to/python ./dev.sh $cmd"
    "$PY" -m pip install "torch==$TORCH_VERSION"
  fi
fi
say "using torch $(torch_version) in $where"

# --- compiled-mask itself (editable), with the test tools for `test` -------------------------------
extra=""
what="compiled-mask (editable, this checkout) and numpy (torch warns at import without it)"
if [ "$cmd" = test ]; then
  extra="[test]"
  what="compiled-mask (editable, this checkout) and the test tools (pytest, pytest-xdist, expecttest, hypothesis, matplotlib, numpy, transformers, tokenizers, safetensors; triton on Linux)"
fi
stamp="$stamp_dir/dev-stamp-${cmd/train/demo}"
if [ "$cmd" = train ] && [[ " $* " == *" --target-model"* ]]; then
  # Training on a Hugging Face target needs the train extra (transformers, tokenizers, safetensors).
  extra="[train]"
  what="compiled-mask (editable, this checkout) with the train extra (transformers, tokenizers, safetensors)"
  stamp="$stamp_dir/dev-stamp-train"
fi
want=$(cksum < pyproject.toml)
if [ -n "${DEV_REINSTALL:-}" ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing $what into $where"
  "$PY" -m pip install -e ".$extra" numpy
  mkdir -p "$stamp_dir"
  printf '%s\n' "$want" > "$stamp"
fi

case "$cmd" in
  demo) exec "$PY" tools/demo.py "$@" ;;
  # Two pytest workers (pytest-xdist): the suite is compile-bound; on 2 cores it took 7.6 min in two
  # (2026-12-06). Pass -n 0 to run it in one process (a later -n wins).
  test) exec "$PY" -m pytest -q -n 2 "$@" ;;
  train)
    if [ ! -f tools/train.py ]; then
      say "tools/train.py is not in this checkout"
      exit 1
    fi
    exec "$PY" tools/train.py "$@"
    ;;
esac
