"""The character LM of train_lm.py with gated linear attention, beside the softmax model.

    PYTHONPATH=. python examples/train_gla_lm.py              # ~5 minutes on 2 CPU cores
    PYTHONPATH=. python examples/train_gla_lm.py --steps 600 --plot bench_out/gla_vs_softmax.png

1. trains two decoder-only models on examples/data/coriolanus.txt with the same data, sizes,
   optimiser and steps: train_lm.py's softmax model (jaxattn FlashSelfAttention, RoPE, GQA)
   and the same model with each attention layer swapped for
   ``jaxattn.flax.nnx.GatedLinearAttention`` (flash-linear-attention's GLA layer: low-rank
   forget gate, per-head norm, output gate; no positional encoding, the decay orders tokens);
2. samples from both, the GLA model carrying its [B, N, Hk, Hv] state token by token
   (``init_cache`` + ``decode=True``: constant memory, no KV cache);
3. plots both validation-loss curves in one figure (``--plot``; needs matplotlib).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_lm  # noqa: E402  (the softmax model, data, generation)

from jaxattn.flax.nnx import GatedLinearAttention  # noqa: E402


class GLABlock(nnx.Module):
    """Pre-norm block: x + gla(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.attn = GatedLinearAttention(d_model, num_heads, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array, decode: bool = False) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), decode=decode)
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x))))


class GLACharLM(nnx.Module):
    """train_lm.CharLM with gated linear attention: token ids [B, T] -> logits [B, T, vocab]."""

    def __init__(self, vocab_size: int, *, d_model: int, num_layers: int, num_heads: int,
                 rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs,
                               embedding_init=nnx.initializers.normal(0.02))
        self.blocks = nnx.List([GLABlock(d_model, num_heads, rngs=rngs)
                                for _ in range(num_layers)])
        self.norm = nnx.RMSNorm(d_model, rngs=rngs)

    def __call__(self, tokens: jax.Array, decode: bool = False) -> jax.Array:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, decode=decode)
        return self.embed.attend(self.norm(x))

    def init_cache(self, batch_size: int, max_length: int | None = None) -> None:
        """A zero state per layer (``max_length`` is accepted for train_lm.generate and
        ignored: the state does not grow)."""
        del max_length
        for block in self.blocks:
            block.attn.init_cache(batch_size=batch_size)


def plot(histories: dict[str, list[tuple[int, float]]], path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (label, history), style in zip(histories.items(), ("o-", "s--")):
        ax.plot([s for s, _ in history], [v for _, v in history], style, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats / char)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2, help="the softmax model's GQA")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="MENENIUS:\n")
    parser.add_argument("--generate", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--plot", default="bench_out/gla_vs_softmax.png")
    parser.add_argument("--text", type=Path, default=train_lm.DATA)
    args = parser.parse_args(argv)

    text = args.text.read_text()
    vocab = train_lm.Vocab(text)
    data = vocab.encode(text)
    split = int(0.9 * len(data))
    val_set = train_lm.validation_set(data[split:], args)
    models = {
        "softmax (FlashSelfAttention)": train_lm.make_model(args, len(vocab.chars),
                                                           seed=args.seed),
        "gated linear attention": GLACharLM(len(vocab.chars), d_model=args.d_model,
                                            num_layers=args.layers, num_heads=args.heads,
                                            rngs=nnx.Rngs(args.seed)),
    }
    print(f"{args.layers} layers, d_model {args.d_model}, {args.heads} heads, batch "
          f"{args.batch_size} x {args.seq_len} chars, {args.steps} steps; uniform guess "
          f"{math.log(len(vocab.chars)):.3f} nats")
    histories = {}
    for name, model in models.items():
        params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        history, seconds = train_lm.train(model, args, data[:split], val_set, name)
        histories[name] = history
        print(f"{name}: {params / 1e6:.2f}M parameters, val loss {history[0][1]:.3f} -> "
              f"{history[-1][1]:.3f} in {seconds:.0f} s")
    for name, model in models.items():
        t0 = time.time()
        sample = train_lm.generate(model, vocab, args.prompt, args.generate, args.temperature,
                                   args.seed)
        print(f"\n--- {name} ({time.time() - t0:.1f} s) ---\n{sample}")
    if args.plot:
        plot(histories, args.plot, f"char LM, {args.layers} layers x d_model {args.d_model}: "
             f"softmax vs gated linear attention ({args.steps} steps)")


if __name__ == "__main__":
    main()
