#!/usr/bin/env bash
# Linters, as CI runs them: `ruff check` (configured in pyproject.toml) and clang-format
# (.clang-format) over the C++ sources; any finding or formatting difference fails (the files
# and how many lines clang-format would change are listed). Fix the C++ with
#   git ls-files '*.cc' '*.h' | xargs build/lint-venv/bin/clang-format -i --style=file
# The pinned tools live in build/lint-venv (created on first use).
set -euo pipefail
cd "$(dirname "$0")/.."

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
if [[ "$changed_lines" -gt 0 ]]; then exit 1; fi
