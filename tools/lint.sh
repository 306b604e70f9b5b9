#!/usr/bin/env bash
# Linters, as CI runs them: `ruff check` (configured in pyproject.toml; fails on any finding)
# and clang-format (.clang-format) over the C++ sources. clang-format only reports, file by
# file, how many lines it would change, until the C++ is reformatted once; --cpp-strict makes
# any difference fail too. The pinned tools live in build/lint-venv (created on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
cpp_strict=0
[[ "${1:-}" == "--cpp-strict" ]] && cpp_strict=1

TOOLS=build/lint-venv
if [[ ! -x "$TOOLS/bin/ruff" || ! -x "$TOOLS/bin/clang-format" ]]; then
  echo "lint: installing ruff and clang-format into $TOOLS"
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q ruff==0.17.5 clang-format==23.1.3
fi

echo "lint: ruff check"
"$TOOLS/bin/ruff" check .

echo "lint: clang-format (lines that would change, per file)"
changed_files=0
changed_lines=0
while IFS= read -r file; do
  lines=$("$TOOLS/bin/clang-format" --style=file "$file" | diff "$file" - | grep -c '^<' || true)
  if [[ "$lines" -gt 0 ]]; then
    printf '  %5d  %s\n' "$lines" "$file"
    changed_files=$((changed_files + 1))
    changed_lines=$((changed_lines + lines))
  fi
done < <(git ls-files '*.cc' '*.h' ':!:third_party/*')
total=$(git ls-files '*.cc' '*.h' ':!:third_party/*' | xargs cat | wc -l)
echo "lint: clang-format would change $changed_lines of $total lines in $changed_files files"
if [[ "$cpp_strict" == 1 && "$changed_lines" -gt 0 ]]; then exit 1; fi
