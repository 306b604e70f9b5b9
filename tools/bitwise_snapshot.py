"""Bitwise snapshot of the kernels' outputs, for refactors that must not change a bit.

Runs a fixed set of flash (forward, vjp with an lse cotangent, jvp, bias gradient), block-sparse,
decode, paged, int8-cache and dropout calls over f32/bf16/f16 and float64 (x64 on) and odd shapes,
then saves every output to an .npz or compares against one bitwise:

    PYTHONPATH=. JAXATTN_ISA=avx2 python tools/bitwise_snapshot.py save /tmp/base_avx2.npz
    # ... change the kernels, rebuild ...
    PYTHONPATH=. JAXATTN_ISA=avx2 python tools/bitwise_snapshot.py compare /tmp/base_avx2.npz

Exit status 1 on any difference (the first 20 names are printed). ~2 minutes on 2 cores. A third
argument keeps the outputs whose names start with it: "positions/" and "float64/" run only those
cases (seconds), e.g. `... save /tmp/f64.npz float64/`.
"""
import sys
from functools import partial
import numpy as np
import jax
import jax.numpy as jnp
import jaxattn


def rnd(key: int, shape: tuple[int, ...], dtype) -> jax.Array:
    """Standard normal values of `shape` from seed `key`, in `dtype`."""
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def sparse_attention(q, k, v, *, mask, **kw):
    """block_sparse_attention with the mask as a keyword (for functools.partial)."""
    return jaxattn.block_sparse_attention(q, k, v, mask, **kw)


def record_flash(out: dict, tag: str, attention, qkv: tuple, cotangents: tuple,
                 tangent_seed: int | None = None) -> None:
    """Stores under `tag` the outputs and lse of attention(q, k, v, return_residual=True), the
    (dq, dk, dv) of the cotangents (dout, dlse) and, with a tangent_seed, the jvp of random
    tangents from seeds tangent_seed, + 1, + 2."""
    def f(q, k, v):
        return attention(q, k, v, return_residual=True)
    (o, lse), vjp = jax.vjp(f, *qkv)
    dq, dk, dv = vjp(cotangents)
    out[tag + "/o"], out[tag + "/lse"] = o, lse
    out[tag + "/dq"], out[tag + "/dk"], out[tag + "/dv"] = dq, dk, dv
    if tangent_seed is not None:
        tangents = tuple(rnd(tangent_seed + i, x.shape, x.dtype) for i, x in enumerate(qkv))
        _, (to, tl) = jax.jvp(f, qkv, tangents)
        out[tag + "/jvp_o"], out[tag + "/jvp_lse"] = to, tl


