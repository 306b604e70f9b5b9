"""Smoke test of an installed jaxattn (tools/wheel_check.sh runs it in a fresh environment).

Run it with the interpreter of that environment from outside the source tree, so that the
installed package is imported: each op once under jit (and grad for flash attention) on small
shapes against jax.nn.dot_product_attention, every kernel set this CPU can run in a fresh
process. Prints what it checked; exits non-zero on any failure.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp

import jaxattn


def check(name: str, got, want, tol: float) -> None:
    err = float(jnp.max(jnp.abs(jnp.asarray(got, jnp.float32) - jnp.asarray(want, jnp.float32))))
    print(f"  {name}: max |diff| = {err:.2e}")
    if not err <= tol:
        sys.exit(f"wheel smoke test: {name} differs from the reference by {err}")


def ops() -> None:
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 37, 4, 32))
    k = jax.random.normal(kk, (2, 45, 2, 32))
    v = jax.random.normal(kv, (2, 45, 2, 32))
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")

    check("flash_attention", jax.jit(jaxattn.flash_attention)(q, k, v), ref(q, k, v), 1e-5)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    grads = jax.jit(jax.grad(loss(jaxattn.flash_attention), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want):
        check(f"flash_attention {name}", g, w, 1e-4)

    lengths = jnp.array([45, 20], jnp.int32)
    step = q[:, :1]
    visible = jnp.arange(45)[None, None, None, :] < lengths[:, None, None, None]
    check("decode_attention",
          jax.jit(jaxattn.decode_attention)(step, k, v, lengths),
          jax.nn.dot_product_attention(step, k, v, mask=visible, implementation="xla"), 1e-5)

    mask = jaxattn.masks.causal(37, 45, block_q=16, block_kv=16)
    check("block_sparse_attention",
          jax.jit(lambda q, k, v: jaxattn.block_sparse_attention(q, k, v, mask))(q, k, v),
          jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask.to_dense())[None],
                                       implementation="xla"), 1e-5)


def main() -> None:
    if "--ops-only" in sys.argv:
        ops()
        return
    print(f"jaxattn {jaxattn.__version__} from {os.path.dirname(jaxattn.__file__)}, "
          f"jax {jax.__version__}")
    print(f"kernel sets: {jaxattn.kernel_isas()}, this CPU runs {jaxattn.available_kernel_isas()}")
    for isa in jaxattn.available_kernel_isas():
        print(f"JAXATTN_ISA={isa}:", flush=True)
        subprocess.run([sys.executable, __file__, "--ops-only"], check=True,
                       env=dict(os.environ, JAXATTN_ISA=isa))
    print("wheel smoke test passed")


if __name__ == "__main__":
    main()
