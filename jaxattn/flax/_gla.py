"""``GatedLinearAttention`` layers (nnx and linen), in the shape of flash-linear-attention's GLA.

Per token: ``q = W_q x``, ``k = W_k x``, ``v = W_v x`` split into N heads of ``Hk`` / ``Hv``;
a low-rank forget gate ``log_gate = log_sigmoid(W_up W_down x + b) / gate_logit_normalizer``
(optionally clamped from below); ``o = gated_linear_attention(q, k, v, log_gate)``; per-head
RMS normalisation, an output gate ``o * swish(W_g x)``, and ``W_o``. With ``init_cache`` and
``decode=True`` the layer carries the float32 state ``[B, N, Hk, Hv]`` between calls instead of
a growing KV cache. With ``num_kv_heads = K < N`` (flash-linear-attention's option of that name)
the key, value and gate projections have K heads, each shared by N / K query heads. Exposed as
``jaxattn.flax.nnx.GatedLinearAttention`` and ``jaxattn.flax.linen.GatedLinearAttention``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from jaxattn.linear import gated_linear_attention

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GLAConfig:
    """Sizes of a GLA layer: ``key_dim = hidden * expand_k``, ``value_dim = hidden * expand_v``
    split over ``num_heads`` query heads; key, value and gate have ``num_kv_heads`` heads of
    the same head dims."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    key_dim: int
    value_dim: int
    gate_low_rank_dim: int
    gate_logit_normalizer: float
    clamp_min: float | None
    use_output_gate: bool
    norm_eps: float

    @property
    def head_k_dim(self) -> int:
        return self.key_dim // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def kv_key_dim(self) -> int:
        """Width of the key and gate projections: ``num_kv_heads * head_k_dim``."""
        return self.num_kv_heads * self.head_k_dim

    @property
    def kv_value_dim(self) -> int:
        """Width of the value projection: ``num_kv_heads * head_v_dim``."""
        return self.num_kv_heads * self.head_v_dim

    def state_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        return (batch_size, self.num_heads, self.head_k_dim, self.head_v_dim)


def make_config(hidden_size: int, num_heads: int, expand_k: float, expand_v: float,
                gate_low_rank_dim: int, gate_logit_normalizer: float, clamp_min: float | None,
                use_output_gate: bool, norm_eps: float,
                num_kv_heads: int | None = None) -> GLAConfig:
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads),
                        ("gate_low_rank_dim", gate_low_rank_dim), ("num_kv_heads", num_kv_heads)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    key_dim, value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
    for name, dim in (("key_dim = hidden_size * expand_k", key_dim),
                      ("value_dim = hidden_size * expand_v", value_dim)):
        if dim <= 0 or dim % num_heads:
            raise ValueError(f"{name} = {dim} must be a positive multiple of num_heads="
                             f"{num_heads}")
    if not gate_logit_normalizer > 0:
        raise ValueError(f"gate_logit_normalizer must be positive, got {gate_logit_normalizer}")
    return GLAConfig(hidden_size, num_heads, num_kv_heads, key_dim, value_dim, gate_low_rank_dim,
                     float(gate_logit_normalizer), clamp_min, bool(use_output_gate),
                     float(norm_eps))


def log_gate_from_logits(cfg: GLAConfig, logits: Array) -> Array:
    """``log_sigmoid(logits) / normalizer`` (clamped from below), float32, per kv head."""
    gate = jax.nn.log_sigmoid(logits.astype(jnp.float32)) / cfg.gate_logit_normalizer
    if cfg.clamp_min is not None:
        gate = jnp.maximum(gate, cfg.clamp_min)
    return gate.reshape(logits.shape[:-1] + (cfg.num_kv_heads, cfg.head_k_dim))


def check_input(cfg: GLAConfig, x: Array) -> None:
    if x.ndim != 3 or x.shape[-1] != cfg.hidden_size:
        raise ValueError(f"x must have shape [B, T, {cfg.hidden_size}], got {x.shape}")


def split_heads(x: Array, heads: int) -> Array:
    return x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))


