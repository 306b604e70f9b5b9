"""Swap jaxattn into Google DeepMind's `gemma` library (4.0.1) and check it end to end.

The recipe (what a user would copy) is `with_jaxattn(cls)`: it turns any gemma `Transformer`
class (`gm.nn.Transformer`, `gm.nn.Gemma2_2B`, ...) into a subclass whose attention runs
`jaxattn.flash_attention`; the parameters, their names, the KV cache and gemma's `Sampler` are
unchanged, so a checkpoint (or the parameters of the original model) load as they are:

    Model = with_jaxattn(gm.nn.Gemma2_2B)
    model = Model(dtype=jnp.float32)
    sampler = gm.text.Sampler(model=model, params=params, tokenizer=tokenizer)

Only the middle of gemma's `Attention.__call__` changes (logits, soft cap, masks, softmax and
the weighted sum of values); projections, RoPE and cache writes are gemma's, re-stated here
because gemma has them in the same method. gemma's masks are defined on token positions:
`attn_mask [B,T,S]` (causal and padding) and, on local layers, `|qp - kp| < W`. jaxattn runs
them in one of three ways, chosen inside the jitted graph by `lax.switch` from the mask and
positions themselves (index where it is exact, else positions, else dense):

  positions  (jaxattn with `query_positions`): `is_causal` over positions, padding keys given
             a position past every query, window `(W-1, 0)` in positions. Exact for every
             text mask gemma builds: padding left or right, batched caches with gaps, a prompt
             prefilled partway into a cache. Used when the mask is exactly that.
  index      (any jaxattn): `is_causal` and `local_window_size=(W-1, 0)` over indices, when
             the mask is the plain causal one and positions are indices plus a constant
             (training and scoring without padding): the same mask as positions, and faster
             on the local layers.
  dense      otherwise (e.g. images' bidirectional blocks): gemma's own mask, as a dense
             `[B,1,T,S]` mask. Exact, but slower.

A query row that sees no key at all (a left-padding token) outputs 0 here, where gemma
averages every value; no real token ever sees such a row, so real tokens match.

Run: /work/venv312/bin/python examples/gemma_swap.py --quick     (checks, a few minutes)
     /work/venv312/bin/python examples/gemma_swap.py             (checks and timing, T=2048)
Exits 1 if logits or greedy tokens disagree with gemma's own attention.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import sys
import time
from typing import Any, Iterator

# gemma 4.0.1 imports sentencepiece's protobuf module at import time; where the installed
# protobuf runtime is older than that module's gencode the import fails, although nothing
# here reads a sentencepiece model (this script uses its own byte tokenizer).
os.environ.setdefault("TEMPORARILY_DISABLE_PROTOBUF_VERSION_CHECK", "true")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from gemma import gm  # noqa: E402
from gemma.gm.math import _positional_embeddings  # noqa: E402
from gemma.gm.nn import _modules  # noqa: E402
from gemma.gm.text import _tokenizer  # noqa: E402

import jaxattn  # noqa: E402

HAS_POSITIONS = "query_positions" in inspect.signature(jaxattn.flash_attention).parameters
# A key position past every query: padding keys are then hidden by the causal rule.
_NEVER = 2**30


# --------------------------------------------------------------------------------------------
# The swap
# --------------------------------------------------------------------------------------------

def _expected_position_mask(attn_mask, q_pos, kv_pos):
    """The mask that `is_causal` over positions gives, padding keys found from `attn_mask`.

    Returns (kv_pos with padding keys moved past every query [B,S], consistent: bool scalar,
    whether that equals `attn_mask` on every row that sees some key).
    """
    key_seen = jnp.any(attn_mask, axis=1)                      # [B,S]
    kv_pos = jnp.where(key_seen, kv_pos, _NEVER)
    expected = kv_pos[:, None, :] <= q_pos[:, :, None]          # [B,T,S]
    row_seen = jnp.any(attn_mask, axis=2, keepdims=True)        # [B,T,1]
    consistent = jnp.all(jnp.where(row_seen, expected == attn_mask, True))
    return kv_pos, consistent


def _is_index_causal(attn_mask, q_pos, kv_pos):
    """Whether `attn_mask` is the top-left causal mask and positions are indices + a constant."""
    _, t, s = attn_mask.shape
    if s < t:
        return jnp.asarray(False)
    causal = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
    offset = q_pos[:, :1]
    return (jnp.all(attn_mask == causal[None])
            & jnp.all(q_pos == offset + jnp.arange(t))
            & jnp.all(kv_pos[:, :t] == q_pos))


def _positions_are_indices(q_pos, kv_pos):
    """Whether query i has position c + i and key j position c + j (one c per row): then
    causality and the window over positions are those over indices."""
    offset = q_pos[:, :1]
    return (jnp.all(q_pos == offset + jnp.arange(q_pos.shape[1]))
            & jnp.all(kv_pos == offset + jnp.arange(kv_pos.shape[1])))


def jaxattn_core(query, key, value, *, q_pos, kv_pos, attn_mask, scale: float,
                 soft_cap: float | None, window: int | None, mode: str = "auto"):
    """gemma's attention core (logits, cap, masks, softmax, values) through jaxattn.

    query [B,T,N,H] (not yet scaled), key [B,S,K,H], value [B,S,K,H], q_pos [B,T],
    kv_pos [B,S], attn_mask [B,T,S] bool; window: gemma's sliding window W (keys with
    |qp - kp| < W), None on global layers. mode: auto | positions | index | dense.
    Returns [B,T,N,H].
    """
    common = dict(scale=float(scale), logits_soft_cap=soft_cap)
    causal_window = None if window is None else (window - 1, 0)

    def dense(_):
        mask = attn_mask
        if window is not None:
            mask = mask & (jnp.abs(q_pos[:, :, None] - kv_pos[:, None, :]) < window)
        return jaxattn.flash_attention(query, key, value, mask=mask[:, None], **common)

    def index(_):
        return jaxattn.flash_attention(query, key, value, is_causal=True,
                                       local_window_size=causal_window, **common)

    if HAS_POSITIONS:
        moved_kv_pos, positions_ok = _expected_position_mask(attn_mask, q_pos, kv_pos)

        def positions(_):
            return jaxattn.flash_attention(
                query, key, value, is_causal=True, local_window_size=causal_window,
                query_positions=q_pos, key_value_positions=moved_kv_pos, **common)
    if mode == "dense":
        return dense(None)
    if mode == "index":
        return index(None)
    if mode == "positions":
        if not HAS_POSITIONS:
            raise ValueError("this jaxattn has no query_positions; use mode='auto'")
        return positions(None)
    if HAS_POSITIONS:
        # Where the positions are the indices plus one constant (no padding: training,
        # scoring), the index route gives the same mask and is faster on local layers (its
        # kernels mask a narrow band by index ranges; benchmarks/results/gemma_2core.md).
        # positions_ok already ties the mask to the positions, so this costs O(T + S).
        index_ok = positions_ok & _positions_are_indices(q_pos, moved_kv_pos)
        route = jnp.where(index_ok, 2, jnp.where(positions_ok, 1, 0))
        branches = [dense, positions, index]
    else:
        route = jnp.where(_is_index_causal(attn_mask, q_pos, kv_pos), 2, 0)
        branches = [dense, index, index]  # 1 never taken
    if _SHOW_ROUTES:
        jax.debug.print("  route T={t} S={s} window={w}: {r}", t=query.shape[1], s=key.shape[1],
                        w=window, r=route, ordered=True)
    return jax.lax.switch(route, branches, None)


class JaxattnAttention(_modules.Attention):
    """gemma's `Attention` with its core (logits to weighted values) run by jaxattn."""

    def __call__(self, x, segment_pos, cache, attn_mask):
        # Projections, QK norm, RoPE and the cache write: as gemma 4.0.1's Attention.
        if self.use_qkv_einsum:
            query, key, value = self.qkv_einsum("BTD,SNDH->SBTNH", x)
        else:
            query = self.q_einsum("BTD,NDH->BTNH", x)
            key, value = self.kv_einsum("BSD,CKDH->CBSKH", x)
        if self.use_qk_norm:
            query = self._query_norm(query)
            key = self._key_norm(key)
        rope = dict(base_frequency=self.rope_base_frequency, scale_factor=self.rope_scale_factor)
        query = _positional_embeddings.apply_rope(query, segment_pos, **rope)
        key = _positional_embeddings.apply_rope(key, segment_pos, **rope)

        kv_pos = segment_pos
        if cache is not None:
            end_index = cache["end_index"][0]
            start = (0, end_index % cache["v"].shape[1], 0, 0)
            value = jax.lax.dynamic_update_slice(cache["v"], value, start)
            key = jax.lax.dynamic_update_slice(cache["k"], key, start)
            kv_pos = jax.lax.dynamic_update_slice(cache["positions"], segment_pos, start[:2])

        if self.attn_type not in (_modules.AttentionType.GLOBAL,
                                  _modules.AttentionType.LOCAL_SLIDING):
            raise ValueError(f"unknown attention type {self.attn_type}")
        local = self.attn_type == _modules.AttentionType.LOCAL_SLIDING
        if local and self.sliding_window_size is None:
            raise ValueError("sliding_window_size must be set for local sliding attention")
        # GQA: jaxattn maps query head n to kv head n // (N // K), as gemma's reshape does.
        encoded = jaxattn_core(
            query, key, value, q_pos=segment_pos, kv_pos=kv_pos, attn_mask=attn_mask,
            scale=self.query_pre_attn_scalar, soft_cap=self.attn_logits_soft_cap,
            window=self.sliding_window_size if local else None, mode=_MODE)
        out = self.attn_vec_einsum("BTNH,NHD->BTD", encoded)

        new_cache = None
        if cache is not None:
            new_cache = {"v": value, "k": key, "positions": kv_pos,
                         "end_index": cache["end_index"] + x.shape[1]}
        return new_cache, out


