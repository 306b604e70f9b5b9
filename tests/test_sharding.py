"""Sharded jit, shard_map, sequence parallelism and jax.export, on 4 CPU devices.

XLA fixes the number of CPU devices when jax initialises its backend, and the other test files
want one device. So in a normal pytest run this file holds a single test that re-runs the file
in a child pytest with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` and
``JAXATTN_SHARDING_CHILD=1``; the child runs the tests below. To run them directly:

    JAXATTN_SHARDING_CHILD=1 XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python -m pytest tests/test_sharding.py
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

CHILD = os.environ.get("JAXATTN_SHARDING_CHILD") == "1"
NUM_DEVICES = 4

if not CHILD:

    def test_sharding_suite_on_four_devices() -> None:
        """Runs this file's tests in a child process with 4 forced CPU devices."""
        flags = os.environ.get("XLA_FLAGS", "")
        env = dict(os.environ, JAXATTN_SHARDING_CHILD="1", JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={NUM_DEVICES}")
        # The child must import the same jaxattn as this process.
        spec = importlib.util.find_spec("jaxattn")
        assert spec is not None and spec.origin is not None
        package_root = str(Path(spec.origin).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(
            [package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            env=env, capture_output=True, text=True, cwd=str(Path(__file__).parent))
        assert result.returncode == 0, (
            f"4-device sharding tests failed (rc={result.returncode}):\n"
            f"{result.stdout[-30000:]}\n{result.stderr[-5000:]}")

else:
    import re
    from collections.abc import Callable

    import jax
    import jax.numpy as jnp
    import numpy as np
    import pytest
    from jax import export
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxattn
    from jaxattn import _ffi
    from oracle import attention_reference, attention_reference_grad

    B, T, S, N, K, H, HV = 4, 24, 40, 8, 4, 32, 16
    COLLECTIVE = re.compile(
        r"\s(all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)(-start)?\(")

    def test_four_devices() -> None:
        assert jax.device_count() == NUM_DEVICES

    def collectives(fn: Callable, *args) -> list[str]:
        """The collective ops in the compiled HLO of ``fn(*args)``."""
        hlo = fn.lower(*args).compile().as_text()
        return sorted({m.group(1) for m in COLLECTIVE.finditer(hlo)})

    def make_mesh(shape=(2, 2), names=("batch", "heads"), axis_type=AxisType.Auto):
        return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))

    def put(x, mesh, spec):
        return jax.device_put(x, NamedSharding(mesh, spec))

    def inputs(rng: np.random.Generator, n: int = N, k: int = K, b: int = B):
        q = rng.standard_normal((b, T, n, H), np.float32)
        key = rng.standard_normal((b, S, k, H), np.float32)
        value = rng.standard_normal((b, S, k, HV), np.float32)
        return q, key, value

    def assert_close(actual, expected, rtol=1e-5, atol=1e-5) -> None:
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)

    def vjp_fn(attend: Callable) -> Callable:
        """(q, k, v, cotangent) -> (dq, dk, dv): the pure backward pass, no loss reduction."""
        def grads(q, k, v, ct):
            _, pullback = jax.vjp(attend, q, k, v)
            return pullback(ct)
        return grads

    # Batch, heads, both, and heads over every device (K = 4 = number of devices).
    SPECS = {
        "batch": P("batch"),
        "heads": P(None, None, "heads"),
        "batch_heads": P("batch", None, "heads"),
        "heads_on_all": P(None, None, ("batch", "heads")),
    }
    LENGTHS = np.array([S, 17, 3, 29], np.int32)

    def options(spec_name: str, mesh) -> dict:
        """Causal, key lengths and query lengths, the lengths sharded like the batch."""
        lengths_spec = P("batch") if spec_name in ("batch", "batch_heads") else P()
        return dict(is_causal=True, key_value_seq_lengths=put(LENGTHS, mesh, lengths_spec),
                    query_seq_lengths=put(np.array([T, T, 5, 11], np.int32), mesh, lengths_spec))

    @pytest.mark.parametrize("spec_name", list(SPECS))
    @pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit],
                             ids=["auto", "explicit"])
    def test_forward_runs_per_shard(rng, spec_name, axis_type) -> None:
        mesh = make_mesh(axis_type=axis_type)
        spec = SPECS[spec_name]
        q, k, v = inputs(rng)
        opts = options(spec_name, mesh)
        expected = jaxattn.flash_attention(
            q, k, v, return_residual=True,
            **{name: np.asarray(x) if not isinstance(x, bool) else x for name, x in opts.items()})
        attend = jax.jit(lambda q, k, v: jaxattn.flash_attention(q, k, v, return_residual=True,
                                                                 **opts))
        args = [put(x, mesh, spec) for x in (q, k, v)]
        assert collectives(attend, *args) == []
        out, lse = attend(*args)
        assert_close((out, lse), expected, rtol=0, atol=0)
        assert out.sharding.is_equivalent_to(args[0].sharding, out.ndim)
        lse_spec = P(*tuple(spec)[:3]) if len(spec) >= 3 else spec
        assert lse.sharding.is_equivalent_to(NamedSharding(mesh, lse_spec), lse.ndim)

    def test_explicit_batch_sharding_needs_no_copies(rng) -> None:
        """With explicit mesh axes the types show the heads are whole: batch-only views, whose
        results come back as bitcasts (with heads possibly split, each result is copied)."""
        q, k, v = inputs(rng)
        ct = rng.standard_normal((B, T, N, HV), np.float32)
        grads = jax.jit(vjp_fn(jaxattn.flash_attention))
        for axis_type, copies in ((AxisType.Explicit, False), (AxisType.Auto, True)):
            mesh = make_mesh(axis_type=axis_type)
            args = [put(x, mesh, SPECS["batch"]) for x in (q, k, v, ct)]
            hlo = grads.lower(*args).compile().as_text()
            assert bool(re.search(r"\}\s+transpose\(", hlo)) == copies, axis_type
            assert COLLECTIVE.search(hlo) is None
            assert_close(grads(*args), vjp_fn(jaxattn.flash_attention)(q, k, v, ct),
                         rtol=0, atol=0)

    @pytest.mark.parametrize("spec_name", list(SPECS))
    def test_gradient_runs_per_shard(rng, spec_name) -> None:
        mesh = make_mesh()
        spec = SPECS[spec_name]
        q, k, v = inputs(rng)
        ct = rng.standard_normal((B, T, N, HV), np.float32)
        opts = options(spec_name, mesh)
        attend = lambda q, k, v: jaxattn.flash_attention(q, k, v, **opts)
        expected = vjp_fn(lambda q, k, v: jaxattn.flash_attention(
            q, k, v, is_causal=True, key_value_seq_lengths=LENGTHS,
            query_seq_lengths=np.array([T, T, 5, 11], np.int32)))(q, k, v, ct)
        grads = jax.jit(vjp_fn(attend))
        args = [put(x, mesh, spec) for x in (q, k, v, ct)]
        assert collectives(grads, *args) == []
        actual = grads(*args)
        assert_close(actual, expected, rtol=0, atol=0)
        for g, x in zip(actual, args):
            assert g.sharding.is_equivalent_to(x.sharding, g.ndim)

    def test_bfloat16_and_unbatched_run_per_shard(rng) -> None:
        mesh = make_mesh()
        q, k, v = (x.astype(jnp.bfloat16) for x in inputs(rng))
        ct = rng.standard_normal((B, T, N, HV)).astype(jnp.bfloat16)
        attend = lambda q, k, v: jaxattn.flash_attention(q, k, v, is_causal=True)
        args = [put(x, mesh, SPECS["batch_heads"]) for x in (q, k, v, ct)]
        assert collectives(jax.jit(vjp_fn(attend)), *args) == []
        assert_close(jax.jit(vjp_fn(attend))(*args), vjp_fn(attend)(q, k, v, ct),
                     rtol=0, atol=0)
        unbatched = [put(x[0], mesh, P(None, "heads")) for x in (q, k, v)]
        assert collectives(jax.jit(attend), *unbatched) == []
        assert_close(jax.jit(attend)(*unbatched), attend(q[0], k[0], v[0]), rtol=0, atol=0)

    def test_gradient_matches_the_oracle(rng) -> None:
        mesh = make_mesh()
        q, k, v = inputs(rng)
        ct = rng.standard_normal((B, T, N, HV), np.float32)
        args = [put(x, mesh, SPECS["batch_heads"]) for x in (q, k, v, ct)]
        actual = jax.jit(vjp_fn(lambda q, k, v: jaxattn.flash_attention(q, k, v,
                                                                        is_causal=True)))(*args)
        dq, dk, dv, _ = attention_reference_grad(q, k, v, ct, is_causal=True)
        assert_close(actual, (dq, dk, dv), rtol=1e-4, atol=1e-4)

    BIAS_SHAPES = {"full": (B, N, T, S), "shared": (1, 1, T, S), "per_batch": (B, 1, T, S),
                   "per_head": (1, N, T, S)}

    @pytest.mark.parametrize("shape_name", list(BIAS_SHAPES))
    def test_bias_and_mask_broadcasts_forward(rng, shape_name) -> None:
        """Broadcast operands are replicated or broadcast per shard, never gathered."""
        mesh = make_mesh()
        shape = BIAS_SHAPES[shape_name]
        q, k, v = inputs(rng)
        bias = rng.standard_normal(shape, np.float32)
        mask = rng.random(shape) > 0.2
        expected = jaxattn.flash_attention(q, k, v, bias, mask)
        attend = jax.jit(jaxattn.flash_attention)
        args = [put(x, mesh, SPECS["batch_heads"]) for x in (q, k, v)] + [bias, mask]
        assert collectives(attend, *args) == []
        assert_close(attend(*args), expected, rtol=0, atol=0)
        out_ref, _ = attention_reference(q, k, v, bias, mask)
        assert_close(attend(*args), out_ref, rtol=1e-4, atol=1e-4)

    def test_full_bias_gradient_runs_per_shard(rng) -> None:
        mesh = make_mesh()
        q, k, v = inputs(rng)
        bias = rng.standard_normal((B, N, T, S), np.float32)
        ct = rng.standard_normal((B, T, N, HV), np.float32)

        def grads(q, k, v, bias, ct):
            _, pullback = jax.vjp(jaxattn.flash_attention, q, k, v, bias)
            return pullback(ct)

        args = [put(x, mesh, SPECS["batch_heads"]) for x in (q, k, v)]
        args += [put(bias, mesh, P("batch", "heads")), put(ct, mesh, SPECS["batch_heads"])]
        assert collectives(jax.jit(grads), *args) == []
        assert_close(jax.jit(grads)(*args), grads(q, k, v, bias, ct), rtol=1e-6, atol=1e-6)

    def test_collective_detector_sees_gathers(rng) -> None:
        """A query sharded along its sequence is gathered: the detector must notice."""
        mesh = make_mesh()
        q, k, v = inputs(rng)
        attend = jax.jit(jaxattn.flash_attention)
        args = [put(q, mesh, P(None, "heads")), put(k, mesh, P()), put(v, mesh, P())]
        assert "all-gather" in collectives(attend, *args)
        assert_close(attend(*args), jaxattn.flash_attention(q, k, v), rtol=0, atol=0)

    def test_gqa_split_not_in_whole_groups_is_an_error(rng) -> None:
        """Query heads over 4 devices with 2 kv heads: refused at run time, never wrong."""
        mesh = make_mesh((1, 4))
        q, k, v = inputs(rng, n=8, k=2)
        attend = jax.jit(jaxattn.flash_attention)
        args = [put(q, mesh, P(None, None, "heads")), put(k, mesh, P()), put(v, mesh, P())]
        with pytest.raises(jax.errors.JaxRuntimeError, match="whole GQA groups"):
            jax.block_until_ready(attend(*args))

    def test_kv_replicated_heads_sharded_in_whole_groups(rng) -> None:
        """Sharded query heads with replicated kv: each device slices its kv heads locally."""
        mesh = make_mesh((1, 4))
        q, k, v = inputs(rng, n=8, k=4)
        attend = jax.jit(jaxattn.flash_attention)
        args = [put(q, mesh, P(None, None, "heads")), put(k, mesh, P()), put(v, mesh, P())]
        assert collectives(attend, *args) == []
        assert_close(attend(*args), jaxattn.flash_attention(q, k, v), rtol=0, atol=0)

    def test_single_kv_head_with_sharded_heads_is_correct(rng) -> None:
        """MQA cannot be split in whole groups: XLA gathers the heads, the result is right."""
        mesh = make_mesh()
        q, k, v = inputs(rng, n=8, k=1)
        mask = rng.random((B, 1, T, S)) > 0.2
        attend = jax.jit(jaxattn.flash_attention)
        args = [put(q, mesh, SPECS["batch_heads"]), put(k, mesh, P("batch")),
                put(v, mesh, P("batch")), None, mask]
        assert "all-gather" in collectives(attend, *args)
        assert_close(attend(*args), jaxattn.flash_attention(q, k, v, None, mask), rtol=0, atol=0)

    def test_vmap_with_unmapped_kv_under_sharding(rng) -> None:
        mesh = make_mesh()
        q = rng.standard_normal((2, 2, T, N, H), np.float32)
        k = rng.standard_normal((2, S, K, H), np.float32)
        v = rng.standard_normal((2, S, K, HV), np.float32)
        fn = lambda q, k, v: jax.vmap(lambda qq: jaxattn.flash_attention(qq, k, v))(q)
        args = [put(q, mesh, P("batch", None, None, "heads")),
                put(k, mesh, P(None, None, "heads")), put(v, mesh, P(None, None, "heads"))]
        assert collectives(jax.jit(fn), *args) == []
        assert_close(jax.jit(fn)(*args), fn(q, k, v), rtol=0, atol=0)
        loss = lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)
        assert_close(jax.jit(jax.grad(loss, (0, 1, 2)))(*args),
                     jax.grad(loss, (0, 1, 2))(q, k, v), rtol=1e-6, atol=1e-6)

    def test_gspmd_partitioner(rng) -> None:
        """Without Shardy, the batch partitioner's own sharding inference is used."""
        mesh = make_mesh()
        q, k, v = inputs(rng)
        ct = rng.standard_normal((B, T, N, HV), np.float32)
        args = [put(x, mesh, SPECS["batch_heads"]) for x in (q, k, v, ct)]
        grads = jax.jit(vjp_fn(jaxattn.flash_attention))
        shardy = jax.config.jax_use_shardy_partitioner
        jax.config.update("jax_use_shardy_partitioner", False)
        try:
            assert collectives(grads, *args) == []
            actual = grads(*args)
        finally:
            jax.config.update("jax_use_shardy_partitioner", shardy)
        assert_close(actual, vjp_fn(jaxattn.flash_attention)(q, k, v, ct), rtol=0, atol=0)

    PARTITIONED_FWD = {
        partition: _ffi._define(f"test_flash_fwd_{partition}", "jaxattn_flash_fwd_v2",
                                _ffi._flash_fwd_abstract,
                                axes=f"{_ffi._FLASH_OPERANDS},{_ffi._TOKEN_OPERANDS}->btnd,btn",
                                partition=partition)
        for partition in ("b", "h")
    }

    @pytest.mark.parametrize("partition", ["b", "h"])
    def test_define_with_one_partition_factor(rng, partition) -> None:
        """A primitive may partition batch only or heads only (paged pages have no batch)."""
        mesh = make_mesh()
        prim = PARTITIONED_FWD[partition]
        q, k, v = inputs(rng)
        mask = rng.random((1, 1, T, S)) > 0.2
        lengths = LENGTHS
        attrs = _ffi.attention_attrs(0.3, None, True, None)

        def attend(q, k, v):
            return prim.bind(q, k, v, jnp.zeros((0,), jnp.float32), mask,
                             jnp.zeros((0,), jnp.int32), lengths, *_ffi.no_tokens(), **attrs)

        expected = _ffi.flash_fwd_p.bind(q, k, v, jnp.zeros((0,), jnp.float32), mask,
                                         jnp.zeros((0,), jnp.int32), lengths, *_ffi.no_tokens(),
                                         **attrs)
        own = P("batch") if partition == "b" else P(None, None, "heads")
        args = [put(x, mesh, own) for x in (q, k, v)]
        assert collectives(jax.jit(attend), *args) == []
        assert_close(jax.jit(attend)(*args), expected, rtol=0, atol=0)
        # Sharding the other factor too is still right: XLA gathers that one.
        args = [put(x, mesh, SPECS["batch_heads"]) for x in (q, k, v)]
        assert "all-gather" in collectives(jax.jit(attend), *args)
        assert_close(jax.jit(attend)(*args), expected, rtol=0, atol=0)

    @pytest.mark.parametrize("per_head", [False, True], ids=["shared_mask", "per_head_mask"])
    def test_block_sparse_runs_per_shard(rng, per_head) -> None:
        """Block-sparse attention: a mask shared by all heads splits batch and heads; a per-head
        mask (tables indexed by kv head) splits the batch, and a head split is gathered."""
        mesh = make_mesh()
        q, k, v = inputs(rng)
        dense = rng.random((N if per_head else 1, T, S)) > 0.6
        mask = jaxattn.BlockSparseMask.from_dense(dense, block_q=8, block_kv=8)
        ct = rng.standard_normal((B, T, N, HV), np.float32)
        attend = lambda q, k, v: jaxattn.block_sparse_attention(q, k, v, mask)
        expected = vjp_fn(lambda q, k, v: jaxattn.flash_attention(q, k, v, mask=dense[None]))(
            q, k, v, ct)
        split = SPECS["batch"] if per_head else SPECS["batch_heads"]
        for spec, gathers in ((split, False), (SPECS["batch_heads"], per_head)):
            args = [put(x, mesh, spec) for x in (q, k, v, ct)]
            assert ("all-gather" in collectives(jax.jit(vjp_fn(attend)), *args)) == gathers
            assert_close(jax.jit(vjp_fn(attend))(*args), expected, rtol=1e-6, atol=1e-6)
            assert_close(jax.jit(attend)(*args[:3]),
                         jaxattn.flash_attention(q, k, v, mask=dense[None]),
                         rtol=1e-6, atol=1e-6)

    def test_decode_runs_per_shard(rng) -> None:
        mesh = make_mesh()
        q = rng.standard_normal((B, 3, N, H), np.float32)
        cache_k = rng.standard_normal((B, 64, K, H), np.float32)
        cache_v = rng.standard_normal((B, 64, K, HV), np.float32)
        lengths = np.array([64, 9, 30, 3], np.int32)
        attend = jax.jit(lambda q, k, v, n: jaxattn.decode_attention(q, k, v, n,
                                                                     return_residual=True))
        args = [put(x, mesh, SPECS["batch_heads"]) for x in (q, cache_k, cache_v)]
        args.append(put(lengths, mesh, P("batch")))
        assert collectives(attend, *args) == []
        out, lse = attend(*args)
        assert_close((out, lse), attend(q, cache_k, cache_v, lengths), rtol=0, atol=0)
        assert out.sharding.is_equivalent_to(args[0].sharding, out.ndim)

    def test_paged_decode_splits_heads(rng) -> None:
        """The page pool has no batch axis: heads split per device, a batch split is gathered."""
        mesh = make_mesh()
        page, num_pages, max_pages = 8, 24, 5
        q = rng.standard_normal((B, 2, N, H), np.float32)
        pages_k = rng.standard_normal((num_pages, page, K, H), np.float32)
        pages_v = rng.standard_normal((num_pages, page, K, HV), np.float32)
        tables = rng.permutation(num_pages)[:B * max_pages].reshape(B, max_pages)
        tables = tables.astype(np.int32)
        lengths = np.array([40, 7, 33, 2], np.int32)
        attend = jax.jit(jaxattn.paged_decode_attention)
        expected = attend(q, pages_k, pages_v, tables, lengths)
        heads = P(None, None, "heads")
        args = [put(x, mesh, heads) for x in (q, pages_k, pages_v)] + [tables, lengths]
        assert collectives(attend, *args) == []
        assert_close(attend(*args), expected, rtol=0, atol=0)
        args[0] = put(q, mesh, SPECS["batch_heads"])
        assert_close(attend(*args), expected, rtol=0, atol=0)

    @pytest.mark.parametrize("spec_name", ["batch", "heads", "batch_heads"])
    def test_gated_linear_attention_runs_per_shard(rng, spec_name) -> None:
        """Forward and gradient of gated linear attention split along batch and heads, the
        state [B, N, Hk, Hv] sharded alike: no collectives, the single-device numbers."""
        mesh = make_mesh()
        q, k = (rng.standard_normal((B, T, N, H), np.float32) for _ in range(2))
        g = -np.abs(rng.standard_normal((B, T, N, H), np.float32))
        v = rng.standard_normal((B, T, N, HV), np.float32)
        s0 = rng.standard_normal((B, N, H, HV), np.float32)
        gla = lambda q, k, v, g, s: jaxattn.gated_linear_attention(
            q, k, v, g, initial_state=s, return_final_state=True)
        loss = lambda *a: sum(jnp.sum(jnp.sin(x)) for x in gla(*a))
        grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
        spec = SPECS[spec_name]
        state_spec = P(*(tuple(spec)[:1] + tuple(spec)[2:3]))
        args = [put(x, mesh, spec) for x in (q, k, v, g)] + [put(s0, mesh, state_spec)]
        for fn, expected in ((gla, gla(q, k, v, g, s0)), (grad, grad(q, k, v, g, s0))):
            assert collectives(jax.jit(fn), *args) == []
            assert_close(jax.jit(fn)(*args), expected, rtol=0, atol=0)

    # ----------------------------------------------------------------------------------------
    # shard_map

    def test_shard_map_forward_and_gradient(rng) -> None:
        mesh = make_mesh()
        spec = SPECS["batch_heads"]
        q, k, v = inputs(rng)
        attend = jax.shard_map(lambda q, k, v: jaxattn.flash_attention(q, k, v, is_causal=True),
                               mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
        reference = lambda q, k, v: jaxattn.flash_attention(q, k, v, is_causal=True)
        loss = lambda f: (lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))))
        assert_close(jax.jit(attend)(q, k, v), reference(q, k, v), rtol=0, atol=0)
        assert_close(jax.jit(jax.grad(loss(attend), (0, 1, 2)))(q, k, v),
                     jax.grad(loss(reference), (0, 1, 2))(q, k, v), rtol=1e-6, atol=1e-6)

    def test_shard_map_gradient_of_replicated_inputs(rng) -> None:
        """Queries split along T, keys/values and a bias replicated: their gradients are summed
        over the devices (the transpose of the varying cast)."""
        mesh = make_mesh((4,), ("seq",))
        q, k, v = inputs(rng, b=1)
        bias = rng.standard_normal((1, N, T, S), np.float32)
        attend = jax.shard_map(
            lambda q, k, v, bias: jaxattn.flash_attention(q, k, v, bias),
            mesh=mesh, in_specs=(P(None, "seq"), P(), P(), P(None, None, "seq")),
            out_specs=P(None, "seq"))
        loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a))))
        actual = jax.jit(jax.grad(loss(attend), (0, 1, 2, 3)))(q, k, v, bias)
        expected = jax.grad(loss(jaxattn.flash_attention), (0, 1, 2, 3))(q, k, v, bias)
        assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    def test_shard_map_over_batch_with_automatic_heads(rng) -> None:
        """Manual batch axis, automatic heads axis: the heads are still split per device."""
        mesh = make_mesh()
        q, k, v = inputs(rng)
        attend = jax.jit(jax.shard_map(jaxattn.flash_attention, mesh=mesh,
                                       in_specs=(P("batch"),) * 3, out_specs=P("batch"),
                                       axis_names={"batch"}))
        args = [put(x, mesh, SPECS["batch_heads"]) for x in (q, k, v)]
        assert collectives(attend, *args) == []
        assert_close(attend(*args), jaxattn.flash_attention(q, k, v), rtol=0, atol=0)

    # ----------------------------------------------------------------------------------------
    # Sequence parallelism

    SP_CASES = {
        "plain": dict(),
        "causal": dict(is_causal=True),
        "lengths": dict(key_value_seq_lengths=np.array([40, 13, 0, 31], np.int32),
                        query_seq_lengths=np.array([24, 7, 24, 0], np.int32)),
        "causal_lengths_softcap": dict(is_causal=True, logits_soft_cap=5.0,
                                       key_value_seq_lengths=np.array([40, 13, 0, 31],
                                                                      np.int32)),
    }

    @pytest.mark.parametrize("case", list(SP_CASES))
    def test_sequence_parallel_matches_unsharded(rng, case) -> None:
        mesh = make_mesh((4,), ("seq",))
        opts = SP_CASES[case]
        q, k, v = inputs(rng)
        k = np.concatenate([k, k[:, :8]], axis=1)  # S = 48, 12 keys per device
        v = np.concatenate([v, v[:, :8]], axis=1)
        reference = lambda q, k, v: jaxattn.flash_attention(q, k, v, return_residual=True,
                                                            **opts)
        parallel = jax.jit(lambda q, k, v: jaxattn.sequence_parallel_attention(
            q, k, v, axis_name="seq", mesh=mesh, return_residual=True, **opts))
        (out, lse), (out_ref, lse_ref) = parallel(q, k, v), reference(q, k, v)
        assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(lse_ref))
        finite = np.isfinite(lse_ref)
        np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(lse_ref)[finite],
                                   rtol=1e-5, atol=1e-5)
        ct = rng.standard_normal(out_ref.shape, np.float32)
        ct_lse = rng.standard_normal(lse_ref.shape, np.float32)

        def loss(f):
            def value(q, k, v):
                o, l = f(q, k, v)
                return jnp.sum(o * ct) + jnp.sum(jnp.where(jnp.isfinite(l), l, 0.0) * ct_lse)
            return value

        actual = jax.jit(jax.grad(loss(parallel), (0, 1, 2)))(q, k, v)
        expected = jax.grad(loss(reference), (0, 1, 2))(q, k, v)
        assert_close(actual, expected, rtol=1e-4, atol=1e-5)
        for g in actual:
            assert np.isfinite(np.asarray(g)).all()

    def test_sequence_parallel_inside_shard_map_with_batch_axis(rng) -> None:
        """Called inside the user's shard_map: batch split over one axis, keys over another."""
        mesh = make_mesh((2, 2), ("batch", "seq"))
        q, k, v = inputs(rng)
        local = lambda q, k, v: jaxattn.sequence_parallel_attention(q, k, v, axis_name="seq",
                                                                    is_causal=True)
        attend = jax.jit(jax.shard_map(local, mesh=mesh,
                                       in_specs=(P("batch"), P("batch", "seq"), P("batch", "seq")),
                                       out_specs=P("batch")))
        expected = jaxattn.flash_attention(q, k, v, is_causal=True)
        assert_close(attend(q, k, v), expected, rtol=1e-5, atol=1e-6)
        out_ref, _ = attention_reference(q, k, v, is_causal=True)
        assert_close(attend(q, k, v), out_ref, rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit],
                             ids=["auto", "explicit"])
    def test_sequence_parallel_keeps_batch_sharding(rng, axis_type) -> None:
        """With ``mesh=``, the other mesh axes stay automatic: a batch-sharded input runs per
        shard; the only communication is the gather of the partial results."""
        mesh = make_mesh((2, 2), ("batch", "seq"), axis_type=axis_type)
        q, k, v = inputs(rng)
        args = [put(q, mesh, P("batch"))] + [put(x, mesh, P("batch", "seq")) for x in (k, v)]
        attend = jax.jit(lambda q, k, v: jaxattn.sequence_parallel_attention(
            q, k, v, axis_name="seq", mesh=mesh, is_causal=True))
        assert collectives(attend, *args) == ["all-gather"]
        out = attend(*args)
        assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("batch")), out.ndim)
        assert_close(out, jaxattn.flash_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-6)

    def test_sequence_parallel_rejects_indivisible_length(rng) -> None:
        mesh = make_mesh((4,), ("seq",))
        q, k, v = inputs(rng)
        with pytest.raises(ValueError, match="divisible"):
            jaxattn.sequence_parallel_attention(q, k[:, :39], v[:, :39], axis_name="seq",
                                                mesh=mesh)
        with pytest.raises(ValueError, match="axis_name"):
            jaxattn.sequence_parallel_attention(q, k, v, axis_name="nope", mesh=mesh)

    # ----------------------------------------------------------------------------------------
    # jax.export

    def round_trip(fn: Callable, *args) -> export.Exported:
        exported = export.export(fn, disabled_checks=jaxattn.export_disabled_checks())(*args)
        return export.deserialize(exported.serialize(vjp_order=1))

    def test_export_round_trip_forward_and_vjp(rng) -> None:
        q, k, v = inputs(rng)
        bias = rng.standard_normal((1, N, T, S), np.float32)
        fn = jax.jit(lambda q, k, v, bias: jaxattn.flash_attention(q, k, v, bias,
                                                                   is_causal=True))
        loaded = round_trip(fn, q, k, v, bias)
        assert_close(loaded.call(q, k, v, bias), fn(q, k, v, bias), rtol=0, atol=0)
        ct = rng.standard_normal((B, T, N, HV), np.float32)
        _, pullback = jax.vjp(loaded.call, q, k, v, bias)
        _, pullback_ref = jax.vjp(fn, q, k, v, bias)
        assert_close(pullback(ct), pullback_ref(ct), rtol=0, atol=0)

    def test_export_of_a_sharded_function(rng) -> None:
        mesh = make_mesh()
        sharding = NamedSharding(mesh, SPECS["batch_heads"])
        q, k, v = inputs(rng)
        fn = jax.jit(lambda q, k, v: jaxattn.flash_attention(q, k, v, is_causal=True),
                     in_shardings=(sharding,) * 3, out_shardings=sharding)
        loaded = round_trip(fn, q, k, v)
        assert loaded.nr_devices == NUM_DEVICES
        args = [jax.device_put(x, sharding) for x in (q, k, v)]
        call = jax.jit(loaded.call)
        assert collectives(call, *args) == []
        assert_close(call(*args), fn(q, k, v), rtol=0, atol=0)
        ct = jax.device_put(rng.standard_normal((B, T, N, HV), np.float32), sharding)
        grads = jax.jit(vjp_fn(loaded.call))
        assert collectives(grads, *args, ct) == []
        assert_close(grads(*args, ct), vjp_fn(fn)(q, k, v, ct), rtol=0, atol=0)

    def test_export_disabled_checks_cover_every_target() -> None:
        names = [check.is_custom_call() for check in jaxattn.export_disabled_checks()]
        assert sorted(names) == sorted(_ffi.TARGETS)
        assert len(names) >= 3
        for name in names:  # versioned: a changed layout gets a new name
            assert re.fullmatch(r"jaxattn_\w+_v\d+", name), name

    def test_export_without_the_checks_is_refused(rng) -> None:
        q, k, v = inputs(rng)
        with pytest.raises(ValueError, match="custom call"):
            export.export(jax.jit(jaxattn.flash_attention))(q, k, v)

    # ----------------------------------------------------------------------------------------
    # The views adapter (cc/ffi/shard_views.cc) never crashes on a malformed description

    def flash_call(views: np.ndarray):
        q, k, v = (np.ones((1, 4, 2, 8), np.float32),) * 3
        empty_f, empty_b, empty_i = (np.zeros((0,), t) for t in (np.float32, np.bool_, np.int32))
        call = jax.ffi.ffi_call(
            "jaxattn_flash_fwd_v2",
            (jax.ShapeDtypeStruct((1, 4, 2, 8), np.float32),
             jax.ShapeDtypeStruct((1, 4, 2), np.float32)))
        # ... plus the five absent token operands (positions, segment ids, ALiBi slopes)
        return call(q, k, v, empty_f, empty_b, empty_i, empty_i, *(empty_i,) * 4, empty_f,
                    scale=np.float32(0.5),
                    soft_cap=np.float32(0), is_causal=False, window_left=np.int64(-1),
                    window_right=np.int64(-1), jaxattn_views=views)

    IDENTITY_VIEWS = [1, 12, 2, 0] + [4, 0, 1, 2, 3] * 3 + [1, -1] * 9 + [4, 0, 1, 2, 3, 3, 0, 1, 2]

    def test_views_identity_matches_plain_call() -> None:
        out, _ = flash_call(np.asarray(IDENTITY_VIEWS, np.int64))
        q = np.ones((1, 4, 2, 8), np.float32)
        assert_close(out, jaxattn.flash_attention(q, q, q, scale=0.5), rtol=0, atol=0)

    @pytest.mark.parametrize("views", [
        [2, 12, 2, 0],                                  # unknown format
        [1, 6, 2, 0],                                   # wrong operand count
        IDENTITY_VIEWS[:-1],                            # truncated
        IDENTITY_VIEWS + [0],                           # trailing data
        [1, 12, 2, 0] + [4, 0, 1, 9, 3] + IDENTITY_VIEWS[9:],   # axis out of range
        [1, 12, 2, 0] + [4, 0, 1, 2, -100] + IDENTITY_VIEWS[9:],  # more data than the buffer
        [1, 12, 2, 1, 2, 0, 2, 2, 1, 2, 4] + IDENTITY_VIEWS[4:],  # inconsistent factor ratio
    ], ids=["format", "count", "truncated", "trailing", "axis", "size", "ratio"])
    def test_views_malformed_is_an_error(views) -> None:
        with pytest.raises(jax.errors.JaxRuntimeError, match="jaxattn"):
            jax.block_until_ready(flash_call(np.asarray(views, np.int64)))

    # ----------------------------------------------------------------------------------------
    # Gated linear attention

    @pytest.mark.parametrize("spec_name", list(SPECS))
    @pytest.mark.parametrize("scalar_gate", [False, True], ids=["per_dim_gate", "scalar_gate"])
    def test_gated_linear_attention_kv_heads_per_shard(rng, spec_name, scalar_gate) -> None:
        """Grouped heads (N = 8 query heads, K = 4 kv heads), a per-dim or a scalar gate and
        an initial state: forward, final state and gradients per shard, equal to one device."""
        mesh = make_mesh()
        spec = SPECS[spec_name]
        entries = tuple(spec) + (None,) * (3 - len(spec))
        q = rng.standard_normal((B, T, N, H), np.float32)
        k = rng.standard_normal((B, T, K, H), np.float32)
        v = rng.standard_normal((B, T, K, HV), np.float32)
        g = -rng.random((B, T, K) if scalar_gate else (B, T, K, H)).astype(np.float32)
        s0 = rng.standard_normal((B, N, H, HV), np.float32)
        ct = rng.standard_normal((B, T, N, HV), np.float32)

        def fwd_bwd(q, k, v, g, s0, ct):
            gla = lambda *a: jaxattn.gated_linear_attention(*a[:4], initial_state=a[4],
                                                            return_final_state=True)
            (out, final), pullback = jax.vjp(gla, q, k, v, g, s0)
            return out, final, pullback((ct, final))

        fn = jax.jit(fwd_bwd)
        specs = (spec, spec, spec, P(*entries[:g.ndim]), P(entries[0], entries[2]), spec)
        args = [put(x, mesh, s) for x, s in zip((q, k, v, g, s0, ct), specs)]
        assert collectives(fn, *args) == []
        actual = fn(*args)
        assert_close(actual, fwd_bwd(q, k, v, g, s0, ct), rtol=0, atol=0)
        assert actual[0].sharding.is_equivalent_to(args[0].sharding, 4)
