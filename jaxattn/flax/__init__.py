"""Flax integration: a drop-in ``attention_fn`` and ``FlashSelfAttention`` modules.

``attention_fn`` replaces Flax's default attention in an existing model by changing one
argument::

    import jaxattn.flax
    layer = nnx.MultiHeadAttention(..., attention_fn=jaxattn.flax.attention_fn, rngs=rngs)
    layer = nn.MultiHeadDotProductAttention(..., attention_fn=jaxattn.flax.attention_fn)

``jaxattn.flax.nnx.FlashSelfAttention`` and ``jaxattn.flax.linen.FlashSelfAttention`` are
self-attention layers built around the kernels (GQA, causal, window, soft cap, RoPE, KV cache).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxattn.flash import flash_attention
from jaxattn.flax._common import fold_batch

Array = jax.Array

__all__ = ["attention_fn"]


def _check_custom_einsums(precision, einsum_dot_general, qk_attn_weights_einsum,
                          attn_weights_value_einsum) -> None:
    """Flax's ValueErrors for inconsistent einsum arguments, then NotImplementedError for any
    custom einsum (the fused kernel computes the products itself)."""
    if (qk_attn_weights_einsum is None) != (attn_weights_value_einsum is None):
        raise ValueError("qk_attn_weights_einsum and attn_weights_value_einsum must be "
                         "specified together")
    if (precision is not None or einsum_dot_general is not None) and \
            qk_attn_weights_einsum is not None:
        raise ValueError("precision/einsum_dot_general and qk_attn_weights_einsum/"
                         "attn_weights_value_einsum are mutually exclusive")
    for custom, name in ((einsum_dot_general, "einsum_dot_general"),
                         (qk_attn_weights_einsum, "qk_attn_weights_einsum"),
                         (attn_weights_value_einsum, "attn_weights_value_einsum")):
        if custom is not None:
            raise NotImplementedError(
                f"jaxattn.flax.attention_fn cannot apply a custom {name} (e.g. quantised "
                f"einsums): the fused kernel computes the products itself")


def _check_flax_shapes(query: Array, key: Array, value: Array) -> None:
    """The shape checks of Flax's ``dot_product_attention``, with its messages (ValueError)."""
    if not query.ndim == key.ndim == value.ndim:
        raise ValueError(f"q, k, v must have same rank, but got {query.ndim}, {key.ndim}, "
                         f"{value.ndim}.")
    if query.ndim < 3:
        raise ValueError(f"query must have shape [batch..., T, N, H], got {query.shape}")
    if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
        raise ValueError(f"q, k, v batch dims must match, but got shapes {query.shape}, "
                         f"{key.shape}, {value.shape}.")
    if key.shape[-3] != value.shape[-3]:
        raise ValueError(f"k, v lengths must match, but got {key.shape[-3]} and "
                         f"{value.shape[-3]}.")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"q, k depths must match, but got {query.shape[-1]} and "
                         f"{key.shape[-1]}.")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"k, v num_heads must match, but got {key.shape[-2]} and "
                         f"{value.shape[-2]}.")
    if key.shape[-2] == 0 or query.shape[-2] % key.shape[-2]:
        raise ValueError(f"Query heads ({query.shape[-2]}) must be a multiple of key/value "
                         f"heads ({key.shape[-2]}) for grouped-query attention.")


def _sow_weights(module: Any, query, key, bias, mask, dtype, precision, is_causal,
                 force_fp32_for_softmax: bool) -> None:
    """Sows the attention weights as Flax's default would (they are only computed for this).

    With ``force_fp32_for_softmax`` and a dtype other than float32 the softmax runs in
    float32 and the sown weights are float32, as in Flax (nnx's weights function has no such
    argument: there the weights are computed in float32 throughout)."""
    import flax.linen  # local: keeps `import jaxattn.flax` cheap for nnx-only users
    from flax.nnx.nn import attention as nnx_attention

    if isinstance(module, flax.linen.Module):
        if is_causal:  # linen's weights function has no is_causal; fold it into the mask
            t, s = query.shape[-3], key.shape[-3]
            causal = jnp.tril(jnp.ones((t, s), jnp.bool_))
            mask = causal if mask is None else jnp.logical_and(mask, causal)
        flax.linen.dot_product_attention_weights(
            query, key, bias, mask, deterministic=True, dtype=dtype, precision=precision,
            module=module, force_fp32_for_softmax=force_fp32_for_softmax)
    else:
        if force_fp32_for_softmax and dtype != jnp.float32:
            dtype = jnp.float32
        nnx_attention.dot_product_attention_weights(
            query, key, bias, mask, deterministic=True, dtype=dtype, precision=precision,
            module=module, is_causal=is_causal)


