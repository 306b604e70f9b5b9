"""Determinism: every row of ``reliability_cases.CASES`` (forward and gradients)

- gives bitwise equal results on repeated calls, jitted and eager;
- gives bitwise equal results whatever the size of XLA's intra-op thread pool (subprocesses
  pinned to one CPU or to all of them; the pool's size follows the CPU affinity, checked from
  the pool's threads);
- gives results within tolerance of the float64 oracle on every instruction-set path
  (``JAXATTN_ISA=generic``, ``avx2``, ``avx512``, ``avx512bf16``, ``amx`` and the default, in
  subprocesses; a set the CPU cannot run is skipped with the reason).

Thread pool size on jax 0.10.2: XLA's CPU client sizes its intra-op pool (the threads named
``tf_XLAEigen``, handed to FFI handlers as ``ffi::ThreadPool``) from the CPU affinity at start;
no XLA flag changes it. ``os.sched_setaffinity`` in the child before JAX starts (what ``taskset``
does) is what works, and the worker reports the pool's thread count so the tests can check it.
"""

from __future__ import annotations

import functools
import os

import pytest

from isa_support import default_isa, skip_reason
from reliability_cases import ALL_CPUS, CASES, OpCase, assert_bitwise_equal, run_worker


@functools.cache
def worker_cases(isa: str, cpus: tuple[int, ...]) -> dict:
    return run_worker("cases", isa=isa, cpus=cpus)


# --------------------------------------------------------------------------------------------
# Same process
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_repeated_calls_are_bitwise_equal(case: OpCase) -> None:
    args = case.make_args()
    first = case.run(args=args)
    case.check(args, first)  # the results compared are right, not merely repeatable
    for _ in range(2):
        assert_bitwise_equal(case.run(args=args), first, f"{case.name}: jit repeat")
    eager = case.run(jit=False, args=args)
    assert_bitwise_equal(case.run(jit=False, args=args), eager, f"{case.name}: eager repeat")


# --------------------------------------------------------------------------------------------
# Other thread counts and instruction sets (subprocesses)
# --------------------------------------------------------------------------------------------

ISAS = ["generic", "avx2", "avx512", "avx512bf16", "amx", "default"]


def require_isa(isa: str) -> None:
    reason = skip_reason(isa) if isa != "default" else None
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("isa", ISAS)
def test_thread_count_does_not_change_results(isa: str) -> None:
    if len(ALL_CPUS) < 2:
        pytest.skip("needs at least 2 CPUs to compare pool sizes")
    require_isa(isa)
    one = worker_cases(isa, ALL_CPUS[:1])
    many = worker_cases(isa, ALL_CPUS)
    # The pool really differs in size (else this test would compare a run with itself).
    assert one["meta"]["xla_pool_threads"] == 1, one["meta"]
    assert many["meta"]["xla_pool_threads"] >= 2, many["meta"]
    assert one["meta"]["isa"] == many["meta"]["isa"]
    for name, outputs in one["outputs"].items():
        assert_bitwise_equal(outputs, many["outputs"][name], f"{name} ({isa}): 1 vs "
                             f"{many['meta']['xla_pool_threads']} pool threads")


def expected_isa(isa: str) -> str:
    """What cc/dispatch.cc should pick for JAXATTN_ISA=isa on this CPU."""
    return default_isa() if isa == "default" else isa


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_matches_the_oracle(isa: str) -> None:
    require_isa(isa)
    result = worker_cases(isa, ALL_CPUS)
    assert result["meta"]["isa"] == expected_isa(isa), result["meta"]
    assert sorted(result["outputs"]) == sorted(c.name for c in CASES)
    for case in CASES:
        case.check(case.make_args(), result["outputs"][case.name])


def test_in_process_results_equal_subprocess_results() -> None:
    """The default path in this process equals a fresh process with the same pool size."""
    if "JAXATTN_ISA" in os.environ:
        pytest.skip("this process has a forced JAXATTN_ISA")
    result = worker_cases("default", ALL_CPUS)
    for case in CASES:
        assert_bitwise_equal(case.run(), result["outputs"][case.name], f"{case.name}: in process")


def test_forced_isa_runs_other_kernels() -> None:
    """The generic path really is other code than the default one (else the ISA tests above
    would test one path three times): some result differs in its last bits."""
    if expected_isa("default") == "generic":
        pytest.skip("the default path is the generic one on this CPU")
    a = worker_cases("generic", ALL_CPUS)["outputs"]
    b = worker_cases("default", ALL_CPUS)["outputs"]
    assert any(a[n][k].tobytes() != b[n][k].tobytes() for n in a for k in a[n]), (
        "generic and default kernels gave bitwise equal results everywhere")


# --------------------------------------------------------------------------------------------
# Tile size
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_query_tile_size_does_not_change_results(dtype: str, causal: bool) -> None:
    """cc/flash_context.h cuts flash attention into 128-row query tiles when the shape leaves
    >= 64 tasks, else 64-row tiles; every row's result must be bitwise the same either way.
    One batch element alone (2 tasks: 64-row tiles) against the same element inside a batch
    of 40 (80 tasks: 128-row tiles), forward and gradients."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxattn

    rng = np.random.default_rng(0)
    shape = (40, 200, 1, 72)  # T off the tile sizes; H off the vector width
    q, k, v, dout = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4))

    @jax.jit
    def forward_and_grads(q, k, v, dout):
        out, vjp = jax.vjp(lambda *a: jaxattn.flash_attention(*a, is_causal=causal), q, k, v)
        return (out, *vjp(dout))

    batched = forward_and_grads(q, k, v, dout)
    alone = forward_and_grads(q[:1], k[:1], v[:1], dout[:1])
    for name, x, y in zip(("out", "dq", "dk", "dv"), batched, alone):
        assert_bitwise_equal({name: np.asarray(x[:1])}, {name: np.asarray(y)},
                             f"{dtype} causal={causal}: batch of 40 vs alone")
