"""Concurrency: the kernels called from several Python threads at once, and from inside a
jitted computation where XLA runs them on its (busy) thread pool.

Rows come from ``reliability_cases.CASES``: every op added there is covered here too.
"""

from __future__ import annotations

import threading

import jax
import pytest

from reliability_cases import ALL_CPUS, CASES, OpCase, Outputs, assert_bitwise_equal, run_worker

NUM_THREADS = 4
CALLS_PER_THREAD = 3


def run_in_threads(work: list, timeout: float = 300) -> list:
    """Runs each ``work[i]()`` in its own thread, all released at once; returns the results
    (or raises the first exception). A thread still running after ``timeout`` is a hang."""
    barrier = threading.Barrier(len(work))
    results: list = [None] * len(work)
    errors: list = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work[i]()
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), f"a thread did not finish in {timeout} s (hang)"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_one_jitted_function_from_many_threads(case: OpCase) -> None:
    args = case.make_args()
    fn = case.compiled()
    reference = {k: jax.device_get(v) for k, v in fn(*args).items()}
    case.check(args, reference)

    def calls() -> list[Outputs]:
        return [{k: jax.device_get(v) for k, v in fn(*args).items()} for _ in range(CALLS_PER_THREAD)]

    for i, outputs in enumerate(run_in_threads([calls] * NUM_THREADS)):
        for j, out in enumerate(outputs):
            assert_bitwise_equal(out, reference, f"{case.name}: thread {i} call {j}")


def test_different_ops_from_many_threads_at_once() -> None:
    """Every case in its own thread (forward and backward kernels interleaved), twice over."""
    prepared = [(case, case.make_args(), case.compiled()) for case in CASES]
    references = [{k: jax.device_get(v) for k, v in fn(*args).items()} for _, args, fn in prepared]
    work = [lambda fn=fn, args=args: {k: jax.device_get(v) for k, v in fn(*args).items()}
            for _, args, fn in prepared] * 2
    for i, outputs in enumerate(run_in_threads(work)):
        case = prepared[i % len(prepared)][0]
        assert_bitwise_equal(outputs, references[i % len(prepared)], f"{case.name} (thread {i})")


@pytest.mark.parametrize("cpus", [ALL_CPUS[:1], ALL_CPUS], ids=["1cpu", "allcpus"])
def test_flash_inside_busy_jit_does_not_deadlock(cpus: tuple[int, ...]) -> None:
    """Independent flash calls (forward and backward), matmuls and a loop of flash calls in one
    jitted computation: XLA runs the custom calls on its pool workers, concurrently with other
    work. Runs in a subprocess under a timeout; the worker checks that repetitions are bitwise
    equal and match the calls made one at a time.

    With 2 CPUs, a join in which the calling thread only waits for the helpers it scheduled
    deadlocks here (checked by swapping such a join into cc/parallel.cc: the worker hangs).
    With 1 CPU the kernels run their tasks inline (no helpers): the serial path."""
    result = run_worker("nested", cpus=cpus, timeout=300)
    assert result["meta"]["xla_pool_threads"] == len(cpus)
    assert result["outputs"]["nested"], "the worker returned no results"
