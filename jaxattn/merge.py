"""Merging attention computed over disjoint key sets: ``merge_attention_states``.

The building block of sequence-parallel attention (``jaxattn.sequence_parallel``), of
attention over a cache plus new tokens, and of any split of the keys into parts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxattn._validation import as_array

Array = jax.Array


def merge_attention_states(outputs: Any, lses: Any) -> tuple[Array, Array]:
    """Combines attention results over disjoint key sets into attention over their union.

    With ``o_i = softmax(s_i) v_i`` and ``lse_i = logsumexp(s_i)`` for key sets ``i``, the
    attention over all keys is ``sum_i exp(lse_i - lse) o_i`` with
    ``lse = logsumexp_i(lse_i)``. Exact up to rounding, differentiable, and an empty part
    (``lse_i = -inf``, any output) contributes nothing; if every part is empty the result is 0
    with lse ``-inf`` and zero gradients. NaN propagates as attention over the union would
    propagate it: a part with a NaN lse or output makes the merged row (and its lse) NaN.

    Args:
      outputs: ``[M, ..., Hv]``: M partial outputs (e.g. ``[M, B, T, N, Hv]``), any float dtype.
      lses: ``[M, ...]``: their log-sum-exps (the residuals of ``return_residual=True``).

    Returns:
      ``(out [..., Hv] in the outputs' dtype, lse [...] float32)``; float64 inputs (either
      array, under ``jax_enable_x64``) are merged in float64 and give a float64 lse.

    The contract: docs/semantics.md, section 4.
    """
    outputs = as_array(outputs, "outputs")
    lses = as_array(lses, "lses")
    if not jnp.issubdtype(outputs.dtype, jnp.floating):
        raise TypeError(f"outputs must be a floating array, got dtype {outputs.dtype}")
    if not jnp.issubdtype(lses.dtype, jnp.floating):
        raise TypeError(f"lses must be a floating array, got dtype {lses.dtype}")
    if outputs.ndim < 2 or outputs.shape[:-1] != lses.shape:
        raise ValueError(f"outputs must be [M, ..., Hv] and lses [M, ...] with matching leading "
                         f"axes, got {outputs.shape} and {lses.shape}")
    if outputs.shape[0] == 0:
        raise ValueError("merge_attention_states needs at least one part (M >= 1)")
    work = jnp.float64 if jnp.float64 in (outputs.dtype, lses.dtype) else jnp.float32
    lses = lses.astype(work)
    # The max only conditions the exponentials: the result does not depend on it, so keep it
    # out of the gradient (ties and -inf would otherwise route gradients through argmax).
    top = jax.lax.stop_gradient(jnp.max(lses, axis=0))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    # Only lse = -inf marks an empty part: a NaN lse (a NaN logit among the part's keys) is
    # live and makes the merged row NaN, as attention over the union would.
    live = lses != -jnp.inf
    weights = jnp.where(live, jnp.exp(jnp.where(live, lses - top, 0.0)), 0.0)  # [M, ...]
    total = weights.sum(axis=0)
    nonempty = total != 0  # NaN totals are not empty
    safe_total = jnp.where(nonempty, total, 1.0)
    # An empty part's output may be anything (even NaN): select, don't multiply by zero.
    parts = jnp.where(live[..., None], outputs.astype(work), 0.0)
    out = ((weights / safe_total)[..., None] * parts).sum(axis=0)
    lse = jnp.where(nonempty, top + jnp.log(safe_total), -jnp.inf)
    return out.astype(outputs.dtype), lse
