"""What a new user meets: the version, the kernel-set list, and importing a clone's source folder.

The README's code blocks are run by tests/test_readme.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import jaxattn
from _subprocess import CWD, python_env
from isa_support import AVX512_FLAGS, cpu_flags

REPO = Path(__file__).resolve().parent.parent


def test_version_is_the_single_source() -> None:
    """``__version__`` is the string pyproject.toml reads (scikit-build-core's regex provider)."""
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*", jaxattn.__version__), jaxattn.__version__
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    source = config["tool"]["scikit-build"]["metadata"]["version"]["input"]
    assert f'__version__ = "{jaxattn.__version__}"' in (REPO / source).read_text()


def test_kernel_isas_are_consistent() -> None:
    every, available = jaxattn.kernel_isas(), jaxattn.available_kernel_isas()
    assert len(set(every)) == len(every) and all(isinstance(n, str) and n for n in every)
    assert "generic" in available
    assert list(available) == [n for n in every if n in available]  # a subset, same order
    assert jaxattn.kernel_isa() in available


def test_available_kernel_isas_follow_the_cpu_flags() -> None:
    """Checked against /proc/cpuinfo, independently of the C++ CPU checks."""
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags")
    available = jaxattn.available_kernel_isas()
    assert ("avx2" in available) == ({"avx2", "fma", "f16c"} <= flags)
    assert ("avx512" in available) == (AVX512_FLAGS <= flags)


def test_every_available_kernel_isa_can_be_forced() -> None:
    code = "import jaxattn; print(jaxattn.kernel_isa())"
    for isa in jaxattn.available_kernel_isas():
        run = subprocess.run([sys.executable, "-c", code], env=python_env(JAXATTN_ISA=isa),
                             cwd=CWD, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == isa


@pytest.mark.parametrize("extension", [None, "_jaxattn.cpython-39-x86_64-linux-gnu.so"])
def test_importing_a_source_folder_says_what_to_do(tmp_path: Path, extension: str | None) -> None:
    """The source folder of a clone on sys.path first, without a compiled extension or with
    one for another Python: a clear message, not Python's "partially initialized module ...
    circular import"."""
    package = Path(jaxattn.__file__).resolve().parent
    shutil.copytree(package, tmp_path / "jaxattn",
                    ignore=shutil.ignore_patterns("_jaxattn*.so", "__pycache__"))
    if extension is not None:
        (tmp_path / "jaxattn" / extension).write_bytes(b"")  # never loaded: another ABI tag
    env = python_env()
    env.pop("PYTHONPATH")
    run = subprocess.run([sys.executable, "-c", "import jaxattn"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "circular import" not in run.stderr, run.stderr
    expected = "no compiled extension" if extension is None else "built for another Python"
    assert expected in run.stderr, run.stderr
    assert "tools/build_inplace.sh" in run.stderr, run.stderr


def test_vendored_ffi_headers_are_those_of_the_oldest_supported_jaxlib() -> None:
    """third_party/ holds the FFI headers of the jaxlib that pyproject.toml names as the lower
    bound (README, Development: why they are vendored); byte for byte when that jaxlib runs."""
    import jax
    import jaxlib

    notes = (REPO / "third_party" / "README.md").read_text()
    vendored = re.search(r"jaxlib (\d+\.\d+\.\d+)", notes)[1]
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith(f"jaxlib>={vendored}") for d in dependencies), dependencies
    if jaxlib.__version__ != vendored:
        pytest.skip(f"jaxlib {jaxlib.__version__} installed, the headers are from {vendored}")
    for name in ("c_api.h", "api.h", "ffi.h"):
        ours = REPO / "third_party" / "xla" / "ffi" / "api" / name
        theirs = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / name
        assert ours.read_bytes() == theirs.read_bytes(), name


def test_cited_documents_exist() -> None:
    """Every docs/*.md that the code, the tests or the README cite is in the repository."""
    cited: dict[str, set[str]] = {}
    sources = [REPO / "README.md", *REPO.glob("docs/*.md")]
    for folder in ("jaxattn", "tests", "cc", "tools", "examples", "benchmarks"):
        sources += [p for p in (REPO / folder).rglob("*")
                    if p.suffix in (".py", ".cc", ".h", ".sh")]
    for path in sources:
        for name in re.findall(r"docs/[\w-]+\.md", path.read_text(errors="replace")):
            cited.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert "docs/semantics.md" in cited
    missing = {name: sorted(where) for name, where in cited.items() if not (REPO / name).exists()}
    assert not missing, missing


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_extension_exports_only_its_entry_point() -> None:
    """The compiled module exports PyInit__jaxattn and nothing else (cc/exports.map): a
    C++ runtime linked into it must not bind other extensions' to its copy."""
    from jaxattn import _jaxattn

    listing = subprocess.run(["nm", "-D", "--defined-only", _jaxattn.__file__],
                             capture_output=True, text=True, check=True).stdout
    exported = sorted(line.split()[-1] for line in listing.splitlines() if line.strip())
    assert exported == ["PyInit__jaxattn"]


def test_extension_loaded_first_leaves_other_extensions_working() -> None:
    """The extension loaded before numpy, ml_dtypes and jax (a toolchain that linked
    libstdc++ into it once made ml_dtypes crash on import after it)."""
    # jaxattn/__init__.py loads the extension before it imports jax (and so ml_dtypes).
    script = ("import jaxattn, ml_dtypes, jax.numpy as jnp; "
              "print(jnp.finfo(ml_dtypes.float4_e2m1fn).max, jnp.ones(3).sum())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=python_env(), cwd=CWD, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
