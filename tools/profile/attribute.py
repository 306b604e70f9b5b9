#!/usr/bin/env python3
"""Attributes callgrind instruction counts or perf cpu-clock samples to source.

Two views, both printed as markdown tables:

* by statement of the task: cost of everything executed under one line of a kernel task
  function (ForwardTask, QueryGradTask, KeyValueGradTask, DecodePartitionTask, ...: any
  function whose name ends in "Task"), inlined helpers and called functions included. The
  line is the phase (the QK^T Gemm call, the OnlineSoftmaxStep call, PackColumns, ...).
* by innermost function: exclusive cost of the innermost source function, inlined helpers
  included (Exp, MicroKernel, LoadRow, PackColumns, ...), from the debug info's inline chains.

Addresses are resolved with `addr2line -i` (the binary is built without PIE, see
tools/profile/CMakeLists.txt). Only the standard library; run by tools/profile.sh:

    attribute.py callgrind BINARY callgrind.out [--top N]
    attribute.py perf BINARY perf.data [--top N] [--require FUNCTION]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys

Frame = tuple  # (function, file, line)


def short_name(name: str) -> str:
    """'void jaxattn::avx512::MicroKernel<6, 4>(long, ...) [clone .constprop.0]' -> 'MicroKernel'."""
    name = re.sub(r"\s*\[clone [^\]]*\]", "", name).strip()
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"\)\s*const$", ")", name)
    # Drop the argument list: the last balanced (...) at the end.
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    # Drop template arguments.
    out, depth = [], 0
    for ch in name:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    name = "".join(out)
    name = name.split(" ")[-1]  # return type
    return re.sub(r"^(jaxattn::)?(avx512|avx2|generic)::", "", name).replace("jaxattn::", "")


class Resolver:
    """Address -> inline chain [(function, file, line), ...], innermost first."""

    def __init__(self, binary: str):
        self.binary = binary
        self.cache: dict[int, list[Frame]] = {}

    def resolve(self, addresses) -> None:
        todo = sorted({a for a in addresses if a not in self.cache})
        if not todo:
            return
        out = subprocess.run(
            ["addr2line", "-e", self.binary, "-i", "-f", "-C", "-a"],
            input="\n".join(hex(a) for a in todo) + "\n",
            capture_output=True, text=True, check=True).stdout.splitlines()
        current, frames, i = None, [], 0
        while i < len(out):
            line = out[i]
            if re.fullmatch(r"0x[0-9a-f]+", line):
                if current is not None:
                    self.cache[current] = frames
                current, frames = int(line, 16), []
                i += 1
                continue
            func = line
            loc = out[i + 1] if i + 1 < len(out) else "??:0"
            i += 2
            m = re.match(r"(.*):(\d+|\?)", loc)
            file = m.group(1) if m else "??"
            ln = int(m.group(2)) if m and m.group(2).isdigit() else 0
            frames.append((short_name(func), file, ln))
        if current is not None:
            self.cache[current] = frames

    def __getitem__(self, address: int) -> list[Frame]:
        return self.cache.get(address, [("??", "??", 0)])


# One-line vector helpers (simd.h) whose cost belongs to whoever calls them.
TRANSPARENT = {"Load", "Store", "Splat", "MaxF", "MinI", "MaxI", "RoundUp", "CeilDiv", "Offset"}


def innermost(frames: list[Frame]) -> str:
    for function, _, _ in frames:
        if function not in TRANSPARENT:
            return function
    return frames[0][0]




def in_kernel(function: str) -> bool:
    """Kernel code: a task or an ISA's entry point (the public ones in dispatch.cc are tail
    calls, absent from stacks)."""
    return function.endswith(("Task", "Impl"))


def is_task(function: str) -> bool:
    return function.endswith("Task")


_source_cache: dict[str, list[str]] = {}


def statement(file: str, line: int) -> str:
    if file not in _source_cache:
        try:
            with open(file) as f:
                _source_cache[file] = f.read().splitlines()
        except OSError:
            _source_cache[file] = []
    lines = _source_cache[file]
    text = lines[line - 1].strip() if 0 < line <= len(lines) else "?"
    return text if len(text) <= 80 else text[:77] + "..."


def task_key(frames: list[Frame]):
    """The (task, file, line) of the outermost task frame of an inline+call chain (innermost
    first), or None: the statement of the task body being run (tasks never call tasks; an
    inner task frame can be code the compiler moved into an inlined helper)."""
    key = None
    for function, file, line in frames:
        if is_task(function):
            key = (function, file, line)
    return key


# ------------------------------------------------------------------------------ callgrind

def read_callgrind(path: str, binary: str):
    """Exclusive costs {address: cost} and call arcs [(call-site address, inclusive cost)]
    of the code in `binary` (other objects' costs: key None).

    Expects `--dump-instr=yes --dump-line=no` (positions are instruction addresses) and the
    first event (Ir) only.
    """
    exclusive: dict[int, int] = collections.Counter()
    arcs: list[tuple[int, int]] = []
    last = 0
    in_call = False
    total = None
    objects: dict[str, str] = {}
    ours = False
    real = os.path.realpath(binary)

    def position(tok: str) -> int:
        nonlocal last
        if tok == "*":
            return last
        if tok[0] in "+-":
            last = last + int(tok, 16) if tok.startswith(("+0x", "-0x")) else last + int(tok)
        else:
            last = int(tok, 16) if tok.startswith("0x") else int(tok)
        return last

    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not line:
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                addr = position(parts[0])
                cost = int(parts[1]) if len(parts) > 1 else 0
                if in_call:
                    if ours:
                        arcs.append((addr, cost))
                    in_call = False
                else:
                    exclusive[addr if ours else None] += cost
            elif line.startswith("calls="):
                # calls=<count> <target>: the target is absolute and leaves `last` alone.
                in_call = True
            elif line.startswith(("ob=", "cob=")):
                # Object names are compressed: "(id) name" the first time (either form),
                # "(id)" after.
                m = re.match(r"c?ob=(\((\d+)\))?\s*(.*)", line)
                if m.group(3):
                    objects[m.group(2)] = m.group(3)
                if line.startswith("ob="):
                    name = objects.get(m.group(2), m.group(3))
                    ours = bool(name) and os.path.realpath(name) == real
            elif line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
    return exclusive, arcs, total


def attribute_callgrind(binary: str, path: str):
    exclusive, arcs, total = read_callgrind(path, binary)
    resolver = Resolver(binary)
    resolver.resolve([a for a in exclusive if a is not None] + [a for a, _ in arcs])
    measured = sum(exclusive.values())
    inner = collections.Counter()
    by_task = collections.Counter()
    for addr, cost in exclusive.items():
        if addr is None:
            inner["(other objects: libc, libm)"] += cost
            continue
        frames = resolver[addr]
        inner[innermost(frames)] += cost
        key = task_key(frames)
        if key is not None:
            by_task[key] += cost
    for addr, cost in arcs:
        key = task_key(resolver[addr])
        if key is not None:
            by_task[key] += cost
    return inner, by_task, measured, total


# ------------------------------------------------------------------------------ perf

def elf_exec_bias(binary: str) -> int:
    """vaddr - file offset of the executable LOAD segment (perf reports file offsets)."""
    out = subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == "LOAD" and "E" in parts[6:-1]:
            return int(parts[2], 16) - int(parts[1], 16)
    return 0


def attribute_perf(binary: str, path: str, require: str | None = None):
    out = subprocess.run(["perf", "script", "-i", path, "-F", "ip,dso"],
                         capture_output=True, text=True, check=True).stdout
    bias = elf_exec_bias(binary)
    real = os.path.realpath(binary)
    samples: list[list] = []  # each: [(address or None), ...] leaf first
    chain: list = []
    for line in out.splitlines() + [""]:
        line = line.strip()
        if not line:
            if chain:
                samples.append(chain)
                chain = []
            continue
        m = re.match(r"([0-9a-f]+)\s+\((.*)\)", line)
        if not m:
            continue
        ip, dso = int(m.group(1), 16), m.group(2)
        chain.append(ip + bias if os.path.realpath(dso) == real else None)
    resolver = Resolver(binary)
    wanted = set()
    for s in samples:
        for i, a in enumerate(s):
            if a is not None:
                wanted.add(a if i == 0 else a - 1)  # a return address: the call is before it
    resolver.resolve(wanted)
    inner = collections.Counter()
    by_task = collections.Counter()
    measured = 0
    for s in samples:
        frames: list[Frame] = []
        for i, a in enumerate(s):
            frames += resolver[a if i == 0 else a - 1] if a is not None else [("(other dso)", "", 0)]
        # Only samples inside a kernel call count (not the driver's data setup).
        if not any(in_kernel(f[0]) for f in frames):
            continue
        if require and not any(f[0] in require.split("|") for f in frames):
            continue
        measured += 1
        inner[innermost(frames)] += 1
        key = task_key(frames)
        if key is not None:
            by_task[key] += 1
    return inner, by_task, measured, len(samples)


# ------------------------------------------------------------------------------ output

def print_tables(inner, by_task, measured, unit: str, top: int, min_share: float) -> None:
    print(f"By statement of the kernel task (inclusive of inlined and called code); "
          f"100% = {measured:,} {unit}")
    print()
    print("| task | line | statement | share |")
    print("|---|---:|---|---:|")
    shown = 0
    for (task, file, line), cost in by_task.most_common():
        share = 100.0 * cost / measured
        if share < min_share:
            break
        print(f"| {task} | {os.path.basename(file)}:{line} | `{statement(file, line)}` | "
              f"{share:.1f}% |")
        shown += cost
    rest = sum(by_task.values()) - shown
    print(f"| (other task lines) | | | {100.0 * rest / measured:.1f}% |")
    print(f"| (outside tasks: setup, merge, join) | | | "
          f"{100.0 * (measured - sum(by_task.values())) / measured:.1f}% |")
    print()
    print(f"By innermost source function (exclusive, inlined helpers resolved; Load/Store/Splat "
          f"count for their caller); "
          f"100% = {measured:,} {unit}")
    print()
    print("| function | share |")
    print("|---|---:|")
    for i, (name, cost) in enumerate(inner.most_common()):
        if i >= top or 100.0 * cost / measured < min_share:
            rest = sum(c for _, c in inner.most_common()[i:])
            print(f"| (others) | {100.0 * rest / measured:.1f}% |")
            break
        print(f"| {name} | {100.0 * cost / measured:.1f}% |")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tool", choices=["callgrind", "perf"])
    ap.add_argument("binary")
    ap.add_argument("data")
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--min-share", type=float, default=0.5, help="percent")
    ap.add_argument("--require", help="perf: count only samples under one of these functions "
                    "('|'-separated, e.g. 'RunBackward|BackwardImpl', to leave out the "
                    "forward run that precedes it)")
    args = ap.parse_args()
    if args.tool == "callgrind":
        inner, by_task, measured, total = attribute_callgrind(args.binary, args.data)
        if total is not None and total != measured:
            print(f"warning: parsed {measured} Ir, file says {total}", file=sys.stderr)
        print_tables(inner, by_task, measured, "instructions", args.top, args.min_share)
    else:
        inner, by_task, measured, _ = attribute_perf(args.binary, args.data, args.require)
        print_tables(inner, by_task, measured, "cpu-clock samples", args.top, args.min_share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
