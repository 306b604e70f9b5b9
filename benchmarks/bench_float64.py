"""float64 attention (jax_enable_x64): jaxattn's float64 kernels vs XLA's attention in float64.

Medians, forward and forward+backward, with jaxattn's float32 kernels on the same shape for
scale. XLA is ``jax.nn.dot_product_attention(implementation="xla")`` on float64 inputs (which
computes its softmax in float32, see docs/semantics.md section 7; jaxattn's is float64).

    python benchmarks/bench_float64.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, os.path.dirname(__file__))
from common import describe_machine, markdown_table, median_seconds  # noqa: E402

import jaxattn  # noqa: E402

SHAPES = [  # (B, T, S, N, K, H, causal)
    (1, 1024, 1024, 8, 8, 64, True),
    (2, 512, 512, 8, 2, 128, False),
]


def _timings(shape: tuple, dtype) -> dict[str, float]:
    b, t, s, n, k, h, causal = shape
    rng = np.random.default_rng(0)
    q, key, v = (jnp.asarray(rng.standard_normal(x), dtype) for x in
                 ((b, t, n, h), (b, s, k, h), (b, s, k, h)))
    ours = jax.jit(lambda q, k, v: jaxattn.flash_attention(q, k, v, is_causal=causal))
    xla = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="xla"))

    def loss(f):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))

    out = {}
    for name, f in (("jaxattn", ours), ("xla", xla)):
        out[f"{name} fwd"] = median_seconds(lambda f=f: f(q, key, v))
        grad = loss(f)
        out[f"{name} fwd+bwd"] = median_seconds(lambda grad=grad: grad(q, key, v))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first shape only")
    args = parser.parse_args()
    print(describe_machine())
    rows = []
    for shape in SHAPES[:1] if args.quick else SHAPES:
        f64 = _timings(shape, jnp.float64)
        f32 = _timings(shape, jnp.float32)
        b, t, s, n, k, h, causal = shape
        label = f"B{b} T{t} S{s} N{n} K{k} H{h}{' causal' if causal else ''}"
        for p in ("fwd", "fwd+bwd"):
            rows.append([label, p, f"{1e3 * f64[f'jaxattn {p}']:.1f}",
                         f"{1e3 * f64[f'xla {p}']:.1f}",
                         f"{f64[f'xla {p}'] / f64[f'jaxattn {p}']:.2f}",
                         f"{1e3 * f32[f'jaxattn {p}']:.1f}"])
    print(markdown_table(["shape", "pass", "jaxattn f64 ms", "XLA f64 ms", "x XLA",
                          "jaxattn f32 ms"], rows))


if __name__ == "__main__":
    main()
