"""JAX transformations at the edges of what the ops support (issue 13).

- ``jax.export`` with symbolic batch and sequence lengths works for every op (the Python side
  used to compare symbolic dimensions, ``min(b, t, n, s) == 0``, which is undecidable), and the
  exported program, deserialised, gives the results of the direct call at concrete shapes.
- Forward-mode and higher-order differentiation (``jax.jvp``, ``jax.linearize``,
  ``jax.jacfwd``, ``jax.hessian``, grad of grad) raise a NotImplementedError that names the
  operation and the alternative, instead of JAX's internal messages; reverse mode still works.
- ``sequence_parallel_attention`` takes the same flags as ``flash_attention`` (NumPy bools).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxattn
from jaxattn import masks

F32 = jnp.float32


def _sds(shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _normal(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


SPARSE_MASK = masks.local(48, window=(9, 0), block_q=16, block_kv=16)


def _export_cases(b, t, s, p, m):
    """name -> (function, symbolic argument specs, concrete shapes for (b, t, s, p, m))."""
    return {
        "flash": (lambda q, k, v, lengths: jaxattn.flash_attention(
            q, k, v, is_causal=True, key_value_seq_lengths=lengths),
            (_sds((b, t, 4, 16)), _sds((b, s, 2, 16)), _sds((b, s, 2, 16)),
             _sds((b,), jnp.int32))),
        "flash_grad": (jax.grad(lambda q, k, v, lengths: jaxattn.flash_attention(
            q, k, v, is_causal=True, key_value_seq_lengths=lengths).sum(), argnums=(0, 1, 2)),
            (_sds((b, t, 4, 16)), _sds((b, s, 2, 16)), _sds((b, s, 2, 16)),
             _sds((b,), jnp.int32))),
        "block_sparse": (lambda q, k, v: jaxattn.block_sparse_attention(q, k, v, SPARSE_MASK),
                         (_sds((b, 48, 4, 16)), _sds((b, 48, 2, 16)), _sds((b, 48, 2, 16)))),
        "block_sparse_grad": (jax.grad(lambda q, k, v: jaxattn.block_sparse_attention(
            q, k, v, SPARSE_MASK).sum(), argnums=(0, 1, 2)),
            (_sds((b, 48, 4, 16)), _sds((b, 48, 2, 16)), _sds((b, 48, 2, 16)))),
        "decode": (lambda q, k, v, lengths: jaxattn.decode_attention(q, k, v, lengths),
                   (_sds((b, 2, 4, 16)), _sds((b, s, 2, 16)), _sds((b, s, 2, 16)),
                    _sds((b,), jnp.int32))),
        "paged_decode": (lambda q, k, v, tables, lengths: jaxattn.paged_decode_attention(
            q, k, v, tables, lengths),
            (_sds((b, 1, 4, 16)), _sds((p, 8, 2, 16)), _sds((p, 8, 2, 16)),
             _sds((b, m), jnp.int32), _sds((b,), jnp.int32))),
        "merge": (lambda o, l: jaxattn.merge_attention_states(o, l),
                  (_sds((3, b, t, 4, 16)), _sds((3, b, t, 4)))),
    }


def _concrete(rng, name, spec, sizes):
    shape = tuple(sizes[str(d)] if not isinstance(d, int) else d for d in spec.shape)
    if spec.dtype == jnp.int32:
        if len(shape) == 2:  # block tables: valid page ids
            return rng.integers(0, sizes["p"], size=shape).astype(np.int32)
        return rng.integers(0, 9, size=shape).astype(np.int32)
    return _normal(rng, shape)


@pytest.mark.parametrize("name", list(_export_cases(*([1] * 5))))  # names only
def test_export_with_symbolic_batch_and_lengths(rng, name):
    b, t, s, p, m = export.symbolic_shape("b, t, s, p, m")
    fn, specs = _export_cases(b, t, s, p, m)[name]
    exported = export.export(jax.jit(fn), disabled_checks=jaxattn.export_disabled_checks())(
        *specs)
    loaded = export.deserialize(exported.serialize())
    for sizes in ({"b": 2, "t": 5, "s": 7, "p": 6, "m": 3},
                  {"b": 3, "t": 9, "s": 12, "p": 4, "m": 2}):
        args = [_concrete(rng, name, spec, sizes) for spec in specs]
        got = jax.tree.leaves(loaded.call(*args))
        want = jax.tree.leaves(jax.jit(fn)(*args))
        for x, y in zip(got, want):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _ops(rng):
    q = _normal(rng, (1, 16, 2, 8))
    lengths = np.array([16], np.int32)
    sparse = masks.causal(16, block_q=8, block_kv=8)
    return {
        "flash_attention": lambda q: jaxattn.flash_attention(q, q, q, is_causal=True).sum(),
        "block_sparse_attention": lambda q: jaxattn.block_sparse_attention(q, q, q,
                                                                           sparse).sum(),
        "decode_attention": lambda q: jaxattn.decode_attention(q[:, :1], q, q, lengths).sum(),
    }, q


TRANSFORMS = {
    "jvp": lambda f, q: jax.jvp(f, (q,), (q,)),
    "linearize": lambda f, q: jax.linearize(f, q)[1](q),
    "jacfwd": lambda f, q: jax.jacfwd(f)(q),
    "hessian": lambda f, q: jax.hessian(f)(q),
    "grad_of_grad": lambda f, q: jax.grad(lambda x: jax.grad(f)(x).sum())(q),
    "jacrev_of_grad": lambda f, q: jax.jacrev(jax.grad(f))(q),
    "vmap_of_jvp": lambda f, q: jax.vmap(lambda x: jax.jvp(f, (x,), (x,)))(q[None]),
    "jit_of_jvp": lambda f, q: jax.jit(lambda x: jax.jvp(f, (x,), (x,)))(q),
}


SECOND_ORDER = ("hessian", "grad_of_grad", "jacrev_of_grad")


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("op", ["flash_attention", "block_sparse_attention", "decode_attention"])
def test_forward_mode_and_higher_order_raise_clearly(rng, op, transform):
    ops, q = _ops(rng)
    if op == "flash_attention":
        if transform not in SECOND_ORDER:  # forward mode works (tests/test_forward_mode.py)
            jax.block_until_ready(TRANSFORMS[transform](ops[op], q))
            return
        with pytest.raises(NotImplementedError,
                           match=r"jaxattn\.flash_attention: second derivatives .* both modes"):
            jax.block_until_ready(TRANSFORMS[transform](ops[op], q))
        return
    if op == "decode_attention":
        match = r"jaxattn\.decode_attention is an inference kernel and has no gradient"
    else:
        match = (rf"jaxattn\.{op} supports reverse-mode differentiation only .*"
                 r"jax\.nn\.dot_product_attention")
    with pytest.raises(NotImplementedError, match=match):
        jax.block_until_ready(TRANSFORMS[transform](ops[op], q))


@pytest.mark.parametrize("op", ["flash_attention", "block_sparse_attention"])
def test_reverse_mode_still_works(rng, op):
    ops, q = _ops(rng)
    f = ops[op]
    g = jax.grad(f)(q)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.grad(f))(q)), np.asarray(g))
    jac = jax.jacrev(f)(q)
    np.testing.assert_allclose(np.asarray(jac), np.asarray(g), rtol=1e-6)
    _, pullback = jax.vjp(f, q)
    np.testing.assert_allclose(np.asarray(pullback(np.float32(1.0))[0]), np.asarray(g),
                               rtol=1e-6)


def test_sequence_parallel_accepts_numpy_bool_flags(rng):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("seq",))
    q, k, v = (_normal(rng, (1, 8, 2, 16)) for _ in range(3))
    out = jaxattn.sequence_parallel_attention(q, k, v, axis_name="seq", mesh=mesh,
                                              is_causal=np.bool_(True),
                                              scale=np.float32(0.5))
    want = jaxattn.flash_attention(q, k, v, is_causal=True, scale=0.5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        jaxattn.sequence_parallel_attention(q, k, v, axis_name="seq", mesh=mesh, is_causal=1)
