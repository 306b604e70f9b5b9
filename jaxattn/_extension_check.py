"""Turns a missing compiled extension into a message that says what is wrong and what to do.

Without this, importing the source folder ``jaxattn/`` of a clone (the current directory and
``PYTHONPATH`` come first on ``sys.path``) fails with Python's misleading "partially
initialized module ... circular import" error.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
from pathlib import Path


def _installed_package_dir() -> Path | None:
    """Where pip installed jaxattn in this environment, if it did."""
    try:
        dist = importlib.metadata.distribution("jaxattn")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(str(dist.locate_file("jaxattn"))).resolve()


def missing_extension_message(package_dir: Path, error: ImportError) -> str:
    """The message for ``ImportError`` ``error`` raised importing ``jaxattn._jaxattn``."""
    package_dir = package_dir.resolve()
    built = sorted(p.name for p in package_dir.glob("_jaxattn*.so"))
    # The names this interpreter would load (Python tries exactly these).
    loadable = [name for name in built
                if name in {"_jaxattn" + s for s in importlib.machinery.EXTENSION_SUFFIXES}]
    if loadable:
        return (f"jaxattn's compiled extension {loadable[0]} in {package_dir} failed to load: "
                f"{error}.\nRebuild it (tools/build_inplace.sh, or pip install . again).")
    if built:
        lines = [f"jaxattn was imported from {package_dir}, whose compiled extension {built[0]} "
                 f"was built for another Python (this one loads *"
                 f"{importlib.machinery.EXTENSION_SUFFIXES[0]})."]
    else:
        lines = [f"jaxattn was imported from {package_dir}, which has no compiled extension "
                 "(_jaxattn*.so): this is the source folder of a clone, which comes first on "
                 "sys.path when Python runs in the clone's root or with PYTHONPATH=."]
    installed = _installed_package_dir()
    if installed is not None and installed != package_dir:
        lines.append(f"This environment has jaxattn installed in {installed}: run from another "
                     "directory than the clone's root and without PYTHONPATH=. to use it.")
    else:
        lines.append("Install it (`python3 run.py test` or `pip install .` installs it into "
                     "a virtual environment), then run from another directory than the clone's "
                     "root and without PYTHONPATH=.")
    lines.append("Or, to work on the sources, build the extension into this folder: "
                 "PYTHON=<your python> tools/build_inplace.sh (then PYTHONPATH=. works).")
    return "\n".join(lines)
