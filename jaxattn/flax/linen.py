"""``FlashSelfAttention`` for ``flax.linen``: Q/K/V/out projections around the fused kernels."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.linear import default_kernel_init

from jaxattn.flax import _common

Array = jax.Array

__all__ = ["FlashSelfAttention"]


class FlashSelfAttention(nn.Module):
    """Multi-head self-attention (MHA, GQA or MQA) computed by jaxattn's kernels.

    Parameters are laid out as in ``nn.MultiHeadDotProductAttention`` (submodules ``query``,
    ``key``, ``value``, ``out``), so weights can be moved between the two.

    Example::

        layer = FlashSelfAttention(num_heads=8, num_kv_heads=2, use_rope=True)
        variables = layer.init(rng, x)                  # x [B, T, F]
        y = layer.apply(variables, x)                   # causal
        _, state = layer.apply(variables, batch_size=B, max_length=512,
                               method=layer.init_cache, mutable=["cache"])
        y_step, state = layer.apply({**variables, **state}, x_step, decode=True,
                                    mutable=["cache"])  # x_step [B, 1, F]

    Attributes:
      num_heads: N query heads.
      num_kv_heads: K key/value heads (``N % K == 0``); default N (GQA for K < N, MQA for 1).
      head_dim: H; default ``features // num_heads``.
      out_features: output size; default the input's feature size.
      is_causal: token ``i`` attends to tokens ``j <= i`` (default True).
      local_window_size: ``w`` or ``(left, right)``: token ``i`` sees ``i-left <= j <= i+right``.
      logits_soft_cap: logits become ``cap * tanh(logits / cap)``.
      use_rope: apply rotary position embeddings (rotate-half form) to queries and keys.
      rope_theta: RoPE base frequency.
      dtype: computation dtype (default: inferred from inputs and params).
      param_dtype: parameter dtype.
      use_bias: whether the projections have biases.
      kernel_init, out_kernel_init, bias_init: initialisers, as in
        ``nn.MultiHeadDotProductAttention``.
      sparse_mask: a ``jaxattn.BlockSparseMask`` for ``[T, T]`` (1 head or N heads): the layer
        then runs ``block_sparse_attention`` and only accepts inputs of length T. It is
        combined (AND) with ``is_causal`` and ``local_window_size``. No decode mode.
      precision: precision of the projections.
      implementation: ``"jaxattn"`` (the fused kernels) or ``"xla"``
        (``jax.nn.dot_product_attention(implementation="xla")``, same parameters and
        semantics, no soft cap): for comparisons and benchmarks.
      kv_cache_dtype: ``jnp.int8``, ``jnp.float8_e4m3fn`` or ``jnp.float8_e5m2``: the decode
        cache is quantized (``jaxattn.quantize_kv`` per token and kv head, float32 scales
        ``cached_key_scale`` / ``cached_value_scale`` in the ``'cache'`` collection); None
        (default): the cache holds the layer's ``dtype``.
      dropout_rate: dropout on the attention weights inside the kernels (as
        ``nn.MultiHeadDotProductAttention``'s); 0 (default): none.
      broadcast_dropout: one ``[T, T]`` mask shared by the batch and the heads (Flax's
        default, True) or a mask per row and head.
      deterministic: default for the call's ``deterministic`` (no dropout when True).
        The key comes from ``make_rng('dropout')``.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    out_features: int | None = None
    is_causal: bool = True
    local_window_size: int | tuple[int, int] | None = None
    logits_soft_cap: float | None = None
    use_rope: bool = False
    rope_theta: float = 10000.0
    dtype: Any | None = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    kernel_init: Any = default_kernel_init
    out_kernel_init: Any | None = None
    bias_init: Any = nn.initializers.zeros_init()
    sparse_mask: Any = None
    precision: Any = None
    implementation: str = "jaxattn"
    kv_cache_dtype: Any | None = None
    dropout_rate: float = 0.0
    broadcast_dropout: bool = True
    deterministic: bool | None = None

    def _config(self, features: int) -> _common.AttentionConfig:
        head_dim = self.head_dim
        if head_dim is None:
            if features % self.num_heads:
                raise ValueError(f"the input's {features} features must be divisible by "
                                 f"num_heads={self.num_heads} (or set head_dim)")
            head_dim = features // self.num_heads
        return _common.make_config(
            self.num_heads, self.num_kv_heads, head_dim, is_causal=self.is_causal,
            local_window_size=self.local_window_size, logits_soft_cap=self.logits_soft_cap,
            use_rope=self.use_rope, rope_theta=self.rope_theta)

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None, decode: bool = False,
                 segment_ids: Array | None = None, deterministic: bool | None = None) -> Array:
        """Self-attention of ``x``.

        Args:
          x: ``[batch..., T, F]``; in decode mode ``[B, T, F]`` holding the next T tokens.
          mask: optional bool, broadcastable to ``[batch..., N, T, T]`` (True = attend),
            combined with the causal/window masks. Not available in decode mode.
          decode: append the tokens' keys/values to the ``'cache'`` collection (created by
            ``init_cache``; apply with ``mutable=['cache']``) and attend over the cache.
          segment_ids: optional int ``[batch..., T]`` (or ``[T]``): packed sequences; token
            ``i`` attends to token ``j`` only where their ids are equal (combined with the
            causal, window and ``mask`` masks; tiles of different sequences are never
            computed). RoPE positions still count from the start of the row. Not available
            in decode mode (the cache holds one sequence per row) or with a ``sparse_mask``.
          deterministic: no dropout when True (default: the attribute); decode calls have no
            dropout.

        Returns:
          ``[batch..., T, out_features]``.
        """
        if x.ndim < 2:
            raise ValueError(f"x must have shape [batch..., T, F], got {x.shape}")
        features = x.shape[-1]
        cfg = self._config(features)
        implementation = _common.check_implementation(self.implementation, cfg)
        out_features = self.out_features or features
        segment_ids = _common.fold_segment_ids(segment_ids, x.shape[:-2], x.shape[-2], decode)

        def dense(features, name, **kwargs):
            return nn.DenseGeneral(features=features, dtype=self.dtype,
                                   param_dtype=self.param_dtype, use_bias=self.use_bias,
                                   bias_init=self.bias_init, precision=self.precision,
                                   name=name, **kwargs)

        query = dense((cfg.num_heads, cfg.head_dim), "query", kernel_init=self.kernel_init)
        key = dense((cfg.num_kv_heads, cfg.head_dim), "key", kernel_init=self.kernel_init)
        value = dense((cfg.num_kv_heads, cfg.head_dim), "value", kernel_init=self.kernel_init)
        out = dense(out_features, "out", axis=(-2, -1),
                    kernel_init=self.out_kernel_init or self.kernel_init)

        if decode:
            if self.sparse_mask is not None:
                raise NotImplementedError("decode=True is not available with a sparse_mask")
            if mask is not None:
                raise ValueError("mask is not supported with decode=True")
            if not self.has_variable("cache", "cached_key"):
                raise ValueError("decode=True needs a KV cache: apply init_cache "
                                 "(method=FlashSelfAttention.init_cache, mutable=['cache']) "
                                 "first and pass its 'cache' collection")
            if x.ndim != 3:
                raise ValueError(f"decode input must be [B, T, F], got {x.shape}")
            q, k, v = query(x), key(x), value(x)
            index = self.get_variable("cache", "cache_index")
            scales = None
            if self.has_variable("cache", "cached_key_scale"):
                scales = (self.get_variable("cache", "cached_key_scale"),
                          self.get_variable("cache", "cached_value_scale"))
            y, ck, cv, scales = _common.cached_attention(
                cfg, q, k, v, self.get_variable("cache", "cached_key"),
                self.get_variable("cache", "cached_value"), index, implementation, scales)
            self.put_variable("cache", "cached_key", ck)
            self.put_variable("cache", "cached_value", cv)
            if scales is not None:
                self.put_variable("cache", "cached_key_scale", scales[0])
                self.put_variable("cache", "cached_value_scale", scales[1])
            self.put_variable("cache", "cache_index", index + x.shape[1])
            return out(y.astype(q.dtype))

        batch_shape = x.shape[:-2]
        x3 = x.reshape((-1,) + x.shape[-2:])  # fold leading batch dims into one
        dropout = _common.dropout_layer_options(
            self.dropout_rate, self.broadcast_dropout, deterministic, self.deterministic,
            lambda: self.make_rng("dropout"))
        y = _common.full_attention(cfg, query(x3), key(x3), value(x3),
                                   _common.fold_batch(mask, batch_shape, "mask"),
                                   implementation,
                                   _common.layer_sparse_mask(cfg, self.sparse_mask), segment_ids,
                                   dropout)
        return out(y).reshape(batch_shape + (x.shape[-2], out_features))

    def init_cache(self, batch_size: int, max_length: int, dtype: Any | None = None) -> None:
        """Creates an empty KV cache in the ``'cache'`` collection (apply with mutable).

        Needs the layer's parameters (to know the head dim when ``head_dim`` is None).

        Args:
          batch_size: B of the decode inputs.
          max_length: Smax, the most tokens the cache holds.
          dtype: cache dtype (default: ``kv_cache_dtype``, else the layer's ``dtype``, else
            float32).
        """
        if self.head_dim is None:
            params = self.variables.get("params", {})
            if "key" not in params:
                raise ValueError("init_cache needs the layer's params (or an explicit "
                                 "head_dim): pass the variables from init")
            features = params["key"]["kernel"].shape[0]
        else:
            features = self.head_dim * self.num_heads
        cfg = self._config(features)
        dtype = (dtype or _common.check_kv_cache_dtype(self.kv_cache_dtype) or self.dtype
                 or jnp.float32)
        for name, array in _common.cache_arrays(cfg, batch_size, max_length, dtype).items():
            self.put_variable("cache", name, array)


# Gated linear attention (jaxattn.gated_linear_attention), defined in _gla.py.
from jaxattn.flax._gla import GatedLinearAttentionLinen as GatedLinearAttention  # noqa: E402

__all__ += ["GatedLinearAttention"]
