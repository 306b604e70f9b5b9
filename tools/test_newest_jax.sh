#!/usr/bin/env bash
# The newest-jax check of README "Supported versions": a Python 3.12 venv (jax 0.11 and newer
# need 3.12+) with the newest jax 0.12 the registry serves, the extension built for it in
# build/jaxnew (its .so is named for Python 3.12, so it sits in jaxattn/ beside the 3.11 one
# without a clash), then the sharding tests and the core test files (~20 min on 2 cores).
#   tools/test_newest_jax.sh [PYTHON3.12] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
# A python3.12 on PATH may be a pyenv shim that refuses to run: take the first that runs.
# --find-python only says whether there is one (exit status 1: none).
find_python() {
  local candidate
  for candidate in python3.12 python3.13 python3.14 /root/.pyenv/versions/3.1[2-9]*/bin/python; do
    if "$candidate" -c "import sys; assert sys.version_info >= (3, 12)" 2> /dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}
if [[ "${1:-}" == "--find-python" ]]; then find_python; exit; fi
if [[ $# -ge 1 && "$1" != -* ]]; then PY312="$1"; shift; else PY312="$(find_python)"; fi
VENV="${JAXATTN_NEW_VENV:-build/venv-jaxnew}"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q "jax==0.12.*" flax pytest hypothesis numpy flatbuffers \
    nanobind scikit-build-core ninja cmake
fi
"$VENV/bin/python" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
BUILD_DIR=build/jaxnew PYTHON="$(cd "$VENV" && pwd)/bin/python" tools/build_inplace.sh
PYTHONPATH=. "$VENV/bin/python" -m pytest -x -q -p no:cacheprovider "$@" \
  tests/test_sharding.py tests/test_flash.py tests/test_decode.py \
  tests/test_transformations.py tests/test_flax.py