_MODE = "auto"  # module-level so that `--mode` can force one path in the checks
_SHOW_ROUTES = False  # `--show-routes`: print 1 (positions/index route) or 0 (dense) per call


@contextlib.contextmanager
def _replaced(module, name: str, value) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


class _JaxattnBlock(_modules.Block):
    def setup(self):
        # Block.setup builds `Attention(...)` by its module-level name: point that name at
        # the jaxattn subclass for the duration of this setup only.
        with _replaced(_modules, "Attention", JaxattnAttention):
            super().setup()


def with_jaxattn(transformer_cls: type) -> type:
    """A subclass of a gemma `Transformer` class whose attention runs jaxattn.

    Parameters, cache and outputs are those of `transformer_cls`; only the attention core
    differs. A distinct class, so jit caches never mix the two.
    """

    def setup(self):
        with _replaced(_modules, "Block", _JaxattnBlock):
            transformer_cls.setup(self)

    return type(f"Jaxattn{transformer_cls.__name__}", (transformer_cls,), {"setup": setup})


# --------------------------------------------------------------------------------------------
# Small random models, a byte tokenizer
# --------------------------------------------------------------------------------------------

def make_config(variant: str, embed_dim: int, hidden_dim: int, vocab: int,
                window: int) -> gm.nn.config.TransformerConfig:
    """Gemma-2-style (cap 50, alternating local/global) or Gemma-3-style (QK norm, no cap)."""
    local, glob = _modules.AttentionType.LOCAL_SLIDING, _modules.AttentionType.GLOBAL
    common = dict(num_embed=vocab, embed_dim=embed_dim, hidden_dim=hidden_dim, num_heads=8,
                  head_dim=256, num_kv_heads=4, use_post_attn_norm=True,
                  use_post_ffw_norm=True, sliding_window_size=window)
    if variant == "gemma2":
        return gm.nn.config.TransformerConfig(
            **common, final_logit_softcap=30.0, attention_types=(local, glob) * 2,
            attn_logits_soft_cap=50.0)
    if variant == "gemma3":
        return gm.nn.config.TransformerConfig(
            **common, final_logit_softcap=None, attention_types=(local, local, local, glob),
            attn_logits_soft_cap=None, use_qk_norm=True,
            local_base_frequency=10_000, global_base_frequency=1_000_000)
    raise ValueError(variant)


