"""Fresh interpreters for tests that need one (thread counts, instruction sets, devices).

They must import the jaxattn under test: the installed package (the README's test command
installs it) or a development tree with the extension built in place, never the bare source
tree, which the current directory would otherwise put first on sys.path.
"""

from __future__ import annotations

import os
from pathlib import Path

import jaxattn

PACKAGE_ROOT = str(Path(jaxattn.__file__).resolve().parent.parent)
CWD = str(Path(__file__).resolve().parent)  # holds no jaxattn package


def python_env(**extra: str) -> dict[str, str]:
    """os.environ with the tested jaxattn first on PYTHONPATH, faulthandler on, plus ``extra``."""
    # A crash in the child prints its Python stack (faulthandler) into the test's report.
    env = dict(os.environ, PYTHONFAULTHANDLER="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(
        [PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env
