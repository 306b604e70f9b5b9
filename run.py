#!/usr/bin/env python3
"""The two commands of the README, needing only Python 3.11+ and a C++ compiler.

    python3 run.py demo    # build, then train a small LM with FlashSelfAttention and generate
    python3 run.py test    # build, then run the test suite

Each creates ./.venv on first use, installs jaxattn into it (`pip install .`, which compiles
the C++ kernels; later runs rebuild incrementally) with the extras it needs, and runs.
Extra arguments go to the demo script or to pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
COMMANDS = {
    # command: (pip extras, program and arguments run from the venv)
    "demo": ("examples", [str(BIN / "python"), str(ROOT / "examples" / "train_lm.py")]),
    "test": ("test", [str(BIN / "pytest"), "-q", str(ROOT / "tests")]),
}


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def ensure_environment(extras: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036  (run.py runs under any python3)
        sys.exit(f"jaxattn needs Python 3.11+, this is {sys.version.split()[0]}")
    first_build = not any((ROOT / "build").glob("cp*/build.ninja"))  # pip's build dir
    if not (BIN / "python").exists():
        print(f"Creating the virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
        run([str(BIN / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    if first_build:
        print("Installing jaxattn into .venv: pip downloads jax and the extras, then compiles "
              "the C++ kernels\n(one build per instruction set: generic x86-64, AVX2, AVX-512). "
              "This takes 2 to 3 minutes on 2 cores\nand prints nothing meanwhile; later runs "
              "rebuild only what changed (seconds).", flush=True)
    else:
        print("Updating jaxattn in .venv (rebuilds only what changed)", flush=True)
    run([str(BIN / "python"), "-m", "pip", "install", "-q", f".[{extras}]"])


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    extras, program = COMMANDS[sys.argv[1]]
    ensure_environment(extras)
    try:
        run(program + sys.argv[2:])
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
    print(f"\njaxattn is installed in {VENV}. `source .venv/bin/activate`, then "
          "`python examples/quickstart.py`;\n`python -c` or an interactive python in this "
          "folder would import the source folder jaxattn/\ninstead of the installed package: "
          "use those from another folder. README: \"After run.py\".", flush=True)


if __name__ == "__main__":
    main()