def position_cases() -> dict[str, np.ndarray]:
    """Flash calls with query/key positions: monotone (left padding, gaps, prefill partway into a
    cache, windows), monotone only within the lengths, and non-monotone."""
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        dn = jnp.dtype(dtype).name
        for (B, T, S, N, K, H) in ((2, 37, 53, 4, 2, 40), (2, 300, 300, 8, 2, 32),
                                   (2, 100, 520, 4, 4, 16)):
            q = rnd(31, (B, T, N, H), dtype)
            k = rnd(32, (B, S, K, H), dtype)
            v = rnd(33, (B, S, K, H), dtype)
            do = rnd(34, (B, T, N, H), dtype)
            dl = rnd(35, (B, T, N), jnp.float32)
            pad = S // 3
            # row 0: left padding (repeated position 0, then -1s), row 1: no padding
            leftpad_k = np.stack([np.concatenate([np.zeros(pad), np.arange(S - pad)]),
                                  np.arange(S)]).astype(np.int32)
            leftpad_k[0, : pad // 2] = -1
            leftpad_q = leftpad_k[:, S - T:] if T <= S else np.stack([np.arange(T)] * B).astype(np.int32)
            gaps_k = np.stack([np.arange(S) + 40 * (np.arange(S) >= S // 2), np.arange(S) * 3]).astype(np.int32)
            prefill_q = np.stack([np.arange(T) + S - T + 5, np.arange(T) * 2 + 7]).astype(np.int32)
            rng = np.random.default_rng(41)
            shuffled_k = np.stack([rng.permutation(S), rng.permutation(S)]).astype(np.int32)
            shuffled_q = np.stack([rng.permutation(T), rng.permutation(T) + S - T]).astype(np.int32)
            tail_k = np.stack([np.arange(S), np.arange(S)]).astype(np.int32)
            tail_k[:, S - 7:] = 0  # right padding: monotone within the key lengths only
            klen = jnp.array([S - 7, S - 20])
            seg_q = jnp.broadcast_to((jnp.arange(T) * 2) // T, (B, T))
            seg_k = jnp.broadcast_to((jnp.arange(S) * 2) // S, (B, S))
            variants = {
                "mono_causal_window": dict(is_causal=True, local_window_size=(19, 0),
                                           query_positions=jnp.asarray(leftpad_q),
                                           key_value_positions=jnp.asarray(leftpad_k)),
                "mono_leftpad_cap": dict(is_causal=True, logits_soft_cap=3.0,
                                         query_positions=jnp.asarray(leftpad_q),
                                         key_value_positions=jnp.asarray(leftpad_k)),
                "gaps_prefill_window": dict(is_causal=True, local_window_size=(30, 0),
                                            query_positions=jnp.asarray(prefill_q),
                                            key_value_positions=jnp.asarray(gaps_k)),
                "gaps_window_lr": dict(local_window_size=(9, 4),
                                       query_positions=jnp.asarray(prefill_q),
                                       key_value_positions=jnp.asarray(gaps_k)),
                "query_only_causal": dict(is_causal=True, local_window_size=(25, 0),
                                          query_positions=jnp.asarray(prefill_q)),
                "key_only_window": dict(local_window_size=(12, 12),
                                        key_value_positions=jnp.asarray(gaps_k)),
                "mono_in_lengths_seg": dict(is_causal=True, local_window_size=(40, 2),
                                            key_value_positions=jnp.asarray(tail_k),
                                            key_value_seq_lengths=klen,
                                            query_segment_ids=seg_q, key_value_segment_ids=seg_k),
                "shuffled_causal_window": dict(is_causal=True, local_window_size=(50, 0),
                                               query_positions=jnp.asarray(shuffled_q),
                                               key_value_positions=jnp.asarray(shuffled_k)),
                "shuffled_keys_cap": dict(is_causal=True, logits_soft_cap=4.0,
                                          query_positions=jnp.asarray(prefill_q),
                                          key_value_positions=jnp.asarray(shuffled_k)),
            }
            for name, kw in variants.items():
                record_flash(out, f"positions/{dn}/{B}x{T}x{S}x{N}x{K}x{H}/{name}",
                             partial(jaxattn.flash_attention, **kw), (q, k, v), (do, dl),
                             tangent_seed=36)
    return out


def float64_cases() -> dict[str, np.ndarray]:
    """The float64 kernels (x64 on): flash forward, vjp and jvp over the options, the bias
    gradient, block-sparse, contiguous and paged decoding, at odd shapes."""
    out = {}
    with jax.enable_x64(True):
        dtype = jnp.float64
        for (B, T, S, N, K, H, Hv) in ((2, 37, 53, 4, 2, 17, 9), (1, 70, 29, 3, 1, 100, 100)):
            q = rnd(51, (B, T, N, H), dtype)
            k = rnd(52, (B, S, K, H), dtype)
            v = rnd(53, (B, S, K, Hv), dtype)
            do = rnd(54, (B, T, N, Hv), dtype)
            dl = rnd(55, (B, T, N), dtype)
            bias = rnd(56, (B, 1, T, S), dtype)
            mask = jax.random.bernoulli(jax.random.key(57), 0.8, (B, 1, T, S))
            qpos = jnp.broadcast_to(jnp.arange(T)[::-1] * 2, (B, T))
            kpos = jnp.broadcast_to(jnp.arange(S), (B, S))
            qseg = jnp.broadcast_to((jnp.arange(T) * 3) // T, (B, T))
            kseg = jnp.broadcast_to((jnp.arange(S) * 3) // S, (B, S))
            variants = {
                "plain": {},
                "causal_window_cap": dict(is_causal=True, local_window_size=(9, 0),
                                          logits_soft_cap=4.0),
                "lengths_scale": dict(query_seq_lengths=jnp.array([T - 3, 0][:B]),
                                      key_value_seq_lengths=jnp.array([S - 5, 7][:B]), scale=0.3),
                "pos_seg_alibi": dict(is_causal=True, query_positions=qpos,
                                      key_value_positions=kpos, query_segment_ids=qseg,
                                      key_value_segment_ids=kseg,
                                      alibi_slopes=jnp.linspace(0.1, 0.9, N, dtype=jnp.float32)),
                "bias_mask": dict(bias=bias, mask=mask, logits_soft_cap=3.0),
                "dropout": dict(is_causal=True, dropout_rate=0.25, dropout_rng=jax.random.key(58)),
            }
            for name, kw in variants.items():
                record_flash(out, f"float64/flash/{B}x{T}x{S}x{N}x{K}x{H}x{Hv}/{name}",
                             partial(jaxattn.flash_attention, **kw), (q, k, v), (do, dl),
                             tangent_seed=60 if "dropout_rate" not in kw and "bias" not in kw
                             else None)
            out[f"float64/flash/{B}x{T}x{S}/dbias"] = jax.grad(lambda bias: jnp.sum(
                jaxattn.flash_attention(q, k, v, bias=bias, is_causal=True) * do))(bias)
            dense = np.array(jax.random.bernoulli(jax.random.key(59), 0.5, (T, S)))
            dense[:, :5] = True
            bsm = jaxattn.BlockSparseMask.from_dense(dense)
            record_flash(out, f"float64/sparse/{B}x{T}x{S}x{N}x{K}",
                         partial(sparse_attention, mask=bsm, logits_soft_cap=5.0), (q, k, v),
                         (do, dl))
        for T in (1, 3, 20):
            B, Smax, N, K, H, Hv, page = 3, 30, 4, 2, 17, 9, 5
            q = rnd(61, (B, T, N, H), dtype)
            kc = rnd(62, (B, Smax, K, H), dtype)
            vc = rnd(63, (B, Smax, K, Hv), dtype)
            lens = jnp.array([Smax, 21, T])
            kw = dict(local_window_size=(11, 0), logits_soft_cap=6.0)
            o, lse = jaxattn.decode_attention(q, kc, vc, lens, return_residual=True, **kw)
            out[f"float64/decode/T{T}/o"], out[f"float64/decode/T{T}/lse"] = o, lse
            o, lse = jaxattn.decode_attention(q, kc, vc, lens, return_residual=True,
                                              alibi_slopes=jnp.linspace(0.1, 0.5, N))
            out[f"float64/decode/T{T}/alibi/o"], out[f"float64/decode/T{T}/alibi/lse"] = o, lse
            perm = np.random.default_rng(1).permutation(B * Smax // page)
            kp = kc.reshape(B * Smax // page, page, K, H)[perm]
            vp = vc.reshape(B * Smax // page, page, K, Hv)[perm]
            tables = jnp.asarray(np.argsort(perm).reshape(B, Smax // page).astype(np.int32))
            o, lse = jaxattn.paged_decode_attention(q, kp, vp, tables, lens, return_residual=True,
                                                    **kw)
            out[f"float64/paged/T{T}/o"], out[f"float64/paged/T{T}/lse"] = o, lse
        return {name: np.asarray(x) for name, x in out.items()}


def cases() -> dict[str, np.ndarray]:
    """Every output of the fixed calls, by name (bf16/f16 widened to float32 exactly)."""
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        dn = jnp.dtype(dtype).name
        for (B, T, S, N, K, H, Hv) in ((2, 37, 53, 4, 2, 40, 24), (1, 130, 130, 2, 1, 64, 64),
                                       (1, 300, 300, 8, 2, 32, 32)):
            q = rnd(1, (B, T, N, H), dtype)
            k = rnd(2, (B, S, K, H), dtype)
            v = rnd(3, (B, S, K, Hv), dtype)
            do = rnd(4, (B, T, N, Hv), dtype)
            dl = rnd(5, (B, T, N), jnp.float32)
            bias = rnd(6, (B, 1, T, S), jnp.float32)
            mask = jax.random.bernoulli(jax.random.key(7), 0.8, (B, N, T, S))
            qpos = jnp.broadcast_to(jnp.arange(T) * 2 + 3, (B, T))
            kpos = jnp.broadcast_to(jnp.arange(S) * 2, (B, S))
            qseg = jnp.broadcast_to((jnp.arange(T) * 3) // T, (B, T))
            kseg = jnp.broadcast_to((jnp.arange(S) * 3) // S, (B, S))
            slopes = jnp.linspace(0.1, 0.9, N)
            variants = {
                "plain": {},
                "causal": dict(is_causal=True),
                "bias_mask_cap": dict(bias=bias, mask=mask, logits_soft_cap=5.0),
                "window_len": dict(local_window_size=(7, 3), query_seq_lengths=jnp.array([T - 3] * B),
                                   key_value_seq_lengths=jnp.array([S - 5] * B)),
                "pos_seg_alibi": dict(is_causal=True, query_positions=qpos, key_value_positions=kpos,
                                      query_segment_ids=qseg, key_value_segment_ids=kseg,
                                      alibi_slopes=slopes),
                "dropout": dict(is_causal=True, dropout_rate=0.1, dropout_rng=jax.random.key(9)),
                "dropout_cap_bias": dict(bias=bias, logits_soft_cap=4.0, dropout_rate=0.3,
                                         dropout_rng=jax.random.key(11), dropout_broadcast=True),
            }
            for name, kw in variants.items():
                record_flash(out, f"flash/{dn}/{B}x{T}x{S}x{N}x{K}x{H}x{Hv}/{name}",
                             partial(jaxattn.flash_attention, **kw), (q, k, v), (do, dl),
                             tangent_seed=12 if "dropout_rate" not in kw and "bias" not in kw
                             else None)
            # dlogits path: gradient wrt bias
            g = jax.grad(lambda bias: jnp.sum(jaxattn.flash_attention(q, k, v, bias=bias, is_causal=True)
                                              .astype(jnp.float32) * do.astype(jnp.float32)))(bias)
            out[f"flash/{dn}/{B}x{T}x{S}/dbias"] = g
            # block sparse
            dense = np.array(jax.random.bernoulli(jax.random.key(15), 0.5, (T, S)))
            dense[:, :5] = True
            dense[: T // 2, : S // 2] = True
            bsm = jaxattn.BlockSparseMask.from_dense(dense)
            for name, kw in {"plain": {}, "cap": dict(logits_soft_cap=3.0),
                             "dropout": dict(dropout_rate=0.2, dropout_rng=jax.random.key(17)),
                             "seg_alibi": dict(query_segment_ids=qseg, key_value_segment_ids=kseg,
                                               alibi_slopes=slopes)}.items():
                record_flash(out, f"sparse/{dn}/{B}x{T}x{S}x{N}x{K}/{name}",
                             partial(sparse_attention, mask=bsm, **kw), (q, k, v), (do, dl))
        # decode & cache prefill
        for T in (1, 3, 40):
            B, Smax, N, K, H = 3, 320, 8, 2, 64
            q = rnd(21, (B, T, N, H), dtype)
            kc = rnd(22, (B, Smax, K, H), dtype)
            vc = rnd(23, (B, Smax, K, H), dtype)
            lens = jnp.array([T + 5, 170, 300])
            for name, kw in {"plain": {}, "window_cap": dict(local_window_size=(50, 0), logits_soft_cap=7.0),
                             "alibi": dict(alibi_slopes=jnp.linspace(0.1, 0.5, N))}.items():
                o, lse = jaxattn.decode_attention(q, kc, vc, lens, return_residual=True, **kw)
                out[f"decode/{dn}/T{T}/{name}/o"], out[f"decode/{dn}/T{T}/{name}/lse"] = o, lse
            page = 16
            kp = kc.reshape(B * Smax // page, page, K, H)
            vp = vc.reshape(B * Smax // page, page, K, H)
            perm = np.random.default_rng(0).permutation(B * Smax // page)
            kp, vp = kp[perm], vp[perm]
            inv = np.argsort(perm)
            tables = jnp.asarray(inv.reshape(B, Smax // page).astype(np.int32))
            o, lse = jaxattn.paged_decode_attention(q, kp, vp, tables, lens, return_residual=True)
            out[f"paged/{dn}/T{T}/o"], out[f"paged/{dn}/T{T}/lse"] = o, lse
            kq, ks = jaxattn.quantize_kv(kc, "int8")
            vq, vs = jaxattn.quantize_kv(vc, "int8")
            o = jaxattn.decode_attention(q, kq, vq, lens, key_scale=ks, value_scale=vs)
            out[f"decode_int8/{dn}/T{T}/o"] = o
    out.update(position_cases())
    out.update(float64_cases())
    # dropout mask itself
    out["dropout_mask"] = jaxattn.dropout_mask(jax.random.key(3), 0.25, 2, 3, 37, 53)
    return {k: np.asarray(v.astype(jnp.float32) if v.dtype in (jnp.bfloat16, jnp.float16) else v)
            for k, v in out.items()}


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    # An optional third argument keeps only the outputs whose names start with it (save and
    # compare with the same one), e.g. "positions/" for position_cases alone.
    prefix = sys.argv[3] if len(sys.argv) > 3 else ""
    if prefix.startswith("positions/"):
        res = position_cases()
    elif prefix.startswith("float64/"):
        res = float64_cases()
    else:
        res = cases()
    res = {k: np.asarray(v.astype(jnp.float32) if v.dtype in (jnp.bfloat16, jnp.float16) else v)
           for k, v in res.items() if k.startswith(prefix)}
    print(jaxattn.kernel_isa(), len(res), "arrays")
    if mode == "save":
        np.savez(path, **res)
    else:
        ref = np.load(path)
        assert set(ref.files) == set(res), set(ref.files) ^ set(res)
        bad = [k for k in ref.files if ref[k].tobytes() != res[k].tobytes()]
        print("MISMATCH" if bad else "ALL BITWISE EQUAL", bad[:20])
        sys.exit(1 if bad else 0)
