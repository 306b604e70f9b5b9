"""Batched generation over a paged KV cache: chunked prefill, greedy decoding, beam search.

    python examples/generate.py                      # a randomly initialised byte-level LM
    python examples/generate.py --layers 2 --d-model 128 --new-tokens 16 --check

Run with jaxattn installed (after ``python3 run.py demo``: ``.venv/bin/python``), or from a
development tree built with ``tools/build_inplace.sh`` with ``PYTHONPATH=.``.

What it shows (the model is a small decoder-only transformer with random weights: the text
is noise, the cache mechanics are the point):

1. **Chunked prefill of prompts of different lengths** into one page pool: every step feeds
   up to ``--chunk`` tokens of each prompt still being read (ragged: ``query_lengths``), which
   attend to the prompt's pages already written (``paged_decode_attention`` with T > 16 runs
   the flash tiles over the cache) and causally to each other.
2. **Greedy decoding** of the batch, one token per step, writing each token's K/V into its
   sequence's pages (``update_paged_kv_cache``, in place under buffer donation).
3. **Beam search whose beams share the prompt's pages**: every beam's block table row points
   at the same prompt pages (no copy), and the generated tokens live one per page in a second
   pool (page size 1), so reordering beams reorders rows of the block table only: no K/V is
   ever copied. Each layer attends to both pools and merges the two partial results with
   ``merge_attention_states`` (exact).
4. A table of tokens/s (greedy decoding of the batch) and cache memory for float32,
   bfloat16, int8 and float8_e4m3fn caches.

``--check`` also runs a reference without a cache (dense causal attention over the whole
sequence, recomputed every step, float32) and checks that greedy and beam outputs agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Model: embedding, pre-norm blocks (GQA attention with RoPE, MLP), tied output projection.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 256  # bytes
    d_model: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 32


def init_params(config: Config, seed: int = 0) -> dict:
    """Random weights (scaled so activations stay O(1) through the layers)."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 4 + 6 * config.layers))
    d, n, k, h = config.d_model, config.heads, config.kv_heads, config.head_dim
    dense = lambda fan_in, *shape: jax.random.normal(next(keys), shape) / np.sqrt(fan_in)
    layers = [dict(wq=dense(d, d, n * h), wk=dense(d, d, k * h), wv=dense(d, d, k * h),
                   wo=dense(n * h, n * h, d), w1=dense(d, d, 4 * d), w2=dense(4 * d, 4 * d, d))
              for _ in range(config.layers)]
    return dict(embed=jax.random.normal(next(keys), (config.vocab, d)), layers=layers)


