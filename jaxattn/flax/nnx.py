"""``FlashSelfAttention`` for ``flax.nnx``: Q/K/V/out projections around the fused kernels."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from flax.nnx.nn.linear import default_kernel_init

from jaxattn.flax import _common

Array = jax.Array

__all__ = ["FlashSelfAttention"]


class FlashSelfAttention(nnx.Module):
    """Multi-head self-attention (MHA, GQA or MQA) computed by jaxattn's kernels.

    Parameters are laid out exactly as in ``nnx.MultiHeadAttention`` (submodules ``query``,
    ``key``, ``value``, ``out``; kernels ``[F, N, H]``, ``[F, K, H]``, ``[N, H, F_out]``), so
    weights can be moved between the two.

    Example::

        layer = FlashSelfAttention(256, 8, num_kv_heads=2, use_rope=True, rngs=nnx.Rngs(0))
        y = layer(x)                                   # x [B, T, 256], causal
        layer.init_cache(batch_size=B, max_length=512)
        y_step = layer(x_step, decode=True)            # x_step [B, 1, 256]

    Args:
      in_features: F, the size of the last input dim.
      num_heads: N query heads.
      num_kv_heads: K key/value heads (``N % K == 0``); default N. K < N is grouped-query
        attention, K = 1 multi-query attention.
      head_dim: H; default ``in_features // num_heads``.
      out_features: size of the output; default ``in_features``.
      is_causal: token ``i`` attends to tokens ``j <= i`` (default True).
      local_window_size: ``w`` or ``(left, right)``: token ``i`` sees ``i-left <= j <= i+right``.
      logits_soft_cap: logits become ``cap * tanh(logits / cap)``.
      use_rope: apply rotary position embeddings (rotate-half form) to queries and keys.
      rope_theta: RoPE base frequency.
      dtype: computation dtype (default: inferred from inputs and params).
      param_dtype: parameter dtype.
      use_bias: whether the projections have biases.
      kernel_init, out_kernel_init, bias_init: initialisers, as in ``nnx.MultiHeadAttention``.
      sparse_mask: a ``jaxattn.BlockSparseMask`` for ``[T, T]`` (1 head or N heads): the layer
        then runs ``block_sparse_attention`` and only accepts inputs of length T. It is
        combined (AND) with ``is_causal`` and ``local_window_size``. No decode mode.
      precision: precision of the projections.
      implementation: ``"jaxattn"`` (the fused kernels) or ``"xla"``
        (``jax.nn.dot_product_attention(implementation="xla")``, same parameters and
        semantics, no soft cap): for comparisons and benchmarks.
      kv_cache_dtype: ``jnp.int8``, ``jnp.float8_e4m3fn`` or ``jnp.float8_e5m2``: the decode
        cache is quantized (``jaxattn.quantize_kv`` per token and kv head, float32 scales in
        the cache state); None (default): the cache holds the layer's ``dtype``.
      dropout_rate: dropout on the attention weights inside the kernels (as
        ``nnx.MultiHeadAttention``'s); 0 (default): none.
      broadcast_dropout: one ``[T, T]`` mask shared by the batch and the heads (Flax's
        default, True) or a mask per row and head.
      deterministic: default for the call's ``deterministic`` (no dropout when True).
      rngs: ``nnx.Rngs`` for the parameter initialisers (and, with dropout, the ``dropout``
        stream, forked and kept as ``self.rngs`` as ``nnx.MultiHeadAttention`` does).
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        out_features: int | None = None,
        is_causal: bool = True,
        local_window_size: int | tuple[int, int] | None = None,
        logits_soft_cap: float | None = None,
        use_rope: bool = False,
        rope_theta: float = 10000.0,
        dtype: Any | None = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        kernel_init: Any = default_kernel_init,
        out_kernel_init: Any | None = None,
        bias_init: Any = initializers.zeros_init(),  # noqa: B008  (Flax's own default)
        sparse_mask: Any | None = None,
        precision: Any = None,
        implementation: str = "jaxattn",
        kv_cache_dtype: Any | None = None,
        dropout_rate: float = 0.0,
        broadcast_dropout: bool = True,
        deterministic: bool | None = None,
        rngs: nnx.Rngs,
    ):
        if not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if head_dim is None:
            if not isinstance(num_heads, int) or num_heads <= 0 or in_features % num_heads:
                raise ValueError(f"in_features={in_features} must be divisible by num_heads="
                                 f"{num_heads!r} (or pass head_dim)")
            head_dim = in_features // num_heads
        self.config = _common.make_config(
            num_heads, num_kv_heads, head_dim, is_causal=is_causal,
            local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
            use_rope=use_rope, rope_theta=rope_theta)
        self.implementation = _common.check_implementation(implementation, self.config)
        self.kv_cache_dtype = _common.check_kv_cache_dtype(kv_cache_dtype)
        # Static host data (hashable): part of the graph definition, not of the state.
        self.sparse_mask = _common.layer_sparse_mask(self.config, sparse_mask)
        self.in_features = in_features
        self.out_features = out_features if out_features is not None else in_features
        self.dtype = dtype
        self.dropout_rate = dropout_rate
        self.broadcast_dropout = broadcast_dropout
        self.deterministic = deterministic
        self.rngs = rngs.dropout.fork() if dropout_rate > 0 else None
        cfg = self.config

        def linear(in_f, out_f, **kwargs):
            return nnx.LinearGeneral(in_f, out_f, dtype=dtype, param_dtype=param_dtype,
                                     use_bias=use_bias, bias_init=bias_init,
                                     precision=precision, rngs=rngs, **kwargs)

        self.query = linear(in_features, (cfg.num_heads, cfg.head_dim), kernel_init=kernel_init)
        self.key = linear(in_features, (cfg.num_kv_heads, cfg.head_dim), kernel_init=kernel_init)
        self.value = linear(in_features, (cfg.num_kv_heads, cfg.head_dim),
                            kernel_init=kernel_init)
        self.out = linear((cfg.num_heads, cfg.head_dim), self.out_features, axis=(-2, -1),
                          kernel_init=out_kernel_init or kernel_init)
        self.cached_key: nnx.Cache | None = nnx.data(None)
        self.cached_value: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)
        self.cached_key_scale: nnx.Cache | None = nnx.data(None)  # quantized caches
        self.cached_value_scale: nnx.Cache | None = nnx.data(None)

    def init_cache(self, batch_size: int, max_length: int, dtype: Any | None = None) -> None:
        """Allocates an empty KV cache for ``decode=True`` calls (``nnx.Cache`` state).

        Args:
          batch_size: B of the decode inputs.
          max_length: Smax, the most tokens the cache holds.
          dtype: cache dtype (default: ``kv_cache_dtype``, else the layer's ``dtype``, else
            float32); queries are cast to a float cache dtype during decoding (a quantized
            cache keeps the query's).
        """
        dtype = dtype or self.kv_cache_dtype or self.dtype or jnp.float32
        arrays = _common.cache_arrays(self.config, batch_size, max_length, dtype)
        for name, array in arrays.items():
            setattr(self, name, nnx.Cache(array))

    def __call__(self, x: Array, *, mask: Array | None = None, decode: bool = False,
                 segment_ids: Array | None = None, deterministic: bool | None = None,
                 rngs: nnx.Rngs | None = None) -> Array:
        """Self-attention of ``x``.

        Args:
          x: ``[batch..., T, F]``; in decode mode ``[B, T, F]`` holding the next T tokens
            (T = 1 token by token; a longer T, e.g. the prompt, is fine too).
          mask: optional bool, broadcastable to ``[batch..., N, T, T]`` (True = attend),
            combined with the causal/window masks. Not available in decode mode.
          decode: append the tokens' keys/values to the cache (see ``init_cache``) and attend
            over everything cached so far.
          segment_ids: optional int ``[batch..., T]`` (or ``[T]``): packed sequences; token
            ``i`` attends to token ``j`` only where their ids are equal (combined with the
            causal, window and ``mask`` masks; tiles of different sequences are never
            computed). RoPE positions still count from the start of the row. Not available
            in decode mode (the cache holds one sequence per row) or with a ``sparse_mask``.
          deterministic: no dropout when True (default: the constructor's); decode calls
            have no dropout.
          rngs: ``nnx.Rngs`` whose ``dropout`` stream gives the key (default: the layer's).

        Returns:
          ``[batch..., T, out_features]``.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features in its last dim, got "
                             f"shape {x.shape}")
        if x.ndim < 2:
            raise ValueError(f"x must have shape [batch..., T, F], got {x.shape}")
        segment_ids = _common.fold_segment_ids(segment_ids, x.shape[:-2], x.shape[-2], decode)
        if decode:
            if mask is not None:
                raise ValueError("mask is not supported with decode=True")
            if self.sparse_mask is not None:
                raise NotImplementedError("decode=True is not available with a sparse_mask")
            if self.cached_key is None:
                raise ValueError("decode=True needs a KV cache: call init_cache(batch_size=, "
                                 "max_length=) first")
            if x.ndim != 3:
                raise ValueError(f"decode input must be [B, T, F], got {x.shape}")
            q, k, v = self.query(x), self.key(x), self.value(x)
            index = self.cache_index[...]
            scales = None
            if self.cached_key_scale is not None:
                scales = (self.cached_key_scale[...], self.cached_value_scale[...])
            y, ck, cv, scales = _common.cached_attention(
                self.config, q, k, v, self.cached_key[...], self.cached_value[...], index,
                self.implementation, scales)
            self.cached_key[...] = ck
            self.cached_value[...] = cv
            if scales is not None:
                self.cached_key_scale[...], self.cached_value_scale[...] = scales
            self.cache_index[...] = index + x.shape[1]
            return self.out(y.astype(q.dtype))
        batch_shape = x.shape[:-2]
        x3 = x.reshape((-1,) + x.shape[-2:])  # fold leading batch dims into one
        q, k, v = self.query(x3), self.key(x3), self.value(x3)
        stream = rngs.dropout if rngs is not None else self.rngs
        dropout = _common.dropout_layer_options(
            self.dropout_rate, self.broadcast_dropout, deterministic, self.deterministic,
            lambda: stream())
        y = _common.full_attention(self.config, q, k, v,
                                   _common.fold_batch(mask, batch_shape, "mask"),
                                   self.implementation, self.sparse_mask, segment_ids, dropout)
        return self.out(y).reshape(batch_shape + (x.shape[-2], self.out_features))


# Gated linear attention (jaxattn.gated_linear_attention), defined in _gla.py.
from jaxattn.flax._gla import GatedLinearAttentionNnx as GatedLinearAttention  # noqa: E402

__all__ += ["GatedLinearAttention"]
