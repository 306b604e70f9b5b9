"""``--threads N`` for the benchmark scripts: pins the process to its first N CPUs.

A script calls ``pin_threads_from_argv()`` before it imports jax, whose CPU client sizes its
thread pool from the CPUs the process may run on; so this module imports nothing of jax (nor
common.py, which does).
"""

from __future__ import annotations

import os
import sys


def pin_threads_from_argv() -> None:
    """Applies ``--threads N`` (or ``--threads=N``) of the command line, if given."""
    for i, arg in enumerate(sys.argv):
        value = arg.split("=", 1)[1] if arg.startswith("--threads=") else (
            sys.argv[i + 1] if arg == "--threads" and i + 1 < len(sys.argv) else None)
        if value is not None:
            cpus = sorted(os.sched_getaffinity(0))[: max(1, int(value))]
            os.sched_setaffinity(0, cpus)
