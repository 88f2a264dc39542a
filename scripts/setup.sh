#!/usr/bin/env bash
# Create .venv (Python >= 3.12) and install qwen3-jax into it.
#   bash scripts/setup.sh          # the engine (+ jax's CUDA plugin when an NVIDIA GPU is present)
#   bash scripts/setup.sh --test   # the engine plus the test extras (pytest, torch, transformers)
# Set PYTHON=/path/to/python3.12 to choose the interpreter yourself.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=()
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(test) ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extras+=(cuda); fi

is_py312() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  local c
  for c in "${PYTHON:-}" python3.12 python3.13 python3.14 python3; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && is_py312 "$(command -v "$c")" && { command -v "$c"; return; }
  done
  if command -v pyenv >/dev/null 2>&1; then   # pyenv shims answer only for the selected version
    for v in 3.12 3.13 3.14; do
      c=$(pyenv which "python$v" 2>/dev/null || PYENV_VERSION="$(pyenv versions --bare | grep "^$v" | tail -n1)" pyenv which "python$v" 2>/dev/null || true)
      [ -n "$c" ] && is_py312 "$c" && { echo "$c"; return; }
    done
  fi
  if command -v uv >/dev/null 2>&1; then
    c=$(uv python find '>=3.12' 2>/dev/null || true)
    [ -n "$c" ] && is_py312 "$c" && { echo "$c"; return; }
  fi
  return 1
}

if [ ! -x .venv/bin/python ] || ! is_py312 .venv/bin/python; then
  py=$(find_python) || {
    echo "setup.sh: no Python >= 3.12 found (jax 0.11 needs it). Install one (python.org, pyenv, or 'uv python install 3.12')" >&2
    echo "          or point PYTHON at it: PYTHON=/path/to/python3.12 bash scripts/setup.sh" >&2
    exit 1
  }
  echo "setup.sh: creating .venv with $py ($("$py" --version))"
  rm -rf .venv
  "$py" -m venv .venv
fi

# uv installs the multi-GB test extras (torch) far faster than pip; it goes into the venv itself.
if ! .venv/bin/python -m uv --version >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check uv
fi
spec="."
[ ${#extras[@]} -gt 0 ] && spec=".[$(IFS=,; echo "${extras[*]}")]"
echo "setup.sh: installing $spec into .venv"
.venv/bin/python -m uv pip install --quiet --python .venv/bin/python -e "$spec"
