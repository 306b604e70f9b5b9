"""Every ``python`` code block of the README (and of docs/semantics.md) runs as written.

Each block is executed on its own, as a script in a fresh namespace, so a block may use only
the names it defines: a reader can paste any one of them. Blocks are found when the tests are
collected, so a block added later is tested without touching this file. Snippets that are
not meant to run (signatures, shell) are fenced with another language (``text``, ``bash``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "docs/semantics.md")

# A fence opening at the start of a line (any indentation) with the language "python" or
# "py", up to the next fence of the same indentation.
_BLOCK = re.compile(r"^(?P<indent>[ \t]*)```(?:python|py)[ \t]*\n(?P<code>.*?)^(?P=indent)```",
                    re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, dedented code) of every python block in ``text``."""
    blocks = []
    for match in _BLOCK.finditer(text):
        indent = len(match["indent"])
        code = "\n".join(line[indent:] for line in match["code"].splitlines())
        blocks.append((text.count("\n", 0, match.start()) + 1, code))
    return blocks


def _cases() -> list:
    cases = []
    for document in DOCUMENTS:
        path = REPO / document
        if path.exists():
            for line, code in python_blocks(path.read_text()):
                cases.append(pytest.param(path, line, code, id=f"{document}:{line}"))
    return cases


def test_blocks_are_found() -> None:
    """The extraction itself: the README has python blocks, and a fence inside a list works."""
    assert len(python_blocks((REPO / "README.md").read_text())) >= 2
    sample = "text\n```python\nx = 1\n```\n- item\n\n  ```py\n  y = 2\n  ```\n```bash\nls\n```\n"
    assert python_blocks(sample) == [(2, "x = 1"), (7, "y = 2")]


@pytest.mark.parametrize(("path", "line", "code"), _cases())
def test_block_runs_as_written(path: Path, line: int, code: str) -> None:
    compiled = compile(code, f"{path.name}:{line}", "exec")
    exec(compiled, {"__name__": "__main__"})  # a fresh namespace: only the block's own names