def attention_fn(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any | None = None,
    precision: Any = None,
    module: Any | None = None,
    promote_dtype: Any | None = None,
    is_causal: bool = False,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Any | None = None,
    qk_attn_weights_einsum: Any | None = None,
    attn_weights_value_einsum: Any | None = None,
) -> Array:
    """Drop-in for ``flax.nnx.dot_product_attention`` / ``flax.linen.dot_product_attention``.

    Pass it as ``attention_fn=`` to ``flax.nnx.MultiHeadAttention`` or
    ``flax.linen.MultiHeadDotProductAttention``. Every parameter is named (never ``**kwargs``):
    linen passes only the keyword arguments that appear in this signature, and a parameter that
    is missing here (``mask``!) would be dropped silently.

    Args:
      query: ``[batch..., T, N, H]`` (any number of batch dims, including none).
      key: ``[batch..., S, K, H]``; ``N % K == 0`` (GQA: query head ``n`` uses kv head
        ``n // (N // K)``, as in Flax).
      value: ``[batch..., S, K, Hv]``.
      bias: optional, broadcastable to ``[batch..., N, T, S]``; added to the scaled logits.
      mask: optional, broadcastable to ``[batch..., N, T, S]`` (e.g. ``make_causal_mask`` or
        ``make_attention_mask`` output); nonzero / True means attend. Any dtype.
      broadcast_dropout, dropout_rng, dropout_rate, deterministic: dropout on the attention
        weights, as in Flax, applied inside the kernels (``flash_attention``'s
        ``dropout_rate``/``dropout_rng``) when ``dropout_rate > 0`` and not
        ``deterministic``; ``broadcast_dropout=True`` shares one ``[T, S]`` mask over the
        batch and the heads. The masks are jaxattn's own (``jaxattn.dropout_mask``), not
        the bits ``jax.random.bernoulli`` would draw from the same key.
      dtype: computation dtype; inputs are promoted to it (default: their common dtype). Must
        end up float32, bfloat16 or float16, or float64 under ``jax_enable_x64`` (then the
        float64 kernels run).
      precision: accepted for compatibility; the kernels always accumulate in float32
        (float64 for float64 inputs).
      module: if given, the attention weights are also computed the way Flax does and sown into
        it (``sow_weights=True``); the output still comes from the fused kernel.
      promote_dtype: optional Flax-style ``promote_dtype((q, k, v), dtype=dtype)`` function.
      is_causal: query ``i`` sees keys ``j <= i`` (top-left aligned, as Flax and ``jax.nn``).
      force_fp32_for_softmax: the kernels always compute the softmax in float32; with
        ``module`` and a dtype other than float32 the sown weights are float32 (as in Flax).
      einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum: custom einsums
        (e.g. AQT quantisation) cannot be honoured by the fused kernel; passing one raises
        ``NotImplementedError``.

    Returns:
      ``[batch..., T, N, Hv]`` in the computation dtype.

    A query row that sees no key at all (e.g. a padding row under a padding mask) outputs 0;
    Flax's default returns the mean of ``value`` there. All other rows match Flax's default up
    to float32 rounding.
    """
    _check_custom_einsums(precision, einsum_dot_general, qk_attn_weights_einsum,
                          attn_weights_value_einsum)
    for x, name in ((query, "query"), (key, "key"), (value, "value"), (bias, "bias")):
        if x is not None and jnp.iscomplexobj(x):
            raise TypeError(f"jaxattn.flax.attention_fn: {name} is complex "
                            f"({jnp.asarray(x).dtype}); "
                            "the kernels take real float32, bfloat16, float16 or float64 "
                            "inputs")

    if promote_dtype is not None:
        query, key, value = promote_dtype((query, key, value), dtype=dtype)
    else:
        query, key, value = (jnp.asarray(x) for x in (query, key, value))
        target = dtype if dtype is not None else jnp.result_type(query, key, value)
        query, key, value = (x.astype(target) for x in (query, key, value))

    _check_flax_shapes(query, key, value)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:  # Flax masks are often float (make_causal_mask): != 0
            mask = mask.astype(jnp.bool_)
    if bias is not None:
        bias = jnp.asarray(bias)

    if module is not None:
        _sow_weights(module, query, key, bias, mask, query.dtype, precision, is_causal,
                     bool(force_fp32_for_softmax))

    dropout = {}
    if not deterministic and dropout_rate > 0.0:
        dropout = dict(dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                       dropout_broadcast=bool(broadcast_dropout))
    batch_shape = query.shape[:-3]
    if len(batch_shape) > 1:  # the kernels take one batch dim: fold the others into it
        fold = lambda x: x.reshape((math.prod(batch_shape),) + x.shape[-3:])
        out = flash_attention(fold(query), fold(key), fold(value),
                              fold_batch(bias, batch_shape, "bias"),
                              fold_batch(mask, batch_shape, "mask"),
                              is_causal=bool(is_causal), **dropout)
        return out.reshape(batch_shape + out.shape[-3:])
    return flash_attention(query, key, value, bias, mask, is_causal=bool(is_causal), **dropout)


def __getattr__(name: str):
    """``jaxattn.flax.nnx`` and ``jaxattn.flax.linen`` load on first use (each imports its Flax API)."""
    if name in ("nnx", "linen"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
