"""The C++ kernel harness (tests/cc/kernel_harness.cc) under AddressSanitizer and
UndefinedBehaviorSanitizer, for every instruction-set path.

A smaller grid than ``tools/sanitize.sh`` (which CI runs in full, with ThreadSanitizer too), so
that the test suite stays quick. Skipped, with the reason, where cmake, a C++ compiler or the
sanitizer runtimes are missing, or when ``JAXATTN_SKIP_SANITIZERS=1``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from isa_support import skip_reason as isa_skip_reason

ROOT = Path(__file__).resolve().parent.parent
HARNESS_SOURCE = ROOT / "tests" / "cc"
BUILD_DIR = ROOT / "build" / "sanitize"
CASES = int(os.environ.get("JAXATTN_SANITIZER_CASES", "80"))
SANITIZERS = "address,undefined"


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def skip_reason() -> str | None:
    if os.environ.get("JAXATTN_SKIP_SANITIZERS") == "1":
        return "JAXATTN_SKIP_SANITIZERS=1"
    if not HARNESS_SOURCE.is_dir():
        return f"no harness sources at {HARNESS_SOURCE} (installed package without tests/cc)"
    if shutil.which("cmake") is None:
        return "cmake not found"
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler found"
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.cc"
        probe.write_text("int main() { return 0; }\n")
        result = subprocess.run([cxx, f"-fsanitize={SANITIZERS}", str(probe), "-o", str(Path(tmp) / "probe")],
                                capture_output=True, text=True)
        if result.returncode != 0:
            return f"{cxx} cannot link with -fsanitize={SANITIZERS}: {result.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="module")
def harness() -> Path:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    env = {**os.environ, "CXX": compiler()}
    configure = subprocess.run(
        ["cmake", "-S", str(HARNESS_SOURCE), "-B", str(BUILD_DIR), *generator,
         f"-DJAXATTN_HARNESS_SANITIZERS={SANITIZERS}"], capture_output=True, text=True, env=env)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    build = subprocess.run(["cmake", "--build", str(BUILD_DIR), "--parallel", str(os.cpu_count() or 2)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-5000:]
    binary = BUILD_DIR / "kernel_harness"
    assert binary.exists()
    return binary


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16", "amx", "default"])
def test_kernel_harness_under_asan_ubsan(harness: Path, isa: str) -> None:
    reason = isa_skip_reason(isa) if isa != "default" else None
    if reason:
        pytest.skip(reason)
    env = dict(os.environ)
    env.pop("JAXATTN_ISA", None)
    if isa != "default":
        env["JAXATTN_ISA"] = isa
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:halt_on_error=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    result = subprocess.run([str(harness), "--cases", str(CASES), "--seed", "2"], env=env,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert "0 failed, 0 failures" in output, output[-8000:]
    if isa != "default":
        assert f"isa={isa} " in output, output[-8000:]  # the forced set really ran
    assert "ERROR: AddressSanitizer" not in output and "runtime error:" not in output, output[-8000:]