def rms_norm(x: Array) -> Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def rope(x: Array, positions: Array) -> Array:
    """Rotary embedding of x [B, T, heads, H] at positions [B, T]."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B, T, 1, half]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * jnp.cos(angle) - x2 * jnp.sin(angle),
                            x1 * jnp.sin(angle) + x2 * jnp.cos(angle)], axis=-1)


def project_qkv(config: Config, layer: dict, x: Array, positions: Array):
    b, t, _ = x.shape
    y = rms_norm(x)
    q = (y @ layer["wq"]).reshape(b, t, config.heads, config.head_dim)
    k = (y @ layer["wk"]).reshape(b, t, config.kv_heads, config.head_dim)
    v = (y @ layer["wv"]).reshape(b, t, config.kv_heads, config.head_dim)
    return rope(q, positions), rope(k, positions), v


def finish_block(layer: dict, x: Array, attn: Array) -> Array:
    b, t = x.shape[:2]
    x = x + attn.reshape(b, t, -1).astype(x.dtype) @ layer["wo"]
    return x + jax.nn.gelu(rms_norm(x) @ layer["w1"]) @ layer["w2"]


def logits_of(params: dict, x: Array) -> Array:
    return rms_norm(x) @ params["embed"].T / np.sqrt(x.shape[-1])


# --------------------------------------------------------------------------------------------
# Paged KV cache
# --------------------------------------------------------------------------------------------


class Pool(NamedTuple):
    """One layer's page pool: keys/values [P, page, K, H] (and float32 scales [P, page, K]
    for a quantized cache, else None)."""
    keys: Array
    values: Array
    key_scale: Array | None = None
    value_scale: Array | None = None


def new_pools(config: Config, num_pages: int, page_size: int, dtype: Any) -> list[Pool]:
    shape = (num_pages, page_size, config.kv_heads, config.head_dim)
    quantized = jnp.dtype(dtype) in (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn),
                                     jnp.dtype(jnp.float8_e5m2))
    pools = []
    for _ in range(config.layers):
        # Two arrays, never one twice: the pools are donated to the steps.
        scales = tuple(jnp.zeros(shape[:3], jnp.float32) for _ in range(2)) if quantized \
            else (None, None)
        pools.append(Pool(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), *scales))
    return pools


def pool_bytes(pools: list[Pool]) -> int:
    return sum(x.nbytes for pool in pools for x in pool if x is not None)


def write(pool: Pool, k: Array, v: Array, tables: Array, positions: Array) -> Pool:
    """Writes rows k, v [B, T, K, H] at logical positions [B, T] (-1: dropped)."""
    scales = {} if pool.key_scale is None else dict(key_scale=pool.key_scale,
                                                    value_scale=pool.value_scale)
    return Pool(*jaxattn.update_paged_kv_cache(pool.keys, pool.values, k, v, tables, positions,
                                               **scales))


def attend(q: Array, pool: Pool, tables: Array, lengths: Array,
           query_lengths: Array | None = None):
    scales = {} if pool.key_scale is None else dict(key_scale=pool.key_scale,
                                                    value_scale=pool.value_scale)
    return jaxattn.paged_decode_attention(q, pool.keys, pool.values, tables, lengths,
                                          query_lengths=query_lengths, return_residual=True,
                                          **scales)


@partial(jax.jit, static_argnums=0, donate_argnums=2)
def cached_step(config: Config, params: dict, pools: list[Pool], tokens: Array,
                positions: Array, tables: Array, lengths: Array, query_lengths: Array):
    """One step over a single page pool: tokens [B, T] at positions [B, T] (-1: padding, not
    written) are written to the pool, then attend to everything below lengths [B] (their own
    tokens included). Returns (logits [B, T, V], pools)."""
    x = params["embed"][tokens]
    rope_positions = jnp.maximum(positions, 0)
    new_pools = []
    for layer, pool in zip(params["layers"], pools):
        q, k, v = project_qkv(config, layer, x, rope_positions)
        pool = write(pool, k, v, tables, positions)
        out, _ = attend(q.astype(dtype_of(pool)), pool, tables, lengths, query_lengths)
        x = finish_block(layer, x, out)
        new_pools.append(pool)
    return logits_of(params, x), new_pools


@partial(jax.jit, static_argnums=0, donate_argnums=3)
def beam_step(config: Config, params: dict, prompt_pools: list[Pool], beam_pools: list[Pool],
              tokens: Array, position: Array, prompt_tables: Array, prompt_length: Array,
              beam_tables: Array, step: Array):
    """One beam-search step: tokens [W, 1] at position [] (prompt length + step). Each beam
    attends to the shared prompt pages and to its own generated tokens (page size 1, entry
    `step` written now), merged exactly. Returns (logits [W, V], beam_pools)."""
    width = tokens.shape[0]
    x = params["embed"][tokens]
    positions = jnp.full((width, 1), position, jnp.int32)
    new_pools = []
    for layer, prompt_pool, pool in zip(params["layers"], prompt_pools, beam_pools):
        q, k, v = project_qkv(config, layer, x, positions)
        pool = write(pool, k, v, beam_tables, jnp.full((width, 1), step, jnp.int32))
        q = q.astype(dtype_of(pool))
        out_prompt, lse_prompt = attend(q, prompt_pool, prompt_tables,
                                        jnp.full((width,), prompt_length, jnp.int32))
        out_beam, lse_beam = attend(q, pool, beam_tables, jnp.full((width,), step + 1, jnp.int32))
        out, _ = jaxattn.merge_attention_states(jnp.stack([out_prompt, out_beam]),
                                                jnp.stack([lse_prompt, lse_beam]))
        x = finish_block(layer, x, out)
        new_pools.append(pool)
    return logits_of(params, x)[:, -1], new_pools


def dtype_of(pool: Pool) -> Any:
    """The query dtype for a pool: the pool's own, or float32 against a quantized (int8 /
    float8) pool, whose query keeps its own dtype."""
    if pool.key_scale is not None:
        return jnp.float32
    return pool.keys.dtype


class PageAllocator:
    """Hands out page ids of one pool (host side); shared pages are simply listed in several
    block-table rows."""

    def __init__(self, num_pages: int):
        self.free = list(range(num_pages))[::-1]

    def take(self, count: int) -> list[int]:
        if count > len(self.free):
            raise RuntimeError("out of KV cache pages")
        return [self.free.pop() for _ in range(count)]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def prefill(config: Config, params: dict, pools: list[Pool], prompts: list[list[int]],
            tables: np.ndarray, chunk: int):
    """Feeds every prompt in chunks of up to `chunk` tokens (ragged across the batch).
    Returns (logits [B, V] of each prompt's last token, pools)."""
    batch = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    last = np.zeros((batch, config.vocab), np.float32)
    done = np.zeros(batch, np.int64)
    while (done < lengths).any():
        counts = np.minimum(chunk, lengths - done)
        tokens = np.zeros((batch, chunk), np.int32)
        positions = np.full((batch, chunk), -1, np.int32)
        for b in range(batch):
            tokens[b, :counts[b]] = prompts[b][done[b]:done[b] + counts[b]]
            positions[b, :counts[b]] = done[b] + np.arange(counts[b])
        logits, pools = cached_step(config, params, pools, jnp.asarray(tokens),
                                    jnp.asarray(positions), jnp.asarray(tables),
                                    jnp.asarray(done + counts, jnp.int32),
                                    jnp.asarray(counts, jnp.int32))
        logits = np.asarray(logits)
        for b in range(batch):
            if counts[b] > 0 and done[b] + counts[b] == lengths[b]:
                last[b] = logits[b, counts[b] - 1]
        done += counts
    return last, pools


def greedy(config: Config, params: dict, prompts: list[list[int]], new_tokens: int,
           cache_dtype: Any, page_size: int, chunk: int):
    """Batched greedy generation. Returns (tokens [B, new_tokens], decode seconds, pools)."""
    batch = len(prompts)
    per_seq = -(-(max(map(len, prompts)) + new_tokens) // page_size)
    alloc = PageAllocator(batch * per_seq)
    tables = np.array([alloc.take(per_seq) for _ in range(batch)], np.int32)
    pools = new_pools(config, batch * per_seq, page_size, cache_dtype)
    logits, pools = prefill(config, params, pools, prompts, tables, chunk)
    lengths = np.array([len(p) for p in prompts], np.int32)
    token = logits.argmax(-1).astype(np.int32)
    out = [token]
    ones = jnp.ones((batch,), jnp.int32)
    start = None
    for step in range(new_tokens - 1):
        if step == 1:  # the first decode step compiles
            jax.block_until_ready(pools)
            start = time.perf_counter()
        pos = lengths + step
        logits, pools = cached_step(config, params, pools, jnp.asarray(token[:, None]),
                                    jnp.asarray(pos[:, None]), jnp.asarray(tables),
                                    jnp.asarray(pos + 1), ones)
        token = np.asarray(logits[:, -1].argmax(-1)).astype(np.int32)
        out.append(token)
    seconds = time.perf_counter() - start if start is not None else float("nan")
    return np.stack(out, 1), seconds, pools


def beam_search(config: Config, params: dict, prompt: list[int], width: int, new_tokens: int,
                cache_dtype: Any, page_size: int, chunk: int):
    """Beam search for one prompt. The prompt is prefilled once; the beams share its pages
    (one table row repeated) and reorder by permuting their block-table rows in the pool of
    generated tokens (page size 1): no K/V copy. Returns (tokens [new_tokens] of the best
    beam, its log-probability)."""
    per_seq = -(-len(prompt) // page_size)
    prompt_tables = np.arange(per_seq, dtype=np.int32)[None]
    prompt_pools = new_pools(config, per_seq, page_size, cache_dtype)
    logits, prompt_pools = prefill(config, params, prompt_pools, [prompt], prompt_tables, chunk)
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[0])))
    first = np.argsort(-logp, kind="stable")[:width].astype(np.int32)
    scores = logp[first].astype(np.float64)
    history = first[:, None]
    # Generated token s of the beam in slot i lives in page s * width + i, written once.
    beam_pools = new_pools(config, new_tokens * width, 1, cache_dtype)
    beam_tables = np.full((width, new_tokens), -1, np.int32)
    shared = np.repeat(prompt_tables, width, axis=0)  # every beam: the same prompt pages
    tokens = first
    for step in range(new_tokens - 1):
        beam_tables[:, step] = step * width + np.arange(width)
        logits, beam_pools = beam_step(config, params, prompt_pools, beam_pools,
                                       jnp.asarray(tokens[:, None]), jnp.int32(len(prompt) + step),
                                       jnp.asarray(shared), jnp.int32(len(prompt)),
                                       jnp.asarray(beam_tables), jnp.int32(step))
        logp = np.asarray(jax.nn.log_softmax(logits), np.float64)  # [W, V]
        total = (scores[:, None] + logp).ravel()
        best = np.argsort(-total, kind="stable")[:width]
        parent, tokens = best // config.vocab, (best % config.vocab).astype(np.int32)
        scores = total[best]
        history = np.concatenate([history[parent], tokens[:, None]], axis=1)
        beam_tables = beam_tables[parent]  # reorder the table rows: the pages stay put
    return history[0], scores[0]