def attend(cfg: GLAConfig, q: Array, k: Array, v: Array, log_gate: Array,
           state: Array | None) -> tuple[Array, Array | None]:
    """The heads' outputs [B, T, N, Hv] (and the new state when a state is carried); k, v
    and log_gate have the kv heads."""
    q, k = split_heads(q, cfg.num_heads), split_heads(k, cfg.num_kv_heads)
    v = split_heads(v, cfg.num_kv_heads)
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if state is None:
        return gated_linear_attention(q, k, v, log_gate), None
    return gated_linear_attention(q, k, v, log_gate, initial_state=state,
                                  return_final_state=True)


class GatedLinearAttentionNnx(nnx.Module):
    """Gated linear attention layer for ``flax.nnx`` (flash-linear-attention's GLA layer).

    Example::

        layer = GatedLinearAttention(256, 4, rngs=nnx.Rngs(0))
        y = layer(x)                                  # x [B, T, 256]: causal by construction
        layer.init_cache(batch_size=B)
        y_step = layer(x_step, decode=True)           # x_step [B, T', 256], T' >= 1

    Args:
      hidden_size: F, the input and output feature size.
      num_heads: N heads; ``Hk = hidden_size * expand_k / N``, ``Hv = hidden_size * expand_v /
        N``.
      num_kv_heads: K heads of the key, value and gate projections (each ``K * Hk`` or
        ``K * Hv`` wide), shared by N / K query heads each (grouped-query attention); K must
        divide N. Default N.
      expand_k, expand_v: key and value widths relative to ``hidden_size`` (GLA: 0.5 and 1).
      gate_low_rank_dim: rank of the forget-gate projection (GLA: 16).
      gate_logit_normalizer: the log gate is ``log_sigmoid(.) / gate_logit_normalizer`` (16).
      clamp_min: optional lower bound of the log gate.
      use_output_gate: multiply the normalised output by ``swish(W_g x)``.
      norm_eps: epsilon of the per-head RMS normalisation.
      dtype, param_dtype: computation and parameter dtypes.
      rngs: ``nnx.Rngs`` for the initialisers.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, expand_k: float = 0.5,
                 expand_v: float = 1.0, gate_low_rank_dim: int = 16,
                 gate_logit_normalizer: float = 16.0, clamp_min: float | None = None,
                 use_output_gate: bool = True, norm_eps: float = 1e-5,
                 num_kv_heads: int | None = None, dtype: Any | None = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        cfg = make_config(hidden_size, num_heads, expand_k, expand_v, gate_low_rank_dim,
                          gate_logit_normalizer, clamp_min, use_output_gate, norm_eps,
                          num_kv_heads)
        self.config = cfg

        def linear(i, o, bias=False):
            return nnx.Linear(i, o, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)

        self.q_proj = linear(hidden_size, cfg.key_dim)
        self.k_proj = linear(hidden_size, cfg.kv_key_dim)
        self.v_proj = linear(hidden_size, cfg.kv_value_dim)
        self.gk_down = linear(hidden_size, gate_low_rank_dim)
        self.gk_up = linear(gate_low_rank_dim, cfg.kv_key_dim, bias=True)
        self.g_proj = linear(hidden_size, cfg.value_dim) if use_output_gate else None
        self.g_norm = nnx.RMSNorm(cfg.head_v_dim, epsilon=norm_eps, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
        self.o_proj = linear(cfg.value_dim, hidden_size)
        self.state: nnx.Cache | None = nnx.data(None)

    def init_cache(self, batch_size: int) -> None:
        """A zero state ``[B, N, Hk, Hv]`` (float32, ``nnx.Cache``) for ``decode=True``."""
        self.state = nnx.Cache(jnp.zeros(self.config.state_shape(batch_size), jnp.float32))

    def __call__(self, x: Array, *, decode: bool = False) -> Array:
        """``x [B, T, F] -> [B, T, F]``; with ``decode=True`` continues from the cached state
        (``init_cache``) and stores the new one."""
        cfg = self.config
        check_input(cfg, x)
        if decode and self.state is None:
            raise ValueError("decode=True needs a state: call init_cache(batch_size=) first")
        log_gate = log_gate_from_logits(cfg, self.gk_up(self.gk_down(x)))
        o, new_state = attend(cfg, self.q_proj(x), self.k_proj(x), self.v_proj(x), log_gate,
                              self.state[...] if decode else None)
        if decode:
            self.state[...] = new_state
        o = self.g_norm(o)
        if self.g_proj is not None:
            o = o * jax.nn.swish(split_heads(self.g_proj(x), cfg.num_heads))
        return self.o_proj(o.reshape(x.shape[:2] + (cfg.value_dim,)))


class GatedLinearAttentionLinen(nn.Module):
    """Gated linear attention layer for ``flax.linen`` (flash-linear-attention's GLA layer).

    Example::

        layer = GatedLinearAttention(hidden_size=256, num_heads=4)
        variables = layer.init(rng, x)                           # x [B, T, 256]
        y = layer.apply(variables, x)
        _, cache = layer.apply(variables, batch_size=B, method=layer.init_cache,
                               mutable=["cache"])
        y_step, cache = layer.apply({**variables, **cache}, x_step, decode=True,
                                    mutable=["cache"])

    Attributes: as the nnx layer (``hidden_size``, ``num_heads``, ``expand_k``, ``expand_v``,
    ``gate_low_rank_dim``, ``gate_logit_normalizer``, ``clamp_min``, ``use_output_gate``,
    ``norm_eps``, ``num_kv_heads``, ``dtype``, ``param_dtype``).
    """

    hidden_size: int
    num_heads: int
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    clamp_min: float | None = None
    use_output_gate: bool = True
    norm_eps: float = 1e-5
    num_kv_heads: int | None = None
    dtype: Any | None = None
    param_dtype: Any = jnp.float32

    def _config(self) -> GLAConfig:
        return make_config(self.hidden_size, self.num_heads, self.expand_k, self.expand_v,
                           self.gate_low_rank_dim, self.gate_logit_normalizer, self.clamp_min,
                           self.use_output_gate, self.norm_eps, self.num_kv_heads)

    def init_cache(self, batch_size: int) -> None:
        """A zero state ``[B, N, Hk, Hv]`` float32 in the ``cache`` collection."""
        shape = self._config().state_shape(batch_size)
        self.put_variable("cache", "state", jnp.zeros(shape, jnp.float32))

    @nn.compact
    def __call__(self, x: Array, *, decode: bool = False) -> Array:
        """``x [B, T, F] -> [B, T, F]``; ``decode=True`` continues from the cached state
        (apply ``init_cache`` first; apply with ``mutable=['cache']``)."""
        cfg = self._config()
        check_input(cfg, x)

        def dense(features, name, bias=False):
            return nn.Dense(features, use_bias=bias, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name)

        state = None
        if decode:
            if not self.has_variable("cache", "state"):
                raise ValueError("decode=True needs a state: apply init_cache (method="
                                 "GatedLinearAttention.init_cache, mutable=['cache']) first")
            state = self.get_variable("cache", "state")
        logits = dense(cfg.kv_key_dim, "gk_up", bias=True)(dense(cfg.gate_low_rank_dim,
                                                                 "gk_down")(x))
        o, new_state = attend(cfg, dense(cfg.key_dim, "q_proj")(x),
                              dense(cfg.kv_key_dim, "k_proj")(x),
                              dense(cfg.kv_value_dim, "v_proj")(x),
                              log_gate_from_logits(cfg, logits), state)
        if decode:
            self.put_variable("cache", "state", new_state)
        o = nn.RMSNorm(epsilon=cfg.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="g_norm")(o)
        if cfg.use_output_gate:
            o = o * jax.nn.swish(split_heads(dense(cfg.value_dim, "g_proj")(x), cfg.num_heads))
        return dense(cfg.hidden_size, "o_proj")(o.reshape(x.shape[:2] + (cfg.value_dim,)))
