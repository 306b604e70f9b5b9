"""Where the time goes in the Gemma-2-style model of examples/gemma_swap.py, and the Amdahl bound.

Times, B = 1, T = 2048 float32 (forward, and forward+backward w.r.t. every parameter), with
every variant's calls alternating in one process (a shared machine hits all alike), medians:

  model rows   gemma's own attention; jaxattn (the swap); and a "floor" whose attention core
               (logits to weighted values) is a cheap element-wise stand-in, so that it times
               only what no attention kernel can change: embeddings, projections, RoPE, norms,
               MLP, the vocabulary product, the final cap.
  core rows    the attention core alone at the model's shapes (q [1,T,8,256], k/v [1,T,4,256],
               cap 50, scale 256**-0.5): gemma's einsum/softmax code, the swap's `jaxattn_core`
               (mask checks and `lax.cond` included) and a bare `jaxattn.flash_attention`,
               local (window 100) and global, forward and forward+backward (grad w.r.t. q,k,v).

The bound: with the floor F and gemma's model time G, no attention kernel can make the model
more than G / F times faster. Needs gemma (Python >= 3.12), see README "Gemma":

    /work/venv312/bin/python benchmarks/bench_gemma.py [--repeats 5] [--what model,core]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("TEMPORARILY_DISABLE_PROTOBUF_VERSION_CHECK", "true")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
import jaxattn  # noqa: E402


def _load_swap():
    spec = importlib.util.spec_from_file_location("gemma_swap", _ROOT / "examples" / "gemma_swap.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gemma_swap"] = module
    spec.loader.exec_module(module)
    return module


swap = _load_swap()
from gemma import gm  # noqa: E402
from gemma.gm.nn import _modules  # noqa: E402


def floor_core(query, key, value, **_):
    """A cheap stand-in for the attention core: gradients still reach q, k and v."""
    group = query.shape[2] // key.shape[2]
    return query + jnp.repeat(key + value, group, axis=2)


def gemma_core(query, key, value, *, q_pos, kv_pos, attn_mask, scale, soft_cap, window):
    """gemma 4.0.1's `Attention.__call__` from the scaled query to the encoded values (GQA)."""
    query = query * scale
    b, t, n, h = query.shape
    k_heads = key.shape[2]
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", query.reshape(b, t, k_heads, n // k_heads, h), key)
    logits = logits.reshape(b, t, n, -1)
    if soft_cap is not None:
        logits = jnp.tanh(logits / soft_cap) * soft_cap
    if window is not None:
        attn_mask = attn_mask * _modules.create_sliding_mask(q_pos, sliding_window_size=window)
    logits = jnp.where(attn_mask[:, :, None, :], logits, _modules.K_MASK)
    probs = jax.nn.softmax(logits, axis=-1).reshape(b, t, k_heads, n // k_heads, -1)
    return jnp.einsum("BTKGS,BSKH->BTKGH", probs, value).reshape(b, t, n, h)


def bare_core(query, key, value, *, scale, soft_cap, window, **_):
    """jaxattn.flash_attention with the index masks only (no mask checks, no cond)."""
    return jaxattn.flash_attention(
        query, key, value, is_causal=True, scale=scale, logits_soft_cap=soft_cap,
        local_window_size=None if window is None else (window - 1, 0))


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Warm each, then `repeats` rounds calling each once in turn: wall seconds per call."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def _row(label: str, times: dict[str, list[float]], baseline: str) -> None:
    med = {k: float(np.median(v)) for k, v in times.items()}
    cells = "  ".join(f"{k} {v * 1e3:7.0f} ms" for k, v in med.items())
    ratios = "  ".join(f"{baseline}/{k} {med[baseline] / v:5.2f}x"
                       for k, v in med.items() if k != baseline)
    print(f"  {label:28s} {cells}   {ratios}", flush=True)
    print(f"  {'':28s} all: " + "; ".join(
        f"{k} " + ",".join(f"{t * 1e3:.0f}" for t in v) for k, v in times.items()), flush=True)


def time_model(config, seq_len: int, repeats: int) -> None:
    models = {
        "gemma": gm.nn.Transformer(config=config, dtype=jnp.float32),
        "jaxattn": swap.with_jaxattn(gm.nn.Transformer)(config=config, dtype=jnp.float32),
        "floor": swap.with_jaxattn(gm.nn.Transformer)(config=config, dtype=jnp.float32),
    }
    params = models["gemma"].init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    tokens = jnp.asarray(swap._random_tokens(np.random.default_rng(1), [seq_len], seq_len, False))

    def compiled(model, grad: bool):
        def logits(p):
            return model.apply({"params": p}, tokens).logits

        def loss(p):
            out = logits(p)
            return jnp.mean(jax.nn.logsumexp(out, -1) - out[..., 0])
        fn = jax.jit(jax.grad(loss) if grad else logits)
        return fn.lower(params).compile()

    for grad, label in ((False, "model forward"), (True, "model forward+backward")):
        fns = {}
        for name, model in models.items():
            if name == "floor":  # traced (here, at lowering) with the stand-in core
                real, swap.jaxattn_core = swap.jaxattn_core, floor_core
                try:
                    exe = compiled(model, grad)
                finally:
                    swap.jaxattn_core = real
            else:
                exe = compiled(model, grad)
            fns[name] = (lambda exe=exe: exe(params))
        _row(label, alternate(fns, repeats), "gemma")


def time_cores(config, seq_len: int, repeats: int) -> None:
    keys = jax.random.split(jax.random.key(5), 4)
    b, n, k, h = 1, config.num_heads, config.num_kv_heads, config.head_dim
    q = jax.random.normal(keys[0], (b, seq_len, n, h), jnp.float32)
    kk = jax.random.normal(keys[1], (b, seq_len, k, h), jnp.float32)
    v = jax.random.normal(keys[2], (b, seq_len, k, h), jnp.float32)
    ct = jax.random.normal(keys[3], (b, seq_len, n, h), jnp.float32)
    pos = jnp.arange(seq_len)[None]
    mask = jnp.tril(jnp.ones((seq_len, seq_len), bool))[None]
    cores = {"gemma": gemma_core, "jaxattn_core": swap.jaxattn_core, "bare_flash": bare_core}
    for window, kind in ((config.sliding_window_size, "local"), (None, "global")):
        common = dict(q_pos=pos, kv_pos=pos, attn_mask=mask, scale=config.query_pre_attn_scalar(),
                      soft_cap=config.attn_logits_soft_cap, window=window)
        for grad in (False, True):
            fns = {}
            for name, core in cores.items():
                def fwd(q, kk, v, core=core):
                    return core(q, kk, v, **common)
                if grad:
                    fn = jax.jit(jax.grad(lambda q, kk, v, fwd=fwd: jnp.vdot(fwd(q, kk, v), ct),
                                          argnums=(0, 1, 2)))
                else:
                    fn = jax.jit(fwd)
                fns[name] = (lambda fn=fn: fn(q, kk, v))
            _row(f"core {kind} {'forward+backward' if grad else 'forward'}",
                 alternate(fns, repeats), "gemma")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--hidden-dim", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--what", default="core,model", help="core, model or both")
    args = parser.parse_args(argv)
    config = swap.make_config("gemma2", args.embed_dim, args.hidden_dim, args.vocab, args.window)
    print(f"jax {jax.__version__}; {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f}; "
          f"Gemma-2-style, embed {args.embed_dim}, MLP {args.hidden_dim}, B=1 T={args.seq_len}, "
          f"medians of {args.repeats} alternating rounds", flush=True)
    if "core" in args.what:
        time_cores(config, args.seq_len, args.repeats)
    if "model" in args.what:
        time_model(config, args.seq_len, args.repeats)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
