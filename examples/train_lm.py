"""Train a small character-level language model with jaxattn's FlashSelfAttention (flax.nnx).

    python examples/train_lm.py            # ~2-3 minutes on 2 CPU cores
    python examples/train_lm.py --steps 1000 --seq-len 256

Run with jaxattn installed: after ``python3 run.py demo`` that means
``source .venv/bin/activate`` first, or ``.venv/bin/python`` instead of ``python``. In a
development tree built with ``tools/build_inplace.sh``, prefix ``PYTHONPATH=.``.

1. trains a decoder-only transformer (RoPE, grouped-query attention, pre-norm) on
   examples/data/coriolanus.txt, with a progress bar and the validation loss as it falls;
2. generates text token by token with the KV cache (``init_cache`` + ``decode=True``);
3. times the same model with jaxattn's attention against XLA's
   (``jax.nn.dot_product_attention(implementation="xla")``, selected with the layer's
   ``implementation=`` flag, same weights), prints the table and saves a plot
   (``--plot``, default ``bench_out/attention_speed.png``; needs matplotlib).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxattn
from jaxattn.flax.nnx import FlashSelfAttention

DATA = Path(__file__).resolve().parent / "data" / "coriolanus.txt"


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, *, implementation: str,
                 rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.attn = FlashSelfAttention(d_model, num_heads, num_kv_heads=num_kv_heads,
                                       use_rope=True, use_bias=False,
                                       implementation=implementation, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array, decode: bool = False) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), decode=decode)
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x))))


class CharLM(nnx.Module):
    """Decoder-only character LM: token ids [B, T] -> logits [B, T, vocab]."""

    def __init__(self, vocab_size: int, *, d_model: int, num_layers: int, num_heads: int,
                 num_kv_heads: int, implementation: str = "jaxattn", rngs: nnx.Rngs):
        # Small init: the tied output logits then start near a uniform guess.
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs,
                               embedding_init=nnx.initializers.normal(0.02))
        self.blocks = nnx.List([Block(d_model, num_heads, num_kv_heads,
                                      implementation=implementation, rngs=rngs)
                                for _ in range(num_layers)])
        self.norm = nnx.RMSNorm(d_model, rngs=rngs)

    def __call__(self, tokens: jax.Array, decode: bool = False) -> jax.Array:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, decode=decode)
        return self.embed.attend(self.norm(x))  # weights tied with the embedding

    def init_cache(self, batch_size: int, max_length: int) -> None:
        for block in self.blocks:
            block.attn.init_cache(batch_size=batch_size, max_length=max_length)


def make_model(args: argparse.Namespace, vocab_size: int, implementation: str = "jaxattn",
               seed: int = 0) -> CharLM:
    return CharLM(vocab_size, d_model=args.d_model, num_layers=args.layers,
                  num_heads=args.heads, num_kv_heads=args.kv_heads,
                  implementation=implementation, rngs=nnx.Rngs(seed))


def loss_fn(model: CharLM, tokens: jax.Array) -> jax.Array:
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def train_step(model: CharLM, optimizer: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_loss(model: CharLM, tokens: jax.Array) -> jax.Array:
    return loss_fn(model, tokens)


@nnx.jit
def forward(model: CharLM, tokens: jax.Array) -> jax.Array:
    return model(tokens)


# --------------------------------------------------------------------------------------------
# Data, progress bar
# --------------------------------------------------------------------------------------------


class Vocab:
    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> np.ndarray:
        return np.array([self.index[c] for c in text], np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def batches(data: np.ndarray, batch_size: int, length: int, rng: np.random.Generator):
    """Endless random windows of ``length + 1`` tokens (inputs and shifted targets)."""
    while True:
        starts = rng.integers(0, len(data) - length - 1, batch_size)
        yield np.stack([data[s:s + length + 1] for s in starts])


class Progress:
    """tqdm when installed, else a one-line bar on stderr."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr)
        except ImportError:
            self._bar = None
        self.total, self.desc, self.n, self.start, self.postfix = total, desc, 0, time.time(), ""

    def update(self, postfix: str) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(1)
            return
        self.postfix = postfix
        if self.n % max(1, self.total // 100) and self.n != self.total:
            return
        width = 30
        filled = int(width * self.n / self.total)
        elapsed = time.time() - self.start
        eta = elapsed / self.n * (self.total - self.n)
        sys.stderr.write(f"\r{self.desc} |{'#' * filled}{'.' * (width - filled)}| "
                         f"{self.n}/{self.total} [{elapsed:4.0f}s<{eta:3.0f}s] {postfix}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")


# --------------------------------------------------------------------------------------------
# Generation with the KV cache
# --------------------------------------------------------------------------------------------


def validation_set(val: np.ndarray, args: argparse.Namespace) -> list[jax.Array]:
    """The fixed validation batches (4 of them) every model is evaluated on."""
    rng = np.random.default_rng(args.seed + 1)
    return [jnp.asarray(b) for b, _ in zip(batches(val, args.batch_size, args.seq_len, rng),
                                           range(4))]


def train(model: nnx.Module, args: argparse.Namespace, train_data: np.ndarray,
          val_set: list[jax.Array], name: str) -> tuple[list[tuple[int, float]], float]:
    """AdamW with warmup and cosine decay over ``args.steps`` batches drawn from
    ``train_data`` (seeded, so every model sees the same ones): the validation-loss history
    [(step, loss)] and the training seconds."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(50, args.steps // 5 + 1),
                                                  max(args.steps, 2), args.lr / 10)
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0),
                                                 optax.adamw(schedule, weight_decay=0.01)),
                              wrt=nnx.Param)
    train_batches = batches(train_data, args.batch_size, args.seq_len,
                            np.random.default_rng(args.seed))

    def validation_loss() -> float:
        return float(np.mean([float(eval_loss(model, b)) for b in val_set]))

    history = [(0, validation_loss())]
    bar = Progress(args.steps, name)
    start = time.time()
    smooth = None
    for step in range(1, args.steps + 1):
        loss = float(train_step(model, optimizer, jnp.asarray(next(train_batches))))
        smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
        bar.update(f"loss {smooth:.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            history.append((step, validation_loss()))
    bar.close()
    return history, time.time() - start


@nnx.jit
def _prefill(model: CharLM, tokens: jax.Array) -> jax.Array:
    """Runs the prompt through the model in one cached call; logits of its last token."""
    return model(tokens, decode=True)[:, -1]


@partial(jax.jit, static_argnums=(0, 4))
def _sample(graphdef, state, logits: jax.Array, key: jax.Array, length: int,
            temperature: float) -> jax.Array:
    """``length`` tokens, one cached decode step each, in a single compiled ``lax.scan``."""

    def step(carry, key):
        state, logits = carry
        token = jax.random.categorical(key, logits / temperature)
        model = nnx.merge(graphdef, state)
        logits = model(token[:, None], decode=True)[:, -1]  # appends to the KV cache
        return (nnx.state(model), logits), token

    _, tokens = jax.lax.scan(step, (state, logits), jax.random.split(key, length))
    return tokens[:, 0]


def generate(model: CharLM, vocab: Vocab, prompt: str, length: int, temperature: float,
             seed: int) -> str:
    """Samples ``length`` characters after ``prompt`` with the KV cache."""
    ids = jnp.asarray(vocab.encode(prompt))[None]
    model.init_cache(batch_size=1, max_length=ids.shape[1] + length)
    logits = _prefill(model, ids)
    graphdef, state = nnx.split(model)
    tokens = _sample(graphdef, state, logits, jax.random.key(seed), length, temperature)
    return prompt + vocab.decode(np.asarray(tokens))


# --------------------------------------------------------------------------------------------
# Benchmark: the same model, jaxattn vs XLA attention
# --------------------------------------------------------------------------------------------


def _compare_ms(fns: dict, args: dict, budget_s: float = 2.0, max_reps: int = 7) -> dict:
    """Median milliseconds of each ``fns[name](*args[name])``, repetitions interleaved.

    Interleaving keeps a change of machine load (other processes) from favouring one side.
    """
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))  # compile and warm up
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while True:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            times[name].append(time.perf_counter() - t0)
        reps = len(times[next(iter(fns))])
        if reps >= max_reps or (reps >= 2 and time.perf_counter() - start > budget_s):
            break
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def benchmark(model: CharLM, args: argparse.Namespace, vocab_size: int) -> list[dict]:
    """Times attention alone and the whole training step, per context length."""
    state = nnx.state(model, nnx.Param)
    models = {}
    for impl in ("jaxattn", "xla"):
        models[impl] = make_model(args, vocab_size, implementation=impl)
        nnx.update(models[impl], state)  # identical weights
    head_dim = args.d_model // args.heads
    attention = {
        "jaxattn": lambda q, k, v: jaxattn.flash_attention(q, k, v, is_causal=True),
        "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                            implementation="xla"),
    }
    rows = []
    for length in args.bench_lengths:
        batch = max(1, args.bench_tokens // length)
        rng = np.random.default_rng(length)
        tokens = jnp.asarray(rng.integers(0, vocab_size, (batch, length + 1)), jnp.int32)
        q = jnp.asarray(rng.standard_normal((batch, length, args.heads, head_dim)), jnp.float32)
        kv = jnp.asarray(rng.standard_normal((batch, length, args.kv_heads, head_dim)),
                         jnp.float32)
        row = {"length": length, "batch": batch}
        # Attention alone, forward + backward, at this model's head layout.
        attn_grads = {impl: jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) ** 2),
                                             argnums=(0, 1, 2)))
                      for impl, f in attention.items()}
        times = _compare_ms(attn_grads, {impl: (q, kv, kv) for impl in attention})
        row.update({f"attn_{impl}": t for impl, t in times.items()})
        # The whole model: loss and gradients (what a training step computes).
        step = nnx.jit(nnx.value_and_grad(loss_fn))
        times = _compare_ms({impl: step for impl in models},
                            {impl: (models[impl], tokens) for impl in models})
        row.update({f"step_{impl}": t for impl, t in times.items()})
        outputs = {impl: forward(m, tokens) for impl, m in models.items()}
        row["logit_diff"] = float(jnp.abs(outputs["jaxattn"] - outputs["xla"]).max())
        rows.append(row)
        print(f"  T={length:5d} B={batch:3d}  attention fwd+bwd: jaxattn {row['attn_jaxattn']:8.1f}"
              f" ms, XLA {row['attn_xla']:8.1f} ms ({row['attn_xla'] / row['attn_jaxattn']:4.1f}x)"
              f" | train step: jaxattn {row['step_jaxattn']:8.1f} ms, XLA {row['step_xla']:8.1f} ms"
              f" ({row['step_xla'] / row['step_jaxattn']:4.1f}x) | max |logit diff| "
              f"{row['logit_diff']:.1e}", flush=True)
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    """Left: attention time per context length; right: speed-ups of attention and of the step."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install matplotlib)")
        return
    lengths = [r["length"] for r in rows]
    x = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, label, style in (("jaxattn", "jaxattn", "o-"),
                               ("xla", "XLA (jax.nn, implementation='xla')", "s--")):
        left.plot(x, [r[f"attn_{impl}"] for r in rows], style, label=label)
    left.set_yscale("log")
    left.set_ylabel("milliseconds (median)")
    left.set_title("attention alone, forward + backward")
    left.legend()
    width = 0.38
    for offset, key, label in ((-width / 2, "attn", "attention alone"),
                               (width / 2, "step", "whole model, training step")):
        speedups = [r[f"{key}_xla"] / r[f"{key}_jaxattn"] for r in rows]
        bars = right.bar(x + offset, speedups, width, label=label)
        right.bar_label(bars, labels=[f"{v:.1f}x" for v in speedups], fontsize=8)
    right.axhline(1.0, color="gray", linewidth=0.8)
    right.set_ylabel("speed-up of jaxattn over XLA")
    right.set_title("speed-up (XLA time / jaxattn time)")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(x, [f"{t}\n(B={r['batch']})" for t, r in zip(lengths, rows)])
        ax.set_xlabel("context length T (batch B x T tokens fixed)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128, help="training context length")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2, help="grouped-query attention")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="MENENIUS:\n")
    p.add_argument("--generate", type=int, default=300, help="characters to sample")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--bench-lengths", type=int, nargs="*", default=[128, 256, 512, 1024],
                   help="context lengths to time (none: skip the benchmark)")
    p.add_argument("--bench-tokens", type=int, default=4096, help="batch x T per timing")
    p.add_argument("--plot", default="bench_out/attention_speed.png",
                   help="where to save the plot ('' for none)")
    p.add_argument("--text", type=Path, default=DATA, help="training text")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    text = args.text.read_text()
    vocab = Vocab(text)
    data = vocab.encode(text)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device), "
          f"text {args.text.name}: {len(text):,} chars, vocab {len(vocab.chars)}")

    model = make_model(args, len(vocab.chars), seed=args.seed)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"model: {args.layers} layers, d_model {args.d_model}, {args.heads} query heads / "
          f"{args.kv_heads} kv heads, RoPE, {n_params / 1e6:.2f}M parameters; "
          f"batch {args.batch_size} x {args.seq_len} chars, {args.steps} steps")
    val_set = validation_set(val_data, args)
    history, train_s = train(model, args, train_data, val_set, "training")
    print(f"step     0  val loss {history[0][1]:.3f}  (uniform guess: "
          f"{math.log(len(vocab.chars)):.3f})")
    for step, v in history[1:]:
        print(f"step {step:5d}  val loss {v:.3f}")
    tokens_per_s = args.steps * args.batch_size * args.seq_len / train_s
    print(f"trained in {train_s:.0f} s ({tokens_per_s:,.0f} tokens/s); "
          f"val loss {history[0][1]:.3f} -> {history[-1][1]:.3f}")

    print(f"\n--- sample (KV-cache decoding, temperature {args.temperature}) ---")
    t0 = time.time()
    sample = generate(model, vocab, args.prompt, args.generate, args.temperature, args.seed)
    gen_s = time.time() - t0
    print(sample)
    print(f"--- {args.generate} characters in {gen_s:.1f} s ---\n")

    if args.bench_lengths:
        print("speed of this model's attention, jaxattn vs XLA (same weights, "
              "jax.nn.dot_product_attention(implementation='xla')):")
        rows = benchmark(model, args, len(vocab.chars))
        title = (f"jaxattn vs XLA attention: {args.layers}-layer char LM, {args.heads} heads / "
                 f"{args.kv_heads} kv heads, head dim {args.d_model // args.heads}, causal, "
                 f"float32, {os.cpu_count()} CPU cores")
        if args.plot:
            plot(rows, args.plot, title)
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