_BYTE_OFFSET = 300  # byte b is token 300 + b: clear of gemma's special ids (0..255 used there)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ByteTokenizer(_tokenizer.Tokenizer):
    """A tokenizer with no vocabulary file: one token per UTF-8 byte (random weights need no
    real vocabulary; gemma's Sampler only needs encode, decode and the special ids)."""

    path: str = ""

    @property
    def special_tokens(self):
        return _tokenizer._Gemma3SpecialTokens  # pylint: disable=protected-access

    def encode(self, text, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [_BYTE_OFFSET + b for b in text.encode()]
        return ([self.special_tokens.BOS] if add_bos else []) + ids + (
            [self.special_tokens.EOS] if add_eos else [])

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1).tolist()
        data = bytes(i - _BYTE_OFFSET for i in ids if _BYTE_OFFSET <= i < _BYTE_OFFSET + 256)
        return data.decode(errors="replace")


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def _random_tokens(rng: np.random.Generator, lengths, pad_to: int, left: bool) -> np.ndarray:
    out = np.zeros((len(lengths), pad_to), np.int32)
    for b, n in enumerate(lengths):
        row = np.concatenate([[2], rng.integers(_BYTE_OFFSET, _BYTE_OFFSET + 256, n - 1)])
        if left:
            out[b, pad_to - n:] = row
        else:
            out[b, :n] = row
    return out


