"""Serving with a quantized, paged KV cache: prefill prompts into int8 pages, then decode.

    PYTHONPATH=. python examples/quantized_cache.py

Two sequences of different prompt lengths share one pool of int8 pages (float32 scales per
token and kv head). Each decode step writes the new token's keys and values into the pool with
``update_paged_kv_cache`` (in place: the pool is donated to the jitted step) and attends with
``paged_decode_attention``, which dequantises the pages in registers. The same steps over a
float32 cache show the quantization error, and the cache sizes show what it saves.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn

rng = np.random.default_rng(0)
heads, kv_heads, head_dim, page = 8, 2, 64, 16
prompts = [37, 120]  # prompt lengths of the two sequences
steps = 8  # tokens decoded after the prompt
pages_per_seq = -(-(max(prompts) + steps) // page)
num_pages = len(prompts) * pages_per_seq
tables = jnp.asarray(rng.permutation(num_pages).reshape(len(prompts), pages_per_seq), jnp.int32)


def random(*shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def empty_pool(dtype):
    """Key and value pages (and their scales for a quantized pool): separate buffers, since
    each is donated."""
    pages = [jnp.zeros((num_pages, page, kv_heads, head_dim), dtype) for _ in range(2)]
    if dtype == jnp.float32:
        return pages, {}
    scales = [jnp.zeros((num_pages, page, kv_heads), jnp.float32) for _ in range(2)]
    return pages, {"key_scale": scales[0], "value_scale": scales[1]}


@functools.partial(jax.jit, donate_argnums=(0, 1, 2))
def write(pages, value_pages, scales, key, value, positions):
    """Scatters new keys/values into the pool (in place: the pool is donated)."""
    out = jaxattn.update_paged_kv_cache(pages, value_pages, key, value, tables, positions,
                                        **scales)
    return out[0], out[1], dict(zip(("key_scale", "value_scale"), out[2:]))


@jax.jit
def attend(query, pages, value_pages, scales, lengths):
    return jaxattn.paged_decode_attention(query, pages, value_pages, tables, lengths, **scales)


# The same tokens for both caches: prompts (padded to the longest; rows past a prompt are
# dropped by giving them positions past the table), then `steps` decode tokens.
longest = max(prompts)
prompt_k, prompt_v = random(2, longest, kv_heads, head_dim), random(2, longest, kv_heads,
                                                                      head_dim)
pad = jnp.arange(longest)[None, :] >= jnp.asarray(prompts)[:, None]
prompt_positions = jnp.where(pad, 10**6, jnp.arange(longest)[None, :]).astype(jnp.int32)
step_tokens = [(random(2, 1, heads, head_dim), random(2, 1, kv_heads, head_dim),
                random(2, 1, kv_heads, head_dim)) for _ in range(steps)]

outputs = {}
for dtype in (jnp.float32, jnp.int8):
    (pages, value_pages), scales = empty_pool(dtype)
    pages, value_pages, scales = write(pages, value_pages, scales, prompt_k, prompt_v,
                                       prompt_positions)
    lengths = jnp.asarray(prompts, jnp.int32)
    outs = []
    for query, key, value in step_tokens:
        pages, value_pages, scales = write(pages, value_pages, scales, key, value, lengths)
        lengths = lengths + 1
        outs.append(attend(query, pages, value_pages, scales, lengths))
    outputs[jnp.dtype(dtype).name] = jnp.concatenate(outs, axis=1)
    size = pages.nbytes + value_pages.nbytes + sum(s.nbytes for s in scales.values())
    print(f"{jnp.dtype(dtype).name:8s} cache: {size / 2**10:7.1f} KiB")

exact, quantized = outputs["float32"], outputs["int8"]
error = float(jnp.max(jnp.abs(quantized - exact)) / jnp.max(jnp.abs(exact)))
print(f"int8 vs float32 cache, {steps} decode steps: max relative output error {error:.2e}")