# --------------------------------------------------------------------------------------------
# Reference without a cache (for --check and the tests)
# --------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnums=0)
def full_logits(config: Config, params: dict, tokens: Array) -> Array:
    """Logits [B, S, V] of whole sequences [B, S]: dense causal attention, no cache."""
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    x = params["embed"][tokens]
    group = config.heads // config.kv_heads
    causal = jnp.tril(jnp.ones((s, s), bool))
    for layer in params["layers"]:
        q, k, v = project_qkv(config, layer, x, positions)
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(config.head_dim)
        probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
        x = finish_block(layer, x, jnp.einsum("bnts,bsnh->btnh", probs, v))
    return logits_of(params, x)


def last_logits(config: Config, params: dict, seqs: list[list[int]], width: int) -> np.ndarray:
    """Logits [len(seqs), V] after each sequence, the sequences padded to `width` tokens (one
    compilation for every length; causal, so the padding after a token never reaches it)."""
    tokens = np.zeros((len(seqs), -(-width // 64) * 64), np.int32)  # few distinct shapes
    for i, seq in enumerate(seqs):
        tokens[i, :len(seq)] = seq
    logits = np.asarray(full_logits(config, params, jnp.asarray(tokens)))
    return logits[np.arange(len(seqs)), [len(seq) - 1 for seq in seqs]]


def reference_greedy(config, params, prompt: list[int], new_tokens: int) -> np.ndarray:
    seq, width = list(prompt), len(prompt) + new_tokens
    for _ in range(new_tokens):
        seq.append(int(last_logits(config, params, [seq], width)[0].argmax()))
    return np.array(seq[len(prompt):])


def reference_beam(config, params, prompt: list[int], width: int, new_tokens: int):
    length = len(prompt) + new_tokens
    logp = np.asarray(jax.nn.log_softmax(last_logits(config, params, [prompt], length)[0]),
                      np.float64)
    first = np.argsort(-logp, kind="stable")[:width]
    beams, scores = [[int(t)] for t in first], logp[first]
    for _ in range(new_tokens - 1):
        seqs = [prompt + beam for beam in beams]
        logp = np.asarray(jax.nn.log_softmax(last_logits(config, params, seqs, length)),
                          np.float64)
        total = (scores[:, None] + logp).ravel()
        best = np.argsort(-total, kind="stable")[:width]
        beams = [beams[i // config.vocab] + [int(i % config.vocab)] for i in best]
        scores = total[best]
    return np.array(beams[0]), scores[0]


# --------------------------------------------------------------------------------------------


PROMPTS = ["The quick brown fox", "To be, or not to be, that is the question:",
           "JAX on the CPU", "Attention over a paged KV cache with chunked prefill and beams",
           "Hi", "Once upon a time, in a land far away, there lived a"]
CACHE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8,
                "float8_e4m3fn": jnp.float8_e4m3fn}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=24, help="prefill tokens per step")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--cache-dtypes", nargs="+", default=list(CACHE_DTYPES))
    p.add_argument("--check", action="store_true",
                   help="compare greedy and beam outputs with a reference without a cache")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = Config(d_model=args.d_model, layers=args.layers, heads=args.heads,
                    kv_heads=args.kv_heads, head_dim=args.head_dim)
    params = init_params(config)
    prompts = [list(p.encode()) for p in PROMPTS]
    text = lambda ids: bytes(int(i) for i in ids).decode("latin-1").encode(
        "unicode_escape").decode()
    rows, results = [], {}
    for name in args.cache_dtypes:
        tokens, seconds, pools = greedy(config, params, prompts, args.new_tokens,
                                        CACHE_DTYPES[name], args.page_size, args.chunk)
        best, score = beam_search(config, params, prompts[0], args.beams, args.new_tokens,
                                  CACHE_DTYPES[name], args.page_size, args.chunk)
        results[name] = dict(greedy=tokens, beam=best, beam_score=score)
        steps = args.new_tokens - 2
        rows.append((name, len(prompts) * steps / seconds if steps > 0 else float("nan"),
                     pool_bytes(pools) / 2**20))
        print(f"[{name}] greedy, prompt 0: {text(tokens[0][:24])!r}")
        print(f"[{name}] beam search ({args.beams} beams), prompt 0: {text(best[:24])!r}, "
              f"log p = {score:.3f}")
    print(f"\n{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"prefilled in chunks of {args.chunk}), {args.new_tokens} new tokens each, pages of "
          f"{args.page_size}; model d={config.d_model} L={config.layers} N={config.heads} "
          f"K={config.kv_heads} H={config.head_dim}, {jaxattn.kernel_isa()} kernels\n")
    print("| cache | decode tokens/s | cache MiB |")
    print("|---|---|---|")
    for name, rate, mib in rows:
        print(f"| {name} | {rate:.0f} | {mib:.2f} |")
    if args.check:
        for b, prompt in enumerate(prompts):
            ref = reference_greedy(config, params, prompt, args.new_tokens)
            got = results.get("float32", next(iter(results.values())))["greedy"][b]
            assert np.array_equal(ref, got), (b, ref, got)
        ref_beam, ref_score = reference_beam(config, params, prompts[0], args.beams,
                                             args.new_tokens)
        got = results.get("float32", next(iter(results.values())))
        assert np.array_equal(ref_beam, got["beam"]), (ref_beam, got["beam"])
        print("\ncheck: greedy and beam outputs equal the reference without a cache")
    return results


if __name__ == "__main__":
    main()