def check_logits(ref_model, swap_model, params, tokens: np.ndarray, tol: float) -> tuple[bool, str]:
    """Logits of both models on real (non-padding) tokens; gemma's mask from `tokens != 0`."""
    ref = jax.jit(lambda p, t: ref_model.apply({"params": p}, t).logits)(params, tokens)
    new = jax.jit(lambda p, t: swap_model.apply({"params": p}, t).logits)(params, tokens)
    real = np.asarray(tokens) != 0
    diff = np.abs(np.asarray(ref) - np.asarray(new))[real]
    scale = np.abs(np.asarray(ref))[real].max()
    err = float(diff.max())
    ok = bool(np.isfinite(err) and err <= tol * max(1.0, scale))
    return ok, f"max |diff| {err:.2e} (max |logit| {scale:.1f})"


def check_greedy(ref_model, swap_model, params, prompts, max_new_tokens: int,
                 cache_length: int, second_turn: list[str] | None = None) -> tuple[bool, str]:
    """gemma's Sampler, greedy, batched prompts of different lengths, with both models; with
    `second_turn`, a second batch of prompts prefilled into the same cache after the first
    turn's answers (gemma's multi-turn path: positions and gaps carried over)."""
    tokenizer = ByteTokenizer()
    outs = []
    for model in (ref_model, swap_model):
        sampler = gm.text.Sampler(model=model, params=params, tokenizer=tokenizer,
                                  cache_length=cache_length, max_out_length=max_new_tokens,
                                  pad_length=None)
        out = sampler.sample(prompts, max_new_tokens=max_new_tokens, return_state=True, rng=0)
        turns = [np.asarray(out.state.predicted_tokens)]
        if second_turn:
            out = sampler.sample(second_turn, max_new_tokens=max_new_tokens, return_state=True,
                                 rng=0, last_state=out.state)
            turns.append(np.asarray(out.state.predicted_tokens))
        outs.append(np.stack(turns))
    same = bool(np.array_equal(outs[0], outs[1]))
    produced = int((outs[0] != 0).sum())
    first_diff = ("" if same else ", first difference at [turn, row, step] "
                  f"{np.argwhere(outs[0] != outs[1])[0]}")
    return same, (f"{outs[0].shape[1]} prompts x {outs[0].shape[0]} turn(s), {produced} tokens "
                  f"generated, identical: {same}{first_diff}")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def time_models(ref_model, swap_model, params, seq_len: int, repeats: int) -> dict[str, Any]:
    """Median seconds of forward and forward+backward (grad w.r.t. all parameters), B=1,
    both models' calls alternating so that load on a shared machine hits both alike."""
    tokens = jnp.asarray(_random_tokens(np.random.default_rng(1), [seq_len], seq_len, False))

    def fns(model):
        fwd = jax.jit(lambda p: model.apply({"params": p}, tokens).logits)

        def loss(p):
            logits = model.apply({"params": p}, tokens).logits
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
        return fwd, jax.jit(jax.grad(loss))

    results = {}
    runs = {"gemma": fns(ref_model), "jaxattn": fns(swap_model)}
    for pass_index, pass_name in enumerate(("forward", "forward+backward")):
        for fn in (runs["gemma"][pass_index], runs["jaxattn"][pass_index]):  # compile, warm
            jax.block_until_ready(fn(params))
        times = {"gemma": [], "jaxattn": []}
        for _ in range(repeats):
            for name in ("gemma", "jaxattn"):
                start = time.perf_counter()
                jax.block_until_ready(runs[name][pass_index](params))
                times[name].append(time.perf_counter() - start)
        results[pass_name] = {k: float(np.median(v)) for k, v in times.items()}
        results[pass_name]["all"] = times
    return results


def time_attention_layers(config, seq_len: int, repeats: int) -> dict[str, Any]:
    """Median seconds of one attention layer (gemma's `Attention` module with its projections,
    RoPE and masks vs `JaxattnAttention`, same parameters), local and global, forward and
    forward+backward (grad w.r.t. the input and the parameters), B=1, alternating."""
    x = jax.random.normal(jax.random.key(2), (1, seq_len, config.embed_dim), jnp.float32)
    pos = jnp.arange(seq_len)[None]
    mask = jnp.tril(jnp.ones((seq_len, seq_len), bool))[None]
    results = {}
    for attn_type in (_modules.AttentionType.LOCAL_SLIDING, _modules.AttentionType.GLOBAL):
        fields = dict(num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                      features=config.embed_dim, head_dim=config.head_dim, attn_type=attn_type,
                      query_pre_attn_scalar=config.query_pre_attn_scalar(),
                      attn_logits_soft_cap=config.attn_logits_soft_cap,
                      sliding_window_size=config.sliding_window_size,
                      use_qk_norm=config.use_qk_norm)
        layers = {"gemma": _modules.Attention(**fields), "jaxattn": JaxattnAttention(**fields)}
        params = layers["gemma"].init(jax.random.key(3), x, pos, None, mask)

        def fns(layer):
            def fwd(p, x):
                return layer.apply(p, x, pos, None, mask)[1]

            def loss(p, x):
                return jnp.sum(fwd(p, x) ** 2)
            return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1)))

        runs = {name: fns(layer) for name, layer in layers.items()}
        for pass_index, pass_name in enumerate(("forward", "forward+backward")):
            for name in runs:
                jax.block_until_ready(runs[name][pass_index](params, x))
            times = {"gemma": [], "jaxattn": []}
            for _ in range(repeats):
                for name in ("gemma", "jaxattn"):
                    start = time.perf_counter()
                    jax.block_until_ready(runs[name][pass_index](params, x))
                    times[name].append(time.perf_counter() - start)
            row = {k: float(np.median(v)) for k, v in times.items()}
            row["all"] = times
            results[f"{attn_type.name.lower()} {pass_name}"] = row
    return results


def _print_timing(title: str, results: dict[str, Any]) -> None:
    print(title)
    for row_name, r in results.items():
        print(f"    {row_name:30s} gemma {r['gemma'] * 1e3:8.0f} ms   jaxattn "
              f"{r['jaxattn'] * 1e3:7.0f} ms   ratio {r['gemma'] / r['jaxattn']:5.2f}x   "
              f"(gemma {', '.join(f'{t * 1e3:.0f}' for t in r['all']['gemma'])}; "
              f"jaxattn {', '.join(f'{t * 1e3:.0f}' for t in r['all']['jaxattn'])})")


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="checks only, small shapes")
    parser.add_argument("--variants", default="gemma2,gemma3",
                        help="comma-separated: gemma2 (cap 50), gemma3 (QK norm, no cap)")
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--hidden-dim", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--window", type=int, default=100, help="gemma's sliding window W")
    parser.add_argument("--seq-len", type=int, default=2048, help="timing length (B=1)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats per model")
    parser.add_argument("--tol", type=float, default=1e-4,
                        help="max |logit diff| relative to max(1, max |logit|)")
    parser.add_argument("--mode", default="auto", choices=["auto", "positions", "index", "dense"],
                        help="force one mask path of the swap (default: chosen per call)")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--show-routes", action="store_true",
                        help="print the route of every attention call: 2 index, 1 positions, "
                             "0 dense")
    parser.add_argument("--timing-only", action="store_true", help="skip the checks")
    parser.add_argument("--timing", default="layer,model",
                        help="what to time: layer (one attention layer), model, or both")
    args = parser.parse_args(argv)

    global _MODE, _SHOW_ROUTES
    _MODE, _SHOW_ROUTES = args.mode, args.show_routes
    print(f"jax {jax.__version__}, jaxattn from {os.path.dirname(jaxattn.__file__)}, "
          f"positions API: {'yes' if HAS_POSITIONS else 'no (index fast path + dense masks)'}, "
          f"devices {jax.devices()}")
    ok_all = True
    rng = np.random.default_rng(0)
    n = 160 if args.quick else 300  # longer than the window, so local layers differ
    for variant in args.variants.split(","):
        config = make_config(variant, args.embed_dim, args.hidden_dim, args.vocab, args.window)
        ref_model = gm.nn.Transformer(config=config, dtype=jnp.float32)
        swap_model = with_jaxattn(gm.nn.Transformer)(config=config, dtype=jnp.float32)
        params = ref_model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
        print(f"\n== {variant}: 4 layers {[t.name for t in config.attention_types]}, 8 query / "
              f"4 kv heads of 256, window {args.window}, soft cap "
              f"{config.attn_logits_soft_cap}, embed {args.embed_dim}, float32")

        if not args.timing_only:
            cases = {
                "single prompt": _random_tokens(rng, [n], n, False),
                "batched, right padding": _random_tokens(rng, [n, n * 2 // 3, 37], n, False),
                "batched, left padding": _random_tokens(rng, [n, n * 2 // 3, 37], n, True),
            }
            for name, tokens in cases.items():
                ok, msg = check_logits(ref_model, swap_model, params, tokens, args.tol)
                ok_all &= ok
                print(f"  logits  {name:26s} {'OK  ' if ok else 'FAIL'} {msg}")

            prompts = ["The quick brown fox jumps over the lazy dog. " * (n // 45 + 1),
                       "Hello", "Gemma with jaxattn on the CPU: a medium prompt."]
            max_new = 16 if args.quick else 48
            second = ["And a second turn.", "More?", "Go on, with a somewhat longer reply."]
            ok, msg = check_greedy(ref_model, swap_model, params, prompts, max_new,
                                   cache_length=2 * (n + 64 + max_new), second_turn=second)
            ok_all &= ok
            print(f"  greedy  {'Sampler, batched, 2 turns':26s} {'OK  ' if ok else 'FAIL'} {msg}")

        if not args.quick and not args.no_timing and variant == "gemma2":
            shared = "alternating turns; a shared machine: other processes may run"
            if "layer" in args.timing:
                _print_timing(f"  timing: one attention layer, B=1 T={args.seq_len}, median of "
                              f"{args.repeats} ({shared})",
                              time_attention_layers(config, args.seq_len, args.repeats))
            if "model" in args.timing:
                _print_timing(f"  timing: whole model, B=1 T={args.seq_len}, median of "
                              f"{args.repeats} ({shared})",
                              time_models(ref_model, swap_model, params, args.seq_len,
                                          args.repeats))

    print("\nall checks passed" if ok_all else "\nSOME CHECKS FAILED")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
